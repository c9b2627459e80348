//! `warmroll-coordinator run`: the coordinator's long-running mode.
//!
//! It loads the policy configuration, starts the agents' fleet server (TLS, TokenReview
//! authentication), the policy engine ([`crate::engine`]), the HTTP server (`/healthz`,
//! `/readyz`, `/metrics`, `/fleet`, plus the engine's `/report` and webhook) and Lease
//! leader election. Only the
//! leader serves agents (the others answer them `unavailable`, which agents retry) and
//! only the leader acts. A replica that loses the Lease after holding it shuts down and
//! exits with an error, so Kubernetes restarts it as a follower with a clean state. The
//! same goes for any of its long-lived tasks that ends early ([`crate::supervise`]).
//! SIGTERM or SIGINT end open agent sessions with `unavailable`, release the Lease and
//! exit.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::Args;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::engine::Engine;
use crate::fleet::auth::service_account_user;
use crate::fleet::{
    FleetService, FleetView, SessionConfig, SessionLimits, TlsFiles, TokenReviewAuthenticator,
};
use crate::leader::{self, KubeLeases, LeaseConfig};
use crate::supervise::Supervisor;
use warmroll_proto::units::parse_duration;

/// Successful TokenReviews are cached this long (by token hash), so a fleet reconnecting
/// at once costs one review per agent.
const TOKEN_CACHE_TTL: Duration = Duration::from_secs(60);
/// On shutdown, how long the fleet server, the HTTP server and the Lease release may take.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// The `run` command's flags.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Address of the agents' gRPC fleet API (TLS).
    #[arg(long, env = "WARMROLL_GRPC_LISTEN", default_value = "0.0.0.0:8443")]
    pub grpc_listen: SocketAddr,
    /// Address of the HTTP server (/healthz, /readyz, /metrics, /fleet, /report, the
    /// registry webhook).
    #[arg(long, env = "WARMROLL_HTTP_LISTEN", default_value = "0.0.0.0:8080")]
    pub http_listen: SocketAddr,
    /// The fleet API's TLS certificate chain (PEM).
    #[arg(long, env = "WARMROLL_TLS_CERT")]
    pub tls_cert: PathBuf,
    /// The fleet API's TLS private key (PEM).
    #[arg(long, env = "WARMROLL_TLS_KEY")]
    pub tls_key: PathBuf,
    /// The audience the agents' projected tokens must carry.
    #[arg(long, env = "WARMROLL_TOKEN_AUDIENCE", default_value = "warmroll")]
    pub token_audience: String,
    /// The agents' ServiceAccount, `namespace:name`; tokens of any other account are
    /// refused.
    #[arg(
        long,
        env = "WARMROLL_AGENT_SERVICE_ACCOUNT",
        default_value = "warmroll:warmroll-agent",
        value_parser = parse_service_account
    )]
    pub agent_service_account: ServiceAccount,
    /// How long a node whose agent disconnected stays in the fleet view.
    #[arg(long, env = "WARMROLL_GRACE_PERIOD", default_value = "2m", value_parser = parse_duration)]
    pub grace_period: Duration,
    /// Heartbeat interval the agents are told to keep (sessions silent for 3 intervals
    /// plus 5 s are ended).
    #[arg(long, env = "WARMROLL_HEARTBEAT_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,
    /// Inventory poll interval the agents are told to use.
    #[arg(long, env = "WARMROLL_INVENTORY_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub inventory_interval: Duration,
    /// Name of the leader-election Lease.
    #[arg(
        long,
        env = "WARMROLL_LEASE_NAME",
        default_value = "warmroll-coordinator"
    )]
    pub lease_name: String,
    /// Namespace of the leader-election Lease (the coordinator's own, from the downward API).
    #[arg(long, env = "POD_NAMESPACE", default_value = "warmroll")]
    pub lease_namespace: String,
    /// This replica's identity in the Lease (default: the pod name from POD_NAME, else the
    /// host name).
    #[arg(long, env = "POD_NAME")]
    pub lease_identity: Option<String>,
    /// How long a leader's claim lasts without renewal; a follower takes over after it.
    /// Renewals happen every 2/15 of it, a leader that cannot renew for 2/3 of it steps
    /// down.
    #[arg(long, env = "WARMROLL_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,
    /// The policy configuration file (YAML). Without it: no policies (nothing is tracked;
    /// agents are still served).
    #[arg(long, env = "WARMROLL_CONFIG")]
    pub config: Option<PathBuf>,
    /// Refuse agent tokens that name no node (`false` accepts them, without registry
    /// credentials in their orders; pod-bound projected tokens name the node on every
    /// supported Kubernetes).
    #[arg(long, env = "WARMROLL_REQUIRE_NODE_CLAIM", default_value_t = true, action = clap::ArgAction::Set)]
    pub require_node_claim: bool,
    /// Fleet API connections open at once; more are closed as they arrive.
    #[arg(long, env = "WARMROLL_MAX_AGENT_CONNECTIONS", default_value_t = 20_000)]
    pub max_agent_connections: usize,
    /// Bounds on what one agent session may send.
    #[command(flatten)]
    pub limits: SessionLimits,
    /// Who may read the HTTP port.
    #[command(flatten)]
    pub http_auth: crate::http::auth::HttpAuthArgs,
}

