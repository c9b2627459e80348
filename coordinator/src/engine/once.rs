//! `report --once`: the drift report computed directly against a cluster, without
//! agents: the workloads listed once, running digests from their pods' status
//! (`containerStatuses[].imageID`). The one place warmroll lists pods: a one-off LIST per
//! namespace that has tracked workloads, never a watch.

use std::collections::{BTreeSet, HashMap};

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::{Api, Client};
use warmroll_proto::image::{Digest, ImageRef};

use super::secrets::PullSecrets;
use super::watch::{scope_text, scoped, scopes};
use super::{EngineError, containers_of, resolve_all};
use crate::config::Config;
use crate::drift::{self, Running};
use crate::registry::Resolver;
use crate::report::{Report, WorkloadReport};
use crate::workload::{Kind, Workload};

/// Computes one report against the cluster `client` reaches.
#[tracing::instrument(skip_all)]
pub async fn report_once(
    client: &Client,
    config: &Config,
    resolver: &Resolver,
) -> Result<Report, EngineError> {
    let workloads = list_workloads(client, config).await?;
    let selection = drift::select(config, workloads);
    let namespaces: BTreeSet<String> = selection
        .tracked
        .iter()
        .map(|(w, _)| w.key.namespace.clone())
        .collect();
    let mut pods: HashMap<String, Vec<Running>> = HashMap::new();
    let mut labels: HashMap<(String, String), std::collections::BTreeMap<String, String>> =
        HashMap::new();
    for ns in &namespaces {
        let list = Api::<Pod>::namespaced(client.clone(), ns)
            .list(&ListParams::default())
            .await
            .map_err(|source| EngineError::List {
                what: format!("pods in namespace {ns}"),
                source,
            })?;
        for pod in list.items {
            let name = pod.metadata.name.clone().unwrap_or_default();
            labels.insert(
                (ns.clone(), name.clone()),
                pod.metadata.labels.clone().unwrap_or_default(),
            );
            pods.entry(ns.clone())
                .or_default()
                .extend(running_from_status(&pod));
        }
    }
    let mut secrets = PullSecrets::default();
    let mut images = Vec::new();
    for (w, p) in &selection.tracked {
        let keyring = secrets.keyring(client, w).await;
        images.extend(
            drift::tracked_containers(w, p)
                .filter_map(|c| ImageRef::parse(&c.image).ok())
                .map(|i| (i, keyring.clone())),
        );
    }
    let lookups = resolve_all(resolver, images).await;
    let mut reports = Vec::new();
    for (workload, policy) in &selection.tracked {
        let ns = &workload.key.namespace;
        let mine: Vec<Running> = pods
            .get(ns)
            .into_iter()
            .flatten()
            .filter(|r| {
                labels
                    .get(&(ns.clone(), r.pod.clone()))
                    .is_some_and(|l| workload.selector.matches(l))
            })
            .cloned()
            .collect();
        reports.push(WorkloadReport {
            namespace: ns.clone(),
            kind: workload.key.kind,
            name: workload.key.name.clone(),
            policy: policy.name.clone(),
            mode: policy.mode,
            note: None,
            warm_bytes: None,
            containers: containers_of(workload, policy, &lookups, &mine),
        });
    }
    Ok(Report::new(Timestamp::now(), false, reports))
}

/// The running containers a pod's status names, with the manifest digest from
/// `imageID` when it carries one (`repo@sha256:…`).
pub(crate) fn running_from_status(pod: &Pod) -> Vec<Running> {
    let node = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let Some(status) = &pod.status else {
        return Vec::new();
    };
    status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten())
        .map(|c| Running {
            node: node.clone(),
            pod: name.clone(),
            container: c.name.clone(),
            digest: c
                .image_id
                .rsplit_once('@')
                .and_then(|(_, d)| Digest::parse(d).ok()),
        })
        .collect()
}

async fn list_workloads(client: &Client, config: &Config) -> Result<Vec<Workload>, EngineError> {
    let kinds: BTreeSet<Kind> = config
        .policies
        .values()
        .flat_map(|p| p.kinds.iter().copied())
        .collect();
    let labelled = ListParams::default().labels(&config.policy_label);
    let mut out = Vec::new();
    let err = |what: String| move |source| EngineError::List { what, source };
    for kind in kinds {
        for scope in scopes(config) {
            let what = format!(
                "{kind}s labelled {} in {}",
                config.policy_label,
                scope_text(scope)
            );
            match kind {
                Kind::Deployment => out.extend(
                    scoped::<Deployment>(client, scope)
                        .list(&labelled)
                        .await
                        .map_err(err(what))?
                        .iter()
                        .map(Workload::from_deployment),
                ),
                Kind::StatefulSet => out.extend(
                    scoped::<StatefulSet>(client, scope)
                        .list(&labelled)
                        .await
                        .map_err(err(what))?
                        .iter()
                        .map(Workload::from_stateful_set),
                ),
                Kind::DaemonSet => out.extend(
                    scoped::<DaemonSet>(client, scope)
                        .list(&labelled)
                        .await
                        .map_err(err(what))?
                        .iter()
                        .map(Workload::from_daemon_set),
                ),
            }
        }
    }
    let targets = config.policies.values().flat_map(|p| p.targets.iter());
    let fetched: Vec<Result<Option<Workload>, EngineError>> = futures::stream::iter(targets)
        .then(|t| async move {
            let what = format!("target {t}");
            let ns = &t.namespace;
            let got = match t.kind {
                Kind::Deployment => Api::<Deployment>::namespaced(client.clone(), ns)
                    .get_opt(&t.name)
                    .await
                    .map(|o| o.as_ref().map(Workload::from_deployment)),
                Kind::StatefulSet => Api::<StatefulSet>::namespaced(client.clone(), ns)
                    .get_opt(&t.name)
                    .await
                    .map(|o| o.as_ref().map(Workload::from_stateful_set)),
                Kind::DaemonSet => Api::<DaemonSet>::namespaced(client.clone(), ns)
                    .get_opt(&t.name)
                    .await
                    .map(|o| o.as_ref().map(Workload::from_daemon_set)),
            };
            got.map_err(err(what))
        })
        .collect()
        .await;
    for target in fetched {
        out.extend(target?);
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    out.dedup_by(|a, b| a.key == b.key);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ContainerStatus, PodSpec, PodStatus};

    #[test]
    fn digests_come_from_image_ids() {
        let digest = format!("sha256:{}", "a".repeat(64));
        let status = |name: &str, id: &str| ContainerStatus {
            name: name.into(),
            image_id: id.into(),
            ..Default::default()
        };
        let pod = Pod {
            metadata: kube::api::ObjectMeta {
                name: Some("p".into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some("n1".into()),
                ..Default::default()
            }),
            status: Some(PodStatus {
                container_statuses: Some(vec![
                    status("app", &format!("docker.io/library/nginx@{digest}")),
                    status("side", &format!("sha256:{}", "b".repeat(64))),
                ]),
                ..Default::default()
            }),
        };
        let running = running_from_status(&pod);
        assert_eq!(running.len(), 2);
        assert_eq!(running[0].node, "n1");
        assert_eq!(running[0].digest, Some(Digest::parse(&digest).unwrap()));
        assert_eq!(
            running[1].digest, None,
            "a config id is not a manifest digest"
        );
    }
}
