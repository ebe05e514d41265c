//! Raft between controller voters over gRPC (`tally.internal.v1.ControllerRaft`):
//! the client side openraft calls ([`Network`], [`PeerClient`]) and the
//! service that hands incoming messages to the local Raft ([`RaftService`]).
//!
//! Payloads are openraft's own request and response types as JSON. There is
//! one connection per voter, kept for the life of the [`Network`]: openraft
//! calls `new_client` for every leadership check (`ensure_linearizable`,
//! on each broker heartbeat), and a new TCP and HTTP/2 handshake each time
//! would have to fit in the check's time limit (the heartbeat interval).
//! Connections connect lazily, reconnect by themselves, and use HTTP/2
//! keepalive, so a link that was cut comes back once it heals. Every call
//! is bounded by the time openraft gives it.

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Timeout, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::{BasicNode, Raft};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tally_proto::connection::Connection as Channel;
use tally_proto::internal::v1::RaftPayload;
use tally_proto::internal::v1::controller_raft_client::ControllerRaftClient;
use tally_proto::internal::v1::controller_raft_server::ControllerRaft;

pub use crate::peer::peer_channel;

use super::TypeConfig;

/// Largest Raft message accepted or sent (a snapshot chunk, a batch of entries).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Makes [`PeerClient`]s as openraft asks, all over one kept connection
/// per voter address.
#[derive(Debug, Clone, Default)]
pub struct Network {
    connections: std::sync::Arc<crate::peer::PeerConnections>,
}

impl Network {
    /// Connections dialled from the local address `source`, when set.
    pub fn new(source: Option<std::net::IpAddr>) -> Network {
        Network { connections: std::sync::Arc::new(crate::peer::PeerConnections::new(source)) }
    }
}

/// Sends Raft messages to one voter.
#[derive(Debug)]
pub struct PeerClient {
    target: u64,
    address: String,
    connections: std::sync::Arc<crate::peer::PeerConnections>,
    client: Result<ControllerRaftClient<Channel>, String>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> PeerClient {
        let client = raft_client(&self.connections, &node.addr);
        PeerClient { target, address: node.addr.clone(), connections: self.connections.clone(), client }
    }
}

/// A Raft client over the kept connection to `address`.
fn raft_client(
    connections: &crate::peer::PeerConnections,
    address: &str,
) -> Result<ControllerRaftClient<Channel>, String> {
    connections.get(address).map(|c| {
        ControllerRaftClient::new(c)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    })
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Failure(String);

type RpcResult<T, E> = Result<T, RPCError<u64, BasicNode, RaftError<u64, E>>>;

impl PeerClient {
    async fn call<Req, Resp, E>(&mut self, kind: Kind, request: &Req, option: &RPCOption) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let client = match &mut self.client {
            Ok(c) => c,
            Err(e) => return Err(RPCError::Unreachable(Unreachable::new(&Failure(e.clone())))),
        };
        let json = serde_json::to_vec(request).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let payload = RaftPayload { json: json.into() };
        let ttl = option.hard_ttl();
        let call = async {
            match kind {
                Kind::AppendEntries => client.append_entries(payload).await,
                Kind::Vote => client.vote(payload).await,
                Kind::InstallSnapshot => client.install_snapshot(payload).await,
            }
        };
        let response = match tokio::time::timeout(ttl, call).await {
            Err(_) => {
                let timeout = Timeout { action: kind.rpc_type(), id: 0, target: self.target, timeout: ttl };
                return Err(RPCError::Timeout(timeout));
            }
            Ok(Err(status)) if status.code() == tonic::Code::Unavailable => {
                return Err(RPCError::Unreachable(Unreachable::new(&status)));
            }
            Ok(Err(status)) => return Err(RPCError::Network(NetworkError::new(&status))),
            Ok(Ok(response)) => response.into_inner(),
        };
        let answer: Result<Resp, RaftError<u64, E>> =
            serde_json::from_slice(&response.json).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        if let Err(RaftError::Fatal(_)) = &answer {
            // The Raft behind this connection stopped; a restarted voter at
            // the same address is reached over a new connection, by this
            // client too: openraft keeps one client per replication stream
            // for a whole term, and one kept on the old connection would
            // never reach the restarted voter.
            self.connections.forget(&self.address);
            self.client = raft_client(&self.connections, &self.address);
        }
        answer.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    AppendEntries,
    Vote,
    InstallSnapshot,
}

impl Kind {
    fn rpc_type(self) -> openraft::network::RPCTypes {
        match self {
            Kind::AppendEntries => openraft::network::RPCTypes::AppendEntries,
            Kind::Vote => openraft::network::RPCTypes::Vote,
            Kind::InstallSnapshot => openraft::network::RPCTypes::InstallSnapshot,
        }
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<u64>, openraft::error::Infallible> {
        self.call(Kind::AppendEntries, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<u64>, InstallSnapshotError> {
        self.call(Kind::InstallSnapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<u64>, openraft::error::Infallible> {
        self.call(Kind::Vote, &rpc, &option).await
    }
}

/// The peer-facing gRPC service: hands each message to the local Raft and
/// sends back its answer.
#[derive(Clone)]
pub struct RaftService {
    raft: Raft<TypeConfig>,
}

impl RaftService {
    /// Serves `raft`.
    pub fn new(raft: Raft<TypeConfig>) -> RaftService {
        RaftService { raft }
    }
}

/// Decodes the JSON payload of a peer request (both internal services).
pub(super) fn from_json<T: DeserializeOwned>(json: &[u8]) -> Result<T, tonic::Status> {
    serde_json::from_slice(json).map_err(|e| tonic::Status::invalid_argument(format!("undecodable payload: {e}")))
}

/// Encodes the JSON payload of a peer answer (both internal services).
pub(super) fn to_json<T: Serialize>(answer: &T) -> Result<bytes::Bytes, tonic::Status> {
    serde_json::to_vec(answer).map(Into::into).map_err(|e| tonic::Status::internal(format!("encoding: {e}")))
}

fn decode<T: DeserializeOwned>(payload: &RaftPayload) -> Result<T, tonic::Status> {
    from_json(&payload.json)
}

fn encode<T: Serialize>(answer: &T) -> Result<tonic::Response<RaftPayload>, tonic::Status> {
    Ok(tonic::Response::new(RaftPayload { json: to_json(answer)? }))
}

#[tonic::async_trait]
impl ControllerRaft for RaftService {
    async fn append_entries(
        &self,
        request: tonic::Request<RaftPayload>,
    ) -> Result<tonic::Response<RaftPayload>, tonic::Status> {
        let rpc: AppendEntriesRequest<TypeConfig> = decode(request.get_ref())?;
        encode(&self.raft.append_entries(rpc).await)
    }

    async fn vote(&self, request: tonic::Request<RaftPayload>) -> Result<tonic::Response<RaftPayload>, tonic::Status> {
        let rpc: VoteRequest<u64> = decode(request.get_ref())?;
        encode(&self.raft.vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        request: tonic::Request<RaftPayload>,
    ) -> Result<tonic::Response<RaftPayload>, tonic::Status> {
        let rpc: InstallSnapshotRequest<TypeConfig> = decode(request.get_ref())?;
        encode(&self.raft.install_snapshot(rpc).await)
    }
}
