//! Prometheus metrics and runtime health, served by [`crate::http`].

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabel {
    op: &'static str,
}

/// The agent's metrics. Clones share the same series.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    pulls: Family<OutcomeLabel, Counter>,
    pull_duration: Histogram,
    image_flush: Histogram,
    containers: Gauge,
    images: Gauge,
    cri_errors: Family<OpLabel, Counter>,
    runtime_events: Counter,
    events_followed: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("warmroll_agent");
        let pulls = Family::<OutcomeLabel, Counter>::default();
        // 0.1 s .. ~27 min
        let pull_duration = Histogram::new(exponential_buckets(0.1, 2.0, 15));
        // 10 ms .. ~82 s
        let image_flush = Histogram::new(exponential_buckets(0.01, 2.0, 14));
        let containers = Gauge::default();
        let images = Gauge::default();
        let cri_errors = Family::<OpLabel, Counter>::default();
        registry.register("pulls", "Warm-up pulls by outcome", pulls.clone());
        registry.register(
            "pull_duration_seconds",
            "Duration of warm-up pulls",
            pull_duration.clone(),
        );
        registry.register(
            "image_flush_seconds",
            "Time spent writing the image filesystem back to disk (syncfs) after pulls that downloaded",
            image_flush.clone(),
        );
        registry.register(
            "inventory_containers",
            "Running containers in the last inventory",
            containers.clone(),
        );
        registry.register(
            "inventory_images",
            "Images present on the node in the last inventory",
            images.clone(),
        );
        registry.register(
            "cri_errors",
            "Failed CRI calls by operation",
            cri_errors.clone(),
        );
        let runtime_events = Counter::default();
        let events_followed = Gauge::default();
        registry.register(
            "runtime_events",
            "containerd events that named an inventory item to re-read",
            runtime_events.clone(),
        );
        registry.register(
            "runtime_events_followed",
            "1 while the inventory follows containerd's events, 0 while it polls CRI",
            events_followed.clone(),
        );
        Metrics {
            registry: Arc::new(registry),
            runtime_events,
            events_followed,
            pulls,
            pull_duration,
            image_flush,
            containers,
            images,
            cri_errors,
        }
    }

    pub fn pull_finished(&self, outcome: &'static str, duration: Duration) {
        self.pulls.get_or_create(&OutcomeLabel { outcome }).inc();
        self.pull_duration.observe(duration.as_secs_f64());
    }

    /// One flush of the image filesystem after a pull (see [`crate::warm`]).
    pub fn image_flushed(&self, duration: Duration) {
        self.image_flush.observe(duration.as_secs_f64());
    }

    pub fn inventory_size(&self, containers: usize, images: usize) {
        self.containers
            .set(i64::try_from(containers).unwrap_or(i64::MAX));
        self.images.set(i64::try_from(images).unwrap_or(i64::MAX));
    }

    pub fn runtime_event(&self) {
        self.runtime_events.inc();
    }

    pub fn events_followed(&self, followed: bool) {
        self.events_followed.set(i64::from(followed));
    }

    pub fn cri_error(&self, op: &'static str) {
        self.cri_errors.get_or_create(&OpLabel { op }).inc();
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        out
    }
}

/// When the runtime last answered, and whether the first inventory is done.
#[derive(Debug, Default)]
pub struct Health {
    last_cri_ok: Mutex<Option<Instant>>,
    inventory_ready: std::sync::atomic::AtomicBool,
}

impl Health {
    pub fn cri_ok(&self) {
        *self.last_cri_ok.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    /// The runtime answered within `window`.
    pub fn cri_reachable_within(&self, window: Duration) -> bool {
        self.last_cri_ok
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|t| t.elapsed() <= window)
    }

    pub fn set_inventory_ready(&self) {
        self.inventory_ready
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn inventory_ready(&self) -> bool {
        self.inventory_ready
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_have_the_documented_names() {
        let m = Metrics::new();
        m.pull_finished("ok", Duration::from_millis(1500));
        m.pull_finished("auth", Duration::from_millis(10));
        m.image_flushed(Duration::from_millis(400));
        m.inventory_size(3, 7);
        m.cri_error("ListContainers");
        m.runtime_event();
        m.events_followed(true);
        let text = m.encode();
        for needle in [
            "warmroll_agent_pulls_total{outcome=\"ok\"} 1",
            "warmroll_agent_pulls_total{outcome=\"auth\"} 1",
            "warmroll_agent_pull_duration_seconds_count 2",
            "warmroll_agent_image_flush_seconds_count 1",
            "warmroll_agent_inventory_containers 3",
            "warmroll_agent_inventory_images 7",
            "warmroll_agent_cri_errors_total{op=\"ListContainers\"} 1",
            "warmroll_agent_runtime_events_total 1",
            "warmroll_agent_runtime_events_followed 1",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }

    #[test]
    fn health_follows_the_last_answer() {
        let h = Health::default();
        assert!(!h.cri_reachable_within(Duration::from_secs(60)));
        h.cri_ok();
        assert!(h.cri_reachable_within(Duration::from_secs(60)));
        assert!(!h.inventory_ready());
        h.set_inventory_ready();
        assert!(h.inventory_ready());
    }
}
