//! A fleet test bed for the coordinator's integration tests: a KubeApi stand-in with the
//! agents' tokens registered, a test-bed registry, N test-bed containerd nodes each with
//! an in-process agent (`warmroll_agent::node::run`), and the coordinator's fleet
//! server over TLS (which can be stopped and started again on the same address).
//!
//! ```ignore
//! let mut bed = FleetBed::start(2).await?;           // node-0, node-1
//! bed.wait_until(|v| v.counts().ready == 2, "both agents ready").await?;
//! let pod = bed.nodes[0].containerd.run_pod(&PodSpec::new("ns", "web")...).await?;
//! bed.restart_coordinator().await?;
//! ```
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use warmroll_agent::inventory::Intervals;
use warmroll_agent::metrics::{Health, Metrics};
use warmroll_agent::node::NodeAgent;
use warmroll_agent::session::SessionArgs;
use warmroll_agent::warm::WarmConfig;
use warmroll_coordinator::fleet::auth::service_account_user;
use warmroll_coordinator::fleet::{
    FleetService, FleetView, ServeError, SessionConfig, TlsFiles, TokenReviewAuthenticator,
};
use warmroll_proto::fleet::NodeName;
use warmroll_proto::v1;
use warmroll_proto::v1::fleet_client::FleetClient;
use warmroll_tests::containerd::Containerd;
use warmroll_tests::kubeapi::KubeApi;
use warmroll_tests::registry::{Registry, RegistryOptions};
use warmroll_tests::scratch;
use warmroll_tests::tls::TestCa;

/// The audience agents' tokens carry.
pub const AUDIENCE: &str = "warmroll";
/// The agents' ServiceAccount.
pub const AGENT_NAMESPACE: &str = "warmroll";
pub const AGENT_ACCOUNT: &str = "warmroll-agent";

pub fn agent_user() -> String {
    service_account_user(AGENT_NAMESPACE, AGENT_ACCOUNT)
}

/// A node name.
pub fn node(name: &str) -> NodeName {
    NodeName::parse(name).unwrap()
}

/// The agent's hello for node `name`, on containerd.
pub fn hello(name: &str) -> v1::AgentMessage {
    warmroll_proto::fleet::AgentMessage::Hello(warmroll_agent::session::hello(
        node(name),
        warmroll_proto::fleet::Runtime {
            name: "containerd".into(),
            version: "1.6".into(),
        },
    ))
    .into()
}

/// Registers a fresh token for `user` with warmroll's audience, bound to `node` when
/// given (as a pod-bound projected token is), and returns it.
pub fn register_token(kube: &KubeApi, user: &str, node: Option<&str>) -> String {
    kube.issue_service_account_token(user, &[AUDIENCE], node)
}

/// The coordinator's TLS material: a CA and a certificate for localhost/127.0.0.1, as files.
pub struct Tls {
    pub ca: TestCa,
    pub dir: TempDir,
    pub files: TlsFiles,
    pub ca_file: PathBuf,
}

impl Tls {
    pub fn new() -> Result<Self> {
        warmroll_tests::tls::install_crypto_provider();
        let ca = TestCa::new()?;
        let cert = ca.issue(&["localhost", "127.0.0.1"])?;
        let dir = scratch::temp_dir("coordinator-tls")?;
        let files = TlsFiles {
            cert: dir.path().join("tls.crt"),
            key: dir.path().join("tls.key"),
        };
        std::fs::write(&files.cert, &cert.cert_pem)?;
        std::fs::write(&files.key, &cert.key_pem)?;
        let ca_file = dir.path().join("ca.crt");
        std::fs::write(&ca_file, ca.cert_pem())?;
        Ok(Tls {
            ca,
            dir,
            files,
            ca_file,
        })
    }

    /// A TLS channel to `addr` trusting this CA (for raw protocol tests).
    pub async fn channel(&self, addr: SocketAddr) -> Result<tonic::transport::Channel> {
        let endpoint = Endpoint::from_shared(format!("https://localhost:{}", addr.port()))?
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(self.ca.cert_pem()))
                    .domain_name("localhost"),
            )?
            .connect_timeout(Duration::from_secs(5));
        Ok(endpoint.connect().await?)
    }
}

/// The coordinator's fleet server, in process.
pub struct Coordinator {
    pub addr: SocketAddr,
    pub view: FleetView,
    gate: watch::Sender<bool>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServeError>>>,
}

