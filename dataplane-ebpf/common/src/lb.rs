//! The L4 load balancer's maps, shared by the programs and the agent.
//!
//! A listener's VIP of one family is a *service*, numbered by the agent
//! (kept from pass to pass). Each service has up to [`LB_BACKENDS`]
//! backend slots and a table of [`LB_TABLE_SIZE`] slots that the agent
//! fills from the scheduler: Maglev's lookup table, or the smooth
//! weighted round-robin sequence. A new flow picks a table slot (Maglev:
//! by [`flow_hash`], the same on every host; round robin: by a per-CPU
//! cursor), and the flow keeps its backend in [`LbFlow`] from then on.

/// Pinned names.
pub const LB_SERVICES: &str = "SDN_LB_SERVICES";
pub const LB_BACKENDS_MAP: &str = "SDN_LB_BACKENDS";
pub const LB_TABLE: &str = "SDN_LB_TABLE";
pub const LB_CURSOR: &str = "SDN_LB_CURSOR";
pub const LB_FLOWS: &str = "SDN_LB_FLOWS";
pub const LB_REVERSE: &str = "SDN_LB_REVERSE";
pub const LB_FLOWS_NEW: &str = "SDN_LB_FLOWS_NEW";
pub const LB_REVERSE_NEW: &str = "SDN_LB_REVERSE_NEW";
pub const LB_PERSIST: &str = "SDN_LB_PERSIST";
pub const LB_CONNS: &str = "SDN_LB_CONNS";
pub const NAT_SERVICES: &str = "SDN_NAT_SERVICES";
pub const NAT_FLOWS: &str = "SDN_NAT_FLOWS";
pub const NAT_REVERSE: &str = "SDN_NAT_REVERSE";
pub const NAT_FLOWS_NEW: &str = "SDN_NAT_FLOWS_NEW";
pub const NAT_SEED: &str = "SDN_NAT_SEED";
pub const NAT_REVERSE_NEW: &str = "SDN_NAT_REVERSE_NEW";
pub const NAT_SYNC: &str = "SDN_NAT_SYNC";
pub const NAT_PICKUP: &str = "SDN_NAT_PICKUP";

/// Clients a host remembers the member of, for source persistence (an
/// LRU; a VM has only its own addresses, so it holds two per service).
pub const LB_PERSIST_MAX: u32 = 65_536;

/// Services a host holds at most.
pub const LB_SERVICES_MAX: u32 = 1024;
/// Backend slots of one service.
pub const LB_BACKENDS: u32 = 256;
/// Slots of one service's table: a prime, so that Maglev's permutations
/// cover it; about 16 per backend at the most backends.
pub const LB_TABLE_SIZE: u32 = 4093;
/// Confirmed load-balanced flows a host tracks at most: as many as the
/// flow table holds, so that only flows conntrack no longer holds give way
/// in this LRU.
pub const LB_FLOWS_MAX: u32 = crate::maps::CT_MAX;
/// Unconfirmed ones (TCP: before the client acknowledges the member's
/// answer), in an LRU of their own: a flood of flows nobody completes
/// evicts only its own kind, never a confirmed flow's backend.
pub const LB_FLOWS_NEW_MAX: u32 = crate::maps::CT_SYN_MAX;

/// Schedulers, as [`LbService::scheduler`] names them.
pub const SCHED_TABLE_CURSOR: u8 = 1;
pub const SCHED_TABLE_HASH: u8 = 2;
/// The member with the fewest flows for its weight (IPVS's weighted least
/// connections: a confirmed flow counts 256, an unconfirmed one 1).
pub const SCHED_LEAST: u8 = 3;

/// A listener's VIP: the VPC, the family, the protocol and the port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct LbServiceKey {
    pub vni: u32,
    pub family: u8,
    pub proto: u8,
    pub port: u16,
    pub addr: [u8; 16],
}

/// What a service is.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LbService {
    /// The service's number: its backends and table are at
    /// `id * LB_BACKENDS` and `id * LB_TABLE_SIZE`.
    pub id: u32,
    /// [`SCHED_TABLE_CURSOR`] or [`SCHED_TABLE_HASH`]; 0: no backend can
    /// take a new flow (the flow is refused, `lb_no_backend`).
    pub scheduler: u8,
    pub _pad: u8,
    /// The slots in use are below this one (least connections walks them).
    pub slots: u16,
    /// Changes whenever the service's backends or table change.
    pub generation: u32,
    /// Source persistence: a client's new flows go to the member its last
    /// flow went to, while that was seen this recently (0: none).
    pub persistence_secs: u32,
}

