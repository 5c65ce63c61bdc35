//! VM-to-VM TCP throughput between two hosts through the overlay, with
//! policies on, against the same hosts' bare kernel path in the same run:
//! a Linux bridge and an ordinary VXLAN device, no eBPF and no filtering.
//!
//! Ours: vm1 (h1) -> vm2 (h2), both ports with security groups (vm2 admits
//! TCP 5201 from the VPC; egress rules on vm1), conntrack, the collect-metadata
//! VXLAN device with the tunnel key set by the program.
//! Bare: bare1 (h1) -> bare2 (h2) on a bridge per host joined by a VXLAN
//! device (VNI 300, UDP 4790) pointing at the other host.
//! Same underlay, same MTU (1450 in the VMs), iperf3 single stream, rounds
//! alternate between the two paths.
//!
//! Run as root after `cargo build --release --workspace --bins --examples`:
//! `./target/release/examples/overlay_throughput` (ROUNDS, SECONDS).

use std::time::Duration;

use sdn_integration::lab::Lab;
use sdn_integration::ops::*;
use sdn_integration::{Proc, Topology};

fn iperf(topo: &Topology, from: &str, to_addr: &str, secs: u64) -> anyhow::Result<f64> {
    let out = topo.vm(from).ns.sh(&[
        "iperf3",
        "-c",
        to_addr,
        "-t",
        &secs.to_string(),
        "-J",
        "--connect-timeout",
        "2000",
    ])?;
    let j: serde_json::Value = serde_json::from_str(&out)?;
    j["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or_else(|| anyhow::anyhow!("no throughput in iperf3 output"))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rounds: usize = std::env::var("ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    let secs: u64 = std::env::var("SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    // Ours: a controller, two agents, security groups on both ports: vm1
    // (h1, 10.10.0.11) the client, vm2 (h2, 10.10.0.12) the server.
    let out = |id: &str, proto: &str, ports: (u32, u32)| {
        let mut r = ingress(id, false, proto, ports, "10.10.0.0/24", "");
        r.direction = sdn_proto::v1::Direction::Egress as i32;
        r
    };
    let Lab { mut topo, cluster, .. } = Lab::new("ovb", &["h1", "h2"])
        .vpc("v", None)
        .subnet("s", "v", "10.10.0.0/24", "")
        .group(
            "server",
            vec![
                ingress("iperf", false, "tcp", (5201, 5201), "10.10.0.0/24", ""),
                ingress("ssh", false, "tcp", (22, 22), "10.0.0.0/8", ""),
                ingress("ping", false, "icmp", (8, 8), "", ""),
            ],
        )
        .group(
            "client",
            vec![out("iperf-out", "tcp", (5201, 5201)), out("ping-out", "icmp", (8, 8))],
        )
        .vm("vm1", "h1", "s", &["client"])
        .vm("vm2", "h2", "s", &["server"])
        .start()
        .await?;

    // The bare path: namespaces with no port, a bridge + VXLAN on each host.
    topo.add_vm("bare1", "h1", "02:00:00:00:01:11", "10.30.0.11/24", "")?;
    topo.add_vm("bare2", "h2", "02:00:00:00:01:12", "10.30.0.12/24", "")?;
    for (h, peer) in [("h1", "h2"), ("h2", "h1")] {
        let ns = topo.host_ns(h);
        let dev = topo.vm(if h == "h1" { "bare1" } else { "bare2" }).device.clone();
        ns.sh(&["ip", "link", "add", "br-bare", "type", "bridge"])?;
        ns.sh(&[
            "ip",
            "link",
            "add",
            "vx-bare",
            "type",
            "vxlan",
            "id",
            "300",
            "dstport",
            "4790",
            "local",
            &topo.underlay_ip(h),
            "remote",
            &topo.underlay_ip(peer),
        ])?;
        for d in ["vx-bare", &dev] {
            ns.sh(&["ip", "link", "set", d, "master", "br-bare", "up"])?;
        }
        ns.sh(&["ip", "link", "set", "br-bare", "up"])?;
    }

    let _servers = [
        Proc::spawn(
            "iperf-vm2",
            Some(&topo.vm("vm2").ns.name),
            "iperf3".as_ref(),
            &["-s"],
            &topo.dir,
        )?,
        Proc::spawn(
            "iperf-bare2",
            Some(&topo.vm("bare2").ns.name),
            "iperf3".as_ref(),
            &["-s"],
            &topo.dir,
        )?,
    ];
    std::thread::sleep(Duration::from_millis(500));
    // Warm up both paths (neighbour resolution, bridge learning).
    anyhow::ensure!(topo.reach_addr("vm1", "10.10.0.12", "icmp", 0), "overlay path broken");
    anyhow::ensure!(topo.reach_addr("bare1", "10.30.0.12", "icmp", 0), "bare path broken");

    let (mut ours, mut bare) = (Vec::new(), Vec::new());
    for i in 0..rounds {
        let o = iperf(&topo, "vm1", "10.10.0.12", secs)?;
        let b = iperf(&topo, "bare1", "10.30.0.12", secs)?;
        eprintln!(
            "round {}: ours {:.2} Gbit/s, bare {:.2} Gbit/s",
            i + 1,
            o / 1e9,
            b / 1e9
        );
        ours.push(o);
        bare.push(b);
    }
    let (o, b) = (median(&mut ours), median(&mut bare));
    let counters = cluster.drops(&topo, "h1")?;
    println!("| path | median Gbit/s ({rounds} rounds x {secs} s) |");
    println!("|---|---|");
    println!("| ours: overlay + security groups + conntrack | {:.2} |", o / 1e9);
    println!("| bare: bridge + kernel VXLAN, no eBPF | {:.2} |", b / 1e9);
    println!("ours / bare = {:.2}", o / b);
    println!(
        "h1 encapsulated packets: {}",
        counters["stats"]["encapsulated"].as_u64().unwrap_or(0)
    );
    Ok(())
}
