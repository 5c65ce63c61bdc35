//! Per-packet cost of the pipeline and its rule-count scaling, measured in
//! the kernel with BPF_PROG_TEST_RUN (entry and every stage it tail-calls):
//! at 10, 1,000, 10,000 and 100,000 rules on one port, a denied packet (no
//! prefix matches, so every prefix length is probed), a packet of an
//! established flow (a flow-table hit, the fast path), and a new allowed
//! flow (a matching rule, the handshake-table insert included). Rules mix
//! /32, /24 and /16 remote prefixes over TCP ports, so every size uses the
//! same prefix lengths.
//!
//! Run as root: `cargo run --release -p sdn-agent --example bench_rules`
//! (`-- --smoke` for a short run that only checks it still works;
//! `BENCH_PARTS=1` for the parts at 10 rules: the test run's own cost (an
//! empty program), a packet that stops at the entry, an established flow, an
//! unconfirmed one and a denied packet; `BENCH_PAUSE=<seconds>` keeps the
//! programs loaded that long afterwards, to read them with `bpftool prog
//! dump xlated name to_vm`).

use aya::maps::{HashMap as BpfHashMap, MapData};
use dataplane_common::maps as m;
use sdn_agent::compile::{self, Resources};
use sdn_agent::dataplane::Dataplane;
use sdn_agent::reconcile::Reconciler;
use sdn_agent::testrun;
use sdn_agent::testutil::BpffsMount;
use sdn_proto::v1 as pb;

fn rules(n: usize) -> Vec<pb::SecurityGroupRule> {
    (0..n)
        .map(|i| {
            let (cidr, port) = match i % 3 {
                0 => (
                    format!("172.{}.{}.{}/32", 16 + (i >> 16) % 16, (i >> 8) & 255, i & 255),
                    1000 + (i % 20000) as u32,
                ),
                1 => (format!("100.{}.{}.0/24", 64 + (i >> 16) % 64, (i >> 8) & 255), 443),
                _ => (format!("10.{}.0.0/16", i % 200 + 20), 8000 + (i % 100) as u32),
            };
            pb::SecurityGroupRule {
                id: format!("r{i}"),
                direction: pb::Direction::Ingress as i32,
                ether_type: pb::EtherType::Ipv4 as i32,
                protocol: pb::Protocol::Tcp as i32,
                port_min: port,
                port_max: port,
                remote_cidr: cidr,
                remote_group_id: String::new(),
            }
        })
        .collect()
}

fn share(n: usize) -> Resources {
    let mut r = Resources::new();
    let port = pb::Port {
        id: "p".into(),
        subnet_id: "s".into(),
        device: "lo".into(),
        mac: "02:00:00:00:00:01".into(),
        ipv4: "10.0.0.1".into(),
        security_group_ids: vec!["g".into()],
        ..Default::default()
    };
    r.insert(
        "port/p".into(),
        pb::Resource {
            name: "port/p".into(),
            version: "1".into(),
            kind: Some(pb::resource::Kind::Port(port)),
        },
    );
    let net = pb::VpcNetwork {
        vpc_id: "v".into(),
        vni: 7,
        gateways: vec![pb::SubnetGateway {
            subnet_id: "s".into(),
            gateway_v4: "10.0.0.254".into(),
            gateway_v6: String::new(),
        }],
        ..Default::default()
    };
    r.insert(
        "vpc/v".into(),
        pb::Resource {
            name: "vpc/v".into(),
            version: "1".into(),
            kind: Some(pb::resource::Kind::VpcNetwork(net)),
        },
    );
    let mut all = rules(n);
    // Flows measured as established: UDP 5353 from anywhere.
    all.push(pb::SecurityGroupRule {
        id: "mdns".into(),
        direction: pb::Direction::Ingress as i32,
        ether_type: pb::EtherType::Ipv4 as i32,
        protocol: pb::Protocol::Udp as i32,
        port_min: 5353,
        port_max: 5353,
        remote_cidr: String::new(),
        remote_group_id: String::new(),
    });
    let g = pb::SecurityGroup {
        id: "g".into(),
        rules: all,
        ..Default::default()
    };
    r.insert(
        "sg/g".into(),
        pb::Resource {
            name: "sg/g".into(),
            version: "1".into(),
            kind: Some(pb::resource::Kind::SecurityGroup(g)),
        },
    );
    r
}

fn tcp(src: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let mut v = Vec::new();
    etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 0xfe], [2, 0, 0, 0, 0, 1])
        .ipv4(src, [10, 0, 0, 1], 64)
        .tcp(sport, dport, 1, 1024)
        .syn()
        .write(&mut v, &[])
        .unwrap();
    v
}

fn udp(src: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let mut v = Vec::new();
    etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 0xfe], [2, 0, 0, 0, 0, 1])
        .ipv4(src, [10, 0, 0, 1], 64)
        .udp(sport, dport)
        .write(&mut v, b"q")
        .unwrap();
    v
}

/// Moves every unconfirmed flow into the flow table, as an answer would:
/// the harness sends one way only (through `to_vm`), so this is how a
/// packet of an established flow is made to hit the flow table.
fn confirm_flows(dp: &mut Dataplane) -> anyhow::Result<usize> {
    let ebpf = dp.ebpf_mut();
    let mut syn: BpfHashMap<&mut MapData, m::CtKey, m::CtValue> = BpfHashMap::try_from(
        ebpf.map_mut(m::CT_SYN)
            .ok_or_else(|| anyhow::anyhow!("map {} missing", m::CT_SYN))?,
    )?;
    let flows: Vec<(m::CtKey, m::CtValue)> = syn.iter().filter_map(|e| e.ok()).collect();
    for (k, _) in &flows {
        syn.remove(k)?;
    }
    let mut ct: BpfHashMap<&mut MapData, m::CtKey, m::CtValue> = BpfHashMap::try_from(
        ebpf.map_mut(m::CT)
            .ok_or_else(|| anyhow::anyhow!("map {} missing", m::CT))?,
    )?;
    for (k, v) in &flows {
        ct.insert(k, v, 0)?;
    }
    Ok(flows.len())
}

