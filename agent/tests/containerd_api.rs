//! The agent on containerd's own API (events, content store) against the test bed's real
//! containerd and registry, and its fallback to CRI alone when that API is unreachable.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tower::ServiceExt;
use warmroll_agent::containerd::{ContainerdApi, ContentStore, EventSource};
use warmroll_agent::cri::{self, CriClient};
use warmroll_agent::inventory::{self, ChangeSet, Intervals, InventoryUpdate};
use warmroll_agent::metrics::{Health, Metrics};
use warmroll_agent::progress::PullProgress;
use warmroll_agent::warm::{WarmConfig, Warmer};
use warmroll_proto::image::{Digest, ImageRef};
use warmroll_tests::containerd::{ContainerSpec, Containerd, PodSpec, Runtime};
use warmroll_tests::image::ImageBuilder;
use warmroll_tests::registry::{Registry, RegistryOptions};

async fn client(socket: &Path) -> (Arc<CriClient>, k8s_cri::v1::VersionResponse) {
    let (client, version) = cri::connect(Some(socket), Metrics::new(), Arc::new(Health::default()))
        .await
        .expect("the socket answers CRI v1");
    (Arc::new(client), version)
}

/// Starts the inventory loop; returns its updates and the task.
fn inventory_loop(
    cri: &Arc<CriClient>,
    events: Option<Arc<dyn EventSource>>,
    intervals: Intervals,
    metrics: &Metrics,
) -> (mpsc::Receiver<InventoryUpdate>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(32);
    let task = tokio::spawn(inventory::run(
        cri.clone(),
        events,
        intervals,
        metrics.clone(),
        Arc::new(Health::default()),
        tx,
    ));
    (rx, task)
}

/// The next change set that satisfies `want`, within `within`.
async fn change_where(
    rx: &mut mpsc::Receiver<InventoryUpdate>,
    within: Duration,
    want: impl Fn(&ChangeSet) -> bool,
) -> ChangeSet {
    let deadline = Instant::now() + within;
    loop {
        let update = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no matching inventory change within {within:?}"))
            .expect("inventory loop alive");
        if let InventoryUpdate::Changes(c) = update
            && want(&c)
        {
            return c;
        }
    }
}

const NO_POLL: Intervals = Intervals {
    poll: Duration::from_secs(60),
    resync: Duration::from_secs(60),
};

async fn containerd_events_make_inventory_changes_at_once(runtime: Runtime) {
    let registry = Registry::start(RegistryOptions::plain()).await.unwrap();
    let containerd = Containerd::start_with_registry_on(runtime, &registry)
        .await
        .unwrap();
    let builder = ImageBuilder::new(&registry).unwrap();
    let web = builder.push("shop/web", "main").await.unwrap();
    containerd.pull(&web.reference, None).await.unwrap();
    let (cri, version) = client(containerd.socket()).await;
    let api = ContainerdApi::detect(containerd.socket(), &version)
        .await
        .expect("the test bed containerd serves its own API");
    let metrics = Metrics::new();
    let (mut rx, task) = inventory_loop(&cri, Some(Arc::new(api)), NO_POLL, &metrics);
    let begun = Instant::now();
    let first = tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(first, InventoryUpdate::Full(_)));
    println!("first snapshot after {:?}", begun.elapsed());

    // A pod started through CRI: its container arrives long before the 60 s poll.
    let pod = containerd
        .run_pod(
            &PodSpec::new("shop", "web-1")
                .label("app", "web")
                .container(ContainerSpec::new("web", &web.reference)),
        )
        .await
        .unwrap();
    let started = Instant::now();
    let added = change_where(&mut rx, Duration::from_secs(20), |c| !c.added.is_empty()).await;
    let latency = started.elapsed();
    println!("container start -> inventory change: {latency:?}");
    assert!(latency <= Duration::from_secs(1), "{latency:?}");
    assert_eq!(added.added.len(), 1, "{added:#?}");
    let c = &added.added[0];
    assert_eq!(
        (c.pod.name.as_str(), c.container.as_str()),
        ("web-1", "web")
    );
    assert_eq!(c.pod_labels.get("app").map(String::as_str), Some("web"));
    assert_eq!(
        c.digest,
        Some(Digest::parse(&web.manifest_digest).unwrap()),
        "the running digest"
    );

    // A new build pulled under the same tag: the image change arrives at once.
    let next = builder.push("shop/web", "main").await.unwrap();
    containerd.pull(&next.reference, None).await.unwrap();
    let pulled = Instant::now();
    let images = change_where(&mut rx, Duration::from_secs(20), |c| {
        c.images_added.iter().any(|i| i.id == next.config_digest)
    })
    .await;
    println!("image pull -> inventory change: {:?}", pulled.elapsed());
    assert!(pulled.elapsed() <= Duration::from_secs(1), "{images:#?}");

    // The pod stops: a removal, again without waiting for the poll.
    containerd.stop_pod(&pod).await.unwrap();
    let stopped = Instant::now();
    let removed = change_where(&mut rx, Duration::from_secs(20), |c| !c.removed.is_empty()).await;
    println!(
        "container stop -> inventory change: {:?}",
        stopped.elapsed()
    );
    assert!(stopped.elapsed() <= Duration::from_secs(1));
    assert_eq!(removed.removed[0].pod.name, "web-1");
    let text = metrics.encode();
    assert!(
        text.contains("warmroll_agent_runtime_events_followed 1"),
        "{text}"
    );
    assert!(
        !text.contains("warmroll_agent_runtime_events_total 0"),
        "events were counted: {text}"
    );
    drop(rx);
    task.await.unwrap();
}

