//! Our security-group dataplane against iptables (a linear chain) and
//! nftables (a set), enforcing the same 10,000-rule policy on the same veth
//! path with the same traffic generator, in one run.
//!
//! Path: generator in the fabric namespace -> host h1 (forwarding) -> vm1's
//! veth -> vm1. The policy admits UDP 9000 from 10,000 /32 sources; the
//! generator's address is the last of them. Each mode floods 64-byte frames
//! for a few seconds; packets delivered to vm1 per second are counted on its
//! interface. Modes alternate over several rounds; the median is reported.
//!
//! Run as root after `cargo build --workspace --bins`:
//! `cargo run -p sdn-integration --example firewall_compare`

use std::time::Duration;

use sdn_integration::cluster::Cluster;
use sdn_integration::ops::*;
use sdn_integration::{bin, sh, Topology};
use sdn_proto::v1 as pb;

const T: &str = "t";
const RULES: usize = 10_000;
const PORT: u16 = 9000;

fn sources() -> Vec<String> {
    // 9,999 addresses that are not the generator, then the generator's.
    let mut v: Vec<String> = (0..RULES - 1)
        .map(|i| format!("172.{}.{}.{}", 16 + i / 65536, (i / 256) % 256, i % 256))
        .collect();
    v.push("192.168.1.1".into());
    v
}

fn sg_rules(on: bool) -> Vec<pb::SecurityGroupRule> {
    if !on {
        return vec![];
    }
    sources()
        .iter()
        .enumerate()
        .map(|(i, s)| {
            ingress(
                &format!("r{i}"),
                false,
                "udp",
                (PORT as u32, PORT as u32),
                &format!("{s}/32"),
                "",
            )
        })
        .collect()
}

fn iptables_rules() -> String {
    let mut s = String::from("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n");
    for src in sources() {
        s.push_str(&format!(
            "-A FORWARD -s {src}/32 -d 10.10.0.11/32 -p udp -m udp --dport {PORT} -j ACCEPT\n"
        ));
    }
    s.push_str("COMMIT\n");
    s
}

fn nft_rules() -> String {
    let elems: Vec<String> = sources().iter().map(|s| format!("{s} . {PORT}")).collect();
    format!(
        "table inet sdnbench {{\n  set allow {{ type ipv4_addr . inet_service; elements = {{ {} }} }}\n  chain filter_fwd {{ type filter hook forward priority 0; policy drop; ip saddr . udp dport @allow accept;\n  }}\n}}\n",
        elems.join(", ")
    )
}

fn rx(topo: &Topology) -> u64 {
    topo.vm("vm1")
        .ns
        .sh(&["cat", "/sys/class/net/eth0/statistics/rx_packets"])
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn measure(topo: &Topology, secs: u64) -> (f64, f64) {
    let before = rx(topo);
    let fabric = &topo.host_ns("fabric").name;
    let out = sdn_integration::ns_sh(
        fabric,
        &[
            bin("sdn-probe").to_str().unwrap(),
            "flood",
            "10.10.0.11",
            &PORT.to_string(),
            "--seconds",
            &secs.to_string(),
            "--flows",
            "16",
        ],
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let got = rx(topo) - before;
    let sent: u64 = out.trim().parse().unwrap();
    (got as f64 / secs as f64, sent as f64 / secs as f64)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rounds: usize = std::env::var("ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let secs: u64 = std::env::var("SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(4);
    let mut topo = Topology::new("fwb", &["h1"])?;
    topo.add_vm("vm1", "h1", "02:00:00:00:00:11", "10.10.0.11/24", "fd10::11/64")?;
    let h1 = topo.host_ns("h1").name.clone();
    // The generator's packets reach vm1 routed by the host's kernel (the
    // path iptables and nftables filter), not through the overlay.
    topo.host_ns("h1")
        .sh(&["ip", "route", "add", "10.10.0.11/32", "dev", "vm1h"])?;
    topo.host_ns("fabric")
        .sh(&["ip", "route", "add", "10.10.0.11/32", "via", &topo.underlay_ip("h1")])?;
    let mut cluster = Cluster::start(&topo.dir)?;
    cluster
        .apply(vec![
            tenant(T),
            vpc("v", T),
            subnet("s", "v", "10.10.0.0/24", ""),
            host("h1", &topo.underlay_ip("h1")),
            group("g", T, sg_rules(false)),
        ])
        .await?;
    cluster.start_agent(&topo, "h1")?;
    cluster
        .apply(vec![port(
            "vm1",
            T,
            "s",
            "h1",
            "vm1h",
            "02:00:00:00:00:11",
            "10.10.0.11",
            "",
            &["g"],
        )])
        .await?;

    let ipt = if std::path::Path::new("/usr/sbin/iptables-legacy-restore").exists() {
        "iptables-legacy"
    } else {
        "iptables"
    };
    let ipt_file = topo.dir.join("iptables.rules");
    std::fs::write(&ipt_file, iptables_rules())?;
    let nft_file = topo.dir.join("nft.rules");
    std::fs::write(&nft_file, nft_rules())?;
    let ipt_restore = format!("{ipt}-restore");

    let vm1_port = || {
        port(
            "vm1",
            T,
            "s",
            "h1",
            "vm1h",
            "02:00:00:00:00:11",
            "10.10.0.11",
            "",
            &["g"],
        )
    };
    let no_port = || {
        pb::operation::Op::Delete(pb::ObjectRef {
            kind: pb::Kind::Port as i32,
            id: "vm1".into(),
        })
    };
    cluster.apply(vec![group("g", T, sg_rules(true))]).await?;
    let mut results: Vec<(&str, Vec<f64>)> = vec![
        ("sdn eBPF security group", vec![]),
        ("iptables linear chain", vec![]),
        ("nftables set", vec![]),
        ("no filtering", vec![]),
    ];
    let mut port_on = true;
    for round in 0..rounds {
        for (mode, samples) in results.iter_mut() {
            // Exactly one filter on the path: ours (the port with its
            // 10,000-rule group), or a peer's ruleset with our port removed,
            // which detaches our programs.
            if *mode == "sdn eBPF security group" {
                if !port_on {
                    cluster.apply(vec![vm1_port()]).await?;
                    port_on = true;
                }
            } else {
                if port_on {
                    cluster.apply(vec![no_port()]).await?;
                    port_on = false;
                }
                if mode.starts_with("iptables") {
                    sh(&["ip", "netns", "exec", &h1, &ipt_restore, ipt_file.to_str().unwrap()])?;
                } else if mode.starts_with("nftables") {
                    sh(&["ip", "netns", "exec", &h1, "nft", "-f", nft_file.to_str().unwrap()])?;
                }
            }
            let (pps, offered) = measure(&topo, secs);
            eprintln!("round {round} {mode:<26} delivered {pps:>10.0} pps (offered {offered:.0})");
            samples.push(pps);
            let _ = sh(&["ip", "netns", "exec", &h1, ipt, "-F", "FORWARD"]);
            let _ = sh(&["ip", "netns", "exec", &h1, ipt, "-P", "FORWARD", "ACCEPT"]);
            let _ = sh(&["ip", "netns", "exec", &h1, "nft", "delete", "table", "inet", "sdnbench"]);
        }
    }
    println!("{RULES} rules, {secs} s per sample, {rounds} rounds, 64-byte UDP frames, median delivered packets/s:");
    let ours = median(&mut results[0].1.clone());
    for (mode, samples) in results.iter_mut() {
        let m = median(samples);
        println!("  {mode:<26} {m:>10.0} pps   ours/this = {:.2}", ours / m);
    }
    Ok(())
}
