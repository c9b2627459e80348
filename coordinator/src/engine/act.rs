//! The engine's writes: warm orders to agents, the one merge patch per rollout, and the
//! Kubernetes Event on the workload.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client};
use serde_json::json;
use tracing::{info, instrument, warn};
use warmroll_proto::fleet::{NodeName, WarmOutcome};
use warmroll_proto::image::{Digest, ImageRef};

use crate::config::{Mode, Policy};
use crate::drift::{LastRollout, WarmProgress};
use crate::fleet::view::WarmBytes;
use crate::fleet::{FleetView, WarmRequest, WarmState, WarmTicket};
use crate::registry::{Credentials, Keyring};
use crate::workload::{Kind, LAST_ROLLOUT_ANNOTATION, Workload};

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

/// The warm orders of one rollout, per node.
#[derive(Debug, Default)]
pub(crate) struct WarmOrders {
    tickets: BTreeMap<String, Vec<WarmTicket>>,
    /// Nodes whose order could not be sent, with why.
    unsent: BTreeMap<String, String>,
    /// Dry-run: nodes counted warm without an order.
    pretended: BTreeSet<String>,
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

    /// Which nodes hold the new images, and which failed.
    pub(crate) fn progress(&self) -> WarmProgress {
        let mut progress = WarmProgress {
            warm: self.pretended.clone(),
            failed: self.unsent.clone(),
        };
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
                    WarmState::Pending | WarmState::InProgress { .. } => all_done = false,
                }
            }
            if all_done && !progress.failed.contains_key(node) {
                progress.warm.insert(node.clone());
            }
        }
        progress
    }
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

    /// Orders every node in `nodes` to pull each image of `target` by tag (the tag must
    /// then resolve to the digest). Credentials (the workload's pull secrets first, then
    /// the configured ones) go only to these nodes.
    #[instrument(skip_all, fields(workload = %workload.key))]
    pub(crate) async fn warm(
        &self,
        workload: &Workload,
        pull_secrets: &Keyring,
        target: &BTreeMap<String, Digest>,
        nodes: &BTreeSet<String>,
        timeout: Duration,
    ) -> WarmOrders {
        let mut orders = WarmOrders::default();
        let images: Vec<(ImageRef, Digest)> = target
            .iter()
            .filter_map(|(container, digest)| {
                let spec = workload.containers.iter().find(|c| c.name == *container)?;
                Some((ImageRef::parse(&spec.image).ok()?, digest.clone()))
            })
            .collect();
        for node in nodes {
            let name = match NodeName::parse(node) {
                Ok(name) => name,
                Err(e) => {
                    orders
                        .unsent
                        .insert(node.clone(), format!("bad node name: {e}"));
                    continue;
                }
            };
            for (image, digest) in &images {
                let found = pull_secrets.lookup(image);
                let found = if found.is_empty() {
                    self.keyring.lookup(image)
                } else {
                    found
                };
                let credentials = Credentials::for_warm_order(&found).map(Credentials::to_wire);
                let request = WarmRequest {
                    image: image.clone(),
                    expected: Some(digest.clone()),
                    credentials,
                    timeout,
                };
                match self.fleet.send_order(&name, request).await {
                    Ok(ticket) => orders.tickets.entry(node.clone()).or_default().push(ticket),
                    Err(e) => {
                        orders.unsent.insert(node.clone(), e.to_string());
                    }
                }
            }
        }
        info!(
            nodes = nodes.len(),
            images = images.len(),
            unsent = orders.unsent.len(),
            "warm orders sent"
        );
        orders
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
        let params = PatchParams::default();
        let patch = Patch::Merge(&body);
        let ns = &workload.key.namespace;
        let name = &workload.key.name;
        let result = match workload.key.kind {
            Kind::Deployment => Api::<Deployment>::namespaced(self.client.clone(), ns)
                .patch(name, &params, &patch)
                .await
                .map(|_| ()),
            Kind::StatefulSet => Api::<StatefulSet>::namespaced(self.client.clone(), ns)
                .patch(name, &params, &patch)
                .await
                .map(|_| ()),
            Kind::DaemonSet => Api::<DaemonSet>::namespaced(self.client.clone(), ns)
                .patch(name, &params, &patch)
                .await
                .map(|_| ()),
        };
        result.map_err(|source| ActError::Patch {
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
}

impl RolledHow {
    /// From the policy and whether the warm gate was forced open by a timeout.
    pub(crate) fn of(policy: &Policy, partial: bool) -> RolledHow {
        match (policy.mode, policy.warm.enabled, partial) {
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
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

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
        assert_eq!(RolledHow::of(&warm, false).reason(), "RolledWarm");
        assert_eq!(RolledHow::of(&warm, true).reason(), "RolledPartiallyWarm");
        let cold = policy("    mode: rollout\n    warm: {enabled: false}\n");
        assert_eq!(RolledHow::of(&cold, false).reason(), "Rolled");
        let scheduled = policy("    mode: restart\n    schedule: '0 3 * * *'\n");
        assert_eq!(
            RolledHow::of(&scheduled, false).reason(),
            "RestartedOnSchedule"
        );
    }
}
