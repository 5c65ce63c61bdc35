//! `sdn-agent`: enforces a host's share of the network state with eBPF.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use sdn_agent::{dataplane, overlay, watch::Agent};

#[derive(Parser)]
#[command(version, about = "SDN host agent")]
struct Cli {
    #[command(flatten)]
    tls: sdn_proto::tls::TlsArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

/// Flow records over IPFIX.
#[derive(clap::Args)]
struct FlowArgs {
    /// Send flow records to this IPFIX collector (udp://ADDRESS:PORT or
    /// tcp://ADDRESS:PORT); repeat or separate with commas for several.
    #[arg(long = "flow-collector", value_delimiter = ',')]
    collectors: Vec<sdn_flowexport::exporter::Collector>,
    /// A flow carrying traffic gets a record at least this often (seconds).
    #[arg(long = "flow-active-timeout", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86400))]
    active: u64,
    /// A flow idle this long gets a record for what it carried (seconds).
    #[arg(long = "flow-idle-timeout", default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=86400))]
    idle: u64,
    /// The private enterprise number of the cloud's own elements (tenant,
    /// VPC, zone, rule, verdict, port); the default is the documentation
    /// number of RFC 5612.
    #[arg(long = "flow-pen", default_value_t = sdn_flowexport::record::PEN_DEFAULT)]
    pen: u32,
    /// The observation domain id; by default derived from the host id.
    #[arg(long = "flow-domain")]
    domain: Option<u32>,
    /// Records each collector's queue holds; beyond it they are dropped
    /// and counted.
    #[arg(long = "flow-queue", default_value_t = 65536, value_parser = clap::value_parser!(u64).range(1..=16_777_216))]
    queue: u64,
    /// Records of denied flows sent per second at most; the rest are counted.
    #[arg(long = "flow-denied-rate", default_value_t = 100)]
    denied_per_sec: u32,
    /// Append protocol records (TCP connections as they end, DNS answers)
    /// to this file, one JSON object per line.
    #[arg(long = "records-file")]
    records_file: Option<PathBuf>,
}

impl FlowArgs {
    fn settings(&self, host: &str) -> Option<sdn_agent::flows::Settings> {
        if self.collectors.is_empty() {
            return None;
        }
        // FNV-1a of the host id: stable across restarts, distinct per host.
        let domain = self.domain.unwrap_or_else(|| {
            host.bytes()
                .fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193))
        });
        Some(sdn_agent::flows::Settings {
            collectors: self.collectors.clone(),
            active: std::time::Duration::from_secs(self.active),
            idle: std::time::Duration::from_secs(self.idle),
            pen: self.pen,
            domain,
            queue: self.queue as usize,
            denied_per_sec: self.denied_per_sec,
        })
    }
}

/// The HTTP proxies of this host's proxy ports.
#[derive(clap::Args)]
struct ProxyArgs {
    /// The proxy's binary (default: `sdn-l7lb` beside this one's, else on
    /// PATH). Replacing it upgrades the running proxies without dropping
    /// a connection.
    #[arg(long = "l7lb-binary")]
    binary: Option<PathBuf>,
    /// Where each proxy's configuration and certificate files (keys among
    /// them, root's alone) are kept; an absolute path.
    #[arg(long = "proxy-dir", default_value = "/run/sdn/proxies")]
    root: PathBuf,
    /// The MTU of the proxies' links (room left for the overlay's header).
    #[arg(long = "proxy-mtu", default_value_t = 1450, value_parser = clap::value_parser!(u32).range(1280..=9000))]
    mtu: u32,
    /// How long a proxy being removed may drain its connections (seconds).
    #[arg(long = "proxy-drain-secs", default_value_t = 60)]
    drain: u64,
}

