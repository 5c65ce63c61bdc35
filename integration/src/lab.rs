//! A lab declared in one place: hosts, zones, one tenant's VPCs, subnets,
//! security groups and VMs. One VM declaration makes both its namespace
//! (the compute side) and its port (the cloud platform's call), with its
//! MAC and addresses derived from its subnet; `start` builds the topology,
//! runs a controller and an agent per host, provisions everything in order
//! and routes each zoned VM's addresses in its zone's network.
//!
//! ```ignore
//! let lab = Lab::new("upg", &["h1", "h2"])
//!     .vpc("v", None)
//!     .subnet("s", "v", "10.30.0.0/24", "fd30::/64")
//!     .group("web", vec![ingress("http", false, "tcp", (80, 80), "", "")])
//!     .vm("vm1", "h1", "s", &["web"])
//!     .vm("vm2", "h2", "s", &["web"])
//!     .start()
//!     .await?;
//! assert!(lab.topo.reach("vm2", "vm1", "tcp", 80, false));
//! ```

use std::path::PathBuf;

use sdn_proto::v1 as pb;

use crate::cluster::Cluster;
use crate::ops::*;
use crate::Topology;

/// The tenant every lab object belongs to.
pub const TENANT: &str = "lab-tenant";

struct ZoneSpec {
    name: String,
    uplink: String,
    v4_net: String,
    v6_net: String,
    prefixes: Vec<String>,
    addresses: Vec<String>,
}

struct SubnetSpec {
    id: String,
    vpc: String,
    v4: Option<ipnetwork::Ipv4Network>,
    v6: Option<ipnetwork::Ipv6Network>,
    vms: u32,
}

struct VmSpec {
    name: String,
    host: String,
    subnet: String,
    groups: Vec<String>,
}

/// A lab being declared.
pub struct LabBuilder {
    tag: String,
    hosts: Vec<String>,
    zones: Vec<ZoneSpec>,
    vpcs: Vec<(String, Option<String>)>,
    subnets: Vec<SubnetSpec>,
    groups: Vec<(String, Vec<pb::SecurityGroupRule>)>,
    vms: Vec<VmSpec>,
    extra: Vec<pb::operation::Op>,
    agent: Option<(PathBuf, Vec<String>)>,
}

/// A running lab. (The cluster goes first when it is dropped: agents and
/// controller stop before their namespaces are removed.)
pub struct Lab {
    pub cluster: Cluster,
    pub topo: Topology,
}

impl Lab {
    /// Starts declaring a lab of `hosts` (namespaces `<tag>-<host>`).
    #[allow(clippy::new_ret_no_self)]
    pub fn new(tag: &str, hosts: &[&str]) -> LabBuilder {
        LabBuilder {
            tag: tag.into(),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            zones: Vec::new(),
            vpcs: Vec::new(),
            subnets: Vec::new(),
            groups: Vec::new(),
            vms: Vec::new(),
            extra: Vec::new(),
            agent: None,
        }
    }
}

impl LabBuilder {
    /// A zone: its network namespace with `addresses` on it, every host's
    /// uplink `uplink` into it, and the Zone object with `prefixes`.
    pub fn zone(
        mut self,
        name: &str,
        uplink: &str,
        v4_net: &str,
        v6_net: &str,
        prefixes: &[&str],
        addresses: &[&str],
    ) -> Self {
        self.zones.push(ZoneSpec {
            name: name.into(),
            uplink: uplink.into(),
            v4_net: v4_net.into(),
            v6_net: v6_net.into(),
            prefixes: prefixes.iter().map(|p| p.to_string()).collect(),
            addresses: addresses.iter().map(|a| a.to_string()).collect(),
        });
        self
    }

    /// A VPC, in a zone or isolated.
    pub fn vpc(mut self, id: &str, zone: Option<&str>) -> Self {
        self.vpcs.push((id.into(), zone.map(String::from)));
        self
    }

    /// A subnet of a VPC (either family may be empty).
    pub fn subnet(mut self, id: &str, vpc: &str, v4: &str, v6: &str) -> Self {
        self.subnets.push(SubnetSpec {
            id: id.into(),
            vpc: vpc.into(),
            v4: (!v4.is_empty()).then(|| v4.parse().expect("IPv4 subnet")),
            v6: (!v6.is_empty()).then(|| v6.parse().expect("IPv6 subnet")),
            vms: 0,
        });
        self
    }

    /// A security group.
    pub fn group(mut self, id: &str, rules: Vec<pb::SecurityGroupRule>) -> Self {
        self.groups.push((id.into(), rules));
        self
    }

    /// A VM on `host` in `subnet` with `groups`: its addresses are the
    /// subnet's 11th, 12th, ... in declaration order, its MAC follows.
    pub fn vm(mut self, name: &str, host: &str, subnet: &str, groups: &[&str]) -> Self {
        self.vms.push(VmSpec {
            name: name.into(),
            host: host.into(),
            subnet: subnet.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        });
        self
    }

