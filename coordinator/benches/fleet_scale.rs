//! Fleet scale benchmark (release build: `cargo bench -p warmroll-coordinator --bench
//! fleet_scale`).
//!
//! The real `warmroll-coordinator run` binary runs as a separate process against the
//! KubeApi stand-in (in this process, one node-bound token registered per agent). This
//! process then plays 5,000 agents over raw gRPC streams (the generated client, one TLS
//! connection each, as real agents have), each sending its hello and, once the session
//! is accepted, a snapshot of 30 containers (and their images), in parts as agents send
//! it. It prints:
//! - the time until the coordinator's `/fleet` shows every node with a current inventory,
//! - the coordinator's RSS (now and peak) and CPU time (absorbing, and during changes),
//! - the latency of a change: an agent sends an inventory change, and the time until the
//!   coordinator's `/fleet/nodes/{node}` shows its sequence (polled back to back over one
//!   keep-alive connection, so the figure includes one HTTP round trip), measured on 1,000
//!   changes while 200 other changes per second come from random agents.
//!
//! Targets on the 2-core machine: RSS ≤ 256 MiB, all snapshots ≤ 10 s, change p99 ≤ 50 ms.
//! Figures are printed, not asserted. `WARMROLL_BENCH_AGENTS` overrides the agent count.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use warmroll_coordinator::fleet::auth::service_account_user;
use warmroll_proto::fleet::{SNAPSHOT_PART_BYTES, split_snapshot};
use warmroll_proto::v1;
use warmroll_proto::v1::fleet_client::FleetClient;
use warmroll_tests::kubeapi::KubeApi;
use warmroll_tests::scratch;
use warmroll_tests::tls::TestCa;

/// Containers per agent (`WARMROLL_BENCH_CONTAINERS` overrides it, to separate the
/// cost of a session from the cost of its inventory).
fn containers() -> usize {
    std::env::var("WARMROLL_BENCH_CONTAINERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30)
}
const CONNECTS_IN_FLIGHT: usize = 256;
const MEASURED_CHANGES: usize = 1000;
const BACKGROUND_CHANGES_PER_SEC: u64 = 200;

fn main() -> Result<()> {
    warmroll_tests::tls::install_crypto_provider();
    raise_fd_limit()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(bench())
}

fn raise_fd_limit() -> Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < 12_000 {
        bail!("the open-files limit is {soft}; the benchmark needs ~12,000 (ulimit -n)");
    }
    Ok(())
}

fn hex64(seed: u64) -> String {
    let mut s = String::with_capacity(64);
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while s.len() < 64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.push_str(&format!("{x:016x}"));
    }
    s.truncate(64);
    s
}

fn container(node: usize, i: usize, generation: u64) -> v1::Container {
    let app = (node * 7 + i) % 400;
    let seed = (node * 1000 + i) as u64;
    v1::Container {
        id: hex64(seed),
        pod: Some(v1::PodRef {
            namespace: format!("team-{}", app % 40),
            name: format!("app-{app}-5d8f9c7b4-{:05x}", seed % 0xfffff),
            uid: format!("{}-{}", &hex64(seed + 1)[..8], &hex64(seed + 2)[..12]),
        }),
        pod_labels: [
            ("app".to_string(), format!("app-{app}")),
            ("pod-template-hash".to_string(), "5d8f9c7b4".to_string()),
            ("warmroll.io/policy".to_string(), "default".to_string()),
        ]
        .into_iter()
        .collect(),
        name: "app".into(),
        image: format!("registry.example.com/team-{}/app-{app}:main", app % 40),
        image_id: format!("sha256:{}", hex64(app as u64 + generation)),
        digest: format!("sha256:{}", hex64(app as u64 * 31 + generation)),
    }
}

