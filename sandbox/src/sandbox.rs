//! The whole sandbox: a real registry (with a throttled link), a cluster of real
//! containerd nodes, one agent per node and the coordinator, all in this process; and the
//! measurement of one rollout from the push of a new build to the converged workload.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use warmroll_coordinator::report::Report;
use warmroll_coordinator::workload::LAST_ROLLOUT_ANNOTATION;
use warmroll_tests::cluster::{Cluster, ClusterOptions, NotReadyGap};
use warmroll_tests::image::{ImageBuilder, Pushed};
use warmroll_tests::registry::{Registry, RegistryOptions};
use warmroll_tests::tls::TestCa;

use crate::agents::Agents;
use crate::coordinator::{COORDINATOR_USER, Coordinator};
use crate::workloads::{NAMESPACE, POLICY, POLICY_LABEL, Workload};

/// The pod-template annotation the sandbox's policy sets when it rolls.
pub const ANNOTATION_KEY: &str = "warmroll.io/restartedAt";

/// Whether the coordinator warms the new image on the nodes before it rolls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WarmMode {
    /// Warm on every target node first, then patch (warmroll's way).
    Gated,
    /// Patch as soon as drift is seen (what tag-following tools do): the same
    /// coordinator with the policy's warm-up off (`warm: {enabled: false}`), so it sends
    /// no warm orders and the kubelets pull after the patch.
    Off,
}

impl WarmMode {
    pub fn label(self) -> &'static str {
        match self {
            WarmMode::Gated => "warm-gated",
            WarmMode::Off => "patch at once",
        }
    }
}

/// How the sandbox is set up.
#[derive(Debug, Clone)]
pub struct SandboxOptions {
    pub nodes: usize,
    pub warm: WarmMode,
    /// The policy's poll interval (one HEAD per unique tag per interval).
    pub poll_interval: Duration,
    /// Delay the registry link adds to every request.
    pub latency: Duration,
}

impl Default for SandboxOptions {
    fn default() -> Self {
        SandboxOptions {
            nodes: 3,
            warm: WarmMode::Gated,
            poll_interval: Duration::from_secs(1),
            latency: Duration::ZERO,
        }
    }
}

