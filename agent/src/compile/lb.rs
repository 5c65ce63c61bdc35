//! Load balancers: each listener's VIP of each family becomes a service
//! with its backend slots and its table of [`LB_TABLE_SIZE`] slots, which
//! the programs pick a new flow's backend from.
//!
//! - round robin and weighted round robin: the table is nginx's smooth
//!   weighted round-robin sequence (each member in proportion to its
//!   weight, spread out rather than in runs), walked by a per-CPU cursor;
//! - Maglev: the table is Maglev's lookup table with weights, built from
//!   the members' ids alone, so every host builds the same one and a flow
//!   lands on the same member from any host; when one of N members
//!   leaves, about 1/N of the table moves.
//!
//! Services and backend slots keep their numbers from pass to pass, so a
//! flow keeps its backend across changes that leave the backend in place.
//! A draining member keeps its slot (its flows stay) but leaves the table
//! (no new flow); a disabled one leaves both.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use dataplane_common::lb::{
    LbBackend, LbService, LbServiceKey, NatService, NatServiceKey, LB_BACKENDS, LB_BACKEND_LIVE, LB_BACKEND_NEW,
    LB_SERVICES_MAX, LB_TABLE_SIZE, SCHED_LEAST, SCHED_TABLE_CURSOR, SCHED_TABLE_HASH,
};
use dataplane_common::maps::{Endpoint, EndpointKey, EP_F_GATEWAY, EP_F_NAT, GATEWAY_MAC};
use sdn_proto::v1 as pb;

use super::addr16;

/// A table slot no backend holds.
pub const NO_BACKEND: u32 = u32::MAX;

/// One service as this host holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePlan {
    pub info: LbService,
    /// Backend slot -> backend (live ones only).
    pub backends: BTreeMap<u32, LbBackend>,
    /// [`LB_TABLE_SIZE`] backend slots.
    pub table: Vec<u32>,
    /// For messages: "lb/listener/family".
    pub name: String,
    /// Member ids by backend address and port (flow records name them).
    pub members: BTreeMap<([u8; 16], u16), String>,
}

/// Everything the load balancers need on this host.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LbPlan {
    pub services: BTreeMap<LbServiceKey, ServicePlan>,
    /// The VPCs (VNIs) with load balancers: their ports translate.
    pub vnis: BTreeSet<u32>,
    /// The VIPs as addresses of their VPCs, answered as the gateways are
    /// (ARP, neighbour discovery) and never forwarded to untranslated.
    pub vips: BTreeMap<EndpointKey, Endpoint>,
    /// The ports (ifindex) that translate, with their VPC's VNI: the
    /// agent's count of flows finds their conntrack entries by it.
    pub ports: BTreeMap<u32, u32>,
    /// When the next draining member's drain time ends (Unix ms).
    pub drain_ends: Option<u64>,
    /// The north-south services this host translates (it is one of their
    /// load balancer's NAT hosts).
    pub nat: BTreeMap<NatServiceKey, NatService>,
}

/// A north-south service of this host, before its VPC's zone and border
/// firewall are known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatPlan {
    pub key: NatServiceKey,
    /// The listener's service it shares backends and table with.
    pub service: LbServiceKey,
    pub vpc_id: String,
    /// This host's NAT address of the VIP's family.
    pub nat: [u8; 16],
}

/// A VIP held by hosts: its holders, and the holder the controller last
/// granted it to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VipOwner {
    pub holders: BTreeSet<String>,
    pub owner: String,
}

