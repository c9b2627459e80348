//! Drift, as the design defines it, and the rollout decisions built on it: pure
//! functions of the workload, its policy, the registry's answers, what the nodes run,
//! and the engine's memory of what it already did.
//!
//! A container drifts when a digest it runs is neither the tag's current (index) digest
//! nor one of that index's per-platform children.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use warmroll_proto::image::{Digest, ImageRef, Tracking};

use crate::config::{Config, Mode, OnTimeout, Policy, WarmTargets};
use crate::placement::Placement;
use crate::registry::{Resolved, digest_matches};
use crate::window::WindowState;
use crate::workload::{
    APPROVE_ANNOTATION, LAST_ROLLOUT_ANNOTATION, ROLLOUT_REQUEST_ANNOTATION, TemplateContainer,
    Workload, WorkloadKey,
};
use warmroll_proto::fleet::Container;

/// One running container of one of the workload's pods (from an agent, or from the
/// pod status in `report --once`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Running {
    pub node: String,
    pub pod: String,
    pub container: String,
    /// `None` when the runtime does not know the manifest digest.
    pub digest: Option<Digest>,
}

/// What the registry said about a template image this cycle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Tag(Resolved),
    Error(String),
}

/// A container's state, as reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", content = "reason", rename_all = "kebab-case")]
pub enum State {
    InSync,
    Drift,
    Warming,
    Rolling,
    Converged,
    Held(String),
    /// Warm; the patch waits for an approval naming the new digest.
    AwaitingApproval(String),
    /// Warm; the patch waits for the policy's rollout window.
    AwaitingWindow(String),
    Pinned,
    Error(String),
}

impl State {
    pub fn name(&self) -> &'static str {
        match self {
            State::InSync => "in-sync",
            State::Drift => "drift",
            State::Warming => "warming",
            State::Rolling => "rolling",
            State::Converged => "converged",
            State::Held(_) => "held",
            State::AwaitingApproval(_) => "awaiting-approval",
            State::AwaitingWindow(_) => "awaiting-window",
            State::Pinned => "pinned",
            State::Error(_) => "error",
        }
    }

    pub fn reason(&self) -> Option<&str> {
        match self {
            State::Held(r)
            | State::AwaitingApproval(r)
            | State::AwaitingWindow(r)
            | State::Error(r) => Some(r),
            _ => None,
        }
    }

    /// Every state name, for metrics.
    pub const NAMES: [&'static str; 10] = [
        "in-sync",
        "drift",
        "warming",
        "rolling",
        "converged",
        "held",
        "awaiting-approval",
        "awaiting-window",
        "pinned",
        "error",
    ];
}

/// One digest the pods run, with how many pods and nodes run it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningDigest {
    /// `None`: the runtime did not say.
    pub digest: Option<Digest>,
    pub pods: usize,
    pub nodes: usize,
    /// It is the tag's current digest or one of its children.
    pub current: bool,
}

/// A tracked container's drift.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerDrift {
    pub container: String,
    pub image: String,
    pub init: bool,
    /// The tag's current digest (the index digest for a multi-arch image).
    pub registry_digest: Option<Digest>,
    pub running: Vec<RunningDigest>,
    /// Nodes running at least one pod on a digest that is not current.
    #[serde(skip)]
    pub drifted_nodes: BTreeSet<String>,
    pub state: State,
}

impl ContainerDrift {
    pub fn drifts(&self) -> bool {
        self.state == State::Drift
    }
}

/// The template containers a policy tracks.
pub fn tracked_containers<'a>(
    workload: &'a Workload,
    policy: &Policy,
) -> impl Iterator<Item = &'a TemplateContainer> {
    let init = policy.init_containers;
    workload.containers.iter().filter(move |c| {
        (init || !c.init) && policy.counts_pull_policy(c.pull_policy.as_deref(), &c.image)
    })
}

