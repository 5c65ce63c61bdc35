//! Every host's share, kept current change by change.
//!
//! An applied batch names the objects it changed and what they were
//! before. From those alone [`Shares::update`] finds the resources whose
//! content may have changed and the hosts whose set of resources may have
//! changed, rebuilds only those, and tells each host's watch streams which
//! names changed at which revision. A write costs what it touches: a port
//! on one host costs that host, its VPC's overlay, and the hosts holding
//! that VPC; a group with no port costs nothing beyond itself.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::Bound;
use std::sync::Arc;

use sdn_policies::{Index, Kind, Object, Remote, State};
use sdn_proto::v1 as pb;
use tokio::sync::watch;

use crate::slice::{build, names, shared_content};

/// Changes kept per host for streams that are behind; a stream further
/// behind compares the whole share instead.
const LOG_KEEP: usize = 64;

/// A resource's name, shared by every map that holds it: a name held by a
/// thousand hosts is kept once.
pub type Name = Arc<str>;

/// One host's share.
pub struct HostShare {
    pub resources: BTreeMap<Name, Arc<pb::Resource>>,
    /// The revision of the last change to this share.
    pub changed: u64,
    /// Recent changes: the revision and the names it changed.
    log: VecDeque<(u64, Vec<Name>)>,
    /// Changes up to this revision are no longer in the log.
    lost: u64,
    /// Wakes the host's watch streams with the revision of a change.
    notify: watch::Sender<u64>,
}

impl HostShare {
    fn new(revision: u64) -> HostShare {
        HostShare {
            resources: BTreeMap::new(),
            changed: revision,
            log: VecDeque::new(),
            lost: revision,
            notify: watch::channel(revision).0,
        }
    }

    /// The names changed after revision `after`; `None` when the log no
    /// longer reaches back that far.
    pub fn changed_since(&self, after: u64) -> Option<BTreeSet<Name>> {
        if self.changed <= after {
            return Some(BTreeSet::new());
        }
        if after < self.lost {
            return None;
        }
        Some(
            self.log
                .iter()
                .filter(|(r, _)| *r > after)
                .flat_map(|(_, n)| n.iter().cloned())
                .collect(),
        )
    }
}

/// The shares of every host.
#[derive(Default)]
pub struct Shares {
    hosts: BTreeMap<String, HostShare>,
    /// Resources whose content is the same for every host, built once.
    cache: BTreeMap<Name, Arc<pb::Resource>>,
    /// The hosts holding each resource, by number.
    holders: BTreeMap<Name, BTreeSet<u32>>,
    /// Each host's number, and the name of each number.
    host_ids: BTreeMap<String, u32>,
    host_names: Vec<String>,
    /// Numbers of deleted hosts, given again.
    free_ids: Vec<u32>,
}

impl Shares {
    /// Every host's share built from scratch (at start, and when a
    /// snapshot replaces the state). Streams already open stay subscribed
    /// and are told to compare their whole share.
    pub fn rebuild(&mut self, state: &State, revision: u64) {
        let mut old = std::mem::take(&mut self.hosts);
        self.cache.clear();
        self.holders.clear();
        self.host_ids.clear();
        self.host_names.clear();
        self.free_ids.clear();
        for host in state.hosts.keys() {
            let mut share = HostShare::new(revision);
            if let Some(o) = old.remove(host) {
                share.notify = o.notify;
            }
            self.hosts.insert(host.clone(), share);
            self.refresh_host(state, host, &BTreeSet::new(), false);
        }
        for share in self.hosts.values_mut() {
            share.changed = revision;
            share.log.clear();
            share.lost = revision;
            share.notify.send_replace(revision);
        }
        // Dropping the senders of deleted hosts ends their streams.
    }

    pub fn host(&self, host: &str) -> Option<&HostShare> {
        self.hosts.get(host)
    }

    /// A receiver woken at each change of the host's share.
    pub fn subscribe(&self, host: &str) -> Option<watch::Receiver<u64>> {
        self.hosts.get(host).map(|s| s.notify.subscribe())
    }

    fn resource(&mut self, state: &State, host: &str, name: &str) -> Option<Arc<pb::Resource>> {
        if !shared_content(name) {
            return build(state, host, name).map(Arc::new);
        }
        if let Some(r) = self.cache.get(name) {
            return Some(r.clone());
        }
        let r = Arc::new(build(state, host, name)?);
        let name = self.intern(name);
        self.cache.insert(name, r.clone());
        Some(r)
    }

    /// The one copy of a name, made when no map holds it yet.
    fn intern(&self, name: &str) -> Name {
        self.holders
            .get_key_value(name)
            .map(|(k, _)| k.clone())
            .or_else(|| self.cache.get_key_value(name).map(|(k, _)| k.clone()))
            .unwrap_or_else(|| Arc::from(name))
    }

