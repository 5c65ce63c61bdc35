//! Keys and values of every pinned map, with the map names and sizes.
//!
//! Both the programs (`dataplane-ebpf`) and the agent use these definitions;
//! the `SIZE` assertions fail the build if the layout drifts.

/// Pinned name of the overlay endpoint map ([`EndpointKey`] -> [`Endpoint`]).
pub const ENDPOINTS: &str = "SDN_ENDPOINTS";
/// Pinned name of the zone address spaces (LPM trie; data: [`zone_net_data`],
/// value: zone number).
pub const ZONE_NETS: &str = "SDN_ZONE_NETS";

/// The data of a zone-prefix key: the family byte, then the address (IPv4
/// in the first four bytes). A prefix of length `plen` is a key of length
/// `8 + plen`, so both families live in one trie and one lookup.
pub const fn zone_net_data(family: u8, addr: &[u8; 16]) -> [u8; 20] {
    let mut d = [0u8; 20];
    d[0] = family;
    let mut i = 0;
    while i < 16 {
        d[i + 1] = addr[i];
        i += 1;
    }
    d
}
/// Pinned name of the subnets of every VPC in a zone (LPM trie; data:
/// [`zone_net_data`], value: the zone number): from an uplink, a source in
/// one of them is forged.
pub const VPC_NETS: &str = "SDN_VPC_NETS";
/// Pinned name of the uplinks' own addresses ([`PortAddrKey`] of the uplink
/// device -> `u8`): the only addresses on an uplink that the host answers
/// ARP and neighbour discovery for and takes ICMP errors to.
pub const UPLINK_ADDRS: &str = "SDN_UPLINK_ADDRS";
/// Pinned name of the uplink devices (`u32` ifindex -> `u32` zone number).
pub const UPLINKS: &str = "SDN_UPLINKS";
/// Pinned name of the zones' uplinks (`u32` zone number -> `u32` ifindex).
pub const ZONE_UPLINK: &str = "SDN_ZONE_UPLINK";
/// Pinned name of the addresses of VPCs with an uplink ([`ZoneAddrKey`] -> [`ZoneEndpoint`]).
pub const ZONE_ENDPOINTS: &str = "SDN_ZONE_ENDPOINTS";
/// Pinned name of the exchange paths (array of [`ExchangeRule`] in two
/// halves of `EXCHANGE_MAX` slots; in the half [`EXCHANGE_HALF`] names, the
/// first slot whose `from` is 0 ends the list). A change is written whole
/// into the other half, then the half switches in one write: a packet is
/// judged by the old list or the new one, never a mix.
/// (Version 2: two halves.)
pub const EXCHANGE: &str = "SDN_EXCHANGE2";
/// Pinned name of the half of [`EXCHANGE`] in force (array of one `u32`, 0 or 1).
pub const EXCHANGE_HALF: &str = "SDN_EXCHANGE_HALF";
/// Pinned name of the firewall policies (`u32` policy number -> [`FwPolicy`]),
/// in two halves of numbers: a changed set of policies gets the numbers of
/// the other half, and each reference to a policy switches to its new
/// number in one write. (Version 2: halves of numbers, and `first` a slot of
/// the two-halved [`FW_RULES`].)
pub const FW_POLICIES: &str = "SDN_FW_POLICIES2";
/// Pinned name of the firewall rules (array of [`FwRule`] in two halves of
/// `FW_RULES_MAX` slots, each policy's in priority order from its `first`
/// slot). A change is written whole into the half no policy uses, then the
/// policies switch to it one write each: a packet is judged by a policy's
/// old rules or its new ones, never a mix.
/// (Version 2: two halves.)
pub const FW_RULES: &str = "SDN_FW_RULES2";
/// Pinned name of the firewall verdicts, per flow ([`CtKey`] -> [`FwVerdict`]).
/// (Version 2: the key carries the flow's door.)
pub const FW_VERDICTS: &str = "SDN_FW_VERDICTS2";
/// Pinned name of the firewall rule names (`u32` rule number -> [`RuleName`]);
/// written by the agent, read by `sdn-agent verdicts`, not by the programs.
pub const FW_NAMES: &str = "SDN_FW_NAMES";
/// Pinned name of the host configuration (array of one [`HostConfig`]).
pub const CONFIG: &str = "SDN_CONFIG";
/// Pinned name of the per-port configuration map (`u32` ifindex -> [`PortInfo`]).
pub const PORTS: &str = "SDN_PORTS";
/// Pinned name of the anti-spoofing address set ([`PortAddrKey`] -> `u8`).
pub const PORT_ADDRS: &str = "SDN_PORT_ADDRS";
/// Pinned name of the prefix-length index ([`PolicyDirKey`] -> [`PrefixLens`]).
pub const POLICY_PLENS: &str = "SDN_POLICY_PLENS";
/// Pinned name of the remote-address classifier ([`AddrKey`] -> [`AddrIdentity`]).
pub const SG_ADDR: &str = "SDN_SG_ADDR";
/// Pinned name of the allowed service set ([`RuleKey`] -> `u8`).
pub const SG_RULES: &str = "SDN_SG_RULES";
/// Pinned name of the flow table ([`CtKey`] -> [`CtValue`]): established
/// flows, never evicted by others; entries leave by timeout (the agent's
/// collector) and each port holds at most its budget of them.
/// (Version 2: the key carries the flow's door.)
pub const CT: &str = "SDN_CT2";
/// Pinned name of the table of unconfirmed flows ([`CtKey`] -> [`CtValue`]):
/// flows not yet answered (TCP: between the SYN and the opener's first ACK
/// after the answer), in an LRU of their own, so a flood of flows nobody
/// answers evicts only its own kind, never an established flow.
pub const CT_SYN: &str = "SDN_CT_SYN";
/// Pinned name of what a handshake's completing ACK must acknowledge
/// ([`CtKey`] -> `u32`: the answer's initial sequence number plus one), per
/// local side of an unconfirmed TCP flow, written when the answer passes.
pub const CT_ISN: &str = "SDN_CT_ISN";
/// Pinned name of the per-port flow counts (`u32` ifindex -> `u32` entries
/// of the flow table), kept by the programs on insert and recounted by the
/// agent's collector.
pub const CT_COUNT: &str = "SDN_CT_COUNT";
/// Pinned name of the per-CPU drop counters (index: `DropReason`).
/// (Version 2: 48 slots, room for new reasons.)
pub const DROPS: &str = "SDN_DROPS2";
/// Pinned name of the per-CPU stats counters (index: `Stat`).
pub const STATS: &str = "SDN_STATS";

