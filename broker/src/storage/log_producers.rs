//! The log's producer-state table (see [`super::super::producer_state`]):
//! checked before a leader's append, fed by every append (leader or
//! replica), snapshotted at each roll and at close (see
//! [`super::super::producer_snapshot`]), and rebuilt after a truncation and
//! at open from the newest snapshot at or below the log end plus the
//! batches after it.

use tally_proto::batch::{BatchHeader, RecordBatch, batch_size_at};

use super::super::producer_snapshot;
use super::super::producer_state::{ProducerBatch, ProducerStateError, ProducerStateTable, Verdict};
use super::{Log, Result, StorageError};

/// The producer fields of a batch, when it has a producer id.
pub(crate) fn producer_batch(h: &BatchHeader<'_>) -> Option<ProducerBatch> {
    (h.producer_id() >= 0).then(|| ProducerBatch {
        producer_id: h.producer_id(),
        epoch: h.producer_epoch(),
        first_seq: h.base_sequence(),
        last_delta: h.last_offset_delta(),
    })
}

impl Log {
    /// Producer ids this log tracks.
    pub fn producer_count(&self) -> usize {
        self.producers.len()
    }

    /// The producer-state table (what the log knows of each producer).
    pub fn producer_state(&self) -> &ProducerStateTable {
        &self.producers
    }

    /// Where `batch` stands against the producer-state table: `None` for a
    /// batch without a producer id (nothing to check), else the verdict a
    /// leader's [`Log::append`] would reach now.
    pub fn producer_verdict(&self, batch: &RecordBatch) -> std::result::Result<Option<Verdict>, ProducerStateError> {
        match producer_batch(&batch.header()) {
            Some(pb) => self.producers.check(&pb).map(Some),
            None => Ok(None),
        }
    }

    /// Refuses a leader's append of `batch` that the table does not take as
    /// next in sequence (called by `append` before anything is written).
    pub(super) fn check_producer(&self, batch: &RecordBatch) -> Result<()> {
        let Some(pb) = producer_batch(&batch.header()) else { return Ok(()) };
        match self.producers.check(&pb)? {
            Verdict::Append => Ok(()),
            Verdict::Duplicate(d) => Err(StorageError::DuplicateBatch {
                producer_id: pb.producer_id,
                first_seq: d.first_seq,
                last_seq: d.last_seq,
                first_offset: d.first_offset,
                last_offset: d.last_offset,
                timestamp: d.timestamp,
            }),
        }
    }

    /// Records an appended batch at `[base, last]` in the table.
    pub(super) fn record_producer(&mut self, batch: &RecordBatch, base: u64, last: u64, now_ms: i64) {
        let h = batch.header();
        if let Some(pb) = producer_batch(&h) {
            self.producers.record(&pb, base, last, h.max_timestamp(), now_ms);
        }
    }

    /// Drops the producers idle for `expiration_ms`; returns how many.
    pub fn expire_producers(&mut self, expiration_ms: i64) -> usize {
        let now = self.clock.now_ms();
        self.producers.expire(now, expiration_ms)
    }

    /// Writes the table as the snapshot at the log end. A failure is only
    /// logged: the next open replays from an older snapshot instead.
    pub(super) fn snapshot_producers(&self) {
        let leo = self.leo();
        if let Err(e) = producer_snapshot::write(&self.dir, leo, &self.producers, self.log_start_offset) {
            tracing::warn!(dir = %self.dir.display(), offset = leo, error = %e, "could not write a producer-state snapshot");
        }
    }

    /// Rebuilds the table after a truncation to the log end (Kafka's
    /// `rebuildProducerState`): the snapshots above it go, and the table is
    /// the newest snapshot at or below it plus the batches after it, so a
    /// producer whose remembered batches were all cut is still known by the
    /// ones before them. A snapshot is kept for every roll down to the log
    /// start, so the replay reads from the base of the segment that held
    /// the cut.
    pub(super) fn rebuild_producers_after_truncation(&mut self) -> Result<()> {
        self.load_producers()
    }

    /// Forgets every producer (the log was emptied and starts again).
    pub(super) fn clear_producers(&mut self) -> Result<()> {
        self.producers = ProducerStateTable::new(self.config.max_producers);
        producer_snapshot::delete_all(&self.dir)
    }

    /// Rebuilds the table at open: the newest readable snapshot at or below
    /// the log end, then every batch after it. Without a snapshot (a log
    /// written before snapshots existed, or one whose snapshots were lost)
    /// the replay starts at the second newest segment's base, so open stays
    /// bounded; producers seen only before it are unknown until they send a
    /// first sequence again (they get UNKNOWN_PRODUCER_ID and bump their
    /// epoch, which duplicates nothing).
    pub(super) fn load_producers(&mut self) -> Result<()> {
        let leo = self.leo();
        producer_snapshot::delete_above(&self.dir, leo)?;
        let (from, table) = match producer_snapshot::load_latest(&self.dir, leo, self.config.max_producers)? {
            Some((offset, table)) => (offset, table),
            None => {
                let bases: Vec<u64> = self.segments.keys().rev().take(2).copied().collect();
                (bases.last().copied().unwrap_or(leo), ProducerStateTable::new(self.config.max_producers))
            }
        };
        self.producers = table;
        self.replay_producers_from(from.max(self.log_start_offset))
    }

    /// Records every producer batch from `from` to the log end into the
    /// table, walking batch headers in the segment maps (no CRC check: these
    /// bytes were validated when written or recovered, and only headers are
    /// touched, a page per batch at most).
    fn replay_producers_from(&mut self, from: u64) -> Result<()> {
        let leo = self.leo();
        if from >= leo {
            return Ok(());
        }
        let now = self.clock.now_ms();
        let floor = self.segments.range(..=from).next_back().map_or(0, |(b, _)| *b);
        let (segments, producers) = (&self.segments, &mut self.producers);
        let mut first = true;
        for segment in segments.range(floor..).map(|(_, s)| s) {
            let position = if first {
                match segment.find_position(from)? {
                    Some(p) => p,
                    None => continue,
                }
            } else {
                0
            };
            first = false;
            let Some((bytes, _)) = segment.read_from(position, u64::MAX, leo, true, false)? else { continue };
            let mut rest: &[u8] = &bytes;
            while !rest.is_empty() {
                let size = batch_size_at(rest).filter(|&n| n <= rest.len()).unwrap_or(rest.len());
                let h = BatchHeader::new(&rest[..size]).map_err(|reason| StorageError::Corrupt {
                    path: self.dir.clone(),
                    position,
                    reason,
                })?;
                if let Some(pb) = producer_batch(&h) {
                    // The last appended time is unknown, so it counts as now
                    // (expiry then waits a full period, never less).
                    producers.record(&pb, h.base_offset() as u64, h.last_offset() as u64, h.max_timestamp(), now);
                }
                rest = &rest[size..];
            }
        }
        Ok(())
    }
}
