//! Outbound notifications: on a workload's rollout transitions (drift found, warm-up done
//! or failed, patched, converged, held) the engine hands a notification to every
//! receiver configured for that event. Each receiver has a bounded queue and its own
//! delivery task (retries with exponential backoff, a timeout per attempt), so the
//! engine never waits on a receiver: a full queue drops the notification and counts it.
//!
//! Which transitions a step makes is the pure [`transitions`]; the bodies are the pure
//! [`render`]. Receivers' URLs (a Slack URL carries its token) and header values are
//! never logged: a receiver is named by its configured name.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use jiff::Timestamp;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use reqwest::header::{CONTENT_TYPE, HeaderMap};
use serde::Serialize;
use tokio::sync::mpsc;
use tracing::{debug, warn};
use warmroll_proto::image::Digest;

use crate::config::{NotifyEvent, NotifyFormat, NotifyReceiver, Policy};
use crate::drift::{Action, ContainerDrift, Phase, State, Step, drift_target};
use crate::registry::polite::{backoff_delay, retry_after};
use crate::workload::{Workload, WorkloadKey};

/// Why notifications cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("notification receiver {receiver}: cannot build its HTTP client: {source}")]
    BuildClient {
        receiver: String,
        source: reqwest::Error,
    },
}

/// The digests a transition is about, by container.
type Target = BTreeMap<String, Digest>;

/// One transition of a workload's rollout, before it is addressed.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Transition {
    pub event: NotifyEvent,
    pub target: Target,
    pub reason: Option<String>,
}

/// The transitions a workload made in one engine step: `before` is its phase before the
/// step, `step` the decision after the engine acted on it (a failed patch leaves
/// `State::Error`, a dry-run `State::Drift`: neither counts as patched), `drift` the
/// digests its drifting containers should run now, and `seen` the drift last notified.
/// Returns the transitions and the drift to remember.
pub(crate) fn transitions(
    seen: Option<&Target>,
    drift: &Target,
    before: &Phase,
    step: &Step,
) -> (Vec<Transition>, Option<Target>) {
    let mut out = Vec::new();
    let mut push = |event, target: &Target, reason: Option<&str>| {
        out.push(Transition {
            event,
            target: target.clone(),
            reason: reason.map(str::to_owned),
        });
    };
    if !drift.is_empty() && seen != Some(drift) {
        let containers: Vec<&str> = drift.keys().map(String::as_str).collect();
        let reason = format!("{} not on the tag's current digest", containers.join(", "));
        push(NotifyEvent::DriftFound, drift, Some(reason.as_str()));
    }
    let warming = matches!(before, Phase::Warming { .. });
    if let (
        Action::Patch { reason },
        State::Rolling,
        Phase::Rolling {
            target, partial, ..
        },
    ) = (&step.action, &step.state, &step.phase)
    {
        if warming {
            let event = if *partial {
                NotifyEvent::WarmUpFailed
            } else {
                NotifyEvent::WarmUpDone
            };
            push(event, target, Some(reason.as_str()));
        }
        push(NotifyEvent::Patched, target, Some(reason.as_str()));
    }
    if let (State::Held(reason), Phase::Held { target, .. }) = (&step.state, &step.phase)
        && !matches!(before, Phase::Held { .. })
    {
        if warming {
            push(NotifyEvent::WarmUpFailed, target, Some(reason.as_str()));
        }
        push(NotifyEvent::Held, target, Some(reason.as_str()));
    }
    if let (State::Converged, Phase::Rolling { target, .. }) = (&step.state, before) {
        push(
            NotifyEvent::Converged,
            target,
            Some("every pod runs the new digest"),
        );
    }
    let remember = if !drift.is_empty() {
        Some(drift.clone())
    } else if matches!(step.state, State::InSync | State::Converged) {
        None
    } else {
        // A registry error or a restart schedule: the drift seen stays seen.
        seen.cloned()
    };
    (out, remember)
}

