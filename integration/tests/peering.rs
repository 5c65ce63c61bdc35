//! VPC peering and the VPC firewall: two tenants' VPCs on two hosts joined
//! by a peering whose firewall admits only what its ordered rules allow, in
//! both families; replies pass; each verdict names its rule.

use sdn_integration::lab::Lab;
use sdn_integration::ops::*;
use sdn_integration::{privileged, Proc};
use sdn_proto::v1 as pb;

fn peering(id: &str, a: &str, b: &str, policy: &str) -> pb::operation::Op {
    pb::operation::Op::PutVpcPeering(pb::VpcPeering {
        id: id.into(),
        vpc_a: a.into(),
        vpc_b: b.into(),
        policy_id: policy.into(),
    })
}

/// Two tenants' VPCs side by side, each with a VM on either host: a1
/// (10.70.0.11) and b2 (10.71.0.12) on h1, a2 (10.70.0.12) and b1
/// (10.71.0.11) on h2.
async fn setup(tag: &str) -> anyhow::Result<(Lab, Vec<Proc>)> {
    let lab = Lab::new(tag, &["h1", "h2"])
        .tenant("dept-a")
        .vpc("va", None)
        .subnet("a-net", "va", "10.70.0.0/24", "fd70::/64")
        .group("open-a", open_rules())
        .tenant("dept-b")
        .vpc("vb", None)
        .subnet("b-net", "vb", "10.71.0.0/24", "fd71::/64")
        .group("open-b", open_rules())
        .vm("a1", "h1", "a-net", &["open-a"])
        .vm("a2", "h2", "a-net", &["open-a"])
        .vm("b1", "h2", "b-net", &["open-b"])
        .vm("b2", "h1", "b-net", &["open-b"])
        .start()
        .await?;
    let args = ["--tcp", "22", "--tcp", "80", "--tcp", "5432"];
    let servers = lab.topo.serve(&["a1", "a2", "b1", "b2"], &[], &args)?;
    Ok((lab, servers))
}

#[tokio::test(flavor = "multi_thread")]
async fn peered_vpcs_meet_through_their_vpc_firewall() {
    if !privileged() {
        eprintln!("skipping: needs root");
        return;
    }
    let (lab, _servers) = setup("ovp").await.expect("topology");
    let t = &lab.topo;
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
    let r = lab
        .cluster
        .apply(vec![policy, peering("ab", "va", "vb", "east-west")])
        .await
        .expect("peer the VPCs");
    assert!(r.enforced);

    let before = lab.counter("h1", "drops", "vpc_firewall");
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
    assert!(
        lab.counter("h1", "drops", "vpc_firewall") > before,
        "denials are counted"
    );

    // The verdicts name the rules.
    let rules: Vec<(String, String, u64)> = lab
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
    let e = lab
        .cluster
        .apply(vec![
            vpc("vc", "dept-b"),
            subnet("c-net", "vc", "10.70.0.0/25", ""),
            peering("ac", "va", "vc", ""),
        ])
        .await
        .unwrap_err();
    assert!(e.message().contains("overlaps"), "{e:?}");
    lab.cluster
        .apply(vec![pb::operation::Op::Delete(pb::ObjectRef {
            kind: pb::Kind::VpcPeering as i32,
            id: "ab".into(),
        })])
        .await
        .expect("unpeer");
    assert!(!t.reach("b1", "a1", "tcp", 5432, false), "unpeered: no route again");
}
