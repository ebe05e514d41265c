//! The broker's API through the client crate and raw gRPC.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use tally_client::partitioner::partition_for_key;
use tally_client::{
    Acks, Consumer, ConsumerConfig, ErrorCode, HeaderRef, NewTopic, OffsetSpec, Producer, ProducerConfig,
    ProducerRecord, SeekTo,
};
use tally_proto::batch::{BatchBuilder, RecordRef};
use tally_proto::connection::{Connection, ConnectionSettings};
use tally_proto::v1 as pb;

use crate::harness::{CountingProxy, TestBroker, test_config, wait_for};

/// Wall-clock ms: records that count for retention must look recent (a
/// record stamped 1970 is past any retention_ms).
fn now_ms() -> i64 {
    i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()).unwrap()
}

fn code(e: &tally_client::Error) -> Option<ErrorCode> {
    e.code()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_and_consume_round_trip_keys_headers_and_nulls() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path()).await;
    let client = broker.client().await;
    client.admin().create_topic(NewTopic::new("rt", 3)).await.unwrap();
    let mut config = ProducerConfig::default();
    config.linger = Duration::from_millis(1);
    let producer = Producer::new(client.clone(), config);
    let headers = [HeaderRef { key: "trace", value: Some(b"abc") }, HeaderRef { key: "empty", value: None }];
    let mut futures = Vec::new();
    for i in 0..300u32 {
        let key = format!("key-{}", i % 7);
        let value = format!("value-{i}");
        let mut record = ProducerRecord::new("rt", value.as_bytes()).key(key.as_bytes()).headers(&headers);
        if i % 50 == 0 {
            record.value = None; // a tombstone
        }
        let delivery = producer.send(record).await.unwrap();
        futures.push((key.clone(), delivery));
    }
    let mut acked = Vec::new();
    for (key, f) in futures {
        let meta = f.await.unwrap();
        assert_eq!(meta.partition, partition_for_key(key.as_bytes(), 3), "keys land on Kafka's partition");
        acked.push((meta.partition, meta.offset));
    }
    producer.close().await;
    // Offsets per partition are 0..n without gaps or repeats.
    for p in 0..3 {
        let mut offsets: Vec<i64> = acked.iter().filter(|(q, _)| *q == p).map(|(_, o)| *o).collect();
        offsets.sort_unstable();
        assert_eq!(offsets, (0..offsets.len() as i64).collect::<Vec<_>>());
    }

    let consumer = Consumer::new(client.clone(), ConsumerConfig::default());
    for p in 0..3 {
        consumer.assign("rt", p, SeekTo::Beginning).await.unwrap();
    }
    let mut stream = consumer.stream();
    let mut seen = BTreeMap::new();
    while seen.len() < 300 {
        let r = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("records arrive")
            .unwrap()
            .unwrap();
        let key = String::from_utf8(r.key.clone().unwrap().to_vec()).unwrap();
        assert_eq!(r.partition, partition_for_key(key.as_bytes(), 3));
        assert_eq!(
            r.headers.iter().collect::<Vec<_>>(),
            vec![("trace".to_string(), Some(Bytes::from_static(b"abc"))), ("empty".to_string(), None)]
        );
        assert_eq!(r.headers.get("trace"), Some(Some(Bytes::from_static(b"abc"))));
        assert_eq!(r.headers.get("empty"), Some(None));
        assert_eq!(r.headers.get("absent"), None);
        assert!(seen.insert((r.partition, r.offset), r.value.clone()).is_none(), "no duplicates");
    }
    let tombstones = seen.values().filter(|v| v.is_none()).count();
    assert_eq!(tombstones, 6);
    broker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_fetch_wakes_on_append() {
    let dir = tempfile::tempdir().unwrap();
    // Clients reach the broker through a proxy that counts what they send,
    // so the test knows when the long poll reached the broker.
    let front = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let back = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = CountingProxy::start(front, back.local_addr().unwrap().to_string());
    let mut config = test_config(dir.path());
    config.advertised_address = Some(proxy.address.clone());
    let broker = TestBroker::start_on(config, back).await;
    let client = tally_client::Client::builder().bootstrap([proxy.address.clone()]).connect().await.unwrap();
    client.admin().create_topic(NewTopic::new("lp", 1)).await.unwrap();
    let pc = client.partition_client("lp", 0);
    pc.fetch(0, 1 << 20, Duration::ZERO).await.unwrap(); // the leader known, its connection open
    let before = proxy.sent();
    let waiting = {
        let pc = pc.clone();
        tokio::spawn(async move {
            let fetched = pc.fetch(0, 1 << 20, Duration::from_secs(25)).await.unwrap();
            (Instant::now(), fetched)
        })
    };
    // The fetch is on the broker's socket (and, with nothing to read, can
    // only be waiting there) before anything is appended.
    let arrived = wait_for(Duration::from_secs(10), async || proxy.sent() > before).await;
    assert!(arrived, "the long poll reached the broker");
    assert!(!waiting.is_finished(), "nothing to read: it waits");
    let appended = Instant::now();
    pc.produce_records(&[RecordRef { timestamp: 1, value: Some(b"wake"), ..Default::default() }], Acks::Leader)
        .await
        .unwrap();
    let (answered, fetched) = waiting.await.unwrap();
    let after = answered.saturating_duration_since(appended);
    assert!(after < Duration::from_secs(10), "woken by the append, not by max_wait ({after:?} after it)");
    let values: Vec<Bytes> = fetched.records(0).map(|r| r.unwrap().value.unwrap()).collect();
    assert_eq!(values, vec![Bytes::from_static(b"wake")]);
    // A client that goes away mid long-poll (its fetch parked on the
    // broker) does not disturb the broker.
    let before = proxy.sent();
    let parked = {
        let pc = pc.clone();
        tokio::spawn(async move { pc.fetch(1, 1 << 20, Duration::from_secs(30)).await })
    };
    let arrived = wait_for(Duration::from_secs(10), async || proxy.sent() > before).await;
    assert!(arrived && !parked.is_finished(), "the long poll is waiting on the broker");
    parked.abort();
    let record = RecordRef { timestamp: 1, value: Some(b"after"), ..Default::default() };
    assert_eq!(pc.produce_records(&[record], Acks::Leader).await.unwrap(), 1, "the broker serves on");
    let fetched = pc.fetch(1, 1 << 20, Duration::ZERO).await.unwrap();
    assert_eq!(fetched.records(1).count(), 1);
    broker.stop().await.unwrap();
}

