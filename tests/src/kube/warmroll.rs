//! warmroll as installed on a [`KubeCluster`] by [`super::helm`]: its pods, the leader,
//! its HTTP endpoints (through a relay into the cluster network, with a token of the
//! chart's reader account), its logs as the kubelet wrote them, and the workloads the
//! tests and the demo put under its policies.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::api::{DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::discovery::ApiResource;
use kube::{Api, Client};
use serde_json::{Value, json};

use super::helm::NAMESPACE;
use super::{AuditEvent, KubeCluster, wait_for};

/// The coordinator's name (Deployment, Service, Lease) and ServiceAccount user.
pub const COORDINATOR: &str = "warmroll-coordinator";
pub const COORDINATOR_USER: &str = "system:serviceaccount:warmroll:warmroll-coordinator";
/// The agents' DaemonSet and ServiceAccount user.
pub const AGENT: &str = "warmroll-agent";
pub const AGENT_USER: &str = "system:serviceaccount:warmroll:warmroll-agent";
/// The ServiceAccount the chart lets read the coordinator's HTTP port.
pub const READER: &str = "warmroll-reader";
const COORDINATOR_PODS: &str = "app.kubernetes.io/component=coordinator";
const AGENT_PODS: &str = "app.kubernetes.io/component=agent";
const HTTP_PORT: u16 = 8080;

/// warmroll on one cluster.
pub struct Warmroll<'a> {
    pub cluster: &'a KubeCluster,
    pub client: Client,
}

/// An agent's "image warm" line: which node, when (the log line's time), and the line.
#[derive(Clone, Debug)]
pub struct Warmed {
    pub node: String,
    pub at: jiff::Timestamp,
    pub line: Value,
}

impl Warmed {
    /// The digest the agent reports warm (`Some("sha256:…")` in the log).
    pub fn is_digest(&self, digest: &str) -> bool {
        field(&self.line, "digest")
            .and_then(Value::as_str)
            .is_some_and(|d| d.contains(digest))
    }
}

impl<'a> Warmroll<'a> {
    pub async fn new(cluster: &'a KubeCluster) -> Result<Warmroll<'a>> {
        Ok(Warmroll {
            cluster,
            client: cluster.client().await?,
        })
    }

    pub async fn pods(&self, namespace: &str, selector: &str) -> Result<Vec<Pod>> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        Ok(api
            .list(&ListParams::default().labels(selector))
            .await
            .with_context(|| format!("listing pods {selector} in {namespace}"))?
            .items)
    }

    pub async fn coordinator_pods(&self) -> Result<Vec<Pod>> {
        self.pods(NAMESPACE, COORDINATOR_PODS).await
    }

    /// Waits until the DaemonSet has a Ready agent on each of `nodes` nodes and a
    /// coordinator holds the Lease and is Ready; returns that leader.
    pub async fn wait_ready(&self, nodes: usize, timeout: Duration) -> Result<Pod> {
        let daemon_sets: Api<DaemonSet> = Api::namespaced(self.client.clone(), NAMESPACE);
        wait_for("one Ready agent per node", timeout, || async {
            let status = daemon_sets.get(AGENT).await?.status.unwrap_or_default();
            let want = i32::try_from(nodes)?;
            Ok(
                (status.number_ready == want && status.desired_number_scheduled == want)
                    .then_some(()),
            )
        })
        .await?;
        self.leader(timeout).await
    }

