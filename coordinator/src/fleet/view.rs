//! The fleet view: per node, its agent session, its current inventory and the state of
//! the warm orders sent to it.
//!
//! Nodes are spread over shards, each behind its own short-held mutex (never held across
//! an `.await`), so 5,000 agents applying changes at once rarely meet. A node stays in the
//! view while its session is down for the grace period (its pending warm orders survive a
//! reconnect), then leaves.
//!
//! Orders outlive sessions: a node's orders still outstanding when its session ends are
//! sent again, with the time they have left, on the node's next session (an agent
//! restart, a network blip, a session closed for not reading), and the agent merges
//! them with a pull it may still have running. Nothing here waits on an agent: a
//! message for a session whose queue is full ends that session instead (see
//! [`SessionEnd`]), so one agent that stops reading cannot stall the engine.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::time::Instant;
use tonic::Status;
use tracing::{debug, info, warn};
use warmroll_proto::fleet::{
    Container, CoordinatorMessage, Credentials, Hello, InventoryChange, NodeImage, NodeName,
    OrderId, Snapshot, WarmOrder, WarmOutcome, WarmProgress, WarmResult,
};
use warmroll_proto::image::{Digest, ImageRef};
use warmroll_proto::v1;

use super::conn::Kill;
use intern::{IdSet, Store, StoredContainer, StoredImage};
use warmroll_proto::units::human_bytes;

const SHARDS: usize = 64;
/// Finished warm orders kept per node (the oldest go first).
const FINISHED_ORDERS_KEPT: usize = 64;
/// Fleet events buffered per observer before it lags (and re-reads the view). Allocated
/// up front, so kept modest.
const EVENT_BUFFER: usize = 1024;

/// One message (or the final status) towards a session's agent. Boxed: the queue keeps
/// a block of slots per session for the session's life, and a pointer is a small slot.
pub(crate) type Outbound = Box<Result<v1::CoordinatorMessage, Status>>;

/// The sending half of a session's outbound stream.
pub(crate) type SessionTx = mpsc::Sender<Outbound>;

/// Identifies one session of a node (a reconnect gets a new one).
pub(crate) type SessionId = u64;

/// Errors of the fleet view's operations.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ViewError {
    #[error("node {0} has no connected agent")]
    NotConnected(NodeName),
    #[error("node {0}: its agent's token names no node, so it gets no registry credentials")]
    NodeUnverified(NodeName),
    #[error("node {node}: no warm order {order}")]
    UnknownOrder { node: NodeName, order: OrderId },
    #[error("node {node} left the fleet before warm order {order} finished")]
    NodeLeft { node: NodeName, order: OrderId },
    #[error(
        "node {0}: its earlier agent session was node-verified; a token without a node claim cannot take the node over"
    )]
    VerifiedNodeTaken(NodeName),
}

/// Why the coordinator ended a session itself (the `reason` label of
/// `warmroll_agent_sessions_closed_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SessionEnd {
    /// Its agent did not take messages: its outbound queue was full.
    Stalled,
    /// It sent more than a bound allows.
    OverLimit,
    /// It sent messages faster than allowed.
    Rate,
    /// It broke the protocol.
    Malformed,
    /// No message, not even a heartbeat, for the idle timeout.
    Idle,
}

impl SessionEnd {
    pub fn label(self) -> &'static str {
        match self {
            SessionEnd::Stalled => "stalled",
            SessionEnd::OverLimit => "over_limit",
            SessionEnd::Rate => "rate",
            SessionEnd::Malformed => "malformed",
            SessionEnd::Idle => "idle",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// A change in the fleet, for observers (rollout logic, benchmarks, tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetEvent {
    pub node: NodeName,
    pub kind: FleetEventKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FleetEventKind {
    Connected,
    Disconnected,
    /// The grace period passed: the node is gone from the view.
    Left,
    /// A snapshot or change was applied; the inventory is at `sequence`.
    Inventory {
        sequence: u64,
    },
    /// A warm order's state changed.
    Warm {
        order: OrderId,
    },
}

/// Where a warm order stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WarmState {
    /// Sent; no word from the agent yet.
    Pending,
    InProgress {
        bytes_done: u64,
        bytes_total: Option<u64>,
    },
    Finished(WarmOutcome),
}

impl WarmState {
    /// The bytes pulled so far, while the agent reports progress.
    pub fn bytes(&self) -> Option<WarmBytes> {
        match self {
            WarmState::InProgress {
                bytes_done,
                bytes_total,
            } => Some(WarmBytes {
                orders: 1,
                done: *bytes_done,
                total: bytes_total.unwrap_or(0),
                unknown_totals: usize::from(bytes_total.is_none()),
            }),
            _ => None,
        }
    }
}

/// Bytes pulled so far by one or more warm orders in progress (summed over nodes with
/// [`WarmBytes::add`]). Displays as `warming 63 %, 1.2 GiB of 1.9 GiB` (or
/// `warming, 1.2 GiB so far` while some order's total is unknown).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WarmBytes {
    /// Orders summed.
    pub orders: usize,
    pub done: u64,
    /// Sum of the known totals.
    pub total: u64,
    /// Orders whose agent does not know the total (yet): the percentage is then unknown.
    pub unknown_totals: usize,
}