/// The drift of one template container: pure, from the registry's answer and what the
/// workload's pods run.
pub fn container_drift(
    container: &TemplateContainer,
    lookup: Option<&Lookup>,
    running: &[Running],
) -> ContainerDrift {
    let mine: Vec<&Running> = running
        .iter()
        .filter(|r| r.container == container.name)
        .collect();
    let mut drift = ContainerDrift {
        container: container.name.clone(),
        image: container.image.clone(),
        init: container.init,
        registry_digest: None,
        running: Vec::new(),
        drifted_nodes: BTreeSet::new(),
        state: State::InSync,
    };
    let image = match ImageRef::parse(&container.image) {
        Ok(image) => image,
        Err(e) => {
            drift.state = State::Error(format!("bad image reference: {e}"));
            drift.running = group(&mine, |_| false);
            return drift;
        }
    };
    if let Tracking::Pinned(digest) = image.tracking() {
        drift.registry_digest = Some(digest.clone());
        drift.running = group(&mine, |d| d == Some(digest));
        drift.state = State::Pinned;
        return drift;
    }
    let resolved = match lookup {
        Some(Lookup::Tag(resolved)) => resolved,
        Some(Lookup::Error(reason)) => {
            drift.running = group(&mine, |_| false);
            drift.state = State::Error(reason.clone());
            return drift;
        }
        None => {
            drift.running = group(&mine, |_| false);
            drift.state = State::Error("not resolved yet".to_owned());
            return drift;
        }
    };
    drift.registry_digest = Some(resolved.digest.clone());
    let current = |d: Option<&Digest>| d.is_some_and(|d| digest_matches(d, resolved));
    drift.running = group(&mine, current);
    // A runtime that does not say which digest it runs is no evidence of drift.
    drift.drifted_nodes = mine
        .iter()
        .filter(|r| r.digest.is_some() && !current(r.digest.as_ref()))
        .map(|r| r.node.clone())
        .collect();
    if !drift.drifted_nodes.is_empty() {
        drift.state = State::Drift;
    }
    drift
}

fn group(running: &[&Running], current: impl Fn(Option<&Digest>) -> bool) -> Vec<RunningDigest> {
    let mut by_digest: BTreeMap<Option<&Digest>, (BTreeSet<&str>, BTreeSet<&str>)> =
        BTreeMap::new();
    for r in running {
        let entry = by_digest.entry(r.digest.as_ref()).or_default();
        entry.0.insert(&r.pod);
        entry.1.insert(&r.node);
    }
    by_digest
        .into_iter()
        .map(|(digest, (pods, nodes))| RunningDigest {
            current: current(digest),
            digest: digest.cloned(),
            pods: pods.len(),
            nodes: nodes.len(),
        })
        .collect()
}

/// What warmroll last rolled a workload to: the `warmroll.io/last-rollout` annotation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastRollout {
    /// Container name → the digest rolled to.
    pub containers: BTreeMap<String, Digest>,
    pub time: Timestamp,
    pub reason: String,
    /// The `warmroll.io/rollout-requested` value this rollout served, if it was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
}

impl LastRollout {
    /// Reads the annotation; a missing or unreadable one is `None` (an unreadable one
    /// is logged by the caller).
    pub fn from_workload(workload: &Workload) -> Option<Result<LastRollout, String>> {
        workload
            .annotations
            .get(LAST_ROLLOUT_ANNOTATION)
            .map(|text| serde_json::from_str(text).map_err(|e| e.to_string()))
    }

    /// It already rolled every container of `target` to that digest.
    pub fn covers(&self, target: &BTreeMap<String, Digest>) -> bool {
        !target.is_empty()
            && target
                .iter()
                .all(|(c, d)| self.containers.get(c) == Some(d))
    }
}

/// A `warmroll-coordinator rollout` request on the workload that no rollout served yet
/// (neither the recorded one nor, before its record comes back, `served`). Requests are
/// told apart by their value, so a client clock ahead of ours cannot restart twice.
pub fn open_request(
    workload: &Workload,
    last: Option<&LastRollout>,
    served: Option<&str>,
) -> Option<String> {
    let value = workload.annotations.get(ROLLOUT_REQUEST_ANNOTATION)?;
    let done = last.and_then(|l| l.request.as_deref()) == Some(value.as_str())
        || served == Some(value.as_str());
    (!done && !value.is_empty()).then(|| value.clone())
}

