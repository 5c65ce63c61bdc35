//! Types shared by the eBPF programs and the agent.
//!
//! Every map key, map value and counter index that crosses the kernel boundary
//! is defined here once, `#[repr(C)]` with explicit padding, and its size is
//! asserted at compile time so both sides agree byte for byte. Multi-byte
//! integers are in host byte order unless the field name ends in `_be`.
//! Addresses are stored as 16 bytes: an IPv4 address occupies the first four
//! bytes in network order and the rest is zero.
#![no_std]

pub mod lb;
pub mod maps;

/// Address family tag used in keys: IPv4.
pub const FAMILY_V4: u8 = 4;
/// Address family tag used in keys: IPv6.
pub const FAMILY_V6: u8 = 6;

/// Direction of a security-group rule, seen from the VM.
pub const DIR_INGRESS: u8 = 0;
/// Traffic the VM sends.
pub const DIR_EGRESS: u8 = 1;

/// IP protocol numbers the dataplane interprets.
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;

/// Why a packet was dropped. Index into the `DROPS` per-CPU counter array.
///
/// One enum for every drop, so every drop is counted by reason.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// The interface has no port configuration (fail closed).
    UnknownPort = 0,
    /// A header was cut short.
    Truncated = 1,
    /// An Ethernet type the port does not carry (VLAN tags, LLDP, ...).
    UnsupportedEthertype = 2,
    /// Malformed IP header (bad version, IHL, length).
    BadIpHeader = 3,
    /// IPv4 or IPv6 fragment: ports cannot be checked, so fragments are refused.
    Fragment = 4,
    /// IPv6 extension-header chain longer than the parser follows.
    ExtChainTooLong = 5,
    /// Source MAC is not the port's MAC.
    SpoofMac = 6,
    /// Source IP is not one of the port's addresses.
    SpoofIp = 7,
    /// ARP sender hardware or protocol address is not the port's.
    SpoofArp = 8,
    /// Neighbour-discovery message claims an address or MAC that is not the port's.
    SpoofNd = 9,
    /// Router advertisement, redirect, MLD query or neighbour discovery
    /// where only the distributed gateway may send it: from a VM, or from
    /// outside towards a VM.
    RaGuard = 10,
    /// No security-group rule allows this inbound packet.
    PolicyIngress = 11,
    /// No security-group rule allows this outbound packet.
    PolicyEgress = 12,
    /// An established flow that the current rules no longer allow.
    PolicyRevoked = 13,
    /// Malformed ARP packet.
    BadArp = 14,
    /// The port is quarantined: nothing goes in or out.
    Quarantined = 15,
    /// The destination is no endpoint of the VPC and nothing else routes it.
    NoRoute = 16,
    /// ARP or neighbour solicitation for an address no endpoint of the VPC has.
    UnknownNeighbour = 17,
    /// An overlay packet whose VNI and inner source are not an endpoint on
    /// the sending host: a forged VNI, a spoofed source, or an unknown host.
    OverlaySpoof = 18,
    /// An overlay packet for an address that is not a port on this host.
    OverlayUnknownDst = 19,
    /// An overlay packet that is not IPv4 or IPv6.
    OverlayNotIp = 20,
    /// A packet between two zones that no exchange path admits.
    ZoneIsolation = 21,
    /// Denied by the border firewall (a rule, or its default).
    BorderFirewall = 22,
    /// Denied by the VPC firewall between two peered VPCs.
    VpcFirewall = 23,
    /// A pipeline stage is missing or its tail call failed (fail closed).
    Pipeline = 24,
    /// A TCP packet that is not a SYN, with no flow to belong to: only a
    /// SYN opens a TCP flow.
    CtNotSyn = 25,
    /// A new flow on a port that holds its whole budget of flows.
    CtBudget = 26,
    /// The flow table is full.
    CtFull = 27,
    /// From an uplink, a source that is a VPC's address or another zone's.
    SpoofUplink = 28,
    /// A DHCP server message from a port that is not a DHCP server.
    DhcpServer = 29,
    /// From an uplink, a packet for the host itself that the host does not
    /// need (only ARP, neighbour discovery and ICMP errors are).
    UplinkToHost = 30,
    /// A VM's address leaving an uplink without passing the pipeline.
    Unjudged = 31,
    /// The TCP packet that would complete a handshake acknowledges a
    /// sequence number the answer never sent (a blind, forged ACK).
    CtBadAck = 32,
    /// A new flow to a load balancer's VIP that no backend can take.
    LbNoBackend = 33,
    /// A packet to a NAT host's address in a VPC that is no reply of a
    /// north-south flow the host translates.
    NatNoFlow = 34,
    /// A new north-south flow for which no NAT port towards its member
    /// was found free.
    NatNoPort = 35,
    /// From a zone, a SYN on the tuple of an open north-south flow that
    /// its member has not closed (a zone's host could forge it).
    NatSynOnFlow = 36,
    /// From a zone, a packet for a virtual IP this host holds but whose
    /// lease has run out (or was never granted): another holder owns it.
    VipFenced = 37,
    /// A VRRP advertisement for a virtual IP's router from no holder of
    /// it, or not as the holder sends (another MAC or source address, a
    /// TTL other than 255, a router id no virtual IP of the VPC has), or
    /// from the overlay by a host that is not the holder's.
    VrrpNotHolder = 38,
    /// A holder's VRRP advertisement above the priority it was declared
    /// with.
    VrrpPriority = 39,
    /// A holder's VRRP advertisement with a longer interval than its
    /// virtual IP's (it would keep the address that long after falling
    /// silent), or sooner than 2 ms after its last, or longer than any.
    VrrpInterval = 40,
}

