//! The L4 load balancer, north-south: full NAT on a load balancer's NAT
//! hosts. A flow from a zone to a VIP exposed to it arrives on the zone's
//! uplink of a NAT host, which
//! - judges every packet from the zone by the zone guard (tier 2: from
//!   another zone, only through an exchange path to the VIP) and the
//!   VPC's border firewall (tier 3), in `st_nat_in`;
//! - gives a new flow its member as the east-west translation does (the
//!   same services, tables and schedulers) and a NAT port of its own
//!   address in the VPC, in `st_nat_lb` ([`schedule`]);
//! - sends it into the VPC from its NAT address: the member's security
//!   groups, quarantine and conntrack judge it where the member lives
//!   (through the pipeline here, or on the member's host after the
//!   tunnel);
//! - translates the member's replies, which come back to the NAT address
//!   (from the tunnel or from a port here), back to the VIP and the client
//!   and sends them out of the uplink the flow came in by ([`outbound`],
//!   in `st_nat_out`).
//!
//! The flow's own state is written in `st_nat_commit` ([`commit`]), after
//! `st_commit` wrote the member's side: a packet any tier drops leaves no
//! flow behind. (A refusal in `st_nat_commit` itself, a race for a NAT
//! port or full tables, leaves the member's unconfirmed conntrack entry,
//! which times out as any unanswered flow's does.)

use aya_ebpf::programs::TcContext;
use dataplane_common::{
    lb::{
        nat_port_hash, nat_secret, nat_timeout, NatFlow, NatKey, NatPickupKey, NatReverseKey, NatService,
        NatServiceKey, NatSyncEvent, LB_BACKENDS, LB_FLOW_CLOSED, LB_FLOW_OPEN, NAT_CLOSE_WINDOW, NAT_F_ACKED,
        NAT_F_CLOSING, NAT_F_FIN_IN, NAT_F_FIN_OUT, NAT_F_PICKUP, NAT_F_REPLIED, NAT_PICKUP_HOLD_NS, NAT_PICKUP_SLACK,
        NAT_PORT_FIRST, NAT_PORT_TRIES, NAT_SVC_F_LEASE, SCHED_TABLE_HASH,
    },
    maps::{CtKey, DOOR_VPC, DOOR_ZONE, EP_F_GATEWAY, EP_F_NAT, EP_F_PEER, FW_ALLOW},
    DropReason, Stat, DIR_INGRESS, PROTO_TCP, PROTO_UDP,
};

use crate::{
    commit::{set_macs, Action},
    firewall,
    guard::{exchange_admits, pure_syn},
    lb,
    maps::{
        count, LB_CONNS, LB_CURSOR, NAT_FLOWS, NAT_FLOWS_NEW, NAT_PICKUP, NAT_REVERSE, NAT_REVERSE_NEW, NAT_SEED,
        NAT_SERVICES, NAT_SYNC,
    },
    meta::{Meta, E_NAT, K_IP, LB_EST, LB_EST_NEW, LB_NEW, LB_NONE, LB_NO_CURSOR, LB_PICKUP, O_PORT, O_TUNNEL, X_NONE},
    overlay::endpoint,
    parse::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    port,
    uplink::{uplink_of, zone_endpoint},
};

const BPF_NOEXIST: u64 = 1;

/// The north-south service a packet from an uplink goes to, if its
/// destination is a VIP this host translates for.
#[inline(always)]
pub fn service(m: &Meta) -> Option<NatService> {
    if m.proto != PROTO_TCP && m.proto != PROTO_UDP {
        return None;
    }
    let key = NatServiceKey {
        family: m.family,
        proto: m.proto,
        port: m.dport,
        addr: m.dst,
    };
    // SAFETY: the value is copied out at once.
    unsafe { NAT_SERVICES.get(&key) }.copied()
}

/// A packet from zone `zone` for service `ns`, whose source passed the
/// uplink's checks.
#[inline(always)]
pub fn arrive(m: &mut Meta, zone: u32, ns: &NatService) {
    m.uplink_zone = zone;
    m.nat_vni = ns.vni;
    m.crossing = X_NONE;
    m.kind = K_IP;
}

/// The flow key of a packet from the zone (before its translation).
#[inline(always)]
fn outside_key(m: &Meta) -> NatKey {
    NatKey {
        zone: m.uplink_zone,
        family: m.family,
        proto: m.proto,
        client_port: m.sport,
        vport: m.dport,
        _pad: 0,
        client: m.src,
        vip: m.dst,
    }
}

