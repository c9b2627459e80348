//! Handshake flood benchmark (release build: `cargo bench -p warmroll-coordinator --bench
//! handshake_flood`).
//!
//! The real `warmroll-coordinator run` binary runs as a separate process against the
//! KubeApi stand-in (in this process, which answers its TokenReviews and records them).
//! This process opens 1,000 bogus sessions at once, each on its own TLS connection:
//! - 600 with tokens that are not JWTs (random text),
//! - 300 replaying three forged JWTs (right audience, subject and node claims, a random
//!   signature: the API server does not know them),
//! - 100 with distinct forged JWTs, each claiming another node,
//!
//! and, while they arrive, 50 real agents (node-bound tokens the stand-in knows)
//! connect, retrying refusals with backoff as the agent does. It prints how long the
//! real agents took to be accepted (each, from its first attempt) and how many
//! TokenReviews the coordinator sent for the bogus sessions.
//!
//! Figures are printed, not asserted. The figures of a run are in docs/benchmarks.md.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use warmroll_coordinator::fleet::auth::service_account_user;
use warmroll_proto::v1;
use warmroll_proto::v1::fleet_client::FleetClient;
use warmroll_tests::kubeapi::KubeApi;
use warmroll_tests::scratch;
use warmroll_tests::tls::TestCa;

const REAL_AGENTS: usize = 50;
const GARBAGE: usize = 600;
const REPLAYED: usize = 300;
const DISTINCT_FORGED: usize = 100;

fn main() -> Result<()> {
    warmroll_tests::tls::install_crypto_provider();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(bench())
}

fn hello(node: &str) -> v1::AgentMessage {
    v1::AgentMessage {
        kind: Some(v1::agent_message::Kind::Hello(v1::Hello {
            node_name: node.into(),
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: String::new(),
            runtime_name: "containerd".into(),
            runtime_version: "2.2.0".into(),
            agent_version: "0.1.0".into(),
            protocol_version: warmroll_proto::fleet::PROTOCOL_VERSION,
        })),
    }
}

fn node_name(i: usize) -> String {
    format!("node-{i:05}")
}

