//! The reconciler: turns the compiled share into map contents, diffs against
//! what the maps hold, and applies only the difference. Running it twice
//! changes nothing. Maps sit behind [`Table`], with an in-memory fake for tests.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context as _;
use aya::Pod;
use dataplane_common::maps::{
    self as m, AddrIdentity, AddrKey, Endpoint, EndpointKey, ExchangeRule, FwPolicy, FwRule, PolicyDirKey, PortAddrKey,
    PortInfo, PrefixLens, RuleKey, ZoneAddrKey, ZoneEndpoint, ENDPOINTS_MAX, EXCHANGE_MAX, FW_NAMES_MAX,
    FW_POLICIES_MAX, FW_RULES_MAX, POLICY_PLENS_MAX, PORTS_MAX, PORT_ADDRS_MAX, PORT_F_QUARANTINED, SG_ADDR_MAX,
    SG_RULES_MAX, UPLINK_ADDRS_MAX, VPC_NETS_MAX, ZONES_MAX, ZONE_ENDPOINTS_MAX, ZONE_NETS_MAX,
};

use crate::compile::{Desired, Identities, ServiceSet, FW_BROKEN};

/// Firewall policy numbers of the second half of `FW_POLICIES` start here
/// (compiled numbers stay far below it).
pub const FW_NUMBER_HALF: u32 = 1 << 30;

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

/// What one pass changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Changes {
    pub put: usize,
    pub deleted: usize,
}

/// Opens the kernel's maps as tables (the agent's dataplane does; tests
/// use in-memory tables).
pub trait TableSource {
    /// A hash map (or LRU) by pinned name.
    fn hash<K: Pod + Send + 'static, V: Pod + Send + 'static>(
        &mut self,
        name: &'static str,
    ) -> anyhow::Result<Box<dyn Table<K, V>>>;
    /// An array by pinned name: present entries are the non-default ones.
    fn array<V: Pod + Default + PartialEq + Send + 'static>(
        &mut self,
        name: &'static str,
    ) -> anyhow::Result<Box<dyn Table<u32, V>>>;
    /// An LPM trie by pinned name, keyed by (prefix length, data).
    fn lpm<K: Pod + Send + 'static>(&mut self, name: &'static str) -> anyhow::Result<Box<dyn Table<(u32, K), u32>>>;
}

/// Every table the reconciler keeps, declared once: its field, key and
/// value, how it is opened (by the pinned name from the common crate), what
/// it holds at most, and what the capacity error calls it. The order is the
/// order of dependencies: an entry is written before the entries of later
/// tables that refer to it, and removed after them (removals run in reverse
/// order, after every write). A new map is one line here.
macro_rules! tables {
    ($( $field:ident: $k:ty => $v:ty = $open:ident($name:expr, $max:expr, $what:literal) ),+ $(,)?) => {
        /// The maps the reconciler owns.
        pub struct MapSet {
            $( pub $field: Box<dyn Table<$k, $v>>, )+
        }

        /// The contents of every table: what the maps hold (kept in step),
        /// or what they should.
        #[derive(Default)]
        pub struct Contents {
            $( pub $field: BTreeMap<$k, $v>, )+
        }

        impl MapSet {
            /// Opens every table.
            pub fn open(src: &mut impl TableSource) -> anyhow::Result<MapSet> {
                Ok(MapSet {
                    $( $field: src.$open($name)?, )+
                })
            }

            /// The same maps, each running `hook` after every change.
            pub fn hooked(self, hook: Hook) -> MapSet {
                MapSet {
                    $( $field: hooked(self.$field, &hook), )+
                }
            }

            /// In-memory tables.
            pub fn in_memory() -> MapSet {
                MapSet {
                    $( $field: Box::new(BTreeMap::new()), )+
                }
            }
        }

        impl Contents {
            fn read(m: &MapSet) -> anyhow::Result<Contents> {
                Ok(Contents {
                    $( $field: m.$field.entries().with_context(|| format!("reading {}", $name))?.into_iter().collect(), )+
                })
            }

            fn check_capacity(&self) -> anyhow::Result<()> {
                $( check_capacity($what, self.$field.len(), $max)?; )+
                Ok(())
            }
        }

        /// Makes every table hold `want`: writes in declared order, then
        /// removals in reverse.
        fn sync(m: &mut MapSet, held: &mut Contents, want: &Contents, c: &mut Changes) -> anyhow::Result<()> {
            let mut steps: Vec<Box<dyn Step + '_>> = vec![
                $( Box::new(Diffed::new(m.$field.as_mut(), &mut held.$field, &want.$field)), )+
            ];
            for s in steps.iter_mut() {
                s.put(c)?;
            }
            for s in steps.iter_mut().rev() {
                s.del(c)?;
            }
            Ok(())
        }
    };
}

