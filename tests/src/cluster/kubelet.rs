//! One node's kubelet, for warmroll's purposes: it realises the Pods bound to its node
//! through CRI on the node's containerd (sandbox, image per `imagePullPolicy`, containers)
//! and reports pod status through the API as kubelet does (phase, conditions,
//! `containerStatuses` with `imageID` and waiting reasons). A pod deleted from the API is
//! stopped and its sandbox removed; so is any sandbox of a pod the API no longer has.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use base64::Engine;
use k8s_cri::v1::AuthConfig;
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateWaiting, ContainerStatus, HostIP, Pod,
    PodCondition, PodIP, PodStatus, Secret,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, Preconditions};
use serde_json::json;
use tokio::sync::Notify;
use tokio::task::{AbortHandle, JoinSet};

use super::timeline::{Seen, Timeline};
use super::{owner_of, revision_of};
use crate::containerd::{ContainerSpec, ImagePull, PodRuntime, PodSpec};

const STATUS_ATTEMPTS: u32 = 5;

/// Host networking: every pod's IP is the node's.
pub const NODE_IP: &str = "127.0.0.1";

/// Everything a kubelet and its pod workers share.
pub struct Kubelet {
    pub node: String,
    pub client: kube::Client,
    pub runtime: PodRuntime,
    pub timeline: Arc<Mutex<Timeline>>,
    pub resync: Duration,
    pub pull_backoff: Duration,
    pub max_pull_backoff: Duration,
}

/// The kubelet's sync loop: on every wake-up (a change to a pod bound to this node) or
/// resync, start a worker for each new pod and stop what the API no longer has. The
/// workers and the sandbox removals live in `JoinSet`s, so aborting this task aborts
/// them all.
pub async fn run(kubelet: Arc<Kubelet>, wake: Arc<Notify>) {
    let mut tasks = Tasks {
        workers: JoinSet::new(),
        active: HashMap::new(),
        removals: JoinSet::new(),
        removing: HashSet::new(),
    };
    loop {
        if let Err(e) = sync(&kubelet, &mut tasks).await {
            tracing::warn!(node = %kubelet.node, "kubelet sync: {e:#}");
        }
        while tasks.workers.try_join_next().is_some() {}
        while let Some(done) = tasks.removals.try_join_next() {
            if let Ok(sandbox_id) = done {
                tasks.removing.remove(&sandbox_id);
            }
        }
        tokio::select! {
            () = wake.notified() => {}
            () = tokio::time::sleep(kubelet.resync) => {}
        }
    }
}

/// What the sync loop runs besides itself.
struct Tasks {
    /// One worker per pod being started.
    workers: JoinSet<()>,
    /// The workers by pod uid.
    active: HashMap<String, AbortHandle>,
    /// Removals of stopped sandboxes (kubelet's garbage collection), each returning the
    /// sandbox id.
    removals: JoinSet<String>,
    removing: HashSet<String>,
}

