//! A real Kubernetes cluster on this machine, built from the official sources
//! (`scripts/build-kubernetes`): etcd, kube-apiserver, kube-controller-manager,
//! kube-scheduler, kube-proxy, CoreDNS and N nodes, each a real kubelet with its own
//! real containerd 2.x in its default configuration (`scripts/build-containerd`; see
//! [`node`]).
//!
//! Everything runs in one network namespace of its own ([`netns`]) with private
//! addresses: the control plane on `10.200.0.1` (the API server on :6443, CoreDNS on
//! :53, and the test registry relayed from the host's loopback on the port it has
//! there), node `i` on `10.200.0.(10+i)` with pods on `10.244.i.0/24` behind its own
//! bridge, Services on `10.96.0.0/16` through kube-proxy's iptables rules. The host
//! reaches the API server through a loopback relay ([`KubeCluster::client`],
//! [`KubeCluster::kubeconfig`]), and any address inside through
//! [`KubeCluster::forward`].
//!
//! The API server writes an audit log of every request made by a ServiceAccount
//! ([`KubeCluster::audit`]), so tests can count what warmroll's pods wrote.
//!
//! Dropping the guard stops every node (pods removed through CRI, leftovers killed,
//! cgroups removed), then the control plane, then the namespace, and deletes the dir.

mod audit;
mod daemon;
pub mod helm;
mod netns;
mod node;
mod pki;
pub mod warmroll;

use std::fs;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::core::v1::Node as NodeObject;
use kube::api::ListParams;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};
use tempfile::TempDir;

pub use audit::AuditEvent;
use daemon::Daemon;
use netns::NetNs;
pub use node::Node;
use node::{NodeEnv, NodeSpec};
use pki::Pki;

use crate::containerd::Runtime;
use crate::image::ImageBuilder;
use crate::registry::Registry;
use crate::scratch;

/// The release `scripts/build-kubernetes` builds (see `docs/real-kubernetes.md`).
pub const KUBE_RELEASE: &str = "v1.36.3";
/// What every node runs under its kubelet (see `docs/real-kubernetes.md`).
pub const NODE_RUNTIME: Runtime = Runtime::Containerd2;
/// Where `scripts/test` says the binaries are; else the build script's default cache.
pub const KUBE_BIN_ENV: &str = "WARMROLL_KUBE_BIN";
const DEFAULT_CACHE: &str = "/var/cache/warmroll/kubernetes";

/// The control plane's address on the cluster network.
pub const CONTROL_PLANE_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
/// CoreDNS, on the control plane's address.
pub const CLUSTER_DNS: &str = "10.200.0.1";
const APISERVER_PORT: u16 = 6443;
const SERVICE_CIDR: &str = "10.96.0.0/16";
/// The `kubernetes` Service's ClusterIP (first of the range).
const KUBERNETES_SERVICE_IP: &str = "10.96.0.1";
const CLUSTER_CIDR: &str = "10.244.0.0/16";
const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

const SANDBOX_REPO: &str = "warmroll/pause";
const SANDBOX_TAG: &str = "1";

const APISERVER_TIMEOUT: Duration = Duration::from_secs(120);
const NODES_READY_TIMEOUT: Duration = Duration::from_secs(180);

/// The official binaries, from [`KUBE_BIN_ENV`] or the build script's cache.
#[derive(Clone, Debug)]
pub struct ClusterBins {
    pub dir: PathBuf,
    pub etcd: PathBuf,
    pub kube_apiserver: PathBuf,
    pub kube_controller_manager: PathBuf,
    pub kube_scheduler: PathBuf,
    pub kube_proxy: PathBuf,
    pub kubelet: PathBuf,
    pub coredns: PathBuf,
}

