use std::collections::BTreeMap;

use warmroll_proto::fleet::{FailureKind, PodRef, Runtime};
use warmroll_proto::image::Platform;

use super::*;

fn name(n: &str) -> NodeName {
    NodeName::parse(n).unwrap()
}

fn hello(node: &str) -> Hello {
    Hello {
        node: name(node),
        platform: Platform::parse("linux/amd64").unwrap(),
        runtime: Runtime {
            name: "containerd".into(),
            version: "1.6".into(),
        },
        agent_version: "0.1.0".into(),
        protocol_version: 1,
    }
}

fn container(id: &str, image: &str) -> Container {
    Container {
        id: id.into(),
        pod: PodRef {
            namespace: "ns".into(),
            name: format!("pod-{id}"),
            uid: format!("uid-{id}"),
        },
        pod_labels: BTreeMap::from([("app".to_string(), "web".to_string())]),
        name: "app".into(),
        image: image.into(),
        image_id: "sha256:abc".into(),
        digest: None,
    }
}

fn snapshot(sequence: u64, ids: &[&str]) -> Snapshot {
    Snapshot {
        sequence,
        containers: ids.iter().map(|id| container(id, "web:1")).collect(),
        images: vec![],
    }
}

fn ids(view: &FleetView, node: &str) -> Vec<String> {
    view.node(&name(node))
        .unwrap()
        .containers
        .into_iter()
        .map(|c| c.id)
        .collect()
}

fn session_channel() -> (SessionTx, mpsc::Receiver<Outbound>) {
    mpsc::channel(16)
}

#[tokio::test]
async fn containers_are_read_by_namespace_without_copying_nodes() {
    let view = FleetView::new(Duration::from_secs(60));
    let (tx, _rx) = session_channel();
    let s = view.connect(hello("node-a"), true, tx);
    let mut other = container("c2", "web:1");
    other.pod.namespace = "other".into();
    view.apply_snapshot(
        &name("node-a"),
        s,
        Snapshot {
            sequence: 1,
            containers: vec![container("c1", "web:1"), other],
            images: vec![],
        },
    );
    let (tx, _rx_b) = session_channel();
    let s = view.connect(hello("node-b"), true, tx);
    view.apply_snapshot(&name("node-b"), s, snapshot(1, &["c3"]));

    let mut found: Vec<(String, String)> = view
        .containers_in(&BTreeSet::from(["ns"]))
        .into_iter()
        .map(|(node, c)| (node.to_string(), c.id))
        .collect();
    found.sort();
    assert_eq!(
        found,
        [
            ("node-a".to_string(), "c1".to_string()),
            ("node-b".to_string(), "c3".to_string())
        ]
    );
    let other: Vec<String> = view
        .containers_in(&BTreeSet::from(["other"]))
        .into_iter()
        .map(|(_, c)| c.pod.namespace)
        .collect();
    assert_eq!(other, ["other"]);
    assert!(view.containers_in(&BTreeSet::new()).is_empty());
}

#[tokio::test]
async fn snapshots_then_changes_build_the_inventory() {
    let view = FleetView::new(Duration::from_secs(60));
    let (tx, _rx) = session_channel();
    let s = view.connect(hello("node-a"), true, tx);
    assert!(!view.node(&name("node-a")).unwrap().inventory_current);
    assert_eq!(
        view.apply_snapshot(&name("node-a"), s, snapshot(5, &["c1", "c2"])),
        Applied::Ok
    );
    assert_eq!(ids(&view, "node-a"), ["c1", "c2"]);
    let change = InventoryChange {
        sequence: 6,
        upserted: vec![container("c3", "web:2"), container("c1", "web:2")],
        removed: vec!["c2".into()],
        ..Default::default()
    };
    assert_eq!(view.apply_change(&name("node-a"), s, change), Applied::Ok);
    let info = view.node(&name("node-a")).unwrap();
    assert_eq!(info.sequence, Some(6));
    assert_eq!(ids(&view, "node-a"), ["c1", "c3"]);
    assert_eq!(
        view.container(&name("node-a"), "c1").unwrap().image,
        "web:2"
    );
    assert_eq!(view.ready_nodes(), 1);
}

