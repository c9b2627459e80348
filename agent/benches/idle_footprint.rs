//! Idle footprint of the agent on a node with 50 running containers.
//!
//! Run (as root, release build):
//!   cargo bench -p warmroll-agent --bench idle_footprint
//! Optional: WARMROLL_BENCH_SECONDS (measured period, default 60),
//! WARMROLL_BENCH_INTERVAL (agent inventory interval, default 10s).
//!
//! Starts the test bed's registry and containerd, runs 50 single-container pods, then runs
//! the real `warmroll-agent watch` binary (inventory loop + health/metrics server) against
//! that containerd and prints its RSS (VmRSS) and CPU use (utime+stime over the measured
//! period, as % of one core) next to the targets: <= 10 MiB RSS, <= 0.5 % of one core.
//! Figures are printed, not asserted.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use warmroll_tests::containerd::{ContainerSpec, Containerd, PodSpec};
use warmroll_tests::image::ImageBuilder;
use warmroll_tests::registry::{Registry, RegistryOptions};

const PODS: usize = 50;

/// Kills the agent process when dropped (also on panic).
struct Agent(tokio::process::Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

fn vm_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS in /proc/<pid>/status")
}

/// utime + stime in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat
        .rsplit_once(')')
        .context("malformed /proc/<pid>/stat")?
        .1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime field 15.
    let utime: u64 = fields.get(11).context("no utime")?.parse()?;
    let stime: u64 = fields.get(12).context("no stime")?.parse()?;
    Ok(utime + stime)
}

fn clock_ticks_per_second() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|v| u64::try_from(v).ok())
        .unwrap_or(100)
}

#[tokio::main]
async fn main() -> Result<()> {
    let seconds: u64 = std::env::var("WARMROLL_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let interval = std::env::var("WARMROLL_BENCH_INTERVAL").unwrap_or_else(|_| "10s".into());

    let registry = Registry::start(RegistryOptions::plain()).await?;
    let containerd = Containerd::start_with_registry(&registry).await?;
    let pushed = ImageBuilder::new(&registry)?
        .push("bench/app", "main")
        .await?;
    let mut pods = Vec::new();
    for n in 0..PODS {
        let spec = PodSpec::new("bench", &format!("app-{n}"))
            .label("app", "bench")
            .container(ContainerSpec::new("app", &pushed.reference));
        pods.push(containerd.run_pod(&spec).await?);
    }
    println!("{PODS} pods running; starting warmroll-agent watch (interval {interval})");

    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_warmroll-agent"))
        .args([
            "watch",
            "--listen",
            "127.0.0.1:0",
            "--inventory-interval",
            &interval,
        ])
        .arg("--cri-socket")
        .arg(containerd.socket())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("starting warmroll-agent")?;
    let agent = Agent(child);
    let pid = agent.0.id().context("agent pid")?;

    // Let it take its first inventory and settle.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let ticks0 = cpu_ticks(pid)?;
    let t0 = Instant::now();
    let mut peak_rss = vm_rss_kib(pid)?;
    while t0.elapsed() < Duration::from_secs(seconds) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        peak_rss = peak_rss.max(vm_rss_kib(pid)?);
    }
    let ticks = cpu_ticks(pid)? - ticks0;
    let elapsed = t0.elapsed().as_secs_f64();
    let rss = vm_rss_kib(pid)?;
    let cpu_percent = ticks as f64 / clock_ticks_per_second() as f64 / elapsed * 100.0;
    if ticks0 == 0 && rss == 0 {
        bail!("the agent did not run");
    }

    println!(
        "idle footprint of warmroll-agent with {PODS} running containers, {elapsed:.0} s measured:"
    );
    println!(
        "  RSS  {:.2} MiB (peak {:.2} MiB)   target <= 10 MiB",
        rss as f64 / 1024.0,
        peak_rss as f64 / 1024.0
    );
    println!("  CPU  {cpu_percent:.3} % of one core   target <= 0.5 %");

    drop(agent);
    for pod in &pods {
        containerd.stop_pod(pod).await?;
    }
    Ok(())
}
