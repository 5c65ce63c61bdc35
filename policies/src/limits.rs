//! What the store accepts beyond the rules of each object: the capacity of
//! the dataplane's maps, and how much of a zone the exchange paths may open
//! before they must say why.
//!
//! The capacities are the map sizes of `dataplane-common`, never copied
//! here: an object the store accepts is one every agent can hold. The share
//! of a zone is counted exactly (unions of prefixes and of port ranges), so
//! paths cut into pieces add up to what they open together.

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

pub use dataplane_common::maps::{
    ENDPOINTS_MAX, EXCHANGE_MAX, FW_NAMES_MAX, FW_POLICIES_MAX, FW_POLICY_RULES_MAX, FW_RULES_MAX, PORTS_MAX,
    PORT_ADDRS_MAX, ZONES_MAX, ZONE_ENDPOINTS_MAX, ZONE_NETS_MAX,
};

// A port's anti-spoofing entries (IPv4, IPv6 and its link-local address)
// fit whenever its host's ports do, so the ports per host bound them.
const _: () = assert!(3 * PORTS_MAX <= PORT_ADDRS_MAX);

/// What one request may carry, checked where it is made (`sdnctl`, before
/// it parses or sends anything) and where it arrives (the controller): one
/// table, so the two never disagree.
pub mod input {
    /// Bytes of one manifest file.
    pub const MANIFEST_BYTES_MAX: u64 = 16 << 20;
    /// Nesting of a manifest: block indentation levels plus `[`/`{` levels.
    /// The deepest valid document nests about 8 levels.
    pub const MANIFEST_DEPTH_MAX: usize = 32;
    /// Operations in one batch.
    pub const BATCH_OPS_MAX: usize = 10_000;
    /// Rules of one security group: the largest the per-packet benchmark
    /// measures on one port.
    pub const GROUP_RULES_MAX: usize = 100_000;
    /// Bytes of one encoded API request: the controller's gRPC decoding
    /// limit.
    pub const REQUEST_BYTES_MAX: usize = 4 << 20;
}

/// The default of [`Settings::exchange_share_max_percent`].
pub const EXCHANGE_SHARE_MAX_PERCENT: u8 = 25;

/// Validation settings that are not objects. They decide which batches
/// apply, so every replica of the store must hold the same values: a
/// controller that sets other values than the defaults sets them on every
/// replica, each time it loads its state (snapshots carry them too).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    /// The largest share, in percent, that the exchange paths from one zone
    /// to another with one protocol may open together, unless marked broad:
    /// of the destination zone's addresses (per family: the union of the
    /// paths' destinations over the union of the zone's prefixes), and of
    /// the port range (the union of their ports over 65536 ports, or 256
    /// ICMP types). At exactly this share a path is still accepted; 100
    /// or more sets no limit.
    pub exchange_share_max_percent: u8,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            exchange_share_max_percent: EXCHANGE_SHARE_MAX_PERCENT,
        }
    }
}

/// A number of addresses, up to 2^128 (every IPv6 address): 129 bits, as
/// `high * 2^128 + low`. The derived order compares `high` first.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Count {
    high: u128,
    low: u128,
}

impl Count {
    fn of(n: u128) -> Count {
        Count { high: 0, low: n }
    }

    /// The size of the inclusive range `first..=last`.
    fn range(first: u128, last: u128) -> Count {
        let (low, carry) = (last - first).overflowing_add(1);
        Count {
            high: carry as u128,
            low,
        }
    }

    fn add(self, o: Count) -> Count {
        let (low, carry) = self.low.overflowing_add(o.low);
        Count {
            high: self.high + o.high + carry as u128,
            low,
        }
    }

    /// The count times a small factor (at most 2^32).
    fn times(self, k: u32) -> Count {
        let k = k as u128;
        let (upper, lower) = (self.low >> 64, self.low & u64::MAX as u128);
        let (low, carry) = (lower * k).overflowing_add((upper * k) << 64);
        Count {
            high: self.high * k + ((upper * k) >> 64) + carry as u128,
            low,
        }
    }

    fn as_f64(self) -> f64 {
        self.high as f64 * 2f64.powi(128) + self.low as f64
    }
}

/// How much of a whole a set of paths covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Share {
    covered: Count,
    total: Count,
}

impl Share {
    /// Whether the covered part is above `percent` of the whole.
    pub(crate) fn above(&self, percent: u8) -> bool {
        self.covered.times(100) > self.total.times(percent as u32)
    }

    /// The covered part in percent, for messages.
    pub(crate) fn percent(&self) -> f64 {
        if self.total == Count::default() {
            return 0.0;
        }
        self.covered.as_f64() * 100.0 / self.total.as_f64()
    }
}

/// The first and last address of a prefix, as numbers of its family.
fn bounds(n: IpNetwork) -> (u128, u128) {
    let (first, bits) = match n {
        IpNetwork::V4(a) => (u32::from(a.network()) as u128, 32),
        IpNetwork::V6(a) => (u128::from(a.network()), 128),
    };
    let host_bits = bits - n.prefix() as u32;
    let span = if host_bits == 128 {
        u128::MAX
    } else {
        (1u128 << host_bits) - 1
    };
    (first, first + span)
}

