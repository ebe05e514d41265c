//! Talking to a group's coordinator: finding it, retrying while it moves or
//! loads, and the group operations of [`Admin`] (list, describe, delete,
//! offsets).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use tally_proto::ErrorCode;
use tally_proto::connection::Connection as Channel;
use tally_proto::v1::groups_client::GroupsClient;
use tally_proto::v1::{self as pb};

use crate::admin::Admin;
use crate::client::Client;
use crate::error::{Error, Result};

/// Partitions per topic.
pub type TopicPartitions = BTreeMap<String, BTreeSet<u32>>;

/// True for the answers that mean "ask FindCoordinator again, or wait".
fn coordinator_moved(e: &Error) -> bool {
    matches!(
        e.code(),
        Some(ErrorCode::NotCoordinator | ErrorCode::CoordinatorNotAvailable | ErrorCode::CoordinatorLoadInProgress)
    ) || (e.code().is_none() && e.is_retriable())
}

pub(crate) fn to_wire(a: &TopicPartitions) -> Vec<pb::TopicPartitions> {
    a.iter()
        .filter(|(_, ps)| !ps.is_empty())
        .map(|(t, ps)| pb::TopicPartitions { topic: t.clone(), partitions: ps.iter().copied().collect() })
        .collect()
}

pub(crate) fn from_wire(parts: Vec<pb::TopicPartitions>) -> TopicPartitions {
    let mut a = TopicPartitions::new();
    for tp in parts {
        a.entry(tp.topic).or_default().extend(tp.partitions);
    }
    a.retain(|_, ps| !ps.is_empty());
    a
}

/// The group-level error of an answer, if any.
pub(crate) fn check(code: i32, message: String, group: &str) -> Result<()> {
    if code == 0 { Ok(()) } else { Err(Error::broker(code, message, group, None)) }
}

/// The coordinator of one group, found on first use and again whenever it
/// answers that it moved.
#[derive(Debug)]
pub(crate) struct CoordinatorClient {
    client: Client,
    group: String,
    address: Mutex<Option<String>>,
}

impl CoordinatorClient {
    pub(crate) fn new(client: Client, group: String) -> Self {
        CoordinatorClient { client, group, address: Mutex::new(None) }
    }

    pub(crate) fn group(&self) -> &str {
        &self.group
    }

    async fn find(&self) -> Result<String> {
        if let Some(a) = self.address.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone() {
            return Ok(a);
        }
        let response = self
            .client
            .groups_rpc()
            .find_coordinator(pb::FindCoordinatorRequest { key: self.group.clone() })
            .await?
            .into_inner();
        check(response.error_code, response.error_message, &self.group)?;
        *self.address.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(response.address.clone());
        Ok(response.address)
    }

    fn forget(&self, address: Option<&str>) {
        *self.address.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        if let Some(a) = address {
            self.client.forget_channel(a);
        }
    }

    /// Runs `op` against the coordinator, finding it again and retrying
    /// (with backoff) while it has moved, is loading or cannot be reached,
    /// for at most `patience`.
    pub(crate) async fn call<T, F, Fut>(&self, patience: Duration, op: F) -> Result<T>
    where
        F: Fn(GroupsClient<Channel>) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let deadline = tokio::time::Instant::now() + patience;
        let mut backoff = Duration::from_millis(50);
        loop {
            let mut address = None;
            let outcome = match self.find().await {
                Ok(a) => {
                    address = Some(a.clone());
                    match self.client.groups_rpc_at(&a) {
                        Ok(rpc) => op(rpc).await,
                        Err(e) => Err(e),
                    }
                }
                Err(e) => Err(e),
            };
            match outcome {
                Err(e) if coordinator_moved(&e) && tokio::time::Instant::now() + backoff < deadline => {
                    tracing::debug!(group = %self.group, error = %e, "coordinator not reachable; retrying");
                    let transport = e.code().is_none();
                    self.forget(if transport { address.as_deref() } else { None });
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                other => return other,
            }
        }
    }

