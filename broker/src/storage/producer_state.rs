//! The producer-state table of one partition (Kafka's `ProducerStateManager`),
//! sans-IO: per producer id, its epoch and the metadata of its last five
//! appended batches. It decides, for a batch carrying a producer id, whether
//! it is the next in sequence (append), a retry of one of the last five
//! (a duplicate: answer with its original offsets, append nothing), or
//! refused (a gap, an old epoch, a producer the partition does not know).
//!
//! The leader checks and records under the log lock; a follower records the
//! batches it appends, so a new leader already has the table. Snapshots
//! (`encode` / `decode`, CRC-32C over the whole) let a restart rebuild it
//! from the last snapshot plus the log after it.
//!
//! The [`Log`](super::Log) owns one (see `log_producers.rs`), so every path
//! that changes the log (a leader's or a follower's append, truncation,
//! open) changes the table with it.

use std::collections::{BTreeMap, VecDeque};

/// How many batches per producer are remembered (the client's in-flight
/// limit: a retry is always of one of these).
pub const BATCHES_PER_PRODUCER: usize = 5;

/// One appended batch of a producer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchMetadata {
    /// First sequence number.
    pub first_seq: i32,
    /// Last sequence number (may have wrapped past `i32::MAX` to 0).
    pub last_seq: i32,
    /// Offset of its first record.
    pub first_offset: u64,
    /// Offset of its last record.
    pub last_offset: u64,
    /// Its max timestamp (what a duplicate answers with for log-append time).
    pub timestamp: i64,
}

/// What the table knows of one producer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProducerEntry {
    /// The producer's current epoch.
    pub epoch: i16,
    /// Its last batches, oldest first (at most [`BATCHES_PER_PRODUCER`]).
    pub batches: VecDeque<BatchMetadata>,
    /// When it last appended (ms since the epoch), for expiry.
    pub last_append_ms: i64,
}

/// A batch's producer fields and span, as the table sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducerBatch {
    /// Producer id (≥ 0).
    pub producer_id: i64,
    /// Producer epoch.
    pub epoch: i16,
    /// First sequence number.
    pub first_seq: i32,
    /// Records in the batch minus one (the last sequence is `first_seq`
    /// plus this, wrapping).
    pub last_delta: i32,
}

impl ProducerBatch {
    /// The batch's last sequence number (wrapping at `i32::MAX` to 0, as
    /// Kafka's sequences do).
    pub fn last_seq(&self) -> i32 {
        wrap_add(self.first_seq, self.last_delta)
    }
}

/// `seq + n`, wrapping past `i32::MAX` to 0.
fn wrap_add(seq: i32, n: i32) -> i32 {
    let sum = i64::from(seq) + i64::from(n);
    (sum % (i64::from(i32::MAX) + 1)) as i32
}

/// Where a batch stands against the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The next in sequence (or a producer's first batch): append it.
    Append,
    /// A retry of a batch already appended: answer with these offsets.
    Duplicate(BatchMetadata),
}

/// Why a batch is refused; each has Kafka's error number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProducerStateError {
    /// Not the next sequence, nor a retry of one of the last batches.
    #[error("out of order sequence for producer {producer_id} at epoch {epoch}: got {first_seq}, expected {expected}")]
    OutOfOrderSequence {
        /// Producer.
        producer_id: i64,
        /// Epoch.
        epoch: i16,
        /// Sequence received.
        first_seq: i32,
        /// Sequence expected.
        expected: i32,
    },
    /// An epoch older than the producer's current one: a zombie.
    #[error("producer {producer_id} has epoch {current}; epoch {received} is fenced")]
    InvalidProducerEpoch {
        /// Producer.
        producer_id: i64,
        /// Epoch received.
        received: i16,
        /// Current epoch.
        current: i16,
    },
    /// A producer this partition does not know (or has forgotten), with a
    /// sequence other than 0: the client bumps its epoch (KIP-360).
    #[error(
        "producer {producer_id} is unknown to this partition (sequence {first_seq}); bump the epoch and restart at 0"
    )]
    UnknownProducerId {
        /// Producer.
        producer_id: i64,
        /// Sequence received.
        first_seq: i32,
    },
    /// The partition tracks as many producers as it may.
    #[error(
        "this partition already tracks {max} producers (max_producers_per_partition); idle ones expire after producer_id_expiration_ms"
    )]
    TooManyProducers {
        /// Limit.
        max: usize,
    },
}

impl ProducerStateError {
    /// Kafka's error number.
    pub fn kafka_code(&self) -> i16 {
        match self {
            ProducerStateError::OutOfOrderSequence { .. } => 45,
            ProducerStateError::InvalidProducerEpoch { .. } => 47,
            ProducerStateError::UnknownProducerId { .. } => 59,
            // Kafka has no number for it; POLICY_VIOLATION says a limit of
            // this broker's configuration refused the request.
            ProducerStateError::TooManyProducers { .. } => 44,
        }
    }
}

