//! The per-port pipeline: anti-spoofing for what the VM sends, then the
//! security groups with conntrack in both directions.

use aya_ebpf::programs::TcContext;
use dataplane_common::{
    maps::{CtKey, PortAddrKey, PortInfo, CT_ORIGIN_IN, CT_ORIGIN_OUT, PORT_F_QUARANTINED},
    DropReason, Stat, DIR_EGRESS, DIR_INGRESS, FAMILY_V4, FAMILY_V6, PROTO_ICMPV6,
};

use crate::{
    conntrack::{self, Ct},
    forward::{self, Action},
    maps::{count, CT, PORTS, PORT_ADDRS},
    parse::{self, Ip, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6},
    policy,
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

/// The device's ifindex and its port's configuration. A quarantined port
/// stops here: tier 1 of the policy order, before anti-spoofing, conntrack
/// and every rule.
#[inline(always)]
fn port_of(ctx: &TcContext) -> Result<(u32, PortInfo), DropReason> {
    // SAFETY: reading the ifindex field of the context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: the value is copied out at once.
    match unsafe { PORTS.get(&ifindex) } {
        Some(p) if p.flags & PORT_F_QUARANTINED != 0 => Err(DropReason::Quarantined),
        Some(p) => Ok((ifindex, *p)),
        None => Err(DropReason::UnknownPort),
    }
}

#[inline(always)]
fn owns(ifindex: u32, family: u8, addr: &[u8; 16]) -> bool {
    let k = PortAddrKey {
        ifindex,
        family,
        _pad: [0; 3],
        addr: *addr,
    };
    // SAFETY: presence check only.
    unsafe { PORT_ADDRS.get(&k) }.is_some()
}

/// Whether `ip` is an ICMP error quoting a packet of a tracked flow of this
/// port. `towards_vm`: the error goes to the VM, so the quoted packet is one
/// the VM sent (the VM is its source); otherwise the VM sends the error about
/// a packet it received (the VM is its destination).
#[inline(always)]
fn related(ctx: &TcContext, ifx: u32, ip: &Ip, towards_vm: bool) -> bool {
    if !parse::is_icmp_error(ip.proto, ip.icmp_type) {
        return false;
    }
    let Some(inner) = parse::icmp_inner(ctx, ip) else {
        return false;
    };
    let (local, remote, local_port, remote_port, vm) = if towards_vm {
        (inner.src, inner.dst, inner.sport, inner.dport, ip.dst)
    } else {
        (inner.dst, inner.src, inner.dport, inner.sport, ip.src)
    };
    if local != vm {
        return false;
    }
    let k = CtKey {
        ifindex: ifx,
        family: ip.family,
        proto: inner.proto,
        _pad: [0; 2],
        local_port,
        remote_port,
        local,
        remote,
    };
    if CT.get_ptr(&k).is_none() {
        return false;
    }
    count(Stat::CtRelated);
    true
}

/// Packets the VM sends: judged, then answered or routed.
#[inline(always)]
pub fn from_vm(ctx: &mut TcContext) -> Result<Action, DropReason> {
    let (ifx, port) = port_of(ctx)?;
    let eth = parse::eth(ctx)?;
    let ip = match judge_from_vm(ctx, ifx, &port, &eth)? {
        Judged::Ip(ip) => ip,
        Judged::Arp(a) => return forward::answer_arp(ctx, ifx, &port, &a),
        Judged::Solicitation(ip) => return forward::answer_ns(ctx, ifx, &port, &ip, &eth.src),
        Judged::Neighbour => return Ok(Action::Pass),
    };
    forward::route(ctx, ifx, &port, &ip)
}

/// What the checks of a packet from the VM let through.
enum Judged {
    /// An IP packet the rules allow.
    Ip(Ip),
    /// An ARP packet with the port's own addresses.
    Arp(parse::Arp),
    /// A neighbour solicitation with the port's own addresses.
    Solicitation(Ip),
    /// Other neighbour discovery and MLD, for the host.
    Neighbour,
}

/// Anti-spoofing, conntrack and the egress rules.
#[inline(always)]
fn judge_from_vm(ctx: &TcContext, ifx: u32, port: &PortInfo, eth: &parse::Eth) -> Result<Judged, DropReason> {
    let port = *port;
    if eth.src != port.mac {
        return Err(DropReason::SpoofMac);
    }
    let ip = match eth.proto {
        ETH_P_ARP => {
            let a = parse::arp(ctx)?;
            let mut ip = [0u8; 16];
            ip[..4].copy_from_slice(&a.sender_ip);
            // 0.0.0.0 is an ARP probe (RFC 5227).
            if a.sender_mac != port.mac || (a.sender_ip != [0; 4] && !owns(ifx, FAMILY_V4, &ip)) {
                return Err(DropReason::SpoofArp);
            }
            count(Stat::Neighbour);
            return Ok(Judged::Arp(a));
        }
        ETH_P_IP => parse::ipv4(ctx)?,
        ETH_P_IPV6 => parse::ipv6(ctx)?,
        _ => return Err(DropReason::UnsupportedEthertype),
    };
    if ip.family == FAMILY_V6 && ip.proto == PROTO_ICMPV6 {
        if let Some(r) = neighbour_from_vm(ctx, ifx, &port, &ip) {
            r?;
            count(Stat::Neighbour);
            return Ok(if ip.icmp_type == ND_NS {
                Judged::Solicitation(ip)
            } else {
                Judged::Neighbour
            });
        }
    }
    if !owns(ifx, ip.family, &ip.src) {
        return Err(DropReason::SpoofIp);
    }
    // An ICMP error the VM sends about a packet it received (e.g. port
    // unreachable) passes when that packet belongs to a tracked flow.
    if related(ctx, ifx, &ip, false) {
        return Ok(Judged::Ip(ip));
    }
    let key = conntrack::key(ifx, &ip, true);
    let len = ctx.len();
    if let Ct::Established = conntrack::lookup(&key, &port, true, ip.tcp_flags, len)? {
        return Ok(Judged::Ip(ip));
    }
    let svc = ip.service();
    if !policy::allowed(&port, DIR_EGRESS, ip.family, &ip.dst, ip.proto, svc) {
        return Err(DropReason::PolicyEgress);
    }
    conntrack::create(&key, &port, CT_ORIGIN_OUT, svc, ip.tcp_flags, len);
    Ok(Judged::Ip(ip))
}

/// Neighbour discovery and MLD the VM sends: checked for spoofing, never
/// subject to security groups. `None` means an ordinary ICMPv6 message.
#[inline(always)]
fn neighbour_from_vm(ctx: &TcContext, ifx: u32, port: &PortInfo, ip: &Ip) -> Option<Result<(), DropReason>> {
    let unspecified = ip.src == [0u8; 16];
    let src_ok = owns(ifx, FAMILY_V6, &ip.src);
    let r = match ip.icmp_type {
        ND_RA | ND_REDIRECT => Err(DropReason::RaGuard),
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
                check_lladdr_option(ctx, ip.l4_off + 24, 1, port)
            }
        }
        ND_NA => {
            if !src_ok {
                return Some(Err(DropReason::SpoofIp));
            }
            // The target address must be the port's own.
            let target: [u8; 16] = match ctx.load(ip.l4_off + 8) {
                Ok(t) => t,
                Err(_) => return Some(Err(DropReason::Truncated)),
            };
            if !owns(ifx, FAMILY_V6, &target) {
                Err(DropReason::SpoofNd)
            } else {
                check_lladdr_option(ctx, ip.l4_off + 24, 2, port)
            }
        }
        MLD_QUERY => Err(DropReason::RaGuard),
        _ => return None,
    };
    Some(r)
}

