//! `helm install` / `helm upgrade` of the unchanged `charts/warmroll` onto a
//! [`KubeCluster`], with only values: warmroll's own images (see
//! [`crate::warmroll_image`]) and what a test adds.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::KubeCluster;
use crate::warmroll_image::WarmrollImages;

/// The namespace and release name the tests install warmroll as.
pub const NAMESPACE: &str = "warmroll";
pub const RELEASE: &str = "warmroll";
/// `helm`, or `$WARMROLL_HELM`.
const HELM_ENV: &str = "WARMROLL_HELM";

/// The chart in this workspace.
pub fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or_else(|| Path::new(".."))
        .join("charts/warmroll")
}

/// The values that point the chart at the test bed's images and registry; `extra` (a
/// YAML document) is given to Helm after them, so it may override any of them.
pub fn image_values(cluster: &KubeCluster, images: &WarmrollImages) -> String {
    let repository = |reference: &str| {
        let in_cluster = cluster.image_ref(reference);
        in_cluster
            .rsplit_once(':')
            .map(|(repo, _)| repo.to_string())
            .unwrap_or(in_cluster)
    };
    let tag = |reference: &str| {
        reference
            .rsplit_once(':')
            .map(|(_, tag)| tag.to_string())
            .unwrap_or_default()
    };
    format!(
        "agent:
  image:
    repository: {agent_repo}
    tag: {agent_tag}
coordinator:
  image:
    repository: {coordinator_repo}
    tag: {coordinator_tag}
config:
  registry:
    insecureRegistries: [\"{registry}\"]
",
        agent_repo = repository(&images.agent.reference),
        agent_tag = tag(&images.agent.reference),
        coordinator_repo = repository(&images.coordinator.reference),
        coordinator_tag = tag(&images.coordinator.reference),
        registry = cluster.registry_host(),
    )
}

/// `helm upgrade --install` of the chart into [`NAMESPACE`] with the image values and
/// `extra`; returns Helm's output. Does not wait: the coordinator's second replica
/// never becomes Ready (only the leader is), which `helm --wait` would wait for.
pub fn install(cluster: &KubeCluster, images: &WarmrollImages, extra: &str) -> Result<String> {
    let dir = cluster
        .dir()
        .context("the cluster has no dir")?
        .to_path_buf();
    let images_file = dir.join("values-images.yaml");
    let extra_file = dir.join("values-test.yaml");
    std::fs::write(&images_file, image_values(cluster, images))
        .with_context(|| format!("writing {}", images_file.display()))?;
    std::fs::write(&extra_file, extra)
        .with_context(|| format!("writing {}", extra_file.display()))?;
    let helm = std::env::var_os(HELM_ENV).unwrap_or_else(|| "helm".into());
    let output = Command::new(&helm)
        .args(["upgrade", "--install", RELEASE])
        .arg(chart_dir())
        .args(["--namespace", NAMESPACE, "--create-namespace"])
        .arg("--kubeconfig")
        .arg(cluster.kubeconfig())
        .arg("--values")
        .arg(&images_file)
        .arg("--values")
        .arg(&extra_file)
        .output()
        .with_context(|| format!("running {helm:?} (scripts/deps.sh installs Helm)"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if !output.status.success() {
        bail!("helm upgrade --install failed ({}):\n{text}", output.status);
    }
    Ok(text)
}
