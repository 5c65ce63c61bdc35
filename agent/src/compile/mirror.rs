//! Mirror sessions: which of this host's ports each session copies, in
//! which direction, and where the copies go.
//!
//! Sessions take slots in the order of their ids; a host holds at most
//! [`MIRROR_SLOTS`]. A session beyond them, a tap device missing here, or
//! a destination that does not parse is rejected by name (the host NACKs)
//! and copies nothing; mirroring never holds up the rest of the share.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use dataplane_common::maps::{MirrorCfg, MirrorPort, MirrorRuleCfg, MirrorVni, MIRROR_RULES, MIRROR_SLOTS};
use sdn_proto::v1 as pb;

use crate::overlay::VXLAN_PORT;

/// Where the agent sends a session's copies that reach it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Send {
    /// Out of a tap port's device on this host (the copies were cut to a
    /// snap length, so the kernel could not clone them whole).
    Tap { ifindex: u32 },
    /// VXLAN over UDP: to a tap on another host, or a collector.
    Vxlan { to: SocketAddr, vni: u32 },
    /// GRE with an ERSPAN type II or III header.
    Erspan { to: IpAddr, version: u8, session: u16 },
}

/// One session as this host runs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slot {
    pub id: String,
    pub cfg: MirrorCfg,
    /// `None`: the kernel does everything (a whole-packet tap here).
    pub send: Option<Send>,
    /// Local ports it copies.
    pub ports: usize,
}

/// Everything mirroring needs on this host.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MirrorPlan {
    /// By slot.
    pub slots: BTreeMap<u32, Slot>,
    /// Ports with a session or a tap, by ifindex.
    pub ports: BTreeMap<u32, MirrorPort>,
    /// VNIs copies arrive under from other hosts, for taps here.
    pub vnis: BTreeMap<u32, MirrorVni>,
    /// Hosts copies may come from (IPv4 underlay addresses, as `u32`).
    pub senders: BTreeSet<u32>,
}

/// The masked form of a prefix: (address words, mask words), network order.
fn prefix_words(n: &ipnetwork::IpNetwork) -> ([u32; 4], [u32; 4]) {
    let (bytes, len, width): ([u8; 16], u8, u8) = match n {
        ipnetwork::IpNetwork::V4(v) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&v.network().octets());
            (b, v.prefix(), 32)
        }
        ipnetwork::IpNetwork::V6(v) => (v.network().octets(), v.prefix(), 128),
    };
    let mut mask = [0u8; 16];
    for (i, m) in mask.iter_mut().enumerate().take(usize::from(width / 8)) {
        let bits = (len as i32 - 8 * i as i32).clamp(0, 8);
        *m = if bits == 0 { 0 } else { 0xffu8 << (8 - bits) };
    }
    let words = |b: &[u8; 16]| -> [u32; 4] {
        // The programs load the header's words as they lie in memory.
        core::array::from_fn(|i| u32::from_ne_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]))
    };
    let addr: [u8; 16] = core::array::from_fn(|i| bytes[i] & mask[i]);
    (words(&addr), words(&mask))
}

fn rule_cfg(r: &pb::MirrorRule) -> Result<MirrorRuleCfg, String> {
    let proto = super::protocol_number(r.protocol).ok_or_else(|| format!("protocol {}", r.protocol))?;
    let mut c = MirrorRuleCfg {
        proto,
        ..Default::default()
    };
    let mut family = 0u8;
    for (text, addr, mask) in [
        (&r.source_cidr, &mut c.src, &mut c.src_mask),
        (&r.destination_cidr, &mut c.dst, &mut c.dst_mask),
    ] {
        if text.is_empty() {
            continue;
        }
        let n: ipnetwork::IpNetwork = text.parse().map_err(|e| format!("{text}: {e}"))?;
        family = if n.is_ipv4() { 4 } else { 6 };
        (*addr, *mask) = prefix_words(&n);
    }
    c.family = match proto {
        1 => 4,
        58 => 6,
        _ => family,
    };
    if r.port_max != 0 {
        c.port_lo = r.port_min as u16;
        c.port_hi = r.port_max as u16;
    }
    Ok(c)
}

/// A local port as the sessions select it.
pub struct LocalPort<'a> {
    pub port: &'a pb::Port,
    pub vpc: &'a str,
    pub zone: &'a str,
}