fn batch_bytes(values: &[&[u8]]) -> Vec<u8> {
    let mut b = BatchBuilder::new();
    for v in values {
        b.push(&RecordRef { timestamp: 5, value: Some(v), ..Default::default() });
    }
    b.finish_vec()
}

async fn raw_produce(
    address: &str,
    topic: &str,
    partition: u32,
    records: Vec<u8>,
    acks: i32,
) -> pb::PartitionProduceResponse {
    let mut rpc = crate::harness::raw_client(address);
    let request = pb::ProduceRequest {
        acks,
        timeout_ms: 1000,
        topics: vec![pb::TopicProduceData {
            name: topic.to_string(),
            partitions: vec![pb::PartitionProduceData {
                partition,
                records: vec![records.into()],
                expected_end_offset: None,
            }],
        }],
    };
    rpc.produce(request).await.unwrap().into_inner().topics.remove(0).partitions.remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_its_code_and_the_broker_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path()).await;
    let client = broker.client().await;
    let admin = client.admin();
    admin.create_topic(NewTopic::new("good", 1).config("max_message_bytes", "2000")).await.unwrap();

    // Admin errors.
    let e = admin.create_topic(NewTopic::new("good", 1)).await.unwrap_err();
    assert_eq!(code(&e), Some(ErrorCode::TopicAlreadyExists));
    for bad in ["", ".", "..", "a b", &"x".repeat(250)] {
        let e = admin.create_topic(NewTopic::new(bad, 1)).await.unwrap_err();
        assert_eq!(code(&e), Some(ErrorCode::InvalidTopicException), "{bad:?}");
    }
    let e = admin.create_topic(NewTopic::new("cfg", 1).config("retention_ms", "soon")).await.unwrap_err();
    assert_eq!(code(&e), Some(ErrorCode::InvalidConfig));
    assert!(e.to_string().contains("retention_ms"), "the message names the key: {e}");
    let e = admin.create_topic(NewTopic { replication_factor: 3, ..NewTopic::new("rf", 1) }).await.unwrap_err();
    assert_eq!(code(&e), Some(ErrorCode::InvalidReplicationFactor));
    let e = admin.create_partitions("good", 1).await.unwrap_err();
    assert_eq!(code(&e), Some(ErrorCode::InvalidPartitions));
    let e = admin.delete_topic("missing").await.unwrap_err();
    assert_eq!(code(&e), Some(ErrorCode::UnknownTopicOrPartition));

    // Produce errors, each leaving the log untouched.
    let ok = raw_produce(&broker.address, "good", 0, batch_bytes(&[b"one"]), 0).await;
    assert_eq!(ok.error_code, 0);
    let r = raw_produce(&broker.address, "missing", 0, batch_bytes(&[b"x"]), 0).await;
    assert_eq!(r.error_code, ErrorCode::UnknownTopicOrPartition as i32);
    let r = raw_produce(&broker.address, "good", 9, batch_bytes(&[b"x"]), 0).await;
    assert_eq!(r.error_code, ErrorCode::UnknownTopicOrPartition as i32);
    let mut corrupt = batch_bytes(&[b"two", b"three"]);
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0x40;
    let r = raw_produce(&broker.address, "good", 0, corrupt, 0).await;
    assert_eq!(r.error_code, ErrorCode::CorruptMessage as i32);
    assert!(r.error_message.contains("CRC"), "{}", r.error_message);
    // A good batch followed by a corrupt one: neither is appended.
    let mut mixed = batch_bytes(&[b"ok"]);
    mixed.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 99, 1, 2, 3]);
    let r = raw_produce(&broker.address, "good", 0, mixed, 0).await;
    assert_eq!(r.error_code, ErrorCode::CorruptMessage as i32);
    let big = vec![7u8; 3000];
    let r = raw_produce(&broker.address, "good", 0, batch_bytes(&[&big]), 0).await;
    assert_eq!(r.error_code, ErrorCode::MessageTooLarge as i32);
    let r = raw_produce(&broker.address, "good", 0, batch_bytes(&[b"x"]), 99).await;
    assert_eq!(r.error_code, ErrorCode::InvalidRequiredAcks as i32);
    let r = raw_produce(&broker.address, "good", 0, Vec::new(), 0).await;
    assert_eq!(r.error_code, ErrorCode::InvalidRequest as i32);
    // Batches a Kafka broker refuses as INVALID_RECORD: a control batch from a
    // client, and a producer id without a base sequence (CRCs made right).
    let fix_crc = |mut v: Vec<u8>| {
        let crc = tally_proto::batch::compute_crc(&v);
        v[17..21].copy_from_slice(&crc.to_be_bytes());
        v
    };
    let mut control = batch_bytes(&[b"x"]);
    control[22] |= 0x20;
    let r = raw_produce(&broker.address, "good", 0, fix_crc(control), 0).await;
    assert_eq!(r.error_code, ErrorCode::InvalidRecord as i32, "{}", r.error_message);
    assert!(r.error_message.contains("control"), "{}", r.error_message);
    let mut no_sequence = batch_bytes(&[b"x"]);
    no_sequence[43..51].copy_from_slice(&7i64.to_be_bytes());
    no_sequence[51..53].copy_from_slice(&0i16.to_be_bytes());
    let r = raw_produce(&broker.address, "good", 0, fix_crc(no_sequence), 0).await;
    assert_eq!(r.error_code, ErrorCode::InvalidRecord as i32, "{}", r.error_message);
    assert!(r.error_message.contains("without a base sequence"), "{}", r.error_message);
    let pc = client.partition_client("good", 0);
    assert_eq!(pc.list_offset(OffsetSpec::Latest).await.unwrap(), Some(1), "only the good batch is in the log");

    // Fetch errors.
    let e = pc.fetch(5, 1 << 20, Duration::ZERO).await.unwrap_err();
    assert_eq!(code(&e), Some(ErrorCode::OffsetOutOfRange));
    assert!(e.to_string().contains("[0, 1)"), "the message gives the valid range: {e}");
    let e = pc.fetch(-3, 1 << 20, Duration::ZERO).await.unwrap_err();
    assert_eq!(code(&e), Some(ErrorCode::OffsetOutOfRange));
    let e = client.partition_client("missing", 0).fetch(0, 100, Duration::ZERO).await.unwrap_err();
    assert_eq!(code(&e), Some(ErrorCode::UnknownTopicOrPartition));

    // acks=all needs min_insync_replicas in sync; one broker has one.
    admin.create_topic(NewTopic::new("strict", 1).config("min_insync_replicas", "2")).await.unwrap();
    let e = client
        .partition_client("strict", 0)
        .produce_records(&[RecordRef { timestamp: 1, value: Some(b"x"), ..Default::default() }], Acks::All)
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(ErrorCode::NotEnoughReplicas));

    // A burst of concurrent requests is served.
    let mut burst = Vec::new();
    for i in 0..64u8 {
        let pc = pc.clone();
        burst.push(tokio::spawn(async move {
            pc.produce_records(&[RecordRef { timestamp: 1, value: Some(&[i]), ..Default::default() }], Acks::Leader)
                .await
        }));
    }
    for b in burst {
        b.await.unwrap().unwrap();
    }
    assert_eq!(pc.list_offset(OffsetSpec::Latest).await.unwrap(), Some(65));
    broker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_and_topic_configs_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path()).await;
    let client = broker.client().await;
    client
        .admin()
        .create_topic(NewTopic::new("keep", 2).config("retention.ms", "3600000").config("segment_bytes", "4096"))
        .await
        .unwrap();
    let pc = client.partition_client("keep", 1);
    let now = now_ms();
    for i in 0..200u32 {
        let v = format!("v{i}");
        pc.produce_records(
            &[RecordRef { timestamp: now + i64::from(i), value: Some(v.as_bytes()), ..Default::default() }],
            Acks::Leader,
        )
        .await
        .unwrap();
    }
    broker.stop().await.unwrap();

    let broker = TestBroker::start(dir.path()).await;
    let client = broker.client().await;
    let d = client.admin().describe_topic("keep").await.unwrap();
    assert_eq!(d.configs["retention_ms"], "3600000");
    assert_eq!(d.configs["segment_bytes"], "4096");
    assert_eq!(d.partitions.len(), 2);
    assert_eq!(d.partitions[1].high_watermark, 200);
    let pc = client.partition_client("keep", 1);
    let mut next = 0;
    while next < 200 {
        let f = pc.fetch(next, 1 << 20, Duration::ZERO).await.unwrap();
        for r in f.records(next) {
            let r = r.unwrap();
            assert_eq!(r.offset, next);
            assert_eq!(r.value.unwrap(), format!("v{next}").as_bytes());
            next += 1;
        }
    }
    assert_eq!(pc.list_offset(OffsetSpec::Timestamp(now + 150)).await.unwrap(), Some(150));
    broker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_admin_alter_grow_delete_and_retention() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start_with(test_config(dir.path())).await;
    let client = broker.client().await;
    let admin = client.admin();
    admin.create_topic(NewTopic::new("t", 1).config("segment_bytes", "2048").config("flush", "always")).await.unwrap();
    let pc = client.partition_client("t", 0);
    let value = vec![1u8; 200];
    for _ in 0..100 {
        pc.produce_records(&[RecordRef { timestamp: now_ms(), value: Some(&value), ..Default::default() }], Acks::All)
            .await
            .unwrap();
    }
    assert_eq!(pc.list_offset(OffsetSpec::Earliest).await.unwrap(), Some(0));
    // Shrink retention: the maintenance task deletes old segments.
    let mut set = BTreeMap::new();
    set.insert("retention_bytes".to_string(), "4096".to_string());
    admin.alter_topic_configs("t", set, vec![]).await.unwrap();
    assert_eq!(admin.describe_topic("t").await.unwrap().configs["retention_bytes"], "4096");
    let trimmed = wait_for(Duration::from_secs(10), async || {
        pc.list_offset(OffsetSpec::Earliest).await.unwrap().unwrap_or(0) > 0
    })
    .await;
    assert!(trimmed, "retention moved the log start");
    let start = pc.list_offset(OffsetSpec::Earliest).await.unwrap().unwrap();
    let f = pc.fetch(start, 1 << 20, Duration::ZERO).await.unwrap();
    assert_eq!(f.records(start).next().unwrap().unwrap().offset, start);

    admin.create_partitions("t", 4).await.unwrap();
    assert_eq!(admin.describe_topic("t").await.unwrap().partitions.len(), 4);
    client
        .partition_client("t", 3)
        .produce_records(&[RecordRef { timestamp: 1, value: Some(b"p3"), ..Default::default() }], Acks::Leader)
        .await
        .unwrap();

    admin.delete_topic("t").await.unwrap();
    assert!(admin.list_topics().await.unwrap().is_empty());
    admin.create_topic(NewTopic::new("t", 1)).await.unwrap();
    assert_eq!(
        client.partition_client("t", 0).list_offset(OffsetSpec::Latest).await.unwrap(),
        Some(0),
        "a recreated topic starts empty"
    );
    broker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_broker_cannot_open_the_same_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let first = TestBroker::start(dir.path()).await;
    let _client = first.client().await;
    let second = TestBroker::start(dir.path()).await;
    let err = second.stop().await.unwrap_err();
    assert!(err.to_string().contains("in use"), "{err}");
    first.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_stream_rides_out_a_broker_restart_without_gaps_or_repeats() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path()).await;
    let address = broker.address.clone();
    let client = broker.client().await;
    client.admin().create_topic(NewTopic::new("restart", 1)).await.unwrap();
    let pc = client.partition_client("restart", 0);
    let produce = |pc: tally_client::PartitionClient, from: u32| async move {
        for i in from..from + 10 {
            let v = format!("r{i}");
            pc.produce_records(
                &[RecordRef { timestamp: 1, value: Some(v.as_bytes()), ..Default::default() }],
                Acks::Leader,
            )
            .await
            .unwrap();
        }
    };
    produce(pc.clone(), 0).await;
    let mut config = ConsumerConfig::default();
    config.max_wait = Duration::from_millis(100);
    let consumer = Consumer::new(client.clone(), config);
    consumer.assign("restart", 0, SeekTo::Beginning).await.unwrap();
    let mut stream = consumer.stream();
    for i in 0..10 {
        expect_next(&mut stream, i).await;
    }
    broker.stop().await.unwrap();
    let broker = TestBroker::start_at(test_config(dir.path()), &address).await;
    produce(pc, 10).await;
    for i in 10..20 {
        expect_next(&mut stream, i).await;
    }
    broker.stop().await.unwrap();
}