    /// A host's number, given at its first share.
    fn host_id(&mut self, host: &str) -> u32 {
        if let Some(i) = self.host_ids.get(host) {
            return *i;
        }
        let i = match self.free_ids.pop() {
            Some(i) => {
                self.host_names[i as usize] = host.to_string();
                i
            }
            None => {
                self.host_names.push(host.to_string());
                self.host_names.len() as u32 - 1
            }
        };
        self.host_ids.insert(host.to_string(), i);
        i
    }

    /// `host` holds resource `name` now.
    fn hold(&mut self, name: Name, host: &str) {
        let id = self.host_id(host);
        self.holders.entry(name).or_default().insert(id);
    }

    /// Recomputes a host's set of names; returns the names that changed.
    /// A name the host already held is built again only if it is in
    /// `dirty`: the wanted names and the held ones are walked side by side,
    /// both in order, so a refresh costs the host's names, not a lookup of
    /// each in the cache.
    /// `only_quarantines`: the batch changed quarantines alone, so only
    /// the host's quarantine names can change, and only those are walked.
    fn refresh_host(
        &mut self,
        state: &State,
        host: &str,
        dirty: &BTreeSet<String>,
        only_quarantines: bool,
    ) -> Vec<Name> {
        let (wanted, range) = if only_quarantines {
            (
                crate::slice::quarantine_names(state, host),
                (
                    Bound::Included(crate::slice::QUARANTINE),
                    Bound::Excluded(crate::slice::PAST_QUARANTINES),
                ),
            )
        } else {
            (names(state, host), (Bound::Unbounded, Bound::Unbounded))
        };
        let Some(share) = self.hosts.get(host) else {
            return Vec::new();
        };
        let mut joined: Vec<&String> = Vec::new();
        let mut again: Vec<Name> = Vec::new();
        let mut left: Vec<Name> = Vec::new();
        let mut held = share.resources.range::<str, _>(range).map(|(k, _)| k).peekable();
        for n in &wanted {
            while let Some(h) = held.next_if(|h| h.as_ref() < n.as_str()) {
                left.push(h.clone());
            }
            if let Some(h) = held.next_if(|h| h.as_ref() == n.as_str()) {
                // A resource built for this host (a quarantine lists the
                // host's own ports) may change with the host's ports alone.
                if dirty.contains(n) || !shared_content(n) {
                    again.push(h.clone());
                }
            } else {
                joined.push(n);
            }
        }
        left.extend(held.cloned());
        let mut changed = Vec::new();
        let mut updates: Vec<(Name, Option<Arc<pb::Resource>>)> = Vec::new();
        for n in again {
            let r = self.resource(state, host, &n);
            let same = match (&r, self.hosts[host].resources.get(&n)) {
                (Some(r), Some(old)) => r.version == old.version,
                _ => false,
            };
            if !same {
                changed.push(n.clone());
                updates.push((n.clone(), r));
            }
        }
        let mut added = Vec::new();
        for n in joined {
            if let Some(r) = self.resource(state, host, n) {
                let n = self.intern(n);
                changed.push(n.clone());
                added.push(n.clone());
                updates.push((n, Some(r)));
            }
        }
        let share = self.hosts.get_mut(host).expect("share checked above");
        for (n, r) in updates {
            match r {
                Some(r) => {
                    share.resources.insert(n, r);
                }
                None => {
                    share.resources.remove(&n);
                    left.push(n);
                }
            }
        }
        for n in &left {
            share.resources.remove(n);
        }
        for n in &left {
            self.release(n, host);
        }
        for n in added {
            self.hold(n, host);
        }
        changed.extend(left);
        changed.sort();
        changed.dedup();
        changed
    }

    /// `host` no longer holds resource `name`.
    fn release(&mut self, name: &str, host: &str) {
        let Some(id) = self.host_ids.get(host) else {
            return;
        };
        if let Some(h) = self.holders.get_mut(name) {
            h.remove(id);
            if h.is_empty() {
                self.holders.remove(name);
                self.cache.remove(name);
            }
        }
    }

    fn holders_of(&self, name: &str) -> impl Iterator<Item = &String> {
        self.holders
            .get(name)
            .into_iter()
            .flatten()
            .map(|i| &self.host_names[*i as usize])
    }

