//! The audit log, read and attacked with clients that are not ours
//! (Python's grpcio) and with `sdnctl`: each record names its caller by
//! certificate and says what changed (for a security group, the rules
//! added and removed); refusals of every kind are records too; a tenant
//! reads only its own tenant's records; and a record altered on disk is
//! found by `sdnctl audit verify`, which names it.

use std::time::{Duration, Instant};

use prost::Message as _;
use redb::ReadableTable as _;
use sdn_integration::cluster::{Cluster, ADMIN};
use sdn_integration::ops::*;
use sdn_integration::pki::now;
use sdn_integration::pyclient::{unhex, Py};
use sdn_integration::{bin, privileged};
use sdn_proto::tls::pki::Validity;
use sdn_proto::v1 as pb;

const SUPERVISOR: &str = "sdn://supervisor/regulator";
const ALICE: &str = "sdn://tenant/acme/alice";
const MALLORY: &str = "sdn://tenant/globex/mallory";

const AUDIT: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("audit");

/// The audit log as `uri` reads it, through Python's grpcio.
fn audit_py(c: &Cluster, uri: &str) -> Result<pb::AuditResponse, String> {
    let pki = c.pki.as_ref().unwrap();
    let files = pki.files(uri).unwrap();
    let py = Py {
        target: c.addr.trim_start_matches("https://").to_string(),
        ca: Some(&pki.ca()),
        files: Some(&files),
    };
    let body = pb::AuditRequest {
        after_revision: 0,
        limit: 10_000,
        local: false,
    }
    .encode_to_vec();
    let (code, text) = py.call("/sdn.v1.Provisioning/Audit", body, false);
    if code != "OK" {
        return Err(format!("{code}: {text}"));
    }
    Ok(pb::AuditResponse::decode(unhex(&text).as_slice()).expect("an AuditResponse"))
}

