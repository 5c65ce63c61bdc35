//! VRRP of tenant VMs (virtual IPs held by ports): observers on a holder
//! port's device and on the VXLAN device, before the pipeline.
//!
//! A VM running keepalived advertises to 224.0.0.18, which the overlay
//! does not route. `vrrp_from_vm` takes those advertisements off the
//! port: one from a holder of the VPC's router, as the holder sends it
//! (its MAC and address, TTL 255, a priority no higher than declared, an
//! interval no longer than its virtual IP's, not within 2 ms of its last,
//! no longer than 255 addresses make it), is
//! copied to the router's other holder ports here and, once per host, to
//! the hosts of its holders elsewhere; anything else is dropped
//! (`vrrp_not_holder`, `vrrp_priority`, `vrrp_interval`). The port's last
//! advertisement is
//! recorded (`SDN_VRRP_SEEN`): the agent claims the virtual IP for the
//! port that speaks. On another host, `vrrp_from_overlay` checks the copy
//! again (the sending host must be the holder's) and hands it to the
//! holder ports there. A copy enters a VM through its device's egress,
//! marked so that `vrrp_to_vm` lets it past the pipeline.
//!
//! keepalived's `unicast_peer` mode sends each advertisement to one peer:
//! from a holder port, it is checked and recorded the same way, then the
//! pipeline carries it like any packet (the security groups must allow
//! protocol 112 between the holders).
//!
//! Every other packet goes on unchanged to the next program.

use aya_ebpf::{helpers::gen, programs::TcContext};
use dataplane_common::{
    maps::{
        VrrpGroup, VrrpKey, VrrpMember, VrrpSeen, VrrpSeenKey, PORT_F_QUARANTINED, PORT_F_REJECTED, VRRP_LEN_MAX,
        VRRP_MARK, VRRP_MEMBERS, VRRP_MIN_GAP_NS,
    },
    DropReason, FAMILY_V4,
};

use crate::{
    ctx::{load, Pkt},
    maps::{count_drop, CONFIG, PORTS, VRRP_GROUPS, VRRP_SEEN},
    mirror::{mark, TCX_NEXT},
    overlay::{set_tunnel, tunnel_of},
};

const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;
const ETH_HLEN: usize = 14;
const PROTO_VRRP: u8 = 112;
const VRRP_GROUP_V4: [u8; 4] = [224, 0, 0, 18];

/// What an advertisement says and how it came.
struct Advert {
    smac: [u8; 6],
    src: [u8; 4],
    ttl: u8,
    version: u8,
    vrid: u8,
    priority: u8,
    interval_cs: u16,
    /// To the VRRP group (else to one peer: keepalived's `unicast_peer`).
    multicast: bool,
}

enum Seen {
    /// Not IPv4 VRRP.
    Other,
    /// VRRP to the group, but cut short, fragmented or not an
    /// advertisement of version 2 or 3.
    Bad,
    Advert(Advert),
}

/// Reads an IPv4 VRRP advertisement (to 224.0.0.18, or to one peer). A
/// malformed one to a peer is `Other`: the pipeline judges it as any
/// packet.
#[inline(always)]
fn advert(ctx: &TcContext) -> Seen {
    let Some(eth) = load::<TcContext, 14>(ctx, 0) else {
        return Seen::Other;
    };
    if eth[12] != 0x08 || eth[13] != 0x00 {
        return Seen::Other;
    }
    let Some(ip) = load::<TcContext, 20>(ctx, ETH_HLEN) else {
        return Seen::Other;
    };
    if ip[9] != PROTO_VRRP {
        return Seen::Other;
    }
    let multicast = ip[16..20] == VRRP_GROUP_V4;
    let bad = if multicast { Seen::Bad } else { Seen::Other };
    let ihl = (ip[0] & 0x0f) as usize * 4;
    // A fragment (offset or more-fragments) is no advertisement.
    if ip[0] >> 4 != 4 || ihl < 20 || (ip[6] & 0x3f) != 0 || ip[7] != 0 {
        return bad;
    }
    let Some(v) = load::<TcContext, 8>(ctx, ETH_HLEN + (ihl & 0x3c)) else {
        return bad;
    };
    let version = v[0] >> 4;
    if v[0] & 0x0f != 1 || !(version == 2 || version == 3) {
        return bad;
    }
    // VRRPv3: 12 bits of centiseconds; VRRPv2: seconds in one octet.
    let interval_cs = if version == 3 {
        (u16::from(v[4] & 0x0f) << 8) | u16::from(v[5])
    } else {
        u16::from(v[5]) * 100
    };
    let mut smac = [0u8; 6];
    smac.copy_from_slice(&eth[6..12]);
    let mut src = [0u8; 4];
    src.copy_from_slice(&ip[12..16]);
    Seen::Advert(Advert {
        smac,
        src,
        ttl: ip[8],
        version,
        vrid: v[1],
        priority: v[2],
        interval_cs,
        multicast,
    })
}

