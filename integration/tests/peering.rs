//! VPC peering and the VPC firewall: two tenants' VPCs on two hosts joined
//! by a peering whose firewall admits only what its ordered rules allow, in
//! both families; replies pass; each verdict names its rule.

use sdn_integration::cluster::Cluster;
use sdn_integration::ops::*;
use sdn_integration::{privileged, Proc, Topology};
use sdn_proto::v1 as pb;

fn peering(id: &str, a: &str, b: &str, policy: &str) -> pb::operation::Op {
    pb::operation::Op::PutVpcPeering(pb::VpcPeering {
        id: id.into(),
        vpc_a: a.into(),
        vpc_b: b.into(),
        policy_id: policy.into(),
    })
}

struct Env {
    _servers: Vec<Proc>,
    cluster: Cluster,
    topo: Topology,
}

async fn setup(tag: &str) -> anyhow::Result<Env> {
    let mut topo = Topology::new(tag, &["h1", "h2"])?;
    topo.add_vm("a1", "h1", "02:0a:00:00:00:11", "10.70.0.11/24", "fd70::11/64")?;
    topo.add_vm("a2", "h2", "02:0a:00:00:00:12", "10.70.0.12/24", "fd70::12/64")?;
    topo.add_vm("b1", "h2", "02:0b:00:00:00:11", "10.71.0.11/24", "fd71::11/64")?;
    topo.add_vm("b2", "h1", "02:0b:00:00:00:12", "10.71.0.12/24", "fd71::12/64")?;
    let mut cluster = Cluster::start(&topo.dir)?;
    cluster
        .apply(vec![
            tenant("dept-a"),
            tenant("dept-b"),
            vpc("va", "dept-a"),
            vpc("vb", "dept-b"),
            subnet("a-net", "va", "10.70.0.0/24", "fd70::/64"),
            subnet("b-net", "vb", "10.71.0.0/24", "fd71::/64"),
            host("h1", &topo.underlay_ip("h1")),
            host("h2", &topo.underlay_ip("h2")),
            group("open-a", "dept-a", open_rules()),
            group("open-b", "dept-b", open_rules()),
        ])
        .await?;
    cluster.start_agent(&topo, "h1")?;
    cluster.start_agent(&topo, "h2")?;
    let mut ports = Vec::new();
    for (vm, tenant, subnet, host, v4, v6) in [
        ("a1", "dept-a", "a-net", "h1", "10.70.0.11", "fd70::11"),
        ("a2", "dept-a", "a-net", "h2", "10.70.0.12", "fd70::12"),
        ("b1", "dept-b", "b-net", "h2", "10.71.0.11", "fd71::11"),
        ("b2", "dept-b", "b-net", "h1", "10.71.0.12", "fd71::12"),
    ] {
        let group = if tenant == "dept-a" { "open-a" } else { "open-b" };
        let mac = topo.vm(vm).mac.clone();
        ports.push(port(
            vm,
            tenant,
            subnet,
            host,
            &format!("{vm}h"),
            &mac,
            v4,
            v6,
            &[group],
        ));
    }
    assert!(cluster.apply(ports).await?.enforced);
    let args = ["--tcp", "22", "--tcp", "80", "--tcp", "5432"];
    let servers = topo.serve(&["a1", "a2", "b1", "b2"], &[], &args)?;
    Ok(Env {
        _servers: servers,
        cluster,
        topo,
    })
}

