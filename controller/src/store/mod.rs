//! The replicated store: an openraft log and state machine on redb.
//!
//! One node is the embedded default: a one-member Raft cluster, the same code
//! path as a real cluster. The state machine holds the network model
//! (`sdn_policies::State`), the revision, and the audit log.

pub mod audit;
mod log_store;
pub mod network;
mod proposer;
mod state_machine;

use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use openraft::{BasicNode, Config, Entry, EntryPayload, Raft};
use redb::{Database, ReadableTable};
use sdn_policies::{BatchError, Op, State};
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, RwLock};

pub use audit::AuditRecord;

/// A batch of operations as it travels through the Raft log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// Who asked (audit).
    pub actor: String,
    /// When the leader accepted it, Unix ms (audit; chosen before the
    /// proposal so every replica records the same time).
    pub time_unix_ms: u64,
    pub ops: Vec<Op>,
}

/// What one log entry carries: the batches of one or more clients, queued
/// while the entry before them was being committed. Each applies on its own,
/// in order, with its own revision, audit record and answer: one refused
/// batch refuses nothing else.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    pub commands: Vec<Command>,
}

/// What applying a command did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// The revision the command created; 0 when refused.
    pub revision: u64,
    /// Hosts whose share of the state changed.
    pub hosts: Vec<String>,
    /// Why the state machine refused the batch.
    pub error: Option<BatchError>,
}

openraft::declare_raft_types!(
    /// The controller's Raft type configuration.
    pub TypeConfig:
        D = Proposal,
        R = Vec<Outcome>,
        NodeId = u64,
        Node = BasicNode,
);

openraft::declare_raft_types!(
    /// The log entries of earlier releases: one client's batch per entry.
    /// They are read from disk and from peers of those releases, and
    /// written to such peers while any is a member.
    pub V1:
        D = Command,
        R = Outcome,
        NodeId = u64,
        Node = BasicNode,
);

/// An entry of an earlier release in this release's form.
pub fn entry_from_v1(e: Entry<V1>) -> Entry<TypeConfig> {
    Entry {
        log_id: e.log_id,
        payload: match e.payload {
            EntryPayload::Blank => EntryPayload::Blank,
            EntryPayload::Normal(c) => EntryPayload::Normal(Proposal { commands: vec![c] }),
            EntryPayload::Membership(m) => EntryPayload::Membership(m),
        },
    }
}

/// An entry in the form of earlier releases, when it has one: an entry
/// carrying several clients' batches has none.
pub fn entry_to_v1(e: &Entry<TypeConfig>) -> Option<Entry<V1>> {
    Some(Entry {
        log_id: e.log_id,
        payload: match &e.payload {
            EntryPayload::Blank => EntryPayload::Blank,
            EntryPayload::Normal(p) => match p.commands.as_slice() {
                [c] => EntryPayload::Normal(c.clone()),
                _ => return None,
            },
            EntryPayload::Membership(m) => EntryPayload::Membership(m.clone()),
        },
    })
}

/// The state the controller serves, shared with the state machine.
#[derive(Default)]
pub struct Shared {
    pub state: State,
    pub revision: u64,
    /// Every host's share, kept current by each applied batch.
    pub shares: crate::shares::Shares,
    /// The audit chain, once started.
    pub chain: Option<audit::Chain>,
}

/// The store handle used by the API services.
#[derive(Clone)]
pub struct Store {
    pub raft: Raft<TypeConfig>,
    pub shared: Arc<RwLock<Shared>>,
    /// Carries the latest revision; the watch fan-out waits on it.
    pub revisions: watch::Receiver<u64>,
    /// This replica's node id.
    pub node_id: u64,
    /// The cluster this replica belongs to (None until it joins one).
    pub cluster_id: network::ClusterId,
    db: Arc<Database>,
    /// The last log index when this replica started. Its state machine's
    /// commits have no fsync of their own, so after a crash it may lag the
    /// writes it acknowledged, and a replica that led before the crash
    /// leads again at once, in the same term, with a commit index as stale
    /// as its state. Linearizable reads wait until the state machine has
    /// applied this far: every acknowledged write is at or below it.
    startup_tail: u64,
    /// Writes on their way into log entries.
    proposals: tokio::sync::mpsc::Sender<proposer::Pending>,
    /// The operations each peer reads (see [`Store::members_read`]).
    peer_ops: network::PeerOps,
}

/// Writes waiting for a log entry, at most; a writer beyond them waits.
const PROPOSALS_QUEUED_MAX: usize = 4096;

