//! Administrators' firewall policies (policy tier 3): ordered allow/deny
//! rules checked one by one, first match wins, then the policy's default.
//! Each verdict is recorded for its flow with the rule that decided it.

use dataplane_common::{
    maps::{CtKey, FwVerdict, CT_ORIGIN_IN, CT_ORIGIN_OUT, FW_ALLOW, FW_DENY, FW_POLICY_RULES_MAX},
    DropReason, DIR_EGRESS, DIR_INGRESS,
};

use crate::{
    maps::{FW_POLICIES, FW_RULES, FW_VERDICTS},
    meta::{Meta, EMPTY_KEY, S_NEW, S_STALE, X_PEER, X_ZONE_IN, X_ZONE_OUT},
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

/// The firewall stage (tier 3): the border firewall of a new flow across
/// an uplink, the VPC firewall of a new flow from a peered VPC. A deny is
/// the packet's final verdict and is recorded as such; an allow is
/// recorded by the commit stage, once every tier has allowed the packet.
#[inline(always)]
pub fn stage(m: &mut Meta) -> Result<(), DropReason> {
    // The crossing side's state, who opened its flow and for what service.
    let (state, origin, svc) = match m.crossing {
        X_ZONE_OUT => (m.ct_src, m.org_src, m.svc_src),
        X_ZONE_IN | X_PEER => (m.ct_dst, m.org_dst, m.svc_dst),
        _ => return Ok(()),
    };
    if (state != S_NEW && state != S_STALE) || m.fw_policy == 0 {
        return Ok(());
    }
    let mut remote = if m.fw_remote_is_src != 0 { m.src } else { m.dst };
    let mut dir = m.fw_dir;
    let svc = if state == S_NEW { m.service() } else { svc };
    if state == S_STALE {
        // Judged again as the flow was opened: if the VM opened it (a
        // border: egress; a peering: the other way round), direction and
        // remote end are those of its first packet, not of this one.
        let opened_here = match m.crossing {
            X_ZONE_OUT => origin == CT_ORIGIN_OUT,
            _ => origin == CT_ORIGIN_IN,
        };
        if !opened_here {
            dir = if dir == DIR_INGRESS { DIR_EGRESS } else { DIR_INGRESS };
            if m.crossing == X_PEER {
                remote = if m.fw_remote_is_src != 0 { m.dst } else { m.src };
            }
        }
        m.fw_dir = dir;
    }
    let (action, rule) = evaluate(m.fw_policy, &remote, m, dir, svc);
    m.fw_action = action;
    m.fw_rule = rule;
    m.fw_record = 1;
    if action == FW_ALLOW {
        return Ok(());
    }
    let mut key = EMPTY_KEY;
    crossing_key(m, &mut key);
    record(&key, m);
    if state == S_STALE {
        let (table, epoch) = if m.crossing == X_ZONE_OUT {
            (m.tbl_src, m.src_port.epoch)
        } else {
            (m.tbl_dst, m.dst_port.epoch)
        };
        crate::policy::revoke(&key, table, epoch);
    }
    Err(if m.crossing == X_PEER {
        DropReason::VpcFirewall
    } else {
        DropReason::BorderFirewall
    })
}

/// The flow key of the side whose crossing the firewall judged.
#[inline(always)]
pub fn crossing_key(m: &Meta, key: &mut CtKey) {
    if m.crossing == X_ZONE_OUT {
        m.src_key(key)
    } else {
        m.dst_key(key)
    }
}

/// The action and rule of policy `policy` for the packet, matching rules
/// of direction `dir` against the address `remote`; the policy's default
/// when no rule matches. A policy that should be there and is not denies.
#[inline(always)]
pub fn evaluate(policy: u32, remote: &[u8; 16], m: &Meta, dir: u8, svc: u16) -> (u8, u32) {
    // SAFETY: the value is copied out at once.
    let Some(p) = (unsafe { FW_POLICIES.get(&policy) }).copied() else {
        return (FW_DENY, 0);
    };
    let rem = halves(remote);
    for i in 0..FW_POLICY_RULES_MAX {
        if i >= p.count {
            break;
        }
        let Some(r) = FW_RULES.get(p.first + i) else { break };
        if r.dir == dir
            && r.family == m.family
            && (r.proto == 0 || r.proto == m.proto)
            && (r.proto == 0 || (svc >= r.port_lo && svc <= r.port_hi))
            && in_prefix(rem, halves(&r.addr), r.plen)
        {
            return (r.action, r.rule_id);
        }
    }
    (p.default_action, p.default_rule_id)
}

/// Records the firewall verdict of the flow `key`.
#[inline(always)]
pub fn record(key: &CtKey, m: &Meta) {
    let now = m.now;
    match FW_VERDICTS.get_ptr_mut(key) {
        // SAFETY: a live map value; racing updates only lose counts.
        Some(v) if unsafe { (*v).rule_id == m.fw_rule } => unsafe {
            (*v).packets += 1;
            (*v).last_ns = now;
        },
        _ => {
            let v = FwVerdict {
                rule_id: m.fw_rule,
                action: m.fw_action,
                dir: m.fw_dir,
                _pad: [0; 2],
                packets: 1,
                last_ns: now,
            };
            let _ = FW_VERDICTS.insert(key, &v, 0);
        }
    }
}
