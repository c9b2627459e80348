//! `warmroll-coordinator report`: the drift report as a table (or JSON), from a running
//! coordinator's `/report` (with a bearer token, see [`crate::http::reader`]), or
//! computed once against a cluster (`--once`).

use std::io::Write;
use std::path::PathBuf;

use clap::Args;

use super::{EngineError, report_once, resolver_for};
use crate::config::{Config, ConfigError};
use crate::http::reader::{Credential, ReaderArgs};
use crate::report::Report;

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The running coordinator to ask, and the token to present.
    #[command(flatten)]
    pub coordinator: ReaderArgs,
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
    #[error("{url} answered {status}: {body} (presented {credential})")]
    Refused {
        url: String,
        status: u16,
        body: String,
        /// Which token was presented, never the token.
        credential: String,
    },
    #[error("{url} answered more than {limit} bytes")]
    TooLarge { url: String, limit: usize },
    #[error(
        "cannot get a token of ServiceAccount {account} for the coordinator (TokenRequest; or pass --token): {source}"
    )]
    TokenRequest {
        account: String,
        source: kube::Error,
    },
    #[error("cannot get the kubeconfig's bearer token: {0}")]
    KubeconfigToken(String),
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
        let credential = args.coordinator.credential().await?;
        fetch_report(&args.coordinator.url, &credential).await?
    };
    if args.json {
        serde_json::to_writer_pretty(&mut *out, &report)?;
        writeln!(out)?;
    } else {
        out.write_all(report.table().as_bytes())?;
    }
    Ok(())
}

/// The largest `/report` read (a report of ten thousand workloads is a few MiB).
pub const MAX_REPORT_BYTES: usize = 64 << 20;

/// The largest error answer quoted in a message.
const MAX_QUOTED_BYTES: usize = 4096;

/// A running coordinator's `/report`, presenting `credential`.
pub async fn fetch_report(base: &str, credential: &Credential) -> Result<Report, ReportError> {
    let url = format!("{}/report", base.trim_end_matches('/'));
    let fetch_err = |source| ReportError::Fetch {
        url: url.clone(),
        source,
    };
    let mut request = reqwest::Client::new().get(&url);
    if let Some(token) = credential.bearer() {
        request = request.bearer_auth(token.expose());
    }
    let mut response = request.send().await.map_err(fetch_err)?;
    let status = response.status();
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(fetch_err)? {
        if body.len() + chunk.len() > MAX_REPORT_BYTES {
            return Err(ReportError::TooLarge {
                url,
                limit: MAX_REPORT_BYTES,
            });
        }
        body.extend_from_slice(&chunk);
    }
    if !status.is_success() {
        let quoted = String::from_utf8_lossy(body.get(..MAX_QUOTED_BYTES).unwrap_or(&body))
            .trim()
            .to_owned();
        let code = status.as_u16();
        return Err(if matches!(code, 401 | 403) {
            ReportError::Refused {
                url,
                status: code,
                body: quoted,
                credential: credential.source().to_owned(),
            }
        } else {
            ReportError::Status {
                url,
                status: code,
                body: quoted,
            }
        });
    }
    serde_json::from_slice(&body).map_err(|e| ReportError::Status {
        url,
        status: status.as_u16(),
        body: format!("not a warmroll report: {e}"),
    })
}
