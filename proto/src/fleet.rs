//! The agent–coordinator protocol as checked domain types.
//!
//! The wire types live in [`crate::v1`] (generated); every message crossing the wire is
//! converted at the edge: `TryFrom<v1::…>` checks it and names the offending field in a
//! [`ProtocolError`] (the coordinator answers with `invalid_argument`, the agent drops the
//! session), and `From<domain>` builds the wire form. Nothing here depends on tonic.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use crate::image::{Digest, ImageRef, Platform};
use crate::v1;

mod parts;
pub use parts::{
    MAX_SNAPSHOT_ENTRIES, SNAPSHOT_PART_BYTES, SnapshotAssembly, SnapshotPart, split_snapshot,
};

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest gRPC message either side accepts (set explicitly on both ends). A node with
/// hundreds of containers and images stays far below it.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// Longest free-text field (runtime reported names, messages) accepted.
const TEXT_MAX: usize = 4096;
/// Longest identifier (container, image, pod uid) accepted.
const ID_MAX: usize = 512;

/// A message that does not satisfy the protocol. `field` is the path of the offending
/// field, e.g. `snapshot.containers[3].pod.uid`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("{field}: missing")]
    Missing { field: String },
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
}

impl ProtocolError {
    fn invalid(field: &str, reason: impl Into<String>) -> Self {
        ProtocolError::Invalid {
            field: field.to_owned(),
            reason: reason.into(),
        }
    }

    fn missing(field: &str) -> Self {
        ProtocolError::Missing {
            field: field.to_owned(),
        }
    }

    /// The same error with `prefix.` in front of its field path.
    fn within(self, prefix: &str) -> Self {
        match self {
            ProtocolError::Missing { field } => ProtocolError::Missing {
                field: join(prefix, &field),
            },
            ProtocolError::Invalid { field, reason } => ProtocolError::Invalid {
                field: join(prefix, &field),
                reason,
            },
        }
    }

    /// The path of the offending field.
    pub fn field(&self) -> &str {
        match self {
            ProtocolError::Missing { field } | ProtocolError::Invalid { field, .. } => field,
        }
    }
}

fn join(prefix: &str, field: &str) -> String {
    if field.is_empty() {
        prefix.to_owned()
    } else if field.starts_with('[') {
        format!("{prefix}{field}")
    } else {
        format!("{prefix}.{field}")
    }
}

type Result<T> = std::result::Result<T, ProtocolError>;

fn text(field: &str, value: String, max: usize) -> Result<String> {
    if value.len() > max {
        return Err(ProtocolError::invalid(
            field,
            format!("{} bytes, more than the limit of {max}", value.len()),
        ));
    }
    Ok(value)
}

fn required(field: &str, value: String, max: usize) -> Result<String> {
    if value.is_empty() {
        return Err(ProtocolError::invalid(field, "empty"));
    }
    text(field, value, max)
}

fn optional_digest(field: &str, value: &str) -> Result<Option<Digest>> {
    if value.is_empty() {
        return Ok(None);
    }
    Digest::parse(value)
        .map(Some)
        .map_err(|e| ProtocolError::invalid(field, e.to_string()))
}

fn list<P, D>(field: &str, items: Vec<P>, convert: impl Fn(P) -> Result<D>) -> Result<Vec<D>> {
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| convert(item).map_err(|e| e.within(&format!("{field}[{i}]"))))
        .collect()
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn positive_millis(field: &str, ms: u64) -> Result<Duration> {
    if ms == 0 {
        return Err(ProtocolError::invalid(field, "must be more than 0 ms"));
    }
    Ok(Duration::from_millis(ms))
}

/// A Kubernetes node name (an RFC 1123 subdomain).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeName(String);

