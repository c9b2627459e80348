//! The cluster's nodes as placement needs them, for `warm.targets: schedulable`: one
//! Node watch (kube-runtime's watcher) kept as [`NodeFacts`] only: labels, the taints
//! that keep pods off, the cordon. A reflector store would hold whole Node objects
//! (status, images, managed fields: tens of KB each); this holds about 1–2 KB a node.
//! Started only when a policy asks for schedulable targets.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, PoisonError, RwLock};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::watch_health::WatchHealth;
use crate::placement::{NodeFacts, Placement};

/// The Node watch, as `/readyz` and the log name it.
const WHAT: &str = "Nodes (cluster-scoped, for warm.targets schedulable)";

/// The node table, filled by its watch task.
#[derive(Clone)]
pub(crate) struct NodeTable {
    nodes: Arc<RwLock<HashMap<String, NodeFacts>>>,
    listed: watch::Receiver<bool>,
}

impl NodeTable {
    pub(crate) fn start(
        client: &Client,
        health: &WatchHealth,
        tasks: &mut JoinSet<String>,
    ) -> NodeTable {
        let nodes = Arc::new(RwLock::new(HashMap::new()));
        let (listed_tx, listed) = watch::channel(false);
        let table = nodes.clone();
        let health = health.clone();
        let stream =
            watcher(Api::<Node>::all(client.clone()), watcher::Config::default()).default_backoff();
        tasks.spawn(async move {
            let mut stream = std::pin::pin!(stream);
            // A (re-)list builds a fresh table, swapped in when complete.
            let mut relist: Option<HashMap<String, NodeFacts>> = None;
            while let Some(event) = stream.next().await {
                health.observe(
                    WHAT,
                    &event,
                    "the chart's ClusterRole grants list and watch on nodes",
                );
                let Ok(event) = event else { continue };
                let write = || table.write().unwrap_or_else(PoisonError::into_inner);
                match event {
                    watcher::Event::Init => relist = Some(HashMap::new()),
                    watcher::Event::InitApply(node) => {
                        if let (Some(list), Some(name)) =
                            (relist.as_mut(), node.metadata.name.clone())
                        {
                            list.insert(name, NodeFacts::from_node(&node));
                        }
                    }
                    watcher::Event::InitDone => {
                        if let Some(list) = relist.take() {
                            *write() = list;
                        }
                        listed_tx.send_replace(true);
                    }
                    watcher::Event::Apply(node) => {
                        if let Some(name) = node.metadata.name.clone() {
                            write().insert(name, NodeFacts::from_node(&node));
                        }
                    }
                    watcher::Event::Delete(node) => {
                        if let Some(name) = &node.metadata.name {
                            write().remove(name);
                        }
                    }
                }
            }
            WHAT.to_owned()
        });
        NodeTable { nodes, listed }
    }

    /// Waits for the first complete list.
    pub(crate) async fn ready(&self) {
        let mut listed = self.listed.clone();
        // Fails only when the watch task ended.
        let _ = listed.wait_for(|l| *l).await;
    }

    /// The nodes a pod of `placement` may be scheduled on, among those `usable` keeps.
    pub(crate) fn admitting(
        &self,
        placement: &Placement,
        usable: impl Fn(&str) -> bool,
    ) -> BTreeSet<String> {
        self.nodes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|(name, facts)| placement.admits(name, facts) && usable(name))
            .map(|(name, _)| name.clone())
            .collect()
    }
}
