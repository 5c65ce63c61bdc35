//! A lab declared in one place: hosts, zones, tenants, VPCs, subnets,
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

struct VpcSpec {
    id: String,
    tenant: String,
    zone: Option<String>,
    vni: u32,
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
    tenants: Vec<String>,
    vpcs: Vec<VpcSpec>,
    subnets: Vec<SubnetSpec>,
    /// (id, tenant, rules)
    groups: Vec<(String, String, Vec<pb::SecurityGroupRule>)>,
    vms: Vec<VmSpec>,
    /// (zone, VM): routes beyond each VM's own zone.
    announce: Vec<(String, String)>,
    extra: Vec<pb::operation::Op>,
    agent: Option<(PathBuf, Vec<String>)>,
    agent_args: Vec<String>,
    controller_args: Vec<String>,
    secure: bool,
}

/// A running lab. (The cluster goes first when it is dropped: agents and
/// controller stop before their namespaces are removed.)
pub struct Lab {
    pub cluster: Cluster,
    pub topo: Topology,
    /// Every VM's port, as provisioned.
    pub ports: Vec<pb::Port>,
}

impl Lab {
    /// Starts declaring a lab of `hosts` (namespaces `<tag>-<host>`).
    #[allow(clippy::new_ret_no_self)]
    pub fn new(tag: &str, hosts: &[&str]) -> LabBuilder {
        LabBuilder {
            tag: tag.into(),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            zones: Vec::new(),
            tenants: Vec::new(),
            vpcs: Vec::new(),
            subnets: Vec::new(),
            groups: Vec::new(),
            vms: Vec::new(),
            announce: Vec::new(),
            extra: Vec::new(),
            agent: None,
            agent_args: Vec::new(),
            controller_args: Vec::new(),
            secure: false,
        }
    }

    /// Every counter of a host's dataplane: drops by reason and stats.
    pub fn drops(&self, host: &str) -> anyhow::Result<serde_json::Value> {
        self.cluster.drops(&self.topo, host)
    }

