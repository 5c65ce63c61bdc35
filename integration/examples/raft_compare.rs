//! The clustered controller against etcd 3.4, both as three-member clusters
//! on this machine, in the same run: write throughput and p99 latency with 1
//! and 64 clients, and the window of write unavailability after a leader is
//! killed (median and maximum over 20 kills).
//!
//! Each member of either cluster runs in its own network namespace on the
//! same underlay; the load runs in the fabric namespace and reaches both
//! over TCP. Writes overwrite one key per client, so state stays small.
//! etcd runs with heartbeat 100 ms and election timeout 600 ms; the
//! controller's Raft uses heartbeat 100 ms and election timeouts of
//! 300-600 ms.
//!
//! Run as root after `cargo build --workspace --bins` (needs Debian's
//! etcd-server): `cargo run -p sdn-integration --example raft_compare`

use std::time::{Duration, Instant};

use sdn_integration::etcd;
use sdn_integration::ops::tenant;
use sdn_integration::replicas::Replicas;
use sdn_integration::{enter_netns, Proc, Topology};
use sdn_proto::v1 as pb;
use tonic::transport::Channel;

#[derive(Clone)]
enum Client {
    Ours(pb::provisioning_client::ProvisioningClient<Channel>),
    Etcd(etcd::kv_client::KvClient<Channel>),
}

impl Client {
    async fn connect(kind: &str, addr: &str) -> anyhow::Result<Client> {
        let ch = tokio::time::timeout(Duration::from_millis(300), sdn_proto::connect(addr)).await??;
        Ok(if kind == "ours" {
            Client::Ours(pb::provisioning_client::ProvisioningClient::new(ch))
        } else {
            Client::Etcd(etcd::kv_client::KvClient::new(ch))
        })
    }

    async fn put(&mut self, key: &str) -> anyhow::Result<()> {
        match self {
            Client::Ours(c) => {
                c.apply(pb::ApplyRequest {
                    operations: vec![pb::Operation { op: Some(tenant(key)) }],
                    actor: "bench".into(),
                    ..Default::default()
                })
                .await?;
            }
            Client::Etcd(c) => {
                c.put(etcd::PutRequest {
                    key: key.as_bytes().to_vec(),
                    value: b"v".to_vec(),
                    ..Default::default()
                })
                .await?;
            }
        }
        Ok(())
    }
}

struct Etcd {
    ns: Vec<String>,
    ips: Vec<String>,
    procs: Vec<Option<Proc>>,
    dir: std::path::PathBuf,
}

