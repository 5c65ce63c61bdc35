//! Mirror sessions, checked with tcpdump and tshark: a port's traffic in
//! both directions reaches a tap port on its host (copied in the kernel)
//! and on another host (in VXLAN between the hosts), packet for packet
//! what tcpdump sees inside the mirrored VM; an ERSPAN type III collector
//! and a VXLAN collector get copies cut to the snap length and sampled
//! one in N, which tshark decodes; over its rate a session drops copies,
//! counted, and the traffic itself loses nothing. Only admins create
//! sessions; supervisors read them, tenants do not see them; a VNI of a
//! VPC is refused; a selection of no port is a warning.

use std::path::Path;
use std::time::{Duration, Instant};

use sdn_integration::cluster::{Cluster, ADMIN, PLATFORM};
use sdn_integration::lab::Lab;
use sdn_integration::ops::*;
use sdn_integration::supervisor::{have, which};
use sdn_integration::{privileged, Proc};
use sdn_proto::v1 as pb;

fn wait(what: &str, within: Duration, f: impl Fn() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// tcpdump writing `file`, in `ns`, on `dev`, with `filter`.
fn capture(ns: &str, dev: &str, file: &Path, filter: &str, dir: &Path) -> Proc {
    let mut args = vec!["-i", dev, "-U", "-n", "-w", file.to_str().unwrap()];
    args.extend(filter.split(' ').filter(|w| !w.is_empty()));
    let p = Proc::spawn("tcpdump", Some(ns), &which("tcpdump"), &args, dir).unwrap();
    wait("tcpdump to listen", Duration::from_secs(10), || {
        p.log_text().contains("listening on")
    });
    // It says so a little before its socket takes packets.
    std::thread::sleep(Duration::from_millis(500));
    p
}

/// tshark's fields of every packet of `file` that `filter` keeps (of a
/// field that occurs more than once, as in a tunnel, the innermost).
fn fields(file: &Path, decode: &[&str], filter: &str, fields: &[&str]) -> Vec<Vec<String>> {
    fields_at(file, decode, filter, fields, "l")
}

fn fields_at(file: &Path, decode: &[&str], filter: &str, fields: &[&str], occurrence: &str) -> Vec<Vec<String>> {
    let mut args: Vec<String> = vec![
        "-r".into(),
        file.display().to_string(),
        "-E".into(),
        format!("occurrence={occurrence}"),
    ];
    for d in decode {
        args.extend(["-d".into(), d.to_string()]);
    }
    if !filter.is_empty() {
        args.extend(["-Y".into(), filter.into()]);
    }
    args.extend(["-T".into(), "fields".into()]);
    for f in fields {
        args.extend(["-e".into(), f.to_string()]);
    }
    let out = std::process::Command::new("tshark").args(&args).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split('\t').map(str::to_string).collect())
        .collect()
}

/// ICMP echo requests and replies of `file` between `a` and `b`, as
/// (source, type, sequence) lines, sorted.
fn echoes(file: &Path, decode: &[&str], a: &str, b: &str) -> Vec<String> {
    let filter = format!("icmp && ip.addr == {a} && ip.addr == {b}");
    let mut v: Vec<String> = fields(file, decode, &filter, &["ip.src", "icmp.type", "icmp.seq"])
        .into_iter()
        .map(|f| f.join(" "))
        .collect();
    v.sort();
    v
}

fn ping(lab: &Lab, from: &str, to: &str, n: u32, interval: &str) -> String {
    let t = &lab.topo;
    t.vm(from)
        .ns
        .sh(&[
            "ping",
            "-q",
            "-c",
            &n.to_string(),
            "-i",
            interval,
            "-W",
            "1",
            &t.vm(to).v4,
        ])
        .unwrap_or_else(|e| format!("{e}"))
}

