#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
//! warmroll on a real Kubernetes: the official control plane and kubelets built by
//! `scripts/build-kubernetes`, each node with its own containerd 2.x from
//! `scripts/build-containerd` in its default configuration (`tests/src/kube`),
//! warmroll's images built from the release binaries, the unchanged chart installed
//! with `helm`.
//!
//! One cluster serves every step in order (bringing it up takes the time); each step
//! says what it shows, and a failure names the step.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::authorization::v1::SubjectAccessReview;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::rbac::v1::RoleBinding;
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use serde_json::{Value, json};
use warmroll_tests::containerd::CONTAINERD2_RELEASE;
use warmroll_tests::image::{ImageBuilder, Pushed};
use warmroll_tests::kube::helm::{self, NAMESPACE};
use warmroll_tests::kube::warmroll::{
    AGENT, AGENT_USER, COORDINATOR, COORDINATOR_USER, Warmroll, coordinator_writes, field,
    image_ids, is_ready, message, workload,
};
use warmroll_tests::kube::{AuditEvent, KUBE_RELEASE, KubeCluster, wait_for};
use warmroll_tests::registry::{Registry, RegistryOptions};
use warmroll_tests::warmroll_image::{push_warmroll_images, release_coordinator};

const NODES: u8 = 2;
const DEMO: &str = "demo";
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
      # Several pushes of one tag follow each other within minutes here.
      cooldown: 5s
      rolloutTimeout: 5m
      warm:
        enabled: true
        threshold: 1.0
        timeout: 2m
        onTimeout: hold
        targets: schedulable
    approved:
      mode: rollout
      pollInterval: 2s
      cooldown: 5s
      requireApproval: true
      warm:
        timeout: 2m
        targets: schedulable
";

struct Bed {
    registry: Registry,
    cluster: KubeCluster,
    builder: ImageBuilder,
    /// The admin client, built once.
    client: kube::Client,
}

impl Bed {
    fn image(&self, pushed: &Pushed) -> String {
        self.cluster.image_ref(&pushed.reference)
    }

    async fn warmroll(&self) -> Warmroll<'_> {
        Warmroll {
            cluster: &self.cluster,
            client: self.client.clone(),
        }
    }

    async fn pods(&self, namespace: &str, selector: &str) -> Vec<Pod> {
        self.warmroll()
            .await
            .pods(namespace, selector)
            .await
            .unwrap()
    }

    fn audit(&self) -> Vec<AuditEvent> {
        self.cluster.audit().unwrap()
    }

    async fn create(&self, namespace: &str, manifest: Value) {
        self.warmroll()
            .await
            .apply(namespace, &manifest)
            .await
            .unwrap();
    }

    /// Waits until `count` pods of `app` run, Ready, on image `digest` (their status's
    /// `imageID`); returns them.
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
                    .filter(|p| is_ready(p) && image_ids(p).values().all(|id| id.ends_with(digest)))
                    .count();
                Ok((live.len() == count && on == count).then_some(live))
            },
        )
        .await
        .unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn warmroll_on_a_real_cluster() {
    let registry = Registry::start(RegistryOptions::plain()).await.unwrap();
    let cluster = KubeCluster::start(&registry, NODES)
        .await
        .expect("the real cluster (scripts/build-kubernetes builds its binaries)");
    eprintln!(
        "real cluster: Kubernetes {} on {}",
        cluster.version(),
        cluster.runtime_version()
    );
    assert_eq!(cluster.version(), KUBE_RELEASE);
    assert_eq!(
        cluster.runtime_version(),
        // The Node's containerRuntimeVersion drops the `v` CRI `Version` has.
        format!(
            "containerd://{}",
            CONTAINERD2_RELEASE.trim_start_matches('v')
        )
    );
    let builder = ImageBuilder::new(&registry).unwrap();
    let client = cluster.client().await.unwrap();
    let bed = Bed {
        registry,
        cluster,
        builder,
        client,
    };

    chart_installs_and_agents_are_accepted(&bed).await;
    sessions_of_other_accounts_or_nodes_are_refused(&bed).await;
    rbac_allows_the_work_and_nothing_more(&bed).await;
    workloads_roll_warm_with_one_patch_and_one_event(&bed).await;
    if_not_present_pods_start_on_the_new_digest(&bed).await;
    a_rollout_that_cannot_come_up_is_held_after_one_patch(&bed).await;
    report_mode_logs_one_line_per_drifting_container(&bed).await;
    approve_and_rollout_commands_steer_through_the_api(&bed).await;
    namespaced_rbac_watches_its_namespaces_and_says_when_forbidden(&bed).await;
}

