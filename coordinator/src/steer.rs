//! `warmroll-coordinator approve` and `rollout`: steer one workload by annotating it.
//! The annotation is written with the caller's own Kubernetes credentials (kubeconfig
//! or in-cluster), so RBAC (`patch` on the workload) decides who may; the leader sees it
//! through its watch, and the same annotation works from kubectl or GitOps. Only
//! reading what awaits approval goes to the coordinator's HTTP port (`/report`, with a
//! bearer token: [`crate::http::reader`]); nothing is written through it.

use std::io::Write;

use clap::Args;
use jiff::Timestamp;
use serde_json::json;
use warmroll_proto::image::Digest;

use crate::drift::State;
use crate::engine::{ReportError, fetch_report};
use crate::http::reader::{Credential, ReaderArgs};
use crate::workload::{APPROVE_ANNOTATION, ROLLOUT_REQUEST_ANNOTATION, WorkloadKey, merge_patch};

#[derive(Debug, Args)]
pub struct ApproveArgs {
    /// The workload: NAMESPACE/KIND/NAME (KIND: Deployment, StatefulSet or DaemonSet).
    #[arg(env = "WARMROLL_WORKLOAD")]
    pub workload: String,
    /// The digest(s) to approve (comma-separated). Without: those the running
    /// coordinator's report says the workload awaits approval for.
    #[arg(long, env = "WARMROLL_APPROVE_DIGEST", value_delimiter = ',')]
    pub digest: Vec<String>,
    /// The running coordinator whose report says what awaits approval (read when no
    /// --digest is given), and the token to present.
    #[command(flatten)]
    pub coordinator: ReaderArgs,
}

#[derive(Debug, Args)]
pub struct RolloutArgs {
    /// The workload: NAMESPACE/KIND/NAME (KIND: Deployment, StatefulSet or DaemonSet).
    #[arg(env = "WARMROLL_WORKLOAD")]
    pub workload: String,
}

/// Why `approve` or `rollout` failed.
#[derive(Debug, thiserror::Error)]
pub enum SteerError {
    #[error("bad workload: {0}")]
    ParseWorkload(String),
    #[error("bad --digest: {0}")]
    ParseDigest(#[from] warmroll_proto::image::ImageError),
    #[error(transparent)]
    Report(#[from] ReportError),
    #[error("{workload} is not tracked by the coordinator at {url}")]
    NotTracked { workload: String, url: String },
    #[error("{workload} awaits no approval (its containers are {states})")]
    NotAwaiting { workload: String, states: String },
    #[error("building the Kubernetes client (kubeconfig or in-cluster config): {0}")]
    KubeClient(kube::Error),
    #[error("cannot annotate {workload}: {source}")]
    Annotate {
        workload: String,
        source: kube::Error,
    },
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
}

/// Runs `approve`: sets `warmroll.io/approve` to the digests awaiting approval.
pub async fn approve_command(
    args: ApproveArgs,
    out: &mut (dyn Write + Send),
) -> Result<(), SteerError> {
    let key = WorkloadKey::parse(&args.workload).map_err(SteerError::ParseWorkload)?;
    let digests = if args.digest.is_empty() {
        let credential = args.coordinator.credential().await?;
        awaiting(&key, &args.coordinator.url, &credential).await?
    } else {
        let mut digests = Vec::new();
        for text in &args.digest {
            digests.push(Digest::parse(text.trim())?.to_string());
        }
        digests
    };
    let value = approve(&client().await?, &key, &digests).await?;
    writeln!(
        out,
        "approved {key} for {value}: the leader patches it once it is warm (and its window is open)"
    )?;
    Ok(())
}

/// Runs `rollout`: sets `warmroll.io/rollout-requested` to now.
pub async fn rollout_command(
    args: RolloutArgs,
    out: &mut (dyn Write + Send),
) -> Result<(), SteerError> {
    let key = WorkloadKey::parse(&args.workload).map_err(SteerError::ParseWorkload)?;
    let value = request_rollout(&client().await?, &key).await?;
    writeln!(
        out,
        "asked for a warm restart of {key} ({ROLLOUT_REQUEST_ANNOTATION}={value}): the leader warms its nodes, then patches once"
    )?;
    Ok(())
}

/// Approves `digests` for `key`; returns the annotation's value.
pub async fn approve(
    client: &kube::Client,
    key: &WorkloadKey,
    digests: &[String],
) -> Result<String, SteerError> {
    let value = digests.join(",");
    annotate(client, key, APPROVE_ANNOTATION, &value).await?;
    Ok(value)
}

/// Asks for a warm restart of `key` now; returns the request's value (its time).
pub async fn request_rollout(
    client: &kube::Client,
    key: &WorkloadKey,
) -> Result<String, SteerError> {
    let value = Timestamp::now().to_string();
    annotate(client, key, ROLLOUT_REQUEST_ANNOTATION, &value).await?;
    Ok(value)
}

async fn client() -> Result<kube::Client, SteerError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    kube::Client::try_default()
        .await
        .map_err(SteerError::KubeClient)
}

/// The digests the coordinator's report at `url` says `key` awaits approval for.
pub async fn awaiting(
    key: &WorkloadKey,
    url: &str,
    credential: &Credential,
) -> Result<Vec<String>, SteerError> {
    let report = fetch_report(url, credential).await?;
    let workload = report
        .workloads
        .iter()
        .find(|w| w.namespace == key.namespace && w.kind == key.kind && w.name == key.name)
        .ok_or_else(|| SteerError::NotTracked {
            workload: key.to_string(),
            url: url.to_owned(),
        })?;
    let mut digests: Vec<String> = workload
        .containers
        .iter()
        .filter(|c| matches!(c.state, State::AwaitingApproval(_)))
        .filter_map(|c| c.registry_digest.as_ref().map(Digest::to_string))
        .collect();
    digests.sort();
    digests.dedup();
    if digests.is_empty() {
        let states: Vec<String> = workload
            .containers
            .iter()
            .map(|c| format!("{}: {}", c.container, c.state.name()))
            .collect();
        return Err(SteerError::NotAwaiting {
            workload: key.to_string(),
            states: states.join(", "),
        });
    }
    Ok(digests)
}

async fn annotate(
    client: &kube::Client,
    key: &WorkloadKey,
    annotation: &str,
    value: &str,
) -> Result<(), SteerError> {
    let body = json!({"metadata": {"annotations": {annotation: value}}});
    merge_patch(client, key, &body)
        .await
        .map_err(|source| SteerError::Annotate {
            workload: key.to_string(),
            source,
        })
}
