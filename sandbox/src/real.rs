//! `warmroll-sandbox demo` on a real Kubernetes: the test bed's cluster (the official
//! kube-apiserver, controller-manager, scheduler, kube-proxy and CoreDNS, and real
//! kubelets each with its own containerd, from `scripts/build-kubernetes`), warmroll's
//! images of the release binaries installed with the unchanged chart through `helm`,
//! and a Deployment and a DaemonSet on `app:latest` rolled to a new build.
//!
//! What it prints comes from the cluster itself: the leader's `/report`, the agents'
//! "image warm" log lines, the API server's audit log (when the coordinator patched,
//! and everything it wrote), and the pods' `imageID`s.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;
use warmroll_coordinator::report::Report;
use warmroll_tests::image::ImageBuilder;
use warmroll_tests::kube::helm;
use warmroll_tests::kube::warmroll::{
    Warmed, Warmroll, coordinator_writes, image_ids, is_ready, workload,
};
use warmroll_tests::kube::{AuditEvent, KubeCluster, wait_for};
use warmroll_tests::registry::{Registry, RegistryOptions};
use warmroll_tests::warmroll_image::push_warmroll_images;

use crate::print::{indent, secs, step};
use crate::workloads::{NAMESPACE, POLICY};
use warmroll_proto::units::human_bytes;

/// The chart's agent pods.
const AGENT_PODS: &str = "app.kubernetes.io/component=agent";
const READY_TIMEOUT: Duration = Duration::from_secs(240);
const DEPLOY_TIMEOUT: Duration = Duration::from_secs(180);
const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(300);
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_secs(1);

/// How the real demo runs (the `demo` flags).
#[derive(Debug, Clone)]
pub struct RealOptions {
    pub nodes: u8,
    /// Size of the random layer of each build of `app:latest`.
    pub image_size: u64,
    /// Bytes per second of the registry link during the rollout; 0 = unlimited.
    pub bandwidth: u64,
    /// Delay the registry link adds to each request.
    pub latency: Duration,
    pub replicas: u32,
    pub no_warm: bool,
}

/// One of the demo's workloads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub kind: &'static str,
    pub name: &'static str,
    /// Pods it runs: the replicas, or one per node.
    pub pods: usize,
}

impl Target {
    fn label(&self) -> String {
        format!("{} {}", self.kind, self.name)
    }
}

/// The chart values: the sandbox policy (rollout, polls every 2 s, no stabilization
/// window or cooldown, both workloads at once), warm-gated on every schedulable node or
/// with the warm-up off.
pub fn values(no_warm: bool) -> String {
    let warm = if no_warm {
        "{enabled: false}"
    } else {
        "{enabled: true, threshold: 1.0, timeout: 5m, onTimeout: hold, targets: schedulable}"
    };
    format!(
        "agent:
  inventoryInterval: 2s
config:
  policies:
    {POLICY}:
      mode: rollout
      pollInterval: 2s
      kinds: [Deployment, DaemonSet]
      stabilizationWindow: 0s
      cooldown: 0s
      rolloutTimeout: 5m
      maxConcurrentRollouts: 2
      warm: {warm}
"
    )
}

/// What the demo found, for tests: the API server's version, the report after the
/// rollout, and per workload its writes and whether its nodes were warm before its patch.
#[derive(Debug)]
pub struct Outcome {
    pub version: String,
    pub targets: Vec<Target>,
    pub report: Report,
    pub rollouts: Vec<RolloutOutcome>,
}

/// One workload's rollout, as [`Outcome`] lists it.
#[derive(Debug)]
pub struct RolloutOutcome {
    pub target: Target,
    pub writes: Writes,
    /// Every node held the new image before the workload's patch.
    pub warm_before_patch: bool,
}

