//! The Raft state machine: applies batches to the network model, bumps the
//! revision, appends the audit record, and persists all of it in redb in the
//! same transaction as the last applied log id.

use std::collections::BTreeSet;
use std::io::Cursor;
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    AnyError, BasicNode, Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, SnapshotMeta, StorageError,
    StoredMembership,
};
use redb::{Database, ReadableTable, TableDefinition};
use sdn_policies::{Kind, Object, State};
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, RwLock};

use super::audit::{self, AuditRecord, Chain, Internal};
use super::{Command, Outcome, Proposal, Shared, TypeConfig};

const OBJECTS: TableDefinition<&str, &[u8]> = TableDefinition::new("objects");
const SM_META: TableDefinition<&str, &[u8]> = TableDefinition::new("sm_meta");
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");
const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");

type SErr = StorageError<u64>;

/// Audit records kept; older ones are trimmed so the disk stays bounded.
pub const AUDIT_KEEP: u64 = 100_000;

fn any<E: std::error::Error + 'static>(e: E) -> AnyError {
    AnyError::new(&e)
}

#[derive(Serialize, Deserialize)]
struct SnapshotData {
    state: State,
    revision: u64,
    audit: Vec<AuditRecord>,
    /// `None`: the chain had not started (or an earlier release built it).
    #[serde(default)]
    chain: Option<Chain>,
}

#[derive(Clone, Default, Serialize, Deserialize)]
struct Applied {
    last_applied: Option<LogId<u64>>,
    membership: StoredMembership<u64, BasicNode>,
    revision: u64,
    /// The audit chain, once started; committed with the records it heads.
    #[serde(default)]
    chain: Option<Chain>,
}

/// The state machine. Cloning shares everything.
#[derive(Clone)]
pub struct StateMachine {
    db: Arc<Database>,
    shared: Arc<RwLock<Shared>>,
    applied: Arc<RwLock<Applied>>,
    revisions: Arc<watch::Sender<u64>>,
    /// Audit records kept ([`AUDIT_KEEP`]).
    audit_keep: u64,
}

fn object_key(kind: Kind, id: &str) -> String {
    format!("{}/{}", kind.name(), id)
}

fn object_json(state: &State, kind: Kind, id: &str) -> Option<Vec<u8>> {
    state.get(kind, id).map(|o| o.to_json())
}

fn load_state(db: &Database) -> Result<(State, Applied), AnyError> {
    let tx = db.begin_read().map_err(any)?;
    let mut loaded: Vec<(Kind, Object)> = Vec::new();
    let objects = tx.open_table(OBJECTS).map_err(any)?;
    for item in objects.iter().map_err(any)? {
        let (k, v) = item.map_err(any)?;
        let (kind, id) = k
            .value()
            .split_once('/')
            .ok_or_else(|| AnyError::error(format!("bad object key {:?}", k.value())))?;
        let kind = Kind::from_name(kind)
            .ok_or_else(|| AnyError::error(format!("unknown object kind {kind:?} in the store")))?;
        let o = Object::from_json(kind, v.value()).map_err(|e| AnyError::error(format!("object {id}: {e}")))?;
        loaded.push((kind, o));
    }
    // In the order of the kinds' table: a port's relations need its subnet.
    loaded.sort_by_key(|(k, _)| *k);
    let mut state = State::default();
    for (kind, o) in loaded {
        let id = o.id().to_string();
        state.replace(kind, &id, Some(o));
    }
    let meta = tx.open_table(SM_META).map_err(any)?;
    let applied = match meta.get("applied").map_err(any)? {
        Some(v) => serde_json::from_slice(v.value()).map_err(any)?,
        None => Applied::default(),
    };
    Ok((state, applied))
}

/// A page of the audit log, read in one transaction: the records and the
/// chain they belong to agree.
pub struct AuditPage {
    pub records: Vec<AuditRecord>,
    pub chain: Option<Chain>,
    /// The newest revision the log holds a record of.
    pub head_revision: u64,
    /// The last revision read: the next page starts after it.
    pub next_after: u64,
}

