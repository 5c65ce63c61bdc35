//! VRRP version 3 advertisements (RFC 9568, section 5): written and read
//! here by hand, as no well-kept crate does it; the IP headers around them
//! are `etherparse`'s. Reading checks everything the RFC asks a receiver to
//! check (section 7.1) and names what failed.
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! |Version| Type  | Virtual Rtr ID|   Priority    |Count IPvX Addr|
//! |(rsvd) |     Max Adver Int     |          Checksum             |
//! |                       IPvX Address(es)                        |
//! ```
//!
//! The checksum covers the message and the IP pseudo-header of either
//! family. keepalived before 1.3.6 put the multicast group in the IPv4
//! pseudo-header even when it sent to a unicast peer (its
//! `old_unicast_checksum`); a unicast advertisement with that checksum is
//! taken too, and said so.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::checksum::Sum16BitWords;

/// The IP protocol number of VRRP.
pub const IP_PROTO_VRRP: u8 = 112;
/// The IPv4 multicast group of VRRP.
pub const GROUP_V4: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 18);
/// The IPv6 multicast group of VRRP.
pub const GROUP_V6: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0x12);
/// The TTL or hop limit every advertisement is sent and must arrive with.
pub const TTL: u8 = 255;
/// Bytes before the addresses.
pub const HEADER_LEN: usize = 8;
/// The largest advertisement interval (12 bits of centiseconds).
pub const MAX_INTERVAL_CS: u16 = 0x0fff;

/// An advertisement: a router's priority for a virtual router and the
/// addresses it protects, all of one family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Advert {
    pub vrid: u8,
    /// 1 to 254 for a backup, 255 for the address owner, 0 to resign.
    pub priority: u8,
    /// Centiseconds, 12 bits.
    pub interval_cs: u16,
    pub addresses: Vec<IpAddr>,
}

/// Why a received advertisement was discarded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Invalid {
    /// Sent through a router: the TTL or hop limit is not 255.
    Ttl(u8),
    Version(u8),
    Type(u8),
    /// Fewer bytes than the header and its addresses need.
    Truncated {
        have: usize,
        need: usize,
    },
    Checksum {
        got: u16,
        want: u16,
    },
    /// The message's addresses are of the other family than its IP header.
    Family,
    /// A virtual router id of 0.
    Vrid,
    /// An interval of 0 centiseconds.
    Interval,
    /// No address at all.
    NoAddress,
    /// Not VRRP: another IP protocol.
    Protocol(u8),
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Invalid::Ttl(t) => write!(f, "TTL/hop limit {t}, not 255: the advertisement crossed a router"),
            Invalid::Version(v) => write!(f, "VRRP version {v}, not 3"),
            Invalid::Type(t) => write!(f, "VRRP type {t}, not 1 (advertisement)"),
            Invalid::Truncated { have, need } => write!(f, "{have} bytes, {need} needed"),
            Invalid::Checksum { got, want } => write!(f, "checksum {got:#06x}, {want:#06x} expected"),
            Invalid::Family => write!(f, "addresses of the other IP family than the packet's"),
            Invalid::Vrid => write!(f, "virtual router id 0"),
            Invalid::Interval => write!(f, "advertisement interval 0"),
            Invalid::NoAddress => write!(f, "no address"),
            Invalid::Protocol(p) => write!(f, "IP protocol {p}, not VRRP (112)"),
        }
    }
}

/// How the checksum of a taken advertisement was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChecksumForm {
    /// RFC 9568's: the packet's own pseudo-header.
    Standard,
    /// keepalived's before 1.3.6 for unicast IPv4: the multicast group in
    /// the pseudo-header.
    KeepalivedOldUnicast,
}

/// The message's checksum over the pseudo-header of `src` to `dst`
/// (`message` with its checksum field zero).
fn checksum(src: IpAddr, dst: IpAddr, message: &[u8]) -> u16 {
    let len = message.len() as u32;
    let sum = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => Sum16BitWords::new()
            .add_4bytes(s.octets())
            .add_4bytes(d.octets())
            .add_2bytes([0, IP_PROTO_VRRP])
            .add_2bytes((len as u16).to_be_bytes()),
        (s, d) => {
            let v6 = |a: IpAddr| match a {
                IpAddr::V6(a) => a.octets(),
                IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
            };
            Sum16BitWords::new()
                .add_16bytes(v6(s))
                .add_16bytes(v6(d))
                .add_4bytes(len.to_be_bytes())
                .add_4bytes([0, 0, 0, IP_PROTO_VRRP])
        }
    };
    // The sum is of native-order words; its complement is written big-endian.
    sum.add_slice(message).ones_complement().to_be()
}

