//! Packet fixtures: each row is a packet, the program it goes through, the
//! expected verdict and drop reason, and the expected output packet, run in
//! the kernel with BPF_PROG_TEST_RUN against a policy compiled by the agent.

use std::collections::BTreeMap;

use dataplane_common::DropReason;
use sdn_agent::compile::{self, Resources};
use sdn_agent::dataplane::{read_counters, Dataplane};
use sdn_agent::reconcile::{Hook, Reconciler};
use sdn_agent::testrun;
use sdn_agent::testutil::{can_load_bpf, BpffsMount};
use sdn_proto::v1 as pb;

const VM_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];
const VM4: [u8; 4] = [10, 0, 0, 1];
const VM6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
/// The ifindex the harness gives the VXLAN device (never resolved by a test run).
const VXLAN_IFINDEX: u32 = 42;
const GATEWAY4: [u8; 4] = [10, 0, 0, 254];
const REMOTE_HOST: [u8; 4] = [192, 168, 9, 2];

#[derive(Clone, Copy, Debug, PartialEq)]
enum Prog {
    FromVm,
    ToVm,
    FromOverlay,
    FromUplink,
    ToUplink,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    /// Towards the VM: delivered unchanged. From the VM: routed or answered
    /// (redirected), nothing dropped.
    Pass,
    /// From the VM: handed to the host's stack unchanged.
    Host,
    /// Absorbed by the host, not counted as a drop.
    Absorbed,
    Drop(DropReason),
}

fn rule(
    id: &str,
    dir: pb::Direction,
    et: pb::EtherType,
    proto: pb::Protocol,
    ports: (u32, u32),
    cidr: &str,
    group: &str,
) -> pb::SecurityGroupRule {
    pb::SecurityGroupRule {
        id: id.into(),
        direction: dir as i32,
        ether_type: et as i32,
        protocol: proto as i32,
        port_min: ports.0,
        port_max: ports.1,
        remote_cidr: cidr.into(),
        remote_group_id: group.into(),
    }
}

fn share(rules: Vec<pb::SecurityGroupRule>, members: &[&str]) -> Resources {
    let mut r = Resources::new();
    let port = pb::Port {
        id: "p1".into(),
        subnet_id: "s".into(),
        device: "lo".into(),
        mac: "02:00:00:00:00:01".into(),
        ipv4: "10.0.0.1".into(),
        ipv6: "fd00::1".into(),
        security_group_ids: vec!["web".into()],
        ..Default::default()
    };
    r.insert(
        "port/p1".into(),
        pb::Resource {
            name: "port/p1".into(),
            version: "1".into(),
            kind: Some(pb::resource::Kind::Port(port)),
        },
    );
    let g = pb::SecurityGroup {
        id: "web".into(),
        rules,
        ..Default::default()
    };
    r.insert(
        "sg/web".into(),
        pb::Resource {
            name: "sg/web".into(),
            version: "1".into(),
            kind: Some(pb::resource::Kind::SecurityGroup(g)),
        },
    );
    // The VPC: the port here; peers on another host; a gateway.
    let endpoint = |id: &str, v4: &str, v6: &str, host: &str| pb::Endpoint {
        port_id: id.into(),
        mac: "02:00:00:00:00:77".into(),
        ipv4: v4.into(),
        ipv6: v6.into(),
        host_id: host.into(),
        host_underlay_ip: std::net::Ipv4Addr::from(REMOTE_HOST).to_string(),
    };
    let net = pb::VpcNetwork {
        vpc_id: "v".into(),
        vni: 7,
        zone_id: String::new(),
        border_policy_id: String::new(),
        gateways: vec![pb::SubnetGateway {
            subnet_id: "s".into(),
            gateway_v4: std::net::Ipv4Addr::from(GATEWAY4).to_string(),
            gateway_v6: "fd00::fe".into(),
        }],
        endpoints: vec![
            endpoint("p1", "10.0.0.1", "fd00::1", "here"),
            endpoint("peer", "192.0.2.1", "fd00::9", "there"),
            endpoint("dns", "192.0.2.53", "", "there"),
            endpoint("client", "198.51.100.1", "", "there"),
        ],
    };
    r.insert(
        "vpc/v".into(),
        pb::Resource {
            name: "vpc/v".into(),
            version: "1".into(),
            kind: Some(pb::resource::Kind::VpcNetwork(net)),
        },
    );
    let m = pb::GroupMembers {
        group_id: "db".into(),
        addresses: members.iter().map(|s| s.to_string()).collect(),
    };
    r.insert(
        "members/db".into(),
        pb::Resource {
            name: "members/db".into(),
            version: "1".into(),
            kind: Some(pb::resource::Kind::GroupMembers(m)),
        },
    );
    r
}

fn base_rules() -> Vec<pb::SecurityGroupRule> {
    use pb::{Direction::*, EtherType::*, Protocol::*};
    vec![
        rule("ssh", Ingress, Ipv4, Tcp, (22, 22), "", ""),
        rule("dns", Ingress, Ipv4, Udp, (53, 53), "10.0.0.0/8", ""),
        rule("ping", Ingress, Ipv4, Icmp, (8, 8), "", ""),
        rule("web6", Ingress, Ipv6, Tcp, (8000, 8080), "fd00::/16", ""),
        rule("db", Ingress, Ipv4, Tcp, (5432, 5432), "", "db"),
    ]
}

// ---- packet builders ----------------------------------------------------

fn eth(src: [u8; 6], dst: [u8; 6], ethertype: u16) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&dst);
    p.extend_from_slice(&src);
    p.extend_from_slice(&ethertype.to_be_bytes());
    p
}

fn tcp4(smac: [u8; 6], src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, syn: bool) -> Vec<u8> {
    let b = etherparse::PacketBuilder::ethernet2(smac, GW_MAC)
        .ipv4(src, dst, 64)
        .tcp(sport, dport, 1, 1024);
    let b = if syn { b.syn() } else { b.ack(1) };
    let mut v = Vec::new();
    b.write(&mut v, &[]).unwrap();
    v
}

fn udp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let mut v = Vec::new();
    etherparse::PacketBuilder::ethernet2(GW_MAC, VM_MAC)
        .ipv4(src, dst, 64)
        .udp(sport, dport)
        .write(&mut v, b"q")
        .unwrap();
    v
}

fn ping4(src: [u8; 4], dst: [u8; 4], smac: [u8; 6]) -> Vec<u8> {
    let mut v = Vec::new();
    etherparse::PacketBuilder::ethernet2(smac, GW_MAC)
        .ipv4(src, dst, 64)
        .icmpv4_echo_request(7, 1)
        .write(&mut v, b"ping")
        .unwrap();
    v
}

fn tcp6(src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16, smac: [u8; 6]) -> Vec<u8> {
    let mut v = Vec::new();
    etherparse::PacketBuilder::ethernet2(smac, GW_MAC)
        .ipv6(src, dst, 64)
        .tcp(sport, dport, 1, 1024)
        .syn()
        .write(&mut v, &[])
        .unwrap();
    v
}

/// IPv6 with `n` destination-options headers before TCP (checksums are not
/// checked by the program, so zero is fine).
fn ipv6_ext_chain(n: usize, first_nh: u8, dport: u16) -> Vec<u8> {
    let mut p = eth(GW_MAC, VM_MAC, 0x86dd);
    let payload_len = n * 8 + 20;
    p.extend_from_slice(&[0x60, 0, 0, 0]);
    p.extend_from_slice(&(payload_len as u16).to_be_bytes());
    p.push(if n == 0 { 6 } else { first_nh });
    p.push(64);
    let src: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9];
    p.extend_from_slice(&src);
    p.extend_from_slice(&VM6);
    for i in 0..n {
        let next = if i + 1 == n { 6 } else { 60 };
        p.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]); // PadN option
    }
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02;
    p.extend_from_slice(&tcp);
    p
}

fn arp(sender_mac: [u8; 6], sender_ip: [u8; 4]) -> Vec<u8> {
    let mut p = eth(VM_MAC, [0xff; 6], 0x0806);
    p.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    p.extend_from_slice(&sender_mac);
    p.extend_from_slice(&sender_ip);
    p.extend_from_slice(&[0; 6]);
    p.extend_from_slice(&[10, 0, 0, 254]);
    p
}

