//! The control plane, for warmroll's purposes: the Deployment, StatefulSet and DaemonSet
//! controllers and the scheduler. Each sync lists nodes, pods and workloads through the
//! API (consistent reads, so no expectations bookkeeping), applies the decisions of
//! [`super::plan`] with pod creates and deletes, and writes each workload's status when
//! it changed. Pods are bound at creation (`spec.nodeName`), which is where the
//! scheduler's choice goes.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::{
    DaemonSet, DaemonSetStatus, Deployment, DeploymentCondition, DeploymentStatus, StatefulSet,
    StatefulSetStatus,
};
use k8s_openapi::api::core::v1::{Node, Pod, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::Notify;

use super::plan::{
    Action, DeploymentStrategy, Member, after, pick_node, plan_daemonset, plan_deployment,
    plan_statefulset, scaled,
};
use super::timeline::{Seen, Timeline};
use super::{LABEL_CONTROLLER_REVISION, LABEL_POD_TEMPLATE_HASH, owner_of, revision_of};

pub struct Controllers {
    pub client: kube::Client,
    pub timeline: Arc<Mutex<Timeline>>,
    pub resync: Duration,
}

/// Syncs everything on every wake-up (any change to a workload or pod) or resync.
pub async fn run(controllers: Arc<Controllers>, wake: Arc<Notify>) {
    loop {
        if let Err(e) = sync(&controllers).await {
            tracing::warn!("controllers sync: {e:#}");
        }
        tokio::select! {
            () = wake.notified() => {}
            () = tokio::time::sleep(controllers.resync) => {}
        }
    }
}

/// What a sync knows about the cluster.
struct World {
    /// Schedulable nodes, by name.
    nodes: Vec<String>,
    pods: Vec<Pod>,
    /// Pods per node (all workloads), kept up to date as pods are created.
    load: BTreeMap<String, usize>,
}

/// Every object of one kind, in all namespaces.
async fn list_all<K>(
    c: &Controllers,
    params: &ListParams,
    what: &str,
) -> Result<kube::core::ObjectList<K>>
where
    K: kube::Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    Api::<K>::all(c.client.clone())
        .list(params)
        .await
        .with_context(|| format!("listing {what}"))
}

#[tracing::instrument(skip_all)]
async fn sync(c: &Controllers) -> Result<()> {
    let all = ListParams::default();
    // One consistent read of each kind, all at once.
    let (nodes, pods, deployments, sets, daemons) = tokio::try_join!(
        list_all::<Node>(c, &all, "nodes"),
        list_all::<Pod>(c, &all, "pods"),
        list_all::<Deployment>(c, &all, "deployments"),
        list_all::<StatefulSet>(c, &all, "statefulsets"),
        list_all::<DaemonSet>(c, &all, "daemonsets"),
    )?;
    let mut nodes: Vec<String> = nodes
        .items
        .into_iter()
        .filter(|n| n.spec.as_ref().and_then(|s| s.unschedulable) != Some(true))
        .filter_map(|n| n.metadata.name)
        .collect();
    nodes.sort();
    let pods = pods.items;
    let mut load = BTreeMap::new();
    for pod in &pods {
        if let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) {
            *load.entry(node).or_insert(0) += 1;
        }
    }
    let mut world = World { nodes, pods, load };

    for d in &deployments {
        if let Err(e) = sync_deployment(c, d, &mut world).await {
            tracing::warn!("deployment {}: {e:#}", key(&d.metadata));
        }
    }
    for s in &sets {
        if let Err(e) = sync_statefulset(c, s, &mut world).await {
            tracing::warn!("statefulset {}: {e:#}", key(&s.metadata));
        }
    }
    for d in &daemons {
        if let Err(e) = sync_daemonset(c, d, &mut world).await {
            tracing::warn!("daemonset {}: {e:#}", key(&d.metadata));
        }
    }
    let live: HashSet<&str> = deployments
        .iter()
        .map(|d| &d.metadata)
        .chain(sets.iter().map(|s| &s.metadata))
        .chain(daemons.iter().map(|d| &d.metadata))
        .filter_map(|m| m.uid.as_deref())
        .collect();
    collect_garbage(c, &world.pods, &live).await;
    Ok(())
}