impl Etcd {
    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let cluster: Vec<String> = self
            .ips
            .iter()
            .enumerate()
            .map(|(j, ip)| format!("e{}=http://{ip}:2380", j + 1))
            .collect();
        let ip = &self.ips[i];
        let data = self.dir.join(format!("etcd{}", i + 1));
        let args = [
            "--name".to_string(),
            format!("e{}", i + 1),
            "--data-dir".into(),
            data.display().to_string(),
            "--listen-peer-urls".into(),
            format!("http://{ip}:2380"),
            "--initial-advertise-peer-urls".into(),
            format!("http://{ip}:2380"),
            "--listen-client-urls".into(),
            format!("http://{ip}:2379"),
            "--advertise-client-urls".into(),
            format!("http://{ip}:2379"),
            "--initial-cluster".into(),
            cluster.join(","),
            "--initial-cluster-state".into(),
            "new".into(),
            "--initial-cluster-token".into(),
            "sdnbench".into(),
            "--heartbeat-interval".into(),
            "100".into(),
            "--election-timeout".into(),
            "600".into(),
            "--log-level".into(),
            "error".into(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.procs[i] = Some(Proc::spawn(
            &format!("etcd{}", i + 1),
            Some(&self.ns[i]),
            std::path::Path::new("/usr/bin/etcd"),
            &args,
            &self.dir,
        )?);
        Ok(())
    }

    fn addr(&self, i: usize) -> String {
        format!("http://{}:2379", self.ips[i])
    }

    /// The leader's index, asked from the fabric namespace.
    fn leader(&self, fabric: &str) -> Option<usize> {
        let addrs: Vec<String> = (0..3).map(|i| self.addr(i)).collect();
        let live: Vec<bool> = self.procs.iter().map(|p| p.is_some()).collect();
        in_ns(fabric, move || async move {
            for i in 0..3 {
                if !live[i] {
                    continue;
                }
                let Ok(Ok(ch)) = tokio::time::timeout(Duration::from_millis(300), sdn_proto::connect(&addrs[i])).await
                else {
                    continue;
                };
                let mut m = etcd::maintenance_client::MaintenanceClient::new(ch);
                if let Ok(Ok(s)) =
                    tokio::time::timeout(Duration::from_millis(300), m.status(etcd::StatusRequest {})).await
                {
                    let s = s.into_inner();
                    if s.leader != 0 && s.header.as_ref().map(|h| h.member_id) == Some(s.leader) {
                        return Some(i);
                    }
                }
            }
            None
        })
    }

    async fn wait_leader(&self, fabric: &str) -> anyhow::Result<usize> {
        let d = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(l) = self.leader(fabric) {
                return Ok(l);
            }
            anyhow::ensure!(Instant::now() < d, "etcd elected no leader");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Runs a future on a thread inside a network namespace.
fn in_ns<F, Fut, R>(ns: &str, f: F) -> R
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = R>,
    R: Send + 'static,
{
    let ns = ns.to_string();
    std::thread::spawn(move || {
        enter_netns(&ns).expect("enter namespace");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(f())
    })
    .join()
    .unwrap()
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Sequential writers for `secs`; returns (writes/s, p99 ms).
async fn throughput(kind: &str, addr: &str, clients: usize, secs: u64) -> anyhow::Result<(f64, f64)> {
    let mut tasks = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(secs);
    for c in 0..clients {
        let mut cl = Client::connect(kind, addr).await?;
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let key = format!("bench-{c}");
            while Instant::now() < deadline {
                let t = Instant::now();
                if cl.put(&key).await.is_ok() {
                    lat.push(t.elapsed().as_secs_f64() * 1000.0);
                }
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await?);
    }
    let n = all.len() as f64;
    Ok((n / secs as f64, pct(&mut all, 0.99)))
}

/// Writes round-robin over the live members until one succeeds after `since`.
async fn first_success_after(kind: &str, addrs: &[String], live: &[bool], since: Instant) -> Duration {
    let mut i = 0;
    loop {
        i += 1;
        let j = i % addrs.len();
        if !live[j] {
            continue;
        }
        let r = async {
            let mut c = Client::connect(kind, &addrs[j]).await?;
            tokio::time::timeout(Duration::from_millis(200), c.put("unavail")).await?
        }
        .await;
        if r.is_ok() {
            return since.elapsed();
        }
        if since.elapsed() > Duration::from_secs(30) {
            return since.elapsed();
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let kills: usize = std::env::var("KILLS").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
    let secs: u64 = std::env::var("SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    let topo = Topology::new("rcmp", &["c1", "c2", "c3"])?;
    let ips: Vec<String> = ["c1", "c2", "c3"].iter().map(|h| topo.underlay_ip(h)).collect();
    let ns: Vec<String> = ["c1", "c2", "c3"]
        .iter()
        .map(|h| topo.host_ns(h).name.clone())
        .collect();
    let fabric = topo.host_ns("fabric").name.clone();

    let mut ours = Replicas::start(&topo, &["c1", "c2", "c3"]).await?;
    let mut et = Etcd {
        ns: ns.clone(),
        ips: ips.clone(),
        procs: vec![None, None, None],
        dir: topo.dir.clone(),
    };
    for i in 0..3 {
        et.spawn(i)?;
    }
    // The load runs from the fabric namespace, which routes to every member.
    let ours_addrs: Vec<String> = ours.replicas.iter().map(|r| r.addr()).collect();
    let etcd_addrs: Vec<String> = (0..3).map(|i| et.addr(i)).collect();
    let (tx, rx) = std::sync::mpsc::channel::<(String, String, usize, u64)>();
    let (res_tx, res_rx) = std::sync::mpsc::channel::<anyhow::Result<(f64, f64)>>();
    let loader = std::thread::spawn(move || {
        enter_netns(&fabric).expect("enter fabric");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        for (kind, addr, clients, secs) in rx {
            res_tx
                .send(rt.block_on(throughput(&kind, &addr, clients, secs)))
                .unwrap();
        }
    });
    let fabric_ns = topo.host_ns("fabric").name.clone();
    let etcd_leader = et.wait_leader(&fabric_ns).await?;
    let ours_leader = ours.wait_leader(Duration::from_secs(10)).await?;

    // Throughput and latency, writing to each cluster's leader.
    let mut table = Vec::new();
    for clients in [1usize, 64] {
        for (kind, addr) in [
            ("ours", ours_addrs[ours_leader].clone()),
            ("etcd", etcd_addrs[etcd_leader].clone()),
        ] {
            // Warm up, then measure.
            tx.send((kind.to_string(), addr.clone(), clients, 1))?;
            res_rx.recv()??;
            tx.send((kind.to_string(), addr.clone(), clients, secs))?;
            let (tput, p99) = res_rx.recv()??;
            eprintln!("{kind} {clients:>2} clients: {tput:>8.0} writes/s  p99 {p99:.2} ms");
            table.push((kind, clients, tput, p99));
        }
    }
    drop(tx);
    loader.join().unwrap();

    // Unavailability after a leader kill. The measuring client also runs in the fabric namespace.
    let mut windows: Vec<(&str, Vec<f64>)> = vec![("ours", vec![]), ("etcd", vec![])];
    for (kind, samples) in windows.iter_mut() {
        for k in 0..kills {
            let leader = if *kind == "ours" {
                ours.wait_leader(Duration::from_secs(15)).await?
            } else {
                et.wait_leader(&fabric_ns).await?
            };
            let addrs = if *kind == "ours" {
                ours_addrs.clone()
            } else {
                etcd_addrs.clone()
            };
            let mut live = vec![true; 3];
            live[leader] = false;
            let fabric = topo.host_ns("fabric").name.clone();
            let kind_s = kind.to_string();
            // Kill, then time until a write succeeds again.
            let killed_at = Instant::now();
            if *kind == "ours" {
                ours.kill(leader)
            } else if let Some(mut p) = et.procs[leader].take() {
                p.kill()
            }
            let w = in_ns(&fabric, move || async move {
                first_success_after(&kind_s, &addrs, &live, killed_at).await
            });
            let ms = w.as_secs_f64() * 1000.0;
            eprintln!("{kind} kill {k}: writes unavailable for {ms:.0} ms");
            samples.push(ms);
            // Bring the member back and let it catch up before the next kill.
            if *kind == "ours" {
                ours.spawn(leader, true)?;
                ours.wait_answering(leader).await?;
            } else {
                et.spawn(leader)?;
            }
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
    }

    println!("\nwrite throughput and latency (writes to the leader, one key per client):");
    println!("  {:<6} {:>7} {:>12} {:>10}", "system", "clients", "writes/s", "p99 ms");
    for (kind, clients, tput, p99) in &table {
        println!("  {kind:<6} {clients:>7} {tput:>12.0} {p99:>10.2}");
    }
    for clients in [1usize, 64] {
        let o = table.iter().find(|r| r.0 == "ours" && r.1 == clients).unwrap();
        let e = table.iter().find(|r| r.0 == "etcd" && r.1 == clients).unwrap();
        println!(
            "  {clients} client(s): throughput ours/etcd = {:.2}, p99 ours/etcd = {:.2}",
            o.2 / e.2,
            o.3 / e.3
        );
    }
    println!("\nwrite unavailability after a leader kill ({kills} kills each):");
    for (kind, samples) in windows.iter_mut() {
        let med = pct(samples, 0.5);
        let max = pct(samples, 1.0);
        println!("  {kind:<6} median {med:>7.0} ms   max {max:>7.0} ms");
    }
    drop(et);
    drop(ours);
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    run().await
}
