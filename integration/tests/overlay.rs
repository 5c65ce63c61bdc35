//! The VPC overlay end to end: two tenants whose VPCs use the same
//! prefixes, VMs on two hosts, routing between the subnets of a VPC, the
//! subnet gateways answered by the host, and VXLAN packets with forged VNIs
//! or senders dropped at the receiving host.

use std::time::Duration;

use sdn_integration::lab::Lab;
use sdn_integration::ops::*;
use sdn_integration::{privileged, Proc, Topology};

const VNI_A: u32 = 100;
const VNI_B: u32 = 200;

/// Two tenants whose VPCs use the same prefixes: a1 (h1) and b1 (h2) have
/// the same addresses (10.20.0.11, fd20::11) in VPCs A and B; a2 (h2) is in
/// VPC A's other subnet (10.20.1.11), b2 (h1) beside b1 (10.20.0.12).
async fn setup(tag: &str) -> anyhow::Result<(Lab, Vec<Proc>)> {
    let lab = Lab::new(tag, &["h1", "h2"])
        .tenant("dept-a")
        .vpc_vni("va", VNI_A)
        .subnet("a-web", "va", "10.20.0.0/24", "fd20::/64")
        .subnet("a-db", "va", "10.20.1.0/24", "fd20:1::/64")
        .group("open-a", open_rules())
        .tenant("dept-b")
        .vpc_vni("vb", VNI_B)
        .subnet("b-web", "vb", "10.20.0.0/24", "fd20::/64")
        .group("open-b", open_rules())
        .vm("a1", "h1", "a-web", &["open-a"])
        .vm("a2", "h2", "a-db", &["open-a"])
        .vm("b1", "h2", "b-web", &["open-b"])
        .vm("b2", "h1", "b-web", &["open-b"])
        .start()
        .await?;
    let servers = lab
        .topo
        .serve(&["a1", "a2", "b1", "b2"], &[], &["--tcp", "80", "--udp", "53"])?;
    Ok((lab, servers))
}

/// tcpdump writing every IP packet seen on a namespace's eth0 to a file.
struct Capture {
    proc: Proc,
    file: std::path::PathBuf,
}

impl Capture {
    fn start(topo: &Topology, vm: &str) -> Capture {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let file = topo.dir.join(format!("{vm}-{n}.pcap"));
        let ns = topo.vm(vm).ns.name.clone();
        let proc = Proc::spawn(
            &format!("tcpdump-{vm}-{n}"),
            Some(&ns),
            std::path::Path::new("tcpdump"),
            &[
                "-i",
                "eth0",
                "--immediate-mode",
                "-U",
                "-nn",
                "-w",
                file.to_str().unwrap(),
                "ip or ip6",
            ],
            &topo.dir,
        )
        .expect("tcpdump");
        std::thread::sleep(Duration::from_millis(800));
        Capture { proc, file }
    }

