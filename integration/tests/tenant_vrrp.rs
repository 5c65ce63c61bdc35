//! Virtual IPs held by tenant VMs that run their own VRRP: real keepalived
//! in VM namespaces on two hosts, speaking VRRPv3 to 224.0.0.18 across our
//! dataplane.
//!
//! - The holders hear each other (the relay copies within a host and
//!   across hosts): one Master, two Backups.
//! - The one that speaks becomes the owner in the overlay: the controller
//!   grants it, and clients on both hosts reach the VIP (IPv4 and IPv6) at
//!   that VM. Before any holder speaks, the VIP is nobody's.
//! - Failover when the Master's keepalived is killed, and preemption back.
//! - Only the owner may send from the VIP: the backup's gratuitous ARP and
//!   unsolicited NA for it are refused; the owner's pass.
//! - VRRPv2 (keepalived's default) works as VRRPv3 does.
//! - Attacks: a VM that holds nothing runs keepalived for the same router
//!   with the highest priority; a holder advertises above its declared
//!   priority; another VPC uses the same router id. None moves the VIP.

use std::time::{Duration, Instant};

use sdn_integration::keepalived::{instance, Keepalived};
use sdn_integration::lab::{Lab, TENANT};
use sdn_integration::ops::*;
use sdn_integration::{bin, privileged, Proc};
use sdn_proto::v1 as pb;

const VIP: &str = "10.61.0.100";
const VIP6: &str = "fd61::100";
const WVIP: &str = "10.62.0.100";

/// keepalived in a VM on eth0, router 51: VRRPv3 every 100 ms.
fn keepalived(lab: &Lab, vm: &str, priority: u8, vip: &str) -> Keepalived {
    keepalived_as(lab, vm, priority, vip, 3, "0.1")
}

fn keepalived_as(lab: &Lab, vm: &str, priority: u8, vip: &str, version: u8, interval: &str) -> Keepalived {
    let ns = lab.topo.vm(vm).ns.name.clone();
    let name = format!("ka-{vm}-{priority}");
    Keepalived::start(
        &ns,
        &lab.topo.dir,
        &name,
        &instance(&name, 51, priority, interval, version, vip),
    )
    .unwrap()
}

async fn vip(lab: &Lab, id: &str) -> pb::VirtualIp {
    lab.cluster.virtual_ip(id).await
}

