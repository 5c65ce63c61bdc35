//! The store refuses what the dataplane cannot hold (item 2.8: one bad
//! object must not freeze a host) and exchange paths that open a zone wide
//! by pieces (item 2.11). Each limit is tried at its boundary: the limit
//! itself is accepted, one more is refused with the field named and the
//! state left as it was.

use std::net::{Ipv4Addr, Ipv6Addr};

use sdn_policies::limits::{
    ENDPOINTS_MAX, EXCHANGE_MAX, FW_NAMES_MAX, FW_POLICIES_MAX, FW_POLICY_RULES_MAX, PORTS_MAX, ZONES_MAX,
    ZONE_ENDPOINTS_MAX, ZONE_NETS_MAX,
};
use sdn_policies::*;

fn tenant() -> Op {
    Op::PutTenant(Tenant {
        id: "t".into(),
        name: "t".into(),
    })
}

fn zone(id: &str, prefixes: &[&str], dev: &str) -> Op {
    Op::PutZone(Zone {
        id: id.into(),
        name: id.into(),
        prefixes: prefixes.iter().map(|p| p.parse().unwrap()).collect(),
        uplink_device: dev.into(),
    })
}

/// The extranet (10/8, fd00::/8) and the internet (everything else).
fn zones() -> State {
    let mut s = State::default();
    s.apply_batch(&[
        tenant(),
        zone("ext", &["10.0.0.0/8", "fd00::/8"], "up-ext"),
        zone("net", &["0.0.0.0/0", "::/0"], "up-net"),
    ])
    .unwrap();
    s
}

fn path(id: &str, from: &str, to: &str, src: &str, dst: &str, ports: (u16, u16)) -> ExchangePath {
    ExchangePath {
        id: id.into(),
        from_zone: from.into(),
        to_zone: to.into(),
        source: src.parse().unwrap(),
        destination: dst.parse().unwrap(),
        protocol: Protocol::Tcp,
        ports,
        broad: false,
        broad_reason: String::new(),
    }
}

/// A path from the internet into the extranet.
fn inbound(id: &str, dst: &str, ports: (u16, u16)) -> ExchangePath {
    path(id, "net", "ext", "198.51.100.0/24", dst, ports)
}

/// A path from the extranet out to the internet.
fn outbound(id: &str, dst: &str, ports: (u16, u16)) -> ExchangePath {
    path(id, "ext", "net", "10.40.0.0/24", dst, ports)
}

fn put(x: ExchangePath) -> Op {
    Op::PutExchangePath(x)
}

/// Applies a batch that must be refused; checks the field and that the
/// state is unchanged. Returns the message.
fn refused(s: &mut State, ops: &[Op], field: &str) -> String {
    let before = s.clone();
    let e = s.apply_batch(ops).expect_err("the batch must be refused");
    assert_eq!(e.field, field, "{e}");
    assert_eq!(*s, before, "a refused batch leaves the state as it was");
    e.message
}

// Item 2.8: the dataplane's capacities.

#[test]
fn exchange_paths_stop_at_what_the_dataplane_holds() {
    let mut s = zones();
    let ops: Vec<Op> = (0..EXCHANGE_MAX)
        .map(|i| put(inbound(&format!("x{i}"), &format!("10.0.0.{i}/32"), (443, 443))))
        .collect();
    s.apply_batch(&ops).unwrap();
    assert_eq!(s.exchange_paths.len(), EXCHANGE_MAX as usize);
    // Replacing one is no new path.
    s.apply_batch(&[put(inbound("x0", "10.0.1.0/32", (443, 443)))]).unwrap();
    let m = refused(
        &mut s,
        &[put(inbound("one-more", "10.0.2.0/32", (443, 443)))],
        "operations[0].put_exchange_path",
    );
    assert!(m.contains(&format!("at most {EXCHANGE_MAX}")), "{m}");
}

