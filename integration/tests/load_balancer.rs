//! L4 load balancers: the objects over the API, with the cluster's
//! certificates. A tenant writes its own load balancers and nothing of
//! another tenant's; exposing one to a zone is an administrator's alone;
//! what a tenant is refused reads the same whether the other tenant's
//! object exists or not.

use sdn_integration::cluster::{Cluster, ADMIN, PLATFORM};
use sdn_integration::ops::*;
use sdn_integration::privileged;
use sdn_proto::v1 as pb;
use tonic::Code;

const ALICE: &str = "sdn://tenant/t1/alice";
const BOB: &str = "sdn://tenant/t2/bob";

/// Applies as `uri`: the error's code and message, or "OK".
async fn try_as(c: &Cluster, uri: &str, ops: Vec<pb::operation::Op>) -> (Code, String) {
    match c.apply_committed(uri, ops).await {
        Ok(_) => (Code::Ok, String::new()),
        Err(e) => (e.code(), e.message().to_string()),
    }
}

async fn list_as(c: &Cluster, uri: &str) -> pb::ListResponse {
    pb::provisioning_client::ProvisioningClient::new(c.channel_as(uri).await.unwrap())
        .list(pb::ListRequest { kind: 0, stale: false })
        .await
        .unwrap()
        .into_inner()
}

fn ids<T>(v: &[T], id: impl Fn(&T) -> &str) -> Vec<String> {
    let mut out: Vec<String> = v.iter().map(|x| id(x).to_string()).collect();
    out.sort();
    out
}

