//! Relations among the objects that validation and each host's share look
//! up: which ports a host, a VPC or a group has, which VPCs a policy
//! guards, who names a group. Kept current by every change to the state
//! (never stored: rebuilt from the objects when a state is loaded), so a
//! change costs what it touches, not what the state holds.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::model::*;

type Set = BTreeSet<String>;
type Counts = BTreeMap<String, usize>;

/// The relations. Empty sets and zero counts are removed, so an index
/// kept current compares equal to one rebuilt from the same objects.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Index {
    /// The VPC each port is in (through its subnet).
    pub port_vpc: BTreeMap<String, String>,
    pub ports_by_host: BTreeMap<String, Set>,
    pub ports_by_vpc: BTreeMap<String, Set>,
    pub ports_by_subnet: BTreeMap<String, Set>,
    pub ports_by_group: BTreeMap<String, Set>,
    pub ports_by_vm: BTreeMap<String, Set>,
    /// The port holding an address in a VPC.
    pub addresses: BTreeMap<(String, IpAddr), String>,
    /// The port holding a MAC in a VPC.
    pub macs: BTreeMap<(String, Mac), String>,
    /// The port on a device of a host.
    pub devices: BTreeMap<(String, String), String>,
    /// Ports of each VPC, by host.
    pub vpc_hosts: BTreeMap<String, Counts>,
    /// Ports of each host, by VPC.
    pub host_vpcs: BTreeMap<String, Counts>,
    /// Port addresses of each VPC.
    pub vpc_addresses: Counts,
    /// Groups used on each host, with their ports there.
    pub host_groups: BTreeMap<String, Counts>,
    pub subnets_by_vpc: BTreeMap<String, Set>,
    pub peerings_by_vpc: BTreeMap<String, Set>,
    pub peerings_by_policy: BTreeMap<String, Set>,
    pub vpcs_by_border: BTreeMap<String, Set>,
    pub vpcs_by_zone: BTreeMap<String, Set>,
    pub vpcs_by_tenant: BTreeMap<String, Set>,
    pub groups_by_tenant: BTreeMap<String, Set>,
    pub vnis: BTreeMap<u32, String>,
    /// The groups whose rules name a group as their remote.
    pub referrers: BTreeMap<String, Set>,
}

fn add(m: &mut BTreeMap<String, Set>, k: &str, v: &str) {
    if !k.is_empty() {
        m.entry(k.to_string()).or_default().insert(v.to_string());
    }
}

fn del(m: &mut BTreeMap<String, Set>, k: &str, v: &str) {
    if let Some(s) = m.get_mut(k) {
        s.remove(v);
        if s.is_empty() {
            m.remove(k);
        }
    }
}

fn inc(m: &mut BTreeMap<String, Counts>, a: &str, b: &str) {
    *m.entry(a.to_string()).or_default().entry(b.to_string()).or_default() += 1;
}

fn dec(m: &mut BTreeMap<String, Counts>, a: &str, b: &str) {
    if let Some(c) = m.get_mut(a) {
        if let Some(n) = c.get_mut(b) {
            *n -= 1;
            if *n == 0 {
                c.remove(b);
            }
        }
        if c.is_empty() {
            m.remove(a);
        }
    }
}

/// Removes `k` from a unique index only while it still names `owner`.
fn del_owned<K: Ord>(m: &mut BTreeMap<K, String>, k: &K, owner: &str) {
    if m.get(k).is_some_and(|o| o == owner) {
        m.remove(k);
    }
}

