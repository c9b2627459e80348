//! The `warmroll-coordinator` command line. Subcommands: `resolve` (what does this
//! tag point to now, as warmroll sees it), `run` (the coordinator itself, see
//! [`crate::run`]), `report` (the drift report as a table, see [`crate::engine`]), and
//! `approve` / `rollout` (steer one workload, see [`crate::steer`]).
//! Every flag can also be set through its environment variable.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use warmroll_proto::image::ImageRef;

use crate::registry::{Keyring, RegistryError, Resolution, Resolver, ResolverConfig};

#[derive(Debug, Parser)]
#[command(name = "warmroll-coordinator", version, about)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, env = "WARMROLL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// Log filter (tracing `EnvFilter` syntax).
    #[arg(long, env = "WARMROLL_LOG", default_value = "warn", global = true)]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Resolve an image reference at its registry: the digest its tag points to now
    /// and, for a multi-arch image, the per-platform children.
    Resolve(ResolveArgs),
    /// Run the coordinator: the agents' fleet API, health and metrics, leader election.
    Run(Box<crate::run::RunArgs>),
    /// Print the drift report: from a running coordinator, or computed once (`--once`).
    Report(crate::engine::ReportArgs),
    /// Approve a rollout that awaits approval (`requireApproval`): annotates the
    /// workload with the digests it waits for, with your Kubernetes credentials.
    Approve(crate::steer::ApproveArgs),
    /// Ask the leader for a warm restart of one workload now, onto whatever its tags
    /// point to: annotates the workload, with your Kubernetes credentials.
    Rollout(crate::steer::RolloutArgs),
}