/// The chart installs with values only; both coordinator replicas run, the Lease names
/// the Ready one; one agent per node is Ready and its session was accepted through a
/// real TokenReview with the node-name claim of its pod-bound token.
async fn chart_installs_and_agents_are_accepted(bed: &Bed) {
    let images = push_warmroll_images(&bed.registry, "test").await.unwrap();
    let output = helm::install(&bed.cluster, &images, VALUES).unwrap();
    eprintln!("{output}");
    let warmroll = bed.warmroll().await;
    let leader = warmroll
        .wait_ready(usize::from(NODES), READY_TIMEOUT)
        .await
        .unwrap();
    let coordinators = warmroll.coordinator_pods().await.unwrap();
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
        if pod.metadata.name != leader.metadata.name {
            let (status, body) = warmroll.http(pod, "/readyz").await.unwrap();
            assert_eq!(status, 503, "the standby's /readyz: {body}");
        }
    }

    let fleet: Value = wait_for("every agent connected", READY_TIMEOUT, || async {
        let (status, body) = warmroll.leader_http("/fleet").await?;
        let fleet: Value = serde_json::from_str(&body)?;
        Ok((status == 200 && fleet["connected"] == json!(NODES)).then_some(fleet))
    })
    .await
    .unwrap();
    assert_eq!(fleet["nodes"], json!(NODES), "{fleet}");
    for i in 0..NODES {
        let node = format!("node-{i}");
        let (status, body) = warmroll
            .leader_http(&format!("/fleet/nodes/{node}"))
            .await
            .unwrap();
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

/// Agents started from the chart's own pod template, but with another ServiceAccount's
/// token, or on node-0 saying they are node-1: the coordinator refuses both sessions
/// (the real TokenReview names the account, and the node of a pod-bound token).
async fn sessions_of_other_accounts_or_nodes_are_refused(bed: &Bed) {
    let warmroll = bed.warmroll().await;
    let daemon_sets: Api<DaemonSet> = Api::namespaced(warmroll.client.clone(), NAMESPACE);
    let template = daemon_sets.get(AGENT).await.unwrap().spec.template;
    let mut template = serde_json::to_value(template).unwrap();
    template["spec"]["nodeName"] = json!("node-0");
    let mut other_account = template.clone();
    other_account["spec"]["serviceAccountName"] = json!("default");
    let mut other_node = template;
    let env = other_node["spec"]["containers"][0]["env"]
        .as_array_mut()
        .unwrap();
    for var in env.iter_mut().filter(|v| v["name"] == "NODE_NAME") {
        *var = json!({"name": "NODE_NAME", "value": "node-1"});
    }
    let pods: Api<Pod> = Api::namespaced(warmroll.client.clone(), NAMESPACE);
    for (name, mut pod) in [
        ("agent-other-account", other_account),
        ("agent-other-node", other_node),
    ] {
        pod["metadata"] = json!({"name": name, "labels": {"test": name}});
        pod["apiVersion"] = json!("v1");
        pod["kind"] = json!("Pod");
        pods.create(
            &PostParams::default(),
            &serde_json::from_value(pod).unwrap(),
        )
        .await
        .unwrap();
    }
    let refused = wait_for("both sessions refused", READY_TIMEOUT, || async {
        let refused: Vec<Value> = warmroll
            .coordinator_log()
            .await?
            .into_iter()
            .filter(|l| message(l) == "agent session refused")
            .collect();
        let by_account = refused.iter().any(|l| {
            field(l, "error")
                .and_then(Value::as_str)
                .is_some_and(|e| e.contains("default"))
        });
        let by_node = refused
            .iter()
            .any(|l| field(l, "node") == Some(&json!("node-1")));
        Ok((by_account && by_node).then_some(refused))
    })
    .await
    .unwrap();
    eprintln!("refused: {refused:#?}");
    let (_, body) = warmroll.leader_http("/fleet/nodes/node-1").await.unwrap();
    let entry: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        entry["node_verified"],
        json!(true),
        "node-1 is still its own agent's: {entry}"
    );
    for name in ["agent-other-account", "agent-other-node"] {
        pods.delete(name, &DeleteParams::default()).await.unwrap();
    }
}

