//! warmroll's own images, built from the release binaries without a Docker engine, for
//! tests on a real cluster: the cluster pulls them from a test [`Registry`] like any image.
//!
//! `Dockerfile` stays the release path (static musl binaries on distroless). These
//! images hold what the release images hold where it matters to the binaries: the
//! binary at `/usr/local/bin/<name>` as the entrypoint, `Cmd ["run"]`, the agent as root
//! and the coordinator as `65532:65532`, `/etc/passwd` and `/etc/group` naming both, `/tmp`
//! and the CA bundle; since the host's release binaries link glibc, also the shared
//! libraries `ldd` lists (see [`ImageBuilder::push_binary`]).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};

use crate::image::{BinaryImage, ImageBuilder, NONROOT, Pushed};
use crate::registry::Registry;

/// The binaries' names, which are also their repositories in the registry.
pub const AGENT: &str = "warmroll-agent";
pub const COORDINATOR: &str = "warmroll-coordinator";

/// What builds the binaries [`push_warmroll_images`] needs (`scripts/test` runs it).
const RELEASE_BUILD: &str =
    "cargo build --release --locked -p warmroll-agent -p warmroll-coordinator";

/// Both warmroll images as pushed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WarmrollImages {
    pub agent: Pushed,
    pub coordinator: Pushed,
}

/// Pushes `warmroll-agent:<tag>` and `warmroll-coordinator:<tag>` built from the release
/// binaries (see [`release_dir`]) to `registry`. Fails naming the missing path and
/// [`RELEASE_BUILD`] when a binary has not been built.
pub async fn push_warmroll_images(registry: &Registry, tag: &str) -> Result<WarmrollImages> {
    let builder = ImageBuilder::new(registry)?;
    let dir = release_dir()?;
    let agent = BinaryImage {
        binary: release_binary(&dir, AGENT)?,
        // As the Dockerfile: the agent talks to the root-owned CRI socket.
        user: None,
        cmd: vec!["run".into()],
    };
    let coordinator = BinaryImage {
        binary: release_binary(&dir, COORDINATOR)?,
        user: Some(format!("{NONROOT}:{NONROOT}")),
        cmd: vec!["run".into()],
    };
    Ok(WarmrollImages {
        agent: builder
            .push_binary(AGENT, tag, &agent)
            .await
            .with_context(|| format!("pushing the {AGENT} image"))?,
        coordinator: builder
            .push_binary(COORDINATOR, tag, &coordinator)
            .await
            .with_context(|| format!("pushing the {COORDINATOR} image"))?,
    })
}

/// Where cargo puts release binaries: `$CARGO_TARGET_DIR/release` (a relative
/// `CARGO_TARGET_DIR` taken from the workspace root, where `scripts/test` runs cargo),
/// else `<workspace>/target/release`.
fn release_dir() -> Result<PathBuf> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow!("the tests crate has no parent directory"))?;
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => workspace.join(dir),
        _ => workspace.join("target"),
    };
    Ok(target.join("release"))
}

/// The release `warmroll-coordinator`, for running its commands against a cluster.
pub fn release_coordinator() -> Result<PathBuf> {
    release_binary(&release_dir()?, "warmroll-coordinator")
}

fn release_binary(dir: &Path, name: &str) -> Result<PathBuf> {
    let binary = dir.join(name);
    if !binary.is_file() {
        bail!(
            "the release binary {} is missing: build it first with `{RELEASE_BUILD}` \
             (scripts/test does), with the same CARGO_TARGET_DIR",
            binary.display()
        );
    }
    Ok(binary)
}
