//! Hosts joined by a routed underlay, zones as networks behind the hosts'
//! uplinks, and VMs as namespaces behind veths, the way a compute driver
//! plugs them.

use std::path::PathBuf;
use std::time::Duration;

use crate::netns::Netns;
use crate::proc::Proc;
use crate::shell::{bin, sh};

/// A VM: its namespace, port identity and addresses.
pub struct Vm {
    pub ns: Netns,
    pub host: String,
    pub device: String,
    pub mac: String,
    pub v4: String,
    pub v6: String,
}

/// Hosts joined by a routed underlay, and VMs on them.
pub struct Topology {
    pub tag: String,
    pub hosts: Vec<(String, Netns, String, String)>,
    pub vms: Vec<Vm>,
    /// Zones: (name, namespace, IPv4 /24 prefix "a.b.c", IPv6 /64 prefix "x:y").
    pub zones: Vec<(String, Netns, String, String)>,
    pub dir: PathBuf,
}

impl Topology {
    /// Creates `hosts` host namespaces on one underlay segment (a bridge-free
    /// star: each host has a veth to a small router namespace).
    pub fn new(tag: &str, hosts: &[&str]) -> anyhow::Result<Topology> {
        let dir = std::env::temp_dir().join(format!("sdn-{tag}"));
        // An interrupted earlier run may have left its bpffs mounted here.
        let _ = sh(&["umount", "-l", dir.join("bpffs").to_str().unwrap()]);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let mut t = Topology {
            tag: tag.to_string(),
            hosts: Vec::new(),
            vms: Vec::new(),
            zones: Vec::new(),
            dir,
        };
        // Underlay: a router namespace with one veth per host.
        let router = Netns::new(&format!("{tag}-fabric"))?;
        router.sysctl("net.ipv4.ip_forward=1")?;
        router.sysctl("net.ipv6.conf.all.forwarding=1")?;
        for (i, h) in hosts.iter().enumerate() {
            let n = i + 1;
            let ns = Netns::new(&format!("{tag}-{h}"))?;
            let (a, b) = (format!("{tag}u{n}"), format!("{tag}f{n}"));
            sh(&[
                "ip",
                "link",
                "add",
                &a,
                "netns",
                &ns.name,
                "type",
                "veth",
                "peer",
                "name",
                &b,
                "netns",
                &router.name,
            ])?;
            ns.sh(&["ip", "link", "set", &a, "name", "ul0"])?;
            ns.sh(&["ip", "addr", "add", &format!("192.168.{n}.2/24"), "dev", "ul0"])?;
            ns.sh(&[
                "ip",
                "-6",
                "addr",
                "add",
                &format!("fd99:{n}::2/64"),
                "dev",
                "ul0",
                "nodad",
            ])?;
            ns.sh(&["ip", "link", "set", "ul0", "up"])?;
            // Only the underlay goes through the fabric; zones get their own
            // uplinks (Topology::add_zone).
            ns.sh(&["ip", "route", "add", "192.168.0.0/16", "via", &format!("192.168.{n}.1")])?;
            ns.sh(&["ip", "-6", "route", "add", "fd99::/16", "via", &format!("fd99:{n}::1")])?;
            ns.sysctl("net.ipv4.ip_forward=1")?;
            ns.sysctl("net.ipv6.conf.all.forwarding=1")?;
            router.sh(&["ip", "addr", "add", &format!("192.168.{n}.1/24"), "dev", &b])?;
            router.sh(&[
                "ip",
                "-6",
                "addr",
                "add",
                &format!("fd99:{n}::1/64"),
                "dev",
                &b,
                "nodad",
            ])?;
            router.sh(&["ip", "link", "set", &b, "up"])?;
            t.hosts
                .push((h.to_string(), ns, format!("192.168.{n}.2"), format!("fd99:{n}::2")));
        }
        // Keep the router alive as long as the topology: store it as a pseudo host.
        t.hosts.push(("fabric".into(), router, String::new(), String::new()));
        Ok(t)
    }

