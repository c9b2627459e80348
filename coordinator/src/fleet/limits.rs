//! Bounds on what one agent session may send: containers and images per node, labels
//! per pod and their bytes, a snapshot's bytes, and messages per second. Past a bound
//! the session is closed with the reason (the agent logs it and reconnects), so one
//! misbehaving agent costs the coordinator a bounded amount of memory and time.
//!
//! The checks are pure functions over the protocol's checked types; the session loop
//! calls them before anything reaches the fleet view.

use std::time::Duration;

use tokio::time::Instant;
use warmroll_proto::fleet::Container;

const CONTAINERS_PER_NODE: usize = 2_000;
const IMAGES_PER_NODE: usize = 5_000;
const LABELS_PER_POD: usize = 128;
const LABEL_BYTES_PER_POD: usize = 32 * 1024;
const SNAPSHOT_BYTES: usize = 16 * 1024 * 1024;
const MESSAGES_PER_SECOND: u32 = 100;
const MESSAGE_BURST: u32 = 10_000;

/// The bounds, from `run`'s flags.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct SessionLimits {
    /// Containers one node's agent may report; past it the session is closed.
    #[arg(long = "max-containers-per-node", env = "WARMROLL_MAX_CONTAINERS_PER_NODE", default_value_t = CONTAINERS_PER_NODE)]
    pub containers_per_node: usize,
    /// Images one node's agent may report; past it the session is closed.
    #[arg(long = "max-images-per-node", env = "WARMROLL_MAX_IMAGES_PER_NODE", default_value_t = IMAGES_PER_NODE)]
    pub images_per_node: usize,
    /// Labels one reported pod may carry; past it the session is closed.
    #[arg(long = "max-labels-per-pod", env = "WARMROLL_MAX_LABELS_PER_POD", default_value_t = LABELS_PER_POD)]
    pub labels_per_pod: usize,
    /// Bytes of one reported pod's label keys and values together.
    #[arg(long = "max-label-bytes-per-pod", env = "WARMROLL_MAX_LABEL_BYTES_PER_POD", default_value_t = LABEL_BYTES_PER_POD)]
    pub label_bytes_per_pod: usize,
    /// Encoded bytes of one inventory snapshot over all its parts.
    #[arg(long = "max-snapshot-bytes", env = "WARMROLL_MAX_SNAPSHOT_BYTES", default_value_t = SNAPSHOT_BYTES)]
    pub snapshot_bytes: usize,
    /// Messages per second one agent session may send, sustained.
    #[arg(long = "max-messages-per-second", env = "WARMROLL_MAX_MESSAGES_PER_SECOND", default_value_t = MESSAGES_PER_SECOND)]
    pub messages_per_second: u32,
    /// Messages one session may send at once above the sustained rate (a snapshot
    /// comes in parts of about half a KiB, so this must cover a whole node's snapshot).
    #[arg(long = "max-message-burst", env = "WARMROLL_MAX_MESSAGE_BURST", default_value_t = MESSAGE_BURST)]
    pub message_burst: u32,
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits {
            containers_per_node: CONTAINERS_PER_NODE,
            images_per_node: IMAGES_PER_NODE,
            labels_per_pod: LABELS_PER_POD,
            label_bytes_per_pod: LABEL_BYTES_PER_POD,
            snapshot_bytes: SNAPSHOT_BYTES,
            messages_per_second: MESSAGES_PER_SECOND,
            message_burst: MESSAGE_BURST,
        }
    }
}

/// Why a session is closed for its size or pace (the agent is told this text).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("{what}: {count} is more than the coordinator takes ({limit}; see --max-{flag})")]
    Count {
        what: String,
        count: usize,
        limit: usize,
        flag: &'static str,
    },
    #[error(
        "more than {per_second} messages a second (burst {burst}; see --max-messages-per-second)"
    )]
    Rate { per_second: u32, burst: u32 },
}

fn at_most(
    what: impl FnOnce() -> String,
    count: usize,
    limit: usize,
    flag: &'static str,
) -> Result<(), LimitError> {
    if count > limit {
        return Err(LimitError::Count {
            what: what(),
            count,
            limit,
            flag,
        });
    }
    Ok(())
}

impl SessionLimits {
    /// A pod's labels: how many, and their bytes.
    pub fn check_labels(&self, container: &Container) -> Result<(), LimitError> {
        let pod = || format!("pod {}/{}", container.pod.namespace, container.pod.name);
        at_most(
            || format!("{} labels", pod()),
            container.pod_labels.len(),
            self.labels_per_pod,
            "labels-per-pod",
        )?;
        let bytes = container.pod_labels.iter().fold(0usize, |sum, (k, v)| {
            sum.saturating_add(k.len()).saturating_add(v.len())
        });
        at_most(
            || format!("{} label bytes", pod()),
            bytes,
            self.label_bytes_per_pod,
            "label-bytes-per-pod",
        )
    }

