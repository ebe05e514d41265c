//! The `Groups` service: consumer groups over the coordinators this broker
//! runs (see `coordinator`). Every group operation is answered with a
//! Kafka error code per group or per partition; NOT_COORDINATOR and
//! COORDINATOR_LOAD_IN_PROGRESS tell the client to find the coordinator again
//! or retry.

use std::collections::BTreeSet;
use std::sync::Arc;

use tally_proto::ErrorCode;
use tally_proto::v1::{self as pb, groups_server::Groups};
use tonic::{Request, Response, Status};

use crate::coordinator::{Assignment, CommitOffset, Coordinators, GroupError, HeartbeatRequest};

/// Implements the `tally.v1.Groups` service.
#[derive(Debug, Clone)]
pub struct GroupsService {
    coordinators: Arc<Coordinators>,
}

impl GroupsService {
    /// A service over this broker's coordinators.
    pub fn new(coordinators: Arc<Coordinators>) -> Self {
        GroupsService { coordinators }
    }
}

fn code(e: &GroupError) -> i32 {
    ErrorCode::try_from(i32::from(e.kafka_code())).unwrap_or(ErrorCode::UnknownServerError) as i32
}

fn to_assignment(parts: Vec<pb::TopicPartitions>) -> Assignment {
    let mut a = Assignment::new();
    for tp in parts {
        a.entry(tp.topic).or_default().extend(tp.partitions);
    }
    a.retain(|_, ps| !ps.is_empty());
    a
}

fn from_assignment(a: &Assignment) -> Vec<pb::TopicPartitions> {
    a.iter()
        .filter(|(_, ps)| !ps.is_empty())
        .map(|(t, ps)| pb::TopicPartitions { topic: t.clone(), partitions: ps.iter().copied().collect() })
        .collect()
}

fn pairs(parts: &[pb::TopicPartitions]) -> Vec<(String, u32)> {
    parts.iter().flat_map(|tp| tp.partitions.iter().map(|p| (tp.topic.clone(), *p))).collect()
}

#[tonic::async_trait]
impl Groups for GroupsService {
    async fn find_coordinator(
        &self,
        request: Request<pb::FindCoordinatorRequest>,
    ) -> Result<Response<pb::FindCoordinatorResponse>, Status> {
        let req = request.into_inner();
        Ok(Response::new(match self.coordinators.find(&req.key).await {
            Ok((node_id, address)) => {
                pb::FindCoordinatorResponse { error_code: 0, error_message: String::new(), node_id, address }
            }
            Err(e) => {
                pb::FindCoordinatorResponse { error_code: code(&e), error_message: e.to_string(), ..Default::default() }
            }
        }))
    }

    async fn consumer_group_heartbeat(
        &self,
        request: Request<pb::ConsumerGroupHeartbeatRequest>,
    ) -> Result<Response<pb::ConsumerGroupHeartbeatResponse>, Status> {
        // The member's host as this broker sees it (Kafka's HOST column).
        let peer = request.remote_addr().map(|a| a.ip().to_string());
        let req = request.into_inner();
        let client_host = if req.client_host.is_empty() { peer.unwrap_or_default() } else { req.client_host };
        let hb = HeartbeatRequest {
            group: req.group_id.clone(),
            member_id: req.member_id.clone(),
            member_epoch: req.member_epoch,
            topics: Some(req.subscribed_topic_names.into_iter().collect::<BTreeSet<_>>()),
            regex: Some(req.subscribed_topic_regex),
            assignor: Some(req.server_assignor),
            rebalance_timeout_ms: req.rebalance_timeout_ms,
            session_timeout_ms: req.session_timeout_ms,
            owned: Some(to_assignment(req.owned_partitions)),
            client_id: req.client_id,
            client_host,
        };
        let max_wait = std::time::Duration::from_millis(u64::from(req.max_wait_ms));
        let outcome = self.coordinators.heartbeat(hb, max_wait).await;
        Ok(Response::new(match outcome {
            Ok(r) => pb::ConsumerGroupHeartbeatResponse {
                error_code: 0,
                error_message: String::new(),
                member_id: r.member_id,
                member_epoch: r.member_epoch,
                heartbeat_interval_ms: r.heartbeat_interval_ms,
                assignment: from_assignment(&r.assignment),
            },
            Err(e) => pb::ConsumerGroupHeartbeatResponse {
                error_code: code(&e),
                error_message: e.to_string(),
                member_id: req.member_id,
                ..Default::default()
            },
        }))
    }