impl Advert {
    /// The message, checksummed for an IP packet from `src` to `dst`.
    ///
    /// Panics if the addresses are not all of `src`'s family, or more than
    /// 255: callers build adverts from checked configuration.
    pub fn encode(&self, src: IpAddr, dst: IpAddr) -> Vec<u8> {
        assert!(self.addresses.len() <= 255, "at most 255 addresses");
        assert!(
            self.addresses.iter().all(|a| a.is_ipv4() == src.is_ipv4()),
            "addresses of one family, the packet's"
        );
        let interval = self.interval_cs.min(MAX_INTERVAL_CS);
        let mut m = Vec::with_capacity(HEADER_LEN + 16 * self.addresses.len());
        m.push(0x31);
        m.push(self.vrid);
        m.push(self.priority);
        m.push(self.addresses.len() as u8);
        m.extend_from_slice(&interval.to_be_bytes());
        m.extend_from_slice(&[0, 0]);
        for a in &self.addresses {
            match a {
                IpAddr::V4(a) => m.extend_from_slice(&a.octets()),
                IpAddr::V6(a) => m.extend_from_slice(&a.octets()),
            }
        }
        let sum = checksum(src, dst, &m);
        m[6..8].copy_from_slice(&sum.to_be_bytes());
        m
    }

    /// Reads the VRRP message of an IP packet from `src` to `dst` that
    /// arrived with `ttl`.
    pub fn decode(src: IpAddr, dst: IpAddr, ttl: u8, m: &[u8]) -> Result<(Advert, ChecksumForm), Invalid> {
        if ttl != TTL {
            return Err(Invalid::Ttl(ttl));
        }
        if src.is_ipv4() != dst.is_ipv4() {
            return Err(Invalid::Family);
        }
        if m.len() < HEADER_LEN {
            return Err(Invalid::Truncated {
                have: m.len(),
                need: HEADER_LEN,
            });
        }
        if m[0] >> 4 != 3 {
            return Err(Invalid::Version(m[0] >> 4));
        }
        if m[0] & 0x0f != 1 {
            return Err(Invalid::Type(m[0] & 0x0f));
        }
        let count = m[3] as usize;
        let width = if src.is_ipv4() { 4 } else { 16 };
        let need = HEADER_LEN + count * width;
        if m.len() < need {
            return Err(Invalid::Truncated { have: m.len(), need });
        }
        // The checksum covers what the IP payload holds, however long.
        let got = u16::from_be_bytes([m[6], m[7]]);
        let mut zeroed = m.to_vec();
        zeroed[6] = 0;
        zeroed[7] = 0;
        let want = checksum(src, dst, &zeroed);
        let form = if got == want {
            ChecksumForm::Standard
        } else {
            let old = match dst {
                IpAddr::V4(d) if !d.is_multicast() => Some(checksum(src, IpAddr::V4(GROUP_V4), &zeroed)),
                _ => None,
            };
            if old != Some(got) {
                return Err(Invalid::Checksum { got, want });
            }
            ChecksumForm::KeepalivedOldUnicast
        };
        if m[1] == 0 {
            return Err(Invalid::Vrid);
        }
        let interval_cs = u16::from_be_bytes([m[4], m[5]]) & MAX_INTERVAL_CS;
        if interval_cs == 0 {
            return Err(Invalid::Interval);
        }
        if count == 0 {
            return Err(Invalid::NoAddress);
        }
        let addresses = m[HEADER_LEN..need]
            .chunks_exact(width)
            .map(|c| match c.len() {
                4 => IpAddr::V4(Ipv4Addr::new(c[0], c[1], c[2], c[3])),
                _ => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(c).expect("16 bytes"))),
            })
            .collect();
        Ok((
            Advert {
                vrid: m[1],
                priority: m[2],
                interval_cs,
                addresses,
            },
            form,
        ))
    }
}

