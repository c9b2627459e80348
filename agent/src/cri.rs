//! The connection to the node's container runtime through its CRI v1 socket.
//!
//! [`Cri`] is the small trait the inventory and warm-up logic use; [`CriClient`] is the real
//! implementation over a unix socket (tonic + the `k8s-cri` generated clients). The client
//! reconnects by itself: a transport failure drops the channel and the next call dials
//! again, so a restarted runtime is picked up without restarting the agent. Callers that
//! loop (the inventory loop) pace their retries with [`Backoff`].

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    AuthConfig, Container, ContainerEventResponse, ContainerFilter, ContainerState,
    ContainerStateValue, ContainerStatus, ContainerStatusRequest, FilesystemUsage,
    GetEventsRequest, Image, ImageFsInfoRequest, ImageSpec, ImageStatusRequest,
    ListContainersRequest, ListImagesRequest, ListPodSandboxRequest, PodSandbox, PullImageRequest,
    VersionRequest, VersionResponse,
};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, info, instrument, warn};

use crate::metrics::{Health, Metrics};

/// The sockets tried, in order, when no `--cri-socket` is given.
pub const DEFAULT_SOCKETS: &[&str] = &[
    "/run/containerd/containerd.sock",
    "/var/run/containerd/containerd.sock",
    "/run/k3s/containerd/containerd.sock",
    "/var/snap/microk8s/common/run/containerd.sock",
    "/var/run/crio/crio.sock",
    "/run/crio/crio.sock",
    "/var/run/cri-dockerd.sock",
    "/run/cri-dockerd.sock",
];

/// Timeout for the quick CRI calls (lists, statuses, version).
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// A failed CRI operation.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CriError {
    #[error("cannot connect to the CRI socket {socket}: {message}")]
    Connect { socket: PathBuf, message: String },
    #[error("CRI {op} failed ({code:?}): {message}")]
    Call {
        op: &'static str,
        code: tonic::Code,
        message: String,
    },
    #[error("CRI {op} got no answer within {after:?}")]
    Timeout { op: &'static str, after: Duration },
    #[error("the runtime at {socket} does not serve CRI v1 (runtime.v1.RuntimeService): {message}")]
    NotCriV1 { socket: PathBuf, message: String },
    #[error("no CRI socket found; tried: {tried}")]
    Discover { tried: String },
}

impl CriError {
    /// The gRPC status code, when the runtime answered with one.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            CriError::Call { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The runtime could not be reached at all (socket gone, runtime restarting).
    pub fn is_unreachable(&self) -> bool {
        match self {
            CriError::Connect { .. } | CriError::Timeout { .. } | CriError::Discover { .. } => true,
            CriError::Call { code, .. } => matches!(code, tonic::Code::Unavailable),
            CriError::NotCriV1 { .. } => false,
        }
    }
}

/// A stream of container events from `GetContainerEvents`.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<ContainerEventResponse, CriError>> + Send>>;

/// The CRI calls warmroll makes. Implemented by [`CriClient`] and by test fakes.
pub trait Cri: Send + Sync + 'static {
    fn version(&self) -> impl Future<Output = Result<VersionResponse, CriError>> + Send;
    /// All pod sandboxes (any state).
    fn list_pod_sandboxes(&self) -> impl Future<Output = Result<Vec<PodSandbox>, CriError>> + Send;
    /// Running containers only.
    fn list_running_containers(
        &self,
    ) -> impl Future<Output = Result<Vec<Container>, CriError>> + Send;
    /// One container by id, `Ok(None)` when it is not running (or unknown).
    fn running_container(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<Container>, CriError>> + Send;
    fn container_status(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<ContainerStatus, CriError>> + Send;
    fn list_images(&self) -> impl Future<Output = Result<Vec<Image>, CriError>> + Send;
    /// `Ok(None)` when the image is not present on the node.
    fn image_status(
        &self,
        image: &str,
    ) -> impl Future<Output = Result<Option<Image>, CriError>> + Send;
    /// Pull `image`; returns the image reference the runtime reports (containerd: config id).
    fn pull_image(
        &self,
        image: &str,
        auth: Option<AuthConfig>,
    ) -> impl Future<Output = Result<String, CriError>> + Send;
    fn image_fs_info(&self) -> impl Future<Output = Result<Vec<FilesystemUsage>, CriError>> + Send;
    fn container_events(&self) -> impl Future<Output = Result<EventStream, CriError>> + Send;
}

#[derive(Clone)]
struct Clients {
    runtime: RuntimeServiceClient<Channel>,
    image: ImageServiceClient<Channel>,
}

/// The real CRI client over a unix socket. Cheap to share behind an `Arc`.
pub struct CriClient {
    socket: PathBuf,
    clients: Mutex<Option<Clients>>,
    metrics: Metrics,
    health: Arc<Health>,
}

impl std::fmt::Debug for CriClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CriClient")
            .field("socket", &self.socket)
            .finish()
    }
}