/// The same, once the packet is set for the VPC (the client and the VIP
/// are kept aside).
#[inline(always)]
fn flow_key(m: &Meta) -> NatKey {
    NatKey {
        zone: m.uplink_zone,
        family: m.family,
        proto: m.proto,
        client_port: m.nat_cport,
        vport: m.lb_vport,
        _pad: 0,
        client: m.nat_client,
        vip: m.lb_vip,
    }
}

/// The flow key the firewall's verdicts of a north-south flow are kept
/// under: the uplink, the VIP and the client, the zone's door.
#[inline(always)]
fn verdict_key(m: &Meta, vip: &[u8; 16], vport: u16, client: &[u8; 16], cport: u16) -> CtKey {
    CtKey {
        ifindex: m.in_ifx,
        family: m.family,
        proto: m.proto,
        icmp: 0,
        _pad: 0,
        local_port: vport,
        remote_port: cport,
        local: *vip,
        remote: *client,
        door: DOOR_ZONE | m.uplink_zone,
    }
}

/// `st_nat_in`: the zone guard and the border firewall, for every packet
/// from the zone (so a path or rule taken away cuts the flows it let in
/// at their next packet, as it refuses new ones).
#[inline(always)]
pub fn admit(m: &mut Meta) -> Result<(), DropReason> {
    let ns = service(m).ok_or(DropReason::NoRoute)?;
    // The VPC's zone and border firewall, as its zone endpoints hold them
    // (the NAT address is one).
    let ep = zone_endpoint(m.family, &ns.nat).ok_or(DropReason::NoRoute)?;
    m.vm_zone = ep.zone;
    exchange_admits(m.uplink_zone, ep.zone, m.family, m.proto, &m.src, &m.dst, m.dport)?;
    if ep.border != 0 {
        let (action, rule) = firewall::evaluate(ep.border, &m.src, m, DIR_INGRESS, m.dport);
        m.fw_action = action;
        m.fw_rule = rule;
        m.fw_dir = DIR_INGRESS;
        if action != FW_ALLOW {
            let key = verdict_key(m, &m.dst, m.dport, &m.src, m.sport);
            firewall::record(&key, m);
            return Err(DropReason::BorderFirewall);
        }
        m.fw_record = 1;
    }
    Ok(())
}

/// In `st_lb`: the flow's member and NAT port, or a new flow's; then the
/// packet is set for its way into the VPC, from the NAT address to the
/// member, and the guard judges it there.
#[inline(always)]
pub fn schedule(m: &mut Meta) -> Result<(), DropReason> {
    let ns = service(m).ok_or(DropReason::NoRoute)?;
    let key = outside_key(m);
    let syn = m.proto == PROTO_TCP && pure_syn(m.tcp_flags);
    // A confirmed flow keeps its member; an unconfirmed one keeps it too
    // (a retransmitted SYN goes where the first did).
    // Unlike east-west (a VM cannot forge its source), a SYN on a
    // confirmed flow's tuple from a zone may be forged: it opens a new
    // flow only once both sides have closed the old one, or the old one is
    // dead (timed out, its member gone); until then it is dropped.
    let confirmed = NAT_FLOWS.get_ptr(&key);
    if let Some(p) = confirmed {
        // SAFETY: a live map value, read field by field.
        let (flags, seen, service, vni, slot, backend, backend_port) = unsafe {
            (
                (*p).flags,
                (*p).last_seen_ns,
                (*p).service,
                (*p).vni,
                (*p).slot,
                (*p).backend,
                (*p).backend_port,
            )
        };
        let both = NAT_F_FIN_IN | NAT_F_FIN_OUT;
        if syn
            && flags & both != both
            && m.now.saturating_sub(seen) <= nat_timeout(m.proto, flags, true)
            && service == ns.lb.id
            && vni == ns.vni
            && lb::holds(ns.lb.id, slot, &backend, backend_port)
        {
            return Err(DropReason::NatSynOnFlow);
        }
    }
    let confirmed = confirmed.filter(|_| !syn);
    let found = match confirmed {
        Some(p) => Some((p, LB_EST)),
        None => NAT_FLOWS_NEW.get_ptr(&key).map(|p| (p, LB_EST_NEW)),
    };
    let mut known = None;
    if let Some((p, state)) = found {
        // SAFETY: a live map value, read field by field.
        let (service, vni, slot, backend, backend_port, seen, flags, created) = unsafe {
            (
                (*p).service,
                (*p).vni,
                (*p).slot,
                (*p).backend,
                (*p).backend_port,
                (*p).last_seen_ns,
                (*p).flags,
                (*p).created_ns,
            )
        };
        // A SYN on the tuple of a flow picked up and not answered (perhaps
        // a zone's host forged the segment that picked it up) opens a new
        // one; but not at once, so that a forged SYN cannot end a flow
        // being picked up.
        let forged = syn && flags & NAT_F_PICKUP != 0;
        if forged && m.now.saturating_sub(created) < NAT_PICKUP_HOLD_NS {
            return Err(DropReason::NatSynOnFlow);
        }
        if service == ns.lb.id
            && vni == ns.vni
            && !forged
            && lb::holds(ns.lb.id, slot, &backend, backend_port)
            && m.now.saturating_sub(seen) <= nat_timeout(m.proto, flags, state == LB_EST)
        {
            lb::set(m, &ns.lb, slot, &backend, backend_port, state);
            // SAFETY: as above.
            known = Some(unsafe { ((*p).nat, (*p).nat_port, state) });
        }
    }
    let (nat, nat_port, state) = match known {
        Some(k) => k,
        None => {
            // Only a SYN opens a TCP flow, but for a flow picked up.
            let (nat, secret, state) = if m.proto == PROTO_TCP && !syn {
                let (nat, secret) = pickup(m, &ns)?;
                (nat, secret, LB_PICKUP)
            } else {
                let seed = NAT_SEED.get(0).copied().unwrap_or(0);
                (ns.nat, nat_secret(seed, &ns.nat), LB_NEW)
            };
            lb::pick(m, &ns.lb)?;
            let port = free_port(m, ns.vni, &nat, secret)?;
            (nat, port, state)
        }
    };
    m.lb = LB_NONE;
    m.nat = state;
    m.nat_client = m.src;
    m.nat_cport = m.sport;
    m.src = nat;
    m.sport = nat_port;
    m.entry = E_NAT;
    m.src_ifx = 0;
    m.fw_policy = 0;
    into_vpc(m)
}

