//! The L4 load balancer, east-west: a VM's flow to a VIP of its VPC is
//! translated on the VM's own host, to a backend chosen on the flow's
//! first packet; the backend's replies are translated back before they
//! reach the VM. No extra hop, and the backend sees the client's address.
//!
//! The guard asks [`service`] whether a packet from a VM with load
//! balancers in its VPC goes to a VIP; if so, the load-balancer stage
//! ([`stage`]) gives the packet its backend (the flow's, or a new one from
//! the service's table), and the guard runs again on the backend's
//! address: every tier judges the flow as the backend sees it. Nothing is
//! written before the commit ([`commit`]), which records a new flow and
//! rewrites the packet; [`reply`] translates the backend's answers.

use aya_ebpf::{helpers::gen, programs::TcContext};
use dataplane_common::{
    lb::{
        conns_overhead, flow_hash, LbConns, LbFlow, LbFlowKey, LbPersist, LbPersistKey, LbReverse, LbReverseKey,
        LbService, LbServiceKey, LB_BACKENDS, LB_BACKEND_LIVE, LB_BACKEND_NEW, LB_FLOW_CLOSED, LB_FLOW_OPEN,
        LB_TABLE_SIZE, SCHED_LEAST, SCHED_TABLE_CURSOR, SCHED_TABLE_HASH,
    },
    maps::{CT_ORIGIN_OUT, PORT_F_LB},
    DropReason, Stat, FAMILY_V4, PROTO_TCP, PROTO_UDP,
};

use crate::{
    guard::pure_syn,
    maps::{
        count, CT, LB_BACKENDS_ARR, LB_CONNS, LB_CURSOR, LB_FLOWS, LB_FLOWS_NEW, LB_PERSIST, LB_REVERSE,
        LB_REVERSE_NEW, LB_SERVICES, LB_TABLE_ARR,
    },
    meta::{Meta, EMPTY_KEY, E_FROM_VM, LB_EST, LB_EST_NEW, LB_NEW, LB_NONE, LB_NO_CURSOR, S_EST, S_STALE},
    parse::{ETH_HLEN, TCP_FIN, TCP_RST},
};

/// The service a packet from a VM goes to, if its destination is a VIP of
/// the VM's VPC (asked once per packet: not again after the stage).
#[inline(always)]
pub fn service(m: &Meta) -> Option<LbService> {
    if m.entry != E_FROM_VM
        || m.lb != LB_NONE
        || m.src_port.flags & PORT_F_LB == 0
        || (m.proto != PROTO_TCP && m.proto != PROTO_UDP)
    {
        return None;
    }
    let key = LbServiceKey {
        vni: m.src_port.vni,
        family: m.family,
        proto: m.proto,
        port: m.dport,
        addr: m.dst,
    };
    // SAFETY: the value is copied out at once.
    unsafe { LB_SERVICES.get(&key) }.copied()
}

/// The flow of the client port sending `m`, to `vip`:`vport`.
#[inline(always)]
fn flow_key(m: &Meta, vip: &[u8; 16], vport: u16) -> LbFlowKey {
    LbFlowKey {
        ifindex: m.src_ifx,
        family: m.family,
        proto: m.proto,
        client_port: m.sport,
        vport,
        _pad: 0,
        vip: *vip,
    }
}

