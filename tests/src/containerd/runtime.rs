//! Which containerd the test bed runs, where its binaries are, and its config.
//!
//! Two releases, each in the configuration people run it with: Debian's containerd 1.6
//! (config version 2, the `io.containerd.grpc.v1.cri` plugin) and containerd 2.x built
//! from the Go module proxy by `scripts/build-containerd` (config version 3, the
//! `io.containerd.cri.v1.images` / `io.containerd.cri.v1.runtime` plugins, pulls through
//! the transfer service unless [`Runtime::Containerd2LocalPull`] asks for the old local
//! pull path). The agent's containerd tests run their bodies on each
//! ([`crate::on_each_runtime!`]); the real cluster's nodes run containerd 2.x.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

/// The containerd 2.x release `scripts/build-containerd` builds (see
/// `docs/real-kubernetes.md`).
pub const CONTAINERD2_RELEASE: &str = "v2.3.7";
/// Where `scripts/test` says the containerd 2.x binaries are; else the build script's
/// default cache.
pub const CONTAINERD2_BIN_ENV: &str = "WARMROLL_CONTAINERD_BIN";
const CONTAINERD2_CACHE: &str = "/var/cache/warmroll/containerd";
/// Debian's containerd 1.6 (package `containerd`).
const DEBIAN_CONTAINERD: &str = "/usr/bin/containerd";

/// A containerd release and configuration the test bed can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    /// Debian's containerd 1.6 (`/usr/bin/containerd`), config version 2.
    Containerd16,
    /// containerd 2.x in its default configuration: config version 3, registry hosts
    /// in `hosts.toml` under `config_path`, CRI pulls through the transfer service.
    Containerd2,
    /// containerd 2.x with `use_local_image_pull = true`: CRI pulls take the old local
    /// path, as they do wherever `discard_unpacked_layers = true` (EKS's and kind's
    /// templates) or another setting forces it.
    Containerd2LocalPull,
}

impl Runtime {
    /// Every runtime the agent's containerd tests run on.
    pub const ALL: [Runtime; 3] = [
        Runtime::Containerd16,
        Runtime::Containerd2,
        Runtime::Containerd2LocalPull,
    ];

    /// The containerd binary and the dir whose shim it must find first on PATH.
    /// Fails naming what to install or build when it is missing.
    pub fn binaries(self) -> Result<RuntimeBinaries> {
        match self {
            Runtime::Containerd16 => {
                if !Path::new(DEBIAN_CONTAINERD).is_file() {
                    bail!("{DEBIAN_CONTAINERD} not found: install the Debian package `containerd`");
                }
                Ok(RuntimeBinaries {
                    containerd: PathBuf::from(DEBIAN_CONTAINERD),
                    shim_dir: None,
                })
            }
            Runtime::Containerd2 | Runtime::Containerd2LocalPull => {
                let dir = match std::env::var_os(CONTAINERD2_BIN_ENV) {
                    Some(dir) if !dir.is_empty() => PathBuf::from(dir),
                    _ => Path::new(CONTAINERD2_CACHE)
                        .join(CONTAINERD2_RELEASE)
                        .join("bin"),
                };
                for binary in ["containerd", "containerd-shim-runc-v2"] {
                    let path = dir.join(binary);
                    if !path.is_file() {
                        bail!(
                            "{self:?} needs {}, which is missing: build containerd \
                             {CONTAINERD2_RELEASE} with `scripts/build-containerd` \
                             (scripts/test does) or point {CONTAINERD2_BIN_ENV} at its bin dir",
                            path.display()
                        );
                    }
                }
                Ok(RuntimeBinaries {
                    containerd: dir.join("containerd"),
                    shim_dir: Some(dir),
                })
            }
        }
    }

    /// Whether this is a containerd 2.x.
    pub fn is_v2(self) -> bool {
        !matches!(self, Runtime::Containerd16)
    }
}

/// Where one runtime's binaries are.
#[derive(Clone, Debug)]
pub struct RuntimeBinaries {
    pub containerd: PathBuf,
    /// Put first on PATH for containerd, so it starts its own release's runc shim
    /// (`None`: the shim on PATH, Debian's).
    pub shim_dir: Option<PathBuf>,
}