/// A backend slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LbBackend {
    pub addr: [u8; 16],
    pub port: u16,
    /// `LB_BACKEND_*` flags; 0: an empty slot.
    pub flags: u16,
    /// For least connections (1 to 256; 1 for the unweighted kind).
    pub weight: u16,
    pub _pad: u16,
}

/// A backend slot's flows: confirmed ones still open, and unconfirmed
/// ones. The programs count them as flows start, confirm and close; the
/// agent counts them again from the flow tables, for the flows that
/// conntrack's timeouts took.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LbConns {
    pub open: u64,
    pub new: u64,
}

/// The weight of `c` for least connections.
#[inline(always)]
pub fn conns_overhead(c: &LbConns) -> u64 {
    (c.open << 8).saturating_add(c.new)
}

/// The slot holds a backend that keeps its flows.
pub const LB_BACKEND_LIVE: u16 = 1;
/// And takes new ones (an enabled member, not a draining one).
pub const LB_BACKEND_NEW: u16 = 2;

/// A client of a service with source persistence.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct LbPersistKey {
    pub service: u32,
    pub family: u8,
    pub _pad: [u8; 3],
    pub client: [u8; 16],
}

/// The member a client's flows last went to, and when.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LbPersist {
    pub backend: [u8; 16],
    pub backend_port: u16,
    pub slot: u16,
    pub _pad: u32,
    pub seen_ns: u64,
}

/// A load-balanced flow, seen from its client's port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct LbFlowKey {
    /// The client's port (its device on this host).
    pub ifindex: u32,
    pub family: u8,
    pub proto: u8,
    pub client_port: u16,
    pub vport: u16,
    pub _pad: u16,
    pub vip: [u8; 16],
}

/// Where a flow goes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LbFlow {
    pub backend: [u8; 16],
    pub backend_port: u16,
    /// The backend's slot in its service.
    pub slot: u16,
    pub service: u32,
    pub created_ns: u64,
    /// `LB_FLOW_*` flags.
    pub flags: u32,
    pub _pad: u32,
    /// The client's address (the agent finds the flow's conntrack entry
    /// by it).
    pub client: [u8; 16],
}

/// The flow was counted as open, and has been counted as closed since.
pub const LB_FLOW_CLOSED: u32 = 1;
/// The flow was counted as open.
pub const LB_FLOW_OPEN: u32 = 2;

/// A reply of a load-balanced flow, seen from the client's port: from the
/// backend to the client.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct LbReverseKey {
    pub ifindex: u32,
    pub family: u8,
    pub proto: u8,
    pub client_port: u16,
    pub backend_port: u16,
    pub _pad: u16,
    pub backend: [u8; 16],
}

/// What a reply's source becomes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LbReverse {
    pub vip: [u8; 16],
    pub vport: u16,
    pub _pad: [u8; 6],
}

/// North-south: a listener's VIP exposed to the zone, on one of its load
/// balancer's NAT hosts. A flow from the zone is translated both ways
/// (full NAT): from the client and the VIP to the host's NAT address and a
/// port of its own, and the member.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct NatServiceKey {
    pub family: u8,
    pub proto: u8,
    pub port: u16,
    pub addr: [u8; 16],
}

/// What a north-south service is on this NAT host.
/// [`NatService::flags`]: the VIP is a virtual IP held by NAT hosts, so a
/// host translates it only within its lease (`SDN_VIP_LEASES`).
pub const NAT_SVC_F_LEASE: u32 = 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NatService {
    /// The listener's service (its backends and table, shared with the
    /// east-west translation).
    pub lb: LbService,
    /// The VPC's VNI.
    pub vni: u32,
    /// [`NAT_SVC_F_LEASE`] and nothing else yet.
    pub flags: u32,
    /// This host's address in the VPC that translated flows come from. (It
    /// is a zone endpoint of the VPC: its zone and border firewall are the
    /// flow's.)
    pub nat: [u8; 16],
}

/// A north-south flow as the zone sees it: the client and the VIP, and
/// the zone the client's packets arrive from.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct NatKey {
    pub zone: u32,
    pub family: u8,
    pub proto: u8,
    pub client_port: u16,
    pub vport: u16,
    pub _pad: u16,
    pub client: [u8; 16],
    pub vip: [u8; 16],
}