tables! {
    // Services before the prefixes that name them.
    sg_rules: RuleKey => u8 = hash(m::SG_RULES, SG_RULES_MAX, "service entries"),
    sg_addr: AddrKey => AddrIdentity = hash(m::SG_ADDR, SG_ADDR_MAX, "remote prefixes"),
    // Prefixes before the prefix-length index that lists them.
    plens: PolicyDirKey => PrefixLens = hash(m::POLICY_PLENS, POLICY_PLENS_MAX, "prefix-length index"),
    port_addrs: PortAddrKey => u8 = hash(m::PORT_ADDRS, PORT_ADDRS_MAX, "port addresses"),
    fw_names: u32 => m::RuleName = hash(m::FW_NAMES, FW_NAMES_MAX, "firewall rule names"),
    // Rules before the policy headers that count them.
    fw_rules: u32 => FwRule = array(m::FW_RULES, FW_RULES_MAX, "firewall rule slots"),
    fw_policies: u32 => FwPolicy = hash(m::FW_POLICIES, FW_POLICIES_MAX, "firewall policies"),
    // A changed exchange list is written whole into the other half, then
    // the half switches (see `place_halves`).
    exchange: u32 => ExchangeRule = array(m::EXCHANGE, EXCHANGE_MAX, "exchange paths"),
    exchange_half: u32 => u32 = array(m::EXCHANGE_HALF, 1, "exchange half"),
    // Zones before the routes that use them; routes before the ports.
    zone_nets: (u32, [u8; 20]) => u32 = lpm(m::ZONE_NETS, ZONE_NETS_MAX, "zone prefixes"),
    vpc_nets: (u32, [u8; 20]) => u32 = lpm(m::VPC_NETS, VPC_NETS_MAX, "VPC subnets of the zones"),
    uplink_addrs: PortAddrKey => u8 = hash(m::UPLINK_ADDRS, UPLINK_ADDRS_MAX, "uplink addresses"),
    uplinks: u32 => u32 = hash(m::UPLINKS, ZONES_MAX, "uplinks"),
    zone_uplink: u32 => u32 = hash(m::ZONE_UPLINK, ZONES_MAX, "zones"),
    zone_endpoints: ZoneAddrKey => ZoneEndpoint = hash(m::ZONE_ENDPOINTS, ZONE_ENDPOINTS_MAX, "addresses of VPCs with a zone"),
    endpoints: EndpointKey => Endpoint = hash(m::ENDPOINTS, ENDPOINTS_MAX, "overlay endpoints"),
    vrrp_groups: m::VrrpKey => m::VrrpGroup = hash(m::VRRP_GROUPS, m::VRRP_GROUPS_MAX, "VRRP routers"),
    // Ports last: a port entry is written when everything it uses is.
    ports: u32 => PortInfo = hash(m::PORTS, PORTS_MAX, "ports"),
}

