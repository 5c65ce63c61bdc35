//! The Raft log on redb: entries keyed by index, plus the vote and the last
//! purged log id.
//!
//! Appends, the vote, truncation and purges are durable transactions: the
//! one fsync of a write is the append's. The state machine's apply commits
//! without one: the next durable commit of the same database makes it
//! durable, and after a crash the state machine replays from the log what
//! it lost. The committed log id is not stored: it would cost a commit on
//! every replica each time it moves, and it is only a hint (the leader
//! tells it again, and a replica applies from its state machine's last
//! applied entry).
//!
//! Entries are stored in a compact binary encoding (postcard) behind a
//! format byte. Entries of earlier releases, one batch each, in binary or
//! JSON, are still read, as entries of one batch.

use std::fmt::Debug;
use std::ops::RangeBounds;
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{AnyError, Entry, LogId, OptionalSend, RaftLogReader, StorageError, Vote};
use redb::{Database, ReadableTable, TableDefinition};

use super::{entry_from_v1, TypeConfig, V1};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");

const VOTE: &str = "vote";
const PURGED: &str = "last_purged";

type SErr = StorageError<u64>;

/// The format byte of a binary entry of one batch (earlier releases; JSON
/// entries, earlier still, start with `{`).
const BINARY_V1: u8 = 1;
/// The format byte of a binary entry that may carry several batches.
const BATCHED: u8 = 2;

/// An entry as stored: in the earlier form when it has one, so that an
/// earlier release reads back a log until it holds an entry of several
/// batches.
pub fn encode_entry(e: &Entry<TypeConfig>) -> Result<Vec<u8>, AnyError> {
    let out = match super::entry_to_v1(e) {
        Some(v1) => postcard::to_io(&v1, vec![BINARY_V1]),
        None => postcard::to_io(e, vec![BATCHED]),
    };
    out.map_err(any)
}

/// A stored entry, in this release's form or an earlier one's.
pub fn decode_entry(bytes: &[u8]) -> Result<Entry<TypeConfig>, AnyError> {
    match bytes.first() {
        Some(&BATCHED) => postcard::from_bytes(&bytes[1..]).map_err(any),
        Some(&BINARY_V1) => Ok(entry_from_v1(
            postcard::from_bytes::<Entry<V1>>(&bytes[1..]).map_err(any)?,
        )),
        Some(b'{') => Ok(entry_from_v1(serde_json::from_slice::<Entry<V1>>(bytes).map_err(any)?)),
        _ => Err(AnyError::error(format!(
            "a stored log entry of {} bytes in an unknown format",
            bytes.len()
        ))),
    }
}

fn any<E: std::error::Error + 'static>(e: E) -> AnyError {
    AnyError::new(&e)
}

