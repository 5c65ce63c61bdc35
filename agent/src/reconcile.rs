//! The reconciler: turns the compiled share into map contents, diffs against
//! what the maps hold, and applies only the difference. Running it twice
//! changes nothing. Maps sit behind [`Table`], with an in-memory fake for tests.

use std::collections::{BTreeMap, BTreeSet};

use dataplane_common::maps::{
    AddrIdentity, AddrKey, Endpoint, EndpointKey, ExchangeRule, FwPolicy, FwRule, PolicyDirKey, PortAddrKey, PortInfo,
    PrefixLens, RuleKey, ZoneAddrKey, ZoneEndpoint, ENDPOINTS_MAX, EXCHANGE_MAX, FW_POLICIES_MAX, FW_RULES_MAX,
    POLICY_PLENS_MAX, PORTS_MAX, PORT_ADDRS_MAX, PORT_F_QUARANTINED, SG_ADDR_MAX, SG_RULES_MAX, ZONES_MAX,
    ZONE_ENDPOINTS_MAX, ZONE_NETS_MAX,
};

use crate::compile::{Desired, Identities, ServiceSet};

/// One kernel map, or a fake.
pub trait Table<K, V>: Send {
    /// Every entry.
    fn entries(&self) -> anyhow::Result<Vec<(K, V)>>;
    /// Inserts or replaces.
    fn put(&mut self, k: &K, v: &V) -> anyhow::Result<()>;
    /// Removes; a key that is already gone is success.
    fn del(&mut self, k: &K) -> anyhow::Result<()>;
}

/// In-memory table for unit tests.
impl<K: Ord + Clone + Send, V: Clone + Send> Table<K, V> for BTreeMap<K, V> {
    fn entries(&self) -> anyhow::Result<Vec<(K, V)>> {
        Ok(self.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
    }
    fn put(&mut self, k: &K, v: &V) -> anyhow::Result<()> {
        self.insert(k.clone(), v.clone());
        Ok(())
    }
    fn del(&mut self, k: &K) -> anyhow::Result<()> {
        self.remove(k);
        Ok(())
    }
}

/// The maps the reconciler owns.
pub struct MapSet {
    pub ports: Box<dyn Table<u32, PortInfo>>,
    pub port_addrs: Box<dyn Table<PortAddrKey, u8>>,
    pub plens: Box<dyn Table<PolicyDirKey, PrefixLens>>,
    pub sg_addr: Box<dyn Table<AddrKey, AddrIdentity>>,
    pub sg_rules: Box<dyn Table<RuleKey, u8>>,
    pub endpoints: Box<dyn Table<EndpointKey, Endpoint>>,
    pub zone_nets: Box<dyn Table<(u32, [u8; 20]), u32>>,
    pub uplinks: Box<dyn Table<u32, u32>>,
    pub zone_uplink: Box<dyn Table<u32, u32>>,
    pub zone_endpoints: Box<dyn Table<ZoneAddrKey, ZoneEndpoint>>,
    pub exchange: Box<dyn Table<u32, ExchangeRule>>,
    pub fw_policies: Box<dyn Table<u32, FwPolicy>>,
    pub fw_rules: Box<dyn Table<u32, FwRule>>,
    pub fw_names: Box<dyn Table<u32, dataplane_common::maps::RuleName>>,
}

/// A hook run after every change a [`Hooked`] table makes.
pub type Hook = std::sync::Arc<dyn Fn() + Send + Sync>;

/// A table that runs a hook after every change: lets a test send a packet
/// between every step of a reconcile.
pub struct Hooked<K, V> {
    inner: Box<dyn Table<K, V>>,
    hook: Hook,
}

impl<K, V> Table<K, V> for Hooked<K, V> {
    fn entries(&self) -> anyhow::Result<Vec<(K, V)>> {
        self.inner.entries()
    }
    fn put(&mut self, k: &K, v: &V) -> anyhow::Result<()> {
        self.inner.put(k, v)?;
        (self.hook)();
        Ok(())
    }
    fn del(&mut self, k: &K) -> anyhow::Result<()> {
        self.inner.del(k)?;
        (self.hook)();
        Ok(())
    }
}

fn hooked<K: 'static, V: 'static>(inner: Box<dyn Table<K, V>>, hook: &Hook) -> Box<dyn Table<K, V>> {
    Box::new(Hooked {
        inner,
        hook: hook.clone(),
    })
}

impl MapSet {
    /// The same maps, each running `hook` after every change.
    pub fn hooked(self, hook: Hook) -> MapSet {
        MapSet {
            ports: hooked(self.ports, &hook),
            port_addrs: hooked(self.port_addrs, &hook),
            plens: hooked(self.plens, &hook),
            sg_addr: hooked(self.sg_addr, &hook),
            sg_rules: hooked(self.sg_rules, &hook),
            endpoints: hooked(self.endpoints, &hook),
            zone_nets: hooked(self.zone_nets, &hook),
            uplinks: hooked(self.uplinks, &hook),
            zone_uplink: hooked(self.zone_uplink, &hook),
            zone_endpoints: hooked(self.zone_endpoints, &hook),
            exchange: hooked(self.exchange, &hook),
            fw_policies: hooked(self.fw_policies, &hook),
            fw_rules: hooked(self.fw_rules, &hook),
            fw_names: hooked(self.fw_names, &hook),
        }
    }
}

/// What one pass changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Changes {
    pub put: usize,
    pub deleted: usize,
}

