//! The network as a graph, for the topology page and `sdnctl topology`:
//! zones, the VPCs whose uplink they carry, subnets, ports (on their
//! hosts, with their security groups), exchange paths between zones and
//! peerings between VPCs. One model, rendered as JSON for the page and as
//! text for the terminal, so the two always say the same.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use sdn_policies::{QuarantineTarget, State};
use serde::Serialize;

#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Topology {
    pub revision: u64,
    pub zones: Vec<Zone>,
    pub vpcs: Vec<Vpc>,
    pub subnets: Vec<Subnet>,
    pub hosts: Vec<Host>,
    pub ports: Vec<Port>,
    pub security_groups: Vec<Group>,
    pub exchange_paths: Vec<Path>,
    pub peerings: Vec<Peering>,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Zone {
    pub id: String,
    pub name: String,
    pub prefixes: Vec<String>,
    pub uplink: String,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Vpc {
    pub id: String,
    pub name: String,
    pub tenant: String,
    /// Empty: isolated, no uplink.
    pub zone: String,
    pub vni: u32,
    /// The border firewall toward the zone; empty: none.
    pub border_policy: String,
    pub quarantined: bool,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Subnet {
    pub id: String,
    pub vpc: String,
    pub cidrs: Vec<String>,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Host {
    pub id: String,
    pub underlay: String,
    pub ports: usize,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Port {
    pub id: String,
    pub subnet: String,
    pub host: String,
    pub tenant: String,
    pub addresses: Vec<String>,
    pub security_groups: Vec<String>,
    pub vm: String,
    pub quarantined: bool,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Group {
    pub id: String,
    pub name: String,
    pub tenant: String,
    pub rules: usize,
    pub ports: usize,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Path {
    pub id: String,
    pub from_zone: String,
    pub to_zone: String,
    pub source: String,
    pub destination: String,
    pub protocol: String,
    pub ports: String,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Peering {
    pub id: String,
    pub vpc_a: String,
    pub vpc_b: String,
    /// The VPC firewall between them; empty: none.
    pub policy: String,
}

impl Topology {
    /// The graph of `state` at `revision`.
    pub fn of(state: &State, revision: u64) -> Topology {
        let mut quarantined_ports = BTreeSet::new();
        let mut quarantined_vpcs = BTreeSet::new();
        for q in state.quarantines.values() {
            match q.target {
                QuarantineTarget::Port => {
                    quarantined_ports.insert(q.target_id.as_str());
                }
                QuarantineTarget::Vpc => {
                    quarantined_vpcs.insert(q.target_id.as_str());
                }
                QuarantineTarget::Vm => {
                    for p in state
                        .ports
                        .values()
                        .filter(|p| !p.vm_id.is_empty() && p.vm_id == q.target_id)
                    {
                        quarantined_ports.insert(p.id.as_str());
                    }
                }
            }
        }
        let vpc_of_subnet: BTreeMap<&str, &str> = state
            .subnets
            .values()
            .map(|s| (s.id.as_str(), s.vpc_id.as_str()))
            .collect();
        let mut ports_on_host: BTreeMap<&str, usize> = BTreeMap::new();
        let mut ports_in_group: BTreeMap<&str, usize> = BTreeMap::new();
        for p in state.ports.values() {
            *ports_on_host.entry(p.host_id.as_str()).or_default() += 1;
            for g in &p.security_group_ids {
                *ports_in_group.entry(g.as_str()).or_default() += 1;
            }
        }
        Topology {
            revision,
            zones: state
                .zones
                .values()
                .map(|z| Zone {
                    id: z.id.clone(),
                    name: z.name.clone(),
                    prefixes: z.prefixes.iter().map(|p| p.to_string()).collect(),
                    uplink: z.uplink_device.clone(),
                })
                .collect(),
            vpcs: state
                .vpcs
                .values()
                .map(|v| Vpc {
                    id: v.id.clone(),
                    name: v.name.clone(),
                    tenant: v.tenant_id.clone(),
                    zone: v.zone_id.clone(),
                    vni: v.vni,
                    border_policy: v.border_policy_id.clone(),
                    quarantined: quarantined_vpcs.contains(v.id.as_str()),
                })
                .collect(),
            subnets: state
                .subnets
                .values()
                .map(|s| Subnet {
                    id: s.id.clone(),
                    vpc: s.vpc_id.clone(),
                    cidrs: s
                        .cidr_v4
                        .map(|c| c.to_string())
                        .into_iter()
                        .chain(s.cidr_v6.map(|c| c.to_string()))
                        .collect(),
                })
                .collect(),
            hosts: state
                .hosts
                .values()
                .map(|h| Host {
                    id: h.id.clone(),
                    underlay: h.underlay_ip.to_string(),
                    ports: ports_on_host.get(h.id.as_str()).copied().unwrap_or(0),
                })
                .collect(),
            ports: state
                .ports
                .values()
                .map(|p| Port {
                    id: p.id.clone(),
                    subnet: p.subnet_id.clone(),
                    host: p.host_id.clone(),
                    tenant: p.tenant_id.clone(),
                    addresses: p
                        .ipv4
                        .map(|a| a.to_string())
                        .into_iter()
                        .chain(p.ipv6.map(|a| a.to_string()))
                        .collect(),
                    security_groups: p.security_group_ids.clone(),
                    vm: p.vm_id.clone(),
                    quarantined: quarantined_ports.contains(p.id.as_str())
                        || vpc_of_subnet
                            .get(p.subnet_id.as_str())
                            .is_some_and(|v| quarantined_vpcs.contains(v)),
                })
                .collect(),
            security_groups: state
                .security_groups
                .values()
                .map(|g| Group {
                    id: g.id.clone(),
                    name: g.name.clone(),
                    tenant: g.tenant_id.clone(),
                    rules: g.rules.len(),
                    ports: ports_in_group.get(g.id.as_str()).copied().unwrap_or(0),
                })
                .collect(),
            exchange_paths: state
                .exchange_paths
                .values()
                .map(|e| Path {
                    id: e.id.clone(),
                    from_zone: e.from_zone.clone(),
                    to_zone: e.to_zone.clone(),
                    source: e.source.to_string(),
                    destination: e.destination.to_string(),
                    protocol: format!("{:?}", e.protocol).to_lowercase(),
                    ports: if e.ports.0 == e.ports.1 {
                        e.ports.0.to_string()
                    } else {
                        format!("{}-{}", e.ports.0, e.ports.1)
                    },
                })
                .collect(),
            peerings: state
                .peerings
                .values()
                .map(|p| Peering {
                    id: p.id.clone(),
                    vpc_a: p.vpc_a.clone(),
                    vpc_b: p.vpc_b.clone(),
                    policy: p.policy_id.clone(),
                })
                .collect(),
        }
    }

    /// The same as an indented tree, for a terminal: zone, VPC, subnet,
    /// port; then the exchange paths, peerings, hosts and security groups.
    /// Names come from tenants: control characters are escaped, so a name
    /// cannot move the cursor or recolour the terminal.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "topology at revision {}", self.revision);
        // Children by parent, each list in the parent's order.
        let known: BTreeSet<&str> = self.zones.iter().map(|z| z.id.as_str()).collect();
        let mut vpcs: BTreeMap<&str, Vec<&Vpc>> = BTreeMap::new();
        for v in &self.vpcs {
            // "" gathers the isolated VPCs, and those of a zone not found.
            let zone = if known.contains(v.zone.as_str()) {
                v.zone.as_str()
            } else {
                ""
            };
            vpcs.entry(zone).or_default().push(v);
        }
        let mut subnets: BTreeMap<&str, Vec<&Subnet>> = BTreeMap::new();
        for s in &self.subnets {
            subnets.entry(s.vpc.as_str()).or_default().push(s);
        }
        let mut ports: BTreeMap<&str, Vec<&Port>> = BTreeMap::new();
        for p in &self.ports {
            ports.entry(p.subnet.as_str()).or_default().push(p);
        }
        let mut zones: Vec<(&str, String)> = self
            .zones
            .iter()
            .map(|z| {
                (
                    z.id.as_str(),
                    format!(
                        "zone {}{} prefixes {} uplink {}",
                        t(&z.id),
                        named(&z.name, &z.id),
                        list(&z.prefixes),
                        t(&z.uplink)
                    ),
                )
            })
            .collect();
        if vpcs.contains_key("") {
            zones.push(("", "no zone (isolated VPCs)".into()));
        }
        for (zone, line) in &zones {
            let _ = writeln!(out, "{line}");
            for v in vpcs.get(zone).map(Vec::as_slice).unwrap_or_default() {
                let border = if v.border_policy.is_empty() {
                    String::new()
                } else {
                    format!(" border {}", t(&v.border_policy))
                };
                let _ = writeln!(
                    out,
                    "  vpc {}{} tenant {} vni {}{border}{}",
                    t(&v.id),
                    named(&v.name, &v.id),
                    t(&v.tenant),
                    v.vni,
                    if v.quarantined { " QUARANTINED" } else { "" }
                );
                for s in subnets.get(v.id.as_str()).map(Vec::as_slice).unwrap_or_default() {
                    let _ = writeln!(out, "    subnet {} {}", t(&s.id), list(&s.cidrs));
                    for p in ports.get(s.id.as_str()).map(Vec::as_slice).unwrap_or_default() {
                        let groups = if p.security_groups.is_empty() {
                            "no security group".to_string()
                        } else {
                            format!("groups {}", list(&p.security_groups))
                        };
                        let vm = if p.vm.is_empty() {
                            String::new()
                        } else {
                            format!(" vm {}", t(&p.vm))
                        };
                        let _ = writeln!(
                            out,
                            "      port {} {} on {}{vm} {groups}{}",
                            t(&p.id),
                            list(&p.addresses),
                            t(&p.host),
                            if p.quarantined { " QUARANTINED" } else { "" }
                        );
                    }
                }
            }
        }
        let _ = writeln!(out, "exchange paths: {}", self.exchange_paths.len());
        for e in &self.exchange_paths {
            let _ = writeln!(
                out,
                "  {} {} -> {} {} {} from {} to {}",
                t(&e.id),
                t(&e.from_zone),
                t(&e.to_zone),
                t(&e.protocol),
                t(&e.ports),
                t(&e.source),
                t(&e.destination)
            );
        }
        let _ = writeln!(out, "peerings: {}", self.peerings.len());
        for p in &self.peerings {
            let policy = if p.policy.is_empty() {
                String::new()
            } else {
                format!(" through {}", t(&p.policy))
            };
            let _ = writeln!(out, "  {} {} <-> {}{policy}", t(&p.id), t(&p.vpc_a), t(&p.vpc_b));
        }
        let _ = writeln!(out, "hosts: {}", self.hosts.len());
        for h in &self.hosts {
            let _ = writeln!(out, "  {} {} ports {}", t(&h.id), t(&h.underlay), h.ports);
        }
        let _ = writeln!(out, "security groups: {}", self.security_groups.len());
        for g in &self.security_groups {
            let _ = writeln!(
                out,
                "  {}{} tenant {} rules {} ports {}",
                t(&g.id),
                named(&g.name, &g.id),
                t(&g.tenant),
                g.rules,
                g.ports
            );
        }
        out
    }
}

/// `s` with control characters, and those that change how the text
/// around them reads (bidirectional overrides, invisible joiners), escaped.
fn t(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if sdn_proto::syslog::deceptive(c) {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        } else {
            out.push(c);
        }
    }
    out
}

fn named(name: &str, id: &str) -> String {
    if name.is_empty() || name == id {
        String::new()
    } else {
        format!(" \"{}\"", t(&name.replace('\\', "\\\\").replace('"', "\\\"")))
    }
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "-".into()
    } else {
        items.iter().map(|s| t(s)).collect::<Vec<_>>().join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sdn_policies::model::*;

    fn state() -> State {
        let mut s = State::default();
        s.tenants.insert(
            "acme".into(),
            Tenant {
                id: "acme".into(),
                name: "Acme".into(),
            },
        );
        s.zones.insert(
            "extranet".into(),
            sdn_policies::model::Zone {
                id: "extranet".into(),
                name: "e-gov extranet".into(),
                prefixes: vec!["10.200.0.0/16".parse().unwrap()],
                uplink_device: "ext0".into(),
            },
        );
        for (id, zone) in [("v1", "extranet"), ("v2", "")] {
            s.vpcs.insert(
                id.into(),
                sdn_policies::model::Vpc {
                    id: id.into(),
                    tenant_id: "acme".into(),
                    name: format!("{id}\x1b[31m"),
                    vni: 100,
                    zone_id: zone.into(),
                    border_policy_id: String::new(),
                },
            );
        }
        s.subnets.insert(
            "s1".into(),
            sdn_policies::model::Subnet {
                id: "s1".into(),
                vpc_id: "v2".into(),
                cidr_v4: Some("10.1.0.0/24".parse().unwrap()),
                cidr_v6: None,
            },
        );
        s.ports.insert(
            "p1".into(),
            sdn_policies::model::Port {
                id: "p1".into(),
                tenant_id: "acme".into(),
                subnet_id: "s1".into(),
                host_id: "h1".into(),
                device: "tap1".into(),
                mac: "02:00:00:00:00:01".parse().unwrap(),
                ipv4: Some("10.1.0.5".parse().unwrap()),
                ipv6: None,
                security_group_ids: vec!["web".into()],
                vm_id: "vm1".into(),
            },
        );
        s.quarantines.insert(
            "q".into(),
            Quarantine {
                id: "q".into(),
                target: QuarantineTarget::Vpc,
                target_id: "v2".into(),
                reason: "incident".into(),
                expires_unix_ms: None,
            },
        );
        s
    }

    #[test]
    fn the_tree_puts_each_object_under_its_parent_and_escapes_names() {
        let topo = Topology::of(&state(), 7);
        assert!(topo.ports[0].quarantined, "a port of a quarantined VPC is quarantined");
        let text = topo.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "topology at revision 7");
        assert_eq!(
            lines[1],
            "zone extranet \"e-gov extranet\" prefixes 10.200.0.0/16 uplink ext0"
        );
        assert_eq!(lines[2], "  vpc v1 \"v1\\u{1b}[31m\" tenant acme vni 100");
        assert_eq!(lines[3], "no zone (isolated VPCs)");
        assert_eq!(lines[4], "  vpc v2 \"v2\\u{1b}[31m\" tenant acme vni 100 QUARANTINED");
        assert_eq!(lines[5], "    subnet s1 10.1.0.0/24");
        assert_eq!(lines[6], "      port p1 10.1.0.5 on h1 vm vm1 groups web QUARANTINED");
        assert!(!text.contains('\x1b'), "{text}");
    }
}