impl NodeName {
    pub fn parse(input: &str) -> std::result::Result<Self, String> {
        if input.is_empty() {
            return Err("empty".to_owned());
        }
        if input.len() > 253 {
            return Err(format!("{} characters, more than 253", input.len()));
        }
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if !input.split('.').all(label_ok) {
            return Err(format!(
                "{input:?} is not a node name (lowercase letters, digits, '-' and '.')"
            ));
        }
        Ok(NodeName(input.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A warm order's id, chosen by the coordinator: 1–128 of `[A-Za-z0-9._-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OrderId(String);

impl OrderId {
    pub fn parse(input: &str) -> std::result::Result<Self, String> {
        if input.is_empty() || input.len() > 128 {
            return Err(format!("{} characters, expected 1 to 128", input.len()));
        }
        if !input
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return Err(format!(
                "{input:?} has characters other than letters, digits, '.', '_' and '-'"
            ));
        }
        Ok(OrderId(input.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for OrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn node_name(field: &str, value: &str) -> Result<NodeName> {
    NodeName::parse(value).map_err(|reason| ProtocolError::invalid(field, reason))
}

fn order_id(field: &str, value: &str) -> Result<OrderId> {
    OrderId::parse(value).map_err(|reason| ProtocolError::invalid(field, reason))
}

/// The container runtime an agent talks to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Runtime {
    pub name: String,
    pub version: String,
}

/// The agent's first message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub node: NodeName,
    pub platform: Platform,
    pub runtime: Runtime,
    pub agent_version: String,
    pub protocol_version: u32,
}

/// The pod a container belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// One running container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    /// The runtime's container id.
    pub id: String,
    pub pod: PodRef,
    pub pod_labels: BTreeMap<String, String>,
    /// The container name in the pod spec.
    pub name: String,
    /// The image reference the runtime reports (informational).
    pub image: String,
    /// The image config id.
    pub image_id: String,
    /// The manifest digest the container runs, when the runtime knows it.
    pub digest: Option<Digest>,
}

/// One image present on the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeImage {
    pub id: String,
    pub repo_tags: Vec<String>,
    pub repo_digests: Vec<String>,
    pub size: u64,
}

/// The node's whole inventory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub sequence: u64,
    pub containers: Vec<Container>,
    pub images: Vec<NodeImage>,
}

/// What changed since the previous snapshot or change (`sequence` is one more).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InventoryChange {
    pub sequence: u64,
    pub upserted: Vec<Container>,
    /// Container ids.
    pub removed: Vec<String>,
    pub images_upserted: Vec<NodeImage>,
    /// Image ids.
    pub images_removed: Vec<String>,
}

/// Why a warm-up failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    Auth,
    NotFound,
    DigestMismatch,
    Timeout,
    InsufficientDisk,
    Runtime,
    Cancelled,
    InvalidOrder,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Auth => "auth",
            FailureKind::NotFound => "not_found",
            FailureKind::DigestMismatch => "digest_mismatch",
            FailureKind::Timeout => "timeout",
            FailureKind::InsufficientDisk => "insufficient_disk",
            FailureKind::Runtime => "runtime",
            FailureKind::Cancelled => "cancelled",
            FailureKind::InvalidOrder => "invalid_order",
        }
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a warm-up ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WarmOutcome {
    Succeeded {
        duration: Duration,
        downloaded: bool,
        digest: Option<Digest>,
        image_id: String,
    },
    Failed {
        kind: FailureKind,
        message: String,
        /// For [`FailureKind::DigestMismatch`]: the digest the node got.
        found: Option<Digest>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmResult {
    pub order: OrderId,
    pub outcome: WarmOutcome,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmProgress {
    pub order: OrderId,
    pub bytes_done: u64,
    pub bytes_total: Option<u64>,
}

/// What an agent sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentMessage {
    Hello(Hello),
    Snapshot(SnapshotPart),
    Change(InventoryChange),
    WarmResult(WarmResult),
    WarmProgress(WarmProgress),
    Heartbeat,
}

/// The coordinator's answer to a hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    pub protocol_version: u32,
    pub heartbeat_interval: Duration,
    pub inventory_interval: Duration,
}

/// Registry pull credentials. `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    Basic {
        username: String,
        password: String,
    },
    /// A registry bearer token, sent as it is.
    Token(String),
    /// An identity token: an OAuth2 refresh token for the registry's token server.
    IdentityToken(String),
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::Basic { username, .. } => f
                .debug_struct("Basic")
                .field("username", username)
                .field("password", &"<redacted>")
                .finish(),
            Credentials::Token(_) => f.write_str("Token(<redacted>)"),
            Credentials::IdentityToken(_) => f.write_str("IdentityToken(<redacted>)"),
        }
    }
}

/// Pull `image` by its tag; the tag must then resolve to `expected` (when given).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmOrder {
    pub id: OrderId,
    pub image: ImageRef,
    pub expected: Option<Digest>,
    pub credentials: Option<Credentials>,
    /// Counted from receipt: the two sides' clocks differ.
    pub timeout: Duration,
}