#[inline(always)]
fn refuse(reason: DropReason) -> i32 {
    count_drop(reason);
    TC_ACT_SHOT
}

#[inline(always)]
fn group(vni: u32, vrid: u8) -> Option<&'static VrrpGroup> {
    let key = VrrpKey {
        vni,
        vrid,
        family: FAMILY_V4,
        _pad: [0; 2],
    };
    // SAFETY: a read of a map value.
    unsafe { VRRP_GROUPS.get(&key) }
}

/// The priority the holder `is` picks out was declared with, if one is.
#[inline(always)]
fn declared(g: &VrrpGroup, is: impl Fn(&VrrpMember) -> bool) -> Option<u8> {
    let mut out = None;
    let mut i = 0;
    while i < VRRP_MEMBERS {
        if i >= g.n_members as usize {
            break;
        }
        if is(&g.members[i]) {
            out = Some(g.members[i].priority);
        }
        i += 1;
    }
    out
}

/// An advertisement of a holder (`declared`: its declared priority) as
/// its virtual IP allows: TTL 255, its priority at most, its interval at
/// most, and no longer than any.
#[inline(always)]
fn within(ctx: &TcContext, a: &Advert, g: &VrrpGroup, declared: Option<u8>) -> Result<(), DropReason> {
    let Some(declared) = declared else {
        return Err(DropReason::VrrpNotHolder);
    };
    if a.ttl != 255 {
        return Err(DropReason::VrrpNotHolder);
    }
    if a.priority > declared {
        return Err(DropReason::VrrpPriority);
    }
    if a.interval_cs > g.interval_cs || ctx.len() > VRRP_LEN_MAX {
        return Err(DropReason::VrrpInterval);
    }
    Ok(())
}

/// Copies the packet into each holder port here but `except`, and (when
/// `hosts`) once to each other host with a holder.
#[inline(always)]
fn relay(ctx: &mut TcContext, g: &VrrpGroup, except: u32, vni: u32, hosts: bool) {
    let old = mark(ctx);
    ctx.set_mark(VRRP_MARK);
    let mut i = 0;
    while i < VRRP_MEMBERS {
        if i >= g.n_members as usize {
            break;
        }
        let to = g.members[i].ifindex;
        if to != 0 && to != except {
            // SAFETY: the skb of this program; the clone leaves through the
            // holder's device into its VM, the original stays as it was.
            let _ = unsafe { gen::bpf_clone_redirect(ctx.skb.skb, to, 0) };
        }
        i += 1;
    }
    // The tunnel's route lookup sees the packet's own mark.
    ctx.set_mark(old);
    if !hosts {
        return;
    }
    let Some(vx) = CONFIG.get(0).map(|c| c.vxlan_ifindex) else {
        return;
    };
    let mut j = 0;
    while j < VRRP_MEMBERS {
        if j >= g.n_hosts as usize {
            break;
        }
        // Each copy is encapsulated while it is sent: the key is set again
        // for the next.
        if vx != 0 && set_tunnel(ctx, vni, g.hosts[j]) {
            // SAFETY: as above, out of the VXLAN device.
            let _ = unsafe { gen::bpf_clone_redirect(ctx.skb.skb, vx, 0) };
        }
        j += 1;
    }
}

