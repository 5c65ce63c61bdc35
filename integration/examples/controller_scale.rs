//! The controller at the size of a real cloud: write latency against state
//! size, with simulated agents on every host.
//!
//! One controller (on its embedded store) and `HOSTS` simulated agents:
//! each opens a real `Watch` stream, decodes every message into the share
//! it keeps, and acknowledges each revision with `Ack`, as the agent does,
//! with no kernel work. The state grows through the real provisioning API
//! to each size of `SIZES` ports: VPCs of 50 ports spread over 10 hosts
//! each, one subnet and one security group per VPC (its rule admits its
//! own members), and one group `all` that a port on every host uses. At
//! each size:
//! - a write that concerns one host (a quarantine of one port, put and
//!   lifted in turn): p50/p99 from the API call to that host's ack
//!   (`wait: true`), checked to concern exactly that host;
//! - a write to the group every host uses: p50/p99 until every host acked;
//! - the controller's resident memory.
//!
//! At the largest size the controller is stopped while 8 clients write
//! (SIGTERM, timed until the process is gone) and started again: the time
//! until it answers, and how long building every share took.
//!
//! Run as root after `cargo build --release --workspace --bins`:
//! `cargo run --release -p sdn-integration --example controller_scale`
//! (`HOSTS=1000 SIZES=0,1000,10000,100000 SAMPLES=50 REPLICAS=1` by default;
//! with `REPLICAS=3` three replicas on this machine, the agents spread over
//! them, writes sent to the first;
//! `-- --smoke` for a short run that only checks it still works).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use sdn_integration::ops::{group, host, ingress, port, subnet, tenant, vpc_vni};
use sdn_integration::{bin, free_port, Proc};
use sdn_proto::v1 as pb;
use tonic::transport::Channel;

const PORTS_PER_VPC: usize = 50;
const HOSTS_PER_VPC: usize = 10;

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

struct Controller {
    proc: Proc,
    addr: String,
    data: std::path::PathBuf,
    dir: std::path::PathBuf,
}

impl Controller {
    /// Replica `node` (from 1); the first bootstraps, the others join.
    fn spawn(dir: &std::path::Path, data: &std::path::Path, addr: &str, node: u64) -> anyhow::Result<Proc> {
        let id = node.to_string();
        let mut args = vec![
            "--node-id",
            &id,
            "--data-dir",
            data.to_str().unwrap(),
            "--listen",
            addr.trim_start_matches("http://"),
            "--insecure",
        ];
        if node > 1 {
            args.push("--join");
        }
        Proc::spawn(&format!("controller-{node}"), None, &bin("sdn-controller"), &args, dir)
    }