/// What one page reads at most: records kept, records looked at, and bytes
/// (at least one record goes whatever its size).
#[derive(Clone, Copy, Debug)]
pub struct PageLimits {
    pub records: usize,
    pub scanned: usize,
    pub bytes: usize,
}

/// Reads the audit records after revision `after` that `keep` returns
/// (as it returns them), within `limits`.
pub fn read_audit_page(
    db: &Database,
    after: u64,
    limits: PageLimits,
    mut keep: impl FnMut(AuditRecord) -> Option<AuditRecord>,
) -> anyhow::Result<AuditPage> {
    let tx = db.begin_read()?;
    let chain = match tx.open_table(SM_META)?.get("applied")? {
        Some(v) => serde_json::from_slice::<Applied>(v.value())?.chain,
        None => None,
    };
    let t = tx.open_table(AUDIT)?;
    let head_revision = t.last()?.map(|(k, _)| k.value()).unwrap_or(0);
    let (mut records, mut scanned, mut bytes, mut next_after) = (Vec::new(), 0, 0, after);
    for item in t.range(after.saturating_add(1)..)? {
        if records.len() >= limits.records || scanned >= limits.scanned || bytes >= limits.bytes {
            break;
        }
        let (k, v) = item?;
        scanned += 1;
        next_after = k.value();
        let r: AuditRecord = serde_json::from_slice(v.value())
            .map_err(|e| anyhow::anyhow!("the audit record of revision {} does not read: {e}", k.value()))?;
        if let Some(r) = keep(r) {
            bytes += v.value().len();
            records.push(r);
        }
    }
    Ok(AuditPage {
        records,
        chain,
        head_revision,
        next_after,
    })
}

/// Reads audit records after a revision, at most `limit`.
pub fn read_audit(db: &Database, after: u64, limit: usize) -> anyhow::Result<Vec<AuditRecord>> {
    let limits = PageLimits {
        records: limit,
        scanned: usize::MAX,
        bytes: usize::MAX,
    };
    Ok(read_audit_page(db, after, limits, Some)?.records)
}

impl StateMachine {
    pub async fn open(
        db: Arc<Database>,
        shared: Arc<RwLock<Shared>>,
        revisions: watch::Sender<u64>,
    ) -> Result<Self, AnyError> {
        {
            let tx = db.begin_write().map_err(any)?;
            tx.open_table(OBJECTS).map_err(any)?;
            tx.open_table(SM_META).map_err(any)?;
            tx.open_table(AUDIT).map_err(any)?;
            tx.open_table(SNAPSHOT).map_err(any)?;
            tx.commit().map_err(any)?;
        }
        let (state, applied) = load_state(&db)?;
        {
            let mut s = shared.write().await;
            let started = std::time::Instant::now();
            s.shares.rebuild(&state, applied.revision);
            tracing::info!(
                hosts = state.hosts.len(),
                ports = state.ports.len(),
                ms = started.elapsed().as_millis() as u64,
                "built every host's share"
            );
            s.state = state;
            s.revision = applied.revision;
            s.chain = applied.chain.clone();
        }
        revisions.send_replace(applied.revision);
        tracing::info!(revision = applied.revision, "state machine loaded");
        Ok(StateMachine {
            db,
            shared,
            applied: Arc::new(RwLock::new(applied)),
            revisions: Arc::new(revisions),
            audit_keep: AUDIT_KEEP,
        })
    }