/// ICMPv6 neighbour message from the VM: type, source, target, option.
fn nd(ty: u8, src: [u8; 16], target: [u8; 16], opt_mac: Option<[u8; 6]>) -> Vec<u8> {
    let mut p = eth(VM_MAC, [0x33, 0x33, 0, 0, 0, 1], 0x86dd);
    let mut icmp = vec![ty, 0, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&target);
    if let Some(m) = opt_mac {
        icmp.extend_from_slice(&[if ty == 135 { 1 } else { 2 }, 1]);
        icmp.extend_from_slice(&m);
    }
    p.extend_from_slice(&[0x60, 0, 0, 0]);
    p.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    p.extend_from_slice(&[58, 255]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&[0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    p.extend_from_slice(&icmp);
    p
}

/// An IPv4 packet whose total length covers only 8 bytes of TCP header.
fn short_tcp() -> Vec<u8> {
    let mut v = tcp4(GW_MAC, [198, 51, 100, 1], VM4, 1, 22, true);
    v.truncate(14 + 20 + 8);
    v[16..18].copy_from_slice(&28u16.to_be_bytes());
    v
}

/// A TCP SYN towards the VM whose data offset field is `doff` words.
fn tcp_doff(doff: u8) -> Vec<u8> {
    let mut v = tcp4(GW_MAC, [198, 51, 100, 1], VM4, 1, 22, true);
    v[14 + 20 + 12] = doff << 4;
    v
}

/// A UDP datagram towards the VM whose length field says `len`.
fn udp_len(len: u16) -> Vec<u8> {
    let mut v = udp4([10, 9, 9, 9], VM4, 5353, 53);
    v[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&len.to_be_bytes());
    v
}

/// A DHCP server message (UDP 67 -> 68) from the VM.
fn dhcp_offer() -> Vec<u8> {
    let mut v = Vec::new();
    etherparse::PacketBuilder::ethernet2(VM_MAC, [0xff; 6])
        .ipv4(VM4, [10, 0, 0, 9], 64)
        .udp(67, 68)
        .write(&mut v, &[2u8; 240])
        .unwrap();
    v
}

fn bad_ihl() -> Vec<u8> {
    let mut v = tcp4(GW_MAC, [198, 51, 100, 1], VM4, 1, 22, true);
    v[14] = 0x44;
    v
}

fn frag4() -> Vec<u8> {
    let mut v = udp4([10, 1, 1, 1], VM4, 5000, 53);
    v[14 + 6] = 0x20; // more fragments
    v
}

// ---- harness --------------------------------------------------------------

struct Harness {
    _mount: BpffsMount,
    dp: Dataplane,
    rec: Reconciler,
    pin: std::path::PathBuf,
}

impl Harness {
    fn new() -> Option<Harness> {
        Harness::with_hook(|_| None)
    }

    /// A harness whose reconciler runs `hook` (made from the loaded
    /// dataplane) after every change it makes to a map.
    fn with_hook(hook: impl FnOnce(&Dataplane) -> Option<Hook>) -> Option<Harness> {
        if !can_load_bpf() {
            eprintln!("skipping: loading eBPF needs root");
            return None;
        }
        let mount = BpffsMount::new("fixtures").expect("bpffs");
        let pin = mount.path().join("agent");
        let mut dp = Dataplane::load(&pin).expect("load dataplane");
        dp.set_host_config(dataplane_common::maps::HostConfig {
            vxlan_ifindex: VXLAN_IFINDEX,
            ct_budget: 0,
        })
        .unwrap();
        let maps = match hook(&dp) {
            Some(h) => dp.map_set().unwrap().hooked(h),
            None => dp.map_set().unwrap(),
        };
        let rec = Reconciler::new(maps).unwrap();
        Some(Harness {
            _mount: mount,
            dp,
            rec,
            pin,
        })
    }

    fn policy(&mut self, res: &Resources) {
        // BPF_PROG_TEST_RUN runs on the loopback device of this namespace.
        let d = compile::compile(res, &|n| (n == "lo").then_some(1), 0).unwrap();
        self.rec.reconcile(&d).unwrap();
    }

    fn drops(&self) -> BTreeMap<&'static str, u64> {
        read_counters(&self.pin).unwrap().0.into_iter().collect()
    }

    fn check(&mut self, name: &str, prog: Prog, pkt: &[u8], expect: Expect) {
        let fd = self
            .dp
            .program_fd(match prog {
                Prog::FromVm => "from_vm",
                Prog::ToVm => "to_vm",
                Prog::FromOverlay => "from_overlay",
                Prog::FromUplink => "from_uplink",
                Prog::ToUplink => "to_uplink",
            })
            .unwrap();
        let before = self.drops();
        let run = testrun::run(fd, pkt, 1).unwrap_or_else(|e| panic!("{name}: test run failed: {e}"));
        let after = self.drops();
        match expect {
            Expect::Pass if matches!(prog, Prog::FromVm | Prog::FromUplink | Prog::FromOverlay) => {
                assert_eq!(
                    run.retval,
                    TC_ACT_REDIRECT,
                    "{name}: expected routed or answered; drops changed: {:?}",
                    changed(&before, &after)
                );
                assert!(changed(&before, &after).is_empty(), "{name}: a drop was counted");
            }
            Expect::Absorbed => {
                assert_eq!(run.retval, TC_ACT_SHOT, "{name}: expected absorbed");
                assert!(
                    changed(&before, &after).is_empty(),
                    "{name}: absorbed, yet counted as a drop"
                );
            }
            Expect::Pass | Expect::Host => {
                assert_eq!(
                    run.retval,
                    TC_ACT_OK,
                    "{name}: expected pass; drops changed: {:?}",
                    changed(&before, &after)
                );
                assert_eq!(run.packet, pkt, "{name}: output packet differs from input");
            }
            Expect::Drop(reason) => {
                assert_eq!(run.retval, TC_ACT_SHOT, "{name}: expected drop ({})", reason.name());
                assert_eq!(
                    changed(&before, &after),
                    vec![reason.name()],
                    "{name}: wrong drop reason"
                );
            }
        }
    }
}

fn changed(a: &BTreeMap<&'static str, u64>, b: &BTreeMap<&'static str, u64>) -> Vec<&'static str> {
    b.iter()
        .filter(|(k, v)| a.get(*k) != Some(*v))
        .map(|(k, _)| *k)
        .collect()
}

