//! The agent's session with the coordinator (`warmroll-agent run`).
//!
//! One long-lived `warmroll.v1.Fleet/Session` stream over TLS, authenticated with the
//! projected ServiceAccount token (re-read on every connect, so rotation just works).
//! After every (re)connect the agent sends its hello and a fresh inventory snapshot, then
//! numbered changes. Warm orders run on the [`Warmer`], their pull progress (containerd
//! only) sent as it changes, at most once per second; while the coordinator is away the
//! inventory stays current and ordered pulls go on, their results buffered until the
//! next session. Reconnects back off exponentially with jitter.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use tracing::{debug, info, instrument, warn};
use warmroll_proto::fleet::{
    self, AgentMessage, CoordinatorMessage, FailureKind, Hello, InventoryChange, MAX_MESSAGE_BYTES,
    NodeName, OrderId, PROTOCOL_VERSION, Runtime, WarmOrder, WarmOutcome, WarmProgress, WarmResult,
};
use warmroll_proto::image::Platform;
use warmroll_proto::v1;
use warmroll_proto::v1::fleet_client::FleetClient;

use crate::cri::{Backoff, Cri, error_chain};
use crate::inventory::{ChangeSet, InventoryUpdate, NodeImage, RunningContainer, Snapshot};
use crate::progress::PullProgress;
use crate::warm::{WarmError, Warmer};

/// Results kept while the coordinator is away (the oldest are dropped beyond this).
const BUFFERED_RESULTS_MAX: usize = 1024;
const OUTBOUND_QUEUE: usize = 64;

/// Where and how to reach the coordinator (the `run` command's flags).
#[derive(Debug, Clone, clap::Args)]
pub struct SessionArgs {
    /// The coordinator's fleet API, e.g. https://warmroll-coordinator.warmroll:8443.
    #[arg(long, env = "WARMROLL_COORDINATOR_URL")]
    pub coordinator_url: String,
    /// PEM bundle of the CAs that sign the coordinator's certificate (without it, an
    /// https URL is refused: the agent sends its token only to a verified coordinator).
    #[arg(long, env = "WARMROLL_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// The projected ServiceAccount token (re-read on every connect).
    #[arg(
        long,
        env = "WARMROLL_TOKEN_FILE",
        default_value = "/var/run/secrets/tokens/warmroll"
    )]
    pub token_file: PathBuf,
    /// This node's name (the downward API's spec.nodeName).
    #[arg(long, env = "NODE_NAME", value_parser = parse_node_name)]
    pub node_name: NodeName,
}

fn parse_node_name(s: &str) -> Result<NodeName, String> {
    NodeName::parse(s)
}

/// Why one connection attempt or session failed (the loop logs it and retries).
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("reading the token file {path}: {source}")]
    ReadToken {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the token file {0} is empty or not usable as a header value")]
    BadToken(PathBuf),
    #[error("reading the CA file {path}: {source}")]
    ReadCa {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the coordinator URL {url}: {message}")]
    Url { url: String, message: String },
    #[error("connecting to {url}: {message}")]
    Connect { url: String, message: String },
    #[error("the coordinator refused the session: {0}")]
    Refused(tonic::Status),
    #[error("the session ended: {0}")]
    Ended(tonic::Status),
    #[error("no answer from the coordinator within {0:?}")]
    Timeout(Duration),
}

/// The Go/OCI name of this machine's architecture.
pub(crate) fn oci_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        "arm" => "arm",
        other => other,
    }
}

/// This agent's hello.
pub fn hello(node: NodeName, runtime: Runtime) -> Hello {
    Hello {
        node,
        platform: Platform {
            os: std::env::consts::OS.to_owned(),
            architecture: oci_architecture().to_owned(),
            variant: None,
        },
        runtime,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        protocol_version: PROTOCOL_VERSION,
    }
}

// ---- inventory (agent types) -> protocol ----

fn container(c: &RunningContainer) -> fleet::Container {
    fleet::Container {
        id: c.id.clone(),
        pod: fleet::PodRef {
            namespace: c.pod.namespace.clone(),
            name: c.pod.name.clone(),
            uid: c.pod.uid.clone(),
        },
        pod_labels: c.pod_labels.clone(),
        name: c.container.clone(),
        image: c.image.clone(),
        image_id: c.image_id.clone(),
        digest: c.digest.clone(),
    }
}

