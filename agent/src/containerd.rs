//! containerd's own API, on the same socket as its CRI plugin, where the runtime is
//! containerd: its event stream keeps the inventory current at once (CRI is polled only as
//! a safety net), and its content store shows a pull's progress byte by byte.
//!
//! [`ContainerdApi::detect`] opens the API when CRI `Version` names containerd and the
//! API answers; everywhere else the agent works through CRI alone.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use containerd_client::events::{
    ContainerCreate, ContainerDelete, ContainerUpdate, TaskCreate, TaskDelete, TaskExit, TaskStart,
};
use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::events_client::EventsClient;
use containerd_client::services::v1::version_client::VersionClient;
// The image events live in the images service's package.
use containerd_client::services::v1::{
    ImageCreate, ImageDelete, ImageUpdate, InfoRequest, ListStatusesRequest, ReadContentRequest,
    SubscribeRequest,
};
use futures::future::BoxFuture;
use futures::{FutureExt, Stream};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::VersionResponse;
use prost::Message;
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, info, instrument};

/// The containerd namespace the CRI plugin keeps Kubernetes' containers and images in.
pub const NAMESPACE: &str = "k8s.io";

const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Manifests and indexes are small; anything bigger is not one.
const MAX_MANIFEST_BYTES: u64 = 4 * 1024 * 1024;

/// A failed containerd API operation.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ContainerdError {
    #[error("cannot open containerd's API on {socket}: {message}")]
    Connect { socket: PathBuf, message: String },
    #[error("containerd {op} failed ({code:?}): {message}")]
    Call {
        op: &'static str,
        code: tonic::Code,
        message: String,
    },
    #[error("containerd {op} got no answer within {after:?}")]
    Timeout { op: &'static str, after: Duration },
}

/// What an event says about the inventory: which item to re-read through CRI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuntimeEvent {
    /// A container (or pod sandbox) was created, started, stopped or removed.
    /// `running` is what the event implies: started (true) or exited/deleted (false);
    /// `None` when it implies neither (created, updated).
    Container { id: String, running: Option<bool> },
    /// An image name (tag, digest reference or id) was created, moved or deleted.
    Image { name: String },
}

/// The event topics the inventory follows.
const TOPICS: &[&str] = &[
    "/containers/create",
    "/containers/update",
    "/containers/delete",
    "/tasks/create",
    "/tasks/start",
    "/tasks/exit",
    "/tasks/delete",
    "/images/create",
    "/images/update",
    "/images/delete",
];

/// The `Subscribe` filters: the followed topics in the `k8s.io` namespace (filters are
/// OR-ed; the conditions inside one are AND-ed).
pub fn subscribe_filters() -> Vec<String> {
    TOPICS
        .iter()
        .map(|t| format!("namespace=={NAMESPACE},topic==\"{t}\""))
        .collect()
}

/// Decode one event envelope into what it means for the inventory (pure). Events of
/// other namespaces or topics, and payloads that do not decode, give `None`.
pub fn decode_event(namespace: &str, topic: &str, payload: &[u8]) -> Option<RuntimeEvent> {
    if namespace != NAMESPACE {
        return None;
    }
    let container = |id: String, running: Option<bool>| {
        (!id.is_empty()).then_some(RuntimeEvent::Container { id, running })
    };
    let image = |name: String| (!name.is_empty()).then_some(RuntimeEvent::Image { name });
    match topic {
        "/containers/create" => container(ContainerCreate::decode(payload).ok()?.id, None),
        "/containers/update" => container(ContainerUpdate::decode(payload).ok()?.id, None),
        "/containers/delete" => container(ContainerDelete::decode(payload).ok()?.id, Some(false)),
        "/tasks/create" => container(TaskCreate::decode(payload).ok()?.container_id, None),
        "/tasks/start" => container(TaskStart::decode(payload).ok()?.container_id, Some(true)),
        "/tasks/exit" => {
            let exit = TaskExit::decode(payload).ok()?;
            // An exec's exit (id != container id) leaves the container running.
            if !exit.id.is_empty() && exit.id != exit.container_id {
                return None;
            }
            container(exit.container_id, Some(false))
        }
        "/tasks/delete" => {
            let delete = TaskDelete::decode(payload).ok()?;
            if !delete.id.is_empty() && delete.id != delete.container_id {
                return None;
            }
            container(delete.container_id, Some(false))
        }
        "/images/create" => image(ImageCreate::decode(payload).ok()?.name),
        "/images/update" => image(ImageUpdate::decode(payload).ok()?.name),
        "/images/delete" => image(ImageDelete::decode(payload).ok()?.name),
        _ => None,
    }
}