#[test]
fn fixture_table() {
    let Some(mut h) = Harness::new() else { return };
    h.policy(&share(base_rules(), &["10.0.0.7", "fd00::7"]));
    let other = [0x02, 0, 0, 0, 0, 0x99];
    let remote6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9];
    let ll = compile::link_local(VM_MAC).octets();
    use DropReason::*;
    use Expect::*;
    use Prog::*;
    let table: Vec<(&str, Prog, Vec<u8>, Expect)> = vec![
        ("arp from the VM with its own addresses", FromVm, arp(VM_MAC, VM4), Pass),
        ("arp probe from 0.0.0.0", FromVm, arp(VM_MAC, [0, 0, 0, 0]), Pass),
        (
            "arp claiming another IP",
            FromVm,
            arp(VM_MAC, [10, 0, 0, 2]),
            Drop(SpoofArp),
        ),
        ("arp claiming another MAC", FromVm, arp(other, VM4), Drop(SpoofArp)),
        (
            "tcp from a foreign MAC",
            FromVm,
            tcp4(other, VM4, [192, 0, 2, 1], 40000, 80, true),
            Drop(SpoofMac),
        ),
        (
            "tcp from a foreign IP",
            FromVm,
            tcp4(VM_MAC, [10, 0, 0, 2], [192, 0, 2, 1], 40000, 80, true),
            Drop(SpoofIp),
        ),
        (
            "tcp out, no egress rules: allowed",
            FromVm,
            tcp4(VM_MAC, VM4, [192, 0, 2, 1], 40000, 443, true),
            Pass,
        ),
        (
            "its reply through another door (the host's): no flow there, not a SYN",
            ToVm,
            tcp4(GW_MAC, [192, 0, 2, 1], VM4, 443, 40000, false),
            Drop(CtNotSyn),
        ),
        (
            "an ACK the VM sends with no flow: only a SYN opens one",
            FromVm,
            tcp4(VM_MAC, VM4, [192, 0, 2, 1], 40001, 443, false),
            Drop(CtNotSyn),
        ),
        ("tcp data offset below 5 words", ToVm, tcp_doff(4), Drop(BadIpHeader)),
        (
            "tcp data offset beyond the packet",
            ToVm,
            tcp_doff(15),
            Drop(BadIpHeader),
        ),
        ("udp length below 8", ToVm, udp_len(7), Drop(BadIpHeader)),
        ("udp length beyond the packet", ToVm, udp_len(200), Drop(BadIpHeader)),
        (
            "a DHCP offer from a VM that is no DHCP server",
            FromVm,
            dhcp_offer(),
            Drop(DhcpServer),
        ),
        (
            "a router advertisement towards the VM from the host",
            ToVm,
            nd(134, remote6, [0; 16], None),
            Drop(RaGuard),
        ),
        (
            "an MLD query towards the VM from the host",
            ToVm,
            nd(130, remote6, [0; 16], None),
            Drop(RaGuard),
        ),
        (
            "a neighbour solicitation towards the VM for another address",
            ToVm,
            nd(135, remote6, remote6, None),
            Drop(SpoofNd),
        ),
        (
            "a neighbour solicitation towards the VM for its own address",
            ToVm,
            nd(135, remote6, VM6, None),
            Host,
        ),
        (
            "tcp 22 in from anywhere",
            ToVm,
            tcp4(GW_MAC, [198, 51, 100, 1], VM4, 50000, 22, true),
            Pass,
        ),
        (
            "tcp 23 in: no rule",
            ToVm,
            tcp4(GW_MAC, [198, 51, 100, 1], VM4, 50000, 23, true),
            Drop(PolicyIngress),
        ),
        ("udp 53 from 10/8", ToVm, udp4([10, 9, 9, 9], VM4, 5353, 53), Pass),
        (
            "udp 53 from outside 10/8",
            ToVm,
            udp4([11, 9, 9, 9], VM4, 5353, 53),
            Drop(PolicyIngress),
        ),
        (
            "icmp echo request in",
            ToVm,
            ping4([198, 51, 100, 1], VM4, GW_MAC),
            Pass,
        ),
        (
            "tcp 5432 from a db member",
            ToVm,
            tcp4(GW_MAC, [10, 0, 0, 7], VM4, 40001, 5432, true),
            Pass,
        ),
        (
            "tcp 5432 from a non-member",
            ToVm,
            tcp4(GW_MAC, [10, 0, 0, 8], VM4, 40001, 5432, true),
            Drop(PolicyIngress),
        ),
        (
            "ipv6 tcp 8080 from fd00::/16",
            ToVm,
            tcp6(remote6, VM6, 40000, 8080, GW_MAC),
            Pass,
        ),
        (
            "ipv6 tcp 8081 outside the range",
            ToVm,
            tcp6(remote6, VM6, 40000, 8081, GW_MAC),
            Drop(PolicyIngress),
        ),
        (
            "ipv6 tcp 8080 behind two extension headers",
            ToVm,
            ipv6_ext_chain(2, 0, 8080),
            Pass,
        ),
        (
            "ipv6 tcp behind eight extension headers (the limit)",
            ToVm,
            ipv6_ext_chain(8, 60, 8080),
            Pass,
        ),
        (
            "ipv6 chain of nine extension headers",
            ToVm,
            ipv6_ext_chain(9, 60, 8080),
            Drop(ExtChainTooLong),
        ),
        (
            "ipv6 fragment header",
            ToVm,
            ipv6_ext_chain(1, 44, 8080),
            Drop(Fragment),
        ),
        ("ipv4 fragment", ToVm, frag4(), Drop(Fragment)),
        (
            "ipv4 total length beyond the frame",
            ToVm,
            tcp4(GW_MAC, [198, 51, 100, 1], VM4, 1, 22, true)[..40].to_vec(),
            Drop(BadIpHeader),
        ),
        ("tcp header cut short", ToVm, short_tcp(), Drop(Truncated)),
        ("ipv4 header length below 20", ToVm, bad_ihl(), Drop(BadIpHeader)),
        (
            "ipv6 payload length beyond the frame",
            ToVm,
            tcp6(remote6, VM6, 40000, 8080, GW_MAC)[..60].to_vec(),
            Drop(BadIpHeader),
        ),
        (
            "802.1Q tagged frame",
            FromVm,
            eth(VM_MAC, GW_MAC, 0x8100).into_iter().chain([0u8; 46]).collect(),
            Drop(UnsupportedEthertype),
        ),
        (
            "ipv6 from the VM's own address",
            FromVm,
            tcp6(VM6, remote6, 40000, 80, VM_MAC),
            Pass,
        ),
        (
            "ipv6 from a foreign address",
            FromVm,
            tcp6(remote6, VM6, 40000, 80, VM_MAC),
            Drop(SpoofIp),
        ),
        (
            "neighbour solicitation for DAD from ::",
            FromVm,
            nd(135, [0; 16], VM6, None),
            Absorbed,
        ),
        (
            "neighbour advertisement for its own address: absorbed, the host needs none",
            FromVm,
            nd(136, ll, VM6, Some(VM_MAC)),
            Absorbed,
        ),
        (
            "a DHCP offer from a port other than 67",
            FromVm,
            {
                let mut v = Vec::new();
                etherparse::PacketBuilder::ethernet2(VM_MAC, [0xff; 6])
                    .ipv4(VM4, [10, 0, 0, 9], 64)
                    .udp(4067, 68)
                    .write(&mut v, &[2u8; 240])
                    .unwrap();
                v
            },
            Drop(DhcpServer),
        ),
        (
            "neighbour advertisement for another address",
            FromVm,
            nd(136, ll, remote6, Some(VM_MAC)),
            Drop(SpoofNd),
        ),
        (
            "neighbour advertisement with a foreign MAC",
            FromVm,
            nd(136, ll, VM6, Some(other)),
            Drop(SpoofNd),
        ),
        (
            "router advertisement from a VM",
            FromVm,
            nd(134, ll, [0; 16], None),
            Drop(RaGuard),
        ),
    ];
    for (name, prog, pkt, expect) in &table {
        h.check(name, *prog, pkt, *expect);
    }
    eprintln!("{} fixtures passed", table.len());
}

/// An outside host of the internet zone.
const INTERNET: [u8; 4] = [203, 0, 113, 1];

/// A TCP packet with the given flags.
fn tcp_flags(smac: [u8; 6], src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut v = tcp4(smac, src, dst, sport, dport, true);
    v[14 + 20 + 13] = flags;
    v
}

fn stat(h: &Harness, name: &str) -> u64 {
    read_counters(&h.pin)
        .unwrap()
        .1
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v)
        .unwrap()
}

#[test]
fn rule_changes_revoke_established_flows_for_good() {
    let Some(mut h) = Harness::new() else { return };
    use pb::{Direction::*, EtherType::*, Protocol::*};
    let https = rule("https", Ingress, Ipv4, Tcp, (443, 443), "", "");
    let ssh = rule("ssh", Ingress, Ipv4, Tcp, (22, 22), "", "");
    h.policy(&zoned_share(vec![https, ssh.clone()]));
    let syn = tcp4(GW_MAC, INTERNET, VM4, 50000, 443, true);
    let syn_ack = tcp_flags(VM_MAC, VM4, INTERNET, 443, 50000, 0x12);
    let ack = tcp4(GW_MAC, INTERNET, VM4, 50000, 443, false);
    let data_out = tcp4(VM_MAC, VM4, INTERNET, 443, 50000, false);
    h.check("https syn in", Prog::FromUplink, &syn, Expect::Pass);
    h.check("syn-ack out", Prog::FromVm, &syn_ack, Expect::Pass);
    let promoted = stat(&h, "ct_promoted");
    h.check("ack in: the handshake completes", Prog::FromUplink, &ack, Expect::Pass);
    assert_eq!(stat(&h, "ct_promoted"), promoted + 1, "moved to the flow table");
    h.check("data out", Prog::FromVm, &data_out, Expect::Pass);
    // Remove the https rule: the established flow is judged again and cut,
    // from either side, and stays cut.
    h.policy(&zoned_share(vec![ssh]));
    use DropReason::{PolicyIngress, PolicyRevoked};
    h.check(
        "client after the rule is gone",
        Prog::FromUplink,
        &ack,
        Expect::Drop(PolicyRevoked),
    );
    h.check(
        "server after the rule is gone",
        Prog::FromVm,
        &data_out,
        Expect::Drop(PolicyRevoked),
    );
    h.check("client again", Prog::FromUplink, &ack, Expect::Drop(PolicyRevoked));
    h.check(
        "a SYN on the revoked tuple",
        Prog::FromUplink,
        &syn,
        Expect::Drop(PolicyRevoked),
    );
    h.check(
        "a new syn from another port",
        Prog::FromUplink,
        &tcp4(GW_MAC, INTERNET, VM4, 50002, 443, true),
        Expect::Drop(PolicyIngress),
    );
    // Allowing it again does not revive the revoked flow.
    let https = rule("https", Ingress, Ipv4, Tcp, (443, 443), "", "");
    let ssh2 = rule("ssh", Ingress, Ipv4, Tcp, (22, 22), "", "");
    h.policy(&zoned_share(vec![https, ssh2]));
    h.check(
        "client after the rule is back",
        Prog::FromUplink,
        &ack,
        Expect::Drop(PolicyRevoked),
    );
    h.check(
        "server after the rule is back",
        Prog::FromVm,
        &data_out,
        Expect::Drop(PolicyRevoked),
    );
    // The ACK that a stale flow entry no longer covers cannot open a flow.
    h.check(
        "an ACK of a flow never seen",
        Prog::FromUplink,
        &tcp4(GW_MAC, INTERNET, VM4, 50001, 22, false),
        Expect::Drop(DropReason::CtNotSyn),
    );
}