/// Why a write failed.
#[derive(Clone, Debug, thiserror::Error)]
pub enum WriteError {
    #[error("{0}")]
    Invalid(BatchError),
    /// This replica is not the leader; the leader's address when known.
    #[error("not the leader")]
    NotLeader(Option<String>),
    #[error("the store cannot commit: {0}")]
    Raft(String),
}

/// What a failed Raft call tells the caller: where the leader is, when
/// this replica is not it.
fn raft_error<E>(e: openraft::error::RaftError<u64, E>) -> WriteError
where
    E: openraft::TryAsRef<openraft::error::ForwardToLeader<u64, BasicNode>> + std::fmt::Display + std::fmt::Debug,
{
    match e.forward_to_leader() {
        Some(f) => WriteError::NotLeader(f.leader_node.as_ref().map(|n: &BasicNode| n.addr.clone())),
        None => WriteError::Raft(e.to_string()),
    }
}

/// How a replica starts when its data directory holds no cluster yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// Become a one-member cluster (the embedded default, or the first
    /// replica of a new cluster).
    Bootstrap,
    /// Wait to be added to an existing cluster as a learner.
    Join,
}

const CLUSTER_META: redb::TableDefinition<&str, &str> = redb::TableDefinition::new("cluster");

fn new_cluster_id(node_id: u64) -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let seed = format!("{t}-{}-{node_id}", std::process::id());
    format!("{:016x}", crate::slice::fnv1a(seed.as_bytes()))
}