/// Runs the demo, printing each step; removes everything it started when it returns (or
/// when its future is dropped).
pub async fn demo(options: &RealOptions) -> Result<Outcome> {
    let started = Instant::now();
    step(&format!(
        "starting a registry and a real Kubernetes cluster with {} nodes",
        options.nodes
    ));
    let registry = Registry::start(RegistryOptions::plain()).await?;
    registry.set_latency(options.latency);
    let cluster = KubeCluster::start(&registry, options.nodes).await?;
    println!(
        "   Kubernetes {} on {} (official kube-apiserver, controller-manager, scheduler, kube-proxy, CoreDNS; {} kubelets each with its own containerd) up in {}",
        cluster.version(),
        cluster.runtime_version(),
        cluster.nodes().len(),
        secs(started.elapsed())
    );
    println!(
        "   registry {} (the cluster pulls from {})",
        registry.host(),
        cluster.registry_host()
    );
    let nodes: Vec<String> = cluster
        .nodes()
        .iter()
        .map(|n| n.spec.name.clone())
        .collect();

    step(&format!(
        "installing warmroll with helm ({})",
        if options.no_warm {
            "warm-up off: patch at once"
        } else {
            "warm-gated, targets: schedulable"
        }
    ));
    let t = Instant::now();
    let images = push_warmroll_images(&registry, "sandbox").await?;
    println!(
        "   images of the release binaries pushed in {}: {}, {}",
        secs(t.elapsed()),
        images.agent.reference,
        images.coordinator.reference
    );
    let t = Instant::now();
    let output = helm::install(&cluster, &images, &values(options.no_warm))?;
    let chart_file = helm::chart_dir().join("Chart.yaml");
    let chart = std::fs::read_to_string(&chart_file)
        .with_context(|| format!("reading {}", chart_file.display()))?;
    println!("   {} in {}", helm_line(&chart, &output), secs(t.elapsed()));
    let warmroll = Warmroll::new(&cluster).await?;
    let t = Instant::now();
    let leader = warmroll.wait_ready(nodes.len(), READY_TIMEOUT).await?;
    println!(
        "   ready in {}: leader {} holds the Lease",
        secs(t.elapsed()),
        leader.metadata.name.as_deref().unwrap_or("(unnamed)")
    );
    for (pod, node) in pods_by_node(&warmroll.pods(helm::NAMESPACE, AGENT_PODS).await?) {
        println!("   agent {pod} Ready on {node}");
    }

    step(&format!(
        "pushing app:latest (build 1, {})",
        human_bytes(options.image_size)
    ));
    let builder = ImageBuilder::new(&registry)?;
    let first = builder
        .push_random("app", "latest", options.image_size)
        .await?;
    println!("   app:latest -> {}", first.manifest_digest);
    let image = cluster.image_ref(&first.reference);
    let targets = [
        Target {
            kind: "Deployment",
            name: "web",
            pods: usize::try_from(options.replicas).context("--replicas")?,
        },
        Target {
            kind: "DaemonSet",
            name: "node-cache",
            pods: nodes.len(),
        },
    ];
    step(&format!(
        "deploying in namespace {NAMESPACE}, labelled warmroll.io/policy={POLICY}, imagePullPolicy Always"
    ));
    for target in &targets {
        let t = Instant::now();
        let manifest = workload(
            target.kind,
            target.name,
            POLICY,
            &image,
            "Always",
            options.replicas,
        );
        warmroll.apply(NAMESPACE, &manifest).await?;
        wait_pods_on(&warmroll, target, &first.manifest_digest).await?;
        println!(
            "   {} rolled out ({} pods Ready) in {}",
            target.label(),
            target.pods,
            secs(t.elapsed())
        );
    }
    let report = settled_report(&warmroll, &targets).await?;
    println!("   coordinator report:\n{}", indent(&report.table()));

    let bandwidth = (options.bandwidth > 0).then_some(options.bandwidth);
    registry.set_bandwidth(bandwidth);
    step(&format!(
        "pushing a new build under app:latest ({}, registry link now {})",
        human_bytes(options.image_size),
        bandwidth.map_or("unlimited".to_owned(), |b| format!("{}/s", human_bytes(b)))
    ));
    let push_started = Timestamp::now();
    let second = builder
        .push_random("app", "latest", options.image_size)
        .await?;
    let pushed = Timestamp::now();
    println!(
        "   app:latest -> {} (times below from the end of the push)",
        second.manifest_digest
    );
    follow(&warmroll, &targets, &nodes, &second.manifest_digest, pushed).await?;

    step("converged");
    let report = settled_report(&warmroll, &targets).await?;
    println!("{}", indent(&report.table()));
    let audit = cluster.audit()?;
    let warm = first_warm(&warmroll.warm_lines().await?, &second.manifest_digest);
    let mut rollouts = Vec::new();
    for target in &targets {
        let writes = Writes::of(&coordinator_writes(&audit, target.name, push_started));
        println!("{}", summary(target, &writes, &warm, &nodes, pushed));
        rollouts.push(RolloutOutcome {
            target: target.clone(),
            warm_before_patch: warm_before_patch(&warm, &nodes, writes.first_patch),
            writes,
        });
    }
    let version = cluster.version().to_owned();

    step("cleaning up");
    let t = Instant::now();
    drop(builder);
    drop(warmroll);
    drop(cluster);
    drop(registry);
    println!(
        "   cluster and registry stopped and removed in {}; demo took {}",
        secs(t.elapsed()),
        secs(started.elapsed())
    );
    Ok(Outcome {
        version,
        targets: targets.to_vec(),
        report,
        rollouts,
    })
}

