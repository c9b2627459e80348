//! The `warmroll.v1.Fleet` gRPC service: authenticates each agent session, checks its
//! hello, then applies its inventory and warm reports to the [`FleetView`].

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt as _};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::TlsConnectInfo;
use tonic::transport::{Identity as TlsIdentity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};
use warmroll_proto::fleet::{
    AgentMessage, CoordinatorMessage, Hello, MAX_MESSAGE_BYTES, NodeName, PROTOCOL_VERSION, Welcome,
};
use warmroll_proto::v1;
use warmroll_proto::v1::fleet_server::{Fleet, FleetServer};

use super::auth::{AuthError, Authenticator};
use super::conn::ConnInfo;
use super::limits::SessionLimits;
use super::receive::{Ending, Receiver};
use super::view::{FleetView, SessionEnd, SessionId, SessionTx, ViewError};

/// Messages queued per session towards its agent.
const OUTBOUND_QUEUE: usize = 64;
/// The HTTP/2 flow-control window of a session: what an agent may send before the
/// coordinator has read it. Small on purpose: what arrives ahead is buffered frame by
/// frame, and HTTP/2's read buffer and frame tables keep, for the connection's life, the
/// largest size they ever reach; four snapshot parts in flight keep them small, at the
/// price of a window update every two parts while a snapshot streams in.
const STREAM_WINDOW_BYTES: u32 = 2 * 1024;

/// Errors starting the fleet server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("reading the TLS {what} {path}: {source}")]
    ReadTls {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("configuring TLS: {0}")]
    ConfigureTls(tonic::transport::Error),
    #[error("serving the fleet API: {0}")]
    Serve(tonic::transport::Error),
}

/// Session settings.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Sent to agents in the welcome.
    pub heartbeat_interval: Duration,
    /// Sent to agents in the welcome.
    pub inventory_interval: Duration,
    /// The first message (hello) must arrive within this.
    pub hello_timeout: Duration,
    /// A session silent for this long (no heartbeat either) is ended.
    pub idle_timeout: Duration,
    /// Refuse tokens that name no node (every supported Kubernetes puts the node in
    /// pod-bound projected tokens).
    pub require_node_claim: bool,
    /// What one session may send.
    pub limits: SessionLimits,
    /// Connections open at once; more are closed as they arrive.
    pub max_connections: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            heartbeat_interval: Duration::from_secs(30),
            inventory_interval: Duration::from_secs(10),
            hello_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(95),
            require_node_claim: true,
            limits: SessionLimits::default(),
            max_connections: 20_000,
        }
    }
}

/// The TLS certificate chain and key files (PEM).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    fn load(&self) -> Result<ServerTlsConfig, ServeError> {
        let read = |what, path: &PathBuf| {
            std::fs::read(path).map_err(|source| ServeError::ReadTls {
                what,
                path: path.clone(),
                source,
            })
        };
        let cert = read("certificate", &self.cert)?;
        let key = read("key", &self.key)?;
        Ok(ServerTlsConfig::new().identity(TlsIdentity::from_pem(cert, key)))
    }
}

/// The service; clones share the view and the authenticator.
pub struct FleetService<A> {
    view: FleetView,
    auth: Arc<A>,
    config: Arc<SessionConfig>,
    gate: Option<watch::Receiver<bool>>,
}

impl<A> Clone for FleetService<A> {
    fn clone(&self) -> Self {
        FleetService {
            view: self.view.clone(),
            auth: self.auth.clone(),
            config: self.config.clone(),
            gate: self.gate.clone(),
        }
    }
}

/// The status for agents while the gate is closed: `unavailable`, which agents retry.
fn gate_closed() -> Status {
    Status::unavailable(
        "this coordinator is not serving agents (not the leader, or shutting down); retry",
    )
}

/// Completes once the gate is closed (or its sender is gone); never without a gate.
async fn gate_closes(gate: &mut Option<watch::Receiver<bool>>) {
    match gate {
        Some(gate) => {
            let _ = gate.wait_for(|open| !*open).await;
        }
        None => std::future::pending().await,
    }
}

