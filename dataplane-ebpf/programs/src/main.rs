//! The dataplane as a pipeline of TC programs.
//!
//! Entry programs, one per door a packet can come through, parse the packet
//! once into a per-CPU metadata record and tail-call the stages:
//! - `from_vm`: TC ingress of a VM port's host-side device (what the VM
//!   sends): parsing and anti-spoofing;
//! - `to_vm`: TC egress of the same device (what the host's own stack
//!   sends to the VM; the pipeline delivers straight to the VM's side);
//! - `from_uplink`: TC ingress of a zone uplink;
//! - `from_overlay`: TC ingress of the host's collect-metadata VXLAN device.
//!
//! Stages, in a program array (`SDN_PIPE`), each with its own verifier
//! budget: `st_guard` (quarantine, destination, conntrack lookup, zone
//! guard), `st_firewall` (border and VPC firewalls), `st_lb` (a flow to a
//! VIP gets its backend; then the guard again), `st_policy` (security
//! groups), `st_commit` (state writes,
//! rewrite, encapsulation, redirect). A missing stage or a failed tail call
//! drops the packet (`pipeline`). Nothing is written before `st_commit`, so
//! a packet that any stage drops leaves no state behind.
//!
//! North-south, on a load balancer's NAT hosts (`nat.rs`): `st_nat_in`
//! (zone guard and border firewall of a packet from the zone to a VIP),
//! `st_nat_lb` (member and NAT port, then `st_guard` on the way into the
//! VPC), `st_nat_commit` (the flow's writes and translation, after
//! `st_commit`), `st_nat_out` (a member's reply translated back out of
//! the client's uplink).
//!
//! `to_uplink` (TC egress of an uplink) stands alone: a VM's address leaves
//! only as the pipeline sent it.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod commit;
#[cfg(target_arch = "bpf")]
mod ctx;
#[cfg(target_arch = "bpf")]
mod firewall;
#[cfg(target_arch = "bpf")]
mod guard;
#[cfg(target_arch = "bpf")]
mod lb;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod meta;
#[cfg(target_arch = "bpf")]
mod mirror;
#[cfg(target_arch = "bpf")]
mod nat;
#[cfg(target_arch = "bpf")]
mod overlay;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod policy;
#[cfg(target_arch = "bpf")]
mod port;
#[cfg(target_arch = "bpf")]
mod uplink;
#[cfg(target_arch = "bpf")]
mod vrrp;

#[cfg(target_arch = "bpf")]
mod progs {
    use aya_ebpf::{
        bindings::xdp_action,
        helpers::gen,
        macros::{classifier, xdp},
        programs::{TcContext, XdpContext},
    };
    use dataplane_common::{stage, DropReason, Stat};

    use crate::{
        commit::{self, Action},
        firewall, guard,
        maps::{self, meta, PIPE},
        meta::{Meta, E_FROM_VM, E_NAT, K_IP, O_NAT},
        overlay, policy, port, uplink,
    };

    const TC_ACT_OK: i32 = 0;
    const TC_ACT_SHOT: i32 = 2;

    #[inline(always)]
    fn drop(reason: DropReason) -> i32 {
        maps::count_drop(reason);
        TC_ACT_SHOT
    }

    /// Drops a packet whose record is filled: a security tier's refusal is
    /// also reported (see `maps::report_denial`).
    #[inline(always)]
    fn deny(m: &Meta, reason: DropReason) -> i32 {
        maps::report_denial(m, reason);
        drop(reason)
    }

    /// Goes on to stage `idx`; when that fails, the packet is dropped.
    #[inline(always)]
    fn next(ctx: &TcContext, idx: u32) -> i32 {
        // SAFETY: on success the call does not return.
        let _ = unsafe { PIPE.tail_call(ctx, idx) };
        drop(DropReason::Pipeline)
    }

    /// Runs an entry's parse into the record, then the first stage.
    #[inline(always)]
    fn enter(ctx: &TcContext, f: impl FnOnce(&mut Meta) -> Result<(), DropReason>) -> i32 {
        let Some(m) = meta() else {
            return drop(DropReason::Pipeline);
        };
        match f(m) {
            Ok(()) => next(ctx, stage::GUARD),
            Err(r) => deny(m, r),
        }
    }