fn image(node: usize, i: usize) -> v1::Image {
    let app = (node * 7 + i) % 400;
    v1::Image {
        id: format!("sha256:{}", hex64(app as u64)),
        repo_tags: vec![format!(
            "registry.example.com/team-{}/app-{app}:main",
            app % 40
        )],
        repo_digests: vec![format!(
            "registry.example.com/team-{}/app-{app}@sha256:{}",
            app % 40,
            hex64(app as u64 * 31)
        )],
        size: 80 << 20,
    }
}

fn hello(node: &str) -> v1::AgentMessage {
    v1::AgentMessage {
        kind: Some(v1::agent_message::Kind::Hello(v1::Hello {
            node_name: node.into(),
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: String::new(),
            runtime_name: "containerd".into(),
            runtime_version: "1.7.24".into(),
            agent_version: "0.1.0".into(),
            protocol_version: warmroll_proto::fleet::PROTOCOL_VERSION,
        })),
    }
}

/// The agent's snapshot, in parts as the agent sends it.
fn snapshot(node: usize) -> Vec<v1::AgentMessage> {
    let whole = v1::InventorySnapshot {
        sequence: 1,
        containers: (0..containers()).map(|i| container(node, i, 0)).collect(),
        images: (0..containers()).map(|i| image(node, i)).collect(),
        more: false,
    };
    split_snapshot(whole, SNAPSHOT_PART_BYTES)
        .into_iter()
        .map(|part| v1::AgentMessage {
            kind: Some(v1::agent_message::Kind::Snapshot(part)),
        })
        .collect()
}

fn change(node: usize, sequence: u64) -> v1::AgentMessage {
    v1::AgentMessage {
        kind: Some(v1::agent_message::Kind::Change(v1::InventoryChange {
            sequence,
            upserted: vec![container(
                node,
                (sequence as usize) % containers().max(1),
                sequence,
            )],
            removed: vec![],
            images_upserted: vec![],
            images_removed: vec![],
        })),
    }
}

fn node_name(i: usize) -> String {
    format!("node-{i:05}")
}

/// The coordinator process (killed on drop).
struct Coordinator {
    _child: tokio::process::Child,
    pid: i32,
    grpc: SocketAddr,
    http: SocketAddr,
}

#[derive(Clone, Copy)]
struct Usage {
    cpu: Duration,
    rss_kib: u64,
    peak_kib: u64,
}

fn usage(pid: i32) -> Result<Usage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').context("odd /proc stat")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime) are 12 and 13 after the ")".
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as u64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok(Usage {
        cpu: Duration::from_millis(ticks * 1000 / hz),
        rss_kib: kib("VmRSS:"),
        peak_kib: kib("VmHWM:"),
    })
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

async fn fleet(http: &reqwest::Client, addr: SocketAddr) -> Result<serde_json::Value> {
    let text = http
        .get(format!("http://{addr}/fleet"))
        .send()
        .await?
        .text()
        .await?;
    Ok(serde_json::from_str(&text)?)
}

async fn node_sequence(http: &reqwest::Client, addr: SocketAddr, node: &str) -> Result<u64> {
    let text = http
        .get(format!("http://{addr}/fleet/nodes/{node}"))
        .send()
        .await?
        .text()
        .await?;
    let body: serde_json::Value = serde_json::from_str(&text)?;
    Ok(body["sequence"].as_u64().unwrap_or(0))
}

struct Agent {
    tx: mpsc::Sender<v1::AgentMessage>,
    sequence: u64,
}

