//! The programs' maps. Names, keys, values and sizes come from `dataplane_common::maps`.

use aya_ebpf::{
    macros::map,
    maps::{
        lpm_trie::LpmTrie, Array, HashMap, LruHashMap, LruPerCpuHashMap, PerCpuArray, PerfEventByteArray, ProgramArray,
        RingBuf,
    },
    programs::TcContext,
};
use dataplane_common::{
    lb::{
        LbBackend, LbConns, LbFlow, LbFlowKey, LbPersist, LbPersistKey, LbReverse, LbReverseKey, LbService,
        LbServiceKey, NatFlow, NatKey, NatPickup, NatPickupKey, NatReverseKey, NatService, NatServiceKey, LB_BACKENDS,
        LB_FLOWS_MAX, LB_FLOWS_NEW_MAX, LB_PERSIST_MAX, LB_SERVICES_MAX, LB_TABLE_SIZE, NAT_PICKUP_MAX, NAT_SYNC_BYTES,
    },
    maps::{
        system_index, AddrIdentity, AddrKey, CtKey, CtValue, DenyEvent, DnsCopy, Endpoint, EndpointKey, EventLimiter,
        ExchangeRule, FwPolicy, FwRule, FwVerdict, HostConfig, MirrorCfg, MirrorPort, MirrorState, MirrorVni,
        PolicyDirKey, PortAddrKey, PortInfo, PrefixLens, RuleKey, RuleName, VipLease, VrrpGroup, VrrpKey, VrrpSeen,
        VrrpSeenKey, ZoneAddrKey, ZoneEndpoint, CT_MAX, CT_ORIGIN_IN, CT_ORIGIN_OUT, CT_SYN_MAX, DNS_COPY_MAX,
        DNS_PER_PORT_PER_SEC, DNS_PER_SEC, DNS_ROLE_ANSWERED, DNS_ROLE_ASKED, ENDPOINTS_MAX, EVENTS_BYTES,
        EVENTS_PER_PORT_PER_SEC, EVENTS_PER_SEC, EVENT_PORT_LIMIT_MAX, EVENT_REASONS, EXCHANGE_MAX, FW_NAMES_MAX,
        FW_POLICIES_MAX, FW_RULES_MAX, FW_VERDICTS_MAX, LIMIT_DENIALS, LIMIT_DNS, LIMIT_GUARDS, LIMIT_SLOTS,
        MIRROR_PORTS_MAX, MIRROR_SENDERS_MAX, MIRROR_SLOTS, POLICY_PLENS_MAX, PORTS_MAX, PORT_ADDRS_MAX,
        PORT_F_QUARANTINED, PORT_LIMIT_DNS, PORT_LIMIT_GUARDS, SG_ADDR_MAX, SG_RULES_MAX, SIDE_FOR, SIDE_SENT,
        SYSTEM_BYTES_LEN, SYSTEM_PORTS_MAX, SYSTEM_SLOTS, UPLINK_ADDRS_MAX, VIP_LEASES_MAX, VPC_NETS_MAX,
        VRRP_GROUPS_MAX, VRRP_SEEN_MAX, ZONES_MAX, ZONE_ENDPOINTS_MAX, ZONE_NETS_MAX,
    },
    stage, DropReason, Stat, DROP_REASON_SLOTS, STAT_SLOTS,
};

use crate::meta::{Meta, E_FROM_UPLINK, S_EST, S_STALE, X_ZONE_IN};

#[map(name = "SDN_PORTS")]
pub static PORTS: HashMap<u32, PortInfo> = HashMap::pinned(PORTS_MAX, 0);

#[map(name = "SDN_PORT_ADDRS")]
pub static PORT_ADDRS: HashMap<PortAddrKey, u8> = HashMap::pinned(PORT_ADDRS_MAX, 0);

#[map(name = "SDN_POLICY_PLENS")]
pub static POLICY_PLENS: HashMap<PolicyDirKey, PrefixLens> = HashMap::pinned(POLICY_PLENS_MAX, 0);

#[map(name = "SDN_SG_ADDR")]
pub static SG_ADDR: HashMap<AddrKey, AddrIdentity> = HashMap::pinned(SG_ADDR_MAX, 0);

#[map(name = "SDN_SG_RULES")]
pub static SG_RULES: HashMap<RuleKey, u8> = HashMap::pinned(SG_RULES_MAX, 0);

