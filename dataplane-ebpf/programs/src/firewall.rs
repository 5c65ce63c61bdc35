//! Administrators' firewall policies (policy tier 3): ordered allow/deny
//! rules checked one by one, first match wins, then the policy's default.
//! Each verdict is recorded for its flow with the rule that decided it.

use dataplane_common::maps::{CtKey, FwVerdict, FW_ALLOW, FW_POLICY_RULES_MAX};

use crate::{
    maps::{FW_POLICIES, FW_RULES, FW_VERDICTS},
    parse::Ip,
};

#[inline(always)]
pub fn halves(a: &[u8; 16]) -> (u64, u64) {
    (
        u64::from_be_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]),
        u64::from_be_bytes([a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]]),
    )
}

#[inline(always)]
pub fn in_prefix(addr: (u64, u64), net: (u64, u64), plen: u8) -> bool {
    let p = plen as u32;
    let mh = if p >= 64 {
        !0u64
    } else if p == 0 {
        0
    } else {
        !0u64 << (64 - p)
    };
    let ml = if p <= 64 {
        0
    } else if p >= 128 {
        !0u64
    } else {
        !0u64 << (128 - p)
    };
    addr.0 & mh == net.0 & mh && addr.1 & ml == net.1 & ml
}

/// Whether policy `policy` lets the packet through, matching rules of
/// direction `dir` against the outside address `remote`. The verdict is
/// recorded under `key`, the flow as the VM port sees it.
#[inline(always)]
pub fn allows(policy: u32, key: &CtKey, remote: &[u8; 16], ip: &Ip, dir: u8) -> bool {
    // SAFETY: the value is copied out at once.
    let Some(p) = (unsafe { FW_POLICIES.get(&policy) }).copied() else {
        // A policy that should be there and is not: fail closed.
        return false;
    };
    let rem = halves(remote);
    let svc = ip.service();
    let mut action = p.default_action;
    let mut rule_id = p.default_rule_id;
    for i in 0..FW_POLICY_RULES_MAX {
        if i >= p.count {
            break;
        }
        let Some(r) = FW_RULES.get(p.first + i) else { break };
        if r.dir == dir
            && r.family == ip.family
            && (r.proto == 0 || r.proto == ip.proto)
            && (r.proto == 0 || (svc >= r.port_lo && svc <= r.port_hi))
            && in_prefix(rem, halves(&r.addr), r.plen)
        {
            action = r.action;
            rule_id = r.rule_id;
            break;
        }
    }
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() };
    match FW_VERDICTS.get_ptr_mut(key) {
        // SAFETY: a live map value; racing updates only lose counts.
        Some(v) if unsafe { (*v).rule_id == rule_id } => unsafe {
            (*v).packets += 1;
            (*v).last_ns = now;
        },
        _ => {
            let v = FwVerdict {
                rule_id,
                action,
                dir,
                _pad: [0; 2],
                packets: 1,
                last_ns: now,
            };
            let _ = FW_VERDICTS.insert(key, &v, 0);
        }
    }
    action == FW_ALLOW
}
