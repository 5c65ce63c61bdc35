//! TC programs on the host side of each VM's veth.
//!
//! `from_vm` runs at TC ingress of the host-side device (packets the VM sends):
//! anti-spoofing, then egress security groups with conntrack.
//! `to_vm` runs at TC egress of the same device (packets towards the VM):
//! ingress security groups with conntrack.
//! `from_overlay` runs at TC ingress of the host's collect-metadata VXLAN
//! device: it checks the VNI against the sender and delivers to the port.
//!
//! Policy order (DESIGN.md): quarantine, zones, firewalls and security groups;
//! this first program carries the security-group tier.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod conntrack;
#[cfg(target_arch = "bpf")]
mod firewall;
#[cfg(target_arch = "bpf")]
mod forward;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod policy;
#[cfg(target_arch = "bpf")]
mod port;
#[cfg(target_arch = "bpf")]
mod zone;

#[cfg(target_arch = "bpf")]
mod progs {
    use aya_ebpf::{helpers::gen, macros::classifier, programs::TcContext};
    use dataplane_common::{DropReason, Stat};

    use crate::{forward, forward::Action, maps, port, zone};

    const TC_ACT_OK: i32 = 0;
    const TC_ACT_SHOT: i32 = 2;

    #[inline(always)]
    fn verdict(r: Result<Action, DropReason>) -> i32 {
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
            Ok(Action::Neighbour(ifindex)) => {
                maps::count(Stat::Passed);
                // SAFETY: no parameters: the kernel looks up the next hop.
                unsafe { gen::bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32 }
            }
            Ok(Action::Consume) => TC_ACT_SHOT,
            Err(reason) => {
                maps::count_drop(reason);
                TC_ACT_SHOT
            }
        }
    }

    /// Packets the VM sends (TC ingress of the host-side device).
    #[classifier]
    pub fn from_vm(mut ctx: TcContext) -> i32 {
        verdict(port::from_vm(&mut ctx))
    }

    /// Packets towards the VM (TC egress of the host-side device).
    #[classifier]
    pub fn to_vm(ctx: TcContext) -> i32 {
        verdict(port::to_vm(&ctx))
    }

    /// Packets leaving through a zone uplink (TC egress).
    #[classifier]
    pub fn to_uplink(ctx: TcContext) -> i32 {
        verdict(zone::to_uplink(&ctx))
    }

    /// Packets arriving from a zone uplink (TC ingress).
    #[classifier]
    pub fn from_uplink(mut ctx: TcContext) -> i32 {
        verdict(zone::from_uplink(&mut ctx))
    }

    /// Packets from the overlay (TC ingress of the VXLAN device).
    #[classifier]
    pub fn from_overlay(mut ctx: TcContext) -> i32 {
        verdict(forward::from_overlay(&mut ctx))
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
