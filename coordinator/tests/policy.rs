//! The policy engine end to end: the sandbox cluster (real containerd nodes, kubelets
//! and workload controllers against the API stand-in), the real registry, in-process
//! agents on the cluster's nodes talking to the coordinator's fleet server over TLS, and
//! the engine itself.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use axum::body::Body;
use axum::http::Request;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tower::ServiceExt;
use warmroll_agent::session::SessionArgs;
use warmroll_coordinator::config::Config;
use warmroll_coordinator::drift::State;
use warmroll_coordinator::engine::{Engine, spawn};
use warmroll_coordinator::fleet::auth::service_account_user;
use warmroll_coordinator::fleet::{FleetView, WarmState};
use warmroll_coordinator::http::reader::{BearerToken, Credential, ReaderArgs};
use warmroll_coordinator::report::Report;
use warmroll_coordinator::run::{Context, ServiceAccount};
use warmroll_coordinator::steer;
use warmroll_coordinator::workload::WorkloadKey;
use warmroll_proto::fleet::{FailureKind, NodeName, WarmOutcome};
use warmroll_tests::cluster::{Cluster, ClusterOptions};
use warmroll_tests::image::ImageBuilder;
use warmroll_tests::kubeapi::RecordedRequest;
use warmroll_tests::registry::{Registry, RegistryOptions};
use warmroll_tests::scratch;

mod support;

use support::{LogCapture, Tls, agent_user, register_token};

use std::collections::BTreeMap;
use std::net::SocketAddr;

use warmroll_tests::kubeapi::KubeApi;

/// The coordinator's fleet server, in process; dropping it stops it.
struct Coordinator {
    addr: SocketAddr,
    view: FleetView,
    task: JoinHandle<()>,
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Coordinator {
    async fn start(kube: &KubeApi, tls: &Tls) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let view = FleetView::new(Duration::from_secs(60));
        let service = support::fleet_service(&view, kube);
        let files = tls.files.clone();
        let task = tokio::spawn(async move {
            let _ = warmroll_coordinator::fleet::serve(
                listener,
                Some(&files),
                service,
                std::future::pending(),
            )
            .await;
        });
        Ok(Coordinator { addr, view, task })
    }
}

/// An in-process agent on one of the cluster's nodes.
struct Agent {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
    _dir: TempDir,
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
    }
}

async fn start_agent(
    socket: &Path,
    node: &str,
    coordinator: &Coordinator,
    tls: &Tls,
    token: &str,
) -> Result<Agent> {
    let dir = scratch::temp_dir("policy-agent")?;
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, token)?;
    let session = SessionArgs {
        coordinator_url: format!("https://localhost:{}", coordinator.addr.port()),
        ca_file: Some(tls.ca_file.clone()),
        token_file,
        node_name: NodeName::parse(node).map_err(anyhow::Error::msg)?,
    };
    let (stop, task) = support::spawn_agent(socket, session).await?;
    Ok(Agent {
        stop: Some(stop),
        task,
        _dir: dir,
    })
}

/// The cluster, the registry, the fleet server and an agent per node.
struct Bed {
    agents: Vec<Agent>,
    coordinator: Coordinator,
    _tls: Tls,
    cluster: Cluster,
    registry: Registry,
}

impl Bed {
    async fn start(nodes: usize) -> Result<Bed> {
        let registry = Registry::start(RegistryOptions::plain()).await?;
        let cluster = Cluster::start(
            ClusterOptions {
                resync: Duration::from_millis(300),
                ..ClusterOptions::nodes(nodes)
            },
            &registry,
        )
        .await?;
        let tls = Tls::new()?;
        let coordinator = Coordinator::start(cluster.api(), &tls).await?;
        let mut agents = Vec::new();
        for node in cluster.nodes() {
            let token = register_token(cluster.api(), &agent_user(), Some(node.name()));
            agents.push(start_agent(node.socket(), node.name(), &coordinator, &tls, &token).await?);
        }
        Ok(Bed {
            agents,
            coordinator,
            _tls: tls,
            cluster,
            registry,
        })
    }

    fn view(&self) -> &FleetView {
        &self.coordinator.view
    }

    /// Starts an engine for `config` (leader: `true`); dropping the returned sender stops it.
    fn engine(&self, config: &str) -> Result<(Engine, watch::Sender<bool>)> {
        self.engine_as(config, true)
    }

    /// Starts an engine that leads or follows.
    fn engine_as(&self, config: &str, leads: bool) -> Result<(Engine, watch::Sender<bool>)> {
        start_engine(
            config,
            leads,
            self.cluster.client(),
            self.view(),
            &mut Default::default(),
        )
    }

    /// Waits until every pod of `app` in `ns` is in the fleet view with `digest`.
    async fn wait_agents_see(&self, ns: &str, app: &str, pods: usize, digest: &str) -> Result<()> {
        wait_for(
            &format!("agents report {pods} {app} pods on {digest}"),
            || {
                let seen: usize = self
                    .view()
                    .containers_in(&[ns].into())
                    .into_iter()
                    .map(|(_, c)| c)
                    .filter(|c| {
                        c.pod_labels.get("app").map(String::as_str) == Some(app)
                            && c.digest.as_ref().is_some_and(|d| d.to_string() == digest)
                    })
                    .count();
                seen == pods
            },
        )
        .await
    }

    /// A configuration with one `rollout` policy `name` (poll 1 s, no window, no
    /// cooldown) whose `warm` settings are `warm` (YAML flow-map entries).
    fn rollout_config(&self, name: &str, warm: &str) -> String {
        format!(
            "registry:\n  insecureRegistries: [\"{}\"]\npolicies:\n  {name}:\n    mode: rollout\n    pollInterval: 1s\n    stabilizationWindow: 0s\n    cooldown: 0s\n    warm: {{{warm}}}\n",
            self.registry.host()
        )
    }

    /// The nodes of the live pods of workload `app` in `ns`.
    fn pod_nodes(&self, ns: &str, app: &str) -> Vec<String> {
        let prefix = format!("{app}-");
        self.cluster
            .pods()
            .iter()
            .filter(|p| p.deleted.is_none() && p.namespace == ns && p.name.starts_with(&prefix))
            .map(|p| p.node.clone())
            .collect()
    }

    /// Asserts that `node`'s containerd has `reference`'s tag on `digest`.
    async fn assert_holds(&self, node: &str, reference: &str, digest: &str) {
        let image = self
            .cluster
            .node(node)
            .unwrap()
            .containerd()
            .image_status(reference)
            .await
            .unwrap()
            .unwrap();
        assert!(
            image.repo_digests.iter().any(|d| d.ends_with(digest)),
            "{node}: {:?}",
            image.repo_digests
        );
    }

    /// warmroll's own API writes (not the cluster's, not the test's inserts) to a workload.
    fn patches_of(&self, ns: &str, plural: &str, name: &str) -> Vec<RecordedRequest> {
        let path = format!("/apis/apps/v1/namespaces/{ns}/{plural}/{name}");
        self.cluster
            .foreign_writes()
            .into_iter()
            .filter(|w| w.path == path && w.method == "PATCH")
            .collect()
    }
}

/// Starts an engine for `config` on `client`, registering its metrics in `metrics`;
/// dropping the returned sender stops it.
fn start_engine(
    config: &str,
    leads: bool,
    client: kube::Client,
    fleet: &FleetView,
    metrics: &mut prometheus_client::registry::Registry,
) -> Result<(Engine, watch::Sender<bool>)> {
    let config = Config::parse(config, "test config")?;
    let (_leader_tx, leader) = watch::channel(leads);
    let (shutdown_tx, shutdown) = watch::channel(false);
    let ctx = Context {
        client,
        fleet: fleet.clone(),
        leader,
        shutdown,
    };
    Ok((spawn(ctx, config, metrics)?, shutdown_tx))
}

/// No token: the engine's router alone has no gate in front of it.
fn no_gate() -> Credential {
    Credential::none("no token (the engine's router alone)")
}

async fn wait_for(what: &str, mut check: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !check() {
        if Instant::now() > deadline {
            bail!("timed out after 60 s waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn report(engine: &Engine) -> Option<Report> {
    let response = engine
        .router
        .clone()
        .oneshot(Request::get("/report").body(Body::empty()).ok()?)
        .await
        .ok()?;
    if !response.status().is_success() {
        return None;
    }
    let body = axum::body::to_bytes(response.into_body(), 1 << 24)
        .await
        .ok()?;
    serde_json::from_slice(&body).ok()
}

async fn wait_state(engine: &Engine, ns: &str, name: &str, state: &str) -> Result<Report> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = report(engine).await;
        if let Some(r) = &got
            && r.state_of(ns, name, "main").map(State::name) == Some(state)
        {
            return Ok(got.unwrap_or_else(|| unreachable!()));
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {ns}/{name} to be {state}: {got:#?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn deployment(ns: &str, name: &str, policy: &str, image: &str, replicas: i32) -> Deployment {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"namespace": ns, "name": name, "labels": {"app": name, "warmroll.io/policy": policy}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "main", "image": image, "imagePullPolicy": "IfNotPresent"}]}
            }
        }
    }))
    .unwrap()
}