/// The packet of an IPv4 advertisement (header and message) as the
/// kernel hands it to a raw socket: its source, destination, TTL and
/// message, read with `etherparse`.
pub fn split_ipv4(packet: &[u8]) -> Result<(IpAddr, IpAddr, u8, &[u8]), Invalid> {
    let (h, rest) = etherparse::Ipv4Header::from_slice(packet).map_err(|_| Invalid::Truncated {
        have: packet.len(),
        need: 20,
    })?;
    let payload_len = (h.total_len as usize).saturating_sub(h.header_len());
    if h.protocol.0 != IP_PROTO_VRRP {
        return Err(Invalid::Protocol(h.protocol.0));
    }
    let body = rest.get(..payload_len).ok_or(Invalid::Truncated {
        have: rest.len(),
        need: payload_len,
    })?;
    Ok((
        IpAddr::V4(Ipv4Addr::from(h.source)),
        IpAddr::V4(Ipv4Addr::from(h.destination)),
        h.time_to_live,
        body,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// The header RFC 9568's layout gives version 3, type 1, VRID 51,
    /// priority 150, one address and 100 centiseconds.
    const HEAD: [u8; 6] = [0x31, 0x33, 0x96, 0x01, 0x00, 0x64];

    /// An advertisement keepalived 2.2.7 sent (captured with tshark, from
    /// the IP header on): 10.77.0.1 to the group, DSCP CS6, TTL 255, VRID
    /// 51, priority 100, 10 centiseconds, 10.77.0.100, checksum 0x7533.
    const KEEPALIVED: [u8; 32] = [
        0x45, 0xc0, 0x00, 0x20, 0x01, 0x0f, 0x00, 0x00, 0xff, 0x70, 0xcf, 0x3e, 0x0a, 0x4d, 0x00, 0x01, 0xe0, 0x00,
        0x00, 0x12, 0x31, 0x33, 0x64, 0x01, 0x00, 0x0a, 0x75, 0x33, 0x0a, 0x4d, 0x00, 0x64,
    ];

    /// keepalived's own advertisement reads, and ours of the same is the
    /// same bytes, checksum included.
    #[test]
    fn reads_and_writes_keepalived_s_bytes() {
        let (src, dst, ttl, m) = split_ipv4(&KEEPALIVED).unwrap();
        let (a, form) = Advert::decode(src, dst, ttl, m).unwrap();
        assert_eq!(form, ChecksumForm::Standard);
        assert_eq!(
            a,
            Advert {
                vrid: 51,
                priority: 100,
                interval_cs: 10,
                addresses: vec![v4("10.77.0.100")],
            }
        );
        assert_eq!(a.encode(src, dst), m);
    }

    #[test]
    fn writes_and_reads_back_each_family() {
        let a = Advert {
            vrid: 51,
            priority: 150,
            interval_cs: 100,
            addresses: vec![v4("10.0.0.100")],
        };
        let m = a.encode(v4("10.0.0.1"), IpAddr::V4(GROUP_V4));
        assert_eq!(m[..6], HEAD);
        let (b, form) = Advert::decode(v4("10.0.0.1"), IpAddr::V4(GROUP_V4), 255, &m).unwrap();
        assert_eq!((b, form), (a, ChecksumForm::Standard));
        let a6 = Advert {
            vrid: 7,
            priority: 254,
            interval_cs: 5,
            addresses: vec![v4("fe80::1"), v4("fd00::7")],
        };
        let src = v4("fe80::2");
        let m = a6.encode(src, IpAddr::V6(GROUP_V6));
        assert_eq!(m.len(), 8 + 32);
        assert_eq!(Advert::decode(src, IpAddr::V6(GROUP_V6), 255, &m).unwrap().0, a6);
    }

    /// Every check of RFC 9568 section 7.1 that the message can fail, each
    /// named.
    #[test]
    fn refuses_what_the_rfc_discards() {
        let src = v4("10.0.0.1");
        let g = IpAddr::V4(GROUP_V4);
        let good = Advert {
            vrid: 51,
            priority: 150,
            interval_cs: 100,
            addresses: vec![v4("10.0.0.100")],
        }
        .encode(src, g);
        assert_eq!(Advert::decode(src, g, 254, &good).unwrap_err(), Invalid::Ttl(254));
        assert!(matches!(
            Advert::decode(src, g, 255, &good[..11]).unwrap_err(),
            Invalid::Truncated { have: 11, need: 12 }
        ));
        assert!(matches!(
            Advert::decode(src, g, 255, &good[..3]).unwrap_err(),
            Invalid::Truncated { .. }
        ));
        let mut bad = good.clone();
        bad[0] = 0x21;
        assert_eq!(Advert::decode(src, g, 255, &bad).unwrap_err(), Invalid::Version(2));
        bad[0] = 0x32;
        assert_eq!(Advert::decode(src, g, 255, &bad).unwrap_err(), Invalid::Type(2));
        let mut bad = good.clone();
        bad[2] = 200;
        assert!(matches!(
            Advert::decode(src, g, 255, &bad).unwrap_err(),
            Invalid::Checksum { .. }
        ));
        // The checksum covers the pseudo-header: another source fails it.
        assert!(matches!(
            Advert::decode(v4("10.0.0.2"), g, 255, &good).unwrap_err(),
            Invalid::Checksum { .. }
        ));
        // Other fields, each with a right checksum.
        let resum = |mut m: Vec<u8>| {
            m[6] = 0;
            m[7] = 0;
            let s = checksum(src, g, &m);
            m[6..8].copy_from_slice(&s.to_be_bytes());
            m
        };
        let mut m = good.clone();
        m[1] = 0;
        assert_eq!(Advert::decode(src, g, 255, &resum(m)).unwrap_err(), Invalid::Vrid);
        let mut m = good.clone();
        m[4] = 0xf0;
        m[5] = 0;
        assert_eq!(Advert::decode(src, g, 255, &resum(m)).unwrap_err(), Invalid::Interval);
        let mut m = good[..8].to_vec();
        m[3] = 0;
        assert_eq!(Advert::decode(src, g, 255, &resum(m)).unwrap_err(), Invalid::NoAddress);
        assert_eq!(
            Advert::decode(src, v4("ff02::12"), 255, &good).unwrap_err(),
            Invalid::Family
        );
    }

    /// A unicast advertisement checksummed over the multicast group, as
    /// keepalived before 1.3.6 made them, is taken and said so; a
    /// multicast one never needs it.
    #[test]
    fn takes_keepalived_s_old_unicast_checksum() {
        let src = v4("10.0.0.1");
        let peer = v4("10.0.0.2");
        let a = Advert {
            vrid: 9,
            priority: 100,
            interval_cs: 100,
            addresses: vec![v4("10.0.0.100")],
        };
        let old = a.encode(src, IpAddr::V4(GROUP_V4));
        assert_eq!(
            Advert::decode(src, peer, 255, &old).unwrap(),
            (a.clone(), ChecksumForm::KeepalivedOldUnicast)
        );
        let new = a.encode(src, peer);
        assert_eq!(Advert::decode(src, peer, 255, &new).unwrap().1, ChecksumForm::Standard);
    }

    #[test]
    fn reads_the_ip_header_of_a_raw_socket() {
        let a = Advert {
            vrid: 51,
            priority: 150,
            interval_cs: 100,
            addresses: vec![v4("10.0.0.100")],
        };
        let m = a.encode(v4("10.0.0.1"), IpAddr::V4(GROUP_V4));
        let mut h = etherparse::Ipv4Header::new(
            m.len() as u16,
            255,
            etherparse::IpNumber(IP_PROTO_VRRP),
            [10, 0, 0, 1],
            GROUP_V4.octets(),
        )
        .unwrap();
        h.header_checksum = h.calc_header_checksum();
        let mut p = h.to_bytes().to_vec();
        p.extend_from_slice(&m);
        // Trailing bytes past the IP length are not the message's.
        p.extend_from_slice(&[0xee; 6]);
        let (s, d, ttl, body) = split_ipv4(&p).unwrap();
        assert_eq!((s, d, ttl), (v4("10.0.0.1"), IpAddr::V4(GROUP_V4), 255));
        assert_eq!(Advert::decode(s, d, ttl, body).unwrap().0, a);
        assert!(split_ipv4(&p[..10]).is_err());
    }
}