/// Pinned name of the ring buffer of denial events ([`DenyEvent`]): the
/// packets a security tier dropped, for the agent's flow records and
/// security events. Never read by the programs.
pub const EVENTS: &str = "SDN_EVENTS";
/// Pinned name of the per-CPU state of the event limiters (array of
/// [`EventLimiter`]: slot [`LIMIT_DENIALS`], slot [`LIMIT_DNS`]).
pub const EVENT_LIMIT: &str = "SDN_EVENT_LIMIT";
/// Slot of the limiter of security-group denials (the most frequent:
/// every scan of a port makes them).
pub const LIMIT_DENIALS: u32 = 0;
/// Slot of the DNS copies' limiter.
pub const LIMIT_DNS: u32 = 1;
/// Slot of the limiter of the guards' denials (spoofing, zone isolation,
/// quarantine, firewalls, budgets): a flood of security-group denials
/// cannot take their room.
pub const LIMIT_GUARDS: u32 = 2;
/// Slots of [`EVENT_LIMIT`].
pub const LIMIT_SLOTS: u32 = 3;
/// Name of the per-CPU limiters of each port's denial events and DNS
/// copies (key: the port's ifindex, with [`PORT_LIMIT_GUARDS`] set for the
/// guards' class, [`PORT_LIMIT_DNS`] for DNS copies):
/// one port's flood takes at most its own share of a CPU's events.
pub const EVENT_PORT_LIMIT: &str = "SDN_EVENT_PORT_LIMIT";
pub const EVENT_PORT_LIMIT_MAX: u32 = 8192;
/// Key bit of a port's guards' limiter.
pub const PORT_LIMIT_GUARDS: u32 = 1 << 31;
/// Denial events of one class one port may make per CPU per second.
pub const EVENTS_PER_PORT_PER_SEC: u64 = 100;
/// Name of the perf event array the programs copy DNS answers into (not
/// pinned: each load's reader opens its own): a [`DnsCopy`], then the
/// packet's first `len` bytes, Ethernet header on.
pub const DNS_COPIES: &str = "SDN_DNS";
/// Bytes of a DNS answer's packet copied at most (headers included):
/// the usual EDNS size of 1,232 bytes of DNS and its headers.
pub const DNS_COPY_MAX: u32 = 1232 + 14 + 40 + 8;
/// DNS answers each CPU copies per second at most; the rest are counted.
pub const DNS_PER_SEC: u64 = 2000;
/// Bytes of the event ring buffer (a power of two pages).
pub const EVENTS_BYTES: u32 = 256 << 10;
/// Events each CPU may send per second; the rest are counted, not sent,
/// so a flood of denied packets costs the ring and the agent a bounded
/// amount.
pub const EVENTS_PER_SEC: u64 = 1000;

/// The drop reasons that make an event: bit `n` is `DropReason` `n`.
/// Security decisions only (a tier refused the packet); malformed packets
/// and missing routes are counted, not reported one by one.
pub const EVENT_REASONS: u64 = {
    use crate::DropReason as R;
    let reasons = [
        R::SpoofMac,
        R::SpoofIp,
        R::SpoofArp,
        R::SpoofNd,
        R::RaGuard,
        R::PolicyIngress,
        R::PolicyEgress,
        R::PolicyRevoked,
        R::Quarantined,
        R::OverlaySpoof,
        R::ZoneIsolation,
        R::BorderFirewall,
        R::VpcFirewall,
        R::CtBudget,
        R::SpoofUplink,
        R::DhcpServer,
        R::CtBadAck,
    ];
    let mut bits = 0u64;
    let mut i = 0;
    while i < reasons.len() {
        bits |= 1u64 << (reasons[i] as u32);
        i += 1;
    }
    bits
};

/// The refusing port sent the packet.
pub const SIDE_SENT: u8 = 1;
/// The packet was for the refusing port.
pub const SIDE_FOR: u8 = 2;

