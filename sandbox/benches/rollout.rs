//! rollout-bench: warm-gated rollouts against "patch at once", in the sandbox (a real
//! registry behind a throttled link, real containerd nodes, in-process agents and
//! coordinator).
//!
//! For each image size, for a DaemonSet and a Deployment, a new build is pushed under
//! the workload's tag and timed until every pod runs it: each pod's not-ready time (old
//! pod gone until its replacement is ready), each new pod's start (created until ready),
//! push to patch and push to converged. Also the coordinator's API writes per rolled
//! workload and the registry HEADs per unique tag per poll in a steady state.
//!
//! `cargo bench -p warmroll-sandbox --bench rollout`; tune with WARMROLL_BENCH_SIZES_MIB
//! (default 10,100,500), WARMROLL_BENCH_BANDWIDTH_MIB (the registry link during the
//! rollouts, MiB/s shared by all nodes; default 50), WARMROLL_BENCH_NODES (3),
//! WARMROLL_BENCH_REPLICAS (Deployment replicas, 3). Figures are printed, not asserted.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use warmroll_sandbox::sandbox::{RegistryPolls, Rollout};
use warmroll_sandbox::{Sandbox, SandboxOptions, WarmMode, Workload};

const MIB: u64 = 1 << 20;
/// Manifest HEADs are counted over this many poll intervals of a steady state.
const STEADY_POLLS: u32 = 5;

struct Settings {
    sizes_mib: Vec<u64>,
    bandwidth_mib: u64,
    nodes: usize,
    replicas: usize,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> Result<T> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("{name}={v:?} is not a valid number")),
        Err(_) => Ok(default),
    }
}

fn settings() -> Result<Settings> {
    let sizes = std::env::var("WARMROLL_BENCH_SIZES_MIB").unwrap_or_else(|_| "10,100,500".into());
    let sizes_mib = sizes
        .split(',')
        .map(|s| {
            s.trim()
                .parse::<u64>()
                .ok()
                .filter(|n| *n > 0)
                .with_context(|| format!("WARMROLL_BENCH_SIZES_MIB: {s:?} is not a size in MiB"))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Settings {
        sizes_mib,
        bandwidth_mib: env_or("WARMROLL_BENCH_BANDWIDTH_MIB", 50)?,
        nodes: env_or("WARMROLL_BENCH_NODES", 3)?,
        replicas: env_or("WARMROLL_BENCH_REPLICAS", 3)?,
    })
}

struct Row {
    size_mib: u64,
    mode: WarmMode,
    rollout: Rollout,
    polls: Option<RegistryPolls>,
}

/// One sandbox per size and mode: both workloads, rolled one after the other (each on
/// its own repository, so they never share the link).
async fn measure(settings: &Settings, size_mib: u64, mode: WarmMode) -> Result<Vec<Row>> {
    let sandbox = Sandbox::start(SandboxOptions {
        nodes: settings.nodes,
        warm: mode,
        ..SandboxOptions::default()
    })
    .await?;
    let bytes = size_mib * MIB;
    let ds_image = sandbox
        .images()
        .push_random("ds-app", "latest", bytes)
        .await?;
    let web_image = sandbox
        .images()
        .push_random("web-app", "latest", bytes)
        .await?;
    let workloads = [
        Workload::daemonset("node-cache", &ds_image.reference),
        Workload::deployment("web", &web_image.reference, settings.replicas),
    ];
    for w in &workloads {
        sandbox.deploy(w, Duration::from_secs(600)).await?;
    }
    // The slow link is for the rollouts; the initial pulls run at full speed.
    sandbox
        .registry()
        .set_bandwidth(Some(settings.bandwidth_mib * MIB));
    // Generous: every node pulls the image one after the other, three times over.
    let link_time = Duration::from_secs_f64(
        (size_mib * settings.nodes as u64) as f64 / settings.bandwidth_mib.max(1) as f64,
    );
    let timeout = Duration::from_secs(180) + link_time * 3;
    let mut rows = Vec::new();
    for w in &workloads {
        let repository = w
            .image
            .rsplit_once('/')
            .and_then(|(_, r)| r.split_once(':'))
            .map(|(r, _)| r.to_owned())
            .context("workload image without repository:tag")?;
        let rollout = sandbox
            .roll(
                std::slice::from_ref(w),
                sandbox.images().push_random(&repository, "latest", bytes),
                timeout,
                |_| {},
            )
            .await?;
        for r in rollout {
            rows.push(Row {
                size_mib,
                mode,
                rollout: r,
                polls: None,
            });
        }
    }
    let polls = sandbox.registry_polls(STEADY_POLLS).await;
    for row in &mut rows {
        row.polls = Some(polls.clone());
    }
    sandbox.stop().await;
    Ok(rows)
}

fn secs(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.1}", d.as_secs_f64()))
}

fn print_table(rows: &[Row]) {
    println!(
        "\n| image | workload | mode | not-ready per pod, max / mean (s) | pod start mean (s) | push→patch (s) | push→converged (s) | API writes per rollout (patch / events / other) | registry HEADs per tag per poll |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for row in rows {
        let r = &row.rollout;
        let heads = row.polls.as_ref().map_or("-".into(), |p| {
            format!(
                "{:.2} ({} HEADs, {} tags, {} polls)",
                p.heads_per_tag_per_poll(),
                p.heads.values().sum::<usize>(),
                p.heads.len(),
                p.polls
            )
        });
        println!(
            "| {} MiB | {} ({} pods) | {} | {} / {} | {} | {} | {} | {} / {} / {} | {} |",
            row.size_mib,
            r.workload.kind,
            r.starts.len(),
            row.mode.label(),
            secs(r.max_gap()),
            secs(r.mean_gap()),
            secs(r.mean_start()),
            secs(r.patched),
            secs(r.converged),
            r.writes.workload_patches,
            r.writes.events,
            r.writes.other.len(),
            heads
        );
    }
}

fn main() -> Result<()> {
    let settings = settings()?;
    let runtime = tokio::runtime::Runtime::new()?;
    let started = Instant::now();
    println!(
        "rollout-bench: sizes {:?} MiB, registry link {} MiB/s shared by {} nodes, Deployment replicas {}",
        settings.sizes_mib, settings.bandwidth_mib, settings.nodes, settings.replicas
    );
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for &size in &settings.sizes_mib {
        for mode in [WarmMode::Gated, WarmMode::Off] {
            let t = Instant::now();
            match runtime.block_on(measure(&settings, size, mode)) {
                Ok(mut measured) => {
                    println!(
                        "  {size} MiB, {}: done in {:.0}s",
                        mode.label(),
                        t.elapsed().as_secs_f64()
                    );
                    rows.append(&mut measured);
                }
                Err(e) => {
                    println!("  {size} MiB, {}: FAILED: {e:#}", mode.label());
                    failures.push(format!("{size} MiB {}: {e:#}", mode.label()));
                }
            }
        }
    }
    rows.sort_by_key(|r| (r.rollout.workload.kind.as_str(), r.size_mib, r.mode.label()));
    print_table(&rows);
    println!(
        "\nnot-ready per pod: from the old pod's deletion until its replacement is ready (a DaemonSet slot is a node; a Deployment's pods form one pool, surge pods leave no gap). pod start: a new pod's creation until ready. Times from the end of the push. Total {:.0}s.",
        started.elapsed().as_secs_f64()
    );
    for f in &failures {
        println!("failed: {f}");
    }
    runtime.shutdown_timeout(Duration::from_secs(10));
    Ok(())
}
