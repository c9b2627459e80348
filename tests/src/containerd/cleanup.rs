//! Synchronous teardown of a test containerd (Drop cannot be async): it works inside and
//! outside a tokio runtime, and after containerd was stopped or killed.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{ListPodSandboxRequest, RemovePodSandboxRequest, StopPodSandboxRequest};
use nix::mount::{MntFlags, umount2};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::{CRI_NAMESPACE, Paths, STOP_GRACE, unix_channel};

const CRI_TEARDOWN_TIMEOUT: Duration = Duration::from_secs(60);
const PROCESS_EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Tears down everything one test containerd started; returns what went wrong (each
/// step runs even when an earlier one failed).
pub(super) fn tear_down(paths: &Paths, process: Option<Child>) -> Vec<String> {
    let mut problems = Vec::new();
    let mut note = |step: &str, result: Result<()>| {
        if let Err(e) = result {
            problems.push(format!("{step}: {e:#}"));
        }
    };
    if let Some(mut child) = process {
        let running = matches!(child.try_wait(), Ok(None));
        if running {
            note(
                "removing pod sandboxes through CRI",
                remove_all_pods(&paths.socket),
            );
        }
        note("stopping containerd", stop_child(&mut child));
    }
    note(
        "force-deleting runc containers",
        force_delete_runc_containers(&paths.runc_root.join(CRI_NAMESPACE)),
    );
    note("ending shims", end_shims(&paths.socket));
    note("unmounting", unmount_under(&paths.dir));
    problems
}

pub(super) fn signal_child(child: &Child, signal: Signal) -> Result<()> {
    let pid = i32::try_from(child.id()).context("containerd pid out of range")?;
    match kill(Pid::from_raw(pid), signal) {
        // Already exited (not yet reaped): nothing to signal.
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(e) => Err(anyhow!("sending {signal} to containerd (pid {pid}): {e}")),
    }
}

/// SIGTERM, then SIGKILL after a grace period; always reaps the child.
fn stop_child(child: &mut Child) -> Result<()> {
    signal_child(child, Signal::SIGTERM)?;
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline {
        if child
            .try_wait()
            .context("waiting for containerd")?
            .is_some()
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    signal_child(child, Signal::SIGKILL)?;
    child.wait().context("waiting for killed containerd")?;
    Err(anyhow!(
        "containerd ignored SIGTERM for {STOP_GRACE:?}; killed it"
    ))
}

/// Stops and removes every pod sandbox (and so every container) through CRI, on a
/// thread with its own runtime: the caller may be a runtime thread that must not block
/// on its own tasks.
pub(crate) fn remove_all_pods(socket: &Path) -> Result<()> {
    let socket = socket.to_path_buf();
    std::thread::spawn(move || -> Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building a runtime for CRI teardown")?;
        runtime.block_on(async {
            tokio::time::timeout(CRI_TEARDOWN_TIMEOUT, remove_all_pods_async(&socket))
                .await
                .map_err(|_| anyhow!("timed out after {CRI_TEARDOWN_TIMEOUT:?}"))?
        })
    })
    .join()
    .map_err(|_| anyhow!("CRI teardown thread panicked"))?
}

async fn remove_all_pods_async(socket: &Path) -> Result<()> {
    let mut runtime = RuntimeServiceClient::new(unix_channel(socket)?);
    let sandboxes = runtime
        .list_pod_sandbox(ListPodSandboxRequest { filter: None })
        .await
        .context("CRI ListPodSandbox")?
        .into_inner()
        .items;
    let mut errors = Vec::new();
    for sandbox in sandboxes {
        let id = sandbox.id;
        if let Err(e) = runtime
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: id.clone(),
            })
            .await
        {
            errors.push(format!("StopPodSandbox {id}: {e}"));
        }
        if let Err(e) = runtime
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: id.clone(),
            })
            .await
        {
            errors.push(format!("RemovePodSandbox {id}: {e}"));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(anyhow!(errors.join("; ")))
    }
}