/// One packet a security tier dropped, as the pipeline parsed it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DenyEvent {
    /// CLOCK_MONOTONIC (coarse) when the packet entered.
    pub now_ns: u64,
    /// The port of this host whose rules or state refused it (a
    /// quarantined receiver, a sender over its budget...); 0: none here
    /// (a forged overlay or uplink packet).
    pub port_ifx: u32,
    /// The device it came in by.
    pub device: u32,
    /// For a firewall's denial: the rule number (see [`FW_NAMES`]); else 0.
    pub rule: u32,
    /// The packet's length.
    pub len: u32,
    /// `DropReason`.
    pub reason: u8,
    /// 0 when the packet was dropped before its IP header was read.
    pub family: u8,
    pub proto: u8,
    /// The entry program (1 from a VM, 2 to a VM, 3 from an uplink, 4
    /// from the overlay).
    pub entry: u8,
    /// Ports (ICMP: type in `dport`).
    pub sport: u16,
    pub dport: u16,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// [`SIDE_SENT`] or [`SIDE_FOR`]: the refusing port's part.
    pub side: u8,
    pub _pad: [u8; 7],
}

/// What precedes a copied DNS answer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DnsCopy {
    /// CLOCK_MONOTONIC (coarse) when the packet entered.
    pub now_ns: u64,
    /// The port of this host the answer goes to (or, from a VM that
    /// serves DNS, comes from).
    pub ifindex: u32,
    /// Bytes of the packet that follow.
    pub len: u32,
    /// Where the UDP header starts in them.
    pub l4_off: u16,
    pub family: u8,
    /// The entry program.
    pub entry: u8,
    /// [`DNS_ROLE_ASKED`] or [`DNS_ROLE_ANSWERED`]: the port's part.
    pub role: u8,
    pub _pad: [u8; 3],
}

/// The port opened the flow the answer belongs to: it asked.
pub const DNS_ROLE_ASKED: u8 = 1;
/// The flow was opened towards the port: it answers (a VM serving DNS).
pub const DNS_ROLE_ANSWERED: u8 = 2;
/// Key bit of a port's share of the DNS copies in [`EVENT_PORT_LIMIT`].
pub const PORT_LIMIT_DNS: u32 = 1 << 30;
/// DNS answers one port may have copied per CPU per second.
pub const DNS_PER_PORT_PER_SEC: u64 = 200;

/// The event limiter of one CPU, and what it counted.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EventLimiter {
    /// Start of the current one-second window.
    pub window_ns: u64,
    /// Events sent in it.
    pub in_window: u64,
    pub sent: u64,
    /// Not sent: over the rate.
    pub suppressed: u64,
    /// Not sent: the ring was full (the agent is behind).
    pub lost: u64,
}

pub const PORTS_MAX: u32 = 4096;
pub const PORT_ADDRS_MAX: u32 = 16384;
pub const POLICY_PLENS_MAX: u32 = 16384;
pub const SG_ADDR_MAX: u32 = 524288;
pub const SG_RULES_MAX: u32 = 524288;
pub const CT_MAX: u32 = 262144;
pub const CT_SYN_MAX: u32 = 65536;
/// Flows one port may hold in the flow table unless the host configures
/// another budget.
pub const CT_BUDGET_DEFAULT: u32 = 16384;
pub const ENDPOINTS_MAX: u32 = 262144;
pub const ZONE_NETS_MAX: u32 = 4096;
pub const VPC_NETS_MAX: u32 = 65536;
pub const ZONES_MAX: u32 = 64;
pub const UPLINK_ADDRS_MAX: u32 = 1024;
pub const ZONE_ENDPOINTS_MAX: u32 = 65536;
/// Exchange paths are checked in order, one by one: keep them few. (The
/// map holds two halves of this many.)
pub const EXCHANGE_MAX: u32 = 64;
pub const FW_POLICIES_MAX: u32 = 1024;
/// Firewall rule slots of one half (the map holds two).
pub const FW_RULES_MAX: u32 = 16384;
/// Rules of one policy, checked in order.
pub const FW_POLICY_RULES_MAX: u32 = 64;
pub const FW_VERDICTS_MAX: u32 = 262144;
pub const FW_NAMES_MAX: u32 = 16384;

/// A rule name, "policy/rule", NUL-padded (longer names are cut).
pub type RuleName = [u8; 136];

/// Firewall actions.
pub const FW_ALLOW: u8 = 1;
pub const FW_DENY: u8 = 2;

/// The MAC of every subnet gateway, on every host: a distributed router. The
/// host answers ARP and neighbour solicitations for the gateway and for the
/// VPC's other ports with it, and routes what VMs send to it.
pub const GATEWAY_MAC: [u8; 6] = [0x0e, 0x5d, 0x6e, 0x00, 0x00, 0x01];

/// Port flag: the port has no egress rules, so everything it sends is allowed.
pub const PORT_F_EGRESS_OPEN: u32 = 1;
/// Port flag: the port is quarantined; every packet in either direction is
/// dropped before any other rule (policy tier 1).
pub const PORT_F_QUARANTINED: u32 = 2;
/// Port flag: the port's VPC has a zone; destinations outside the VPC leave
/// through the uplink of the zone they belong to.
pub const PORT_F_UPLINK: u32 = 4;
/// Port flag: the port may answer DHCP as a server (UDP 67 -> 68, 547 -> 546).
pub const PORT_F_DHCP_SERVER: u32 = 8;
/// Port flag: the agent could not compile the port's configuration; every
/// packet is dropped (`unknown_port`: no usable configuration).
pub const PORT_F_REJECTED: u32 = 16;
/// Port flag: the port's VPC has load balancers: its flows to a VIP are
/// translated, and replies to it from a backend translated back.
pub const PORT_F_LB: u32 = 32;