    /// More objects, applied after the VMs' ports.
    pub fn then(mut self, ops: Vec<pb::operation::Op>) -> Self {
        self.extra.extend(ops);
        self
    }

    /// Runs every agent from another binary (an earlier release), with
    /// `extra` arguments instead of this agent's defaults.
    pub fn agent_binary(mut self, agent: PathBuf, extra: &[&str]) -> Self {
        self.agent = Some((agent, extra.iter().map(|s| s.to_string()).collect()));
        self
    }

    /// Builds and provisions the lab.
    pub async fn start(mut self) -> anyhow::Result<Lab> {
        let hosts: Vec<&str> = self.hosts.iter().map(String::as_str).collect();
        let mut topo = Topology::new(&self.tag, &hosts)?;
        for z in &self.zones {
            let p: Vec<&str> = z.prefixes.iter().map(String::as_str).collect();
            let a: Vec<&str> = z.addresses.iter().map(String::as_str).collect();
            topo.add_zone(&z.name, &z.uplink, &z.v4_net, &z.v6_net, &p, &a)?;
        }
        // Addresses and ports, in declaration order within each subnet.
        let mut ports = Vec::new();
        let mut announce = Vec::new();
        for (i, v) in self.vms.iter().enumerate() {
            let sn = self
                .subnets
                .iter_mut()
                .find(|s| s.id == v.subnet)
                .ok_or_else(|| anyhow::anyhow!("vm {}: no subnet {}", v.name, v.subnet))?;
            sn.vms += 1;
            let n = 10 + sn.vms;
            let v4 = sn.v4.map(|s| (s, std::net::Ipv4Addr::from(u32::from(s.network()) + n)));
            let v6 = sn
                .v6
                .map(|s| (s, std::net::Ipv6Addr::from(u128::from(s.network()) + n as u128)));
            let mac = format!("02:1a:{:02x}:00:{:02x}:{:02x}", i / 256, i % 256, n);
            let cidr4 = v4.map(|(s, a)| format!("{a}/{}", s.prefix())).unwrap_or_default();
            let cidr6 = v6.map(|(s, a)| format!("{a}/{}", s.prefix())).unwrap_or_default();
            topo.add_vm(&v.name, &v.host, &mac, &cidr4, &cidr6)?;
            let a4 = v4.map(|(_, a)| a.to_string()).unwrap_or_default();
            let a6 = v6.map(|(_, a)| a.to_string()).unwrap_or_default();
            let groups: Vec<&str> = v.groups.iter().map(String::as_str).collect();
            let device = topo.vm(&v.name).device.clone();
            ports.push(port(
                &v.name, TENANT, &v.subnet, &v.host, &device, &mac, &a4, &a6, &groups,
            ));
            let vpc = &self.subnets.iter().find(|s| s.id == v.subnet).expect("found above").vpc;
            if let Some((_, Some(zone))) = self.vpcs.iter().find(|(id, _)| id == vpc) {
                announce.push((zone.clone(), v.name.clone()));
            }
        }
        let mut cluster = Cluster::start(&topo.dir)?;
        // Hosts first: every host receives the zones, so its agent must run
        // before a batch with zones can be enforced.
        let host_ops = hosts.iter().map(|h| host(h, &topo.underlay_ip(h))).collect();
        cluster.apply(host_ops).await?;
        for h in &hosts {
            match &self.agent {
                Some((bin, extra)) => {
                    let e: Vec<&str> = extra.iter().map(String::as_str).collect();
                    cluster.start_agent_binary(&topo, h, bin, &e)?
                }
                None => cluster.start_agent(&topo, h)?,
            }
        }
        let mut ops = Vec::new();
        for z in &self.zones {
            let p: Vec<&str> = z.prefixes.iter().map(String::as_str).collect();
            ops.push(zone(&z.name, &p, &z.uplink));
        }
        ops.push(tenant(TENANT));
        for (id, zone) in &self.vpcs {
            ops.push(match zone {
                Some(z) => vpc_in_zone(id, TENANT, z),
                None => vpc(id, TENANT),
            });
        }
        for s in &self.subnets {
            let v4 = s.v4.map(|n| n.to_string()).unwrap_or_default();
            let v6 = s.v6.map(|n| n.to_string()).unwrap_or_default();
            ops.push(subnet(&s.id, &s.vpc, &v4, &v6));
        }
        for (id, rules) in &self.groups {
            ops.push(group(id, TENANT, rules.clone()));
        }
        cluster.apply(ops).await?;
        let r = cluster.apply(ports).await?;
        anyhow::ensure!(r.enforced, "the lab's ports were not enforced on every host");
        if !self.extra.is_empty() {
            cluster.apply(std::mem::take(&mut self.extra)).await?;
        }
        for (z, vm) in announce {
            topo.announce(&z, &vm)?;
        }
        Ok(Lab { topo, cluster })
    }
}
