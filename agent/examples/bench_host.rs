//! A host of 500 ports: the cost of one agent pass (compile the share,
//! reconcile the kernel's maps) after a change to one port, with the
//! compiler kept from pass to pass (it compiles the ports and endpoints
//! whose inputs changed) against a compile of the whole share from
//! scratch, the way every pass compiled before. Same share, same kernel
//! maps, same run; the passes alternate.
//!
//! The share: 500 ports here in 10 VPCs, each VPC with 500 ports in all
//! (the other 450 on other hosts), so 5,000 endpoints; every port in two
//! of 10 groups of 20 rules, one rule of each naming another group's 100
//! members.
//!
//! Run as root: `cargo run --release -p sdn-agent --example bench_host`
//! (`-- --smoke` for a short run that only checks it still works).

use std::time::{Duration, Instant};

use sdn_agent::compile::{self, Compiler, Resources};
use sdn_agent::dataplane::Dataplane;
use sdn_agent::reconcile::Reconciler;
use sdn_agent::testutil::BpffsMount;
use sdn_proto::v1 as pb;

const VPCS: usize = 10;
const GROUPS: usize = 10;

fn put(res: &mut Resources, name: String, kind: pb::resource::Kind) {
    // The version changes whenever the content does, as the controller's.
    let version = format!("{:016x}", fnv(format!("{kind:?}").as_bytes()));
    res.insert(
        name.clone(),
        pb::Resource {
            name,
            version,
            kind: Some(kind),
        },
    );
}

fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf29ce484222325u64, |h, x| {
        (h ^ *x as u64).wrapping_mul(0x100000001b3)
    })
}

fn port_address(i: usize, round: usize) -> String {
    if round == 0 {
        format!("10.{}.{}.{}", i % VPCS, i / 250, i % 250 + 1)
    } else {
        format!("10.{}.200.{}", i % VPCS, round % 250 + 1)
    }
}

/// Port `i` here (or elsewhere): its port resource and its endpoint.
fn port(res: &mut Resources, i: usize, here: bool, round: usize) {
    let id = format!("p{i}");
    let v = i % VPCS;
    let ipv4 = port_address(i, round);
    let mac = format!("02:00:00:{:02x}:{:02x}:{:02x}", i >> 16, (i >> 8) & 255, i & 255);
    put(
        res,
        format!("endpoint/{id}"),
        pb::resource::Kind::Endpoint(pb::Endpoint {
            port_id: id.clone(),
            mac: mac.clone(),
            ipv4: ipv4.clone(),
            host_id: if here { "here".into() } else { format!("h{}", i % 97) },
            host_underlay_ip: format!("192.168.{}.{}", i % 97, 2),
            vpc_id: format!("v{v}"),
            ..Default::default()
        }),
    );
    if here {
        put(
            res,
            format!("port/{id}"),
            pb::resource::Kind::Port(pb::Port {
                id,
                subnet_id: format!("s{v}"),
                device: format!("tap{i}"),
                mac,
                ipv4,
                security_group_ids: vec![format!("g{}", i % GROUPS), format!("g{}", (i + 1) % GROUPS)],
                ..Default::default()
            }),
        );
    }
}

fn share(local: usize, per_vpc: usize) -> Resources {
    let mut res = Resources::new();
    for v in 0..VPCS {
        put(
            &mut res,
            format!("vpc/v{v}"),
            pb::resource::Kind::VpcNetwork(pb::VpcNetwork {
                vpc_id: format!("v{v}"),
                vni: 100 + v as u32,
                gateways: vec![pb::SubnetGateway {
                    subnet_id: format!("s{v}"),
                    gateway_v4: format!("10.{v}.255.254"),
                    gateway_v6: String::new(),
                }],
                ..Default::default()
            }),
        );
    }
    for i in 0..VPCS * per_vpc {
        port(&mut res, i, i < local, 0);
    }
    for g in 0..GROUPS {
        let mut rules: Vec<pb::SecurityGroupRule> = (0..19)
            .map(|r| pb::SecurityGroupRule {
                id: format!("r{r}"),
                direction: pb::Direction::Ingress as i32,
                ether_type: pb::EtherType::Ipv4 as i32,
                protocol: pb::Protocol::Tcp as i32,
                port_min: 1000 + r,
                port_max: 1000 + r + g as u32,
                remote_cidr: format!("172.{}.{r}.0/24", 16 + g),
                remote_group_id: String::new(),
            })
            .collect();
        rules.push(pb::SecurityGroupRule {
            id: "db".into(),
            direction: pb::Direction::Ingress as i32,
            ether_type: pb::EtherType::Ipv4 as i32,
            protocol: pb::Protocol::Tcp as i32,
            port_min: 5432,
            port_max: 5432,
            remote_cidr: String::new(),
            remote_group_id: format!("m{g}"),
        });
        put(
            &mut res,
            format!("sg/g{g}"),
            pb::resource::Kind::SecurityGroup(pb::SecurityGroup {
                id: format!("g{g}"),
                rules,
                ..Default::default()
            }),
        );
        put(
            &mut res,
            format!("members/m{g}"),
            pb::resource::Kind::GroupMembers(pb::GroupMembers {
                group_id: format!("m{g}"),
                addresses: (0..100).map(|a| format!("10.200.{g}.{a}")).collect(),
            }),
        );
    }
    res
}

