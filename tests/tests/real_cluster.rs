#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
//! warmroll on a real Kubernetes: the official control plane and kubelets built by
//! `scripts/build-kubernetes`, each node with its own containerd (`tests/src/kube`),
//! warmroll's images built from the release binaries, the unchanged chart installed
//! with `helm`.
//!
//! One cluster serves every step in order (bringing it up takes the time); each step
//! says what it shows, and a failure names the step.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::authorization::v1::SubjectAccessReview;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{ListParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use warmroll_tests::image::{ImageBuilder, Pushed};
use warmroll_tests::kube::helm::{self, NAMESPACE};
use warmroll_tests::kube::{AuditEvent, KUBE_RELEASE, KubeCluster, wait_for};
use warmroll_tests::registry::{Registry, RegistryOptions};
use warmroll_tests::warmroll_image::push_warmroll_images;

const NODES: u8 = 2;
const DEMO: &str = "demo";
const COORDINATOR: &str = "warmroll-coordinator";
const AGENT: &str = "warmroll-agent";
const COORDINATOR_USER: &str = "system:serviceaccount:warmroll:warmroll-coordinator";
const AGENT_USER: &str = "system:serviceaccount:warmroll:warmroll-agent";
const READY_TIMEOUT: Duration = Duration::from_secs(240);
const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(180);

/// The policies of these tests: polls every 2 s, warm on every node a pod may land on.
const VALUES: &str = "agent:
  inventoryInterval: 2s
config:
  policies:
    report:
      mode: report
      pollInterval: 2s
    rollout:
      mode: rollout
      pollInterval: 2s
      rolloutTimeout: 5m
      warm:
        enabled: true
        threshold: 1.0
        timeout: 2m
        onTimeout: hold
        targets: schedulable
";

struct Bed {
    registry: Registry,
    cluster: KubeCluster,
    client: Client,
    builder: ImageBuilder,
}

impl Bed {
    fn image(&self, pushed: &Pushed) -> String {
        self.cluster.image_ref(&pushed.reference)
    }

