//! Zone isolation on the uplinks (policy tier 2). Every packet between a VM
//! and the outside crosses an uplink, so the two programs there are the
//! guard: a packet between a VM of one zone and the uplink of another is
//! dropped unless an exchange path admits its flow, whatever routes or
//! rules say. Replies of admitted flows pass through conntrack.

use aya_ebpf::{maps::lpm_trie::Key, programs::TcContext};
use dataplane_common::{
    maps::{zone_net_data, ZoneAddrKey, ZoneEndpoint, CT_ORIGIN_IN, CT_ORIGIN_OUT, EXCHANGE_MAX, GATEWAY_MAC},
    DropReason, Stat, DIR_EGRESS, DIR_INGRESS,
};

use crate::{
    conntrack,
    firewall::{self, halves, in_prefix},
    forward::Action,
    maps::{count, CT, EXCHANGE, UPLINKS, ZONE_ENDPOINTS, ZONE_NETS, ZONE_UPLINK},
    parse::{self, Ip, ETH_P_IP, ETH_P_IPV6},
};

/// The zone an outside address belongs to (longest prefix), or 0.
#[inline(always)]
pub fn zone_of(family: u8, addr: &[u8; 16]) -> u32 {
    let k = Key::new(8 + 128, zone_net_data(family, addr));
    ZONE_NETS.get(&k).copied().unwrap_or(0)
}

/// The uplink device of the zone `dst` belongs to, for a VM of a VPC with
/// a zone. The guard on that uplink decides whether the packet may leave.
#[inline(always)]
pub fn uplink_for(family: u8, dst: &[u8; 16]) -> Option<u32> {
    let z = zone_of(family, dst);
    if z == 0 {
        return None;
    }
    // SAFETY: the value is copied out at once.
    unsafe { ZONE_UPLINK.get(&z) }.copied()
}

#[inline(always)]
fn zone_endpoint(family: u8, addr: &[u8; 16]) -> Option<ZoneEndpoint> {
    let k = ZoneAddrKey {
        family,
        _pad: [0; 3],
        addr: *addr,
    };
    // SAFETY: the value is copied out at once.
    unsafe { ZONE_ENDPOINTS.get(&k) }.copied()
}

/// Whether an exchange path admits a flow from zone `from` to zone `to`.
#[inline(always)]
fn exchange_admits(from: u32, to: u32, ip: &Ip) -> bool {
    let (src, dst) = (halves(&ip.src), halves(&ip.dst));
    let svc = ip.service();
    for i in 0..EXCHANGE_MAX {
        let Some(r) = EXCHANGE.get(i) else { break };
        if r.from == 0 {
            break;
        }
        if r.from == from
            && r.to == to
            && r.family == ip.family
            && r.proto == ip.proto
            && svc >= r.port_lo
            && svc <= r.port_hi
            && in_prefix(src, halves(&r.src), r.src_plen)
            && in_prefix(dst, halves(&r.dst), r.dst_plen)
        {
            return true;
        }
    }
    false
}

/// The conntrack entry of a VM's flow, seen from its port.
#[inline(always)]
fn flow_origin(ep: &ZoneEndpoint, ip: &Ip, vm_is_src: bool) -> Option<u8> {
    // SAFETY: the value is copied out at once.
    unsafe { CT.get(&conntrack::key(ep.ifindex, ip, vm_is_src)) }.map(|v| v.origin)
}

#[inline(always)]
fn uplink_ip(ctx: &TcContext) -> Result<Option<(u32, Ip)>, DropReason> {
    // SAFETY: reading the ifindex field of the context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: the value is copied out at once.
    let Some(zone) = (unsafe { UPLINKS.get(&ifindex) }).copied() else {
        return Ok(None);
    };
    let eth = parse::eth(ctx)?;
    let ip = match eth.proto {
        ETH_P_IP => parse::ipv4(ctx)?,
        ETH_P_IPV6 => parse::ipv6(ctx)?,
        // ARP and the like belong to the host.
        _ => return Ok(None),
    };
    Ok(Some((zone, ip)))
}

/// The border firewall (policy tier 3) of the VPC, if it has one.
#[inline(always)]
fn border_firewall(ep: &ZoneEndpoint, ip: &Ip, dir: u8) -> Result<(), DropReason> {
    if ep.border == 0 {
        return Ok(());
    }
    let key = conntrack::key(ep.ifindex, ip, dir == DIR_EGRESS);
    if firewall::allows(ep.border, &key, &key.remote, ip, dir) {
        Ok(())
    } else {
        Err(DropReason::BorderFirewall)
    }
}

/// Packets leaving through an uplink (TC egress).
#[inline(always)]
pub fn to_uplink(ctx: &TcContext) -> Result<Action, DropReason> {
    let Some((zone, ip)) = uplink_ip(ctx)? else {
        return Ok(Action::Pass);
    };
    // Not a VM's address: the host's own traffic.
    let Some(ep) = zone_endpoint(ip.family, &ip.src) else {
        return Ok(Action::Pass);
    };
    count(Stat::ToUplink);
    // Replies of flows opened from outside were judged on the way in.
    if flow_origin(&ep, &ip, true) == Some(CT_ORIGIN_IN) {
        return Ok(Action::Pass);
    }
    if ep.zone != zone {
        if !exchange_admits(ep.zone, zone, &ip) {
            return Err(DropReason::ZoneIsolation);
        }
        count(Stat::Exchanged);
    }
    border_firewall(&ep, &ip, DIR_EGRESS)?;
    Ok(Action::Pass)
}

/// Packets arriving from an uplink (TC ingress): delivered to the VM port
/// they are for, if the zones allow it.
#[inline(always)]
pub fn from_uplink(ctx: &mut TcContext) -> Result<Action, DropReason> {
    let Some((zone, ip)) = uplink_ip(ctx)? else {
        return Ok(Action::Pass);
    };
    let Some(ep) = zone_endpoint(ip.family, &ip.dst) else {
        return Ok(Action::Pass);
    };
    if ep.ifindex == 0 {
        return Err(DropReason::NoRoute);
    }
    // Replies of flows the VM opened were judged on the way out.
    if flow_origin(&ep, &ip, false) != Some(CT_ORIGIN_OUT) {
        if ep.zone != zone {
            if !exchange_admits(zone, ep.zone, &ip) {
                return Err(DropReason::ZoneIsolation);
            }
            count(Stat::Exchanged);
        }
        border_firewall(&ep, &ip, DIR_INGRESS)?;
    }
    let mut m = [0u8; 12];
    m[..6].copy_from_slice(&ep.mac);
    m[6..].copy_from_slice(&GATEWAY_MAC);
    ctx.store(0, &m, 0).map_err(|_| DropReason::Truncated)?;
    count(Stat::FromUplink);
    Ok(Action::Redirect(ep.ifindex))
}
