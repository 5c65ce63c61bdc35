//! Compiles a host's share of the state into the map contents the programs
//! read. Pure: the same resources and interface indexes always give the same
//! maps, except for identity numbers, which the caller's allocator assigns.
//!
//! One module per feature: security groups (`sg`), the overlay and peerings
//! (`overlay`), zones and exchange paths (`zones`), firewall policies
//! (`firewalls`). An object that cannot be compiled is rejected by name and
//! fails closed; the rest is compiled as if it were not there.

mod firewalls;
pub mod lb;
pub mod mirror;
mod overlay;
mod sg;
pub mod systems;
pub mod vrrp;
mod zones;

pub use firewalls::fw_rule_id;
pub use sg::{port_blocks, Block, Identities, ServiceSet};

use firewalls::compile_firewalls;
use overlay::{compile_endpoint, compile_gateways, compile_peerings, ports_of_vni};
use sg::{compile_policy, compile_port, Policy, PortPart};
use std::sync::Arc;
use zones::compile_zones;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv6Addr};

use dataplane_common::maps::{
    zone_net_data, AddrIdentity, AddrKey, Endpoint, EndpointKey, ExchangeRule, FwPolicy, FwRule, PolicyDirKey,
    PortAddrKey, PortInfo, PrefixLens, RuleKey, ZoneAddrKey, ZoneEndpoint, EP_F_GATEWAY, EP_F_LOCAL_IS_A, EP_F_PEER,
    FW_ALLOW, FW_DENY, FW_POLICY_RULES_MAX, GATEWAY_MAC, PORT_F_EGRESS_OPEN, PORT_F_LB, PORT_F_QUARANTINED,
    PORT_F_REJECTED, PORT_F_UPLINK,
};
use dataplane_common::{DIR_EGRESS, DIR_INGRESS, FAMILY_V4, FAMILY_V6};
use sdn_proto::v1 as pb;

/// Everything the maps should hold, identities still symbolic.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Desired {
    pub ports: BTreeMap<u32, PortInfo>,
    pub port_addrs: BTreeSet<PortAddrKey>,
    pub plens: BTreeMap<PolicyDirKey, PrefixLens>,
    /// Remote prefix -> the services it may use.
    pub sg_addr: BTreeMap<AddrKey, ServiceSet>,
    /// Every address of every VPC with a port here: where it lives.
    pub endpoints: BTreeMap<EndpointKey, Endpoint>,
    /// Zone address spaces: (key length, family + address) -> zone number.
    pub zone_nets: BTreeMap<(u32, [u8; 20]), u32>,
    /// The subnets of every VPC in a zone, in the same form: no source from
    /// an uplink may claim them.
    pub vpc_nets: BTreeMap<(u32, [u8; 20]), u32>,
    /// Uplink ifindex -> zone number, and back.
    pub uplinks: BTreeMap<u32, u32>,
    pub zone_uplink: BTreeMap<u32, u32>,
    /// Uplink devices by ifindex, for attaching the zone guard.
    pub uplink_devices: BTreeMap<u32, String>,
    /// The uplinks' own addresses (see [`add_uplink_addresses`]).
    pub uplink_addrs: BTreeSet<PortAddrKey>,
    /// The addresses of virtual IPs held by NAT hosts in the share: never
    /// the uplink's own (a holder answers for them within its lease only,
    /// whatever addresses the uplink has), and translated within a lease.
    pub held_vips: BTreeSet<std::net::IpAddr>,
    /// Zones whose uplink device is not on this host: (zone, device). Their
    /// traffic has no way out here (and nothing gets in).
    pub missing_uplinks: Vec<(String, String)>,
    /// Addresses of VPCs with a zone (ports here and elsewhere).
    pub zone_endpoints: BTreeMap<ZoneAddrKey, ZoneEndpoint>,
    /// Exchange paths, in slot order.
    pub exchange: BTreeMap<u32, ExchangeRule>,
    /// Firewall policies by number (1..), their rules by slot, and the names
    /// of rule numbers ("policy/rule", "policy/default").
    pub fw_policies: BTreeMap<u32, FwPolicy>,
    pub fw_rules: BTreeMap<u32, FwRule>,
    pub fw_names: BTreeMap<u32, dataplane_common::maps::RuleName>,
    /// Ports whose device is not on this host yet, by port id.
    pub missing_devices: Vec<(String, String)>,
    /// Quarantined ports now: port id -> (quarantine id, reason).
    pub quarantined: BTreeMap<String, (String, String)>,
    /// The next time a quarantine expires or a member's drain time ends,
    /// Unix ms.
    pub next_expiry: Option<u64>,
    /// Objects this host cannot enforce, each with why: they fail closed
    /// (a port gets no traffic, a firewall denies, a zone or peering is not
    /// joined) and the host NACKs naming them, while it enforces the rest.
    pub rejected: Vec<String>,
    /// Mirror sessions: the ports they copy and where copies go.
    pub mirror: mirror::MirrorPlan,
    /// Information systems: the ports whose traffic with zones is counted.
    pub systems: systems::SystemPlan,
    /// Load balancers: their services, backends and tables.
    pub lb: lb::LbPlan,
    /// VRRP routers of virtual IPs held by ports with a holder here.
    pub vrrp_groups: BTreeMap<dataplane_common::maps::VrrpKey, dataplane_common::maps::VrrpGroup>,
    /// The holder ports here whose VRRP is relayed.
    pub vrrp_ports: BTreeSet<u32>,
}

/// Keeps each of `ids` (in order) in the slot it had (`slots`, updated
/// here), and gives the others the first free slots below `max`: a slot
/// changes hands only when its holder is gone. An id beyond the slots gets
/// none.
pub(crate) fn keep_slots(ids: &[&str], max: u32, slots: &mut BTreeMap<String, u32>) {
    slots.retain(|id, _| ids.contains(&id.as_str()));
    for id in ids {
        if slots.contains_key(*id) {
            continue;
        }
        let taken: BTreeSet<u32> = slots.values().copied().collect();
        if let Some(free) = (0..max).find(|n| !taken.contains(n)) {
            slots.insert(id.to_string(), free);
        }
    }
}

/// The IP protocol number of an API protocol (0: any); `None` for one not
/// known.
pub fn protocol_number(p: i32) -> Option<u8> {
    match pb::Protocol::try_from(p) {
        Ok(pb::Protocol::Any) => Some(0),
        Ok(pb::Protocol::Tcp) => Some(6),
        Ok(pb::Protocol::Udp) => Some(17),
        Ok(pb::Protocol::Icmp) => Some(1),
        Ok(pb::Protocol::Icmpv6) => Some(58),
        _ => None,
    }
}

/// The number a VPC's border firewall gets when its policy cannot be
/// compiled: no such policy exists, so the firewall denies (fail closed).
pub const FW_BROKEN: u32 = u32::MAX;

/// Why a share could not be compiled. The agent NACKs with this text.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum CompileError {
    #[error("port {port}: {field}: {message}")]
    Port {
        port: String,
        field: &'static str,
        message: String,
    },
    #[error("security group {group} rule {rule}: {message}")]
    Rule {
        group: String,
        rule: String,
        message: String,
    },
    #[error("vpc {vpc}: {message}")]
    Vpc { vpc: String, message: String },
    #[error("{what}: {message}")]
    Zone { what: String, message: String },
}

