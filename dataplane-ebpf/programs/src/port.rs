//! Entries on a VM port: parsing and anti-spoofing of what the VM sends
//! (`from_vm`), and the checks of what the host's own stack sends towards
//! the VM (`to_vm`). Everything the pipeline delivers to a VM goes straight
//! to the VM's side of the veth and never meets `to_vm`.

use dataplane_common::{
    maps::{PortInfo, DOOR_HOST, PORT_F_DHCP_SERVER},
    DropReason, Stat, FAMILY_V4, FAMILY_V6, PROTO_ICMPV6, PROTO_UDP,
};

use crate::{
    ctx::{load, Pkt},
    maps::{count, has_addr, PORTS, PORT_ADDRS},
    meta::{Meta, E_FROM_VM, E_TO_VM, K_ARP, K_IP, K_NEIGHBOUR, K_NS},
    parse::{self, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6},
};

// ICMPv6 message types handled outside the security groups.
const ND_RS: u8 = 133;
const ND_RA: u8 = 134;
const ND_NS: u8 = 135;
const ND_NA: u8 = 136;
const ND_REDIRECT: u8 = 137;
const MLD_QUERY: u8 = 130;
const MLD_REPORT: u8 = 131;
const MLD_DONE: u8 = 132;
const MLD2_REPORT: u8 = 143;

/// The port of a device.
#[inline(always)]
pub fn port(ifindex: u32) -> Result<PortInfo, DropReason> {
    // SAFETY: the value is copied out at once.
    unsafe { PORTS.get(&ifindex) }.copied().ok_or(DropReason::UnknownPort)
}

#[inline(always)]
fn owns(ifindex: u32, family: u8, addr: &[u8; 16]) -> bool {
    has_addr(&PORT_ADDRS, ifindex, family, addr)
}

/// A DHCP server message: UDP to a client's port (68, or 546 for DHCPv6),
/// from whatever source port (clients filter on the destination only).
#[inline(always)]
pub fn dhcp_server(m: &Meta) -> bool {
    m.proto == PROTO_UDP && (m.dport == 68 || m.dport == 546)
}

/// Packets the VM sends: parsed and checked against the port's addresses.
#[inline(always)]
pub fn from_vm<C: Pkt>(ctx: &C, m: &mut Meta) -> Result<(), DropReason> {
    let ifx = ctx.ifindex();
    m.reset(E_FROM_VM, ifx);
    let port = port(ifx)?;
    m.src_ifx = ifx;
    m.src_port = port;
    let (smac, ethertype) = parse::eth(ctx)?;
    if smac != port.mac {
        return Err(DropReason::SpoofMac);
    }
    if ethertype == ETH_P_ARP {
        parse::arp(ctx, m)?;
        let mut ip = [0u8; 16];
        ip[..4].copy_from_slice(&m.arp_spa);
        // 0.0.0.0 is an ARP probe (RFC 5227).
        if m.arp_sha != port.mac || (m.arp_spa != [0; 4] && !owns(ifx, FAMILY_V4, &ip)) {
            return Err(DropReason::SpoofArp);
        }
        count(Stat::Neighbour);
        m.kind = K_ARP;
        return Ok(());
    }
    parse::ip(ctx, m, ethertype)?;
    if m.family == FAMILY_V6 && m.proto == PROTO_ICMPV6 {
        if let Some(r) = neighbour_from_vm(ctx, ifx, &port, m) {
            r?;
            count(Stat::Neighbour);
            m.kind = if m.icmp_type == ND_NS { K_NS } else { K_NEIGHBOUR };
            return Ok(());
        }
    }
    if !owns(ifx, m.family, &m.src) {
        return Err(DropReason::SpoofIp);
    }
    if dhcp_server(m) && port.flags & PORT_F_DHCP_SERVER == 0 {
        return Err(DropReason::DhcpServer);
    }
    m.kind = K_IP;
    Ok(())
}