fn daemon_set(ns: &str, name: &str, policy: &str, image: &str) -> DaemonSet {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"namespace": ns, "name": name, "labels": {"app": name, "warmroll.io/policy": policy}},
        "spec": {
            "selector": {"matchLabels": {"app": name}},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "main", "image": image, "imagePullPolicy": "IfNotPresent"}]}
            }
        }
    }))
    .unwrap()
}

fn last_rollout_of<K>(bed: &Bed, name: &str) -> Option<Value>
where
    K: k8s_openapi::Resource + kube::Resource + serde::de::DeserializeOwned,
{
    let stored: K = bed.cluster.api().get("shop", name).ok()??;
    let text = stored
        .meta()
        .annotations
        .as_ref()?
        .get("warmroll.io/last-rollout")?
        .clone();
    serde_json::from_str(&text).ok()
}

/// Waits for shop/`name`'s rollout record and asserts it rolled `main` to `digest`
/// with `warm` (`2/2`) target nodes warm.
async fn rolled_warm_to<K>(bed: &Bed, name: &str, digest: &str, warm: &str)
where
    K: k8s_openapi::Resource + kube::Resource + serde::de::DeserializeOwned,
{
    wait_for(&format!("the rollout record of shop/{name}"), || {
        last_rollout_of::<K>(bed, name).is_some()
    })
    .await
    .unwrap();
    let record = last_rollout_of::<K>(bed, name).unwrap();
    assert_eq!(record["containers"]["main"], digest);
    assert!(
        record["reason"]
            .as_str()
            .unwrap()
            .contains(&format!("{warm} target nodes warm")),
        "{record}"
    );
}

