//! The agent against a real containerd (CRI v1) and a real registry from the test bed.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use warmroll_agent::cri::{self, CriClient};
use warmroll_agent::inventory::{self, ChangeSet, Collector, Intervals, InventoryUpdate};
use warmroll_agent::metrics::{Health, Metrics};
use warmroll_agent::warm::{WarmConfig, WarmError, Warmer};
use warmroll_proto::fleet::Credentials;
use warmroll_proto::image::{Digest, ImageRef};
use warmroll_tests::containerd::{ContainerSpec, Containerd, ImagePull, PodSpec, Runtime};
use warmroll_tests::image::{ImageBuilder, Pushed};
use warmroll_tests::registry::{Registry, RegistryOptions};

async fn client(containerd: &Containerd) -> (Arc<CriClient>, Metrics) {
    let metrics = Metrics::new();
    let (client, version) = cri::connect(
        Some(containerd.socket()),
        metrics.clone(),
        Arc::new(Health::default()),
    )
    .await
    .expect("the test bed containerd answers CRI v1");
    assert_eq!(version.runtime_name, "containerd");
    (Arc::new(client), metrics)
}

fn warmer(cri: &Arc<CriClient>, metrics: &Metrics, min_free_disk: u64) -> Warmer<CriClient> {
    Warmer::new(
        cri.clone(),
        None,
        WarmConfig {
            max_concurrent_pulls: 2,
            min_free_disk,
            flush_after_pull: true,
        },
        metrics.clone(),
    )
}

fn digest(s: &str) -> Digest {
    Digest::parse(s).unwrap()
}

fn soon(secs: u64) -> Instant {
    Instant::now() + Duration::from_secs(secs)
}

async fn inventory_lists_pods_with_labels_and_running_digest_and_follows_changes(runtime: Runtime) {
    let registry = Registry::start(RegistryOptions::plain()).await.unwrap();
    let containerd = Containerd::start_with_registry_on(runtime, &registry)
        .await
        .unwrap();
    let pushed = ImageBuilder::new(&registry)
        .unwrap()
        .push("shop/web", "main")
        .await
        .unwrap();
    let web = containerd
        .run_pod(
            &PodSpec::new("shop", "web-1")
                .uid("uid-web-1")
                .label("app", "web")
                .label("warmroll.io/policy", "default")
                .container(ContainerSpec::new("web", &pushed.reference)),
        )
        .await
        .unwrap();
    let (cri, metrics) = client(&containerd).await;

    let snap = Collector::new(cri.clone()).snapshot().await.unwrap();
    assert_eq!(snap.containers.len(), 1, "{snap:#?}");
    let c = snap.containers.values().next().unwrap();
    assert_eq!(c.pod.namespace, "shop");
    assert_eq!(c.pod.name, "web-1");
    assert_eq!(c.pod.uid, "uid-web-1");
    assert_eq!(c.container, "web");
    assert_eq!(c.pod_labels.get("app").map(String::as_str), Some("web"));
    assert!(
        c.pod_labels
            .keys()
            .all(|k| !k.starts_with("io.kubernetes."))
    );
    assert_eq!(c.digest, Some(digest(&pushed.manifest_digest)));
    assert_eq!(c.image_id, pushed.config_digest);
    assert!(snap.images.contains_key(&pushed.config_digest));

    // The loop (CRI polling only): a full snapshot, then a started and a stopped pod as
    // change sets.
    let interval = Duration::from_millis(500);
    let (tx, mut rx) = mpsc::channel(8);
    let task = tokio::spawn(inventory::run(
        cri.clone(),
        None,
        Intervals {
            poll: interval,
            resync: interval,
        },
        metrics.clone(),
        Arc::new(Health::default()),
        tx,
    ));
    assert!(matches!(
        tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("a first update")
            .expect("loop alive"),
        InventoryUpdate::Full(_)
    ));
    // Change sets that do not concern the pod (image records the runtime touches while
    // starting it) are skipped; the pod's must come by polling within an interval or
    // two. A poll itself takes a few CRI calls, slow on a loaded machine: hence the slack
    // rather than a bare `2 × interval` (which flaked under load).
    async fn change_where(
        rx: &mut mpsc::Receiver<InventoryUpdate>,
        want: impl Fn(&ChangeSet) -> bool,
    ) -> ChangeSet {
        loop {
            let update = tokio::time::timeout(Duration::from_secs(20), rx.recv())
                .await
                .expect("an update")
                .expect("loop alive");
            if let InventoryUpdate::Changes(c) = update
                && want(&c)
            {
                return c;
            }
        }
    }
    let api = containerd
        .run_pod(
            &PodSpec::new("shop", "api-1")
                .label("app", "api")
                .container(ContainerSpec::new("api", &pushed.reference)),
        )
        .await
        .unwrap();
    let started = Instant::now();
    let changes = change_where(&mut rx, |c| !c.added.is_empty()).await;
    println!("pod start -> change by polling: {:?}", started.elapsed());
    let slack = Duration::from_secs(5);
    assert!(
        started.elapsed() <= interval * 2 + slack,
        "{:?}",
        started.elapsed()
    );
    assert_eq!(changes.added.len(), 1, "{changes:#?}");
    assert_eq!(changes.added[0].pod.name, "api-1");
    assert!(changes.removed.is_empty(), "{changes:#?}");
    containerd.stop_pod(&web).await.unwrap();
    let changes = change_where(&mut rx, |c| !c.removed.is_empty()).await;
    assert_eq!(changes.removed.len(), 1, "{changes:#?}");
    assert_eq!(changes.removed[0].pod.name, "web-1");
    drop(rx);
    task.await.unwrap();
    containerd.stop_pod(&api).await.unwrap();
}