/// Advertisements a holder port's VM sends.
#[inline(always)]
pub fn from_vm(ctx: &mut TcContext) -> i32 {
    let a = match advert(ctx) {
        Seen::Other => return TCX_NEXT,
        Seen::Bad => return refuse(DropReason::VrrpNotHolder),
        Seen::Advert(a) => a,
    };
    let ifx = Pkt::ifindex(&*ctx);
    // SAFETY: the value is copied out at once.
    let Some(port) = (unsafe { PORTS.get(&ifx) }).copied() else {
        // The pipeline's entry drops it (`unknown_port`).
        return TCX_NEXT;
    };
    if port.flags & (PORT_F_QUARANTINED | PORT_F_REJECTED) != 0 {
        // So does the guard.
        return TCX_NEXT;
    }
    let Some(g) = group(port.vni, a.vrid) else {
        // To a peer, of no virtual IP's router: the security groups judge
        // it as any packet.
        if !a.multicast {
            return TCX_NEXT;
        }
        return refuse(DropReason::VrrpNotHolder);
    };
    let declared = declared(g, |m| m.ifindex == ifx && m.addr == a.src);
    if a.smac != port.mac {
        return refuse(DropReason::VrrpNotHolder);
    }
    if let Err(r) = within(ctx, &a, g, declared) {
        return refuse(r);
    }
    let key = VrrpSeenKey {
        ifindex: ifx,
        vrid: a.vrid,
        family: FAMILY_V4,
        _pad: [0; 2],
    };
    // SAFETY: a helper with no arguments. (Not the coarse clock: two
    // advertisements of a state change may come within one of its ticks.)
    let now = unsafe { gen::bpf_ktime_get_ns() };
    // SAFETY: a read of a map value.
    let (adverts, last) = unsafe { VRRP_SEEN.get(&key) }.map_or((0, 0), |s| (s.adverts, s.last_ns));
    // A holder flooding advertisements has each copied to every other
    // holder: no more than one each 2 ms. (keepalived's unicast mode sends
    // one to each peer at once; the pipeline carries those one for one.)
    if a.multicast && last != 0 && now.wrapping_sub(last) < VRRP_MIN_GAP_NS {
        return refuse(DropReason::VrrpInterval);
    }
    let seen = VrrpSeen {
        last_ns: now,
        adverts: adverts + 1,
        interval_cs: a.interval_cs,
        priority: a.priority,
        version: a.version,
        _pad: 0,
    };
    let _ = VRRP_SEEN.insert(&key, &seen, 0);
    if !a.multicast {
        // To one peer (keepalived's `unicast_peer`): the pipeline carries
        // it, under the security groups.
        return TCX_NEXT;
    }
    relay(ctx, g, ifx, port.vni, true);
    TC_ACT_SHOT
}

/// What reaches a holder port's VM from the host: a relayed advertisement
/// goes in; everything else on to the pipeline's entry.
#[inline(always)]
pub fn to_vm(ctx: &TcContext) -> i32 {
    if mark(ctx) != VRRP_MARK {
        return TCX_NEXT;
    }
    // SAFETY: a read of a map value.
    match unsafe { PORTS.get(&Pkt::ifindex(ctx)) } {
        Some(p) if p.flags & (PORT_F_QUARANTINED | PORT_F_REJECTED) == 0 => TC_ACT_OK,
        _ => TC_ACT_SHOT,
    }
}

/// Advertisements from the holders of other hosts, for the holders here.
#[inline(always)]
pub fn from_overlay(ctx: &mut TcContext) -> i32 {
    let a = match advert(ctx) {
        Seen::Other => return TCX_NEXT,
        Seen::Bad => return refuse(DropReason::VrrpNotHolder),
        // To one peer: an ordinary packet of the overlay.
        Seen::Advert(a) if !a.multicast => return TCX_NEXT,
        Seen::Advert(a) => a,
    };
    let Some(key) = tunnel_of(ctx) else {
        return refuse(DropReason::OverlaySpoof);
    };
    let vni = key.tunnel_id;
    let sender = key.remote[0].to_be_bytes();
    let Some(g) = group(vni, a.vrid) else {
        return refuse(DropReason::VrrpNotHolder);
    };
    let declared = declared(g, |m| {
        m.ifindex == 0 && m.addr == a.src && m.host_v4 == sender && m.mac == a.smac
    });
    if let Err(r) = within(ctx, &a, g, declared) {
        return refuse(r);
    }
    relay(ctx, g, 0, vni, false);
    TC_ACT_SHOT
}
