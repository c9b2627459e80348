//! Pods run the way kubelet runs them: a sandbox with the pod's labels plus the
//! `io.kubernetes.pod.*` keys, then per container an image pull (per the pull policy),
//! `CreateContainer` from the image id with kubelet's labels and annotations, and
//! `StartContainer`. Networking is the node's, so no CNI is needed.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::PathBuf;

use anyhow::{Context, Result, anyhow};
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    AuthConfig, ContainerConfig, ContainerMetadata, ContainerStatus, CreateContainerRequest,
    ImageSpec, LinuxContainerConfig, LinuxContainerSecurityContext, LinuxPodSandboxConfig,
    LinuxSandboxSecurityContext, ListPodSandboxRequest, NamespaceMode, NamespaceOption,
    PodSandboxConfig, PodSandboxMetadata, RemovePodSandboxRequest, RunPodSandboxRequest,
    StartContainerRequest, StopPodSandboxRequest,
};
use tonic::transport::Channel;

use super::{Containerd, container_status, image_status, pull_image};

pub const LABEL_POD_NAME: &str = "io.kubernetes.pod.name";
pub const LABEL_POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
pub const LABEL_POD_UID: &str = "io.kubernetes.pod.uid";
pub const LABEL_CONTAINER_NAME: &str = "io.kubernetes.container.name";
const ANNOTATION_CONTAINER_HASH: &str = "io.kubernetes.container.hash";
const ANNOTATION_RESTART_COUNT: &str = "io.kubernetes.container.restartCount";

/// When to pull a container's image before creating it (kubelet's `imagePullPolicy`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ImagePull {
    /// Always `PullImage` first: the container runs what the registry's tag points to.
    #[default]
    Always,
    /// Pull only when the node has no image under the reference; otherwise create from
    /// whatever the node's tag points to (a stale tag stays stale).
    IfNotPresent,
}

/// One container of a [`PodSpec`].
#[derive(Clone)]
pub struct ContainerSpec {
    pub name: String,
    /// Image reference as written in a pod spec (`host:port/repo:tag` or `@sha256:…`).
    pub image: String,
    pub pull: ImagePull,
    /// Overrides the image's entrypoint when not empty.
    pub command: Vec<String>,
    pub args: Vec<String>,
    /// Registry credentials for the pull (kubelet passes these from imagePullSecrets).
    pub auth: Option<AuthConfig>,
    /// `securityContext.readOnlyRootFilesystem`.
    pub read_only_rootfs: bool,
}

impl std::fmt::Debug for ContainerSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print credentials.
        f.debug_struct("ContainerSpec")
            .field("name", &self.name)
            .field("image", &self.image)
            .field("pull", &self.pull)
            .field("command", &self.command)
            .field("args", &self.args)
            .field("auth", &self.auth.as_ref().map(|_| "<redacted>"))
            .field("read_only_rootfs", &self.read_only_rootfs)
            .finish()
    }
}

impl ContainerSpec {
    pub fn new(name: &str, image: &str) -> Self {
        Self {
            name: name.to_string(),
            image: image.to_string(),
            pull: ImagePull::Always,
            command: Vec::new(),
            args: Vec::new(),
            auth: None,
            read_only_rootfs: false,
        }
    }

    pub fn pull(mut self, pull: ImagePull) -> Self {
        self.pull = pull;
        self
    }

    pub fn command<S: Into<String>>(mut self, command: impl IntoIterator<Item = S>) -> Self {
        self.command = command.into_iter().map(Into::into).collect();
        self
    }

    /// Arguments to the entrypoint (kubelet's `args`), replacing the image's `Cmd`.
    pub fn args<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.args = args.into_iter().map(Into::into).collect();
        self
    }

    /// Mounts the image's root filesystem read-only.
    pub fn read_only_rootfs(mut self) -> Self {
        self.read_only_rootfs = true;
        self
    }

    pub fn auth(mut self, auth: AuthConfig) -> Self {
        self.auth = Some(auth);
        self
    }
}

/// A pod as kubelet sees it: identity, labels, annotations, containers.
#[derive(Clone, Debug)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub attempt: u32,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub containers: Vec<ContainerSpec>,
}