fn image(i: &NodeImage) -> fleet::NodeImage {
    fleet::NodeImage {
        id: i.id.clone(),
        repo_tags: i.repo_tags.clone(),
        repo_digests: i.repo_digests.clone(),
        size: i.size,
    }
}

/// The protocol snapshot of the agent's inventory.
pub fn snapshot_message(sequence: u64, s: &Snapshot) -> fleet::Snapshot {
    fleet::Snapshot {
        sequence,
        containers: s.containers.values().map(container).collect(),
        images: s.images.values().map(image).collect(),
    }
}

/// The protocol change for an inventory change set.
pub fn change_message(sequence: u64, c: &ChangeSet) -> InventoryChange {
    InventoryChange {
        sequence,
        upserted: c.added.iter().chain(&c.changed).map(container).collect(),
        removed: c.removed.iter().map(|r| r.id.clone()).collect(),
        images_upserted: c
            .images_added
            .iter()
            .chain(&c.images_changed)
            .map(image)
            .collect(),
        images_removed: c.images_removed.clone(),
    }
}

/// The protocol result of a warm-up.
pub fn warm_result(order: OrderId, outcome: &Result<crate::warm::Warmed, WarmError>) -> WarmResult {
    let outcome = match outcome {
        Ok(w) => WarmOutcome::Succeeded {
            duration: w.duration,
            downloaded: w.downloaded,
            digest: w.digest.clone(),
            image_id: w.image_id.clone(),
        },
        Err(e) => {
            let (kind, found) = match e {
                WarmError::Auth { .. } => (FailureKind::Auth, None),
                WarmError::NotFound { .. } => (FailureKind::NotFound, None),
                WarmError::DigestMismatch { found, .. } => {
                    (FailureKind::DigestMismatch, found.clone())
                }
                WarmError::Timeout { .. } => (FailureKind::Timeout, None),
                WarmError::InsufficientDisk { .. } => (FailureKind::InsufficientDisk, None),
                WarmError::Runtime { .. } => (FailureKind::Runtime, None),
            };
            WarmOutcome::Failed {
                kind,
                message: e.to_string(),
                found,
            }
        }
    };
    WarmResult { order, outcome }
}

/// The protocol progress of a running warm-up.
pub fn progress_message(order: OrderId, p: PullProgress) -> WarmProgress {
    WarmProgress {
        order,
        bytes_done: p.done,
        bytes_total: p.total,
    }
}

fn failed(order: OrderId, kind: FailureKind, message: String) -> WarmResult {
    WarmResult {
        order,
        outcome: WarmOutcome::Failed {
            kind,
            message,
            found: None,
        },
    }
}

struct Connection {
    out: mpsc::Sender<v1::AgentMessage>,
    inbound: Streaming<v1::CoordinatorMessage>,
}

/// Opens a session: reads the token, dials (TLS with the CA bundle), sends the hello.
#[instrument(skip_all, fields(url = %args.coordinator_url, node = %hello.node))]
async fn connect(args: &SessionArgs, hello: &Hello) -> Result<Connection, SessionError> {
    let url = &args.coordinator_url;
    let token = tokio::fs::read_to_string(&args.token_file)
        .await
        .map_err(|source| SessionError::ReadToken {
            path: args.token_file.clone(),
            source,
        })?;
    let mut bearer: MetadataValue<_> = format!("Bearer {}", token.trim())
        .parse()
        .map_err(|_| SessionError::BadToken(args.token_file.clone()))?;
    if token.trim().is_empty() {
        return Err(SessionError::BadToken(args.token_file.clone()));
    }
    bearer.set_sensitive(true);
    let url_error = |message: String| SessionError::Url {
        url: url.clone(),
        message,
    };
    let mut endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| url_error(error_chain(&e)))?
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    match &args.ca_file {
        Some(path) => {
            let pem = tokio::fs::read(path)
                .await
                .map_err(|source| SessionError::ReadCa {
                    path: path.clone(),
                    source,
                })?;
            endpoint = endpoint
                .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
                .map_err(|e| url_error(error_chain(&e)))?;
        }
        None if url.starts_with("https://") => {
            return Err(url_error("https needs --ca-file".to_owned()));
        }
        None => {}
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| SessionError::Connect {
            url: url.clone(),
            message: error_chain(&e),
        })?;
    let mut client = FleetClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let (out, rx) = mpsc::channel(OUTBOUND_QUEUE);
    // The queue is empty: room for the hello.
    let _ = out.try_send(AgentMessage::Hello(hello.clone()).into());
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    request.metadata_mut().insert("authorization", bearer);
    let answer_within = Duration::from_secs(30);
    let response = tokio::time::timeout(answer_within, client.session(request))
        .await
        .map_err(|_| SessionError::Timeout(answer_within))?
        .map_err(SessionError::Refused)?;
    Ok(Connection {
        out,
        inbound: response.into_inner(),
    })
}