/// A TCP segment of a flow unknown here, to a VIP this host took over a
/// moment ago from another holder (`NAT_PICKUP`): if the listener is
/// Maglev's (without source persistence, which may have placed the flow
/// elsewhere), the previous owner's NAT address and its secret for that
/// address's ports. With them the flow gets the member Maglev gives it
/// (the same on every holder) and the first NAT port that secret draws
/// that is free here: the previous owner's. The flow is unconfirmed until
/// the member answers it (`outbound`). Only a segment a connection's
/// middle can be (an ACK, neither SYN nor RST) is picked up; anything
/// else is not a flow's first packet (`ct_not_syn`).
#[inline(never)]
fn pickup(m: &Meta, ns: &NatService) -> Result<([u8; 16], u32), DropReason> {
    if ns.lb.scheduler != SCHED_TABLE_HASH
        || ns.lb.persistence_secs != 0
        || ns.flags & NAT_SVC_F_LEASE == 0
        || m.tcp_flags & (TCP_SYN | TCP_RST | TCP_ACK) != TCP_ACK
    {
        return Err(DropReason::CtNotSyn);
    }
    let key = NatPickupKey {
        vni: ns.vni,
        family: m.family,
        _pad: [0; 3],
        addr: m.dst,
    };
    let Some(p) = NAT_PICKUP.get_ptr_mut(&key) else {
        return Err(DropReason::CtNotSyn);
    };
    // SAFETY: a live map value, read field by field.
    let (nat, secret, until) = unsafe { ((*p).nat, (*p).secret, (*p).until_ns) };
    if m.now > until {
        return Err(DropReason::CtNotSyn);
    }
    // SAFETY: as above; racing updates only lose counts.
    unsafe { (*p).picked += 1 };
    Ok((nat, secret))
}

/// A NAT port of the NAT address `nat` for a new flow to the member now in
/// `m`: one no flow of that address to that member's address and port
/// holds, drawn from the client's address and port and the VIP's port
/// keyed by the address's `secret` ([`nat_port_hash`]; so a client's
/// retransmitted first packet, scheduled again, finds the same port free;
/// and a holder that takes the VIP over finds the port of a flow of the
/// previous owner's).
#[inline(never)]
fn free_port(m: &Meta, vni: u32, nat: &[u8; 16], secret: u32) -> Result<u16, DropReason> {
    let span = (u16::MAX - NAT_PORT_FIRST) as u32 + 1;
    let h = nat_port_hash(&m.src, m.sport, m.lb_vport, secret);
    let mut rk = NatReverseKey {
        vni,
        family: m.family,
        proto: m.proto,
        backend_port: m.dport,
        nat_port: 0,
        _pad: 0,
        backend: m.dst,
        nat: *nat,
    };
    for i in 0..NAT_PORT_TRIES {
        // A stride prime to the span (64512 = 2^10 * 3^2 * 7): distinct ports.
        let port = NAT_PORT_FIRST + (h.wrapping_add(i.wrapping_mul(40_507)) % span) as u16;
        rk.nat_port = port;
        // SAFETY: only whether the entries exist is read.
        if unsafe { NAT_REVERSE.get(&rk) }.is_none() && unsafe { NAT_REVERSE_NEW.get(&rk) }.is_none() {
            return Ok(port);
        }
    }
    Err(DropReason::NatNoPort)
}

