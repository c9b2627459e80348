//! `warmroll-sandbox demo`: watch warmroll keep a Deployment and a DaemonSet on a
//! mutable tag, with the new image pulled onto every node before the rollout: on a real
//! Kubernetes (`warmroll_sandbox::real`), or with `--stand-in` in the in-process sandbox.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::{Parser, Subcommand};
use warmroll_proto::units::{human_bytes, parse_bytes, parse_duration};
use warmroll_sandbox::print::{indent, secs, step};
use warmroll_sandbox::real::{self, RealOptions};
use warmroll_sandbox::sandbox::Rollout;
use warmroll_sandbox::{Progress, Sandbox, SandboxOptions, WarmMode, Workload};

#[derive(Parser, Debug)]
#[command(name = "warmroll-sandbox", version, about)]
struct Cli {
    /// Log filter for the demo process's logs (stderr): warmroll's own with --stand-in
    /// (e.g. info or warmroll_coordinator=debug; on the real cluster warmroll logs in its
    /// pods). By default errors only, less the Kubernetes client's failed requests while
    /// the API server starts (the demo retries them).
    #[arg(
        long,
        global = true,
        env = "WARMROLL_SANDBOX_LOG",
        default_value = "error,kube_client::client::builder=off"
    )]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start a registry and a real Kubernetes cluster (built by scripts/build-kubernetes;
    /// WARMROLL_KUBE_BIN names its bin dir), install warmroll with its Helm chart (images
    /// of the release binaries); deploy a labelled Deployment and DaemonSet on
    /// app:latest; push a new build and show the warm-up per node, the rollout and the
    /// converged state from the cluster's own records; clean up. Needs root.
    Demo(DemoArgs),
}

