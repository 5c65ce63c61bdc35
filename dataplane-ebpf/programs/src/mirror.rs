//! Mirroring: observers on a port's device, before the pipeline, that copy
//! what a session selects and pass every packet on unchanged.
//!
//! A copy goes to a tap port on this host with `bpf_clone_redirect` (the
//! whole packet, marked [`MIRROR_MARK`] so that the tap's own observer
//! takes it past the pipeline), or to the agent through a perf ring (up to
//! the snap length) for a tap on another host, a VXLAN collector or an
//! ERSPAN one. Sampling (1 in N) and the rate (per CPU, in one-second
//! windows) are applied before any copy is made; copies over the rate, or
//! that the kernel could not make, are counted per session and dropped.
//!
//! A packet's original is never written: only its mark is set for the
//! time of the clone and put back.

use aya_ebpf::{helpers::gen, programs::TcContext};
use dataplane_common::maps::{
    MirrorCfg, MirrorCopy, MirrorRuleCfg, MIRROR_COPY_MAX, MIRROR_IN, MIRROR_MARK, MIRROR_OUT, MIRROR_RULES,
    MIRROR_SLOTS,
};

use crate::{
    ctx::Pkt,
    maps::{MIRROR_PORTS, MIRROR_RING, MIRROR_SENDERS, MIRROR_SESSIONS, MIRROR_STATE, MIRROR_VNIS},
    overlay::tunnel_of,
};

/// Go on with the next program on the hook (the pipeline's entry).
pub const TCX_NEXT: i32 = -1;
const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;
const ETH_HLEN: usize = 14;

/// What the filters look at; `family` 0: not IP (it matches rules of any
/// family and protocol only). Every field is always written: the verifier
/// refuses a read of a register some path left unset.
struct Flow {
    family: u8,
    proto: u8,
    /// 1: the protocol and port are read; 0: not (a fragment after the
    /// first, extension headers beyond the walk): rules of a protocol or
    /// ports then match on the addresses alone, so a packet shaped to hide
    /// its port is copied rather than missed.
    exact: u8,
    dport: u16,
    src: [u32; 4],
    dst: [u32; 4],
}

impl Flow {
    /// Nothing read yet.
    const UNREAD: Flow = Flow {
        family: 0,
        proto: 0,
        exact: 0,
        dport: 0,
        src: [0; 4],
        dst: [0; 4],
    };
}

/// IPv6 extension headers walked past, at most.
const EXT_HEADERS_MAX: u32 = 4;

/// Reads the addresses, protocol and destination port from the linear
/// data. An IPv6 packet with extension headers has no port (its first
/// next-header is taken for the protocol).
#[inline(always)]
fn flow(ctx: &TcContext) -> Flow {
    let mut f = Flow::UNREAD;
    let data = ctx.data();
    let end = ctx.data_end();
    if data + ETH_HLEN > end {
        return f;
    }
    // SAFETY: bounds checked above.
    let ethertype = u16::from_be(unsafe { *((data + 12) as *const u16) });
    let l4 = match ethertype {
        0x0800 => {
            let ip = data + ETH_HLEN;
            if ip + 20 > end {
                return f;
            }
            // SAFETY: 20 bytes of the header are in bounds.
            unsafe {
                let ihl = (*(ip as *const u8) & 0x0f) as usize * 4;
                f.family = 4;
                f.proto = *((ip + 9) as *const u8);
                f.src[0] = *((ip + 12) as *const u32);
                f.dst[0] = *((ip + 16) as *const u32);
                // A fragment after the first has no ports.
                let frag = u16::from_be(*((ip + 6) as *const u16)) & 0x1fff;
                if frag != 0 || ihl < 20 {
                    return f;
                }
                ip + ihl
            }
        }
        0x86dd => {
            let ip = data + ETH_HLEN;
            if ip + 40 > end {
                return f;
            }
            // SAFETY: 40 bytes of the header are in bounds.
            unsafe {
                f.family = 6;
                f.proto = *((ip + 6) as *const u8);
                let mut i = 0;
                while i < 4 {
                    f.src[i] = *((ip + 8 + 4 * i) as *const u32);
                    f.dst[i] = *((ip + 24 + 4 * i) as *const u32);
                    i += 1;
                }
            }
            // Past hop-by-hop, routing, destination options, AH and a
            // first fragment's header, as the pipeline walks them.
            let mut off = ip + 40;
            let mut n = 0;
            while n < EXT_HEADERS_MAX {
                if !matches!(f.proto, 0 | 43 | 60 | 51 | 44) {
                    break;
                }
                if off + 8 > end {
                    return f;
                }
                // SAFETY: eight bytes of the extension header are in bounds.
                let (next, len, frag) = unsafe {
                    (
                        *(off as *const u8),
                        *((off + 1) as *const u8) as usize,
                        u16::from_be(*((off + 2) as *const u16)) & 0xfff8,
                    )
                };
                let hlen = match f.proto {
                    51 => (len + 2) * 4,
                    44 => {
                        if frag != 0 {
                            f.proto = next;
                            return f;
                        }
                        8
                    }
                    _ => (len + 1) * 8,
                };
                f.proto = next;
                off += hlen;
                n += 1;
            }
            if matches!(f.proto, 0 | 43 | 60 | 51 | 44) {
                return f;
            }
            off
        }
        _ => return f,
    };
    if f.proto == 6 || f.proto == 17 {
        if l4 + 4 > end {
            return f;
        }
        // SAFETY: four bytes of the transport header are in bounds.
        f.dport = u16::from_be(unsafe { *((l4 + 2) as *const u16) });
    }
    f.exact = 1;
    f
}

