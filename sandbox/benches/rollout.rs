//! rollout-bench: warm-gated rollouts against "patch at once", in the sandbox (a real
//! registry behind a throttled link, real containerd nodes, in-process agents and
//! coordinator).
//!
//! For each image size, for a DaemonSet and a Deployment, a new build is pushed under
//! the workload's tag and timed until every pod runs it, several times over: each pod's
//! not-ready time (old pod deleted until its replacement is ready, split into the old
//! pod's teardown, the controller's replacement and the new pod's start), each new pod's
//! start (created until ready), push to patch and push to converged. Also the
//! coordinator's API writes per rolled workload and the registry HEADs per unique tag per
//! poll in a steady state.
//!
//! `cargo bench -p warmroll-sandbox --bench rollout`; tune with WARMROLL_BENCH_SIZES_MIB
//! (default 10,100,500), WARMROLL_BENCH_BANDWIDTH_MIB (the registry link during the
//! rollouts, MiB/s shared by all nodes; default 50), WARMROLL_BENCH_NODES (3),
//! WARMROLL_BENCH_REPLICAS (Deployment replicas, 3), WARMROLL_BENCH_ROLLOUTS (rollouts
//! per workload, size and mode; 3). Figures are printed, not asserted.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use warmroll_sandbox::sandbox::{RegistryPolls, Rollout};
use warmroll_sandbox::{Kind, Sandbox, SandboxOptions, WarmMode, Workload};
use warmroll_tests::cluster::GapParts;

const MIB: u64 = 1 << 20;
/// Manifest HEADs are counted over this many poll intervals of a steady state.
const STEADY_POLLS: u32 = 5;

struct Settings {
    sizes_mib: Vec<u64>,
    bandwidth_mib: u64,
    nodes: usize,
    replicas: usize,
    rollouts: usize,
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
        rollouts: env_or("WARMROLL_BENCH_ROLLOUTS", 3)?.max(1),
    })
}

/// Every rollout of one workload at one size in one mode.
struct Row {
    size_mib: u64,
    mode: WarmMode,
    rollouts: Vec<Rollout>,
    polls: Option<RegistryPolls>,
}

impl Row {
    fn workload(&self) -> Option<&Workload> {
        self.rollouts.first().map(|r| &r.workload)
    }

    /// Every slot's not-ready time, over all rollouts.
    fn gaps(&self) -> Vec<Duration> {
        self.rollouts
            .iter()
            .flat_map(|r| r.gaps.iter().filter_map(|g| g.duration()))
            .collect()
    }

    /// Every slot's not-ready time split into teardown / replacement / start, where the
    /// replacement came after the old pod was gone.
    fn parts(&self) -> Vec<GapParts> {
        self.rollouts
            .iter()
            .flat_map(|r| r.gaps.iter().filter_map(|g| g.parts()))
            .collect()
    }

    fn starts(&self) -> Vec<Duration> {
        self.rollouts
            .iter()
            .flat_map(|r| r.starts.iter().map(|s| s.took))
            .collect()
    }

    fn patched(&self) -> Vec<Duration> {
        self.rollouts.iter().filter_map(|r| r.patched).collect()
    }

    fn converged(&self) -> Vec<Duration> {
        self.rollouts.iter().filter_map(|r| r.converged).collect()
    }
}

/// One sandbox per size and mode: both workloads, each rolled `settings.rollouts` times
/// one after the other (each on its own repository, so they never share the link).
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
        let mut rollouts = Vec::new();
        for _ in 0..settings.rollouts {
            let rolled = sandbox
                .roll(
                    std::slice::from_ref(w),
                    sandbox.images().push_random(&repository, "latest", bytes),
                    timeout,
                    |_| {},
                )
                .await?;
            rollouts.extend(rolled);
        }
        rows.push(Row {
            size_mib,
            mode,
            rollouts,
            polls: None,
        });
    }
    let polls = sandbox.registry_polls(STEADY_POLLS).await;
    for row in &mut rows {
        row.polls = Some(polls.clone());
    }
    sandbox.stop().await;
    Ok(rows)
}

fn mean(items: &[Duration]) -> Option<Duration> {
    let n = u32::try_from(items.len()).ok().filter(|n| *n > 0)?;
    Some(items.iter().sum::<Duration>() / n)
}

fn secs(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.2}", d.as_secs_f64()))
}

/// `mean / max` of a list of durations.
fn mean_max(items: &[Duration]) -> String {
    format!(
        "{} / {}",
        secs(mean(items)),
        secs(items.iter().max().copied())
    )
}

