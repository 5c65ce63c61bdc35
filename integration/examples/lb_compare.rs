//! The L4 load balancer end to end, against nftables DNAT (a `jhash` map)
//! with masquerade and against haproxy in `mode tcp`, in one run, with the
//! same generator and the same servers.
//!
//! - **Ours**: a client VM and two member VMs on one host; the client's
//!   pipeline translates to the VIP's members (Maglev), east-west.
//! - **Ours, north-south**: the same VIP exposed to the VPC's zone, the
//!   host its NAT host: a client in the zone's network reaches it through
//!   the host's uplink, translated both ways (full NAT, as the peers do).
//! - **The peers**: a client namespace, a balancer namespace holding the
//!   VIP, and two backend namespaces behind it, plain veths. nftables:
//!   DNAT in prerouting by a `jhash` of the client's address and port onto
//!   the two backends, masquerade out of the backend side (full NAT, as a
//!   balancer with backends anywhere needs). haproxy: `mode tcp`, round
//!   robin, one thread, the usual timeouts.
//!
//! New connections a second: `sdn-probe conns` opens connections from 8
//! threads, each sending a byte, reading it back and closing with a reset;
//! `sdn-probe accept` answers in each backend. Throughput: iperf3 through
//! the VIP to one backend, one flow and eight. Everything (generator,
//! balancer, servers) is pinned to one core, so each mode's figure is what
//! one core does with it. Modes alternate over rounds; medians.
//!
//! Run as root after `cargo build --workspace --bins`:
//! `cargo run -p sdn-integration --example lb_compare` (`ROUNDS`, `SECONDS`).

use std::time::Duration;

use sdn_integration::ops::*;
use sdn_integration::supervisor::which;
use sdn_integration::{bin, ns_sh, sh, Netns, Proc};
use sdn_proto::v1 as pb;

const OURS_VIP: &str = "10.90.0.100";
const OURS_NAT: &str = "10.90.0.200";
const PEER_VIP: &str = "10.91.0.100";

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// The peers' namespaces: client, balancer, two backends.
struct Peers {
    client: Netns,
    balancer: Netns,
    backends: [Netns; 2],
}

impl Peers {
    fn new() -> anyhow::Result<Peers> {
        let p = Peers {
            client: Netns::new("lbcp-c")?,
            balancer: Netns::new("lbcp-r")?,
            backends: [Netns::new("lbcp-b1")?, Netns::new("lbcp-b2")?],
        };
        let (c, r) = (&p.client.name, &p.balancer.name);
        sh(&[
            "ip", "link", "add", "c0", "netns", c, "type", "veth", "peer", "name", "r0", "netns", r,
        ])?;
        ns_sh(c, &["ip", "addr", "add", "10.91.0.2/24", "dev", "c0"])?;
        ns_sh(r, &["ip", "addr", "add", "10.91.0.1/24", "dev", "r0"])?;
        ns_sh(r, &["ip", "addr", "add", &format!("{PEER_VIP}/24"), "dev", "r0"])?;
        for (i, b) in p.backends.iter().enumerate() {
            let n = i + 1;
            let (inside, outside) = (format!("e{n}"), format!("r{n}"));
            sh(&[
                "ip", "link", "add", &inside, "netns", &b.name, "type", "veth", "peer", "name", &outside, "netns", r,
            ])?;
            ns_sh(
                &b.name,
                &["ip", "addr", "add", &format!("10.92.{n}.1{n}/24"), "dev", &inside],
            )?;
            ns_sh(r, &["ip", "addr", "add", &format!("10.92.{n}.1/24"), "dev", &outside])?;
            ns_sh(&b.name, &["ip", "link", "set", &inside, "mtu", "1450", "up"])?;
            ns_sh(r, &["ip", "link", "set", &outside, "mtu", "1450", "up"])?;
            ns_sh(
                &b.name,
                &["ip", "route", "add", "default", "via", &format!("10.92.{n}.1")],
            )?;
        }
        for (ns, dev) in [(c, "c0"), (r, "r0")] {
            ns_sh(ns, &["ip", "link", "set", dev, "mtu", "1450", "up"])?;
        }
        ns_sh(r, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        Ok(p)
    }

    fn backend(&self, i: usize) -> String {
        format!("10.92.{}.1{}", i + 1, i + 1)
    }
}

/// nftables' full NAT in the balancer namespace.
fn nft(p: &Peers) -> anyhow::Result<()> {
    let r = &p.balancer.name;
    let rules = format!(
        "table ip lbc {{\n  chain pre {{\n    type nat hook prerouting priority dstnat; policy accept;\n    \
         ip daddr {PEER_VIP} tcp dport 80 dnat to jhash ip saddr . tcp sport mod 2 map {{ 0 : {}, 1 : {} }}\n    \
         ip daddr {PEER_VIP} tcp dport 5201 dnat to {}\n  }}\n  chain post {{\n    \
         type nat hook postrouting priority srcnat; policy accept;\n    oifname {{ \"r1\", \"r2\" }} masquerade\n  }}\n}}\n",
        p.backend(0),
        p.backend(1),
        p.backend(0)
    );
    let file = std::env::temp_dir().join("lbc.nft");
    std::fs::write(&file, rules)?;
    ns_sh(r, &["nft", "-f", file.to_str().unwrap()])?;
    Ok(())
}

fn haproxy(p: &Peers, dir: &std::path::Path) -> anyhow::Result<Proc> {
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  nbthread 1\n  maxconn 8000\n\ndefaults\n  mode tcp\n  timeout connect 2s\n  \
             timeout client 30s\n  timeout server 30s\n\nfrontend web\n  bind {PEER_VIP}:80\n  default_backend web\n\n\
             frontend perf\n  bind {PEER_VIP}:5201\n  default_backend perf\n\nbackend web\n  balance roundrobin\n  \
             server b1 {}:80\n  server b2 {}:80\n\nbackend perf\n  server b1 {}:5201\n",
            p.backend(0),
            p.backend(1),
            p.backend(0)
        ),
    )?;
    let h = Proc::spawn(
        "haproxy",
        Some(&p.balancer.name),
        &which("taskset"),
        &[
            "-c",
            "0",
            which("haproxy").to_str().unwrap(),
            "-db",
            "-f",
            cfg.to_str().unwrap(),
        ],
        dir,
    )?;
    std::thread::sleep(Duration::from_millis(500));
    Ok(h)
}

