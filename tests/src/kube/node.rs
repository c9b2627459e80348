//! One node of the real cluster: a real containerd and a real kubelet sharing a mount
//! namespace of their own, in which this node's directories are bound at the standard
//! paths (`/run/containerd`, `/var/lib/containerd`), so pods that mount
//! `/run/containerd/containerd.sock` by hostPath reach this node's runtime; its own
//! cgroup root in every cgroup v1 hierarchy; its own CNI bridge and pod subnet in the
//! cluster's network namespace.

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::daemon::Daemon;
use super::netns::NetNs;
use super::pki::Pki;
use super::{CLUSTER_DNS, ClusterBins};
use crate::containerd::cleanup::{is_alive, processes, remove_all_pods, wait_gone};
use crate::containerd::{CriPaths, Runtime, RuntimeBinaries, config_toml, hosts_toml};

const CGROUP_FS: &str = "/sys/fs/cgroup";
const CNI_BIN: &str = "/usr/lib/cni";
/// The standard paths the node's own directories are bound at.
const RUN_CONTAINERD: &str = "/run/containerd";
const VAR_LIB_CONTAINERD: &str = "/var/lib/containerd";
const SOCKET_TIMEOUT: Duration = Duration::from_secs(60);

/// What a node is called and where it lives on the cluster network.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    pub name: String,
    pub index: u8,
    /// Its address on the cluster network (the kubelet serves there).
    pub ip: Ipv4Addr,
}

impl NodeSpec {
    pub fn new(index: u8) -> NodeSpec {
        NodeSpec {
            name: format!("node-{index}"),
            index,
            ip: Ipv4Addr::new(10, 200, 0, 10 + index),
        }
    }

    /// This node's pod subnet.
    pub fn pod_cidr(&self) -> String {
        format!("10.244.{}.0/24", self.index)
    }

    fn bridge(&self) -> String {
        format!("wr-br{}", self.index)
    }
}

/// What every node shares: the cluster's dir, network, CA and binaries (Kubernetes'
/// and containerd's), the API server's in-cluster URL, the sandbox image and the
/// registry host to trust.
pub struct NodeEnv<'a> {
    pub cluster_dir: &'a Path,
    pub net: &'a NetNs,
    pub pki: &'a Pki,
    pub bins: &'a ClusterBins,
    pub runtime: Runtime,
    pub runtime_bins: &'a RuntimeBinaries,
    pub server: &'a str,
    pub sandbox_image: &'a str,
    pub registry_host: &'a str,
}

/// A running node; dropping it tears it down.
pub struct Node {
    pub spec: NodeSpec,
    dir: PathBuf,
    cgroup_root: String,
    holder: Daemon,
    containerd: Option<Daemon>,
    kubelet: Option<Daemon>,
}

