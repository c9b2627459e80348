//! `warmroll-agent`: the node agent's command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use k8s_cri::v1::VersionResponse;
use tokio::sync::mpsc;
use tracing::{info, warn};
use warmroll_agent::cli::{Cli, Command, InventoryArgs, LogFormat};
use warmroll_agent::containerd::{ContentStore, EventSource};
use warmroll_agent::cri::{self, Backoff, CriClient};
use warmroll_agent::http;
use warmroll_agent::inventory::{self, Collector, InventoryUpdate};
use warmroll_agent::metrics::{Health, Metrics};
use warmroll_agent::node::{self, NodeAgent};
use warmroll_agent::progress::PullProgress;
use warmroll_agent::warm::Warmer;
use warmroll_proto::fleet::Credentials;
use warmroll_proto::image::{Digest, ImageRef};

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    let metrics = Metrics::new();
    let health = Arc::new(Health::default());
    let cri_only = cli.cri_only;
    match cli.command {
        Command::Inventory { json } => {
            let (client, _) = cri::connect(cli.cri_socket.as_deref(), metrics, health).await?;
            let snapshot = Collector::new(Arc::new(client)).snapshot().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&snapshot)?);
            } else {
                print!("{}", inventory::render_table(&snapshot));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Pull {
            image,
            expect,
            username,
            password,
            registry_token,
            timeout,
            warm,
        } => {
            let image = ImageRef::parse(&image)?;
            let expect = expect.map(|d| Digest::parse(&d)).transpose()?;
            let credentials = match (username, password, registry_token) {
                (Some(username), Some(password), _) => {
                    Some(Credentials::Basic { username, password })
                }
                (_, _, Some(token)) => Some(Credentials::Token(token)),
                _ => None,
            };
            let (client, version) =
                cri::connect(cli.cri_socket.as_deref(), metrics.clone(), health).await?;
            let api = node::containerd_api(&client, &version, cri_only).await;
            let content = api.map(|a| Arc::new(a) as Arc<dyn ContentStore>);
            let warmer = Warmer::new(Arc::new(client), content, warm, metrics);
            let deadline = tokio::time::Instant::now() + timeout;
            let warming = warmer.warm(&image, expect.as_ref(), credentials, deadline);
            let shown = tokio::spawn(show_progress(warming.progress()));
            let outcome = warming.await;
            // The display ends with the pull (its sender is gone).
            let _ = shown.await;
            match outcome {
                Ok(ok) => {
                    println!(
                        "ok: {} is {} (image {}) after {:.1}s, {}",
                        ok.image,
                        ok.digest
                            .as_ref()
                            .map_or_else(|| "-".to_string(), ToString::to_string),
                        ok.image_id,
                        ok.duration.as_secs_f64(),
                        if ok.downloaded {
                            "downloaded"
                        } else {
                            "already present"
                        }
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("error ({}): {e}", e.outcome());
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Command::Watch {
            inventory: args,
            listen,
        } => watch(cli.cri_socket, cri_only, args, listen, metrics, health).await,
        Command::Run {
            session,
            inventory: args,
            listen,
            warm,
        } => {
            let server = serve_health(listen, args.inventory_interval, &metrics, &health).await?;
            let (client, version) = tokio::select! {
                c = connect_forever(cli.cri_socket, metrics.clone(), health.clone()) => c,
                () = shutdown_signal() => return Ok(ExitCode::SUCCESS),
            };
            let agent = NodeAgent {
                session,
                intervals: args.intervals(),
                warm,
                cri_only,
            };
            node::run(client, version, agent, metrics, health, shutdown_signal()).await;
            server.abort();
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Shows a pull's progress until it ends: a live bar on a terminal, else one plain line
/// per change (at most one a second).
async fn show_progress(mut progress: tokio::sync::watch::Receiver<Option<PullProgress>>) {
    use indicatif::{HumanBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};
    use std::io::IsTerminal;
    let terminal = std::io::stdout().is_terminal();
    let mut bar: Option<ProgressBar> = None;
    while progress.changed().await.is_ok() {
        let Some(p) = *progress.borrow_and_update() else {
            continue;
        };
        if !terminal {
            match (p.percent(), p.total) {
                (Some(pct), Some(total)) => println!(
                    "pulling: {pct} %, {} of {}",
                    HumanBytes(p.done),
                    HumanBytes(total)
                ),
                _ => println!("pulling: {}", HumanBytes(p.done)),
            }
            continue;
        }
        let bar = bar.get_or_insert_with(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stdout());
            if let Ok(style) = ProgressStyle::with_template(
                "pulling [{bar:40}] {percent:>3} % {bytes} of {total_bytes} ({bytes_per_sec}, {eta})",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar
        });
        if let Some(total) = p.total {
            bar.set_length(total);
        }
        bar.set_position(p.done);
    }
    if let Some(bar) = bar {
        bar.finish();
    }
}

/// Find the runtime, retrying with backoff until one answers (the agent does not exit
/// because the runtime is not up yet).
async fn connect_forever(
    socket: Option<PathBuf>,
    metrics: Metrics,
    health: Arc<Health>,
) -> (CriClient, VersionResponse) {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        match cri::connect(socket.as_deref(), metrics.clone(), health.clone()).await {
            Ok(found) => return found,
            Err(e) => {
                let delay = backoff.next_delay();
                warn!(error = %e, retry_in = ?delay, "no container runtime yet");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Starts the health and metrics server; healthy while the runtime answered within
/// max(3 × the inventory interval, 30 s).
async fn serve_health(
    listen: SocketAddr,
    inventory_interval: Duration,
    metrics: &Metrics,
    health: &Arc<Health>,
) -> Result<tokio::task::JoinHandle<std::io::Result<()>>> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the health and metrics server to {listen}"))?;
    let router = http::router(
        metrics.clone(),
        health.clone(),
        (inventory_interval * 3).max(Duration::from_secs(30)),
    );
    Ok(tokio::spawn(http::serve(listener, router)))
}

async fn watch(
    socket: Option<PathBuf>,
    cri_only: bool,
    args: InventoryArgs,
    listen: SocketAddr,
    metrics: Metrics,
    health: Arc<Health>,
) -> Result<ExitCode> {
    let server = serve_health(listen, args.inventory_interval, &metrics, &health).await?;
    let (client, version) = tokio::select! {
        c = connect_forever(socket, metrics.clone(), health.clone()) => c,
        () = shutdown_signal() => return Ok(ExitCode::SUCCESS),
    };
    let events = node::containerd_api(&client, &version, cri_only)
        .await
        .map(|a| Arc::new(a) as Arc<dyn EventSource>);
    let (tx, mut rx) = mpsc::channel(16);
    let inventory = tokio::spawn(inventory::run(
        Arc::new(client),
        events,
        args.intervals(),
        metrics,
        health,
        tx,
    ));
    loop {
        tokio::select! {
            update = rx.recv() => match update {
                Some(InventoryUpdate::Full(s)) => info!(
                    containers = s.containers.len(),
                    images = s.images.len(),
                    "inventory"
                ),
                Some(InventoryUpdate::Changes(c)) => info!(
                    added = c.added.len(),
                    removed = c.removed.len(),
                    changed = c.changed.len(),
                    images_added = c.images_added.len(),
                    images_removed = c.images_removed.len(),
                    images_changed = c.images_changed.len(),
                    changes = %serde_json::to_string(&c).unwrap_or_default(),
                    "inventory changed"
                ),
                None => break,
            },
            () = shutdown_signal() => break,
        }
    }
    inventory.abort();
    server.abort();
    Ok(ExitCode::SUCCESS)
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot listen for SIGTERM");
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
    info!("shutting down");
}