async fn dial(socket: &Path) -> Result<Channel, CriError> {
    let path = socket.to_path_buf();
    Endpoint::from_static("http://[::]:50051")
        .connect_timeout(CONNECT_TIMEOUT)
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .map_err(|e| CriError::Connect {
            socket: socket.to_path_buf(),
            message: error_chain(&e),
        })
}

/// An error with its sources, joined by `: `.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

impl CriClient {
    /// A client for `socket`; nothing is dialled until the first call.
    pub fn new(socket: impl Into<PathBuf>, metrics: Metrics, health: Arc<Health>) -> Self {
        CriClient {
            socket: socket.into(),
            clients: Mutex::new(None),
            metrics,
            health,
        }
    }

    /// The socket this client dials.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn clients(&self) -> Result<Clients, CriError> {
        if let Some(c) = self.lock().as_ref() {
            return Ok(c.clone());
        }
        let channel = dial(&self.socket).await?;
        debug!(socket = %self.socket.display(), "connected to the CRI socket");
        let clients = Clients {
            runtime: RuntimeServiceClient::new(channel.clone())
                .max_decoding_message_size(64 * 1024 * 1024),
            image: ImageServiceClient::new(channel).max_decoding_message_size(64 * 1024 * 1024),
        };
        *self.lock() = Some(clients.clone());
        Ok(clients)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Clients>> {
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Run one call with a timeout, record errors and reachability, and drop the channel
    /// when the runtime went away so the next call dials again.
    async fn call<T, F, Fut>(
        &self,
        op: &'static str,
        timeout: Duration,
        f: F,
    ) -> Result<T, CriError>
    where
        F: FnOnce(Clients) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let result = match self.clients().await {
            Err(e) => Err(e),
            Ok(clients) => match tokio::time::timeout(timeout, f(clients)).await {
                Err(_) => Err(CriError::Timeout { op, after: timeout }),
                Ok(Err(status)) => Err(CriError::Call {
                    op,
                    code: status.code(),
                    message: status.message().to_string(),
                }),
                Ok(Ok(resp)) => Ok(resp.into_inner()),
            },
        };
        match &result {
            Ok(_) => self.health.cri_ok(),
            // The runtime answered: it is reachable even though the call failed.
            Err(CriError::Call { code, .. }) if *code != tonic::Code::Unavailable => {
                self.health.cri_ok();
                self.metrics.cri_error(op);
            }
            Err(e) => {
                self.metrics.cri_error(op);
                if e.is_unreachable() {
                    *self.lock() = None;
                }
            }
        }
        result
    }

    /// Running containers, all of them or (with a non-empty `id`) that one.
    async fn list_running(&self, id: String) -> Result<Vec<Container>, CriError> {
        let filter = ContainerFilter {
            id,
            state: Some(ContainerStateValue {
                state: ContainerState::ContainerRunning as i32,
            }),
            ..Default::default()
        };
        self.call("ListContainers", CALL_TIMEOUT, |mut c| async move {
            c.runtime
                .list_containers(ListContainersRequest {
                    filter: Some(filter),
                })
                .await
        })
        .await
        .map(|r| r.containers)
    }
}

