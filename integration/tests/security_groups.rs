//! Security groups end to end: a controller, two host agents, three VMs in
//! network namespaces, real TCP, UDP and ICMP over IPv4 and IPv6, on one
//! host and across hosts; the allowed/denied matrix follows API changes.

use std::time::Duration;

use sdn_integration::lab::Lab;
use sdn_integration::ops::*;
use sdn_integration::{bin, privileged, wait_for, Proc};
use sdn_proto::v1 as pb;

const T: &str = "dept-a";

/// Fields drop in order: traffic end points, then the controller, agents and
/// bpffs, then the namespaces.
struct Env {
    _servers: Vec<Proc>,
    lab: Lab,
}

fn web_rules(with_http: bool) -> Vec<pb::SecurityGroupRule> {
    let mut r = vec![
        ingress("ping4", false, "icmp", (0, 0), "", ""),
        ingress("ping6", true, "icmpv6", (128, 128), "", ""),
        ingress("dns", false, "udp", (5353, 5353), "10.10.0.0/16", ""),
        ingress("dns6", true, "udp", (5353, 5353), "fd10::/64", ""),
    ];
    if with_http {
        r.push(ingress("http4", false, "tcp", (80, 80), "", ""));
        r.push(ingress("http6", true, "tcp", (80, 80), "fd10::/64", ""));
    }
    r
}

fn db_rules() -> Vec<pb::SecurityGroupRule> {
    vec![
        ingress("pg4", false, "tcp", (5432, 5432), "", "web"),
        ingress("pg6", true, "tcp", (5432, 5432), "", "web"),
    ]
}

/// vm1 and vm2 on h1, vm3 on h2 (10.10.0.11-13, fd10::11-13).
async fn setup(tag: &str) -> anyhow::Result<Env> {
    let lab = Lab::new(tag, &["h1", "h2"])
        .tenant(T)
        .vpc("vpc1", None)
        .subnet("sn1", "vpc1", "10.10.0.0/24", "fd10::/64")
        .group("web", web_rules(true))
        .group("db", db_rules())
        .vm("vm1", "h1", "sn1", &["web"])
        .vm("vm2", "h1", "sn1", &["db"])
        .vm("vm3", "h2", "sn1", &["web"])
        .start()
        .await?;
    let args = ["--tcp", "80", "--tcp", "81", "--tcp", "5432", "--udp", "5353"];
    let servers = lab.topo.serve(&["vm1", "vm2", "vm3"], &[], &args)?;
    Ok(Env { _servers: servers, lab })
}

impl Env {
    fn reach(&self, from: &str, to: &str, proto: &str, port: u16, v6: bool) -> bool {
        self.lab.topo.reach(from, to, proto, port, v6)
    }