/// The coordinator configuration the sandbox runs with.
pub fn config_yaml(registry_host: &str, options: &SandboxOptions) -> String {
    let warm = match options.warm {
        // Schedulable targets: a Deployment's surge pod may land on a node none of its
        // pods ran on, and should find the image there too.
        WarmMode::Gated => {
            "\n      threshold: 1.0\n      timeout: 10m\n      onTimeout: rollout\n      targets: schedulable"
        }
        WarmMode::Off => "\n      enabled: false",
    };
    format!(
        "policyLabel: {POLICY_LABEL}
registry:
  insecureRegistries: [\"{registry_host}\"]
policies:
  {POLICY}:
    mode: rollout
    pollInterval: {poll}ms
    kinds: [Deployment, DaemonSet]
    stabilizationWindow: 0s
    cooldown: 0s
    rolloutTimeout: 10m
    maxConcurrentRollouts: 4
    annotationKey: {ANNOTATION_KEY}
    warm:{warm}
",
        poll = options.poll_interval.as_millis(),
    )
}

/// A running sandbox. Dropping it stops and removes everything it started (agents,
/// coordinator, kubelets and controllers, containerd with its pods, the registry).
pub struct Sandbox {
    // Dropped in this order: the agents and the coordinator before the cluster they talk
    // to, the registry last.
    agents: Agents,
    coordinator: Coordinator,
    cluster: Cluster,
    images: ImageBuilder,
    _ca: TestCa,
    registry: Registry,
    options: SandboxOptions,
}

impl Sandbox {
    /// Starts everything and waits until every node's agent has a session.
    pub async fn start(options: SandboxOptions) -> Result<Self> {
        warmroll_tests::tls::install_crypto_provider();
        let registry = Registry::start(RegistryOptions::plain()).await?;
        registry.set_latency(options.latency);
        let images = ImageBuilder::new(&registry)?;
        let cluster = Cluster::start(
            ClusterOptions {
                // A safety net only: the kubelets and controllers act on watch events, so
                // no timing depends on it.
                resync: Duration::from_secs(5),
                pull_backoff: Duration::from_millis(200),
                max_pull_backoff: Duration::from_secs(2),
                ..ClusterOptions::nodes(options.nodes)
            },
            &registry,
        )
        .await?;
        let ca = TestCa::new()?;
        let coordinator =
            Coordinator::start(cluster.api(), &ca, &config_yaml(registry.host(), &options)).await?;
        let agents = Agents::start(&cluster, &ca, coordinator.grpc_url()).await?;
        let sandbox = Sandbox {
            agents,
            coordinator,
            cluster,
            images,
            _ca: ca,
            registry,
            options,
        };
        sandbox.wait_agents(Duration::from_secs(60)).await?;
        Ok(sandbox)
    }

    async fn wait_agents(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let ready = self.coordinator.ready_agents();
            if ready >= self.options.nodes {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "only {ready} of {} agents reached the coordinator within {timeout:?}",
                    self.options.nodes
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn images(&self) -> &ImageBuilder {
        &self.images
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    pub fn coordinator(&self) -> &Coordinator {
        &self.coordinator
    }

    pub fn options(&self) -> &SandboxOptions {
        &self.options
    }

    /// Creates `workload` and waits until it has rolled out.
    pub async fn deploy(&self, workload: &Workload, timeout: Duration) -> Result<()> {
        workload.create(&self.cluster.client()).await?;
        workload
            .wait_rolled_out(&self.cluster, timeout)
            .await
            .with_context(|| format!("{} {} did not come up", workload.kind, workload.name))
    }

    /// The coordinator's report, waiting for its first cycle if needed.
    pub async fn report(&self) -> Result<Report> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(report) = self.coordinator.report().await? {
                return Ok(report);
            }
            if Instant::now() > deadline {
                bail!("the coordinator served no report within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Runs `push` (a new build under the workloads' tag) and follows what happens until
    /// every pod of every one of `workloads` runs the new build, calling `on` as things
    /// happen. Returns one record per workload, in the same order.
    pub async fn roll(
        &self,
        workloads: &[Workload],
        push: impl Future<Output = Result<Pushed>>,
        timeout: Duration,
        mut on: impl FnMut(Progress<'_>),
    ) -> Result<Vec<Rollout>> {
        let api = self.cluster.api();
        let mark = api.requests().len();
        let mut before = Vec::new();
        for w in workloads {
            before.push(w.template_annotations(api)?.get(ANNOTATION_KEY).cloned());
        }
        let pushed = push.await?;
        let pushed_at = Instant::now();
        let digest = pushed.manifest_digest.clone();
        let pinned = pushed.pinned();
        let mut warm: BTreeMap<String, Duration> = BTreeMap::new();
        let mut rollouts: Vec<Rollout> = workloads
            .iter()
            .map(|w| Rollout {
                workload: w.clone(),
                digest: digest.clone(),
                drift_seen: None,
                warm: BTreeMap::new(),
                patched: None,
                reason: None,
                converged: None,
                gaps: Vec::new(),
                starts: Vec::new(),
                writes: Writes::default(),
            })
            .collect();
        let mut ready_seen = BTreeSet::new();
        let deadline = pushed_at + timeout;
        let mut tick = 0u64;
        loop {
            let now = Instant::now();
            let after = now.saturating_duration_since(pushed_at);
            for node in self.cluster.nodes() {
                if warm.contains_key(node.name()) {
                    continue;
                }
                if node.containerd().image_status(&pinned).await?.is_some() {
                    warm.insert(node.name().to_owned(), after);
                    on(Progress::Warm {
                        node: node.name(),
                        after,
                    });
                }
            }
            let report =
                if tick.is_multiple_of(5) && rollouts.iter().any(|r| r.drift_seen.is_none()) {
                    self.coordinator.report().await?
                } else {
                    None
                };
            for (rollout, before) in rollouts.iter_mut().zip(&before) {
                let workload = &rollout.workload;
                if rollout.drift_seen.is_none()
                    && let Some(report) = &report
                    && drifts(report, workload)
                {
                    rollout.drift_seen = Some(after);
                    on(Progress::Drift { workload, report });
                }
                if rollout.patched.is_none() {
                    let set = workload
                        .template_annotations(api)?
                        .get(ANNOTATION_KEY)
                        .cloned();
                    if set.is_some() && set != *before {
                        rollout.patched = Some(after);
                        rollout.reason = workload
                            .annotations(api)?
                            .get(LAST_ROLLOUT_ANNOTATION)
                            .and_then(|a| serde_json::from_str::<serde_json::Value>(a).ok())
                            .and_then(|v| v.get("reason")?.as_str().map(str::to_owned));
                        on(Progress::Patched {
                            workload,
                            after,
                            reason: rollout.reason.as_deref(),
                        });
                    }
                }
                if rollout.converged.is_some() || !tick.is_multiple_of(2) {
                    continue;
                }
                let pods = self.pods_of(workload);
                for pod in &pods {
                    if pod.deleted.is_none()
                        && on_digest(&pod.image_ids, &digest)
                        && let Some(ready) = pod.ready
                        && ready_seen.insert(pod.name.clone())
                    {
                        on(Progress::PodReady {
                            workload,
                            pod: &pod.name,
                            node: &pod.node,
                            after: ready.saturating_duration_since(pushed_at),
                        });
                    }
                }
                let live: Vec<_> = pods.iter().filter(|p| p.deleted.is_none()).collect();
                let converged = live.len() == workload.pods(self.options.nodes)
                    && live
                        .iter()
                        .all(|p| p.ready.is_some() && on_digest(&p.image_ids, &digest));
                if converged {
                    rollout.converged = Some(
                        live.iter()
                            .filter_map(|p| p.ready)
                            .max()
                            .map_or(after, |r| r.saturating_duration_since(pushed_at)),
                    );
                    rollout.starts = live
                        .iter()
                        .filter_map(|p| {
                            Some(PodStart {
                                pod: p.name.clone(),
                                node: p.node.clone(),
                                took: p.ready?.saturating_duration_since(p.created),
                            })
                        })
                        .collect();
                    on(Progress::Converged {
                        workload,
                        after: rollout.converged.unwrap_or(after),
                    });
                }
            }
            if rollouts.iter().all(|r| r.converged.is_some()) {
                break;
            }
            if now > deadline {
                let pending: Vec<String> = rollouts
                    .iter()
                    .filter(|r| r.converged.is_none())
                    .map(|r| {
                        format!(
                            "{} {} (patched: {:?})",
                            r.workload.kind, r.workload.name, r.patched
                        )
                    })
                    .collect();
                bail!(
                    "no convergence on {digest} within {timeout:?}: {} (nodes holding it: {:?})",
                    pending.join(", "),
                    warm.keys().collect::<Vec<_>>()
                );
            }
            tick += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let requests = api.requests();
        for rollout in &mut rollouts {
            let workload = &rollout.workload;
            rollout.gaps = self.cluster.not_ready_gaps(
                NAMESPACE,
                workload.kind.as_str(),
                &workload.name,
                pushed_at,
            );
            rollout.writes = Writes::of(&requests, mark, workload);
            rollout.warm = warm.clone();
        }
        Ok(rollouts)
    }

    fn pods_of(&self, workload: &Workload) -> Vec<warmroll_tests::cluster::PodRecord> {
        self.cluster
            .pods()
            .into_iter()
            .filter(|p| {
                p.namespace == NAMESPACE
                    && p.owner.as_ref().is_some_and(|o| {
                        o.kind == workload.kind.as_str() && o.name == workload.name
                    })
            })
            .collect()
    }

    /// Registry requests while the coordinator polls a steady state for `polls` poll
    /// intervals: manifest HEADs per tag.
    pub async fn registry_polls(&self, polls: u32) -> RegistryPolls {
        let mark = self.registry.requests().len();
        let window = self.options.poll_interval * polls;
        tokio::time::sleep(window).await;
        let mut heads: BTreeMap<String, usize> = BTreeMap::new();
        let mut others = 0;
        for request in self.registry.requests().iter().skip(mark) {
            match (
                request.method.as_str(),
                request.path.split_once("/manifests/"),
            ) {
                ("HEAD", Some((repo, tag))) if !tag.starts_with("sha256:") => {
                    *heads
                        .entry(format!("{}:{tag}", repo.trim_start_matches("/v2/")))
                        .or_default() += 1;
                }
                _ => others += 1,
            }
        }
        RegistryPolls {
            polls,
            heads,
            others,
        }
    }

    /// Stops the agents and the coordinator gracefully, then everything else.
    pub async fn stop(self) {
        let Sandbox {
            agents,
            coordinator,
            ..
        } = self;
        agents.stop().await;
        coordinator.stop().await;
    }
}

/// Whether the report shows `workload`'s container away from in-sync.
fn drifts(report: &Report, workload: &Workload) -> bool {
    report
        .workloads
        .iter()
        .filter(|w| w.namespace == NAMESPACE && w.name == workload.name)
        .flat_map(|w| &w.containers)
        .any(|c| c.state.name() != "in-sync")
}

/// Whether a pod's image ids (`host/repo@sha256:…`) include `digest`.
fn on_digest(image_ids: &[String], digest: &str) -> bool {
    image_ids
        .iter()
        .any(|id| id.rsplit_once('@').is_some_and(|(_, d)| d == digest))
}

/// What happened, as the sandbox sees it (times since the end of the push).
#[derive(Debug)]
pub enum Progress<'a> {
    /// The coordinator's report first shows the workload drifting.
    Drift {
        workload: &'a Workload,
        report: &'a Report,
    },
    /// A node holds the new digest.
    Warm { node: &'a str, after: Duration },
    /// The coordinator patched the workload's pod template.
    Patched {
        workload: &'a Workload,
        after: Duration,
        reason: Option<&'a str>,
    },
    /// A pod runs the new digest and is ready.
    PodReady {
        workload: &'a Workload,
        pod: &'a str,
        node: &'a str,
        after: Duration,
    },
    /// Every pod of the workload runs the new digest and is ready.
    Converged {
        workload: &'a Workload,
        after: Duration,
    },
}

/// One rollout, timed from the end of the push.
#[derive(Debug, Clone)]
pub struct Rollout {
    pub workload: Workload,
    /// The new build's manifest digest.
    pub digest: String,
    /// When the coordinator's report first showed drift.
    pub drift_seen: Option<Duration>,
    /// When each node first held the new digest.
    pub warm: BTreeMap<String, Duration>,
    /// When the pod template was patched.
    pub patched: Option<Duration>,
    /// Why, as the coordinator recorded it on the workload.
    pub reason: Option<String>,
    /// When the last pod became ready on the new digest.
    pub converged: Option<Duration>,
    /// Per slot: from the old pod's deletion to its replacement being ready.
    pub gaps: Vec<NotReadyGap>,
    /// Per new pod: from its creation to ready.
    pub starts: Vec<PodStart>,
    /// The coordinator's API writes from the push to convergence.
    pub writes: Writes,
}

impl Rollout {
    /// Every target node held the new digest before the patch.
    pub fn warm_before_patch(&self, nodes: &[String]) -> bool {
        let Some(patched) = self.patched else {
            return false;
        };
        nodes
            .iter()
            .all(|n| self.warm.get(n).is_some_and(|w| *w <= patched))
    }

    /// The longest not-ready gap of any slot.
    pub fn max_gap(&self) -> Option<Duration> {
        self.gaps.iter().filter_map(NotReadyGap::duration).max()
    }

    /// The mean not-ready gap.
    pub fn mean_gap(&self) -> Option<Duration> {
        mean(self.gaps.iter().filter_map(NotReadyGap::duration))
    }

    /// The mean pod start (created to ready).
    pub fn mean_start(&self) -> Option<Duration> {
        mean(self.starts.iter().map(|s| s.took))
    }
}

fn mean(items: impl Iterator<Item = Duration>) -> Option<Duration> {
    let (sum, n) = items.fold((Duration::ZERO, 0u32), |(s, n), d| (s + d, n + 1));
    (n > 0).then(|| sum / n)
}

/// A new pod's start.
#[derive(Debug, Clone)]
pub struct PodStart {
    pub pod: String,
    pub node: String,
    pub took: Duration,
}

/// The coordinator's API writes, by kind.
#[derive(Debug, Clone, Default)]
pub struct Writes {
    /// Merge patches of the workload itself.
    pub workload_patches: usize,
    /// Event writes about the workload (creates, and updates of a repeated event).
    pub events: usize,
    /// TokenReviews (agent sessions authenticating; not per rollout).
    pub token_reviews: usize,
    /// Anything else (`METHOD path`): none expected, in particular nothing per node.
    pub other: Vec<String>,
}

impl Writes {
    fn of(
        requests: &[warmroll_tests::kubeapi::RecordedRequest],
        mark: usize,
        workload: &Workload,
    ) -> Writes {
        let path = workload.path();
        let mut writes = Writes::default();
        for r in requests.iter().skip(mark) {
            if r.method == "GET" || r.user.as_deref() != Some(COORDINATOR_USER) {
                continue;
            }
            if r.method == "PATCH"
                && r.path == path
                && r.content_type.as_deref() == Some("application/merge-patch+json")
            {
                writes.workload_patches += 1;
            } else if let Some(event) = event_of(r) {
                if event == workload.name {
                    writes.events += 1;
                }
            } else if is_workload_path(&r.path) {
                // Another workload's write: counted with that workload.
            } else if r.path.ends_with("/tokenreviews") {
                writes.token_reviews += 1;
            } else {
                writes.other.push(format!("{} {}", r.method, r.path));
            }
        }
        writes
    }
}

/// Whether `path` names a workload object (`/apis/apps/v1/namespaces/<ns>/<kind>/<name>`).
fn is_workload_path(path: &str) -> bool {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    matches!(
        parts.as_slice(),
        [
            "apis",
            "apps",
            "v1",
            "namespaces",
            _,
            "deployments" | "daemonsets" | "statefulsets",
            _
        ]
    )
}

/// For an Event write, the name of the object it is about (from the body of a create,
/// from the event's `<object>.<suffix>` name for an update).
fn event_of(r: &warmroll_tests::kubeapi::RecordedRequest) -> Option<String> {
    let (_, rest) = r.path.split_once("/events")?;
    if let Some(name) = rest.strip_prefix('/') {
        return name.rsplit_once('.').map(|(object, _)| object.to_owned());
    }
    let body = r.json()?;
    let regarding = body
        .get("regarding")
        .or_else(|| body.get("involvedObject"))?;
    regarding.get("name")?.as_str().map(str::to_owned)
}

/// Registry requests over a steady window.
#[derive(Debug, Clone)]
pub struct RegistryPolls {
    pub polls: u32,
    /// Manifest HEADs by tag (`repo:tag`).
    pub heads: BTreeMap<String, usize>,
    /// Every other request.
    pub others: usize,
}

impl RegistryPolls {
    /// HEADs per unique tag per poll interval.
    pub fn heads_per_tag_per_poll(&self) -> f64 {
        let tags = self.heads.len().max(1) as f64;
        let total: usize = self.heads.values().sum();
        total as f64 / tags / f64::from(self.polls.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_configurations_parse() {
        use warmroll_coordinator::config::WarmTargets;
        for (warm, enabled, targets) in [
            (WarmMode::Gated, true, WarmTargets::Schedulable),
            (WarmMode::Off, false, WarmTargets::Running),
        ] {
            let options = SandboxOptions {
                warm,
                ..SandboxOptions::default()
            };
            let yaml = config_yaml("127.0.0.1:5000", &options);
            let config = warmroll_coordinator::config::Config::parse(&yaml, "test").unwrap();
            let policy = &config.policies[POLICY];
            assert_eq!(policy.poll_interval, Duration::from_secs(1));
            assert_eq!(policy.annotation_key, ANNOTATION_KEY);
            assert!(policy.stabilization_window.is_zero());
            assert_eq!(policy.warm.enabled, enabled);
            assert_eq!(policy.warm.targets, targets);
            assert_eq!(policy.warm.threshold, 1.0);
        }
    }

    #[test]
    fn workload_paths_are_told_apart() {
        assert!(is_workload_path(
            "/apis/apps/v1/namespaces/default/daemonsets/a"
        ));
        assert!(!is_workload_path(
            "/apis/apps/v1/namespaces/default/daemonsets/a/status"
        ));
        assert!(!is_workload_path("/api/v1/namespaces/default/pods/a"));
    }

    #[test]
    fn pod_image_ids_match_on_the_digest() {
        let ids = vec!["127.0.0.1:5000/app@sha256:abc".to_owned()];
        assert!(on_digest(&ids, "sha256:abc"));
        assert!(!on_digest(&ids, "sha256:abcd"));
        assert!(!on_digest(&[], "sha256:abc"));
    }
}