/// The IPv6 link-local address a Linux guest derives from its MAC (EUI-64).
pub fn link_local(mac: [u8; 6]) -> Ipv6Addr {
    Ipv6Addr::from([
        0xfe,
        0x80,
        0,
        0,
        0,
        0,
        0,
        0,
        mac[0] ^ 0x02,
        mac[1],
        mac[2],
        0xff,
        0xfe,
        mac[3],
        mac[4],
        mac[5],
    ])
}

fn addr16(ip: IpAddr) -> (u8, [u8; 16]) {
    let mut a = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => {
            a[..4].copy_from_slice(&v4.octets());
            (FAMILY_V4, a)
        }
        IpAddr::V6(v6) => (FAMILY_V6, v6.octets()),
    }
}

fn mask16(family: u8, addr: [u8; 16], plen: u8) -> [u8; 16] {
    let max = if family == FAMILY_V4 { 32 } else { 128 };
    let plen = plen.min(max) as u32;
    let v = u128::from_be_bytes(addr);
    let m = if plen == 0 { 0 } else { u128::MAX << (128 - plen) };
    (v & m).to_be_bytes()
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut m = [0u8; 6];
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    for (i, p) in parts.iter().enumerate() {
        m[i] = u8::from_str_radix(p, 16).ok()?;
    }
    Some(m)
}

fn fnv32(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c9dc5;
    for b in bytes {
        h ^= *b as u32;
        h = h.wrapping_mul(0x01000193);
    }
    h
}

/// A policy direction's remote prefixes, (length, masked address), and what each may use.
type PrefixTable = BTreeMap<(u8, [u8; 16]), ServiceSet>;

/// The resources an agent holds, by name.
pub type Resources = BTreeMap<String, pb::Resource>;

/// Compiles the share. `ifindex` resolves a device name on this host;
/// `now_ms` (Unix ms) decides which quarantines have expired.
/// Adds the addresses each uplink device has on this host (`addrs` by
/// device name): the only addresses on an uplink the host answers ARP and
/// neighbour discovery for and takes ICMP errors to. They are the host's,
/// not the controller's, so they come after [`compile`].
pub fn add_uplink_addresses(d: &mut Desired, addrs: &dyn Fn(&str) -> Vec<std::net::IpAddr>) {
    d.uplink_addrs.clear();
    for (ifx, name) in &d.uplink_devices {
        for a in addrs(name).into_iter().filter(|a| !d.held_vips.contains(a)) {
            let (family, bytes) = addr16(a);
            d.uplink_addrs.insert(PortAddrKey {
                ifindex: *ifx,
                family,
                _pad: [0; 3],
                addr: bytes,
            });
        }
    }
}

/// The VIP a north-south service answers on.
fn key_address_nat(k: &dataplane_common::lb::NatServiceKey) -> std::net::IpAddr {
    if k.family == FAMILY_V4 {
        std::net::IpAddr::from([k.addr[0], k.addr[1], k.addr[2], k.addr[3]])
    } else {
        std::net::IpAddr::from(k.addr)
    }
}

/// The address a [`PortAddrKey`] holds.
pub fn key_address(k: &PortAddrKey) -> std::net::IpAddr {
    if k.family == FAMILY_V4 {
        std::net::IpAddr::from([k.addr[0], k.addr[1], k.addr[2], k.addr[3]])
    } else {
        std::net::IpAddr::from(k.addr)
    }
}

/// Compiles the share from scratch (see [`Compiler`]).
pub fn compile(res: &Resources, ifindex: &dyn Fn(&str) -> Option<u32>, now_ms: u64) -> Result<Desired, CompileError> {
    Compiler::default().compile(res, ifindex, now_ms)
}

/// What a port, an endpoint or a policy compiled to, and from what.
struct Cached<I, T> {
    /// Every input it was compiled from (not a digest of them: a tenant
    /// could make two inputs share a short digest and keep a stale result).
    inputs: I,
    /// The pass that last used it.
    pass: u64,
    part: T,
}

/// How many objects a pass compiled anew (the rest it reused).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recompiled {
    pub ports: usize,
    pub endpoints: usize,
    /// Policies: the rules of a set of groups, shared by the ports using it.
    pub policies: usize,
}

/// What a policy is compiled from: each group of a port, in order, with
/// its version (`None`: missing), and the version of the members of each
/// group its rules name.
type PolicyKey = Vec<(String, Option<String>, Vec<(String, Option<String>)>)>;

/// What a port is compiled from: its resource's version, its device's
/// ifindex, its subnet's VNI, whether its subnet is zoned, whether it is
/// quarantined, and its policy.
type PortInputs = (String, Option<u32>, Option<u32>, bool, bool, PolicyKey);

/// What an endpoint is compiled from: its resource's version, its VPC's
/// VNI and id, and, for a port here, its device's ifindex.
type EndpointInputs = (String, u32, String, Option<Option<u32>>);

/// Compiles shares pass after pass. What each port, endpoint and policy
/// compiled to is kept with its inputs (its resource's version,
/// the versions of the groups and members it uses, its device's ifindex,
/// its subnet's VNI and zone, its quarantine): a pass compiles only the
/// objects whose inputs changed, and reuses the rest. A resource's version
/// changes whenever its content does (the controller's contract). The
/// result is the same as a compile from scratch; [`compile`] is one with
/// nothing kept.
#[derive(Default)]
pub struct Compiler {
    ports: std::collections::HashMap<String, Cached<PortInputs, PortPart>>,
    /// Policies by their groups (ids, versions, members).
    policies: std::collections::HashMap<PolicyKey, Cached<PolicyKey, Result<Arc<Policy>, CompileError>>>,
    endpoints: std::collections::HashMap<String, Cached<EndpointInputs, overlay::EndpointPart>>,
    pass: u64,
    /// What the last pass compiled anew.
    pub last: Recompiled,
    /// Each mirror session's slot, kept from pass to pass.
    mirror_slots: BTreeMap<String, u32>,
    /// Each information system's slot, kept from pass to pass.
    system_slots: BTreeMap<String, u32>,
    /// Load balancers' services and backends, by name.
    lb_slots: lb::LbSlots,
    /// This host's id (which load balancers it is a NAT host of).
    pub host: String,
}

/// The kept part for `name` when its inputs are the same, else a fresh one.
fn reuse<'c, K: std::hash::Hash + Eq + Clone, I: PartialEq, T>(
    cache: &'c mut std::collections::HashMap<K, Cached<I, T>>,
    name: &K,
    inputs: I,
    pass: u64,
    fresh: &mut usize,
    build: impl FnOnce() -> T,
) -> &'c T {
    let hit = cache.get(name).is_some_and(|c| c.inputs == inputs);
    if !hit {
        *fresh += 1;
        cache.insert(
            name.clone(),
            Cached {
                inputs,
                pass,
                part: build(),
            },
        );
    }
    let c = cache.get_mut(name).expect("just kept");
    c.pass = pass;
    &c.part
}