/// The cached view of the maps, read once at start and kept in step.
#[derive(Default)]
struct Held {
    ports: BTreeMap<u32, PortInfo>,
    port_addrs: BTreeMap<PortAddrKey, u8>,
    plens: BTreeMap<PolicyDirKey, PrefixLens>,
    sg_addr: BTreeMap<AddrKey, AddrIdentity>,
    sg_rules: BTreeMap<RuleKey, u8>,
    endpoints: BTreeMap<EndpointKey, Endpoint>,
    zone_nets: BTreeMap<(u32, [u8; 20]), u32>,
    uplinks: BTreeMap<u32, u32>,
    zone_uplink: BTreeMap<u32, u32>,
    zone_endpoints: BTreeMap<ZoneAddrKey, ZoneEndpoint>,
    exchange: BTreeMap<u32, ExchangeRule>,
    fw_policies: BTreeMap<u32, FwPolicy>,
    fw_rules: BTreeMap<u32, FwRule>,
    fw_names: BTreeMap<u32, dataplane_common::maps::RuleName>,
}

pub struct Reconciler {
    maps: MapSet,
    held: Held,
    ids: Identities,
}

fn diff<K: Ord + Clone, V: PartialEq + Clone>(held: &BTreeMap<K, V>, want: &BTreeMap<K, V>) -> (Vec<(K, V)>, Vec<K>) {
    let puts = want
        .iter()
        .filter(|(k, v)| held.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let dels = held.keys().filter(|k| !want.contains_key(*k)).cloned().collect();
    (puts, dels)
}

fn apply<K: Ord + Clone, V: PartialEq + Clone>(
    table: &mut dyn Table<K, V>,
    held: &mut BTreeMap<K, V>,
    puts: &[(K, V)],
    c: &mut Changes,
) -> anyhow::Result<()> {
    for (k, v) in puts {
        table.put(k, v)?;
        held.insert(k.clone(), v.clone());
        c.put += 1;
    }
    Ok(())
}

fn remove<K: Ord + Clone, V>(
    table: &mut dyn Table<K, V>,
    held: &mut BTreeMap<K, V>,
    dels: &[K],
    c: &mut Changes,
) -> anyhow::Result<()> {
    for k in dels {
        table.del(k)?;
        held.remove(k);
        c.deleted += 1;
    }
    Ok(())
}

/// The part of a policy's digest for one prefix-length index entry.
fn digest_plens(out: &mut Vec<u8>, k: &PolicyDirKey, pl: &PrefixLens) {
    out.extend_from_slice(&[b'P', k.dir, k.family]);
    for w in pl.bits {
        out.extend_from_slice(&w.to_be_bytes());
    }
}

/// The part of a policy's digest for one remote prefix and its services.
fn digest_addr(out: &mut Vec<u8>, k: &AddrKey, set: &ServiceSet) {
    out.extend_from_slice(&[b'A', k.dir, k.family, k.plen]);
    out.extend_from_slice(&k.addr);
    out.push(set.any as u8);
    for (proto, plen, port) in &set.blocks {
        out.extend_from_slice(&[*proto, *plen]);
        out.extend_from_slice(&port.to_be_bytes());
    }
}

fn check_capacity(name: &str, n: usize, max: u32) -> anyhow::Result<()> {
    if n > max as usize {
        anyhow::bail!("{name} would need {n} entries; the map holds {max}");
    }
    Ok(())
}

impl Reconciler {
    /// Adopts whatever the maps already hold.
    pub fn new(maps: MapSet) -> anyhow::Result<Reconciler> {
        let held = Held {
            ports: maps.ports.entries()?.into_iter().collect(),
            port_addrs: maps.port_addrs.entries()?.into_iter().collect(),
            plens: maps.plens.entries()?.into_iter().collect(),
            sg_addr: maps.sg_addr.entries()?.into_iter().collect(),
            sg_rules: maps.sg_rules.entries()?.into_iter().collect(),
            endpoints: maps.endpoints.entries()?.into_iter().collect(),
            zone_nets: maps.zone_nets.entries()?.into_iter().collect(),
            uplinks: maps.uplinks.entries()?.into_iter().collect(),
            zone_uplink: maps.zone_uplink.entries()?.into_iter().collect(),
            zone_endpoints: maps.zone_endpoints.entries()?.into_iter().collect(),
            exchange: maps.exchange.entries()?.into_iter().collect(),
            fw_policies: maps.fw_policies.entries()?.into_iter().collect(),
            fw_rules: maps.fw_rules.entries()?.into_iter().collect(),
            fw_names: maps.fw_names.entries()?.into_iter().collect(),
        };
        let ids = Identities::adopt(&held.sg_rules, &held.sg_addr);
        Ok(Reconciler { maps, held, ids })
    }

    /// Number of ports the maps hold.
    pub fn port_count(&self) -> usize {
        self.held.ports.len()
    }

    /// Numbers the compiled policies by their contents. Ports whose rules
    /// compile to the same policy share one number (and its map entries);
    /// a policy whose rules change gets a new number, written whole before
    /// any port switches to it in one write and removed after the last port
    /// left it. So a packet is judged by a port's old policy or its new
    /// one in full, never by a mix. Number 0 is the empty policy: it
    /// allows nothing and has no entries.
    fn number_policies(&self, d: &Desired) -> Desired {
        let mut local: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
        for (k, pl) in &d.plens {
            digest_plens(local.entry(k.policy_id).or_default(), k, pl);
        }
        for (k, set) in &d.sg_addr {
            digest_addr(local.entry(k.policy_id).or_default(), k, set);
        }
        // What the maps hold already, by contents.
        let mut held: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
        for (k, pl) in &self.held.plens {
            digest_plens(held.entry(k.policy_id).or_default(), k, pl);
        }
        for (k, v) in &self.held.sg_addr {
            let mut set = self.ids.set(v.identity).cloned().unwrap_or_default();
            set.any = v.any_proto != 0;
            digest_addr(held.entry(k.policy_id).or_default(), k, &set);
        }
        let mut number: BTreeMap<Vec<u8>, u32> = BTreeMap::new();
        for (id, dg) in &held {
            number.entry(dg.clone()).or_insert(*id);
        }
        let mut taken: BTreeSet<u32> = held.keys().copied().collect();
        taken.extend(self.held.ports.values().map(|p| p.policy_id));
        let mut next = 1u32;
        let mut global: BTreeMap<u32, u32> = BTreeMap::new();
        for p in d.ports.values() {
            let Some(dg) = local.get(&p.policy_id) else {
                global.insert(p.policy_id, 0);
                continue;
            };
            let id = match number.get(dg) {
                Some(id) => *id,
                None => {
                    while taken.contains(&next) {
                        next += 1;
                    }
                    taken.insert(next);
                    number.insert(dg.clone(), next);
                    next
                }
            };
            global.insert(p.policy_id, id);
        }
        let to = |local_id: u32| global.get(&local_id).copied().unwrap_or(0);
        let mut out = d.clone();
        out.plens = d
            .plens
            .iter()
            .filter(|(k, _)| to(k.policy_id) != 0)
            .map(|(k, v)| {
                (
                    PolicyDirKey {
                        policy_id: to(k.policy_id),
                        ..*k
                    },
                    *v,
                )
            })
            .collect();
        out.sg_addr = d
            .sg_addr
            .iter()
            .filter(|(k, _)| to(k.policy_id) != 0)
            .map(|(k, v)| {
                (
                    AddrKey {
                        policy_id: to(k.policy_id),
                        ..*k
                    },
                    v.clone(),
                )
            })
            .collect();
        for p in out.ports.values_mut() {
            p.policy_id = to(p.policy_id);
        }
        out
    }

    /// Makes the maps hold `d`. Order keeps every intermediate state safe:
    /// services before the prefixes that name them, prefixes before the
    /// prefix-length index, all before the port that uses them; removals last,
    /// in the reverse order. Policies are numbered by their contents
    /// ([`Reconciler::number_policies`]), so no entry a port's policy uses
    /// changes under it.
    pub fn reconcile(&mut self, d: &Desired) -> anyhow::Result<Changes> {
        let numbered = self.number_policies(d);
        let d = &numbered;
        // Resolve identities and the wanted contents of every map.
        let mut want_addr: BTreeMap<AddrKey, AddrIdentity> = BTreeMap::new();
        let mut used: BTreeSet<u32> = BTreeSet::new();
        for (k, set) in &d.sg_addr {
            let id = self.ids.get_or_alloc(set);
            used.insert(id);
            let mut port_plens = 0u32;
            for (_, plen, _) in &set.blocks {
                port_plens |= 1 << plen;
            }
            want_addr.insert(
                *k,
                AddrIdentity {
                    identity: id,
                    port_plens,
                    any_proto: set.any as u8,
                    _pad: [0; 3],
                },
            );
        }
        let mut want_rules: BTreeMap<RuleKey, u8> = BTreeMap::new();
        for id in &used {
            let set = self.ids.set(*id).expect("allocated").clone();
            for (proto, port_plen, port) in set.blocks {
                want_rules.insert(
                    RuleKey {
                        identity: *id,
                        proto,
                        port_plen,
                        port,
                    },
                    1,
                );
            }
        }
        let want_addrs: BTreeMap<PortAddrKey, u8> = d.port_addrs.iter().map(|k| (*k, 1)).collect();

        check_capacity("ports", d.ports.len(), PORTS_MAX)?;
        check_capacity("port addresses", want_addrs.len(), PORT_ADDRS_MAX)?;
        check_capacity("prefix-length index", d.plens.len(), POLICY_PLENS_MAX)?;
        check_capacity("remote prefixes", want_addr.len(), SG_ADDR_MAX)?;
        check_capacity("service entries", want_rules.len(), SG_RULES_MAX)?;
        check_capacity("overlay endpoints", d.endpoints.len(), ENDPOINTS_MAX)?;
        check_capacity("zone prefixes", d.zone_nets.len(), ZONE_NETS_MAX)?;
        check_capacity("zones", d.zone_uplink.len(), ZONES_MAX)?;
        check_capacity(
            "addresses of VPCs with a zone",
            d.zone_endpoints.len(),
            ZONE_ENDPOINTS_MAX,
        )?;
        check_capacity("exchange paths", d.exchange.len(), EXCHANGE_MAX)?;
        check_capacity("firewall policies", d.fw_policies.len(), FW_POLICIES_MAX)?;
        if let Some(last) = d.fw_rules.keys().last() {
            check_capacity("firewall rule slots", *last as usize + 1, FW_RULES_MAX)?;
        }

        let (rule_puts, rule_dels) = diff(&self.held.sg_rules, &want_rules);
        let (addr_puts, addr_dels) = diff(&self.held.sg_addr, &want_addr);
        let (plen_puts, plen_dels) = diff(&self.held.plens, &d.plens);
        let (paddr_puts, paddr_dels) = diff(&self.held.port_addrs, &want_addrs);
        let (port_puts, port_dels) = diff(&self.held.ports, &d.ports);
        let (ep_puts, ep_dels) = diff(&self.held.endpoints, &d.endpoints);

        let mut c = Changes::default();
        let m = &mut self.maps;
        let h = &mut self.held;
        apply(m.sg_rules.as_mut(), &mut h.sg_rules, &rule_puts, &mut c)?;
        apply(m.sg_addr.as_mut(), &mut h.sg_addr, &addr_puts, &mut c)?;
        apply(m.plens.as_mut(), &mut h.plens, &plen_puts, &mut c)?;
        apply(m.port_addrs.as_mut(), &mut h.port_addrs, &paddr_puts, &mut c)?;
        // Zones before the routes that use them; routes before the ports
        // that use them; removals after, in reverse. The exchange list is
        // rewritten in place (a short window with a mix of old and new
        // paths; every entry is whole).
        let (zn_puts, zn_dels) = diff(&h.zone_nets, &d.zone_nets);
        let (ul_puts, ul_dels) = diff(&h.uplinks, &d.uplinks);
        let (zu_puts, zu_dels) = diff(&h.zone_uplink, &d.zone_uplink);
        let (ze_puts, ze_dels) = diff(&h.zone_endpoints, &d.zone_endpoints);
        let (ex_puts, ex_dels) = diff(&h.exchange, &d.exchange);
        let (nm_puts, nm_dels) = diff(&h.fw_names, &d.fw_names);
        apply(m.fw_names.as_mut(), &mut h.fw_names, &nm_puts, &mut c)?;
        let (fr_puts, fr_dels) = diff(&h.fw_rules, &d.fw_rules);
        let (fp_puts, fp_dels) = diff(&h.fw_policies, &d.fw_policies);
        // Rules before the policy headers that count them.
        apply(m.fw_rules.as_mut(), &mut h.fw_rules, &fr_puts, &mut c)?;
        apply(m.fw_policies.as_mut(), &mut h.fw_policies, &fp_puts, &mut c)?;
        apply(m.exchange.as_mut(), &mut h.exchange, &ex_puts, &mut c)?;
        remove(m.exchange.as_mut(), &mut h.exchange, &ex_dels, &mut c)?;
        apply(m.zone_nets.as_mut(), &mut h.zone_nets, &zn_puts, &mut c)?;
        apply(m.uplinks.as_mut(), &mut h.uplinks, &ul_puts, &mut c)?;
        apply(m.zone_uplink.as_mut(), &mut h.zone_uplink, &zu_puts, &mut c)?;
        apply(m.zone_endpoints.as_mut(), &mut h.zone_endpoints, &ze_puts, &mut c)?;
        apply(m.endpoints.as_mut(), &mut h.endpoints, &ep_puts, &mut c)?;
        apply(m.ports.as_mut(), &mut h.ports, &port_puts, &mut c)?;
        remove(m.ports.as_mut(), &mut h.ports, &port_dels, &mut c)?;
        remove(m.endpoints.as_mut(), &mut h.endpoints, &ep_dels, &mut c)?;
        remove(m.zone_endpoints.as_mut(), &mut h.zone_endpoints, &ze_dels, &mut c)?;
        remove(m.zone_uplink.as_mut(), &mut h.zone_uplink, &zu_dels, &mut c)?;
        remove(m.uplinks.as_mut(), &mut h.uplinks, &ul_dels, &mut c)?;
        remove(m.zone_nets.as_mut(), &mut h.zone_nets, &zn_dels, &mut c)?;
        remove(m.fw_policies.as_mut(), &mut h.fw_policies, &fp_dels, &mut c)?;
        remove(m.fw_rules.as_mut(), &mut h.fw_rules, &fr_dels, &mut c)?;
        remove(m.fw_names.as_mut(), &mut h.fw_names, &nm_dels, &mut c)?;
        remove(m.port_addrs.as_mut(), &mut h.port_addrs, &paddr_dels, &mut c)?;
        remove(m.plens.as_mut(), &mut h.plens, &plen_dels, &mut c)?;
        remove(m.sg_addr.as_mut(), &mut h.sg_addr, &addr_dels, &mut c)?;
        remove(m.sg_rules.as_mut(), &mut h.sg_rules, &rule_dels, &mut c)?;
        self.ids.retain(&used);
        Ok(c)
    }

    /// Sets the quarantine flag of every held port `d` quarantines, without
    /// touching anything else: run when a whole reconcile cannot be, so a
    /// quarantine holds whatever else fails. Returns the ports changed.
    pub fn enforce_quarantines(&mut self, d: &Desired) -> anyhow::Result<usize> {
        let mut n = 0;
        for (ifx, want) in &d.ports {
            if want.flags & PORT_F_QUARANTINED == 0 {
                continue;
            }
            if let Some(held) = self.held.ports.get(ifx).copied() {
                if held.flags & PORT_F_QUARANTINED == 0 {
                    let q = PortInfo {
                        flags: held.flags | PORT_F_QUARANTINED,
                        ..held
                    };
                    self.maps.ports.put(ifx, &q)?;
                    self.held.ports.insert(*ifx, q);
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    /// Remote-prefix entries the maps hold, over every policy.
    pub fn sg_addr_entries(&self) -> usize {
        self.held.sg_addr.len()
    }

    /// The policy number of each port the maps hold.
    pub fn port_policies(&self) -> BTreeMap<u32, u32> {
        self.held.ports.iter().map(|(i, p)| (*i, p.policy_id)).collect()
    }

    /// Ports (ifindexes) the maps hold.
    pub fn ports(&self) -> BTreeSet<u32> {
        self.held.ports.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::ServiceSet;

    fn fake() -> MapSet {
        MapSet {
            ports: Box::new(BTreeMap::new()),
            port_addrs: Box::new(BTreeMap::new()),
            plens: Box::new(BTreeMap::new()),
            sg_addr: Box::new(BTreeMap::new()),
            sg_rules: Box::new(BTreeMap::new()),
            endpoints: Box::new(BTreeMap::new()),
            zone_nets: Box::new(BTreeMap::new()),
            uplinks: Box::new(BTreeMap::new()),
            zone_uplink: Box::new(BTreeMap::new()),
            zone_endpoints: Box::new(BTreeMap::new()),
            exchange: Box::new(BTreeMap::new()),
            fw_policies: Box::new(BTreeMap::new()),
            fw_rules: Box::new(BTreeMap::new()),
            fw_names: Box::new(BTreeMap::new()),
        }
    }

    fn desired(port: u16) -> Desired {
        let mut d = Desired::default();
        d.ports.insert(
            5,
            PortInfo {
                mac: [2, 0, 0, 0, 0, 1],
                _pad0: [0; 2],
                policy_id: 5,
                epoch: port as u32,
                flags: 0,
                vni: 7,
            },
        );
        let key = AddrKey {
            policy_id: 5,
            dir: 0,
            family: 4,
            plen: 0,
            _pad: 0,
            addr: [0; 16],
        };
        d.sg_addr.insert(
            key,
            ServiceSet {
                any: false,
                blocks: [(6, 16, port)].into(),
            },
        );
        let mut pl = PrefixLens::default();
        pl.set(0);
        d.plens.insert(
            PolicyDirKey {
                policy_id: 5,
                dir: 0,
                family: 4,
                _pad: [0; 2],
            },
            pl,
        );
        d
    }

    #[test]
    fn idempotent_and_minimal() {
        let mut r = Reconciler::new(fake()).unwrap();
        let c1 = r.reconcile(&desired(80)).unwrap();
        assert_eq!(c1.put, 4);
        assert_eq!(
            r.reconcile(&desired(80)).unwrap(),
            Changes::default(),
            "second pass changes nothing"
        );
        let c3 = r.reconcile(&desired(443)).unwrap();
        // Changed rules are a new policy: its service entry, prefix and
        // prefix-length index are written, then the port switches to it;
        // the old policy's three entries go after.
        assert_eq!(c3, Changes { put: 4, deleted: 3 });
        let c4 = r.reconcile(&Desired::default()).unwrap();
        assert_eq!(c4.put, 0);
        assert_eq!(c4.deleted, 4);
        assert_eq!(r.port_count(), 0);
    }
}