/// A ServiceAccount `namespace:name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccount {
    pub namespace: String,
    pub name: String,
}

pub(crate) fn parse_service_account(s: &str) -> Result<ServiceAccount, String> {
    match s.split_once(':') {
        Some((namespace, name))
            if !namespace.is_empty() && !name.is_empty() && !name.contains(':') =>
        {
            Ok(ServiceAccount {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            })
        }
        _ => Err(format!(
            "{s:?} is not namespace:name (e.g. warmroll:warmroll-agent)"
        )),
    }
}

/// Why `run` failed or stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("building the Kubernetes client (kubeconfig or in-cluster config): {0}")]
    KubeClient(kube::Error),
    #[error("no Lease identity: set --lease-identity or POD_NAME (reading the host name: {0})")]
    Identity(std::io::Error),
    #[error("listening on {addr} for {what}: {source}")]
    Listen {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}; exiting so that Kubernetes restarts this replica")]
    TaskEnded(#[from] crate::supervise::TaskEnded),
    #[error("lost the leader Lease; exiting so that this replica restarts as a follower")]
    LostLease,
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("starting the policy engine: {0}")]
    Engine(#[from] crate::engine::EngineError),
    #[error("waiting for a shutdown signal: {0}")]
    Signal(std::io::Error),
}

/// What the policy engine gets from `run`: the cluster, the fleet, whether this replica
/// leads (act only while `true`) and whether shutdown began.
#[derive(Clone)]
pub struct Context {
    pub client: kube::Client,
    pub fleet: FleetView,
    pub leader: watch::Receiver<bool>,
    pub shutdown: watch::Receiver<bool>,
}

/// Raises the soft open-files limit to the hard limit: every agent session is a socket.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                warn!(error = %e, soft, "could not raise the open-files limit");
            }
        }
        Ok(_) => {}
        Err(e) => warn!(error = %e, "could not read the open-files limit"),
    }
}

fn identity(args: &RunArgs) -> Result<String, RunError> {
    if let Some(id) = args.lease_identity.as_ref().filter(|i| !i.is_empty()) {
        return Ok(id.clone());
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map_err(RunError::Identity)?;
    Ok(host.trim().to_owned())
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, RunError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| RunError::Listen { what, addr, source })
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() -> Result<(), RunError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(RunError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(RunError::Signal)?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: shutting down"),
        _ = int.recv() => info!("SIGINT: shutting down"),
    }
    Ok(())
}