/// A snapshot that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("producer-state snapshot unreadable: {0}")]
pub struct SnapshotError(pub String);

/// The producer-state table of one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducerStateTable {
    producers: BTreeMap<i64, ProducerEntry>,
    max_producers: usize,
}

const SNAPSHOT_VERSION: u16 = 1;

impl ProducerStateTable {
    /// An empty table tracking at most `max_producers` producers.
    pub fn new(max_producers: usize) -> ProducerStateTable {
        ProducerStateTable { producers: BTreeMap::new(), max_producers }
    }

    /// What the table knows of `producer_id`.
    pub fn get(&self, producer_id: i64) -> Option<&ProducerEntry> {
        self.producers.get(&producer_id)
    }

    /// Producers tracked.
    pub fn len(&self) -> usize {
        self.producers.len()
    }

    /// True when no producer is tracked.
    pub fn is_empty(&self) -> bool {
        self.producers.is_empty()
    }

    /// Where `batch` stands (the leader, before appending it).
    pub fn check(&self, batch: &ProducerBatch) -> Result<Verdict, ProducerStateError> {
        let Some(entry) = self.producers.get(&batch.producer_id) else {
            if self.producers.len() >= self.max_producers {
                return Err(ProducerStateError::TooManyProducers { max: self.max_producers });
            }
            return if batch.first_seq == 0 {
                Ok(Verdict::Append)
            } else {
                Err(ProducerStateError::UnknownProducerId {
                    producer_id: batch.producer_id,
                    first_seq: batch.first_seq,
                })
            };
        };
        if batch.epoch < entry.epoch {
            return Err(ProducerStateError::InvalidProducerEpoch {
                producer_id: batch.producer_id,
                received: batch.epoch,
                current: entry.epoch,
            });
        }
        if batch.epoch > entry.epoch {
            // A new epoch starts its sequences again.
            return if batch.first_seq == 0 {
                Ok(Verdict::Append)
            } else {
                Err(ProducerStateError::OutOfOrderSequence {
                    producer_id: batch.producer_id,
                    epoch: batch.epoch,
                    first_seq: batch.first_seq,
                    expected: 0,
                })
            };
        }
        let last_seq = batch.last_seq();
        if let Some(dup) = entry.batches.iter().find(|b| b.first_seq == batch.first_seq && b.last_seq == last_seq) {
            return Ok(Verdict::Duplicate(*dup));
        }
        let expected = entry.batches.back().map_or(0, |b| wrap_add(b.last_seq, 1));
        if batch.first_seq == expected {
            Ok(Verdict::Append)
        } else {
            Err(ProducerStateError::OutOfOrderSequence {
                producer_id: batch.producer_id,
                epoch: batch.epoch,
                first_seq: batch.first_seq,
                expected,
            })
        }
    }

    /// Records an appended batch: the leader after `check` said append, a
    /// follower for every batch with a producer id it appends, a load for
    /// every such batch after the snapshot.
    pub fn record(&mut self, batch: &ProducerBatch, first_offset: u64, last_offset: u64, timestamp: i64, now_ms: i64) {
        let entry = self.producers.entry(batch.producer_id).or_default();
        if batch.epoch != entry.epoch {
            entry.epoch = batch.epoch;
            entry.batches.clear();
        }
        entry.batches.push_back(BatchMetadata {
            first_seq: batch.first_seq,
            last_seq: batch.last_seq(),
            first_offset,
            last_offset,
            timestamp,
        });
        while entry.batches.len() > BATCHES_PER_PRODUCER {
            entry.batches.pop_front();
        }
        entry.last_append_ms = entry.last_append_ms.max(now_ms);
    }

    /// Drops producers that have not appended for `expiration_ms`
    /// (`producer_id_expiration_ms`); returns how many.
    pub fn expire(&mut self, now_ms: i64, expiration_ms: i64) -> usize {
        let before = self.producers.len();
        self.producers.retain(|_, e| now_ms.saturating_sub(e.last_append_ms) < expiration_ms);
        before - self.producers.len()
    }

