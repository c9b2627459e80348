//! The sandbox cluster: a [`KubeApi`] plus N nodes, each a real test-bed containerd with
//! a Node object, and the part of Kubernetes warmroll relies on, running in-process
//! against the API as the real components do:
//!
//! - a **kubelet** per node (user `system:node:<node>`) realises the pods bound to its
//!   node through CRI — `imagePullPolicy: Always` pulls the tag (the registry is asked,
//!   layers the node has are not fetched again), `IfNotPresent` uses the node's image —
//!   and writes pod status: phase, Ready, `containerStatuses[].imageID` (the repo digest
//!   the runtime reports), waiting reasons `ContainerCreating`, `ErrImagePull`,
//!   `ImagePullBackOff`. Pull credentials come from the pod's `imagePullSecrets`.
//!   Deleted pods are stopped and their sandboxes removed.
//! - the **controllers** (user [`CONTROLLER_USER`]) roll Deployments (RollingUpdate with
//!   maxSurge/maxUnavailable, Recreate), StatefulSets (OrderedReady, highest ordinal
//!   first, one at a time) and DaemonSets (per node: delete the old pod, then create the
//!   new) when the pod template's hash changes, and keep their `status` as the real
//!   controllers do, so [`deployment_rollout`] & co. read it as `kubectl rollout status`.
//!   The scheduler's choice (spread by workload, then by load) is made at creation.
//!   Pods of deleted workloads are garbage-collected.
//!
//! There are no ReplicaSets or ControllerRevisions: a pod carries its template revision
//! in `pod-template-hash` (Deployments) or `controller-revision-hash` (StatefulSets,
//! DaemonSets). Pods are deleted gracefully: a deleted pod stays, terminating, until its
//! kubelet has removed its sandbox and deletes it for good; Recreate Deployments,
//! StatefulSet ordinals and DaemonSet nodes wait for it to be gone.
//!
//! Not modelled: readiness probes (a pod is Ready once its containers started),
//! container restarts, serialized image pulls, kubelet Events, StatefulSet partitions,
//! DaemonSet maxSurge, Deployment minReadySeconds/progress deadlines/pause.
//!
//! Everything the cluster does is timed for the benchmark ([`Cluster::pods`],
//! [`Cluster::ready_on`], [`Cluster::not_ready_gaps`]), and its own API writes can be
//! told apart from warmroll's ([`Cluster::foreign_writes`]).
//!
//! Dropping the cluster aborts the loops (and with them the pod workers), then each
//! node's containerd guard removes every sandbox and stops containerd.

mod controllers;
mod kubelet;
mod plan;
mod rollout;
mod timeline;

use std::fmt::Debug;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use futures::StreamExt;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{
    Node, NodeAddress, NodeCondition, NodeStatus, NodeSystemInfo, Pod,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::PostParams;
use kube::runtime::{WatchStreamExt, watcher};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::containerd::Containerd;
use crate::kubeapi::{KubeApi, KubeApiOptions, RecordedRequest};
use crate::registry::Registry;

pub use kubelet::NODE_IP;
pub use rollout::{RolloutStatus, daemonset_rollout, deployment_rollout, statefulset_rollout};
pub use timeline::{GapParts, NotReadyGap, Owner, PodRecord, ReadyOn};

use timeline::Timeline;

/// The label carrying a Deployment pod's template revision.
pub const LABEL_POD_TEMPLATE_HASH: &str = "pod-template-hash";
/// The label carrying a StatefulSet or DaemonSet pod's template revision.
pub const LABEL_CONTROLLER_REVISION: &str = "controller-revision-hash";
/// The user the controllers write as.
pub const CONTROLLER_USER: &str = "system:kube-controller-manager";
/// Kubelets write as `system:node:<node name>`.
pub const NODE_USER_PREFIX: &str = "system:node:";

/// How to run a [`Cluster`].
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Nodes `node-1` … `node-<n>` (at least one).
    pub nodes: usize,
    /// How often every loop syncs without a change to wake it.
    pub resync: Duration,
    /// First wait after a failed pull (kubelet: 10 s), doubling up to `max_pull_backoff`.
    pub pull_backoff: Duration,
    pub max_pull_backoff: Duration,
    /// The API stand-in's options (`graceful_pod_deletion` is always on).
    pub api: KubeApiOptions,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            nodes: 1,
            resync: Duration::from_secs(1),
            pull_backoff: Duration::from_millis(500),
            max_pull_backoff: Duration::from_secs(5),
            api: KubeApiOptions::default(),
        }
    }
}