/// A packet of an established flow runs between every step of the
/// reconcile that removes the rule admitting it: at each step it is judged
/// by the old policy or the new one in full, never a mix, and once the new
/// one has refused it the flow stays refused.
#[test]
fn a_reconcile_judges_each_packet_by_one_policy_whole() {
    let dns = udp4([10, 9, 9, 9], VM4, 5353, 53);
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u32>::new()));
    let record = seen.clone();
    let packet = dns.clone();
    let Some(mut h) = Harness::with_hook(move |dp| {
        let fd = dp.program_fd("to_vm").unwrap();
        Some(std::sync::Arc::new(move || {
            let run = testrun::run(fd, &packet, 1).unwrap();
            record.lock().unwrap().push(run.retval);
        }))
    }) else {
        return;
    };
    h.policy(&share(base_rules(), &[]));
    h.check("dns query in", Prog::ToVm, &dns, Expect::Pass);
    h.check("the next one: established", Prog::ToVm, &dns, Expect::Pass);
    seen.lock().unwrap().clear();
    let rules: Vec<_> = base_rules().into_iter().filter(|r| r.id != "dns").collect();
    h.policy(&share(rules, &[]));
    let seen = seen.lock().unwrap().clone();
    eprintln!("verdicts between the reconcile's {} steps: {seen:?}", seen.len());
    assert!(seen.len() >= 4, "the reconcile took several steps: {seen:?}");
    if let Some(i) = seen.iter().position(|r| *r == TC_ACT_SHOT) {
        assert!(
            seen[i..].iter().all(|r| *r == TC_ACT_SHOT),
            "a refused flow came back during the reconcile: {seen:?}"
        );
    }
    assert_eq!(seen.last(), Some(&TC_ACT_SHOT), "refused once the new policy is in");
    h.check(
        "after the reconcile",
        Prog::ToVm,
        &dns,
        Expect::Drop(DropReason::PolicyRevoked),
    );
}

/// Ports whose groups compile to the same rules share one policy in the
/// maps; a port whose rules differ has its own.
#[test]
fn ports_with_the_same_rules_share_one_policy() {
    let Some(mut h) = Harness::new() else { return };
    h.policy(&share(base_rules(), &[]));
    let d = compile::compile(&share(base_rules(), &[]), &|n| (n == "lo").then_some(1), 0).unwrap();
    let one = d.sg_addr.len();
    // The same rules for three ports: the policy's entries once.
    let mut d3 = d.clone();
    for ifx in [2u32, 3] {
        let mut p = d.ports[&1];
        p.policy_id = ifx;
        d3.ports.insert(ifx, p);
        for (k, v) in &d.sg_addr {
            d3.sg_addr
                .insert(dataplane_common::maps::AddrKey { policy_id: ifx, ..*k }, v.clone());
        }
        for (k, v) in &d.plens {
            d3.plens
                .insert(dataplane_common::maps::PolicyDirKey { policy_id: ifx, ..*k }, *v);
        }
    }
    h.rec.reconcile(&d3).unwrap();
    let held = h.rec.sg_addr_entries();
    assert_eq!(held, one, "three ports, one policy's entries");
    let ids: std::collections::BTreeSet<u32> = h.rec.port_policies().into_values().collect();
    assert_eq!(ids.len(), 1, "one policy number for the three ports");
    assert_eq!(
        h.rec.reconcile(&d3).unwrap(),
        Default::default(),
        "running it again changes nothing"
    );
}

#[test]
fn egress_rules_close_the_default_open_egress() {
    let Some(mut h) = Harness::new() else { return };
    use pb::{Direction::*, EtherType::*, Protocol::*};
    let mut rules = base_rules();
    rules.push(rule("https-out", Egress, Ipv4, Tcp, (443, 443), "", ""));
    h.policy(&share(rules, &[]));
    h.check(
        "tcp 443 out allowed",
        Prog::FromVm,
        &tcp4(VM_MAC, VM4, [192, 0, 2, 1], 40000, 443, true),
        Expect::Pass,
    );
    h.check(
        "tcp 80 out refused",
        Prog::FromVm,
        &tcp4(VM_MAC, VM4, [192, 0, 2, 1], 40000, 80, true),
        Expect::Drop(DropReason::PolicyEgress),
    );
}

/// A stage missing from the program array drops what would run it, and
/// counts it: the pipeline fails closed.
#[test]
fn a_missing_stage_drops_and_counts() {
    let Some(mut h) = Harness::new() else { return };
    h.policy(&share(base_rules(), &[]));
    let ssh = tcp4(GW_MAC, [198, 51, 100, 1], VM4, 50000, 22, true);
    h.check("a new flow with every stage", Prog::ToVm, &ssh, Expect::Pass);
    let map = h.dp.ebpf_mut().map_mut("SDN_PIPE").expect("the pipeline's array");
    let mut pipe: aya::maps::ProgramArray<&mut aya::maps::MapData> = aya::maps::ProgramArray::try_from(map).unwrap();
    pipe.clear_index(&dataplane_common::stage::POLICY).unwrap();
    h.check(
        "a new flow without the policy stage",
        Prog::ToVm,
        &tcp4(GW_MAC, [198, 51, 100, 1], VM4, 50001, 22, true),
        Expect::Drop(DropReason::Pipeline),
    );
}

#[test]
fn unknown_ports_fail_closed() {
    let Some(mut h) = Harness::new() else { return };
    // No policy at all: the loopback device is not a port.
    h.check(
        "packet on a device with no port",
        Prog::ToVm,
        &tcp4(GW_MAC, [198, 51, 100, 1], VM4, 1, 22, true),
        Expect::Drop(DropReason::UnknownPort),
    );
}

#[test]
fn quarantine_cuts_everything_at_once_and_lifts() {
    let Some(mut h) = Harness::new() else { return };
    let mut res = share(base_rules(), &[]);
    h.policy(&res);
    let syn = tcp4(GW_MAC, [198, 51, 100, 1], VM4, 50000, 22, true);
    let ack = tcp4(GW_MAC, [198, 51, 100, 1], VM4, 50000, 22, false);
    let out = tcp4(VM_MAC, VM4, [192, 0, 2, 1], 40000, 443, true);
    h.check("ssh syn before", Prog::ToVm, &syn, Expect::Pass);
    let q = pb::QuarantineOnHost {
        quarantine: Some(pb::Quarantine {
            id: "q1".into(),
            target_id: "p1".into(),
            reason: "incident 42".into(),
            ..Default::default()
        }),
        port_ids: vec!["p1".into()],
    };
    res.insert(
        "quarantine/q1".into(),
        pb::Resource {
            name: "quarantine/q1".into(),
            version: "1".into(),
            kind: Some(pb::resource::Kind::Quarantine(q)),
        },
    );
    h.policy(&res);
    use DropReason::Quarantined;
    h.check(
        "established ssh, quarantined",
        Prog::ToVm,
        &ack,
        Expect::Drop(Quarantined),
    );
    h.check("new ssh, quarantined", Prog::ToVm, &syn, Expect::Drop(Quarantined));
    h.check("outbound, quarantined", Prog::FromVm, &out, Expect::Drop(Quarantined));
    h.check(
        "arp, quarantined",
        Prog::FromVm,
        &arp(VM_MAC, VM4),
        Expect::Drop(Quarantined),
    );
    res.remove("quarantine/q1");
    h.policy(&res);
    h.check("ssh after the lift", Prog::ToVm, &ack, Expect::Pass);
    h.check("outbound after the lift", Prog::FromVm, &out, Expect::Pass);
}

