//! Warm-up: pull an image by tag through CRI so the node's tag points at the new digest,
//! then check that it is the digest the coordinator ordered.
//!
//! [`Warmer::warm`] bounds concurrent pulls with a semaphore, merges identical concurrent
//! requests (same reference and expected digest) into one pull, retries transient runtime
//! errors with backoff inside the deadline, and refuses to pull when the image filesystem
//! has less free space than the configured floor. A pull nobody waits for any more (every
//! merged request was dropped: its order was cancelled or timed out) is stopped: the CRI
//! call is dropped, so the runtime stops downloading and never moves the tag to it.
//!
//! After a pull that downloaded, it writes the image filesystem back to disk (`syncfs`)
//! before it reports the warm-up done. The fresh layers are dirty in the page cache
//! otherwise, and the next unmount of a container's overlayfs rootfs on that filesystem
//! (the old pod's teardown in the rollout the warm-up prepares) syncs it and pays for
//! the whole writeback on the rollout's path.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use k8s_cri::v1::{AuthConfig, Image};
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use serde::Serialize;
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;
use tracing::{debug, info, instrument, warn};
use warmroll_proto::fleet::Credentials;
use warmroll_proto::image::{Digest, ImageRef};

use crate::containerd::ContentStore;
use crate::cri::{Backoff, Cri, CriError};
use crate::inventory::digest_of_reference;
use crate::metrics::Metrics;
use crate::progress::{PullProgress, Tracker};
use warmroll_proto::units::parse_bytes;

/// The CRI auth config for pull credentials. `server_address` stays empty: containerd
/// parses it as a URL and drops the credentials when its host differs from the endpoint it
/// contacts (a mirror, `registry-1.docker.io`), and a pull order is for one image anyway.
fn auth_config(credentials: &Credentials) -> AuthConfig {
    match credentials {
        Credentials::Basic { username, password } => AuthConfig {
            username: username.clone(),
            password: password.clone(),
            ..Default::default()
        },
        Credentials::Token(token) => AuthConfig {
            registry_token: token.clone(),
            ..Default::default()
        },
        // containerd passes it to the token server as an OAuth2 refresh token.
        Credentials::IdentityToken(token) => AuthConfig {
            identity_token: token.clone(),
            ..Default::default()
        },
    }
}

/// A successful warm-up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Warmed {
    pub image: ImageRef,
    /// The digest the node's tag resolves to now (the expected one when one was given).
    pub digest: Option<Digest>,
    /// The image config id the tag points at.
    pub image_id: String,
    pub duration: Duration,
    /// Whether the image had to be fetched (it was not on the node before the pull).
    pub downloaded: bool,
}

/// A failed warm-up. Every variant names the image (its normalised reference).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WarmError {
    #[error("pulling {image}: the registry refused the credentials: {message}")]
    Auth { image: String, message: String },
    #[error("pulling {image}: not found in the registry: {message}")]
    NotFound { image: String, message: String },
    #[error(
        "pulling {image}: the node's tag resolves to {}, not the expected {expected} (the tag moved again?)",
        found.as_ref().map_or_else(|| "no digest".to_string(), Digest::to_string)
    )]
    DigestMismatch {
        image: String,
        expected: Digest,
        found: Option<Digest>,
    },
    #[error("pulling {image}: no result within {after:?}{}", last_error.as_ref().map(|e| format!(" (last error: {e})")).unwrap_or_default())]
    Timeout {
        image: String,
        after: Duration,
        last_error: Option<String>,
    },
    #[error(
        "pulling {image}: only {free} bytes free on the image filesystem {}, below the floor of {floor} bytes",
        path.display()
    )]
    InsufficientDisk {
        image: String,
        path: PathBuf,
        free: u64,
        floor: u64,
    },
    #[error("pulling {image}: runtime error: {message}")]
    Runtime { image: String, message: String },
}

impl WarmError {
    /// The `outcome` label of `warmroll_agent_pulls_total`.
    pub fn outcome(&self) -> &'static str {
        match self {
            WarmError::Auth { .. } => "auth",
            WarmError::NotFound { .. } => "not_found",
            WarmError::DigestMismatch { .. } => "digest_mismatch",
            WarmError::Timeout { .. } => "timeout",
            WarmError::InsufficientDisk { .. } => "insufficient_disk",
            WarmError::Runtime { .. } => "runtime",
        }
    }
}

pub type WarmOutcome = Result<Warmed, WarmError>;

/// How a failed `PullImage` is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullFailure {
    Auth,
    NotFound,
    /// Worth retrying: the runtime or registry was unreachable or overloaded.
    Transient,
    Permanent,
}

/// Classify a `PullImage` failure from its gRPC code and the runtime's message
/// (containerd wraps the registry's answer in the message text).
pub fn classify_pull_error(code: Option<tonic::Code>, message: &str) -> PullFailure {
    let m = message.to_ascii_lowercase();
    let has = |needles: &[&str]| needles.iter().any(|n| m.contains(n));
    if has(&[
        "401",
        "403",
        "unauthorized",
        "forbidden",
        "authorization failed",
        "access denied",
        "no basic auth credentials",
        "failed to fetch oauth token",
        "failed to fetch anonymous token",
        "authentication required",
        "insufficient_scope",
    ]) || matches!(
        code,
        Some(tonic::Code::Unauthenticated | tonic::Code::PermissionDenied)
    ) {
        return PullFailure::Auth;
    }
    if has(&["not found", "manifest unknown", "name unknown", "404"])
        || code == Some(tonic::Code::NotFound)
    {
        return PullFailure::NotFound;
    }
    if code.is_none()
        || matches!(
            code,
            Some(
                tonic::Code::Unavailable
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::ResourceExhausted
                    | tonic::Code::Aborted
            )
        )
        || has(&[
            "connection refused",
            "connection reset",
            "broken pipe",
            "i/o timeout",
            "timeout",
            "timed out",
            "429",
            "too many requests",
            "500 internal server error",
            "502",
            "503",
            "504",
            "temporary",
            "unexpected eof",
            ": eof",
            "no route to host",
            "transport",
        ])
    {
        return PullFailure::Transient;
    }
    PullFailure::Permanent
}