    async fn pods(&self, namespace: &str, selector: &str) -> Vec<Pod> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        api.list(&ListParams::default().labels(selector))
            .await
            .unwrap()
            .items
    }

    /// The coordinator pod holding the Lease, once it is also Ready.
    async fn leader(&self) -> Pod {
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), NAMESPACE);
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), NAMESPACE);
        wait_for(
            "a Ready coordinator holding the Lease",
            READY_TIMEOUT,
            || async {
                let lease = leases.get(COORDINATOR).await?;
                let Some(holder) = lease.spec.and_then(|s| s.holder_identity) else {
                    return Ok(None);
                };
                let pod = pods.get(&holder).await?;
                Ok(is_ready(&pod).then_some(pod))
            },
        )
        .await
        .unwrap()
    }

    /// GET `path` on the leader's HTTP port, through a relay into the cluster network.
    async fn leader_http(&self, path: &str) -> (u16, String) {
        let leader = self.leader().await;
        let ip = leader.status.unwrap().pod_ip.unwrap();
        let relay = self
            .cluster
            .forward(SocketAddr::new(ip.parse().unwrap(), 8080))
            .await
            .unwrap();
        http_get(relay, path).await
    }

    async fn report(&self) -> Value {
        let (status, body) = self.leader_http("/report").await;
        assert_eq!(status, 200, "/report: {body}");
        serde_json::from_str(&body).unwrap()
    }

    /// The coordinator's log lines (all replicas), parsed as the JSON it writes.
    async fn coordinator_log(&self) -> Vec<Value> {
        let mut lines = Vec::new();
        for pod in self
            .pods(NAMESPACE, "app.kubernetes.io/component=coordinator")
            .await
        {
            let name = pod.metadata.name.unwrap();
            for line in self
                .cluster
                .container_log(NAMESPACE, &name, "coordinator")
                .unwrap()
            {
                if let Ok(value) = serde_json::from_str::<Value>(&line.text) {
                    lines.push(value);
                }
            }
        }
        lines
    }

    /// The "image warm" lines of every agent, with the node and the log line's time.
    async fn warm_lines(&self) -> Vec<(String, jiff::Timestamp, Value)> {
        let mut out = Vec::new();
        for pod in self
            .pods(NAMESPACE, "app.kubernetes.io/component=agent")
            .await
        {
            let node = pod.spec.as_ref().unwrap().node_name.clone().unwrap();
            let name = pod.metadata.name.unwrap();
            for line in self
                .cluster
                .container_log(NAMESPACE, &name, "agent")
                .unwrap()
            {
                if let Ok(value) = serde_json::from_str::<Value>(&line.text)
                    && message(&value) == "image warm"
                {
                    out.push((node.clone(), line.time, value));
                }
            }
        }
        out
    }

    fn audit(&self) -> Vec<AuditEvent> {
        self.cluster.audit().unwrap()
    }

    async fn create(&self, namespace: &str, object: Value) {
        let kind = object["kind"].as_str().unwrap().to_string();
        let pp = PostParams::default();
        match kind.as_str() {
            "Deployment" => {
                let api: Api<Deployment> = Api::namespaced(self.client.clone(), namespace);
                api.create(&pp, &serde_json::from_value(object).unwrap())
                    .await
                    .unwrap();
            }
            "StatefulSet" => {
                let api: Api<StatefulSet> = Api::namespaced(self.client.clone(), namespace);
                api.create(&pp, &serde_json::from_value(object).unwrap())
                    .await
                    .unwrap();
            }
            "DaemonSet" => {
                let api: Api<DaemonSet> = Api::namespaced(self.client.clone(), namespace);
                api.create(&pp, &serde_json::from_value(object).unwrap())
                    .await
                    .unwrap();
            }
            other => panic!("no create for {other}"),
        }
    }

    /// Waits until every pod of `app` runs, Ready, on image `digest` (its status's
    /// `imageID`), `count` of them; returns them.
    async fn wait_pods_on(&self, app: &str, count: usize, digest: &str) -> Vec<Pod> {
        wait_for(
            &format!("{count} Ready pods of {app} on {digest}"),
            ROLLOUT_TIMEOUT,
            || async {
                let pods = self.pods(DEMO, &format!("app={app}")).await;
                let live: Vec<Pod> = pods
                    .into_iter()
                    .filter(|p| p.metadata.deletion_timestamp.is_none())
                    .collect();
                let on = live
                    .iter()
                    .filter(|p| is_ready(p) && image_ids(p).iter().all(|id| id.ends_with(digest)))
                    .count();
                Ok((live.len() == count && on == count).then_some(live))
            },
        )
        .await
        .unwrap()
    }
}

fn message(line: &Value) -> &str {
    line.pointer("/fields/message")
        .or_else(|| line.get("message"))
        .or_else(|| line.get("msg"))
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn field<'a>(line: &'a Value, name: &str) -> Option<&'a Value> {
    line.get("fields")
        .and_then(|f| f.get(name))
        .or_else(|| line.get(name))
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn image_ids(pod: &Pod) -> Vec<String> {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .map(|cs| cs.iter().map(|c| c.image_id.clone()).collect())
        .unwrap_or_default()
}

async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: coordinator\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, body.to_string())
}

fn workload(kind: &str, name: &str, policy: &str, image: &str, pull: &str) -> Value {
    let labels = json!({"app": name});
    let mut spec = json!({
        "selector": {"matchLabels": labels},
        "template": {
            "metadata": {"labels": labels},
            "spec": {
                "terminationGracePeriodSeconds": 1,
                "containers": [{"name": "main", "image": image, "imagePullPolicy": pull}],
            },
        },
    });
    match kind {
        "Deployment" => {
            spec["replicas"] = json!(2);
            spec["progressDeadlineSeconds"] = json!(600);
        }
        "StatefulSet" => {
            spec["replicas"] = json!(1);
            spec["serviceName"] = json!(name);
        }
        _ => {}
    }
    json!({
        "apiVersion": "apps/v1",
        "kind": kind,
        "metadata": {"name": name, "labels": {"warmroll.io/policy": policy}},
        "spec": spec,
    })
}