/// Where a north-south flow goes inside the VPC.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NatFlow {
    pub backend: [u8; 16],
    /// The NAT host's address the flow comes from towards the member.
    pub nat: [u8; 16],
    pub backend_port: u16,
    pub nat_port: u16,
    pub service: u32,
    pub slot: u16,
    pub _pad: u16,
    /// `NAT_F_*` and `LB_FLOW_*` flags.
    pub flags: u32,
    pub vni: u32,
    /// TCP: the sequence number the client's ACK must acknowledge (the
    /// member's SYN-ACK's, plus one) for the flow to be confirmed.
    pub reply_ack: u32,
    /// TCP: the member's last acknowledgement (with `NAT_F_ACKED`): the
    /// sequence number a client's FIN or RST must carry to close the flow
    /// (a zone's host forging one cannot know it).
    pub member_ack: u32,
    /// TCP: the client's first sequence number (its SYN's): the member's
    /// SYN-ACK must acknowledge it, so an answer of another flow that
    /// once held the NAT port is never taken for this one's. (A flow
    /// picked up, [`NAT_F_PICKUP`]: the sequence number of the client's
    /// latest segment, and `reply_ack` what it acknowledged.)
    pub client_isn: u32,
    pub created_ns: u64,
    pub last_seen_ns: u64,
    pub packets_in: u64,
    pub packets_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// A virtual IP held by hosts that this host took over from another
/// holder a moment ago: a TCP segment of a flow it does not know, to one
/// of the VIP's Maglev listeners, is picked up as that holder's flow.
/// Maglev gives it the same member there as here, and the holder's NAT
/// address and its secret for NAT ports give it the same NAT port, so the
/// member sees the connection it knows. (A flow flow sync carried is
/// known already; this is for those it had not carried yet.)
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct NatPickupKey {
    pub vni: u32,
    pub family: u8,
    pub _pad: [u8; 3],
    pub addr: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NatPickup {
    /// The previous owner's NAT address (of the VIP's family).
    pub nat: [u8; 16],
    /// The previous owner's secret for that address's NAT ports
    /// ([`nat_secret`]).
    pub secret: u32,
    pub _pad: u32,
    /// Until when (monotonic ns, as `bpf_ktime_get_ns`).
    pub until_ns: u64,
    /// Segments taken as a previous owner's flow's so far (the first of
    /// each flow, and any after one refused further on).
    pub picked: u64,
}

/// Entries of [`NAT_PICKUP`]: one per address of a VIP held by hosts.
pub const NAT_PICKUP_MAX: u32 = 1024;

/// Bytes of [`NAT_SYNC`]: room for about 2,000 [`NatSyncEvent`]s between
/// two reads of the agent.
pub const NAT_SYNC_BYTES: u32 = 256 << 10;

/// A north-south flow just confirmed, as the dataplane tells the agent
/// (which carries the flows of VIPs held by hosts to the other holders).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NatSyncEvent {
    pub key: NatKey,
    pub flow: NatFlow,
}

/// A member's reply of a north-south flow: from the member to the NAT
/// address and port, in the VPC.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct NatReverseKey {
    pub vni: u32,
    pub family: u8,
    pub proto: u8,
    pub backend_port: u16,
    pub nat_port: u16,
    pub _pad: u16,
    pub backend: [u8; 16],
    pub nat: [u8; 16],
}

/// The flow closes (a FIN of the member, or of the client at the sequence
/// number the member acknowledged last: a zone's host forging one cannot
/// know it): the flow table's closing timeout, and a SYN on its tuple
/// opens a new flow. A RST so checked ends the flow at once.
pub const NAT_F_CLOSING: u32 = 8;
/// The member answered (TCP: its SYN-ACK, whose number is in `reply_ack`).
pub const NAT_F_REPLIED: u32 = 4;
/// `member_ack` holds the member's last acknowledgement.
pub const NAT_F_ACKED: u32 = 16;
/// The client's FIN was seen (at the member's acknowledged sequence), and
/// the member's: with both, a SYN on the tuple may open a new flow.
pub const NAT_F_FIN_IN: u32 = 32;
pub const NAT_F_FIN_OUT: u32 = 64;
/// Picked up from the previous owner of the VIP ([`NatPickup`]): not
/// confirmed until the member answers the segment that picked it up with
/// one of its own (an unknown connection gets a reset); a SYN on its tuple
/// opens a new flow.
pub const NAT_F_PICKUP: u32 = 128;
/// A client's FIN or RST is taken as closing (the closing timeout) when
/// its sequence number is within this much past the member's last
/// acknowledgement; only an exact match ends a flow at once (RST).
pub const NAT_CLOSE_WINDOW: u32 = 65_536;
/// A member's segment answers a flow picked up (`NAT_F_PICKUP`) only if
/// it acknowledges at most this far past the client's segment that picked
/// the flow up, and its own sequence number is within this of what that
/// segment acknowledged: the bytes each side may have had in flight. A
/// zone's host forging segments on another's tuple guesses both (and the
/// member answers a segment out of its window twice a second at most).
pub const NAT_PICKUP_SLACK: u32 = 4 << 20;
/// A SYN on the tuple of a flow picked up and not answered opens a new
/// flow only this long after (a forged SYN cannot end it at once).
pub const NAT_PICKUP_HOLD_NS: u64 = 1_000_000_000;
/// NAT ports a host gives a member's address and port: from this one up.
pub const NAT_PORT_FIRST: u16 = 1024;
/// Tries at a free NAT port for a new flow before it is refused.
pub const NAT_PORT_TRIES: u32 = 16;