/// Where the translated packet goes in the VPC: the member's port here, or
/// its host through the tunnel.
#[inline(never)]
fn into_vpc(m: &mut Meta) -> Result<(), DropReason> {
    let vni = m.nat_vni;
    let ep = endpoint(vni, m.family, &m.dst).ok_or(DropReason::NoRoute)?;
    if ep.flags & (EP_F_GATEWAY | EP_F_PEER | EP_F_NAT) != 0 {
        return Err(DropReason::NoRoute);
    }
    m.dst_mac = ep.mac;
    if ep.ifindex != 0 {
        m.dst_ifx = ep.ifindex;
        m.dst_port = port::port(ep.ifindex)?;
        m.dst_door = DOOR_VPC | vni;
        m.out = O_PORT;
        m.out_ifx = ep.ifindex;
        return Ok(());
    }
    crate::guard::into_tunnel(m, vni, ep.host_v4)
}

/// At the commit, once every tier has passed the packet: a new flow is
/// recorded (unconfirmed) with its reply; a known one is brought up to
/// date (TCP: confirmed when the client acknowledges the member's
/// answer). Then the packet is translated: from the NAT address and
/// port, to the member.
#[inline(always)]
pub fn commit(ctx: &mut TcContext, m: &Meta) -> Result<(), DropReason> {
    let key = flow_key(m);
    match m.nat {
        LB_NEW => {
            retire(&key, m.family, m.proto);
            unpick(&key, m.family, m.proto);
            record(m, &key, 0)?
        }
        LB_PICKUP => record(m, &key, NAT_F_PICKUP)?,
        LB_EST_NEW => {
            let Some(f) = NAT_FLOWS_NEW.get_ptr_mut(&key) else {
                return Err(DropReason::NatNoFlow);
            };
            // SAFETY: a live map value; racing updates only lose counts.
            let f = unsafe { &mut *f };
            let rk = reverse_key(f, m.family, m.proto);
            claim_new(&rk, &key)?;
            seen_in(f, m);
            if f.flags & NAT_F_PICKUP != 0 {
                // The client's latest segment: what the member's answer
                // must be near.
                f.client_isn = m.tcp_seq;
                f.reply_ack = m.tcp_ack;
            }
            let c = closes(f, m);
            if c == CLOSE_NOW && m.tcp_flags & TCP_RST != 0 {
                forget(&key, &rk, false);
            } else if c != CLOSE_NOT {
                f.flags |= NAT_F_CLOSING;
            } else if m.proto == PROTO_TCP
                && f.flags & NAT_F_REPLIED != 0
                && m.tcp_flags & (TCP_ACK | TCP_SYN) == TCP_ACK
                && m.tcp_ack == f.reply_ack
            {
                promote(&key, f, &rk)?;
            }
        }
        LB_EST => {
            let Some(f) = NAT_FLOWS.get_ptr_mut(&key) else {
                return Err(DropReason::NatNoFlow);
            };
            // SAFETY: as above.
            let f = unsafe { &mut *f };
            let rk = reverse_key(f, m.family, m.proto);
            claim(&rk, &key)?;
            seen_in(f, m);
            match closes(f, m) {
                CLOSE_NOW if m.tcp_flags & TCP_RST != 0 => forget(&key, &rk, true),
                CLOSE_NOW => {
                    f.flags |= NAT_F_CLOSING | NAT_F_FIN_IN;
                    close(f);
                }
                // Near the acknowledged sequence (unacknowledged data
                // before it): the closing timeout, nothing more.
                CLOSE_SOON => f.flags |= NAT_F_CLOSING,
                _ => {}
            }
        }
        _ => return Err(DropReason::Pipeline),
    }
    if m.lb_persist != 0 {
        lb::remember(m, &m.nat_client);
    }
    if m.fw_record != 0 {
        record_verdict(m);
    }
    lb::rewrite(ctx, m, false, &m.nat_client, &m.src, m.nat_cport, m.sport)?;
    lb::rewrite(ctx, m, true, &m.lb_vip, &m.dst, m.lb_vport, m.dport)
}

