//! A read model of balances, built by a consumer group reading the events
//! topic: the query side of the bank.
//!
//! [`Balances`] stands for a table in a database: the balances plus, per
//! partition, the next offset it has applied. The [`Projection`] applies
//! what it polls, then commits the group's offsets, so a restarted
//! projection resumes where the last one committed; an event it may see
//! again (applied, then a crash before the commit) is skipped by the
//! table's own offsets, so nothing is counted twice. Since the events are
//! the truth, the table can always be thrown away and rebuilt by replaying
//! the topic from offset 0 ([`rebuild`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tally_client::{Client, Consumer, ConsumerConfig, ConsumerRecord, OffsetReset, OffsetSpec, SeekTo};

use super::event::Event;

/// The read model: balances of open accounts, and how far each partition
/// has been applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Balances {
    /// Balance by account id (closed accounts are removed).
    pub balances: BTreeMap<String, i64>,
    /// The next offset to apply, by partition.
    pub applied: BTreeMap<u32, i64>,
}

impl Balances {
    /// Applies the event at `partition`/`offset` unless it was applied
    /// before; returns whether it was.
    pub fn apply(&mut self, partition: u32, offset: i64, account: &str, event: &Event) -> bool {
        let next = self.applied.entry(partition).or_default();
        if offset < *next {
            return false;
        }
        *next = offset + 1;
        match event {
            Event::Opened => {
                self.balances.insert(account.to_string(), 0);
            }
            Event::Closed => {
                self.balances.remove(account);
            }
            Event::Deposited { amount }
            | Event::TransferCredited { amount, .. }
            | Event::TransferRefunded { amount, .. } => {
                *self.balances.entry(account.to_string()).or_default() += amount
            }
            Event::Withdrawn { amount } | Event::TransferDebited { amount, .. } => {
                *self.balances.entry(account.to_string()).or_default() -= amount
            }
        }
        true
    }

    /// Applies a polled record (key: account, value: event).
    pub fn apply_record(&mut self, r: &ConsumerRecord) -> anyhow::Result<bool> {
        let account = r.key.as_deref().ok_or_else(|| anyhow::anyhow!("event without a key at {}", r.offset))?;
        let value = r.value.as_deref().ok_or_else(|| anyhow::anyhow!("event without a value at {}", r.offset))?;
        Ok(self.apply(r.partition, r.offset, std::str::from_utf8(account)?, &Event::decode(value)?))
    }

    /// True when every partition of `ends` is applied up to its end.
    pub fn reached(&self, ends: &BTreeMap<u32, i64>) -> bool {
        ends.iter().all(|(p, end)| *end == 0 || self.applied.get(p).is_some_and(|a| a >= end))
    }
}

/// The partitions' end offsets (high watermarks) now.
pub async fn ends(client: &Client, topic: &str) -> anyhow::Result<BTreeMap<u32, i64>> {
    let partitions = u32::try_from(client.topic_info(topic).await?.leaders.len())?;
    let mut ends = BTreeMap::new();
    for p in 0..partitions {
        ends.insert(p, client.partition_client(topic, p).list_offset(OffsetSpec::Latest).await?.unwrap_or(0));
    }
    Ok(ends)
}

/// What one projection instance received, for checking where it resumed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Received {
    /// The first offset received, by partition.
    pub first: BTreeMap<u32, i64>,
    /// Records received.
    pub records: usize,
}

/// A member of the projection's consumer group, applying to a shared
/// [`Balances`].
#[derive(Debug)]
pub struct Projection {
    consumer: Consumer,
    topic: String,
    model: Arc<Mutex<Balances>>,
    received: Received,
}

impl Projection {
    /// Joins `group` on `topic`; a partition the group never committed
    /// starts at offset 0. `session_timeout`: the group session (`None`: the
    /// broker's).
    pub fn start(
        client: Client,
        topic: &str,
        group: &str,
        model: Arc<Mutex<Balances>>,
        session_timeout: Option<Duration>,
    ) -> anyhow::Result<Projection> {
        let mut config = ConsumerConfig::default();
        config.group_id = Some(group.to_string());
        config.enable_auto_commit = false;
        config.auto_offset_reset = OffsetReset::Earliest;
        config.max_wait = Duration::from_millis(200);
        config.session_timeout = session_timeout;
        let consumer = Consumer::new(client, config);
        consumer.subscribe(&[topic])?;
        Ok(Projection { consumer, topic: topic.to_string(), model, received: Received::default() })
    }

    /// Polls once, applies what came, then commits the offsets after it.
    /// Returns how many records came.
    pub async fn step(&mut self) -> anyhow::Result<usize> {
        let records = match self.consumer.poll().await {
            Ok(records) => records,
            Err(e) if e.is_retriable() => return Ok(0),
            Err(e) => return Err(e.into()),
        };
        let mut commit = BTreeMap::new();
        {
            let mut model = self.model.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            for r in &records {
                model.apply_record(r)?;
                self.received.first.entry(r.partition).or_insert(r.offset);
                commit.insert((self.topic.clone(), r.partition), r.offset + 1);
            }
        }
        self.received.records += records.len();
        self.consumer.commit_offsets(&commit).await?;
        Ok(records.len())
    }

    /// Steps until the model has applied every partition up to `ends`, or
    /// `limit` passes.
    pub async fn run_to(&mut self, ends: &BTreeMap<u32, i64>, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        while !self.model.lock().unwrap_or_else(std::sync::PoisonError::into_inner).reached(ends) {
            anyhow::ensure!(Instant::now() < deadline, "the projection did not reach {ends:?} within {limit:?}");
            self.step().await?;
        }
        Ok(())
    }

    /// What this instance received.
    pub fn received(&self) -> &Received {
        &self.received
    }

    /// Leaves the group (offsets were committed at every step).
    pub async fn close(self) -> anyhow::Result<()> {
        self.consumer.close().await?;
        Ok(())
    }
}

/// A new read model from every event of `topic`, from offset 0, without a
/// group.
pub async fn rebuild(client: &Client, topic: &str) -> anyhow::Result<Balances> {
    let ends = ends(client, topic).await?;
    let mut config = ConsumerConfig::default();
    config.max_wait = Duration::from_millis(200);
    let consumer = Consumer::new(client.clone(), config);
    for p in ends.keys() {
        consumer.assign(topic, *p, SeekTo::Offset(0)).await?;
    }
    let mut model = Balances::default();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !model.reached(&ends) {
        anyhow::ensure!(Instant::now() < deadline, "the rebuild did not reach {ends:?}");
        match consumer.poll().await {
            Ok(records) => {
                for r in &records {
                    model.apply_record(r)?;
                }
            }
            Err(e) if e.is_retriable() => {}
            Err(e) => return Err(e.into()),
        }
    }
    consumer.close().await?;
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_seen_again_after_a_crash_before_the_commit_counts_once() {
        let mut model = Balances::default();
        assert!(model.apply(0, 0, "a", &Event::Opened));
        assert!(model.apply(0, 1, "a", &Event::Deposited { amount: 5 }));
        assert!(!model.apply(0, 1, "a", &Event::Deposited { amount: 5 }), "already applied");
        assert!(model.apply(1, 0, "b", &Event::Opened), "partitions are counted apart");
        assert_eq!(model.balances, BTreeMap::from([("a".into(), 5), ("b".into(), 0)]));
        assert!(model.reached(&BTreeMap::from([(0, 2), (1, 1), (2, 0)])));
        assert!(!model.reached(&BTreeMap::from([(0, 3)])));
    }
}
