//! What one agent session's messages do, one at a time: the pace and size checks
//! ([`super::limits`]), decoding into checked types, putting snapshot parts together,
//! and applying the result to the [`FleetView`]. The session loop
//! ([`super::server`]) feeds it and acts on what it returns; nothing here waits.

use tokio::time::Instant;
use tonic::Status;
use tracing::{info, warn};
use warmroll_proto::fleet::{AgentMessage, CoordinatorMessage, NodeName, SnapshotAssembly};
use warmroll_proto::v1;

use super::limits::{LimitError, MessageBudget, SessionLimits};
use super::view::{Applied, FleetView, SessionEnd, SessionId};

/// How a session ends: the status for the agent, and the reason it counts under when
/// the coordinator ended it for what the agent did.
#[derive(Debug)]
pub(crate) struct Ending {
    pub status: Status,
    pub reason: Option<SessionEnd>,
}

impl Ending {
    pub(crate) fn by(reason: SessionEnd, status: Status) -> Self {
        Ending {
            status,
            reason: Some(reason),
        }
    }

    /// An end the agent did not cause (shutdown, a newer session, a broken stream).
    pub(crate) fn quietly(status: Status) -> Self {
        Ending {
            status,
            reason: None,
        }
    }

    fn over(e: &LimitError) -> Self {
        Ending::by(
            SessionEnd::OverLimit,
            Status::resource_exhausted(e.to_string()),
        )
    }

    fn malformed(message: impl Into<String>) -> Self {
        Ending::by(SessionEnd::Malformed, Status::invalid_argument(message))
    }
}

/// One session's receiving side.
pub(crate) struct Receiver {
    node: NodeName,
    session: SessionId,
    snapshot: SnapshotAssembly,
    /// The bytes, containers and images of the snapshot being put together.
    snapshot_bytes: usize,
    snapshot_entries: (usize, usize),
    budget: MessageBudget,
}

impl Receiver {
    pub(crate) fn new(
        node: NodeName,
        session: SessionId,
        limits: &SessionLimits,
        now: Instant,
    ) -> Self {
        Receiver {
            node,
            session,
            snapshot: SnapshotAssembly::default(),
            snapshot_bytes: 0,
            snapshot_entries: (0, 0),
            budget: limits.budget(now),
        }
    }