/// If the first ND option is a link-layer address option of `kind`
/// (1 source, 2 target), it must carry the port's MAC.
#[inline(always)]
fn check_lladdr_option(ctx: &TcContext, off: usize, kind: u8, port: &PortInfo) -> Result<(), DropReason> {
    let opt: [u8; 8] = match ctx.load(off) {
        Ok(o) => o,
        // No options at all.
        Err(_) => return Ok(()),
    };
    if opt[0] == kind && opt[1] == 1 && opt[2..8] != port.mac {
        return Err(DropReason::SpoofNd);
    }
    Ok(())
}

/// Packets towards the VM.
#[inline(always)]
pub fn to_vm(ctx: &TcContext) -> Result<Action, DropReason> {
    judge_to_vm(ctx).map(|()| Action::Pass)
}

/// Conntrack and the ingress rules.
#[inline(always)]
fn judge_to_vm(ctx: &TcContext) -> Result<(), DropReason> {
    let (ifx, port) = port_of(ctx)?;
    let eth = parse::eth(ctx)?;
    let ip = match eth.proto {
        ETH_P_ARP => {
            parse::arp(ctx)?;
            count(Stat::Neighbour);
            return Ok(());
        }
        ETH_P_IP => parse::ipv4(ctx)?,
        ETH_P_IPV6 => parse::ipv6(ctx)?,
        _ => return Err(DropReason::UnsupportedEthertype),
    };
    if ip.family == FAMILY_V6
        && ip.proto == PROTO_ICMPV6
        && matches!(
            ip.icmp_type,
            ND_RS | ND_RA | ND_NS | ND_NA | ND_REDIRECT | MLD_QUERY | MLD_REPORT | MLD_DONE | MLD2_REPORT
        )
    {
        count(Stat::Neighbour);
        return Ok(());
    }
    // An ICMP error about a packet the VM sent passes when that packet
    // belongs to a tracked flow (unreachable, packet too big for path MTU
    // discovery, ...).
    if related(ctx, ifx, &ip, true) {
        return Ok(());
    }
    let key = conntrack::key(ifx, &ip, false);
    let len = ctx.len();
    if let Ct::Established = conntrack::lookup(&key, &port, false, ip.tcp_flags, len)? {
        return Ok(());
    }
    let svc = ip.service();
    if !policy::allowed(&port, DIR_INGRESS, ip.family, &ip.src, ip.proto, svc) {
        return Err(DropReason::PolicyIngress);
    }
    conntrack::create(&key, &port, CT_ORIGIN_IN, svc, ip.tcp_flags, len);
    Ok(())
}
