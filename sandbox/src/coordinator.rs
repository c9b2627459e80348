//! The coordinator, in-process: the same parts `warmroll-coordinator run` starts (the
//! agents' fleet server over TLS with TokenReview authentication, the policy engine and
//! its `/report` route), without leader election (a single replica, always the leader)
//! and with its own API identity, so its writes can be told apart.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::warn;
use warmroll_coordinator::config::Config;
use warmroll_coordinator::fleet::auth::service_account_user;
use warmroll_coordinator::fleet::{
    FleetService, FleetView, SessionConfig, TlsFiles, TokenReviewAuthenticator,
};
use warmroll_coordinator::report::Report;
use warmroll_coordinator::run::Context as EngineContext;
use warmroll_proto::fleet::NodeName;
use warmroll_tests::kubeapi::KubeApi;
use warmroll_tests::scratch;
use warmroll_tests::tls::TestCa;

/// The namespace of warmroll's ServiceAccounts.
pub const NAMESPACE: &str = "warmroll";
/// The agents' ServiceAccount (in [`NAMESPACE`]).
pub const AGENT_SERVICE_ACCOUNT: &str = "warmroll-agent";
/// The API user the coordinator acts as.
pub const COORDINATOR_USER: &str = "system:serviceaccount:warmroll:warmroll-coordinator";
/// The audience of the agents' tokens.
pub const TOKEN_AUDIENCE: &str = "warmroll";

/// A running in-process coordinator; dropping it stops every part.
pub struct Coordinator {
    grpc_url: String,
    http_addr: SocketAddr,
    fleet: FleetView,
    http: reqwest::Client,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Coordinator {
    /// Starts the coordinator against `api` with the policy configuration `config_yaml`,
    /// serving the fleet API with a certificate from `ca`.
    pub async fn start(api: &KubeApi, ca: &TestCa, config_yaml: &str) -> Result<Self> {
        let config = Config::parse(config_yaml, "the sandbox configuration")
            .context("the sandbox's coordinator configuration")?;
        let dir = scratch::temp_dir("coordinator")?;
        let cert = ca.issue(&["localhost", "127.0.0.1"])?;
        let tls = TlsFiles {
            cert: dir.path().join("tls.crt"),
            key: dir.path().join("tls.key"),
        };
        std::fs::write(&tls.cert, &cert.cert_pem).context("writing the coordinator's cert")?;
        std::fs::write(&tls.key, &cert.key_pem).context("writing the coordinator's key")?;

        let client = api.client_as(COORDINATOR_USER, &["system:serviceaccounts"])?;
        let fleet = FleetView::new(Duration::from_secs(120));
        let (shutdown, stop) = watch::channel(false);
        // A single replica: it leads from the start (no Lease).
        let (_leader_tx, leader) = watch::channel(true);
        let auth = TokenReviewAuthenticator::new(
            client.clone(),
            TOKEN_AUDIENCE,
            &service_account_user(NAMESPACE, AGENT_SERVICE_ACCOUNT),
            Duration::from_secs(600),
        );
        let sessions = SessionConfig {
            inventory_interval: Duration::from_secs(1),
            ..SessionConfig::default()
        };
        let service = FleetService::new(fleet.clone(), auth, sessions);
        let grpc_listener = listener()?;
        let grpc_url = format!("https://{}", grpc_listener.local_addr()?);
        let http_listener = listener()?;
        let http_addr = http_listener.local_addr()?;

        let mut tasks = Vec::new();
        let mut wait = stop.clone();
        tasks.push(tokio::spawn(async move {
            let result = warmroll_coordinator::fleet::serve(
                grpc_listener,
                Some(&tls),
                service,
                async move {
                    let _ = wait.wait_for(|s| *s).await;
                },
            )
            .await;
            if let Err(e) = result {
                warn!(error = %e, "the sandbox's fleet server stopped");
            }
        }));

        let mut metrics = prometheus_client::registry::Registry::default();
        let engine = warmroll_coordinator::engine::spawn(
            EngineContext {
                client,
                fleet: fleet.clone(),
                leader,
                shutdown: stop.clone(),
            },
            config,
            &mut metrics,
        )
        .context("starting the policy engine")?;
        tasks.push(tokio::spawn(async move {
            match engine.task.await {
                Ok(Ok(())) => {}
                Ok(Err(why)) => warn!(error = %why, "the policy engine stopped"),
                Err(e) => warn!(error = %e, "the policy engine failed"),
            }
        }));
        let mut wait = stop;
        tasks.push(tokio::spawn(async move {
            let result = axum::serve(http_listener, engine.router)
                .with_graceful_shutdown(async move {
                    let _ = wait.wait_for(|s| *s).await;
                })
                .await;
            if let Err(e) = result {
                warn!(error = %e, "the sandbox's report server stopped");
            }
        }));
        Ok(Coordinator {
            grpc_url,
            http_addr,
            fleet,
            http: reqwest::Client::new(),
            shutdown,
            tasks,
            _dir: dir,
        })
    }

    /// The fleet API the agents connect to (`https://127.0.0.1:<port>`).
    pub fn grpc_url(&self) -> &str {
        &self.grpc_url
    }

    /// The HTTP address serving `/report`.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// How many agents are connected and sent their inventory.
    pub fn ready_agents(&self) -> usize {
        self.fleet.ready_nodes()
    }

    /// The warm orders sent to `nodes` that the fleet view still holds (it keeps the
    /// most recent finished ones per node).
    pub fn warm_orders<'a>(&self, nodes: impl IntoIterator<Item = &'a str>) -> usize {
        nodes
            .into_iter()
            .filter_map(|n| NodeName::parse(n).ok())
            .filter_map(|n| self.fleet.node(&n))
            .map(|n| n.warms.len())
            .sum()
    }

    /// The drift report (`GET /report`); `None` before the first cycle finished.
    pub async fn report(&self) -> Result<Option<Report>> {
        let url = format!("http://{}/report", self.http_addr);
        let response = self
            .http
            .get(&url)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        if response.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE {
            return Ok(None);
        }
        if !response.status().is_success() {
            bail!("GET {url}: {}", response.status());
        }
        let body = response
            .text()
            .await
            .with_context(|| format!("GET {url}"))?;
        let report = serde_json::from_str(&body).with_context(|| format!("decoding {url}"))?;
        Ok(Some(report))
    }

    /// Stops every part, waiting up to 10 s for them to finish.
    pub async fn stop(mut self) {
        self.shutdown.send_replace(true);
        for task in std::mem::take(&mut self.tasks) {
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn listener() -> Result<tokio::net::TcpListener> {
    let listener = scratch::bind_loopback()?;
    listener.set_nonblocking(true)?;
    Ok(tokio::net::TcpListener::from_std(listener)?)
}
