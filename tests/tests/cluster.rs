#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
//! The sandbox cluster against the real containerd, runc and CNCF registry: kubelets
//! realising pods through CRI, controllers rolling workloads, status read as
//! `kubectl rollout status` reads it.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Node, Pod, Secret};
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use warmroll_tests::cluster::{
    CONTROLLER_USER, Cluster, ClusterOptions, PodRecord, RolloutStatusOf, deployment_rollout,
};
use warmroll_tests::containerd::{mounts_under, processes_mentioning};
use warmroll_tests::image::ImageBuilder;
use warmroll_tests::registry::{Registry, RegistryOptions};

const NS: &str = "default";
const ROLLOUT: Duration = Duration::from_secs(90);

async fn bed(nodes: usize) -> (Registry, ImageBuilder, Cluster) {
    let registry = Registry::start(RegistryOptions::plain()).await.unwrap();
    let images = ImageBuilder::new(&registry).unwrap();
    let options = ClusterOptions {
        resync: Duration::from_millis(500),
        pull_backoff: Duration::from_millis(100),
        max_pull_backoff: Duration::from_secs(1),
        ..ClusterOptions::nodes(nodes)
    };
    let cluster = Cluster::start(options, &registry).await.unwrap();
    (registry, images, cluster)
}

/// A workload of `kind` named `name` running `image`, with `spec` merged in.
fn workload<K: DeserializeOwned>(kind: &str, name: &str, image: &str, spec: Value) -> K {
    let mut value = json!({
        "apiVersion": "apps/v1",
        "kind": kind,
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "app", "image": image}]}
            }
        }
    });
    json_patch::merge(&mut value["spec"], &spec);
    serde_json::from_value(value).unwrap()
}

async fn create<K>(cluster: &Cluster, obj: &K)
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    Api::<K>::namespaced(cluster.client(), NS)
        .create(&PostParams::default(), obj)
        .await
        .unwrap();
}

/// `kubectl rollout restart`: a template annotation change.
async fn restart<K>(cluster: &Cluster, name: &str, stamp: &str)
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let patch = json!({"spec": {"template": {"metadata": {"annotations": {
        "kubectl.kubernetes.io/restartedAt": stamp
    }}}}});
    Api::<K>::namespaced(cluster.client(), NS)
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

/// The pods of `app` that are not terminating (a rollout is done while the old pods
/// still terminate, as in a real cluster).
async fn pods(cluster: &Cluster, app: &str) -> Vec<Pod> {
    Api::<Pod>::namespaced(cluster.client(), NS)
        .list(&ListParams::default().labels(&format!("app={app}")))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect()
}

fn node_of(pod: &Pod) -> String {
    pod.spec.as_ref().unwrap().node_name.clone().unwrap()
}

fn image_ids(pod: &Pod) -> Vec<String> {
    pod.status
        .as_ref()
        .unwrap()
        .container_statuses
        .iter()
        .flatten()
        .map(|c| c.image_id.clone())
        .collect()
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .iter()
        .flat_map(|s| s.conditions.iter().flatten())
        .any(|c| c.type_ == "Ready" && c.status == "True")
}

async fn rolled_out<K: RolloutStatusOf>(cluster: &Cluster, name: &str) -> K {
    cluster
        .wait_rolled_out::<K>(NS, name, ROLLOUT)
        .await
        .unwrap()
}

/// The sandboxes on a node (CRI), polled until there are `n`.
async fn wait_sandboxes(cluster: &Cluster, node: &str, n: usize) {
    let runtime = cluster.node(node).unwrap().containerd().pod_runtime();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let count = runtime.sandboxes().await.unwrap().len();
        if count == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node {node} has {count} sandboxes, expected {n}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn records_of<'a>(records: &'a [PodRecord], kind: &str, name: &str) -> Vec<&'a PodRecord> {
    records
        .iter()
        .filter(|r| {
            r.owner
                .as_ref()
                .is_some_and(|o| o.kind == kind && o.name == name)
        })
        .collect()
}

