//! Packet parsing: Ethernet, ARP, IPv4, IPv6 with extension headers, TCP,
//! UDP, ICMP and ICMPv6. Every read goes through `bpf_skb_load_bytes`, so a
//! short packet is an error, never an out-of-bounds read.

use aya_ebpf::programs::TcContext;
use dataplane_common::{
    DropReason, FAMILY_V4, FAMILY_V6, MAX_IPV6_EXT_HEADERS, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP,
};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// The Ethernet header fields the programs use.
pub struct Eth {
    pub src: [u8; 6],
    pub proto: u16,
}

#[inline(always)]
pub fn eth(ctx: &TcContext) -> Result<Eth, DropReason> {
    let h: [u8; 14] = ctx.load(0).map_err(|_| DropReason::Truncated)?;
    Ok(Eth {
        src: [h[6], h[7], h[8], h[9], h[10], h[11]],
        proto: u16::from_be_bytes([h[12], h[13]]),
    })
}

/// An ARP packet for IPv4 over Ethernet.
pub struct Arp {
    /// 1 request, 2 reply.
    pub op: u16,
    pub sender_mac: [u8; 6],
    pub sender_ip: [u8; 4],
    pub target_ip: [u8; 4],
}

#[inline(always)]
pub fn arp(ctx: &TcContext) -> Result<Arp, DropReason> {
    let h: [u8; 28] = ctx.load(ETH_HLEN).map_err(|_| DropReason::Truncated)?;
    // htype 1 (Ethernet), ptype 0x0800, hlen 6, plen 4.
    if h[0] != 0 || h[1] != 1 || h[2] != 0x08 || h[3] != 0x00 || h[4] != 6 || h[5] != 4 {
        return Err(DropReason::BadArp);
    }
    Ok(Arp {
        op: u16::from_be_bytes([h[6], h[7]]),
        sender_mac: [h[8], h[9], h[10], h[11], h[12], h[13]],
        sender_ip: [h[14], h[15], h[16], h[17]],
        target_ip: [h[24], h[25], h[26], h[27]],
    })
}

/// The fields of an IP packet that policy and conntrack need.
pub struct Ip {
    pub family: u8,
    pub proto: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Offset of the transport header.
    pub l4_off: usize,
    /// Offset just past the IP packet (its length field, not the frame's).
    pub end: usize,
    /// TCP/UDP ports; for ICMP echo both are the identifier.
    pub sport: u16,
    pub dport: u16,
    /// ICMP/ICMPv6 message type and code (0 otherwise).
    pub icmp_type: u8,
    pub icmp_code: u8,
    pub tcp_flags: u8,
}

impl Ip {
    /// The service a rule matches: destination port, or the ICMP type.
    #[inline(always)]
    pub fn service(&self) -> u16 {
        if self.proto == PROTO_ICMP || self.proto == PROTO_ICMPV6 {
            self.icmp_type as u16
        } else {
            self.dport
        }
    }
}

#[inline(always)]
pub fn ipv4(ctx: &TcContext) -> Result<Ip, DropReason> {
    let h: [u8; 20] = ctx.load(ETH_HLEN).map_err(|_| DropReason::Truncated)?;
    if h[0] >> 4 != 4 {
        return Err(DropReason::BadIpHeader);
    }
    let ihl = ((h[0] & 0x0f) as usize) * 4;
    if ihl < 20 {
        return Err(DropReason::BadIpHeader);
    }
    let total = u16::from_be_bytes([h[2], h[3]]) as usize;
    if total < ihl || ETH_HLEN + total > ctx.len() as usize {
        return Err(DropReason::BadIpHeader);
    }
    let frag = u16::from_be_bytes([h[6], h[7]]);
    // More-fragments set, or a non-zero offset.
    if frag & 0x3fff != 0 {
        return Err(DropReason::Fragment);
    }
    let mut ip = Ip {
        family: FAMILY_V4,
        proto: h[9],
        src: [0; 16],
        dst: [0; 16],
        l4_off: ETH_HLEN + ihl,
        end: ETH_HLEN + total,
        sport: 0,
        dport: 0,
        icmp_type: 0,
        icmp_code: 0,
        tcp_flags: 0,
    };
    ip.src[..4].copy_from_slice(&h[12..16]);
    ip.dst[..4].copy_from_slice(&h[16..20]);
    transport(ctx, &mut ip)?;
    Ok(ip)
}