/// An ICMPv4 destination-unreachable from `router` to the VM, quoting a UDP
/// packet the VM sent to `dst:dport` from `sport`.
fn icmp4_unreachable(router: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let mut quoted = Vec::new();
    etherparse::PacketBuilder::ipv4(VM4, dst, 64)
        .udp(sport, dport)
        .write(&mut quoted, b"query")
        .unwrap();
    quoted.truncate(28);
    let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&quoted);
    let mut v = Vec::new();
    etherparse::PacketBuilder::ethernet2(GW_MAC, VM_MAC)
        .ipv4(router, VM4, 64)
        .write(&mut v, etherparse::IpNumber::ICMP, &icmp)
        .unwrap();
    v
}

#[test]
fn icmp_errors_for_tracked_flows_pass_as_related() {
    let Some(mut h) = Harness::new() else { return };
    h.policy(&zoned_share(vec![]));
    let mut dns = Vec::new();
    etherparse::PacketBuilder::ethernet2(VM_MAC, GW_MAC)
        .ipv4(VM4, INTERNET, 64)
        .udp(40000, 53)
        .write(&mut dns, b"query")
        .unwrap();
    h.check("udp query out (exchange path)", Prog::FromVm, &dns, Expect::Pass);
    let router = [203, 0, 113, 254];
    h.check(
        "port unreachable for that query, from a router, through the flow's uplink",
        Prog::FromUplink,
        &icmp4_unreachable(router, INTERNET, 40000, 53),
        Expect::Pass,
    );
    h.check(
        "unreachable quoting a flow that was never sent",
        Prog::FromUplink,
        &icmp4_unreachable(router, [203, 0, 113, 2], 40000, 53),
        Expect::Drop(DropReason::ZoneIsolation),
    );
    h.check(
        "unreachable quoting the flow, through another door (the host's)",
        Prog::ToVm,
        &icmp4_unreachable(router, INTERNET, 40000, 53),
        Expect::Drop(DropReason::PolicyIngress),
    );
}

/// An ICMPv4 message of `ty` (no checksum: the program does not check it).
fn icmp4(smac: [u8; 6], src: [u8; 4], dst: [u8; 4], ty: u8) -> Vec<u8> {
    let mut v = Vec::new();
    etherparse::PacketBuilder::ethernet2(smac, GW_MAC)
        .ipv4(src, dst, 64)
        .write(
            &mut v,
            etherparse::IpNumber::ICMP,
            &[ty, 0, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0],
        )
        .unwrap();
    v
}

/// A port unreachable the VM sends to `outer_dst`, quoting a UDP packet
/// `from:sport` sent to the VM's `dport`.
fn icmp4_error_from_vm(outer_dst: [u8; 4], from: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let mut quoted = Vec::new();
    etherparse::PacketBuilder::ipv4(from, VM4, 64)
        .udp(sport, dport)
        .write(&mut quoted, b"answer")
        .unwrap();
    quoted.truncate(28);
    let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&quoted);
    let mut v = Vec::new();
    etherparse::PacketBuilder::ethernet2(VM_MAC, GW_MAC)
        .ipv4(VM4, outer_dst, 64)
        .write(&mut v, etherparse::IpNumber::ICMP, &icmp)
        .unwrap();
    v
}

/// A change to the zones' exchange paths or a border firewall judges the
/// established flows across the uplink again: a flow they no longer admit
/// is cut, from either side, and stays cut.
#[test]
fn established_flows_across_an_uplink_follow_exchange_and_border_changes() {
    let Some(mut h) = Harness::new() else { return };
    use pb::{Direction::*, EtherType::*, Protocol::*};
    let https = || vec![rule("https", Ingress, Ipv4, Tcp, (443, 443), "", "")];
    let syn = tcp4(GW_MAC, INTERNET, VM4, 50000, 443, true);
    let syn_ack = tcp_flags(VM_MAC, VM4, INTERNET, 443, 50000, 0x12);
    let ack = tcp4(GW_MAC, INTERNET, VM4, 50000, 443, false);
    let data_out = tcp4(VM_MAC, VM4, INTERNET, 443, 50000, false);
    let open = |h: &mut Harness, sport: u16| {
        let syn = tcp4(GW_MAC, INTERNET, VM4, sport, 443, true);
        let syn_ack = tcp_flags(VM_MAC, VM4, INTERNET, 443, sport, 0x12);
        let ack = tcp4(GW_MAC, INTERNET, VM4, sport, 443, false);
        h.check("syn in", Prog::FromUplink, &syn, Expect::Pass);
        h.check("syn-ack out", Prog::FromVm, &syn_ack, Expect::Pass);
        h.check("ack in", Prog::FromUplink, &ack, Expect::Pass);
    };
    h.policy(&zoned_share(https()));
    h.check("syn in", Prog::FromUplink, &syn, Expect::Pass);
    h.check("syn-ack out", Prog::FromVm, &syn_ack, Expect::Pass);
    h.check("ack in", Prog::FromUplink, &ack, Expect::Pass);
    // The exchange path goes: the flow is cut both ways.
    let mut share = zoned_share(https());
    share.remove("exchange/in");
    h.policy(&share);
    use DropReason::*;
    h.check(
        "client after the path is gone",
        Prog::FromUplink,
        &ack,
        Expect::Drop(ZoneIsolation),
    );
    h.check(
        "server after the path is gone",
        Prog::FromVm,
        &data_out,
        Expect::Drop(PolicyRevoked),
    );
    h.policy(&zoned_share(https()));
    h.check(
        "client once the path is back",
        Prog::FromUplink,
        &ack,
        Expect::Drop(PolicyRevoked),
    );
    // A border firewall that now denies: cut too.
    open(&mut h, 50001);
    let mut share = zoned_share(https());
    if let Some(pb::resource::Kind::FirewallPolicy(f)) = &mut share.get_mut("firewall/allow-all").unwrap().kind {
        f.default_action = pb::Action::Deny as i32;
    }
    h.policy(&share);
    h.check(
        "client after the border denies",
        Prog::FromUplink,
        &tcp4(GW_MAC, INTERNET, VM4, 50001, 443, false),
        Expect::Drop(BorderFirewall),
    );
    h.check(
        "server after the border denies",
        Prog::FromVm,
        &tcp4(VM_MAC, VM4, INTERNET, 443, 50001, false),
        Expect::Drop(PolicyRevoked),
    );
    // A change that still admits the flow leaves it alone.
    h.policy(&zoned_share(https()));
    open(&mut h, 50002);
    let mut share = zoned_share(https());
    if let Some(pb::resource::Kind::FirewallPolicy(f)) = &mut share.get_mut("firewall/allow-all").unwrap().kind {
        f.name = "renamed, still allowing everything".into();
        f.rules.push(pb::FirewallRule {
            id: "no-telnet".into(),
            priority: 10,
            action: pb::Action::Deny as i32,
            direction: pb::Direction::Ingress as i32,
            ether_type: pb::EtherType::Ipv4 as i32,
            protocol: pb::Protocol::Tcp as i32,
            port_min: 23,
            port_max: 23,
            ..Default::default()
        });
    }
    h.policy(&share);
    h.check(
        "an admitted flow after an unrelated rule",
        Prog::FromUplink,
        &tcp4(GW_MAC, INTERNET, VM4, 50002, 443, false),
        Expect::Pass,
    );
}

/// ICMP state is kept per message type: a type the VM sent opens no other.
#[test]
fn one_icmp_type_opens_no_other() {
    let Some(mut h) = Harness::new() else { return };
    h.policy(&zoned_share(vec![]));
    h.check(
        "timestamp request out (exchange path for type 13)",
        Prog::FromVm,
        &icmp4(VM_MAC, VM4, INTERNET, 13),
        Expect::Pass,
    );
    h.check(
        "a redirect back from that host: not part of it",
        Prog::FromUplink,
        &icmp4(GW_MAC, INTERNET, VM4, 5),
        Expect::Drop(DropReason::ZoneIsolation),
    );
    h.check(
        "a router advertisement back from that host",
        Prog::FromUplink,
        &icmp4(GW_MAC, INTERNET, VM4, 9),
        Expect::Drop(DropReason::ZoneIsolation),
    );
}

