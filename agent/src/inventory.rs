//! The node inventory: running containers (with their pod and the digest they run) and the
//! images present, read through CRI and kept current as change sets.
//!
//! [`Collector::snapshot`] reads one [`Snapshot`]; [`diff`] turns two snapshots into a
//! [`ChangeSet`] (pure); [`run`] sends the first snapshot and then change sets only. On
//! containerd it follows the runtime's events and re-reads just the items they name
//! ([`Collector::refresh`]), with a slow full re-read as the safety net; elsewhere it polls
//! at an interval (and at once on CRI container events where the runtime offers
//! `GetContainerEvents`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_cri::v1::{Container, Image, PodSandbox};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info, instrument, warn};
use warmroll_proto::image::{Digest, ImageRef};

use crate::containerd::{EventSource, RuntimeEvent, RuntimeEvents};
use crate::cri::{Backoff, Cri, CriError, EventStream};
use crate::metrics::{Health, Metrics};

/// Sandbox label keys kubelet sets; kept as fields, not in the user-visible label set.
const LABEL_NAMESPACE: &str = "io.kubernetes.pod.namespace";
const LABEL_NAME: &str = "io.kubernetes.pod.name";
const LABEL_UID: &str = "io.kubernetes.pod.uid";
const LABEL_CONTAINER_NAME: &str = "io.kubernetes.container.name";
const KUBERNETES_LABEL_PREFIX: &str = "io.kubernetes.";

/// The pod a container belongs to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// One running container as the runtime reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunningContainer {
    /// CRI container id.
    pub id: String,
    pub pod: PodRef,
    /// The pod's labels (from its sandbox), without the `io.kubernetes.*` keys.
    pub pod_labels: BTreeMap<String, String>,
    /// Container name from the pod spec.
    pub container: String,
    /// The image reference the runtime reports for the container (informational: the
    /// coordinator takes the tag from the workload).
    pub image: String,
    /// The image config id (`sha256:…`).
    pub image_id: String,
    /// The manifest digest the container runs (`sha256:…`), when the runtime knows it.
    pub digest: Option<Digest>,
}

/// One image present on the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeImage {
    pub id: String,
    pub repo_tags: Vec<String>,
    pub repo_digests: Vec<String>,
    pub size: u64,
}

impl From<&Image> for NodeImage {
    fn from(i: &Image) -> Self {
        let mut repo_tags = i.repo_tags.clone();
        repo_tags.sort();
        let mut repo_digests = i.repo_digests.clone();
        repo_digests.sort();
        NodeImage {
            id: i.id.clone(),
            repo_tags,
            repo_digests,
            size: i.size,
        }
    }
}

/// The node's containers and images at one moment, keyed by id.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Snapshot {
    pub containers: BTreeMap<String, RunningContainer>,
    pub images: BTreeMap<String, NodeImage>,
}

/// What changed between two snapshots.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ChangeSet {
    pub added: Vec<RunningContainer>,
    /// The containers as they were last seen.
    pub removed: Vec<RunningContainer>,
    /// The containers as they are now.
    pub changed: Vec<RunningContainer>,
    pub images_added: Vec<NodeImage>,
    /// Ids of images no longer present.
    pub images_removed: Vec<String>,
    pub images_changed: Vec<NodeImage>,
}

impl ChangeSet {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.changed.is_empty()
            && self.images_added.is_empty()
            && self.images_removed.is_empty()
            && self.images_changed.is_empty()
    }
}

impl Snapshot {
    /// Apply a change set: `old.apply(&diff(&old, &new)) == new`.
    pub fn apply(&mut self, changes: &ChangeSet) {
        for c in &changes.removed {
            self.containers.remove(&c.id);
        }
        for c in changes.added.iter().chain(&changes.changed) {
            self.containers.insert(c.id.clone(), c.clone());
        }
        for id in &changes.images_removed {
            self.images.remove(id);
        }
        for i in changes.images_added.iter().chain(&changes.images_changed) {
            self.images.insert(i.id.clone(), i.clone());
        }
    }
}

/// The change set that turns `old` into `new`.
pub fn diff(old: &Snapshot, new: &Snapshot) -> ChangeSet {
    let mut out = ChangeSet::default();
    for (id, c) in &new.containers {
        match old.containers.get(id) {
            None => out.added.push(c.clone()),
            Some(prev) if prev != c => out.changed.push(c.clone()),
            Some(_) => {}
        }
    }
    for (id, c) in &old.containers {
        if !new.containers.contains_key(id) {
            out.removed.push(c.clone());
        }
    }
    for (id, i) in &new.images {
        match old.images.get(id) {
            None => out.images_added.push(i.clone()),
            Some(prev) if prev != i => out.images_changed.push(i.clone()),
            Some(_) => {}
        }
    }
    for id in old.images.keys() {
        if !new.images.contains_key(id) {
            out.images_removed.push(id.clone());
        }
    }
    out
}

