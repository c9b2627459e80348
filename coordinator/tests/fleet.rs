//! Issue 5 end to end: real containerd nodes with in-process agents, the KubeApi
//! stand-in's TokenReview, and the coordinator's fleet server over TLS.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod support;

use std::time::Duration;

use support::{FleetBed, agent_user, hello, node, register_token};
use tonic::{Code, Status};
use warmroll_coordinator::fleet::{FleetEventKind, FleetView};
use warmroll_proto::fleet::MAX_MESSAGE_BYTES;
use warmroll_proto::v1;
use warmroll_tests::containerd::{ContainerSpec, PodSpec};
use warmroll_tests::image::ImageBuilder;

fn pods_on(view: &FleetView, name: &str) -> Vec<String> {
    view.node(&node(name))
        .map(|n| {
            n.containers
                .iter()
                .map(|c| format!("{}/{}", c.pod.namespace, c.pod.name))
                .collect()
        })
        .unwrap_or_default()
}

fn ready(view: &FleetView, name: &str) -> bool {
    view.node(&node(name))
        .is_some_and(|n| n.connected && n.inventory_current)
}

/// Runs a pod named `name` with one container on the node.
async fn run_pod(bed: &FleetBed, index: usize, name: &str) {
    let images = ImageBuilder::new(&bed.registry).unwrap();
    let pushed = images.push("web", "v1").await.unwrap();
    bed.nodes[index]
        .containerd
        .run_pod(
            &PodSpec::new("shop", name)
                .label("app", "web")
                .container(ContainerSpec::new("app", &pushed.reference)),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn agents_appear_with_their_containers_and_impostors_are_refused() {
    let bed = FleetBed::start(2).await.unwrap();
    run_pod(&bed, 0, "web-0").await;
    bed.wait_until("node-0 reports pod shop/web-0", |v| {
        ready(v, "node-0") && pods_on(v, "node-0").contains(&"shop/web-0".to_string())
    })
    .await
    .unwrap();
    bed.wait_until("node-1 ready", |v| ready(v, "node-1"))
        .await
        .unwrap();
    let view = bed.view().unwrap();
    let info = view.node(&node("node-0")).unwrap();
    assert!(info.node_verified, "the token named the node");
    let container = info
        .containers
        .iter()
        .find(|c| c.pod.name == "web-0")
        .unwrap();
    assert_eq!(container.name, "app");
    assert_eq!(
        container.pod_labels.get("app").map(String::as_str),
        Some("web")
    );
    assert!(container.image.contains("/web"), "{}", container.image);
    assert!(pods_on(&view, "node-1").is_empty());

    let mut events = view.subscribe();

    // An unknown token.
    let refused = bed
        .session_end("not-a-known-token", vec![hello("node-0")])
        .await;
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");

    // A valid token of another ServiceAccount.
    let other = register_token(
        &bed.kube,
        "system:serviceaccount:default:default",
        Some("node-0"),
    );
    let refused = bed.session_end(&other, vec![hello("node-0")]).await;
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("system:serviceaccount:default:default"),
        "{}",
        refused.message()
    );

    // node-0's token, but a hello naming node-1.
    let node0 = register_token(&bed.kube, &agent_user(), Some("node-0"));
    let refused = bed.session_end(&node0, vec![hello("node-1")]).await;
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains("node-0") && refused.message().contains("node-1"),
        "{}",
        refused.message()
    );

    // The real agents were not disturbed.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for name in ["node-0", "node-1"] {
        assert!(ready(&view, name), "{name} still connected");
    }
    while let Ok(event) = events.try_recv() {
        assert!(
            !matches!(
                event.kind,
                FleetEventKind::Disconnected | FleetEventKind::Connected
            ),
            "a refused session touched the fleet: {event:?}"
        );
    }
    assert!(bed.nodes.iter().all(|n| n.agent_running()));
}

#[tokio::test]
async fn a_restarted_coordinator_gets_the_whole_fleet_back_without_agent_restarts() {
    let mut bed = FleetBed::start(3).await.unwrap();
    run_pod(&bed, 0, "web-0").await;
    run_pod(&bed, 2, "web-2").await;
    let complete = |v: &FleetView| {
        ["node-0", "node-1", "node-2"].iter().all(|n| ready(v, n))
            && pods_on(v, "node-0") == ["shop/web-0"]
            && pods_on(v, "node-2") == ["shop/web-2"]
    };
    bed.wait_until("the whole fleet", complete).await.unwrap();
    let before = bed.view().unwrap();

    bed.restart_coordinator().await.unwrap();
    let after = bed.view().unwrap();
    bed.wait_until("the whole fleet again, in the new coordinator", complete)
        .await
        .unwrap();
    assert!(
        bed.nodes.iter().all(|n| n.agent_running()),
        "no agent was restarted"
    );
    assert_eq!(after.counts().containers, before.counts().containers);
    assert_eq!(after.counts().connected, 3);
}

