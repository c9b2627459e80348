#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
//! The containerd test bed against the real containerd, runc and CNCF registry.

use warmroll_tests::containerd::{Containerd, mounts_under, processes_mentioning};

/// No registry needed: containerd only pulls the sandbox image when a pod runs.
const UNUSED_SANDBOX: &str = "127.0.0.1:9/none/pause:1";

#[tokio::test]
async fn starts_answers_cri_version_and_leaves_nothing_after_drop() {
    let containerd = Containerd::start(UNUSED_SANDBOX).await.unwrap();
    let version = containerd.version().await.unwrap();
    assert_eq!(version.runtime_name, "containerd");
    assert_eq!(version.runtime_api_version, "v1");
    let dir = containerd.dir().to_path_buf();
    let pid = containerd.pid().unwrap();
    assert!(containerd.socket().exists());
    drop(containerd);
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    assert_eq!(processes_mentioning(&dir), vec![]);
    assert_eq!(mounts_under(&dir), Vec::<std::path::PathBuf>::new());
    assert!(!dir.exists());
}

#[tokio::test]
async fn kill_and_restart_keep_the_same_socket_working() {
    let mut containerd = Containerd::start(UNUSED_SANDBOX).await.unwrap();
    let first = containerd.pid().unwrap();
    containerd.kill().await.unwrap();
    assert_eq!(containerd.pid(), None);
    assert!(
        containerd.version().await.is_err(),
        "CRI answered while killed"
    );
    containerd.restart().await.unwrap();
    assert_ne!(containerd.pid().unwrap(), first);
    containerd.version().await.unwrap();
    containerd.stop().await.unwrap();
    assert!(
        containerd.version().await.is_err(),
        "CRI answered while stopped"
    );
    containerd.restart().await.unwrap();
    containerd.version().await.unwrap();
}

#[tokio::test]
async fn two_containerds_run_side_by_side() {
    let (a, b) = tokio::join!(
        Containerd::start(UNUSED_SANDBOX),
        Containerd::start(UNUSED_SANDBOX)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_ne!(a.socket(), b.socket());
    a.version().await.unwrap();
    b.version().await.unwrap();
    drop(a);
    b.version().await.unwrap();
}
