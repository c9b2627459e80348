//! kube-runtime reflectors on the selected workloads only: one per kind on the policy
//! label (in all namespaces, or in each of the configured `namespaces`), one per
//! explicit target (its namespace, by name). No Pod watch: pods come from the agents.
//! A watch the API server forbids is an error in the log and in `/readyz` (see
//! [`super::watch_health`]).

use std::fmt::Debug;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::task::JoinSet;

use super::nodes::NodeTable;
use super::watch_health::WatchHealth;
use crate::config::{Config, Mode, WarmTargets};
use crate::workload::{Kind, Workload};

/// The reflector stores of one kind.
struct KindStores<K: Resource<DynamicType = ()> + Clone + 'static> {
    stores: Vec<Store<K>>,
}

impl<K> KindStores<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    fn new() -> Self {
        KindStores { stores: Vec::new() }
    }

    fn reflect(
        &mut self,
        api: Api<K>,
        config: watcher::Config,
        what: String,
        health: &WatchHealth,
        tasks: &mut JoinSet<String>,
    ) {
        let (reader, writer) = reflector::store();
        let stream = reflector::reflector(writer, watcher(api, config).default_backoff());
        let health = health.clone();
        tasks.spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(event) = stream.next().await {
                health.observe(
                    &what,
                    &event,
                    "rbac.scope namespaced watches only the namespaces in rbac.namespaces",
                );
            }
            what
        });
        self.stores.push(reader);
    }

    async fn ready(&self) {
        for store in &self.stores {
            // Fails only when the writer is gone (the watch task ended).
            let _ = store.wait_until_ready().await;
        }
    }

    fn workloads(&self, convert: fn(&K) -> Workload, out: &mut Vec<Workload>) {
        for store in &self.stores {
            out.extend(store.state().iter().map(|k| convert(k)));
        }
    }
}

/// Where labelled workloads are listed and watched: `None` for all namespaces (one
/// cluster-wide call per kind, a ClusterRole's grant), else each configured namespace
/// (Roles).
pub(crate) fn scopes(config: &Config) -> Vec<Option<&str>> {
    if config.namespaces.is_empty() {
        vec![None]
    } else {
        config.namespaces.iter().map(|n| Some(n.as_str())).collect()
    }
}

/// `all namespaces` or `namespace <name>`, for messages.
pub(crate) fn scope_text(scope: Option<&str>) -> String {
    scope.map_or("all namespaces".to_owned(), |n| format!("namespace {n}"))
}

/// An API for `K` in one namespace, or in all.
pub(crate) fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
{
    match namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    }
}

/// Every reflector the configuration asks for; dropping it stops them.
pub(crate) struct Watches {
    deployments: KindStores<Deployment>,
    stateful_sets: KindStores<StatefulSet>,
    daemon_sets: KindStores<DaemonSet>,
    /// Only when a policy warms schedulable nodes.
    nodes: Option<NodeTable>,
    /// Each watch task returns what it watched if it ever ends.
    tasks: JoinSet<String>,
}

impl Watches {
    pub(crate) fn start(client: &Client, config: &Config, health: &WatchHealth) -> Watches {
        let mut tasks = JoinSet::new();
        let mut deployments = KindStores::new();
        let mut stateful_sets = KindStores::new();
        let mut daemon_sets = KindStores::new();
        let kinds: std::collections::BTreeSet<Kind> = config
            .policies
            .values()
            .flat_map(|p| p.kinds.iter().copied())
            .collect();
        let labelled = || watcher::Config::default().labels(&config.policy_label);
        for kind in &kinds {
            for scope in &scopes(config) {
                let what = format!(
                    "{kind} labelled {} in {}",
                    config.policy_label,
                    scope_text(*scope)
                );
                match kind {
                    Kind::Deployment => deployments.reflect(
                        scoped(client, *scope),
                        labelled(),
                        what,
                        health,
                        &mut tasks,
                    ),
                    Kind::StatefulSet => stateful_sets.reflect(
                        scoped(client, *scope),
                        labelled(),
                        what,
                        health,
                        &mut tasks,
                    ),
                    Kind::DaemonSet => daemon_sets.reflect(
                        scoped(client, *scope),
                        labelled(),
                        what,
                        health,
                        &mut tasks,
                    ),
                }
            }
        }
        for target in config.policies.values().flat_map(|p| &p.targets) {
            let by_name =
                watcher::Config::default().fields(&format!("metadata.name={}", target.name));
            let what = format!("target {target}");
            let ns = &target.namespace;
            match target.kind {
                Kind::Deployment => deployments.reflect(
                    Api::namespaced(client.clone(), ns),
                    by_name,
                    what,
                    health,
                    &mut tasks,
                ),
                Kind::StatefulSet => stateful_sets.reflect(
                    Api::namespaced(client.clone(), ns),
                    by_name,
                    what,
                    health,
                    &mut tasks,
                ),
                Kind::DaemonSet => daemon_sets.reflect(
                    Api::namespaced(client.clone(), ns),
                    by_name,
                    what,
                    health,
                    &mut tasks,
                ),
            }
        }
        let schedulable = config.policies.values().any(|p| {
            p.mode == Mode::Rollout && p.warm.enabled && p.warm.targets == WarmTargets::Schedulable
        });
        let nodes = schedulable.then(|| NodeTable::start(client, health, &mut tasks));
        Watches {
            deployments,
            stateful_sets,
            daemon_sets,
            nodes,
            tasks,
        }
    }

    /// Why a watch task ended, if one did (they run until the engine drops them).
    pub(crate) fn ended(&mut self) -> Option<String> {
        match self.tasks.try_join_next()? {
            Ok(what) => Some(format!("the watch of {what} ended")),
            Err(e) if e.is_panic() => Some("a watch task panicked".to_owned()),
            Err(_) => Some("a watch task was cancelled".to_owned()),
        }
    }

    /// Waits until every reflector has its first complete list.
    pub(crate) async fn ready(&self) {
        self.deployments.ready().await;
        self.stateful_sets.ready().await;
        self.daemon_sets.ready().await;
        if let Some(nodes) = &self.nodes {
            nodes.ready().await;
        }
    }

    /// The node table, when a policy warms schedulable nodes.
    pub(crate) fn nodes(&self) -> Option<&NodeTable> {
        self.nodes.as_ref()
    }

    /// Every watched workload (a labelled target appears once).
    pub(crate) fn workloads(&self) -> Vec<Workload> {
        let mut out = Vec::new();
        self.deployments
            .workloads(Workload::from_deployment, &mut out);
        self.stateful_sets
            .workloads(Workload::from_stateful_set, &mut out);
        self.daemon_sets
            .workloads(Workload::from_daemon_set, &mut out);
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out.dedup_by(|a, b| a.key == b.key);
        out
    }
}
