//! Entries on the zone uplinks. Arriving (`from_uplink`): a packet for a
//! VM enters the pipeline with the uplink's zone as its door; a packet for
//! the host itself passes only if the host needs it. Leaving
//! (`to_uplink`): a VM's address leaves only as the pipeline sent it.

use aya_ebpf::{maps::lpm_trie::Key, programs::TcContext};
use dataplane_common::{
    lb::NAT_SVC_F_LEASE,
    maps::{zone_net_data, ZoneAddrKey, ZoneEndpoint, DOOR_ZONE},
    DropReason, DIR_INGRESS, FAMILY_V4, FAMILY_V6, MARK_PIPELINE, PROTO_ICMPV6,
};

use crate::{
    ctx::{load, Pkt},
    maps::{has_addr, UPLINKS, UPLINK_ADDRS, VIP_LEASES, VPC_NETS, ZONE_ENDPOINTS, ZONE_NETS, ZONE_UPLINK},
    meta::{Meta, E_FROM_UPLINK, K_IP, X_ZONE_IN},
    parse::{self, is_icmp_error, ETH_P_IP, ETH_P_IPV6},
    port,
};

const ND_NS: u8 = 135;
const ND_NA: u8 = 136;
/// ff02::1.
const ALL_NODES: [u8; 16] = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

/// The zone an outside address belongs to (longest prefix), or 0.
#[inline(always)]
pub fn zone_of(family: u8, addr: &[u8; 16]) -> u32 {
    let k = Key::new(8 + 128, zone_net_data(family, addr));
    ZONE_NETS.get(&k).copied().unwrap_or(0)
}

/// The uplink device of zone `z`.
#[inline(always)]
pub fn uplink_of(z: u32) -> Option<u32> {
    // SAFETY: the value is copied out at once.
    unsafe { ZONE_UPLINK.get(&z) }.copied()
}

/// Where an address of a VPC with a zone lives.
#[inline(always)]
pub fn zone_endpoint(family: u8, addr: &[u8; 16]) -> Option<ZoneEndpoint> {
    let k = ZoneAddrKey {
        family,
        _pad: [0; 3],
        addr: *addr,
    };
    // SAFETY: the value is copied out at once.
    unsafe { ZONE_ENDPOINTS.get(&k) }.copied()
}

/// The zone of an uplink device.
#[inline(always)]
fn uplink_zone(ifindex: u32) -> Option<u32> {
    // SAFETY: the value is copied out at once.
    unsafe { UPLINKS.get(&ifindex) }.copied()
}

/// Whether `addr` is one of the uplink's own addresses.
#[inline(always)]
fn uplink_owns(ifindex: u32, family: u8, addr: &[u8; 16]) -> bool {
    has_addr(&UPLINK_ADDRS, ifindex, family, addr)
}

/// Whether `addr` is a virtual IP this host holds: `Some(true)` while its
/// lease runs (this host answers for it), `Some(false)` once it ran out or
/// was never granted (another holder answers).
#[inline(always)]
fn vip_lease(now: u64, family: u8, addr: &[u8; 16]) -> Option<bool> {
    let k = ZoneAddrKey {
        family,
        _pad: [0; 3],
        addr: *addr,
    };
    // SAFETY: the value is read at once.
    unsafe { VIP_LEASES.get(&k) }.map(|l| now < l.until_ns)
}

/// VRRP's IP protocol number and groups (224.0.0.18, ff02::12).
const PROTO_VRRP: u8 = 112;
const VRRP_V4: [u8; 16] = [224, 0, 0, 18, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
const VRRP_V6: [u8; 16] = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x12];

/// What an uplink entry made of a packet.
pub enum Arrival {
    /// For a VM: into the pipeline.
    Pipeline,
    /// For the host, and needed by it.
    Host,
    /// For a VIP this host translates (`st_nat_in`).
    Nat,
}

