//! [`Consumer`]: reads assigned partitions as a stream of records.
//!
//! Manual assignment: the caller names partitions and where to start.
//! [`Consumer::poll`] runs one fetch round (a long poll to each leader);
//! [`Consumer::into_stream`] runs rounds in a background task that stays up
//! to `prefetch` responses ahead of the reader, so fetching overlaps
//! processing.

use std::collections::{BTreeMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use tally_proto::ErrorCode;
use tally_proto::v1::{self as pb};
use tokio::sync::mpsc;

use crate::client::Client;
use crate::error::{Error, Result};
use crate::partition_client::{OffsetSpec, decode_fetch, list_offset_rpc};

/// Where to start reading a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeekTo {
    /// The first offset still in the log.
    Beginning,
    /// After the last record (only new records).
    End,
    /// A given offset.
    Offset(i64),
    /// The first record with a timestamp >= this (ms); the end if none.
    Timestamp(i64),
}

/// What to do when the position is outside the log (deleted by retention,
/// say).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetReset {
    /// Jump to the first offset.
    Earliest,
    /// Jump to the end.
    Latest,
    /// Report `OFFSET_OUT_OF_RANGE`.
    Error,
}

/// Settings of a [`Consumer`].
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// Longest a fetch waits for data. Default 500 ms.
    pub max_wait: Duration,
    /// Largest fetch response. Default 50 MiB.
    pub max_bytes: u32,
    /// Largest share of one partition in a response. Default 8 MiB.
    pub partition_max_bytes: u32,
    /// Fetch responses the stream may hold ahead of the reader. Default 2.
    pub prefetch: usize,
    /// Reaction to an out-of-range position. Default [`OffsetReset::Latest`] (Kafka's default).
    pub auto_offset_reset: OffsetReset,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            max_wait: Duration::from_millis(500),
            max_bytes: 50 << 20,
            partition_max_bytes: 8 << 20,
            prefetch: 2,
            auto_offset_reset: OffsetReset::Latest,
        }
    }
}

/// A record read from a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerRecord {
    /// Topic.
    pub topic: Arc<str>,
    /// Partition.
    pub partition: u32,
    /// Offset.
    pub offset: i64,
    /// Timestamp (ms).
    pub timestamp: i64,
    /// Key.
    pub key: Option<Bytes>,
    /// Value.
    pub value: Option<Bytes>,
    /// Headers, in order.
    pub headers: Vec<(String, Option<Bytes>)>,
}

#[derive(Debug, Clone)]
struct Assigned {
    position: i64,
    high_watermark: i64,
}

/// Reads records from assigned partitions.
///
/// ```no_run
/// # async fn demo(client: tally_client::Client) -> Result<(), tally_client::Error> {
/// use futures_util::StreamExt;
/// use tally_client::{Consumer, ConsumerConfig, SeekTo};
/// let mut consumer = Consumer::new(client, ConsumerConfig::default());
/// consumer.assign("orders", 0, SeekTo::Beginning).await?;
/// let mut records = consumer.into_stream();
/// while let Some(record) = records.next().await {
///     let record = record?;
///     println!("{}: {:?}", record.offset, record.value);
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Consumer {
    client: Client,
    config: ConsumerConfig,
    assigned: BTreeMap<(Arc<str>, u32), Assigned>,
    /// A partition's failure, held back while other partitions had records.
    deferred_error: Option<Error>,
}

impl Consumer {
    /// A consumer with nothing assigned.
    pub fn new(client: Client, config: ConsumerConfig) -> Consumer {
        Consumer { client, config, assigned: BTreeMap::new(), deferred_error: None }
    }

    /// Starts reading `topic`/`partition` from `from` (replacing any earlier
    /// position for it).
    pub async fn assign(&mut self, topic: &str, partition: u32, from: SeekTo) -> Result<()> {
        let info = self.client.topic_info(topic).await?;
        if partition as usize >= info.leaders.len() {
            return Err(Error::Broker {
                code: ErrorCode::UnknownTopicOrPartition,
                message: format!("topic `{topic}` has {} partitions", info.leaders.len()),
                topic: topic.to_string(),
                partition: Some(partition),
            });
        }
        let position = self.resolve(topic, partition, from).await?;
        self.assigned.insert((Arc::from(topic), partition), Assigned { position, high_watermark: -1 });
        Ok(())
    }