fn main() -> anyhow::Result<()> {
    let smoke = std::env::args().any(|a| a == "--smoke");
    let mount = BpffsMount::new("bench")?;
    let mut dp = Dataplane::load(&mount.path().join("a"))?;
    let mut rec = Reconciler::new(dp.map_set()?)?;
    let fd = dp.program_fd("to_vm")?;
    let (repeat, rounds, sizes, new_flows): (u32, usize, &[usize], u16) = if smoke {
        (1_000, 1, &[10, 1_000], 50)
    } else {
        (2_000_000, 5, &[10, 1_000, 10_000, 100_000], 4_000)
    };
    // Denied: the source matches no prefix, so every prefix length is probed.
    let denied = tcp([192, 0, 2, 1], 40000, 22);
    // Established: a UDP flow whose entry is in the flow table (its first
    // packet made the entry, then it is confirmed as an answer would).
    let established = udp([192, 0, 2, 9], 5353, 5353);
    // Unconfirmed: a UDP flow nobody answered (found in the handshake
    // table, after a miss in the flow table).
    let unconfirmed = udp([192, 0, 2, 9], 5354, 5353);
    println!(
        "{:>8} {:>14} {:>16} {:>14} {:>12}",
        "rules", "denied ns/pkt", "established ns", "new flow ns", "map entries"
    );
    if std::env::var("BENCH_PARTS").is_ok() {
        let d = compile::compile(&share(10), &|name| (name == "lo").then_some(1), 0)?;
        rec.reconcile(&d)?;
        let mut vlan = established.clone();
        vlan[12] = 0x81;
        let mut short = established.clone();
        short.truncate(40);
        short[16..18].copy_from_slice(&26u16.to_be_bytes());
        anyhow::ensure!(
            testrun::run(fd, &established, 1)?.retval == 0,
            "the established flow must pass"
        );
        confirm_flows(&mut dp)?;
        anyhow::ensure!(
            testrun::run(fd, &unconfirmed, 1)?.retval == 0,
            "the unconfirmed flow must pass"
        );
        use std::os::fd::AsRawFd;
        let empty = testrun::empty_classifier()?;
        let mut b = u32::MAX;
        for _ in 0..rounds {
            b = b.min(testrun::run(empty.as_raw_fd(), &established, repeat)?.ns_per_run);
        }
        println!("the test run itself (an empty program): {b} ns");
        for (name, pkt) in [
            ("entry only (unknown type)", &vlan),
            ("established (flow table)", &established),
            ("unconfirmed (handshake table)", &unconfirmed),
            ("denied", &denied),
        ] {
            let mut b = u32::MAX;
            for _ in 0..rounds {
                b = b.min(testrun::run(fd, pkt, repeat)?.ns_per_run);
            }
            println!("{name}: {b} ns");
        }
        if let Ok(s) = std::env::var("BENCH_PAUSE") {
            std::thread::sleep(std::time::Duration::from_secs(s.parse()?));
        }
        return Ok(());
    }
    let mut rows = Vec::new();
    for (round, &n) in sizes.iter().enumerate() {
        let d = compile::compile(&share(n), &|name| (name == "lo").then_some(1), 0)?;
        let entries = d.sg_addr.len();
        rec.reconcile(&d)?;
        // Best of several runs of `repeat` packets each, to damp noise
        // from the shared machine.
        let best = |pkt: &[u8]| -> anyhow::Result<u32> {
            let mut b = u32::MAX;
            for _ in 0..rounds {
                b = b.min(testrun::run(fd, pkt, repeat)?.ns_per_run);
            }
            Ok(b)
        };
        let r = testrun::run(fd, &denied, 1)?;
        anyhow::ensure!(r.retval == 2, "the denied packet must be dropped");
        let r = testrun::run(fd, &established, 1)?;
        anyhow::ensure!(r.retval == 0, "the established flow must pass");
        confirm_flows(&mut dp)?;
        let dn = best(&denied)?;
        let est = best(&established)?;
        // New allowed flows: a SYN matching the first /32 rule (172.16.0.0,
        // port 1000) from a source port never used, so each run judges the
        // rules and writes the handshake entry. One run per flow; the mean
        // over the flows.
        let mut total = 0u64;
        for i in 0..new_flows {
            let pkt = tcp([172, 16, 0, 0], 10_000 + (round as u16) * 5_000 + i, 1000);
            let r = testrun::run(fd, &pkt, 1)?;
            anyhow::ensure!(r.retval == 0, "the new allowed flow must pass");
            total += r.ns_per_run as u64;
        }
        let new = (total / new_flows as u64) as u32;
        println!("{n:>8} {dn:>14} {est:>16} {new:>14} {entries:>12}");
        rows.push((n, dn, est, new));
    }
    let (first, last) = (rows[0], rows[rows.len() - 1]);
    println!(
        "cost at {} rules / at {} rules: denied {:.2}x, established {:.2}x, new flow {:.2}x",
        last.0,
        first.0,
        last.1 as f64 / first.1 as f64,
        last.2 as f64 / first.2 as f64,
        last.3 as f64 / first.3 as f64
    );
    Ok(())
}