/// The load-balancer stage: the flow's backend, or a new one. Nothing is
/// written here: a new flow (and round robin's cursor) is recorded at the
/// commit, once every tier has passed the packet.
#[inline(always)]
pub fn stage(m: &mut Meta) -> Result<(), DropReason> {
    let Some(svc) = service(m) else {
        // The services changed since the guard asked: the guard runs
        // again and finds the packet's way without them.
        m.lb = LB_EST;
        m.lb_vip = m.dst;
        m.lb_vport = m.dport;
        return Ok(());
    };
    let key = flow_key(m, &m.dst, m.dport);
    let syn = m.proto == PROTO_TCP && pure_syn(m.tcp_flags);
    // A confirmed flow keeps its backend; a fresh SYN on its tuple is a new
    // connection (the port reused), scheduled anew. An unconfirmed flow
    // keeps its backend too (a retransmitted SYN goes where the first did).
    // SAFETY: the values are copied out at once.
    let found = match unsafe { LB_FLOWS.get(&key) }.copied() {
        Some(f) if !syn => Some((f, LB_EST)),
        _ => unsafe { LB_FLOWS_NEW.get(&key) }.copied().map(|f| (f, LB_EST_NEW)),
    };
    if let Some((f, state)) = found {
        // Its backend still holds its slot (draining or not).
        if f.service == svc.id && holds(svc.id, f.slot, &f.backend, f.backend_port) {
            set(m, &svc, f.slot, &f.backend, f.backend_port, state);
            return Ok(());
        }
    }
    // Only a SYN opens a TCP flow: a segment of a connection whose backend
    // is unknown (or gone) goes nowhere rather than to another member.
    if m.proto == PROTO_TCP && !syn {
        return Err(DropReason::CtNotSyn);
    }
    pick(m, &svc)
}

/// Whether slot `slot` of service `id` still holds the backend `addr`:`port`
/// for its flows (draining or not).
#[inline(always)]
pub fn holds(id: u32, slot: u16, addr: &[u8; 16], port: u16) -> bool {
    if slot as u32 >= LB_BACKENDS {
        return false;
    }
    match LB_BACKENDS_ARR.get(id * LB_BACKENDS + slot as u32) {
        Some(b) => b.flags & LB_BACKEND_LIVE != 0 && b.addr == *addr && b.port == port,
        None => false,
    }
}

/// A new flow's backend, by the service's persistence and scheduler: the
/// packet's destination becomes the backend's (`set`).
#[inline(never)]
pub fn pick(m: &mut Meta, svc: &LbService) -> Result<(), DropReason> {
    let svc = *svc;
    m.lb_cursor = LB_NO_CURSOR;
    // Source persistence: the client's member of late, while it takes new
    // flows.
    if svc.persistence_secs != 0 {
        if let Some(p) = unsafe { LB_PERSIST.get(&persist_key(svc.id, m)) }.copied() {
            let fresh = m.now.saturating_sub(p.seen_ns) <= svc.persistence_secs as u64 * 1_000_000_000;
            if fresh && (p.slot as u32) < LB_BACKENDS {
                if let Some(b) = LB_BACKENDS_ARR.get(svc.id * LB_BACKENDS + p.slot as u32) {
                    if b.flags & LB_BACKEND_NEW != 0 && b.addr == p.backend && b.port == p.backend_port {
                        set(m, &svc, p.slot, &p.backend, p.backend_port, LB_NEW);
                        return Ok(());
                    }
                }
            }
        }
    }
    if svc.scheduler == SCHED_LEAST {
        let slot = least(svc.id, svc.slots as u32, m.src).ok_or(DropReason::LbNoBackend)?;
        let Some(b) = LB_BACKENDS_ARR.get(svc.id * LB_BACKENDS + slot) else {
            return Err(DropReason::LbNoBackend);
        };
        let (addr, port) = (b.addr, b.port);
        set(m, &svc, slot as u16, &addr, port, LB_NEW);
        return Ok(());
    }
    let i = match svc.scheduler {
        SCHED_TABLE_HASH => flow_hash(m.proto, &m.src, m.sport, &m.dst, m.dport) % LB_TABLE_SIZE,
        SCHED_TABLE_CURSOR => {
            let c = LB_CURSOR.get(svc.id).copied().unwrap_or(0) % LB_TABLE_SIZE;
            m.lb_cursor = if c + 1 >= LB_TABLE_SIZE { 0 } else { (c + 1) as u16 };
            c
        }
        _ => return Err(DropReason::LbNoBackend),
    };
    let mut slot = match LB_TABLE_ARR.get(svc.id * LB_TABLE_SIZE + i) {
        Some(s) if *s < LB_BACKENDS => *s,
        _ => return Err(DropReason::LbNoBackend),
    };
    let Some(mut b) = LB_BACKENDS_ARR.get(svc.id * LB_BACKENDS + slot) else {
        return Err(DropReason::LbNoBackend);
    };
    // A member calling its own VIP: the table's next slot, which is
    // another member's unless the member is alone.
    if b.addr == m.src {
        let j = if i + 1 >= LB_TABLE_SIZE { 0 } else { i + 1 };
        slot = match LB_TABLE_ARR.get(svc.id * LB_TABLE_SIZE + j) {
            Some(s) if *s < LB_BACKENDS => *s,
            _ => return Err(DropReason::LbNoBackend),
        };
        b = match LB_BACKENDS_ARR.get(svc.id * LB_BACKENDS + slot) {
            Some(b) => b,
            None => return Err(DropReason::LbNoBackend),
        };
    }
    if b.flags & LB_BACKEND_LIVE == 0 {
        return Err(DropReason::LbNoBackend);
    }
    let (addr, port) = (b.addr, b.port);
    set(m, &svc, slot as u16, &addr, port, LB_NEW);
    Ok(())
}

