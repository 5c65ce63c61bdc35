//! The overlay: a distributed gateway on every host. It answers ARP and
//! neighbour solicitations from a port for the addresses of the port's VPC,
//! routes what the port sends to the destination port's device or into the
//! VXLAN tunnel towards the host it lives on, and checks what arrives from
//! the tunnel before delivering it.

use aya_ebpf::{helpers::gen, programs::TcContext};
use dataplane_common::{
    maps::{
        Endpoint, EndpointKey, PortInfo, CT_ORIGIN_OUT, EP_F_GATEWAY, EP_F_LOCAL_IS_A, EP_F_PEER, GATEWAY_MAC,
        PORT_F_UPLINK,
    },
    DropReason, Stat, DIR_EGRESS, DIR_INGRESS, FAMILY_V4, FAMILY_V6, PROTO_ICMPV6,
};

use crate::{
    conntrack, firewall,
    maps::{count, CONFIG, CT, ENDPOINTS},
    parse::{self, Arp, Ip, ETH_HLEN, ETH_P_IP, ETH_P_IPV6},
};

/// What to do with a packet that is not dropped.
pub enum Action {
    /// Hand it to the kernel's own path unchanged.
    Pass,
    /// Send it out of this device (its egress: a VM port or the tunnel).
    Redirect(u32),
    /// Answered or absorbed by the host: stop here (not a drop).
    Consume,
    /// Send it out of this device with its Ethernet addresses filled in by
    /// the kernel's routes and neighbours (a zone uplink).
    Neighbour(u32),
}

/// `struct bpf_tunnel_key` of the kernel (IPv4 fields used).
#[repr(C)]
struct TunnelKey {
    tunnel_id: u32,
    remote: [u32; 4],
    tos: u8,
    ttl: u8,
    ext: u16,
    label: u32,
    local: [u32; 4],
}

const _: () = assert!(core::mem::size_of::<TunnelKey>() == 44);

impl TunnelKey {
    const ZERO: TunnelKey = TunnelKey {
        tunnel_id: 0,
        remote: [0; 4],
        tos: 0,
        ttl: 0,
        ext: 0,
        label: 0,
        local: [0; 4],
    };
}

/// Sets the tunnel metadata the VXLAN device encapsulates with.
#[inline(always)]
fn set_tunnel(ctx: &TcContext, mut key: TunnelKey) -> bool {
    // SAFETY: key is a live bpf_tunnel_key-shaped value of the size passed.
    unsafe {
        gen::bpf_skb_set_tunnel_key(
            ctx.skb.skb,
            &mut key as *mut TunnelKey as *mut _,
            core::mem::size_of::<TunnelKey>() as u32,
            0,
        ) == 0
    }
}

/// The tunnel metadata a packet from the VXLAN device came with.
#[inline(always)]
fn tunnel_of(ctx: &TcContext) -> Option<TunnelKey> {
    let mut key = TunnelKey::ZERO;
    // SAFETY: as above.
    let r = unsafe {
        gen::bpf_skb_get_tunnel_key(
            ctx.skb.skb,
            &mut key as *mut TunnelKey as *mut _,
            core::mem::size_of::<TunnelKey>() as u32,
            0,
        )
    };
    (r == 0).then_some(key)
}

#[inline(always)]
pub fn endpoint(vni: u32, family: u8, addr: &[u8; 16]) -> Option<Endpoint> {
    let k = EndpointKey {
        vni,
        family,
        _pad: [0; 3],
        addr: *addr,
    };
    // SAFETY: the value is copied out at once.
    unsafe { ENDPOINTS.get(&k) }.copied()
}

