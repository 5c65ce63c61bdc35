//! TC programs on the host side of each VM's veth.
//!
//! `from_vm` runs at TC ingress of the host-side device (packets the VM sends):
//! anti-spoofing, then egress security groups with conntrack.
//! `to_vm` runs at TC egress of the same device (packets towards the VM):
//! ingress security groups with conntrack.
//!
//! Policy order (DESIGN.md): quarantine, zones, firewalls and security groups;
//! this first program carries the security-group tier.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod conntrack;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod policy;
#[cfg(target_arch = "bpf")]
mod port;

#[cfg(target_arch = "bpf")]
mod progs {
    use aya_ebpf::{macros::classifier, programs::TcContext};
    use dataplane_common::{DropReason, Stat};

    use crate::{maps, port};

    const TC_ACT_OK: i32 = 0;
    const TC_ACT_SHOT: i32 = 2;

    #[inline(always)]
    fn verdict(r: Result<(), DropReason>) -> i32 {
        match r {
            Ok(()) => {
                maps::count(Stat::Passed);
                TC_ACT_OK
            }
            Err(reason) => {
                maps::count_drop(reason);
                TC_ACT_SHOT
            }
        }
    }

    /// Packets the VM sends.
    #[classifier]
    pub fn from_vm(ctx: TcContext) -> i32 {
        verdict(port::from_vm(&ctx))
    }

    /// Packets towards the VM.
    #[classifier]
    pub fn to_vm(ctx: TcContext) -> i32 {
        verdict(port::to_vm(&ctx))
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