    async fn offset_commit(
        &self,
        request: Request<pb::OffsetCommitRequest>,
    ) -> Result<Response<pb::OffsetCommitResponse>, Status> {
        let req = request.into_inner();
        let offsets: Vec<CommitOffset> = req
            .partitions
            .iter()
            .map(|p| CommitOffset {
                topic: p.topic.clone(),
                partition: p.partition,
                offset: p.committed_offset,
                leader_epoch: p.committed_leader_epoch,
                metadata: p.metadata.clone(),
            })
            .collect();
        let (group, member, epoch) = (req.group_id.clone(), req.member_id.clone(), req.member_epoch);
        let outcome = self
            .coordinators
            .run(&req.group_id, move |shard, topics, now| shard.commit(&group, &member, epoch, &offsets, topics, now))
            .await;
        let answer = |error: Option<&GroupError>, i: usize| {
            let p = &req.partitions[i];
            pb::OffsetCommitPartitionResult {
                topic: p.topic.clone(),
                partition: p.partition,
                error_code: error.map_or(0, code),
                error_message: error.map(ToString::to_string).unwrap_or_default(),
            }
        };
        Ok(Response::new(match outcome {
            Ok(results) => pb::OffsetCommitResponse {
                error_code: 0,
                error_message: String::new(),
                partitions: results.iter().enumerate().map(|(i, r)| answer(r.as_ref().err(), i)).collect(),
            },
            Err(e) => pb::OffsetCommitResponse {
                error_code: code(&e),
                error_message: e.to_string(),
                partitions: (0..req.partitions.len()).map(|i| answer(Some(&e), i)).collect(),
            },
        }))
    }

    async fn offset_fetch(
        &self,
        request: Request<pb::OffsetFetchRequest>,
    ) -> Result<Response<pb::OffsetFetchResponse>, Status> {
        let req = request.into_inner();
        let wanted = (!req.partitions.is_empty()).then(|| pairs(&req.partitions));
        let group = req.group_id.clone();
        let outcome = self
            .coordinators
            .run(&req.group_id, move |shard, _, _| Ok((Vec::new(), shard.offsets(&group, wanted.as_deref()))))
            .await;
        Ok(Response::new(match outcome {
            Ok(offsets) => pb::OffsetFetchResponse {
                error_code: 0,
                error_message: String::new(),
                partitions: offsets
                    .into_iter()
                    .map(|(topic, partition, v)| match v {
                        Some(v) => pb::OffsetFetchPartition {
                            topic,
                            partition,
                            committed_offset: v.offset,
                            committed_leader_epoch: v.leader_epoch,
                            metadata: v.metadata,
                            commit_time_ms: v.commit_time_ms,
                        },
                        None => pb::OffsetFetchPartition {
                            topic,
                            partition,
                            committed_offset: -1,
                            committed_leader_epoch: -1,
                            ..Default::default()
                        },
                    })
                    .collect(),
            },
            Err(e) => {
                pb::OffsetFetchResponse { error_code: code(&e), error_message: e.to_string(), partitions: vec![] }
            }
        }))
    }

    async fn list_groups(
        &self,
        _request: Request<pb::ListGroupsRequest>,
    ) -> Result<Response<pb::ListGroupsResponse>, Status> {
        let mut groups = Vec::new();
        let mut error = None;
        for r in self.coordinators.run_all(|shard| shard.list()).await {
            match r {
                Ok(list) => groups.extend(
                    list.into_iter().map(|g| pb::ListedGroup { group_id: g.group, state: g.state.name().into() }),
                ),
                Err(e) => error = Some(e),
            }
        }
        groups.sort_by(|a, b| a.group_id.cmp(&b.group_id));
        Ok(Response::new(pb::ListGroupsResponse {
            error_code: error.as_ref().map_or(0, code),
            error_message: error.map(|e| e.to_string()).unwrap_or_default(),
            groups,
        }))
    }