    /// Committed offsets of `partitions` (all of the group's when empty):
    /// (topic, partition) to (offset, leader epoch, metadata); -1 when none.
    pub(crate) async fn fetch_offsets(
        &self,
        partitions: &TopicPartitions,
    ) -> Result<BTreeMap<(String, u32), CommittedOffset>> {
        let request = pb::OffsetFetchRequest { group_id: self.group.clone(), partitions: to_wire(partitions) };
        let response = self
            .call(self.client.request_timeout(), |mut rpc| {
                let request = request.clone();
                async move {
                    let r = rpc.offset_fetch(request).await?.into_inner();
                    check(r.error_code, r.error_message.clone(), &self.group)?;
                    Ok(r)
                }
            })
            .await?;
        Ok(response
            .partitions
            .into_iter()
            .map(|p| {
                let value = CommittedOffset {
                    offset: p.committed_offset,
                    leader_epoch: p.committed_leader_epoch,
                    metadata: p.metadata,
                    commit_time_ms: p.commit_time_ms,
                };
                ((p.topic, p.partition), value)
            })
            .collect())
    }

    /// Commits `offsets` as `member_id` at `member_epoch` (empty and -1 for
    /// a group without members); answers once the commit is replicated.
    pub(crate) async fn commit(
        &self,
        member_id: &str,
        member_epoch: i32,
        offsets: &BTreeMap<(String, u32), i64>,
    ) -> Result<()> {
        let request = pb::OffsetCommitRequest {
            group_id: self.group.clone(),
            member_id: member_id.to_string(),
            member_epoch,
            partitions: offsets
                .iter()
                .map(|((topic, partition), offset)| pb::OffsetCommitPartition {
                    topic: topic.clone(),
                    partition: *partition,
                    committed_offset: *offset,
                    committed_leader_epoch: -1,
                    metadata: String::new(),
                })
                .collect(),
        };
        self.call(self.client.request_timeout(), |mut rpc| {
            let request = request.clone();
            async move {
                let r = rpc.offset_commit(request).await?.into_inner();
                check(r.error_code, r.error_message.clone(), &self.group)?;
                for p in r.partitions {
                    if p.error_code != 0 {
                        return Err(Error::broker(p.error_code, p.error_message, &p.topic, Some(p.partition)));
                    }
                }
                Ok(())
            }
        })
        .await
    }
}

/// A committed offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedOffset {
    /// The next offset to read; -1 when nothing is committed.
    pub offset: i64,
    /// Leader epoch of the record before it (-1 unknown).
    pub leader_epoch: i32,
    /// Metadata committed with it.
    pub metadata: String,
    /// When it was committed (ms since the epoch; 0 when none).
    pub commit_time_ms: u64,
}

/// A group in a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupListing {
    /// Group id.
    pub group: String,
    /// State: Empty, Assigning, Reconciling or Stable.
    pub state: String,
}

/// A member of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMember {
    /// Member id.
    pub member_id: String,
    /// Member epoch.
    pub member_epoch: i32,
    /// Reconciliation state (STABLE, UNREVOKED_PARTITIONS, UNRELEASED_PARTITIONS).
    pub state: String,
    /// Client id.
    pub client_id: String,
    /// Client host.
    pub client_host: String,
    /// Subscribed topics.
    pub topics: Vec<String>,
    /// Subscribed pattern (empty: none).
    pub regex: String,
    /// Partitions it owns.
    pub assignment: TopicPartitions,
    /// Partitions it is to own.
    pub target: TopicPartitions,
}

/// A group's description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupDescription {
    /// Group id.
    pub group: String,
    /// State.
    pub state: String,
    /// Group epoch.
    pub epoch: i32,
    /// Target assignment epoch.
    pub assignment_epoch: i32,
    /// Assignor.
    pub assignor: String,
    /// The group's own configs (unset ones follow the broker's).
    pub configs: BTreeMap<String, u32>,
    /// Members.
    pub members: Vec<GroupMember>,
}

impl Admin {
    fn coordinator(&self, group: &str) -> CoordinatorClient {
        CoordinatorClient::new(self.client().clone(), group.to_string())
    }