#[tokio::test]
async fn a_stopped_agents_node_leaves_after_the_grace_period() {
    let grace = Duration::from_secs(2);
    let mut bed = FleetBed::start_with_grace(2, grace).await.unwrap();
    bed.wait_until("both nodes ready", |v| {
        ready(v, "node-0") && ready(v, "node-1")
    })
    .await
    .unwrap();
    let view = bed.view().unwrap();
    let mut events = view.subscribe();
    bed.nodes[1].stop_agent().await.unwrap();
    bed.wait_until("node-1 disconnected", |v| {
        v.node(&node("node-1")).is_some_and(|n| !n.connected)
    })
    .await
    .unwrap();
    let disconnected = tokio::time::Instant::now();
    assert!(
        view.node(&node("node-1")).is_some(),
        "the node stays during the grace period"
    );
    bed.wait_until("node-1 gone", |v| v.node(&node("node-1")).is_none())
        .await
        .unwrap();
    let gone_after = disconnected.elapsed();
    assert!(
        gone_after >= grace - Duration::from_millis(300),
        "left after {gone_after:?}, before the grace period"
    );
    assert!(ready(&view, "node-0"), "the other node stays");
    let mut left = Vec::new();
    while let Ok(event) = events.try_recv() {
        if event.kind == FleetEventKind::Left {
            left.push(event.node.to_string());
        }
    }
    assert_eq!(left, ["node-1"]);
}

fn container(id: &str, digest: &str) -> v1::Container {
    v1::Container {
        id: id.into(),
        pod: Some(v1::PodRef {
            namespace: "ns".into(),
            name: "p".into(),
            uid: "u".into(),
        }),
        pod_labels: Default::default(),
        name: "app".into(),
        image: "registry.example/app:main".into(),
        image_id: "sha256:abc".into(),
        digest: digest.into(),
    }
}

fn snapshot(containers: Vec<v1::Container>) -> v1::AgentMessage {
    snapshot_part(1, containers, false)
}

fn snapshot_part(sequence: u64, containers: Vec<v1::Container>, more: bool) -> v1::AgentMessage {
    v1::AgentMessage {
        kind: Some(v1::agent_message::Kind::Snapshot(v1::InventorySnapshot {
            sequence,
            containers,
            images: vec![],
            more,
        })),
    }
}

/// Opens a raw session for `node` with a valid token of its own, sends `messages` and
/// returns the status the session ends with.
async fn session_end(bed: &FleetBed, node: &str, messages: Vec<v1::AgentMessage>) -> Status {
    let token = register_token(&bed.kube, &agent_user(), Some(node));
    bed.session_end(&token, messages).await
}

#[tokio::test]
async fn malformed_and_oversized_messages_are_rejected_over_the_real_server() {
    let bed = FleetBed::start(1).await.unwrap();
    bed.wait_until("node-0 ready", |v| ready(v, "node-0"))
        .await
        .unwrap();
    // A digest that is not one.
    let status = session_end(
        &bed,
        "bad-1",
        vec![
            hello("bad-1"),
            snapshot(vec![container("c1", "sha256:nothex")]),
        ],
    )
    .await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("digest"), "{}", status.message());

    // A first message that is not a hello, and an empty message.
    let status = session_end(&bed, "bad-2", vec![snapshot(vec![])]).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let status = session_end(
        &bed,
        "bad-3",
        vec![hello("bad-3"), v1::AgentMessage { kind: None }],
    )
    .await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    // A snapshot above the message size limit.
    let mut huge = container("c1", "");
    huge.image = "x".repeat(MAX_MESSAGE_BYTES + 1024);
    let status = session_end(&bed, "bad-4", vec![hello("bad-4"), snapshot(vec![huge])]).await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");

    // Snapshot parts that do not add up: a part of another snapshot before the last
    // part, and a change before the last part.
    let status = session_end(
        &bed,
        "bad-5",
        vec![
            hello("bad-5"),
            snapshot_part(1, vec![container("c1", "")], true),
            snapshot_part(2, vec![container("c2", "")], false),
        ],
    )
    .await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("snapshot 1"),
        "{}",
        status.message()
    );
    let change = v1::AgentMessage {
        kind: Some(v1::agent_message::Kind::Change(v1::InventoryChange {
            sequence: 2,
            upserted: vec![container("c3", "")],
            ..Default::default()
        })),
    };
    let status = session_end(
        &bed,
        "bad-6",
        vec![
            hello("bad-6"),
            snapshot_part(1, vec![container("c1", "")], true),
            change,
        ],
    )
    .await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("last part"),
        "{}",
        status.message()
    );

    // Parts that do add up: the node's inventory appears once the last part is in.
    let good = bed
        .raw_session(
            &register_token(&bed.kube, &agent_user(), Some("good-7")),
            vec![
                hello("good-7"),
                snapshot_part(1, vec![container("c1", "")], true),
                snapshot_part(1, vec![container("c2", ""), container("c3", "")], true),
                v1::AgentMessage {
                    kind: Some(v1::agent_message::Kind::Heartbeat(v1::Heartbeat {})),
                },
                snapshot_part(1, vec![container("c4", "")], false),
            ],
        )
        .await
        .unwrap();
    bed.wait_until("good-7 ready", |v| ready(v, "good-7"))
        .await
        .unwrap();
    let info = bed.view().unwrap().node(&node("good-7")).unwrap();
    let ids: Vec<&str> = info.containers.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["c1", "c2", "c3", "c4"]);
    drop(good);

    // None of it reached the view as a node with inventory; the real agent is fine.
    let view = bed.view().unwrap();
    for n in ["bad-1", "bad-2", "bad-3", "bad-4", "bad-5", "bad-6"] {
        assert!(
            view.node(&node(n))
                .is_none_or(|i| !i.connected && i.containers.is_empty()),
            "{n} in the view"
        );
    }
    assert!(ready(&view, "node-0"));
}