/// Plans the sessions of the share for this host's ports. A session keeps
/// the slot it had (`slots`, updated here): a slot changes hands only when
/// its session is gone, so copies never go to another session's
/// destination while the maps change.
pub fn compile_mirrors(
    sessions: &[&pb::MirrorOnHost],
    ports: &[LocalPort],
    ifindex: &dyn Fn(&str) -> Option<u32>,
    cpus: u32,
    slots: &mut BTreeMap<String, u32>,
    rejected: &mut Vec<String>,
) -> MirrorPlan {
    let mut plan = MirrorPlan::default();
    let mut sorted: Vec<(&pb::MirrorOnHost, &pb::MirrorSession)> = sessions
        .iter()
        .filter_map(|m| Some((*m, m.session.as_ref()?)))
        .collect();
    sorted.sort_by(|a, b| a.1.id.cmp(&b.1.id));
    let ids: Vec<&str> = sorted.iter().map(|(_, s)| s.id.as_str()).collect();
    super::keep_slots(&ids, MIRROR_SLOTS, slots);
    for (on, s) in sorted {
        let Some(slot) = slots.get(&s.id).copied() else {
            rejected.push(format!(
                "mirror session {}: a host runs at most {MIRROR_SLOTS} sessions",
                s.id
            ));
            continue;
        };
        match plan_one(on, s, slot, ports, ifindex, cpus, &mut plan) {
            Ok(()) => {}
            Err(e) => rejected.push(format!("mirror session {}: {e}", s.id)),
        }
    }
    plan
}

