//! Log compaction through a broker: a compacted topic keeps the last record
//! of every key, refuses unkeyed records, and its replicas, cleaned each on
//! its own, agree on every record they both still hold.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use tally_client::{Acks, Client, Consumer, ConsumerConfig, ErrorCode, NewTopic, SeekTo};
use tally_proto::batch::RecordRef;

use crate::harness::{TestBroker, test_config, wait_for};

/// (key, value; `None` is a tombstone) by offset.
type Records = BTreeMap<i64, (String, Option<String>)>;

fn compacted(name: &str) -> NewTopic {
    NewTopic::new(name, 1)
        .config("cleanup_policy", "compact")
        .config("segment_bytes", "2048")
        .config("min_cleanable_dirty_ratio", "0.01")
}

fn now_ms() -> i64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    i64::try_from(since.as_millis()).unwrap()
}

/// Produces `(key, value)` one record per request with acks=all, retrying
/// retriable errors; returns what was written at which offset.
async fn produce(client: &Client, topic: &str, records: &[(String, Option<String>)]) -> Records {
    let pc = client.partition_client(topic, 0);
    let mut written = Records::new();
    for (key, value) in records {
        let record = RecordRef {
            timestamp: now_ms(),
            key: Some(key.as_bytes()),
            value: value.as_deref().map(str::as_bytes),
            headers: &[],
        };
        let mut attempts = 0;
        let offset = loop {
            match pc.produce_records(&[record], Acks::All).await {
                Ok(offset) => break offset,
                Err(e) if e.is_retriable() && attempts < 100 => {
                    attempts += 1;
                    let _ = client.refresh_metadata(&[topic.to_string()]).await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("produce {key}: {e:?}"),
            }
        };
        written.insert(offset, (key.clone(), value.clone()));
    }
    written
}

/// Everything the `Consumer` reads from the beginning up to `end`.
async fn consume_all(client: &Client, topic: &str, end: i64) -> Records {
    let consumer = Consumer::new(client.clone(), ConsumerConfig::default());
    consumer.assign(topic, 0, SeekTo::Beginning).await.unwrap();
    let mut out = Records::new();
    let text = |b: Option<bytes::Bytes>| b.map(|b| String::from_utf8(b.to_vec()).unwrap());
    let mut last = -1;
    while last + 1 < end {
        let polled = tokio::time::timeout(Duration::from_secs(10), consumer.poll()).await.expect("a poll").unwrap();
        if polled.is_empty() && consumer.position(topic, 0).is_some_and(|p| p >= end) {
            break;
        }
        for r in polled {
            assert!(r.offset > last, "offsets increase");
            last = r.offset;
            out.insert(r.offset, (text(r.key).unwrap(), text(r.value)));
        }
    }
    out
}

/// The last record of every key.
fn latest(written: &Records) -> BTreeMap<String, i64> {
    written.iter().map(|(o, (k, _))| (k.clone(), *o)).collect()
}

/// What a reader sees holds only records as written, and the last one of
/// every key written below `cleanable`.
fn check_against(read: &Records, written: &Records) {
    for (offset, record) in read {
        assert_eq!(written.get(offset), Some(record), "offset {offset} holds what was written there");
    }
    for (key, offset) in latest(written) {
        assert!(read.contains_key(&offset), "the last record of {key} (offset {offset}) is readable");
    }
}

fn workload(rounds: usize, keys: usize) -> Vec<(String, Option<String>)> {
    (0..rounds * keys)
        .map(|i| {
            let key = format!("key-{}", i % keys);
            // Every fifth round deletes key-0 and then writes it again.
            let value = (i % keys != 0 || (i / keys) % 5 != 4).then(|| format!("value-{i}-{}", "x".repeat(40)));
            (key, value)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compacted_topic_keeps_the_last_record_of_every_key_and_refuses_unkeyed_ones() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start_with(test_config(dir.path())).await;
    let client = broker.client().await;
    client.admin().create_topic(compacted("table")).await.unwrap();
    let written = produce(&client, "table", &workload(30, 8)).await;
    let end = *written.keys().last().unwrap() + 1;

    // An unkeyed record is refused whole, and nothing is appended.
    let pc = client.partition_client("table", 0);
    let unkeyed = RecordRef { timestamp: now_ms(), key: None, value: Some(b"v"), headers: &[] };
    let keyed = RecordRef { timestamp: now_ms(), key: Some(b"k"), value: Some(b"v"), headers: &[] };
    let err = pc.produce_records(&[keyed, unkeyed], Acks::All).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidRecord), "{err:?}");
    assert!(err.to_string().contains("no key"), "{err}");
    assert_eq!(pc.list_offset(tally_client::OffsetSpec::Latest).await.unwrap(), Some(end), "nothing appended");

    // The cleaner runs in the background until the closed segments hold
    // one record per key.
    let cleaned = wait_for(Duration::from_secs(30), async || {
        let read = consume_all(&client, "table", end).await;
        read.len() < written.len() / 3
    })
    .await;
    let read = consume_all(&client, "table", end).await;
    assert!(cleaned, "the cleaner removed superseded records: {} of {} left", read.len(), written.len());
    check_against(&read, &written);
    let topic = client.admin().describe_topic("table").await.unwrap();
    assert_eq!(topic.configs.get("cleanup_policy").map(String::as_str), Some("compact"));
    broker.stop().await.unwrap();
}

/// Every record of a stopped broker's partition log, read from its directory.
fn replica_records(dir: &Path) -> (Records, i64) {
    let config = tally_broker::storage::LogConfig::default();
    let log = tally_broker::storage::Log::open(dir, config, std::sync::Arc::new(tally_broker::storage::SystemClock))
        .expect("open log");
    let read = log
        .read(tally_broker::storage::Offset(0), u64::MAX, log.high_watermark())
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()));
    let mut out = Records::new();
    let text = |b: Option<bytes::Bytes>| b.map(|b| String::from_utf8(b.to_vec()).unwrap());
    for chunk in read.chunks {
        for batch in tally_proto::batch::BatchIter::new(chunk) {
            for r in batch.unwrap().records().unwrap() {
                let r = r.unwrap();
                out.insert(r.offset, (text(r.key).unwrap(), text(r.value)));
            }
        }
    }
    (out, log.high_watermark().get() as i64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_clean_on_their_own_and_agree_on_every_record_they_both_hold() {
    let root = tempfile::tempdir().unwrap();
    let mut cluster = crate::replication::Cluster::start(root.path()).await;
    let client = cluster.client().await;
    let mut topic = compacted("replicated").config("min_insync_replicas", "2");
    topic.replication_factor = 3;
    client.admin().create_topic(topic).await.unwrap();
    let mut written = produce(&client, "replicated", &workload(15, 6)).await;
    // A follower stops while the others clean, and catches up after.
    let states = client.admin().partition_states().await.unwrap();
    let leader = states.iter().find(|(t, _)| t == "replicated").and_then(|(_, p)| p.leader).unwrap();
    let follower = (1..=3).find(|b| *b != leader).unwrap();
    cluster.stop(follower).await;
    written.extend(produce(&client, "replicated", &workload(15, 6)).await);
    cluster.restart(follower).await;
    written.extend(produce(&client, "replicated", &workload(5, 6)).await);
    let end = *written.keys().last().unwrap() + 1;
    let cleaned = wait_for(Duration::from_secs(30), async || {
        consume_all(&client, "replicated", end).await.len() < written.len() / 3
    })
    .await;
    assert!(cleaned, "the leader cleaned");
    // Let the followers reach the end and clean too.
    tokio::time::sleep(Duration::from_secs(2)).await;
    check_against(&consume_all(&client, "replicated", end).await, &written);
    cluster.stop_all().await;
    let replicas: Vec<(Records, i64)> =
        (1..=3).map(|b| replica_records(&root.path().join(format!("b{b}/replicated-0")))).collect();
    for (b, (records, hw)) in replicas.iter().enumerate() {
        assert_eq!(*hw, end, "broker {} caught up", b + 1);
        check_against(records, &written);
    }
    for (i, (a, _)) in replicas.iter().enumerate() {
        for (b, _) in &replicas[i + 1..] {
            for (offset, record) in a {
                if let Some(other) = b.get(offset) {
                    assert_eq!(record, other, "offset {offset} differs between replicas");
                }
            }
        }
    }
}