impl RuntimeBinaries {
    /// The PATH containerd runs with.
    pub fn path_env(&self) -> Option<OsString> {
        let dir = self.shim_dir.as_ref()?;
        let mut dirs = vec![dir.clone()];
        if let Some(path) = std::env::var_os("PATH") {
            dirs.extend(std::env::split_paths(&path));
        }
        std::env::join_paths(dirs).ok()
    }
}

/// Runs the body `async fn name(runtime: Runtime)` of each named test once per runtime,
/// as tests `containerd_1_6::name`, `containerd_2::name` and (for those listed after
/// `local_pull:`) `containerd_2_local_pull::name`:
///
/// ```ignore
/// warmroll_tests::on_each_runtime!(warm_moves_the_tag; local_pull: progress_is_reported);
/// ```
#[macro_export]
macro_rules! on_each_runtime {
    ($($name:ident),* $(,)? $(; local_pull: $($local:ident),* $(,)?)?) => {
        mod containerd_1_6 {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name($crate::containerd::Runtime::Containerd16).await
                }
            )*
            $($(
                #[tokio::test]
                async fn $local() {
                    super::$local($crate::containerd::Runtime::Containerd16).await
                }
            )*)?
        }
        mod containerd_2 {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name($crate::containerd::Runtime::Containerd2).await
                }
            )*
            $($(
                #[tokio::test]
                async fn $local() {
                    super::$local($crate::containerd::Runtime::Containerd2).await
                }
            )*)?
        }
        $(
            mod containerd_2_local_pull {
                $(
                    #[tokio::test]
                    async fn $local() {
                        super::$local($crate::containerd::Runtime::Containerd2LocalPull).await
                    }
                )*
            }
        )?
    };
}

/// Where one containerd keeps everything, for [`config_toml`].
pub(crate) struct CriPaths<'a> {
    pub root: &'a Path,
    pub state: &'a Path,
    pub socket: &'a Path,
    pub dir: &'a Path,
    pub runc_root: &'a Path,
    pub cni_bin: &'a Path,
    pub cni_conf: &'a Path,
    pub hosts: &'a Path,
}

/// The config of one test containerd of `runtime`: everything under its own dirs.
pub(crate) fn config_toml(runtime: Runtime, paths: &CriPaths<'_>, sandbox_image: &str) -> String {
    match runtime {
        Runtime::Containerd16 => config_v2(paths, sandbox_image),
        Runtime::Containerd2 => config_v3(paths, sandbox_image, false),
        Runtime::Containerd2LocalPull => config_v3(paths, sandbox_image, true),
    }
}

/// A TOML basic string.
pub(crate) fn toml_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

pub(crate) fn toml_path(p: &Path) -> String {
    toml_str(&p.to_string_lossy())
}

/// containerd 1.6 (config version 2); `dir` holds the ttrpc socket and the `opt` dir.
fn config_v2(paths: &CriPaths<'_>, sandbox_image: &str) -> String {
    let dir = paths.dir;
    let cri = r#"plugins."io.containerd.grpc.v1.cri""#;
    format!(
        r#"version = 2
root = {root}
state = {state}
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = {socket}

[ttrpc]
  address = {ttrpc}

[plugins."io.containerd.internal.v1.opt"]
  path = {opt}

[{cri}]
  sandbox_image = {sandbox_image}
  # Lowering oom_score_adj is denied here; without this every RunPodSandbox fails.
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[{cri}.containerd.runtimes.runc.options]
  # Our own runc state, so cleanup can force-delete what containerd left behind.
  Root = {runc_root}

[{cri}.cni]
  bin_dir = {cni_bin}
  conf_dir = {cni_conf}

[{cri}.registry]
  config_path = {hosts}
"#,
        root = toml_path(paths.root),
        state = toml_path(paths.state),
        socket = toml_path(paths.socket),
        ttrpc = toml_path(&dir.join("c.sock.ttrpc")),
        opt = toml_path(&dir.join("opt")),
        sandbox_image = toml_str(sandbox_image),
        runc_root = toml_path(paths.runc_root),
        cni_bin = toml_path(paths.cni_bin),
        cni_conf = toml_path(paths.cni_conf),
        hosts = toml_path(paths.hosts),
    )
}