/// Watches the rollout of the build `digest` pushed at `pushed` until every target's
/// pods all run it, Ready: prints each node's warm-up (the agents' "image warm" lines),
/// the first report showing the drift, each workload's patch (the audit log), each new
/// pod Ready, and each workload converged, with their times since the push.
async fn follow(
    warmroll: &Warmroll<'_>,
    targets: &[Target],
    nodes: &[String],
    digest: &str,
    pushed: Timestamp,
) -> Result<()> {
    let deadline = Instant::now() + ROLLOUT_TIMEOUT;
    let mut warmed = BTreeSet::new();
    let mut patched = BTreeSet::new();
    let mut ready = BTreeSet::new();
    let mut converged = BTreeSet::new();
    let mut drift_shown = false;
    while converged.len() < targets.len() {
        if Instant::now() > deadline {
            let waiting: Vec<String> = targets
                .iter()
                .filter(|t| !converged.contains(t.name))
                .map(Target::label)
                .collect();
            bail!(
                "not converged on {digest} within {ROLLOUT_TIMEOUT:?}: {}",
                waiting.join(", ")
            );
        }
        let mut seen: Vec<(Timestamp, String)> = Vec::new();
        if !drift_shown {
            let report = parse_report(warmroll.report().await?)?;
            if drifting(&report, targets) {
                drift_shown = true;
                seen.push((
                    Timestamp::now(),
                    format!("drift report:\n{}", indent(&report.table())),
                ));
            }
        }
        for (node, at) in first_warm(&warmroll.warm_lines().await?, digest) {
            if nodes.contains(&node) && warmed.insert(node.clone()) {
                seen.push((at, format!("warm-up: {node} holds the new image")));
            }
        }
        let audit = warmroll.cluster.audit()?;
        for target in targets {
            let writes = Writes::of(&coordinator_writes(&audit, target.name, pushed));
            if let Some(at) = writes.first_patch
                && patched.insert(target.name)
            {
                seen.push((at, format!("rollout: {} patched", target.label())));
            }
            if converged.contains(target.name) {
                continue;
            }
            let pods = warmroll
                .pods(NAMESPACE, &format!("app={}", target.name))
                .await?;
            let now = Timestamp::now();
            let on = PodsOn::of(&pods, digest);
            for (pod, node) in &on.ready {
                if ready.insert(pod.clone()) {
                    seen.push((now, format!("  {} pod {pod} ready on {node}", target.name)));
                }
            }
            if on.converged(target.pods) {
                converged.insert(target.name);
                seen.push((
                    now,
                    format!(
                        "converged: every pod of {} runs the new build",
                        target.label()
                    ),
                ));
            }
        }
        seen.sort_by_key(|(at, _)| *at);
        for (at, what) in seen {
            println!("   {} {what}", secs(since(pushed, at)));
        }
        if converged.len() < targets.len() {
            tokio::time::sleep(POLL).await;
        }
    }
    Ok(())
}

/// Waits until `target`'s pods all run `digest`, Ready.
async fn wait_pods_on(warmroll: &Warmroll<'_>, target: &Target, digest: &str) -> Result<()> {
    let what = format!(
        "{} pods of {} Ready on {digest}",
        target.pods,
        target.label()
    );
    wait_for(&what, DEPLOY_TIMEOUT, || async {
        let pods = warmroll
            .pods(NAMESPACE, &format!("app={}", target.name))
            .await?;
        Ok(PodsOn::of(&pods, digest)
            .converged(target.pods)
            .then_some(()))
    })
    .await
}

