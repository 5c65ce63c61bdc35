//! `sdnctl`: the administrators' CLI. Validates manifests offline and applies
//! them through the controller's API.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use sdn_policies::convert;
use sdn_policies::manifest;
use sdn_proto::v1 as pb;

#[derive(Parser)]
#[command(version, about = "Administer the SDN: validate and apply manifests, inspect state")]
struct Cli {
    /// Controller address: https://HOST:PORT (mutual TLS: give --tls-*),
    /// unix:///PATH, or http://HOST:PORT (a controller run --insecure).
    #[arg(
        long,
        global = true,
        env = "SDN_CONTROLLER",
        default_value = "https://127.0.0.1:7070"
    )]
    controller: String,
    #[command(flatten)]
    tls: sdn_proto::tls::TlsArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

/// A kind as the command line names it: `security-group` or
/// `security_group`.
fn kind_arg(s: &str) -> Result<sdn_policies::Kind, String> {
    sdn_policies::Kind::from_name(&s.replace('-', "_")).ok_or_else(|| {
        let names: Vec<String> = sdn_policies::Kind::ALL
            .iter()
            .map(|k| k.name().replace('_', "-"))
            .collect();
        format!("unknown kind {s:?}; one of {}", names.join(", "))
    })
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Yaml,
    Json,
}

/// The listed objects as put operations of the model, in dependency order.
fn listed_ops(r: &pb::ListResponse) -> anyhow::Result<Vec<sdn_policies::Op>> {
    let mut ops = convert::list_from_pb(r)
        .map_err(|e| anyhow::anyhow!("the controller returned an object this sdnctl cannot read: {e}"))?;
    ops.sort_by_key(|o| o.order());
    Ok(ops)
}

fn doc_key(d: &serde_json::Value) -> String {
    format!(
        "{}/{}",
        d["kind"].as_str().unwrap_or("?"),
        d["metadata"]["name"].as_str().unwrap_or("?")
    )
}

