//! The group coordinator (Kafka 4's consumer-group protocol, KIP-848).
//!
//! Each partition of the internal `__consumer_offsets` topic holds the state
//! of the groups that hash to it, as keyed records. The broker leading that
//! partition runs one [`Shard`]: a sans-IO state machine whose inputs are
//! requests, replayed records and clock ticks, and whose outputs are the
//! records to append and the answers. The [`runtime`] task around it loads a
//! shard by replaying its partition, appends the records a request produced,
//! and releases the answer only once the high watermark has passed them.
//!
//! - `records.rs`: the record keys and values (JSON, one key per thing
//!   described, a tombstone deletes), so compaction keeps the latest.
//! - `assignor.rs`: the server-side assignors, `uniform` (sticky) and `range`.
//! - `member.rs`: a member's state and its convergence to its target
//!   assignment (revoke first, then assign what others released).
//! - `shard.rs`: the groups of one offsets partition and every request on them.
//! - `runtime.rs`: the tasks that feed the shards of the partitions this
//!   broker leads.

pub mod assignor;
pub mod member;
pub mod records;
pub mod runtime;
pub mod shard;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};

pub use member::{Member, MemberState};
pub use runtime::Coordinators;
pub use shard::{
    CommitOffset, GROUP_CONFIGS, GroupConfig, GroupDescription, GroupListing, GroupState, HeartbeatRequest,
    HeartbeatResponse, MemberDescription, Shard,
};

/// The internal topic holding every group's state.
pub const OFFSETS_TOPIC: &str = "__consumer_offsets";

/// Partitions per topic, by topic name.
pub type Assignment = BTreeMap<String, BTreeSet<u32>>;

/// The topics a shard can assign: name to partition count (internal topics
/// left out).
pub type TopicsView = BTreeMap<String, u32>;

/// The offsets partition that coordinates `group`: Kafka's murmur2 of the
/// group id, made positive, modulo the offsets topic's partition count.
pub fn partition_for_group(group: &str, partitions: u32) -> u32 {
    tally_proto::partitioner::partition_for_key(group.as_bytes(), partitions)
}

/// What a coordinator request can fail with; each has Kafka's error number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GroupError {
    /// A malformed request (empty group id, missing subscription, ...).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The member id is not a member of the group.
    #[error("unknown member `{member}` of group `{group}`{hint}")]
    UnknownMemberId {
        /// Group.
        group: String,
        /// Member id.
        member: String,
        /// What to do about it.
        hint: String,
    },
    /// The member's epoch is not one the coordinator can accept: it must
    /// release everything and rejoin with epoch 0.
    #[error("member `{member}` sent epoch {received}, but its epoch is {current}: rejoin with epoch 0")]
    FencedMemberEpoch {
        /// Member id.
        member: String,
        /// Epoch received.
        received: i32,
        /// Epoch the coordinator has.
        current: i32,
    },
    /// A commit from a member epoch that is not the member's current one, or
    /// for a partition the member does not own.
    #[error("stale member epoch: {0}")]
    StaleMemberEpoch(String),
    /// The group is full.
    #[error("group `{group}` already has {max} members (group_consumer_max_size)")]
    GroupMaxSizeReached {
        /// Group.
        group: String,
        /// Limit.
        max: u32,
    },
    /// A session timeout outside the broker's bounds.
    #[error("session timeout {requested} ms is outside [{min}, {max}] ms (group_consumer_min/max_session_timeout_ms)")]
    InvalidSessionTimeout {
        /// Requested.
        requested: u32,
        /// Lower bound.
        min: u32,
        /// Upper bound.
        max: u32,
    },
    /// No such group.
    #[error("group `{0}` does not exist")]
    GroupIdNotFound(String),
    /// The group has members, and the operation needs it empty.
    #[error("group `{0}` has active members; stop them (or wait for their sessions to end) first")]
    NonEmptyGroup(String),
    /// OffsetDelete of a topic the group is subscribed to.
    #[error("group `{group}` is subscribed to topic `{topic}`: its offsets cannot be deleted while it is")]
    GroupSubscribedToTopic {
        /// Group.
        group: String,
        /// Topic.
        topic: String,
    },
    /// Commit metadata over the limit.
    #[error("offset metadata of {len} bytes exceeds {max} bytes")]
    OffsetMetadataTooLarge {
        /// Length.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// The topic or partition does not exist.
    #[error("unknown topic or partition: {topic}/{partition}")]
    UnknownTopicOrPartition {
        /// Topic.
        topic: String,
        /// Partition.
        partition: u32,
    },
    /// The server assignor is not one this broker has.
    #[error("unknown server assignor `{0}` (this broker has `uniform` and `range`)")]
    UnsupportedAssignor(String),
    /// The subscription pattern does not compile.
    #[error("invalid subscription pattern `{pattern}`: {reason}")]
    InvalidRegularExpression {
        /// Pattern.
        pattern: String,
        /// Compiler's message.
        reason: String,
    },
    /// A group config that is unknown or out of bounds.
    #[error("invalid group config: {0}")]
    InvalidConfig(String),
    /// This broker is not (or no longer) the group's coordinator.
    #[error("this broker is not the coordinator of group `{0}`; ask FindCoordinator again")]
    NotCoordinator(String),
    /// The coordinator is loading the group's state; retry shortly.
    #[error("the coordinator of group `{0}` is loading its state; retry shortly")]
    CoordinatorLoadInProgress(String),
    /// The coordinator cannot answer now (its records could not be
    /// replicated, or the offsets topic is being created); retry.
    #[error("coordinator not available: {0}")]
    CoordinatorNotAvailable(String),
}

impl GroupError {
    /// Kafka's error number.
    pub fn kafka_code(&self) -> i16 {
        match self {
            GroupError::InvalidRequest(_) => 42,
            GroupError::UnknownMemberId { .. } => 25,
            GroupError::FencedMemberEpoch { .. } => 110,
            GroupError::StaleMemberEpoch(_) => 113,
            GroupError::GroupMaxSizeReached { .. } => 81,
            GroupError::InvalidSessionTimeout { .. } => 26,
            GroupError::GroupIdNotFound(_) => 69,
            GroupError::NonEmptyGroup(_) => 68,
            GroupError::GroupSubscribedToTopic { .. } => 86,
            GroupError::OffsetMetadataTooLarge { .. } => 12,
            GroupError::UnknownTopicOrPartition { .. } => 3,
            GroupError::UnsupportedAssignor(_) => 112,
            GroupError::InvalidRegularExpression { .. } => 130,
            GroupError::InvalidConfig(_) => 40,
            GroupError::NotCoordinator(_) => 16,
            GroupError::CoordinatorLoadInProgress(_) => 14,
            GroupError::CoordinatorNotAvailable(_) => 15,
        }
    }
}