#[derive(Subcommand)]
enum Cmd {
    /// Watch the controller and enforce this host's share.
    Run {
        /// This host's id, as provisioned.
        #[arg(long, env = "SDN_HOST")]
        host: String,
        /// Controller addresses (https://HOST:PORT, unix:///PATH, or
        /// http://HOST:PORT for a controller run --insecure); tried in turn.
        /// With a certificate (--tls-*), the local socket speaks TLS too.
        #[arg(long = "controller", env = "SDN_CONTROLLER", value_delimiter = ',', required = true)]
        controllers: Vec<String>,
        /// Directory on bpffs for this agent's maps and links.
        #[arg(long, default_value = "/sys/fs/bpf/sdn")]
        pin_dir: PathBuf,
        /// Name of the collect-metadata VXLAN device carrying every VPC
        /// (created if missing, UDP port 4789).
        #[arg(long, default_value = "sdn-vx")]
        vxlan_device: String,
        /// Flows each port may hold in the flow table (0: the built-in
        /// default); new flows beyond it are dropped and counted (`ct_budget`),
        /// so one port's flood cannot take other ports' room.
        #[arg(long, default_value_t = 0)]
        ct_budget: u32,
        /// Entries of the connection tables (the flow table, and the load
        /// balancer's flows both ways), set when the programs load: their
        /// memory is allocated whole then (`sdn-agent counters` shows it).
        /// A restart with another size moves the flows into new tables.
        #[arg(long, default_value_t = dataplane::FLOW_TABLE_DEFAULT)]
        flow_table_size: u32,
        /// This host's underlay IPv4 address: the tunnel endpoint is bound
        /// to it, so tunnel packets sent to the host's other addresses (its
        /// zone uplinks') reach nothing.
        #[arg(long, env = "SDN_UNDERLAY_IP")]
        underlay_ip: Option<std::net::Ipv4Addr>,
        /// Serve Prometheus metrics on this address (`/metrics`, plain
        /// HTTP: an address only the monitoring system reaches).
        #[arg(long)]
        metrics_listen: Option<String>,
        /// The port the agents of hosts holding a virtual IP together carry
        /// its flows to one another on (mutual TLS, on the underlay
        /// address; every agent of the cluster uses the same). 0: not
        /// carried, and a failover of such a VIP cuts its connections.
        #[arg(long, default_value_t = sdn_agent::natsync::DEFAULT_PORT)]
        flow_sync_port: u16,
        #[command(flatten)]
        flows: FlowArgs,
        #[command(flatten)]
        syslog: sdn_proto::syslog::SyslogArgs,
        #[command(flatten)]
        proxies: ProxyArgs,
    },
    /// Print drop and pass counters as JSON.
    Counters {
        #[arg(long, default_value = "/sys/fs/bpf/sdn")]
        pin_dir: PathBuf,
    },
    /// Print the north-south flows this host translates (or holds copies
    /// of, from the other holders of a virtual IP) as JSON lines.
    NatFlows {
        #[arg(long, default_value = "/sys/fs/bpf/sdn")]
        pin_dir: PathBuf,
    },
    /// Print the border-firewall verdict of each recent flow, with the rule
    /// that decided it, as JSON lines.
    Verdicts {
        #[arg(long, default_value = "/sys/fs/bpf/sdn")]
        pin_dir: PathBuf,
    },
    /// Take part in one IPv4 VRRPv3 virtual router on an interface, as the
    /// agent does for the virtual IPs its host holds, and print each state
    /// it takes and each advertisement it discards as JSON lines: a check
    /// of a link's VRRP peers (keepalived, routers) from this host.
    /// SIGTERM or Ctrl-C resigns (priority 0) before leaving.
    Vrrp {
        #[arg(long)]
        interface: String,
        /// Virtual router id, 1 to 255.
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..))]
        vrid: u8,
        /// 1 to 254, or 255 for the address owner.
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..))]
        priority: u8,
        /// The protected addresses, all IPv4 or all IPv6 (VRRP over that
        /// family).
        #[arg(long = "address", required = true)]
        addresses: Vec<std::net::IpAddr>,
        /// Advertisement interval, centiseconds (1 to 4095).
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..=4095))]
        interval_cs: u16,
        /// Keep a live Master of lower priority.
        #[arg(long)]
        no_preempt: bool,
        /// This router's address on the link (default: the interface's
        /// first IPv4 address, or its IPv6 link-local one).
        #[arg(long)]
        source: Option<std::net::IpAddr>,
    },
    /// Detach every program and remove every pin (uninstall).
    Purge {
        #[arg(long, default_value = "/sys/fs/bpf/sdn")]
        pin_dir: PathBuf,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let cli = Cli::parse();
    cli.tls.install_client().map_err(anyhow::Error::msg)?;
    match cli.cmd {
        Cmd::Run {
            host,
            controllers,
            pin_dir,
            vxlan_device,
            ct_budget,
            flow_table_size,
            underlay_ip,
            metrics_listen,
            flow_sync_port,
            flows,
            syslog,
            proxies,
        } => {
            let mut dp = dataplane::Dataplane::load_sized(&pin_dir, flow_table_size)
                .with_context(|| format!("loading the dataplane under {}", pin_dir.display()))?;
            for (name, t) in dp.flow_tables()? {
                tracing::info!(
                    table = name,
                    entries = t.max_entries,
                    mib = t.memlock_bytes >> 20,
                    "connection table"
                );
            }
            dp.set_ct_budget(ct_budget)?;
            if underlay_ip.is_none() {
                tracing::warn!("no --underlay-ip: the tunnel endpoint is bound to no address");
            }
            let vx = overlay::ensure_vxlan(&vxlan_device, underlay_ip).await?;
            dp.attach_overlay(&vxlan_device, vx)
                .with_context(|| format!("attaching the overlay program to {vxlan_device}"))?;
            tracing::info!(device = %vxlan_device, ifindex = vx, "overlay ready");
            let flow_settings = flows.settings(&host);
            let own = cli.tls.files().map_err(anyhow::Error::msg)?.map(|f| (f.cert, f.key));
            let events = syslog
                .start(&host, "sdn-agent", own)
                .map_err(anyhow::Error::msg)?
                .map(|s| sdn_agent::events::Events::new(s, &host, syslog.per_sec));
            let mut agent = Agent::new(host, controllers, dp)?;
            if !syslog.receivers.is_empty() {
                let list: Vec<String> = syslog.receivers.iter().map(|r| r.to_string()).collect();
                tracing::info!(receivers = %list.join(", "), "security events sent as syslog");
            }
            let records = match &flows.records_file {
                Some(p) => {
                    tracing::info!(file = %p.display(), "TCP and DNS records written");
                    Some(sdn_agent::records::JsonLines::open(p.clone()).await?)
                }
                None => None,
            };
            agent.export(flow_settings.as_ref(), events, records)?;
            agent.start_mirroring(underlay_ip.map(std::net::IpAddr::V4))?;
            agent.start_usage()?;
            agent
                .start_proxies(sdn_agent::proxies::Settings {
                    binary: proxies
                        .binary
                        .unwrap_or_else(sdn_agent::proxies::Settings::default_binary),
                    root: proxies.root,
                    mtu: proxies.mtu,
                    drain: std::time::Duration::from_secs(proxies.drain),
                })
                .context("starting the HTTP proxies' supervision")?;
            agent
                .start_vips(&pin_dir)
                .context("starting the virtual IPs' VRRP speakers")?;
            match (flow_sync_port, underlay_ip, cli.tls.files().map_err(anyhow::Error::msg)?) {
                (0, _, _) => tracing::info!("flow sync off: a virtual IP's failover cuts its connections"),
                (port, Some(ip), Some(files)) => {
                    let listen = std::net::SocketAddr::from((ip, port));
                    // The rest of the agent runs without it.
                    if let Err(e) = agent.start_flow_sync(&pin_dir, files, listen, port).await {
                        tracing::error!(error = %format!("{e:#}"), "flow sync off: a virtual IP's failover cuts its connections");
                    }
                }
                (_, None, _) => tracing::warn!(
                    "flow sync off: it listens on the underlay address, and there is no --underlay-ip; a virtual IP's failover cuts its connections"
                ),
                (_, _, None) => tracing::warn!(
                    "flow sync off: it needs the agent's certificate (--tls-*); a virtual IP's failover cuts its connections"
                ),
            }
            if let Some(s) = &flow_settings {
                let list: Vec<String> = s
                    .collectors
                    .iter()
                    .map(|c| format!("{:?}://{}", c.transport, c.addr).to_lowercase())
                    .collect();
                tracing::info!(collectors = %list.join(", "), domain = s.domain, active_s = s.active.as_secs(), idle_s = s.idle.as_secs(), "flow records exported over IPFIX");
            }
            if let Some(addr) = metrics_listen {
                let l = tokio::net::TcpListener::bind(&addr)
                    .await
                    .with_context(|| format!("binding the metrics address {addr}"))?;
                tracing::info!(addr = %addr, "metrics served at /metrics");
                let src = agent.metric_sources();
                tokio::spawn(async move {
                    if let Err(e) = sdn_agent::metrics::serve(l, src).await {
                        tracing::error!(error = %e, "the metrics endpoint stopped");
                    }
                });
            }
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                _ = agent.run() => {}
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            // Programs and maps stay pinned: traffic keeps flowing while the
            // agent is down, and the next agent adopts them.
            tracing::info!("agent stopping; the dataplane stays in place");
        }
        Cmd::NatFlows { pin_dir } => {
            for f in dataplane::read_nat_flows(&pin_dir)? {
                println!("{f}");
            }
        }
        Cmd::Counters { pin_dir } => {
            let (drops, stats) = dataplane::read_counters(&pin_dir)?;
            // Mirror sessions by slot (in the order of their ids), those
            // that counted anything.
            let mirror: std::collections::BTreeMap<String, serde_json::Value> =
                dataplane::read_mirror_counters(&pin_dir)
                    .unwrap_or_default()
                    .into_iter()
                    .enumerate()
                    .filter(|(_, c)| c.matched + c.failed > 0)
                    .map(|(slot, c)| {
                        (
                            slot.to_string(),
                            serde_json::json!({
                                "matched": c.matched,
                                "sampled_out": c.sampled_out,
                                "over_rate": c.over_rate,
                                "copied": c.copied,
                                "failed": c.failed,
                            }),
                        )
                    })
                    .collect();
            // Information systems by slot and zone number, those that
            // counted anything.
            let mut systems = std::collections::BTreeMap::new();
            if let Ok(counts) = dataplane::SystemBytes::open(&pin_dir) {
                for (slot, zone, up, down) in counts.all() {
                    systems.insert(format!("{slot}/{zone}"), serde_json::json!({ "up": up, "down": down }));
                }
            }
            let tables: std::collections::BTreeMap<&str, dataplane::TableMemory> =
                dataplane::read_flow_tables(&pin_dir)?.into_iter().collect();
            let j = serde_json::json!({
                "tables": tables,
                "drops": drops.into_iter().collect::<std::collections::BTreeMap<_, _>>(),
                "stats": stats.into_iter().collect::<std::collections::BTreeMap<_, _>>(),
                "mirror": mirror,
                "systems": systems,
                "vip_leases": sdn_agent::vips::read_leases(&pin_dir).unwrap_or_default(),
                "nat_pickups": sdn_agent::natsync::read_pickups(&pin_dir).unwrap_or_default(),
            });
            println!("{}", serde_json::to_string_pretty(&j)?);
        }
        Cmd::Verdicts { pin_dir } => {
            for v in dataplane::read_verdicts(&pin_dir)? {
                println!("{v}");
            }
        }
        Cmd::Vrrp {
            interface,
            vrid,
            priority,
            addresses,
            interval_cs,
            no_preempt,
            source,
        } => {
            use sdn_agent::vrrp::{machine, speaker};
            let link = speaker::Link::of(&interface).with_context(|| format!("interface {interface}"))?;
            let v6 = addresses[0].is_ipv6();
            if addresses.iter().any(|a| a.is_ipv6() != v6) {
                anyhow::bail!("--address: all IPv4 or all IPv6 (one virtual router speaks one family)");
            }
            let source = match source {
                Some(s) if s.is_ipv6() != v6 => anyhow::bail!("--source: of the addresses' family"),
                Some(s) => s,
                None if v6 => speaker::link_local(&interface)
                    .map(std::net::IpAddr::V6)
                    .with_context(|| format!("{interface} has no IPv6 link-local address: give --source"))?,
                None => speaker::first_ipv4(&interface)
                    .map(std::net::IpAddr::V4)
                    .with_context(|| format!("{interface} has no IPv4 address: give --source"))?,
            };
            let cfg = machine::Config {
                vrid,
                priority,
                interval_cs,
                preempt: !no_preempt,
                addresses,
                primary: source,
            };
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            let run = tokio::spawn(speaker::run(cfg, link, tx, stop_rx, true));
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            let started = std::time::Instant::now();
            let print = |e: speaker::Event| {
                let ms = started.elapsed().as_millis();
                let line = match e {
                    speaker::Event::State(s) => serde_json::json!({"ms": ms, "state": s.name()}),
                    speaker::Event::Discarded { from, why } => {
                        serde_json::json!({"ms": ms, "discarded": from.to_string(), "why": why})
                    }
                    speaker::Event::Mismatch { from, addresses } => serde_json::json!({
                        "ms": ms, "mismatch": from.to_string(),
                        "addresses": addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                    }),
                    speaker::Event::OldChecksum { from } => {
                        serde_json::json!({"ms": ms, "old_checksum": from.to_string()})
                    }
                };
                println!("{line}");
            };
            loop {
                tokio::select! {
                    Some(e) = rx.recv() => print(e),
                    _ = tokio::signal::ctrl_c() => break,
                    _ = term.recv() => break,
                }
            }
            let _ = stop_tx.send(true);
            run.await??;
            while let Ok(e) = rx.try_recv() {
                print(e);
            }
        }
        Cmd::Purge { pin_dir } => {
            if pin_dir.exists() {
                std::fs::remove_dir_all(&pin_dir).with_context(|| format!("removing {}", pin_dir.display()))?;
            }
            println!("removed {}", pin_dir.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// Every flag has a name of its own (clap checks it only when parsing).
    #[test]
    fn the_command_line_is_well_formed() {
        <super::Cli as clap::CommandFactory>::command().debug_assert();
    }
}
