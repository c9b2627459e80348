//! Issue 20 against the real fleet server (TLS, the stand-in's TokenReview) with real
//! containerd nodes and in-process agents: one agent that stops reading, sends too
//! much, too fast or without a node claim hurts only its own session; a restarted
//! agent gets its outstanding order again.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod support;

use std::time::{Duration, Instant};

use support::{FleetBed, agent_user, hello, node, raw_session, register_token};
use tonic::Code;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use warmroll_coordinator::fleet::{FleetView, WarmRequest};
use warmroll_proto::fleet::WarmOutcome;
use warmroll_proto::image::ImageRef;
use warmroll_proto::v1;
use warmroll_tests::image::ImageBuilder;

fn container(id: usize, labels: usize) -> v1::Container {
    v1::Container {
        id: format!("c{id}"),
        pod: Some(v1::PodRef {
            namespace: "ns".into(),
            name: format!("p{id}"),
            uid: format!("u{id}"),
        }),
        pod_labels: (0..labels).map(|i| (format!("k{i}"), "v".into())).collect(),
        name: "app".into(),
        image: "registry.example/app:main".into(),
        image_id: "sha256:abc".into(),
        digest: String::new(),
    }
}

fn snapshot_part(containers: Vec<v1::Container>, more: bool) -> v1::AgentMessage {
    v1::AgentMessage {
        kind: Some(v1::agent_message::Kind::Snapshot(v1::InventorySnapshot {
            sequence: 1,
            containers,
            images: vec![],
            more,
        })),
    }
}

fn heartbeat() -> v1::AgentMessage {
    v1::AgentMessage {
        kind: Some(v1::agent_message::Kind::Heartbeat(v1::Heartbeat {})),
    }
}

fn ready(view: &FleetView, name: &str) -> bool {
    view.node(&node(name))
        .is_some_and(|n| n.connected && n.inventory_current)
}

fn closed_count(view: &FleetView, reason: &str) -> u64 {
    let mut registry = prometheus_client::registry::Registry::default();
    view.register_metrics(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let prefix = format!("warmroll_agent_sessions_closed_total{{reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// This process's resident memory, from /proc.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

/// An order to pull `image` by tag, whatever digest it has.
fn request(image: &ImageRef, timeout: Duration) -> WarmRequest {
    WarmRequest {
        image: image.clone(),
        expected: None,
        credentials: None,
        timeout,
    }
}

async fn warm_on(view: &FleetView, name: &str, image: &ImageRef) -> WarmOutcome {
    let mut ticket = view
        .send_order(&node(name), request(image, Duration::from_secs(60)))
        .unwrap();
    tokio::time::timeout(Duration::from_secs(60), ticket.finished())
        .await
        .expect("the warm order finishes within a minute")
        .unwrap()
}

#[tokio::test]
async fn an_agent_that_stops_reading_is_dropped_at_once_and_the_others_warm() {
    let bed = FleetBed::start(1).await.unwrap();
    bed.wait_until("node-0 ready", |v| ready(v, "node-0"))
        .await
        .unwrap();
    let view = bed.view().unwrap();

    // A client that completes the handshake and then never reads its stream, with
    // small HTTP/2 windows so that the coordinator's side fills up soon.
    let addr = bed.coordinator().unwrap().addr;
    let channel = Endpoint::from_shared(format!("https://localhost:{}", addr.port()))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(bed.tls.ca.cert_pem()))
                .domain_name("localhost"),
        )
        .unwrap()
        .initial_stream_window_size(1024)
        .initial_connection_window_size(1024)
        .connect()
        .await
        .unwrap();
    let token = register_token(&bed.kube, &agent_user(), Some("stuck"));
    let stuck = raw_session(
        channel,
        &token,
        vec![hello("stuck"), snapshot_part(vec![], false)],
    )
    .await
    .unwrap();
    bed.wait_until("the stuck node ready", |v| ready(v, "stuck"))
        .await
        .unwrap();

    let image = ImageRef::parse("registry.example/app:main").unwrap();
    let started = Instant::now();
    let mut sent = 0;
    while view.node(&node("stuck")).unwrap().connected {
        assert!(
            sent < 5_000,
            "the session is still open after {sent} orders"
        );
        view.send_order(&node("stuck"), request(&image, Duration::from_secs(600)))
            .unwrap();
        sent += 1;
        // Let the server write what it can.
        tokio::task::yield_now().await;
    }
    let took = started.elapsed();
    println!("the stuck session was ended after {sent} orders, {took:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert_eq!(closed_count(&view, "stalled"), 1);

    // Its connection is closed too: the answer stream ends in an error, not a hang.
    let mut answers = stuck.answer.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match answers.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the stuck client's stream ends");
    assert!(ended.is_err(), "{ended:?}");

    // The other node warms as usual.
    let pushed = ImageBuilder::new(&bed.registry)
        .unwrap()
        .push("web", "v1")
        .await
        .unwrap();
    let image = ImageRef::parse(&pushed.reference).unwrap();
    let outcome = warm_on(&view, "node-0", &image).await;
    assert!(
        matches!(outcome, WarmOutcome::Succeeded { .. }),
        "{outcome:?}"
    );
}

#[tokio::test]
async fn an_order_outstanding_while_the_agent_restarts_reaches_the_new_agent() {
    let mut bed = FleetBed::start(1).await.unwrap();
    bed.wait_until("node-0 ready", |v| ready(v, "node-0"))
        .await
        .unwrap();
    let view = bed.view().unwrap();
    let pushed = ImageBuilder::new(&bed.registry)
        .unwrap()
        .push("web", "v2")
        .await
        .unwrap();
    let image = ImageRef::parse(&pushed.reference).unwrap();

    // The agent goes (an upgrade, an eviction); the order is given while it is away.
    bed.nodes[0].stop_agent().await.unwrap();
    bed.wait_until("node-0 away", |v| {
        v.node(&node("node-0")).is_some_and(|n| !n.connected)
    })
    .await
    .unwrap();
    let mut ticket = view
        .send_order(&node("node-0"), request(&image, Duration::from_secs(60)))
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!matches!(
        ticket.state(),
        warmroll_coordinator::fleet::WarmState::Finished(_)
    ));
    // The new agent gets it and pulls.
    let token = register_token(&bed.kube, &agent_user(), Some("node-0"));
    let addr = bed.coordinator().unwrap().addr;
    let ca_file = bed.tls.ca_file.clone();
    bed.nodes[0]
        .start_agent(addr, &ca_file, &token)
        .await
        .unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(60), ticket.finished())
        .await
        .expect("the resent order finishes")
        .unwrap();
    assert!(
        matches!(outcome, WarmOutcome::Succeeded { .. }),
        "{outcome:?}"
    );
}