/// Where a translated packet goes: the member's port here, or the tunnel
/// (its key was set before the writes).
#[inline(always)]
pub fn deliver(ctx: &mut TcContext, m: &Meta) -> Result<Action, DropReason> {
    set_macs(ctx, &m.dst_mac)?;
    match m.out {
        O_PORT => {
            count(Stat::ForwardedLocal);
            Ok(Action::Peer(m.out_ifx))
        }
        O_TUNNEL => {
            count(Stat::Encapsulated);
            Ok(Action::Redirect(m.out_ifx))
        }
        _ => Err(DropReason::NoRoute),
    }
}

/// A packet from the client of `f`. (Its FIN or RST closes nothing: a
/// zone's host could forge it; the member's answer closes the flow.)
#[inline(always)]
fn seen_in(f: &mut NatFlow, m: &Meta) {
    f.last_seen_ns = m.now;
    f.packets_in += 1;
    f.bytes_in += m.len as u64;
}

/// Whether the client's packet closes its flow: a FIN or RST at the
/// sequence number the member acknowledged last (a forger, who has not
/// seen it, would need 2^32 tries), or a little past it.
#[inline(always)]
fn closes(f: &NatFlow, m: &Meta) -> u8 {
    if m.proto != PROTO_TCP || m.tcp_flags & (TCP_FIN | TCP_RST) == 0 || f.flags & NAT_F_ACKED == 0 {
        return CLOSE_NOT;
    }
    let ahead = m.tcp_seq.wrapping_sub(f.member_ack);
    if ahead == 0 {
        CLOSE_NOW
    } else if ahead < NAT_CLOSE_WINDOW {
        CLOSE_SOON
    } else {
        CLOSE_NOT
    }
}

/// What a client's FIN or RST does: nothing (a forged one, far from the
/// member's acknowledgement), the closing timeout, or close now.
const CLOSE_NOT: u8 = 0;
const CLOSE_SOON: u8 = 1;
const CLOSE_NOW: u8 = 2;

/// A flow reset: gone at once, with its reply (its NAT port is free again;
/// the member's conntrack lets a new flow on the tuple open).
#[inline(never)]
fn forget(key: &NatKey, rk: &NatReverseKey, confirmed: bool) {
    if confirmed {
        if NAT_REVERSE.get_ptr(rk).is_some_and(|p| names(p, key)) {
            let _ = NAT_REVERSE.remove(rk);
        }
        if let Some(p) = NAT_FLOWS.get_ptr(key) {
            // SAFETY: a live map value, read field by field.
            let (service, slot, flags) = unsafe { ((*p).service, (*p).slot, (*p).flags) };
            if flags & (LB_FLOW_OPEN | LB_FLOW_CLOSED) == LB_FLOW_OPEN {
                conns(service, slot, 0, -1);
            }
            let _ = NAT_FLOWS.remove(key);
        }
    } else {
        if NAT_REVERSE_NEW.get_ptr(rk).is_some_and(|p| names(p, key)) {
            let _ = NAT_REVERSE_NEW.remove(rk);
        }
        if let Some(p) = NAT_FLOWS_NEW.get_ptr(key) {
            // SAFETY: as above.
            let (service, slot) = unsafe { ((*p).service, (*p).slot) };
            conns(service, slot, -1, 0);
            let _ = NAT_FLOWS_NEW.remove(key);
        }
    }
}

/// Whether the reply entry `p` is the flow `key`'s (compared field by
/// field: the programs have no memcmp).
#[inline(always)]
fn names(p: *const NatKey, key: &NatKey) -> bool {
    // SAFETY: a live map value, read field by field.
    unsafe {
        (*p).client == key.client
            && (*p).vip == key.vip
            && (*p).client_port == key.client_port
            && (*p).vport == key.vport
            && (*p).zone == key.zone
            && (*p).proto == key.proto
    }
}

/// A confirmed flow's reply entry, made again if it is missing; a packet
/// of a flow whose NAT port another flow holds goes nowhere.
#[inline(never)]
fn claim(rk: &NatReverseKey, key: &NatKey) -> Result<(), DropReason> {
    if NAT_REVERSE_NEW.get_ptr(rk).is_some_and(|p| !names(p, key)) {
        return Err(DropReason::NatNoFlow);
    }
    match NAT_REVERSE.get_ptr(rk) {
        Some(p) if names(p, key) => Ok(()),
        Some(_) => Err(DropReason::NatNoFlow),
        None => NAT_REVERSE
            .insert(rk, key, BPF_NOEXIST)
            .map_err(|_| DropReason::NatNoFlow),
    }
}