#[test]
fn zones_stop_at_what_the_dataplane_holds() {
    let mut s = zones();
    let more: Vec<Op> = (2..ZONES_MAX)
        .map(|i| zone(&format!("z{i}"), &[&format!("172.16.{i}.0/24")], &format!("up{i}")))
        .collect();
    s.apply_batch(&more).unwrap();
    assert_eq!(s.zones.len(), ZONES_MAX as usize);
    let m = refused(
        &mut s,
        &[zone("late", &["192.0.2.0/24"], "up-late")],
        "operations[0].put_zone",
    );
    assert!(m.contains(&format!("at most {ZONES_MAX}")), "{m}");
}

#[test]
fn zone_prefixes_stop_at_what_the_dataplane_holds() {
    let mut s = zones();
    // Four prefixes so far; a zone with the rest fills the trie.
    let rest: Vec<String> = (0..ZONE_NETS_MAX - 4)
        .map(|i| format!("172.{}.{}.0/24", 16 + i / 256, i % 256))
        .collect();
    let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
    s.apply_batch(&[zone("many", &rest, "up-many")]).unwrap();
    let m = refused(
        &mut s,
        &[zone("late", &["192.0.2.0/24"], "up-late")],
        "operations[0].put_zone.prefixes",
    );
    assert!(m.contains(&format!("at most {ZONE_NETS_MAX}")), "{m}");
    // Growing a zone counts too.
    let mut grown = rest.clone();
    grown.push("192.0.2.0/24");
    refused(
        &mut s,
        &[zone("many", &grown, "up-many")],
        "operations[0].put_zone.prefixes",
    );
}

fn policy(id: &str, rules: u32) -> Op {
    Op::PutFirewallPolicy(FirewallPolicy {
        id: id.into(),
        name: id.into(),
        default_action: Action::Deny,
        rules: (0..rules)
            .map(|i| FirewallRule {
                id: format!("r{i}"),
                priority: i,
                action: Action::Allow,
                direction: Direction::Ingress,
                ether_type: EtherType::IPv4,
                protocol: Protocol::Tcp,
                ports: Some((1000 + i as u16, 1000 + i as u16)),
                remote: None,
            })
            .collect(),
    })
}

/// Extranet VPC `b{i}` behind border firewall `p{i}` (with `rules`
/// rules), subnet 10.x.y.0/24 and one port on host `h`.
fn bordered(i: u32, rules: u32) -> Vec<Op> {
    let [_, _, x, y] = (256 + i).to_be_bytes();
    vec![
        policy(&format!("p{i}"), rules),
        Op::PutVpc(Vpc {
            id: format!("b{i}"),
            tenant_id: "t".into(),
            name: format!("b{i}"),
            vni: 10_000 + i,
            zone_id: "ext".into(),
            border_policy_id: format!("p{i}"),
        }),
        Op::PutSubnet(Subnet {
            id: format!("b{i}"),
            vpc_id: format!("b{i}"),
            cidr_v4: Some(format!("10.{x}.{y}.0/24").parse().unwrap()),
            cidr_v6: None,
        }),
        Op::PutPort(Port {
            id: format!("b{i}"),
            tenant_id: "t".into(),
            subnet_id: format!("b{i}"),
            host_id: "h".into(),
            device: format!("b{i}"),
            mac: Mac([0x02, 1, 0, 0, x, y]),
            ipv4: Some(Ipv4Addr::new(10, x, y, 5)),
            ipv6: None,
            security_group_ids: vec![],
            vm_id: String::new(),
        }),
    ]
}

/// Puts objects straight into the state, as a store that accepted them
/// (checking each would take long for thousands).
fn fill_ops(s: &mut State, ops: impl IntoIterator<Item = Op>) {
    for op in ops {
        let o = match op {
            Op::PutFirewallPolicy(f) => Object::FirewallPolicy(f),
            Op::PutVpc(v) => Object::Vpc(v),
            Op::PutSubnet(x) => Object::Subnet(x),
            Op::PutPort(p) => Object::Port(p),
            other => panic!("not filled: {other:?}"),
        };
        let id = o.id().to_string();
        s.replace(o.kind(), &id, Some(o));
    }
}

