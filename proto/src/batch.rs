//! Kafka's RecordBatch v2 (magic 2), byte for byte.
//!
//! A batch is a 61-byte header followed by records:
//!
//! ```text
//! baseOffset i64 | batchLength i32 | partitionLeaderEpoch i32 | magic i8 | crc u32 |
//! attributes i16 | lastOffsetDelta i32 | baseTimestamp i64 | maxTimestamp i64 |
//! producerId i64 | producerEpoch i16 | baseSequence i32 | recordCount i32 | records...
//! ```
//!
//! The CRC-32C covers everything from `attributes` to the end, so the broker
//! assigns offsets and leader epochs by patching the first 16 bytes without
//! touching the CRC. All integers are big-endian.
//!
//! Three things live here: [`BatchBuilder`] encodes records into a batch,
//! [`RecordBatch::validate`] checks bytes from the network or disk and wraps
//! them in a type that proves it, and [`RecordBatch::records`] iterates records
//! as zero-copy [`Bytes`] slices. Nothing here panics on any input.

use crate::compression::Compression;
use bytes::Bytes;

mod retain;
pub use retain::Retained;

use crate::varint::{get_varint, get_varlong, put_varint, put_varlong, varint_len, varlong_len};

/// Size of the fixed batch header.
pub const HEADER_LEN: usize = 61;
/// Bytes before the part that `batchLength` counts: baseOffset and batchLength.
pub const LOG_OVERHEAD: usize = 12;
/// The only batch format Tally reads and writes.
pub const MAGIC: i8 = 2;
/// `partitionLeaderEpoch` value of a batch that no leader has stamped yet.
pub const NO_PARTITION_LEADER_EPOCH: i32 = -1;
/// `producerId` of a batch from a non-idempotent producer.
pub const NO_PRODUCER_ID: i64 = -1;

const BASE_OFFSET: usize = 0;
const BATCH_LENGTH: usize = 8;
const PARTITION_LEADER_EPOCH: usize = 12;
const MAGIC_AT: usize = 16;
const CRC: usize = 17;
const ATTRIBUTES: usize = 21;
const LAST_OFFSET_DELTA: usize = 23;
const BASE_TIMESTAMP: usize = 27;
const MAX_TIMESTAMP: usize = 35;
const PRODUCER_ID: usize = 43;
const PRODUCER_EPOCH: usize = 51;
const BASE_SEQUENCE: usize = 53;
const RECORD_COUNT: usize = 57;

const COMPRESSION_MASK: i16 = 0x07;
const TIMESTAMP_TYPE_BIT: i16 = 0x08;
const TRANSACTIONAL_BIT: i16 = 0x10;
const CONTROL_BIT: i16 = 0x20;

/// Why a batch was refused. Every variant names what was wrong and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    /// Fewer bytes than a header, or than the header says the batch has.
    #[error("batch truncated: need {needed} bytes, have {available}")]
    Truncated {
        /// Bytes the batch needs.
        needed: usize,
        /// Bytes present.
        available: usize,
    },
    /// `batchLength` disagrees with the bytes given.
    #[error("batch length field says {declared} bytes but the batch has {actual}")]
    LengthMismatch {
        /// Total size the header declares (batchLength + 12).
        declared: i64,
        /// Bytes actually given.
        actual: usize,
    },
    /// Not a v2 batch.
    #[error("unsupported batch magic {0} (only magic 2 is supported)")]
    BadMagic(i8),
    /// The CRC-32C does not match the bytes.
    #[error("batch CRC mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    CrcMismatch {
        /// CRC in the header.
        stored: u32,
        /// CRC of the bytes.
        computed: u32,
    },
    /// A batch with no records.
    #[error("batch has no records")]
    Empty,
    /// recordCount disagrees with the records present or with lastOffsetDelta.
    #[error("record count mismatch: header says {declared}, found {found}")]
    RecordCountMismatch {
        /// recordCount from the header.
        declared: i32,
        /// Records found (or lastOffsetDelta + 1).
        found: i64,
    },
    /// A record's offsetDelta is not its index in the batch.
    #[error("record {index} has offset delta {delta}, expected {index}")]
    OffsetDeltaMismatch {
        /// Position of the record in the batch.
        index: i32,
        /// Its offsetDelta.
        delta: i32,
    },
    /// A record's fields do not fit inside its declared length or the batch.
    #[error("record {index} is malformed: {what}")]
    MalformedRecord {
        /// Position of the record in the batch.
        index: i32,
        /// What was wrong.
        what: &'static str,
    },
    /// maxTimestamp is not the largest record timestamp.
    #[error("maxTimestamp {declared} does not match the largest record timestamp {actual}")]
    TimestampMismatch {
        /// maxTimestamp from the header.
        declared: i64,
        /// Largest record timestamp.
        actual: i64,
    },
    /// Bytes left after the last record.
    #[error("{0} bytes after the last record")]
    TrailingBytes(usize),
    /// The batch is larger than allowed.
    #[error("batch of {size} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Size of the batch.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The control flag is set: only the broker writes control batches.
    #[error("the batch has the control flag set; only the broker writes control batches")]
    ControlBatch,
    /// Producer fields that contradict each other.
    #[error(
        "producer fields contradict each other: producerId {producer_id}, producerEpoch {producer_epoch}, \
         baseSequence {base_sequence} ({why})"
    )]
    ProducerFields {
        /// producerId.
        producer_id: i64,
        /// producerEpoch.
        producer_epoch: i16,
        /// baseSequence.
        base_sequence: i32,
        /// Which rule they break.
        why: &'static str,
    },
    /// A batch with the delete-horizon attribute, which only the log cleaner
    /// sets (INVALID_RECORD): a producer could otherwise shorten
    /// `delete_retention_ms` for its tombstones.
    #[error("the batch has the delete-horizon attribute (0x40) set; only the log cleaner sets it")]
    DeleteHorizonSet,
    /// A record without a key for a compacted topic (INVALID_RECORD).
    #[error("record {index} has no key: a compacted topic keeps the last record of every key, so each needs one")]
    MissingKey {
        /// Position of the record in the batch.
        index: i32,
    },
    /// A header key that is not UTF-8 (Kafka's wire type for it is a string).
    #[error("record {index} has a header key that is not valid UTF-8")]
    HeaderKeyNotUtf8 {
        /// Position of the record in the batch.
        index: i32,
    },
    /// A record timestamp outside what the topic accepts (INVALID_TIMESTAMP).
    #[error(
        "record {index} has timestamp {timestamp}, outside the accepted range [{earliest}, {latest}] \
         (message_timestamp_before_max_ms / message_timestamp_after_max_ms)"
    )]
    TimestampOutOfRange {
        /// Position of the record in the batch.
        index: i32,
        /// Its timestamp.
        timestamp: i64,
        /// Earliest accepted.
        earliest: i64,
        /// Latest accepted.
        latest: i64,
    },
    /// The attributes name a codec that does not exist (5 to 7).
    #[error("unknown compression codec {0} in the batch attributes")]
    UnknownCompression(u8),
    /// A compressed payload that does not decompress.
    #[error("the {codec} payload does not decompress: {reason}")]
    Decompression {
        /// The codec.
        codec: &'static str,
        /// What the decoder said.
        reason: String,
    },
    /// A compressed payload that decompresses to more than the limit (a
    /// decompression bomb, or a batch too large to check).
    #[error("the compressed records decompress to more than {limit} bytes")]
    DecompressedTooLarge {
        /// The limit.
        limit: usize,
    },
}

