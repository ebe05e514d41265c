//! `tally bench produce|consume`.

use std::time::Duration;

use tally::bench::{ConsumeParams, ProduceParams, SweepParams, consume, produce, replication_sweep};
use tally::bench_idempotence::{IdempotenceParams, idempotence_sweep};
use tally_client::Acks;

use super::{Context, parse_key_value};

/// Benchmarks.
#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Producers sending pre-built batches as fast as answers come back.
    Produce {
        /// Topic (created if missing).
        #[arg(long, default_value = "bench")]
        topic: String,
        /// Concurrent producers.
        #[arg(long, default_value_t = 2)]
        producers: usize,
        /// Partitions (default: one per producer).
        #[arg(long)]
        partitions: Option<u32>,
        /// Value bytes per record.
        #[arg(long, default_value_t = 100)]
        record_size: usize,
        /// Records per batch (one batch per request).
        #[arg(long, default_value_t = 1000)]
        records_per_batch: usize,
        /// 0, 1 or all.
        #[arg(long, default_value = "1")]
        acks: Acks,
        /// Measured seconds.
        #[arg(long, default_value_t = 10)]
        duration_s: u64,
        /// Warm-up seconds before measuring.
        #[arg(long, default_value_t = 2)]
        warmup_s: u64,
        /// Topic config when the topic is created, KEY=VALUE (e.g. flush=always).
        #[arg(long = "topic-config", value_parser = parse_key_value)]
        topic_configs: Vec<(String, String)>,
        /// Broker process id, to report its RssAnon.
        #[arg(long)]
        broker_pid: Option<u32>,
        /// Send records one by one through the batching Producer instead of
        /// pre-built batches (measures the client as well as the broker).
        #[arg(long)]
        through_producer: bool,
        /// Batch codec: none, gzip, snappy, lz4 or zstd.
        #[arg(long, default_value = "none")]
        compression: tally_client::Compression,
    },
    /// A three-broker local cluster (started here, data in a temporary
    /// directory) and a produce run for each partition count, record size
    /// and acks level, on topics with replication factor 3 and
    /// min_insync_replicas 2: one table.
    Replication {
        /// Partition counts, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,8")]
        partitions: Vec<u32>,
        /// Record sizes in bytes, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "100,1024")]
        record_sizes: Vec<usize>,
        /// Producers per partition.
        #[arg(long, default_value_t = 2)]
        producers_per_partition: usize,
        /// Measured seconds per run.
        #[arg(long, default_value_t = 5)]
        duration_s: u64,
        /// Warm-up seconds per run.
        #[arg(long, default_value_t = 1)]
        warmup_s: u64,
    },
    /// A three-broker local cluster (started here, data in a temporary
    /// directory), acks=all through the batching Producer: idempotence off
    /// and on for each partition count and record size, then one partition
    /// of 1 KiB records with one and with five requests in flight.
    Idempotence {
        /// Partition counts, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,8")]
        partitions: Vec<u32>,
        /// Record sizes in bytes, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "100,1024")]
        record_sizes: Vec<usize>,
        /// Producer tasks per partition (sharing one Producer).
        #[arg(long, default_value_t = 1)]
        producers_per_partition: usize,
        /// Measured seconds per run.
        #[arg(long, default_value_t = 5)]
        duration_s: u64,
        /// Warm-up seconds per run.
        #[arg(long, default_value_t = 1)]
        warmup_s: u64,
        /// Runs of each setting, alternating.
        #[arg(long, default_value_t = 2)]
        rounds: usize,
    },
    /// Consumers reading a topic from the beginning.
    Consume {
        /// Topic.
        #[arg(long, default_value = "bench")]
        topic: String,
        /// Concurrent consumers.
        #[arg(long, default_value_t = 2)]
        consumers: usize,
        /// Bytes per fetch.
        #[arg(long, default_value_t = 4 << 20)]
        fetch_bytes: u32,
        /// Upper bound on measured seconds.
        #[arg(long, default_value_t = 30)]
        duration_s: u64,
        /// Broker process id, to report its RssAnon.
        #[arg(long)]
        broker_pid: Option<u32>,
        /// Read through the Consumer (prefetching, every record decoded)
        /// instead of raw fetches.
        #[arg(long)]
        through_consumer: bool,
    },
}

/// A fresh directory for the sweep's brokers, removed when it ends.
fn sweep_dir() -> std::path::PathBuf {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    std::env::temp_dir().join(format!("tally-bench-replication-{}-{nanos}", std::process::id()))
}