    /// Packets the VM sends (TC ingress of the host-side device).
    #[classifier]
    #[inline(always)]
    pub fn from_vm(ctx: TcContext) -> i32 {
        enter(&ctx, |m| port::from_vm(&ctx, m))
    }

    /// Packets the host's stack sends towards the VM (TC egress).
    #[classifier]
    #[inline(always)]
    pub fn to_vm(ctx: TcContext) -> i32 {
        enter(&ctx, |m| port::to_vm(&ctx, m))
    }

    /// Mirroring's copies of a delivery into a VM's side, then the
    /// delivery (the pipeline tail-calls it for a port with sessions).
    #[classifier]
    #[inline(always)]
    pub fn st_mirror(mut ctx: TcContext) -> i32 {
        let ifindex = match maps::MIRROR_PENDING.get(0) {
            Some(i) if *i != 0 => *i,
            _ => return drop(DropReason::Pipeline),
        };
        crate::mirror::observe_delivery(&mut ctx, ifindex);
        // SAFETY: the packet enters the VM's side of the veth.
        unsafe { gen::bpf_redirect_peer(ifindex, 0) as i32 }
    }

    /// Mirroring's observer of what a VM sends (TC ingress of its port's
    /// device, before `from_vm`).
    #[classifier]
    #[inline(always)]
    pub fn mirror_from_vm(mut ctx: TcContext) -> i32 {
        crate::mirror::observe(&mut ctx, false)
    }

    /// Mirroring's observer of what reaches a VM, and the door of a tap
    /// port's copies (TC egress, before `to_vm`).
    #[classifier]
    #[inline(always)]
    pub fn mirror_to_vm(mut ctx: TcContext) -> i32 {
        crate::mirror::observe(&mut ctx, true)
    }

    /// Copies from other hosts for a tap here (TC ingress of the VXLAN
    /// device, before `from_overlay`).
    #[classifier]
    #[inline(always)]
    pub fn mirror_from_overlay(mut ctx: TcContext) -> i32 {
        crate::mirror::from_overlay(&mut ctx)
    }

    /// VRRP of tenant VMs: what a holder port's VM advertises (TC ingress
    /// of its device, before `from_vm`).
    #[classifier]
    #[inline(always)]
    pub fn vrrp_from_vm(mut ctx: TcContext) -> i32 {
        crate::vrrp::from_vm(&mut ctx)
    }

    /// VRRP of tenant VMs: relayed advertisements into a holder port's VM
    /// (TC egress of its device, before `to_vm`).
    #[classifier]
    #[inline(always)]
    pub fn vrrp_to_vm(ctx: TcContext) -> i32 {
        crate::vrrp::to_vm(&ctx)
    }

    /// VRRP of tenant VMs: other hosts' holders' advertisements (TC
    /// ingress of the VXLAN device, before `from_overlay`).
    #[classifier]
    #[inline(always)]
    pub fn vrrp_from_overlay(mut ctx: TcContext) -> i32 {
        crate::vrrp::from_overlay(&mut ctx)
    }

    /// Packets arriving from a zone uplink (TC ingress).
    #[classifier]
    #[inline(always)]
    pub fn from_uplink(ctx: TcContext) -> i32 {
        let Some(m) = meta() else {
            return drop(DropReason::Pipeline);
        };
        match uplink::from_uplink(&ctx, m) {
            Ok(uplink::Arrival::Pipeline) => next(&ctx, stage::GUARD),
            Ok(uplink::Arrival::Host) => TC_ACT_OK,
            Ok(uplink::Arrival::Nat) => next(&ctx, stage::NAT_IN),
            Err(r) => deny(m, r),
        }
    }

    /// Packets leaving through a zone uplink (TC egress).
    #[classifier]
    #[inline(always)]
    pub fn to_uplink(mut ctx: TcContext) -> i32 {
        match uplink::to_uplink(&mut ctx) {
            Ok(()) => TC_ACT_OK,
            Err(r) => drop(r),
        }
    }

    /// Packets from the overlay (TC ingress of the VXLAN device).
    #[classifier]
    #[inline(always)]
    pub fn from_overlay(ctx: TcContext) -> i32 {
        enter(&ctx, |m| overlay::from_overlay(&ctx, m))
    }

