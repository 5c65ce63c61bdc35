//! Security-group evaluation: the longest matching remote prefix names an
//! identity; the identity's allowed (protocol, port block) set decides.
//!
//! The cost depends on the number of distinct prefix lengths and port-block
//! lengths in use, never on the number of rules: each step is a hash lookup.

use dataplane_common::{
    maps::{AddrKey, PolicyDirKey, PortInfo, RuleKey, PORT_F_EGRESS_OPEN},
    DIR_EGRESS, FAMILY_V4,
};

use crate::maps::{POLICY_PLENS, SG_ADDR, SG_RULES};

/// Whether the port's rules allow a flow with `remote` as peer.
#[inline(always)]
pub fn allowed(port: &PortInfo, dir: u8, family: u8, remote: &[u8; 16], proto: u8, svc: u16) -> bool {
    if dir == DIR_EGRESS && port.flags & PORT_F_EGRESS_OPEN != 0 {
        return true;
    }
    let pk = PolicyDirKey {
        policy_id: port.policy_id,
        dir,
        family,
        _pad: [0; 2],
    };
    // SAFETY: read-only map value used only within this call.
    let Some(lens) = (unsafe { POLICY_PLENS.get(&pk) }) else {
        return false;
    };
    let hi = u64::from_be_bytes([
        remote[0], remote[1], remote[2], remote[3], remote[4], remote[5], remote[6], remote[7],
    ]);
    let lo = u64::from_be_bytes([
        remote[8], remote[9], remote[10], remote[11], remote[12], remote[13], remote[14], remote[15],
    ]);
    let max_plen: u32 = if family == FAMILY_V4 { 32 } else { 128 };
    let mut key = AddrKey {
        policy_id: port.policy_id,
        dir,
        family,
        plen: 0,
        _pad: 0,
        addr: [0; 16],
    };
    let mut word: i32 = 2;
    while word >= 0 {
        let mut bits = lens.bits[(word & 3) as usize];
        // At most 64 set bits per word; each pass clears the highest one.
        for _ in 0..64 {
            if bits == 0 {
                break;
            }
            let b = 63 - bits.leading_zeros();
            bits &= !(1u64 << b);
            let plen = (word as u32) * 64 + b;
            if plen > max_plen {
                continue;
            }
            let (mh, ml) = masked(hi, lo, plen);
            key.plen = plen as u8;
            key.addr[..8].copy_from_slice(&mh.to_be_bytes());
            key.addr[8..].copy_from_slice(&ml.to_be_bytes());
            // SAFETY: read-only map value used only within this call.
            if let Some(id) = unsafe { SG_ADDR.get(&key) } {
                // The longest matching prefix carries the union of every
                // rule whose prefix contains it: it alone decides.
                return service_allowed(id.identity, id.port_plens, id.any_proto, proto, svc);
            }
        }
        word -= 1;
    }
    false
}

/// Masks an address (as two big-endian halves) to `plen` bits. IPv4 lives in
/// the top 32 bits of `hi`.
#[inline(always)]
fn masked(hi: u64, lo: u64, plen: u32) -> (u64, u64) {
    let bits = plen;
    let mh = if bits >= 64 {
        hi
    } else if bits == 0 {
        0
    } else {
        hi & (!0u64 << (64 - bits))
    };
    let ml = if bits >= 128 {
        lo
    } else if bits <= 64 {
        0
    } else {
        lo & (!0u64 << (128 - bits))
    };
    (mh, ml)
}

#[inline(always)]
fn service_allowed(identity: u32, port_plens: u32, any_proto: u8, proto: u8, svc: u16) -> bool {
    if any_proto != 0 {
        return true;
    }
    let mut bits = port_plens & 0x1ffff;
    let mut key = RuleKey {
        identity,
        proto,
        port_plen: 0,
        port: 0,
    };
    for _ in 0..17 {
        if bits == 0 {
            break;
        }
        let b = 31 - bits.leading_zeros();
        bits &= !(1u32 << b);
        let mask: u32 = if b == 0 { 0 } else { (0xffffu32 << (16 - b)) & 0xffff };
        key.port_plen = b as u8;
        key.port = (svc as u32 & mask) as u16;
        // SAFETY: presence check only.
        if unsafe { SG_RULES.get(&key) }.is_some() {
            return true;
        }
    }
    false
}