#[tokio::test]
async fn a_sequence_gap_marks_the_inventory_stale_until_the_next_snapshot() {
    let view = FleetView::new(Duration::from_secs(60));
    let (tx, _rx) = session_channel();
    let s = view.connect(hello("node-a"), true, tx);
    // A change before any snapshot is a gap too.
    assert_eq!(
        view.apply_change(
            &name("node-a"),
            s,
            InventoryChange {
                sequence: 1,
                ..Default::default()
            }
        ),
        Applied::Gap {
            expected: None,
            got: 1
        }
    );
    view.apply_snapshot(&name("node-a"), s, snapshot(1, &["c1"]));
    assert_eq!(
        view.apply_change(
            &name("node-a"),
            s,
            InventoryChange {
                sequence: 3,
                ..Default::default()
            }
        ),
        Applied::Gap {
            expected: Some(2),
            got: 3
        }
    );
    assert!(!view.node(&name("node-a")).unwrap().inventory_current);
    assert_eq!(view.ready_nodes(), 0);
    // Changes are not applied on a stale inventory.
    let change = InventoryChange {
        sequence: 4,
        upserted: vec![container("c9", "x")],
        ..Default::default()
    };
    assert!(matches!(
        view.apply_change(&name("node-a"), s, change),
        Applied::Gap { .. }
    ));
    assert_eq!(ids(&view, "node-a"), ["c1"]);
    view.apply_snapshot(&name("node-a"), s, snapshot(10, &["c1", "c2"]));
    assert!(view.node(&name("node-a")).unwrap().inventory_current);
    assert_eq!(ids(&view, "node-a"), ["c1", "c2"]);
}

#[tokio::test]
async fn a_replaced_session_can_no_longer_write() {
    let view = FleetView::new(Duration::from_secs(60));
    let (tx1, mut rx1) = session_channel();
    let old = view.connect(hello("node-a"), true, tx1.clone());
    drop(tx1);
    let (tx2, _rx2) = session_channel();
    let new = view.connect(hello("node-a"), true, tx2);
    assert_eq!(
        view.apply_snapshot(&name("node-a"), old, snapshot(1, &["old"])),
        Applied::Superseded
    );
    assert_eq!(
        view.apply_snapshot(&name("node-a"), new, snapshot(1, &["new"])),
        Applied::Ok
    );
    // The old session's end does not take the node down.
    view.disconnect(&name("node-a"), old);
    assert!(view.node(&name("node-a")).unwrap().connected);
    // The view dropped the old session's sender: its outbound stream has ended.
    assert!(rx1.recv().await.is_none());
}

#[tokio::test(start_paused = true)]
async fn a_node_leaves_after_the_grace_period_unless_it_reconnects() {
    let grace = Duration::from_secs(30);
    let view = FleetView::new(grace);
    let mut events = view.subscribe();
    let (tx, _rx) = session_channel();
    let s = view.connect(hello("node-a"), true, tx);
    let (tx, _rx_b) = session_channel();
    let sb = view.connect(hello("node-b"), true, tx);
    view.apply_snapshot(&name("node-a"), s, snapshot(1, &["c1"]));

    view.disconnect(&name("node-a"), s);
    view.disconnect(&name("node-b"), sb);
    tokio::time::sleep(grace - Duration::from_secs(1)).await;
    let info = view.node(&name("node-a")).unwrap();
    assert!(!info.connected);
    assert_eq!(
        info.containers.len(),
        1,
        "the inventory stays during the grace period"
    );

    // node-b comes back within the grace period and stays.
    let (tx, _rx_b2) = session_channel();
    view.connect(hello("node-b"), true, tx);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        view.node(&name("node-a")).is_none(),
        "node-a left after the grace period"
    );
    assert!(view.node(&name("node-b")).unwrap().connected);
    assert_eq!(view.counts().nodes, 1);

    let mut kinds = Vec::new();
    while let Ok(e) = events.try_recv() {
        kinds.push((e.node.to_string(), e.kind));
    }
    assert!(
        kinds.contains(&("node-a".to_string(), FleetEventKind::Left)),
        "{kinds:?}"
    );
    assert!(
        !kinds.contains(&("node-b".to_string(), FleetEventKind::Left)),
        "{kinds:?}"
    );
}

