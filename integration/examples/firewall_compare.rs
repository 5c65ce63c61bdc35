//! Our security-group dataplane against iptables (a linear chain) and
//! nftables (a set), enforcing the same 10,000-rule policy between a zone
//! network and a VM, with the same traffic generator, in one run.
//!
//! Path: generator in the zone's network -> host h1's uplink -> vm1's veth
//! -> vm1. Ours: the uplink's pipeline delivers straight into vm1 (zone
//! guard, security groups, conntrack). The peers: the host's kernel forwards
//! from the uplink to vm1's veth through a FORWARD chain that accepts
//! established flows first (`ct state established,related accept`, the
//! usual configuration, the same stateful shortcut ours takes), then the
//! rules. vm1 echoes every datagram, so each filter sees both directions
//! and holds the 16 flows as established. The policy admits UDP 9000 from 10,000 /32 sources; the
//! generator's address is the last of them. Each mode floods 64-byte frames
//! for a few seconds; packets delivered to vm1 per second are counted on its
//! interface. Modes alternate over several rounds; the median is reported.
//!
//! `NEW_FLOWS=1`: every packet a new flow instead, so every filter runs its
//! rule lookup (and its conntrack insert) on every packet: UDP datagrams
//! from 8,190 of the admitted sources (172.16.0.0/19), each from a source
//! port not used before, none answered (vm1 drops them at its own input,
//! so it sends no errors back). Ours keeps them as unconfirmed flows (an
//! LRU of its own); netfilter keeps them as new, unreplied entries.
//!
//! Run as root after `cargo build --workspace --bins`:
//! `cargo run -p sdn-integration --example firewall_compare`

use std::time::Duration;

use sdn_integration::lab::{Lab, TENANT};
use sdn_integration::ops::*;
use sdn_integration::{bin, sh, Topology};
use sdn_proto::v1 as pb;

const RULES: usize = 10_000;
const PORT: u16 = 9000;

fn sources() -> Vec<String> {
    // 9,999 addresses that are not the generator, then the generator's.
    let mut v: Vec<String> = (0..RULES - 1)
        .map(|i| format!("172.{}.{}.{}", 16 + i / 65536, (i / 256) % 256, i % 256))
        .collect();
    // The zone router's address: the generator's source.
    v.push(GENERATOR.into());
    v
}

/// The generator's address in the zone's network.
const GENERATOR: &str = "172.30.0.1";

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
    s.push_str("-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n");
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
        "table inet sdnbench {{\n  set allow {{ type ipv4_addr . inet_service; elements = {{ {} }} }}\n  chain filter_fwd {{ type filter hook forward priority 0; policy drop; ct state established,related accept; ip saddr . udp dport @allow accept;\n  }}\n}}\n",
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

/// Admitted sources the every-packet-new generator sends from.
const NEW_FLOW_SOURCES: &str = "172.16.0.0/19";

