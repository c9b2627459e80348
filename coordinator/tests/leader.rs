//! Leader election against the KubeApi stand-in's Leases: in-process electors, and two
//! real `warmroll-coordinator run` processes.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod support;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use support::{AGENT_ACCOUNT, AGENT_NAMESPACE, AUDIENCE, Tls, agent_user, hello, register_token};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::Code;
use warmroll_coordinator::leader::{KubeLeases, LeaseConfig, elect};
use warmroll_proto::v1;
use warmroll_tests::kubeapi::KubeApi;
use warmroll_tests::scratch;

const NAMESPACE: &str = "warmroll";
const LEASE: &str = "warmroll-coordinator";
/// A Prometheus token, allowed `get` on `/metrics` (RBAC's nonResourceURLs).
const SCRAPER_TOKEN: &str = "scraper-token-3d9c";

/// Registers [`SCRAPER_TOKEN`] and allows its account to read `/metrics`.
fn allow_scraper(kube: &KubeApi) {
    let user = "system:serviceaccount:monitoring:prometheus";
    kube.register_token(
        SCRAPER_TOKEN,
        user,
        vec!["system:serviceaccounts".into()],
        std::collections::BTreeMap::new(),
        Vec::new(),
    );
    kube.grant_non_resource_urls(user, &["get"], &["/metrics"]);
}

