//! The policy engine: watches the selected workloads, resolves their tags, computes
//! drift against what the agents report, warms the new image on the nodes, then rolls
//! the workload with one merge patch, and reports every cycle.
//!
//! `run` starts it through [`spawn`]; the returned router serves `/report` and the
//! registry webhook. Decisions are the pure functions of [`crate::drift`]; this module
//! does the I/O around them.

mod act;
mod command;
mod confirm;
mod cycle;
mod metrics;
mod nodes;
mod notify;
mod once;
mod secrets;
mod watch;
mod watch_health;
pub mod webhook;

pub use watch_health::WatchHealth;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::State as AxumState;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use futures::StreamExt;
use jiff::Timestamp;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use warmroll_proto::image::ImageRef;

use crate::config::{Config, Policy};
use crate::drift::{ContainerDrift, Lookup, Running, container_drift, tracked_containers};
use crate::registry::{
    Keyring, RegistryError, Resolution, Resolver, ResolverConfig, default_docker_config,
};
use crate::report::Report;
use crate::run::Context;
use crate::workload::Workload;

pub use command::{ReportArgs, ReportError, fetch_report, report_command};
use metrics::EngineMetrics;
pub use once::report_once;

/// A running engine: its routes (state applied) and its task, which runs until
/// shutdown and ends early only with why (a workload watch ended).
pub struct Engine {
    pub router: Router,
    pub task: JoinHandle<Result<(), String>>,
    /// The workload watches the API server forbids, for `/readyz`.
    pub watches: WatchHealth,
}

