//! The audit log's records: what a change did, object by object, whom it
//! concerns, and the hash chain that binds each record to the one before.
//!
//! Every replica computes the same records and the same chain from the same
//! log. The chain starts at a log entry, not when each replica was
//! upgraded: the leader proposes [`Internal::StartChain`] once every member
//! has said it keeps the chain (`RaftMessage.chains_audit`), and a replica
//! applying that entry starts chaining the records after it. Records of
//! earlier revisions stay as they were, without a hash.
//!
//! A record's content (its JSON in particular) is part of what replicas
//! must agree on. A release that changes how records are written must start
//! the new form the same way, by an entry every member understands
//! ([`Internal::StartChain`]'s `form`).

use sdn_policies::{Kind, Object, State};
use sdn_proto::audit::{genesis, hex, record_hash};
use sdn_proto::v1 as pb;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The record form this release writes and chains.
pub const FORM: u32 = 1;

/// The prefix of an internal command's actor: JSON of the [`Internal`]
/// after it.
pub const INTERNAL_PREFIX: &str = "sdn-internal:";

/// The time of an internal command, which no client's batch has: the
/// leader stamps every batch with its clock. A command of this time, no
/// operations and an actor of [`INTERNAL_PREFIX`] is one of the store's
/// own. (An actor alone would not do: earlier releases let an
/// unauthenticated client name itself anything, and an entry of theirs
/// may still be in a log.)
pub const INTERNAL_TIME: u64 = u64::MAX;

/// The store's own commands, which travel in the log like a client's
/// batch (so earlier releases' log forms carry them unchanged).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Internal {
    /// Starts the chain after the current revision, in record form `form`.
    StartChain { form: u32 },
    /// Refused requests, one record each.
    Refused { refusals: Vec<Refusal>, suppressed: u64 },
}

/// One refused request, as the refusing replica saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub actor: String,
    pub role: String,
    pub reason: String,
    pub time_unix_ms: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tenant: String,
    /// Refusals of the same caller and reason this record stands for.
    #[serde(default = "one")]
    pub count: u64,
}

fn one() -> u64 {
    1
}

impl Internal {
    /// The command's actor string.
    pub fn to_actor(&self) -> String {
        format!(
            "{INTERNAL_PREFIX}{}",
            serde_json::to_string(self).expect("serialisable")
        )
    }

    /// The internal command a command is, if it is one.
    pub fn of(actor: &str, time_unix_ms: u64, ops: &[sdn_policies::Op]) -> Option<Result<Internal, String>> {
        if time_unix_ms != INTERNAL_TIME || !ops.is_empty() {
            return None;
        }
        let json = actor.strip_prefix(INTERNAL_PREFIX)?;
        Some(serde_json::from_str(json).map_err(|e| format!("an internal command this release cannot read: {e}")))
    }
}

/// The chain's state, kept with the state machine's applied state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chain {
    pub form: u32,
    /// Records of revisions after this one are chained.
    pub start: u64,
    /// The last trimmed record (`start` until one is), and its hash.
    pub anchor_revision: u64,
    pub anchor_hash: String,
    /// The hash the next record follows.
    pub head: String,
}

impl Chain {
    pub fn starting_after(revision: u64, form: u32) -> Chain {
        let g = hex(&genesis(revision));
        Chain {
            form,
            start: revision,
            anchor_revision: revision,
            anchor_hash: g.clone(),
            head: g,
        }
    }
}

/// One object a change touched.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub op: String,
    pub kind: String,
    pub id: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tenants: Vec<String>,
    pub detail: String,
}

/// One record of the audit log, as stored.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub revision: u64,
    pub actor: String,
    pub time_unix_ms: u64,
    pub changes: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub content: Vec<Change>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub refused: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tenants: Vec<String>,
    /// Hex; empty before the chain started.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prev_hash: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hash: String,
}

impl AuditRecord {
    /// The record as the API gives it.
    pub fn to_pb(&self) -> pb::AuditRecord {
        let mut r = self.to_pb_untimed();
        r.time = sdn_proto::audit::rfc3339(self.time_unix_ms);
        r
    }