/// Packets arriving from an uplink.
#[inline(always)]
pub fn from_uplink<C: Pkt>(ctx: &C, m: &mut Meta) -> Result<Arrival, DropReason> {
    let ifx = ctx.ifindex();
    m.reset(E_FROM_UPLINK, ifx);
    let Some(zone) = uplink_zone(ifx) else {
        // No longer an uplink (the agent detaches it next): fail closed.
        return Err(DropReason::UplinkToHost);
    };
    let (_, ethertype) = parse::eth(ctx)?;
    if ethertype != ETH_P_IP && ethertype != ETH_P_IPV6 {
        // ARP for the host's uplink address; anything else is refused.
        if ethertype != parse::ETH_P_ARP {
            return Err(DropReason::UplinkToHost);
        }
        parse::arp(ctx, m)?;
        let mut target = [0u8; 16];
        target[..4].copy_from_slice(&m.arp_tpa);
        // A gratuitous announcement (sender = target: a neighbour, such as
        // the zone's gateway after a failover, telling its new MAC) updates
        // what the host already knows, unless it claims a VPC's address.
        let gratuitous = m.arp_spa == m.arp_tpa && zone_endpoint(FAMILY_V4, &target).is_none();
        // A virtual IP is answered within its lease only (the address is
        // put on the uplink then): out of it, it is another holder's.
        let vip = if gratuitous {
            None
        } else {
            vip_lease(m.now, FAMILY_V4, &target)
        };
        if vip == Some(false) {
            return Err(DropReason::VipFenced);
        }
        return if vip == Some(true) || uplink_owns(ifx, FAMILY_V4, &target) || gratuitous {
            Ok(Arrival::Host)
        } else {
            Err(DropReason::UplinkToHost)
        };
    }
    parse::ip(ctx, m, ethertype)?;
    // A VIP exposed to the zone, translated here (north-south).
    if let Some(ns) = crate::nat::service(m) {
        // A VIP held by NAT hosts is translated within a lease only; no
        // lease here (not a holder, not granted, or run out) fails closed.
        let lease = vip_lease(m.now, m.family, &m.dst);
        if lease == Some(false) || (ns.flags & NAT_SVC_F_LEASE != 0 && lease != Some(true)) {
            return Err(DropReason::VipFenced);
        }
        from_zone(m, zone)?;
        crate::nat::arrive(m, zone, &ns);
        return Ok(Arrival::Nat);
    }
    let Some(ep) = zone_endpoint(m.family, &m.dst) else {
        // For the host: neighbour solicitations for its uplink address,
        // and advertisements and ICMP errors sent to it (the host's stack
        // matches an error to its own flow); nothing else (no tunnel
        // packets, no services, nothing for the host to forward).
        let wanted = if m.proto == PROTO_ICMPV6 && m.icmp_type == ND_NS {
            let target: [u8; 16] = load(ctx, m.l4_off as usize + 8).ok_or(DropReason::Truncated)?;
            match vip_lease(m.now, FAMILY_V6, &target) {
                Some(false) => return Err(DropReason::VipFenced),
                Some(true) => true,
                None => uplink_owns(ifx, FAMILY_V6, &target),
            }
        } else if m.proto == PROTO_VRRP && (m.dst == VRRP_V4 || m.dst == VRRP_V6) {
            // The holders' VRRP advertisements (the speaker checks them).
            true
        } else if m.proto == PROTO_ICMPV6 && m.icmp_type == ND_NA && m.dst == ALL_NODES {
            // Unsolicited (to all nodes): as a gratuitous ARP.
            let target: [u8; 16] = load(ctx, m.l4_off as usize + 8).ok_or(DropReason::Truncated)?;
            zone_endpoint(FAMILY_V6, &target).is_none()
        } else if (m.proto == PROTO_ICMPV6 && m.icmp_type == ND_NA) || is_icmp_error(m.proto, m.icmp_type) {
            if m.proto == PROTO_ICMPV6 && m.icmp_type == ND_NA {
                // No advertisement for a VPC's address, as above.
                let target: [u8; 16] = load(ctx, m.l4_off as usize + 8).ok_or(DropReason::Truncated)?;
                if zone_endpoint(FAMILY_V6, &target).is_some() {
                    return Err(DropReason::UplinkToHost);
                }
            }
            // To a virtual IP within its lease too: the host's solicitations
            // for the members' replies it sends on go out from the VIP.
            match vip_lease(m.now, m.family, &m.dst) {
                Some(false) => return Err(DropReason::VipFenced),
                Some(true) => true,
                None => uplink_owns(ifx, m.family, &m.dst),
            }
        } else {
            false
        };
        return if wanted {
            Ok(Arrival::Host)
        } else {
            Err(DropReason::UplinkToHost)
        };
    };
    from_zone(m, zone)?;
    if ep.ifindex == 0 {
        return Err(DropReason::NoRoute);
    }
    m.dst_ifx = ep.ifindex;
    m.dst_port = port::port(ep.ifindex)?;
    m.dst_door = DOOR_ZONE | zone;
    m.dst_mac = ep.mac;
    m.uplink_zone = zone;
    m.vm_zone = ep.zone;
    m.fw_policy = ep.border;
    m.fw_dir = DIR_INGRESS;
    m.fw_remote_is_src = 1;
    m.crossing = X_ZONE_IN;
    m.kind = K_IP;
    Ok(Arrival::Pipeline)
}