/// The chart's RBAC as the real API server enforces it: a SubjectAccessReview for each
/// thing the coordinator and the agents must and must not do.
async fn rbac_allows_the_work_and_nothing_more(bed: &Bed) {
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
        let allowed = allowed(bed, user, verb, group, resource, namespace).await;
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
async fn workloads_roll_warm_with_one_patch_and_one_event(bed: &Bed) {
    let warmroll = bed.warmroll().await;
    let namespaces: Api<Namespace> = Api::all(warmroll.client.clone());
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
    for (kind, name, replicas) in apps {
        let replicas = u32::try_from(replicas).unwrap();
        bed.create(
            DEMO,
            workload(kind, name, "rollout", &image, "Always", replicas),
        )
        .await;
    }
    let mut before: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for (_, name, count) in apps {
        let pods = bed.wait_pods_on(name, count, &v1.manifest_digest).await;
        before.insert(
            name,
            pods.into_iter().filter_map(|p| p.metadata.uid).collect(),
        );
    }

    let pushed_at = jiff::Timestamp::now();
    let v2 = bed.builder.push("demo/app", "latest").await.unwrap();
    assert_ne!(v2.manifest_digest, v1.manifest_digest);
    for (_, name, count) in apps {
        for pod in bed.wait_pods_on(name, count, &v2.manifest_digest).await {
            assert!(
                !before[name].contains(pod.metadata.uid.as_ref().unwrap()),
                "{name}: a new pod"
            );
        }
    }

    let audit = bed.audit();
    let warm = warmroll.warm_lines().await.unwrap();
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
            let warmed = warm
                .iter()
                .find(|w| w.node == node && w.is_digest(&v2.manifest_digest))
                .unwrap_or_else(|| {
                    panic!(
                        "{node} never reported {} warm: {warm:#?}",
                        v2.manifest_digest
                    )
                });
            assert!(
                warmed.at < patched,
                "{node} warmed {} at {}, after {name}'s patch at {patched}",
                v2.manifest_digest,
                warmed.at
            );
        }
    }
}

/// `imagePullPolicy: IfNotPresent` on a tag whose old build is on every node: the
/// kubelet would start the old build again; after warmroll's rollout (the agents moved
/// the tag on each node first) the new pods run the new digest.
async fn if_not_present_pods_start_on_the_new_digest(bed: &Bed) {
    let v1 = bed.builder.push("demo/cached", "stable").await.unwrap();
    let image = bed.image(&v1);
    for node in bed.cluster.nodes() {
        warmroll_tests::containerd::pull_on(&node.cri_socket(), &image)
            .await
            .unwrap();
    }
    bed.create(
        DEMO,
        workload("Deployment", "cached", "rollout", &image, "IfNotPresent", 2),
    )
    .await;
    bed.wait_pods_on("cached", 2, &v1.manifest_digest).await;
    let pushed_at = jiff::Timestamp::now();
    let v2 = bed.builder.push("demo/cached", "stable").await.unwrap();
    bed.wait_pods_on("cached", 2, &v2.manifest_digest).await;
    assert_eq!(
        patches_since(bed, "cached", pushed_at),
        1,
        "one patch of cached"
    );
}

