//! Broker benchmark: the figures against a real `tally serve` child
//! process, each the median of three runs after a warm-up.
//!
//! `cargo bench --bench broker` prints records/s, MB/s and latency
//! percentiles for: 100-byte and 1 KiB records in batches of 1,000 from two
//! producers (acks=1), 1 KiB with flush=always, two consumers reading back,
//! and one 1 KiB record per request; then the broker's peak RssAnon.
//!
//! Environment: TALLY_BENCH_QUICK=1 for one short run per case;
//! TALLY_BENCH_PREFAULT_GIB=N touches N GiB of memory first. On a VM whose
//! host backs guest memory on first touch, page-cache writes into never-used
//! memory run at a few hundred MB/s; prefaulting once per boot shows the
//! steady state.

use std::path::Path;
use std::time::Duration;

use tally::bench::{ConsumeParams, ProduceParams, Report, consume, produce};
use tally::child::BrokerProcess;
use tally_client::{Acks, Client};

fn quick() -> bool {
    std::env::var("TALLY_BENCH_QUICK").is_ok_and(|v| v == "1")
}

fn prefault() {
    let gib: usize = std::env::var("TALLY_BENCH_PREFAULT_GIB").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    for _ in 0..gib {
        let mut block = vec![0u8; 1 << 30];
        for page in block.chunks_mut(4096) {
            page[0] = 1;
        }
        std::hint::black_box(&block);
    }
    if gib > 0 {
        println!("prefaulted {gib} GiB");
    }
}

/// Topic configs that cap each partition at about 4 GiB on disk (3 GiB of
/// closed 1 GiB segments plus the active one).
fn bounded_topic() -> Vec<(String, String)> {
    vec![("retention_bytes".into(), (3u64 << 30).to_string())]
}

fn median(mut reports: Vec<Report>) -> Report {
    reports.sort_by(|a, b| a.mb_per_s.total_cmp(&b.mb_per_s));
    reports.swap_remove(reports.len() / 2)
}

async fn produce_case(client: &Client, pid: u32, name: &str, p: ProduceParams) -> Report {
    let runs = if quick() { 1 } else { 3 };
    let mut reports = Vec::new();
    for _ in 0..runs {
        reports.push(produce(client, &ProduceParams { broker_pid: Some(pid), ..p.clone() }).await.expect("bench"));
    }
    let m = median(reports);
    println!("{name:<44} {m}");
    m
}

#[tokio::main]
async fn main() {
    prefault();
    let dir = tempfile::tempdir().expect("temp dir");
    // Retention keeps the disk in check: the runs write tens of GB in all.
    let envs = [("TALLY_RETENTION_CHECK_INTERVAL_MS", "1000")];
    let broker = BrokerProcess::start_with_env(Path::new(env!("CARGO_BIN_EXE_tally")), dir.path(), &[], &envs)
        .expect("start broker");
    let pid = broker.pid();
    let client = Client::builder().bootstrap([broker.address.clone()]).connect().await.expect("connect");
    let duration = Duration::from_secs(if quick() { 2 } else { 5 });
    let base = ProduceParams {
        topic: String::new(),
        producers: 2,
        partitions: 2,
        record_size: 100,
        records_per_batch: 1000,
        acks: Acks::Leader,
        duration,
        warmup: Duration::from_secs(1),
        topic_configs: bounded_topic(),
        broker_pid: Some(pid),
        replication_factor: 1,
        compression: tally_client::Compression::None,
        rate_records_per_s: None,
        through_producer: false,
        idempotence: None,
        max_in_flight: None,
    };
    println!("broker pid {pid} at {}; median of {} run(s)", broker.address, if quick() { 1 } else { 3 });
    let mut peak_rss: f64 = 0.0;
    let mut track = |r: &Report| peak_rss = peak_rss.max(r.broker_rss_anon_mib.unwrap_or(0.0));
    let r = produce_case(
        &client,
        pid,
        "produce 100 B x 1000/batch, 2 producers",
        ProduceParams { topic: "b100".into(), ..base.clone() },
    )
    .await;
    track(&r);
    let r = produce_case(
        &client,
        pid,
        "produce 1 KiB x 1000/batch, 2 producers",
        ProduceParams { topic: "b1k".into(), record_size: 1024, ..base.clone() },
    )
    .await;
    track(&r);
    let r = produce_case(
        &client,
        pid,
        "produce 1 KiB x 1000/batch, flush=always",
        ProduceParams {
            topic: "b1k-always".into(),
            record_size: 1024,
            topic_configs: [bounded_topic(), vec![("flush".into(), "always".into())]].concat(),
            ..base.clone()
        },
    )
    .await;
    track(&r);
    // Reading back: the default write-behind dropped all but the newest
    // windows from the page cache, so this reads the disk; a topic with
    // write-behind off reads back from the page cache.
    let r = produce_case(
        &client,
        pid,
        "produce 1 KiB x 1000/batch, write-behind off",
        ProduceParams {
            topic: "b1k-cached".into(),
            record_size: 1024,
            topic_configs: [bounded_topic(), vec![("writeback_window_bytes".into(), "0".into())]].concat(),
            ..base.clone()
        },
    )
    .await;
    track(&r);
    for (topic, label) in
        [("b1k", "consume 2 consumers, from disk"), ("b1k-cached", "consume 2 consumers, from page cache")]
    {
        let runs = if quick() { 1 } else { 3 };
        let mut reports = Vec::new();
        for _ in 0..runs {
            let p = ConsumeParams {
                topic: topic.into(),
                consumers: 2,
                fetch_bytes: 4 << 20,
                duration: Duration::from_secs(30),
                broker_pid: Some(pid),
                through_consumer: false,
                from_disk: None,
            };
            reports.push(consume(&client, &p).await.expect("bench"));
        }
        let r = median(reports);
        println!("{label:<44} {r}");
        track(&r);
    }
    let r = produce_case(
        &client,
        pid,
        "produce 1 record (1 KiB) per request",
        ProduceParams {
            topic: "single".into(),
            producers: 1,
            partitions: 1,
            record_size: 1024,
            records_per_batch: 1,
            ..base.clone()
        },
    )
    .await;
    track(&r);
    println!("broker RssAnon peak over all runs: {peak_rss:.1} MiB (target <= 256)");
    let status = broker.stop().expect("stop");
    assert!(status.success(), "broker exited cleanly: {status}");
}
