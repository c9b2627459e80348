use std::collections::BTreeMap;

use warmroll_proto::fleet::{FailureKind, PodRef, Runtime};
use warmroll_proto::image::Platform;

use super::*;
use crate::fleet::limits::SessionLimits;

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
    let s = view.connect(hello("node-a"), true, tx, None).unwrap();
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
    let s = view.connect(hello("node-b"), true, tx, None).unwrap();
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
    let s = view.connect(hello("node-a"), true, tx, None).unwrap();
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
    assert_eq!(
        view.apply_change(&name("node-a"), s, change, &SessionLimits::default()),
        Applied::Ok
    );
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
    let s = view.connect(hello("node-a"), true, tx, None).unwrap();
    // A change before any snapshot is a gap too.
    assert_eq!(
        view.apply_change(
            &name("node-a"),
            s,
            InventoryChange {
                sequence: 1,
                ..Default::default()
            },
            &SessionLimits::default()
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
            },
            &SessionLimits::default()
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
        view.apply_change(&name("node-a"), s, change, &SessionLimits::default()),
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
    let old = view
        .connect(hello("node-a"), true, tx1.clone(), None)
        .unwrap();
    drop(tx1);
    let (tx2, _rx2) = session_channel();
    let new = view.connect(hello("node-a"), true, tx2, None).unwrap();
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
    let s = view.connect(hello("node-a"), true, tx, None).unwrap();
    let (tx, _rx_b) = session_channel();
    let sb = view.connect(hello("node-b"), true, tx, None).unwrap();
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
    view.connect(hello("node-b"), true, tx, None).unwrap();
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
        view.send_order(&name("node-a"), request(None)),
        Err(ViewError::NotConnected(_))
    ));
    let (tx, mut rx) = session_channel();
    let s = view.connect(hello("node-a"), true, tx, None).unwrap();
    let creds = Credentials::Basic {
        username: "u".into(),
        password: "p".into(),
    };
    let mut ticket = view
        .send_order(&name("node-a"), request(Some(creds.clone())))
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
    view.connect(hello("node-a"), false, tx, None).unwrap();
    let creds = Credentials::Token("t".into());
    assert_eq!(
        view.send_order(&name("node-a"), request(Some(creds)))
            .unwrap_err(),
        ViewError::NodeUnverified(name("node-a"))
    );
    assert!(view.send_order(&name("node-a"), request(None)).is_ok());
}

#[tokio::test(start_paused = true)]
async fn pending_orders_survive_a_reconnect_and_fail_when_the_node_leaves() {
    let view = FleetView::new(Duration::from_secs(30));
    let (tx, _rx) = session_channel();
    let s1 = view.connect(hello("node-a"), true, tx, None).unwrap();
    let mut first = view.send_order(&name("node-a"), request(None)).unwrap();
    view.disconnect(&name("node-a"), s1);
    let (tx, _rx2) = session_channel();
    let s2 = view.connect(hello("node-a"), true, tx, None).unwrap();
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

    let mut second = view.send_order(&name("node-a"), request(None)).unwrap();
    view.disconnect(&name("node-a"), s2);
    tokio::time::sleep(Duration::from_secs(31)).await;
    assert!(matches!(
        second.finished().await,
        Err(ViewError::NodeLeft { .. })
    ));
}

fn orders(rx: &mut mpsc::Receiver<Outbound>) -> Vec<WarmOrder> {
    let mut out = Vec::new();
    while let Ok(message) = rx.try_recv() {
        if let Ok(CoordinatorMessage::WarmOrder(order)) =
            CoordinatorMessage::try_from((*message).unwrap())
        {
            out.push(order);
        }
    }
    out
}

