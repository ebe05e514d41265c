//! The metrics endpoint of a real `tally serve`: every metric of the
//! catalogue is documented in docs/metrics.md and present in a scrape that a
//! Prometheus text parser accepts, and produce, consume, a group commit and
//! a refused append move the counters they should.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use prometheus_parse::{Scrape, Value};
use tally::child::BrokerProcess;
use tally_broker::metrics::CATALOGUE;
use tally_client::{Acks, AppendIfError, Consumer, ConsumerConfig, NewTopic, OffsetReset};
use tally_proto::batch::RecordRef;

/// `GET /metrics`, parsed.
fn scrape(address: &str) -> Scrape {
    let mut stream = std::net::TcpStream::connect(address).expect("connect to the metrics endpoint");
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(stream, "GET /metrics HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4"), "{head}");
    Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("a Prometheus text scrape")
}

/// The value of `name` with `labels`, summed over the samples that match.
fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            Value::Histogram(buckets) => buckets.last().map_or(0.0, |b| b.count),
            Value::Summary(_) => 0.0,
        })
        .sum()
}

fn documented_names() -> BTreeSet<String> {
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/metrics.md")).unwrap();
    doc.lines().filter_map(|l| l.strip_prefix("| `")).filter_map(|l| l.split('`').next()).map(str::to_string).collect()
}

#[test]
fn every_exported_metric_is_documented_and_the_docs_list_no_other() {
    let exported: BTreeSet<String> = CATALOGUE.iter().map(|m| m.name.to_string()).collect();
    assert_eq!(documented_names(), exported);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_lists_every_documented_metric_and_traffic_moves_the_counters() {
    let dir = tempfile::tempdir().unwrap();
    let binary = Path::new(env!("CARGO_BIN_EXE_tally"));
    let broker =
        BrokerProcess::start(binary, dir.path(), &["--metrics-listen", "127.0.0.1:0", "--flush", "always"]).unwrap();
    let metrics = broker.metrics_address.clone().expect("the broker printed its metrics address");
    let client = tally_client::Client::builder().bootstrap([broker.address.clone()]).connect().await.unwrap();
    client.admin().create_topic(NewTopic::new("orders", 2)).await.unwrap();

    let before = tokio::task::spawn_blocking({
        let m = metrics.clone();
        move || scrape(&m)
    })
    .await
    .unwrap();
    assert_eq!(value(&before, "tally_records_in_total", &[("topic", "orders")]), 0.0);

    // 30 records in 3 batches, one refused conditional append, a group
    // that reads 20 of them and commits.
    let pc = client.partition_client("orders", 0);
    for batch in 0..3 {
        let values: Vec<String> = (0..10).map(|i| format!("order-{batch}-{i}")).collect();
        let records: Vec<RecordRef<'_>> = values
            .iter()
            .map(|v| RecordRef { timestamp: 1, value: Some(v.as_bytes()), ..Default::default() })
            .collect();
        pc.produce_records(&records, Acks::All).await.unwrap();
    }
    let stale =
        pc.append_if(0, &[RecordRef { timestamp: 1, value: Some(b"late"), ..Default::default() }], Acks::All).await;
    assert!(matches!(stale, Err(AppendIfError::Conflict { current_end_offset: 30 })), "{stale:?}");
    let mut config = ConsumerConfig::default();
    config.group_id = Some("billing".into());
    config.auto_offset_reset = OffsetReset::Earliest;
    config.max_wait = Duration::from_millis(100);
    config.enable_auto_commit = false;
    let consumer = Consumer::new(client.clone(), config);
    consumer.subscribe(&["orders"]).unwrap();
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while seen.len() < 30 && std::time::Instant::now() < deadline {
        seen.extend(consumer.poll().await.unwrap());
    }
    assert_eq!(seen.len(), 30);
    // Commit after the 20th record: a lag of 10 on partition 0.
    consumer.commit(&seen[19]).await.unwrap();

    let after = tokio::task::spawn_blocking(move || scrape(&metrics)).await.unwrap();
    let names: BTreeSet<&str> = after.samples.iter().map(|s| s.metric.as_str()).collect();
    for name in documented_names() {
        assert!(names.contains(name.as_str()), "{name} is documented but not in the scrape");
    }
    let topic = [("topic", "orders")];
    assert_eq!(value(&after, "tally_records_in_total", &topic), 30.0);
    assert!(value(&after, "tally_bytes_in_total", &topic) > 300.0);
    assert!(value(&after, "tally_records_out_total", &topic) >= 30.0);
    assert!(value(&after, "tally_bytes_out_total", &topic) >= value(&after, "tally_bytes_in_total", &topic));
    assert!(value(&after, "tally_produce_request_duration_seconds", &[("acks", "all")]) >= 4.0);
    assert!(value(&after, "tally_fetch_request_duration_seconds", &[]) >= 1.0);
    assert!(value(&after, "tally_log_flush_duration_seconds", &[]) >= 3.0, "flush=always syncs every append");
    assert_eq!(
        value(&after, "tally_request_errors_total", &[("api", "produce"), ("code", "END_OFFSET_MISMATCH")]),
        1.0
    );
    assert_eq!(value(&after, "tally_consumer_group_lag", &[("group", "billing"), ("partition", "0")]), 10.0);
    assert_eq!(value(&after, "tally_consumer_group_members", &[("group", "billing")]), 1.0);
    assert_eq!(value(&after, "tally_controller_active", &[]), 1.0);
    assert!(value(&after, "tally_raft_applied_index", &[]) >= 1.0);
    assert!(value(&after, "tally_partitions_leader", &[]) >= 2.0);
    assert_eq!(value(&after, "tally_partitions_under_replicated", &[]), 0.0);
    assert!(value(&after, "tally_log_size_bytes", &[("topic", "orders"), ("partition", "0")]) > 300.0);
    assert!(value(&after, "tally_connections_open", &[]) >= 1.0);
    consumer.close().await.unwrap();
}

#[test]
fn a_metrics_address_in_use_fails_the_start_naming_it() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["serve", "--listen", "127.0.0.1:0", "--metrics-listen", &address, "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("cannot serve metrics on {address}")), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gauges_of_a_deleted_topic_leave_the_scrape() {
    let dir = tempfile::tempdir().unwrap();
    let binary = Path::new(env!("CARGO_BIN_EXE_tally"));
    let broker = BrokerProcess::start(binary, dir.path(), &["--metrics-listen", "127.0.0.1:0"]).unwrap();
    let metrics = broker.metrics_address.clone().unwrap();
    let client = tally_client::Client::builder().bootstrap([broker.address.clone()]).connect().await.unwrap();
    client.admin().create_topic(NewTopic::new("brief", 1)).await.unwrap();
    let m = metrics.clone();
    let present = tokio::task::spawn_blocking(move || scrape(&m)).await.unwrap();
    assert!(
        present.samples.iter().any(|s| s.metric == "tally_log_size_bytes" && s.labels.get("topic") == Some("brief"))
    );
    client.admin().delete_topic("brief").await.unwrap();
    tokio::time::sleep(Duration::from_secs(11)).await;
    let after = tokio::task::spawn_blocking(move || scrape(&metrics)).await.unwrap();
    assert!(
        !after.samples.iter().any(|s| s.metric == "tally_log_size_bytes" && s.labels.get("topic") == Some("brief")),
        "a deleted partition's size is no longer reported"
    );
    assert!(after.samples.iter().any(|s| s.metric == "tally_controller_active"), "live gauges stay");
}