impl Cri for CriClient {
    #[instrument(skip(self), fields(socket = %self.socket.display()))]
    async fn version(&self) -> Result<VersionResponse, CriError> {
        let result = self
            .call("Version", CALL_TIMEOUT, |mut c| async move {
                c.runtime
                    .version(VersionRequest {
                        version: "v1".into(),
                    })
                    .await
            })
            .await;
        match result {
            Err(CriError::Call {
                code: tonic::Code::Unimplemented,
                message,
                ..
            }) => Err(CriError::NotCriV1 {
                socket: self.socket.clone(),
                message,
            }),
            other => other,
        }
    }

    #[instrument(skip(self))]
    async fn list_pod_sandboxes(&self) -> Result<Vec<PodSandbox>, CriError> {
        self.call("ListPodSandbox", CALL_TIMEOUT, |mut c| async move {
            c.runtime
                .list_pod_sandbox(ListPodSandboxRequest { filter: None })
                .await
        })
        .await
        .map(|r| r.items)
    }

    #[instrument(skip(self))]
    async fn list_running_containers(&self) -> Result<Vec<Container>, CriError> {
        self.list_running(String::new()).await
    }

    #[instrument(skip(self))]
    async fn running_container(&self, id: &str) -> Result<Option<Container>, CriError> {
        let running = self.list_running(id.to_string()).await?;
        Ok(running.into_iter().find(|c| c.id == id))
    }

    #[instrument(skip(self))]
    async fn container_status(&self, id: &str) -> Result<ContainerStatus, CriError> {
        let container_id = id.to_string();
        let resp = self
            .call("ContainerStatus", CALL_TIMEOUT, |mut c| async move {
                c.runtime
                    .container_status(ContainerStatusRequest {
                        container_id,
                        verbose: false,
                    })
                    .await
            })
            .await?;
        resp.status.ok_or_else(|| CriError::Call {
            op: "ContainerStatus",
            code: tonic::Code::Internal,
            message: format!("the runtime returned no status for container {id}"),
        })
    }

    #[instrument(skip(self))]
    async fn list_images(&self) -> Result<Vec<Image>, CriError> {
        self.call("ListImages", CALL_TIMEOUT, |mut c| async move {
            c.image
                .list_images(ListImagesRequest { filter: None })
                .await
        })
        .await
        .map(|r| r.images)
    }

    #[instrument(skip(self))]
    async fn image_status(&self, image: &str) -> Result<Option<Image>, CriError> {
        let spec = image_spec(image);
        self.call("ImageStatus", CALL_TIMEOUT, |mut c| async move {
            c.image
                .image_status(ImageStatusRequest {
                    image: Some(spec),
                    verbose: false,
                })
                .await
        })
        .await
        .map(|r| r.image)
    }

    // `auth` is skipped: it carries the pull credentials.
    #[instrument(skip(self, auth), fields(authenticated = auth.is_some()))]
    async fn pull_image(&self, image: &str, auth: Option<AuthConfig>) -> Result<String, CriError> {
        let spec = image_spec(image);
        // The caller bounds the pull with its own deadline; this only stops a hung socket.
        self.call(
            "PullImage",
            Duration::from_secs(24 * 3600),
            |mut c| async move {
                c.image
                    .pull_image(PullImageRequest {
                        image: Some(spec),
                        auth,
                        sandbox_config: None,
                    })
                    .await
            },
        )
        .await
        .map(|r| r.image_ref)
    }

    #[instrument(skip(self))]
    async fn image_fs_info(&self) -> Result<Vec<FilesystemUsage>, CriError> {
        self.call("ImageFsInfo", CALL_TIMEOUT, |mut c| async move {
            c.image.image_fs_info(ImageFsInfoRequest {}).await
        })
        .await
        .map(|r| r.image_filesystems)
    }

    #[instrument(skip(self))]
    async fn container_events(&self) -> Result<EventStream, CriError> {
        let stream = self
            .call("GetContainerEvents", CALL_TIMEOUT, |mut c| async move {
                c.runtime.get_container_events(GetEventsRequest {}).await
            })
            .await?;
        Ok(Box::pin(stream.map(|item| {
            item.map_err(|status| CriError::Call {
                op: "GetContainerEvents",
                code: status.code(),
                message: status.message().to_string(),
            })
        })))
    }
}

fn image_spec(image: &str) -> ImageSpec {
    ImageSpec {
        image: image.to_string(),
        ..Default::default()
    }
}