    /// Every consumer group of the cluster (each broker lists the groups it
    /// coordinates).
    pub async fn list_groups(&self) -> Result<Vec<GroupListing>> {
        let mut out = Vec::new();
        for (_, address) in self.client().broker_addresses().await? {
            let response = self.client().groups_rpc_at(&address)?.list_groups(pb::ListGroupsRequest {}).await?;
            let response = response.into_inner();
            check(response.error_code, response.error_message, "")?;
            out.extend(response.groups.into_iter().map(|g| GroupListing { group: g.group_id, state: g.state }));
        }
        out.sort_by(|a, b| a.group.cmp(&b.group));
        out.dedup_by(|a, b| a.group == b.group);
        Ok(out)
    }

    /// A group's state, members and assignments (GROUP_ID_NOT_FOUND when
    /// it does not exist).
    pub async fn describe_group(&self, group: &str) -> Result<GroupDescription> {
        let coordinator = self.coordinator(group);
        let request = pb::DescribeGroupsRequest { group_ids: vec![group.to_string()] };
        let d = coordinator
            .call(self.client().request_timeout(), |mut rpc| {
                let request = request.clone();
                async move {
                    let mut r = rpc.describe_groups(request).await?.into_inner();
                    let d = r.groups.pop().ok_or_else(|| Error::InvalidArgument("empty describe answer".into()))?;
                    check(d.error_code, d.error_message.clone(), group)?;
                    Ok(d)
                }
            })
            .await?;
        Ok(GroupDescription {
            group: d.group_id,
            state: d.state,
            epoch: d.group_epoch,
            assignment_epoch: d.assignment_epoch,
            assignor: d.assignor_name,
            configs: d.configs.into_iter().collect(),
            members: d
                .members
                .into_iter()
                .map(|m| GroupMember {
                    member_id: m.member_id,
                    member_epoch: m.member_epoch,
                    state: m.state,
                    client_id: m.client_id,
                    client_host: m.client_host,
                    topics: m.subscribed_topic_names,
                    regex: m.subscribed_topic_regex,
                    assignment: from_wire(m.assignment),
                    target: from_wire(m.target_assignment),
                })
                .collect(),
        })
    }

    /// Sets (`Some`) or removes (`None`) a group's own configs:
    /// `consumer_session_timeout_ms` (within the broker's bounds) and
    /// `consumer_heartbeat_interval_ms`. All or nothing.
    pub async fn alter_group_configs(&self, group: &str, changes: &[(&str, Option<&str>)]) -> Result<()> {
        let coordinator = self.coordinator(group);
        let request = pb::AlterGroupConfigsRequest {
            group_id: group.to_string(),
            set: changes.iter().filter_map(|(k, v)| v.map(|v| (k.to_string(), v.to_string()))).collect(),
            delete: changes.iter().filter(|(_, v)| v.is_none()).map(|(k, _)| k.to_string()).collect(),
        };
        coordinator
            .call(self.client().request_timeout(), |mut rpc| {
                let request = request.clone();
                async move {
                    let r = rpc.alter_group_configs(request).await?.into_inner();
                    check(r.error_code, r.error_message, group)
                }
            })
            .await
    }

    /// Deletes an empty group and its committed offsets.
    pub async fn delete_group(&self, group: &str) -> Result<()> {
        let coordinator = self.coordinator(group);
        let request = pb::DeleteGroupsRequest { group_ids: vec![group.to_string()] };
        coordinator
            .call(self.client().request_timeout(), |mut rpc| {
                let request = request.clone();
                async move {
                    let mut r = rpc.delete_groups(request).await?.into_inner();
                    let d = r.results.pop().ok_or_else(|| Error::InvalidArgument("empty delete answer".into()))?;
                    check(d.error_code, d.error_message, group)
                }
            })
            .await
    }

    /// A group's committed offsets: of `partitions`, or all when empty.
    pub async fn group_offsets(
        &self,
        group: &str,
        partitions: &TopicPartitions,
    ) -> Result<BTreeMap<(String, u32), CommittedOffset>> {
        self.coordinator(group).fetch_offsets(partitions).await
    }

    /// Sets a group's committed offsets (the group must have no members,
    /// as Kafka's `--reset-offsets` requires).
    pub async fn alter_group_offsets(&self, group: &str, offsets: &BTreeMap<(String, u32), i64>) -> Result<()> {
        self.coordinator(group).commit("", -1, offsets).await
    }
}
