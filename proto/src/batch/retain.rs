//! Rewriting a stored batch with some of its records removed: the log
//! cleaner's step (Kafka's `MemoryRecords.filterTo`).
//!
//! The rewritten batch keeps what identifies it: its base offset and last
//! offset delta (so it covers the same offsets and the producer's last
//! sequence stays what it was), leader epoch, attributes (codec, timestamp
//! type, transactional, control), producer id, epoch and base sequence. The
//! surviving records keep their offset deltas, so the records' offsets do not
//! change and the batch has gaps. The records are compressed again with the
//! batch's codec, and the CRC, record count and max timestamp are
//! recomputed.
//!
//! A batch that keeps a tombstone carries its delete horizon as Kafka does
//! (KIP-534): the `delete horizon` attribute bit set and the horizon in the
//! base timestamp field, every record's timestamp delta rebased on it, so a
//! later pass knows when the tombstone may go without any side file.

use bytes::Bytes;

use super::{
    ATTRIBUTES, BASE_TIMESTAMP, BATCH_LENGTH, BatchError, CRC, HEADER_LEN, LOG_OVERHEAD, MAX_TIMESTAMP, RECORD_COUNT,
    RecordBatch, compute_crc, parse_record,
};
use crate::compression::Compression;
use crate::varint::{put_varint, put_varlong};

/// The attribute bit saying the base timestamp field holds the batch's
/// delete horizon (KIP-534).
pub(super) const DELETE_HORIZON_BIT: i16 = 0x40;

/// What is left of a batch after [`RecordBatch::retain`].
#[derive(Debug, Clone)]
pub enum Retained {
    /// Every record kept and nothing to record: store the batch as it is.
    Unchanged,
    /// Some records kept, or a delete horizon set: the rewritten batch.
    Rewritten(RecordBatch),
    /// No record kept.
    Empty,
}

impl RecordBatch {
    /// The delete horizon (ms since the epoch) a cleaner recorded in this
    /// batch, after which its tombstones may be removed; `None` when unset.
    pub fn delete_horizon_ms(&self) -> Option<i64> {
        let header = self.header();
        (header.attributes() & DELETE_HORIZON_BIT != 0).then(|| header.base_timestamp())
    }

    /// Calls `f` with each record's offset and key, borrowed from the batch
    /// (or from its records decompressed once): what the log cleaner's
    /// offset map needs, without a `Bytes` per field.
    pub fn for_each_key(&self, mut f: impl FnMut(i64, Option<&[u8]>)) -> Result<(), BatchError> {
        let header = self.header();
        let owned;
        let bytes: &[u8] = match Compression::from_attributes(header.attributes())? {
            Compression::None => &self.bytes,
            _ => {
                owned = self.decompressed(super::MAX_UNCOMPRESSED_BYTES)?;
                &owned
            }
        };
        let mut pos = HEADER_LEN;
        for index in 0..header.record_count().max(0) {
            let (raw, end) = parse_record(bytes, pos, index)?;
            f(header.base_offset() + i64::from(raw.offset_delta), raw.key.map(|k| &bytes[k]));
            pos = end;
        }
        Ok(())
    }