/// One table's part of a pass: its writes, then (later) its removals.
trait Step {
    fn put(&mut self, c: &mut Changes) -> anyhow::Result<()>;
    fn del(&mut self, c: &mut Changes) -> anyhow::Result<()>;
}

/// A table with what it holds and what it should.
struct Diffed<'a, K, V> {
    table: &'a mut dyn Table<K, V>,
    held: &'a mut BTreeMap<K, V>,
    puts: Vec<(K, V)>,
    dels: Vec<K>,
}

impl<'a, K: Ord + Clone, V: PartialEq + Clone> Diffed<'a, K, V> {
    fn new(table: &'a mut dyn Table<K, V>, held: &'a mut BTreeMap<K, V>, want: &BTreeMap<K, V>) -> Self {
        let (puts, dels) = diff(held, want);
        Diffed {
            table,
            held,
            puts,
            dels,
        }
    }
}

impl<K: Ord + Clone, V: PartialEq + Clone> Step for Diffed<'_, K, V> {
    fn put(&mut self, c: &mut Changes) -> anyhow::Result<()> {
        apply(self.table, self.held, &self.puts, c)
    }
    fn del(&mut self, c: &mut Changes) -> anyhow::Result<()> {
        remove(self.table, self.held, &self.dels, c)
    }
}