/// A stream of inventory-relevant events; it ends (or yields an error) when containerd
/// goes away.
pub type RuntimeEvents = Pin<Box<dyn Stream<Item = Result<RuntimeEvent, ContainerdError>> + Send>>;

/// Where runtime events come from (containerd, or a test double).
pub trait EventSource: Send + Sync + 'static {
    fn subscribe(&self) -> BoxFuture<'_, Result<RuntimeEvents, ContainerdError>>;
}

/// One active ingest of the content store (a blob being downloaded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ingest {
    /// containerd's ingest ref; CRI pulls use `…layer-sha256:<hex>` and the like.
    pub reference: String,
    pub offset: u64,
    pub total: u64,
}

/// The content store calls pull progress needs (containerd, or a test double).
pub trait ContentStore: Send + Sync + 'static {
    /// The active ingests in the `k8s.io` namespace.
    fn ingests(&self) -> BoxFuture<'_, Result<Vec<Ingest>, ContainerdError>>;
    /// The size of a committed blob, `None` when the store does not hold it (yet).
    fn blob_size<'a>(
        &'a self,
        digest: &'a str,
    ) -> BoxFuture<'a, Result<Option<u64>, ContainerdError>>;
    /// A small committed blob (a manifest or index), `None` when not held (yet).
    fn read_small_blob<'a>(
        &'a self,
        digest: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, ContainerdError>>;
}

/// containerd's API over its unix socket. The channel reconnects by itself after a
/// containerd restart.
#[derive(Clone)]
pub struct ContainerdApi {
    socket: PathBuf,
    channel: Channel,
}

impl std::fmt::Debug for ContainerdApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContainerdApi")
            .field("socket", &self.socket)
            .finish()
    }
}

fn call_error(op: &'static str) -> impl Fn(tonic::Status) -> ContainerdError {
    move |status| ContainerdError::Call {
        op,
        code: status.code(),
        message: status.message().to_string(),
    }
}

fn namespaced<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "containerd-namespace",
        tonic::metadata::MetadataValue::from_static(NAMESPACE),
    );
    request
}

async fn timed<T>(
    op: &'static str,
    f: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, ContainerdError> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Err(_) => Err(ContainerdError::Timeout {
            op,
            after: CALL_TIMEOUT,
        }),
        Ok(r) => r.map(tonic::Response::into_inner).map_err(call_error(op)),
    }
}

impl ContainerdApi {
    /// Opens containerd's API when the CRI runtime is containerd and the API answers on
    /// the same socket; otherwise logs once why the agent works through CRI alone.
    #[instrument(skip(version), fields(runtime = %version.runtime_name))]
    pub async fn detect(socket: &Path, version: &VersionResponse) -> Option<ContainerdApi> {
        if version.runtime_name != "containerd" {
            info!(
                runtime = %version.runtime_name,
                "the runtime is not containerd: inventory through CRI polling alone, no pull progress"
            );
            return None;
        }
        match ContainerdApi::open(socket).await {
            Ok((api, v)) => {
                info!(socket = %socket.display(), version = %v, namespace = NAMESPACE,
                    "containerd API open: instant inventory from its events, pull progress from its content store");
                Some(api)
            }
            Err(e) => {
                info!(error = %e,
                    "containerd's API is unavailable: inventory through CRI polling alone, no pull progress");
                None
            }
        }
    }