#[inline(always)]
pub fn mark(ctx: &TcContext) -> u32 {
    // SAFETY: reading a field of the context.
    unsafe { (*ctx.skb.skb).mark }
}

#[inline(always)]
fn masked_eq(a: &[u32; 4], want: &[u32; 4], mask: &[u32; 4]) -> bool {
    (a[0] & mask[0]) == want[0]
        && (a[1] & mask[1]) == want[1]
        && (a[2] & mask[2]) == want[2]
        && (a[3] & mask[3]) == want[3]
}

#[inline(always)]
fn rule_matches(r: &MirrorRuleCfg, f: &Flow) -> bool {
    if f.family == 0 {
        return r.family == 0 && r.proto == 0;
    }
    if r.family != 0 && r.family != f.family {
        return false;
    }
    if f.exact != 0 {
        if r.proto != 0 && r.proto != f.proto {
            return false;
        }
        if r.port_hi != 0 && (f.dport < r.port_lo || f.dport > r.port_hi) {
            return false;
        }
    }
    masked_eq(&f.src, &r.src, &r.src_mask) && masked_eq(&f.dst, &r.dst, &r.dst_mask)
}

#[inline(always)]
fn selects(cfg: &MirrorCfg, f: &Flow) -> bool {
    if cfg.nrules == 0 {
        return true;
    }
    let mut i = 0;
    while i < MIRROR_RULES {
        if i as u32 >= cfg.nrules {
            return false;
        }
        if rule_matches(&cfg.rules[i], f) {
            return true;
        }
        i += 1;
    }
    false
}

/// Copies what the port's sessions of this direction select; always
/// passes the packet on.
#[inline(always)]
pub fn observe(ctx: &mut TcContext, to_vm: bool) -> i32 {
    let ifx = ctx.ifindex();
    // SAFETY: a read of a map value.
    let Some(port) = (unsafe { MIRROR_PORTS.get(&ifx) }) else {
        return TCX_NEXT;
    };
    // A copy for this tap: it goes to the VM, past the pipeline (which
    // would refuse a packet not addressed to the port).
    if to_vm && port.tap != 0 && mark(ctx) == MIRROR_MARK {
        return TC_ACT_OK;
    }
    let mask = if to_vm { port.in_mask } else { port.out_mask };
    copy_all(ctx, ifx, mask, to_vm);
    TCX_NEXT
}

/// Copies what reaches the port `ifx` for its sessions (a delivery the
/// pipeline makes into the VM's side, which passes no hook of the port's
/// device).
#[inline(always)]
pub fn observe_delivery(ctx: &mut TcContext, ifx: u32) {
    // SAFETY: a read of a map value.
    if let Some(port) = unsafe { MIRROR_PORTS.get(&ifx) } {
        copy_all(ctx, ifx, port.in_mask, true);
    }
}