fn request(credentials: Option<Credentials>) -> WarmRequest {
    WarmRequest {
        image: ImageRef::parse("registry.example/app:main").unwrap(),
        expected: None,
        credentials,
        timeout: Duration::from_secs(60),
    }
}

#[tokio::test]
async fn warm_orders_go_to_the_connected_session_and_results_come_back() {
    let view = FleetView::new(Duration::from_secs(60));
    assert!(matches!(
        view.send_order(&name("node-a"), request(None)).await,
        Err(ViewError::NotConnected(_))
    ));
    let (tx, mut rx) = session_channel();
    let s = view.connect(hello("node-a"), true, tx);
    let creds = Credentials::Basic {
        username: "u".into(),
        password: "p".into(),
    };
    let mut ticket = view
        .send_order(&name("node-a"), request(Some(creds.clone())))
        .await
        .unwrap();
    assert_eq!(ticket.state(), WarmState::Pending);
    let sent = CoordinatorMessage::try_from((*rx.recv().await.unwrap()).unwrap()).unwrap();
    let CoordinatorMessage::WarmOrder(order) = sent else {
        panic!("expected a warm order, got {sent:?}")
    };
    assert_eq!(order.id, ticket.order);
    assert_eq!(order.credentials, Some(creds));

    view.record_progress(
        &name("node-a"),
        s,
        WarmProgress {
            order: order.id.clone(),
            bytes_done: 10,
            bytes_total: Some(100),
        },
    );
    assert_eq!(
        ticket.state(),
        WarmState::InProgress {
            bytes_done: 10,
            bytes_total: Some(100)
        }
    );
    let outcome = WarmOutcome::Failed {
        kind: FailureKind::NotFound,
        message: "no such tag".into(),
        found: None,
    };
    view.record_result(
        &name("node-a"),
        s,
        WarmResult {
            order: order.id.clone(),
            outcome: outcome.clone(),
        },
    );
    assert_eq!(ticket.finished().await.unwrap(), outcome);
    let warms = view.node(&name("node-a")).unwrap().warms;
    assert_eq!(warms.len(), 1);
    assert_eq!(warms[0].2, WarmState::Finished(outcome));
}

#[tokio::test]
async fn credentials_only_go_to_sessions_whose_token_named_the_node() {
    let view = FleetView::new(Duration::from_secs(60));
    let (tx, _rx) = session_channel();
    view.connect(hello("node-a"), false, tx);
    let creds = Credentials::Token("t".into());
    assert_eq!(
        view.send_order(&name("node-a"), request(Some(creds)))
            .await
            .unwrap_err(),
        ViewError::NodeUnverified(name("node-a"))
    );
    assert!(
        view.send_order(&name("node-a"), request(None))
            .await
            .is_ok()
    );
}

#[tokio::test(start_paused = true)]
async fn pending_orders_survive_a_reconnect_and_fail_when_the_node_leaves() {
    let view = FleetView::new(Duration::from_secs(30));
    let (tx, _rx) = session_channel();
    let s1 = view.connect(hello("node-a"), true, tx);
    let mut first = view
        .send_order(&name("node-a"), request(None))
        .await
        .unwrap();
    view.disconnect(&name("node-a"), s1);
    let (tx, _rx2) = session_channel();
    let s2 = view.connect(hello("node-a"), true, tx);
    // The agent finished the pull while away and reports it on the new session.
    let outcome = WarmOutcome::Succeeded {
        duration: Duration::from_secs(3),
        downloaded: true,
        digest: None,
        image_id: "sha256:1".into(),
    };
    view.record_result(
        &name("node-a"),
        s2,
        WarmResult {
            order: first.order.clone(),
            outcome: outcome.clone(),
        },
    );
    assert_eq!(first.finished().await.unwrap(), outcome);

    let mut second = view
        .send_order(&name("node-a"), request(None))
        .await
        .unwrap();
    view.disconnect(&name("node-a"), s2);
    tokio::time::sleep(Duration::from_secs(31)).await;
    assert!(matches!(
        second.finished().await,
        Err(ViewError::NodeLeft { .. })
    ));
}