/// The user-visible pod labels: the sandbox labels without the `io.kubernetes.*` keys.
pub fn user_labels(labels: &HashMap<String, String>) -> BTreeMap<String, String> {
    labels
        .iter()
        .filter(|(k, _)| !k.starts_with(KUBERNETES_LABEL_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The pod of a sandbox: its CRI metadata, falling back to kubelet's labels.
pub fn pod_ref(sandbox: &PodSandbox) -> PodRef {
    let label = |k: &str| sandbox.labels.get(k).cloned().unwrap_or_default();
    let pick = |meta: Option<&String>, k: &str| match meta {
        Some(v) if !v.is_empty() => v.clone(),
        _ => label(k),
    };
    let meta = sandbox.metadata.as_ref();
    PodRef {
        namespace: pick(meta.map(|m| &m.namespace), LABEL_NAMESPACE),
        name: pick(meta.map(|m| &m.name), LABEL_NAME),
        uid: pick(meta.map(|m| &m.uid), LABEL_UID),
    }
}

/// The manifest digest in a digested reference `repo@sha256:…`, if it is one.
pub fn digest_of_reference(reference: &str) -> Option<Digest> {
    let (_, digest) = reference.rsplit_once('@')?;
    Digest::parse(digest).ok()
}

fn is_digest(s: &str) -> bool {
    Digest::parse(s).is_ok()
}

/// The normalised `registry/repository` of a reference (`None` when it is not one).
fn repository_of(reference: &str) -> Option<String> {
    ImageRef::parse(reference).ok().map(|r| r.name())
}

/// The manifest digest an image is known by in `repository` (normalised
/// `registry/repository`), or its first repo digest when none is in that repository.
pub fn repo_digest_for(image: &Image, repository: Option<&str>) -> Option<Digest> {
    let digests = || image.repo_digests.iter();
    digests()
        .find(|d| repository.is_some() && repository_of(d).as_deref() == repository)
        .or_else(|| digests().next())
        .and_then(|d| digest_of_reference(d))
}

/// What `ContainerStatus` told about a container; it never changes for a container id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusInfo {
    /// The image name the runtime reports in the status (containerd: its first repo tag).
    pub image: String,
    pub digest: Option<Digest>,
}

/// Assemble a snapshot from CRI answers (pure). Containers whose sandbox is unknown are
/// left out (they appear in the next poll).
pub fn build_snapshot(
    sandboxes: &[PodSandbox],
    containers: &[Container],
    statuses: &HashMap<String, StatusInfo>,
    images: &[Image],
) -> Snapshot {
    let sandboxes: HashMap<&str, &PodSandbox> =
        sandboxes.iter().map(|s| (s.id.as_str(), s)).collect();
    let images_by_id: HashMap<&str, &Image> = images.iter().map(|i| (i.id.as_str(), i)).collect();
    let mut snap = Snapshot {
        images: images
            .iter()
            .map(|i| (i.id.clone(), NodeImage::from(i)))
            .collect(),
        ..Default::default()
    };
    for c in containers {
        let Some(sandbox) = sandboxes.get(c.pod_sandbox_id.as_str()) else {
            debug!(container = %c.id, sandbox = %c.pod_sandbox_id, "container without a known sandbox, skipped");
            continue;
        };
        let status = statuses.get(&c.id);
        let spec_image = c.image.as_ref().map_or("", |s| {
            if s.user_specified_image.is_empty() {
                s.image.as_str()
            } else {
                s.user_specified_image.as_str()
            }
        });
        let image = if spec_image.is_empty() || is_digest(spec_image) {
            status.map_or(spec_image, |s| s.image.as_str())
        } else {
            spec_image
        };
        let image_id = if !c.image_id.is_empty() {
            c.image_id.clone()
        } else if is_digest(&c.image_ref) {
            c.image_ref.clone()
        } else {
            String::new()
        };
        let digest = status
            .and_then(|s| s.digest.clone())
            .or_else(|| digest_of_reference(&c.image_ref))
            .or_else(|| {
                images_by_id
                    .get(image_id.as_str())
                    .and_then(|i| repo_digest_for(i, repository_of(image).as_deref()))
            });
        let container = c
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .filter(|n| !n.is_empty())
            .or_else(|| c.labels.get(LABEL_CONTAINER_NAME).cloned())
            .unwrap_or_default();
        snap.containers.insert(
            c.id.clone(),
            RunningContainer {
                id: c.id.clone(),
                pod: pod_ref(sandbox),
                pod_labels: user_labels(&sandbox.labels),
                container,
                image: image.to_string(),
                image_id,
                digest,
            },
        );
    }
    snap
}

/// Reads snapshots, caching `ContainerStatus` answers by container id, and the sandboxes
/// and images of the last full read for re-reading single items after an event.
pub struct Collector<C> {
    cri: Arc<C>,
    statuses: HashMap<String, StatusInfo>,
    sandboxes: HashMap<String, PodSandbox>,
    images: HashMap<String, Image>,
}

/// The items runtime events named, to re-read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Affected {
    /// Container ids, with the state the event implied (`Some(true)`: started).
    pub containers: BTreeMap<String, Option<bool>>,
    /// Image names (tags, digest references, ids).
    pub images: BTreeSet<String>,
}

impl Affected {
    pub fn is_empty(&self) -> bool {
        self.containers.is_empty() && self.images.is_empty()
    }

    pub fn add(&mut self, event: RuntimeEvent) {
        match event {
            RuntimeEvent::Container { id, running } => {
                let slot = self.containers.entry(id).or_insert(running);
                // The latest event that implies a state wins.
                if running.is_some() {
                    *slot = running;
                }
            }
            RuntimeEvent::Image { name } => {
                self.images.insert(name);
            }
        }
    }
}

impl<C: Cri> Collector<C> {
    pub fn new(cri: Arc<C>) -> Self {
        Collector {
            cri,
            statuses: HashMap::new(),
            sandboxes: HashMap::new(),
            images: HashMap::new(),
        }
    }

    /// One inventory of the node.
    #[instrument(skip(self))]
    pub async fn snapshot(&mut self) -> Result<Snapshot, CriError> {
        // Containers before sandboxes: a running container's sandbox already exists.
        let containers = self.cri.list_running_containers().await?;
        let sandboxes = self.cri.list_pod_sandboxes().await?;
        let images = self.cri.list_images().await?;
        self.statuses
            .retain(|id, _| containers.iter().any(|c| &c.id == id));
        for c in &containers {
            self.ensure_status(&c.id).await;
        }
        let snapshot = build_snapshot(&sandboxes, &containers, &self.statuses, &images);
        self.sandboxes = sandboxes.into_iter().map(|s| (s.id.clone(), s)).collect();
        self.images = images.into_iter().map(|i| (i.id.clone(), i)).collect();
        Ok(snapshot)
    }

    /// Asks `ContainerStatus` once per container id.
    async fn ensure_status(&mut self, id: &str) {
        if self.statuses.contains_key(id) {
            return;
        }
        match self.cri.container_status(id).await {
            Ok(s) => {
                let info = StatusInfo {
                    image: s.image.map(|i| i.image).unwrap_or_default(),
                    digest: digest_of_reference(&s.image_ref),
                };
                self.statuses.insert(id.to_string(), info);
            }
            // Gone since the list, or a passing failure: the image list still gives a
            // digest, and the status is asked again next time.
            Err(e) => debug!(container = %id, error = %e, "ContainerStatus failed"),
        }
    }

    /// `base` with the `affected` items re-read through CRI. Also returns the containers
    /// whose state is not yet what their event implied (CRI may lag the event a little).
    #[instrument(skip(self, base))]
    pub async fn refresh(
        &mut self,
        base: &Snapshot,
        affected: &Affected,
    ) -> Result<(Snapshot, Vec<String>), CriError> {
        let mut next = base.clone();
        for name in &affected.images {
            self.refresh_image(&mut next, name).await?;
        }
        let mut unsettled = Vec::new();
        let mut sandboxes_read = false;
        for (id, implied) in &affected.containers {
            let running = self.refresh_container(&mut next, id).await?;
            if implied.is_some_and(|want| want != running) {
                // A pod sandbox's own task is not a container: nothing to wait for.
                if !self.sandboxes.contains_key(id) && !sandboxes_read {
                    let sandboxes = self.cri.list_pod_sandboxes().await?;
                    self.sandboxes = sandboxes.into_iter().map(|s| (s.id.clone(), s)).collect();
                    sandboxes_read = true;
                }
                if !self.sandboxes.contains_key(id) {
                    unsettled.push(id.clone());
                }
            }
        }
        Ok((next, unsettled))
    }

    async fn refresh_image(&mut self, next: &mut Snapshot, name: &str) -> Result<(), CriError> {
        let found = self.cri.image_status(name).await?;
        // Images that carried the name before may have lost it (a moved or deleted tag).
        let mut recheck: Vec<String> = next
            .images
            .values()
            .filter(|i| {
                i.id == name
                    || i.repo_tags.iter().any(|t| t == name)
                    || i.repo_digests.iter().any(|d| d == name)
            })
            .map(|i| i.id.clone())
            .collect();
        if let Some(image) = found {
            recheck.retain(|id| *id != image.id);
            next.images
                .insert(image.id.clone(), NodeImage::from(&image));
            self.images.insert(image.id.clone(), image);
        }
        for id in recheck {
            match self.cri.image_status(&id).await? {
                Some(image) => {
                    next.images
                        .insert(image.id.clone(), NodeImage::from(&image));
                    self.images.insert(image.id.clone(), image);
                }
                None => {
                    next.images.remove(&id);
                    self.images.remove(&id);
                }
            }
        }
        Ok(())
    }

    /// Re-reads one container into `next`; returns whether it is running.
    async fn refresh_container(&mut self, next: &mut Snapshot, id: &str) -> Result<bool, CriError> {
        let Some(container) = self.cri.running_container(id).await? else {
            next.containers.remove(id);
            self.statuses.remove(id);
            return Ok(false);
        };
        if !self.sandboxes.contains_key(&container.pod_sandbox_id) {
            let sandboxes = self.cri.list_pod_sandboxes().await?;
            self.sandboxes = sandboxes.into_iter().map(|s| (s.id.clone(), s)).collect();
        }
        self.ensure_status(id).await;
        let sandboxes: Vec<PodSandbox> = self
            .sandboxes
            .get(&container.pod_sandbox_id)
            .cloned()
            .into_iter()
            .collect();
        let images: Vec<Image> = self.images.values().cloned().collect();
        let built = build_snapshot(
            &sandboxes,
            std::slice::from_ref(&container),
            &self.statuses,
            &images,
        );
        match built.containers.into_values().next() {
            Some(c) => {
                next.containers.insert(c.id.clone(), c);
                Ok(true)
            }
            // No sandbox for it (yet): the next read finds it.
            None => Ok(false),
        }
    }
}

/// The containers as a table: namespace, pod, container, image, digest.
pub fn render_table(snapshot: &Snapshot) -> String {
    let mut rows: Vec<[String; 5]> = vec![[
        "NAMESPACE".into(),
        "POD".into(),
        "CONTAINER".into(),
        "IMAGE".into(),
        "DIGEST".into(),
    ]];
    let mut containers: Vec<&RunningContainer> = snapshot.containers.values().collect();
    containers.sort_by(|a, b| (&a.pod, &a.container).cmp(&(&b.pod, &b.container)));
    for c in containers {
        rows.push([
            c.pod.namespace.clone(),
            c.pod.name.clone(),
            c.container.clone(),
            c.image.clone(),
            c.digest
                .as_ref()
                .map_or_else(|| "-".to_string(), ToString::to_string),
        ]);
    }
    let mut widths = [0usize; 5];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// What the inventory loop sends: the first snapshot, then changes only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InventoryUpdate {
    Full(Snapshot),
    Changes(ChangeSet),
}

/// How often the inventory re-reads everything through CRI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Intervals {
    /// Without runtime events (not containerd, or its event stream is down).
    pub poll: Duration,
    /// With containerd's events keeping the inventory current: the safety net that
    /// corrects any missed event. The runtime is still checked every `poll` (`Version`).
    pub resync: Duration,
}