/// Completes when this replica led and then stopped leading.
async fn leadership_lost(mut leader: watch::Receiver<bool>) {
    if leader.wait_for(|l| *l).await.is_err() {
        return std::future::pending().await;
    }
    if leader.wait_for(|l| !*l).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Runs the coordinator until a signal arrives (`Ok`) or a part fails.
pub async fn run(args: RunArgs) -> Result<(), RunError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    raise_fd_limit();
    let identity = identity(&args)?;
    let client = kube::Client::try_default()
        .await
        .map_err(RunError::KubeClient)?;
    // A bad configuration stops start-up before anything listens.
    let config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::parse("", "built-in defaults")?,
    };

    let fleet = FleetView::new(args.grace_period);
    let (leader_tx, leader) = watch::channel(false);
    let (shutdown_tx, shutdown) = watch::channel(false);
    let context = Context {
        client: client.clone(),
        fleet: fleet.clone(),
        leader: leader.clone(),
        shutdown: shutdown.clone(),
    };

    let mut metrics = Registry::default();
    crate::http::register_metrics(&mut metrics, fleet.clone(), leader.clone());
    fleet.register_metrics(&mut metrics);
    // The policy engine acts only while `leader` is true and stops on `shutdown`.
    let Engine {
        router: engine_routes,
        task: engine,
        watches,
    } = crate::engine::spawn(context, config, &mut metrics)?;

    let agent = &args.agent_service_account;
    let auth = TokenReviewAuthenticator::new(
        client.clone(),
        &args.token_audience,
        &service_account_user(&agent.namespace, &agent.name),
        TOKEN_CACHE_TTL,
    );
    auth.register_metrics(&mut metrics);
    let sessions = SessionConfig {
        heartbeat_interval: args.heartbeat_interval,
        inventory_interval: args.inventory_interval,
        idle_timeout: args.heartbeat_interval * 3 + Duration::from_secs(5),
        require_node_claim: args.require_node_claim,
        limits: args.limits.clone(),
        max_connections: args.max_agent_connections,
        ..SessionConfig::default()
    };
    let service = FleetService::new(fleet.clone(), auth, sessions).with_gate(leader.clone());
    let tls = TlsFiles {
        cert: args.tls_cert.clone(),
        key: args.tls_key.clone(),
    };
    let grpc_listener = bind("the fleet API", args.grpc_listen).await?;
    let http_listener = bind("HTTP", args.http_listen).await?;

    let mut tasks = Supervisor::default();
    let stopping = |mut stop: watch::Receiver<bool>| async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    tasks.adopt("policy engine", engine);

    let serving = Arc::new(AtomicBool::new(false));
    {
        let serving = serving.clone();
        let stop = stopping(shutdown.clone());
        tasks.spawn("fleet server", async move {
            serving.store(true, Ordering::Relaxed);
            let result = crate::fleet::serve(grpc_listener, Some(&tls), service, stop).await;
            serving.store(false, Ordering::Relaxed);
            result
        });
    }

    let router = crate::http::router(
        crate::http::Health {
            leader: leader.clone(),
            serving,
            watches,
            tasks: tasks.ended(),
        },
        Arc::new(metrics),
        fleet.clone(),
    )
    .merge(engine_routes);
    let router = crate::http::auth::guard(router, client.clone(), &args.http_auth);
    tasks.spawn(
        "HTTP server",
        crate::http::serve(http_listener, router, stopping(shutdown.clone())),
    );

    {
        let config = LeaseConfig {
            namespace: args.lease_namespace.clone(),
            name: args.lease_name.clone(),
            identity,
            lease_duration: args.lease_duration,
        };
        let store = KubeLeases::new(client.clone(), &config.namespace, &config.name);
        let elect = leader::elect(store, config, leader_tx, stopping(shutdown.clone()));
        tasks.spawn("leader election", async move {
            elect.await;
            Ok::<(), std::convert::Infallible>(())
        });
    }

    let outcome = tokio::select! {
        signal = shutdown_signal() => signal,
        () = leadership_lost(leader.clone()) => Err(RunError::LostLease),
        ended = tasks.first_end() => Err(RunError::TaskEnded(ended)),
    };
    if let Err(e) = &outcome {
        error!(error = %e, "shutting down");
    }

    // The elector sets `leader` to false (closing the fleet gate: open sessions end with
    // `unavailable`) and releases the Lease; the servers drain.
    shutdown_tx.send_replace(true);
    if !tasks.drain(SHUTDOWN_TIMEOUT).await {
        warn!(timeout = ?SHUTDOWN_TIMEOUT, "shutdown did not finish in time; stopped anyway");
    }
    info!("stopped");
    outcome
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command};

    #[test]
    fn run_flags_parse_with_defaults() {
        let cli = Cli::try_parse_from([
            "warmroll-coordinator",
            "run",
            "--tls-cert",
            "/tls/tls.crt",
            "--tls-key",
            "/tls/tls.key",
            "--grace-period",
            "45s",
            "--agent-service-account",
            "kube-system:node-agent",
            "--lease-identity",
            "coord-0",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not the run command")
        };
        assert_eq!(args.grace_period, Duration::from_secs(45));
        assert_eq!(args.token_audience, "warmroll");
        assert_eq!(
            args.agent_service_account,
            ServiceAccount {
                namespace: "kube-system".into(),
                name: "node-agent".into()
            }
        );
        assert_eq!(args.lease_duration, Duration::from_secs(15));
        assert_eq!(args.grpc_listen.port(), 8443);
        assert_eq!(identity(&args).unwrap(), "coord-0");
    }

    #[test]
    fn bad_service_accounts_and_durations_are_refused() {
        for bad in ["warmroll", ":x", "x:", "a:b:c"] {
            assert!(parse_service_account(bad).is_err(), "{bad}");
        }
    }
}