/// The slot of service `id` taking new flows with the fewest flows for
/// its weight (the first of equals). The slots are walked by `bpf_loop`,
/// which the verifier checks once, not once per slot.
#[inline(always)]
fn least(id: u32, slots: u32, client: [u8; 16]) -> Option<u32> {
    let mut w = Least {
        client,
        base: id * LB_BACKENDS,
        found: 0,
        best: 0,
        _pad: 0,
        bo: 0,
        bw: 1,
    };
    // SAFETY: the callback reads only `w`, which outlives the call.
    unsafe {
        gen::bpf_loop(
            slots.min(LB_BACKENDS),
            least_step as *mut core::ffi::c_void,
            &mut w as *mut Least as *mut core::ffi::c_void,
            0,
        );
    }
    (w.found != 0).then_some(w.best)
}

/// What [`least`] walks with.
#[repr(C)]
struct Least {
    /// The client: a member is never its own backend.
    client: [u8; 16],
    base: u32,
    found: u32,
    best: u32,
    _pad: u32,
    bo: u64,
    bw: u64,
}

extern "C" fn least_step(i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: `ctx` is the walk `least` passed.
    let w = unsafe { &mut *(ctx as *mut Least) };
    let slot = w.base + i as u32;
    let Some(b) = LB_BACKENDS_ARR.get(slot) else { return 1 };
    if b.flags & LB_BACKEND_NEW == 0 || b.addr == w.client {
        return 0;
    }
    let weight = b.weight.max(1) as u64;
    // Capped so that a product with a weight (at most 2^16) fits.
    let o = LB_CONNS.get(slot).map(conns_overhead).unwrap_or(0).min(1 << 46);
    // o / weight < bo / bw, without dividing.
    if w.found == 0 || o * w.bw < w.bo * weight {
        w.found = 1;
        w.best = i as u32;
        w.bo = o;
        w.bw = weight;
    }
    0
}

/// Adds `delta` (1 or -1) to a count, never below zero.
#[inline(always)]
pub fn add(c: *mut u64, delta: i64) {
    // SAFETY: a live map value shared by every CPU; a racing update loses
    // a count, which the agent's count (every few seconds) corrects.
    unsafe {
        if delta > 0 {
            *c += 1;
        } else if *c > 0 {
            *c -= 1;
        }
    }
}

/// A backend slot's counts.
#[inline(always)]
fn conns(m: &Meta) -> Option<*mut LbConns> {
    LB_CONNS.get_ptr_mut(m.lb_service * LB_BACKENDS + m.lb_slot as u32)
}