impl WarmBytes {
    pub fn add(&mut self, other: WarmBytes) {
        self.orders += other.orders;
        self.done = self.done.saturating_add(other.done);
        self.total = self.total.saturating_add(other.total);
        self.unknown_totals += other.unknown_totals;
    }

    /// Whole percent done, when every total is known.
    pub fn percent(&self) -> Option<u64> {
        if self.unknown_totals > 0 || self.total == 0 {
            return None;
        }
        Some(self.done.min(self.total).saturating_mul(100) / self.total)
    }
}

impl std::fmt::Display for WarmBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.percent() {
            Some(pct) => write!(
                f,
                "warming {pct} %, {} of {}",
                human_bytes(self.done),
                human_bytes(self.total)
            ),
            None => write!(f, "warming, {} so far", human_bytes(self.done)),
        }
    }
}

/// What to warm on a node; the view picks the order id.
#[derive(Debug, Clone)]
pub struct WarmRequest {
    pub image: ImageRef,
    pub expected: Option<Digest>,
    pub credentials: Option<Credentials>,
    pub timeout: Duration,
}

/// Follows one warm order.
#[derive(Debug)]
pub struct WarmTicket {
    pub node: NodeName,
    pub order: OrderId,
    state: watch::Receiver<WarmState>,
}

impl WarmTicket {
    pub fn state(&self) -> WarmState {
        self.state.borrow().clone()
    }

    /// Waits for the agent's result. Survives reconnects of the node's agent; fails
    /// when the node leaves the fleet first.
    pub async fn finished(&mut self) -> Result<WarmOutcome, ViewError> {
        let node = self.node.clone();
        let order = self.order.clone();
        let state = self
            .state
            .wait_for(|s| matches!(s, WarmState::Finished(_)))
            .await
            .map_err(|_| ViewError::NodeLeft { node, order })?;
        match &*state {
            WarmState::Finished(outcome) => Ok(outcome.clone()),
            // wait_for only returns a finished state.
            _ => Err(ViewError::NodeLeft {
                node: self.node.clone(),
                order: self.order.clone(),
            }),
        }
    }
}

/// A copy of one node's entry.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub hello: Hello,
    pub connected: bool,
    /// The token named this node (so the agent may receive credentials).
    pub node_verified: bool,
    /// The inventory reflects the agent's latest snapshot and every change since.
    pub inventory_current: bool,
    pub sequence: Option<u64>,
    pub containers: Vec<Container>,
    pub images: Vec<NodeImage>,
    pub warms: Vec<(OrderId, ImageRef, WarmState)>,
}

/// Counts over the fleet view.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct FleetCounts {
    /// Nodes in the view (connected, or within their grace period).
    pub nodes: usize,
    /// Nodes whose agent is connected.
    pub connected: usize,
    /// Connected nodes with a current inventory.
    pub ready: usize,
    /// Containers over all nodes in the view.
    pub containers: usize,
}

enum Session {
    Connected {
        id: SessionId,
        tx: SessionTx,
        node_verified: bool,
        /// Closes the session's connection (absent for in-process sessions).
        kill: Option<Kill>,
    },
    Disconnected {
        id: SessionId,
    },
}

struct WarmEntry {
    request: WarmRequest,
    /// Orders are numbered per view; the oldest finished ones are dropped first.
    serial: u64,
    state: watch::Sender<WarmState>,
    /// When the agent's own timeout for it runs out (a resent order gets what is left).
    deadline: Instant,
    /// Cancelled: never sent again.
    cancelled: bool,
}

impl WarmEntry {
    /// The order to send again on a new session, if it is still outstanding at `now`.
    fn resend(&self, id: &OrderId, now: Instant, node_verified: bool) -> Option<WarmOrder> {
        if self.cancelled || matches!(*self.state.borrow(), WarmState::Finished(_)) {
            return None;
        }
        let left = self.deadline.saturating_duration_since(now);
        if left.is_zero() || (self.request.credentials.is_some() && !node_verified) {
            return None;
        }
        Some(WarmOrder {
            id: id.clone(),
            image: self.request.image.clone(),
            expected: self.request.expected.clone(),
            credentials: self.request.credentials.clone(),
            timeout: left,
        })
    }
}

