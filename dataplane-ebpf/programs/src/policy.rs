//! Security-group evaluation: the longest matching remote prefix names an
//! identity; the identity's allowed (protocol, port block) set decides.
//!
//! The cost depends on the number of distinct prefix lengths and port-block
//! lengths in use, never on the number of rules: each step is a hash lookup.

use dataplane_common::{
    maps::{AddrKey, PolicyDirKey, PortInfo, RuleKey, CT_F_REVOKED, CT_ORIGIN_OUT, PORT_F_EGRESS_OPEN},
    DropReason, DIR_EGRESS, DIR_INGRESS, FAMILY_V4,
};

use crate::{
    maps::{count, CT, CT_SYN, POLICY_PLENS, SG_ADDR, SG_RULES},
    meta::{Meta, EMPTY_KEY, S_NEW, S_STALE, T_MAIN},
};

/// The policy stage (tier 4): the security groups of each local side whose
/// flow is new, and of each side whose flow was judged under an older
/// policy. A flow the rules no longer allow is marked revoked and stays
/// so until it times out: neither side's next packet can revive it.
#[inline(always)]
pub fn stage(m: &mut Meta) -> Result<(), DropReason> {
    let svc = m.service();
    let mut key = EMPTY_KEY;
    if m.ct_src == S_NEW {
        let port = m.src_port;
        if !allowed(&port, DIR_EGRESS, m.family, &m.dst, m.proto, svc) {
            return Err(DropReason::PolicyEgress);
        }
    } else if m.ct_src == S_STALE {
        let port = m.src_port;
        if !rejudge(&port, m.org_src, m.family, &m.dst, m.proto, m.svc_src) {
            m.src_key(&mut key);
            revoke(&key, m.tbl_src, port.epoch);
            return Err(DropReason::PolicyRevoked);
        }
        count(dataplane_common::Stat::CtRevalidated);
    }
    if m.ct_dst == S_NEW {
        let port = m.dst_port;
        if !allowed(&port, DIR_INGRESS, m.family, &m.src, m.proto, svc) {
            return Err(DropReason::PolicyIngress);
        }
    } else if m.ct_dst == S_STALE {
        let port = m.dst_port;
        if !rejudge(&port, m.org_dst, m.family, &m.src, m.proto, m.svc_dst) {
            m.dst_key(&mut key);
            revoke(&key, m.tbl_dst, port.epoch);
            return Err(DropReason::PolicyRevoked);
        }
        count(dataplane_common::Stat::CtRevalidated);
    }
    Ok(())
}

/// Judges a tracked flow again, in the direction it was opened.
#[inline(always)]
fn rejudge(port: &PortInfo, origin: u8, family: u8, remote: &[u8; 16], proto: u8, svc: u16) -> bool {
    let dir = if origin == CT_ORIGIN_OUT {
        DIR_EGRESS
    } else {
        DIR_INGRESS
    };
    allowed(port, dir, family, remote, proto, svc)
}

/// Marks a flow revoked under the current policy epoch.
#[inline(always)]
pub fn revoke(key: &dataplane_common::maps::CtKey, table: u8, epoch: u32) {
    let p = if table == T_MAIN {
        CT.get_ptr_mut(key)
    } else {
        CT_SYN.get_ptr_mut(key)
    };
    if let Some(p) = p {
        // SAFETY: a live map value.
        unsafe {
            (*p).flags |= CT_F_REVOKED;
            (*p).epoch = epoch;
        }
    }
}

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