/// The idle timeout of a north-south flow, confirmed or not.
#[inline(always)]
pub fn nat_timeout(proto: u8, flags: u32, confirmed: bool) -> u64 {
    if !confirmed && proto == crate::PROTO_TCP {
        return crate::maps::CT_TIMEOUT_SYN_NS;
    }
    let closing = if flags & NAT_F_CLOSING != 0 {
        crate::maps::CT_F_CLOSING
    } else {
        0
    };
    crate::maps::ct_timeout(proto, closing)
}

const _: () = assert!(core::mem::size_of::<NatServiceKey>() == 20);
const _: () = assert!(core::mem::size_of::<NatService>() == 40);
const _: () = assert!(core::mem::size_of::<NatKey>() == 44);
const _: () = assert!(core::mem::size_of::<NatFlow>() == 112);
const _: () = assert!(core::mem::size_of::<NatReverseKey>() == 44);
const _: () = assert!(core::mem::size_of::<NatPickupKey>() == 24);
const _: () = assert!(core::mem::size_of::<NatPickup>() == 40);
const _: () = assert!(core::mem::size_of::<LbServiceKey>() == 24);
const _: () = assert!(core::mem::size_of::<LbService>() == 16);
const _: () = assert!(core::mem::size_of::<LbPersistKey>() == 24);
const _: () = assert!(core::mem::size_of::<LbPersist>() == 32);
const _: () = assert!(core::mem::size_of::<LbBackend>() == 24);
const _: () = assert!(core::mem::size_of::<LbConns>() == 16);
const _: () = assert!(core::mem::size_of::<LbFlowKey>() == 28);
const _: () = assert!(core::mem::size_of::<LbFlow>() == 56);
const _: () = assert!(core::mem::size_of::<LbReverseKey>() == 28);
const _: () = assert!(core::mem::size_of::<LbReverse>() == 24);

/// The hash Maglev places a flow by: the client's address and port, the
/// VIP and its port, the protocol. The same on every host, so a flow lands
/// on the same backend whichever host translates it. (Jenkins' one-at-a-
/// time over the fields, in a fixed order.)
#[inline(always)]
pub fn flow_hash(proto: u8, client: &[u8; 16], client_port: u16, vip: &[u8; 16], vport: u16) -> u32 {
    let mut h: u32 = 0x5bd1_e995;
    let mut mix = |b: u8| {
        h = h.wrapping_add(b as u32);
        h = h.wrapping_add(h << 10);
        h ^= h >> 6;
    };
    mix(proto);
    let mut i = 0;
    while i < 16 {
        mix(client[i]);
        mix(vip[i]);
        i += 1;
    }
    mix((client_port >> 8) as u8);
    mix(client_port as u8);
    mix((vport >> 8) as u8);
    mix(vport as u8);
    h = h.wrapping_add(h << 3);
    h ^= h >> 11;
    h.wrapping_add(h << 15)
}

/// Bob Jenkins' lookup3 over 32-bit words (Linux's `jhash2`), from
/// `initval`: keyed by it, so that which inputs collide depends on it.
#[inline(always)]
pub fn jhash_words<const N: usize>(k: &[u32; N], initval: u32) -> u32 {
    let mut a = 0xdead_beef_u32.wrapping_add((N as u32) << 2).wrapping_add(initval);
    let (mut b, mut c) = (a, a);
    let mut i = 0;
    while N - i > 3 {
        a = a.wrapping_add(k[i]);
        b = b.wrapping_add(k[i + 1]);
        c = c.wrapping_add(k[i + 2]);
        a = a.wrapping_sub(c) ^ c.rotate_left(4);
        c = c.wrapping_add(b);
        b = b.wrapping_sub(a) ^ a.rotate_left(6);
        a = a.wrapping_add(c);
        c = c.wrapping_sub(b) ^ b.rotate_left(8);
        b = b.wrapping_add(a);
        a = a.wrapping_sub(c) ^ c.rotate_left(16);
        c = c.wrapping_add(b);
        b = b.wrapping_sub(a) ^ a.rotate_left(19);
        a = a.wrapping_add(c);
        c = c.wrapping_sub(b) ^ b.rotate_left(4);
        b = b.wrapping_add(a);
        i += 3;
    }
    let left = N - i;
    if left == 0 {
        return c;
    }
    if left == 3 {
        c = c.wrapping_add(k[i + 2]);
    }
    if left >= 2 {
        b = b.wrapping_add(k[i + 1]);
    }
    a = a.wrapping_add(k[i]);
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(14));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(11));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(25));
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(16));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(4));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(14));
    c ^= b;
    c.wrapping_sub(b.rotate_left(24))
}