    /// Takes one message at `now`: `Ok(Some(resync))` when the agent must be asked for
    /// a snapshot, `Err` when the session ends.
    pub(crate) fn receive(
        &mut self,
        view: &FleetView,
        limits: &SessionLimits,
        message: v1::AgentMessage,
        now: Instant,
    ) -> Result<Option<CoordinatorMessage>, Ending> {
        let (node, session) = (&self.node, self.session);
        self.budget
            .take(now)
            .map_err(|e| Ending::by(SessionEnd::Rate, Status::resource_exhausted(e.to_string())))?;
        let bytes = prost::Message::encoded_len(&message);
        let message = AgentMessage::try_from(message).map_err(|e| {
            warn!(node = %node, session, error = %e, "malformed agent message; ending the session");
            Ending::malformed(e.to_string())
        })?;
        let containers = match &message {
            AgentMessage::Snapshot(part) => part.snapshot.containers.as_slice(),
            AgentMessage::Change(change) => change.upserted.as_slice(),
            _ => &[],
        };
        limits
            .check_containers(containers)
            .map_err(|e| Ending::over(&e))?;
        let applied = match message {
            AgentMessage::Hello(_) => {
                return Err(Ending::malformed("hello: sent twice in one session"));
            }
            AgentMessage::Snapshot(part) => {
                self.snapshot_bytes = self.snapshot_bytes.saturating_add(bytes);
                self.snapshot_entries.0 = self
                    .snapshot_entries
                    .0
                    .saturating_add(part.snapshot.containers.len());
                self.snapshot_entries.1 = self
                    .snapshot_entries
                    .1
                    .saturating_add(part.snapshot.images.len());
                limits
                    .check_snapshot_bytes(self.snapshot_bytes)
                    .and_then(|()| {
                        limits.check_inventory(self.snapshot_entries.0, self.snapshot_entries.1)
                    })
                    .map_err(|e| Ending::over(&e))?;
                match self.snapshot.push(part) {
                    Ok(Some(whole)) => {
                        self.snapshot_bytes = 0;
                        self.snapshot_entries = (0, 0);
                        view.apply_snapshot(node, session, whole)
                    }
                    Ok(None) => Applied::Ok,
                    Err(e) => {
                        warn!(node = %node, session, error = %e, "malformed snapshot part; ending the session");
                        return Err(Ending::malformed(e.to_string()));
                    }
                }
            }
            AgentMessage::Change(_) if self.snapshot.is_pending() => {
                return Err(Ending::malformed(
                    "change: sent before the last part of the snapshot",
                ));
            }
            AgentMessage::Change(c) => view.apply_change(node, session, c, limits),
            AgentMessage::WarmResult(r) => view.record_result(node, session, r),
            AgentMessage::WarmProgress(p) => view.record_progress(node, session, p),
            AgentMessage::Heartbeat => {
                if view.is_current(node, session) {
                    Applied::Ok
                } else {
                    Applied::Superseded
                }
            }
        };
        match applied {
            Applied::Ok => Ok(None),
            Applied::Superseded => Err(Ending::quietly(Status::aborted(
                "a newer session of this node replaced this one",
            ))),
            Applied::OverLimit(e) => Err(Ending::over(&e)),
            Applied::Gap { expected, got } => {
                info!(node = %node, session, ?expected, got, "inventory sequence gap; asking for a snapshot");
                Ok(Some(CoordinatorMessage::Resync {
                    reason: format!("inventory change {got} does not follow {expected:?}"),
                }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::Duration;

    use proptest::prelude::*;
    use tokio::sync::mpsc;
    use warmroll_proto::fleet::{Hello, Runtime};
    use warmroll_proto::image::Platform;

    use super::*;

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(String::new()),
            "[a-z0-9.-]{1,12}",
            "sha256:[0-9a-f]{64}",
            ".{0,40}",
        ]
    }

    fn container() -> impl Strategy<Value = v1::Container> {
        (
            text(),
            (text(), text(), text()),
            prop::collection::hash_map(text(), text(), 0..40),
            text(),
            text(),
            text(),
            text(),
        )
            .prop_map(
                |(id, (namespace, name, uid), labels, cname, image, image_id, digest)| {
                    v1::Container {
                        id,
                        pod: Some(v1::PodRef {
                            namespace,
                            name,
                            uid,
                        }),
                        pod_labels: labels.into_iter().collect::<HashMap<_, _>>(),
                        name: cname,
                        image,
                        image_id,
                        digest,
                    }
                },
            )
    }

    fn image() -> impl Strategy<Value = v1::Image> {
        (text(), prop::collection::vec(text(), 0..3), any::<u64>()).prop_map(|(id, tags, size)| {
            v1::Image {
                id,
                repo_tags: tags.clone(),
                repo_digests: tags,
                size,
            }
        })
    }

    fn message() -> impl Strategy<Value = v1::AgentMessage> {
        use v1::agent_message::Kind;
        let kind = prop_oneof![
            (
                any::<u64>(),
                prop::collection::vec(container(), 0..30),
                prop::collection::vec(image(), 0..10),
                any::<bool>()
            )
                .prop_map(|(sequence, containers, images, more)| Kind::Snapshot(
                    v1::InventorySnapshot {
                        sequence,
                        containers,
                        images,
                        more
                    }
                )),
            (
                any::<u64>(),
                prop::collection::vec(container(), 0..30),
                prop::collection::vec(text(), 0..5)
            )
                .prop_map(|(sequence, upserted, removed)| Kind::Change(
                    v1::InventoryChange {
                        sequence,
                        upserted,
                        removed,
                        images_upserted: vec![],
                        images_removed: vec![],
                    }
                )),
            (text(), any::<u64>(), any::<u64>()).prop_map(|(order, done, total)| {
                Kind::WarmProgress(v1::WarmProgress {
                    order_id: order,
                    bytes_done: done,
                    bytes_total: total,
                })
            }),
            Just(Kind::Heartbeat(v1::Heartbeat {})),
            Just(Kind::Hello(v1::Hello::default())),
        ];
        prop::option::weighted(0.95, kind).prop_map(|kind| v1::AgentMessage { kind })
    }

    fn hello() -> Hello {
        Hello {
            node: NodeName::parse("node-a").unwrap(),
            platform: Platform::parse("linux/amd64").unwrap(),
            runtime: Runtime {
                name: "containerd".into(),
                version: "2.2".into(),
            },
            agent_version: "0".into(),
            protocol_version: 1,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Any sequence of well-formed protobuf messages, any field values: no panic,
        /// and the node's inventory never exceeds the bounds.
        #[test]
        fn arbitrary_agent_messages_never_panic_or_exceed_the_bounds(
            messages in prop::collection::vec(message(), 1..40)
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
            runtime.block_on(async {
                let limits = SessionLimits {
                    containers_per_node: 50,
                    images_per_node: 20,
                    labels_per_pod: 16,
                    label_bytes_per_pod: 256,
                    snapshot_bytes: 16 * 1024,
                    messages_per_second: 10,
                    message_burst: 30,
                };
                let view = FleetView::new(Duration::from_secs(60));
                let (tx, _rx) = mpsc::channel(4);
                let node = NodeName::parse("node-a").unwrap();
                let session = view.connect(hello(), true, tx, None).unwrap();
                let start = Instant::now();
                let mut receiver = Receiver::new(node.clone(), session, &limits, start);
                for (i, m) in messages.into_iter().enumerate() {
                    let now = start + Duration::from_millis(u64::try_from(i).unwrap() * 10);
                    let outcome = receiver.receive(&view, &limits, m, now);
                    if let Some(info) = view.node(&node) {
                        prop_assert!(info.containers.len() <= limits.containers_per_node);
                        prop_assert!(info.images.len() <= limits.images_per_node);
                        for c in &info.containers {
                            prop_assert!(c.pod_labels.len() <= limits.labels_per_pod);
                        }
                    }
                    prop_assert!(receiver.snapshot_bytes <= limits.snapshot_bytes);
                    if outcome.is_err() {
                        break;
                    }
                }
                Ok(())
            })?;
        }
    }
}
