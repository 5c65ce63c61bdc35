//! `sdn-l7lb --config FILE [--control SOCKET [--upgrade]]`: serves the
//! configuration in FILE, and reads it again on SIGHUP (a configuration
//! that fails its checks is refused with the field named, and the one
//! served stays). With `--control`, a later process started with
//! `--upgrade` takes its listening sockets over and it drains and exits
//! (see `upgrade.rs`). SIGTERM drains too: no new connection is taken, and
//! those open finish what they carry.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use sdn_l7lb::config::Config;
use sdn_l7lb::proxy::Proxy;
use sdn_l7lb::upgrade;

#[derive(Parser)]
#[command(about = "The L7 load balancer (HTTP/1.1, HTTP/2, TLS with SNI)")]
struct Args {
    /// The configuration (JSON), as the agent writes it.
    #[arg(long)]
    config: PathBuf,
    /// The control socket (a Unix socket path): a process started later
    /// with `--upgrade` takes this one's listening sockets over through it.
    #[arg(long)]
    control: Option<PathBuf>,
    /// Take the listening sockets over from the proxy running on
    /// `--control` (none there: start afresh).
    #[arg(long, requires = "control")]
    upgrade: bool,
    /// When draining, connections still open after this are closed.
    #[arg(long, default_value_t = 300)]
    drain_timeout_secs: u64,
}

fn read(path: &PathBuf) -> Result<Config, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Config::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Stops accepting and waits until every connection closed, or the
/// drain time ran out.
async fn drain(proxy: &mut Proxy, limit: Duration) {
    proxy.stop_accepting();
    let t0 = Instant::now();
    let open = proxy.connections();
    tracing::info!(
        connections = open,
        "draining: no new connection is taken, the open ones finish what they carry"
    );
    while proxy.connections() > 0 && t0.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    match proxy.connections() {
        0 => tracing::info!(took_ms = t0.elapsed().as_millis() as u64, "drained"),
        n => tracing::warn!(connections = n, "drain time over; closing the connections still open"),
    }
}

/// Each client connection may need a file for a connection to a member:
/// the soft limit of open files is raised to the hard one.
fn raise_file_limit() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the struct given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                tracing::warn!("could not raise the limit of open files");
            }
        }
    }
    tracing::info!(
        connections_max = sdn_l7lb::proxy::connections_max(),
        "client connections at most"
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    raise_file_limit();
    // Before anything else: a SIGHUP sent while starting reloads, not kills.
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let drain_limit = Duration::from_secs(args.drain_timeout_secs);
    let mut proxy = Proxy::new();
    let mut handover = None;
    if let (true, Some(ctl)) = (args.upgrade, &args.control) {
        if let Some((sockets, h)) = upgrade::take_over(ctl).map_err(anyhow::Error::msg)? {
            tracing::info!(sockets = sockets.len(), "took the running proxy's listening sockets");
            proxy.adopt(sockets);
            handover = Some(h);
        }
    }
    let c = read(&args.config).map_err(anyhow::Error::msg)?;
    proxy.apply(&c).await.map_err(anyhow::Error::msg)?;
    if let Some(h) = handover {
        tokio::task::spawn_blocking(move || h.ready())
            .await?
            .map_err(anyhow::Error::msg)?;
        tracing::info!("the previous proxy stopped accepting; this one serves");
    }
    let mut control = match &args.control {
        Some(p) => Some(upgrade::listen(p).map_err(anyhow::Error::msg)?),
        None => None,
    };
    tracing::info!(listeners = c.listeners.len(), pools = c.pools.len(), "serving");
    loop {
        let asked = async {
            match &control {
                Some(l) => l.accept().await,
                None => std::future::pending().await,
            }
        };
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
            conn = asked => {
                let Ok((s, _)) = conn else { continue };
                match upgrade::serve_one(s, &proxy.listening()).await {
                    Ok(Some(asked)) => {
                        proxy.stop_accepting();
                        drop(control.take());
                        asked.bye().await;
                        tracing::info!("handed the listening sockets to the new proxy");
                        drain(&mut proxy, drain_limit).await;
                        return Ok(());
                    }
                    Ok(None) => tracing::warn!("an upgrade was abandoned before the new proxy was ready; still serving"),
                    Err(e) => tracing::warn!(error = %e, "a control connection failed; still serving"),
                }
            }
            _ = term.recv() => {
                tracing::info!("stopping");
                drain(&mut proxy, drain_limit).await;
                return Ok(());
            }
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}