async fn expect_next(stream: &mut tally_client::RecordStream<'_>, expected: i64) {
    let r = tokio::time::timeout(Duration::from_secs(20), stream.next()).await.expect("a record").unwrap().unwrap();
    assert_eq!(r.offset, expected);
    assert_eq!(r.value.unwrap(), format!("r{expected}").as_bytes());
}

/// Sends raw bytes as a gRPC message body, to test what the broker does
/// with a message that is not valid protobuf.
#[derive(Debug, Clone, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes::Buf;
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_grpc_message_is_refused_and_the_broker_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path()).await;
    let client = broker.client().await;
    client.admin().create_topic(NewTopic::new("after", 1)).await.unwrap();
    let channel = Connection::lazy(&broker.address, ConnectionSettings::default()).unwrap();
    for body in [vec![0xff; 64], vec![0x0a, 0x80], b"not protobuf at all".to_vec()] {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await.unwrap();
        let path = tonic::codegen::http::uri::PathAndQuery::from_static("/tally.v1.Tally/Produce");
        let status = grpc.unary(tonic::Request::new(body), path, RawCodec).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
    }
    let offset = client
        .partition_client("after", 0)
        .produce_records(&[RecordRef { timestamp: 1, value: Some(b"still here"), ..Default::default() }], Acks::Leader)
        .await
        .unwrap();
    assert_eq!(offset, 0);
    broker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_producers_keep_per_key_order_and_every_ack_is_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path()).await;
    let client = broker.client().await;
    client.admin().create_topic(NewTopic::new("history", 4)).await.unwrap();
    let mut producers = Vec::new();
    for p in 0..4u32 {
        let client = client.clone();
        producers.push(tokio::spawn(async move {
            let mut config = ProducerConfig::default();
            config.linger = Duration::from_millis(2);
            config.batch_bytes = 4096;
            let producer = Producer::new(client, config);
            let mut deliveries = Vec::new();
            for i in 0..500u32 {
                let key = format!("producer-{p}-key-{}", i % 5);
                let value = format!("{p}:{i}");
                let d =
                    producer.send(ProducerRecord::new("history", value.as_bytes()).key(key.as_bytes())).await.unwrap();
                deliveries.push((key, value, d));
            }
            let mut acked = Vec::new();
            for (key, value, d) in deliveries {
                let meta = d.await.unwrap();
                acked.push((key, value, meta.partition, meta.offset));
            }
            producer.close().await;
            acked
        }));
    }
    let mut acked = Vec::new();
    for p in producers {
        acked.extend(p.await.unwrap());
    }
    assert_eq!(acked.len(), 2000);

    let consumer = Consumer::new(client.clone(), ConsumerConfig::default());
    for p in 0..4 {
        consumer.assign("history", p, SeekTo::Beginning).await.unwrap();
    }
    let mut stored: BTreeMap<(u32, i64), (String, String)> = BTreeMap::new();
    while stored.len() < 2000 {
        for r in consumer.poll().await.unwrap() {
            let key = String::from_utf8(r.key.unwrap().to_vec()).unwrap();
            let value = String::from_utf8(r.value.unwrap().to_vec()).unwrap();
            assert!(stored.insert((r.partition, r.offset), (key, value)).is_none(), "each offset is read once");
        }
    }
    // Every acknowledged record is stored exactly where its ack said.
    for (key, value, partition, offset) in &acked {
        assert_eq!(stored.get(&(*partition, *offset)), Some(&(key.clone(), value.clone())));
    }
    // Each key's records are stored in the order they were sent.
    let mut last_seq: BTreeMap<&str, u32> = BTreeMap::new();
    for (key, value) in stored.values() {
        let seq: u32 = value.split(':').nth(1).unwrap().parse().unwrap();
        if let Some(prev) = last_seq.insert(key, seq) {
            assert!(seq > prev, "{key}: {seq} after {prev}");
        }
    }
    broker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_answer_like_grpcurl_expects() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path()).await;
    let channel = Connection::lazy(&broker.address, ConnectionSettings::default()).unwrap();

    let mut health = HealthClient::new(channel.clone());
    let status =
        health.check(HealthCheckRequest { service: "tally.v1.Tally".into() }).await.unwrap().into_inner().status;
    assert_eq!(status, ServingStatus::Serving as i32);

    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection.server_reflection_info(tokio_stream::iter([request])).await.unwrap().into_inner();
    let answer = answers.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else { panic!("{answer:?}") };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"tally.v1.Tally".to_string()) && names.contains(&"tally.v1.Admin".to_string()),
        "{names:?}"
    );
    broker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_failing_partition_does_not_cost_the_others_their_records() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path()).await;
    let client = broker.client().await;
    client.admin().create_topic(NewTopic::new("good", 1)).await.unwrap();
    client.admin().create_topic(NewTopic::new("bad", 1)).await.unwrap();
    let pc = client.partition_client("good", 0);
    for v in [b"a", b"b"] {
        pc.produce_records(&[RecordRef { timestamp: 1, value: Some(v), ..Default::default() }], Acks::Leader)
            .await
            .unwrap();
    }
    let mut config = ConsumerConfig::default();
    config.auto_offset_reset = tally_client::OffsetReset::Error;
    config.max_wait = Duration::from_millis(50);
    let consumer = Consumer::new(client.clone(), config);
    consumer.assign("bad", 0, SeekTo::Offset(100)).await.unwrap();
    consumer.assign("good", 0, SeekTo::Beginning).await.unwrap();
    let records = consumer.poll().await.unwrap();
    let values: Vec<Bytes> = records.into_iter().map(|r| r.value.unwrap()).collect();
    assert_eq!(values, vec![Bytes::from_static(b"a"), Bytes::from_static(b"b")]);
    let err = consumer.poll().await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::OffsetOutOfRange), "the failure comes next: {err}");
    assert_eq!(consumer.position("good", 0), Some(2), "the good partition moved on exactly once");
    broker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_metadata_expires_so_added_partitions_are_seen() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path()).await;
    let admin_client = broker.client().await;
    admin_client.admin().create_topic(NewTopic::new("grows", 1)).await.unwrap();
    let fresh = tally_client::Client::builder()
        .bootstrap([broker.address.clone()])
        .metadata_max_age(Duration::from_millis(200))
        .connect()
        .await
        .unwrap();
    let stale = broker.client().await; // the default: 5 minutes
    assert_eq!(fresh.topic_info("grows").await.unwrap().leaders.len(), 1);
    assert_eq!(stale.topic_info("grows").await.unwrap().leaders.len(), 1);
    admin_client.admin().create_partitions("grows", 3).await.unwrap();
    let seen =
        wait_for(Duration::from_secs(10), async || fresh.topic_info("grows").await.is_ok_and(|t| t.leaders.len() == 3))
            .await;
    assert!(seen, "a client with a short metadata_max_age sees the new partitions");
    assert_eq!(stale.topic_info("grows").await.unwrap().leaders.len(), 1, "a fresh cache is used as it is");
    broker.stop().await.unwrap();
}