/// A requested rollout restarts onto whatever the tags are now: every tracked container
/// whose tag resolved counts as drifting on every node that runs it.
pub fn request_all(containers: &mut [ContainerDrift], running: &[Running]) {
    for c in containers.iter_mut() {
        if matches!(c.state, State::InSync | State::Drift) && c.registry_digest.is_some() {
            c.drifted_nodes = running
                .iter()
                .filter(|r| r.container == c.container)
                .map(|r| r.node.clone())
                .collect();
            if !c.drifted_nodes.is_empty() {
                c.state = State::Drift;
            }
        }
    }
}

/// The digests a `warmroll.io/approve` annotation names (separated by commas or
/// whitespace).
fn approved_digests(workload: &Workload) -> BTreeSet<&str> {
    workload
        .annotations
        .get(APPROVE_ANNOTATION)
        .map(|v| {
            v.split(|c: char| c == ',' || c.is_whitespace())
                .filter(|d| !d.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

/// The gates a ready patch still waits for: an approval naming every new digest (one
/// for an older digest releases nothing), then the rollout window. A requested rollout
/// waits for neither.
fn patch_waits(
    workload: &Workload,
    policy: &Policy,
    target: &BTreeMap<String, Digest>,
    gates: &Gates,
) -> Option<State> {
    if gates.requested.is_some() {
        return None;
    }
    if policy.require_approval {
        let approved = approved_digests(workload);
        let wanted: BTreeSet<String> = target.values().map(Digest::to_string).collect();
        if !wanted.iter().all(|d| approved.contains(d.as_str())) {
            return Some(State::AwaitingApproval(format!(
                "warm; approve with the annotation {APPROVE_ANNOTATION}={} or `warmroll-coordinator approve {}`",
                wanted.into_iter().collect::<Vec<_>>().join(","),
                workload.key
            )));
        }
    }
    if let Some(window) = &policy.window
        && let WindowState::Closed { opens } = window.state(gates.now)
    {
        return Some(State::AwaitingWindow(window.waiting(opens.as_ref())));
    }
    None
}

/// The digest each drifting container should move to.
pub fn drift_target(containers: &[ContainerDrift]) -> BTreeMap<String, Digest> {
    containers
        .iter()
        .filter(|c| c.drifts())
        .filter_map(|c| Some((c.container.clone(), c.registry_digest.clone()?)))
        .collect()
}

/// Nodes to warm: those running drifted pods; with `schedulable` targets also every
/// node `schedulable` names for the template's placement (asked only while something
/// drifts); for a DaemonSet, every node it runs on.
pub fn warm_nodes(
    workload: &Workload,
    targets: WarmTargets,
    containers: &[ContainerDrift],
    running: &[Running],
    schedulable: impl FnOnce(&Placement) -> BTreeSet<String>,
) -> BTreeSet<String> {
    if workload.key.kind == crate::workload::Kind::DaemonSet {
        return running.iter().map(|r| r.node.clone()).collect();
    }
    let mut nodes: BTreeSet<String> = containers
        .iter()
        .filter(|c| c.drifts())
        .flat_map(|c| c.drifted_nodes.iter().cloned())
        .collect();
    if targets == WarmTargets::Schedulable && !nodes.is_empty() {
        nodes.extend(schedulable(&workload.placement));
    }
    nodes
}

/// The engine's memory of one workload's rollout.
#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    Idle,
    /// A new target was first seen at `since`.
    Stabilising {
        target: BTreeMap<String, Digest>,
        since: Timestamp,
    },
    Warming {
        target: BTreeMap<String, Digest>,
        started: Timestamp,
        nodes: BTreeSet<String>,
    },
    Rolling {
        target: BTreeMap<String, Digest>,
        patched: Timestamp,
        partial: bool,
    },
    Held {
        target: BTreeMap<String, Digest>,
        reason: String,
    },
    /// Dry-run: the rollout to `target` was logged, not done.
    DryRun {
        target: BTreeMap<String, Digest>,
        would: String,
    },
}

/// How far a warm-up got.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WarmProgress {
    /// Target nodes holding the new digest.
    pub warm: BTreeSet<String>,
    /// Target nodes whose warm-up failed, with why.
    pub failed: BTreeMap<String, String>,
    /// Warm waves: target nodes whose orders wait for a free slot.
    pub queued: BTreeSet<String>,
    /// When the latest orders went out; the gate's timeout counts from the last wave.
    pub last_sent: Option<Timestamp>,
}

/// Facts outside the workload that gate a rollout.
#[derive(Debug, Clone, PartialEq)]
pub struct Gates {
    pub now: Timestamp,
    pub leader: bool,
    /// Another rollout slot is free under the policy's limit.
    pub slot_free: bool,
    /// An open `warmroll-coordinator rollout` request (its annotation value): roll now,
    /// warm, in any mode, without the stabilisation window, cooldown, approval or
    /// rollout window.
    pub requested: Option<String>,
}

/// What to do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    None,
    /// Order these nodes to pull the target images.
    Warm {
        nodes: BTreeSet<String>,
    },
    /// Patch the workload. `reason` goes into the last-rollout record and the event.
    Patch {
        reason: String,
    },
}

/// The outcome of one decision step for a drifting workload.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub phase: Phase,
    pub action: Action,
    /// The state drifting containers are reported in.
    pub state: State,
    /// Why nothing happens (logged and reported), when that is worth saying.
    pub note: Option<String>,
}

