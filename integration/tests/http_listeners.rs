//! HTTP listeners and certificates over the API, with the cluster's
//! certificates: a tenant writes its own and names no other tenant's; a
//! certificate's key is taken only with its certificate and is never given
//! back, in a listing, `sdnctl get` or the audit log; bad input is refused
//! naming the field, with nothing written.

use sdn_integration::cluster::{Cluster, ADMIN, PLATFORM};
use sdn_integration::ops::*;
use sdn_integration::privileged;
use sdn_proto::v1 as pb;
use tonic::Code;

const ALICE: &str = "sdn://tenant/t1/alice";
const BOB: &str = "sdn://tenant/t2/bob";
const SUPERVISOR: &str = "sdn://supervisor/inspector";

#[tokio::test]
async fn certificates_and_http_listeners_are_their_tenants_and_keys_never_come_back() {
    if !privileged() {
        eprintln!("skipped: needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start_secure(dir.path()).unwrap();
    c.apply_committed(ADMIN, vec![zone("z", &["10.0.0.0/8"], "l7up0")])
        .await
        .unwrap();
    let vm = |id: &str, t: &str, s: &str, n: u8, ip: &str| {
        port(
            id,
            t,
            s,
            "h1",
            &format!("l7t-{id}"),
            &format!("02:00:00:00:0{n}:01"),
            ip,
            "",
            &[],
        )
    };
    c.apply_committed(
        PLATFORM,
        vec![
            tenant("t1"),
            tenant("t2"),
            vpc_in_zone("v1", "t1", "z"),
            vpc("v2", "t2"),
            subnet("s1", "v1", "10.1.0.0/24", ""),
            subnet("s2", "v2", "10.2.0.0/24", ""),
            host("h1", "192.0.2.1"),
            vm("p1", "t1", "s1", 1, "10.1.0.11"),
            vm("x1", "t1", "s1", 2, "10.1.0.21"),
            vm("q1", "t2", "s2", 3, "10.2.0.11"),
            vm("y1", "t2", "s2", 4, "10.2.0.21"),
        ],
    )
    .await
    .unwrap();
    let (cert, key) = self_signed(&["portal.example", "www.portal.example"]);
    let (_, other_key) = self_signed(&["other.example"]);

    // Alice's certificate, load balancer and HTTPS listener.
    let lb = |id: &str, t: &str, v: &str, vip: &str| put_lb(load_balancer(id, t, v, vip, ""));
    let (code, text) = c
        .try_as(
            ALICE,
            vec![
                certificate("c1", "t1", &cert, &key),
                lb("lb1", "t1", "v1", "10.1.0.100"),
                pool("web", "lb1"),
                member("m1", "web", "p1", "", 1),
                pb::operation::Op::PutHttpListener(http_listener("https", "lb1", 443, "web", &["c1"], &["x1"])),
            ],
        )
        .await;
    assert_eq!(code, Code::Ok, "{text}");
    c.apply_committed(PLATFORM, vec![lb("lb2", "t2", "v2", "10.2.0.100"), pool("web2", "lb2")])
        .await
        .unwrap();

    let bad = |f: fn(&mut pb::HttpListener)| {
        let mut l = http_listener("h2", "lb1", 8443, "web", &["c1"], &["x1"]);
        f(&mut l);
        vec![pb::operation::Op::PutHttpListener(l)]
    };
    for (what, uri, ops, want, says) in [
        (
            "a key that is not the certificate's",
            ALICE,
            vec![certificate("c2", "t1", &cert, &other_key)],
            Code::InvalidArgument,
            "put_certificate.key_pem: the key is not the certificate's",
        ),
        (
            "no key",
            ALICE,
            vec![certificate("c2", "t1", &cert, "")],
            Code::InvalidArgument,
            "put_certificate.key_pem: give the private key in PEM",
        ),
        (
            "a certificate for t2",
            ALICE,
            vec![certificate("c2", "t2", &cert, &key)],
            Code::PermissionDenied,
            "role tenant",
        ),
        (
            "t1's certificate on t2's listener",
            BOB,
            vec![pb::operation::Op::PutHttpListener(http_listener(
                "h9",
                "lb2",
                443,
                "web2",
                &["c1"],
                &["y1"],
            ))],
            Code::InvalidArgument,
            "tenant t2 has no certificate \"c1\"",
        ),
        (
            "t1's port as t2's proxy",
            BOB,
            vec![pb::operation::Op::PutHttpListener(http_listener(
                "h9",
                "lb2",
                80,
                "web2",
                &[],
                &["x1"],
            ))],
            Code::InvalidArgument,
            "vpc v2 of tenant t2 has no port \"x1\"",
        ),
        (
            "t1's certificate deleted",
            BOB,
            vec![delete(pb::Kind::Certificate, "c1")],
            Code::PermissionDenied,
            "role tenant",
        ),
        (
            "t1's listener changed",
            BOB,
            vec![pb::operation::Op::PutHttpListener(http_listener(
                "https",
                "lb2",
                443,
                "web2",
                &[],
                &["y1"],
            ))],
            Code::PermissionDenied,
            "role tenant",
        ),
        (
            "a bad regex",
            ALICE,
            bad(|l| {
                l.rules.push(pb::HttpRule {
                    name: "r".into(),
                    path_regex: "(".into(),
                    pool_id: "web".into(),
                    ..Default::default()
                })
            }),
            Code::InvalidArgument,
            "put_http_listener.rules[0].path_regex",
        ),
        (
            "a rule with two actions",
            ALICE,
            bad(|l| {
                l.rules.push(pb::HttpRule {
                    name: "r".into(),
                    pool_id: "web".into(),
                    respond_status: 200,
                    ..Default::default()
                })
            }),
            Code::InvalidArgument,
            "rules[0].pool_id: a rule has one action",
        ),
        (
            "an unknown scheduler",
            ALICE,
            bad(|l| l.scheduler = "random".into()),
            Code::InvalidArgument,
            "put_http_listener.scheduler: must be one of",
        ),
        (
            "a trusted proxy that is no network",
            ALICE,
            bad(|l| l.trusted_proxies.push("10.0.0.0/33".into())),
            Code::InvalidArgument,
            "put_http_listener.trusted_proxies[0]",
        ),
        (
            "a supervisor",
            SUPERVISOR,
            vec![delete(pb::Kind::Certificate, "c1")],
            Code::PermissionDenied,
            "role supervisor",
        ),
    ] {
        let before = c.list_as(ADMIN).await;
        let (code, text) = c.try_as(uri, ops).await;
        assert_eq!(code, want, "{what}: {text}");
        assert!(text.contains(says), "{what}: {text}");
        if uri == BOB {
            assert!(!text.contains("t1") && !text.contains("10.1"), "{what}: {text}");
        }
        let after = c.list_as(ADMIN).await;
        assert_eq!(before.revision, after.revision, "{what}: something was written");
    }

    // An HTTP listener of a load balancer exposed to its zone is an
    // administrator's, as its L4 listeners are.
    c.apply_committed(
        ADMIN,
        vec![
            put_lb(exposed(
                load_balancer("lbz", "t1", "v1", "10.1.0.101", ""),
                "h1",
                "10.1.0.201",
            )),
            pool("wz", "lbz"),
        ],
    )
    .await
    .unwrap();
    let (code, text) = c
        .try_as(
            ALICE,
            vec![pb::operation::Op::PutHttpListener(http_listener(
                "hz",
                "lbz",
                80,
                "wz",
                &[],
                &["x1"],
            ))],
        )
        .await;
    assert_eq!(code, Code::PermissionDenied, "{text}");
    assert!(text.contains("exposed to its zone"), "{text}");

    // Each tenant reads its own, and no key comes back.
    let alice = c.list_as(ALICE).await;
    assert_eq!(alice.certificates.len(), 1);
    let listed = &alice.certificates[0];
    assert!(listed.key_pem.is_empty(), "a key was listed");
    assert_eq!(listed.names, ["portal.example", "www.portal.example"]);
    assert!(listed.not_after_unix > 0);
    assert_eq!(alice.http_listeners.len(), 1);
    assert_eq!(alice.http_listeners[0].proxy_ports, ["x1"]);
    let bob = c.list_as(BOB).await;
    assert!(bob.certificates.is_empty() && bob.http_listeners.is_empty());
    let admin = c.list_as(ADMIN).await;
    assert!(admin.certificates.iter().all(|c| c.key_pem.is_empty()));
    let secret = key.lines().nth(1).unwrap().to_string();
    for (uri, args) in [
        (ALICE, vec!["get", "certificate", "-o", "yaml"]),
        (ADMIN, vec!["get", "certificate"]),
        (ADMIN, vec!["get", "http_listener", "-o", "yaml"]),
        (SUPERVISOR, vec!["audit", "--content"]),
    ] {
        let out = c.sdnctl(uri, &args).unwrap();
        assert!(
            !out.contains(&secret) && !out.contains("PRIVATE KEY"),
            "{args:?}: a key in {out}"
        );
        assert!(out.contains("c1") || out.contains("https"), "{args:?}: {out}");
    }
    // The audit log's content shows a certificate's key by its SHA-256
    // alone. (Records keep their content once the log's hash chain has
    // started, shortly after the cluster does: the key is rotated until a
    // record shows it.)
    let mut secrets = vec![secret];
    let mut shown = false;
    for _ in 0..20 {
        let (cert, key) = self_signed(&["portal.example"]);
        secrets.push(key.lines().nth(1).unwrap().to_string());
        c.apply_committed(ALICE, vec![certificate("c1", "t1", &cert, &key)])
            .await
            .unwrap();
        let out = c.sdnctl(SUPERVISOR, &["audit", "--content"]).unwrap();
        assert!(
            !out.contains("PRIVATE KEY") && !secrets.iter().any(|s| out.contains(s.as_str())),
            "a key in the audit log: {out}"
        );
        if out.contains("update certificate c1") {
            assert!(out.contains("(private key, sha256 "), "{out}");
            shown = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    assert!(shown, "no record of the certificate's rotation showed its content");
}
