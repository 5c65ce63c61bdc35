//! The replicas' side of clustering: the `Raft` service that carries
//! replication between them, and the `Cluster` service administrators use to
//! change membership.

use std::collections::BTreeSet;
use std::time::Duration;

use openraft::{BasicNode, ChangeMembers};
use sdn_proto::v1 as pb;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::{Request, Response, Status};

use crate::auth::{forward, forwarded, Caller};
use sdn_proto::tls::Role;

use crate::store::network::{form_of, Form};
use crate::store::Store;

/// Serves Raft messages from peers.
#[derive(Clone)]
pub struct RaftService {
    pub store: Store,
    /// Turns true when the controller stops: streams from peers end then.
    pub stopping: tokio::sync::watch::Receiver<bool>,
}

impl RaftService {
    /// Refuses messages from another cluster; a replica that has not joined
    /// any cluster yet adopts the sender's.
    fn check_cluster(&self, theirs: &str) -> Result<(), Status> {
        if theirs.is_empty() {
            return Err(Status::failed_precondition("cluster_id: missing"));
        }
        match self.store.cluster_id() {
            Some(ours) if ours == theirs => Ok(()),
            Some(ours) => Err(Status::failed_precondition(format!(
                "this replica belongs to cluster {ours}; refusing a message from cluster {theirs}"
            ))),
            None => {
                self.store
                    .set_cluster_id(theirs)
                    .map_err(|e| Status::internal(format!("recording the cluster id: {e:#}")))?;
                tracing::info!(cluster_id = theirs, "joined cluster");
                Ok(())
            }
        }
    }

    fn decode<T: DeserializeOwned>(msg: &pb::RaftMessage) -> Result<T, Status> {
        crate::store::network::payload(msg).map_err(Status::invalid_argument)
    }

    /// The answer, in the form the request came in.
    fn encode<T: Serialize>(&self, v: &T, form: Form) -> Result<Response<pb::RaftMessage>, Status> {
        let mut m = pb::RaftMessage {
            cluster_id: self.store.cluster_id().unwrap_or_default(),
            reads_bin: true,
            reads_batched: true,
            chains_audit: true,
            reads_ops_to: sdn_policies::model::log_index_max(),
            ..Default::default()
        };
        crate::store::network::put_payload(&mut m, v, form).map_err(Status::internal)?;
        Ok(Response::new(m))
    }
}

impl RaftService {
    /// Takes one message of `call` from replica `from` (its certificate's
    /// node id; `None` without authentication), answering in the form it
    /// came in.
    async fn handle(
        &self,
        call: pb::RaftCall,
        msg: pb::RaftMessage,
        from: Option<u64>,
    ) -> Result<pb::RaftMessage, Status> {
        self.check_cluster(&msg.cluster_id)?;
        let form = form_of(&msg);
        let answer = match call {
            pb::RaftCall::AppendEntries => {
                let rpc = crate::store::network::read_append(&msg).map_err(Status::invalid_argument)?;
                sender_is(from, &rpc.vote, "AppendEntries")?;
                self.encode(&self.store.raft.append_entries(rpc).await, form)
            }
            pb::RaftCall::InstallSnapshot => {
                let rpc: openraft::raft::InstallSnapshotRequest<crate::store::TypeConfig> = Self::decode(&msg)?;
                sender_is(from, &rpc.vote, "InstallSnapshot")?;
                self.encode(&self.store.raft.install_snapshot(rpc).await, form)
            }
            pb::RaftCall::Vote => {
                let rpc: openraft::raft::VoteRequest<u64> = Self::decode(&msg)?;
                sender_is(from, &rpc.vote, "Vote")?;
                self.encode(&self.store.raft.vote(rpc).await, form)
            }
            pb::RaftCall::Unspecified => Err(Status::invalid_argument("call: which Raft call is not said")),
        };
        answer.map(Response::into_inner)
    }
}

type RaftStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::RaftMessage, Status>> + Send>>;

#[tonic::async_trait]
impl pb::raft_server::Raft for RaftService {
    async fn append_entries(&self, req: Request<pb::RaftMessage>) -> Result<Response<pb::RaftMessage>, Status> {
        let from = replica_node(&req, "Raft.AppendEntries")?;
        self.handle(pb::RaftCall::AppendEntries, req.into_inner(), from)
            .await
            .map(Response::new)
    }