async fn event_stream_is_followed_again_after_a_containerd_restart(runtime: Runtime) {
    let registry = Registry::start(RegistryOptions::plain()).await.unwrap();
    let mut containerd = Containerd::start_with_registry_on(runtime, &registry)
        .await
        .unwrap();
    let web = ImageBuilder::new(&registry)
        .unwrap()
        .push("shop/web", "main")
        .await
        .unwrap();
    containerd.pull(&web.reference, None).await.unwrap();
    let (cri, version) = client(containerd.socket()).await;
    let api = ContainerdApi::detect(containerd.socket(), &version)
        .await
        .unwrap();
    let (mut rx, task) = inventory_loop(&cri, Some(Arc::new(api)), NO_POLL, &Metrics::new());
    tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .unwrap()
        .unwrap();
    containerd.kill().await.unwrap();
    containerd.restart().await.unwrap();
    // Give the loop time to notice and resubscribe.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pod = containerd
        .run_pod(
            &PodSpec::new("shop", "after-restart")
                .container(ContainerSpec::new("web", &web.reference)),
        )
        .await
        .unwrap();
    let started = Instant::now();
    let added = change_where(&mut rx, Duration::from_secs(20), |c| {
        c.added.iter().any(|c| c.pod.name == "after-restart")
    })
    .await;
    println!(
        "after a restart, container start -> change: {:?}",
        started.elapsed()
    );
    // Well before the 60 s poll: the stream was resubscribed (its backoff starts at
    // 250 ms), and the resubscription's full read or the event itself brought the pod.
    assert!(started.elapsed() <= Duration::from_secs(20), "{added:#?}");
    containerd.stop_pod(&pod).await.unwrap();
    drop(rx);
    task.await.unwrap();
}

/// Collects every progress value a warm-up publishes.
fn record(
    mut progress: tokio::sync::watch::Receiver<Option<PullProgress>>,
) -> tokio::task::JoinHandle<Vec<PullProgress>> {
    tokio::spawn(async move {
        let mut seen = Vec::new();
        while progress.changed().await.is_ok() {
            if let Some(p) = *progress.borrow_and_update() {
                seen.push(p);
            }
        }
        seen
    })
}