async fn warm_moves_the_tag_so_if_not_present_pods_run_the_new_build(runtime: Runtime) {
    let registry = Registry::start(RegistryOptions::plain()).await.unwrap();
    let containerd = Containerd::start_with_registry_on(runtime, &registry)
        .await
        .unwrap();
    let builder = ImageBuilder::new(&registry).unwrap();
    let old = builder.push("shop/web", "main").await.unwrap();
    containerd.pull(&old.reference, None).await.unwrap();
    let new = builder.push("shop/web", "main").await.unwrap();
    assert_ne!(old.manifest_digest, new.manifest_digest);

    let (cri, metrics) = client(&containerd).await;
    let w = warmer(&cri, &metrics, 0);
    let image = ImageRef::parse(&new.reference).unwrap();
    let ok = w
        .warm(&image, Some(&digest(&new.manifest_digest)), None, soon(60))
        .await
        .unwrap();
    assert!(ok.downloaded);
    assert_eq!(ok.image_id, new.config_digest);
    // The download was written back to disk (syncfs on the runtime's image filesystem).
    assert!(
        metrics
            .encode()
            .contains("warmroll_agent_image_flush_seconds_count 1"),
        "{}",
        metrics.encode()
    );
    let status = containerd
        .image_status(&new.reference)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        status.id, new.config_digest,
        "the node's tag points at the new build"
    );

    // IfNotPresent: no pull, created from what the node's tag points to.
    let pod = containerd
        .run_pod(
            &PodSpec::new("shop", "web-2")
                .container(ContainerSpec::new("web", &new.reference).pull(ImagePull::IfNotPresent)),
        )
        .await
        .unwrap();
    let snap = Collector::new(cri.clone()).snapshot().await.unwrap();
    let c = snap
        .containers
        .values()
        .find(|c| c.pod.name == "web-2")
        .unwrap();
    assert_eq!(c.digest, Some(digest(&new.manifest_digest)));

    // Warm again: nothing to download. Expecting the old digest: the tag moved.
    let again = w
        .warm(&image, Some(&digest(&new.manifest_digest)), None, soon(60))
        .await
        .unwrap();
    assert!(!again.downloaded);
    assert!(
        metrics
            .encode()
            .contains("warmroll_agent_image_flush_seconds_count 1"),
        "nothing downloaded, nothing flushed"
    );
    let err = w
        .warm(&image, Some(&digest(&old.manifest_digest)), None, soon(60))
        .await
        .unwrap_err();
    match &err {
        WarmError::DigestMismatch { found, .. } => {
            assert_eq!(found.as_ref(), Some(&digest(&new.manifest_digest)))
        }
        other => panic!("expected a digest mismatch, got {other}"),
    }
    assert!(
        metrics
            .encode()
            .contains("warmroll_agent_pulls_total{outcome=\"digest_mismatch\"} 1")
    );
    containerd.stop_pod(&pod).await.unwrap();
}