/// What the coordinator sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CoordinatorMessage {
    Welcome(Welcome),
    WarmOrder(WarmOrder),
    CancelWarm(OrderId),
    Resync { reason: String },
}

// ---- wire -> domain ----

impl TryFrom<v1::Hello> for Hello {
    type Error = ProtocolError;
    fn try_from(h: v1::Hello) -> Result<Self> {
        let node = node_name("node_name", &h.node_name)?;
        let platform_text = if h.variant.is_empty() {
            format!("{}/{}", h.os, h.architecture)
        } else {
            format!("{}/{}/{}", h.os, h.architecture, h.variant)
        };
        let platform = Platform::parse(&platform_text)
            .map_err(|e| ProtocolError::invalid("os/architecture/variant", e.to_string()))?;
        Ok(Hello {
            node,
            platform,
            runtime: Runtime {
                name: required("runtime_name", h.runtime_name, ID_MAX)?,
                version: text("runtime_version", h.runtime_version, ID_MAX)?,
            },
            agent_version: text("agent_version", h.agent_version, ID_MAX)?,
            protocol_version: h.protocol_version,
        })
    }
}

impl TryFrom<v1::PodRef> for PodRef {
    type Error = ProtocolError;
    fn try_from(p: v1::PodRef) -> Result<Self> {
        Ok(PodRef {
            namespace: required("namespace", p.namespace, 253)?,
            name: required("name", p.name, 253)?,
            uid: required("uid", p.uid, ID_MAX)?,
        })
    }
}

impl TryFrom<v1::Container> for Container {
    type Error = ProtocolError;
    fn try_from(c: v1::Container) -> Result<Self> {
        let pod = c.pod.ok_or_else(|| ProtocolError::missing("pod"))?;
        let pod = PodRef::try_from(pod).map_err(|e| e.within("pod"))?;
        let mut pod_labels = BTreeMap::new();
        for (key, value) in c.pod_labels {
            if key.is_empty() || key.len() > 317 {
                return Err(ProtocolError::invalid(
                    "pod_labels",
                    format!("label key {key:?} is empty or longer than 317 bytes"),
                ));
            }
            let value = text(&format!("pod_labels[{key}]"), value, TEXT_MAX)?;
            pod_labels.insert(key, value);
        }
        Ok(Container {
            id: required("id", c.id, ID_MAX)?,
            pod,
            pod_labels,
            name: required("name", c.name, 253)?,
            image: text("image", c.image, TEXT_MAX)?,
            image_id: text("image_id", c.image_id, ID_MAX)?,
            digest: optional_digest("digest", &c.digest)?,
        })
    }
}

impl TryFrom<v1::Image> for NodeImage {
    type Error = ProtocolError;
    fn try_from(i: v1::Image) -> Result<Self> {
        Ok(NodeImage {
            id: required("id", i.id, ID_MAX)?,
            repo_tags: list("repo_tags", i.repo_tags, |t| text("", t, TEXT_MAX))?,
            repo_digests: list("repo_digests", i.repo_digests, |t| text("", t, TEXT_MAX))?,
            size: i.size,
        })
    }
}

fn ids(field: &str, ids: Vec<String>) -> Result<Vec<String>> {
    list(field, ids, |id| required("", id, ID_MAX))
}

impl TryFrom<v1::InventorySnapshot> for Snapshot {
    type Error = ProtocolError;
    fn try_from(s: v1::InventorySnapshot) -> Result<Self> {
        Ok(Snapshot {
            sequence: s.sequence,
            containers: list("containers", s.containers, Container::try_from)?,
            images: list("images", s.images, NodeImage::try_from)?,
        })
    }
}

impl TryFrom<v1::InventoryChange> for InventoryChange {
    type Error = ProtocolError;
    fn try_from(c: v1::InventoryChange) -> Result<Self> {
        Ok(InventoryChange {
            sequence: c.sequence,
            upserted: list("upserted", c.upserted, Container::try_from)?,
            removed: ids("removed", c.removed)?,
            images_upserted: list("images_upserted", c.images_upserted, NodeImage::try_from)?,
            images_removed: ids("images_removed", c.images_removed)?,
        })
    }
}

