//! The test topology: network namespaces as hosts and VMs, a routed underlay
//! between hosts, and real controller and agent processes. Every namespace,
//! process and mount is owned by a guard that removes it on drop, so a failing
//! test leaves nothing behind.

pub mod lab;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

/// Runs a command, failing with its stderr.
pub fn sh(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {args:?}"))?;
    if !out.status.success() {
        bail!("{args:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command inside a namespace.
pub fn ns_sh(ns: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut v = vec!["ip", "netns", "exec", ns];
    v.extend_from_slice(args);
    sh(&v)
}

/// The directory holding the workspace's built binaries.
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("SDN_BIN_DIR") {
        return PathBuf::from(d);
    }
    // target/<profile>/deps/<test> -> target/<profile>
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("deps dir");
    if dir.ends_with("deps") || dir.ends_with("examples") {
        dir.parent().expect("profile dir").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} not built; run `cargo build --workspace --bins` first",
        p.display()
    );
    p
}

/// Whether the tests can make namespaces and load eBPF.
pub fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> anyhow::Result<Netns> {
        let _ = sh(&["ip", "netns", "del", name]);
        sh(&["ip", "netns", "add", name])?;
        let ns = Netns { name: name.to_string() };
        ns.sh(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn sh(&self, args: &[&str]) -> anyhow::Result<String> {
        ns_sh(&self.name, args)
    }

    pub fn sysctl(&self, kv: &str) -> anyhow::Result<()> {
        self.sh(&["sysctl", "-qw", kv]).map(|_| ())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "del", &self.name]);
    }
}