/// Configuration of one VM port, keyed by the ifindex of its host-side device.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortInfo {
    /// The only source MAC the port may send from.
    pub mac: [u8; 6],
    pub _pad0: [u8; 2],
    /// Compiled policy (one per distinct set of security groups).
    pub policy_id: u32,
    /// Changes whenever the port's effective rules change; conntrack entries
    /// made under another epoch are re-checked against the current rules.
    pub epoch: u32,
    /// `PORT_F_*` flags.
    pub flags: u32,
    /// The VNI of the port's VPC: selects its endpoints.
    pub vni: u32,
}

/// An address in a VPC: the VPC's VNI and the address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointKey {
    pub vni: u32,
    pub family: u8,
    pub _pad: [u8; 3],
    pub addr: [u8; 16],
}

/// Endpoint flag: the address is a subnet gateway (answered, never forwarded to).
pub const EP_F_GATEWAY: u16 = 1;
/// Endpoint flag: the address is in a peered VPC (`vni` is that VPC's).
pub const EP_F_PEER: u16 = 2;
/// Endpoint flag, with `EP_F_PEER`: the VPC of the key's VNI is side A of
/// the peering, whose view the VPC firewall's rules take.
pub const EP_F_LOCAL_IS_A: u16 = 4;
/// Endpoint flag: the address is this host's NAT address of a load
/// balancer exposed to the zone (a member's replies to it are translated
/// back to the client).
pub const EP_F_NAT: u16 = 8;

/// Where an address of a VPC lives.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Host-side device of a port on this host; 0: on another host.
    pub ifindex: u32,
    /// Underlay IPv4 address of the host it is on (network order); for a
    /// local port, this host's own.
    pub host_v4: [u8; 4],
    /// The port's MAC.
    pub mac: [u8; 6],
    /// `EP_F_*` flags.
    pub flags: u16,
    /// The VNI of the VPC the address is in (differs from the key's for a peer).
    pub vni: u32,
    /// For a peer: the VPC firewall policy number of the peering; 0: none.
    pub policy: u32,
}

/// Host-wide settings, slot 0 of the `CONFIG` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct HostConfig {
    /// The collect-metadata VXLAN device; 0 while it is not set up.
    pub vxlan_ifindex: u32,
    /// Flows one port may hold in the flow table; 0: [`CT_BUDGET_DEFAULT`].
    pub ct_budget: u32,
}

/// An address of a VPC with a zone.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ZoneAddrKey {
    pub family: u8,
    pub _pad: [u8; 3],
    pub addr: [u8; 16],
}

/// The virtual IPs this host holds on its uplinks, by address
/// ([`ZoneAddrKey`]): each answered for (ARP, neighbour discovery, the
/// load balancer's translation) only until its lease ends.
pub const VIP_LEASES: &str = "SDN_VIP_LEASES";
/// Virtual IP addresses a host holds at most.
pub const VIP_LEASES_MAX: u32 = 4096;

/// A held virtual IP's lease on this host.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VipLease {
    /// `CLOCK_MONOTONIC` nanoseconds (the programs' `bpf_ktime_get_coarse_ns`)
    /// until which this host answers for the address; 0: it does not.
    pub until_ns: u64,
    /// The epoch the lease was granted in.
    pub epoch: u64,
    /// When this host began answering in that epoch (same clock); what
    /// `until_ns` then says, after the end, is when it stopped.
    pub since_ns: u64,
}

const _: () = assert!(core::mem::size_of::<VipLease>() == 24);

/// VRRP of virtual IPs held by ports (tenant VMs running their own VRRP,
/// keepalived's default multicast to 224.0.0.18): the routers by VPC and
/// router id ([`VrrpKey`] -> [`VrrpGroup`]), and the advertisements each
/// holder port here last sent ([`VrrpSeenKey`] -> [`VrrpSeen`]), which
/// the agent reads to claim the virtual IP for the port that speaks.
pub const VRRP_GROUPS: &str = "SDN_VRRP_GROUPS";
pub const VRRP_SEEN: &str = "SDN_VRRP_SEEN";
pub const VRRP_GROUPS_MAX: u32 = 4096;
pub const VRRP_SEEN_MAX: u32 = 4096;
/// Holders of one virtual IP, at most (the API's limit).
pub const VRRP_MEMBERS: usize = 8;
/// `skb->mark` of an advertisement relayed to a holder port here: the
/// port's egress observer lets it into the VM past the pipeline. Only our
/// programs set it (a VM's marks are scrubbed when its packets leave its
/// namespace).
pub const VRRP_MARK: u32 = 0x7672_7270;

/// A VRRP router: the VPC's VNI, the router id and the family (4).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VrrpKey {
    pub vni: u32,
    pub vrid: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// One holder port of a VRRP router.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VrrpMember {
    /// The port's IPv4 address: its advertisements' only source.
    pub addr: [u8; 4],
    /// Its host's underlay address (network order).
    pub host_v4: [u8; 4],
    /// Its device here; 0: on another host.
    pub ifindex: u32,
    pub mac: [u8; 6],
    /// The highest priority it may advertise (its declared one).
    pub priority: u8,
    pub _pad: u8,
}

const _: () = assert!(core::mem::size_of::<VrrpMember>() == 20);