/// Answers an ARP request for an address of the port's VPC (another port or
/// a gateway) with the gateway MAC, straight back to the port.
#[inline(always)]
pub fn answer_arp(ctx: &mut TcContext, ifx: u32, port: &PortInfo, a: &Arp) -> Result<Action, DropReason> {
    if a.op != 1 {
        // Gratuitous ARP and replies: nobody on the overlay needs them.
        count(Stat::Neighbour);
        return Ok(Action::Consume);
    }
    let mut target = [0u8; 16];
    target[..4].copy_from_slice(&a.target_ip);
    match endpoint(port.vni, FAMILY_V4, &target) {
        // A probe for its own address: nobody else has it, so no answer.
        Some(ep) if ep.ifindex == ifx => {
            count(Stat::Neighbour);
            return Ok(Action::Consume);
        }
        Some(_) => {}
        None => return Err(DropReason::UnknownNeighbour),
    }
    // The request becomes the reply in place: Ethernet addresses, opcode,
    // sender (the gateway MAC and the asked address) and target (the asker).
    set_macs(ctx, &a.sender_mac)?;
    let mut sender = [0u8; 10];
    sender[..6].copy_from_slice(&GATEWAY_MAC);
    sender[6..].copy_from_slice(&a.target_ip);
    let mut target = [0u8; 10];
    target[..6].copy_from_slice(&a.sender_mac);
    target[6..].copy_from_slice(&a.sender_ip);
    store(ctx, ETH_HLEN + 6, &[0u8, 2])?;
    store(ctx, ETH_HLEN + 8, &sender)?;
    store(ctx, ETH_HLEN + 18, &target)?;
    count(Stat::NeighbourAnswered);
    Ok(Action::Redirect(ifx))
}

/// Answers a neighbour solicitation for an address of the port's VPC with a
/// neighbour advertisement carrying the gateway MAC. Only the ordinary form
/// is answered: a specified source and one source link-layer address option
/// (what every IPv6 stack sends once it has an address).
#[inline(always)]
pub fn answer_ns(
    ctx: &mut TcContext,
    ifx: u32,
    port: &PortInfo,
    ip: &Ip,
    vm_mac: &[u8; 6],
) -> Result<Action, DropReason> {
    let target: [u8; 16] = ctx.load(ip.l4_off + 8).map_err(|_| DropReason::Truncated)?;
    let ep = match endpoint(port.vni, FAMILY_V6, &target) {
        // Duplicate address detection for its own address: no answer.
        Some(ep) if ep.ifindex == ifx => return Ok(Action::Consume),
        Some(ep) => ep,
        None => return Err(DropReason::UnknownNeighbour),
    };
    let frame_len = ETH_HLEN + 40 + 32;
    if ip.src == [0u8; 16] || ip.l4_off != ETH_HLEN + 40 || ip.end != frame_len || ctx.len() as usize != frame_len {
        return Err(DropReason::UnknownNeighbour);
    }
    // The solicitation becomes the advertisement in place. The target
    // address stays where it is; the addresses, the message header and the
    // option change. Payload length (32) and hop limit (255) are the same.
    let flags: u8 = if ep.flags & EP_F_GATEWAY != 0 { 0xe0 } else { 0x60 };
    // Checksum over the pseudo-header (addresses, length 32, next header 58)
    // and the message.
    let mut sum: u32 = 32 + PROTO_ICMPV6 as u32;
    sum += sum16(&target) * 2 + sum16(&ip.src);
    sum += (136u32 << 8) + ((flags as u32) << 8) + ((2u32 << 8) | 1);
    sum += sum16(&GATEWAY_MAC);
    // The sum of 37 words fits in 22 bits: two folds end the carries.
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    let c = (!(sum as u16)).to_be_bytes();
    let src = ip.src;
    set_macs(ctx, vm_mac)?;
    store(ctx, ETH_HLEN + 8, &target)?;
    store(ctx, ETH_HLEN + 24, &src)?;
    store(ctx, ip.l4_off, &[136u8, 0, c[0], c[1], flags, 0, 0, 0])?;
    store(ctx, ip.l4_off + 24, &[2u8, 1])?;
    store(ctx, ip.l4_off + 26, &GATEWAY_MAC)?;
    count(Stat::NeighbourAnswered);
    Ok(Action::Redirect(ifx))
}

/// Sum of big-endian 16-bit words (even length).
#[inline(always)]
fn sum16<const N: usize>(b: &[u8; N]) -> u32 {
    let mut s = 0u32;
    let mut i = 0;
    while i + 1 < N {
        s += u16::from_be_bytes([b[i], b[i + 1]]) as u32;
        i += 2;
    }
    s
}

#[inline(always)]
fn store<const N: usize>(ctx: &mut TcContext, off: usize, b: &[u8; N]) -> Result<(), DropReason> {
    ctx.store(off, b, 0).map_err(|_| DropReason::Truncated)
}

/// Rewrites the Ethernet addresses for delivery to `mac`.
#[inline(always)]
fn set_macs(ctx: &mut TcContext, mac: &[u8; 6]) -> Result<(), DropReason> {
    let mut m = [0u8; 12];
    m[..6].copy_from_slice(mac);
    m[6..].copy_from_slice(&GATEWAY_MAC);
    store(ctx, 0, &m)
}

