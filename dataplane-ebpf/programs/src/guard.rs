//! Stage 1: quarantine (tier 1), where the packet goes, the conntrack
//! lookup of every local side, and the zone guard (tier 2) for a new flow
//! across a zone uplink. Nothing is written here: a flow found live under
//! the current policy on every local side takes the fast path to the
//! commit stage; anything new goes on to the firewall and policy stages.

use aya_ebpf::programs::TcContext;
use dataplane_common::{
    maps::{
        ct_timeout, CtKey, CtValue, PortInfo, CT_F_CLOSING, CT_F_REVOKED, CT_ORIGIN_OUT, CT_TIMEOUT_SYN_NS, DOOR_HOST,
        DOOR_PEER, DOOR_VPC, DOOR_ZONE, EP_F_GATEWAY, EP_F_LOCAL_IS_A, EP_F_NAT, EP_F_PEER, EXCHANGE_MAX,
        PORT_F_QUARANTINED, PORT_F_REJECTED, PORT_F_UPLINK,
    },
    stage, DropReason, Stat, DIR_EGRESS, PROTO_TCP,
};

use crate::{
    commit::{self, Action},
    firewall::{halves, in_prefix},
    maps::{count, CONFIG, CT, CT_SYN, EXCHANGE, EXCHANGE_HALF},
    meta::{
        Meta, EMPTY_KEY, E_FROM_VM, E_NAT, K_IP, K_RELATED, O_NAT, O_PORT, O_TUNNEL, O_UPLINK, S_EST, S_NEW, S_NONE,
        S_STALE, T_MAIN, T_SYN, X_ZONE_IN, X_ZONE_OUT,
    },
    overlay::endpoint,
    parse::{icmp_inner, is_icmp_error, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    port,
    uplink::{uplink_of, zone_endpoint, zone_of},
};

/// A TCP packet that may open a flow: SYN and nothing else of the four.
#[inline(always)]
pub fn pure_syn(flags: u8) -> bool {
    flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN
}

/// What `judge` decided.
enum Judged {
    /// Go on to this stage.
    Stage(u32),
    /// Every local side's flow is live under the current policy: the
    /// entries found, to be brought up to date in place.
    Fast(Live, Live),
}

/// What the guard stage decided.
pub enum Next {
    /// Go on to this stage.
    Stage(u32),
    /// The packet of an established flow: its verdict is final here, its
    /// entries are brought up to date and it is sent on (the fast path).
    Done(Action),
}

/// The guard stage.
#[inline(always)]
pub fn guard(ctx: &mut TcContext, m: &mut Meta) -> Result<Next, DropReason> {
    let (src, dst) = match judge(ctx, m)? {
        Judged::Stage(idx) => return Ok(Next::Stage(idx)),
        Judged::Fast(src, dst) => (src, dst),
    };
    count(Stat::FastPath);
    commit::prepare(ctx, m)?;
    commit::refresh_live(m, src, dst)?;
    if m.out == O_NAT {
        // A member's reply to the NAT address: translated back there.
        return Ok(Next::Stage(stage::NAT_OUT));
    }
    Ok(Next::Done(commit::forward(ctx, m)?))
}

#[inline(always)]
fn judge(ctx: &TcContext, m: &mut Meta) -> Result<Judged, DropReason> {
    if (m.src_ifx != 0 && m.src_port.flags & PORT_F_QUARANTINED != 0)
        || (m.dst_ifx != 0 && m.dst_port.flags & PORT_F_QUARANTINED != 0)
    {
        return Err(DropReason::Quarantined);
    }
    if (m.src_ifx != 0 && m.src_port.flags & PORT_F_REJECTED != 0)
        || (m.dst_ifx != 0 && m.dst_port.flags & PORT_F_REJECTED != 0)
    {
        return Err(DropReason::UnknownPort);
    }
    if m.kind != K_IP {
        return Ok(Judged::Stage(stage::COMMIT));
    }
    if m.entry == E_FROM_VM {
        // A flow to a VIP gets its backend first: every tier then judges
        // the backend's address.
        if crate::lb::service(m).is_some() {
            return Ok(Judged::Stage(stage::LB));
        }
        resolve(m)?;
    }
    // (An ICMP error to a NAT address is not translated: `st_nat_out`
    // refuses it.)
    if is_icmp_error(m.proto, m.icmp_type) && m.out != O_NAT && related(ctx, m) {
        count(Stat::CtRelated);
        m.kind = K_RELATED;
        return Ok(Judged::Stage(stage::COMMIT));
    }
    let mut key = EMPTY_KEY;
    let mut src = Live::NONE;
    let mut dst = Live::NONE;
    if m.src_ifx != 0 {
        m.src_key(&mut key);
        let port = m.src_port;
        src = lookup(&key, &port, m.tcp_flags, m.now)?;
        (m.ct_src, m.tbl_src, m.org_src, m.svc_src) = (src.state, src.table, src.origin, src.svc);
    }
    if m.dst_ifx != 0 {
        m.dst_key(&mut key);
        let port = m.dst_port;
        dst = lookup(&key, &port, m.tcp_flags, m.now)?;
        (m.ct_dst, m.tbl_dst, m.org_dst, m.svc_dst) = (dst.state, dst.table, dst.origin, dst.svc);
    }
    let new = m.ct_src == S_NEW || m.ct_dst == S_NEW;
    // Nothing but a reply of a flow it received goes from a port to a NAT
    // address: no flow opens towards one.
    if m.out == O_NAT && m.ct_src == S_NEW {
        return Err(DropReason::NatNoFlow);
    }
    if new && m.proto == PROTO_TCP && !pure_syn(m.tcp_flags) {
        return Err(DropReason::CtNotSyn);
    }
    if !new && m.ct_src != S_STALE && m.ct_dst != S_STALE {
        if m.entry == E_NAT {
            // A north-south flow's writes and translation are the commit
            // stage's.
            return Ok(Judged::Stage(stage::COMMIT));
        }
        return Ok(Judged::Fast(src, dst));
    }
    // Tier 2, for a new flow across an uplink, and again for a flow judged
    // under an older configuration (an exchange path may be gone): a flow
    // it no longer admits is revoked.
    if m.crossing == X_ZONE_OUT {
        if m.ct_src == S_NEW {
            zone_guard(m.vm_zone, m.uplink_zone, m)?;
        } else if m.ct_src == S_STALE {
            let out = m.org_src == CT_ORIGIN_OUT;
            if let Err(r) = zone_guard_again(&m.src, &m.dst, out, m.svc_src, m) {
                m.src_key(&mut key);
                crate::policy::revoke(&key, m.tbl_src, m.src_port.epoch);
                return Err(r);
            }
        }
    }
    if m.crossing == X_ZONE_IN {
        if m.ct_dst == S_NEW {
            zone_guard(m.uplink_zone, m.vm_zone, m)?;
        } else if m.ct_dst == S_STALE {
            let out = m.org_dst == CT_ORIGIN_OUT;
            if let Err(r) = zone_guard_again(&m.dst, &m.src, out, m.svc_dst, m) {
                m.dst_key(&mut key);
                crate::policy::revoke(&key, m.tbl_dst, m.dst_port.epoch);
                return Err(r);
            }
        }
    }
    Ok(Judged::Stage(stage::FIREWALL))
}

/// Where a packet from a VM goes: a port here, another host through the
/// tunnel, or the uplink of the zone its destination is in.
#[inline(always)]
fn resolve(m: &mut Meta) -> Result<(), DropReason> {
    let port = m.src_port;
    let Some(ep) = endpoint(port.vni, m.family, &m.dst) else {
        // Outside the VPC: out of the uplink of the zone the destination
        // is in, if the VPC has a zone.
        if port.flags & PORT_F_UPLINK == 0 {
            return Err(DropReason::NoRoute);
        }
        let z = zone_of(m.family, &m.dst);
        let uplink = uplink_of(z).ok_or(DropReason::NoRoute)?;
        let me = zone_endpoint(m.family, &m.src).ok_or(DropReason::NoRoute)?;
        m.src_door = DOOR_ZONE | z;
        m.uplink_zone = z;
        m.vm_zone = me.zone;
        m.fw_policy = me.border;
        m.fw_dir = DIR_EGRESS;
        m.fw_remote_is_src = 0;
        m.crossing = X_ZONE_OUT;
        m.out = O_UPLINK;
        m.out_ifx = uplink;
        return Ok(());
    };
    if ep.flags & EP_F_GATEWAY != 0 || ep.ifindex == m.src_ifx {
        return Err(DropReason::NoRoute);
    }
    if ep.flags & EP_F_NAT != 0 {
        // This host's NAT address: a member's reply of a north-south flow,
        // translated back after the pipeline (`st_nat_out`).
        m.src_door = DOOR_VPC | port.vni;
        m.nat_vni = port.vni;
        m.out = O_NAT;
        return Ok(());
    }
    m.dst_mac = ep.mac;
    let peer = ep.flags & EP_F_PEER != 0;
    m.src_door = if peer { DOOR_PEER | ep.vni } else { DOOR_VPC | port.vni };
    if ep.ifindex != 0 {
        m.dst_ifx = ep.ifindex;
        m.dst_port = port::port(ep.ifindex)?;
        m.out = O_PORT;
        m.out_ifx = ep.ifindex;
        if peer {
            m.dst_door = DOOR_PEER | port.vni;
            if ep.policy != 0 {
                // `ep` is keyed by the sender's VNI.
                crate::overlay::peer_firewall(m, ep.policy, ep.flags & EP_F_LOCAL_IS_A == 0);
            }
        } else {
            m.dst_door = DOOR_VPC | port.vni;
        }
        return Ok(());
    }
    // A peer's address lives in its own VPC: the receiver checks it there.
    into_tunnel(m, if peer { ep.vni } else { port.vni }, ep.host_v4)
}

/// Sends the packet through the tunnel, in VNI `vni`, to the host `remote`.
#[inline(always)]
pub fn into_tunnel(m: &mut Meta, vni: u32, remote: [u8; 4]) -> Result<(), DropReason> {
    let vxlan = CONFIG.get(0).map(|c| c.vxlan_ifindex).unwrap_or(0);
    if vxlan == 0 {
        return Err(DropReason::NoRoute);
    }
    m.out = O_TUNNEL;
    m.out_ifx = vxlan;
    m.tun_vni = vni;
    m.tun_remote = remote;
    Ok(())
}

/// One local side's entry as the guard found it.
#[derive(Clone, Copy)]
pub struct Live {
    pub state: u8,
    pub table: u8,
    pub origin: u8,
    pub svc: u16,
    /// The entry in its table (null when there is none). Only the stage
    /// that looked it up uses it.
    pub v: *mut CtValue,
}

impl Live {
    pub const NONE: Live = Live {
        state: S_NONE,
        table: 0,
        origin: 0,
        svc: 0,
        v: core::ptr::null_mut(),
    };
    const NEW: Live = Live {
        state: S_NEW,
        ..Live::NONE
    };
}

/// A live entry of either table, and how it stands against the port's
/// current policy.
#[inline(always)]
fn lookup(key: &CtKey, port: &PortInfo, tcp_flags: u8, now: u64) -> Result<Live, DropReason> {
    if let Some(p) = CT.get_ptr_mut(key) {
        // SAFETY: a live map value, read field by field.
        let (seen, flags) = unsafe { ((*p).last_seen_ns, (*p).flags) };
        if now.saturating_sub(seen) <= ct_timeout(key.proto, flags) {
            // A fresh SYN on a closing connection opens a new one, which
            // replaces the entry.
            if key.proto == PROTO_TCP && flags & CT_F_CLOSING != 0 && pure_syn(tcp_flags) {
                return Ok(Live {
                    table: T_MAIN,
                    ..Live::NEW
                });
            }
            return classify(p, port, T_MAIN);
        }
    }
    if let Some(p) = CT_SYN.get_ptr_mut(key) {
        // SAFETY: a live map value, read field by field.
        let (seen, flags) = unsafe { ((*p).last_seen_ns, (*p).flags) };
        if now.saturating_sub(seen) <= unconfirmed_timeout(key.proto, flags) {
            return classify(p, port, T_SYN);
        }
    }
    Ok(Live::NEW)
}

#[inline(always)]
fn classify(p: *mut CtValue, port: &PortInfo, table: u8) -> Result<Live, DropReason> {
    // SAFETY: a live map value, read field by field.
    let (flags, epoch, origin, svc) = unsafe { ((*p).flags, (*p).epoch, (*p).origin, (*p).svc) };
    // Revoked stays revoked until the entry times out, whatever the
    // policy says since.
    if flags & CT_F_REVOKED != 0 {
        return Err(DropReason::PolicyRevoked);
    }
    let state = if epoch != port.epoch { S_STALE } else { S_EST };
    Ok(Live {
        state,
        table,
        origin,
        svc,
        v: p,
    })
}

/// The idle timeout of an unconfirmed flow.
#[inline(always)]
fn unconfirmed_timeout(proto: u8, flags: u8) -> u64 {
    if proto == PROTO_TCP {
        CT_TIMEOUT_SYN_NS
    } else {
        ct_timeout(proto, flags)
    }
}

/// A live, unrevoked entry in either table.
#[inline(always)]
fn tracked(key: &CtKey, now: u64) -> bool {
    // SAFETY: the values are copied out at once.
    if let Some(v) = unsafe { CT.get(key) }.copied() {
        return v.flags & CT_F_REVOKED == 0 && now.saturating_sub(v.last_seen_ns) <= ct_timeout(key.proto, v.flags);
    }
    if let Some(v) = unsafe { CT_SYN.get(key) }.copied() {
        return v.flags & CT_F_REVOKED == 0
            && now.saturating_sub(v.last_seen_ns) <= unconfirmed_timeout(key.proto, v.flags);
    }
    false
}

/// Whether an ICMP error concerns a tracked flow of every local side, and
/// comes through that flow's door. A VM reports only a packet it received,
/// to the flow's remote end. A VM hears a report about a packet it sent;
/// inside a VPC or a peering, only from that packet's destination (there
/// are no routers between VMs); from a zone or the host, from a router on
/// the way too.
#[inline(always)]
fn related(ctx: &TcContext, m: &Meta) -> bool {
    let Some(inner) = icmp_inner(ctx, m) else {
        return false;
    };
    let mut k = EMPTY_KEY;
    k.family = m.family;
    k.proto = inner.proto;
    k.icmp = inner.icmp;
    if m.src_ifx != 0 {
        if inner.dst != m.src || inner.src != m.dst {
            return false;
        }
        k.ifindex = m.src_ifx;
        k.local_port = inner.dport;
        k.remote_port = inner.sport;
        k.local = inner.dst;
        k.remote = inner.src;
        k.door = m.src_door;
        if !tracked(&k, m.now) {
            return false;
        }
    }
    if m.dst_ifx != 0 {
        if inner.src != m.dst {
            return false;
        }
        let door = m.dst_door & 0xff00_0000;
        if door != DOOR_ZONE && door != DOOR_HOST && m.src != inner.dst {
            return false;
        }
        k.ifindex = m.dst_ifx;
        k.local_port = inner.sport;
        k.remote_port = inner.dport;
        k.local = inner.src;
        k.remote = inner.dst;
        k.door = m.dst_door;
        if !tracked(&k, m.now) {
            return false;
        }
    }
    true
}

/// Tier 2: between two zones, only what an exchange path admits.
#[inline(always)]
fn zone_guard(from: u32, to: u32, m: &Meta) -> Result<(), DropReason> {
    exchange_admits(from, to, m.family, m.proto, &m.src, &m.dst, m.service())
}

/// Tier 2 for a flow judged under an older configuration: the crossing as
/// it was opened (from outside: from the uplink's zone to the VM's, the
/// remote end as the source), with the service it was opened for.
#[inline(always)]
fn zone_guard_again(vm: &[u8; 16], remote: &[u8; 16], opened_out: bool, svc: u16, m: &Meta) -> Result<(), DropReason> {
    if opened_out {
        exchange_admits(m.vm_zone, m.uplink_zone, m.family, m.proto, vm, remote, svc)
    } else {
        exchange_admits(m.uplink_zone, m.vm_zone, m.family, m.proto, remote, vm, svc)
    }
}

#[inline(always)]
pub fn exchange_admits(
    from: u32,
    to: u32,
    family: u8,
    proto: u8,
    src: &[u8; 16],
    dst: &[u8; 16],
    svc: u16,
) -> Result<(), DropReason> {
    if from == to {
        return Ok(());
    }
    let (src, dst) = (halves(src), halves(dst));
    // The half in force, read once: the list is judged whole, old or new.
    // (Arithmetic, not a branch: the verifier walks the loop once for both.)
    let base = (EXCHANGE_HALF.get(0).copied().unwrap_or(0) & 1) * EXCHANGE_MAX;
    for i in 0..EXCHANGE_MAX {
        let Some(r) = EXCHANGE.get(base + i) else { break };
        if r.from == 0 {
            break;
        }
        if r.from == from
            && r.to == to
            && r.family == family
            && r.proto == proto
            && svc >= r.port_lo
            && svc <= r.port_hi
            && in_prefix(src, halves(&r.src), r.src_plen)
            && in_prefix(dst, halves(&r.dst), r.dst_plen)
        {
            count(Stat::Exchanged);
            return Ok(());
        }
    }
    Err(DropReason::ZoneIsolation)
}
