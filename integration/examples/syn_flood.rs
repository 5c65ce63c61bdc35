//! A SYN flood of 1,000,000 distinct tuples at one port of a VM, while a
//! long-lived TCP flow to another port of the same VM keeps going: the
//! flow's throughput and retransmissions with and without the flood.
//!
//! Path: the internet zone's network -> host h1's uplink -> vm1. vm1's
//! security group admits TCP 443 (the flooded port) and 5201 (iperf3) from
//! anywhere. The flood (`sdn-probe syn-flood`, raw IPv4) sends each SYN
//! from a distinct (source address, source port) of the zone's prefix; the
//! long flow is iperf3 from the zone router to vm1:5201. Handshakes live in
//! their own LRU table, established flows in a table nothing evicts, within
//! each port's budget: the flood can only evict handshakes.
//!
//! Run as root after `cargo build --workspace --bins --examples`:
//! `./target/debug/examples/syn_flood` (SECONDS, FLOOD for the tuple count).

use std::time::Duration;

use sdn_integration::lab::Lab;
use sdn_integration::ops::*;
use sdn_integration::{bin, Proc, Topology};

/// iperf3's JSON summary: (Gbit/s received, retransmitted segments).
fn iperf(topo: &Topology, secs: u64) -> anyhow::Result<(f64, u64)> {
    let out = topo
        .zone_ns("net")
        .sh(&["iperf3", "-c", "10.10.0.11", "-t", &secs.to_string(), "-J"])?;
    let j: serde_json::Value = serde_json::from_str(&out)?;
    let gbps = j["end"]["sum_received"]["bits_per_second"].as_f64().unwrap_or(0.0) / 1e9;
    let retrans = j["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
    Ok((gbps, retrans))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let secs: u64 = std::env::var("SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(6);
    let flood: u64 = std::env::var("FLOOD")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let Lab { topo, cluster, .. } = Lab::new("fwb", &["h1"])
        .zone(
            "net",
            "up-net",
            "172.30.0",
            "fdf0:0:0:30",
            &["10.0.0.0/8", "172.16.0.0/12"],
            &[],
        )
        .vpc("v", Some("net"))
        .subnet("s", "v", "10.10.0.0/24", "")
        .group(
            "g",
            vec![
                ingress("https", false, "tcp", (443, 443), "", ""),
                ingress("iperf", false, "tcp", (5201, 5201), "", ""),
            ],
        )
        .vm("vm1", "h1", "s", &["g"])
        .start()
        .await?;
    let vm1 = topo.vm("vm1").ns.name.clone();
    let _server = Proc::spawn(
        "iperf3-s",
        Some(&vm1),
        std::path::Path::new("iperf3"),
        &["-s"],
        &topo.dir,
    )?;
    let _https = topo.serve(&["vm1"], &[], &["--tcp", "443"])?;
    std::thread::sleep(Duration::from_millis(500));

    let (base_gbps, base_retrans) = iperf(&topo, secs)?;
    eprintln!("without the flood: {base_gbps:.2} Gbit/s, {base_retrans} retransmissions");

    // The flood runs while the flow does; the flow starts first.
    let zone = topo.zone_ns("net").name.clone();
    let flood_run = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        sdn_integration::ns_sh(
            &zone,
            &[
                bin("sdn-probe").to_str().unwrap(),
                "syn-flood",
                "10.10.0.11",
                "443",
                "--sources",
                "172.31.0.0/16",
                "--count",
                &flood.to_string(),
            ],
        )
    });
    let (gbps, retrans) = iperf(&topo, secs)?;
    let flood_out = flood_run.join().expect("flood thread")?;
    let mut f = flood_out.split_whitespace();
    let sent: u64 = f.next().unwrap_or("0").parse()?;
    let flood_secs: f64 = f.next().unwrap_or("0").parse()?;
    eprintln!("with the flood: {gbps:.2} Gbit/s, {retrans} retransmissions");
    let all = cluster.drops(&topo, "h1")?;
    let drops: Vec<String> = all["drops"]
        .as_object()
        .map(|o| {
            o.iter()
                .filter(|(_, v)| v.as_u64().unwrap_or(0) > 0)
                .map(|(k, v)| format!("{k} {v}"))
                .collect()
        })
        .unwrap_or_default();
    let stats = |k: &str| cluster.counter(&topo, "h1", "stats", k);
    println!(
        "SYN flood: {sent} SYNs of distinct tuples to vm1:443 in {flood_secs:.1} s ({:.0}/s), during {secs} s of iperf3 to vm1:5201",
        sent as f64 / flood_secs.max(0.001)
    );
    println!("| | Gbit/s | retransmissions |");
    println!("|---|---:|---:|");
    println!("| long flow, no flood | {base_gbps:.2} | {base_retrans} |");
    println!("| long flow, during the flood | {gbps:.2} | {retrans} |");
    println!(
        "during / without = {:.2}; handshakes written {}, established flows promoted {}, drops {}",
        gbps / base_gbps.max(1e-9),
        stats("ct_new"),
        stats("ct_promoted"),
        if drops.is_empty() {
            "none".to_string()
        } else {
            drops.join(", ")
        }
    );
    Ok(())
}