    fn build(&self, state: &State, revision: u64, chain: Option<Chain>) -> Result<Vec<u8>, AnyError> {
        let audit = read_audit(&self.db, 0, usize::MAX).map_err(|e| AnyError::error(e.to_string()))?;
        serde_json::to_vec(&SnapshotData {
            state: state.clone(),
            revision,
            audit,
            chain,
        })
        .map_err(any)
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, SErr> {
        let shared = self.shared.read().await;
        let applied = self.applied.read().await.clone();
        let data = self
            .build(&shared.state, shared.revision, shared.chain.clone())
            .map_err(super::sio::read_state_machine)?;
        drop(shared);
        let snapshot_id = format!(
            "{}-{}",
            applied.last_applied.map(|l| l.to_string()).unwrap_or_default(),
            applied.revision
        );
        let meta = SnapshotMeta {
            last_log_id: applied.last_applied,
            last_membership: applied.membership.clone(),
            snapshot_id,
        };
        let meta_bytes = serde_json::to_vec(&meta).map_err(|e| super::sio::write_state_machine(any(e)))?;
        (|| -> Result<(), AnyError> {
            let tx = self.db.begin_write().map_err(any)?;
            {
                let mut t = tx.open_table(SNAPSHOT).map_err(any)?;
                t.insert("meta", meta_bytes.as_slice()).map_err(any)?;
                t.insert("data", data.as_slice()).map_err(any)?;
            }
            tx.commit().map_err(any)
        })()
        .map_err(super::sio::write_state_machine)?;
        tracing::info!(revision = applied.revision, bytes = data.len(), "built a snapshot");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

/// Applies one of the store's own commands.
fn apply_internal(internal: Result<Internal, String>, applied: &mut Applied, audit: &mut Vec<AuditRecord>) -> Outcome {
    let nothing = Outcome {
        revision: 0,
        hosts: vec![],
        error: None,
    };
    match internal {
        Err(e) => {
            // Only a newer release proposes what this one cannot read, and
            // only once every member has said it reads it.
            tracing::error!("skipping a log entry: {e}");
            nothing
        }
        Ok(Internal::StartChain { form }) => {
            if let Some(c) = &applied.chain {
                tracing::debug!(start = c.start, "the audit chain has already started");
                return nothing;
            }
            if form != audit::FORM {
                tracing::error!(
                    form,
                    "skipping the start of an audit chain in a form this release does not write"
                );
                return nothing;
            }
            applied.chain = Some(Chain::starting_after(applied.revision, form));
            tracing::info!(after_revision = applied.revision, "the audit chain starts");
            nothing
        }
        Ok(Internal::Refused { refusals, suppressed }) => {
            let n = refusals.len();
            for (i, r) in refusals.into_iter().enumerate() {
                applied.revision += 1;
                let mut reason = r.reason;
                if r.count > 1 {
                    reason.push_str(&format!(" ({} times)", r.count));
                }
                if i + 1 == n && suppressed > 0 {
                    reason.push_str(&format!(
                        " (and {suppressed} more refusals past the rate limit, not recorded one by one)"
                    ));
                }
                let mut record = AuditRecord {
                    revision: applied.revision,
                    actor: r.actor,
                    time_unix_ms: r.time_unix_ms,
                    refused: format!("role {}: {reason}", r.role),
                    tenants: if r.tenant.is_empty() { vec![] } else { vec![r.tenant] },
                    ..Default::default()
                };
                if let Some(chain) = applied.chain.as_mut() {
                    record.chain(chain);
                }
                audit.push(record);
            }
            Outcome {
                revision: applied.revision,
                hosts: vec![],
                error: None,
            }
        }
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId<u64>>, StoredMembership<u64, BasicNode>), SErr> {
        let a = self.applied.read().await;
        Ok((a.last_applied, a.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Vec<Outcome>>, SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut guard = self.shared.write().await;
        let shared = &mut *guard;
        let mut applied = self.applied.write().await;
        let mut next_applied = applied.clone();
        // Batches apply to the served state in place (a refused one undoes
        // itself). Should the disk write below fail, Raft stops this node,
        // which reloads what the disk holds when it starts again.
        let mut touched: BTreeSet<(Kind, String)> = BTreeSet::new();
        let mut audit: Vec<AuditRecord> = Vec::new();
        let mut outcomes = Vec::new();
        for entry in entries {
            next_applied.last_applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => outcomes.push(Vec::new()),
                EntryPayload::Membership(m) => {
                    next_applied.membership = StoredMembership::new(Some(entry.log_id), m);
                    outcomes.push(Vec::new());
                }
                EntryPayload::Normal(Proposal { commands }) => {
                    let mut answers = Vec::with_capacity(commands.len());
                    for Command {
                        actor,
                        time_unix_ms,
                        ops,
                    } in commands
                    {
                        if let Some(internal) = Internal::of(&actor, time_unix_ms, &ops) {
                            answers.push(apply_internal(internal, &mut next_applied, &mut audit));
                            continue;
                        }
                        answers.push(match shared.state.apply(&ops) {
                            Ok(done) => {
                                next_applied.revision += 1;
                                let revision = next_applied.revision;
                                touched.extend(done.before.iter().map(|(k, id, _)| (*k, id.clone())));
                                let hosts = shared.shares.update(&shared.state, &done.before, revision);
                                let mut record = AuditRecord {
                                    revision,
                                    actor,
                                    time_unix_ms,
                                    changes: done.changes,
                                    ..Default::default()
                                };
                                if let Some(chain) = next_applied.chain.as_mut() {
                                    record.content = audit::content(&done.before, &shared.state);
                                    record.tenants = audit::record_tenants(&record.actor, &record.content);
                                    record.chain(chain);
                                }
                                audit.push(record);
                                Outcome {
                                    revision,
                                    hosts,
                                    error: None,
                                }
                            }
                            Err(e) => Outcome {
                                revision: 0,
                                hosts: vec![],
                                error: Some(e),
                            },
                        });
                    }
                    outcomes.push(answers);
                }
            }
        }
        let state = &shared.state;
        (|| -> Result<(), AnyError> {
            let mut tx = self.db.begin_write().map_err(any)?;
            // No fsync of its own: the log's next durable append makes it
            // durable, and what a crash loses here is replayed from the log.
            tx.set_durability(redb::Durability::None);
            {
                let mut objects = tx.open_table(OBJECTS).map_err(any)?;
                for (kind, id) in &touched {
                    let key = object_key(*kind, id);
                    match object_json(state, *kind, id) {
                        Some(j) => {
                            objects.insert(key.as_str(), j.as_slice()).map_err(any)?;
                        }
                        None => {
                            objects.remove(key.as_str()).map_err(any)?;
                        }
                    }
                }
                let mut a = tx.open_table(AUDIT).map_err(any)?;
                for r in &audit {
                    let j = serde_json::to_vec(r).map_err(any)?;
                    a.insert(r.revision, j.as_slice()).map_err(any)?;
                }
                if let Some(last) = audit.last() {
                    if last.revision > self.audit_keep {
                        let cut = last.revision - self.audit_keep;
                        // The last record trimmed anchors the chain.
                        if let Some(chain) = next_applied.chain.as_mut() {
                            if cut > chain.anchor_revision {
                                let trimmed = a.get(cut).map_err(any)?.map(|v| v.value().to_vec());
                                let r: Option<AuditRecord> = match trimmed {
                                    Some(b) => Some(serde_json::from_slice(&b).map_err(any)?),
                                    None => None,
                                };
                                match r {
                                    Some(r) if !r.hash.is_empty() => {
                                        chain.anchor_revision = cut;
                                        chain.anchor_hash = r.hash;
                                    }
                                    _ => tracing::error!(
                                        revision = cut,
                                        "the audit record to anchor the chain at is missing or unchained; the anchor stays at revision {}",
                                        chain.anchor_revision
                                    ),
                                }
                            }
                        }
                        a.retain_in(..=cut, |_, _| false).map_err(any)?;
                    }
                }
                let applied_bytes = serde_json::to_vec(&next_applied).map_err(any)?;
                let mut m = tx.open_table(SM_META).map_err(any)?;
                m.insert("applied", applied_bytes.as_slice()).map_err(any)?;
            }
            tx.commit().map_err(any)
        })()
        .map_err(super::sio::write_state_machine)?;
        shared.revision = next_applied.revision;
        shared.chain = next_applied.chain.clone();
        *applied = next_applied;
        self.revisions.send_replace(shared.revision);
        Ok(outcomes)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, SErr> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), SErr> {
        let bytes = snapshot.into_inner();
        let data: SnapshotData = serde_json::from_slice(&bytes).map_err(|e| super::sio::read_state_machine(any(e)))?;
        let applied = Applied {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
            revision: data.revision,
            chain: data.chain.clone(),
        };
        let applied_bytes = serde_json::to_vec(&applied).map_err(|e| super::sio::write_state_machine(any(e)))?;
        let meta_bytes = serde_json::to_vec(meta).map_err(|e| super::sio::write_state_machine(any(e)))?;
        (|| -> Result<(), AnyError> {
            let tx = self.db.begin_write().map_err(any)?;
            {
                let mut objects = tx.open_table(OBJECTS).map_err(any)?;
                objects.retain(|_, _| false).map_err(any)?;
                for o in data.state.objects() {
                    objects
                        .insert(object_key(o.kind(), o.id()).as_str(), o.to_json().as_slice())
                        .map_err(any)?;
                }
                let mut a = tx.open_table(AUDIT).map_err(any)?;
                a.retain(|_, _| false).map_err(any)?;
                for r in &data.audit {
                    let j = serde_json::to_vec(r).map_err(any)?;
                    a.insert(r.revision, j.as_slice()).map_err(any)?;
                }
                let mut m = tx.open_table(SM_META).map_err(any)?;
                m.insert("applied", applied_bytes.as_slice()).map_err(any)?;
                let mut sn = tx.open_table(SNAPSHOT).map_err(any)?;
                sn.insert("meta", meta_bytes.as_slice()).map_err(any)?;
                sn.insert("data", bytes.as_slice()).map_err(any)?;
            }
            tx.commit().map_err(any)
        })()
        .map_err(super::sio::write_state_machine)?;
        let mut shared = self.shared.write().await;
        shared.shares.rebuild(&data.state, data.revision);
        shared.state = data.state;
        shared.revision = data.revision;
        shared.chain = data.chain;
        *self.applied.write().await = applied;
        self.revisions.send_replace(shared.revision);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, SErr> {
        (|| -> Result<Option<Snapshot<TypeConfig>>, AnyError> {
            let tx = self.db.begin_read().map_err(any)?;
            let t = tx.open_table(SNAPSHOT).map_err(any)?;
            let (Some(m), Some(d)) = (t.get("meta").map_err(any)?, t.get("data").map_err(any)?) else {
                return Ok(None);
            };
            let meta: SnapshotMeta<u64, BasicNode> = serde_json::from_slice(m.value()).map_err(any)?;
            Ok(Some(Snapshot {
                meta,
                snapshot: Box::new(Cursor::new(d.value().to_vec())),
            }))
        })()
        .map_err(super::sio::read_state_machine)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, EntryPayload};
    use sdn_policies::*;

    /// What the state machine applied, a new one opened on the same
    /// database loads back: the objects, their relations (a port's VPC
    /// comes from its subnet, which the store lists after it) and the
    /// revision.
    #[tokio::test]
    async fn a_reopened_store_loads_the_state_it_applied() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Database::create(dir.path().join("s.redb")).unwrap());
        let open = |db: Arc<Database>| async move {
            let shared = Arc::new(RwLock::new(Shared::default()));
            let sm = StateMachine::open(db, shared.clone(), watch::channel(0).0)
                .await
                .unwrap();
            (sm, shared)
        };
        let (mut sm, shared) = open(db.clone()).await;
        let ops = vec![
            Op::PutTenant(Tenant {
                id: "t".into(),
                name: "t".into(),
            }),
            Op::PutVpc(Vpc {
                id: "v".into(),
                tenant_id: "t".into(),
                name: "v".into(),
                vni: 0,
                zone_id: String::new(),
                border_policy_id: String::new(),
            }),
            Op::PutSubnet(Subnet {
                id: "s".into(),
                vpc_id: "v".into(),
                cidr_v4: Some("10.0.0.0/24".parse().unwrap()),
                cidr_v6: None,
            }),
            Op::PutHost(Host {
                id: "h".into(),
                underlay_ip: "192.0.2.1".parse().unwrap(),
            }),
            Op::PutPort(Port {
                id: "p".into(),
                tenant_id: "t".into(),
                subnet_id: "s".into(),
                host_id: "h".into(),
                device: "tap0".into(),
                mac: "02:00:00:00:00:01".parse().unwrap(),
                ipv4: Some("10.0.0.5".parse().unwrap()),
                ipv6: None,
                security_group_ids: vec![],
                vm_id: String::new(),
            }),
        ];
        let entry = Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), 1),
            payload: EntryPayload::Normal(Proposal {
                commands: vec![Command {
                    actor: "test".into(),
                    time_unix_ms: 0,
                    ops,
                }],
            }),
        };
        let out = sm.apply([entry]).await.unwrap();
        assert_eq!(out[0][0].revision, 1, "{:?}", out[0][0].error);
        let applied = shared.read().await.state.clone();
        assert_eq!(applied.index().port_vpc["p"], "v");
        drop(sm);
        let (_sm, reopened) = open(db).await;
        let r = reopened.read().await;
        assert_eq!(r.revision, 1);
        assert_eq!(r.state, applied, "objects and relations as applied");
        assert_eq!(
            r.shares.host("h").map(|s| s.resources.len()),
            Some(3),
            "port/p, vpc/v and endpoint/p"
        );
    }