/// The coordinator's writes to `name` (or Events about it) after `since`.
fn coordinator_writes<'a>(
    events: &'a [AuditEvent],
    name: &str,
    since: jiff::Timestamp,
) -> Vec<&'a AuditEvent> {
    events
        .iter()
        .filter(|e| e.user.username == COORDINATOR_USER && e.is_write())
        .filter(|e| e.request_received_timestamp >= since)
        .filter(|e| {
            (matches!(e.resource(), "deployments" | "statefulsets" | "daemonsets")
                && e.name() == name)
                || (e.resource() == "events" && e.name().starts_with(&format!("{name}.")))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn warmroll_on_a_real_cluster() {
    let registry = Registry::start(RegistryOptions::plain()).await.unwrap();
    let cluster = KubeCluster::start(&registry, NODES)
        .await
        .expect("the real cluster (scripts/build-kubernetes builds its binaries)");
    eprintln!("real cluster: Kubernetes {}", cluster.version());
    assert_eq!(cluster.version(), KUBE_RELEASE);
    let client = cluster.client().await.unwrap();
    let builder = ImageBuilder::new(&registry).unwrap();
    let mut bed = Bed {
        registry,
        cluster,
        client,
        builder,
    };

    chart_installs_and_agents_are_accepted(&mut bed).await;
    rbac_allows_the_work_and_nothing_more(&bed).await;
    workloads_roll_warm_with_one_patch_and_one_event(&mut bed).await;
    if_not_present_pods_start_on_the_new_digest(&mut bed).await;
    a_rollout_that_cannot_come_up_is_held_after_one_patch(&mut bed).await;
    report_mode_logs_one_line_per_drifting_container(&mut bed).await;
}

/// The chart installs with values only; both coordinator replicas run, the Lease names
/// the Ready one; one agent per node is Ready and its session was accepted through a
/// real TokenReview with the node-name claim of its pod-bound token.
async fn chart_installs_and_agents_are_accepted(bed: &mut Bed) {
    let images = push_warmroll_images(&bed.registry, "test").await.unwrap();
    let output = helm::install(&bed.cluster, &images, VALUES).unwrap();
    eprintln!("{output}");

    let daemon_sets: Api<DaemonSet> = Api::namespaced(bed.client.clone(), NAMESPACE);
    wait_for("one Ready agent per node", READY_TIMEOUT, || async {
        let ds = daemon_sets.get(AGENT).await?;
        let status = ds.status.unwrap_or_default();
        Ok((status.number_ready == i32::from(NODES)
            && status.desired_number_scheduled == i32::from(NODES))
        .then_some(()))
    })
    .await
    .unwrap();
    let leader = bed.leader().await;
    let coordinators = bed
        .pods(NAMESPACE, "app.kubernetes.io/component=coordinator")
        .await;
    assert_eq!(coordinators.len(), 2, "two coordinator replicas");
    for pod in &coordinators {
        let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
        assert!(running, "coordinator {:?} runs", pod.metadata.name);
        // Only the leader is Ready, so the Service sends agents to it alone.
        assert_eq!(
            is_ready(pod),
            pod.metadata.name == leader.metadata.name,
            "Ready = holds the Lease, for {:?}",
            pod.metadata.name
        );
    }

    let nodes: Vec<String> = (0..NODES).map(|i| format!("node-{i}")).collect();
    let fleet: Value = {
        let mut fleet = Value::Null;
        for _ in 0..240 {
            let (status, body) = bed.leader_http("/fleet").await;
            assert_eq!(status, 200, "/fleet: {body}");
            fleet = serde_json::from_str(&body).unwrap();
            if fleet["connected"] == json!(NODES) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        fleet
    };
    assert_eq!(
        fleet["connected"],
        json!(NODES),
        "agents connected: {fleet}"
    );
    for node in &nodes {
        let (status, body) = bed.leader_http(&format!("/fleet/nodes/{node}")).await;
        assert_eq!(status, 200, "/fleet/nodes/{node}: {body}");
        let entry: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(entry["connected"], json!(true), "{node}: {entry}");
        // The token's node-name claim, as the real TokenReview returned it, matched.
        assert_eq!(entry["node_verified"], json!(true), "{node}: {entry}");
    }
    let reviews = bed
        .audit()
        .into_iter()
        .filter(|e| {
            e.user.username == COORDINATOR_USER
                && e.resource() == "tokenreviews"
                && e.verb == "create"
                && e.code() == 201
        })
        .count();
    assert!(
        reviews >= usize::from(NODES),
        "one TokenReview per agent session at least, saw {reviews}"
    );
}

/// The chart's RBAC as the real API server enforces it: a SubjectAccessReview for each
/// thing the coordinator and the agents must and must not do.
async fn rbac_allows_the_work_and_nothing_more(bed: &Bed) {
    let reviews: Api<SubjectAccessReview> = Api::all(bed.client.clone());
    let cases = [
        (COORDINATOR_USER, "patch", "apps", "deployments", DEMO, true),
        (COORDINATOR_USER, "watch", "apps", "statefulsets", "", true),
        (COORDINATOR_USER, "create", "", "events", DEMO, true),
        (
            COORDINATOR_USER,
            "create",
            "authentication.k8s.io",
            "tokenreviews",
            "",
            true,
        ),
        (COORDINATOR_USER, "create", "", "secrets", DEMO, false),
        (COORDINATOR_USER, "update", "", "secrets", NAMESPACE, false),
        (COORDINATOR_USER, "create", "", "pods", DEMO, false),
        (COORDINATOR_USER, "delete", "", "pods", DEMO, false),
        (AGENT_USER, "get", "", "secrets", NAMESPACE, false),
        (AGENT_USER, "list", "", "secrets", "", false),
        (AGENT_USER, "patch", "apps", "deployments", DEMO, false),
    ];
    let mut wrong = Vec::new();
    for (user, verb, group, resource, namespace, expected) in cases {
        let review: SubjectAccessReview = serde_json::from_value(json!({
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {
                "user": user,
                "groups": ["system:serviceaccounts", "system:serviceaccounts:warmroll", "system:authenticated"],
                "resourceAttributes": {
                    "verb": verb, "group": group, "resource": resource, "namespace": namespace,
                },
            },
        }))
        .unwrap();
        let answer = reviews
            .create(&PostParams::default(), &review)
            .await
            .unwrap();
        let allowed = answer.status.map(|s| s.allowed).unwrap_or(false);
        if allowed != expected {
            wrong.push(format!(
                "{user} {verb} {group}/{resource} in {namespace:?}: allowed={allowed}, want {expected}"
            ));
        }
    }
    assert!(wrong.is_empty(), "RBAC:\n{}", wrong.join("\n"));
}

/// A labelled Deployment (Always), StatefulSet and DaemonSet on `demo/app:latest`:
/// after a push every node holds the new digest before each workload's patch (the
/// agents' "image warm" lines against the patch's time in the audit log), the
/// coordinator writes one patch and one Event per workload, and every new pod reports
/// the new digest as its imageID.
async fn workloads_roll_warm_with_one_patch_and_one_event(bed: &mut Bed) {
    let namespaces: Api<Namespace> = Api::all(bed.client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": DEMO}})).unwrap(),
        )
        .await
        .unwrap();
    let v1 = bed.builder.push("demo/app", "latest").await.unwrap();
    let image = bed.image(&v1);
    let apps = [
        ("Deployment", "web", 2usize),
        ("StatefulSet", "db", 1),
        ("DaemonSet", "ds", usize::from(NODES)),
    ];
    for (kind, name, _) in apps {
        bed.create(DEMO, workload(kind, name, "rollout", &image, "Always"))
            .await;
    }
    for (_, name, count) in apps {
        bed.wait_pods_on(name, count, &v1.manifest_digest).await;
    }
    let before: BTreeMap<&str, Vec<String>> = {
        let mut map = BTreeMap::new();
        for (_, name, _) in apps {
            let pods = bed.pods(DEMO, &format!("app={name}")).await;
            map.insert(
                name,
                pods.into_iter().map(|p| p.metadata.uid.unwrap()).collect(),
            );
        }
        map
    };

    let pushed_at = jiff::Timestamp::now();
    let v2 = bed.builder.push("demo/app", "latest").await.unwrap();
    assert_ne!(v2.manifest_digest, v1.manifest_digest);
    for (_, name, count) in apps {
        let pods = bed.wait_pods_on(name, count, &v2.manifest_digest).await;
        for pod in &pods {
            assert!(
                !before[name].contains(pod.metadata.uid.as_ref().unwrap()),
                "{name}: a new pod"
            );
        }
    }

    let audit = bed.audit();
    let warm = bed.warm_lines().await;
    for (_, name, _) in apps {
        let writes = coordinator_writes(&audit, name, pushed_at);
        let patches: Vec<_> = writes.iter().filter(|e| e.verb == "patch").collect();
        let events = writes.iter().filter(|e| e.resource() == "events").count();
        assert_eq!(
            (patches.len(), events, writes.len()),
            (1, 1, 2),
            "{name}: one patch and one Event: {writes:#?}"
        );
        let patched = patches[0].request_received_timestamp;
        for i in 0..NODES {
            let node = format!("node-{i}");
            let warmed = warm.iter().find(|(n, _, line)| {
                *n == node
                    && field(line, "digest")
                        .and_then(Value::as_str)
                        .is_some_and(|d| d.contains(&v2.manifest_digest))
            });
            let (_, at, _) = warmed.unwrap_or_else(|| {
                panic!(
                    "{node} never reported {} warm: {warm:#?}",
                    v2.manifest_digest
                )
            });
            assert!(
                *at < patched,
                "{node} warmed {} at {at}, after {name}'s patch at {patched}",
                v2.manifest_digest
            );
        }
    }
}

/// `imagePullPolicy: IfNotPresent` on a tag whose old build is on every node: the
/// kubelet would start the old build again; after warmroll's rollout (the agents moved
/// the tag on each node first) the new pods run the new digest.
async fn if_not_present_pods_start_on_the_new_digest(bed: &mut Bed) {
    let v1 = bed.builder.push("demo/cached", "stable").await.unwrap();
    let image = bed.image(&v1);
    for node in bed.cluster.nodes() {
        warmroll_tests::containerd::pull_on(&node.cri_socket(), &image)
            .await
            .unwrap();
    }
    bed.create(
        DEMO,
        workload("Deployment", "cached", "rollout", &image, "IfNotPresent"),
    )
    .await;
    bed.wait_pods_on("cached", 2, &v1.manifest_digest).await;
    let pushed_at = jiff::Timestamp::now();
    let v2 = bed.builder.push("demo/cached", "stable").await.unwrap();
    bed.wait_pods_on("cached", 2, &v2.manifest_digest).await;
    let audit = bed.audit();
    let patches = coordinator_writes(&audit, "cached", pushed_at)
        .into_iter()
        .filter(|e| e.verb == "patch")
        .count();
    assert_eq!(patches, 1, "one patch of cached");
}

/// A rollout whose new pods exit at once: the real Deployment controller reports its
/// progress deadline exceeded, the coordinator reports the workload `held` with the
/// reason, and patches it exactly once.
async fn a_rollout_that_cannot_come_up_is_held_after_one_patch(bed: &mut Bed) {
    let v1 = bed.builder.push("demo/crash", "latest").await.unwrap();
    let mut object = workload("Deployment", "crash", "rollout", &bed.image(&v1), "Always");
    object["spec"]["replicas"] = json!(1);
    object["spec"]["progressDeadlineSeconds"] = json!(10);
    // Runs on the first build only: any later build exits at once.
    object["spec"]["template"]["spec"]["containers"][0]["command"] = json!([
        "/bin/sh",
        "-c",
        format!(
            "[ \"$(cat /build-id)\" = '{}' ] || exit 1; trap 'exit 0' TERM; while :; do sleep 1; done",
            v1.build_id
        )
    ]);
    bed.create(DEMO, object).await;
    bed.wait_pods_on("crash", 1, &v1.manifest_digest).await;
    let pushed_at = jiff::Timestamp::now();
    bed.builder.push("demo/crash", "latest").await.unwrap();
    let reason = wait_for("crash held in the report", ROLLOUT_TIMEOUT, || async {
        let report = bed_report(bed).await;
        Ok(workload_container_state(&report, "crash")
            .filter(|(state, _)| state == "held")
            .map(|(_, reason)| reason))
    })
    .await
    .unwrap();
    assert!(
        reason.contains("did not all come up"),
        "held reason: {reason}"
    );
    // A few more cycles: still exactly the one patch.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let audit = bed.audit();
    let patches = coordinator_writes(&audit, "crash", pushed_at)
        .into_iter()
        .filter(|e| e.verb == "patch")
        .count();
    assert_eq!(patches, 1, "crash patched once");
}

/// Report mode: a push makes the leader log one `container` line per drifting container
/// (read from the real container log file), and nothing is written to the workload.
async fn report_mode_logs_one_line_per_drifting_container(bed: &mut Bed) {
    let v1 = bed.builder.push("demo/report", "latest").await.unwrap();
    let image = bed.image(&v1);
    let mut object = workload("Deployment", "watched", "report", &image, "Always");
    object["spec"]["replicas"] = json!(1);
    object["spec"]["template"]["spec"]["containers"] = json!([
        {"name": "a", "image": image, "imagePullPolicy": "Always"},
        {"name": "b", "image": image, "imagePullPolicy": "Always"},
    ]);
    bed.create(DEMO, object).await;
    bed.wait_pods_on("watched", 1, &v1.manifest_digest).await;
    let pushed_at = jiff::Timestamp::now();
    let v2 = bed.builder.push("demo/report", "latest").await.unwrap();
    let lines = wait_for(
        "drift lines for both containers",
        ROLLOUT_TIMEOUT,
        || async {
            let lines: Vec<Value> = bed
                .coordinator_log()
                .await
                .into_iter()
                .filter(|l| {
                    message(l) == "container"
                        && field(l, "name") == Some(&json!("watched"))
                        && field(l, "state") == Some(&json!("drift"))
                })
                .collect();
            let containers: std::collections::BTreeSet<String> = lines
                .iter()
                .filter_map(|l| {
                    field(l, "container")
                        .and_then(Value::as_str)
                        .map(String::from)
                })
                .collect();
            Ok((containers.len() == 2).then_some(lines))
        },
    )
    .await
    .unwrap();
    for line in &lines {
        assert!(
            field(line, "registry_digest")
                .and_then(Value::as_str)
                .is_some_and(|d| d == v2.manifest_digest),
            "{line}"
        );
    }
    // One line per container and report: as many `a` lines as `b` lines.
    let count = |c: &str| {
        lines
            .iter()
            .filter(|l| field(l, "container") == Some(&json!(c)))
            .count()
    };
    assert!(
        (count("a") as i64 - count("b") as i64).abs() <= 1,
        "a: {}, b: {}",
        count("a"),
        count("b")
    );
    let audit = bed.audit();
    assert!(
        coordinator_writes(&audit, "watched", pushed_at).is_empty(),
        "report mode writes nothing"
    );
    assert!(
        bed.pods(DEMO, "app=watched")
            .await
            .iter()
            .all(|p| image_ids(p)
                .iter()
                .all(|id| id.ends_with(&v1.manifest_digest))),
        "report mode leaves the pods on the old digest"
    );
}

async fn bed_report(bed: &Bed) -> Value {
    bed.report().await
}

/// The first container's state and reason of workload `name` in a report.
fn workload_container_state(report: &Value, name: &str) -> Option<(String, String)> {
    let workload = report["workloads"]
        .as_array()?
        .iter()
        .find(|w| w["name"] == json!(name))?;
    let state = &workload["containers"][0]["state"];
    Some((
        state["state"].as_str()?.to_string(),
        state["reason"].as_str().unwrap_or_default().to_string(),
    ))
}