    /// The table as snapshot bytes: `[crc32c u32][version u16][count u32]`
    /// then per producer `[id i64][epoch i16][last append i64][n u8]` and
    /// `n` batches `[first seq i32][last seq i32][first offset u64][last
    /// offset u64][timestamp i64]`, big-endian; the CRC covers the rest.
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(10 + self.producers.len() * 64);
        body.extend_from_slice(&SNAPSHOT_VERSION.to_be_bytes());
        body.extend_from_slice(&(self.producers.len() as u32).to_be_bytes());
        for (id, e) in &self.producers {
            body.extend_from_slice(&id.to_be_bytes());
            body.extend_from_slice(&e.epoch.to_be_bytes());
            body.extend_from_slice(&e.last_append_ms.to_be_bytes());
            body.push(e.batches.len() as u8);
            for b in &e.batches {
                body.extend_from_slice(&b.first_seq.to_be_bytes());
                body.extend_from_slice(&b.last_seq.to_be_bytes());
                body.extend_from_slice(&b.first_offset.to_be_bytes());
                body.extend_from_slice(&b.last_offset.to_be_bytes());
                body.extend_from_slice(&b.timestamp.to_be_bytes());
            }
        }
        let mut out = Vec::with_capacity(4 + body.len());
        out.extend_from_slice(&crc32c::crc32c(&body).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Reads a snapshot back; refuses a bad CRC, an unknown version, or a
    /// length that does not match.
    pub fn decode(bytes: &[u8], max_producers: usize) -> Result<ProducerStateTable, SnapshotError> {
        let err = |m: &str| SnapshotError(m.to_string());
        if bytes.len() < 10 {
            return Err(err("shorter than its header"));
        }
        let (crc, body) = bytes.split_at(4);
        if u32::from_be_bytes(crc.try_into().expect("4 bytes")) != crc32c::crc32c(body) {
            return Err(err("CRC mismatch"));
        }
        let mut r = Reader(body);
        let version = u16::from_be_bytes(r.take::<2>()?);
        if version != SNAPSHOT_VERSION {
            return Err(SnapshotError(format!("version {version}, this broker reads {SNAPSHOT_VERSION}")));
        }
        let count = u32::from_be_bytes(r.take::<4>()?);
        let mut table = ProducerStateTable::new(max_producers);
        for _ in 0..count {
            let id = i64::from_be_bytes(r.take::<8>()?);
            let epoch = i16::from_be_bytes(r.take::<2>()?);
            let last_append_ms = i64::from_be_bytes(r.take::<8>()?);
            let n = r.take::<1>()?[0] as usize;
            if n > BATCHES_PER_PRODUCER {
                return Err(err("more batches per producer than are kept"));
            }
            let mut batches = VecDeque::with_capacity(n);
            for _ in 0..n {
                batches.push_back(BatchMetadata {
                    first_seq: i32::from_be_bytes(r.take::<4>()?),
                    last_seq: i32::from_be_bytes(r.take::<4>()?),
                    first_offset: u64::from_be_bytes(r.take::<8>()?),
                    last_offset: u64::from_be_bytes(r.take::<8>()?),
                    timestamp: i64::from_be_bytes(r.take::<8>()?),
                });
            }
            table.producers.insert(id, ProducerEntry { epoch, batches, last_append_ms });
        }
        if !r.0.is_empty() {
            return Err(err("bytes after the last producer"));
        }
        Ok(table)
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], SnapshotError> {
        if self.0.len() < N {
            return Err(SnapshotError("truncated".into()));
        }
        let (head, rest) = self.0.split_at(N);
        self.0 = rest;
        Ok(head.try_into().expect("N bytes"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(pid: i64, epoch: i16, first_seq: i32, records: i32) -> ProducerBatch {
        ProducerBatch { producer_id: pid, epoch, first_seq, last_delta: records - 1 }
    }

    /// Appends `b` at `*next` if the table says so; returns the verdict.
    fn append(t: &mut ProducerStateTable, b: &ProducerBatch, next: &mut u64) -> Result<Verdict, ProducerStateError> {
        let v = t.check(b)?;
        if v == Verdict::Append {
            let n = u64::try_from(b.last_delta).unwrap() + 1;
            t.record(b, *next, *next + n - 1, 1000, 1000);
            *next += n;
        }
        Ok(v)
    }

    #[test]
    fn a_retry_of_any_of_the_last_five_is_a_duplicate_with_its_offsets() {
        let mut t = ProducerStateTable::new(100);
        let mut next = 0;
        let batches: Vec<ProducerBatch> = (0..6).map(|i| batch(7, 0, i * 10, 10)).collect();
        for b in &batches {
            assert_eq!(append(&mut t, b, &mut next).unwrap(), Verdict::Append);
        }
        for (i, b) in batches.iter().enumerate().skip(1) {
            match t.check(b).unwrap() {
                Verdict::Duplicate(m) => assert_eq!(m.first_offset, i as u64 * 10, "batch {i}"),
                v => panic!("batch {i}: {v:?}"),
            }
        }
        // The sixth-last is forgotten: its retry is out of order.
        assert_eq!(t.check(&batches[0]).unwrap_err().kafka_code(), 45);
    }

    #[test]
    fn a_gap_or_an_overlap_is_out_of_order_and_nothing_is_recorded() {
        let mut t = ProducerStateTable::new(100);
        let mut next = 0;
        append(&mut t, &batch(1, 0, 0, 5), &mut next).unwrap();
        let e = t.check(&batch(1, 0, 6, 1)).unwrap_err();
        assert_eq!(e, ProducerStateError::OutOfOrderSequence { producer_id: 1, epoch: 0, first_seq: 6, expected: 5 });
        assert!(t.check(&batch(1, 0, 3, 4)).is_err(), "overlapping but not equal to a batch");
        assert_eq!(t.get(1).unwrap().batches.len(), 1);
        assert_eq!(append(&mut t, &batch(1, 0, 5, 1), &mut next).unwrap(), Verdict::Append);
    }

    #[test]
    fn sequences_wrap_at_i32_max() {
        let mut t = ProducerStateTable::new(100);
        let mut next = 0;
        let first = batch(3, 0, 0, 1);
        append(&mut t, &first, &mut next).unwrap();
        // Jump the producer close to the end of the range (a follower's view).
        t.record(&batch(3, 0, i32::MAX - 2, 2), 1, 2, 0, 0);
        let across = batch(3, 0, i32::MAX, 3); // MAX, 0, 1
        assert_eq!(across.last_seq(), 1);
        next = 3;
        assert_eq!(append(&mut t, &across, &mut next).unwrap(), Verdict::Append);
        assert_eq!(t.check(&batch(3, 0, 2, 1)).unwrap(), Verdict::Append);
        assert!(matches!(t.check(&across).unwrap(), Verdict::Duplicate(_)));
    }

    #[test]
    fn epochs_fence_zombies_and_a_new_epoch_starts_at_zero() {
        let mut t = ProducerStateTable::new(100);
        let mut next = 0;
        append(&mut t, &batch(9, 2, 0, 3), &mut next).unwrap();
        assert_eq!(t.check(&batch(9, 1, 3, 1)).unwrap_err().kafka_code(), 47);
        assert_eq!(t.check(&batch(9, 3, 5, 1)).unwrap_err().kafka_code(), 45);
        assert_eq!(append(&mut t, &batch(9, 3, 0, 1), &mut next).unwrap(), Verdict::Append);
        assert_eq!(t.get(9).unwrap().epoch, 3);
        assert_eq!(t.get(9).unwrap().batches.len(), 1, "the old epoch's batches are gone");
        assert_eq!(t.check(&batch(9, 2, 3, 1)).unwrap_err().kafka_code(), 47);
    }

    #[test]
    fn an_unknown_producer_must_start_at_zero_and_the_table_is_bounded() {
        let mut t = ProducerStateTable::new(2);
        let mut next = 0;
        assert_eq!(t.check(&batch(1, 0, 4, 1)).unwrap_err().kafka_code(), 59);
        append(&mut t, &batch(1, 0, 0, 1), &mut next).unwrap();
        append(&mut t, &batch(2, 0, 0, 1), &mut next).unwrap();
        let e = t.check(&batch(3, 0, 0, 1)).unwrap_err();
        assert!(matches!(e, ProducerStateError::TooManyProducers { max: 2 }), "{e}");
        // Known producers go on.
        assert_eq!(append(&mut t, &batch(2, 0, 1, 1), &mut next).unwrap(), Verdict::Append);
    }

    #[test]
    fn idle_producers_expire() {
        let mut t = ProducerStateTable::new(100);
        t.record(&batch(1, 0, 0, 1), 0, 0, 0, 1_000);
        t.record(&batch(2, 0, 0, 1), 1, 1, 0, 50_000);
        assert_eq!(t.expire(60_000, 30_000), 1);
        assert!(t.get(1).is_none() && t.get(2).is_some());
    }

    #[test]
    fn a_snapshot_reads_back_equal_and_damage_is_refused() {
        let mut t = ProducerStateTable::new(100);
        let mut next = 0;
        for pid in 0..20 {
            for i in 0..(pid % 7) as i32 {
                append(&mut t, &batch(pid, (pid % 3) as i16, i * 3, 3), &mut next).unwrap();
            }
        }
        let bytes = t.encode();
        assert_eq!(ProducerStateTable::decode(&bytes, 100).unwrap(), t);
        for i in [0, 4, 5, bytes.len() / 2, bytes.len() - 1] {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            assert!(ProducerStateTable::decode(&bad, 100).is_err(), "flipped byte {i} accepted");
        }
        assert!(ProducerStateTable::decode(&bytes[..bytes.len() - 3], 100).is_err());
        // Snapshot then the batches after it = the table that saw them all.
        let mut later = ProducerStateTable::decode(&bytes, 100).unwrap();
        let (mut a, mut b) = (next, next);
        append(&mut t, &batch(100, 0, 0, 2), &mut a).unwrap();
        append(&mut later, &batch(100, 0, 0, 2), &mut b).unwrap();
        assert_eq!(later, t);
    }
}