async fn connect_agent(
    endpoint: Endpoint,
    index: usize,
    token: String,
) -> Result<mpsc::Sender<v1::AgentMessage>> {
    let channel = endpoint.connect().await?;
    let mut client = FleetClient::new(channel);
    let parts = snapshot(index);
    let (tx, rx) = mpsc::channel(parts.len() + 8);
    tx.send(hello(&node_name(index))).await?;
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    // As the agent does: the snapshot follows once the coordinator has accepted the
    // session (its response headers have arrived).
    let mut answers = client.session(request).await?.into_inner();
    for part in parts {
        tx.send(part).await?;
    }
    tokio::spawn(async move { while let Ok(Some(_)) = answers.message().await {} });
    Ok(tx)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((sorted.len() as f64) * p).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

async fn bench() -> Result<()> {
    let agents: usize = std::env::var("WARMROLL_BENCH_AGENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    let kube = KubeApi::start().await?;
    let user = service_account_user("warmroll", "warmroll-agent");
    let tokens: Vec<String> = (0..agents)
        .map(|i| kube.issue_service_account_token(&user, &["warmroll"], Some(&node_name(i))))
        .collect();

    let ca = TestCa::new()?;
    let cert = ca.issue(&["localhost", "127.0.0.1"])?;
    let dir = scratch::temp_dir("fleet-bench")?;
    std::fs::write(dir.path().join("tls.crt"), &cert.cert_pem)?;
    std::fs::write(dir.path().join("tls.key"), &cert.key_pem)?;

    let grpc = scratch::free_loopback_addr()?;
    let http_addr = scratch::free_loopback_addr()?;
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_warmroll-coordinator"))
        .arg("run")
        .env("KUBECONFIG", kube.kubeconfig_path())
        .env("WARMROLL_GRPC_LISTEN", grpc.to_string())
        .env("WARMROLL_HTTP_LISTEN", http_addr.to_string())
        .env("WARMROLL_TLS_CERT", dir.path().join("tls.crt"))
        .env("WARMROLL_TLS_KEY", dir.path().join("tls.key"))
        .env("POD_NAMESPACE", "warmroll")
        .env("POD_NAME", "bench-coordinator")
        // The benchmark reads /fleet without a token.
        .env("WARMROLL_HTTP_AUTH", "false")
        .env("WARMROLL_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("starting warmroll-coordinator run")?;
    let pid = i32::try_from(child.id().context("no pid")?)?;
    let coordinator = Coordinator {
        _child: child,
        pid,
        grpc,
        http: http_addr,
    };

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .build()?;
    let ready_by = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = http
            .get(format!("http://{}/readyz", coordinator.http))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ready {
            break;
        }
        if Instant::now() > ready_by {
            bail!("the coordinator did not become ready within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let idle = usage(coordinator.pid)?;
    println!(
        "fleet_scale: {agents} agents × {} containers, coordinator pid {} ({} binary, separate process)",
        containers(),
        coordinator.pid,
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    println!(
        "idle coordinator: RSS {:.1} MiB, CPU {:.2} s",
        mib(idle.rss_kib),
        idle.cpu.as_secs_f64()
    );

    // Connect every agent, CONNECTS_IN_FLIGHT at a time (a fleet reconnecting at once).
    let endpoint = Endpoint::from_shared(format!("https://localhost:{}", coordinator.grpc.port()))?
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca.cert_pem()))
                .domain_name("localhost"),
        )?
        .connect_timeout(Duration::from_secs(30))
        .http2_keep_alive_interval(Duration::from_secs(60));
    let permits = Arc::new(Semaphore::new(CONNECTS_IN_FLIGHT));
    let started = Instant::now();
    let mut connecting = Vec::with_capacity(agents);
    for (i, token) in tokens.into_iter().enumerate() {
        let permit = permits.clone().acquire_owned().await?;
        let endpoint = endpoint.clone();
        connecting.push(tokio::spawn(async move {
            let result = connect_agent(endpoint, i, token).await;
            drop(permit);
            result
        }));
    }
    let mut fleet_agents = Vec::with_capacity(agents);
    let mut failed = 0usize;
    for (i, task) in connecting.into_iter().enumerate() {
        match task.await? {
            Ok(tx) => fleet_agents.push(Agent { tx, sequence: 1 }),
            Err(e) => {
                failed += 1;
                if failed <= 3 {
                    eprintln!("agent {i} failed to connect: {e:#}");
                }
            }
        }
    }
    let connected_in = started.elapsed();
    if failed > 0 {
        bail!("{failed} agents failed to connect");
    }
    let absorbed_in = loop {
        let f = fleet(&http, coordinator.http).await?;
        if f["ready"].as_u64() == Some(agents as u64) {
            break started.elapsed();
        }
        if started.elapsed() > Duration::from_secs(300) {
            bail!("not all snapshots absorbed after 300 s: {f}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let absorbed = usage(coordinator.pid)?;
    let f = fleet(&http, coordinator.http).await?;
    println!(
        "all sessions open in {:.2} s; all {agents} snapshots absorbed in {:.2} s (target ≤ 10 s); fleet view: {f}",
        connected_in.as_secs_f64(),
        absorbed_in.as_secs_f64()
    );
    println!(
        "after absorbing: RSS {:.1} MiB, peak RSS {:.1} MiB (target ≤ 256 MiB); CPU {:.2} s while absorbing ({:.0}% of one core)",
        mib(absorbed.rss_kib),
        mib(absorbed.peak_kib),
        (absorbed.cpu - idle.cpu).as_secs_f64(),
        100.0 * (absorbed.cpu - idle.cpu).as_secs_f64() / absorbed_in.as_secs_f64()
    );

    // Changes: background churn from random agents, and measured probes.
    let senders: Vec<mpsc::Sender<v1::AgentMessage>> =
        fleet_agents.iter().map(|a| a.tx.clone()).collect();
    let background_agents = agents / 2;
    let churn = {
        let senders = senders[..background_agents].to_vec();
        tokio::spawn(async move {
            let mut sequences = vec![1u64; senders.len()];
            let mut tick = tokio::time::interval(Duration::from_micros(
                1_000_000 / BACKGROUND_CHANGES_PER_SEC,
            ));
            let mut sent = 0u64;
            loop {
                tick.tick().await;
                let k = rand::random_range(0..senders.len());
                sequences[k] += 1;
                if senders[k].send(change(k, sequences[k])).await.is_err() {
                    return sent;
                }
                sent += 1;
            }
        })
    };
    let heartbeats = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(20)).await;
            for tx in &senders {
                let _ = tx.try_send(v1::AgentMessage {
                    kind: Some(v1::agent_message::Kind::Heartbeat(v1::Heartbeat {})),
                });
            }
        }
    });

    let before_changes = usage(coordinator.pid)?;
    let changes_started = Instant::now();
    let mut latencies = Vec::with_capacity(MEASURED_CHANGES);
    for _ in 0..MEASURED_CHANGES {
        let k = rand::random_range(background_agents..agents);
        let agent = &mut fleet_agents[k];
        agent.sequence += 1;
        let sequence = agent.sequence;
        let name = node_name(k);
        let sent = Instant::now();
        agent.tx.send(change(k, sequence)).await?;
        loop {
            if node_sequence(&http, coordinator.http, &name).await? >= sequence {
                break;
            }
            if sent.elapsed() > Duration::from_secs(30) {
                bail!("change {sequence} of {name} not visible after 30 s");
            }
        }
        latencies.push(sent.elapsed());
    }
    let changes_took = changes_started.elapsed();
    let after_changes = usage(coordinator.pid)?;
    churn.abort();
    heartbeats.abort();
    latencies.sort();
    println!(
        "change → visible in /fleet/nodes/{{node}} ({MEASURED_CHANGES} measured, {BACKGROUND_CHANGES_PER_SEC}/s background): p50 {:.2} ms, p99 {:.2} ms (target ≤ 50 ms), max {:.2} ms",
        percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
    println!(
        "during changes: CPU {:.0}% of one core; RSS {:.1} MiB, peak {:.1} MiB",
        100.0 * (after_changes.cpu - before_changes.cpu).as_secs_f64() / changes_took.as_secs_f64(),
        mib(after_changes.rss_kib),
        mib(after_changes.peak_kib)
    );
    let still = fleet(&http, coordinator.http).await?;
    println!("fleet view at the end: {still}");
    drop(fleet_agents);
    drop(coordinator);
    Ok(())
}