    #[classifier]
    #[inline(always)]
    pub fn st_guard(mut ctx: TcContext) -> i32 {
        let Some(m) = meta() else {
            return drop(DropReason::Pipeline);
        };
        match guard::guard(&mut ctx, m) {
            // Each tail call with a constant slot: the JIT makes those
            // direct jumps.
            Ok(guard::Next::Stage(stage::FIREWALL)) => next(&ctx, stage::FIREWALL),
            Ok(guard::Next::Stage(stage::LB)) => next(&ctx, stage::LB),
            Ok(guard::Next::Stage(stage::NAT_OUT)) => next(&ctx, stage::NAT_OUT),
            Ok(guard::Next::Stage(_)) => next(&ctx, stage::COMMIT),
            Ok(guard::Next::Done(action)) => {
                // The fast path of an established flow: answers mostly
                // take it. (Its rewrites move no header: the tunnel is
                // metadata, the MACs keep their place.)
                maps::copy_dns(&ctx, m);
                finish(&ctx, m, Ok(action))
            }
            Err(r) => deny(m, r),
        }
    }

    #[classifier]
    #[inline(always)]
    pub fn st_firewall(ctx: TcContext) -> i32 {
        let Some(m) = meta() else {
            return drop(DropReason::Pipeline);
        };
        match firewall::stage(m) {
            Ok(()) => next(&ctx, stage::POLICY),
            Err(r) => deny(m, r),
        }
    }

    /// The load balancer: the packet's backend, then the guard again.
    #[classifier]
    #[inline(always)]
    pub fn st_lb(ctx: TcContext) -> i32 {
        let Some(m) = meta() else {
            return drop(DropReason::Pipeline);
        };
        match crate::lb::stage(m) {
            Ok(()) => next(&ctx, stage::GUARD),
            Err(r) => deny(m, r),
        }
    }

    /// North-south: the zone guard and border firewall of a packet from
    /// the zone to a VIP this host translates, then the load balancer.
    #[classifier]
    #[inline(always)]
    pub fn st_nat_in(ctx: TcContext) -> i32 {
        let Some(m) = meta() else {
            return drop(DropReason::Pipeline);
        };
        match crate::nat::admit(m) {
            Ok(()) => next(&ctx, stage::NAT_LB),
            Err(r) => deny(m, r),
        }
    }

    /// North-south: the flow's member and NAT port, then the guard on the
    /// way into the VPC.
    #[classifier]
    #[inline(always)]
    pub fn st_nat_lb(ctx: TcContext) -> i32 {
        let Some(m) = meta() else {
            return drop(DropReason::Pipeline);
        };
        match crate::nat::schedule(m) {
            Ok(()) => next(&ctx, stage::GUARD),
            Err(r) => deny(m, r),
        }
    }

    /// North-south: the flow's writes and translation, then the packet
    /// goes to its member.
    #[classifier]
    #[inline(always)]
    pub fn st_nat_commit(mut ctx: TcContext) -> i32 {
        let Some(m) = meta() else {
            return drop(DropReason::Pipeline);
        };
        let r = match crate::nat::commit(&mut ctx, m) {
            Ok(()) => crate::nat::deliver(&mut ctx, m),
            Err(r) => Err(r),
        };
        match meta() {
            Some(m) => finish(&ctx, m, r),
            None => drop(DropReason::Pipeline),
        }
    }

    /// North-south: a member's reply translated back and sent out of the
    /// client's uplink.
    #[classifier]
    #[inline(always)]
    pub fn st_nat_out(mut ctx: TcContext) -> i32 {
        let Some(m) = meta() else {
            return drop(DropReason::Pipeline);
        };
        match crate::nat::outbound(&mut ctx, m) {
            Ok(uplink) => {
                ctx.set_mark(dataplane_common::MARK_PIPELINE);
                maps::count(Stat::ToUplink);
                // SAFETY: no parameters: the kernel looks up the next hop.
                unsafe { gen::bpf_redirect_neigh(uplink, core::ptr::null_mut(), 0, 0) as i32 }
            }
            Err(r) => deny(m, r),
        }
    }

    #[classifier]
    #[inline(always)]
    pub fn st_policy(ctx: TcContext) -> i32 {
        let Some(m) = meta() else {
            return drop(DropReason::Pipeline);
        };
        match policy::stage(m) {
            Ok(()) => next(&ctx, stage::COMMIT),
            Err(r) => deny(m, r),
        }
    }