/// An index carrying an attestation manifest (platform `unknown/unknown`, as BuildKit
/// pushes them) warms, runs and is inventoried exactly like one without it: the node's
/// tag and the running container name the index digest, never the attestation's.
async fn an_index_with_an_attestation_warms_and_runs_like_one_without(runtime: Runtime) {
    let registry = Registry::start(RegistryOptions::plain()).await.unwrap();
    let containerd = Containerd::start_with_registry_on(runtime, &registry)
        .await
        .unwrap();
    let builder = ImageBuilder::new(&registry).unwrap();
    let (cri, metrics) = client(&containerd).await;
    let w = warmer(&cri, &metrics, 0);
    for (repo, attested) in [("shop/plain", false), ("shop/attested", true)] {
        let pushed = if attested {
            builder.push_index_with_attestation(repo, "main").await
        } else {
            builder.push_index(repo, "main").await
        }
        .unwrap();
        assert_eq!(pushed.attestation.is_some(), attested);
        let amd64 = &pushed.children["linux/amd64"];
        let index = digest(&pushed.index_digest);
        let image = ImageRef::parse(&pushed.reference).unwrap();
        let ok = w.warm(&image, Some(&index), None, soon(60)).await.unwrap();
        assert!(ok.downloaded, "{repo}");
        assert_eq!(ok.digest, Some(index.clone()), "{repo}");
        assert_eq!(ok.image_id, amd64.config_digest, "{repo}: the amd64 child");

        let pod_name = repo.replace('/', "-");
        let pod = containerd
            .run_pod(&PodSpec::new("shop", &pod_name).container(
                ContainerSpec::new("web", &pushed.reference).pull(ImagePull::IfNotPresent),
            ))
            .await
            .unwrap();
        let snap = Collector::new(cri.clone()).snapshot().await.unwrap();
        let c = snap
            .containers
            .values()
            .find(|c| c.pod.name == pod_name)
            .unwrap();
        assert_eq!(c.digest, Some(index.clone()), "{repo}: runs the index");
        if let Some(attestation) = &pushed.attestation {
            assert!(
                snap.images.values().all(|i| !i
                    .repo_digests
                    .iter()
                    .any(|d| d.contains(attestation.as_str()))),
                "no image is recorded under the attestation: {:#?}",
                snap.images
            );
        }
        // Warm again: nothing to download, no mismatch against the attestation.
        let again = w.warm(&image, Some(&index), None, soon(60)).await.unwrap();
        assert!(!again.downloaded, "{repo}");
        containerd.stop_pod(&pod).await.unwrap();
    }
}

/// A registry with auth holding `team/app:main`, and a containerd trusting it (its
/// sandbox image from a registry of its own).
struct Private {
    registry: Registry,
    _sandbox_registry: Registry,
    containerd: Containerd,
    pushed: Pushed,
    image: ImageRef,
}

async fn private_image(runtime: Runtime, options: RegistryOptions) -> Private {
    let registry = Registry::start(options).await.unwrap();
    let sandbox_registry = Registry::start(RegistryOptions::plain()).await.unwrap();
    let containerd = Containerd::start_with_registry_on(runtime, &sandbox_registry)
        .await
        .unwrap();
    containerd.trust_registry(&registry).unwrap();
    let pushed = ImageBuilder::new(&registry)
        .unwrap()
        .push("team/app", "main")
        .await
        .unwrap();
    Private {
        registry,
        _sandbox_registry: sandbox_registry,
        containerd,
        image: ImageRef::parse(&pushed.reference).unwrap(),
        pushed,
    }
}

async fn failures_are_precise_and_the_agent_keeps_working(runtime: Runtime) {
    let Private {
        registry,
        _sandbox_registry,
        mut containerd,
        pushed,
        image,
    } = private_image(runtime, RegistryOptions::plain().basic("ci", "s3cret")).await;
    let (cri, metrics) = client(&containerd).await;
    let w = warmer(&cri, &metrics, 0);
    let good = || {
        Some(Credentials::Basic {
            username: "ci".into(),
            password: "s3cret".into(),
        })
    };

    let wrong = Some(Credentials::Basic {
        username: "ci".into(),
        password: "wrong".into(),
    });
    let err = w.warm(&image, None, wrong, soon(60)).await.unwrap_err();
    assert!(matches!(err, WarmError::Auth { .. }), "{err}");
    assert!(!err.to_string().contains("wrong"), "no secret in {err}");

    let missing = ImageRef::parse(&format!("{}/team/nope:main", registry.host())).unwrap();
    let err = w.warm(&missing, None, good(), soon(60)).await.unwrap_err();
    assert!(matches!(err, WarmError::NotFound { .. }), "{err}");

    let huge = warmer(&cri, &metrics, u64::MAX);
    let err = huge.warm(&image, None, good(), soon(60)).await.unwrap_err();
    assert!(matches!(err, WarmError::InsufficientDisk { .. }), "{err}");

    // containerd killed in the middle: a clear error, then it works after restart.
    containerd.kill().await.unwrap();
    let err = w
        .warm(
            &image,
            None,
            good(),
            Instant::now() + Duration::from_secs(3),
        )
        .await
        .unwrap_err();
    match &err {
        WarmError::Timeout { last_error, .. } => {
            assert!(last_error.is_some(), "{err}")
        }
        other => panic!("expected a timeout naming the runtime error, got {other}"),
    }
    containerd.restart().await.unwrap();
    let ok = w
        .warm(
            &image,
            Some(&digest(&pushed.manifest_digest)),
            good(),
            soon(60),
        )
        .await
        .unwrap();
    assert_eq!(ok.image_id, pushed.config_digest);
    let snap = Collector::new(cri.clone()).snapshot().await.unwrap();
    assert!(snap.images.contains_key(&pushed.config_digest));
}