/// The zones, tenant `t` and host `h`.
fn with_host() -> State {
    let mut s = zones();
    s.apply_batch(&[Op::PutHost(host("h", "192.0.2.2"))]).unwrap();
    s
}

#[test]
fn firewall_policies_per_host_stop_at_what_the_dataplane_holds() {
    let mut s = with_host();
    fill_ops(&mut s, (0..FW_POLICIES_MAX - 1).flat_map(|i| bordered(i, 0)));
    // And a VPC on the host with no border firewall yet.
    let mut free = bordered(5000, 0).split_off(1);
    let Op::PutVpc(v) = &mut free[0] else { panic!() };
    v.border_policy_id.clear();
    let free_vpc = free[0].clone();
    fill_ops(&mut s, free);
    s.apply_batch(&bordered(FW_POLICIES_MAX - 1, 0)).unwrap();
    // The port that brings one more policy to the host is refused.
    let m = refused(
        &mut s,
        &bordered(FW_POLICIES_MAX, 0),
        "operations[3].put_port.subnet_id",
    );
    assert!(m.contains(&format!("at most {FW_POLICIES_MAX}")), "{m}");
    // So is a border firewall for a VPC the host holds.
    let Op::PutVpc(mut v) = free_vpc else { panic!() };
    v.border_policy_id = "late".into();
    refused(
        &mut s,
        &[policy("late", 0), Op::PutVpc(v)],
        "operations[1].put_vpc.border_policy_id",
    );
    // A policy no host holds counts for none.
    let unused = bordered(FW_POLICIES_MAX, 0);
    s.apply_batch(&unused[..3]).unwrap();
    // One policy is held to its own slots.
    s.apply_batch(&[policy("full", FW_POLICY_RULES_MAX)]).unwrap();
    refused(
        &mut s,
        &[policy("full", FW_POLICY_RULES_MAX + 1)],
        "operations[0].put_firewall_policy.rules",
    );
}

#[test]
fn firewall_rules_per_host_stop_at_what_the_dataplane_holds() {
    // Every rule and every policy's default has a name in the dataplane.
    let full = FW_POLICY_RULES_MAX;
    let policies = FW_NAMES_MAX / (full + 1);
    let last = FW_NAMES_MAX - policies * (full + 1) - 1;
    let mut s = with_host();
    fill_ops(&mut s, (0..policies).flat_map(|i| bordered(i, full)));
    s.apply_batch(&bordered(policies, last)).unwrap();
    let rules: usize = s.firewall_policies.values().map(|f| f.rules.len()).sum();
    assert_eq!(rules + s.firewall_policies.len(), FW_NAMES_MAX as usize);
    let m = refused(
        &mut s,
        &[policy(&format!("p{policies}"), last + 1)],
        "operations[0].put_firewall_policy.rules",
    );
    assert!(m.contains(&format!("at most {FW_NAMES_MAX}")), "{m}");
    refused(&mut s, &bordered(policies + 1, 0), "operations[3].put_port.subnet_id");
}

fn host(id: &str, ip: &str) -> Host {
    Host {
        id: id.into(),
        underlay_ip: ip.parse().unwrap(),
    }
}

#[test]
fn hosts_need_an_ipv4_underlay() {
    let mut s = State::default();
    let m = refused(
        &mut s,
        &[Op::PutHost(host("h", "fd99::2"))],
        "operations[0].put_host.underlay_ip",
    );
    assert!(m.contains("IPv4 underlays only"), "{m}");
    s.apply_batch(&[Op::PutHost(host("h", "192.0.2.2"))]).unwrap();
}

/// A port numbered `i`: its own device, MAC and addresses in subnet `s`
/// (10.64.0.0/15, fd00:64::/64).
fn port(i: u32, host: &str, dual: bool) -> Port {
    let [_, a, b, c] = (i + 2).to_be_bytes();
    let base = u32::from(Ipv4Addr::new(10, 64, 0, 0));
    Port {
        id: format!("p{i}"),
        tenant_id: "t".into(),
        subnet_id: "s".into(),
        host_id: host.into(),
        device: format!("d{i}"),
        mac: Mac([0x02, 0, a, b, c, 1]),
        ipv4: Some(Ipv4Addr::from(base + i + 2)),
        ipv6: dual.then(|| Ipv6Addr::from(u128::from(Ipv6Addr::new(0xfd00, 0x64, 0, 0, 0, 0, 0, 0)) + i as u128 + 2)),
        security_group_ids: vec![],
        vm_id: String::new(),
    }
}