#[derive(Debug, Args)]
pub struct ResolveArgs {
    /// Image reference (`nginx`, `ghcr.io/org/app:main`, `reg:5000/app@sha256:…`).
    #[arg(env = "WARMROLL_IMAGE")]
    pub image: String,
    /// Docker `config.json` with registry credentials (the file, or its directory).
    #[arg(long, env = "DOCKER_CONFIG")]
    pub docker_config: Option<PathBuf>,
    /// Registry host (`host:port`) to reach over plain HTTP. Repeatable.
    #[arg(
        long = "insecure-registry",
        env = "WARMROLL_INSECURE_REGISTRIES",
        value_delimiter = ','
    )]
    pub insecure_registries: Vec<String>,
    /// Extra CA bundle (PEM) to trust besides the system roots. Repeatable.
    #[arg(long = "ca-file", env = "WARMROLL_CA_FILES", value_delimiter = ',')]
    pub ca_files: Vec<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long, env = "WARMROLL_JSON")]
    pub json: bool,
    /// Timeout of one registry request, in seconds.
    #[arg(long, env = "WARMROLL_REQUEST_TIMEOUT_SECONDS", default_value_t = 30)]
    pub request_timeout_seconds: u64,
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    ParseImage(#[from] warmroll_proto::image::ImageError),
    #[error("cannot read CA bundle {path}: {source}")]
    ReadCaFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Resolve(#[from] RegistryError),
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
    #[error("cannot encode the output: {0}")]
    Encode(#[from] serde_json::Error),
    #[error(transparent)]
    Run(#[from] crate::run::RunError),
    #[error(transparent)]
    Report(#[from] crate::engine::ReportError),
    #[error(transparent)]
    Steer(#[from] crate::steer::SteerError),
}

/// Sets up logging to stderr (text or JSON).
pub fn init_logging(format: LogFormat, filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second initialisation (tests) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Runs a parsed command line, writing its result to `out`.
pub async fn run(cli: Cli, out: &mut (dyn Write + Send)) -> Result<(), CliError> {
    init_logging(cli.log_format, &cli.log);
    match cli.command {
        Command::Resolve(args) => resolve(args, out).await,
        Command::Run(args) => Ok(crate::run::run(*args).await?),
        Command::Report(args) => Ok(crate::engine::report_command(args, out).await?),
        Command::Approve(args) => Ok(crate::steer::approve_command(args, out).await?),
        Command::Rollout(args) => Ok(crate::steer::rollout_command(args, out).await?),
    }
}

async fn resolve(args: ResolveArgs, out: &mut (dyn Write + Send)) -> Result<(), CliError> {
    let image = ImageRef::parse(&args.image)?;
    let mut keyring = Keyring::new();
    match &args.docker_config {
        Some(path) => keyring.add_docker_config_path(path)?,
        // As the coordinator: the home's Docker config, when there is one.
        None => {
            if let Some(file) = crate::registry::default_docker_config(|n| std::env::var(n).ok()) {
                keyring.add_docker_config_if_present(&file)?;
            }
        }
    }
    let mut ca_bundles_pem = Vec::new();
    for path in &args.ca_files {
        let pem = std::fs::read(path).map_err(|source| CliError::ReadCaFile {
            path: path.clone(),
            source,
        })?;
        ca_bundles_pem.push(pem);
    }
    let config = ResolverConfig {
        insecure_registries: args.insecure_registries,
        ca_bundles_pem,
        request_timeout: Duration::from_secs(args.request_timeout_seconds),
        ..ResolverConfig::default()
    };
    let resolver = Resolver::new(config, keyring)?;
    let resolution = resolver.resolve(&image, &Keyring::new()).await?;
    if args.json {
        serde_json::to_writer_pretty(&mut *out, &resolution)?;
        writeln!(out)?;
    } else {
        out.write_all(render_table(&resolution).as_bytes())?;
    }
    Ok(())
}

/// The human-readable form of a resolution.
pub fn render_table(resolution: &Resolution) -> String {
    match resolution {
        Resolution::Pinned { image, digest } => format!(
            "IMAGE   {image}\nDIGEST  {digest}\nPINNED  reference names a digest: nothing to track\n"
        ),
        Resolution::Tag(resolved) => {
            let mut text = format!(
                "IMAGE   {}\nDIGEST  {}\nTYPE    {}\n",
                resolved.image, resolved.digest, resolved.media_type
            );
            if !resolved.children.is_empty() {
                let width = resolved
                    .children
                    .iter()
                    .map(|c| c.platform.to_string().len())
                    .max()
                    .unwrap_or(0)
                    .max("PLATFORM".len());
                text.push_str(&format!("\n{:<width$}  DIGEST\n", "PLATFORM"));
                for child in resolved.children.iter() {
                    text.push_str(&format!(
                        "{:<width$}  {}\n",
                        child.platform.to_string(),
                        child.digest
                    ));
                }
            }
            text
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{Child, Resolved};
    use std::sync::Arc;
    use warmroll_proto::image::{Digest, Platform};

    #[test]
    fn flags_parse_and_have_env_vars() {
        let cli = Cli::try_parse_from([
            "warmroll-coordinator",
            "resolve",
            "nginx",
            "--insecure-registry",
            "a:5000",
            "--insecure-registry",
            "b:5000",
            "--ca-file",
            "/ca.pem",
            "--json",
            "--log-format",
            "json",
        ])
        .unwrap();
        assert_eq!(cli.log_format, LogFormat::Json);
        let Command::Resolve(args) = cli.command else {
            panic!("not the resolve command")
        };
        assert_eq!(args.image, "nginx");
        assert_eq!(args.insecure_registries, ["a:5000", "b:5000"]);
        assert_eq!(args.ca_files, [PathBuf::from("/ca.pem")]);
        assert!(args.json);

        use clap::CommandFactory;
        let command = Cli::command();
        for sub in command.get_subcommands() {
            for arg in sub.get_arguments() {
                let id = arg.get_id().as_str();
                if id != "help" && id != "version" {
                    assert!(
                        arg.get_env().is_some(),
                        "{} --{id} has no env var",
                        sub.get_name()
                    );
                }
            }
        }
    }

    #[test]
    fn table_lists_platform_children() {
        let d = |c: &str| Digest::sha256_hex(&c.repeat(64)).unwrap();
        let resolution = Resolution::Tag(Resolved {
            image: ImageRef::parse("reg.io/app:v1").unwrap(),
            digest: d("1"),
            media_type: "application/vnd.oci.image.index.v1+json".into(),
            children: Arc::from([Child {
                platform: Platform::parse("linux/arm64/v8").unwrap(),
                digest: d("a"),
                media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            }]),
        });
        let table = render_table(&resolution);
        assert!(table.contains("IMAGE   reg.io/app:v1"), "{table}");
        assert!(
            table.contains(&format!("linux/arm64/v8  {}", d("a"))),
            "{table}"
        );
        let json = serde_json::to_value(&resolution).unwrap();
        assert_eq!(json["kind"], "tag");
        assert_eq!(json["children"][0]["platform"]["variant"], "v8");

        let pinned = Resolution::Pinned {
            image: ImageRef::parse(&format!("reg.io/app@{}", d("2"))).unwrap(),
            digest: d("2"),
        };
        assert!(render_table(&pinned).contains("nothing to track"));
    }
}
