//! `tally bench produce|consume|sweep|replication|idempotence`.

use std::time::Duration;

use anyhow::Context as _;
use tally::bench::{ConsumeParams, ProduceParams, SweepParams, consume, produce, replication_sweep};
use tally::bench_idempotence::{IdempotenceParams, idempotence_sweep};
use tally::bench_sweep::{
    ClusterChoice, Machine, SweepConfig, UNACKED_BYTES_DEFAULT, results_json, run_sweep, table_header, table_row,
    write_results,
};
use tally_client::Acks;

use super::{Context, Output, parse_key_value};

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
    /// The acks benchmark: acks 0/1/all × record size × partitions ×
    /// idempotence, producers (the batching Producer) and consumers
    /// running together for a fixed time per point, against a three-broker
    /// cluster started here (replication factor 3, min ISR 2) or, with
    /// --existing, the cluster at --bootstrap. Prints a table and writes
    /// results.json, results.csv and chart.svg into --out.
    Sweep(SweepArgs),
    /// Pre-built batches through a PartitionClient (no Producer, no
    /// consumers) for each partition count, record size and acks level,
    /// plus acks=all paced at half its rate, on a three-broker local
    /// cluster (replication factor 3, min_insync_replicas 2): one table.
    /// Kept for comparison with earlier figures; `bench sweep` is its
    /// successor.
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
        /// The broker's data directory: read back from disk. Before
        /// reading, the topic's segment files are synced and dropped from
        /// the page cache (posix_fadvise, no root needed) and read once
        /// sequentially with direct I/O to give the disk's own speed on them.
        #[arg(long, value_name = "DATA_DIR")]
        from_disk: Option<std::path::PathBuf>,
    },
    /// What a partition costs: one broker (started here) gets `--count`
    /// partitions; prints disk allocated, RssAnon, descriptors, maps,
    /// create and restart times, and produce throughput over all of them.
    /// With `--brokers 3 --replication-factor 3`, replication at that
    /// scale instead: a local cluster, acks=all latency of one busy
    /// partition alone and beside `--count - 1` idle ones, the time until
    /// those are replicated, and the cluster's network traffic and CPU
    /// while nothing is produced.
    Partitions {
        /// Partitions in all (replicated mode: the busy one and
        /// `count - 1` idle ones).
        #[arg(long, default_value_t = 1000)]
        count: u32,
        /// Topics sharing them evenly (e.g. 1000 topics of 10); one broker only.
        #[arg(long, default_value_t = 1)]
        topics: u32,
        /// Seconds of each produce run (replicated mode: of each acks=all
        /// latency run).
        #[arg(long, default_value_t = 5)]
        produce_s: u64,
        /// Value bytes per record (default 100; 1024 in the replicated mode).
        #[arg(long)]
        record_size: Option<usize>,
        /// The broker's data directory (default: a fresh temporary one, removed after).
        #[arg(long)]
        data_dir: Option<std::path::PathBuf>,
        /// Brokers to start: 1, or 2 to 9 for the replicated mode (a local
        /// cluster, every broker a controller voter).
        #[arg(long, default_value_t = 1)]
        brokers: u32,
        /// Replicas per partition (at most --brokers); the busy topic has
        /// min_insync_replicas 2 (1 with one replica).
        #[arg(long, default_value_t = 1)]
        replication_factor: u32,
        /// Replicated mode: seconds of each quiet window over which network
        /// traffic and CPU are measured.
        #[arg(long, default_value_t = 10)]
        idle_s: u64,
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
        BenchCommand::Sweep(args) => return run_sweep_command(ctx, args).await,
        BenchCommand::Partitions {
            count,
            topics,
            produce_s,
            record_size,
            data_dir,
            brokers,
            replication_factor,
            idle_s,
        } => {
            let replicated = brokers > 1 || replication_factor > 1;
            let temporary = data_dir.is_none();
            let params = tally::bench_partitions::PartitionsParams {
                binary: std::env::current_exe()?,
                data_dir: data_dir.unwrap_or_else(sweep_dir),
                count,
                topics,
                produce: Duration::from_secs(produce_s),
                record_size: record_size.unwrap_or(if replicated { 1024 } else { 100 }),
                brokers,
                replication_factor,
                idle: Duration::from_secs(idle_s),
            };
            let report = if replicated {
                tally::bench_partitions::replicated::run(&params, |step| eprintln!("{step}"))
                    .await
                    .map(|r| r.to_string())
            } else {
                tally::bench_partitions::run(&params, |step| eprintln!("{step}")).await.map(|r| r.to_string())
            };
            if temporary {
                let _ = std::fs::remove_dir_all(&params.data_dir);
            }
            println!("{}", report?);
            return Ok(());
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
        BenchCommand::Consume {
            topic,
            consumers,
            fetch_bytes,
            duration_s,
            broker_pid,
            through_consumer,
            from_disk,
        } => {
            let duration = Duration::from_secs(duration_s);
            let params =
                ConsumeParams { topic, consumers, fetch_bytes, duration, broker_pid, through_consumer, from_disk };
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

/// `tally bench sweep`'s flags. Each dimension is a comma-separated list.
#[derive(Debug, clap::Args)]
pub struct SweepArgs {
    /// Measure the running cluster at --bootstrap (or TALLY_BOOTSTRAP)
    /// instead of starting three local brokers. It needs at least
    /// --replication-factor live brokers; the sweep creates and deletes
    /// its own topics there (bench-sweep-PID-N).
    #[arg(long)]
    existing: bool,
    /// Acks levels: 0, 1 and/or all.
    #[arg(long, default_value = "0,1,all")]
    acks: CommaList<Acks>,
    /// Record value sizes in bytes (at least 8: each record carries its
    /// send timestamp).
    #[arg(long, default_value = "100,1024,10240")]
    record_sizes: CommaList<usize>,
    /// Partition counts.
    #[arg(long, default_value = "1,8")]
    partitions: CommaList<u32>,
    /// Producer idempotence: on, off or on,off. On runs only with
    /// acks=all (the client refuses it otherwise); the other combinations
    /// are skipped, and the sweep says so.
    #[arg(long, default_value = "off,on")]
    idempotence: CommaList<OnOff>,
    /// Measured seconds per point.
    #[arg(long, default_value = "5", value_parser = parse_seconds)]
    duration_s: Duration,
    /// Unmeasured warm-up seconds per point, before the measured ones.
    #[arg(long, default_value = "1", value_parser = parse_seconds)]
    warmup_s: Duration,
    /// Hold this many records per second in total (spread over the
    /// producer tasks) instead of sending as fast as acknowledgements come
    /// back: latency at a fixed load, like kafka-producer-perf-test's
    /// --throughput.
    #[arg(long)]
    rate: Option<f64>,
    /// Replicas per partition of the sweep's topics.
    #[arg(long, default_value_t = 3)]
    replication_factor: u32,
    /// min_insync_replicas of the sweep's topics (acks=all needs it at
    /// most the replication factor).
    #[arg(long, default_value_t = 2)]
    min_insync_replicas: u32,
    /// Producer tasks per partition (sharing the point's one Producer).
    #[arg(long, default_value_t = 1)]
    producers_per_partition: usize,
    /// KiB of record values a point keeps sent but not yet acknowledged,
    /// split over its producer tasks (Kafka's perf tool has buffer.memory
    /// in this role). A closed loop's latency is about this over its
    /// throughput; use --rate for latency at a given load.
    #[arg(long, default_value_t = UNACKED_BYTES_DEFAULT / 1024)]
    unacked_kib: usize,
    /// Directory for results.json, results.csv and chart.svg (created if
    /// missing; files in it are replaced).
    #[arg(long, default_value = "bench-results")]
    out: std::path::PathBuf,
}

/// A comma-separated list; an empty string is an empty list (which the
/// sweep then refuses by name).
#[derive(Debug, Clone)]
pub struct CommaList<T>(Vec<T>);

impl<T: std::str::FromStr> std::str::FromStr for CommaList<T>
where
    T::Err: std::fmt::Display,
{
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.trim().is_empty() {
            return Ok(CommaList(Vec::new()));
        }
        s.split(',')
            .map(|item| item.trim().parse::<T>().map_err(|e| format!("`{}`: {e}", item.trim())))
            .collect::<Result<Vec<T>, String>>()
            .map(CommaList)
    }
}

/// `on` or `off`.
#[derive(Debug, Clone, Copy)]
pub struct OnOff(bool);

impl std::str::FromStr for OnOff {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "on" | "true" => Ok(OnOff(true)),
            "off" | "false" => Ok(OnOff(false)),
            other => Err(format!("expected on or off, got `{other}`")),
        }
    }
}