/// Per node, whether its warm orders for `image_name` (`host/repo`) all succeeded, and
/// whether it has any.
fn warmed(view: &FleetView, node: &str, image_name: &str) -> (bool, usize) {
    let Some(info) = NodeName::parse(node).ok().and_then(|n| view.node(&n)) else {
        return (false, 0);
    };
    let orders: Vec<&WarmState> = info
        .warms
        .iter()
        .filter(|(_, image, _)| image.name() == image_name)
        .map(|(_, _, s)| s)
        .collect();
    let ok = !orders.is_empty()
        && orders
            .iter()
            .all(|s| matches!(s, WarmState::Finished(WarmOutcome::Succeeded { .. })));
    (ok, orders.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rollout_warms_every_target_node_then_patches_once_and_a_restart_patches_nothing() {
    let bed = Bed::start(2).await.unwrap();
    let images = ImageBuilder::new(&bed.registry).unwrap();
    let first = images.push("app", "latest").await.unwrap();
    let ds_first = images.push("node-tool", "latest").await.unwrap();
    // A multi-arch image: the nodes run its linux/amd64 child, which is in sync.
    let multi = images.push_index("multi", "latest").await.unwrap();
    bed.cluster
        .api()
        .insert(&deployment("shop", "web", "fast", &first.reference, 2))
        .unwrap();
    bed.cluster
        .api()
        .insert(&deployment("shop", "multi", "fast", &multi.reference, 1))
        .unwrap();
    bed.cluster
        .api()
        .insert(&daemon_set("shop", "tool", "fast", &ds_first.reference))
        .unwrap();
    bed.cluster
        .wait_rolled_out::<Deployment>("shop", "web", Duration::from_secs(60))
        .await
        .unwrap();
    bed.cluster
        .wait_rolled_out::<DaemonSet>("shop", "tool", Duration::from_secs(60))
        .await
        .unwrap();
    bed.cluster
        .wait_rolled_out::<Deployment>("shop", "multi", Duration::from_secs(60))
        .await
        .unwrap();
    bed.wait_agents_see("shop", "tool", 2, &ds_first.manifest_digest)
        .await
        .unwrap();
    bed.wait_agents_see("shop", "web", 2, &first.manifest_digest)
        .await
        .unwrap();
    // The multi-arch pod too: without it the engine would call "multi" in sync for
    // want of running pods, which is not what this test checks.
    wait_for("agents report the multi pod", || {
        bed.view()
            .containers_in(&["shop"].into())
            .into_iter()
            .any(|(_, c)| {
                c.pod_labels.get("app").map(String::as_str) == Some("multi") && c.digest.is_some()
            })
    })
    .await
    .unwrap();
    let nodes = bed.pod_nodes("shop", "web");
    assert_eq!(nodes.len(), 2, "one pod per node: {nodes:?}");

    let config = bed.rollout_config("fast", "timeout: 60s");
    let (engine, shutdown) = bed.engine(&config).unwrap();
    wait_state(&engine, "shop", "web", "in-sync").await.unwrap();
    // In sync on what the node really runs, not for want of running pods.
    let report = wait_state(&engine, "shop", "multi", "in-sync")
        .await
        .unwrap();
    let multi_running = &report
        .workloads
        .iter()
        .find(|w| w.name == "multi")
        .unwrap()
        .containers[0]
        .running;
    assert!(!multi_running.is_empty(), "{report:#?}");

    // Slow registry answers: the warm-up takes seconds, a window a too-early patch
    // would show in.
    let ds_second = images.push("node-tool", "latest").await.unwrap();
    bed.registry.set_latency(Duration::from_millis(700));
    let second = images.push("app", "latest").await.unwrap();
    let repo = first.repository.clone();
    let mut saw_warming = false;
    wait_for("the rollout patch", || {
        // Writes first, then the warm states: a patch seen here came before this read.
        let patched = !bed.patches_of("shop", "deployments", "web").is_empty();
        let warm: Vec<(bool, usize)> = nodes.iter().map(|n| warmed(bed.view(), n, &repo)).collect();
        if warm.iter().any(|(_, orders)| *orders > 0) && !warm.iter().all(|(ok, _)| *ok) {
            saw_warming = true;
        }
        if patched {
            assert!(
                warm.iter().all(|(ok, _)| *ok),
                "patched before every target node held the new digest: {warm:?}"
            );
        }
        patched
    })
    .await
    .unwrap();
    assert!(
        saw_warming,
        "the warm-up was observed in progress before the patch"
    );
    bed.registry.set_latency(Duration::ZERO);

    // Every target node got the new digest under the tag.
    for node in bed.cluster.nodes() {
        bed.assert_holds(node.name(), &first.reference, &second.manifest_digest)
            .await;
    }

    // The multi-arch workload in sync was never touched.
    assert!(bed.patches_of("shop", "deployments", "multi").is_empty());
    wait_state(&engine, "shop", "multi", "in-sync")
        .await
        .unwrap();

    // One merge patch: the template annotation and the last-rollout record.
    let patches = bed.patches_of("shop", "deployments", "web");
    assert_eq!(patches.len(), 1, "{patches:?}");
    assert_eq!(
        patches[0].content_type.as_deref(),
        Some("application/merge-patch+json")
    );
    let body = patches[0].json().unwrap();
    assert!(
        body["spec"]["template"]["metadata"]["annotations"]["warmroll.io/restartedAt"].is_string(),
        "{body}"
    );
    let stored: Deployment = bed.cluster.api().get("shop", "web").unwrap().unwrap();
    let record: Value =
        serde_json::from_str(&stored.metadata.annotations.unwrap()["warmroll.io/last-rollout"])
            .unwrap();
    assert_eq!(record["containers"]["main"], second.manifest_digest);
    assert!(
        record["reason"]
            .as_str()
            .unwrap()
            .contains("2/2 target nodes warm"),
        "{record}"
    );
    assert!(
        bed.cluster
            .foreign_writes()
            .iter()
            .any(|w| w.method == "POST" && w.path.contains("/events")),
        "an Event on the workload"
    );

    // The controller rolls, the new pods start on the warm digest, the engine sees it.
    bed.cluster
        .wait_rolled_out::<Deployment>("shop", "web", Duration::from_secs(60))
        .await
        .unwrap();
    bed.wait_agents_see("shop", "web", 2, &second.manifest_digest)
        .await
        .unwrap();
    let converged = wait_state(&engine, "shop", "web", "converged")
        .await
        .unwrap();
    assert_eq!(converged.count("drift"), 0);
    assert_eq!(bed.cluster.ready_on(&second.manifest_digest).len(), 2);

    // The DaemonSet (one rollout at a time: it waited for the Deployment's slot) is
    // warmed on all its nodes, patched once, and converges too.
    rolled_warm_to::<DaemonSet>(&bed, "tool", &ds_second.manifest_digest, "2/2").await;
    bed.cluster
        .wait_rolled_out::<DaemonSet>("shop", "tool", Duration::from_secs(60))
        .await
        .unwrap();
    bed.wait_agents_see("shop", "tool", 2, &ds_second.manifest_digest)
        .await
        .unwrap();
    assert_eq!(bed.patches_of("shop", "daemonsets", "tool").len(), 1);

    // A restarted engine reads the record and patches nothing.
    shutdown.send_replace(true);
    tokio::time::timeout(Duration::from_secs(10), engine.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let (engine, _shutdown) = bed.engine(&config).unwrap();
    wait_state(&engine, "shop", "web", "in-sync").await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(bed.patches_of("shop", "deployments", "web").len(), 1);
    assert_eq!(bed.patches_of("shop", "daemonsets", "tool").len(), 1);
    drop(bed.agents);
}

/// POSTs a registry notification to the engine's webhook route.
async fn notify(engine: &Engine, secret: &str, repository: &str, tag: &str) -> u16 {
    let body =
        json!({"events": [{"action": "push", "target": {"repository": repository, "tag": tag}}]});
    let request = Request::post("/webhooks/registry")
        .header("authorization", format!("Bearer {secret}"))
        .header(
            "content-type",
            "application/vnd.docker.distribution.events.v1+json",
        )
        .body(Body::from(body.to_string()))
        .unwrap();
    engine
        .router
        .clone()
        .oneshot(request)
        .await
        .unwrap()
        .status()
        .as_u16()
}

fn last_rollout(bed: &Bed, name: &str) -> Option<Value> {
    let stored: Deployment = bed.cluster.api().get("shop", name).ok()??;
    let text = stored
        .metadata
        .annotations?
        .remove("warmroll.io/last-rollout")?;
    serde_json::from_str(&text).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn report_webhook_dry_run_hold_partial_and_restart_policies() {
    let bed = Bed::start(1).await.unwrap();
    let images = ImageBuilder::new(&bed.registry).unwrap();
    let mut first = BTreeMap::new();
    for repo in ["app", "hook", "slow", "slow2", "cron"] {
        first.insert(repo, images.push(repo, "latest").await.unwrap());
    }
    let workloads = [
        ("watched", "watch", "app"),
        ("dry", "dry", "app"),
        ("hooked", "hooked", "hook"),
        ("held", "hold", "slow"),
        ("partial", "partial", "slow2"),
        ("nightly", "nightly", "cron"),
    ];
    for (name, policy, repo) in workloads {
        bed.cluster
            .api()
            .insert(&deployment("shop", name, policy, &first[repo].reference, 1))
            .unwrap();
    }
    for (name, _, repo) in workloads {
        bed.cluster
            .wait_rolled_out::<Deployment>("shop", name, Duration::from_secs(60))
            .await
            .unwrap();
        bed.wait_agents_see("shop", name, 1, &first[repo].manifest_digest)
            .await
            .unwrap();
    }
    // A StatefulSet under the report policy too.
    let sts: StatefulSet = serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"namespace": "shop", "name": "db", "labels": {"app": "db", "warmroll.io/policy": "watch"}},
        "spec": {
            "replicas": 1,
            "serviceName": "db",
            "selector": {"matchLabels": {"app": "db"}},
            "template": {
                "metadata": {"labels": {"app": "db"}},
                "spec": {"containers": [{"name": "main", "image": first["app"].reference, "imagePullPolicy": "IfNotPresent"}]}
            }
        }
    }))
    .unwrap();
    bed.cluster.api().insert(&sts).unwrap();
    bed.cluster
        .wait_rolled_out::<StatefulSet>("shop", "db", Duration::from_secs(60))
        .await
        .unwrap();
    bed.wait_agents_see("shop", "db", 1, &first["app"].manifest_digest)
        .await
        .unwrap();

    let dir = scratch::temp_dir("policy-webhook").unwrap();
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, "hook-secret\n").unwrap();
    let config = format!(
        r#"
registry:
  insecureRegistries: ["{host}"]
webhook:
  secretFile: {secret}
policies:
  watch:
    mode: report
    pollInterval: 2s
  hooked:
    mode: report
    pollInterval: 1h
  dry:
    mode: rollout
    dryRun: true
    pollInterval: 1s
    stabilizationWindow: 0s
  hold:
    mode: rollout
    pollInterval: 1s
    stabilizationWindow: 0s
    warm: {{timeout: 30s, onTimeout: hold}}
  partial:
    mode: rollout
    pollInterval: 1s
    stabilizationWindow: 0s
    warm: {{timeout: 30s, onTimeout: rollout}}
    rolloutTimeout: 4s
  nightly:
    mode: restart
    schedule: "*/2 * * * * *"
    cooldown: 1h
"#,
        host = bed.registry.host(),
        secret = secret_file.display()
    );
    let (engine, _shutdown) = bed.engine(&config).unwrap();
    // A second coordinator that does not hold the Lease: it reports, never acts (the
    // exact patch counts below include its writes).
    let (follower, _follower_shutdown) = bed.engine_as(&config, false).unwrap();
    for (name, _, _) in workloads {
        if name != "nightly" {
            wait_state(&engine, "shop", name, "in-sync").await.unwrap();
        }
    }

    // restart: the schedule patches (once: the cooldown holds the next slots).
    wait_for("the scheduled restart", || {
        last_rollout(&bed, "nightly").is_some()
    })
    .await
    .unwrap();
    let record = last_rollout(&bed, "nightly").unwrap();
    assert!(
        record["reason"]
            .as_str()
            .unwrap()
            .contains("scheduled restart"),
        "{record}"
    );
    assert_eq!(record["containers"]["main"], first["cron"].manifest_digest);

    // Warm-ups of slow and slow2 fail: the new layer cannot be fetched.
    for repo in ["slow", "slow2"] {
        bed.registry.inject(
            warmroll_tests::registry::FaultRule::new(warmroll_tests::registry::Fault::Status(503))
                .method("GET")
                .path_prefix(&format!("/v2/{repo}/blobs/")),
        );
    }
    let pushed_at = Instant::now();
    let app = images.push("app", "latest").await.unwrap();
    images.push("hook", "latest").await.unwrap();
    images.push("slow", "latest").await.unwrap();
    let slow2 = images.push("slow2", "latest").await.unwrap();

    // report: drift within one poll interval (2 s, plus a step and the HEAD).
    wait_state(&engine, "shop", "watched", "drift")
        .await
        .unwrap();
    let detected = pushed_at.elapsed();
    wait_state(&engine, "shop", "db", "drift").await.unwrap();
    assert!(
        detected < Duration::from_secs(4),
        "detected after {detected:?}"
    );
    // The 1 h poll interval has not come round: still in sync until the webhook.
    let r = report(&engine).await.unwrap();
    assert_eq!(r.state_of("shop", "hooked", "main"), Some(&State::InSync));
    assert_eq!(notify(&engine, "wrong", "hook", "latest").await, 401);
    assert_eq!(notify(&engine, "hook-secret", "hook", "latest").await, 202);
    let at = Instant::now();
    wait_state(&engine, "shop", "hooked", "drift")
        .await
        .unwrap();
    assert!(at.elapsed() < Duration::from_secs(2), "{:?}", at.elapsed());

    // dry-run: says what it would do, writes nothing.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = report(&engine).await.unwrap();
        let dry = r.workloads.iter().find(|w| w.name == "dry").unwrap();
        if dry
            .note
            .as_deref()
            .is_some_and(|n| n.contains("dry-run: would patch"))
        {
            assert_eq!(dry.containers[0].state, State::Drift);
            break;
        }
        assert!(Instant::now() < deadline, "no dry-run note: {dry:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // hold: the failed warm-up holds and says why; rollout-on-timeout patches, partial.
    let held = wait_state(&engine, "shop", "held", "held").await.unwrap();
    let reason = held
        .state_of("shop", "held", "main")
        .and_then(State::reason)
        .unwrap()
        .to_owned();
    assert!(
        reason.contains("0/1 target nodes warm") && reason.contains("holding"),
        "{reason}"
    );
    wait_for("the partial rollout", || {
        last_rollout(&bed, "partial").is_some()
    })
    .await
    .unwrap();
    let record = last_rollout(&bed, "partial").unwrap();
    assert!(
        record["reason"].as_str().unwrap().contains("partial"),
        "{record}"
    );
    assert_eq!(record["containers"]["main"], slow2.manifest_digest);
    // Its new pods start on the old image (the warm-up failed, IfNotPresent): past the
    // rollout timeout it is held, and never patched again for that digest.
    let held = wait_state(&engine, "shop", "partial", "held")
        .await
        .unwrap();
    let reason = held
        .state_of("shop", "partial", "main")
        .and_then(State::reason)
        .unwrap()
        .to_owned();
    assert!(reason.contains("not patching again"), "{reason}");

    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(bed.patches_of("shop", "statefulsets", "db").is_empty());
    for name in ["watched", "hooked", "dry", "held"] {
        assert!(
            bed.patches_of("shop", "deployments", name).is_empty(),
            "{name} was patched"
        );
    }
    assert_eq!(bed.patches_of("shop", "deployments", "partial").len(), 1);
    let r = report(&follower).await.unwrap();
    assert!(!r.leader);
    let watched = r.workloads.iter().find(|w| w.name == "watched").unwrap();
    assert_eq!(
        watched.containers[0].state,
        State::Drift,
        "followers report"
    );
    let dry = r.workloads.iter().find(|w| w.name == "dry").unwrap();
    assert!(
        dry.note
            .as_deref()
            .is_some_and(|n| n.contains("not the leader")),
        "{dry:?}"
    );
    assert_eq!(bed.patches_of("shop", "deployments", "nightly").len(), 1);
    let r = report(&engine).await.unwrap();
    assert_eq!(r.state_of("shop", "watched", "main"), Some(&State::Drift));
    assert_eq!(
        r.workloads
            .iter()
            .find(|w| w.name == "watched")
            .unwrap()
            .containers[0]
            .registry_digest
            .as_ref()
            .unwrap()
            .to_string(),
        app.manifest_digest
    );
    // `report --url` prints the running engine's report as a table.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(axum::serve(listener, engine.router.clone()).into_future());
    let mut out = Vec::new();
    warmroll_coordinator::engine::report_command(
        warmroll_coordinator::engine::ReportArgs {
            // The engine's router alone has no gate in front of it; the token keeps the
            // command from reading a kubeconfig of the machine.
            coordinator: ReaderArgs {
                url,
                token: Some(BearerToken::parse("not-checked-here").unwrap()),
                reader_service_account: ServiceAccount {
                    namespace: "warmroll".into(),
                    name: "warmroll-reader".into(),
                },
            },
            once: false,
            config: None,
            json: false,
        },
        &mut out,
    )
    .await
    .unwrap();
    server.abort();
    let table = String::from_utf8(out).unwrap();
    assert!(table.starts_with("NAMESPACE"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.contains("watched") && l.contains("drift")),
        "{table}"
    );
    assert!(table.contains("7 workloads, 7 containers"), "{table}");
    drop(bed.agents);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn warm_up_off_patches_at_once_and_orders_no_warm_up() {
    let bed = Bed::start(1).await.unwrap();
    let images = ImageBuilder::new(&bed.registry).unwrap();
    let first = images.push("plain", "latest").await.unwrap();
    // The kubelet pulls the tag itself once the template changes (as it must when
    // nothing warms the node ahead).
    let mut web = deployment("shop", "plain", "atonce", &first.reference, 1);
    web.spec.template.spec.as_mut().unwrap().containers[0].image_pull_policy =
        Some("Always".into());
    bed.cluster.api().insert(&web).unwrap();
    bed.cluster
        .wait_rolled_out::<Deployment>("shop", "plain", Duration::from_secs(60))
        .await
        .unwrap();
    bed.wait_agents_see("shop", "plain", 1, &first.manifest_digest)
        .await
        .unwrap();
    let config = bed.rollout_config("atonce", "enabled: false");
    let (engine, _shutdown) = bed.engine(&config).unwrap();
    wait_state(&engine, "shop", "plain", "in-sync")
        .await
        .unwrap();

    let second = images.push("plain", "latest").await.unwrap();
    let node = bed.cluster.nodes()[0].name().to_owned();
    wait_for("the rollout patch", || {
        assert_eq!(
            warmed(bed.view(), &node, &first.repository).1,
            0,
            "a warm order was sent"
        );
        !bed.patches_of("shop", "deployments", "plain").is_empty()
    })
    .await
    .unwrap();
    let record = last_rollout(&bed, "plain").unwrap();
    assert_eq!(record["containers"]["main"], second.manifest_digest);
    assert!(
        record["reason"].as_str().unwrap().contains("warm-up off"),
        "{record}"
    );

    // The kubelet pulls after the patch; the engine sees the rollout converge.
    bed.cluster
        .wait_rolled_out::<Deployment>("shop", "plain", Duration::from_secs(60))
        .await
        .unwrap();
    bed.wait_agents_see("shop", "plain", 1, &second.manifest_digest)
        .await
        .unwrap();
    wait_state(&engine, "shop", "plain", "converged")
        .await
        .unwrap();
    assert_eq!(bed.patches_of("shop", "deployments", "plain").len(), 1);
    assert_eq!(
        warmed(bed.view(), &node, &first.repository).1,
        0,
        "no warm order at any time"
    );
    drop(bed.agents);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn schedulable_targets_warm_every_node_a_new_pod_may_land_on_and_skip_cordoned_ones() {
    let bed = Bed::start(3).await.unwrap();
    let images = ImageBuilder::new(&bed.registry).unwrap();
    let first = images.push("app", "latest").await.unwrap();
    bed.cluster
        .api()
        .insert(&deployment("shop", "web", "wide", &first.reference, 1))
        .unwrap();
    bed.cluster
        .wait_rolled_out::<Deployment>("shop", "web", Duration::from_secs(60))
        .await
        .unwrap();
    bed.wait_agents_see("shop", "web", 1, &first.manifest_digest)
        .await
        .unwrap();
    let running = bed.pod_nodes("shop", "web");
    let [running] = running.as_slice() else {
        panic!("one web pod: {running:?}");
    };
    let others: Vec<String> = bed
        .cluster
        .nodes()
        .iter()
        .map(|n| n.name().to_owned())
        .filter(|n| n != running)
        .collect();
    let [free, cordoned] = others.as_slice() else {
        panic!("three nodes: {others:?}");
    };
    // Cordon one of the nodes without a web pod: no new pod may land there.
    kube::Api::<k8s_openapi::api::core::v1::Node>::all(bed.cluster.client())
        .patch(
            cordoned,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {"unschedulable": true}})),
        )
        .await
        .unwrap();

    let config = bed.rollout_config("wide", "timeout: 60s, targets: schedulable");
    let (engine, shutdown) = bed.engine(&config).unwrap();
    wait_state(&engine, "shop", "web", "in-sync").await.unwrap();

    bed.registry.set_latency(Duration::from_millis(500));
    let second = images.push("app", "latest").await.unwrap();
    let repo = first.repository.clone();
    wait_for("the rollout patch", || {
        let patched = !bed.patches_of("shop", "deployments", "web").is_empty();
        if patched {
            let warm: Vec<(&String, (bool, usize))> = [running, free, cordoned]
                .into_iter()
                .map(|n| (n, warmed(bed.view(), n, &repo)))
                .collect();
            assert!(
                warm.iter().take(2).all(|(_, (ok, _))| *ok),
                "patched before the running node and the free schedulable node held the new digest: {warm:?}"
            );
            assert_eq!(
                warm.get(2).map(|(_, (_, orders))| *orders),
                Some(0),
                "a cordoned node gets no warm order: {warm:?}"
            );
        }
        patched
    })
    .await
    .unwrap();
    bed.registry.set_latency(Duration::ZERO);

    // The free node holds the new digest although no web pod ever ran there.
    bed.assert_holds(free, &first.reference, &second.manifest_digest)
        .await;
    let report = wait_state(&engine, "shop", "web", "in-sync").await.unwrap();
    assert_eq!(
        bed.patches_of("shop", "deployments", "web").len(),
        1,
        "{report:#?}"
    );
    drop(shutdown);
}