    /// Moves an assigned partition's position.
    pub async fn seek(&mut self, topic: &str, partition: u32, to: SeekTo) -> Result<()> {
        self.assign(topic, partition, to).await
    }

    /// The next offset to be read from a partition.
    pub fn position(&self, topic: &str, partition: u32) -> Option<i64> {
        self.assigned.get(&(Arc::from(topic), partition)).map(|a| a.position)
    }

    /// The high watermark seen by the last fetch of a partition (-1 before).
    pub fn high_watermark(&self, topic: &str, partition: u32) -> Option<i64> {
        self.assigned.get(&(Arc::from(topic), partition)).map(|a| a.high_watermark)
    }

    /// True when every assigned partition's position has reached the high
    /// watermark of its last fetch.
    pub fn at_end(&self) -> bool {
        self.assigned.values().all(|a| a.high_watermark >= 0 && a.position >= a.high_watermark)
    }

    async fn resolve(&self, topic: &str, partition: u32, from: SeekTo) -> Result<i64> {
        let spec = match from {
            SeekTo::Offset(o) => return Ok(o),
            SeekTo::Beginning => OffsetSpec::Earliest,
            SeekTo::End => OffsetSpec::Latest,
            SeekTo::Timestamp(ts) => OffsetSpec::Timestamp(ts),
        };
        match list_offset_rpc(&self.client, topic, partition, spec).await? {
            Some(o) => Ok(o),
            None => Ok(list_offset_rpc(&self.client, topic, partition, OffsetSpec::Latest).await?.unwrap_or(0)),
        }
    }

    /// One fetch round over every assigned partition: records in offset
    /// order per partition. Waits up to `max_wait` when there is nothing new.
    ///
    /// A partition that fails does not cost the others their records: they
    /// are returned, and the failure comes from the next call.
    pub async fn poll(&mut self) -> Result<Vec<ConsumerRecord>> {
        if let Some(e) = self.deferred_error.take() {
            return Err(e);
        }
        if self.assigned.is_empty() {
            return Err(Error::InvalidArgument("no partition is assigned".into()));
        }
        // One fetch per leader broker, for the partitions it leads, all at
        // once; a partition whose leader is unknown right now is retried
        // after a metadata refresh rather than left behind.
        let mut by_leader: BTreeMap<String, Vec<(Arc<str>, u32)>> = BTreeMap::new();
        let mut failure = None;
        let keys: Vec<(Arc<str>, u32)> = self.assigned.keys().cloned().collect();
        for (topic, partition) in keys {
            match self.client.leader_address(&topic, partition).await {
                Ok(address) => by_leader.entry(address).or_default().push((topic, partition)),
                Err(e) => {
                    if e.is_retriable() {
                        self.client.invalidate(&topic);
                    }
                    failure.get_or_insert(e);
                }
            }
        }
        let timeout = self.client.config().request_timeout + self.config.max_wait;
        let mut calls = Vec::new();
        for (address, partitions) in &by_leader {
            let request = pb::FetchRequest {
                max_wait_ms: u32::try_from(self.config.max_wait.as_millis()).unwrap_or(u32::MAX),
                min_bytes: 1,
                max_bytes: self.config.max_bytes,
                topics: self.fetch_topics(partitions),
            };
            let mut rpc = self.client.rpc_at(address)?;
            calls.push(async move {
                let mut tonic_request = tonic::Request::new(request);
                tonic_request.set_timeout(timeout);
                rpc.fetch(tonic_request).await
            });
        }
        let answers = futures_util::future::join_all(calls).await;
        let mut out = Vec::new();
        for (answer, (address, partitions)) in answers.into_iter().zip(&by_leader) {
            let response = match answer {
                Ok(r) => r.into_inner(),
                Err(status) => {
                    // The leader may have died or moved: ask the cluster
                    // again rather than retrying an address from the cache.
                    let e = Error::from(status);
                    if e.is_retriable() {
                        self.client.forget_channel(address);
                        for (topic, _) in partitions {
                            self.client.invalidate(topic);
                        }
                    }
                    failure.get_or_insert(e);
                    continue;
                }
            };
            for t in response.topics {
                for p in t.partitions {
                    if let Err(e) = self.take_partition(&t.name, p, &mut out).await {
                        failure.get_or_insert(e);
                    }
                }
            }
        }
        match failure {
            Some(e) if out.is_empty() => Err(e),
            Some(e) => {
                self.deferred_error = Some(e);
                Ok(out)
            }
            None => Ok(out),
        }
    }

