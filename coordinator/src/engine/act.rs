//! The engine's writes: warm orders to agents, the one merge patch per rollout, and the
//! Kubernetes Event on the workload.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use serde_json::json;
use tracing::{debug, info, instrument, warn};
use warmroll_proto::fleet::{NodeName, WarmOutcome};
use warmroll_proto::image::{Digest, ImageRef};

use crate::config::{Mode, Policy};
use crate::drift::{LastRollout, Phase, WarmProgress};
use crate::fleet::view::WarmBytes;
use crate::fleet::{FleetView, WarmRequest, WarmState, WarmTicket};
use crate::registry::{Credentials, Keyring};
use crate::workload::{LAST_ROLLOUT_ANNOTATION, Workload, WorkloadKey, merge_patch};

/// Why a write failed.
#[derive(Debug, thiserror::Error)]
pub enum ActError {
    #[error("cannot encode the last-rollout record: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("patch of {workload} failed: {source}")]
    Patch {
        workload: String,
        source: kube::Error,
    },
}

/// How long after its own timeout an order whose agent never answered (it went away)
/// counts as failed, so that it does not hold a wave's slot for ever.
const UNANSWERED_GRACE: Duration = Duration::from_secs(30);

/// The warm orders of one rollout, per node. With warm waves
/// (`warm.maxParallelNodes`) only so many nodes have orders out at once; the others wait
/// in `queued` and [`Actor::advance`] sends theirs as earlier ones finish.
#[derive(Debug, Default)]
pub(crate) struct WarmOrders {
    tickets: BTreeMap<String, Vec<WarmTicket>>,
    /// Nodes whose order could not be sent, with why.
    unsent: BTreeMap<String, String>,
    /// Dry-run: nodes counted warm without an order.
    pretended: BTreeSet<String>,
    /// Nodes waiting for a free slot, in the order they get theirs.
    queued: VecDeque<String>,
    /// What every node is ordered to pull (the same for each node).
    requests: Vec<WarmRequest>,
    /// How many nodes may have orders out at once.
    parallel: usize,
    /// When each node's orders went out.
    sent_at: BTreeMap<String, Timestamp>,
}

/// Why outstanding warm orders are cancelled (the `reason` label of
/// `warmroll_warm_orders_cancelled_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CancelReason {
    /// A newer digest replaced the one being warmed.
    Superseded,
    /// The rollout is held.
    Held,
    /// The workload left every policy (or was deleted).
    Untracked,
}

impl CancelReason {
    pub(crate) fn label(self) -> &'static str {
        match self {
            CancelReason::Superseded => "superseded",
            CancelReason::Held => "held",
            CancelReason::Untracked => "untracked",
        }
    }

    /// Whether moving from `before` to `after` abandons a warm-up whose orders are out:
    /// a warm-up replaced by another target (stabilising or warming a newer digest) or
    /// held. Rolling keeps them (the pods pull that image next); a target that merely
    /// vanished (a registry lookup failed, the drift went away) keeps them too.
    pub(crate) fn of(before: &Phase, after: &Phase) -> Option<CancelReason> {
        let Phase::Warming { target, .. } = before else {
            return None;
        };
        match after {
            Phase::Warming { target: t, .. } | Phase::Stabilising { target: t, .. }
                if t != target =>
            {
                Some(CancelReason::Superseded)
            }
            Phase::Held { .. } => Some(CancelReason::Held),
            _ => None,
        }
    }
}

impl WarmOrders {
    pub(crate) fn pretend(nodes: &BTreeSet<String>) -> Self {
        WarmOrders {
            pretended: nodes.clone(),
            ..WarmOrders::default()
        }
    }

    /// Bytes pulled so far by the orders still downloading (summed over nodes), while
    /// their agents report progress.
    pub(crate) fn bytes(&self) -> Option<WarmBytes> {
        self.tickets
            .values()
            .flatten()
            .filter_map(|t| t.state().bytes())
            .reduce(|mut sum, b| {
                sum.add(b);
                sum
            })
    }

