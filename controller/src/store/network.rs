//! Raft transport between controller replicas: each openraft RPC travels
//! inside the `sdn.v1.Raft` gRPC service, tagged with the cluster id so a
//! replica never takes messages from another cluster. Messages are binary
//! (postcard) once the peer has said it reads them, JSON until then (a
//! replica of an earlier release reads only JSON). One append carries at
//! most [`APPEND_BYTES_MAX`] of entries (at least one entry): a lagging
//! follower catches up in appends that each fit the time an append may
//! take, instead of one append that never does.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::BasicNode;
use sdn_proto::v1 as pb;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::Channel;

use super::TypeConfig;

/// The cluster id shared by the network and the Raft service.
pub type ClusterId = Arc<RwLock<Option<String>>>;

/// Creates a connection per peer.
pub struct Network {
    pub cluster_id: ClusterId,
}

/// Entries one append carries at most, in bytes of their binary form
/// (beyond the first entry, which always goes): openraft gives an append
/// one heartbeat interval (100 ms), the follower's decoding and durable
/// append included.
pub const APPEND_BYTES_MAX: usize = 256 << 10;

/// A Raft message's size limit, both ways: the largest entry (a request
/// of the API's largest size) with room to spare, JSON included.
pub const RAFT_MESSAGE_BYTES_MAX: usize = 64 << 20;