/// The holders of a VRRP router, and the other hosts with one (each gets
/// one copy of an advertisement sent here).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VrrpGroup {
    pub members: [VrrpMember; VRRP_MEMBERS],
    pub hosts: [[u8; 4]; VRRP_MEMBERS],
    pub n_members: u16,
    pub n_hosts: u16,
    /// The longest advertisement interval a holder may announce, in
    /// centiseconds: the virtual IP's.
    pub interval_cs: u16,
    pub _pad: u16,
}

const _: () = assert!(core::mem::size_of::<VrrpGroup>() == 200);

/// A holder port's advertisements closer together than this are dropped
/// (`vrrp_rate`): VRRP's shortest interval is 10 ms, and a Master sends
/// one more at most when it changes state.
pub const VRRP_MIN_GAP_NS: u64 = 2_000_000;
/// The longest advertisement relayed, in bytes from the Ethernet header:
/// an IPv4 header with options and 255 addresses.
pub const VRRP_LEN_MAX: u32 = 14 + 60 + 8 + 255 * 4;

/// A holder port's advertisements of one router.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VrrpSeenKey {
    pub ifindex: u32,
    pub vrid: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// The last advertisement a holder port sent (written on each).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VrrpSeen {
    /// `CLOCK_MONOTONIC` nanoseconds.
    pub last_ns: u64,
    /// Advertisements relayed, in all.
    pub adverts: u64,
    /// Its advertisement interval in centiseconds (VRRPv2's seconds
    /// converted).
    pub interval_cs: u16,
    pub priority: u8,
    /// VRRP version, 2 or 3.
    pub version: u8,
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<VrrpSeen>() == 24);

/// Where an address of a VPC with a zone lives, and its zone.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ZoneEndpoint {
    /// Host-side device of the port; 0: on another host.
    pub ifindex: u32,
    /// The VPC's zone number.
    pub zone: u32,
    /// The port's MAC.
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
    /// The VPC's border firewall policy number; 0: none.
    pub border: u32,
}

/// A firewall policy: where its rules are and what happens when none matches.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FwPolicy {
    /// First slot of its rules in `FW_RULES`.
    pub first: u32,
    /// Number of rules (at most `FW_POLICY_RULES_MAX`).
    pub count: u32,
    /// Recorded as the rule of a verdict no rule decided.
    pub default_rule_id: u32,
    /// `FW_ALLOW` or `FW_DENY`.
    pub default_action: u8,
    pub _pad: [u8; 3],
}

/// One firewall rule, compiled.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FwRule {
    /// Stable number of the rule (the agent maps it back to its name).
    pub rule_id: u32,
    pub action: u8,
    /// `DIR_INGRESS` (into the VPC) or `DIR_EGRESS`.
    pub dir: u8,
    pub family: u8,
    /// 0: any protocol.
    pub proto: u8,
    pub port_lo: u16,
    pub port_hi: u16,
    /// Remote prefix length; 0 with a zero address: any.
    pub plen: u8,
    pub _pad: [u8; 3],
    pub addr: [u8; 16],
}

/// The last firewall verdict of a flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FwVerdict {
    pub rule_id: u32,
    pub action: u8,
    pub dir: u8,
    pub _pad: [u8; 2],
    pub packets: u64,
    pub last_ns: u64,
}

/// One exchange path, compiled: flows from `src` in zone `from` to `dst`
/// in zone `to`, protocol `proto`, destination port (ICMP type) in
/// `port_lo..=port_hi`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ExchangeRule {
    pub from: u32,
    pub to: u32,
    pub family: u8,
    pub proto: u8,
    pub src_plen: u8,
    pub dst_plen: u8,
    pub port_lo: u16,
    pub port_hi: u16,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

/// One address a port may send from.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortAddrKey {
    pub ifindex: u32,
    pub family: u8,
    pub _pad: [u8; 3],
    pub addr: [u8; 16],
}

/// Selects the prefix lengths used by one policy in one direction and family.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyDirKey {
    pub policy_id: u32,
    pub dir: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// Bit `n` set means some remote prefix of length `n` exists (n in 0..=128).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PrefixLens {
    pub bits: [u64; 3],
}

impl PrefixLens {
    pub fn set(&mut self, plen: u8) {
        self.bits[(plen / 64) as usize] |= 1u64 << (plen % 64);
    }
}

/// A remote prefix of a policy: `addr` masked to `plen` bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AddrKey {
    pub policy_id: u32,
    pub dir: u8,
    pub family: u8,
    pub plen: u8,
    pub _pad: u8,
    pub addr: [u8; 16],
}

/// What a remote prefix may reach: an identity naming a set of services.
///
/// The set is the union of the rules of every prefix containing this one, so
/// the longest matching prefix alone decides.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddrIdentity {
    pub identity: u32,
    /// Bit `n` set: some [`RuleKey`] of this identity has `port_plen == n` (0..=16).
    pub port_plens: u32,
    /// Non-zero: every protocol and port is allowed.
    pub any_proto: u8,
    pub _pad: [u8; 3],
}

/// An allowed (protocol, port block) of an identity. For TCP and UDP the port
/// is the destination port; for ICMP and ICMPv6 it is the message type.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleKey {
    pub identity: u32,
    pub proto: u8,
    /// Number of leading port bits that must match (0..=16).
    pub port_plen: u8,
    /// The port block's first port, host order.
    pub port: u16,
}

