//! `tally dump-log`: print the batches of segment files.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use tally_broker::storage::{SegmentBatch, scan_segment_file};
use tally_proto::batch::RecordBatch;

use super::{Context, Output};

/// Flags of `tally dump-log`.
#[derive(Debug, clap::Args)]
pub struct DumpLogArgs {
    /// A `.log` segment file, or a partition directory.
    path: PathBuf,
    /// Exit non-zero if any batch is corrupt.
    #[arg(long)]
    verify: bool,
    /// Also print each record's offset, key and value.
    #[arg(long)]
    print_data: bool,
}

fn segment_files(path: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        files.sort();
        Ok(files)
    } else {
        Ok(vec![path.to_path_buf()])
    }
}

fn print_batch(b: &SegmentBatch, print_data: bool) {
    let crc = match &b.error {
        None => "ok".to_string(),
        Some(e) => format!("BAD ({e})"),
    };
    println!(
        "baseOffset: {} lastOffset: {} count: {} position: {} size: {} epoch: {} baseTimestamp: {} maxTimestamp: {} producerId: {} compression: {} valid: {}",
        b.base_offset,
        b.last_offset,
        b.record_count,
        b.position,
        b.size,
        b.partition_leader_epoch,
        b.base_timestamp,
        b.max_timestamp,
        b.producer_id,
        b.compression,
        crc
    );
    // Compaction keeps a batch's span: the offsets it no longer holds.
    let removed = (b.last_offset - b.base_offset + 1 - i64::from(b.record_count)).max(0);
    if b.error.is_none() && b.record_count == 0 {
        println!("| compaction filler: offsets {}..={} were removed", b.base_offset, b.last_offset);
    } else if b.error.is_none() && removed > 0 {
        println!("| compacted: {removed} of {} offsets removed", b.last_offset - b.base_offset + 1);
    }
    if !print_data || b.error.is_some() {
        return;
    }
    let Ok(batch) = RecordBatch::check_framing(b.bytes.clone()) else {
        return;
    };
    let Ok(records) = batch.records() else { return };
    for r in records.flatten() {
        println!(
            "| offset: {} timestamp: {} key: {} value: {}",
            r.offset,
            r.timestamp,
            r.key.as_deref().map_or("null".into(), String::from_utf8_lossy),
            r.value.as_deref().map_or("null".into(), String::from_utf8_lossy)
        );
    }
}

/// Runs `tally dump-log`.
pub fn run(ctx: &Context, args: DumpLogArgs) -> anyhow::Result<()> {
    let mut corrupt = 0usize;
    for file in segment_files(&args.path)? {
        if ctx.output == Output::Table {
            println!("Dumping {}", file.display());
        }
        let mut list = Vec::new();
        for b in scan_segment_file(&file)? {
            let b = b?;
            corrupt += usize::from(b.error.is_some());
            match ctx.output {
                Output::Json => list.push(serde_json::json!({
                    "position": b.position, "size": b.size, "base_offset": b.base_offset,
                    "last_offset": b.last_offset, "record_count": b.record_count,
                    "max_timestamp": b.max_timestamp, "valid": b.error.is_none(),
                    "removed_offsets": (b.last_offset - b.base_offset + 1 - i64::from(b.record_count)).max(0),
                    "error": b.error.as_ref().map(ToString::to_string),
                })),
                Output::Table => print_batch(&b, args.print_data),
            }
        }
        if ctx.output == Output::Json {
            println!("{}", serde_json::json!({"file": file.display().to_string(), "batches": list}));
        }
    }
    if args.verify && corrupt > 0 {
        bail!("{corrupt} corrupt batch(es) found");
    }
    Ok(())
}