/// The same for an unconfirmed flow (whose entry its LRU may have let go).
#[inline(never)]
fn claim_new(rk: &NatReverseKey, key: &NatKey) -> Result<(), DropReason> {
    if let Some(p) = NAT_REVERSE.get_ptr(rk) {
        // Promoted meanwhile (another CPU): the flow's own; else another's.
        return if names(p, key) {
            Ok(())
        } else {
            Err(DropReason::NatNoFlow)
        };
    }
    match NAT_REVERSE_NEW.get_ptr(rk) {
        Some(p) if names(p, key) => Ok(()),
        Some(_) => Err(DropReason::NatNoFlow),
        None => NAT_REVERSE_NEW
            .insert(rk, key, BPF_NOEXIST)
            .map_err(|_| DropReason::NatNoFlow),
    }
}

#[inline(always)]
fn reverse_key(f: &NatFlow, family: u8, proto: u8) -> NatReverseKey {
    NatReverseKey {
        vni: f.vni,
        family,
        proto,
        backend_port: f.backend_port,
        nat_port: f.nat_port,
        _pad: 0,
        backend: f.backend,
        nat: f.nat,
    }
}

/// A new flow, unconfirmed, and its reply. Its reply's key is claimed
/// first: a flow of another CPU that took the same NAT port since the
/// port was found free keeps it, and this packet is refused. `flags`:
/// [`NAT_F_PICKUP`] or none.
#[inline(never)]
fn record(m: &Meta, key: &NatKey, flags: u32) -> Result<(), DropReason> {
    let f = NatFlow {
        backend: m.dst,
        nat: m.src,
        backend_port: m.dport,
        nat_port: m.sport,
        service: m.lb_service,
        slot: m.lb_slot,
        _pad: 0,
        flags,
        vni: m.nat_vni,
        // A flow picked up: what the client's segment acknowledged (see
        // `answers_pickup`).
        reply_ack: if flags & NAT_F_PICKUP != 0 { m.tcp_ack } else { 0 },
        member_ack: 0,
        client_isn: m.tcp_seq,
        created_ns: m.now,
        last_seen_ns: m.now,
        packets_in: 1,
        packets_out: 0,
        bytes_in: m.len as u64,
        bytes_out: 0,
    };
    let rk = reverse_key(&f, m.family, m.proto);
    // The flow first, then its reply: a reply is never there without its
    // flow (the agent's collector removes replies whose flow is gone).
    if NAT_FLOWS_NEW.insert(key, &f, 0).is_err() {
        return Err(DropReason::CtFull);
    }
    // A retransmitted first packet, scheduled again to the same member and
    // port, finds its own reply there.
    let mine = NAT_REVERSE_NEW.get_ptr(&rk).is_some_and(|p| names(p, key));
    if !mine && NAT_REVERSE_NEW.insert(&rk, key, BPF_NOEXIST).is_err() {
        let _ = NAT_FLOWS_NEW.remove(key);
        return Err(DropReason::NatNoPort);
    }
    if !mine {
        conns(m.lb_service, m.lb_slot, 1, 0);
    }
    if m.lb_cursor != LB_NO_CURSOR {
        if let Some(c) = LB_CURSOR.get_ptr_mut(m.lb_service) {
            // SAFETY: this CPU's slot.
            unsafe { *c = m.lb_cursor as u32 };
        }
    }
    count(Stat::LbNew);
    Ok(())
}

/// A new connection on a confirmed flow's tuple (a fresh SYN) replaces
/// it: the confirmed flow goes, with its reply.
#[inline(never)]
fn retire(key: &NatKey, family: u8, proto: u8) {
    let Some(p) = NAT_FLOWS.get_ptr(key) else {
        return;
    };
    // SAFETY: a live map value, read field by field.
    let (rk, service, slot, flags) = unsafe { (reverse_key(&*p, family, proto), (*p).service, (*p).slot, (*p).flags) };
    if NAT_REVERSE.get_ptr(&rk).is_some_and(|p| names(p, key)) {
        let _ = NAT_REVERSE.remove(&rk);
    }
    let _ = NAT_FLOWS.remove(key);
    if flags & (LB_FLOW_OPEN | LB_FLOW_CLOSED) == LB_FLOW_OPEN {
        conns(service, slot, 0, -1);
    }
}

/// A SYN on the tuple of a flow picked up and never answered: that flow
/// goes, with its reply (the new flow may draw another NAT port).
#[inline(never)]
fn unpick(key: &NatKey, family: u8, proto: u8) {
    let Some(p) = NAT_FLOWS_NEW.get_ptr(key) else {
        return;
    };
    // SAFETY: a live map value, read field by field.
    let (rk, flags) = unsafe { (reverse_key(&*p, family, proto), (*p).flags) };
    if flags & NAT_F_PICKUP != 0 {
        forget(key, &rk, false);
    }
}

