//! The `Admin` service: topics and their configs.

use std::collections::BTreeMap;
use std::sync::Arc;

use tally_proto::v1::{self as pb, admin_server::Admin};
use tonic::{Request, Response, Status};

use crate::broker::{Broker, NewTopic};
use crate::controller::Controller;
use crate::error::BrokerError;

/// Implements the `tally.v1.Admin` service.
#[derive(Debug, Clone)]
pub struct AdminService {
    broker: Arc<Broker>,
    controller: Controller,
}

impl AdminService {
    /// A service over `broker` and its controller voter.
    pub fn new(broker: Arc<Broker>, controller: Controller) -> Self {
        AdminService { broker, controller }
    }
}

fn result(name: String, outcome: Result<(), BrokerError>) -> pb::TopicResult {
    match outcome {
        Ok(()) => pb::TopicResult { name, error_code: 0, error_message: String::new() },
        Err(e) => {
            tracing::info!(topic = %name, error = %e, "admin request refused");
            pb::TopicResult { name, error_code: e.code() as i32, error_message: e.to_string() }
        }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn create_topics(
        &self,
        request: Request<pb::CreateTopicsRequest>,
    ) -> Result<Response<pb::CreateTopicsResponse>, Status> {
        let req = request.into_inner();
        let mut results = Vec::with_capacity(req.topics.len());
        for t in req.topics {
            let new = NewTopic {
                name: t.name.clone(),
                partitions: t.num_partitions,
                replication_factor: t.replication_factor,
                configs: t.configs.into_iter().collect(),
            };
            results.push(result(t.name, self.broker.create_topic(new, req.validate_only).await));
        }
        Ok(Response::new(pb::CreateTopicsResponse { results }))
    }

    async fn delete_topics(
        &self,
        request: Request<pb::DeleteTopicsRequest>,
    ) -> Result<Response<pb::DeleteTopicsResponse>, Status> {
        let mut results = Vec::new();
        for name in request.into_inner().names {
            let outcome = self.broker.delete_topic(&name).await;
            results.push(result(name, outcome));
        }
        Ok(Response::new(pb::DeleteTopicsResponse { results }))
    }

    async fn list_topics(
        &self,
        _request: Request<pb::ListTopicsRequest>,
    ) -> Result<Response<pb::ListTopicsResponse>, Status> {
        let topics = self
            .broker
            .topics()
            .iter()
            .map(|t| pb::TopicListing {
                name: t.name.to_string(),
                partitions: t.states.len() as u32,
                replication_factor: t.replication_factor,
            })
            .collect();
        Ok(Response::new(pb::ListTopicsResponse { topics }))
    }

    async fn describe_topics(
        &self,
        request: Request<pb::DescribeTopicsRequest>,
    ) -> Result<Response<pb::DescribeTopicsResponse>, Status> {
        let names = request.into_inner().names;
        let names =
            if names.is_empty() { self.broker.topics().iter().map(|t| t.name.to_string()).collect() } else { names };
        let ready = self.broker.metadata_ready();
        let topics = names
            .into_iter()
            .map(|name| match self.broker.topic(&name).filter(|_| ready) {
                None if !ready => {
                    let message = format!(
                        "broker {} is catching up with the cluster metadata since it started; ask again or ask another broker",
                        self.broker.node_id()
                    );
                    pb::TopicDescription {
                        name,
                        error_code: tally_proto::ErrorCode::LeaderNotAvailable as i32,
                        error_message: message,
                        ..Default::default()
                    }
                }
                Some(t) => pb::TopicDescription {
                    name,
                    error_code: 0,
                    error_message: String::new(),
                    configs: t.config.describe().into_iter().collect(),
                    partitions: t
                        .states
                        .iter()
                        .enumerate()
                        .map(|(i, state)| {
                            // Only the leader's offsets mean anything to a reader.
                            let led = t.partitions.get(&(i as u32)).filter(|p| p.leading_epoch().is_some());
                            let offsets = led.map(|p| p.offsets());
                            let replica_lags = led
                                .map(|p| p.follower_lags())
                                .unwrap_or_default()
                                .into_iter()
                                .map(|(b, lag)| pb::ReplicaLag {
                                    broker_id: b.0,
                                    lag: lag.and_then(|l| i64::try_from(l).ok()).unwrap_or(-1),
                                })
                                .collect();
                            let me = self.broker.node_id();
                            let leader_error = t
                                .partitions
                                .get(&(i as u32))
                                .filter(|_| state.leader.is_some_and(|l| l.0 == me))
                                .and_then(|p| p.leadership_failure().or_else(|| p.failure()))
                                .unwrap_or_default();
                            let cleaning = led.and_then(|p| p.cleaning_due()).map(|(stats, _)| stats);
                            pb::PartitionDescription {
                                leader_error,
                                dirty_ratio: cleaning.map_or(0.0, |c| c.dirty_ratio()),
                                cleaner_offset: cleaning.map_or(-1, |c| c.cleaner_offset.to_wire()),
                                last_clean_ms: cleaning.and_then(|c| c.last_clean_ms).unwrap_or(-1),
                                partition: i as u32,
                                leader_id: state.leader.map_or(-1, |l| l.0 as i32),
                                leader_epoch: state.leader_epoch.0,
                                replicas: state.replicas.iter().map(|b| b.0).collect(),
                                isr: state.isr.iter().map(|b| b.0).collect(),
                                log_start_offset: offsets.map_or(-1, |(start, _, _)| start.to_wire()),
                                high_watermark: offsets.map_or(-1, |(_, hw, _)| hw.to_wire()),
                                log_end_offset: offsets.map_or(-1, |(_, _, leo)| leo.to_wire()),
                                replica_lags,
                                from_leader: led.is_some(),
                            }
                        })
                        .collect(),
                },
                None => {
                    let e = BrokerError::UnknownTopicOrPartition { topic: name.clone(), partition: None };
                    pb::TopicDescription {
                        name,
                        error_code: e.code() as i32,
                        error_message: e.to_string(),
                        configs: Default::default(),
                        partitions: Vec::new(),
                    }
                }
            })
            .collect();
        Ok(Response::new(pb::DescribeTopicsResponse { topics }))
    }

    async fn alter_topic_configs(
        &self,
        request: Request<pb::AlterTopicConfigsRequest>,
    ) -> Result<Response<pb::AlterTopicConfigsResponse>, Status> {
        let req = request.into_inner();
        let set: BTreeMap<String, String> = req.set.into_iter().collect();
        let outcome = self.broker.alter_topic_configs(&req.name, &set, &req.delete).await;
        Ok(Response::new(pb::AlterTopicConfigsResponse { result: Some(result(req.name, outcome)) }))
    }

    async fn create_partitions(
        &self,
        request: Request<pb::CreatePartitionsRequest>,
    ) -> Result<Response<pb::CreatePartitionsResponse>, Status> {
        let req = request.into_inner();
        let outcome = self.broker.create_partitions(&req.name, req.count).await;
        Ok(Response::new(pb::CreatePartitionsResponse { result: Some(result(req.name, outcome)) }))
    }

    async fn describe_cluster(
        &self,
        _request: Request<pb::DescribeClusterRequest>,
    ) -> Result<Response<pb::DescribeClusterResponse>, Status> {
        let status = self.controller.status();
        let image = self.controller.image();
        Ok(Response::new(pb::DescribeClusterResponse {
            node_id: status.node_id.0,
            leader: status.leader.map(|l| l.0),
            term: status.term,
            applied_index: status.applied_index,
            voters: status
                .voters
                .iter()
                .map(|v| pb::ControllerVoter { id: v.id.0, matched_index: v.matched_index, lag: v.lag })
                .collect(),
            brokers: image
                .brokers()
                .values()
                .map(|b| pb::ClusterBroker {
                    id: b.id.0,
                    address: b.address.clone(),
                    incarnation: b.incarnation,
                    fenced: b.fenced,
                })
                .collect(),
        }))
    }
}
