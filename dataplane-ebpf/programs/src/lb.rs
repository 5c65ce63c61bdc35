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
        flow_hash, LbFlow, LbFlowKey, LbReverse, LbReverseKey, LbService, LbServiceKey, LB_BACKENDS,
        LB_BACKEND_LIVE, LB_TABLE_SIZE, SCHED_TABLE_CURSOR, SCHED_TABLE_HASH,
    },
    maps::PORT_F_LB,
    DropReason, Stat, FAMILY_V4, PROTO_TCP, PROTO_UDP,
};

use crate::{
    maps::{count, LB_BACKENDS_ARR, LB_CURSOR, LB_FLOWS, LB_REVERSE, LB_SERVICES, LB_TABLE_ARR},
    meta::{Meta, E_FROM_VM, LB_EST, LB_NEW, LB_NONE},
    parse::ETH_HLEN,
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

#[inline(always)]
fn flow_key(m: &Meta) -> LbFlowKey {
    LbFlowKey {
        ifindex: m.src_ifx,
        family: m.family,
        proto: m.proto,
        client_port: m.sport,
        vport: m.dport,
        _pad: 0,
        vip: m.dst,
    }
}

/// The load-balancer stage: the flow's backend, or a new one.
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
    let key = flow_key(m);
    // SAFETY: the value is copied out at once.
    if let Some(f) = unsafe { LB_FLOWS.get(&key) }.copied() {
        // Its backend still holds its slot (draining or not): the flow
        // stays with it.
        if f.service == svc.id && (f.slot as u32) < LB_BACKENDS {
            if let Some(b) = LB_BACKENDS_ARR.get(svc.id * LB_BACKENDS + f.slot as u32) {
                if b.flags & LB_BACKEND_LIVE != 0 && b.addr == f.backend && b.port == f.backend_port {
                    set(m, svc.id, f.slot, &f.backend, f.backend_port, LB_EST);
                    return Ok(());
                }
            }
        }
    }
    let i = match svc.scheduler {
        SCHED_TABLE_HASH => flow_hash(m.proto, &m.src, m.sport, &m.dst, m.dport) % LB_TABLE_SIZE,
        SCHED_TABLE_CURSOR => {
            let Some(c) = LB_CURSOR.get_ptr_mut(svc.id) else {
                return Err(DropReason::LbNoBackend);
            };
            // SAFETY: this CPU's slot.
            unsafe {
                let i = *c % LB_TABLE_SIZE;
                *c = if i + 1 >= LB_TABLE_SIZE { 0 } else { i + 1 };
                i
            }
        }
        _ => return Err(DropReason::LbNoBackend),
    };
    let slot = match LB_TABLE_ARR.get(svc.id * LB_TABLE_SIZE + i) {
        Some(s) if *s < LB_BACKENDS => *s,
        _ => return Err(DropReason::LbNoBackend),
    };
    let Some(b) = LB_BACKENDS_ARR.get(svc.id * LB_BACKENDS + slot) else {
        return Err(DropReason::LbNoBackend);
    };
    if b.flags & LB_BACKEND_LIVE == 0 {
        return Err(DropReason::LbNoBackend);
    }
    let (addr, port) = (b.addr, b.port);
    set(m, svc.id, slot as u16, &addr, port, LB_NEW);
    Ok(())
}

#[inline(always)]
fn set(m: &mut Meta, service: u32, slot: u16, addr: &[u8; 16], port: u16, state: u8) {
    m.lb = state;
    m.lb_service = service;
    m.lb_slot = slot;
    m.lb_vip = m.dst;
    m.lb_vport = m.dport;
    m.dst = *addr;
    m.dport = port;
}

/// At the commit, once every tier has passed the packet: a new flow is
/// recorded with its reply, and the packet goes to the backend.
#[inline(always)]
pub fn commit(ctx: &mut TcContext, m: &Meta) -> Result<(), DropReason> {
    if m.lb_vip == m.dst && m.lb_vport == m.dport {
        return Ok(());
    }
    if m.lb == LB_NEW {
        let key = LbFlowKey {
            ifindex: m.src_ifx,
            family: m.family,
            proto: m.proto,
            client_port: m.sport,
            vport: m.lb_vport,
            _pad: 0,
            vip: m.lb_vip,
        };
        let flow = LbFlow {
            backend: m.dst,
            backend_port: m.dport,
            slot: m.lb_slot,
            service: m.lb_service,
            created_ns: m.now,
        };
        let rkey = LbReverseKey {
            ifindex: m.src_ifx,
            family: m.family,
            proto: m.proto,
            client_port: m.sport,
            backend_port: m.dport,
            _pad: 0,
            backend: m.dst,
        };
        let rev = LbReverse {
            vip: m.lb_vip,
            vport: m.lb_vport,
            _pad: [0; 6],
        };
        // An LRU: room is always made (the oldest idle flow gives way).
        let _ = LB_REVERSE.insert(&rkey, &rev, 0);
        let _ = LB_FLOWS.insert(&key, &flow, 0);
        count(Stat::LbNew);
    }
    let (old, new) = (m.lb_vip, m.dst);
    rewrite(ctx, m, true, &old, &new, m.lb_vport, m.dport)
}

/// A packet delivered to a port of a VPC with load balancers: a backend's
/// reply to a load-balanced flow of the port leaves with the VIP's address
/// and port as its source.
#[inline(always)]
pub fn reply(ctx: &mut TcContext, m: &Meta) -> Result<(), DropReason> {
    if m.dst_port.flags & PORT_F_LB == 0 || (m.proto != PROTO_TCP && m.proto != PROTO_UDP) {
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
    // SAFETY: the value is copied out at once.
    let Some(r) = (unsafe { LB_REVERSE.get(&key) }).copied() else {
        return Ok(());
    };
    let old = m.src;
    rewrite(ctx, m, false, &old, &r.vip, m.sport, r.vport)
}

const BPF_F_PSEUDO_HDR: u64 = 1 << 4;
const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;

/// Rewrites the packet's destination (`dst`) or source address and port,
/// with the IP and TCP/UDP checksums.
#[inline(always)]
fn rewrite(
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
        let mut from = *old;
        let mut to = *new;
        // SAFETY: both buffers are 16 bytes, a multiple of 4.
        let diff = unsafe {
            gen::bpf_csum_diff(
                from.as_mut_ptr() as *mut u32,
                16,
                to.as_mut_ptr() as *mut u32,
                16,
                0,
            )
        };
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
