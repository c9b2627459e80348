#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
//! The containerd test bed against the real containerd, runc and CNCF registry.

/// No registry needed: containerd only pulls the sandbox image when a pod runs.
const UNUSED_SANDBOX: &str = "127.0.0.1:9/none/pause:1";

#[tokio::test]
async fn starts_answers_cri_version_and_leaves_nothing_after_drop() {
    let containerd = Containerd::start(UNUSED_SANDBOX).await.unwrap();
    let version = containerd.version().await.unwrap();
    assert_eq!(version.runtime_name, "containerd");
    assert_eq!(version.runtime_api_version, "v1");
    let dir = containerd.dir().to_path_buf();
    let pid = containerd.pid().unwrap();
    assert!(containerd.socket().exists());
    drop(containerd);
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    assert_eq!(processes_mentioning(&dir), vec![]);
    assert_eq!(mounts_under(&dir), Vec::<std::path::PathBuf>::new());
    assert!(!dir.exists());
}

#[tokio::test]
async fn kill_and_restart_keep_the_same_socket_working() {
    let mut containerd = Containerd::start(UNUSED_SANDBOX).await.unwrap();
    let first = containerd.pid().unwrap();
    containerd.kill().await.unwrap();
    assert_eq!(containerd.pid(), None);
    assert!(
        containerd.version().await.is_err(),
        "CRI answered while killed"
    );
    containerd.restart().await.unwrap();
    assert_ne!(containerd.pid().unwrap(), first);
    containerd.version().await.unwrap();
    containerd.stop().await.unwrap();
    assert!(
        containerd.version().await.is_err(),
        "CRI answered while stopped"
    );
    containerd.restart().await.unwrap();
    containerd.version().await.unwrap();
}

#[tokio::test]
async fn two_containerds_run_side_by_side() {
    let (a, b) = tokio::join!(
        Containerd::start(UNUSED_SANDBOX),
        Containerd::start(UNUSED_SANDBOX)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_ne!(a.socket(), b.socket());
    a.version().await.unwrap();
    b.version().await.unwrap();
    drop(a);
    b.version().await.unwrap();
}

use std::path::{Path, PathBuf};

use k8s_cri::v1::{
    AuthConfig, ContainerState, ContainerStatusRequest, ListPodSandboxRequest, PodSandboxState,
};
use warmroll_tests::containerd::{
    CONTAINERD2_RELEASE, ContainerSpec, Containerd, ImagePull, PodSpec, RunningPod, Runtime,
    mounts_under, processes_mentioning,
};
use warmroll_tests::image::ImageBuilder;
use warmroll_tests::registry::{Registry, RegistryOptions};

/// A plain registry with the sandbox image, and a containerd trusting it.
async fn bed() -> (Registry, Containerd) {
    let registry = Registry::start(RegistryOptions::plain()).await.unwrap();
    let containerd = Containerd::start_with_registry(&registry).await.unwrap();
    (registry, containerd)
}

/// The host pid of a container, from CRI's verbose status.
async fn container_pid(containerd: &Containerd, id: &str) -> i32 {
    let response = containerd
        .runtime()
        .container_status(ContainerStatusRequest {
            container_id: id.to_string(),
            verbose: true,
        })
        .await
        .unwrap()
        .into_inner();
    let info: serde_json::Value = serde_json::from_str(&response.info["info"]).unwrap();
    info["pid"].as_i64().unwrap() as i32
}

fn assert_nothing_left(dir: &Path, pids: &[i32]) {
    assert_eq!(processes_mentioning(dir), vec![], "processes left");
    assert_eq!(mounts_under(dir), Vec::<PathBuf>::new(), "mounts left");
    assert!(!dir.exists(), "{} left", dir.display());
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(
            stat.is_empty() || stat.contains(") Z"),
            "container process {pid} left: {stat}"
        );
    }
}

#[tokio::test]
async fn pushed_image_pulls_through_cri() {
    let (registry, containerd) = bed().await;
    let pushed = ImageBuilder::new(&registry)
        .unwrap()
        .push("app/web", "v1")
        .await
        .unwrap();

    let id = containerd.pull(&pushed.reference, None).await.unwrap();
    assert_eq!(id, pushed.config_digest);

    let status = containerd.image_status(&pushed.reference).await.unwrap();
    assert_eq!(status.map(|i| i.id), Some(pushed.config_digest.clone()));
    let images = containerd.list_images().await.unwrap();
    let image = images
        .iter()
        .find(|i| i.id == pushed.config_digest)
        .expect("pulled image listed");
    assert!(image.repo_tags.contains(&pushed.reference), "{image:?}");
    assert!(image.repo_digests.contains(&pushed.pinned()), "{image:?}");
    let absent = containerd
        .image_status(&format!("{}/app/web:nope", registry.host()))
        .await
        .unwrap();
    assert!(absent.is_none());
}