/// A rollout whose new pods exit at once: the real Deployment controller reports its
/// progress deadline exceeded, the coordinator reports the workload `held` with the
/// reason, and patches it exactly once.
async fn a_rollout_that_cannot_come_up_is_held_after_one_patch(bed: &Bed) {
    let v1 = bed.builder.push("demo/crash", "latest").await.unwrap();
    let mut object = workload(
        "Deployment",
        "crash",
        "rollout",
        &bed.image(&v1),
        "Always",
        1,
    );
    object["spec"]["progressDeadlineSeconds"] = json!(10);
    // A new pod counts as available only after 5 s Ready: on Kubernetes 1.36 over
    // containerd 2.x the kubelet reports the crashing container Running for a moment, and
    // without this the Deployment completes its rollout (deleting the old pod) before
    // the container exits, so no progress deadline can pass.
    object["spec"]["minReadySeconds"] = json!(5);
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
    let warmroll = bed.warmroll().await;
    let reason = wait_for("crash held in the report", ROLLOUT_TIMEOUT, || async {
        let report = warmroll.report().await?;
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
    assert_eq!(
        patches_since(bed, "crash", pushed_at),
        1,
        "crash patched once"
    );
}

/// Report mode: a push makes the leader log one `container` line per drifting container
/// (read from the real container log file), and nothing is written to the workload.
async fn report_mode_logs_one_line_per_drifting_container(bed: &Bed) {
    let v1 = bed.builder.push("demo/report", "latest").await.unwrap();
    let image = bed.image(&v1);
    let mut object = workload("Deployment", "watched", "report", &image, "Always", 1);
    object["spec"]["template"]["spec"]["containers"] = json!([
        {"name": "a", "image": image, "imagePullPolicy": "Always"},
        {"name": "b", "image": image, "imagePullPolicy": "Always"},
    ]);
    bed.create(DEMO, object).await;
    bed.wait_pods_on("watched", 1, &v1.manifest_digest).await;
    let pushed_at = jiff::Timestamp::now();
    let v2 = bed.builder.push("demo/report", "latest").await.unwrap();
    let warmroll = bed.warmroll().await;
    let lines = wait_for(
        "drift lines for both containers",
        ROLLOUT_TIMEOUT,
        || async {
            let lines: Vec<Value> = warmroll
                .coordinator_log()
                .await?
                .into_iter()
                .filter(|l| {
                    message(l) == "container"
                        && field(l, "name") == Some(&json!("watched"))
                        && field(l, "state") == Some(&json!("drift"))
                })
                .collect();
            let containers: BTreeSet<String> = lines
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
        assert_eq!(
            field(line, "registry_digest").and_then(Value::as_str),
            Some(v2.manifest_digest.as_str()),
            "{line}"
        );
    }
    // One line per container and report: as many `a` lines as `b` lines, give or take
    // the report being written while we read.
    let count = |c: &str| {
        lines
            .iter()
            .filter(|l| field(l, "container") == Some(&json!(c)))
            .count()
    };
    assert!(
        count("a").abs_diff(count("b")) <= 1,
        "a: {}, b: {}",
        count("a"),
        count("b")
    );
    let audit = bed.audit();
    assert!(
        coordinator_writes(&audit, "watched", pushed_at).is_empty(),
        "report mode writes nothing"
    );
    for pod in bed.pods(DEMO, "app=watched").await {
        assert!(
            image_ids(&pod)
                .values()
                .all(|id| id.ends_with(&v1.manifest_digest)),
            "report mode leaves the pods on the old digest"
        );
    }
}

/// Runs the release `warmroll-coordinator` with the cluster's admin kubeconfig, as an
/// operator would; returns its output.
fn coordinator_command(bed: &Bed, args: &[&str]) -> String {
    let binary = release_coordinator().unwrap();
    let output = std::process::Command::new(&binary)
        .args(args)
        .env("KUBECONFIG", bed.cluster.kubeconfig())
        .output()
        .unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(
        output.status.success(),
        "warmroll-coordinator {args:?}: {}\n{out}{err}",
        output.status
    );
    out.into_owned()
}

/// The coordinator's patches of `name` since `since`, from the audit log.
fn patches_since(bed: &Bed, name: &str, since: jiff::Timestamp) -> usize {
    coordinator_writes(&bed.audit(), name, since)
        .into_iter()
        .filter(|e| e.verb == "patch")
        .count()
}

/// Steering on the real API with the release binary's commands: a policy that requires
/// approval warms and then waits (`awaiting-approval`); `approve` with an older digest
/// releases nothing, with the new one exactly one patch. `rollout` restarts a
/// report-mode workload onto its tag's new digest, warm, with one patch and the Event
/// reason `RolledOnRequest`.
async fn approve_and_rollout_commands_steer_through_the_api(bed: &Bed) {
    let v1 = bed.builder.push("demo/gated", "latest").await.unwrap();
    let image = bed.image(&v1);
    bed.create(
        DEMO,
        workload("Deployment", "gated", "approved", &image, "Always", 2),
    )
    .await;
    bed.create(
        DEMO,
        workload("Deployment", "asked", "report", &image, "Always", 1),
    )
    .await;
    bed.wait_pods_on("gated", 2, &v1.manifest_digest).await;
    bed.wait_pods_on("asked", 1, &v1.manifest_digest).await;
    let pushed_at = jiff::Timestamp::now();
    let v2 = bed.builder.push("demo/gated", "latest").await.unwrap();
    let warmroll = bed.warmroll().await;
    let reason = wait_for("gated awaiting approval", ROLLOUT_TIMEOUT, || async {
        let report = warmroll.report().await?;
        Ok(workload_container_state(&report, "gated")
            .filter(|(state, _)| state == "awaiting-approval")
            .map(|(_, reason)| reason))
    })
    .await
    .unwrap();
    assert!(reason.contains(&v2.manifest_digest), "{reason}");
    let warm = warmroll.warm_lines().await.unwrap();
    for i in 0..NODES {
        let node = format!("node-{i}");
        assert!(
            warm.iter()
                .any(|w| w.node == node && w.is_digest(&v2.manifest_digest)),
            "{node} is warm while gated awaits approval"
        );
    }
    let key = "demo/Deployment/gated";
    coordinator_command(bed, &["approve", key, "--digest", &v1.manifest_digest]);
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(
        patches_since(bed, "gated", pushed_at),
        0,
        "an older digest's approval"
    );
    let out = coordinator_command(bed, &["approve", key, "--digest", &v2.manifest_digest]);
    assert!(out.contains(&v2.manifest_digest), "{out}");
    bed.wait_pods_on("gated", 2, &v2.manifest_digest).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        patches_since(bed, "gated", pushed_at),
        1,
        "one approved patch"
    );

    // `asked` drifts to v2 under a report policy; a request restarts it onto v2.
    let asked_at = jiff::Timestamp::now();
    assert_eq!(patches_since(bed, "asked", pushed_at), 0, "report mode");
    coordinator_command(bed, &["rollout", "demo/Deployment/asked"]);
    bed.wait_pods_on("asked", 1, &v2.manifest_digest).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        patches_since(bed, "asked", asked_at),
        1,
        "one requested patch"
    );
    let events: Api<k8s_openapi::api::core::v1::Event> =
        Api::namespaced(warmroll.client.clone(), DEMO);
    let reasons: Vec<String> = events
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.involved_object.name.as_deref() == Some("asked"))
        .filter(|e| e.reporting_component.as_deref() == Some("warmroll-coordinator"))
        .filter_map(|e| e.reason)
        .collect();
    assert_eq!(
        reasons,
        ["RolledOnRequest"],
        "the Event says it was asked for"
    );
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

/// `rbac.scope: namespaced` (Roles only, in `demo`), for real: the coordinator may no
/// longer list workloads cluster-wide, watches `demo` alone and still rolls there; when
/// its Role is taken away, the new coordinators log the forbidden watch as an error and
/// the leader's `/readyz` answers 503 naming it, until the Role is back.
async fn namespaced_rbac_watches_its_namespaces_and_says_when_forbidden(bed: &Bed) {
    let images = push_warmroll_images(&bed.registry, "test").await.unwrap();
    let values = format!("{VALUES}rbac:\n  scope: namespaced\n  namespaces: [{DEMO}]\n");
    let upgraded_at = jiff::Timestamp::now();
    helm::install(&bed.cluster, &images, &values).unwrap();
    let warmroll = bed.warmroll().await;
    wait_for(
        "coordinators restarted on the namespaced config",
        READY_TIMEOUT,
        || async {
            let pods = warmroll.coordinator_pods().await?;
            let restarted = pods.len() == 2
                && pods.iter().all(|p| {
                    p.metadata.deletion_timestamp.is_none()
                        && p.metadata.creation_timestamp.as_ref().is_some_and(|t| {
                            t.0 >= upgraded_at
                                .checked_sub(jiff::SignedDuration::from_secs(1))
                                .unwrap()
                        })
                });
            Ok(restarted.then_some(()))
        },
    )
    .await
    .unwrap();
    warmroll
        .wait_ready(usize::from(NODES), READY_TIMEOUT)
        .await
        .unwrap();
    assert!(
        !allowed(bed, COORDINATOR_USER, "list", "apps", "deployments", "").await,
        "namespaced: no cluster-wide list"
    );
    assert!(allowed(bed, COORDINATOR_USER, "watch", "apps", "deployments", DEMO).await);

    // Still rolls in its namespace.
    let pushed = bed.builder.push("demo/app", "latest").await.unwrap();
    bed.wait_pods_on("web", 2, &pushed.manifest_digest).await;

    // Take the Role away and restart both coordinators: their watches are refused.
    let bindings: Api<RoleBinding> = Api::namespaced(warmroll.client.clone(), DEMO);
    bindings
        .delete(COORDINATOR, &DeleteParams::default())
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(warmroll.client.clone(), NAMESPACE);
    for pod in warmroll.coordinator_pods().await.unwrap() {
        pods.delete(&pod.metadata.name.unwrap(), &DeleteParams::default())
            .await
            .unwrap();
    }
    let leases: Api<Lease> = Api::namespaced(warmroll.client.clone(), NAMESPACE);
    let body = wait_for(
        "the leader's /readyz naming the forbidden watch",
        READY_TIMEOUT,
        || async {
            let lease = leases.get(COORDINATOR).await?;
            let Some(holder) = lease.spec.and_then(|s| s.holder_identity) else {
                return Ok(None);
            };
            let Ok(pod) = pods.get(&holder).await else {
                return Ok(None);
            };
            let (status, body) = warmroll.http(&pod, "/readyz").await?;
            Ok((status == 503 && body.contains("forbids")).then_some(body))
        },
    )
    .await
    .unwrap();
    assert!(
        body.contains(&format!(
            "Deployment labelled warmroll.io/policy in namespace {DEMO}"
        )),
        "/readyz names the watch: {body}"
    );
    assert!(
        body.contains("forbidden"),
        "/readyz carries the API's message: {body}"
    );
    let errors: Vec<Value> = warmroll
        .coordinator_log()
        .await
        .unwrap()
        .into_iter()
        .filter(|l| l["level"] == json!("ERROR") && message(l).contains("forbids this watch"))
        .collect();
    assert!(
        !errors.is_empty(),
        "the forbidden watch is an error in the log"
    );

    // The Role back (helm recreates what was deleted): ready again.
    helm::install(&bed.cluster, &images, &values).unwrap();
    warmroll
        .wait_ready(usize::from(NODES), READY_TIMEOUT)
        .await
        .unwrap();
}

/// A SubjectAccessReview for a ServiceAccount of warmroll's namespace.
async fn allowed(
    bed: &Bed,
    user: &str,
    verb: &str,
    group: &str,
    resource: &str,
    namespace: &str,
) -> bool {
    let warmroll = bed.warmroll().await;
    let reviews: Api<SubjectAccessReview> = Api::all(warmroll.client.clone());
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
    answer.status.is_some_and(|s| s.allowed)
}
