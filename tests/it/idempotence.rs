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

/// A batch of `n` records from producer `pid` at `epoch` from sequence `seq`.
fn producer_batch(pid: i64, epoch: i16, seq: i32, n: usize) -> bytes::Bytes {
    let mut b = tally_proto::batch::BatchBuilder::new();
    b.set_producer(pid, epoch, seq);
    for i in 0..n {
        let value = format!("pid{pid}-e{epoch}-s{}", seq + i as i32);
        b.push(&tally_proto::batch::RecordRef { timestamp: 1, value: Some(value.as_bytes()), ..Default::default() });
    }
    b.finish()
}

async fn produce_raw(
    rpc: &mut tally_proto::v1::tally_client::TallyClient<tally_proto::connection::Connection>,
    records: Vec<bytes::Bytes>,
) -> tally_proto::v1::PartitionProduceResponse {
    use tally_proto::v1 as pb;
    let request = pb::ProduceRequest {
        acks: pb::Acks::All as i32,
        timeout_ms: 5000,
        topics: vec![pb::TopicProduceData {
            name: "idem".into(),
            partitions: vec![pb::PartitionProduceData { partition: 0, records, expected_end_offset: None }],
        }],
    };
    rpc.produce(request).await.unwrap().into_inner().topics.remove(0).partitions.remove(0)
}

async fn init(
    rpc: &mut tally_proto::v1::tally_client::TallyClient<tally_proto::connection::Connection>,
    transactional_id: Option<&str>,
    producer_id: i64,
    producer_epoch: i32,
) -> tally_proto::v1::InitProducerIdResponse {
    let request = tally_proto::v1::InitProducerIdRequest {
        transactional_id: transactional_id.map(str::to_string),
        transaction_timeout_ms: 0,
        producer_id,
        producer_epoch,
    };
    rpc.init_producer_id(request).await.unwrap().into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_errors_get_their_codes_append_nothing_and_the_broker_keeps_serving() {
    use tally_client::ErrorCode;
    let dir = tempfile::tempdir().unwrap();
    let broker = crate::harness::TestBroker::start(dir.path()).await;
    let client = broker.client().await;
    client.admin().create_topic(NewTopic::new("idem", 1)).await.unwrap();
    let mut rpc = crate::harness::raw_client(&broker.address);
    let end = async |client: &Client| {
        client.partition_client("idem", 0).list_offset(tally_client::OffsetSpec::Latest).await.unwrap().unwrap()
    };

    let first = init(&mut rpc, None, -1, -1).await;
    assert_eq!((first.error_code, first.producer_epoch), (0, 0), "{}", first.error_message);
    let pid = first.producer_id;
    let other = init(&mut rpc, None, -1, -1).await.producer_id;
    assert_ne!(pid, other, "ids are never handed out twice");

    let ok = produce_raw(&mut rpc, vec![producer_batch(pid, 0, 0, 3)]).await;
    assert_eq!((ok.error_code, ok.base_offset), (0, 0), "{}", ok.error_message);
    let again = produce_raw(&mut rpc, vec![producer_batch(pid, 0, 0, 3)]).await;
    assert_eq!((again.error_code, again.base_offset), (0, 0), "a retry is answered with the original offset");
    assert_eq!(end(&client).await, 3, "and appended nothing");

    let gap = produce_raw(&mut rpc, vec![producer_batch(pid, 0, 5, 1)]).await;
    assert_eq!(gap.error_code, ErrorCode::OutOfOrderSequenceNumber as i32);
    assert!(gap.error_message.contains("expected 3"), "{}", gap.error_message);

    let unknown = produce_raw(&mut rpc, vec![producer_batch(other, 0, 4, 1)]).await;
    assert_eq!(unknown.error_code, ErrorCode::UnknownProducerId as i32, "{}", unknown.error_message);

    let never = produce_raw(&mut rpc, vec![producer_batch(1 << 40, 0, 0, 1)]).await;
    assert_eq!(never.error_code, ErrorCode::UnknownProducerId as i32);
    assert!(never.error_message.contains("not handed out"), "{}", never.error_message);

    let bumped = init(&mut rpc, None, pid, 0).await;
    assert_eq!((bumped.error_code, bumped.producer_id, bumped.producer_epoch), (0, pid, 1));
    let new_epoch = produce_raw(&mut rpc, vec![producer_batch(pid, 1, 0, 1)]).await;
    assert_eq!(new_epoch.error_code, 0, "a new epoch starts at 0: {}", new_epoch.error_message);
    let zombie = produce_raw(&mut rpc, vec![producer_batch(pid, 0, 3, 1)]).await;
    assert_eq!(zombie.error_code, ErrorCode::InvalidProducerEpoch as i32, "{}", zombie.error_message);

    let two = produce_raw(&mut rpc, vec![producer_batch(pid, 1, 1, 1), producer_batch(pid, 1, 2, 1)]).await;
    assert_eq!(two.error_code, ErrorCode::InvalidRequest as i32, "{}", two.error_message);
    let transactional = init(&mut rpc, Some("tx-1"), -1, -1).await;
    assert_eq!(transactional.error_code, ErrorCode::InvalidRequest as i32);
    assert!(transactional.error_message.contains("transactions are not supported"));
    let bad_epoch = init(&mut rpc, None, pid, 40_000).await;
    assert_eq!(bad_epoch.error_code, ErrorCode::InvalidRequest as i32);

    assert_eq!(end(&client).await, 4, "only the accepted batches are in the log");
    let plain = tally_proto::batch::BatchBuilder::new();
    let mut plain = plain;
    plain.push(&tally_proto::batch::RecordRef { timestamp: 1, value: Some(b"plain"), ..Default::default() });
    let served = produce_raw(&mut rpc, vec![plain.finish()]).await;
    assert_eq!((served.error_code, served.base_offset), (0, 4), "the broker serves on");
    broker.stop().await.unwrap();
}