    /// Stops the capture and returns the packets matching `filter`, one line each.
    fn finish(mut self, filter: &str) -> Vec<String> {
        std::thread::sleep(Duration::from_millis(300));
        self.proc.stop();
        let out = std::process::Command::new("tcpdump")
            .args(["-nn", "-r", self.file.to_str().unwrap(), filter])
            .output()
            .expect("tcpdump -r");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn subnets_route_across_hosts_and_overlapping_tenants_stay_apart() {
    if !privileged() {
        eprintln!("skipping: needs root");
        return;
    }
    let (lab, _servers) = setup("ovr").await.expect("topology");
    let t = &lab.topo;

    // The gateways answer ARP and neighbour solicitations with the gateway MAC.
    let arp = t
        .vm("a1")
        .ns
        .sh(&["arping", "-c", "1", "-w", "2", "-I", "eth0", "10.20.0.1"]);
    let arp = arp.expect("the IPv4 gateway answers ARP");
    assert!(arp.to_lowercase().contains("0e:5d:6e:00:00:01"), "gateway MAC in {arp}");
    let nd = t.vm("a1").ns.sh(&["ndisc6", "-1", "-r", "2", "fd20::1", "eth0"]);
    let nd = nd.expect("the IPv6 gateway answers neighbour solicitation");
    assert!(nd.to_lowercase().contains("0e:5d:6e:00:00:01"), "gateway MAC in {nd}");
    // An address nobody in the VPC has gets no answer, and is counted.
    let before = lab.counter("h1", "drops", "unknown_neighbour");
    assert!(t
        .vm("a1")
        .ns
        .sh(&["arping", "-c", "1", "-w", "1", "-I", "eth0", "10.20.0.77"])
        .is_err());
    assert!(lab.counter("h1", "drops", "unknown_neighbour") > before);

    // Between the subnets of one VPC, across hosts, both families.
    for v6 in [false, true] {
        assert!(t.reach("a1", "a2", "tcp", 80, v6), "a1 -> a2 tcp (v6={v6})");
        assert!(t.reach("a2", "a1", "udp", 53, v6), "a2 -> a1 udp (v6={v6})");
        assert!(t.reach("a2", "a1", "icmp", 0, v6), "a2 -> a1 icmp (v6={v6})");
        // Tenant B's overlapping VPC works on its own.
        assert!(t.reach("b2", "b1", "tcp", 80, v6), "b2 -> b1 tcp (v6={v6})");
        assert!(t.reach("b1", "b2", "icmp", 0, v6), "b1 -> b2 icmp (v6={v6})");
    }
    assert!(lab.counter("h1", "stats", "encapsulated") > 0);
    assert!(lab.counter("h2", "stats", "decapsulated") > 0);

    // Addresses of the other tenant are not reachable, even on the same
    // host: on-link ones are never resolved, routed ones have no route.
    let unresolved = lab.counter("h1", "drops", "unknown_neighbour");
    let unrouted = lab.counter("h2", "drops", "no_route");
    assert!(
        !t.reach_addr("a1", "10.20.0.12", "tcp", 80),
        "a1 must not reach b2's address"
    );
    assert!(!t.reach_addr("a1", "fd20::12", "icmp", 0), "nor its IPv6 address");
    assert!(
        !t.reach_addr("b1", "10.20.1.11", "tcp", 80),
        "b1 must not reach a2's address"
    );
    assert!(!t.reach_addr("b1", "fd20:1::11", "tcp", 80), "nor its IPv6 address");
    assert!(lab.counter("h1", "drops", "unknown_neighbour") > unresolved);
    assert!(lab.counter("h2", "drops", "no_route") >= unrouted + 4);

    // a2 (on h2) talks to 10.20.0.11 in VPC A: a1 on h1 sees it; b1, which
    // has that address in VPC B on a2's own host, sees none of it.
    let cap_a1 = Capture::start(t, "a1");
    let cap_b1 = Capture::start(t, "b1");
    for _ in 0..3 {
        assert!(t.reach("a2", "a1", "tcp", 80, false));
        assert!(t.reach("a2", "a1", "icmp", 0, true));
    }
    let seen_b1 = cap_b1.finish("src host 10.20.1.11 or src host fd20:1::11");
    let seen_a1 = cap_a1.finish("src host 10.20.1.11 or src host fd20:1::11");
    assert!(seen_a1.len() >= 6, "a1 sees a2's packets: {seen_a1:?}");
    assert!(
        seen_b1.is_empty(),
        "b1 must see none of tenant A's packets: {seen_b1:?}"
    );
}

/// Sends one VXLAN packet built by scapy from a namespace.
fn send_vxlan(ns: &str, outer_dst: &str, vni: u32, inner: &str, icmp_id: u16) {
    let script = format!(
        "from scapy.all import *\n\
         conf.verb = 0\n\
         inner = {inner}\n\
         p = IP(dst='{outer_dst}')/UDP(sport=40000, dport=4789)/VXLAN(vni={vni}, flags=0x08)/\
         Ether(src='02:aa:aa:aa:aa:aa', dst='0e:5d:6e:00:00:01')/inner\n\
         send(p, count=3, inter=0.05)\n"
    );
    let script = script.replace("ICMPID", &icmp_id.to_string());
    // Debian's interpreter, which has python3-scapy.
    sdn_integration::ns_sh(ns, &["/usr/bin/python3", "-c", &script]).expect("scapy send");
}

#[tokio::test(flavor = "multi_thread")]
async fn forged_vni_and_senders_are_dropped() {
    if !privileged() {
        eprintln!("skipping: needs root");
        return;
    }
    let (lab, _servers) = setup("ovf").await.expect("topology");
    let t = &lab.topo;
    let h1 = t.host_ns("h1").name.clone();
    let fabric = t.host_ns("fabric").name.clone();
    let h2_ip = t.underlay_ip("h2");
    let cap = Capture::start(t, "b1");
    let spoof_before = lab.counter("h2", "drops", "overlay_spoof");
    let unknown_before = lab.counter("h2", "drops", "overlay_unknown_destination");

    // From h1, tenant B's VNI on tenant A's address: 10.20.0.11 is in VPC B,
    // but there it lives on h2, not on h1.
    let v4 = "IP(src='10.20.0.11', dst='10.20.0.11')/ICMP(id=ICMPID)";
    send_vxlan(&h1, &h2_ip, VNI_B, v4, 1001);
    let v6 = "IPv6(src='fd20::11', dst='fd20::11')/ICMPv6EchoRequest(id=ICMPID)";
    send_vxlan(&h1, &h2_ip, VNI_B, v6, 1002);
    // From the fabric router, which is no host: even a real VPC B address
    // (b2's) is refused.
    let b2 = "IP(src='10.20.0.12', dst='10.20.0.11')/ICMP(id=ICMPID)";
    send_vxlan(&fabric, &h2_ip, VNI_B, b2, 1003);
    // An address no port of VPC A on h2 has.
    let nobody = "IP(src='10.20.0.11', dst='10.20.0.77')/ICMP(id=ICMPID)";
    send_vxlan(&h1, &h2_ip, VNI_A, nobody, 1004);

    let forged = cap.finish("icmp[4:2] == 1001 or icmp[4:2] == 1003 or (icmp6 and ip6[40] == 128)");
    let spoofed = lab.counter("h2", "drops", "overlay_spoof") - spoof_before;
    let unknown = lab.counter("h2", "drops", "overlay_unknown_destination") - unknown_before;
    eprintln!("overlay_spoof +{spoofed}, overlay_unknown_destination +{unknown}; b1 saw {forged:?}");
    assert!(forged.is_empty(), "no forged packet reaches b1: {forged:?}");
    assert_eq!(spoofed, 9, "three packets each of three forged kinds");
    assert_eq!(unknown, 3);
    // Control: what h1 may send (b2 lives on h1) is delivered.
    let cap = Capture::start(t, "b1");
    send_vxlan(&h1, &h2_ip, VNI_B, b2, 1005);
    let delivered = cap.finish("icmp[4:2] == 1005");
    assert!(
        delivered.iter().any(|l| l.contains("echo request")),
        "the control packet from the right host is delivered: {delivered:?}"
    );
}
