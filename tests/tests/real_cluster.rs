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
    the_http_port_wants_an_allowed_token_and_report_gets_one(&bed).await;
    workloads_roll_warm_with_one_patch_and_one_event(&bed).await;
    if_not_present_pods_start_on_the_new_digest(&bed).await;
    a_rollout_that_cannot_come_up_is_held_after_one_patch(&bed).await;
    report_mode_logs_one_line_per_drifting_container(&bed).await;
    approve_and_rollout_commands_steer_through_the_api(&bed).await;
    an_agent_and_the_leader_restarted_mid_warm_up_roll_once_and_warm(&bed).await;
    a_forged_pod_report_triggers_no_rollout(&bed).await;
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
/// token, on node-0 saying they are node-1, or with a token requested without pod
/// binding (no node claim): the coordinator refuses all three sessions (the real
/// TokenReview names the account, and the node of a pod-bound token), and node-0 and
/// node-1 keep their own agents' sessions.
async fn sessions_of_other_accounts_or_nodes_are_refused(bed: &Bed) {
    let warmroll = bed.warmroll().await;
    let daemon_sets: Api<DaemonSet> = Api::namespaced(warmroll.client.clone(), NAMESPACE);
    let template = daemon_sets.get(AGENT).await.unwrap().spec.template;
    let mut template = serde_json::to_value(template).unwrap();
    template["spec"]["nodeName"] = json!("node-0");
    let mut other_account = template.clone();
    other_account["spec"]["serviceAccountName"] = json!("default");
    let mut other_node = template.clone();
    let env = other_node["spec"]["containers"][0]["env"]
        .as_array_mut()
        .unwrap();
    for var in env.iter_mut().filter(|v| v["name"] == "NODE_NAME") {
        *var = json!({"name": "NODE_NAME", "value": "node-1"});
    }
    // The agent's own account and node, but a token requested without pod binding (so
    // it names no node), mounted in place of the projected one.
    let unbound = agent_token(bed, None).await;
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(warmroll.client.clone(), NAMESPACE);
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "unbound-token"},
                "stringData": {"token": unbound},
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let mut unbound_token = template.clone();
    for volume in unbound_token["spec"]["volumes"].as_array_mut().unwrap() {
        if volume["name"] == "token" {
            *volume = json!({"name": "token", "secret": {
                "secretName": "unbound-token",
                "items": [{"key": "token", "path": "warmroll"}],
            }});
        }
    }
    let pods: Api<Pod> = Api::namespaced(warmroll.client.clone(), NAMESPACE);
    for (name, mut pod) in [
        ("agent-other-account", other_account),
        ("agent-other-node", other_node),
        ("agent-unbound-token", unbound_token),
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
        let by_claim = refused.iter().any(|l| {
            field(l, "node") == Some(&json!("node-0"))
                && field(l, "error")
                    .and_then(Value::as_str)
                    .is_some_and(|e| e.contains("names no node"))
        });
        Ok((by_account && by_node && by_claim).then_some(refused))
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
    let (_, body) = warmroll.leader_http("/fleet/nodes/node-0").await.unwrap();
    let entry: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (&entry["connected"], &entry["node_verified"]),
        (&json!(true), &json!(true)),
        "node-0 keeps its own agent's session: {entry}"
    );
    for name in [
        "agent-other-account",
        "agent-other-node",
        "agent-unbound-token",
    ] {
        pods.delete(name, &DeleteParams::default()).await.unwrap();
    }
    secrets
        .delete("unbound-token", &DeleteParams::default())
        .await
        .unwrap();
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
        (
            COORDINATOR_USER,
            "create",
            "authorization.k8s.io",
            "subjectaccessreviews",
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

/// The HTTP port on the real API server: `/report` without a token is 401 (the probes
/// stay open), with a token of a ServiceAccount RBAC does not let read it 403 (a real
/// TokenReview and SubjectAccessReview, made by the coordinator's account), and the
/// release `warmroll-coordinator report` gets in with the admin kubeconfig, whose client
/// certificate cannot be sent on: it requests a token of the chart's reader account.
async fn the_http_port_wants_an_allowed_token_and_report_gets_one(bed: &Bed) {
    let warmroll = bed.warmroll().await;
    let leader = warmroll.leader(READY_TIMEOUT).await.unwrap();
    let (status, body) = warmroll.http_as(&leader, "/report", None).await.unwrap();
    assert_eq!(status, 401, "/report without a token: {body}");
    let (status, body) = warmroll.http_as(&leader, "/healthz", None).await.unwrap();
    assert_eq!(status, 200, "/healthz without a token: {body}");
    let stranger = warmroll.token_of("default").await.unwrap();
    let (status, body) = warmroll
        .http_as(&leader, "/report", Some(&stranger))
        .await
        .unwrap();
    assert_eq!(status, 403, "/report as warmroll/default: {body}");
    assert!(
        body.contains(
            "user \"system:serviceaccount:warmroll:default\" cannot get path \"/report\""
        ),
        "{body}"
    );
    let access_reviews = bed
        .audit()
        .into_iter()
        .filter(|e| {
            e.user.username == COORDINATOR_USER
                && e.resource() == "subjectaccessreviews"
                && e.verb == "create"
                && e.code() == 201
        })
        .count();
    assert!(
        access_reviews >= 1,
        "the coordinator asked the real API server"
    );

    let relay = warmroll.relay(&leader).await.unwrap();
    let out = coordinator_command(bed, &["report", "--url", &format!("http://{relay}")]);
    assert!(out.starts_with("NAMESPACE"), "{out}");
    assert!(out.contains(" workloads, "), "{out}");
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
/// Issue 20: a slow registry link makes the warm-up take tens of seconds. Mid-pull the
/// agent pod of node-0 is deleted (an upgrade, an eviction, an OOM kill): the
/// DaemonSet's new agent gets the order again from the leader, which logs so. Then the
/// leader itself is deleted: the standby takes the Lease and finishes the rollout from
/// the workload and the agents' reports. Every node holds the new digest before the one
/// patch, and the workload converges well before the 2-minute warm timeout.
async fn an_agent_and_the_leader_restarted_mid_warm_up_roll_once_and_warm(bed: &Bed) {
    const SIZE: u64 = 48 << 20;
    let warmroll = bed.warmroll().await;
    let v1 = bed
        .builder
        .push_random("demo/big", "latest", SIZE)
        .await
        .unwrap();
    bed.create(
        DEMO,
        workload(
            "DaemonSet",
            "big",
            "rollout",
            &bed.image(&v1),
            "Always",
            u32::from(NODES),
        ),
    )
    .await;
    bed.wait_pods_on("big", usize::from(NODES), &v1.manifest_digest)
        .await;

    // About 12 s per node's download, one shared link.
    bed.registry.set_bandwidth(Some(4 << 20));
    let pushed_at = jiff::Timestamp::now();
    let v2 = bed
        .builder
        .push_random("demo/big", "latest", SIZE)
        .await
        .unwrap();
    let agents: Api<Pod> = Api::namespaced(bed.client.clone(), NAMESPACE);
    let on_node_0 = |pods: Vec<Pod>| {
        pods.into_iter()
            .find(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some("node-0"))
    };
    // The order is out once node-0's agent reports bytes of the new build.
    wait_for("node-0 pulling the new build", ROLLOUT_TIMEOUT, || async {
        let report = warmroll.report().await?;
        let pulling = report["workloads"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|w| w["name"] == json!("big") && w["warm_bytes"]["done"].as_u64() > Some(0));
        Ok(pulling.then_some(()))
    })
    .await
    .unwrap();
    let old_agent = on_node_0(
        bed.pods(NAMESPACE, "app.kubernetes.io/component=agent")
            .await,
    )
    .expect("the agent pod of node-0");
    let old_uid = old_agent.metadata.uid.clone();
    agents
        .delete(
            old_agent.metadata.name.as_deref().unwrap(),
            &DeleteParams::default(),
        )
        .await
        .unwrap();
    eprintln!("deleted node-0's agent mid-pull");
    let resent = wait_for(
        "the order sent again to node-0's new agent",
        ROLLOUT_TIMEOUT,
        || async {
            let resent = warmroll.coordinator_log().await?.into_iter().find(|l| {
                message(l) == "warm orders still outstanding sent again on the new session"
                    && field(l, "node") == Some(&json!("node-0"))
            });
            Ok(resent)
        },
    )
    .await
    .unwrap();
    eprintln!("resent: {resent}");
    let new_agent = on_node_0(
        bed.pods(NAMESPACE, "app.kubernetes.io/component=agent")
            .await,
    )
    .expect("node-0's new agent");
    assert_ne!(new_agent.metadata.uid, old_uid, "a new agent pod");

    // The leader goes too, while the warm-up still runs.
    let leader = warmroll.leader(Duration::from_secs(30)).await.unwrap();
    let coordinators: Api<Pod> = Api::namespaced(bed.client.clone(), NAMESPACE);
    coordinators
        .delete(
            leader.metadata.name.as_deref().unwrap(),
            &DeleteParams::default(),
        )
        .await
        .unwrap();
    eprintln!("deleted the leader {:?} mid-warm-up", leader.metadata.name);

    bed.wait_pods_on("big", usize::from(NODES), &v2.manifest_digest)
        .await;
    let converged_in = jiff::Timestamp::now().duration_since(pushed_at);
    bed.registry.set_bandwidth(None);
    eprintln!("big converged on the new build {converged_in:#} after the push");
    assert!(
        converged_in < jiff::SignedDuration::from_secs(100),
        "converged in {converged_in:#}, the warm timeout is 2 minutes"
    );
    let audit = bed.audit();
    let writes = coordinator_writes(&audit, "big", pushed_at);
    let patches: Vec<_> = writes.iter().filter(|e| e.verb == "patch").collect();
    assert_eq!(patches.len(), 1, "one patch of big: {writes:#?}");
    let patched = patches[0].request_received_timestamp;
    let warm = warmroll.warm_lines().await.unwrap();
    for i in 0..NODES {
        let node = format!("node-{i}");
        let warmed = warm
            .iter()
            .find(|w| w.node == node && w.is_digest(&v2.manifest_digest))
            .unwrap_or_else(|| panic!("{node} never reported the new build warm: {warm:#?}"));
        assert!(
            warmed.at < patched,
            "{node} warmed at {}, after the patch at {patched}",
            warmed.at
        );
    }
}

/// Issue 20: a session with a real node-bound token (requested for node-1's agent pod)
/// reports a pod that does not exist, in the namespace and with the labels of a tracked
/// workload, on an old digest. The API server does not list that pod on that node, so
/// the report is ignored (logged, counted): no patch, and the workload stays in sync.
async fn a_forged_pod_report_triggers_no_rollout(bed: &Bed) {
    let warmroll = bed.warmroll().await;
    let v1 = bed.builder.push("demo/forged", "latest").await.unwrap();
    bed.create(
        DEMO,
        workload(
            "Deployment",
            "forged",
            "rollout",
            &bed.image(&v1),
            "Always",
            1,
        ),
    )
    .await;
    bed.wait_pods_on("forged", 1, &v1.manifest_digest).await;
    let old = bed.builder.push("demo/forged", "old").await.unwrap();
    let since = jiff::Timestamp::now();

    let agent = bed
        .pods(NAMESPACE, "app.kubernetes.io/component=agent")
        .await
        .into_iter()
        .find(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some("node-1"))
        .expect("node-1's agent");
    let token = agent_token(bed, Some(&agent)).await;
    let forged = warmroll_proto::v1::Container {
        id: "f".repeat(64),
        pod: Some(warmroll_proto::v1::PodRef {
            namespace: DEMO.into(),
            name: "forged-6d4cf56db6-zzzzz".into(),
            uid: "00000000-0000-0000-0000-000000000001".into(),
        }),
        pod_labels: [("app".to_owned(), "forged".to_owned())].into(),
        name: "main".into(),
        image: bed.image(&old),
        image_id: format!("sha256:{}", "0".repeat(64)),
        digest: old.manifest_digest.clone(),
    };
    let session = raw_agent_session(bed, &token, "node-1", vec![forged]).await;
    let refuted = wait_for("the forged report refuted", ROLLOUT_TIMEOUT, || async {
        Ok(warmroll.coordinator_log().await?.into_iter().find(|l| {
            message(l)
                == "an agent reported a pod the API server does not have on that node; ignored"
        }))
    })
    .await
    .unwrap();
    eprintln!("refuted: {refuted}");
    // Several engine steps later: still no patch, and the workload is in sync.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(patches_since(bed, "forged", since), 0, "no patch of forged");
    let report = warmroll.report().await.unwrap();
    let state = workload_container_state(&report, "forged");
    assert_eq!(
        state.as_ref().map(|s| s.0.as_str()),
        Some("in-sync"),
        "{report}"
    );
    drop(session);
}

/// A token of the agents' ServiceAccount for warmroll's audience, bound to `pod` (so it
/// carries the pod's node, as the kubelet projects it), or to nothing (so it names no
/// node).
async fn agent_token(bed: &Bed, pod: Option<&Pod>) -> String {
    use k8s_openapi::api::authentication::v1::{
        BoundObjectReference, TokenRequest, TokenRequestSpec,
    };
    use k8s_openapi::api::core::v1::ServiceAccount;
    let accounts: Api<ServiceAccount> = Api::namespaced(bed.client.clone(), NAMESPACE);
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(vec!["warmroll".into()]),
            bound_object_ref: pod.map(|pod| BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
            expiration_seconds: Some(600),
            ..Default::default()
        }),
        ..Default::default()
    };
    accounts
        .create_token_request(AGENT, &PostParams::default(), &request)
        .await
        .unwrap()
        .status
        .and_then(|s| s.token)
        .expect("the TokenRequest's token")
}