/// The garbage collector's part: pods whose controlling workload is gone are deleted.
async fn collect_garbage(c: &Controllers, pods: &[Pod], live: &HashSet<&str>) {
    for pod in pods {
        let meta = &pod.metadata;
        let orphaned = meta.owner_references.iter().flatten().any(|o| {
            o.controller == Some(true)
                && o.api_version == "apps/v1"
                && ["Deployment", "StatefulSet", "DaemonSet"].contains(&o.kind.as_str())
                && !live.contains(o.uid.as_str())
        });
        if !orphaned || meta.deletion_timestamp.is_some() {
            continue;
        }
        let (Some(namespace), Some(name), Some(uid)) = (&meta.namespace, &meta.name, &meta.uid)
        else {
            continue;
        };
        if let Err(e) = delete_pod(c, namespace, name, uid).await {
            tracing::warn!("garbage collection: {e:#}");
        }
    }
}

fn key(meta: &ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or_default(),
        meta.name.as_deref().unwrap_or_default()
    )
}

/// A workload being synced.
struct Workload<'a> {
    kind: &'static str,
    namespace: &'a str,
    name: &'a str,
    uid: &'a str,
    template: &'a PodTemplateSpec,
    /// The label carrying a pod's revision, and the current revision's value.
    revision_label: &'static str,
    revision: String,
}

impl<'a> Workload<'a> {
    fn new(
        kind: &'static str,
        meta: &'a ObjectMeta,
        template: &'a PodTemplateSpec,
        revision_label: &'static str,
        revision: String,
    ) -> Result<Self> {
        let (Some(namespace), Some(name), Some(uid)) = (&meta.namespace, &meta.name, &meta.uid)
        else {
            return Err(anyhow!("{kind} without namespace, name or uid"));
        };
        Ok(Self {
            kind,
            namespace,
            name,
            uid,
            template,
            revision_label,
            revision,
        })
    }