/// A client (the packet's source) of service `id`.
#[inline(always)]
fn persist_key(id: u32, m: &Meta) -> LbPersistKey {
    LbPersistKey {
        service: id,
        family: m.family,
        _pad: [0; 3],
        client: m.src,
    }
}

#[inline(always)]
pub fn set(m: &mut Meta, svc: &LbService, slot: u16, addr: &[u8; 16], port: u16, state: u8) {
    let service = svc.id;
    m.lb = state;
    m.lb_persist = (svc.persistence_secs != 0) as u8;
    m.lb_service = service;
    m.lb_slot = slot;
    m.lb_vip = m.dst;
    m.lb_vport = m.dport;
    m.dst = *addr;
    m.dport = port;
}

/// At the commit, once every tier has passed the packet: a new flow is
/// recorded (unconfirmed) with its reply, and round robin's cursor moves
/// on; an unconfirmed flow whose client side conntrack has confirmed moves
/// to the confirmed flows; a confirmed flow's reply entry is made again if
/// its LRU let it go. Then the packet goes to the backend.
#[inline(always)]
pub fn commit(ctx: &mut TcContext, m: &Meta) -> Result<(), DropReason> {
    if m.lb_vip == m.dst && m.lb_vport == m.dport {
        return Ok(());
    }
    match m.lb {
        LB_NEW => record(m),
        // Once conntrack has confirmed the client's side (this packet's
        // writes included), the flow moves to the confirmed flows.
        LB_EST_NEW => promote(m),
        LB_EST => {
            let rkey = reverse_key(m);
            // SAFETY: only whether the entry exists is read.
            if unsafe { LB_REVERSE.get(&rkey) }.is_none() {
                let _ = LB_REVERSE.insert(&rkey, &reverse(m), 0);
            }
            if m.proto == PROTO_TCP && m.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
                close(m);
            }
        }
        _ => {}
    }
    if m.lb_persist != 0 {
        remember(m, &m.src);
    }
    rewrite(ctx, m, true, &m.lb_vip, &m.dst, m.lb_vport, m.dport)
}

/// Source persistence: the client's member, seen now.
#[inline(never)]
pub fn remember(m: &Meta, client: &[u8; 16]) {
    let key = LbPersistKey {
        service: m.lb_service,
        family: m.family,
        _pad: [0; 3],
        client: *client,
    };
    if let Some(p) = LB_PERSIST.get_ptr_mut(&key) {
        // SAFETY: a live map value; racing writers write the same member
        // or a newer one.
        unsafe {
            if (*p).slot == m.lb_slot && (*p).backend == m.dst && (*p).backend_port == m.dport {
                (*p).seen_ns = m.now;
                return;
            }
        }
    }
    let v = LbPersist {
        backend: m.dst,
        backend_port: m.dport,
        slot: m.lb_slot,
        _pad: 0,
        seen_ns: m.now,
    };
    let _ = LB_PERSIST.insert(&key, &v, 0);
}

#[inline(always)]
fn reverse_key(m: &Meta) -> LbReverseKey {
    LbReverseKey {
        ifindex: m.src_ifx,
        family: m.family,
        proto: m.proto,
        client_port: m.sport,
        backend_port: m.dport,
        _pad: 0,
        backend: m.dst,
    }
}

#[inline(always)]
fn reverse(m: &Meta) -> LbReverse {
    LbReverse {
        vip: m.lb_vip,
        vport: m.lb_vport,
        _pad: [0; 6],
    }
}