    /// Every container's labels in a message.
    pub fn check_containers<'a>(
        &self,
        containers: impl IntoIterator<Item = &'a Container>,
    ) -> Result<(), LimitError> {
        containers
            .into_iter()
            .try_for_each(|c| self.check_labels(c))
    }

    /// A node's inventory size (after a snapshot or a change).
    pub fn check_inventory(&self, containers: usize, images: usize) -> Result<(), LimitError> {
        at_most(
            || "containers on the node".to_owned(),
            containers,
            self.containers_per_node,
            "containers-per-node",
        )?;
        at_most(
            || "images on the node".to_owned(),
            images,
            self.images_per_node,
            "images-per-node",
        )
    }

    /// The bytes of a snapshot received so far.
    pub fn check_snapshot_bytes(&self, bytes: usize) -> Result<(), LimitError> {
        at_most(
            || "snapshot bytes".to_owned(),
            bytes,
            self.snapshot_bytes,
            "snapshot-bytes",
        )
    }

    /// A fresh message budget for one session.
    pub fn budget(&self, now: Instant) -> MessageBudget {
        MessageBudget {
            per_second: self.messages_per_second.max(1),
            burst: self.message_burst.max(1),
            tokens: f64::from(self.message_burst.max(1)),
            at: now,
        }
    }
}

/// A token bucket of messages: `burst` at once, refilled at `per_second`.
#[derive(Debug, Clone)]
pub struct MessageBudget {
    per_second: u32,
    burst: u32,
    tokens: f64,
    at: Instant,
}

impl MessageBudget {
    /// Takes one message at `now`; an error once the session sends faster than allowed.
    pub fn take(&mut self, now: Instant) -> Result<(), LimitError> {
        let elapsed: Duration = now.saturating_duration_since(self.at);
        self.at = now;
        self.tokens = (self.tokens + elapsed.as_secs_f64() * f64::from(self.per_second))
            .min(f64::from(self.burst));
        if self.tokens < 1.0 {
            return Err(LimitError::Rate {
                per_second: self.per_second,
                burst: self.burst,
            });
        }
        self.tokens -= 1.0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use warmroll_proto::fleet::PodRef;

    use super::*;

    fn container(labels: usize, value_len: usize) -> Container {
        Container {
            id: "c".into(),
            pod: PodRef {
                namespace: "ns".into(),
                name: "web".into(),
                uid: "u".into(),
            },
            pod_labels: (0..labels)
                .map(|i| (format!("k{i}"), "v".repeat(value_len)))
                .collect::<BTreeMap<_, _>>(),
            name: "app".into(),
            image: "web:1".into(),
            image_id: "sha256:1".into(),
            digest: None,
        }
    }

    #[test]
    fn labels_are_bounded_in_number_and_bytes_and_the_error_names_the_pod() {
        let limits = SessionLimits::default();
        assert!(limits.check_labels(&container(128, 10)).is_ok());
        let e = limits.check_labels(&container(10_000, 1)).unwrap_err();
        assert!(e.to_string().contains("pod ns/web labels: 10000"), "{e}");
        assert!(e.to_string().contains("--max-labels-per-pod"), "{e}");
        let e = limits.check_labels(&container(100, 1000)).unwrap_err();
        assert!(e.to_string().contains("label bytes"), "{e}");
        assert!(matches!(e, LimitError::Count { .. }));
    }

    #[test]
    fn inventories_and_snapshots_are_bounded() {
        let limits = SessionLimits::default();
        assert!(limits.check_inventory(2_000, 5_000).is_ok());
        assert!(limits.check_inventory(200_000, 0).is_err());
        assert!(limits.check_inventory(0, 5_001).is_err());
        assert!(limits.check_snapshot_bytes(16 * 1024 * 1024).is_ok());
        assert!(limits.check_snapshot_bytes(16 * 1024 * 1024 + 1).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn the_message_budget_takes_a_burst_then_the_sustained_rate() {
        let limits = SessionLimits {
            messages_per_second: 10,
            message_burst: 20,
            ..SessionLimits::default()
        };
        let start = Instant::now();
        let mut budget = limits.budget(start);
        for _ in 0..20 {
            budget.take(start).unwrap();
        }
        let e = budget.take(start).unwrap_err();
        assert!(matches!(e, LimitError::Rate { .. }));
        // A second later, ten more.
        let later = start + Duration::from_secs(1);
        for _ in 0..10 {
            budget.take(later).unwrap();
        }
        assert!(budget.take(later).is_err());
        // 1,000 a second against 10 a second ends within the burst's worth.
        let mut budget = limits.budget(start);
        let refused = (0..1_000u64)
            .position(|i| budget.take(start + Duration::from_millis(i)).is_err())
            .unwrap();
        assert!(refused < 30, "refused after {refused} messages");
    }
}