    /// Its pods, as the plans see them.
    fn members(&self, pods: &[Pod]) -> Vec<Member> {
        pods.iter()
            .filter(|p| p.metadata.namespace.as_deref() == Some(self.namespace))
            .filter(|p| {
                p.metadata
                    .owner_references
                    .iter()
                    .flatten()
                    .any(|o| o.controller == Some(true) && o.uid == self.uid)
            })
            .filter_map(|p| {
                Some(Member {
                    name: p.metadata.name.clone()?,
                    uid: p.metadata.uid.clone()?,
                    node: p.spec.as_ref().and_then(|s| s.node_name.clone()),
                    revision: p
                        .metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(self.revision_label))
                        .cloned()
                        .unwrap_or_default(),
                    ready: is_ready(p),
                    terminating: p.metadata.deletion_timestamp.is_some(),
                })
            })
            .collect()
    }

    /// Creates and deletes pods per `actions`; new pods get `name_for(action)` and the
    /// revision label plus `extra_labels`.
    async fn apply(
        &self,
        c: &Controllers,
        world: &mut World,
        members: &[Member],
        actions: &[Action],
        name_for: impl Fn(Option<i32>) -> PodName,
        extra_labels: impl Fn(Option<i32>) -> Vec<(String, String)>,
    ) -> Result<()> {
        let mut spread: BTreeMap<String, usize> = BTreeMap::new();
        for m in members {
            if let Some(node) = &m.node {
                *spread.entry(node.clone()).or_insert(0) += 1;
            }
        }
        for action in actions {
            match action {
                Action::Delete { name, uid } => delete_pod(c, self.namespace, name, uid).await?,
                Action::Create { node, ordinal } => {
                    let node = match node {
                        Some(node) => node.clone(),
                        None => pick_node(&world.nodes, &spread, &world.load)
                            .cloned()
                            .ok_or_else(|| anyhow!("no schedulable node for a new pod"))?,
                    };
                    self.create_pod(c, &node, name_for(*ordinal), extra_labels(*ordinal))
                        .await?;
                    *spread.entry(node.clone()).or_insert(0) += 1;
                    *world.load.entry(node).or_insert(0) += 1;
                }
            }
        }
        Ok(())
    }

    async fn create_pod(
        &self,
        c: &Controllers,
        node: &str,
        name: PodName,
        extra_labels: Vec<(String, String)>,
    ) -> Result<()> {
        let template_meta = self.template.metadata.clone().unwrap_or_default();
        let mut labels = template_meta.labels.unwrap_or_default();
        labels.insert(self.revision_label.to_string(), self.revision.clone());
        labels.extend(extra_labels);
        let (name, generate_name) = match name {
            PodName::Exact(name) => (Some(name), None),
            PodName::Generate(prefix) => (None, Some(prefix)),
        };
        let mut spec = self.template.spec.clone().unwrap_or_default();
        spec.node_name = Some(node.to_string());
        let pod = Pod {
            metadata: ObjectMeta {
                namespace: Some(self.namespace.to_string()),
                name,
                generate_name,
                labels: Some(labels),
                annotations: template_meta.annotations,
                owner_references: Some(vec![OwnerReference {
                    api_version: "apps/v1".into(),
                    kind: self.kind.into(),
                    name: self.name.to_string(),
                    uid: self.uid.to_string(),
                    controller: Some(true),
                    block_owner_deletion: Some(true),
                }]),
                ..Default::default()
            },
            spec: Some(spec),
            status: None,
        };
        let created = Api::<Pod>::namespaced(c.client.clone(), self.namespace)
            .create(&PostParams::default(), &pod)
            .await
            .with_context(|| format!("creating a pod of {} {}", self.kind, self.name))?;
        if let (Some(name), Some(uid), Ok(mut timeline)) = (
            created.metadata.name.as_deref(),
            created.metadata.uid.as_deref(),
            c.timeline.lock(),
        ) {
            timeline.seen(
                Seen {
                    namespace: self.namespace,
                    name,
                    uid,
                    node,
                    owner: owner_of(&created.metadata),
                    revision: revision_of(&created.metadata),
                },
                Instant::now(),
            );
        }
        Ok(())
    }
}

/// Deletes a pod (only the one with `uid`) and records when.
async fn delete_pod(c: &Controllers, namespace: &str, name: &str, uid: &str) -> Result<()> {
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: Some(uid.to_string()),
            resource_version: None,
        }),
        ..Default::default()
    };
    // Taken before the call: the pod stops counting as available when it is accepted.
    let at = Instant::now();
    match Api::<Pod>::namespaced(c.client.clone(), namespace)
        .delete(name, &params)
        .await
    {
        Ok(_) => {}
        // Already gone, or a newer pod of the same name.
        Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => {
            return Ok(());
        }
        Err(e) => {
            return Err(e).with_context(|| format!("deleting pod {namespace}/{name}"));
        }
    }
    if let Ok(mut timeline) = c.timeline.lock() {
        timeline.deleted(uid, at);
    }
    Ok(())
}

enum PodName {
    Exact(String),
    Generate(String),
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .iter()
        .flat_map(|s| s.conditions.iter().flatten())
        .any(|c| c.type_ == "Ready" && c.status == "True")
}

/// A short, label-safe hash of a pod template (the role of `pod-template-hash`).
pub fn template_hash(template: &PodTemplateSpec) -> String {
    let bytes = serde_json::to_vec(template).unwrap_or_default();
    hex::encode(Sha256::digest(&bytes))
        .chars()
        .take(10)
        .collect()
}

fn count(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// Writes `status` through the status subresource unless it is what is there already.
async fn write_status<K, S>(
    c: &Controllers,
    namespace: &str,
    name: &str,
    old: Option<&S>,
    new: &S,
) -> Result<()>
where
    K: kube::Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Debug,
    S: Serialize + PartialEq,
{
    if old == Some(new) {
        return Ok(());
    }
    Api::<K>::namespaced(c.client.clone(), namespace)
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": new })),
        )
        .await
        .with_context(|| format!("writing the status of {namespace}/{name}"))?;
    Ok(())
}