/// The agent side's state across sessions.
struct Agent<C: Cri> {
    warmer: Warmer<C>,
    inventory: Option<Snapshot>,
    sequence: u64,
    buffered: VecDeque<WarmResult>,
    running: HashMap<OrderId, AbortHandle>,
    results_tx: mpsc::UnboundedSender<WarmResult>,
    progress_tx: mpsc::Sender<WarmProgress>,
    heartbeat: Duration,
}

impl<C: Cri> Agent<C> {
    fn next_sequence(&mut self) -> u64 {
        self.sequence = self.sequence.wrapping_add(1);
        self.sequence
    }

    /// The inventory as a snapshot in parts (none before the first inventory).
    fn snapshot(&mut self) -> Vec<v1::AgentMessage> {
        let seq = self.next_sequence();
        let Some(snapshot) = self.inventory.as_ref() else {
            return Vec::new();
        };
        fleet::split_snapshot(
            snapshot_message(seq, snapshot).into(),
            fleet::SNAPSHOT_PART_BYTES,
        )
        .into_iter()
        .map(|part| v1::AgentMessage {
            kind: Some(v1::agent_message::Kind::Snapshot(part)),
        })
        .collect()
    }

    /// Folds an inventory update in; returns what to send when connected.
    fn inventory_update(&mut self, update: InventoryUpdate) -> Vec<v1::AgentMessage> {
        match update {
            InventoryUpdate::Full(s) => {
                self.inventory = Some(s);
                self.snapshot()
            }
            InventoryUpdate::Changes(c) => {
                let Some(inventory) = self.inventory.as_mut() else {
                    return Vec::new();
                };
                inventory.apply(&c);
                let seq = self.next_sequence();
                vec![AgentMessage::Change(change_message(seq, &c)).into()]
            }
        }
    }

    fn start_warm(&mut self, order: WarmOrder) {
        if self.running.contains_key(&order.id) {
            debug!(order = %order.id, "warm order already running");
            return;
        }
        info!(order = %order.id, image = %order.image, expected = ?order.expected, "warm order");
        let warmer = self.warmer.clone();
        let results = self.results_tx.clone();
        let progress_tx = self.progress_tx.clone();
        let id = order.id.clone();
        let task = tokio::spawn(async move {
            let deadline = Instant::now() + order.timeout;
            let warming = warmer.warm(
                &order.image,
                order.expected.as_ref(),
                order.credentials,
                deadline,
            );
            let mut progress = warming.progress();
            let outcome = warming.into_future();
            tokio::pin!(outcome);
            let outcome = loop {
                tokio::select! {
                    outcome = &mut outcome => break outcome,
                    changed = progress.changed() => {
                        let current = *progress.borrow_and_update();
                        match (changed, current) {
                            (Ok(()), Some(p)) => {
                                // Progress is best effort: dropped when the queue is full.
                                let _ = progress_tx.try_send(progress_message(order.id.clone(), p));
                            }
                            (Ok(()), None) => {}
                            // The pull finished: only the outcome is left.
                            (Err(_), _) => break (&mut outcome).await,
                        }
                    }
                }
            };
            match &outcome {
                Ok(w) => {
                    info!(order = %order.id, image = %order.image, downloaded = w.downloaded, "warmed")
                }
                Err(e) => warn!(order = %order.id, error = %e, "warm-up failed"),
            }
            let _ = results.send(warm_result(order.id, &outcome));
        });
        self.running.insert(id, task.abort_handle());
    }

    fn cancel(&mut self, order: &OrderId) -> Option<WarmResult> {
        let task = self.running.remove(order)?;
        task.abort();
        info!(order = %order, "warm order cancelled");
        Some(failed(
            order.clone(),
            FailureKind::Cancelled,
            "cancelled by the coordinator".to_owned(),
        ))
    }

    fn buffer(&mut self, result: WarmResult) {
        if self.buffered.len() >= BUFFERED_RESULTS_MAX {
            self.buffered.pop_front();
        }
        self.buffered.push_back(result);
    }

