//! A real containerd (with its built-in CRI v1 plugin) per test.
//!
//! [`Containerd::start_on`] runs a containerd of the given [`Runtime`] (Debian's 1.6, or
//! 2.x built by `scripts/build-containerd`; [`Containerd::start`] takes 1.6) with its own
//! root, state, socket, runc root and registry hosts dir under a
//! `warmroll-testbed-ctrd-*` temp dir, with the CRI settings this machine needs (see
//! `shared/TESTBED.md`): `restrict_oom_score_adj`,
//! a sandbox image served by a test registry, a `config_path` hosts dir that
//! [`Containerd::trust_registry`] fills at runtime. Pods run the way kubelet runs them
//! ([`Containerd::run_pod`]), with host networking so no CNI is needed.
//!
//! Dropping the guard (also while a failed test unwinds) removes every sandbox through
//! CRI, stops containerd, force-deletes what runc still knows under our runc root, ends
//! the shims this containerd started (found by pid via their `-address <our socket>`
//! argument), lazily unmounts what is left under the temp dir and deletes it.

pub(crate) mod cleanup;
mod pod;
mod runtime;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    AuthConfig, Container, ContainerStatus, ContainerStatusRequest, Image, ImageSpec,
    ImageStatusRequest, ListContainersRequest, ListImagesRequest, PullImageRequest, VersionRequest,
    VersionResponse,
};
use nix::sys::signal::Signal;
use tempfile::TempDir;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tower::service_fn;

use crate::image::ImageBuilder;
use crate::registry::Registry;
use crate::scratch;

pub use cleanup::{mounts_under, processes_mentioning};
pub use pod::{ContainerSpec, ImagePull, PodRuntime, PodSpec, RunningContainer, RunningPod};
pub use runtime::{CONTAINERD2_BIN_ENV, CONTAINERD2_RELEASE, Runtime, RuntimeBinaries};
pub(crate) use runtime::{CriPaths, config_toml};
use runtime::{toml_path, toml_str};
/// The containerd namespace the CRI plugin uses.
pub const CRI_NAMESPACE: &str = "k8s.io";

/// Where [`Containerd::start_with_registry`] pushes the sandbox image.
pub const SANDBOX_REPO: &str = "warmroll/pause";
pub const SANDBOX_TAG: &str = "1";

// Generous: the whole suite starts many containerds at once on small machines.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_GRACE: Duration = Duration::from_secs(15);
const LOG_TAIL_LINES: usize = 40;

/// A CRI gRPC channel over a unix socket (lazy: it connects on first use and reconnects
/// after the runtime restarts). Must be called inside a tokio runtime.
///
/// This is how any test (or the agent under test) talks CRI to a test containerd:
/// `RuntimeServiceClient::new(unix_channel(containerd.socket())?)`.
pub fn unix_channel(socket: &Path) -> Result<Channel> {
    let socket = socket.to_path_buf();
    // The URI is ignored by the connector; tonic only needs a syntactically valid one.
    let endpoint = Endpoint::try_from("http://[::1]:0").context("building CRI endpoint")?;
    Ok(
        endpoint.connect_with_connector_lazy(service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
        })),
    )
}

/// Paths of one test containerd, all under its temp dir.
#[derive(Clone, Debug)]
struct Paths {
    dir: PathBuf,
    config: PathBuf,
    socket: PathBuf,
    hosts: PathBuf,
    runc_root: PathBuf,
    pod_logs: PathBuf,
    log: PathBuf,
}

impl Paths {
    fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            config: dir.join("config.toml"),
            // Short on purpose: unix socket paths are limited to 108 bytes.
            socket: dir.join("c.sock"),
            hosts: dir.join("hosts"),
            runc_root: dir.join("runc"),
            pod_logs: dir.join("pods"),
            log: dir.join("containerd.log"),
        }
    }
}