#[tokio::test]
async fn oversized_and_hasty_sessions_are_closed_with_the_reason_and_others_stay() {
    let bed = FleetBed::start(1).await.unwrap();
    bed.wait_until("node-0 ready", |v| ready(v, "node-0"))
        .await
        .unwrap();
    let view = bed.view().unwrap();
    let before = rss_bytes();

    // 200,000 containers in a snapshot, in parts of 1,000.
    let token = register_token(&bed.kube, &agent_user(), Some("big"));
    let session = bed.raw_session(&token, vec![hello("big")]).await.unwrap();
    let tx = session.tx.clone();
    let feeder = tokio::spawn(async move {
        for part in 0..200 {
            let containers = (part * 1_000..(part + 1) * 1_000)
                .map(|i| container(i, 1))
                .collect();
            if tx
                .send(snapshot_part(containers, part < 199))
                .await
                .is_err()
            {
                return part;
            }
        }
        200
    });
    let status = session.end_status().await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("containers on the node"),
        "{}",
        status.message()
    );
    let parts_sent = feeder.await.unwrap();
    println!("the 200,000-container snapshot was refused after {parts_sent} parts: {status:?}");

    // 10,000 labels on one pod.
    let token = register_token(&bed.kube, &agent_user(), Some("labels"));
    let status = bed
        .session_end(
            &token,
            vec![
                hello("labels"),
                snapshot_part(vec![container(1, 10_000)], false),
            ],
        )
        .await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("labels"), "{}", status.message());

    // 1,000 messages a second.
    let token = register_token(&bed.kube, &agent_user(), Some("hasty"));
    let session = bed
        .raw_session(&token, vec![hello("hasty"), snapshot_part(vec![], false)])
        .await
        .unwrap();
    let tx = session.tx.clone();
    let pacer = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        for sent in 0..30_000u32 {
            tick.tick().await;
            if tx.send(heartbeat()).await.is_err() {
                return sent;
            }
        }
        30_000
    });
    let status = session.end_status_within(Duration::from_secs(40)).await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("messages a second"),
        "{}",
        status.message()
    );
    pacer.abort();

    let after = rss_bytes();
    println!(
        "RSS of the test process (coordinator, agent, stand-in) before {} MiB, after {} MiB",
        before >> 20,
        after >> 20
    );
    assert!(
        after.saturating_sub(before) < 256 << 20,
        "RSS grew by {} MiB",
        after.saturating_sub(before) >> 20
    );
    assert_eq!(closed_count(&view, "over_limit"), 2);
    assert_eq!(closed_count(&view, "rate"), 1);
    assert!(ready(&view, "node-0"), "the real agent is unaffected");
}

#[tokio::test]
async fn a_token_without_a_node_claim_is_refused() {
    let bed = FleetBed::start(1).await.unwrap();
    bed.wait_until("node-0 ready", |v| ready(v, "node-0"))
        .await
        .unwrap();
    let unbound = register_token(&bed.kube, &agent_user(), None);
    let status = bed
        .session_end(
            &unbound,
            vec![hello("node-0"), snapshot_part(vec![], false)],
        )
        .await;
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("names no node"),
        "{}",
        status.message()
    );
    assert!(
        ready(&bed.view().unwrap(), "node-0"),
        "the real session stays"
    );
}