/// A VPC in `zone` (or none) with one dual-stack subnet.
fn vpc(id: &str, zone: &str, subnet: &str, v4: &str, v6: &str) -> [Op; 2] {
    [
        Op::PutVpc(Vpc {
            id: id.into(),
            tenant_id: "t".into(),
            name: id.into(),
            vni: 0,
            zone_id: zone.into(),
            border_policy_id: String::new(),
        }),
        Op::PutSubnet(Subnet {
            id: subnet.into(),
            vpc_id: id.into(),
            cidr_v4: Some(v4.parse().unwrap()),
            cidr_v6: Some(v6.parse().unwrap()),
        }),
    ]
}

/// VPC `v` in `zone` (or none) with subnet `s`, where [`port`] puts ports.
fn network(zone: &str) -> State {
    let mut s = zones();
    s.apply_batch(&vpc("v", zone, "s", "10.64.0.0/15", "fd00:64::/64"))
        .unwrap();
    s
}

/// Puts ports straight into the state, unchecked, as a store that
/// accepted them.
fn fill(s: &mut State, ports: impl Iterator<Item = Port>) {
    for p in ports {
        if !s.hosts.contains_key(&p.host_id) {
            let h = host(&p.host_id, "192.0.2.9");
            s.replace(Kind::Host, &h.id.clone(), Some(Object::Host(h)));
        }
        s.replace(Kind::Port, &p.id.clone(), Some(Object::Port(p)));
    }
}

#[test]
fn ports_per_host_stop_at_what_the_dataplane_holds() {
    let mut s = network("");
    fill(&mut s, (0..PORTS_MAX - 1).map(|i| port(i, "h", false)));
    s.apply_batch(&[Op::PutPort(port(PORTS_MAX - 1, "h", false))]).unwrap();
    let m = refused(
        &mut s,
        &[Op::PutPort(port(PORTS_MAX, "h", false))],
        "operations[0].put_port.host_id",
    );
    assert!(m.contains(&format!("at most {PORTS_MAX}")), "{m}");
    // Another host has room.
    s.apply_batch(&[
        Op::PutHost(host("h2", "192.0.2.3")),
        Op::PutPort(port(PORTS_MAX, "h2", false)),
    ])
    .unwrap();
}

#[test]
fn addresses_of_zoned_vpcs_stop_at_what_a_host_holds() {
    // Dual-stack ports of one extranet VPC, spread over hosts: every host
    // with one of them holds the addresses of all.
    let mut s = network("ext");
    let n = ZONE_ENDPOINTS_MAX / 2;
    let on = |i: u32| format!("h{}", i / PORTS_MAX);
    fill(&mut s, (0..n - 1).map(|i| port(i, &on(i), true)));
    s.apply_batch(&[Op::PutPort(port(n - 1, &on(n - 1), true))]).unwrap();
    // One more address, on a host of its own.
    let m = refused(
        &mut s,
        &[
            Op::PutHost(host("spare", "192.0.2.4")),
            Op::PutPort(port(n, "spare", false)),
        ],
        "operations[1].put_port.subnet_id",
    );
    assert!(m.contains(&format!("at most {ZONE_ENDPOINTS_MAX}")), "{m}");
}