    /// An entry of several clients' batches applies each on its own, in
    /// order: each accepted one gets its own revision and audit record, and
    /// a refused one (a subnet of a VPC that does not exist) refuses only
    /// itself, leaving nothing of it in the state or the store.
    #[tokio::test]
    async fn an_entry_of_several_batches_answers_each_on_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Database::create(dir.path().join("s.redb")).unwrap());
        let shared = Arc::new(RwLock::new(Shared::default()));
        let mut sm = StateMachine::open(db.clone(), shared.clone(), watch::channel(0).0)
            .await
            .unwrap();
        let tenant = |id: &str| {
            Op::PutTenant(Tenant {
                id: id.into(),
                name: id.into(),
            })
        };
        let command = |actor: &str, ops: Vec<Op>| Command {
            actor: actor.into(),
            time_unix_ms: 7,
            ops,
        };
        let entry = Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), 1),
            payload: EntryPayload::Normal(Proposal {
                commands: vec![
                    command("a", vec![tenant("t1")]),
                    command(
                        "b",
                        vec![
                            tenant("t2"),
                            Op::PutSubnet(Subnet {
                                id: "s".into(),
                                vpc_id: "missing".into(),
                                cidr_v4: Some("10.0.0.0/24".parse().unwrap()),
                                cidr_v6: None,
                            }),
                        ],
                    ),
                    command("c", vec![tenant("t3")]),
                ],
            }),
        };
        let blank = Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), 2),
            payload: EntryPayload::Blank,
        };
        let out = sm.apply([entry, blank]).await.unwrap();
        assert_eq!(out.len(), 2, "an answer per entry");
        assert!(out[1].is_empty(), "a blank entry answers nothing");
        let revisions: Vec<u64> = out[0].iter().map(|o| o.revision).collect();
        assert_eq!(revisions, [1, 0, 2], "{:?}", out[0]);
        let refused = out[0][1].error.as_ref().expect("the second batch is refused");
        assert!(refused.to_string().contains("missing"), "{refused}");
        assert!(out[0][0].error.is_none() && out[0][2].error.is_none());
        let s = shared.read().await;
        assert_eq!(s.revision, 2);
        let tenants: Vec<&str> = s.state.tenants.keys().map(|k| k.as_str()).collect();
        assert_eq!(tenants, ["t1", "t3"], "nothing of the refused batch");
        drop(s);
        let audit = read_audit(&db, 0, 10).unwrap();
        let who: Vec<(u64, &str)> = audit.iter().map(|r| (r.revision, r.actor.as_str())).collect();
        assert_eq!(who, [(1, "a"), (2, "c")]);
    }
}