/// Established flows: a plain hash, so nothing evicts them; full means new
/// flows are refused (`ct_full`).
#[map(name = "SDN_CT2")]
pub static CT: HashMap<CtKey, CtValue> = HashMap::pinned(CT_MAX, 0);

/// TCP handshakes, in an LRU of their own.
#[map(name = "SDN_CT_SYN")]
pub static CT_SYN: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(CT_SYN_MAX, 0);

/// What the ACK completing a handshake must acknowledge.
#[map(name = "SDN_CT_ISN")]
pub static CT_ISN: LruHashMap<CtKey, u32> = LruHashMap::pinned(CT_SYN_MAX, 0);

/// Flow-table entries per port.
#[map(name = "SDN_CT_COUNT")]
pub static CT_COUNT: HashMap<u32, u32> = HashMap::pinned(PORTS_MAX, 0);

/// The pipeline's stages. Not pinned by name: every load of the programs
/// has its own array, which the agent fills and pins under a name of its
/// own before it swaps the entry programs in, so a packet runs the stages
/// of one version only.
#[map(name = "SDN_PIPE")]
pub static PIPE: ProgramArray = ProgramArray::with_max_entries(stage::SLOTS, 0);

/// The metadata record of the packet being judged on this CPU.
#[map(name = "SDN_META")]
pub static META: PerCpuArray<Meta> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "SDN_ENDPOINTS")]
pub static ENDPOINTS: HashMap<EndpointKey, Endpoint> = HashMap::pinned(ENDPOINTS_MAX, 0);

#[map(name = "SDN_CONFIG")]
pub static CONFIG: Array<HostConfig> = Array::pinned(1, 0);

/// LPM tries need BPF_F_NO_PREALLOC.
const NO_PREALLOC: u32 = 1;

#[map(name = "SDN_ZONE_NETS")]
pub static ZONE_NETS: LpmTrie<[u8; 20], u32> = LpmTrie::pinned(ZONE_NETS_MAX, NO_PREALLOC);

#[map(name = "SDN_VPC_NETS")]
pub static VPC_NETS: LpmTrie<[u8; 20], u32> = LpmTrie::pinned(VPC_NETS_MAX, NO_PREALLOC);

#[map(name = "SDN_UPLINKS")]
pub static UPLINKS: HashMap<u32, u32> = HashMap::pinned(ZONES_MAX, 0);

#[map(name = "SDN_ZONE_UPLINK")]
pub static ZONE_UPLINK: HashMap<u32, u32> = HashMap::pinned(ZONES_MAX, 0);

#[map(name = "SDN_ZONE_ENDPOINTS")]
pub static ZONE_ENDPOINTS: HashMap<ZoneAddrKey, ZoneEndpoint> = HashMap::pinned(ZONE_ENDPOINTS_MAX, 0);

#[map(name = "SDN_UPLINK_ADDRS")]
pub static UPLINK_ADDRS: HashMap<PortAddrKey, u8> = HashMap::pinned(UPLINK_ADDRS_MAX, 0);

#[map(name = "SDN_EXCHANGE2")]
pub static EXCHANGE: Array<ExchangeRule> = Array::pinned(2 * EXCHANGE_MAX, 0);

#[map(name = "SDN_EXCHANGE_HALF")]
pub static EXCHANGE_HALF: Array<u32> = Array::pinned(1, 0);

/// Both halves' headers while a change switches between them.
#[map(name = "SDN_FW_POLICIES2")]
pub static FW_POLICIES: HashMap<u32, FwPolicy> = HashMap::pinned(2 * FW_POLICIES_MAX, 0);

#[map(name = "SDN_FW_RULES2")]
pub static FW_RULES: Array<FwRule> = Array::pinned(2 * FW_RULES_MAX, 0);

#[map(name = "SDN_FW_VERDICTS2")]
pub static FW_VERDICTS: LruHashMap<CtKey, FwVerdict> = LruHashMap::pinned(FW_VERDICTS_MAX, 0);

/// Read by user space only.
#[map(name = "SDN_FW_NAMES")]
pub static FW_NAMES: HashMap<u32, RuleName> = HashMap::pinned(FW_NAMES_MAX, 0);

#[map(name = "SDN_DROPS2")]
pub static DROPS: PerCpuArray<u64> = PerCpuArray::pinned(DROP_REASON_SLOTS, 0);