impl TryFrom<i32> for FailureKind {
    type Error = ProtocolError;
    fn try_from(raw: i32) -> Result<Self> {
        use v1::FailureKind as W;
        Ok(match W::try_from(raw) {
            Ok(W::Auth) => FailureKind::Auth,
            Ok(W::NotFound) => FailureKind::NotFound,
            Ok(W::DigestMismatch) => FailureKind::DigestMismatch,
            Ok(W::Timeout) => FailureKind::Timeout,
            Ok(W::InsufficientDisk) => FailureKind::InsufficientDisk,
            Ok(W::Runtime) => FailureKind::Runtime,
            Ok(W::Cancelled) => FailureKind::Cancelled,
            Ok(W::InvalidOrder) => FailureKind::InvalidOrder,
            Ok(W::Unspecified) => return Err(ProtocolError::invalid("kind", "unspecified")),
            Err(_) => {
                return Err(ProtocolError::invalid(
                    "kind",
                    format!("unknown failure kind {raw}"),
                ));
            }
        })
    }
}

impl TryFrom<v1::WarmResult> for WarmResult {
    type Error = ProtocolError;
    fn try_from(r: v1::WarmResult) -> Result<Self> {
        use v1::warm_result::Outcome;
        let order = order_id("order_id", &r.order_id)?;
        let outcome = match r.outcome.ok_or_else(|| ProtocolError::missing("outcome"))? {
            Outcome::Succeeded(s) => WarmOutcome::Succeeded {
                duration: Duration::from_millis(s.duration_ms),
                downloaded: s.downloaded,
                digest: optional_digest("succeeded.digest", &s.digest)?,
                image_id: text("succeeded.image_id", s.image_id, ID_MAX)?,
            },
            Outcome::Failed(f) => WarmOutcome::Failed {
                kind: FailureKind::try_from(f.kind).map_err(|e| e.within("failed"))?,
                message: text("failed.message", f.message, TEXT_MAX)?,
                found: optional_digest("failed.found_digest", &f.found_digest)?,
            },
        };
        Ok(WarmResult { order, outcome })
    }
}

impl TryFrom<v1::WarmProgress> for WarmProgress {
    type Error = ProtocolError;
    fn try_from(p: v1::WarmProgress) -> Result<Self> {
        Ok(WarmProgress {
            order: order_id("order_id", &p.order_id)?,
            bytes_done: p.bytes_done,
            bytes_total: (p.bytes_total != 0).then_some(p.bytes_total),
        })
    }
}

impl TryFrom<v1::AgentMessage> for AgentMessage {
    type Error = ProtocolError;
    fn try_from(m: v1::AgentMessage) -> Result<Self> {
        use v1::agent_message::Kind;
        Ok(
            match m.kind.ok_or_else(|| ProtocolError::missing("kind"))? {
                Kind::Hello(h) => {
                    AgentMessage::Hello(Hello::try_from(h).map_err(|e| e.within("hello"))?)
                }
                Kind::Snapshot(s) => {
                    let more = s.more;
                    AgentMessage::Snapshot(SnapshotPart {
                        snapshot: Snapshot::try_from(s).map_err(|e| e.within("snapshot"))?,
                        more,
                    })
                }
                Kind::Change(c) => AgentMessage::Change(
                    InventoryChange::try_from(c).map_err(|e| e.within("change"))?,
                ),
                Kind::WarmResult(r) => AgentMessage::WarmResult(
                    WarmResult::try_from(r).map_err(|e| e.within("warm_result"))?,
                ),
                Kind::WarmProgress(p) => AgentMessage::WarmProgress(
                    WarmProgress::try_from(p).map_err(|e| e.within("warm_progress"))?,
                ),
                Kind::Heartbeat(v1::Heartbeat {}) => AgentMessage::Heartbeat,
            },
        )
    }
}

impl TryFrom<v1::Credentials> for Credentials {
    type Error = ProtocolError;
    fn try_from(c: v1::Credentials) -> Result<Self> {
        use v1::credentials::Kind;
        match c.kind.ok_or_else(|| ProtocolError::missing("kind"))? {
            Kind::Basic(b) => Ok(Credentials::Basic {
                username: required("basic.username", b.username, TEXT_MAX)?,
                password: text("basic.password", b.password, TEXT_MAX)?,
            }),
            Kind::Token(t) => Ok(Credentials::Token(required("token", t, 64 * 1024)?)),
            Kind::IdentityToken(t) => Ok(Credentials::IdentityToken(required(
                "identity_token",
                t,
                64 * 1024,
            )?)),
        }
    }
}