/// The servers in each of `namespaces`: `sdn-probe accept` on port 80,
/// and iperf3 on 5201 in the first.
fn serve(namespaces: &[String], dir: &std::path::Path) -> anyhow::Result<Vec<Proc>> {
    let probe = bin("sdn-probe");
    let mut servers = Vec::new();
    for (i, ns) in namespaces.iter().enumerate() {
        servers.push(Proc::spawn(
            &format!("accept-{ns}"),
            Some(ns),
            &which("taskset"),
            &["-c", "0", probe.to_str().unwrap(), "accept", "80"],
            dir,
        )?);
        if i == 0 {
            servers.push(Proc::spawn(
                &format!("iperf3-{ns}"),
                Some(ns),
                &which("iperf3"),
                &["-s", "-p", "5201", "-A", "0"],
                dir,
            )?);
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    Ok(servers)
}

/// Connections a second from `ns` to `vip`:80, and those that failed.
fn conns(ns: &str, vip: &str, secs: u64) -> anyhow::Result<(f64, u64)> {
    let probe = bin("sdn-probe");
    let out = ns_sh(
        ns,
        &[
            "taskset",
            "-c",
            "0",
            probe.to_str().unwrap(),
            "conns",
            vip,
            "80",
            "--seconds",
            &secs.to_string(),
        ],
    )?;
    let mut it = out.split_whitespace().map(|x| x.parse::<u64>().unwrap_or(0));
    let (ok, failed) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
    Ok((ok as f64 / secs as f64, failed))
}

/// iperf3 through `vip`:5201 with `flows` flows: Gbit/s received.
fn iperf(ns: &str, vip: &str, secs: u64, flows: u32) -> anyhow::Result<f64> {
    let out = ns_sh(
        ns,
        &[
            "iperf3",
            "-c",
            vip,
            "-p",
            "5201",
            "-A",
            "0",
            "-t",
            &secs.to_string(),
            "-P",
            &flows.to_string(),
            "-J",
        ],
    )?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    Ok(v["end"]["sum_received"]["bits_per_second"].as_f64().unwrap_or(0.0) / 1e9)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    anyhow::ensure!(sdn_integration::privileged(), "run as root");
    anyhow::ensure!(
        sdn_integration::supervisor::have("haproxy"),
        "haproxy is missing: scripts/setup.sh installs it"
    );
    let rounds = env_or("ROUNDS", 3) as usize;
    let secs = env_or("SECONDS", 5);
    let dir = tempfile::tempdir()?;

    // Ours: a client and two members on one host, the VPC in a zone whose
    // network the north-south client is in.
    let lab = sdn_integration::lab::Lab::new("lbc", &["h1"])
        .zone("ext", "up-ext", "10.254.0", "fdfe:0:0:1", &["10.0.0.0/8"], &[])
        .tenant("t")
        .vpc("v", Some("ext"))
        .subnet("net", "v", "10.90.0.0/24", "")
        .group("open", open_rules())
        .vm("c1", "h1", "net", &["open"])
        .vm("m1", "h1", "net", &["open"])
        .vm("m2", "h1", "net", &["open"])
        .start()
        .await?;
    let mut ops = vec![
        put_lb(exposed(load_balancer("lb", "t", "v", OURS_VIP, ""), "h1", OURS_NAT)),
        pool("web", "lb"),
        pool("perf", "lb"),
    ];
    for m in ["m1", "m2"] {
        ops.push(member(&format!("web-{m}"), "web", m, "", 1));
    }
    let mut perf = member("perf-m1", "perf", "m1", "", 1);
    if let pb::operation::Op::PutMember(x) = &mut perf {
        x.port = 5201;
    }
    ops.push(perf);
    ops.push(listener("web", "lb", "tcp", 80, "web", "maglev"));
    ops.push(listener("perf", "lb", "tcp", 5201, "perf", "maglev"));
    anyhow::ensure!(
        lab.cluster.apply(ops).await?.enforced,
        "the load balancer is not enforced"
    );

    let members: Vec<String> = ["m1", "m2"].iter().map(|m| lab.topo.vm(m).ns.name.clone()).collect();
    let servers = serve(&members, dir.path())?;
    let client = lab.topo.vm("c1").ns.name.clone();
    let zone_client = lab.topo.zone_ns("ext").name.clone();
    ns_sh(
        &zone_client,
        &[
            "ip",
            "route",
            "replace",
            &format!("{OURS_VIP}/32"),
            "via",
            "10.254.0.11",
        ],
    )?;
    let peer_client = "lbcp-c".to_string();

    let modes = ["ours", "ours-ns", "nftables", "haproxy"];
    let mut cps: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    let mut one: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    let mut many: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    let mut failed = [0u64; 4];
    for round in 0..rounds {
        for (i, mode) in modes.iter().enumerate() {
            // Each peer gets namespaces of its own, made afresh: neither
            // finds the other's conntrack entries or sockets (haproxy's
            // connections to the backends leave entries that masquerade's
            // port search then walks around).
            let mut peer = None;
            let mut h = None;
            let (ns, vip) = match *mode {
                "ours" => (&client, OURS_VIP),
                "ours-ns" => (&zone_client, OURS_VIP),
                "nftables" => {
                    let p = Peers::new()?;
                    let s = serve(
                        &p.backends.iter().map(|b| b.name.clone()).collect::<Vec<_>>(),
                        dir.path(),
                    )?;
                    nft(&p)?;
                    peer = Some((s, p));
                    (&peer_client, PEER_VIP)
                }
                _ => {
                    let p = Peers::new()?;
                    let s = serve(
                        &p.backends.iter().map(|b| b.name.clone()).collect::<Vec<_>>(),
                        dir.path(),
                    )?;
                    h = Some(haproxy(&p, dir.path())?);
                    peer = Some((s, p));
                    (&peer_client, PEER_VIP)
                }
            };
            let drops_before = lab.drops("h1")?["drops"].clone();
            let (c, f) = conns(ns, vip, secs)?;
            if mode.starts_with("ours") {
                // What the host dropped meanwhile, by reason (a failed
                // connection's cause, when it is ours).
                let after = lab.drops("h1")?["drops"].clone();
                let grew: Vec<String> = after
                    .as_object()
                    .into_iter()
                    .flatten()
                    .filter_map(|(k, v)| {
                        let d = v.as_u64()? - drops_before[k].as_u64().unwrap_or(0);
                        (d > 0).then(|| format!("{k}={d}"))
                    })
                    .collect();
                eprintln!("[lb_compare] {mode}: drops during the connections: {grew:?}");
            }
            cps[i].push(c);
            failed[i] += f;
            one[i].push(iperf(ns, vip, secs, 1)?);
            many[i].push(iperf(ns, vip, secs, 8)?);
            drop(h);
            drop(peer);
            eprintln!(
                "[lb_compare] round {round} {mode}: {c:.0} connections/s ({f} failed), {:.2} / {:.2} Gbit/s",
                one[i].last().unwrap(),
                many[i].last().unwrap()
            );
        }
    }
    let ours = median(&mut cps[0].clone());
    let ours_ns = median(&mut cps[1].clone());
    println!(
        "{:<10} {:>16} {:>8} {:>14} {:>14}",
        "mode", "connections/s", "failed", "1 flow Gbit/s", "8 flows Gbit/s"
    );
    for (i, mode) in modes.iter().enumerate() {
        let c = median(&mut cps[i]);
        println!(
            "{mode:<10} {c:>16.0} {:>8} {:>14.2} {:>14.2}",
            failed[i],
            median(&mut one[i]),
            median(&mut many[i])
        );
        if i > 1 {
            println!(
                "  ours / {mode}: {:.2}x the connections a second east-west, {:.2}x north-south",
                ours / c.max(1.0),
                ours_ns / c.max(1.0)
            );
        }
    }
    for (i, mode) in modes.iter().enumerate() {
        anyhow::ensure!(cps[i].iter().all(|c| *c > 0.0), "{mode}: no connection made");
    }
    drop(servers);
    drop(lab);
    Ok(())
}