    /// Brings the shares up to date after a batch that changed the objects
    /// in `before` (each as it was before). Returns the hosts whose share
    /// changed.
    pub fn update(&mut self, state: &State, before: &[(Kind, String, Option<Object>)], revision: u64) -> Vec<String> {
        let ix = state.index();
        let mut dirty: BTreeSet<String> = BTreeSet::new();
        let mut hosts: BTreeSet<String> = BTreeSet::new();
        // Endpoints of changed ports, with the VPC each is in now: their
        // holders become that VPC's.
        let mut moved: Vec<(String, Option<String>)> = Vec::new();
        let all_zones = |dirty: &mut BTreeSet<String>| dirty.extend(state.zones.keys().map(|z| format!("zone/{z}")));
        // The VPC of a port as it was: its subnet may be gone with it.
        let subnet_vpc = |sid: &str| -> Option<String> {
            state.subnets.get(sid).map(|s| s.vpc_id.clone()).or_else(|| {
                before.iter().find_map(|(_, id, o)| match o {
                    Some(Object::Subnet(s)) if id == sid => Some(s.vpc_id.clone()),
                    _ => None,
                })
            })
        };
        // The proxy resources of a load balancer's HTTP listeners, with the
        // hosts of their ports (as the listeners are now; a listener's own
        // change adds the ports it had).
        let proxies_of_lb = |lb: &str, dirty: &mut BTreeSet<String>, hosts: &mut BTreeSet<String>| {
            for l in state.http_listeners.values().filter(|l| l.load_balancer_id == lb) {
                for p in &l.proxy_ports {
                    dirty.insert(format!("proxy/{p}"));
                    hosts.extend(state.ports.get(p).map(|x| x.host_id.clone()));
                }
            }
        };
        for (kind, id, old) in before {
            let new = state.get(*kind, id);
            let both = || old.iter().chain(new.iter());
            match kind {
                Kind::Port => {
                    let vpc_of = |o: &Option<Object>| match o {
                        Some(Object::Port(p)) => subnet_vpc(&p.subnet_id),
                        _ => None,
                    };
                    for o in both() {
                        let Object::Port(p) = o else { continue };
                        dirty.insert(format!("port/{}", p.id));
                        dirty.extend(p.security_group_ids.iter().map(|g| format!("members/{g}")));
                        hosts.insert(p.host_id.clone());
                    }
                    // Its endpoint: held by the hosts holding its VPC now
                    // (its VPC may change under it, with its subnet deleted
                    // and put again in the same batch).
                    let name = format!("endpoint/{id}");
                    moved.push((name.clone(), vpc_of(&new)));
                    dirty.insert(name);
                    dirty.extend(mirrors_with_tap(state, |p| p.id == *id));
                    // The load balancers it is a member of: its addresses
                    // are their backends'.
                    let target = sdn_policies::MemberTarget::Port(id.clone());
                    for m in state.members.values().filter(|m| m.target == target) {
                        if let Some(l) = state.lb_of(Kind::Member, &m.id) {
                            let name = format!("lb/{}", l.id);
                            hosts.extend(self.holders_of(&name).cloned());
                            dirty.insert(name);
                            proxies_of_lb(&l.id, &mut dirty, &mut hosts);
                        }
                    }
                    // The load balancers it runs the proxy of: its
                    // addresses are their HTTP listeners' backends.
                    for l in state.http_listeners.values().filter(|l| l.proxy_ports.contains(id)) {
                        let name = format!("lb/{}", l.load_balancer_id);
                        hosts.extend(self.holders_of(&name).cloned());
                        dirty.insert(name);
                        dirty.insert(format!("proxy/{id}"));
                    }
                }
                Kind::Subnet => {
                    for o in both() {
                        let Object::Subnet(s) = o else { continue };
                        dirty.insert(format!("vpc/{}", s.vpc_id));
                    }
                    // Its proxy ports are told its gateway.
                    for p in state.ports.values().filter(|p| p.subnet_id == *id) {
                        dirty.insert(format!("proxy/{}", p.id));
                    }
                    all_zones(&mut dirty);
                }
                Kind::Vpc => {
                    let name = format!("vpc/{id}");
                    // Its border firewall may have changed: every host
                    // holding it, for its own VPC or a peer.
                    hosts.extend(self.holders_of(&name).cloned());
                    hosts.extend(ix.hosts_in(id).map(str::to_string));
                    dirty.insert(name);
                    all_zones(&mut dirty);
                }
                Kind::Host => {
                    hosts.insert(id.clone());
                    // The senders every tap takes copies from.
                    dirty.extend(mirrors_with_tap(state, |_| true));
                    // Its underlay address is in the endpoints of its ports,
                    // and in the load balancers it is a NAT host of.
                    dirty.extend(Index::of(&ix.ports_by_host, id).map(|p| format!("endpoint/{p}")));
                    for l in state.load_balancers.values() {
                        if l.nat_hosts.iter().any(|h| h.host_id == *id) {
                            let name = format!("lb/{}", l.id);
                            hosts.extend(self.holders_of(&name).cloned());
                            dirty.insert(name);
                        }
                    }
                }
                Kind::SecurityGroup => {
                    let name = format!("sg/{id}");
                    let remotes = |o: &Option<Object>| -> BTreeSet<String> {
                        match o {
                            Some(Object::SecurityGroup(g)) => g
                                .rules
                                .iter()
                                .filter_map(|r| match &r.remote {
                                    Remote::Group(x) => Some(x.clone()),
                                    _ => None,
                                })
                                .collect(),
                            _ => BTreeSet::new(),
                        }
                    };
                    // The groups its rules name decide which members the
                    // hosts using it hold.
                    if remotes(old) != remotes(&new) {
                        hosts.extend(self.holders_of(&name).cloned());
                    }
                    dirty.insert(name);
                }
                Kind::Quarantine => {
                    let name = format!("quarantine/{id}");
                    hosts.extend(self.holders_of(&name).cloned());
                    if let Some(Object::Quarantine(q)) = &new {
                        hosts.extend(state.quarantined_ports(q).into_iter().map(|p| p.host_id.clone()));
                    }
                }
                Kind::Zone | Kind::ExchangePath | Kind::MirrorSession | Kind::InformationSystem => {
                    if *kind == Kind::Zone {
                        // Virtual IPs held by hosts name the zone's uplink.
                        for v in state
                            .virtual_ips
                            .values()
                            .filter(|v| v.host_held() && state.vpcs.get(&v.vpc_id).is_some_and(|x| x.zone_id == *id))
                        {
                            dirty.insert(format!("vip/{}", v.id));
                        }
                    }
                    let name = match kind {
                        Kind::Zone => format!("zone/{id}"),
                        Kind::MirrorSession => format!("mirror/{id}"),
                        Kind::InformationSystem => format!("system/{id}"),
                        _ => format!("exchange/{id}"),
                    };
                    if old.is_none() != new.is_none() {
                        // Every host holds them all.
                        hosts.extend(state.hosts.keys().cloned());
                        hosts.extend(self.hosts.keys().cloned());
                    }
                    dirty.insert(name);
                }
                Kind::FirewallPolicy => {
                    dirty.insert(format!("firewall/{id}"));
                }
                Kind::VpcPeering => {
                    let name = format!("peering/{id}");
                    hosts.extend(self.holders_of(&name).cloned());
                    for o in both() {
                        let Object::VpcPeering(x) = o else { continue };
                        for v in [&x.vpc_a, &x.vpc_b] {
                            hosts.extend(ix.hosts_in(v).map(str::to_string));
                        }
                    }
                    dirty.insert(name);
                }
                Kind::LoadBalancer | Kind::Pool | Kind::Listener | Kind::Member => {
                    // The load balancer the object is (or was) part of:
                    // held by the hosts with ports in its VPC.
                    let pool_lb = |pool: &str| -> Option<String> {
                        state.pools.get(pool).map(|p| p.load_balancer_id.clone()).or_else(|| {
                            before.iter().find_map(|(_, id, o)| match o {
                                Some(Object::Pool(p)) if id == pool => Some(p.load_balancer_id.clone()),
                                _ => None,
                            })
                        })
                    };
                    for o in both() {
                        let lb = match o {
                            Object::LoadBalancer(l) => {
                                hosts.extend(ix.hosts_in(&l.vpc_id).map(str::to_string));
                                // Its NAT hosts, as they were and are.
                                hosts.extend(l.nat_hosts.iter().map(|h| h.host_id.clone()));
                                Some(l.id.clone())
                            }
                            Object::Pool(p) => Some(p.load_balancer_id.clone()),
                            Object::Listener(l) => Some(l.load_balancer_id.clone()),
                            Object::Member(m) => pool_lb(&m.pool_id),
                            _ => None,
                        };
                        if let Some(lb) = lb {
                            let name = format!("lb/{lb}");
                            hosts.extend(self.holders_of(&name).cloned());
                            dirty.insert(name);
                            proxies_of_lb(&lb, &mut dirty, &mut hosts);
                        }
                    }
                }
                Kind::VirtualIp => {
                    // Held by its holding hosts and by every host holding
                    // its VPC's network; as it was and is.
                    let name = format!("vip/{id}");
                    hosts.extend(self.holders_of(&name).cloned());
                    for o in both() {
                        let Object::VirtualIp(v) = o else { continue };
                        for h in &v.holders {
                            if let sdn_policies::VipHolderTarget::Host(x) = &h.target {
                                hosts.insert(x.clone());
                            }
                        }
                        if v.host_held() {
                            // The NAT hosts that translate its VIP.
                            for l in state
                                .load_balancers
                                .values()
                                .filter(|l| l.vpc_id == v.vpc_id && l.vips().any(|a| v.addresses().any(|b| a == b)))
                            {
                                hosts.extend(l.nat_hosts.iter().map(|h| h.host_id.clone()));
                            }
                        }
                        hosts.extend(self.holders_of(&format!("vpc/{}", v.vpc_id)).cloned());
                    }
                    dirty.insert(name);
                }
                Kind::HttpListener => {
                    // Its load balancer's hosts reach its proxy ports; the
                    // ports' hosts, as they were and are, run the proxy.
                    for o in both() {
                        let Object::HttpListener(l) = o else { continue };
                        let name = format!("lb/{}", l.load_balancer_id);
                        hosts.extend(self.holders_of(&name).cloned());
                        dirty.insert(name);
                        for p in &l.proxy_ports {
                            let name = format!("proxy/{p}");
                            hosts.extend(self.holders_of(&name).cloned());
                            hosts.extend(state.ports.get(p).map(|x| x.host_id.clone()));
                            dirty.insert(name);
                        }
                    }
                }
                Kind::Certificate => {
                    for l in state.http_listeners.values().filter(|l| l.certificate_ids.contains(id)) {
                        dirty.extend(l.proxy_ports.iter().map(|p| format!("proxy/{p}")));
                    }
                }
                Kind::Tenant => {}
            }
        }
        for n in &dirty {
            self.cache.remove(n.as_str());
        }
        let only_quarantines = before.iter().all(|(k, _, _)| *k == Kind::Quarantine);
        let mut changed: BTreeMap<String, BTreeSet<Name>> = BTreeMap::new();
        for host in &hosts {
            if !state.hosts.contains_key(host) {
                if let Some(share) = self.hosts.remove(host) {
                    for n in share.resources.keys() {
                        self.release(n, host);
                    }
                }
                // Nothing holds for it any more: its number is free.
                if let Some(id) = self.host_ids.remove(host) {
                    self.free_ids.push(id);
                }
                continue;
            }
            self.hosts
                .entry(host.clone())
                .or_insert_with(|| HostShare::new(revision));
            let c = self.refresh_host(state, host, &dirty, only_quarantines);
            if !c.is_empty() {
                changed.entry(host.clone()).or_default().extend(c);
            }
        }
        // An endpoint goes to every holder of its VPC, and leaves every
        // host that does not hold it (hosts refreshed above are right
        // already).
        for (n, vpc) in &moved {
            let name = self.intern(n);
            let should: BTreeSet<String> = match vpc {
                Some(v) => self.holders_of(&format!("vpc/{v}")).cloned().collect(),
                None => BTreeSet::new(),
            };
            let held: BTreeSet<String> = self.holders_of(n).cloned().collect();
            for host in held.difference(&should).filter(|h| !hosts.contains(*h)) {
                let Some(share) = self.hosts.get_mut(host) else {
                    continue;
                };
                share.resources.remove(n.as_str());
                self.release(n, host);
                changed.entry(host.clone()).or_default().insert(name.clone());
            }
            for host in should.difference(&held).filter(|h| !hosts.contains(*h)) {
                let Some(r) = self.resource(state, host, n) else {
                    continue;
                };
                let Some(share) = self.hosts.get_mut(host) else {
                    continue;
                };
                share.resources.insert(name.clone(), r);
                self.hold(name.clone(), host);
                changed.entry(host.clone()).or_default().insert(name.clone());
            }
        }
        for n in &dirty {
            let holders: Vec<String> = self.holders_of(n).filter(|h| !hosts.contains(*h)).cloned().collect();
            let name = self.intern(n);
            for host in holders {
                let r = self.resource(state, &host, n);
                let Some(share) = self.hosts.get_mut(&host) else {
                    continue;
                };
                match r {
                    Some(r) => {
                        if share.resources.get(n.as_str()).is_some_and(|o| o.version == r.version) {
                            continue;
                        }
                        share.resources.insert(name.clone(), r);
                    }
                    None => {
                        share.resources.remove(n.as_str());
                        self.release(n, &host);
                    }
                }
                changed.entry(host).or_default().insert(name.clone());
            }
        }
        let mut out = Vec::with_capacity(changed.len());
        for (host, names) in changed {
            let Some(share) = self.hosts.get_mut(&host) else {
                continue;
            };
            share.changed = revision;
            share.log.push_back((revision, names.into_iter().collect()));
            while share.log.len() > LOG_KEEP {
                if let Some((r, _)) = share.log.pop_front() {
                    share.lost = r;
                }
            }
            share.notify.send_replace(revision);
            out.push(host);
        }
        out
    }
}