#[map(name = "SDN_STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::pinned(STAT_SLOTS, 0);

#[inline(always)]
pub fn count_drop(reason: DropReason) {
    if let Some(p) = DROPS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *p += 1 };
    }
}

#[map(name = "SDN_EVENTS")]
pub static EVENTS: RingBuf = RingBuf::pinned(EVENTS_BYTES, 0);

#[map(name = "SDN_EVENT_LIMIT")]
pub static EVENT_LIMIT: PerCpuArray<EventLimiter> = PerCpuArray::pinned(LIMIT_SLOTS, 0);

#[map(name = "SDN_DNS")]
pub static DNS: PerfEventByteArray = PerfEventByteArray::new(0);

#[map(name = "SDN_MIRROR_PORTS")]
pub static MIRROR_PORTS: HashMap<u32, MirrorPort> = HashMap::pinned(MIRROR_PORTS_MAX, 0);

#[map(name = "SDN_MIRROR_SESSIONS")]
pub static MIRROR_SESSIONS: Array<MirrorCfg> = Array::pinned(MIRROR_SLOTS, 0);

#[map(name = "SDN_MIRROR_STATE")]
pub static MIRROR_STATE: PerCpuArray<MirrorState> = PerCpuArray::pinned(MIRROR_SLOTS, 0);

#[map(name = "SDN_MIRROR_VNIS")]
pub static MIRROR_VNIS: HashMap<u32, MirrorVni> = HashMap::pinned(MIRROR_SLOTS, 0);

#[map(name = "SDN_MIRROR_SENDERS")]
pub static MIRROR_SENDERS: HashMap<u32, u8> = HashMap::pinned(MIRROR_SENDERS_MAX, 0);

#[map(name = "SDN_SYSTEM_PORTS")]
pub static SYSTEM_PORTS: HashMap<u32, u32> = HashMap::pinned(SYSTEM_PORTS_MAX, 0);

#[map(name = "SDN_SYSTEM_BYTES")]
pub static SYSTEM_BYTES: PerCpuArray<u64> = PerCpuArray::pinned(SYSTEM_BYTES_LEN, 0);

/// Counts `len` bytes of the port behind `ifx` with zone `zone` one way,
/// if the port is an information system's.
#[inline(always)]
pub fn count_system(ifx: u32, zone: u32, way: u32, len: u32) {
    if zone == 0 || zone > ZONES_MAX {
        return;
    }
    // SAFETY: the value is copied out at once.
    let Some(slot) = (unsafe { SYSTEM_PORTS.get(&ifx) }).copied() else {
        return;
    };
    if slot >= SYSTEM_SLOTS {
        return;
    }
    if let Some(c) = SYSTEM_BYTES.get_ptr_mut(system_index(slot, zone, way)) {
        // SAFETY: this CPU's own slot.
        unsafe { *c += len as u64 };
    }
}

#[map(name = "SDN_MIRROR_ON")]
pub static MIRROR_ON: Array<u32> = Array::pinned(1, 0);

/// The port a delivery waits to be copied for, between the pipeline and
/// `st_mirror` (scratch, per CPU).
#[map(name = "SDN_MIRROR_PENDING")]
pub static MIRROR_PENDING: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// Whether a delivery to `ifindex` is to be copied first.
#[inline(always)]
pub fn mirror_in(ifindex: u32) -> bool {
    if MIRROR_ON.get(0).is_none_or(|n| *n == 0) {
        return false;
    }
    // SAFETY: a read of a map value.
    unsafe { MIRROR_PORTS.get(&ifindex) }.is_some_and(|p| p.in_mask != 0)
}

/// Copies for the agent to send on (not pinned: each agent opens its own).
#[map(name = "SDN_MIRROR_RING")]
pub static MIRROR_RING: PerfEventByteArray = PerfEventByteArray::new(0);

#[map(name = "SDN_EVENT_PORT_LIMIT")]
pub static EVENT_PORT_LIMIT: LruPerCpuHashMap<u32, EventLimiter> = LruPerCpuHashMap::pinned(EVENT_PORT_LIMIT_MAX, 0);