    /// Orders waiting for a free slot (queued nodes times images).
    pub(crate) fn queued_orders(&self) -> usize {
        self.queued.len().saturating_mul(self.requests.len())
    }

    /// Nodes whose orders are out and unfinished at `now` (an order unanswered well past
    /// its timeout counts as finished: failed).
    fn outstanding(&self, now: Timestamp) -> usize {
        let progress = self.progress(now);
        self.tickets
            .keys()
            .filter(|n| !progress.warm.contains(*n) && !progress.failed.contains_key(*n))
            .count()
    }

    /// Which nodes hold the new images, which failed, which still wait for their order.
    pub(crate) fn progress(&self, now: Timestamp) -> WarmProgress {
        let mut progress = WarmProgress {
            warm: self.pretended.clone(),
            failed: self.unsent.clone(),
            queued: self.queued.iter().cloned().collect(),
            last_sent: self.sent_at.values().max().copied(),
        };
        let timeout = self.requests.first().map(|r| r.timeout);
        for (node, tickets) in &self.tickets {
            let mut all_done = true;
            for ticket in tickets {
                match ticket.state() {
                    WarmState::Finished(WarmOutcome::Succeeded { .. }) => {}
                    WarmState::Finished(WarmOutcome::Failed { kind, message, .. }) => {
                        progress
                            .failed
                            .insert(node.clone(), format!("{kind}: {message}"));
                        all_done = false;
                    }
                    WarmState::Pending | WarmState::InProgress { .. } => {
                        all_done = false;
                        let sent = self.sent_at.get(node);
                        if let (Some(sent), Some(timeout)) = (sent, timeout)
                            && unanswered(*sent, timeout, now)
                        {
                            progress.failed.insert(
                                node.clone(),
                                format!(
                                    "no answer from the agent within {:?} of the order",
                                    timeout + UNANSWERED_GRACE
                                ),
                            );
                        }
                    }
                }
            }
            if all_done && !progress.failed.contains_key(node) {
                progress.warm.insert(node.clone());
            }
        }
        progress
    }
}

/// An order sent at `sent` with `timeout` whose agent has not answered by `now`, well
/// past the agent's own deadline.
fn unanswered(sent: Timestamp, timeout: Duration, now: Timestamp) -> bool {
    let waited = Duration::try_from(now.duration_since(sent)).unwrap_or(Duration::ZERO);
    waited > timeout + UNANSWERED_GRACE
}

/// How many more nodes get their orders now: free slots under the cap, as many as wait.
fn wave_size(parallel: usize, outstanding: usize, queued: usize) -> usize {
    parallel.saturating_sub(outstanding).min(queued)
}

/// Does the engine's writes.
pub(crate) struct Actor {
    client: Client,
    fleet: FleetView,
    keyring: Keyring,
    recorder: Recorder,
}

