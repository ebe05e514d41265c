//! Batches built and compressed by a Kafka client library (kafka-python,
//! fixtures in tests/data/kafka, made by generate.py there) validate and
//! decode in Tally, and go through a broker unchanged.

use std::time::Duration;

use bytes::Bytes;
use tally_client::{Acks, Compression, NewTopic};
use tally_proto::batch::{BatchLimits, RecordBatch};

use crate::harness::TestBroker;

const CODECS: [&str; 4] = ["gzip", "snappy", "lz4", "zstd"];

fn fixture(codec: &str) -> Bytes {
    let path = format!("{}/tests/data/kafka/{codec}.bin", env!("CARGO_MANIFEST_DIR"));
    Bytes::from(std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}")))
}

fn expected() -> serde_json::Value {
    let path = format!("{}/tests/data/kafka/expected.json", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The records of `batch` in expected.json's shape.
fn as_json(batch: &RecordBatch) -> serde_json::Value {
    let records: Vec<serde_json::Value> = batch
        .records()
        .unwrap()
        .map(|r| {
            let r = r.unwrap();
            let headers: Vec<serde_json::Value> = r
                .headers()
                .map(|h| {
                    let (k, v) = h.unwrap();
                    serde_json::json!([String::from_utf8(k.to_vec()).unwrap(), hex(&v.unwrap_or_default())])
                })
                .collect();
            serde_json::json!({
                "offset_delta": r.offset_delta,
                "timestamp": r.timestamp,
                "key": r.key.as_deref().map(hex),
                "value": hex(r.value.as_deref().unwrap()),
                "headers": headers,
            })
        })
        .collect();
    serde_json::Value::Array(records)
}

#[test]
fn batches_compressed_by_kafka_python_validate_and_decode_to_their_records() {
    let expected = expected();
    for codec in CODECS {
        let bytes = fixture(codec);
        let batch =
            RecordBatch::validate(bytes.clone(), &BatchLimits::default()).unwrap_or_else(|e| panic!("{codec}: {e}"));
        let attributes = batch.header().attributes();
        assert_eq!(Compression::from_attributes(attributes).unwrap().name(), codec);
        assert_eq!(as_json(&batch), expected[codec], "{codec}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_python_batch_goes_through_the_broker_as_sent_and_the_consumer_decodes_it() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path()).await;
    let client = broker.client().await;
    client.admin().create_topic(NewTopic::new("interop", 1)).await.unwrap();
    let pc = client.partition_client("interop", 0);
    let expected = expected();
    let mut offset = 0;
    for codec in CODECS {
        let sent = fixture(codec);
        let base = pc.produce(sent.clone(), Acks::All).await.unwrap_or_else(|e| panic!("{codec}: {e}"));
        assert_eq!(base, offset);
        let fetched = pc.fetch(base, 1 << 20, Duration::from_millis(100)).await.unwrap();
        let batch = &fetched.batches[0];
        // Stored as sent: only the base offset and leader epoch differ.
        assert_eq!(batch.bytes()[17..], sent[17..], "{codec}: the broker kept the compressed bytes");
        assert_eq!(as_json(batch), expected[codec], "{codec}");
        offset += i64::from(batch.header().record_count());
    }
    broker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_producer_compresses_with_every_codec_and_the_consumer_reads_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path()).await;
    let client = broker.client().await;
    for codec in [Compression::None, Compression::Gzip, Compression::Snappy, Compression::Lz4, Compression::Zstd] {
        let topic = format!("c-{}", codec.name());
        client.admin().create_topic(NewTopic::new(&topic, 1)).await.unwrap();
        let mut config = tally_client::ProducerConfig::default();
        config.compression = codec;
        let producer = tally_client::Producer::new(client.clone(), config);
        let mut deliveries = Vec::new();
        for i in 0..200 {
            let value = format!("record {i} of {codec}").repeat(5);
            let record = tally_client::ProducerRecord::new(&topic, value.as_bytes()).partition(0);
            deliveries.push(producer.send(record).await.unwrap());
        }
        for d in deliveries {
            d.await.unwrap();
        }
        producer.close().await;
        let fetched = client.partition_client(&topic, 0).fetch(0, 4 << 20, Duration::from_millis(100)).await.unwrap();
        let codecs: Vec<i16> = fetched.batches.iter().map(|b| b.header().attributes() & 7).collect();
        assert!(codecs.iter().all(|c| *c == codec.attribute_bits()), "{codec}: {codecs:?}");
        let consumer = tally_client::Consumer::new(client.clone(), tally_client::ConsumerConfig::default());
        consumer.assign(&topic, 0, tally_client::SeekTo::Beginning).await.unwrap();
        let mut seen = Vec::new();
        for _ in 0..100 {
            if seen.len() >= 200 {
                break;
            }
            for r in consumer.poll().await.unwrap() {
                seen.push(String::from_utf8(r.value.unwrap().to_vec()).unwrap());
            }
        }
        let wanted: Vec<String> = (0..200).map(|i| format!("record {i} of {codec}").repeat(5)).collect();
        assert_eq!(seen, wanted, "{codec}");
    }
    broker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressed_batch_that_does_not_decode_or_is_a_bomb_is_corrupt_message_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path()).await;
    let client = broker.client().await;
    client.admin().create_topic(NewTopic::new("strict", 1)).await.unwrap();
    let pc = client.partition_client("strict", 0);
    // A fixture whose compressed payload is damaged, CRC fixed so only the codec can tell.
    let mut damaged = fixture("zstd").to_vec();
    let mid = 61 + (damaged.len() - 61) / 2;
    damaged[mid] ^= 0xff;
    damaged[mid + 1] ^= 0xff;
    let crc = tally_proto::batch::compute_crc(&damaged);
    damaged[17..21].copy_from_slice(&crc.to_be_bytes());
    // A bomb: 100 MiB of zeros in one record, compressed to a few KiB.
    let zeros = vec![0u8; 100 << 20];
    let mut b = tally_proto::batch::BatchBuilder::new();
    b.set_compression(Compression::Zstd);
    b.push(&tally_proto::batch::RecordRef { timestamp: 1, value: Some(&zeros), ..Default::default() });
    let bomb = b.finish();
    assert!(bomb.len() < 1 << 20, "{} bytes", bomb.len());
    for (what, bytes) in [("damaged", Bytes::from(damaged)), ("bomb", bomb)] {
        let e = pc.produce(bytes, Acks::Leader).await.unwrap_err();
        assert_eq!(e.code(), Some(tally_client::ErrorCode::CorruptMessage), "{what}: {e}");
    }
    assert_eq!(pc.list_offset(tally_client::OffsetSpec::Latest).await.unwrap(), Some(0), "nothing stored");
    // The broker goes on serving.
    pc.produce(fixture("lz4"), Acks::Leader).await.unwrap();
    broker.stop().await.unwrap();
}

/// The records of expected.json's `codec` entry, encoded by Tally's own
/// builder with that codec.
fn tally_made(codec: &str) -> Bytes {
    let unhex = |s: &str| (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect();
    let records = expected()[codec].as_array().unwrap().clone();
    let mut builder = tally_proto::batch::BatchBuilder::new();
    builder.set_compression(codec.parse().unwrap());
    for r in &records {
        let key: Option<Vec<u8>> = r["key"].as_str().map(unhex);
        let value: Vec<u8> = unhex(r["value"].as_str().unwrap());
        let headers: Vec<(String, Vec<u8>)> = r["headers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| (h[0].as_str().unwrap().to_string(), unhex(h[1].as_str().unwrap())))
            .collect();
        let header_refs: Vec<tally_proto::batch::HeaderRef<'_>> =
            headers.iter().map(|(k, v)| tally_proto::batch::HeaderRef { key: k, value: Some(v) }).collect();
        builder.push(&tally_proto::batch::RecordRef {
            timestamp: r["timestamp"].as_i64().unwrap(),
            key: key.as_deref(),
            value: Some(&value),
            headers: &header_refs,
        });
    }
    builder.finish()
}

/// The other direction: tests/data/kafka/tally/CODEC.bin are batches Tally's
/// encoder made, which kafka-python decoded (its output is
/// tests/data/kafka/tally/kafka-python.txt, from check_tally.py). Tally must
/// still make exactly those bytes; if the encoder changes on purpose, write
/// them anew with `TALLY_WRITE_FIXTURES=1` and run check_tally.py on them again.
#[test]
fn tally_compresses_every_codec_into_the_bytes_kafka_python_decoded() {
    let dir = format!("{}/tests/data/kafka/tally", env!("CARGO_MANIFEST_DIR"));
    for codec in CODECS {
        let made = tally_made(codec);
        let path = format!("{dir}/{codec}.bin");
        if std::env::var("TALLY_WRITE_FIXTURES").is_ok_and(|v| v == "1") {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, &made).unwrap();
        }
        let checked_in = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert!(made == checked_in, "{codec}: Tally's encoder no longer makes the bytes kafka-python decoded");
        let batch = RecordBatch::validate(made, &BatchLimits::default()).unwrap();
        assert_eq!(as_json(&batch), expected()[codec], "{codec}");
    }
    let decoded = std::fs::read_to_string(format!("{dir}/kafka-python.txt")).unwrap();
    for codec in CODECS {
        assert!(decoded.contains(&format!("{codec}.bin: base offset 0, {codec}")), "kafka-python read {codec}");
    }
}