/// Counts one event against `l`'s one-second window: whether it may go
/// (at most `per_sec` a second); what is over is counted as suppressed.
#[inline(always)]
fn take(l: &mut EventLimiter, now: u64, per_sec: u64) -> bool {
    if now.wrapping_sub(l.window_ns) >= 1_000_000_000 {
        l.window_ns = now;
        l.in_window = 0;
    }
    if l.in_window >= per_sec {
        l.suppressed += 1;
        return false;
    }
    l.in_window += 1;
    true
}

/// The limiter of `slot` on this CPU, if the event it counts may go.
#[inline(always)]
fn admit(slot: u32, now: u64, per_sec: u64) -> Option<&'static mut EventLimiter> {
    let l = EVENT_LIMIT.get_ptr_mut(slot)?;
    // SAFETY: per-CPU slot, no concurrent writer on this CPU.
    let l = unsafe { &mut *l };
    take(l, now, per_sec).then_some(l)
}

/// Whether the port's own share of this CPU's events of its class has room.
#[inline(always)]
fn port_admits(key: u32, now: u64, per_sec: u64) -> bool {
    if let Some(l) = EVENT_PORT_LIMIT.get_ptr_mut(&key) {
        // SAFETY: per-CPU value, no concurrent writer on this CPU.
        return take(unsafe { &mut *l }, now, per_sec);
    }
    let fresh = EventLimiter {
        window_ns: now,
        in_window: 1,
        sent: 0,
        suppressed: 0,
        lost: 0,
    };
    let _ = EVENT_PORT_LIMIT.insert(&key, &fresh, 0);
    true
}

/// The port of this host a drop is charged to, and its part: the one
/// whose rules or state refused the packet.
#[inline(always)]
fn refusing_port(m: &Meta, reason: DropReason) -> (u32, u8) {
    let sender = (m.src_ifx, SIDE_SENT);
    let receiver = (m.dst_ifx, SIDE_FOR);
    let local_sender = if m.src_ifx != 0 { sender } else { receiver };
    match reason {
        DropReason::PolicyIngress => receiver,
        DropReason::PolicyEgress => sender,
        DropReason::Quarantined => {
            if m.src_ifx != 0 && m.src_port.flags & PORT_F_QUARANTINED != 0 {
                sender
            } else {
                receiver
            }
        }
        // A peering's firewall is judged on the receiving side.
        DropReason::VpcFirewall => receiver,
        DropReason::BorderFirewall | DropReason::ZoneIsolation => {
            if m.crossing == X_ZONE_IN || m.entry == E_FROM_UPLINK {
                receiver
            } else {
                local_sender
            }
        }
        _ => local_sender,
    }
}

/// Reports a packet a security tier drops, within the port's share and
/// the CPU's rate of its class: what is over is counted, and so is what
/// the ring has no room for.
#[inline(always)]
pub fn report_denial(m: &Meta, reason: DropReason) {
    if (EVENT_REASONS >> (reason as u32)) & 1 == 0 {
        return;
    }
    let guards = !matches!(
        reason,
        DropReason::PolicyIngress | DropReason::PolicyEgress | DropReason::PolicyRevoked
    );
    let (port, side) = refusing_port(m, reason);
    let key =
        (if port != 0 { port } else { m.in_ifx } & !PORT_LIMIT_GUARDS) | if guards { PORT_LIMIT_GUARDS } else { 0 };
    if !port_admits(key, m.now, EVENTS_PER_PORT_PER_SEC) {
        return;
    }
    let slot = if guards { LIMIT_GUARDS } else { LIMIT_DENIALS };
    let Some(l) = admit(slot, m.now, EVENTS_PER_SEC) else {
        return;
    };
    let Some(mut e) = EVENTS.reserve::<DenyEvent>(0) else {
        l.lost += 1;
        return;
    };
    let firewall = matches!(reason, DropReason::BorderFirewall | DropReason::VpcFirewall);
    e.write(DenyEvent {
        now_ns: m.now,
        port_ifx: port,
        device: m.in_ifx,
        rule: if firewall { m.fw_rule } else { 0 },
        len: m.len,
        reason: reason as u8,
        family: m.family,
        proto: m.proto,
        entry: m.entry,
        sport: m.sport,
        dport: m.service(),
        src: if m.family != 0 { m.src } else { [0; 16] },
        dst: if m.family != 0 { m.dst } else { [0; 16] },
        side,
        _pad: [0; 7],
    });
    e.submit(0);
    l.sent += 1;
}