    /// [`AuditRecord::to_pb`] without the time written out, which the hash
    /// does not cover.
    fn to_pb_untimed(&self) -> pb::AuditRecord {
        pb::AuditRecord {
            revision: self.revision,
            actor: self.actor.clone(),
            time_unix_ms: self.time_unix_ms,
            changes: self.changes.clone(),
            time: String::new(),
            content: self
                .content
                .iter()
                .map(|c| pb::AuditChange {
                    op: c.op.clone(),
                    kind: c.kind.clone(),
                    id: c.id.clone(),
                    tenants: c.tenants.clone(),
                    detail: c.detail.clone(),
                })
                .collect(),
            refused: self.refused.clone(),
            tenants: self.tenants.clone(),
            prev_hash: unhex(&self.prev_hash),
            hash: unhex(&self.hash),
        }
    }

    /// Chains the record to `chain`'s head, and moves the head to it.
    pub fn chain(&mut self, chain: &mut Chain) {
        self.prev_hash = chain.head.clone();
        self.hash = String::new();
        let h = record_hash(&unhex(&self.prev_hash), &self.to_pb_untimed());
        self.hash = hex(&h);
        chain.head = self.hash.clone();
    }

    /// The record as `tenant` may read it: only the objects that are its
    /// own, or `None` if the record does not concern it.
    pub fn for_tenant(&self, tenant: &str) -> Option<AuditRecord> {
        // Records older than the chain name no tenants: a tenant reads
        // those its own users made.
        let concerned = if self.tenants.is_empty() {
            actor_tenant(&self.actor).as_deref() == Some(tenant)
        } else {
            self.tenants.iter().any(|t| t == tenant)
        };
        if !concerned {
            return None;
        }
        let mut r = self.clone();
        // Only its own objects: a batch may also touch objects of no tenant
        // (a host and its underlay address, a zone) or of another. The
        // lines go when anything is left out, as they name every object.
        let all = r.content.len();
        r.content.retain(|c| c.tenants.iter().any(|t| t == tenant));
        if r.content.len() < all || self.tenants.len() > 1 {
            r.changes = r
                .content
                .iter()
                .map(|c| format!("{} {} {}", c.op, c.kind, c.id))
                .collect();
        }
        r.tenants = vec![tenant.to_string()];
        Some(r)
    }
}

/// Hex to bytes; what is not hex reads as nothing (a verifier then finds
/// the record broken).
pub fn unhex(s: &str) -> Vec<u8> {
    sdn_proto::audit::unhex(s).unwrap_or_default()
}

/// The tenants an object belongs to. A subnet's is its VPC's, found in
/// `state` or, for a VPC the same batch removed, in `gone`.
/// The tenants an object concerns. `was`: the object as it was before the
/// batch, whose parents are looked up as they were too (a parent deleted
/// and made again for another tenant in the same batch keeps the old
/// object's records its first tenant's).
fn object_tenants(o: &Object, was: bool, state: &State, gone: &[(Kind, String, Option<Object>)]) -> Vec<String> {
    let vpc_tenant = |vpc: &str| -> Option<String> {
        if let Some(v) = state.vpcs.get(vpc) {
            return Some(v.tenant_id.clone());
        }
        gone.iter().find_map(|(k, id, o)| match (k, o) {
            (Kind::Vpc, Some(Object::Vpc(v))) if id == vpc => Some(v.tenant_id.clone()),
            _ => None,
        })
    };
    // A load balancer's pools, listeners and members are its tenant's; the
    // load balancer or pool may have gone in the same batch.
    let lb_before = |lb: &str| {
        gone.iter().find_map(|(k, id, o)| match (k, o) {
            (Kind::LoadBalancer, Some(Object::LoadBalancer(l))) if id == lb => Some(l.tenant_id.clone()),
            _ => None,
        })
    };
    let lb_now = |lb: &str| state.load_balancers.get(lb).map(|l| l.tenant_id.clone());
    let lb_tenant = |lb: &str| -> Option<String> {
        if was {
            lb_before(lb).or_else(|| lb_now(lb))
        } else {
            lb_now(lb).or_else(|| lb_before(lb))
        }
    };
    let pool_before = |pool: &str| {
        gone.iter().find_map(|(k, id, o)| match (k, o) {
            (Kind::Pool, Some(Object::Pool(p))) if id == pool => Some(p.load_balancer_id.clone()),
            _ => None,
        })
    };
    let pool_now = |pool: &str| state.pools.get(pool).map(|p| p.load_balancer_id.clone());
    let pool_tenant = |pool: &str| -> Option<String> {
        let lb = if was {
            pool_before(pool).or_else(|| pool_now(pool))
        } else {
            pool_now(pool).or_else(|| pool_before(pool))
        };
        lb_tenant(&lb?)
    };
    let mut out: Vec<String> = match o {
        Object::LoadBalancer(l) => vec![l.tenant_id.clone()],
        Object::Pool(p) => lb_tenant(&p.load_balancer_id).into_iter().collect(),
        Object::Listener(l) => lb_tenant(&l.load_balancer_id).into_iter().collect(),
        Object::HttpListener(l) => lb_tenant(&l.load_balancer_id).into_iter().collect(),
        Object::Member(m) => pool_tenant(&m.pool_id).into_iter().collect(),
        Object::Tenant(t) => vec![t.id.clone()],
        Object::Vpc(v) => vec![v.tenant_id.clone()],
        Object::Subnet(s) => vpc_tenant(&s.vpc_id).into_iter().collect(),
        Object::Port(p) => vec![p.tenant_id.clone()],
        Object::SecurityGroup(g) => vec![g.tenant_id.clone()],
        Object::VirtualIp(v) => vec![v.tenant_id.clone()],
        Object::Certificate(x) => vec![x.tenant_id.clone()],
        Object::VpcPeering(p) => [&p.vpc_a, &p.vpc_b].into_iter().filter_map(|v| vpc_tenant(v)).collect(),
        // A mirror session is the supervisors' business, not the tenants'
        // it copies; so is an information system's measure.
        Object::Host(_)
        | Object::Quarantine(_)
        | Object::Zone(_)
        | Object::ExchangePath(_)
        | Object::FirewallPolicy(_)
        | Object::MirrorSession(_)
        | Object::InformationSystem(_) => vec![],
    };
    out.retain(|t| !t.is_empty());
    out.sort();
    out.dedup();
    out
}