#[derive(clap::Args, Debug)]
struct DemoArgs {
    /// Run on the in-process stand-ins instead (a Kubernetes API stand-in with our own
    /// kubelet and controller loops over real containerd nodes, the agents and the
    /// coordinator in this process): faster, no Kubernetes build or release build needed.
    #[arg(long, env = "WARMROLL_SANDBOX_STAND_IN")]
    stand_in: bool,
    /// Nodes in the cluster (real kubelets, or stand-in nodes with --stand-in).
    #[arg(long, env = "WARMROLL_SANDBOX_NODES", default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..))]
    nodes: u8,
    /// Size of the random layer in each build of the image (e.g. 32MiB, 500MiB).
    #[arg(long, env = "WARMROLL_SANDBOX_IMAGE_SIZE", default_value = "32MiB", value_parser = parse_bytes)]
    image_size: u64,
    /// Bandwidth of the registry link during the rollout, per second, shared by all
    /// nodes (e.g. 8MiB; 0 = unlimited).
    #[arg(long, env = "WARMROLL_SANDBOX_BANDWIDTH", default_value = "16MiB", value_parser = parse_bytes)]
    bandwidth: u64,
    /// Delay the registry link adds to each request (e.g. 20ms).
    #[arg(long, env = "WARMROLL_SANDBOX_LATENCY", default_value = "0s", value_parser = parse_duration)]
    latency: Duration,
    /// Deployment replicas.
    #[arg(long, env = "WARMROLL_SANDBOX_REPLICAS", default_value_t = 3)]
    replicas: u32,
    /// Patch at once instead of warming first (the policy's `warm: {enabled: false}`).
    #[arg(long, env = "WARMROLL_SANDBOX_NO_WARM")]
    no_warm: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let Command::Demo(args) = cli.command;
    let outcome = runtime.block_on(async {
        tokio::select! {
            result = demo(args) => result.map(|()| true),
            // Dropping the demo's future drops the sandbox: its guards stop everything.
            _ = tokio::signal::ctrl_c() => Ok(false),
        }
    });
    // Give aborted tasks a moment to drop their guards before the runtime goes.
    runtime.shutdown_timeout(Duration::from_secs(10));
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("interrupted: the sandbox was stopped and removed");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn demo(args: DemoArgs) -> Result<()> {
    if args.stand_in {
        return stand_in(args).await;
    }
    real::demo(&RealOptions {
        nodes: args.nodes,
        image_size: args.image_size,
        bandwidth: args.bandwidth,
        latency: args.latency,
        replicas: args.replicas,
        no_warm: args.no_warm,
    })
    .await
    .map(drop)
}

/// The demo on the in-process stand-ins (`--stand-in`).
async fn stand_in(args: DemoArgs) -> Result<()> {
    let started = Instant::now();
    let nodes = usize::from(args.nodes);
    let replicas = usize::try_from(args.replicas)?;
    let warm = if args.no_warm {
        WarmMode::Off
    } else {
        WarmMode::Gated
    };
    step(&format!(
        "starting the sandbox: registry, {} containerd nodes with kubelet/controller loops, {} agents, coordinator ({})",
        nodes,
        nodes,
        warm.label()
    ));
    let sandbox = Sandbox::start(SandboxOptions {
        nodes,
        warm,
        latency: args.latency,
        ..SandboxOptions::default()
    })
    .await?;
    println!(
        "   up in {} - registry {}, coordinator /report on http://{}, agents connected: {}",
        secs(started.elapsed()),
        sandbox.registry().host(),
        sandbox.coordinator().http_addr(),
        sandbox.coordinator().ready_agents()
    );

    step(&format!(
        "pushing app:latest (build 1, {})",
        human_bytes(args.image_size)
    ));
    let first = sandbox
        .images()
        .push_random("app", "latest", args.image_size)
        .await?;
    println!("   app:latest -> {}", first.manifest_digest);
    let workloads = [
        Workload::deployment("web", &first.reference, replicas),
        Workload::daemonset("node-cache", &first.reference),
    ];
    step("deploying, labelled warmroll.io/policy=sandbox");
    for w in &workloads {
        let t = Instant::now();
        sandbox.deploy(w, Duration::from_secs(180)).await?;
        println!(
            "   {} {} rolled out ({} pods) in {}",
            w.kind,
            w.name,
            w.pods(nodes),
            secs(t.elapsed())
        );
    }
    let report = settled_report(&sandbox, &workloads, nodes).await?;
    println!("   coordinator report:\n{}", indent(&report.table()));

    let bandwidth = (args.bandwidth > 0).then_some(args.bandwidth);
    sandbox.registry().set_bandwidth(bandwidth);
    step(&format!(
        "pushing a new build under app:latest ({}, registry link now {})",
        human_bytes(args.image_size),
        bandwidth.map_or("unlimited".to_owned(), |b| format!("{}/s", human_bytes(b)))
    ));
    let rollouts = sandbox
        .roll(
            &workloads,
            sandbox
                .images()
                .push_random("app", "latest", args.image_size),
            Duration::from_secs(300),
            show,
        )
        .await?;
    if let Some(first) = rollouts.first() {
        println!(
            "   (times from the end of the push; new digest {})",
            first.digest
        );
    }

    step("converged");
    let report = settled_report(&sandbox, &workloads, nodes).await?;
    println!("{}", indent(&report.table()));
    summary(&rollouts, nodes);
    step("cleaning up");
    let t = Instant::now();
    sandbox.stop().await;
    println!(
        "   stopped in {}; demo took {}",
        secs(t.elapsed()),
        secs(started.elapsed())
    );
    Ok(())
}

/// The report once it lists every workload, each in sync (or converged) with all its
/// pods on one digest; the last report after 30 s otherwise.
async fn settled_report(
    sandbox: &Sandbox,
    workloads: &[Workload],
    nodes: usize,
) -> Result<warmroll_coordinator::report::Report> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let report = sandbox.report().await?;
        let settled = workloads.iter().all(|w| {
            report
                .workloads
                .iter()
                .find(|r| r.name == w.name)
                .is_some_and(|r| {
                    r.containers.iter().all(|c| {
                        matches!(c.state.name(), "in-sync" | "converged")
                            && c.running.len() == 1
                            && c.running.iter().map(|r| r.pods).sum::<usize>() == w.pods(nodes)
                    })
                })
        });
        if settled || Instant::now() > deadline {
            return Ok(report);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn show(progress: Progress<'_>) {
    match progress {
        Progress::Drift { workload, report } => {
            println!(
                "   drift report ({} {} drifting):\n{}",
                workload.kind,
                workload.name,
                indent(&report.table())
            );
        }
        Progress::Warm { node, after } => {
            println!("   {} warm-up: {node} holds the new image", secs(after));
        }
        Progress::Patched {
            workload,
            after,
            reason,
        } => println!(
            "   {} rollout: {} {} patched ({})",
            secs(after),
            workload.kind,
            workload.name,
            reason.unwrap_or("no reason recorded")
        ),
        Progress::PodReady {
            workload,
            pod,
            node,
            after,
        } => println!(
            "   {}   {} pod {pod} ready on {node}",
            secs(after),
            workload.name
        ),
        Progress::Converged { workload, after } => println!(
            "   {} converged: every pod of {} {} runs the new build",
            secs(after),
            workload.kind,
            workload.name
        ),
    }
}

fn summary(rollouts: &[Rollout], nodes: usize) {
    for r in rollouts {
        let w = &r.workload;
        let opt = |d: Option<Duration>| d.map_or("-".to_owned(), secs);
        println!(
            "   {} {}: drift seen {}, patched {}, converged {}; per pod not-ready max {} (mean {}), pod start mean {}",
            w.kind,
            w.name,
            opt(r.drift_seen),
            opt(r.patched),
            opt(r.converged),
            opt(r.max_gap()),
            opt(r.mean_gap()),
            opt(r.mean_start()),
        );
        let node_names: Vec<String> = (1..=nodes).map(|i| format!("node-{i}")).collect();
        let targets: Vec<String> = match w.kind {
            warmroll_sandbox::Kind::DaemonSet => node_names,
            warmroll_sandbox::Kind::Deployment => r.starts.iter().map(|s| s.node.clone()).collect(),
        };
        println!(
            "      new image on every target node before the patch: {}; coordinator API writes: {} merge patch(es), {} event(s), {} other",
            if r.warm_before_patch(&targets) {
                "yes"
            } else {
                "no"
            },
            r.writes.workload_patches,
            r.writes.events,
            r.writes.other.len()
        );
        for other in &r.writes.other {
            println!("      other write: {other}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {}

    #[test]
    fn the_demo_flags_parse() {
        let cli = Cli::try_parse_from([
            "warmroll-sandbox",
            "demo",
            "--nodes",
            "2",
            "--bandwidth",
            "4MiB",
        ])
        .unwrap();
        let Command::Demo(args) = cli.command;
        assert_eq!(args.nodes, 2);
        assert_eq!(args.bandwidth, 4 << 20);
        assert_eq!(args.image_size, 32 << 20);
        assert_eq!(args.replicas, 3);
        assert!(!args.no_warm);
        assert!(!args.stand_in, "the real cluster is the default");
    }

    #[test]
    fn stand_in_is_a_flag_and_nodes_must_be_one_to_255() {
        let cli = Cli::try_parse_from(["warmroll-sandbox", "demo", "--stand-in"]).unwrap();
        let Command::Demo(args) = cli.command;
        assert!(args.stand_in);
        assert_eq!(args.nodes, 3);
        for nodes in ["0", "256"] {
            assert!(
                Cli::try_parse_from(["warmroll-sandbox", "demo", "--nodes", nodes]).is_err(),
                "--nodes {nodes}"
            );
        }
    }
}