/// A VM reports errors only to the remote end of a flow it has: an error
/// to anyone else is judged by its egress rules like any new packet.
#[test]
fn a_vm_reports_errors_only_to_its_flows_remote_end() {
    let Some(mut h) = Harness::new() else { return };
    use pb::{Direction::*, EtherType::*, Protocol::*};
    let mut rules = base_rules();
    rules.push(rule("dns-out", Egress, Ipv4, Udp, (53, 53), "", ""));
    h.policy(&share(rules, &[]));
    let resolver = [192, 0, 2, 53];
    let mut query = Vec::new();
    etherparse::PacketBuilder::ethernet2(VM_MAC, GW_MAC)
        .ipv4(VM4, resolver, 64)
        .udp(40000, 53)
        .write(&mut query, b"query")
        .unwrap();
    h.check("dns query out (egress rule)", Prog::FromVm, &query, Expect::Pass);
    h.check(
        "port unreachable to the resolver, quoting its answer",
        Prog::FromVm,
        &icmp4_error_from_vm(resolver, resolver, 53, 40000),
        Expect::Pass,
    );
    h.check(
        "the same quote sent to a third host, past the egress rules",
        Prog::FromVm,
        &icmp4_error_from_vm([192, 0, 2, 1], resolver, 53, 40000),
        Expect::Drop(DropReason::PolicyEgress),
    );
}

/// A port holds at most its budget of flows; a new flow beyond it is
/// dropped and counted, and the flows it holds go on. Only answered flows
/// count: a flood of flows nobody answers cannot take a port's budget.
#[test]
fn a_port_holds_at_most_its_budget_of_flows() {
    let Some(mut h) = Harness::new() else { return };
    h.dp.set_host_config(dataplane_common::maps::HostConfig {
        vxlan_ifindex: VXLAN_IFINDEX,
        ct_budget: 2,
    })
    .unwrap();
    h.policy(&zoned_share(vec![]));
    let query = |sport: u16| {
        let mut v = Vec::new();
        etherparse::PacketBuilder::ethernet2(VM_MAC, GW_MAC)
            .ipv4(VM4, INTERNET, 64)
            .udp(sport, 53)
            .write(&mut v, b"q")
            .unwrap();
        v
    };
    let answer = |sport: u16| {
        let mut v = Vec::new();
        etherparse::PacketBuilder::ethernet2(GW_MAC, VM_MAC)
            .ipv4(INTERNET, VM4, 64)
            .udp(53, sport)
            .write(&mut v, b"a")
            .unwrap();
        v
    };
    // Many queries nobody answers: none counts.
    for sport in 2000..2010 {
        h.check("an unanswered query", Prog::FromVm, &query(sport), Expect::Pass);
    }
    use DropReason::CtBudget;
    for sport in [1001, 1002] {
        h.check("a query", Prog::FromVm, &query(sport), Expect::Pass);
        h.check(
            "its answer: the flow counts",
            Prog::FromUplink,
            &answer(sport),
            Expect::Pass,
        );
    }
    h.check("a third query", Prog::FromVm, &query(1003), Expect::Pass);
    h.check(
        "its answer: over budget",
        Prog::FromUplink,
        &answer(1003),
        Expect::Drop(CtBudget),
    );
    h.check("the first flow goes on", Prog::FromVm, &query(1001), Expect::Pass);
    // The collector recounts: nothing has timed out, the count stays.
    let (removed, remaining) = h.dp.collect_conntrack().unwrap();
    assert_eq!((removed, remaining), (0, 2));
    h.check(
        "still over budget",
        Prog::FromUplink,
        &answer(1003),
        Expect::Drop(CtBudget),
    );
}

/// What no VM takes from outside its host: router messages, DHCP server
/// messages, link-local or multicast sources, from an uplink.
#[test]
fn the_outside_sends_no_router_messages_dhcp_or_link_local_sources() {
    let Some(mut h) = Harness::new() else { return };
    use pb::{Direction::*, EtherType::*, Protocol::*};
    let mut share = zoned_share(vec![rule("any", Ingress, Ipv4, Any, (0, 0), "", "")]);
    if let Some(pb::resource::Kind::SecurityGroup(g)) = &mut share.get_mut("sg/web").unwrap().kind {
        g.rules.push(rule("any6", Ingress, Ipv6, Any, (0, 0), "", ""));
    }
    h.policy(&share);
    let ra = {
        let mut v = nd(
            134,
            [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 6, 0x66],
            [0; 16],
            None,
        );
        v[0..6].copy_from_slice(&VM_MAC);
        v[38..54].copy_from_slice(&VM6);
        v
    };
    use DropReason::*;
    h.check(
        "a router advertisement to the VM",
        Prog::FromUplink,
        &ra,
        Expect::Drop(RaGuard),
    );
    let mut offer = Vec::new();
    etherparse::PacketBuilder::ethernet2(GW_MAC, VM_MAC)
        .ipv4(INTERNET, VM4, 64)
        .udp(67, 68)
        .write(&mut offer, &[2u8; 240])
        .unwrap();
    h.check(
        "a DHCP offer to the VM",
        Prog::FromUplink,
        &offer,
        Expect::Drop(DhcpServer),
    );
    for (what, src) in [
        ("a link-local source", [169, 254, 1, 1]),
        ("a multicast source", [224, 0, 0, 5]),
        ("a loopback source", [127, 0, 0, 1]),
    ] {
        h.check(
            what,
            Prog::FromUplink,
            &tcp4(GW_MAC, src, VM4, 40000, 443, true),
            Expect::Drop(SpoofUplink),
        );
    }
    h.check(
        "an ordinary source still passes",
        Prog::FromUplink,
        &tcp4(GW_MAC, INTERNET, VM4, 40000, 443, true),
        Expect::Pass,
    );
}

/// RFC 1071 checksum of ICMPv6 over the pseudo-header, computed here
/// independently of the program.
fn icmpv6_checksum_ok(ip6: &[u8]) -> bool {
    let payload = &ip6[40..];
    let mut sum: u32 = 0;
    let mut add = |b: &[u8]| {
        for c in b.chunks(2) {
            sum += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
        }
    };
    add(&ip6[8..40]);
    add(&(payload.len() as u32).to_be_bytes());
    add(&[0, 0, 0, 58]);
    add(payload);
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum == 0xffff
}

#[test]
fn overlay_answers_neighbours_and_routes() {
    let Some(mut h) = Harness::new() else { return };
    h.policy(&share(base_rules(), &[]));
    let gw_mac = dataplane_common::maps::GATEWAY_MAC;
    let fd = h.dp.program_fd("from_vm").unwrap();

    // ARP for the gateway: the request comes back as the reply.
    let run = testrun::run(fd, &arp(VM_MAC, VM4), 1).unwrap();
    assert_eq!(run.retval, TC_ACT_REDIRECT);
    let r = &run.packet;
    assert_eq!(&r[0..6], &VM_MAC, "to the asker");
    assert_eq!(&r[6..12], &gw_mac, "from the gateway MAC");
    assert_eq!(&r[20..22], &[0, 2], "an ARP reply");
    assert_eq!(&r[22..28], &gw_mac, "sender hardware address");
    assert_eq!(&r[28..32], &GATEWAY4, "sender protocol address: the gateway");
    assert_eq!(&r[32..38], &VM_MAC);
    assert_eq!(&r[38..42], &VM4);
    // ARP for an address nobody in the VPC has.
    let mut unknown = arp(VM_MAC, VM4);
    unknown[38..42].copy_from_slice(&[10, 0, 0, 77]);
    h.check(
        "arp for nobody",
        Prog::FromVm,
        &unknown,
        Expect::Drop(DropReason::UnknownNeighbour),
    );

    // Neighbour solicitation for the IPv6 gateway: answered with a valid
    // advertisement carrying the gateway MAC.
    let gw6: [u8; 16] = "fd00::fe".parse::<std::net::Ipv6Addr>().unwrap().octets();
    let run = testrun::run(fd, &nd(135, VM6, gw6, Some(VM_MAC)), 1).unwrap();
    assert_eq!(run.retval, TC_ACT_REDIRECT);
    let na = etherparse::SlicedPacket::from_ethernet(&run.packet).expect("a well-formed advertisement");
    let ip6 = &run.packet[14..];
    assert_eq!(&run.packet[0..6], &VM_MAC);
    assert_eq!(&run.packet[6..12], &gw_mac);
    assert_eq!(&ip6[8..24], &gw6, "from the gateway address");
    assert_eq!(&ip6[24..40], &VM6, "to the soliciting address");
    assert_eq!(ip6[7], 255, "hop limit 255");
    assert_eq!(ip6[40], 136, "a neighbour advertisement");
    assert_eq!(ip6[44], 0xe0, "router, solicited, override");
    assert_eq!(&ip6[48..64], &gw6, "target");
    assert_eq!(&ip6[64..66], &[2, 1], "target link-layer address option");
    assert_eq!(&ip6[66..72], &gw_mac);
    assert!(icmpv6_checksum_ok(ip6), "ICMPv6 checksum");
    assert!(na.net.is_some());
    let mut nobody6 = gw6;
    nobody6[15] = 0x77;
    h.check(
        "neighbour solicitation for nobody",
        Prog::FromVm,
        &nd(135, VM6, nobody6, Some(VM_MAC)),
        Expect::Drop(DropReason::UnknownNeighbour),
    );

    // A peer on another host: rewritten for it and sent to the tunnel.
    let run = testrun::run(fd, &tcp4(VM_MAC, VM4, [192, 0, 2, 1], 40000, 443, true), 1).unwrap();
    assert_eq!(run.retval, TC_ACT_REDIRECT);
    assert_eq!(&run.packet[0..6], &[0x02, 0, 0, 0, 0, 0x77], "to the peer's MAC");
    assert_eq!(&run.packet[6..12], &gw_mac, "from the gateway MAC");
    // Outside the VPC: no route.
    h.check(
        "tcp to an address outside the VPC",
        Prog::FromVm,
        &tcp4(VM_MAC, VM4, [203, 0, 113, 9], 40000, 443, true),
        Expect::Drop(DropReason::NoRoute),
    );
    h.check(
        "the gateway itself is not a destination",
        Prog::FromVm,
        &tcp4(VM_MAC, VM4, GATEWAY4, 40000, 443, true),
        Expect::Drop(DropReason::NoRoute),
    );
    // The overlay program refuses packets without tunnel metadata.
    h.check(
        "overlay packet without tunnel metadata",
        Prog::FromOverlay,
        &tcp4(GW_MAC, [192, 0, 2, 1], VM4, 443, 40000, false),
        Expect::Drop(DropReason::OverlaySpoof),
    );
}