impl Coordinator {
    /// Starts a fleet server on `addr` (a fresh loopback port when `None`) with a new,
    /// empty fleet view whose disconnected nodes leave after `grace`.
    pub async fn start(
        kube: &KubeApi,
        tls: &Tls,
        addr: Option<SocketAddr>,
        grace: Duration,
    ) -> Result<Self> {
        let listener = match addr {
            Some(addr) => TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding {addr} again"))?,
            None => TcpListener::bind("127.0.0.1:0").await?,
        };
        let addr = listener.local_addr()?;
        let view = FleetView::new(grace);
        let (gate, gate_rx) = watch::channel(true);
        let service = fleet_service(&view, kube).with_gate(gate_rx);
        let (stop, stopped) = oneshot::channel::<()>();
        let files = tls.files.clone();
        let task = tokio::spawn(async move {
            warmroll_coordinator::fleet::serve(listener, Some(&files), service, async move {
                let _ = stopped.await;
            })
            .await
        });
        Ok(Coordinator {
            addr,
            view,
            gate,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// Stops it as a coordinator shutting down does: open sessions end with
    /// `unavailable`, the listener closes, connections drain.
    pub async fn stop(mut self) -> Result<()> {
        self.gate.send_replace(false);
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .context("the fleet server did not stop within 10 s")???;
        }
        Ok(())
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.gate.send_replace(false);
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// One node: its containerd and its in-process agent.
pub struct Node {
    pub name: NodeName,
    pub containerd: Containerd,
    pub token_file: PathBuf,
    dir: TempDir,
    agent: Option<Agent>,
}

struct Agent {
    stop: oneshot::Sender<()>,
    /// `warmroll_agent::node::run`: the inventory loop and the session.
    task: JoinHandle<()>,
}

/// Starts an in-process agent (`warmroll_agent::node::run`, CRI polling only: these
/// tests are about the session and the rollout, not containerd's events) on the
/// containerd at `socket`. It runs until the sender is used or dropped.
pub async fn spawn_agent(
    socket: &Path,
    session: SessionArgs,
) -> Result<(oneshot::Sender<()>, JoinHandle<()>)> {
    let metrics = Metrics::new();
    let health = Arc::new(Health::default());
    let (client, version) =
        warmroll_agent::cri::connect(Some(socket), metrics.clone(), health.clone())
            .await
            .context("agent: connecting to containerd")?;
    let agent = NodeAgent {
        session,
        intervals: Intervals {
            poll: Duration::from_millis(300),
            resync: Duration::from_millis(300),
        },
        warm: WarmConfig {
            max_concurrent_pulls: 2,
            min_free_disk: 0,
            flush_after_pull: true,
        },
        cri_only: true,
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(warmroll_agent::node::run(
        client,
        version,
        agent,
        metrics,
        health,
        async move {
            let _ = stopped.await;
        },
    ));
    Ok((stop, task))
}

impl Node {
    /// Whether the agent's session loop is running.
    pub fn agent_running(&self) -> bool {
        self.agent.as_ref().is_some_and(|a| !a.task.is_finished())
    }

    /// Starts the node's agent against the coordinator at `addr`, with `token`.
    pub async fn start_agent(
        &mut self,
        addr: SocketAddr,
        ca_file: &Path,
        token: &str,
    ) -> Result<()> {
        std::fs::write(&self.token_file, token)?;
        let session = SessionArgs {
            coordinator_url: format!("https://localhost:{}", addr.port()),
            ca_file: Some(ca_file.to_path_buf()),
            token_file: self.token_file.clone(),
            node_name: self.name.clone(),
        };
        let (stop, task) = spawn_agent(self.containerd.socket(), session).await?;
        self.agent = Some(Agent { stop, task });
        Ok(())
    }

    /// Stops the agent (its session closes; the node's containers keep running).
    pub async fn stop_agent(&mut self) -> Result<()> {
        if let Some(agent) = self.agent.take() {
            let _ = agent.stop.send(());
            tokio::time::timeout(Duration::from_secs(10), agent.task)
                .await
                .context("the agent did not stop within 10 s")??;
        }
        Ok(())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(agent) = self.agent.take() {
            agent.task.abort();
        }
    }
}

/// The whole bed.
pub struct FleetBed {
    pub kube: KubeApi,
    pub registry: Registry,
    pub tls: Tls,
    pub coordinator: Option<Coordinator>,
    pub nodes: Vec<Node>,
    pub grace: Duration,
}

impl FleetBed {
    /// `nodes` nodes (`node-0`, `node-1`, …) whose agents hold node-bound tokens, and a
    /// coordinator whose disconnected nodes leave after 60 s.
    pub async fn start(nodes: usize) -> Result<Self> {
        Self::start_with_grace(nodes, Duration::from_secs(60)).await
    }

    pub async fn start_with_grace(nodes: usize, grace: Duration) -> Result<Self> {
        let kube = KubeApi::start().await?;
        let registry = Registry::start(RegistryOptions::plain()).await?;
        let tls = Tls::new()?;
        let coordinator = Coordinator::start(&kube, &tls, None, grace).await?;
        let mut bed = FleetBed {
            kube,
            registry,
            tls,
            coordinator: Some(coordinator),
            nodes: Vec::new(),
            grace,
        };
        for i in 0..nodes {
            let name = format!("node-{i}");
            let containerd = Containerd::start_with_registry(&bed.registry)
                .await
                .with_context(|| format!("starting containerd for {name}"))?;
            let dir = scratch::temp_dir("agent")?;
            let mut node = Node {
                name: NodeName::parse(&name).map_err(anyhow::Error::msg)?,
                containerd,
                token_file: dir.path().join("token"),
                dir,
                agent: None,
            };
            let token = register_token(&bed.kube, &agent_user(), Some(&name));
            node.start_agent(bed.coordinator()?.addr, &bed.tls.ca_file, &token)
                .await?;
            bed.nodes.push(node);
        }
        Ok(bed)
    }

    pub fn coordinator(&self) -> Result<&Coordinator> {
        self.coordinator
            .as_ref()
            .context("the coordinator is stopped")
    }

    pub fn view(&self) -> Result<FleetView> {
        Ok(self.coordinator()?.view.clone())
    }

    /// Stops the coordinator and starts a new one (with an empty view) on the same address.
    pub async fn restart_coordinator(&mut self) -> Result<()> {
        let old = self
            .coordinator
            .take()
            .context("the coordinator is stopped")?;
        let addr = old.addr;
        old.stop().await?;
        self.coordinator =
            Some(Coordinator::start(&self.kube, &self.tls, Some(addr), self.grace).await?);
        Ok(())
    }

    /// Waits (up to 30 s) until `check` holds on the current coordinator's view.
    pub async fn wait_until(&self, what: &str, check: impl Fn(&FleetView) -> bool) -> Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let view = self.view()?;
            if check(&view) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "timed out after 30 s waiting for: {what} (fleet: {:?})",
                    view.counts()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Opens a raw session (generated client) with `token` and `first` messages; returns
    /// the answer stream or the refusal.
    pub async fn raw_session(
        &self,
        token: &str,
        first: Vec<v1::AgentMessage>,
    ) -> Result<RawSession> {
        let channel = self.tls.channel(self.coordinator()?.addr).await?;
        raw_session(channel, token, first).await
    }

    /// Opens a raw session with `token`, sends `messages` and returns the status the
    /// session ends with.
    pub async fn session_end(&self, token: &str, messages: Vec<v1::AgentMessage>) -> tonic::Status {
        match self.raw_session(token, messages).await {
            Ok(session) => session.end_status().await,
            Err(e) => tonic::Status::unknown(format!("test: opening the session: {e:#}")),
        }
    }
}

/// The fleet service the tests run: TokenReview against `kube` for the agent
/// ServiceAccount and [`AUDIENCE`], with short session intervals.
pub fn fleet_service(view: &FleetView, kube: &KubeApi) -> FleetService<TokenReviewAuthenticator> {
    let auth = TokenReviewAuthenticator::new(
        kube.client(),
        AUDIENCE,
        &agent_user(),
        Duration::from_secs(60),
    );
    FleetService::new(
        view.clone(),
        auth,
        SessionConfig {
            heartbeat_interval: Duration::from_secs(2),
            inventory_interval: Duration::from_millis(500),
            ..SessionConfig::default()
        },
    )
}

/// A session opened with the generated client: push messages, read answers.
pub struct RawSession {
    pub tx: mpsc::Sender<v1::AgentMessage>,
    pub answer: Result<tonic::Streaming<v1::CoordinatorMessage>, tonic::Status>,
}

impl RawSession {
    /// The status the session ends with (the refusal, or the error after the welcome).
    pub async fn end_status(self) -> tonic::Status {
        self.end_status_within(Duration::from_secs(10)).await
    }

    /// The status the session ends with, waiting at most `within` for each answer.
    pub async fn end_status_within(self, within: Duration) -> tonic::Status {
        let mut stream = match self.answer {
            Ok(s) => s,
            Err(status) => return status,
        };
        let _tx = self.tx;
        loop {
            match tokio::time::timeout(within, stream.message()).await {
                Err(_) => return tonic::Status::deadline_exceeded("test: no end in time"),
                Ok(Ok(Some(_))) => continue,
                Ok(Ok(None)) => return tonic::Status::ok("ended without an error"),
                Ok(Err(status)) => return status,
            }
        }
    }
}

pub async fn raw_session(
    channel: tonic::transport::Channel,
    token: &str,
    first: Vec<v1::AgentMessage>,
) -> Result<RawSession> {
    let mut client = FleetClient::new(channel).max_decoding_message_size(64 << 20);
    let (tx, rx) = mpsc::channel(16);
    for m in first {
        tx.send(m).await?;
    }
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    let answer = client
        .session(request)
        .await
        .map(tonic::Response::into_inner);
    Ok(RawSession { tx, answer })
}

/// Collects every log line written while it is the thread's default subscriber.
#[derive(Clone, Default)]
pub struct LogCapture(Arc<std::sync::Mutex<Vec<u8>>>);

impl LogCapture {
    /// Everything logged so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogCapture {
    type Writer = LogCapture;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}