/// The warm orders for `repository` (`host/repo`) on every node, as the agents reported
/// them: node, order and state.
fn warm_orders(bed: &Bed, repository: &str) -> Vec<(String, String, WarmState)> {
    let mut out = Vec::new();
    for node in bed.cluster.nodes() {
        let Some(info) = NodeName::parse(node.name())
            .ok()
            .and_then(|n| bed.view().node(&n))
        else {
            continue;
        };
        for (order, image, state) in info.warms {
            if image.name() == repository {
                out.push((node.name().to_owned(), order.to_string(), state));
            }
        }
    }
    out
}

/// The most intervals that overlap at one instant (half-open, ends before starts).
fn max_overlap(intervals: &[(Instant, Instant)]) -> usize {
    let mut edges: Vec<(Instant, i32)> = intervals
        .iter()
        .flat_map(|(start, end)| [(*start, 1), (*end, -1)])
        .collect();
    edges.sort();
    let (mut now, mut most) = (0i32, 0i32);
    for (_, step) in edges {
        now += step;
        most = most.max(now);
    }
    usize::try_from(most).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn warm_waves_keep_at_most_two_nodes_pulling_and_still_roll_once_all_are_warm() {
    let bed = Bed::start(5).await.unwrap();
    let images = ImageBuilder::new(&bed.registry).unwrap();
    let first = images.push("tool", "latest").await.unwrap();
    bed.cluster
        .api()
        .insert(&daemon_set("shop", "tool", "waves", &first.reference))
        .unwrap();
    bed.cluster
        .wait_rolled_out::<DaemonSet>("shop", "tool", Duration::from_secs(90))
        .await
        .unwrap();
    bed.wait_agents_see("shop", "tool", 5, &first.manifest_digest)
        .await
        .unwrap();
    let config = bed.rollout_config("waves", "timeout: 60s, maxParallelNodes: 2");
    let (engine, _shutdown) = bed.engine(&config).unwrap();
    wait_state(&engine, "shop", "tool", "in-sync")
        .await
        .unwrap();

    // 5 x 384 KiB over a 256 KiB/s link: uncapped, all five would pull for seconds at once.
    let second = images
        .push_random("tool", "latest", 384 * 1024)
        .await
        .unwrap();
    bed.registry.set_bandwidth(Some(256 * 1024));
    let repo = first.repository.clone();
    // Each node's pull as its agent reports it: from the order's finish back by the
    // pull's own duration. Observed every 20 ms.
    let mut finished: BTreeMap<String, (Instant, Duration)> = BTreeMap::new();
    let mut most_unfinished = 0;
    let mut patched_with = None;
    wait_for("the rollout patch", || {
        let orders = warm_orders(&bed, &repo);
        let unfinished: Vec<&String> = orders
            .iter()
            .filter(|(_, _, s)| !matches!(s, WarmState::Finished(_)))
            .map(|(n, _, _)| n)
            .collect();
        most_unfinished = most_unfinished.max(unfinished.len());
        for (node, _, state) in &orders {
            if let WarmState::Finished(outcome) = state {
                let WarmOutcome::Succeeded { duration, .. } = outcome else {
                    panic!("{node}: {outcome:?}");
                };
                finished
                    .entry(node.clone())
                    .or_insert((Instant::now(), *duration));
            }
        }
        let patched = !bed.patches_of("shop", "daemonsets", "tool").is_empty();
        if patched && patched_with.is_none() {
            patched_with = Some(finished.len());
        }
        patched
    })
    .await
    .unwrap();
    bed.registry.set_bandwidth(None);

    assert_eq!(
        patched_with,
        Some(5),
        "patched before every node was warm: {finished:?}"
    );
    assert!(
        most_unfinished <= 2,
        "{most_unfinished} nodes had orders out at once"
    );
    // Pull intervals from the agents' durations, less 100 ms at each end for the 20 ms
    // sampling and the report's trip.
    let margin = Duration::from_millis(100);
    let pulls: Vec<(Instant, Instant)> = finished
        .values()
        .map(|(end, took)| (*end - *took + margin, *end - margin))
        .collect();
    let overlap = max_overlap(&pulls);
    assert_eq!(
        overlap, 2,
        "at most two pulls overlap, and two did (the cap, not the link, spaced them): {finished:?}"
    );
    let orders = warm_orders(&bed, &repo);
    assert_eq!(orders.len(), 5, "one order per node: {orders:?}");

    let record = last_rollout_of::<DaemonSet>(&bed, "tool").unwrap();
    assert_eq!(record["containers"]["main"], second.manifest_digest);
    assert!(
        record["reason"]
            .as_str()
            .unwrap()
            .contains("5/5 target nodes warm"),
        "{record}"
    );
    bed.cluster
        .wait_rolled_out::<DaemonSet>("shop", "tool", Duration::from_secs(90))
        .await
        .unwrap();
    bed.wait_agents_see("shop", "tool", 5, &second.manifest_digest)
        .await
        .unwrap();
    wait_state(&engine, "shop", "tool", "converged")
        .await
        .unwrap();
    assert_eq!(bed.patches_of("shop", "daemonsets", "tool").len(), 1);
    drop(bed.agents);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_warm_up_superseded_by_a_newer_push_is_cancelled_and_the_newer_digest_rolls_once() {
    let bed = Bed::start(2).await.unwrap();
    let images = ImageBuilder::new(&bed.registry).unwrap();
    let first = images.push("app", "latest").await.unwrap();
    bed.cluster
        .api()
        .insert(&daemon_set("shop", "app", "fast", &first.reference))
        .unwrap();
    bed.cluster
        .wait_rolled_out::<DaemonSet>("shop", "app", Duration::from_secs(60))
        .await
        .unwrap();
    bed.wait_agents_see("shop", "app", 2, &first.manifest_digest)
        .await
        .unwrap();
    let config = bed.rollout_config("fast", "timeout: 120s");
    let (engine, _shutdown) = bed.engine(&config).unwrap();
    wait_state(&engine, "shop", "app", "in-sync").await.unwrap();

    // A big push over a slow link: its pulls are still downloading when the tag moves.
    let old = images.push_random("app", "latest", 8 << 20).await.unwrap();
    bed.registry.set_bandwidth(Some(256 * 1024));
    let repo = first.repository.clone();
    let unfinished = |bed: &Bed| {
        let orders = warm_orders(bed, &repo);
        orders.len() == 2
            && orders
                .iter()
                .all(|(_, _, s)| !matches!(s, WarmState::Finished(_)))
    };
    wait_for("both nodes ordered to pull the superseded digest", || {
        unfinished(&bed)
    })
    .await
    .unwrap();
    // 8 MiB at 256 KiB/s for two: half a minute. A few seconds in, both still pull.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(unfinished(&bed), "{:?}", warm_orders(&bed, &repo));
    let superseded: Vec<(String, String)> = warm_orders(&bed, &repo)
        .into_iter()
        .map(|(n, o, _)| (n, o))
        .collect();
    let new = images.push("app", "latest").await.unwrap();

    // The agents answer the cancel: the old orders end as cancelled.
    wait_for("the superseded orders cancelled on both agents", || {
        let orders = warm_orders(&bed, &repo);
        superseded.iter().all(|(node, order)| {
            orders.iter().any(|(n, o, s)| {
                n == node
                    && o == order
                    && matches!(
                        s,
                        WarmState::Finished(WarmOutcome::Failed {
                            kind: FailureKind::Cancelled,
                            ..
                        })
                    )
            })
        })
    })
    .await
    .unwrap();
    // The newer digest is warmed (over the same slow link, which the stopped pulls
    // no longer fill) and rolled.
    wait_for("the rollout patch", || {
        !bed.patches_of("shop", "daemonsets", "app").is_empty()
    })
    .await
    .unwrap();
    let record = last_rollout_of::<DaemonSet>(&bed, "app").unwrap();
    assert_eq!(record["containers"]["main"], new.manifest_digest);
    bed.cluster
        .wait_rolled_out::<DaemonSet>("shop", "app", Duration::from_secs(60))
        .await
        .unwrap();
    bed.wait_agents_see("shop", "app", 2, &new.manifest_digest)
        .await
        .unwrap();
    wait_state(&engine, "shop", "app", "converged")
        .await
        .unwrap();

    // The old pulls stopped: with the link open again a pull still running would
    // finish in well under a second, create the old digest's image and move the tag
    // back to it. Neither happens.
    bed.registry.set_bandwidth(None);
    tokio::time::sleep(Duration::from_secs(3)).await;
    for node in bed.cluster.nodes() {
        let old_image = bed
            .cluster
            .node(node.name())
            .unwrap()
            .containerd()
            .image_status(&format!("{}@{}", old.repository, old.manifest_digest))
            .await
            .unwrap();
        assert!(
            old_image.is_none(),
            "{}: the superseded pull went on to the end: {old_image:?}",
            node.name()
        );
        bed.assert_holds(node.name(), &first.reference, &new.manifest_digest)
            .await;
    }
    assert_eq!(bed.patches_of("shop", "daemonsets", "app").len(), 1);
    drop(bed.agents);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_workload_that_leaves_its_policy_mid_warm_up_has_its_pull_cancelled_and_is_not_rolled() {
    let bed = Bed::start(1).await.unwrap();
    let images = ImageBuilder::new(&bed.registry).unwrap();
    let first = images.push("left", "latest").await.unwrap();
    bed.cluster
        .api()
        .insert(&daemon_set("shop", "left", "fast", &first.reference))
        .unwrap();
    bed.cluster
        .wait_rolled_out::<DaemonSet>("shop", "left", Duration::from_secs(60))
        .await
        .unwrap();
    bed.wait_agents_see("shop", "left", 1, &first.manifest_digest)
        .await
        .unwrap();
    let config = bed.rollout_config("fast", "timeout: 120s");
    let (engine, _shutdown) = bed.engine(&config).unwrap();
    wait_state(&engine, "shop", "left", "in-sync")
        .await
        .unwrap();

    let big = images.push_random("left", "latest", 8 << 20).await.unwrap();
    bed.registry.set_bandwidth(Some(256 * 1024));
    let repo = first.repository.clone();
    wait_for("the warm order out", || {
        warm_orders(&bed, &repo)
            .iter()
            .any(|(_, _, s)| !matches!(s, WarmState::Finished(_)))
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The label goes: no policy tracks the DaemonSet any more.
    kube::Api::<DaemonSet>::namespaced(bed.cluster.client(), "shop")
        .patch(
            "left",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"metadata": {"labels": {"warmroll.io/policy": null}}})),
        )
        .await
        .unwrap();
    wait_for("the order cancelled on the agent", || {
        let orders = warm_orders(&bed, &repo);
        !orders.is_empty()
            && orders.iter().all(|(_, _, s)| {
                matches!(
                    s,
                    WarmState::Finished(WarmOutcome::Failed {
                        kind: FailureKind::Cancelled,
                        ..
                    })
                )
            })
    })
    .await
    .unwrap();
    bed.registry.set_bandwidth(None);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let node = bed.cluster.nodes()[0].name().to_owned();
    let pulled = bed
        .cluster
        .node(&node)
        .unwrap()
        .containerd()
        .image_status(&format!("{}@{}", big.repository, big.manifest_digest))
        .await
        .unwrap();
    assert!(pulled.is_none(), "the cancelled pull went on: {pulled:?}");
    bed.assert_holds(&node, &first.reference, &first.manifest_digest)
        .await;
    assert!(
        last_rollout_of::<DaemonSet>(&bed, "left").is_none(),
        "an untracked workload was rolled"
    );
    drop(bed.agents);
}

/// The coordinator's ServiceAccount, as the API server names it.
fn coordinator_user() -> String {
    service_account_user("warmroll", "warmroll-coordinator")
}

/// `rbac.scope: namespaced`: the coordinator may not list or watch workloads
/// cluster-wide (Roles only, the stand-in answers RBAC's 403), so with `namespaces:
/// [shop]` the engine watches shop alone, never asks cluster-wide, and still warms and
/// rolls there; a labelled workload in an unwatched namespace is not tracked.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn namespaced_watches_roll_in_their_namespace_when_cluster_wide_lists_are_forbidden() {
    let bed = Bed::start(1).await.unwrap();
    let api = bed.cluster.api();
    let user = coordinator_user();
    for resource in ["deployments", "statefulsets", "daemonsets"] {
        api.forbid_cluster_scope(&user, "apps", resource);
    }
    let images = ImageBuilder::new(&bed.registry).unwrap();
    let first = images.push("app", "latest").await.unwrap();
    api.insert(&deployment("shop", "web", "fast", &first.reference, 1))
        .unwrap();
    api.insert(&deployment("blog", "web", "fast", &first.reference, 1))
        .unwrap();
    bed.cluster
        .wait_rolled_out::<Deployment>("shop", "web", Duration::from_secs(60))
        .await
        .unwrap();
    bed.wait_agents_see("shop", "web", 1, &first.manifest_digest)
        .await
        .unwrap();

    let config = format!(
        "namespaces: [shop]\n{}",
        bed.rollout_config("fast", "timeout: 60s")
    );
    let client = api.client_as(&user, &["system:serviceaccounts"]).unwrap();
    let (engine, _shutdown) =
        start_engine(&config, true, client, bed.view(), &mut Default::default()).unwrap();
    let report = wait_state(&engine, "shop", "web", "in-sync").await.unwrap();
    assert!(
        report.workloads.iter().all(|w| w.namespace == "shop"),
        "only the watched namespace: {report:#?}"
    );
    assert!(engine.watches.forbidden().is_empty());

    let second = images.push("app", "latest").await.unwrap();
    rolled_warm_to::<Deployment>(&bed, "web", &second.manifest_digest, "1/1").await;
    assert!(bed.patches_of("blog", "deployments", "web").is_empty());
    let cluster_wide: Vec<RecordedRequest> = api
        .requests()
        .into_iter()
        .filter(|r| {
            r.user.as_deref() == Some(user.as_str())
                && r.path.starts_with("/apis/apps/v1/")
                && !r.path.contains("/namespaces/")
        })
        .collect();
    assert!(cluster_wide.is_empty(), "{cluster_wide:?}");
    drop(bed.agents);
}

/// `/readyz` and `/metrics` of a coordinator whose engine is `engine`.
fn health_router(
    engine: &Engine,
    metrics: prometheus_client::registry::Registry,
    fleet: FleetView,
) -> axum::Router {
    let (_leader_tx, leader) = watch::channel(true);
    warmroll_coordinator::http::router(
        warmroll_coordinator::http::Health {
            leader,
            serving: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true)),
            watches: engine.watches.clone(),
            tasks: Default::default(),
        },
        std::sync::Arc::new(metrics),
        fleet,
    )
}