/// The NAT hosts' addresses of load balancers exposed to their zone: on
/// `host`'s own, the member's replies are translated back (`EP_F_NAT`); on
/// another NAT host's, they go to that host through the tunnel (and only
/// that host may send from them). The NAT address of a holder of a VIP
/// held by hosts is answered where the VIP's owner is: its flows, carried
/// to the owner, go on from the same address after a failover. Goes into
/// `plan.vips` (the VPCs' endpoints); returns the services `host`
/// translates.
pub fn compile_nat(
    lbs: &[&pb::LoadBalancerOnHost],
    owners: &BTreeMap<(u32, IpAddr), VipOwner>,
    host: &str,
    plan: &mut LbPlan,
    rejected: &mut Vec<String>,
) -> Vec<NatPlan> {
    let mut out = Vec::new();
    for l in lbs {
        let Some(lb) = &l.load_balancer else { continue };
        if lb.exposure != "zone" {
            continue;
        }
        for h in &lb.nat_hosts {
            let underlay = l
                .nat_underlays
                .get(&h.host_id)
                .and_then(|u| u.parse::<std::net::Ipv4Addr>().ok());
            let mine = h.host_id == host;
            if underlay.is_none() && !mine {
                rejected.push(format!(
                    "load balancer {}: NAT host {} has no IPv4 underlay address in the share; replies cannot reach it",
                    lb.id, h.host_id
                ));
                continue;
            }
            for (vip, nat) in [(&lb.vip_v4, &h.ipv4), (&lb.vip_v6, &h.ipv6)] {
                let (Ok(vip), Ok(nat)) = (vip.parse::<IpAddr>(), nat.parse::<IpAddr>()) else {
                    continue;
                };
                let (family, nat16) = addr16(nat);
                let vip16 = addr16(vip).1;
                // Where the address is answered: its own host, or the owner
                // of the VIP the host holds with others (when that owner's
                // underlay is known).
                let owner = owners
                    .get(&(l.vni, vip))
                    .filter(|o| o.holders.contains(&h.host_id) && o.holders.contains(&o.owner))
                    .map(|o| o.owner.as_str())
                    .filter(|o| {
                        *o == host
                            || l.nat_underlays
                                .get(*o)
                                .is_some_and(|u| u.parse::<std::net::Ipv4Addr>().is_ok())
                    })
                    .unwrap_or(h.host_id.as_str());
                let at = if owner == h.host_id {
                    underlay
                } else {
                    l.nat_underlays.get(owner).and_then(|u| u.parse().ok())
                };
                plan.vips.insert(
                    EndpointKey {
                        vni: l.vni,
                        family,
                        _pad: [0; 3],
                        addr: nat16,
                    },
                    Endpoint {
                        ifindex: 0,
                        host_v4: at.map_or([0; 4], |u| u.octets()),
                        mac: GATEWAY_MAC,
                        flags: if owner == host { EP_F_NAT } else { 0 },
                        vni: l.vni,
                        policy: 0,
                    },
                );
                if !mine {
                    continue;
                }
                for k in plan.services.keys() {
                    if k.vni == l.vni && k.family == family && k.addr == vip16 {
                        out.push(NatPlan {
                            key: NatServiceKey {
                                family,
                                proto: k.proto,
                                port: k.port,
                                addr: vip16,
                            },
                            service: *k,
                            vpc_id: lb.vpc_id.clone(),
                            nat: nat16,
                        });
                    }
                }
            }
        }
    }
    out
}

/// Slots kept from pass to pass: services by name, and each service's
/// backends by member id.
#[derive(Clone, Debug, Default)]
pub struct LbSlots {
    pub services: BTreeMap<String, u32>,
    pub backends: BTreeMap<String, BTreeMap<String, u32>>,
    /// What the pinned maps held when the agent started, for its first
    /// pass: each service keeps its number and each backend its slot, so
    /// that a restart moves no flow.
    pub held: Option<LbHeld>,
}

/// The services and backend slots the pinned maps hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LbHeld {
    pub services: BTreeMap<LbServiceKey, u32>,
    /// Service number -> (address, port) -> slot.
    pub backends: BTreeMap<u32, BTreeMap<([u8; 16], u16), u32>>,
}