impl Node {
    /// Starts the mount namespace holder, containerd (waiting for its socket) and the
    /// kubelet, which registers itself as a Node.
    pub fn start(spec: NodeSpec, env: &NodeEnv<'_>) -> Result<Node> {
        let NodeEnv {
            cluster_dir,
            net,
            pki,
            bins,
            runtime,
            runtime_bins,
            server,
            sandbox_image,
            registry_host,
        } = *env;
        let dir = cluster_dir.join(&spec.name);
        let paths = NodePaths::new(&dir);
        for d in [
            &paths.run,
            &paths.containerd_root,
            &paths.kubelet_root,
            &paths.pod_logs,
            &paths.cni_conf,
            &paths.hosts,
            &paths.runc_root,
        ] {
            fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        for d in [RUN_CONTAINERD, VAR_LIB_CONTAINERD] {
            // The mount points; on the host they stay empty.
            fs::create_dir_all(d).with_context(|| format!("creating {d}"))?;
        }
        let cgroup_root = format!(
            "/{}{}-{}",
            crate::scratch::TESTBED_PREFIX,
            std::process::id(),
            spec.name
        );
        create_cgroups(&cgroup_root)?;

        let mut command = net.command("unshare");
        command
            .args(["--mount", "--propagation", "private", "--", "bash", "-c"])
            .arg(format!(
                r#"mount --bind "$1" {RUN_CONTAINERD} && mount --bind "$2" {VAR_LIB_CONTAINERD} && exec -a "$0" sleep infinity"#
            ))
            .arg(dir.join("mntns-holder"))
            .arg(&paths.run)
            .arg(&paths.containerd_root);
        let holder = Daemon::spawn(
            &format!("{} mount namespace holder", spec.name),
            command,
            &dir.join("mntns-holder.log"),
        )?;
        let mut node = Node {
            spec,
            dir,
            cgroup_root,
            holder,
            containerd: None,
            kubelet: None,
        };
        node.wait_holder()?;

        let trust = paths.hosts.join(registry_host);
        fs::create_dir_all(&trust).with_context(|| format!("creating {}", trust.display()))?;
        write(&trust.join("hosts.toml"), &hosts_toml(registry_host, None))?;
        write(
            &paths.cni_conf.join("10-warmroll.conflist"),
            &cni_conflist(&node.spec, &paths),
        )?;
        write(
            &paths.containerd_config,
            &config_toml(
                runtime,
                &CriPaths {
                    root: Path::new(VAR_LIB_CONTAINERD),
                    state: &Path::new(RUN_CONTAINERD).join("state"),
                    socket: &Path::new(RUN_CONTAINERD).join("containerd.sock"),
                    dir: &node.dir,
                    runc_root: &paths.runc_root,
                    cni_bin: Path::new(CNI_BIN),
                    cni_conf: &paths.cni_conf,
                    hosts: &paths.hosts,
                },
                sandbox_image,
            ),
        )?;
        let mut containerd = node.command(&runtime_bins.containerd);
        containerd.arg("--config").arg(&paths.containerd_config);
        if let Some(path) = runtime_bins.path_env() {
            // containerd starts its own release's runc shim, found on PATH.
            containerd.env("PATH", path);
        }
        node.containerd = Some(Daemon::spawn(
            &format!("{} containerd", node.spec.name),
            containerd,
            &node.dir.join("containerd.log"),
        )?);
        node.wait_socket(&paths.socket())?;

        let cert = pki.issue(
            &format!("{}-kubelet", node.spec.name),
            &format!("system:node:{}", node.spec.name),
            Some("system:nodes"),
            &[&node.spec.name, &node.spec.ip.to_string()],
        )?;
        let kubeconfig = pki.kubeconfig(
            &format!("{}-kubelet-client", node.spec.name),
            server,
            &format!("system:node:{}", node.spec.name),
            Some("system:nodes"),
        )?;
        write(&paths.resolv_conf, &format!("nameserver {CLUSTER_DNS}\n"))?;
        write(
            &paths.kubelet_config,
            &kubelet_config(
                &node.spec,
                &node.cgroup_root,
                &pki.ca_file,
                &cert.cert,
                &cert.key,
                &paths,
            ),
        )?;
        let mut kubelet = node.command(&bins.kubelet);
        kubelet
            .arg(format!("--config={}", paths.kubelet_config.display()))
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!("--hostname-override={}", node.spec.name))
            .arg(format!("--node-ip={}", node.spec.ip))
            .arg(format!("--root-dir={}", paths.kubelet_root.display()))
            .arg("--v=1");
        node.kubelet = Some(Daemon::spawn(
            &format!("{} kubelet", node.spec.name),
            kubelet,
            &node.dir.join("kubelet.log"),
        )?);
        Ok(node)
    }