/// The range of a per-rollout count, `a` or `a–b`.
fn range(items: impl Iterator<Item = usize>) -> String {
    let items: Vec<usize> = items.collect();
    match (items.iter().min(), items.iter().max()) {
        (Some(lo), Some(hi)) if lo == hi => lo.to_string(),
        (Some(lo), Some(hi)) => format!("{lo}–{hi}"),
        _ => "-".into(),
    }
}

fn print_table(rows: &[Row]) {
    println!(
        "\n| image | workload | mode | rollouts (not-ready samples) | not-ready per pod, mean / max (s) | not-ready split: teardown + replace + start, means (s) | pod start, mean / max (s) | push→patch, mean (s) | push→converged, mean / max (s) | API writes per rollout (patch / events / other) | registry HEADs per tag per poll |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for row in rows {
        let Some(workload) = row.workload() else {
            continue;
        };
        let gaps = row.gaps();
        let parts = row.parts();
        let split = if parts.is_empty() {
            "-".to_owned()
        } else {
            let of =
                |f: fn(&GapParts) -> Duration| secs(mean(&parts.iter().map(f).collect::<Vec<_>>()));
            format!(
                "{} + {} + {} (n={})",
                of(|p| p.teardown),
                of(|p| p.replace),
                of(|p| p.start),
                parts.len()
            )
        };
        let heads = row.polls.as_ref().map_or("-".into(), |p| {
            format!(
                "{:.2} ({} HEADs, {} tags, {} polls)",
                p.heads_per_tag_per_poll(),
                p.heads.values().sum::<usize>(),
                p.heads.len(),
                p.polls
            )
        });
        let writes = |f: fn(&Rollout) -> usize| range(row.rollouts.iter().map(f));
        println!(
            "| {} MiB | {} ({} pods) | {} | {} ({}) | {} | {} | {} | {} | {} | {} / {} / {} | {} |",
            row.size_mib,
            workload.kind,
            row.rollouts.first().map_or(0, |r| r.starts.len()),
            row.mode.label(),
            row.rollouts.len(),
            gaps.len(),
            mean_max(&gaps),
            split,
            mean_max(&row.starts()),
            secs(mean(&row.patched())),
            mean_max(&row.converged()),
            writes(|r| r.writes.workload_patches),
            writes(|r| r.writes.events),
            writes(|r| r.writes.other.len()),
            heads
        );
    }
}

/// The warm-gated DaemonSet's mean not-ready time at each size against the smallest.
fn print_flatness(rows: &[Row]) {
    let gated: Vec<(u64, Duration, usize)> = rows
        .iter()
        .filter(|r| {
            r.mode == WarmMode::Gated && r.workload().is_some_and(|w| w.kind == Kind::DaemonSet)
        })
        .filter_map(|r| {
            let gaps = r.gaps();
            Some((r.size_mib, mean(&gaps)?, gaps.len()))
        })
        .collect();
    let Some(&(base_size, base, _)) = gated.first() else {
        return;
    };
    for &(size, m, n) in &gated {
        let change = (m.as_secs_f64() / base.as_secs_f64().max(f64::EPSILON) - 1.0) * 100.0;
        println!(
            "warm-gated DaemonSet not-ready mean at {size} MiB: {:.3} s over {n} samples, {change:+.0} % against {base_size} MiB",
            m.as_secs_f64()
        );
    }
}

fn main() -> Result<()> {
    let settings = settings()?;
    let runtime = tokio::runtime::Runtime::new()?;
    let started = Instant::now();
    println!(
        "rollout-bench: sizes {:?} MiB, registry link {} MiB/s shared by {} nodes, Deployment replicas {}, {} rollouts per workload, size and mode",
        settings.sizes_mib,
        settings.bandwidth_mib,
        settings.nodes,
        settings.replicas,
        settings.rollouts
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
    rows.sort_by_key(|r| {
        (
            r.workload().map(|w| w.kind.as_str()),
            r.size_mib,
            r.mode.label(),
        )
    });
    print_table(&rows);
    println!(
        "\nnot-ready per pod: from the old pod's deletion until its replacement is ready (a DaemonSet slot is a node; a Deployment's pods form one pool, surge pods leave no gap); split into the old pod's teardown (deleted → stopped and gone), the controller's replacement (gone → new pod created) and the new pod's start (created → ready). pod start: a new pod's creation until ready. Times from the end of the push. Total {:.0}s.",
        started.elapsed().as_secs_f64()
    );
    print_flatness(&rows);
    for f in &failures {
        println!("failed: {f}");
    }
    runtime.shutdown_timeout(Duration::from_secs(10));
    Ok(())
}