/// Runs a benchmark and prints its figures on stdout.
pub async fn run(ctx: &Context, cmd: BenchCommand) -> anyhow::Result<()> {
    let report = match cmd {
        BenchCommand::Replication { partitions, record_sizes, producers_per_partition, duration_s, warmup_s } => {
            let params = SweepParams {
                binary: std::env::current_exe()?,
                data_dir: sweep_dir(),
                partitions,
                record_sizes,
                producers_per_partition,
                duration: Duration::from_secs(duration_s),
                warmup: Duration::from_secs(warmup_s),
            };
            return sweep(&params).await;
        }
        BenchCommand::Idempotence {
            partitions,
            record_sizes,
            producers_per_partition,
            duration_s,
            warmup_s,
            rounds,
        } => {
            let sweep = SweepParams {
                binary: std::env::current_exe()?,
                data_dir: sweep_dir(),
                partitions,
                record_sizes,
                producers_per_partition,
                duration: Duration::from_secs(duration_s),
                warmup: Duration::from_secs(warmup_s),
            };
            let params = IdempotenceParams { sweep, rounds };
            return idempotence(&params).await;
        }
        BenchCommand::Produce {
            topic,
            producers,
            partitions,
            record_size,
            records_per_batch,
            acks,
            duration_s,
            warmup_s,
            topic_configs,
            broker_pid,
            through_producer,
            compression,
        } => {
            let params = ProduceParams {
                topic,
                producers,
                partitions: partitions.unwrap_or(producers as u32).max(1),
                record_size,
                records_per_batch,
                acks,
                duration: Duration::from_secs(duration_s),
                warmup: Duration::from_secs(warmup_s),
                topic_configs,
                broker_pid,
                replication_factor: 1,
                compression,
                rate_records_per_s: None,
                through_producer,
                idempotence: None,
                max_in_flight: None,
            };
            produce(&ctx.connect().await?, &params).await?
        }
        BenchCommand::Consume { topic, consumers, fetch_bytes, duration_s, broker_pid, through_consumer } => {
            let duration = Duration::from_secs(duration_s);
            let params = ConsumeParams { topic, consumers, fetch_bytes, duration, broker_pid, through_consumer };
            consume(&ctx.connect().await?, &params).await?
        }
    };
    println!("{report}");
    Ok(())
}

/// `tally bench replication`: the sweep's table, one row per run, then
/// each broker's peak memory. Removes the brokers' data when done.
async fn sweep(params: &SweepParams) -> anyhow::Result<()> {
    println!(
        "{:>10} {:>7} {:>9} {:>12} {:>9} {:>9} {:>9} {:>9}",
        "partitions", "bytes", "acks", "records/s", "MB/s", "p50 ms", "p99 ms", "p99.9 ms"
    );
    let peaks = replication_sweep(params, |r| {
        let rep = &r.report;
        println!(
            "{:>10} {:>7} {:>9} {:>12.0} {:>9.1} {:>9.3} {:>9.3} {:>9.3}",
            r.partitions,
            r.record_size,
            r.acks,
            rep.records_per_s,
            rep.mb_per_s,
            rep.latency_ms[0],
            rep.latency_ms[1],
            rep.latency_ms[2]
        );
    })
    .await;
    finish_sweep(&params.data_dir, peaks)
}

/// `tally bench idempotence`: one row per run, then each broker's peak
/// memory. Removes the brokers' data when done.
async fn idempotence(params: &IdempotenceParams) -> anyhow::Result<()> {
    println!(
        "{:>10} {:>7} {:>9} {:>16} {:>12} {:>9} {:>9} {:>9}",
        "partitions", "bytes", "producers", "setting", "records/s", "MB/s", "p50 ms", "p99 ms"
    );
    let peaks = idempotence_sweep(params, |r| {
        let rep = &r.report;
        println!(
            "{:>10} {:>7} {:>9} {:>16} {:>12.0} {:>9.1} {:>9.3} {:>9.3}",
            r.partitions,
            r.record_size,
            r.producers,
            r.setting,
            rep.records_per_s,
            rep.mb_per_s,
            rep.latency_ms[0],
            rep.latency_ms[1]
        );
    })
    .await;
    finish_sweep(&params.sweep.data_dir, peaks)
}

/// Removes a sweep's broker data and prints each broker's peak memory.
fn finish_sweep(data_dir: &std::path::Path, peaks: anyhow::Result<Vec<(u32, f64)>>) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(data_dir);
    for (broker, mib) in peaks? {
        println!("broker {broker}: peak RssAnon {mib:.1} MiB");
    }
    Ok(())
}
