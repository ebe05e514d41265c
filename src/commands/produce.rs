//! `tally produce`: one record per line of standard input.

use std::collections::VecDeque;

use anyhow::{Context as _, bail};
use tally_client::{Acks, DeliveryFuture, HeaderRef, Producer, ProducerConfig, ProducerRecord};
use tokio::io::{AsyncBufReadExt, BufReader};

use super::{Context, parse_key_value};

/// Acknowledged sends kept in flight before waiting for the oldest.
const MAX_PENDING: usize = 100_000;

/// Flags of `tally produce`.
#[derive(Debug, clap::Args)]
pub struct ProduceArgs {
    /// Topic.
    topic: String,
    /// Acknowledgement level: 0, 1 or all. With all (the default) the
    /// producer is idempotent: no retry writes a line twice.
    #[arg(long, default_value = "all")]
    acks: Acks,
    /// Turn the idempotent producer off (it is on with --acks all): a
    /// retry after a lost answer may then write a line twice.
    #[arg(long)]
    no_idempotence: bool,
    /// Split each line into key and value at the first SEP.
    #[arg(long)]
    key_separator: Option<String>,
    /// Send every record to this partition.
    #[arg(long)]
    partition: Option<u32>,
    /// Header KEY=VALUE added to every record (repeatable).
    #[arg(long = "header", value_parser = parse_key_value)]
    headers: Vec<(String, String)>,
    /// Linger before a batch is sent, in milliseconds.
    #[arg(long, default_value_t = 5)]
    linger_ms: u64,
    /// Batch codec: none, gzip, snappy, lz4 or zstd.
    #[arg(long, default_value = "none")]
    compression: tally_client::Compression,
    /// Each line is a key to delete: send a tombstone (the key with a null
    /// value) for it, which a compacted topic keeps for
    /// `delete_retention_ms` and then drops with the key.
    #[arg(long, conflicts_with = "key_separator")]
    tombstone: bool,
    /// Conditional append: append every line as one batch to --partition
    /// only if its log ends at N now; otherwise append nothing, print the
    /// log's end, and exit 3.
    #[arg(long, value_name = "N", requires = "partition")]
    expect_end_offset: Option<i64>,
}

/// Exit status of `tally produce --expect-end-offset` when the log did not
/// end there (nothing was appended).
pub const CONFLICT_EXIT: i32 = 3;

/// Runs `tally produce`; exits non-zero unless every line was acknowledged.
pub async fn run(ctx: &Context, args: ProduceArgs) -> anyhow::Result<()> {
    let client = ctx.connect().await?;
    client.topic_info(&args.topic).await.with_context(|| format!("cannot produce to `{}`", args.topic))?;
    if let Some(expected) = args.expect_end_offset {
        return append_if(client, &args, expected).await;
    }
    let mut config = ProducerConfig::default();
    config.acks = args.acks;
    config.linger = std::time::Duration::from_millis(args.linger_ms);
    config.compression = args.compression;
    config.idempotence = args.no_idempotence.then_some(false);
    let producer = Producer::try_new(client, config).context("cannot start the producer")?;
    let headers: Vec<HeaderRef<'_>> =
        args.headers.iter().map(|(k, v)| HeaderRef { key: k, value: Some(v.as_bytes()) }).collect();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut pending: VecDeque<(u64, DeliveryFuture)> = VecDeque::new();
    let (mut sent, mut failed) = (0u64, 0u64);
    let mut first_error = None;
    let mut settle = |r: Result<_, tally_client::Error>, line: u64, failed: &mut u64| {
        if let Err(e) = r {
            *failed += 1;
            if first_error.is_none() {
                first_error = Some(format!("line {line}: {e}"));
            }
        }
    };
    while let Some(line) = lines.next_line().await.context("cannot read standard input")? {
        sent += 1;
        let (key, value) = key_and_value(&args, &line);
        let mut record = ProducerRecord::tombstone(&args.topic, b"").headers(&headers);
        record.partition = args.partition;
        record.key = key;
        record.value = value;
        match producer.send(record).await {
            Ok(f) => pending.push_back((sent, f)),
            Err(e) => settle(Err(e), sent, &mut failed),
        }
        if pending.len() >= MAX_PENDING
            && let Some((n, f)) = pending.pop_front()
        {
            settle(f.await.map(|_| ()).map_err(|e| e.error), n, &mut failed);
        }
    }
    producer.flush().await;
    while let Some((n, f)) = pending.pop_front() {
        settle(f.await.map(|_| ()).map_err(|e| e.error), n, &mut failed);
    }
    producer.close().await;
    if failed > 0 {
        bail!("{failed} of {sent} records were not acknowledged; first failure: {}", first_error.unwrap_or_default());
    }
    eprintln!("produced {sent} records to {}", args.topic);
    Ok(())
}

/// `--expect-end-offset`: every line of standard input as one batch,
/// appended only if the partition's log ends at `expected`.
async fn append_if(client: tally_client::Client, args: &ProduceArgs, expected: i64) -> anyhow::Result<()> {
    let partition = args.partition.context("--expect-end-offset needs --partition")?;
    let mut lines = Vec::new();
    let mut input = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = input.next_line().await.context("cannot read standard input")? {
        lines.push(line);
    }
    let headers: Vec<HeaderRef<'_>> =
        args.headers.iter().map(|(k, v)| HeaderRef { key: k, value: Some(v.as_bytes()) }).collect();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let timestamp = i64::try_from(now.as_millis()).unwrap_or(i64::MAX);
    let records: Vec<tally_proto::batch::RecordRef<'_>> = lines
        .iter()
        .map(|line| {
            let (key, value) = key_and_value(args, line);
            tally_proto::batch::RecordRef { timestamp, key, value, headers: &headers }
        })
        .collect();
    if records.is_empty() {
        bail!("no lines on standard input: nothing to append");
    }
    let pc = client.partition_client(args.topic.clone(), partition);
    match pc.append_if(expected, &records, args.acks).await {
        Ok(offset) => {
            eprintln!("appended {} records to {}/{partition} at offset {offset}", records.len(), args.topic);
            Ok(())
        }
        Err(tally_client::AppendIfError::Conflict { current_end_offset }) => {
            println!("{current_end_offset}");
            eprintln!(
                "conflict: {}/{partition} ends at {current_end_offset}, not {expected}; nothing was appended",
                args.topic
            );
            std::process::exit(CONFLICT_EXIT);
        }
        Err(e) => Err(e).context("conditional append failed (after a transport failure it may have happened)"),
    }
}

/// A line's key and value: with `--tombstone` the line is the key and the
/// value is null; with `--key-separator` it is split at the first one (a
/// line without it is a value alone); otherwise it is the value.
fn key_and_value<'a>(args: &ProduceArgs, line: &'a str) -> (Option<&'a [u8]>, Option<&'a [u8]>) {
    match &args.key_separator {
        _ if args.tombstone => (Some(line.as_bytes()), None),
        Some(sep) => match line.split_once(sep.as_str()) {
            Some((k, v)) => (Some(k.as_bytes()), Some(v.as_bytes())),
            None => (None, Some(line.as_bytes())),
        },
        None => (None, Some(line.as_bytes())),
    }
}