struct NodeEntry {
    hello: Hello,
    session: Session,
    /// A session of this node was node-verified while it was in the view: sessions
    /// without a node claim may not take it over.
    verified: bool,
    /// `None` until a snapshot arrives, and again after a sequence gap.
    sequence: Option<u64>,
    containers: IdSet<StoredContainer>,
    images: IdSet<StoredImage>,
    warms: HashMap<OrderId, WarmEntry>,
}

impl NodeEntry {
    fn info(&self) -> NodeInfo {
        let (connected, node_verified) = match &self.session {
            Session::Connected { node_verified, .. } => (true, *node_verified),
            Session::Disconnected { .. } => (false, false),
        };
        // Both sets iterate in id order.
        let containers: Vec<Container> = self
            .containers
            .iter()
            .map(StoredContainer::to_container)
            .collect();
        let images: Vec<NodeImage> = self.images.iter().map(|i| i.image().clone()).collect();
        let mut warms: Vec<(u64, OrderId, ImageRef, WarmState)> = self
            .warms
            .iter()
            .map(|(id, w)| {
                (
                    w.serial,
                    id.clone(),
                    w.request.image.clone(),
                    w.state.borrow().clone(),
                )
            })
            .collect();
        warms.sort_by_key(|w| w.0);
        NodeInfo {
            hello: self.hello.clone(),
            connected,
            node_verified,
            inventory_current: self.sequence.is_some(),
            sequence: self.sequence,
            containers,
            images,
            warms: warms
                .into_iter()
                .map(|(_, id, image, state)| (id, image, state))
                .collect(),
        }
    }

    fn prune_finished_orders(&mut self) {
        let mut finished: Vec<(u64, OrderId)> = self
            .warms
            .iter()
            .filter(|(_, w)| matches!(*w.state.borrow(), WarmState::Finished(_)))
            .map(|(id, w)| (w.serial, id.clone()))
            .collect();
        if finished.len() <= FINISHED_ORDERS_KEPT {
            return;
        }
        finished.sort();
        let excess = finished.len() - FINISHED_ORDERS_KEPT;
        for (_, id) in finished.into_iter().take(excess) {
            self.warms.remove(&id);
        }
    }
}

/// What applying an inventory message did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Applied {
    Ok,
    /// The change's sequence does not follow; the agent must send a snapshot.
    Gap {
        expected: Option<u64>,
        got: u64,
    },
    /// This session was replaced by a newer one of the same node, or ended by the view.
    Superseded,
    /// The node's inventory would exceed a bound.
    OverLimit(super::limits::LimitError),
}

struct Inner {
    shards: Box<[Mutex<HashMap<NodeName, NodeEntry>>; SHARDS]>,
    hasher: RandomState,
    grace: Duration,
    events: broadcast::Sender<FleetEvent>,
    next_session: AtomicU64,
    next_order: AtomicU64,
    /// Makes order ids unique across coordinator restarts (agents may report late).
    order_prefix: String,
    /// What the nodes' inventories share.
    store: Store,
    /// `warmroll_agent_sessions_closed_total{reason}`.
    closed: Family<ReasonLabel, Counter>,
}

/// The fleet view. Clones share it.
#[derive(Clone)]
pub struct FleetView {
    inner: Arc<Inner>,
}

impl FleetView {
    /// A view whose disconnected nodes leave after `grace`.
    pub fn new(grace: Duration) -> Self {
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        FleetView {
            inner: Arc::new(Inner {
                shards: Box::new(std::array::from_fn(|_| Mutex::new(HashMap::new()))),
                hasher: RandomState::new(),
                grace,
                events,
                next_session: AtomicU64::new(1),
                next_order: AtomicU64::new(1),
                order_prefix: format!("{:08x}", rand::random::<u32>()),
                store: Store::new(),
                closed: Family::default(),
            }),
        }
    }

    fn shard(&self, node: &NodeName) -> MutexGuard<'_, HashMap<NodeName, NodeEntry>> {
        // Truncating the hash is fine: it only spreads nodes over shards.
        let index = self.inner.hasher.hash_one(node) as usize % SHARDS;
        #[allow(clippy::indexing_slicing)] // index < SHARDS, the array's length
        let shard = &self.inner.shards[index];
        shard.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn emit(&self, node: &NodeName, kind: FleetEventKind) {
        if self.inner.events.receiver_count() > 0 {
            let _ = self.inner.events.send(FleetEvent {
                node: node.clone(),
                kind,
            });
        }
    }