/// What may come from zone `zone`'s network into a VPC: a source that is
/// one of our VPCs' addresses, or in another zone's prefixes, is forged
/// (it cannot come from this zone's network); nor does anything a VM
/// takes only from its gateway.
#[inline(always)]
fn from_zone(m: &Meta, zone: u32) -> Result<(), DropReason> {
    if zone_endpoint(m.family, &m.src).is_some()
        || VPC_NETS
            .get(&Key::new(8 + 128, zone_net_data(m.family, &m.src)))
            .is_some()
    {
        return Err(DropReason::SpoofUplink);
    }
    let src_zone = zone_of(m.family, &m.src);
    if src_zone != 0 && src_zone != zone {
        return Err(DropReason::SpoofUplink);
    }
    outside_to_vm(m)
}

/// What no VM takes from outside its host's gateway, from an uplink or the
/// tunnel: router advertisements, redirects, neighbour discovery and MLD
/// (they come only from the distributed gateway), DHCP server messages, and
/// link-local or multicast sources.
#[inline(always)]
pub fn outside_to_vm(m: &Meta) -> Result<(), DropReason> {
    if m.proto == PROTO_ICMPV6 && ((130..=137).contains(&m.icmp_type) || m.icmp_type == 143) {
        return Err(DropReason::RaGuard);
    }
    if crate::port::dhcp_server(m) {
        return Err(DropReason::DhcpServer);
    }
    let s = &m.src;
    let bad = if m.family == dataplane_common::FAMILY_V4 {
        // 0/8, loopback, link-local, multicast and above.
        s[0] == 0 || s[0] == 127 || (s[0] == 169 && s[1] == 254) || s[0] >= 224
    } else {
        // Unspecified, loopback, link-local, multicast.
        *s == [0u8; 16] || (s[..15] == [0u8; 15] && s[15] == 1) || (s[0] == 0xfe && s[1] & 0xc0 == 0x80) || s[0] == 0xff
    };
    if bad {
        return Err(DropReason::SpoofUplink);
    }
    Ok(())
}

/// Packets leaving through an uplink: a VM's address leaves only as the
/// pipeline sent it (marked); the host's own traffic passes. Nothing the
/// host forwards leaves unmarked: a packet that came in on another device
/// (an uplink, the underlay) and was routed here would cross zones around
/// the pipeline.
#[inline(always)]
pub fn to_uplink(ctx: &mut TcContext) -> Result<(), DropReason> {
    // SAFETY: reading fields of the context.
    let mark = unsafe { (*ctx.skb.skb).mark };
    if mark == MARK_PIPELINE {
        ctx.set_mark(0);
        return Ok(());
    }
    if uplink_zone(Pkt::ifindex(ctx)).is_none() {
        return Ok(());
    }
    // SAFETY: reading a field of the context.
    if unsafe { (*ctx.skb.skb).ingress_ifindex } != 0 {
        return Err(DropReason::Unjudged);
    }
    let (_, ethertype) = parse::eth(ctx)?;
    if ethertype != ETH_P_IP && ethertype != ETH_P_IPV6 {
        return Ok(());
    }
    let m = crate::maps::meta().ok_or(DropReason::Pipeline)?;
    m.reset(0, Pkt::ifindex(ctx));
    // What does not parse is not a VM's (the pipeline parsed every packet
    // it sends): the host's own.
    if parse::ip(ctx, m, ethertype).is_err() {
        return Ok(());
    }
    if zone_endpoint(m.family, &m.src).is_some() {
        return Err(DropReason::Unjudged);
    }
    Ok(())
}
