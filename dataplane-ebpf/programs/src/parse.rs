//! Packet parsing, once, at the entry: Ethernet, ARP, IPv4, IPv6 with
//! extension headers, TCP, UDP, ICMP and ICMPv6, into the metadata record.
//! Every length field is checked against the packet: a header that claims
//! more than the packet holds, or less than its minimum, is an error,
//! never a guess.

use dataplane_common::{
    maps::icmp_class, DropReason, FAMILY_V4, FAMILY_V6, MAX_IPV6_EXT_HEADERS, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP,
    PROTO_UDP,
};

use crate::{
    ctx::{load, read, Pkt},
    meta::Meta,
};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// The Ethernet source and type.
#[inline(always)]
pub fn eth<C: Pkt>(ctx: &C) -> Result<([u8; 6], u16), DropReason> {
    let h: [u8; 14] = read(ctx, 0).ok_or(DropReason::Truncated)?;
    Ok((
        [h[6], h[7], h[8], h[9], h[10], h[11]],
        u16::from_be_bytes([h[12], h[13]]),
    ))
}

/// An ARP packet for IPv4 over Ethernet, into the record.
#[inline(always)]
pub fn arp<C: Pkt>(ctx: &C, m: &mut Meta) -> Result<(), DropReason> {
    let h: [u8; 28] = read(ctx, ETH_HLEN).ok_or(DropReason::Truncated)?;
    // htype 1 (Ethernet), ptype 0x0800, hlen 6, plen 4.
    if h[0] != 0 || h[1] != 1 || h[2] != 0x08 || h[3] != 0x00 || h[4] != 6 || h[5] != 4 {
        return Err(DropReason::BadArp);
    }
    m.arp_op = u16::from_be_bytes([h[6], h[7]]);
    m.arp_sha = [h[8], h[9], h[10], h[11], h[12], h[13]];
    m.arp_spa = [h[14], h[15], h[16], h[17]];
    m.arp_tpa = [h[24], h[25], h[26], h[27]];
    Ok(())
}

/// An IPv4 or IPv6 packet and its transport header, into the record.
#[inline(always)]
pub fn ip<C: Pkt>(ctx: &C, m: &mut Meta, ethertype: u16) -> Result<(), DropReason> {
    m.len = ctx.len();
    match ethertype {
        ETH_P_IP => ipv4(ctx, m)?,
        ETH_P_IPV6 => ipv6(ctx, m)?,
        _ => return Err(DropReason::UnsupportedEthertype),
    }
    transport(ctx, m)
}

#[inline(always)]
fn ipv4<C: Pkt>(ctx: &C, m: &mut Meta) -> Result<(), DropReason> {
    let h: [u8; 20] = read(ctx, ETH_HLEN).ok_or(DropReason::Truncated)?;
    if h[0] >> 4 != 4 {
        return Err(DropReason::BadIpHeader);
    }
    let ihl = ((h[0] & 0x0f) as usize) * 4;
    if ihl < 20 {
        return Err(DropReason::BadIpHeader);
    }
    let total = u16::from_be_bytes([h[2], h[3]]) as usize;
    if total < ihl || ETH_HLEN + total > m.len as usize {
        return Err(DropReason::BadIpHeader);
    }
    // More-fragments set, or a non-zero offset.
    if u16::from_be_bytes([h[6], h[7]]) & 0x3fff != 0 {
        return Err(DropReason::Fragment);
    }
    m.family = FAMILY_V4;
    m.proto = h[9];
    m.src = [0; 16];
    m.dst = [0; 16];
    m.src[..4].copy_from_slice(&h[12..16]);
    m.dst[..4].copy_from_slice(&h[16..20]);
    m.l4_off = (ETH_HLEN + ihl) as u16;
    m.end = (ETH_HLEN + total) as u16;
    // An authentication header (RFC 4302) comes before the transport, as
    // in IPv6: its length is in 4-octet units minus 2, and never 0.
    if m.proto == 51 {
        let off = ETH_HLEN + ihl;
        let e: [u8; 2] = load(ctx, off).ok_or(DropReason::Truncated)?;
        if e[1] == 0 {
            return Err(DropReason::BadIpHeader);
        }
        let next = off + (e[1] as usize + 2) * 4;
        if next > ETH_HLEN + total {
            return Err(DropReason::Truncated);
        }
        m.proto = e[0];
        m.l4_off = next as u16;
    }
    Ok(())
}

#[inline(always)]
fn ipv6<C: Pkt>(ctx: &C, m: &mut Meta) -> Result<(), DropReason> {
    let h: [u8; 40] = read(ctx, ETH_HLEN).ok_or(DropReason::Truncated)?;
    if h[0] >> 4 != 6 {
        return Err(DropReason::BadIpHeader);
    }
    let payload = u16::from_be_bytes([h[4], h[5]]) as usize;
    let end = ETH_HLEN + 40 + payload;
    if end > m.len as usize {
        return Err(DropReason::BadIpHeader);
    }
    let mut nh = h[6];
    let mut off = ETH_HLEN + 40;
    let mut done = false;
    // Up to MAX_IPV6_EXT_HEADERS extension headers, then the transport.
    for i in 0..MAX_IPV6_EXT_HEADERS + 1 {
        // Hop-by-hop options come first or not at all (RFC 8200, 4.1).
        if nh == 0 && i > 0 {
            return Err(DropReason::BadIpHeader);
        }
        let len_unit = match nh {
            // Hop-by-hop, routing, destination options, mobility: length
            // in 8-octet units, not counting the first.
            0 | 43 | 60 | 135 => 8,
            // Authentication header: in 4-octet units, minus 2.
            51 => 4,
            44 => return Err(DropReason::Fragment),
            _ => {
                done = true;
                break;
            }
        };
        let e: [u8; 2] = load(ctx, off).ok_or(DropReason::Truncated)?;
        if len_unit == 4 && e[1] == 0 {
            return Err(DropReason::BadIpHeader);
        }
        nh = e[0];
        off += if len_unit == 8 {
            (e[1] as usize + 1) * 8
        } else {
            (e[1] as usize + 2) * 4
        };
        if off > end {
            return Err(DropReason::Truncated);
        }
    }
    if !done {
        return Err(DropReason::ExtChainTooLong);
    }
    m.family = FAMILY_V6;
    m.proto = nh;
    m.src.copy_from_slice(&h[8..24]);
    m.dst.copy_from_slice(&h[24..40]);
    m.l4_off = off as u16;
    m.end = end as u16;
    Ok(())
}