impl<A: Authenticator> FleetService<A> {
    pub fn new(view: FleetView, auth: A, config: SessionConfig) -> Self {
        FleetService {
            view,
            auth: Arc::new(auth),
            config: Arc::new(config),
            gate: None,
        }
    }

    /// Serves agents only while `gate` reads `true` (the coordinator leads and is not
    /// shutting down): new sessions are refused with `unavailable` otherwise, and open
    /// sessions end with `unavailable` when it turns `false` (agents then reconnect,
    /// through the Service, to the replica that leads).
    pub fn with_gate(mut self, gate: watch::Receiver<bool>) -> Self {
        self.gate = Some(gate);
        self
    }

    /// The tonic service with explicit message size limits.
    pub fn into_server(self) -> FleetServer<Self> {
        FleetServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

/// Streams one connection may open at once: an agent uses one.
const STREAMS_PER_CONNECTION: u32 = 4;

/// Serves the fleet API on `listener` (over TLS when `tls` is given) until `shutdown`
/// completes: at most `max_connections` connections at once, each with a few streams.
pub async fn serve<A: Authenticator>(
    listener: TcpListener,
    tls: Option<&TlsFiles>,
    service: FleetService<A>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let max_connections = service.config.max_connections;
    let mut builder = Server::builder()
        .max_concurrent_streams(Some(STREAMS_PER_CONNECTION))
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .tcp_nodelay(true);
    if let Some(tls) = tls {
        builder = builder
            .tls_config(tls.load()?)
            .map_err(ServeError::ConfigureTls)?;
    }
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, tls = tls.is_some(), max_connections, "fleet API listening");
    }
    builder
        .add_service(service.into_server())
        .serve_with_incoming_shutdown(super::conn::incoming(listener, max_connections), shutdown)
        .await
        .map_err(ServeError::Serve)
}

fn bearer_token<T>(request: &Request<T>) -> Result<&str, Status> {
    let value = request
        .metadata()
        .get("authorization")
        .ok_or_else(|| Status::unauthenticated("no authorization metadata (Bearer <token>)"))?;
    let value = value
        .to_str()
        .map_err(|_| Status::unauthenticated("the authorization metadata is not text"))?;
    match value.strip_prefix("Bearer ") {
        Some(token) if !token.trim().is_empty() => Ok(token.trim()),
        _ => Err(Status::unauthenticated(
            "the authorization metadata is not Bearer <token>",
        )),
    }
}

fn auth_status(e: &AuthError) -> Status {
    match e {
        AuthError::Rejected(_) => Status::unauthenticated(e.to_string()),
        AuthError::NotAgent { .. } => Status::permission_denied(e.to_string()),
        AuthError::Review(_) | AuthError::Busy(_) => Status::unavailable(e.to_string()),
    }
}

/// The connection a request came on (with or without TLS).
fn connection<T>(request: &Request<T>) -> Option<ConnInfo> {
    let extensions = request.extensions();
    extensions
        .get::<TlsConnectInfo<ConnInfo>>()
        .map(|c| c.get_ref().clone())
        .or_else(|| extensions.get::<ConnInfo>().cloned())
}

/// The decision on a hello: the protocol version must match and, when the token is
/// bound to a node, the hello must name that node; a token bound to no node is refused
/// when `require_node_claim`.
pub fn check_hello(
    hello: &Hello,
    token_node: Option<&str>,
    require_node_claim: bool,
) -> Result<(), Status> {
    if hello.protocol_version != PROTOCOL_VERSION {
        return Err(Status::failed_precondition(format!(
            "hello.protocol_version: {} is not supported; this coordinator speaks {PROTOCOL_VERSION}",
            hello.protocol_version
        )));
    }
    match token_node {
        Some(bound) if bound != hello.node.as_str() => Err(Status::permission_denied(format!(
            "the token belongs to node {bound}, but the hello names node {}",
            hello.node
        ))),
        None if require_node_claim => Err(Status::permission_denied(format!(
            "the token names no node (no {} claim; use the chart's pod-bound projected token, or run the coordinator with --require-node-claim=false)",
            super::auth::NODE_NAME_EXTRA
        ))),
        _ => Ok(()),
    }
}