fn i16_at(b: &[u8], at: usize) -> i16 {
    i16::from_be_bytes([b[at], b[at + 1]])
}
fn i32_at(b: &[u8], at: usize) -> i32 {
    i32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn i64_at(b: &[u8], at: usize) -> i64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    i64::from_be_bytes(a)
}

/// The total size (header included) of the batch starting at `buf`, read from
/// its `batchLength` field, or `None` if `buf` is too short or the field is
/// negative. Does not check that the bytes are present.
pub fn batch_size_at(buf: &[u8]) -> Option<usize> {
    if buf.len() < LOG_OVERHEAD {
        return None;
    }
    let len = i32_at(buf, BATCH_LENGTH);
    usize::try_from(len).ok().map(|l| l + LOG_OVERHEAD)
}

/// CRC-32C of a batch, from `attributes` to the end.
pub fn compute_crc(batch: &[u8]) -> u32 {
    crc32c::crc32c(&batch[ATTRIBUTES..])
}

/// Overwrites `baseOffset` in an encoded batch. The CRC stays valid.
pub fn set_base_offset(batch: &mut [u8], offset: i64) {
    batch[BASE_OFFSET..BASE_OFFSET + 8].copy_from_slice(&offset.to_be_bytes());
}

/// Overwrites `partitionLeaderEpoch` in an encoded batch. The CRC stays valid.
pub fn set_partition_leader_epoch(batch: &mut [u8], epoch: i32) {
    batch[PARTITION_LEADER_EPOCH..PARTITION_LEADER_EPOCH + 4].copy_from_slice(&epoch.to_be_bytes());
}

/// Overwrites the idempotent-producer fields (`producerId`,
/// `producerEpoch`, `baseSequence`) of an encoded batch and recomputes its
/// CRC, which covers them. For a producer that restamps a batch it had
/// sealed before it knew its producer id, or after an epoch bump.
pub fn set_producer_fields(batch: &mut [u8], producer_id: i64, producer_epoch: i16, base_sequence: i32) {
    batch[PRODUCER_ID..PRODUCER_ID + 8].copy_from_slice(&producer_id.to_be_bytes());
    batch[PRODUCER_EPOCH..PRODUCER_EPOCH + 2].copy_from_slice(&producer_epoch.to_be_bytes());
    batch[BASE_SEQUENCE..BASE_SEQUENCE + 4].copy_from_slice(&base_sequence.to_be_bytes());
    let crc = compute_crc(batch);
    batch[CRC..CRC + 4].copy_from_slice(&crc.to_be_bytes());
}

/// [`RecordBatch::check_framing`] on borrowed bytes: header present,
/// `batchLength` equal to `buf.len()`, magic 2, CRC right.
pub fn check_framing_slice(buf: &[u8]) -> Result<BatchHeader<'_>, BatchError> {
    let header = BatchHeader::new(buf)?;
    let declared = header.total_size();
    if declared != buf.len() as i64 {
        return Err(BatchError::LengthMismatch { declared, actual: buf.len() });
    }
    if header.magic() != MAGIC {
        return Err(BatchError::BadMagic(header.magic()));
    }
    let computed = compute_crc(buf);
    if computed != header.crc() {
        return Err(BatchError::CrcMismatch { stored: header.crc(), computed });
    }
    Ok(header)
}

/// A read-only view of a batch header. Construction checks only that the 61
/// header bytes are present; use [`RecordBatch::validate`] for the rest.
#[derive(Clone, Copy)]
pub struct BatchHeader<'a>(&'a [u8]);

impl<'a> BatchHeader<'a> {
    /// Views the header at the front of `buf`.
    pub fn new(buf: &'a [u8]) -> Result<Self, BatchError> {
        if buf.len() < HEADER_LEN {
            return Err(BatchError::Truncated { needed: HEADER_LEN, available: buf.len() });
        }
        Ok(BatchHeader(&buf[..HEADER_LEN]))
    }
    /// Offset of the first record.
    pub fn base_offset(&self) -> i64 {
        i64_at(self.0, BASE_OFFSET)
    }
    /// The `batchLength` field: bytes after it.
    pub fn batch_length(&self) -> i32 {
        i32_at(self.0, BATCH_LENGTH)
    }
    /// Total size of the batch as declared by `batchLength`, or -1 if negative.
    pub fn total_size(&self) -> i64 {
        i64::from(self.batch_length()) + LOG_OVERHEAD as i64
    }
    /// Leader epoch stamped by the leader that appended the batch.
    pub fn partition_leader_epoch(&self) -> i32 {
        i32_at(self.0, PARTITION_LEADER_EPOCH)
    }
    /// Format version; 2 for every batch Tally accepts.
    pub fn magic(&self) -> i8 {
        self.0[MAGIC_AT] as i8
    }
    /// Stored CRC-32C.
    pub fn crc(&self) -> u32 {
        u32_at(self.0, CRC)
    }
    /// Raw attributes.
    pub fn attributes(&self) -> i16 {
        i16_at(self.0, ATTRIBUTES)
    }
    /// Compression codec id (0 none, 1 gzip, 2 snappy, 3 lz4, 4 zstd).
    pub fn compression(&self) -> u8 {
        (self.attributes() & COMPRESSION_MASK) as u8
    }
    /// True when timestamps are the broker's append time (LogAppendTime).
    pub fn is_log_append_time(&self) -> bool {
        self.attributes() & TIMESTAMP_TYPE_BIT != 0
    }
    /// True for transactional batches.
    pub fn is_transactional(&self) -> bool {
        self.attributes() & TRANSACTIONAL_BIT != 0
    }
    /// True for control batches (transaction markers).
    pub fn is_control(&self) -> bool {
        self.attributes() & CONTROL_BIT != 0
    }
    /// Offset delta of the last record.
    pub fn last_offset_delta(&self) -> i32 {
        i32_at(self.0, LAST_OFFSET_DELTA)
    }
    /// Offset of the last record.
    pub fn last_offset(&self) -> i64 {
        self.base_offset() + i64::from(self.last_offset_delta())
    }
    /// Offset after the last record.
    pub fn next_offset(&self) -> i64 {
        self.last_offset() + 1
    }
    /// Timestamp of the first record.
    pub fn base_timestamp(&self) -> i64 {
        i64_at(self.0, BASE_TIMESTAMP)
    }
    /// Largest record timestamp.
    pub fn max_timestamp(&self) -> i64 {
        i64_at(self.0, MAX_TIMESTAMP)
    }
    /// Producer id, or -1.
    pub fn producer_id(&self) -> i64 {
        i64_at(self.0, PRODUCER_ID)
    }
    /// Producer epoch, or -1.
    pub fn producer_epoch(&self) -> i16 {
        i16_at(self.0, PRODUCER_EPOCH)
    }
    /// Sequence number of the first record, or -1.
    pub fn base_sequence(&self) -> i32 {
        i32_at(self.0, BASE_SEQUENCE)
    }
    /// Number of records.
    pub fn record_count(&self) -> i32 {
        i32_at(self.0, RECORD_COUNT)
    }
}