impl Env {
    fn counter(&self, host: &str, name: &str) -> u64 {
        self.cluster.counter(&self.topo, host, "drops", name)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn peered_vpcs_meet_through_their_vpc_firewall() {
    if !privileged() {
        eprintln!("skipping: needs root");
        return;
    }
    let env = setup("ovp").await.expect("topology");
    let t = &env.topo;
    assert!(!t.reach("b1", "a1", "tcp", 5432, false), "no peering yet: no route");

    // Side A is va: ingress comes from vb, egress goes to it.
    let policy = pb::operation::Op::PutFirewallPolicy(pb::FirewallPolicy {
        id: "east-west".into(),
        name: "dept-b's apps use dept-a's database".into(),
        default_action: pb::Action::Deny as i32,
        rules: vec![
            fw_rule("db", 10, "allow in v4", "tcp", (5432, 5432), "10.71.0.0/24"),
            fw_rule("db-v6", 11, "allow in v6", "tcp", (5432, 5432), "fd71::/64"),
            fw_rule("no-b2", 5, "deny in v4", "any", (0, 0), "10.71.0.12/32"),
            fw_rule("web-out", 20, "allow out v4", "tcp", (80, 80), "10.71.0.0/24"),
        ],
    });
    let r = env
        .cluster
        .apply(vec![policy, peering("ab", "va", "vb", "east-west")])
        .await
        .expect("peer the VPCs");
    assert!(r.enforced);

    let before = env.counter("h1", "vpc_firewall");
    let expect = [
        // (from, to, proto, port, v6, passes)
        ("b1", "a1", "tcp", 5432, false, true),  // rule db, across hosts
        ("b1", "a1", "tcp", 5432, true, true),   // rule db-v6
        ("b1", "a1", "tcp", 22, false, false),   // default deny
        ("b1", "a1", "icmp", 0, true, false),    // default deny, IPv6
        ("b2", "a1", "tcp", 5432, false, false), // rule no-b2 (priority 5) before db, same host
        ("a1", "b1", "tcp", 80, false, true),    // rule web-out (egress from A)
        ("a2", "b2", "tcp", 80, false, true),    // same, the other pair of hosts
        ("a1", "b2", "tcp", 80, false, true),    // same, both on h1 (through the tunnel to itself)
        ("a1", "b1", "tcp", 22, false, false),   // default deny
    ];
    let mut wrong = Vec::new();
    for (from, to, proto, port, v6, want) in expect {
        let got = t.reach(from, to, proto, port, v6);
        eprintln!(
            "  {from} -> {to} {proto}/{port} v6={v6}: {}",
            if got { "PASS" } else { "DROP" }
        );
        if got != want {
            wrong.push(format!("{from}->{to} {proto}/{port} v6={v6}: expected {want}"));
        }
    }
    assert!(wrong.is_empty(), "{wrong:?}");
    assert!(env.counter("h1", "vpc_firewall") > before, "denials are counted");

    // The verdicts name the rules.
    let rules: Vec<(String, String, u64)> = env
        .cluster
        .verdicts(t, "h1")
        .into_iter()
        .filter(|v| v["vm"] == "10.70.0.11")
        .map(|v| {
            (
                v["remote"].as_str().unwrap().to_string(),
                v["rule"].as_str().unwrap().to_string(),
                v["vm_port"].as_u64().unwrap(),
            )
        })
        .collect();
    assert!(
        rules.contains(&("10.71.0.11".into(), "east-west/db".into(), 5432)),
        "{rules:?}"
    );
    assert!(
        rules.contains(&("10.71.0.12".into(), "east-west/no-b2".into(), 5432)),
        "{rules:?}"
    );
    assert!(
        rules.contains(&("10.71.0.11".into(), "east-west/default".into(), 22)),
        "{rules:?}"
    );

    // Overlapping addresses cannot be peered; removing the peering parts them.
    let e = env
        .cluster
        .apply(vec![
            vpc("vc", "dept-b"),
            subnet("c-net", "vc", "10.70.0.0/25", ""),
            peering("ac", "va", "vc", ""),
        ])
        .await
        .unwrap_err();
    assert!(e.message().contains("overlaps"), "{e:?}");
    env.cluster
        .apply(vec![pb::operation::Op::Delete(pb::ObjectRef {
            kind: pb::Kind::VpcPeering as i32,
            id: "ab".into(),
        })])
        .await
        .expect("unpeer");
    assert!(!t.reach("b1", "a1", "tcp", 5432, false), "unpeered: no route again");
}