/// Plans the load balancers of the share.
/// `now_ms` (Unix ms) decides which draining members are past their pool's
/// drain time: those are gone, their flows with them. A member on a
/// quarantined port takes no new flow.
pub fn compile_lbs(
    lbs: &[&pb::LoadBalancerOnHost],
    slots: &mut LbSlots,
    rejected: &mut Vec<String>,
    now_ms: u64,
    quarantined: &dyn Fn(&str) -> bool,
) -> LbPlan {
    let mut plan = LbPlan::default();
    // (name, key, listener, members) for every service, in name order.
    let mut wanted: Vec<(String, LbServiceKey, &pb::Listener, Vec<(&pb::BackendOnHost, IpAddr)>)> = Vec::new();
    for l in lbs {
        let Some(lb) = &l.load_balancer else { continue };
        plan.vnis.insert(l.vni);
        for vip in [&lb.vip_v4, &lb.vip_v6] {
            let Ok(a) = vip.parse::<IpAddr>() else { continue };
            let (family, addr) = addr16(a);
            plan.vips.insert(
                EndpointKey {
                    vni: l.vni,
                    family,
                    _pad: [0; 3],
                    addr,
                },
                Endpoint {
                    ifindex: 0,
                    host_v4: [0; 4],
                    mac: GATEWAY_MAC,
                    flags: EP_F_GATEWAY,
                    vni: l.vni,
                    policy: 0,
                },
            );
        }
        for lo in &l.listeners {
            let Some(li) = &lo.listener else { continue };
            let proto = match li.protocol.as_str() {
                "tcp" => 6,
                "udp" => 17,
                p => {
                    rejected.push(format!("listener {}: protocol {p:?} unknown here", li.id));
                    continue;
                }
            };
            let Ok(port) = u16::try_from(li.port) else {
                rejected.push(format!("listener {}: port {} out of range", li.id, li.port));
                continue;
            };
            for (family, vip) in [("v4", &lb.vip_v4), ("v6", &lb.vip_v6)] {
                let Ok(vip) = vip.parse::<IpAddr>() else { continue };
                let (fam, addr) = addr16(vip);
                let members: Vec<(&pb::BackendOnHost, IpAddr)> = lo
                    .backends
                    .iter()
                    .filter_map(|b| {
                        let a = b
                            .addresses
                            .iter()
                            .filter_map(|a| a.parse::<IpAddr>().ok())
                            .find(|a| a.is_ipv4() == vip.is_ipv4())?;
                        Some((b, a))
                    })
                    .collect();
                wanted.push((
                    format!("{}/{}/{family}", lb.id, li.id),
                    LbServiceKey {
                        vni: l.vni,
                        family: fam,
                        proto,
                        port,
                        addr,
                    },
                    li,
                    members,
                ));
            }
        }
    }
    wanted.sort_by(|a, b| a.0.cmp(&b.0));
    // After a restart, each service and backend takes the number it had in
    // the kernel (where it is still the same service and backend).
    if let Some(held) = slots.held.take() {
        let mut taken = BTreeSet::new();
        for (name, key, li, members) in &wanted {
            let Some(id) = held.services.get(key).copied().filter(|id| taken.insert(*id)) else {
                continue;
            };
            slots.services.insert(name.clone(), id);
            let Some(was) = held.backends.get(&id) else { continue };
            let port_of = |b: &pb::BackendOnHost| u16::try_from(if b.port == 0 { li.port } else { b.port }).ok();
            let kept = slots.backends.entry(name.clone()).or_default();
            let mut used = BTreeSet::new();
            for (b, a) in members {
                let Some(port) = port_of(b) else { continue };
                if let Some(slot) = was.get(&(addr16(*a).1, port)).copied().filter(|s| used.insert(*s)) {
                    kept.insert(b.member_id.clone(), slot);
                }
            }
        }
    }
    let names: Vec<&str> = wanted.iter().map(|w| w.0.as_str()).collect();
    super::keep_slots(&names, LB_SERVICES_MAX, &mut slots.services);
    slots.backends.retain(|k, _| slots.services.contains_key(k));
    for (name, key, li, members) in wanted {
        let scheduler = &li.scheduler;
        let Some(id) = slots.services.get(&name).copied() else {
            rejected.push(format!(
                "load balancer service {name}: a host holds at most {LB_SERVICES_MAX} services"
            ));
            continue;
        };
        // Live members (enabled, or draining within the drain time) keep
        // their slots.
        let mut live: Vec<(&pb::BackendOnHost, IpAddr)> = Vec::new();
        for (b, a) in members {
            let drained = b.state == "draining" && b.drain_until_unix_ms != 0 && b.drain_until_unix_ms <= now_ms;
            if b.state == "disabled" || drained {
                continue;
            }
            if b.state == "draining" && b.drain_until_unix_ms != 0 {
                let t = b.drain_until_unix_ms;
                plan.drain_ends = Some(plan.drain_ends.map_or(t, |n| n.min(t)));
            }
            live.push((b, a));
        }
        live.sort_by(|a, b| a.0.member_id.cmp(&b.0.member_id));
        let ids: Vec<&str> = live.iter().map(|(b, _)| b.member_id.as_str()).collect();
        let kept = slots.backends.entry(name.clone()).or_default();
        super::keep_slots(&ids, LB_BACKENDS, kept);
        // Members found failing take no new flow, unless every member
        // that would is failing: then the checks are taken to be wrong
        // rather than every member (a panic threshold of 100%).
        let out = |b: &pb::BackendOnHost| !b.port_id.is_empty() && quarantined(&b.port_id);
        let all_down = !live.iter().any(|(b, _)| b.state == "enabled" && !b.down && !out(b));
        let mut backends = BTreeMap::new();
        let mut member_ids = BTreeMap::new();
        let mut eligible: Vec<(String, u32, u32)> = Vec::new();
        for (b, a) in &live {
            let Some(slot) = kept.get(&b.member_id).copied() else {
                continue;
            };
            let Ok(port) = u16::try_from(b.port) else { continue };
            member_ids.insert((addr16(*a).1, port), b.member_id.clone());
            // A member its health check found failing takes no new flow
            // (its flows stay, as a draining member's do).
            let taking = b.state == "enabled" && (!b.down || all_down) && !out(b);
            backends.insert(
                slot,
                LbBackend {
                    addr: addr16(*a).1,
                    port,
                    flags: LB_BACKEND_LIVE | if taking { LB_BACKEND_NEW } else { 0 },
                    weight: if scheduler == "least_connections" {
                        1
                    } else {
                        b.weight.clamp(1, 256) as u16
                    },
                    _pad: 0,
                },
            );
            if taking {
                eligible.push((b.member_id.clone(), b.weight.max(1), slot));
            }
        }
        let (sched, table) = match scheduler.as_str() {
            _ if eligible.is_empty() => (0, vec![NO_BACKEND; LB_TABLE_SIZE as usize]),
            "round_robin" => {
                let equal: Vec<(String, u32, u32)> = eligible.iter().map(|(m, _, s)| (m.clone(), 1, *s)).collect();
                (SCHED_TABLE_CURSOR, smooth_wrr(&equal, LB_TABLE_SIZE as usize))
            }
            "weighted_round_robin" => (SCHED_TABLE_CURSOR, smooth_wrr(&eligible, LB_TABLE_SIZE as usize)),
            "maglev" => (SCHED_TABLE_HASH, maglev(&eligible, LB_TABLE_SIZE as usize)),
            // Decided from the flows' counts: no table.
            "least_connections" | "weighted_least_connections" => (SCHED_LEAST, Vec::new()),
            other => {
                rejected.push(format!(
                    "load balancer service {name}: scheduler {other:?} is unknown here; its new flows are refused"
                ));
                (0, vec![NO_BACKEND; LB_TABLE_SIZE as usize])
            }
        };
        let generation = {
            let mut b: Vec<u8> = vec![sched];
            for (s, be) in &backends {
                b.extend_from_slice(&s.to_be_bytes());
                b.extend_from_slice(&be.addr);
                b.extend_from_slice(&be.port.to_be_bytes());
                b.extend_from_slice(&be.flags.to_be_bytes());
                b.extend_from_slice(&be.weight.to_be_bytes());
            }
            for t in &table {
                b.extend_from_slice(&t.to_be_bytes());
            }
            super::fnv32(&b)
        };
        plan.services.insert(
            key,
            ServicePlan {
                info: LbService {
                    id,
                    scheduler: sched,
                    _pad: 0,
                    slots: backends.keys().next_back().map_or(0, |s| *s as u16 + 1),
                    generation,
                    persistence_secs: li.persistence_secs,
                },
                backends,
                table,
                name,
                members: member_ids,
            },
        );
    }
    plan
}