/// The leader's report once it lists every target settled (see [`settled`]); the last
/// report after [`SETTLE_TIMEOUT`] otherwise.
async fn settled_report(warmroll: &Warmroll<'_>, targets: &[Target]) -> Result<Report> {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        let report = parse_report(warmroll.report().await?)?;
        if settled(&report, targets) || Instant::now() > deadline {
            return Ok(report);
        }
        tokio::time::sleep(POLL).await;
    }
}

pub fn parse_report(json: serde_json::Value) -> Result<Report> {
    serde_json::from_value(json).context("parsing the leader's /report")
}

/// Every target is in the report, each container in sync (or converged) with all the
/// target's pods on the one current digest.
pub fn settled(report: &Report, targets: &[Target]) -> bool {
    targets.iter().all(|t| {
        report
            .workloads
            .iter()
            .find(|w| w.namespace == NAMESPACE && w.name == t.name)
            .is_some_and(|w| {
                !w.containers.is_empty()
                    && w.containers.iter().all(|c| {
                        matches!(c.state.name(), "in-sync" | "converged")
                            && c.running.len() == 1
                            && c.running.iter().all(|r| r.current && r.pods == t.pods)
                    })
            })
    })
}

/// Some target's container is neither in sync nor converged: drift seen, warming,
/// rolling (or held, in error).
pub fn drifting(report: &Report, targets: &[Target]) -> bool {
    report
        .workloads
        .iter()
        .filter(|w| w.namespace == NAMESPACE && targets.iter().any(|t| t.name == w.name))
        .flat_map(|w| &w.containers)
        .any(|c| !matches!(c.state.name(), "in-sync" | "converged"))
}

/// The pods of a workload against a digest.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PodsOn {
    /// Pods not being deleted.
    pub live: usize,
    /// Those Ready with every container on the digest: (pod, node).
    pub ready: Vec<(String, String)>,
}

impl PodsOn {
    pub fn of(pods: &[Pod], digest: &str) -> PodsOn {
        let live: Vec<&Pod> = pods
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect();
        let ready = live
            .iter()
            .filter(|p| {
                let ids = image_ids(p);
                is_ready(p) && !ids.is_empty() && ids.values().all(|id| id.ends_with(digest))
            })
            .map(|p| (pod_name(p), node_name(p)))
            .collect();
        PodsOn {
            live: live.len(),
            ready,
        }
    }

    /// Exactly `pods` pods, all Ready on the digest.
    pub fn converged(&self, pods: usize) -> bool {
        self.live == pods && self.ready.len() == pods
    }
}

fn pod_name(pod: &Pod) -> String {
    pod.metadata
        .name
        .clone()
        .unwrap_or_else(|| "(unnamed)".to_owned())
}

fn node_name(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_else(|| "(unscheduled)".to_owned())
}

/// (pod, node) of each pod, by node.
pub fn pods_by_node(pods: &[Pod]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = pods.iter().map(|p| (pod_name(p), node_name(p))).collect();
    out.sort_by(|a, b| (&a.1, &a.0).cmp(&(&b.1, &b.0)));
    out
}

/// When each node first reported `digest` warm.
pub fn first_warm(lines: &[Warmed], digest: &str) -> BTreeMap<String, Timestamp> {
    let mut first: BTreeMap<String, Timestamp> = BTreeMap::new();
    for line in lines.iter().filter(|w| w.is_digest(digest)) {
        first
            .entry(line.node.clone())
            .and_modify(|at| *at = (*at).min(line.at))
            .or_insert(line.at);
    }
    first
}

/// Every one of `nodes` held the new image (its first warm line) before `patch`.
pub fn warm_before_patch(
    warm: &BTreeMap<String, Timestamp>,
    nodes: &[String],
    patch: Option<Timestamp>,
) -> bool {
    patch.is_some_and(|patch| {
        nodes
            .iter()
            .all(|n| warm.get(n).is_some_and(|at| *at < patch))
    })
}

/// The coordinator's writes for one workload's rollout, from the audit log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Writes {
    pub patches: usize,
    pub events: usize,
    /// Anything else, as `verb resource/name`.
    pub other: Vec<String>,
    /// When the API server received the first patch.
    pub first_patch: Option<Timestamp>,
}

