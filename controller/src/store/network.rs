//! Raft transport between controller replicas: each openraft RPC travels as
//! JSON inside the `sdn.v1.Raft` gRPC service, tagged with the cluster id so
//! a replica never takes messages from another cluster.

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

/// A connection to one peer, made on first use and remade after a failure.
pub struct Peer {
    target: u64,
    addr: String,
    client: Option<pb::raft_client::RaftClient<Channel>>,
    cluster_id: ClusterId,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> Self::Network {
        Peer {
            target,
            addr: node.addr.clone(),
            client: None,
            cluster_id: self.cluster_id.clone(),
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
        let json = serde_json::to_vec(req).map_err(|e| CallError::Network(format!("encoding {method}: {e}")))?;
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
            self.client = Some(pb::raft_client::RaftClient::new(ch));
        }
        let client = self.client.as_mut().expect("connected");
        let msg = pb::RaftMessage { cluster_id, json };
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
        serde_json::from_slice(&resp.json).map_err(|e| CallError::Network(format!("decoding {method} reply: {e}")))
    }
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
        let r: Result<AppendEntriesResponse<u64>, RaftError<u64>> = self
            .call("append", &rpc, option.hard_ttl())
            .await
            .map_err(|e| rpc_err(self.target, e))?;
        r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
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