/// A notification as receivers get it (the `json` format's body).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Notification {
    pub event: NotifyEvent,
    pub workload: NotifiedWorkload,
    pub policy: String,
    pub images: Vec<NotifiedImage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub time: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct NotifiedWorkload {
    pub namespace: String,
    pub kind: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct NotifiedImage {
    pub container: String,
    /// The template's image reference (the tag).
    pub image: String,
    /// The digest the transition is about.
    pub digest: String,
}

impl Notification {
    fn new(
        key: &WorkloadKey,
        policy: &Policy,
        containers: &[ContainerDrift],
        transition: Transition,
        time: Timestamp,
    ) -> Self {
        let images = transition
            .target
            .iter()
            .map(|(container, digest)| NotifiedImage {
                container: container.clone(),
                image: containers
                    .iter()
                    .find(|c| c.container == *container)
                    .map(|c| c.image.clone())
                    .unwrap_or_default(),
                digest: digest.to_string(),
            })
            .collect();
        Notification {
            event: transition.event,
            workload: NotifiedWorkload {
                namespace: key.namespace.clone(),
                kind: key.kind.to_string(),
                name: key.name.clone(),
            },
            policy: policy.name.clone(),
            images,
            reason: transition.reason,
            time,
        }
    }
}

/// The body of `notification` in `format`.
pub(crate) fn render(format: NotifyFormat, notification: &Notification) -> serde_json::Value {
    match format {
        NotifyFormat::Json => serde_json::to_value(notification).unwrap_or_default(),
        NotifyFormat::Slack => {
            let w = &notification.workload;
            let mut text = format!(
                "warmroll: {}/{}/{} {} (policy {})",
                w.namespace,
                w.kind,
                w.name,
                notification.event.name(),
                notification.policy
            );
            if let Some(reason) = &notification.reason {
                text.push_str(": ");
                text.push_str(reason);
            }
            for image in &notification.images {
                let short = image.digest.get(..19).unwrap_or(&image.digest);
                text.push_str(&format!(
                    "\n• {}: {} → {short}",
                    image.container, image.image
                ));
            }
            serde_json::json!({ "text": text })
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NotifyLabels {
    receiver: String,
    event: String,
    result: String,
}

/// `warmroll_notifications_total{receiver,event,result}`.
#[derive(Clone)]
struct NotifyMetrics(Family<NotifyLabels, Counter>);

impl NotifyMetrics {
    fn count(&self, receiver: &str, event: NotifyEvent, result: &str) {
        self.0
            .get_or_create(&NotifyLabels {
                receiver: receiver.to_owned(),
                event: event.name().to_owned(),
                result: result.to_owned(),
            })
            .inc();
    }
}

/// One receiver's end of the queue.
struct Outbox {
    name: String,
    events: BTreeSet<NotifyEvent>,
    queue: mpsc::Sender<Arc<Notification>>,
}

/// Hands notifications to the receivers' delivery tasks; never waits.
pub(crate) struct Notifier {
    outboxes: Vec<Outbox>,
    /// Per workload, the drift last notified (so it is announced once).
    seen: Mutex<HashMap<WorkloadKey, Target>>,
    metrics: NotifyMetrics,
}

impl Notifier {
    /// Starts a delivery task per receiver and registers the metric in `registry`.
    pub(crate) fn start(
        receivers: &[NotifyReceiver],
        registry: &mut Registry,
    ) -> Result<Notifier, NotifyError> {
        let metrics = NotifyMetrics(Family::default());
        registry.register(
            "warmroll_notifications",
            "Outbound notifications by receiver, event and result (delivered, failed, dropped)",
            metrics.0.clone(),
        );
        if !receivers.is_empty() {
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let mut outboxes = Vec::new();
        for receiver in receivers {
            let client = reqwest::Client::builder()
                .timeout(receiver.timeout)
                .build()
                .map_err(|source| NotifyError::BuildClient {
                    receiver: receiver.name.clone(),
                    source: source.without_url(),
                })?;
            let (queue, rx) = mpsc::channel(receiver.queue_size);
            tokio::spawn(deliver_all(receiver.clone(), client, rx, metrics.clone()));
            outboxes.push(Outbox {
                name: receiver.name.clone(),
                events: receiver.events.clone(),
                queue,
            });
        }
        Ok(Notifier {
            outboxes,
            seen: Mutex::new(HashMap::new()),
            metrics,
        })
    }

    /// After the engine stepped `workload` from `before` to `step`: queues the
    /// notifications of its transitions. Call before the containers take the rollout's
    /// state (their drift is read here).
    pub(crate) fn observe(
        &self,
        workload: &Workload,
        policy: &Policy,
        containers: &[ContainerDrift],
        before: &Phase,
        step: &Step,
        now: Timestamp,
    ) {
        if self.outboxes.is_empty() {
            return;
        }
        let drift = drift_target(containers);
        let found = {
            let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
            let (found, remember) = transitions(seen.get(&workload.key), &drift, before, step);
            match remember {
                Some(target) => seen.insert(workload.key.clone(), target),
                None => seen.remove(&workload.key),
            };
            found
        };
        for transition in found {
            self.send(Notification::new(
                &workload.key,
                policy,
                containers,
                transition,
                now,
            ));
        }
    }

    fn send(&self, notification: Notification) {
        let notification = Arc::new(notification);
        for outbox in &self.outboxes {
            if !outbox.events.contains(&notification.event) {
                continue;
            }
            if outbox.queue.try_send(notification.clone()).is_err() {
                self.metrics
                    .count(&outbox.name, notification.event, "dropped");
                let w = &notification.workload;
                let workload = format!("{}/{}/{}", w.namespace, w.kind, w.name);
                warn!(receiver = %outbox.name, event = notification.event.name(), workload = %workload, "notification queue full: dropped");
            }
        }
    }
}

/// A receiver's delivery task: one notification at a time, until the engine is gone.
async fn deliver_all(
    receiver: NotifyReceiver,
    client: reqwest::Client,
    mut queue: mpsc::Receiver<Arc<Notification>>,
    metrics: NotifyMetrics,
) {
    while let Some(notification) = queue.recv().await {
        let body = serde_json::to_vec(&render(receiver.format, &notification)).unwrap_or_default();
        let delivered = deliver(&client, &receiver, notification.event, body).await;
        let result = if delivered { "delivered" } else { "failed" };
        metrics.count(&receiver.name, notification.event, result);
    }
}

/// What one attempt's answer means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Delivered,
    /// Worth another attempt, after this long (the receiver's `Retry-After`, if any).
    Retry(Option<Duration>),
    /// A refusal no retry changes (4xx other than 408 and 429).
    GiveUp,
}

fn answer(status: reqwest::StatusCode, headers: &HeaderMap) -> Answer {
    if status.is_success() {
        return Answer::Delivered;
    }
    if status.is_server_error()
        || status == reqwest::StatusCode::REQUEST_TIMEOUT
        || status == reqwest::StatusCode::TOO_MANY_REQUESTS
    {
        let after = retry_after(headers, SystemTime::now()).map(|wait| wait.min(MAX_BACKOFF));
        return Answer::Retry(after);
    }
    Answer::GiveUp
}

const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// The wait after failed attempt `attempt` (1-based): 1 s, 2 s, 4 s, … up to 60 s (the
/// registry client's backoff, without jitter: one coordinator notifies).
fn backoff(attempt: u32) -> Duration {
    backoff_delay(attempt, FIRST_BACKOFF, MAX_BACKOFF, 1.0)
}

/// Posts `body` until the receiver takes it or the attempts run out.
async fn deliver(
    client: &reqwest::Client,
    receiver: &NotifyReceiver,
    event: NotifyEvent,
    body: Vec<u8>,
) -> bool {
    for attempt in 1..=receiver.max_attempts {
        let sent = client
            .post(receiver.url.clone())
            .headers(receiver.headers.clone())
            .header(CONTENT_TYPE, "application/json")
            .body(body.clone())
            .send()
            .await;
        let wait = match sent {
            Ok(response) => match answer(response.status(), response.headers()) {
                Answer::Delivered => {
                    debug!(receiver = %receiver.name, event = event.name(), attempt, "notification delivered");
                    return true;
                }
                Answer::Retry(after) => {
                    warn!(receiver = %receiver.name, event = event.name(), attempt, status = response.status().as_u16(), "notification refused; retrying");
                    after.unwrap_or_else(|| backoff(attempt))
                }
                Answer::GiveUp => {
                    warn!(receiver = %receiver.name, event = event.name(), attempt, status = response.status().as_u16(), "notification refused; not retrying");
                    return false;
                }
            },
            Err(e) => {
                // Without the URL: a Slack URL carries its token.
                let e = e.without_url();
                warn!(receiver = %receiver.name, event = event.name(), attempt, error = %e, "notification not delivered; retrying");
                backoff(attempt)
            }
        };
        if attempt < receiver.max_attempts {
            tokio::time::sleep(wait).await;
        }
    }
    warn!(receiver = %receiver.name, event = event.name(), attempts = receiver.max_attempts, "notification given up");
    false
}

#[cfg(test)]
mod tests;