/// Limits applied by [`RecordBatch::validate`].
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Largest batch accepted, header included.
    pub max_batch_bytes: usize,
    /// Largest the records of a compressed batch may decompress to.
    pub max_uncompressed_bytes: usize,
    /// Record timestamps of a CreateTime batch must lie in this inclusive
    /// range, `(earliest, latest)` (Kafka's
    /// `message.timestamp.before/after.max.ms` around now).
    pub timestamps: Option<(i64, i64)>,
    /// Every record must have a key (a compacted topic).
    pub require_keys: bool,
}

/// Default of [`BatchLimits::max_uncompressed_bytes`], and the bound when
/// reading compressed batches back: 64 MiB.
pub const MAX_UNCOMPRESSED_BYTES: usize = 64 << 20;

impl Default for BatchLimits {
    fn default() -> Self {
        BatchLimits {
            max_batch_bytes: 1024 * 1024,
            max_uncompressed_bytes: MAX_UNCOMPRESSED_BYTES,
            timestamps: None,
            require_keys: false,
        }
    }
}

/// One record batch that passed [`RecordBatch::validate`] (or
/// [`RecordBatch::check_framing`]). Cloning is cheap: it shares the bytes.
#[derive(Clone, Debug)]
pub struct RecordBatch {
    bytes: Bytes,
}

impl RecordBatch {
    /// Checks everything a broker must check before storing a batch from the
    /// network: length, magic, CRC, record count, offset deltas, record
    /// framing, maxTimestamp, and the size limit. `bytes` must hold exactly
    /// one batch.
    pub fn validate(bytes: Bytes, limits: &BatchLimits) -> Result<RecordBatch, BatchError> {
        let batch = Self::check_framing(bytes)?;
        if batch.bytes.len() > limits.max_batch_bytes {
            return Err(BatchError::TooLarge { size: batch.bytes.len(), max: limits.max_batch_bytes });
        }
        let header = batch.header();
        let count = header.record_count();
        if count <= 0 {
            return Err(BatchError::Empty);
        }
        if header.is_control() {
            return Err(BatchError::ControlBatch);
        }
        if header.attributes() & retain::DELETE_HORIZON_BIT != 0 {
            return Err(BatchError::DeleteHorizonSet);
        }
        check_producer_fields(&header)?;
        if i64::from(header.last_offset_delta()) + 1 != i64::from(count) {
            return Err(BatchError::RecordCountMismatch {
                declared: count,
                found: i64::from(header.last_offset_delta()) + 1,
            });
        }
        let codec = Compression::from_attributes(header.attributes())?;
        if codec != Compression::None {
            // The records are checked as an uncompressed batch's are; the
            // client's compressed bytes are what is stored.
            let plain = batch.decompressed(limits.max_uncompressed_bytes)?;
            check_records(&plain, &batch.header(), limits)?;
            return Ok(batch);
        }
        check_records(&batch.bytes, &header, limits)?;
        Ok(batch)
    }

    /// The batch with its records decompressed: the header (as stored,
    /// attributes included) followed by the plain records.
    fn decompressed(&self, max_bytes: usize) -> Result<Bytes, BatchError> {
        let header = self.header();
        let codec = Compression::from_attributes(header.attributes())?;
        let records = codec.decompress(&self.bytes[HEADER_LEN..], max_bytes)?;
        let mut plain = Vec::with_capacity(HEADER_LEN + records.len());
        plain.extend_from_slice(&self.bytes[..HEADER_LEN]);
        plain.extend_from_slice(&records);
        Ok(plain.into())
    }
}

/// Checks the records of `bytes` (a whole uncompressed batch, or a header
/// followed by decompressed records) against `header`: framing, offset
/// deltas, count, no trailing bytes, and maxTimestamp.
fn check_records(bytes: &[u8], header: &BatchHeader<'_>, limits: &BatchLimits) -> Result<(), BatchError> {
    let count = header.record_count();
    let bounds = limits.timestamps.filter(|_| !header.is_log_append_time());
    {
        let base_ts = header.base_timestamp();
        let mut max_ts = i64::MIN;
        let mut found: i32 = 0;
        let mut pos = HEADER_LEN;
        while found < count {
            let (record, next) = parse_record(bytes, pos, found)?;
            if record.offset_delta != found {
                return Err(BatchError::OffsetDeltaMismatch { index: found, delta: record.offset_delta });
            }
            if limits.require_keys && record.key.is_none() {
                return Err(BatchError::MissingKey { index: found });
            }
            let ts = base_ts.wrapping_add(record.timestamp_delta);
            if let Some((earliest, latest)) = bounds
                && !(earliest..=latest).contains(&ts)
            {
                return Err(BatchError::TimestampOutOfRange { index: found, timestamp: ts, earliest, latest });
            }
            max_ts = max_ts.max(ts);
            found += 1;
            pos = next;
        }
        if pos != bytes.len() {
            return Err(BatchError::TrailingBytes(bytes.len() - pos));
        }
        if !header.is_log_append_time() && max_ts != header.max_timestamp() {
            return Err(BatchError::TimestampMismatch { declared: header.max_timestamp(), actual: max_ts });
        }
        Ok(())
    }
}

impl RecordBatch {
    /// Checks what is needed to trust a stored batch's framing and contents:
    /// the header is present, `batchLength` matches, magic is 2 and the CRC
    /// is right. Used when reading back from disk and by clients on fetch.
    pub fn check_framing(bytes: Bytes) -> Result<RecordBatch, BatchError> {
        check_framing_slice(&bytes)?;
        Ok(RecordBatch { bytes })
    }

    /// This batch stamped with the broker's time, as Kafka does for a topic
    /// with `message.timestamp.type = LogAppendTime`: the timestamp-type
    /// attribute set, maxTimestamp `now_ms` (which every record then
    /// reports), and the CRC recomputed. A copy of the batch.
    pub fn with_log_append_time(&self, now_ms: i64) -> RecordBatch {
        let mut v = self.bytes.to_vec();
        let attributes = i16_at(&v, ATTRIBUTES) | TIMESTAMP_TYPE_BIT;
        v[ATTRIBUTES..ATTRIBUTES + 2].copy_from_slice(&attributes.to_be_bytes());
        v[MAX_TIMESTAMP..MAX_TIMESTAMP + 8].copy_from_slice(&now_ms.to_be_bytes());
        let crc = compute_crc(&v);
        v[CRC..CRC + 4].copy_from_slice(&crc.to_be_bytes());
        RecordBatch { bytes: v.into() }
    }

    /// The header.
    pub fn header(&self) -> BatchHeader<'_> {
        BatchHeader(&self.bytes[..HEADER_LEN])
    }

    /// The encoded batch.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// Gives back the encoded batch.
    pub fn into_bytes(self) -> Bytes {
        self.bytes
    }

    /// Size of the encoded batch.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Never true for a validated batch; present for API symmetry.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Iterates the records, decompressing a compressed batch first (up to
    /// [`MAX_UNCOMPRESSED_BYTES`]); the records of an uncompressed batch are
    /// slices of it.
    pub fn records(&self) -> Result<Records, BatchError> {
        let header = self.header();
        let bytes = match Compression::from_attributes(header.attributes())? {
            Compression::None => self.bytes.clone(),
            _ => self.decompressed(MAX_UNCOMPRESSED_BYTES)?,
        };
        Ok(Records {
            bytes,
            pos: HEADER_LEN,
            index: 0,
            remaining_count: header.record_count().max(0),
            base_offset: header.base_offset(),
            base_timestamp: header.base_timestamp(),
            append_time: header.is_log_append_time().then(|| header.max_timestamp()),
        })
    }
}

