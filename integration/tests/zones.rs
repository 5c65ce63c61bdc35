//! Zones end to end: an e-government extranet and the internet as two
//! networks (namespaces) reached through an uplink on every host, VPCs in
//! each, and exchange paths as the only crossings. nmap from the internet
//! sees only what an exchange path opens; the dataplane drops what crosses
//! otherwise even when the outside network routes it to us.

use sdn_integration::lab::Lab;
use sdn_integration::ops::*;
use sdn_integration::{bin, privileged, Proc};
use sdn_proto::v1 as pb;

/// A server of the extranet and a client/server of the internet.
const EXT_SERVER: &str = "10.99.0.1";
const NET_HOST: &str = "203.0.113.10";
const NET_HOST6: &str = "2001:db8:f00::10";

struct Env {
    _servers: Vec<Proc>,
    lab: Lab,
}

/// The extranet with a server, the internet with a host; dept-a's VPC in
/// the extranet with a1 (h1, 10.40.1.11) and a2 (h2, 10.40.1.12), both also
/// routed from the internet; the portal's VPC in the internet with p1 (h2,
/// 198.51.100.11). The internet may reach a1's HTTPS; a2 may fetch from one
/// internet server's port 80.
async fn setup(tag: &str) -> anyhow::Result<Env> {
    let lab = Lab::new(tag, &["h1", "h2"])
        .zone(
            "ext",
            "up-ext",
            "10.255.0",
            "fdf0:0:0:1",
            &["10.0.0.0/8", "fd00::/8"],
            &[EXT_SERVER],
        )
        .zone(
            "net",
            "up-net",
            "172.17.0",
            "fdf0:0:0:2",
            &["0.0.0.0/0", "::/0"],
            &[NET_HOST, NET_HOST6],
        )
        .tenant("dept-a")
        .vpc("va", Some("ext"))
        .subnet("a-web", "va", "10.40.1.0/24", "fd40:1::/64")
        .group("open-a", open_rules())
        .tenant("portal")
        .vpc("vp", Some("net"))
        .subnet("p-web", "vp", "198.51.100.0/24", "2001:db8:100::/64")
        .group("open-p", open_rules())
        .vm("a1", "h1", "a-web", &["open-a"])
        .vm("a2", "h2", "a-web", &["open-a"])
        .vm("p1", "h2", "p-web", &["open-p"])
        .announce("net", "a1")
        .announce("net", "a2")
        .then(vec![
            broad(
                exchange("in-https", "net", "ext", "0.0.0.0/0", "10.40.1.11/32", (443, 443)),
                "the public portal answers every internet user",
            ),
            exchange(
                "out-http",
                "ext",
                "net",
                "10.40.1.12/32",
                &format!("{NET_HOST}/32"),
                (80, 80),
            ),
            broad(
                exchange("in-https-v6", "net", "ext", "::/0", "fd40:1::11/128", (443, 443)),
                "the public portal answers every internet user",
            ),
        ])
        .start()
        .await?;
    let args = ["--tcp", "22", "--tcp", "80", "--tcp", "81", "--tcp", "443"];
    let servers = lab.topo.serve(&["a1", "a2", "p1"], &["ext", "net"], &args)?;
    Ok(Env { _servers: servers, lab })
}

impl Env {
    fn counter(&self, host: &str, group: &str, name: &str) -> u64 {
        self.lab.counter(host, group, name)
    }

    /// A TCP connection from a zone's network (bound to `src`) to `dst`.
    fn zone_connects(&self, zone: &str, src: &str, dst: &str, port: u16) -> bool {
        let ns = self.lab.topo.zone_ns(zone);
        let probe = bin("sdn-probe");
        let p = port.to_string();
        let attempt = || {
            ns.sh(&[
                probe.to_str().unwrap(),
                "connect",
                "tcp",
                dst,
                &p,
                "--bind",
                src,
                "--timeout-ms",
                "700",
            ])
            .is_ok()
        };
        attempt() || attempt()
    }