impl Writes {
    pub fn of(writes: &[&AuditEvent]) -> Writes {
        let mut out = Writes::default();
        for e in writes {
            if e.verb == "patch" && e.resource() != "events" {
                out.patches += 1;
                let at = e.request_received_timestamp;
                out.first_patch = Some(out.first_patch.map_or(at, |first| first.min(at)));
            } else if e.resource() == "events" {
                out.events += 1;
            } else {
                out.other
                    .push(format!("{} {}/{}", e.verb, e.resource(), e.name()));
            }
        }
        out
    }
}

/// The summary of one workload's rollout: when it was patched, whether every target
/// node held the new image before (with when each did), and what the coordinator wrote.
pub fn summary(
    target: &Target,
    writes: &Writes,
    warm: &BTreeMap<String, Timestamp>,
    nodes: &[String],
    pushed: Timestamp,
) -> String {
    let per_node: Vec<String> = nodes
        .iter()
        .map(|n| {
            warm.get(n).map_or_else(
                || format!("{n} -"),
                |at| format!("{n} {}", secs(since(pushed, *at)).trim_start()),
            )
        })
        .collect();
    let mut out = format!(
        "   {}: patched {}\n      new image on every target node before the patch: {} (warm: {})\n      coordinator API writes: {} patch(es), {} event(s), {} other",
        target.label(),
        writes.first_patch.map_or("never".to_owned(), |at| format!(
            "{} after the push",
            secs(since(pushed, at)).trim_start()
        )),
        if warm_before_patch(warm, nodes, writes.first_patch) {
            "yes"
        } else {
            "no"
        },
        per_node.join(", "),
        writes.patches,
        writes.events,
        writes.other.len()
    );
    for other in &writes.other {
        out.push_str(&format!("\n      other write: {other}"));
    }
    out
}

/// `at - start`, zero when `at` is earlier.
fn since(start: Timestamp, at: Timestamp) -> Duration {
    Duration::try_from(at.duration_since(start)).unwrap_or(Duration::ZERO)
}

/// What Helm installed: the chart (name, version, app version from `Chart.yaml`) and the
/// release's status and revision from Helm's output.
pub fn helm_line(chart_yaml: &str, helm_output: &str) -> String {
    let get = |text, key| key_value(text, key).unwrap_or("?");
    format!(
        "helm: chart {} {} (app {}), release {} in namespace {}: {}, revision {}",
        get(chart_yaml, "name"),
        get(chart_yaml, "version"),
        get(chart_yaml, "appVersion"),
        helm::RELEASE,
        helm::NAMESPACE,
        get(helm_output, "STATUS"),
        get(helm_output, "REVISION"),
    )
}