impl Index {
    /// Records (`on`) or forgets an object. A port needs its VPC, which
    /// only the subnet knows: `vpc_of_subnet` gives it.
    pub fn object(&mut self, o: &Object, on: bool, vpc_of_subnet: impl Fn(&str) -> Option<String>) {
        match o {
            Object::Port(p) => {
                if on {
                    let vpc = vpc_of_subnet(&p.subnet_id).unwrap_or_default();
                    self.port(p, &vpc, true);
                } else {
                    let vpc = self.port_vpc.get(&p.id).cloned().unwrap_or_default();
                    self.port(p, &vpc, false);
                }
            }
            Object::Subnet(s) => {
                if on {
                    add(&mut self.subnets_by_vpc, &s.vpc_id, &s.id);
                } else {
                    del(&mut self.subnets_by_vpc, &s.vpc_id, &s.id);
                }
            }
            Object::VpcPeering(x) => {
                let f = if on { add } else { del };
                f(&mut self.peerings_by_vpc, &x.vpc_a, &x.id);
                f(&mut self.peerings_by_vpc, &x.vpc_b, &x.id);
                f(&mut self.peerings_by_policy, &x.policy_id, &x.id);
            }
            Object::Vpc(v) => {
                let f = if on { add } else { del };
                f(&mut self.vpcs_by_border, &v.border_policy_id, &v.id);
                f(&mut self.vpcs_by_zone, &v.zone_id, &v.id);
                f(&mut self.vpcs_by_tenant, &v.tenant_id, &v.id);
                if on {
                    self.vnis.insert(v.vni, v.id.clone());
                } else {
                    del_owned(&mut self.vnis, &v.vni, &v.id);
                }
            }
            Object::SecurityGroup(g) => {
                let f = if on { add } else { del };
                f(&mut self.groups_by_tenant, &g.tenant_id, &g.id);
                for r in &g.rules {
                    if let Remote::Group(target) = &r.remote {
                        f(&mut self.referrers, target, &g.id);
                    }
                }
            }
            _ => {}
        }
    }

    fn port(&mut self, p: &Port, vpc: &str, on: bool) {
        let id = p.id.as_str();
        type Edit<T> = fn(&mut BTreeMap<String, T>, &str, &str);
        let (set, count): (Edit<Set>, Edit<Counts>) = if on { (add, inc) } else { (del, dec) };
        set(&mut self.ports_by_host, &p.host_id, id);
        set(&mut self.ports_by_vpc, vpc, id);
        set(&mut self.ports_by_subnet, &p.subnet_id, id);
        set(&mut self.ports_by_vm, &p.vm_id, id);
        for g in &p.security_group_ids {
            set(&mut self.ports_by_group, g, id);
            count(&mut self.host_groups, &p.host_id, g);
        }
        count(&mut self.vpc_hosts, vpc, &p.host_id);
        count(&mut self.host_vpcs, &p.host_id, vpc);
        let addresses = p.addresses().map(|a| (vpc.to_string(), a));
        let mac = (vpc.to_string(), p.mac);
        let device = (p.host_id.clone(), p.device.clone());
        if on {
            self.port_vpc.insert(p.id.clone(), vpc.to_string());
            for a in addresses {
                self.addresses.insert(a, p.id.clone());
                *self.vpc_addresses.entry(vpc.to_string()).or_default() += 1;
            }
            self.macs.insert(mac, p.id.clone());
            self.devices.insert(device, p.id.clone());
        } else {
            self.port_vpc.remove(id);
            for a in addresses {
                del_owned(&mut self.addresses, &a, id);
                if let Some(n) = self.vpc_addresses.get_mut(vpc) {
                    *n -= 1;
                    if *n == 0 {
                        self.vpc_addresses.remove(vpc);
                    }
                }
            }
            del_owned(&mut self.macs, &mac, id);
            del_owned(&mut self.devices, &device, id);
        }
    }

    /// The VPCs with ports on a host.
    pub fn vpcs_on(&self, host: &str) -> impl Iterator<Item = &str> {
        self.host_vpcs
            .get(host)
            .into_iter()
            .flat_map(|m| m.keys().map(String::as_str))
    }

    /// The hosts with ports in a VPC.
    pub fn hosts_in(&self, vpc: &str) -> impl Iterator<Item = &str> {
        self.vpc_hosts
            .get(vpc)
            .into_iter()
            .flat_map(|m| m.keys().map(String::as_str))
    }

    /// Members of a set-valued relation.
    pub fn of<'a>(m: &'a BTreeMap<String, Set>, k: &str) -> impl Iterator<Item = &'a str> {
        m.get(k).into_iter().flat_map(|s| s.iter().map(String::as_str))
    }
}