/// One HTTP/1.0 GET over a plain socket: (status line, body).
async fn http_get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: agent\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

async fn watch_mode_serves_health_and_metrics_and_survives_a_runtime_restart(runtime: Runtime) {
    let registry = Registry::start(RegistryOptions::plain()).await.unwrap();
    let mut containerd = Containerd::start_with_registry_on(runtime, &registry)
        .await
        .unwrap();
    let addr = warmroll_tests::scratch::free_loopback_addr().unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_warmroll-agent"))
        .args(["watch", "--inventory-interval", "300ms", "--listen"])
        .arg(addr.to_string())
        .arg("--cri-socket")
        .arg(containerd.socket())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let wait_for = |path: &'static str, want: &'static str| async move {
        let start = Instant::now();
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                let (status, body) = http_get(addr, path).await;
                if status.contains(want) {
                    return body;
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{path} never answered {want}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    wait_for("/readyz", "200").await;
    wait_for("/healthz", "200").await;
    let metrics = wait_for("/metrics", "200").await;
    assert!(
        metrics.contains("warmroll_agent_inventory_containers 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("warmroll_agent_inventory_images"),
        "{metrics}"
    );
    containerd.kill().await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    containerd.restart().await.unwrap();
    let metrics = wait_for("/metrics", "200").await;
    assert!(
        metrics.contains("warmroll_agent_cri_errors_total"),
        "{metrics}"
    );
    wait_for("/healthz", "200").await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "the agent must outlive a runtime restart"
    );
    drop(child);
}

/// An identity token (Docker's `identitytoken`, an OAuth2 refresh token) in a warm
/// order: containerd trades it at the registry's token server and pulls; a wrong one is
/// an auth failure that names no secret.
async fn identity_tokens_pull_through_the_token_server(runtime: Runtime) {
    let Private {
        registry,
        _sandbox_registry,
        containerd,
        pushed,
        image,
    } = private_image(
        runtime,
        RegistryOptions::plain().token("ci", "s3cret-token"),
    )
    .await;
    let (cri, metrics) = client(&containerd).await;
    let w = warmer(&cri, &metrics, 0);

    let wrong = Some(Credentials::IdentityToken("wrong-refresh-4711".into()));
    let err = w.warm(&image, None, wrong, soon(60)).await.unwrap_err();
    assert!(matches!(err, WarmError::Auth { .. }), "{err}");
    assert!(!err.to_string().contains("4711"), "no secret in {err}");

    let identity = registry.identity_token().unwrap().to_owned();
    let warmed = w
        .warm(
            &image,
            Some(&digest(&pushed.manifest_digest)),
            Some(Credentials::IdentityToken(identity)),
            soon(60),
        )
        .await
        .unwrap();
    assert_eq!(warmed.digest, Some(digest(&pushed.manifest_digest)));
    assert!(
        registry
            .requests()
            .iter()
            .any(|r| r.method == "POST" && r.path == "/token" && r.status == 200),
        "containerd traded the identity token: {:?}",
        registry.requests()
    );
}

warmroll_tests::on_each_runtime!(
    inventory_lists_pods_with_labels_and_running_digest_and_follows_changes,
    warm_moves_the_tag_so_if_not_present_pods_run_the_new_build,
    failures_are_precise_and_the_agent_keeps_working,
    watch_mode_serves_health_and_metrics_and_survives_a_runtime_restart,
    identity_tokens_pull_through_the_token_server,
    an_index_with_an_attestation_warms_and_runs_like_one_without
);
