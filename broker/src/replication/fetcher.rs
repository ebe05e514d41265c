//! A follower's fetchers: one task per leader broker, fetching every
//! partition this broker follows from that leader in one long-polling
//! request, appending what comes back as the same bytes (CRC checked), and
//! truncating where the leader says the logs diverge.
//!
//! What to follow comes from the metadata image ([`Fetchers::update`]); a
//! task whose leader no longer leads anything here is stopped. A partition
//! whose fetch fails (a stale epoch, a storage error) pauses for a backoff
//! while the others go on. Every buffer is bounded: one request in flight
//! per leader, `max_bytes` per response.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tally_proto::ErrorCode;
use tally_proto::batch::{RecordBatch, split_batches};
use tally_proto::connection::Connection as Channel;
use tally_proto::internal::v1 as pb;
use tally_proto::internal::v1::replication_client::ReplicationClient;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::Instrument;

use crate::controller::BrokerId;
use crate::partition::Partition;
use crate::storage::Offset;

/// A partition this broker follows.
#[derive(Debug, Clone)]
pub struct Follow {
    /// Topic name.
    pub topic: Arc<str>,
    /// The topic's stable id.
    pub topic_id: Arc<str>,
    /// The partition, in the follower role.
    pub partition: Arc<Partition>,
    /// The leader epoch it follows in.
    pub leader_epoch: u32,
}

/// How fetchers fetch.
#[derive(Debug, Clone)]
pub struct FetcherSettings {
    /// This broker's id, sent as the replica id.
    pub replica_id: BrokerId,
    /// How long the leader may hold a fetch that finds nothing new.
    pub max_wait_ms: u32,
    /// Bytes per response at most.
    pub max_bytes: u32,
    /// First wait after a failure; doubles up to `backoff_max`.
    pub backoff: Duration,
    /// Longest wait after failures.
    pub backoff_max: Duration,
    /// Local address of connections to leaders, when set.
    pub source: Option<std::net::IpAddr>,
}

#[derive(Debug)]
struct Fetcher {
    address: String,
    follows: watch::Sender<Arc<Vec<Follow>>>,
    task: tokio::task::JoinHandle<()>,
}

/// The fetcher tasks of one broker.
#[derive(Debug)]
pub struct Fetchers {
    settings: FetcherSettings,
    fetchers: Mutex<BTreeMap<BrokerId, Fetcher>>,
}

impl Fetchers {
    /// No fetchers yet.
    pub fn new(settings: FetcherSettings) -> Self {
        Fetchers { settings, fetchers: Mutex::new(BTreeMap::new()) }
    }

    /// Follows `wanted`: for each leader broker, its address and the
    /// partitions to fetch from it. Starts, retargets and stops tasks to
    /// match. Needs a tokio runtime (it may run on a blocking thread).
    pub fn update(&self, wanted: BTreeMap<BrokerId, (String, Vec<Follow>)>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!("no runtime: replica fetchers not started");
            return;
        };
        let mut fetchers = self.fetchers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        fetchers.retain(|leader, f| {
            let keep = wanted.get(leader).is_some_and(|(address, _)| *address == f.address) && !f.task.is_finished();
            if !keep {
                f.task.abort();
            }
            keep
        });
        for (leader, (address, follows)) in wanted {
            match fetchers.get(&leader) {
                Some(f) => {
                    f.follows.send_replace(Arc::new(follows));
                }
                None => {
                    let (tx, rx) = watch::channel(Arc::new(follows));
                    let span = tracing::info_span!("replica_fetcher", leader = leader.0, %address);
                    let task = runtime.spawn(run(leader, address.clone(), rx, self.settings.clone()).instrument(span));
                    fetchers.insert(leader, Fetcher { address, follows: tx, task });
                }
            }
        }
    }

    /// Stops every fetcher.
    pub fn shutdown(&self) {
        let mut fetchers = self.fetchers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for (_, f) in std::mem::take(&mut *fetchers) {
            f.task.abort();
        }
    }
}

impl Drop for Fetchers {
    fn drop(&mut self) {
        self.shutdown();
    }
}

type Key = (Arc<str>, u32);

fn key(f: &Follow) -> Key {
    (f.topic.clone(), f.partition.index())
}

