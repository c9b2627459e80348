//! The command line of `warmroll-agent` (also read by the chart's tests, which check that
//! the DaemonSet's arguments parse).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::inventory::Intervals;
use crate::session;
use crate::warm::WarmConfig;
use warmroll_proto::units::parse_duration;

#[derive(Parser, Debug)]
#[command(
    name = "warmroll-agent",
    version,
    about = "warmroll node agent: inventory and pre-pull through the CRI socket"
)]
pub struct Cli {
    /// The CRI socket; by default the usual containerd, k3s, CRI-O and cri-dockerd sockets
    /// are tried in turn.
    #[arg(long, global = true, env = "WARMROLL_CRI_SOCKET")]
    pub cri_socket: Option<PathBuf>,
    /// Do not open containerd's own API next to its CRI plugin: CRI only (inventory by
    /// polling, no pull progress).
    #[arg(long, global = true, env = "WARMROLL_CRI_ONLY")]
    pub cri_only: bool,
    /// Log line format (logs go to stderr).
    #[arg(long, global = true, env = "WARMROLL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print the node's running containers and the digests they run.
    Inventory {
        /// Print the whole inventory (containers and images) as JSON.
        #[arg(long, env = "WARMROLL_JSON")]
        json: bool,
    },
    /// Pull IMAGE by its tag through CRI and check the digest the node's tag now has.
    Pull {
        /// The image reference, e.g. registry.example/app:main.
        image: String,
        /// The digest the tag must resolve to after the pull.
        #[arg(long, env = "WARMROLL_EXPECT")]
        expect: Option<String>,
        /// Registry user name.
        #[arg(long, env = "WARMROLL_USERNAME", requires = "password")]
        username: Option<String>,
        /// Registry password.
        #[arg(
            long,
            env = "WARMROLL_PASSWORD",
            hide_env_values = true,
            requires = "username"
        )]
        password: Option<String>,
        /// A registry bearer token (instead of user name and password).
        #[arg(
            long,
            env = "WARMROLL_REGISTRY_TOKEN",
            hide_env_values = true,
            conflicts_with = "username"
        )]
        registry_token: Option<String>,
        /// Give up after this long (e.g. 90s, 10m).
        #[arg(long, env = "WARMROLL_PULL_TIMEOUT", default_value = "10m", value_parser = parse_duration)]
        timeout: Duration,
        #[command(flatten)]
        warm: WarmConfig,
    },
    /// Keep the inventory current and log every change set; serves /healthz, /readyz and
    /// /metrics. (The protocol's `run` mode builds on this.)
    Watch {
        #[command(flatten)]
        inventory: InventoryArgs,
        /// Address of the health and metrics server.
        #[arg(long, env = "WARMROLL_LISTEN", default_value = "0.0.0.0:9464")]
        listen: SocketAddr,
    },
    /// The DaemonSet mode: keep a session with the coordinator, report the inventory and
    /// run warm orders; serves /healthz, /readyz and /metrics.
    Run {
        #[command(flatten)]
        session: session::SessionArgs,
        #[command(flatten)]
        inventory: InventoryArgs,
        /// Address of the health and metrics server.
        #[arg(long, env = "WARMROLL_LISTEN", default_value = "0.0.0.0:9464")]
        listen: SocketAddr,
        #[command(flatten)]
        warm: WarmConfig,
    },
}

/// How the inventory is kept current (the `watch` and `run` commands).
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct InventoryArgs {
    /// How often to poll the runtime through CRI (and, on containerd, to check it answers).
    #[arg(long, env = "WARMROLL_INVENTORY_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub inventory_interval: Duration,
    /// On containerd, whose events keep the inventory current at once: how often to
    /// re-read the whole inventory through CRI anyway (the safety net for missed events).
    #[arg(long, env = "WARMROLL_INVENTORY_RESYNC_INTERVAL", default_value = "5m", value_parser = parse_duration)]
    pub inventory_resync_interval: Duration,
}

impl InventoryArgs {
    pub fn intervals(&self) -> Intervals {
        Intervals {
            poll: self.inventory_interval,
            resync: self.inventory_resync_interval,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent_and_parses_sizes_and_durations() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "warmroll-agent",
            "pull",
            "127.0.0.1:5000/app:latest",
            "--min-free-disk",
            "2GiB",
            "--timeout",
            "30s",
        ])
        .unwrap();
        let Command::Pull { warm, timeout, .. } = cli.command else {
            panic!("pull expected")
        };
        assert_eq!(warm.min_free_disk, 2 << 30);
        assert_eq!(timeout, Duration::from_secs(30));
        assert!(warm.flush_after_pull, "on by default");
        for (flag, want) in [
            ("--flush-after-pull=false", false),
            ("--flush-after-pull=true", true),
            ("--flush-after-pull", true),
        ] {
            let cli =
                Cli::try_parse_from(["warmroll-agent", "pull", flag, "127.0.0.1:5000/app:latest"])
                    .unwrap_or_else(|e| panic!("{flag}: {e}"));
            let Command::Pull { warm, image, .. } = cli.command else {
                panic!("pull expected")
            };
            assert_eq!(
                (warm.flush_after_pull, image.as_str()),
                (want, "127.0.0.1:5000/app:latest"),
                "{flag}"
            );
        }
    }
}