#[cfg(test)]
mod chain_tests {
    use super::*;
    use openraft::{CommittedLeaderId, EntryPayload};
    use sdn_policies::*;
    use sdn_proto::audit::Verifier;
    use sdn_proto::v1 as pb;

    struct Sm {
        sm: StateMachine,
        db: Arc<Database>,
        index: u64,
    }

    impl Sm {
        async fn open(db: Arc<Database>, index: u64) -> Sm {
            let shared = Arc::new(RwLock::new(Shared::default()));
            let sm = StateMachine::open(db.clone(), shared, watch::channel(0).0)
                .await
                .unwrap();
            Sm { sm, db, index }
        }

        async fn apply(&mut self, actor: &str, ops: Vec<Op>) -> Outcome {
            let time = if actor.starts_with(audit::INTERNAL_PREFIX) {
                audit::INTERNAL_TIME
            } else {
                1_000 + self.index
            };
            self.apply_at(actor, ops, time).await
        }

        async fn apply_at(&mut self, actor: &str, ops: Vec<Op>, time_unix_ms: u64) -> Outcome {
            self.index += 1;
            let entry = Entry {
                log_id: LogId::new(CommittedLeaderId::new(1, 1), self.index),
                payload: EntryPayload::Normal(Proposal {
                    commands: vec![Command {
                        actor: actor.into(),
                        time_unix_ms,
                        ops,
                    }],
                }),
            };
            self.sm.apply([entry]).await.unwrap().remove(0).remove(0)
        }