    /// Connects and checks the API answers `Version`; returns containerd's version.
    pub async fn open(socket: &Path) -> Result<(ContainerdApi, String), ContainerdError> {
        let path = socket.to_path_buf();
        let connect_error = |message: String| ContainerdError::Connect {
            socket: socket.to_path_buf(),
            message,
        };
        let channel =
            Endpoint::from_static("http://[::]:50051")
                .connect_timeout(Duration::from_secs(3))
                .connect_with_connector(tower::service_fn(move |_| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?))
                    }
                }))
                .await
                .map_err(|e| connect_error(crate::cri::error_chain(&e)))?;
        let api = ContainerdApi {
            socket: socket.to_path_buf(),
            channel,
        };
        let version = timed(
            "Version",
            VersionClient::new(api.channel.clone()).version(()),
        )
        .await?;
        Ok((api, version.version))
    }
}

impl EventSource for ContainerdApi {
    /// Returns at once: containerd answers `Subscribe` only with its first event, so the
    /// call runs in a task that forwards the events (and ends with the stream).
    fn subscribe(&self) -> BoxFuture<'_, Result<RuntimeEvents, ContainerdError>> {
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        tokio::spawn(forward_events(self.channel.clone(), tx));
        futures::future::ready(Ok(Box::pin(ReceiverStream::new(rx)) as RuntimeEvents)).boxed()
    }
}

/// Events buffered between containerd and the inventory loop.
const EVENT_QUEUE: usize = 256;

/// Subscribes and forwards the decoded events to `tx` until the stream ends, fails (the
/// error is forwarded) or the receiver is dropped.
async fn forward_events(channel: Channel, tx: mpsc::Sender<Result<RuntimeEvent, ContainerdError>>) {
    let fail = |status| Err(call_error("Subscribe")(status));
    let mut client = EventsClient::new(channel);
    let request = SubscribeRequest {
        filters: subscribe_filters(),
    };
    let subscribed = tokio::select! {
        r = client.subscribe(request) => r,
        () = tx.closed() => return,
    };
    let mut stream = match subscribed {
        Ok(r) => r.into_inner(),
        Err(status) => {
            let _ = tx.send(fail(status)).await;
            return;
        }
    };
    debug!("subscribed to containerd events");
    loop {
        let item = tokio::select! {
            m = stream.message() => m,
            () = tx.closed() => return,
        };
        match item {
            Ok(Some(envelope)) => {
                let payload = envelope.event.as_ref().map_or(&[][..], |a| &a.value[..]);
                if let Some(event) = decode_event(&envelope.namespace, &envelope.topic, payload)
                    && tx.send(Ok(event)).await.is_err()
                {
                    return;
                }
            }
            Ok(None) => return,
            Err(status) => {
                let _ = tx.send(fail(status)).await;
                return;
            }
        }
    }
}