    /// The open TCP ports nmap finds on `dst` from a zone's network.
    fn nmap_open(&self, zone: &str, dst: &str) -> Vec<u16> {
        let mut args = vec![
            "nmap",
            "-n",
            "-Pn",
            "-sT",
            "-p",
            "22,80,81,443",
            "--max-retries",
            "1",
            "-oG",
            "-",
        ];
        if dst.contains(':') {
            args.push("-6");
        }
        args.push(dst);
        let out = self.lab.topo.zone_ns(zone).sh(&args).expect("nmap");
        let mut open = Vec::new();
        for line in out.lines().filter(|l| l.contains("Ports:")) {
            for entry in line.split("Ports:").nth(1).unwrap_or("").split(',') {
                let f: Vec<&str> = entry.trim().split('/').collect();
                if f.len() > 1 && f[1] == "open" {
                    open.push(f[0].parse().unwrap());
                }
            }
        }
        open
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn zones_meet_only_on_exchange_paths() {
    if !privileged() {
        eprintln!("skipping: needs root");
        return;
    }
    let env = setup("zna").await.expect("topology");
    let t = &env.lab.topo;

    // The cross-zone matrix, seen by nmap from the internet: a1 only on its
    // exchange port, a2 not at all; the internet zone's own VPC normally.
    let a1 = env.nmap_open("net", "10.40.1.11");
    let a2 = env.nmap_open("net", "10.40.1.12");
    let p1 = env.nmap_open("net", "198.51.100.11");
    eprintln!("nmap from the internet: a1 {a1:?}, a2 {a2:?}, p1 {p1:?}");
    assert_eq!(a1, vec![443], "a1 from the internet: only the exchange path's port");
    assert!(a2.is_empty(), "a2 from the internet: nothing");
    assert_eq!(
        p1,
        vec![22, 80, 81, 443],
        "the internet zone's own VPC: its security group decides"
    );
    // From the extranet, its own VPC is open and the internet VPC is not
    // even routed; p1 over IPv6 neither.
    assert_eq!(env.nmap_open("ext", "10.40.1.12"), vec![22, 80, 81, 443]);

    // IPv6 from an internet host: a1's exchange port only, a2 nothing.
    assert!(
        env.zone_connects("net", NET_HOST6, "fd40:1::11", 443),
        "v6 exchange path"
    );
    assert!(
        !env.zone_connects("net", NET_HOST6, "fd40:1::11", 22),
        "v6, no path for ssh"
    );
    assert!(
        !env.zone_connects("net", NET_HOST6, "fd40:1::12", 443),
        "v6, no path to a2"
    );

    // VMs going out: the same zone passes, another zone only on a path.
    assert!(
        t.reach_addr("a1", EXT_SERVER, "tcp", 80),
        "a1 -> extranet server (same zone)"
    );
    assert!(
        t.reach_addr("a2", NET_HOST, "tcp", 80),
        "a2 -> internet host port 80 (exchange path)"
    );
    let isolated = env.counter("h2", "drops", "zone_isolation");
    assert!(
        !t.reach_addr("a2", NET_HOST, "tcp", 81),
        "a2 -> internet port 81: no path"
    );
    assert!(
        !t.reach_addr("a2", NET_HOST6, "tcp", 80),
        "a2 -> internet over IPv6: no path"
    );
    assert!(
        !t.reach_addr("p1", EXT_SERVER, "tcp", 80),
        "p1 (internet zone) -> extranet: no path"
    );
    assert!(t.reach_addr("p1", NET_HOST, "tcp", 80), "p1 -> internet (same zone)");
    assert!(
        t.reach_addr("p1", NET_HOST6, "tcp", 80),
        "p1 -> internet over IPv6 (same zone)"
    );
    assert!(
        env.counter("h2", "drops", "zone_isolation") >= isolated + 3,
        "the uplink guard counts each refused flow"
    );
    assert!(env.counter("h2", "stats", "exchanged") > 0);

    // The outside network routes what it should not: the extranet router
    // sends traffic for the internet zone's VPC to our host. The guard on
    // the extranet uplink drops it.
    t.zone_ns("ext")
        .sh(&["ip", "route", "add", "198.51.100.11/32", "via", "10.255.0.12"])
        .unwrap();
    let before = env.counter("h2", "drops", "zone_isolation");
    assert!(
        !env.zone_connects("ext", EXT_SERVER, "198.51.100.11", 80),
        "extranet -> internet VPC"
    );
    assert!(env.counter("h2", "drops", "zone_isolation") > before);
    // An internet host pretending to be in the extranet is still the
    // internet: the zone is the uplink it came from, not its address.
    t.zone_ns("net")
        .sh(&["ip", "addr", "add", "10.99.0.7/32", "dev", "lo"])
        .unwrap();
    let before = env.counter("h1", "drops", "spoof_uplink");
    assert!(
        !env.zone_connects("net", "10.99.0.7", "10.40.1.11", 22),
        "spoofed extranet source"
    );
    assert!(env.counter("h1", "drops", "spoof_uplink") > before);
    // (On 443 the exchange path admits it, but a1 answers an extranet
    // address through the extranet uplink: the spoofer never hears back.)
    assert!(!env.zone_connects("net", "10.99.0.7", "10.40.1.11", 443));

    // An internet host claiming an unassigned address of the internet
    // zone's own VPC (to pass rules that trust the VPC's subnet): every
    // host drops it, though no port of that address lives there.
    t.zone_ns("net")
        .sh(&["ip", "addr", "add", "198.51.100.99/32", "dev", "lo"])
        .unwrap();
    let before = env.counter("h2", "drops", "spoof_uplink");
    assert!(
        !env.zone_connects("net", "198.51.100.99", "198.51.100.11", 80),
        "a source inside a VPC's subnet, from outside"
    );
    assert!(env.counter("h2", "drops", "spoof_uplink") > before);

    // A refused attempt leaves nothing behind: a2 sends a SYN from its
    // ssh port to an internet host's port 4444, which no path admits; the
    // internet host then opens the reversed flow (from 4444 to a2's ssh
    // port). It is a new flow from the internet, and no path admits it.
    let isolated = env.counter("h2", "drops", "zone_isolation");
    t.vm("a2")
        .ns
        .sh(&[
            // Debian's interpreter, which has python3-scapy.
            "/usr/bin/python3",
            "-c",
            &format!(
                "from scapy.all import IP, TCP, send\n\
                 send(IP(src='10.40.1.12', dst='{NET_HOST}')/TCP(sport=22, dport=4444, flags='S'), verbose=0)"
            ),
        ])
        .expect("scapy in a2");
    assert!(
        env.counter("h2", "drops", "zone_isolation") > isolated,
        "the refused SYN is counted"
    );
    // a2's side of the wire: what of the reversed flow reaches it.
    let capture = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &t.vm("a2").ns.name,
            "timeout",
            "4",
            "tcpdump",
            "-n",
            "-i",
            "eth0",
        ])
        .args(["-c", "1", "src host", NET_HOST, "and src port 4444"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("tcpdump in a2");
    std::thread::sleep(std::time::Duration::from_millis(800));
    let reversed = t.zone_ns("net").sh(&[
        "ncat",
        "--send-only",
        "-w",
        "1",
        "-p",
        "4444",
        "-s",
        NET_HOST,
        "10.40.1.12",
        "22",
    ]);
    assert!(
        reversed.is_err(),
        "the internet rides the reversed tuple of a refused attempt: {reversed:?}"
    );
    let seen = capture.wait_with_output().expect("tcpdump");
    let seen = String::from_utf8_lossy(&seen.stdout);
    assert!(
        !seen.contains("4444"),
        "a packet of the reversed flow reached a2: {seen}"
    );
    assert!(env.counter("h2", "drops", "zone_isolation") > isolated + 1);
}

fn border_policy(router_ssh_allowed: bool) -> pb::operation::Op {
    let ssh = if router_ssh_allowed {
        "allow in v4"
    } else {
        "deny in v4"
    };
    pb::operation::Op::PutFirewallPolicy(pb::FirewallPolicy {
        id: "ext-border".into(),
        name: "Extranet border of dept-a".into(),
        default_action: pb::Action::Deny as i32,
        rules: vec![
            // Listed out of order on purpose: priority decides.
            fw_rule("web", 20, "allow in v4", "tcp", (22, 80), "10.0.0.0/8"),
            fw_rule("router-ssh", 10, ssh, "tcp", (22, 22), "10.255.0.0/24"),
            fw_rule("https", 30, "allow in v4", "tcp", (443, 443), ""),
            fw_rule("https-v6", 31, "allow in v6", "tcp", (443, 443), ""),
            fw_rule("out", 40, "allow out v4", "any", (0, 0), ""),
            fw_rule("out-v6", 41, "allow out v6", "any", (0, 0), ""),
        ],
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn the_border_firewall_orders_its_rules_and_records_each_verdict() {
    if !privileged() {
        eprintln!("skipping: needs root");
        return;
    }
    let env = setup("znb").await.expect("topology");
    let t = &env.lab.topo;
    let mut va = vpc_in_zone("va", "dept-a", "ext");
    if let pb::operation::Op::PutVpc(v) = &mut va {
        v.border_policy_id = "ext-border".into();
    }
    env.lab
        .cluster
        .apply(vec![border_policy(false), va.clone()])
        .await
        .expect("attach the border firewall");

    // From the extranet router's own address: the earlier deny wins over the
    // later allow for SSH; HTTP by rule 20; 81 by the default; 443 by rule 30.
    assert_eq!(env.nmap_open("ext", "10.40.1.12"), vec![80, 443]);
    // From another extranet address, rule 10 does not match: SSH is open.
    assert!(env.zone_connects("ext", EXT_SERVER, "10.40.1.12", 22));
    // IPv6: only the IPv6 HTTPS rule admits anything.
    assert_eq!(env.nmap_open("ext", "fd40:1::12"), vec![443]);
    // The internet still meets the zone guard first, then the firewall.
    assert_eq!(env.nmap_open("net", "10.40.1.11"), vec![443]);
    // Outbound: allowed by rule 40.
    assert!(t.reach_addr("a1", EXT_SERVER, "tcp", 80));
    assert!(env.counter("h2", "drops", "border_firewall") > 0);

    // Every verdict names its rule.
    let verdicts = env.lab.cluster.verdicts(t, "h2");
    // (One entry per flow; nmap may try a port from more than one source port.)
    let rule_of = |remote: &str, port: u16| -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = verdicts
            .iter()
            .filter(|v| v["remote"] == remote && v["vm_port"] == port && v["vm"] == "10.40.1.12")
            .map(|v| {
                (
                    v["rule"].as_str().unwrap().to_string(),
                    v["action"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        v.dedup();
        v
    };
    assert_eq!(
        rule_of("10.255.0.1", 22),
        vec![("ext-border/router-ssh".into(), "deny".into())]
    );
    assert_eq!(
        rule_of("10.255.0.1", 80),
        vec![("ext-border/web".into(), "allow".into())]
    );
    assert_eq!(
        rule_of("10.255.0.1", 81),
        vec![("ext-border/default".into(), "deny".into())]
    );
    assert_eq!(
        rule_of("10.255.0.1", 443),
        vec![("ext-border/https".into(), "allow".into())]
    );

    // A policy change takes effect at once; removing the firewall leaves
    // zones and security groups in charge.
    env.lab
        .cluster
        .apply(vec![border_policy(true)])
        .await
        .expect("update the policy");
    assert!(
        env.zone_connects("ext", "10.255.0.1", "10.40.1.12", 22),
        "rule 10 now allows"
    );
    if let pb::operation::Op::PutVpc(v) = &mut va {
        v.border_policy_id.clear();
    }
    env.lab
        .cluster
        .apply(vec![va])
        .await
        .expect("detach the border firewall");
    assert_eq!(env.nmap_open("ext", "10.40.1.12"), vec![22, 80, 81, 443]);
    assert_eq!(env.nmap_open("net", "10.40.1.11"), vec![443], "the zone guard stays");
}