/// Records the firewall's verdict of a north-south flow.
#[inline(never)]
fn record_verdict(m: &Meta) {
    let v = verdict_key(m, &m.lb_vip, m.lb_vport, &m.nat_client, m.nat_cport);
    firewall::record(&v, m);
}

/// Adds to a backend slot's counts of unconfirmed and open flows.
#[inline(always)]
fn conns(service: u32, slot: u16, new: i64, open: i64) {
    if let Some(c) = LB_CONNS.get_ptr_mut(service * LB_BACKENDS + slot as u32) {
        // SAFETY: the fields of a live map value.
        unsafe {
            if new != 0 {
                lb::add(core::ptr::addr_of_mut!((*c).new), new);
            }
            if open != 0 {
                lb::add(core::ptr::addr_of_mut!((*c).open), open);
            }
        }
    }
}

/// The flow ends: it no longer counts as open.
#[inline(always)]
fn close(f: &mut NatFlow) {
    if f.flags & (LB_FLOW_OPEN | LB_FLOW_CLOSED) != LB_FLOW_OPEN {
        return;
    }
    f.flags |= LB_FLOW_CLOSED;
    conns(f.service, f.slot, 0, -1);
}

/// An unconfirmed flow confirmed: moved, with its reply, to the confirmed
/// flows; it now counts as open for its member.
#[inline(never)]
fn promote(key: &NatKey, f: &NatFlow, rk: &NatReverseKey) -> Result<(), DropReason> {
    let mut nf = *f;
    nf.flags = (nf.flags & !(NAT_F_REPLIED | NAT_F_PICKUP)) | LB_FLOW_OPEN;
    // The flow first, then its reply (see `record`). When either table is
    // full, the packet that would confirm the flow is refused and the flow
    // stays unconfirmed (its LRU may let it go; no confirmed flow goes).
    if NAT_FLOWS.insert(key, &nf, 0).is_err() {
        return Err(DropReason::CtFull);
    }
    if NAT_REVERSE.insert(rk, key, 0).is_err() {
        let _ = NAT_FLOWS.remove(key);
        return Err(DropReason::CtFull);
    }
    let _ = NAT_FLOWS_NEW.remove(key);
    let _ = NAT_REVERSE_NEW.remove(rk);
    conns(nf.service, nf.slot, -1, 1);
    count(Stat::CtPromoted);
    tell(key, &nf);
    Ok(())
}

/// Tells the agent of a confirmed flow of a VIP held by hosts (it carries
/// them to the other holders). A full ring loses the event: the agent's
/// next pass over the flows carries the flow all the same.
#[inline(always)]
fn tell(key: &NatKey, f: &NatFlow) {
    let sk = NatServiceKey {
        family: key.family,
        proto: key.proto,
        port: key.vport,
        addr: key.vip,
    };
    // SAFETY: only the flags are read.
    if unsafe { NAT_SERVICES.get(&sk) }.is_none_or(|ns| ns.flags & NAT_SVC_F_LEASE == 0) {
        return;
    }
    if let Some(mut e) = NAT_SYNC.reserve::<NatSyncEvent>(0) {
        let p = e.as_mut_ptr();
        // SAFETY: the reserved entry is this program's until submitted.
        unsafe {
            (*p).key = *key;
            (*p).flow = *f;
        }
        e.submit(0);
    }
}

/// Whether a member's segment answers the flow picked up `f` (unconfirmed):
/// a reset at the sequence number the client's last segment acknowledged
/// (a connection the member does not know; it ends the flow); or a plain
/// ACK near the client's last segment both ways ([`NAT_PICKUP_SLACK`]).
/// Another tuple's segment that drew the same NAT port (or a forged one
/// on the client's own) lands in a connection of the member's whose
/// numbers it does not know: its answer is dropped and the flow is not
/// confirmed.
#[inline(always)]
fn answers_pickup(f: &NatFlow, m: &Meta) -> bool {
    if m.proto != PROTO_TCP {
        return false;
    }
    if m.tcp_flags & TCP_RST != 0 {
        return m.tcp_seq == f.reply_ack;
    }
    let near = |x: u32, to: u32| x.wrapping_sub(to).wrapping_add(NAT_PICKUP_SLACK) <= 2 * NAT_PICKUP_SLACK;
    m.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_ACK && near(m.tcp_ack, f.client_isn) && near(m.tcp_seq, f.reply_ack)
}

