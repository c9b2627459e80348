#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
//! The demo, small and end to end. On a real Kubernetes (what `scripts/sandbox` runs; the
//! binaries from `scripts/build-kubernetes` and the release build, as for the
//! real-cluster tests): the demo itself on 2 nodes, whose Deployment and DaemonSet must
//! converge, each patched once after every node held the new image.
//!
//! On the stand-ins (`--stand-in`): a 2-node sandbox (real registry, real containerd per
//! node, in-process agents and coordinator), a labelled DaemonSet on app:latest, a new
//! build pushed under the tag. warmroll must report the drift, hold the new digest on
//! every node before it patches, patch the DaemonSet exactly once (a merge patch, no
//! per-node writes), and every pod must end up on the new digest. With the warm-up off,
//! the same coordinator patches at once, orders no warm-up, and the nodes get the new
//! digest only when their kubelets pull it after the patch.

use std::time::Duration;

use warmroll_sandbox::coordinator::COORDINATOR_USER;
use warmroll_sandbox::real::{self, RealOptions};
use warmroll_sandbox::{Progress, Sandbox, SandboxOptions, WarmMode, Workload};
use warmroll_tests::kube::KUBE_RELEASE;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_real_demo_patches_each_workload_once_after_every_node_is_warm() {
    let outcome = real::demo(&RealOptions {
        nodes: 2,
        image_size: 8 << 20,
        bandwidth: 8 << 20,
        latency: Duration::ZERO,
        replicas: 2,
        no_warm: false,
    })
    .await
    .expect("the real demo (scripts/build-kubernetes and the release build first)");
    assert_eq!(outcome.version, KUBE_RELEASE);
    assert!(
        real::settled(&outcome.report, &outcome.targets),
        "{}",
        outcome.report.table()
    );
    assert_eq!(outcome.rollouts.len(), 2);
    for r in &outcome.rollouts {
        let name = r.target.name;
        assert!(r.warm_before_patch, "{name}: {:?}", r.writes);
        assert_eq!(
            (r.writes.patches, r.writes.events),
            (1, 1),
            "{name}: one patch and one Event: {:?}",
            r.writes
        );
        assert!(r.writes.other.is_empty(), "{name}: {:?}", r.writes.other);
    }
}

/// A two-node sandbox in `warm` mode with a DaemonSet on a fresh `app:latest`, deployed.
async fn deployed_daemonset(warm: WarmMode) -> (Sandbox, Workload) {
    let sandbox = Sandbox::start(SandboxOptions {
        nodes: 2,
        warm,
        ..SandboxOptions::default()
    })
    .await
    .unwrap();
    let first = sandbox
        .images()
        .push_random("app", "latest", 2 << 20)
        .await
        .unwrap();
    let ds = Workload::daemonset("node-cache", &first.reference);
    sandbox.deploy(&ds, Duration::from_secs(120)).await.unwrap();
    (sandbox, ds)
}

#[tokio::test]
async fn a_daemonset_is_warmed_on_every_node_then_patched_once_and_converges() {
    let (sandbox, ds) = deployed_daemonset(WarmMode::Gated).await;

    let before = sandbox.report().await.unwrap();
    assert_eq!(before.count("drift"), 0, "{}", before.table());

    // A slow link, so that a pull after the patch would show.
    sandbox.registry().set_bandwidth(Some(2 << 20));
    let mut drift_tables = Vec::new();
    let rollouts = sandbox
        .roll(
            std::slice::from_ref(&ds),
            sandbox.images().push_random("app", "latest", 4 << 20),
            Duration::from_secs(180),
            |p| {
                if let Progress::Drift { report, .. } = p {
                    drift_tables.push(report.table());
                }
            },
        )
        .await
        .unwrap();
    let rollout = &rollouts[0];

    // Drift reported (on /report) before anything rolled.
    let drift_seen = rollout.drift_seen.expect("the report never showed drift");
    let patched = rollout.patched.expect("the DaemonSet was never patched");
    assert!(drift_seen <= patched, "{rollout:#?}");
    assert_eq!(drift_tables.len(), 1);

    // The new digest on every node before the patch.
    let nodes = vec!["node-1".to_owned(), "node-2".to_owned()];
    assert!(
        rollout.warm_before_patch(&nodes),
        "nodes held the new digest at {:?}, patch at {patched:?}",
        rollout.warm
    );
    let reason = rollout.reason.as_deref().unwrap_or_default();
    assert!(reason.contains("2/2 target nodes warm"), "{reason}");

    // Exactly one merge patch of the workload; events aside, nothing else, in
    // particular nothing per node.
    assert_eq!(rollout.writes.workload_patches, 1, "{:?}", rollout.writes);
    assert!(rollout.writes.events >= 1, "{:?}", rollout.writes);
    assert!(rollout.writes.other.is_empty(), "{:?}", rollout.writes);
    let coordinator_patches = sandbox
        .cluster()
        .foreign_writes()
        .into_iter()
        .filter(|w| w.user.as_deref() == Some(COORDINATOR_USER) && w.method == "PATCH")
        .count();
    assert_eq!(coordinator_patches, 1);

    // Every pod converged on the new digest: one per node, each ready on it.
    assert!(rollout.converged.is_some());
    assert_eq!(rollout.starts.len(), 2);
    let mut on_nodes: Vec<_> = rollout.starts.iter().map(|s| s.node.clone()).collect();
    on_nodes.sort();
    assert_eq!(on_nodes, nodes);
    let ready = sandbox.cluster().ready_on(&rollout.digest);
    assert_eq!(ready.len(), 2, "{ready:?}");
    // Both slots came back; each was down only for a start from a warm image.
    assert_eq!(rollout.gaps.len(), 2, "{:?}", rollout.gaps);
    assert!(rollout.gaps.iter().all(|g| g.duration().is_some()));

    // The coordinator sees it converged too.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let report = sandbox.report().await.unwrap();
        if report.count("drift") + report.count("warming") + report.count("rolling") == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still not in sync:\n{}",
            report.table()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sandbox.stop().await;
}

#[tokio::test]
async fn with_the_warm_up_off_the_patch_comes_first_and_the_kubelets_pull() {
    let (sandbox, ds) = deployed_daemonset(WarmMode::Off).await;
    sandbox.registry().set_bandwidth(Some(2 << 20));
    let rollouts = sandbox
        .roll(
            std::slice::from_ref(&ds),
            sandbox.images().push_random("app", "latest", 4 << 20),
            Duration::from_secs(180),
            |_| {},
        )
        .await
        .unwrap();
    let rollout = &rollouts[0];
    let patched = rollout.patched.expect("the DaemonSet was never patched");
    let reason = rollout.reason.as_deref().unwrap_or_default();
    assert!(reason.contains("warm-up off"), "{reason}");
    // No node held the new digest before the patch: the kubelets pulled it after.
    assert_eq!(rollout.warm.len(), 2, "{:?}", rollout.warm);
    assert!(
        rollout.warm.values().all(|at| *at > patched),
        "nodes held the new digest at {:?}, patch at {patched:?}",
        rollout.warm
    );
    let nodes = sandbox.cluster().nodes().iter().map(|n| n.name());
    assert_eq!(sandbox.coordinator().warm_orders(nodes), 0);
    assert_eq!(rollout.writes.workload_patches, 1, "{:?}", rollout.writes);
    assert!(rollout.writes.other.is_empty(), "{:?}", rollout.writes);
    assert_eq!(sandbox.cluster().ready_on(&rollout.digest).len(), 2);
    sandbox.stop().await;
}