async fn get_text(router: &axum::Router, path: &str) -> (u16, String) {
    let response = router
        .clone()
        .oneshot(Request::get(path).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Polls `path` until its answer satisfies `check` (60 s at most); returns it.
async fn wait_answer(
    router: &axum::Router,
    path: &str,
    what: &str,
    check: impl Fn(u16, &str) -> bool,
) -> (u16, String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = get_text(router, path).await;
        if check(status, &body) {
            return (status, body);
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting until {what}: {path} answers {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Cluster-wide lists forbidden (Roles only) and no `namespaces` configured: the
/// engine cannot start, and says so. Each forbidden watch (the labelled Deployments, the
/// Node watch of schedulable targets) is an ERROR line with the API server's message,
/// `/readyz` answers 503 naming it and `warmroll_forbidden_watches` counts it; once RBAC
/// allows the lists, the watchers' retries succeed, `/readyz` is 200 and the engine
/// reports. Current-thread, so the engine's tasks log to this test's subscriber.
#[tokio::test]
async fn a_forbidden_watch_is_an_error_and_a_503_from_readyz_until_rbac_allows_it() {
    let logs = LogCapture::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .with_writer(logs.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let api = KubeApi::start().await.unwrap();
    let pinned = format!("reg.example/app@sha256:{}", "a".repeat(64));
    api.insert(&deployment("shop", "web", "wide", &pinned, 1))
        .unwrap();
    let user = coordinator_user();
    api.forbid_cluster_scope(&user, "apps", "deployments");
    api.forbid_cluster_scope(&user, "", "nodes");
    let client = api.client_as(&user, &["system:serviceaccounts"]).unwrap();
    let fleet = FleetView::new(Duration::from_secs(60));
    let mut metrics = prometheus_client::registry::Registry::default();
    let config = "policies:\n  wide:\n    mode: rollout\n    kinds: [Deployment]\n    warm: {targets: schedulable}\n";
    let (engine, _shutdown) = start_engine(config, true, client, &fleet, &mut metrics).unwrap();
    let health = health_router(&engine, metrics, fleet);

    let deployments = "Deployment labelled warmroll.io/policy in all namespaces";
    let nodes = "Nodes (cluster-scoped, for warm.targets schedulable)";
    let (_, body) = wait_answer(&health, "/readyz", "both watches are forbidden", |s, b| {
        s == 503 && b.contains(deployments) && b.contains(nodes)
    })
    .await;
    assert!(
        body.contains(&format!(
            "{deployments}: deployments.apps is forbidden: User \"{user}\" cannot list resource \"deployments\" in API group \"apps\" at the cluster scope"
        )),
        "{body}"
    );
    let (_, text) = get_text(&health, "/metrics").await;
    assert!(text.contains("warmroll_forbidden_watches 2"), "{text}");
    assert!(
        report(&engine).await.is_none(),
        "the engine has not started"
    );
    let logged = logs.text();
    for (what, message) in [
        (deployments, "deployments.apps is forbidden: User"),
        (nodes, "nodes is forbidden: User"),
    ] {
        assert!(
            logged.lines().any(|l| l.contains("ERROR")
                && l.contains(what)
                && l.contains(message)
                && l.contains("forbids this watch")),
            "no error line for {what}: {logged}"
        );
    }

    // RBAC fixed: the next retry succeeds, the engine starts.
    api.allow_cluster_scope();
    wait_answer(&health, "/readyz", "ready again", |s, _| s == 200).await;
    let (_, text) = get_text(&health, "/metrics").await;
    assert!(text.contains("warmroll_forbidden_watches 0"), "{text}");
    wait_state(&engine, "shop", "web", "pinned").await.unwrap();
    assert!(
        logs.text().contains("watch allowed now"),
        "the recovery is logged"
    );
}

/// The engine's rollout patches of Deployment `name` (they write the last-rollout
/// record; `approve` and `rollout` write only their own annotations).
fn rollouts_of(bed: &Bed, name: &str) -> usize {
    bed.patches_of("shop", "deployments", name)
        .iter()
        .filter(|p| String::from_utf8_lossy(&p.body).contains("warmroll.io/last-rollout"))
        .count()
}

/// Serves the engine's routes (`/report`) on a port, as the coordinator does.
async fn serve_report(engine: &Engine) -> (String, JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let router = engine.router.clone();
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    (url, task)
}

/// Waits, then asserts that `name` stayed `state` with no rollout patch.
async fn stays_unpatched(engine: &Engine, bed: &Bed, name: &str, state: &str) {
    tokio::time::sleep(Duration::from_secs(3)).await;
    let report = report(engine).await.unwrap();
    assert_eq!(
        report.state_of("shop", name, "main").map(State::name),
        Some(state),
        "{report:#?}"
    );
    assert_eq!(rollouts_of(bed, name), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_approval_by_command_or_annotation_releases_one_patch_and_an_older_digest_none() {
    let bed = Bed::start(2).await.unwrap();
    let images = ImageBuilder::new(&bed.registry).unwrap();
    let first = images.push("gated", "latest").await.unwrap();
    bed.cluster
        .api()
        .insert(&deployment("shop", "gated", "gated", &first.reference, 2))
        .unwrap();
    bed.cluster
        .wait_rolled_out::<Deployment>("shop", "gated", Duration::from_secs(60))
        .await
        .unwrap();
    bed.wait_agents_see("shop", "gated", 2, &first.manifest_digest)
        .await
        .unwrap();
    let config = bed.rollout_config("gated", "timeout: 60s") + "    requireApproval: true\n";
    let (engine, _shutdown) = bed.engine(&config).unwrap();
    let (url, _server) = serve_report(&engine).await;
    wait_state(&engine, "shop", "gated", "in-sync")
        .await
        .unwrap();
    let key = WorkloadKey::parse("shop/Deployment/gated").unwrap();
    // Who steers: a user of their own, as with kubectl.
    let operator = bed.cluster.api().client_as("operator", &[]).unwrap();

    // A push: warmed on both nodes, then it waits for an approval.
    let second = images.push("gated", "latest").await.unwrap();
    let awaiting = wait_state(&engine, "shop", "gated", "awaiting-approval")
        .await
        .unwrap();
    let reason = awaiting.workloads[0].containers[0]
        .state
        .reason()
        .unwrap()
        .to_owned();
    assert!(reason.contains(&second.manifest_digest), "{reason}");
    for node in bed.cluster.nodes() {
        bed.assert_holds(node.name(), &first.reference, &second.manifest_digest)
            .await;
    }
    // Approving the older digest releases nothing.
    steer::approve(
        &operator,
        &key,
        std::slice::from_ref(&first.manifest_digest),
    )
    .await
    .unwrap();
    stays_unpatched(&engine, &bed, "gated", "awaiting-approval").await;
    // `warmroll-coordinator approve` reads what awaits approval from the report.
    let digests = steer::awaiting(&key, &url, &no_gate()).await.unwrap();
    assert_eq!(digests, std::slice::from_ref(&second.manifest_digest));
    steer::approve(&operator, &key, &digests).await.unwrap();
    wait_for("the approved patch", || rollouts_of(&bed, "gated") == 1)
        .await
        .unwrap();
    bed.cluster
        .wait_rolled_out::<Deployment>("shop", "gated", Duration::from_secs(60))
        .await
        .unwrap();
    wait_state(&engine, "shop", "gated", "in-sync")
        .await
        .unwrap();
    assert_eq!(rollouts_of(&bed, "gated"), 1);
    // Nothing awaits approval now: the command says so.
    let err = steer::awaiting(&key, &url, &no_gate()).await.unwrap_err();
    assert!(err.to_string().contains("awaits no approval"), "{err}");

    // The next push needs its own approval; the annotation (kubectl, GitOps) gives it.
    let third = images.push("gated", "latest").await.unwrap();
    wait_state(&engine, "shop", "gated", "awaiting-approval")
        .await
        .unwrap();
    assert_eq!(rollouts_of(&bed, "gated"), 1);
    let approve =
        json!({"metadata": {"annotations": {"warmroll.io/approve": third.manifest_digest}}});
    kube::Api::<Deployment>::namespaced(operator.clone(), "shop")
        .patch(
            "gated",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&approve),
        )
        .await
        .unwrap();
    wait_for("the second approved patch", || {
        rollouts_of(&bed, "gated") == 2
    })
    .await
    .unwrap();
    let record = last_rollout(&bed, "gated").unwrap();
    assert_eq!(record["containers"]["main"], third.manifest_digest);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(rollouts_of(&bed, "gated"), 2);
    drop(bed.agents);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drift_outside_the_rollout_window_is_warmed_and_patched_when_it_opens() {
    let bed = Bed::start(2).await.unwrap();
    let images = ImageBuilder::new(&bed.registry).unwrap();
    let first = images.push("nightly", "latest").await.unwrap();
    bed.cluster
        .api()
        .insert(&deployment(
            "shop",
            "nightly",
            "nightly",
            &first.reference,
            2,
        ))
        .unwrap();
    bed.cluster
        .wait_rolled_out::<Deployment>("shop", "nightly", Duration::from_secs(60))
        .await
        .unwrap();
    bed.wait_agents_see("shop", "nightly", 2, &first.manifest_digest)
        .await
        .unwrap();
    // A window that opens 20 s from now (each minute at that second) for 5 s.
    let opens = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(20);
    let second_of_minute = opens.as_second().rem_euclid(60);
    let config = bed.rollout_config("nightly", "timeout: 60s")
        + &format!("    window: {{schedule: '{second_of_minute} * * * * *', duration: 5s}}\n");
    let (engine, _shutdown) = bed.engine(&config).unwrap();
    wait_state(&engine, "shop", "nightly", "in-sync")
        .await
        .unwrap();

    let second = images.push("nightly", "latest").await.unwrap();
    let waiting = wait_state(&engine, "shop", "nightly", "awaiting-window")
        .await
        .unwrap();
    let reason = waiting.workloads[0].containers[0]
        .state
        .reason()
        .unwrap()
        .to_owned();
    assert!(reason.contains("next opens at"), "{reason}");
    assert!(
        jiff::Timestamp::now() < opens,
        "the warm-up must finish before the window opens for this test to mean anything"
    );
    // Warm already, not patched.
    for node in bed.cluster.nodes() {
        bed.assert_holds(node.name(), &first.reference, &second.manifest_digest)
            .await;
    }
    assert_eq!(rollouts_of(&bed, "nightly"), 0);
    wait_for("the patch in the window", || {
        rollouts_of(&bed, "nightly") == 1
    })
    .await
    .unwrap();
    let patched = jiff::Timestamp::now();
    // Seen within 20 ms of the write; the window opened at `opens` (whole seconds).
    assert!(
        patched.as_second() >= opens.as_second(),
        "patched at {patched}, before the window opened at {opens}"
    );
    let record = last_rollout(&bed, "nightly").unwrap();
    assert_eq!(record["containers"]["main"], second.manifest_digest);
    drop(bed.agents);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rollout_request_warms_the_nodes_then_restarts_once_in_report_mode() {
    let bed = Bed::start(2).await.unwrap();
    let images = ImageBuilder::new(&bed.registry).unwrap();
    let first = images.push("asked", "latest").await.unwrap();
    bed.cluster
        .api()
        .insert(&deployment("shop", "asked", "watch", &first.reference, 2))
        .unwrap();
    bed.cluster
        .wait_rolled_out::<Deployment>("shop", "asked", Duration::from_secs(60))
        .await
        .unwrap();
    bed.wait_agents_see("shop", "asked", 2, &first.manifest_digest)
        .await
        .unwrap();
    let config = format!(
        "registry:\n  insecureRegistries: [\"{}\"]\npolicies:\n  watch:\n    mode: report\n    pollInterval: 1s\n",
        bed.registry.host()
    );
    let (engine, _shutdown) = bed.engine(&config).unwrap();
    // A push a report policy only reports: drift, no patch.
    let second = images.push("asked", "latest").await.unwrap();
    stays_unpatched(&engine, &bed, "asked", "drift").await;
    assert!(
        bed.view()
            .node(&NodeName::parse("node-0").unwrap())
            .is_none_or(|n| n.warms.is_empty()),
        "no warm orders before the request"
    );

    let operator = bed.cluster.api().client_as("operator", &[]).unwrap();
    let key = WorkloadKey::parse("shop/Deployment/asked").unwrap();
    let requested = steer::request_rollout(&operator, &key).await.unwrap();
    let nodes = bed.pod_nodes("shop", "asked");
    let repo = first.repository.clone();
    wait_for("the requested restart", || {
        let patched = rollouts_of(&bed, "asked") > 0;
        if patched {
            for n in &nodes {
                assert!(
                    warmed(bed.view(), n, &repo).0,
                    "patched before {n} held the new digest"
                );
            }
        }
        patched
    })
    .await
    .unwrap();
    let record = last_rollout(&bed, "asked").unwrap();
    assert_eq!(record["containers"]["main"], second.manifest_digest);
    assert_eq!(record["request"], requested.as_str());
    bed.cluster
        .wait_rolled_out::<Deployment>("shop", "asked", Duration::from_secs(60))
        .await
        .unwrap();
    bed.wait_agents_see("shop", "asked", 2, &second.manifest_digest)
        .await
        .unwrap();
    // Served once: no second restart for the same request.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(rollouts_of(&bed, "asked"), 1);
    // In sync now, a new request restarts again (onto the same digest).
    steer::request_rollout(&operator, &key).await.unwrap();
    wait_for("the second requested restart", || {
        rollouts_of(&bed, "asked") == 2
    })
    .await
    .unwrap();
    drop(bed.agents);
}

/// A notification receiver for the tests: answers `status` (200 when 0), or never when
/// `hang`; keeps every body, and counts the requests it holds unanswered.
#[derive(Default)]
struct Hook {
    status: u16,
    hang: bool,
    bodies: std::sync::Mutex<Vec<String>>,
    holding: std::sync::atomic::AtomicUsize,
}

impl Hook {
    fn bodies(&self) -> Vec<String> {
        self.bodies.lock().unwrap().clone()
    }

    /// The JSON bodies' `(event, workload name)`, in arrival order.
    fn events(&self) -> Vec<(String, String)> {
        self.bodies()
            .iter()
            .filter_map(|b| serde_json::from_str::<Value>(b).ok())
            .map(|v| {
                (
                    v["event"].as_str().unwrap_or_default().to_owned(),
                    v["workload"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                )
            })
            .collect()
    }
}

/// Decrements the hook's held count when the request ends (the client gave up).
struct Holding(std::sync::Arc<Hook>);

impl Drop for Holding {
    fn drop(&mut self) {
        self.0
            .holding
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Serves `hook`; returns its URL (with a token in the path, as Slack's carry).
async fn serve_hook(hook: std::sync::Arc<Hook>) -> String {
    async fn handle(
        axum::extract::State(hook): axum::extract::State<std::sync::Arc<Hook>>,
        body: String,
    ) -> axum::http::StatusCode {
        hook.bodies.lock().unwrap().push(body);
        if hook.hang {
            hook.holding
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _held = Holding(hook.clone());
            std::future::pending::<()>().await;
        }
        axum::http::StatusCode::from_u16(if hook.status == 0 { 200 } else { hook.status }).unwrap()
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "http://{}/services/T0/B0/url-TOKEN",
        listener.local_addr().unwrap()
    );
    let app = axum::Router::new()
        .route("/services/T0/B0/url-TOKEN", axum::routing::post(handle))
        .with_state(hook);
    tokio::spawn(axum::serve(listener, app).into_future());
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn notifications_reach_receivers_for_every_transition_and_a_hanging_one_delays_nothing() {
    use std::sync::Arc;
    use std::sync::atomic::Ordering;

    let bed = Bed::start(1).await.unwrap();
    let images = ImageBuilder::new(&bed.registry).unwrap();
    let first = images.push("app", "latest").await.unwrap();
    let stuck_first = images.push("stuck", "latest").await.unwrap();
    for (name, image) in [("web", &first), ("stuck", &stuck_first)] {
        bed.cluster
            .api()
            .insert(&deployment("shop", name, "notified", &image.reference, 1))
            .unwrap();
        bed.cluster
            .wait_rolled_out::<Deployment>("shop", name, Duration::from_secs(60))
            .await
            .unwrap();
        bed.wait_agents_see("shop", name, 1, &image.manifest_digest)
            .await
            .unwrap();
    }

    let record = Arc::new(Hook::default());
    let chat = Arc::new(Hook::default());
    let failing = Arc::new(Hook {
        status: 500,
        ..Hook::default()
    });
    let hanging = Arc::new(Hook {
        hang: true,
        ..Hook::default()
    });
    let dir = scratch::temp_dir("policy-notify").unwrap();
    let secret_file = dir.path().join("secret");
    let webhook_secret = "webhook-SECRET-5e1d";
    let registry_password = "registry-PASSWORD-9f1c";
    std::fs::write(&secret_file, webhook_secret).unwrap();
    let config = format!(
        r#"
registry:
  insecureRegistries: ["{host}"]
  credentials:
    - registry: "{host}"
      username: warmroll
      password: {registry_password}
webhook:
  secretFile: {secret}
notifications:
  receivers:
    - name: record
      url: {record}
    - name: chat
      url: {chat}
      format: slack
      events: [patched]
    - name: failing
      url: {failing}
      maxAttempts: 2
    - name: hanging
      url: {hanging}
      timeout: 120s
policies:
  notified:
    mode: rollout
    pollInterval: 1s
    stabilizationWindow: 0s
    cooldown: 0s
    warm: {{timeout: 60s, onTimeout: hold}}
"#,
        host = bed.registry.host(),
        secret = secret_file.display(),
        record = serve_hook(record.clone()).await,
        chat = serve_hook(chat.clone()).await,
        failing = serve_hook(failing.clone()).await,
        hanging = serve_hook(hanging.clone()).await,
    );
    let mut metrics = prometheus_client::registry::Registry::default();
    let (engine, _shutdown) = start_engine(
        &config,
        true,
        bed.cluster.client(),
        bed.view(),
        &mut metrics,
    )
    .unwrap();
    wait_state(&engine, "shop", "web", "in-sync").await.unwrap();
    wait_state(&engine, "shop", "stuck", "in-sync")
        .await
        .unwrap();
    assert!(record.bodies().is_empty(), "in sync: {:?}", record.events());

    // stuck's warm-up fails: its new layers cannot be fetched.
    bed.registry.inject(
        warmroll_tests::registry::FaultRule::new(warmroll_tests::registry::Fault::Status(503))
            .method("GET")
            .path_prefix("/v2/stuck/blobs/"),
    );
    let second = images.push("app", "latest").await.unwrap();
    let stuck_second = images.push("stuck", "latest").await.unwrap();
    // Slow registry answers: the warm-up takes seconds after the drift is announced.
    bed.registry.set_latency(Duration::from_millis(400));
    assert_eq!(notify(&engine, webhook_secret, "app", "latest").await, 202);

    // The patch is written while the hanging receiver still holds its first request
    // (and would for 120 s): the engine does not wait on receivers.
    wait_for("the rollout patch", || {
        !bed.patches_of("shop", "deployments", "web").is_empty()
    })
    .await
    .unwrap();
    assert!(
        hanging.holding.load(Ordering::SeqCst) >= 1,
        "the hanging receiver holds a request when the patch lands: {:?}",
        hanging.bodies().len()
    );
    assert_eq!(
        hanging.bodies().len(),
        1,
        "it got one, the rest wait in its queue"
    );
    bed.registry.set_latency(Duration::ZERO);

    bed.cluster
        .wait_rolled_out::<Deployment>("shop", "web", Duration::from_secs(60))
        .await
        .unwrap();
    bed.wait_agents_see("shop", "web", 1, &second.manifest_digest)
        .await
        .unwrap();
    let web = |event: &str| (event.to_owned(), "web".to_owned());
    let stuck = |event: &str| (event.to_owned(), "stuck".to_owned());
    wait_for("every transition at the recording receiver", || {
        let got = record.events();
        [
            web("drift-found"),
            web("warm-up-done"),
            web("patched"),
            web("converged"),
            stuck("drift-found"),
            stuck("warm-up-failed"),
            stuck("held"),
        ]
        .iter()
        .all(|e| got.contains(e))
    })
    .await
    .unwrap();
    let got = record.events();
    let of = |name: &str| -> Vec<String> {
        got.iter()
            .filter(|(_, w)| w == name)
            .map(|(e, _)| e.clone())
            .collect()
    };
    assert_eq!(
        of("web"),
        ["drift-found", "warm-up-done", "patched", "converged"],
        "each once, in order"
    );
    assert_eq!(of("stuck"), ["drift-found", "warm-up-failed", "held"]);

    // The JSON body: event, workload, policy, images with the digest, reason, time.
    let bodies: Vec<Value> = record
        .bodies()
        .iter()
        .map(|b| serde_json::from_str(b).unwrap())
        .collect();
    let patched = bodies.iter().find(|b| b["event"] == "patched").unwrap();
    assert_eq!(
        patched["workload"],
        json!({"namespace": "shop", "kind": "Deployment", "name": "web"})
    );
    assert_eq!(patched["policy"], "notified");
    assert_eq!(
        patched["images"],
        json!([{"container": "main", "image": first.reference, "digest": second.manifest_digest}])
    );
    assert!(
        patched["reason"]
            .as_str()
            .unwrap()
            .contains("1/1 target nodes warm"),
        "{patched}"
    );
    assert!(
        patched["time"]
            .as_str()
            .unwrap()
            .parse::<jiff::Timestamp>()
            .is_ok()
    );
    let held = bodies
        .iter()
        .find(|b| b["event"] == "held" && b["workload"]["name"] == "stuck")
        .unwrap();
    assert_eq!(
        held["images"][0]["digest"], stuck_second.manifest_digest,
        "{held}"
    );
    assert!(
        held["reason"].as_str().unwrap().contains("holding"),
        "{held}"
    );

    // The filtered Slack receiver got only the patch, as {"text": ...}.
    wait_for("the chat receiver", || !chat.bodies().is_empty())
        .await
        .unwrap();
    let chat_bodies = chat.bodies();
    assert_eq!(chat_bodies.len(), 1, "{chat_bodies:?}");
    let text: Value = serde_json::from_str(&chat_bodies[0]).unwrap();
    assert!(
        text["text"]
            .as_str()
            .unwrap()
            .starts_with("warmroll: shop/Deployment/web patched (policy notified)"),
        "{text}"
    );

    // The failing receiver was tried twice per notification and counted as failed.
    wait_for("the failing receiver gives up", || {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &metrics).unwrap();
        text.contains(
            "warmroll_notifications_total{receiver=\"failing\",event=\"drift-found\",result=\"failed\"} 2",
        )
    })
    .await
    .unwrap();
    assert!(failing.bodies().len() >= 4, "{}", failing.bodies().len());
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &metrics).unwrap();
    assert!(
        text.contains(
            "warmroll_notifications_total{receiver=\"record\",event=\"patched\",result=\"delivered\"} 1"
        ),
        "{text}"
    );

    // No body at any receiver carries the registry password or the webhook secret.
    for (name, hook) in [
        ("record", &record),
        ("chat", &chat),
        ("failing", &failing),
        ("hanging", &hanging),
    ] {
        for body in hook.bodies() {
            assert!(
                !body.contains(registry_password) && !body.contains(webhook_secret),
                "{name}: {body}"
            );
        }
    }
    assert_eq!(bed.patches_of("shop", "deployments", "web").len(), 1);
    assert!(bed.patches_of("shop", "deployments", "stuck").is_empty());
    drop(bed.agents);
}