fn classify(error: &CriError) -> PullFailure {
    match error {
        // The runtime did not answer: retry.
        CriError::Connect { .. } | CriError::Timeout { .. } | CriError::Discover { .. } => {
            PullFailure::Transient
        }
        CriError::Call { code, message, .. } => classify_pull_error(Some(*code), message),
        CriError::NotCriV1 { .. } => PullFailure::Permanent,
    }
}

/// Warm-up settings (also the command-line flags of the commands that pull).
#[derive(Debug, Clone, clap::Args)]
pub struct WarmConfig {
    /// At most this many pulls at once on the node.
    #[arg(long, env = "WARMROLL_MAX_CONCURRENT_PULLS", default_value_t = 2)]
    pub max_concurrent_pulls: usize,
    /// No pull when the image filesystem has less free space than this (bytes, or with a
    /// suffix: 500M, 2GiB); 0 disables the check.
    #[arg(long, env = "WARMROLL_MIN_FREE_DISK", default_value = "1GiB", value_parser = parse_bytes)]
    pub min_free_disk: u64,
    /// After a pull that downloaded, write the image filesystem back to disk (syncfs)
    /// before reporting the warm-up done, so that stopping the containers it replaces
    /// does not pay for that writeback.
    #[arg(
        long,
        env = "WARMROLL_FLUSH_AFTER_PULL",
        default_value_t = true,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true"
    )]
    pub flush_after_pull: bool,
}

/// Why the image filesystem was not written back after a pull (logged, never a failure
/// of the warm-up: the image is on the node either way).
#[derive(Debug, thiserror::Error)]
enum FlushError {
    #[error("ImageFsInfo failed: {0}")]
    FsInfo(CriError),
    #[error("ImageFsInfo did not answer by the order's deadline")]
    FsInfoDeadline,
    #[error("the runtime names no image filesystem")]
    NoMountpoint,
    #[error("opening the image filesystem {}: {source}", path.display())]
    Open { path: PathBuf, source: nix::Error },
    #[error("syncfs on the image filesystem {}: {source}", path.display())]
    Sync { path: PathBuf, source: nix::Error },
    #[error("flushing the image filesystem {}: {message}", path.display())]
    Task { path: PathBuf, message: String },
    #[error(
        "flushing the image filesystem {}: not done by the order's deadline (it goes on in the background)",
        path.display()
    )]
    Deadline { path: PathBuf },
}

