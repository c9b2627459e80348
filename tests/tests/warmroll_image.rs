#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
//! warmroll's images from the release binaries (`scripts/test` builds them first): pushed
//! to a real registry, pulled through CRI by a real containerd and run there.

use std::time::{Duration, Instant};

use k8s_cri::v1::{ContainerState, ContainerStatus};
use serde_json::json;
use warmroll_tests::containerd::{ContainerSpec, Containerd, PodSpec};
use warmroll_tests::image::NONROOT;
use warmroll_tests::registry::{Registry, RegistryOptions};
use warmroll_tests::warmroll_image::{AGENT, COORDINATOR, push_warmroll_images};

const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

/// Waits until the container exited and its log is complete; returns its status and
/// its log text (the CRI log format's timestamp, stream and tag stripped).
async fn exited(containerd: &Containerd, id: &str) -> (ContainerStatus, String) {
    let deadline = Instant::now() + EXIT_TIMEOUT;
    loop {
        let status = containerd.container_status(id).await.unwrap();
        let log = std::fs::read_to_string(&status.log_path)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| line.splitn(4, ' ').nth(3))
            .collect::<Vec<_>>()
            .join("\n");
        if status.state == ContainerState::ContainerExited as i32 && !log.is_empty() {
            return (status, log);
        }
        assert!(
            Instant::now() < deadline,
            "container {id} did not exit with a log within {EXIT_TIMEOUT:?}: {status:?}\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn release_images_pull_and_run_through_cri() {
    let registry = Registry::start(RegistryOptions::plain()).await.unwrap();
    let containerd = Containerd::start_with_registry(&registry).await.unwrap();
    let images = push_warmroll_images(&registry, "test").await.unwrap();
    assert_eq!(
        images.agent.reference,
        format!("{}/{AGENT}:test", registry.host())
    );

    // The same binaries push the same layer and manifest again (registries dedupe).
    let again = push_warmroll_images(&registry, "again").await.unwrap();
    assert_eq!(again.agent.manifest_digest, images.agent.manifest_digest);
    assert_eq!(
        again.coordinator.manifest_digest,
        images.coordinator.manifest_digest
    );

    // The coordinator as the chart runs it: read-only root filesystem, the image's user.
    let pod = PodSpec::new("warmroll", "images")
        .container(ContainerSpec::new("agent", &images.agent.reference).args(["--help"]))
        .container(
            ContainerSpec::new("coordinator", &images.coordinator.reference)
                .args(["--help"])
                .read_only_rootfs(),
        );
    let running = containerd.run_pod(&pod).await.unwrap();
    for (name, binary, uid, image) in [
        ("agent", AGENT, 0, &images.agent),
        ("coordinator", COORDINATOR, NONROOT, &images.coordinator),
    ] {
        let container = running.containers.iter().find(|c| c.name == name).unwrap();
        assert_eq!(container.image_id, image.config_digest, "{name}");
        let (status, log) = exited(&containerd, &container.id).await;
        assert_eq!(status.exit_code, 0, "{name} --help: {status:?}\n{log}");
        assert!(
            log.contains(&format!("Usage: {binary} ")),
            "{name} --help printed no usage:\n{log}"
        );
        let spec = containerd
            .container_runtime_spec(&container.id)
            .await
            .unwrap();
        assert_eq!(
            spec.pointer("/process/args"),
            Some(&json!([format!("/usr/local/bin/{binary}"), "--help"])),
            "{name}"
        );
        assert_eq!(
            spec.pointer("/process/user/uid"),
            Some(&json!(uid)),
            "{name}"
        );
        assert_eq!(
            spec.pointer("/process/user/gid"),
            Some(&json!(uid)),
            "{name}"
        );
    }
    let coordinator = running.container_id("coordinator").unwrap();
    let spec = containerd
        .container_runtime_spec(coordinator)
        .await
        .unwrap();
    assert_eq!(spec.pointer("/root/readonly"), Some(&json!(true)));

    containerd.stop_pod(&running).await.unwrap();
    containerd.remove_pod(&running).await.unwrap();
}