impl Actor {
    pub(crate) fn new(client: Client, fleet: FleetView, keyring: Keyring) -> Self {
        let reporter = Reporter {
            controller: "warmroll-coordinator".to_owned(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Actor {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            fleet,
            keyring,
        }
    }

    /// Orders the nodes in `nodes` to pull each image of `target` by tag (the tag must
    /// then resolve to the digest): at most `parallel` nodes at once, the others as
    /// [`Actor::advance`] finds slots free. Credentials (the workload's pull secrets
    /// first, then the configured ones) go only to these nodes.
    #[instrument(skip_all, fields(workload = %workload.key))]
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn warm(
        &self,
        workload: &Workload,
        pull_secrets: &Keyring,
        target: &BTreeMap<String, Digest>,
        nodes: &BTreeSet<String>,
        timeout: Duration,
        parallel: usize,
        now: Timestamp,
    ) -> WarmOrders {
        let images: Vec<(ImageRef, Digest)> = target
            .iter()
            .filter_map(|(container, digest)| {
                let spec = workload.containers.iter().find(|c| c.name == *container)?;
                Some((ImageRef::parse(&spec.image).ok()?, digest.clone()))
            })
            .collect();
        let mut requests = Vec::new();
        for (image, digest) in &images {
            let found = pull_secrets.lookup(image);
            let found = if found.is_empty() {
                self.keyring.lookup(image)
            } else {
                found
            };
            let credentials = Credentials::for_warm_order(&found).map(Credentials::to_wire);
            requests.push(WarmRequest {
                image: image.clone(),
                expected: Some(digest.clone()),
                credentials,
                timeout,
            });
        }
        let mut orders = WarmOrders {
            queued: nodes.iter().cloned().collect(),
            requests,
            parallel: parallel.max(1),
            ..WarmOrders::default()
        };
        let sent = self.advance(&mut orders, now).await;
        info!(
            nodes = nodes.len(),
            sent,
            queued = orders.queued.len(),
            images = images.len(),
            unsent = orders.unsent.len(),
            "warm orders sent"
        );
        orders
    }

    /// Warm waves: sends the orders of queued nodes while fewer than the cap have
    /// orders out and unfinished. Returns how many nodes got theirs.
    pub(crate) async fn advance(&self, orders: &mut WarmOrders, now: Timestamp) -> usize {
        if orders.queued.is_empty() {
            return 0;
        }
        let count = wave_size(
            orders.parallel,
            orders.outstanding(now),
            orders.queued.len(),
        );
        let mut sent = 0;
        for _ in 0..count {
            let Some(node) = orders.queued.pop_front() else {
                break;
            };
            sent += 1;
            let name = match NodeName::parse(&node) {
                Ok(name) => name,
                Err(e) => {
                    orders.unsent.insert(node, format!("bad node name: {e}"));
                    continue;
                }
            };
            orders.sent_at.insert(node.clone(), now);
            for request in &orders.requests {
                match self.fleet.send_order(&name, request.clone()) {
                    Ok(ticket) => orders.tickets.entry(node.clone()).or_default().push(ticket),
                    Err(e) => {
                        orders.unsent.insert(node.clone(), e.to_string());
                    }
                }
            }
        }
        sent
    }

    /// Cancels the orders still out (the agents stop the pulls no other order waits
    /// for) and drops the queued ones. Returns how many orders were cancelled.
    pub(crate) async fn cancel(
        &self,
        orders: &mut WarmOrders,
        reason: CancelReason,
        workload: &WorkloadKey,
    ) -> usize {
        let queued = orders.queued_orders();
        orders.queued.clear();
        let mut cancelled = 0;
        for ticket in orders.tickets.values().flatten() {
            if matches!(ticket.state(), WarmState::Finished(_)) {
                continue;
            }
            match self.fleet.cancel_order(&ticket.node, &ticket.order) {
                Ok(()) => cancelled += 1,
                // Gone with its node, or its agent is away: nothing left to stop there.
                Err(e) => {
                    debug!(workload = %workload, node = %ticket.node, order = %ticket.order, error = %e, "warm order not cancelled")
                }
            }
        }
        if cancelled > 0 || queued > 0 {
            info!(
                workload = %workload,
                reason = reason.label(),
                cancelled,
                queued_dropped = queued,
                "outstanding warm orders cancelled"
            );
        }
        cancelled
    }

    /// The rollout: one merge patch setting the pod-template annotation and recording
    /// the rollout on the workload.
    #[instrument(skip_all, fields(workload = %workload.key))]
    pub(crate) async fn patch(
        &self,
        workload: &Workload,
        policy: &Policy,
        record: &LastRollout,
    ) -> Result<(), ActError> {
        let body = json!({
            "metadata": {"annotations": {LAST_ROLLOUT_ANNOTATION: serde_json::to_string(record)?}},
            "spec": {"template": {"metadata": {"annotations": {
                policy.annotation_key.as_str(): record.time.to_string()
            }}}}
        });
        merge_patch(&self.client, &workload.key, &body)
            .await
            .map_err(|source| ActError::Patch {
                workload: workload.key.to_string(),
                source,
            })
    }

    /// A Kubernetes Event on the workload saying it was rolled, how and why.
    pub(crate) async fn event(&self, workload: &Workload, note: &str, how: RolledHow) {
        let reference = ObjectReference {
            api_version: Some("apps/v1".to_owned()),
            kind: Some(workload.key.kind.to_string()),
            namespace: Some(workload.key.namespace.clone()),
            name: Some(workload.key.name.clone()),
            uid: Some(workload.uid.clone()).filter(|u| !u.is_empty()),
            ..ObjectReference::default()
        };
        let event = Event {
            type_: if how == RolledHow::PartiallyWarm {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: how.reason().to_owned(),
            note: Some(note.to_owned()),
            action: "Rollout".to_owned(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &reference).await {
            warn!(workload = %workload.key, error = %e, "cannot record the rollout event");
        }
    }
}

/// How a workload was rolled, as its Event's reason says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RolledHow {
    /// Every target node held the new image first (the warm gate opened).
    Warm,
    /// The warm-up timed out below its threshold and the policy rolls anyway.
    PartiallyWarm,
    /// The policy does not warm (`warm.enabled: false`): the kubelets pull after.
    Unwarmed,
    /// A `restart` policy's schedule came due.
    Scheduled,
    /// `warmroll-coordinator rollout` asked for it (warmed first).
    Requested,
}

impl RolledHow {
    /// From the policy, whether the warm gate was forced open by a timeout, and whether
    /// a rollout request asked for it.
    pub(crate) fn of(policy: &Policy, partial: bool, requested: bool) -> RolledHow {
        match (policy.mode, policy.warm.enabled, partial) {
            (_, _, true) if requested => RolledHow::PartiallyWarm,
            _ if requested => RolledHow::Requested,
            (Mode::Restart, _, _) => RolledHow::Scheduled,
            (_, false, _) => RolledHow::Unwarmed,
            (_, true, true) => RolledHow::PartiallyWarm,
            (_, true, false) => RolledHow::Warm,
        }
    }

    pub(crate) fn reason(self) -> &'static str {
        match self {
            RolledHow::Warm => "RolledWarm",
            RolledHow::PartiallyWarm => "RolledPartiallyWarm",
            RolledHow::Unwarmed => "Rolled",
            RolledHow::Scheduled => "RestartedOnSchedule",
            RolledHow::Requested => "RolledOnRequest",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::workload::builders::mk_workload;
    use tokio::sync::mpsc;
    use warmroll_proto::fleet::{
        CoordinatorMessage, Hello, OrderId, PROTOCOL_VERSION, Runtime, WarmResult,
    };
    use warmroll_proto::image::Platform;
    use warmroll_proto::v1;

    fn ts(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).unwrap()
    }

    #[test]
    fn waves_fill_free_slots_and_unanswered_orders_give_theirs_up() {
        assert_eq!(wave_size(2, 0, 5), 2);
        assert_eq!(wave_size(2, 1, 5), 1);
        assert_eq!(wave_size(2, 2, 5), 0);
        assert_eq!(wave_size(2, 0, 1), 1);
        assert_eq!(wave_size(usize::MAX, 0, 5000), 5000);
        let timeout = Duration::from_secs(60);
        assert!(!unanswered(ts(0), timeout, ts(90)));
        assert!(unanswered(ts(0), timeout, ts(91)));
        assert!(!unanswered(ts(10), timeout, ts(0)), "a clock step back");
    }

    #[test]
    fn only_a_replaced_or_held_warm_up_is_cancelled() {
        let digest =
            |c: char| Digest::parse(&format!("sha256:{}", c.to_string().repeat(64))).unwrap();
        let target = |c: char| BTreeMap::from([("app".to_owned(), digest(c))]);
        let warming = |c: char| Phase::Warming {
            target: target(c),
            started: ts(0),
            nodes: BTreeSet::new(),
        };
        let of = CancelReason::of;
        assert_eq!(of(&warming('a'), &warming('a')), None);
        assert_eq!(
            of(&warming('a'), &warming('b')),
            Some(CancelReason::Superseded)
        );
        let stabilising = Phase::Stabilising {
            target: target('b'),
            since: ts(5),
        };
        assert_eq!(
            of(&warming('a'), &stabilising),
            Some(CancelReason::Superseded)
        );
        let held = Phase::Held {
            target: target('a'),
            reason: "timed out".into(),
        };
        assert_eq!(of(&warming('a'), &held), Some(CancelReason::Held));
        let rolling = Phase::Rolling {
            target: target('a'),
            patched: ts(9),
            partial: true,
        };
        assert_eq!(of(&warming('a'), &rolling), None, "the pods pull it next");
        assert_eq!(of(&warming('a'), &Phase::Idle), None);
        assert_eq!(of(&Phase::Idle, &warming('a')), None);
        assert_eq!(of(&held, &warming('b')), None, "nothing is out while held");
    }

    /// A connected node in `view`; its outbound messages arrive on the receiver.
    fn node(
        view: &FleetView,
        name: &str,
    ) -> (
        crate::fleet::view::SessionId,
        mpsc::Receiver<crate::fleet::view::Outbound>,
    ) {
        let hello = Hello {
            node: NodeName::parse(name).unwrap(),
            platform: Platform {
                os: "linux".into(),
                architecture: "amd64".into(),
                variant: None,
            },
            runtime: Runtime {
                name: "containerd".into(),
                version: "1.7".into(),
            },
            agent_version: "0".into(),
            protocol_version: PROTOCOL_VERSION,
        };
        let (tx, rx) = mpsc::channel(16);
        (view.connect(hello, true, tx, None).unwrap(), rx)
    }

    fn sent(rx: &mut mpsc::Receiver<crate::fleet::view::Outbound>) -> Vec<CoordinatorMessage> {
        let mut out = Vec::new();
        while let Ok(message) = rx.try_recv() {
            let message: v1::CoordinatorMessage = (*message).unwrap();
            out.push(CoordinatorMessage::try_from(message).unwrap());
        }
        out
    }

    fn order_of(messages: &[CoordinatorMessage]) -> OrderId {
        match messages {
            [CoordinatorMessage::WarmOrder(o)] => o.id.clone(),
            other => panic!("expected one warm order, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_wave_of_two_of_five_nodes_then_one_more_per_finished_node_and_cancel_stops_the_rest()
    {
        let view = FleetView::new(Duration::from_secs(60));
        let names = ["n1", "n2", "n3", "n4", "n5"];
        let mut nodes: Vec<_> = names.iter().map(|n| node(&view, n)).collect();
        let client =
            kube::Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().unwrap()))
                .unwrap();
        let actor = Actor::new(client, view.clone(), Keyring::default());
        let workload = mk_workload("shop", "web", &[("app", "reg.example/app:latest")]);
        let digest = Digest::parse(&format!("sha256:{}", "a".repeat(64))).unwrap();
        let target = BTreeMap::from([("app".to_owned(), digest)]);
        let targets: BTreeSet<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let timeout = Duration::from_secs(60);
        let mut orders = actor
            .warm(
                &workload,
                &Keyring::default(),
                &target,
                &targets,
                timeout,
                2,
                ts(0),
            )
            .await;
        let got: Vec<usize> = nodes.iter_mut().map(|(_, rx)| sent(rx).len()).collect();
        assert_eq!(got, [1, 1, 0, 0, 0], "the first wave: two nodes");
        assert_eq!(orders.queued_orders(), 3);
        let progress = orders.progress(ts(1));
        assert_eq!(progress.queued.len(), 3);
        assert_eq!(progress.last_sent, Some(ts(0)));
        assert_eq!(actor.advance(&mut orders, ts(1)).await, 0, "no slot free");

        // n1 warms: n3 gets its order, and only n3.
        let n1_order = orders.tickets["n1"][0].order.clone();
        view.record_result(
            &NodeName::parse("n1").unwrap(),
            nodes[0].0,
            WarmResult {
                order: n1_order,
                outcome: WarmOutcome::Succeeded {
                    duration: Duration::from_secs(1),
                    downloaded: true,
                    digest: None,
                    image_id: "sha256:img".into(),
                },
            },
        );
        assert_eq!(actor.advance(&mut orders, ts(2)).await, 1);
        let got: Vec<usize> = nodes.iter_mut().map(|(_, rx)| sent(rx).len()).collect();
        assert_eq!(got, [0, 0, 1, 0, 0]);
        let progress = orders.progress(ts(2));
        assert!(progress.warm.contains("n1"));
        assert_eq!(progress.last_sent, Some(ts(2)));

        // n2's agent never answers: well past its timeout it counts failed, and its
        // slot goes to the next node.
        assert_eq!(actor.advance(&mut orders, ts(80)).await, 0);
        assert_eq!(actor.advance(&mut orders, ts(91)).await, 1);
        let progress = orders.progress(ts(91));
        assert!(
            progress.failed["n2"].contains("no answer from the agent"),
            "{progress:?}"
        );
        let n4 = order_of(&sent(&mut nodes[3].1));

        // Superseded: the orders still out are cancelled (n2, n3, n4), n5 never gets one.
        let cancelled = actor
            .cancel(&mut orders, CancelReason::Superseded, &workload.key)
            .await;
        assert_eq!(cancelled, 3);
        assert_eq!(orders.queued_orders(), 0);
        let cancels: Vec<Vec<CoordinatorMessage>> =
            nodes.iter_mut().map(|(_, rx)| sent(rx)).collect();
        assert!(cancels[0].is_empty(), "n1 finished: nothing to cancel");
        assert_eq!(cancels[3], [CoordinatorMessage::CancelWarm(n4)]);
        assert!(matches!(
            cancels[1][..],
            [CoordinatorMessage::CancelWarm(_)]
        ));
        assert!(cancels[4].is_empty(), "n5 was still queued");
    }

    fn policy(yaml: &str) -> Policy {
        Config::parse(&format!("policies:\n  p:\n{yaml}"), "t")
            .unwrap()
            .policies
            .remove("p")
            .unwrap()
    }

    #[test]
    fn the_event_reason_says_how_the_workload_was_rolled() {
        let warm = policy("    mode: rollout\n");
        assert_eq!(RolledHow::of(&warm, false, false).reason(), "RolledWarm");
        assert_eq!(
            RolledHow::of(&warm, true, false).reason(),
            "RolledPartiallyWarm"
        );
        let cold = policy("    mode: rollout\n    warm: {enabled: false}\n");
        assert_eq!(RolledHow::of(&cold, false, false).reason(), "Rolled");
        let scheduled = policy("    mode: restart\n    schedule: '0 3 * * *'\n");
        assert_eq!(
            RolledHow::of(&scheduled, false, false).reason(),
            "RestartedOnSchedule"
        );
        // A requested rollout is warmed whatever the policy says.
        assert_eq!(
            RolledHow::of(&scheduled, false, true).reason(),
            "RolledOnRequest"
        );
        assert_eq!(
            RolledHow::of(&cold, false, true).reason(),
            "RolledOnRequest"
        );
        assert_eq!(
            RolledHow::of(&warm, true, true).reason(),
            "RolledPartiallyWarm"
        );
    }
}