#[tokio::test]
async fn deployment_spreads_reports_image_ids_and_rolls_with_surge() {
    let (_registry, images, cluster) = bed(2).await;
    let nodes = Api::<Node>::all(cluster.client())
        .list(&ListParams::default())
        .await
        .unwrap();
    assert_eq!(nodes.items.len(), 2);
    let pushed = images.push("app", "latest").await.unwrap();
    let web: Deployment = workload(
        "Deployment",
        "web",
        &pushed.reference,
        json!({"replicas": 3}),
    );
    create(&cluster, &web).await;

    let d: Deployment = rolled_out(&cluster, "web").await;
    let status = d.status.unwrap();
    assert_eq!(
        (
            status.replicas,
            status.ready_replicas,
            status.available_replicas
        ),
        (Some(3), Some(3), Some(3))
    );
    let first = pods(&cluster, "web").await;
    assert_eq!(first.len(), 3);
    for pod in &first {
        assert!(is_ready(pod), "{pod:?}");
        assert_eq!(
            pod.status.as_ref().unwrap().phase.as_deref(),
            Some("Running")
        );
        assert_eq!(image_ids(pod), [pushed.pinned()]);
        let cs = &pod
            .status
            .as_ref()
            .unwrap()
            .container_statuses
            .as_ref()
            .unwrap()[0];
        assert_eq!(cs.image, pushed.reference);
        assert!(cs.state.as_ref().unwrap().running.is_some());
    }
    let used: BTreeSet<String> = first.iter().map(node_of).collect();
    assert_eq!(used.len(), 2, "3 replicas spread over both nodes");
    // The containers really run where the API says.
    for node in ["node-1", "node-2"] {
        let on_node = first.iter().filter(|p| node_of(p) == node).count();
        let containers = cluster
            .node(node)
            .unwrap()
            .containerd()
            .list_containers()
            .await
            .unwrap();
        assert_eq!(containers.len(), on_node, "containers on {node}");
    }

    let since = Instant::now();
    restart::<Deployment>(&cluster, "web", "1").await;
    let d: Deployment = cluster.api().get(NS, "web").unwrap().unwrap();
    assert!(
        !deployment_rollout(&d).done,
        "mid-rollout right after the patch"
    );
    let mut seen_mid = Vec::new();
    while !deployment_rollout(&cluster.api().get::<Deployment>(NS, "web").unwrap().unwrap()).done {
        let d: Deployment = cluster.api().get(NS, "web").unwrap().unwrap();
        seen_mid.push(deployment_rollout(&d).message);
        assert!(since.elapsed() < ROLLOUT, "{seen_mid:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        seen_mid
            .iter()
            .any(|m| m.contains("new replicas have been updated")),
        "{seen_mid:?}"
    );
    let d: Deployment = rolled_out(&cluster, "web").await;
    let status = d.status.unwrap();
    assert_eq!(status.observed_generation, d.metadata.generation);
    assert_eq!(
        (
            status.replicas,
            status.updated_replicas,
            status.available_replicas
        ),
        (Some(3), Some(3), Some(3))
    );
    let second = pods(&cluster, "web").await;
    assert_eq!(second.len(), 3);
    let old: BTreeSet<_> = first.iter().map(|p| p.metadata.uid.clone()).collect();
    assert!(
        second
            .iter()
            .all(|p| !old.contains(&p.metadata.uid) && is_ready(p))
    );
    let hashes: BTreeSet<_> = second
        .iter()
        .map(|p| p.metadata.labels.as_ref().unwrap()["pod-template-hash"].clone())
        .collect();
    assert_eq!(hashes.len(), 1);

    // 25 % surge on 3 replicas = 1, 0 unavailable: every old pod went after its
    // replacement was ready.
    let gaps = cluster.not_ready_gaps(NS, "Deployment", "web", since);
    assert_eq!(gaps.len(), 3, "{gaps:?}");
    assert!(
        gaps.iter().all(|g| g.duration() == Some(Duration::ZERO)),
        "{gaps:?}"
    );
    assert_eq!(cluster.ready_on(&pushed.manifest_digest).len(), 6);
    // Deleted pods leave no sandbox behind.
    for node in ["node-1", "node-2"] {
        let n = second.iter().filter(|p| node_of(p) == node).count();
        wait_sandboxes(&cluster, node, n).await;
    }
    // The only writes not made by the cluster's components: the create and the patch.
    assert_eq!(
        cluster.foreign_writes().len(),
        2,
        "{:?}",
        cluster.foreign_writes()
    );
}

#[tokio::test]
async fn recreate_deletes_every_old_pod_before_creating_new_ones() {
    let (_registry, images, cluster) = bed(1).await;
    let pushed = images.push("app", "latest").await.unwrap();
    let spec = json!({"replicas": 2, "strategy": {"type": "Recreate"}});
    create(
        &cluster,
        &workload::<Deployment>("Deployment", "rec", &pushed.reference, spec),
    )
    .await;
    let _: Deployment = rolled_out(&cluster, "rec").await;

    let since = Instant::now();
    restart::<Deployment>(&cluster, "rec", "1").await;
    let _: Deployment = rolled_out(&cluster, "rec").await;
    let records = cluster.pods();
    let mine = records_of(&records, "Deployment", "rec");
    let (old, new): (Vec<&PodRecord>, Vec<&PodRecord>) =
        mine.into_iter().partition(|r| r.created < since);
    assert_eq!((old.len(), new.len()), (2, 2));
    let last_deleted = old.iter().map(|r| r.deleted.unwrap()).max().unwrap();
    let first_created = new.iter().map(|r| r.created).min().unwrap();
    assert!(
        last_deleted <= first_created,
        "a new pod came before the old ones went"
    );
    let gaps = cluster.not_ready_gaps(NS, "Deployment", "rec", since);
    assert_eq!(gaps.len(), 2);
    assert!(
        gaps.iter().all(|g| g.duration().unwrap() > Duration::ZERO),
        "{gaps:?}"
    );

    // Deleting the workload deletes its pods (garbage collection), and kubelet their
    // sandboxes.
    Api::<Deployment>::namespaced(cluster.client(), NS)
        .delete("rec", &Default::default())
        .await
        .unwrap();
    wait_sandboxes(&cluster, "node-1", 0).await;
    assert!(pods(&cluster, "rec").await.is_empty());
}

#[tokio::test]
async fn daemonset_rolls_node_by_node_deleting_before_creating() {
    let (_registry, images, cluster) = bed(2).await;
    let pushed = images.push("agent", "latest").await.unwrap();
    create(
        &cluster,
        &workload::<DaemonSet>("DaemonSet", "ds", &pushed.reference, json!({})),
    )
    .await;
    let d: DaemonSet = rolled_out(&cluster, "ds").await;
    assert_eq!(d.status.as_ref().unwrap().desired_number_scheduled, 2);
    let first = pods(&cluster, "ds").await;
    let used: BTreeSet<String> = first.iter().map(node_of).collect();
    assert_eq!(
        used,
        BTreeSet::from(["node-1".to_string(), "node-2".to_string()])
    );

    let since = Instant::now();
    restart::<DaemonSet>(&cluster, "ds", "1").await;
    let d: DaemonSet = rolled_out(&cluster, "ds").await;
    let status = d.status.unwrap();
    assert_eq!(
        (status.updated_number_scheduled, status.number_ready),
        (Some(2), 2)
    );
    let records = cluster.pods();
    let mine = records_of(&records, "DaemonSet", "ds");
    let mut rolled = Vec::new();
    for node in ["node-1", "node-2"] {
        let old = mine
            .iter()
            .find(|r| r.node == node && r.created < since)
            .unwrap();
        let new = mine
            .iter()
            .find(|r| r.node == node && r.created >= since)
            .unwrap();
        assert!(
            old.deleted.unwrap() <= new.created,
            "delete then create on {node}"
        );
        rolled.push((old.deleted.unwrap(), new.ready.unwrap()));
    }
    rolled.sort();
    // maxUnavailable 1: the second node's old pod went after the first node's new one
    // was ready.
    assert!(rolled[1].0 >= rolled[0].1, "{rolled:?}");
    // Graceful deletion: the controller deleted each old pod, its kubelet stopped it
    // and then deleted it for good.
    let deletes_by = |user: &str| {
        cluster
            .api()
            .requests()
            .iter()
            .filter(|r| r.method.as_str() == "DELETE" && r.user.as_deref() == Some(user))
            .count()
    };
    assert_eq!(deletes_by(CONTROLLER_USER), 2);
    assert_eq!(
        deletes_by("system:node:node-1") + deletes_by("system:node:node-2"),
        2
    );
    let gaps = cluster.not_ready_gaps(NS, "DaemonSet", "ds", since);
    assert_eq!(gaps.len(), 2);
    assert!(gaps.iter().all(|g| g.duration().unwrap() > Duration::ZERO));
    assert_eq!(
        gaps.iter()
            .map(|g| g.slot.as_str())
            .collect::<BTreeSet<_>>(),
        BTreeSet::from(["node-1", "node-2"])
    );
}

#[tokio::test]
async fn statefulset_starts_in_order_and_rolls_one_at_a_time_from_the_top() {
    let (_registry, images, cluster) = bed(2).await;
    let pushed = images.push("db", "latest").await.unwrap();
    create(
        &cluster,
        &workload::<StatefulSet>(
            "StatefulSet",
            "db",
            &pushed.reference,
            json!({"replicas": 3}),
        ),
    )
    .await;
    let s: StatefulSet = rolled_out(&cluster, "db").await;
    let first_revision = s.status.as_ref().unwrap().current_revision.clone().unwrap();
    let names: BTreeSet<String> = pods(&cluster, "db")
        .await
        .iter()
        .map(|p| p.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(
        names,
        BTreeSet::from(["db-0", "db-1", "db-2"].map(String::from))
    );
    let records = cluster.pods();
    let start: Vec<&PodRecord> = ["db-0", "db-1", "db-2"]
        .iter()
        .map(|n| {
            *records_of(&records, "StatefulSet", "db")
                .iter()
                .find(|r| r.name == *n)
                .unwrap()
        })
        .collect();
    assert!(start[1].created >= start[0].ready.unwrap());
    assert!(start[2].created >= start[1].ready.unwrap());

    let since = Instant::now();
    restart::<StatefulSet>(&cluster, "db", "1").await;
    let s: StatefulSet = rolled_out(&cluster, "db").await;
    let status = s.status.unwrap();
    assert_eq!(status.current_revision, status.update_revision);
    assert_ne!(
        status.current_revision.as_deref(),
        Some(first_revision.as_str())
    );
    assert_eq!(status.updated_replicas, Some(3));

    let records = cluster.pods();
    let old: Vec<&PodRecord> = records_of(&records, "StatefulSet", "db")
        .into_iter()
        .filter(|r| r.created < since)
        .collect();
    let mut by_deletion = old.clone();
    by_deletion.sort_by_key(|r| r.deleted.unwrap());
    assert_eq!(
        by_deletion
            .iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>(),
        ["db-2", "db-1", "db-0"]
    );
    let gaps = cluster.not_ready_gaps(NS, "StatefulSet", "db", since);
    assert_eq!(gaps.len(), 3);
    let slot = |n: &str| gaps.iter().find(|g| g.slot == n).unwrap();
    // One at a time: db-1 went only after the new db-2 was ready.
    assert!(slot("db-1").from >= slot("db-2").to.unwrap());
    assert!(slot("db-0").from >= slot("db-1").to.unwrap());
}

#[tokio::test]
async fn always_runs_the_new_push_if_not_present_keeps_the_node_image_until_pulled() {
    let (_registry, images, cluster) = bed(1).await;
    let a1 = images.push("a", "latest").await.unwrap();
    let b1 = images.push("b", "v1").await.unwrap();
    let always = json!({"template": {"spec": {"containers": [
        {"name": "app", "image": a1.reference, "imagePullPolicy": "Always"}]}}});
    let cached = json!({"template": {"spec": {"containers": [
        {"name": "app", "image": b1.reference, "imagePullPolicy": "IfNotPresent"}]}}});
    create(
        &cluster,
        &workload::<Deployment>("Deployment", "always", &a1.reference, always),
    )
    .await;
    create(
        &cluster,
        &workload::<Deployment>("Deployment", "cached", &b1.reference, cached),
    )
    .await;
    let _: Deployment = rolled_out(&cluster, "always").await;
    let _: Deployment = rolled_out(&cluster, "cached").await;

    let a2 = images.push("a", "latest").await.unwrap();
    let b2 = images.push("b", "v1").await.unwrap();
    assert_ne!(a1.manifest_digest, a2.manifest_digest);
    let since = Instant::now();
    restart::<Deployment>(&cluster, "always", "1").await;
    restart::<Deployment>(&cluster, "cached", "1").await;
    let _: Deployment = rolled_out(&cluster, "always").await;
    let _: Deployment = rolled_out(&cluster, "cached").await;
    let always_pods = pods(&cluster, "always").await;
    assert_eq!(always_pods.len(), 1);
    assert_eq!(image_ids(&always_pods[0]), [a2.pinned()]);
    let cached_pods = pods(&cluster, "cached").await;
    assert_eq!(cached_pods.len(), 1);
    assert_eq!(
        image_ids(&cached_pods[0]),
        [b1.pinned()],
        "IfNotPresent kept the node's image"
    );
    let on_a2 = cluster.ready_on(&a2.manifest_digest);
    assert_eq!(on_a2.len(), 1);
    assert!(on_a2[0].at >= since);
    assert_eq!(on_a2[0].node, "node-1");

    // What warmroll's agent does: pull the tag on the node. IfNotPresent pods then
    // start on the new digest.
    cluster.nodes()[0]
        .containerd()
        .pull(&b2.reference, None)
        .await
        .unwrap();
    restart::<Deployment>(&cluster, "cached", "2").await;
    let _: Deployment = rolled_out(&cluster, "cached").await;
    let cached_pods = pods(&cluster, "cached").await;
    assert_eq!(cached_pods.len(), 1);
    assert_eq!(image_ids(&cached_pods[0]), [b2.pinned()]);
}

#[tokio::test]
async fn missing_image_reports_image_pull_backoff_and_drop_leaves_nothing() {
    let (registry, _images, cluster) = bed(1).await;
    let missing = format!("{}/missing:latest", registry.host());
    create(
        &cluster,
        &workload::<Deployment>("Deployment", "broken", &missing, json!({"replicas": 1})),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let waiting = loop {
        let reasons: Vec<_> = pods(&cluster, "broken")
            .await
            .iter()
            .filter_map(|p| {
                let cs = p
                    .status
                    .as_ref()?
                    .container_statuses
                    .as_ref()?
                    .first()?
                    .clone();
                cs.state?.waiting
            })
            .collect();
        if let Some(w) = reasons
            .into_iter()
            .find(|w| w.reason.as_deref() == Some("ImagePullBackOff"))
        {
            break w;
        }
        assert!(Instant::now() < deadline, "no ImagePullBackOff");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(waiting.message.unwrap().contains(&missing));
    let pod = &pods(&cluster, "broken").await[0];
    assert!(!is_ready(pod));
    assert_eq!(
        pod.status.as_ref().unwrap().phase.as_deref(),
        Some("Pending")
    );
    let d: Deployment = cluster.api().get(NS, "broken").unwrap().unwrap();
    assert!(!deployment_rollout(&d).done);
    assert_eq!(d.status.unwrap().available_replicas, Some(0));

    let dirs: Vec<PathBuf> = cluster
        .nodes()
        .iter()
        .map(|n| n.containerd().dir().to_path_buf())
        .collect();
    drop(cluster);
    for dir in dirs {
        assert_eq!(processes_mentioning(&dir), vec![]);
        assert_eq!(mounts_under(&dir), Vec::<PathBuf>::new());
        assert!(!dir.exists());
    }
}

#[tokio::test]
async fn image_pull_secrets_authenticate_the_pull() {
    let (_registry, _images, cluster) = bed(1).await;
    let private = Registry::start(RegistryOptions::plain().basic("ci", "s3cret"))
        .await
        .unwrap();
    cluster.trust_registry(&private).unwrap();
    let pushed = ImageBuilder::new(&private)
        .unwrap()
        .push("private", "latest")
        .await
        .unwrap();
    let config = json!({"auths": {private.host(): {"username": "ci", "password": "s3cret"}}});
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "pull", "namespace": NS},
        "type": "kubernetes.io/dockerconfigjson",
        "stringData": {".dockerconfigjson": config.to_string()}
    }))
    .unwrap();
    create(&cluster, &secret).await;
    let spec = json!({"template": {"spec": {"imagePullSecrets": [{"name": "pull"}]}}});
    create(
        &cluster,
        &workload::<Deployment>("Deployment", "private", &pushed.reference, spec),
    )
    .await;
    let _: Deployment = rolled_out(&cluster, "private").await;
    let running = pods(&cluster, "private").await;
    assert_eq!(image_ids(&running[0]), [pushed.pinned()]);
}

#[test]
fn a_panic_mid_rollout_still_cleans_up_every_node() {
    let (tx, rx) = std::sync::mpsc::channel();
    let outcome = std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let (_registry, images, cluster) = bed(2).await;
            let pushed = images.push("app", "latest").await.unwrap();
            let web = workload::<Deployment>(
                "Deployment",
                "web",
                &pushed.reference,
                json!({"replicas": 2}),
            );
            create(&cluster, &web).await;
            let _: Deployment = rolled_out(&cluster, "web").await;
            restart::<Deployment>(&cluster, "web", "1").await;
            let dirs: Vec<PathBuf> = cluster
                .nodes()
                .iter()
                .map(|n| n.containerd().dir().to_path_buf())
                .collect();
            tx.send(dirs).unwrap();
            panic!("test failure mid-rollout");
        })
    })
    .join();
    assert!(outcome.is_err(), "the test thread panicked");
    let dirs = rx.recv().unwrap();
    assert_eq!(dirs.len(), 2);
    for dir in dirs {
        assert_eq!(processes_mentioning(&dir), vec![]);
        assert_eq!(mounts_under(&dir), Vec::<PathBuf>::new());
        assert!(!dir.exists());
    }
}