    /// Fleet events from now on. A receiver that falls behind gets `Lagged` and should
    /// re-read the view.
    pub fn subscribe(&self) -> broadcast::Receiver<FleetEvent> {
        self.inner.events.subscribe()
    }

    /// How many nodes are connected and have a current inventory.
    pub fn ready_nodes(&self) -> usize {
        self.inner
            .shards
            .iter()
            .map(|shard| {
                let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
                shard
                    .values()
                    .filter(|n| {
                        n.sequence.is_some() && matches!(n.session, Session::Connected { .. })
                    })
                    .count()
            })
            .sum()
    }

    /// Counts over the whole view, in one pass.
    pub fn counts(&self) -> FleetCounts {
        let mut counts = FleetCounts::default();
        for shard in self.inner.shards.iter() {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            for entry in shard.values() {
                counts.nodes += 1;
                if matches!(entry.session, Session::Connected { .. }) {
                    counts.connected += 1;
                    if entry.sequence.is_some() {
                        counts.ready += 1;
                    }
                }
                counts.containers += entry.containers.len();
            }
        }
        counts
    }

    /// The warm orders in progress over the whole view, summed per image (pending and
    /// finished orders are not counted).
    pub fn warm_progress(&self) -> BTreeMap<ImageRef, WarmBytes> {
        let mut out: BTreeMap<ImageRef, WarmBytes> = BTreeMap::new();
        for shard in self.inner.shards.iter() {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            for w in shard.values().flat_map(|n| n.warms.values()) {
                if let Some(bytes) = w.state.borrow().bytes() {
                    out.entry(w.request.image.clone()).or_default().add(bytes);
                }
            }
        }
        out
    }

    /// A Prometheus collector of [`FleetView::warm_progress`], read at every scrape:
    /// `warmroll_warm_orders_in_progress{image}`, `warmroll_warm_bytes_done{image}` and
    /// `warmroll_warm_bytes_total{image}` (known totals only).
    pub fn warm_progress_collector(&self) -> WarmProgressCollector {
        WarmProgressCollector { view: self.clone() }
    }

    /// The node's agent is connected and its inventory current (it can take orders).
    pub fn is_ready(&self, node: &NodeName) -> bool {
        self.shard(node)
            .get(node)
            .is_some_and(|n| n.sequence.is_some() && matches!(n.session, Session::Connected { .. }))
    }

    /// A copy of one node's entry.
    pub fn node(&self, node: &NodeName) -> Option<NodeInfo> {
        self.shard(node).get(node).map(NodeEntry::info)
    }

    /// The containers in `namespaces` on every node in the view, with their node's name,
    /// copied under each shard's lock (not whole entries: the engine asks every cycle).
    pub fn containers_in(&self, namespaces: &BTreeSet<&str>) -> Vec<(NodeName, Container)> {
        let mut out = Vec::new();
        if namespaces.is_empty() {
            return out;
        }
        for shard in self.inner.shards.iter() {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            for (node, entry) in shard.iter() {
                out.extend(
                    entry
                        .containers
                        .iter()
                        .filter(|c| namespaces.contains(c.namespace()))
                        .map(|c| (node.clone(), c.to_container())),
                );
            }
        }
        out
    }

    /// Reads one node's container without copying the whole entry.
    pub fn container(&self, node: &NodeName, container_id: &str) -> Option<Container> {
        self.shard(node).get(node).and_then(|n| {
            n.containers
                .get(container_id)
                .map(StoredContainer::to_container)
        })
    }