/// The size of the union of inclusive ranges.
fn union(mut ranges: Vec<(u128, u128)>) -> Count {
    ranges.sort_unstable();
    let mut total = Count::default();
    let mut open: Option<(u128, u128)> = None;
    for (first, last) in ranges {
        open = match open {
            Some((a, b)) if first <= b.saturating_add(1) => Some((a, b.max(last))),
            Some((a, b)) => {
                total = total.add(Count::range(a, b));
                Some((first, last))
            }
            None => Some((first, last)),
        };
    }
    if let Some((a, b)) = open {
        total = total.add(Count::range(a, b));
    }
    total
}

/// The share of a zone's addresses of one family that `destinations` cover
/// (prefixes of other families are left out of both).
pub(crate) fn address_share<'a>(
    zone: impl IntoIterator<Item = &'a IpNetwork>,
    destinations: impl IntoIterator<Item = IpNetwork>,
    v4: bool,
) -> Share {
    let of_family = |n: &IpNetwork| n.is_ipv4() == v4;
    Share {
        covered: union(destinations.into_iter().filter(of_family).map(bounds).collect()),
        total: union(zone.into_iter().copied().filter(of_family).map(bounds).collect()),
    }
}

/// The share of the port range (65536 ports, or 256 ICMP types if `icmp`)
/// that inclusive port ranges cover.
pub(crate) fn port_share(ports: impl IntoIterator<Item = (u16, u16)>, icmp: bool) -> Share {
    Share {
        covered: union(ports.into_iter().map(|(a, b)| (a as u128, b as u128)).collect()),
        total: Count::of(if icmp { 256 } else { 65536 }),
    }
}

/// Whether every address of `inner` is in `outer`.
pub(crate) fn within(inner: IpNetwork, outer: IpNetwork) -> bool {
    inner.is_ipv4() == outer.is_ipv4() && outer.prefix() <= inner.prefix() && outer.contains(inner.network())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(s: &[&str]) -> Vec<IpNetwork> {
        s.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn unions_are_exact_and_count_all_of_ipv6() {
        let zone = nets(&["10.0.0.0/8"]);
        // Two halves of a quarter, overlapping pieces and a duplicate: a quarter.
        let s = address_share(
            &zone,
            nets(&["10.0.0.0/11", "10.32.0.0/11", "10.0.0.0/12", "10.0.0.0/11"]),
            true,
        );
        assert_eq!(s.covered, Count::of(1 << 22));
        assert!(!s.above(25));
        assert!(s.above(24));
        // Adjacent ranges merge; one more address crosses.
        let s = address_share(&zone, nets(&["10.0.0.0/10", "10.64.0.0/32"]), true);
        assert!(s.above(25));
        // Both halves of IPv6: 2^128 addresses, the whole of ::/0.
        let all = nets(&["::/0"]);
        let s = address_share(&all, nets(&["::/1", "8000::/1"]), false);
        assert_eq!(s.covered, Count { high: 1, low: 0 });
        assert_eq!(s.covered, s.total);
        assert!(s.above(99));
        assert!(!s.above(100));
        assert_eq!(s.percent(), 100.0);
        // Families do not mix.
        let s = address_share(&nets(&["10.0.0.0/8", "fd00::/8"]), nets(&["fd00::/9"]), true);
        assert_eq!(s.covered, Count::default());
        assert_eq!(s.total, Count::of(1 << 24));
    }

    #[test]
    fn times_carries_into_the_high_part() {
        let all = Count { high: 1, low: 0 };
        assert_eq!(all.times(100), Count { high: 100, low: 0 });
        let max = Count::of(u128::MAX);
        // (2^128 - 1) * 4 = 3 * 2^128 + (2^128 - 4)
        assert_eq!(
            max.times(4),
            Count {
                high: 3,
                low: u128::MAX - 3
            }
        );
    }

    #[test]
    fn port_ranges_are_a_union() {
        assert!(port_share([(1, 65535)], false).above(25));
        assert!(!port_share([(0, 16383)], false).above(25));
        assert!(port_share([(0, 16383), (16384, 16384)], false).above(25));
        assert!(!port_share([(0, 100), (50, 16383), (0, 16383)], false).above(25));
        assert!(port_share([(0, 64)], true).above(25));
        assert!(!port_share([(0, 63)], true).above(25));
    }

    #[test]
    fn within_needs_the_whole_prefix() {
        let n = |s: &str| s.parse::<IpNetwork>().unwrap();
        assert!(within(n("10.1.0.0/16"), n("10.0.0.0/8")));
        assert!(within(n("10.0.0.0/8"), n("10.0.0.0/8")));
        assert!(!within(n("10.0.0.0/7"), n("10.0.0.0/8")));
        assert!(!within(n("11.0.0.0/16"), n("10.0.0.0/8")));
        assert!(!within(n("fd00::/16"), n("0.0.0.0/0")));
        assert!(within(n("fd00::/16"), n("::/0")));
    }
}