/// Waits until `port` owns virtual IP `id`; its epoch.
async fn owned_by(lab: &Lab, id: &str, port: &str, within: Duration) -> u64 {
    let deadline = Instant::now() + within;
    loop {
        let v = vip(lab, id).await;
        if v.owner_port_id == port {
            return v.epoch;
        }
        assert!(
            Instant::now() < deadline,
            "{port} never owned {id}: {v:?}\nh1:\n{}\nh2:\n{}",
            lab.cluster.agent_log("h1"),
            lab.cluster.agent_log("h2")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Which holder's server answers at `addr` from VM `from` (None: no
/// answer).
fn who(lab: &Lab, from: &str, addr: &str) -> Option<String> {
    let p = bin("sdn-probe");
    lab.topo
        .vm(from)
        .ns
        .sh(&[p.to_str().unwrap(), "who", addr, "8080", "--timeout-ms", "500"])
        .ok()
        .map(|s| s.trim().to_string())
}

/// Polls until `from` is answered by `want` at `addr`; how long it took.
fn answered_by(lab: &Lab, from: &str, addr: &str, want: &str, within: Duration) -> Duration {
    let t0 = Instant::now();
    loop {
        let got = who(lab, from, addr);
        if got.as_deref() == Some(want) {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < within,
            "{from} -> {addr}: answered by {got:?}, not {want}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether keepalived in VM `vm` has the address on its eth0 (it does as
/// Master).
fn holds(lab: &Lab, vm: &str, addr: &str) -> bool {
    lab.topo
        .vm(vm)
        .ns
        .sh(&["ip", "-br", "addr", "show", "dev", "eth0"])
        .is_ok_and(|s| s.contains(addr))
}

fn drops(lab: &Lab, host: &str, reason: &str) -> u64 {
    lab.counter(host, "drops", reason)
}

/// A gratuitous ARP for the VIP from VM `vm`.
fn garp(lab: &Lab, vm: &str) {
    let ns = &lab.topo.vm(vm).ns;
    // (A Backup does not have the address: arping binds to it all the same.)
    ns.sysctl("net.ipv4.ip_nonlocal_bind=1").unwrap();
    // (It exits 1: nobody answers an unsolicited ARP.)
    let _ = ns.sh(&["arping", "-U", "-c", "1", "-w", "1", "-i", "eth0", "-S", VIP, VIP]);
    std::thread::sleep(Duration::from_millis(200));
}

/// An unsolicited NA for the VIP's IPv6 address from VM `vm`.
fn unsolicited_na(lab: &Lab, vm: &str) {
    let ns = &lab.topo.vm(vm).ns;
    ns.sysctl("net.ipv6.ip_nonlocal_bind=1").unwrap();
    let p = bin("sdn-probe");
    ns.sh(&[p.to_str().unwrap(), "na", VIP6, "eth0"]).unwrap();
    std::thread::sleep(Duration::from_millis(200));
}

/// From a capture in the new Master: seconds from its first
/// advertisement to the first datagram to the VIP it received after it.
fn speaker_to_owner(pcap: &std::path::Path, me: &str) -> f64 {
    let out = std::process::Command::new("tshark")
        .args([
            "-r",
            pcap.to_str().unwrap(),
            "-T",
            "fields",
            "-e",
            "frame.time_epoch",
            "-e",
            "ip.proto",
            "-e",
            "ip.src",
        ])
        .output()
        .expect("tshark");
    let text = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<(f64, &str, &str)> = text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            Some((f.first()?.parse().ok()?, *f.get(1)?, *f.get(2)?))
        })
        .collect();
    let spoke = rows
        .iter()
        .find(|(_, p, src)| *p == "112" && *src == me)
        .unwrap_or_else(|| panic!("no advertisement from {me} in the capture:\n{text}"))
        .0;
    let reached = rows
        .iter()
        .find(|(t, p, _)| *p == "17" && *t >= spoke)
        .unwrap_or_else(|| panic!("nothing reached {me} after it spoke:\n{text}"))
        .0;
    reached - spoke
}

#[tokio::test]
async fn tenant_vms_running_keepalived_own_their_virtual_ip() {
    if !privileged() {
        eprintln!("skipped: needs root");
        return;
    }
    let mut v = virtual_ip(
        "tv",
        TENANT,
        "v",
        VIP,
        51,
        false,
        &[("a1", 200), ("a2", 100), ("a3", 50)],
    );
    if let pb::operation::Op::PutVirtualIp(x) = &mut v {
        x.ipv6 = VIP6.into();
    }
    // Another VPC's virtual IP on the same router id.
    let w = virtual_ip("wv", TENANT, "w", WVIP, 51, false, &[("y", 100)]);
    let lab = Lab::new("tvr", &["h1", "h2"])
        .vpc("v", None)
        .subnet("s", "v", "10.61.0.0/24", "fd61::/64")
        .vpc("w", None)
        .subnet("t", "w", "10.62.0.0/24", "")
        .group("open", open_rules())
        .vm("a1", "h1", "s", &["open"])
        .vm("a2", "h2", "s", &["open"])
        .vm("a3", "h1", "s", &["open"])
        .vm("c1", "h1", "s", &["open"])
        .vm("c2", "h2", "s", &["open"])
        .vm("x", "h2", "s", &["open"])
        .vm("y", "h1", "t", &["open"])
        .then(vec![v, w])
        .start()
        .await
        .unwrap();
    let mut servers: Vec<Proc> = Vec::new();
    for vm in ["a1", "a2", "x", "y"] {
        let ns = lab.topo.vm(vm).ns.name.clone();
        let args = ["name", "8080", vm];
        servers.push(
            Proc::spawn(
                &format!("name-{vm}"),
                Some(&ns),
                &bin("sdn-probe"),
                &args,
                &lab.topo.dir,
            )
            .unwrap(),
        );
    }

    // Nobody speaks yet: the VIP is nobody's (fail closed).
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(who(&lab, "c2", VIP), None, "the VIP answered before any holder spoke");
    assert!(vip(&lab, "tv").await.owner_port_id.is_empty());

    // Both holders run keepalived; they hear each other across the hosts.
    let mut k1 = keepalived(&lab, "a1", 200, VIP);
    let mut k2 = keepalived(&lab, "a2", 100, VIP);
    let _k3 = keepalived(&lab, "a3", 50, VIP);
    // (keepalived's defaults there: VRRPv2, every second.)
    let _ky = keepalived_as(&lab, "y", 100, WVIP, 2, "1");
    let epoch = owned_by(&lab, "tv", "a1", Duration::from_secs(10)).await;
    answered_by(&lab, "c2", VIP, "a1", Duration::from_secs(5));
    answered_by(&lab, "c1", VIP, "a1", Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(500));
    assert!(holds(&lab, "a1", VIP), "a1 is not Master");
    assert!(!holds(&lab, "a2", VIP), "a2 is Master too: it does not hear a1");
    assert!(
        !holds(&lab, "a3", VIP),
        "a3 is Master too: it does not hear a1 on its own host"
    );
    // The same router id in VPC w is w's own. Its virtual IP says 100 ms,
    // y advertises every second: refused (y would keep the address for
    // seconds after falling silent), until the virtual IP says a second.
    // (keepalived waits three of its intervals before it first speaks.)
    sdn_integration::wait_for("y's advertisements to be refused", Duration::from_secs(8), || {
        drops(&lab, "h1", "vrrp_interval") > 0
    })
    .unwrap();
    assert!(vip(&lab, "wv").await.owner_port_id.is_empty());
    let mut w = virtual_ip("wv", TENANT, "w", WVIP, 51, false, &[("y", 100)]);
    if let pb::operation::Op::PutVirtualIp(x) = &mut w {
        x.advert_interval_cs = 100;
    }
    assert!(lab.cluster.apply(vec![w]).await.unwrap().enforced);
    owned_by(&lab, "wv", "y", Duration::from_secs(5)).await;
    assert!(holds(&lab, "y", WVIP));
    assert_eq!(who(&lab, "c1", VIP).as_deref(), Some("a1"));

    // IPv6: the VIP's second address lives at the owner too.
    keep_v6(&lab, "a1");
    assert!(
        lab.topo.reach_addr("c2", VIP6, "icmp", 0),
        "the VIP's IPv6 address does not reach its owner"
    );

    // Only the owner may announce the VIP.
    let (arp1, arp2) = (drops(&lab, "h1", "spoof_arp"), drops(&lab, "h2", "spoof_arp"));
    garp(&lab, "a2");
    garp(&lab, "a1");
    assert!(
        drops(&lab, "h2", "spoof_arp") > arp2,
        "the backup's gratuitous ARP passed"
    );
    assert_eq!(
        drops(&lab, "h1", "spoof_arp"),
        arp1,
        "the owner's gratuitous ARP was refused"
    );
    // (An NA from an address not the port's is `spoof_ip`; for a target
    // not the port's, `spoof_nd`.)
    let nd = |h: &str| drops(&lab, h, "spoof_ip") + drops(&lab, h, "spoof_nd");
    let (nd1, nd2) = (nd("h1"), nd("h2"));
    unsolicited_na(&lab, "a2");
    unsolicited_na(&lab, "a1");
    assert!(nd("h2") > nd2, "the backup's unsolicited NA passed");
    assert_eq!(nd("h1"), nd1, "the owner's unsolicited NA was refused");

    // Failover: a1's keepalived dies without a word. A capture in a2
    // sees its first advertisement as Master and the first of c2's
    // datagrams to the VIP (1 kHz) that the overlay delivers to it.
    let a2 = lab.topo.vm("a2");
    let pcap = lab.topo.dir.join("a2-failover.pcap");
    let mut capture = Proc::spawn(
        "tcpdump-a2",
        Some(&a2.ns.name),
        &sdn_integration::supervisor::which("tcpdump"),
        &[
            "-i",
            "eth0",
            "-U",
            "-n",
            "-w",
            pcap.to_str().unwrap(),
            &format!("ip proto 112 or (udp and dst host {VIP} and dst port 5999)"),
        ],
        &lab.topo.dir,
    )
    .unwrap();
    sdn_integration::wait_for("tcpdump in a2", Duration::from_secs(10), || {
        capture.log_text().contains("listening on")
    })
    .unwrap();
    let stream = {
        let ns = lab.topo.vm("c2").ns.name.clone();
        std::thread::spawn(move || {
            sdn_integration::ns_sh(
                &ns,
                &[bin("sdn-probe").to_str().unwrap(), "gap", VIP, "5999", "--seconds", "4"],
            )
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    k1.crash();
    let t0 = Instant::now();
    let epoch2 = owned_by(&lab, "tv", "a2", Duration::from_secs(10)).await;
    assert!(epoch2 > epoch);
    answered_by(&lab, "c2", VIP, "a2", Duration::from_secs(5));
    let failover = t0.elapsed();
    answered_by(&lab, "c1", VIP, "a2", Duration::from_secs(5));
    eprintln!(
        "failover: {} ms from the kill to the first answer from a2",
        failover.as_millis()
    );
    assert!(failover < Duration::from_secs(3), "failover took {failover:?}");
    let _ = stream.join();
    capture.stop();
    let lag = speaker_to_owner(&pcap, a2.v4.split('/').next().unwrap());
    eprintln!(
        "a2's first advertisement as Master to the overlay's first delivery to it: {:.1} ms",
        lag * 1e3
    );
    assert!(
        lag < 0.1,
        "the overlay followed the speaker after {:.1} ms: more than one advertisement (100 ms)",
        lag * 1e3
    );

    // a1 comes back with the higher priority and preempts.
    k1 = keepalived(&lab, "a1", 200, VIP);
    owned_by(&lab, "tv", "a1", Duration::from_secs(10)).await;
    answered_by(&lab, "c2", VIP, "a1", Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(500));
    assert!(!holds(&lab, "a2", VIP), "a2 did not fall back to Backup");

    // Attack: x holds nothing and advertises the router at 254.
    let kx = keepalived(&lab, "x", 254, VIP);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(holds(&lab, "x", VIP), "x should believe it is Master (it hears nobody)");
    assert!(!holds(&lab, "a2", VIP), "x's advertisements reached a2");
    assert!(holds(&lab, "a1", VIP), "x's advertisements reached a1");
    assert_eq!(vip(&lab, "tv").await.owner_port_id, "a1");
    assert_eq!(who(&lab, "c2", VIP).as_deref(), Some("a1"));
    drop(kx);

    // Attack: a2 advertises at 250, above its declared 100.
    k2.crash();
    let over = drops(&lab, "h2", "vrrp_priority");
    let _k2 = keepalived(&lab, "a2", 250, VIP);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        drops(&lab, "h2", "vrrp_priority") > over,
        "a2's advertisements were not refused"
    );
    assert!(holds(&lab, "a1", VIP), "a2's advertisements reached a1");
    assert_eq!(vip(&lab, "tv").await.owner_port_id, "a1");
    assert_eq!(who(&lab, "c2", VIP).as_deref(), Some("a1"));

    // Attack: a3 floods advertisements (within its priority): one in 2 ms
    // at most is copied on, the rest are dropped where they are sent.
    let flooded = drops(&lab, "h1", "vrrp_interval");
    let sent: u64 = lab
        .topo
        .vm("a3")
        .ns
        .sh(&[
            bin("sdn-probe").to_str().unwrap(),
            "vrrp-flood",
            "eth0",
            "51",
            "50",
            VIP,
            "--count",
            "5000",
        ])
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let refused = drops(&lab, "h1", "vrrp_interval") - flooded;
    eprintln!("a3 sent {sent} advertisements; {refused} were dropped");
    assert!(
        sent == 5000 && refused >= sent * 3 / 4,
        "only {refused} of {sent} dropped"
    );
    assert_eq!(vip(&lab, "tv").await.owner_port_id, "a1");
    drop(k1);
    drop(servers);
}

/// The owner's VM answers on the VIP's IPv6 address (keepalived protects
/// the IPv4 one only here).
fn keep_v6(lab: &Lab, vm: &str) {
    let ns = &lab.topo.vm(vm).ns;
    let _ = ns.sh(&[
        "ip",
        "-6",
        "addr",
        "add",
        &format!("{VIP6}/128"),
        "dev",
        "eth0",
        "nodad",
    ]);
}

/// keepalived with `unicast_peer` (the usual setting where multicast is
/// not carried): each advertisement goes to the peer as an ordinary
/// packet, under the security groups; the holder that speaks still
/// becomes the owner, and fails over.
#[tokio::test]
async fn keepalived_with_unicast_peers_owns_its_virtual_ip() {
    if !privileged() {
        eprintln!("skipped: needs root");
        return;
    }
    let vip_u = "10.63.0.100";
    let lab = Lab::new("tvu", &["h1", "h2"])
        .vpc("v", None)
        .subnet("s", "v", "10.63.0.0/24", "")
        .group("open", open_rules())
        .vm("u1", "h1", "s", &["open"])
        .vm("u2", "h2", "s", &["open"])
        .vm("c2", "h2", "s", &["open"])
        .then(vec![virtual_ip(
            "uv",
            TENANT,
            "v",
            vip_u,
            52,
            false,
            &[("u1", 200), ("u2", 100)],
        )])
        .start()
        .await
        .unwrap();
    let mut servers: Vec<Proc> = Vec::new();
    for vm in ["u1", "u2"] {
        let ns = lab.topo.vm(vm).ns.name.clone();
        servers.push(
            Proc::spawn(
                &format!("name-{vm}"),
                Some(&ns),
                &bin("sdn-probe"),
                &["name", "8080", vm],
                &lab.topo.dir,
            )
            .unwrap(),
        );
    }
    let unicast = |vm: &str, peer: &str, priority: u8| {
        let (me, them) = (lab.topo.vm(vm).v4.clone(), lab.topo.vm(peer).v4.clone());
        let name = format!("kau-{vm}-{priority}");
        let conf = format!(
            "global_defs {{\n  router_id {name}\n  vrrp_version 3\n}}\n\
             vrrp_instance VI {{\n  state BACKUP\n  interface eth0\n  virtual_router_id 52\n  priority {priority}\n  \
             advert_int 0.1\n  unicast_src_ip {me}\n  unicast_peer {{\n    {them}\n  }}\n  \
             virtual_ipaddress {{\n    {vip_u}/24\n  }}\n}}\n"
        );
        Keepalived::start(&lab.topo.vm(vm).ns.name, &lab.topo.dir, &name, &conf).unwrap()
    };
    let mut k1 = unicast("u1", "u2", 200);
    let _k2 = unicast("u2", "u1", 100);
    owned_by(&lab, "uv", "u1", Duration::from_secs(10)).await;
    answered_by(&lab, "c2", vip_u, "u1", Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(500));
    assert!(holds(&lab, "u1", vip_u), "u1 is not Master");
    assert!(
        !holds(&lab, "u2", vip_u),
        "u2 is Master too: u1's advertisements do not reach it"
    );

    k1.crash();
    let t0 = Instant::now();
    owned_by(&lab, "uv", "u2", Duration::from_secs(10)).await;
    answered_by(&lab, "c2", vip_u, "u2", Duration::from_secs(5));
    eprintln!("unicast failover: {} ms", t0.elapsed().as_millis());
    drop(servers);
}

/// The controller's word on ports' claims: a preempting virtual IP goes
/// from a lease holder to a claimant of higher declared priority at once
/// (a holder that took it in a gap keeps it only until a higher one
/// claims again), never to a lower one while the lease runs; and its owner
/// changes at most once a second, however its holders give it back and
/// forth.
#[tokio::test]
async fn the_controller_preempts_by_declared_priority_and_damps_changes() {
    if !privileged() {
        eprintln!("skipped: needs root");
        return;
    }
    let lab = Lab::new("tvc", &["h1", "h2"])
        .vpc("v", None)
        .subnet("s", "v", "10.64.0.0/24", "")
        .group("open", open_rules())
        .vm("p1", "h1", "s", &["open"])
        .vm("p2", "h2", "s", &["open"])
        .then(vec![virtual_ip(
            "pv",
            TENANT,
            "v",
            "10.64.0.100",
            53,
            false,
            &[("p1", 200), ("p2", 100)],
        )])
        .start()
        .await
        .unwrap();
    let addr = std::sync::Arc::new(lab.cluster.addr.clone());
    let claim = move |host: &'static str, port: &'static str| {
        let addr = addr.clone();
        async move {
            let ch = sdn_proto::connect(addr.as_str()).await.unwrap();
            let g = pb::agent_client::AgentClient::new(ch)
                .claim_virtual_ips(pb::VipClaims {
                    host_id: host.into(),
                    claims: vec![pb::VipClaim {
                        virtual_ip_id: "pv".into(),
                        port_id: port.into(),
                        release: false,
                    }],
                })
                .await
                .unwrap()
                .into_inner()
                .grants;
            assert_eq!(g.len(), 1);
            g.into_iter().next().unwrap()
        }
    };
    // p2 (100) claims first and gets it.
    let g = claim("h2", "p2").await;
    assert!(g.granted, "{g:?}");
    // p1 (200) at once: damped, whatever its priority.
    let g = claim("h1", "p1").await;
    assert!(!g.granted && g.reason.contains("changed owner"), "{g:?}");
    // p2 keeps renewing its lease; a second on, p1 preempts it all the same.
    let renew = tokio::spawn({
        let claim = claim.clone();
        async move {
            let mut refused = None;
            for _ in 0..30 {
                let g = claim("h2", "p2").await;
                if !g.granted {
                    refused = Some(g.reason);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            refused
        }
    });
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let g = claim("h1", "p1").await;
    assert!(g.granted, "a higher holder did not preempt: {g:?}");
    assert_eq!(vip(&lab, "pv").await.owner_port_id, "p1");
    let refused = renew.await.unwrap().expect("p2's renewals went on being granted");
    assert!(refused.contains("held by port p1"), "{refused}");
    // The other way, a second on: p1 renews, p2 (lower) is refused.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(claim("h1", "p1").await.granted);
    let g = claim("h2", "p2").await;
    assert!(!g.granted && g.reason.contains("held by port p1"), "{g:?}");
    assert_eq!(vip(&lab, "pv").await.owner_port_id, "p1");
}