/// Copies a DNS answer up to the agent, which parses it (never the
/// programs): a UDP packet from port 53 of a flow a port of this host
/// opened (the answer to its question) or that was opened towards a port
/// serving DNS here, never a packet that starts a flow; within the port's
/// share and the CPU's rate.
#[inline(always)]
pub fn copy_dns(ctx: &TcContext, m: &Meta) {
    if m.proto != dataplane_common::PROTO_UDP || m.sport != 53 {
        return;
    }
    let known = |state: u8| state == S_EST || state == S_STALE;
    let (port, role) = if m.dst_ifx != 0 && known(m.ct_dst) && m.org_dst == CT_ORIGIN_OUT {
        (m.dst_ifx, DNS_ROLE_ASKED)
    } else if m.src_ifx != 0 && known(m.ct_src) && m.org_src == CT_ORIGIN_IN {
        (m.src_ifx, DNS_ROLE_ANSWERED)
    } else {
        return;
    };
    if !port_admits(
        (port & !(PORT_LIMIT_DNS | PORT_LIMIT_GUARDS)) | PORT_LIMIT_DNS,
        m.now,
        DNS_PER_PORT_PER_SEC,
    ) {
        return;
    }
    let Some(l) = admit(LIMIT_DNS, m.now, DNS_PER_SEC) else {
        return;
    };
    let len = if m.len > DNS_COPY_MAX { DNS_COPY_MAX } else { m.len };
    let hdr = DnsCopy {
        now_ns: m.now,
        ifindex: port,
        len,
        l4_off: m.l4_off,
        family: m.family,
        entry: m.entry,
        role,
        _pad: [0; 3],
    };
    // SAFETY: DnsCopy is plain data; the slice covers exactly it.
    let bytes =
        unsafe { core::slice::from_raw_parts(&hdr as *const DnsCopy as *const u8, core::mem::size_of::<DnsCopy>()) };
    // The helper appends the packet's first `len` bytes after the header.
    DNS.output(ctx, bytes, len);
    l.sent += 1;
}

#[inline(always)]
pub fn count(stat: Stat) {
    if let Some(p) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *p += 1 };
    }
}

/// Whether an address set (a port's or an uplink's addresses) holds `addr`
/// for the device `ifindex`.
#[inline(always)]
pub fn has_addr(set: &HashMap<PortAddrKey, u8>, ifindex: u32, family: u8, addr: &[u8; 16]) -> bool {
    let k = PortAddrKey {
        ifindex,
        family,
        _pad: [0; 3],
        addr: *addr,
    };
    // SAFETY: presence check only.
    unsafe { set.get(&k) }.is_some()
}

/// The record of the packet on this CPU.
#[inline(always)]
pub fn meta() -> Option<&'static mut Meta> {
    // SAFETY: a per-CPU slot; one packet at a time runs on a CPU from its
    // entry to its verdict.
    META.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// The load balancer's services (a listener's VIP of one family).
#[map(name = "SDN_LB_SERVICES")]
pub static LB_SERVICES: HashMap<LbServiceKey, LbService> = HashMap::pinned(LB_SERVICES_MAX, 0);

/// Each service's backend slots, at `id * LB_BACKENDS + slot`.
#[map(name = "SDN_LB_BACKENDS")]
pub static LB_BACKENDS_ARR: Array<LbBackend> = Array::pinned(LB_SERVICES_MAX * LB_BACKENDS, 0);

/// Each service's table of backend slots, at `id * LB_TABLE_SIZE + i`
/// (`u32::MAX`: none).
#[map(name = "SDN_LB_TABLE")]
pub static LB_TABLE_ARR: Array<u32> = Array::pinned(LB_SERVICES_MAX * LB_TABLE_SIZE, 0);

/// Round robin's cursor in each service's table, per CPU.
#[map(name = "SDN_LB_CURSOR")]
pub static LB_CURSOR: PerCpuArray<u32> = PerCpuArray::pinned(LB_SERVICES_MAX, 0);

/// Confirmed load-balanced flows, by their client's side.
#[map(name = "SDN_LB_FLOWS")]
pub static LB_FLOWS: LruHashMap<LbFlowKey, LbFlow> = LruHashMap::pinned(LB_FLOWS_MAX, 0);

/// Their replies: what a backend's source becomes towards the client.
#[map(name = "SDN_LB_REVERSE")]
pub static LB_REVERSE: LruHashMap<LbReverseKey, LbReverse> = LruHashMap::pinned(LB_FLOWS_MAX, 0);