/// Draws a progress bar on a terminal, or one line per change otherwise.
fn progress(done: usize, total: usize, revision: u64, last: &mut Option<usize>) {
    use std::io::{IsTerminal, Write};
    if *last == Some(done) {
        return;
    }
    *last = Some(done);
    let width = 30;
    let filled = (done * width).checked_div(total).unwrap_or(width);
    let bar = format!(
        "[{}{}] {done}/{total} hosts enforce revision {revision}",
        "#".repeat(filled),
        ".".repeat(width - filled)
    );
    let mut err = std::io::stderr();
    if err.is_terminal() {
        let _ = write!(err, "\r{bar}");
        if done == total {
            let _ = writeln!(err);
        }
    } else {
        let _ = writeln!(err, "{bar}");
    }
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Check the audit log's hash chain from its anchor to its head, and
    /// name the first broken record. Exits non-zero if one is.
    Verify {
        /// Check the copy of the replica asked (`--controller`), not the
        /// leader's.
        #[arg(long)]
        local: bool,
        /// Also check every member's own copy (at the addresses the
        /// cluster lists) and compare them: one copy rewritten whole, its
        /// hashes recomputed, differs from the others.
        #[arg(long)]
        replicas: bool,
        /// A checkpoint printed by an earlier check (`REVISION:HASH`): the
        /// record of that revision must still have that hash. Repeatable.
        #[arg(long = "checkpoint", value_name = "REVISION:HASH")]
        checkpoints: Vec<String>,
    },
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
        /// The object's kind: tenant, vpc, subnet, host, port, security-group, ...
        #[arg(value_parser = kind_arg)]
        kind: sdn_policies::Kind,
        id: String,
        #[arg(long)]
        wait: bool,
        #[arg(long, env = "SDN_ACTOR", default_value = "sdnctl")]
        actor: String,
    },
    /// List objects. Reads are linearizable unless --stale.
    Get {
        /// Only this kind (tenant, vpc, subnet, host, port, security-group, ...); every kind when left out.
        #[arg(value_parser = kind_arg)]
        kind: Option<sdn_policies::Kind>,
        /// Answer from the contacted replica's own state, which may lag.
        #[arg(long)]
        stale: bool,
        /// Output: table, yaml (manifests that `apply -f` takes back) or json.
        #[arg(short = 'o', long, default_value = "table")]
        output: Output,
    },
    /// Print the JSON schema of manifest documents (for editors).
    Schema,
    /// Show what applying manifests would change, without changing anything.
    Diff {
        #[arg(short = 'f', long = "file")]
        path: PathBuf,
    },
    /// Cut a port, a VM (all its ports) or a whole VPC off at once: every
    /// packet to and from it is dropped, established connections included,
    /// until lifted or expired.
    Quarantine {
        /// port, vm or vpc.
        target: String,
        /// The port's or the VPC's id, or the VM id given on its ports.
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
    /// Print audit records, or check their chain (`audit verify`).
    #[command(args_conflicts_with_subcommands = true)]
    Audit {
        /// Only records of revisions after this one.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// Print what each change did, object by object (JSON).
        #[arg(long)]
        content: bool,
        #[command(subcommand)]
        cmd: Option<AuditCmd>,
    },
    /// Show which revision each host enforces.
    Status,
    /// Print the network as a tree: zones, their VPCs, subnets and ports
    /// (host, addresses, security groups), then exchange paths, peerings,
    /// hosts and security groups. Admins and supervisors.
    Topology {
        /// The graph as JSON, as the topology page reads it.
        #[arg(long)]
        json: bool,
        /// Print a link to the controller's live topology page instead:
        /// good once, for two minutes; it signs the browser in as you.
        #[arg(long, conflicts_with = "json")]
        web: bool,
    },
    /// Certificates: a CA of the cluster's own and what it issues.
    #[command(subcommand)]
    Pki(PkiCmd),
}