/// A session to the leader's fleet API (TLS, trusting the chart's CA) that says hello as
/// `node` and sends `containers` as its snapshot; it stays open while the returned
/// sender lives.
async fn raw_agent_session(
    bed: &Bed,
    token: &str,
    node: &str,
    containers: Vec<warmroll_proto::v1::Container>,
) -> tokio::sync::mpsc::Sender<warmroll_proto::v1::AgentMessage> {
    use k8s_openapi::api::core::v1::Secret;
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
    use warmroll_proto::v1;
    let warmroll = bed.warmroll().await;
    let secrets: Api<Secret> = Api::namespaced(bed.client.clone(), NAMESPACE);
    let ca = secrets
        .get(&format!("{COORDINATOR}-tls"))
        .await
        .unwrap()
        .data
        .unwrap()["ca.crt"]
        .0
        .clone();
    let leader = warmroll.leader(Duration::from_secs(60)).await.unwrap();
    let ip = leader.status.unwrap().pod_ip.unwrap();
    let relay = bed
        .cluster
        .forward(std::net::SocketAddr::new(ip.parse().unwrap(), 8443))
        .await
        .unwrap();
    let channel = Endpoint::from_shared(format!("https://{relay}"))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .domain_name(format!("{COORDINATOR}.{NAMESPACE}.svc")),
        )
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(v1::AgentMessage {
        kind: Some(v1::agent_message::Kind::Hello(v1::Hello {
            node_name: node.into(),
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: String::new(),
            runtime_name: "containerd".into(),
            runtime_version: "forged".into(),
            agent_version: "forged".into(),
            protocol_version: warmroll_proto::fleet::PROTOCOL_VERSION,
        })),
    })
    .await
    .unwrap();
    tx.send(v1::AgentMessage {
        kind: Some(v1::agent_message::Kind::Snapshot(v1::InventorySnapshot {
            sequence: 1,
            containers,
            images: vec![],
            more: false,
        })),
    })
    .await
    .unwrap();
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let mut answers = v1::fleet_client::FleetClient::new(channel)
        .session(request)
        .await
        .expect("the forged agent's session is accepted (its token is real)")
        .into_inner();
    tokio::spawn(async move { while let Ok(Some(_)) = answers.message().await {} });
    tx
}

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