/// Door kind: the remote end is in the port's own VPC (low 24 bits: VNI).
pub const DOOR_VPC: u32 = 1 << 24;
/// Door kind: the remote end is in a peered VPC (low 24 bits: its VNI).
pub const DOOR_PEER: u32 = 2 << 24;
/// Door kind: the remote end is behind a zone uplink (low bits: zone number).
pub const DOOR_ZONE: u32 = 3 << 24;
/// Door: the remote end is the host's own stack.
pub const DOOR_HOST: u32 = 4 << 24;

/// The ICMP part of a flow key: echo requests and replies share the
/// request's type (their identifier is the port pair); any other message
/// is its own type, so allowing one type opens no other. 0 for other
/// protocols.
pub const fn icmp_class(proto: u8, ty: u8) -> u8 {
    match (proto, ty) {
        (crate::PROTO_ICMP, 0) | (crate::PROTO_ICMP, 8) => 8,
        (crate::PROTO_ICMPV6, 128) | (crate::PROTO_ICMPV6, 129) => 128,
        (crate::PROTO_ICMP, t) | (crate::PROTO_ICMPV6, t) => t,
        _ => 0,
    }
}

/// Connection tracking key, normalised to the port: `local` is the VM side.
/// A flow is found again only through the door it was admitted by: the
/// same port, and the same `door` (`DOOR_*`: own VPC, peering, zone uplink
/// or host).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub ifindex: u32,
    pub family: u8,
    pub proto: u8,
    /// [`icmp_class`] of an ICMP flow; 0 otherwise.
    pub icmp: u8,
    pub _pad: u8,
    pub local_port: u16,
    pub remote_port: u16,
    pub local: [u8; 16],
    pub remote: [u8; 16],
    pub door: u32,
}

/// The flow was opened by the VM.
pub const CT_ORIGIN_OUT: u8 = 0;
/// The flow was opened towards the VM.
pub const CT_ORIGIN_IN: u8 = 1;
/// A TCP FIN or RST was seen; the entry expires soon.
pub const CT_F_CLOSING: u8 = 1;
/// The rules that admitted the flow were removed: every packet of it is
/// dropped until the entry times out, so neither side can revive it.
pub const CT_F_REVOKED: u8 = 2;
/// A handshake entry saw a packet from the answering side.
pub const CT_F_REPLY_SEEN: u8 = 4;

/// Connection tracking state.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtValue {
    pub created_ns: u64,
    pub last_seen_ns: u64,
    pub packets_out: u64,
    pub packets_in: u64,
    pub bytes_out: u64,
    pub bytes_in: u64,
    /// The port epoch under which the flow was last judged.
    pub epoch: u32,
    pub origin: u8,
    pub flags: u8,
    /// The service the flow was judged on: destination port of its first
    /// packet for TCP/UDP, message type for ICMP.
    pub svc: u16,
}

/// Idle timeouts, nanoseconds.
pub const CT_TIMEOUT_TCP_NS: u64 = 2 * 3600 * 1_000_000_000;
pub const CT_TIMEOUT_CLOSING_NS: u64 = 10 * 1_000_000_000;
pub const CT_TIMEOUT_UDP_NS: u64 = 60 * 1_000_000_000;
pub const CT_TIMEOUT_OTHER_NS: u64 = 30 * 1_000_000_000;
/// A TCP flow in its handshake (handshake table).
pub const CT_TIMEOUT_SYN_NS: u64 = 20 * 1_000_000_000;

/// The idle timeout of a flow-table entry.
pub const fn ct_timeout(proto: u8, flags: u8) -> u64 {
    match proto {
        crate::PROTO_TCP if flags & CT_F_CLOSING != 0 => CT_TIMEOUT_CLOSING_NS,
        crate::PROTO_TCP => CT_TIMEOUT_TCP_NS,
        crate::PROTO_UDP => CT_TIMEOUT_UDP_NS,
        _ => CT_TIMEOUT_OTHER_NS,
    }
}

const _: () = assert!(core::mem::size_of::<PortInfo>() == 24);
const _: () = assert!(core::mem::size_of::<EndpointKey>() == 24);
const _: () = assert!(core::mem::size_of::<Endpoint>() == 24);
const _: () = assert!(core::mem::size_of::<HostConfig>() == 8);
const _: () = assert!(core::mem::size_of::<ZoneAddrKey>() == 20);
const _: () = assert!(core::mem::size_of::<ZoneEndpoint>() == 20);
const _: () = assert!(core::mem::size_of::<FwPolicy>() == 16);
const _: () = assert!(core::mem::size_of::<FwRule>() == 32);
const _: () = assert!(core::mem::size_of::<FwVerdict>() == 24);
const _: () = assert!(core::mem::size_of::<ExchangeRule>() == 48);
const _: () = assert!(core::mem::size_of::<PortAddrKey>() == 24);
const _: () = assert!(core::mem::size_of::<PolicyDirKey>() == 8);
const _: () = assert!(core::mem::size_of::<PrefixLens>() == 24);
const _: () = assert!(core::mem::size_of::<AddrKey>() == 24);
const _: () = assert!(core::mem::size_of::<AddrIdentity>() == 12);
const _: () = assert!(core::mem::size_of::<RuleKey>() == 8);
const _: () = assert!(core::mem::size_of::<CtKey>() == 48);
const _: () = assert!(core::mem::size_of::<CtValue>() == 56);
const _: () = assert!(core::mem::size_of::<DenyEvent>() == 72);
const _: () = assert!(core::mem::size_of::<EventLimiter>() == 40);
const _: () = assert!(core::mem::size_of::<DnsCopy>() == 24);