#[inline(always)]
fn words(a: &[u8; 16]) -> [u32; 4] {
    let w = |i: usize| u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
    [w(0), w(4), w(8), w(12)]
}

/// The secret a host draws the NAT ports of its NAT address `nat` with:
/// its own secret (`SDN_NAT_SEED`) keyed over the address, so that a peer
/// told it (to pick the host's flows up) learns nothing of the host's
/// other NAT addresses.
#[inline(always)]
pub fn nat_secret(host_seed: u32, nat: &[u8; 16]) -> u32 {
    jhash_words(&words(nat), host_seed)
}

/// Where a new flow's NAT ports are drawn from (the first try; later ones
/// step from it): the client's address and port and the VIP's port, keyed
/// by the NAT address's secret ([`nat_secret`]). A zone's host, knowing
/// neither, cannot tell which of its tuples share a port with another's.
#[inline(always)]
pub fn nat_port_hash(client: &[u8; 16], client_port: u16, vport: u16, secret: u32) -> u32 {
    let c = words(client);
    jhash_words(
        &[c[0], c[1], c[2], c[3], ((client_port as u32) << 16) | vport as u32],
        secret,
    )
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all are repr(C), Copy, with explicit padding and no pointers.
    unsafe impl aya::Pod for LbServiceKey {}
    unsafe impl aya::Pod for LbService {}
    unsafe impl aya::Pod for LbBackend {}
    unsafe impl aya::Pod for LbFlowKey {}
    unsafe impl aya::Pod for LbFlow {}
    unsafe impl aya::Pod for LbReverseKey {}
    unsafe impl aya::Pod for LbReverse {}
    unsafe impl aya::Pod for LbPersistKey {}
    unsafe impl aya::Pod for LbPersist {}
    unsafe impl aya::Pod for LbConns {}
    unsafe impl aya::Pod for NatServiceKey {}
    unsafe impl aya::Pod for NatService {}
    unsafe impl aya::Pod for NatKey {}
    unsafe impl aya::Pod for NatFlow {}
    unsafe impl aya::Pod for NatReverseKey {}
    unsafe impl aya::Pod for NatSyncEvent {}
    unsafe impl aya::Pod for NatPickupKey {}
    unsafe impl aya::Pod for NatPickup {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(a: [u8; 4]) -> [u8; 16] {
        let mut x = [0u8; 16];
        x[..4].copy_from_slice(&a);
        x
    }

    /// The ports of two tuples collide or not by the secret: flipping the
    /// same bits of the address and the client port (which cancel out in
    /// a hash that XORs the fields together) moves the port, whatever the
    /// secret; and the same tuple draws differently under other secrets.
    #[test]
    fn nat_ports_are_drawn_by_the_secret_from_the_whole_tuple() {
        let span = (u16::MAX - NAT_PORT_FIRST) as u32 + 1;
        let a = v4([10, 99, 0, 1]);
        let b = v4([10, 99, 0x12, 0x35]);
        let flip = u16::from_ne_bytes([0x12, 0x34]);
        for secret in [1u32, 0xdead_beef, 0x8765_4321, u32::MAX] {
            let x = nat_port_hash(&a, 40_000, 7000, secret);
            let y = nat_port_hash(&b, 40_000 ^ flip, 7000, secret);
            assert_ne!(x % span, y % span, "secret {secret:#x}");
            assert_eq!(x, nat_port_hash(&a, 40_000, 7000, secret), "not deterministic");
        }
        let mut ports = [0u32; 64];
        for (i, p) in ports.iter_mut().enumerate() {
            *p = nat_port_hash(&a, 40_000, 7000, i as u32 + 1) % span;
        }
        ports.sort_unstable();
        let distinct = 1 + ports.windows(2).filter(|w| w[0] != w[1]).count();
        assert!(distinct > 60, "the secret hardly moves the port: {ports:?}");
        // A host's secrets differ by NAT address.
        assert_ne!(
            nat_secret(7, &v4([10, 40, 1, 202])),
            nat_secret(7, &v4([10, 40, 1, 203]))
        );
    }
}
