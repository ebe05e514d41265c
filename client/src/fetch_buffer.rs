//! What the [`Consumer`](crate::Consumer) fetched ahead for one partition:
//! whole batches, CRC-checked by the fetcher (their headers decide offsets
//! and positions, so they are trusted only once checked), decoded into
//! records only as they are handed out. The background fetcher then does no
//! per-record work (it checks a response and goes straight back for the
//! next one, so the next fetch overlaps the decoding of this one), and a
//! record is decoded once, straight into what `poll` returns.

use std::collections::VecDeque;
use std::sync::Arc;

use tally_proto::batch::{BatchError, Record, RecordBatch, Records};

use crate::consumer::{ConsumerRecord, Headers};

/// One fetch's batches of one partition, not yet handed out.
pub(crate) struct Chunk {
    pub(crate) key: (Arc<str>, u32),
    pub(crate) generation: u64,
    /// Batches not yet started, in offset order, CRC-checked.
    batches: VecDeque<RecordBatch>,
    /// The records of the batch being handed out.
    current: Option<Records>,
    /// Records below this offset are skipped (the first batch may start
    /// before the fetch offset).
    from: i64,
    /// Bytes of the fetched batches (what the prefetch bound counts).
    pub(crate) bytes: usize,
    /// Records the batches declare at most (a size hint).
    pub(crate) records_hint: usize,
    /// Offset after the fetched batches: the position once every record
    /// is handed out (a compacted log's batches may end in offsets that
    /// hold no record).
    pub(crate) next_offset: i64,
}

impl std::fmt::Debug for Chunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chunk")
            .field("key", &self.key)
            .field("generation", &self.generation)
            .field("batches", &self.batches.len())
            .field("from", &self.from)
            .field("bytes", &self.bytes)
            .field("next_offset", &self.next_offset)
            .finish_non_exhaustive()
    }
}

impl Chunk {
    /// The CRC-checked batches of one fetch from offset `from` (`None` when
    /// there are none). Batches wholly below `from` are left out; a chunk
    /// with a `records_hint` of 0 holds no record for the reader, only a
    /// position to move to.
    pub(crate) fn new(key: (Arc<str>, u32), generation: u64, batches: Vec<RecordBatch>, from: i64) -> Option<Chunk> {
        let next_offset = batches.last()?.header().next_offset();
        let bytes = batches.iter().map(RecordBatch::len).sum();
        let batches: VecDeque<RecordBatch> = batches.into_iter().filter(|b| b.header().last_offset() >= from).collect();
        let records_hint = batches.iter().map(|b| b.header().record_count().max(0) as usize).sum();
        Some(Chunk { key, generation, batches, current: None, from, bytes, records_hint, next_offset })
    }

    /// True when every record was handed out.
    pub(crate) fn is_exhausted(&self) -> bool {
        self.current.is_none() && self.batches.is_empty()
    }

    /// The next record at or after `from`, decoding the next batch when the
    /// current one is done.
    fn next_record(&mut self) -> Option<Result<Record, BatchError>> {
        loop {
            if let Some(records) = &mut self.current {
                match records.next() {
                    Some(Ok(r)) if r.offset < self.from => continue,
                    Some(r) => return Some(r),
                    None => self.current = None,
                }
            }
            let batch = self.batches.pop_front()?;
            match batch.records() {
                Ok(records) => self.current = Some(records),
                Err(e) => return Some(Err(e)),
            }
        }
    }

    /// Hands out up to `limit` records to `sink`; stops early at a record
    /// that does not decode (the records before it are handed out).
    pub(crate) fn take(&mut self, limit: usize, mut sink: impl FnMut(ConsumerRecord)) -> Taken {
        let mut taken = Taken { count: 0, after: None, failure: None };
        while taken.count < limit {
            match self.next_record() {
                Some(Ok(r)) => {
                    taken.after = Some(r.offset + 1);
                    taken.count += 1;
                    sink(ConsumerRecord {
                        topic: self.key.0.clone(),
                        partition: self.key.1,
                        offset: r.offset,
                        timestamp: r.timestamp,
                        headers: Headers::from_raw(r.raw_headers()),
                        key: r.key,
                        value: r.value,
                    });
                }
                Some(Err(e)) => {
                    taken.failure = Some(e);
                    break;
                }
                None => break,
            }
        }
        taken
    }
}

/// What one [`Chunk::take`] handed out.
#[derive(Debug)]
pub(crate) struct Taken {
    /// Records handed out.
    pub(crate) count: usize,
    /// The offset after the last of them (`None` when none was).
    pub(crate) after: Option<i64>,
    /// Why it stopped before `limit` with records left: a record that does
    /// not decode (or a compressed batch that does not decompress).
    pub(crate) failure: Option<BatchError>,
}

#[cfg(test)]
mod tests {
    use tally_proto::batch::{BatchBuilder, BatchLimits, RecordRef};

    use super::*;

    fn batch(base: i64, values: &[&str]) -> RecordBatch {
        let mut b = BatchBuilder::new();
        for v in values {
            b.push(&RecordRef { timestamp: 1, key: None, value: Some(v.as_bytes()), headers: &[] });
        }
        let mut bytes = b.finish().to_vec();
        bytes[..8].copy_from_slice(&base.to_be_bytes());
        RecordBatch::validate(bytes.into(), &BatchLimits::default()).unwrap()
    }

    fn key() -> (Arc<str>, u32) {
        (Arc::from("t"), 0)
    }

    #[test]
    fn records_before_the_fetch_offset_are_skipped_and_the_rest_come_out_in_order_within_the_limit() {
        let mut chunk = Chunk::new(key(), 1, vec![batch(10, &["a", "b", "c"]), batch(13, &["d"])], 11).unwrap();
        assert_eq!(chunk.next_offset, 14);
        let mut out = Vec::new();
        let taken = chunk.take(2, |r| out.push(r));
        assert_eq!((taken.count, taken.after, taken.failure.is_none()), (2, Some(13), true));
        assert!(!chunk.is_exhausted());
        let taken = chunk.take(10, |r| out.push(r));
        assert_eq!((taken.count, taken.after, taken.failure.is_none()), (1, Some(14), true));
        assert!(chunk.is_exhausted());
        let got: Vec<(i64, &[u8])> = out.iter().map(|r| (r.offset, r.value.as_deref().unwrap())).collect();
        assert_eq!(got, [(11, &b"b"[..]), (12, b"c"), (13, b"d")]);
    }

    #[test]
    fn batches_wholly_below_the_fetch_offset_leave_a_chunk_with_no_record_that_ends_at_their_end() {
        let mut chunk = Chunk::new(key(), 1, vec![batch(10, &["a", "b"])], 12).unwrap();
        assert_eq!((chunk.records_hint, chunk.next_offset), (0, 12));
        let taken = chunk.take(10, |_| panic!("no record is at or after 12"));
        assert_eq!((taken.count, taken.after, taken.failure.is_none()), (0, None, true));
        assert!(chunk.is_exhausted());
        assert!(Chunk::new(key(), 1, Vec::new(), 0).is_none(), "no batch, no chunk");
    }
}