    async fn describe_groups(
        &self,
        request: Request<pb::DescribeGroupsRequest>,
    ) -> Result<Response<pb::DescribeGroupsResponse>, Status> {
        let mut groups = Vec::new();
        for id in request.into_inner().group_ids {
            let group = id.clone();
            let outcome =
                self.coordinators.run(&id, move |shard, _, _| shard.describe(&group).map(|d| (Vec::new(), d))).await;
            groups.push(match outcome {
                Ok(d) => pb::DescribedGroup {
                    error_code: 0,
                    error_message: String::new(),
                    group_id: d.group,
                    state: d.state.name().into(),
                    group_epoch: d.epoch,
                    assignment_epoch: d.target_epoch,
                    assignor_name: d.assignor,
                    configs: d.configs.into_iter().collect(),
                    members: d
                        .members
                        .into_iter()
                        .map(|m| pb::DescribedMember {
                            member_id: m.member_id,
                            member_epoch: m.member_epoch,
                            state: m.state.name().into(),
                            client_id: m.client_id,
                            client_host: m.client_host,
                            subscribed_topic_names: m.topics.into_iter().collect(),
                            subscribed_topic_regex: m.regex.unwrap_or_default(),
                            assignment: from_assignment(&m.assigned),
                            target_assignment: from_assignment(&m.target),
                            revoking: from_assignment(&m.revoking),
                        })
                        .collect(),
                },
                Err(e) => pb::DescribedGroup {
                    error_code: code(&e),
                    error_message: e.to_string(),
                    group_id: id,
                    ..Default::default()
                },
            });
        }
        Ok(Response::new(pb::DescribeGroupsResponse { groups }))
    }

    async fn delete_groups(
        &self,
        request: Request<pb::DeleteGroupsRequest>,
    ) -> Result<Response<pb::DeleteGroupsResponse>, Status> {
        let mut results = Vec::new();
        for id in request.into_inner().group_ids {
            let group = id.clone();
            let outcome = self
                .coordinators
                .run(&id, move |shard, _, now| shard.delete_group(&group, now).map(|records| (records, ())))
                .await;
            results.push(pb::DeletedGroup {
                group_id: id,
                error_code: outcome.as_ref().err().map_or(0, code),
                error_message: outcome.err().map(|e| e.to_string()).unwrap_or_default(),
            });
        }
        Ok(Response::new(pb::DeleteGroupsResponse { results }))
    }

    async fn alter_group_configs(
        &self,
        request: Request<pb::AlterGroupConfigsRequest>,
    ) -> Result<Response<pb::AlterGroupConfigsResponse>, Status> {
        let req = request.into_inner();
        let mut changes: Vec<(String, Option<String>)> = req.set.into_iter().map(|(k, v)| (k, Some(v))).collect();
        changes.extend(req.delete.into_iter().map(|k| (k, None)));
        let group = req.group_id.clone();
        let outcome = self
            .coordinators
            .run(&req.group_id, move |shard, _, now| shard.alter_configs(&group, &changes, now).map(|r| (r, ())))
            .await;
        Ok(Response::new(pb::AlterGroupConfigsResponse {
            error_code: outcome.as_ref().err().map_or(0, code),
            error_message: outcome.err().map(|e| e.to_string()).unwrap_or_default(),
        }))
    }

    async fn offset_delete(
        &self,
        request: Request<pb::OffsetDeleteRequest>,
    ) -> Result<Response<pb::OffsetDeleteResponse>, Status> {
        let req = request.into_inner();
        let wanted = pairs(&req.partitions);
        let group = req.group_id.clone();
        let asked = wanted.clone();
        let outcome = self
            .coordinators
            .run(&req.group_id, move |shard, topics, now| shard.delete_offsets(&group, &asked, topics, now))
            .await;
        let answer = |(topic, partition): &(String, u32), e: Option<&GroupError>| pb::OffsetCommitPartitionResult {
            topic: topic.clone(),
            partition: *partition,
            error_code: e.map_or(0, code),
            error_message: e.map(ToString::to_string).unwrap_or_default(),
        };
        Ok(Response::new(match outcome {
            Ok(results) => pb::OffsetDeleteResponse {
                error_code: 0,
                error_message: String::new(),
                partitions: wanted.iter().zip(&results).map(|(tp, r)| answer(tp, r.as_ref().err())).collect(),
            },
            Err(e) => pb::OffsetDeleteResponse {
                error_code: code(&e),
                error_message: e.to_string(),
                partitions: wanted.iter().map(|tp| answer(tp, Some(&e))).collect(),
            },
        }))
    }
}