/// The log store. Cloning shares the database.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl LogStore {
    pub fn open(db: Arc<Database>) -> Result<Self, AnyError> {
        let tx = db.begin_write().map_err(any)?;
        tx.open_table(LOG).map_err(any)?;
        tx.open_table(META).map_err(any)?;
        tx.commit().map_err(any)?;
        Ok(LogStore { db })
    }

    /// The index of the last entry in the log, if any.
    pub fn last_index(&self) -> Result<Option<u64>, AnyError> {
        let tx = self.db.begin_read().map_err(any)?;
        let t = tx.open_table(LOG).map_err(any)?;
        let last = t.last().map_err(any)?;
        Ok(last.map(|(k, _)| k.value()))
    }

    fn get_meta<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>, AnyError> {
        let tx = self.db.begin_read().map_err(any)?;
        let t = tx.open_table(META).map_err(any)?;
        match t.get(key).map_err(any)? {
            None => Ok(None),
            Some(v) => Ok(Some(serde_json::from_slice(v.value()).map_err(any)?)),
        }
    }

    fn put_meta<T: serde::Serialize>(&self, key: &str, v: &T) -> Result<(), AnyError> {
        let bytes = serde_json::to_vec(v).map_err(any)?;
        let tx = self.db.begin_write().map_err(any)?;
        {
            let mut t = tx.open_table(META).map_err(any)?;
            t.insert(key, bytes.as_slice()).map_err(any)?;
        }
        tx.commit().map_err(any)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, SErr> {
        let read = || -> Result<Vec<Entry<TypeConfig>>, AnyError> {
            let tx = self.db.begin_read().map_err(any)?;
            let t = tx.open_table(LOG).map_err(any)?;
            let mut out = Vec::new();
            for item in t.range(range.clone()).map_err(any)? {
                let (_, v) = item.map_err(any)?;
                out.push(decode_entry(v.value())?);
            }
            Ok(out)
        };
        read().map_err(super::sio::read_logs)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, SErr> {
        let last_purged: Option<LogId<u64>> = self.get_meta(PURGED).map_err(super::sio::read_logs)?;
        let last = (|| -> Result<Option<LogId<u64>>, AnyError> {
            let tx = self.db.begin_read().map_err(any)?;
            let t = tx.open_table(LOG).map_err(any)?;
            let last = t.last().map_err(any)?;
            let r = match last {
                None => None,
                Some((_, v)) => Some(decode_entry(v.value())?.log_id),
            };
            Ok(r)
        })()
        .map_err(super::sio::read_logs)?;
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last.or(last_purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), SErr> {
        self.put_meta(VOTE, vote).map_err(super::sio::write_vote)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, SErr> {
        self.get_meta(VOTE).map_err(super::sio::read_vote)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let res = (|| -> Result<(), AnyError> {
            let tx = self.db.begin_write().map_err(any)?;
            {
                let mut t = tx.open_table(LOG).map_err(any)?;
                for e in entries {
                    let bytes = encode_entry(&e)?;
                    t.insert(e.log_id.index, bytes.as_slice()).map_err(any)?;
                }
            }
            tx.commit().map_err(any)
        })();
        match res {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(super::sio::write_logs(e))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<(), SErr> {
        (|| -> Result<(), AnyError> {
            let tx = self.db.begin_write().map_err(any)?;
            {
                let mut t = tx.open_table(LOG).map_err(any)?;
                t.retain_in(log_id.index.., |_, _| false).map_err(any)?;
            }
            tx.commit().map_err(any)
        })()
        .map_err(super::sio::write_logs)
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<(), SErr> {
        (|| -> Result<(), AnyError> {
            let bytes = serde_json::to_vec(&log_id).map_err(any)?;
            let tx = self.db.begin_write().map_err(any)?;
            {
                let mut m = tx.open_table(META).map_err(any)?;
                m.insert(PURGED, bytes.as_slice()).map_err(any)?;
                let mut t = tx.open_table(LOG).map_err(any)?;
                t.retain_in(..=log_id.index, |_, _| false).map_err(any)?;
            }
            tx.commit().map_err(any)
        })()
        .map_err(super::sio::write_logs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{entry_to_v1, Command, Proposal};
    use openraft::{CommittedLeaderId, EntryPayload};
    use sdn_policies::{Kind, Op, Tenant};

    fn command(actor: &str) -> Command {
        Command {
            actor: actor.into(),
            time_unix_ms: 1_700_000_000_000,
            ops: vec![
                Op::PutTenant(Tenant {
                    id: "t".into(),
                    name: "Dept".into(),
                }),
                Op::Delete {
                    kind: Kind::Port,
                    id: "p".into(),
                },
            ],
        }
    }

    fn entry() -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(3, 1), 42),
            payload: EntryPayload::Normal(Proposal {
                commands: vec![command("platform")],
            }),
        }
    }

    /// Entries round-trip in the binary form, smaller than JSON. Entries of
    /// earlier releases, one batch each, read as entries of one batch,
    /// whether binary or JSON; anything else is refused.
    #[test]
    fn entries_are_binary_and_earlier_entries_still_read() {
        let e = entry();
        let bin = encode_entry(&e).unwrap();
        let json = serde_json::to_vec(&e).unwrap();
        assert!(
            bin.len() < json.len() / 2,
            "{} bytes against {} as JSON",
            bin.len(),
            json.len()
        );
        assert_eq!(bin[0], BINARY_V1, "one batch: in the earlier form");
        assert_eq!(decode_entry(&bin).unwrap(), e);
        let v1 = entry_to_v1(&e).expect("one batch has the earlier form");
        let mut v1_bin = vec![BINARY_V1];
        postcard::to_io(&v1, &mut v1_bin).unwrap();
        assert_eq!(decode_entry(&v1_bin).unwrap(), e, "an earlier binary entry");
        let v1_json = serde_json::to_vec(&v1).unwrap();
        assert_eq!(decode_entry(&v1_json).unwrap(), e, "an earlier JSON entry");
        // Several batches: this form only.
        let mut several = entry();
        several.payload = EntryPayload::Normal(Proposal {
            commands: vec![command("a"), command("b")],
        });
        assert!(entry_to_v1(&several).is_none());
        let stored = encode_entry(&several).unwrap();
        assert_eq!(stored[0], BATCHED);
        assert_eq!(decode_entry(&stored).unwrap(), several);
        assert!(decode_entry(&[7, 1, 2]).is_err());
        assert!(decode_entry(&[]).is_err());
        assert!(
            decode_entry(&bin[..bin.len() - 3]).is_err(),
            "a truncated entry is refused"
        );
    }

    /// Every kind of operation round-trips in the binary form: the example
    /// cloud's manifests, as one entry, plus a quarantine.
    #[test]
    fn every_kind_of_operation_round_trips() {
        let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/examples");
        let mut ops: Vec<Op> = sdn_policies::manifest::load_path(&examples)
            .unwrap()
            .into_iter()
            .map(|l| l.op)
            .collect();
        ops.push(Op::PutQuarantine(sdn_policies::Quarantine {
            id: "q".into(),
            target: sdn_policies::QuarantineTarget::Vm,
            target_id: "vm-1".into(),
            reason: "incident 7".into(),
            expires_unix_ms: Some(1_800_000_000_000),
        }));
        let kinds: std::collections::BTreeSet<Kind> = ops.iter().map(|o| o.key().0).collect();
        assert!(kinds.len() >= 9, "the examples cover most kinds: {kinds:?}");
        let mut e = entry();
        e.payload = EntryPayload::Normal(Proposal {
            commands: vec![Command {
                actor: "platform".into(),
                time_unix_ms: 1,
                ops,
            }],
        });
        assert_eq!(decode_entry(&encode_entry(&e).unwrap()).unwrap(), e);
    }
}