        async fn tenant(&mut self, id: &str) -> Outcome {
            let op = Op::PutTenant(Tenant {
                id: id.into(),
                name: id.into(),
            });
            self.apply("sdn://platform/p", vec![op]).await
        }

        /// The log as `Audit` answers it, checked by the verifier.
        async fn verify(&self) -> Result<sdn_proto::audit::Verified, String> {
            let all = PageLimits {
                records: usize::MAX,
                scanned: usize::MAX,
                bytes: usize::MAX,
            };
            let AuditPage {
                records,
                chain,
                head_revision: head,
                ..
            } = read_audit_page(&self.db, 0, all, Some).unwrap();
            let c = chain.clone().unwrap_or_default();
            let page = pb::AuditResponse {
                records: records.iter().map(|r| r.to_pb()).collect(),
                chained: chain.is_some(),
                chain_start: c.start,
                anchor_revision: c.anchor_revision,
                anchor_hash: audit::unhex(&c.anchor_hash),
                head_revision: head,
                partial: false,
                next_after: head,
            };
            let mut v = Verifier::new(&page)?;
            for r in &page.records {
                v.push(r).map_err(|e| e.to_string())?;
            }
            v.finish(head).map_err(|e| e.to_string())
        }
    }

    /// Records before the chain's start stay unchained; from its entry on,
    /// every record (refusals included) chains to the one before. Trimming
    /// moves the anchor, and the chain still verifies; a reopened store and
    /// a replica installing a snapshot carry on the same chain.
    #[tokio::test]
    async fn the_chain_starts_at_its_entry_survives_trimming_and_travels_in_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Database::create(dir.path().join("s.redb")).unwrap());
        let mut sm = Sm::open(db.clone(), 0).await;
        sm.tenant("before").await;
        assert!(sm.verify().await.unwrap_err().contains("not started"));
        let start = Internal::StartChain { form: audit::FORM }.to_actor();
        let o = sm.apply(&start, vec![]).await;
        assert_eq!(
            (o.revision, o.error.is_none()),
            (0, true),
            "the start takes no revision"
        );
        sm.tenant("t1").await;
        // Starting again changes nothing.
        sm.apply(&start, vec![]).await;
        let refused = Internal::Refused {
            refusals: vec![audit::Refusal {
                actor: "sdn://tenant/acme/eve".into(),
                role: "tenant".into(),
                reason: "Apply: not allowed".into(),
                time_unix_ms: 9,
                tenant: "acme".into(),
                count: 1,
            }],
            suppressed: 4,
        };
        let o = sm.apply(&refused.to_actor(), vec![]).await;
        assert_eq!(o.revision, 3);
        sm.tenant("t2").await;
        let v = sm.verify().await.unwrap();
        assert_eq!((v.unchained, v.chained, v.first, v.last), (1, 3, 2, 4));
        let records = read_audit(&db, 0, 10).unwrap();
        assert!(records[0].hash.is_empty(), "the record before the start");
        assert!(records[2].refused.contains("4 more refusals"), "{:?}", records[2]);
        assert_eq!(records[2].tenants, ["acme"]);
        assert_eq!(records[1].content[0].op, "create");
        assert_eq!(records[1].tenants, ["t1"]);

        // Trim to the last two records: the anchor is the last trimmed.
        sm.sm.audit_keep = 2;
        sm.tenant("t3").await;
        let kept = read_audit(&db, 0, 10).unwrap();
        assert_eq!(kept.iter().map(|r| r.revision).collect::<Vec<_>>(), [4, 5]);
        let chain = sm.sm.shared.read().await.chain.clone().unwrap();
        assert_eq!(chain.anchor_revision, 3);
        assert_eq!(chain.anchor_hash, records[2].hash);
        let v = sm.verify().await.unwrap();
        assert_eq!((v.chained, v.first, v.last), (2, 4, 5));

        // A reopened store carries on.
        let index = sm.index;
        drop(sm);
        let mut sm = Sm::open(db.clone(), index).await;
        sm.tenant("t4").await;
        sm.verify().await.unwrap();
        let head = sm.sm.shared.read().await.chain.clone().unwrap().head;

        // A snapshot installed elsewhere holds the same chain.
        let snap = sm.sm.build_snapshot().await.unwrap();
        let dir2 = tempfile::tempdir().unwrap();
        let db2 = Arc::new(Database::create(dir2.path().join("s.redb")).unwrap());
        let mut other = Sm::open(db2, 0).await;
        other.sm.install_snapshot(&snap.meta, snap.snapshot).await.unwrap();
        other.index = sm.index;
        assert_eq!(other.sm.shared.read().await.chain.clone().unwrap().head, head);
        other.tenant("t5").await;
        sm.tenant("t5").await;
        assert_eq!(
            other.sm.shared.read().await.chain.clone().unwrap().head,
            sm.sm.shared.read().await.chain.clone().unwrap().head,
            "both replicas chain the next record alike"
        );
        other.verify().await.unwrap();

        // A record altered on disk is found, by revision.
        {
            let tx = db.begin_write().unwrap();
            {
                let mut t = tx.open_table(AUDIT).unwrap();
                let mut r: AuditRecord = serde_json::from_slice(t.get(6).unwrap().unwrap().value()).unwrap();
                r.actor = "sdn://admin/someone-else".into();
                t.insert(6, serde_json::to_vec(&r).unwrap().as_slice()).unwrap();
            }
            tx.commit().unwrap();
        }
        let e = sm.verify().await.unwrap_err();
        assert!(e.contains("revision 6") && e.contains("altered"), "{e}");
    }

    /// A client cannot have its batch taken for one of the store's own
    /// commands: not with operations, and not without, as an earlier
    /// release let an unauthenticated client name itself anything (its
    /// batch has the leader's time).
    #[tokio::test]
    async fn an_internal_looking_actor_is_a_batch_like_any() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Database::create(dir.path().join("s.redb")).unwrap());
        let mut sm = Sm::open(db.clone(), 0).await;
        let start = Internal::StartChain { form: audit::FORM }.to_actor();
        let op = Op::PutTenant(Tenant {
            id: "x".into(),
            name: "x".into(),
        });
        let o = sm.apply_at(&start, vec![op], audit::INTERNAL_TIME).await;
        assert_eq!(o.revision, 1);
        let o = sm.apply_at(&start, vec![], 1_764_979_200_000).await;
        assert!(o.error.is_some(), "an empty batch of a client is refused: {o:?}");
        assert!(sm.sm.shared.read().await.chain.is_none());
    }
}
