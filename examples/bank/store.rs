//! The [`EventStore`]: accounts as event-sourced aggregates on a Tally topic.
//!
//! An account's events live in the partition its id hashes to (murmur2, as
//! the producer's default partitioner); the aggregate's version is that
//! partition's end offset. A command runs as: read the partition to its end
//! (from the account's snapshot, if any), rebuild the account from its
//! events, decide, and append the new events with
//! [`PartitionClient::append_if`](tally_client::PartitionClient::append_if)
//! at the end offset seen. If anything was appended to the partition
//! meanwhile (this account's events or another's), the append is refused
//! with `Conflict { current_end_offset }` and nothing is written: the store
//! reads what came in, decides again against the newer state, and retries.
//! So a decision is only ever appended on top of the exact state it was
//! made on: two concurrent withdrawals cannot both pass a balance check.
//!
//! The guard is the whole partition's end, so commands on different
//! accounts of one partition also retry each other: coarse, but it needs
//! nothing from the broker but one offset compare.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tally_client::{Acks, AppendIfError, Client, ErrorCode, partitioner};
use tally_proto::batch::RecordRef;

use super::account::{Account, Command, Rejection};
use super::event::{Event, StoredEvent};
use super::read::read_range;
use super::snapshot::SnapshotStore;

/// Attempts of one command before it gives up (each conflict is one).
pub const MAX_ATTEMPTS: u32 = 100;

/// An account's state and the version it is as of.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The account's state.
    pub account: Account,
    /// The partition's end offset this state reflects: every event of the
    /// account below it is applied.
    pub version: i64,
    /// Where the replay started: 0, or the offset the snapshot covers.
    pub replayed_from: i64,
    /// Records of the partition read to rebuild it (any account's).
    pub records_read: usize,
    /// Events of this account applied on top of the snapshot.
    pub events_applied: usize,
}

/// What a command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// Offset of the first event appended (`None`: nothing to append, the
    /// command had already happened).
    pub offset: Option<i64>,
    /// The events appended.
    pub events: Vec<Event>,
    /// Appends refused because the partition had moved on.
    pub conflicts: u32,
}

/// Why a command did not happen.
#[derive(Debug)]
pub enum CommandError {
    /// Refused by the account's rules; nothing appended.
    Rejected(Rejection),
    /// Still conflicting after [`MAX_ATTEMPTS`]; nothing appended.
    TooManyConflicts {
        /// Attempts made.
        attempts: u32,
    },
    /// Reading or appending failed. After a transport failure the last
    /// append may have happened: read the account to find out.
    Store(anyhow::Error),
}

impl std::fmt::Display for CommandError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CommandError::Rejected(r) => write!(f, "rejected: {r}"),
            CommandError::TooManyConflicts { attempts } => write!(f, "still conflicting after {attempts} attempts"),
            CommandError::Store(e) => write!(f, "store failure: {e:#}"),
        }
    }
}

impl std::error::Error for CommandError {}

impl From<anyhow::Error> for CommandError {
    fn from(e: anyhow::Error) -> Self {
        CommandError::Store(e)
    }
}

/// Accounts on the `events` topic. Cheap to clone (clones share the
/// client, the snapshots and the conflict counter).
#[derive(Debug, Clone)]
pub struct EventStore {
    client: Client,
    topic: Arc<str>,
    partitions: u32,
    snapshots: Option<SnapshotStore>,
    conflicts: Arc<AtomicU64>,
}

impl EventStore {
    /// A store on `topic` (which must exist), starting each account from
    /// its snapshot in `snapshots` when there is one.
    pub async fn open(client: Client, topic: &str, snapshots: Option<SnapshotStore>) -> anyhow::Result<EventStore> {
        let partitions = u32::try_from(client.topic_info(topic).await?.leaders.len())?;
        anyhow::ensure!(partitions > 0, "topic {topic} has no partitions");
        Ok(EventStore { client, topic: topic.into(), partitions, snapshots, conflicts: Arc::default() })
    }

    /// The partition holding `account`'s events.
    pub fn partition_of(&self, account: &str) -> u32 {
        partitioner::partition_for_key(account.as_bytes(), self.partitions)
    }

    /// Conflicts met by every command of this store and its clones.
    pub fn conflicts(&self) -> u64 {
        self.conflicts.load(Ordering::Relaxed)
    }

    /// The account as of its partition's end now: its snapshot (if any)
    /// plus the events after it.
    pub async fn load(&self, account: &str) -> anyhow::Result<Loaded> {
        let (state, from) = match self.snapshots.as_ref().and_then(|s| s.get(account)) {
            Some(snapshot) => (snapshot.account, snapshot.covers),
            None => (Account::new(account), 0),
        };
        let mut loaded =
            Loaded { account: state, version: from, replayed_from: from, records_read: 0, events_applied: 0 };
        self.catch_up(&mut loaded, None).await?;
        Ok(loaded)
    }

