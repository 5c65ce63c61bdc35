//! `sdnctl`: the administrators' CLI. Validates manifests offline and applies
//! them through the controller's API.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use sdn_controller::convert;
use sdn_policies::manifest;
use sdn_proto::v1 as pb;

#[derive(Parser)]
#[command(version, about = "Administer the SDN: validate and apply manifests, inspect state")]
struct Cli {
    /// Controller address: http://HOST:PORT or unix:///PATH.
    #[arg(long, global = true, env = "SDN_CONTROLLER", default_value = "http://127.0.0.1:7070")]
    controller: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum KindArg {
    Tenant,
    Vpc,
    Subnet,
    Host,
    Port,
    SecurityGroup,
    Quarantine,
}

impl KindArg {
    fn pb(self) -> pb::Kind {
        match self {
            KindArg::Tenant => pb::Kind::Tenant,
            KindArg::Vpc => pb::Kind::Vpc,
            KindArg::Subnet => pb::Kind::Subnet,
            KindArg::Host => pb::Kind::Host,
            KindArg::Port => pb::Kind::Port,
            KindArg::SecurityGroup => pb::Kind::SecurityGroup,
            KindArg::Quarantine => pb::Kind::Quarantine,
        }
    }
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Show the members, the leader and each replica's progress.
    Status,
    /// Add a replica as a learner (it must run with --join and an empty data directory).
    AddLearner {
        node_id: u64,
        /// Its address, e.g. http://10.0.0.2:7070.
        addr: String,
    },
    /// Make a learner a voter.
    Promote { node_id: u64 },
    /// Remove a member (refused if the remaining voters could not form a quorum).
    Remove { node_id: u64 },
}

#[derive(Subcommand)]
enum Cmd {
    /// Check manifests without a controller. Exit code 1 on the first error.
    Validate {
        /// A manifest file or a directory of them.
        #[arg(short = 'f', long = "file")]
        path: PathBuf,
    },
    /// Apply manifests as one batch: all or nothing.
    Apply {
        #[arg(short = 'f', long = "file")]
        path: PathBuf,
        /// Wait until every host concerned enforces the change.
        #[arg(long)]
        wait: bool,
        /// How long to wait, in seconds.
        #[arg(long, default_value_t = 30)]
        timeout: u32,
        /// Name recorded in the audit log.
        #[arg(long, env = "SDN_ACTOR", default_value = "sdnctl")]
        actor: String,
    },
    /// Delete one object.
    Delete {
        kind: KindArg,
        id: String,
        #[arg(long)]
        wait: bool,
        #[arg(long, env = "SDN_ACTOR", default_value = "sdnctl")]
        actor: String,
    },
    /// List objects. Reads are linearizable unless --stale.
    Get {
        kind: Option<KindArg>,
        /// Answer from the contacted replica's own state, which may lag.
        #[arg(long)]
        stale: bool,
    },
    /// Cut a port or a whole VPC off at once: every packet to and from it is
    /// dropped, established connections included, until lifted or expired.
    Quarantine {
        /// port or vpc.
        target: String,
        /// The port's or the VPC's id.
        id: String,
        /// Why (recorded in the audit log).
        #[arg(long)]
        reason: String,
        /// Lift by itself after this many seconds.
        #[arg(long)]
        expires_in: Option<u64>,
        /// Id of the quarantine (default: q-<target id>).
        #[arg(long = "name")]
        name: Option<String>,
        #[arg(long, env = "SDN_ACTOR", default_value = "sdnctl")]
        actor: String,
    },
    /// Lift a quarantine.
    Lift {
        name: String,
        #[arg(long, env = "SDN_ACTOR", default_value = "sdnctl")]
        actor: String,
    },
    /// Controller cluster membership.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Print audit records.
    Audit {
        #[arg(long, default_value_t = 0)]
        after: u64,
    },
    /// Show which revision each host enforces.
    Status,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn client(addr: &str) -> anyhow::Result<pb::provisioning_client::ProvisioningClient<tonic::transport::Channel>> {
    let ch = sdn_proto::connect(addr)
        .await
        .with_context(|| format!("connecting to the controller at {addr}"))?;
    Ok(pb::provisioning_client::ProvisioningClient::new(ch))
}

fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

async fn apply(addr: &str, ops: Vec<pb::Operation>, wait: bool, timeout: u32, actor: String) -> anyhow::Result<()> {
    let n = ops.len();
    let mut c = client(addr).await?;
    if wait {
        eprintln!("applying {n} operation(s) and waiting up to {timeout}s for enforcement...");
    }
    let r = c
        .apply(pb::ApplyRequest {
            operations: ops,
            actor,
            wait,
            wait_timeout_ms: timeout.saturating_mul(1000),
        })
        .await
        .map_err(status_err)?
        .into_inner();
    let hosts = if r.hosts.is_empty() {
        "none".to_string()
    } else {
        r.hosts.join(", ")
    };
    if wait {
        println!(
            "revision {}: {n} operation(s) applied, enforced on hosts: {hosts}",
            r.revision
        );
    } else {
        println!(
            "revision {}: {n} operation(s) applied; hosts concerned: {hosts}",
            r.revision
        );
    }
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Validate { path } => {
            let ops = manifest::load_path(&path)?;
            let ops = manifest::dependency_order(ops);
            manifest::validate_offline(&ops)?;
            println!("{}: {} object(s) valid", path.display(), ops.len());
        }
        Cmd::Apply {
            path,
            wait,
            timeout,
            actor,
        } => {
            let ops = manifest::dependency_order(manifest::load_path(&path)?);
            manifest::validate_offline(&ops)?;
            if ops.is_empty() {
                anyhow::bail!("{}: no manifests found", path.display());
            }
            let pb_ops = ops.iter().map(|l| convert::op_to_pb(&l.op)).collect();
            apply(&cli.controller, pb_ops, wait, timeout, actor)
                .await
                .map_err(|e| {
                    // Map "operations[i]" back to the manifest that produced it.
                    let msg = format!("{e:#}");
                    if let Some(i) = msg
                        .split("operations[")
                        .nth(1)
                        .and_then(|t| t.split(']').next())
                        .and_then(|t| t.parse::<usize>().ok())
                    {
                        if let Some(l) = ops.get(i) {
                            return anyhow::anyhow!("{}:{}: {msg}", l.file, l.line);
                        }
                    }
                    e
                })?;
        }
        Cmd::Delete { kind, id, wait, actor } => {
            let op = pb::Operation {
                op: Some(pb::operation::Op::Delete(pb::ObjectRef {
                    kind: kind.pb() as i32,
                    id,
                })),
            };
            apply(&cli.controller, vec![op], wait, 30, actor).await?;
        }
        Cmd::Cluster(c) => cluster(&cli.controller, c).await?,
        Cmd::Quarantine {
            target,
            id,
            reason,
            expires_in,
            name,
            actor,
        } => {
            let target_kind = match target.as_str() {
                "port" => pb::Kind::Port,
                "vpc" => pb::Kind::Vpc,
                other => anyhow::bail!("target: {other:?} is not port or vpc"),
            };
            let expires_unix_ms = expires_in
                .map(|s| {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap_or_default();
                    now.as_millis() as u64 + s * 1000
                })
                .unwrap_or(0);
            let q = pb::Quarantine {
                id: name.unwrap_or_else(|| format!("q-{id}")),
                target_kind: target_kind as i32,
                target_id: id,
                reason,
                expires_unix_ms,
            };
            let op = pb::Operation {
                op: Some(pb::operation::Op::PutQuarantine(q)),
            };
            apply(&cli.controller, vec![op], true, 30, actor).await?;
        }
        Cmd::Lift { name, actor } => {
            let op = pb::Operation {
                op: Some(pb::operation::Op::Delete(pb::ObjectRef {
                    kind: pb::Kind::Quarantine as i32,
                    id: name,
                })),
            };
            apply(&cli.controller, vec![op], true, 30, actor).await?;
        }
        Cmd::Get { kind, stale } => {
            let mut c = client(&cli.controller).await?;
            let r = c
                .list(pb::ListRequest {
                    kind: kind.map(|k| k.pb() as i32).unwrap_or(0),
                    stale,
                })
                .await
                .map_err(status_err)?
                .into_inner();
            println!("# revision {}", r.revision);
            for t in r.tenants {
                println!("tenant {} name={:?}", t.id, t.name);
            }
            for v in r.vpcs {
                println!("vpc {} tenant={} name={:?}", v.id, v.tenant_id, v.name);
            }
            for s in r.subnets {
                println!("subnet {} vpc={} v4={} v6={}", s.id, s.vpc_id, s.cidr_v4, s.cidr_v6);
            }
            for h in r.hosts {
                println!("host {} underlay={}", h.id, h.underlay_ip);
            }
            for p in r.ports {
                println!(
                    "port {} host={} device={} mac={} v4={} v6={} groups={}",
                    p.id,
                    p.host_id,
                    p.device,
                    p.mac,
                    p.ipv4,
                    p.ipv6,
                    p.security_group_ids.join(",")
                );
            }
            for q in r.quarantines {
                println!(
                    "quarantine {} target={}/{} expires={} reason={:?}",
                    q.id,
                    if q.target_kind == pb::Kind::Vpc as i32 {
                        "vpc"
                    } else {
                        "port"
                    },
                    q.target_id,
                    q.expires_unix_ms,
                    q.reason
                );
            }
            for g in r.security_groups {
                println!("security_group {} tenant={} rules={}", g.id, g.tenant_id, g.rules.len());
            }
        }
        Cmd::Audit { after } => {
            let mut c = client(&cli.controller).await?;
            let r = c
                .audit(pb::AuditRequest {
                    after_revision: after,
                    limit: 1000,
                })
                .await
                .map_err(status_err)?
                .into_inner();
            for a in r.records {
                println!(
                    "rev {} at {} by {}: {}",
                    a.revision,
                    a.time_unix_ms,
                    a.actor,
                    a.changes.join("; ")
                );
            }
        }
        Cmd::Status => {
            let mut c = client(&cli.controller).await?;
            let r = c
                .enforcement(pb::EnforcementRequest { revision: 0 })
                .await
                .map_err(status_err)?
                .into_inner();
            println!("current revision {}", r.current_revision);
            for h in r.hosts {
                let nack = if h.nack_reason.is_empty() {
                    String::new()
                } else {
                    format!(" nack={:?}", h.nack_reason)
                };
                println!(
                    "host {} connected={} enforced={}{nack}",
                    h.host_id, h.connected, h.enforced_revision
                );
            }
        }
    }
    Ok(())
}

fn print_status(s: &pb::ClusterStatus) {
    println!(
        "cluster {} | answered by node {} | leader {} | term {} | revision {} | applied {} | snapshot {}",
        s.cluster_id,
        s.node_id,
        if s.leader_id == 0 {
            "none".to_string()
        } else {
            s.leader_id.to_string()
        },
        s.term,
        s.revision,
        s.last_applied,
        s.snapshot_index
    );
    for m in &s.members {
        let role = if m.voter { "voter" } else { "learner" };
        let lead = if m.node_id == s.leader_id { " (leader)" } else { "" };
        println!(
            "  node {} {role}{lead} {} matched={}",
            m.node_id, m.addr, m.matched_index
        );
    }
}

async fn cluster(addr: &str, cmd: ClusterCmd) -> anyhow::Result<()> {
    let ch = sdn_proto::connect(addr)
        .await
        .with_context(|| format!("connecting to the controller at {addr}"))?;
    let mut c = pb::cluster_client::ClusterClient::new(ch);
    let s = match cmd {
        ClusterCmd::Status => c.status(pb::ClusterStatusRequest {}).await,
        ClusterCmd::AddLearner { node_id, addr } => c.add_learner(pb::AddLearnerRequest { node_id, addr }).await,
        ClusterCmd::Promote { node_id } => c.promote(pb::MemberRequest { node_id }).await,
        ClusterCmd::Remove { node_id } => c.remove(pb::MemberRequest { node_id }).await,
    }
    .map_err(status_err)?
    .into_inner();
    print_status(&s);
    Ok(())
}