impl Store {
    /// Opens (or creates) the store in `dir` and starts the Raft node, which
    /// takes a snapshot every `snapshot_every` log entries.
    pub async fn open(
        dir: &Path,
        node_id: u64,
        addr: &str,
        start: Start,
        snapshot_every: u64,
    ) -> anyhow::Result<Store> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating data directory {}", dir.display()))?;
        let path = dir.join("store.redb");
        let db = Arc::new(Database::create(&path).with_context(|| format!("opening {}", path.display()))?);
        let stored_id = {
            let tx = db.begin_write()?;
            let id = {
                let t = tx.open_table(CLUSTER_META)?;
                let node = t.get("node_id")?.map(|v| v.value().to_string());
                if let Some(n) = node {
                    if n != node_id.to_string() {
                        anyhow::bail!(
                            "{} holds the data of node {n}, not node {node_id}; start with --node-id {n} or use another --data-dir",
                            dir.display()
                        );
                    }
                }
                let id = t.get("cluster_id")?.map(|v| v.value().to_string());
                id
            };
            {
                let mut t = tx.open_table(CLUSTER_META)?;
                t.insert("node_id", node_id.to_string().as_str())?;
            }
            tx.commit()?;
            id
        };
        let cluster_id: network::ClusterId = Arc::new(std::sync::RwLock::new(stored_id.clone()));
        let (rev_tx, rev_rx) = watch::channel(0);
        let shared = Arc::new(RwLock::new(Shared::default()));
        let log = log_store::LogStore::open(db.clone()).map_err(|e| anyhow::anyhow!("opening the Raft log: {e}"))?;
        let startup_tail = log
            .last_index()
            .map_err(|e| anyhow::anyhow!("reading the Raft log: {e}"))?
            .unwrap_or(0);
        let sm = state_machine::StateMachine::open(db.clone(), shared.clone(), rev_tx)
            .await
            .map_err(|e| anyhow::anyhow!("opening the state machine: {e}"))?;
        let config = Config {
            cluster_name: "sdn".into(),
            heartbeat_interval: 100,
            election_timeout_min: 300,
            election_timeout_max: 600,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(snapshot_every),
            max_in_snapshot_log_to_keep: 100,
            // A snapshot goes in chunks of 1 MiB; the last one waits while
            // the follower loads the state (seconds at 100,000 ports).
            snapshot_max_chunk_size: 1 << 20,
            install_snapshot_timeout: 10_000,
            ..Default::default()
        };
        let config = Arc::new(config.validate().context("Raft configuration")?);
        let forms = network::PeerForms::default();
        let chains = network::PeerForms::default();
        let ops = network::PeerOps::default();
        let net = network::Network {
            cluster_id: cluster_id.clone(),
            forms: forms.clone(),
            chains: chains.clone(),
            ops: ops.clone(),
        };
        let raft = Raft::new(node_id, config, net, log, sm)
            .await
            .context("starting Raft")?;
        let (proposals, queue) = tokio::sync::mpsc::channel(PROPOSALS_QUEUED_MAX);
        tokio::spawn(proposer::run(raft.clone(), node_id, forms, queue));
        let store = Store {
            raft,
            shared,
            revisions: rev_rx,
            node_id,
            cluster_id,
            db,
            startup_tail,
            proposals,
            peer_ops: ops,
        };
        if !store.raft.is_initialized().await.context("reading Raft state")? {
            match start {
                Start::Bootstrap => {
                    let id = stored_id.unwrap_or_else(|| new_cluster_id(node_id));
                    store.set_cluster_id(&id)?;
                    let mut members = std::collections::BTreeMap::new();
                    members.insert(node_id, BasicNode { addr: addr.to_string() });
                    store
                        .raft
                        .initialize(members)
                        .await
                        .context("initialising the one-member cluster")?;
                    tracing::info!(node_id, cluster_id = %id, "bootstrapped a new cluster");
                }
                Start::Join => tracing::info!(node_id, "waiting to be added to a cluster"),
            }
        } else {
            tracing::info!(node_id, cluster_id = ?store.cluster_id(), "rejoined the cluster from the data directory");
        }
        tokio::spawn(start_chain_when_every_member_keeps_it(store.clone(), chains));
        Ok(store)
    }

    /// The cluster id, once known.
    pub fn cluster_id(&self) -> Option<String> {
        self.cluster_id.read().expect("cluster id lock").clone()
    }

    /// Records the cluster this replica belongs to (durably).
    pub fn set_cluster_id(&self, id: &str) -> anyhow::Result<()> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(CLUSTER_META)?;
            t.insert("cluster_id", id)?;
        }
        tx.commit()?;
        *self.cluster_id.write().expect("cluster id lock") = Some(id.to_string());
        Ok(())
    }

    /// The current leader's id and address, as this replica knows them.
    pub fn leader(&self) -> Option<(u64, String)> {
        let m = self.raft.metrics().borrow().clone();
        let id = m.current_leader?;
        let addr = m.membership_config.membership().get_node(&id).map(|n| n.addr.clone())?;
        Some((id, addr))
    }

    /// Whether this replica leads and a quorum acknowledged it lately:
    /// within `within`, or it is the only voter. A leader cut off from the
    /// others goes on believing it leads until it hears a higher term;
    /// this says when its word may no longer be the cluster's.
    pub fn quorum_fresh(&self, within: std::time::Duration) -> bool {
        let m = self.raft.metrics().borrow().clone();
        if m.current_leader != Some(self.node_id) {
            return false;
        }
        let voters = m.membership_config.membership().voter_ids().count();
        voters <= 1
            || m.millis_since_quorum_ack
                .is_some_and(|ms| u128::from(ms) < within.as_millis())
    }

    /// The Raft term this replica is in.
    pub fn term(&self) -> u64 {
        self.raft.metrics().borrow().current_term
    }

    /// Whether this replica is the leader.
    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().current_leader == Some(self.node_id)
    }

    /// Proposes a batch and waits until it is committed and applied.
    pub async fn write(&self, actor: &str, ops: Vec<Op>) -> Result<Outcome, WriteError> {
        // An actor that looks like the store's own commands is taken for
        // what someone says, never for one of them.
        let actor = if actor.starts_with(audit::INTERNAL_PREFIX) {
            format!("unverified {actor}")
        } else {
            actor.to_string()
        };
        self.propose(actor, ops, None).await
    }

    /// Proposes one of the store's own commands.
    pub async fn write_internal(&self, internal: &audit::Internal) -> Result<Outcome, WriteError> {
        self.propose(internal.to_actor(), vec![], Some(audit::INTERNAL_TIME))
            .await
    }

    /// The first operation of `ops` that some member cannot read (a kind
    /// its release does not know): it would stall that member's log.
    fn unreadable_by_members<'a>(&self, ops: &'a [Op]) -> Option<(usize, &'a Op, u64)> {
        // The operation that needs the most of a reader.
        let (i, op) = ops.iter().enumerate().max_by_key(|(_, o)| o.log_index())?;
        let needs = op.log_index();
        if needs <= sdn_policies::DELETE_LOG_INDEX {
            return None;
        }
        let peers = self.peer_ops.read().expect("peer ops lock");
        proposer::member_ids(&self.raft)
            .into_iter()
            .filter(|id| *id != self.node_id)
            .find(|id| peers.get(id).copied().unwrap_or(sdn_policies::DELETE_LOG_INDEX) < needs)
            .map(|id| (i, op, id))
    }

    async fn propose(&self, actor: String, ops: Vec<Op>, time: Option<u64>) -> Result<Outcome, WriteError> {
        // A follower hands the batch to the leader.
        if !self.is_leader() {
            if let Some((_, addr)) = self.leader() {
                return Err(WriteError::NotLeader(Some(addr)));
            }
        }
        if self.is_leader() {
            if let Some((index, op, member)) = self.unreadable_by_members(&ops) {
                return Err(WriteError::Invalid(sdn_policies::state::BatchError {
                    index,
                    field: format!("operations[{index}].{}", op.field()),
                    message: format!(
                        "replica {member} runs a release that does not know {}s: upgrade every replica first",
                        op.key().0.name()
                    ),
                }));
            }
        }
        // Validated once, by the state machine as it applies the entry,
        // against the state the log order gives: a refused batch leaves a
        // log entry that changes nothing, and its error comes back here.
        let time_unix_ms = time.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0)
        });
        let command = Command {
            actor,
            time_unix_ms,
            ops,
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.proposals
            .send(proposer::Pending { command, reply })
            .await
            .map_err(|_| WriteError::Raft("the store is shutting down".into()))?;
        let outcome = answer
            .await
            .map_err(|_| WriteError::Raft("the store stopped before the write's outcome was known".into()))??;
        if let Some(e) = outcome.error.clone() {
            return Err(WriteError::Invalid(e));
        }
        Ok(outcome)
    }

    /// Waits until reads on this node see every write committed before the call.
    pub async fn linearizable(&self) -> Result<(), WriteError> {
        self.raft.ensure_linearizable().await.map_err(raft_error)?;
        let applied = self.raft.metrics().borrow().last_applied.map(|l| l.index).unwrap_or(0);
        if applied < self.startup_tail {
            self.raft
                .wait(Some(std::time::Duration::from_secs(5)))
                .applied_index_at_least(Some(self.startup_tail), "the log found at start")
                .await
                .map_err(|e| {
                    WriteError::Raft(format!(
                        "this replica has not yet applied the log it restarted with ({e}); retry"
                    ))
                })?;
        }
        Ok(())
    }

    /// Makes every commit so far durable (the state machine's commits have
    /// no fsync of their own).
    pub fn flush(&self) -> anyhow::Result<()> {
        let tx = self.db.begin_write()?;
        tx.commit()?;
        Ok(())
    }

    /// Audit records with a revision above `after` that `keep` returns,
    /// within `limits`, with the chain they belong to. Read in a
    /// transaction of its own, off the async workers, and without the
    /// served state's lock: a long read holds up no write.
    pub async fn audit(
        &self,
        after: u64,
        limits: state_machine::PageLimits,
        keep: impl FnMut(AuditRecord) -> Option<AuditRecord> + Send + 'static,
    ) -> anyhow::Result<AuditPage> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || state_machine::read_audit_page(&db, after, limits, keep)).await?
    }
}