/// The zone guard and the border firewall of the flow `key` as it was
/// opened (from the client to the VIP), through the NAT address `nat` of
/// its VPC.
#[inline(never)]
fn rejudge(m: &Meta, key: &NatKey, nat: &[u8; 16]) -> Result<(), DropReason> {
    let ep = zone_endpoint(m.family, nat).ok_or(DropReason::NoRoute)?;
    exchange_admits(key.zone, ep.zone, m.family, m.proto, &key.client, &key.vip, key.vport)?;
    if ep.border != 0 && firewall::evaluate(ep.border, &key.client, m, DIR_INGRESS, key.vport).0 != FW_ALLOW {
        return Err(DropReason::BorderFirewall);
    }
    Ok(())
}

/// `st_nat_out`: a member's reply to this host's NAT address, translated
/// back to the VIP and the client; the uplink it leaves by. Only a reply
/// of a flow translated here, from its member, passes.
#[inline(always)]
pub fn outbound(ctx: &mut TcContext, m: &Meta) -> Result<u32, DropReason> {
    if m.proto != PROTO_TCP && m.proto != PROTO_UDP {
        return Err(DropReason::NatNoFlow);
    }
    let rk = NatReverseKey {
        vni: m.nat_vni,
        family: m.family,
        proto: m.proto,
        backend_port: m.sport,
        nat_port: m.dport,
        _pad: 0,
        backend: m.src,
        nat: m.dst,
    };
    // SAFETY: the values are copied out at once.
    let (key, confirmed) = match unsafe { NAT_REVERSE.get(&rk) }.copied() {
        Some(k) => (k, true),
        None => match unsafe { NAT_REVERSE_NEW.get(&rk) }.copied() {
            Some(k) => (k, false),
            None => return Err(DropReason::NatNoFlow),
        },
    };
    let p = if confirmed {
        NAT_FLOWS.get_ptr_mut(&key)
    } else {
        NAT_FLOWS_NEW.get_ptr_mut(&key)
    };
    let Some(p) = p else {
        return Err(DropReason::NatNoFlow);
    };
    // SAFETY: a live map value; racing updates only lose counts.
    let f = unsafe { &mut *p };
    if f.backend != m.src
        || f.backend_port != m.sport
        || f.nat != m.dst
        || f.nat_port != m.dport
        || f.vni != m.nat_vni
        || m.now.saturating_sub(f.last_seen_ns) > nat_timeout(m.proto, f.flags, confirmed)
    {
        return Err(DropReason::NatNoFlow);
    }
    // Judged again as it was opened, from the client: a path or rule taken
    // away, or a member gone from its pool, cuts the flow both ways.
    if !lb::holds(f.service, f.slot, &f.backend, f.backend_port) {
        return Err(DropReason::NatNoFlow);
    }
    rejudge(m, &key, &f.nat)?;
    if !confirmed && f.flags & NAT_F_PICKUP != 0 && !answers_pickup(f, m) {
        return Err(DropReason::NatNoFlow);
    }
    let uplink = uplink_of(key.zone).ok_or(DropReason::NoRoute)?;
    f.last_seen_ns = m.now;
    f.packets_out += 1;
    f.bytes_out += m.len as u64;
    if m.proto == PROTO_TCP && m.tcp_flags & TCP_ACK != 0 {
        f.member_ack = m.tcp_ack;
        f.flags |= NAT_F_ACKED;
    }
    let reset = m.proto == PROTO_TCP && m.tcp_flags & TCP_RST != 0;
    // The member's SYN-ACK must answer this flow's SYN: another flow that
    // held the NAT port before (its reply entry let go) is not this one.
    if !confirmed && m.proto == PROTO_TCP && m.tcp_flags & TCP_SYN != 0 && m.tcp_ack != f.client_isn.wrapping_add(1) {
        return Err(DropReason::NatNoFlow);
    }
    if m.proto == PROTO_TCP && m.tcp_flags & TCP_FIN != 0 {
        f.flags |= NAT_F_CLOSING | NAT_F_FIN_OUT;
        if confirmed {
            close(f);
        }
    }
    if reset {
        forget(&key, &rk, confirmed);
    } else if !confirmed {
        if m.proto == PROTO_TCP && f.flags & NAT_F_PICKUP != 0 {
            // The member answered the flow picked up as its own.
            promote(&key, f, &rk)?;
        } else if m.proto == PROTO_TCP {
            if m.tcp_flags & (TCP_SYN | TCP_ACK) == (TCP_SYN | TCP_ACK) {
                f.flags |= NAT_F_REPLIED;
                f.reply_ack = m.tcp_seq.wrapping_add(1);
            }
        } else {
            promote(&key, f, &rk)?;
        }
    }
    lb::rewrite(ctx, m, false, &m.src, &key.vip, m.sport, key.vport)?;
    lb::rewrite(ctx, m, true, &m.dst, &key.client, m.dport, key.client_port)?;
    Ok(uplink)
}