/// A JWT with the agent's claims and a random signature, which no API server issued.
fn forged(node: &str) -> String {
    use base64::Engine as _;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let claims = serde_json::json!({
        "aud": ["warmroll"],
        "sub": service_account_user("warmroll", "warmroll-agent"),
        "exp": jiff::Timestamp::now().as_second() + 3600,
        "kubernetes.io": {"node": {"name": node}},
    });
    format!(
        "{}.{}.{}",
        b64(br#"{"alg":"RS256"}"#),
        b64(claims.to_string().as_bytes()),
        b64(&rand::random::<[u8; 32]>())
    )
}

/// Opens a session: `Ok` once accepted, else the refusal's code.
async fn attempt(endpoint: &Endpoint, node: &str, token: &str) -> Result<(), tonic::Code> {
    let channel = endpoint
        .connect()
        .await
        .map_err(|_| tonic::Code::Unavailable)?;
    let mut client = FleetClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let _ = tx.send(hello(node)).await;
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    let value = format!("Bearer {token}")
        .parse()
        .map_err(|_| tonic::Code::InvalidArgument)?;
    request.metadata_mut().insert("authorization", value);
    match client.session(request).await {
        Ok(answers) => {
            // Keep the accepted session open while the flood goes on.
            tokio::spawn(async move {
                let _tx = tx;
                let mut answers = answers.into_inner();
                while let Ok(Some(_)) = answers.message().await {}
            });
            Ok(())
        }
        Err(status) => Err(status.code()),
    }
}

async fn bench() -> Result<()> {
    let kube = KubeApi::start().await?;
    let user = service_account_user("warmroll", "warmroll-agent");
    let real: Vec<String> = (0..REAL_AGENTS)
        .map(|i| kube.issue_service_account_token(&user, &["warmroll"], Some(&node_name(i))))
        .collect();
    let replayed: Vec<String> = (0..3).map(|i| forged(&node_name(i))).collect();
    let mut bogus: Vec<(String, String)> = Vec::new();
    for i in 0..GARBAGE {
        bogus.push((
            node_name(i % REAL_AGENTS),
            format!("{:064x}", rand::random::<u128>()),
        ));
    }
    for i in 0..REPLAYED {
        bogus.push((node_name(i % 3), replayed[i % 3].clone()));
    }
    for i in 0..DISTINCT_FORGED {
        let node = node_name(90_000 + i);
        bogus.push((node.clone(), forged(&node)));
    }

    let ca = TestCa::new()?;
    let cert = ca.issue(&["localhost", "127.0.0.1"])?;
    let dir = scratch::temp_dir("flood-bench")?;
    std::fs::write(dir.path().join("tls.crt"), &cert.cert_pem)?;
    std::fs::write(dir.path().join("tls.key"), &cert.key_pem)?;
    let grpc: SocketAddr = scratch::free_loopback_addr()?;
    let http_addr: SocketAddr = scratch::free_loopback_addr()?;
    let _child = tokio::process::Command::new(env!("CARGO_BIN_EXE_warmroll-coordinator"))
        .arg("run")
        .env("KUBECONFIG", kube.kubeconfig_path())
        .env("WARMROLL_GRPC_LISTEN", grpc.to_string())
        .env("WARMROLL_HTTP_LISTEN", http_addr.to_string())
        .env("WARMROLL_TLS_CERT", dir.path().join("tls.crt"))
        .env("WARMROLL_TLS_KEY", dir.path().join("tls.key"))
        .env("POD_NAMESPACE", "warmroll")
        .env("POD_NAME", "bench-coordinator")
        .env("WARMROLL_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("starting warmroll-coordinator run")?;
    let http = reqwest::Client::new();
    let ready_by = Instant::now() + Duration::from_secs(60);
    while !http
        .get(format!("http://{http_addr}/readyz"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        if Instant::now() > ready_by {
            bail!("the coordinator did not become ready within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reviews_before = reviews(&kube);

    let endpoint = Endpoint::from_shared(format!("https://localhost:{}", grpc.port()))?
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca.cert_pem()))
                .domain_name("localhost"),
        )?
        .connect_timeout(Duration::from_secs(30));
    let started = Instant::now();
    let flood: Vec<_> = bogus
        .into_iter()
        .map(|(node, token)| {
            let endpoint = endpoint.clone();
            tokio::spawn(async move { attempt(&endpoint, &node, &token).await })
        })
        .collect();
    let agents: Vec<_> = real
        .into_iter()
        .enumerate()
        .map(|(i, token)| {
            let endpoint = endpoint.clone();
            tokio::spawn(async move {
                let first = Instant::now();
                let mut backoff = Duration::from_millis(100);
                let mut attempts = 0u32;
                loop {
                    attempts += 1;
                    match attempt(&endpoint, &node_name(i), &token).await {
                        Ok(()) => return Ok((first.elapsed(), attempts)),
                        Err(tonic::Code::Unavailable)
                            if first.elapsed() < Duration::from_secs(120) =>
                        {
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(2));
                        }
                        Err(code) => return Err(code),
                    }
                }
            })
        })
        .collect();
    let mut accepted = Vec::new();
    for agent in agents {
        match agent.await? {
            Ok(took) => accepted.push(took),
            Err(code) => bail!("a real agent was refused: {code:?}"),
        }
    }
    let all_real_in = started.elapsed();
    let mut refused = std::collections::BTreeMap::<String, usize>::new();
    for bogus in flood {
        let outcome = match bogus.await? {
            Ok(()) => "accepted".to_owned(),
            Err(code) => format!("{code:?}"),
        };
        *refused.entry(outcome).or_default() += 1;
    }
    let flood_done_in = started.elapsed();
    let bogus_reviews = reviews(&kube) - reviews_before - REAL_AGENTS;
    accepted.sort();
    let p = |q: f64| {
        accepted[((accepted.len() as f64 * q).ceil() as usize).clamp(1, accepted.len()) - 1]
    };
    println!(
        "handshake_flood: {} bogus sessions ({GARBAGE} not JWTs, {REPLAYED} replays of 3 forged JWTs, {DISTINCT_FORGED} distinct forged JWTs) and {REAL_AGENTS} real agents at once ({} coordinator)",
        GARBAGE + REPLAYED + DISTINCT_FORGED,
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    println!(
        "real agents accepted: all within {:.2} s; per agent p50 {:.2} s, p99 {:.2} s, max {:.2} s, at most {} attempts",
        all_real_in.as_secs_f64(),
        p(0.5).0.as_secs_f64(),
        p(0.99).0.as_secs_f64(),
        accepted.last().map_or(0.0, |a| a.0.as_secs_f64()),
        accepted.iter().map(|a| a.1).max().unwrap_or(0)
    );
    println!(
        "bogus sessions, by answer: {refused:?}; all answered within {:.2} s",
        flood_done_in.as_secs_f64()
    );
    println!(
        "TokenReviews sent for the {} bogus sessions: {bogus_reviews}",
        GARBAGE + REPLAYED + DISTINCT_FORGED
    );
    if refused.contains_key("accepted") {
        bail!("a bogus session was accepted");
    }
    Ok(())
}

fn reviews(kube: &KubeApi) -> usize {
    kube.requests()
        .iter()
        .filter(|r| r.path.contains("tokenreviews"))
        .count()
}
