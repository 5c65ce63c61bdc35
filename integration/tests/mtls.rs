//! Mutual TLS and roles at the controller, tried with clients that are not
//! ours (Python's grpcio, `openssl s_client`) and with ours: who has no
//! valid certificate gets no connection; who has one may do what its role
//! allows and nothing else; every refusal is a security event in the
//! controller's log.

use std::path::Path;
use std::process::Command;

use prost::Message as _;
use sdn_integration::cluster::{Cluster, ADMIN, PLATFORM};
use sdn_integration::ops::*;
use sdn_integration::pki::{now, Pki};
use sdn_integration::pyclient::{tls_probe, Py};
use sdn_integration::{bin, free_port, privileged, Proc};
use sdn_proto::tls::pki::Validity;
use sdn_proto::tls::Files;
use sdn_proto::v1 as pb;
use tonic::Code;

fn list() -> Vec<u8> {
    pb::ListRequest { kind: 0, stale: false }.encode_to_vec()
}

fn apply_body(ops: Vec<pb::operation::Op>) -> Vec<u8> {
    pb::ApplyRequest {
        operations: ops.into_iter().map(|o| pb::Operation { op: Some(o) }).collect(),
        actor: "python".into(),
        wait: false,
        wait_timeout_ms: 0,
    }
    .encode_to_vec()
}

/// The controller's security events so far.
fn security_events(c: &Cluster) -> Vec<String> {
    c.controller
        .log_text()
        .lines()
        .filter(|l| l.contains("sdn::security"))
        .map(str::to_string)
        .collect()
}