/// A new flow, unconfirmed: in LRUs of their own, where room is always
/// made among unconfirmed flows only.
#[inline(never)]
fn record(m: &Meta) {
    let key = flow_key(m, &m.lb_vip, m.lb_vport);
    let flow = LbFlow {
        backend: m.dst,
        backend_port: m.dport,
        slot: m.lb_slot,
        service: m.lb_service,
        created_ns: m.now,
        flags: 0,
        _pad: 0,
        client: m.src,
    };
    let _ = LB_FLOWS_NEW.insert(&key, &flow, 0);
    if let Some(c) = conns(m) {
        // SAFETY: the field of a live map value.
        add(unsafe { core::ptr::addr_of_mut!((*c).new) }, 1);
    }
    // A connection that reuses a confirmed flow's tuple replaces it.
    let _ = LB_FLOWS.remove(&key);
    let _ = LB_REVERSE_NEW.insert(&reverse_key(m), &reverse(m), 0);
    if m.lb_cursor != LB_NO_CURSOR {
        if let Some(c) = LB_CURSOR.get_ptr_mut(m.lb_service) {
            // SAFETY: this CPU's slot.
            unsafe { *c = m.lb_cursor as u32 };
        }
    }
    count(Stat::LbNew);
}

/// The client ends a confirmed flow: it no longer counts as open.
#[inline(never)]
fn close(m: &Meta) {
    let Some(f) = LB_FLOWS.get_ptr_mut(&flow_key(m, &m.lb_vip, m.lb_vport)) else {
        return;
    };
    // SAFETY: a live map value; a racing packet of the same flow may count
    // the close twice, which the agent's count corrects.
    unsafe {
        if (*f).flags & (LB_FLOW_OPEN | LB_FLOW_CLOSED) != LB_FLOW_OPEN {
            return;
        }
        (*f).flags |= LB_FLOW_CLOSED;
    }
    if let Some(c) = conns(m) {
        // SAFETY: the field of a live map value.
        add(unsafe { core::ptr::addr_of_mut!((*c).open) }, -1);
    }
}

#[inline(never)]
fn promote(m: &Meta) {
    let mut ck = EMPTY_KEY;
    m.src_key(&mut ck);
    // SAFETY: only whether the entry exists is read.
    if unsafe { CT.get(&ck) }.is_none() {
        return;
    }
    move_flow(m, &flow_key(m, &m.lb_vip, m.lb_vport), &reverse_key(m), &reverse(m));
}

/// Moves an unconfirmed flow and its reply to the confirmed ones; it now
/// counts as open for its member.
#[inline(always)]
fn move_flow(_m: &Meta, key: &LbFlowKey, rkey: &LbReverseKey, rev: &LbReverse) {
    // SAFETY: the value is copied out at once.
    let Some(mut f) = (unsafe { LB_FLOWS_NEW.get(key) }).copied() else {
        return;
    };
    f.flags |= LB_FLOW_OPEN;
    let _ = LB_FLOWS.insert(key, &f, 0);
    if let Some(c) = LB_CONNS.get_ptr_mut(f.service * LB_BACKENDS + f.slot as u32) {
        // SAFETY: the fields of a live map value.
        unsafe {
            add(core::ptr::addr_of_mut!((*c).new), -1);
            add(core::ptr::addr_of_mut!((*c).open), 1);
        }
    }
    let _ = LB_FLOWS_NEW.remove(key);
    let _ = LB_REVERSE.insert(rkey, rev, 0);
    let _ = LB_REVERSE_NEW.remove(rkey);
}

/// A packet delivered to a port of a VPC with load balancers: a backend's
/// reply to a load-balanced flow the port opened leaves with the VIP's
/// address and port as its source. Only a reply of the port's own tracked
/// flow is rewritten, never a flow the other end opens.
#[inline(always)]
pub fn reply(ctx: &mut TcContext, m: &Meta) -> Result<(), DropReason> {
    if m.dst_port.flags & PORT_F_LB == 0
        || (m.proto != PROTO_TCP && m.proto != PROTO_UDP)
        || (m.ct_dst != S_EST && m.ct_dst != S_STALE)
        || m.org_dst != CT_ORIGIN_OUT
    {
        return Ok(());
    }
    let key = LbReverseKey {
        ifindex: m.dst_ifx,
        family: m.family,
        proto: m.proto,
        client_port: m.dport,
        backend_port: m.sport,
        _pad: 0,
        backend: m.src,
    };
    // SAFETY: a live map value, read only; the rewrite copies what it needs.
    let r = match unsafe { LB_REVERSE.get(&key) } {
        Some(r) => r,
        None => match unsafe { LB_REVERSE_NEW.get(&key) } {
            Some(r) => {
                // The answer that confirms the client's side (conntrack's
                // writes for this packet are done) confirms the flow too.
                promote_on_reply(m, &key, r);
                r
            }
            None => return Ok(()),
        },
    };
    rewrite(ctx, m, false, &m.src, &r.vip, m.sport, r.vport)
}

