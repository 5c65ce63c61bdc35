//! One view of a packet for TC and XDP entries, so the parser and the
//! stages run behind either: direct access to the linear data for the
//! fixed headers, and byte loads only for what may lie beyond it (IPv6
//! extension chains, ICMP quotes).

use aya_ebpf::{
    helpers::gen,
    programs::{TcContext, XdpContext},
};

/// A packet an entry program received.
pub trait Pkt {
    /// Start of the linear data.
    fn data(&self) -> usize;
    /// End of the linear data.
    fn data_end(&self) -> usize;
    /// Length of the whole packet, linear or not.
    fn len(&self) -> u32;
    /// The device the packet came in on (TC: the device of the hook).
    fn ifindex(&self) -> u32;
    /// Copies `N` bytes at `off` into `buf`, wherever they lie.
    fn load_bytes<const N: usize>(&self, off: usize, buf: &mut [u8; N]) -> bool;
}

impl Pkt for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }
    #[inline(always)]
    fn len(&self) -> u32 {
        TcContext::len(self)
    }
    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: reading a field of the context.
        unsafe { (*self.skb.skb).ifindex }
    }
    #[inline(always)]
    fn load_bytes<const N: usize>(&self, off: usize, buf: &mut [u8; N]) -> bool {
        // SAFETY: the helper writes at most N bytes into buf.
        unsafe {
            gen::bpf_skb_load_bytes(
                self.skb.skb as *const _,
                off as u32,
                buf.as_mut_ptr() as *mut _,
                N as u32,
            ) == 0
        }
    }
}

impl Pkt for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }
    #[inline(always)]
    fn len(&self) -> u32 {
        (XdpContext::data_end(self) - XdpContext::data(self)) as u32
    }
    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: reading a field of the context.
        unsafe { (*self.ctx).ingress_ifindex }
    }
    #[inline(always)]
    fn load_bytes<const N: usize>(&self, off: usize, buf: &mut [u8; N]) -> bool {
        // SAFETY: the helper writes at most N bytes into buf.
        unsafe { gen::bpf_xdp_load_bytes(self.ctx, off as u32, buf.as_mut_ptr() as *mut _, N as u32) == 0 }
    }
}

/// Offsets up to this are read directly when the linear data holds them.
const DIRECT_MAX: usize = 255;

/// Reads `N` bytes at `off`: straight from the linear data when it holds
/// them, else with a byte load. `None` when the packet is shorter.
#[inline(always)]
pub fn read<C: Pkt, const N: usize>(ctx: &C, off: usize) -> Option<[u8; N]> {
    let mut buf = [0u8; N];
    if off <= DIRECT_MAX {
        let start = ctx.data();
        if start + off + N <= ctx.data_end() {
            // SAFETY: the bytes lie within [data, data_end), checked above.
            return Some(unsafe { core::ptr::read_unaligned((start + off) as *const [u8; N]) });
        }
    }
    if ctx.load_bytes(off, &mut buf) {
        Some(buf)
    } else {
        None
    }
}

/// Reads `N` bytes at `off` with a byte load (beyond the fixed headers).
#[inline(always)]
pub fn load<C: Pkt, const N: usize>(ctx: &C, off: usize) -> Option<[u8; N]> {
    let mut buf = [0u8; N];
    if ctx.load_bytes(off, &mut buf) {
        Some(buf)
    } else {
        None
    }
}
