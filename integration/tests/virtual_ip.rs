//! Virtual IPs over the API, with the cluster's certificates: a tenant
//! writes those its own ports hold and nothing of another tenant's; hosts
//! holding one is an administrator's decision; bad input is refused naming
//! the field, with nothing written.

use sdn_integration::cluster::{Cluster, ADMIN, PLATFORM};
use sdn_integration::ops::*;
use sdn_integration::privileged;
use sdn_proto::v1 as pb;
use tonic::Code;

const ALICE: &str = "sdn://tenant/t1/alice";
const BOB: &str = "sdn://tenant/t2/bob";

#[tokio::test]
async fn virtual_ips_are_their_tenants_and_hosts_an_administrators() {
    if !privileged() {
        eprintln!("skipped: needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start_secure(dir.path()).unwrap();
    c.apply_committed(ADMIN, vec![zone("z", &["10.0.0.0/8"], "vipup0")])
        .await
        .unwrap();
    let vm = |id: &str, t: &str, s: &str, dev: &str, n: u8, ip: &str| {
        port(id, t, s, "h1", dev, &format!("02:00:00:00:0{n}:01"), ip, "", &[])
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
            host("h2", "192.0.2.2"),
            vm("p1", "t1", "s1", "vipt-p1", 1, "10.1.0.11"),
            vm("p2", "t1", "s1", "vipt-p2", 2, "10.1.0.12"),
            vm("q1", "t2", "s2", "vipt-q1", 3, "10.2.0.11"),
        ],
    )
    .await
    .unwrap();

    // A tenant makes its ports' virtual IP.
    let mine = virtual_ip("va", "t1", "v1", "10.1.0.50", 5, false, &[("p1", 200), ("p2", 100)]);
    let (code, text) = c.try_as(ALICE, vec![mine.clone()]).await;
    assert_eq!(code, Code::Ok, "{text}");

    // An exposed load balancer whose VIP its NAT hosts may hold.
    let mut lbz = exposed(load_balancer("lbz", "t1", "v1", "10.1.0.100", ""), "h1", "10.1.0.201");
    lbz.nat_hosts.push(pb::NatHost {
        host_id: "h2".into(),
        ipv4: "10.1.0.202".into(),
        ipv6: String::new(),
    });
    c.apply_committed(ADMIN, vec![put_lb(lbz)]).await.unwrap();
    let hosts_vip = || virtual_ip("vh", "t1", "v1", "10.1.0.100", 9, true, &[("h1", 200), ("h2", 100)]);

    let bad_holder = |f: fn(&mut pb::VipHolder)| {
        let mut op = mine.clone();
        if let pb::operation::Op::PutVirtualIp(v) = &mut op {
            f(&mut v.holders[1]);
        }
        op
    };
    for (what, uri, ops, want, says) in [
        (
            "a virtual ip for t2",
            ALICE,
            vec![virtual_ip("vb", "t2", "v2", "10.2.0.50", 5, false, &[("q1", 1)])],
            Code::PermissionDenied,
            "role tenant",
        ),
        (
            "t2's port as its holder",
            ALICE,
            vec![virtual_ip("vb", "t1", "v1", "10.1.0.51", 6, false, &[("q1", 1)])],
            Code::InvalidArgument,
            "tenant t1 has no port \"q1\"",
        ),
        (
            "an address of t2's VPC",
            ALICE,
            vec![virtual_ip("vb", "t1", "v2", "10.2.0.50", 6, false, &[("p1", 1)])],
            Code::InvalidArgument,
            "tenant t1 has no vpc \"v2\"",
        ),
        (
            "an address outside its VPC",
            ALICE,
            vec![virtual_ip("vb", "t1", "v1", "10.9.0.50", 6, false, &[("p1", 1)])],
            Code::InvalidArgument,
            "put_virtual_ip.ipv4: 10.9.0.50 is in no subnet of vpc v1",
        ),
        (
            "one address twice",
            ALICE,
            vec![virtual_ip("vb", "t1", "v1", "10.1.0.50", 6, false, &[("p1", 1)])],
            Code::InvalidArgument,
            "10.1.0.50 is already virtual ip va's",
        ),
        (
            "conflicting priorities",
            ALICE,
            vec![virtual_ip(
                "vb",
                "t1",
                "v1",
                "10.1.0.51",
                6,
                false,
                &[("p1", 7), ("p2", 7)],
            )],
            Code::InvalidArgument,
            "holders[1].priority: holders[0] has priority 7 too",
        ),
        (
            "a holder that is a port and a host",
            ALICE,
            vec![bad_holder(|h| h.host_id = "h1".into())],
            Code::InvalidArgument,
            "holders[1].host_id: a holder is a port or a host, not both",
        ),
        (
            "a priority beyond a byte",
            ALICE,
            vec![bad_holder(|h| h.priority = 256)],
            Code::InvalidArgument,
            "holders[1].priority: 256 is above 254",
        ),
        (
            "its hosts holding a VIP",
            ALICE,
            vec![hosts_vip()],
            Code::PermissionDenied,
            "a virtual ip held by hosts is an administrator's",
        ),
        (
            "the platform's hosts holding a VIP",
            PLATFORM,
            vec![hosts_vip()],
            Code::PermissionDenied,
            "a virtual ip held by hosts is an administrator's",
        ),
        (
            "t1's virtual ip changed",
            BOB,
            vec![virtual_ip("va", "t2", "v2", "10.2.0.50", 5, false, &[("q1", 1)])],
            Code::PermissionDenied,
            "role tenant",
        ),
        (
            "t1's virtual ip deleted",
            BOB,
            vec![delete(pb::Kind::VirtualIp, "va")],
            Code::PermissionDenied,
            "role tenant",
        ),
        (
            "a supervisor",
            "sdn://supervisor/inspector",
            vec![delete(pb::Kind::VirtualIp, "va")],
            Code::PermissionDenied,
            "role supervisor",
        ),
    ] {
        let (code, text) = c.try_as(uri, ops).await;
        assert_eq!(code, want, "{what}: {text}");
        assert!(text.contains(says), "{what}: {text}");
        // Nothing of t1's is named to t2 beyond the id it gave.
        if uri == BOB {
            assert!(!text.contains("t1") && !text.contains("10.1"), "{what}: {text}");
        }
    }

    // The platform writes port-held ones; the administrator host-held ones.
    let (code, text) = c
        .try_as(
            PLATFORM,
            vec![virtual_ip("vq", "t2", "v2", "10.2.0.50", 5, false, &[("q1", 10)])],
        )
        .await;
    assert_eq!(code, Code::Ok, "{text}");
    let (code, text) = c.try_as(ADMIN, vec![hosts_vip()]).await;
    assert_eq!(code, Code::Ok, "{text}");
    // ... and a tenant cannot take a host-held one back into its ports.
    let (code, text) = c
        .try_as(
            ALICE,
            vec![virtual_ip("vh", "t1", "v1", "10.1.0.52", 9, false, &[("p1", 1)])],
        )
        .await;
    assert_eq!(code, Code::PermissionDenied, "{text}");

    // Each tenant reads its own.
    let ids = |l: &pb::ListResponse| {
        let mut v: Vec<String> = l.virtual_ips.iter().map(|x| x.id.clone()).collect();
        v.sort();
        v
    };
    assert_eq!(ids(&c.list_as(ALICE).await), ["va", "vh"]);
    assert_eq!(ids(&c.list_as(BOB).await), ["vq"]);
    let all = c.list_as(ADMIN).await;
    assert_eq!(ids(&all), ["va", "vh", "vq"]);
    let va = all.virtual_ips.iter().find(|v| v.id == "va").unwrap();
    assert_eq!((va.advert_interval_cs, va.no_preempt, va.vrid), (10, false, 5));

    // sdnctl writes and reads them as manifests, and names a mistake at
    // its line in the manifest's words.
    let f = dir.path().join("v.yaml");
    let write = |body: &str| {
        std::fs::write(
            &f,
            format!("apiVersion: sdn/v1\nkind: VirtualIp\nmetadata: {{name: vc, tenant: t1}}\nspec:\n  vpc: v1\n  ipv4: 10.1.0.53\n  vrid: 11\n{body}"),
        )
        .unwrap();
    };
    write("  preempt: false\n  advertIntervalCs: 5\n  holders:\n    - {port: p1, priority: 9}\n    - {port: p2, priority: 8}\n");
    c.sdnctl(ADMIN, &["apply", "-f", f.to_str().unwrap()]).unwrap();
    let table = c.sdnctl(ADMIN, &["get", "virtual_ip"]).unwrap();
    assert!(
        table.contains("vc") && table.contains("holders=port:p1@9,port:p2@8 preempt=false advert=5cs"),
        "{table}"
    );
    let out = c.sdnctl(ADMIN, &["get", "virtual_ip", "-o", "yaml"]).unwrap();
    assert!(
        out.contains("kind: VirtualIp") && out.contains("advertIntervalCs: 5"),
        "{out}"
    );
    write("  holders:\n    - {port: p1, priority: 9}\n    - {port: p2, priority: 9}\n");
    let e = c.sdnctl(ADMIN, &["apply", "-f", f.to_str().unwrap()]).unwrap_err();
    assert!(
        e.contains("spec.holders[1].priority") && e.contains("holders[0] has priority 9 too"),
        "{e}"
    );
    write("  holders:\n    - {port: p1, host: h1, priority: 9}\n");
    let e = c.sdnctl(ADMIN, &["apply", "-f", f.to_str().unwrap()]).unwrap_err();
    assert!(e.contains("a port or a host, not both"), "{e}");

    // What a virtual IP uses stays while it does.
    let (code, text) = c.try_as(PLATFORM, vec![delete(pb::Kind::Port, "p2")]).await;
    assert_eq!(code, Code::InvalidArgument, "{text}");
    assert!(text.contains("still used by virtual ip va"), "{text}");
    let (code, text) = c.try_as(ADMIN, vec![delete(pb::Kind::LoadBalancer, "lbz")]).await;
    assert_eq!(code, Code::InvalidArgument, "{text}");
    assert!(text.contains("still used by virtual ip vh"), "{text}");

    // The audit records what the tenant did, and nothing of another's.
    let audit = c.sdnctl(ALICE, &["audit"]).unwrap();
    assert!(
        audit.contains("put virtual_ip va: tenant=t1 vpc=v1 addresses=10.1.0.50"),
        "{audit}"
    );
    assert!(!audit.contains("vq"), "{audit}");
}