    /// The coordinator pod holding the Lease, once it is also Ready.
    pub async fn leader(&self, timeout: Duration) -> Result<Pod> {
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), NAMESPACE);
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), NAMESPACE);
        wait_for("a Ready coordinator holding the Lease", timeout, || async {
            let lease = leases.get(COORDINATOR).await?;
            let Some(holder) = lease.spec.and_then(|s| s.holder_identity) else {
                return Ok(None);
            };
            let pod = pods.get(&holder).await?;
            Ok(is_ready(&pod).then_some(pod))
        })
        .await
    }

    /// A 10-minute token of ServiceAccount `account` in warmroll's namespace, through
    /// the TokenRequest API (as `warmroll-coordinator report` gets one).
    pub async fn token_of(&self, account: &str) -> Result<String> {
        let accounts: Api<ServiceAccount> = Api::namespaced(self.client.clone(), NAMESPACE);
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                expiration_seconds: Some(600),
                ..Default::default()
            }),
            ..Default::default()
        };
        let answer = accounts
            .create_token_request(account, &PostParams::default(), &request)
            .await
            .with_context(|| format!("a token of ServiceAccount {account}"))?;
        answer
            .status
            .and_then(|s| s.token)
            .ok_or_else(|| anyhow!("TokenRequest for {account}: no token"))
    }

    /// GET `path` on a coordinator pod's HTTP port with a token of the chart's reader
    /// account (the inventory paths need one); returns the status and body.
    pub async fn http(&self, pod: &Pod, path: &str) -> Result<(u16, String)> {
        let token = self.token_of(READER).await?;
        self.http_as(pod, path, Some(&token)).await
    }

    /// GET `path` on a coordinator pod's HTTP port, presenting `token` if any.
    pub async fn http_as(
        &self,
        pod: &Pod,
        path: &str,
        token: Option<&str>,
    ) -> Result<(u16, String)> {
        let relay = self.relay(pod).await?;
        http_get(relay, path, token).await
    }

    /// A local address relayed to a coordinator pod's HTTP port.
    pub async fn relay(&self, pod: &Pod) -> Result<SocketAddr> {
        let ip = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.as_deref())
            .ok_or_else(|| anyhow!("pod {:?} has no IP", pod.metadata.name))?;
        let addr = SocketAddr::new(ip.parse().context("pod IP")?, HTTP_PORT);
        self.cluster.forward(addr).await
    }

    /// GET `path` on the leader.
    pub async fn leader_http(&self, path: &str) -> Result<(u16, String)> {
        let leader = self.leader(Duration::from_secs(60)).await?;
        self.http(&leader, path).await
    }

    /// The leader's `/report`.
    pub async fn report(&self) -> Result<Value> {
        let (status, body) = self.leader_http("/report").await?;
        if status != 200 {
            bail!("/report answered {status}: {body}");
        }
        serde_json::from_str(&body).context("parsing /report")
    }

    /// The JSON log lines of a container of every pod matching `selector` in warmroll's
    /// namespace, with the pod's node.
    async fn json_logs(
        &self,
        selector: &str,
        container: &str,
    ) -> Result<Vec<(String, jiff::Timestamp, Value)>> {
        let mut out = Vec::new();
        for pod in self.pods(NAMESPACE, selector).await? {
            let node = pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .unwrap_or_default();
            let name = pod.metadata.name.clone().unwrap_or_default();
            // A pod whose container has not started yet has no log; a terminating pod's
            // log may be gone already (the kubelet removes it with the pod).
            let started = pod
                .status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .is_some_and(|statuses| {
                    statuses.iter().any(|c| {
                        c.name == container
                            && c.state
                                .as_ref()
                                .is_some_and(|s| s.running.is_some() || s.terminated.is_some())
                    })
                });
            let logs = match self.cluster.container_log(NAMESPACE, &name, container) {
                Ok(logs) => logs,
                Err(_) if !started || pod.metadata.deletion_timestamp.is_some() => continue,
                Err(e) => return Err(e),
            };
            for line in logs {
                if let Ok(value) = serde_json::from_str::<Value>(&line.text) {
                    out.push((node.clone(), line.time, value));
                }
            }
        }
        Ok(out)
    }

    /// Every coordinator replica's log lines, parsed (it logs JSON).
    pub async fn coordinator_log(&self) -> Result<Vec<Value>> {
        Ok(self
            .json_logs(COORDINATOR_PODS, "coordinator")
            .await?
            .into_iter()
            .map(|(_, _, line)| line)
            .collect())
    }

    /// Every agent's "image warm" lines.
    pub async fn warm_lines(&self) -> Result<Vec<Warmed>> {
        Ok(self
            .json_logs(AGENT_PODS, "agent")
            .await?
            .into_iter()
            .filter(|(_, _, line)| message(line) == "image warm")
            .map(|(node, at, line)| Warmed { node, at, line })
            .collect())
    }

    /// Creates (server-side apply) a workload manifest in `namespace`.
    pub async fn apply(&self, namespace: &str, manifest: &Value) -> Result<()> {
        let kind = manifest["kind"].as_str().unwrap_or_default();
        let name = manifest["metadata"]["name"].as_str().unwrap_or_default();
        let resource = ApiResource {
            group: "apps".into(),
            version: "v1".into(),
            api_version: "apps/v1".into(),
            kind: kind.into(),
            plural: format!("{}s", kind.to_lowercase()),
        };
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), namespace, &resource);
        api.patch(
            name,
            &PatchParams::apply("warmroll-testbed").force(),
            &Patch::Apply(manifest),
        )
        .await
        .with_context(|| format!("applying {kind} {namespace}/{name}"))?;
        Ok(())
    }
}