    #[classifier]
    #[inline(always)]
    pub fn st_commit(mut ctx: TcContext) -> i32 {
        let Some(m) = meta() else {
            return drop(DropReason::Pipeline);
        };
        if m.kind == K_IP && (m.entry == E_NAT || m.out == O_NAT) {
            // North-south: once the local side's entries are written, a
            // flow's own writes and translation, or a reply's translation
            // back, are stages of their own.
            // The border's verdict of a flow from the zone is recorded under
            // the VIP's key by `st_nat_commit`, not under the member's.
            let record = m.fw_record;
            m.fw_record = 0;
            let r = commit::writes(&mut ctx, m);
            m.fw_record = record;
            return match r {
                Ok(()) if m.out == O_NAT => next(&ctx, stage::NAT_OUT),
                Ok(()) => next(&ctx, stage::NAT_COMMIT),
                Err(r) => deny(m, r),
            };
        }
        let r = commit::commit(&mut ctx, m);
        // Only what goes on is copied. (The commit moves no header: the
        // tunnel is metadata, the MACs keep their place.) The record is
        // looked up again: the verifier keeps no pointer across the
        // commit's helper calls on every path.
        if r.is_ok() {
            if let Some(m) = meta() {
                maps::copy_dns(&ctx, m);
            }
        }
        match meta() {
            Some(m) => finish(&ctx, m, r),
            None => drop(DropReason::Pipeline),
        }
    }

    /// The TC verdict of a packet every tier has allowed (or a drop).
    #[inline(always)]
    fn finish(ctx: &TcContext, m: &Meta, r: Result<Action, DropReason>) -> i32 {
        match r {
            Ok(Action::Pass) => {
                maps::count(Stat::Passed);
                TC_ACT_OK
            }
            Ok(Action::Redirect(ifindex)) => {
                maps::count(Stat::Passed);
                // SAFETY: plain helper call; it returns TC_ACT_REDIRECT or TC_ACT_SHOT.
                unsafe { gen::bpf_redirect(ifindex, 0) as i32 }
            }
            Ok(Action::Peer(ifindex)) => {
                maps::count(Stat::Passed);
                if maps::mirror_in(ifindex) {
                    // Copied first, beside the pipeline, which delivers.
                    if let Some(p) = maps::MIRROR_PENDING.get_ptr_mut(0) {
                        // SAFETY: this CPU's slot.
                        unsafe { *p = ifindex };
                        // SAFETY: on success the call does not return.
                        let _ = unsafe { PIPE.tail_call(ctx, stage::MIRROR) };
                    }
                    // The copies failed: the packet goes on all the same.
                }
                // SAFETY: as above; the packet enters the VM's side of the veth.
                unsafe { gen::bpf_redirect_peer(ifindex, 0) as i32 }
            }
            Ok(Action::Neighbour(ifindex)) => {
                maps::count(Stat::Passed);
                // SAFETY: no parameters: the kernel looks up the next hop.
                unsafe { gen::bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32 }
            }
            Ok(Action::Consume) => TC_ACT_SHOT,

            Err(r) => deny(m, r),
        }
    }

    /// The parser and anti-spoofing at an XDP entry: the same code as
    /// `from_vm`, behind the XDP context. Passes what `from_vm` would hand
    /// to the pipeline, drops (and counts) the rest. Used by the tests to
    /// hold the parser to one behaviour behind both contexts.
    #[xdp]
    #[inline(always)]
    pub fn xdp_from_vm(ctx: XdpContext) -> u32 {
        let Some(m) = meta() else {
            maps::count_drop(DropReason::Pipeline);
            return xdp_action::XDP_DROP;
        };
        match port::from_vm(&ctx, m) {
            Ok(()) if m.entry == E_FROM_VM => xdp_action::XDP_PASS,
            Ok(()) => xdp_action::XDP_DROP,
            Err(r) => {
                maps::count_drop(r);
                xdp_action::XDP_DROP
            }
        }
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }
}

#[cfg(target_arch = "bpf")]
#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!("dataplane-ebpf builds for the bpf target only; the agent embeds it");
}
