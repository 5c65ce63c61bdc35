//! VRRPv3 on the wire, against keepalived: our speaker (`sdn-agent vrrp`,
//! the code the agent runs for the virtual IPs its host holds) and a real
//! keepalived in one virtual router on one link elect each other both
//! ways, take over within a second when the other is killed, and tshark
//! decodes every advertisement of both as VRRPv3 with a good checksum.

use std::path::Path;
use std::time::{Duration, Instant};

use sdn_integration::keepalived::{instance, Keepalived};
use sdn_integration::{bin, privileged, sh, wait_for, Netns, Proc};

const VIP: &str = "10.77.0.100";

fn keepalived(ns: &str, dir: &Path, name: &str, priority: u8) -> Keepalived {
    Keepalived::start(ns, dir, name, &instance(name, 51, priority, "0.1", 3, VIP)).unwrap()
}

/// Whether `ns` holds the VIP on its link (keepalived adds it as Master
/// and removes it as Backup).
fn holds_vip(ns: &str) -> bool {
    sh(&["ip", "-n", ns, "-br", "addr", "show", "dev", "eth0"]).is_ok_and(|s| s.contains(VIP))
}

/// The states our speaker printed, in order.
fn states(p: &Proc) -> Vec<String> {
    p.log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["state"].as_str().map(str::to_string))
        .collect()
}