/// The names of the mirror sessions whose tap port `f` picks.
fn mirrors_with_tap<'a>(
    state: &'a State,
    f: impl Fn(&sdn_policies::Port) -> bool + 'a,
) -> impl Iterator<Item = String> + 'a {
    state
        .mirror_sessions
        .values()
        .filter_map(move |m| match &m.destination {
            sdn_policies::MirrorDestination::Tap { port_id, .. } if state.ports.get(port_id).is_some_and(&f) => {
                Some(format!("mirror/{}", m.id))
            }
            _ => None,
        })
}

/// Whether every host's kept share equals its share built from scratch.
#[cfg(test)]
impl Shares {
    fn consistent_with(&self, state: &State) -> Result<(), String> {
        for host in state.hosts.keys() {
            let want = crate::slice::host_slice(state, host);
            let have: BTreeMap<&str, &String> = self
                .hosts
                .get(host)
                .ok_or(format!("host {host} has no share"))?
                .resources
                .iter()
                .map(|(n, r)| (n.as_ref(), &r.version))
                .collect();
            let want: BTreeMap<&str, &String> = want.iter().map(|(n, r)| (n.as_str(), &r.version)).collect();
            if have != want {
                return Err(format!("host {host}: kept {have:?}, built {want:?}"));
            }
        }
        if self.hosts.len() != state.hosts.len() {
            return Err("shares of deleted hosts remain".into());
        }
        // The holders are exactly the hosts whose share holds the name, by
        // their own number.
        let mut holders: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for (n, ids) in &self.holders {
            for id in ids {
                let host = self.host_names[*id as usize].as_str();
                if self.host_ids.get(host) != Some(id) {
                    return Err(format!("{n} is held by number {id}, which is no host's"));
                }
                holders.entry(n).or_default().insert(host);
            }
        }
        let mut held: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for (host, share) in &self.hosts {
            for n in share.resources.keys() {
                held.entry(n).or_default().insert(host);
            }
        }
        if holders != held {
            return Err(format!("holders {holders:?}, held {held:?}"));
        }
        if let Some(gone) = self.host_ids.keys().find(|h| !self.hosts.contains_key(*h)) {
            return Err(format!("deleted host {gone} keeps its number"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sdn_policies::*;

    fn port(id: &str, host: &str, subnet: &str, ip: &str, groups: &[&str]) -> Op {
        Op::PutPort(Port {
            id: id.into(),
            tenant_id: "t".into(),
            subnet_id: subnet.into(),
            host_id: host.into(),
            device: format!("tap-{id}"),
            mac: Mac([2, 0, 0, 0, 0, id.len() as u8 + ip.as_bytes()[ip.len() - 1]]),
            ipv4: Some(ip.parse().unwrap()),
            ipv6: None,
            security_group_ids: groups.iter().map(|g| g.to_string()).collect(),
            vm_id: format!("vm-{id}"),
        })
    }

    fn group(id: &str, remote: Option<&str>) -> Op {
        Op::PutSecurityGroup(SecurityGroup {
            id: id.into(),
            tenant_id: "t".into(),
            name: id.into(),
            rules: vec![Rule {
                id: "r".into(),
                direction: Direction::Ingress,
                ether_type: EtherType::IPv4,
                protocol: Protocol::Tcp,
                ports: Some((22, 22)),
                remote: match remote {
                    Some(g) => Remote::Group(g.into()),
                    None => Remote::Any,
                },
            }],
        })
    }

    fn vpc(id: &str, vni: u32) -> Op {
        Op::PutVpc(Vpc {
            id: id.into(),
            tenant_id: "t".into(),
            name: id.into(),
            vni,
            zone_id: String::new(),
            border_policy_id: String::new(),
        })
    }

    fn subnet(id: &str, vpc: &str, cidr: &str) -> Op {
        Op::PutSubnet(Subnet {
            id: id.into(),
            vpc_id: vpc.into(),
            cidr_v4: Some(cidr.parse().unwrap()),
            cidr_v6: None,
        })
    }

    fn host(id: &str, ip: &str) -> Op {
        Op::PutHost(Host {
            id: id.into(),
            underlay_ip: ip.parse().unwrap(),
        })
    }

    fn quarantine(id: &str, target: QuarantineTarget, target_id: &str) -> Op {
        Op::PutQuarantine(Quarantine {
            id: id.into(),
            target,
            target_id: target_id.into(),
            reason: "incident".into(),
            expires_unix_ms: None,
        })
    }

    /// A load balancer of v3 exposed to its zone, translated on `nat_host`.
    fn nat_lb(nat_host: &str) -> Op {
        Op::PutLoadBalancer(LoadBalancer {
            id: "lbz".into(),
            tenant_id: "t".into(),
            vpc_id: "v3".into(),
            name: "lbz".into(),
            vip_v4: Some("203.0.113.50".parse().unwrap()),
            vip_v6: None,
            exposure: Exposure::Zone,
            nat_hosts: vec![NatHost {
                host_id: nat_host.into(),
                ipv4: Some("203.0.113.100".parse().unwrap()),
                ipv6: None,
            }],
        })
    }

    fn del(kind: Kind, id: &str) -> Op {
        Op::Delete { kind, id: id.into() }
    }

    /// After every batch, each host's share kept change by change equals
    /// the share built from scratch, and only hosts whose share changed are
    /// reported.
    #[test]
    fn shares_kept_current_equal_shares_built_from_scratch() {
        let certificate = |key: &str| {
            Op::PutCertificate(Certificate {
                id: "c".into(),
                tenant_id: "t".into(),
                name: "c".into(),
                cert_pem: "CERT".into(),
                key_pem: key.into(),
                names: vec!["a.example".into()],
                not_after_unix: i64::MAX,
            })
        };
        // A port made for the proxy: no VM's.
        let proxy_port = |id: &str, host: &str, ip: &str| match port(id, host, "s1", ip, &[]) {
            Op::PutPort(p) => Op::PutPort(Port {
                vm_id: String::new(),
                ..p
            }),
            _ => unreachable!(),
        };
        let http_listener = |ports: &[&str]| {
            Op::PutHttpListener(HttpListener {
                id: "hl".into(),
                load_balancer_id: "lb7".into(),
                protocol: HttpProtocol::Https,
                port: 443,
                certificate_ids: vec!["c".into()],
                rules: vec![],
                pool_id: Some("pw".into()),
                scheduler: HttpScheduler::RoundRobin,
                cookie: None,
                proxy_protocol: None,
                proxy_ports: ports.iter().map(|p| p.to_string()).collect(),
                trusted_proxies: vec![],
                waf_policy_id: None,
            })
        };
        let mut state = State::default();
        let mut shares = Shares::default();
        let mut revision = 0;
        let steps: Vec<(Vec<Op>, Option<&[&str]>)> = vec![
            (
                vec![
                    Op::PutTenant(Tenant {
                        id: "t".into(),
                        name: "t".into(),
                    }),
                    host("h1", "192.0.2.1"),
                    host("h2", "192.0.2.2"),
                    host("h3", "192.0.2.3"),
                    vpc("v1", 100),
                    vpc("v2", 200),
                    subnet("s1", "v1", "10.1.0.0/24"),
                    subnet("s2", "v2", "10.2.0.0/24"),
                    group("web", None),
                    group("db", Some("web")),
                ],
                None,
            ),
            (vec![port("a", "h1", "s1", "10.1.0.5", &["web"])], Some(&["h1"])),
            (vec![port("b", "h2", "s1", "10.1.0.6", &["db"])], Some(&["h1", "h2"])),
            // A group no port uses concerns nobody.
            (vec![group("idle", None)], Some(&[])),
            // A member of `web` moves: the holder of members/web hears.
            (vec![port("c", "h3", "s2", "10.2.0.7", &["web"])], Some(&["h2", "h3"])),
            // A port's address changes: the holders of its VPC (h1, h2)
            // hear, not h3, which holds only the other VPC.
            (vec![port("a", "h1", "s1", "10.1.0.15", &["web"])], Some(&["h1", "h2"])),
            // A port moves VPC: the holders of the VPC it joins gain its
            // endpoint; then it moves back and they lose it.
            (
                vec![port("c", "h3", "s1", "10.1.0.7", &["web"])],
                Some(&["h1", "h2", "h3"]),
            ),
            (
                vec![port("c", "h3", "s2", "10.2.0.7", &["web"])],
                Some(&["h1", "h2", "h3"]),
            ),
            // The subnet under a port moves VPC in one batch (deleted and
            // put again): the port's endpoint follows it.
            (
                vec![
                    del(Kind::Port, "c"),
                    del(Kind::Subnet, "s2"),
                    subnet("s2", "v1", "10.2.0.0/24"),
                    port("c", "h3", "s2", "10.2.0.7", &["web"]),
                ],
                Some(&["h1", "h2", "h3"]),
            ),
            (
                vec![
                    del(Kind::Port, "c"),
                    del(Kind::Subnet, "s2"),
                    subnet("s2", "v2", "10.2.0.0/24"),
                    port("c", "h3", "s2", "10.2.0.7", &["web"]),
                ],
                Some(&["h1", "h2", "h3"]),
            ),
            // A peering joins v1 and v2: all three hosts.
            (
                vec![Op::PutVpcPeering(VpcPeering {
                    id: "p".into(),
                    vpc_a: "v1".into(),
                    vpc_b: "v2".into(),
                    policy_id: String::new(),
                })],
                Some(&["h1", "h2", "h3"]),
            ),
            // The host's underlay moves: every holder of its VPCs.
            (vec![host("h3", "192.0.2.33")], Some(&["h1", "h2", "h3"])),
            // The rules of `db` stop naming `web`.
            (vec![group("db", None)], Some(&["h2"])),
            // A second port of b's VM, on b's host.
            (
                vec![{
                    let Op::PutPort(mut p) = port("b2", "h2", "s1", "10.1.0.16", &[]) else {
                        unreachable!()
                    };
                    p.vm_id = "vm-b".into();
                    Op::PutPort(p)
                }],
                Some(&["h1", "h2", "h3"]),
            ),
            (
                vec![Op::PutQuarantine(Quarantine {
                    id: "q".into(),
                    target: QuarantineTarget::Vm,
                    target_id: "vm-b".into(),
                    reason: "incident".into(),
                    expires_unix_ms: None,
                })],
                Some(&["h2"]),
            ),
            (
                vec![port("b", "h1", "s1", "10.1.0.9", &["db"])],
                Some(&["h1", "h2", "h3"]),
            ),
            // b on h1 and b2 on h2 were quarantined.
            (vec![del(Kind::Quarantine, "q")], Some(&["h1", "h2"])),
            (
                vec![Op::PutZone(Zone {
                    id: "z".into(),
                    name: "z".into(),
                    prefixes: vec!["203.0.113.0/24".parse().unwrap()],
                    uplink_device: "up0".into(),
                })],
                Some(&["h1", "h2", "h3"]),
            ),
            (
                vec![
                    del(Kind::VpcPeering, "p"),
                    del(Kind::Port, "c"),
                    del(Kind::Port, "a"),
                    del(Kind::Port, "b"),
                    del(Kind::Port, "b2"),
                    del(Kind::Subnet, "s2"),
                    del(Kind::Host, "h3"),
                ],
                // h2 loses b2, its last port; h3 is gone.
                Some(&["h1", "h2"]),
            ),
            // h3's number is given again, to h3 or h4: neither inherits
            // anything of the h3 that was deleted.
            (vec![host("h3", "192.0.2.3"), host("h4", "192.0.2.4")], None),
            (vec![port("d", "h4", "s1", "10.1.0.10", &["web"])], Some(&["h4"])),
            (vec![port("e", "h3", "s1", "10.1.0.11", &["db"])], Some(&["h3", "h4"])),
            // Batches of quarantines alone walk only the hosts' quarantine
            // names: one that moves from a VPC to a port leaves the host
            // it no longer holds (h3) and changes on the one it does.
            (vec![quarantine("q2", QuarantineTarget::Vpc, "v1")], Some(&["h3", "h4"])),
            (vec![quarantine("q2", QuarantineTarget::Port, "d")], Some(&["h3", "h4"])),
            (
                vec![
                    quarantine("q3", QuarantineTarget::Port, "e"),
                    del(Kind::Quarantine, "q2"),
                ],
                Some(&["h3", "h4"]),
            ),
            // A VPC in the zone with a port on h3, and a load balancer
            // exposed to the zone that h1 translates: h1, with no port of
            // the VPC, holds it (and the VPC) as h3 does.
            (
                vec![
                    Op::PutVpc(Vpc {
                        zone_id: "z".into(),
                        ..match vpc("v3", 300) {
                            Op::PutVpc(v) => v,
                            _ => unreachable!(),
                        }
                    }),
                    subnet("s3", "v3", "203.0.113.0/25"),
                    port("f", "h3", "s3", "203.0.113.10", &[]),
                ],
                None,
            ),
            (vec![nat_lb("h1")], Some(&["h1", "h3"])),
            // The NAT host changes: the one it leaves, the one it joins and
            // the holders of the load balancer.
            (vec![nat_lb("h4")], Some(&["h1", "h3", "h4"])),
            // The NAT host's underlay moves: the load balancer's holders,
            // and those of its own port's VPC.
            (vec![host("h4", "192.0.2.44")], Some(&["h3", "h4"])),
            (vec![del(Kind::LoadBalancer, "lbz")], Some(&["h3", "h4"])),
            // An HTTPS listener whose proxy runs on port x of h3: h3 alone
            // holds proxy/x, with the certificate's key.
            (
                vec![
                    proxy_port("x", "h3", "10.1.0.24"),
                    Op::PutLoadBalancer(LoadBalancer {
                        id: "lb7".into(),
                        tenant_id: "t".into(),
                        vpc_id: "v1".into(),
                        name: "lb7".into(),
                        vip_v4: Some("10.1.0.100".parse().unwrap()),
                        vip_v6: None,
                        exposure: Exposure::Vpc,
                        nat_hosts: vec![],
                    }),
                    Op::PutPool(Pool {
                        id: "pw".into(),
                        load_balancer_id: "lb7".into(),
                        name: "pw".into(),
                        health: None,
                        drain_secs: 0,
                    }),
                    certificate("one"),
                    http_listener(&["x"]),
                ],
                None,
            ),
            // The key rotated: the proxy's host alone hears.
            (vec![certificate("two")], Some(&["h3"])),
            // A member joins the pool: the proxy's host alone (the load
            // balancer's hosts reach the proxies, not the members).
            (
                vec![Op::PutMember(Member {
                    id: "m".into(),
                    pool_id: "pw".into(),
                    target: MemberTarget::Port("d".into()),
                    port: 8080,
                    weight: 1,
                    state: MemberState::Enabled,
                    draining_since_unix_ms: None,
                    health: None,
                    health_report: false,
                })],
                Some(&["h3"]),
            ),
            // The proxy port moves to h4: h3 loses proxy/x and its key.
            (vec![proxy_port("x", "h4", "10.1.0.24")], Some(&["h3", "h4"])),
            // A second proxy port on h3, then x is no longer one.
            (
                vec![proxy_port("y", "h3", "10.1.0.27"), http_listener(&["x", "y"])],
                Some(&["h3", "h4"]),
            ),
            (vec![http_listener(&["y"])], Some(&["h3", "h4"])),
            (
                vec![del(Kind::HttpListener, "hl"), del(Kind::Certificate, "c")],
                Some(&["h3", "h4"]),
            ),
        ];
        for (i, (ops, expect)) in steps.into_iter().enumerate() {
            let applied = state.apply(&ops).unwrap_or_else(|e| panic!("step {i}: {e}"));
            revision += 1;
            let hosts = shares.update(&state, &applied.before, revision);
            shares
                .consistent_with(&state)
                .unwrap_or_else(|e| panic!("step {i}: {e}"));
            if let Some(expect) = expect {
                assert_eq!(
                    hosts,
                    expect.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
                    "step {i}"
                );
            }
            let mut fresh = Shares::default();
            fresh.rebuild(&state, revision);
            fresh.consistent_with(&state).unwrap();
        }
    }
}