/// A record inside a batch, its key, value and headers sliced from the batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Offset of the record (batch base offset + offset delta).
    pub offset: i64,
    /// Offset delta within the batch.
    pub offset_delta: i32,
    /// Timestamp delta from the batch base timestamp.
    pub timestamp_delta: i64,
    /// Record timestamp (append time for LogAppendTime batches).
    pub timestamp: i64,
    /// Key, or `None` for a null key.
    pub key: Option<Bytes>,
    /// Value, or `None` for a null value (a tombstone).
    pub value: Option<Bytes>,
    /// Encoded headers; iterate with [`Record::headers`].
    headers: RawHeaders,
}

impl Record {
    /// Iterates `(key, value)` headers. Header keys that are not UTF-8 are
    /// reported as errors.
    pub fn headers(&self) -> HeaderIter {
        self.headers.iter()
    }

    /// Number of headers.
    pub fn header_count(&self) -> usize {
        self.headers.len()
    }

    /// The encoded headers, to iterate later (a slice of the batch).
    pub fn raw_headers(&self) -> RawHeaders {
        self.headers.clone()
    }
}

/// A record's encoded headers, kept as a slice of its batch and decoded only
/// when iterated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RawHeaders {
    bytes: Bytes,
    count: i32,
}

impl RawHeaders {
    /// Iterates `(key, value)` headers.
    pub fn iter(&self) -> HeaderIter {
        HeaderIter { bytes: self.bytes.clone(), pos: 0, left: self.count }
    }

    /// Number of headers.
    pub fn len(&self) -> usize {
        usize::try_from(self.count).unwrap_or(0)
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.count <= 0
    }
}

/// Iterator over a record's headers: `(key, value)`.
pub struct HeaderIter {
    bytes: Bytes,
    pos: usize,
    left: i32,
}

impl Iterator for HeaderIter {
    type Item = Result<(Bytes, Option<Bytes>), BatchError>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.left <= 0 {
            return None;
        }
        self.left -= 1;
        let bad = |what| Err(BatchError::MalformedRecord { index: -1, what });
        let Some((key, after_key)) = read_field(&self.bytes, self.pos) else {
            self.left = 0;
            return Some(bad("header key overruns the record"));
        };
        let Some(key) = key else {
            self.left = 0;
            return Some(bad("null header key"));
        };
        let Some((value, after_value)) = read_field(&self.bytes, after_key) else {
            self.left = 0;
            return Some(bad("header value overruns the record"));
        };
        self.pos = after_value;
        Some(Ok((key, value)))
    }
}

/// Reads a varint-length-prefixed field at `pos` of `buf`: `(range, next_pos)`,
/// the range `None` for a null field (length -1). `None` when it overruns `buf`.
fn field_range(buf: &[u8], pos: usize) -> Option<(Option<std::ops::Range<usize>>, usize)> {
    let (len, n) = get_varint(buf.get(pos..)?)?;
    let start = pos + n;
    if len == -1 {
        return Some((None, start));
    }
    let len = usize::try_from(len).ok()?;
    let end = start.checked_add(len)?;
    if end > buf.len() {
        return None;
    }
    Some((Some(start..end), end))
}

/// [`field_range`] as a zero-copy slice of `bytes`.
fn read_field(bytes: &Bytes, pos: usize) -> Option<(Option<Bytes>, usize)> {
    let (range, next) = field_range(bytes, pos)?;
    Some((range.map(|r| bytes.slice(r)), next))
}

/// Where one record's fields lie in its batch.
struct RawRecord {
    offset_delta: i32,
    timestamp_delta: i64,
    key: Option<std::ops::Range<usize>>,
    value: Option<std::ops::Range<usize>>,
    headers: std::ops::Range<usize>,
    header_count: i32,
}

/// The producer fields of a batch as Kafka's broker checks them: no
/// producer (id -1) means no sequence; a producer id needs a sequence and an
/// epoch; a transactional batch needs a producer id.
fn check_producer_fields(header: &BatchHeader<'_>) -> Result<(), BatchError> {
    let (producer_id, producer_epoch, base_sequence) =
        (header.producer_id(), header.producer_epoch(), header.base_sequence());
    let why = if producer_id < -1 {
        Some("a producer id is -1 (none) or at least 0")
    } else if producer_id == -1 && base_sequence != -1 {
        Some("a base sequence without a producer id")
    } else if producer_id >= 0 && base_sequence < 0 {
        Some("a producer id without a base sequence")
    } else if producer_id >= 0 && producer_epoch < 0 {
        Some("a producer id needs an epoch of at least 0")
    } else if header.is_transactional() && producer_id < 0 {
        Some("a transactional batch needs a producer id")
    } else {
        None
    };
    match why {
        Some(why) => Err(BatchError::ProducerFields { producer_id, producer_epoch, base_sequence, why }),
        None => Ok(()),
    }
}

/// Parses the record at `pos` of `batch` (the whole batch), checking that
/// every field lies inside the record's declared length. Returns the record
/// and the position after it. Borrows only: validation allocates nothing.
fn parse_record(batch: &[u8], pos: usize, index: i32) -> Result<(RawRecord, usize), BatchError> {
    let bad = |what| BatchError::MalformedRecord { index, what };
    let (len, n) = get_varint(batch.get(pos..).unwrap_or_default()).ok_or(bad("bad record length"))?;
    let len = usize::try_from(len).map_err(|_| bad("negative record length"))?;
    let start = pos + n;
    let end = start.checked_add(len).filter(|&e| e <= batch.len()).ok_or(bad("record overruns the batch"))?;
    let body = &batch[..end];
    let mut p = start + 1; // attributes: one unused byte
    if p > end {
        return Err(bad("record too short"));
    }
    let (timestamp_delta, n) = get_varlong(&body[p..]).ok_or(bad("bad timestamp delta"))?;
    p += n;
    let (offset_delta, n) = get_varint(&body[p..]).ok_or(bad("bad offset delta"))?;
    p += n;
    let (key, p) = field_range(body, p).ok_or(bad("key overruns the record"))?;
    let (value, p) = field_range(body, p).ok_or(bad("value overruns the record"))?;
    let (header_count, n) = get_varint(&body[p..]).ok_or(bad("bad header count"))?;
    if header_count < 0 {
        return Err(bad("negative header count"));
    }
    let headers_start = p + n;
    let mut hp = headers_start;
    for _ in 0..header_count {
        let (key, next) = field_range(body, hp).ok_or(bad("header key overruns the record"))?;
        let Some(key) = key else {
            return Err(bad("null header key"));
        };
        if std::str::from_utf8(&body[key]).is_err() {
            return Err(BatchError::HeaderKeyNotUtf8 { index });
        }
        let (_, next) = field_range(body, next).ok_or(bad("header value overruns the record"))?;
        hp = next;
    }
    if hp != end {
        return Err(bad("record length does not match its fields"));
    }
    let raw = RawRecord { offset_delta, timestamp_delta, key, value, headers: headers_start..end, header_count };
    Ok((raw, end))
}

/// Iterator over the records of an uncompressed batch.
pub struct Records {
    bytes: Bytes,
    pos: usize,
    index: i32,
    remaining_count: i32,
    base_offset: i64,
    base_timestamp: i64,
    append_time: Option<i64>,
}

