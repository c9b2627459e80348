//! The DaemonSet mode's body once the runtime has answered: one CRI client shared by the
//! inventory loop and the session with the coordinator, plus containerd's own API where
//! the runtime is containerd (instant inventory, pull progress). `warmroll-agent run`
//! and the in-process agents of the sandbox and the integration tests all go through
//! [`run`].

use std::sync::Arc;

use k8s_cri::v1::VersionResponse;
use tokio::sync::mpsc;
use tracing::info;

use crate::containerd::{ContainerdApi, ContentStore, EventSource};
use crate::cri::CriClient;
use crate::inventory::{self, Intervals};
use crate::metrics::{Health, Metrics};
use crate::session::{self, SessionArgs};
use crate::warm::{WarmConfig, Warmer};

/// How one node's agent runs.
#[derive(Debug, Clone)]
pub struct NodeAgent {
    pub session: SessionArgs,
    pub intervals: Intervals,
    pub warm: WarmConfig,
    /// Do not open containerd's own API: CRI polling alone, no pull progress.
    pub cri_only: bool,
}

/// containerd's own API next to its CRI plugin, unless `cri_only` or not containerd.
pub async fn containerd_api(
    client: &CriClient,
    version: &VersionResponse,
    cri_only: bool,
) -> Option<ContainerdApi> {
    if cri_only {
        info!("--cri-only: inventory through CRI polling alone, no pull progress");
        return None;
    }
    ContainerdApi::detect(client.socket(), version).await
}

/// Runs the inventory loop and the session until `shutdown` completes.
pub async fn run(
    client: CriClient,
    version: VersionResponse,
    agent: NodeAgent,
    metrics: Metrics,
    health: Arc<Health>,
    shutdown: impl Future<Output = ()>,
) {
    let api = containerd_api(&client, &version, agent.cri_only)
        .await
        .map(Arc::new);
    let runtime = session::runtime(&version);
    let client = Arc::new(client);
    let (tx, rx) = mpsc::channel(16);
    let inventory = tokio::spawn(inventory::run(
        client.clone(),
        api.clone().map(|a| a as Arc<dyn EventSource>),
        agent.intervals,
        metrics.clone(),
        health,
        tx,
    ));
    let content = api.map(|a| a as Arc<dyn ContentStore>);
    let warmer = Warmer::new(client, content, agent.warm, metrics);
    session::run(agent.session, runtime, warmer, rx, shutdown).await;
    inventory.abort();
}