impl PodSpec {
    /// A pod with a random uid and no containers yet.
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.to_string(),
            name: name.to_string(),
            uid: random_uid(),
            attempt: 0,
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            containers: Vec::new(),
        }
    }

    pub fn uid(mut self, uid: &str) -> Self {
        self.uid = uid.to_string();
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.to_string(), value.to_string());
        self
    }

    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.annotations.insert(key.to_string(), value.to_string());
        self
    }

    pub fn container(mut self, container: ContainerSpec) -> Self {
        self.containers.push(container);
        self
    }

    fn pod_labels(&self) -> HashMap<String, String> {
        let mut labels: HashMap<String, String> = self.labels.clone().into_iter().collect();
        labels.insert(LABEL_POD_NAME.into(), self.name.clone());
        labels.insert(LABEL_POD_NAMESPACE.into(), self.namespace.clone());
        labels.insert(LABEL_POD_UID.into(), self.uid.clone());
        labels
    }

    /// Directory name kubelet uses under `/var/log/pods`.
    fn log_dir_name(&self) -> String {
        format!("{}_{}_{}", self.namespace, self.name, self.uid)
    }
}

fn random_uid() -> String {
    let bytes: [u8; 16] = rand::random();
    let hex = hex::encode(bytes);
    // 8-4-4-4-12, like a Kubernetes uid.
    let parts = [(0, 8), (8, 12), (12, 16), (16, 20), (20, 32)];
    parts
        .iter()
        .filter_map(|&(a, b)| hex.get(a..b))
        .collect::<Vec<_>>()
        .join("-")
}

