//! Raft transport between controller replicas: each openraft RPC travels
//! inside the `sdn.v1.Raft` gRPC service, tagged with the cluster id so a
//! replica never takes messages from another cluster. Messages are binary
//! (postcard) once the peer has said it reads them, JSON until then (a
//! replica of an earlier release reads only JSON). Appends whose entries may
//! carry several clients' batches go in a field of their own (`batched`),
//! once the peer has said it reads it; to a peer that has not, entries go in
//! the earlier form, one batch each, and an earlier release never finds a
//! form it would misread. One append carries at
//! most [`APPEND_BYTES_MAX`] of entries (at least one entry): a lagging
//! follower catches up in appends that each fit the time an append may
//! take, instead of one append that never does.

use std::collections::BTreeMap;
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
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use super::{TypeConfig, V1};

/// The cluster id shared by the network and the Raft service.
pub type ClusterId = Arc<RwLock<Option<String>>>;

/// What each peer said it reads, by node id: `true` once it said it reads
/// entries of several batches, `false` once it answered without saying so
/// (an earlier release) or could not read them. A peer that has not
/// answered since this replica started is not in the map.
pub type PeerForms = Arc<RwLock<BTreeMap<u64, bool>>>;

/// What each peer said of the operations it reads: the highest number
/// (see `RaftMessage.reads_ops_to`; an earlier release says nothing).
pub type PeerOps = Arc<RwLock<BTreeMap<u64, u32>>>;

/// Creates a connection per peer.
pub struct Network {
    pub cluster_id: ClusterId,
    pub forms: PeerForms,
    /// What each peer said of the audit chain: `true` once it said it
    /// keeps it, `false` once it answered without saying so.
    pub chains: PeerForms,
    pub ops: PeerOps,
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
    forms: PeerForms,
    chains: PeerForms,
    ops: PeerOps,
    /// The stream to the peer, once open.
    duplex: Option<Duplex>,
    /// Whether to open one: not to a peer that does not serve it.
    streams: bool,
}

/// A `Stream` call to a peer: requests go in, answers come back in order.
struct Duplex {
    requests: mpsc::Sender<pb::RaftMessage>,
    answers: tonic::Streaming<pb::RaftMessage>,
    /// A request went and its answer has not been read.
    awaiting: bool,
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
            forms: self.forms.clone(),
            chains: self.chains.clone(),
            ops: self.ops.clone(),
            duplex: None,
            streams: true,
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
    /// The form this peer reads: batched, binary or JSON.
    fn form(&self) -> Form {
        if self.forms.read().expect("peer forms lock").get(&self.target) == Some(&true) {
            Form::Batched
        } else if self.binary {
            Form::Bin
        } else {
            Form::Json
        }
    }