    fn expect(&self, cases: &[(&str, &str, &str, u16, bool, bool)]) {
        let mut wrong = Vec::new();
        for (from, to, proto, port, v6, want) in cases {
            let got = self.reach(from, to, proto, *port, *v6);
            let fam = if *v6 { "v6" } else { "v4" };
            eprintln!(
                "  {from} -> {to} {proto}/{port} {fam}: {}",
                if got { "PASS" } else { "DROP" }
            );
            if got != *want {
                wrong.push(format!(
                    "{from}->{to} {proto}/{port} {fam}: expected {}, got {}",
                    if *want { "pass" } else { "drop" },
                    if got { "pass" } else { "drop" }
                ));
            }
        }
        assert!(wrong.is_empty(), "matrix mismatch:\n{}", wrong.join("\n"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn matrix_follows_the_api() {
    if !privileged() {
        eprintln!("skipping: needs root");
        return;
    }
    let env = setup("sgm").await.expect("topology");
    eprintln!("initial policy");
    env.expect(&[
        // vm1 and vm3 are in web (tcp 80, udp 5353 from 10.10/16, ping); vm2 is db (5432 from web).
        ("vm2", "vm1", "tcp", 80, false, true),  // same host
        ("vm3", "vm1", "tcp", 80, false, true),  // across hosts
        ("vm3", "vm1", "tcp", 81, false, false), // no rule for 81
        ("vm3", "vm1", "tcp", 80, true, true),   // IPv6 across hosts
        ("vm2", "vm1", "tcp", 81, true, false),
        ("vm2", "vm1", "udp", 5353, false, true),
        ("vm3", "vm1", "udp", 5353, false, true),
        ("vm1", "vm2", "udp", 5353, false, false), // db allows no udp
        ("vm3", "vm1", "udp", 5353, true, true),
        ("vm1", "vm2", "udp", 5353, true, false),
        ("vm2", "vm1", "icmp", 0, false, true),
        ("vm3", "vm1", "icmp", 0, true, true),
        ("vm1", "vm2", "icmp", 0, false, false),
        ("vm1", "vm2", "tcp", 5432, false, true), // remote group web
        ("vm3", "vm2", "tcp", 5432, true, true),  // remote group, IPv6, across hosts
        ("vm2", "vm3", "tcp", 5432, false, false),
    ]);

    eprintln!("remove http from web");
    env.lab
        .cluster
        .apply(vec![group("web", T, web_rules(false))])
        .await
        .expect("apply");
    env.expect(&[
        ("vm2", "vm1", "tcp", 80, false, false),
        ("vm3", "vm1", "tcp", 80, true, false),
        ("vm2", "vm1", "icmp", 0, false, true),
    ]);

    eprintln!("vm3 leaves web: remote-group rules follow membership");
    env.lab
        .cluster
        .apply(vec![env.lab.port("vm3", &[])])
        .await
        .expect("apply");
    env.expect(&[
        ("vm3", "vm2", "tcp", 5432, false, false),
        ("vm3", "vm2", "tcp", 5432, true, false),
        ("vm1", "vm2", "tcp", 5432, false, true),
    ]);

    eprintln!("vm3 rejoins web and http comes back");
    env.lab
        .cluster
        .apply(vec![group("web", T, web_rules(true)), env.lab.port("vm3", &["web"])])
        .await
        .expect("apply");
    env.expect(&[
        ("vm3", "vm2", "tcp", 5432, false, true),
        ("vm2", "vm1", "tcp", 80, false, true),
        ("vm3", "vm1", "tcp", 80, true, true),
    ]);

    let drops = env.lab.drops("h1").expect("counters");
    eprintln!("h1 drops: {drops}");
    assert!(
        drops["drops"]["policy_ingress"].as_u64().unwrap() > 0,
        "denied packets are counted"
    );
    assert_eq!(
        drops["drops"]["spoof_ip"].as_u64().unwrap(),
        0,
        "no legitimate packet was taken for spoofing"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn spoofing_and_fragments_are_dropped_on_the_wire() {
    if !privileged() {
        eprintln!("skipping: needs root");
        return;
    }
    let env = setup("sgs").await.expect("topology");
    let vm2 = &env.lab.topo.vm("vm2").ns;
    let before = env.lab.drops("h1").unwrap();
    // A second address the port does not own: its packets must not leave.
    vm2.sh(&["ip", "addr", "add", "10.10.0.99/32", "dev", "eth0"]).unwrap();
    let spoofed = vm2.sh(&[
        bin("sdn-probe").to_str().unwrap(),
        "connect",
        "tcp",
        "10.10.0.13",
        "80",
        "--timeout-ms",
        "500",
    ]);
    assert!(spoofed.is_ok(), "the real address still works");
    // vm1 is on vm2's subnet: resolve it with the real address first, so the
    // forged packet itself goes out (not an ARP request from the fake address).
    assert!(env.reach("vm2", "vm1", "icmp", 0, false));
    let from_fake = vm2.sh(&["ping", "-c", "1", "-W", "1", "-I", "10.10.0.99", "10.10.0.11"]);
    assert!(from_fake.is_err(), "a forged source address must not get through");
    // A different MAC on the VM's NIC.
    vm2.sh(&["ip", "link", "set", "eth0", "address", "02:00:00:00:00:99"])
        .unwrap();
    assert!(
        !env.reach("vm2", "vm1", "icmp", 0, false),
        "a forged MAC must not get through"
    );
    vm2.sh(&["ip", "link", "set", "eth0", "address", &env.lab.topo.vm("vm2").mac])
        .unwrap();
    // Fragments: a 3000-byte ping is fragmented by the VM's kernel.
    let _ = env
        .lab
        .topo
        .vm("vm1")
        .ns
        .sh(&["ping", "-c", "1", "-W", "1", "-s", "3000", "10.10.0.11"]);
    let _ = vm2.sh(&["ping", "-c", "1", "-W", "1", "-s", "3000", "10.10.0.11"]);
    let after = env.lab.drops("h1").unwrap();
    for reason in ["spoof_ip", "spoof_mac", "fragment"] {
        let (b, a) = (
            before["drops"][reason].as_u64().unwrap(),
            after["drops"][reason].as_u64().unwrap(),
        );
        eprintln!("{reason}: {b} -> {a}");
        assert!(a > b, "{reason} drops are counted");
    }
    assert!(env.reach("vm2", "vm1", "icmp", 0, false), "normal traffic still passes");
}

#[tokio::test(flavor = "multi_thread")]
async fn restarts_keep_state_and_flows() {
    if !privileged() {
        eprintln!("skipping: needs root");
        return;
    }
    let mut env = setup("sgr").await.expect("topology");
    // A long-lived connection from vm3 (h2) to vm1 (h1), exchanging every 50 ms.
    let ns3 = env.lab.topo.vm("vm3").ns.name.clone();
    let mut hold = Proc::spawn(
        "hold",
        Some(&ns3),
        &bin("sdn-probe"),
        &["hold", "10.10.0.11", "80", "--seconds", "8", "--interval-ms", "50"],
        &env.lab.topo.dir,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));

    // The controller crashes and comes back: the agents resume their watch
    // from the revision and resource versions they hold, without a snapshot.
    env.lab.cluster.restart_controller().expect("controller restart");
    let mut c = env.lab.cluster.client().await.unwrap();
    wait_all_enforced(&mut c).await;
    let ctl_log = env.lab.cluster.controller.log_text();
    let resumed = ctl_log
        .lines()
        .filter(|l| l.contains("watch started") && l.contains("resume=true"))
        .count();
    assert!(resumed >= 2, "both agents resumed their watch:\n{ctl_log}");

    // Both agents crash; the dataplane keeps enforcing without them.
    env.lab.cluster.agent("h1").kill();
    env.lab.cluster.agent("h2").kill();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        env.reach("vm2", "vm1", "tcp", 80, false),
        "the dataplane works with no agent"
    );
    assert!(
        !env.reach("vm2", "vm1", "tcp", 81, false),
        "and still enforces with no agent"
    );
    env.lab.cluster.start_agent(&env.lab.topo, "h1").unwrap();
    env.lab.cluster.start_agent(&env.lab.topo, "h2").unwrap();

    // Both agents reconnect, adopt the pinned dataplane and ack the current revision.
    wait_all_enforced(&mut c).await;

    // The established flow crossed agent crashes, a controller crash and the
    // restarts without losing one exchange.
    wait_for("the hold probe to finish", Duration::from_secs(20), || !hold.alive()).unwrap();
    let log = hold.log_text();
    eprintln!("hold probe: {log}");
    assert!(
        log.contains("failed=0"),
        "the long-lived connection lost exchanges:\n{log}"
    );

    // State survived the controller restart.
    let list = c
        .list(pb::ListRequest {
            kind: pb::Kind::Port as i32,
            stale: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.ports.len(), 3);
    let audit = c
        .audit(pb::AuditRequest {
            after_revision: 0,
            limit: 100,
            local: false,
        })
        .await
        .unwrap()
        .into_inner();
    // The lab's three batches: hosts, the objects, the ports.
    assert_eq!(audit.records.len(), 3);
    assert_eq!(audit.records[2].actor, "integration-test");
    assert!(
        audit.records[2].changes.iter().any(|l| l == "put port vm3"),
        "{:?}",
        audit.records[2].changes
    );

    // A change made now is enforced by the restarted agents.
    env.lab
        .cluster
        .apply(vec![group("web", T, web_rules(false))])
        .await
        .expect("apply after restarts");
    assert!(!env.reach("vm2", "vm1", "tcp", 80, false));
    let h1 = env.lab.cluster.agent("h1").log_text();
    assert!(h1.contains("adopted pinned dataplane state"), "agent log:\n{h1}");
}

/// Waits until every host's agent is connected and enforces the current revision.
async fn wait_all_enforced(c: &mut pb::provisioning_client::ProvisioningClient<tonic::transport::Channel>) {
    let mut last = None;
    for _ in 0..200 {
        let e = c
            .enforcement(pb::EnforcementRequest { revision: 0 })
            .await
            .unwrap()
            .into_inner();
        if e.hosts
            .iter()
            .all(|h| h.connected && h.enforced_revision == e.current_revision)
        {
            return;
        }
        last = Some(e);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("agents did not all enforce the current revision: {last:?}");
}

fn quarantine(id: &str, kind: pb::Kind, target: &str, reason: &str, expires_unix_ms: u64) -> pb::operation::Op {
    pb::operation::Op::PutQuarantine(pb::Quarantine {
        id: id.into(),
        target_kind: kind as i32,
        target_id: target.into(),
        reason: reason.into(),
        expires_unix_ms,
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn quarantine_cuts_off_at_once_and_lifts() {
    if !privileged() {
        eprintln!("skipping: needs root");
        return;
    }
    let env = setup("sgq").await.expect("topology");
    assert!(env.reach("vm2", "vm1", "icmp", 0, false));
    assert!(env.reach("vm1", "vm3", "tcp", 80, false));
    // A live connection into vm1 that the quarantine must cut too.
    let ns3 = env.lab.topo.vm("vm3").ns.name.clone();
    let mut hold = Proc::spawn(
        "hold-q",
        Some(&ns3),
        &bin("sdn-probe"),
        &["hold", "10.10.0.11", "80", "--seconds", "3", "--interval-ms", "50"],
        &env.lab.topo.dir,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));

    let r = env
        .lab
        .cluster
        .apply(vec![quarantine(
            "q-vm1",
            pb::Kind::Port,
            "vm1",
            "malware beacon, ticket 4711",
            0,
        )])
        .await
        .expect("quarantine");
    assert!(r.enforced && r.hosts == vec!["h1".to_string()], "{r:?}");
    env.expect(&[
        ("vm2", "vm1", "icmp", 0, false, false),
        ("vm3", "vm1", "tcp", 80, true, false),
        ("vm1", "vm3", "tcp", 80, false, false),  // outbound too
        ("vm3", "vm2", "tcp", 5432, false, true), // others unaffected
    ]);
    wait_for("the hold probe to finish", Duration::from_secs(10), || !hold.alive()).unwrap();
    assert!(
        !hold.log_text().contains("failed=0"),
        "the established connection was cut: {}",
        hold.log_text()
    );
    let drops = env.lab.drops("h1").unwrap();
    assert!(drops["drops"]["quarantined"].as_u64().unwrap() > 0, "{drops}");
    let agent_log = env
        .lab
        .cluster
        .agents
        .iter()
        .find(|(h, _)| h == "h1")
        .unwrap()
        .1
        .log_text();
    assert!(
        agent_log.contains("quarantine_applied") && agent_log.contains("ticket 4711"),
        "the agent logs a security event"
    );

    // Deleting the port while quarantined is refused; lifting restores the policy.
    let e = env
        .lab
        .cluster
        .apply(vec![pb::operation::Op::Delete(pb::ObjectRef {
            kind: pb::Kind::Port as i32,
            id: "vm1".into(),
        })])
        .await
        .unwrap_err();
    assert!(e.message().contains("quarantine q-vm1"), "{e:?}");
    env.lab
        .cluster
        .apply(vec![pb::operation::Op::Delete(pb::ObjectRef {
            kind: pb::Kind::Quarantine as i32,
            id: "q-vm1".into(),
        })])
        .await
        .expect("lift");
    env.expect(&[
        ("vm2", "vm1", "icmp", 0, false, true),
        ("vm3", "vm1", "tcp", 81, false, false),
        ("vm1", "vm3", "tcp", 80, false, true),
    ]);

    // A VM by the id the compute platform gave its ports: vm3's port names
    // its VM; quarantining the VM cuts the port on its host (h2), both
    // families, and lifting it restores the policy.
    let mut p3 = env.lab.port("vm3", &["web"]);
    if let pb::operation::Op::PutPort(p) = &mut p3 {
        p.vm_id = "vm-0003".into();
    }
    env.lab.cluster.apply(vec![p3]).await.expect("name vm3's VM");
    env.lab
        .cluster
        .apply(vec![pb::operation::Op::PutQuarantine(pb::Quarantine {
            id: "q-vm3".into(),
            target_kind: pb::Kind::Vm as i32,
            target_id: "vm-0003".into(),
            reason: "scanning its neighbours".into(),
            expires_unix_ms: 0,
        })])
        .await
        .expect("quarantine the VM");
    env.expect(&[
        ("vm1", "vm3", "tcp", 80, false, false),
        ("vm1", "vm3", "icmp", 0, true, false),
        ("vm3", "vm1", "icmp", 0, false, false),
    ]);
    env.lab
        .cluster
        .apply(vec![pb::operation::Op::Delete(pb::ObjectRef {
            kind: pb::Kind::Quarantine as i32,
            id: "q-vm3".into(),
        })])
        .await
        .expect("lift the VM quarantine");
    env.expect(&[("vm1", "vm3", "tcp", 80, false, true)]);

    // A whole VPC, with an expiry: it lifts by itself.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    env.lab
        .cluster
        .apply(vec![quarantine("q-vpc", pb::Kind::Vpc, "vpc1", "exercise", now + 2500)])
        .await
        .expect("vpc quarantine");
    env.expect(&[
        ("vm2", "vm1", "icmp", 0, false, false),
        ("vm1", "vm2", "tcp", 5432, false, false),
    ]);
    std::thread::sleep(Duration::from_millis(2500));
    wait_for("the quarantine to expire", Duration::from_secs(5), || {
        env.reach("vm2", "vm1", "icmp", 0, false)
    })
    .unwrap();
    env.expect(&[("vm1", "vm2", "tcp", 5432, false, true)]);
    let e = env
        .lab
        .cluster
        .apply(vec![quarantine("q-old", pb::Kind::Port, "vm1", "late", 1000)])
        .await
        .unwrap_err();
    assert!(e.message().contains("expires_unix_ms"), "{e:?}");
    let mut c = env.lab.cluster.client().await.unwrap();
    let audit = c
        .audit(pb::AuditRequest {
            after_revision: 0,
            limit: 100,
            local: false,
        })
        .await
        .unwrap()
        .into_inner();
    let lines: Vec<String> = audit.records.iter().flat_map(|r| r.changes.clone()).collect();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("quarantine q-vm1 port vm1") && l.contains("ticket 4711")),
        "{lines:?}"
    );
    assert!(lines.iter().any(|l| l == "lift quarantine q-vm1"), "{lines:?}");
}