pub struct Reconciler {
    maps: MapSet,
    held: Contents,
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
        let held = Contents::read(&maps)?;
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
        let want = Contents {
            sg_rules: want_rules,
            sg_addr: want_addr,
            plens: d.plens.clone(),
            port_addrs: d.port_addrs.iter().map(|k| (*k, 1)).collect(),
            fw_names: d.fw_names.clone(),
            fw_rules: d.fw_rules.clone(),
            fw_policies: d.fw_policies.clone(),
            exchange: d.exchange.clone(),
            exchange_half: BTreeMap::new(),
            zone_nets: d.zone_nets.clone(),
            vpc_nets: d.vpc_nets.clone(),
            uplink_addrs: d.uplink_addrs.iter().map(|k| (*k, 1)).collect(),
            uplinks: d.uplinks.clone(),
            zone_uplink: d.zone_uplink.clone(),
            zone_endpoints: d.zone_endpoints.clone(),
            endpoints: d.endpoints.clone(),
            vrrp_groups: d.vrrp_groups.clone(),
            ports: d.ports.clone(),
        };
        want.check_capacity()?;
        // Arrays are indexed by slot: the last slot must exist too.
        for (what, last, max) in [
            ("firewall rule slots", want.fw_rules.keys().last(), FW_RULES_MAX),
            ("exchange paths", want.exchange.keys().last(), EXCHANGE_MAX),
        ] {
            if let Some(last) = last {
                check_capacity(what, *last as usize + 1, max)?;
            }
        }
        let mut want = want;
        self.place_halves(&mut want);
        let mut c = Changes::default();
        sync(&mut self.maps, &mut self.held, &want, &mut c)?;
        self.ids.retain(&used);
        Ok(c)
    }

    /// Puts the compiled firewall policies and exchange paths (numbered
    /// and slotted from 0) into a half of their tables. Unchanged, they stay
    /// where they are. Changed, they go whole into the half nothing uses:
    /// - firewall policies get the numbers of that half
    ///   ([`FW_NUMBER_HALF`]) and their rules its slots; the references
    ///   (a VPC's border, a peering's VPC firewall) then switch to the new
    ///   numbers one write each, and the old half's headers and rules are
    ///   removed last (`tables!` order). A VPC is judged by its old policy
    ///   or its new one, never by another's or by slots half rewritten;
    /// - exchange paths go into the other half of their array, ended by an
    ///   empty slot, and the list switches in one write of its half number
    ///   (always a write, so the switch comes before the ports' new epochs).
    fn place_halves(&self, want: &mut Contents) {
        let held = &self.held;
        let half_of = |n: u32| u32::from(n != FW_BROKEN && n >= FW_NUMBER_HALF);
        // Firewall: the halves the held references use (the policies a
        // packet can reach), else the held headers.
        let mut refs = [0usize; 2];
        for n in held
            .zone_endpoints
            .values()
            .map(|e| e.border)
            .chain(held.endpoints.values().map(|e| e.policy))
        {
            if n != 0 && n != FW_BROKEN {
                refs[half_of(n) as usize] += 1;
            }
        }
        let current = match refs {
            [0, 0] => held.fw_policies.keys().next_back().map(|n| half_of(*n)).unwrap_or(0),
            [_, 0] => 0,
            [0, _] => 1,
            // Only after a pass that failed half-way: the next change goes
            // to the half fewer references use.
            [a, b] => {
                tracing::warn!(
                    half0 = a,
                    half1 = b,
                    "firewall references in both halves after an interrupted pass"
                );
                u32::from(a >= b)
            }
        };
        let (num, slot) = (current * FW_NUMBER_HALF, current * FW_RULES_MAX);
        let same = refs[1 - current as usize] == 0
            && held.fw_rules.len() == want.fw_rules.len()
            && held.fw_policies.len() == want.fw_policies.len()
            && want
                .fw_rules
                .iter()
                .all(|(k, v)| held.fw_rules.get(&(k + slot)) == Some(v))
            && want.fw_policies.iter().all(|(k, p)| {
                held.fw_policies.get(&(k + num))
                    == Some(&FwPolicy {
                        first: p.first + if p.count > 0 { slot } else { 0 },
                        ..*p
                    })
            });
        let half = if same { current } else { 1 - current };
        if half == 1 {
            let renumber = |n: u32| {
                if n == 0 || n == FW_BROKEN {
                    n
                } else {
                    n + FW_NUMBER_HALF
                }
            };
            want.fw_rules = std::mem::take(&mut want.fw_rules)
                .into_iter()
                .map(|(k, v)| (k + FW_RULES_MAX, v))
                .collect();
            want.fw_policies = std::mem::take(&mut want.fw_policies)
                .into_iter()
                .map(|(n, mut p)| {
                    if p.count > 0 {
                        p.first += FW_RULES_MAX;
                    }
                    (renumber(n), p)
                })
                .collect();
            for e in want.zone_endpoints.values_mut() {
                e.border = renumber(e.border);
            }
            for e in want.endpoints.values_mut() {
                e.policy = renumber(e.policy);
            }
        }
        // Exchange paths: the half its number names (2: the first half, 1:
        // the second; the programs read the low bit).
        let current = held.exchange_half.get(&0).copied().unwrap_or(0) & 1;
        let off = current * EXCHANGE_MAX;
        let held_paths = held
            .exchange
            .values()
            .filter(|v| **v != ExchangeRule::default())
            .count();
        let same = held_paths == want.exchange.len()
            && want
                .exchange
                .iter()
                .all(|(k, v)| held.exchange.get(&(k + off)) == Some(v));
        let half = if same { current } else { 1 - current };
        let base = half * EXCHANGE_MAX;
        let len = want.exchange.len() as u32;
        want.exchange = std::mem::take(&mut want.exchange)
            .into_iter()
            .map(|(k, v)| (k + base, v))
            .collect();
        // The slot after the list must be empty before the switch: what an
        // interrupted pass left there would extend the list.
        if len < EXCHANGE_MAX && held.exchange.contains_key(&(base + len)) {
            want.exchange.insert(base + len, ExchangeRule::default());
        }
        match (half, held.exchange_half.get(&0)) {
            (1, _) => {
                want.exchange_half.insert(0, 1);
            }
            // Back to (or staying in) the first half: a write, in the
            // write phase.
            (_, Some(_)) => {
                want.exchange_half.insert(0, 2);
            }
            // The first half, never switched: nothing to write.
            (_, None) => {}
        }
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
        MapSet::in_memory()
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