    /// `program` run in this node's mount namespace and the cluster's network.
    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let pid = self.holder.pid().unwrap_or(0);
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/proc/{pid}/ns/net"))
            .arg(format!("--mount=/proc/{pid}/ns/mnt"))
            .arg("--")
            .arg(program);
        command
    }

    /// The CRI socket as the host sees it (the node sees it at the standard path).
    pub fn cri_socket(&self) -> PathBuf {
        NodePaths::new(&self.dir).socket()
    }

    /// Where the kubelet writes container logs (`<ns>_<pod>_<uid>/<container>/N.log`).
    pub fn pod_logs(&self) -> PathBuf {
        NodePaths::new(&self.dir).pod_logs
    }

    /// The kubelet's and containerd's last log lines, for error messages.
    pub fn log_tails(&self) -> String {
        [&self.kubelet, &self.containerd]
            .into_iter()
            .flatten()
            .map(|d| {
                format!(
                    "--- {} ({}):\n{}",
                    d.name(),
                    d.log_path().display(),
                    d.log_tail()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// An error naming the process when the kubelet or containerd has exited.
    pub fn check_running(&mut self) -> Result<()> {
        for daemon in [&mut self.kubelet, &mut self.containerd]
            .into_iter()
            .flatten()
        {
            daemon.check_running()?;
        }
        Ok(())
    }

    fn wait_holder(&mut self) -> Result<()> {
        let pid = self
            .holder
            .pid()
            .ok_or_else(|| anyhow!("{} holder has no pid", self.spec.name))?;
        let marker = self.dir.join("mntns-holder");
        let deadline = Instant::now() + SOCKET_TIMEOUT;
        loop {
            self.holder.check_running()?;
            // Its argv becomes the marker once both binds are made.
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if cmdline.starts_with(marker.to_string_lossy().as_bytes()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{}: the mount namespace was not set up", self.spec.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_socket(&mut self, socket: &Path) -> Result<()> {
        let deadline = Instant::now() + SOCKET_TIMEOUT;
        while !socket.exists() {
            if let Some(containerd) = &mut self.containerd {
                containerd.check_running()?;
            }
            if Instant::now() > deadline {
                bail!(
                    "{}: containerd did not create {} within {SOCKET_TIMEOUT:?}\n{}",
                    self.spec.name,
                    socket.display(),
                    self.log_tails()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Stops the kubelet, removes every pod through CRI, stops containerd, kills what
    /// is left in the node's namespace and cgroups, and removes the cgroups.
    fn tear_down(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut note = |step: &str, result: Result<()>| {
            if let Err(e) = result {
                problems.push(format!("{} {step}: {e:#}", self.spec.name));
            }
        };
        if let Some(mut kubelet) = self.kubelet.take() {
            note("stopping the kubelet", kubelet.stop());
        }
        let socket = self.cri_socket();
        if let Some(mut containerd) = self.containerd.take() {
            if containerd.check_running().is_ok() && socket.exists() {
                note("removing pods through CRI", remove_all_pods(&socket));
            }
            note("stopping containerd", containerd.stop());
        }
        note("killing what is left", self.kill_remaining());
        note("stopping the namespace holder", self.holder.stop());
        note("removing cgroups", remove_cgroups(&self.cgroup_root));
        problems
    }

    /// Kills processes in this node's mount namespace (shims) or cgroups (containers).
    fn kill_remaining(&self) -> Result<()> {
        let holder = self.holder.pid().map(|p| p as i32);
        let ns = holder
            .map(|p| fs::read_link(format!("/proc/{p}/ns/mnt")))
            .transpose()
            .context("reading the holder's mount namespace")?;
        let mut pids = Vec::new();
        for (pid, _) in processes() {
            if Some(pid) == holder || !is_alive(pid) {
                continue;
            }
            let in_ns = ns.is_some() && fs::read_link(format!("/proc/{pid}/ns/mnt")).ok() == ns;
            let in_cgroup = fs::read_to_string(format!("/proc/{pid}/cgroup"))
                .is_ok_and(|c| c.contains(&self.cgroup_root));
            if in_ns || in_cgroup {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                pids.push(pid);
            }
        }
        wait_gone(&pids)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for problem in self.tear_down() {
            eprintln!("warning: {problem}");
        }
    }
}

struct NodePaths {
    run: PathBuf,
    containerd_root: PathBuf,
    containerd_config: PathBuf,
    kubelet_root: PathBuf,
    kubelet_config: PathBuf,
    pod_logs: PathBuf,
    cni_conf: PathBuf,
    cni_ipam: PathBuf,
    hosts: PathBuf,
    runc_root: PathBuf,
    resolv_conf: PathBuf,
}

impl NodePaths {
    fn new(dir: &Path) -> NodePaths {
        NodePaths {
            run: dir.join("run"),
            containerd_root: dir.join("containerd"),
            containerd_config: dir.join("containerd.toml"),
            kubelet_root: dir.join("kubelet"),
            kubelet_config: dir.join("kubelet.yaml"),
            pod_logs: dir.join("pod-logs"),
            cni_conf: dir.join("cni"),
            cni_ipam: dir.join("cni-ipam"),
            hosts: dir.join("hosts"),
            runc_root: dir.join("runc"),
            resolv_conf: dir.join("resolv.conf"),
        }
    }

    fn socket(&self) -> PathBuf {
        self.run.join("containerd.sock")
    }
}

fn write(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn cni_conflist(spec: &NodeSpec, paths: &NodePaths) -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": format!("warmroll-{}", spec.name),
        "plugins": [{
            "type": "bridge",
            "bridge": spec.bridge(),
            "isGateway": true,
            "ipMasq": false,
            "hairpinMode": true,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": spec.pod_cidr()}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": paths.cni_ipam,
            },
        }],
    })
    .to_string()
}

fn kubelet_config(
    spec: &NodeSpec,
    cgroup_root: &str,
    ca: &Path,
    cert: &Path,
    key: &Path,
    paths: &NodePaths,
) -> String {
    serde_json::json!({
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": spec.ip.to_string(),
        "port": 10250,
        "healthzPort": 0,
        "readOnlyPort": 0,
        "authentication": {
            "anonymous": {"enabled": false},
            "webhook": {"enabled": true},
            "x509": {"clientCAFile": ca},
        },
        "authorization": {"mode": "Webhook"},
        "tlsCertFile": cert,
        "tlsPrivateKeyFile": key,
        "cgroupDriver": "cgroupfs",
        // Test-bed concession: this machine's kernel is cgroup v1, which kubelets from
        // 1.35 refuse unless told otherwise (KEP-5573). Clusters people run are v2.
        "failCgroupV1": false,
        "cgroupRoot": cgroup_root,
        "failSwapOn": false,
        "containerRuntimeEndpoint": format!("unix://{RUN_CONTAINERD}/containerd.sock"),
        "clusterDNS": [CLUSTER_DNS],
        "clusterDomain": "cluster.local",
        "resolvConf": paths.resolv_conf,
        "podLogsDir": paths.pod_logs,
        // A test machine's disks are small and shared: never evict, never collect images.
        "evictionHard": {
            "memory.available": "1Mi",
            "nodefs.available": "1%",
            "nodefs.inodesFree": "1%",
            "imagefs.available": "1%",
        },
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "serializeImagePulls": false,
        "maxPods": 40,
        "kernelMemcgNotification": false,
        "makeIPTablesUtilChains": false,
        "nodeStatusReportFrequency": "10s",
    })
    .to_string()
}

/// The cgroup hierarchies mounted under /sys/fs/cgroup (symlinks
/// such as `cpu,cpuacct` aside).
fn hierarchies() -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(CGROUP_FS).with_context(|| format!("reading {CGROUP_FS}"))? {
        let entry = entry.with_context(|| format!("reading {CGROUP_FS}"))?;
        let kind = entry
            .file_type()
            .with_context(|| format!("reading {CGROUP_FS}"))?;
        if kind.is_dir() {
            out.push(entry.path());
        }
    }
    if out.is_empty() {
        bail!("no cgroup v1 hierarchy under {CGROUP_FS}");
    }
    Ok(out)
}

/// The kubelet wants its cgroup root to exist in every hierarchy; cpuset cgroups need
/// their cpus and mems before anything can join them.
fn create_cgroups(root: &str) -> Result<()> {
    for hierarchy in hierarchies()? {
        let dir = hierarchy.join(root.trim_start_matches('/'));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for file in ["cpuset.cpus", "cpuset.mems"] {
            let parent = hierarchy.join(file);
            if parent.exists() {
                let value = fs::read_to_string(&parent)
                    .with_context(|| format!("reading {}", parent.display()))?;
                write(&dir.join(file), &value)?;
            }
        }
    }
    Ok(())
}

/// Removes the cgroup root and everything under it in every hierarchy, deepest first.
fn remove_cgroups(root: &str) -> Result<()> {
    let mut errors = Vec::new();
    for hierarchy in hierarchies()? {
        let dir = hierarchy.join(root.trim_start_matches('/'));
        if dir.exists()
            && let Err(e) = remove_cgroup_tree(&dir)
        {
            errors.push(format!("{}: {e:#}", dir.display()));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(anyhow!(errors.join("; ")))
    }
}

fn remove_cgroup_tree(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup_tree(&entry.path())?;
        }
    }
    // A cgroup whose last process just died may be busy for a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(anyhow!("removing {}: {e}", dir.display()));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_get_distinct_addresses_subnets_and_bridges() {
        let (a, b) = (NodeSpec::new(0), NodeSpec::new(1));
        assert_eq!(a.name, "node-0");
        assert_ne!(a.ip, b.ip);
        assert_eq!(b.pod_cidr(), "10.244.1.0/24");
        assert_ne!(a.bridge(), b.bridge());
    }

    #[test]
    fn kubelet_config_uses_the_node_address_cgroup_root_and_standard_socket() {
        let spec = NodeSpec::new(2);
        let paths = NodePaths::new(Path::new("/t/node-2"));
        let config: serde_json::Value = serde_json::from_str(&kubelet_config(
            &spec,
            "/warmroll-testbed-1-node-2",
            Path::new("/t/ca.crt"),
            Path::new("/t/k.crt"),
            Path::new("/t/k.key"),
            &paths,
        ))
        .unwrap();
        assert_eq!(config["address"], "10.200.0.12");
        assert_eq!(config["cgroupRoot"], "/warmroll-testbed-1-node-2");
        assert_eq!(
            config["containerRuntimeEndpoint"],
            "unix:///run/containerd/containerd.sock"
        );
        assert_eq!(config["podLogsDir"], "/t/node-2/pod-logs");
        assert_eq!(config["failCgroupV1"], false, "this machine is cgroup v1");
    }
}