/// Routes an allowed packet of the port to its destination in the VPC.
#[inline(always)]
pub fn route(ctx: &mut TcContext, ifx: u32, port: &PortInfo, ip: &Ip) -> Result<Action, DropReason> {
    let Some(ep) = endpoint(port.vni, ip.family, &ip.dst) else {
        // Outside the VPC: out of the uplink of the zone the destination is
        // in, where the zone guard decides.
        if port.flags & PORT_F_UPLINK != 0 {
            if let Some(uplink) = crate::zone::uplink_for(ip.family, &ip.dst) {
                return Ok(Action::Neighbour(uplink));
            }
        }
        return Err(DropReason::NoRoute);
    };
    if ep.flags & EP_F_GATEWAY != 0 || ep.ifindex == ifx {
        return Err(DropReason::NoRoute);
    }
    set_macs(ctx, &ep.mac)?;
    if ep.ifindex != 0 {
        count(Stat::ForwardedLocal);
        return Ok(Action::Redirect(ep.ifindex));
    }
    let vxlan = CONFIG.get(0).map(|c| c.vxlan_ifindex).unwrap_or(0);
    if vxlan == 0 {
        return Err(DropReason::NoRoute);
    }
    // A peer's address lives in its own VPC: the receiver checks it there.
    let vni = if ep.flags & EP_F_PEER != 0 { ep.vni } else { port.vni };
    let key = TunnelKey {
        tunnel_id: vni,
        remote: [u32::from_be_bytes(ep.host_v4), 0, 0, 0],
        ttl: 64,
        ..TunnelKey::ZERO
    };
    if !set_tunnel(ctx, key) {
        return Err(DropReason::NoRoute);
    }
    count(Stat::Encapsulated);
    Ok(Action::Redirect(vxlan))
}

/// A packet from the VXLAN device: accepted only if its inner source is an
/// endpoint of the VNI living on the host that sent it, and its inner
/// destination a port of the VNI on this host. A forged VNI fails the first
/// test: the sender's addresses are not that VPC's endpoints on that host.
#[inline(always)]
pub fn from_overlay(ctx: &mut TcContext) -> Result<Action, DropReason> {
    let key = tunnel_of(ctx).ok_or(DropReason::OverlaySpoof)?;
    let vni = key.tunnel_id;
    let sender = key.remote[0].to_be_bytes();
    let eth = parse::eth(ctx)?;
    let ip = match eth.proto {
        ETH_P_IP => parse::ipv4(ctx)?,
        ETH_P_IPV6 => parse::ipv6(ctx)?,
        _ => return Err(DropReason::OverlayNotIp),
    };
    let src = endpoint(vni, ip.family, &ip.src).ok_or(DropReason::OverlaySpoof)?;
    if src.ifindex != 0 || src.flags & EP_F_GATEWAY != 0 || src.host_v4 != sender {
        return Err(DropReason::OverlaySpoof);
    }
    let dst = endpoint(vni, ip.family, &ip.dst).ok_or(DropReason::OverlayUnknownDst)?;
    if dst.ifindex == 0 || dst.flags & (EP_F_GATEWAY | EP_F_PEER) != 0 {
        return Err(DropReason::OverlayUnknownDst);
    }
    // From a peered VPC (every packet between peers crosses the tunnel, even
    // on one host): the VPC firewall (tier 3), read from side A, unless the
    // packet answers a flow the local VM opened.
    if src.flags & EP_F_PEER != 0 && src.policy != 0 {
        let key = conntrack::key(dst.ifindex, &ip, false);
        // SAFETY: the value is read at once.
        let reply = unsafe { CT.get(&key) }.is_some_and(|v| v.origin == CT_ORIGIN_OUT);
        if !reply {
            let local_is_a = src.flags & EP_F_LOCAL_IS_A != 0;
            let (dir, remote) = if local_is_a {
                (DIR_INGRESS, &key.remote)
            } else {
                (DIR_EGRESS, &key.local)
            };
            if !firewall::allows(src.policy, &key, remote, &ip, dir) {
                return Err(DropReason::VpcFirewall);
            }
        }
    }
    set_macs(ctx, &dst.mac)?;
    count(Stat::Decapsulated);
    Ok(Action::Redirect(dst.ifindex))
}