    /// nginx in a VM: answers every GET on 8080, both families, with its name
    /// and the client's address as it sees it.
    pub fn nginx(&self, vm: &str) -> crate::Proc {
        let dir = self.topo.dir.join(format!("nginx-{vm}"));
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        let conf = dir.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "master_process off;\ndaemon off;\npid {d}/nginx.pid;\nerror_log stderr;\nevents {{}}\n\
                 http {{\n  access_log off;\n  client_body_temp_path {d}/tmp;\n  proxy_temp_path {d}/tmp;\n  \
                 fastcgi_temp_path {d}/tmp;\n  uwsgi_temp_path {d}/tmp;\n  scgi_temp_path {d}/tmp;\n  \
                 server {{\n    listen 8080;\n    listen [::]:8080;\n    location / {{ return 200 \"{vm} $remote_addr\\n\"; }}\n    location = /unwell {{ return 503; }}\n  }}\n}}\n",
                d = dir.display()
            ),
        )
        .unwrap();
        let ns = self.topo.vm(vm).ns.name.clone();
        crate::Proc::spawn(
            &format!("nginx-{vm}"),
            Some(&ns),
            std::path::Path::new("/usr/sbin/nginx"),
            &["-c", conf.to_str().unwrap(), "-p", dir.to_str().unwrap()],
            &self.topo.dir,
        )
        .unwrap()
    }

    /// One counter of a host's dataplane: `group` is "drops" or "stats".
    pub fn counter(&self, host: &str, group: &str, name: &str) -> u64 {
        self.cluster.counter(&self.topo, host, group, name)
    }

    /// A VM's port as the lab provisioned it, with `groups` instead of its
    /// own: to move the VM between groups.
    pub fn port(&self, vm: &str, groups: &[&str]) -> pb::operation::Op {
        let p = self.ports.iter().find(|p| p.id == vm).expect("a VM of the lab");
        pb::operation::Op::PutPort(pb::Port {
            security_group_ids: groups.iter().map(|g| g.to_string()).collect(),
            ..p.clone()
        })
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

    /// A tenant: the VPCs and groups declared after it are its own (until
    /// the next tenant). Without one, everything belongs to [`TENANT`].
    pub fn tenant(mut self, id: &str) -> Self {
        self.tenants.push(id.into());
        self
    }

    fn current_tenant(&self) -> String {
        self.tenants.last().map_or(TENANT, String::as_str).into()
    }

    /// A VPC, in a zone or isolated.
    pub fn vpc(mut self, id: &str, zone: Option<&str>) -> Self {
        let tenant = self.current_tenant();
        self.vpcs.push(VpcSpec {
            id: id.into(),
            tenant,
            zone: zone.map(String::from),
            vni: 0,
        });
        self
    }

    /// An isolated VPC with the VNI given (instead of one the store picks).
    pub fn vpc_vni(mut self, id: &str, vni: u32) -> Self {
        self = self.vpc(id, None);
        self.vpcs.last_mut().expect("just declared").vni = vni;
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
        let tenant = self.current_tenant();
        self.groups.push((id.into(), tenant, rules));
        self
    }

    /// A VM on `host` in `subnet` with `groups`: its addresses are the
    /// subnet's 11th, 12th, ... in declaration order (the IPv6 one ends in
    /// the same digits: 10.0.0.11 and fd00::11), its MAC follows.
    pub fn vm(mut self, name: &str, host: &str, subnet: &str, groups: &[&str]) -> Self {
        self.vms.push(VmSpec {
            name: name.into(),
            host: host.into(),
            subnet: subnet.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        });
        self
    }

    /// Routes a VM's addresses in the network of a zone its VPC is not in
    /// too (where exchange paths reach it from); a VM of a zoned VPC is
    /// routed in its own zone anyway.
    pub fn announce(mut self, zone: &str, vm: &str) -> Self {
        self.announce.push((zone.into(), vm.into()));
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

    /// More flags for the controller.
    pub fn controller_args(mut self, args: &[&str]) -> Self {
        self.controller_args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// A controller that authenticates every caller by its certificate
    /// ([`Cluster::start_secure`]): agents hold their hosts' certificates
    /// (and carry flows to one another over mutual TLS).
    pub fn secure(mut self) -> Self {
        self.secure = true;
        self
    }

    /// Runs every agent with `args` besides its defaults.
    pub fn agent_args(mut self, args: &[&str]) -> Self {
        self.agent_args = args.iter().map(|s| s.to_string()).collect();
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
            let digits = u128::from_str_radix(&n.to_string(), 16).expect("decimal digits");
            let v6 = sn
                .v6
                .map(|s| (s, std::net::Ipv6Addr::from(u128::from(s.network()) + digits)));
            let mac = format!("02:1a:{:02x}:00:{:02x}:{:02x}", i / 256, i % 256, n);
            let cidr4 = v4.map(|(s, a)| format!("{a}/{}", s.prefix())).unwrap_or_default();
            let cidr6 = v6.map(|(s, a)| format!("{a}/{}", s.prefix())).unwrap_or_default();
            topo.add_vm(&v.name, &v.host, &mac, &cidr4, &cidr6)?;
            let groups: Vec<&str> = v.groups.iter().map(String::as_str).collect();
            let vpc_id = &self.subnets.iter().find(|s| s.id == v.subnet).expect("found above").vpc;
            let vpc = self
                .vpcs
                .iter()
                .find(|p| &p.id == vpc_id)
                .ok_or_else(|| anyhow::anyhow!("subnet {}: no VPC {vpc_id}", v.subnet))?;
            ports.push(topo.port(&v.name, &vpc.tenant, &v.subnet, &groups));
            if let Some(zone) = &vpc.zone {
                announce.push((zone.clone(), v.name.clone()));
            }
        }
        announce.append(&mut self.announce);
        let flags: Vec<&str> = self.controller_args.iter().map(String::as_str).collect();
        let mut cluster = if self.secure {
            // The platform's operations as the platform, the rest (zones,
            // exposure, hosts holding VIPs) as an administrator.
            let mut c = Cluster::start_secure_with(&topo.dir, &flags)?;
            c.apply_by_roles();
            c
        } else {
            Cluster::start_with_flags(&topo.dir, &flags)?
        };
        cluster.agent_extra = std::mem::take(&mut self.agent_args);
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
        if self.tenants.is_empty() {
            self.tenants.push(TENANT.into());
        }
        ops.extend(self.tenants.iter().map(|t| tenant(t)));
        for v in &self.vpcs {
            ops.push(match &v.zone {
                Some(z) => vpc_in_zone(&v.id, &v.tenant, z),
                None => vpc_vni(&v.id, &v.tenant, v.vni),
            });
        }
        for s in &self.subnets {
            let v4 = s.v4.map(|n| n.to_string()).unwrap_or_default();
            let v6 = s.v6.map(|n| n.to_string()).unwrap_or_default();
            ops.push(subnet(&s.id, &s.vpc, &v4, &v6));
        }
        for (id, tenant, rules) in &self.groups {
            ops.push(group(id, tenant, rules.clone()));
        }
        cluster.apply(ops).await?;
        let r = cluster.apply(ports.clone()).await?;
        anyhow::ensure!(r.enforced, "the lab's ports were not enforced on every host");
        for v in &self.vms {
            anyhow::ensure!(
                r.hosts.contains(&v.host),
                "the lab's ports were not enforced on {} (enforced on {:?})",
                v.host,
                r.hosts
            );
        }
        if !self.extra.is_empty() {
            cluster.apply(std::mem::take(&mut self.extra)).await?;
        }
        for (z, vm) in announce {
            topo.announce(&z, &vm)?;
        }
        let ports = ports
            .into_iter()
            .filter_map(|op| match op {
                pb::operation::Op::PutPort(p) => Some(p),
                _ => None,
            })
            .collect();
        Ok(Lab { topo, cluster, ports })
    }
}