/// The value of a top-level `key: value` line, unquoted.
fn key_value<'t>(text: &'t str, key: &str) -> Option<&'t str> {
    text.lines().find_map(|line| {
        let value = line.strip_prefix(key)?.strip_prefix(':')?.trim();
        Some(value.trim_matches('"'))
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use warmroll_tests::kube::warmroll::COORDINATOR_USER;

    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn warmed(node: &str, at: &str, digest: &str) -> Warmed {
        Warmed {
            node: node.to_owned(),
            at: ts(at),
            line: json!({"fields": {"message": "image warm", "digest": format!("Some(\"{digest}\")")}}),
        }
    }

    fn audit(verb: &str, resource: &str, name: &str, at: &str) -> AuditEvent {
        serde_json::from_value(json!({
            "verb": verb,
            "user": {"username": COORDINATOR_USER},
            "objectRef": {"resource": resource, "namespace": "default", "name": name},
            "responseStatus": {"code": 200},
            "requestReceivedTimestamp": at,
            "stageTimestamp": at,
        }))
        .unwrap()
    }

    fn nodes() -> Vec<String> {
        vec!["node-0".to_owned(), "node-1".to_owned()]
    }

    #[test]
    fn the_first_warm_line_per_node_of_the_new_digest_counts() {
        let lines = [
            warmed("node-0", "2026-12-07T12:00:05Z", "sha256:new"),
            warmed("node-0", "2026-12-07T12:00:03Z", "sha256:new"),
            warmed("node-1", "2026-12-07T12:00:01Z", "sha256:old"),
            warmed("node-1", "2026-12-07T12:00:04Z", "sha256:new"),
        ];
        let first = first_warm(&lines, "sha256:new");
        assert_eq!(first.len(), 2);
        assert_eq!(first["node-0"], ts("2026-12-07T12:00:03Z"));
        assert_eq!(first["node-1"], ts("2026-12-07T12:00:04Z"));
    }

    #[test]
    fn warm_before_patch_needs_every_node_warm_before_the_patch() {
        let first = first_warm(
            &[
                warmed("node-0", "2026-12-07T12:00:03Z", "sha256:new"),
                warmed("node-1", "2026-12-07T12:00:04Z", "sha256:new"),
            ],
            "sha256:new",
        );
        let nodes = nodes();
        assert!(warm_before_patch(
            &first,
            &nodes,
            Some(ts("2026-12-07T12:00:05Z"))
        ));
        // One node warm only after the patch.
        assert!(!warm_before_patch(
            &first,
            &nodes,
            Some(ts("2026-12-07T12:00:03.5Z"))
        ));
        // Never patched.
        assert!(!warm_before_patch(&first, &nodes, None));
        // A target node that never reported the image.
        let three = ["node-0", "node-1", "node-2"].map(str::to_owned);
        assert!(!warm_before_patch(
            &first,
            &three,
            Some(ts("2026-12-07T12:00:09Z"))
        ));
    }

    #[test]
    fn writes_count_patches_events_and_the_rest() {
        let events = [
            audit("patch", "deployments", "web", "2026-12-07T12:00:07Z"),
            audit("create", "events", "web.1", "2026-12-07T12:00:07.1Z"),
            audit("patch", "deployments", "web", "2026-12-07T12:00:06Z"),
            audit("update", "deployments", "web", "2026-12-07T12:00:08Z"),
        ];
        let refs: Vec<&AuditEvent> = events.iter().collect();
        let writes = Writes::of(&refs);
        assert_eq!(writes.patches, 2);
        assert_eq!(writes.events, 1);
        assert_eq!(writes.other, vec!["update deployments/web".to_owned()]);
        assert_eq!(writes.first_patch, Some(ts("2026-12-07T12:00:06Z")));
        assert_eq!(Writes::of(&[]), Writes::default());
    }

    #[test]
    fn the_summary_says_whether_the_nodes_were_warm_before_the_patch() {
        let pushed = ts("2026-12-07T12:00:00Z");
        let target = Target {
            kind: "DaemonSet",
            name: "node-cache",
            pods: 2,
        };
        let warm = first_warm(
            &[
                warmed("node-0", "2026-12-07T12:00:02Z", "sha256:new"),
                warmed("node-1", "2026-12-07T12:00:03Z", "sha256:new"),
            ],
            "sha256:new",
        );
        let patch = audit("patch", "daemonsets", "node-cache", "2026-12-07T12:00:04Z");
        let event = audit("create", "events", "node-cache.1", "2026-12-07T12:00:04Z");
        let writes = Writes::of(&[&patch, &event]);
        let text = summary(&target, &writes, &warm, &nodes(), pushed);
        assert!(
            text.contains("DaemonSet node-cache: patched 4.0s after the push"),
            "{text}"
        );
        assert!(
            text.contains("before the patch: yes (warm: node-0 2.0s, node-1 3.0s)"),
            "{text}"
        );
        assert!(text.contains("1 patch(es), 1 event(s), 0 other"), "{text}");

        let none = summary(
            &target,
            &Writes::default(),
            &BTreeMap::new(),
            &nodes(),
            pushed,
        );
        assert!(none.contains("patched never"), "{none}");
        assert!(
            none.contains("before the patch: no (warm: node-0 -, node-1 -)"),
            "{none}"
        );
    }

    fn pod(name: &str, node: &str, ready: bool, image_id: &str, deleting: bool) -> Pod {
        let mut pod = json!({
            "metadata": {"name": name},
            "spec": {"nodeName": node, "containers": [{"name": "main"}]},
            "status": {
                "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
                "containerStatuses": [{
                    "name": "main", "image": "app", "imageID": image_id,
                    "ready": ready, "restartCount": 0,
                }],
            },
        });
        if deleting {
            pod["metadata"]["deletionTimestamp"] = json!("2026-12-07T12:00:00Z");
        }
        serde_json::from_value(pod).unwrap()
    }

    #[test]
    fn pods_on_a_digest_count_only_live_ready_pods_on_it() {
        let pods = [
            pod("a", "node-0", true, "r/app@sha256:new", false),
            pod("b", "node-1", false, "r/app@sha256:new", false),
            pod("c", "node-1", true, "r/app@sha256:old", false),
            pod("d", "node-0", true, "r/app@sha256:old", true),
        ];
        let on = PodsOn::of(&pods, "sha256:new");
        assert_eq!(on.live, 3);
        assert_eq!(on.ready, vec![("a".to_owned(), "node-0".to_owned())]);
        assert!(!on.converged(3));
        let done = PodsOn::of(&pods[..1], "sha256:new");
        assert!(done.converged(1));
        assert!(!done.converged(2));
        assert_eq!(
            pods_by_node(&pods[..3]),
            [("a", "node-0"), ("b", "node-1"), ("c", "node-1")]
                .map(|(p, n)| (p.to_owned(), n.to_owned()))
        );
    }

    fn report(states: &[(&str, &str, usize, bool)]) -> Report {
        let workloads: Vec<_> = states
            .iter()
            .map(|(name, state, pods, current)| {
                json!({
                    "namespace": NAMESPACE, "kind": "Deployment", "name": name,
                    "policy": POLICY, "mode": "rollout",
                    "containers": [{
                        "container": "main", "image": "r/app:latest", "init": false,
                        "registry_digest": "sha256:1111111111111111111111111111111111111111111111111111111111111111",
                        "running": [{"digest": null, "pods": pods, "nodes": 1, "current": current}],
                        "state": {"state": state},
                    }],
                })
            })
            .collect();
        parse_report(json!({
            "time": "2026-12-07T12:00:00Z", "leader": true, "workloads": workloads,
            "summary": {"workloads": 0, "containers": 0, "states": {}},
        }))
        .unwrap()
    }

    #[test]
    fn a_report_is_settled_when_every_target_runs_the_current_digest() {
        let targets = [
            Target {
                kind: "Deployment",
                name: "web",
                pods: 3,
            },
            Target {
                kind: "DaemonSet",
                name: "node-cache",
                pods: 2,
            },
        ];
        let both = report(&[
            ("web", "in-sync", 3, true),
            ("node-cache", "converged", 2, true),
        ]);
        assert!(settled(&both, &targets));
        assert!(!drifting(&both, &targets));
        // A target missing, pods short, or not on the current digest.
        assert!(!settled(&report(&[("web", "in-sync", 3, true)]), &targets));
        assert!(!settled(
            &report(&[
                ("web", "in-sync", 2, true),
                ("node-cache", "in-sync", 2, true)
            ]),
            &targets
        ));
        let old = report(&[
            ("web", "drift", 3, false),
            ("node-cache", "in-sync", 2, true),
        ]);
        assert!(!settled(&old, &targets));
        assert!(drifting(&old, &targets));
    }

    #[test]
    fn the_helm_line_names_chart_release_and_status() {
        let chart = "apiVersion: v2\nname: warmroll\nversion: 0.1.0\nappVersion: \"0.1.0\"\nkubeVersion: \">=1.25.0-0\"\n";
        let output = "Release \"warmroll\" does not exist. Installing it now.\nNAME: warmroll\nLAST DEPLOYED: Mon Dec  7 12:00:00 2026\nNAMESPACE: warmroll\nSTATUS: deployed\nREVISION: 1\nTEST SUITE: None\n";
        assert_eq!(
            helm_line(chart, output),
            "helm: chart warmroll 0.1.0 (app 0.1.0), release warmroll in namespace warmroll: deployed, revision 1"
        );
        assert!(helm_line("", "").contains("chart ? ? (app ?)"));
    }

    #[test]
    fn values_set_the_sandbox_policy_warm_or_not() {
        let warm = values(false);
        assert!(
            warm.contains("    sandbox:\n      mode: rollout\n"),
            "{warm}"
        );
        assert!(warm.contains("targets: schedulable"), "{warm}");
        assert!(warm.contains("stabilizationWindow: 0s"), "{warm}");
        assert!(values(true).contains("warm: {enabled: false}"));
    }
}
