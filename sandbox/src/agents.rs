//! One warmroll agent per sandbox node, in-process: what `warmroll-agent run` starts
//! (`warmroll_agent::node::run`: inventory loop with containerd's events, warmer, the
//! session with the coordinator), against the node's own containerd socket. Each agent authenticates with
//! its own token, which the API's TokenReview knows as the agent ServiceAccount bound to
//! that node.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use warmroll_agent::cri;
use warmroll_agent::inventory::Intervals;
use warmroll_agent::metrics::{Health, Metrics};
use warmroll_agent::node::{self, NodeAgent};
use warmroll_agent::session::SessionArgs;
use warmroll_agent::warm::WarmConfig;
use warmroll_coordinator::fleet::auth::service_account_user;
use warmroll_proto::fleet::NodeName;
use warmroll_tests::cluster::Cluster;
use warmroll_tests::scratch;
use warmroll_tests::tls::TestCa;

use crate::coordinator::{AGENT_SERVICE_ACCOUNT, NAMESPACE, TOKEN_AUDIENCE};

/// The running agents; dropping them stops every one.
pub struct Agents {
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Agents {
    /// Starts one agent per node of `cluster`, connecting to `coordinator_url` (whose
    /// certificate `ca` signed).
    pub async fn start(cluster: &Cluster, ca: &TestCa, coordinator_url: &str) -> Result<Self> {
        let dir = scratch::temp_dir("agents")?;
        let ca_file = dir.path().join("ca.crt");
        std::fs::write(&ca_file, ca.cert_pem()).context("writing the agents' CA file")?;
        let (shutdown, stop) = watch::channel(false);
        let mut agents = Agents {
            shutdown,
            tasks: Vec::new(),
            _dir: dir,
        };
        for node in cluster.nodes() {
            let name = node.name();
            let token = cluster.api().issue_service_account_token(
                &service_account_user(NAMESPACE, AGENT_SERVICE_ACCOUNT),
                &[TOKEN_AUDIENCE],
                Some(name),
            );
            let token_file = agents._dir.path().join(format!("{name}.token"));
            std::fs::write(&token_file, &token)
                .with_context(|| format!("writing the token of the agent on {name}"))?;
            let agent = NodeAgent {
                session: SessionArgs {
                    coordinator_url: coordinator_url.to_owned(),
                    ca_file: Some(ca_file.clone()),
                    token_file,
                    node_name: NodeName::parse(name)
                        .map_err(|e| anyhow::anyhow!("node name {name}: {e}"))?,
                },
                intervals: Intervals {
                    poll: Duration::from_secs(1),
                    resync: Duration::from_secs(60),
                },
                warm: WarmConfig {
                    max_concurrent_pulls: 2,
                    // The sandbox shares the machine's disk: no free-space floor.
                    min_free_disk: 0,
                    // As a DaemonSet agent does by default: the image is written back
                    // during the warm-up, not when the old pod's mounts go.
                    flush_after_pull: true,
                },
                cri_only: false,
            };
            let metrics = Metrics::new();
            let health = Arc::new(Health::default());
            let (client, version) =
                cri::connect(Some(node.socket()), metrics.clone(), health.clone())
                    .await
                    .with_context(|| format!("the agent on {name}: connecting to CRI"))?;
            let mut wait = stop.clone();
            agents.tasks.push(tokio::spawn(node::run(
                client,
                version,
                agent,
                metrics,
                health,
                async move {
                    let _ = wait.wait_for(|s| *s).await;
                },
            )));
        }
        Ok(agents)
    }

    /// Ends the sessions and the inventory loops, and waits for them to be gone.
    pub async fn stop(mut self) {
        self.shutdown.send_replace(true);
        for task in std::mem::take(&mut self.tasks) {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for Agents {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
        for task in &self.tasks {
            task.abort();
        }
    }
}