    /// Handles one coordinator message; returns what to send back.
    fn handle(&mut self, message: v1::CoordinatorMessage) -> Vec<v1::AgentMessage> {
        let raw_order_id = match &message.kind {
            Some(v1::coordinator_message::Kind::WarmOrder(o)) => OrderId::parse(&o.id).ok(),
            _ => None,
        };
        let message = match CoordinatorMessage::try_from(message) {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, "malformed coordinator message ignored");
                // A bad order still gets an answer, so the coordinator is not left waiting.
                return raw_order_id
                    .map(|id| {
                        AgentMessage::WarmResult(failed(
                            id,
                            FailureKind::InvalidOrder,
                            e.to_string(),
                        ))
                        .into()
                    })
                    .into_iter()
                    .collect();
            }
        };
        match message {
            CoordinatorMessage::Welcome(w) => {
                info!(heartbeat = ?w.heartbeat_interval, "session established");
                self.heartbeat = w.heartbeat_interval;
                Vec::new()
            }
            CoordinatorMessage::WarmOrder(order) => {
                self.start_warm(order);
                Vec::new()
            }
            CoordinatorMessage::CancelWarm(id) => self
                .cancel(&id)
                .map(|r| AgentMessage::WarmResult(r).into())
                .into_iter()
                .collect(),
            CoordinatorMessage::Resync { reason } => {
                info!(%reason, "the coordinator asks for a fresh snapshot");
                self.snapshot()
            }
        }
    }
}

async fn next_message(
    conn: &mut Option<Connection>,
) -> Result<Option<v1::CoordinatorMessage>, tonic::Status> {
    match conn {
        Some(c) => c.inbound.message().await,
        None => std::future::pending().await,
    }
}

/// Sends `messages` on the session; on failure the session is dropped.
async fn send_all(conn: &mut Option<Connection>, messages: Vec<v1::AgentMessage>) {
    let Some(c) = conn else { return };
    for m in messages {
        if c.out.send(m).await.is_err() {
            debug!("the session's request stream is closed");
            *conn = None;
            return;
        }
    }
}

/// Runs the session loop until `shutdown` completes: keeps a session to the coordinator
/// open, forwards inventory updates from `inventory`, runs warm orders on `warmer`.
pub async fn run<C: Cri>(
    args: SessionArgs,
    runtime: Runtime,
    warmer: Warmer<C>,
    mut inventory: mpsc::Receiver<InventoryUpdate>,
    shutdown: impl Future<Output = ()>,
) {
    let hello = hello(args.node_name.clone(), runtime);
    let (results_tx, mut results_rx) = mpsc::unbounded_channel();
    let (progress_tx, mut progress_rx) = mpsc::channel(OUTBOUND_QUEUE);
    let mut agent = Agent {
        warmer,
        inventory: None,
        sequence: 0,
        buffered: VecDeque::new(),
        running: HashMap::new(),
        results_tx,
        progress_tx,
        heartbeat: Duration::from_secs(30),
    };
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let mut conn: Option<Connection> = None;
    let mut retry_at = Instant::now();
    let mut last_sent = Instant::now();
    let mut inventory_open = true;
    tokio::pin!(shutdown);
    loop {
        if conn.is_none() && Instant::now() >= retry_at {
            match connect(&args, &hello).await {
                Ok(c) => {
                    info!(url = %args.coordinator_url, "connected to the coordinator");
                    backoff.reset();
                    conn = Some(c);
                    let mut first = agent.snapshot();
                    first.extend(
                        agent
                            .buffered
                            .drain(..)
                            .map(|r| AgentMessage::WarmResult(r).into()),
                    );
                    send_all(&mut conn, first).await;
                    last_sent = Instant::now();
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    warn!(error = %e, retry_in = ?delay, "no session with the coordinator");
                    retry_at = Instant::now() + delay;
                }
            }
            continue;
        }
        let heartbeat_at = last_sent + agent.heartbeat;
        tokio::select! {
            () = &mut shutdown => break,
            update = inventory.recv(), if inventory_open => match update {
                Some(update) => {
                    let messages = agent.inventory_update(update);
                    if conn.is_some() && !messages.is_empty() {
                        send_all(&mut conn, messages).await;
                        last_sent = Instant::now();
                    }
                }
                None => {
                    warn!("the inventory loop ended");
                    inventory_open = false;
                }
            },
            Some(result) = results_rx.recv() => {
                agent.running.remove(&result.order);
                if conn.is_some() {
                    send_all(&mut conn, vec![AgentMessage::WarmResult(result.clone()).into()]).await;
                    last_sent = Instant::now();
                }
                if conn.is_none() {
                    agent.buffer(result);
                }
            }
            Some(progress) = progress_rx.recv() => {
                // Only for a running order, and only while connected: progress is not
                // worth buffering.
                if conn.is_some() && agent.running.contains_key(&progress.order) {
                    send_all(&mut conn, vec![AgentMessage::WarmProgress(progress).into()]).await;
                    last_sent = Instant::now();
                }
            }
            message = next_message(&mut conn) => match message {
                Ok(Some(m)) => {
                    let replies = agent.handle(m);
                    if !replies.is_empty() {
                        send_all(&mut conn, replies).await;
                        last_sent = Instant::now();
                    }
                }
                Ok(None) | Err(_) => {
                    match message {
                        Err(status) => warn!(error = %SessionError::Ended(status), "session lost"),
                        _ => warn!("the coordinator closed the session"),
                    }
                    conn = None;
                    retry_at = Instant::now() + backoff.next_delay();
                }
            },
            () = tokio::time::sleep_until(heartbeat_at), if conn.is_some() => {
                send_all(&mut conn, vec![AgentMessage::Heartbeat.into()]).await;
                last_sent = Instant::now();
            }
            () = tokio::time::sleep_until(retry_at), if conn.is_none() => {}
        }
    }
}

