//! The store's state and the rules every change must obey. A batch is
//! checked against the state as the batch's own earlier operations left it,
//! and applies whole or not at all.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

use crate::index::Index;
use crate::limits::input::GROUP_RULES_MAX;
use crate::limits::{
    address_share, port_share, within, Settings, ENDPOINTS_MAX, EXCHANGE_MAX, FW_NAMES_MAX, FW_POLICIES_MAX,
    FW_POLICY_RULES_MAX, FW_RULES_MAX, PORTS_MAX, ZONES_MAX, ZONE_ENDPOINTS_MAX, ZONE_NETS_MAX,
};
use crate::model::*;

/// Why a batch was refused: which operation, which field, what is wrong.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub struct BatchError {
    /// Index of the operation in the batch.
    pub index: usize,
    /// Path of the offending field, e.g. `operations[2].put_port.mac`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for BatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Every object of the model, keyed by id, with the relations among them
/// ([`Index`]). Change it only through [`State::apply`] (or
/// [`State::replace`]), which keep the relations current.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Stored")]
pub struct State {
    pub tenants: BTreeMap<String, Tenant>,
    pub vpcs: BTreeMap<String, Vpc>,
    pub subnets: BTreeMap<String, Subnet>,
    pub hosts: BTreeMap<String, Host>,
    pub ports: BTreeMap<String, Port>,
    pub security_groups: BTreeMap<String, SecurityGroup>,
    #[serde(default)]
    pub quarantines: BTreeMap<String, Quarantine>,
    #[serde(default)]
    pub zones: BTreeMap<String, Zone>,
    #[serde(default)]
    pub exchange_paths: BTreeMap<String, ExchangePath>,
    #[serde(default)]
    pub firewall_policies: BTreeMap<String, FirewallPolicy>,
    #[serde(default)]
    pub peerings: BTreeMap<String, VpcPeering>,
    #[serde(default)]
    pub mirror_sessions: BTreeMap<String, MirrorSession>,
    #[serde(default)]
    pub information_systems: BTreeMap<String, InformationSystem>,
    #[serde(default)]
    pub load_balancers: BTreeMap<String, LoadBalancer>,
    #[serde(default)]
    pub pools: BTreeMap<String, Pool>,
    #[serde(default)]
    pub listeners: BTreeMap<String, Listener>,
    #[serde(default)]
    pub members: BTreeMap<String, Member>,
    #[serde(default)]
    pub virtual_ips: BTreeMap<String, VirtualIp>,
    #[serde(default)]
    pub certificates: BTreeMap<String, Certificate>,
    #[serde(default)]
    pub http_listeners: BTreeMap<String, HttpListener>,
    /// What validation allows beyond each object's own rules; the same on
    /// every replica.
    #[serde(default)]
    pub settings: Settings,
    #[serde(skip)]
    index: Index,
}

/// The objects as they are stored: the relations are rebuilt on load.
#[derive(Deserialize)]
struct Stored {
    tenants: BTreeMap<String, Tenant>,
    vpcs: BTreeMap<String, Vpc>,
    subnets: BTreeMap<String, Subnet>,
    hosts: BTreeMap<String, Host>,
    ports: BTreeMap<String, Port>,
    security_groups: BTreeMap<String, SecurityGroup>,
    #[serde(default)]
    quarantines: BTreeMap<String, Quarantine>,
    #[serde(default)]
    zones: BTreeMap<String, Zone>,
    #[serde(default)]
    exchange_paths: BTreeMap<String, ExchangePath>,
    #[serde(default)]
    firewall_policies: BTreeMap<String, FirewallPolicy>,
    #[serde(default)]
    peerings: BTreeMap<String, VpcPeering>,
    #[serde(default)]
    mirror_sessions: BTreeMap<String, MirrorSession>,
    #[serde(default)]
    information_systems: BTreeMap<String, InformationSystem>,
    #[serde(default)]
    load_balancers: BTreeMap<String, LoadBalancer>,
    #[serde(default)]
    pools: BTreeMap<String, Pool>,
    #[serde(default)]
    listeners: BTreeMap<String, Listener>,
    #[serde(default)]
    members: BTreeMap<String, Member>,
    #[serde(default)]
    virtual_ips: BTreeMap<String, VirtualIp>,
    #[serde(default)]
    certificates: BTreeMap<String, Certificate>,
    #[serde(default)]
    http_listeners: BTreeMap<String, HttpListener>,
    #[serde(default)]
    settings: Settings,
}

impl From<Stored> for State {
    fn from(x: Stored) -> State {
        let mut s = State {
            tenants: x.tenants,
            vpcs: x.vpcs,
            subnets: x.subnets,
            hosts: x.hosts,
            ports: x.ports,
            security_groups: x.security_groups,
            quarantines: x.quarantines,
            zones: x.zones,
            exchange_paths: x.exchange_paths,
            firewall_policies: x.firewall_policies,
            peerings: x.peerings,
            mirror_sessions: x.mirror_sessions,
            information_systems: x.information_systems,
            load_balancers: x.load_balancers,
            pools: x.pools,
            listeners: x.listeners,
            members: x.members,
            virtual_ips: x.virtual_ips,
            certificates: x.certificates,
            http_listeners: x.http_listeners,
            settings: x.settings,
            index: Index::default(),
        };
        s.reindex();
        s
    }
}

/// What an accepted batch did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// One line per operation, for the audit record.
    pub changes: Vec<String>,
    /// Every object the batch changed, as it was before (`None`: it did
    /// not exist), in the order first changed.
    pub before: Vec<(Kind, String, Option<Object>)>,
}

pub(crate) struct Ctx<'a> {
    index: usize,
    op: &'a str,
}

impl Ctx<'_> {
    pub(crate) fn err(&self, field: &str, message: impl Into<String>) -> BatchError {
        let field = if field.is_empty() {
            format!("operations[{}].{}", self.index, self.op)
        } else {
            format!("operations[{}].{}.{}", self.index, self.op, field)
        };
        BatchError {
            index: self.index,
            field,
            message: message.into(),
        }
    }
}

impl State {
    /// Applies a batch: every operation or none. Returns one line per change.
    pub fn apply_batch(&mut self, ops: &[Op]) -> Result<Vec<String>, BatchError> {
        self.apply(ops).map(|a| a.changes)
    }

    /// Applies a batch in place: every operation or none. A refused batch
    /// is undone, object by object, so the state is as it was; nothing is
    /// copied whole, and the cost is that of what the batch touches.
    pub fn apply(&mut self, ops: &[Op]) -> Result<Applied, BatchError> {
        if ops.is_empty() {
            return Err(BatchError {
                index: 0,
                field: "operations".into(),
                message: "the batch is empty".into(),
            });
        }
        let mut applied = Applied {
            changes: Vec::with_capacity(ops.len()),
            before: Vec::new(),
        };
        let mut saved: BTreeSet<(Kind, &str)> = BTreeSet::new();
        let r = (|| {
            for (index, op) in ops.iter().enumerate() {
                let (kind, id) = op.key();
                if saved.insert((kind, id)) {
                    applied.before.push((kind, id.to_string(), self.get(kind, id)));
                }
                let ctx = Ctx { index, op: op.field() };
                self.apply_one(&ctx, op)?;
                applied.changes.push(op.describe());
            }
            // Remote-group references may point forward within the batch
            // (two groups that admit each other), so they are checked at
            // its end.
            for (index, op) in ops.iter().enumerate() {
                if let Op::PutSecurityGroup(g) = op {
                    let ctx = Ctx { index, op: op.field() };
                    self.check_remote_groups(&ctx, g)?;
                }
            }
            self.check_host_capacity(ops)
        })();
        match r {
            Ok(()) => Ok(applied),
            Err(e) => {
                for (kind, id, old) in applied.before.into_iter().rev() {
                    self.replace(kind, &id, old);
                }
                Err(e)
            }
        }
    }

    /// The relations among the objects.
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// Rebuilds the relations from the objects.
    pub fn reindex(&mut self) {
        let mut ix = Index::default();
        let subnets = &self.subnets;
        let vpc_of = |sn: &str| subnets.get(sn).map(|s| s.vpc_id.clone());
        for o in self.objects() {
            ix.object(&o, true, vpc_of);
        }
        self.index = ix;
    }

    /// Puts `new` in place of the object `kind`/`id` (`None`: removes it),
    /// keeping the relations current, without any check. Returns what was
    /// there.
    pub fn replace(&mut self, kind: Kind, id: &str, new: Option<Object>) -> Option<Object> {
        let old = self.take(kind, id);
        let subnets = &self.subnets;
        let vpc_of = |sn: &str| subnets.get(sn).map(|s| s.vpc_id.clone());
        if let Some(o) = &old {
            self.index.object(o, false, vpc_of);
        }
        if let Some(n) = new {
            debug_assert!(
                n.kind() == kind && n.id() == id,
                "replace: the object is not {kind:?} {id}"
            );
            self.index.object(&n, true, vpc_of);
            self.put(n);
        }
        old
    }

    fn apply_one(&mut self, c: &Ctx, op: &Op) -> Result<(), BatchError> {
        match op {
            Op::PutTenant(t) => {
                check_id(&t.id).map_err(|m| c.err("id", m))?;
                self.replace(Kind::Tenant, &t.id, Some(Object::Tenant(t.clone())));
            }
            Op::PutVpc(v) => {
                check_id(&v.id).map_err(|m| c.err("id", m))?;
                self.need_tenant(c, "tenant_id", &v.tenant_id)?;
                let mut v = v.clone();
                if let Some(old) = self.vpcs.get(&v.id) {
                    if old.tenant_id != v.tenant_id {
                        return Err(c.err(
                            "tenant_id",
                            format!(
                                "vpc {} belongs to tenant {}; a VPC cannot change tenant",
                                v.id, old.tenant_id
                            ),
                        ));
                    }
                    if v.vni == 0 {
                        v.vni = old.vni;
                    } else if v.vni != old.vni {
                        return Err(c.err(
                            "vni",
                            format!("vpc {} has vni {}; a VPC's vni cannot change", v.id, old.vni),
                        ));
                    }
                }
                if v.vni > VNI_MAX {
                    return Err(c.err("vni", format!("{} is above the largest VNI {VNI_MAX}", v.vni)));
                }
                if let Some(old) = self.vpcs.get(&v.id).filter(|o| o.zone_id != v.zone_id) {
                    if let Some(l) = self
                        .load_balancers
                        .values()
                        .find(|l| l.vpc_id == v.id && l.exposure == Exposure::Zone)
                    {
                        return Err(c.err(
                            "zone_id",
                            format!(
                                "load balancer {} is exposed to zone {:?}: the vpc keeps its zone while it is",
                                l.id, old.zone_id
                            ),
                        ));
                    }
                }
                if let Some(old) = self.vpcs.get(&v.id) {
                    if old.zone_id != v.zone_id && self.index.ports_by_vpc.contains_key(&v.id) {
                        return Err(c.err(
                            "zone_id",
                            format!(
                                "vpc {} has ports; it cannot move from zone {:?} to {:?}",
                                v.id, old.zone_id, v.zone_id
                            ),
                        ));
                    }
                }
                if !v.border_policy_id.is_empty() {
                    if v.zone_id.is_empty() {
                        return Err(c.err("border_policy_id", "a border firewall needs the VPC to have a zone"));
                    }
                    if !self.firewall_policies.contains_key(&v.border_policy_id) {
                        return Err(c.err(
                            "border_policy_id",
                            format!("unknown firewall policy {:?}", v.border_policy_id),
                        ));
                    }
                }
                if !v.zone_id.is_empty() {
                    if !self.zones.contains_key(&v.zone_id) {
                        return Err(c.err("zone_id", format!("unknown zone {:?}", v.zone_id)));
                    }
                    for s in Index::of(&self.index.subnets_by_vpc, &v.id) {
                        self.check_attached_subnet(c, "zone_id", &v.id, &v.zone_id, &self.subnets[s])?;
                    }
                }
                if v.vni == 0 {
                    v.vni = self.free_vni().ok_or_else(|| c.err("vni", "every VNI is in use"))?;
                } else if let Some(o) = self.index.vnis.get(&v.vni).filter(|o| **o != v.id) {
                    return Err(c.err("vni", format!("vni {} is already used by vpc {o}", v.vni)));
                } else if let Some(m) = self.mirror_of_vni(v.vni, "") {
                    return Err(c.err("vni", format!("vni {} is mirror session {}'s", v.vni, m.id)));
                }
                self.replace(Kind::Vpc, &v.id.clone(), Some(Object::Vpc(v)));
            }
            Op::PutSubnet(s) => self.put_subnet(c, s)?,
            Op::PutHost(h) => {
                check_id(&h.id).map_err(|m| c.err("id", m))?;
                if h.underlay_ip.is_unspecified() || h.underlay_ip.is_multicast() {
                    return Err(c.err("underlay_ip", format!("{} is not a unicast address", h.underlay_ip)));
                }
                if h.underlay_ip.is_ipv6() {
                    return Err(c.err(
                        "underlay_ip",
                        format!("{} is IPv6; the overlay runs over IPv4 underlays only", h.underlay_ip),
                    ));
                }
                self.replace(Kind::Host, &h.id, Some(Object::Host(h.clone())));
            }
            Op::PutPort(p) => self.put_port(c, p)?,
            Op::PutSecurityGroup(g) => self.put_group(c, g)?,
            Op::PutQuarantine(q) => {
                check_id(&q.id).map_err(|m| c.err("id", m))?;
                if q.reason.trim().is_empty() {
                    return Err(c.err("reason", "a quarantine needs a reason"));
                }
                let exists = match q.target {
                    QuarantineTarget::Port => self.ports.contains_key(&q.target_id),
                    QuarantineTarget::Vpc => self.vpcs.contains_key(&q.target_id),
                    QuarantineTarget::Vm => self.index.ports_by_vm.contains_key(&q.target_id),
                };
                if !exists {
                    return Err(c.err(
                        "target_id",
                        format!("unknown {:?} {:?}", q.target, q.target_id).to_lowercase(),
                    ));
                }
                self.replace(Kind::Quarantine, &q.id, Some(Object::Quarantine(q.clone())));
            }
            Op::PutZone(z) => self.put_zone(c, z)?,
            Op::PutExchangePath(x) => self.put_exchange_path(c, x)?,
            Op::PutFirewallPolicy(f) => self.put_firewall_policy(c, f)?,
            Op::PutVpcPeering(x) => self.put_peering(c, x)?,
            Op::PutMirrorSession(x) => self.put_mirror(c, x)?,
            Op::PutInformationSystem(x) => self.put_system(c, x)?,
            Op::PutLoadBalancer(x) => self.put_load_balancer(c, x)?,
            Op::PutPool(x) => self.put_pool(c, x)?,
            Op::PutListener(x) => self.put_listener(c, x)?,
            Op::PutMember(x) => self.put_member(c, x)?,
            Op::PutVirtualIp(x) => self.put_virtual_ip(c, x)?,
            Op::PutCertificate(x) => self.put_certificate(c, x)?,
            Op::PutHttpListener(x) => self.put_http_listener(c, x)?,
            Op::Delete { kind, id } => self.delete(c, *kind, id)?,
        }
        Ok(())
    }