/// Layouts of an earlier version of the maps, which an upgraded agent
/// migrates from: version 1 keyed flows without their door.
pub mod v1 {
    /// Pinned name of version 1's flow table ([`CtKey`] -> [`super::CtValue`], LRU).
    pub const CT: &str = "SDN_CT";
    /// Pinned name of version 1's firewall verdicts ([`CtKey`] -> [`super::FwVerdict`]).
    pub const FW_VERDICTS: &str = "SDN_FW_VERDICTS";
    /// Pinned name of version 1's drop counters (32 slots; version 2 starts
    /// its counters afresh).
    pub const DROPS: &str = "SDN_DROPS";
    /// Pinned names of version 1's exchange paths and firewall tables (one
    /// half; version 2 rebuilds them from the desired state).
    pub const EXCHANGE: &str = "SDN_EXCHANGE";
    pub const FW_POLICIES: &str = "SDN_FW_POLICIES";
    pub const FW_RULES: &str = "SDN_FW_RULES";
    /// Every pin of version 1 that version 2 no longer reads, removed once
    /// every link runs version 2's programs.
    pub const OBSOLETE: [&str; 6] = [CT, FW_VERDICTS, DROPS, EXCHANGE, FW_POLICIES, FW_RULES];

    /// Version 1's flow key: no door, no ICMP type.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct CtKey {
        pub ifindex: u32,
        pub family: u8,
        pub proto: u8,
        pub _pad: [u8; 2],
        pub local_port: u16,
        pub remote_port: u16,
        pub local: [u8; 16],
        pub remote: [u8; 16],
    }

    const _: () = assert!(core::mem::size_of::<CtKey>() == 44);

    #[cfg(feature = "user")]
    // SAFETY: repr(C), Copy, explicit padding, no pointers.
    unsafe impl aya::Pod for CtKey {}
}

/// Information systems a host counts the traffic of at most: slots of
/// [`SYSTEM_BYTES`].
pub const SYSTEM_SLOTS: u32 = 256;
/// Ports of information systems on a host at most.
pub const SYSTEM_PORTS_MAX: u32 = 4096;
/// Pinned names: each system port's slot (ifindex -> `u32`), and the
/// bytes each slot's ports sent to (`SYSTEM_UP`) and received from
/// (`SYSTEM_DOWN`) each zone, per CPU, at [`system_index`] (frames as the
/// port sends or receives them, Ethernet header included).
pub const SYSTEM_PORTS: &str = "SDN_SYSTEM_PORTS";
pub const SYSTEM_BYTES: &str = "SDN_SYSTEM_BYTES";
pub const SYSTEM_UP: u32 = 0;
pub const SYSTEM_DOWN: u32 = 1;

/// Where a system slot's bytes with zone number `zone` (1 to
/// [`ZONES_MAX`]) one way (`SYSTEM_UP`/`SYSTEM_DOWN`) are counted.
#[inline(always)]
pub const fn system_index(slot: u32, zone: u32, way: u32) -> u32 {
    (slot * ZONES_MAX + (zone - 1)) * 2 + way
}

/// Entries of [`SYSTEM_BYTES`].
pub const SYSTEM_BYTES_LEN: u32 = SYSTEM_SLOTS * ZONES_MAX * 2;

/// Mirror sessions a host holds at most: slots of [`MIRROR_SESSIONS`],
/// one bit each in a port's [`MirrorPort`] masks.
pub const MIRROR_SLOTS: u32 = 16;
/// Filters of one session at most.
pub const MIRROR_RULES: usize = 16;
/// Bytes of a packet copied to the agent at most (for a remote
/// destination, or a tap with a snap length).
pub const MIRROR_COPY_MAX: u32 = 9216;
/// Ports with mirroring (sessions or a tap) on a host at most.
pub const MIRROR_PORTS_MAX: u32 = 4096;
/// The mark a copy carries to its tap port: the tap's observer takes it
/// past the pipeline. Only the kernel sets marks (they do not cross from a
/// VM's namespace), and only our programs and the agent's own socket set
/// this one.
pub const MIRROR_MARK: u32 = 0x6d69_7272;

/// Pinned names: ports ([`MirrorPort`] by ifindex), sessions (array of
/// [`MirrorCfg`]), their per-CPU state (array of [`MirrorState`]), the
/// VNIs copies arrive under from other hosts ([`MirrorVni`] by VNI), and
/// the hosts they may come from (IPv4 underlay address, network order ->
/// `u8`).
pub const MIRROR_PORTS: &str = "SDN_MIRROR_PORTS";
pub const MIRROR_SESSIONS: &str = "SDN_MIRROR_SESSIONS";
pub const MIRROR_STATE: &str = "SDN_MIRROR_STATE";
pub const MIRROR_VNIS: &str = "SDN_MIRROR_VNIS";
pub const MIRROR_SENDERS: &str = "SDN_MIRROR_SENDERS";
pub const MIRROR_RING: &str = "SDN_MIRROR_RING";
/// Pinned name of one `u32`: how many ports copy what reaches them (the
/// pipeline looks no port up while it is 0).
pub const MIRROR_ON: &str = "SDN_MIRROR_ON";
/// Hosts that may send copies, at most.
pub const MIRROR_SENDERS_MAX: u32 = 4096;