impl TryFrom<v1::WarmOrder> for WarmOrder {
    type Error = ProtocolError;
    fn try_from(o: v1::WarmOrder) -> Result<Self> {
        Ok(WarmOrder {
            id: order_id("id", &o.id)?,
            image: ImageRef::parse(&o.image)
                .map_err(|e| ProtocolError::invalid("image", e.to_string()))?,
            expected: optional_digest("expected_digest", &o.expected_digest)?,
            credentials: o
                .credentials
                .map(Credentials::try_from)
                .transpose()
                .map_err(|e| e.within("credentials"))?,
            timeout: positive_millis("timeout_ms", o.timeout_ms)?,
        })
    }
}

impl TryFrom<v1::Welcome> for Welcome {
    type Error = ProtocolError;
    fn try_from(w: v1::Welcome) -> Result<Self> {
        Ok(Welcome {
            protocol_version: w.protocol_version,
            heartbeat_interval: positive_millis("heartbeat_interval_ms", w.heartbeat_interval_ms)?,
            inventory_interval: positive_millis("inventory_interval_ms", w.inventory_interval_ms)?,
        })
    }
}

impl TryFrom<v1::CoordinatorMessage> for CoordinatorMessage {
    type Error = ProtocolError;
    fn try_from(m: v1::CoordinatorMessage) -> Result<Self> {
        use v1::coordinator_message::Kind;
        Ok(
            match m.kind.ok_or_else(|| ProtocolError::missing("kind"))? {
                Kind::Welcome(w) => CoordinatorMessage::Welcome(
                    Welcome::try_from(w).map_err(|e| e.within("welcome"))?,
                ),
                Kind::WarmOrder(o) => CoordinatorMessage::WarmOrder(
                    WarmOrder::try_from(o).map_err(|e| e.within("warm_order"))?,
                ),
                Kind::CancelWarm(c) => {
                    CoordinatorMessage::CancelWarm(order_id("cancel_warm.order_id", &c.order_id)?)
                }
                Kind::Resync(r) => CoordinatorMessage::Resync {
                    reason: text("resync.reason", r.reason, TEXT_MAX)?,
                },
            },
        )
    }
}

// ---- domain -> wire ----

fn digest_text(d: Option<&Digest>) -> String {
    d.map(Digest::to_string).unwrap_or_default()
}

impl From<Hello> for v1::Hello {
    fn from(h: Hello) -> Self {
        v1::Hello {
            node_name: h.node.0,
            os: h.platform.os,
            architecture: h.platform.architecture,
            variant: h.platform.variant.unwrap_or_default(),
            runtime_name: h.runtime.name,
            runtime_version: h.runtime.version,
            agent_version: h.agent_version,
            protocol_version: h.protocol_version,
        }
    }
}

impl From<Container> for v1::Container {
    fn from(c: Container) -> Self {
        v1::Container {
            id: c.id,
            pod: Some(v1::PodRef {
                namespace: c.pod.namespace,
                name: c.pod.name,
                uid: c.pod.uid,
            }),
            pod_labels: c.pod_labels.into_iter().collect(),
            name: c.name,
            image: c.image,
            image_id: c.image_id,
            digest: digest_text(c.digest.as_ref()),
        }
    }
}

impl From<NodeImage> for v1::Image {
    fn from(i: NodeImage) -> Self {
        v1::Image {
            id: i.id,
            repo_tags: i.repo_tags,
            repo_digests: i.repo_digests,
            size: i.size,
        }
    }
}

impl From<Snapshot> for v1::InventorySnapshot {
    fn from(s: Snapshot) -> Self {
        v1::InventorySnapshot {
            sequence: s.sequence,
            containers: s.containers.into_iter().map(Into::into).collect(),
            images: s.images.into_iter().map(Into::into).collect(),
            more: false,
        }
    }
}

impl From<InventoryChange> for v1::InventoryChange {
    fn from(c: InventoryChange) -> Self {
        v1::InventoryChange {
            sequence: c.sequence,
            upserted: c.upserted.into_iter().map(Into::into).collect(),
            removed: c.removed,
            images_upserted: c.images_upserted.into_iter().map(Into::into).collect(),
            images_removed: c.images_removed,
        }
    }
}