impl Records {
    fn parse_one(&mut self) -> Result<Record, BatchError> {
        let (raw, end) = parse_record(&self.bytes, self.pos, self.index)?;
        self.pos = end;
        Ok(Record {
            offset: self.base_offset + i64::from(raw.offset_delta),
            offset_delta: raw.offset_delta,
            timestamp_delta: raw.timestamp_delta,
            timestamp: self.append_time.unwrap_or(self.base_timestamp.wrapping_add(raw.timestamp_delta)),
            key: raw.key.map(|r| self.bytes.slice(r)),
            value: raw.value.map(|r| self.bytes.slice(r)),
            headers: RawHeaders { bytes: self.bytes.slice(raw.headers), count: raw.header_count },
        })
    }
}

impl Iterator for Records {
    type Item = Result<Record, BatchError>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining_count == 0 {
            return None;
        }
        self.remaining_count -= 1;
        let result = self.parse_one();
        self.index += 1;
        if result.is_err() {
            self.remaining_count = 0;
        }
        Some(result)
    }
}

/// A header to encode: a UTF-8 key and an optional value.
#[derive(Clone, Copy, Debug)]
pub struct HeaderRef<'a> {
    /// Header key.
    pub key: &'a str,
    /// Header value, or `None` for null.
    pub value: Option<&'a [u8]>,
}

/// A record to encode.
#[derive(Clone, Copy, Debug, Default)]
pub struct RecordRef<'a> {
    /// Record timestamp in milliseconds since the epoch.
    pub timestamp: i64,
    /// Key, or `None` for a null key.
    pub key: Option<&'a [u8]>,
    /// Value, or `None` for a null value.
    pub value: Option<&'a [u8]>,
    /// Headers.
    pub headers: &'a [HeaderRef<'a>],
}

fn field_len(field: Option<&[u8]>) -> usize {
    match field {
        None => varint_len(-1),
        Some(b) => varint_len(len_i32(b.len())) + b.len(),
    }
}

fn len_i32(len: usize) -> i32 {
    i32::try_from(len).unwrap_or(i32::MAX)
}

fn put_field(out: &mut Vec<u8>, field: Option<&[u8]>) {
    match field {
        None => put_varint(out, -1),
        Some(b) => {
            put_varint(out, len_i32(b.len()));
            out.extend_from_slice(b);
        }
    }
}

/// Encodes records into one uncompressed v2 batch.
///
/// ```
/// use tally_proto::batch::{BatchBuilder, RecordRef, RecordBatch, BatchLimits};
/// let mut b = BatchBuilder::new();
/// b.push(&RecordRef { timestamp: 1_700_000_000_000, key: Some(b"k"), value: Some(b"v"), headers: &[] });
/// let batch = RecordBatch::validate(b.finish(), &BatchLimits::default()).unwrap();
/// assert_eq!(batch.header().record_count(), 1);
/// ```
pub struct BatchBuilder {
    buf: Vec<u8>,
    compression: Compression,
    count: i32,
    base_timestamp: i64,
    max_timestamp: i64,
    producer_id: i64,
    producer_epoch: i16,
    base_sequence: i32,
}

impl Default for BatchBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl BatchBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self::with_capacity(1024)
    }

    /// An empty builder whose buffer holds `bytes` without growing.
    pub fn with_capacity(bytes: usize) -> Self {
        let mut buf = Vec::with_capacity(bytes.max(HEADER_LEN));
        buf.resize(HEADER_LEN, 0);
        BatchBuilder {
            buf,
            compression: Compression::None,
            count: 0,
            base_timestamp: 0,
            max_timestamp: i64::MIN,
            producer_id: NO_PRODUCER_ID,
            producer_epoch: -1,
            base_sequence: -1,
        }
    }

    /// Sets the idempotent-producer fields.
    pub fn set_producer(&mut self, producer_id: i64, producer_epoch: i16, base_sequence: i32) {
        self.producer_id = producer_id;
        self.producer_epoch = producer_epoch;
        self.base_sequence = base_sequence;
    }

    /// Bytes `record` adds to the batch.
    pub fn encoded_record_len(&self, record: &RecordRef<'_>) -> usize {
        let body = self.body_len(record, self.count);
        varint_len(len_i32(body)) + body
    }

    fn body_len(&self, record: &RecordRef<'_>, offset_delta: i32) -> usize {
        let ts_delta = if self.count == 0 { 0 } else { record.timestamp.wrapping_sub(self.base_timestamp) };
        let mut len = 1 + varlong_len(ts_delta) + varint_len(offset_delta);
        len += field_len(record.key) + field_len(record.value);
        len += varint_len(len_i32(record.headers.len()));
        for h in record.headers {
            len += field_len(Some(h.key.as_bytes())) + field_len(h.value);
        }
        len
    }

    /// Appends a record; returns its offset delta.
    pub fn push(&mut self, record: &RecordRef<'_>) -> i32 {
        if self.count == 0 {
            self.base_timestamp = record.timestamp;
        }
        let delta = self.count;
        let ts_delta = record.timestamp.wrapping_sub(self.base_timestamp);
        let body = self.body_len(record, delta);
        put_varint(&mut self.buf, len_i32(body));
        self.buf.push(0);
        put_varlong(&mut self.buf, ts_delta);
        put_varint(&mut self.buf, delta);
        put_field(&mut self.buf, record.key);
        put_field(&mut self.buf, record.value);
        put_varint(&mut self.buf, len_i32(record.headers.len()));
        for h in record.headers {
            put_field(&mut self.buf, Some(h.key.as_bytes()));
            put_field(&mut self.buf, h.value);
        }
        self.max_timestamp = self.max_timestamp.max(record.timestamp);
        self.count += 1;
        delta
    }

    /// Records pushed so far.
    pub fn record_count(&self) -> i32 {
        self.count
    }

    /// True when no record was pushed.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Encoded size so far, header included.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Writes the header and CRC and returns the batch. The base offset is 0
    /// and the leader epoch -1; the broker stamps both.
    pub fn finish(self) -> Bytes {
        self.finish_vec().into()
    }

    /// Compresses the records with `codec` when the batch is finished.
    pub fn set_compression(&mut self, codec: Compression) {
        self.compression = codec;
    }

    /// True when [`BatchBuilder::finish`] will compress the records.
    pub fn is_compressed(&self) -> bool {
        self.compression != Compression::None
    }

    /// Like [`BatchBuilder::finish`], returning the buffer.
    pub fn finish_vec(mut self) -> Vec<u8> {
        if self.compression != Compression::None {
            let packed = self.compression.compress(&self.buf[HEADER_LEN..]);
            self.buf.truncate(HEADER_LEN);
            self.buf.extend_from_slice(&packed);
        }
        let b = &mut self.buf;
        let batch_length = len_i32(b.len() - LOG_OVERHEAD);
        b[BASE_OFFSET..BASE_OFFSET + 8].copy_from_slice(&0i64.to_be_bytes());
        b[BATCH_LENGTH..BATCH_LENGTH + 4].copy_from_slice(&batch_length.to_be_bytes());
        b[PARTITION_LEADER_EPOCH..PARTITION_LEADER_EPOCH + 4].copy_from_slice(&NO_PARTITION_LEADER_EPOCH.to_be_bytes());
        b[MAGIC_AT] = MAGIC as u8;
        b[ATTRIBUTES..ATTRIBUTES + 2].copy_from_slice(&self.compression.attribute_bits().to_be_bytes());
        b[LAST_OFFSET_DELTA..LAST_OFFSET_DELTA + 4].copy_from_slice(&(self.count - 1).to_be_bytes());
        b[BASE_TIMESTAMP..BASE_TIMESTAMP + 8].copy_from_slice(&self.base_timestamp.to_be_bytes());
        let max_ts = if self.count == 0 { self.base_timestamp } else { self.max_timestamp };
        b[MAX_TIMESTAMP..MAX_TIMESTAMP + 8].copy_from_slice(&max_ts.to_be_bytes());
        b[PRODUCER_ID..PRODUCER_ID + 8].copy_from_slice(&self.producer_id.to_be_bytes());
        b[PRODUCER_EPOCH..PRODUCER_EPOCH + 2].copy_from_slice(&self.producer_epoch.to_be_bytes());
        b[BASE_SEQUENCE..BASE_SEQUENCE + 4].copy_from_slice(&self.base_sequence.to_be_bytes());
        b[RECORD_COUNT..RECORD_COUNT + 4].copy_from_slice(&self.count.to_be_bytes());
        let crc = compute_crc(b);
        b[CRC..CRC + 4].copy_from_slice(&crc.to_be_bytes());
        self.buf
    }
}