/// Seconds as a non-negative decimal number.
fn parse_seconds(s: &str) -> Result<Duration, String> {
    let secs: f64 = s.parse().map_err(|e| format!("`{s}` is not a number of seconds: {e}"))?;
    Duration::try_from_secs_f64(secs).map_err(|_| format!("`{s}` is not a non-negative number of seconds"))
}

impl SweepArgs {
    fn config(&self, ctx: &Context) -> anyhow::Result<SweepConfig> {
        let cluster = if self.existing {
            ClusterChoice::Existing { bootstrap: ctx.bootstrap.clone() }
        } else {
            ClusterChoice::Local { binary: std::env::current_exe()?, data_dir: sweep_dir() }
        };
        Ok(SweepConfig {
            cluster,
            acks: self.acks.0.clone(),
            record_sizes: self.record_sizes.0.clone(),
            partitions: self.partitions.0.clone(),
            idempotence: self.idempotence.0.iter().map(|o| o.0).collect(),
            duration: self.duration_s,
            warmup: self.warmup_s,
            rate_records_per_s: self.rate,
            replication_factor: self.replication_factor,
            min_insync_replicas: self.min_insync_replicas,
            producers_per_partition: self.producers_per_partition,
            unacked_bytes: self.unacked_kib.saturating_mul(1024),
        })
    }
}