/// Number of slots in the drop counter array (room to grow).
pub const DROP_REASON_SLOTS: u32 = 48;

impl DropReason {
    /// Every reason, in index order.
    pub const ALL: [DropReason; 41] = [
        DropReason::UnknownPort,
        DropReason::Truncated,
        DropReason::UnsupportedEthertype,
        DropReason::BadIpHeader,
        DropReason::Fragment,
        DropReason::ExtChainTooLong,
        DropReason::SpoofMac,
        DropReason::SpoofIp,
        DropReason::SpoofArp,
        DropReason::SpoofNd,
        DropReason::RaGuard,
        DropReason::PolicyIngress,
        DropReason::PolicyEgress,
        DropReason::PolicyRevoked,
        DropReason::BadArp,
        DropReason::Quarantined,
        DropReason::NoRoute,
        DropReason::UnknownNeighbour,
        DropReason::OverlaySpoof,
        DropReason::OverlayUnknownDst,
        DropReason::OverlayNotIp,
        DropReason::ZoneIsolation,
        DropReason::BorderFirewall,
        DropReason::VpcFirewall,
        DropReason::Pipeline,
        DropReason::CtNotSyn,
        DropReason::CtBudget,
        DropReason::CtFull,
        DropReason::SpoofUplink,
        DropReason::DhcpServer,
        DropReason::UplinkToHost,
        DropReason::Unjudged,
        DropReason::CtBadAck,
        DropReason::LbNoBackend,
        DropReason::NatNoFlow,
        DropReason::NatNoPort,
        DropReason::NatSynOnFlow,
        DropReason::VipFenced,
        DropReason::VrrpNotHolder,
        DropReason::VrrpPriority,
        DropReason::VrrpInterval,
    ];

    /// Stable snake_case name, used in logs and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            DropReason::UnknownPort => "unknown_port",
            DropReason::Truncated => "truncated",
            DropReason::UnsupportedEthertype => "unsupported_ethertype",
            DropReason::BadIpHeader => "bad_ip_header",
            DropReason::Fragment => "fragment",
            DropReason::ExtChainTooLong => "ipv6_ext_chain_too_long",
            DropReason::SpoofMac => "spoof_mac",
            DropReason::SpoofIp => "spoof_ip",
            DropReason::SpoofArp => "spoof_arp",
            DropReason::SpoofNd => "spoof_nd",
            DropReason::RaGuard => "ra_guard",
            DropReason::PolicyIngress => "policy_ingress",
            DropReason::PolicyEgress => "policy_egress",
            DropReason::PolicyRevoked => "policy_revoked",
            DropReason::BadArp => "bad_arp",
            DropReason::Quarantined => "quarantined",
            DropReason::NoRoute => "no_route",
            DropReason::UnknownNeighbour => "unknown_neighbour",
            DropReason::OverlaySpoof => "overlay_spoof",
            DropReason::OverlayUnknownDst => "overlay_unknown_destination",
            DropReason::OverlayNotIp => "overlay_not_ip",
            DropReason::ZoneIsolation => "zone_isolation",
            DropReason::BorderFirewall => "border_firewall",
            DropReason::VpcFirewall => "vpc_firewall",
            DropReason::Pipeline => "pipeline",
            DropReason::CtNotSyn => "ct_not_syn",
            DropReason::CtBudget => "ct_budget",
            DropReason::CtFull => "ct_full",
            DropReason::SpoofUplink => "spoof_uplink",
            DropReason::DhcpServer => "dhcp_server",
            DropReason::UplinkToHost => "uplink_to_host",
            DropReason::Unjudged => "unjudged",
            DropReason::CtBadAck => "ct_bad_ack",
            DropReason::LbNoBackend => "lb_no_backend",
            DropReason::NatNoFlow => "nat_no_flow",
            DropReason::NatNoPort => "nat_no_port",
            DropReason::NatSynOnFlow => "nat_syn_on_flow",
            DropReason::VipFenced => "vip_fenced",
            DropReason::VrrpNotHolder => "vrrp_not_holder",
            DropReason::VrrpPriority => "vrrp_priority",
            DropReason::VrrpInterval => "vrrp_interval",
        }
    }
}

