//! The coordinator's records in `__consumer_offsets`: one key per thing a
//! record describes, so compaction keeps the latest of each and a tombstone
//! (no value) deletes it. Keys and values are JSON; serde writes a struct's
//! fields in declaration order, so a key's bytes are canonical.
//!
//! A group's state is: a [`GroupValue`] (group epoch, target assignment
//! epoch, the subscribed topics' partition counts), a [`MemberValue`] per
//! member (subscription and current assignment), a target assignment per
//! member, and a committed offset per partition. Replay does not depend on
//! the order of different keys (compaction reorders them): a record for an
//! unknown group creates it.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::Assignment;
use super::member::MemberState;

/// What a record describes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecordKey {
    /// A group's epochs and subscription metadata.
    Group {
        /// Group id.
        group: String,
    },
    /// A member's subscription and current assignment.
    Member {
        /// Group id.
        group: String,
        /// Member id.
        member: String,
    },
    /// A member's target assignment.
    Target {
        /// Group id.
        group: String,
        /// Member id.
        member: String,
    },
    /// A committed offset.
    Offset {
        /// Group id.
        group: String,
        /// Topic.
        topic: String,
        /// Partition.
        partition: u32,
    },
}

impl RecordKey {
    /// The group the record belongs to.
    pub fn group(&self) -> &str {
        match self {
            RecordKey::Group { group }
            | RecordKey::Member { group, .. }
            | RecordKey::Target { group, .. }
            | RecordKey::Offset { group, .. } => group,
        }
    }
}

/// A group's epochs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupValue {
    /// Bumped on every change of members, subscriptions or partition counts.
    pub epoch: i32,
    /// The group epoch the target assignment was computed at.
    pub target_epoch: i32,
    /// Partition counts of the subscribed topics when the epoch was bumped.
    pub partition_counts: BTreeMap<String, u32>,
    /// The group's own settings (Kafka's dynamic group configs), by name:
    /// `consumer_session_timeout_ms`, `consumer_heartbeat_interval_ms`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub configs: BTreeMap<String, u32>,
}

/// A member's subscription and where it stands.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberValue {
    /// Member epoch.
    pub epoch: i32,
    /// The epoch before the last change (a retried heartbeat may carry it).
    pub previous_epoch: i32,
    /// Reconciliation state.
    pub state: MemberState,
    /// Partitions the member owns.
    pub assigned: Assignment,
    /// Partitions the member must give up before it may move on.
    pub revoking: Assignment,
    /// Subscribed topic names.
    pub topics: BTreeSet<String>,
    /// Subscribed pattern (matched against topic names).
    pub regex: Option<String>,
    /// The server assignor the member asked for.
    pub assignor: Option<String>,
    /// How long the member may take to revoke.
    pub rebalance_timeout_ms: u32,
    /// How long the member may go without a heartbeat.
    pub session_timeout_ms: u32,
    /// The client's id.
    pub client_id: String,
    /// The client's host.
    pub client_host: String,
}

/// A committed offset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OffsetValue {
    /// The next offset to read (Kafka's convention).
    pub offset: i64,
    /// Leader epoch of the record before `offset`, -1 when unknown.
    pub leader_epoch: i32,
    /// Application metadata.
    pub metadata: String,
    /// When it was committed (ms since the epoch).
    pub commit_time_ms: u64,
}

/// A record's value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecordValue {
    /// For [`RecordKey::Group`].
    Group(GroupValue),
    /// For [`RecordKey::Member`].
    Member(MemberValue),
    /// For [`RecordKey::Target`].
    Target(Assignment),
    /// For [`RecordKey::Offset`].
    Offset(OffsetValue),
}

/// One record: a key and a value, or a tombstone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoordinatorRecord {
    /// What it describes.
    pub key: RecordKey,
    /// The new value; `None` deletes.
    pub value: Option<RecordValue>,
}

/// A record that cannot be read back.
#[derive(Debug, thiserror::Error)]
#[error("unreadable coordinator record at offset {offset}: {reason}")]
pub struct RecordError {
    /// Where.
    pub offset: i64,
    /// Why.
    pub reason: String,
}

impl CoordinatorRecord {
    /// A record setting `key` to `value`.
    pub fn set(key: RecordKey, value: RecordValue) -> CoordinatorRecord {
        CoordinatorRecord { key, value: Some(value) }
    }

    /// A tombstone for `key`.
    pub fn delete(key: RecordKey) -> CoordinatorRecord {
        CoordinatorRecord { key, value: None }
    }

    /// The key's bytes.
    pub fn encode_key(&self) -> Vec<u8> {
        serde_json::to_vec(&self.key).expect("record keys serialize")
    }

    /// The value's bytes (`None` for a tombstone).
    pub fn encode_value(&self) -> Option<Vec<u8>> {
        self.value.as_ref().map(|v| serde_json::to_vec(v).expect("record values serialize"))
    }

    /// True when `key` is one of this version's record keys.
    pub fn is_known_key(key: &[u8]) -> bool {
        serde_json::from_slice::<RecordKey>(key).is_ok()
    }

    /// Reads a record back; a value that does not match its key's kind is
    /// an error.
    pub fn decode(offset: i64, key: &[u8], value: Option<&[u8]>) -> Result<CoordinatorRecord, RecordError> {
        let err = |reason: String| RecordError { offset, reason };
        let key: RecordKey = serde_json::from_slice(key).map_err(|e| err(format!("key: {e}")))?;
        let value = match value {
            None => None,
            Some(v) => Some(serde_json::from_slice::<RecordValue>(v).map_err(|e| err(format!("value: {e}")))?),
        };
        let matches = matches!(
            (&key, &value),
            (_, None)
                | (RecordKey::Group { .. }, Some(RecordValue::Group(_)))
                | (RecordKey::Member { .. }, Some(RecordValue::Member(_)))
                | (RecordKey::Target { .. }, Some(RecordValue::Target(_)))
                | (RecordKey::Offset { .. }, Some(RecordValue::Offset(_)))
        );
        if !matches {
            return Err(err(format!("value of the wrong kind for key {key:?}")));
        }
        Ok(CoordinatorRecord { key, value })
    }
}
