//! Rule-count scaling of the security-group program, measured in the kernel
//! with BPF_PROG_TEST_RUN: the per-packet cost at 10, 1,000, 10,000 and
//! 100,000 rules on one port. Rules mix /32, /24 and /16 remote prefixes
//! over TCP ports, so every size uses the same prefix lengths.
//!
//! Run as root: `cargo run --release -p sdn-agent --example bench_rules`

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
    let g = pb::SecurityGroup {
        id: "g".into(),
        rules: rules(n),
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

fn main() -> anyhow::Result<()> {
    let mount = BpffsMount::new("bench")?;
    let mut dp = Dataplane::load(&mount.path().join("a"))?;
    let mut rec = Reconciler::new(dp.map_set()?)?;
    let fd = dp.program_fd("to_vm")?;
    let repeat = 2_000_000;
    // Denied: the source matches no prefix, so every prefix length is probed.
    let denied = tcp([192, 0, 2, 1], 40000, 22);
    // Allowed: matches the first /32 rule (172.16.0.0, port 1000). Each run
    // would create the same conntrack entry, so this is measured as a
    // conntrack hit after the first run.
    let allowed = tcp([172, 16, 0, 0], 40000, 1000);
    println!(
        "{:>8} {:>14} {:>14} {:>12}",
        "rules", "denied ns/pkt", "ct-hit ns/pkt", "map entries"
    );
    let mut base = None;
    let mut rows = Vec::new();
    for n in [10usize, 1_000, 10_000, 100_000] {
        let d = compile::compile(&share(n), &|name| (name == "lo").then_some(1), 0)?;
        let entries = d.sg_addr.len();
        rec.reconcile(&d)?;
        // Best of five runs of `repeat` packets each, to damp noise from the shared machine.
        let best = |pkt: &[u8]| -> anyhow::Result<u32> {
            let mut b = u32::MAX;
            for _ in 0..5 {
                b = b.min(testrun::run(fd, pkt, repeat)?.ns_per_run);
            }
            Ok(b)
        };
        let r = testrun::run(fd, &denied, 1)?;
        anyhow::ensure!(r.retval == 2, "the denied packet must be dropped");
        let r = testrun::run(fd, &allowed, 1)?;
        anyhow::ensure!(r.retval == 0, "the allowed packet must pass");
        let dn = best(&denied)?;
        let ok = best(&allowed)?;
        base.get_or_insert(dn);
        println!("{n:>8} {dn:>14} {ok:>14} {entries:>12}");
        rows.push((n, dn, ok));
    }
    let (first, last) = (rows[0].1 as f64, rows[rows.len() - 1].1 as f64);
    println!("denied-path cost at 100,000 rules / at 10 rules: {:.2}x", last / first);
    Ok(())
}