    /// Registers a new session of `hello.node`, replacing any earlier one (whose
    /// outbound stream then ends), and queues on `tx` the node's orders still
    /// outstanding, with the time they have left. A session without a node claim
    /// (`node_verified` false) may not take over a node a node-verified session held.
    pub(crate) fn connect(
        &self,
        hello: Hello,
        node_verified: bool,
        tx: SessionTx,
        kill: Option<Kill>,
    ) -> Result<SessionId, ViewError> {
        let id = self.inner.next_session.fetch_add(1, Ordering::Relaxed);
        let node = hello.node.clone();
        let session = Session::Connected {
            id,
            tx: tx.clone(),
            node_verified,
            kill,
        };
        let now = Instant::now();
        let (replaced, resend) = {
            let mut shard = self.shard(&node);
            match shard.get_mut(&node) {
                Some(entry) => {
                    if entry.verified && !node_verified {
                        return Err(ViewError::VerifiedNodeTaken(node));
                    }
                    let replaced = matches!(entry.session, Session::Connected { .. });
                    entry.hello = hello;
                    entry.session = session;
                    entry.verified |= node_verified;
                    // The agent sends a fresh snapshot after every (re)connect.
                    entry.sequence = None;
                    let mut resend: Vec<(u64, WarmOrder)> = entry
                        .warms
                        .iter()
                        .filter_map(|(order, w)| {
                            Some((w.serial, w.resend(order, now, node_verified)?))
                        })
                        .collect();
                    resend.sort_by_key(|(serial, _)| *serial);
                    (replaced, resend)
                }
                None => {
                    shard.insert(
                        node.clone(),
                        NodeEntry {
                            hello,
                            session,
                            verified: node_verified,
                            sequence: None,
                            containers: IdSet::default(),
                            images: IdSet::default(),
                            warms: HashMap::new(),
                        },
                    );
                    (false, Vec::new())
                }
            }
        };
        if replaced {
            // The earlier session ends at its next message (or its idle timeout).
            info!(node = %node, "agent reconnected; the earlier session is replaced");
        }
        let outstanding = resend.len();
        let mut resent = 0usize;
        for (_, order) in resend {
            // A fresh queue: it has room unless the node has more orders out than the
            // queue holds, and those wait for the next session.
            if tx
                .try_send(Box::new(Ok(CoordinatorMessage::WarmOrder(order).into())))
                .is_err()
            {
                break;
            }
            resent += 1;
        }
        if outstanding > 0 {
            info!(node = %node, resent, outstanding, "warm orders still outstanding sent again on the new session");
        }
        self.emit(&node, FleetEventKind::Connected);
        Ok(id)
    }

    /// Counts a session the coordinator ended, by reason.
    pub(crate) fn count_closed(&self, reason: SessionEnd) {
        self.inner
            .closed
            .get_or_create(&ReasonLabel {
                reason: reason.label(),
            })
            .inc();
    }

