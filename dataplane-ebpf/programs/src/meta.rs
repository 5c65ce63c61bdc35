//! The metadata record: what the entry program parsed and what each stage
//! decided, in a per-CPU scratch slot. A packet's stages run one after the
//! other on one CPU (tail calls), so the slot is the packet's alone from
//! its entry to its verdict. Later stages read the record, not the packet.

use dataplane_common::maps::{CtKey, PortInfo};

/// Entry programs.
pub const E_FROM_VM: u8 = 1;
pub const E_TO_VM: u8 = 2;
pub const E_FROM_UPLINK: u8 = 3;
pub const E_FROM_OVERLAY: u8 = 4;
/// A north-south flow translated on this NAT host, on its way into the
/// VPC (from the NAT address to the member).
pub const E_NAT: u8 = 5;

/// What the packet is.
pub const K_IP: u8 = 1;
/// An ARP request from a port, answered by the distributed gateway.
pub const K_ARP: u8 = 2;
/// A neighbour solicitation from a port, answered by the gateway.
pub const K_NS: u8 = 3;
/// Neighbour discovery or ARP passed to the host's stack or to the VM
/// after its checks, outside the policy tiers.
pub const K_NEIGHBOUR: u8 = 4;
/// An ICMP error about a tracked flow of every local side.
pub const K_RELATED: u8 = 5;

/// Where an IP packet goes.
pub const O_PORT: u8 = 1;
pub const O_TUNNEL: u8 = 2;
pub const O_UPLINK: u8 = 3;
/// A member's reply to this host's NAT address: translated back
/// (`st_nat_out`).
pub const O_NAT: u8 = 4;

/// Conntrack state of one local side of a flow.
pub const S_NONE: u8 = 0;
/// A live entry, judged under the current policy.
pub const S_EST: u8 = 1;
/// A live entry judged under an older policy: judged again.
pub const S_STALE: u8 = 2;
/// No live entry: a new flow.
pub const S_NEW: u8 = 3;

/// Load balancing of a packet: none (yet); a flow to a VIP whose backend
/// is chosen now; one that has its backend from before.
pub const LB_NONE: u8 = 0;
pub const LB_NEW: u8 = 1;
pub const LB_EST: u8 = 2;
/// Its backend from before, not confirmed yet: it moves to the confirmed
/// flows once conntrack confirms the client's side.
pub const LB_EST_NEW: u8 = 3;
/// North-south: a segment of a flow the VIP's previous owner translated,
/// picked up here (`NAT_PICKUP`).
pub const LB_PICKUP: u8 = 4;

/// Which table an entry was found in.
pub const T_MAIN: u8 = 1;
pub const T_SYN: u8 = 2;

/// Which side of the flow crosses a boundary that a tier-2/3 check guards.
pub const X_NONE: u8 = 0;
/// A VM sends out of a zone uplink (the source side).
pub const X_ZONE_OUT: u8 = 1;
/// A packet from a zone uplink to a VM (the destination side).
pub const X_ZONE_IN: u8 = 2;
/// A packet from a peered VPC to a VM (the destination side).
pub const X_PEER: u8 = 3;

#[repr(C)]
pub struct Meta {
    /// The clock (CLOCK_MONOTONIC, coarse) when the packet entered: one
    /// reading serves every stage's timestamps and timeouts.
    pub now: u64,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// The sending port when it is on this host.
    pub src_port: PortInfo,
    /// The receiving port when it is on this host.
    pub dst_port: PortInfo,
    pub src_ifx: u32,
    pub dst_ifx: u32,
    /// The door of the sending port's flow entry (where its remote end is).
    pub src_door: u32,
    /// The door of the receiving port's flow entry.
    pub dst_door: u32,
    /// Output device (port, VXLAN device or uplink).
    pub out_ifx: u32,
    pub tun_vni: u32,
    pub tun_remote: [u8; 4],
    /// The firewall policy of the crossing; 0: none.
    pub fw_policy: u32,
    /// The firewall rule that decided (recorded at commit).
    pub fw_rule: u32,
    /// Zone of the VM's VPC, and of the uplink crossed.
    pub vm_zone: u32,
    pub uplink_zone: u32,
    pub len: u32,
    pub sport: u16,
    pub dport: u16,
    pub l4_off: u16,
    pub end: u16,
    pub arp_op: u16,
    pub _pad0: u16,
    pub dst_mac: [u8; 6],
    pub arp_sha: [u8; 6],
    pub arp_spa: [u8; 4],
    pub arp_tpa: [u8; 4],
    pub family: u8,
    pub proto: u8,
    pub tcp_flags: u8,
    pub icmp_type: u8,
    /// `icmp_class` of the packet (part of the flow key).
    pub icmp: u8,
    pub entry: u8,
    pub kind: u8,
    pub out: u8,
    pub ct_src: u8,
    pub ct_dst: u8,
    pub tbl_src: u8,
    pub tbl_dst: u8,
    pub crossing: u8,
    /// Firewall: direction of the rules, whether the remote is the source,
    /// the action taken, and whether a verdict is to be recorded.
    pub fw_dir: u8,
    pub fw_remote_is_src: u8,
    pub fw_action: u8,
    pub fw_record: u8,
    /// For a flow found under an older policy: who opened it, and the
    /// service it was judged on.
    pub org_src: u8,
    pub org_dst: u8,
    /// Load balancing: `LB_*`.
    pub lb: u8,
    pub svc_src: u16,
    pub svc_dst: u16,
    /// TCP sequence and acknowledgement numbers.
    pub tcp_seq: u32,
    pub tcp_ack: u32,
    /// The device the packet came in by.
    pub in_ifx: u32,
    /// A flow to a VIP: the VIP and its port (the packet's destination
    /// until the commit translates it), and the service and backend slot
    /// the flow goes to (`dst` and `dport` are the backend's).
    pub lb_vip: [u8; 16],
    pub lb_service: u32,
    pub lb_slot: u16,
    pub lb_vport: u16,
    /// Round robin: where the cursor goes when the new flow is committed
    /// (`LB_NO_CURSOR`: not a cursor's pick).
    pub lb_cursor: u16,
    /// The flow's service has source persistence.
    pub lb_persist: u8,
    /// North-south: `LB_NEW`, `LB_EST`, `LB_EST_NEW` or `LB_PICKUP` for a
    /// flow from the zone to a VIP translated here; `LB_NONE` otherwise.
    pub nat: u8,
    pub _pad2: [u8; 4],
    /// North-south: the client's address and port (the packet's source
    /// until the commit translates it; `src` and `sport` are the NAT
    /// address and port), and the VPC's VNI.
    pub nat_client: [u8; 16],
    pub nat_cport: u16,
    pub _pad3: u16,
    pub nat_vni: u32,
}