    fn fetch_topics(&self, partitions: &[(Arc<str>, u32)]) -> Vec<pb::FetchTopic> {
        let mut by_topic: Vec<pb::FetchTopic> = Vec::new();
        for key in partitions {
            let Some(a) = self.assigned.get(key) else { continue };
            let (topic, partition) = key;
            let fp = pb::FetchPartition {
                partition: *partition,
                fetch_offset: a.position,
                partition_max_bytes: self.config.partition_max_bytes,
            };
            match by_topic.last_mut() {
                Some(t) if t.name == **topic => t.partitions.push(fp),
                _ => by_topic.push(pb::FetchTopic { name: topic.to_string(), partitions: vec![fp] }),
            }
        }
        by_topic
    }

    async fn take_partition(
        &mut self,
        topic: &str,
        p: pb::FetchPartitionResponse,
        out: &mut Vec<ConsumerRecord>,
    ) -> Result<()> {
        let partition = p.partition;
        let key_topic: Arc<str> = match self.assigned.keys().find(|(t, part)| &**t == topic && *part == partition) {
            Some((t, _)) => t.clone(),
            None => return Ok(()),
        };
        let fetched = match decode_fetch(topic, p) {
            Ok(f) => f,
            Err(Error::Broker { code: ErrorCode::OffsetOutOfRange, message, .. })
                if self.config.auto_offset_reset != OffsetReset::Error =>
            {
                let to = if self.config.auto_offset_reset == OffsetReset::Earliest {
                    SeekTo::Beginning
                } else {
                    SeekTo::End
                };
                let position = self.resolve(topic, partition, to).await?;
                tracing::warn!(topic, partition, position, reason = %message, "position out of range; reset");
                if let Some(a) = self.assigned.get_mut(&(key_topic, partition)) {
                    a.position = position;
                }
                return Ok(());
            }
            Err(e) if e.is_retriable() => {
                self.client.invalidate(topic);
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let assigned = self.assigned.get_mut(&(key_topic.clone(), partition)).expect("found above");
        assigned.high_watermark = fetched.high_watermark;
        // Decode the whole partition before handing out any of it, so a bad
        // record leaves neither the output nor the position half-moved.
        let mut decoded = Vec::new();
        for record in fetched.records(assigned.position) {
            let r = record?;
            let headers = r
                .headers()
                .map(|h| h.map(|(k, v)| (String::from_utf8_lossy(&k).into_owned(), v)))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            decoded.push(ConsumerRecord {
                topic: key_topic.clone(),
                partition,
                offset: r.offset,
                timestamp: r.timestamp,
                key: r.key,
                value: r.value,
                headers,
            });
        }
        out.append(&mut decoded);
        if let Some(next) = fetched.next_offset() {
            assigned.position = assigned.position.max(next);
        }
        Ok(())
    }

    /// Turns the consumer into a stream; a background task fetches ahead.
    /// Retriable errors (a broker restarting, say) are retried with backoff
    /// from 100 ms to 5 s; any other error ends the stream after it is
    /// yielded.
    pub fn into_stream(mut self) -> RecordStream {
        let (tx, rx) = mpsc::channel(self.config.prefetch.max(1));
        let task = tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                let round = self.poll().await;
                match &round {
                    Err(e) if e.is_retriable() => {
                        tracing::debug!(error = %e, ?backoff, "fetch failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                    Ok(_) => backoff = Duration::from_millis(100),
                    Err(_) => {}
                }
                let failed = round.is_err();
                if tx.send(round).await.is_err() || failed {
                    return;
                }
            }
        });
        RecordStream { rx, buffered: VecDeque::new(), task }
    }
}

/// Records of a [`Consumer`], fetched ahead in the background. Dropping the
/// stream stops the fetching.
#[derive(Debug)]
pub struct RecordStream {
    rx: mpsc::Receiver<Result<Vec<ConsumerRecord>>>,
    buffered: VecDeque<ConsumerRecord>,
    task: tokio::task::JoinHandle<()>,
}

impl Stream for RecordStream {
    type Item = Result<ConsumerRecord>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(r) = self.buffered.pop_front() {
                return Poll::Ready(Some(Ok(r)));
            }
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(Ok(batch))) => self.buffered.extend(batch),
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl Drop for RecordStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}