/// Packet counters other than drops. Index into the `STATS` per-CPU array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// Packets passed because a conntrack entry matched.
    CtHit = 0,
    /// New conntrack entries created after a rule allowed a packet.
    CtNew = 1,
    /// Conntrack entries re-checked after the port's policy changed.
    CtRevalidated = 2,
    /// ARP and neighbour-discovery packets passed after anti-spoofing.
    Neighbour = 3,
    /// Packets passed in total.
    Passed = 4,
    /// ICMP errors passed because they concern a tracked flow.
    CtRelated = 5,
    /// Packets delivered to a port on the same host.
    ForwardedLocal = 6,
    /// Packets sent into the overlay towards another host.
    Encapsulated = 7,
    /// Packets received from the overlay and delivered to a port.
    Decapsulated = 8,
    /// ARP requests and neighbour solicitations answered by the host.
    NeighbourAnswered = 9,
    /// Packets a VM sent out of a zone uplink.
    ToUplink = 10,
    /// Packets from a zone uplink delivered to a VM.
    FromUplink = 11,
    /// Packets that crossed between zones on an exchange path.
    Exchanged = 12,
    /// Flows confirmed (answered; TCP: handshake completed) and moved from
    /// the table of unconfirmed flows to the flow table.
    CtPromoted = 13,
    /// Packets that took the established fast path (no policy stage).
    FastPath = 14,
    /// New flows to a load balancer's VIP given a backend.
    LbNew = 15,
}

/// Number of slots in the stats array.
pub const STAT_SLOTS: u32 = 16;

/// The maximum number of IPv6 extension headers the parser follows: a
/// packet with this many passes, one with more is dropped
/// (`ipv6_ext_chain_too_long`).
pub const MAX_IPV6_EXT_HEADERS: u32 = 8;

/// The stages of the pipeline: slots of the program array each entry
/// program tail-calls into. A stage that is missing drops the packet
/// (`pipeline`).
pub mod stage {
    /// Quarantine, destination lookup, conntrack lookup and zone guard.
    pub const GUARD: u32 = 0;
    /// Border and VPC firewalls.
    pub const FIREWALL: u32 = 1;
    /// The load balancer: a new flow to a VIP gets its backend (or an
    /// established one its own), then the guard runs again on the
    /// backend's address.
    pub const LB: u32 = 2;
    /// Security groups for new flows and for flows judged under an older
    /// policy, and the per-port flow budget.
    pub const POLICY: u32 = 3;
    /// Conntrack and verdict writes, rewrite, encapsulation, redirect.
    pub const COMMIT: u32 = 4;
    /// Mirroring's copies of what is delivered to a mirrored VM (which
    /// no hook of its device sees: it enters the VM's side directly), then
    /// the delivery.
    pub const MIRROR: u32 = 5;
    /// North-south, from a zone to a VIP on a NAT host: the zone guard and
    /// the border firewall of every packet, then the load balancer.
    pub const NAT_IN: u32 = 6;
    /// North-south, a member's reply to a NAT host's address: translated
    /// back and sent out of the client's uplink.
    pub const NAT_OUT: u32 = 7;
    /// North-south: the load balancer's member and NAT port for a packet
    /// `NAT_IN` admitted, then the guard on the way into the VPC.
    pub const NAT_LB: u32 = 8;
    /// North-south: once the commit wrote the member's side, the flow's
    /// own writes and its translation, then the packet goes on.
    pub const NAT_COMMIT: u32 = 9;
    /// Slots of the program array.
    pub const SLOTS: u32 = 16;
    /// The stage programs by slot, as the object names them.
    pub const PROGRAMS: [(u32, &str); 10] = [
        (GUARD, "st_guard"),
        (FIREWALL, "st_firewall"),
        (LB, "st_lb"),
        (POLICY, "st_policy"),
        (COMMIT, "st_commit"),
        (MIRROR, "st_mirror"),
        (NAT_IN, "st_nat_in"),
        (NAT_OUT, "st_nat_out"),
        (NAT_LB, "st_nat_lb"),
        (NAT_COMMIT, "st_nat_commit"),
    ];
}

/// `skb->mark` the pipeline sets on a packet it sends out of an uplink;
/// the uplink's egress guard passes VM addresses only with it.
pub const MARK_PIPELINE: u32 = 0x5d0e_0001;