/// Writes back the dirty pages of the whole filesystem holding the directory `path`.
/// `syncfs` acts on the filesystem, not on the mount: it works through a read-only bind
/// mount of the directory too.
fn sync_filesystem(path: &Path) -> Result<(), FlushError> {
    let dir = nix::fcntl::open(
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|source| FlushError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    nix::unistd::syncfs(&dir).map_err(|source| FlushError::Sync {
        path: path.to_path_buf(),
        source,
    })
}

type SharedOutcome = Shared<BoxFuture<'static, WarmOutcome>>;
type Key = (ImageRef, Option<Digest>);

/// A pull in flight: its outcome (shared by merged requests) and its progress.
struct InFlight {
    outcome: SharedOutcome,
    progress: watch::Receiver<Option<PullProgress>>,
    /// Tells this pull from a later one of the same key.
    serial: u64,
    /// Requests waiting for the outcome; the pull stops when the last one goes.
    waiters: usize,
    task: tokio::task::AbortHandle,
    started: Instant,
}

/// One request's hold on a pull in flight: dropping it (the request finished, timed out,
/// or its order was cancelled) lets go; the last one to let go of an unfinished pull
/// stops it.
struct Waiter<C> {
    inner: Arc<Inner<C>>,
    key: Key,
    serial: u64,
}

impl<C> Drop for Waiter<C> {
    fn drop(&mut self) {
        let mut inflight = self
            .inner
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let Some(entry) = inflight
            .get_mut(&self.key)
            .filter(|e| e.serial == self.serial)
        else {
            // The pull finished (and left the map) already.
            return;
        };
        entry.waiters = entry.waiters.saturating_sub(1);
        if entry.waiters > 0 {
            return;
        }
        if let Some(stopped) = inflight.remove(&self.key) {
            stopped.task.abort();
            self.inner
                .metrics
                .pull_finished("cancelled", stopped.started.elapsed());
            info!(image = %self.key.0, "nobody waits for this pull any more: stopped");
        }
    }
}

struct Inner<C> {
    cri: Arc<C>,
    /// containerd's content store, for pull progress (none: no progress is reported).
    content: Option<Arc<dyn ContentStore>>,
    permits: Semaphore,
    config: WarmConfig,
    metrics: Metrics,
    inflight: Mutex<HashMap<Key, InFlight>>,
    next_serial: std::sync::atomic::AtomicU64,
    /// Writes the image filesystem back ([`sync_filesystem`]; tests put a slow one here).
    flush: fn(&Path) -> Result<(), FlushError>,
}

/// Runs warm-ups on the node. Clones share the semaphore and the in-flight pulls.
pub struct Warmer<C> {
    inner: Arc<Inner<C>>,
}

impl<C> Clone for Warmer<C> {
    fn clone(&self) -> Self {
        Warmer {
            inner: self.inner.clone(),
        }
    }
}

/// A warm-up under way: `.await` it for the outcome; [`Warming::progress`] follows the
/// bytes pulled so far (sampled at most once per second, updated only on change).
pub struct Warming {
    progress: watch::Receiver<Option<PullProgress>>,
    outcome: BoxFuture<'static, WarmOutcome>,
}

impl Warming {
    /// The pull's progress; stays `None` where the runtime shows none (not containerd).
    pub fn progress(&self) -> watch::Receiver<Option<PullProgress>> {
        self.progress.clone()
    }
}

impl std::future::IntoFuture for Warming {
    type Output = WarmOutcome;
    type IntoFuture = BoxFuture<'static, WarmOutcome>;

    fn into_future(self) -> Self::IntoFuture {
        self.outcome
    }
}

impl<C: Cri> Warmer<C> {
    /// A warmer pulling through `cri`; `content` (containerd's content store, where the
    /// runtime is containerd) adds pull progress.
    pub fn new(
        cri: Arc<C>,
        content: Option<Arc<dyn ContentStore>>,
        config: WarmConfig,
        metrics: Metrics,
    ) -> Self {
        Warmer {
            inner: Arc::new(Inner {
                cri,
                content,
                permits: Semaphore::new(config.max_concurrent_pulls.max(1)),
                config,
                metrics,
                inflight: Mutex::new(HashMap::new()),
                next_serial: std::sync::atomic::AtomicU64::new(0),
                flush: sync_filesystem,
            }),
        }
    }

    /// Pull `image` (by its tag) and check the node's tag resolves to `expected`.
    /// A request identical to one in flight (same image and expected digest) waits for
    /// that pull instead of starting another; each caller's own `deadline` still applies.
    /// Dropping the returned [`Warming`] before it finishes withdraws the request; the
    /// pull stops when no request waits for it.
    pub fn warm(
        &self,
        image: &ImageRef,
        expected: Option<&Digest>,
        credentials: Option<Credentials>,
        deadline: Instant,
    ) -> Warming {
        let key: Key = (image.clone(), expected.cloned());
        let (shared, progress, waiter) = {
            let mut inflight = self
                .inner
                .inflight
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            match inflight.get_mut(&key) {
                Some(s) => {
                    info!(image = %image, "identical warm-up in flight; waiting for it");
                    s.waiters += 1;
                    let waiter = Waiter {
                        inner: self.inner.clone(),
                        key: key.clone(),
                        serial: s.serial,
                    };
                    (s.outcome.clone(), s.progress.clone(), waiter)
                }
                None => {
                    let inner = self.inner.clone();
                    let task_key = key.clone();
                    let serial = self
                        .inner
                        .next_serial
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let (progress_tx, progress) = watch::channel(None);
                    let handle = tokio::spawn(async move {
                        let started = Instant::now();
                        let outcome = inner
                            .warm_once(
                                &task_key.0,
                                task_key.1.as_ref(),
                                credentials,
                                deadline,
                                &progress_tx,
                            )
                            .await;
                        let label = match &outcome {
                            Ok(_) => "ok",
                            Err(e) => e.outcome(),
                        };
                        inner.metrics.pull_finished(label, started.elapsed());
                        let mut inflight = inner.inflight.lock().unwrap_or_else(|e| e.into_inner());
                        if inflight.get(&task_key).is_some_and(|e| e.serial == serial) {
                            inflight.remove(&task_key);
                        }
                        outcome
                    });
                    let task = handle.abort_handle();
                    let failed_image = image.clone();
                    let shared = handle
                        .map(move |joined| {
                            joined.unwrap_or_else(|e| {
                                Err(WarmError::Runtime {
                                    image: failed_image.to_string(),
                                    message: format!("warm-up task failed: {e}"),
                                })
                            })
                        })
                        .boxed()
                        .shared();
                    inflight.insert(
                        key.clone(),
                        InFlight {
                            outcome: shared.clone(),
                            progress: progress.clone(),
                            serial,
                            waiters: 1,
                            task,
                            started: Instant::now(),
                        },
                    );
                    let waiter = Waiter {
                        inner: self.inner.clone(),
                        key,
                        serial,
                    };
                    (shared, progress, waiter)
                }
            }
        };
        let image = image.clone();
        let outcome = async move {
            // Held until the outcome is in (or this request is dropped).
            let _waiter = waiter;
            let started = Instant::now();
            // The pull task ends by its own deadline with the precise error; the grace
            // only matters to a merged caller whose deadline is earlier than the pull's.
            match tokio::time::timeout_at(deadline + Duration::from_millis(500), shared).await {
                Ok(outcome) => outcome,
                Err(_) => Err(WarmError::Timeout {
                    image: image.to_string(),
                    after: started.elapsed(),
                    last_error: None,
                }),
            }
        }
        .boxed();
        Warming { progress, outcome }
    }
}

/// Samples `tracker` every second and publishes each changed value; never returns.
async fn follow_progress(
    store: &dyn ContentStore,
    tracker: &mut Tracker,
    progress: &watch::Sender<Option<PullProgress>>,
) -> std::convert::Infallible {
    let mut ticks = tokio::time::interval(PROGRESS_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        ticks.tick().await;
        match tracker.sample(store).await {
            Ok(Some(p)) => {
                failing = false;
                publish(progress, p);
            }
            Ok(None) => failing = false,
            Err(e) => {
                if !failing {
                    debug!(error = %e, "pull progress unavailable for now");
                }
                failing = true;
            }
        }
    }
}

/// Sends `p` when it differs from the last value.
fn publish(progress: &watch::Sender<Option<PullProgress>>, p: PullProgress) {
    progress.send_if_modified(|current| {
        let changed = *current != Some(p);
        *current = Some(p);
        changed
    });
}

/// How often a running pull's progress is sampled.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

impl<C: Cri> Inner<C> {
    #[instrument(skip(self, credentials, progress), fields(image = %image, expected = ?expected.map(ToString::to_string)))]
    async fn warm_once(
        &self,
        image: &ImageRef,
        expected: Option<&Digest>,
        credentials: Option<Credentials>,
        deadline: Instant,
        progress: &watch::Sender<Option<PullProgress>>,
    ) -> WarmOutcome {
        let started = Instant::now();
        let timeout = |last_error: Option<String>| WarmError::Timeout {
            image: image.to_string(),
            after: started.elapsed(),
            last_error,
        };
        let Ok(_permit) = tokio::time::timeout_at(deadline, self.permits.acquire()).await else {
            return Err(timeout(Some("waiting for a free pull slot".into())));
        };
        let runtime = |e: CriError| WarmError::Runtime {
            image: image.to_string(),
            message: e.to_string(),
        };
        match tokio::time::timeout_at(deadline, self.check_disk(image)).await {
            Err(_) => return Err(timeout(Some("checking free disk space".into()))),
            Ok(r) => r?,
        }
        let name = image.to_string();
        let auth = credentials.as_ref().map(auth_config);
        let pull = self.pull(image, &name, auth, deadline, started);
        let before = match &self.content {
            None => pull.await?,
            Some(store) => {
                let (os, arch) = (std::env::consts::OS, crate::session::oci_architecture());
                let mut tracker = Tracker::new(expected, os, arch, None);
                let before = tokio::select! {
                    before = pull => before?,
                    never = follow_progress(store.as_ref(), &mut tracker, progress) => match never {},
                };
                match tokio::time::timeout(Duration::from_secs(5), tracker.finish(store.as_ref()))
                    .await
                {
                    Ok(Ok(Some(p))) => publish(progress, p),
                    Ok(Ok(None)) => {}
                    Ok(Err(e)) => debug!(error = %e, "final pull progress unavailable"),
                    Err(_) => debug!("final pull progress timed out"),
                }
                before
            }
        };
        let status = match tokio::time::timeout_at(deadline, self.cri.image_status(&name)).await {
            Err(_) => return Err(timeout(Some("checking the pulled image".into()))),
            Ok(r) => r.map_err(runtime)?,
        };
        let Some(status) = status else {
            return Err(WarmError::Runtime {
                image: image.to_string(),
                message: "the pull succeeded but the runtime does not know the tag afterwards"
                    .into(),
            });
        };
        let digests = digests_in_repository(&status.repo_digests, image);
        let digest = match expected {
            Some(want) if digests.contains(want) => Some(want.clone()),
            Some(want) => {
                return Err(WarmError::DigestMismatch {
                    image: image.to_string(),
                    expected: want.clone(),
                    found: digests.into_iter().next(),
                });
            }
            None => digests.into_iter().next(),
        };
        let downloaded = !before.iter().any(|i| i.id == status.id);
        if downloaded && self.config.flush_after_pull {
            match self.flush_image_fs(deadline).await {
                Ok((path, took)) => {
                    info!(path = %path.display(), took = ?took, "image filesystem written back");
                }
                Err(e) => warn!(
                    image = %image,
                    error = %e,
                    "image filesystem not written back after the pull; the warm-up is done, \
                     but stopping the containers it replaces may pay for the writeback"
                ),
            }
        }
        let warmed = Warmed {
            image: image.clone(),
            digest,
            image_id: status.id,
            duration: started.elapsed(),
            downloaded,
        };
        info!(duration = ?warmed.duration, downloaded, digest = ?warmed.digest.as_ref().map(ToString::to_string), "image warm");
        Ok(warmed)
    }

    /// `PullImage` with retries of transient failures inside the deadline; returns the
    /// images the node held just before the successful pull.
    async fn pull(
        &self,
        image: &ImageRef,
        name: &str,
        auth: Option<AuthConfig>,
        deadline: Instant,
        started: Instant,
    ) -> Result<Vec<Image>, WarmError> {
        let timeout = |last_error: Option<String>| WarmError::Timeout {
            image: image.to_string(),
            after: started.elapsed(),
            last_error,
        };
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(15));
        let mut last_error: Option<String> = None;
        loop {
            // What the node holds before the pull tells whether the pull downloaded.
            let attempt = async {
                let before = self.cri.list_images().await?;
                self.cri.pull_image(name, auth.clone()).await?;
                Ok::<_, CriError>(before)
            };
            let error = match tokio::time::timeout_at(deadline, attempt).await {
                Err(_) => return Err(timeout(last_error)),
                Ok(Ok(before)) => return Ok(before),
                Ok(Err(e)) => e,
            };
            let message = error.to_string();
            match classify(&error) {
                PullFailure::Auth => {
                    return Err(WarmError::Auth {
                        image: image.to_string(),
                        message,
                    });
                }
                PullFailure::NotFound => {
                    return Err(WarmError::NotFound {
                        image: image.to_string(),
                        message,
                    });
                }
                PullFailure::Permanent => {
                    return Err(WarmError::Runtime {
                        image: image.to_string(),
                        message,
                    });
                }
                PullFailure::Transient => {
                    let delay = backoff.next_delay();
                    warn!(error = %message, retry_in = ?delay, "pull failed; retrying");
                    last_error = Some(message);
                    if Instant::now() + delay >= deadline {
                        tokio::time::sleep_until(deadline).await;
                        return Err(timeout(last_error));
                    }
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// The image filesystem's mountpoint as the runtime names it (CRI `ImageFsInfo`);
    /// `None` when it names none.
    async fn image_fs_mountpoint(&self) -> Result<Option<PathBuf>, CriError> {
        Ok(self
            .cri
            .image_fs_info()
            .await?
            .into_iter()
            .filter_map(|f| f.fs_id.map(|id| id.mountpoint))
            .find(|m| !m.is_empty())
            .map(PathBuf::from))
    }

    async fn check_disk(&self, image: &ImageRef) -> Result<(), WarmError> {
        let floor = self.config.min_free_disk;
        if floor == 0 {
            return Ok(());
        }
        let path = match self.image_fs_mountpoint().await {
            Ok(Some(path)) => path,
            Ok(None) => {
                warn!("the runtime names no image filesystem; pulling without the disk check");
                return Ok(());
            }
            Err(e) => {
                warn!(error = %e, "ImageFsInfo failed; pulling without the disk check");
                return Ok(());
            }
        };
        match free_bytes(&path) {
            Ok(free) if free < floor => Err(WarmError::InsufficientDisk {
                image: image.to_string(),
                path,
                free,
                floor,
            }),
            Ok(_) => Ok(()),
            Err(e) => {
                warn!(path = %path.display(), error = %e, "statvfs failed; pulling without the disk check");
                Ok(())
            }
        }
    }

    /// Writes the image filesystem back to disk, waiting at most until `deadline` (the
    /// flush itself goes on past it: `syncfs` cannot be interrupted). Returns the path
    /// and how long the flush took; the metric is observed when `syncfs` returns.
    async fn flush_image_fs(&self, deadline: Instant) -> Result<(PathBuf, Duration), FlushError> {
        let path = match tokio::time::timeout_at(deadline, self.image_fs_mountpoint()).await {
            Err(_) => return Err(FlushError::FsInfoDeadline),
            Ok(found) => found
                .map_err(FlushError::FsInfo)?
                .ok_or(FlushError::NoMountpoint)?,
        };
        let (flush, metrics, task_path) = (self.flush, self.metrics.clone(), path.clone());
        let task = tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            flush(&task_path)?;
            let took = started.elapsed();
            metrics.image_flushed(took);
            Ok(took)
        });
        match tokio::time::timeout_at(deadline, task).await {
            Err(_) => Err(FlushError::Deadline { path }),
            Ok(Err(e)) => Err(FlushError::Task {
                path,
                message: e.to_string(),
            }),
            Ok(Ok(flushed)) => flushed.map(|took| (path, took)),
        }
    }
}

/// Free bytes available to unprivileged users on the filesystem holding `path`.
fn free_bytes(path: &Path) -> Result<u64, nix::Error> {
    let st = nix::sys::statvfs::statvfs(path)?;
    Ok(st.blocks_available().saturating_mul(st.fragment_size()))
}

/// The digests in `repo_digests` (`repo@sha256:…`) that belong to `image`'s repository.
pub fn digests_in_repository(repo_digests: &[String], image: &ImageRef) -> Vec<Digest> {
    let name = image.name();
    repo_digests
        .iter()
        .filter(|r| {
            r.rsplit_once('@')
                .and_then(|(repo, _)| ImageRef::parse(repo).ok())
                .is_some_and(|repo| repo.name() == name)
        })
        .filter_map(|r| digest_of_reference(r))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containerd_messages_are_classified() {
        use tonic::Code;
        let cases = [
            (
                Code::Unknown,
                "failed to pull and unpack image \"127.0.0.1:5000/app:latest\": failed to resolve reference \"127.0.0.1:5000/app:latest\": unexpected status from HEAD request to http://127.0.0.1:5000/v2/app/manifests/latest: 401 Unauthorized",
                PullFailure::Auth,
            ),
            (
                Code::Unknown,
                "failed to pull and unpack image: failed to resolve reference: pull access denied, repository does not exist or may require authorization: server message: insufficient_scope: authorization failed",
                PullFailure::Auth,
            ),
            (
                Code::Unknown,
                "failed to fetch oauth token: unexpected status: 401 Unauthorized",
                PullFailure::Auth,
            ),
            (
                Code::NotFound,
                "failed to pull and unpack image \"127.0.0.1:5000/app:nope\": failed to resolve reference \"127.0.0.1:5000/app:nope\": 127.0.0.1:5000/app:nope: not found",
                PullFailure::NotFound,
            ),
            (
                Code::Unknown,
                "failed to resolve reference: 127.0.0.1:5000/app:nope: not found",
                PullFailure::NotFound,
            ),
            (
                Code::Unknown,
                "failed to copy: httpReadSeeker: failed open: unexpected status code http://127.0.0.1:5000/v2/app/blobs/sha256:ab: 503 Service Unavailable",
                PullFailure::Transient,
            ),
            (
                Code::Unknown,
                "failed to do request: Head \"http://127.0.0.1:5000/v2/app/manifests/latest\": dial tcp 127.0.0.1:5000: connect: connection refused",
                PullFailure::Transient,
            ),
            (
                Code::Unavailable,
                "error reading from server: EOF",
                PullFailure::Transient,
            ),
            (
                Code::Unknown,
                "429 Too Many Requests",
                PullFailure::Transient,
            ),
            (
                Code::Unknown,
                "failed to extract layer: write /var/lib/containerd/x: no space left on device",
                PullFailure::Permanent,
            ),
            (
                Code::InvalidArgument,
                "failed to parse image reference \"UPPER\": invalid reference format",
                PullFailure::Permanent,
            ),
        ];
        for (code, message, want) in cases {
            assert_eq!(classify_pull_error(Some(code), message), want, "{message}");
        }
        assert_eq!(
            classify_pull_error(None, "socket gone"),
            PullFailure::Transient
        );
    }

    #[test]
    fn credentials_never_show_in_debug() {
        let basic = Credentials::Basic {
            username: "ci".into(),
            password: "hunter2".into(),
        };
        let token = Credentials::Token("tok-secret".into());
        let shown = format!("{basic:?} {token:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("tok-secret"),
            "{shown}"
        );
        assert!(shown.contains("ci"));
        let auth = auth_config(&basic);
        assert_eq!(
            (auth.username.as_str(), auth.password.as_str()),
            ("ci", "hunter2")
        );
        assert_eq!(auth_config(&token).registry_token, "tok-secret");
        let identity = Credentials::IdentityToken("refresh-secret".into());
        assert!(!format!("{identity:?}").contains("refresh-secret"));
        assert_eq!(auth_config(&identity).identity_token, "refresh-secret");
    }

    #[test]
    fn byte_sizes_parse() {}

    #[test]
    fn repository_digests_are_matched_after_normalisation() {
        let d1 = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
        let d2 = "sha256:2222222222222222222222222222222222222222222222222222222222222222";
        let image = ImageRef::parse("busybox:1.36").unwrap();
        let got = digests_in_repository(
            &[
                format!("docker.io/library/busybox@{d1}"),
                format!("127.0.0.1:5000/busybox@{d2}"),
            ],
            &image,
        );
        assert_eq!(got, vec![Digest::parse(d1).unwrap()]);
    }

    #[test]
    fn errors_name_the_image_and_the_figures() {
        let image = ImageRef::parse("127.0.0.1:5000/app:latest").unwrap();
        let e = WarmError::InsufficientDisk {
            image: image.to_string(),
            path: "/var/lib/containerd".into(),
            free: 10,
            floor: 20,
        };
        let text = e.to_string();
        assert!(
            text.contains("127.0.0.1:5000/app:latest")
                && text.contains("10")
                && text.contains("20"),
            "{text}"
        );
        assert_eq!(e.outcome(), "insufficient_disk");
        let m = WarmError::DigestMismatch {
            image: image.to_string(),
            expected: Digest::parse(
                "sha256:1111111111111111111111111111111111111111111111111111111111111111",
            )
            .unwrap(),
            found: None,
        };
        assert!(m.to_string().contains("no digest"));
    }

    mod with_fake_cri {
        use super::*;
        use crate::fake::{FakeCri, runtime_gone};
        use k8s_cri::v1::Image;
        use std::sync::atomic::Ordering;

        const OLD: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";
        const NEW: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
        const TAG: &str = "127.0.0.1:5000/app:latest";

        fn img(id: &str, digest: &str, tags: &[&str]) -> Image {
            Image {
                id: id.into(),
                repo_tags: tags.iter().map(|t| t.to_string()).collect(),
                repo_digests: vec![format!("127.0.0.1:5000/app@{digest}")],
                size: 1,
                ..Default::default()
            }
        }

        /// The node runs the old build; the registry has the new one under the same tag.
        fn node() -> Arc<FakeCri> {
            Arc::new(FakeCri::with(|s| {
                s.images = vec![img("sha256:old", OLD, &[TAG])];
                s.registry
                    .insert(TAG.into(), img("sha256:new", NEW, &[TAG]));
                s.fs_mountpoint = "/".into();
            }))
        }

        /// A warmer that does not write the image filesystem back (the flush has its own
        /// tests below).
        fn warmer(
            fake: &Arc<FakeCri>,
            max: usize,
            min_free_disk: u64,
        ) -> (Warmer<FakeCri>, Metrics) {
            with_config(
                fake,
                WarmConfig {
                    max_concurrent_pulls: max,
                    min_free_disk,
                    flush_after_pull: false,
                },
            )
        }

        fn with_config(fake: &Arc<FakeCri>, config: WarmConfig) -> (Warmer<FakeCri>, Metrics) {
            let metrics = Metrics::new();
            (
                Warmer::new(fake.clone(), None, config, metrics.clone()),
                metrics,
            )
        }

        /// The node of [`node`] whose image filesystem is `mountpoint`, and a warmer that
        /// writes it back after pulls (no free-disk floor).
        fn flushing(mountpoint: &str) -> (Arc<FakeCri>, Warmer<FakeCri>, Metrics) {
            let fake = node();
            fake.edit(|s| s.fs_mountpoint = mountpoint.into());
            let (w, metrics) = with_config(
                &fake,
                WarmConfig {
                    max_concurrent_pulls: 2,
                    min_free_disk: 0,
                    flush_after_pull: true,
                },
            );
            (fake, w, metrics)
        }

        /// How many flushes `warmroll_agent_image_flush_seconds` has counted.
        fn flushes(metrics: &Metrics) -> u64 {
            let text = metrics.encode();
            let line = text
                .lines()
                .find_map(|l| l.strip_prefix("warmroll_agent_image_flush_seconds_count "))
                .unwrap_or_else(|| panic!("no flush count in\n{text}"));
            line.trim().parse().unwrap()
        }

        fn image() -> ImageRef {
            ImageRef::parse(TAG).unwrap()
        }

        fn digest(s: &str) -> Digest {
            Digest::parse(s).unwrap()
        }

        fn soon(secs: u64) -> Instant {
            Instant::now() + Duration::from_secs(secs)
        }

        #[tokio::test]
        async fn pull_moves_the_tag_and_reports_a_download() {
            let fake = node();
            let (w, metrics) = warmer(&fake, 2, 1);
            let creds = Credentials::Basic {
                username: "u".into(),
                password: "p".into(),
            };
            let ok = w
                .warm(&image(), Some(&digest(NEW)), Some(creds), soon(5))
                .await
                .unwrap();
            assert!(ok.downloaded);
            assert_eq!(ok.digest, Some(digest(NEW)));
            assert_eq!(ok.image_id, "sha256:new");
            let auth = fake.state.lock().unwrap().last_auth.clone().unwrap();
            assert_eq!(auth.username, "u");
            // Second time: already there.
            let again = w
                .warm(&image(), Some(&digest(NEW)), None, soon(5))
                .await
                .unwrap();
            assert!(!again.downloaded);
            assert!(
                metrics
                    .encode()
                    .contains("warmroll_agent_pulls_total{outcome=\"ok\"} 2")
            );
        }

        #[tokio::test]
        async fn a_moved_tag_is_a_digest_mismatch_naming_what_was_found() {
            let fake = node();
            let (w, metrics) = warmer(&fake, 2, 0);
            let err = w
                .warm(&image(), Some(&digest(OLD)), None, soon(5))
                .await
                .unwrap_err();
            assert_eq!(
                err,
                WarmError::DigestMismatch {
                    image: TAG.to_string(),
                    expected: digest(OLD),
                    found: Some(digest(NEW)),
                }
            );
            assert!(metrics.encode().contains("outcome=\"digest_mismatch\""));
        }

        #[tokio::test]
        async fn missing_image_and_refused_credentials_are_told_apart() {
            let fake = node();
            let (w, _) = warmer(&fake, 2, 0);
            let missing = ImageRef::parse("127.0.0.1:5000/nope:latest").unwrap();
            let err = w.warm(&missing, None, None, soon(5)).await.unwrap_err();
            assert!(matches!(err, WarmError::NotFound { .. }), "{err}");
            fake.edit(|s| {
                s.pull_failures.push_back(CriError::Call {
                    op: "PullImage",
                    code: tonic::Code::Unknown,
                    message: "unexpected status from HEAD request: 401 Unauthorized".into(),
                })
            });
            let err = w.warm(&image(), None, None, soon(5)).await.unwrap_err();
            assert!(matches!(err, WarmError::Auth { .. }), "{err}");
            assert_eq!(
                fake.pulls.load(Ordering::SeqCst),
                2,
                "no retry for permanent errors"
            );
            // And the next warm-up works.
            w.warm(&image(), Some(&digest(NEW)), None, soon(5))
                .await
                .unwrap();
        }

        #[tokio::test]
        async fn transient_failures_are_retried_inside_the_deadline() {
            let fake = node();
            fake.edit(|s| {
                s.pull_failures.push_back(runtime_gone());
                s.pull_failures.push_back(runtime_gone());
            });
            let (w, _) = warmer(&fake, 2, 0);
            let ok = w
                .warm(&image(), Some(&digest(NEW)), None, soon(20))
                .await
                .unwrap();
            assert_eq!(ok.digest, Some(digest(NEW)));
            assert_eq!(fake.pulls.load(Ordering::SeqCst), 3);
        }

        #[tokio::test]
        async fn a_runtime_that_stays_away_ends_in_a_timeout_with_the_last_error() {
            let fake = node();
            fake.edit(|s| {
                for _ in 0..100 {
                    s.pull_failures.push_back(runtime_gone());
                }
            });
            let (w, _) = warmer(&fake, 2, 0);
            let deadline = Instant::now() + Duration::from_millis(1500);
            let err = w.warm(&image(), None, None, deadline).await.unwrap_err();
            let WarmError::Timeout { last_error, .. } = &err else {
                panic!("expected a timeout, got {err}")
            };
            assert!(
                last_error
                    .as_deref()
                    .unwrap_or("")
                    .contains("connection refused"),
                "{err}"
            );
            assert!(Instant::now() >= deadline);
        }

        #[tokio::test]
        async fn identical_requests_share_one_pull_and_the_pull_limit_holds() {
            let fake = node();
            fake.edit(|s| {
                s.pull_delay = Duration::from_millis(200);
                for n in 0..4 {
                    let tag = format!("127.0.0.1:5000/other{n}:latest");
                    s.registry
                        .insert(tag.clone(), img(&format!("sha256:o{n}"), NEW, &[&tag]));
                }
            });
            let (w, _) = warmer(&fake, 2, 0);
            let same: Vec<_> = (0..5)
                .map(|_| {
                    let w = w.clone();
                    tokio::spawn(async move {
                        w.warm(&image(), Some(&digest(NEW)), None, soon(10)).await
                    })
                })
                .collect();
            for h in same {
                h.await.unwrap().unwrap();
            }
            assert_eq!(fake.pulls.load(Ordering::SeqCst), 1, "merged into one pull");
            let others: Vec<_> = (0..4)
                .map(|n| {
                    let w = w.clone();
                    tokio::spawn(async move {
                        let r =
                            ImageRef::parse(&format!("127.0.0.1:5000/other{n}:latest")).unwrap();
                        w.warm(&r, None, None, soon(10)).await
                    })
                })
                .collect();
            for h in others {
                h.await.unwrap().unwrap();
            }
            assert_eq!(fake.pulls.load(Ordering::SeqCst), 5);
            assert_eq!(
                fake.max_active_pulls.load(Ordering::SeqCst),
                2,
                "at most 2 at once"
            );
        }

        #[tokio::test]
        async fn a_pull_nobody_waits_for_stops_and_one_still_wanted_goes_on() {
            let fake = node();
            fake.edit(|s| s.pull_delay = Duration::from_millis(400));
            let (w, metrics) = warmer(&fake, 2, 0);
            // Two orders merged into one pull; one is withdrawn, the other still gets it.
            let kept = w.warm(&image(), Some(&digest(NEW)), None, soon(10));
            let withdrawn = w.warm(&image(), Some(&digest(NEW)), None, soon(10));
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(withdrawn);
            let warmed = kept.await.unwrap();
            assert_eq!(warmed.digest, Some(digest(NEW)));
            assert_eq!(fake.pulls.load(Ordering::SeqCst), 1);

            // Back to the old image; a pull whose only order goes is stopped: the tag
            // never moves and the runtime call is dropped mid-way.
            let fake = node();
            fake.edit(|s| s.pull_delay = Duration::from_millis(400));
            let (w, metrics_2) = warmer(&fake, 2, 0);
            let alone = tokio::spawn({
                let w = w.clone();
                async move { w.warm(&image(), Some(&digest(NEW)), None, soon(10)).await }
            });
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert_eq!(fake.pulls.load(Ordering::SeqCst), 1, "the pull started");
            alone.abort();
            tokio::time::sleep(Duration::from_millis(700)).await;
            let status = fake.image_status(TAG).await.unwrap().unwrap();
            assert_eq!(status.id, "sha256:old", "the stopped pull moved the tag");
            assert_eq!(
                fake.active_pulls.load(Ordering::SeqCst),
                1,
                "the runtime call was dropped before it returned"
            );
            assert!(
                metrics_2
                    .encode()
                    .contains("warmroll_agent_pulls_total{outcome=\"cancelled\"} 1"),
                "{}",
                metrics_2.encode()
            );
            assert!(!metrics.encode().contains("cancelled"));
            // A new order for the same image pulls afresh.
            let again = w.warm(&image(), Some(&digest(NEW)), None, soon(10)).await;
            assert_eq!(again.unwrap().digest, Some(digest(NEW)));
            assert_eq!(fake.pulls.load(Ordering::SeqCst), 2);
        }

        #[tokio::test]
        async fn a_download_is_written_back_once_and_a_present_image_is_not() {
            let dir = tempfile::tempdir().unwrap();
            let (fake, w, metrics) = flushing(dir.path().to_str().unwrap());
            assert_eq!(flushes(&metrics), 0);
            let ok = w
                .warm(&image(), Some(&digest(NEW)), None, soon(30))
                .await
                .unwrap();
            assert!(ok.downloaded);
            assert_eq!(flushes(&metrics), 1, "one syncfs after the download");
            let again = w
                .warm(&image(), Some(&digest(NEW)), None, soon(30))
                .await
                .unwrap();
            assert!(!again.downloaded);
            assert_eq!(fake.pulls.load(Ordering::SeqCst), 2);
            assert_eq!(flushes(&metrics), 1, "nothing downloaded, nothing flushed");
        }

        #[tokio::test]
        async fn the_flush_can_be_turned_off() {
            let dir = tempfile::tempdir().unwrap();
            let fake = node();
            fake.edit(|s| s.fs_mountpoint = dir.path().to_str().unwrap().into());
            let (w, metrics) = warmer(&fake, 2, 0);
            let ok = w
                .warm(&image(), Some(&digest(NEW)), None, soon(30))
                .await
                .unwrap();
            assert!(ok.downloaded);
            assert_eq!(flushes(&metrics), 0);
        }

        #[tokio::test]
        async fn a_missing_or_bad_image_filesystem_does_not_fail_the_warm_up() {
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("not-a-directory");
            std::fs::write(&file, b"x").unwrap();
            let missing = dir.path().join("gone");
            for mountpoint in ["", missing.to_str().unwrap(), file.to_str().unwrap()] {
                let (_fake, w, metrics) = flushing(mountpoint);
                let ok = w
                    .warm(&image(), Some(&digest(NEW)), None, soon(30))
                    .await
                    .unwrap_or_else(|e| panic!("{mountpoint:?}: {e}"));
                assert!(ok.downloaded, "{mountpoint:?}");
                assert_eq!(ok.digest, Some(digest(NEW)), "{mountpoint:?}");
                assert_eq!(flushes(&metrics), 0, "{mountpoint:?}: nothing flushed");
                assert!(
                    metrics
                        .encode()
                        .contains("warmroll_agent_pulls_total{outcome=\"ok\"} 1"),
                    "{mountpoint:?}"
                );
            }
        }

        #[tokio::test]
        async fn a_slow_flush_ends_at_the_deadline_and_the_warm_up_succeeds() {
            /// Held by the test: the flush cannot end before the test lets it.
            static GATE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
            fn stuck(_: &Path) -> Result<(), FlushError> {
                drop(GATE.blocking_lock());
                Ok(())
            }
            let dir = tempfile::tempdir().unwrap();
            let (_fake, mut w, metrics) = flushing(dir.path().to_str().unwrap());
            Arc::get_mut(&mut w.inner).unwrap().flush = stuck;
            let gate = GATE.lock().await;
            let deadline = Instant::now() + Duration::from_millis(400);
            let ok = w
                .warm(&image(), Some(&digest(NEW)), None, deadline)
                .await
                .unwrap();
            assert!(ok.downloaded);
            assert!(
                Instant::now() >= deadline,
                "waited for the flush until the deadline"
            );
            assert_eq!(flushes(&metrics), 0, "the flush is still running");
            // The flush goes on and is counted when it returns.
            drop(gate);
            let wait = Instant::now() + Duration::from_secs(10);
            while flushes(&metrics) == 0 && Instant::now() < wait {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert_eq!(flushes(&metrics), 1);
        }

        #[tokio::test]
        async fn no_pull_below_the_disk_floor() {
            let fake = node();
            let (w, metrics) = warmer(&fake, 2, u64::MAX);
            let err = w.warm(&image(), None, None, soon(5)).await.unwrap_err();
            let WarmError::InsufficientDisk {
                free, floor, path, ..
            } = &err
            else {
                panic!("expected InsufficientDisk, got {err}")
            };
            assert_eq!(*floor, u64::MAX);
            assert!(*free < *floor);
            assert_eq!(path, &PathBuf::from("/"));
            assert_eq!(fake.pulls.load(Ordering::SeqCst), 0);
            assert!(metrics.encode().contains("outcome=\"insufficient_disk\""));
        }
    }
}