/// How long a burst of events may settle before the affected items are re-read.
const EVENT_SETTLE: Duration = Duration::from_millis(50);
/// A subscription that lasted this long worked: its loss restarts the backoff.
const EVENTS_STABLE: Duration = Duration::from_secs(30);
/// Re-reads of a container whose CRI state lags its event, and the pause between them.
const UNSETTLED_RETRIES: u32 = 10;
const UNSETTLED_PAUSE: Duration = Duration::from_millis(100);

/// The loop's view of runtime events.
enum Events {
    /// No event source (not containerd, or its API is unavailable).
    None,
    /// Subscribed.
    Live(RuntimeEvents),
    /// Waiting to (re)subscribe.
    Down { retry_at: Instant },
}

/// Keep the inventory current and send updates to `tx` until the receiver is dropped:
/// the first snapshot, then change sets. With `events` (containerd), each event's items
/// are re-read through CRI at once and everything is re-read every `intervals.resync`;
/// without, the runtime is polled every `intervals.poll` (and at once on CRI container
/// events where the runtime offers `GetContainerEvents`). Runtime failures are logged and
/// retried with backoff; the loop never ends because of them.
pub async fn run<C: Cri>(
    cri: Arc<C>,
    events: Option<Arc<dyn EventSource>>,
    intervals: Intervals,
    metrics: Metrics,
    health: Arc<Health>,
    tx: mpsc::Sender<InventoryUpdate>,
) {
    let mut collector = Collector::new(cri.clone());
    let mut last: Option<Snapshot> = None;
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(10));
    let mut events_backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
    let mut runtime_events = match &events {
        Some(_) => Events::Down {
            retry_at: Instant::now(),
        },
        None => Events::None,
    };
    // When the current subscription was made, and whether its loss was logged (so an
    // outage logs once, not at every retry).
    let mut subscribed_at = Instant::now();
    let mut outage_logged = false;
    let mut cri_events: Option<EventStream> = None;
    let mut cri_events_supported = true;
    let mut failing = false;
    let mut full_at = Instant::now();
    let mut probe_at = Instant::now() + intervals.poll;
    let mut affected = Affected::default();
    let mut affected_at: Option<Instant> = None;
    let mut retries = 0u32;
    loop {
        // Subscribe before reading, so nothing that happens in between is missed.
        if let (Some(source), Events::Down { retry_at }) = (&events, &runtime_events)
            && Instant::now() >= *retry_at
        {
            match source.subscribe().await {
                Ok(stream) => {
                    debug!("following containerd events");
                    subscribed_at = Instant::now();
                    runtime_events = Events::Live(stream);
                    metrics.events_followed(true);
                    // A full read catches whatever happened while not subscribed.
                    full_at = Instant::now();
                }
                Err(e) => {
                    let delay = events_backoff.next_delay();
                    debug!(error = %e, retry_in = ?delay, "containerd events not available now");
                    runtime_events = Events::Down {
                        retry_at: Instant::now() + delay,
                    };
                }
            }
        }
        let live = matches!(runtime_events, Events::Live(_));
        let now = Instant::now();
        let result = if last.is_none() || now >= full_at {
            collector.snapshot().await.map(|snap| {
                affected = Affected::default();
                affected_at = None;
                full_at = Instant::now()
                    + if live {
                        intervals.resync
                    } else {
                        intervals.poll
                    };
                Some(snap)
            })
        } else if let (Some(at), Some(base)) = (affected_at, &last)
            && now >= at
        {
            let batch = std::mem::take(&mut affected);
            affected_at = None;
            collector
                .refresh(base, &batch)
                .await
                .map(|(snap, unsettled)| {
                    if unsettled.is_empty() || retries >= UNSETTLED_RETRIES {
                        retries = 0;
                    } else {
                        retries += 1;
                        for id in unsettled {
                            let implied = batch.containers.get(&id).copied().flatten();
                            affected.add(RuntimeEvent::Container {
                                id,
                                running: implied,
                            });
                        }
                        affected_at = Some(Instant::now() + UNSETTLED_PAUSE);
                    }
                    Some(snap)
                })
        } else if live && now >= probe_at {
            // Events keep the inventory current; still check that the runtime answers.
            probe_at = now + intervals.poll;
            cri.version().await.map(|_| None)
        } else {
            Ok(None)
        };
        match result {
            Ok(read) => {
                if failing {
                    info!("container runtime reachable again");
                    failing = false;
                    full_at = Instant::now();
                }
                backoff.reset();
                if let Some(snap) = read {
                    metrics.inventory_size(snap.containers.len(), snap.images.len());
                    let update = match &last {
                        None => Some(InventoryUpdate::Full(snap.clone())),
                        Some(prev) => {
                            let changes = diff(prev, &snap);
                            (!changes.is_empty()).then_some(InventoryUpdate::Changes(changes))
                        }
                    };
                    last = Some(snap);
                    health.set_inventory_ready();
                    if let Some(update) = update
                        && tx.send(update).await.is_err()
                    {
                        return;
                    }
                }
            }
            Err(e) => {
                let delay = backoff
                    .next_delay()
                    .min(intervals.poll.max(Duration::from_secs(1)));
                if !failing || !e.is_unreachable() {
                    warn!(error = %e, retry_in = ?delay, "inventory failed");
                }
                failing = true;
                cri_events = None;
                // Whatever was missed, a full read after the outage catches it.
                full_at = Instant::now() + delay;
            }
        }
        if events.is_none() && cri_events_supported && cri_events.is_none() && !failing {
            match cri.container_events().await {
                Ok(stream) => cri_events = Some(stream),
                Err(e) if e.code() == Some(tonic::Code::Unimplemented) => {
                    cri_events_supported = false;
                    info!(interval = ?intervals.poll, "the runtime does not offer GetContainerEvents; inventory polls only");
                }
                Err(e) => debug!(error = %e, "GetContainerEvents not available now"),
            }
        }
        let mut wake = full_at;
        if let Some(at) = affected_at {
            wake = wake.min(at);
        }
        if let Events::Down { retry_at } = &runtime_events {
            wake = wake.min(*retry_at);
        }
        if matches!(runtime_events, Events::Live(_)) {
            wake = wake.min(probe_at);
        }
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(wake) => break,
                () = tx.closed() => return,
                event = next_runtime_event(&mut runtime_events) => match event {
                    Some(Ok(ev)) => {
                        debug!(event = ?ev, "containerd event");
                        if outage_logged {
                            info!("containerd events are back");
                            outage_logged = false;
                        }
                        metrics.runtime_event();
                        affected.add(ev);
                        // Let a burst of events settle, then re-read what they name.
                        let at = *affected_at.get_or_insert(Instant::now() + EVENT_SETTLE);
                        wake = wake.min(at);
                    }
                    ended => {
                        // A subscription that lasted was fine: start the backoff afresh.
                        if subscribed_at.elapsed() >= EVENTS_STABLE {
                            events_backoff.reset();
                        }
                        let delay = events_backoff.next_delay();
                        let error = match ended {
                            Some(Err(e)) => e.to_string(),
                            _ => "the stream ended".to_owned(),
                        };
                        if outage_logged {
                            debug!(%error, retry_in = ?delay, "containerd events still unavailable");
                        } else {
                            info!(%error, retry_in = ?delay, poll = ?intervals.poll, "containerd event stream lost; polling CRI until it is back");
                            outage_logged = true;
                        }
                        let retry_at = Instant::now() + delay;
                        runtime_events = Events::Down { retry_at };
                        metrics.events_followed(false);
                        full_at = full_at.min(Instant::now() + intervals.poll);
                        wake = wake.min(retry_at).min(full_at);
                    }
                },
                event = next_event(&mut cri_events) => match event {
                    Some(Ok(ev)) => {
                        debug!(container = %ev.container_id, kind = ev.container_event_type, "container event");
                        // Let a burst of events settle, then poll at once.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        full_at = Instant::now();
                        break;
                    }
                    Some(Err(e)) => {
                        if e.code() == Some(tonic::Code::Unimplemented) {
                            cri_events_supported = false;
                            info!(interval = ?intervals.poll, "the runtime does not offer GetContainerEvents; inventory polls only");
                        } else {
                            debug!(error = %e, "container event stream ended");
                        }
                        cri_events = None;
                    }
                    None => cri_events = None,
                },
            }
        }
    }
}