#[tokio::test(start_paused = true)]
async fn outstanding_orders_are_sent_again_on_the_next_session_with_the_time_they_have_left() {
    let view = FleetView::new(Duration::from_secs(60));
    let (tx, mut rx1) = session_channel();
    let s1 = view.connect(hello("node-a"), true, tx, None).unwrap();
    let creds = Credentials::Token("t".into());
    let first = view
        .send_order(&name("node-a"), request(Some(creds.clone())))
        .unwrap();
    let cancelled = view.send_order(&name("node-a"), request(None)).unwrap();
    let finished = view.send_order(&name("node-a"), request(None)).unwrap();
    assert_eq!(orders(&mut rx1).len(), 3);
    view.cancel_order(&name("node-a"), &cancelled.order)
        .unwrap();
    view.record_result(
        &name("node-a"),
        s1,
        WarmResult {
            order: finished.order.clone(),
            outcome: WarmOutcome::Failed {
                kind: FailureKind::NotFound,
                message: "gone".into(),
                found: None,
            },
        },
    );
    // The agent restarts 20 s into its pull.
    tokio::time::sleep(Duration::from_secs(20)).await;
    view.disconnect(&name("node-a"), s1);
    // An order given while it is away waits for its next session too.
    let while_away = view.send_order(&name("node-a"), request(None)).unwrap();
    let (tx, mut rx2) = session_channel();
    view.connect(hello("node-a"), true, tx, None).unwrap();
    let resent = orders(&mut rx2);
    let ids: Vec<&OrderId> = resent.iter().map(|o| &o.id).collect();
    assert_eq!(ids, [&first.order, &while_away.order], "in the order given");
    assert_eq!(resent[0].timeout, Duration::from_secs(40), "what is left");
    assert_eq!(
        resent[0].credentials,
        Some(creds),
        "to a node-verified session"
    );
    assert_eq!(resent[1].timeout, Duration::from_secs(60));

    // Once an order's time is up it is not sent again.
    tokio::time::sleep(Duration::from_secs(61)).await;
    let (tx, mut rx3) = session_channel();
    view.connect(hello("node-a"), true, tx, None).unwrap();
    assert!(orders(&mut rx3).is_empty());
}

#[tokio::test]
async fn a_session_that_does_not_read_is_ended_without_waiting_and_its_order_waits() {
    let view = FleetView::new(Duration::from_secs(60));
    let mut registry = prometheus_client::registry::Registry::default();
    view.register_metrics(&mut registry);
    // A queue of two that nobody reads.
    let (tx, _stuck) = mpsc::channel(2);
    let s = view.connect(hello("node-a"), true, tx, None).unwrap();
    let mut tickets = Vec::new();
    for _ in 0..3 {
        // Returns at once every time: nothing here awaits the agent.
        tickets.push(view.send_order(&name("node-a"), request(None)).unwrap());
    }
    let info = view.node(&name("node-a")).unwrap();
    assert!(
        !info.connected,
        "the third order found the queue full and ended the session"
    );
    assert!(
        !view.is_current(&name("node-a"), s),
        "it writes nothing more"
    );
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains("warmroll_agent_sessions_closed_total{reason=\"stalled\"} 1"),
        "{text}"
    );
    // A cancel for a node whose session is gone returns at once too.
    assert!(
        view.cancel_order(&name("node-a"), &tickets[0].order)
            .is_err()
    );
    // The agent comes back: the orders not cancelled are sent again.
    let (tx, mut rx) = session_channel();
    view.connect(hello("node-a"), true, tx, None).unwrap();
    let resent: Vec<OrderId> = orders(&mut rx).into_iter().map(|o| o.id).collect();
    assert_eq!(resent, [tickets[1].order.clone(), tickets[2].order.clone()]);
}

#[tokio::test]
async fn a_token_without_a_node_claim_never_takes_over_a_node_verified_node() {
    let view = FleetView::new(Duration::from_secs(60));
    let (tx, _rx) = session_channel();
    let s = view.connect(hello("node-a"), true, tx, None).unwrap();
    let (tx, _rx2) = session_channel();
    assert_eq!(
        view.connect(hello("node-a"), false, tx, None),
        Err(ViewError::VerifiedNodeTaken(name("node-a")))
    );
    assert!(
        view.is_current(&name("node-a"), s),
        "the real session stays"
    );
    // Not while the verified agent is away either.
    view.disconnect(&name("node-a"), s);
    let (tx, _rx3) = session_channel();
    assert!(view.connect(hello("node-a"), false, tx, None).is_err());
    // A node-verified session of it is welcome.
    let (tx, _rx4) = session_channel();
    assert!(view.connect(hello("node-a"), true, tx, None).is_ok());
}

#[tokio::test]
async fn a_change_past_the_node_bounds_is_refused() {
    let view = FleetView::new(Duration::from_secs(60));
    let (tx, _rx) = session_channel();
    let s = view.connect(hello("node-a"), true, tx, None).unwrap();
    view.apply_snapshot(&name("node-a"), s, snapshot(1, &["c1"]));
    let limits = SessionLimits {
        containers_per_node: 2,
        ..SessionLimits::default()
    };
    let change = InventoryChange {
        sequence: 2,
        upserted: vec![container("c2", "web:1"), container("c3", "web:1")],
        ..Default::default()
    };
    assert!(matches!(
        view.apply_change(&name("node-a"), s, change, &limits),
        Applied::OverLimit(_)
    ));
    let info = view.node(&name("node-a")).unwrap();
    assert!(!info.inventory_current);
    assert!(info.containers.is_empty(), "nothing past the bound is kept");
}