#[tokio::test]
async fn pod_runs_like_kubelet_runs_it() {
    let (registry, containerd) = bed().await;
    let pushed = ImageBuilder::new(&registry)
        .unwrap()
        .push("app/web", "v1")
        .await
        .unwrap();
    let spec = PodSpec::new("shop", "web-0")
        .label("app", "web")
        .container(ContainerSpec::new("main", &pushed.reference));
    let pod = containerd.run_pod(&spec).await.unwrap();
    let container_id = pod.container_id("main").unwrap();
    assert_eq!(pod.containers[0].image_id, pushed.config_digest);

    let sandboxes = containerd
        .runtime()
        .list_pod_sandbox(ListPodSandboxRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .items;
    let sandbox = sandboxes
        .iter()
        .find(|s| s.id == pod.sandbox_id)
        .expect("sandbox listed");
    assert_eq!(sandbox.state, PodSandboxState::SandboxReady as i32);
    let labels = &sandbox.labels;
    assert_eq!(labels["app"], "web");
    assert_eq!(labels["io.kubernetes.pod.name"], "web-0");
    assert_eq!(labels["io.kubernetes.pod.namespace"], "shop");
    assert_eq!(labels["io.kubernetes.pod.uid"], spec.uid);

    let containers = containerd.list_containers().await.unwrap();
    let listed = containers
        .iter()
        .find(|c| c.id == container_id)
        .expect("container listed");
    assert_eq!(listed.pod_sandbox_id, pod.sandbox_id);
    assert_eq!(listed.state, ContainerState::ContainerRunning as i32);
    assert_eq!(listed.labels["io.kubernetes.container.name"], "main");
    assert_eq!(listed.labels["io.kubernetes.pod.uid"], spec.uid);
    // ListContainers reports the image id, ContainerStatus the running digest.
    assert_eq!(listed.image_ref, pushed.config_digest);
    let status = containerd.container_status(container_id).await.unwrap();
    assert_eq!(status.image_ref, pushed.pinned());
    assert_eq!(status.state, ContainerState::ContainerRunning as i32);

    containerd.stop_pod(&pod).await.unwrap();
    let status = containerd.container_status(container_id).await.unwrap();
    assert_eq!(status.state, ContainerState::ContainerExited as i32);
    containerd.remove_pod(&pod).await.unwrap();
    assert!(containerd.list_containers().await.unwrap().is_empty());
}

#[tokio::test]
async fn if_not_present_runs_what_the_node_tag_points_to() {
    let (registry, containerd) = bed().await;
    let builder = ImageBuilder::new(&registry).unwrap();
    let first = builder.push("app/web", "latest").await.unwrap();
    let pod = |name: &str, pull| {
        PodSpec::new("shop", name)
            .container(ContainerSpec::new("main", &first.reference).pull(pull))
    };
    containerd.pull(&first.reference, None).await.unwrap();
    let second = builder.push("app/web", "latest").await.unwrap();
    assert_ne!(first.manifest_digest, second.manifest_digest);

    let stale = containerd
        .run_pod(&pod("stale", ImagePull::IfNotPresent))
        .await
        .unwrap();
    assert_eq!(stale.containers[0].image_id, first.config_digest);
    let fresh = containerd
        .run_pod(&pod("fresh", ImagePull::Always))
        .await
        .unwrap();
    assert_eq!(fresh.containers[0].image_id, second.config_digest);
    let status = containerd
        .container_status(fresh.container_id("main").unwrap())
        .await
        .unwrap();
    assert_eq!(status.image_ref, second.pinned());
}

#[tokio::test]
async fn tls_registry_is_pulled_from_once_trusted_with_its_ca() {
    let (_plain, containerd) = bed().await;
    let tls = Registry::start(RegistryOptions::plain().tls())
        .await
        .unwrap();
    let pushed = ImageBuilder::new(&tls)
        .unwrap()
        .push("app/secure", "v1")
        .await
        .unwrap();
    let untrusted = containerd.pull(&pushed.reference, None).await;
    assert!(untrusted.is_err(), "pulled from an untrusted TLS registry");

    containerd.trust_registry(&tls).unwrap();
    let id = containerd.pull(&pushed.reference, None).await.unwrap();
    assert_eq!(id, pushed.config_digest);
}

#[tokio::test]
async fn pull_passes_registry_credentials() {
    let (_plain, containerd) = bed().await;
    let basic = Registry::start(RegistryOptions::plain().basic("ci", "s3cret"))
        .await
        .unwrap();
    containerd.trust_registry(&basic).unwrap();
    let pushed = ImageBuilder::new(&basic)
        .unwrap()
        .push("app/private", "v1")
        .await
        .unwrap();
    let auth = |password: &str| AuthConfig {
        username: "ci".into(),
        password: password.into(),
        ..Default::default()
    };
    assert!(containerd.pull(&pushed.reference, None).await.is_err());
    assert!(
        containerd
            .pull(&pushed.reference, Some(auth("wrong")))
            .await
            .is_err()
    );
    let id = containerd
        .pull(&pushed.reference, Some(auth("s3cret")))
        .await
        .unwrap();
    assert_eq!(id, pushed.config_digest);
}

async fn running_pod(registry: &Registry, containerd: &Containerd) -> (RunningPod, i32) {
    let pushed = ImageBuilder::new(registry)
        .unwrap()
        .push("app/web", "v1")
        .await
        .unwrap();
    let pod = containerd
        .run_pod(
            &PodSpec::new("shop", "web-0").container(ContainerSpec::new("main", &pushed.reference)),
        )
        .await
        .unwrap();
    let pid = container_pid(containerd, pod.container_id("main").unwrap()).await;
    (pod, pid)
}

#[tokio::test]
async fn drop_with_a_running_pod_leaves_no_process_or_mount() {
    let (registry, containerd) = bed().await;
    let (_pod, pid) = running_pod(&registry, &containerd).await;
    let dir = containerd.dir().to_path_buf();
    assert!(
        !mounts_under(&dir).is_empty(),
        "a running pod mounts its rootfs"
    );
    assert!(
        !processes_mentioning(containerd.socket()).is_empty(),
        "shims run"
    );
    drop(containerd);
    assert_nothing_left(&dir, &[pid]);
}

/// containerd 2.x (config version 3) runs a pod with its own release's runc shim, not
/// Debian's 1.6 one on PATH, and leaves nothing behind either.
#[tokio::test]
async fn containerd_2_runs_pods_with_its_own_shim_and_leaves_nothing_after_drop() {
    let registry = Registry::start(RegistryOptions::plain()).await.unwrap();
    let containerd = Containerd::start_with_registry_on(Runtime::Containerd2, &registry)
        .await
        .unwrap();
    let version = containerd.version().await.unwrap();
    assert_eq!(version.runtime_name, "containerd");
    assert_eq!(version.runtime_version, CONTAINERD2_RELEASE);
    let (_pod, pid) = running_pod(&registry, &containerd).await;
    let dir = containerd.dir().to_path_buf();
    let shims = processes_mentioning(containerd.socket());
    assert!(!shims.is_empty(), "shims run");
    let shim_dir = Runtime::Containerd2.binaries().unwrap().shim_dir.unwrap();
    for (shim, _) in &shims {
        let exe = std::fs::read_link(format!("/proc/{shim}/exe")).unwrap();
        assert!(
            exe.starts_with(&shim_dir),
            "shim {shim} runs {}, not the 2.x shim in {}",
            exe.display(),
            shim_dir.display()
        );
    }
    drop(containerd);
    assert_nothing_left(&dir, &[pid]);
}

#[tokio::test]
async fn drop_after_kill_still_ends_shims_and_containers() {
    let (registry, mut containerd) = bed().await;
    let (_pod, pid) = running_pod(&registry, &containerd).await;
    let dir = containerd.dir().to_path_buf();
    containerd.kill().await.unwrap();
    assert!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "container survives a runtime kill"
    );
    drop(containerd);
    assert_nothing_left(&dir, &[pid]);
}