    async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &mut self,
        method: &'static str,
        req: &Req,
        ttl: Duration,
    ) -> Result<Resp, CallError> {
        let mut msg = pb::RaftMessage::default();
        put_payload(&mut msg, req, self.form()).map_err(|e| CallError::Network(format!("encoding {method}: {e}")))?;
        self.send(method, msg, ttl).await
    }

    async fn send<Resp: DeserializeOwned>(
        &mut self,
        method: &'static str,
        mut msg: pb::RaftMessage,
        ttl: Duration,
    ) -> Result<Resp, CallError> {
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
        let mut client = self.client.clone().expect("connected");
        msg.cluster_id = cluster_id;
        if self.duplex.as_ref().is_some_and(|d| d.awaiting) {
            // A call was dropped between its request and its answer (its
            // caller gave up): that answer is still to come, and must not be
            // taken for this call's. A new stream.
            self.duplex = None;
        }
        if self.streams && self.duplex.is_none() {
            let (requests, rx) = mpsc::channel(1);
            match tokio::time::timeout(ttl, client.stream(ReceiverStream::new(rx))).await {
                Err(_) => {
                    self.client = None;
                    return Err(CallError::Unreachable(format!(
                        "opening a stream to node {} timed out",
                        self.target
                    )));
                }
                // An earlier release: one call per message.
                Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => self.streams = false,
                Ok(Err(status)) => return Err(self.failed(method, status)),
                Ok(Ok(answers)) => {
                    self.duplex = Some(Duplex {
                        requests,
                        answers: answers.into_inner(),
                        awaiting: false,
                    })
                }
            }
        }
        let answer = match self.duplex.as_mut() {
            Some(d) => {
                msg.call = match method {
                    "append" => pb::RaftCall::AppendEntries,
                    "snapshot" => pb::RaftCall::InstallSnapshot,
                    _ => pb::RaftCall::Vote,
                } as i32;
                let exchange = async {
                    d.awaiting = true;
                    d.requests
                        .send(msg)
                        .await
                        .map_err(|_| tonic::Status::unavailable("the stream closed"))?;
                    let answer = match d.answers.message().await {
                        Ok(Some(m)) => Ok(m),
                        Ok(None) => Err(tonic::Status::unavailable("the peer ended the stream")),
                        Err(status) => Err(status),
                    };
                    d.awaiting = false;
                    answer
                };
                tokio::time::timeout(ttl, exchange).await
            }
            None => {
                let call = async {
                    match method {
                        "append" => client.append_entries(msg).await,
                        "snapshot" => client.install_snapshot(msg).await,
                        _ => client.vote(msg).await,
                    }
                    .map(tonic::Response::into_inner)
                };
                tokio::time::timeout(ttl, call).await
            }
        };
        let resp = match answer {
            Err(_) => {
                // A late answer must not be taken for the next message's.
                self.duplex = None;
                self.client = None;
                return Err(CallError::Unreachable(format!(
                    "{method} to node {} timed out",
                    self.target
                )));
            }
            Ok(Err(status)) => return Err(self.failed(method, status)),
            Ok(Ok(r)) => r,
        };
        self.binary = resp.reads_bin;
        self.forms
            .write()
            .expect("peer forms lock")
            .insert(self.target, resp.reads_batched);
        self.chains
            .write()
            .expect("peer chains lock")
            .insert(self.target, resp.chains_audit);
        self.ops
            .write()
            .expect("peer ops lock")
            .insert(self.target, resp.reads_ops_to.max(sdn_policies::DELETE_LOG_INDEX));
        payload(&resp).map_err(|e| CallError::Network(format!("decoding {method} reply: {e}")))
    }

    /// What a call that the peer answered with an error means.
    fn failed(&mut self, method: &str, status: tonic::Status) -> CallError {
        // The stream ends with its first error.
        self.duplex = None;
        // The peer may have been replaced by an earlier release: JSON again
        // until it says otherwise, and a stream tried again.
        self.binary = false;
        self.streams = true;
        if status.code() == tonic::Code::InvalidArgument {
            // It could not read what it was sent.
            self.forms.write().expect("peer forms lock").insert(self.target, false);
        }
        if status.code() == tonic::Code::Unavailable || status.code() == tonic::Code::Unknown {
            self.client = None;
            return CallError::Unreachable(format!("{method} to node {}: {}", self.target, status.message()));
        }
        CallError::Network(format!("{method} to node {}: {}", self.target, status.message()))
    }
}

/// How a message's payload is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Form {
    /// JSON, in `json`: what every release reads.
    Json,
    /// postcard, in `bin`, with entries in the earlier form.
    Bin,
    /// postcard, in `batched`, with entries that may carry several batches.
    Batched,
}

/// Writes `v` into a message in the given form. For an append, `v` must
/// already be in the form's entry type (see [`append_message`]).
pub fn put_payload<T: Serialize>(msg: &mut pb::RaftMessage, v: &T, form: Form) -> Result<(), String> {
    match form {
        Form::Json => msg.json = serde_json::to_vec(v).map_err(|e| e.to_string())?,
        Form::Bin => msg.bin = postcard::to_stdvec(v).map_err(|e| e.to_string())?,
        Form::Batched => msg.batched = postcard::to_stdvec(v).map_err(|e| e.to_string())?,
    }
    Ok(())
}

/// The form a message came in.
pub fn form_of(msg: &pb::RaftMessage) -> Form {
    if !msg.batched.is_empty() {
        Form::Batched
    } else if !msg.bin.is_empty() {
        Form::Bin
    } else {
        Form::Json
    }
}

