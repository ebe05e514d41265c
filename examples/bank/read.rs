//! Reading one partition from an offset up to an end offset, the primitive
//! an event store needs ("everything after my snapshot, up to what the log
//! holds now") and the client has no single call for.
//!
//! Invariant: the records returned are exactly those with `from <= offset
//! < end`, in offset order; `end` is the offset the caller's state will be
//! "as of".

use std::time::{Duration, Instant};

use tally_client::{Client, OffsetSpec};
use tally_proto::batch::Record;

/// Longest a read waits for the records it was asked for (a follower
/// catching up, a leader moving).
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest fetch.
const FETCH_BYTES: u32 = 4 << 20;

/// The records of `topic`/`partition` in `[from, end)` and `end`, where
/// `end` is `until`, or the partition's high watermark now when `None`.
/// Waits (up to [`READ_TIMEOUT`]) for records below `until` that are not
/// readable yet.
pub async fn read_range(
    client: &Client,
    topic: &str,
    partition: u32,
    from: i64,
    until: Option<i64>,
) -> anyhow::Result<(Vec<Record>, i64)> {
    let pc = client.partition_client(topic, partition);
    let end = match until {
        Some(end) => end,
        None => pc.list_offset(OffsetSpec::Latest).await?.unwrap_or(0),
    };
    let deadline = Instant::now() + READ_TIMEOUT;
    let mut records = Vec::new();
    let mut offset = from;
    while offset < end {
        let fetched = match pc.fetch(offset, FETCH_BYTES, Duration::from_millis(200)).await {
            Ok(fetched) => fetched,
            Err(e) if e.is_retriable() && Instant::now() < deadline => {
                let _ = client.refresh_metadata(&[topic.to_string()]).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        for record in fetched.records(offset) {
            let record = record?;
            if record.offset < end {
                offset = record.offset + 1;
                records.push(record);
            }
        }
        // A compacted log has gaps: move past whole batches, not records.
        if let Some(next) = fetched.next_offset() {
            offset = offset.max(next.min(end));
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{topic}/{partition}: offsets {offset}..{end} not readable within {READ_TIMEOUT:?}"
        );
    }
    Ok((records, end))
}