/// Polls every 5 ms: how long until `f` holds, at most `limit`.
fn time_until(limit: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if f() {
            return Some(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

fn ours(ns: &str, dir: &Path, name: &str, priority: u8) -> Proc {
    let prio = priority.to_string();
    Proc::spawn(
        name,
        Some(ns),
        &bin("sdn-agent"),
        &[
            "vrrp",
            "--interface",
            "eth0",
            "--vrid",
            "51",
            "--priority",
            &prio,
            "--address",
            VIP,
        ],
        dir,
    )
    .unwrap()
}

#[test]
fn keepalived_and_ours_elect_each_other_both_ways() {
    if !privileged() {
        eprintln!("skipped: needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // A link: a bridge, keepalived's end (a), ours (b) and an observer (c).
    let br = Netns::new("vrp-br").unwrap();
    br.sh(&["ip", "link", "add", "br0", "type", "bridge"]).unwrap();
    br.sh(&["ip", "link", "set", "br0", "up"]).unwrap();
    let mut ends = Vec::new();
    for (i, n) in ["a", "b", "c"].iter().enumerate() {
        let ns = Netns::new(&format!("vrp-{n}")).unwrap();
        let peer = format!("vrp{n}");
        sh(&[
            "ip", "link", "add", "eth0", "netns", &ns.name, "type", "veth", "peer", "name", &peer, "netns", &br.name,
        ])
        .unwrap();
        br.sh(&["ip", "link", "set", &peer, "master", "br0", "up"]).unwrap();
        ns.sh(&["ip", "addr", "add", &format!("10.77.0.{}/24", i + 1), "dev", "eth0"])
            .unwrap();
        ns.sh(&["ip", "link", "set", "eth0", "up"]).unwrap();
        ends.push(ns);
    }
    let pcap = dir.path().join("vrrp.pcap");
    let mut capture = Proc::spawn(
        "tshark",
        Some("vrp-c"),
        Path::new("/usr/bin/tshark"),
        &["-i", "eth0", "-f", "ip proto 112", "-w", pcap.to_str().unwrap()],
        dir.path(),
    )
    .unwrap();
    wait_for("the capture", Duration::from_secs(10), || pcap.exists()).unwrap();

    // 1. keepalived (100) alone is Master; ours (200) preempts it.
    let mut ka = keepalived("vrp-a", dir.path(), "ka", 100);
    wait_for("keepalived to take the VIP", Duration::from_secs(10), || {
        holds_vip("vrp-a")
    })
    .unwrap();
    let mut us = ours("vrp-b", dir.path(), "ours-200", 200);
    wait_for("ours to become Master", Duration::from_secs(5), || {
        states(&us).last().map(String::as_str) == Some("master")
    })
    .unwrap();
    wait_for("keepalived to yield", Duration::from_secs(5), || !holds_vip("vrp-a")).unwrap();
    assert_eq!(states(&us), ["backup", "master"]);
    // Held: keepalived stays Backup while ours advertises.
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        !holds_vip("vrp-a"),
        "keepalived took the VIP from a live Master of higher priority"
    );
    assert_eq!(states(&us), ["backup", "master"]);

    // 2. Ours crashes: keepalived takes over within a second
    // (3 x 100 ms + skew).
    us.kill();
    let took = time_until(Duration::from_secs(3), || holds_vip("vrp-a"));
    let took = took.expect("keepalived never took over from our crashed Master");
    assert!(took < Duration::from_millis(1000), "keepalived took {took:?}");
    eprintln!("keepalived took over from ours in {took:?}");

    // 3. Ours (50) joins as Backup and stays so under keepalived (100).
    let mut us = ours("vrp-b", dir.path(), "ours-50", 50);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(states(&us), ["backup"], "{}", us.log_text());
    assert!(holds_vip("vrp-a"));

    // 4. keepalived crashes: ours takes over within a second.
    let t0 = Instant::now();
    ka.crash();
    let took = time_until(Duration::from_secs(3), || {
        states(&us).last().map(String::as_str) == Some("master")
    })
    .expect("ours never took over from crashed keepalived");
    assert!(took < Duration::from_millis(1000), "ours took {took:?}");
    eprintln!(
        "ours took over from keepalived in {took:?} ({:?} since the kill)",
        t0.elapsed()
    );
    // keepalived's address is its own business once it is dead; clear it
    // so the next check sees only what a new keepalived does.
    let _ = sh(&["ip", "-n", "vrp-a", "addr", "del", &format!("{VIP}/24"), "dev", "eth0"]);

    // 5. keepalived (100) comes back and preempts ours (50); ours yields.
    let mut ka2 = keepalived("vrp-a", dir.path(), "ka2", 100);
    wait_for("keepalived to take the VIP back", Duration::from_secs(10), || {
        holds_vip("vrp-a")
    })
    .unwrap();
    wait_for("ours to yield", Duration::from_secs(5), || {
        states(&us).last().map(String::as_str) == Some("backup")
    })
    .unwrap();
    assert_eq!(states(&us), ["backup", "master", "backup"]);

    // 6. keepalived resigns (SIGTERM sends priority 0): ours takes over
    // after its skew alone, well before three intervals.
    ka2.resign();
    let took = time_until(Duration::from_secs(3), || {
        states(&us).last().map(String::as_str) == Some("master")
    })
    .expect("ours never took over from resigning keepalived");
    eprintln!("ours took over from resigning keepalived in {took:?}");
    us.stop();
    assert_eq!(states(&us).last().map(String::as_str), Some("initialize"));
    drop(ka2);
    std::thread::sleep(Duration::from_millis(300));
    capture.stop();

    // tshark decodes every advertisement of both as VRRPv3, TTL 255, with
    // a good checksum, and sees ours resign with priority 0.
    let out = sh(&[
        "tshark",
        "-r",
        pcap.to_str().unwrap(),
        "-T",
        "fields",
        "-e",
        "ip.src",
        "-e",
        "vrrp.version",
        "-e",
        "vrrp.checksum.status",
        "-e",
        "ip.ttl",
        "-e",
        "vrrp.prio",
        "-e",
        "vrrp.ip_addr",
    ])
    .unwrap();
    let mut per_source = std::collections::BTreeMap::<String, usize>::new();
    let mut resigned = Vec::new();
    for line in out.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        assert_eq!(f.len(), 6, "{line}");
        assert_eq!(
            (f[1], f[2], f[3], f[5]),
            ("3", "1", "255", VIP),
            "not a good VRRPv3 advertisement: {line}"
        );
        *per_source.entry(f[0].to_string()).or_default() += 1;
        if f[4] == "0" {
            resigned.push(f[0].to_string());
        }
    }
    eprintln!("advertisements by source: {per_source:?}, resignations: {resigned:?}");
    assert!(per_source.get("10.77.0.1").is_some_and(|n| *n >= 10), "{per_source:?}");
    assert!(per_source.get("10.77.0.2").is_some_and(|n| *n >= 10), "{per_source:?}");
    assert!(
        resigned.contains(&"10.77.0.2".to_string()),
        "ours never resigned: {resigned:?}"
    );
    drop(ends);
}

const VIP6: &str = "fd77::100";

fn keepalived6(ns: &str, dir: &Path, name: &str, priority: u8) -> Keepalived {
    let conf = format!(
        "global_defs {{\n  router_id {name}\n  vrrp_version 3\n}}\n\
         vrrp_instance VI6 {{\n  state BACKUP\n  interface eth0\n  virtual_router_id 52\n  priority {priority}\n  \
         advert_int 0.1\n  virtual_ipaddress {{\n    {VIP6}/64\n  }}\n}}\n"
    );
    Keepalived::start(ns, dir, name, &conf).unwrap()
}

fn holds_vip6(ns: &str) -> bool {
    sh(&["ip", "-n", ns, "-br", "-6", "addr", "show", "dev", "eth0"]).is_ok_and(|s| s.contains(VIP6))
}

/// VRRPv3 over IPv6 (from link-local addresses to ff02::12): ours and
/// keepalived elect each other both ways, and ours announces the address
/// with an unsolicited NA (Router and Override flags) on taking it.
#[test]
fn keepalived_and_ours_elect_each_other_over_ipv6() {
    if !privileged() {
        eprintln!("skipped: needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let br = Netns::new("vrp-br6").unwrap();
    br.sh(&["ip", "link", "add", "br0", "type", "bridge"]).unwrap();
    br.sh(&["ip", "link", "set", "br0", "up"]).unwrap();
    let mut ends = Vec::new();
    for n in ["a6", "b6", "c6"] {
        let ns = Netns::new(&format!("vrp-{n}")).unwrap();
        // Link-local addresses usable at once.
        ns.sysctl("net.ipv6.conf.all.accept_dad=0").unwrap();
        ns.sysctl("net.ipv6.conf.default.accept_dad=0").unwrap();
        let peer = format!("vrp{n}");
        sh(&[
            "ip", "link", "add", "eth0", "netns", &ns.name, "type", "veth", "peer", "name", &peer, "netns", &br.name,
        ])
        .unwrap();
        br.sh(&["ip", "link", "set", &peer, "master", "br0", "up"]).unwrap();
        ns.sh(&["ip", "link", "set", "eth0", "up"]).unwrap();
        ends.push(ns);
    }
    let pcap = dir.path().join("vrrp6.pcap");
    let mut capture = Proc::spawn(
        "tshark6",
        Some("vrp-c6"),
        Path::new("/usr/bin/tshark"),
        &[
            "-i",
            "eth0",
            "-f",
            "ip6 proto 112 or icmp6",
            "-w",
            pcap.to_str().unwrap(),
        ],
        dir.path(),
    )
    .unwrap();
    wait_for("the capture", Duration::from_secs(10), || pcap.exists()).unwrap();
    let ours6 = |name: &str, priority: u8| {
        let prio = priority.to_string();
        Proc::spawn(
            name,
            Some("vrp-b6"),
            &bin("sdn-agent"),
            &[
                "vrrp",
                "--interface",
                "eth0",
                "--vrid",
                "52",
                "--priority",
                &prio,
                "--address",
                VIP6,
            ],
            dir.path(),
        )
        .unwrap()
    };

    // keepalived (100) alone is Master; ours (200) preempts it.
    let mut ka = keepalived6("vrp-a6", dir.path(), "ka6", 100);
    wait_for("keepalived to take the VIP", Duration::from_secs(10), || {
        holds_vip6("vrp-a6")
    })
    .unwrap();
    let mut us = ours6("ours6-200", 200);
    wait_for("ours to become Master", Duration::from_secs(5), || {
        states(&us).last().map(String::as_str) == Some("master")
    })
    .unwrap();
    wait_for("keepalived to yield", Duration::from_secs(5), || !holds_vip6("vrp-a6")).unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        !holds_vip6("vrp-a6"),
        "keepalived took the VIP from a live Master of higher priority"
    );
    assert_eq!(states(&us), ["backup", "master"], "{}", us.log_text());

    // Ours crashes: keepalived takes over within a second.
    us.kill();
    let took = time_until(Duration::from_secs(3), || holds_vip6("vrp-a6"))
        .expect("keepalived never took over from our crashed Master");
    assert!(took < Duration::from_millis(1000), "keepalived took {took:?}");

    // Ours (50) stays Backup under keepalived; keepalived crashes and ours
    // takes over within a second.
    let mut us = ours6("ours6-50", 50);
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(states(&us), ["backup"], "{}", us.log_text());
    ka.crash();
    let took = time_until(Duration::from_secs(3), || {
        states(&us).last().map(String::as_str) == Some("master")
    })
    .expect("ours never took over from crashed keepalived");
    assert!(took < Duration::from_millis(1000), "ours took {took:?}");
    std::thread::sleep(Duration::from_millis(300));
    us.stop();
    std::thread::sleep(Duration::from_millis(300));
    capture.stop();

    // Every advertisement decodes as VRRPv3 with a good checksum and hop
    // limit 255, from a link-local address, for the VIP.
    let out = sh(&[
        "tshark",
        "-r",
        pcap.to_str().unwrap(),
        "-Y",
        "vrrp",
        "-T",
        "fields",
        "-e",
        "ipv6.src",
        "-e",
        "vrrp.version",
        "-e",
        "vrrp.checksum.status",
        "-e",
        "ipv6.hlim",
        "-e",
        "vrrp.ipv6_addr",
    ])
    .unwrap();
    let mut per_source = std::collections::BTreeMap::<String, usize>::new();
    for line in out.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        assert_eq!(f.len(), 5, "{line}");
        assert_eq!(
            (f[1], f[2], f[3], f[4]),
            ("3", "1", "255", VIP6),
            "not a good advertisement: {line}"
        );
        assert!(f[0].starts_with("fe80::"), "not from a link-local address: {line}");
        *per_source.entry(f[0].to_string()).or_default() += 1;
    }
    eprintln!("IPv6 advertisements by source: {per_source:?}");
    assert_eq!(per_source.len(), 2, "{per_source:?}");
    assert!(per_source.values().all(|n| *n >= 10), "{per_source:?}");
    // Ours announced the VIP: an unsolicited NA, Router and Override set,
    // Solicited not, hop limit 255, to all nodes, good checksum.
    let na = sh(&[
        "tshark",
        "-r",
        pcap.to_str().unwrap(),
        "-Y",
        "icmpv6.type == 136",
        "-T",
        "fields",
        "-e",
        "ipv6.src",
        "-e",
        "ipv6.dst",
        "-e",
        "ipv6.hlim",
        "-e",
        "icmpv6.nd.na.flag.r",
        "-e",
        "icmpv6.nd.na.flag.s",
        "-e",
        "icmpv6.nd.na.flag.o",
        "-e",
        "icmpv6.nd.na.target_address",
        "-e",
        "icmpv6.checksum.status",
    ])
    .unwrap();
    eprintln!("neighbour advertisements:\n{na}");
    assert!(
        na.lines()
            .any(|l| l.split('\t').collect::<Vec<_>>() == [VIP6, "ff02::1", "255", "1", "0", "1", VIP6, "1"]),
        "no unsolicited NA for the VIP from ours:\n{na}"
    );
    drop(ends);
}
