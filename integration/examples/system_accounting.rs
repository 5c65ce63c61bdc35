//! What counting an information system's traffic with a zone costs,
//! against nftables counters of the same traffic, on the same path in the
//! same run; and whether the two count the same bytes.
//!
//! vm1 (h1, in VPC v of the internet zone) sends to a host of the zone with
//! iperf3 (TCP, one stream, SECONDS long; then 64-byte UDP datagrams as fast
//! as iperf3 sends them), ROUNDS times in each mode, the modes taking turns:
//! - `none`: nothing counts vm1's traffic;
//! - `ours`: v is an information system: the pipeline counts each frame
//!   vm1 sends out of the uplink and each it receives from it;
//! - `nft counter`: where the uplink arrives in the zone's network, a
//!   netdev table counts the VPC's traffic both ways (`ip saddr` on
//!   ingress, `ip daddr` on egress), as a router metering a network would.
//!
//! Run as root after `cargo build --release --workspace --bins --examples`:
//! `./target/release/examples/system_accounting` (ROUNDS, SECONDS).

use std::time::Duration;

use sdn_integration::lab::Lab;
use sdn_integration::ops::*;
use sdn_integration::Proc;
use sdn_proto::v1 as pb;

const NET_HOST: &str = "203.0.113.10";
const VPC_NET: &str = "198.51.100.0/24";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    None,
    Ours,
    Nft,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::None => "none",
            Mode::Ours => "ours",
            Mode::Nft => "nft counter",
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn system() -> pb::operation::Op {
    pb::operation::Op::PutInformationSystem(pb::InformationSystem {
        id: "bench".into(),
        name: "bench".into(),
        vpc_ids: vec!["v".into()],
        port_ids: vec![],
        bandwidth: vec![pb::SystemBandwidth {
            zone_id: "net".into(),
            up_bps: 100_000_000_000,
            down_bps: 100_000_000_000,
        }],
        alert_percent: 0,
        interval_secs: 0,
    })
}