struct Elector {
    leader: watch::Receiver<bool>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Drop for Elector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn config(identity: &str, duration: Duration) -> LeaseConfig {
    LeaseConfig {
        namespace: NAMESPACE.into(),
        name: LEASE.into(),
        identity: identity.into(),
        lease_duration: duration,
    }
}

fn start(kube: &KubeApi, identity: &str, duration: Duration) -> Elector {
    let (tx, leader) = watch::channel(false);
    let (stop, stopped) = oneshot::channel::<()>();
    let store = KubeLeases::new(kube.client(), NAMESPACE, LEASE);
    let task = tokio::spawn(elect(store, config(identity, duration), tx, async move {
        let _ = stopped.await;
    }));
    Elector {
        leader,
        stop: Some(stop),
        task,
    }
}

fn holder(kube: &KubeApi) -> Option<String> {
    kube.get::<Lease>(NAMESPACE, LEASE)
        .unwrap()
        .and_then(|l| l.spec?.holder_identity)
}

/// Waits until exactly one of `a`, `b` leads; returns its index. Fails if both ever do.
async fn one_leader(electors: &[&Elector], within: Duration) -> usize {
    let deadline = Instant::now() + within;
    loop {
        let leading: Vec<usize> = (0..electors.len())
            .filter(|i| *electors[*i].leader.borrow())
            .collect();
        assert!(leading.len() <= 1, "two leaders at once");
        if let [one] = leading[..] {
            return one;
        }
        assert!(Instant::now() < deadline, "no leader within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn two_electors_only_one_leads_and_the_other_takes_over_when_it_stops() {
    let kube = KubeApi::start().await.unwrap();
    let duration = Duration::from_secs(2);
    let a = start(&kube, "coord-a", duration);
    let b = start(&kube, "coord-b", duration);
    let first = one_leader(&[&a, &b], Duration::from_secs(5)).await;
    // Several renewals later, still exactly one leader, and it is the Lease's holder.
    let watched = Instant::now();
    while watched.elapsed() < Duration::from_secs(3) {
        assert_eq!(one_leader(&[&a, &b], Duration::ZERO).await, first);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let names = ["coord-a", "coord-b"];
    assert_eq!(holder(&kube).as_deref(), Some(names[first]));

    // The leader shuts down cleanly: it releases, the other takes over at once.
    let (mut leader, mut other) = if first == 0 { (a, b) } else { (b, a) };
    let _ = leader.stop.take().unwrap().send(());
    (&mut leader.task).await.unwrap();
    assert!(!*leader.leader.borrow());
    let released = Instant::now();
    tokio::time::timeout(duration, other.leader.wait_for(|l| *l))
        .await
        .expect("the other replica did not take over within the lease duration")
        .unwrap();
    assert!(released.elapsed() < duration);
    assert_eq!(holder(&kube).as_deref(), Some(names[1 - first]));
    let lease = kube.get::<Lease>(NAMESPACE, LEASE).unwrap().unwrap();
    assert_eq!(lease.spec.unwrap().lease_transitions, Some(1));
}

#[tokio::test]
async fn a_crashed_leader_is_replaced_once_its_lease_expires() {
    let kube = KubeApi::start().await.unwrap();
    let duration = Duration::from_secs(2);
    let a = start(&kube, "coord-a", duration);
    one_leader(&[&a], Duration::from_secs(5)).await;
    let mut b = start(&kube, "coord-b", duration);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!*b.leader.borrow());

    // a dies without releasing: b waits for the Lease to expire, then takes it.
    a.task.abort();
    let crashed = Instant::now();
    let retry = config("coord-b", duration).retry_period();
    tokio::time::timeout(duration + retry * 3, b.leader.wait_for(|l| *l))
        .await
        .expect("no takeover within the lease duration and a few retries")
        .unwrap();
    let took = crashed.elapsed();
    assert!(
        took >= duration - retry * 2,
        "took over after {took:?}, before the Lease expired"
    );
    assert_eq!(holder(&kube).as_deref(), Some("coord-b"));
}

/// A `warmroll-coordinator run` process, killed on drop.
struct Process {
    child: tokio::process::Child,
    grpc: SocketAddr,
    http: SocketAddr,
}

impl Process {
    fn start(kube: &KubeApi, tls: &Tls, identity: &str) -> Process {
        let grpc = scratch::free_loopback_addr().unwrap();
        let http = scratch::free_loopback_addr().unwrap();
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_warmroll-coordinator"))
            .arg("run")
            .env("KUBECONFIG", kube.kubeconfig_path())
            .env("WARMROLL_GRPC_LISTEN", grpc.to_string())
            .env("WARMROLL_HTTP_LISTEN", http.to_string())
            .env("WARMROLL_TLS_CERT", &tls.files.cert)
            .env("WARMROLL_TLS_KEY", &tls.files.key)
            .env("WARMROLL_TOKEN_AUDIENCE", AUDIENCE)
            .env(
                "WARMROLL_AGENT_SERVICE_ACCOUNT",
                format!("{AGENT_NAMESPACE}:{AGENT_ACCOUNT}"),
            )
            .env("POD_NAMESPACE", NAMESPACE)
            .env("POD_NAME", identity)
            .env("WARMROLL_LEASE_DURATION", "2s")
            .env("WARMROLL_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        Process { child, grpc, http }
    }

    async fn readyz(&self) -> Option<u16> {
        let url = format!("http://{}/readyz", self.http);
        reqwest::get(url).await.ok().map(|r| r.status().as_u16())
    }

    /// `/metrics`, with a token of an account the stand-in lets read it (the HTTP
    /// port asks for one by default).
    async fn metrics(&self) -> String {
        let url = format!("http://{}/metrics", self.http);
        let response = reqwest::Client::new()
            .get(url)
            .bearer_auth(SCRAPER_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "/metrics");
        response.text().await.unwrap()
    }

    fn terminate(&self) {
        let pid = self.child.id().unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
    }
}

/// Opens a session to `process` as node-0's agent; `Ok` once the welcome arrived.
async fn session(
    tls: &Tls,
    process: &Process,
    token: &str,
) -> Result<support::RawSession, tonic::Status> {
    let channel = tls.channel(process.grpc).await.unwrap();
    let mut raw = support::raw_session(channel, token, vec![hello("node-0")])
        .await
        .unwrap();
    let stream = raw.answer.as_mut().map_err(|s| s.clone())?;
    let welcome = stream.message().await?.unwrap();
    assert!(matches!(
        welcome.kind,
        Some(v1::coordinator_message::Kind::Welcome(_))
    ));
    Ok(raw)
}

#[tokio::test]
async fn two_coordinator_processes_only_the_leader_is_ready_and_serves_agents() {
    let kube = KubeApi::start().await.unwrap();
    let tls = Tls::new().unwrap();
    let token = register_token(&kube, &agent_user(), Some("node-0"));
    allow_scraper(&kube);
    let a = Process::start(&kube, &tls, "coord-a");
    // a leads before b starts, so which one leads is known.
    let deadline = Instant::now() + Duration::from_secs(30);
    while a.readyz().await != Some(200) {
        assert!(Instant::now() < deadline, "coord-a never became ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let b = Process::start(&kube, &tls, "coord-b");
    let deadline = Instant::now() + Duration::from_secs(30);
    while b.readyz().await.is_none() {
        assert!(Instant::now() < deadline, "coord-b never served HTTP");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(b.readyz().await, Some(503), "the follower is not ready");
    assert_eq!(holder(&kube).as_deref(), Some("coord-a"));
    assert!(a.metrics().await.contains("warmroll_leader 1"));
    assert!(b.metrics().await.contains("warmroll_leader 0"));

    // The follower answers agents `unavailable`; the leader welcomes them.
    let refused = session(&tls, &b, &token).await.err().unwrap();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    let open = session(&tls, &a, &token).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !a.metrics().await.contains("warmroll_agents_connected 1") {
        assert!(Instant::now() < deadline, "the agent is not counted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // SIGTERM: a ends the session with `unavailable`, releases the Lease and exits 0;
    // b takes over at once.
    let mut a = a;
    a.terminate();
    let ended = open.end_status().await;
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    let status = tokio::time::timeout(Duration::from_secs(15), a.child.wait())
        .await
        .expect("coord-a did not exit after SIGTERM")
        .unwrap();
    assert!(status.success(), "coord-a exited with {status}");
    let exited = Instant::now();
    while b.readyz().await != Some(200) {
        assert!(
            exited.elapsed() < Duration::from_secs(2),
            "coord-b did not take over within the lease duration"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(holder(&kube).as_deref(), Some("coord-b"));
    assert!(session(&tls, &b, &token).await.is_ok());
}

/// A supervised task that ends (here the fleet server, whose TLS key cannot be read)
/// stops the process with an error naming it, so Kubernetes restarts the pod.
#[tokio::test]
async fn a_long_lived_task_that_ends_stops_the_process_with_its_name() {
    let kube = KubeApi::start().await.unwrap();
    let tls = Tls::new().unwrap();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_warmroll-coordinator"))
        .arg("run")
        .env("KUBECONFIG", kube.kubeconfig_path())
        .env(
            "WARMROLL_GRPC_LISTEN",
            scratch::free_loopback_addr().unwrap().to_string(),
        )
        .env(
            "WARMROLL_HTTP_LISTEN",
            scratch::free_loopback_addr().unwrap().to_string(),
        )
        .env("WARMROLL_TLS_CERT", &tls.files.cert)
        .env("WARMROLL_TLS_KEY", tls.dir.path().join("missing.key"))
        .env("POD_NAMESPACE", NAMESPACE)
        .env("POD_NAME", "coord-broken")
        .env("WARMROLL_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let output = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("the coordinator exits")
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "exit status {:?}", output.status);
    assert!(
        stderr.contains("the fleet server task ended") && stderr.contains("missing.key"),
        "{stderr}"
    );
}
