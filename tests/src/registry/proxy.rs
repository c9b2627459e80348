//! The registry's front proxy: records, injects faults, shapes the link, serves `/token`
//! and Artifactory's repository-path form of the manifest API.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt, stream};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, BodyStream, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use super::token::{TokenIssuer, TokenServerAnswer};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub(super) type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// Largest piece of a response body sent in one go while the link is shaped.
const SHAPED_PIECE: usize = 64 * 1024;

/// One request as the proxy saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedRequest {
    pub method: String,
    /// Path without the query, e.g. `/v2/app/manifests/latest`.
    pub path: String,
    pub query: Option<String>,
    /// The status answered; `0` when the connection was closed without an answer
    /// ([`Fault::CloseConnection`], [`super::Registry::set_down`]).
    pub status: u16,
}

/// What an injected fault answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// `429 Too Many Requests` with `Retry-After: <secs>` and a registry error body.
    TooManyRequests { retry_after_secs: u64 },
    /// `429 Too Many Requests` with this `Retry-After` value as it is (an HTTP date, a
    /// number past `u64`, garbage); a value that cannot be a header is sent as `invalid`.
    TooManyRequestsWith { retry_after: String },
    /// Any status (e.g. 500, 503) with a registry error body.
    Status(u16),
    /// Close the connection without answering.
    CloseConnection,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum PathMatch {
    Exact(String),
    Prefix(String),
}

/// Which requests a [`Fault`] hits and how often. By default: every request, until
/// [`super::Registry::clear_faults`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FaultRule {
    fault: Fault,
    method: Option<String>,
    path: Option<PathMatch>,
    remaining: Option<usize>,
}

impl FaultRule {
    pub fn new(fault: Fault) -> Self {
        Self {
            fault,
            method: None,
            path: None,
            remaining: None,
        }
    }

    /// Only the next `n` matching requests.
    pub fn times(mut self, n: usize) -> Self {
        self.remaining = Some(n);
        self
    }

    /// Only requests with this method (`"HEAD"`, `"GET"`, ...).
    pub fn method(mut self, method: &str) -> Self {
        self.method = Some(method.to_string());
        self
    }

    /// Only requests with exactly this path (no query).
    pub fn path(mut self, path: &str) -> Self {
        self.path = Some(PathMatch::Exact(path.to_string()));
        self
    }

    /// Only requests whose path starts with this.
    pub fn path_prefix(mut self, prefix: &str) -> Self {
        self.path = Some(PathMatch::Prefix(prefix.to_string()));
        self
    }

    fn matches(&self, method: &str, path: &str) -> bool {
        self.remaining != Some(0)
            && self.method.as_deref().is_none_or(|m| m == method)
            && match &self.path {
                None => true,
                Some(PathMatch::Exact(p)) => p == path,
                Some(PathMatch::Prefix(p)) => path.starts_with(p.as_str()),
            }
    }
}

struct Link {
    bytes_per_sec: Option<u64>,
    latency: Duration,
    /// When the shaped link is free again (all reserved bytes sent).
    next_free: Instant,
}

/// What tests observe and steer through [`super::Registry`].
pub(super) struct ProxyState {
    log: Mutex<Vec<RecordedRequest>>,
    faults: Mutex<Vec<FaultRule>>,
    down: AtomicBool,
    link: Mutex<Link>,
    token_answer: Mutex<TokenServerAnswer>,
}

impl ProxyState {
    fn new() -> Self {
        Self {
            log: Mutex::new(Vec::new()),
            faults: Mutex::new(Vec::new()),
            down: AtomicBool::new(false),
            link: Mutex::new(Link {
                bytes_per_sec: None,
                latency: Duration::ZERO,
                next_free: Instant::now(),
            }),
            token_answer: Mutex::new(TokenServerAnswer::default()),
        }
    }

    pub(super) fn set_token_answer(&self, answer: TokenServerAnswer) {
        if let Ok(mut current) = self.token_answer.lock() {
            *current = answer;
        }
    }

    fn token_answer(&self) -> TokenServerAnswer {
        self.token_answer
            .lock()
            .map(|a| a.clone())
            .unwrap_or_default()
    }

