//! `sdn-l7lb --config FILE`: serves the configuration in FILE, and reads
//! it again on SIGHUP (a configuration that fails its checks is refused
//! with the field named, and the one served stays).

use std::path::PathBuf;

use clap::Parser;
use sdn_l7lb::config::Config;
use sdn_l7lb::proxy::Proxy;

#[derive(Parser)]
#[command(about = "The L7 load balancer (HTTP/1.1, HTTP/2, TLS with SNI)")]
struct Args {
    /// The configuration (JSON), as the agent writes it.
    #[arg(long)]
    config: PathBuf,
}

fn read(path: &PathBuf) -> Result<Config, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Config::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    // Before anything else: a SIGHUP sent while starting reloads, not kills.
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut proxy = Proxy::new();
    let c = read(&args.config).map_err(anyhow::Error::msg)?;
    proxy.apply(&c).await.map_err(anyhow::Error::msg)?;
    tracing::info!(listeners = c.listeners.len(), pools = c.pools.len(), "serving");
    loop {
        tokio::select! {
            _ = hup.recv() => {
                match read(&args.config) {
                    Ok(c) => match proxy.apply(&c).await {
                        Ok(()) => tracing::info!(listeners = c.listeners.len(), pools = c.pools.len(), "configuration reloaded"),
                        Err(e) => tracing::error!(error = %e, "configuration refused; the one served stays"),
                    },
                    Err(e) => tracing::error!(error = %e, "configuration refused; the one served stays"),
                }
            }
            _ = term.recv() => {
                tracing::info!("stopping");
                return Ok(());
            }
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}