/// tonic reports a message above the decoding limit as `out_of_range`; gRPC's code for
/// "message larger than allowed" is `resource_exhausted`, which is what agents get.
fn oversize_as_resource_exhausted(status: Status) -> Status {
    if status.code() == tonic::Code::OutOfRange && status.message().contains("too large") {
        Status::resource_exhausted(format!(
            "agent message too large (the limit is {MAX_MESSAGE_BYTES} bytes): {}",
            status.message()
        ))
    } else {
        status
    }
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<v1::CoordinatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl<A: Authenticator> Fleet for FleetService<A> {
    type SessionStream = SessionStream;

    async fn session(
        &self,
        request: Request<Streaming<v1::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let conn = connection(&request);
        let peer = conn
            .as_ref()
            .and_then(|c| c.remote)
            .or_else(|| request.remote_addr());
        if self.gate.as_ref().is_some_and(|g| !*g.borrow()) {
            return Err(gate_closed());
        }
        let identity = {
            // Owned, so the request (not Sync) is not borrowed across the review.
            let token = bearer_token(&request)?.to_owned();
            self.auth.authenticate(&token).await.map_err(|e| {
                warn!(?peer, error = %e, "agent session refused");
                auth_status(&e)
            })?
        };
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(self.config.hello_timeout, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello within the hello timeout"))??
            .ok_or_else(|| Status::invalid_argument("the stream ended before the hello"))?;
        let hello = match AgentMessage::try_from(first) {
            Ok(AgentMessage::Hello(hello)) => hello,
            Ok(_) => {
                return Err(Status::invalid_argument(
                    "hello: the first message must be a hello",
                ));
            }
            Err(e) => return Err(Status::invalid_argument(e.to_string())),
        };
        if let Err(status) = check_hello(
            &hello,
            identity.node.as_deref(),
            self.config.require_node_claim,
        ) {
            warn!(?peer, node = %hello.node, error = status.message(), "agent session refused");
            return Err(status);
        }
        let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
        let welcome = CoordinatorMessage::Welcome(Welcome {
            protocol_version: PROTOCOL_VERSION,
            heartbeat_interval: self.config.heartbeat_interval,
            inventory_interval: self.config.inventory_interval,
        });
        // The queue is empty: this cannot fail for lack of room.
        let _ = tx.try_send(Box::new(Ok(welcome.into())));
        let node = hello.node.clone();
        info!(
            node = %node,
            platform = %hello.platform,
            runtime = %hello.runtime.name,
            agent = %hello.agent_version,
            bound = identity.node.is_some(),
            "agent connected"
        );
        let kill = conn.map(|c| c.kill);
        let session = self
            .view
            .connect(hello, identity.node.is_some(), tx.clone(), kill)
            .map_err(|e| {
                warn!(?peer, node = %node, error = %e, "agent session refused");
                match e {
                    ViewError::VerifiedNodeTaken(_) => Status::permission_denied(e.to_string()),
                    _ => Status::unavailable(e.to_string()),
                }
            })?;
        // No span per session: thousands of long-lived spans cost kilobytes each in the
        // subscriber; the session's few log lines name the node themselves.
        tokio::spawn(run_session(
            self.view.clone(),
            self.config.clone(),
            self.gate.clone(),
            node,
            session,
            inbound,
            tx,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx).map(|m| *m))))
    }
}

