//! How long a virtual IP is silent when its owner dies: ours (two NAT
//! hosts holding a load balancer's VIP, VRRPv3 every `INTERVAL_CS`
//! centiseconds, 5 by default, and the controller's grant) against a
//! keepalived pair at its defaults (VRRPv2 every second) and at our
//! interval (VRRPv3), in one run.
//!
//! A 1 kHz UDP probe (`sdn-probe gap`) runs through the VIP from the
//! zone's side; after a second the owner "dies": its VRRP speaker is
//! killed (our agent, keepalived's VRRP process) and its link cut. The
//! figure is the probe's longest silence. Then the dead host comes back,
//! takes the VIP back (priority, preemption), and the next kill follows.
//! `KILLS` kills per mode (20 by default); median and maximum.
//!
//! keepalived's side: two namespaces on a bridge, each with keepalived
//! (priorities 200 and 100) and a UDP echo server; whichever holds the
//! VIP answers. Ours: the echo server is a VM behind the load balancer,
//! so the figure includes the grant, the translation and the tunnel.
//!
//! The same kills measure the share of established TCP connections that
//! survive (`sdn-probe survive`: `CONNS` connections, 32 by default,
//! exchanging every 100 ms through the VIP; a connection survives when its
//! last exchange comes back). Ours carries the flows to the other holder
//! (flow sync); the peer is the pair its users run for that: keepalived
//! with conntrackd (FTFW, its primary-backup script on each transition)
//! in front of two servers, nftables DNAT spreading new connections
//! (`numgen random`), the servers' gateway a second VIP of the pair. Each
//! is also run without its sync (ours with `--flow-sync-port 0`,
//! keepalived without conntrackd), which shows what the sync is worth.
//! Ours runs once more with the sync up at the start and cut (nftables on
//! the backup) while the connections open: none of them is carried, and
//! the backup picks them up (Maglev, the dead owner's NAT secret).
//!
//! Run as root after `cargo build --workspace --bins`:
//! `cargo run -p sdn-integration --example vip_failover` (`KILLS`,
//! `INTERVAL_CS`, `CONNS`).

use std::path::Path;
use std::time::{Duration, Instant};

use sdn_integration::keepalived::{instance, Keepalived};
use sdn_integration::ops::*;
use sdn_integration::{bin, ns_sh, sh, wait_for, Netns, Proc};
use sdn_proto::v1 as pb;

const VIP: &str = "10.40.1.100";
const KA_VIP: &str = "10.78.0.100";