/// The share with zones: the port's VPC in the extranet (10/8), the
/// internet (everything else) on this test device as its uplink, one
/// exchange path (internet -> 10.0.0.1 TCP 443), and a border firewall that
/// allows everything: the zone guard alone must hold.
/// The VPC in the extranet zone, the internet zone's uplink on the
/// loopback device, an exchange path in for https and one out for DNS, and
/// a border firewall that allows everything: the zone guard alone decides.
fn zoned_share(rules: Vec<pb::SecurityGroupRule>) -> Resources {
    let mut r = share(rules, &[]);
    if let Some(pb::resource::Kind::VpcNetwork(n)) = &mut r.get_mut("vpc/v").unwrap().kind {
        n.zone_id = "ext".into();
        n.border_policy_id = "allow-all".into();
    }
    let mut put = |name: &str, kind: pb::resource::Kind| {
        r.insert(
            name.into(),
            pb::Resource {
                name: name.into(),
                version: "1".into(),
                kind: Some(kind),
            },
        );
    };
    put(
        "zone/ext",
        pb::resource::Kind::Zone(pb::Zone {
            id: "ext".into(),
            name: "ext".into(),
            prefixes: vec!["10.0.0.0/8".into(), "192.0.2.0/24".into()],
            uplink_device: "not-here".into(),
            ..Default::default()
        }),
    );
    put(
        "zone/net",
        pb::resource::Kind::Zone(pb::Zone {
            id: "net".into(),
            name: "net".into(),
            prefixes: vec!["0.0.0.0/0".into()],
            uplink_device: "lo".into(),
            // Another tenant's VPC in the internet zone, with no port here.
            vpc_subnets: vec!["198.18.0.0/24".into()],
        }),
    );
    put(
        "exchange/in",
        pb::resource::Kind::ExchangePath(pb::ExchangePath {
            id: "in".into(),
            from_zone: "net".into(),
            to_zone: "ext".into(),
            source_cidr: "0.0.0.0/0".into(),
            destination_cidr: "10.0.0.1/32".into(),
            protocol: pb::Protocol::Tcp as i32,
            port_min: 443,
            port_max: 443,
            ..Default::default()
        }),
    );
    put(
        "exchange/timestamp-out",
        pb::resource::Kind::ExchangePath(pb::ExchangePath {
            id: "timestamp-out".into(),
            from_zone: "ext".into(),
            to_zone: "net".into(),
            source_cidr: "10.0.0.0/8".into(),
            destination_cidr: "203.0.113.0/24".into(),
            protocol: pb::Protocol::Icmp as i32,
            port_min: 13,
            port_max: 13,
            ..Default::default()
        }),
    );
    put(
        "exchange/dns-out",
        pb::resource::Kind::ExchangePath(pb::ExchangePath {
            id: "dns-out".into(),
            from_zone: "ext".into(),
            to_zone: "net".into(),
            source_cidr: "10.0.0.0/8".into(),
            destination_cidr: "203.0.113.0/24".into(),
            protocol: pb::Protocol::Udp as i32,
            port_min: 53,
            port_max: 53,
            ..Default::default()
        }),
    );
    put(
        "firewall/allow-all",
        pb::resource::Kind::FirewallPolicy(pb::FirewallPolicy {
            id: "allow-all".into(),
            name: "a policy that lets everything through".into(),
            default_action: pb::Action::Allow as i32,
            rules: vec![],
        }),
    );
    r
}

#[test]
fn the_zone_guard_holds_even_when_everything_else_allows() {
    let Some(mut h) = Harness::new() else { return };
    let any = rule(
        "any",
        pb::Direction::Ingress,
        pb::EtherType::Ipv4,
        pb::Protocol::Any,
        (0, 0),
        "",
        "",
    );
    h.policy(&zoned_share(vec![any]));
    let fd_in = h.dp.program_fd("from_uplink").unwrap();
    use DropReason::*;
    // From the internet uplink to the extranet VM: only the exchange port.
    h.check(
        "internet -> extranet VM, ssh",
        Prog::FromUplink,
        &tcp4(GW_MAC, INTERNET, VM4, 40000, 22, true),
        Expect::Drop(ZoneIsolation),
    );
    let run = testrun::run(fd_in, &tcp4(GW_MAC, INTERNET, VM4, 40000, 443, true), 1).unwrap();
    assert_eq!(
        run.retval, TC_ACT_REDIRECT,
        "the exchange path admits 443 and delivers to the port"
    );
    assert_eq!(&run.packet[0..6], &[0x02, 0, 0, 0, 0, 0x77], "to the port's MAC");
    // Sources that cannot come from the internet's network.
    h.check(
        "an extranet source on the internet uplink",
        Prog::FromUplink,
        &tcp4(GW_MAC, [10, 9, 9, 9], VM4, 40000, 443, true),
        Expect::Drop(SpoofUplink),
    );
    h.check(
        "an address of a VPC in the same zone with no port here",
        Prog::FromUplink,
        &tcp4(GW_MAC, [198, 18, 0, 77], VM4, 40000, 443, true),
        Expect::Drop(SpoofUplink),
    );
    h.check(
        "a VPC's own address as the source on the uplink",
        Prog::FromUplink,
        &tcp4(GW_MAC, [198, 51, 100, 1], VM4, 40000, 443, true),
        Expect::Drop(SpoofUplink),
    );
    // The host itself takes nothing from the uplink but what it needs.
    let mut vxlan = Vec::new();
    etherparse::PacketBuilder::ethernet2(GW_MAC, VM_MAC)
        .ipv4(INTERNET, [203, 0, 113, 50], 64)
        .udp(40000, 4789)
        .write(&mut vxlan, &[0x08, 0, 0, 0, 0, 0, 7, 0])
        .unwrap();
    h.check(
        "a tunnel packet for the host",
        Prog::FromUplink,
        &vxlan,
        Expect::Drop(UplinkToHost),
    );
    h.check(
        "ARP on the uplink, for the host",
        Prog::FromUplink,
        &arp(GW_MAC, INTERNET),
        Expect::Host,
    );
    // The VM opening a flow into the internet: no path that way.
    h.check(
        "extranet VM -> internet",
        Prog::FromVm,
        &tcp4(VM_MAC, VM4, INTERNET, 40000, 80, true),
        Expect::Drop(ZoneIsolation),
    );
    // A VM's address leaves an uplink only as the pipeline sent it.
    h.check(
        "a VM's address on the uplink, not from the pipeline",
        Prog::ToUplink,
        &tcp4(VM_MAC, VM4, INTERNET, 40000, 443, true),
        Expect::Drop(Unjudged),
    );
    // Traffic of the host itself on the uplink is not the guard's business.
    h.check(
        "host traffic on the uplink",
        Prog::ToUplink,
        &tcp4(GW_MAC, [203, 0, 113, 9], INTERNET, 40000, 80, true),
        Expect::Pass,
    );
}

