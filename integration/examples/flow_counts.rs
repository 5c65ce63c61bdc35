//! Flow-record counts against softflowd, for the same traffic, in the same
//! run, decoded by the same nfdump.
//!
//! vm3 (h2) sends to vm1 (h1) with iperf3 (TCP, one stream, SECONDS long,
//! ROUNDS times). Ours: h1's agent exports the flows of vm1's port over
//! IPFIX to an nfcapd in h1. The peer: softflowd, capturing on vm1's own
//! interface, exports IPFIX (`-v 10`) to an nfcapd in vm1. Both nfcapd
//! stop (closing their files) once every flow has ended; nfdump sums the
//! packets and octets of the iperf3 flows (port 5201) per direction in
//! each store. softflowd is given its usual configuration with one change:
//! none of its flows may outlive the run (`maxlife`), which it would
//! otherwise report only when they time out.
//!
//! Run as root after `cargo build --release --workspace --bins --examples`:
//! `./target/release/examples/flow_counts` (ROUNDS, SECONDS).

use std::path::Path;
use std::time::Duration;

use sdn_integration::lab::Lab;
use sdn_integration::ops::*;
use sdn_integration::Proc;

/// Packets and octets of the flows from `src` in an nfcapd store.
fn totals(store: &Path, src: &str) -> anyhow::Result<(u64, u64)> {
    let out = std::process::Command::new("nfdump")
        .args(["-R", store.to_str().unwrap(), "-q", "-N", "-o", "fmt:%sa|%pkt|%byt"])
        .arg(format!("port 5201 and src ip {src}"))
        .output()?;
    anyhow::ensure!(out.status.success(), "nfdump: {}", String::from_utf8_lossy(&out.stderr));
    let mut t = (0u64, 0u64);
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        let f: Vec<&str> = l.split('|').map(str::trim).collect();
        if f.len() == 3 && f[0] == src {
            t.0 += f[1].parse::<u64>()?;
            t.1 += f[2].parse::<u64>()?;
        }
    }
    Ok(t)
}