/// Applies one session's messages until it ends, then hands the node to the grace timer.
async fn run_session(
    view: FleetView,
    config: Arc<SessionConfig>,
    mut gate: Option<watch::Receiver<bool>>,
    node: NodeName,
    session: SessionId,
    mut inbound: Streaming<v1::AgentMessage>,
    tx: SessionTx,
) {
    let mut receiver = Receiver::new(node.clone(), session, &config.limits, Instant::now());
    let end: Option<Ending> = loop {
        let next = tokio::select! {
            next = tokio::time::timeout(config.idle_timeout, inbound.message()) => next,
            () = gate_closes(&mut gate) => break Some(Ending::quietly(gate_closed())),
        };
        let message = match next {
            Err(_) => {
                break Some(Ending::by(
                    SessionEnd::Idle,
                    Status::deadline_exceeded(format!(
                        "no message (not even a heartbeat) for {:?}",
                        config.idle_timeout
                    )),
                ));
            }
            Ok(Ok(Some(m))) => m,
            Ok(Ok(None)) => break None,
            // Oversized or undecodable messages land here (tonic's status says which);
            // so does a connection the view closed.
            Ok(Err(status)) => {
                debug!(node = %node, session, error = %status, "session stream failed");
                break Some(Ending::quietly(oversize_as_resource_exhausted(status)));
            }
        };
        match receiver.receive(&view, &config.limits, message, Instant::now()) {
            Ok(None) => {}
            Ok(Some(resync)) => {
                // Never wait on the agent: a full queue means it does not read.
                if tx.try_send(Box::new(Ok(resync.into()))).is_err() {
                    break Some(Ending::by(
                        SessionEnd::Stalled,
                        Status::resource_exhausted("the agent does not read its stream"),
                    ));
                }
            }
            Err(ending) => break Some(ending),
        }
    };
    match end {
        Some(Ending {
            status,
            reason: Some(reason),
        }) => {
            let why = status.message().to_owned();
            // Tell the agent why (best effort: it may be gone, or not reading), then
            // close its connection if it does not take that.
            if tx.try_send(Box::new(Err(status))).is_err() {
                view.end_session(&node, session, reason, &why);
            } else {
                warn!(node = %node, session, reason = reason.label(), why, "agent session ended by the coordinator");
                view.count_closed(reason);
            }
        }
        Some(Ending {
            status,
            reason: None,
        }) => {
            let _ = tx.try_send(Box::new(Err(status)));
        }
        None => {}
    }
    drop(tx);
    view.disconnect(&node, session);
}

#[cfg(test)]
mod tests {
    use warmroll_proto::fleet::Runtime;
    use warmroll_proto::image::Platform;

    use super::*;

    fn hello(node: &str, version: u32) -> Hello {
        Hello {
            node: NodeName::parse(node).unwrap(),
            platform: Platform::parse("linux/amd64").unwrap(),
            runtime: Runtime {
                name: "containerd".into(),
                version: "1.6".into(),
            },
            agent_version: "0.1.0".into(),
            protocol_version: version,
        }
    }

    #[test]
    fn hello_must_name_the_tokens_node_and_speak_v1() {
        assert!(check_hello(&hello("node-a", 1), Some("node-a"), true).is_ok());
        assert!(check_hello(&hello("node-a", 1), None, false).is_ok());
        let e = check_hello(&hello("node-a", 1), None, true).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("names no node"), "{}", e.message());
        let e = check_hello(&hello("node-b", 1), Some("node-a"), true).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(
            e.message().contains("node-a") && e.message().contains("node-b"),
            "{}",
            e.message()
        );
        let e = check_hello(&hello("node-a", 2), Some("node-a"), true).unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    }

    #[test]
    fn bearer_tokens_are_required() {
        let mut r = Request::new(());
        assert_eq!(
            bearer_token(&r).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        r.metadata_mut()
            .insert("authorization", "Basic abc".parse().unwrap());
        assert_eq!(
            bearer_token(&r).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        r.metadata_mut()
            .insert("authorization", "Bearer tok".parse().unwrap());
        assert_eq!(bearer_token(&r).unwrap(), "tok");
    }
}