/// Reads a message's payload in the form it came in, naming the field. Not
/// for appends, whose entries differ between the forms: see [`read_append`].
pub fn payload<T: DeserializeOwned>(msg: &pb::RaftMessage) -> Result<T, String> {
    match form_of(msg) {
        Form::Batched => {
            postcard::from_bytes(&msg.batched).map_err(|e| format!("batched: not a valid Raft message: {e}"))
        }
        Form::Bin => postcard::from_bytes(&msg.bin).map_err(|e| format!("bin: not a valid Raft message: {e}")),
        Form::Json => serde_json::from_slice(&msg.json).map_err(|e| format!("json: not a valid Raft message: {e}")),
    }
}

/// An append as a message in `form`. Entries go in the earlier form where
/// the peer reads only that; an entry of several batches has no earlier
/// form, so it goes batched whatever the peer said: only a peer that read
/// that form when the entry was made can be sent one, and one that cannot
/// read it refuses the message rather than misread it.
pub fn append_message(rpc: &AppendEntriesRequest<TypeConfig>, form: Form) -> Result<pb::RaftMessage, String> {
    let mut msg = pb::RaftMessage::default();
    if form != Form::Batched {
        let entries: Option<Vec<openraft::Entry<V1>>> = rpc.entries.iter().map(super::entry_to_v1).collect();
        if let Some(entries) = entries {
            let v1 = AppendEntriesRequest::<V1> {
                vote: rpc.vote,
                prev_log_id: rpc.prev_log_id,
                leader_commit: rpc.leader_commit,
                entries,
            };
            put_payload(&mut msg, &v1, form)?;
            return Ok(msg);
        }
    }
    put_payload(&mut msg, rpc, Form::Batched)?;
    Ok(msg)
}