    /// Registers the fleet view's metrics: the warm-up progress per image
    /// ([`FleetView::warm_progress_collector`]) and
    /// `warmroll_agent_sessions_closed_total{reason}`.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "warmroll_agent_sessions_closed",
            "Agent sessions the coordinator ended, by reason (stalled: the agent did not read its stream; over_limit, rate: it sent too much or too fast; malformed; idle)",
            self.inner.closed.clone(),
        );
    }

    /// Runs `f` on the node's entry if `session` is still its session and connected
    /// (a session the view ended writes nothing more).
    fn with_session<R>(
        &self,
        node: &NodeName,
        session: SessionId,
        f: impl FnOnce(&mut NodeEntry) -> R,
    ) -> Option<R> {
        let mut shard = self.shard(node);
        let entry = shard.get_mut(node)?;
        match entry.session {
            Session::Connected { id, .. } if id == session => Some(f(entry)),
            _ => None,
        }
    }

    pub(crate) fn apply_snapshot(
        &self,
        node: &NodeName,
        session: SessionId,
        snapshot: Snapshot,
    ) -> Applied {
        let sequence = snapshot.sequence;
        // Interned before the shard is locked.
        let store = &self.inner.store;
        let containers = snapshot
            .containers
            .into_iter()
            .map(|c| store.container(c))
            .collect();
        let images = snapshot
            .images
            .into_iter()
            .map(|i| store.image(i))
            .collect();
        let done = self.with_session(node, session, |entry| {
            entry.containers = containers;
            entry.images = images;
            entry.sequence = Some(sequence);
        });
        match done {
            Some(()) => {
                self.emit(node, FleetEventKind::Inventory { sequence });
                Applied::Ok
            }
            None => Applied::Superseded,
        }
    }

    /// Applies a change; one that takes the node past `limits` is refused
    /// (`Applied::OverLimit`) and the node's inventory dropped.
    pub(crate) fn apply_change(
        &self,
        node: &NodeName,
        session: SessionId,
        change: InventoryChange,
        limits: &super::limits::SessionLimits,
    ) -> Applied {
        let sequence = change.sequence;
        let store = &self.inner.store;
        let upserted: Vec<_> = change
            .upserted
            .into_iter()
            .map(|c| store.container(c))
            .collect();
        let images_upserted: Vec<_> = change
            .images_upserted
            .into_iter()
            .map(|i| store.image(i))
            .collect();
        let outcome = self.with_session(node, session, |entry| {
            let follows = entry.sequence.and_then(|s| s.checked_add(1)) == Some(sequence);
            if !follows {
                let expected = entry.sequence.and_then(|s| s.checked_add(1));
                // Stale until the snapshot the agent is asked for arrives.
                entry.sequence = None;
                return Applied::Gap {
                    expected,
                    got: sequence,
                };
            }
            for id in &change.removed {
                entry.containers.remove(id.as_str());
            }
            for c in upserted {
                entry.containers.upsert(c);
            }
            for id in &change.images_removed {
                entry.images.remove(id.as_str());
            }
            for i in images_upserted {
                entry.images.upsert(i);
            }
            if let Err(e) = limits.check_inventory(entry.containers.len(), entry.images.len()) {
                // Past a bound nothing of the node's inventory is trusted (its session
                // ends); a snapshot within the bounds brings it back.
                entry.containers = IdSet::default();
                entry.images = IdSet::default();
                entry.sequence = None;
                return Applied::OverLimit(e);
            }
            entry.containers.shrink();
            entry.images.shrink();
            entry.sequence = Some(sequence);
            Applied::Ok
        });
        match outcome {
            Some(Applied::Ok) => {
                self.emit(node, FleetEventKind::Inventory { sequence });
                Applied::Ok
            }
            Some(other) => other,
            None => Applied::Superseded,
        }
    }

    /// Whether `session` is still the node's session.
    pub(crate) fn is_current(&self, node: &NodeName, session: SessionId) -> bool {
        self.with_session(node, session, |_| ()).is_some()
    }

    pub(crate) fn record_result(
        &self,
        node: &NodeName,
        session: SessionId,
        result: WarmResult,
    ) -> Applied {
        let order = result.order.clone();
        let known = self.with_session(node, session, |entry| {
            let known = match entry.warms.get(&result.order) {
                Some(w) => {
                    w.state.send_replace(WarmState::Finished(result.outcome));
                    true
                }
                None => false,
            };
            entry.prune_finished_orders();
            known
        });
        match known {
            None => Applied::Superseded,
            Some(true) => {
                self.emit(node, FleetEventKind::Warm { order });
                Applied::Ok
            }
            Some(false) => {
                // An order of an earlier coordinator, reported after reconnecting.
                debug!(node = %node, order = %order, "result for an unknown warm order ignored");
                Applied::Ok
            }
        }
    }

    pub(crate) fn record_progress(
        &self,
        node: &NodeName,
        session: SessionId,
        progress: WarmProgress,
    ) -> Applied {
        let order = progress.order.clone();
        let known = self.with_session(node, session, |entry| {
            match entry.warms.get(&progress.order) {
                Some(w) if !matches!(*w.state.borrow(), WarmState::Finished(_)) => {
                    w.state.send_replace(WarmState::InProgress {
                        bytes_done: progress.bytes_done,
                        bytes_total: progress.bytes_total,
                    });
                    true
                }
                _ => false,
            }
        });
        match known {
            None => Applied::Superseded,
            Some(true) => {
                self.emit(node, FleetEventKind::Warm { order });
                Applied::Ok
            }
            Some(false) => Applied::Ok,
        }
    }

    /// The session ended. The node stays in the view for the grace period; if no new
    /// session arrives by then, it leaves (and its pending warm tickets fail).
    pub(crate) fn disconnect(&self, node: &NodeName, session: SessionId) {
        let ended = self.with_session(node, session, |entry| {
            std::mem::replace(&mut entry.session, Session::Disconnected { id: session })
        });
        if let Some(Session::Connected { .. }) = ended {
            self.disconnected(node, session);
        }
    }

    /// Ends a connected session from the coordinator's side: the view stops sending to
    /// it at once, its connection is closed (so the session's task and stream end
    /// even when the agent reads nothing), and its outstanding orders wait for the
    /// node's next session.
    pub(crate) fn end_session(
        &self,
        node: &NodeName,
        session: SessionId,
        reason: SessionEnd,
        why: &str,
    ) {
        let ended = self.with_session(node, session, |entry| {
            std::mem::replace(&mut entry.session, Session::Disconnected { id: session })
        });
        let Some(Session::Connected { kill, .. }) = ended else {
            return;
        };
        warn!(node = %node, session, reason = reason.label(), why, "agent session ended by the coordinator");
        self.count_closed(reason);
        if let Some(kill) = kill {
            kill.trip();
        }
        self.disconnected(node, session);
    }

    fn disconnected(&self, node: &NodeName, session: SessionId) {
        info!(node = %node, grace = ?self.inner.grace, "agent disconnected");
        self.emit(node, FleetEventKind::Disconnected);
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let node = node.clone();
        let grace = self.inner.grace;
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            if let Some(inner) = weak.upgrade() {
                FleetView { inner }.expire(&node, session);
            }
        });
    }

    fn expire(&self, node: &NodeName, session: SessionId) {
        let removed = {
            let mut shard = self.shard(node);
            let gone = matches!(
                shard.get(node).map(|e| &e.session),
                Some(Session::Disconnected { id }) if *id == session
            );
            if gone { shard.remove(node) } else { None }
        };
        if removed.is_some() {
            // Dropping the entry drops the warm orders' senders: their tickets fail.
            info!(node = %node, "node left the fleet view after the grace period");
            self.emit(node, FleetEventKind::Left);
        }
    }

    /// Sends a warm order to the node's connected agent. Credentials go only to a session
    /// whose token named this node. Never waits: when the session's queue is full (its
    /// agent does not read) the session is ended and the order waits for the node's
    /// next session, which gets it with the time it has left; so does an order for a
    /// node whose agent is away but within its grace period (the ticket fails if the
    /// node leaves first).
    pub fn send_order(
        &self,
        node: &NodeName,
        request: WarmRequest,
    ) -> Result<WarmTicket, ViewError> {
        let serial = self.inner.next_order.fetch_add(1, Ordering::Relaxed);
        let id = OrderId::parse(&format!("{}-{serial}", self.inner.order_prefix))
            .map_err(|_| ViewError::NotConnected(node.clone()))?;
        let (state_tx, state_rx) = watch::channel(WarmState::Pending);
        let order = CoordinatorMessage::WarmOrder(WarmOrder {
            id: id.clone(),
            image: request.image.clone(),
            expected: request.expected.clone(),
            credentials: request.credentials.clone(),
            timeout: request.timeout,
        });
        let deadline = Instant::now()
            .checked_add(request.timeout)
            // A timeout too large to add is not resent on a later session.
            .unwrap_or_else(Instant::now);
        let (tx, session) = {
            let mut shard = self.shard(node);
            let entry = shard
                .get_mut(node)
                .ok_or_else(|| ViewError::NotConnected(node.clone()))?;
            let (tx, session, node_verified) = match &entry.session {
                Session::Connected {
                    tx,
                    id,
                    node_verified,
                    ..
                } => (Some(tx.clone()), *id, *node_verified),
                Session::Disconnected { id } => (None, *id, entry.verified),
            };
            if request.credentials.is_some() && !node_verified {
                return Err(ViewError::NodeUnverified(node.clone()));
            }
            entry.warms.insert(
                id.clone(),
                WarmEntry {
                    request,
                    serial,
                    state: state_tx,
                    deadline,
                    cancelled: false,
                },
            );
            (tx, session)
        };
        match tx.map(|tx| tx.try_send(Box::new(Ok(order.into())))) {
            Some(Ok(())) => debug!(node = %node, order = %id, "warm order sent"),
            Some(Err(TrySendError::Full(_))) => self.end_session(
                node,
                session,
                SessionEnd::Stalled,
                "its queue is full: the agent does not read its stream; the warm order waits for its next session",
            ),
            // The agent is away, or its session is ending: the order waits for the
            // node's next session.
            None | Some(Err(TrySendError::Closed(_))) => {
                debug!(node = %node, order = %id, "warm order kept for the node's next session");
            }
        }
        self.emit(node, FleetEventKind::Warm { order: id.clone() });
        Ok(WarmTicket {
            node: node.clone(),
            order: id,
            state: state_rx,
        })
    }

    /// Asks the node's agent to cancel a warm order; its result (`cancelled`) follows.
    /// The order is never sent again. Never waits (see [`FleetView::send_order`]).
    pub fn cancel_order(&self, node: &NodeName, order: &OrderId) -> Result<(), ViewError> {
        let (tx, session) = {
            let mut shard = self.shard(node);
            let entry = shard
                .get_mut(node)
                .ok_or_else(|| ViewError::NotConnected(node.clone()))?;
            let Some(warm) = entry.warms.get_mut(order) else {
                return Err(ViewError::UnknownOrder {
                    node: node.clone(),
                    order: order.clone(),
                });
            };
            warm.cancelled = true;
            match &entry.session {
                Session::Connected { tx, id, .. } => (tx.clone(), *id),
                Session::Disconnected { .. } => return Err(ViewError::NotConnected(node.clone())),
            }
        };
        match tx.try_send(Box::new(Ok(
            CoordinatorMessage::CancelWarm(order.clone()).into()
        ))) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => {
                self.end_session(
                    node,
                    session,
                    SessionEnd::Stalled,
                    "its queue is full: the agent does not read its stream",
                );
                Err(ViewError::NotConnected(node.clone()))
            }
            Err(TrySendError::Closed(_)) => Err(ViewError::NotConnected(node.clone())),
        }
    }
}