    pub(super) fn requests(&self) -> Vec<RecordedRequest> {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    pub(super) fn reset_requests(&self) {
        if let Ok(mut log) = self.log.lock() {
            log.clear();
        }
    }

    fn record(&self, method: &str, path: &str, query: Option<&str>, status: u16) {
        if let Ok(mut log) = self.log.lock() {
            log.push(RecordedRequest {
                method: method.to_string(),
                path: path.to_string(),
                query: query.map(str::to_string),
                status,
            });
        }
    }

    pub(super) fn inject(&self, rule: FaultRule) {
        if let Ok(mut faults) = self.faults.lock() {
            faults.push(rule);
        }
    }

    pub(super) fn clear_faults(&self) {
        if let Ok(mut faults) = self.faults.lock() {
            faults.clear();
        }
    }

    /// The fault for this request, if a rule matches (counting it down).
    fn take_fault(&self, method: &str, path: &str) -> Option<Fault> {
        let mut faults = self.faults.lock().ok()?;
        let rule = faults.iter_mut().find(|r| r.matches(method, path))?;
        if let Some(n) = rule.remaining.as_mut() {
            *n -= 1;
        }
        Some(rule.fault.clone())
    }

    pub(super) fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    fn is_down(&self) -> bool {
        self.down.load(Ordering::SeqCst)
    }

    pub(super) fn set_bandwidth(&self, bytes_per_sec: Option<u64>) {
        if let Ok(mut link) = self.link.lock() {
            link.bytes_per_sec = bytes_per_sec.filter(|b| *b > 0);
            link.next_free = Instant::now();
        }
    }

    pub(super) fn set_latency(&self, latency: Duration) {
        if let Ok(mut link) = self.link.lock() {
            link.latency = latency;
        }
    }

    fn latency(&self) -> Duration {
        self.link
            .lock()
            .map(|l| l.latency)
            .unwrap_or(Duration::ZERO)
    }

    /// Reserves `bytes` on the shaped link; returns when they have been "sent".
    fn reserve(&self, bytes: usize) -> Option<Instant> {
        let mut link = self.link.lock().ok()?;
        let rate = link.bytes_per_sec?;
        let start = link.next_free.max(Instant::now());
        let secs = bytes as f64 / rate as f64;
        link.next_free = start + Duration::from_secs_f64(secs);
        Some(link.next_free)
    }
}

struct Shared {
    state: Arc<ProxyState>,
    backend: SocketAddr,
    client: Client<HttpConnector, Incoming>,
    token: Option<TokenIssuer>,
}

/// The running proxy; dropping it stops accepting and closes all its connections.
pub(super) struct Proxy {
    pub(super) state: Arc<ProxyState>,
    task: JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Proxy {
    pub(super) fn start(
        listener: std::net::TcpListener,
        backend: SocketAddr,
        tls: Option<Arc<rustls::ServerConfig>>,
        token: Option<TokenIssuer>,
    ) -> Result<Self> {
        listener
            .set_nonblocking(true)
            .context("setting the proxy listener non-blocking")?;
        let listener =
            tokio::net::TcpListener::from_std(listener).context("registering proxy listener")?;
        let state = Arc::new(ProxyState::new());
        let shared = Arc::new(Shared {
            state: state.clone(),
            backend,
            client: Client::builder(TokioExecutor::new()).build_http(),
            token,
        });
        let task = tokio::spawn(accept_loop(listener, tls.map(TlsAcceptor::from), shared));
        Ok(Self { state, task })
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
) {
    // Connections live in this set, so aborting the loop closes them all.
    let mut connections = JoinSet::new();
    loop {
        let accepted = listener.accept().await;
        while connections.try_join_next().is_some() {}
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if shared.state.is_down() {
            drop(tcp);
            continue;
        }
        let shared = shared.clone();
        let tls = tls.clone();
        connections.spawn(async move {
            let service = service_fn(move |req| handle(shared.clone(), req));
            let builder = auto::Builder::new(TokioExecutor::new());
            match tls {
                Some(acceptor) => {
                    if let Ok(stream) = acceptor.accept(tcp).await {
                        let _ = builder
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    }
                }
                None => {
                    let _ = builder.serve_connection(TokioIo::new(tcp), service).await;
                }
            }
        });
    }
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, BoxError> {
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let state = &shared.state;
    let record = |status: u16| state.record(&method, &path, query.as_deref(), status);

    if state.is_down() {
        record(0);
        return Err("registry is down (test bed)".into());
    }
    let latency = state.latency();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if let Some(fault) = state.take_fault(&method, &path) {
        let response = match fault {
            Fault::TooManyRequests { retry_after_secs } => {
                let mut response = error_response(
                    StatusCode::TOO_MANY_REQUESTS,
                    "TOOMANYREQUESTS",
                    "too many requests (injected by the test bed)",
                );
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
                response
            }
            Fault::TooManyRequestsWith { retry_after } => {
                let mut response = error_response(
                    StatusCode::TOO_MANY_REQUESTS,
                    "TOOMANYREQUESTS",
                    "too many requests (injected by the test bed)",
                );
                let value = HeaderValue::from_str(&retry_after)
                    .unwrap_or_else(|_| HeaderValue::from_static("invalid"));
                response.headers_mut().insert(header::RETRY_AFTER, value);
                response
            }
            Fault::Status(code) => error_response(
                StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                "UNKNOWN",
                "failure injected by the test bed",
            ),
            Fault::CloseConnection => {
                record(0);
                return Err("connection closed (injected by the test bed)".into());
            }
        };
        record(response.status().as_u16());
        return Ok(response);
    }

    if path == "/token"
        && let Some(token) = &shared.token
    {
        let response = token.handle(req, &state.token_answer()).await;
        record(response.status().as_u16());
        return Ok(response.map(|b| b.map_err(BoxError::from).boxed_unsync()));
    }

    let response = match forward(&shared, req).await {
        Ok(response) => response,
        Err(e) => error_response(
            StatusCode::BAD_GATEWAY,
            "UNKNOWN",
            &format!("test bed proxy: registry backend failed: {e}"),
        ),
    };
    record(response.status().as_u16());
    Ok(response)
}

async fn forward(shared: &Shared, req: Request<Incoming>) -> Result<Response<ProxyBody>> {
    let (mut parts, body) = req.into_parts();
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    // JFrog Artifactory's repository-path API (`/artifactory/api/docker/<key>/v2/<name>/
    // manifests/<tag>`) is served from the repository named by that whole path, which
    // distribution accepts: an image pushed as `artifactory/api/docker/<key>/v2/<name>`
    // is found only in that form.
    let artifactory = if path_and_query.starts_with("/artifactory/") {
        "/v2"
    } else {
        ""
    };
    parts.uri = format!("http://{}{artifactory}{path_and_query}", shared.backend)
        .parse()
        .context("building the backend URI")?;
    parts.version = http::Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    let response = shared
        .client
        .request(Request::from_parts(parts, body))
        .await
        .context("forwarding to docker-registry")?;
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Ok(Response::from_parts(
        parts,
        shaped(body, shared.state.clone()),
    ))
}

/// The response body, throttled by the link's bandwidth (if set) as it flows.
fn shaped(body: Incoming, state: Arc<ProxyState>) -> ProxyBody {
    let frames = TryStreamExt::map_err(BodyStream::new(body), BoxError::from)
        .flat_map(|frame| stream::iter(split_frame(frame)))
        .then(move |frame| {
            let state = state.clone();
            async move {
                if let Ok(frame) = &frame
                    && let Some(data) = frame.data_ref()
                    && let Some(until) = state.reserve(data.len())
                {
                    tokio::time::sleep_until(until).await;
                }
                frame
            }
        });
    StreamBody::new(frames).boxed_unsync()
}

type FrameResult = Result<Frame<Bytes>, BoxError>;

fn split_frame(frame: FrameResult) -> Vec<FrameResult> {
    match frame {
        Ok(frame) if frame.is_data() => match frame.into_data() {
            Ok(mut data) => {
                let mut pieces = Vec::with_capacity(data.len() / SHAPED_PIECE + 1);
                while data.len() > SHAPED_PIECE {
                    pieces.push(Ok(Frame::data(data.split_to(SHAPED_PIECE))));
                }
                pieces.push(Ok(Frame::data(data)));
                pieces
            }
            Err(frame) => vec![Ok(frame)],
        },
        other => vec![other],
    }
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::TE,
        header::UPGRADE,
        header::TRAILER,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

/// A response in the registry's error format
/// (`{"errors":[{"code":..,"message":..}]}`).
pub(super) fn error_response(status: StatusCode, code: &str, message: &str) -> Response<ProxyBody> {
    let body = serde_json::json!({"errors": [{"code": code, "message": message}]}).to_string();
    let mut response = Response::new(
        Full::new(Bytes::from(body))
            .map_err(BoxError::from)
            .boxed_unsync(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    response
}

/// Whether docker-registry answers `GET /v2/` on its backend port (any HTTP answer).
pub(super) async fn backend_answers(backend: SocketAddr) -> bool {
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let Ok(uri) = format!("http://{backend}/v2/").parse::<http::Uri>() else {
        return false;
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), client.get(uri)).await,
        Ok(Ok(_))
    )
}