#[test]
fn overlay_endpoints_stop_at_what_a_host_holds() {
    // A host of a peered VPC holds its addresses under both VNIs, and the
    // gateways of both VPCs (two each).
    let mut s = network("");
    s.apply_batch(&vpc("w", "", "sw", "10.128.0.0/16", "fd00:128::/64"))
        .unwrap();
    let n = (ENDPOINTS_MAX - 4) / 4;
    let on = |i: u32| format!("h{}", i / PORTS_MAX);
    fill(&mut s, (0..n - 1).map(|i| port(i, &on(i), true)));
    s.apply_batch(&[Op::PutPort(port(n - 1, &on(n - 1), true))]).unwrap();
    let peer = Op::PutVpcPeering(VpcPeering {
        id: "vw".into(),
        vpc_a: "v".into(),
        vpc_b: "w".into(),
        policy_id: String::new(),
    });
    s.apply_batch(&[peer]).unwrap();
    let m = refused(
        &mut s,
        &[
            Op::PutHost(host("spare", "192.0.2.4")),
            Op::PutPort(port(n, "spare", false)),
        ],
        "operations[1].put_port.subnet_id",
    );
    assert!(m.contains(&format!("at most {ENDPOINTS_MAX}")), "{m}");
}

// Item 2.11: exchange paths widened by pieces.

#[test]
fn two_halves_of_everything_are_refused() {
    let mut s = zones();
    // Under the default share, half is refused at once.
    refused(
        &mut s,
        &[
            put(outbound("a", "0.0.0.0/1", (443, 443))),
            put(outbound("b", "128.0.0.0/1", (443, 443))),
        ],
        "operations[0].put_exchange_path.destination_cidr",
    );
    // With a share that lets one half through, the other half is refused.
    s.settings.exchange_share_max_percent = 60;
    s.apply_batch(&[put(outbound("a", "0.0.0.0/1", (443, 443)))]).unwrap();
    let m = refused(
        &mut s,
        &[put(outbound("b", "128.0.0.0/1", (443, 443)))],
        "operations[0].put_exchange_path.destination_cidr",
    );
    assert!(m.contains("100.00% of zone net's IPv4 addresses"), "{m}");
    // IPv6 counts all 2^128 addresses.
    let v6 = |id: &str, dst: &str| put(path(id, "ext", "net", "fd40::/64", dst, (443, 443)));
    s.apply_batch(&[v6("c", "::/1")]).unwrap();
    refused(
        &mut s,
        &[v6("d", "8000::/1")],
        "operations[0].put_exchange_path.destination_cidr",
    );
}

#[test]
fn all_ports_but_zero_are_refused() {
    let mut s = zones();
    let m = refused(
        &mut s,
        &[put(inbound("x", "10.0.0.5/32", (1, 65535)))],
        "operations[0].put_exchange_path.port_min",
    );
    assert!(m.contains("of all ports"), "{m}");
    // A quarter of the ports is the most, also in pieces and to other hosts.
    s.apply_batch(&[
        put(inbound("a", "10.0.0.5/32", (1, 8192))),
        put(inbound("b", "10.0.0.6/32", (8193, 16384))),
    ])
    .unwrap();
    refused(
        &mut s,
        &[put(inbound("c", "10.0.0.7/32", (16385, 16385)))],
        "operations[0].put_exchange_path.port_min",
    );
    // ICMP counts types: a quarter of 256.
    let icmp = |id: &str, types: (u16, u16)| {
        put(ExchangePath {
            protocol: Protocol::Icmp,
            ..inbound(id, "10.0.0.5/32", types)
        })
    };
    s.apply_batch(&[icmp("i1", (0, 63))]).unwrap();
    refused(
        &mut s,
        &[icmp("i2", (64, 64))],
        "operations[0].put_exchange_path.port_min",
    );
}