impl ClusterOptions {
    /// Default options with `nodes` nodes.
    pub fn nodes(nodes: usize) -> Self {
        Self {
            nodes,
            ..Self::default()
        }
    }
}

/// One node: its name and its containerd (attach an agent to [`Self::socket`]).
pub struct ClusterNode {
    name: String,
    containerd: Containerd,
}

impl ClusterNode {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The node's CRI socket.
    pub fn socket(&self) -> &Path {
        self.containerd.socket()
    }

    pub fn containerd(&self) -> &Containerd {
        &self.containerd
    }
}

/// A running sandbox cluster. See the module docs.
pub struct Cluster {
    /// Aborted first on drop.
    tasks: Vec<JoinHandle<()>>,
    nodes: Vec<ClusterNode>,
    timeline: Arc<Mutex<Timeline>>,
    api: KubeApi,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Cluster {
    /// Starts the API stand-in and `options.nodes` containerds trusting `registry`
    /// (plain or TLS, without auth: containerd pulls the sandbox image from it
    /// anonymously), registers a Node for each, and starts the kubelets and controllers.
    #[tracing::instrument(skip_all, fields(nodes = options.nodes, registry = registry.host()))]
    pub async fn start(options: ClusterOptions, registry: &Registry) -> Result<Self> {
        if options.nodes == 0 {
            bail!("a sandbox cluster needs at least one node");
        }
        // The cluster's kubelets finish pod deletions, as in a real cluster.
        let api = KubeApi::start_with(KubeApiOptions {
            graceful_pod_deletion: true,
            ..options.api.clone()
        })
        .await
        .context("starting the API stand-in")?;
        let first = Containerd::start_with_registry(registry).await?;
        let sandbox = first.sandbox_image().to_string();
        let others = futures::future::try_join_all((1..options.nodes).map(|_| async {
            let containerd = Containerd::start(&sandbox).await?;
            containerd.trust_registry(registry)?;
            Ok::<_, anyhow::Error>(containerd)
        }))
        .await?;
        let mut cluster = Self {
            tasks: Vec::new(),
            nodes: std::iter::once(first)
                .chain(others)
                .enumerate()
                .map(|(i, containerd)| ClusterNode {
                    name: format!("node-{}", i + 1),
                    containerd,
                })
                .collect(),
            timeline: Arc::new(Mutex::new(Timeline::default())),
            api,
        };
        // On error from here on, `cluster` is dropped: loops aborted, nodes cleaned up.
        for i in 0..cluster.nodes.len() {
            cluster.start_kubelet(i, &options).await?;
        }
        cluster.start_controllers(&options)?;
        Ok(cluster)
    }

    async fn start_kubelet(&mut self, index: usize, options: &ClusterOptions) -> Result<()> {
        let node = self
            .nodes
            .get(index)
            .ok_or_else(|| anyhow!("no node {index}"))?;
        let name = node.name.clone();
        let client = self
            .api
            .client_as(&format!("{NODE_USER_PREFIX}{name}"), &["system:nodes"])?;
        let version = node.containerd.version().await?;
        Api::<Node>::all(client.clone())
            .create(
                &PostParams::default(),
                &node_object(&name, &version.runtime_version),
            )
            .await
            .with_context(|| format!("registering node {name}"))?;
        let wake = Arc::new(Notify::new());
        self.tasks.push(wake_on(
            Api::<Pod>::all(client.clone()),
            watcher::Config::default().fields(&format!("spec.nodeName={name}")),
            wake.clone(),
        ));
        let kubelet = Arc::new(kubelet::Kubelet {
            node: name,
            client,
            runtime: node.containerd.pod_runtime(),
            timeline: self.timeline.clone(),
            resync: options.resync,
            pull_backoff: options.pull_backoff,
            max_pull_backoff: options.max_pull_backoff,
        });
        self.tasks.push(tokio::spawn(kubelet::run(kubelet, wake)));
        Ok(())
    }

    fn start_controllers(&mut self, options: &ClusterOptions) -> Result<()> {
        let client = self.api.client_as(CONTROLLER_USER, &[])?;
        let wake = Arc::new(Notify::new());
        let config = watcher::Config::default;
        self.tasks.extend([
            wake_on(
                Api::<Deployment>::all(client.clone()),
                config(),
                wake.clone(),
            ),
            wake_on(
                Api::<StatefulSet>::all(client.clone()),
                config(),
                wake.clone(),
            ),
            wake_on(
                Api::<DaemonSet>::all(client.clone()),
                config(),
                wake.clone(),
            ),
            wake_on(Api::<Pod>::all(client.clone()), config(), wake.clone()),
        ]);
        let controllers = Arc::new(controllers::Controllers {
            client,
            timeline: self.timeline.clone(),
            resync: options.resync,
        });
        self.tasks
            .push(tokio::spawn(controllers::run(controllers, wake)));
        Ok(())
    }

    /// The API stand-in (kubeconfig, requests, direct store access).
    pub fn api(&self) -> &KubeApi {
        &self.api
    }

    /// An admin client of the API.
    pub fn client(&self) -> kube::Client {
        self.api.client()
    }

    pub fn nodes(&self) -> &[ClusterNode] {
        &self.nodes
    }

    pub fn node(&self, name: &str) -> Option<&ClusterNode> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Lets every node pull from `registry` (another registry than the one the cluster
    /// started with: an authenticated one, or one behind a throttling proxy).
    pub fn trust_registry(&self, registry: &Registry) -> Result<()> {
        for node in &self.nodes {
            node.containerd
                .trust_registry(registry)
                .with_context(|| format!("trusting {} on {}", registry.host(), node.name))?;
        }
        Ok(())
    }

    /// The API writes not made by the cluster's own kubelets and controllers (warmroll's,
    /// the test's).
    pub fn foreign_writes(&self) -> Vec<RecordedRequest> {
        self.api
            .writes()
            .into_iter()
            .filter(|r| !r.user.as_deref().is_some_and(is_cluster_user))
            .collect()
    }

    /// Every pod the cluster has seen, with its timings.
    pub fn pods(&self) -> Vec<PodRecord> {
        self.timeline
            .lock()
            .map(|t| t.records())
            .unwrap_or_default()
    }

    /// The pods that became ready running `digest` (`sha256:…`), earliest first.
    pub fn ready_on(&self, digest: &str) -> Vec<ReadyOn> {
        timeline::ready_on(&self.pods(), digest)
    }

    /// Per slot of the workload `kind`/`name` (a node for a DaemonSet, an ordinal for a
    /// StatefulSet, a replica for a Deployment), how long it went without a ready pod
    /// for the pods deleted at or after `since`.
    pub fn not_ready_gaps(
        &self,
        namespace: &str,
        kind: &str,
        name: &str,
        since: Instant,
    ) -> Vec<NotReadyGap> {
        let owner = Owner {
            kind: kind.to_string(),
            name: name.to_string(),
        };
        timeline::not_ready_gaps(&self.pods(), namespace, &owner, since)
    }

    /// Waits until `kubectl rollout status` would report the workload rolled out (read
    /// from the store directly, so it adds no API requests); returns the workload.
    pub async fn wait_rolled_out<K>(
        &self,
        namespace: &str,
        name: &str,
        timeout: Duration,
    ) -> Result<K>
    where
        K: RolloutStatusOf,
    {
        let deadline = Instant::now() + timeout;
        loop {
            let status = match self.api.get::<K>(namespace, name)? {
                Some(workload) => {
                    let status = workload.rollout_status();
                    if status.done {
                        return Ok(workload);
                    }
                    status.message
                }
                None => "not found".to_string(),
            };
            if Instant::now() > deadline {
                bail!(
                    "{} {namespace}/{name} not rolled out within {timeout:?}: {status}",
                    K::KIND
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The workload kinds [`Cluster::wait_rolled_out`] reads.
pub trait RolloutStatusOf:
    k8s_openapi::Resource<Scope = NamespaceResourceScope> + DeserializeOwned
{
    fn rollout_status(&self) -> RolloutStatus;
}

impl RolloutStatusOf for Deployment {
    fn rollout_status(&self) -> RolloutStatus {
        deployment_rollout(self)
    }
}

impl RolloutStatusOf for StatefulSet {
    fn rollout_status(&self) -> RolloutStatus {
        statefulset_rollout(self)
    }
}

impl RolloutStatusOf for DaemonSet {
    fn rollout_status(&self) -> RolloutStatus {
        daemonset_rollout(self)
    }
}

/// Whether an API user is one of the cluster's own components.
pub fn is_cluster_user(user: &str) -> bool {
    user == CONTROLLER_USER || user.starts_with(NODE_USER_PREFIX)
}

/// Wakes `wake` on every event of a watch (re-listing and backing off as needed).
fn wake_on<K>(api: Api<K>, config: watcher::Config, wake: Arc<Notify>) -> JoinHandle<()>
where
    K: kube::Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    tokio::spawn(async move {
        let mut events = watcher(api, config).default_backoff().boxed();
        while let Some(event) = events.next().await {
            if event.is_ok() {
                wake.notify_one();
            }
        }
    })
}

/// The Node a kubelet registers: Ready, schedulable, reachable on loopback.
fn node_object(name: &str, runtime_version: &str) -> Node {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    Node {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            labels: Some(
                [
                    ("kubernetes.io/hostname", name),
                    ("kubernetes.io/os", "linux"),
                    ("kubernetes.io/arch", arch),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ),
            ..Default::default()
        },
        spec: None,
        status: Some(NodeStatus {
            conditions: Some(vec![NodeCondition {
                type_: "Ready".into(),
                status: "True".into(),
                reason: Some("KubeletReady".into()),
                message: Some("kubelet is posting ready status".into()),
                ..Default::default()
            }]),
            addresses: Some(vec![
                NodeAddress {
                    type_: "InternalIP".into(),
                    address: NODE_IP.into(),
                },
                NodeAddress {
                    type_: "Hostname".into(),
                    address: name.into(),
                },
            ]),
            node_info: Some(NodeSystemInfo {
                architecture: arch.into(),
                operating_system: "linux".into(),
                container_runtime_version: format!("containerd://{runtime_version}"),
                kubelet_version: "v1.33.0-warmroll-sandbox".into(),
                os_image: "warmroll sandbox".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

/// The workload owning a pod (its controller owner reference).
fn owner_of(meta: &ObjectMeta) -> Option<Owner> {
    meta.owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
        .map(|o| Owner {
            kind: o.kind.clone(),
            name: o.name.clone(),
        })
}

/// A pod's template revision label.
fn revision_of(meta: &ObjectMeta) -> Option<String> {
    let labels = meta.labels.as_ref()?;
    labels
        .get(LABEL_POD_TEMPLATE_HASH)
        .or_else(|| labels.get(LABEL_CONTROLLER_REVISION))
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_users_are_told_apart() {
        assert!(is_cluster_user(CONTROLLER_USER));
        assert!(is_cluster_user("system:node:node-1"));
        assert!(!is_cluster_user("warmroll-testbed-admin"));
        assert!(!is_cluster_user(
            "system:serviceaccount:warmroll:coordinator"
        ));
    }

    #[test]
    fn node_object_is_ready_with_runtime_info() {
        let node = node_object("node-1", "1.6.20");
        let status = node.status.unwrap();
        assert_eq!(status.conditions.unwrap()[0].status, "True");
        assert_eq!(
            status.node_info.unwrap().container_runtime_version,
            "containerd://1.6.20"
        );
    }
}