fn ifindex(name: &str) -> Option<u32> {
    name.strip_prefix("tap")?.parse::<u32>().ok().map(|i| 1000 + i)
}

#[derive(Default)]
struct Times {
    compile: Vec<Duration>,
    reconcile: Vec<Duration>,
}

impl Times {
    fn p50(v: &[Duration]) -> Duration {
        let mut v = v.to_vec();
        v.sort();
        v[v.len() / 2]
    }
    fn total(&self) -> Duration {
        Self::p50(
            &self
                .compile
                .iter()
                .zip(&self.reconcile)
                .map(|(a, b)| *a + *b)
                .collect::<Vec<_>>(),
        )
    }
}

fn main() -> anyhow::Result<()> {
    let smoke = std::env::args().any(|a| a == "--smoke");
    let (local, per_vpc, rounds) = if smoke { (50, 60, 3) } else { (500, 500, 40) };
    let mount = BpffsMount::new("bench-host")?;
    let mut dp = Dataplane::load(&mount.path().join("a"))?;
    let mut rec = Reconciler::new(dp.map_set()?)?;
    let mut res = share(local, per_vpc);
    let mut kept = Compiler::default();
    let started = Instant::now();
    let d = kept.compile(&res, &ifindex, 0)?;
    anyhow::ensure!(d.rejected.is_empty(), "the share compiles: {:?}", d.rejected);
    anyhow::ensure!(
        d.ports.len() == local,
        "{} ports compiled, {local} expected",
        d.ports.len()
    );
    let compiled = started.elapsed();
    let c = rec.reconcile(&d)?;
    println!(
        "host of {local} ports, {} endpoints, {} resources: first pass compile {:?}, reconcile {:?} ({} map entries written)",
        d.endpoints.len(),
        res.len(),
        compiled,
        started.elapsed() - compiled,
        c.put
    );
    let (mut fresh, mut incremental) = (Times::default(), Times::default());
    for round in 1..=rounds {
        // One port here changes address (its port and its endpoint).
        let i = (round * 37) % local;
        port(&mut res, i, true, round);
        let scratch = round % 2 == 0;
        let t = Instant::now();
        let d = if scratch {
            compile::compile(&res, &ifindex, 0)?
        } else {
            kept.compile(&res, &ifindex, 0)?
        };
        let compiled = t.elapsed();
        let c = rec.reconcile(&d)?;
        let reconciled = t.elapsed() - compiled;
        // Its address: the port's address entry and the endpoint, each
        // written and the old ones removed; its remote-group members are
        // unchanged.
        anyhow::ensure!(c.put >= 2 && c.deleted >= 2, "round {round}: {c:?}");
        let times = if scratch { &mut fresh } else { &mut incremental };
        times.compile.push(compiled);
        times.reconcile.push(reconciled);
        if !scratch {
            anyhow::ensure!(
                kept.last
                    == compile::Recompiled {
                        ports: 1,
                        endpoints: 1,
                        policies: 0
                    },
                "round {round}: the kept compiler compiled {:?}",
                kept.last
            );
        } else {
            // Keep the kept compiler current too (not timed).
            kept.compile(&res, &ifindex, 0)?;
        }
    }
    println!(
        "{:<28} {:>12} {:>12} {:>12}",
        "one port's address, p50", "compile", "reconcile", "pass"
    );
    for (what, t) in [("from scratch", &fresh), ("kept compiler", &incremental)] {
        println!(
            "{:<28} {:>12.3?} {:>12.3?} {:>12.3?}",
            what,
            Times::p50(&t.compile),
            Times::p50(&t.reconcile),
            t.total()
        );
    }
    println!(
        "pass from scratch / pass with the kept compiler: {:.1}x",
        fresh.total().as_secs_f64() / incremental.total().as_secs_f64()
    );
    Ok(())
}