#[inline(always)]
fn transport<C: Pkt>(ctx: &C, m: &mut Meta) -> Result<(), DropReason> {
    let off = m.l4_off as usize;
    let room = (m.end as usize).saturating_sub(off);
    match m.proto {
        PROTO_TCP => {
            if room < 20 {
                return Err(DropReason::Truncated);
            }
            let t: [u8; 14] = read(ctx, off).ok_or(DropReason::Truncated)?;
            // Data offset: at least the 5 words of the fixed header, and
            // no more than the packet holds.
            let doff = ((t[12] >> 4) as usize) * 4;
            if doff < 20 || doff > room {
                return Err(DropReason::BadIpHeader);
            }
            m.sport = u16::from_be_bytes([t[0], t[1]]);
            m.dport = u16::from_be_bytes([t[2], t[3]]);
            m.tcp_flags = t[13];
            m.tcp_seq = u32::from_be_bytes([t[4], t[5], t[6], t[7]]);
            m.tcp_ack = u32::from_be_bytes([t[8], t[9], t[10], t[11]]);
        }
        PROTO_UDP => {
            if room < 8 {
                return Err(DropReason::Truncated);
            }
            let u: [u8; 8] = read(ctx, off).ok_or(DropReason::Truncated)?;
            let ulen = u16::from_be_bytes([u[4], u[5]]) as usize;
            if ulen < 8 || ulen > room {
                return Err(DropReason::BadIpHeader);
            }
            m.sport = u16::from_be_bytes([u[0], u[1]]);
            m.dport = u16::from_be_bytes([u[2], u[3]]);
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            // ICMP in IPv6 and ICMPv6 in IPv4 are nonsense.
            if (m.proto == PROTO_ICMP) != (m.family == FAMILY_V4) {
                return Err(DropReason::BadIpHeader);
            }
            if room < 8 {
                return Err(DropReason::Truncated);
            }
            let c: [u8; 8] = read(ctx, off).ok_or(DropReason::Truncated)?;
            m.icmp_type = c[0];
            m.icmp = icmp_class(m.proto, c[0]);
            if is_echo(m.proto, m.icmp_type) {
                let id = u16::from_be_bytes([c[4], c[5]]);
                m.sport = id;
                m.dport = id;
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

/// The flow of the packet quoted in an ICMP error.
pub struct Inner {
    pub proto: u8,
    pub icmp: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
}

/// Parses the quoted packet of an ICMP error (IPv4 in ICMP, IPv6 without
/// extension headers in ICMPv6). `None` when it is cut short or unusual.
#[inline(always)]
pub fn icmp_inner<C: Pkt>(ctx: &C, m: &Meta) -> Option<Inner> {
    let off = m.l4_off as usize + 8;
    let mut inner = Inner {
        proto: 0,
        icmp: 0,
        src: [0; 16],
        dst: [0; 16],
        sport: 0,
        dport: 0,
    };
    let l4 = if m.family == FAMILY_V4 {
        let h: [u8; 20] = load(ctx, off)?;
        if h[0] >> 4 != 4 || (h[0] & 0x0f) < 5 {
            return None;
        }
        inner.proto = h[9];
        inner.src[..4].copy_from_slice(&h[12..16]);
        inner.dst[..4].copy_from_slice(&h[16..20]);
        off + ((h[0] & 0x0f) as usize) * 4
    } else {
        let h: [u8; 40] = load(ctx, off)?;
        if h[0] >> 4 != 6 {
            return None;
        }
        inner.proto = h[6];
        inner.src.copy_from_slice(&h[8..24]);
        inner.dst.copy_from_slice(&h[24..40]);
        off + 40
    };
    if inner.proto != m.proto && (inner.proto == PROTO_ICMP || inner.proto == PROTO_ICMPV6) {
        return None;
    }
    let p: [u8; 8] = load(ctx, l4)?;
    match inner.proto {
        PROTO_TCP | PROTO_UDP => {
            inner.sport = u16::from_be_bytes([p[0], p[1]]);
            inner.dport = u16::from_be_bytes([p[2], p[3]]);
        }
        PROTO_ICMP | PROTO_ICMPV6 if is_echo(inner.proto, p[0]) => {
            let id = u16::from_be_bytes([p[4], p[5]]);
            inner.icmp = icmp_class(inner.proto, p[0]);
            inner.sport = id;
            inner.dport = id;
        }
        _ => return None,
    }
    Some(inner)
}