#[allow(clippy::too_many_arguments)]
fn plan_one(
    on: &pb::MirrorOnHost,
    s: &pb::MirrorSession,
    slot: u32,
    ports: &[LocalPort],
    ifindex: &dyn Fn(&str) -> Option<u32>,
    cpus: u32,
    plan: &mut MirrorPlan,
) -> Result<(), String> {
    if s.rules.len() > MIRROR_RULES {
        return Err(format!("{} rules; at most {MIRROR_RULES}", s.rules.len()));
    }
    let mut cfg = MirrorCfg {
        active: 1,
        nrules: s.rules.len() as u32,
        sample: s.sample,
        snap_len: s.snap_len,
        rate_per_cpu: (if s.rate_pps == 0 { 100_000 } else { s.rate_pps }).div_ceil(cpus.max(1)),
        ..Default::default()
    };
    for (i, r) in s.rules.iter().enumerate() {
        cfg.rules[i] = rule_cfg(r).map_err(|e| format!("rules[{i}]: {e}"))?;
    }
    let parse_ip = |t: &str| -> Result<IpAddr, String> { t.parse().map_err(|_| format!("address {t:?}")) };
    let mut tap_here: Option<(String, u32)> = None;
    let send = match &s.destination {
        Some(pb::mirror_session::Destination::Tap(t)) => {
            // The share holds this host's ports only: the tap is here if
            // it is among them.
            if let Some(tap) = ports.iter().find(|p| p.port.id == t.port_id) {
                let ifx = ifindex(&tap.port.device)
                    .ok_or_else(|| format!("tap port {}: device {} is not on this host", t.port_id, tap.port.device))?;
                tap_here = Some((t.port_id.clone(), ifx));
                // Copies from the other hosts arrive under the VNI.
                plan.vnis.insert(t.vni, MirrorVni { tap_ifindex: ifx, slot });
                for a in &on.senders {
                    if let Ok(IpAddr::V4(v4)) = a.parse::<IpAddr>() {
                        plan.senders.insert(u32::from(v4));
                    }
                }
                if s.snap_len == 0 {
                    cfg.tap_ifindex = ifx;
                    None
                } else {
                    Some(Send::Tap { ifindex: ifx })
                }
            } else {
                let remote: Ipv4Addr = on
                    .tap_underlay
                    .parse()
                    .map_err(|_| format!("tap port {}: its host has no underlay address", t.port_id))?;
                Some(Send::Vxlan {
                    to: SocketAddr::new(IpAddr::V4(remote), VXLAN_PORT),
                    vni: t.vni,
                })
            }
        }
        Some(pb::mirror_session::Destination::Vxlan(v)) => Some(Send::Vxlan {
            to: SocketAddr::new(
                parse_ip(&v.remote)?,
                if v.port == 0 { VXLAN_PORT } else { v.port as u16 },
            ),
            vni: v.vni,
        }),
        Some(pb::mirror_session::Destination::Erspan(e)) => Some(Send::Erspan {
            to: parse_ip(&e.remote)?,
            version: e.version as u8,
            session: e.session as u16,
        }),
        None => return Err("no destination".into()),
    };
    cfg.to_agent = u32::from(send.is_some());
    let (copy_in, copy_out) = match s.direction.as_str() {
        "in" => (true, false),
        "out" => (false, true),
        "both" => (true, true),
        d => return Err(format!("direction {d:?}")),
    };
    let tap_id = tap_here.as_ref().map(|t| t.0.as_str());
    let selected = ports.iter().filter(|p| {
        tap_id != Some(p.port.id.as_str())
            && match &s.destination {
                Some(pb::mirror_session::Destination::Tap(t)) => t.port_id != p.port.id,
                _ => true,
            }
            && if !s.port_id.is_empty() {
                p.port.id == s.port_id
            } else if !s.vpc_id.is_empty() {
                p.vpc == s.vpc_id
            } else if !s.tenant_id.is_empty() {
                p.port.tenant_id == s.tenant_id
            } else if !s.zone_id.is_empty() {
                p.zone == s.zone_id
            } else {
                true
            }
    });
    let mut n = 0;
    for p in selected {
        let Some(ifx) = ifindex(&p.port.device) else { continue };
        let e = plan.ports.entry(ifx).or_default();
        if copy_in {
            e.in_mask |= 1 << slot;
        }
        if copy_out {
            e.out_mask |= 1 << slot;
        }
        n += 1;
    }
    if let Some((_, ifx)) = tap_here {
        plan.ports.entry(ifx).or_default().tap = 1;
    }
    plan.slots.insert(
        slot,
        Slot {
            id: s.id.clone(),
            cfg,
            send,
            ports: n,
        },
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(id: &str) -> pb::MirrorOnHost {
        pb::MirrorOnHost {
            session: Some(pb::MirrorSession {
                id: id.into(),
                direction: "both".into(),
                destination: Some(pb::mirror_session::Destination::Vxlan(pb::MirrorVxlan {
                    remote: "192.0.2.9".into(),
                    vni: 9000,
                    port: 0,
                })),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// A session keeps its slot when others come and go; a new one takes
    /// the first free slot, and one beyond the slots is rejected by name.
    #[test]
    fn sessions_keep_their_slots() {
        let mut slots = BTreeMap::new();
        let plan = |names: &[&str], slots: &mut BTreeMap<String, u32>, rejected: &mut Vec<String>| {
            let s: Vec<pb::MirrorOnHost> = names.iter().map(|n| session(n)).collect();
            let refs: Vec<&pb::MirrorOnHost> = s.iter().collect();
            compile_mirrors(&refs, &[], &|_| None, 2, slots, rejected)
        };
        let mut rejected = Vec::new();
        plan(&["b", "c"], &mut slots, &mut rejected);
        assert_eq!((slots["b"], slots["c"]), (0, 1));
        // "a" sorts first but takes the free slot; "b" and "c" stay.
        let p = plan(&["a", "b", "c"], &mut slots, &mut rejected);
        assert_eq!((slots["a"], slots["b"], slots["c"]), (2, 0, 1));
        assert_eq!(p.slots[&2].id, "a");
        // "b" goes: its slot is free for the next one.
        plan(&["a", "c", "d"], &mut slots, &mut rejected);
        assert_eq!((slots["a"], slots["c"], slots["d"]), (2, 1, 0));
        assert!(rejected.is_empty());
        let many: Vec<String> = (0..MIRROR_SLOTS + 1).map(|i| format!("s{i:02}")).collect();
        let names: Vec<&str> = many.iter().map(String::as_str).collect();
        let mut fresh = BTreeMap::new();
        plan(&names, &mut fresh, &mut rejected);
        assert_eq!(rejected.len(), 1, "{rejected:?}");
        assert!(rejected[0].contains("s16"), "{rejected:?}");
    }

    #[test]
    fn prefixes_become_masked_words_in_memory_order() {
        let (a, m) = prefix_words(&"10.1.2.0/23".parse().unwrap());
        assert_eq!(a[0].to_ne_bytes(), [10, 1, 2, 0]);
        assert_eq!(m[0].to_ne_bytes(), [255, 255, 254, 0]);
        assert_eq!(&m[1..], &[0, 0, 0]);
        let (a, m) = prefix_words(&"fd00:1::/33".parse().unwrap());
        assert_eq!(a[0].to_ne_bytes(), [0xfd, 0, 0, 1]);
        assert_eq!(m[1].to_ne_bytes(), [0x80, 0, 0, 0]);
        assert_eq!(m[2], 0);
    }
}