/// Held on `target`: no action, and the reason says why.
fn held(target: BTreeMap<String, Digest>, reason: String) -> Step {
    Step {
        phase: Phase::Held {
            target,
            reason: reason.clone(),
        },
        action: Action::None,
        state: State::Held(reason),
        note: None,
    }
}

fn elapsed(since: Timestamp, now: Timestamp) -> Duration {
    Duration::try_from(now.duration_since(since)).unwrap_or(Duration::ZERO)
}

/// The workload a decision is about, with its drift this cycle.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    pub workload: &'a Workload,
    pub policy: &'a Policy,
    pub containers: &'a [ContainerDrift],
    /// The warm targets.
    pub nodes: &'a BTreeSet<String>,
}

/// One decision step for a workload in `rollout` mode. `containers` are its drift
/// states this cycle, `nodes` the warm targets, `warm` the warm-up's progress so far.
pub fn decide(
    subject: &Subject<'_>,
    phase: &Phase,
    last: Option<&LastRollout>,
    warm: &WarmProgress,
    gates: &Gates,
) -> Step {
    let Subject {
        workload,
        policy,
        containers,
        nodes,
    } = *subject;
    let target = drift_target(containers);
    let now = gates.now;
    let keep = |state: State, note: Option<String>| Step {
        phase: phase.clone(),
        action: Action::None,
        state,
        note,
    };

    if target.is_empty() {
        // Nothing drifts: a rollout in flight has converged.
        return match phase {
            Phase::Rolling { .. } => Step {
                phase: Phase::Idle,
                action: Action::None,
                state: State::Converged,
                note: None,
            },
            _ => Step {
                phase: Phase::Idle,
                action: Action::None,
                state: State::InSync,
                note: None,
            },
        };
    }

    let requested = gates.requested.as_deref();
    // Already rolled to this digest (by us, or by a coordinator before a restart).
    if let Some(last) = last.filter(|l| requested.is_none() && l.covers(&target)) {
        let since = elapsed(last.time, now);
        if workload.status.progress_deadline_exceeded || since > policy.rollout_timeout {
            let reason = format!(
                "rolled to this digest at {} ({}); the new pods did not all come up on it: not patching again",
                last.time, last.reason
            );
            return held(target, reason);
        }
        return Step {
            phase: Phase::Rolling {
                target,
                patched: last.time,
                partial: false,
            },
            action: Action::None,
            state: State::Rolling,
            note: None,
        };
    }

    // Patched this target already; the workload's record may not have come back yet.
    if let Phase::Rolling {
        target: rolled,
        patched,
        ..
    } = phase
        && *rolled == target
    {
        if workload.status.progress_deadline_exceeded
            || elapsed(*patched, now) > policy.rollout_timeout
        {
            let reason = format!(
                "rolled to this digest at {patched}; the new pods did not all come up on it: not patching again"
            );
            return held(target, reason);
        }
        return keep(State::Rolling, None);
    }

    if let Phase::Held {
        target: held,
        reason,
    } = phase
        && *held == target
        && requested.is_none()
    {
        return keep(State::Held(reason.clone()), None);
    }

    if let Phase::DryRun {
        target: done,
        would,
    } = phase
        && *done == target
    {
        return keep(State::Drift, Some(format!("dry-run: {would}")));
    }

    if policy.mode != Mode::Rollout && requested.is_none() {
        return Step {
            phase: Phase::Idle,
            action: Action::None,
            state: State::Drift,
            note: None,
        };
    }

    // A target not seen before starts its stabilisation window (a zero window ends at once).
    let (since, warming) = match phase {
        Phase::Stabilising { target: t, since } if *t == target => (*since, None),
        Phase::Warming {
            target: t,
            started,
            nodes: ordered,
        } if *t == target => (*started, Some((*started, ordered))),
        _ => (now, None),
    };

    let Some((started, ordered)) = warming else {
        let waiting = |note: String| Step {
            phase: Phase::Stabilising {
                target: target.clone(),
                since,
            },
            action: Action::None,
            state: State::Drift,
            note: Some(note),
        };
        if elapsed(since, now) < policy.stabilization_window && requested.is_none() {
            return waiting("new digest: waiting for the stabilisation window".to_owned());
        }
        if let Some(why) = blocked(workload, policy, last, gates) {
            return waiting(why);
        }
        if !policy.warm.enabled && requested.is_none() {
            // Warm-up off: the kubelets pull after the patch.
            if let Some(state) = patch_waits(workload, policy, &target, gates) {
                return Step {
                    phase: Phase::Stabilising {
                        target: target.clone(),
                        since,
                    },
                    action: Action::None,
                    state,
                    note: None,
                };
            }
            return Step {
                phase: Phase::Rolling {
                    target,
                    patched: now,
                    partial: false,
                },
                action: Action::Patch {
                    reason: "warm-up off: patched at once".to_owned(),
                },
                state: State::Rolling,
                note: None,
            };
        }
        return Step {
            phase: Phase::Warming {
                target,
                started: now,
                nodes: nodes.clone(),
            },
            action: Action::Warm {
                nodes: nodes.clone(),
            },
            state: State::Warming,
            note: None,
        };
    };

    // Warming: the gate.
    let total = ordered.len();
    let warm_count = ordered.iter().filter(|n| warm.warm.contains(*n)).count();
    let share = if total == 0 {
        1.0
    } else {
        warm_count as f64 / total as f64
    };
    let done = warm_count
        + ordered
            .iter()
            .filter(|n| warm.failed.contains_key(*n))
            .count();
    // Waves: the timeout runs from the last wave, once no node waits for its order.
    let timed_out = warm.queued.is_empty()
        && elapsed(warm.last_sent.map_or(started, |t| t.max(started)), now) >= policy.warm.timeout;
    let reached = share >= policy.warm.threshold && (done == total || policy.warm.threshold < 1.0);
    let summary = format!("{warm_count}/{total} target nodes warm");
    let failures = if warm.failed.is_empty() {
        String::new()
    } else {
        let list: Vec<String> = warm
            .failed
            .iter()
            .map(|(n, why)| format!("{n}: {why}"))
            .collect();
        format!("; failed: {}", list.join(", "))
    };
    let (reason, partial) = if reached {
        (format!("warm-up done, {summary}"), false)
    } else if timed_out || done == total {
        let why = if timed_out {
            format!("warm-up timed out after {:?}", policy.warm.timeout)
        } else {
            "warm-up finished below the threshold".to_owned()
        };
        match policy.warm.on_timeout {
            OnTimeout::Hold => {
                let reason = format!(
                    "{why} with {summary} (threshold {}){failures}: holding",
                    policy.warm.threshold
                );
                return held(target, reason);
            }
            OnTimeout::Rollout => (
                format!("{why}: rolling with a partial warm-up, {summary}{failures}"),
                true,
            ),
        }
    } else {
        return keep(State::Warming, None);
    };
    if let Some(why) = blocked(workload, policy, last, gates) {
        return keep(State::Warming, Some(format!("{reason}; {why}")));
    }
    if let Some(state) = patch_waits(workload, policy, &target, gates) {
        return keep(state, None);
    }
    let reason = match requested {
        Some(at) => format!("rollout requested ({at}): {reason}"),
        None => reason,
    };
    Step {
        phase: Phase::Rolling {
            target,
            patched: now,
            partial,
        },
        action: Action::Patch { reason },
        state: State::Rolling,
        note: None,
    }
}