impl Compiler {
    /// What the pinned maps held of the load balancers when the agent
    /// started: the first pass keeps their numbers.
    pub fn seed_lb(&mut self, held: lb::LbHeld) {
        self.lb_slots.held = Some(held);
    }

    /// Compiles the share, reusing what the earlier passes compiled from
    /// the same inputs.
    pub fn compile(
        &mut self,
        res: &Resources,
        ifindex: &dyn Fn(&str) -> Option<u32>,
        now_ms: u64,
    ) -> Result<Desired, CompileError> {
        self.pass += 1;
        self.last = Recompiled::default();
        let d = self.compile_pass(res, ifindex, now_ms);
        let pass = self.pass;
        self.ports.retain(|_, c| c.pass == pass);
        self.policies.retain(|_, c| c.pass == pass);
        self.endpoints.retain(|_, c| c.pass == pass);
        d
    }

    fn compile_pass(
        &mut self,
        res: &Resources,
        ifindex: &dyn Fn(&str) -> Option<u32>,
        now_ms: u64,
    ) -> Result<Desired, CompileError> {
        let mut quarantined: BTreeMap<String, (String, String)> = BTreeMap::new();
        let mut next_expiry: Option<u64> = None;
        for r in res.values() {
            if let Some(pb::resource::Kind::Quarantine(q)) = &r.kind {
                let Some(qq) = &q.quarantine else { continue };
                if qq.expires_unix_ms != 0 && qq.expires_unix_ms <= now_ms {
                    continue;
                }
                if qq.expires_unix_ms != 0 {
                    next_expiry = Some(next_expiry.map_or(qq.expires_unix_ms, |n| n.min(qq.expires_unix_ms)));
                }
                for p in &q.port_ids {
                    quarantined.insert(p.clone(), (qq.id.clone(), qq.reason.clone()));
                }
            }
        }
        let mut groups: BTreeMap<&str, &pb::SecurityGroup> = BTreeMap::new();
        let mut members: BTreeMap<&str, Vec<IpAddr>> = BTreeMap::new();
        // The versions of groups and members, by group: a port's inputs.
        let mut group_versions: BTreeMap<&str, &str> = BTreeMap::new();
        let mut member_versions: BTreeMap<&str, &str> = BTreeMap::new();
        let mut ports: Vec<(&pb::Resource, &pb::Port)> = Vec::new();
        let mut peerings: Vec<&pb::VpcPeering> = Vec::new();
        let mut networks: Vec<(&pb::Resource, &pb::VpcNetwork)> = Vec::new();
        let mut endpoints: BTreeMap<&str, Vec<(&pb::Resource, &pb::Endpoint)>> = BTreeMap::new();
        let mut zones: BTreeMap<&str, &pb::Zone> = BTreeMap::new();
        let mut exchanges: Vec<&pb::ExchangePath> = Vec::new();
        let mut firewalls: BTreeMap<&str, &pb::FirewallPolicy> = BTreeMap::new();
        let mut mirrors: Vec<&pb::MirrorOnHost> = Vec::new();
        let mut systems: Vec<&pb::InformationSystem> = Vec::new();
        let mut lbs: Vec<&pb::LoadBalancerOnHost> = Vec::new();
        let mut held_vips: BTreeSet<IpAddr> = BTreeSet::new();
        let mut vip_owners: BTreeMap<(u32, IpAddr), lb::VipOwner> = BTreeMap::new();
        let mut leased_vips: BTreeSet<(u32, IpAddr)> = BTreeSet::new();
        let mut port_vips: Vec<&pb::VirtualIpOnHost> = Vec::new();
        for r in res.values() {
            match &r.kind {
                Some(pb::resource::Kind::Port(p)) => ports.push((r, p)),
                Some(pb::resource::Kind::VpcNetwork(n)) => networks.push((r, n)),
                Some(pb::resource::Kind::Endpoint(e)) => endpoints.entry(&e.vpc_id).or_default().push((r, e)),
                Some(pb::resource::Kind::Zone(z)) => {
                    zones.insert(&z.id, z);
                }
                Some(pb::resource::Kind::ExchangePath(x)) => exchanges.push(x),
                Some(pb::resource::Kind::FirewallPolicy(f)) => {
                    firewalls.insert(&f.id, f);
                }
                Some(pb::resource::Kind::VpcPeering(p)) => peerings.push(p),
                Some(pb::resource::Kind::SecurityGroup(g)) => {
                    groups.insert(&g.id, g);
                    group_versions.insert(&g.id, &r.version);
                }
                Some(pb::resource::Kind::GroupMembers(m)) => {
                    // Addresses come from the validated store; skip any that do not parse.
                    members.insert(&m.group_id, m.addresses.iter().filter_map(|a| a.parse().ok()).collect());
                    member_versions.insert(&m.group_id, &r.version);
                }
                Some(pb::resource::Kind::MirrorSession(m)) => mirrors.push(m),
                Some(pb::resource::Kind::InformationSystem(s)) => systems.push(s),
                Some(pb::resource::Kind::LoadBalancer(l)) => lbs.push(l),
                // Virtual IPs are the VRRP speakers' (`crate::vips`); those
                // held by NAT hosts fence their VIP's translation.
                Some(pb::resource::Kind::VirtualIp(v)) => {
                    if v.uplink_device.is_empty()
                        && v.virtual_ip
                            .as_ref()
                            .is_some_and(|x| x.holders.iter().all(|h| !h.port_id.is_empty()))
                    {
                        port_vips.push(v);
                    }
                    if let Some(x) = v.virtual_ip.as_ref().filter(|_| !v.uplink_device.is_empty()) {
                        let addrs = [x.ipv4.parse::<IpAddr>().ok(), x.ipv6.parse::<IpAddr>().ok()];
                        held_vips.extend(addrs.iter().flatten());
                        // Addresses of VPCs may be alike: by VPC.
                        leased_vips.extend(addrs.iter().flatten().map(|a| (v.vni, *a)));
                        if !x.owner_host_id.is_empty() {
                            let o = lb::VipOwner {
                                holders: x.holders.iter().map(|h| h.host_id.clone()).collect(),
                                owner: x.owner_host_id.clone(),
                            };
                            vip_owners.extend(addrs.iter().flatten().map(|a| ((v.vni, *a), o.clone())));
                        }
                    }
                }
                // HTTP proxies are the proxy supervisor's (`crate::l7`).
                Some(pb::resource::Kind::HttpProxy(_)) | Some(pb::resource::Kind::Quarantine(_)) | None => {}
            }
        }
        let mut d = Desired {
            quarantined,
            next_expiry,
            held_vips,
            ..Desired::default()
        };
        d.lb = lb::compile_lbs(&lbs, &mut self.lb_slots, &mut d.rejected, now_ms, &|p| {
            d.quarantined.contains_key(p)
        });
        let nat = lb::compile_nat(&lbs, &vip_owners, &self.host, &mut d.lb, &mut d.rejected);
        // Each zoned VPC's zone and border firewall, by id.
        let mut vpc_border: BTreeMap<&str, (u32, u32)> = BTreeMap::new();
        if let Some(t) = d.lb.drain_ends {
            d.next_expiry = Some(d.next_expiry.map_or(t, |n| n.min(t)));
        }
        let local: BTreeMap<&str, &pb::Port> = ports.iter().map(|(_, p)| (p.id.as_str(), *p)).collect();
        // Every port's record, for the virtual IPs ports hold.
        let port_eps: BTreeMap<&str, &pb::Endpoint> = if port_vips.is_empty() {
            BTreeMap::new()
        } else {
            endpoints
                .values()
                .flatten()
                .map(|(_, e)| *e)
                .chain(networks.iter().flat_map(|(_, n)| n.endpoints.iter()))
                .map(|e| (e.port_id.as_str(), e))
                .collect()
        };
        let zone_no = compile_zones(&zones, &exchanges, ifindex, &mut d)?;
        let fw_no = compile_firewalls(&firewalls, &mut d)?;
        let mut subnet_vni: BTreeMap<&str, u32> = BTreeMap::new();
        let mut zoned_subnets: BTreeSet<&str> = BTreeSet::new();
        for (vr, n) in &networks {
            // A VPC that cannot be compiled is left out whole: its ports here
            // are then rejected too and fail closed.
            let mut eps = BTreeMap::new();
            if let Err(e) = compile_gateways(n, &mut eps) {
                d.rejected.push(e.to_string());
                continue;
            }
            // Each port as a resource of its own; or, from a controller of
            // an earlier release, listed inside the VPC's resource (then
            // each is compiled again whenever that resource changes).
            let own = endpoints
                .get(n.vpc_id.as_str())
                .into_iter()
                .flatten()
                .map(|(r, e)| (r.name.clone(), r.version.as_str(), *e));
            let listed = n
                .endpoints
                .iter()
                .map(|e| (format!("{}#{}", vr.name, e.port_id), vr.version.as_str(), e));
            for (name, version, e) in own.chain(listed) {
                let here = local.get(e.port_id.as_str()).map(|p| ifindex(&p.device));
                let inputs = (version.to_string(), n.vni, n.vpc_id.clone(), here);
                let part = reuse(
                    &mut self.endpoints,
                    &name,
                    inputs,
                    self.pass,
                    &mut self.last.endpoints,
                    || compile_endpoint(n, e, here),
                );
                eps.extend(part.entries.iter().copied());
                d.rejected.extend(part.rejected.iter().cloned());
            }
            let owned = vrrp::owner_endpoints(&port_vips, n.vni, &eps, &port_eps);
            eps.extend(owned);
            d.endpoints.extend(eps);
            for g in &n.gateways {
                subnet_vni.insert(&g.subnet_id, n.vni);
            }
            if !n.zone_id.is_empty() {
                // Without its zone the VPC has no way out (fail closed).
                let Some(zone) = zone_no.get(n.zone_id.as_str()).copied() else {
                    d.rejected.push(format!(
                        "vpc {}: zone {} is missing from the share or cannot be compiled",
                        n.vpc_id, n.zone_id
                    ));
                    continue;
                };
                zoned_subnets.extend(n.gateways.iter().map(|g| g.subnet_id.as_str()));
                let border = if n.border_policy_id.is_empty() {
                    0
                } else {
                    match fw_no.get(n.border_policy_id.as_str()) {
                        Some(b) => *b,
                        None => {
                            d.rejected.push(format!(
                                "vpc {}: border firewall {} is missing from the share or cannot be compiled; \
                             the border denies everything",
                                n.vpc_id, n.border_policy_id
                            ));
                            FW_BROKEN
                        }
                    }
                };
                vpc_border.insert(n.vpc_id.as_str(), (zone, border));
                for (k, ep) in ports_of_vni(&d.endpoints, n.vni) {
                    d.zone_endpoints.insert(
                        ZoneAddrKey {
                            family: k.family,
                            _pad: [0; 3],
                            addr: k.addr,
                        },
                        ZoneEndpoint {
                            ifindex: ep.ifindex,
                            zone,
                            mac: ep.mac,
                            _pad: [0; 2],
                            border,
                        },
                    );
                }
            }
        }
        let nets: Vec<&pb::VpcNetwork> = networks.iter().map(|(_, n)| *n).collect();
        compile_peerings(&peerings, &nets, &fw_no, &mut d.endpoints, &mut d.rejected);
        // The VIPs of VPCs with ports here, answered as gateways are (a
        // port's address is never a VIP: the controller refuses it).
        for (k, e) in &d.lb.vips {
            if nets.iter().any(|n| n.vni == k.vni) {
                d.endpoints.entry(*k).or_insert(*e);
            }
        }
        // The NAT addresses of a zoned VPC are its zone endpoints (at no
        // port): the zone's packets may not come from them nor go to them,
        // no host may send from them out of an uplink, and flows through
        // them are judged by the VPC's zone and border firewall.
        let vni_vpc: BTreeMap<u32, &str> = nets.iter().map(|n| (n.vni, n.vpc_id.as_str())).collect();
        for (k, e) in &d.lb.vips {
            if e.flags & EP_F_GATEWAY != 0 {
                continue;
            }
            let Some((zone, border)) = vni_vpc.get(&k.vni).and_then(|v| vpc_border.get(v)).copied() else {
                continue;
            };
            d.zone_endpoints.insert(
                ZoneAddrKey {
                    family: k.family,
                    _pad: [0; 3],
                    addr: k.addr,
                },
                ZoneEndpoint {
                    ifindex: 0,
                    zone,
                    mac: e.mac,
                    _pad: [0; 2],
                    border,
                },
            );
        }
        for n in nat {
            let Some(s) = d.lb.services.get(&n.service) else {
                continue;
            };
            if !vpc_border.contains_key(n.vpc_id.as_str()) {
                d.rejected.push(format!(
                    "load balancer service {}: vpc {} and its zone are not compiled here; its flows from the zone are refused",
                    s.name, n.vpc_id
                ));
                continue;
            }
            d.lb.nat.insert(
                n.key,
                dataplane_common::lb::NatService {
                    lb: s.info,
                    vni: n.service.vni,
                    flags: if leased_vips.contains(&(n.service.vni, key_address_nat(&n.key))) {
                        dataplane_common::lb::NAT_SVC_F_LEASE
                    } else {
                        0
                    },
                    nat: n.nat,
                },
            );
        }
        if mirrors.is_empty() && systems.is_empty() {
            // Neither needs the ports' VPCs: a pass without them pays nothing.
            self.mirror_slots.clear();
            self.system_slots.clear();
        } else {
            let vpc_of: BTreeMap<&str, &pb::VpcNetwork> = nets
                .iter()
                .flat_map(|n| n.gateways.iter().map(move |g| (g.subnet_id.as_str(), *n)))
                .collect();
            let locals: Vec<mirror::LocalPort> = ports
                .iter()
                .map(|(_, p)| {
                    let n = vpc_of.get(p.subnet_id.as_str());
                    mirror::LocalPort {
                        port: p,
                        vpc: n.map(|n| n.vpc_id.as_str()).unwrap_or(""),
                        zone: n.map(|n| n.zone_id.as_str()).unwrap_or(""),
                    }
                })
                .collect();
            systems.sort_by(|a, b| a.id.cmp(&b.id));
            d.systems = systems::compile_systems(
                &systems,
                &locals,
                &zone_no,
                ifindex,
                &mut self.system_slots,
                &mut d.rejected,
            );
            if !mirrors.is_empty() {
                let cpus = aya::util::nr_cpus().map(|n| n as u32).unwrap_or(1);
                d.mirror = mirror::compile_mirrors(
                    &mirrors,
                    &locals,
                    ifindex,
                    cpus,
                    &mut self.mirror_slots,
                    &mut d.rejected,
                );
            } else {
                self.mirror_slots.clear();
            }
        }
        // What the crossing tiers (zone guard, border and VPC firewalls) decide
        // by: a change to it changes every port's epoch, so established flows
        // across a zone or a peering are judged again on their next packet.
        let crossing = {
            let mut b: Vec<u8> = Vec::new();
            for r in d.exchange.values() {
                b.extend_from_slice(&r.from.to_be_bytes());
                b.extend_from_slice(&r.to.to_be_bytes());
                b.extend_from_slice(&[r.family, r.proto, r.src_plen, r.dst_plen]);
                b.extend_from_slice(&r.port_lo.to_be_bytes());
                b.extend_from_slice(&r.port_hi.to_be_bytes());
                b.extend_from_slice(&r.src);
                b.extend_from_slice(&r.dst);
            }
            for ((plen, data), z) in &d.zone_nets {
                b.extend_from_slice(&plen.to_be_bytes());
                b.extend_from_slice(data);
                b.extend_from_slice(&z.to_be_bytes());
            }
            for (n, p) in &d.fw_policies {
                b.extend_from_slice(&n.to_be_bytes());
                b.extend_from_slice(&[p.default_action]);
                b.extend_from_slice(&p.default_rule_id.to_be_bytes());
                for slot in p.first..p.first + p.count {
                    if let Some(r) = d.fw_rules.get(&slot) {
                        b.extend_from_slice(&r.rule_id.to_be_bytes());
                        b.extend_from_slice(&[r.action, r.dir, r.family, r.proto, r.plen]);
                        b.extend_from_slice(&r.port_lo.to_be_bytes());
                        b.extend_from_slice(&r.port_hi.to_be_bytes());
                        b.extend_from_slice(&r.addr);
                    }
                }
            }
            for e in d.endpoints.values().filter(|e| e.flags & EP_F_PEER != 0) {
                b.extend_from_slice(&e.policy.to_be_bytes());
            }
            fnv32(&b)
        };
        // A port's policy is compiled once for every port with the same
        // groups (same rules, same members) and numbered by its first port.
        let mut numbers: BTreeMap<PolicyKey, u32> = BTreeMap::new();
        for (r, p) in ports {
            let ifx = ifindex(&p.device);
            let vni = subnet_vni.get(p.subnet_id.as_str()).copied();
            let zoned = zoned_subnets.contains(p.subnet_id.as_str());
            let held = d.quarantined.contains_key(&p.id);
            let policy_key: PolicyKey = p
                .security_group_ids
                .iter()
                .map(|g| {
                    let named = groups
                        .get(g.as_str())
                        .into_iter()
                        .flat_map(|g| &g.rules)
                        .filter(|r| !r.remote_group_id.is_empty())
                        .map(|r| {
                            let v = member_versions.get(r.remote_group_id.as_str()).map(|v| v.to_string());
                            (r.remote_group_id.clone(), v)
                        })
                        .collect();
                    (g.clone(), group_versions.get(g.as_str()).map(|v| v.to_string()), named)
                })
                .collect();
            let inputs = (r.version.clone(), ifx, vni, zoned, held, policy_key.clone());
            let (pass, policies, fresh) = (self.pass, &mut self.policies, &mut self.last.policies);
            let mut policy = || {
                reuse(policies, &policy_key, policy_key.clone(), pass, fresh, || {
                    compile_policy(&p.security_group_ids, &groups, &members).map(Arc::new)
                })
                .clone()
            };
            let part = reuse(&mut self.ports, &r.name, inputs, pass, &mut self.last.ports, || {
                compile_port(p, ifx, &groups, &subnet_vni, &zoned_subnets, held, &mut policy)
            });
            if let Some((ifx, mut info)) = part.entry {
                if d.lb.vnis.contains(&info.vni) {
                    info.flags |= PORT_F_LB;
                    d.lb.ports.insert(ifx, info.vni);
                }
                // A rejected port's entry keeps policy 0 and epoch 0.
                if part.rejected.is_none() {
                    // Keeps the policy for this pass (a reused port did
                    // not ask for it); same inputs, same result.
                    let _ = policy();
                    let next = numbers.len() as u32 + 1;
                    info.policy_id = *numbers.entry(policy_key).or_insert(next);
                    let mut e = info.epoch.to_be_bytes().to_vec();
                    e.extend_from_slice(&crossing.to_be_bytes());
                    info.epoch = fnv32(&e).max(1);
                }
                d.ports.insert(ifx, info);
            }
            d.port_addrs.extend(part.addrs.iter().copied());
            d.missing_devices.extend(part.missing_device.iter().cloned());
            d.rejected.extend(part.rejected.iter().cloned());
        }
        // A quarantined holder, or one whose port is rejected here, neither
        // speaks nor hears.
        let holder_here = |id: &str| {
            local
                .get(id)
                .filter(|_| !d.quarantined.contains_key(id))
                .and_then(|p| ifindex(&p.device))
                .filter(|i| {
                    d.ports
                        .get(i)
                        .is_some_and(|p| p.flags & (PORT_F_QUARANTINED | PORT_F_REJECTED) == 0)
                })
        };
        // The owner port of a virtual IP here may send from its addresses.
        d.port_addrs.extend(
            vrrp::owner_addresses(&port_vips, &holder_here)
                .into_iter()
                .filter(|k| d.ports.contains_key(&k.ifindex)),
        );
        (d.vrrp_groups, d.vrrp_ports) = vrrp::groups(
            &port_vips,
            &port_eps,
            &holder_here,
            &|id| local.contains_key(id),
            &mut d.rejected,
        );
        for (key, n) in &numbers {
            let Some(Ok(policy)) = self.policies.get(key).map(|c| &c.part) else {
                continue;
            };
            for ((dir, family), pl) in &policy.plens {
                d.plens.insert(
                    PolicyDirKey {
                        policy_id: *n,
                        dir: *dir,
                        family: *family,
                        _pad: [0; 2],
                    },
                    *pl,
                );
            }
            for ((dir, family, plen, addr), set) in &policy.addrs {
                d.sg_addr.insert(
                    AddrKey {
                        policy_id: *n,
                        dir: *dir,
                        family: *family,
                        plen: *plen,
                        _pad: 0,
                        addr: *addr,
                    },
                    set.clone(),
                );
            }
        }
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_cover_ranges_exactly() {
        for (lo, hi) in [
            (0u16, 65535u16),
            (80, 80),
            (1, 1023),
            (8000, 8080),
            (0, 0),
            (65535, 65535),
            (3, 17),
        ] {
            let blocks = port_blocks(lo, hi);
            let mut covered = 0u32;
            for (plen, start) in &blocks {
                let size = 1u32 << (16 - *plen as u32);
                assert_eq!(*start as u32 % size, 0, "block {start}/{plen} is aligned");
                assert!(*start as u32 >= lo as u32 && *start as u32 + size - 1 <= hi as u32);
                covered += size;
            }
            assert_eq!(covered, hi as u32 - lo as u32 + 1, "{lo}-{hi}: {blocks:?}");
        }
        assert_eq!(port_blocks(0, 65535), vec![(0, 0)]);
        assert!(port_blocks(1, 65535).len() <= 16);
    }

    #[test]
    fn link_local_follows_eui64() {
        assert_eq!(
            link_local([0x02, 0, 0, 0, 0, 0x01]),
            "fe80::ff:fe00:1".parse::<Ipv6Addr>().unwrap()
        );
    }

    fn share(rules: Vec<pb::SecurityGroupRule>) -> Resources {
        let mut r = Resources::new();
        r.insert(
            "port/p1".into(),
            pb::Resource {
                name: "port/p1".into(),
                version: "1".into(),
                kind: Some(pb::resource::Kind::Port(pb::Port {
                    id: "p1".into(),
                    subnet_id: "s".into(),
                    device: "vm1".into(),
                    mac: "02:00:00:00:00:01".into(),
                    ipv4: "10.0.0.1".into(),
                    security_group_ids: vec!["g".into()],
                    ..Default::default()
                })),
            },
        );
        r.insert(
            "vpc/v".into(),
            pb::Resource {
                name: "vpc/v".into(),
                version: "1".into(),
                kind: Some(pb::resource::Kind::VpcNetwork(pb::VpcNetwork {
                    vpc_id: "v".into(),
                    vni: 9,
                    zone_id: String::new(),
                    border_policy_id: String::new(),
                    gateways: vec![pb::SubnetGateway {
                        subnet_id: "s".into(),
                        gateway_v4: "10.0.0.254".into(),
                        gateway_v6: String::new(),
                    }],
                    endpoints: vec![],
                })),
            },
        );
        for e in [
            pb::Endpoint {
                port_id: "p1".into(),
                mac: "02:00:00:00:00:01".into(),
                ipv4: "10.0.0.1".into(),
                host_id: "h1".into(),
                host_underlay_ip: "192.168.1.2".into(),
                vpc_id: "v".into(),
                ..Default::default()
            },
            pb::Endpoint {
                port_id: "p2".into(),
                mac: "02:00:00:00:00:02".into(),
                ipv4: "10.0.0.2".into(),
                ipv6: "fd00::2".into(),
                host_id: "h2".into(),
                host_underlay_ip: "192.168.2.2".into(),
                vpc_id: "v".into(),
            },
        ] {
            let name = format!("endpoint/{}", e.port_id);
            r.insert(
                name.clone(),
                pb::Resource {
                    name,
                    version: "1".into(),
                    kind: Some(pb::resource::Kind::Endpoint(e)),
                },
            );
        }
        r.insert(
            "sg/g".into(),
            pb::Resource {
                name: "sg/g".into(),
                version: "1".into(),
                kind: Some(pb::resource::Kind::SecurityGroup(pb::SecurityGroup {
                    id: "g".into(),
                    rules,
                    ..Default::default()
                })),
            },
        );
        r
    }

    /// One object the host cannot compile is rejected by name and fails
    /// closed; everything else is compiled as if it were not there.
    #[test]
    fn a_bad_object_is_rejected_alone_and_fails_closed() {
        let mut r = share(vec![rule(pb::Direction::Ingress, pb::Protocol::Tcp, (22, 22), "")]);
        // A second port here whose MAC cannot be parsed.
        r.insert(
            "port/bad".into(),
            pb::Resource {
                name: "port/bad".into(),
                version: "1".into(),
                kind: Some(pb::resource::Kind::Port(pb::Port {
                    id: "bad".into(),
                    subnet_id: "s".into(),
                    device: "vm9".into(),
                    mac: "not-a-mac".into(),
                    ipv4: "10.0.0.9".into(),
                    ..Default::default()
                })),
            },
        );
        // A border firewall with an action this agent does not know, on a
        // zoned copy of the VPC, and a quarantine of the good port.
        if let Some(pb::resource::Kind::VpcNetwork(n)) = &mut r.get_mut("vpc/v").unwrap().kind {
            n.zone_id = "z".into();
            n.border_policy_id = "fw".into();
        }
        r.insert(
            "zone/z".into(),
            pb::Resource {
                name: "zone/z".into(),
                version: "1".into(),
                kind: Some(pb::resource::Kind::Zone(pb::Zone {
                    id: "z".into(),
                    prefixes: vec!["10.0.0.0/8".into()],
                    uplink_device: "up".into(),
                    ..Default::default()
                })),
            },
        );
        r.insert(
            "firewall/fw".into(),
            pb::Resource {
                name: "firewall/fw".into(),
                version: "1".into(),
                kind: Some(pb::resource::Kind::FirewallPolicy(pb::FirewallPolicy {
                    id: "fw".into(),
                    default_action: 99,
                    ..Default::default()
                })),
            },
        );
        r.insert(
            "quarantine/q".into(),
            pb::Resource {
                name: "quarantine/q".into(),
                version: "1".into(),
                kind: Some(pb::resource::Kind::Quarantine(pb::QuarantineOnHost {
                    quarantine: Some(pb::Quarantine {
                        id: "q".into(),
                        target_id: "p1".into(),
                        reason: "incident".into(),
                        ..Default::default()
                    }),
                    port_ids: vec!["p1".into()],
                })),
            },
        );
        let dev = |n: &str| match n {
            "vm1" => Some(5),
            "vm9" => Some(6),
            "up" => Some(7),
            _ => None,
        };
        let d = compile(&r, &dev, 0).unwrap();
        assert_eq!(d.rejected.len(), 3, "{:?}", d.rejected);
        assert!(
            d.rejected.iter().any(|m| m.contains("port bad") && m.contains("mac")),
            "{:?}",
            d.rejected
        );
        assert!(
            d.rejected.iter().any(|m| m.contains("firewall policy fw")),
            "{:?}",
            d.rejected
        );
        assert!(
            d.rejected.iter().any(|m| m.contains("vpc v") && m.contains("border")),
            "{:?}",
            d.rejected
        );
        // The bad port keeps its device and drops everything.
        assert_eq!(d.ports[&6].flags, PORT_F_REJECTED);
        // The good port is compiled, quarantined, its rules in place.
        assert_ne!(d.ports[&5].flags & PORT_F_QUARANTINED, 0);
        assert!(!d.sg_addr.is_empty());
        // The border of the VPC denies: its policy number names nothing.
        let ze = d.zone_endpoints.values().next().expect("the VPC keeps its zone");
        assert_eq!(ze.border, FW_BROKEN);
        assert!(!d.fw_policies.contains_key(&FW_BROKEN));
    }

    fn rule(dir: pb::Direction, proto: pb::Protocol, ports: (u32, u32), cidr: &str) -> pb::SecurityGroupRule {
        pb::SecurityGroupRule {
            id: "r".into(),
            direction: dir as i32,
            ether_type: pb::EtherType::Ipv4 as i32,
            protocol: proto as i32,
            port_min: ports.0,
            port_max: ports.1,
            remote_cidr: cidr.into(),
            remote_group_id: String::new(),
        }
    }

    #[test]
    fn vpc_endpoints_say_where_each_address_lives() {
        let d = compile(&share(vec![]), &|n| (n == "vm1").then_some(5), 0).unwrap();
        let key = |family, a: &str| EndpointKey {
            vni: 9,
            family,
            _pad: [0; 3],
            addr: addr16(a.parse().unwrap()).1,
        };
        let here = d.endpoints[&key(FAMILY_V4, "10.0.0.1")];
        assert_eq!((here.ifindex, here.host_v4), (5, [192, 168, 1, 2]));
        let there = d.endpoints[&key(FAMILY_V6, "fd00::2")];
        assert_eq!((there.ifindex, there.host_v4, there.flags), (0, [192, 168, 2, 2], 0));
        let gw = d.endpoints[&key(FAMILY_V4, "10.0.0.254")];
        assert_eq!((gw.flags, gw.mac), (EP_F_GATEWAY, GATEWAY_MAC));
        assert_eq!(d.endpoints.len(), 4);
        assert_eq!(d.ports[&5].vni, 9);
        // An IPv6 underlay is refused with the port and host named.
        let mut res = share(vec![]);
        if let Some(pb::resource::Kind::Endpoint(e)) = &mut res.get_mut("endpoint/p2").unwrap().kind {
            e.host_underlay_ip = "fd99::2".into();
        }
        let d = compile(&res, &|n| (n == "vm1").then_some(5), 0).unwrap();
        let e = d.rejected.join("; ");
        assert!(
            e.contains("port p2") && e.contains("host h2") && e.contains("IPv6 underlay"),
            "{e}"
        );
        // Only that endpoint is left out: the VPC and its port here stand.
        assert_eq!(d.ports[&5].vni, 9);
        assert!(d.endpoints.contains_key(&key(FAMILY_V4, "10.0.0.1")));
        assert!(!d.endpoints.contains_key(&key(FAMILY_V4, "10.0.0.2")));
    }

    /// A controller of an earlier release lists a VPC's ports inside its
    /// resource: the same ports compile to the same maps.
    #[test]
    fn ports_listed_inside_the_vpc_compile_as_ports_of_their_own() {
        let own = share(vec![rule(pb::Direction::Ingress, pb::Protocol::Tcp, (22, 22), "")]);
        let mut listed = own.clone();
        let eps: Vec<pb::Endpoint> = ["endpoint/p1", "endpoint/p2"]
            .iter()
            .map(|n| match listed.remove(*n).and_then(|r| r.kind) {
                Some(pb::resource::Kind::Endpoint(e)) => pb::Endpoint {
                    vpc_id: String::new(),
                    ..e
                },
                _ => unreachable!(),
            })
            .collect();
        if let Some(pb::resource::Kind::VpcNetwork(n)) = &mut listed.get_mut("vpc/v").unwrap().kind {
            n.endpoints = eps;
        }
        let ifx = |n: &str| (n == "vm1").then_some(5);
        let (a, b) = (compile(&own, &ifx, 0).unwrap(), compile(&listed, &ifx, 0).unwrap());
        assert_eq!(a.endpoints.len(), 4);
        assert_eq!(a, b);
    }

    #[test]
    fn nested_prefixes_inherit_their_parents_services() {
        let res = share(vec![
            rule(pb::Direction::Ingress, pb::Protocol::Tcp, (22, 22), "10.0.0.0/8"),
            rule(pb::Direction::Ingress, pb::Protocol::Tcp, (443, 443), "10.1.0.0/16"),
        ]);
        let d = compile(&res, &|n| (n == "vm1").then_some(7), 0).unwrap();
        let port = d.ports[&7];
        assert_eq!(
            port.flags & PORT_F_EGRESS_OPEN,
            PORT_F_EGRESS_OPEN,
            "no egress rules: egress open"
        );
        let k16 = d.sg_addr.keys().find(|k| k.plen == 16).unwrap();
        let s16 = &d.sg_addr[k16];
        assert!(
            s16.blocks.contains(&(6, 0, 22)) || s16.blocks.iter().any(|b| b.2 == 22),
            "{s16:?}"
        );
        assert!(s16.blocks.iter().any(|b| b.2 == 443));
        let k8 = d.sg_addr.keys().find(|k| k.plen == 8).unwrap();
        assert!(!d.sg_addr[k8].blocks.iter().any(|b| b.2 == 443));
        // Anti-spoofing holds the IPv4 address and the derived link-local.
        assert_eq!(d.port_addrs.len(), 2);
    }

    #[test]
    fn epoch_changes_with_rules_and_missing_devices_are_reported() {
        let a = compile(
            &share(vec![rule(pb::Direction::Ingress, pb::Protocol::Tcp, (80, 80), "")]),
            &|_| Some(3),
            0,
        )
        .unwrap();
        let b = compile(
            &share(vec![rule(pb::Direction::Ingress, pb::Protocol::Tcp, (81, 81), "")]),
            &|_| Some(3),
            0,
        )
        .unwrap();
        assert_ne!(a.ports[&3].epoch, b.ports[&3].epoch);
        let c = compile(&share(vec![]), &|_| None, 0).unwrap();
        assert_eq!(c.missing_devices, vec![("p1".to_string(), "vm1".to_string())]);
        assert!(c.ports.is_empty());
    }

    #[test]
    fn quarantines_flag_ports_until_they_expire() {
        let mut res = share(vec![]);
        let q = pb::QuarantineOnHost {
            quarantine: Some(pb::Quarantine {
                id: "q".into(),
                target_id: "p1".into(),
                reason: "incident".into(),
                expires_unix_ms: 5000,
                ..Default::default()
            }),
            port_ids: vec!["p1".into()],
        };
        res.insert(
            "quarantine/q".into(),
            pb::Resource {
                name: "quarantine/q".into(),
                version: "1".into(),
                kind: Some(pb::resource::Kind::Quarantine(q)),
            },
        );
        let before = compile(&res, &|_| Some(3), 1000).unwrap();
        assert_eq!(before.ports[&3].flags & PORT_F_QUARANTINED, PORT_F_QUARANTINED);
        assert_eq!(before.next_expiry, Some(5000));
        assert_eq!(before.quarantined["p1"], ("q".to_string(), "incident".to_string()));
        let after = compile(&res, &|_| Some(3), 5000).unwrap();
        assert_eq!(after.ports[&3].flags & PORT_F_QUARANTINED, 0);
        assert_ne!(before.ports[&3].epoch, after.ports[&3].epoch);
    }

    /// Sets each resource's version from its content, as the controller does.
    fn versioned(mut res: Resources) -> Resources {
        for r in res.values_mut() {
            r.version = format!("{:?}", r.kind);
        }
        res
    }

    fn put(res: &mut Resources, name: &str, kind: pb::resource::Kind) {
        res.insert(
            name.into(),
            pb::Resource {
                name: name.into(),
                version: String::new(),
                kind: Some(kind),
            },
        );
    }

    /// A compiler kept from pass to pass gives what a compile from scratch
    /// gives, after every kind of change, and compiles anew only the ports
    /// and endpoints whose inputs changed.
    #[test]
    fn a_kept_compiler_compiles_only_what_changed_and_equals_a_fresh_one() {
        let mut res = share(vec![
            rule(pb::Direction::Ingress, pb::Protocol::Tcp, (22, 22), "10.0.0.0/8"),
            pb::SecurityGroupRule {
                remote_group_id: "g".into(),
                ..rule(pb::Direction::Ingress, pb::Protocol::Tcp, (5432, 5432), "")
            },
        ]);
        for i in 3..=40u8 {
            let id = format!("p{i}");
            let port = pb::Port {
                id: id.clone(),
                subnet_id: "s".into(),
                device: format!("vm{i}"),
                mac: format!("02:00:00:00:00:{i:02x}"),
                ipv4: format!("10.0.0.{i}"),
                // Ports from 30 on use no group.
                security_group_ids: if i < 30 { vec!["g".into()] } else { vec![] },
                ..Default::default()
            };
            put(
                &mut res,
                &format!("endpoint/{id}"),
                pb::resource::Kind::Endpoint(pb::Endpoint {
                    port_id: id.clone(),
                    mac: port.mac.clone(),
                    ipv4: port.ipv4.clone(),
                    host_id: "h1".into(),
                    host_underlay_ip: "192.168.1.2".into(),
                    vpc_id: "v".into(),
                    ..Default::default()
                }),
            );
            put(&mut res, &format!("port/{id}"), pb::resource::Kind::Port(port));
        }
        let members = |addrs: &[&str]| {
            pb::resource::Kind::GroupMembers(pb::GroupMembers {
                group_id: "g".into(),
                addresses: addrs.iter().map(|a| a.to_string()).collect(),
            })
        };
        put(&mut res, "members/g", members(&["10.0.0.1", "10.0.0.3"]));
        let devices = std::cell::RefCell::new(BTreeMap::<String, u32>::new());
        for i in 1..=40u32 {
            devices.borrow_mut().insert(format!("vm{i}"), 100 + i);
        }
        let ifindex = |n: &str| devices.borrow().get(n).copied();
        let mut kept = Compiler::default();
        let mut check = |res: &Resources, what: &str, want: Recompiled| {
            let res = versioned(res.clone());
            let d = kept.compile(&res, &ifindex, 0).unwrap();
            assert_eq!(d, compile(&res, &ifindex, 0).unwrap(), "{what}: kept and fresh differ");
            assert_eq!(kept.last, want, "{what}");
            d
        };
        // 39 ports here (p1, p3..p40), 40 endpoints (p2 is elsewhere).
        check(
            &res,
            "first pass",
            Recompiled {
                ports: 39,
                endpoints: 40,
                policies: 2,
            },
        );
        check(&res, "nothing changed", Recompiled::default());
        // One port's address: that port and its endpoint.
        for name in ["port/p35", "endpoint/p35"] {
            match &mut res.get_mut(name).unwrap().kind {
                Some(pb::resource::Kind::Port(p)) => p.ipv4 = "10.0.0.135".into(),
                Some(pb::resource::Kind::Endpoint(e)) => e.ipv4 = "10.0.0.135".into(),
                _ => unreachable!(),
            }
        }
        let d = check(
            &res,
            "one port's address",
            Recompiled {
                ports: 1,
                endpoints: 1,
                policies: 0,
            },
        );
        assert!(d.endpoints.keys().any(|k| k.addr[..4] == [10, 0, 0, 135]));
        // The members of the group its rules name: every port using it.
        put(&mut res, "members/g", members(&["10.0.0.1"]));
        check(
            &res,
            "members",
            Recompiled {
                ports: 28,
                endpoints: 0,
                policies: 1,
            },
        );
        // A device goes: its port and its endpoint (no route to it yet).
        devices.borrow_mut().remove("vm36");
        let d = check(
            &res,
            "device gone",
            Recompiled {
                ports: 1,
                endpoints: 1,
                policies: 0,
            },
        );
        assert!(d.missing_devices.iter().any(|(p, _)| p == "p36"));
        // A quarantine: the port it covers.
        put(
            &mut res,
            "quarantine/q",
            pb::resource::Kind::Quarantine(pb::QuarantineOnHost {
                quarantine: Some(pb::Quarantine {
                    id: "q".into(),
                    ..Default::default()
                }),
                port_ids: vec!["p37".into()],
            }),
        );
        check(
            &res,
            "quarantine",
            Recompiled {
                ports: 1,
                endpoints: 0,
                policies: 0,
            },
        );
        // A port that cannot be compiled fails closed alone.
        if let Some(pb::resource::Kind::Port(p)) = &mut res.get_mut("port/p38").unwrap().kind {
            p.ipv4 = "not an address".into();
        }
        let d = check(
            &res,
            "bad port",
            Recompiled {
                ports: 1,
                endpoints: 0,
                policies: 0,
            },
        );
        assert_eq!(d.ports[&138].flags, PORT_F_REJECTED);
        // A port goes; nothing is compiled anew.
        res.remove("port/p39");
        res.remove("endpoint/p39");
        check(&res, "port removed", Recompiled::default());
        // The group's rules: every port using it.
        put(
            &mut res,
            "sg/g",
            pb::resource::Kind::SecurityGroup(pb::SecurityGroup {
                id: "g".into(),
                rules: vec![rule(pb::Direction::Ingress, pb::Protocol::Udp, (53, 53), "")],
                ..Default::default()
            }),
        );
        check(
            &res,
            "group rules",
            Recompiled {
                ports: 28,
                endpoints: 0,
                policies: 1,
            },
        );
        // The VPC's VNI: everything in it.
        if let Some(pb::resource::Kind::VpcNetwork(n)) = &mut res.get_mut("vpc/v").unwrap().kind {
            n.vni = 10;
        }
        check(
            &res,
            "VNI",
            Recompiled {
                ports: 38,
                endpoints: 39,
                policies: 0,
            },
        );
    }

    #[test]
    fn identities_are_stable_and_adoptable() {
        let mut ids = Identities::default();
        let s1 = ServiceSet {
            any: false,
            blocks: [(6, 16, 80)].into(),
        };
        let s2 = ServiceSet {
            any: true,
            blocks: BTreeSet::new(),
        };
        let i1 = ids.get_or_alloc(&s1);
        let i2 = ids.get_or_alloc(&s2);
        assert_ne!(i1, i2);
        assert_eq!(ids.get_or_alloc(&s1), i1);
        let rules: BTreeMap<RuleKey, u8> = [(
            RuleKey {
                identity: i1,
                proto: 6,
                port_plen: 16,
                port: 80,
            },
            1,
        )]
        .into();
        let addrs: BTreeMap<AddrKey, AddrIdentity> = [(
            AddrKey {
                policy_id: 1,
                dir: 0,
                family: 4,
                plen: 0,
                _pad: 0,
                addr: [0; 16],
            },
            AddrIdentity {
                identity: i2,
                port_plens: 0,
                any_proto: 1,
                _pad: [0; 3],
            },
        )]
        .into();
        let mut adopted = Identities::adopt(&rules, &addrs);
        assert_eq!(adopted.get_or_alloc(&s1), i1);
        assert_eq!(adopted.get_or_alloc(&s2), i2);
    }
}
