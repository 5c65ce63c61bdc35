//! A load balancer's VIP held by two NAT hosts: their agents elect with
//! VRRPv3 on the zone uplink which one answers for it, the controller
//! grants the winner an epoch and a lease, and only the holder of a running
//! lease answers (ARP, translation), in its dataplane. The owner's death
//! moves the VIP to the other within a second; a partition between the
//! holders leaves one answering; an owner cut off (its agent frozen) stops
//! answering when its lease ends, before the other is granted.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use sdn_integration::ops::*;
use sdn_integration::privileged;
use sdn_proto::v1 as pb;

const EXT: (&str, &str) = ("10.254.0", "fdf1:0:0:1");
const VIP: &str = "10.40.1.100";
const UPLINK: &str = "up-ext";

/// One GET from the zone to the VIP: "member nat-address", or the error.
fn zone_get(lab: &sdn_integration::lab::Lab) -> String {
    lab.topo
        .zone_ns("ext")
        .sh(&[
            "curl",
            "-sS",
            "-m",
            "1",
            "--interface",
            "10.99.0.1",
            &format!("http://{VIP}/"),
        ])
        .unwrap_or_else(|e| format!("error: {e}"))
        .trim()
        .to_string()
}

/// The virtual IP as the controller has it.
async fn vip(lab: &sdn_integration::lab::Lab) -> pb::VirtualIp {
    vip_of(lab, "hvip").await
}

async fn vip_of(lab: &sdn_integration::lab::Lab, id: &str) -> pb::VirtualIp {
    lab.cluster.virtual_ip(id).await
}

/// Waits until `host` owns the VIP in an epoch above `above`; its epoch.
async fn owned_by(lab: &sdn_integration::lab::Lab, host: &str, above: u64) -> u64 {
    owned_of(lab, "hvip", host, above).await
}

