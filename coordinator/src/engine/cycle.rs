//! The engine loop: every second (or at once on a webhook) it resolves the tags whose
//! policy poll interval came round, computes drift from the reflector stores and the
//! fleet view, steps each workload's rollout and acts; every poll it logs the report.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use tracing::{info, warn};
use warmroll_proto::fleet::{Container, NodeName};
use warmroll_proto::image::ImageRef;

use super::act::{Actor, CancelReason, RolledHow, WarmOrders};
use super::confirm::{PodConfirmer, PodReport};
use super::secrets::PullSecrets;
use super::watch::Watches;
use super::watch_health::WatchHealth;
use super::{Shared, containers_of, resolve_all, tag_key};
use crate::config::{Config, Mode, Policy};
use crate::drift::{
    self, Action, ContainerDrift, Gates, LastRollout, Lookup, Phase, State, Subject, decide,
    restart_due, running_of, tracked_containers, warm_nodes,
};
use crate::fleet::view::WarmBytes;
use crate::registry::{Keyring, Resolver};
use crate::report::{Report, WorkloadReport};
use crate::run::Context;
use crate::workload::{Workload, WorkloadKey};

/// How often the engine steps (warm gates and convergence react this fast).
const STEP: Duration = Duration::from_secs(1);

/// The engine's memory of one workload.
struct Memory {
    phase: Phase,
    warm: WarmOrders,
    /// The last note/state logged, to log changes only.
    logged: Option<(String, Option<String>)>,
    /// `restart` mode: schedule times up to here are done.
    restart_after: Timestamp,
    /// The rollout request this engine patched for (its record may not be back yet).
    served: Option<String>,
}

/// The engine's memory across steps.
struct EngineState {
    lookups: HashMap<ImageRef, Lookup>,
    /// Per policy: when its tags were last resolved.
    polled: HashMap<String, Timestamp>,
    workloads: HashMap<WorkloadKey, Memory>,
    warned_unknown: BTreeSet<(WorkloadKey, String)>,
    /// Pushes announced by webhooks, waiting for their drift to show: image → time.
    announced: HashMap<String, Timestamp>,
    secrets: PullSecrets,
    started: Timestamp,
}

pub(crate) async fn run(
    mut ctx: Context,
    config: Config,
    resolver: Resolver,
    keyring: Keyring,
    shared: Arc<Shared>,
    health: WatchHealth,
    confirmer: PodConfirmer,
) -> Result<(), String> {
    let mut watches = Watches::start(&ctx.client, &config, &health);
    tokio::select! {
        _ = watches.ready() => {}
        _ = ctx.shutdown.wait_for(|s| *s) => return Ok(()),
    }
    info!(
        policies = config.policies.len(),
        label = %config.policy_label,
        "policy engine started"
    );
    let actor = Actor::new(ctx.client.clone(), ctx.fleet.clone(), keyring);
    let mut state = EngineState {
        lookups: HashMap::new(),
        polled: HashMap::new(),
        workloads: HashMap::new(),
        warned_unknown: BTreeSet::new(),
        announced: HashMap::new(),
        secrets: PullSecrets::default(),
        started: Timestamp::now(),
    };
    let mut tick = tokio::time::interval(STEP);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shared.nudge.notified() => {}
            _ = ctx.shutdown.wait_for(|s| *s) => break,
        }
        // A watch that ended leaves its store stale for ever: stop, so that the
        // coordinator restarts rather than acting on a frozen view.
        if let Some(why) = watches.ended() {
            return Err(why);
        }
        let leader = *ctx.leader.borrow();
        step(
            &config, &watches, &resolver, &actor, &shared, &confirmer, &mut state, leader, &ctx,
        )
        .await;
    }
    info!("policy engine stopped");
    Ok(())
}