    /// Applies the account's events from `loaded.version` up to `until`
    /// (the partition's end now when `None`).
    pub async fn catch_up(&self, loaded: &mut Loaded, until: Option<i64>) -> anyhow::Result<()> {
        let partition = self.partition_of(&loaded.account.id);
        let (events, end) = self.read(partition, loaded.version, until).await?;
        loaded.records_read += events.len();
        for e in &events {
            if e.account == loaded.account.id {
                loaded.account.apply(&e.event);
                loaded.events_applied += 1;
            }
        }
        loaded.version = end;
        Ok(())
    }

    /// Every event of `partition` in `[from, until)` (`until`: the end now
    /// when `None`), and that end.
    pub async fn read(&self, partition: u32, from: i64, until: Option<i64>) -> anyhow::Result<(Vec<StoredEvent>, i64)> {
        let (records, end) = read_range(&self.client, &self.topic, partition, from, until).await?;
        let mut events = Vec::with_capacity(records.len());
        for r in records {
            let key = r.key.as_deref().ok_or_else(|| anyhow::anyhow!("an event without a key at {}", r.offset))?;
            let value =
                r.value.as_deref().ok_or_else(|| anyhow::anyhow!("an event without a value at {}", r.offset))?;
            events.push(StoredEvent {
                account: String::from_utf8(key.to_vec())?,
                offset: r.offset,
                event: Event::decode(value)?,
            });
        }
        Ok((events, end))
    }

    /// Every event of `account` from offset 0, in order.
    pub async fn history(&self, account: &str) -> anyhow::Result<Vec<StoredEvent>> {
        let (events, _) = self.read(self.partition_of(account), 0, None).await?;
        Ok(events.into_iter().filter(|e| e.account == account).collect())
    }

    /// Loads `account` and runs `command` on it (see [`EventStore::decide_and_append`]).
    pub async fn execute(&self, account: &str, command: &Command) -> Result<Appended, CommandError> {
        let mut loaded = self.load(account).await?;
        self.decide_and_append(&mut loaded, command).await
    }

    /// Decides `command` on `loaded` and appends its events at
    /// `loaded.version`; on a conflict, catches up to the partition's new
    /// end and decides again. On success `loaded` is the state before the
    /// new events.
    pub async fn decide_and_append(&self, loaded: &mut Loaded, command: &Command) -> Result<Appended, CommandError> {
        let partition = self.partition_of(&loaded.account.id);
        let pc = self.client.partition_client(self.topic.to_string(), partition);
        let mut conflicts = 0;
        for attempt in 1..=MAX_ATTEMPTS {
            let events = loaded.account.decide(command).map_err(CommandError::Rejected)?;
            if events.is_empty() {
                return Ok(Appended { offset: None, events, conflicts });
            }
            let values: Vec<Vec<u8>> = events.iter().map(Event::encode).collect();
            let records: Vec<RecordRef<'_>> = values
                .iter()
                .map(|v| RecordRef {
                    timestamp: now_ms(),
                    key: Some(loaded.account.id.as_bytes()),
                    value: Some(v),
                    headers: &[],
                })
                .collect();
            match pc.append_if(loaded.version, &records, Acks::All).await {
                Ok(offset) => return Ok(Appended { offset: Some(offset), events, conflicts }),
                Err(AppendIfError::Conflict { current_end_offset }) => {
                    conflicts += 1;
                    self.conflicts.fetch_add(1, Ordering::Relaxed);
                    // Appends at the end we saw are refused until we have
                    // read what is there now (some may not be readable yet:
                    // `catch_up` waits for them).
                    self.catch_up(loaded, Some(current_end_offset)).await?;
                }
                Err(AppendIfError::Failed(e)) if not_appended(&e) => {
                    // The leader refused it (moving, or short of replicas):
                    // nothing was written. Find the leader, read, retry.
                    tokio::time::sleep(Duration::from_millis(20 * u64::from(attempt.min(10)))).await;
                    let _ = self.client.refresh_metadata(&[self.topic.to_string()]).await;
                    self.catch_up(loaded, None).await?;
                }
                Err(e) => return Err(CommandError::Store(e.into())),
            }
        }
        Err(CommandError::TooManyConflicts { attempts: MAX_ATTEMPTS })
    }
}

/// True when the broker answered that it did not append (so retrying
/// cannot duplicate): a leader change or too few in-sync replicas.
fn not_appended(e: &tally_client::Error) -> bool {
    matches!(
        e.code(),
        Some(
            ErrorCode::NotLeaderOrFollower
                | ErrorCode::LeaderNotAvailable
                | ErrorCode::NotEnoughReplicas
                | ErrorCode::FencedLeaderEpoch
        )
    )
}

/// Milliseconds since the epoch, for record timestamps.
pub fn now_ms() -> i64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
}