fn wall_ms() -> i64 {
    i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timestamps_outside_the_topic_bounds_are_refused_and_log_append_time_stamps_the_batch() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path()).await;
    let client = broker.client().await;
    let admin = client.admin();
    let bounded = NewTopic::new("bounded", 1)
        .config("message_timestamp_before_max_ms", "60000")
        .config("message_timestamp_after_max_ms", "1000");
    admin.create_topic(bounded).await.unwrap();
    let pc = client.partition_client("bounded", 0);
    let now = wall_ms();
    for (ts, why) in [(now + 3_600_000, "an hour ahead"), (now - 3_600_000, "an hour old")] {
        let record = RecordRef { timestamp: ts, value: Some(b"x"), ..Default::default() };
        let e = pc.produce_records(&[record], Acks::Leader).await.unwrap_err();
        assert_eq!(code(&e), Some(ErrorCode::InvalidTimestamp), "{why}: {e}");
        assert!(e.to_string().contains("message_timestamp"), "the message names the configs: {e}");
    }
    let record = RecordRef { timestamp: now, value: Some(b"x"), ..Default::default() };
    pc.produce_records(&[record], Acks::Leader).await.expect("a timestamp of now");
    assert_eq!(pc.list_offset(OffsetSpec::Latest).await.unwrap(), Some(1), "only the good record was stored");
    // LogAppendTime: the broker's clock, whatever the producer said.
    admin.create_topic(NewTopic::new("stamped", 1).config("message_timestamp_type", "LogAppendTime")).await.unwrap();
    let mut raw = crate::harness::raw_client(&broker.address);
    let mut b = BatchBuilder::new();
    b.push(&RecordRef { timestamp: 1, value: Some(b"old"), ..Default::default() });
    b.push(&RecordRef { timestamp: 2, value: Some(b"older"), ..Default::default() });
    let request = pb::ProduceRequest {
        acks: pb::Acks::Leader as i32,
        timeout_ms: 1000,
        topics: vec![pb::TopicProduceData {
            name: "stamped".into(),
            partitions: vec![pb::PartitionProduceData {
                partition: 0,
                records: vec![b.finish()],
                expected_end_offset: None,
            }],
        }],
    };
    let before = wall_ms();
    let answer = raw.produce(request).await.unwrap().into_inner();
    let p = &answer.topics[0].partitions[0];
    assert_eq!(p.error_code, 0, "{}", p.error_message);
    assert!(p.log_append_time_ms >= before && p.log_append_time_ms <= wall_ms(), "{}", p.log_append_time_ms);
    let fetched = client.partition_client("stamped", 0).fetch(0, 1 << 20, Duration::from_millis(100)).await.unwrap();
    let batch = &fetched.batches[0];
    assert!(batch.header().is_log_append_time());
    assert_eq!(batch.header().max_timestamp(), p.log_append_time_ms);
    let stamps: Vec<i64> = batch.records().unwrap().map(|r| r.unwrap().timestamp).collect();
    assert_eq!(stamps, vec![p.log_append_time_ms; 2], "every record reports the append time");
    broker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_consumer_seeks_pauses_and_reports_its_position_while_it_streams() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path()).await;
    let client = broker.client().await;
    client.admin().create_topic(NewTopic::new("live", 1)).await.unwrap();
    let pc = client.partition_client("live", 0);
    for chunk in 0..10 {
        let values: Vec<String> = (0..10).map(|i| format!("r{}", chunk * 10 + i)).collect();
        let records: Vec<RecordRef<'_>> = values
            .iter()
            .map(|v| RecordRef { timestamp: 1, value: Some(v.as_bytes()), ..Default::default() })
            .collect();
        pc.produce_records(&records, Acks::Leader).await.unwrap();
    }
    let mut config = ConsumerConfig::default();
    config.max_wait = Duration::from_millis(50);
    let consumer = Consumer::new(client.clone(), config);
    consumer.assign("live", 0, SeekTo::Beginning).await.unwrap();
    let mut stream = consumer.stream();
    for i in 0..10 {
        expect_next(&mut stream, i).await;
    }
    assert_eq!(consumer.position("live", 0), Some(10), "position counts what the stream handed out");
    // Seek while the stream holds the consumer: what was fetched ahead for
    // the old position is dropped.
    consumer.seek("live", 0, SeekTo::Offset(50)).await.unwrap();
    expect_next(&mut stream, 50).await;
    consumer.pause("live", 0);
    let quiet = tokio::time::timeout(Duration::from_millis(300), stream.next()).await;
    assert!(quiet.is_err(), "a paused partition yields nothing: {quiet:?}");
    assert_eq!(consumer.position("live", 0), Some(51));
    consumer.resume("live", 0);
    for i in 51..100 {
        expect_next(&mut stream, i).await;
    }
    assert_eq!(consumer.position("live", 0), Some(100));
    broker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_fetches_ahead_no_more_than_its_byte_bound() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path()).await;
    let client = broker.client().await;
    client.admin().create_topic(NewTopic::new("ahead", 1)).await.unwrap();
    let pc = client.partition_client("ahead", 0);
    let value = vec![b'v'; 1000];
    let mut batch_bytes = 0;
    for _ in 0..100 {
        let records: Vec<RecordRef<'_>> =
            (0..10).map(|_| RecordRef { timestamp: 1, value: Some(&value), ..Default::default() }).collect();
        let mut b = BatchBuilder::new();
        for r in &records {
            b.push(r);
        }
        let bytes = b.finish();
        batch_bytes = bytes.len();
        pc.produce(bytes, Acks::Leader).await.unwrap(); // 100 batches of ~10 KB: ~1 MB
    }
    let bound = 64 << 10;
    let mut config = ConsumerConfig::default();
    config.max_prefetch_bytes = bound;
    let consumer = Consumer::new(client.clone(), config);
    consumer.assign("ahead", 0, SeekTo::Beginning).await.unwrap();
    let mut stream = consumer.stream();
    stream.next().await.unwrap().unwrap();
    // The fetcher runs ahead until its buffer is within a batch of the
    // bound (waited for, not sampled for a fixed time), and no further.
    let filled = wait_for(Duration::from_secs(10), async || consumer.buffered_bytes() + batch_bytes >= bound).await;
    let most = consumer.buffered_bytes();
    assert!(filled, "it fetched ahead up to the bound: {most} bytes buffered");
    assert!(most <= bound + batch_bytes, "{most} bytes buffered with a bound of {bound}");
    let mut read = 1;
    while read < 1000 {
        stream.next().await.unwrap().unwrap();
        read += 1;
        assert!(consumer.buffered_bytes() <= bound + batch_bytes);
    }
    assert_eq!(consumer.position("ahead", 0), Some(1000));
    broker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_rides_its_broker_restarting_on_the_same_address() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path()).await;
    let address = broker.address.clone();
    let client = broker.client().await;
    client.admin().create_topic(NewTopic::new("again", 1)).await.unwrap();
    let pc = client.partition_client("again", 0);
    let record = [RecordRef { timestamp: now_ms(), value: Some(b"v"), ..Default::default() }];
    assert_eq!(pc.produce_records(&record, Acks::Leader).await.unwrap(), 0);
    broker.stop().await.unwrap();

    // Down: a retriable UNAVAILABLE that names the broker, not a hang.
    let e = pc.produce_records(&record, Acks::Leader).await.unwrap_err();
    assert!(e.is_retriable(), "{e:?}");
    assert!(e.to_string().contains(&address), "{e}");

    // Back on the same address: the same client reconnects by itself.
    let broker = TestBroker::start_at(test_config(dir.path()), &address).await;
    let mut produced = None;
    wait_for(Duration::from_secs(10), async || {
        produced = pc.produce_records(&record, Acks::Leader).await.ok();
        produced.is_some()
    })
    .await;
    assert_eq!(produced, Some(1), "the record after the restart follows the one before it");
    broker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_past_the_per_broker_limit_are_refused_up_front_with_the_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let config = tally_broker::BrokerConfig { max_partitions_per_broker: 10, ..test_config(dir.path()) };
    let broker = TestBroker::start_with(config).await;
    let client = broker.client().await;
    let admin = client.admin();
    admin.create_topic(NewTopic::new("eight", 8)).await.unwrap();
    let e = admin.create_topic(NewTopic::new("four", 4)).await.unwrap_err();
    assert_eq!(code(&e), Some(ErrorCode::InvalidPartitions));
    let message = e.to_string();
    assert!(message.contains("hosts 8 partition replicas and would get 4 more, above its limit of 10"), "{message}");
    assert!(message.contains("max_partitions_per_broker is 10"), "{message}");
    assert!(admin.list_topics().await.unwrap().iter().all(|t| t.name != "four"), "nothing was created");
    let e = admin.create_partitions("eight", 11).await.unwrap_err();
    assert_eq!(code(&e), Some(ErrorCode::InvalidPartitions));
    // Up to the limit is fine.
    admin.create_partitions("eight", 10).await.unwrap();
    assert_eq!(admin.describe_topic("eight").await.unwrap().partitions.len(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_rotten_on_disk_fails_its_partition_and_nothing_from_it_or_after_it_comes_out() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path()).await;
    let client = broker.client().await;
    client.admin().create_topic(NewTopic::new("rot", 1)).await.unwrap();
    let pc = client.partition_client("rot", 0);
    // Three batches of ten records: offsets 0..10, 10..20 and 20..30.
    for b in 0..3 {
        let values: Vec<String> = (0..10).map(|i| format!("r{}", b * 10 + i)).collect();
        let records: Vec<RecordRef> = values
            .iter()
            .map(|v| RecordRef { timestamp: 1, value: Some(v.as_bytes()), ..Default::default() })
            .collect();
        pc.produce_records(&records, Acks::Leader).await.unwrap();
    }
    // Flip the second batch's last byte (a value byte its CRC covers) in the
    // segment file: bit rot the broker does not check for on reads.
    let path = dir.path().join("rot-0").join("00000000000000000000.log");
    let data = std::fs::read(&path).unwrap();
    let first = tally_proto::batch::batch_size_at(&data).unwrap();
    let second = tally_proto::batch::batch_size_at(&data[first..]).unwrap();
    let at = first + second - 1;
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    std::os::unix::fs::FileExt::write_at(&file, &[data[at] ^ 0xff], at as u64).unwrap();

    let mut config = ConsumerConfig::default();
    config.max_wait = Duration::from_millis(200);
    let consumer = Consumer::new(client.clone(), config);
    consumer.assign("rot", 0, SeekTo::Beginning).await.unwrap();
    let (mut offsets, mut failure) = (Vec::new(), None);
    let deadline = Instant::now() + Duration::from_secs(20);
    while failure.is_none() && Instant::now() < deadline {
        match consumer.poll().await {
            Ok(records) => offsets.extend(records.iter().map(|r| r.offset)),
            Err(e) => failure = Some(e),
        }
    }
    let failure = failure.expect("the rotten batch is reported");
    assert!(matches!(failure, tally_client::Error::Corrupt(_)), "{failure}");
    // Later polls hand out nothing more of the partition until a seek.
    for _ in 0..3 {
        offsets.extend(consumer.poll().await.unwrap_or_default().iter().map(|r| r.offset));
    }
    assert!(offsets.iter().all(|o| *o < 10), "nothing of the rotten batch or after it: {offsets:?}");
    assert_eq!(offsets, (0..offsets.len() as i64).collect::<Vec<_>>(), "what came out is in order, once");
    // Past it, reading goes on.
    consumer.seek("rot", 0, SeekTo::Offset(20)).await.unwrap();
    let mut after = Vec::new();
    while after.len() < 10 && Instant::now() < deadline {
        after.extend(consumer.poll().await.unwrap().iter().map(|r| r.offset));
    }
    assert_eq!(after, (20..30).collect::<Vec<_>>());
    broker.stop().await.unwrap();
}