fn mirror_counters(lab: &Lab, host: &str) -> serde_json::Value {
    lab.drops(host).expect("counters")["mirror"].clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn mirror_sessions_copy_to_taps_and_collectors_and_never_touch_the_traffic() {
    if !privileged() {
        eprintln!("skipping: needs root");
        return;
    }
    assert!(
        have("tcpdump") && have("tshark"),
        "tcpdump and tshark are needed: scripts/setup.sh installs them"
    );
    let lab = Lab::new("mir", &["h1", "h2"])
        .tenant("t")
        .vpc("v", None)
        .subnet("s", "v", "10.80.0.0/24", "fd80::/64")
        .group("open", open_rules())
        .vm("vm1", "h1", "s", &["open"])
        .vm("vm2", "h1", "s", &["open"])
        .vm("vm3", "h2", "s", &["open"])
        // The supervisor's taps: no group, so nothing of their own gets in.
        .vm("tap1", "h1", "s", &[])
        .vm("tap2", "h2", "s", &[])
        .start()
        .await
        .expect("lab");
    let dir = tempfile::tempdir().unwrap();
    let t = &lab.topo;
    let (vm1, vm2, vm3) = (t.vm("vm1").v4.clone(), t.vm("vm2").v4.clone(), t.vm("vm3").v4.clone());

    // 1. vm1's traffic, both ways, to tap1 on its own host (cloned in the
    // kernel) and to tap2 on h2 (in VXLAN under VNI 9001).
    let r = lab
        .cluster
        .apply(vec![
            put_mirror(mirror("to-tap1", "port:vm1", to_tap("tap1", 9000))),
            put_mirror(mirror("to-tap2", "port:vm1", to_tap("tap2", 9001))),
        ])
        .await
        .expect("two sessions");
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    let in_vm = dir.path().join("vm1.pcap");
    let at_tap1 = dir.path().join("tap1.pcap");
    let at_tap2 = dir.path().join("tap2.pcap");
    let mut c_vm = capture(&t.vm("vm1").ns.name, "eth0", &in_vm, "icmp", dir.path());
    let mut c_tap1 = capture(&t.vm("tap1").ns.name, "eth0", &at_tap1, "icmp", dir.path());
    let mut c_tap2 = capture(&t.vm("tap2").ns.name, "eth0", &at_tap2, "icmp", dir.path());
    let out = ping(&lab, "vm2", "vm1", 50, "0.01");
    assert!(out.contains("50 received"), "mirroring cost the traffic packets: {out}");
    let out = ping(&lab, "vm1", "vm3", 50, "0.01");
    assert!(out.contains("50 received"), "mirroring cost the traffic packets: {out}");
    // Traffic that is not vm1's is not copied.
    let out = ping(&lab, "vm2", "vm3", 20, "0.01");
    assert!(out.contains("20 received"), "{out}");
    std::thread::sleep(Duration::from_secs(1));
    c_vm.stop();
    c_tap1.stop();
    c_tap2.stop();
    let seen = [echoes(&in_vm, &[], &vm2, &vm1), echoes(&in_vm, &[], &vm1, &vm3)].concat();
    assert_eq!(seen.len(), 200, "vm1 saw its 200 echoes");
    for (tap, file) in [("tap1", &at_tap1), ("tap2", &at_tap2)] {
        let mut copies = [echoes(file, &[], &vm2, &vm1), echoes(file, &[], &vm1, &vm3)].concat();
        copies.sort();
        let mut seen = seen.clone();
        seen.sort();
        let missing: Vec<&String> = seen.iter().filter(|s| !copies.contains(s)).collect();
        let extra: Vec<&String> = copies.iter().filter(|s| !seen.contains(s)).collect();
        assert!(
            missing.is_empty() && extra.is_empty() && copies.len() == seen.len(),
            "{tap} did not get a copy of every packet of vm1 and only those: {} copies of {}; missing {missing:?}; \
             extra {extra:?}; counters h1 {}, h2 {}\nagent h1:\n{}",
            copies.len(),
            seen.len(),
            mirror_counters(&lab, "h1"),
            mirror_counters(&lab, "h2"),
            lab.cluster
                .agent_log("h1")
                .lines()
                .filter(|l| l.contains("mirror"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        assert!(echoes(file, &[], &vm2, &vm3).is_empty(), "{tap} got vm2's own traffic");
    }
    // Every packet of vm1 (its ARP and neighbour discovery too) copied.
    let c = mirror_counters(&lab, "h1");
    for slot in ["0", "1"] {
        let copied = c[slot]["copied"].as_u64().unwrap_or(0);
        assert!(copied >= 200 && copied == c[slot]["matched"], "h1's counters: {c}");
    }

    // 2. To collectors on the underlay: ERSPAN type III with a snap length,
    // and VXLAN sampled 1 in 10. Both at h2's underlay address, where
    // tcpdump listens.
    let h2 = t.underlay_ip("h2");
    let mut erspan = mirror("erspan", "port:vm1", to_erspan(&h2, 3, 77));
    erspan.snap_len = 96;
    // ICMP between the VPC's addresses only: no neighbour discovery, no ARP.
    erspan.rules = vec![pb::MirrorRule {
        protocol: pb::Protocol::Icmp as i32,
        source_cidr: "10.80.0.0/24".into(),
        destination_cidr: String::new(),
        port_min: 0,
        port_max: 0,
    }];
    let mut sampled = mirror("sampled", "port:vm1", to_vxlan(&h2, 9100, 4790));
    sampled.sample = 10;
    sampled.direction = "out".into();
    lab.cluster
        .apply(vec![
            pb::operation::Op::Delete(pb::ObjectRef {
                kind: pb::Kind::MirrorSession as i32,
                id: "to-tap2".into(),
            }),
            put_mirror(erspan),
            put_mirror(sampled),
        ])
        .await
        .expect("collectors");
    let wire = dir.path().join("h2.pcap");
    let mut c_wire = capture(
        &t.host_ns("h2").name,
        "any",
        &wire,
        "ip proto 47 or udp port 4790",
        dir.path(),
    );
    // 200-byte payloads: frames of 242 bytes, cut to 96.
    let out = t
        .vm("vm2")
        .ns
        .sh(&["ping", "-q", "-c", "100", "-i", "0.01", "-s", "200", "-W", "1", &vm1])
        .unwrap_or_else(|e| format!("{e}"));
    assert!(out.contains("100 received"), "{out}");
    std::thread::sleep(Duration::from_secs(1));
    c_wire.stop();
    // ERSPAN III, session 77, each inner frame cut to 96 bytes.
    let e = fields(
        &wire,
        &[],
        "erspan",
        &[
            "erspan.version",
            "erspan.spanid",
            "erspan.truncated",
            "ip.src",
            "icmp.type",
        ],
    );
    assert_eq!(
        e.len(),
        200,
        "every echo of vm1 in ERSPAN, and nothing the filter leaves out: {e:?}"
    );
    assert!(e.iter().all(|f| !f[4].is_empty()), "only ICMP: {e:?}");
    assert!(e.iter().all(|f| f[0] == "2" && f[1] == "77"), "{e:?}");
    // The outer IP packet: its header, GRE with a sequence number (8),
    // ERSPAN III (12) and the 96 bytes.
    let outer = fields_at(&wire, &[], "erspan && icmp", &["ip.len"], "f");
    assert!(
        outer.iter().all(|f| f[0] == (20 + 8 + 12 + 96).to_string()),
        "copies cut to 96 bytes: {outer:?}"
    );
    // VXLAN to UDP 4790, VNI 9100: vm1's replies only ("out"), one in ten.
    // (The sampling counts on each CPU, and counts vm1's neighbour
    // discovery too: about one reply in ten.)
    let all = fields(&wire, &["udp.port==4790,vxlan"], "vxlan", &["vxlan.vni"]);
    assert!(all.iter().all(|f| f[0] == "9100"), "{all:?}");
    let v = fields(
        &wire,
        &["udp.port==4790,vxlan"],
        "vxlan && icmp",
        &["ip.src", "icmp.type"],
    );
    assert!((8..=11).contains(&v.len()), "100 replies sampled 1 in 10: {v:?}");
    assert!(
        v.iter().all(|f| f[0] == vm1 && f[1] == "0"),
        "only vm1's replies (out): {v:?}"
    );

    // 3. Over its rate a session drops copies, counted; the traffic loses
    // nothing.
    let mut limited = mirror("to-tap1", "port:vm1", to_tap("tap1", 9000));
    limited.rate_pps = 10;
    lab.cluster.apply(vec![put_mirror(limited)]).await.expect("a rate");
    let before = mirror_counters(&lab, "h1");
    let out = ping(&lab, "vm2", "vm1", 300, "0.002");
    assert!(out.contains("300 received"), "{out}");
    let after = mirror_counters(&lab, "h1");
    // A session keeps its slot: to-tap1 was the first.
    let slot = |j: &serde_json::Value, k: &str| j["0"][k].as_u64().unwrap_or(0);
    let copied = slot(&after, "copied") - slot(&before, "copied");
    let over = slot(&after, "over_rate") - slot(&before, "over_rate");
    assert!(
        copied <= 10 * 2 * 3 && over >= 600 - copied,
        "copied {copied}, over the rate {over}: {after}"
    );
}

fn list_as(c: &Cluster, uri: &str) -> Result<pb::ListResponse, tonic::Status> {
    let rt = tokio::runtime::Handle::current();
    let tls = c.pki.as_ref().unwrap().connector(uri).unwrap();
    let addr = c.addr.clone();
    tokio::task::block_in_place(|| {
        rt.block_on(async move {
            let ch = sdn_proto::connect_with(&addr, Some(tls)).await.unwrap();
            pb::provisioning_client::ProvisioningClient::new(ch)
                .list(pb::ListRequest {
                    kind: pb::Kind::MirrorSession as i32,
                    stale: false,
                })
                .await
                .map(|r| r.into_inner())
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_admins_make_mirror_sessions_and_tenants_never_see_them() {
    if !privileged() {
        eprintln!("skipping: needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start_secure(dir.path()).unwrap();
    c.apply_committed(
        PLATFORM,
        vec![
            tenant("t"),
            vpc_vni("v", "t", 5000),
            subnet("s", "v", "10.81.0.0/24", ""),
            host("h1", "192.0.2.1"),
            port(
                "p1",
                "t",
                "s",
                "h1",
                "tap-p1",
                "02:00:00:00:01:01",
                "10.81.0.11",
                "",
                &[],
            ),
            port(
                "tap",
                "t",
                "s",
                "h1",
                "tap-tap",
                "02:00:00:00:01:02",
                "10.81.0.12",
                "",
                &[],
            ),
        ],
    )
    .await
    .unwrap();
    let session = || put_mirror(mirror("m", "port:p1", to_tap("tap", 9000)));
    for uri in [PLATFORM, "sdn://tenant/t/alice", "sdn://supervisor/reg"] {
        let e = c.apply_committed(uri, vec![session()]).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{uri}: {e}");
    }
    // A VPC's VNI would put the copies into that VPC.
    let e = c
        .apply_committed(ADMIN, vec![put_mirror(mirror("m", "port:p1", to_tap("tap", 5000)))])
        .await
        .unwrap_err();
    assert!(e.message().contains("vpc v's"), "{e}");
    // A tap that is one of the mirrored ports, and a selection of two kinds.
    let e = c
        .apply_committed(ADMIN, vec![put_mirror(mirror("m", "port:tap", to_tap("tap", 9000)))])
        .await
        .unwrap_err();
    assert!(e.message().contains("tap.port_id"), "{e}");
    let mut two = mirror("m", "port:p1", to_tap("tap", 9000));
    two.vpc_id = "v".into();
    let e = c.apply_committed(ADMIN, vec![put_mirror(two)]).await.unwrap_err();
    assert!(e.message().contains("at most one"), "{e}");
    // A tap has no security group: it takes copies only.
    c.apply_committed(ADMIN, vec![group("g", "t", vec![])]).await.unwrap();
    c.apply_committed(
        PLATFORM,
        vec![port(
            "grouped",
            "t",
            "s",
            "h1",
            "tap-g",
            "02:00:00:00:01:03",
            "10.81.0.13",
            "",
            &["g"],
        )],
    )
    .await
    .unwrap();
    let e = c
        .apply_committed(ADMIN, vec![put_mirror(mirror("m", "port:p1", to_tap("grouped", 9000)))])
        .await
        .unwrap_err();
    assert!(e.message().contains("a tap takes copies only"), "{e}");
    let r = c.apply_committed(ADMIN, vec![session()]).await.unwrap();
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    let e = c
        .apply_committed(
            PLATFORM,
            vec![port(
                "tap",
                "t",
                "s",
                "h1",
                "tap-tap",
                "02:00:00:00:01:02",
                "10.81.0.12",
                "",
                &["g"],
            )],
        )
        .await
        .unwrap_err();
    assert!(e.message().contains("tap takes copies only"), "{e}");
    // A tenant with no port yet: accepted, with a warning.
    c.apply_committed(PLATFORM, vec![tenant("empty")]).await.unwrap();
    let r = c
        .apply_committed(
            ADMIN,
            vec![put_mirror(mirror(
                "later",
                "tenant:empty",
                to_erspan("192.0.2.9", 2, 1),
            ))],
        )
        .await
        .unwrap();
    assert!(
        r.warnings
            .iter()
            .any(|w| w.contains("mirror session later") && w.contains("no port")),
        "{:?}",
        r.warnings
    );
    // A VPC cannot take a session's VNI, nor a port in use be deleted.
    let e = c
        .apply_committed(PLATFORM, vec![vpc_vni("v2", "t", 9000)])
        .await
        .unwrap_err();
    assert!(e.message().contains("mirror session m"), "{e}");
    let e = c
        .apply_committed(
            PLATFORM,
            vec![pb::operation::Op::Delete(pb::ObjectRef {
                kind: pb::Kind::Port as i32,
                id: "tap".into(),
            })],
        )
        .await
        .unwrap_err();
    assert!(e.message().contains("mirror session m"), "{e}");
    // Supervisors read them; a tenant sees none.
    let l = list_as(&c, "sdn://supervisor/reg").unwrap();
    assert_eq!(l.mirror_sessions.len(), 2);
    let l = list_as(&c, "sdn://tenant/t/alice").unwrap();
    assert!(l.mirror_sessions.is_empty(), "{:?}", l.mirror_sessions);
}
