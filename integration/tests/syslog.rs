//! Security events as syslog, received and parsed by a real `rsyslogd`:
//! the agent's (a forged source address, a flow beyond the port's budget,
//! a quarantine applied and lifted) over TLS (RFC 5425), the controller's
//! (a policy change, a tenant refused) over UDP and over TCP with octet
//! counting (RFC 6587). rsyslog's RFC 5424 parser gives each message's
//! host, application, MSGID and structured data, which the test reads.

use std::path::Path;
use std::time::Duration;

use sdn_integration::cluster::Cluster;
use sdn_integration::lab::Lab;
use sdn_integration::ops::*;
use sdn_integration::supervisor::{have, Rsyslogd};
use sdn_integration::{bin, privileged, Proc};
use sdn_proto::v1 as pb;

const T: &str = "dept-s";

fn sh(cmd: &str) {
    let out = std::process::Command::new("bash").args(["-c", cmd]).output().unwrap();
    assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA and a certificate for 127.0.0.1 that it issued.
fn certificates(dir: &Path) {
    let d = dir.display();
    sh(&format!(
        "cd {d} && openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=syslog-test-ca 2>/dev/null \
         && openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=syslog 2>/dev/null \
         && printf 'subjectAltName=IP:127.0.0.1\\n' > san.ext \
         && openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 2 -extfile san.ext 2>/dev/null"
    ));
}

fn quarantine(id: &str, target: &str) -> pb::operation::Op {
    pb::operation::Op::PutQuarantine(pb::Quarantine {
        id: id.into(),
        target_kind: pb::Kind::Port as i32,
        target_id: target.into(),
        reason: "incident 42".into(),
        expires_unix_ms: 0,
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_events_reach_rsyslog_over_tls() {
    if !privileged() {
        return;
    }
    assert!(
        have("/usr/sbin/rsyslogd"),
        "rsyslog is missing: scripts/setup.sh installs it"
    );
    let certs = tempfile::tempdir().unwrap();
    certificates(certs.path());
    let ca = certs.path().join("ca.pem");
    let lab = Lab::new("slg", &["h1"])
        .tenant(T)
        .vpc_vni("vs", 4343)
        .subnet("sns", "vs", "10.47.0.0/24", "")
        .group("web", vec![ingress("http", false, "tcp", (80, 80), "", "")])
        .vm("vm1", "h1", "sns", &["web"])
        .vm("vm2", "h1", "sns", &["web"])
        .agent_args(&[
            "--syslog",
            "tls://127.0.0.1:6514",
            "--syslog-tls-ca",
            ca.to_str().unwrap(),
            "--ct-budget",
            "3",
        ])
        .start()
        .await
        .unwrap();
    let d = certs.path().display();
    let rsyslog = Rsyslogd::start(
        &certs.path().join("rsyslog"),
        Some(&lab.topo.host_ns("h1").name),
        &format!(
            "global(DefaultNetstreamDriverCAFile=\"{d}/ca.pem\" DefaultNetstreamDriverCertFile=\"{d}/server.pem\" \
             DefaultNetstreamDriverKeyFile=\"{d}/server.key\")\n\
             module(load=\"imtcp\" StreamDriver.Name=\"gtls\" StreamDriver.Mode=\"1\" StreamDriver.AuthMode=\"anon\")"
        ),
        "input(type=\"imtcp\" address=\"127.0.0.1\" port=\"6514\" ruleset=\"out\")",
    )
    .unwrap();
    let _servers = lab.topo.serve(&["vm1"], &[], &["--tcp", "80"]).unwrap();
    let (vm1, vm2) = (lab.topo.vm("vm1"), lab.topo.vm("vm2"));

    // While vm1 floods vm2 with what vm2's groups refuse (thousands of
    // security-group denials a second, more than the events' rate), vm2
    // forges its source: an address that is not its own. The spoofing is
    // reported all the same: the guards' events have a share of their own.
    let probe = bin("sdn-probe");
    let mut flood = Proc::spawn(
        "flood",
        Some(&vm1.ns.name),
        &probe,
        &["flood", &vm2.v4, "9999", "--seconds", "4", "--flows", "4096"],
        certs.path(),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    vm2.ns
        .sh(&["ip", "addr", "add", "10.47.0.99/32", "dev", "eth0"])
        .unwrap();
    let forged = vm2.ns.sh(&[
        probe.to_str().unwrap(),
        "connect",
        "tcp",
        &vm1.v4,
        "80",
        "--bind",
        "10.47.0.99",
        "--timeout-ms",
        "500",
    ]);
    assert!(forged.is_err(), "a forged source got through");
    flood.stop();
    let denied = lab.counter("h1", "drops", "policy_ingress");
    assert!(
        denied > 5000,
        "the flood was too small to test the shares: {denied} denials"
    );
    // vm2 opens more flows than its budget (3): the rest are refused.
    let mut refused = 0;
    for _ in 0..6 {
        if !lab.topo.reach("vm2", "vm1", "tcp", 80, false) {
            refused += 1;
        }
    }
    assert!(refused > 0, "the budget refused nothing");
    // vm1 quarantined, then released.
    lab.cluster.apply(vec![quarantine("q1", "vm1")]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    lab.cluster
        .apply(vec![pb::operation::Op::Delete(pb::ObjectRef {
            kind: pb::Kind::Quarantine as i32,
            id: "q1".into(),
        })])
        .await
        .unwrap();

    let has = |l: &[String], msgid: &str, needle: &str| {
        l.iter()
            .any(|x| x.contains(&format!("|{msgid}|")) && x.contains(needle))
    };
    let got = rsyslog
        .wait_for_lines("the agent's events", Duration::from_secs(20), |l| {
            has(l, "spoof", "src=\"10.47.0.99\"")
                && has(l, "flow_budget", "")
                && has(l, "quarantine_applied", "")
                && has(l, "quarantine_lifted", "")
        })
        .await;
    let text = got.join("\n");
    let spoof = got
        .iter()
        .find(|x| x.contains("|spoof|") && x.contains("10.47.0.99"))
        .unwrap();
    let f: Vec<&str> = spoof.splitn(6, '|').collect();
    assert_eq!((f[0], f[1]), ("h1", "sdn-agent"), "{spoof}");
    // PRI: log audit (13), warning (4).
    assert_eq!(f[3], "108", "{spoof}");
    for field in [
        "[sdn@32473 ",
        "host=\"h1\"",
        "event=\"spoof_ip\"",
        "port=\"vm2\"",
        &format!("tenant=\"{T}\""),
        "vpc=\"vs\"",
        "action=\"drop\"",
        "rule=\"guard/spoof_ip\"",
        "proto=\"6\"",
        &format!("dst=\"{}\"", vm1.v4),
        "dport=\"80\"",
    ] {
        assert!(f[4].contains(field), "{field} missing from {spoof}");
    }
    assert!(f[5].contains("dropped at vm2 (spoof_ip)"), "{spoof}");
    let q = got.iter().find(|x| x.contains("|quarantine_applied|")).unwrap();
    assert!(
        q.contains("port=\"vm1\"") && q.contains("quarantine=\"q1\"") && q.contains("reason=\"incident 42\""),
        "{q}"
    );
    let b = got.iter().find(|x| x.contains("|flow_budget|")).unwrap();
    assert!(
        b.contains("event=\"ct_budget\"") && b.contains("port=\"vm2\""),
        "{b}\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn controller_events_reach_rsyslog_over_udp_and_tcp() {
    if !privileged() {
        return;
    }
    assert!(
        have("/usr/sbin/rsyslogd"),
        "rsyslog is missing: scripts/setup.sh installs it"
    );
    let logs = tempfile::tempdir().unwrap();
    let (udp, tcp) = (free_port(), free_port());
    let rsyslog = Rsyslogd::start(
        logs.path(),
        None,
        "module(load=\"imudp\")\nmodule(load=\"imtcp\")",
        &format!(
            "input(type=\"imudp\" address=\"127.0.0.1\" port=\"{udp}\" ruleset=\"out\")\n\
             input(type=\"imtcp\" address=\"127.0.0.1\" port=\"{tcp}\" ruleset=\"out\")"
        ),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let receivers = format!("udp://127.0.0.1:{udp},tcp://127.0.0.1:{tcp}");
    let c = Cluster::start_secure_with(dir.path(), &["--syslog", &receivers]).unwrap();
    c.apply(vec![tenant("acme"), tenant("globex")]).await.unwrap();
    c.apply_as(
        "sdn://tenant/acme/alice",
        vec![group(
            "web",
            "acme",
            vec![ingress("http", false, "tcp", (80, 80), "", "")],
        )],
    )
    .await
    .unwrap();
    let denied = c
        .apply_as(
            "sdn://tenant/globex/mallory",
            vec![group(
                "web",
                "acme",
                vec![ingress("all", false, "tcp", (1, 65535), "", "")],
            )],
        )
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    // Each event arrives twice: once over UDP, once over TCP.
    let got = rsyslog
        .wait_for_lines("the controller's events", Duration::from_secs(20), |l| {
            l.iter()
                .filter(|x| x.contains("|policy_change|") && x.contains("alice"))
                .count()
                == 2
                && l.iter()
                    .filter(|x| x.contains("|auth_refused|") && x.contains("mallory"))
                    .count()
                    == 2
        })
        .await;
    let change = got
        .iter()
        .find(|x| x.contains("|policy_change|") && x.contains("alice"))
        .unwrap();
    let f: Vec<&str> = change.splitn(6, '|').collect();
    assert_eq!(f[1], "sdn-controller", "{change}");
    // PRI: log audit (13), notice (5).
    assert_eq!(f[3], "109", "{change}");
    for field in [
        "actor=\"sdn://tenant/acme/alice",
        "tenants=\"acme\"",
        "action=\"change\"",
        "changes=\"",
        "web",
    ] {
        assert!(f[4].contains(field), "{field} missing from {change}");
    }
    let refused = got.iter().find(|x| x.contains("|auth_refused|")).unwrap();
    let f: Vec<&str> = refused.splitn(6, '|').collect();
    // PRI: security/authorization (4), warning (4).
    assert_eq!(f[3], "36", "{refused}");
    assert!(
        f[4].contains("mallory") && f[4].contains("action=\"refused\""),
        "{refused}"
    );
    assert!(f[4].contains("reason=\""), "{refused}");
}

fn free_port() -> u16 {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let p = s.local_addr().unwrap().port();
    // The same number free for TCP too, or try again.
    match std::net::TcpListener::bind(("127.0.0.1", p)) {
        Ok(_) => p,
        Err(_) => free_port(),
    }
}