/// An object's JSON as its audit record shows it: as the store keeps it,
/// but a certificate's private key as its SHA-256 alone, so a record tells
/// a changed key without holding it.
fn shown(o: &Object) -> Vec<u8> {
    match o {
        Object::Certificate(c) => Object::Certificate(sdn_policies::Certificate {
            key_pem: format!(
                "(private key, sha256 {})",
                hex(&sdn_proto::audit::sha256(c.key_pem.as_bytes()))
            ),
            ..c.clone()
        })
        .to_json(),
        _ => o.to_json(),
    }
}

fn json(o: &Object) -> Value {
    serde_json::from_slice(&shown(o)).unwrap_or(Value::Null)
}

/// What changed between two versions of an object, field by field: a
/// list's items added and removed, any other field's value before and
/// after.
fn field_diff(before: &Value, after: &Value) -> Vec<Value> {
    let (Value::Object(b), Value::Object(a)) = (before, after) else {
        return vec![serde_json::json!({"field": "", "before": before, "after": after})];
    };
    let mut fields: Vec<&String> = b.keys().collect();
    fields.extend(a.keys().filter(|k| !b.contains_key(*k)));
    let mut out = Vec::new();
    for f in fields {
        let (x, y) = (b.get(f).unwrap_or(&Value::Null), a.get(f).unwrap_or(&Value::Null));
        if x == y {
            continue;
        }
        match (x, y) {
            (Value::Array(xs), Value::Array(ys)) => {
                // By their text: a group may hold tens of thousands of rules.
                let text = |vs: &Vec<Value>| -> std::collections::HashSet<String> {
                    vs.iter().map(Value::to_string).collect()
                };
                let (had, has) = (text(xs), text(ys));
                let added: Vec<&Value> = ys.iter().filter(|v| !had.contains(&v.to_string())).collect();
                let removed: Vec<&Value> = xs.iter().filter(|v| !has.contains(&v.to_string())).collect();
                if added.is_empty() && removed.is_empty() {
                    // The same items in another order.
                    out.push(serde_json::json!({"field": f, "before": x, "after": y}));
                } else {
                    out.push(serde_json::json!({"field": f, "added": added, "removed": removed}));
                }
            }
            _ => out.push(serde_json::json!({"field": f, "before": x, "after": y})),
        }
    }
    out
}

/// The detail of one change kept whole, at most; beyond, its digest.
pub const DETAIL_MAX: usize = 16 << 10;