    /// This batch with only the records `keep` accepts; `keep` sees each
    /// record's offset, key, and whether it has a value (borrowed, no
    /// allocation per record). When a kept record is a tombstone (a key
    /// with a null value) and the batch has no delete horizon yet,
    /// `new_delete_horizon_ms` becomes its horizon. Decompresses and
    /// compresses again with the batch's codec.
    pub fn retain(
        &self,
        mut keep: impl FnMut(i64, Option<&[u8]>, bool) -> bool,
        new_delete_horizon_ms: i64,
    ) -> Result<Retained, BatchError> {
        let header = self.header();
        let count = header.record_count();
        let codec = Compression::from_attributes(header.attributes())?;
        let plain = match codec {
            Compression::None => self.bytes.clone(),
            _ => self.decompressed(super::MAX_UNCOMPRESSED_BYTES)?,
        };
        // Positions [start, end) of the kept records in `plain`, with their
        // stored timestamps and offset deltas (for a rebase).
        let mut kept: Vec<(usize, usize, i64, i32)> = Vec::new();
        let mut keeps_tombstone = false;
        let mut pos = HEADER_LEN;
        for index in 0..count.max(0) {
            let (raw, end) = parse_record(&plain, pos, index)?;
            let key = raw.key.clone().map(|k| &plain[k]);
            let offset = header.base_offset() + i64::from(raw.offset_delta);
            if keep(offset, key, raw.value.is_some()) {
                keeps_tombstone |= key.is_some() && raw.value.is_none();
                let timestamp = header.base_timestamp().wrapping_add(raw.timestamp_delta);
                kept.push((pos, end, timestamp, raw.offset_delta));
            }
            pos = end;
        }
        if kept.is_empty() {
            return Ok(Retained::Empty);
        }
        let set_horizon = keeps_tombstone && self.delete_horizon_ms().is_none();
        if kept.len() == count as usize && !set_horizon {
            return Ok(Retained::Unchanged);
        }
        let log_append_time = header.is_log_append_time();
        let base_timestamp = if set_horizon { new_delete_horizon_ms } else { header.base_timestamp() };
        let mut body = Vec::with_capacity(pos - HEADER_LEN);
        for &(start, end, timestamp, offset_delta) in &kept {
            if !set_horizon {
                body.extend_from_slice(&plain[start..end]);
                continue;
            }
            // Rebase the timestamp delta on the horizon; the rest of the
            // record (key, value, headers) is copied as it was.
            let stored_timestamp = timestamp;
            let rest = key_field_start(&plain, start);
            let mut record = Vec::with_capacity(end - start + 10);
            record.push(0); // attributes
            put_varlong(&mut record, stored_timestamp.wrapping_sub(base_timestamp));
            put_varint(&mut record, offset_delta);
            record.extend_from_slice(&plain[rest..end]);
            put_varint(&mut body, i32::try_from(record.len()).unwrap_or(i32::MAX));
            body.extend_from_slice(&record);
        }
        let records_bytes = match codec {
            Compression::None => body,
            _ => codec.compress(&body),
        };
        let mut out = Vec::with_capacity(HEADER_LEN + records_bytes.len());
        out.extend_from_slice(&self.bytes[..HEADER_LEN]);
        out.extend_from_slice(&records_bytes);
        let batch_length = i32::try_from(out.len() - LOG_OVERHEAD).unwrap_or(i32::MAX);
        out[BATCH_LENGTH..BATCH_LENGTH + 4].copy_from_slice(&batch_length.to_be_bytes());
        let attributes = header.attributes() | if set_horizon { DELETE_HORIZON_BIT } else { 0 };
        out[ATTRIBUTES..ATTRIBUTES + 2].copy_from_slice(&attributes.to_be_bytes());
        out[BASE_TIMESTAMP..BASE_TIMESTAMP + 8].copy_from_slice(&base_timestamp.to_be_bytes());
        if !log_append_time {
            let max = kept.iter().map(|k| k.2).max().unwrap_or(header.max_timestamp());
            out[MAX_TIMESTAMP..MAX_TIMESTAMP + 8].copy_from_slice(&max.to_be_bytes());
        }
        out[RECORD_COUNT..RECORD_COUNT + 4].copy_from_slice(&(kept.len() as i32).to_be_bytes());
        let crc = compute_crc(&out);
        out[CRC..CRC + 4].copy_from_slice(&crc.to_be_bytes());
        Ok(Retained::Rewritten(RecordBatch { bytes: Bytes::from(out) }))
    }
}

impl RecordBatch {
    /// This batch with no records left: the header alone, keeping the span
    /// of offsets (base offset and last offset delta), leader epoch,
    /// producer fields and timestamps, uncompressed, record count 0. Kafka
    /// keeps such batches where the span or the producer's last sequence
    /// must survive cleaning.
    pub fn emptied(&self) -> RecordBatch {
        let mut out = self.bytes[..HEADER_LEN].to_vec();
        let batch_length = (HEADER_LEN - LOG_OVERHEAD) as i32;
        out[BATCH_LENGTH..BATCH_LENGTH + 4].copy_from_slice(&batch_length.to_be_bytes());
        let attributes = self.header().attributes() & !super::COMPRESSION_MASK;
        out[ATTRIBUTES..ATTRIBUTES + 2].copy_from_slice(&attributes.to_be_bytes());
        out[RECORD_COUNT..RECORD_COUNT + 4].copy_from_slice(&0i32.to_be_bytes());
        let crc = compute_crc(&out);
        out[CRC..CRC + 4].copy_from_slice(&crc.to_be_bytes());
        RecordBatch { bytes: Bytes::from(out) }
    }
}