/// Containers runc still has under our runc root (containerd was killed, or CRI
/// teardown failed): `runc delete --force` kills their processes and frees their state.
fn force_delete_runc_containers(runc_root: &Path) -> Result<()> {
    let entries = match fs::read_dir(runc_root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", runc_root.display())),
    };
    let mut errors = Vec::new();
    for entry in entries.flatten() {
        let id = entry.file_name();
        let output = std::process::Command::new("runc")
            .arg("--root")
            .arg(runc_root)
            .arg("delete")
            .arg("--force")
            .arg(&id)
            .output();
        match output {
            Ok(out) if out.status.success() => {}
            Ok(out) => errors.push(format!(
                "runc delete --force {}: {}",
                id.to_string_lossy(),
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            Err(e) => errors.push(format!("running runc: {e}")),
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(anyhow!(errors.join("; ")))
    }
}

/// Kills the shims started by the containerd on `socket` — found by pid through their
/// `-address <socket>` argument, nothing else — and waits until they are gone.
fn end_shims(socket: &Path) -> Result<()> {
    let socket = socket.to_string_lossy().into_owned();
    let shims: Vec<i32> = processes()
        .into_iter()
        .filter(|(_, argv)| {
            argv.windows(2)
                .any(|pair| matches!(pair, [flag, value] if flag == "-address" && *value == socket))
        })
        .map(|(pid, _)| pid)
        .collect();
    for &pid in &shims {
        // Already gone is fine.
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    wait_gone(&shims)
}

pub(crate) fn wait_gone(pids: &[i32]) -> Result<()> {
    let deadline = Instant::now() + PROCESS_EXIT_TIMEOUT;
    loop {
        let alive: Vec<i32> = pids.iter().copied().filter(|&p| is_alive(p)).collect();
        if alive.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(anyhow!("processes {alive:?} still alive after SIGKILL"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Alive and not a zombie waiting for its (foreign) parent to reap it.
pub(crate) fn is_alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// All processes with their argv.
pub(crate) fn processes() -> Vec<(i32, Vec<String>)> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let raw = fs::read(entry.path().join("cmdline")).ok()?;
            let argv = raw
                .split(|&b| b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            Some((pid, argv))
        })
        .collect()
}

/// Live processes (not zombies) whose command line mentions `path`, with their command
/// line joined by spaces: what `scripts/check-leftovers` would flag.
pub fn processes_mentioning(path: &Path) -> Vec<(i32, String)> {
    let needle = path.to_string_lossy();
    processes()
        .into_iter()
        .filter(|(pid, argv)| {
            *pid != std::process::id() as i32
                && argv.iter().any(|a| a.contains(needle.as_ref()))
                && is_alive(*pid)
        })
        .map(|(pid, argv)| (pid, argv.join(" ")))
        .collect()
}

/// Mount points at or under `dir` in our mount namespace, deepest last.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(mountinfo) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_mount_path(field)))
        .filter(|mount| mount.starts_with(dir))
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mount_path(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| b == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok());
        match octal {
            Some(decoded) => {
                out.push(decoded);
                i += 4;
            }
            None => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Lazily unmounts everything at or under `dir`, deepest first, until nothing is left.
fn unmount_under(dir: &Path) -> Result<()> {
    for _ in 0..5 {
        let mut mounts = mounts_under(dir);
        if mounts.is_empty() {
            return Ok(());
        }
        // Later mounts may sit on earlier ones: undo them in reverse order.
        mounts.reverse();
        for mount in mounts {
            // EINVAL/ENOENT: already gone with a parent's detach.
            let _ = umount2(&mount, MntFlags::MNT_DETACH);
        }
    }
    let left = mounts_under(dir);
    if left.is_empty() {
        Ok(())
    } else {
        Err(anyhow!("mounts left: {left:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_mountinfo_paths() {
        assert_eq!(unescape_mount_path(r"/tmp/a\040b"), "/tmp/a b");
        assert_eq!(unescape_mount_path(r"/tmp/a\134b"), r"/tmp/a\b");
        assert_eq!(unescape_mount_path(r"/tmp/plain\0"), r"/tmp/plain\0");
    }
}