impl ClusterBins {
    /// Fails naming the missing binary and the command that builds it.
    pub fn locate() -> Result<ClusterBins> {
        let dir = match std::env::var_os(KUBE_BIN_ENV) {
            Some(dir) if !dir.is_empty() => PathBuf::from(dir),
            _ => Path::new(DEFAULT_CACHE).join(KUBE_RELEASE).join("bin"),
        };
        let bin = |name: &str| -> Result<PathBuf> {
            let path = dir.join(name);
            if path.is_file() {
                Ok(path)
            } else {
                bail!(
                    "the real cluster needs {}, which is missing: build Kubernetes \
                     {KUBE_RELEASE} with `scripts/build-kubernetes` (scripts/test does) \
                     or point {KUBE_BIN_ENV} at its bin dir",
                    path.display()
                )
            }
        };
        Ok(ClusterBins {
            etcd: bin("etcd")?,
            kube_apiserver: bin("kube-apiserver")?,
            kube_controller_manager: bin("kube-controller-manager")?,
            kube_scheduler: bin("kube-scheduler")?,
            kube_proxy: bin("kube-proxy")?,
            kubelet: bin("kubelet")?,
            coredns: bin("coredns")?,
            dir,
        })
    }
}

/// A running cluster. See the module docs.
pub struct KubeCluster {
    nodes: Vec<Node>,
    /// Stopped in reverse order after the nodes.
    control_plane: Vec<Daemon>,
    net: NetNs,
    pki: Pki,
    kubeconfig: PathBuf,
    audit_log: PathBuf,
    registry_host: String,
    host_registry: String,
    version: String,
    runtime_version: String,
    dir: Option<TempDir>,
}

impl KubeCluster {
    /// Starts a cluster of `nodes` nodes that pulls from `registry` (plain HTTP, as the
    /// test bed's registries are), and waits until every node is Ready.
    pub async fn start(registry: &Registry, nodes: u8) -> Result<KubeCluster> {
        preflight()?;
        let bins = ClusterBins::locate()?;
        let runtime_bins = NODE_RUNTIME.binaries()?;
        let dir = scratch::temp_dir("kube")?;
        let root = dir.path().to_path_buf();
        let pki = Pki::create(&root.join("pki"))?;
        let net = NetNs::create(&root)?;
        let registry_port = registry
            .host()
            .rsplit_once(':')
            .and_then(|(_, port)| port.parse::<u16>().ok())
            .ok_or_else(|| anyhow!("registry host {} has no port", registry.host()))?;
        let mut cluster = KubeCluster {
            nodes: Vec::new(),
            control_plane: Vec::new(),
            net,
            pki,
            kubeconfig: root.join("pki/admin.kubeconfig"),
            audit_log: root.join("audit.log"),
            registry_host: format!("{CONTROL_PLANE_IP}:{registry_port}"),
            host_registry: registry.host().to_string(),
            version: String::new(),
            runtime_version: String::new(),
            dir: Some(dir),
        };
        let specs: Vec<NodeSpec> = (0..nodes).map(NodeSpec::new).collect();
        cluster
            .net
            .run("setting up the cluster network", &network_script(&specs))?;
        cluster
            .net
            .relay_out(
                SocketAddr::V4(SocketAddrV4::new(CONTROL_PLANE_IP, registry_port)),
                SocketAddr::from(([127, 0, 0, 1], registry_port)),
            )
            .await?;
        cluster.start_control_plane(&bins, &root).await?;

        let sandbox = ImageBuilder::new(registry)?
            .push(SANDBOX_REPO, SANDBOX_TAG)
            .await
            .context("pushing the pod sandbox image")?;
        let sandbox_image = cluster.image_ref(&sandbox.reference);
        let server = format!("https://{CONTROL_PLANE_IP}:{APISERVER_PORT}");
        for spec in specs {
            let env = NodeEnv {
                cluster_dir: &root,
                net: &cluster.net,
                pki: &cluster.pki,
                bins: &bins,
                runtime: NODE_RUNTIME,
                runtime_bins: &runtime_bins,
                server: &server,
                sandbox_image: &sandbox_image,
                registry_host: &cluster.registry_host,
            };
            let node = Node::start(spec, &env)?;
            cluster.nodes.push(node);
        }
        cluster.wait_nodes_ready().await?;
        Ok(cluster)
    }