impl RecordBatch {
    /// A batch with no records spanning `last_offset_delta + 1` offsets:
    /// what the log cleaner writes where it removed whole batches, so a
    /// cleaned log stays a contiguous run of batches (every offset is
    /// covered by exactly one batch; a reader moves past the span). No
    /// producer, CreateTime, uncompressed; base offset and leader epoch are
    /// stamped when it is stored.
    pub fn filler(last_offset_delta: i32, base_timestamp: i64, max_timestamp: i64) -> RecordBatch {
        let mut b = super::BatchBuilder::with_capacity(HEADER_LEN);
        b.base_timestamp = base_timestamp;
        let mut out = b.finish_vec();
        out[super::LAST_OFFSET_DELTA..super::LAST_OFFSET_DELTA + 4].copy_from_slice(&last_offset_delta.to_be_bytes());
        out[MAX_TIMESTAMP..MAX_TIMESTAMP + 8].copy_from_slice(&max_timestamp.to_be_bytes());
        let crc = compute_crc(&out);
        out[CRC..CRC + 4].copy_from_slice(&crc.to_be_bytes());
        RecordBatch { bytes: Bytes::from(out) }
    }
}

/// Where the key field of the record at `start` begins: after the length,
/// attributes, timestamp delta and offset delta.
fn key_field_start(plain: &[u8], start: usize) -> usize {
    let skip_varint = |p: usize| crate::varint::get_varint(&plain[p..]).map_or(p, |(_, n)| p + n);
    let skip_varlong = |p: usize| crate::varint::get_varlong(&plain[p..]).map_or(p, |(_, n)| p + n);
    let after_length = skip_varint(start);
    let after_attributes = after_length + 1;
    skip_varint(skip_varlong(after_attributes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{BatchBuilder, BatchError, BatchLimits, RecordRef, set_base_offset};

    fn batch(records: &[(Option<&str>, Option<&str>, i64)], codec: Compression) -> RecordBatch {
        let mut b = BatchBuilder::new();
        b.set_producer(7, 2, 100);
        b.set_compression(codec);
        for (key, value, ts) in records {
            b.push(&RecordRef {
                timestamp: *ts,
                key: key.map(str::as_bytes),
                value: value.map(str::as_bytes),
                headers: &[crate::batch::HeaderRef { key: "h", value: Some(b"x") }],
            });
        }
        let mut bytes = b.finish_vec();
        set_base_offset(&mut bytes, 40);
        RecordBatch::validate(bytes.into(), &BatchLimits::default()).unwrap()
    }

    fn contents(b: &RecordBatch) -> Vec<(i64, Option<Bytes>, Option<Bytes>, i64)> {
        b.records().unwrap().map(|r| r.unwrap()).map(|r| (r.offset, r.key, r.value, r.timestamp)).collect()
    }

    fn rewritten(r: Retained) -> RecordBatch {
        match r {
            Retained::Rewritten(b) => RecordBatch::check_framing(b.into_bytes()).expect("a valid CRC"),
            other => panic!("expected a rewrite, got {other:?}"),
        }
    }

    #[test]
    fn kept_records_keep_their_offsets_and_the_batch_its_span_and_producer() {
        for codec in [Compression::None, Compression::Gzip, Compression::Lz4, Compression::Zstd, Compression::Snappy] {
            let original = batch(
                &[(Some("a"), Some("1"), 1000), (Some("b"), Some("2"), 1005), (Some("a"), Some("3"), 1002)],
                codec,
            );
            let b = rewritten(original.retain(|offset, _, _| offset != 40 && offset != 42, 0).unwrap());
            let h = b.header();
            assert_eq!((h.base_offset(), h.last_offset(), h.record_count()), (40, 42, 1), "{codec:?}");
            assert_eq!((h.producer_id(), h.producer_epoch(), h.base_sequence()), (7, 2, 100));
            assert_eq!(h.compression(), original.header().compression());
            assert_eq!(h.max_timestamp(), 1005, "the max timestamp of what is left");
            assert_eq!(contents(&b), vec![(41, Some(Bytes::from("b")), Some(Bytes::from("2")), 1005)]);
            let headers: Vec<_> = b.records().unwrap().next().unwrap().unwrap().headers().map(|h| h.unwrap()).collect();
            assert_eq!(headers.len(), 1, "headers survive");
            assert!(b.delete_horizon_ms().is_none(), "no tombstone, no horizon");
        }
    }

    #[test]
    fn a_producer_cannot_set_a_delete_horizon() {
        let original = batch(&[(Some("a"), None, 1000)], Compression::None);
        let cleaned = rewritten(original.retain(|_, _, _| true, 5).unwrap());
        assert_eq!(cleaned.delete_horizon_ms(), Some(5));
        let mut bytes = cleaned.into_bytes().to_vec();
        set_base_offset(&mut bytes, 0);
        let err = RecordBatch::validate(bytes.into(), &BatchLimits::default()).unwrap_err();
        assert_eq!(err, BatchError::DeleteHorizonSet);
    }

    #[test]
    fn an_emptied_batch_keeps_its_span_and_reads_as_no_records() {
        let original = batch(&[(Some("a"), Some("1"), 1000), (Some("b"), Some("2"), 1001)], Compression::Zstd);
        let empty = RecordBatch::check_framing(original.emptied().into_bytes()).expect("a valid CRC");
        let h = empty.header();
        assert_eq!((h.base_offset(), h.last_offset(), h.record_count(), h.compression()), (40, 41, 0, 0));
        assert_eq!((h.producer_id(), h.base_sequence(), h.max_timestamp()), (7, 100, 1001));
        assert_eq!(empty.records().unwrap().count(), 0);
    }

    #[test]
    fn a_filler_spans_offsets_with_no_records() {
        let mut bytes = RecordBatch::filler(9, 1000, 1500).into_bytes().to_vec();
        set_base_offset(&mut bytes, 20);
        let filler = RecordBatch::check_framing(bytes.into()).expect("a valid CRC");
        let h = filler.header();
        assert_eq!((h.base_offset(), h.last_offset(), h.next_offset(), h.record_count()), (20, 29, 30, 0));
        assert_eq!((h.producer_id(), h.base_sequence(), h.base_timestamp(), h.max_timestamp()), (-1, -1, 1000, 1500));
        assert_eq!(filler.records().unwrap().count(), 0);
    }

    #[test]
    fn all_kept_is_unchanged_and_none_kept_is_empty() {
        let original = batch(&[(Some("a"), Some("1"), 1000), (Some("b"), Some("2"), 1001)], Compression::None);
        assert!(matches!(original.retain(|_, _, _| true, 0).unwrap(), Retained::Unchanged));
        assert!(matches!(original.retain(|_, _, _| false, 0).unwrap(), Retained::Empty));
    }

    #[test]
    fn a_kept_tombstone_gets_a_delete_horizon_once_and_timestamps_stay_true() {
        for codec in [Compression::None, Compression::Zstd] {
            let original = batch(&[(Some("a"), None, 1000), (Some("b"), Some("2"), 1007)], codec);
            let b = rewritten(original.retain(|_, _, _| true, 90_000).unwrap());
            assert_eq!(b.delete_horizon_ms(), Some(90_000));
            assert_eq!(
                contents(&b),
                vec![
                    (40, Some(Bytes::from("a")), None, 1000),
                    (41, Some(Bytes::from("b")), Some(Bytes::from("2")), 1007)
                ],
                "record timestamps are rebased on the horizon, not changed"
            );
            assert_eq!(b.header().max_timestamp(), 1007);
            // A later pass keeps the first horizon.
            assert!(matches!(b.retain(|_, _, _| true, 200_000).unwrap(), Retained::Unchanged));
            let later = rewritten(b.retain(|offset, _, _| offset == 40, 200_000).unwrap());
            assert_eq!(later.delete_horizon_ms(), Some(90_000));
            assert_eq!(contents(&later), vec![(40, Some(Bytes::from("a")), None, 1000)]);
        }
    }
}