/// The details of one record kept whole, at most; the changes beyond keep
/// their digest.
pub const CONTENT_MAX: usize = 64 << 10;

/// What a record keeps of a detail too large to keep: its SHA-256 and size
/// (anyone holding the object can check them), and for an update the
/// fields changed with the number of items added and removed.
fn digest(detail: &Value, text: &str) -> Value {
    let mut out = serde_json::json!({
        "sha256": hex(&sdn_proto::audit::sha256(text.as_bytes())),
        "bytes": text.len(),
    });
    if let Some(fields) = detail.get("fields").and_then(Value::as_array) {
        let summary: Vec<Value> = fields
            .iter()
            .map(|f| {
                let mut s = serde_json::json!({"field": f["field"]});
                for k in ["added", "removed"] {
                    if let Some(a) = f.get(k).and_then(Value::as_array) {
                        s[k] = a.len().into();
                    }
                }
                s
            })
            .collect();
        out["fields"] = summary.into();
    }
    out
}

/// The content of an applied batch: every object it touched (`before`, in
/// the order first touched), as it was and as it is in `state` now. An
/// object put back unchanged is left out. A detail beyond [`DETAIL_MAX`],
/// or beyond [`CONTENT_MAX`] for the record, is kept as its digest.
pub fn content(before: &[(Kind, String, Option<Object>)], state: &State) -> Vec<Change> {
    let mut out = Vec::new();
    let mut kept = 0usize;
    for (kind, id, was) in before {
        let now = state.get(*kind, id);
        // A whole object goes in as its JSON, as the store keeps it (the
        // same text serde_json makes of it as a value).
        let whole = |key: &str, o: &Object| {
            let j = shown(o);
            let mut t = String::with_capacity(j.len() + key.len() + 5);
            t.push_str("{\"");
            t.push_str(key);
            t.push_str("\":");
            t.push_str(std::str::from_utf8(&j).expect("serde_json writes UTF-8"));
            t.push('}');
            t
        };
        let (op, text, tenants) = match (was, &now) {
            (None, None) => continue,
            (None, Some(n)) => ("create", whole("after", n), object_tenants(n, false, state, before)),
            (Some(w), None) => ("delete", whole("before", w), object_tenants(w, true, state, before)),
            (Some(w), Some(n)) => {
                if w == n {
                    continue;
                }
                let mut t = object_tenants(w, true, state, before);
                t.extend(object_tenants(n, false, state, before));
                t.sort();
                t.dedup();
                let diff = serde_json::json!({"fields": field_diff(&json(w), &json(n))});
                ("update", diff.to_string(), t)
            }
        };
        let mut text = text;
        if text.len() > DETAIL_MAX || kept + text.len() > CONTENT_MAX {
            let detail: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            text = serde_json::json!({"digest": digest(&detail, &text)}).to_string();
        }
        kept += text.len();
        out.push(Change {
            op: op.into(),
            kind: kind.name().into(),
            id: id.clone(),
            tenants,
            detail: text,
        });
    }
    out
}

/// The tenants a record concerns: those of its objects, and the actor's
/// own when a tenant's user made it.
pub fn record_tenants(actor: &str, content: &[Change]) -> Vec<String> {
    let mut t: Vec<String> = content.iter().flat_map(|c| c.tenants.iter().cloned()).collect();
    if let Some(own) = actor_tenant(actor) {
        t.push(own);
    }
    t.sort();
    t.dedup();
    t
}

