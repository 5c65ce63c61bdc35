//! The throughput cost of mirroring, against tc's `mirred` and nftables'
//! `dup`, on the same VM-to-VM path in the same run; and how complete the
//! copies are at 1 Gbit/s.
//!
//! vm2 sends to vm1 (both on h1) with iperf3 (TCP, one stream, SECONDS
//! long), ROUNDS times in each mode, the modes taking turns:
//! - `none`: no mirroring;
//! - `ours 100%` and `ours 1/100`: a mirror session of vm1's port, both
//!   directions, to the tap port tap1 (copies cloned in the kernel), every
//!   packet or one in a hundred;
//! - `tc mirred`: inside vm1, `clsact` with a `u32` match-all filter on
//!   eth0's ingress and egress, `action mirred egress mirror` to a veth
//!   whose other end is a sink namespace (the usual way to mirror a Linux
//!   interface; `matchall` is not in this kernel);
//! - `nft dup 100%` and `nft dup 1/100`: inside vm1, a netdev table with
//!   ingress and egress chains on eth0 that `dup to` the same veth (every
//!   packet, or `numgen inc mod 100` 0).
//! Both sinks (tap1's VM and the veth's namespace) take the copies into
//! their stacks and drop them, as a tap that only captures would.
//!
//! The same with 64-byte UDP datagrams as fast as iperf3 sends them, in
//! datagrams received a second: the per-packet cost, which large TCP
//! segments hide.
//!
//! Completeness: iperf3 over UDP at 1 Gbit/s (1400-byte datagrams) from
//! vm2 to vm1 while our session copies to tap1, where tcpdump counts the
//! copies of the flow; against what vm1's iperf3 received.
//!
//! Run as root after `cargo build --release --workspace --bins --examples`:
//! `./target/release/examples/mirror_cost` (ROUNDS, SECONDS).

use std::time::Duration;

use sdn_integration::lab::Lab;
use sdn_integration::ops::*;
use sdn_integration::Proc;
use sdn_integration::Topology;
use sdn_proto::v1 as pb;

