use clap::Parser as _;
use warmroll_coordinator::cli::{Cli, run};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    run(cli, &mut std::io::stdout()).await?;
    Ok(())
}
