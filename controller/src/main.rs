//! `sdn-controller`: serves the provisioning and agent APIs over a replicated
//! store (a one-member Raft cluster by default).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use sdn_controller::cluster::{ClusterService, RaftService};
use sdn_controller::store::{Start, Store};
use sdn_controller::{enforcement::Enforcement, service::Controller};
use sdn_proto::v1::{
    agent_server::AgentServer, cluster_server::ClusterServer, provisioning_server::ProvisioningServer,
    raft_server::RaftServer,
};

#[derive(Parser, Debug)]
#[command(version, about = "SDN controller: provisioning and agent APIs over a Raft store")]
struct Args {
    /// Directory of the store (created if missing).
    #[arg(long, env = "SDN_DATA_DIR", default_value = "/var/lib/sdn-controller")]
    data_dir: PathBuf,
    /// Raft node id of this replica.
    #[arg(long, default_value_t = 1)]
    node_id: u64,
    /// TCP address to serve on.
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: String,
    /// Unix socket to serve on as well (agents in other network namespaces use it).
    #[arg(long)]
    listen_unix: Option<PathBuf>,
    /// Address other replicas reach this one at (default: http://LISTEN).
    #[arg(long)]
    advertise: Option<String>,
    /// Do not bootstrap a new cluster: wait to be added to an existing one
    /// (`sdnctl cluster add-learner`).
    #[arg(long)]
    join: bool,
    /// Take a snapshot of the state, and compact the Raft log, every this
    /// many log entries. Fewer snapshots cost less while writing; more keep
    /// the log, and so the replay at a restart, shorter.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(100..))]
    snapshot_every: u64,
    #[command(flatten)]
    tls: sdn_proto::tls::TlsArgs,
    /// Serve Prometheus metrics on this address (`/metrics`, plain HTTP:
    /// an address only the monitoring system reaches).
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Serve plain HTTP/2 with no authentication: anyone who reaches the
    /// controller may do anything. For local experiments only.
    #[arg(long)]
    insecure: bool,
    /// Who a caller on the local socket without a certificate is, by its
    /// user id: `UID=ROLE/NAME` (`0=admin/root`, `1001=tenant/t1/alice`).
    /// Repeatable.
    #[arg(long = "unix-role", value_parser = sdn_controller::serve::parse_unix_role)]
    unix_roles: Vec<(u32, sdn_proto::tls::Identity)>,
    #[command(flatten)]
    syslog: sdn_proto::syslog::SyslogArgs,
    /// Serve the topology page on this address (HTTPS with the
    /// controller's certificate; plain HTTP under --insecure). Admins and
    /// supervisors come with a client certificate, or with a link from
    /// `sdnctl topology --web`.
    #[arg(long)]
    web_listen: Option<String>,
    /// The page's address as browsers reach it, in the links `sdnctl
    /// topology --web` prints (default: https://WEB_LISTEN).
    #[arg(long, requires = "web_listen")]
    web_url: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,openraft=warn".into()),
        )
        .init();
    let args = Args::parse();
    let files = args.tls.files().map_err(anyhow::Error::msg)?;
    let tls = match (&files, args.insecure) {
        (Some(_), true) => {
            anyhow::bail!("give either --insecure or the TLS files (--tls-ca, --tls-cert, --tls-key), not both")
        }
        (None, false) => anyhow::bail!(
            "no TLS certificate: give --tls-ca, --tls-cert and --tls-key (`sdnctl pki bootstrap` makes them), \
             or --insecure for a local experiment"
        ),
        (None, true) => {
            tracing::warn!(
                target: "sdn::security",
                "--insecure: serving plain HTTP/2 with no authentication; anyone who reaches {} may change the network",
                args.listen
            );
            None
        }
        (Some(f), false) => {
            let id = f.identity().map_err(anyhow::Error::msg)?;
            if id.role != sdn_proto::tls::Role::Replica || id.name != args.node_id.to_string() {
                anyhow::bail!(
                    "{}: names {}, not this replica (sdn://replica/{})",
                    f.cert.display(),
                    id.uri(),
                    args.node_id
                );
            }
            let acceptor = sdn_proto::tls::Acceptor::new(f.clone()).map_err(anyhow::Error::msg)?;
            // The same certificate for the connections to the other replicas.
            sdn_proto::tls::install_client(f.clone()).map_err(anyhow::Error::msg)?;
            Some(Arc::new(acceptor))
        }
    };
    sdn_controller::auth::set_insecure(args.insecure);
    let secured = tls.is_some();
    let listeners = sdn_controller::serve::Listeners {
        tls,
        unix_roles: Arc::new(args.unix_roles.iter().cloned().collect()),
        insecure: args.insecure,
        handshakes: Default::default(),
    };
    let scheme = if args.insecure { "http" } else { "https" };
    let advertise = args
        .advertise
        .clone()
        .unwrap_or_else(|| format!("{scheme}://{}", args.listen));
    let start = if args.join { Start::Join } else { Start::Bootstrap };
    let store = Store::open(&args.data_dir, args.node_id, &advertise, start, args.snapshot_every)
        .await
        .with_context(|| format!("opening the store in {}", args.data_dir.display()))?;
    sdn_controller::refusals::run(store.clone());
    let host = sdn_proto::syslog::hostname();
    let own = files.as_ref().map(|f| (f.cert.clone(), f.key.clone()));
    let syslog = args
        .syslog
        .start(&host, "sdn-controller", own)
        .map_err(anyhow::Error::msg)?;
    if let Some(s) = &syslog {
        let list: Vec<String> = args.syslog.receivers.iter().map(|r| r.to_string()).collect();
        tracing::info!(
            receivers = %list.join(", "),
            "policy changes, refusals and bandwidth events sent as syslog while this replica leads"
        );
        sdn_controller::events::run(store.clone(), s.clone(), args.syslog.per_sec, host);
    }
    let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
    let web = match &args.web_listen {
        None => None,
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the topology page's address {addr}"))?;
            let url = args
                .web_url
                .clone()
                .unwrap_or_else(|| format!("{scheme}://{addr}"))
                .trim_end_matches('/')
                .to_string();
            let web_tls = match &files {
                Some(f) => Some(Arc::new(
                    sdn_proto::tls::Acceptor::web(f.clone()).map_err(anyhow::Error::msg)?,
                )),
                None => None,
            };
            let web_listeners = sdn_controller::serve::Listeners {
                tls: web_tls,
                unix_roles: Default::default(),
                insecure: args.insecure,
                handshakes: Default::default(),
            };
            let web = sdn_controller::web::Web::new(store.clone(), url.clone(), args.insecure);
            if args.insecure {
                tracing::warn!(%url, "--insecure: the topology page is served over plain HTTP to anyone who reaches it");
            } else {
                tracing::info!(%url, "topology page served to admins and supervisors");
            }
            let w = web.clone();
            tokio::spawn(async move {
                if let Err(e) = sdn_controller::web::serve(web_listeners, l, w).await {
                    tracing::error!(error = %e, "the topology page stopped");
                }
            });
            Some(web)
        }
    };
    let ctl = Controller {
        store: store.clone(),
        enforcement: Arc::new(Enforcement::default()),
        stopping,
        leader_acks: Default::default(),
        health_budget: Default::default(),
        vip_leases: Default::default(),
        metrics: Default::default(),
        web,
    };
    ctl.metrics.usage.clone().run(store.clone(), syslog);
    if let Some(addr) = &args.metrics_listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the metrics address {addr}"))?;
        tracing::info!(addr = %addr, "metrics served at /metrics");
        let (m, st, en) = (ctl.metrics.clone(), store.clone(), ctl.enforcement.clone());
        tokio::spawn(async move {
            if let Err(e) = sdn_controller::metrics::serve(l, m, st, en).await {
                tracing::error!(error = %e, "the metrics endpoint stopped");
            }
        });
    }
    // gRPC health checking and server reflection, for load balancers and
    // grpcurl: every service is reported serving while the process runs.
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<ProvisioningServer<Controller>>().await;
    health_reporter.set_serving::<AgentServer<Controller>>().await;
    health_reporter.set_serving::<RaftServer<RaftService>>().await;
    health_reporter.set_serving::<ClusterServer<ClusterService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(sdn_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("the reflection service")?;

    let tcp = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    tracing::info!(addr = %args.listen, data_dir = %args.data_dir.display(), "controller serving");
    let router = || {
        let builder = tonic::transport::Server::builder();
        // A connection's identity is checked at its handshake: connections
        // are made again now and then, so a rotated CA or a withdrawn
        // certificate stops being trusted within the hour.
        let builder = if secured {
            builder
                .max_connection_age(std::time::Duration::from_secs(3600))
                .max_connection_age_grace(std::time::Duration::from_secs(60))
        } else {
            builder
        };
        builder
            .layer(tower::util::MapResponseLayer::new(
                malformed_is_invalid_argument::<tonic::body::Body>,
            ))
            .add_service(
                ProvisioningServer::new(ctl.clone())
                    .max_decoding_message_size(sdn_policies::limits::input::REQUEST_BYTES_MAX),
            )
            .add_service(AgentServer::new(ctl.clone()))
            .add_service(
                RaftServer::new(RaftService {
                    store: store.clone(),
                    stopping: ctl.stopping.clone(),
                })
                .max_decoding_message_size(sdn_controller::store::network::RAFT_MESSAGE_BYTES_MAX)
                .max_encoding_message_size(sdn_controller::store::network::RAFT_MESSAGE_BYTES_MAX),
            )
            .add_service(ClusterServer::new(ClusterService { store: store.clone() }))
            .add_service(health.clone())
            .add_service(reflection.clone())
    };
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
        tracing::info!("shutting down");
    };
    let (stop_tx, _) = tokio::sync::broadcast::channel::<()>(1);
    let mut servers = tokio::task::JoinSet::new();
    {
        let mut rx = stop_tx.subscribe();
        let r = router();
        let incoming = listeners.tcp(tcp);
        servers.spawn(async move {
            r.serve_with_incoming_shutdown(incoming, async move {
                let _ = rx.recv().await;
            })
            .await
        });
    }
    if let Some(path) = &args.listen_unix {
        let _ = std::fs::remove_file(path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let uds = tokio::net::UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
        // The owner and its group only; callers are known by their user id.
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o660))
            .with_context(|| format!("setting the mode of {}", path.display()))?;
        tracing::info!(socket = %path.display(), "controller serving on a unix socket");
        let mut rx = stop_tx.subscribe();
        let r = router();
        let incoming = listeners.unix(uds);
        servers.spawn(async move {
            r.serve_with_incoming_shutdown(incoming, async move {
                let _ = rx.recv().await;
            })
            .await
        });
    }
    tokio::select! {
        _ = shutdown => {},
        Some(r) = servers.join_next() => { r??; }
    }
    let stopped_at = std::time::Instant::now();
    let _ = stop_tx.send(());
    // Watch streams end now; requests in flight get a moment to finish.
    stopping_tx.send_replace(true);
    let _ = tokio::time::timeout(std::time::Duration::from_millis(500), async {
        while servers.join_next().await.is_some() {}
    })
    .await;
    let _ = tokio::time::timeout(std::time::Duration::from_millis(500), store.raft.shutdown()).await;
    if let Err(e) = store.flush() {
        tracing::warn!(error = %e, "the last commits are not durable; the log replays them at start");
    }
    if let Some(path) = &args.listen_unix {
        let _ = std::fs::remove_file(path);
    }
    tracing::info!(ms = stopped_at.elapsed().as_millis() as u64, "stopped");
    // Everything is on disk: exit without tearing the in-memory state down
    // piece by piece, which takes long at the size of a real cloud.
    std::process::exit(0)
}

/// A request body that is not valid protobuf is the caller's error: tonic
/// answers INTERNAL ("failed to decode Protobuf message"); say
/// INVALID_ARGUMENT instead, keeping the message.
fn malformed_is_invalid_argument<B>(mut resp: http::Response<B>) -> http::Response<B> {
    let h = resp.headers();
    let decode_error = h.get("grpc-status").is_some_and(|v| v == "13")
        && h.get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .is_some_and(|m| m.starts_with("failed%20to%20decode") || m.starts_with("failed to decode"));
    if decode_error {
        resp.headers_mut()
            .insert("grpc-status", http::HeaderValue::from_static("3"));
    }
    resp
}

#[cfg(test)]
mod tests {
    /// Every flag has a name of its own (clap checks it only when parsing).
    #[test]
    fn the_command_line_is_well_formed() {
        <super::Args as clap::CommandFactory>::command().debug_assert();
    }
}