/// The tenant of an actor that is a tenant's user (`sdn://tenant/T/NAME`,
/// possibly followed by what the request said of itself).
pub fn actor_tenant(actor: &str) -> Option<String> {
    let rest = actor.strip_prefix("sdn://tenant/")?;
    let (t, _) = rest.split_once('/')?;
    (!t.is_empty()).then(|| t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sdn_policies::*;

    fn group(rules: Vec<Rule>) -> SecurityGroup {
        SecurityGroup {
            id: "web".into(),
            tenant_id: "acme".into(),
            name: "web".into(),
            rules,
        }
    }

    fn rule(port: u16) -> Rule {
        Rule {
            id: format!("r{port}"),
            direction: Direction::Ingress,
            ether_type: EtherType::IPv4,
            protocol: Protocol::Tcp,
            ports: Some((port, port)),
            remote: Remote::Any,
        }
    }

    /// An update records the rules added and removed, not the whole group;
    /// a create the object, a delete what it was; each names its tenant.
    #[test]
    fn content_says_what_changed() {
        let mut state = State::default();
        state.replace(
            Kind::SecurityGroup,
            "web",
            Some(Object::SecurityGroup(group(vec![rule(22), rule(443)]))),
        );
        let was = Some(Object::SecurityGroup(group(vec![rule(22), rule(80)])));
        let c = content(&[(Kind::SecurityGroup, "web".into(), was)], &state);
        assert_eq!(c.len(), 1);
        assert_eq!(
            (c[0].op.as_str(), c[0].tenants.as_slice()),
            ("update", &["acme".to_string()][..])
        );
        let d: Value = serde_json::from_str(&c[0].detail).unwrap();
        let f = &d["fields"][0];
        assert_eq!(f["field"], "rules");
        assert_eq!(f["added"].as_array().unwrap().len(), 1);
        assert_eq!(f["added"][0]["id"], "r443");
        assert_eq!(f["removed"][0]["id"], "r80");
        let created = content(&[(Kind::SecurityGroup, "web".into(), None)], &state);
        assert_eq!(created[0].op, "create");
        assert!(
            created[0].detail.contains(r#""after":{"id":"web""#),
            "{}",
            created[0].detail
        );
        let empty = State::default();
        let deleted = content(
            &[(
                Kind::SecurityGroup,
                "web".into(),
                Some(Object::SecurityGroup(group(vec![]))),
            )],
            &empty,
        );
        assert_eq!((deleted[0].op.as_str(), deleted[0].tenants.len()), ("delete", 1));
        let same = content(
            &[(Kind::SecurityGroup, "web".into(), state.get(Kind::SecurityGroup, "web"))],
            &state,
        );
        assert!(same.is_empty(), "an object put back unchanged");
    }

    /// A change too large to keep whole keeps its digest and, for an
    /// update, how many items each field gained and lost.
    #[test]
    fn large_changes_keep_their_digest() {
        let many: Vec<Rule> = (0..2_000).map(|p| rule(p as u16 + 1)).collect();
        let mut state = State::default();
        state.replace(
            Kind::SecurityGroup,
            "web",
            Some(Object::SecurityGroup(group(many.clone()))),
        );
        let created = content(&[(Kind::SecurityGroup, "web".into(), None)], &state);
        assert!(created[0].detail.len() < 1024, "{}", created[0].detail.len());
        let d: Value = serde_json::from_str(&created[0].detail).unwrap();
        assert_eq!(d["digest"]["sha256"].as_str().unwrap().len(), 64);
        assert!(d["digest"]["bytes"].as_u64().unwrap() > DETAIL_MAX as u64);
        let was = Some(Object::SecurityGroup(group(many[..1_000].to_vec())));
        let updated = content(&[(Kind::SecurityGroup, "web".into(), was)], &state);
        let d: Value = serde_json::from_str(&updated[0].detail).unwrap();
        assert_eq!(d["digest"]["fields"][0]["added"], 1_000, "{d}");
        assert_eq!(d["digest"]["fields"][0]["removed"], 0, "{d}");
    }

    /// Replicas must write the same records: the form of a record's
    /// content is pinned here. A change to an object's JSON changes it, and
    /// a release whose records differ must start its form by a log entry
    /// (a new [`FORM`] and its [`Internal::StartChain`]), or replicas of
    /// two releases would chain differently.
    #[test]
    fn the_record_form_is_pinned() {
        let mut state = State::default();
        state.replace(
            Kind::SecurityGroup,
            "web",
            Some(Object::SecurityGroup(group(vec![rule(22)]))),
        );
        let c = content(&[(Kind::SecurityGroup, "web".into(), None)], &state);
        assert_eq!(FORM, 1);
        assert_eq!(
            c[0].detail,
            r#"{"after":{"id":"web","tenant_id":"acme","name":"web","rules":[{"id":"r22","direction":"ingress","ether_type":"IPv4","protocol":"tcp","ports":[22,22],"remote":"any"}]}}"#
        );
    }

    /// A certificate's key is recorded as its digest alone, created,
    /// changed or deleted.
    #[test]
    fn a_certificates_key_is_never_recorded() {
        let cert = |key: &str| {
            Object::Certificate(sdn_policies::Certificate {
                id: "c".into(),
                tenant_id: "acme".into(),
                name: "c".into(),
                cert_pem: "CERT".into(),
                key_pem: key.into(),
                names: vec!["a.example".into()],
                not_after_unix: 1,
            })
        };
        let mut state = State::default();
        state.replace(Kind::Certificate, "c", Some(cert("SECRET-ONE")));
        let created = content(&[(Kind::Certificate, "c".into(), None)], &state);
        let changed = content(&[(Kind::Certificate, "c".into(), Some(cert("SECRET-TWO")))], &state);
        state.replace(Kind::Certificate, "c", None);
        let deleted = content(&[(Kind::Certificate, "c".into(), Some(cert("SECRET-ONE")))], &state);
        for c in [&created, &changed, &deleted] {
            assert_eq!(c.len(), 1);
            assert!(!c[0].detail.contains("SECRET"), "{}", c[0].detail);
            assert!(c[0].detail.contains("(private key, sha256 "), "{}", c[0].detail);
            assert_eq!(c[0].tenants, ["acme"]);
        }
        assert!(
            changed[0].detail.contains("key_pem"),
            "a changed key shows: {}",
            changed[0].detail
        );
    }

    #[test]
    fn internal_commands_round_trip_through_the_actor() {
        let i = Internal::Refused {
            refusals: vec![Refusal {
                actor: "sdn://tenant/a/u".into(),
                role: "tenant".into(),
                reason: "Apply: no".into(),
                time_unix_ms: 5,
                tenant: "a".into(),
                count: 2,
            }],
            suppressed: 3,
        };
        assert_eq!(Internal::of(&i.to_actor(), INTERNAL_TIME, &[]), Some(Ok(i.clone())));
        assert_eq!(
            Internal::of(&i.to_actor(), 1_764_979_200_000, &[]),
            None,
            "a client's batch"
        );
        assert_eq!(Internal::of("sdn://admin/x", INTERNAL_TIME, &[]), None);
        assert!(matches!(
            Internal::of("sdn-internal:{\"new_thing\":1}", INTERNAL_TIME, &[]),
            Some(Err(_))
        ));
    }

    #[test]
    fn a_tenant_reads_only_its_part_of_a_record() {
        let r = AuditRecord {
            revision: 1,
            actor: "sdn://admin/a".into(),
            time_unix_ms: 0,
            changes: vec!["put vpc_peering p".into()],
            content: vec![
                Change {
                    op: "create".into(),
                    kind: "security_group".into(),
                    id: "g1".into(),
                    tenants: vec!["a".into()],
                    detail: "{}".into(),
                },
                Change {
                    op: "create".into(),
                    kind: "security_group".into(),
                    id: "g2".into(),
                    tenants: vec!["b".into()],
                    detail: "{}".into(),
                },
            ],
            refused: String::new(),
            tenants: vec!["a".into(), "b".into()],
            prev_hash: String::new(),
            hash: String::new(),
        };
        let a = r.for_tenant("a").unwrap();
        assert_eq!(a.content.len(), 1);
        assert_eq!(a.content[0].id, "g1");
        assert_eq!(a.changes, ["create security_group g1"]);
        assert!(r.for_tenant("c").is_none());
        // A platform batch of a host and a tenant's port: the tenant sees
        // its port, not the host (its underlay address).
        let mixed = AuditRecord {
            changes: vec!["put host h1".into(), "put port p1".into()],
            content: vec![
                Change {
                    op: "create".into(),
                    kind: "host".into(),
                    id: "h1".into(),
                    tenants: vec![],
                    detail: "{\"after\":{\"underlay_ip\":\"192.0.2.1\"}}".into(),
                },
                Change {
                    op: "create".into(),
                    kind: "port".into(),
                    id: "p1".into(),
                    tenants: vec!["a".into()],
                    detail: "{}".into(),
                },
            ],
            tenants: vec!["a".into()],
            ..r.clone()
        };
        let a = mixed.for_tenant("a").unwrap();
        assert_eq!(a.changes, ["create port p1"]);
        assert!(!format!("{a:?}").contains("192.0.2.1"), "{a:?}");
        assert_eq!(actor_tenant("sdn://tenant/acme/alice (ticket 7)"), Some("acme".into()));
        assert_eq!(actor_tenant("unverified sdn://tenant/acme/alice"), None);
    }
}