/// [`Meta::lb_cursor`] of a flow no cursor picked.
pub const LB_NO_CURSOR: u16 = u16::MAX;

const _: () = assert!(core::mem::size_of::<Meta>() == 264);

impl Meta {
    /// Clears what an earlier packet on this CPU may have left.
    #[inline(always)]
    pub fn reset(&mut self, entry: u8, in_ifx: u32) {
        // SAFETY: the helper has no preconditions.
        self.now = unsafe { aya_ebpf::helpers::gen::bpf_ktime_get_coarse_ns() };
        self.entry = entry;
        self.in_ifx = in_ifx;
        // What a denial reports of a packet dropped before its headers
        // were read: nothing of the packet before it (its addresses are
        // reported only once `family` says they were read).
        self.len = 0;
        self.kind = 0;
        self.out = 0;
        self.src_ifx = 0;
        self.dst_ifx = 0;
        self.src_door = 0;
        self.dst_door = 0;
        self.out_ifx = 0;
        self.ct_src = S_NONE;
        self.ct_dst = S_NONE;
        self.tbl_src = 0;
        self.tbl_dst = 0;
        self.crossing = X_NONE;
        self.fw_policy = 0;
        self.fw_record = 0;
        self.vm_zone = 0;
        self.uplink_zone = 0;
        self.sport = 0;
        self.dport = 0;
        self.tcp_flags = 0;
        self.icmp_type = 0;
        self.icmp = 0;
        self.proto = 0;
        self.family = 0;
        self.lb = LB_NONE;
        self.nat = LB_NONE;
    }

    /// The flow key of the sending port's side: the port's address is the
    /// source.
    #[inline(always)]
    pub fn src_key(&self, k: &mut CtKey) {
        k.ifindex = self.src_ifx;
        k.family = self.family;
        k.proto = self.proto;
        k.icmp = self.icmp;
        k._pad = 0;
        k.local_port = self.sport;
        k.remote_port = self.dport;
        k.local = self.src;
        k.remote = self.dst;
        k.door = self.src_door;
    }

    /// The flow key of the receiving port's side.
    #[inline(always)]
    pub fn dst_key(&self, k: &mut CtKey) {
        k.ifindex = self.dst_ifx;
        k.family = self.family;
        k.proto = self.proto;
        k.icmp = self.icmp;
        k._pad = 0;
        k.local_port = self.dport;
        k.remote_port = self.sport;
        k.local = self.dst;
        k.remote = self.src;
        k.door = self.dst_door;
    }

    /// The service a rule matches: destination port, or the ICMP type.
    #[inline(always)]
    pub fn service(&self) -> u16 {
        if self.proto == dataplane_common::PROTO_ICMP || self.proto == dataplane_common::PROTO_ICMPV6 {
            self.icmp_type as u16
        } else {
            self.dport
        }
    }
}

/// An empty key, filled by [`Meta::src_key`] or [`Meta::dst_key`].
pub const EMPTY_KEY: CtKey = CtKey {
    ifindex: 0,
    family: 0,
    proto: 0,
    icmp: 0,
    _pad: 0,
    local_port: 0,
    remote_port: 0,
    local: [0; 16],
    remote: [0; 16],
    door: 0,
};