    /// Adds a zone: a namespace `<tag>-z<name>` acting as the zone's network,
    /// with a bridge every host's uplink device (`uplink`) joins. The zone
    /// router is `<v4 net>.1` / `<v6 net>::1`; host i gets `.1i`. Each host
    /// routes the zone's `prefixes` through its uplink. `addresses` are put
    /// on the zone's loopback: machines of the zone.
    pub fn add_zone(
        &mut self,
        name: &str,
        uplink: &str,
        v4_net: &str,
        v6_net: &str,
        prefixes: &[&str],
        addresses: &[&str],
    ) -> anyhow::Result<()> {
        let ns = Netns::new(&format!("{}-z{name}", self.tag))?;
        ns.sysctl("net.ipv4.ip_forward=1")?;
        ns.sysctl("net.ipv6.conf.all.forwarding=1")?;
        ns.sysctl("net.ipv6.conf.default.accept_dad=0")?;
        ns.sh(&["ip", "link", "set", "lo", "up"])?;
        ns.sh(&["ip", "link", "add", "br0", "type", "bridge"])?;
        ns.sh(&["ip", "link", "set", "br0", "up"])?;
        ns.sh(&["ip", "addr", "add", &format!("{v4_net}.1/24"), "dev", "br0"])?;
        ns.sh(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{v6_net}::1/64"),
            "dev",
            "br0",
            "nodad",
        ])?;
        for a in addresses {
            let plen = if a.contains(':') { "128" } else { "32" };
            ns.sh(&["ip", "addr", "add", &format!("{a}/{plen}"), "dev", "lo"])?;
        }
        let hosts: Vec<(String, String)> = self
            .hosts
            .iter()
            .filter(|h| h.0 != "fabric")
            .map(|h| (h.0.clone(), h.1.name.clone()))
            .collect();
        for (i, (h, hns)) in hosts.iter().enumerate() {
            let peer = format!("{}{}{}", self.tag, name.chars().next().unwrap_or('z'), i + 1);
            sh(&[
                "ip", "link", "add", uplink, "netns", hns, "type", "veth", "peer", "name", &peer, "netns", &ns.name,
            ])?;
            ns.sh(&["ip", "link", "set", &peer, "master", "br0", "up"])?;
            let hn = self.host_ns(h);
            hn.sysctl(&format!("net.ipv6.conf.{uplink}.accept_dad=0")).ok();
            hn.sh(&["ip", "addr", "add", &format!("{v4_net}.{}/24", 11 + i), "dev", uplink])?;
            hn.sh(&[
                "ip",
                "-6",
                "addr",
                "add",
                &format!("{v6_net}::{}/64", 11 + i),
                "dev",
                uplink,
                "nodad",
            ])?;
            hn.sh(&["ip", "link", "set", uplink, "up"])?;
            for p in prefixes {
                let (fam, gw) = if p.contains(':') {
                    ("-6", format!("{v6_net}::1"))
                } else {
                    ("-4", format!("{v4_net}.1"))
                };
                let dst = if *p == "0.0.0.0/0" || *p == "::/0" {
                    "default"
                } else {
                    p
                };
                hn.sh(&["ip", fam, "route", "add", dst, "via", &gw, "dev", uplink])?;
            }
        }
        self.zones
            .push((name.to_string(), ns, v4_net.to_string(), v6_net.to_string()));
        Ok(())
    }

    /// The zone's network namespace.
    pub fn zone_ns(&self, name: &str) -> &Netns {
        &self.zones.iter().find(|z| z.0 == name).expect("known zone").1
    }

    /// Routes a VM's addresses in a zone's network to the VM's host, as the
    /// host would announce them.
    pub fn announce(&self, zone: &str, vm: &str) -> anyhow::Result<()> {
        let z = self.zones.iter().find(|z| z.0 == zone).expect("known zone");
        let v = self.vm(vm);
        let i = self
            .hosts
            .iter()
            .filter(|h| h.0 != "fabric")
            .position(|h| h.0 == v.host)
            .expect("known host");
        if !v.v4.is_empty() {
            z.1.sh(&[
                "ip",
                "route",
                "add",
                &format!("{}/32", v.v4),
                "via",
                &format!("{}.{}", z.2, 11 + i),
            ])?;
        }
        if !v.v6.is_empty() {
            z.1.sh(&[
                "ip",
                "-6",
                "route",
                "add",
                &format!("{}/128", v.v6),
                "via",
                &format!("{}::{}", z.3, 11 + i),
            ])?;
        }
        Ok(())
    }

    pub fn host_ns(&self, host: &str) -> &Netns {
        &self.hosts.iter().find(|h| h.0 == host).expect("known host").1
    }

    pub fn underlay_ip(&self, host: &str) -> String {
        self.hosts.iter().find(|h| h.0 == host).expect("known host").2.clone()
    }

    /// Creates a VM on `host` the way a compute driver would: a namespace,
    /// a veth whose host end is `device`, the port's MAC, its addresses with
    /// their subnet prefix (`10.0.0.5/24`, `fd00::5/64`; either may be empty)
    /// and default routes via the subnet gateways (the first address of each
    /// prefix). The MTU leaves room for the VXLAN header on a 1500 underlay.
    pub fn add_vm(&mut self, name: &str, host: &str, mac: &str, v4: &str, v6: &str) -> anyhow::Result<()> {
        let ns = Netns::new(&format!("{}-{name}", self.tag))?;
        let device = format!("{}{}", &name[..name.len().min(8)], "h");
        let hns = self.host_ns(host).name.clone();
        let tmp = format!("{}t{}", self.tag, self.vms.len());
        sh(&[
            "ip", "link", "add", &tmp, "netns", &ns.name, "type", "veth", "peer", "name", &device, "netns", &hns,
        ])?;
        ns.sh(&["ip", "link", "set", &tmp, "name", "eth0"])?;
        ns.sysctl("net.ipv6.conf.all.accept_dad=0")?;
        ns.sysctl("net.ipv6.conf.default.accept_dad=0")?;
        ns.sysctl("net.ipv6.conf.eth0.accept_dad=0")?;
        ns.sysctl("net.ipv6.conf.eth0.addr_gen_mode=0")?;
        ns.sh(&["ip", "link", "set", "eth0", "address", mac, "mtu", "1450"])?;
        ns.sh(&["ip", "link", "set", "eth0", "up"])?;
        ns.sh(&["ip", "link", "set", "lo", "up"])?;
        let (mut a4, mut a6) = (String::new(), String::new());
        if !v4.is_empty() {
            let n: ipnetwork::Ipv4Network = v4.parse()?;
            let gw = std::net::Ipv4Addr::from(u32::from(n.network()) + 1);
            ns.sh(&["ip", "addr", "add", v4, "dev", "eth0"])?;
            ns.sh(&["ip", "route", "add", "default", "via", &gw.to_string(), "dev", "eth0"])?;
            a4 = n.ip().to_string();
        }
        if !v6.is_empty() {
            let n: ipnetwork::Ipv6Network = v6.parse()?;
            let gw = std::net::Ipv6Addr::from(u128::from(n.network()) + 1);
            ns.sh(&["ip", "-6", "addr", "add", v6, "dev", "eth0", "nodad"])?;
            ns.sh(&[
                "ip",
                "-6",
                "route",
                "add",
                "default",
                "via",
                &gw.to_string(),
                "dev",
                "eth0",
            ])?;
            a6 = n.ip().to_string();
        }
        let h = self.host_ns(host);
        h.sysctl(&format!("net.ipv6.conf.{device}.accept_dad=0")).ok();
        h.sh(&["ip", "link", "set", &device, "up"])?;
        self.vms.push(Vm {
            ns,
            host: host.to_string(),
            device,
            mac: mac.into(),
            v4: a4,
            v6: a6,
        });
        Ok(())
    }

    /// Whether VM `from` reaches VM `to` with `proto` ("tcp", "udp" through
    /// `sdn-probe`, "icmp" through ping). A second attempt covers the first
    /// contact of a path, whose packets wait for neighbour resolution at each
    /// hop; a denied flow fails both.
    pub fn reach(&self, from: &str, to: &str, proto: &str, port: u16, v6: bool) -> bool {
        let dst = self.vm(to);
        self.reach_addr(from, if v6 { &dst.v6 } else { &dst.v4 }, proto, port)
    }

    /// Like [`Topology::reach`], towards any address.
    pub fn reach_addr(&self, from: &str, addr: &str, proto: &str, port: u16) -> bool {
        let ns = &self.vm(from).ns;
        let v6 = addr.contains(':');
        let port = port.to_string();
        let probe = bin("sdn-probe");
        let attempt = || {
            if proto == "icmp" {
                ns.sh(&["ping", if v6 { "-6" } else { "-4" }, "-c", "1", "-W", "1", addr])
                    .is_ok()
            } else {
                ns.sh(&[
                    probe.to_str().unwrap(),
                    "connect",
                    proto,
                    addr,
                    &port,
                    "--timeout-ms",
                    "700",
                ])
                .is_ok()
            }
        };
        attempt() || attempt()
    }

    /// Starts `sdn-probe serve` with `args` in each VM (and zone network) named.
    pub fn serve(&self, vms: &[&str], zones: &[&str], args: &[&str]) -> anyhow::Result<Vec<Proc>> {
        let mut all = vec!["serve"];
        all.extend_from_slice(args);
        let mut out = Vec::new();
        let names = vms
            .iter()
            .map(|v| (format!("probe-{v}"), self.vm(v).ns.name.clone()))
            .chain(
                zones
                    .iter()
                    .map(|z| (format!("probe-{z}"), self.zone_ns(z).name.clone())),
            );
        for (name, ns) in names {
            out.push(Proc::spawn(&name, Some(&ns), &bin("sdn-probe"), &all, &self.dir)?);
        }
        std::thread::sleep(Duration::from_millis(300));
        Ok(out)
    }

    /// The port a cloud platform provisions for VM `name`: its host,
    /// device, MAC and addresses, in `tenant`'s `subnet` with `groups`.
    pub fn port(&self, name: &str, tenant: &str, subnet: &str, groups: &[&str]) -> sdn_proto::v1::operation::Op {
        let v = self.vm(name);
        crate::ops::port(name, tenant, subnet, &v.host, &v.device, &v.mac, &v.v4, &v.v6, groups)
    }

    pub fn vm(&self, name: &str) -> &Vm {
        let full = format!("{}-{name}", self.tag);
        self.vms.iter().find(|v| v.ns.name == full).expect("known vm")
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // VMs first (their veths die with them), then zones, hosts and the fabric.
        self.vms.clear();
        self.zones.clear();
        self.hosts.clear();
        // SDN_KEEP_LOGS=1 keeps the logs of processes for a failed run.
        if std::env::var_os("SDN_KEEP_LOGS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