/// containerd 2.x (config version 3) in its defaults, but for what one machine running
/// several containerds needs: its own paths (sockets, NRI socket, runc root) and this
/// machine's `restrict_oom_score_adj`. Pulls go through the transfer service unless
/// `local_pull`.
fn config_v3(paths: &CriPaths<'_>, sandbox_image: &str, local_pull: bool) -> String {
    let dir = paths.dir;
    let images = "plugins.'io.containerd.cri.v1.images'";
    let runtime = "plugins.'io.containerd.cri.v1.runtime'";
    let local_pull = if local_pull {
        "  # The old local pull path instead of the transfer service.\n  \
         use_local_image_pull = true\n"
    } else {
        ""
    };
    format!(
        r#"version = 3
root = {root}
state = {state}
disabled_plugins = [
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = {socket}

[ttrpc]
  address = {ttrpc}

[plugins.'io.containerd.nri.v1.nri']
  # One NRI socket per containerd (the default path is shared by all).
  socket_path = {nri}

[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

[{images}]
  snapshotter = "overlayfs"
{local_pull}
[{images}.pinned_images]
  sandbox = {sandbox_image}

[{images}.registry]
  config_path = {hosts}

[{runtime}]
  # Lowering oom_score_adj is denied here; without this every RunPodSandbox fails.
  restrict_oom_score_adj = true

[{runtime}.containerd]
  default_runtime_name = "runc"

[{runtime}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[{runtime}.containerd.runtimes.runc.options]
  # Our own runc state, so cleanup can force-delete what containerd left behind.
  Root = {runc_root}

[{runtime}.cni]
  bin_dirs = [{cni_bin}]
  conf_dir = {cni_conf}
"#,
        root = toml_path(paths.root),
        state = toml_path(paths.state),
        socket = toml_path(paths.socket),
        ttrpc = toml_path(&dir.join("c.sock.ttrpc")),
        nri = toml_path(&dir.join("nri.sock")),
        sandbox_image = toml_str(sandbox_image),
        runc_root = toml_path(paths.runc_root),
        cni_bin = toml_path(paths.cni_bin),
        cni_conf = toml_path(paths.cni_conf),
        hosts = toml_path(paths.hosts),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(dir: &Path) -> (PathBuf, PathBuf, PathBuf, PathBuf, PathBuf) {
        (
            dir.join("root"),
            dir.join("state"),
            dir.join("c.sock"),
            dir.join("runc"),
            dir.join("hosts"),
        )
    }

    fn config(runtime: Runtime) -> String {
        let dir = Path::new("/tmp/warmroll-testbed-ctrd-x");
        let (root, state, socket, runc_root, hosts) = paths(dir);
        config_toml(
            runtime,
            &CriPaths {
                root: &root,
                state: &state,
                socket: &socket,
                dir,
                runc_root: &runc_root,
                cni_bin: Path::new("/usr/lib/cni"),
                cni_conf: &dir.join("cni"),
                hosts: &hosts,
            },
            "127.0.0.1:1/pause:1",
        )
    }

    #[test]
    fn each_release_gets_its_own_config_version_and_plugin_ids() {
        let old = config(Runtime::Containerd16);
        assert!(old.starts_with("version = 2\n"));
        assert!(old.contains(r#"[plugins."io.containerd.grpc.v1.cri"]"#));
        assert!(old.contains("sandbox_image = \"127.0.0.1:1/pause:1\""));

        let new = config(Runtime::Containerd2);
        assert!(new.starts_with("version = 3\n"));
        assert!(new.contains("[plugins.'io.containerd.cri.v1.images'.pinned_images]"));
        assert!(new.contains("sandbox = \"127.0.0.1:1/pause:1\""));
        assert!(new.contains("config_path = \"/tmp/warmroll-testbed-ctrd-x/hosts\""));
        assert!(
            !new.contains("use_local_image_pull"),
            "default: transfer service"
        );
        assert!(config(Runtime::Containerd2LocalPull).contains("use_local_image_pull = true"));
        for config in [old, new] {
            assert!(config.contains("restrict_oom_score_adj = true"));
            assert!(config.contains("address = \"/tmp/warmroll-testbed-ctrd-x/c.sock\""));
        }
    }
}