/// `tally bench sweep`: checks the settings and the output directory
/// before any broker starts, runs the sweep under a progress bar (stderr,
/// shown on a terminal only), prints the table (or, with `--output json`,
/// the results document), then writes the files.
async fn run_sweep_command(ctx: &Context, args: SweepArgs) -> anyhow::Result<()> {
    let config = args.config(ctx)?;
    config.validate()?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create the output directory {}", args.out.display()))?;
    let plan = config.plan();
    if !plan.skipped.is_empty() {
        eprintln!(
            "note: skipping {} combination(s) of idempotence on with acks 0 or 1: the idempotent producer needs \
             acks=all",
            plan.skipped.len()
        );
    }
    let machine = Machine::describe();
    let table = ctx.output == Output::Table;
    let progress = indicatif::ProgressBar::new(plan.points.len() as u64);
    progress.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {elapsed_precise} [{bar:24}] {pos}/{len} {wide_msg}")?
            .progress_chars("=> "),
    );
    progress.enable_steady_tick(Duration::from_millis(200));
    if table {
        println!("{}", table_header());
    }
    let outcome = run_sweep(&config, &progress, |r| {
        if table {
            progress.suspend(|| println!("{}", table_row(r)));
        }
    })
    .await;
    progress.finish_and_clear();
    if let ClusterChoice::Local { data_dir, .. } = &config.cluster {
        let _ = std::fs::remove_dir_all(data_dir);
    }
    let outcome = outcome?;
    let json = results_json(&config, &machine, &outcome);
    let rate = config.rate_records_per_s.map_or_else(|| "closed loop".to_string(), |r| format!("{r:.0} records/s"));
    let title = format!(
        "tally bench sweep: {} brokers, RF {}, min ISR {}, {}, {} s per point",
        outcome.brokers,
        config.replication_factor,
        config.min_insync_replicas,
        rate,
        config.duration.as_secs_f64(),
    );
    let footer = format!("tally {}; {}", env!("CARGO_PKG_VERSION"), machine.summary());
    write_results(&args.out, &json, &outcome.results, &title, &footer)?;
    if table {
        for (broker, mib) in &outcome.broker_peak_rss_anon_mib {
            println!("broker {broker}: peak RssAnon {mib:.1} MiB");
        }
    } else {
        println!("{}", serde_json::to_string_pretty(&json)?);
    }
    eprintln!("machine: {}", machine.summary());
    eprintln!("wrote results.json, results.csv and chart.svg to {}", args.out.display());
    Ok(())
}