/// An egress rule: the VM may open TCP connections to these ports.
fn egress_rule(id: &str, ports: (u32, u32)) -> sdn_proto::v1::SecurityGroupRule {
    let mut r = ingress(id, false, "tcp", ports, "", "");
    r.direction = sdn_proto::v1::Direction::Egress as i32;
    r
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rounds: usize = std::env::var("ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    // iperf3's target rate (its -b); 0: as fast as it goes, where a packet
    // capture (softflowd's) starts to miss packets.
    let rate = std::env::var("RATE").unwrap_or_else(|_| "1G".into());
    let secs: u64 = std::env::var("SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    let lab = Lab::new("fcb", &["h1", "h2"])
        .vpc("v", None)
        .subnet("s", "v", "10.46.0.0/24", "")
        .group("server", vec![ingress("iperf", false, "tcp", (5201, 5201), "", "")])
        .vm("vm1", "h1", "s", &["server"])
        .group("client", vec![egress_rule("iperf-out", (5201, 5201))])
        .vm("vm3", "h2", "s", &["client"])
        .agent_args(&["--flow-collector", "udp://127.0.0.1:2055"])
        .start()
        .await?;
    let topo = &lab.topo;
    let dir = tempfile::tempdir()?;
    let (ours, peer) = (dir.path().join("ours"), dir.path().join("softflowd"));
    std::fs::create_dir_all(&ours)?;
    std::fs::create_dir_all(&peer)?;
    let (h1, vm1) = (topo.host_ns("h1").name.clone(), topo.vm("vm1"));
    let nfcapd = |name: &str, ns: &str, port: &str, store: &Path| {
        Proc::spawn(
            name,
            Some(ns),
            "nfcapd".as_ref(),
            &["-b", "127.0.0.1", "-p", port, "-w", store.to_str().unwrap()],
            dir.path(),
        )
    };
    let mut ours_cap = nfcapd("nfcapd-ours", &h1, "2055", &ours)?;
    let mut peer_cap = nfcapd("nfcapd-softflowd", &vm1.ns.name, "2056", &peer)?;
    let ctl = dir.path().join("softflowd.ctl");
    let pid = dir.path().join("softflowd.pid");
    let mut softflowd = Proc::spawn(
        "softflowd",
        Some(&vm1.ns.name),
        "softflowd".as_ref(),
        &[
            "-d",
            "-i",
            "eth0",
            "-v",
            "10",
            "-n",
            "127.0.0.1:2056",
            "-c",
            ctl.to_str().unwrap(),
            "-p",
            pid.to_str().unwrap(),
            "-t",
            "maxlife=3600",
        ],
        dir.path(),
    )?;
    let _server = Proc::spawn("iperf-vm1", Some(&vm1.ns.name), "iperf3".as_ref(), &["-s"], dir.path())?;
    std::thread::sleep(Duration::from_millis(800));
    for i in 0..rounds {
        let out = topo.vm("vm3").ns.sh(&[
            "iperf3",
            "-c",
            &vm1.v4,
            "-t",
            &secs.to_string(),
            "-b",
            &rate,
            "-J",
            "--connect-timeout",
            "2000",
        ])?;
        let j: serde_json::Value = serde_json::from_str(&out)?;
        let bps = j["end"]["sum_received"]["bits_per_second"].as_f64().unwrap_or(0.0);
        eprintln!("round {}: {:.2} Gbit/s", i + 1, bps / 1e9);
    }
    // Every connection has ended: our records of their ends go out at the
    // next collection of the flow table (every 5 s); softflowd reports its
    // flows when told to expire them.
    std::thread::sleep(Duration::from_secs(7));
    let expired = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &vm1.ns.name,
            "softflowctl",
            "-c",
            ctl.to_str().unwrap(),
            "expire-all",
        ])
        .output()?;
    anyhow::ensure!(
        expired.status.success(),
        "softflowctl expire-all: {}",
        String::from_utf8_lossy(&expired.stderr)
    );
    std::thread::sleep(Duration::from_secs(2));
    let stats = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &vm1.ns.name,
            "softflowctl",
            "-c",
            ctl.to_str().unwrap(),
            "statistics",
        ])
        .output()?;
    let stats = String::from_utf8_lossy(&stats.stdout).to_string();
    // Its own account: what libpcap gave it, what it dropped, what it used.
    let dropped: Vec<&str> = stats
        .lines()
        .filter(|l| l.contains("libpcap") || l.starts_with("Packets processed") || l.starts_with("Ignored"))
        .map(str::trim)
        .collect();
    let dropped = dropped.join("; ");
    softflowd.stop();
    ours_cap.stop();
    peer_cap.stop();
    let vm3 = topo.vm("vm3").v4.clone();
    println!("| direction | ours: packets / octets | softflowd: packets / octets | ratio packets / octets |");
    println!("|---|---|---|---|");
    let mut worst: f64 = 0.0;
    for (label, src) in [
        ("vm3 -> vm1 (data)", vm3.as_str()),
        ("vm1 -> vm3 (acks)", vm1.v4.as_str()),
    ] {
        let o = totals(&ours, src)?;
        let p = totals(&peer, src)?;
        anyhow::ensure!(p.0 > 0 && o.0 > 0, "{label}: no records (ours {o:?}, softflowd {p:?})");
        let (rp, ro) = (o.0 as f64 / p.0 as f64, o.1 as f64 / p.1 as f64);
        worst = worst.max((rp - 1.0).abs()).max((ro - 1.0).abs());
        println!(
            "| {label} | {} / {} | {} / {} | {rp:.4} / {ro:.4} |",
            o.0, o.1, p.0, p.1
        );
    }
    println!(
        "largest difference: {:.3}% (iperf3 -b {rate}, {rounds} x {secs} s)",
        worst * 100.0
    );
    println!("softflowd: {dropped}");
    drop(lab);
    Ok(())
}