/// See [`FleetView::warm_progress_collector`].
pub struct WarmProgressCollector {
    view: FleetView,
}

impl std::fmt::Debug for WarmProgressCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WarmProgressCollector")
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct ImageLabel {
    image: String,
}

impl prometheus_client::collector::Collector for WarmProgressCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::family::Family;
        use prometheus_client::metrics::gauge::Gauge;
        let progress = self.view.warm_progress();
        type Gauged = (&'static str, &'static str, fn(&WarmBytes) -> u64);
        let gauges: [Gauged; 3] = [
            (
                "warmroll_warm_orders_in_progress",
                "Warm orders whose agents report pull progress, per image",
                |b| u64::try_from(b.orders).unwrap_or(u64::MAX),
            ),
            (
                "warmroll_warm_bytes_done",
                "Bytes pulled so far by the warm orders in progress, per image",
                |b| b.done,
            ),
            (
                "warmroll_warm_bytes_total",
                "Bytes to pull by the warm orders in progress (known totals), per image",
                |b| b.total,
            ),
        ];
        for (name, help, value) in gauges {
            let family = Family::<ImageLabel, Gauge>::default();
            for (image, bytes) in &progress {
                family
                    .get_or_create(&ImageLabel {
                        image: image.to_string(),
                    })
                    .set(i64::try_from(value(bytes)).unwrap_or(i64::MAX));
            }
            let metric = encoder.encode_descriptor(name, help, None, family.metric_type())?;
            family.encode(metric)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod progress_tests {
    use super::*;

    #[test]
    fn bytes_read_like_the_drift_report_wants_them() {
        let state = |done, total| WarmState::InProgress {
            bytes_done: done,
            bytes_total: total,
        };
        let gib = 1u64 << 30;
        let mut sum = WarmBytes::default();
        sum.add(state(gib, Some(gib)).bytes().unwrap());
        sum.add(state(gib / 5, Some(9 * gib / 10)).bytes().unwrap());
        assert_eq!(sum.orders, 2);
        assert_eq!(sum.percent(), Some(63));
        assert_eq!(sum.to_string(), "warming 63 %, 1.2 GiB of 1.9 GiB");
        sum.add(state(100, None).bytes().unwrap());
        assert_eq!(sum.percent(), None);
        assert!(
            sum.to_string().starts_with("warming, 1.2 GiB so far"),
            "{sum}"
        );
        assert_eq!(WarmState::Pending.bytes(), None);
        assert_eq!(
            state(5, Some(0)).bytes().unwrap().percent(),
            None,
            "nothing to pull has no percentage"
        );
    }

    #[tokio::test]
    async fn progress_is_summed_per_image_and_exported_as_gauges() {
        use warmroll_proto::fleet::Runtime;
        let view = FleetView::new(Duration::from_secs(60));
        let node = NodeName::parse("node-a").unwrap();
        let hello = Hello {
            node: node.clone(),
            platform: warmroll_proto::image::Platform {
                os: "linux".into(),
                architecture: "amd64".into(),
                variant: None,
            },
            runtime: Runtime {
                name: "containerd".into(),
                version: "1.6".into(),
            },
            agent_version: "0".into(),
            protocol_version: warmroll_proto::fleet::PROTOCOL_VERSION,
        };
        let (tx, mut rx) = mpsc::channel(8);
        let session = view.connect(hello, true, tx, None).unwrap();
        let image = ImageRef::parse("registry.example/app:main").unwrap();
        let ticket = view
            .send_order(
                &node,
                WarmRequest {
                    image: image.clone(),
                    expected: None,
                    credentials: None,
                    timeout: Duration::from_secs(60),
                },
            )
            .unwrap();
        let _order = rx.recv().await;
        assert!(
            view.warm_progress().is_empty(),
            "pending orders have no bytes"
        );
        view.record_progress(
            &node,
            session,
            WarmProgress {
                order: ticket.order.clone(),
                bytes_done: 300,
                bytes_total: Some(1000),
            },
        );
        let progress = view.warm_progress();
        assert_eq!(
            progress[&image].to_string(),
            "warming 30 %, 300 B of 1000 B"
        );
        let info = view.node(&node).unwrap();
        assert_eq!(info.warms[0].2.bytes().unwrap().done, 300);
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(view.warm_progress_collector()));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            "warmroll_warm_bytes_done{image=\"registry.example/app:main\"} 300",
            "warmroll_warm_bytes_total{image=\"registry.example/app:main\"} 1000",
            "warmroll_warm_orders_in_progress{image=\"registry.example/app:main\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
    }
}

mod intern;
#[cfg(test)]
mod tests;