/// A Deployment, StatefulSet or DaemonSet labelled for `policy`, whose pods (label
/// `app=<name>`) run one container `main` on `image`.
pub fn workload(
    kind: &str,
    name: &str,
    policy: &str,
    image: &str,
    pull: &str,
    replicas: u32,
) -> Value {
    let labels = json!({"app": name});
    let mut spec = json!({
        "selector": {"matchLabels": labels},
        "template": {
            "metadata": {"labels": labels},
            "spec": {
                "terminationGracePeriodSeconds": 1,
                "containers": [{"name": "main", "image": image, "imagePullPolicy": pull}],
            },
        },
    });
    match kind {
        "Deployment" => spec["replicas"] = json!(replicas),
        "StatefulSet" => {
            spec["replicas"] = json!(replicas);
            spec["serviceName"] = json!(name);
        }
        _ => {}
    }
    json!({
        "apiVersion": "apps/v1",
        "kind": kind,
        "metadata": {"name": name, "labels": {"warmroll.io/policy": policy}},
        "spec": spec,
    })
}

/// The coordinator's writes to workload `name`, and Events about it, since `since`.
pub fn coordinator_writes<'e>(
    events: &'e [AuditEvent],
    name: &str,
    since: jiff::Timestamp,
) -> Vec<&'e AuditEvent> {
    events
        .iter()
        .filter(|e| e.user.username == COORDINATOR_USER && e.is_write())
        .filter(|e| e.request_received_timestamp >= since)
        .filter(|e| {
            (matches!(e.resource(), "deployments" | "statefulsets" | "daemonsets")
                && e.name() == name)
                || (e.resource() == "events" && e.name().starts_with(&format!("{name}.")))
        })
        .collect()
}

/// The message of a tracing JSON line.
pub fn message(line: &Value) -> &str {
    field(line, "message")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// A field of a tracing JSON line (under `fields`, or at the top).
pub fn field<'v>(line: &'v Value, name: &str) -> Option<&'v Value> {
    line.get("fields")
        .and_then(|f| f.get(name))
        .or_else(|| line.get(name))
}

pub fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The `imageID` of each container of a pod, by container name.
pub fn image_ids(pod: &Pod) -> BTreeMap<String, String> {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .map(|cs| {
            cs.iter()
                .map(|c| (c.name.clone(), c.image_id.clone()))
                .collect()
        })
        .unwrap_or_default()
}

/// A plain HTTP/1.0 GET, with `Authorization: Bearer <token>` if given: the status and
/// the body.
async fn http_get(addr: SocketAddr, path: &str, token: Option<&str>) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let authorization = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    stream
        .write_all(
            format!("GET {path} HTTP/1.0\r\nHost: coordinator\r\n{authorization}\r\n").as_bytes(),
        )
        .await
        .with_context(|| format!("GET {path}"))?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .with_context(|| format!("GET {path}: reading the answer"))?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("GET {path}: no HTTP status in {head:?}"))?;
    Ok((status, body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_manifests_carry_the_policy_label_and_pull_policy() {
        let d = workload("Deployment", "web", "rollout", "r/app:latest", "Always", 2);
        assert_eq!(d["metadata"]["labels"]["warmroll.io/policy"], "rollout");
        assert_eq!(d["spec"]["replicas"], 2);
        assert_eq!(
            d["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"],
            "Always"
        );
        let s = workload("StatefulSet", "db", "rollout", "r/app:latest", "Always", 1);
        assert_eq!(s["spec"]["serviceName"], "db");
        let ds = workload("DaemonSet", "ds", "rollout", "r/app:latest", "Always", 0);
        assert!(ds["spec"].get("replicas").is_none());
    }

    #[test]
    fn tracing_json_fields_are_found_under_fields() {
        let line = json!({"fields": {"message": "image warm", "digest": "Some(\"sha256:ab\")"}});
        assert_eq!(message(&line), "image warm");
        let warmed = Warmed {
            node: "node-0".into(),
            at: jiff::Timestamp::UNIX_EPOCH,
            line,
        };
        assert!(warmed.is_digest("sha256:ab"));
        assert!(!warmed.is_digest("sha256:cd"));
    }
}