impl From<FailureKind> for v1::FailureKind {
    fn from(k: FailureKind) -> Self {
        match k {
            FailureKind::Auth => v1::FailureKind::Auth,
            FailureKind::NotFound => v1::FailureKind::NotFound,
            FailureKind::DigestMismatch => v1::FailureKind::DigestMismatch,
            FailureKind::Timeout => v1::FailureKind::Timeout,
            FailureKind::InsufficientDisk => v1::FailureKind::InsufficientDisk,
            FailureKind::Runtime => v1::FailureKind::Runtime,
            FailureKind::Cancelled => v1::FailureKind::Cancelled,
            FailureKind::InvalidOrder => v1::FailureKind::InvalidOrder,
        }
    }
}

impl From<WarmResult> for v1::WarmResult {
    fn from(r: WarmResult) -> Self {
        use v1::warm_result::Outcome;
        let outcome = match r.outcome {
            WarmOutcome::Succeeded {
                duration,
                downloaded,
                digest,
                image_id,
            } => Outcome::Succeeded(v1::WarmSucceeded {
                duration_ms: millis(duration),
                downloaded,
                digest: digest_text(digest.as_ref()),
                image_id,
            }),
            WarmOutcome::Failed {
                kind,
                message,
                found,
            } => Outcome::Failed(v1::WarmFailed {
                kind: v1::FailureKind::from(kind).into(),
                message,
                found_digest: digest_text(found.as_ref()),
            }),
        };
        v1::WarmResult {
            order_id: r.order.0,
            outcome: Some(outcome),
        }
    }
}

impl From<AgentMessage> for v1::AgentMessage {
    fn from(m: AgentMessage) -> Self {
        use v1::agent_message::Kind;
        let kind = match m {
            AgentMessage::Hello(h) => Kind::Hello(h.into()),
            AgentMessage::Snapshot(part) => Kind::Snapshot(v1::InventorySnapshot {
                more: part.more,
                ..part.snapshot.into()
            }),
            AgentMessage::Change(c) => Kind::Change(c.into()),
            AgentMessage::WarmResult(r) => Kind::WarmResult(r.into()),
            AgentMessage::WarmProgress(p) => Kind::WarmProgress(v1::WarmProgress {
                order_id: p.order.0,
                bytes_done: p.bytes_done,
                bytes_total: p.bytes_total.unwrap_or(0),
            }),
            AgentMessage::Heartbeat => Kind::Heartbeat(v1::Heartbeat {}),
        };
        v1::AgentMessage { kind: Some(kind) }
    }
}

impl From<Credentials> for v1::Credentials {
    fn from(c: Credentials) -> Self {
        use v1::credentials::Kind;
        let kind = match c {
            Credentials::Basic { username, password } => {
                Kind::Basic(v1::BasicAuth { username, password })
            }
            Credentials::Token(t) => Kind::Token(t),
            Credentials::IdentityToken(t) => Kind::IdentityToken(t),
        };
        v1::Credentials { kind: Some(kind) }
    }
}

impl From<WarmOrder> for v1::WarmOrder {
    fn from(o: WarmOrder) -> Self {
        v1::WarmOrder {
            id: o.id.0,
            image: o.image.to_string(),
            expected_digest: digest_text(o.expected.as_ref()),
            credentials: o.credentials.map(Into::into),
            timeout_ms: millis(o.timeout),
        }
    }
}

impl From<CoordinatorMessage> for v1::CoordinatorMessage {
    fn from(m: CoordinatorMessage) -> Self {
        use v1::coordinator_message::Kind;
        let kind = match m {
            CoordinatorMessage::Welcome(w) => Kind::Welcome(v1::Welcome {
                protocol_version: w.protocol_version,
                heartbeat_interval_ms: millis(w.heartbeat_interval),
                inventory_interval_ms: millis(w.inventory_interval),
            }),
            CoordinatorMessage::WarmOrder(o) => Kind::WarmOrder(o.into()),
            CoordinatorMessage::CancelWarm(id) => {
                Kind::CancelWarm(v1::CancelWarm { order_id: id.0 })
            }
            CoordinatorMessage::Resync { reason } => Kind::Resync(v1::ResyncRequest { reason }),
        };
        v1::CoordinatorMessage { kind: Some(kind) }
    }
}

#[cfg(test)]
mod tests;