/// The runtime's name and version for the hello, from its CRI `Version` answer.
pub fn runtime(v: &k8s_cri::v1::VersionResponse) -> Runtime {
    Runtime {
        name: v.runtime_name.clone(),
        version: v.runtime_version.clone(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use warmroll_proto::image::{Digest, ImageRef};

    use super::*;
    use crate::inventory::PodRef;

    fn running(id: &str) -> RunningContainer {
        RunningContainer {
            id: id.into(),
            pod: PodRef {
                namespace: "ns".into(),
                name: "p".into(),
                uid: "u".into(),
            },
            pod_labels: BTreeMap::from([("app".into(), "web".into())]),
            container: "app".into(),
            image: "registry.example/app:main".into(),
            image_id: "sha256:cfg".into(),
            digest: None,
        }
    }

    #[test]
    fn change_sets_become_upserts_and_removals() {
        let c = ChangeSet {
            added: vec![running("a")],
            changed: vec![running("b")],
            removed: vec![running("c")],
            images_removed: vec!["sha256:old".into()],
            ..Default::default()
        };
        let m = change_message(7, &c);
        assert_eq!(m.sequence, 7);
        assert_eq!(
            m.upserted.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(m.removed, ["c"]);
        assert_eq!(m.images_removed, ["sha256:old"]);
        // And it is valid on the wire.
        let wire = v1::AgentMessage::from(AgentMessage::Change(m.clone()));
        assert_eq!(
            AgentMessage::try_from(wire).unwrap(),
            AgentMessage::Change(m)
        );
    }

    #[test]
    fn warm_errors_map_to_failure_kinds_with_the_found_digest() {
        let image = ImageRef::parse("registry.example/app:main").unwrap();
        let found = Digest::sha256_hex(&"a".repeat(64)).unwrap();
        let e = WarmError::DigestMismatch {
            image: image.to_string(),
            expected: Digest::sha256_hex(&"b".repeat(64)).unwrap(),
            found: Some(found.clone()),
        };
        let r = warm_result(OrderId::parse("o1").unwrap(), &Err(e));
        let WarmOutcome::Failed {
            kind,
            found: f,
            message,
        } = r.outcome
        else {
            panic!("not a failure")
        };
        assert_eq!(kind, FailureKind::DigestMismatch);
        assert_eq!(f, Some(found));
        assert!(message.contains("registry.example/app:main"), "{message}");
    }

    #[test]
    fn the_hello_names_the_node_and_a_go_style_platform() {
        let h = hello(
            NodeName::parse("node-a").unwrap(),
            Runtime {
                name: "containerd".into(),
                version: "1.6".into(),
            },
        );
        assert_eq!(h.protocol_version, PROTOCOL_VERSION);
        assert!(!h.platform.architecture.contains("x86_64"));
        let wire = v1::AgentMessage::from(AgentMessage::Hello(h.clone()));
        assert_eq!(
            AgentMessage::try_from(wire).unwrap(),
            AgentMessage::Hello(h)
        );
    }
}
