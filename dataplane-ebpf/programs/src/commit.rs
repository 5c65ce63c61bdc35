//! The last stage: every tier has allowed the packet, so its state is
//! written now (flow entries, their counters, the firewall's verdict),
//! then the packet is answered, rewritten, encapsulated or sent on.

use aya_ebpf::programs::TcContext;
use dataplane_common::{
    maps::{
        CtKey, CtValue, PortInfo, CT_BUDGET_DEFAULT, CT_F_CLOSING, CT_F_REPLY_SEEN, CT_ORIGIN_IN, CT_ORIGIN_OUT,
        EP_F_GATEWAY, GATEWAY_MAC, SYSTEM_DOWN, SYSTEM_UP,
    },
    DropReason, Stat, FAMILY_V4, FAMILY_V6, MARK_PIPELINE, PROTO_ICMPV6, PROTO_TCP,
};

use crate::{
    ctx::load,
    firewall,
    guard::Live,
    maps::{count, count_system, CONFIG, CT, CT_COUNT, CT_ISN, CT_SYN},
    meta::{
        Meta, EMPTY_KEY, E_FROM_OVERLAY, E_FROM_UPLINK, E_TO_VM, K_ARP, K_IP, K_NEIGHBOUR, K_NS, O_PORT, O_TUNNEL,
        O_UPLINK, S_EST, S_NEW, S_STALE, T_MAIN, T_SYN,
    },
    overlay::{endpoint, set_tunnel},
    parse::{ETH_HLEN, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

/// What to do with a packet that is not dropped.
pub enum Action {
    /// Hand it to the kernel's own path unchanged.
    Pass,
    /// Send it out of this device (the tunnel).
    Redirect(u32),
    /// Deliver it to the VM behind this host-side device, straight into
    /// the VM's side of the veth.
    Peer(u32),
    /// Answered or absorbed by the host: stop here (not a drop). Also what
    /// a north-south packet's stages return when its next stage is one of
    /// the NAT's (the caller goes on there: see `finish`).
    Consume,
    /// Send it out of this device with its Ethernet addresses filled in by
    /// the kernel's routes and neighbours (a zone uplink).
    Neighbour(u32),
}

const BPF_NOEXIST: u64 = 1;
const EEXIST: i64 = 17;

/// The commit stage.
#[inline(always)]
pub fn commit(ctx: &mut TcContext, m: &mut Meta) -> Result<Action, DropReason> {
    match m.kind {
        K_ARP => return answer_arp(ctx, m),
        K_NS => return answer_ns(ctx, m),
        // From a VM, the host needs none of them (the distributed gateway
        // answers what a VM asks); towards a VM, they are the host's own.
        K_NEIGHBOUR if m.entry == crate::meta::E_FROM_VM => return Ok(Action::Consume),
        K_NEIGHBOUR => return Ok(Action::Pass),
        K_IP => writes(ctx, m)?,
        // K_RELATED: an ICMP error of a tracked flow, which leaves no state.
        _ => prepare(ctx, m)?,
    }
    forward(ctx, m)
}

/// An IP packet's writes: every local side's flow entry, the firewall's
/// verdict.
#[inline(always)]
pub fn writes(ctx: &mut TcContext, m: &mut Meta) -> Result<(), DropReason> {
    prepare(ctx, m)?;
    refresh(m)?;
    if m.fw_record != 0 {
        let mut key = EMPTY_KEY;
        firewall::crossing_key(m, &mut key);
        firewall::record(&key, m);
    }
    Ok(())
}

/// Writes one local side's flow entry: a new one, or the live one `p`
/// (null: looked up here) brought up to date; a handshake that completed
/// moves to the flow table. `outbound`: the port sends this packet.
#[inline(always)]
fn side(
    port: &PortInfo,
    state: u8,
    table: u8,
    mut p: *mut CtValue,
    outbound: bool,
    m: &Meta,
) -> Result<(), DropReason> {
    let now = m.now;
    let key = side_key(m, outbound);
    if state == S_NEW {
        if table == T_MAIN {
            // A closing connection's entry that a fresh SYN replaces.
            let _ = CT.remove(&key);
            uncount(key.ifindex);
        }
        let v = CtValue {
            created_ns: now,
            last_seen_ns: now,
            packets_out: outbound as u64,
            packets_in: (!outbound) as u64,
            bytes_out: if outbound { m.len as u64 } else { 0 },
            bytes_in: if outbound { 0 } else { m.len as u64 },
            epoch: port.epoch,
            origin: if outbound { CT_ORIGIN_OUT } else { CT_ORIGIN_IN },
            flags: 0,
            svc: m.service(),
        };
        // Unconfirmed: in the LRU table until it is answered (TCP: until the
        // opener acknowledges the answer), so a flood of flows nobody
        // answers evicts only its own kind, never takes a port's budget.
        let _ = CT_SYN.insert(&key, &v, 0);
        count(Stat::CtNew);
        return Ok(());
    }
    if state != S_EST && state != S_STALE {
        return Ok(());
    }
    if table == T_MAIN {
        if p.is_null() {
            p = CT.get_ptr_mut(&key).unwrap_or(core::ptr::null_mut());
        }
        if !p.is_null() {
            // SAFETY: a live map value; racing updates only lose counts.
            update(unsafe { &mut *p }, now, outbound, m, port.epoch);
        }
        count(Stat::CtHit);
        return Ok(());
    }
    if table != T_SYN {
        return Ok(());
    }
    if p.is_null() {
        p = CT_SYN.get_ptr_mut(&key).unwrap_or(core::ptr::null_mut());
    }
    if p.is_null() {
        return Ok(());
    }
    // SAFETY: a live map value.
    let v = unsafe { &mut *p };
    let from_opener = outbound == (v.origin == CT_ORIGIN_OUT);
    let tcp = key.proto == PROTO_TCP;
    let confirmed = confirms(v, outbound, m);
    if !from_opener && !confirmed {
        v.flags |= CT_F_REPLY_SEEN;
        if tcp && m.tcp_flags & (TCP_SYN | TCP_ACK) == (TCP_SYN | TCP_ACK) {
            // The answer: what the opener's ACK must acknowledge.
            let _ = CT_ISN.insert(&key, &m.tcp_seq.wrapping_add(1), 0);
        }
    } else if confirmed {
        // Confirmed (its ACK number and the port's room were checked for
        // every side before any was written): moved to the flow table.
        let mut nv = *v;
        update(&mut nv, now, outbound, m, port.epoch);
        nv.flags &= !CT_F_REPLY_SEEN;
        insert(&key, &nv)?;
        let _ = CT_SYN.remove(&key);
        if tcp {
            let _ = CT_ISN.remove(&key);
        }
        count(Stat::CtPromoted);
        count(Stat::CtHit);
        return Ok(());
    }
    update(v, now, outbound, m, port.epoch);
    count(Stat::CtHit);
    Ok(())
}

/// The flow key of one local side: the sender's (`outbound`) or the
/// receiver's.
#[inline(always)]
fn side_key(m: &Meta, outbound: bool) -> CtKey {
    let mut key = EMPTY_KEY;
    if outbound {
        m.src_key(&mut key);
    } else {
        m.dst_key(&mut key);
    }
    key
}

/// Whether this packet completes the unconfirmed flow `v` of one side:
/// TCP, the opener acknowledging the answer; otherwise the first answer.
#[inline(always)]
fn confirms(v: &CtValue, outbound: bool, m: &Meta) -> bool {
    let from_opener = outbound == (v.origin == CT_ORIGIN_OUT);
    if m.proto == PROTO_TCP {
        from_opener && v.flags & CT_F_REPLY_SEEN != 0 && m.tcp_flags & (TCP_ACK | TCP_SYN) == TCP_ACK
    } else {
        !from_opener
    }
}

/// The live entry of one side in `table` (null: none).
#[inline(always)]
fn live(m: &Meta, outbound: bool, table: u8) -> *mut CtValue {
    let key = side_key(m, outbound);
    match table {
        T_MAIN => CT.get_ptr_mut(&key).unwrap_or(core::ptr::null_mut()),
        T_SYN => CT_SYN.get_ptr_mut(&key).unwrap_or(core::ptr::null_mut()),
        _ => core::ptr::null_mut(),
    }
}

/// Before any side is written: a side whose handshake this packet would
/// complete needs an ACK of its answer's sequence number (a blind ACK, from
/// a forged source that never got the answer, moves nothing into the flow
/// table, so it cannot take a port's budget) and room in the port's
/// budget. So a packet refused for one side leaves every side as it was.
#[inline(always)]
fn precheck(state: u8, table: u8, p: *mut CtValue, outbound: bool, m: &Meta) -> Result<(), DropReason> {
    if table != T_SYN || (state != S_EST && state != S_STALE) || p.is_null() {
        return Ok(());
    }
    // SAFETY: a live map value, read only.
    if !confirms(unsafe { &*p }, outbound, m) {
        return Ok(());
    }
    let key = side_key(m, outbound);
    // SAFETY: the value is copied out at once.
    if m.proto == PROTO_TCP && unsafe { CT_ISN.get(&key) }.copied() != Some(m.tcp_ack) {
        return Err(DropReason::CtBadAck);
    }
    // SAFETY: as above.
    if unsafe { CT_COUNT.get(&key.ifindex) }.copied().unwrap_or(0) >= budget() {
        return Err(DropReason::CtBudget);
    }
    Ok(())
}

/// Writes every local side's entry, after checking what can refuse the
/// packet for any of them.
#[inline(always)]
fn sides(m: &Meta, src: (u8, u8, *mut CtValue), dst: (u8, u8, *mut CtValue)) -> Result<(), DropReason> {
    if m.dst_ifx != 0 {
        precheck(dst.0, dst.1, dst.2, false, m)?;
    }
    if m.src_ifx != 0 {
        precheck(src.0, src.1, src.2, true, m)?;
    }
    if m.dst_ifx != 0 {
        let port = m.dst_port;
        side(&port, dst.0, dst.1, dst.2, false, m)?;
    }
    if m.src_ifx != 0 {
        let port = m.src_port;
        side(&port, src.0, src.1, src.2, true, m)?;
    }
    Ok(())
}

/// The port flow budget in force.
#[inline(always)]
fn budget() -> u32 {
    match CONFIG.get(0).map(|c| c.ct_budget).unwrap_or(0) {
        0 => CT_BUDGET_DEFAULT,
        b => b,
    }
}

#[inline(always)]
fn update(v: &mut CtValue, now: u64, outbound: bool, m: &Meta, epoch: u32) {
    v.last_seen_ns = now;
    if outbound {
        v.packets_out += 1;
        v.bytes_out += m.len as u64;
    } else {
        v.packets_in += 1;
        v.bytes_in += m.len as u64;
    }
    if m.proto == PROTO_TCP && m.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        v.flags |= CT_F_CLOSING;
    }
    v.epoch = epoch;
}

/// Inserts into the flow table within the port's budget. An entry already
/// under the key (one that timed out) is replaced and was counted before.
#[inline(always)]
fn insert(key: &CtKey, v: &CtValue) -> Result<(), DropReason> {
    let budget = budget();
    let ifx = key.ifindex;
    let held = CT_COUNT.get_ptr_mut(&ifx);
    if let Some(c) = held {
        // SAFETY: a live map value.
        if unsafe { *c } >= budget {
            return Err(DropReason::CtBudget);
        }
    }
    match CT.insert(key, v, BPF_NOEXIST) {
        Ok(()) => {
            match held {
                // SAFETY: a live map value; a racing CPU may lose one
                // count, which the agent's recount corrects.
                Some(c) => unsafe { *c += 1 },
                None => {
                    let _ = CT_COUNT.insert(&ifx, &1, 0);
                }
            }
            Ok(())
        }
        Err(e) if e == -EEXIST => CT.insert(key, v, 0).map_err(|_| DropReason::CtFull),
        Err(_) => Err(DropReason::CtFull),
    }
}

#[inline(always)]
fn uncount(ifx: u32) {
    if let Some(c) = CT_COUNT.get_ptr_mut(&ifx) {
        // SAFETY: a live map value.
        unsafe { *c = (*c).saturating_sub(1) };
    }
}

/// What can still fail before the packet leaves, done before any write:
/// the tunnel key of a packet into the overlay.
#[inline(always)]
pub fn prepare(ctx: &TcContext, m: &Meta) -> Result<(), DropReason> {
    if (m.entry == crate::meta::E_FROM_VM || m.entry == crate::meta::E_NAT)
        && m.out == O_TUNNEL
        && !set_tunnel(ctx, m.tun_vni, m.tun_remote)
    {
        return Err(DropReason::NoRoute);
    }
    Ok(())
}

/// Every local side's entry written after the final verdict (looked up
/// again: the guard's pointers stay in the guard).
#[inline(always)]
pub fn refresh(m: &Meta) -> Result<(), DropReason> {
    let at = |state: u8, table: u8, outbound: bool, ifx: u32| {
        if ifx != 0 && (state == S_EST || state == S_STALE) {
            live(m, outbound, table)
        } else {
            core::ptr::null_mut()
        }
    };
    let sp = at(m.ct_src, m.tbl_src, true, m.src_ifx);
    let dp = at(m.ct_dst, m.tbl_dst, false, m.dst_ifx);
    sides(m, (m.ct_src, m.tbl_src, sp), (m.ct_dst, m.tbl_dst, dp))
}

/// The fast path's writes: the live entries the guard found, brought up
/// to date in place (a handshake that completes moves to the flow table,
/// within the port's budget).
#[inline(always)]
pub fn refresh_live(m: &Meta, src: Live, dst: Live) -> Result<(), DropReason> {
    // An unconfirmed entry is looked up again: the LRU may have handed the
    // element the guard found to another flow since, and a promotion
    // copies it whole. (A flow-table entry only gets its counters.)
    let again = |l: Live, outbound: bool| {
        if l.table == T_SYN {
            live(m, outbound, T_SYN)
        } else {
            l.v
        }
    };
    let (sv, dv) = (again(src, true), again(dst, false));
    sides(m, (src.state, src.table, sv), (dst.state, dst.table, dv))
}

/// Sends an allowed packet on.
#[inline(always)]
pub fn forward(ctx: &mut TcContext, m: &Meta) -> Result<Action, DropReason> {
    if m.lb != crate::meta::LB_NONE && m.kind == K_IP {
        crate::lb::commit(ctx, m)?;
    }

    match m.entry {
        E_TO_VM => Ok(Action::Pass),
        E_FROM_UPLINK | E_FROM_OVERLAY => {
            set_macs(ctx, &m.dst_mac)?;
            if m.entry == E_FROM_UPLINK {
                count(Stat::FromUplink);
                count_system(m.dst_ifx, m.uplink_zone, SYSTEM_DOWN, m.len);
            } else {
                crate::lb::reply(ctx, m)?;
                count(Stat::Decapsulated);
            }
            Ok(Action::Peer(m.dst_ifx))
        }
        _ => match m.out {
            O_PORT => {
                crate::lb::reply(ctx, m)?;
                set_macs(ctx, &m.dst_mac)?;
                count(Stat::ForwardedLocal);
                Ok(Action::Peer(m.out_ifx))
            }
            O_TUNNEL => {
                // The tunnel key was set before the writes (`prepare`).
                set_macs(ctx, &m.dst_mac)?;
                count(Stat::Encapsulated);
                Ok(Action::Redirect(m.out_ifx))
            }
            O_UPLINK => {
                ctx.set_mark(MARK_PIPELINE);
                count(Stat::ToUplink);
                count_system(m.src_ifx, m.uplink_zone, SYSTEM_UP, m.len);
                Ok(Action::Neighbour(m.out_ifx))
            }
            _ => Err(DropReason::NoRoute),
        },
    }
}

/// Answers an ARP request for an address of the port's VPC (another port or
/// a gateway) with the gateway MAC, straight back to the port.
#[inline(always)]
fn answer_arp(ctx: &mut TcContext, m: &Meta) -> Result<Action, DropReason> {
    if m.entry != crate::meta::E_FROM_VM {
        return Ok(Action::Pass);
    }
    if m.arp_op != 1 {
        // Gratuitous ARP and replies: nobody on the overlay needs them.
        return Ok(Action::Consume);
    }
    let mut target = [0u8; 16];
    target[..4].copy_from_slice(&m.arp_tpa);
    match endpoint(m.src_port.vni, FAMILY_V4, &target) {
        // A probe for its own address: nobody else has it, so no answer.
        Some(ep) if ep.ifindex == m.src_ifx => return Ok(Action::Consume),
        Some(_) => {}
        None => return Err(DropReason::UnknownNeighbour),
    }
    // The request becomes the reply in place: Ethernet addresses, opcode,
    // sender (the gateway MAC and the asked address) and target (the asker).
    set_macs(ctx, &m.arp_sha)?;
    let mut sender = [0u8; 10];
    sender[..6].copy_from_slice(&GATEWAY_MAC);
    sender[6..].copy_from_slice(&m.arp_tpa);
    let mut target = [0u8; 10];
    target[..6].copy_from_slice(&m.arp_sha);
    target[6..].copy_from_slice(&m.arp_spa);
    store(ctx, ETH_HLEN + 6, &[0u8, 2])?;
    store(ctx, ETH_HLEN + 8, &sender)?;
    store(ctx, ETH_HLEN + 18, &target)?;
    count(Stat::NeighbourAnswered);
    Ok(Action::Peer(m.src_ifx))
}

/// Answers a neighbour solicitation for an address of the port's VPC with a
/// neighbour advertisement carrying the gateway MAC. Only the ordinary form
/// is answered: a specified source and one source link-layer address option
/// (what every IPv6 stack sends once it has an address).
#[inline(always)]
fn answer_ns(ctx: &mut TcContext, m: &Meta) -> Result<Action, DropReason> {
    let l4 = m.l4_off as usize;
    let target: [u8; 16] = load(ctx, l4 + 8).ok_or(DropReason::Truncated)?;
    let ep = match endpoint(m.src_port.vni, FAMILY_V6, &target) {
        // Duplicate address detection for its own address: no answer.
        Some(ep) if ep.ifindex == m.src_ifx => return Ok(Action::Consume),
        Some(ep) => ep,
        None => return Err(DropReason::UnknownNeighbour),
    };
    let frame_len = ETH_HLEN + 40 + 32;
    if m.src == [0u8; 16] || l4 != ETH_HLEN + 40 || m.end as usize != frame_len || m.len as usize != frame_len {
        return Err(DropReason::UnknownNeighbour);
    }
    // The solicitation becomes the advertisement in place. The target
    // address stays where it is; the addresses, the message header and the
    // option change. Payload length (32) and hop limit (255) are the same.
    let flags: u8 = if ep.flags & EP_F_GATEWAY != 0 { 0xe0 } else { 0x60 };
    // Checksum over the pseudo-header (addresses, length 32, next header 58)
    // and the message.
    let mut sum: u32 = 32 + PROTO_ICMPV6 as u32;
    sum += sum16(&target) * 2 + sum16(&m.src);
    sum += (136u32 << 8) + ((flags as u32) << 8) + ((2u32 << 8) | 1);
    sum += sum16(&GATEWAY_MAC);
    // The sum of 37 words fits in 22 bits: two folds end the carries.
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    let c = (!(sum as u16)).to_be_bytes();
    let src = m.src;
    let vm_mac = m.src_port.mac;
    set_macs(ctx, &vm_mac)?;
    store(ctx, ETH_HLEN + 8, &target)?;
    store(ctx, ETH_HLEN + 24, &src)?;
    store(ctx, ETH_HLEN + 40, &[136u8, 0, c[0], c[1], flags, 0, 0, 0])?;
    store(ctx, ETH_HLEN + 40 + 24, &[2u8, 1])?;
    store(ctx, ETH_HLEN + 40 + 26, &GATEWAY_MAC)?;
    count(Stat::NeighbourAnswered);
    Ok(Action::Peer(m.src_ifx))
}

/// Sum of big-endian 16-bit words (even length).
#[inline(always)]
fn sum16<const N: usize>(b: &[u8; N]) -> u32 {
    let mut s = 0u32;
    let mut i = 0;
    while i + 1 < N {
        s += u16::from_be_bytes([b[i], b[i + 1]]) as u32;
        i += 2;
    }
    s
}

#[inline(always)]
fn store<const N: usize>(ctx: &mut TcContext, off: usize, b: &[u8; N]) -> Result<(), DropReason> {
    ctx.store(off, b, 0).map_err(|_| DropReason::Truncated)
}

/// Rewrites the Ethernet addresses for delivery to `mac`.
#[inline(always)]
pub fn set_macs(ctx: &mut TcContext, mac: &[u8; 6]) -> Result<(), DropReason> {
    let mut mm = [0u8; 12];
    mm[..6].copy_from_slice(mac);
    mm[6..].copy_from_slice(&GATEWAY_MAC);
    store(ctx, 0, &mm)
}