#[inline(always)]
pub fn ipv6(ctx: &TcContext) -> Result<Ip, DropReason> {
    let h: [u8; 40] = ctx.load(ETH_HLEN).map_err(|_| DropReason::Truncated)?;
    if h[0] >> 4 != 6 {
        return Err(DropReason::BadIpHeader);
    }
    let payload = u16::from_be_bytes([h[4], h[5]]) as usize;
    if ETH_HLEN + 40 + payload > ctx.len() as usize {
        return Err(DropReason::BadIpHeader);
    }
    let mut nh = h[6];
    let mut off = ETH_HLEN + 40;
    let mut done = false;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match nh {
            // Hop-by-hop, routing, destination options, mobility: length in 8-octet units.
            0 | 43 | 60 | 135 => {
                let e: [u8; 2] = ctx.load(off).map_err(|_| DropReason::Truncated)?;
                nh = e[0];
                off += (e[1] as usize + 1) * 8;
            }
            // Authentication header: length in 4-octet units, minus 2.
            51 => {
                let e: [u8; 2] = ctx.load(off).map_err(|_| DropReason::Truncated)?;
                nh = e[0];
                off += (e[1] as usize + 2) * 4;
            }
            44 => return Err(DropReason::Fragment),
            _ => {
                done = true;
                break;
            }
        }
    }
    if !done {
        return Err(DropReason::ExtChainTooLong);
    }
    let mut ip = Ip {
        family: FAMILY_V6,
        proto: nh,
        src: [0; 16],
        dst: [0; 16],
        l4_off: off,
        end: ETH_HLEN + 40 + payload,
        sport: 0,
        dport: 0,
        icmp_type: 0,
        icmp_code: 0,
        tcp_flags: 0,
    };
    ip.src.copy_from_slice(&h[8..24]);
    ip.dst.copy_from_slice(&h[24..40]);
    transport(ctx, &mut ip)?;
    Ok(ip)
}

#[inline(always)]
fn transport(ctx: &TcContext, ip: &mut Ip) -> Result<(), DropReason> {
    let off = ip.l4_off;
    // Bytes of transport header the packet must hold, by its own length.
    let need = match ip.proto {
        PROTO_TCP => 20,
        PROTO_UDP | PROTO_ICMP | PROTO_ICMPV6 => 8,
        _ => 0,
    };
    if off + need > ip.end {
        return Err(DropReason::Truncated);
    }
    match ip.proto {
        PROTO_TCP => {
            let t: [u8; 14] = ctx.load(off).map_err(|_| DropReason::Truncated)?;
            ip.sport = u16::from_be_bytes([t[0], t[1]]);
            ip.dport = u16::from_be_bytes([t[2], t[3]]);
            ip.tcp_flags = t[13];
        }
        PROTO_UDP => {
            let u: [u8; 8] = ctx.load(off).map_err(|_| DropReason::Truncated)?;
            ip.sport = u16::from_be_bytes([u[0], u[1]]);
            ip.dport = u16::from_be_bytes([u[2], u[3]]);
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            let c: [u8; 8] = ctx.load(off).map_err(|_| DropReason::Truncated)?;
            ip.icmp_type = c[0];
            ip.icmp_code = c[1];
            if is_echo(ip.proto, ip.icmp_type) {
                let id = u16::from_be_bytes([c[4], c[5]]);
                ip.sport = id;
                ip.dport = id;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Echo request or reply: the identifier names the flow.
#[inline(always)]
pub fn is_echo(proto: u8, ty: u8) -> bool {
    (proto == PROTO_ICMP && (ty == 8 || ty == 0)) || (proto == PROTO_ICMPV6 && (ty == 128 || ty == 129))
}

/// An ICMP or ICMPv6 error message, which carries the start of the packet
/// that caused it: destination unreachable, packet too big (v6), time
/// exceeded, parameter problem.
#[inline(always)]
pub fn is_icmp_error(proto: u8, ty: u8) -> bool {
    (proto == PROTO_ICMP && (ty == 3 || ty == 11 || ty == 12)) || (proto == PROTO_ICMPV6 && (1..=4).contains(&ty))
}

/// The flow of the packet quoted in an ICMP error: (proto, src, dst, sport, dport).
pub struct Inner {
    pub proto: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
}

/// Parses the quoted packet of an ICMP error (IPv4 in ICMP, IPv6 without
/// extension headers in ICMPv6). `None` when it is cut short or unusual.
#[inline(always)]
pub fn icmp_inner(ctx: &TcContext, ip: &Ip) -> Option<Inner> {
    let off = ip.l4_off + 8;
    let mut inner = Inner {
        proto: 0,
        src: [0; 16],
        dst: [0; 16],
        sport: 0,
        dport: 0,
    };
    let l4 = if ip.family == FAMILY_V4 {
        let h: [u8; 20] = ctx.load(off).ok()?;
        if h[0] >> 4 != 4 || (h[0] & 0x0f) < 5 {
            return None;
        }
        inner.proto = h[9];
        inner.src[..4].copy_from_slice(&h[12..16]);
        inner.dst[..4].copy_from_slice(&h[16..20]);
        off + ((h[0] & 0x0f) as usize) * 4
    } else {
        let h: [u8; 40] = ctx.load(off).ok()?;
        if h[0] >> 4 != 6 {
            return None;
        }
        inner.proto = h[6];
        inner.src.copy_from_slice(&h[8..24]);
        inner.dst.copy_from_slice(&h[24..40]);
        off + 40
    };
    let p: [u8; 8] = ctx.load(l4).ok()?;
    match inner.proto {
        PROTO_TCP | PROTO_UDP => {
            inner.sport = u16::from_be_bytes([p[0], p[1]]);
            inner.dport = u16::from_be_bytes([p[2], p[3]]);
        }
        PROTO_ICMP | PROTO_ICMPV6 if is_echo(inner.proto, p[0]) => {
            let id = u16::from_be_bytes([p[4], p[5]]);
            inner.sport = id;
            inner.dport = id;
        }
        _ => return None,
    }
    Some(inner)
}