#[tokio::test]
async fn pods_survive_a_runtime_restart() {
    let (registry, mut containerd) = bed().await;
    let (pod, pid) = running_pod(&registry, &containerd).await;
    let id = pod.container_id("main").unwrap();
    containerd.kill().await.unwrap();
    containerd.restart().await.unwrap();
    let status = containerd.container_status(id).await.unwrap();
    assert_eq!(status.state, ContainerState::ContainerRunning as i32);
    assert_eq!(container_pid(&containerd, id).await, pid);
    // And the restarted runtime still runs new pods.
    let (second, _) = running_pod(&registry, &containerd).await;
    assert_ne!(second.sandbox_id, pod.sandbox_id);
}

#[test]
fn drop_outside_a_runtime_cleans_up() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (registry, containerd, pid) = runtime.block_on(async {
        let (registry, containerd) = bed().await;
        let (_pod, pid) = running_pod(&registry, &containerd).await;
        (registry, containerd, pid)
    });
    drop(runtime);
    let dir = containerd.dir().to_path_buf();
    drop(containerd);
    assert_nothing_left(&dir, &[pid]);
    drop(registry);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_on_a_multi_thread_runtime_cleans_up() {
    let (registry, containerd) = bed().await;
    let (_pod, pid) = running_pod(&registry, &containerd).await;
    let dir = containerd.dir().to_path_buf();
    drop(containerd);
    assert_nothing_left(&dir, &[pid]);
}

#[test]
fn a_panicking_test_still_cleans_up() {
    let (tx, rx) = std::sync::mpsc::channel();
    let outcome = std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let (registry, containerd) = bed().await;
            let (_pod, pid) = running_pod(&registry, &containerd).await;
            tx.send((containerd.dir().to_path_buf(), pid)).unwrap();
            panic!("test failure while a pod runs");
        })
    })
    .join();
    assert!(outcome.is_err(), "the test thread panicked");
    let (dir, pid) = rx.recv().unwrap();
    assert_nothing_left(&dir, &[pid]);
}