/// Splits a buffer of concatenated batches (a Produce or Fetch payload) into
/// batches. Each item is checked with [`RecordBatch::check_framing`] (length,
/// magic, CRC); iteration stops after the first error.
pub struct BatchIter {
    bytes: Bytes,
    failed: bool,
}

impl BatchIter {
    /// Iterates the batches in `bytes`.
    pub fn new(bytes: Bytes) -> Self {
        BatchIter { bytes, failed: false }
    }
}

impl Iterator for BatchIter {
    type Item = Result<RecordBatch, BatchError>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.bytes.is_empty() {
            return None;
        }
        let result = match batch_size_at(&self.bytes) {
            Some(size) if size >= HEADER_LEN && size <= self.bytes.len() => {
                RecordBatch::check_framing(self.bytes.split_to(size))
            }
            Some(size) if size >= HEADER_LEN => {
                Err(BatchError::Truncated { needed: size, available: self.bytes.len() })
            }
            Some(size) => Err(BatchError::LengthMismatch { declared: size as i64, actual: self.bytes.len() }),
            None => Err(BatchError::Truncated { needed: LOG_OVERHEAD, available: self.bytes.len() }),
        };
        self.failed = result.is_err();
        Some(result)
    }
}

/// Splits a buffer of concatenated batches into single-batch slices without
/// checking them (validation comes next). Fails on a length that does not fit.
pub fn split_batches(bytes: &Bytes) -> Result<Vec<Bytes>, BatchError> {
    let mut out = Vec::new();
    let mut rest = bytes.clone();
    while !rest.is_empty() {
        match batch_size_at(&rest) {
            Some(size) if (HEADER_LEN..=rest.len()).contains(&size) => out.push(rest.split_to(size)),
            Some(size) => {
                return Err(BatchError::Truncated { needed: size.max(HEADER_LEN), available: rest.len() });
            }
            None => {
                return Err(BatchError::Truncated { needed: LOG_OVERHEAD, available: rest.len() });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    type Rec = (i64, Option<Vec<u8>>, Option<Vec<u8>>, Vec<(String, Option<Vec<u8>>)>);

    fn build(records: &[Rec]) -> Bytes {
        let mut b = BatchBuilder::new();
        for (ts, k, v, hs) in records {
            let headers: Vec<HeaderRef<'_>> =
                hs.iter().map(|(k, v)| HeaderRef { key: k, value: v.as_deref() }).collect();
            b.push(&RecordRef { timestamp: *ts, key: k.as_deref(), value: v.as_deref(), headers: &headers });
        }
        b.finish()
    }

    #[test]
    fn header_fields_are_where_kafka_puts_them() {
        let bytes = build(&[(1000, Some(b"k".to_vec()), Some(b"v".to_vec()), vec![]), (990, None, None, vec![])]);
        let h = BatchHeader::new(&bytes).unwrap();
        assert_eq!(h.base_offset(), 0);
        assert_eq!(h.total_size(), bytes.len() as i64);
        assert_eq!(h.partition_leader_epoch(), -1);
        assert_eq!(h.magic(), 2);
        assert_eq!(h.last_offset_delta(), 1);
        assert_eq!(h.base_timestamp(), 1000);
        assert_eq!(h.max_timestamp(), 1000);
        assert_eq!(h.producer_id(), -1);
        assert_eq!(h.record_count(), 2);
        assert_eq!(h.crc(), crc32c::crc32c(&bytes[21..]));
    }

    #[test]
    fn patching_offset_and_epoch_keeps_the_crc_valid() {
        let bytes = build(&[(5, None, Some(b"x".to_vec()), vec![])]);
        let mut v = bytes.to_vec();
        set_base_offset(&mut v, 42);
        set_partition_leader_epoch(&mut v, 7);
        let batch = RecordBatch::validate(Bytes::from(v), &BatchLimits::default()).unwrap();
        assert_eq!(batch.header().base_offset(), 42);
        assert_eq!(batch.header().partition_leader_epoch(), 7);
        assert_eq!(batch.records().unwrap().next().unwrap().unwrap().offset, 42);
    }

    #[test]
    fn oversized_batch_is_refused_with_its_size() {
        let bytes = build(&[(5, None, Some(vec![0u8; 500]), vec![])]);
        let err = RecordBatch::validate(bytes.clone(), &BatchLimits { max_batch_bytes: 100, ..BatchLimits::default() })
            .unwrap_err();
        assert_eq!(err, BatchError::TooLarge { size: bytes.len(), max: 100 });
    }

    #[test]
    fn wrong_magic_and_truncation_are_named() {
        let bytes = build(&[(5, None, Some(b"x".to_vec()), vec![])]);
        let mut v = bytes.to_vec();
        v[16] = 1;
        assert_eq!(
            RecordBatch::validate(Bytes::from(v), &BatchLimits::default()).unwrap_err(),
            BatchError::BadMagic(1)
        );
        let short = bytes.slice(..bytes.len() - 1);
        assert!(matches!(
            RecordBatch::validate(short, &BatchLimits::default()),
            Err(BatchError::LengthMismatch { .. })
        ));
        assert!(matches!(
            RecordBatch::validate(bytes.slice(..10), &BatchLimits::default()),
            Err(BatchError::Truncated { .. })
        ));
    }

    #[test]
    fn record_count_lie_is_caught_even_with_a_fixed_crc() {
        let bytes = build(&[(5, None, Some(b"x".to_vec()), vec![]), (6, None, None, vec![])]);
        let mut v = bytes.to_vec();
        v[RECORD_COUNT..RECORD_COUNT + 4].copy_from_slice(&3i32.to_be_bytes());
        v[LAST_OFFSET_DELTA..LAST_OFFSET_DELTA + 4].copy_from_slice(&2i32.to_be_bytes());
        let crc = compute_crc(&v);
        v[CRC..CRC + 4].copy_from_slice(&crc.to_be_bytes());
        let err = RecordBatch::validate(Bytes::from(v), &BatchLimits::default()).unwrap_err();
        assert!(matches!(err, BatchError::MalformedRecord { index: 2, .. }), "{err}");
    }

    /// `bytes` with `patch` applied and the CRC made right again.
    fn patched(bytes: &Bytes, patch: impl FnOnce(&mut Vec<u8>)) -> Bytes {
        let mut v = bytes.to_vec();
        patch(&mut v);
        let crc = compute_crc(&v);
        v[CRC..CRC + 4].copy_from_slice(&crc.to_be_bytes());
        Bytes::from(v)
    }

    #[test]
    fn a_control_batch_from_a_client_is_refused() {
        let bytes = build(&[(5, None, Some(b"x".to_vec()), vec![])]);
        let control = patched(&bytes, |v| v[ATTRIBUTES + 1] |= CONTROL_BIT as u8);
        let err = RecordBatch::validate(control, &BatchLimits::default()).unwrap_err();
        assert_eq!(err, BatchError::ControlBatch);
        assert!(err.to_string().contains("only the broker"), "{err}");
    }

    #[test]
    fn contradictory_producer_fields_are_refused() {
        let bytes = build(&[(5, None, Some(b"x".to_vec()), vec![])]);
        let with = |pid: i64, epoch: i16, seq: i32, transactional: bool| {
            patched(&bytes, |v| {
                v[PRODUCER_ID..PRODUCER_ID + 8].copy_from_slice(&pid.to_be_bytes());
                v[PRODUCER_EPOCH..PRODUCER_EPOCH + 2].copy_from_slice(&epoch.to_be_bytes());
                v[BASE_SEQUENCE..BASE_SEQUENCE + 4].copy_from_slice(&seq.to_be_bytes());
                if transactional {
                    v[ATTRIBUTES + 1] |= TRANSACTIONAL_BIT as u8;
                }
            })
        };
        let limits = BatchLimits::default();
        for (pid, epoch, seq, txn) in
            [(7, 0, -1, false), (-1, -1, 0, false), (7, -1, 0, false), (-5, 0, 0, false), (-1, -1, -1, true)]
        {
            let err = RecordBatch::validate(with(pid, epoch, seq, txn), &limits).unwrap_err();
            assert!(matches!(err, BatchError::ProducerFields { .. }), "({pid}, {epoch}, {seq}, {txn}): {err}");
        }
        for (pid, epoch, seq, txn) in [(-1, -1, -1, false), (7, 0, 0, false), (7, 3, 100, true)] {
            assert!(
                RecordBatch::validate(with(pid, epoch, seq, txn), &limits).is_ok(),
                "({pid}, {epoch}, {seq}, {txn})"
            );
        }
    }

    #[test]
    fn a_header_key_that_is_not_utf8_is_refused() {
        let good = build(&[(5, None, Some(b"x".to_vec()), vec![("ké".to_string(), Some(b"v".to_vec()))])]);
        assert!(RecordBatch::validate(good.clone(), &BatchLimits::default()).is_ok(), "UTF-8 keys pass");
        // Overwrite the key's two UTF-8 bytes with an invalid sequence (same length).
        let at = good.windows(3).position(|w| w == b"k\xc3\xa9").unwrap() + 1;
        let bad = patched(&good, |v| v[at..at + 2].copy_from_slice(&[0xff, 0xfe]));
        let err = RecordBatch::validate(bad, &BatchLimits::default()).unwrap_err();
        assert_eq!(err, BatchError::HeaderKeyNotUtf8 { index: 0 });
    }

    fn compressed(codec: Compression, values: &[&[u8]]) -> Bytes {
        let mut b = BatchBuilder::new();
        b.set_compression(codec);
        for (i, v) in values.iter().enumerate() {
            b.push(&RecordRef { timestamp: 100 + i as i64, value: Some(v), ..Default::default() });
        }
        b.finish()
    }

    /// `bytes` with its records replaced by `records` compressed with the
    /// batch's codec, and the CRC fixed.
    fn with_records(bytes: &Bytes, codec: Compression, records: &[u8]) -> Bytes {
        let mut v = bytes[..HEADER_LEN].to_vec();
        v.extend_from_slice(&codec.compress(records));
        let len = (v.len() - LOG_OVERHEAD) as i32;
        v[BATCH_LENGTH..BATCH_LENGTH + 4].copy_from_slice(&len.to_be_bytes());
        let crc = compute_crc(&v);
        v[CRC..CRC + 4].copy_from_slice(&crc.to_be_bytes());
        Bytes::from(v)
    }

    const CODECS: [Compression; 4] = [Compression::Gzip, Compression::Snappy, Compression::Lz4, Compression::Zstd];

    #[test]
    fn a_compressed_batch_is_validated_like_a_plain_one_stored_as_sent_and_iterated() {
        let values: Vec<Vec<u8>> = (0..50).map(|i| format!("value {i} ").repeat(10).into_bytes()).collect();
        let refs: Vec<&[u8]> = values.iter().map(Vec::as_slice).collect();
        for codec in CODECS {
            let bytes = compressed(codec, &refs);
            assert_eq!(bytes[ATTRIBUTES + 1] & 7, codec.attribute_bits() as u8);
            let batch = RecordBatch::validate(bytes.clone(), &BatchLimits::default()).unwrap();
            assert_eq!(batch.bytes(), &bytes, "{codec}: the client's bytes are kept");
            let read: Vec<Vec<u8>> = batch.records().unwrap().map(|r| r.unwrap().value.unwrap().to_vec()).collect();
            assert_eq!(read, values, "{codec}");
        }
    }

    #[test]
    fn compressed_records_that_lie_are_refused_as_plain_ones_would_be() {
        let plain = build(&[(5, None, Some(b"a".to_vec()), vec![]), (7, None, Some(b"b".to_vec()), vec![])]);
        for codec in CODECS {
            let good = with_records(&plain, codec, &plain[HEADER_LEN..]);
            let mut v = good.to_vec();
            v[ATTRIBUTES + 1] |= codec.attribute_bits() as u8;
            let crc = compute_crc(&v);
            v[CRC..CRC + 4].copy_from_slice(&crc.to_be_bytes());
            let good = Bytes::from(v);
            assert!(RecordBatch::validate(good.clone(), &BatchLimits::default()).is_ok(), "{codec}");
            // One record fewer than the header counts.
            let short = with_records(&good, codec, &plain[HEADER_LEN..plain.len() - 1]);
            assert!(RecordBatch::validate(short, &BatchLimits::default()).is_err(), "{codec}: a torn record");
            // Not the codec's format at all.
            let mut v = good[..HEADER_LEN].to_vec();
            v.extend_from_slice(b"this is not compressed data");
            let len = (v.len() - LOG_OVERHEAD) as i32;
            v[BATCH_LENGTH..BATCH_LENGTH + 4].copy_from_slice(&len.to_be_bytes());
            let crc = compute_crc(&v);
            v[CRC..CRC + 4].copy_from_slice(&crc.to_be_bytes());
            let e = RecordBatch::validate(Bytes::from(v), &BatchLimits::default()).unwrap_err();
            assert!(matches!(e, BatchError::Decompression { .. }), "{codec}: {e}");
            // Trailing garbage after the records.
            let mut records = plain[HEADER_LEN..].to_vec();
            records.extend_from_slice(b"junk");
            let trailing = with_records(&good, codec, &records);
            assert!(matches!(
                RecordBatch::validate(trailing, &BatchLimits::default()),
                Err(BatchError::TrailingBytes(4))
            ));
        }
    }

    #[test]
    fn a_compressed_batch_that_decompresses_past_the_limit_is_refused() {
        let zeros = vec![0u8; 4 << 20];
        for codec in CODECS {
            let bytes = compressed(codec, &[&zeros]);
            let limits =
                BatchLimits { max_batch_bytes: 1 << 20, max_uncompressed_bytes: 1 << 20, ..BatchLimits::default() };
            let e = RecordBatch::validate(bytes, &limits).unwrap_err();
            assert!(matches!(e, BatchError::DecompressedTooLarge { limit: 1_048_576 }), "{codec}: {e}");
        }
    }

    #[test]
    fn an_unknown_codec_is_refused() {
        let bytes = build(&[(5, None, Some(b"x".to_vec()), vec![])]);
        let mut v = bytes.to_vec();
        v[ATTRIBUTES + 1] |= 5;
        let crc = compute_crc(&v);
        v[CRC..CRC + 4].copy_from_slice(&crc.to_be_bytes());
        let e = RecordBatch::validate(Bytes::from(v), &BatchLimits::default()).unwrap_err();
        assert_eq!(e, BatchError::UnknownCompression(5));
    }

    #[test]
    fn batch_iter_splits_concatenated_batches_and_stops_at_garbage() {
        let a = build(&[(1, None, Some(b"a".to_vec()), vec![])]);
        let b = build(&[(2, None, Some(b"b".to_vec()), vec![])]);
        let mut all = a.to_vec();
        all.extend_from_slice(&b);
        all.extend_from_slice(&[0u8; 5]);
        let items: Vec<_> = BatchIter::new(Bytes::from(all)).collect();
        assert_eq!(items.len(), 3);
        assert!(items[0].is_ok() && items[1].is_ok() && items[2].is_err());
    }

    fn arb_field() -> impl Strategy<Value = Option<Vec<u8>>> {
        prop_oneof![1 => Just(None), 4 => proptest::collection::vec(any::<u8>(), 0..300).prop_map(Some)]
    }

    fn arb_record() -> impl Strategy<Value = Rec> {
        (
            prop_oneof![Just(0i64), -1i64..=1, any::<i64>().prop_map(|t| t >> 2)],
            arb_field(),
            arb_field(),
            proptest::collection::vec(("[a-z]{0,12}", arb_field()), 0..4),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

        #[test]
        fn records_round_trip(records in proptest::collection::vec(arb_record(), 1..20)) {
            let bytes = build(&records);
            let batch = RecordBatch::validate(bytes, &BatchLimits { max_batch_bytes: usize::MAX, ..BatchLimits::default() }).unwrap();
            let decoded: Vec<Record> = batch.records().unwrap().map(|r| r.unwrap()).collect();
            prop_assert_eq!(decoded.len(), records.len());
            for (i, (rec, (ts, k, v, hs))) in decoded.iter().zip(&records).enumerate() {
                prop_assert_eq!(rec.offset, i as i64);
                prop_assert_eq!(rec.timestamp, *ts);
                prop_assert_eq!(rec.key.as_deref(), k.as_deref());
                prop_assert_eq!(rec.value.as_deref(), v.as_deref());
                let got: Vec<(Bytes, Option<Bytes>)> = rec.headers().map(|h| h.unwrap()).collect();
                prop_assert_eq!(got.len(), hs.len());
                for ((gk, gv), (hk, hv)) in got.iter().zip(hs) {
                    prop_assert_eq!(gk.as_ref(), hk.as_bytes());
                    prop_assert_eq!(gv.as_deref(), hv.as_deref());
                }
            }
        }

        #[test]
        fn every_codec_round_trips_arbitrary_records(
            records in proptest::collection::vec(arb_record(), 1..20),
            codec in proptest::sample::select(CODECS.to_vec()),
        ) {
            let plain = build(&records);
            let mut b = BatchBuilder::new();
            b.set_compression(codec);
            for (ts, k, v, hs) in &records {
                let headers: Vec<HeaderRef<'_>> =
                    hs.iter().map(|(k, v)| HeaderRef { key: k, value: v.as_deref() }).collect();
                b.push(&RecordRef { timestamp: *ts, key: k.as_deref(), value: v.as_deref(), headers: &headers });
            }
            let packed = b.finish();
            let batch = RecordBatch::validate(packed.clone(), &BatchLimits::default()).unwrap();
            prop_assert_eq!(batch.bytes(), &packed, "stored as sent");
            let decoded: Vec<Record> = batch.records().unwrap().map(|r| r.unwrap()).collect();
            let expected: Vec<Record> = RecordBatch::validate(plain, &BatchLimits::default())
                .unwrap()
                .records()
                .unwrap()
                .map(|r| r.unwrap())
                .collect();
            prop_assert_eq!(decoded, expected, "{} decodes to the records a plain batch holds", codec);
        }

        #[test]
        fn a_mutated_compressed_payload_is_refused_or_holds_valid_records(
            records in proptest::collection::vec(arb_record(), 1..8),
            codec in proptest::sample::select(CODECS.to_vec()),
            at in any::<prop::sample::Index>(),
            flip in 1u8..=255,
        ) {
            let mut b = BatchBuilder::new();
            b.set_compression(codec);
            for (ts, k, v, _) in &records {
                b.push(&RecordRef { timestamp: *ts, key: k.as_deref(), value: v.as_deref(), headers: &[] });
            }
            let mut v = b.finish().to_vec();
            let i = HEADER_LEN + at.index(v.len() - HEADER_LEN);
            v[i] ^= flip;
            let crc = compute_crc(&v);
            v[CRC..CRC + 4].copy_from_slice(&crc.to_be_bytes());
            // Never stored unreadable: accepted only if every record reads back.
            if let Ok(batch) = RecordBatch::validate(Bytes::from(v), &BatchLimits::default()) {
                let mut count = 0;
                for r in batch.records().unwrap() {
                    prop_assert!(r.is_ok(), "an accepted batch has a record that does not read");
                    count += 1;
                }
                prop_assert_eq!(count, batch.header().record_count());
            }
        }

    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

        #[test]
        fn every_single_bit_flip_is_caught(records in proptest::collection::vec(arb_record(), 1..4)) {
            let bytes = build(&records);
            // Bits in baseOffset (0..8) and partitionLeaderEpoch (12..16) are outside
            // the CRC by design; the broker overwrites them.
            for byte in (8..12).chain(16..bytes.len()) {
                for bit in 0..8 {
                    let mut v = bytes.to_vec();
                    v[byte] ^= 1 << bit;
                    prop_assert!(
                        RecordBatch::validate(Bytes::from(v), &BatchLimits { max_batch_bytes: usize::MAX, ..BatchLimits::default() }).is_err(),
                        "flip of bit {} in byte {} went unnoticed", bit, byte
                    );
                }
            }
        }

        #[test]
        fn validate_never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = RecordBatch::validate(Bytes::from(bytes.clone()), &BatchLimits::default());
            for item in BatchIter::new(Bytes::from(bytes)) {
                let _ = item;
            }
        }
    }

    #[test]
    fn a_compacted_topic_refuses_a_record_without_a_key() {
        let mut b = BatchBuilder::new();
        b.push(&RecordRef { timestamp: 1, key: Some(b"k"), value: Some(b"v"), headers: &[] });
        b.push(&RecordRef { timestamp: 1, key: None, value: Some(b"v"), headers: &[] });
        let bytes = b.finish();
        let limits = BatchLimits { require_keys: true, ..BatchLimits::default() };
        assert_eq!(RecordBatch::validate(bytes.clone(), &limits).unwrap_err(), BatchError::MissingKey { index: 1 });
        assert!(RecordBatch::validate(bytes, &BatchLimits::default()).is_ok());
    }
}