    /// The lowest VNI from [`VNI_AUTO_FIRST`] that no VPC uses.
    fn free_vni(&self) -> Option<u32> {
        let mirrors: BTreeSet<u32> = self.mirror_sessions.values().filter_map(MirrorSession::vni).collect();
        let mut next = VNI_AUTO_FIRST;
        for &used in self.index.vnis.range(VNI_AUTO_FIRST..).map(|(n, _)| n) {
            while mirrors.contains(&next) {
                next += 1;
            }
            if used != next {
                break;
            }
            next += 1;
        }
        while mirrors.contains(&next) {
            next += 1;
        }
        (next <= VNI_MAX).then_some(next)
    }

    /// The mirror session whose copies travel under `vni`, if any.
    fn mirror_of_vni(&self, vni: u32, except: &str) -> Option<&MirrorSession> {
        self.mirror_sessions
            .values()
            .find(|m| m.id != except && m.vni() == Some(vni))
    }

    /// The ports a mirror session copies the traffic of (its tap port
    /// never among them).
    pub fn mirrored_ports<'a>(&'a self, m: &'a MirrorSession) -> impl Iterator<Item = &'a Port> + 'a {
        let tap = match &m.destination {
            MirrorDestination::Tap { port_id, .. } => port_id.as_str(),
            _ => "",
        };
        self.ports.values().filter(move |p| {
            p.id != tap
                && if !m.port_id.is_empty() {
                    p.id == m.port_id
                } else if !m.vpc_id.is_empty() {
                    self.vpc_of(p) == m.vpc_id
                } else if !m.tenant_id.is_empty() {
                    p.tenant_id == m.tenant_id
                } else if !m.zone_id.is_empty() {
                    self.vpcs.get(self.vpc_of(p)).is_some_and(|v| v.zone_id == m.zone_id)
                } else {
                    true
                }
        })
    }

    fn put_mirror(&mut self, c: &Ctx, m: &MirrorSession) -> Result<(), BatchError> {
        check_id(&m.id).map_err(|e| c.err("id", e))?;
        let scopes: Vec<(&str, &String)> = [
            ("zone_id", &m.zone_id),
            ("tenant_id", &m.tenant_id),
            ("vpc_id", &m.vpc_id),
            ("port_id", &m.port_id),
        ]
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .collect();
        if scopes.len() > 1 {
            return Err(c.err(
                scopes[1].0,
                format!(
                    "give at most one of zone_id, tenant_id, vpc_id and port_id (also {} is given)",
                    scopes[0].0
                ),
            ));
        }
        if let Some((field, id)) = scopes.first() {
            let known = match *field {
                "zone_id" => self.zones.contains_key(*id),
                "tenant_id" => self.tenants.contains_key(*id),
                "vpc_id" => self.vpcs.contains_key(*id),
                _ => self.ports.contains_key(*id),
            };
            if !known {
                return Err(c.err(field, format!("unknown {} {id:?}", field.trim_end_matches("_id"))));
            }
        }
        if m.rules.len() > MIRROR_RULES_MAX {
            return Err(c.err(
                "rules",
                format!("{} rules; a session has at most {MIRROR_RULES_MAX}", m.rules.len()),
            ));
        }
        for (i, r) in m.rules.iter().enumerate() {
            let f = |x: &str| format!("rules[{i}].{x}");
            if let Some((lo, hi)) = r.ports {
                if !matches!(r.protocol, Protocol::Tcp | Protocol::Udp) {
                    return Err(c.err(&f("port_min"), "ports are for TCP and UDP rules only"));
                }
                if lo > hi {
                    return Err(c.err(&f("port_min"), format!("{lo} is above port_max {hi}")));
                }
            }
            for (name, n) in [("source_cidr", r.source), ("destination_cidr", r.destination)] {
                if let Some(n) = n {
                    if n.network() != n.ip() {
                        return Err(c.err(&f(name), format!("{n} has host bits set")));
                    }
                }
            }
            if let (Some(a), Some(b)) = (r.source, r.destination) {
                if a.is_ipv4() != b.is_ipv4() {
                    return Err(c.err(
                        &f("destination_cidr"),
                        "the source and destination are of different families",
                    ));
                }
            }
            let v6 = r.source.or(r.destination).map(|n| n.is_ipv6());
            match (r.protocol, v6) {
                (Protocol::Icmp, Some(true)) => return Err(c.err(&f("protocol"), "ICMP with IPv6 addresses")),
                (Protocol::Icmpv6, Some(false)) => return Err(c.err(&f("protocol"), "ICMPv6 with IPv4 addresses")),
                _ => {}
            }
        }
        if m.sample > MIRROR_SAMPLE_MAX {
            return Err(c.err("sample", format!("{} is above {MIRROR_SAMPLE_MAX}", m.sample)));
        }
        if m.snap_len != 0 && !(MIRROR_SNAP_MIN..=MIRROR_SNAP_MAX).contains(&m.snap_len) {
            return Err(c.err(
                "snap_len",
                format!(
                    "{} is not 0 (the whole packet) nor {MIRROR_SNAP_MIN} to {MIRROR_SNAP_MAX}",
                    m.snap_len
                ),
            ));
        }
        if m.rate_pps > MIRROR_RATE_MAX {
            return Err(c.err("rate_pps", format!("{} is above {MIRROR_RATE_MAX}", m.rate_pps)));
        }
        let unicast = |field: &str, ip: &IpAddr| -> Result<(), BatchError> {
            if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() {
                return Err(c.err(field, format!("{ip} is not a unicast address")));
            }
            if matches!(ip, IpAddr::V4(a) if a.is_broadcast()) {
                return Err(c.err(field, format!("{ip} is not a unicast address")));
            }
            Ok(())
        };
        match &m.destination {
            MirrorDestination::Tap { port_id, .. } => {
                let Some(tap) = self.ports.get(port_id) else {
                    return Err(c.err("tap.port_id", format!("unknown port {port_id:?}")));
                };
                // Copies reach a tap past its pipeline; with no group, a tap
                // gets nothing else and sends nothing into the cloud.
                if !tap.security_group_ids.is_empty() {
                    return Err(c.err(
                        "tap.port_id",
                        format!(
                            "port {port_id} has security groups ({}); a tap takes copies only: give it none",
                            tap.security_group_ids.join(", ")
                        ),
                    ));
                }
                if *port_id == m.port_id {
                    return Err(c.err("tap.port_id", "a port cannot be its own tap"));
                }
            }
            MirrorDestination::Vxlan { remote, port, .. } => {
                unicast("vxlan.remote", remote)?;
                if *port == 0 {
                    return Err(c.err("vxlan.port", "port 0"));
                }
            }
            MirrorDestination::Erspan {
                remote,
                version,
                session,
            } => {
                unicast("erspan.remote", remote)?;
                if !matches!(version, 2 | 3) {
                    return Err(c.err("erspan.version", format!("{version}: give 2 (type II) or 3 (type III)")));
                }
                if *session > 1023 {
                    return Err(c.err("erspan.session", format!("{session} is above 1023 (10 bits)")));
                }
            }
        }
        if let Some(vni) = m.vni() {
            let field = match m.destination {
                MirrorDestination::Tap { .. } => "tap.vni",
                _ => "vxlan.vni",
            };
            if vni == 0 || vni > VNI_MAX {
                return Err(c.err(field, format!("{vni} is not a VNI (1 to {VNI_MAX})")));
            }
            // Copies under a VPC's VNI would reach that VPC's ports.
            if let Some(v) = self.index.vnis.get(&vni) {
                return Err(c.err(
                    field,
                    format!("vni {vni} is vpc {v}'s; copies must travel under a VNI of their own"),
                ));
            }
            if let Some(o) = self.mirror_of_vni(vni, &m.id) {
                return Err(c.err(field, format!("vni {vni} is already mirror session {}'s", o.id)));
            }
        }
        self.replace(Kind::MirrorSession, &m.id, Some(Object::MirrorSession(m.clone())));
        Ok(())
    }

    fn put_system(&mut self, c: &Ctx, m: &InformationSystem) -> Result<(), BatchError> {
        check_id(&m.id).map_err(|e| c.err("id", e))?;
        if m.vpc_ids.is_empty() && m.port_ids.is_empty() {
            return Err(c.err("vpc_ids", "an information system needs at least one VPC or port"));
        }
        if m.vpc_ids.len() + m.port_ids.len() > SYSTEM_MEMBERS_MAX {
            return Err(c.err("port_ids", format!("more than {SYSTEM_MEMBERS_MAX} VPCs and ports")));
        }
        let others = || self.information_systems.values().filter(|o| o.id != m.id);
        let mut seen = BTreeSet::new();
        for (i, v) in m.vpc_ids.iter().enumerate() {
            let field = format!("vpc_ids[{i}]");
            if !self.vpcs.contains_key(v) {
                return Err(c.err(&field, format!("unknown vpc {v:?}")));
            }
            if !seen.insert(v) {
                return Err(c.err(&field, format!("vpc {v} is listed twice")));
            }
            if let Some(o) = others().find(|o| o.vpc_ids.contains(v)) {
                return Err(c.err(&field, format!("vpc {v} is already information system {}'s", o.id)));
            }
            if let Some((o, p)) = others()
                .flat_map(|o| o.port_ids.iter().map(move |p| (o, p)))
                .find(|(_, p)| self.ports.get(*p).map(|p| self.vpc_of(p)) == Some(v.as_str()))
            {
                return Err(c.err(
                    &field,
                    format!("port {p} of vpc {v} is already information system {}'s", o.id),
                ));
            }
        }
        let mut seen = BTreeSet::new();
        for (i, id) in m.port_ids.iter().enumerate() {
            let field = format!("port_ids[{i}]");
            let Some(p) = self.ports.get(id) else {
                return Err(c.err(&field, format!("unknown port {id:?}")));
            };
            if !seen.insert(id) {
                return Err(c.err(&field, format!("port {id} is listed twice")));
            }
            let vpc = self.vpc_of(p);
            if m.vpc_ids.iter().any(|v| v == vpc) {
                return Err(c.err(
                    &field,
                    format!("port {id} is in vpc {vpc}, which the system lists whole"),
                ));
            }
            if let Some(o) = others().find(|o| o.port_ids.contains(id) || o.vpc_ids.iter().any(|v| v == vpc)) {
                return Err(c.err(&field, format!("port {id} is already information system {}'s", o.id)));
            }
        }
        if m.bandwidth.is_empty() {
            return Err(c.err("bandwidth", "give the system's bandwidth towards at least one zone"));
        }
        let mut seen = BTreeSet::new();
        for (i, b) in m.bandwidth.iter().enumerate() {
            if !self.zones.contains_key(&b.zone_id) {
                return Err(c.err(
                    &format!("bandwidth[{i}].zone_id"),
                    format!("unknown zone {:?}", b.zone_id),
                ));
            }
            if !seen.insert(&b.zone_id) {
                return Err(c.err(
                    &format!("bandwidth[{i}].zone_id"),
                    format!("zone {} is given twice", b.zone_id),
                ));
            }
            for (f, v) in [("up_bps", b.up_bps), ("down_bps", b.down_bps)] {
                if v == 0 {
                    return Err(c.err(&format!("bandwidth[{i}].{f}"), "must be more than 0 bits a second"));
                }
            }
        }
        if m.alert_percent > 100 {
            return Err(c.err(
                "alert_percent",
                format!("{} is not a share (1 to 100 percent, 0: 80)", m.alert_percent),
            ));
        }
        if m.interval_secs != 0 && !(SYSTEM_INTERVAL_MIN..=SYSTEM_INTERVAL_MAX).contains(&m.interval_secs) {
            return Err(c.err(
                "interval_secs",
                format!(
                    "{} s is outside {SYSTEM_INTERVAL_MIN} to {SYSTEM_INTERVAL_MAX} s",
                    m.interval_secs
                ),
            ));
        }
        self.replace(
            Kind::InformationSystem,
            &m.id,
            Some(Object::InformationSystem(m.clone())),
        );
        Ok(())
    }

    /// The information system whose traffic includes `port`'s, if one's does.
    pub fn system_of_port(&self, port: &Port) -> Option<&InformationSystem> {
        let vpc = self.vpc_of(port);
        self.information_systems
            .values()
            .find(|s| s.port_ids.contains(&port.id) || s.vpc_ids.iter().any(|v| v == vpc))
    }

    /// The information system that refers to `kind` `id`, if one does.
    fn system_using(&self, kind: Kind, id: &str) -> Option<&InformationSystem> {
        self.information_systems.values().find(|s| match kind {
            Kind::Zone => s.bandwidth.iter().any(|b| b.zone_id == id),
            Kind::Vpc => s.vpc_ids.iter().any(|v| v == id),
            Kind::Port => s.port_ids.iter().any(|p| p == id),
            _ => false,
        })
    }

    /// The mirror session that refers to `kind` `id`, if one does.
    fn mirror_using(&self, kind: Kind, id: &str) -> Option<&MirrorSession> {
        self.mirror_sessions.values().find(|m| match kind {
            Kind::Zone => m.zone_id == id,
            Kind::Tenant => m.tenant_id == id,
            Kind::Vpc => m.vpc_id == id,
            Kind::Port => {
                m.port_id == id || matches!(&m.destination, MirrorDestination::Tap { port_id, .. } if port_id == id)
            }
            _ => false,
        })
    }

    fn vpc_of(&self, p: &Port) -> &str {
        self.subnets.get(&p.subnet_id).map(|s| s.vpc_id.as_str()).unwrap_or("")
    }

    /// The zone an outside address belongs to: the longest matching prefix
    /// over every zone's prefixes.
    pub fn zone_of(&self, ip: IpAddr) -> Option<&Zone> {
        self.zones
            .values()
            .flat_map(|z| z.prefixes.iter().map(move |n| (n, z)))
            .filter(|(n, _)| n.contains(ip))
            .max_by_key(|(n, _)| n.prefix())
            .map(|(_, z)| z)
    }

    /// A subnet of a VPC attached to `zone`: its prefixes are routed on that
    /// zone's uplink, so they must be the zone's own addresses (else the
    /// dataplane would count them in another zone: a path nobody declared)
    /// and no other attached VPC may use them.
    fn check_attached_subnet(&self, c: &Ctx, field: &str, vpc: &str, zone: &str, s: &Subnet) -> Result<(), BatchError> {
        let nets: Vec<IpNetwork> = s
            .cidr_v4
            .map(IpNetwork::V4)
            .into_iter()
            .chain(s.cidr_v6.map(IpNetwork::V6))
            .collect();
        for n in nets {
            for probe in [n.network(), last_address(n)] {
                match self.zone_of(probe) {
                    Some(z) if z.id == zone => {}
                    Some(z) => {
                        return Err(c.err(
                            field,
                            format!(
                                "subnet {} ({n}) of vpc {vpc} in zone {zone} holds addresses of zone {};                                  that would open a path between the zones",
                                s.id, z.id
                            ),
                        ))
                    }
                    None => {
                        return Err(c.err(
                            field,
                            format!("subnet {} ({n}) of vpc {vpc} is outside every prefix of zone {zone}", s.id),
                        ))
                    }
                }
            }
            for o in self.subnets.values().filter(|o| o.vpc_id != vpc) {
                let attached = self.vpcs.get(&o.vpc_id).is_some_and(|v| !v.zone_id.is_empty());
                let overlap = match n {
                    IpNetwork::V4(a) => o.cidr_v4.is_some_and(|b| a.overlaps(b)),
                    IpNetwork::V6(a) => o.cidr_v6.is_some_and(|b| a.overlaps(b)),
                };
                if attached && overlap {
                    return Err(c.err(
                        field,
                        format!(
                            "subnet {} ({n}) overlaps subnet {} of vpc {}; VPCs with an uplink need their own addresses",
                            s.id, o.id, o.vpc_id
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    fn put_zone(&mut self, c: &Ctx, z: &Zone) -> Result<(), BatchError> {
        check_id(&z.id).map_err(|m| c.err("id", m))?;
        check_device(&z.uplink_device).map_err(|m| c.err("uplink_device", m))?;
        if z.prefixes.is_empty() {
            return Err(c.err("prefixes", "a zone needs at least one prefix"));
        }
        for (i, n) in z.prefixes.iter().enumerate() {
            if n.network() != n.ip() {
                return Err(c.err(&format!("prefixes[{i}]"), format!("{n} has host bits set")));
            }
            for o in self.zones.values().filter(|o| o.id != z.id) {
                if o.prefixes.contains(n) {
                    return Err(c.err(
                        &format!("prefixes[{i}]"),
                        format!("{n} is already a prefix of zone {}", o.id),
                    ));
                }
                if o.uplink_device == z.uplink_device {
                    return Err(c.err(
                        "uplink_device",
                        format!("{} is already the uplink of zone {}", z.uplink_device, o.id),
                    ));
                }
            }
        }
        let zones = self.zones.len() + usize::from(!self.zones.contains_key(&z.id));
        if zones > ZONES_MAX as usize {
            return Err(c.err(
                "",
                format!(
                    "zone {} would be zone number {zones}; the dataplane holds at most {ZONES_MAX}",
                    z.id
                ),
            ));
        }
        let prefixes = z.prefixes.len()
            + self
                .zones
                .values()
                .filter(|o| o.id != z.id)
                .map(|o| o.prefixes.len())
                .sum::<usize>();
        if prefixes > ZONE_NETS_MAX as usize {
            return Err(c.err(
                "prefixes",
                format!("{prefixes} prefixes in all zones; the dataplane holds at most {ZONE_NETS_MAX}"),
            ));
        }
        self.check_paths_into(c, z)?;
        let old = self.replace(Kind::Zone, &z.id, Some(Object::Zone(z.clone())));
        // Every attached VPC must still be inside its own zone.
        let attached: Vec<(String, String)> = self
            .vpcs
            .values()
            .filter(|v| !v.zone_id.is_empty())
            .map(|v| (v.id.clone(), v.zone_id.clone()))
            .collect();
        for (vpc, zone) in attached {
            for s in self.subnets.values().filter(|s| s.vpc_id == vpc) {
                if let Err(e) = self.check_attached_subnet(c, "prefixes", &vpc, &zone, s) {
                    self.replace(Kind::Zone, &z.id, old);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// The VPCs a VPC is peered with.
    pub fn peers_of(&self, vpc: &str) -> Vec<&str> {
        Index::of(&self.index.peerings_by_vpc, vpc)
            .filter_map(|id| self.peerings.get(id))
            .filter_map(|p| {
                if p.vpc_a == vpc {
                    Some(p.vpc_b.as_str())
                } else if p.vpc_b == vpc {
                    Some(p.vpc_a.as_str())
                } else {
                    None
                }
            })
            .collect()
    }

    fn put_peering(&mut self, c: &Ctx, x: &VpcPeering) -> Result<(), BatchError> {
        check_id(&x.id).map_err(|m| c.err("id", m))?;
        for (f, v) in [("vpc_a", &x.vpc_a), ("vpc_b", &x.vpc_b)] {
            if !self.vpcs.contains_key(v) {
                return Err(c.err(f, format!("unknown vpc {v:?}")));
            }
        }
        if x.vpc_a == x.vpc_b {
            return Err(c.err("vpc_b", "a VPC cannot peer with itself"));
        }
        if !x.policy_id.is_empty() && !self.firewall_policies.contains_key(&x.policy_id) {
            return Err(c.err("policy_id", format!("unknown firewall policy {:?}", x.policy_id)));
        }
        let same_pair =
            |o: &VpcPeering| (o.vpc_a == x.vpc_a && o.vpc_b == x.vpc_b) || (o.vpc_a == x.vpc_b && o.vpc_b == x.vpc_a);
        if let Some(o) = Index::of(&self.index.peerings_by_vpc, &x.vpc_a)
            .filter_map(|id| self.peerings.get(id))
            .find(|o| o.id != x.id && same_pair(o))
        {
            return Err(c.err(
                "vpc_b",
                format!("vpcs {} and {} are already peered by {}", x.vpc_a, x.vpc_b, o.id),
            ));
        }
        let (za, zb) = (&self.vpcs[&x.vpc_a].zone_id, &self.vpcs[&x.vpc_b].zone_id);
        if za != zb {
            return Err(c.err(
                "vpc_b",
                format!(
                    "vpc {} is in zone {za:?} and vpc {} in zone {zb:?}; peering would join the zones \
                     (declare an exchange path instead)",
                    x.vpc_a, x.vpc_b
                ),
            ));
        }
        // Each side reaches the other's addresses: they must not overlap each
        // other nor the other peers of either side.
        let mut prev = self.replace(Kind::VpcPeering, &x.id, Some(Object::VpcPeering(x.clone())));
        for side in [&x.vpc_a, &x.vpc_b] {
            if let Err(e) = self.check_peer_addresses(c, side) {
                self.replace(Kind::VpcPeering, &x.id, prev.take());
                return Err(e);
            }
        }
        Ok(())
    }

    /// The subnets a VPC reaches (its own and its peers') must not overlap.
    fn check_peer_addresses(&self, c: &Ctx, vpc: &str) -> Result<(), BatchError> {
        let mut reach: Vec<(&str, &Subnet)> = Vec::new();
        for v in std::iter::once(vpc).chain(self.peers_of(vpc)) {
            for s in Index::of(&self.index.subnets_by_vpc, v).map(|id| &self.subnets[id]) {
                for (ov, os) in &reach {
                    let clash = s.cidr_v4.zip(os.cidr_v4).is_some_and(|(a, b)| a.overlaps(b))
                        || s.cidr_v6.zip(os.cidr_v6).is_some_and(|(a, b)| a.overlaps(b));
                    if clash && *ov != v {
                        return Err(c.err(
                            "vpc_b",
                            format!(
                                "subnet {} of vpc {v} overlaps subnet {} of vpc {ov}, both reached from vpc {vpc}",
                                s.id, os.id
                            ),
                        ));
                    }
                }
                reach.push((v, s));
            }
        }
        Ok(())
    }

    fn put_firewall_policy(&mut self, c: &Ctx, f: &FirewallPolicy) -> Result<(), BatchError> {
        check_id(&f.id).map_err(|m| c.err("id", m))?;
        if f.rules.len() > FW_POLICY_RULES_MAX as usize {
            return Err(c.err(
                "rules",
                format!("{} rules; a policy holds at most {FW_POLICY_RULES_MAX}", f.rules.len()),
            ));
        }
        let mut ids = BTreeSet::new();
        for (i, r) in f.rules.iter().enumerate() {
            let fld = |name: &str| format!("rules[{i}].{name}");
            check_id(&r.id).map_err(|m| c.err(&fld("id"), m))?;
            if !ids.insert(&r.id) {
                return Err(c.err(&fld("id"), format!("rule id {} used twice", r.id)));
            }
            if let Some(o) = f.rules[..i].iter().find(|o| o.priority == r.priority) {
                return Err(c.err(
                    &fld("priority"),
                    format!(
                        "priority {} is also rule {}'s; the order must be explicit",
                        r.priority, o.id
                    ),
                ));
            }
            match (r.protocol, r.ether_type) {
                (Protocol::Icmp, EtherType::IPv6) => {
                    return Err(c.err(&fld("protocol"), "icmp is for IPv4; use icmpv6"))
                }
                (Protocol::Icmpv6, EtherType::IPv4) => {
                    return Err(c.err(&fld("protocol"), "icmpv6 is for IPv6; use icmp"))
                }
                _ => {}
            }
            if let Some((lo, hi)) = r.ports {
                if lo > hi {
                    return Err(c.err(&fld("port_min"), format!("port_min {lo} is above port_max {hi}")));
                }
                if r.protocol == Protocol::Any {
                    return Err(c.err(&fld("port_min"), "a port range needs protocol tcp, udp, icmp or icmpv6"));
                }
            }
            if let Some(n) = r.remote {
                if n.is_ipv4() != (r.ether_type == EtherType::IPv4) {
                    return Err(c.err(
                        &fld("remote_cidr"),
                        format!("{n} is not an {:?} prefix, as the rule's ether type asks", r.ether_type),
                    ));
                }
                if n.network() != n.ip() {
                    return Err(c.err(&fld("remote_cidr"), format!("{n} has host bits set")));
                }
            }
        }
        self.replace(Kind::FirewallPolicy, &f.id, Some(Object::FirewallPolicy(f.clone())));
        Ok(())
    }

    fn put_exchange_path(&mut self, c: &Ctx, x: &ExchangePath) -> Result<(), BatchError> {
        check_id(&x.id).map_err(|m| c.err("id", m))?;
        for (field, z) in [("from_zone", &x.from_zone), ("to_zone", &x.to_zone)] {
            if !self.zones.contains_key(z) {
                return Err(c.err(field, format!("unknown zone {z:?}")));
            }
        }
        if x.from_zone == x.to_zone {
            return Err(c.err("to_zone", "an exchange path joins two different zones"));
        }
        if x.source.is_ipv4() != x.destination.is_ipv4() {
            return Err(c.err(
                "destination_cidr",
                "source and destination must be of one address family",
            ));
        }
        for (field, n) in [("source_cidr", x.source), ("destination_cidr", x.destination)] {
            if n.network() != n.ip() {
                return Err(c.err(field, format!("{n} has host bits set")));
            }
        }
        if x.destination.prefix() == 0 {
            return Err(c.err(
                "destination_cidr",
                "an exchange path must name its destination; a default route would join the zones",
            ));
        }
        match (x.protocol, x.source.is_ipv4()) {
            (Protocol::Any, _) => {
                return Err(c.err("protocol", "an exchange path names tcp, udp, icmp or icmpv6, never any"))
            }
            (Protocol::Icmp, false) => return Err(c.err("protocol", "icmp is for IPv4; use icmpv6")),
            (Protocol::Icmpv6, true) => return Err(c.err("protocol", "icmpv6 is for IPv6; use icmp")),
            _ => {}
        }
        if x.ports.0 > x.ports.1 {
            return Err(c.err(
                "port_min",
                format!("port_min {} is above port_max {}", x.ports.0, x.ports.1),
            ));
        }
        if matches!(x.protocol, Protocol::Tcp | Protocol::Udp) && x.ports == (0, 65535) {
            return Err(c.err(
                "port_min",
                "an exchange path names its ports; all ports would join the zones",
            ));
        }
        if matches!(x.protocol, Protocol::Icmp | Protocol::Icmpv6) && x.ports.1 > 255 {
            return Err(c.err("port_max", format!("ICMP type {} is above 255", x.ports.1)));
        }
        if x.broad && x.broad_reason.trim().is_empty() {
            return Err(c.err(
                "broad_reason",
                "a broad exchange path needs a reason; the audit record carries it",
            ));
        }
        if x.broad_reason.chars().any(char::is_control) {
            return Err(c.err(
                "broad_reason",
                "a reason is one line of text, without control characters",
            ));
        }
        if !x.broad && !x.broad_reason.is_empty() {
            return Err(c.err(
                "broad_reason",
                "only a broad exchange path has a reason; set broad or leave the reason out",
            ));
        }
        let to = &self.zones[&x.to_zone];
        if !to.prefixes.iter().any(|n| within(x.destination, *n)) {
            return Err(c.err(
                "destination_cidr",
                format!(
                    "{} is not inside zone {} ({})",
                    x.destination,
                    to.id,
                    list(&to.prefixes)
                ),
            ));
        }
        if x.source.prefix() == 0 && !x.broad {
            return Err(c.err(
                "source_cidr",
                format!(
                    "{} is every address; name the sources, or mark the path broad with a broad_reason",
                    x.source
                ),
            ));
        }
        let paths = self.exchange_paths.len() + usize::from(!self.exchange_paths.contains_key(&x.id));
        if paths > EXCHANGE_MAX as usize {
            return Err(c.err(
                "",
                format!(
                    "exchange path {} would be path number {paths}; every host holds them all, at most {EXCHANGE_MAX}",
                    x.id
                ),
            ));
        }
        if !x.broad {
            let group = self.path_group(&x.from_zone, &x.to_zone, x.protocol, Some(x));
            if let Some((field, message)) = self.widening(&group, to, &[x.destination.is_ipv4()]) {
                return Err(c.err(field, message));
            }
        }
        self.replace(Kind::ExchangePath, &x.id, Some(Object::ExchangePath(x.clone())));
        Ok(())
    }

    /// The paths that are not broad from `from` to `to` with `protocol`,
    /// with `new` in place of the path of its id.
    fn path_group<'a>(
        &'a self,
        from: &str,
        to: &str,
        protocol: Protocol,
        new: Option<&'a ExchangePath>,
    ) -> Vec<&'a ExchangePath> {
        self.exchange_paths
            .values()
            .filter(|p| new.is_none_or(|n| n.id != p.id))
            .chain(new)
            .filter(|p| !p.broad && p.from_zone == from && p.to_zone == to && p.protocol == protocol)
            .collect()
    }

    /// Whether paths of one group together open more of `zone` than the
    /// settings allow without `broad`: of its addresses of each family
    /// asked for (`true`: IPv4), or of the port range. Gives the field to
    /// name and why.
    fn widening(&self, group: &[&ExchangePath], zone: &Zone, v4: &[bool]) -> Option<(&'static str, String)> {
        let first = group.first()?;
        let max = self.settings.exchange_share_max_percent;
        let what = format!(
            "the exchange paths from zone {} to zone {} over {:?} ({})",
            first.from_zone,
            first.to_zone,
            first.protocol,
            group.iter().map(|p| p.id.as_str()).collect::<Vec<_>>().join(", ")
        );
        let advice = format!("above {max}% needs broad: true and a broad_reason");
        for &fam in v4 {
            let share = address_share(&zone.prefixes, group.iter().map(|p| p.destination), fam);
            if share.above(max) {
                let family = if fam { "IPv4" } else { "IPv6" };
                return Some((
                    "destination_cidr",
                    format!(
                        "{what} would reach {:.2}% of zone {}'s {family} addresses; {advice}",
                        share.percent(),
                        zone.id
                    ),
                ));
            }
        }
        let icmp = matches!(first.protocol, Protocol::Icmp | Protocol::Icmpv6);
        let share = port_share(group.iter().map(|p| p.ports), icmp);
        if share.above(max) {
            let range = if icmp { "ICMP types" } else { "ports" };
            return Some((
                "port_min",
                format!("{what} would open {:.2}% of all {range}; {advice}", share.percent()),
            ));
        }
        None
    }

    /// A zone's new prefixes must still hold the destinations of the paths
    /// into it, and the paths that are not broad may not open more of it.
    fn check_paths_into(&self, c: &Ctx, zone: &Zone) -> Result<(), BatchError> {
        let into: Vec<&ExchangePath> = self.exchange_paths.values().filter(|p| p.to_zone == zone.id).collect();
        for p in &into {
            if !zone.prefixes.iter().any(|n| within(p.destination, *n)) {
                return Err(c.err(
                    "prefixes",
                    format!(
                        "exchange path {} goes to {}, which would be outside the zone",
                        p.id, p.destination
                    ),
                ));
            }
        }
        let groups: BTreeSet<(&str, Protocol)> = into.iter().map(|p| (p.from_zone.as_str(), p.protocol)).collect();
        for (from, protocol) in groups {
            let group = self.path_group(from, &zone.id, protocol, None);
            if let Some((_, message)) = self.widening(&group, zone, &[true, false]) {
                return Err(c.err("prefixes", message));
            }
        }
        Ok(())
    }

    fn need_tenant(&self, c: &Ctx, field: &str, id: &str) -> Result<(), BatchError> {
        if self.tenants.contains_key(id) {
            Ok(())
        } else {
            Err(c.err(field, format!("unknown tenant {id:?}")))
        }
    }

    fn put_subnet(&mut self, c: &Ctx, s: &Subnet) -> Result<(), BatchError> {
        check_id(&s.id).map_err(|m| c.err("id", m))?;
        if !self.vpcs.contains_key(&s.vpc_id) {
            return Err(c.err("vpc_id", format!("unknown vpc {:?}", s.vpc_id)));
        }
        if s.cidr_v4.is_none() && s.cidr_v6.is_none() {
            return Err(c.err("cidr_v4", "a subnet needs cidr_v4, cidr_v6 or both"));
        }
        if let Some(n) = s.cidr_v4 {
            if n.prefix() > 30 {
                return Err(c.err("cidr_v4", format!("{n} is too small for VMs (longest allowed /30)")));
            }
        }
        if let Some(n) = s.cidr_v6 {
            if n.prefix() > 126 {
                return Err(c.err("cidr_v6", format!("{n} is too small for VMs (longest allowed /126)")));
            }
        }
        if let Some(old) = self.subnets.get(&s.id) {
            if old.vpc_id != s.vpc_id {
                return Err(c.err(
                    "vpc_id",
                    format!("subnet {} belongs to vpc {}; a subnet cannot move", s.id, old.vpc_id),
                ));
            }
            self.check_subnet_keeps_lb_addresses(c, old, s)?;
        }
        for other in Index::of(&self.index.subnets_by_vpc, &s.vpc_id)
            .filter(|o| *o != s.id)
            .map(|o| &self.subnets[o])
        {
            if let (Some(a), Some(b)) = (s.cidr_v4, other.cidr_v4) {
                if a.overlaps(b) {
                    return Err(c.err(
                        "cidr_v4",
                        format!("{a} overlaps {b} of subnet {} in vpc {}", other.id, s.vpc_id),
                    ));
                }
            }
            if let (Some(a), Some(b)) = (s.cidr_v6, other.cidr_v6) {
                if a.overlaps(b) {
                    return Err(c.err(
                        "cidr_v6",
                        format!("{a} overlaps {b} of subnet {} in vpc {}", other.id, s.vpc_id),
                    ));
                }
            }
        }
        for p in Index::of(&self.index.ports_by_subnet, &s.id).map(|id| &self.ports[id]) {
            if let Some(ip) = p.ipv4 {
                if !s.cidr_v4.is_some_and(|n| n.contains(ip)) {
                    return Err(c.err(
                        "cidr_v4",
                        format!("port {} has address {ip} outside the new prefix", p.id),
                    ));
                }
            }
            if let Some(ip) = p.ipv6 {
                if !s.cidr_v6.is_some_and(|n| n.contains(ip)) {
                    return Err(c.err(
                        "cidr_v6",
                        format!("port {} has address {ip} outside the new prefix", p.id),
                    ));
                }
            }
        }
        if let Some(v) = self.vpcs.get(&s.vpc_id).filter(|v| !v.zone_id.is_empty()) {
            let (vpc, zone) = (v.id.clone(), v.zone_id.clone());
            self.check_attached_subnet(c, "cidr_v4", &vpc, &zone, s)?;
        }
        let mut prev = self.replace(Kind::Subnet, &s.id, Some(Object::Subnet(s.clone())));
        let vpc = s.vpc_id.clone();
        let sides: Vec<String> = std::iter::once(vpc.clone())
            .chain(self.peers_of(&vpc).into_iter().map(str::to_string))
            .collect();
        for side in sides {
            if let Err(e) = self.check_peer_addresses(c, &side) {
                self.replace(Kind::Subnet, &s.id, prev.take());
                return Err(BatchError {
                    field: e.field.replace(".vpc_b", ".cidr_v4"),
                    ..e
                });
            }
        }
        Ok(())
    }

    fn put_port(&mut self, c: &Ctx, p: &Port) -> Result<(), BatchError> {
        check_id(&p.id).map_err(|m| c.err("id", m))?;
        self.need_tenant(c, "tenant_id", &p.tenant_id)?;
        if !p.security_group_ids.is_empty() {
            if let Some(m) = self
                .mirror_sessions
                .values()
                .find(|m| matches!(&m.destination, MirrorDestination::Tap { port_id, .. } if *port_id == p.id))
            {
                return Err(c.err(
                    "security_group_ids",
                    format!(
                        "port {} is mirror session {}'s tap: a tap takes copies only, and has no security group",
                        p.id, m.id
                    ),
                ));
            }
        }
        let subnet = self
            .subnets
            .get(&p.subnet_id)
            .ok_or_else(|| c.err("subnet_id", format!("unknown subnet {:?}", p.subnet_id)))?;
        let vpc = &self.vpcs[&subnet.vpc_id];
        if vpc.tenant_id != p.tenant_id {
            return Err(c.err(
                "subnet_id",
                format!(
                    "subnet {} is in vpc {} of tenant {}, not {}",
                    subnet.id, vpc.id, vpc.tenant_id, p.tenant_id
                ),
            ));
        }
        if !self.hosts.contains_key(&p.host_id) {
            return Err(c.err("host_id", format!("unknown host {:?}", p.host_id)));
        }
        // A port is in one information system at most: one that lists it
        // cannot see it move into a VPC another system takes whole.
        let listed = self.information_systems.values().find(|s| s.port_ids.contains(&p.id));
        let whole = self.information_systems.values().find(|s| s.vpc_ids.contains(&vpc.id));
        if let (Some(a), Some(b)) = (listed, whole) {
            if a.id != b.id {
                return Err(c.err(
                    "subnet_id",
                    format!(
                        "port {} is information system {}'s, and vpc {} is information system {}'s: a port is in one system at most",
                        p.id, a.id, vpc.id, b.id
                    ),
                ));
            }
        }
        check_device(&p.device).map_err(|m| c.err("device", m))?;
        if p.ipv4.is_none() && p.ipv6.is_none() {
            return Err(c.err("ipv4", "a port needs an IPv4 address, an IPv6 address or both"));
        }
        if let Some(ip) = p.ipv4 {
            match subnet.cidr_v4 {
                None => return Err(c.err("ipv4", format!("subnet {} has no IPv4 prefix", subnet.id))),
                Some(n) if !n.contains(ip) => {
                    return Err(c.err("ipv4", format!("{ip} is outside subnet {} ({n})", subnet.id)))
                }
                Some(n) if ip == n.network() || ip == n.broadcast() => {
                    return Err(c.err("ipv4", format!("{ip} is the network or broadcast address of {n}")))
                }
                Some(_) if Some(ip) == subnet.gateway_v4() => {
                    return Err(c.err("ipv4", format!("{ip} is the gateway of subnet {}", subnet.id)))
                }
                _ => {}
            }
        }
        if let Some(ip) = p.ipv6 {
            match subnet.cidr_v6 {
                None => return Err(c.err("ipv6", format!("subnet {} has no IPv6 prefix", subnet.id))),
                Some(n) if !n.contains(ip) => {
                    return Err(c.err("ipv6", format!("{ip} is outside subnet {} ({n})", subnet.id)))
                }
                Some(n) if ip == n.network() => {
                    return Err(c.err("ipv6", format!("{ip} is the subnet-router anycast address of {n}")))
                }
                Some(_) if Some(ip) == subnet.gateway_v6() => {
                    return Err(c.err("ipv6", format!("{ip} is the gateway of subnet {}", subnet.id)))
                }
                _ => {}
            }
        }
        let mut seen = BTreeSet::new();
        for (i, g) in p.security_group_ids.iter().enumerate() {
            let field = format!("security_group_ids[{i}]");
            let grp = self
                .security_groups
                .get(g)
                .ok_or_else(|| c.err(&field, format!("unknown security group {g:?}")))?;
            if grp.tenant_id != p.tenant_id {
                return Err(c.err(
                    &field,
                    format!(
                        "security group {g} belongs to tenant {}, not {}",
                        grp.tenant_id, p.tenant_id
                    ),
                ));
            }
            if !seen.insert(g) {
                return Err(c.err(&field, format!("security group {g} listed twice")));
            }
        }
        let ix = &self.index;
        let vpc = &subnet.vpc_id;
        if let Some(other) = ix
            .devices
            .get(&(p.host_id.clone(), p.device.clone()))
            .filter(|o| **o != p.id)
        {
            return Err(c.err(
                "device",
                format!("device {} on host {} is already port {other}", p.device, p.host_id),
            ));
        }
        for (field, ip) in [("ipv4", p.ipv4.map(IpAddr::V4)), ("ipv6", p.ipv6.map(IpAddr::V6))] {
            let Some(ip) = ip else { continue };
            if let Some(other) = ix.addresses.get(&(vpc.clone(), ip)).filter(|o| **o != p.id) {
                return Err(c.err(field, format!("{ip} is already used by port {other} in vpc {vpc}")));
            }
            if let Some(lb) = self.lb_of_address(vpc, ip) {
                return Err(c.err(field, format!("{ip} is load balancer {}'s in vpc {vpc}", lb.id)));
            }
            if let Some(v) = self.vip_of_address(vpc, ip) {
                return Err(c.err(field, format!("{ip} is virtual ip {}'s in vpc {vpc}", v.id)));
            }
        }
        if let Some(other) = ix.macs.get(&(vpc.clone(), p.mac)).filter(|o| **o != p.id) {
            return Err(c.err("mac", format!("{} is already used by port {other} in vpc {vpc}", p.mac)));
        }
        // A VM is one tenant's: a port of another tenant naming it would be
        // held by its quarantine, or hold it. Checked when a port takes the
        // id, so that a port that already had it (state of an earlier
        // release) can still be changed.
        let takes_vm = self.ports.get(&p.id).is_none_or(|old| old.vm_id != p.vm_id);
        if !p.vm_id.is_empty() && takes_vm {
            if let Some(other) = Index::of(&ix.ports_by_vm, &p.vm_id)
                .filter(|o| *o != p.id)
                .filter_map(|o| self.ports.get(o))
                .find(|o| o.tenant_id != p.tenant_id)
            {
                return Err(c.err(
                    "vm_id",
                    format!(
                        "vm {} has port {} of tenant {}, not {}",
                        p.vm_id, other.id, other.tenant_id, p.tenant_id
                    ),
                ));
            }
        }
        // A quarantined port stays where its quarantine holds it: it does
        // not leave its quarantined VM or VPC until the quarantine is lifted.
        if let Some(old) = self.ports.get(&p.id) {
            let old_vpc = self.vpc_of(old);
            for q in self.quarantines.values() {
                let (held, field) = match q.target {
                    QuarantineTarget::Vm => (
                        !old.vm_id.is_empty() && q.target_id == old.vm_id && p.vm_id != old.vm_id,
                        "vm_id",
                    ),
                    QuarantineTarget::Vpc => (q.target_id == old_vpc && vpc.as_str() != old_vpc, "subnet_id"),
                    QuarantineTarget::Port => (false, ""),
                };
                if held {
                    return Err(c.err(
                        field,
                        format!(
                            "port {} is held by quarantine {} of {} {}; lift it first",
                            p.id,
                            q.id,
                            format!("{:?}", q.target).to_lowercase(),
                            q.target_id
                        ),
                    ));
                }
            }
        }
        let here = ix.ports_by_host.get(&p.host_id);
        let on_host = here.map_or(0, |s| s.len()) + usize::from(!here.is_some_and(|s| s.contains(&p.id)));
        if on_host > PORTS_MAX as usize {
            return Err(c.err(
                "host_id",
                format!(
                    "host {} would have {on_host} ports; its dataplane holds at most {PORTS_MAX}",
                    p.host_id
                ),
            ));
        }
        let was = self.replace(Kind::Port, &p.id, Some(Object::Port(p.clone())));
        if let Err(e) = self
            .check_member_ports(c, p)
            .and_then(|_| self.check_vip_ports(c, p))
            .and_then(|_| self.check_proxy_ports(c, p))
        {
            self.replace(Kind::Port, &p.id, was);
            return Err(e);
        }
        Ok(())
    }

    /// Every host must hold its share (what the controller streams to it):
    ///
    /// - the overlay: the endpoints (port addresses and gateways) of the
    ///   VPCs it has ports in and of their peers, each peer's ports once
    ///   more under the VNI of the VPC it peers with; and the port
    ///   addresses of those VPCs that have a zone;
    /// - the firewalls: the border policies of those VPCs and the policies
    ///   of their peerings, their rules, and a name for every rule and for
    ///   each policy's default.
    ///
    /// Checked once the batch is whole (it counts every port). A host over
    /// a limit is blamed on the batch's last operation that added to it; a
    /// host this batch did not add to is left alone.
    fn check_host_capacity(&self, ops: &[Op]) -> Result<(), BatchError> {
        let grows = |op: &Op| {
            matches!(
                op,
                Op::PutPort(_) | Op::PutSubnet(_) | Op::PutVpc(_) | Op::PutVpcPeering(_) | Op::PutFirewallPolicy(_)
            )
        };
        if !ops.iter().any(grows) {
            return Ok(());
        }
        // The hosts the batch may have grown: those holding a VPC, peering
        // or policy it changed, or a port it put.
        let ix = &self.index;
        let mut hosts: BTreeSet<&str> = BTreeSet::new();
        let mut vpcs: BTreeSet<&str> = BTreeSet::new();
        for op in ops {
            match op {
                Op::PutPort(p) => {
                    // Its addresses are endpoints of every host holding its VPC.
                    hosts.insert(p.host_id.as_str());
                    vpcs.insert(self.vpc_of(p));
                }
                Op::PutSubnet(s) => {
                    vpcs.insert(s.vpc_id.as_str());
                }
                Op::PutVpc(v) => {
                    vpcs.insert(v.id.as_str());
                }
                Op::PutVpcPeering(x) => {
                    vpcs.extend([x.vpc_a.as_str(), x.vpc_b.as_str()]);
                }
                Op::PutFirewallPolicy(f) => {
                    vpcs.extend(Index::of(&ix.vpcs_by_border, &f.id));
                    for pr in Index::of(&ix.peerings_by_policy, &f.id).filter_map(|id| self.peerings.get(id)) {
                        vpcs.extend([pr.vpc_a.as_str(), pr.vpc_b.as_str()]);
                    }
                }
                _ => {}
            }
        }
        // A VPC is held by the hosts with ports in it or in its peers.
        for v in vpcs {
            hosts.extend(ix.hosts_in(v));
            for peer in self.peers_of(v) {
                hosts.extend(ix.hosts_in(peer));
            }
        }
        let addrs = &ix.vpc_addresses;
        let gateways = |v: &str| -> usize {
            Index::of(&ix.subnets_by_vpc, v)
                .filter_map(|id| self.subnets.get(id))
                .map(|s| usize::from(s.cidr_v4.is_some()) + usize::from(s.cidr_v6.is_some()))
                .sum()
        };
        let count = |m: &BTreeMap<String, usize>, v: &str| m.get(v).copied().unwrap_or(0);
        for host in hosts {
            let here: BTreeSet<&str> = ix.vpcs_on(host).collect();
            let joined: BTreeMap<&str, &VpcPeering> = here
                .iter()
                .flat_map(|v| Index::of(&ix.peerings_by_vpc, v))
                .filter_map(|id| self.peerings.get(id))
                .map(|pr| (pr.id.as_str(), pr))
                .collect();
            let mut seen = here.clone();
            let mut as_peers = 0;
            for pr in joined.values() {
                seen.insert(&pr.vpc_a);
                seen.insert(&pr.vpc_b);
                as_peers += count(addrs, &pr.vpc_a) + count(addrs, &pr.vpc_b);
            }
            let endpoints = as_peers + seen.iter().map(|v| gateways(v) + count(addrs, v)).sum::<usize>();
            let zoned: usize = seen
                .iter()
                .filter(|v| self.vpcs.get(**v).is_some_and(|x| !x.zone_id.is_empty()))
                .map(|v| count(addrs, v))
                .sum();
            let overlay = if endpoints > ENDPOINTS_MAX as usize {
                Some(format!(
                    "host {host} would hold {endpoints} overlay endpoints (its VPCs' and their peers' addresses \
                     and gateways); its dataplane holds at most {ENDPOINTS_MAX}"
                ))
            } else if zoned > ZONE_ENDPOINTS_MAX as usize {
                Some(format!(
                    "host {host} would hold {zoned} addresses of VPCs with a zone; its dataplane holds at most \
                     {ZONE_ENDPOINTS_MAX}"
                ))
            } else {
                None
            };
            let policies: BTreeSet<&str> = seen
                .iter()
                .filter_map(|v| self.vpcs.get(*v))
                .map(|v| v.border_policy_id.as_str())
                .chain(joined.values().map(|pr| pr.policy_id.as_str()))
                .filter(|id| self.firewall_policies.contains_key(*id))
                .collect();
            let rules: usize = policies.iter().map(|id| self.firewall_policies[*id].rules.len()).sum();
            let firewall = if policies.len() > FW_POLICIES_MAX as usize {
                Some(format!(
                    "host {host} would hold {} firewall policies (its VPCs' border firewalls and their \
                     peerings'); its dataplane holds at most {FW_POLICIES_MAX}",
                    policies.len()
                ))
            } else if rules > FW_RULES_MAX as usize {
                Some(format!(
                    "host {host} would hold {rules} firewall rules; its dataplane holds at most {FW_RULES_MAX}"
                ))
            } else if rules + policies.len() > FW_NAMES_MAX as usize {
                Some(format!(
                    "host {host} would hold {rules} firewall rules and {} policy defaults, each with a name; its \
                     dataplane holds at most {FW_NAMES_MAX} names",
                    policies.len()
                ))
            } else {
                None
            };
            for (message, of_firewall) in [(overlay, false), (firewall, true)] {
                let Some(message) = message else { continue };
                let culprit = ops.iter().enumerate().rev().find_map(|(index, op)| {
                    let field = match op {
                        Op::PutPort(p) if seen.contains(self.vpc_of(p)) => "subnet_id",
                        Op::PutSubnet(s) if !of_firewall && seen.contains(s.vpc_id.as_str()) => "vpc_id",
                        Op::PutVpcPeering(x) if seen.contains(x.vpc_a.as_str()) || seen.contains(x.vpc_b.as_str()) => {
                            if of_firewall {
                                "policy_id"
                            } else {
                                "vpc_b"
                            }
                        }
                        Op::PutVpc(v) if of_firewall && seen.contains(v.id.as_str()) => "border_policy_id",
                        Op::PutFirewallPolicy(f) if of_firewall && policies.contains(f.id.as_str()) => "rules",
                        _ => return None,
                    };
                    Some((index, op.field(), field))
                });
                if let Some((index, op, field)) = culprit {
                    return Err(Ctx { index, op }.err(field, message));
                }
            }
        }
        Ok(())
    }

    fn put_group(&mut self, c: &Ctx, g: &SecurityGroup) -> Result<(), BatchError> {
        check_id(&g.id).map_err(|m| c.err("id", m))?;
        self.need_tenant(c, "tenant_id", &g.tenant_id)?;
        if let Some(old) = self.security_groups.get(&g.id) {
            if old.tenant_id != g.tenant_id {
                return Err(c.err(
                    "tenant_id",
                    format!(
                        "security group {} belongs to tenant {}; a group cannot change tenant",
                        g.id, old.tenant_id
                    ),
                ));
            }
        }
        if g.rules.len() > GROUP_RULES_MAX {
            return Err(c.err(
                "rules",
                format!(
                    "{} rules; a security group holds at most {GROUP_RULES_MAX}",
                    g.rules.len()
                ),
            ));
        }
        let mut ids = BTreeSet::new();
        for (i, r) in g.rules.iter().enumerate() {
            let f = |name: &str| format!("rules[{i}].{name}");
            check_id(&r.id).map_err(|m| c.err(&f("id"), m))?;
            if !ids.insert(&r.id) {
                return Err(c.err(&f("id"), format!("rule id {} used twice", r.id)));
            }
            match (r.protocol, r.ether_type) {
                (Protocol::Icmp, EtherType::IPv6) => {
                    return Err(c.err(&f("protocol"), "icmp is for IPv4 rules; use icmpv6"))
                }
                (Protocol::Icmpv6, EtherType::IPv4) => {
                    return Err(c.err(&f("protocol"), "icmpv6 is for IPv6 rules; use icmp"))
                }
                _ => {}
            }
            if let Some((lo, hi)) = r.ports {
                if lo > hi {
                    return Err(c.err(&f("port_min"), format!("port_min {lo} is above port_max {hi}")));
                }
                match r.protocol {
                    Protocol::Any => {
                        return Err(c.err(&f("port_min"), "a port range needs protocol tcp, udp, icmp or icmpv6"))
                    }
                    Protocol::Icmp | Protocol::Icmpv6 if hi > 255 => {
                        return Err(c.err(&f("port_max"), format!("ICMP type {hi} is above 255")))
                    }
                    _ => {}
                }
            }
            match &r.remote {
                Remote::Any => {}
                Remote::Cidr(n) => {
                    let fam_ok = matches!(
                        (n, r.ether_type),
                        (IpNetwork::V4(_), EtherType::IPv4) | (IpNetwork::V6(_), EtherType::IPv6)
                    );
                    if !fam_ok {
                        return Err(c.err(
                            &f("remote_cidr"),
                            format!("{n} is not an {:?} prefix, as the rule's ether type asks", r.ether_type),
                        ));
                    }
                    if n.network() != n.ip() {
                        return Err(c.err(&f("remote_cidr"), format!("{n} has host bits set")));
                    }
                }
                Remote::Group(id) => check_id(id).map_err(|m| c.err(&f("remote_group_id"), m))?,
            }
        }
        self.replace(Kind::SecurityGroup, &g.id, Some(Object::SecurityGroup(g.clone())));
        Ok(())
    }

    fn check_remote_groups(&self, c: &Ctx, g: &SecurityGroup) -> Result<(), BatchError> {
        for (i, r) in g.rules.iter().enumerate() {
            if let Remote::Group(id) = &r.remote {
                let field = format!("rules[{i}].remote_group_id");
                // One answer whether the group is missing or another
                // tenant's: a tenant learns neither that another's group
                // exists nor whose it is.
                match self.security_groups.get(id) {
                    Some(x) if x.tenant_id == g.tenant_id => {}
                    _ => return Err(c.err(&field, format!("tenant {} has no security group {id:?}", g.tenant_id))),
                }
            }
        }
        Ok(())
    }

    fn delete(&mut self, c: &Ctx, kind: Kind, id: &str) -> Result<(), BatchError> {
        let in_use = |what: String| Err(c.err("id", format!("{} {id} is still used by {what}", kind.name())));
        if let Some(m) = self.mirror_using(kind, id) {
            return in_use(format!("mirror session {}", m.id));
        }
        if let Some(m) = self.system_using(kind, id) {
            return in_use(format!("information system {}", m.id));
        }
        if let Some(what) = self.lb_using(kind, id) {
            return in_use(what);
        }
        if let Some(what) = self.vip_using(kind, id) {
            return in_use(what);
        }
        if let Some(what) = self.http_using(kind, id) {
            return in_use(what);
        }
        match kind {
            Kind::LoadBalancer
            | Kind::Pool
            | Kind::Listener
            | Kind::Member
            | Kind::VirtualIp
            | Kind::Certificate
            | Kind::HttpListener => {
                if self.replace(kind, id, None).is_none() {
                    return Err(c.err("id", format!("unknown {} {id:?}", kind.name().replace('_', " "))));
                }
            }
            Kind::InformationSystem => {
                if self.replace(Kind::InformationSystem, id, None).is_none() {
                    return Err(c.err("id", format!("unknown information system {id:?}")));
                }
            }
            Kind::MirrorSession => {
                if self.replace(Kind::MirrorSession, id, None).is_none() {
                    return Err(c.err("id", format!("unknown mirror session {id:?}")));
                }
            }
            Kind::Tenant => {
                if !self.tenants.contains_key(id) {
                    return Err(c.err("id", format!("unknown tenant {id:?}")));
                }
                if let Some(v) = Index::of(&self.index.vpcs_by_tenant, id).next() {
                    return in_use(format!("vpc {v}"));
                }
                if let Some(g) = Index::of(&self.index.groups_by_tenant, id).next() {
                    return in_use(format!("security group {g}"));
                }
                self.replace(Kind::Tenant, id, None);
            }
            Kind::Vpc => {
                if !self.vpcs.contains_key(id) {
                    return Err(c.err("id", format!("unknown vpc {id:?}")));
                }
                if let Some(s) = Index::of(&self.index.subnets_by_vpc, id).next() {
                    return in_use(format!("subnet {s}"));
                }
                if let Some(p) = Index::of(&self.index.peerings_by_vpc, id).next() {
                    return in_use(format!("vpc peering {p}"));
                }
                if let Some(q) = self
                    .quarantines
                    .values()
                    .find(|q| q.target == QuarantineTarget::Vpc && q.target_id == id)
                {
                    return in_use(format!("quarantine {} (lift it first)", q.id));
                }
                self.replace(Kind::Vpc, id, None);
            }
            Kind::Subnet => {
                if !self.subnets.contains_key(id) {
                    return Err(c.err("id", format!("unknown subnet {id:?}")));
                }
                if let Some(p) = Index::of(&self.index.ports_by_subnet, id).next() {
                    return in_use(format!("port {p}"));
                }
                self.replace(Kind::Subnet, id, None);
            }
            Kind::Host => {
                if !self.hosts.contains_key(id) {
                    return Err(c.err("id", format!("unknown host {id:?}")));
                }
                if let Some(p) = Index::of(&self.index.ports_by_host, id).next() {
                    return in_use(format!("port {p}"));
                }
                self.replace(Kind::Host, id, None);
            }
            Kind::Port => {
                // Not while a quarantine holds it: a port deleted and put
                // again elsewhere in one batch would leave it.
                let vm = self.ports.get(id).map(|p| p.vm_id.as_str()).unwrap_or("");
                let vpc = self.ports.get(id).map(|p| self.vpc_of(p)).unwrap_or("");
                if let Some(q) = self.quarantines.values().find(|q| match q.target {
                    QuarantineTarget::Port => q.target_id == id,
                    QuarantineTarget::Vm => !vm.is_empty() && q.target_id == vm,
                    QuarantineTarget::Vpc => !vpc.is_empty() && q.target_id == vpc,
                }) {
                    return in_use(format!("quarantine {} (lift it first)", q.id));
                }
                if self.replace(Kind::Port, id, None).is_none() {
                    return Err(c.err("id", format!("unknown port {id:?}")));
                }
            }
            Kind::Zone => {
                if !self.zones.contains_key(id) {
                    return Err(c.err("id", format!("unknown zone {id:?}")));
                }
                if let Some(v) = Index::of(&self.index.vpcs_by_zone, id).next() {
                    return in_use(format!("vpc {v}"));
                }
                if let Some(x) = self
                    .exchange_paths
                    .values()
                    .find(|x| x.from_zone == id || x.to_zone == id)
                {
                    return in_use(format!("exchange path {}", x.id));
                }
                self.replace(Kind::Zone, id, None);
            }
            Kind::VpcPeering => {
                if self.replace(Kind::VpcPeering, id, None).is_none() {
                    return Err(c.err("id", format!("unknown vpc peering {id:?}")));
                }
            }
            Kind::FirewallPolicy => {
                if !self.firewall_policies.contains_key(id) {
                    return Err(c.err("id", format!("unknown firewall policy {id:?}")));
                }
                if let Some(p) = Index::of(&self.index.peerings_by_policy, id).next() {
                    return in_use(format!("vpc peering {p}"));
                }
                if let Some(v) = Index::of(&self.index.vpcs_by_border, id).next() {
                    return in_use(format!("vpc {v} (its border firewall)"));
                }
                self.replace(Kind::FirewallPolicy, id, None);
            }
            Kind::ExchangePath => {
                if self.replace(Kind::ExchangePath, id, None).is_none() {
                    return Err(c.err("id", format!("unknown exchange path {id:?}")));
                }
            }
            Kind::Quarantine => {
                if self.replace(Kind::Quarantine, id, None).is_none() {
                    return Err(c.err("id", format!("unknown quarantine {id:?}")));
                }
            }
            Kind::SecurityGroup => {
                if !self.security_groups.contains_key(id) {
                    return Err(c.err("id", format!("unknown security group {id:?}")));
                }
                if let Some(p) = Index::of(&self.index.ports_by_group, id).next() {
                    return in_use(format!("port {p}"));
                }
                if let Some(g) = Index::of(&self.index.referrers, id).find(|g| *g != id) {
                    return in_use(format!("a remote-group rule of security group {g}"));
                }
                self.replace(Kind::SecurityGroup, id, None);
            }
        }
        Ok(())
    }

    /// Ids of the ports a quarantine covers.
    pub fn quarantined_ports(&self, q: &Quarantine) -> Vec<&Port> {
        match q.target {
            QuarantineTarget::Port => self.ports.get(&q.target_id).into_iter().collect(),
            QuarantineTarget::Vpc => Index::of(&self.index.ports_by_vpc, &q.target_id)
                .map(|id| &self.ports[id])
                .collect(),
            QuarantineTarget::Vm => Index::of(&self.index.ports_by_vm, &q.target_id)
                .map(|id| &self.ports[id])
                .collect(),
        }
    }

    /// Addresses of every port in a security group.
    pub fn group_members(&self, group: &str) -> Vec<IpAddr> {
        let mut v: Vec<IpAddr> = Index::of(&self.index.ports_by_group, group)
            .flat_map(|id| self.ports[id].addresses())
            .collect();
        v.sort();
        v
    }
}

macro_rules! state_access {
    ($(($kind:ident, $ty:ident, $name:literal, $map:ident, $put:ident, $($rest:tt)*)),* $(,)?) => {
        impl State {
            /// Every object, in the order of the kinds' table (subnets
            /// before ports).
            pub fn objects(&self) -> impl Iterator<Item = Object> + '_ {
                std::iter::empty()
                    $(.chain(self.$map.values().cloned().map(Object::$kind)))*
            }

            /// A copy of one object.
            pub fn get(&self, kind: Kind, id: &str) -> Option<Object> {
                match kind {
                    $(Kind::$kind => self.$map.get(id).cloned().map(Object::$kind)),*
                }
            }

            fn take(&mut self, kind: Kind, id: &str) -> Option<Object> {
                match kind {
                    $(Kind::$kind => self.$map.remove(id).map(Object::$kind)),*
                }
            }

            fn put(&mut self, o: Object) {
                match o {
                    $(Object::$kind(x) => {
                        self.$map.insert(x.id.clone(), x);
                    })*
                }
            }
        }
    };
}

crate::for_each_kind!(state_access);

/// Prefixes as text: "10.0.0.0/8, fd00::/8".
fn list(nets: &[IpNetwork]) -> String {
    nets.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(", ")
}

/// The last address of a prefix.
fn last_address(n: IpNetwork) -> IpAddr {
    match n {
        IpNetwork::V4(a) => IpAddr::V4(a.broadcast()),
        IpNetwork::V6(a) => {
            let host = if a.prefix() == 0 {
                u128::MAX
            } else {
                (1u128 << (128 - a.prefix() as u32)) - 1
            };
            IpAddr::V6((u128::from(a.network()) | host).into())
        }
    }
}

/// Checks a Linux interface name: 1-15 bytes, no '/', whitespace, ':'
/// or '%' (which the kernel would expand into a name of its choosing).
pub fn check_device(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 15 {
        return Err(format!("{name:?} is not 1-15 bytes long"));
    }
    if name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c == '%' || c.is_whitespace() || c.is_control())
    {
        return Err(format!("{name:?} is not a valid interface name"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> State {
        let mut s = State::default();
        s.apply_batch(&[
            Op::PutTenant(Tenant {
                id: "t1".into(),
                name: "Dept 1".into(),
            }),
            Op::PutVpc(Vpc {
                id: "v1".into(),
                tenant_id: "t1".into(),
                name: "v".into(),
                vni: 0,
                zone_id: String::new(),
                border_policy_id: String::new(),
            }),
            Op::PutSubnet(Subnet {
                id: "s1".into(),
                vpc_id: "v1".into(),
                cidr_v4: Some("10.0.0.0/24".parse().unwrap()),
                cidr_v6: Some("fd00::/64".parse().unwrap()),
            }),
            Op::PutHost(Host {
                id: "h1".into(),
                underlay_ip: "192.0.2.1".parse().unwrap(),
            }),
        ])
        .unwrap();
        s
    }

    fn port(id: &str, ip: &str) -> Port {
        Port {
            id: id.into(),
            tenant_id: "t1".into(),
            subnet_id: "s1".into(),
            host_id: "h1".into(),
            device: format!("d{id}"),
            mac: format!("02:00:00:00:00:{:02x}", id.len() + ip.len()).parse().unwrap(),
            ipv4: Some(ip.parse().unwrap()),
            ipv6: None,
            security_group_ids: vec![],
            vm_id: String::new(),
        }
    }

    /// A port is in one information system at most: listed by id in one,
    /// it cannot move into a VPC another takes whole, and no system takes
    /// its VPC whole; what the systems measure cannot be deleted.
    #[test]
    fn a_port_is_in_one_system_at_most() {
        let mut s = base();
        s.apply_batch(&[
            Op::PutZone(Zone {
                id: "z".into(),
                name: "z".into(),
                prefixes: vec!["0.0.0.0/0".parse().unwrap()],
                uplink_device: "up".into(),
            }),
            Op::PutVpc(Vpc {
                id: "v2".into(),
                tenant_id: "t1".into(),
                name: "v2".into(),
                vni: 0,
                zone_id: String::new(),
                border_policy_id: String::new(),
            }),
            Op::PutSubnet(Subnet {
                id: "s2".into(),
                vpc_id: "v2".into(),
                cidr_v4: Some("10.1.0.0/24".parse().unwrap()),
                cidr_v6: None,
            }),
            Op::PutPort(port("p1", "10.0.0.5")),
        ])
        .unwrap();
        let sys = |id: &str, vpcs: &[&str], ports: &[&str]| {
            Op::PutInformationSystem(InformationSystem {
                id: id.into(),
                name: id.into(),
                vpc_ids: vpcs.iter().map(|v| v.to_string()).collect(),
                port_ids: ports.iter().map(|v| v.to_string()).collect(),
                bandwidth: vec![SystemBandwidth {
                    zone_id: "z".into(),
                    up_bps: 1,
                    down_bps: 1,
                }],
                alert_percent: 0,
                interval_secs: 0,
            })
        };
        s.apply_batch(&[sys("a", &["v2"], &[]), sys("b", &[], &["p1"])])
            .unwrap();
        let e = s.apply_batch(&[sys("c", &["v1"], &[])]).unwrap_err();
        assert_eq!(e.field, "operations[0].put_information_system.vpc_ids[0]", "{e}");
        let mut moved = port("p1", "10.1.0.5");
        moved.subnet_id = "s2".into();
        let e = s.apply_batch(&[Op::PutPort(moved)]).unwrap_err();
        assert_eq!(e.field, "operations[0].put_port.subnet_id", "{e}");
        assert!(e.message.contains("one system at most"), "{e}");
        for (kind, id) in [(Kind::Port, "p1"), (Kind::Vpc, "v2"), (Kind::Zone, "z")] {
            let e = s.apply_batch(&[Op::Delete { kind, id: id.into() }]).unwrap_err();
            assert!(e.message.contains("information system"), "{e}");
        }
        assert_eq!(s.system_of_port(&s.ports["p1"]).map(|x| x.id.as_str()), Some("b"));
    }

    /// The relations kept current by every change equal those rebuilt from
    /// the objects, through puts that move a port, deletes and refusals.
    #[test]
    fn relations_kept_current_equal_relations_rebuilt() {
        let mut s = base();
        let group = |id: &str, remote: &str| SecurityGroup {
            id: id.into(),
            tenant_id: "t1".into(),
            name: id.into(),
            rules: vec![Rule {
                id: "r".into(),
                direction: Direction::Ingress,
                ether_type: EtherType::IPv4,
                protocol: Protocol::Tcp,
                ports: None,
                remote: Remote::Group(remote.into()),
            }],
        };
        let check = |s: &State| {
            let mut r = s.clone();
            r.reindex();
            assert_eq!(r.index(), s.index());
        };
        s.apply_batch(&[
            Op::PutSecurityGroup(group("g1", "g2")),
            Op::PutSecurityGroup(group("g2", "g1")),
            Op::PutHost(Host {
                id: "h2".into(),
                underlay_ip: "192.0.2.2".parse().unwrap(),
            }),
            Op::PutSubnet(Subnet {
                id: "s2".into(),
                vpc_id: "v1".into(),
                cidr_v4: Some("10.0.1.0/24".parse().unwrap()),
                cidr_v6: None,
            }),
        ])
        .unwrap();
        let port = |id: &str, ip: &str| Port {
            mac: Mac([2, 0, 0, 0, 1, id.as_bytes()[0]]),
            ..port(id, ip)
        };
        let mut a = port("a", "10.0.0.5");
        a.security_group_ids = vec!["g1".into()];
        a.vm_id = "vm-a".into();
        s.apply_batch(&[Op::PutPort(a.clone()), Op::PutPort(port("b", "10.0.0.6"))])
            .unwrap();
        check(&s);
        assert_eq!(s.group_members("g1"), vec!["10.0.0.5".parse::<IpAddr>().unwrap()]);
        // The port moves host, subnet, address and group.
        a.host_id = "h2".into();
        a.subnet_id = "s2".into();
        a.ipv4 = Some("10.0.1.5".parse().unwrap());
        a.security_group_ids = vec!["g2".into()];
        s.apply_batch(&[Op::PutPort(a.clone())]).unwrap();
        check(&s);
        assert!(s.group_members("g1").is_empty());
        assert_eq!(s.index().ports_by_host["h2"].len(), 1);
        // Its old address is free again; its new one is taken.
        s.apply_batch(&[Op::PutPort(port("c", "10.0.0.5"))]).unwrap();
        let mut d = port("d", "10.0.1.5");
        d.subnet_id = "s2".into();
        let before = s.clone();
        let e = s
            .apply_batch(&[
                Op::Delete {
                    kind: Kind::Port,
                    id: "c".into(),
                },
                Op::PutPort(d),
            ])
            .unwrap_err();
        assert_eq!(e.field, "operations[1].put_port.ipv4", "{e}");
        assert_eq!(s, before, "a refused batch leaves objects and relations as they were");
        check(&s);
        s.apply_batch(&[
            Op::Delete {
                kind: Kind::Port,
                id: "a".into(),
            },
            Op::Delete {
                kind: Kind::Port,
                id: "b".into(),
            },
            Op::Delete {
                kind: Kind::Port,
                id: "c".into(),
            },
            Op::Delete {
                kind: Kind::Subnet,
                id: "s2".into(),
            },
        ])
        .unwrap();
        check(&s);
        assert!(s.index().ports_by_host.is_empty() && s.index().addresses.is_empty());
        // Loading a stored state rebuilds them.
        let loaded: State = serde_json::from_slice(&serde_json::to_vec(&s).unwrap()).unwrap();
        assert_eq!(loaded, s);
    }

    #[test]
    fn batch_is_all_or_nothing() {
        let mut s = base();
        let before = s.clone();
        let err = s
            .apply_batch(&[Op::PutPort(port("p1", "10.0.0.5")), Op::PutPort(port("p2", "10.9.0.5"))])
            .unwrap_err();
        assert_eq!(err.index, 1);
        assert_eq!(err.field, "operations[1].put_port.ipv4");
        assert_eq!(s, before, "a refused batch must leave the state as it was");
    }

    #[test]
    fn overlapping_subnets_are_refused() {
        let mut s = base();
        let err = s
            .apply_batch(&[Op::PutSubnet(Subnet {
                id: "s2".into(),
                vpc_id: "v1".into(),
                cidr_v4: Some("10.0.0.128/25".parse().unwrap()),
                cidr_v6: None,
            })])
            .unwrap_err();
        assert_eq!(err.field, "operations[0].put_subnet.cidr_v4");
        assert!(err.message.contains("overlaps"), "{err}");
    }

    #[test]
    fn unknown_references_name_the_field() {
        let mut s = base();
        let mut p = port("p1", "10.0.0.5");
        p.security_group_ids = vec!["nope".into()];
        let err = s.apply_batch(&[Op::PutPort(p)]).unwrap_err();
        assert_eq!(err.field, "operations[0].put_port.security_group_ids[0]");
        let err = s
            .apply_batch(&[Op::Delete {
                kind: Kind::Host,
                id: "zz".into(),
            }])
            .unwrap_err();
        assert!(err.message.contains("unknown host"), "{err}");
    }

    #[test]
    fn rules_are_checked() {
        let mut s = base();
        let rule = |protocol, ports, remote| Rule {
            id: "r".into(),
            direction: Direction::Ingress,
            ether_type: EtherType::IPv4,
            protocol,
            ports,
            remote,
        };
        for (r, field) in [
            (rule(Protocol::Tcp, Some((90, 80)), Remote::Any), "rules[0].port_min"),
            (rule(Protocol::Any, Some((80, 80)), Remote::Any), "rules[0].port_min"),
            (rule(Protocol::Icmpv6, None, Remote::Any), "rules[0].protocol"),
            (
                rule(Protocol::Tcp, None, Remote::Cidr("fd00::/8".parse().unwrap())),
                "rules[0].remote_cidr",
            ),
            (
                rule(Protocol::Tcp, None, Remote::Group("other".into())),
                "rules[0].remote_group_id",
            ),
        ] {
            let g = SecurityGroup {
                id: "g".into(),
                tenant_id: "t1".into(),
                name: "g".into(),
                rules: vec![r],
            };
            let err = s.apply_batch(&[Op::PutSecurityGroup(g)]).unwrap_err();
            assert_eq!(err.field, format!("operations[0].put_security_group.{field}"), "{err}");
        }
    }

    #[test]
    fn groups_in_use_cannot_be_deleted() {
        let mut s = base();
        let g = SecurityGroup {
            id: "g".into(),
            tenant_id: "t1".into(),
            name: "g".into(),
            rules: vec![],
        };
        let mut p = port("p1", "10.0.0.5");
        p.security_group_ids = vec!["g".into()];
        s.apply_batch(&[Op::PutSecurityGroup(g), Op::PutPort(p)]).unwrap();
        assert_eq!(s.group_members("g"), vec!["10.0.0.5".parse::<IpAddr>().unwrap()]);
        let err = s
            .apply_batch(&[Op::Delete {
                kind: Kind::SecurityGroup,
                id: "g".into(),
            }])
            .unwrap_err();
        assert!(err.message.contains("still used by port p1"), "{err}");
    }

    #[test]
    fn duplicate_addresses_in_a_vpc_are_refused() {
        let mut s = base();
        s.apply_batch(&[Op::PutPort(port("p1", "10.0.0.5"))]).unwrap();
        let mut p2 = port("p2", "10.0.0.5");
        p2.mac = "02:00:00:00:01:01".parse().unwrap();
        let err = s.apply_batch(&[Op::PutPort(p2)]).unwrap_err();
        assert_eq!(err.field, "operations[0].put_port.ipv4");
    }

    #[test]
    fn cidrs_and_macs_parse_strictly() {
        assert!(parse_cidr("10.0.0.1/24").unwrap_err().contains("host bits"));
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert!(parse_cidr("10.0.0.0").is_err());
        assert!("01:00:00:00:00:01".parse::<Mac>().unwrap_err().contains("multicast"));
        assert!("02:00:00:00:00".parse::<Mac>().is_err());
        assert!(check_id("a b").is_err());
    }

    #[test]
    fn a_vm_quarantine_covers_every_port_of_the_vm() {
        let mut s = base();
        let mut p1 = port("p1", "10.0.0.5");
        p1.vm_id = "vm-7".into();
        let mut p2 = port("p22", "10.0.0.6");
        p2.vm_id = "vm-7".into();
        let p3 = port("p333", "10.0.0.7");
        s.apply_batch(&[Op::PutPort(p1), Op::PutPort(p2), Op::PutPort(p3)])
            .unwrap();
        let q = Quarantine {
            id: "q".into(),
            target: QuarantineTarget::Vm,
            target_id: "vm-7".into(),
            reason: "malware beacon".into(),
            expires_unix_ms: None,
        };
        s.apply_batch(&[Op::PutQuarantine(q.clone())]).unwrap();
        let ids: Vec<&str> = s.quarantined_ports(&q).iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ids, vec!["p1", "p22"]);
        let err = s
            .apply_batch(&[Op::PutQuarantine(Quarantine {
                target_id: "vm-8".into(),
                ..q
            })])
            .unwrap_err();
        assert_eq!(err.field, "operations[0].put_quarantine.target_id");
        assert!(err.message.contains("unknown vm"), "{err}");
    }

    /// A quarantine cannot be escaped by changing the port it holds: a
    /// port of a quarantined VM neither leaves the VM nor goes away, a port
    /// of a quarantined VPC does not move to another VPC, and another
    /// tenant's port cannot name the VM (it would be held by the
    /// quarantine, or, were the quarantine's ports gone, be its only one).
    #[test]
    fn a_quarantine_cannot_be_escaped_by_changing_its_ports() {
        let mut s = base();
        s.apply_batch(&[
            Op::PutTenant(Tenant {
                id: "t2".into(),
                name: "Dept 2".into(),
            }),
            Op::PutVpc(Vpc {
                id: "v2".into(),
                tenant_id: "t2".into(),
                name: "v".into(),
                vni: 0,
                zone_id: String::new(),
                border_policy_id: String::new(),
            }),
            Op::PutSubnet(Subnet {
                id: "s2".into(),
                vpc_id: "v2".into(),
                cidr_v4: Some("10.0.0.0/24".parse().unwrap()),
                cidr_v6: None,
            }),
            Op::PutVpc(Vpc {
                id: "v3".into(),
                tenant_id: "t1".into(),
                name: "v".into(),
                vni: 0,
                zone_id: String::new(),
                border_policy_id: String::new(),
            }),
            Op::PutSubnet(Subnet {
                id: "s3".into(),
                vpc_id: "v3".into(),
                cidr_v4: Some("10.3.0.0/24".parse().unwrap()),
                cidr_v6: None,
            }),
            Op::PutHost(Host {
                id: "h2".into(),
                underlay_ip: "192.0.2.2".parse().unwrap(),
            }),
        ])
        .unwrap();
        let mut p1 = port("p1", "10.0.0.5");
        p1.vm_id = "vm-7".into();
        let mut p2 = port("p22", "10.0.0.6");
        p2.vm_id = "vm-7".into();
        let p3 = port("p333", "10.0.0.7");
        s.apply_batch(&[Op::PutPort(p1.clone()), Op::PutPort(p2), Op::PutPort(p3.clone())])
            .unwrap();
        s.apply_batch(&[Op::PutQuarantine(Quarantine {
            id: "q".into(),
            target: QuarantineTarget::Vm,
            target_id: "vm-7".into(),
            reason: "malware beacon".into(),
            expires_unix_ms: None,
        })])
        .unwrap();
        let before = s.clone();
        // Leaving the VM.
        let e = s
            .apply_batch(&[Op::PutPort(Port {
                vm_id: String::new(),
                ..p1.clone()
            })])
            .unwrap_err();
        assert_eq!(e.field, "operations[0].put_port.vm_id");
        assert!(e.message.contains("quarantine q"), "{e}");
        // Going away.
        let e = s
            .apply_batch(&[Op::Delete {
                kind: Kind::Port,
                id: "p22".into(),
            }])
            .unwrap_err();
        assert!(e.message.contains("quarantine q"), "{e}");
        // Another tenant's port naming the VM.
        let e = s
            .apply_batch(&[Op::PutPort(Port {
                id: "x".into(),
                tenant_id: "t2".into(),
                subnet_id: "s2".into(),
                device: "dx".into(),
                ..p1.clone()
            })])
            .unwrap_err();
        assert_eq!(e.field, "operations[0].put_port.vm_id");
        assert!(e.message.contains("of tenant t1, not t2"), "{e}");
        assert_eq!(s, before, "nothing of a refused batch");
        // Moving to another host keeps it in the VM: allowed, still held.
        s.apply_batch(&[Op::PutPort(Port {
            host_id: "h2".into(),
            ..p1.clone()
        })])
        .unwrap();
        let q = s.quarantines["q"].clone();
        assert_eq!(s.quarantined_ports(&q).len(), 2);
        // A VPC quarantine holds its ports in the VPC.
        s.apply_batch(&[Op::PutQuarantine(Quarantine {
            id: "qv".into(),
            target: QuarantineTarget::Vpc,
            target_id: "v1".into(),
            reason: "lateral movement".into(),
            expires_unix_ms: None,
        })])
        .unwrap();
        let e = s
            .apply_batch(&[Op::PutPort(Port {
                subnet_id: "s3".into(),
                ipv4: Some("10.3.0.7".parse().unwrap()),
                ..p3.clone()
            })])
            .unwrap_err();
        assert_eq!(e.field, "operations[0].put_port.subnet_id");
        assert!(e.message.contains("quarantine qv"), "{e}");
        // Nor by deleting it and putting it again in another VPC, in one batch.
        let e = s
            .apply_batch(&[
                Op::Delete {
                    kind: Kind::Port,
                    id: "p333".into(),
                },
                Op::PutPort(Port {
                    subnet_id: "s3".into(),
                    ipv4: Some("10.3.0.7".parse().unwrap()),
                    ..p3.clone()
                }),
            ])
            .unwrap_err();
        assert!(e.message.contains("quarantine qv"), "{e}");
        // Once lifted, the port may leave.
        s.apply_batch(&[
            Op::Delete {
                kind: Kind::Quarantine,
                id: "q".into(),
            },
            Op::PutPort(Port {
                vm_id: String::new(),
                ..p1
            }),
        ])
        .unwrap();
    }

    #[test]
    fn vnis_are_picked_unique_and_never_change() {
        let mut s = base();
        assert_eq!(s.vpcs["v1"].vni, VNI_AUTO_FIRST);
        let v = |id: &str, vni: u32| {
            Op::PutVpc(Vpc {
                id: id.into(),
                tenant_id: "t1".into(),
                name: id.into(),
                vni,
                zone_id: String::new(),
                border_policy_id: String::new(),
            })
        };
        s.apply_batch(&[v("v2", 0), v("v3", 77)]).unwrap();
        assert_eq!(s.vpcs["v2"].vni, VNI_AUTO_FIRST + 1);
        assert_eq!(s.vpcs["v3"].vni, 77);
        // A replace without a VNI keeps it; another VNI is refused.
        s.apply_batch(&[v("v3", 0)]).unwrap();
        assert_eq!(s.vpcs["v3"].vni, 77);
        let e = s.apply_batch(&[v("v3", 78)]).unwrap_err();
        assert_eq!(e.field, "operations[0].put_vpc.vni");
        let e = s.apply_batch(&[v("v4", 77)]).unwrap_err();
        assert!(e.message.contains("already used by vpc v3"), "{e}");
        let e = s.apply_batch(&[v("v4", 1 << 24)]).unwrap_err();
        assert!(e.message.contains("above the largest VNI"), "{e}");
        // The gateway is no port address.
        let e = s.apply_batch(&[Op::PutPort(port("p1", "10.0.0.1"))]).unwrap_err();
        assert!(e.message.contains("gateway of subnet s1"), "{e}");
    }

    fn zones() -> State {
        let mut s = base();
        let z = |id: &str, prefixes: &[&str], dev: &str| {
            Op::PutZone(Zone {
                id: id.into(),
                name: id.into(),
                prefixes: prefixes.iter().map(|p| p.parse().unwrap()).collect(),
                uplink_device: dev.into(),
            })
        };
        s.apply_batch(&[
            z("ext", &["10.0.0.0/8", "fd00::/8"], "up-ext"),
            z("net", &["0.0.0.0/0", "::/0"], "up-net"),
        ])
        .unwrap();
        s
    }

    fn zoned_vpc(id: &str, zone: &str) -> Op {
        Op::PutVpc(Vpc {
            id: id.into(),
            tenant_id: "t1".into(),
            name: id.into(),
            vni: 0,
            zone_id: zone.into(),
            border_policy_id: String::new(),
        })
    }

    fn path(from: &str, to: &str, dst: &str, protocol: Protocol, ports: (u16, u16)) -> Op {
        Op::PutExchangePath(ExchangePath {
            id: "x".into(),
            from_zone: from.into(),
            to_zone: to.into(),
            source: "198.51.100.0/24".parse().unwrap(),
            destination: dst.parse().unwrap(),
            protocol,
            ports,
            broad: false,
            broad_reason: String::new(),
        })
    }

    #[test]
    fn zones_refuse_what_would_open_another_path() {
        let mut s = zones();
        assert_eq!(s.zone_of("10.1.2.3".parse().unwrap()).unwrap().id, "ext");
        assert_eq!(s.zone_of("8.8.8.8".parse().unwrap()).unwrap().id, "net");
        // The existing VPC v1 (10.0.0.0/24) joins the extranet: inside its prefixes.
        s.apply_batch(&[zoned_vpc("v1", "ext")]).unwrap();
        // A VPC of the internet zone with extranet addresses would be
        // counted in the extranet by the dataplane: refused.
        let e = s
            .apply_batch(&[
                zoned_vpc("v9", "net"),
                Op::PutSubnet(Subnet {
                    id: "s9".into(),
                    vpc_id: "v9".into(),
                    cidr_v4: Some("10.9.0.0/24".parse().unwrap()),
                    cidr_v6: None,
                }),
            ])
            .unwrap_err();
        assert_eq!(e.field, "operations[1].put_subnet.cidr_v4");
        assert!(e.message.contains("holds addresses of zone ext"), "{e}");
        // Two VPCs with uplinks may not share addresses.
        let e = s
            .apply_batch(&[
                zoned_vpc("v8", "ext"),
                Op::PutSubnet(Subnet {
                    id: "s8".into(),
                    vpc_id: "v8".into(),
                    cidr_v4: Some("10.0.0.0/25".parse().unwrap()),
                    cidr_v6: None,
                }),
            ])
            .unwrap_err();
        assert!(e.message.contains("overlaps subnet s1 of vpc v1"), "{e}");
        // A zone may not shrink so that a VPC falls out of it.
        let e = s
            .apply_batch(&[Op::PutZone(Zone {
                id: "ext".into(),
                name: "ext".into(),
                prefixes: vec!["172.16.0.0/12".parse().unwrap()],
                uplink_device: "up-ext".into(),
            })])
            .unwrap_err();
        assert_eq!(e.field, "operations[0].put_zone.prefixes");
        assert_eq!(s.zones["ext"].prefixes.len(), 2, "the zone is unchanged");
        // Nor can a VPC with ports change zone.
        s.apply_batch(&[Op::PutPort(port("p1", "10.0.0.5"))]).unwrap();
        let e = s.apply_batch(&[zoned_vpc("v1", "net")]).unwrap_err();
        assert!(e.message.contains("cannot move from zone"), "{e}");
        // Exchange paths: two zones, a named destination, a protocol, ports.
        let bad = [
            (path("ext", "ext", "10.0.0.5/32", Protocol::Tcp, (443, 443)), "to_zone"),
            (
                path("net", "ext", "0.0.0.0/0", Protocol::Tcp, (443, 443)),
                "destination_cidr",
            ),
            (path("net", "ext", "10.0.0.5/32", Protocol::Any, (0, 0)), "protocol"),
            (path("net", "ext", "10.0.0.5/32", Protocol::Tcp, (0, 65535)), "port_min"),
            (path("net", "dmz", "10.0.0.5/32", Protocol::Tcp, (443, 443)), "to_zone"),
            (
                path("net", "ext", "fd00::5/128", Protocol::Tcp, (443, 443)),
                "destination_cidr",
            ),
        ];
        for (op, field) in bad {
            let e = s.apply_batch(&[op]).unwrap_err();
            assert_eq!(e.field, format!("operations[0].put_exchange_path.{field}"), "{e}");
        }
        s.apply_batch(&[path("net", "ext", "10.0.0.5/32", Protocol::Tcp, (443, 443))])
            .unwrap();
        // A zone in use cannot go.
        let e = s
            .apply_batch(&[Op::Delete {
                kind: Kind::Zone,
                id: "net".into(),
            }])
            .unwrap_err();
        assert!(e.message.contains("still used by exchange path x"), "{e}");
    }

    #[test]
    fn peerings_refuse_overlaps_zone_crossings_and_duplicates() {
        let mut s = zones();
        let sub = |id: &str, vpc: &str, v4: &str| {
            Op::PutSubnet(Subnet {
                id: id.into(),
                vpc_id: vpc.into(),
                cidr_v4: Some(v4.parse().unwrap()),
                cidr_v6: None,
            })
        };
        let peer = |id: &str, a: &str, b: &str| {
            Op::PutVpcPeering(VpcPeering {
                id: id.into(),
                vpc_a: a.into(),
                vpc_b: b.into(),
                policy_id: String::new(),
            })
        };
        s.apply_batch(&[
            zoned_vpc("e1", "ext"),
            sub("se1", "e1", "10.1.0.0/24"),
            zoned_vpc("e2", "ext"),
            sub("se2", "e2", "10.2.0.0/24"),
            zoned_vpc("n1", "net"),
            sub("sn1", "n1", "198.51.100.0/24"),
        ])
        .unwrap();
        s.apply_batch(&[peer("p12", "e1", "e2")]).unwrap();
        let e = s.apply_batch(&[peer("px", "e1", "n1")]).unwrap_err();
        assert!(e.message.contains("would join the zones"), "{e}");
        let e = s.apply_batch(&[peer("p21", "e2", "e1")]).unwrap_err();
        assert!(e.message.contains("already peered by p12"), "{e}");
        // v1 (10.0.0.0/24, no zone) overlaps nothing of e1, but an isolated
        // VPC cannot peer a zoned one either.
        let e = s.apply_batch(&[peer("pv", "v1", "e1")]).unwrap_err();
        assert!(e.message.contains("would join the zones"), "{e}");
        // A new subnet overlapping a peer's is refused.
        let e = s.apply_batch(&[sub("se3", "e2", "10.1.0.128/25")]).unwrap_err();
        assert_eq!(e.field, "operations[0].put_subnet.cidr_v4");
        assert!(e.message.contains("overlaps"), "{e}");
        assert!(!s.subnets.contains_key("se3"), "nothing half-applied");
        // A peered VPC cannot go while peered.
        let e = s
            .apply_batch(&[Op::Delete {
                kind: Kind::Vpc,
                id: "e1".into(),
            }])
            .unwrap_err();
        assert!(
            e.message.contains("subnet se1") || e.message.contains("peering p12"),
            "{e}"
        );
    }
}