/// Unconfirmed load-balanced flows and their replies, apart.
#[map(name = "SDN_LB_FLOWS_NEW")]
pub static LB_FLOWS_NEW: LruHashMap<LbFlowKey, LbFlow> = LruHashMap::pinned(LB_FLOWS_NEW_MAX, 0);

/// Each backend slot's flows, for least connections.
#[map(name = "SDN_LB_CONNS")]
pub static LB_CONNS: Array<LbConns> = Array::pinned(LB_SERVICES_MAX * LB_BACKENDS, 0);

/// Source persistence: each client's member, per service.
#[map(name = "SDN_LB_PERSIST")]
pub static LB_PERSIST: LruHashMap<LbPersistKey, LbPersist> = LruHashMap::pinned(LB_PERSIST_MAX, 0);

#[map(name = "SDN_LB_REVERSE_NEW")]
pub static LB_REVERSE_NEW: LruHashMap<LbReverseKey, LbReverse> = LruHashMap::pinned(LB_FLOWS_NEW_MAX, 0);

/// North-south services of the load balancers this host translates for.
#[map(name = "SDN_NAT_SERVICES")]
pub static NAT_SERVICES: HashMap<NatServiceKey, NatService> = HashMap::pinned(LB_SERVICES_MAX, 0);

/// Confirmed north-south flows, by the zone's side (as many as the flow
/// table holds). A plain hash, as the flow table is: nothing evicts a
/// confirmed flow; a flow that finds it full stays unconfirmed and is
/// refused (`ct_full`). The agent's collector removes those timed out.
#[map(name = "SDN_NAT_FLOWS")]
pub static NAT_FLOWS: HashMap<NatKey, NatFlow> = HashMap::pinned(LB_FLOWS_MAX, 0);

/// Their replies, by the VPC's side: the zone's side of the flow. A plain
/// hash: a reply's entry holds its NAT port until the agent's collector
/// removes it with its flow, so no other flow can take the port while the
/// flow lives.
#[map(name = "SDN_NAT_REVERSE")]
pub static NAT_REVERSE: HashMap<NatReverseKey, NatKey> = HashMap::pinned(LB_FLOWS_MAX, 0);

/// VRRP routers of virtual IPs held by ports (`vrrp.rs`).
#[map(name = "SDN_VRRP_GROUPS")]
pub static VRRP_GROUPS: HashMap<VrrpKey, VrrpGroup> = HashMap::pinned(VRRP_GROUPS_MAX, 0);

#[map(name = "SDN_VRRP_SEEN")]
pub static VRRP_SEEN: HashMap<VrrpSeenKey, VrrpSeen> = HashMap::pinned(VRRP_SEEN_MAX, 0);

#[map(name = "SDN_VIP_LEASES")]
pub static VIP_LEASES: HashMap<ZoneAddrKey, VipLease> = HashMap::pinned(VIP_LEASES_MAX, 0);

/// A secret of this host that the NAT ports of new flows are drawn with,
/// set by the agent (so a zone's host cannot work out which ports a
/// client's flows would take).
#[map(name = "SDN_NAT_SEED")]
pub static NAT_SEED: Array<u32> = Array::pinned(1, 0);

/// Unconfirmed north-south flows and their replies, apart: a flood of
/// flows nobody completes evicts only its own kind.
#[map(name = "SDN_NAT_FLOWS_NEW")]
pub static NAT_FLOWS_NEW: LruHashMap<NatKey, NatFlow> = LruHashMap::pinned(LB_FLOWS_NEW_MAX, 0);

#[map(name = "SDN_NAT_REVERSE_NEW")]
pub static NAT_REVERSE_NEW: LruHashMap<NatReverseKey, NatKey> = LruHashMap::pinned(LB_FLOWS_NEW_MAX, 0);

/// Takeovers of VIPs held by hosts, whose previous owner's flows are
/// picked up for a while (written by the agent).
#[map(name = "SDN_NAT_PICKUP")]
pub static NAT_PICKUP: HashMap<NatPickupKey, NatPickup> = HashMap::pinned(NAT_PICKUP_MAX, 0);

#[map(name = "SDN_NAT_SYNC")]
pub static NAT_SYNC: RingBuf = RingBuf::pinned(NAT_SYNC_BYTES, 0);