    async fn install_snapshot(&self, req: Request<pb::RaftMessage>) -> Result<Response<pb::RaftMessage>, Status> {
        let from = replica_node(&req, "Raft.InstallSnapshot")?;
        self.handle(pb::RaftCall::InstallSnapshot, req.into_inner(), from)
            .await
            .map(Response::new)
    }

    async fn vote(&self, req: Request<pb::RaftMessage>) -> Result<Response<pb::RaftMessage>, Status> {
        let from = replica_node(&req, "Raft.Vote")?;
        self.handle(pb::RaftCall::Vote, req.into_inner(), from)
            .await
            .map(Response::new)
    }

    type StreamStream = RaftStream;

    async fn stream(
        &self,
        req: Request<tonic::Streaming<pb::RaftMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let from = replica_node(&req, "Raft.Stream")?;
        let mut inbound = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let this = self.clone();
        let mut stopping = self.stopping.clone();
        tokio::spawn(async move {
            // In order: the peer waits for each answer before it sends on.
            loop {
                let next = tokio::select! {
                    m = inbound.message() => Some(m),
                    _ = stopping.wait_for(|s| *s) => None,
                };
                let msg = match next {
                    Some(Ok(Some(m))) => m,
                    Some(_) => break,
                    None => {
                        let _ = tx.send(Err(Status::unavailable("the controller is stopping"))).await;
                        break;
                    }
                };
                let call = pb::RaftCall::try_from(msg.call).unwrap_or(pb::RaftCall::Unspecified);
                let answer = this.handle(call, msg, from).await;
                let failed = answer.is_err();
                if tx.send(answer).await.is_err() || failed {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

/// The node id of the replica a Raft request comes from (`None` without
/// authentication); refused for any other role.
fn replica_node<T>(req: &Request<T>, op: &str) -> Result<Option<u64>, Status> {
    let caller = Caller::of(req)?;
    caller.require(op, &[Role::Replica])?;
    match &caller.identity {
        None => Ok(None),
        Some(id) => id
            .name
            .parse()
            .map(Some)
            .map_err(|_| crate::auth::refuse(op, id, "a replica's name is its node id")),
    }
}

/// A replica speaks Raft as itself only: the leader or candidate a message
/// names is the node its certificate names.
fn sender_is(from: Option<u64>, vote: &openraft::Vote<u64>, op: &str) -> Result<(), Status> {
    match from {
        Some(node) if vote.leader_id.node_id != node => {
            tracing::warn!(target: "sdn::security", replica = node, claims = vote.leader_id.node_id, op, "refused: a Raft message in another node's name");
            Err(Status::permission_denied(format!(
                "{op}: replica {node} sent a message as node {}",
                vote.leader_id.node_id
            )))
        }
        _ => Ok(()),
    }
}

/// Membership administration.
#[derive(Clone)]
pub struct ClusterService {
    pub store: Store,
}

async fn cluster_client(addr: &str) -> Result<pb::cluster_client::ClusterClient<tonic::transport::Channel>, Status> {
    let ch = tokio::time::timeout(Duration::from_secs(2), sdn_proto::connect(addr))
        .await
        .map_err(|_| Status::unavailable(format!("connecting to {addr}: timed out")))?
        .map_err(|e| Status::unavailable(format!("connecting to {addr}: {e}")))?;
    Ok(pb::cluster_client::ClusterClient::new(ch))
}

/// Asks a replica for its status, with a short deadline.
async fn probe(addr: &str) -> Result<pb::ClusterStatus, Status> {
    let mut c = cluster_client(addr).await?;
    tokio::time::timeout(Duration::from_secs(1), c.status(pb::ClusterStatusRequest {}))
        .await
        .map_err(|_| Status::unavailable(format!("{addr}: no answer within 1s")))?
        .map(|r| r.into_inner())
}

impl ClusterService {
    async fn status_now(&self) -> pb::ClusterStatus {
        let audit_chained = self.store.shared.read().await.chain.is_some();
        let m = self.store.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let matched = m.replication.clone().unwrap_or_default();
        let members = membership
            .nodes()
            .map(|(id, node)| pb::Member {
                node_id: *id,
                addr: node.addr.clone(),
                voter: voters.contains(id),
                matched_index: matched.get(id).cloned().flatten().map(|l| l.index).unwrap_or(0),
            })
            .collect();
        let revision = self.store.revisions.borrow().to_owned();
        pb::ClusterStatus {
            cluster_id: self.store.cluster_id().unwrap_or_default(),
            node_id: self.store.node_id,
            leader_id: m.current_leader.unwrap_or(0),
            term: m.current_term,
            last_applied: m.last_applied.map(|l| l.index).unwrap_or(0),
            members,
            revision,
            snapshot_index: m.snapshot.map(|l| l.index).unwrap_or(0),
            purged_index: m.purged.map(|l| l.index).unwrap_or(0),
            last_log_index: m.last_log_index.unwrap_or(0),
            audit_chained,
        }
    }

    /// Runs `f` here if this replica leads, else forwards to the leader
    /// (once: a request that came forwarded is not sent on again).
    async fn on_leader<F, Fut>(&self, already_forwarded: bool, forward: F) -> Result<Option<pb::ClusterStatus>, Status>
    where
        F: FnOnce(pb::cluster_client::ClusterClient<tonic::transport::Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<pb::ClusterStatus, Status>>,
    {
        if self.store.is_leader() {
            return Ok(None);
        }
        if already_forwarded {
            return Err(Status::unavailable("leadership moved while forwarding; retry"));
        }
        let Some((_, addr)) = self.store.leader() else {
            return Err(Status::unavailable("no leader is elected yet; retry"));
        };
        let c = cluster_client(&addr).await?;
        forward(c).await.map(Some)
    }

    fn voters(&self) -> BTreeSet<u64> {
        self.store
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect()
    }

    fn node_addr(&self, id: u64) -> Option<String> {
        self.store
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&id)
            .map(|n| n.addr.clone())
    }

    /// Refuses a voter set whose reachable members could not form a quorum.
    async fn check_quorum(&self, new_voters: &BTreeSet<u64>) -> Result<(), Status> {
        if new_voters.is_empty() {
            return Err(Status::failed_precondition("the change would leave no voter"));
        }
        let mut reachable = Vec::new();
        let mut unreachable = Vec::new();
        for id in new_voters {
            if *id == self.store.node_id {
                reachable.push(*id);
                continue;
            }
            let ok = match self.node_addr(*id) {
                Some(addr) => probe(&addr).await.is_ok(),
                None => false,
            };
            if ok {
                reachable.push(*id)
            } else {
                unreachable.push(*id)
            }
        }
        let quorum = new_voters.len() / 2 + 1;
        if reachable.len() < quorum {
            return Err(Status::failed_precondition(format!(
                "the change would lose quorum: the new voters {new_voters:?} need {quorum} reachable, but only {reachable:?} answer ({unreachable:?} do not)"
            )));
        }
        Ok(())
    }
}

fn raft_status<E: std::fmt::Display>(what: &str, e: E) -> Status {
    Status::unavailable(format!("{what}: {e}"))
}

#[tonic::async_trait]
impl pb::cluster_server::Cluster for ClusterService {
    async fn refused(&self, req: Request<pb::RefusedRequest>) -> Result<Response<pb::RefusedResponse>, Status> {
        let caller = Caller::of(&req)?;
        caller.require("Cluster.Refused", &[Role::Replica])?;
        if caller.identity.is_none() {
            // Under --insecure there is no refusal to record, and no one
            // to take records from.
            return Err(Status::unauthenticated(
                "Cluster.Refused: only a replica, by its certificate",
            ));
        }
        crate::refusals::record(&self.store, req.into_inner()).await?;
        Ok(Response::new(pb::RefusedResponse {}))
    }

    async fn status(&self, req: Request<pb::ClusterStatusRequest>) -> Result<Response<pb::ClusterStatus>, Status> {
        Caller::of(&req)?.require(
            "Cluster.Status",
            &[Role::Admin, Role::Supervisor, Role::Platform, Role::Replica],
        )?;
        Ok(Response::new(self.status_now().await))
    }

    async fn add_learner(&self, req: Request<pb::AddLearnerRequest>) -> Result<Response<pb::ClusterStatus>, Status> {
        let caller = Caller::of(&req)?;
        caller.require("Cluster.AddLearner", &[Role::Admin])?;
        let was_forwarded = forwarded(&req);
        let req = req.into_inner();
        let fwd = forward(req.clone(), &caller);
        if let Some(s) = self
            .on_leader(was_forwarded, |mut c| async move {
                c.add_learner(fwd).await.map(|r| r.into_inner())
            })
            .await?
        {
            return Ok(Response::new(s));
        }
        if req.node_id == 0 {
            return Err(Status::invalid_argument("node_id: must be above 0"));
        }
        if self.node_addr(req.node_id).is_some() {
            return Err(Status::already_exists(format!(
                "node_id: node {} is already a member",
                req.node_id
            )));
        }
        let them = probe(&req.addr).await.map_err(|e| {
            Status::unavailable(format!(
                "addr: the replica at {} does not answer: {}",
                req.addr,
                e.message()
            ))
        })?;
        if them.node_id != req.node_id {
            return Err(Status::invalid_argument(format!(
                "node_id: the replica at {} is node {}, not {}",
                req.addr, them.node_id, req.node_id
            )));
        }
        let ours = self.store.cluster_id().unwrap_or_default();
        if !them.cluster_id.is_empty() && them.cluster_id != ours {
            return Err(Status::failed_precondition(format!(
                "the replica at {} holds data of cluster {}, not this cluster ({ours}); give it an empty --data-dir",
                req.addr, them.cluster_id
            )));
        }
        tracing::info!(node = req.node_id, addr = %req.addr, "adding learner");
        self.store
            .raft
            .add_learner(req.node_id, BasicNode { addr: req.addr.clone() }, true)
            .await
            .map_err(|e| raft_status("adding the learner", e))?;
        Ok(Response::new(self.status_now().await))
    }

    async fn promote(&self, req: Request<pb::MemberRequest>) -> Result<Response<pb::ClusterStatus>, Status> {
        let caller = Caller::of(&req)?;
        caller.require("Cluster.Promote", &[Role::Admin])?;
        let was_forwarded = forwarded(&req);
        let req = req.into_inner();
        let fwd = forward(req, &caller);
        if let Some(s) = self
            .on_leader(was_forwarded, |mut c| async move {
                c.promote(fwd).await.map(|r| r.into_inner())
            })
            .await?
        {
            return Ok(Response::new(s));
        }
        let mut voters = self.voters();
        if voters.contains(&req.node_id) {
            return Err(Status::already_exists(format!(
                "node_id: node {} is already a voter",
                req.node_id
            )));
        }
        if self.node_addr(req.node_id).is_none() {
            return Err(Status::not_found(format!(
                "node_id: node {} is not a learner of this cluster; add it first",
                req.node_id
            )));
        }
        voters.insert(req.node_id);
        self.check_quorum(&voters).await?;
        tracing::info!(node = req.node_id, "promoting learner to voter");
        self.store
            .raft
            .change_membership(ChangeMembers::AddVoterIds([req.node_id].into()), false)
            .await
            .map_err(|e| raft_status("promoting", e))?;
        Ok(Response::new(self.status_now().await))
    }

    async fn remove(&self, req: Request<pb::MemberRequest>) -> Result<Response<pb::ClusterStatus>, Status> {
        let caller = Caller::of(&req)?;
        caller.require("Cluster.Remove", &[Role::Admin])?;
        let was_forwarded = forwarded(&req);
        let req = req.into_inner();
        let fwd = forward(req, &caller);
        if let Some(s) = self
            .on_leader(was_forwarded, |mut c| async move {
                c.remove(fwd).await.map(|r| r.into_inner())
            })
            .await?
        {
            return Ok(Response::new(s));
        }
        if self.node_addr(req.node_id).is_none() {
            return Err(Status::not_found(format!(
                "node_id: node {} is not a member of this cluster",
                req.node_id
            )));
        }
        let mut voters = self.voters();
        if voters.remove(&req.node_id) {
            self.check_quorum(&voters).await?;
            tracing::info!(node = req.node_id, "removing voter");
            self.store
                .raft
                .change_membership(ChangeMembers::RemoveVoters([req.node_id].into()), false)
                .await
                .map_err(|e| raft_status("removing the voter", e))?;
        } else {
            tracing::info!(node = req.node_id, "removing learner");
            self.store
                .raft
                .change_membership(ChangeMembers::RemoveNodes([req.node_id].into()), false)
                .await
                .map_err(|e| raft_status("removing the learner", e))?;
        }
        Ok(Response::new(self.status_now().await))
    }
}