fn sdnctl_as(c: &Cluster, uri: &str, args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new(bin("sdnctl"))
        .args(c.tls_args(uri).unwrap())
        .arg("--controller")
        .arg(&c.addr)
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

/// Waits until `f` holds of the supervisor's view of the log.
fn wait_for_records(c: &Cluster, what: &str, f: impl Fn(&pb::AuditResponse) -> bool) -> pb::AuditResponse {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = audit_py(c, SUPERVISOR).expect("the supervisor reads the log");
        if f(&r) {
            return r;
        }
        assert!(Instant::now() < deadline, "{what}: {:#?}", r.records);
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn apply_body(ops: Vec<pb::operation::Op>) -> Vec<u8> {
    pb::ApplyRequest {
        operations: ops.into_iter().map(|o| pb::Operation { op: Some(o) }).collect(),
        actor: "change 4711".into(),
        wait: false,
        wait_timeout_ms: 0,
    }
    .encode_to_vec()
}

/// Rewrites the stored record of `revision` with `f`, as someone with the
/// controller's disk would.
fn rewrite(data_dir: &std::path::Path, revision: u64, f: impl FnOnce(&mut serde_json::Value)) {
    let db = redb::Database::open(data_dir.join("store.redb")).expect("the controller's store");
    let tx = db.begin_write().unwrap();
    {
        let mut t = tx.open_table(AUDIT).unwrap();
        let mut r: serde_json::Value =
            serde_json::from_slice(t.get(revision).unwrap().expect("the record").value()).unwrap();
        f(&mut r);
        t.insert(revision, serde_json::to_vec(&r).unwrap().as_slice()).unwrap();
    }
    tx.commit().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_says_who_changed_what_keeps_tenants_apart_and_cannot_be_rewritten() {
    if !privileged() {
        eprintln!("skipped: needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::start_secure(dir.path()).unwrap();
    wait_for_records(&c, "the chain starts", |r| r.chained);
    c.apply(vec![
        tenant("acme"),
        tenant("globex"),
        vpc("v1", "acme"),
        vpc("v2", "globex"),
    ])
    .await
    .unwrap();
    let rule = |id: &str, port: u32| ingress(id, false, "tcp", (port, port), "10.0.0.0/8", "");
    c.apply_as(
        ALICE,
        vec![group("web", "acme", vec![rule("ssh", 22), rule("http", 80)])],
    )
    .await
    .unwrap();
    // Alice, through Python's grpcio, opens 443 and closes 80.
    let pki = c.pki.as_ref().unwrap();
    let target = c.addr.trim_start_matches("https://").to_string();
    let (alice, mallory) = (pki.files(ALICE).unwrap(), pki.files(MALLORY).unwrap());
    let ca = pki.ca();
    let py = |files| Py {
        target: target.clone(),
        ca: Some(&ca),
        files: Some(files),
    };
    let apply = "/sdn.v1.Provisioning/Apply";
    let (code, text) = py(&alice).call(
        apply,
        apply_body(vec![group("web", "acme", vec![rule("ssh", 22), rule("https", 443)])]),
        false,
    );
    assert_eq!(code, "OK", "{text}");
    // Mallory of globex reaches for acme's group, twice.
    let (code, text) = py(&mallory).call(apply, apply_body(vec![group("web", "globex", vec![])]), false);
    assert_eq!(code, "PERMISSION_DENIED", "{text}");
    let delete = pb::operation::Op::Delete(pb::ObjectRef {
        kind: pb::Kind::SecurityGroup as i32,
        id: "web".into(),
    });
    let (code, text) = py(&mallory).call(apply, apply_body(vec![delete]), false);
    assert_eq!(code, "PERMISSION_DENIED", "{text}");
    // And for a port of acme's VPC (tenants make no ports at all).
    let (code, text) = py(&mallory).call(
        apply,
        apply_body(vec![port(
            "p9",
            "acme",
            "s1",
            "h1",
            "tap9",
            "02:00:00:00:00:09",
            "10.1.0.9",
            "",
            &[],
        )]),
        false,
    );
    assert_eq!(code, "PERMISSION_DENIED", "{text}");
    // Callers the handshake refuses: no certificate, an expired one.
    let expired = pki
        .files_valid(
            "sdn://platform/expired",
            Validity {
                not_before: now() - 10 * 86_400,
                not_after: now() - 86_400,
            },
        )
        .unwrap();
    let other_ca = sdn_integration::pki::Pki::new(&dir.path().join("other-ca")).unwrap();
    let foreign = other_ca.files("sdn://admin/integration").unwrap();
    let list = pb::ListRequest { kind: 0, stale: false }.encode_to_vec();
    for files in [None, Some(&expired), Some(&foreign)] {
        let (code, _) = Py {
            target: target.clone(),
            ca: Some(&ca),
            files,
        }
        .call("/sdn.v1.Provisioning/List", list.clone(), false);
        assert_eq!(code, "UNAVAILABLE");
    }

    // The supervisor's view: every record.
    let all = wait_for_records(&c, "the refusals are recorded", |r| {
        let refused = |who: &str, why: &str| {
            r.records
                .iter()
                .any(|x| x.actor.contains(who) && x.refused.contains(why))
        };
        refused(MALLORY, "not allowed for role tenant")
            && refused("unauthenticated", "no certificate")
            && refused("unauthenticated", "expired")
            && (refused("unauthenticated", "unable to get local issuer")
                || refused("unauthenticated", "signature failure"))
    });
    let update = all
        .records
        .iter()
        .find(|r| r.content.iter().any(|c| c.op == "update" && c.id == "web"))
        .expect("the record of alice's update");
    assert_eq!(
        update.actor,
        format!("{ALICE} (change 4711)"),
        "the certificate's name, then what the caller said"
    );
    assert_eq!(update.tenants, ["acme"]);
    assert_eq!(update.time, sdn_proto::audit::rfc3339(update.time_unix_ms));
    assert!(update.time.ends_with('Z') && update.time.len() == 24, "{}", update.time);
    let detail: serde_json::Value = serde_json::from_str(&update.content[0].detail).unwrap();
    let rules = &detail["fields"][0];
    assert_eq!(rules["field"], "rules", "{detail}");
    let ids = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(ids(&rules["added"]), ["https"], "{detail}");
    assert_eq!(ids(&rules["removed"]), ["http"], "{detail}");
    let refusal = all.records.iter().find(|r| r.actor == MALLORY).unwrap();
    assert!(refusal.content.is_empty() && refusal.changes.is_empty());
    assert_eq!(refusal.tenants, ["globex"]);
    assert!(!all.partial);

    // Each tenant reads its own tenant's records only.
    let acme = audit_py(&c, ALICE).unwrap();
    assert!(acme.partial);
    assert!(acme.records.iter().any(|r| r.revision == update.revision));
    for r in &acme.records {
        assert_eq!(r.tenants, ["acme"], "{r:?}");
        let text = format!("{r:?}");
        assert!(
            !text.contains("globex") && !text.contains("mallory"),
            "acme sees globex: {text}"
        );
    }
    let globex = audit_py(&c, MALLORY).unwrap();
    assert!(globex.records.iter().any(|r| r.actor == MALLORY), "its own refusals");
    for r in &globex.records {
        let text = format!("{r:?}");
        assert!(
            !text.contains("acme") || r.actor == MALLORY,
            "globex sees acme's records: {text}"
        );
        assert!(r.content.iter().all(|c| c.tenants == ["globex"]), "{text}");
    }
    // The platform's records of both tenants' creation: the acme view has
    // acme's tenant and VPC, not globex's.
    let made: Vec<&str> = acme
        .records
        .iter()
        .flat_map(|r| r.content.iter().map(|c| c.id.as_str()))
        .collect();
    assert!(
        made.contains(&"acme") && made.contains(&"v1") && !made.contains(&"v2"),
        "{made:?}"
    );

    // The chain holds, checked by sdnctl; a tenant's view cannot be checked.
    let out = sdnctl_as(&c, SUPERVISOR, &["audit", "verify"]).unwrap();
    eprintln!("{out}");
    assert!(out.contains("the audit chain holds"), "{out}");
    let checkpoint = out
        .lines()
        .find_map(|l| l.strip_prefix("checkpoint "))
        .expect("a checkpoint to keep")
        .to_string();
    for bad in ["3:nothex", "three:00", &format!("3:{}", "ab".repeat(31))] {
        let out = sdnctl_as(&c, SUPERVISOR, &["audit", "verify", "--checkpoint", bad]).unwrap_err();
        assert!(
            out.contains(&format!("--checkpoint {bad:?}: not REVISION:HASH")),
            "{out}"
        );
    }
    let out = sdnctl_as(&c, ALICE, &["audit", "verify"]).unwrap_err();
    assert!(out.contains("leaves records out"), "{out}");
    let printed = sdnctl_as(&c, ADMIN, &["audit", "--content"]).unwrap();
    eprintln!("{printed}");
    assert!(
        printed.contains(&format!("by {MALLORY}: REFUSED role tenant")),
        "{printed}"
    );
    assert!(printed.contains("update security_group web"), "{printed}");

    // Someone with the disk hides that 443 was opened: the record no
    // longer matches its hash.
    let r = update.revision;
    c.with_controller_stopped(|data| {
        rewrite(data, r, |rec| {
            let d = rec["content"][0]["detail"]
                .as_str()
                .unwrap()
                .replace("\"https\"", "\"ssh\"");
            rec["content"][0]["detail"] = d.into();
        })
    })
    .unwrap();
    let out = sdnctl_as(&c, SUPERVISOR, &["audit", "verify"]).unwrap_err();
    eprintln!("{out}");
    assert!(
        out.contains(&format!("the record of revision {r} is broken")) && out.contains("altered"),
        "{out}"
    );
    // And if they recompute its hash too, the next record no longer
    // follows it.
    c.with_controller_stopped(|data| {
        rewrite(data, r, |rec| {
            let mut pbr = all.records.iter().find(|x| x.revision == r).unwrap().clone();
            pbr.content[0].detail = rec["content"][0]["detail"].as_str().unwrap().to_string();
            let h = sdn_proto::audit::record_hash(&pbr.prev_hash, &pbr);
            rec["hash"] = sdn_proto::audit::hex(&h).into();
        })
    })
    .unwrap();
    let out = sdnctl_as(&c, SUPERVISOR, &["audit", "verify"]).unwrap_err();
    eprintln!("{out}");
    assert!(
        out.contains(&format!("the record of revision {} is broken", r + 1))
            && out.contains(&format!("does not follow revision {r}")),
        "{out}"
    );
    // And if they recompute every hash after it, this copy checks on its
    // own; the checkpoint kept from before does not.
    c.with_controller_stopped(|data| rehash_from(data, r)).unwrap();
    let out = sdnctl_as(&c, SUPERVISOR, &["audit", "verify"]).unwrap();
    assert!(out.contains("the audit chain holds"), "{out}");
    let out = sdnctl_as(&c, SUPERVISOR, &["audit", "verify", "--checkpoint", &checkpoint]).unwrap_err();
    eprintln!("{out}");
    assert!(out.contains("the log was rewritten since"), "{out}");
}

/// The record as the API gives it, from its stored form.
fn to_pb(r: &serde_json::Value) -> pb::AuditRecord {
    let s = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
    let list =
        |v: &serde_json::Value| -> Vec<String> { v.as_array().map(|a| a.iter().map(s).collect()).unwrap_or_default() };
    pb::AuditRecord {
        revision: r["revision"].as_u64().unwrap(),
        actor: s(&r["actor"]),
        time_unix_ms: r["time_unix_ms"].as_u64().unwrap(),
        changes: list(&r["changes"]),
        content: r["content"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|c| pb::AuditChange {
                        op: s(&c["op"]),
                        kind: s(&c["kind"]),
                        id: s(&c["id"]),
                        tenants: list(&c["tenants"]),
                        detail: s(&c["detail"]),
                    })
                    .collect()
            })
            .unwrap_or_default(),
        refused: s(&r["refused"]),
        tenants: list(&r["tenants"]),
        ..Default::default()
    }
}

/// Recomputes the chain from `from` on, as someone who knows how it is
/// computed would after altering a record.
fn rehash_from(data_dir: &std::path::Path, from: u64) {
    let db = redb::Database::open(data_dir.join("store.redb")).expect("the controller's store");
    let tx = db.begin_write().unwrap();
    {
        let mut t = tx.open_table(AUDIT).unwrap();
        let before: serde_json::Value = serde_json::from_slice(t.get(from - 1).unwrap().unwrap().value()).unwrap();
        let mut prev = sdn_integration::pyclient::unhex(before["hash"].as_str().unwrap());
        let revisions: Vec<u64> = t.range(from..).unwrap().map(|e| e.unwrap().0.value()).collect();
        for rev in revisions {
            let mut r: serde_json::Value = serde_json::from_slice(t.get(rev).unwrap().unwrap().value()).unwrap();
            let h = sdn_proto::audit::record_hash(&prev, &to_pb(&r));
            r["prev_hash"] = sdn_proto::audit::hex(&prev).into();
            r["hash"] = sdn_proto::audit::hex(&h).into();
            prev = h.to_vec();
            t.insert(rev, serde_json::to_vec(&r).unwrap().as_slice()).unwrap();
        }
    }
    tx.commit().unwrap();
}