#[tracing::instrument(skip_all, fields(node = %kubelet.node))]
async fn sync(kubelet: &Arc<Kubelet>, tasks: &mut Tasks) -> Result<()> {
    let Tasks {
        workers,
        active,
        removals,
        removing,
    } = tasks;
    let pods = Api::<Pod>::all(kubelet.client.clone())
        .list(&ListParams::default().fields(&format!("spec.nodeName={}", kubelet.node)))
        .await
        .with_context(|| format!("listing the pods of node {}", kubelet.node))?;
    let mut desired = HashMap::new();
    let mut terminating = Vec::new();
    for pod in pods {
        let Some(uid) = pod.metadata.uid.clone() else {
            continue;
        };
        // A pod being deleted is stopped, then deleted for good.
        if pod.metadata.deletion_timestamp.is_some() {
            terminating.push((pod, uid));
        } else {
            desired.insert(uid, pod);
        }
    }
    for (uid, pod) in &desired {
        if active.contains_key(uid) {
            continue;
        }
        if let Ok(mut timeline) = kubelet.timeline.lock() {
            timeline.seen(
                Seen {
                    namespace: pod.metadata.namespace.as_deref().unwrap_or_default(),
                    name: pod.metadata.name.as_deref().unwrap_or_default(),
                    uid,
                    node: &kubelet.node,
                    owner: owner_of(&pod.metadata),
                    revision: revision_of(&pod.metadata),
                },
                Instant::now(),
            );
        }
        let handle = workers.spawn(worker(kubelet.clone(), pod.clone()));
        active.insert(uid.clone(), handle);
    }
    let gone: Vec<String> = active
        .keys()
        .filter(|uid| !desired.contains_key(*uid))
        .cloned()
        .collect();
    for uid in gone {
        if let Some(handle) = active.remove(&uid) {
            handle.abort();
        }
        if let Ok(mut timeline) = kubelet.timeline.lock() {
            timeline.deleted(&uid, Instant::now());
        }
    }
    // Housekeeping: no sandbox outlives its pod (also one a worker was still creating
    // when it was aborted). Its containers are stopped now; the stopped sandbox is
    // removed after the pod is gone from the API, off the sync loop, as kubelet's
    // garbage collection does.
    let mut stopped = Vec::new();
    for (sandbox_id, uid) in kubelet.runtime.sandboxes().await? {
        if desired.contains_key(&uid) || removing.contains(&sandbox_id) {
            continue;
        }
        kubelet.runtime.stop_sandbox(&sandbox_id).await?;
        stopped.push((sandbox_id, uid));
    }
    // Its containers are stopped: finish the graceful deletion.
    for (pod, uid) in terminating {
        let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(uid.clone()),
                resource_version: None,
            }),
            ..Default::default()
        };
        match Api::<Pod>::namespaced(kubelet.client.clone(), namespace)
            .delete(name, &params)
            .await
        {
            Ok(_) => {
                if let Ok(mut timeline) = kubelet.timeline.lock() {
                    timeline.gone(&uid, Instant::now());
                }
            }
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(e) => {
                return Err(e).with_context(|| format!("deleting pod {namespace}/{name}"));
            }
        }
    }
    for (sandbox_id, uid) in stopped {
        removing.insert(sandbox_id.clone());
        let kubelet = kubelet.clone();
        removals.spawn(async move {
            match kubelet.runtime.remove_sandbox(&sandbox_id).await {
                Ok(()) => {
                    tracing::debug!(node = %kubelet.node, %uid, "removed the sandbox of a deleted pod")
                }
                // The next sync finds it again and retries.
                Err(e) => tracing::warn!(node = %kubelet.node, "{e:#}"),
            }
            sandbox_id
        });
    }
    Ok(())
}

async fn worker(kubelet: Arc<Kubelet>, pod: Pod) {
    let what = format!(
        "pod {}/{}",
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default()
    );
    if let Err(e) = realise(&kubelet, &pod).await {
        tracing::warn!(node = %kubelet.node, "{what}: {e:#}");
    }
}

/// A container as kubelet reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ContainerPhase {
    Waiting {
        reason: String,
        message: Option<String>,
    },
    Running {
        container_id: String,
        /// The repo digest the runtime reports (`host/repo@sha256:…`).
        image_id: String,
        started_at: Timestamp,
    },
}

impl ContainerPhase {
    fn waiting(reason: &str, message: Option<String>) -> Self {
        Self::Waiting {
            reason: reason.to_string(),
            message,
        }
    }
}