/// A port's mirroring: the sessions copying what reaches the VM (`in`)
/// and what leaves it (`out`), and whether it is a tap (copies marked
/// [`MIRROR_MARK`] pass to it).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MirrorPort {
    pub in_mask: u32,
    pub out_mask: u32,
    pub tap: u32,
    pub _pad: u32,
}

/// One filter: a packet matches if each part does. Addresses are in
/// network order, masked; IPv4 in the first word.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MirrorRuleCfg {
    /// 0: either family; 4 or 6.
    pub family: u8,
    /// 0: any protocol.
    pub proto: u8,
    pub _pad: [u8; 2],
    /// Destination ports, inclusive; `port_hi` 0: any.
    pub port_lo: u16,
    pub port_hi: u16,
    pub src: [u32; 4],
    pub src_mask: [u32; 4],
    pub dst: [u32; 4],
    pub dst_mask: [u32; 4],
}

/// A session as the programs apply it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MirrorCfg {
    pub active: u32,
    /// Filters in `rules`; 0: every packet.
    pub nrules: u32,
    /// One packet in this many (0 or 1: every one).
    pub sample: u32,
    /// Bytes copied to the agent (0: the whole packet, up to
    /// [`MIRROR_COPY_MAX`]).
    pub snap_len: u32,
    /// Copies a second on each CPU at most.
    pub rate_per_cpu: u32,
    /// A tap port on this host that takes whole copies in the kernel (0:
    /// none).
    pub tap_ifindex: u32,
    /// 1: copies go to the agent (a remote destination, or a snap length).
    pub to_agent: u32,
    /// Changes whenever the slot takes another session: the agent drops
    /// copies of another generation (made before the change).
    pub generation: u32,
    pub rules: [MirrorRuleCfg; MIRROR_RULES],
}

impl Default for MirrorCfg {
    fn default() -> Self {
        MirrorCfg {
            active: 0,
            nrules: 0,
            sample: 0,
            snap_len: 0,
            rate_per_cpu: 0,
            tap_ifindex: 0,
            to_agent: 0,
            generation: 0,
            rules: [MirrorRuleCfg::default(); MIRROR_RULES],
        }
    }
}

/// A session's state and counters on one CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MirrorState {
    /// The one-second window of the rate, and the copies in it.
    pub window_ns: u64,
    pub in_window: u64,
    /// Packets matched (before sampling).
    pub matched: u64,
    /// Matched packets sampling left out.
    pub sampled_out: u64,
    /// Copies over the rate, dropped.
    pub over_rate: u64,
    /// Copies made (to the tap, or to the agent).
    pub copied: u64,
    /// Copies the kernel could not make or queue (a full ring, a tap
    /// gone), dropped.
    pub failed: u64,
}

/// What precedes a copy sent to the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MirrorCopy {
    pub now_ns: u64,
    /// The port whose traffic it is.
    pub ifindex: u32,
    /// Bytes of the packet that follow.
    pub len: u32,
    /// The packet's whole length.
    pub orig_len: u32,
    /// The session's slot.
    pub slot: u8,
    /// [`MIRROR_IN`] or [`MIRROR_OUT`].
    pub direction: u8,
    /// The session's generation (its low 16 bits).
    pub generation: u16,
}

pub const MIRROR_IN: u8 = 1;
pub const MIRROR_OUT: u8 = 2;

/// Copies that arrive from other hosts under a VNI: the tap they go to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MirrorVni {
    pub tap_ifindex: u32,
    pub slot: u32,
}

const _: () = assert!(core::mem::size_of::<MirrorRuleCfg>() == 72);
const _: () = assert!(core::mem::size_of::<MirrorCfg>() == 32 + 72 * MIRROR_RULES);
const _: () = assert!(core::mem::size_of::<MirrorState>() == 56);
const _: () = assert!(core::mem::size_of::<MirrorCopy>() == 24);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all are repr(C), Copy, with explicit padding and no pointers.
    unsafe impl aya::Pod for PortInfo {}
    unsafe impl aya::Pod for EndpointKey {}
    unsafe impl aya::Pod for Endpoint {}
    unsafe impl aya::Pod for HostConfig {}
    unsafe impl aya::Pod for ZoneAddrKey {}
    unsafe impl aya::Pod for ZoneEndpoint {}
    unsafe impl aya::Pod for VipLease {}
    unsafe impl aya::Pod for VrrpKey {}
    unsafe impl aya::Pod for VrrpGroup {}
    unsafe impl aya::Pod for VrrpSeenKey {}
    unsafe impl aya::Pod for VrrpSeen {}
    unsafe impl aya::Pod for ExchangeRule {}
    unsafe impl aya::Pod for FwPolicy {}
    unsafe impl aya::Pod for FwRule {}
    unsafe impl aya::Pod for FwVerdict {}
    unsafe impl aya::Pod for PortAddrKey {}
    unsafe impl aya::Pod for PolicyDirKey {}
    unsafe impl aya::Pod for PrefixLens {}
    unsafe impl aya::Pod for AddrKey {}
    unsafe impl aya::Pod for AddrIdentity {}
    unsafe impl aya::Pod for RuleKey {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for DenyEvent {}
    unsafe impl aya::Pod for EventLimiter {}
    unsafe impl aya::Pod for DnsCopy {}
    unsafe impl aya::Pod for MirrorPort {}
    unsafe impl aya::Pod for MirrorCfg {}
    unsafe impl aya::Pod for MirrorState {}
    unsafe impl aya::Pod for MirrorCopy {}
    unsafe impl aya::Pod for MirrorVni {}
}