/// Reads an append in whichever form it came.
pub fn read_append(msg: &pb::RaftMessage) -> Result<AppendEntriesRequest<TypeConfig>, String> {
    if form_of(msg) == Form::Batched {
        return payload(msg);
    }
    let v1: AppendEntriesRequest<V1> = payload(msg)?;
    Ok(AppendEntriesRequest {
        vote: v1.vote,
        prev_log_id: v1.prev_log_id,
        leader_commit: v1.leader_commit,
        entries: v1.entries.into_iter().map(super::entry_from_v1).collect(),
    })
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
        let msg = append_message(&rpc, self.form())
            .map_err(|e| rpc_err(self.target, CallError::Network(format!("encoding append: {e}"))))?;
        let r: Result<AppendEntriesResponse<u64>, RaftError<u64>> = self
            .send("append", msg, option.hard_ttl())
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
    use crate::store::{Command, Proposal};
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
            payload: EntryPayload::Normal(Proposal {
                commands: vec![Command {
                    actor: "platform".into(),
                    time_unix_ms: 1,
                    ops: vec![Op::PutTenant(Tenant {
                        id: format!("t{i}"),
                        name: "x".repeat(name_bytes),
                    })],
                }],
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

    /// An append reads back the same in every form. To a peer that reads
    /// only the earlier form, entries go in that form, which an earlier
    /// release decodes as its own; an entry of several batches, which has
    /// no earlier form, goes batched, where an earlier release finds
    /// nothing it reads and refuses the message.
    #[test]
    fn appends_go_in_the_form_the_peer_reads() {
        let one = AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new_committed(2, 1),
            prev_log_id: Some(id(9)),
            leader_commit: Some(id(9)),
            entries: vec![
                Entry {
                    log_id: id(10),
                    payload: EntryPayload::Blank,
                },
                entry(11, 10),
            ],
        };
        for form in [Form::Json, Form::Bin, Form::Batched] {
            let msg = append_message(&one, form).unwrap();
            assert_eq!(form_of(&msg), form);
            assert_eq!(
                format!("{:?}", read_append(&msg).unwrap()),
                format!("{one:?}"),
                "{form:?}"
            );
            if form != Form::Batched {
                let earlier: AppendEntriesRequest<V1> = payload(&msg).unwrap();
                assert_eq!(earlier.entries.len(), 2);
                assert!(matches!(&earlier.entries[1].payload, EntryPayload::Normal(c) if c.actor == "platform"));
            }
        }
        let mut several = one.clone();
        several.entries.push(Entry {
            log_id: id(12),
            payload: EntryPayload::Normal(Proposal {
                commands: vec![
                    Command {
                        actor: "a".into(),
                        time_unix_ms: 1,
                        ops: vec![],
                    },
                    Command {
                        actor: "b".into(),
                        time_unix_ms: 1,
                        ops: vec![],
                    },
                ],
            }),
        });
        for form in [Form::Json, Form::Bin] {
            let msg = append_message(&several, form).unwrap();
            assert_eq!(form_of(&msg), Form::Batched, "{form:?}");
            assert!(msg.json.is_empty() && msg.bin.is_empty());
            assert_eq!(format!("{:?}", read_append(&msg).unwrap()), format!("{several:?}"));
            let earlier = payload::<AppendEntriesRequest<V1>>(&pb::RaftMessage { batched: vec![], ..msg });
            assert!(earlier.is_err(), "an earlier release refuses it");
        }
    }

    /// A peer that answers votes on the stream, the vote of term 1 only
    /// after 300 ms.
    #[derive(Clone)]
    struct SlowPeer;

    #[tonic::async_trait]
    impl pb::raft_server::Raft for SlowPeer {
        async fn append_entries(
            &self,
            _: tonic::Request<pb::RaftMessage>,
        ) -> Result<tonic::Response<pb::RaftMessage>, tonic::Status> {
            Err(tonic::Status::unimplemented("append"))
        }

        async fn install_snapshot(
            &self,
            _: tonic::Request<pb::RaftMessage>,
        ) -> Result<tonic::Response<pb::RaftMessage>, tonic::Status> {
            Err(tonic::Status::unimplemented("snapshot"))
        }

        async fn vote(
            &self,
            _: tonic::Request<pb::RaftMessage>,
        ) -> Result<tonic::Response<pb::RaftMessage>, tonic::Status> {
            Err(tonic::Status::unimplemented("vote"))
        }

        type StreamStream =
            std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::RaftMessage, tonic::Status>> + Send>>;

        async fn stream(
            &self,
            req: tonic::Request<tonic::Streaming<pb::RaftMessage>>,
        ) -> Result<tonic::Response<Self::StreamStream>, tonic::Status> {
            let mut inbound = req.into_inner();
            let (tx, rx) = mpsc::channel(1);
            tokio::spawn(async move {
                while let Ok(Some(msg)) = inbound.message().await {
                    let v: VoteRequest<u64> = payload(&msg).unwrap();
                    if v.vote.leader_id().term == 1 {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    let answer: Result<VoteResponse<u64>, RaftError<u64>> = Ok(VoteResponse::new(v.vote, None, true));
                    let mut m = pb::RaftMessage {
                        reads_bin: true,
                        reads_batched: true,
                        ..Default::default()
                    };
                    put_payload(&mut m, &answer, form_of(&msg)).unwrap();
                    if tx.send(Ok(m)).await.is_err() {
                        break;
                    }
                }
            });
            Ok(tonic::Response::new(Box::pin(ReceiverStream::new(rx))))
        }
    }

    /// A call dropped between its request and its answer (openraft gives
    /// up on an append after its own timeout) leaves that answer on the
    /// stream; the next call must not take it for its own, or the leader
    /// would count a follower for entries it never got.
    #[tokio::test]
    async fn an_answer_is_never_taken_for_a_later_request() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(pb::raft_server::RaftServer::new(SlowPeer))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let mut net = Network {
            cluster_id: Arc::new(RwLock::new(Some("c".into()))),
            forms: PeerForms::default(),
            chains: PeerForms::default(),
            ops: PeerOps::default(),
        };
        let mut peer = net.new_client(2, &BasicNode::new(format!("http://{addr}"))).await;
        let first = tokio::time::timeout(
            Duration::from_millis(150),
            peer.vote(
                VoteRequest::new(Vote::new(1, 1), None),
                RPCOption::new(Duration::from_secs(2)),
            ),
        )
        .await;
        assert!(first.is_err(), "the first call is dropped before its answer");
        let second = peer
            .vote(
                VoteRequest::new(Vote::new(2, 1), None),
                RPCOption::new(Duration::from_secs(2)),
            )
            .await
            .unwrap();
        assert_eq!(second.vote, Vote::new(2, 1), "the second call's own answer");
    }
}