fn kills() -> usize {
    std::env::var("KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(20)
}

/// The advertisement interval of ours and of the fast keepalived pair.
fn interval_cs() -> u32 {
    std::env::var("INTERVAL_CS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
}

/// Connections per kill in the survival runs.
fn conns() -> usize {
    std::env::var("CONNS").ok().and_then(|v| v.parse().ok()).unwrap_or(32)
}

/// Runs `sdn-probe survive` from `ns` (source `bind`) to `addr`:`port`:
/// `conns` connections for `seconds`; how many survived, and the longest
/// wait for an echo (ms).
fn survive(
    ns: String,
    addr: &'static str,
    port: &'static str,
    bind: &'static str,
    seconds: u32,
) -> std::thread::JoinHandle<(usize, u64)> {
    std::thread::spawn(move || {
        let n = conns().to_string();
        // A probe that cannot even open its connections counts them all
        // lost, and says why.
        let j = run_probe(
            &ns,
            &[
                "survive",
                addr,
                port,
                "--conns",
                &n,
                "--seconds",
                &seconds.to_string(),
                "--bind",
                bind,
            ],
        )
        .unwrap_or_else(|e| serde_json::json!({ "survived": 0, "error": e }));
        if j["survived"].as_u64() != Some(conns() as u64) {
            eprintln!("  connections: {j}");
        }
        (
            j["survived"].as_u64().unwrap_or(0) as usize,
            j["max_stall_ms"].as_u64().unwrap_or(0),
        )
    })
}

/// `sdn-probe ARGS` in `ns`: the JSON it prints, or why it failed.
fn run_probe(ns: &str, args: &[&str]) -> Result<serde_json::Value, String> {
    let probe = bin("sdn-probe");
    let mut all = vec![probe.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = ns_sh(ns, &all).map_err(|e| e.to_string())?;
    serde_json::from_str(out.trim()).map_err(|e| format!("the probe's output: {e}"))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Runs the 1 kHz probe from `ns` (source `bind`) to `addr`:`port` for
/// `seconds`; its longest silence in ms.
fn probe(
    ns: String,
    addr: &'static str,
    port: &'static str,
    bind: &'static str,
    seconds: u32,
) -> std::thread::JoinHandle<f64> {
    std::thread::spawn(move || {
        let j = run_probe(
            &ns,
            &["gap", addr, port, "--seconds", &seconds.to_string(), "--bind", bind],
        )
        .expect("the probe");
        j["max_gap_ms"].as_f64().unwrap_or(f64::NAN)
    })
}

/// Our failovers: the gap of each, and how many connections survived it.
/// How ours runs its flow sync.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sync {
    On,
    /// Off (`--flow-sync-port 0`).
    Off,
    /// Up at the start, cut while each kill's connections open.
    Cut,
}

async fn ours(n: usize, sync: Sync) -> anyhow::Result<(Vec<f64>, Vec<(usize, u64)>)> {
    let sync_off: &[&str] = if sync == Sync::Off {
        &["--flow-sync-port", "0"]
    } else {
        &[]
    };
    let mut lab = sdn_integration::lab::Lab::new("vfo", &["h1", "h2", "h3"])
        .zone(
            "ext",
            "up-ext",
            "10.253.0",
            "fdf2:0:0:1",
            &["10.0.0.0/8", "fd00::/8"],
            &["10.99.0.1"],
        )
        .tenant("dept-a")
        .vpc("va", Some("ext"))
        .subnet("a-web", "va", "10.40.1.0/24", "fd40:1::/64")
        .group("open-a", open_rules())
        .vm("m1", "h1", "a-web", &["open-a"])
        .vm("m2", "h1", "a-web", &["open-a"])
        .secure()
        .agent_args(sync_off)
        .start()
        .await?;
    let _echo = lab
        .topo
        .serve(&["m1", "m2"], &[], &["--udp", "9001", "--tcp", "9000"])?;
    let mut lb = exposed(load_balancer("lbh", "dept-a", "va", VIP, ""), "h2", "10.40.1.202");
    lb.nat_hosts.push(pb::NatHost {
        host_id: "h3".into(),
        ipv4: "10.40.1.203".into(),
        ipv6: String::new(),
    });
    let mut m = member("udp-m1", "udp", "m1", "", 1);
    if let pb::operation::Op::PutMember(x) = &mut m {
        x.port = 9001;
    }
    let mut v = virtual_ip("hvip", "dept-a", "va", VIP, 40, true, &[("h2", 200), ("h3", 100)]);
    if let pb::operation::Op::PutVirtualIp(x) = &mut v {
        x.advert_interval_cs = interval_cs();
    }
    let mut ops = vec![
        put_lb(lb),
        pool("udp", "lbh"),
        m,
        listener("dns", "lbh", "udp", 53, "udp", "maglev"),
        pool("echo", "lbh"),
        listener("echo", "lbh", "tcp", 7000, "echo", "maglev"),
        v,
    ];
    // The connections' two servers.
    for vm in ["m1", "m2"] {
        let mut m = member(&format!("echo-{vm}"), "echo", vm, "", 1);
        if let pb::operation::Op::PutMember(x) = &mut m {
            x.port = 9000;
        }
        ops.insert(5, m);
    }
    anyhow::ensure!(lab.cluster.apply(ops).await?.enforced, "not enforced");
    let zone = lab.topo.zone_ns("ext").name.clone();
    ns_sh(&zone, &["ip", "route", "replace", &format!("{VIP}/32"), "dev", "br0"])?;
    let holds = |lab: &sdn_integration::lab::Lab, h: &str| {
        lab.topo
            .host_ns(h)
            .sh(&["ip", "-br", "addr", "show", "dev", "up-ext"])
            .is_ok_and(|s| s.contains(VIP))
    };
    let mut client = lab.cluster.client().await?;
    let answers = |zone: &str| ns_sh(zone, &[bin("sdn-probe").to_str().unwrap(), "connect", "udp", VIP, "53"]).is_ok();
    let mut gaps = Vec::new();
    let mut survived = Vec::new();
    let mut epoch = 0;
    for i in 0..n {
        // h2 (back, or at the start) owns it in a new epoch, and h3 let go.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let l = client
                .list(pb::ListRequest {
                    kind: pb::Kind::VirtualIp as i32,
                    stale: false,
                })
                .await?
                .into_inner();
            let v = l.virtual_ips.first().cloned().unwrap_or_default();
            if v.owner_host_id == "h2" && v.epoch > epoch && holds(&lab, "h2") && !holds(&lab, "h3") {
                epoch = v.epoch;
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "h2 never took the VIP back: {v:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        wait_for("the VIP to answer", Duration::from_secs(10), || answers(&zone))?;
        if sync == Sync::Cut {
            // The backup has heard the owner's secrets (its first full
            // batch) before the cut.
            wait_for("h2's flow sync at h3", Duration::from_secs(10), || {
                lab.cluster
                    .agent_log("h3")
                    .contains("flow sync: a full batch from the peer")
            })?;
            lab.topo
                .host_ns("h3")
                .nft_cut("synccut", &["tcp dport 7946", "tcp sport 7946"])?;
        }
        std::thread::sleep(Duration::from_millis(500));
        let c = survive(zone.clone(), VIP, "7000", "10.99.0.1", 4);
        let p = probe(zone.clone(), VIP, "53", "10.99.0.1", 3);
        std::thread::sleep(Duration::from_millis(1000));
        lab.cluster.agent("h2").kill();
        lab.topo.host_ns("h2").sh(&["ip", "link", "set", "up-ext", "down"])?;
        let g = p.join().map_err(|_| anyhow::anyhow!("the probe panicked"))?;
        let kept = c.join().map_err(|_| anyhow::anyhow!("the probe panicked"))?;
        eprintln!(
            "ours{}, kill {}: {g:.0} ms, {}/{} connections survived, stalled {} ms at most",
            match sync {
                Sync::On => "",
                Sync::Off => " (no flow sync)",
                Sync::Cut => " (flow sync cut, pickup)",
            },
            i + 1,
            kept.0,
            conns(),
            kept.1
        );
        gaps.push(g);
        survived.push(kept);
        if sync == Sync::Cut {
            lab.topo.host_ns("h3").nft_mend("synccut")?;
        }
        lab.topo.host_ns("h2").sh(&["ip", "link", "set", "up-ext", "up"])?;
        lab.cluster.start_agent(&lab.topo, "h2")?;
    }
    Ok((gaps, survived))
}

/// An `sdn-probe serve ARGS` echo server in each namespace `PREFIX-NAME`.
fn echo_servers(prefix: &str, names: &[&str], args: &[&str], dir: &Path) -> anyhow::Result<Vec<Proc>> {
    let mut all = vec!["serve"];
    all.extend_from_slice(args);
    names
        .iter()
        .map(|n| {
            Proc::spawn(
                &format!("echo-{n}"),
                Some(&format!("{prefix}-{n}")),
                &bin("sdn-probe"),
                &all,
                dir,
            )
        })
        .collect()
}

/// One of the keepalived pair: VRRPv2 every second at its defaults, or
/// VRRPv3 at our interval.
fn keepalived_at(ns: &str, dir: &Path, name: &str, priority: u8, fast: bool) -> anyhow::Result<Keepalived> {
    let conf = if fast {
        let interval = format!("{:.2}", f64::from(interval_cs()) / 100.0);
        instance(name, 52, priority, &interval, 3, KA_VIP)
    } else {
        instance(name, 52, priority, "1", 2, KA_VIP)
    };
    Keepalived::start(ns, dir, name, &conf)
}

fn keepalived(n: usize, fast: bool) -> anyhow::Result<Vec<f64>> {
    let dir = tempfile::tempdir()?;
    let br = Netns::new("kfo-br")?;
    br.sh(&["ip", "link", "add", "br0", "type", "bridge"])?;
    br.sh(&["ip", "link", "set", "br0", "up"])?;
    let mut ends = Vec::new();
    for (i, e) in ["a", "b", "c"].iter().enumerate() {
        let ns = Netns::new(&format!("kfo-{e}"))?;
        let peer = format!("kfo{e}");
        sh(&[
            "ip", "link", "add", "eth0", "netns", &ns.name, "type", "veth", "peer", "name", &peer, "netns", &br.name,
        ])?;
        br.sh(&["ip", "link", "set", &peer, "master", "br0", "up"])?;
        ns.sh(&["ip", "addr", "add", &format!("10.78.0.{}/24", i + 1), "dev", "eth0"])?;
        ns.sh(&["ip", "link", "set", "eth0", "up"])?;
        ends.push(ns);
    }
    let servers = echo_servers("kfo", &["a", "b"], &["--udp", "9001"], dir.path())?;
    let holds =
        |ns: &str| sh(&["ip", "-n", ns, "-br", "addr", "show", "dev", "eth0"]).is_ok_and(|s| s.contains(KA_VIP));
    let _b = keepalived_at("kfo-b", dir.path(), "kb", 100, fast)?;
    let mut gaps = Vec::new();
    for i in 0..n {
        let mut a = keepalived_at("kfo-a", dir.path(), &format!("ka{i}"), 200, fast)?;
        wait_for("a to hold the VIP", Duration::from_secs(20), || {
            holds("kfo-a") && !holds("kfo-b")
        })?;
        std::thread::sleep(Duration::from_millis(500));
        let p = probe("kfo-c".into(), KA_VIP, "9001", "10.78.0.3", if fast { 3 } else { 7 });
        std::thread::sleep(Duration::from_millis(1000));
        a.crash();
        sh(&["ip", "-n", "kfo-br", "link", "set", "kfoa", "down"])?;
        let g = p.join().map_err(|_| anyhow::anyhow!("the probe panicked"))?;
        eprintln!(
            "keepalived ({}), kill {}: {g:.0} ms",
            if fast { "fast" } else { "defaults" },
            i + 1
        );
        gaps.push(g);
        // Back: what the dead keepalived left on its link goes with it.
        let _ = sh(&[
            "ip",
            "-n",
            "kfo-a",
            "addr",
            "del",
            &format!("{KA_VIP}/24"),
            "dev",
            "eth0",
        ]);
        sh(&["ip", "-n", "kfo-br", "link", "set", "kfoa", "up"])?;
    }
    drop(servers);
    drop(ends);
    Ok(gaps)
}

/// conntrackd of one of the pair: FTFW over UDP on the inside link to the
/// other (`me` and `peer` its addresses), its sockets in `dir`.
fn conntrackd_conf(dir: &Path, name: &str, me: &str, peer: &str) -> String {
    let d = dir.display();
    format!(
        "Sync {{\n  Mode FTFW {{\n  }}\n  UDP {{\n    IPv4_address {me}\n    IPv4_Destination_Address {peer}\n    Port 3780\n    Interface eth1\n    Checksum on\n  }}\n}}\n\
         General {{\n  HashSize 32768\n  HashLimit 131072\n  LogFile {d}/{name}.log\n  Syslog off\n  LockFile {d}/{name}.lock\n  UNIX {{\n    Path {d}/{name}.ctl\n  }}\n  NetlinkBufferSize 2097152\n  NetlinkBufferSizeMaxGrowth 8388608\n\
         Filter From Userspace {{\n    Protocol Accept {{\n      TCP\n    }}\n    Address Ignore {{\n      IPv4_address 127.0.0.1\n      IPv4_address {KA_NAT_VIP}\n      IPv4_address {KA_GW_VIP}\n      IPv4_address {me}\n    }}\n  }}\n}}\n"
    )
}

const KA_NAT_VIP: &str = "10.79.0.100";
const KA_GW_VIP: &str = "10.80.0.100";

/// keepalived of one of the pair: the outside VIP (the service's) and the
/// inside one (the servers' gateway) in one sync group, at our interval;
/// with conntrackd, its primary-backup script on every transition.
fn keepalived_nat_conf(name: &str, priority: u8, script: Option<&Path>) -> String {
    let interval = format!("{:.2}", f64::from(interval_cs()) / 100.0);
    let notify = script
        .map(|s| {
            let s = s.display();
            format!("  notify_master \"{s} primary\"\n  notify_backup \"{s} backup\"\n  notify_fault \"{s} fault\"\n")
        })
        .unwrap_or_default();
    let inst = |i: &str, dev: &str, vrid: u8, vip: &str| {
        format!(
            "vrrp_instance {i} {{\n  state BACKUP\n  interface {dev}\n  virtual_router_id {vrid}\n  priority {priority}\n  advert_int {interval}\n  virtual_ipaddress {{\n    {vip}/24\n  }}\n}}\n"
        )
    };
    format!(
        "global_defs {{\n  router_id {name}\n  vrrp_version 3\n  script_user root\n  enable_script_security\n}}\n\
         vrrp_sync_group G {{\n  group {{\n    VO\n    VI\n  }}\n{notify}}}\n{}{}",
        inst("VO", "eth0", 61, KA_NAT_VIP),
        inst("VI", "eth1", 62, KA_GW_VIP)
    )
}

/// keepalived (with conntrackd when `sync`) in front of two TCP echo
/// servers; `n` kills of the primary; connections surviving each.
fn keepalived_nat(n: usize, sync: bool) -> anyhow::Result<Vec<(usize, u64)>> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let br = Netns::new("kcs-br")?;
    for b in ["br0", "br1"] {
        br.sh(&["ip", "link", "add", b, "type", "bridge"])?;
        br.sh(&["ip", "link", "set", b, "up"])?;
    }
    let mut nss = Vec::new();
    // (namespace, [(device, bridge, address)]), gateway
    let plan: [(&str, Vec<(&str, &str, &str)>, Option<&str>); 5] = [
        ("c", vec![("eth0", "br0", "10.79.0.3/24")], None),
        (
            "a",
            vec![("eth0", "br0", "10.79.0.1/24"), ("eth1", "br1", "10.80.0.1/24")],
            None,
        ),
        (
            "b",
            vec![("eth0", "br0", "10.79.0.2/24"), ("eth1", "br1", "10.80.0.2/24")],
            None,
        ),
        ("s1", vec![("eth0", "br1", "10.80.0.11/24")], Some(KA_GW_VIP)),
        ("s2", vec![("eth0", "br1", "10.80.0.12/24")], Some(KA_GW_VIP)),
    ];
    for (e, links, gw) in &plan {
        let ns = Netns::new(&format!("kcs-{e}"))?;
        for (dev, bridge, addr) in links {
            let peer = format!("kcs{e}{dev}");
            sh(&[
                "ip", "link", "add", dev, "netns", &ns.name, "type", "veth", "peer", "name", &peer, "netns", &br.name,
            ])?;
            br.sh(&["ip", "link", "set", &peer, "master", bridge, "up"])?;
            ns.sh(&["ip", "addr", "add", addr, "dev", dev])?;
            ns.sh(&["ip", "link", "set", dev, "up"])?;
        }
        if let Some(gw) = gw {
            ns.sh(&["ip", "route", "add", "default", "via", gw])?;
        }
        nss.push(ns);
    }
    for lb in ["kcs-a", "kcs-b"] {
        ns_sh(lb, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        // The service: new connections to either server, at random.
        ns_sh(
            lb,
            &[
                "nft",
                &format!(
                    "add table ip lb; add chain ip lb pre {{ type nat hook prerouting priority -100 ; }}; \
                     add rule ip lb pre ip daddr {KA_NAT_VIP} tcp dport 7000 dnat to numgen random mod 2 map {{ 0 : 10.80.0.11, 1 : 10.80.0.12 }} : 9000"
                ),
            ],
        )?;
    }
    let servers = echo_servers("kcs", &["s1", "s2"], &["--tcp", "9000"], d)?;
    let mut ctds = Vec::new();
    let mut scripts = Vec::new();
    for (name, me, peer) in [("a", "10.80.0.1", "10.80.0.2"), ("b", "10.80.0.2", "10.80.0.1")] {
        if !sync {
            scripts.push(None);
            continue;
        }
        let conf = d.join(format!("ctd-{name}.conf"));
        std::fs::write(&conf, conntrackd_conf(d, &format!("ctd-{name}"), me, peer))?;
        ctds.push(Proc::spawn(
            &format!("conntrackd-{name}"),
            Some(&format!("kcs-{name}")),
            Path::new("/usr/sbin/conntrackd"),
            &["-C", conf.to_str().unwrap()],
            d,
        )?);
        // The script conntrackd ships for keepalived (primary-backup.sh),
        // for this instance's configuration.
        let script = d.join(format!("primary-backup-{name}.sh"));
        let c = conf.display();
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nC=\"/usr/sbin/conntrackd -C {c}\"\ncase \"$1\" in\n\
                 primary) $C -c; $C -f; $C -R; $C -B ;;\n\
                 backup) $C -t; $C -n ;;\n\
                 fault) $C -t ;;\nesac\nexit 0\n"
            ),
        )?;
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        scripts.push(Some(script));
    }
    let holds = |ns: &str| {
        sh(&["ip", "-n", ns, "-br", "addr", "show", "dev", "eth0"]).is_ok_and(|s| s.contains(KA_NAT_VIP))
            && sh(&["ip", "-n", ns, "-br", "addr", "show", "dev", "eth1"]).is_ok_and(|s| s.contains(KA_GW_VIP))
    };
    let start = |ns: &str, name: &str, prio: u8, script: &Option<std::path::PathBuf>| {
        let conf = keepalived_nat_conf(name, prio, script.as_deref());
        Keepalived::start(ns, d, name, &conf)
    };
    let _b = start("kcs-b", "kb", 100, &scripts[1])?;
    let mut survived = Vec::new();
    for i in 0..n {
        let mut a = start("kcs-a", &format!("ka{i}"), 200, &scripts[0])?;
        wait_for("a to hold both VIPs", Duration::from_secs(20), || {
            holds("kcs-a") && !sh(&["ip", "-n", "kcs-b", "-br", "addr"]).is_ok_and(|s| s.contains(KA_NAT_VIP))
        })?;
        std::thread::sleep(Duration::from_millis(500));
        let c = survive("kcs-c".into(), KA_NAT_VIP, "7000", "10.79.0.3", 4);
        std::thread::sleep(Duration::from_millis(1000));
        a.crash();
        for dev in ["eth0", "eth1"] {
            sh(&["ip", "-n", "kcs-br", "link", "set", &format!("kcsa{dev}"), "down"])?;
        }
        let kept = c.join().map_err(|_| anyhow::anyhow!("the probe panicked"))?;
        eprintln!(
            "keepalived{}, kill {}: {}/{} connections survived, stalled {} ms at most",
            if sync { " + conntrackd" } else { "" },
            i + 1,
            kept.0,
            conns(),
            kept.1
        );
        survived.push(kept);
        // Back: what the dead keepalived left on its links goes with it.
        let _ = sh(&[
            "ip",
            "-n",
            "kcs-a",
            "addr",
            "del",
            &format!("{KA_NAT_VIP}/24"),
            "dev",
            "eth0",
        ]);
        let _ = sh(&[
            "ip",
            "-n",
            "kcs-a",
            "addr",
            "del",
            &format!("{KA_GW_VIP}/24"),
            "dev",
            "eth1",
        ]);
        for dev in ["eth0", "eth1"] {
            sh(&["ip", "-n", "kcs-br", "link", "set", &format!("kcsa{dev}"), "up"])?;
        }
    }
    drop(ctds);
    drop(servers);
    drop(nss);
    Ok(survived)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n = kills();
    let ms = 10 * interval_cs();
    let t0 = Instant::now();
    let (ours_gaps, ours_kept) = ours(n, Sync::On).await?;
    let (_, ours_unsynced) = ours(n, Sync::Off).await?;
    let (_, ours_picked) = ours(n, Sync::Cut).await?;
    let mut rows = Vec::new();
    for (name, gaps) in [
        (format!("ours: VRRPv3 every {ms} ms, the controller's grant"), ours_gaps),
        (
            "keepalived, defaults (VRRPv2 every 1 s)".to_string(),
            keepalived(n, false)?,
        ),
        (format!("keepalived, VRRPv3 every {ms} ms"), keepalived(n, true)?),
    ] {
        let mut g = gaps.clone();
        let med = median(&mut g);
        let max = g.iter().cloned().fold(0.0, f64::max);
        rows.push((name, med, max, gaps.len()));
    }
    println!("| | kills | median gap, ms | maximum, ms |");
    println!("|---|---:|---:|---:|");
    for (name, med, max, k) in &rows {
        println!("| {name} | {k} | {med:.0} | {max:.0} |");
    }
    let ours_med = rows[0].1;
    println!(
        "\nkeepalived at its defaults is silent {:.1}x as long as ours; at our interval, {:.2}x",
        rows[1].1 / ours_med,
        rows[2].1 / ours_med,
    );
    let ka_synced = keepalived_nat(n, true)?;
    let ka_unsynced = keepalived_nat(n, false)?;
    let c = conns();
    println!(
        "\n| established TCP connections through a failover (VRRP every {ms} ms) | kills | connections | survived | share | longest stall, median of kills, ms |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    let mut shares = Vec::new();
    for (name, kept) in [
        ("ours, flow sync", &ours_kept),
        ("ours, no flow sync (`--flow-sync-port 0`)", &ours_unsynced),
        (
            "ours, flow sync cut while the connections open: picked up",
            &ours_picked,
        ),
        ("keepalived + conntrackd (FTFW), nftables DNAT", &ka_synced),
        ("keepalived alone, nftables DNAT", &ka_unsynced),
    ] {
        let total = c * kept.len();
        let got: usize = kept.iter().map(|k| k.0).sum();
        let share = got as f64 / total.max(1) as f64;
        shares.push(share);
        let mut stalls: Vec<f64> = kept.iter().map(|k| k.1 as f64).collect();
        println!(
            "| {name} | {} | {total} | {got} | {:.1}% | {:.0} |",
            kept.len(),
            100.0 * share,
            median(&mut stalls)
        );
    }
    println!(
        "\nours keeps {:.1}% of connections, keepalived with conntrackd {:.1}% ({:.0} s in all)",
        100.0 * shares[0],
        100.0 * shares[3],
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