/// nginx's smooth weighted round robin, run for `len` steps: each member
/// (id, weight, slot) gets its share of the steps within one, spread out.
pub fn smooth_wrr(members: &[(String, u32, u32)], len: usize) -> Vec<u32> {
    let total: i64 = members.iter().map(|m| m.1 as i64).sum();
    let mut current = vec![0i64; members.len()];
    let mut out = Vec::with_capacity(len);
    for _ in 0..len {
        let mut best = 0;
        for (i, m) in members.iter().enumerate() {
            current[i] += m.1 as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        out.push(members[best].2);
    }
    out
}

/// 64-bit FNV-1a of `s` after `seed`.
fn fnv64(seed: u64, s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in s.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Maglev's lookup table of `len` (a prime) slots with weights: each member
/// (id, weight, slot) fills the next free slot of its own permutation of
/// the table, as often as its weight against the heaviest allows, until
/// the table is full. The permutations come from the ids alone.
pub fn maglev(members: &[(String, u32, u32)], len: usize) -> Vec<u32> {
    let m = len as u64;
    let mut table = vec![NO_BACKEND; len];
    if members.is_empty() {
        return table;
    }
    let mut order: Vec<&(String, u32, u32)> = members.iter().collect();
    order.sort_by(|a, b| a.0.cmp(&b.0));
    let perm: Vec<(u64, u64)> = order
        .iter()
        .map(|(id, _, _)| (fnv64(0x6d61_676c, id) % m, fnv64(0x736b_6970, id) % (m - 1) + 1))
        .collect();
    let heaviest = order.iter().map(|x| x.1).max().unwrap_or(1) as u64;
    let mut next = vec![0u64; order.len()];
    let mut credit = vec![0u64; order.len()];
    let mut filled = 0;
    while filled < len {
        for (i, (_, w, slot)) in order.iter().enumerate() {
            credit[i] += *w as u64;
            while credit[i] >= heaviest && filled < len {
                credit[i] -= heaviest;
                let (offset, skip) = perm[i];
                loop {
                    let c = ((offset + next[i] * skip) % m) as usize;
                    next[i] += 1;
                    if table[c] == NO_BACKEND {
                        table[c] = *slot;
                        filled += 1;
                        break;
                    }
                }
            }
            if filled == len {
                break;
            }
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(n: usize, weight: impl Fn(usize) -> u32) -> Vec<(String, u32, u32)> {
        (0..n).map(|i| (format!("m{i}"), weight(i), i as u32)).collect()
    }

    fn shares(table: &[u32]) -> BTreeMap<u32, usize> {
        let mut c = BTreeMap::new();
        for s in table {
            *c.entry(*s).or_default() += 1;
        }
        c
    }

    /// Weighted round robin gives each member its weight's share of the
    /// sequence within one step, spread out: no member twice in a row
    /// unless its weight is more than half.
    #[test]
    fn smooth_wrr_is_proportional_and_spread() {
        let m = members(3, |i| [5, 1, 1][i]);
        let t = smooth_wrr(&m, 7);
        // nginx's own example: a a b a c a a.
        assert_eq!(t, [0, 0, 1, 0, 2, 0, 0]);
        let m = members(4, |i| i as u32 + 1);
        let t = smooth_wrr(&m, LB_TABLE_SIZE as usize);
        let c = shares(&t);
        for (slot, n) in c {
            let want = LB_TABLE_SIZE as f64 * (slot + 1) as f64 / 10.0;
            assert!((n as f64 - want).abs() <= 1.0, "slot {slot}: {n} vs {want}");
        }
        let rr = smooth_wrr(&members(3, |_| 1), 9);
        assert_eq!(rr, [0, 1, 2, 0, 1, 2, 0, 1, 2]);
    }

    /// Maglev fills the table in proportion to the weights, the same table
    /// from the same ids in any order, and moves about 1/N of it when one
    /// of N members leaves (only slots the leaver held, and a few more).
    #[test]
    fn maglev_is_balanced_consistent_and_moves_little() {
        let len = LB_TABLE_SIZE as usize;
        let ten = members(10, |_| 1);
        let t = maglev(&ten, len);
        assert!(t.iter().all(|s| *s != NO_BACKEND));
        for (_, n) in shares(&t) {
            assert!((n as f64 - len as f64 / 10.0).abs() < len as f64 * 0.02, "{n}");
        }
        let mut shuffled = ten.clone();
        shuffled.reverse();
        assert_eq!(maglev(&shuffled, len), t, "the order given changes nothing");
        let nine: Vec<_> = ten.iter().filter(|m| m.0 != "m3").cloned().collect();
        let u = maglev(&nine, len);
        let moved = t.iter().zip(&u).filter(|(a, b)| a != b).count();
        let lost = t.iter().filter(|s| **s == 3).count();
        assert!(moved >= lost);
        assert!(
            (moved as f64) < len as f64 * 0.16,
            "one of ten left: {moved} of {len} slots moved ({lost} were its own)"
        );
        // Weights: 3:1.
        let w = maglev(&members(2, |i| [3, 1][i]), len);
        let c = shares(&w);
        let ratio = c[&0] as f64 / c[&1] as f64;
        assert!((ratio - 3.0).abs() < 0.1, "{ratio}");
    }

    fn lb(schedulers: &[&str], members: &[(&str, &str, &str)]) -> pb::LoadBalancerOnHost {
        pb::LoadBalancerOnHost {
            load_balancer: Some(pb::LoadBalancer {
                id: "lb".into(),
                vip_v4: "10.0.0.100".into(),
                vip_v6: "fd00::100".into(),
                ..Default::default()
            }),
            vni: 7,
            listeners: schedulers
                .iter()
                .enumerate()
                .map(|(i, s)| pb::ListenerOnHost {
                    listener: Some(pb::Listener {
                        id: format!("l{i}"),
                        protocol: "tcp".into(),
                        port: 80 + i as u32,
                        scheduler: s.to_string(),
                        ..Default::default()
                    }),
                    backends: members
                        .iter()
                        .map(|(id, addr, state)| pb::BackendOnHost {
                            member_id: id.to_string(),
                            addresses: vec![addr.to_string()],
                            port: 8080,
                            weight: 1,
                            state: state.to_string(),
                            drain_until_unix_ms: if *state == "draining" { 5_000 } else { 0 },
                            ..Default::default()
                        })
                        .collect(),
                    health: None,
                })
                .collect(),
            ..Default::default()
        }
    }

    /// A load balancer exposed to its zone: each NAT host's addresses are
    /// endpoints of the VPC, the host's own marked as such (replies to it
    /// are translated back), another's at that host; only the host's own
    /// services are translated there.
    #[test]
    fn nat_addresses_are_endpoints_and_only_a_nat_host_translates() {
        let mut a = lb(&["maglev", "round_robin"], &[("a", "10.0.0.1", "enabled")]);
        let l = a.load_balancer.as_mut().unwrap();
        l.exposure = "zone".into();
        l.nat_hosts = vec![
            pb::NatHost {
                host_id: "h1".into(),
                ipv4: "10.0.0.200".into(),
                ipv6: "fd00::200".into(),
            },
            pb::NatHost {
                host_id: "h2".into(),
                ipv4: "10.0.0.201".into(),
                ipv6: "fd00::201".into(),
            },
        ];
        a.nat_underlays = [
            ("h1".to_string(), "192.0.2.1".to_string()),
            ("h2".into(), "192.0.2.2".into()),
        ]
        .into();
        let ep = |p: &LbPlan, addr: &str| {
            let (family, addr) = addr16(addr.parse().unwrap());
            p.vips
                .get(&EndpointKey {
                    vni: 7,
                    family,
                    _pad: [0; 3],
                    addr,
                })
                .copied()
        };
        let mut p = compile_lbs(&[&a], &mut LbSlots::default(), &mut Vec::new(), 0, &|_| false);
        let mut rejected = Vec::new();
        let nat = compile_nat(&[&a], &BTreeMap::new(), "h1", &mut p, &mut rejected);
        assert!(rejected.is_empty(), "{rejected:?}");
        let own = ep(&p, "10.0.0.200").expect("h1's own address");
        assert_eq!((own.ifindex, own.flags), (0, EP_F_NAT));
        let other = ep(&p, "fd00::201").expect("h2's address");
        assert_eq!((other.ifindex, other.flags, other.host_v4), (0, 0, [192, 0, 2, 2]));
        // Two listeners, two families: four services, from h1's addresses.
        assert_eq!(nat.len(), 4);
        for n in &nat {
            let want = if n.key.family == 4 { "10.0.0.200" } else { "fd00::200" };
            assert_eq!(n.nat, addr16(want.parse().unwrap()).1);
            assert_eq!(n.service.addr, n.key.addr);
            assert!(p.services.contains_key(&n.service));
        }
        // A host that is no NAT host translates nothing, and knows where
        // both hosts' addresses are.
        let mut p = compile_lbs(&[&a], &mut LbSlots::default(), &mut Vec::new(), 0, &|_| false);
        assert!(compile_nat(&[&a], &BTreeMap::new(), "h3", &mut p, &mut Vec::new()).is_empty());
        assert_eq!(ep(&p, "10.0.0.200").unwrap().host_v4, [192, 0, 2, 1]);
        assert_eq!(ep(&p, "10.0.0.200").unwrap().flags, 0);
        // A VIP the two hold, owned by h2: both NAT addresses of its family
        // are answered at h2 (its flows go on from the address they began
        // at); the other family's stay where they are.
        let vip = a.load_balancer.as_ref().unwrap().vip_v4.parse().unwrap();
        let owners: BTreeMap<(u32, IpAddr), VipOwner> = [(
            (7, vip),
            VipOwner {
                holders: ["h1".to_string(), "h2".to_string()].into(),
                owner: "h2".into(),
            },
        )]
        .into();
        for (host, flags) in [("h1", 0), ("h2", EP_F_NAT), ("h3", 0)] {
            let mut p = compile_lbs(&[&a], &mut LbSlots::default(), &mut Vec::new(), 0, &|_| false);
            compile_nat(&[&a], &owners, host, &mut p, &mut Vec::new());
            for addr in ["10.0.0.200", "10.0.0.201"] {
                let e = ep(&p, addr).unwrap();
                assert_eq!((e.host_v4, e.flags), ([192, 0, 2, 2], flags), "{host}: {addr}");
            }
            let e = ep(&p, "fd00::200").unwrap();
            assert_eq!(e.host_v4, [192, 0, 2, 1], "{host}");
        }
        // The same address in another VPC moves nothing.
        let other: BTreeMap<(u32, IpAddr), VipOwner> = [((8, vip), owners[&(7, vip)].clone())].into();
        let mut p = compile_lbs(&[&a], &mut LbSlots::default(), &mut Vec::new(), 0, &|_| false);
        compile_nat(&[&a], &other, "h1", &mut p, &mut Vec::new());
        assert_eq!(ep(&p, "10.0.0.200").unwrap().flags, EP_F_NAT);
        // An owner that is no holder moves nothing.
        let mut stray = owners.clone();
        stray.get_mut(&(7, vip)).unwrap().owner = "h3".into();
        let mut p = compile_lbs(&[&a], &mut LbSlots::default(), &mut Vec::new(), 0, &|_| false);
        compile_nat(&[&a], &stray, "h3", &mut p, &mut Vec::new());
        assert_eq!(ep(&p, "10.0.0.200").unwrap().host_v4, [192, 0, 2, 1]);
        // A NAT host whose underlay is unknown: its addresses are left out,
        // and said so.
        a.nat_underlays.remove("h2");
        let mut p = compile_lbs(&[&a], &mut LbSlots::default(), &mut Vec::new(), 0, &|_| false);
        let mut rejected = Vec::new();
        compile_nat(&[&a], &BTreeMap::new(), "h1", &mut p, &mut rejected);
        assert!(ep(&p, "10.0.0.201").is_none());
        assert!(rejected.iter().any(|r| r.contains("NAT host h2")), "{rejected:?}");
        // Exposed to the VPC only: no NAT at all.
        a.load_balancer.as_mut().unwrap().exposure = "vpc".into();
        let mut p = compile_lbs(&[&a], &mut LbSlots::default(), &mut Vec::new(), 0, &|_| false);
        assert!(compile_nat(&[&a], &BTreeMap::new(), "h1", &mut p, &mut Vec::new()).is_empty());
        assert!(ep(&p, "10.0.0.200").is_none());
    }

    /// After a restart, services and backends take the numbers the kernel
    /// held, whatever order a fresh start would give them.
    #[test]
    fn a_restart_keeps_the_kernels_numbers() {
        let a = lb(
            &["round_robin"],
            &[("a", "10.0.0.1", "enabled"), ("b", "10.0.0.2", "enabled")],
        );
        let mut first = LbSlots::default();
        let p = compile_lbs(&[&a], &mut first, &mut Vec::new(), 0, &|_| false);
        let v4 = p.services.iter().find(|(_, s)| s.name == "lb/l0/v4").unwrap();
        // What the kernel held: the service as number 9, b in slot 0 and a
        // in slot 5.
        let mut held = LbHeld::default();
        held.services.insert(*v4.0, 9);
        held.backends.insert(
            9,
            BTreeMap::from([
                ((addr16("10.0.0.2".parse().unwrap()).1, 8080), 0),
                ((addr16("10.0.0.1".parse().unwrap()).1, 8080), 5),
            ]),
        );
        let mut slots = LbSlots {
            held: Some(held),
            ..Default::default()
        };
        let p = compile_lbs(&[&a], &mut slots, &mut Vec::new(), 0, &|_| false);
        let v4 = p.services.values().find(|s| s.name == "lb/l0/v4").unwrap();
        assert_eq!(v4.info.id, 9);
        assert_eq!(v4.backends[&0].addr[3], 2);
        assert_eq!(v4.backends[&5].addr[3], 1);
        assert_eq!(v4.info.slots, 6);
        // The v6 service (no held number) takes a free one.
        let v6 = p.services.values().find(|s| s.name == "lb/l0/v6").unwrap();
        assert_ne!(v6.info.id, 9);
    }

    /// Services per family; backends keep their slots as members come and
    /// go; draining keeps the slot and leaves the table; an unsupported
    /// scheduler is named and refuses new flows.
    #[test]
    fn services_and_slots_are_kept() {
        let mut slots = LbSlots::default();
        let mut rejected = Vec::new();
        let a = lb(
            &["maglev"],
            &[("a", "10.0.0.1", "enabled"), ("b", "10.0.0.2", "enabled")],
        );
        let p = compile_lbs(&[&a], &mut slots, &mut rejected, 0, &|_| false);
        assert!(rejected.is_empty(), "{rejected:?}");
        assert_eq!(p.services.len(), 2, "v4 and v6");
        assert_eq!(p.vnis, BTreeSet::from([7]));
        let v4 = p.services.values().find(|s| s.name == "lb/l0/v4").unwrap();
        let v6 = p.services.values().find(|s| s.name == "lb/l0/v6").unwrap();
        assert_eq!(v4.backends.len(), 2);
        assert_eq!(v6.info.scheduler, 0, "no member has an IPv6 address: no new flow");
        let slot_b = v4
            .backends
            .iter()
            .find(|(_, b)| b.addr[3] == 2)
            .map(|(s, _)| *s)
            .unwrap();
        // a leaves, c comes, b drains: b keeps its slot, and only c is in the table.
        let a2 = lb(
            &["maglev"],
            &[("b", "10.0.0.2", "draining"), ("c", "10.0.0.3", "enabled")],
        );
        let p = compile_lbs(&[&a2], &mut slots, &mut rejected, 0, &|_| false);
        let v4 = p.services.values().find(|s| s.name == "lb/l0/v4").unwrap();
        assert_eq!(v4.backends[&slot_b].addr[3], 2);
        let slot_c = v4
            .backends
            .iter()
            .find(|(_, b)| b.addr[3] == 3)
            .map(|(s, _)| *s)
            .unwrap();
        assert!(v4.table.iter().all(|s| *s == slot_c));
        let lc = lb(&["least_connections"], &[("a", "10.0.0.1", "enabled")]);
        let p = compile_lbs(&[&lc], &mut slots, &mut rejected, 0, &|_| false);
        let v4 = p.services.values().find(|s| s.name == "lb/l0/v4").unwrap();
        assert_eq!(v4.info.scheduler, SCHED_LEAST);
        assert!(v4.table.is_empty());
        let odd = lb(&["fastest"], &[("a", "10.0.0.1", "enabled")]);
        let p = compile_lbs(&[&odd], &mut slots, &mut rejected, 0, &|_| false);
        assert!(p.services.values().all(|s| s.info.scheduler == 0));
        assert!(rejected.iter().any(|r| r.contains("fastest")), "{rejected:?}");
    }

    /// A draining member keeps its slot until its drain time ends (5 s
    /// here), and the plan says when; after that it is gone.
    #[test]
    fn a_drain_ends_at_its_time() {
        let mut slots = LbSlots::default();
        let a = lb(
            &["round_robin"],
            &[("a", "10.0.0.1", "enabled"), ("b", "10.0.0.2", "draining")],
        );
        let p = compile_lbs(&[&a], &mut slots, &mut Vec::new(), 4_999, &|_| false);
        assert_eq!(p.drain_ends, Some(5_000));
        let v4 = p.services.values().find(|s| s.name == "lb/l0/v4").unwrap();
        assert_eq!(v4.backends.len(), 2);
        let p = compile_lbs(&[&a], &mut slots, &mut Vec::new(), 5_000, &|_| false);
        assert_eq!(p.drain_ends, None);
        let v4 = p.services.values().find(|s| s.name == "lb/l0/v4").unwrap();
        assert_eq!(v4.backends.len(), 1);
        assert_eq!(v4.backends.values().next().unwrap().addr[3], 1);
    }
}