/// The next containerd event, or pending forever when not subscribed.
async fn next_runtime_event(
    events: &mut Events,
) -> Option<Result<RuntimeEvent, crate::containerd::ContainerdError>> {
    match events {
        Events::Live(s) => s.next().await,
        _ => std::future::pending().await,
    }
}

/// The next CRI container event, or pending forever when there is no stream.
async fn next_event(
    events: &mut Option<EventStream>,
) -> Option<Result<k8s_cri::v1::ContainerEventResponse, CriError>> {
    match events {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_cri::v1::{ContainerMetadata, ImageSpec, PodSandboxMetadata};

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";
    const CFG: &str = "sha256:cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc";

    fn d(s: &str) -> Digest {
        Digest::parse(s).unwrap()
    }

    fn sandbox(id: &str, name: &str) -> PodSandbox {
        PodSandbox {
            id: id.into(),
            metadata: Some(PodSandboxMetadata {
                name: name.into(),
                uid: format!("uid-{name}"),
                namespace: "shop".into(),
                attempt: 0,
            }),
            labels: [
                ("app", "web"),
                ("warmroll.io/policy", "default"),
                (LABEL_NAME, name),
                (LABEL_NAMESPACE, "shop"),
                (LABEL_UID, "uid"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            ..Default::default()
        }
    }

    fn container(id: &str, sandbox: &str, name: &str, image: &str) -> Container {
        Container {
            id: id.into(),
            pod_sandbox_id: sandbox.into(),
            metadata: Some(ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            image_ref: CFG.into(),
            ..Default::default()
        }
    }

    fn image(id: &str, tags: &[&str], digests: &[&str]) -> Image {
        Image {
            id: id.into(),
            repo_tags: tags.iter().map(|s| s.to_string()).collect(),
            repo_digests: digests.iter().map(|s| s.to_string()).collect(),
            size: 42,
            ..Default::default()
        }
    }

    #[test]
    fn labels_keep_user_keys_only() {
        let s = sandbox("s1", "web-1");
        let labels = user_labels(&s.labels);
        assert_eq!(labels.len(), 2);
        assert_eq!(labels.get("app").map(String::as_str), Some("web"));
        assert!(labels.keys().all(|k| !k.starts_with("io.kubernetes.")));
        assert_eq!(
            pod_ref(&s),
            PodRef {
                namespace: "shop".into(),
                name: "web-1".into(),
                uid: "uid-web-1".into()
            }
        );
    }

    #[test]
    fn pod_ref_falls_back_to_kubelet_labels() {
        let mut s = sandbox("s1", "web-1");
        s.metadata = None;
        let p = pod_ref(&s);
        assert_eq!(
            (p.namespace.as_str(), p.name.as_str(), p.uid.as_str()),
            ("shop", "web-1", "uid")
        );
    }

    #[test]
    fn digests_come_from_digested_references_only() {
        assert_eq!(
            digest_of_reference(&format!("127.0.0.1:5000/app@{D1}")),
            Some(d(D1))
        );
        assert_eq!(digest_of_reference(CFG), None);
        assert_eq!(digest_of_reference("app@sha256:short"), None);
        assert_eq!(digest_of_reference("127.0.0.1:5000/app:latest"), None);
    }

    #[test]
    fn repo_digest_prefers_the_containers_repository() {
        let i = image(
            CFG,
            &[],
            &[
                &format!("other.io/x@{D2}"),
                &format!("127.0.0.1:5000/app@{D1}"),
            ],
        );
        assert_eq!(repo_digest_for(&i, Some("127.0.0.1:5000/app")), Some(d(D1)));
        assert_eq!(repo_digest_for(&i, Some("nowhere.io/y")), Some(d(D2)));
        assert_eq!(repo_digest_for(&i, None), Some(d(D2)));
        assert_eq!(
            repository_of("127.0.0.1:5000/app:v1").as_deref(),
            Some("127.0.0.1:5000/app")
        );
        assert_eq!(
            repository_of("busybox").as_deref(),
            Some("docker.io/library/busybox")
        );
    }

    #[test]
    fn snapshot_joins_containers_sandboxes_statuses_and_images() {
        let sandboxes = [sandbox("s1", "web-1")];
        let containers = [
            container("c1", "s1", "web", "127.0.0.1:5000/app:latest"),
            container("c2", "s1", "sidecar", CFG),
            container("orphan", "gone", "x", "y:z"),
        ];
        let statuses: HashMap<String, StatusInfo> = [(
            "c2".to_string(),
            StatusInfo {
                image: "127.0.0.1:5000/app:latest".into(),
                digest: Some(d(D2)),
            },
        )]
        .into();
        let images = [image(
            CFG,
            &["127.0.0.1:5000/app:latest"],
            &[&format!("127.0.0.1:5000/app@{D1}")],
        )];
        let snap = build_snapshot(&sandboxes, &containers, &statuses, &images);
        assert_eq!(snap.containers.len(), 2, "orphan left out");
        let c1 = &snap.containers["c1"];
        assert_eq!(c1.container, "web");
        assert_eq!(c1.image, "127.0.0.1:5000/app:latest");
        assert_eq!(c1.image_id, CFG);
        assert_eq!(c1.digest, Some(d(D1)), "from the image list");
        assert_eq!(c1.pod.name, "web-1");
        let c2 = &snap.containers["c2"];
        assert_eq!(
            c2.image, "127.0.0.1:5000/app:latest",
            "id replaced by the status image"
        );
        assert_eq!(c2.digest, Some(d(D2)), "status wins");
        assert_eq!(snap.images[CFG].size, 42);
    }

    fn rc(id: &str, digest: &str) -> RunningContainer {
        RunningContainer {
            id: id.into(),
            pod: PodRef {
                namespace: "ns".into(),
                name: format!("pod-{id}"),
                uid: "u".into(),
            },
            pod_labels: BTreeMap::new(),
            container: "c".into(),
            image: "app:latest".into(),
            image_id: CFG.into(),
            digest: Some(d(digest)),
        }
    }

    fn snap(cs: &[RunningContainer], is: &[NodeImage]) -> Snapshot {
        Snapshot {
            containers: cs.iter().map(|c| (c.id.clone(), c.clone())).collect(),
            images: is.iter().map(|i| (i.id.clone(), i.clone())).collect(),
        }
    }

    #[test]
    fn table_lists_one_row_per_container() {
        let s = snap(&[rc("2", D2), rc("1", D1)], &[]);
        let table = render_table(&s);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("NAMESPACE  POD"));
        assert!(
            lines[1].contains("pod-1") && lines[1].contains(D1),
            "{table}"
        );
        assert!(
            lines[2].contains("pod-2") && lines[2].ends_with(D2),
            "{table}"
        );
    }

    #[test]
    fn diff_reports_added_removed_changed() {
        let img_a = NodeImage::from(&image("a", &["app:1"], &[]));
        let img_a2 = NodeImage::from(&image("a", &[], &[]));
        let img_b = NodeImage::from(&image("b", &["app:2"], &[]));
        let old = snap(&[rc("1", D1), rc("2", D1)], std::slice::from_ref(&img_a));
        let new = snap(
            &[rc("2", D2), rc("3", D1)],
            &[img_a2.clone(), img_b.clone()],
        );
        let d = diff(&old, &new);
        assert_eq!(d.added, vec![rc("3", D1)]);
        assert_eq!(d.removed, vec![rc("1", D1)]);
        assert_eq!(d.changed, vec![rc("2", D2)]);
        assert_eq!(d.images_added, vec![img_b]);
        assert_eq!(d.images_changed, vec![img_a2]);
        assert!(d.images_removed.is_empty());
        assert!(diff(&new, &new).is_empty());
        let mut applied = old.clone();
        applied.apply(&d);
        assert_eq!(applied, new);
        let back = diff(&new, &old);
        assert_eq!(back.images_removed, vec!["b".to_string()]);
        let mut round = new.clone();
        round.apply(&back);
        assert_eq!(round, old);
    }

    mod with_fake_cri {
        use super::*;
        use crate::fake::FakeCri;
        use k8s_cri::v1::ContainerStatus;
        use std::sync::atomic::Ordering;

        fn status(id: &str, digest: &str) -> ContainerStatus {
            ContainerStatus {
                id: id.into(),
                image: Some(ImageSpec {
                    image: "127.0.0.1:5000/app:latest".into(),
                    ..Default::default()
                }),
                image_ref: format!("127.0.0.1:5000/app@{digest}"),
                ..Default::default()
            }
        }

        #[tokio::test]
        async fn container_status_is_asked_once_per_container() {
            let fake = Arc::new(FakeCri::with(|s| {
                s.sandboxes = vec![sandbox("s1", "web-1")];
                s.containers = vec![container("c1", "s1", "web", "127.0.0.1:5000/app:latest")];
                s.statuses.insert("c1".into(), status("c1", D1));
            }));
            let mut collector = Collector::new(fake.clone());
            let first = collector.snapshot().await.unwrap();
            let second = collector.snapshot().await.unwrap();
            assert_eq!(first, second);
            assert_eq!(first.containers["c1"].digest, Some(d(D1)));
            assert_eq!(fake.status_calls.load(Ordering::SeqCst), 1);
            fake.edit(|s| {
                s.containers
                    .push(container("c2", "s1", "side", "127.0.0.1:5000/app:latest"));
                s.statuses.insert("c2".into(), status("c2", D2));
            });
            let third = collector.snapshot().await.unwrap();
            assert_eq!(third.containers.len(), 2);
            assert_eq!(fake.status_calls.load(Ordering::SeqCst), 2);
        }

        /// Events from the test, through a channel.
        struct Scripted(std::sync::Mutex<Option<mpsc::Receiver<RuntimeEvent>>>);

        impl EventSource for Scripted {
            fn subscribe(
                &self,
            ) -> futures::future::BoxFuture<
                '_,
                Result<RuntimeEvents, crate::containerd::ContainerdError>,
            > {
                let rx = self.0.lock().unwrap().take();
                Box::pin(async move {
                    let rx = rx.ok_or(crate::containerd::ContainerdError::Timeout {
                        op: "Subscribe",
                        after: Duration::ZERO,
                    })?;
                    let stream = tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok);
                    Ok(Box::pin(stream) as RuntimeEvents)
                })
            }
        }

        #[tokio::test]
        async fn events_re_read_just_their_items_and_wait_for_a_lagging_runtime() {
            let fake = Arc::new(FakeCri::with(|s| {
                s.sandboxes = vec![sandbox("s1", "web-1")];
                s.images = vec![image(CFG, &["127.0.0.1:5000/app:latest"], &[])];
            }));
            let (events_tx, events_rx) = mpsc::channel(8);
            let source = Arc::new(Scripted(std::sync::Mutex::new(Some(events_rx))));
            let (tx, mut rx) = mpsc::channel(8);
            let hour = Duration::from_secs(3600);
            let task = tokio::spawn(run(
                fake.clone(),
                Some(source as Arc<dyn EventSource>),
                Intervals {
                    poll: hour,
                    resync: hour,
                },
                Metrics::new(),
                Arc::new(Health::default()),
                tx,
            ));
            async fn recv(rx: &mut mpsc::Receiver<InventoryUpdate>) -> InventoryUpdate {
                tokio::time::timeout(Duration::from_secs(5), rx.recv())
                    .await
                    .expect("an update within 5 s")
                    .expect("loop alive")
            }
            assert!(matches!(recv(&mut rx).await, InventoryUpdate::Full(_)));
            let statuses_before = fake.status_calls.load(std::sync::atomic::Ordering::SeqCst);
            // A sandbox's task starting is no container: nothing changes, nothing waits.
            events_tx
                .send(RuntimeEvent::Container {
                    id: "s1".into(),
                    running: Some(true),
                })
                .await
                .unwrap();
            // The event comes before CRI shows the container running (CRI lags).
            events_tx
                .send(RuntimeEvent::Container {
                    id: "c1".into(),
                    running: Some(true),
                })
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(250)).await;
            fake.edit(|s| {
                s.containers = vec![container("c1", "s1", "web", "127.0.0.1:5000/app:latest")];
                s.statuses.insert("c1".into(), status("c1", D1));
            });
            let InventoryUpdate::Changes(c) = recv(&mut rx).await else {
                panic!("a change set")
            };
            assert_eq!(c.added.len(), 1, "{c:?}");
            assert_eq!(c.added[0].digest, Some(d(D1)));
            assert_eq!(
                fake.status_calls.load(std::sync::atomic::Ordering::SeqCst),
                statuses_before + 1,
                "one ContainerStatus for the new container"
            );
            // A tag moves to a new image: both images change.
            fake.edit(|s| {
                s.images = vec![
                    image(CFG, &[], &[]),
                    image("sha256:new", &["127.0.0.1:5000/app:latest"], &[]),
                ];
            });
            events_tx
                .send(RuntimeEvent::Image {
                    name: "127.0.0.1:5000/app:latest".into(),
                })
                .await
                .unwrap();
            let InventoryUpdate::Changes(c) = recv(&mut rx).await else {
                panic!("a change set")
            };
            assert_eq!(c.images_added.len(), 1, "{c:?}");
            assert_eq!(c.images_added[0].id, "sha256:new");
            assert_eq!(c.images_changed.len(), 1, "{c:?}");
            assert!(c.images_changed[0].repo_tags.is_empty());
            // The container exits.
            fake.edit(|s| s.containers.clear());
            events_tx
                .send(RuntimeEvent::Container {
                    id: "c1".into(),
                    running: Some(false),
                })
                .await
                .unwrap();
            let InventoryUpdate::Changes(c) = recv(&mut rx).await else {
                panic!("a change set")
            };
            assert_eq!(c.removed.len(), 1, "{c:?}");
            drop(rx);
            task.await.unwrap();
        }

        #[tokio::test]
        async fn the_loop_sends_a_snapshot_then_changes_and_survives_runtime_outages() {
            let fake = Arc::new(FakeCri::with(|s| {
                s.sandboxes = vec![sandbox("s1", "web-1"), sandbox("s2", "web-2")];
                s.containers = vec![container("c1", "s1", "web", "127.0.0.1:5000/app:latest")];
                s.statuses.insert("c1".into(), status("c1", D1));
            }));
            let (tx, mut rx) = mpsc::channel(8);
            let metrics = Metrics::new();
            let health = Arc::new(Health::default());
            let task = tokio::spawn(run(
                fake.clone(),
                None,
                Intervals {
                    poll: Duration::from_millis(50),
                    resync: Duration::from_millis(50),
                },
                metrics.clone(),
                health.clone(),
                tx,
            ));
            async fn recv(rx: &mut mpsc::Receiver<InventoryUpdate>) -> InventoryUpdate {
                tokio::time::timeout(Duration::from_secs(5), rx.recv())
                    .await
                    .expect("an update within 5 s")
                    .expect("loop alive")
            }
            let InventoryUpdate::Full(first) = recv(&mut rx).await else {
                panic!("first update must be a full snapshot")
            };
            assert_eq!(first.containers.len(), 1);
            assert!(health.inventory_ready());
            // The runtime goes away for a few polls, then a pod starts.
            fake.edit(|s| {
                for _ in 0..3 {
                    s.list_failures.push_back(CriError::Connect {
                        socket: "/fake.sock".into(),
                        message: "connection refused".into(),
                    });
                }
                s.containers
                    .push(container("c2", "s2", "web", "127.0.0.1:5000/app:latest"));
                s.statuses.insert("c2".into(), status("c2", D2));
            });
            let InventoryUpdate::Changes(changes) = recv(&mut rx).await else {
                panic!("then change sets")
            };
            assert_eq!(changes.added.len(), 1, "{changes:?}");
            assert_eq!(changes.added[0].pod.name, "web-2");
            assert!(changes.removed.is_empty(), "an outage is not a removal");
            // The pod stops.
            fake.edit(|s| s.containers.retain(|c| c.id != "c1"));
            let InventoryUpdate::Changes(changes) = recv(&mut rx).await else {
                panic!("change set expected")
            };
            assert_eq!(changes.removed.len(), 1);
            assert_eq!(changes.removed[0].id, "c1");
            assert!(
                metrics
                    .encode()
                    .contains("warmroll_agent_inventory_containers 1")
            );
            drop(rx);
            tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .expect("the loop ends when its receiver is dropped")
                .unwrap();
        }
    }
}