/// Why a workload must not be touched now, if it must not.
pub(crate) fn blocked(
    workload: &Workload,
    policy: &Policy,
    last: Option<&LastRollout>,
    gates: &Gates,
) -> Option<String> {
    if !gates.leader {
        return Some("not the leader".to_owned());
    }
    if workload.scaled_to_zero() {
        return Some("scaled to zero".to_owned());
    }
    if workload.status.mid_rollout() {
        return Some("mid-rollout: waiting for the current rollout to finish".to_owned());
    }
    if let Some(last) = last.filter(|_| gates.requested.is_none()) {
        let since = elapsed(last.time, gates.now);
        if since < policy.cooldown {
            return Some(format!(
                "in cooldown for {:?} after the rollout at {}",
                policy.cooldown.saturating_sub(since),
                last.time
            ));
        }
    }
    if !gates.slot_free {
        return Some(format!(
            "waiting for a rollout slot ({} at once)",
            policy.max_concurrent_rollouts
        ));
    }
    None
}

/// `restart` mode: the last schedule time due since `after` (exclusive) and up to `now`.
pub fn restart_due(policy: &Policy, after: Timestamp, now: Timestamp) -> Option<Timestamp> {
    let cron = policy.schedule.as_ref()?;
    let start = after.to_zoned(jiff::tz::TimeZone::UTC);
    let next = cron.find_next_occurrence(&start, false).ok()?;
    (next.timestamp() <= now).then(|| next.timestamp())
}