fn iperf(topo: &Topology, to: &str, secs: u64) -> anyhow::Result<f64> {
    let out = topo.vm("vm2").ns.sh(&[
        "iperf3",
        "-c",
        to,
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

/// Datagrams a second vm1 received from vm2 sending 64-byte UDP
/// datagrams as fast as iperf3 goes.
fn iperf_small(topo: &Topology, to: &str, secs: u64) -> anyhow::Result<f64> {
    let out = topo.vm("vm2").ns.sh(&[
        "iperf3",
        "-c",
        to,
        "-u",
        "-b",
        "0",
        "-l",
        "64",
        "-t",
        &secs.to_string(),
        "-J",
        "--connect-timeout",
        "2000",
    ])?;
    let j: serde_json::Value = serde_json::from_str(&out)?;
    let sum = &j["end"]["sum"];
    let got = sum["packets"].as_f64().unwrap_or(0.0) - sum["lost_packets"].as_f64().unwrap_or(0.0);
    let secs = sum["seconds"].as_f64().filter(|s| *s > 0.0).unwrap_or(secs as f64);
    Ok(got / secs)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    None,
    Ours,
    OursSampled,
    TcMirred,
    NftDup,
    NftDupSampled,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::None => "none",
            Mode::Ours => "ours 100%",
            Mode::OursSampled => "ours 1/100",
            Mode::TcMirred => "tc mirred 100%",
            Mode::NftDup => "nft dup 100%",
            Mode::NftDupSampled => "nft dup 1/100",
        }
    }
}

fn session(sample: u32) -> pb::operation::Op {
    let mut m = mirror("bench", "port:vm1", to_tap("tap1", 9999));
    m.sample = sample;
    m.rate_pps = 10_000_000;
    put_mirror(m)
}

fn delete_session() -> pb::operation::Op {
    pb::operation::Op::Delete(pb::ObjectRef {
        kind: pb::Kind::MirrorSession as i32,
        id: "bench".into(),
    })
}

const NFT_DUP: &str =
    "table netdev mirror { chain in { type filter hook ingress device eth0 priority 0; dup to m0; }; \
                       chain out { type filter hook egress device eth0 priority 0; dup to m0; }; }";
const NFT_DUP_SAMPLED: &str = "table netdev mirror { \
    chain in { type filter hook ingress device eth0 priority 0; numgen inc mod 100 0 dup to m0; }; \
    chain out { type filter hook egress device eth0 priority 0; numgen inc mod 100 0 dup to m0; }; }";

/// Puts `mode` in place (and takes every other one away).
async fn set(lab: &Lab, mode: Mode, current: &mut Mode) -> anyhow::Result<()> {
    if *current == mode {
        return Ok(());
    }
    let vm1 = &lab.topo.vm("vm1").ns;
    match *current {
        Mode::Ours | Mode::OursSampled => {
            lab.cluster.apply(vec![delete_session()]).await?;
        }
        Mode::TcMirred => {
            vm1.sh(&["tc", "qdisc", "del", "dev", "eth0", "clsact"])?;
        }
        Mode::NftDup | Mode::NftDupSampled => {
            vm1.sh(&["nft", "delete", "table", "netdev", "mirror"])?;
        }
        Mode::None => {}
    }
    match mode {
        Mode::Ours => {
            lab.cluster.apply(vec![session(0)]).await?;
        }
        Mode::OursSampled => {
            lab.cluster.apply(vec![session(100)]).await?;
        }
        Mode::TcMirred => {
            vm1.sh(&["tc", "qdisc", "add", "dev", "eth0", "clsact"])?;
            for dir in ["ingress", "egress"] {
                vm1.sh(&[
                    "tc", "filter", "add", "dev", "eth0", dir, "protocol", "all", "u32", "match", "u32", "0", "0",
                    "action", "mirred", "egress", "mirror", "dev", "m0",
                ])?;
            }
        }
        Mode::NftDup => {
            vm1.sh(&["nft", NFT_DUP])?;
        }
        Mode::NftDupSampled => {
            vm1.sh(&["nft", NFT_DUP_SAMPLED])?;
        }
        Mode::None => {}
    }
    *current = mode;
    Ok(())
}

/// Copies made so far in `mode`: our session's count in the kernel, or
/// what the peers' veth sent.
fn copies(lab: &Lab, mode: Mode) -> u64 {
    match mode {
        Mode::None => 0,
        Mode::Ours | Mode::OursSampled => lab
            .drops("h1")
            .map(|d| d["mirror"]["0"]["copied"].as_u64().unwrap_or(0))
            .unwrap_or(0),
        _ => lab
            .topo
            .vm("vm1")
            .ns
            .sh(&["cat", "/sys/class/net/m0/statistics/tx_packets"])
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rounds: usize = std::env::var("ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let secs: u64 = std::env::var("SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    let lab = Lab::new("mcb", &["h1"])
        .vpc("v", None)
        .subnet("s", "v", "10.47.0.0/24", "")
        .group("open", open_rules())
        .vm("vm1", "h1", "s", &["open"])
        .vm("vm2", "h1", "s", &["open"])
        .vm("tap1", "h1", "s", &[])
        .start()
        .await?;
    let topo = &lab.topo;
    let vm1 = topo.vm("vm1");
    // The peers' sink: a veth from vm1 to a namespace of its own.
    let sink = sdn_integration::Netns::new("mcb-sink")?;
    vm1.ns.sh(&[
        "ip", "link", "add", "m0", "type", "veth", "peer", "name", "m1", "netns", &sink.name,
    ])?;
    vm1.ns.sh(&["ip", "link", "set", "m0", "up"])?;
    sink.sh(&["ip", "link", "set", "m1", "up"])?;
    let _server = Proc::spawn("iperf-vm1", Some(&vm1.ns.name), "iperf3".as_ref(), &["-s"], &topo.dir)?;
    std::thread::sleep(Duration::from_millis(500));
    anyhow::ensure!(topo.reach("vm2", "vm1", "icmp", 0, false), "the path is broken");

    let modes = [
        Mode::None,
        Mode::Ours,
        Mode::OursSampled,
        Mode::TcMirred,
        Mode::NftDup,
        Mode::NftDupSampled,
    ];
    let mut current = Mode::None;
    let mut got: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    let mut small: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    let mut made_by = vec![0u64; modes.len()];
    for round in 0..rounds {
        for (i, m) in modes.iter().enumerate() {
            set(&lab, *m, &mut current).await?;
            let before = copies(&lab, *m);
            let bps = iperf(topo, &vm1.v4, secs)?;
            let made = copies(&lab, *m).saturating_sub(before);
            eprintln!("round {round} {:<16} {:.2} Gbit/s, {made} copies", m.name(), bps / 1e9);
            anyhow::ensure!(*m == Mode::None || made > 0, "{}: nothing was copied", m.name());
            got[i].push(bps);
            made_by[i] += made;
            let pps = iperf_small(topo, &vm1.v4, secs)?;
            eprintln!("round {round} {:<16} {:.0} small datagrams/s", m.name(), pps);
            small[i].push(pps);
        }
    }
    set(&lab, Mode::None, &mut current).await?;
    let base = median(&mut got[0].clone());
    println!("VM to VM over TCP, one stream, median of {rounds} runs of {secs} s:");
    println!("| mode | Gbit/s | of no mirroring | copies (all runs) |");
    println!("|---|---|---|---|");
    for (i, m) in modes.iter().enumerate() {
        let v = median(&mut got[i]);
        println!("| {} | {:.2} | {:.2} | {} |", m.name(), v / 1e9, v / base, made_by[i]);
    }

    let base = median(&mut small[0].clone());
    println!("VM to VM, 64-byte UDP datagrams as fast as iperf3 sends, received a second (median):");
    println!("| mode | datagrams/s | of no mirroring |");
    println!("|---|---|---|");
    for (i, m) in modes.iter().enumerate() {
        let v = median(&mut small[i]);
        println!("| {} | {:.0} | {:.2} |", m.name(), v, v / base);
    }

    // Completeness at 1 Gbit/s of UDP.
    set(&lab, Mode::Ours, &mut current).await?;
    let dir = tempfile::tempdir()?;
    let pcap = dir.path().join("tap1.pcap");
    let mut capture = Proc::spawn(
        "tcpdump",
        Some(&topo.vm("tap1").ns.name),
        "tcpdump".as_ref(),
        &[
            "-i",
            "eth0",
            "-B",
            "131072",
            "-U",
            "-n",
            "-w",
            pcap.to_str().unwrap(),
            "udp and port 5201",
        ],
        dir.path(),
    )?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !capture.log_text().contains("listening on") && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    let out = topo.vm("vm2").ns.sh(&[
        "iperf3",
        "-c",
        &vm1.v4,
        "-u",
        "-b",
        "1G",
        "-l",
        "1400",
        "-t",
        &secs.to_string(),
        "-J",
    ])?;
    std::thread::sleep(Duration::from_millis(500));
    capture.stop();
    let j: serde_json::Value = serde_json::from_str(&out)?;
    let sum = &j["end"]["sum"];
    let sent = sum["packets"].as_u64().unwrap_or(0);
    let lost = sum["lost_packets"].as_u64().unwrap_or(0);
    let received = sent.saturating_sub(lost);
    let copies = std::process::Command::new("tcpdump")
        .args(["-r", pcap.to_str().unwrap(), "-n", "udp and dst port 5201"])
        .output()?;
    let copies = String::from_utf8_lossy(&copies.stdout).lines().count() as u64;
    let dropped = capture
        .log_text()
        .lines()
        .find(|l| l.contains("dropped by kernel"))
        .unwrap_or("")
        .to_string();
    println!(
        "UDP at 1 Gbit/s for {secs} s: vm1 received {received} of {sent} datagrams; tap1 captured {copies} copies \
         ({:.4} of what vm1 received); tcpdump in tap1: {}",
        copies as f64 / received.max(1) as f64,
        dropped.trim()
    );
    set(&lab, Mode::None, &mut current).await?;
    Ok(())
}
