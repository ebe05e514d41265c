//! Per-log settings, with Kafka's names and defaults where Kafka has them.

/// When appended data is forced to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushPolicy {
    /// Before an append is acknowledged (group commit shares one fsync among
    /// concurrent appends).
    Always,
    /// At most this many milliseconds after an append.
    IntervalMs(u64),
    /// Left to the operating system; checkpoints and segment rolls still sync.
    Os,
}

/// Settings of one partition log.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Roll to a new segment once the active one would exceed this size.
    /// Default 1 GiB; range 1 KiB ..= 2 GiB (positions are 32-bit).
    pub segment_bytes: u64,
    /// Roll once the active segment is this old. Default 7 days.
    pub segment_ms: i64,
    /// Delete closed segments whose newest record is older than this; `None`
    /// keeps them forever. Default 7 days.
    pub retention_ms: Option<i64>,
    /// Delete the oldest closed segments while the log is larger than this;
    /// `None` for no limit. Default none.
    pub retention_bytes: Option<u64>,
    /// Bytes of batches between two offset-index entries. Default 4096.
    pub index_interval_bytes: u64,
    /// Maximum size of each index file; the segment rolls when one fills.
    /// Default 10 MiB.
    pub segment_index_bytes: u64,
    /// When to fsync. Default [`FlushPolicy::Os`].
    pub flush: FlushPolicy,
    /// Check each batch's CRC again when reading it. Default false, as in
    /// Kafka: every batch was checked when appended (and the unflushed tail
    /// again by recovery), and every reader checks it again end to end (the
    /// client on fetch, a follower before appending), so checking on the
    /// broker's read path as well costs a CRC pass over every byte served
    /// and finds nothing those checks would miss.
    pub verify_on_read: bool,
    /// Write-behind window of the active segment: once a window of this many
    /// bytes is complete its writeback starts, and the window before it is
    /// waited for and dropped from the page cache. Bounds dirty and cached
    /// bytes per partition (and throttles a producer to the disk's pace);
    /// tail reads are served from the two newest windows. 0 leaves it all to
    /// the OS. Default 32 MiB; a multiple of 1 MiB.
    pub writeback_window_bytes: u64,
    /// Write-behind and drop-behind take pages out of the page cache only
    /// while free memory is below this percent (see `page_cache`): 100
    /// always drops, 0 never. Default 10.
    pub cache_min_free_percent: u8,
    /// Log compaction (`cleanup.policy` with `compact`); `None` for a log
    /// that only deletes by retention. Default `None`.
    pub compaction: Option<Compaction>,
    /// Most producers the producer-state table tracks; a new producer past
    /// it is refused. Default 10 000.
    pub max_producers: usize,
}

/// How a compacted log is cleaned, with Kafka's names and defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Compaction {
    /// `min.compaction.lag.ms`: nothing younger is cleaned. Default 0.
    pub min_lag_ms: i64,
    /// `max.compaction.lag.ms`: a log whose oldest uncleaned data is older
    /// is cleaned whatever its dirty ratio. Default `i64::MAX` (never).
    pub max_lag_ms: i64,
    /// `min.cleanable.dirty.ratio`: the share of uncleaned bytes that makes
    /// a log due for cleaning. Default 0.5.
    pub min_cleanable_dirty_ratio: f64,
    /// `delete.retention.ms`: how long a tombstone outlives the clean that
    /// first kept it. Default 1 day.
    pub delete_retention_ms: i64,
}

impl Default for Compaction {
    fn default() -> Self {
        Compaction {
            min_lag_ms: 0,
            max_lag_ms: i64::MAX,
            min_cleanable_dirty_ratio: 0.5,
            delete_retention_ms: 24 * 3600 * 1000,
        }
    }
}

impl Compaction {
    /// Every problem with these settings, or nothing.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.min_lag_ms < 0 {
            out.push(format!("min_compaction_lag_ms must be at least 0, got {}", self.min_lag_ms));
        }
        if self.max_lag_ms < 1 || self.max_lag_ms < self.min_lag_ms {
            out.push(format!(
                "max_compaction_lag_ms must be at least 1 and at least min_compaction_lag_ms ({}), got {}",
                self.min_lag_ms, self.max_lag_ms
            ));
        }
        if !(0.0..=1.0).contains(&self.min_cleanable_dirty_ratio) {
            out.push(format!(
                "min_cleanable_dirty_ratio must be between 0 and 1, got {}",
                self.min_cleanable_dirty_ratio
            ));
        }
        if self.delete_retention_ms < 0 {
            out.push(format!("delete_retention_ms must be at least 0, got {}", self.delete_retention_ms));
        }
        out
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            segment_bytes: 1 << 30,
            segment_ms: 7 * 24 * 3600 * 1000,
            retention_ms: Some(7 * 24 * 3600 * 1000),
            retention_bytes: None,
            index_interval_bytes: 4096,
            segment_index_bytes: 10 << 20,
            flush: FlushPolicy::Os,
            verify_on_read: false,
            writeback_window_bytes: 32 << 20,
            cache_min_free_percent: 10,
            compaction: None,
            max_producers: 10_000,
        }
    }
}

impl LogConfig {
    /// Largest allowed `segment_bytes`: positions are stored in 32 bits.
    pub const MAX_SEGMENT_BYTES: u64 = i32::MAX as u64;

    /// Every problem with this config, or nothing.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !(1024..=Self::MAX_SEGMENT_BYTES).contains(&self.segment_bytes) {
            out.push(format!(
                "segment_bytes must be in 1024..={}, got {}",
                Self::MAX_SEGMENT_BYTES,
                self.segment_bytes
            ));
        }
        if self.segment_ms <= 0 {
            out.push(format!("segment_ms must be positive, got {}", self.segment_ms));
        }
        if self.index_interval_bytes == 0 {
            out.push("index_interval_bytes must be positive".to_string());
        }
        if !self.writeback_window_bytes.is_multiple_of(1 << 20) {
            out.push(format!(
                "writeback_window_bytes must be a multiple of 1 MiB, got {}",
                self.writeback_window_bytes
            ));
        }
        if self.segment_index_bytes < 12 * 4 {
            out.push(format!("segment_index_bytes must be at least 48, got {}", self.segment_index_bytes));
        }
        if self.max_producers == 0 {
            out.push("max_producers must be at least 1".to_string());
        }
        if let Some(c) = &self.compaction {
            out.extend(c.problems());
        }
        out
    }
}