/// Runs one pod to Ready, writing its status at every step.
#[tracing::instrument(skip_all, fields(node = %kubelet.node, pod = ?pod.metadata.name))]
async fn realise(kubelet: &Kubelet, pod: &Pod) -> Result<()> {
    let mut spec = pod_spec(pod)?;
    let secrets = pull_secrets(kubelet, pod).await;
    for container in &mut spec.containers {
        container.auth = auth_for(&container.image, &secrets);
    }
    let start = Timestamp::now();
    let mut phases: Vec<ContainerPhase> = spec
        .containers
        .iter()
        .map(|_| ContainerPhase::waiting("ContainerCreating", None))
        .collect();
    let report =
        |phases: &[ContainerPhase]| write_status(kubelet, &spec, pod_status(&spec, phases, start));
    // kubelet's status manager writes in the background: the first status goes out
    // while the sandbox starts.
    let run_sandbox = async {
        let mut backoff = kubelet.pull_backoff;
        loop {
            match kubelet.runtime.run_sandbox(&spec).await {
                Ok(id) => break id,
                Err(e) => {
                    tracing::warn!(node = %kubelet.node, "{e:#}; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(kubelet.max_pull_backoff);
                }
            }
        }
    };
    let (written, sandbox_id) = tokio::join!(report(&phases), run_sandbox);
    written?;
    for (i, container) in spec.containers.iter().enumerate() {
        let mut backoff = kubelet.pull_backoff;
        let image_id = loop {
            match kubelet.runtime.ensure_image(container).await {
                Ok(id) => break id,
                Err(e) => {
                    let message = format!("{e:#}");
                    set(
                        &mut phases,
                        i,
                        ContainerPhase::waiting("ErrImagePull", Some(message.clone())),
                    );
                    report(&phases).await?;
                    tokio::time::sleep(backoff).await;
                    let backing_off = format!(
                        "Back-off pulling image {:?}: ErrImagePull: {message}",
                        container.image
                    );
                    set(
                        &mut phases,
                        i,
                        ContainerPhase::waiting("ImagePullBackOff", Some(backing_off)),
                    );
                    report(&phases).await?;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(kubelet.max_pull_backoff);
                }
            }
        };
        let running = kubelet
            .runtime
            .start_container(&spec, &sandbox_id, container, &image_id)
            .await?;
        let status = kubelet.runtime.container_status(&running.id).await?;
        set(
            &mut phases,
            i,
            ContainerPhase::Running {
                container_id: running.id,
                image_id: status.image_ref,
                started_at: Timestamp::now(),
            },
        );
    }
    let image_ids = phases
        .iter()
        .filter_map(|p| match p {
            ContainerPhase::Running { image_id, .. } => Some(image_id.clone()),
            ContainerPhase::Waiting { .. } => None,
        })
        .collect();
    // Taken before the write: anything reacting to the readiness comes after it.
    let ready_at = Instant::now();
    report(&phases).await?;
    if let Ok(mut timeline) = kubelet.timeline.lock() {
        timeline.ready(&spec.uid, image_ids, ready_at);
    }
    Ok(())
}

/// The pod's `imagePullSecrets` that exist (kubelet goes on without the missing ones).
async fn pull_secrets(kubelet: &Kubelet, pod: &Pod) -> Vec<Secret> {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
    let api = Api::<Secret>::namespaced(kubelet.client.clone(), namespace);
    let mut secrets = Vec::new();
    let names = pod
        .spec
        .iter()
        .flat_map(|s| s.image_pull_secrets.iter().flatten())
        .map(|r| r.name.clone());
    for name in names {
        match api.get_opt(&name).await {
            Ok(Some(secret)) => secrets.push(secret),
            Ok(None) => {
                tracing::warn!(node = %kubelet.node, "pull secret {namespace}/{name} not found")
            }
            Err(e) => {
                tracing::warn!(node = %kubelet.node, "reading pull secret {namespace}/{name}: {e}")
            }
        }
    }
    secrets
}

/// The credentials for `image`'s registry in Docker config pull secrets
/// (`.dockerconfigjson` or `.dockercfg`), as kubelet's keyring matches them: by registry
/// host, with `docker.io` for images without one.
pub fn auth_for(image: &str, secrets: &[Secret]) -> Option<AuthConfig> {
    let host = registry_host(image);
    for secret in secrets {
        let Some(data) = secret.data.as_ref() else {
            continue;
        };
        let auths = if let Some(json) = data.get(".dockerconfigjson") {
            serde_json::from_slice::<serde_json::Value>(&json.0)
                .ok()
                .and_then(|v| v.get("auths").cloned())
        } else {
            data.get(".dockercfg")
                .and_then(|cfg| serde_json::from_slice(&cfg.0).ok())
        };
        let Some(serde_json::Value::Object(auths)) = auths else {
            continue;
        };
        for (key, entry) in auths {
            if normalize_key(&key) != host {
                continue;
            }
            if let Some(auth) = entry_auth(&entry) {
                return Some(auth);
            }
        }
    }
    None
}

/// One Docker config entry's `username`/`password`, or its `auth` (base64 `user:pass`).
fn entry_auth(entry: &serde_json::Value) -> Option<AuthConfig> {
    let field = |name: &str| entry.get(name).and_then(|v| v.as_str()).map(str::to_string);
    let (username, password) = match (field("username"), field("password")) {
        (Some(u), Some(p)) => (u, p),
        _ => {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(field("auth")?)
                .ok()?;
            let text = String::from_utf8(decoded).ok()?;
            let (u, p) = text.split_once(':')?;
            (u.to_string(), p.to_string())
        }
    };
    Some(AuthConfig {
        username,
        password,
        ..Default::default()
    })
}

/// The registry host of an image reference (`docker.io` when it names none).
fn registry_host(image: &str) -> String {
    match image.split_once('/') {
        Some((first, _)) if first.contains(['.', ':']) || first == "localhost" => {
            normalize_key(first)
        }
        _ => "docker.io".to_string(),
    }
}

/// A Docker config key (`https://host/v1/`, `host`) as a host; Docker Hub's aliases as
/// `docker.io`.
fn normalize_key(key: &str) -> String {
    let host = key
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or_default();
    match host {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".to_string(),
        other => other.to_string(),
    }
}

fn set(phases: &mut [ContainerPhase], i: usize, phase: ContainerPhase) {
    if let Some(slot) = phases.get_mut(i) {
        *slot = phase;
    }
}

/// The status subresource write kubelet makes (a merge patch of `status`), retried a
/// few times unless the pod is gone.
async fn write_status(kubelet: &Kubelet, spec: &PodSpec, status: PodStatus) -> Result<()> {
    let api = Api::<Pod>::namespaced(kubelet.client.clone(), &spec.namespace);
    let patch = Patch::Merge(json!({ "status": status }));
    let mut attempt = 0;
    loop {
        attempt += 1;
        match api
            .patch_status(&spec.name, &PatchParams::default(), &patch)
            .await
        {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => {
                return Err(anyhow!("pod {}/{} is gone", spec.namespace, spec.name));
            }
            Err(e) if attempt >= STATUS_ATTEMPTS => {
                return Err(e).with_context(|| {
                    format!("writing the status of pod {}/{}", spec.namespace, spec.name)
                });
            }
            Err(e) => {
                tracing::debug!(node = %kubelet.node, "writing pod status: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// What kubelet hands the runtime for an API Pod.
pub fn pod_spec(pod: &Pod) -> Result<PodSpec> {
    let meta = &pod.metadata;
    let (Some(namespace), Some(name), Some(uid)) = (&meta.namespace, &meta.name, &meta.uid) else {
        return Err(anyhow!("a pod without namespace, name or uid: {meta:?}"));
    };
    let mut spec = PodSpec::new(namespace, name).uid(uid);
    spec.labels = meta.labels.clone().unwrap_or_default();
    spec.annotations = meta.annotations.clone().unwrap_or_default();
    for c in pod.spec.iter().flat_map(|s| &s.containers) {
        let image = c
            .image
            .as_deref()
            .ok_or_else(|| anyhow!("pod {namespace}/{name}: container {} has no image", c.name))?;
        let mut container = ContainerSpec::new(&c.name, image)
            .pull(pull_policy(c.image_pull_policy.as_deref(), image))
            .command(c.command.clone().unwrap_or_default());
        container.args = c.args.clone().unwrap_or_default();
        spec = spec.container(container);
    }
    Ok(spec)
}

/// `imagePullPolicy` with the API server's default when absent: `Always` for `:latest`
/// or an untagged image, else `IfNotPresent`. (`Never` is treated as `IfNotPresent`.)
pub fn pull_policy(policy: Option<&str>, image: &str) -> ImagePull {
    match policy {
        Some("Always") => ImagePull::Always,
        Some(_) => ImagePull::IfNotPresent,
        None => {
            if image.contains('@') {
                return ImagePull::IfNotPresent;
            }
            let last = image.rsplit('/').next().unwrap_or(image);
            match last.split_once(':') {
                Some((_, tag)) if tag != "latest" => ImagePull::IfNotPresent,
                _ => ImagePull::Always,
            }
        }
    }
}

fn condition(type_: &str, ok: bool, start: &Time) -> PodCondition {
    PodCondition {
        type_: type_.to_string(),
        status: if ok { "True" } else { "False" }.to_string(),
        reason: (!ok && matches!(type_, "Ready" | "ContainersReady"))
            .then(|| "ContainersNotReady".to_string()),
        last_transition_time: Some(start.clone()),
        ..Default::default()
    }
}

/// The pod status kubelet reports for `phases` (one per container of `spec`).
pub fn pod_status(spec: &PodSpec, phases: &[ContainerPhase], start: Timestamp) -> PodStatus {
    let start = Time(start);
    let all_running = !phases.is_empty()
        && phases
            .iter()
            .all(|p| matches!(p, ContainerPhase::Running { .. }));
    let container_statuses = spec
        .containers
        .iter()
        .zip(phases)
        .map(|(c, phase)| {
            let (state, image_id, container_id, running) = match phase {
                ContainerPhase::Waiting { reason, message } => (
                    ContainerState {
                        waiting: Some(ContainerStateWaiting {
                            reason: Some(reason.clone()),
                            message: message.clone(),
                        }),
                        ..Default::default()
                    },
                    String::new(),
                    None,
                    false,
                ),
                ContainerPhase::Running {
                    container_id,
                    image_id,
                    started_at,
                } => (
                    ContainerState {
                        running: Some(ContainerStateRunning {
                            started_at: Some(Time(*started_at)),
                        }),
                        ..Default::default()
                    },
                    image_id.clone(),
                    Some(format!("containerd://{container_id}")),
                    true,
                ),
            };
            ContainerStatus {
                name: c.name.clone(),
                image: c.image.clone(),
                image_id,
                container_id,
                ready: running,
                started: Some(running),
                restart_count: 0,
                state: Some(state),
                ..Default::default()
            }
        })
        .collect();
    PodStatus {
        phase: Some(if all_running { "Running" } else { "Pending" }.to_string()),
        conditions: Some(vec![
            condition("PodReadyToStartContainers", true, &start),
            condition("Initialized", true, &start),
            condition("Ready", all_running, &start),
            condition("ContainersReady", all_running, &start),
            condition("PodScheduled", true, &start),
        ]),
        container_statuses: Some(container_statuses),
        host_ip: Some(NODE_IP.to_string()),
        host_ips: Some(vec![HostIP {
            ip: NODE_IP.to_string(),
        }]),
        pod_ip: Some(NODE_IP.to_string()),
        pod_ips: Some(vec![PodIP {
            ip: NODE_IP.to_string(),
        }]),
        qos_class: Some("BestEffort".to_string()),
        start_time: Some(start),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, PodSpec as ApiPodSpec};

    #[test]
    fn pull_policy_defaults_like_the_api_server() {
        assert_eq!(pull_policy(None, "r:5000/app:latest"), ImagePull::Always);
        assert_eq!(pull_policy(None, "r:5000/app"), ImagePull::Always);
        assert_eq!(pull_policy(None, "r:5000/app:1.2"), ImagePull::IfNotPresent);
        assert_eq!(
            pull_policy(None, "r/app@sha256:ab"),
            ImagePull::IfNotPresent
        );
        assert_eq!(pull_policy(Some("Always"), "r/app:1"), ImagePull::Always);
        assert_eq!(
            pull_policy(Some("IfNotPresent"), "r/app:latest"),
            ImagePull::IfNotPresent
        );
    }

    fn api_pod() -> Pod {
        let mut pod = Pod::default();
        pod.metadata.namespace = Some("ns".into());
        pod.metadata.name = Some("web-1".into());
        pod.metadata.uid = Some("u1".into());
        pod.metadata.labels = Some([("app".to_string(), "web".to_string())].into());
        pod.spec = Some(ApiPodSpec {
            containers: vec![Container {
                name: "app".into(),
                image: Some("r/app:latest".into()),
                args: Some(vec!["x".into()]),
                ..Default::default()
            }],
            ..Default::default()
        });
        pod
    }

    #[test]
    fn pod_spec_carries_identity_labels_and_containers() {
        let spec = pod_spec(&api_pod()).unwrap();
        assert_eq!((spec.namespace.as_str(), spec.uid.as_str()), ("ns", "u1"));
        assert_eq!(spec.labels.get("app").map(String::as_str), Some("web"));
        assert_eq!(spec.containers[0].pull, ImagePull::Always);
        assert_eq!(spec.containers[0].args, ["x"]);
        let mut no_image = api_pod();
        no_image.spec.as_mut().unwrap().containers[0].image = None;
        assert!(
            format!("{:#}", pod_spec(&no_image).unwrap_err())
                .contains("container app has no image")
        );
    }

    fn docker_secret(key: &str, value: serde_json::Value) -> Secret {
        Secret {
            data: Some(
                [(
                    key.to_string(),
                    k8s_openapi::ByteString(serde_json::to_vec(&value).unwrap()),
                )]
                .into(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn pull_secrets_match_the_registry_host() {
        let secrets = [
            docker_secret(
                ".dockerconfigjson",
                json!({"auths": {"https://127.0.0.1:5000/v1/": {"username": "ci", "password": "pw"}}}),
            ),
            docker_secret(
                ".dockercfg",
                json!({"index.docker.io": {"auth": base64::engine::general_purpose::STANDARD.encode("hub:tok")}}),
            ),
        ];
        let local = auth_for("127.0.0.1:5000/app:1", &secrets).unwrap();
        assert_eq!(
            (local.username.as_str(), local.password.as_str()),
            ("ci", "pw")
        );
        let hub = auth_for("library/nginx:1", &secrets).unwrap();
        assert_eq!(
            (hub.username.as_str(), hub.password.as_str()),
            ("hub", "tok")
        );
        assert!(auth_for("127.0.0.1:6000/app:1", &secrets).is_none());
        assert!(auth_for("127.0.0.1:5000/app:1", &[]).is_none());
    }

    #[test]
    fn status_is_pending_while_waiting_and_ready_when_all_run() {
        let spec = pod_spec(&api_pod()).unwrap();
        let now = Timestamp::now();
        let waiting = pod_status(
            &spec,
            &[ContainerPhase::waiting(
                "ImagePullBackOff",
                Some("nope".into()),
            )],
            now,
        );
        assert_eq!(waiting.phase.as_deref(), Some("Pending"));
        let cs = &waiting.container_statuses.as_ref().unwrap()[0];
        assert!(!cs.ready);
        assert_eq!(
            cs.state
                .as_ref()
                .unwrap()
                .waiting
                .as_ref()
                .unwrap()
                .reason
                .as_deref(),
            Some("ImagePullBackOff")
        );
        let ready = |s: &PodStatus| {
            s.conditions
                .iter()
                .flatten()
                .find(|c| c.type_ == "Ready")
                .map(|c| c.status.clone())
        };
        assert_eq!(ready(&waiting).as_deref(), Some("False"));

        let running = pod_status(
            &spec,
            &[ContainerPhase::Running {
                container_id: "c1".into(),
                image_id: "r/app@sha256:ab".into(),
                started_at: now,
            }],
            now,
        );
        assert_eq!(running.phase.as_deref(), Some("Running"));
        assert_eq!(ready(&running).as_deref(), Some("True"));
        let cs = &running.container_statuses.as_ref().unwrap()[0];
        assert_eq!(
            (cs.image.as_str(), cs.image_id.as_str()),
            ("r/app:latest", "r/app@sha256:ab")
        );
        assert_eq!(cs.container_id.as_deref(), Some("containerd://c1"));
    }
}