/// A running test containerd. See the module docs.
pub struct Containerd {
    /// `None` once dropped.
    dir: Option<TempDir>,
    runtime: Runtime,
    binaries: RuntimeBinaries,
    paths: Paths,
    sandbox_image: String,
    process: Option<Child>,
    channel: Channel,
}

impl std::fmt::Debug for Containerd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Containerd")
            .field("runtime", &self.runtime)
            .field("dir", &self.paths.dir)
            .field("sandbox_image", &self.sandbox_image)
            .field("pid", &self.pid())
            .finish()
    }
}

impl Containerd {
    /// [`Self::start_on`] Debian's containerd 1.6.
    pub async fn start(sandbox_image: &str) -> Result<Self> {
        Self::start_on(Runtime::Containerd16, sandbox_image).await
    }

    /// Starts a containerd of `runtime` whose pod sandboxes use `sandbox_image` (an
    /// image a test registry serves; trust that registry with [`Self::trust_registry`]
    /// before running a pod), and waits until CRI `Version` answers.
    ///
    /// Fails with a message naming what to install or build when not root or when
    /// containerd, runc or the runc shim are missing.
    pub async fn start_on(runtime: Runtime, sandbox_image: &str) -> Result<Self> {
        let binaries = runtime.binaries()?;
        preflight()?;
        let dir = scratch::temp_dir("ctrd")?;
        let paths = Paths::new(dir.path());
        for d in [&paths.hosts, &paths.pod_logs] {
            fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        fs::write(
            &paths.config,
            standalone_config(runtime, &paths, sandbox_image),
        )
        .with_context(|| format!("writing {}", paths.config.display()))?;
        let channel = unix_channel(&paths.socket)?;
        let mut containerd = Self {
            dir: Some(dir),
            runtime,
            binaries,
            paths,
            sandbox_image: sandbox_image.to_string(),
            process: None,
            channel,
        };
        // On error `containerd` is dropped here, which cleans up what was started.
        containerd.spawn()?;
        containerd.wait_ready().await?;
        Ok(containerd)
    }

    /// Pushes a sandbox image (the busybox image of [`ImageBuilder`], which runs until
    /// SIGTERM) to `registry` as `warmroll/pause:1`, starts containerd with it and
    /// trusts `registry`.
    ///
    /// containerd pulls the sandbox image without credentials: use a registry without
    /// auth here (plain or TLS), and [`Self::trust_registry`] for authenticated ones.
    pub async fn start_with_registry(registry: &Registry) -> Result<Self> {
        Self::start_with_registry_on(Runtime::Containerd16, registry).await
    }

    /// [`Self::start_with_registry`] on a containerd of `runtime`.
    pub async fn start_with_registry_on(runtime: Runtime, registry: &Registry) -> Result<Self> {
        let sandbox = ImageBuilder::new(registry)?
            .push(SANDBOX_REPO, SANDBOX_TAG)
            .await
            .context("pushing the sandbox image")?;
        let containerd = Self::start_on(runtime, &sandbox.reference).await?;
        containerd.trust_registry(registry)?;
        Ok(containerd)
    }

    /// Which containerd this is.
    pub fn kind(&self) -> Runtime {
        self.runtime
    }

    /// The CRI (and containerd API) socket.
    pub fn socket(&self) -> &Path {
        &self.paths.socket
    }

    /// The temp dir everything of this containerd lives under.
    pub fn dir(&self) -> &Path {
        &self.paths.dir
    }

    /// The sandbox (pause) image pods use.
    pub fn sandbox_image(&self) -> &str {
        &self.sandbox_image
    }

    /// The pid of the running containerd process, `None` after [`Self::stop`] /
    /// [`Self::kill`].
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Child::id)
    }

    /// The CRI channel (lazy; reconnects after a restart).
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    pub fn runtime(&self) -> RuntimeServiceClient<Channel> {
        RuntimeServiceClient::new(self.channel())
    }

    pub fn images(&self) -> ImageServiceClient<Channel> {
        ImageServiceClient::new(self.channel())
    }

    /// CRI `Version`.
    pub async fn version(&self) -> Result<VersionResponse> {
        Ok(self
            .runtime()
            .version(VersionRequest {
                version: "v1".into(),
            })
            .await
            .context("CRI Version")?
            .into_inner())
    }

    /// Lets containerd pull from `registry`: writes `hosts/<host:port>/hosts.toml` with
    /// an `http://` endpoint, or `https://` plus the registry's CA. Takes effect for
    /// the next pull, no restart needed.
    pub fn trust_registry(&self, registry: &Registry) -> Result<()> {
        self.trust_host(registry.host(), registry.ca_pem().as_deref())
    }

    /// Writes `hosts/<host>/hosts.toml` for a registry at `host` (`host:port`): plain
    /// HTTP when `ca_pem` is `None`, else HTTPS trusting that CA.
    pub fn trust_host(&self, host: &str, ca_pem: Option<&str>) -> Result<()> {
        let dir = self.paths.hosts.join(host);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let ca_file = match ca_pem {
            Some(pem) => {
                let file = dir.join("ca.crt");
                fs::write(&file, pem).with_context(|| format!("writing {}", file.display()))?;
                Some(file)
            }
            None => None,
        };
        let file = dir.join("hosts.toml");
        fs::write(&file, hosts_toml(host, ca_file.as_deref()))
            .with_context(|| format!("writing {}", file.display()))
    }

    /// CRI `PullImage`; returns the image id (the config digest, `sha256:…`).
    pub async fn pull(&self, image: &str, auth: Option<AuthConfig>) -> Result<String> {
        pull_image(self.channel(), image, auth).await
    }

    /// CRI `ImageStatus`: the image a reference (tag, digest or id) points to on this
    /// node, `None` when absent.
    pub async fn image_status(&self, image: &str) -> Result<Option<Image>> {
        image_status(self.channel(), image).await
    }

    /// CRI `ListImages`.
    pub async fn list_images(&self) -> Result<Vec<Image>> {
        let response = self
            .images()
            .list_images(ListImagesRequest { filter: None })
            .await
            .context("CRI ListImages")?;
        Ok(response.into_inner().images)
    }

    /// CRI `ListContainers` (all states).
    pub async fn list_containers(&self) -> Result<Vec<Container>> {
        let response = self
            .runtime()
            .list_containers(ListContainersRequest { filter: None })
            .await
            .context("CRI ListContainers")?;
        Ok(response.into_inner().containers)
    }

    /// CRI `ContainerStatus`.
    pub async fn container_status(&self, container_id: &str) -> Result<ContainerStatus> {
        container_status(self.channel(), container_id).await
    }

    /// The OCI runtime spec containerd made for a container (CRI verbose
    /// `ContainerStatus`, its `info.runtimeSpec`): the user, args and root it runs with.
    pub async fn container_runtime_spec(&self, container_id: &str) -> Result<serde_json::Value> {
        let response = self
            .runtime()
            .container_status(ContainerStatusRequest {
                container_id: container_id.to_string(),
                verbose: true,
            })
            .await
            .with_context(|| format!("CRI ContainerStatus {container_id} (verbose)"))?;
        let info = response.into_inner().info;
        let text = info
            .get("info")
            .ok_or_else(|| anyhow!("CRI ContainerStatus {container_id}: no verbose info"))?;
        let mut info: serde_json::Value = serde_json::from_str(text)
            .with_context(|| format!("CRI ContainerStatus {container_id}: verbose info"))?;
        info.get_mut("runtimeSpec")
            .map(serde_json::Value::take)
            .ok_or_else(|| anyhow!("CRI ContainerStatus {container_id}: no runtimeSpec in {text}"))
    }

    /// Stops containerd gracefully (SIGTERM). Shims and containers keep running, as
    /// with `systemctl stop containerd`; [`Self::restart`] brings it back.
    pub async fn stop(&mut self) -> Result<()> {
        self.end_process(Signal::SIGTERM).await
    }

    /// Kills containerd (SIGKILL), leaving shims and containers running: "the runtime
    /// died in the middle".
    pub async fn kill(&mut self) -> Result<()> {
        self.end_process(Signal::SIGKILL).await
    }

    /// Starts containerd again on the same root, state and socket (stopping it first
    /// if it runs) and waits until CRI answers.
    pub async fn restart(&mut self) -> Result<()> {
        self.end_process(Signal::SIGTERM).await?;
        self.spawn()?;
        self.wait_ready().await
    }

    fn spawn(&mut self) -> Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.paths.log)
            .with_context(|| format!("opening {}", self.paths.log.display()))?;
        let log_err = log
            .try_clone()
            .context("duplicating the containerd log file")?;
        let binary = &self.binaries.containerd;
        let mut command = Command::new(binary);
        command
            .arg("--config")
            .arg(&self.paths.config)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        if let Some(path) = self.binaries.path_env() {
            command.env("PATH", path);
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        self.process = Some(child);
        Ok(())
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.process.as_mut()
                && let Some(status) = child.try_wait().context("waiting for containerd")?
            {
                self.process = None;
                bail!(
                    "containerd exited ({status}) before CRI answered; log tail:\n{}",
                    scratch::log_tail(&self.paths.log, LOG_TAIL_LINES)
                );
            }
            let last_error =
                match tokio::time::timeout(Duration::from_secs(2), self.version()).await {
                    Ok(Ok(_)) => return Ok(()),
                    Ok(Err(e)) => format!("{e:#}"),
                    Err(_) => "CRI Version timed out".to_string(),
                };
            if Instant::now() > deadline {
                bail!(
                    "containerd CRI did not answer within {READY_TIMEOUT:?} on {} \
                     (last error: {last_error}); log tail:\n{}",
                    self.paths.socket.display(),
                    scratch::log_tail(&self.paths.log, LOG_TAIL_LINES)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn end_process(&mut self, signal: Signal) -> Result<()> {
        let Some(mut child) = self.process.take() else {
            return Ok(());
        };
        cleanup::signal_child(&child, signal)?;
        let deadline = Instant::now() + STOP_GRACE;
        loop {
            if child
                .try_wait()
                .context("waiting for containerd")?
                .is_some()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                cleanup::signal_child(&child, Signal::SIGKILL)?;
                child.wait().context("waiting for killed containerd")?;
                bail!("containerd did not exit within {STOP_GRACE:?} of {signal}; killed it");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let Some(dir) = self.dir.take() else {
            return;
        };
        let problems = cleanup::tear_down(&self.paths, self.process.take());
        for problem in &problems {
            eprintln!(
                "containerd test bed cleanup of {}: {problem}",
                self.paths.dir.display()
            );
        }
        if let Err(e) = dir.close() {
            eprintln!(
                "containerd test bed cleanup: removing {}: {e}",
                self.paths.dir.display()
            );
        }
    }
}

/// CRI `PullImage`; returns the image id (the config digest, `sha256:…`).
/// CRI `PullImage` on the runtime at `socket` (a cluster node's, say); returns the
/// image id.
pub async fn pull_on(socket: &Path, image: &str) -> Result<String> {
    pull_image(unix_channel(socket)?, image, None).await
}

async fn pull_image(channel: Channel, image: &str, auth: Option<AuthConfig>) -> Result<String> {
    let response = ImageServiceClient::new(channel)
        .pull_image(PullImageRequest {
            image: Some(image_spec(image)),
            auth,
            sandbox_config: None,
        })
        .await
        .with_context(|| format!("CRI PullImage {image}"))?;
    Ok(response.into_inner().image_ref)
}

/// CRI `ImageStatus`, `None` when the node has no image under `image`.
async fn image_status(channel: Channel, image: &str) -> Result<Option<Image>> {
    let response = ImageServiceClient::new(channel)
        .image_status(ImageStatusRequest {
            image: Some(image_spec(image)),
            verbose: false,
        })
        .await
        .with_context(|| format!("CRI ImageStatus {image}"))?;
    Ok(response.into_inner().image)
}

/// CRI `ContainerStatus`.
async fn container_status(channel: Channel, container_id: &str) -> Result<ContainerStatus> {
    let response = RuntimeServiceClient::new(channel)
        .container_status(ContainerStatusRequest {
            container_id: container_id.to_string(),
            verbose: false,
        })
        .await
        .with_context(|| format!("CRI ContainerStatus {container_id}"))?;
    response
        .into_inner()
        .status
        .ok_or_else(|| anyhow!("CRI ContainerStatus {container_id}: no status"))
}

fn image_spec(image: &str) -> ImageSpec {
    ImageSpec {
        image: image.to_string(),
        ..Default::default()
    }
}

/// Root, the binaries containerd runs, and the shim: named with the package to install.
fn preflight() -> Result<()> {
    // /proc/self belongs to the effective uid.
    let uid = fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .context("reading /proc/self")?;
    if uid != 0 {
        bail!(
            "the containerd test bed must run as root (running as uid {uid}): \
             run the suite as root, e.g. `sudo scripts/test`"
        );
    }
    for (binary, package) in [("containerd-shim-runc-v2", "containerd"), ("runc", "runc")] {
        if find_in_path(binary).is_none() {
            bail!("`{binary}` not found in PATH: install the Debian package `{package}`");
        }
    }
    Ok(())
}

fn find_in_path(binary: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(binary))
        .find(|candidate| candidate.is_file())
}

/// The config of a test-bed containerd: everything under its temp dir.
fn standalone_config(runtime: Runtime, paths: &Paths, sandbox_image: &str) -> String {
    let dir = &paths.dir;
    config_toml(
        runtime,
        &CriPaths {
            root: &dir.join("root"),
            state: &dir.join("state"),
            socket: &paths.socket,
            dir,
            runc_root: &paths.runc_root,
            cni_bin: &dir.join("cni/bin"),
            cni_conf: &dir.join("cni/conf"),
            hosts: &paths.hosts,
        },
        sandbox_image,
    )
}

pub(crate) fn hosts_toml(host: &str, ca_file: Option<&Path>) -> String {
    let scheme = if ca_file.is_some() { "https" } else { "http" };
    let server = toml_str(&format!("{scheme}://{host}"));
    let mut text =
        format!("server = {server}\n\n[host.{server}]\n  capabilities = [\"pull\", \"resolve\"]\n");
    if let Some(ca) = ca_file {
        text.push_str(&format!("  ca = {}\n", toml_path(ca)));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_toml_plain_and_tls() {
        assert_eq!(
            hosts_toml("127.0.0.1:5000", None),
            "server = \"http://127.0.0.1:5000\"\n\n[host.\"http://127.0.0.1:5000\"]\n  \
             capabilities = [\"pull\", \"resolve\"]\n"
        );
        let tls = hosts_toml("localhost:5001", Some(Path::new("/t/ca.crt")));
        assert!(tls.starts_with("server = \"https://localhost:5001\"\n"));
        assert!(tls.ends_with("  ca = \"/t/ca.crt\"\n"));
    }

    #[test]
    fn config_points_everything_into_the_temp_dir() {
        let paths = Paths::new(Path::new("/tmp/warmroll-testbed-ctrd-x"));
        let config = standalone_config(Runtime::Containerd16, &paths, "127.0.0.1:1/pause:1");
        assert!(config.contains("address = \"/tmp/warmroll-testbed-ctrd-x/c.sock\""));
        assert!(config.contains("restrict_oom_score_adj = true"));
        assert!(config.contains("sandbox_image = \"127.0.0.1:1/pause:1\""));
        assert!(config.contains("config_path = \"/tmp/warmroll-testbed-ctrd-x/hosts\""));
    }
}