#[inline(always)]
fn copy_all(ctx: &mut TcContext, ifx: u32, mask: u32, to_vm: bool) {
    if mask == 0 {
        return;
    }
    // The packet is read only for sessions with filters (a session of
    // every packet, sampled, costs no parse).
    let mut filtered = false;
    let mut slot = 0u32;
    while slot < MIRROR_SLOTS {
        if mask & (1 << slot) != 0 && MIRROR_SESSIONS.get(slot).is_some_and(|c| c.nrules != 0) {
            filtered = true;
        }
        slot += 1;
    }
    let f = if filtered { flow(ctx) } else { Flow::UNREAD };
    // SAFETY: a helper with no arguments.
    let now = unsafe { gen::bpf_ktime_get_coarse_ns() };
    let mut slot = 0u32;
    while slot < MIRROR_SLOTS {
        if mask & (1 << slot) != 0 {
            copy(ctx, ifx, slot, &f, now, to_vm);
        }
        slot += 1;
    }
}

#[inline(always)]
fn copy(ctx: &mut TcContext, ifx: u32, slot: u32, f: &Flow, now: u64, to_vm: bool) {
    let Some(cfg) = MIRROR_SESSIONS.get(slot) else { return };
    if cfg.active == 0 || !selects(cfg, f) {
        return;
    }
    let Some(st) = MIRROR_STATE.get_ptr_mut(slot) else {
        return;
    };
    // SAFETY: this CPU's slot; nothing else writes it meanwhile.
    let st = unsafe { &mut *st };
    st.matched += 1;
    if cfg.sample > 1 && st.matched % cfg.sample as u64 != 0 {
        st.sampled_out += 1;
        return;
    }
    if now.wrapping_sub(st.window_ns) >= 1_000_000_000 {
        st.window_ns = now;
        st.in_window = 0;
    }
    if st.in_window >= cfg.rate_per_cpu as u64 {
        st.over_rate += 1;
        return;
    }
    st.in_window += 1;
    let mut ok = true;
    if cfg.tap_ifindex != 0 {
        let old = mark(ctx);
        ctx.set_mark(MIRROR_MARK);
        // SAFETY: the skb of this program; the clone goes out of the tap's
        // device (to its VM), the original is left as it was.
        let r = unsafe { gen::bpf_clone_redirect(ctx.skb.skb, cfg.tap_ifindex, 0) };
        ctx.set_mark(old);
        ok &= r == 0;
    }
    if cfg.to_agent != 0 {
        let whole = ctx.len();
        let mut len = if cfg.snap_len != 0 && cfg.snap_len < whole {
            cfg.snap_len
        } else {
            whole
        };
        if len > MIRROR_COPY_MAX {
            len = MIRROR_COPY_MAX;
        }
        let hdr = MirrorCopy {
            now_ns: now,
            ifindex: ifx,
            len,
            orig_len: whole,
            slot: slot as u8,
            direction: if to_vm { MIRROR_IN } else { MIRROR_OUT },
            generation: cfg.generation as u16,
        };
        // SAFETY: the header is plain data of the size passed; the helper
        // appends the packet's first `len` bytes (at most its length).
        let r = unsafe {
            gen::bpf_perf_event_output(
                ctx.skb.skb as *mut _,
                &MIRROR_RING as *const _ as *mut _,
                (u64::from(len) << 32) | 0xffff_ffff,
                &hdr as *const MirrorCopy as *mut _,
                core::mem::size_of::<MirrorCopy>() as u64,
            )
        };
        ok &= r == 0;
    }
    if ok {
        st.copied += 1;
    } else {
        st.failed += 1;
    }
}

/// Copies from other hosts, arriving on the VXLAN device under a mirror
/// session's VNI: to the session's tap, if they come from a host of the
/// cloud; dropped if they come from anywhere else. Anything else goes on
/// to the pipeline's overlay entry.
#[inline(always)]
pub fn from_overlay(ctx: &mut TcContext) -> i32 {
    let Some(key) = tunnel_of(ctx) else {
        return TCX_NEXT;
    };
    // SAFETY: reads of map values.
    let Some(v) = (unsafe { MIRROR_VNIS.get(&key.tunnel_id) }) else {
        return TCX_NEXT;
    };
    // The remote address as the kernel gives it: host order, the key the
    // agent writes (`u32::from(Ipv4Addr)`).
    let sender = key.remote[0];
    // SAFETY: as above.
    if unsafe { MIRROR_SENDERS.get(&sender) }.is_none() {
        if let Some(st) = MIRROR_STATE.get_ptr_mut(v.slot) {
            // SAFETY: this CPU's slot.
            unsafe { (*st).failed += 1 };
        }
        return TC_ACT_SHOT;
    }
    let tap = v.tap_ifindex;
    ctx.set_mark(MIRROR_MARK);
    // SAFETY: a helper on this program's skb.
    unsafe { gen::bpf_redirect(tap, 0) as i32 }
}