/// The reported pods of tracked workloads whose digest would count against the tag's
/// current digest.
fn suspects(
    tracked: &[(Workload, &Policy)],
    running: &HashMap<String, Vec<(String, Container)>>,
    lookups: &HashMap<ImageRef, Lookup>,
) -> BTreeSet<PodReport> {
    let mut out = BTreeSet::new();
    for (workload, policy) in tracked {
        let Some(in_ns) = running.get(&workload.key.namespace) else {
            continue;
        };
        // Parsed and looked up once per workload, not per reported pod.
        let templates: Vec<(&str, ImageRef, Option<&Lookup>)> =
            tracked_containers(workload, policy)
                .filter_map(|t| {
                    let image = ImageRef::parse(&t.image).ok()?;
                    let lookup = lookups.get(&image);
                    Some((t.name.as_str(), image, lookup))
                })
                .collect();
        for (node, c) in in_ns {
            let counts = workload.selector.matches(&c.pod_labels)
                && templates.iter().any(|(name, image, lookup)| {
                    *name == c.name && drift::would_count(image, *lookup, c.digest.as_ref())
                });
            if counts {
                out.insert(PodReport {
                    node: node.clone(),
                    namespace: c.pod.namespace.clone(),
                    name: c.pod.name.clone(),
                    uid: c.pod.uid.clone(),
                });
            }
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
async fn step(
    config: &Config,
    watches: &Watches,
    resolver: &Resolver,
    actor: &Actor,
    shared: &Shared,
    confirmer: &PodConfirmer,
    state: &mut EngineState,
    leader: bool,
    ctx: &Context,
) {
    let now = Timestamp::now();
    let selection = drift::select(config, watches.workloads());
    for unknown in selection.unknown {
        if state.warned_unknown.insert(unknown.clone()) {
            warn!(workload = %unknown.0, policy = %unknown.1, "label names no configured policy: ignored");
        }
    }
    let tracked = selection.tracked;

    // Resolve the tags of the policies that are due, and those a webhook announced.
    let pushed = shared.take_pushed();
    for (image, at) in &pushed {
        state.announced.entry(image.clone()).or_insert(*at);
    }
    let pushed: BTreeSet<String> = pushed.into_iter().map(|(i, _)| i).collect();
    let due: BTreeSet<&str> = config
        .policies
        .values()
        .filter(|p| {
            state
                .polled
                .get(&p.name)
                .is_none_or(|t| elapsed(*t, now) >= p.poll_interval)
        })
        .map(|p| p.name.as_str())
        .collect();
    // Each workload's pull-secret credentials, for resolving and warming its images.
    let mut keyrings: HashMap<WorkloadKey, Keyring> = HashMap::new();
    for (w, _) in &tracked {
        keyrings.insert(w.key.clone(), state.secrets.keyring(&ctx.client, w).await);
    }
    let mut to_resolve: Vec<(ImageRef, Keyring)> = Vec::new();
    for (w, p) in &tracked {
        let policy_due = due.contains(p.name.as_str());
        for c in tracked_containers(w, p) {
            let Ok(image) = ImageRef::parse(&c.image) else {
                continue;
            };
            let announced = tag_key(&image).is_some_and(|k| pushed.contains(&k));
            if policy_due || announced {
                let keyring = keyrings.get(&w.key).cloned().unwrap_or_default();
                to_resolve.push((image, keyring));
            }
        }
    }
    let polled = !to_resolve.is_empty() || !due.is_empty();
    let results = resolve_all(resolver, to_resolve).await;
    state.lookups.extend(results);
    // Forget tags no tracked workload uses any more.
    let in_use: BTreeSet<ImageRef> = tracked
        .iter()
        .flat_map(|(w, p)| tracked_containers(w, p).filter_map(|c| ImageRef::parse(&c.image).ok()))
        .collect();
    state.lookups.retain(|image, _| in_use.contains(image));
    for name in &due {
        state.polled.insert((*name).to_owned(), now);
    }

    // What the nodes run, by namespace.
    let namespaces: BTreeSet<&str> = tracked
        .iter()
        .map(|(w, _)| w.key.namespace.as_str())
        .collect();
    let mut running: HashMap<String, Vec<(String, Container)>> = HashMap::new();
    for (node, c) in ctx.fleet.containers_in(&namespaces) {
        running
            .entry(c.pod.namespace.clone())
            .or_default()
            .push((node.as_str().to_owned(), c));
    }
    // Reports that would start a rollout or hold one back count only once the API
    // server confirms the pod (an agent may report anything about its node).
    let suspects = suspects(&tracked, &running, &state.lookups);
    if !suspects.is_empty() {
        let refuted = confirmer.unconfirmed(suspects).await;
        if !refuted.is_empty() {
            for pods in running.values_mut() {
                pods.retain(|(_, c)| !refuted.contains(&c.pod.uid));
            }
        }
    }
    // A stable order (by node, then container) for the reports and decisions.
    for pods in running.values_mut() {
        pods.sort_by(|a, b| (&a.0, &a.1.id).cmp(&(&b.0, &b.1.id)));
    }

    let mut rolling: HashMap<&str, usize> = HashMap::new();
    for (w, p) in &tracked {
        if matches!(
            state.workloads.get(&w.key).map(|m| &m.phase),
            Some(Phase::Rolling { .. })
        ) {
            *rolling.entry(p.name.as_str()).or_default() += 1;
        }
    }

    let mut reports = Vec::new();
    let mut seen = BTreeSet::new();
    for (workload, policy) in &tracked {
        seen.insert(workload.key.clone());
        let empty = Vec::new();
        let in_ns = running.get(&workload.key.namespace).unwrap_or(&empty);
        let pods = running_of(workload, in_ns);
        let mut containers = containers_of(workload, policy, &state.lookups, &pods);
        let last = last_rollout(workload);
        let served = state
            .workloads
            .get(&workload.key)
            .and_then(|m| m.served.as_deref());
        let requested = drift::open_request(workload, last.as_ref(), served);
        if requested.is_some() {
            drift::request_all(&mut containers, &pods);
        }
        let nodes = warm_nodes(
            workload,
            policy.warm.targets,
            &containers,
            &pods,
            |placement| {
                watches.nodes().map_or_else(BTreeSet::new, |table| {
                    table.admitting(placement, |node| {
                        NodeName::parse(node).is_ok_and(|n| ctx.fleet.is_ready(&n))
                    })
                })
            },
        );
        let keyring = keyrings.remove(&workload.key).unwrap_or_default();
        let (note, warm_bytes) = step_workload(
            workload,
            &keyring,
            policy,
            &mut containers,
            &nodes,
            last,
            requested,
            state,
            &mut rolling,
            actor,
            shared,
            leader,
            now,
        )
        .await;
        reports.push(WorkloadReport {
            namespace: workload.key.namespace.clone(),
            kind: workload.key.kind,
            name: workload.key.name.clone(),
            policy: policy.name.clone(),
            mode: policy.mode,
            note,
            warm_bytes,
            containers,
        });
    }
    // Workloads no policy tracks any more: their outstanding warm orders are cancelled.
    let gone: Vec<WorkloadKey> = state
        .workloads
        .keys()
        .filter(|k| !seen.contains(*k))
        .cloned()
        .collect();
    for key in gone {
        if let Some(mut memory) = state.workloads.remove(&key) {
            cancel_warm(
                actor,
                shared,
                &mut memory.warm,
                CancelReason::Untracked,
                &key,
            )
            .await;
        }
    }
    shared.metrics.warm_queued(
        state
            .workloads
            .values()
            .map(|m| m.warm.queued_orders())
            .sum(),
    );

    let report = Report::new(now, leader, reports);
    // Time to detect: a push a webhook announced now shows as drift.
    for w in &report.workloads {
        for c in w.containers.iter().filter(|c| c.state != State::InSync) {
            if let Some(key) = ImageRef::parse(&c.image).ok().and_then(|i| tag_key(&i))
                && let Some(at) = state.announced.remove(&key)
            {
                shared.metrics.detected(elapsed(at, now).as_secs_f64());
            }
        }
    }
    state
        .announced
        .retain(|_, at| elapsed(*at, now) < Duration::from_secs(3600));
    shared.metrics.observe_report(&report);
    if polled {
        report.log();
    }
    shared.set_report(report);
}

/// Steps one workload's rollout, acts, and sets the drifting containers' states.
/// Returns the workload's note.
#[allow(clippy::too_many_arguments)]
async fn step_workload<'p>(
    workload: &Workload,
    keyring: &Keyring,
    policy: &'p Policy,
    containers: &mut [ContainerDrift],
    nodes: &BTreeSet<String>,
    last: Option<LastRollout>,
    requested: Option<String>,
    state: &mut EngineState,
    rolling: &mut HashMap<&'p str, usize>,
    actor: &Actor,
    shared: &Shared,
    leader: bool,
    now: Timestamp,
) -> (Option<String>, Option<WarmBytes>) {
    let started = state.started;
    let memory = state
        .workloads
        .entry(workload.key.clone())
        .or_insert_with(|| Memory {
            phase: Phase::Idle,
            warm: WarmOrders::default(),
            logged: None,
            restart_after: started,
            served: None,
        });
    let slot_free =
        rolling.get(policy.name.as_str()).copied().unwrap_or(0) < policy.max_concurrent_rollouts;
    let gates = Gates {
        now,
        leader,
        slot_free,
        requested,
    };
    let progress = memory.warm.progress(now);
    let subject = Subject {
        workload,
        policy,
        containers,
        nodes,
    };
    let mut step = decide(&subject, &memory.phase, last.as_ref(), &progress, &gates);

    // restart mode: the cron schedule, gated like a rollout.
    if policy.mode == Mode::Restart && gates.requested.is_none() {
        let after = last
            .as_ref()
            .map_or(memory.restart_after, |l| l.time.max(memory.restart_after));
        if let Some(slot) = restart_due(policy, after, now) {
            match drift::blocked(workload, policy, last.as_ref(), &gates) {
                Some(why) => step.note = Some(format!("scheduled restart due at {slot}: {why}")),
                None => {
                    memory.restart_after = now;
                    step.action = Action::Patch {
                        reason: format!("scheduled restart ({slot})"),
                    };
                    step.phase = Phase::Rolling {
                        target: containers
                            .iter()
                            .filter_map(|c| Some((c.container.clone(), c.registry_digest.clone()?)))
                            .collect(),
                        patched: now,
                        partial: false,
                    };
                    step.state = State::Rolling;
                }
            }
        }
    }

    // A warm-up superseded by a newer digest, or held: cancel its orders still out.
    if let Some(reason) = CancelReason::of(&memory.phase, &step.phase) {
        cancel_warm(actor, shared, &mut memory.warm, reason, &workload.key).await;
    }

    let dry_run = policy.dry_run;
    match &step.action {
        Action::None => {}
        Action::Warm { nodes } => {
            let target = drift::drift_target(containers);
            if dry_run {
                info!(workload = %workload.key, nodes = ?nodes, target = ?target, "dry-run: would send warm orders");
                memory.warm = WarmOrders::pretend(nodes);
            } else {
                let parallel = policy.warm.max_parallel_nodes.of(nodes.len());
                memory.warm = actor
                    .warm(
                        workload,
                        keyring,
                        &target,
                        nodes,
                        policy.warm.timeout,
                        parallel,
                        now,
                    )
                    .await;
            }
        }
        Action::Patch { reason } => {
            let target = match &step.phase {
                Phase::Rolling { target, .. } => target.clone(),
                _ => BTreeMap::new(),
            };
            if let Phase::Warming { started, .. } = &memory.phase {
                shared.metrics.warmed(elapsed(*started, now).as_secs_f64());
            }
            if dry_run {
                let would = format!("would patch {} ({reason})", workload.key);
                info!(workload = %workload.key, reason = %reason, target = ?target, "dry-run: would roll; nothing written");
                shared.metrics.rollout("dry_run");
                step.phase = Phase::DryRun {
                    target,
                    would: would.clone(),
                };
                step.state = State::Drift;
                step.note = Some(format!("dry-run: {would}"));
            } else {
                let record = LastRollout {
                    containers: target,
                    time: now,
                    reason: reason.clone(),
                    request: gates.requested.clone(),
                };
                match actor.patch(workload, policy, &record).await {
                    Ok(()) => {
                        let partial = matches!(step.phase, Phase::Rolling { partial: true, .. });
                        shared
                            .metrics
                            .rollout(if partial { "partial" } else { "patched" });
                        *rolling.entry(policy.name.as_str()).or_default() += 1;
                        info!(workload = %workload.key, reason = %reason, "rollout: patched the pod template");
                        let how = RolledHow::of(policy, partial, gates.requested.is_some());
                        actor.event(workload, reason, how).await;
                        memory.warm = WarmOrders::default();
                        memory.served = gates.requested.clone();
                    }
                    Err(e) => {
                        shared.metrics.rollout("failed");
                        warn!(workload = %workload.key, error = %e, "rollout patch failed; retrying next step");
                        step.phase = memory.phase.clone();
                        step.state = State::Error(format!("patch failed: {e}"));
                    }
                }
            }
        }
    }

    if step.state == State::Converged
        && let Phase::Rolling { patched, .. } = &memory.phase
    {
        let took = elapsed(*patched, now);
        shared.metrics.converged(took.as_secs_f64());
        info!(workload = %workload.key, seconds = took.as_secs_f64(), "rollout converged: every pod runs the new digest");
    }
    if let (State::Held(reason), false) = (&step.state, matches!(memory.phase, Phase::Held { .. }))
    {
        shared.metrics.rollout("held");
        warn!(workload = %workload.key, reason = %reason, "rollout held");
    }
    if leader {
        shared
            .notifier
            .observe(workload, policy, containers, &memory.phase, &step, now);
    }
    memory.phase = step.phase;
    // Warm waves: the next nodes get their orders as earlier ones finish.
    if leader && matches!(memory.phase, Phase::Warming { .. }) {
        actor.advance(&mut memory.warm, now).await;
    }

    // Drifting containers take the workload's rollout state; a converged rollout marks
    // its in-sync containers.
    for c in containers.iter_mut() {
        match (&c.state, &step.state) {
            (State::Drift, s) if *s != State::InSync && *s != State::Converged => {
                c.state = s.clone();
            }
            (State::InSync, State::Converged) => c.state = State::Converged,
            _ => {}
        }
    }
    let logged = (step.state.name().to_owned(), step.note.clone());
    if memory.logged.as_ref() != Some(&logged) {
        if step.note.is_some() || step.state != State::InSync {
            info!(workload = %workload.key, state = step.state.name(), reason = step.state.reason().unwrap_or_default(), note = step.note.as_deref().unwrap_or_default(), "workload state");
        }
        memory.logged = Some(logged);
    }
    let warm_bytes = if step.state == State::Warming {
        memory.warm.bytes()
    } else {
        None
    };
    (step.note, warm_bytes)
}

/// The workload's last-rollout record; an unreadable one is logged and ignored.
fn last_rollout(workload: &Workload) -> Option<LastRollout> {
    match LastRollout::from_workload(workload)? {
        Ok(last) => Some(last),
        Err(e) => {
            warn!(workload = %workload.key, error = %e, "unreadable last-rollout annotation: ignored");
            None
        }
    }
}

/// Cancels a workload's warm orders still out, counts them, and forgets the warm-up.
async fn cancel_warm(
    actor: &Actor,
    shared: &Shared,
    warm: &mut WarmOrders,
    reason: CancelReason,
    workload: &WorkloadKey,
) {
    let cancelled = actor.cancel(warm, reason, workload).await;
    shared.metrics.warm_cancelled(reason.label(), cancelled);
    *warm = WarmOrders::default();
}

fn elapsed(since: Timestamp, now: Timestamp) -> Duration {
    Duration::try_from(now.duration_since(since)).unwrap_or(Duration::ZERO)
}
