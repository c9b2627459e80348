//! `warmroll-coordinator report`: the drift report as a table (or JSON), from a running
//! coordinator's `/report`, or computed once against a cluster (`--once`).

use std::io::Write;
use std::path::PathBuf;

use clap::Args;

use super::{EngineError, report_once, resolver_for};
use crate::config::{Config, ConfigError};
use crate::report::Report;

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Base URL of a running coordinator's HTTP server.
    #[arg(long, env = "WARMROLL_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Compute the report directly against the cluster (kubeconfig or in-cluster),
    /// without agents: running digests from the pods' status.
    #[arg(long, env = "WARMROLL_REPORT_ONCE")]
    pub once: bool,
    /// The policy configuration file (with `--once`).
    #[arg(long, env = "WARMROLL_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long, env = "WARMROLL_JSON")]
    pub json: bool,
}

/// Why `report` failed.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("--once needs --config: which workloads to track comes from the policies")]
    NoConfig,
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("building the Kubernetes client (kubeconfig or in-cluster config): {0}")]
    KubeClient(kube::Error),
    #[error("cannot fetch {url}: {source}")]
    Fetch { url: String, source: reqwest::Error },
    #[error("{url} answered {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
    #[error("cannot encode the output: {0}")]
    Encode(#[from] serde_json::Error),
}

/// Runs `report`.
pub async fn report_command(
    args: ReportArgs,
    out: &mut (dyn Write + Send),
) -> Result<(), ReportError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let report = if args.once {
        let path = args.config.as_ref().ok_or(ReportError::NoConfig)?;
        let config = Config::load(path)?;
        let (resolver, _) = resolver_for(&config)?;
        let client = kube::Client::try_default()
            .await
            .map_err(ReportError::KubeClient)?;
        report_once(&client, &config, &resolver).await?
    } else {
        fetch_report(&args.url).await?
    };
    if args.json {
        serde_json::to_writer_pretty(&mut *out, &report)?;
        writeln!(out)?;
    } else {
        out.write_all(report.table().as_bytes())?;
    }
    Ok(())
}

/// A running coordinator's `/report`.
pub async fn fetch_report(base: &str) -> Result<Report, ReportError> {
    let url = format!("{}/report", base.trim_end_matches('/'));
    let fetch_err = |source| ReportError::Fetch {
        url: url.clone(),
        source,
    };
    let response = reqwest::get(&url).await.map_err(fetch_err)?;
    let status = response.status();
    if !status.is_success() {
        let body = response.text().await.unwrap_or_default();
        return Err(ReportError::Status {
            url,
            status: status.as_u16(),
            body: body.trim().to_owned(),
        });
    }
    let body = response.bytes().await.map_err(fetch_err)?;
    serde_json::from_slice(&body).map_err(|e| ReportError::Status {
        url,
        status: status.as_u16(),
        body: format!("not a warmroll report: {e}"),
    })
}