/// Host networking, own PID namespace per container, pod IPC — kubelet's choice for a
/// `hostNetwork: true` pod.
fn namespace_options() -> NamespaceOption {
    NamespaceOption {
        network: NamespaceMode::Node as i32,
        pid: NamespaceMode::Container as i32,
        ipc: NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

/// `RunPodSandbox` config for `pod`, logging under `log_root`.
fn sandbox_config(pod: &PodSpec, log_root: &std::path::Path) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: pod.name.clone(),
            uid: pod.uid.clone(),
            namespace: pod.namespace.clone(),
            attempt: pod.attempt,
        }),
        // Must stay empty: there is no private UTS namespace with host networking.
        hostname: String::new(),
        log_directory: log_root
            .join(pod.log_dir_name())
            .to_string_lossy()
            .into_owned(),
        labels: pod.pod_labels(),
        annotations: pod.annotations.clone().into_iter().collect(),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(namespace_options()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// `CreateContainer` config: image by id with the user's reference alongside, kubelet's
/// labels and annotations.
fn container_config(pod: &PodSpec, container: &ContainerSpec, image_id: &str) -> ContainerConfig {
    let mut labels = pod.pod_labels();
    labels.retain(|k, _| k.starts_with("io.kubernetes.pod."));
    labels.insert(LABEL_CONTAINER_NAME.into(), container.name.clone());
    let hash = {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (
            &container.name,
            &container.image,
            &container.command,
            &container.args,
        )
            .hash(&mut hasher);
        format!("{:x}", hasher.finish() & 0xffff_ffff)
    };
    let annotations = HashMap::from([
        (ANNOTATION_CONTAINER_HASH.to_string(), hash),
        (
            ANNOTATION_RESTART_COUNT.to_string(),
            pod.attempt.to_string(),
        ),
    ]);
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: container.name.clone(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: image_id.to_string(),
            user_specified_image: container.image.clone(),
            ..Default::default()
        }),
        command: container.command.clone(),
        args: container.args.clone(),
        labels,
        annotations,
        log_path: format!("{}/0.log", container.name),
        linux: Some(LinuxContainerConfig {
            security_context: Some(LinuxContainerSecurityContext {
                namespace_options: Some(namespace_options()),
                readonly_rootfs: container.read_only_rootfs,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A pod running on a test containerd.
#[derive(Clone, Debug)]
pub struct RunningPod {
    pub sandbox_id: String,
    pub containers: Vec<RunningContainer>,
}

#[derive(Clone, Debug)]
pub struct RunningContainer {
    pub name: String,
    pub id: String,
    /// The image id (config digest) the container was created from.
    pub image_id: String,
}

impl RunningPod {
    /// The id of the container named `name`.
    pub fn container_id(&self, name: &str) -> Result<&str> {
        self.containers
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.id.as_str())
            .ok_or_else(|| anyhow!("pod {} has no container {name}", self.sandbox_id))
    }
}

/// The CRI calls kubelet makes for the pods of one node, step by step, so a caller can
/// report progress between them (the sandbox cluster's kubelet writes pod status after
/// each). It holds only a CRI channel and the pod log root, so it can live in a caller's
/// tasks while the [`Containerd`] guard stays with the test.
#[derive(Clone, Debug)]
pub struct PodRuntime {
    channel: Channel,
    pod_logs: PathBuf,
}

impl PodRuntime {
    fn runtime(&self) -> RuntimeServiceClient<Channel> {
        RuntimeServiceClient::new(self.channel.clone())
    }

    /// CRI `RunPodSandbox` for `pod`; returns the sandbox id.
    pub async fn run_sandbox(&self, pod: &PodSpec) -> Result<String> {
        Ok(self
            .runtime()
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(sandbox_config(pod, &self.pod_logs)),
                runtime_handler: String::new(),
            })
            .await
            .with_context(|| format!("CRI RunPodSandbox for pod {}/{}", pod.namespace, pod.name))?
            .into_inner()
            .pod_sandbox_id)
    }

    /// The image id to create `container` from, pulling per its [`ImagePull`]:
    /// `Always` pulls the reference (the registry is asked where the tag points, layers
    /// the node has are not fetched again); `IfNotPresent` uses the node's image when it
    /// has one under the reference.
    pub async fn ensure_image(&self, container: &ContainerSpec) -> Result<String> {
        if container.pull == ImagePull::IfNotPresent
            && let Some(image) = image_status(self.channel.clone(), &container.image).await?
        {
            return Ok(image.id);
        }
        pull_image(
            self.channel.clone(),
            &container.image,
            container.auth.clone(),
        )
        .await
    }

    /// CRI `CreateContainer` (from `image_id`, see [`Self::ensure_image`]) and
    /// `StartContainer` in the sandbox of `pod`.
    pub async fn start_container(
        &self,
        pod: &PodSpec,
        sandbox_id: &str,
        container: &ContainerSpec,
        image_id: &str,
    ) -> Result<RunningContainer> {
        let what = format!("{} in pod {}/{}", container.name, pod.namespace, pod.name);
        let log_dir = self.pod_logs.join(pod.log_dir_name()).join(&container.name);
        fs::create_dir_all(&log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
        let id = self
            .runtime()
            .create_container(CreateContainerRequest {
                pod_sandbox_id: sandbox_id.to_string(),
                config: Some(container_config(pod, container, image_id)),
                sandbox_config: Some(sandbox_config(pod, &self.pod_logs)),
            })
            .await
            .with_context(|| format!("CRI CreateContainer {what}"))?
            .into_inner()
            .container_id;
        self.runtime()
            .start_container(StartContainerRequest {
                container_id: id.clone(),
            })
            .await
            .with_context(|| format!("CRI StartContainer {what}"))?;
        Ok(RunningContainer {
            name: container.name.clone(),
            id,
            image_id: image_id.to_string(),
        })
    }

    /// CRI `ContainerStatus` (its `image_ref` is the repo digest the container runs).
    pub async fn container_status(&self, container_id: &str) -> Result<ContainerStatus> {
        container_status(self.channel.clone(), container_id).await
    }

    /// CRI `StopPodSandbox` (kills its containers).
    pub async fn stop_sandbox(&self, sandbox_id: &str) -> Result<()> {
        self.runtime()
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: sandbox_id.to_string(),
            })
            .await
            .with_context(|| format!("CRI StopPodSandbox {sandbox_id}"))?;
        Ok(())
    }

    /// CRI `RemovePodSandbox` (after [`Self::stop_sandbox`]; removes its containers).
    pub async fn remove_sandbox(&self, sandbox_id: &str) -> Result<()> {
        self.runtime()
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: sandbox_id.to_string(),
            })
            .await
            .with_context(|| format!("CRI RemovePodSandbox {sandbox_id}"))?;
        Ok(())
    }

    /// Every sandbox on the node as `(sandbox id, pod uid)` (the uid from the
    /// `io.kubernetes.pod.uid` label; empty when absent), in any state.
    pub async fn sandboxes(&self) -> Result<Vec<(String, String)>> {
        Ok(self
            .runtime()
            .list_pod_sandbox(ListPodSandboxRequest { filter: None })
            .await
            .context("CRI ListPodSandbox")?
            .into_inner()
            .items
            .into_iter()
            .map(|sandbox| {
                let uid = sandbox
                    .labels
                    .get(LABEL_POD_UID)
                    .cloned()
                    .unwrap_or_default();
                (sandbox.id, uid)
            })
            .collect())
    }
}