#[derive(Subcommand)]
enum PkiCmd {
    /// Create a CA in DIR and issue, in one go, the certificates a cluster
    /// needs: its replicas, hosts, the platform, administrators,
    /// supervisors and tenants' users. Refuses a DIR that holds a CA.
    Bootstrap {
        #[arg(long)]
        dir: PathBuf,
        /// A replica: NODE_ID, or NODE_ID=ADDRESS[,ADDRESS...] (DNS names or
        /// IPs that tools checking the address, such as grpcurl, dial).
        #[arg(long = "replica")]
        replicas: Vec<String>,
        /// A host's agent, by host id.
        #[arg(long = "host")]
        hosts: Vec<String>,
        #[arg(long = "platform")]
        platforms: Vec<String>,
        #[arg(long = "admin")]
        admins: Vec<String>,
        #[arg(long = "supervisor")]
        supervisors: Vec<String>,
        /// A tenant's user: TENANT/NAME.
        #[arg(long = "tenant")]
        tenants: Vec<String>,
        /// Validity of what is issued, in days (the CA's: ten times this).
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Issue one certificate with the CA in DIR (ca.pem, ca.key).
    Issue {
        #[arg(long)]
        dir: PathBuf,
        /// Who: sdn://replica/N, sdn://agent/HOST, sdn://platform/NAME,
        /// sdn://admin/NAME, sdn://supervisor/NAME or sdn://tenant/T/NAME.
        identity: String,
        /// DNS names or IPs to name as well.
        #[arg(long = "address")]
        addresses: Vec<String>,
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
}

/// The file stem of an identity's certificate and key: `ROLE-NAME`, or
/// `tenant-TENANT@NAME` (`@` is in no name, so no two identities share a
/// stem).
fn pki_stem(id: &sdn_proto::tls::Identity) -> String {
    match &id.tenant {
        Some(t) => format!("tenant-{t}@{}", id.name),
        None => format!("{}-{}", id.role.name(), id.name),
    }
}

fn pki_issue(
    ca: &sdn_proto::tls::pki::Ca,
    dir: &std::path::Path,
    id: &sdn_proto::tls::Identity,
    addresses: &[String],
    days: u32,
) -> anyhow::Result<()> {
    let (cert, key) = ca
        .issue(id, addresses, sdn_proto::tls::pki::Validity::days(days))
        .map_err(anyhow::Error::msg)?;
    let stem = pki_stem(id);
    for ext in ["pem", "key"] {
        let p = dir.join(format!("{stem}.{ext}"));
        if p.exists() {
            anyhow::bail!(
                "{} exists: {} already has a certificate here; remove its files first to issue another",
                p.display(),
                id.uri()
            );
        }
    }
    sdn_proto::tls::pki::write_pair(dir, &stem, &cert, &key).map_err(anyhow::Error::msg)?;
    println!(
        "{}  {}/{stem}.pem  {}/{stem}.key",
        id.uri(),
        dir.display(),
        dir.display()
    );
    Ok(())
}

fn pki(cmd: PkiCmd) -> anyhow::Result<()> {
    use sdn_proto::tls::{pki, Identity};
    let parse = |uri: String| Identity::parse_uri(&uri).map_err(anyhow::Error::msg);
    match cmd {
        PkiCmd::Bootstrap {
            dir,
            replicas,
            hosts,
            platforms,
            admins,
            supervisors,
            tenants,
            days,
        } => {
            if dir.join("ca.pem").exists() || dir.join("ca.key").exists() {
                anyhow::bail!(
                    "{} already holds a CA; issue more with `sdnctl pki issue --dir {}`",
                    dir.display(),
                    dir.display()
                );
            }
            // Every identity is read before anything is written.
            let mut todo: Vec<(Identity, Vec<String>)> = Vec::new();
            for r in replicas {
                let (id, addrs) = match r.split_once('=') {
                    Some((id, a)) => (id.to_string(), a.split(',').map(str::to_string).collect()),
                    None => (r.clone(), vec![]),
                };
                let mut addrs: Vec<String> = addrs;
                addrs.extend(["localhost".to_string(), "127.0.0.1".to_string()]);
                todo.push((parse(format!("sdn://replica/{id}"))?, addrs));
            }
            for h in hosts {
                todo.push((parse(format!("sdn://agent/{h}"))?, vec![]));
            }
            for (role, names) in [("platform", platforms), ("admin", admins), ("supervisor", supervisors)] {
                for n in names {
                    todo.push((parse(format!("sdn://{role}/{n}"))?, vec![]));
                }
            }
            for t in tenants {
                todo.push((parse(format!("sdn://tenant/{t}"))?, vec![]));
            }
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let ca = pki::Ca::create("sdn cluster CA", pki::Validity::days(days.saturating_mul(10)))
                .map_err(anyhow::Error::msg)?;
            pki::write_file(&dir.join("ca.key"), &ca.key_pem().map_err(anyhow::Error::msg)?, 0o600)
                .map_err(anyhow::Error::msg)?;
            pki::write_file(&dir.join("ca.pem"), &ca.cert_pem().map_err(anyhow::Error::msg)?, 0o644)
                .map_err(anyhow::Error::msg)?;
            println!(
                "CA  {}/ca.pem  {}/ca.key (keep the key offline)",
                dir.display(),
                dir.display()
            );
            for (id, addrs) in &todo {
                pki_issue(&ca, &dir, id, addrs, days)?;
            }
        }
        PkiCmd::Issue {
            dir,
            identity,
            addresses,
            days,
        } => {
            let id = parse(identity)?;
            let ca = pki::Ca::load(&dir.join("ca.pem"), &dir.join("ca.key")).map_err(anyhow::Error::msg)?;
            pki_issue(&ca, &dir, &id, &addresses, days)?;
        }
    }
    Ok(())
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
    // Listings of a large cloud run to tens of MiB (100,000 ports: about 15).
    Ok(pb::provisioning_client::ProvisioningClient::new(ch).max_decoding_message_size(512 << 20))
}

/// Whether a failed call may still have been carried out: the connection
/// broke or the answer was lost, rather than a refusal.
fn outcome_unknown(s: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(
        s.code(),
        Code::Unknown | Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Internal
    )
}

/// The store's revision, if it answers.
async fn last_revision(c: &mut pb::provisioning_client::ProvisioningClient<tonic::transport::Channel>) -> Option<u64> {
    let req = pb::ListRequest {
        kind: pb::Kind::Tenant as i32,
        stale: true,
    };
    c.list(req).await.ok().map(|r| r.into_inner().revision)
}

/// Text from the audit log as a terminal shows it: control characters
/// escaped, so no record can draw lines that look like another's.
fn printable(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_string();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Pages through one copy of the audit log (the leader's, or with `local`
/// the replica's at `addr`), checking each record's hash and link; the
/// first broken record ends the check with an error naming it.
async fn verify_copy(addr: &str, local: bool) -> anyhow::Result<sdn_proto::audit::Verified> {
    use sdn_proto::audit::Verifier;
    const PAGE: u32 = 10_000;
    let mut c = client(addr).await?;
    let mut after = 0;
    let mut verifier: Option<Verifier> = None;
    let mut head;
    loop {
        let page = c
            .audit(pb::AuditRequest {
                after_revision: after,
                limit: PAGE,
                local,
            })
            .await
            .map_err(status_err)?
            .into_inner();
        if verifier.is_none() {
            verifier = Some(Verifier::new(&page).map_err(|e| anyhow::anyhow!("cannot check the audit chain: {e}"))?);
        }
        let v = verifier.as_mut().expect("set above");
        head = page.head_revision;
        for r in &page.records {
            v.push(r)?;
        }
        if page.next_after <= after || page.next_after >= head {
            break;
        }
        after = page.next_after;
        eprintln!("checked the records up to revision {after} of {head}");
    }
    Ok(verifier.expect("set on the first page").finish(head)?)
}

/// `sdnctl audit verify`.
async fn verify_audit(addr: &str, local: bool, replicas: bool, checkpoints: &[String]) -> anyhow::Result<()> {
    use sdn_proto::audit::hex;
    let started = std::time::Instant::now();
    let done = verify_copy(addr, local).await?;
    for cp in checkpoints {
        let (rev, hash) = cp
            .split_once(':')
            .and_then(|(r, h)| {
                let hash = sdn_proto::audit::unhex(h).filter(|b| b.len() == sdn_proto::audit::HASH_LEN)?;
                Some((r.parse::<u64>().ok()?, hash))
            })
            .ok_or_else(|| {
                anyhow::anyhow!("--checkpoint {cp:?}: not REVISION:HASH (a revision, then 64 hex digits)")
            })?;
        done.check_checkpoint(rev, &hash)
            .map_err(|e| anyhow::anyhow!("--checkpoint {cp}: {e}"))?;
    }
    println!(
        "the audit chain holds: {} records checked (revisions {}..{}), {} older than the chain; head {} ({:.1} s)",
        done.chained,
        done.first,
        done.last,
        done.unchained,
        hex(&done.head),
        started.elapsed().as_secs_f64()
    );
    if !checkpoints.is_empty() {
        println!("every checkpoint given holds");
    }
    if replicas {
        let ch = sdn_proto::connect(addr)
            .await
            .with_context(|| format!("connecting to the controller at {addr}"))?;
        let status = pb::cluster_client::ClusterClient::new(ch)
            .status(pb::ClusterStatusRequest {})
            .await
            .map_err(status_err)?
            .into_inner();
        let mut broken = 0;
        for m in &status.members {
            let theirs = match verify_copy(&m.addr, true).await {
                Ok(v) => v,
                Err(e) => {
                    println!("replica {} ({}): {e:#}", m.node_id, m.addr);
                    broken += 1;
                    continue;
                }
            };
            match theirs.agrees_with(&done) {
                Ok(()) => println!(
                    "replica {} ({}): holds, and agrees (head {} at revision {})",
                    m.node_id,
                    m.addr,
                    hex(&theirs.head),
                    theirs.last
                ),
                Err(e) => {
                    println!("replica {} ({}): its copy differs: {e}", m.node_id, m.addr);
                    broken += 1;
                }
            }
        }
        anyhow::ensure!(
            broken == 0,
            "{broken} replica(s) hold a copy that does not check or does not agree"
        );
    }
    if done.last > 0 {
        println!("checkpoint {}:{}", done.last, hex(&done.head));
    }
    Ok(())
}

fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

async fn apply(addr: &str, ops: Vec<pb::Operation>, wait: bool, timeout: u32, actor: String) -> anyhow::Result<()> {
    use sdn_policies::limits::input::{BATCH_OPS_MAX, REQUEST_BYTES_MAX};
    let n = ops.len();
    if n > BATCH_OPS_MAX {
        anyhow::bail!("{n} operations; one batch holds at most {BATCH_OPS_MAX} (apply the manifests in parts)");
    }
    let req = pb::ApplyRequest {
        operations: ops,
        actor,
        wait: false,
        wait_timeout_ms: 0,
    };
    let size = prost::Message::encoded_len(&req);
    if size > REQUEST_BYTES_MAX {
        anyhow::bail!(
            "the batch encodes to {size} bytes; a request holds at most {REQUEST_BYTES_MAX} (apply the manifests in parts)"
        );
    }
    let mut c = client(addr).await?;
    let before = last_revision(&mut c).await;
    let r = match c.apply(req).await {
        Ok(r) => r.into_inner(),
        Err(s) if outcome_unknown(&s) => {
            let audit = match before {
                Some(r) => {
                    format!("`sdnctl audit --after {r}` (every change since revision {r}, the last before this call)")
                }
                None => "`sdnctl audit`".to_string(),
            };
            anyhow::bail!(
                "{:?}: {}; the outcome is unknown: the batch may have been committed. Check with {audit} \
                 or `sdnctl get`",
                s.code(),
                s.message()
            );
        }
        Err(s) => return Err(status_err(s)),
    };
    for w in &r.warnings {
        eprintln!("warning: {w}");
    }
    let hosts = if r.hosts.is_empty() {
        "none".to_string()
    } else {
        r.hosts.join(", ")
    };
    if !wait || r.hosts.is_empty() {
        println!(
            "revision {}: {n} operation(s) applied; hosts concerned: {hosts}",
            r.revision
        );
        return Ok(());
    }
    // Wait for every concerned host's agent to enforce the revision.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(timeout as u64);
    let mut last = None;
    loop {
        let e = c
            .enforcement(pb::EnforcementRequest { revision: r.revision })
            .await
            .map_err(status_err)?
            .into_inner();
        let mut done = 0;
        for h in &r.hosts {
            let Some(s) = e.hosts.iter().find(|x| &x.host_id == h) else {
                continue;
            };
            if s.enforced_revision >= r.revision {
                done += 1;
            } else if !s.nack_reason.is_empty() {
                anyhow::bail!(
                    "revision {} was committed but host {h} refused it: {}",
                    r.revision,
                    s.nack_reason
                );
            }
        }
        progress(done, r.hosts.len(), r.revision, &mut last);
        if done == r.hosts.len() {
            break;
        }
        if std::time::Instant::now() > deadline {
            let pending: Vec<&String> = r
                .hosts
                .iter()
                .filter(|h| {
                    !e.hosts
                        .iter()
                        .any(|x| &x.host_id == *h && x.enforced_revision >= r.revision)
                })
                .collect();
            anyhow::bail!(
                "revision {} was committed but is not enforced after {timeout}s on: {pending:?}",
                r.revision
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    println!(
        "revision {}: {n} operation(s) applied, enforced on hosts: {hosts}",
        r.revision
    );
    Ok(())
}

/// A refusal of the controller's ("InvalidArgument: operations[3].put_port.ipv4:
/// ...") said at the manifest line that produced the operation, with the
/// field in the manifest's spelling. Any other error is left as it is.
fn in_manifest(ops: &[manifest::Located], e: anyhow::Error) -> anyhow::Error {
    let msg = format!("{e:#}");
    let Some(at) = msg.find("operations[") else { return e };
    let (head, tail) = msg.split_at(at);
    let (field, message) = tail.split_once(": ").unwrap_or((tail, ""));
    let Some((i, field)) = manifest::manifest_field(field) else {
        return e;
    };
    let Some(l) = ops.get(i) else { return e };
    let refused = if head.starts_with("InvalidArgument") {
        " (refused by the controller: nothing in this batch was applied)"
    } else {
        ""
    };
    let line = l.line_of(&field);
    let field = if field.is_empty() {
        String::new()
    } else {
        format!("{field}: ")
    };
    anyhow::anyhow!("{}:{line}: {field}{message}{refused}", l.file)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    cli.tls.install_client().map_err(anyhow::Error::msg)?;
    match cli.cmd {
        Cmd::Pki(c) => pki(c)?,
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
                .map_err(|e| in_manifest(&ops, e))?;
        }
        Cmd::Delete { kind, id, wait, actor } => {
            let op = pb::Operation {
                op: Some(pb::operation::Op::Delete(pb::ObjectRef {
                    kind: convert::kind_to_pb(kind) as i32,
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
                "vm" => pb::Kind::Vm,
                other => anyhow::bail!("target: {other:?} is not port, vpc or vm"),
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
        Cmd::Get { kind, stale, output } => {
            let mut c = client(&cli.controller).await?;
            let r = c
                .list(pb::ListRequest {
                    kind: kind.map(|k| convert::kind_to_pb(k) as i32).unwrap_or(0),
                    stale,
                })
                .await
                .map_err(status_err)?
                .into_inner();
            match output {
                Output::Yaml => {
                    let docs: Vec<serde_json::Value> = listed_ops(&r)?.iter().filter_map(manifest::render).collect();
                    print!("{}", manifest::to_yaml(&docs));
                }
                Output::Json => {
                    let docs: Vec<serde_json::Value> = listed_ops(&r)?.iter().filter_map(manifest::render).collect();
                    println!("{}", serde_json::to_string_pretty(&docs)?);
                }
                Output::Table => print_table(r.revision, &listed_ops(&r)?),
            }
        }
        Cmd::Schema => print!("{}", manifest::SCHEMA),
        Cmd::Topology { json, web } => {
            let mut c = client(&cli.controller).await?;
            if web {
                let r = c
                    .web_login(pb::WebLoginRequest {})
                    .await
                    .map_err(status_err)?
                    .into_inner();
                println!("{}", r.url);
                if r.expires_unix_ms > 0 {
                    eprintln!("(good once, until {})", sdn_proto::audit::rfc3339(r.expires_unix_ms));
                }
            } else {
                let r = c
                    .topology(pb::TopologyRequest {})
                    .await
                    .map_err(status_err)?
                    .into_inner();
                if json {
                    // Names are tenants' words: characters a terminal would
                    // act on are written as JSON escapes.
                    let mut out = String::with_capacity(r.json.len());
                    for c in r.json.chars() {
                        if sdn_proto::syslog::deceptive(c) {
                            out.push_str(&format!("\\u{:04x}", c as u32));
                        } else {
                            out.push(c);
                        }
                    }
                    println!("{out}");
                } else {
                    print!("{}", r.text);
                }
            }
        }
        Cmd::Diff { path } => {
            let ops = manifest::dependency_order(manifest::load_path(&path)?);
            manifest::validate_offline(&ops)?;
            let mut c = client(&cli.controller).await?;
            let r = c
                .list(pb::ListRequest { kind: 0, stale: false })
                .await
                .map_err(status_err)?
                .into_inner();
            let current: std::collections::BTreeMap<String, serde_json::Value> = listed_ops(&r)?
                .iter()
                .filter_map(manifest::render)
                .map(|d| (doc_key(&d), d))
                .collect();
            let (mut create, mut change, mut same) = (0, 0, 0);
            for l in &ops {
                let Some(want) = manifest::render(&l.op) else { continue };
                let key = doc_key(&want);
                match current.get(&key) {
                    None => {
                        create += 1;
                        println!("+ {key} (new, {}:{})", l.file, l.line);
                        for line in manifest::to_yaml(std::slice::from_ref(&want)).lines() {
                            println!("+   {line}");
                        }
                    }
                    Some(have) if *have == want => same += 1,
                    Some(have) => {
                        change += 1;
                        println!("~ {key} ({}:{})", l.file, l.line);
                        let (old, new) = (
                            manifest::to_yaml(std::slice::from_ref(have)),
                            manifest::to_yaml(std::slice::from_ref(&want)),
                        );
                        for d in similar::TextDiff::from_lines(&old, &new).iter_all_changes() {
                            let sign = match d.tag() {
                                similar::ChangeTag::Delete => "-",
                                similar::ChangeTag::Insert => "+",
                                similar::ChangeTag::Equal => " ",
                            };
                            print!("{sign}   {d}");
                        }
                    }
                }
            }
            println!(
                "at revision {}: {create} to create, {change} to change, {same} unchanged",
                r.revision
            );
        }
        Cmd::Audit {
            cmd:
                Some(AuditCmd::Verify {
                    local,
                    replicas,
                    checkpoints,
                }),
            ..
        } => verify_audit(&cli.controller, local, replicas, &checkpoints).await?,
        Cmd::Audit {
            after,
            content,
            cmd: None,
        } => {
            let mut c = client(&cli.controller).await?;
            let mut after = after;
            loop {
                let r = c
                    .audit(pb::AuditRequest {
                        after_revision: after,
                        limit: 1000,
                        local: false,
                    })
                    .await
                    .map_err(status_err)?
                    .into_inner();
                for a in &r.records {
                    let what = if a.refused.is_empty() {
                        a.changes.join("; ")
                    } else {
                        format!("REFUSED {}", a.refused)
                    };
                    println!(
                        "rev {} at {} by {}: {}",
                        a.revision,
                        a.time,
                        printable(&a.actor),
                        printable(&what)
                    );
                    if content {
                        for c in &a.content {
                            println!("    {} {} {}: {}", c.op, c.kind, printable(&c.id), printable(&c.detail));
                        }
                    }
                }
                if r.next_after <= after || r.next_after >= r.head_revision {
                    break;
                }
                after = r.next_after;
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

fn print_table(revision: u64, ops: &[sdn_policies::Op]) {
    println!("# revision {revision}");
    let rows: Vec<[String; 3]> = ops
        .iter()
        .filter_map(|op| {
            let object = op.object()?;
            Some([
                object.kind().name().to_string(),
                object.id().to_string(),
                object.summary(),
            ])
        })
        .collect();
    let w0 = rows.iter().map(|r| r[0].len()).max().unwrap_or(4).max(4);
    let w1 = rows.iter().map(|r| r[1].len()).max().unwrap_or(2).max(2);
    println!("{:<w0$}  {:<w1$}  DETAILS", "KIND", "ID");
    for r in rows {
        println!("{:<w0$}  {:<w1$}  {}", r[0], r[1], r[2]);
    }
}
