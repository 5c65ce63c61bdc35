//! Per-port connection tracking. Keys are normalised to the port (`local` is
//! the VM), so both directions of a flow find the same entry.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use dataplane_common::{
    maps::{
        CtKey, CtValue, PortInfo, CT_F_CLOSING, CT_ORIGIN_OUT, CT_TIMEOUT_CLOSING_NS, CT_TIMEOUT_OTHER_NS,
        CT_TIMEOUT_TCP_NS, CT_TIMEOUT_UDP_NS,
    },
    DropReason, Stat, DIR_EGRESS, DIR_INGRESS, PROTO_TCP, PROTO_UDP,
};

use crate::{
    maps::{count, CT},
    parse::{Ip, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    policy,
};

/// The key of the flow of `ip` as the VM port `ifindex` sees it: `local` is
/// the VM, which is the packet's source when `vm_is_src`, else its
/// destination.
#[inline(always)]
pub fn key(ifindex: u32, ip: &Ip, vm_is_src: bool) -> CtKey {
    let (local, remote, local_port, remote_port) = if vm_is_src {
        (ip.src, ip.dst, ip.sport, ip.dport)
    } else {
        (ip.dst, ip.src, ip.dport, ip.sport)
    };
    CtKey {
        ifindex,
        family: ip.family,
        proto: ip.proto,
        _pad: [0; 2],
        local_port,
        remote_port,
        local,
        remote,
    }
}

/// What conntrack made of a packet.
pub enum Ct {
    /// Part of a tracked flow that is still allowed.
    Established,
    /// No live entry: the rules must decide.
    New,
}

#[inline(always)]
fn timeout(proto: u8, flags: u8) -> u64 {
    match proto {
        PROTO_TCP if flags & CT_F_CLOSING != 0 => CT_TIMEOUT_CLOSING_NS,
        PROTO_TCP => CT_TIMEOUT_TCP_NS,
        PROTO_UDP => CT_TIMEOUT_UDP_NS,
        _ => CT_TIMEOUT_OTHER_NS,
    }
}

/// Looks the flow up and, when found, accounts the packet. `outbound` is true
/// for packets the VM sends. A flow judged under an older policy epoch is
/// judged again; a flow the rules no longer allow is removed and dropped.
#[inline(always)]
pub fn lookup(key: &CtKey, port: &PortInfo, outbound: bool, tcp_flags: u8, len: u32) -> Result<Ct, DropReason> {
    let Some(p) = CT.get_ptr_mut(key) else {
        return Ok(Ct::New);
    };
    // SAFETY: the map value stays valid for this program run; racing updates
    // from another CPU only affect counters.
    let v = unsafe { &mut *p };
    let now = unsafe { bpf_ktime_get_ns() };
    if now.saturating_sub(v.last_seen_ns) > timeout(key.proto, v.flags) {
        return Ok(Ct::New);
    }
    // A fresh SYN on a closing TCP entry starts a new connection.
    if key.proto == PROTO_TCP && v.flags & CT_F_CLOSING != 0 && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        return Ok(Ct::New);
    }
    if v.epoch != port.epoch {
        let ok = if v.origin == CT_ORIGIN_OUT {
            policy::allowed(port, DIR_EGRESS, key.family, &key.remote, key.proto, v.svc)
        } else {
            policy::allowed(port, DIR_INGRESS, key.family, &key.remote, key.proto, v.svc)
        };
        if !ok {
            let _ = CT.remove(key);
            return Err(DropReason::PolicyRevoked);
        }
        v.epoch = port.epoch;
        count(Stat::CtRevalidated);
    }
    v.last_seen_ns = now;
    if outbound {
        v.packets_out += 1;
        v.bytes_out += len as u64;
    } else {
        v.packets_in += 1;
        v.bytes_in += len as u64;
    }
    if key.proto == PROTO_TCP && tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        v.flags |= CT_F_CLOSING;
    }
    count(Stat::CtHit);
    Ok(Ct::Established)
}

/// Records a flow the rules just allowed.
#[inline(always)]
pub fn create(key: &CtKey, port: &PortInfo, origin: u8, svc: u16, tcp_flags: u8, len: u32) {
    let now = unsafe { bpf_ktime_get_ns() };
    let outbound = origin == CT_ORIGIN_OUT;
    let v = CtValue {
        created_ns: now,
        last_seen_ns: now,
        packets_out: outbound as u64,
        packets_in: (!outbound) as u64,
        bytes_out: if outbound { len as u64 } else { 0 },
        bytes_in: if outbound { 0 } else { len as u64 },
        epoch: port.epoch,
        origin,
        flags: if key.proto == PROTO_TCP && tcp_flags & (TCP_FIN | TCP_RST) != 0 {
            CT_F_CLOSING
        } else {
            0
        },
        svc,
    };
    // A full LRU map evicts its oldest entry; an insert error leaves the
    // packet allowed (the rules allowed it) but untracked.
    let _ = CT.insert(key, &v, 0);
    count(Stat::CtNew);
}