async fn owned_of(lab: &sdn_integration::lab::Lab, id: &str, host: &str, above: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = vip_of(lab, id).await;
        if v.owner_host_id == host && v.epoch > above {
            return v.epoch;
        }
        assert!(
            Instant::now() < deadline,
            "{host} never owned the virtual ip above epoch {above}: {v:?}\n{}",
            lab.cluster.agent_log(host)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The VIP's lease in `host`'s dataplane: (epoch, since_ns, until_ns,
/// answering now).
fn lease(lab: &sdn_integration::lab::Lab, host: &str) -> Option<(u64, u64, u64, bool)> {
    let c = lab.drops(host).ok()?;
    c["vip_leases"]
        .as_array()?
        .iter()
        .find(|l| l["address"] == VIP)
        .map(|l| {
            (
                l["epoch"].as_u64().unwrap_or(0),
                l["since_ns"].as_u64().unwrap_or(0),
                l["until_ns"].as_u64().unwrap_or(0),
                l["answering"].as_bool().unwrap_or(false),
            )
        })
}

fn has_address(lab: &sdn_integration::lab::Lab, host: &str) -> bool {
    lab.topo
        .host_ns(host)
        .sh(&["ip", "-br", "addr", "show", "dev", UPLINK])
        .is_ok_and(|s| s.contains(VIP))
}

/// The north-south flows in `host`'s dataplane (`sdn-agent nat-flows`).
fn nat_flows(lab: &sdn_integration::lab::Lab, host: &str) -> Vec<serde_json::Value> {
    let out = std::process::Command::new(sdn_integration::bin("sdn-agent"))
        .args(["nat-flows", "--pin-dir", lab.cluster.pin_dir(host).to_str().unwrap()])
        .output()
        .expect("sdn-agent nat-flows");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// A flow as a holder's agent would send it: client 203.0.113.`client`
/// through the VIP's echo service to `member`:9000 from `nat`.
fn synced(client: u8, vip: [u8; 4], member: &str, nat: &str) -> pb::SyncedFlow {
    let v4 = |a: &str| a.parse::<std::net::Ipv4Addr>().unwrap().octets().to_vec();
    pb::SyncedFlow {
        key: Some(pb::SyncedFlowKey {
            zone: 1,
            proto: 6,
            client: vec![203, 0, 113, client],
            client_port: 5555,
            vip: vip.to_vec(),
            vip_port: 7000,
        }),
        vni: 0,
        member: v4(member),
        member_port: 9000,
        nat: v4(nat),
        nat_port: 60_000 + client as u32,
        flags: 2,
        idle_ms: 10,
        age_ms: 100,
        ..Default::default()
    }
}

/// Connects to `to`'s flow sync port from `from`'s namespace (its
/// underlay address) with `uri`'s certificate of the lab's CA, and writes
/// `frames` (each its length first, unless raw). Whether the handshake
/// passed; what the server did after the frames is read as "closed".
fn attack(
    lab: &sdn_integration::lab::Lab,
    from: &str,
    to: &str,
    uri: &str,
    frames: Vec<(bool, Vec<u8>)>,
) -> Result<String, String> {
    let ns = lab.topo.host_ns(from).name.clone();
    let addr: std::net::SocketAddr = format!("{}:7946", lab.topo.underlay_ip(to)).parse().unwrap();
    let files = lab.cluster.pki.as_ref().expect("a secured lab").files(uri).unwrap();
    std::thread::spawn(move || {
        sdn_integration::enter_netns(&ns).map_err(|e| e.to_string())?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let tcp = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let c = sdn_proto::tls::Connector::to_agents(files).map_err(|e| e.to_string())?;
            let mut tls = c.connect(tcp).await.map_err(|e| format!("handshake: {e}"))?;
            for (raw, f) in frames {
                if !raw {
                    let _ = tls.write_all(&(f.len() as u32).to_be_bytes()).await;
                }
                let _ = tls.write_all(&f).await;
                let _ = tls.flush().await;
            }
            let mut b = [0u8; 1];
            match tokio::time::timeout(Duration::from_secs(2), tls.read(&mut b)).await {
                Ok(_) => Ok("closed".to_string()),
                Err(_) => Ok("open".to_string()),
            }
        })
    })
    .join()
    .unwrap()
}

/// A member of `pool` at VM `vm`'s `port`.
fn member_at(id: &str, pool: &str, vm: &str, port: u32) -> pb::operation::Op {
    let mut op = member(id, pool, vm, "", 1);
    if let pb::operation::Op::PutMember(x) = &mut op {
        x.port = port;
    }
    op
}

/// Applies `ops` (a load balancer exposed through h2 and h3) with the VIP
/// held by h2 (priority 200) and h3 (100); the zone then reaches the VIP
/// on its link, at whichever host answers ARP for it.
async fn held_by_h2_and_h3(lab: &sdn_integration::lab::Lab, mut ops: Vec<pb::operation::Op>) {
    ops.push(virtual_ip(
        "hvip",
        "dept-a",
        "va",
        VIP,
        40,
        true,
        &[("h2", 200), ("h3", 100)],
    ));
    assert!(lab.cluster.apply(ops).await.expect("the load balancer").enforced);
    lab.topo
        .zone_ns("ext")
        .sh(&["ip", "route", "replace", &format!("{VIP}/32"), "dev", "br0"])
        .unwrap();
}

fn signal(lab: &mut sdn_integration::lab::Lab, host: &str, sig: i32) {
    let pid = lab.cluster.agent(host).pid().expect("the agent runs");
    // SAFETY: signalling a process this test started.
    unsafe { libc::kill(pid as i32, sig) };
}

/// The HA lab: three hosts, the zone `ext` with hosts at `zone_hosts`,
/// and a VPC of dept-a whose subnet holds the member VMs `vms`, on h1.
fn ha_lab(tag: &str, zone_hosts: &[&str], vms: &[&str]) -> sdn_integration::lab::LabBuilder {
    let mut lab = sdn_integration::lab::Lab::new(tag, &["h1", "h2", "h3"])
        .zone("ext", UPLINK, EXT.0, EXT.1, &["10.0.0.0/8", "fd00::/8"], zone_hosts)
        .tenant("dept-a")
        .vpc("va", Some("ext"))
        .subnet("a-web", "va", "10.40.1.0/24", "fd40:1::/64")
        .group("open-a", open_rules());
    for vm in vms {
        lab = lab.vm(vm, "h1", "a-web", &["open-a"]);
    }
    lab
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vip_held_by_two_nat_hosts_is_answered_by_its_lease_holder_alone() {
    if !privileged() {
        eprintln!("skipped: needs root");
        return;
    }
    let mut lab = ha_lab("hav", &["10.99.0.1"], &["m1"])
        .secure()
        .start()
        .await
        .expect("the lab");
    let _m1 = lab.nginx("m1");
    let _echo = lab
        .topo
        .serve(&["m1"], &[], &["--udp", "9001", "--tcp", "9000"])
        .unwrap();
    // h1 translates for the load balancer too, but does not hold its VIP.
    let mut lb = exposed(load_balancer("lbh", "dept-a", "va", VIP, ""), "h2", "10.40.1.202");
    for (h, a) in [("h3", "10.40.1.203"), ("h1", "10.40.1.201")] {
        lb.nat_hosts.push(pb::NatHost {
            host_id: h.into(),
            ipv4: a.into(),
            ipv6: String::new(),
        });
    }
    let mut ops = vec![put_lb(lb), pool("web", "lbh"), pool("udp", "lbh"), pool("echo", "lbh")];
    for (m, pool_id, port) in [
        ("web-m1", "web", 8080),
        ("udp-m1", "udp", 9001),
        ("echo-m1", "echo", 9000),
    ] {
        ops.push(member_at(m, pool_id, "m1", port));
    }
    ops.push(listener("http", "lbh", "tcp", 80, "web", "maglev"));
    ops.push(listener("dns", "lbh", "udp", 53, "udp", "maglev"));
    ops.push(listener("echo", "lbh", "tcp", 7000, "echo", "maglev"));
    held_by_h2_and_h3(&lab, ops).await;

    // h2 (priority 200) wins, is granted epoch 1 and answers; h3 does not.
    let e1 = owned_by(&lab, "h2", 0).await;
    sdn_integration::wait_for("h2 to answer", Duration::from_secs(5), || has_address(&lab, "h2")).unwrap();
    assert_eq!(zone_get(&lab), "m1 10.40.1.202");
    assert!(!has_address(&lab, "h3"));
    let (_, _, _, h3_answers) = lease(&lab, "h3").expect("h3 holds a lease entry");
    assert!(!h3_answers, "h3 answers without a grant");
    let (epoch, _, _, h2_answers) = lease(&lab, "h2").expect("h2's lease");
    assert!(
        h2_answers && epoch == e1,
        "h2's lease: epoch {epoch}, answering {h2_answers}"
    );

    // Sent to h3 anyway (a zone host that forces its MAC), or to h1, which
    // translates for the load balancer but holds no lease of its VIP:
    // neither answers, and each counts it.
    let z = lab.topo.zone_ns("ext");
    for h in ["h3", "h1"] {
        let mac = lab
            .topo
            .host_ns(h)
            .sh(&["cat", &format!("/sys/class/net/{UPLINK}/address")])
            .unwrap()
            .trim()
            .to_string();
        let neigh = [
            "ip",
            "neigh",
            "replace",
            VIP,
            "lladdr",
            &mac,
            "dev",
            "br0",
            "nud",
            "permanent",
        ];
        z.sh(&neigh).unwrap();
        let fenced = lab.counter(h, "drops", "vip_fenced");
        assert!(
            zone_get(&lab).starts_with("error"),
            "{h} answered for a VIP it does not own"
        );
        assert!(lab.counter(h, "drops", "vip_fenced") > fenced, "{h} counted nothing");
    }
    z.sh(&["ip", "neigh", "del", VIP, "dev", "br0"]).unwrap();
    assert_eq!(zone_get(&lab), "m1 10.40.1.202");

    // 1. The owner dies (its agent killed, its uplink cut): h3 takes the
    // VIP within a second, in the next epoch, and a 1 kHz probe through
    // the VIP sees the gap. TCP connections open through h2 go on through
    // h3 (their flows were carried to it, and h2's NAT address is
    // answered there now), none reset.
    let survive = std::thread::spawn({
        let ns = lab.topo.zone_ns("ext").name.clone();
        move || {
            sdn_integration::ns_sh(
                &ns,
                &[
                    sdn_integration::bin("sdn-probe").to_str().unwrap(),
                    "survive",
                    VIP,
                    "7000",
                    "--conns",
                    "16",
                    "--seconds",
                    "5",
                    "--bind",
                    "10.99.0.1",
                ],
            )
        }
    });
    let probe = std::thread::spawn({
        let ns = lab.topo.zone_ns("ext").name.clone();
        move || {
            sdn_integration::ns_sh(
                &ns,
                &[
                    sdn_integration::bin("sdn-probe").to_str().unwrap(),
                    "gap",
                    VIP,
                    "53",
                    "--seconds",
                    "4",
                    "--bind",
                    "10.99.0.1",
                ],
            )
        }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    lab.cluster.agent("h2").kill();
    lab.topo
        .host_ns("h2")
        .sh(&["ip", "link", "set", UPLINK, "down"])
        .unwrap();
    let e2 = owned_by(&lab, "h3", e1).await;
    let out = probe.join().unwrap().expect("the probe");
    let gap: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let max = gap["max_gap_ms"].as_f64().unwrap();
    eprintln!("failover gap: {gap}");
    let log = lab.cluster.agent_log("h3");
    eprintln!(
        "{}",
        log.lines()
            .filter(|l| l.contains("virtual") || l.contains("VRRP"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(max < 1000.0, "the VIP was silent {max} ms: {gap}");
    assert!(gap["gaps"].as_array().unwrap().len() <= 1, "{gap}");
    let out = survive.join().unwrap().expect("the connections' probe");
    let held: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    eprintln!("connections through the failover: {held}");
    assert_eq!(
        held["survived"],
        16,
        "connections lost in the failover: {held}\n{}",
        lab.cluster.agent_log("h3")
    );
    let sync = lab.cluster.agent_log("h3");
    assert!(
        sync.contains("flow sync: a full batch from the peer"),
        "h3 never took h2's flows: {sync}"
    );
    assert_eq!(zone_get(&lab), "m1 10.40.1.203");
    assert!(has_address(&lab, "h3"));

    // 2. h2 comes back and takes the VIP back (higher priority, preempt),
    // in a third epoch; h3 stops answering.
    lab.topo.host_ns("h2").sh(&["ip", "link", "set", UPLINK, "up"]).unwrap();
    lab.cluster.start_agent(&lab.topo, "h2").unwrap();
    let e3 = owned_by(&lab, "h2", e2).await;
    sdn_integration::wait_for("h3 to stop answering", Duration::from_secs(5), || {
        !has_address(&lab, "h3") && lease(&lab, "h3").is_some_and(|l| !l.3)
    })
    .unwrap();
    sdn_integration::wait_for("h2 to answer again", Duration::from_secs(5), || {
        zone_get(&lab) == "m1 10.40.1.202"
    })
    .unwrap();

    // The flow sync port, attacked. h3 (the backup) takes flows only from
    // the agent of a host holding the VIP with it, from that host's
    // underlay address, and only flows that can be the VIP's: a NAT
    // host that holds no VIP with it (h1, with its own agent certificate)
    // is closed before TLS; another identity from h2's address (a
    // tenant's certificate) after it; h2's own certificate (a compromised
    // holder) has its flows checked one by one, and an oversize frame
    // ends its connection.
    let vip4: [u8; 4] = VIP.parse::<std::net::Ipv4Addr>().unwrap().octets();
    let m1 = lab.topo.vm("m1").v4.split('/').next().unwrap().to_string();
    let vni = nat_flows(&lab, "h2")
        .iter()
        .find_map(|f| f["vni"].as_u64())
        .expect("h2 carries flows of the VIP") as u32;
    let frame = |flows: Vec<pb::SyncedFlow>| {
        (
            false,
            prost::Message::encode_to_vec(&pb::FlowSyncBatch {
                flows,
                ..Default::default()
            }),
        )
    };
    let with_vni = |mut f: pb::SyncedFlow| {
        f.vni = vni;
        f
    };
    let r = attack(
        &lab,
        "h1",
        "h3",
        "sdn://agent/h1",
        vec![frame(vec![with_vni(synced(8, vip4, &m1, "10.40.1.202"))])],
    );
    assert!(
        r.as_ref().is_err_and(|e| e.starts_with("handshake")),
        "h1 reached h3's flow sync: {r:?}"
    );
    let r = attack(
        &lab,
        "h2",
        "h3",
        "sdn://tenant/dept-a/mallory",
        vec![frame(vec![with_vni(synced(8, vip4, &m1, "10.40.1.202"))])],
    );
    assert_eq!(r.as_deref(), Ok("closed"), "a tenant's certificate was kept");
    let frames = vec![
        // A flow h2 could send: written (the control).
        frame(vec![with_vni(synced(9, vip4, &m1, "10.40.1.202"))]),
        // Another VIP; another VPC; a NAT address of no holder (h1's); a
        // member that is none.
        frame(vec![
            with_vni(synced(10, [10, 40, 1, 99], &m1, "10.40.1.202")),
            synced(11, vip4, &m1, "10.40.1.202"),
            with_vni(synced(12, vip4, &m1, "10.40.1.201")),
        ]),
        frame(vec![with_vni(synced(13, vip4, "10.40.1.77", "10.40.1.202"))]),
        // Not a frame at all, then a frame too large.
        (false, vec![0xff; 64]),
    ];
    let r = attack(&lab, "h2", "h3", "sdn://agent/h2", frames);
    assert_eq!(r.as_deref(), Ok("closed"), "a garbled frame was kept reading");
    let r = attack(
        &lab,
        "h2",
        "h3",
        "sdn://agent/h2",
        vec![(true, (64u32 << 20).to_be_bytes().to_vec())],
    );
    assert_eq!(r.as_deref(), Ok("closed"), "an oversize frame was kept reading");
    let clients: Vec<String> = nat_flows(&lab, "h3")
        .iter()
        .filter_map(|f| f["client"].as_str().map(str::to_string))
        .collect();
    assert!(
        clients.iter().any(|c| c == "203.0.113.9"),
        "the control flow was not written: {clients:?}"
    );
    for bad in 8..=13 {
        let c = format!("203.0.113.{bad}");
        assert!(bad == 9 || !clients.contains(&c), "h3 took a hostile flow from {c}");
    }
    let log = lab.cluster.agent_log("h3");
    for want in [
        "not the agent of a host holding a virtual IP with this one",
        "(vni 0) is no virtual IP held with this peer",
        "is no NAT address of a holder",
        "is no live member of the service here",
        "a malformed frame",
        "at most 1048576",
    ] {
        assert!(log.contains(want), "h3 never said {want:?}:\n{log}");
    }
    // The real h2 connects again at its next flow; its full batch does
    // not list the forged control flow, so h3 drops it.
    sdn_integration::wait_for("h3 to drop the flow h2 never carried", Duration::from_secs(10), || {
        let _ = zone_get(&lab);
        !nat_flows(&lab, "h3").iter().any(|f| f["client"] == "203.0.113.9")
    })
    .unwrap();

    // 3. A partition between the holders (nftables drops VRRP on h2):
    // both are VRRP masters, but the controller refuses h3 while h2's
    // lease runs. Only h2 answers, throughout.
    lab.topo
        .host_ns("h2")
        .nft_cut("vrrpcut", &["ip protocol vrrp"])
        .unwrap();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(2) {
        let l3 = lease(&lab, "h3").expect("h3's lease");
        assert!(!l3.3, "h3 answers during the partition: {l3:?}");
        assert!(!has_address(&lab, "h3"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        lab.cluster.agent_log("h3").contains("claim refused") || lab.cluster.agent_log("h3").contains("VRRP master"),
        "h3 never became master across the partition: {}",
        lab.cluster.agent_log("h3")
    );
    assert_eq!(vip(&lab).await.epoch, e3, "an epoch was granted across the partition");
    assert_eq!(zone_get(&lab), "m1 10.40.1.202");

    // 4. Now h2's agent freezes (SIGSTOP: no renewals, no VRRP): its
    // dataplane stops answering when its lease ends, and h3 is granted
    // only after that.
    signal(&mut lab, "h2", libc::SIGSTOP);
    let e4 = owned_by(&lab, "h3", e3).await;
    let (_, _, h2_until, _) = lease(&lab, "h2").expect("h2's lease");
    let (h3_epoch, h3_since, _, _) = lease(&lab, "h3").expect("h3's lease");
    assert_eq!(h3_epoch, e4);
    eprintln!(
        "h2 stopped answering {} ms before h3 began",
        (h3_since as i64 - h2_until as i64) / 1_000_000
    );
    assert!(
        h3_since > h2_until,
        "both answered at once: h3 from {h3_since} ns, h2 until {h2_until} ns"
    );
    sdn_integration::wait_for("h3 to answer", Duration::from_secs(5), || {
        zone_get(&lab) == "m1 10.40.1.203"
    })
    .unwrap();
    signal(&mut lab, "h2", libc::SIGCONT);
    let _ = lab.topo.host_ns("h2").nft_mend("vrrpcut");
    // The audit records every grant, by the claiming host's agent.
    let audit = lab
        .cluster
        .sdnctl(sdn_integration::cluster::ADMIN, &["audit"])
        .expect("the audit log");
    for (host, epoch) in [("h2", e1), ("h3", e2), ("h2", e3), ("h3", e4)] {
        let line = format!("owner=host:{host} epoch={epoch}");
        assert!(
            audit
                .lines()
                .any(|l| l.contains(&line) && l.contains(&format!("sdn://agent/{host} (vrrp)"))),
            "no record of {line}: {audit}"
        );
    }
}

const VIP6: &str = "fd40:1::100";

/// An IPv6 VIP alone, held by two NAT hosts: their agents speak VRRPv3
/// over IPv6 on the uplink (link-local sources, ff02::12); the owner
/// answers neighbour solicitations for it and translates within its
/// lease; when it dies the other takes over and announces the address
/// with an unsolicited NA that moves the zone's neighbour entry.
#[tokio::test(flavor = "multi_thread")]
async fn an_ipv6_vip_held_by_hosts_moves_with_vrrp_over_ipv6() {
    if !privileged() {
        eprintln!("skipped: needs root");
        return;
    }
    let mut lab = ha_lab("hv6", &["10.99.0.1", "fd77::1"], &["m1"])
        .start()
        .await
        .expect("the lab");
    let _m1 = lab.nginx("m1");
    let mut lb = load_balancer("lb6", "dept-a", "va", "", VIP6);
    lb.exposure = "zone".into();
    for (h, a) in [("h2", "fd40:1::202"), ("h3", "fd40:1::203")] {
        lb.nat_hosts.push(pb::NatHost {
            host_id: h.into(),
            ipv4: String::new(),
            ipv6: a.into(),
        });
    }
    let mut web = member("web6-m1", "web6", "m1", "", 1);
    if let pb::operation::Op::PutMember(x) = &mut web {
        x.port = 8080;
    }
    let mut v = virtual_ip("hv6", "dept-a", "va", "", 41, true, &[("h2", 200), ("h3", 100)]);
    if let pb::operation::Op::PutVirtualIp(x) = &mut v {
        x.ipv6 = VIP6.into();
    }
    let ops = vec![
        put_lb(lb),
        pool("web6", "lb6"),
        web,
        listener("http6", "lb6", "tcp", 80, "web6", "maglev"),
        v,
    ];
    assert!(lab.cluster.apply(ops).await.expect("the load balancer").enforced);
    let z = lab.topo.zone_ns("ext");
    z.sh(&["ip", "-6", "route", "replace", &format!("{VIP6}/128"), "dev", "br0"])
        .unwrap();
    let get = || {
        z.sh(&[
            "curl",
            "-sS",
            "-m",
            "1",
            "--interface",
            "fd77::1",
            &format!("http://[{VIP6}]/"),
        ])
        .unwrap_or_else(|e| format!("error: {e}"))
        .trim()
        .to_string()
    };
    let mac = |h: &str| {
        lab.topo
            .host_ns(h)
            .sh(&["cat", &format!("/sys/class/net/{UPLINK}/address")])
            .unwrap()
            .trim()
            .to_string()
    };
    let pcap = lab.topo.dir.join("hv6.pcap");
    let mut capture = sdn_integration::Proc::spawn(
        "tshark-hv6",
        Some(&z.name),
        std::path::Path::new("/usr/bin/tshark"),
        &[
            "-i",
            "br0",
            "-f",
            "icmp6 or ip6 proto 112 or tcp port 80",
            "-w",
            pcap.to_str().unwrap(),
        ],
        &lab.topo.dir,
    )
    .unwrap();
    sdn_integration::wait_for("the capture", Duration::from_secs(10), || pcap.exists()).unwrap();

    // h2 wins over IPv6, is granted and answers; the zone reaches the
    // member through it.
    let e1 = owned_of(&lab, "hv6", "h2", 0).await;
    if sdn_integration::wait_for("h2 to answer", Duration::from_secs(5), || get() == "m1 fd40:1::202").is_err() {
        std::thread::sleep(Duration::from_millis(500));
        panic!(
            "h2 does not answer: {}\nh2 neigh: {:?} route: {:?}\ncapture: {:?}\nneighbours: {:?}\nh2 drops: {}\nh2: {}",
            get(),
            lab.topo.host_ns("h2").sh(&["ip", "-6", "neigh"]),
            lab.topo.host_ns("h2").sh(&["ip", "-6", "route", "get", "fd77::1"]),
            sdn_integration::sh(&[
                "tshark",
                "-r",
                pcap.to_str().unwrap(),
                "-Y",
                "tcp",
                "-T",
                "fields",
                "-e",
                "eth.src",
                "-e",
                "eth.dst",
                "-e",
                "ipv6.src",
                "-e",
                "ipv6.dst",
                "-e",
                "tcp.flags.str"
            ]),
            z.sh(&["ip", "-6", "neigh"]),
            lab.drops("h2").map(|d| d.to_string()).unwrap_or_default(),
            lab.cluster.agent_log("h2")
        );
    }

    // (The capture takes a moment to begin after its file appears: h2's
    // advertisements are in it by now.)
    std::thread::sleep(Duration::from_millis(1000));

    // h2 dies: h3 takes over, announces the VIP, and answers.
    lab.cluster.agent("h2").kill();
    lab.topo
        .host_ns("h2")
        .sh(&["ip", "link", "set", UPLINK, "down"])
        .unwrap();
    let t0 = Instant::now();
    owned_of(&lab, "hv6", "h3", e1).await;
    sdn_integration::wait_for("h3 to answer", Duration::from_secs(5), || get() == "m1 fd40:1::203").unwrap();
    eprintln!(
        "IPv6 VIP answered through h3 {} ms after h2 died",
        t0.elapsed().as_millis()
    );
    // The zone's neighbour entry for the VIP is h3's uplink.
    let neigh = z.sh(&["ip", "-6", "neigh", "show", VIP6, "dev", "br0"]).unwrap();
    assert!(neigh.contains(&mac("h3")), "the zone's neighbour entry: {neigh}");
    std::thread::sleep(Duration::from_millis(300));
    capture.stop();

    // Both holders advertised VRRPv3 over IPv6 (good checksums, hop limit
    // 255, link-local sources); h3 sent an unsolicited NA for the VIP
    // from its uplink's MAC.
    let pcap = pcap.to_str().unwrap();
    let ads = sdn_integration::sh(&[
        "tshark",
        "-r",
        pcap,
        "-Y",
        "vrrp",
        "-T",
        "fields",
        "-e",
        "eth.src",
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
    let mut speakers = std::collections::BTreeSet::new();
    for l in ads.lines() {
        let f: Vec<&str> = l.split('\t').collect();
        assert_eq!(&f[2..], ["3", "1", "255", VIP6], "{l}");
        assert!(f[1].starts_with("fe80::"), "{l}");
        speakers.insert(f[0].to_string());
    }
    assert!(
        speakers.contains(&mac("h2")) && speakers.contains(&mac("h3")),
        "advertisements from {speakers:?}; h2 is {}, h3 is {}",
        mac("h2"),
        mac("h3")
    );
    let na = sdn_integration::sh(&[
        "tshark",
        "-r",
        pcap,
        "-Y",
        "icmpv6.type == 136 && icmpv6.nd.na.flag.s == 0",
        "-T",
        "fields",
        "-e",
        "eth.src",
        "-e",
        "ipv6.src",
        "-e",
        "icmpv6.nd.na.flag.o",
        "-e",
        "icmpv6.nd.na.target_address",
    ])
    .unwrap();
    assert!(
        na.lines()
            .any(|l| l.split('\t').collect::<Vec<_>>() == [mac("h3").as_str(), VIP6, "1", VIP6]),
        "no unsolicited NA for the VIP from h3:\n{na}"
    );
}

/// The north-south flows of `host` through `port` of the VIP from the
/// zone's client, by client port: (member, NAT address, NAT port).
fn flows_through(lab: &sdn_integration::lab::Lab, host: &str, port: u64) -> BTreeMap<u64, (String, String, u64)> {
    nat_flows(lab, host)
        .iter()
        .filter(|f| f["vip"] == VIP && f["vip_port"] == port && f["client"] == "10.99.0.1")
        .map(|f| {
            (
                f["client_port"].as_u64().unwrap(),
                (
                    f["member"].as_str().unwrap().to_string(),
                    f["nat"].as_str().unwrap().to_string(),
                    f["nat_port"].as_u64().unwrap(),
                ),
            )
        })
        .collect()
}

/// `sdn-probe survive` from the zone's client: `conns` TCP connections
/// through the VIP's `port`, each exchanging every 100 ms for `seconds`.
fn survive_from_zone(
    lab: &sdn_integration::lab::Lab,
    port: u16,
    conns: usize,
    seconds: u64,
) -> std::thread::JoinHandle<serde_json::Value> {
    let ns = lab.topo.zone_ns("ext").name.clone();
    std::thread::spawn(move || {
        let out = sdn_integration::ns_sh(
            &ns,
            &[
                sdn_integration::bin("sdn-probe").to_str().unwrap(),
                "survive",
                VIP,
                &port.to_string(),
                "--conns",
                &conns.to_string(),
                "--seconds",
                &seconds.to_string(),
                "--bind",
                "10.99.0.1",
                // A connection whose retransmits all fell in the failover
                // comes back at the next one, up to 6.2 s after it spoke:
                // survival, not the stall, is what is judged here.
                "--patience-secs",
                "12",
            ],
        )
        .expect("the connections' probe");
        serde_json::from_str(out.trim()).expect("the probe's JSON")
    })
}

/// Flows the flow sync never carried (it was cut while they opened) go on
/// when their holder dies: the new owner picks each up at its first
/// segment, to the member Maglev gives it (two members here), from the
/// dead owner's NAT address and port. A listener of another scheduler has
/// nothing to pick up with, and its connections are lost (the control).
/// A zone host's forged segments in the window open nothing: neither of a
/// tuple nobody opened, nor on a real connection's own tuple before its
/// client speaks (the member's answer does not fit the forged numbers).
#[tokio::test(flavor = "multi_thread")]
async fn flows_never_carried_are_picked_up_by_the_new_owner_on_the_same_member() {
    const QUIET_PORT: u16 = 45_000;
    if !privileged() {
        eprintln!("skipped: needs root");
        return;
    }
    let mut lab = ha_lab("hpu", &["10.99.0.1"], &["m1", "m2"])
        .secure()
        .start()
        .await
        .expect("the lab");
    let _echo = lab.topo.serve(&["m1", "m2"], &[], &["--tcp", "9000"]).unwrap();
    let mut lb = exposed(load_balancer("lbh", "dept-a", "va", VIP, ""), "h2", "10.40.1.202");
    lb.nat_hosts.push(pb::NatHost {
        host_id: "h3".into(),
        ipv4: "10.40.1.203".into(),
        ipv6: String::new(),
    });
    let mut ops = vec![put_lb(lb), pool("echo", "lbh"), pool("echo-lc", "lbh")];
    for (m, pool_id, vm) in [
        ("e-m1", "echo", "m1"),
        ("e-m2", "echo", "m2"),
        ("l-m1", "echo-lc", "m1"),
        ("l-m2", "echo-lc", "m2"),
    ] {
        ops.push(member_at(m, pool_id, vm, 9000));
    }
    ops.push(listener("echo", "lbh", "tcp", 7000, "echo", "maglev"));
    ops.push(listener("echo-lc", "lbh", "tcp", 7001, "echo-lc", "least_connections"));
    held_by_h2_and_h3(&lab, ops).await;
    let e1 = owned_by(&lab, "h2", 0).await;
    sdn_integration::wait_for("h2 to answer", Duration::from_secs(5), || has_address(&lab, "h2")).unwrap();
    // h3 heard from h2's flow sync (and so its secret for NAT ports).
    sdn_integration::wait_for("h2's first full batch at h3", Duration::from_secs(10), || {
        lab.cluster
            .agent_log("h3")
            .contains("flow sync: a full batch from the peer")
    })
    .unwrap();

    // The flow sync between the two is cut (nftables on h3, both ways).
    lab.topo
        .host_ns("h3")
        .nft_cut("synccut", &["tcp dport 7946", "tcp sport 7946"])
        .unwrap();
    let maglev = survive_from_zone(&lab, 7000, 16, 6);
    let least = survive_from_zone(&lab, 7001, 8, 6);
    // And one connection that stays quiet through the failover, from a
    // port the test knows, until told to speak.
    let go = lab.topo.dir.join("quiet-go");
    let quiet_script = format!(
        "import os, socket, time\n\
         s = socket.socket()\n\
         s.bind(('10.99.0.1', {QUIET_PORT}))\n\
         s.connect(('{VIP}', 7000))\n\
         s.sendall(b'12345678')\n\
         assert s.recv(8) == b'12345678'\n\
         print('ready', flush=True)\n\
         while not os.path.exists('{go}'):\n    time.sleep(0.05)\n\
         s.settimeout(8)\n\
         s.sendall(b'abcdefgh')\n\
         print('echo', s.recv(8).decode(), flush=True)\n",
        go = go.display()
    );
    let quiet = sdn_integration::Proc::spawn(
        "quiet",
        Some(&lab.topo.zone_ns("ext").name),
        std::path::Path::new("/usr/bin/python3"),
        &["-c", &quiet_script],
        &lab.topo.dir,
    )
    .unwrap();
    sdn_integration::wait_for("the quiet connection", Duration::from_secs(5), || {
        quiet.log_text().contains("ready")
    })
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let at_h2 = flows_through(&lab, "h2", 7000);
    assert_eq!(at_h2.len(), 17, "h2 does not translate the connections: {at_h2:?}");
    let members: BTreeSet<&str> = at_h2.values().map(|(m, _, _)| m.as_str()).collect();
    assert_eq!(members.len(), 2, "Maglev sent all 16 to one member: {at_h2:?}");
    assert_eq!(flows_through(&lab, "h2", 7001).len(), 8);
    assert!(
        flows_through(&lab, "h3", 7000).is_empty() && flows_through(&lab, "h3", 7001).is_empty(),
        "the flows reached h3 before the failover"
    );

    // h2 dies; h3 takes the VIP over and picks up h2's flows at their
    // next segment.
    lab.cluster.agent("h2").kill();
    lab.topo
        .host_ns("h2")
        .sh(&["ip", "link", "set", UPLINK, "down"])
        .unwrap();
    owned_by(&lab, "h3", e1).await;
    let kept = maglev.join().unwrap();
    let lost = least.join().unwrap();
    eprintln!("maglev listener: {kept}\nleast-connections listener: {lost}");

    // A zone host forges a segment on the quiet connection's own tuple
    // (numbers it cannot know): h3 takes it up, the member answers with
    // numbers that do not fit it, and h3 drops the answer; the flow stays
    // unconfirmed. Then the real client speaks, and its connection goes on.
    let refused = lab.counter("h3", "drops", "nat_no_flow");
    sdn_integration::ns_sh(
        &lab.topo.zone_ns("ext").name,
        &[
            "/usr/bin/python3",
            "-c",
            &format!(
                "from scapy.all import *\nconf.verb = 0\n\
                 send(IP(src='10.99.0.1', dst='{VIP}')/TCP(sport={QUIET_PORT}, dport=7000, flags='A', \
                 seq=0x1234567, ack=0x7654321)/Raw(b'forged!!'))\n"
            ),
        ],
    )
    .expect("scapy send");
    sdn_integration::wait_for("the member's answer to be refused", Duration::from_secs(3), || {
        lab.counter("h3", "drops", "nat_no_flow") > refused
    })
    .unwrap();
    assert!(
        !flows_through(&lab, "h3", 7000).contains_key(&u64::from(QUIET_PORT)),
        "the forged segment's flow was confirmed"
    );
    std::fs::write(&go, b"").unwrap();
    sdn_integration::wait_for("the quiet connection's echo", Duration::from_secs(10), || {
        quiet.log_text().contains("echo")
    })
    .unwrap_or_else(|e| panic!("{e}: {}", quiet.log_text()));
    assert!(quiet.log_text().contains("echo abcdefgh"), "{}", quiet.log_text());
    let log = lab.cluster.agent_log("h3");
    assert_eq!(kept["survived"], 16, "connections lost: {kept}\n{log}");
    assert_eq!(
        lost["survived"], 0,
        "connections of a listener without Maglev survived though never carried: {lost}"
    );
    assert!(
        log.contains("taken over: the previous owner's flows not carried here are picked up"),
        "{log}"
    );
    // Each went on at h3 as it was at h2: the same member, from h2's NAT
    // address and port.
    let at_h3 = flows_through(&lab, "h3", 7000);
    assert_eq!(at_h3, at_h2, "picked up differently from how h2 translated them");
    let pickups = lab.drops("h3").unwrap()["nat_pickups"].clone();
    let picked = pickups
        .as_array()
        .and_then(|a| a.iter().find(|p| p["address"] == VIP))
        .unwrap_or_else(|| panic!("no takeover in h3's dataplane: {pickups}"))
        .clone();
    assert_eq!(picked["previous_nat"], "10.40.1.202");
    assert!(picked["picked"].as_u64().unwrap() >= 17, "{picked}");

    // A zone host forges segments of flows nobody opened (an ACK scan of
    // the listener) within the window: taken up, they reach no member and
    // open no flow; the client's new connections work.
    let before = picked["picked"].as_u64().unwrap();
    let scan = lab
        .topo
        .zone_ns("ext")
        .sh(&[
            "nmap",
            "-n",
            "-Pn",
            "-sA",
            "-S",
            "10.99.0.1",
            "-e",
            "br0",
            "-g",
            "4242",
            "-p",
            "7000",
            VIP,
        ])
        .unwrap_or_else(|e| e.to_string());
    eprintln!("{scan}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = lab.drops("h3").unwrap()["nat_pickups"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|p| p["address"] == VIP)
                .map(|p| p["picked"].as_u64().unwrap())
        })
        .unwrap();
    assert!(
        after > before,
        "the forged segment was not even taken up ({before} -> {after})"
    );
    let flows = flows_through(&lab, "h3", 7000);
    assert!(
        !flows.contains_key(&4242) && flows.len() == 17,
        "a forged segment opened a flow: {flows:?}"
    );
    let fresh = survive_from_zone(&lab, 7000, 4, 1).join().unwrap();
    assert_eq!(fresh["survived"], 4, "{fresh}");
    let _ = lab.topo.host_ns("h3").nft_mend("synccut");
}