fn measure(topo: &Topology, secs: u64, new_flows: bool) -> (f64, f64) {
    let before = rx(topo);
    let zone = &topo.zone_ns("net").name;
    let probe = bin("sdn-probe");
    let (port, secs_s) = (PORT.to_string(), secs.to_string());
    let args: Vec<&str> = if new_flows {
        vec![
            probe.to_str().unwrap(),
            "new-flows",
            "10.10.0.11",
            &port,
            "--sources",
            NEW_FLOW_SOURCES,
            "--seconds",
            &secs_s,
        ]
    } else {
        vec![
            probe.to_str().unwrap(),
            "flood",
            "10.10.0.11",
            &port,
            "--seconds",
            &secs_s,
            "--flows",
            "16",
        ]
    };
    let out = sdn_integration::ns_sh(zone, &args).unwrap();
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
    let new_flows = std::env::var("NEW_FLOWS").is_ok_and(|v| v == "1");
    // vm1 (10.10.0.11) in a VPC of the zone, its group with the 10,000 rules.
    let prefixes = ["10.0.0.0/8", "172.16.0.0/12"];
    let lab = Lab::new("fwb", &["h1"])
        .zone("net", "up-net", "172.30.0", "fdf0:0:0:30", &prefixes, &[])
        .vpc("v", Some("net"))
        .subnet("s", "v", "10.10.0.0/24", "")
        .group("g", sg_rules(true))
        .vm("vm1", "h1", "s", &["g"])
        .start()
        .await?;
    // Our programs back on the path: what `nothing_of_ours` removes.
    let vm1_port = lab.port("vm1", &["g"]);
    let zoned = || {
        vec![
            zone("net", &prefixes, "up-net"),
            vpc_in_zone("v", TENANT, "net"),
            subnet("s", "v", "10.10.0.0/24", ""),
            vm1_port.clone(),
        ]
    };
    let Lab { topo, cluster, .. } = lab;
    let h1 = topo.host_ns("h1").name.clone();
    // For the peers, the host's kernel forwards from the uplink to vm1.
    topo.host_ns("h1").sysctl("net.ipv4.ip_forward=1")?;
    topo.host_ns("h1")
        .sh(&["ip", "route", "add", "10.10.0.11/32", "dev", "vm1h"])?;
    // ... and answers for vm1's gateway, so vm1's replies come back through
    // it. (With our programs on, the distributed gateway answers first.)
    topo.host_ns("h1")
        .sh(&["ip", "addr", "add", "10.10.0.1/32", "dev", "vm1h"])?;
    let ipt = if std::path::Path::new("/usr/sbin/iptables-legacy-restore").exists() {
        "iptables-legacy"
    } else {
        "iptables"
    };
    // Stateful: vm1 answers every datagram, so every filter's conntrack
    // sees both directions and holds the flows as established (netfilter
    // keeps a UDP flow that was never answered as new, judged by the rules
    // each time). Every packet new: vm1 answers nothing, and drops the
    // datagrams at its own input (no port-unreachable errors back); the
    // host takes sources it has no route back to.
    let _echo = if new_flows {
        topo.vm("vm1").ns.sh(&[
            ipt,
            "-I",
            "INPUT",
            "-p",
            "udp",
            "--dport",
            &PORT.to_string(),
            "-j",
            "DROP",
        ])?;
        for dev in ["all", "default", "up-net"] {
            topo.host_ns("h1").sysctl(&format!("net.ipv4.conf.{dev}.rp_filter=0"))?;
        }
        Vec::new()
    } else {
        topo.serve(&["vm1"], &[], &["--udp", &PORT.to_string()])?
    };
    let ipt_file = topo.dir.join("iptables.rules");
    std::fs::write(&ipt_file, iptables_rules())?;
    let nft_file = topo.dir.join("nft.rules");
    std::fs::write(&nft_file, nft_rules())?;
    let ipt_restore = format!("{ipt}-restore");

    // Our programs off the path: the port, its VPC and the zone go, so
    // neither vm1's veth nor the uplink has a program.
    let nothing_of_ours = || {
        [
            (pb::Kind::Port, "vm1"),
            (pb::Kind::Subnet, "s"),
            (pb::Kind::Vpc, "v"),
            (pb::Kind::Zone, "net"),
        ]
        .into_iter()
        .map(|(kind, id)| {
            pb::operation::Op::Delete(pb::ObjectRef {
                kind: kind as i32,
                id: id.into(),
            })
        })
        .collect::<Vec<_>>()
    };
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
                    cluster.apply(zoned()).await?;
                    port_on = true;
                }
            } else {
                if port_on {
                    cluster.apply(nothing_of_ours()).await?;
                    port_on = false;
                }
                if mode.starts_with("iptables") {
                    sh(&["ip", "netns", "exec", &h1, &ipt_restore, ipt_file.to_str().unwrap()])?;
                } else if mode.starts_with("nftables") {
                    sh(&["ip", "netns", "exec", &h1, "nft", "-f", nft_file.to_str().unwrap()])?;
                }
            }
            let (pps, offered) = measure(&topo, secs, new_flows);
            eprintln!("round {round} {mode:<26} delivered {pps:>10.0} pps (offered {offered:.0})");
            samples.push(pps);
            let _ = sh(&["ip", "netns", "exec", &h1, ipt, "-F", "FORWARD"]);
            let _ = sh(&["ip", "netns", "exec", &h1, ipt, "-P", "FORWARD", "ACCEPT"]);
            let _ = sh(&["ip", "netns", "exec", &h1, "nft", "delete", "table", "inet", "sdnbench"]);
        }
    }
    if new_flows {
        println!("{RULES} rules, {secs} s per sample, {rounds} rounds, 64-byte UDP frames, every packet a new flow from {NEW_FLOW_SOURCES}, median delivered packets/s:");
    } else {
        println!("{RULES} rules, {secs} s per sample, {rounds} rounds, 64-byte UDP frames, 16 flows, stateful shortcut in every filter, median delivered packets/s:");
    }
    let ours = median(&mut results[0].1.clone());
    for (mode, samples) in results.iter_mut() {
        let m = median(samples);
        println!("  {mode:<26} {m:>10.0} pps   ours/this = {:.2}", ours / m);
    }
    Ok(())
}
