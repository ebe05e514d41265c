//! Topic names and topic configs: validated once, then carried as types.

use std::collections::BTreeMap;

use crate::config::{LogDefaults, format_flush, parse_flush};
use crate::storage::LogConfig;

/// A topic name that follows Kafka's rules: 1 to 249 characters of
/// `[a-zA-Z0-9._-]`, and not `.` or `..`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicName(String);

impl TopicName {
    /// Longest allowed name.
    pub const MAX_LEN: usize = 249;

    /// Checks `name`; the error says what is wrong with it.
    pub fn new(name: &str) -> Result<TopicName, String> {
        if name.is_empty() {
            return Err("topic name is empty".to_string());
        }
        if name == "." || name == ".." {
            return Err(format!("topic name cannot be `{name}`"));
        }
        if name.len() > Self::MAX_LEN {
            return Err(format!("topic name is {} characters long; the limit is {}", name.len(), Self::MAX_LEN));
        }
        if let Some(bad) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
            return Err(format!(
                "topic name `{name}` contains `{bad}`; only ASCII letters, digits, `.`, `_` and `-` are allowed"
            ));
        }
        Ok(TopicName(name.to_string()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for TopicName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A config value that was refused, with the key it was given for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid value for `{key}`: {reason}")]
pub struct InvalidConfig {
    /// The key.
    pub key: String,
    /// Why.
    pub reason: String,
}

/// A topic's effective settings.
#[derive(Debug, Clone)]
pub struct TopicConfig {
    /// Settings of each partition's log.
    pub log: LogConfig,
    /// Largest batch accepted.
    pub max_message_bytes: u64,
    /// In-sync replicas needed for acks=all.
    pub min_insync_replicas: u32,
    /// Whether a replica outside the ISR and ELR may be elected.
    pub unclean_leader_election: bool,
    /// The broker stamps batches with its clock (`LogAppendTime`).
    pub log_append_time: bool,
    /// How far in the past a CreateTime record may be, in ms.
    pub message_timestamp_before_max_ms: i64,
    /// How far in the future a CreateTime record may be, in ms.
    pub message_timestamp_after_max_ms: i64,
}

impl TopicConfig {
    /// The record timestamps a CreateTime batch may carry at `now_ms`:
    /// `(earliest, latest)`, inclusive.
    pub fn timestamp_bounds(&self, now_ms: i64) -> (i64, i64) {
        (
            now_ms.saturating_sub(self.message_timestamp_before_max_ms),
            now_ms.saturating_add(self.message_timestamp_after_max_ms),
        )
    }
}

/// The only `compression_type` supported: keep what the producer sent.
const COMPRESSION_PRODUCER: &str = "producer";

/// Keys a topic config accepts (Kafka's names with `_`; `.` is accepted too).
pub const TOPIC_CONFIG_KEYS: &[&str] = &[
    "cleanup_policy",
    "compression_type",
    "flush",
    "index_interval_bytes",
    "max_message_bytes",
    "message_timestamp_after_max_ms",
    "message_timestamp_before_max_ms",
    "message_timestamp_type",
    "min_insync_replicas",
    "retention_bytes",
    "retention_ms",
    "segment_bytes",
    "segment_index_bytes",
    "segment_ms",
    "unclean_leader_election",
    "writeback_window_bytes",
];

/// `retention.ms` and `retention_ms` name the same key.
pub fn canonical_key(key: &str) -> String {
    key.trim().replace('.', "_")
}

fn defaults_map(d: &LogDefaults) -> BTreeMap<String, String> {
    [
        ("cleanup_policy", d.cleanup_policy.clone()),
        ("compression_type", d.compression_type.clone()),
        ("flush", d.flush.clone()),
        ("index_interval_bytes", d.index_interval_bytes.to_string()),
        ("max_message_bytes", d.max_message_bytes.to_string()),
        ("message_timestamp_after_max_ms", d.message_timestamp_after_max_ms.to_string()),
        ("message_timestamp_before_max_ms", d.message_timestamp_before_max_ms.to_string()),
        ("message_timestamp_type", d.message_timestamp_type.clone()),
        ("min_insync_replicas", d.min_insync_replicas.to_string()),
        ("retention_bytes", d.retention_bytes.to_string()),
        ("retention_ms", d.retention_ms.to_string()),
        ("segment_bytes", d.segment_bytes.to_string()),
        ("segment_index_bytes", d.segment_index_bytes.to_string()),
        ("segment_ms", d.segment_ms.to_string()),
        ("unclean_leader_election", d.unclean_leader_election.clone()),
        ("writeback_window_bytes", d.writeback_window_bytes.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn invalid(key: &str, reason: impl Into<String>) -> InvalidConfig {
    InvalidConfig { key: key.to_string(), reason: reason.into() }
}

fn num<T: std::str::FromStr>(map: &BTreeMap<String, String>, key: &str) -> Result<T, InvalidConfig> {
    map[key].trim().parse().map_err(|_| invalid(key, format!("`{}` is not a valid number", map[key])))
}

impl TopicConfig {
    /// The broker defaults as a topic config.
    pub fn from_defaults(defaults: &LogDefaults) -> Result<TopicConfig, InvalidConfig> {
        Self::with_overrides(defaults, &BTreeMap::new())
    }

    /// Defaults with `overrides` on top. Unknown keys and bad values are
    /// refused, naming the key.
    pub fn with_overrides(
        defaults: &LogDefaults,
        overrides: &BTreeMap<String, String>,
    ) -> Result<TopicConfig, InvalidConfig> {
        let mut map = defaults_map(defaults);
        for (k, v) in overrides {
            let key = canonical_key(k);
            if !TOPIC_CONFIG_KEYS.contains(&key.as_str()) {
                return Err(invalid(k, format!("unknown topic config; known keys: {}", TOPIC_CONFIG_KEYS.join(", "))));
            }
            map.insert(key, v.clone());
        }
        Self::parse(&map)
    }

    fn parse(map: &BTreeMap<String, String>) -> Result<TopicConfig, InvalidConfig> {
        let segment_bytes: u64 = num(map, "segment_bytes")?;
        if !(1024..=LogConfig::MAX_SEGMENT_BYTES).contains(&segment_bytes) {
            return Err(invalid("segment_bytes", format!("must be in 1024 ..= {}", LogConfig::MAX_SEGMENT_BYTES)));
        }
        let segment_ms: i64 = num(map, "segment_ms")?;
        if segment_ms <= 0 {
            return Err(invalid("segment_ms", "must be positive"));
        }
        let retention_ms: i64 = num(map, "retention_ms")?;
        if retention_ms < -1 {
            return Err(invalid("retention_ms", "must be -1 (forever) or at least 0"));
        }
        let retention_bytes: i64 = num(map, "retention_bytes")?;
        if retention_bytes < -1 {
            return Err(invalid("retention_bytes", "must be -1 (no limit) or at least 0"));
        }
        let index_interval_bytes: u64 = num(map, "index_interval_bytes")?;
        if index_interval_bytes == 0 {
            return Err(invalid("index_interval_bytes", "must be positive"));
        }
        let segment_index_bytes: u64 = num(map, "segment_index_bytes")?;
        if segment_index_bytes < 48 {
            return Err(invalid("segment_index_bytes", "must be at least 48"));
        }
        let max_message_bytes: u64 = num(map, "max_message_bytes")?;
        if max_message_bytes < tally_proto::batch::HEADER_LEN as u64 || max_message_bytes > (1 << 30) {
            return Err(invalid("max_message_bytes", "must be in 61 ..= 1 GiB"));
        }
        let writeback_window_bytes: u64 = num(map, "writeback_window_bytes")?;
        if !writeback_window_bytes.is_multiple_of(1 << 20) {
            return Err(invalid("writeback_window_bytes", "must be 0 or a multiple of 1 MiB (1048576)"));
        }
        let flush = parse_flush(&map["flush"]).map_err(|r| invalid("flush", r))?;
        let min_insync_replicas: u32 = num(map, "min_insync_replicas")?;
        if min_insync_replicas == 0 {
            return Err(invalid("min_insync_replicas", "must be at least 1"));
        }
        match map["compression_type"].trim() {
            COMPRESSION_PRODUCER => {}
            "none" | "gzip" | "snappy" | "lz4" | "zstd" | "uncompressed" => {
                return Err(invalid(
                    "compression_type",
                    "recompressing batches on the broker is not supported yet; use `producer` (store what the \
                     producer sent) and set the codec in the producer (`tally produce --compression`)",
                ));
            }
            other => {
                return Err(invalid(
                    "compression_type",
                    format!("`{other}` is not producer, none, gzip, snappy, lz4 or zstd"),
                ));
            }
        }
        let log_append_time = match map["message_timestamp_type"].trim() {
            "CreateTime" => false,
            "LogAppendTime" => true,
            other => {
                return Err(invalid("message_timestamp_type", format!("`{other}` is not CreateTime or LogAppendTime")));
            }
        };
        let message_timestamp_before_max_ms: i64 = num(map, "message_timestamp_before_max_ms")?;
        let message_timestamp_after_max_ms: i64 = num(map, "message_timestamp_after_max_ms")?;
        for (key, value) in [
            ("message_timestamp_before_max_ms", message_timestamp_before_max_ms),
            ("message_timestamp_after_max_ms", message_timestamp_after_max_ms),
        ] {
            if value < 0 {
                return Err(invalid(key, "must be at least 0"));
            }
        }
        let unclean_leader_election = match map["unclean_leader_election"].trim() {
            "true" => true,
            "false" => false,
            other => return Err(invalid("unclean_leader_election", format!("`{other}` is not `true` or `false`"))),
        };
        match map["cleanup_policy"].trim() {
            "delete" => {}
            "compact" | "compact,delete" | "delete,compact" => {
                return Err(invalid("cleanup_policy", "compaction is not supported yet; use `delete`"));
            }
            other => {
                return Err(invalid("cleanup_policy", format!("`{other}` is not `delete`")));
            }
        }
        Ok(TopicConfig {
            log: LogConfig {
                segment_bytes,
                segment_ms,
                retention_ms: (retention_ms >= 0).then_some(retention_ms),
                retention_bytes: u64::try_from(retention_bytes).ok(),
                index_interval_bytes,
                segment_index_bytes,
                flush,
                verify_on_read: true,
                writeback_window_bytes,
                compaction: None,
            },
            max_message_bytes,
            min_insync_replicas,
            unclean_leader_election,
            log_append_time,
            message_timestamp_before_max_ms,
            message_timestamp_after_max_ms,
        })
    }

    /// The effective value of every key, as strings.
    pub fn describe(&self) -> BTreeMap<String, String> {
        let l = &self.log;
        [
            ("cleanup_policy", "delete".to_string()),
            ("compression_type", COMPRESSION_PRODUCER.to_string()),
            ("flush", format_flush(l.flush)),
            ("index_interval_bytes", l.index_interval_bytes.to_string()),
            ("max_message_bytes", self.max_message_bytes.to_string()),
            ("message_timestamp_after_max_ms", self.message_timestamp_after_max_ms.to_string()),
            ("message_timestamp_before_max_ms", self.message_timestamp_before_max_ms.to_string()),
            ("message_timestamp_type", if self.log_append_time { "LogAppendTime" } else { "CreateTime" }.to_string()),
            ("min_insync_replicas", self.min_insync_replicas.to_string()),
            ("retention_bytes", l.retention_bytes.map_or(-1, |b| b as i64).to_string()),
            ("retention_ms", l.retention_ms.unwrap_or(-1).to_string()),
            ("segment_bytes", l.segment_bytes.to_string()),
            ("segment_index_bytes", l.segment_index_bytes.to_string()),
            ("segment_ms", l.segment_ms.to_string()),
            ("unclean_leader_election", self.unclean_leader_election.to_string()),
            ("writeback_window_bytes", l.writeback_window_bytes.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_follow_kafkas_rules() {
        for ok in ["a", "orders.v1", "__consumer_offsets", "A-b_c.9", &"x".repeat(249)] {
            assert!(TopicName::new(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "has space", "slash/", "ümlaut", &"x".repeat(250)] {
            assert!(TopicName::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn overrides_accept_dotted_names_and_refuse_bad_values_by_key() {
        let d = LogDefaults::default();
        let mut o = BTreeMap::new();
        o.insert("retention.ms".to_string(), "1000".to_string());
        o.insert("flush".to_string(), "always".to_string());
        let c = TopicConfig::with_overrides(&d, &o).unwrap();
        assert_eq!(c.log.retention_ms, Some(1000));
        assert_eq!(c.describe()["flush"], "always");
        o.insert("segment_bytes".to_string(), "12".to_string());
        assert_eq!(TopicConfig::with_overrides(&d, &o).unwrap_err().key, "segment_bytes");
        let mut u = BTreeMap::new();
        u.insert("retention_hours".to_string(), "1".to_string());
        assert_eq!(TopicConfig::with_overrides(&d, &u).unwrap_err().key, "retention_hours");
    }
}
