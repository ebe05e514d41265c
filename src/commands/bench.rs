//! `tally bench produce|consume`.

use std::time::Duration;

use tally::bench::{ConsumeParams, ProduceParams, consume, produce};
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
    },
}

/// Runs a benchmark and prints its figures on stdout.
pub async fn run(ctx: &Context, cmd: BenchCommand) -> anyhow::Result<()> {
    let client = ctx.connect().await?;
    let report = match cmd {
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
                through_producer,
            };
            produce(&client, &params).await?
        }
        BenchCommand::Consume { topic, consumers, fetch_bytes, duration_s, broker_pid } => {
            let params =
                ConsumeParams { topic, consumers, fetch_bytes, duration: Duration::from_secs(duration_s), broker_pid };
            consume(&client, &params).await?
        }
    };
    println!("{report}");
    Ok(())
}