#[tokio::test]
async fn load_balancers_are_their_tenants_and_zone_exposure_an_administrators() {
    if !privileged() {
        eprintln!("skipped: needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start_secure(dir.path()).unwrap();
    // Records name their tenants once the audit chain has started.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let mut a = pb::provisioning_client::ProvisioningClient::new(c.channel_as(ADMIN).await.unwrap());
        let r = a
            .audit(pb::AuditRequest {
                after_revision: 0,
                limit: 1,
                local: false,
            })
            .await
            .unwrap()
            .into_inner();
        if r.chained {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the audit chain never started");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    c.apply_committed(ADMIN, vec![zone("z", &["10.0.0.0/8"], "lbup0")])
        .await
        .unwrap();
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
            port(
                "p1",
                "t1",
                "s1",
                "h1",
                "lbt-p1",
                "02:00:00:00:01:01",
                "10.1.0.11",
                "",
                &[],
            ),
            port(
                "p2",
                "t2",
                "s2",
                "h1",
                "lbt-p2",
                "02:00:00:00:02:01",
                "10.2.0.11",
                "",
                &[],
            ),
        ],
    )
    .await
    .unwrap();

    // A tenant builds its own load balancer.
    let lb1 = load_balancer("lb1", "t1", "v1", "10.1.0.100", "");
    let (code, text) = try_as(
        &c,
        ALICE,
        vec![
            put_lb(lb1.clone()),
            pool("web", "lb1"),
            listener("http", "lb1", "tcp", 80, "web", "maglev"),
            member("m1", "web", "p1", "", 1),
        ],
    )
    .await;
    assert_eq!(code, Code::Ok, "{text}");

    // What it may not do, each named.
    for (what, uri, ops, want, says) in [
        (
            "a load balancer for t2",
            ALICE,
            vec![put_lb(load_balancer("lb9", "t2", "v2", "10.2.0.100", ""))],
            Code::PermissionDenied,
            "role tenant",
        ),
        (
            "its load balancer in t2's VPC",
            ALICE,
            vec![put_lb(load_balancer("lb9", "t1", "v2", "10.2.0.100", ""))],
            Code::InvalidArgument,
            "tenant t1 has no vpc \"v2\"",
        ),
        (
            "t2's port as its member",
            ALICE,
            vec![member("m9", "web", "p2", "", 1)],
            Code::InvalidArgument,
            "tenant t1 has no port \"p2\"",
        ),
        (
            "t2's address as its member",
            ALICE,
            vec![member("m9", "web", "", "10.2.0.11", 1)],
            Code::InvalidArgument,
            "in no subnet of vpc v1",
        ),
        (
            "its load balancer exposed to the zone",
            ALICE,
            vec![put_lb(exposed(
                load_balancer("lb9", "t1", "v1", "10.1.0.101", ""),
                "h1",
                "10.1.0.201",
            ))],
            Code::PermissionDenied,
            "an administrator's",
        ),
        (
            "the platform exposing one",
            PLATFORM,
            vec![put_lb(exposed(
                load_balancer("lb9", "t1", "v1", "10.1.0.101", ""),
                "h1",
                "10.1.0.201",
            ))],
            Code::PermissionDenied,
            "an administrator's",
        ),
        (
            "a pool on t1's load balancer",
            BOB,
            vec![pool("evil", "lb1")],
            Code::PermissionDenied,
            "role tenant",
        ),
        (
            "a member in t1's pool",
            BOB,
            vec![member("m9", "web", "", "10.1.0.66", 1)],
            Code::PermissionDenied,
            "role tenant",
        ),
        (
            "t1's member changed",
            BOB,
            vec![member("m1", "web", "p1", "", 9)],
            Code::PermissionDenied,
            "role tenant",
        ),
        (
            "t1's listener deleted",
            BOB,
            vec![delete(pb::Kind::Listener, "http")],
            Code::PermissionDenied,
            "role tenant",
        ),
        (
            "t1's load balancer taken over",
            BOB,
            vec![put_lb(load_balancer("lb1", "t2", "v2", "10.2.0.100", ""))],
            Code::PermissionDenied,
            "role tenant",
        ),
        (
            "a supervisor",
            "sdn://supervisor/inspector",
            vec![pool("p9", "lb1")],
            Code::PermissionDenied,
            "role supervisor",
        ),
    ] {
        let (code, text) = try_as(&c, uri, ops).await;
        assert_eq!(code, want, "{what}: {text}");
        assert!(text.contains(says), "{what}: {text}");
    }

    // An administrator exposes one to the zone; its listeners are then
    // the administrators' too, its pools and members still the tenant's.
    let lbz = exposed(load_balancer("lbz", "t1", "v1", "10.1.0.101", ""), "h1", "10.1.0.201");
    c.apply_committed(
        ADMIN,
        vec![
            put_lb(lbz.clone()),
            pool("zweb", "lbz"),
            listener("zhttp", "lbz", "tcp", 80, "zweb", "round_robin"),
        ],
    )
    .await
    .unwrap();
    // Another tenant is refused without a word of the exposure.
    for ops in [
        vec![delete(pb::Kind::Listener, "zhttp")],
        vec![listener("zssh", "lbz", "tcp", 22, "zweb", "round_robin")],
    ] {
        let (code, text) = try_as(&c, BOB, ops).await;
        assert_eq!(code, Code::PermissionDenied, "{text}");
        assert!(!text.contains("zone") && !text.contains("administrator"), "{text}");
    }
    // Its own listener naming a pool of another load balancer: unknown.
    let (code, text) = try_as(&c, ALICE, vec![listener("h2", "lb1", "tcp", 81, "zweb", "maglev")]).await;
    assert_eq!(code, Code::InvalidArgument, "{text}");
    assert!(text.contains("load balancer lb1 has no pool \"zweb\""), "{text}");
    for (what, ops, want) in [
        (
            "a listener",
            vec![listener("zssh", "lbz", "tcp", 22, "zweb", "round_robin")],
            Code::PermissionDenied,
        ),
        (
            "its listener deleted",
            vec![delete(pb::Kind::Listener, "zhttp")],
            Code::PermissionDenied,
        ),
        (
            "taken back inside",
            vec![put_lb(load_balancer("lbz", "t1", "v1", "10.1.0.101", ""))],
            Code::PermissionDenied,
        ),
        ("a member", vec![member("zm1", "zweb", "p1", "", 1)], Code::Ok),
    ] {
        let (code, text) = try_as(&c, ALICE, ops).await;
        assert_eq!(code, want, "{what}: {text}");
    }

    // Each tenant reads its own.
    let mine = list_as(&c, ALICE).await;
    assert_eq!(ids(&mine.load_balancers, |x| &x.id), ["lb1", "lbz"]);
    assert_eq!(ids(&mine.members, |x| &x.id), ["m1", "zm1"]);
    let theirs = list_as(&c, BOB).await;
    assert!(
        theirs.load_balancers.is_empty()
            && theirs.pools.is_empty()
            && theirs.listeners.is_empty()
            && theirs.members.is_empty(),
        "{theirs:?}"
    );
    // Nothing refused was written.
    let all = list_as(&c, ADMIN).await;
    assert_eq!(ids(&all.load_balancers, |x| &x.id), ["lb1", "lbz"]);
    assert_eq!(ids(&all.pools, |x| &x.id), ["web", "zweb"]);
    assert_eq!(ids(&all.listeners, |x| &x.id), ["http", "zhttp"]);
    assert_eq!(all.members.iter().find(|m| m.id == "m1").unwrap().weight, 1);

    // sdnctl reads and writes them as manifests.
    let yaml = "apiVersion: sdn/v1\nkind: Member\nmetadata: {name: m2}\nspec: {pool: web, address: 10.1.0.12, protocolPort: 8080, weight: 3, state: draining}\n";
    let f = dir.path().join("m2.yaml");
    std::fs::write(&f, yaml).unwrap();
    c.sdnctl(ADMIN, &["apply", "-f", f.to_str().unwrap()]).unwrap();
    let table = c.sdnctl(ADMIN, &["get", "member"]).unwrap();
    assert!(
        table.contains("m2") && table.contains("target=10.1.0.12 port=8080 weight=3 state=draining"),
        "{table}"
    );
    let out = c.sdnctl(ADMIN, &["get", "listener", "-o", "yaml"]).unwrap();
    assert!(
        out.contains("scheduler: maglev") && out.contains("kind: Listener"),
        "{out}"
    );
    // A manifest's mistake is named at its line, in the manifest's words.
    let listener_yaml = |protocol: &str| {
        std::fs::write(
            &f,
            format!("apiVersion: sdn/v1\nkind: Listener\nmetadata: {{name: l5}}\nspec:\n  loadBalancer: lb1\n  protocol: {protocol}\n  port: 80\n  pool: web\n  scheduler: maglev\n"),
        )
        .unwrap();
        c.sdnctl(ADMIN, &["apply", "-f", f.to_str().unwrap()]).unwrap_err()
    };
    let e = listener_yaml("tcp");
    assert!(
        e.contains("spec.port") && e.contains("already has listener http on tcp/80") && e.contains(":7:"),
        "{e}"
    );
    let e = listener_yaml("sctp");
    assert!(e.contains(":6:"), "{e}");

    // The audit log keeps each change, and the tenant reads its own.
    let audit = |uri: &'static str| {
        let c = &c;
        async move {
            pb::provisioning_client::ProvisioningClient::new(c.channel_as(uri).await.unwrap())
                .audit(pb::AuditRequest {
                    after_revision: 0,
                    limit: 100,
                    local: false,
                })
                .await
                .unwrap()
                .into_inner()
        }
    };
    let a = audit(ALICE).await;
    let text = format!("{:?}", a.records);
    assert!(
        text.contains("put member m2") && text.contains("put listener zhttp"),
        "{text}"
    );
    assert!(a.records.iter().all(|r| r.tenants == ["t1"]), "{text}");
    let b = audit(BOB).await;
    assert!(!format!("{:?}", b.records).contains("lb1"), "{:?}", b.records);
}