/// One leader's fetch loop, until aborted.
async fn run(
    leader: BrokerId,
    address: String,
    mut follows: watch::Receiver<Arc<Vec<Follow>>>,
    settings: FetcherSettings,
) {
    let mut client = match crate::peer::peer_channel(&address, settings.source) {
        Ok(channel) => {
            ReplicationClient::new(channel).max_decoding_message_size(settings.max_bytes as usize + (4 << 20))
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot fetch from this leader");
            return;
        }
    };
    let mut backoff = settings.backoff;
    let mut paused: HashMap<Key, Instant> = HashMap::new();
    // The last reason each partition paused for, logged once per change.
    let mut reasons: HashMap<Key, String> = HashMap::new();
    loop {
        let current = follows.borrow_and_update().clone();
        let now = Instant::now();
        paused.retain(|k, until| *until > now && current.iter().any(|f| key(f) == *k));
        let active: Vec<Follow> = current.iter().filter(|f| !paused.contains_key(&key(f))).cloned().collect();
        if active.is_empty() {
            let wake = paused.values().min().copied().unwrap_or(now + Duration::from_secs(3600));
            tokio::select! {
                changed = follows.changed() => if changed.is_err() { return },
                () = tokio::time::sleep_until(wake) => {}
            }
            continue;
        }
        let request = fetch_request(&active, &settings);
        let timeout = Duration::from_millis(u64::from(settings.max_wait_ms)) + Duration::from_secs(10);
        let outcome = tokio::select! {
            outcome = tokio::time::timeout(timeout, fetch(&mut client, request)) => outcome,
            changed = follows.changed() => {
                if changed.is_err() { return }
                continue; // the partitions changed: ask again for the new set
            }
        };
        match outcome {
            Ok(Ok(response)) => {
                backoff = settings.backoff;
                for (f, p) in active.iter().zip(response.partitions) {
                    match apply(f, p).await {
                        Ok(()) => {
                            reasons.remove(&key(f));
                        }
                        Err(why) => {
                            if reasons.get(&key(f)) != Some(&why) {
                                // A leader that has not opened a new partition yet, or
                                // has deleted it, answers this until metadata catches up.
                                if why.starts_with("UnknownTopicOrPartition") {
                                    tracing::debug!(topic = %f.topic, partition = f.partition.index(), %why, "replica fetch paused");
                                } else {
                                    tracing::warn!(topic = %f.topic, partition = f.partition.index(), %why, "replica fetch paused");
                                }
                                reasons.insert(key(f), why);
                            }
                            paused.insert(key(f), Instant::now() + settings.backoff_max.min(backoff * 4));
                        }
                    }
                }
            }
            Ok(Err(status)) => {
                tracing::debug!(leader = leader.0, %status, "replica fetch failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(settings.backoff_max);
            }
            Err(_) => {
                tracing::debug!(leader = leader.0, "replica fetch timed out");
                backoff = (backoff * 2).min(settings.backoff_max);
            }
        }
    }
}

async fn fetch(
    client: &mut ReplicationClient<Channel>,
    request: pb::ReplicaFetchRequest,
) -> Result<pb::ReplicaFetchResponse, tonic::Status> {
    Ok(client.replica_fetch(request).await?.into_inner())
}

fn fetch_request(active: &[Follow], settings: &FetcherSettings) -> pb::ReplicaFetchRequest {
    let partitions = active
        .iter()
        .map(|f| {
            let (log_end, last_epoch) = f.partition.fetch_position();
            pb::ReplicaFetchPartition {
                topic: f.topic.to_string(),
                topic_id: f.topic_id.to_string(),
                partition: f.partition.index(),
                fetch_offset: log_end.to_wire(),
                current_leader_epoch: f.leader_epoch,
                last_fetched_epoch: last_epoch.and_then(|e| i32::try_from(e).ok()).unwrap_or(-1),
            }
        })
        .collect();
    pb::ReplicaFetchRequest {
        replica_id: settings.replica_id.0,
        max_wait_ms: settings.max_wait_ms,
        max_bytes: settings.max_bytes,
        partitions,
    }
}

/// Applies one partition's answer; an `Err` pauses the partition.
async fn apply(f: &Follow, p: pb::ReplicaFetchPartitionResponse) -> Result<(), String> {
    if *p.topic != *f.topic || p.partition != f.partition.index() {
        return Err(format!("the leader answered for {}/{} instead", p.topic, p.partition));
    }
    let code = ErrorCode::try_from(p.error_code).unwrap_or(ErrorCode::UnknownServerError);
    if code == ErrorCode::OffsetOutOfRange {
        let (log_end, _) = f.partition.fetch_position();
        let leader_start = Offset::from_wire(p.log_start_offset).ok_or("the leader sent no log start")?;
        if log_end < leader_start {
            f.partition.restart_at(f.leader_epoch, leader_start).map_err(|e| e.to_string())?;
            return Ok(());
        }
        return Err(format!("offset out of range: {}", p.error_message));
    }
    if code != ErrorCode::None {
        return Err(format!("{code:?}: {}", p.error_message));
    }
    if let Some(d) = p.diverging_epoch {
        let end = Offset::from_wire(d.end_offset).ok_or("the leader sent a negative end offset")?;
        f.partition.truncate_diverging(f.leader_epoch, d.epoch, end).map_err(|e| e.to_string())?;
        return Ok(());
    }
    let hw = Offset::from_wire(p.high_watermark).ok_or("the leader sent a negative high watermark")?;
    let mut batches = Vec::new();
    for chunk in &p.records {
        for part in split_batches(chunk).map_err(|e| format!("the leader sent a torn batch: {e}"))? {
            batches
                .push(RecordBatch::check_framing(part).map_err(|e| format!("the leader sent a corrupt batch: {e}"))?);
        }
    }
    f.partition.append_as_follower(&batches, hw, f.leader_epoch).await.map_err(|e| e.to_string())?;
    if let Some(leader_start) = Offset::from_wire(p.log_start_offset) {
        f.partition.adopt_leader_log_start(f.leader_epoch, leader_start).map_err(|e| e.to_string())?;
    }
    Ok(())
}