async fn warming_a_large_image_reports_growing_progress_that_ends_at_the_layer_sizes(
    runtime: Runtime,
) {
    let registry = Registry::start(RegistryOptions::plain()).await.unwrap();
    let containerd = Containerd::start_with_registry_on(runtime, &registry)
        .await
        .unwrap();
    let big = ImageBuilder::new(&registry)
        .unwrap()
        .push_random("big/app", "v1", 64 << 20)
        .await
        .unwrap();
    // 64 MiB at 12 MiB/s: about five seconds of download.
    registry.set_bandwidth(Some(12 << 20));
    let (cri, version) = client(containerd.socket()).await;
    let api = ContainerdApi::detect(containerd.socket(), &version)
        .await
        .unwrap();
    let api = Arc::new(api);
    // What containerd 1.6 calls the ingests of a CRI pull, sampled along the way.
    let refs = Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
    let sampler = {
        let (api, refs) = (api.clone(), refs.clone());
        tokio::spawn(async move {
            loop {
                for i in api.ingests().await.unwrap_or_default() {
                    refs.lock().unwrap().insert(i.reference);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let warmer = Warmer::new(
        cri.clone(),
        Some(api.clone() as Arc<dyn ContentStore>),
        WarmConfig {
            max_concurrent_pulls: 2,
            min_free_disk: 0,
            flush_after_pull: true,
        },
        Metrics::new(),
    );
    let image = ImageRef::parse(&big.reference).unwrap();
    let expected = Digest::parse(&big.manifest_digest).unwrap();
    let warming = warmer.warm(
        &image,
        Some(&expected),
        None,
        Instant::now() + Duration::from_secs(120),
    );
    let seen = record(warming.progress());
    let ok = warming.await.unwrap();
    let seen = seen.await.unwrap();
    println!("progress: {seen:?}");
    sampler.abort();
    let refs = refs.lock().unwrap().clone();
    println!("ingest refs: {refs:?}");
    assert!(
        refs.iter().any(|r| r.contains("layer-sha256:")),
        "CRI pulls name layer ingests `…layer-sha256:<hex>`: {refs:?}"
    );
    assert!(ok.downloaded);
    assert!(
        seen.len() >= 3,
        "a few samples during the download: {seen:?}"
    );
    assert!(
        seen.iter().all(|p| p.total == Some(big.size)),
        "the total is the layers' size, {}: {seen:?}",
        big.size
    );
    assert!(
        seen.windows(2).all(|w| w[0].done < w[1].done),
        "each report grows: {seen:?}"
    );
    assert!(
        seen.iter().any(|p| p.done > 0 && p.done < big.size),
        "values between nothing and all: {seen:?}"
    );
    let last = seen.last().unwrap();
    assert_eq!(last.done, big.size);
    assert_eq!(last.percent(), Some(100));
}

async fn pull_command_prints_progress_lines_when_not_on_a_terminal(runtime: Runtime) {
    let registry = Registry::start(RegistryOptions::plain()).await.unwrap();
    let containerd = Containerd::start_with_registry_on(runtime, &registry)
        .await
        .unwrap();
    let big = ImageBuilder::new(&registry)
        .unwrap()
        .push_random("big/cli", "v1", 32 << 20)
        .await
        .unwrap();
    registry.set_bandwidth(Some(10 << 20));
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_warmroll-agent"))
        .arg("pull")
        .arg(&big.reference)
        .args(["--expect", &big.manifest_digest, "--min-free-disk", "0"])
        .arg("--cri-socket")
        .arg(containerd.socket())
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let lines: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("pulling: "))
        .collect();
    assert!(lines.len() >= 2, "progress lines expected:\n{stdout}");
    assert!(
        lines.last().unwrap().starts_with("pulling: 100 %"),
        "{stdout}"
    );
    assert!(
        stdout.lines().last().unwrap().starts_with("ok: "),
        "{stdout}"
    );
    assert!(stderr.contains("containerd API open"), "{stderr}");
}

/// A CRI endpoint in front of containerd that forwards only the CRI services: the
/// containerd API is unreachable through it, as on a runtime that is not containerd.
struct CriOnlyProxy {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for CriOnlyProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl CriOnlyProxy {
    fn start(target: &Path) -> CriOnlyProxy {
        let dir = warmroll_tests::scratch::temp_dir("cri-only-proxy").unwrap();
        let socket = dir.path().join("cri.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let channel = warmroll_tests::containerd::unix_channel(target).unwrap();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let channel = channel.clone();
                let service = hyper::service::service_fn(
                    move |request: hyper::Request<hyper::body::Incoming>| {
                        let channel = channel.clone();
                        async move {
                            if !request.uri().path().starts_with("/runtime.v1.") {
                                let status = tonic::Status::unimplemented("CRI only here");
                                return Ok::<_, std::convert::Infallible>(status.into_http());
                            }
                            let request = request.map(tonic::body::Body::new);
                            Ok(match channel.oneshot(request).await {
                                Ok(response) => response,
                                Err(e) => tonic::Status::unavailable(e.to_string()).into_http(),
                            })
                        }
                    },
                );
                connections.spawn(async move {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        CriOnlyProxy {
            _dir: dir,
            socket,
            task,
        }
    }
}

async fn without_the_containerd_api_the_agent_works_through_cri_alone(runtime: Runtime) {
    let registry = Registry::start(RegistryOptions::plain()).await.unwrap();
    let containerd = Containerd::start_with_registry_on(runtime, &registry)
        .await
        .unwrap();
    let builder = ImageBuilder::new(&registry).unwrap();
    let web = builder.push("shop/web", "main").await.unwrap();
    let proxy = CriOnlyProxy::start(containerd.socket());
    let (cri, version) = client(&proxy.socket).await;
    assert_eq!(version.runtime_name, "containerd");
    assert!(
        ContainerdApi::open(&proxy.socket).await.is_err(),
        "the proxy hides containerd's API"
    );
    assert!(
        ContainerdApi::detect(&proxy.socket, &version)
            .await
            .is_none(),
        "so the agent falls back to CRI"
    );

    // Inventory by polling.
    let poll = Intervals {
        poll: Duration::from_millis(300),
        resync: Duration::from_secs(60),
    };
    let metrics = Metrics::new();
    let (mut rx, task) = inventory_loop(&cri, None, poll, &metrics);
    tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .unwrap()
        .unwrap();
    let pod = containerd
        .run_pod(
            &PodSpec::new("shop", "polled").container(ContainerSpec::new("web", &web.reference)),
        )
        .await
        .unwrap();
    let added = change_where(&mut rx, Duration::from_secs(20), |c| {
        c.added.iter().any(|c| c.pod.name == "polled")
    })
    .await;
    assert_eq!(
        added.added[0].digest,
        Some(Digest::parse(&web.manifest_digest).unwrap())
    );
    assert!(
        metrics
            .encode()
            .contains("warmroll_agent_runtime_events_followed 0"),
        "polling, not following events"
    );

    // Warm-up without progress.
    let next = builder.push("shop/web", "main").await.unwrap();
    let warmer = Warmer::new(
        cri.clone(),
        None,
        WarmConfig {
            max_concurrent_pulls: 2,
            min_free_disk: 0,
            flush_after_pull: true,
        },
        Metrics::new(),
    );
    let expected = Digest::parse(&next.manifest_digest).unwrap();
    let warming = warmer.warm(
        &ImageRef::parse(&next.reference).unwrap(),
        Some(&expected),
        None,
        Instant::now() + Duration::from_secs(60),
    );
    let seen = record(warming.progress());
    let ok = warming.await.unwrap();
    assert_eq!(ok.digest, Some(expected));
    assert!(
        seen.await.unwrap().is_empty(),
        "no progress without the API"
    );
    containerd.stop_pod(&pod).await.unwrap();
    drop(rx);
    task.await.unwrap();
}

warmroll_tests::on_each_runtime!(
    containerd_events_make_inventory_changes_at_once,
    event_stream_is_followed_again_after_a_containerd_restart,
    without_the_containerd_api_the_agent_works_through_cri_alone;
    local_pull: warming_a_large_image_reports_growing_progress_that_ends_at_the_layer_sizes,
    pull_command_prints_progress_lines_when_not_on_a_terminal
);