    async fn start_control_plane(&mut self, bins: &ClusterBins, root: &Path) -> Result<()> {
        let pki = &self.pki;
        let internal = format!("https://{CONTROL_PLANE_IP}:{APISERVER_PORT}");
        let serving = pki.issue(
            "kube-apiserver",
            "kube-apiserver",
            None,
            &[
                "127.0.0.1",
                &CONTROL_PLANE_IP.to_string(),
                KUBERNETES_SERVICE_IP,
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ],
        )?;
        let kubelet_client = pki.issue(
            "apiserver-kubelet-client",
            "kube-apiserver-kubelet-client",
            Some("system:masters"),
            &[],
        )?;
        let audit_policy = root.join("audit-policy.yaml");
        fs::write(&audit_policy, audit::POLICY)
            .with_context(|| format!("writing {}", audit_policy.display()))?;

        let etcd_dir = root.join("etcd");
        let mut etcd = self.net.command(&bins.etcd);
        etcd.arg(format!("--data-dir={}", etcd_dir.display()))
            .args([
                "--listen-client-urls=http://127.0.0.1:2379",
                "--advertise-client-urls=http://127.0.0.1:2379",
                "--listen-peer-urls=http://127.0.0.1:2380",
                "--initial-advertise-peer-urls=http://127.0.0.1:2380",
                "--initial-cluster=default=http://127.0.0.1:2380",
                "--unsafe-no-fsync",
                "--log-level=warn",
            ]);
        self.control_plane
            .push(Daemon::spawn("etcd", etcd, &root.join("etcd.log"))?);

        let mut apiserver = self.net.command(&bins.kube_apiserver);
        apiserver
            .arg("--etcd-servers=http://127.0.0.1:2379")
            .arg("--bind-address=0.0.0.0")
            .arg(format!("--secure-port={APISERVER_PORT}"))
            .arg(format!("--advertise-address={CONTROL_PLANE_IP}"))
            .arg(format!("--tls-cert-file={}", serving.cert.display()))
            .arg(format!("--tls-private-key-file={}", serving.key.display()))
            .arg(format!("--client-ca-file={}", pki.ca_file.display()))
            .arg(format!(
                "--kubelet-client-certificate={}",
                kubelet_client.cert.display()
            ))
            .arg(format!(
                "--kubelet-client-key={}",
                kubelet_client.key.display()
            ))
            .arg(format!("--service-account-issuer={SERVICE_ACCOUNT_ISSUER}"))
            .arg(format!(
                "--service-account-key-file={}",
                pki.service_account_pub.display()
            ))
            .arg(format!(
                "--service-account-signing-key-file={}",
                pki.service_account_key.display()
            ))
            .arg("--authorization-mode=Node,RBAC")
            .arg("--enable-admission-plugins=NodeRestriction")
            .arg(format!("--service-cluster-ip-range={SERVICE_CIDR}"))
            .arg("--allow-privileged=true")
            .arg(format!("--audit-policy-file={}", audit_policy.display()))
            .arg(format!("--audit-log-path={}", self.audit_log.display()))
            .arg("--audit-log-format=json")
            .arg(format!("--cert-dir={}", root.join("apiserver").display()))
            .arg("--profiling=false");
        self.control_plane.push(Daemon::spawn(
            "kube-apiserver",
            apiserver,
            &root.join("kube-apiserver.log"),
        )?);

        let relay = self
            .net
            .relay_in(SocketAddr::V4(SocketAddrV4::new(
                CONTROL_PLANE_IP,
                APISERVER_PORT,
            )))
            .await?;
        self.kubeconfig = pki.kubeconfig(
            "admin",
            &format!("https://{relay}"),
            "warmroll-testbed-admin",
            Some("system:masters"),
        )?;
        self.wait_apiserver().await?;

        let pki = &self.pki;
        let controller_manager = pki.kubeconfig(
            "kube-controller-manager",
            &internal,
            "system:kube-controller-manager",
            None,
        )?;
        let mut command = self.net.command(&bins.kube_controller_manager);
        command
            .arg(format!("--kubeconfig={}", controller_manager.display()))
            .arg(format!(
                "--authentication-kubeconfig={}",
                controller_manager.display()
            ))
            .arg(format!(
                "--authorization-kubeconfig={}",
                controller_manager.display()
            ))
            .arg("--use-service-account-credentials=true")
            .arg(format!(
                "--service-account-private-key-file={}",
                pki.service_account_key.display()
            ))
            .arg(format!("--root-ca-file={}", pki.ca_file.display()))
            .arg(format!("--service-cluster-ip-range={SERVICE_CIDR}"))
            .arg("--leader-elect=false")
            .arg("--secure-port=0")
            .arg("--controllers=*");
        self.control_plane.push(Daemon::spawn(
            "kube-controller-manager",
            command,
            &root.join("kube-controller-manager.log"),
        )?);

        let scheduler =
            pki.kubeconfig("kube-scheduler", &internal, "system:kube-scheduler", None)?;
        let mut command = self.net.command(&bins.kube_scheduler);
        command
            .arg(format!("--kubeconfig={}", scheduler.display()))
            .arg(format!(
                "--authentication-kubeconfig={}",
                scheduler.display()
            ))
            .arg(format!(
                "--authorization-kubeconfig={}",
                scheduler.display()
            ))
            .arg("--leader-elect=false")
            .arg("--secure-port=0");
        self.control_plane.push(Daemon::spawn(
            "kube-scheduler",
            command,
            &root.join("kube-scheduler.log"),
        )?);

        let proxy = pki.kubeconfig("kube-proxy", &internal, "system:kube-proxy", None)?;
        let mut command = self.net.command(&bins.kube_proxy);
        command
            .arg(format!("--kubeconfig={}", proxy.display()))
            .arg("--proxy-mode=iptables")
            .arg("--masquerade-all")
            .arg(format!("--cluster-cidr={CLUSTER_CIDR}"))
            .arg("--conntrack-max-per-core=0")
            .arg("--hostname-override=node-0")
            .arg("--metrics-bind-address=127.0.0.1:10249")
            .arg("--healthz-bind-address=127.0.0.1:10256");
        self.control_plane.push(Daemon::spawn(
            "kube-proxy",
            command,
            &root.join("kube-proxy.log"),
        )?);

        // CoreDNS reads Services and EndpointSlices; it runs as a cluster admin here.
        let dns = pki.kubeconfig(
            "coredns",
            &internal,
            "warmroll-testbed-coredns",
            Some("system:masters"),
        )?;
        let corefile = root.join("Corefile");
        fs::write(&corefile, corefile_text(&dns))
            .with_context(|| format!("writing {}", corefile.display()))?;
        let mut command = self.net.command(&bins.coredns);
        command.arg("-conf").arg(&corefile);
        self.control_plane.push(Daemon::spawn(
            "coredns",
            command,
            &root.join("coredns.log"),
        )?);
        Ok(())
    }