/// iperf3 from vm1 to the zone's host: bits a second received (TCP), or
/// 64-byte datagrams received a second (`small`).
fn iperf(lab: &Lab, secs: u64, small: bool) -> anyhow::Result<f64> {
    let t = secs.to_string();
    let mut args = vec!["iperf3", "-c", NET_HOST, "-t", &t, "-J", "--connect-timeout", "2000"];
    if small {
        args.extend(["-u", "-b", "0", "-l", "64"]);
    }
    let out = lab.topo.vm("vm1").ns.sh(&args)?;
    let j: serde_json::Value = serde_json::from_str(&out)?;
    if small {
        let sum = &j["end"]["sum"];
        let got = sum["packets"].as_f64().unwrap_or(0.0) - sum["lost_packets"].as_f64().unwrap_or(0.0);
        let secs = sum["seconds"].as_f64().filter(|s| *s > 0.0).unwrap_or(secs as f64);
        return Ok(got / secs);
    }
    j["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or_else(|| anyhow::anyhow!("no throughput in iperf3 output: {out}"))
}

/// Bytes counted so far in `mode`, both ways: ours (frames), or nft's
/// (IP packets: their Ethernet headers added, 14 bytes each).
fn counted(lab: &Lab, mode: Mode) -> u64 {
    match mode {
        Mode::None => 0,
        Mode::Ours => lab
            .drops("h1")
            .ok()
            .and_then(|d| {
                d["systems"].as_object().map(|o| {
                    o.values()
                        .map(|v| v["up"].as_u64().unwrap_or(0) + v["down"].as_u64().unwrap_or(0))
                        .sum()
                })
            })
            .unwrap_or(0),
        Mode::Nft => {
            let out = lab
                .topo
                .zone_ns("net")
                .sh(&["nft", "list", "table", "netdev", "acct"])
                .unwrap_or_default();
            out.lines()
                .filter_map(|l| {
                    let w: Vec<&str> = l.split_whitespace().collect();
                    let at = w.iter().position(|x| *x == "packets")?;
                    let packets: u64 = w.get(at + 1)?.parse().ok()?;
                    let bytes: u64 = w.get(at + 3)?.parse().ok()?;
                    Some(bytes + 14 * packets)
                })
                .sum()
        }
    }
}

async fn set(lab: &Lab, mode: Mode, current: &mut Mode, dev: &str) -> anyhow::Result<()> {
    if *current == mode {
        return Ok(());
    }
    let zone = lab.topo.zone_ns("net");
    match *current {
        Mode::Ours => {
            lab.cluster
                .apply(vec![pb::operation::Op::Delete(pb::ObjectRef {
                    kind: pb::Kind::InformationSystem as i32,
                    id: "bench".into(),
                })])
                .await?;
        }
        Mode::Nft => {
            zone.sh(&["nft", "delete", "table", "netdev", "acct"])?;
        }
        Mode::None => {}
    }
    match mode {
        Mode::Ours => {
            lab.cluster.apply(vec![system()]).await?;
        }
        Mode::Nft => {
            zone.sh(&[
                "nft",
                &format!(
                    "table netdev acct {{ \
                     chain in {{ type filter hook ingress device {dev} priority 0; ip saddr {VPC_NET} counter; }}; \
                     chain out {{ type filter hook egress device {dev} priority 0; ip daddr {VPC_NET} counter; }}; }}"
                ),
            ])?;
        }
        Mode::None => {}
    }
    *current = mode;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rounds: usize = std::env::var("ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let secs: u64 = std::env::var("SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    let lab = Lab::new("sab", &["h1"])
        .zone(
            "net",
            "up-net",
            "172.17.0",
            "fdf0:0:0:2",
            &["0.0.0.0/0", "::/0"],
            &[NET_HOST],
        )
        .vpc("v", Some("net"))
        .subnet("s", "v", "198.51.100.0/24", "")
        .group("open", open_rules())
        .vm("vm1", "h1", "s", &["open"])
        .start()
        .await?;
    // The uplink's end in the zone's network (the lab names it by its tag,
    // the zone's initial and the host's number).
    let dev = "sabn1";
    let zone = lab.topo.zone_ns("net");
    let _server = Proc::spawn(
        "iperf-zone",
        Some(&zone.name),
        "iperf3".as_ref(),
        &["-s", "-B", NET_HOST],
        &lab.topo.dir,
    )?;
    std::thread::sleep(Duration::from_millis(500));

    let modes = [Mode::None, Mode::Ours, Mode::Nft];
    let mut current = Mode::None;
    let mut tcp: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    let mut small: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    // (counted, iperf3's own count of what arrived) in bytes, TCP runs.
    let mut agree: Vec<(u64, u64)> = vec![(0, 0); modes.len()];
    for round in 0..rounds {
        for (i, m) in modes.iter().enumerate() {
            set(&lab, *m, &mut current, dev).await?;
            let before = counted(&lab, *m);
            let bps = iperf(&lab, secs, false)?;
            // Our count is read from the kernel at once; a moment for the
            // last ACKs.
            std::thread::sleep(Duration::from_millis(200));
            let made = counted(&lab, *m).saturating_sub(before);
            anyhow::ensure!(*m == Mode::None || made > 0, "{}: nothing was counted", m.name());
            eprintln!(
                "round {round} {:<12} {:.2} Gbit/s, {made} bytes counted",
                m.name(),
                bps / 1e9
            );
            tcp[i].push(bps);
            agree[i].0 += made;
            agree[i].1 += (bps * secs as f64 / 8.0) as u64;
            let pps = iperf(&lab, secs, true)?;
            eprintln!("round {round} {:<12} {:.0} small datagrams/s", m.name(), pps);
            small[i].push(pps);
        }
    }
    set(&lab, Mode::None, &mut current, dev).await?;
    let base = median(&mut tcp[0].clone());
    println!("vm1 to the internet zone over TCP, one stream, median of {rounds} runs of {secs} s:");
    println!("| mode | Gbit/s | of counting nothing |");
    println!("|---|---|---|");
    for (i, m) in modes.iter().enumerate() {
        let v = median(&mut tcp[i]);
        println!("| {} | {:.2} | {:.2} |", m.name(), v / 1e9, v / base);
    }
    let base = median(&mut small[0].clone());
    println!("the same, 64-byte UDP datagrams as fast as iperf3 sends, received a second (median):");
    println!("| mode | datagrams/s | of counting nothing |");
    println!("|---|---|---|");
    for (i, m) in modes.iter().enumerate() {
        let v = median(&mut small[i]);
        println!("| {} | {:.0} | {:.2} |", m.name(), v, v / base);
    }
    let (ours, nft) = (agree[1], agree[2]);
    println!(
        "bytes counted over the TCP runs (frames, both ways) against iperf3's payload received: ours {:.4}, nft {:.4}",
        ours.0 as f64 / ours.1.max(1) as f64,
        nft.0 as f64 / nft.1.max(1) as f64
    );
    Ok(())
}