/// A child process killed on drop. Its output goes to a log file.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(
        name: &str,
        netns: Option<&str>,
        program: &Path,
        args: &[&str],
        log_dir: &Path,
    ) -> anyhow::Result<Proc> {
        let log = log_dir.join(format!("{name}.log"));
        let f = std::fs::OpenOptions::new().create(true).append(true).open(&log)?;
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(program);
                c
            }
            None => Command::new(program),
        };
        cmd.args(args).stdin(Stdio::null()).stdout(f.try_clone()?).stderr(f);
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        Ok(Proc {
            name: name.to_string(),
            child: Some(child),
            log,
        })
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child by pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The process id (`ip netns exec` execs the program, so it is the program's).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A bpffs mount for the agents' pins, unmounted on drop.
pub struct Bpffs {
    pub path: PathBuf,
}

impl Bpffs {
    pub fn new(path: &Path) -> anyhow::Result<Bpffs> {
        std::fs::create_dir_all(path)?;
        sh(&["mount", "-t", "bpf", "bpf", path.to_str().unwrap()])?;
        Ok(Bpffs {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        // Removing the pins detaches every program and frees the maps.
        let _ = sh(&["umount", "-l", self.path.to_str().unwrap()]);
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

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
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits for a condition, polling.
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("timed out after {timeout:?} waiting for {what}")
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub mod linearizability;

/// A generated client for the subset of etcd's v3 API the benchmarks use.
pub mod etcd {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("etcdserverpb");
}

/// A running single-node controller, its agents, and a client.
pub mod cluster {
    use super::*;
    use sdn_proto::v1 as pb;

    pub struct Cluster {
        pub controller: Proc,
        pub agents: Vec<(String, Proc)>,
        pub addr: String,
        pub socket: PathBuf,
        pub data_dir: PathBuf,
        pub bpffs: Bpffs,
        pub dir: PathBuf,
        pub listen: String,
        /// Recorded in the audit log for writes made through [`Cluster::apply`].
        pub actor: String,
    }

    impl Cluster {
        pub fn start(dir: &Path) -> anyhow::Result<Cluster> {
            let data_dir = dir.join("controller-data");
            let socket = dir.join("controller.sock");
            let port = free_port();
            let listen = format!("127.0.0.1:{port}");
            let bpffs = Bpffs::new(&dir.join("bpffs"))?;
            let controller = Self::spawn_controller(dir, &data_dir, &socket, &listen)?;
            let c = Cluster {
                controller,
                agents: Vec::new(),
                addr: format!("http://{listen}"),
                socket,
                data_dir,
                bpffs,
                dir: dir.to_path_buf(),
                listen,
                actor: "integration-test".into(),
            };
            c.wait_ready()?;
            Ok(c)
        }

        fn spawn_controller(dir: &Path, data_dir: &Path, socket: &Path, listen: &str) -> anyhow::Result<Proc> {
            Proc::spawn(
                "controller",
                None,
                &bin("sdn-controller"),
                &[
                    "--data-dir",
                    data_dir.to_str().unwrap(),
                    "--listen",
                    listen,
                    "--listen-unix",
                    socket.to_str().unwrap(),
                ],
                dir,
            )
        }

        fn wait_ready(&self) -> anyhow::Result<()> {
            let addr = self.addr.clone();
            // A thread of its own: callers may be inside a tokio runtime.
            let r = std::thread::spawn(move || -> anyhow::Result<()> {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                wait_for("the controller to answer", Duration::from_secs(20), || {
                    rt.block_on(async {
                        match sdn_proto::connect(&addr).await {
                            Ok(ch) => pb::provisioning_client::ProvisioningClient::new(ch)
                                .list(pb::ListRequest { kind: 0, stale: false })
                                .await
                                .is_ok(),
                            Err(_) => false,
                        }
                    })
                })
            })
            .join()
            .expect("readiness thread");
            r.with_context(|| format!("controller log:\n{}", self.controller.log_text()))
        }

        /// Kills the controller (SIGKILL) and starts it again on the same data.
        pub fn restart_controller(&mut self) -> anyhow::Result<()> {
            self.controller.kill();
            self.controller = Self::spawn_controller(&self.dir, &self.data_dir, &self.socket, &self.listen)?;
            self.wait_ready()
        }

        pub fn pin_dir(&self, host: &str) -> PathBuf {
            self.bpffs.path.join(host)
        }

        pub fn start_agent(&mut self, topo: &Topology, host: &str) -> anyhow::Result<()> {
            let underlay = topo.underlay_ip(host);
            self.start_agent_binary(topo, host, &bin("sdn-agent"), &["--underlay-ip", &underlay])
        }

        /// Starts an agent from another build (an earlier release, which
        /// may not know every flag of this one), with `extra` arguments.
        pub fn start_agent_binary(
            &mut self,
            topo: &Topology,
            host: &str,
            agent: &Path,
            extra: &[&str],
        ) -> anyhow::Result<()> {
            let ns = topo.host_ns(host).name.clone();
            let ctl = format!("unix://{}", self.socket.display());
            let pin = self.pin_dir(host);
            let p = Proc::spawn(
                &format!("agent-{host}"),
                Some(&ns),
                agent,
                &[
                    &[
                        "run",
                        "--host",
                        host,
                        "--controller",
                        &ctl,
                        "--pin-dir",
                        pin.to_str().unwrap(),
                    ],
                    extra,
                ]
                .concat(),
                &self.dir,
            )?;
            self.agents.retain(|(h, _)| h != host);
            self.agents.push((host.to_string(), p));
            Ok(())
        }

        pub fn agent(&mut self, host: &str) -> &mut Proc {
            &mut self.agents.iter_mut().find(|(h, _)| h == host).expect("agent").1
        }

        pub async fn client(
            &self,
        ) -> anyhow::Result<pb::provisioning_client::ProvisioningClient<tonic::transport::Channel>> {
            Ok(pb::provisioning_client::ProvisioningClient::new(
                sdn_proto::connect(&self.addr).await?,
            ))
        }

        /// Applies a batch and waits for enforcement.
        pub async fn apply(&self, ops: Vec<pb::operation::Op>) -> Result<pb::ApplyResponse, tonic::Status> {
            let mut c = self
                .client()
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            c.apply(pb::ApplyRequest {
                operations: ops.into_iter().map(|o| pb::Operation { op: Some(o) }).collect(),
                actor: self.actor.clone(),
                wait: true,
                wait_timeout_ms: 20_000,
            })
            .await
            .map(|r| r.into_inner())
        }

        /// Drop counters of a host's agent, by reason.
        /// One counter of a host's dataplane: `group` is "drops" or "stats".
        pub fn counter(&self, topo: &Topology, host: &str, group: &str, name: &str) -> u64 {
            self.drops(topo, host).expect("counters")[group][name]
                .as_u64()
                .unwrap_or(0)
        }

        /// The firewall verdicts a host recorded (`sdn-agent verdicts`).
        pub fn verdicts(&self, topo: &Topology, host: &str) -> Vec<serde_json::Value> {
            let out = ns_sh(
                &topo.host_ns(host).name,
                &[
                    bin("sdn-agent").to_str().unwrap(),
                    "verdicts",
                    "--pin-dir",
                    self.pin_dir(host).to_str().unwrap(),
                ],
            )
            .expect("sdn-agent verdicts");
            out.lines()
                .map(|l| serde_json::from_str(l).expect("a JSON line"))
                .collect()
        }

        pub fn drops(&self, topo: &Topology, host: &str) -> anyhow::Result<serde_json::Value> {
            let out = ns_sh(
                &topo.host_ns(host).name,
                &[
                    bin("sdn-agent").to_str().unwrap(),
                    "counters",
                    "--pin-dir",
                    self.pin_dir(host).to_str().unwrap(),
                ],
            )?;
            Ok(serde_json::from_str(&out)?)
        }
    }
}

/// Builders for provisioning messages.
pub mod ops {
    use pb::operation::Op;
    use sdn_proto::v1 as pb;

    pub fn tenant(id: &str) -> Op {
        Op::PutTenant(pb::Tenant {
            id: id.into(),
            name: id.into(),
        })
    }
    pub fn vpc(id: &str, tenant: &str) -> Op {
        vpc_vni(id, tenant, 0)
    }
    pub fn vpc_vni(id: &str, tenant: &str, vni: u32) -> Op {
        Op::PutVpc(pb::Vpc {
            id: id.into(),
            tenant_id: tenant.into(),
            name: id.into(),
            vni,
            zone_id: String::new(),
            border_policy_id: String::new(),
        })
    }
    /// A VPC attached to a zone's uplink.
    pub fn vpc_in_zone(id: &str, tenant: &str, zone: &str) -> Op {
        Op::PutVpc(pb::Vpc {
            id: id.into(),
            tenant_id: tenant.into(),
            name: id.into(),
            vni: 0,
            zone_id: zone.into(),
            border_policy_id: String::new(),
        })
    }
    pub fn zone(id: &str, prefixes: &[&str], uplink: &str) -> Op {
        Op::PutZone(pb::Zone {
            id: id.into(),
            name: id.into(),
            prefixes: prefixes.iter().map(|p| p.to_string()).collect(),
            uplink_device: uplink.into(),
            ..Default::default()
        })
    }
    /// An exchange path for TCP to `ports`.
    pub fn exchange(id: &str, from: &str, to: &str, src: &str, dst: &str, ports: (u32, u32)) -> Op {
        Op::PutExchangePath(pb::ExchangePath {
            id: id.into(),
            from_zone: from.into(),
            to_zone: to.into(),
            source_cidr: src.into(),
            destination_cidr: dst.into(),
            protocol: pb::Protocol::Tcp as i32,
            port_min: ports.0,
            port_max: ports.1,
            ..Default::default()
        })
    }
    /// An exchange path marked broad (every source, say), with the reason
    /// the audit records.
    pub fn broad(op: Op, reason: &str) -> Op {
        match op {
            Op::PutExchangePath(x) => Op::PutExchangePath(pb::ExchangePath {
                broad: true,
                broad_reason: reason.into(),
                ..x
            }),
            other => other,
        }
    }
    pub fn subnet(id: &str, vpc: &str, v4: &str, v6: &str) -> Op {
        Op::PutSubnet(pb::Subnet {
            id: id.into(),
            vpc_id: vpc.into(),
            cidr_v4: v4.into(),
            cidr_v6: v6.into(),
        })
    }
    pub fn host(id: &str, ip: &str) -> Op {
        Op::PutHost(pb::Host {
            id: id.into(),
            underlay_ip: ip.into(),
        })
    }
    #[allow(clippy::too_many_arguments)]
    pub fn port(
        id: &str,
        tenant: &str,
        subnet: &str,
        host: &str,
        device: &str,
        mac: &str,
        v4: &str,
        v6: &str,
        groups: &[&str],
    ) -> Op {
        Op::PutPort(pb::Port {
            id: id.into(),
            tenant_id: tenant.into(),
            subnet_id: subnet.into(),
            host_id: host.into(),
            device: device.into(),
            mac: mac.into(),
            ipv4: v4.into(),
            ipv6: v6.into(),
            security_group_ids: groups.iter().map(|g| g.to_string()).collect(),
            vm_id: String::new(),
        })
    }
    pub fn group(id: &str, tenant: &str, rules: Vec<pb::SecurityGroupRule>) -> Op {
        Op::PutSecurityGroup(pb::SecurityGroup {
            id: id.into(),
            tenant_id: tenant.into(),
            name: id.into(),
            rules,
        })
    }
    /// An ingress rule: "tcp", "udp", "icmp", "icmpv6" or "any"; v6 picks the family.
    /// Security-group rules admitting everything, both families.
    pub fn open_rules() -> Vec<pb::SecurityGroupRule> {
        vec![
            ingress("all4", false, "any", (0, 0), "", ""),
            ingress("all6", true, "any", (0, 0), "", ""),
        ]
    }

    /// A firewall rule; `what` is "<allow|deny> <in|out> <v4|v6>".
    pub fn fw_rule(
        id: &str,
        priority: u32,
        what: &str,
        proto: &str,
        ports: (u32, u32),
        cidr: &str,
    ) -> pb::FirewallRule {
        let w: Vec<&str> = what.split(' ').collect();
        let r = ingress(id, w[2] == "v6", proto, ports, cidr, "");
        pb::FirewallRule {
            id: r.id,
            priority,
            action: if w[0] == "allow" {
                pb::Action::Allow
            } else {
                pb::Action::Deny
            } as i32,
            direction: if w[1] == "out" {
                pb::Direction::Egress
            } else {
                pb::Direction::Ingress
            } as i32,
            ether_type: r.ether_type,
            protocol: r.protocol,
            port_min: r.port_min,
            port_max: r.port_max,
            remote_cidr: r.remote_cidr,
        }
    }

    pub fn ingress(
        id: &str,
        v6: bool,
        proto: &str,
        ports: (u32, u32),
        cidr: &str,
        remote_group: &str,
    ) -> pb::SecurityGroupRule {
        let protocol = match proto {
            "tcp" => pb::Protocol::Tcp,
            "udp" => pb::Protocol::Udp,
            "icmp" => pb::Protocol::Icmp,
            "icmpv6" => pb::Protocol::Icmpv6,
            _ => pb::Protocol::Any,
        };
        pb::SecurityGroupRule {
            id: id.into(),
            direction: pb::Direction::Ingress as i32,
            ether_type: if v6 { pb::EtherType::Ipv6 } else { pb::EtherType::Ipv4 } as i32,
            protocol: protocol as i32,
            port_min: ports.0,
            port_max: ports.1,
            remote_cidr: cidr.into(),
            remote_group_id: remote_group.into(),
        }
    }
}

/// Moves the calling thread into a network namespace (by name).
pub fn enter_netns(name: &str) -> anyhow::Result<()> {
    let f = std::fs::File::open(format!("/var/run/netns/{name}")).with_context(|| format!("opening netns {name}"))?;
    use std::os::fd::AsRawFd;
    // SAFETY: setns on a valid namespace fd affects only this thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setns");
    }
    Ok(())
}

/// A controller cluster of real processes, one network namespace per
/// replica on the topology's underlay, so links between replicas can be cut.
pub mod replicas {
    use super::*;
    use sdn_proto::v1 as pb;

    pub struct Replica {
        pub id: u64,
        pub ns: String,
        pub ip: String,
        pub socket: PathBuf,
        pub data_dir: PathBuf,
        pub proc: Option<Proc>,
        pub binary: PathBuf,
    }

    impl Replica {
        /// The address other replicas and agents use.
        pub fn addr(&self) -> String {
            format!("http://{}:7070", self.ip)
        }
        /// The address the tests use (a unix socket, reachable from any namespace).
        pub fn local(&self) -> String {
            format!("unix://{}", self.socket.display())
        }
    }

    pub struct Replicas {
        pub replicas: Vec<Replica>,
        pub dir: PathBuf,
    }

    impl Replicas {
        /// Starts replicas in the namespaces of `hosts` (their underlay
        /// addresses); the first bootstraps, the others join. Then adds and
        /// promotes them through the Cluster API.
        pub async fn start(topo: &Topology, hosts: &[&str]) -> anyhow::Result<Replicas> {
            let mut r = Replicas::new(topo, hosts);
            for i in 0..r.replicas.len() {
                r.spawn(i, i > 0)?;
            }
            r.wait_answering(0).await?;
            let first = r.replicas[0].local();
            let mut c = cluster_client(&first).await?;
            for rep in &r.replicas[1..] {
                r.wait_answering(rep.id as usize - 1).await?;
                c.add_learner(pb::AddLearnerRequest {
                    node_id: rep.id,
                    addr: rep.addr(),
                })
                .await?;
                c.promote(pb::MemberRequest { node_id: rep.id }).await?;
            }
            Ok(r)
        }

        /// Describes one replica per host (node ids from 1), none running.
        pub fn new(topo: &Topology, hosts: &[&str]) -> Replicas {
            let replicas = hosts
                .iter()
                .enumerate()
                .map(|(i, h)| {
                    let id = i as u64 + 1;
                    Replica {
                        id,
                        ns: topo.host_ns(h).name.clone(),
                        ip: topo.underlay_ip(h),
                        socket: topo.dir.join(format!("c{id}.sock")),
                        data_dir: topo.dir.join(format!("c{id}-data")),
                        proc: None,
                        binary: bin("sdn-controller"),
                    }
                })
                .collect();
            Replicas {
                replicas,
                dir: topo.dir.clone(),
            }
        }

        pub fn spawn(&mut self, i: usize, join: bool) -> anyhow::Result<()> {
            let rep = &self.replicas[i];
            let _ = std::fs::remove_file(&rep.socket);
            let listen = format!("{}:7070", rep.ip);
            let mut args = vec![
                "--node-id".to_string(),
                rep.id.to_string(),
                "--data-dir".into(),
                rep.data_dir.display().to_string(),
                "--listen".into(),
                listen,
                "--listen-unix".into(),
                rep.socket.display().to_string(),
            ];
            if join {
                args.push("--join".into());
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let p = Proc::spawn(
                &format!("controller-{}", rep.id),
                Some(&rep.ns),
                &rep.binary,
                &args,
                &self.dir,
            )?;
            self.replicas[i].proc = Some(p);
            Ok(())
        }

        pub async fn wait_answering(&self, i: usize) -> anyhow::Result<()> {
            let addr = self.replicas[i].local();
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(mut c) = cluster_client(&addr).await {
                    if c.status(pb::ClusterStatusRequest {}).await.is_ok() {
                        return Ok(());
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            bail!("replica {} does not answer on {addr}", i + 1)
        }

        /// The leader's index, as the replicas that answer see it.
        pub async fn leader(&self) -> Option<usize> {
            for r in &self.replicas {
                if r.proc.is_none() {
                    continue;
                }
                if let Ok(mut c) = cluster_client(&r.local()).await {
                    if let Ok(Ok(s)) =
                        tokio::time::timeout(Duration::from_millis(500), c.status(pb::ClusterStatusRequest {})).await
                    {
                        // Only a replica that itself says it leads counts.
                        let s = s.into_inner();
                        if s.leader_id != 0 && s.leader_id == s.node_id {
                            return Some(s.node_id as usize - 1);
                        }
                    }
                }
            }
            None
        }

        pub async fn wait_leader(&self, timeout: Duration) -> anyhow::Result<usize> {
            let deadline = Instant::now() + timeout;
            while Instant::now() < deadline {
                if let Some(l) = self.leader().await {
                    return Ok(l);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            bail!("no leader within {timeout:?}")
        }

        pub fn kill(&mut self, i: usize) {
            if let Some(mut p) = self.replicas[i].proc.take() {
                p.kill();
            }
        }

        pub fn stop(&mut self, i: usize) {
            if let Some(mut p) = self.replicas[i].proc.take() {
                p.stop();
            }
        }

        pub async fn status(&self, i: usize) -> anyhow::Result<pb::ClusterStatus> {
            let mut c = cluster_client(&self.replicas[i].local()).await?;
            Ok(c.status(pb::ClusterStatusRequest {}).await?.into_inner())
        }

        pub fn log(&self, i: usize) -> String {
            std::fs::read_to_string(self.dir.join(format!("controller-{}.log", i + 1))).unwrap_or_default()
        }
    }

    pub async fn cluster_client(
        addr: &str,
    ) -> anyhow::Result<pb::cluster_client::ClusterClient<tonic::transport::Channel>> {
        Ok(pb::cluster_client::ClusterClient::new(sdn_proto::connect(addr).await?))
    }

    pub async fn prov_client(
        addr: &str,
    ) -> anyhow::Result<pb::provisioning_client::ProvisioningClient<tonic::transport::Channel>> {
        Ok(pb::provisioning_client::ProvisioningClient::new(
            sdn_proto::connect(addr).await?,
        ))
    }
}