async fn sync_deployment(c: &Controllers, d: &Deployment, world: &mut World) -> Result<()> {
    let spec = &d.spec;
    let w = Workload::new(
        "Deployment",
        &d.metadata,
        &spec.template,
        LABEL_POD_TEMPLATE_HASH,
        template_hash(&spec.template),
    )?;
    let replicas = spec.replicas.unwrap_or(1).max(0);
    let strategy = spec.strategy.as_ref();
    let rolling = strategy.and_then(|s| s.rolling_update.as_ref());
    let strategy = DeploymentStrategy::resolve(
        strategy.and_then(|s| s.type_.as_deref()),
        rolling.and_then(|r| r.max_surge.as_ref()),
        rolling.and_then(|r| r.max_unavailable.as_ref()),
        replicas,
    );
    let members = w.members(&world.pods);
    let actions = plan_deployment(replicas, strategy, &w.revision, &members);
    let prefix = format!("{}-{}-", w.name, w.revision);
    w.apply(
        c,
        world,
        &members,
        &actions,
        |_| PodName::Generate(prefix.clone()),
        |_| Vec::new(),
    )
    .await?;

    let now = after(&members, &actions, &w.revision);
    let updated = count(now.iter().filter(|m| m.revision == w.revision).count());
    let ready = count(now.iter().filter(|m| m.ready).count());
    let total = count(now.len());
    let max_unavailable = match strategy {
        DeploymentStrategy::Recreate => 0,
        DeploymentStrategy::RollingUpdate {
            max_unavailable, ..
        } => max_unavailable,
    };
    let complete = updated == replicas && total == replicas && ready == replicas;
    let condition = |type_: &str, ok: bool, reason: &str| DeploymentCondition {
        type_: Some(type_.into()),
        status: Some(if ok { "True" } else { "False" }.into()),
        reason: Some(reason.into()),
        ..Default::default()
    };
    let available_ok = ready >= replicas - max_unavailable;
    let status = DeploymentStatus {
        observed_generation: d.metadata.generation,
        replicas: Some(total),
        updated_replicas: Some(updated),
        ready_replicas: Some(ready),
        available_replicas: Some(ready),
        unavailable_replicas: Some((replicas - ready).max(0)),
        conditions: Some(vec![
            condition(
                "Available",
                available_ok,
                if available_ok {
                    "MinimumReplicasAvailable"
                } else {
                    "MinimumReplicasUnavailable"
                },
            ),
            condition(
                "Progressing",
                true,
                if complete {
                    "NewReplicaSetAvailable"
                } else {
                    "ReplicaSetUpdated"
                },
            ),
        ]),
        ..Default::default()
    };
    write_status::<Deployment, _>(c, w.namespace, w.name, d.status.as_ref(), &status).await?;
    Ok(())
}

async fn sync_statefulset(c: &Controllers, s: &StatefulSet, world: &mut World) -> Result<()> {
    let spec = &s.spec;
    let name = s.metadata.name.as_deref().unwrap_or_default();
    let update_revision = format!("{name}-{}", template_hash(&spec.template));
    let w = Workload::new(
        "StatefulSet",
        &s.metadata,
        &spec.template,
        LABEL_CONTROLLER_REVISION,
        update_revision.clone(),
    )?;
    let replicas = spec.replicas.unwrap_or(1).max(0);
    let rolling = spec
        .update_strategy
        .as_ref()
        .and_then(|u| u.type_.as_deref())
        .is_none_or(|t| t == "RollingUpdate");
    let members = w.members(&world.pods);
    let actions = plan_statefulset(w.name, replicas, rolling, &update_revision, &members);
    let set = w.name.to_string();
    w.apply(
        c,
        world,
        &members,
        &actions,
        |ordinal| PodName::Exact(format!("{set}-{}", ordinal.unwrap_or(0))),
        |ordinal| {
            let ordinal = ordinal.unwrap_or(0);
            vec![
                (
                    "statefulset.kubernetes.io/pod-name".to_string(),
                    format!("{set}-{ordinal}"),
                ),
                (
                    "apps.kubernetes.io/pod-index".to_string(),
                    ordinal.to_string(),
                ),
            ]
        },
    )
    .await?;

    let now = after(&members, &actions, &update_revision);
    let old = s.status.clone().unwrap_or_default();
    let total = count(now.len());
    let ready = count(now.iter().filter(|m| m.ready).count());
    let updated = count(now.iter().filter(|m| m.revision == update_revision).count());
    let mut current_revision = old
        .current_revision
        .clone()
        .unwrap_or_else(|| update_revision.clone());
    if updated == replicas && ready == replicas && total == replicas {
        current_revision = update_revision.clone();
    }
    let current = count(
        now.iter()
            .filter(|m| m.revision == current_revision)
            .count(),
    );
    let status = StatefulSetStatus {
        observed_generation: s.metadata.generation,
        replicas: total,
        ready_replicas: Some(ready),
        available_replicas: Some(ready),
        current_replicas: Some(current),
        updated_replicas: Some(updated),
        current_revision: Some(current_revision),
        update_revision: Some(update_revision),
        ..Default::default()
    };
    write_status::<StatefulSet, _>(c, w.namespace, w.name, s.status.as_ref(), &status).await
}