/// A connection to one peer, made on first use and remade after a failure.
pub struct Peer {
    target: u64,
    addr: String,
    client: Option<pb::raft_client::RaftClient<Channel>>,
    cluster_id: ClusterId,
    /// The peer said it reads binary messages.
    binary: bool,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> Self::Network {
        Peer {
            target,
            addr: node.addr.clone(),
            client: None,
            cluster_id: self.cluster_id.clone(),
            binary: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TransportError(String);

enum CallError {
    Unreachable(String),
    Network(String),
}

impl Peer {
    async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &mut self,
        method: &'static str,
        req: &Req,
        ttl: Duration,
    ) -> Result<Resp, CallError> {
        let mut msg = pb::RaftMessage::default();
        put_payload(&mut msg, req, self.binary).map_err(|e| CallError::Network(format!("encoding {method}: {e}")))?;
        let cluster_id = self
            .cluster_id
            .read()
            .expect("cluster id lock")
            .clone()
            .unwrap_or_default();
        if self.client.is_none() {
            let ch = tokio::time::timeout(ttl, sdn_proto::connect(&self.addr))
                .await
                .map_err(|_| {
                    CallError::Unreachable(format!(
                        "connecting to node {} at {}: timed out",
                        self.target, self.addr
                    ))
                })?
                .map_err(|e| {
                    CallError::Unreachable(format!("connecting to node {} at {}: {e}", self.target, self.addr))
                })?;
            self.client = Some(
                pb::raft_client::RaftClient::new(ch)
                    .max_decoding_message_size(RAFT_MESSAGE_BYTES_MAX)
                    .max_encoding_message_size(RAFT_MESSAGE_BYTES_MAX),
            );
        }
        let client = self.client.as_mut().expect("connected");
        msg.cluster_id = cluster_id;
        let fut = async {
            match method {
                "append" => client.append_entries(msg).await,
                "snapshot" => client.install_snapshot(msg).await,
                _ => client.vote(msg).await,
            }
        };
        let resp = match tokio::time::timeout(ttl, fut).await {
            Err(_) => {
                self.client = None;
                return Err(CallError::Unreachable(format!(
                    "{method} to node {} timed out",
                    self.target
                )));
            }
            Ok(Err(status)) => {
                // The peer may have been replaced by an earlier release:
                // JSON again until it says otherwise.
                self.binary = false;
                if status.code() == tonic::Code::Unavailable || status.code() == tonic::Code::Unknown {
                    self.client = None;
                    return Err(CallError::Unreachable(format!(
                        "{method} to node {}: {}",
                        self.target,
                        status.message()
                    )));
                }
                return Err(CallError::Network(format!(
                    "{method} to node {}: {}",
                    self.target,
                    status.message()
                )));
            }
            Ok(Ok(r)) => r.into_inner(),
        };
        self.binary = resp.reads_bin;
        payload(&resp).map_err(|e| CallError::Network(format!("decoding {method} reply: {e}")))
    }
}

/// Writes `v` into a message: binary (`bin`) or JSON (`json`).
pub fn put_payload<T: Serialize>(msg: &mut pb::RaftMessage, v: &T, binary: bool) -> Result<(), String> {
    if binary {
        msg.bin = postcard::to_stdvec(v).map_err(|e| e.to_string())?;
    } else {
        msg.json = serde_json::to_vec(v).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Reads a message's payload in the form it came in, naming the field.
pub fn payload<T: DeserializeOwned>(msg: &pb::RaftMessage) -> Result<T, String> {
    if !msg.bin.is_empty() {
        return postcard::from_bytes(&msg.bin).map_err(|e| format!("bin: not a valid Raft message: {e}"));
    }
    serde_json::from_slice(&msg.json).map_err(|e| format!("json: not a valid Raft message: {e}"))
}

/// Keeps the first entries whose binary form takes at most `max` bytes
/// (the first entry always). Returns the log id of the last kept entry when
/// some were left out, `None` when all fit.
fn fit_entries(entries: &mut Vec<openraft::Entry<TypeConfig>>, max: usize) -> Option<openraft::LogId<u64>> {
    let mut bytes = 0;
    let mut keep = 0;
    for e in entries.iter() {
        bytes += postcard::experimental::serialized_size(e).unwrap_or(usize::MAX / 2);
        if keep > 0 && bytes > max {
            break;
        }
        keep += 1;
    }
    if keep == entries.len() {
        return None;
    }
    entries.truncate(keep);
    entries.last().map(|e| e.log_id)
}

fn rpc_err<E: std::error::Error>(target: u64, e: CallError) -> RPCError<u64, BasicNode, E> {
    let _ = target;
    match e {
        CallError::Unreachable(m) => RPCError::Unreachable(Unreachable::new(&TransportError(m))),
        CallError::Network(m) => RPCError::Network(NetworkError::new(&TransportError(m))),
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        let mut rpc = rpc;
        let sent = fit_entries(&mut rpc.entries, APPEND_BYTES_MAX);
        let r: Result<AppendEntriesResponse<u64>, RaftError<u64>> = self
            .call("append", &rpc, option.hard_ttl())
            .await
            .map_err(|e| rpc_err(self.target, e))?;
        match r {
            // Only the first entries went: say how far the peer matches.
            Ok(AppendEntriesResponse::Success) if sent.is_some() => Ok(AppendEntriesResponse::PartialSuccess(sent)),
            Ok(r) => Ok(r),
            Err(e) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<u64>, RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>> {
        let r: Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>> = self
            .call("snapshot", &rpc, option.hard_ttl())
            .await
            .map_err(|e| rpc_err(self.target, e))?;
        r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        let r: Result<VoteResponse<u64>, RaftError<u64>> = self
            .call("vote", &rpc, option.hard_ttl())
            .await
            .map_err(|e| rpc_err(self.target, e))?;
        r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Command;
    use openraft::error::{Fatal, InstallSnapshotError, SnapshotMismatch};
    use openraft::raft::InstallSnapshotRequest;
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Membership, SnapshotMeta, Vote};
    use sdn_policies::{Op, Tenant};

    fn id(i: u64) -> LogId<u64> {
        LogId::new(CommittedLeaderId::new(2, 1), i)
    }

    fn entry(i: u64, name_bytes: usize) -> Entry<TypeConfig> {
        Entry {
            log_id: id(i),
            payload: EntryPayload::Normal(Command {
                actor: "platform".into(),
                time_unix_ms: 1,
                ops: vec![Op::PutTenant(Tenant {
                    id: format!("t{i}"),
                    name: "x".repeat(name_bytes),
                })],
            }),
        }
    }

    /// What both forms carry reads back the same, for every message and
    /// answer a replica sends, errors included.
    fn round_trip<T: Serialize + DeserializeOwned + std::fmt::Debug>(v: &T) {
        let bin: T = postcard::from_bytes(&postcard::to_stdvec(v).unwrap()).unwrap();
        let json: T = serde_json::from_slice(&serde_json::to_vec(v).unwrap()).unwrap();
        assert_eq!(format!("{bin:?}"), format!("{v:?}"));
        assert_eq!(format!("{json:?}"), format!("{v:?}"));
    }

    #[test]
    fn raft_messages_read_back_in_the_binary_form() {
        let nodes: std::collections::BTreeMap<u64, BasicNode> = (1..=3)
            .map(|n| (n, BasicNode::new(format!("http://10.0.0.{n}:7070"))))
            .collect();
        let membership = Membership::new(vec![nodes.keys().copied().collect()], nodes);
        let vote = Vote::new_committed(2, 1);
        let append = AppendEntriesRequest::<TypeConfig> {
            vote,
            prev_log_id: Some(id(9)),
            leader_commit: Some(id(9)),
            entries: vec![
                Entry {
                    log_id: id(10),
                    payload: EntryPayload::Blank,
                },
                entry(11, 10),
                Entry {
                    log_id: id(12),
                    payload: EntryPayload::Membership(membership.clone()),
                },
            ],
        };
        round_trip(&append);
        round_trip(&VoteRequest::new(Vote::new(3, 2), Some(id(12))));
        round_trip(&InstallSnapshotRequest::<TypeConfig> {
            vote,
            meta: SnapshotMeta {
                last_log_id: Some(id(12)),
                last_membership: openraft::StoredMembership::new(Some(id(12)), membership),
                snapshot_id: "2-1-12-7".into(),
            },
            offset: 1 << 20,
            data: (0..=255u8).collect(),
            done: false,
        });
        let answers: Vec<Result<AppendEntriesResponse<u64>, RaftError<u64>>> = vec![
            Ok(AppendEntriesResponse::Success),
            Ok(AppendEntriesResponse::PartialSuccess(Some(id(11)))),
            Ok(AppendEntriesResponse::Conflict),
            Ok(AppendEntriesResponse::HigherVote(Vote::new(4, 3))),
            Err(RaftError::Fatal(Fatal::Stopped)),
        ];
        for a in &answers {
            round_trip(a);
        }
        round_trip::<Result<VoteResponse<u64>, RaftError<u64>>>(&Ok(VoteResponse::new(vote, Some(id(12)), true)));
        round_trip::<Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>>(&Err(
            RaftError::APIError(InstallSnapshotError::SnapshotMismatch(SnapshotMismatch {
                expect: openraft::SnapshotSegmentId {
                    id: "a".into(),
                    offset: 0,
                },
                got: openraft::SnapshotSegmentId {
                    id: "b".into(),
                    offset: 5,
                },
            })),
        ));
    }

    /// An append carries entries up to the bound (the first one always),
    /// and says how far it went when it left some out.
    #[test]
    fn an_append_is_bounded_in_bytes() {
        let mut small: Vec<Entry<TypeConfig>> = (1..=100).map(|i| entry(i, 100)).collect();
        assert_eq!(fit_entries(&mut small, APPEND_BYTES_MAX), None);
        assert_eq!(small.len(), 100);
        // Four entries of 100 KB: two fit in 256 KiB.
        let mut big: Vec<Entry<TypeConfig>> = (1..=4).map(|i| entry(i, 100_000)).collect();
        assert_eq!(fit_entries(&mut big, APPEND_BYTES_MAX), Some(id(2)));
        assert_eq!(big.len(), 2);
        // One entry larger than the bound still goes, alone.
        let mut huge: Vec<Entry<TypeConfig>> = (1..=3).map(|i| entry(i, 1_000_000)).collect();
        assert_eq!(fit_entries(&mut huge, APPEND_BYTES_MAX), Some(id(1)));
        assert_eq!(huge.len(), 1);
        let mut none: Vec<Entry<TypeConfig>> = vec![];
        assert_eq!(fit_entries(&mut none, APPEND_BYTES_MAX), None);
    }
}