/// A small deterministic generator (xorshift64*), so a failing campaign
/// can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One random mutation of a packet: flipped bytes in the headers, a length
/// or type field set to an edge value, a truncation, or bytes appended.
fn mutate(rng: &mut Rng, base: &[u8]) -> Vec<u8> {
    let mut p = base.to_vec();
    for _ in 0..1 + rng.below(3) {
        let head = p.len().min(96);
        match rng.below(6) {
            0 | 1 if head > 0 => {
                let i = rng.below(head);
                p[i] ^= 1 << rng.below(8);
            }
            2 if head > 0 => {
                let i = rng.below(head);
                p[i] = [0x00, 0xff, 0x01, 0x7f, 0x80, 0x05, 0x45, 0x3c][rng.below(8)];
            }
            3 if head > 1 => {
                let i = rng.below(head - 1);
                let v = [0u16, 1, 7, 8, 19, 20, 40, 0xffff, p.len() as u16, (p.len() - 14) as u16][rng.below(10)];
                p[i..i + 2].copy_from_slice(&v.to_be_bytes());
            }
            4 => {
                // The kernel's test run refuses a frame shorter than its
                // Ethernet header, or than the IP header its type names:
                // cut after those.
                let min = match p.get(12..14) {
                    Some([0x08, 0x00]) => 34,
                    Some([0x86, 0xdd]) => 54,
                    _ => 14,
                }
                .min(p.len());
                let n = min + rng.below(p.len() - min + 1);
                p.truncate(n);
            }
            _ => {
                for _ in 0..rng.below(24) {
                    p.push(rng.next() as u8);
                }
            }
        }
    }
    p
}

/// What may pass, by a real decoder (etherparse): the frame decodes; an IP
/// packet is not a fragment; TCP, UDP, ICMP and ICMPv6 headers decode
/// whole; another protocol only where the policy admits every protocol
/// (`other_allowed`: a port whose egress is open). `Err` says why not.
fn may_pass(p: &[u8], other_allowed: bool) -> Result<(), String> {
    use etherparse::{IpNumber, NetSlice, SlicedPacket, TransportSlice};
    let s = SlicedPacket::from_ethernet(p).map_err(|e| format!("{e}"))?;
    let proto = match &s.net {
        Some(NetSlice::Arp(_)) => return Ok(()),
        Some(NetSlice::Ipv4(ip)) if ip.is_payload_fragmented() => return Err("fragment".into()),
        Some(NetSlice::Ipv6(ip)) if ip.is_payload_fragmented() => return Err("fragment".into()),
        Some(NetSlice::Ipv4(ip)) => ip.payload().ip_number,
        Some(NetSlice::Ipv6(ip)) => ip.payload().ip_number,
        None => return Err("no network layer".into()),
    };
    let whole = match proto {
        IpNumber::TCP => matches!(s.transport, Some(TransportSlice::Tcp(_))),
        IpNumber::UDP => matches!(s.transport, Some(TransportSlice::Udp(_))),
        IpNumber::ICMP => matches!(s.transport, Some(TransportSlice::Icmpv4(_))),
        IpNumber::IPV6_ICMP => matches!(s.transport, Some(TransportSlice::Icmpv6(_))),
        _ if other_allowed => return Ok(()),
        other => return Err(format!("protocol {} that no rule admits", other.0)),
    };
    if whole {
        Ok(())
    } else {
        Err(format!("protocol {} whose header does not decode", proto.0))
    }
}

/// The mutation campaign: over a million randomly mutated packets
/// (truncations, length fields, flags, types, extension chains) through
/// every entry program that can deliver in a test run, each checked against
/// a real decoder: a packet a program lets through must decode as a whole,
/// and every packet a program drops is counted by reason.
#[test]
fn a_million_mutated_packets_pass_only_when_whole() {
    let Some(mut h) = Harness::new() else { return };
    let total: usize = std::env::var("MUTATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_050_000);
    let mut rng = Rng(0x5d0e_0001_dead_beef);
    let remote6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9];
    let mut report = Vec::new();
    let mut differences = Vec::new();
    let phases: [(&str, Prog, Vec<Vec<u8>>, usize); 3] = [
        (
            "to_vm",
            Prog::ToVm,
            vec![
                tcp4(GW_MAC, [198, 51, 100, 1], VM4, 50000, 22, true),
                udp4([10, 9, 9, 9], VM4, 5353, 53),
                ping4([198, 51, 100, 1], VM4, GW_MAC),
                tcp6(remote6, VM6, 40000, 8080, GW_MAC),
                ipv6_ext_chain(2, 0, 8080),
                ipv6_ext_chain(8, 60, 8080),
                nd(135, remote6, VM6, None),
            ],
            total * 2 / 5,
        ),
        (
            "from_vm",
            Prog::FromVm,
            vec![
                tcp4(VM_MAC, VM4, [192, 0, 2, 1], 40000, 443, true),
                tcp6(VM6, remote6, 40000, 80, VM_MAC),
                ping4(VM4, [192, 0, 2, 1], VM_MAC),
                arp(VM_MAC, VM4),
            ],
            total * 3 / 10,
        ),
        (
            "from_uplink",
            Prog::FromUplink,
            vec![
                tcp4(GW_MAC, INTERNET, VM4, 40000, 443, true),
                tcp_flags(GW_MAC, [203, 0, 113, 7], VM4, 40001, 443, 0x02),
            ],
            total - total * 2 / 5 - total * 3 / 10,
        ),
    ];
    for (name, prog, corpus, n) in phases {
        if prog == Prog::FromUplink {
            use pb::{Direction::*, EtherType::*, Protocol::*};
            h.policy(&zoned_share(vec![rule(
                "https",
                Ingress,
                Ipv4,
                Tcp,
                (443, 443),
                "",
                "",
            )]));
        } else {
            h.policy(&share(base_rules(), &["10.0.0.7", "fd00::7"]));
        }
        let fd = h.dp.program_fd(name).unwrap();
        // Every packet of the corpus passes as it is.
        for p in &corpus {
            let r = testrun::run(fd, p, 1).unwrap();
            assert_ne!(r.retval, TC_ACT_SHOT, "{name}: a corpus packet is dropped");
        }
        let drops_before: u64 = h.drops().values().sum();
        let (mut passed, mut dropped, mut refused) = (0u64, 0u64, 0u64);
        for _ in 0..n {
            let base = &corpus[rng.below(corpus.len())];
            let p = mutate(&mut rng, base);
            let r = match testrun::run(fd, &p, 1) {
                Ok(r) => r,
                // The kernel's test run refuses some frames outright (an
                // IPv4 or IPv6 type with less than that header after it):
                // counted apart, never run.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    if refused < 6 && std::env::var("SHOW_REFUSED").is_ok() {
                        eprintln!("refused: {p:02x?}");
                    }
                    refused += 1;
                    continue;
                }
                Err(e) => panic!("{name}: test run of {p:02x?}: {e}"),
            };
            if r.retval == TC_ACT_SHOT {
                dropped += 1;
                continue;
            }
            passed += 1;
            // From the VM, egress is open (no egress rules): any protocol.
            if let Err(why) = may_pass(&p, prog == Prog::FromVm) {
                if differences.len() < 20 {
                    differences.push(format!("{name}: passed, the decoder says {why}: {p:02x?}"));
                }
            }
        }
        let counted: u64 = h.drops().values().sum::<u64>() - drops_before;
        // From a VM, ARP replies and duplicate-address probes are absorbed
        // (dropped, not counted): only the other entries must match exactly.
        if prog != Prog::FromVm {
            assert_eq!(counted, dropped, "{name}: every drop is counted by reason");
        }
        assert!(counted <= dropped, "{name}: more drops counted than packets dropped");
        let absorbed = dropped - counted;
        report.push(format!(
            "{name}: {n} mutated packets, {passed} passed (each decoded whole), {dropped} dropped ({counted} counted by reason, {absorbed} absorbed), {refused} refused by the kernel's test run"
        ));
        eprintln!("{}", report.last().unwrap());
        assert!(refused * 10 < n as u64, "{name}: most packets never ran");
    }
    assert!(
        differences.is_empty(),
        "differences from the decoder:\n{}",
        differences.join("\n")
    );
}