impl ContentStore for ContainerdApi {
    fn ingests(&self) -> BoxFuture<'_, Result<Vec<Ingest>, ContainerdError>> {
        async move {
            let mut client = ContentClient::new(self.channel.clone());
            let answer = timed(
                "ListStatuses",
                client.list_statuses(namespaced(ListStatusesRequest { filters: vec![] })),
            )
            .await?;
            Ok(answer
                .statuses
                .into_iter()
                .map(|s| Ingest {
                    reference: s.r#ref,
                    offset: u64::try_from(s.offset).unwrap_or(0),
                    total: u64::try_from(s.total).unwrap_or(0),
                })
                .collect())
        }
        .boxed()
    }

    fn blob_size<'a>(
        &'a self,
        digest: &'a str,
    ) -> BoxFuture<'a, Result<Option<u64>, ContainerdError>> {
        async move {
            let mut client = ContentClient::new(self.channel.clone());
            let request = namespaced(InfoRequest {
                digest: digest.to_string(),
            });
            match timed("Info", client.info(request)).await {
                Ok(answer) => Ok(answer.info.map(|i| u64::try_from(i.size).unwrap_or(0))),
                Err(ContainerdError::Call {
                    code: tonic::Code::NotFound,
                    ..
                }) => Ok(None),
                Err(e) => Err(e),
            }
        }
        .boxed()
    }

    fn read_small_blob<'a>(
        &'a self,
        digest: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, ContainerdError>> {
        async move {
            let Some(size) = self.blob_size(digest).await? else {
                return Ok(None);
            };
            if size > MAX_MANIFEST_BYTES {
                return Ok(None);
            }
            let mut client = ContentClient::new(self.channel.clone());
            let request = namespaced(ReadContentRequest {
                digest: digest.to_string(),
                offset: 0,
                size: 0,
            });
            let read = async {
                let mut stream = match client.read(request).await {
                    Ok(r) => r.into_inner(),
                    Err(s) if s.code() == tonic::Code::NotFound => return Ok(None),
                    Err(s) => return Err(call_error("Read")(s)),
                };
                let mut out = Vec::new();
                while let Some(chunk) = stream.message().await.map_err(call_error("Read"))? {
                    out.extend_from_slice(&chunk.data);
                    if u64::try_from(out.len()).unwrap_or(u64::MAX) > MAX_MANIFEST_BYTES {
                        return Ok(None);
                    }
                }
                Ok(Some(out))
            };
            tokio::time::timeout(CALL_TIMEOUT, read)
                .await
                .map_err(|_| ContainerdError::Timeout {
                    op: "Read",
                    after: CALL_TIMEOUT,
                })?
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes<M: Message>(m: M) -> Vec<u8> {
        m.encode_to_vec()
    }

    #[test]
    fn events_name_the_item_to_re_read() {
        let start = bytes(TaskStart {
            container_id: "c1".into(),
            pid: 42,
        });
        assert_eq!(
            decode_event(NAMESPACE, "/tasks/start", &start),
            Some(RuntimeEvent::Container {
                id: "c1".into(),
                running: Some(true)
            })
        );
        assert_eq!(
            decode_event("moby", "/tasks/start", &start),
            None,
            "other namespace"
        );
        let exit = bytes(TaskExit {
            container_id: "c1".into(),
            id: "c1".into(),
            ..Default::default()
        });
        assert_eq!(
            decode_event(NAMESPACE, "/tasks/exit", &exit),
            Some(RuntimeEvent::Container {
                id: "c1".into(),
                running: Some(false)
            })
        );
        let exec_exit = bytes(TaskExit {
            container_id: "c1".into(),
            id: "exec-7".into(),
            ..Default::default()
        });
        assert_eq!(decode_event(NAMESPACE, "/tasks/exit", &exec_exit), None);
        let created = bytes(ContainerCreate {
            id: "c2".into(),
            ..Default::default()
        });
        assert_eq!(
            decode_event(NAMESPACE, "/containers/create", &created),
            Some(RuntimeEvent::Container {
                id: "c2".into(),
                running: None
            })
        );
        let image = bytes(ImageDelete {
            name: "127.0.0.1:5000/app:latest".into(),
        });
        assert_eq!(
            decode_event(NAMESPACE, "/images/delete", &image),
            Some(RuntimeEvent::Image {
                name: "127.0.0.1:5000/app:latest".into()
            })
        );
        assert_eq!(decode_event(NAMESPACE, "/snapshot/prepare", &image), None);
        assert_eq!(
            decode_event(NAMESPACE, "/tasks/start", &[0xff, 0xff]),
            None,
            "garbage"
        );
    }

    #[test]
    fn filters_cover_every_topic_in_the_cri_namespace() {
        let filters = subscribe_filters();
        assert_eq!(filters.len(), TOPICS.len());
        assert!(
            filters
                .iter()
                .all(|f| f.starts_with("namespace==k8s.io,topic==\"/"))
        );
        assert!(filters.contains(&r#"namespace==k8s.io,topic=="/images/update""#.to_string()));
    }
}