    async fn wait_apiserver(&mut self) -> Result<()> {
        let deadline = Instant::now() + APISERVER_TIMEOUT;
        loop {
            let last;
            for daemon in &mut self.control_plane {
                daemon.check_running()?;
            }
            match self.client().await {
                Ok(client) => match client.apiserver_version().await {
                    Ok(info) => {
                        // Ready also means the bootstrap RBAC roles exist.
                        let ready = client
                            .request_text(
                                http::Request::get("/readyz")
                                    .body(Vec::new())
                                    .context("building /readyz")?,
                            )
                            .await;
                        match ready {
                            Ok(text) if text.trim() == "ok" => {
                                self.version = info.git_version;
                                return Ok(());
                            }
                            Ok(text) => last = text,
                            Err(e) => last = e.to_string(),
                        }
                    }
                    Err(e) => last = e.to_string(),
                },
                Err(e) => last = format!("{e:#}"),
            }
            if Instant::now() > deadline {
                let tails = self
                    .control_plane
                    .iter()
                    .map(|d| format!("--- {}:\n{}", d.name(), d.log_tail()))
                    .collect::<Vec<_>>()
                    .join("\n");
                bail!(
                    "kube-apiserver was not ready within {APISERVER_TIMEOUT:?} ({last})\n{tails}"
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn wait_nodes_ready(&mut self) -> Result<()> {
        let client = self.client().await?;
        let api: Api<NodeObject> = Api::all(client);
        let deadline = Instant::now() + NODES_READY_TIMEOUT;
        loop {
            for node in &mut self.nodes {
                node.check_running()?;
            }
            let listed = api.list(&ListParams::default()).await;
            let ready = match &listed {
                Ok(list) => list.items.iter().filter(|n| node_ready(n)).count(),
                Err(_) => 0,
            };
            if ready == self.nodes.len() {
                if let Ok(list) = &listed {
                    self.runtime_version = list
                        .items
                        .iter()
                        .filter_map(|n| n.status.as_ref()?.node_info.as_ref())
                        .map(|info| info.container_runtime_version.clone())
                        .next()
                        .unwrap_or_default();
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                let tails = self
                    .nodes
                    .iter()
                    .map(Node::log_tails)
                    .collect::<Vec<_>>()
                    .join("\n");
                bail!(
                    "{ready} of {} nodes Ready after {NODES_READY_TIMEOUT:?} ({}):\n{tails}",
                    self.nodes.len(),
                    match listed {
                        Ok(list) => format!(
                            "{:?}",
                            list.items.iter().map(node_summary).collect::<Vec<_>>()
                        ),
                        Err(e) => e.to_string(),
                    }
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// A client with cluster-admin rights, through the host's relay.
    pub async fn client(&self) -> Result<Client> {
        crate::tls::install_crypto_provider();
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig)
            .with_context(|| format!("reading {}", self.kubeconfig.display()))?;
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .context("loading the admin kubeconfig")?;
        Client::try_from(config).context("building the admin client")
    }

    /// The admin kubeconfig (for `helm --kubeconfig` and the like).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The API server's `gitVersion`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// What the nodes' kubelets report as their runtime (`containerd://2.3.7`).
    pub fn runtime_version(&self) -> &str {
        &self.runtime_version
    }

    /// The cluster CA in PEM.
    pub fn ca_pem(&self) -> String {
        self.pki.ca_pem()
    }

    /// The test registry as the cluster reaches it (`10.200.0.1:<port>`).
    pub fn registry_host(&self) -> &str {
        &self.registry_host
    }

    /// A reference pushed to the test registry (`127.0.0.1:<port>/…`), as the cluster
    /// pulls it.
    pub fn image_ref(&self, host_reference: &str) -> String {
        match host_reference.strip_prefix(&self.host_registry) {
            Some(rest) => format!("{}{rest}", self.registry_host),
            None => host_reference.to_string(),
        }
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// A host loopback address whose connections reach `target` on the cluster network
    /// (a pod's IP and port, say).
    pub async fn forward(&self, target: SocketAddr) -> Result<SocketAddr> {
        self.net.relay_in(target).await
    }

    /// Every audit event so far (requests made with ServiceAccount credentials).
    pub fn audit(&self) -> Result<Vec<AuditEvent>> {
        audit::read(&self.audit_log)
    }

    /// Where this cluster's files are.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_ref().map(TempDir::path)
    }
}

impl Drop for KubeCluster {
    fn drop(&mut self) {
        // Nodes first: their kubelets would otherwise report to a stopped API server.
        self.nodes.clear();
        while let Some(mut daemon) = self.control_plane.pop() {
            if let Err(e) = daemon.stop() {
                eprintln!("warning: {e:#}");
            }
        }
        if let Err(e) = self.net.stop() {
            eprintln!("warning: stopping the cluster network: {e:#}");
        }
        if std::env::var_os("WARMROLL_KEEP_CLUSTER_DIR").is_some()
            && let Some(dir) = self.dir.take()
        {
            eprintln!("keeping {}", dir.keep().display());
        }
    }
}

fn node_ready(node: &NodeObject) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        })
}

fn node_summary(node: &NodeObject) -> String {
    let name = node.metadata.name.clone().unwrap_or_default();
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .map(|c| format!("{} {}", c.status, c.message.clone().unwrap_or_default()))
        .unwrap_or_else(|| "no Ready condition".into());
    format!("{name}: {ready}")
}

/// The cluster network: loopback up with the control plane's and nodes' addresses on
/// it (no dummy interfaces without kernel modules), and forwarding.
fn network_script(nodes: &[NodeSpec]) -> String {
    let mut script = format!(
        "ip link set lo up
ip addr add {CONTROL_PLANE_IP}/32 dev lo
echo 1 > /proc/sys/net/ipv4/ip_forward
"
    );
    for node in nodes {
        script.push_str(&format!("ip addr add {}/32 dev lo\n", node.ip));
    }
    script
}

fn corefile_text(kubeconfig: &Path) -> String {
    format!(
        ".:53 {{
    bind {CLUSTER_DNS}
    errors
    kubernetes cluster.local in-addr.arpa ip6.arpa {{
        kubeconfig {}
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 5
}}
",
        kubeconfig.display()
    )
}

/// Root, and the host tools the cluster needs, named with their Debian packages.
fn preflight() -> Result<()> {
    let uid = fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .context("reading /proc/self")?;
    if uid != 0 {
        bail!("the real cluster must run as root (running as uid {uid}): run the suite as root");
    }
    for (path, package) in [
        ("/usr/sbin/runc", "runc"),
        ("/usr/bin/nsenter", "util-linux"),
        ("/usr/bin/unshare", "util-linux"),
        ("/usr/sbin/ip", "iproute2"),
        ("/usr/sbin/iptables", "iptables"),
        ("/usr/sbin/conntrack", "conntrack"),
        ("/usr/lib/cni/bridge", "containernetworking-plugins"),
        ("/usr/lib/cni/host-local", "containernetworking-plugins"),
        ("/usr/lib/cni/loopback", "containernetworking-plugins"),
    ] {
        if !Path::new(path).exists() {
            bail!("the real cluster needs {path}: install the Debian package `{package}`");
        }
    }
    Ok(())
}

/// One line of a container's log file, as the kubelet and containerd write it.
#[derive(Clone, Debug)]
pub struct LogLine {
    pub time: jiff::Timestamp,
    pub text: String,
}

impl KubeCluster {
    /// What `kubectl logs` reads: the log of `container` in pod `namespace/pod`, every
    /// run of it in order, from the node's pod log dir.
    pub fn container_log(
        &self,
        namespace: &str,
        pod: &str,
        container: &str,
    ) -> Result<Vec<LogLine>> {
        let prefix = format!("{namespace}_{pod}_");
        let mut files = Vec::new();
        for node in &self.nodes {
            let dir = node.pod_logs();
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with(&prefix) {
                    let logs = entry.path().join(container);
                    let Ok(runs) = fs::read_dir(&logs) else {
                        continue;
                    };
                    files.extend(runs.flatten().map(|r| r.path()));
                }
            }
        }
        // `0.log`, `1.log`, …: one per run.
        files.sort_by_key(|p| {
            p.file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.parse::<u32>().ok())
                .unwrap_or(u32::MAX)
        });
        if files.is_empty() {
            bail!("no log of container {container} of pod {namespace}/{pod} on any node");
        }
        let mut lines = Vec::new();
        for file in files {
            let text =
                fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            lines.extend(text.lines().filter_map(parse_cri_log_line));
        }
        Ok(lines)
    }
}

/// `<RFC 3339 time> <stream> <P|F> <text>`.
fn parse_cri_log_line(line: &str) -> Option<LogLine> {
    let mut parts = line.splitn(4, ' ');
    let time = parts.next()?.parse().ok()?;
    let _stream = parts.next()?;
    let _tag = parts.next()?;
    Some(LogLine {
        time,
        text: parts.next().unwrap_or_default().to_string(),
    })
}

/// Polls `check` every half second until it returns `Some`, failing after `timeout`
/// with `what` and the last error or state it reported.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no answer yet");
    loop {
        match check().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {timeout:?} (last: {last})");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cri_log_lines_parse_with_their_time() {
        let line =
            parse_cri_log_line("2026-12-07T12:00:00.123456789Z stdout F {\"msg\":\"image warm\"}")
                .unwrap();
        assert_eq!(line.text, "{\"msg\":\"image warm\"}");
        assert_eq!(line.time.to_string(), "2026-12-07T12:00:00.123456789Z");
        assert!(parse_cri_log_line("garbage").is_none());
    }

    #[test]
    fn network_script_puts_every_address_on_loopback() {
        let script = network_script(&[NodeSpec::new(0), NodeSpec::new(1)]);
        assert!(script.contains("ip addr add 10.200.0.1/32 dev lo\n"));
        assert!(script.contains("ip addr add 10.200.0.11/32 dev lo\n"));
        assert!(script.contains("ip_forward"));
    }
}
