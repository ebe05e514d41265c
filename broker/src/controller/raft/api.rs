//! The controller's API for brokers (`tally.internal.v1.ControllerApi`):
//! proposals and session heartbeats, answered by the active controller and
//! forwarded there by any other voter. Payloads are JSON of our own types.

use serde::Serialize;
use serde::de::DeserializeOwned;
use tally_proto::internal::v1::ControllerPayload;
use tally_proto::internal::v1::controller_api_client::ControllerApiClient;
use tally_proto::internal::v1::controller_api_server::ControllerApi;

use super::network::{from_json, to_json};
use super::node::{Committed, Controller, ControllerError, HeartbeatRequest};
use crate::controller::lease::HeartbeatAnswer;
use crate::controller::metadata::{BrokerId, MetadataCommand};
use crate::peer::PeerConnections;

/// Serves proposals and heartbeats from other brokers at this voter.
#[derive(Debug, Clone)]
pub struct ControllerApiService {
    controller: Controller,
}

impl ControllerApiService {
    /// Serves `controller`.
    pub fn new(controller: Controller) -> ControllerApiService {
        ControllerApiService { controller }
    }
}

fn decode<T: DeserializeOwned>(payload: &ControllerPayload) -> Result<T, tonic::Status> {
    from_json(&payload.json)
}

fn encode<T: Serialize>(answer: &T) -> Result<tonic::Response<ControllerPayload>, tonic::Status> {
    Ok(tonic::Response::new(ControllerPayload { json: to_json(answer)? }))
}

#[tonic::async_trait]
impl ControllerApi for ControllerApiService {
    async fn propose(
        &self,
        request: tonic::Request<ControllerPayload>,
    ) -> Result<tonic::Response<ControllerPayload>, tonic::Status> {
        let command: MetadataCommand = decode(request.get_ref())?;
        encode(&self.controller.propose_indexed(command).await)
    }

    async fn heartbeat(
        &self,
        request: tonic::Request<ControllerPayload>,
    ) -> Result<tonic::Response<ControllerPayload>, tonic::Status> {
        let heartbeat: HeartbeatRequest = decode(request.get_ref())?;
        encode(&self.controller.heartbeat_local(&heartbeat).await)
    }

    async fn add_observer(
        &self,
        request: tonic::Request<ControllerPayload>,
    ) -> Result<tonic::Response<ControllerPayload>, tonic::Status> {
        let (id, address): (BrokerId, String) = decode(request.get_ref())?;
        encode(&self.controller.add_observer_local(id, &address).await)
    }

    async fn knows_broker(
        &self,
        request: tonic::Request<ControllerPayload>,
    ) -> Result<tonic::Response<ControllerPayload>, tonic::Status> {
        let broker: BrokerId = decode(request.get_ref())?;
        encode(&self.controller.image().broker(broker).is_some())
    }
}

/// The calls of the controller API.
#[derive(Debug, Clone, Copy)]
enum Rpc {
    Propose,
    Heartbeat,
    KnowsBroker,
    AddObserver,
}

/// What went wrong reaching another voter.
fn unreachable(address: &str, what: impl std::fmt::Display) -> ControllerError {
    ControllerError::NotLeader { leader: None, address: Some(format!("{address} (unreachable: {what})")) }
}

async fn call<Req: Serialize, Resp: DeserializeOwned>(
    peers: &PeerConnections,
    address: &str,
    request: &Req,
    rpc: Rpc,
) -> Result<Resp, ControllerError> {
    let channel = peers.get(address).map_err(|e| unreachable(address, e))?;
    let mut client = ControllerApiClient::new(channel);
    let json = serde_json::to_vec(request).map_err(|e| ControllerError::Stopped(e.to_string()))?;
    let payload = ControllerPayload { json: json.into() };
    let answer = match rpc {
        Rpc::Propose => client.propose(payload).await,
        Rpc::Heartbeat => client.heartbeat(payload).await,
        Rpc::KnowsBroker => client.knows_broker(payload).await,
        Rpc::AddObserver => client.add_observer(payload).await,
    };
    let answer = answer.map_err(|status| unreachable(address, status.message()))?.into_inner();
    serde_json::from_slice(&answer.json)
        .map_err(|e| ControllerError::Stopped(format!("bad answer from {address}: {e}")))
}

/// Sends a proposal to the voter at `address`.
pub async fn forward_propose(
    peers: &PeerConnections,
    address: &str,
    command: &MetadataCommand,
) -> Result<Committed, ControllerError> {
    call::<_, Result<Committed, ControllerError>>(peers, address, command, Rpc::Propose).await?
}

/// Sends a heartbeat to the voter at `address`.
pub async fn forward_heartbeat(
    peers: &PeerConnections,
    address: &str,
    heartbeat: &HeartbeatRequest,
) -> Result<HeartbeatAnswer, ControllerError> {
    call::<_, Result<HeartbeatAnswer, ControllerError>>(peers, address, heartbeat, Rpc::Heartbeat).await?
}

/// Asks the voter at `address` (it must lead) to add `id` at `observer` as
/// a learner of the metadata log.
pub async fn add_observer(
    peers: &PeerConnections,
    address: &str,
    id: BrokerId,
    observer: &str,
) -> Result<(), ControllerError> {
    call::<_, Result<(), ControllerError>>(peers, address, &(id, observer.to_string()), Rpc::AddObserver).await?
}

/// Asks the voter at `address` whether it has `broker` registered.
pub async fn knows_broker(peers: &PeerConnections, address: &str, broker: BrokerId) -> Result<bool, ControllerError> {
    call::<_, bool>(peers, address, &broker, Rpc::KnowsBroker).await
}