/// Neighbour discovery and MLD the VM sends: checked for spoofing, never
/// subject to security groups. `None` means an ordinary ICMPv6 message.
#[inline(always)]
fn neighbour_from_vm<C: Pkt>(ctx: &C, ifx: u32, port: &PortInfo, m: &Meta) -> Option<Result<(), DropReason>> {
    let unspecified = m.src == [0u8; 16];
    let src_ok = owns(ifx, FAMILY_V6, &m.src);
    let l4 = m.l4_off as usize;
    let r = match m.icmp_type {
        ND_RA | ND_REDIRECT | MLD_QUERY => Err(DropReason::RaGuard),
        ND_RS | MLD_REPORT | MLD_DONE | MLD2_REPORT => {
            if src_ok || unspecified {
                Ok(())
            } else {
                Err(DropReason::SpoofIp)
            }
        }
        ND_NS => {
            if !(src_ok || unspecified) {
                Err(DropReason::SpoofIp)
            } else {
                check_lladdr_option(ctx, m, l4 + 24, 1, port)
            }
        }
        ND_NA => {
            if !src_ok {
                return Some(Err(DropReason::SpoofIp));
            }
            // The target address must be the port's own.
            let Some(target) = load::<C, 16>(ctx, l4 + 8) else {
                return Some(Err(DropReason::Truncated));
            };
            if !owns(ifx, FAMILY_V6, &target) {
                Err(DropReason::SpoofNd)
            } else {
                check_lladdr_option(ctx, m, l4 + 24, 2, port)
            }
        }
        _ => return None,
    };
    Some(r)
}

/// If the message carries a first option, it must fit the packet, and a
/// link-layer address option of `kind` (1 source, 2 target) must carry the
/// port's MAC.
#[inline(always)]
fn check_lladdr_option<C: Pkt>(ctx: &C, m: &Meta, off: usize, kind: u8, port: &PortInfo) -> Result<(), DropReason> {
    if off >= m.end as usize {
        // No options at all.
        return Ok(());
    }
    let opt: [u8; 8] = load(ctx, off).ok_or(DropReason::Truncated)?;
    // Option length is in 8-octet units and never 0.
    if opt[1] == 0 || off + opt[1] as usize * 8 > m.end as usize {
        return Err(DropReason::SpoofNd);
    }
    if opt[0] == kind && opt[2..8] != port.mac {
        return Err(DropReason::SpoofNd);
    }
    Ok(())
}

/// Packets the host's own stack sends towards the VM. Router
/// advertisements, redirects, MLD queries and DHCP server messages come to
/// a VM only from the distributed gateway (which never passes here);
/// neighbour discovery only for the VM's own addresses; IP packets go
/// through the pipeline with the host as their door.
#[inline(always)]
pub fn to_vm<C: Pkt>(ctx: &C, m: &mut Meta) -> Result<(), DropReason> {
    let ifx = ctx.ifindex();
    m.reset(E_TO_VM, ifx);
    let port = port(ifx)?;
    m.dst_ifx = ifx;
    m.dst_port = port;
    m.dst_door = DOOR_HOST;
    let (_, ethertype) = parse::eth(ctx)?;
    if ethertype == ETH_P_ARP {
        parse::arp(ctx, m)?;
        let mut ip = [0u8; 16];
        ip[..4].copy_from_slice(&m.arp_tpa);
        if !owns(ifx, FAMILY_V4, &ip) {
            return Err(DropReason::SpoofArp);
        }
        count(Stat::Neighbour);
        m.kind = K_NEIGHBOUR;
        return Ok(());
    }
    if ethertype != ETH_P_IP && ethertype != ETH_P_IPV6 {
        return Err(DropReason::UnsupportedEthertype);
    }
    parse::ip(ctx, m, ethertype)?;
    if m.family == FAMILY_V6 && m.proto == PROTO_ICMPV6 {
        match m.icmp_type {
            ND_RA | ND_REDIRECT | MLD_QUERY | ND_RS | MLD_REPORT | MLD_DONE | MLD2_REPORT => {
                return Err(DropReason::RaGuard)
            }
            ND_NS => {
                let target: [u8; 16] = load(ctx, m.l4_off as usize + 8).ok_or(DropReason::Truncated)?;
                if !owns(ifx, FAMILY_V6, &target) {
                    return Err(DropReason::SpoofNd);
                }
                count(Stat::Neighbour);
                m.kind = K_NEIGHBOUR;
                return Ok(());
            }
            ND_NA => {
                if !owns(ifx, FAMILY_V6, &m.dst) {
                    return Err(DropReason::SpoofNd);
                }
                count(Stat::Neighbour);
                m.kind = K_NEIGHBOUR;
                return Ok(());
            }
            _ => {}
        }
    }
    if dhcp_server(m) {
        return Err(DropReason::DhcpServer);
    }
    m.kind = K_IP;
    Ok(())
}