async fn sync_daemonset(c: &Controllers, d: &DaemonSet, world: &mut World) -> Result<()> {
    let spec = &d.spec;
    let w = Workload::new(
        "DaemonSet",
        &d.metadata,
        &spec.template,
        LABEL_CONTROLLER_REVISION,
        template_hash(&spec.template),
    )?;
    let strategy = spec.update_strategy.as_ref();
    let rolling = strategy
        .and_then(|u| u.type_.as_deref())
        .is_none_or(|t| t == "RollingUpdate");
    let desired = count(world.nodes.len());
    let max_unavailable = strategy
        .and_then(|u| u.rolling_update.as_ref())
        .and_then(|r| r.max_unavailable.as_ref())
        .map_or(1, |v| scaled(v, desired, true));
    let members = w.members(&world.pods);
    let nodes = world.nodes.clone();
    let actions = plan_daemonset(&nodes, rolling, max_unavailable, &w.revision, &members);
    let prefix = format!("{}-", w.name);
    let generation = d.metadata.generation.unwrap_or(0).to_string();
    w.apply(
        c,
        world,
        &members,
        &actions,
        |_| PodName::Generate(prefix.clone()),
        |_| vec![("pod-template-generation".to_string(), generation.clone())],
    )
    .await?;

    let now = after(&members, &actions, &w.revision);
    let on_nodes: Vec<&Member> = now
        .iter()
        .filter(|m| m.node.as_ref().is_some_and(|n| nodes.contains(n)))
        .collect();
    let scheduled = count(
        nodes
            .iter()
            .filter(|n| on_nodes.iter().any(|m| m.node.as_ref() == Some(*n)))
            .count(),
    );
    let ready = count(on_nodes.iter().filter(|m| m.ready).count());
    let updated = count(on_nodes.iter().filter(|m| m.revision == w.revision).count());
    let status = DaemonSetStatus {
        observed_generation: d.metadata.generation,
        desired_number_scheduled: desired,
        current_number_scheduled: scheduled,
        number_misscheduled: count(now.len() - on_nodes.len()),
        number_ready: ready,
        number_available: Some(ready),
        number_unavailable: Some((desired - ready).max(0)),
        updated_number_scheduled: Some(updated),
        ..Default::default()
    };
    write_status::<DaemonSet, _>(c, w.namespace, w.name, d.status.as_ref(), &status).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, PodSpec};

    fn template(image: &str) -> PodTemplateSpec {
        PodTemplateSpec {
            metadata: None,
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "app".into(),
                    image: Some(image.into()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
        }
    }

    #[test]
    fn template_hash_is_stable_short_and_changes_with_the_template() {
        let a = template_hash(&template("r/app:1"));
        assert_eq!(a, template_hash(&template("r/app:1")));
        assert_eq!(a.len(), 10);
        assert_ne!(a, template_hash(&template("r/app:2")));
    }
}