/// Find the runtime: the explicit socket if given (it must answer CRI v1), else the first
/// of [`DEFAULT_SOCKETS`] that exists and answers `Version` on CRI v1.
#[instrument(skip(metrics, health))]
pub async fn connect(
    explicit: Option<&Path>,
    metrics: Metrics,
    health: Arc<Health>,
) -> Result<(CriClient, VersionResponse), CriError> {
    let candidates: Vec<PathBuf> = match explicit {
        Some(p) => vec![p.to_path_buf()],
        None => DEFAULT_SOCKETS.iter().map(PathBuf::from).collect(),
    };
    let mut tried = Vec::new();
    for socket in candidates {
        if explicit.is_none() && !socket.exists() {
            tried.push(format!("{} (absent)", socket.display()));
            continue;
        }
        let client = CriClient::new(&socket, metrics.clone(), health.clone());
        match client.version().await {
            Ok(v) => {
                info!(
                    socket = %socket.display(),
                    runtime = %v.runtime_name,
                    runtime_version = %v.runtime_version,
                    api = %v.runtime_api_version,
                    "connected to the container runtime"
                );
                return Ok((client, v));
            }
            Err(e) if explicit.is_some() => return Err(e),
            Err(e) => {
                warn!(socket = %socket.display(), error = %e, "CRI socket candidate rejected");
                tried.push(format!("{} ({e})", socket.display()));
            }
        }
    }
    Err(CriError::Discover {
        tried: tried.join("; "),
    })
}

/// Exponential backoff with jitter, capped: attempt `n` waits a random time in
/// `[d/2, d]` where `d = min(cap, base * 2^n)`.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Backoff {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The delay before the next retry; grows with each call until [`Backoff::reset`].
    pub fn next_delay(&mut self) -> Duration {
        let d = backoff_ceiling(self.base, self.cap, self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        jitter(d, rand::random::<f64>())
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// `min(cap, base * 2^attempt)`, without overflow.
pub fn backoff_ceiling(base: Duration, cap: Duration, attempt: u32) -> Duration {
    let factor = 2u32.checked_pow(attempt.min(31)).unwrap_or(u32::MAX);
    base.checked_mul(factor).unwrap_or(cap).min(cap)
}

/// `d` scaled into `[d/2, d]` by `r` in `[0, 1)`.
fn jitter(d: Duration, r: f64) -> Duration {
    d.mul_f64(0.5 + 0.5 * r.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(5);
        assert_eq!(backoff_ceiling(base, cap, 0), base);
        assert_eq!(backoff_ceiling(base, cap, 3), Duration::from_millis(800));
        assert_eq!(backoff_ceiling(base, cap, 10), cap);
        assert_eq!(backoff_ceiling(base, cap, u32::MAX), cap);
    }

    #[test]
    fn jitter_stays_between_half_and_full() {
        let d = Duration::from_secs(2);
        assert_eq!(jitter(d, 0.0), Duration::from_secs(1));
        assert_eq!(jitter(d, 1.0), d);
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        for _ in 0..20 {
            let x = b.next_delay();
            assert!(
                x >= Duration::from_millis(50) && x <= Duration::from_secs(1),
                "{x:?}"
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn unreachable_errors_are_told_apart_from_answers() {
        let gone = CriError::Call {
            op: "ListContainers",
            code: tonic::Code::Unavailable,
            message: "transport error".into(),
        };
        let answered = CriError::Call {
            op: "PullImage",
            code: tonic::Code::NotFound,
            message: "not found".into(),
        };
        assert!(gone.is_unreachable());
        assert!(!answered.is_unreachable());
        assert!(
            CriError::Connect {
                socket: "/x".into(),
                message: "no such file".into()
            }
            .is_unreachable()
        );
    }

    #[tokio::test]
    async fn connecting_to_a_missing_socket_is_a_clear_error() {
        let metrics = Metrics::new();
        let health = Arc::new(Health::default());
        let err = connect(
            Some(Path::new("/nonexistent/warmroll.sock")),
            metrics,
            health,
        )
        .await
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("/nonexistent/warmroll.sock"), "{text}");
        assert!(err.is_unreachable());
    }
}
