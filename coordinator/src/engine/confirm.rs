//! Pod reports that would start a rollout or hold one back are confirmed with the API
//! server before they count.
//!
//! The agents report their nodes' pods, and the engine matches them to workloads by
//! namespace and labels. An agent could report a pod of any namespace, labelled like any
//! workload, on any digest: a restart of that workload, or one that never converges.
//! So a reported pod whose digest would count against its tag's current digest (see
//! [`crate::drift::would_count`]) counts only once the API server says a pod of that
//! name and uid exists in that namespace on that node: one metadata-only list per pod
//! uid (`metadata.name` and `spec.nodeName` field selectors), remembered. A report that
//! does not match is ignored, logged once and counted; a failed lookup (the API server
//! unreachable) is asked again next cycle and the report counts meanwhile, since an
//! agent cannot make the API server fail.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, ListParams};
use prometheus_client::metrics::counter::Counter;
use tracing::warn;

/// Lookups at a time.
const CONCURRENT: usize = 16;
/// Lookups one node's reports may cause per engine step (the rest wait a step).
const PER_NODE_PER_STEP: usize = 32;
/// How long one lookup may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
/// Pod uids remembered.
const REMEMBERED: u64 = 200_000;

/// One reported pod.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct PodReport {
    pub node: String,
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// What the API server said about a reported pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Confirmed,
    Refuted,
}

/// Confirms pod reports, remembering each uid's verdict.
pub(crate) struct PodConfirmer {
    client: Client,
    verdicts: moka::sync::Cache<String, Verdict>,
    refuted: Counter,
}

impl PodConfirmer {
    pub(crate) fn new(client: Client, metrics: &mut prometheus_client::registry::Registry) -> Self {
        let refuted = Counter::default();
        metrics.register(
            "warmroll_pod_reports_refuted",
            "Pods an agent reported that the API server does not have in that namespace on that node (ignored)",
            refuted.clone(),
        );
        PodConfirmer {
            client,
            verdicts: moka::sync::Cache::builder()
                .max_capacity(REMEMBERED)
                .build(),
            refuted,
        }
    }

    /// Of `reports`, the uids that must not count this step: refuted ones, and those
    /// not looked up yet because their node's share of this step is used up.
    pub(crate) async fn unconfirmed(&self, reports: BTreeSet<PodReport>) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
        let mut ask: Vec<PodReport> = Vec::new();
        for report in reports {
            match self.verdicts.get(&report.uid) {
                Some(Verdict::Confirmed) => {}
                Some(Verdict::Refuted) => {
                    out.insert(report.uid);
                }
                None => {
                    let asked = per_node.entry(report.node.clone()).or_default();
                    if *asked < PER_NODE_PER_STEP {
                        *asked += 1;
                        ask.push(report);
                    } else {
                        out.insert(report.uid);
                    }
                }
            }
        }
        let mut lookups = futures::stream::iter(ask.into_iter().map(|report| {
            let client = self.client.clone();
            async move {
                let verdict = look_up(client, &report).await;
                (report, verdict)
            }
        }))
        .buffer_unordered(CONCURRENT);
        while let Some((report, verdict)) = lookups.next().await {
            let Some(verdict) = verdict else { continue };
            self.verdicts.insert(report.uid.clone(), verdict);
            if verdict == Verdict::Refuted {
                self.refuted.inc();
                warn!(
                    node = %report.node,
                    namespace = %report.namespace,
                    pod = %report.name,
                    uid = %report.uid,
                    "an agent reported a pod the API server does not have on that node; ignored"
                );
                out.insert(report.uid);
            }
        }
        out
    }
}

/// The API server's verdict on a reported pod, or `None` when it could not be asked.
async fn look_up(client: Client, report: &PodReport) -> Option<Verdict> {
    let api: Api<Pod> = Api::namespaced(client, &report.namespace);
    let params = ListParams::default()
        .fields(&format!(
            "metadata.name={},spec.nodeName={}",
            report.name, report.node
        ))
        .limit(2);
    let listed = match tokio::time::timeout(LOOKUP_TIMEOUT, api.list_metadata(&params)).await {
        Ok(Ok(listed)) => listed,
        Ok(Err(e)) => {
            warn!(namespace = %report.namespace, pod = %report.name, error = %e, "cannot confirm a reported pod; asking again next step");
            return None;
        }
        Err(_) => {
            warn!(namespace = %report.namespace, pod = %report.name, "confirming a reported pod timed out; asking again next step");
            return None;
        }
    };
    Some(verdict(
        listed.items.iter().map(|p| p.metadata.uid.as_deref()),
        &report.uid,
    ))
}

/// Confirmed when a pod the API server listed (by name and node) has the reported uid.
fn verdict<'a>(listed: impl IntoIterator<Item = Option<&'a str>>, uid: &str) -> Verdict {
    if listed.into_iter().any(|u| u == Some(uid)) {
        Verdict::Confirmed
    } else {
        Verdict::Refuted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_same_uid_on_that_node_confirms() {
        assert_eq!(verdict([Some("u1")], "u1"), Verdict::Confirmed);
        assert_eq!(
            verdict([Some("u2")], "u1"),
            Verdict::Refuted,
            "a new pod of that name"
        );
        assert_eq!(verdict([None], "u1"), Verdict::Refuted);
        assert_eq!(
            verdict(std::iter::empty(), "u1"),
            Verdict::Refuted,
            "not on that node"
        );
    }
}
