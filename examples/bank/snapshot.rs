//! Snapshots of account state in a compacted topic (`cleanup_policy =
//! compact`), keyed by account id: the log cleaner may drop every snapshot
//! of an account but its last, which is the only one loading uses.
//!
//! A snapshot carries the offset it covers: the account's state with every
//! event below `covers` in its partition applied. Loading an account starts
//! from it and replays only the events at `covers` and after.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tally_client::{Acks, Client, partitioner};
use tally_proto::batch::RecordRef;

use super::account::Account;
use super::read::read_range;
use super::store::{Loaded, now_ms};

/// An account's state and the events offset it covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The state.
    pub account: Account,
    /// Every event of the account below this offset of its partition is in
    /// `account`.
    pub covers: i64,
}

/// The snapshots topic, with the last snapshot of every account in memory.
/// Cheap to clone (clones share the cache).
#[derive(Debug, Clone)]
pub struct SnapshotStore {
    client: Client,
    topic: Arc<str>,
    partitions: u32,
    latest: Arc<Mutex<BTreeMap<String, Snapshot>>>,
}

impl SnapshotStore {
    /// Reads every partition of `topic` to its end: the last snapshot of
    /// each account wins.
    pub async fn load(client: Client, topic: &str) -> anyhow::Result<SnapshotStore> {
        let partitions = u32::try_from(client.topic_info(topic).await?.leaders.len())?;
        let mut latest = BTreeMap::new();
        for partition in 0..partitions {
            let (records, _) = read_range(&client, topic, partition, 0, None).await?;
            for r in records {
                let (Some(key), Some(value)) = (r.key, r.value) else { continue };
                latest.insert(String::from_utf8(key.to_vec())?, serde_json::from_slice(&value)?);
            }
        }
        Ok(SnapshotStore { client, topic: topic.into(), partitions, latest: Arc::new(Mutex::new(latest)) })
    }

    /// The last snapshot of `account`.
    pub fn get(&self, account: &str) -> Option<Snapshot> {
        self.latest.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(account).cloned()
    }

    /// Writes `loaded` as its account's snapshot (covering `loaded.version`),
    /// unless this store already has one that covers as much.
    pub async fn save(&self, loaded: &Loaded) -> anyhow::Result<Snapshot> {
        let snapshot = Snapshot { account: loaded.account.clone(), covers: loaded.version };
        if let Some(newer) = self.get(&snapshot.account.id).filter(|s| s.covers >= snapshot.covers) {
            return Ok(newer);
        }
        let key = snapshot.account.id.as_bytes();
        let value = serde_json::to_vec(&snapshot)?;
        let partition = partitioner::partition_for_key(key, self.partitions);
        let record = RecordRef { timestamp: now_ms(), key: Some(key), value: Some(&value), headers: &[] };
        self.client.partition_client(self.topic.to_string(), partition).produce_records(&[record], Acks::All).await?;
        let mut latest = self.latest.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        latest.insert(snapshot.account.id.clone(), snapshot.clone());
        Ok(snapshot)
    }
}
