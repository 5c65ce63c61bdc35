//! The overlay: VPC endpoints, the tunnel metadata, and the entry on the
//! VXLAN device. A tunnel packet is accepted only if its inner source is an
//! endpoint of the VNI living on the host that sent it, and its inner
//! destination a port of the VNI on this host. A forged VNI fails the first
//! test: the sender's addresses are not that VPC's endpoints on that host.

use aya_ebpf::{helpers::gen, programs::TcContext};
use dataplane_common::{
    maps::{Endpoint, EndpointKey, DOOR_PEER, DOOR_VPC, EP_F_GATEWAY, EP_F_LOCAL_IS_A, EP_F_NAT, EP_F_PEER},
    DropReason, DIR_EGRESS, DIR_INGRESS,
};

use crate::{
    ctx::Pkt,
    maps::ENDPOINTS,
    meta::{Meta, E_FROM_OVERLAY, K_IP, O_NAT, X_PEER},
    parse::{self, ETH_P_IP, ETH_P_IPV6},
    port,
};

/// `struct bpf_tunnel_key` of the kernel (IPv4 fields used).
#[repr(C)]
pub struct TunnelKey {
    pub tunnel_id: u32,
    pub remote: [u32; 4],
    pub tos: u8,
    pub ttl: u8,
    pub ext: u16,
    pub label: u32,
    pub local: [u32; 4],
}

const _: () = assert!(core::mem::size_of::<TunnelKey>() == 44);

impl TunnelKey {
    pub const ZERO: TunnelKey = TunnelKey {
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
pub fn set_tunnel(ctx: &TcContext, vni: u32, remote: [u8; 4]) -> bool {
    let mut key = TunnelKey {
        tunnel_id: vni,
        remote: [u32::from_be_bytes(remote), 0, 0, 0],
        ttl: 64,
        ..TunnelKey::ZERO
    };
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
pub fn tunnel_of(ctx: &TcContext) -> Option<TunnelKey> {
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

/// Where an address of a VPC lives.
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

/// Sets up the VPC firewall of a peering for a packet to a local port from
/// a peer: the rules are read from side A, so side A's ingress when the
/// receiver is side A (the remote end is the sender), else its egress (the
/// remote end is the receiver).
#[inline(always)]
pub fn peer_firewall(m: &mut Meta, policy: u32, receiver_is_a: bool) {
    m.crossing = X_PEER;
    m.fw_policy = policy;
    if receiver_is_a {
        m.fw_dir = DIR_INGRESS;
        m.fw_remote_is_src = 1;
    } else {
        m.fw_dir = DIR_EGRESS;
        m.fw_remote_is_src = 0;
    }
}

/// Packets from the VXLAN device.
#[inline(always)]
pub fn from_overlay(ctx: &TcContext, m: &mut Meta) -> Result<(), DropReason> {
    m.reset(E_FROM_OVERLAY, Pkt::ifindex(ctx));
    let key = tunnel_of(ctx).ok_or(DropReason::OverlaySpoof)?;
    let vni = key.tunnel_id;
    let sender = key.remote[0].to_be_bytes();
    let (_, ethertype) = parse::eth(ctx)?;
    if ethertype != ETH_P_IP && ethertype != ETH_P_IPV6 {
        return Err(DropReason::OverlayNotIp);
    }
    parse::ip(ctx, m, ethertype)?;
    let src = endpoint(vni, m.family, &m.src).ok_or(DropReason::OverlaySpoof)?;
    if src.ifindex != 0 || src.flags & EP_F_GATEWAY != 0 || src.host_v4 != sender {
        return Err(DropReason::OverlaySpoof);
    }
    crate::uplink::outside_to_vm(m)?;
    let dst = endpoint(vni, m.family, &m.dst).ok_or(DropReason::OverlayUnknownDst)?;
    if dst.flags & EP_F_NAT != 0 && src.flags & EP_F_PEER == 0 {
        // A member's reply to this host's NAT address (`st_nat_out`).
        m.nat_vni = vni;
        m.out = O_NAT;
        m.kind = K_IP;
        return Ok(());
    }
    if dst.ifindex == 0 || dst.flags & (EP_F_GATEWAY | EP_F_PEER) != 0 {
        return Err(DropReason::OverlayUnknownDst);
    }
    m.dst_ifx = dst.ifindex;
    m.dst_port = port::port(dst.ifindex)?;
    m.dst_mac = dst.mac;
    if src.flags & EP_F_PEER != 0 {
        m.dst_door = DOOR_PEER | src.vni;
        if src.policy != 0 {
            // `src` is keyed by the receiver's VNI.
            peer_firewall(m, src.policy, src.flags & EP_F_LOCAL_IS_A != 0);
        }
    } else {
        m.dst_door = DOOR_VPC | vni;
    }
    m.kind = K_IP;
    Ok(())
}
