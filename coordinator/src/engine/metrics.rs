//! The engine's Prometheus metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::drift::State;
use crate::report::Report;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

/// Handles on the engine's metrics (cheap clones of shared atomics).
#[derive(Clone)]
pub struct EngineMetrics {
    tracked_workloads: Gauge,
    containers: Family<StateLabel, Gauge>,
    time_to_detect: Histogram,
    time_to_warm: Histogram,
    rollout_duration: Histogram,
    rollouts: Family<ResultLabel, Counter>,
    warm_queued: Gauge,
    warm_cancelled: Family<ReasonLabel, Counter>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

impl EngineMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let seconds = || Histogram::new(exponential_buckets(0.5, 2.0, 14));
        let metrics = EngineMetrics {
            tracked_workloads: Gauge::default(),
            containers: Family::default(),
            time_to_detect: seconds(),
            time_to_warm: seconds(),
            rollout_duration: seconds(),
            rollouts: Family::default(),
            warm_queued: Gauge::default(),
            warm_cancelled: Family::default(),
        };
        registry.register(
            "warmroll_tracked_workloads",
            "Workloads a policy tracks",
            metrics.tracked_workloads.clone(),
        );
        registry.register(
            "warmroll_containers",
            "Tracked containers by drift state",
            metrics.containers.clone(),
        );
        registry.register(
            "warmroll_time_to_detect_seconds",
            "From a registry webhook announcing a push to the drift showing in the report",
            metrics.time_to_detect.clone(),
        );
        registry.register(
            "warmroll_time_to_warm_seconds",
            "From the first warm order of a rollout to its warm gate opening",
            metrics.time_to_warm.clone(),
        );
        registry.register(
            "warmroll_rollout_duration_seconds",
            "From the rollout patch to every pod running the new digest",
            metrics.rollout_duration.clone(),
        );
        registry.register(
            "warmroll_rollouts",
            "Rollout decisions by result (patched, partial, held, dry_run, failed)",
            metrics.rollouts.clone(),
        );
        registry.register(
            "warmroll_warm_orders_queued",
            "Warm orders waiting for a free slot under their policy's warm.maxParallelNodes",
            metrics.warm_queued.clone(),
        );
        registry.register(
            "warmroll_warm_orders_cancelled",
            "Warm orders cancelled on the agents by reason (superseded, held, untracked)",
            metrics.warm_cancelled.clone(),
        );
        metrics
    }

    pub fn observe_report(&self, report: &Report) {
        self.tracked_workloads
            .set(i64::try_from(report.summary.workloads).unwrap_or(i64::MAX));
        for state in State::NAMES {
            self.containers
                .get_or_create(&StateLabel {
                    state: state.to_owned(),
                })
                .set(i64::try_from(report.count(state)).unwrap_or(i64::MAX));
        }
    }

    pub fn detected(&self, seconds: f64) {
        self.time_to_detect.observe(seconds);
    }

    pub fn warmed(&self, seconds: f64) {
        self.time_to_warm.observe(seconds);
    }

    pub fn converged(&self, seconds: f64) {
        self.rollout_duration.observe(seconds);
    }

    /// Warm orders waiting in warm waves, over all workloads.
    pub fn warm_queued(&self, orders: usize) {
        self.warm_queued
            .set(i64::try_from(orders).unwrap_or(i64::MAX));
    }

    /// `orders` warm orders were cancelled for `reason`.
    pub fn warm_cancelled(&self, reason: &str, orders: usize) {
        self.warm_cancelled
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc_by(u64::try_from(orders).unwrap_or(u64::MAX));
    }

    pub fn rollout(&self, result: &str) {
        self.rollouts
            .get_or_create(&ResultLabel {
                result: result.to_owned(),
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Mode;
    use crate::drift::ContainerDrift;
    use crate::report::WorkloadReport;
    use crate::workload::Kind;

    #[test]
    fn report_counts_and_observations_are_exposed() {
        let mut registry = Registry::default();
        let metrics = EngineMetrics::register(&mut registry);
        let container = |state: State| ContainerDrift {
            container: "c".into(),
            image: "i".into(),
            init: false,
            registry_digest: None,
            running: Vec::new(),
            drifted_nodes: Default::default(),
            state,
        };
        let report = Report::new(
            jiff::Timestamp::UNIX_EPOCH,
            true,
            vec![WorkloadReport {
                namespace: "n".into(),
                kind: Kind::Deployment,
                name: "w".into(),
                policy: "p".into(),
                mode: Mode::Rollout,
                note: None,
                warm_bytes: None,
                containers: vec![container(State::Drift), container(State::Pinned)],
            }],
        );
        metrics.observe_report(&report);
        metrics.detected(1.5);
        metrics.warmed(3.0);
        metrics.converged(10.0);
        metrics.rollout("patched");
        metrics.warm_queued(6);
        metrics.warm_cancelled("superseded", 2);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            "warmroll_tracked_workloads 1",
            "warmroll_containers{state=\"drift\"} 1",
            "warmroll_containers{state=\"pinned\"} 1",
            "warmroll_containers{state=\"held\"} 0",
            "warmroll_time_to_detect_seconds_count 1",
            "warmroll_time_to_warm_seconds_sum 3.0",
            "warmroll_rollout_duration_seconds_count 1",
            "warmroll_rollouts_total{result=\"patched\"} 1",
            "warmroll_warm_orders_queued 6",
            "warmroll_warm_orders_cancelled_total{reason=\"superseded\"} 2",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }
}