impl Containerd {
    /// The step-by-step CRI calls for pods on this containerd.
    pub fn pod_runtime(&self) -> PodRuntime {
        PodRuntime {
            channel: self.channel(),
            pod_logs: self.paths.pod_logs.clone(),
        }
    }

    /// Runs `pod` like kubelet: `RunPodSandbox`, then per container pull (per its
    /// [`ImagePull`]), `CreateContainer`, `StartContainer`. A failure leaves what was
    /// created to [`Drop`] (as kubelet leaves it to its next sync).
    pub async fn run_pod(&self, pod: &PodSpec) -> Result<RunningPod> {
        let runtime = self.pod_runtime();
        let sandbox_id = runtime.run_sandbox(pod).await?;
        let mut containers = Vec::new();
        for container in &pod.containers {
            let image_id = runtime.ensure_image(container).await.with_context(|| {
                format!(
                    "pod {}/{}, container {}",
                    pod.namespace, pod.name, container.name
                )
            })?;
            containers.push(
                runtime
                    .start_container(pod, &sandbox_id, container, &image_id)
                    .await?,
            );
        }
        Ok(RunningPod {
            sandbox_id,
            containers,
        })
    }

    /// CRI `StopPodSandbox` (kills its containers).
    pub async fn stop_pod(&self, pod: &RunningPod) -> Result<()> {
        self.pod_runtime().stop_sandbox(&pod.sandbox_id).await
    }

    /// CRI `RemovePodSandbox` (after [`Self::stop_pod`]; removes its containers).
    pub async fn remove_pod(&self, pod: &RunningPod) -> Result<()> {
        self.pod_runtime().remove_sandbox(&pod.sandbox_id).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_labels_are_pod_labels_plus_kubernetes_keys() {
        let pod = PodSpec::new("ns1", "web-0")
            .uid("u-1")
            .label("app", "web")
            .annotation("a", "b");
        let config = sandbox_config(&pod, std::path::Path::new("/logs"));
        assert_eq!(config.labels.get("app").map(String::as_str), Some("web"));
        assert_eq!(
            config.labels.get(LABEL_POD_NAME).map(String::as_str),
            Some("web-0")
        );
        assert_eq!(
            config.labels.get(LABEL_POD_NAMESPACE).map(String::as_str),
            Some("ns1")
        );
        assert_eq!(
            config.labels.get(LABEL_POD_UID).map(String::as_str),
            Some("u-1")
        );
        assert_eq!(config.annotations.get("a").map(String::as_str), Some("b"));
        assert_eq!(config.hostname, "");
        assert_eq!(config.log_directory, "/logs/ns1_web-0_u-1");
        let ns = config
            .linux
            .and_then(|l| l.security_context)
            .and_then(|s| s.namespace_options)
            .unwrap();
        assert_eq!(ns.network, NamespaceMode::Node as i32);
    }

    #[test]
    fn container_labels_name_the_container_and_pod_only() {
        let pod = PodSpec::new("ns1", "web-0").uid("u-1").label("app", "web");
        let container = ContainerSpec::new("app", "r/x:1");
        let config = container_config(&pod, &container, "sha256:abc");
        assert_eq!(
            config.labels.get(LABEL_CONTAINER_NAME).map(String::as_str),
            Some("app")
        );
        assert_eq!(
            config.labels.get(LABEL_POD_UID).map(String::as_str),
            Some("u-1")
        );
        assert!(!config.labels.contains_key("app"));
        let image = config.image.unwrap();
        assert_eq!(image.image, "sha256:abc");
        assert_eq!(image.user_specified_image, "r/x:1");
        assert!(config.annotations.contains_key(ANNOTATION_CONTAINER_HASH));
    }

    #[test]
    fn random_uids_look_like_kubernetes_uids() {
        let uid = random_uid();
        assert_eq!(uid.len(), 36);
        assert_eq!(uid.matches('-').count(), 4);
        assert_ne!(uid, random_uid());
    }

    #[test]
    fn container_spec_debug_hides_credentials() {
        let spec = ContainerSpec::new("app", "r/x:1").auth(AuthConfig {
            username: "u".into(),
            password: "hunter2".into(),
            ..Default::default()
        });
        assert!(!format!("{spec:?}").contains("hunter2"));
    }
}
