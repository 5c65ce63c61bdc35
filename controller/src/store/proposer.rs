//! Proposals: the clients' batches, put into log entries.
//!
//! openraft appends each proposal as its own entry, with a durable commit
//! of its own on every replica. Under load that is one fsync per client
//! write, in series. Here the writes that arrive while earlier entries are
//! being committed wait in a queue, and the next entry carries all of them
//! (as etcd puts every proposal waiting in its queue into one WAL write):
//! one append, one fsync on each replica and one round of replication for
//! many writes. A write alone waits for nothing.
//!
//! An entry of several batches is a form that earlier releases cannot read,
//! so the leader makes one only while every member has said it reads that
//! form (see [`super::network::PeerForms`]). Until then each write is an
//! entry of its own, as before.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use openraft::Raft;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use super::{Command, Outcome, Proposal, TypeConfig, WriteError};

/// Entries of several batches committing at once, at most. One entry in
/// flight lets the queue build up behind it; a second overlaps one entry's
/// apply and answer with the next one's replication.
pub const IN_FLIGHT: usize = 2;

/// Batches one entry carries, at most.
pub const BATCHES_MAX: usize = 512;

/// Bytes of batches one entry carries beyond its first batch, at most (in
/// their binary form): a lagging follower's appends stay bounded.
pub const ENTRY_BYTES_MAX: usize = 1 << 20;

/// How long an entry holds its slot at most. An entry whose answer never
/// comes (openraft 0.9 forgets the writers of entries a snapshot replaced
/// on a replica that led before a partition) must not keep later writes
/// from proposing; its writers still wait for their answer.
pub const SLOT_HELD_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// A client's batch waiting for an entry, and where its answer goes.
pub struct Pending {
    pub command: Command,
    pub reply: oneshot::Sender<Result<Outcome, WriteError>>,
}

/// Whether every other member has said yes in `forms` (it reads entries
/// of several batches, or it keeps the audit chain).
pub(crate) fn all_members(raft: &Raft<TypeConfig>, node_id: u64, forms: &RwLock<BTreeMap<u64, bool>>) -> bool {
    let ids = member_ids(raft);
    let forms = forms.read().expect("peer forms lock");
    ids.iter().all(|id| *id == node_id || forms.get(id) == Some(&true))
}

/// The ids of the cluster's members (voters and learners).
pub(crate) fn member_ids(raft: &Raft<TypeConfig>) -> Vec<u64> {
    raft.metrics()
        .borrow()
        .membership_config
        .membership()
        .nodes()
        .map(|(id, _)| *id)
        .collect()
}

/// Proposes what `queue` receives until every sender is gone.
pub async fn run(
    raft: Raft<TypeConfig>,
    node_id: u64,
    forms: Arc<RwLock<BTreeMap<u64, bool>>>,
    mut queue: mpsc::Receiver<Pending>,
) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut carried: Option<Pending> = None;
    loop {
        let first = match carried.take() {
            Some(p) => p,
            None => match queue.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        if !all_members(&raft, node_id, &forms) {
            // A member may be of an earlier release: one batch per entry,
            // each proposed at once, as that release does.
            tokio::spawn(propose(raft.clone(), vec![first], None));
            continue;
        }
        // Wait for a slot; writes queue up meanwhile and go together.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut batch = vec![first];
        let mut bytes = 0usize;
        while batch.len() < BATCHES_MAX {
            let Ok(p) = queue.try_recv() else { break };
            bytes += postcard::experimental::serialized_size(&p.command).unwrap_or(usize::MAX / 2);
            if bytes > ENTRY_BYTES_MAX {
                carried = Some(p);
                break;
            }
            batch.push(p);
        }
        tokio::spawn(propose(raft.clone(), batch, Some(slot)));
    }
}

/// Proposes `batch` as one entry and gives each writer its answer. `slot`,
/// if any, is held until the entry's answer, at most [`SLOT_HELD_MAX`].
async fn propose(raft: Raft<TypeConfig>, batch: Vec<Pending>, slot: Option<OwnedSemaphorePermit>) {
    let (commands, replies): (Vec<Command>, Vec<_>) = batch.into_iter().map(|p| (p.command, p.reply)).unzip();
    let n = commands.len();
    let write = raft.client_write(Proposal { commands });
    tokio::pin!(write);
    let answer = match slot {
        None => write.await,
        Some(slot) => tokio::select! {
            a = &mut write => a,
            _ = tokio::time::sleep(SLOT_HELD_MAX) => {
                tracing::warn!(batches = n, "an entry is not committed after {SLOT_HELD_MAX:?}; its slot goes to the next");
                drop(slot);
                write.await
            }
        },
    };
    match answer {
        Ok(r) if r.data.len() == n => {
            for (reply, outcome) in replies.into_iter().zip(r.data) {
                let _ = reply.send(Ok(outcome));
            }
        }
        Ok(r) => {
            let e = WriteError::Raft(format!(
                "the store answered {} batches with {} answers",
                n,
                r.data.len()
            ));
            tracing::error!(%e, "a proposal's answers do not match its batches");
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
        Err(e) => {
            let e = super::raft_error(e);
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}