    async fn answering(&self, timeout: Duration) -> anyhow::Result<Duration> {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if let Ok(ch) = sdn_proto::connect(&self.addr).await {
                let mut c = pb::provisioning_client::ProvisioningClient::new(ch);
                // A linearizable read of a small kind: the store answers
                // once it leads and has applied its log.
                let tenants = pb::ListRequest {
                    kind: pb::Kind::Tenant as i32,
                    stale: false,
                };
                if c.list(tenants).await.is_ok() {
                    return Ok(t0.elapsed());
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        anyhow::bail!(
            "the controller did not answer within {timeout:?}:\n{}",
            self.proc.log_text()
        )
    }

    fn rss_mib(&self) -> f64 {
        let Some(pid) = self.proc.pid() else { return 0.0 };
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
            .unwrap_or(0.0)
    }
}

/// A simulated agent: a real watch stream, the share decoded and kept,
/// each revision acknowledged.
fn agent(ch: Channel, host: String, acked: Arc<AtomicU64>) {
    tokio::spawn(async move {
        let mut client = pb::agent_client::AgentClient::new(ch);
        let mut share: HashMap<String, pb::Resource> = HashMap::new();
        let mut stream = match client
            .watch(pb::WatchRequest {
                host_id: host.clone(),
                revision: 0,
                resource_versions: Default::default(),
                protocol: sdn_proto::WATCH_PROTOCOL,
            })
            .await
        {
            Ok(s) => s.into_inner(),
            Err(e) => {
                complain(format_args!("agent {host}: watch refused: {e}"));
                return;
            }
        };
        loop {
            let msg = match stream.message().await {
                Ok(Some(m)) => m,
                Ok(None) => return,
                Err(e) => {
                    complain(format_args!("agent {host}: stream ended: {e}"));
                    return;
                }
            };
            if msg.snapshot {
                share.clear();
            }
            for n in &msg.removals {
                share.remove(n);
            }
            for r in msg.upserts {
                share.insert(r.name.clone(), r);
            }
            let r = client
                .ack(pb::AckRequest {
                    host_id: host.clone(),
                    revision: msg.revision,
                    ok: true,
                    reason: String::new(),
                })
                .await;
            if let Err(e) = r {
                complain(format_args!("agent {host}: ack refused: {e}"));
            }
            acked.fetch_add(1, Ordering::Relaxed);
        }
    });
}

fn host_name(h: usize) -> String {
    format!("h{h}")
}

/// Port number `i`: its VPC, host, and addresses.
fn port_op(i: usize, hosts: usize) -> pb::operation::Op {
    let v = i / PORTS_PER_VPC;
    let j = i % PORTS_PER_VPC;
    let h = (v * HOSTS_PER_VPC + j % HOSTS_PER_VPC) % hosts;
    let group = format!("g{v}");
    port(
        &format!("p{i}"),
        "t",
        &format!("s{v}"),
        &host_name(h),
        &format!("tap{i}"),
        &format!("02:00:00:{:02x}:{:02x}:{:02x}", (v >> 8) & 255, v & 255, j),
        &format!("10.{}.{}.{}", (v >> 8) & 255, v & 255, j + 10),
        "",
        &[group.as_str()],
    )
}

/// One port per host in group `all`, in a VPC of its own.
fn anchor_op(h: usize) -> pb::operation::Op {
    port(
        &format!("anchor{h}"),
        "t",
        "anchors",
        &host_name(h),
        "anchor",
        &format!("02:01:00:00:{:02x}:{:02x}", (h >> 8) & 255, h & 255),
        &format!("172.16.{}.{}", ((h + 10) >> 8) & 255, (h + 10) & 255),
        "",
        &["all"],
    )
}

fn vpc_ops(v: usize) -> Vec<pb::operation::Op> {
    vec![
        vpc_vni(&format!("v{v}"), "t", 10_000 + v as u32),
        subnet(
            &format!("s{v}"),
            &format!("v{v}"),
            &format!("10.{}.{}.0/24", (v >> 8) & 255, v & 255),
            "",
        ),
        group(
            &format!("g{v}"),
            "t",
            vec![ingress("ssh", false, "tcp", (22, 22), "", &format!("g{v}"))],
        ),
    ]
}

async fn apply(
    c: &mut pb::provisioning_client::ProvisioningClient<Channel>,
    ops: Vec<pb::operation::Op>,
    wait: bool,
) -> anyhow::Result<pb::ApplyResponse> {
    Ok(c.apply(pb::ApplyRequest {
        operations: ops.into_iter().map(|op| pb::Operation { op: Some(op) }).collect(),
        actor: "scale".into(),
        wait,
        wait_timeout_ms: 60_000,
    })
    .await?
    .into_inner())
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Set when the run is over: the agents' streams end then, quietly.
static DONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn complain(what: std::fmt::Arguments) {
    if !DONE.load(Ordering::Relaxed) {
        eprintln!("{what}");
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("sdn-scale-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let r = run(&dir).await;
    DONE.store(true, Ordering::Relaxed);
    if r.is_ok() {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!("the controllers' logs are kept in {}", dir.display());
    }
    r
}

async fn run(dir: &std::path::Path) -> anyhow::Result<()> {
    let smoke = std::env::args().any(|a| a == "--smoke");
    let hosts: usize = env("HOSTS", if smoke { "20" } else { "1000" }).parse()?;
    let sizes: Vec<usize> = env("SIZES", if smoke { "0,200" } else { "0,1000,10000,100000" })
        .split(',')
        .map(|s| s.trim().parse())
        .collect::<Result<_, _>>()
        .context("SIZES: a comma-separated list of port counts")?;
    let samples: usize = env("SAMPLES", if smoke { "3" } else { "50" }).parse()?;
    anyhow::ensure!(hosts >= HOSTS_PER_VPC, "HOSTS: at least {HOSTS_PER_VPC}");
    anyhow::ensure!(hosts <= 65_000, "HOSTS: at most 65000");
    anyhow::ensure!(
        sizes.iter().all(|&n| n / PORTS_PER_VPC < 65_000),
        "SIZES: at most 3,250,000 ports"
    );

    let replicas: usize = env("REPLICAS", "1").parse().context("REPLICAS: a number of replicas")?;
    anyhow::ensure!((1..=7).contains(&replicas), "REPLICAS: 1 to 7");
    let dir = dir.to_path_buf();
    let mut ctls = Vec::new();
    for i in 0..replicas {
        let data = dir.join(format!("data{}", i + 1));
        let addr = format!("http://127.0.0.1:{}", free_port());
        ctls.push(Controller {
            proc: Controller::spawn(&dir, &data, &addr, i as u64 + 1)?,
            addr,
            data,
            dir: dir.clone(),
        });
    }
    ctls[0].answering(Duration::from_secs(20)).await?;
    if replicas > 1 {
        let mut c = pb::cluster_client::ClusterClient::new(sdn_proto::connect(&ctls[0].addr).await?);
        for (i, r) in ctls.iter().enumerate().skip(1) {
            let node_id = i as u64 + 1;
            let t0 = Instant::now();
            loop {
                let add = c
                    .add_learner(pb::AddLearnerRequest {
                        node_id,
                        addr: r.addr.clone(),
                    })
                    .await;
                match add {
                    Ok(_) => break,
                    Err(e) if t0.elapsed() > Duration::from_secs(20) => anyhow::bail!("adding replica {node_id}: {e}"),
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
            c.promote(pb::MemberRequest { node_id }).await?;
        }
    }
    let addr = ctls[0].addr.clone();
    let mut client = pb::provisioning_client::ProvisioningClient::new(sdn_proto::connect(&addr).await?)
        .max_decoding_message_size(256 << 20);

    // Tenant, hosts, the group every host uses, and the anchors' VPC.
    let mut ops = vec![tenant("t")];
    ops.extend((0..hosts).map(|h| host(&host_name(h), &format!("10.250.{}.{}", h >> 8, h & 255))));
    apply(&mut client, ops, false).await?;
    apply(
        &mut client,
        vec![
            vpc_vni("anchors", "t", 9_999),
            subnet("anchors", "anchors", "172.16.0.0/16", ""),
            group("all", "t", vec![ingress("dns", false, "udp", (53, 53), "", "")]),
        ],
        false,
    )
    .await?;

    // The agents, several streams to a connection.
    let acked = Arc::new(AtomicU64::new(0));
    let mut channels = Vec::new();
    // Spread over the replicas, as agents given several addresses are.
    for h in 0..hosts {
        if h % 50 == 0 {
            channels.push(sdn_proto::connect(&ctls[(h / 50) % replicas].addr).await?);
        }
        agent(channels.last().unwrap().clone(), host_name(h), acked.clone());
    }
    let t0 = Instant::now();
    for chunk in (0..hosts).collect::<Vec<_>>().chunks(1000) {
        apply(&mut client, chunk.iter().map(|&h| anchor_op(h)).collect(), false).await?;
    }
    println!(
        "{replicas} replica(s); {hosts} hosts, each with an agent's watch stream and a port in group `all` ({:.1} s)",
        t0.elapsed().as_secs_f64()
    );
    println!(
        "{:>8} {:>9} {:>13} {:>13} {:>13} {:>13} {:>9}",
        "ports", "fill s", "1 host p50", "1 host p99", "all p50", "all p99", "RSS MiB"
    );
    let mut have = 0usize;
    let mut flips = 0u32;
    let mut rows = Vec::new();
    for &size in &sizes {
        let t0 = Instant::now();
        while have < size {
            let upto = (have + 1000).min(size);
            let mut ops = Vec::new();
            for i in have..upto {
                if i % PORTS_PER_VPC == 0 {
                    ops.extend(vpc_ops(i / PORTS_PER_VPC));
                }
                ops.push(port_op(i, hosts));
            }
            apply(&mut client, ops, false)
                .await
                .with_context(|| format!("adding ports {have}..{upto}"))?;
            have = upto;
            if upto % 10_000 == 0 {
                eprintln!("  {upto} ports ({:.1} s)", t0.elapsed().as_secs_f64());
            }
        }
        let fill = t0.elapsed();
        // Let the agents catch up before measuring.
        apply(&mut client, vec![tenant("t")], true).await?;
        let mut one = Vec::new();
        for k in 0..samples * 2 {
            let h = (k * 7919) % hosts;
            let target = format!("anchor{h}");
            let op = if k % 2 == 0 {
                pb::operation::Op::PutQuarantine(pb::Quarantine {
                    id: format!("q{h}"),
                    target_kind: pb::Kind::Port as i32,
                    target_id: target,
                    reason: "scale test".into(),
                    expires_unix_ms: 0,
                })
            } else {
                pb::operation::Op::Delete(pb::ObjectRef {
                    kind: pb::Kind::Quarantine as i32,
                    id: format!("q{}", (((k - 1) * 7919) % hosts)),
                })
            };
            let t = Instant::now();
            let r = apply(&mut client, vec![op], true).await?;
            one.push(t.elapsed());
            anyhow::ensure!(r.enforced, "the one-host write was not enforced");
            let expect = if k % 2 == 0 { h } else { ((k - 1) * 7919) % hosts };
            anyhow::ensure!(
                r.hosts == vec![host_name(expect)],
                "a quarantine of one port concerned {:?}",
                r.hosts
            );
        }
        let mut all = Vec::new();
        for _ in 0..samples {
            // Each write a rule the group never had.
            flips += 1;
            let op = group("all", "t", vec![ingress("dns", false, "udp", (53, 54 + flips), "", "")]);
            let t = Instant::now();
            let r = apply(&mut client, vec![op], true).await?;
            all.push(t.elapsed());
            anyhow::ensure!(
                r.enforced && r.hosts.len() == hosts,
                "the group write reached {} hosts",
                r.hosts.len()
            );
        }
        let rss = ctls[0].rss_mib();
        let row = (
            size,
            fill.as_secs_f64(),
            ms(percentile(&mut one, 0.5)),
            ms(percentile(&mut one, 0.99)),
            ms(percentile(&mut all, 0.5)),
            ms(percentile(&mut all, 0.99)),
            rss,
        );
        println!(
            "{:>8} {:>9.1} {:>10.2} ms {:>10.2} ms {:>10.1} ms {:>10.1} ms {:>9.0}",
            row.0, row.1, row.2, row.3, row.4, row.5, row.6
        );
        rows.push(row);
    }
    println!(
        "acks received by the simulated agents: {}",
        acked.load(Ordering::Relaxed)
    );
    if replicas > 1 {
        println!("(stop and start are measured with one replica)");
        return Ok(());
    }
    let ctl = &mut ctls[0];
    // Stop and start at the largest size, stopped while busy: writers
    // keep writing until it is gone.
    for w in 0..8 {
        let mut c = client.clone();
        tokio::spawn(async move {
            for n in 0.. {
                if apply(&mut c, vec![tenant(&format!("busy{w}-{n}"))], false)
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = ctl.proc.pid().context("controller pid")?;
    let t = Instant::now();
    // The agents' streams end with it: expected, not worth a line each.
    DONE.store(true, Ordering::Relaxed);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    while std::path::Path::new(&format!("/proc/{pid}/stat")).exists() && t.elapsed() < Duration::from_secs(30) {
        if std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z ")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let stop = t.elapsed();
    ctl.proc.stop();
    let t = Instant::now();
    ctl.proc = Controller::spawn(&ctl.dir, &ctl.data, &ctl.addr, 1)?;
    let up = ctl.answering(Duration::from_secs(300)).await?;
    let log = ctl.proc.log_text();
    let built = log
        .lines()
        .rev()
        .find(|l| l.contains("built every host's share"))
        .unwrap_or("")
        .to_string();
    let stopped = log
        .lines()
        .find(|l| l.contains(" stopped "))
        .and_then(|l| l.split("ms=").nth(1))
        .unwrap_or("?")
        .to_string();
    println!(
        "at {have} ports: SIGTERM to exit {:.0} ms (the controller's own shutdown: {stopped} ms); \
         start to answering {:.0} ms ({})",
        ms(stop),
        ms(up.max(t.elapsed().min(up))),
        built.split("built every host's share").last().unwrap_or("").trim()
    );
    Ok(())
}