/// Why the engine cannot start.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot read CA bundle {path}: {source}")]
    ReadCaFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read the webhook secret file {path}: {source}")]
    ReadWebhookSecret {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the webhook secret file {path} is empty: an empty secret would let any request through"
    )]
    EmptyWebhookSecret { path: std::path::PathBuf },
    #[error("registry settings: {0}")]
    Registry(#[from] RegistryError),
    #[error("cannot list {what}: {source}")]
    List { what: String, source: kube::Error },
    #[error(transparent)]
    Notify(#[from] notify::NotifyError),
}

/// What the engine's task and its HTTP handlers share.
pub(crate) struct Shared {
    report: RwLock<Option<Report>>,
    /// Tags (`repository:tag`) a webhook said were pushed, and when.
    pushed: Mutex<Vec<(String, Timestamp)>>,
    nudge: Notify,
    webhook_secret: Option<String>,
    metrics: EngineMetrics,
    /// Outbound notifications on rollout transitions.
    notifier: notify::Notifier,
}

impl Shared {
    fn set_report(&self, report: Report) {
        *self.report.write().unwrap_or_else(PoisonError::into_inner) = Some(report);
    }

    pub(crate) fn push_notified(&self, images: Vec<String>) {
        if images.is_empty() {
            return;
        }
        let now = Timestamp::now();
        self.pushed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(images.into_iter().map(|i| (i, now)));
        self.nudge.notify_one();
    }

    fn take_pushed(&self) -> Vec<(String, Timestamp)> {
        std::mem::take(&mut *self.pushed.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// Builds the resolver and keyring from the configuration's registry settings.
pub fn resolver_for(config: &Config) -> Result<(Resolver, Keyring), EngineError> {
    let mut keyring = Keyring::new();
    match &config.registry.docker_config {
        Some(path) => keyring.add_docker_config_path(path)?,
        // As docker, skopeo and krar: the home's Docker config, when there is one.
        None => {
            if let Some(file) = default_docker_config(|name| std::env::var(name).ok())
                && keyring.add_docker_config_if_present(&file)?
            {
                tracing::info!(path = %file.display(), "using the default Docker config's registry credentials");
            }
        }
    }
    for configured in &config.registry.credentials {
        keyring.add(
            &configured.registry,
            configured.credentials.clone(),
            &format!("configured credentials for {}", configured.registry),
        );
    }
    let mut ca_files = config.registry.ca_files.clone();
    for registry in &config.registry.registries {
        if let Some(dir) = &registry.secret_dir {
            keyring.add_registry_dir(
                &registry.hostname_pattern,
                dir,
                registry.token_key.as_deref(),
                registry.username.as_deref(),
            )?;
        }
        ca_files.extend(registry.ca_file.clone());
    }
    let mut ca_bundles_pem = Vec::new();
    for path in &ca_files {
        let pem = std::fs::read(path).map_err(|source| EngineError::ReadCaFile {
            path: path.clone(),
            source,
        })?;
        ca_bundles_pem.push(pem);
    }
    let resolver = Resolver::new(
        ResolverConfig {
            insecure_registries: config.registry.insecure_registries.clone(),
            ca_bundles_pem,
            artifactory_fallback: config
                .registry
                .registries
                .iter()
                .filter(|r| r.artifactory_fallback)
                .map(|r| r.hostname_pattern.clone())
                .collect(),
            // The engine decides when to ask (per policy poll interval, or a webhook).
            min_interval: Duration::from_millis(500),
            ..ResolverConfig::default()
        },
        keyring.clone(),
    )?;
    Ok((resolver, keyring))
}

/// Starts the engine. Registers its metrics (and the resolver's) into `metrics`.
pub fn spawn(
    ctx: Context,
    config: Config,
    metrics: &mut prometheus_client::registry::Registry,
) -> Result<Engine, EngineError> {
    let (resolver, keyring) = resolver_for(&config)?;
    resolver.register_metrics(metrics);
    let webhook_secret = config
        .webhook_secret_file
        .as_deref()
        .map(webhook::read_secret)
        .transpose()?;
    let shared = Arc::new(Shared {
        report: RwLock::new(None),
        pushed: Mutex::new(Vec::new()),
        nudge: Notify::new(),
        webhook_secret,
        metrics: EngineMetrics::register(metrics),
        notifier: notify::Notifier::start(&config.notifications, metrics)?,
    });
    let confirmer = confirm::PodConfirmer::new(ctx.client.clone(), metrics);
    let router = Router::new()
        .route("/report", get(report_handler))
        .route("/webhooks/registry", post(webhook::handler))
        .with_state(shared.clone());
    let watches = WatchHealth::default();
    watches.register(metrics);
    let task = tokio::spawn(cycle::run(
        ctx,
        config,
        resolver,
        keyring,
        shared,
        watches.clone(),
        confirmer,
    ));
    Ok(Engine {
        router,
        task,
        watches,
    })
}

async fn report_handler(AxumState(shared): AxumState<Arc<Shared>>) -> impl IntoResponse {
    let report = shared
        .report
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    match report {
        Some(report) => Json(report).into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "no report yet: the first cycle has not finished\n",
        )
            .into_response(),
    }
}

/// The form webhooks and the engine compare images in: `repository:tag`. The registry
/// is left out: a webhook names the registry by the host it was reached at, which need
/// not be how workloads name it (a spare re-resolve costs one HEAD).
pub(crate) fn tag_key(image: &warmroll_proto::image::ImageRef) -> Option<String> {
    image.tag().map(|t| format!("{}:{t}", image.repository()))
}

/// Registry requests in flight at once.
const RESOLVE_CONCURRENCY: usize = 16;

/// Resolves each unique tag once, concurrently, with the pull-secret credentials given
/// for it (the first keyring that has credentials for the image wins; the resolver's own
/// keyring comes after). Pinned references need no entry.
pub(crate) async fn resolve_all(
    resolver: &Resolver,
    images: impl IntoIterator<Item = (ImageRef, Keyring)>,
) -> HashMap<ImageRef, Lookup> {
    let mut keyrings: HashMap<ImageRef, Keyring> = HashMap::new();
    for (image, keyring) in images {
        let has = |k: &Keyring| !k.lookup(&image).is_empty();
        match keyrings.get(&image) {
            Some(existing) if has(existing) || !has(&keyring) => {}
            _ => {
                keyrings.insert(image, keyring);
            }
        }
    }
    futures::stream::iter(keyrings)
        .map(|(image, keyring)| async move {
            let lookup = match resolver.resolve(&image, &keyring).await {
                Ok(Resolution::Tag(resolved)) => Lookup::Tag(resolved),
                Ok(Resolution::Pinned { .. }) => return None,
                Err(e) => Lookup::Error(e.to_string()),
            };
            Some((image, lookup))
        })
        .buffer_unordered(RESOLVE_CONCURRENCY)
        .filter_map(|r| async move { r })
        .collect()
        .await
}

/// The drift of a workload's tracked containers.
pub(crate) fn containers_of(
    workload: &Workload,
    policy: &Policy,
    lookups: &HashMap<ImageRef, Lookup>,
    pods: &[Running],
) -> Vec<ContainerDrift> {
    tracked_containers(workload, policy)
        .map(|c| {
            let lookup = ImageRef::parse(&c.image).ok().and_then(|i| lookups.get(&i));
            container_drift(c, lookup, pods)
        })
        .collect()
}
