//! Flow records end to end: agents export the flows of their ports over
//! IPFIX to pmacct's `nfacctd`, a real collector, with the cloud's
//! enterprise elements mapped to named fields. The packets and octets it
//! reports for a TCP connection are those `tcpdump` counts inside the VM;
//! the connection's end (FIN) and a UDP exchange's idle timeout make
//! records of their own; a connection the security groups refuse is
//! reported as denied, naming the port and its groups.

use std::time::{Duration, Instant};

use sdn_integration::lab::Lab;
use sdn_integration::ops::*;
use sdn_integration::supervisor::{have, which, Nfacctd, PEN};
use sdn_integration::{privileged, Proc};

const T: &str = "dept-f";

/// Packets and IP octets of the rows `pick` selects.
fn sum(rows: &[serde_json::Value], pick: impl Fn(&serde_json::Value) -> bool) -> (u64, u64) {
    rows.iter().filter(|r| pick(r)).fold((0, 0), |(p, o), r| {
        (
            p + r["packets"].as_u64().unwrap_or(0),
            o + r["bytes"].as_u64().unwrap_or(0),
        )
    })
}

#[tokio::test]
async fn records_match_the_wire_and_name_the_cloud() {
    if !privileged() {
        return;
    }
    assert!(have("nfacctd"), "pmacct is missing: scripts/setup.sh installs it");
    assert!(
        have("tcpdump") && have("tshark"),
        "tcpdump and tshark are needed: scripts/setup.sh installs them"
    );
    let lab = Lab::new("flw", &["h1", "h2"])
        .tenant(T)
        .vpc_vni("vf", 4242)
        .subnet("snf", "vf", "10.44.0.0/24", "fd44::/64")
        .group(
            "web",
            vec![
                ingress("http", false, "tcp", (80, 80), "", ""),
                ingress("dns", false, "udp", (5353, 5353), "", ""),
            ],
        )
        .group("closed", vec![])
        .vm("vm1", "h1", "snf", &["web"])
        .vm("vm2", "h1", "snf", &["closed"])
        .vm("vm3", "h2", "snf", &["web"])
        .agent_args(&["--flow-collector", "udp://127.0.0.1:4739", "--flow-idle-timeout", "2"])
        .start()
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let collector = Nfacctd::start(&lab.topo.host_ns("h1").name, &dir.path().join("nfacctd"), 4739, "", "").unwrap();
    let _servers = lab
        .topo
        .serve(&["vm1", "vm3"], &[], &["--tcp", "80", "--udp", "5353"])
        .unwrap();
    let (vm1, vm2) = (lab.topo.vm("vm1"), lab.topo.vm("vm2"));
    let pcap = dir.path().join("vm1.pcap");
    let mut capture = Proc::spawn(
        "tcpdump",
        Some(&vm1.ns.name),
        &which("tcpdump"),
        &["-i", "eth0", "-U", "-n", "-w", pcap.to_str().unwrap(), "tcp port 80"],
        dir.path(),
    )
    .unwrap();
    wait("tcpdump to listen", Duration::from_secs(10), || {
        capture.log_text().contains("listening on")
    });

    // Allowed: vm2 -> vm1:80 over TCP (same host), vm1 -> vm3:5353 over UDP
    // (across hosts). Refused: vm1 -> vm2:22 (vm2's groups allow nothing in).
    assert!(lab.topo.reach("vm2", "vm1", "tcp", 80, false));
    assert!(lab.topo.reach("vm1", "vm3", "udp", 5353, false));
    assert!(!lab.topo.reach("vm1", "vm2", "tcp", 22, false));

    let done = |r: &[serde_json::Value]| {
        let fin = r
            .iter()
            .any(|x| x["vport"] == "vm1" && x["port_dst"] == 80 && x["end_reason"] == "3");
        let idle = r
            .iter()
            .any(|x| x["vport"] == "vm1" && x["port_dst"] == 5353 && x["end_reason"] == "1");
        let denied = r.iter().any(|x| x["verdict"] == "2" && x["port_dst"] == 22);
        fin && idle && denied
    };
    let deadline = Instant::now() + Duration::from_secs(40);
    while !done(&collector.rows()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // One more collection pass: the connection's last ACK is reported when
    // its entry goes, or at the next pass after the FIN.
    tokio::time::sleep(Duration::from_secs(6)).await;
    capture.stop();
    let all = collector.rows();
    let text: Vec<String> = all.iter().map(|r| r.to_string()).collect();
    let text = text.join("\n");
    assert!(
        done(&all),
        "the collector did not get every record:\n{text}\nagent h1:\n{}",
        lab.cluster.agent_log("h1")
    );

    // What tcpdump saw inside vm1, per direction: packets and IP octets.
    let seen = std::process::Command::new("tshark")
        .args([
            "-r",
            pcap.to_str().unwrap(),
            "-T",
            "fields",
            "-e",
            "ip.src",
            "-e",
            "ip.len",
        ])
        .output()
        .unwrap();
    let seen = String::from_utf8_lossy(&seen.stdout).to_string();
    let wire = |src: &str| {
        seen.lines()
            .filter_map(|l| l.split_once('\t'))
            .filter(|(s, _)| *s == src)
            .fold((0u64, 0u64), |(p, o), (_, len)| {
                (p + 1, o + len.trim().parse::<u64>().unwrap())
            })
    };
    let from_vm2 = sum(&all, |r| {
        r["vport"] == "vm1" && r["ip_src"] == vm2.v4.as_str() && r["port_dst"] == 80
    });
    let to_vm2 = sum(&all, |r| {
        r["vport"] == "vm1" && r["ip_dst"] == vm2.v4.as_str() && r["port_src"] == 80
    });
    assert!(wire(&vm2.v4).0 >= 4, "a connection's worth of packets: {seen}");
    assert_eq!(
        from_vm2,
        wire(&vm2.v4),
        "vm2 -> vm1:80, records:\n{text}\nwire:\n{seen}"
    );
    assert_eq!(to_vm2, wire(&vm1.v4), "vm1:80 -> vm2, records:\n{text}\nwire:\n{seen}");

    // The cloud's context, as the collector decoded it.
    let tcp = all.iter().find(|r| r["vport"] == "vm1" && r["port_dst"] == 80).unwrap();
    assert_eq!(tcp["tenant"], T, "{tcp}");
    assert_eq!(tcp["vpc"], "vf", "{tcp}");
    assert_eq!(tcp["rule"], "sg/web", "{tcp}");
    assert_eq!(tcp["verdict"], "1", "{tcp}");
    assert_eq!(tcp["ip_proto"], "tcp", "{tcp}");
    // layer2SegmentId: VXLAN (type 1) and the VPC's VNI.
    let seg = tcp["segment"]
        .as_str()
        .map(|s| s.parse::<u64>().unwrap())
        .or(tcp["segment"].as_u64());
    assert_eq!(seg, Some((1u64 << 56) | 4242), "{tcp}");
    // The same connection seen at vm2's port, as vm2's.
    assert!(
        all.iter()
            .any(|r| r["vport"] == "vm2" && r["port_dst"] == 80 && r["rule"] == "sg/closed"),
        "{text}"
    );
    // Across hosts, vm3's answer comes in at vm1's port.
    assert!(
        all.iter()
            .any(|r| r["vport"] == "vm1" && r["port_src"] == 5353 && r["ip_src"] == lab.topo.vm("vm3").v4.as_str()),
        "{text}"
    );

    // The refused connection: reported at the port whose groups refused
    // it, as denied (firewallEvent 3), naming its groups.
    let denied = all.iter().find(|r| r["verdict"] == "2" && r["port_dst"] == 22).unwrap();
    assert_eq!(denied["vport"], "vm2", "{denied}");
    assert_eq!(denied["rule"], "sg/closed", "{denied}");
    assert_eq!(denied["fwevent"], "3", "{denied}");
    assert_eq!(denied["ip_src"], vm1.v4.as_str(), "{denied}");
    assert_eq!(denied["tenant"], T, "{denied}");
    let (p, o) = sum(&all, |r| r["verdict"] == "2" && r["port_dst"] == 22);
    assert!(
        p >= 2 && o >= 2 * 40,
        "both SYNs of the two attempts at least: {p} packets, {o} octets"
    );

    let log = lab.cluster.agent_log("h1");
    assert!(log.contains("flow records exported over IPFIX"), "{log}");
}

fn wait(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// TCP and DNS records: a VM asks a VM that serves DNS (dnsmasq) on another
/// host, and opens two connections to a third. The agent's records say
/// what `dig` saw: the name, the type, the code, each answer's TTL and
/// data; and who opened which connection, how it ended, how many.
#[tokio::test]
async fn records_describe_tcp_connections_and_dns_answers() {
    if !privileged() {
        return;
    }
    assert!(
        have("dnsmasq") && have("dig"),
        "dnsmasq and dig are needed: scripts/setup.sh installs them"
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("records-{host}.json");
    let lab = Lab::new("rec", &["h1", "h2"])
        .tenant(T)
        .vpc_vni("vr", 4545)
        .subnet("snr", "vr", "10.48.0.0/24", "")
        .group("dns", vec![ingress("dns", false, "udp", (53, 53), "", "")])
        .group("web", vec![ingress("http", false, "tcp", (80, 80), "", "")])
        .vm("vm1", "h1", "snr", &[])
        .vm("vm2", "h2", "snr", &["dns"])
        .vm("vm3", "h1", "snr", &["web"])
        .agent_args(&[
            "--records-file",
            file.to_str().unwrap(),
            "--flow-collector",
            "udp://127.0.0.1:4739",
        ])
        .start()
        .await
        .unwrap();
    let (vm1, vm2, vm3) = (lab.topo.vm("vm1"), lab.topo.vm("vm2"), lab.topo.vm("vm3"));
    // The same records over IPFIX, to nfacctd, our elements named.
    let collected = tempfile::tempdir().unwrap();
    let collector = Nfacctd::start(
        &lab.topo.host_ns("h1").name,
        collected.path(),
        4739,
        &format!(
            "name=node\tfield_type={PEN}:7\tlen=vlen\tsemantics=str\n\
             name=dnsname\tfield_type={PEN}:20\tlen=vlen\tsemantics=str\n\
             name=dnsanswers\tfield_type={PEN}:24\tlen=vlen\tsemantics=str\n\
             name=connections\tfield_type={PEN}:31\tlen=4\tsemantics=u_int\n"
        ),
        ",node,dnsname,dnsanswers,connections",
    )
    .unwrap();
    let _dns = Proc::spawn(
        "dnsmasq",
        Some(&vm2.ns.name),
        &which("dnsmasq"),
        &[
            "--no-daemon",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            &format!("--listen-address={}", vm2.v4),
            "--local=/gov.test/",
            "--local-ttl=123",
            "--host-record=portal.gov.test,10.48.0.80",
            "--host-record=mail.gov.test,10.48.0.81",
            "--pid-file=",
        ],
        dir.path(),
    )
    .unwrap();
    let _web = lab.topo.serve(&["vm3"], &[], &["--tcp", "80"]).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let dig = |name: &str| {
        let out = vm1
            .ns
            .sh(&[
                "dig",
                &format!("@{}", vm2.v4),
                name,
                "A",
                "+time=2",
                "+tries=2",
                "+noall",
                "+answer",
                "+comments",
            ])
            .unwrap_or_default();
        out
    };
    let portal = dig("portal.gov.test");
    assert!(portal.contains("10.48.0.80") && portal.contains("NOERROR"), "{portal}");
    let nope = dig("nope.gov.test");
    assert!(nope.contains("NXDOMAIN"), "{nope}");
    // dig's own account of the answer: TTL and address.
    let answer: Vec<&str> = portal
        .lines()
        .find(|l| l.starts_with("portal.gov.test."))
        .expect("an answer line")
        .split_whitespace()
        .collect();
    assert!(lab.topo.reach("vm1", "vm3", "tcp", 80, false));
    assert!(lab.topo.reach("vm1", "vm3", "tcp", 80, false));

    let h1 = dir.path().join("records-h1.json");
    let read = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(&h1)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    let done = |r: &[serde_json::Value]| {
        r.iter()
            .any(|x| x["record"] == "dns" && x["query"] == "portal.gov.test.")
            && r.iter().any(|x| x["record"] == "dns" && x["query"] == "nope.gov.test.")
            && r.iter().any(|x| x["record"] == "tcp" && x["port"] == "vm1")
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done(&read()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let all = read();
    let text: Vec<String> = all.iter().map(|r| r.to_string()).collect();
    let text = text.join("\n");
    assert!(
        done(&all),
        "records missing:\n{text}\nagent h1:\n{}",
        lab.cluster.agent_log("h1")
    );

    let d = all
        .iter()
        .find(|x| x["record"] == "dns" && x["query"] == "portal.gov.test.")
        .unwrap();
    assert_eq!(d["node"], "h1", "{d}");
    assert_eq!(d["port"], "vm1", "{d}");
    assert_eq!(d["tenant"], T, "{d}");
    assert_eq!(d["query_type"], "A", "{d}");
    assert_eq!(d["rcode"], "No Error", "{d}");
    assert_eq!(d["client"], vm1.v4.as_str(), "{d}");
    assert_eq!(d["server"], vm2.v4.as_str(), "{d}");
    assert_eq!(d["server_port"], 53, "{d}");
    assert_eq!(d["answer_count"], 1, "{d}");
    assert_eq!(d["answers"][0]["type"], "A", "{d}");
    assert_eq!(d["answers"][0]["data"], answer[4], "{d} / dig: {portal}");
    assert_eq!(d["answers"][0]["ttl"].to_string(), answer[1], "{d} / dig: {portal}");
    assert_eq!(d["min_ttl"], 123, "{d}");
    let n = all
        .iter()
        .find(|x| x["record"] == "dns" && x["query"] == "nope.gov.test.")
        .unwrap();
    assert_eq!(
        (n["rcode"].as_str(), n["answer_count"].as_u64()),
        (Some("Non-Existent Domain"), Some(0)),
        "{n}"
    );

    let tcp: Vec<&serde_json::Value> = all
        .iter()
        .filter(|x| x["record"] == "tcp" && x["port"] == "vm1")
        .collect();
    assert_eq!(tcp.len(), 2, "{text}");
    for t in &tcp {
        assert_eq!(t["client"], vm1.v4.as_str(), "{t}");
        assert_eq!(t["server"], vm3.v4.as_str(), "{t}");
        assert_eq!(t["server_port"], 80, "{t}");
        assert_eq!(t["state"], "closed", "{t}");
        assert_eq!(t["node"], "h1", "{t}");
        assert_eq!(t["node_type"], "agent", "{t}");
        assert!(t["packets"].as_u64().unwrap() >= 4, "{t}");
        assert!(t["first_packet"].as_str().unwrap().ends_with('Z'), "{t}");
        assert!(t["connections"].as_u64().unwrap() >= 1, "{t}");
    }
    // vm3 saw the same connections, as their server.
    assert!(
        all.iter()
            .any(|x| x["record"] == "tcp" && x["port"] == "vm3" && x["client"] == vm1.v4.as_str()),
        "{text}"
    );

    // Over IPFIX, as nfacctd decoded them.
    let deadline = Instant::now() + Duration::from_secs(10);
    let got = |r: &[serde_json::Value]| {
        r.iter()
            .any(|x| x["dnsname"] == "portal.gov.test." && x["dnsanswers"] == format!("A {} {}", answer[1], answer[4]))
            && r.iter().any(|x| {
                x["vport"] == "vm1"
                    && x["node"] == "h1"
                    && x["port_dst"] == 80
                    && matches!(x["connections"].as_str(), Some("1" | "2"))
            })
    };
    while !got(&collector.rows()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let r = collector.rows();
    let shown: Vec<String> = r.iter().map(|x| x.to_string()).collect();
    assert!(got(&r), "nfacctd has:\n{}", shown.join("\n"));
    let dns = r.iter().find(|x| x["dnsname"] == "portal.gov.test.").unwrap();
    assert_eq!(
        (dns["ip_src"].as_str(), dns["port_src"].as_u64()),
        (Some(vm2.v4.as_str()), Some(53)),
        "{dns}"
    );
    assert_eq!(dns["tenant"], T, "{dns}");
}
