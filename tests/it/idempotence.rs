//! The idempotent producer against three real `tally serve` processes: a
//! partition leader frozen (SIGSTOP) past its broker session while the
//! producer has requests in flight to it, then resumed; a leader killed
//! mid-stream and restarted. Every record must be stored exactly once, in
//! send order, at the offset its delivery reported.

use std::collections::BTreeMap;
use std::time::Duration;

use tally_client::{Acks, Client, NewTopic, Producer, ProducerConfig, ProducerRecord};

use crate::fault::{Cluster, client_for};
use crate::replication::read_to;

const TOPIC: &str = "exactly-once";
const PARTITIONS: u32 = 2;

async fn leader_of(client: &Client, partition: u32) -> Option<u32> {
    let states = client.admin().partition_states().await.ok()?;
    states.into_iter().filter(|(t, _)| t == TOPIC).nth(partition as usize).and_then(|(_, p)| p.leader)
}

/// Sends `count` records alternating over the partitions, pausing a
/// millisecond every few so the run spans the faults.
async fn send_all(producer: Producer, count: usize) -> Vec<(u32, String, tally_client::DeliveryFuture)> {
    let mut out = Vec::with_capacity(count);
    for n in 0..count {
        let partition = n as u32 % PARTITIONS;
        let value = format!("p{partition}-{n}");
        let delivery = producer.send(ProducerRecord::new(TOPIC, value.as_bytes()).partition(partition)).await.unwrap();
        out.push((partition, value, delivery));
        if n % 4 == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_then_a_killed_leader_leave_every_record_once_in_order() {
    let root = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(root.path()).await;
    let client = client_for(&cluster).await;
    let mut topic = NewTopic::new(TOPIC, PARTITIONS).config("min_insync_replicas", "2");
    topic.replication_factor = 3;
    let created = crate::harness::wait_for(Duration::from_secs(30), async || {
        match client.admin().create_topic(topic.clone()).await {
            Ok(()) => true,
            Err(e) => e.code() == Some(tally_client::ErrorCode::TopicAlreadyExists),
        }
    })
    .await;
    assert!(created, "the topic was created");
    let mut config = ProducerConfig::default();
    config.acks = Acks::All;
    config.linger = Duration::from_millis(1);
    // Small batches: five requests per partition are in flight while the
    // leader freezes.
    config.batch_bytes = 1024;
    config.retry_backoff = Duration::from_millis(20);
    config.delivery_timeout = Duration::from_secs(90);
    let producer = Producer::new(client_for(&cluster).await, config);
    assert!(producer.is_idempotent());
    let sender = tokio::spawn(send_all(producer.clone(), 20_000));

    tokio::time::sleep(Duration::from_millis(700)).await;
    let frozen = leader_of(&client, 0).await.expect("partition 0 has a leader");
    cluster.pause(frozen).expect("running");
    // Past the 2 s session: fenced and replaced while frozen; it wakes with
    // the producer's requests still in flight to it.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    cluster.resume(frozen).expect("paused");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let killed = leader_of(&client, 1).await.expect("partition 1 has a leader");
    cluster.kill(killed);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cluster.start_broker(killed).await;

    let deliveries = sender.await.unwrap();
    let mut sent: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    let mut acked: BTreeMap<u32, Vec<(i64, String)>> = BTreeMap::new();
    for (partition, value, delivery) in deliveries {
        let meta = delivery.await.unwrap_or_else(|e| panic!("{value} was not delivered: {e}"));
        assert_eq!(meta.partition, partition);
        sent.entry(partition).or_default().push(value.clone());
        acked.entry(partition).or_default().push((meta.offset, value));
    }
    producer.close().await;
    let reader = client_for(&cluster).await;
    for (partition, values) in &sent {
        // The whole log up to its end: a copy after the last acknowledged
        // record would be a duplicate too.
        let last_acked = acked[partition].iter().map(|(o, _)| o + 1).max().unwrap();
        let pc = reader.partition_client(TOPIC, *partition);
        let mut end = None;
        for _ in 0..100 {
            end = pc.list_offset(tally_client::OffsetSpec::Latest).await.ok().flatten();
            if end.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let end = end.expect("the partition's end").max(last_acked);
        let log = read_to(&reader, TOPIC, *partition, end).await;
        let stored: Vec<&String> = log.iter().map(|(_, v)| v).collect();
        let expected: Vec<&String> = values.iter().collect();
        assert!(
            stored == expected,
            "partition {partition}: {} stored, {} sent; every record once, in send order",
            stored.len(),
            expected.len()
        );
        let at: BTreeMap<i64, &str> = log.iter().map(|(o, v)| (*o, v.as_str())).collect();
        for (offset, value) in &acked[partition] {
            assert_eq!(
                at.get(offset),
                Some(&value.as_str()),
                "partition {partition}: offset {offset} holds its record"
            );
        }
    }
    cluster.heal().await;
    cluster.stop_all();
}