/// The workloads a configuration tracks, each with its policy: explicit targets first,
/// then the policy label's value, within the policy's kinds and namespaces (targets are
/// in scope by being named). Label values that name no policy come back in `unknown`.
pub fn select<'a>(config: &'a Config, workloads: Vec<Workload>) -> Selection<'a> {
    let mut selection = Selection::default();
    for workload in workloads {
        let by_target = config
            .policies
            .values()
            .find(|p| p.targets.contains(&workload.key));
        if let Some(policy) = by_target {
            selection.tracked.push((workload, policy));
            continue;
        }
        let Some(value) = workload.policy(&config.policy_label) else {
            continue;
        };
        match config.policies.get(value) {
            Some(policy)
                if policy.kinds.contains(&workload.key.kind)
                    && policy.namespaces.contains(&workload.key.namespace) =>
            {
                selection.tracked.push((workload, policy));
            }
            Some(_) => {}
            None => selection
                .unknown
                .push((workload.key.clone(), value.to_owned())),
        }
    }
    selection
}

/// What [`select`] found.
#[derive(Debug, Default)]
pub struct Selection<'a> {
    pub tracked: Vec<(Workload, &'a Policy)>,
    pub unknown: Vec<(WorkloadKey, String)>,
}

/// The running containers of a workload's pods among those of its namespace: pods whose
/// labels match the workload's selector.
pub fn running_of<'a>(
    workload: &Workload,
    in_namespace: impl IntoIterator<Item = &'a (String, Container)>,
) -> Vec<Running> {
    in_namespace
        .into_iter()
        .filter(|(_, c)| {
            c.pod.namespace == workload.key.namespace && workload.selector.matches(&c.pod_labels)
        })
        .map(|(node, c)| Running {
            node: node.clone(),
            pod: c.pod.name.clone(),
            container: c.name.clone(),
            digest: c.digest.clone(),
        })
        .collect()
}

/// Whether an agent's report of `digest` in a container whose template runs `image`
/// would count against the tag's current digest: it would start a rollout (drift) or
/// hold one back (not converged). Such reports are confirmed with the API server before
/// they count; a report on the current digest, with no digest, of a pinned image or of
/// an image not resolved is no evidence either way.
pub fn would_count(image: &ImageRef, lookup: Option<&Lookup>, digest: Option<&Digest>) -> bool {
    let (Some(Lookup::Tag(resolved)), Some(digest)) = (lookup, digest) else {
        return false;
    };
    !matches!(image.tracking(), Tracking::Pinned(_)) && !digest_matches(digest, resolved)
}

#[cfg(test)]
mod tests;