pub use state_machine::{AuditPage, PageLimits};

/// Has the leader start the audit chain once every member has said it
/// keeps it, which fixes the chain's start in the log: every replica
/// starts it at the same entry. Ends once this replica's chain started.
async fn start_chain_when_every_member_keeps_it(store: Store, chains: network::PeerForms) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(200));
    let mut waited = 0u32;
    loop {
        tick.tick().await;
        if store.shared.read().await.chain.is_some() {
            return;
        }
        if !store.is_leader() {
            continue;
        }
        if !proposer::all_members(&store.raft, store.node_id, &chains) {
            waited += 1;
            if waited % 300 == 1 {
                tracing::info!("the audit chain waits until every member runs a release that keeps it");
            }
            continue;
        }
        match store
            .write_internal(&audit::Internal::StartChain { form: audit::FORM })
            .await
        {
            Ok(_) => {}
            Err(e) => tracing::warn!("starting the audit chain: {e}"),
        }
    }
}

/// Storage error constructors in the shape openraft expects.
pub(crate) mod sio {
    use openraft::{AnyError, StorageError, StorageIOError};

    pub fn read_logs(e: AnyError) -> StorageError<u64> {
        StorageIOError::read_logs(e).into()
    }
    pub fn write_logs(e: AnyError) -> StorageError<u64> {
        StorageIOError::write_logs(e).into()
    }
    pub fn read_vote(e: AnyError) -> StorageError<u64> {
        StorageIOError::read_vote(e).into()
    }
    pub fn write_vote(e: AnyError) -> StorageError<u64> {
        StorageIOError::write_vote(e).into()
    }
    pub fn read_state_machine(e: AnyError) -> StorageError<u64> {
        StorageIOError::read_state_machine(e).into()
    }
    pub fn write_state_machine(e: AnyError) -> StorageError<u64> {
        StorageIOError::write_state_machine(e).into()
    }
}