/// An unconfirmed flow whose answer confirmed the client's side (UDP:
/// the first answer) moves to the confirmed flows.
#[inline(never)]
fn promote_on_reply(m: &Meta, rkey: &LbReverseKey, r: &LbReverse) {
    let mut ck = EMPTY_KEY;
    m.dst_key(&mut ck);
    // SAFETY: only whether the entry exists is read.
    if unsafe { CT.get(&ck) }.is_none() {
        return;
    }
    let key = LbFlowKey {
        ifindex: m.dst_ifx,
        family: m.family,
        proto: m.proto,
        client_port: m.dport,
        vport: r.vport,
        _pad: 0,
        vip: r.vip,
    };
    move_flow(m, &key, rkey, r);
}

const BPF_F_PSEUDO_HDR: u64 = 1 << 4;
const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;

/// Rewrites the packet's destination (`dst`) or source address and port,
/// with the IP and TCP/UDP checksums.
#[inline(always)]
pub fn rewrite(
    ctx: &mut TcContext,
    m: &Meta,
    dst: bool,
    old: &[u8; 16],
    new: &[u8; 16],
    old_port: u16,
    new_port: u16,
) -> Result<(), DropReason> {
    let l4 = m.l4_off as usize;
    let (csum, mangled) = if m.proto == PROTO_TCP {
        (l4 + 16, 0)
    } else {
        (l4 + 6, BPF_F_MARK_MANGLED_0)
    };
    let bad = |_| DropReason::Truncated;
    if m.family == FAMILY_V4 {
        let off = ETH_HLEN + if dst { 16 } else { 12 };
        let from = u32::from_ne_bytes([old[0], old[1], old[2], old[3]]) as u64;
        let to = u32::from_ne_bytes([new[0], new[1], new[2], new[3]]) as u64;
        ctx.l3_csum_replace(ETH_HLEN + 10, from, to, 4).map_err(bad)?;
        ctx.l4_csum_replace(csum, from, to, BPF_F_PSEUDO_HDR | mangled | 4)
            .map_err(bad)?;
        let a: [u8; 4] = [new[0], new[1], new[2], new[3]];
        ctx.store(off, &a, 0).map_err(bad)?;
    } else {
        let off = ETH_HLEN + if dst { 24 } else { 8 };
        // SAFETY: both are 16 bytes (a multiple of 4) the helper only reads.
        let diff = unsafe { gen::bpf_csum_diff(old.as_ptr() as *mut u32, 16, new.as_ptr() as *mut u32, 16, 0) };
        if diff < 0 {
            return Err(DropReason::Truncated);
        }
        ctx.l4_csum_replace(csum, 0, diff as u64, BPF_F_PSEUDO_HDR | mangled)
            .map_err(bad)?;
        ctx.store(off, new, 0).map_err(bad)?;
    }
    if old_port != new_port {
        let from = old_port.to_be().to_ne_bytes();
        let to = new_port.to_be().to_ne_bytes();
        let (f, t) = (u16::from_ne_bytes(from) as u64, u16::from_ne_bytes(to) as u64);
        ctx.l4_csum_replace(csum, f, t, mangled | 2).map_err(bad)?;
        let port_off = if dst { l4 + 2 } else { l4 };
        ctx.store(port_off, &new_port.to_be_bytes(), 0).map_err(bad)?;
    }
    Ok(())
}