#[test]
fn small_paths_adding_up_are_refused_on_the_one_that_crosses() {
    let mut s = zones();
    // 10/8 has 2^24 addresses; a quarter is 2^22, sixteen /14s.
    let pieces: Vec<Op> = (0..16)
        .map(|i| put(inbound(&format!("x{i}"), &format!("10.{}.0.0/14", i * 4), (443, 443))))
        .collect();
    s.apply_batch(&pieces).unwrap();
    // Overlapping paths add nothing.
    s.apply_batch(&[put(inbound("dup", "10.4.0.0/16", (443, 443)))])
        .unwrap();
    // The next address crosses, in whatever batch.
    let m = refused(
        &mut s,
        &[
            put(inbound("ok", "10.0.0.7/32", (443, 443))),
            put(inbound("cross", "10.64.0.0/32", (443, 443))),
        ],
        "operations[1].put_exchange_path.destination_cidr",
    );
    assert!(
        m.contains("zone ext's IPv4 addresses") && m.contains("above 25%"),
        "{m}"
    );
    // Another protocol and the other direction are counted apart.
    s.apply_batch(&[put(ExchangePath {
        protocol: Protocol::Udp,
        ..inbound("udp", "10.64.0.0/32", (53, 53))
    })])
    .unwrap();
    // Narrowing a path makes room.
    s.apply_batch(&[
        put(inbound("x0", "10.0.0.0/15", (443, 443))),
        put(inbound("cross", "10.64.0.0/32", (443, 443))),
    ])
    .unwrap();
}

#[test]
fn a_broad_path_says_why_and_the_audit_keeps_it() {
    let mut s = zones();
    let broad = |reason: &str| ExchangePath {
        broad: true,
        broad_reason: reason.into(),
        ..path("portal", "net", "ext", "0.0.0.0/0", "10.64.0.0/10", (443, 443))
    };
    // A source of every address is broad.
    let m = refused(
        &mut s,
        &[put(ExchangePath {
            broad: false,
            ..broad("")
        })],
        "operations[0].put_exchange_path.source_cidr",
    );
    assert!(m.contains("broad"), "{m}");
    refused(
        &mut s,
        &[put(broad("  "))],
        "operations[0].put_exchange_path.broad_reason",
    );
    // The reason is one audit line; it cannot forge another.
    refused(
        &mut s,
        &[put(broad("portal\nrevision 7 put nothing"))],
        "operations[0].put_exchange_path.broad_reason",
    );
    let changes = s
        .apply_batch(&[put(broad("public portal, open to every citizen"))])
        .unwrap();
    assert!(
        changes[0].contains("broad: public portal, open to every citizen"),
        "{changes:?}"
    );
    // A broad path does not count against the others' share.
    s.apply_batch(&[put(inbound("api", "10.128.0.0/10", (443, 443)))])
        .unwrap();
    // A reason on a path that is not broad is refused.
    refused(
        &mut s,
        &[put(ExchangePath {
            broad_reason: "why not".into(),
            ..inbound("y", "10.0.0.5/32", (443, 443))
        })],
        "operations[0].put_exchange_path.broad_reason",
    );
}

#[test]
fn a_destination_outside_its_zone_is_refused() {
    let mut s = zones();
    let m = refused(
        &mut s,
        &[put(inbound("x", "192.168.0.0/24", (443, 443)))],
        "operations[0].put_exchange_path.destination_cidr",
    );
    assert!(m.contains("not inside zone ext"), "{m}");
    // Partly inside is outside.
    refused(
        &mut s,
        &[put(inbound("x", "10.0.0.0/7", (443, 443)))],
        "operations[0].put_exchange_path.destination_cidr",
    );
    s.apply_batch(&[put(inbound("x", "10.0.0.0/24", (443, 443)))]).unwrap();
}

#[test]
fn a_zone_cannot_shrink_under_its_paths() {
    let mut s = zones();
    s.apply_batch(&[put(inbound("x", "10.0.0.0/10", (443, 443)))]).unwrap();
    // The path becomes half the zone.
    let m = refused(
        &mut s,
        &[zone("ext", &["10.0.0.0/9", "fd00::/8"], "up-ext")],
        "operations[0].put_zone.prefixes",
    );
    assert!(m.contains("50.00%"), "{m}");
    // The path falls outside the zone.
    let m = refused(
        &mut s,
        &[zone("ext", &["10.128.0.0/9", "fd00::/8"], "up-ext")],
        "operations[0].put_zone.prefixes",
    );
    assert!(m.contains("exchange path x"), "{m}");
    // Growing is fine.
    s.apply_batch(&[zone("ext", &["10.0.0.0/8", "172.16.0.0/12", "fd00::/8"], "up-ext")])
        .unwrap();
}