fn s_client(addr: &str, args: &[&str]) -> String {
    let mut child = Command::new("timeout")
        .args(["15", "openssl", "s_client", "-connect", addr, "-alpn", "h2"])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("openssl");
    // Input open for a while: s_client quits at the end of its input, and
    // before its handshake is done that leaves nothing to read.
    std::thread::sleep(std::time::Duration::from_millis(2000));
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("openssl");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// No certificate, one of another CA, an expired one: no connection, each
/// a security event naming why. A valid one gets its answer.
#[test]
fn only_certificates_of_the_cluster_ca_connect() {
    if !privileged() {
        eprintln!("skipped: needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start_secure(dir.path()).unwrap();
    let pki = c.pki.as_ref().unwrap();
    let target = c.addr.trim_start_matches("https://").to_string();
    let other = Pki::new(&dir.path().join("other-ca")).unwrap();
    let platform = pki.files(PLATFORM).unwrap();
    let foreign = other.files(PLATFORM).unwrap();
    let expired = pki
        .files_valid(
            "sdn://platform/expired",
            Validity {
                not_before: now() - 10 * 86_400,
                not_after: now() - 86_400,
            },
        )
        .unwrap();
    let method = "/sdn.v1.Provisioning/List";
    let py = |ca: Option<&Path>, files: Option<&Files>| {
        Py {
            target: target.clone(),
            ca,
            files,
        }
        .call(method, list(), false)
    };

    let (code, text) = py(None, None);
    assert_eq!(code, "UNAVAILABLE", "plain HTTP/2 to the TLS port: {text}");
    let (code, text) = py(Some(&pki.ca()), None);
    assert_eq!(code, "UNAVAILABLE", "TLS without a client certificate: {text}");
    let (code, text) = py(Some(&pki.ca()), Some(&foreign));
    assert_eq!(code, "UNAVAILABLE", "a certificate of another CA: {text}");
    let (code, text) = py(Some(&pki.ca()), Some(&expired));
    assert_eq!(code, "UNAVAILABLE", "an expired certificate: {text}");
    // The client checks the controller too: another CA's root refuses it.
    let (code, text) = py(Some(&other.ca()), Some(&platform));
    assert_eq!(
        code, "UNAVAILABLE",
        "the controller's certificate under another CA: {text}"
    );
    let (code, text) = py(Some(&pki.ca()), Some(&platform));
    assert_eq!(code, "OK", "the platform's own certificate: {text}");

    // OpenSSL's view (Python's ssl, then openssl s_client): the handshake
    // asks for a certificate and fails without one; with one it verifies
    // and speaks HTTP/2.
    let seen = tls_probe(&target, &pki.ca(), None);
    assert!(
        seen["error"]
            .as_str()
            .unwrap_or_default()
            .contains("CERTIFICATE_REQUIRED"),
        "{seen}"
    );
    let out = s_client(
        &target,
        &[
            "-CAfile",
            pki.ca().to_str().unwrap(),
            "-cert",
            platform.cert.to_str().unwrap(),
            "-key",
            platform.key.to_str().unwrap(),
        ],
    );
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}");
    assert!(out.contains("ALPN protocol: h2"), "{out}");

    let events = security_events(&c);
    let has = |why: &str| {
        events
            .iter()
            .any(|l| l.contains("connection refused") && l.contains(why))
    };
    assert!(has("the client sent no certificate"), "{events:#?}");
    assert!(has("certificate has expired"), "{events:#?}");
    assert!(
        has("unable to get local issuer certificate") || has("certificate signature failure"),
        "{events:#?}"
    );
    assert!(events.len() >= 5, "{events:#?}");
}

/// Every operation of a batch is the caller's role's to make; a tenant
/// reaches only its own tenant's groups; refusals are security events.
#[tokio::test]
async fn roles_decide_every_operation() {
    if !privileged() {
        eprintln!("skipped: needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start_secure(dir.path()).unwrap();
    let pki = c.pki.as_ref().unwrap();
    c.apply(vec![tenant("t1"), tenant("t2"), vpc("v1", "t1"), vpc("v2", "t2")])
        .await
        .unwrap();
    c.apply_as("sdn://tenant/t2/bob", vec![group("g2", "t2", open_rules())])
        .await
        .unwrap();

    // Python's grpcio as a tenant of t1.
    let alice = pki.files("sdn://tenant/t1/alice").unwrap();
    let py = Py {
        target: c.addr.trim_start_matches("https://").to_string(),
        ca: Some(&pki.ca()),
        files: Some(&alice),
    };
    let apply = "/sdn.v1.Provisioning/Apply";
    let (code, text) = py.call(apply, apply_body(vec![group("g1", "t1", open_rules())]), false);
    assert_eq!(code, "OK", "its own group: {text}");
    for (what, ops) in [
        ("a group of t2", vec![group("g3", "t2", open_rules())]),
        ("t2's group, claimed for t1", vec![group("g2", "t1", vec![])]),
        (
            "the deletion of t2's group",
            vec![pb::operation::Op::Delete(pb::ObjectRef {
                kind: pb::Kind::SecurityGroup as i32,
                id: "g2".into(),
            })],
        ),
        ("a VPC", vec![vpc("v9", "t1")]),
        (
            "its own group and a port in one batch",
            vec![group("g4", "t1", vec![]), host("h9", "192.0.2.9")],
        ),
    ] {
        let (code, text) = py.call(apply, apply_body(ops), false);
        assert_eq!(code, "PERMISSION_DENIED", "{what}: {text}");
        assert!(
            text.contains("role tenant") && text.contains("sdn://tenant/t1/alice"),
            "{what}: {text}"
        );
    }

    // A rule naming t2's group reads as one naming no group at all: no
    // word of whether it exists or whose it is.
    let answers: Vec<(String, String)> = ["g2", "ghost"]
        .iter()
        .map(|other| {
            py.call(
                apply,
                apply_body(vec![group(
                    "g1",
                    "t1",
                    vec![ingress("r", false, "tcp", (80, 80), "", other)],
                )]),
                false,
            )
        })
        .collect();
    for ((code, text), other) in answers.iter().zip(["g2", "ghost"]) {
        assert_eq!(code, "INVALID_ARGUMENT", "{text}");
        assert!(
            text.contains(&format!("tenant t1 has no security group \"{other}\"")),
            "{text}"
        );
        assert!(!text.contains("t2"), "{text}");
    }

    // Nothing of the refused batches was applied; t1 reads only its own.
    let mut admin = pb::provisioning_client::ProvisioningClient::new(
        sdn_proto::connect_with(&c.addr, Some(pki.connector(ADMIN).unwrap()))
            .await
            .unwrap(),
    );
    let all = admin
        .list(pb::ListRequest { kind: 0, stale: false })
        .await
        .unwrap()
        .into_inner();
    let mut groups: Vec<(&str, &str, usize)> = all
        .security_groups
        .iter()
        .map(|g| (g.id.as_str(), g.tenant_id.as_str(), g.rules.len()))
        .collect();
    groups.sort();
    assert_eq!(groups, vec![("g1", "t1", 2), ("g2", "t2", 2)]);
    assert!(all.hosts.is_empty());
    let (code, text) = py.call("/sdn.v1.Provisioning/List", list(), false);
    assert_eq!(code, "OK", "{text}");
    let mine = pb::ListResponse::decode(&*sdn_integration::pyclient::unhex(&text)).unwrap();
    assert_eq!(mine.tenants.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(), ["t1"]);
    assert_eq!(mine.vpcs.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(), ["v1"]);
    assert_eq!(
        mine.security_groups.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(),
        ["g1"]
    );

    // The other roles: each only its own kinds.
    let as_ = |uri: &str| {
        let tls = pki.connector(uri).unwrap();
        let addr = c.addr.clone();
        async move {
            pb::provisioning_client::ProvisioningClient::new(sdn_proto::connect_with(&addr, Some(tls)).await.unwrap())
        }
    };
    let req = |ops: Vec<pb::operation::Op>| pb::ApplyRequest {
        operations: ops.into_iter().map(|o| pb::Operation { op: Some(o) }).collect(),
        actor: String::new(),
        wait: false,
        wait_timeout_ms: 0,
    };
    for (uri, ops, allowed) in [
        (PLATFORM, vec![zone("z", &["10.0.0.0/8"], "up")], false),
        (ADMIN, vec![host("h1", "192.0.2.1")], false),
        ("sdn://supervisor/inspector", vec![group("g5", "t1", vec![])], false),
        ("sdn://agent/h1", vec![group("g5", "t1", vec![])], false),
        (PLATFORM, vec![host("h1", "192.0.2.1")], true),
        (ADMIN, vec![zone("z", &["10.0.0.0/8"], "up")], true),
    ] {
        let r = as_(uri).await.apply(req(ops)).await;
        match (allowed, r) {
            (true, Ok(_)) => {}
            (false, Err(e)) if e.code() == Code::PermissionDenied => {
                assert!(e.message().contains(uri), "{e:?}");
            }
            (a, r) => panic!("{uri}: allowed={a}, got {r:?}"),
        }
    }
    let sup = as_("sdn://supervisor/inspector")
        .await
        .list(pb::ListRequest { kind: 0, stale: false })
        .await;
    assert!(sup.is_ok(), "a supervisor reads: {sup:?}");
    let e = as_("sdn://agent/h1")
        .await
        .audit(pb::AuditRequest {
            after_revision: 0,
            limit: 10,
            local: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    // The audit log names callers by their certificates.
    let audit = admin
        .audit(pb::AuditRequest {
            after_revision: 0,
            limit: 100,
            local: false,
        })
        .await
        .unwrap()
        .into_inner();
    let actors: Vec<&str> = audit.records.iter().map(|r| r.actor.as_str()).collect();
    assert!(
        actors.iter().any(|a| a.starts_with("sdn://tenant/t1/alice")),
        "{actors:?}"
    );
    assert!(actors.iter().any(|a| a.starts_with(PLATFORM)), "{actors:?}");
    // And a tenant reads only its own tenant's records: its users', and
    // the platform's on its objects.
    let (code, text) = py.call(
        "/sdn.v1.Provisioning/Audit",
        pb::AuditRequest {
            after_revision: 0,
            limit: 100,
            local: false,
        }
        .encode_to_vec(),
        false,
    );
    assert_eq!(code, "OK");
    let theirs = pb::AuditResponse::decode(&*sdn_integration::pyclient::unhex(&text)).unwrap();
    assert!(!theirs.records.is_empty());
    assert!(theirs.records.iter().all(|r| r.tenants == ["t1"]), "{theirs:?}");
    assert!(
        theirs
            .records
            .iter()
            .any(|r| r.actor.starts_with("sdn://tenant/t1/alice")),
        "{theirs:?}"
    );
    assert!(
        theirs.records.iter().all(|r| !format!("{r:?}").contains("t2")),
        "nothing of t2: {theirs:?}"
    );

    let refused = security_events(&c)
        .iter()
        .filter(|l| l.contains("refused caller="))
        .count();
    assert!(refused >= 10, "every refusal is a security event: {refused}");
}

/// An agent watches and answers for its own host only, and no answer can
/// claim a revision the store never reached.
#[tokio::test]
async fn agents_speak_only_for_their_own_host() {
    if !privileged() {
        eprintln!("skipped: needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start_secure(dir.path()).unwrap();
    let pki = c.pki.as_ref().unwrap();
    let r = c
        .apply(vec![
            host("h1", "192.0.2.1"),
            host("h2", "192.0.2.2"),
            tenant("t"),
            vpc("v", "t"),
            subnet("s", "v", "10.1.0.0/24", ""),
        ])
        .await
        .unwrap();
    let h1 = pki.files("sdn://agent/h1").unwrap();
    let py = Py {
        target: c.addr.trim_start_matches("https://").to_string(),
        ca: Some(&pki.ca()),
        files: Some(&h1),
    };
    let watch = |host: &str| {
        pb::WatchRequest {
            host_id: host.into(),
            revision: 0,
            resource_versions: Default::default(),
            protocol: sdn_proto::WATCH_PROTOCOL,
        }
        .encode_to_vec()
    };
    let (code, text) = py.call("/sdn.v1.Agent/Watch", watch("h1"), true);
    assert_eq!(code, "OK", "its own host: {text}");
    let (code, text) = py.call("/sdn.v1.Agent/Watch", watch("h2"), true);
    assert_eq!(code, "PERMISSION_DENIED", "another host: {text}");
    assert!(text.contains("its own host (h1)"), "{text}");
    let ack = |host: &str, revision: u64| {
        pb::AckRequest {
            host_id: host.into(),
            revision,
            ok: true,
            reason: String::new(),
        }
        .encode_to_vec()
    };
    let (code, text) = py.call("/sdn.v1.Agent/Ack", ack("h2", r.revision), false);
    assert_eq!(code, "PERMISSION_DENIED", "an ack for another host: {text}");
    let (code, text) = py.call("/sdn.v1.Agent/Ack", ack("h1", u64::MAX), false);
    assert_eq!(code, "INVALID_ARGUMENT", "an ack beyond the store's revision: {text}");
    assert!(text.contains("beyond"), "{text}");
    // The platform is no agent.
    let platform = pki.files(PLATFORM).unwrap();
    let py_platform = Py {
        target: py.target.clone(),
        ca: py.ca,
        files: Some(&platform),
    };
    let (code, text) = py_platform.call("/sdn.v1.Agent/Ack", ack("h1", r.revision), false);
    assert_eq!(code, "PERMISSION_DENIED", "{text}");

    // A write that waits for h2 (no agent of h2 runs) is not reported
    // enforced, whatever h1's agent says.
    let mut admin = pb::provisioning_client::ProvisioningClient::new(
        sdn_proto::connect_with(&c.addr, Some(pki.connector(PLATFORM).unwrap()))
            .await
            .unwrap(),
    );
    let waited = tokio::spawn(async move {
        admin
            .apply(pb::ApplyRequest {
                operations: vec![pb::Operation {
                    op: Some(port(
                        "p2",
                        "t",
                        "s",
                        "h2",
                        "tap2",
                        "02:00:00:00:00:02",
                        "10.1.0.2",
                        "",
                        &[],
                    )),
                }],
                actor: String::new(),
                wait: true,
                wait_timeout_ms: 3_000,
            })
            .await
    });
    let revision = c
        .client()
        .await
        .unwrap()
        .list(pb::ListRequest { kind: 0, stale: true })
        .await
        .unwrap()
        .into_inner()
        .revision;
    let mut forged = Vec::new();
    for _ in 0..10 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let now = c
            .client()
            .await
            .unwrap()
            .list(pb::ListRequest { kind: 0, stale: true })
            .await
            .unwrap()
            .into_inner()
            .revision;
        forged.push(py.call("/sdn.v1.Agent/Ack", ack("h2", now.max(revision)), false).0);
        forged.push(py.call("/sdn.v1.Agent/Ack", ack("h1", now.max(revision)), false).0);
    }
    let waited = waited.await.unwrap().unwrap_err();
    assert!(forged.iter().any(|c| c == "PERMISSION_DENIED"), "{forged:?}");
    assert_eq!(waited.code(), Code::DeadlineExceeded, "{waited:?}");
    assert!(waited.message().contains("h2"), "{waited:?}");
}

/// Only replicas speak Raft or change the membership; a caller cannot
/// claim to act for another.
#[tokio::test]
async fn only_replicas_speak_raft() {
    if !privileged() {
        eprintln!("skipped: needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start_secure(dir.path()).unwrap();
    let pki = c.pki.as_ref().unwrap();
    let admin = pki.files(ADMIN).unwrap();
    let py = Py {
        target: c.addr.trim_start_matches("https://").to_string(),
        ca: Some(&pki.ca()),
        files: Some(&admin),
    };
    let vote = pb::RaftMessage {
        cluster_id: String::new(),
        ..Default::default()
    }
    .encode_to_vec();
    for m in [
        "/sdn.v1.Raft/Vote",
        "/sdn.v1.Raft/AppendEntries",
        "/sdn.v1.Raft/InstallSnapshot",
    ] {
        let (code, text) = py.call(m, vote.clone(), false);
        assert_eq!(code, "PERMISSION_DENIED", "{m}: {text}");
    }
    // A replica speaks Raft in its own name only: replica 2's certificate
    // asking for votes as node 3 is refused, as itself it is heard.
    let status = pb::cluster_client::ClusterClient::new(
        sdn_proto::connect_with(&c.addr, Some(pki.connector(ADMIN).unwrap()))
            .await
            .unwrap(),
    )
    .status(pb::ClusterStatusRequest {})
    .await
    .unwrap()
    .into_inner();
    let replica2 = pki.files("sdn://replica/2").unwrap();
    let py2 = Py {
        target: py.target.clone(),
        ca: py.ca,
        files: Some(&replica2),
    };
    let vote_as = |node: u64| {
        pb::RaftMessage {
            cluster_id: status.cluster_id.clone(),
            json: serde_json::to_vec(&serde_json::json!({
                "vote": {"leader_id": {"term": 99, "node_id": node}, "committed": false},
                "last_log_id": null
            }))
            .unwrap(),
            ..Default::default()
        }
        .encode_to_vec()
    };
    let (code, text) = py2.call("/sdn.v1.Raft/Vote", vote_as(3), false);
    assert_eq!(code, "PERMISSION_DENIED", "{text}");
    assert!(text.contains("replica 2 sent a message as node 3"), "{text}");
    let (code, text) = py2.call("/sdn.v1.Raft/Vote", vote_as(2), false);
    assert_eq!(code, "OK", "a vote request in its own name is answered: {text}");

    let mut cluster = pb::cluster_client::ClusterClient::new(
        sdn_proto::connect_with(&c.addr, Some(pki.connector(PLATFORM).unwrap()))
            .await
            .unwrap(),
    );
    let e = cluster
        .add_learner(pb::AddLearnerRequest {
            node_id: 9,
            addr: "https://127.0.0.1:1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // A tenant that says it acts for the administrator is refused.
    let ch = sdn_proto::connect_with(&c.addr, Some(pki.connector("sdn://tenant/t1/mallory").unwrap()))
        .await
        .unwrap();
    let mut p = pb::provisioning_client::ProvisioningClient::new(ch);
    let mut req = tonic::Request::new(pb::ApplyRequest {
        operations: vec![pb::Operation {
            op: Some(zone("z", &["10.0.0.0/8"], "up")),
        }],
        actor: String::new(),
        wait: false,
        wait_timeout_ms: 0,
    });
    req.metadata_mut().insert("sdn-on-behalf-of", ADMIN.parse().unwrap());
    let e = p.apply(req).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("only a replica forwards"), "{e:?}");
}

/// New certificate files are taken for new connections, without a
/// restart; a file that does not load leaves the last good one in use.
/// (The certificate the controller presents is read with Python's ssl.)
#[test]
fn certificates_rotate_without_a_restart() {
    if !privileged() {
        eprintln!("skipped: needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start_secure(dir.path()).unwrap();
    let pki = c.pki.as_ref().unwrap();
    let target = c.addr.trim_start_matches("https://").to_string();
    let platform = pki.files(PLATFORM).unwrap();
    let serial = || {
        let seen = tls_probe(&target, &pki.ca(), Some(&platform));
        assert_eq!(seen["alpn"], "h2", "{seen}");
        seen["cert"].as_str().expect("the server's certificate").to_string()
    };
    let before = serial();
    // The replica's certificate, issued again (the files are replaced whole).
    std::thread::sleep(std::time::Duration::from_millis(1100));
    pki.files_valid("sdn://replica/1", Validity::days(60)).unwrap();
    let after = serial();
    assert_ne!(before, after, "a new connection gets the new certificate");
    // A broken file: the last good certificate stays in use.
    std::fs::write(dir.path().join("pki/replica-1.pem"), b"not a certificate").unwrap();
    assert_eq!(serial(), after);
    assert!(
        c.controller.log_text().contains("do not load"),
        "{}",
        c.controller.log_text()
    );
}

/// Three replicas on mutual TLS: they join over it, a follower forwards a
/// write for its caller, and the audit log names the caller, not the
/// replica.
#[tokio::test]
async fn a_cluster_of_three_on_mutual_tls() {
    if !privileged() {
        eprintln!("skipped: needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki")).unwrap();
    let addrs: Vec<String> = (0..3).map(|_| format!("127.0.0.1:{}", free_port())).collect();
    let mut procs: Vec<Proc> = Vec::new();
    for (i, listen) in addrs.iter().enumerate() {
        let id = (i + 1).to_string();
        let data = dir.path().join(format!("c{id}"));
        let mut args: Vec<String> = vec![
            "--node-id".into(),
            id.clone(),
            "--data-dir".into(),
            data.display().to_string(),
            "--listen".into(),
            listen.clone(),
        ];
        args.extend(pki.args(&format!("sdn://replica/{id}")).unwrap());
        if i > 0 {
            args.push("--join".into());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        procs.push(
            Proc::spawn(
                &format!("controller-{id}"),
                None,
                &bin("sdn-controller"),
                &args,
                dir.path(),
            )
            .unwrap(),
        );
    }
    let admin = pki.connector(ADMIN).unwrap();
    let connect = |i: usize, tls| {
        let addr = format!("https://{}", addrs[i]);
        async move { sdn_proto::connect_with(&addr, Some(tls)).await }
    };
    let mut first = None;
    for _ in 0..100 {
        if let Ok(ch) = connect(0, admin.clone()).await {
            let mut c = pb::cluster_client::ClusterClient::new(ch);
            if c.status(pb::ClusterStatusRequest {}).await.is_ok() {
                first = Some(c);
                break;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let mut c = first.expect("node 1 answers");
    for (i, addr) in addrs.iter().enumerate().skip(1) {
        let id = i as u64 + 1;
        for attempt in 0..50 {
            match c
                .add_learner(pb::AddLearnerRequest {
                    node_id: id,
                    addr: format!("https://{addr}"),
                })
                .await
            {
                Ok(_) => break,
                Err(e) if attempt < 49 && e.code() == Code::Unavailable => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await
                }
                Err(e) => panic!("adding node {id}: {e:?}\n{}", procs[i].log_text()),
            }
        }
        c.promote(pb::MemberRequest { node_id: id }).await.unwrap();
    }
    let s = c.status(pb::ClusterStatusRequest {}).await.unwrap().into_inner();
    assert_eq!(s.members.iter().filter(|m| m.voter).count(), 3, "{s:?}");
    // A write to a follower, forwarded to the leader for the platform.
    let follower = (0..3).find(|&i| i as u64 + 1 != s.leader_id).unwrap();
    let mut p = pb::provisioning_client::ProvisioningClient::new(
        connect(follower, pki.connector(PLATFORM).unwrap()).await.unwrap(),
    );
    let r = p
        .apply(pb::ApplyRequest {
            operations: vec![pb::Operation { op: Some(tenant("t1")) }],
            actor: String::new(),
            wait: false,
            wait_timeout_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.revision > 0);
    // The same follower forwards a tenant's write that its role refuses:
    // still refused, on the leader.
    let mut t = pb::provisioning_client::ProvisioningClient::new(
        connect(follower, pki.connector("sdn://tenant/t1/alice").unwrap())
            .await
            .unwrap(),
    );
    let e = t
        .apply(pb::ApplyRequest {
            operations: vec![pb::Operation { op: Some(tenant("t2")) }],
            actor: String::new(),
            wait: false,
            wait_timeout_ms: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let audit = p
        .audit(pb::AuditRequest {
            after_revision: 0,
            limit: 10,
            local: false,
        })
        .await
        .unwrap()
        .into_inner();
    let made = audit
        .records
        .iter()
        .find(|r| r.changes.iter().any(|l| l == "put tenant t1"))
        .expect("the record of the forwarded write");
    assert!(made.actor.starts_with(PLATFORM), "{made:?}");

    // The follower refused alice's write itself and handed the refusal to
    // the leader: it is in the log every replica holds.
    let supervisor = "sdn://supervisor/inspector";
    let mut s =
        pb::provisioning_client::ProvisioningClient::new(connect(0, pki.connector(supervisor).unwrap()).await.unwrap());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let audit = s
            .audit(pb::AuditRequest {
                after_revision: 0,
                limit: 100,
                local: false,
            })
            .await
            .unwrap()
            .into_inner();
        if audit
            .records
            .iter()
            .any(|r| r.actor == "sdn://tenant/t1/alice" && r.refused.contains("put_tenant"))
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no record of the refusal: {:#?}",
            audit.records
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // Only a replica hands refusals over.
    let mut as_admin = pb::cluster_client::ClusterClient::new(connect(0, pki.connector(ADMIN).unwrap()).await.unwrap());
    let forged = as_admin
        .refused(pb::RefusedRequest {
            refusals: vec![pb::Refusal {
                actor: "sdn://tenant/t1/alice".into(),
                role: "tenant".into(),
                reason: "made up".into(),
                time_unix_ms: 1,
                tenant: "t1".into(),
                count: 1,
            }],
            suppressed: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(forged.code(), Code::PermissionDenied, "{forged:?}");
    // Every replica's copy checks, and they agree.
    let mut args = pki.args(supervisor).unwrap();
    args.extend([
        "--controller".into(),
        format!("https://{}", addrs[0]),
        "audit".into(),
        "verify".into(),
        "--replicas".into(),
    ]);
    let out = Command::new(bin("sdnctl")).args(&args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    eprintln!("{text}");
    assert!(out.status.success(), "{text}");
    assert_eq!(text.matches("holds, and agrees").count(), 3, "{text}");
    assert!(text.contains("checkpoint "), "{text}");
    drop(procs);
}

/// Issues `STEM.pem` and `STEM.key` in `d` with OpenSSL: a new P-256 key,
/// signed by `signer` (`ca`, or another stem) with exactly the extensions
/// given (none copied from the request).
fn openssl_issue(d: &Path, stem: &str, signer: &str, extensions: &[&str]) {
    let (key, csr, pem, ext) = (
        format!("{stem}.key"),
        format!("{stem}.csr"),
        format!("{stem}.pem"),
        format!("{stem}.cnf"),
    );
    std::fs::write(d.join(&ext), extensions.join("\n")).unwrap();
    let subject = format!("/CN={stem}");
    openssl(
        d,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &key,
            "-subj",
            &subject,
            "-out",
            &csr,
        ],
    );
    let (ca, ca_key) = (format!("{signer}.pem"), format!("{signer}.key"));
    openssl(
        d,
        &[
            "x509", "-req", "-in", &csr, "-CA", &ca, "-CAkey", &ca_key, "-days", "2", "-out", &pem, "-extfile", &ext,
        ],
    );
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A certificate issued by an existing CA with OpenSSL, as the README says,
/// connects. A certificate that was given CA rights by mistake cannot
/// issue identities: what it signs is refused, chain and all.
#[test]
fn only_what_the_ca_itself_signed_is_trusted() {
    if !privileged() {
        eprintln!("skipped: needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start_secure(dir.path()).unwrap();
    let pki = c.pki.as_ref().unwrap();
    let d = &pki.dir;
    // The README's recipe.
    openssl_issue(
        d,
        "ops",
        "ca",
        &[
            "subjectAltName=URI:sdn://admin/ops",
            "basicConstraints=critical,CA:FALSE",
            "keyUsage=critical,digitalSignature,keyAgreement",
            "extendedKeyUsage=serverAuth,clientAuth",
        ],
    );
    // A certificate with CA rights, and what it signs.
    openssl_issue(
        d,
        "sub",
        "ca",
        &[
            "subjectAltName=URI:sdn://tenant/t1/mallory",
            "basicConstraints=critical,CA:TRUE",
            "keyUsage=critical,keyCertSign,digitalSignature",
        ],
    );
    openssl_issue(
        d,
        "evil",
        "sub",
        &[
            "subjectAltName=URI:sdn://replica/1",
            "basicConstraints=critical,CA:FALSE",
            "extendedKeyUsage=serverAuth,clientAuth",
            "keyUsage=critical,digitalSignature",
        ],
    );
    // The chain the attacker presents: its leaf and the certificate above.
    let chain = [
        std::fs::read(d.join("evil.pem")).unwrap(),
        std::fs::read(d.join("sub.pem")).unwrap(),
    ]
    .concat();
    std::fs::write(d.join("evil.pem"), chain).unwrap();

    let target = c.addr.trim_start_matches("https://").to_string();
    let call = |stem: &str| {
        let f = Files {
            ca: pki.ca(),
            cert: d.join(format!("{stem}.pem")),
            key: d.join(format!("{stem}.key")),
        };
        Py {
            target: target.clone(),
            ca: Some(&pki.ca()),
            files: Some(&f),
        }
        .call(
            "/sdn.v1.Cluster/Status",
            pb::ClusterStatusRequest {}.encode_to_vec(),
            false,
        )
    };
    let (code, text) = call("ops");
    assert_eq!(code, "OK", "the README's certificate: {text}");
    let (code, text) = call("evil");
    assert_eq!(
        code, "UNAVAILABLE",
        "a replica's name signed by a tenant's CA certificate: {text}"
    );
    let events = security_events(&c);
    assert!(
        events
            .iter()
            .any(|l| l.contains("connection refused") && l.contains("certificate refused")),
        "{events:#?}"
    );
}

/// Connections that never finish their handshake are bounded: from one
/// address at most 16 at once, each for 5 s, so they cannot starve the
/// replicas and agents of file descriptors.
#[test]
fn unfinished_handshakes_are_bounded() {
    if !privileged() {
        eprintln!("skipped: needs root");
        return;
    }
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start_secure(dir.path()).unwrap();
    let target = c.addr.trim_start_matches("https://").to_string();
    let idle: Vec<std::net::TcpStream> = (0..16)
        .map(|_| std::net::TcpStream::connect(&target).unwrap())
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut extra = std::net::TcpStream::connect(&target).unwrap();
    extra.set_read_timeout(Some(std::time::Duration::from_secs(2))).unwrap();
    let mut b = [0u8; 1];
    assert!(
        matches!(extra.read(&mut b), Ok(0) | Err(_)),
        "the 17th unfinished handshake from one address is closed at once"
    );
    let mut first = &idle[0];
    first.set_read_timeout(Some(std::time::Duration::from_secs(8))).unwrap();
    let t0 = std::time::Instant::now();
    let r = first.read(&mut b);
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    let waited = t0.elapsed();
    assert!(
        waited < std::time::Duration::from_secs(7),
        "closed after its 5 s: {waited:?}"
    );
    drop(idle);
    std::thread::sleep(std::time::Duration::from_millis(200));
    // Then a party with a certificate connects as before.
    let pki = c.pki.as_ref().unwrap();
    let platform = pki.files(PLATFORM).unwrap();
    let (code, text) = Py {
        target,
        ca: Some(&pki.ca()),
        files: Some(&platform),
    }
    .call("/sdn.v1.Provisioning/List", list(), false);
    assert_eq!(code, "OK", "{text}");
    let events = security_events(&c);
    assert!(events.iter().any(|l| l.contains("too many handshakes")), "{events:#?}");
}

/// On the local socket, a caller without a certificate is known by its
/// user id only when `--unix-role` names it; a replica never is.
#[tokio::test]
async fn local_callers_are_known_by_user_id_only_when_configured() {
    if !privileged() {
        eprintln!("skipped: needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start_secure(dir.path()).unwrap();
    let sock = format!("unix://{}", c.socket.display());
    let mut plain =
        pb::provisioning_client::ProvisioningClient::new(sdn_proto::connect_with(&sock, None).await.unwrap());
    let e = plain.list(pb::ListRequest { kind: 0, stale: false }).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(
        e.message().contains("user id 0") && e.message().contains("--unix-role"),
        "{e:?}"
    );
    // Over TLS, the same socket knows the certificate.
    let pki = c.pki.as_ref().unwrap();
    let mut tls = pb::provisioning_client::ProvisioningClient::new(
        sdn_proto::connect_with(&sock, Some(pki.connector("sdn://supervisor/local").unwrap()))
            .await
            .unwrap(),
    );
    assert!(tls.list(pb::ListRequest { kind: 0, stale: false }).await.is_ok());
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&c.socket).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o660);

    // A controller that maps user id 0 to a supervisor.
    let data = dir.path().join("second");
    let sock2 = dir.path().join("second.sock");
    let listen = format!("127.0.0.1:{}", free_port());
    let mut args: Vec<String> = vec![
        "--node-id".into(),
        "1".into(),
        "--data-dir".into(),
        data.display().to_string(),
        "--listen".into(),
        listen,
        "--listen-unix".into(),
        sock2.display().to_string(),
        "--unix-role".into(),
        "0=supervisor/local-root".into(),
    ];
    args.extend(pki.args("sdn://replica/1").unwrap());
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let second = Proc::spawn("controller-2", None, &bin("sdn-controller"), &a, dir.path()).unwrap();
    let addr2 = format!("unix://{}", sock2.display());
    let mut client = None;
    for _ in 0..100 {
        if let Ok(ch) = sdn_proto::connect_with(&addr2, None).await {
            let mut cl = pb::provisioning_client::ProvisioningClient::new(ch);
            if cl.list(pb::ListRequest { kind: 0, stale: false }).await.is_ok() {
                client = Some(cl);
                break;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let mut cl = client.unwrap_or_else(|| panic!("the second controller answers: {}", second.log_text()));
    let e = cl
        .apply(pb::ApplyRequest {
            operations: vec![pb::Operation { op: Some(tenant("t")) }],
            actor: String::new(),
            wait: false,
            wait_timeout_ms: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("sdn://supervisor/local-root"), "{e:?}");
    drop(second);

    // A replica by user id is refused at start.
    let out = Command::new(bin("sdn-controller"))
        .args(["--insecure", "--unix-role", "0=replica/1", "--data-dir"])
        .arg(dir.path().join("third"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("a replica is known by its certificate only"),
        "{err}"
    );
    // A party with a certificate does not fall back to plain HTTP.
    let e = sdn_proto::connect_with("http://127.0.0.1:1", Some(pki.connector(PLATFORM).unwrap()))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("use https://"), "{e}");
}
