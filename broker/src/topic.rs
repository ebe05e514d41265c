//! Topic names and topic configs: validated once, then carried as types.

use std::collections::BTreeMap;

use crate::config::{LogDefaults, format_flush, parse_flush};
use crate::storage::{Compaction, LogConfig};

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
    /// `delete`, `compact` or `compact,delete`.
    pub cleanup_policy: &'static str,
    /// `retention_ms` and `retention_bytes` as set (-1 for none); the log
    /// applies them only with `delete` in the cleanup policy.
    pub retention_settings: (i64, i64),
    /// The compaction settings as set (used only with `compact`).
    pub compaction_settings: Compaction,
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
    "delete_retention_ms",
    "flush",
    "index_interval_bytes",
    "max_compaction_lag_ms",
    "max_message_bytes",
    "message_timestamp_after_max_ms",
    "message_timestamp_before_max_ms",
    "message_timestamp_type",
    "min_cleanable_dirty_ratio",
    "min_compaction_lag_ms",
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
        ("delete_retention_ms", d.delete_retention_ms.to_string()),
        ("max_compaction_lag_ms", d.max_compaction_lag_ms.to_string()),
        ("min_cleanable_dirty_ratio", d.min_cleanable_dirty_ratio.to_string()),
        ("min_compaction_lag_ms", d.min_compaction_lag_ms.to_string()),
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

/// `cleanup.policy` as (compact, delete): `delete`, `compact`, or both
/// (`compact,delete` in either order).
fn parse_cleanup_policy(value: &str) -> Result<(bool, bool), String> {
    let (mut compact, mut delete) = (false, false);
    for part in value.split(',').map(str::trim) {
        match part {
            "compact" => compact = true,
            "delete" => delete = true,
            other => return Err(format!("`{other}` is not one of delete, compact, compact,delete")),
        }
    }
    if !compact && !delete {
        return Err("must be delete, compact or compact,delete".to_string());
    }
    Ok((compact, delete))
}

impl TopicConfig {
    /// True for a compacted topic (`cleanup_policy` with `compact`): every
    /// record needs a key.
    pub fn is_compacted(&self) -> bool {
        self.log.compaction.is_some()
    }
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
        let (compact, delete) =
            parse_cleanup_policy(&map["cleanup_policy"]).map_err(|r| invalid("cleanup_policy", r))?;
        let compaction = Compaction {
            min_lag_ms: num(map, "min_compaction_lag_ms")?,
            max_lag_ms: num(map, "max_compaction_lag_ms")?,
            min_cleanable_dirty_ratio: num(map, "min_cleanable_dirty_ratio")?,
            delete_retention_ms: num(map, "delete_retention_ms")?,
        };
        if let Some(problem) = compaction.problems().into_iter().next() {
            let key = problem.split_whitespace().next().unwrap_or("cleanup_policy").to_string();
            return Err(invalid(&key, problem));
        }
        Ok(TopicConfig {
            log: LogConfig {
                segment_bytes,
                segment_ms,
                // A compacted topic without `delete` keeps every key forever.
                retention_ms: (retention_ms >= 0 && delete).then_some(retention_ms),
                retention_bytes: u64::try_from(retention_bytes).ok().filter(|_| delete),
                index_interval_bytes,
                segment_index_bytes,
                flush,
                verify_on_read: LogConfig::default().verify_on_read,
                writeback_window_bytes,
                cache_min_free_percent: LogConfig::default().cache_min_free_percent,
                compaction: compact.then_some(compaction),
                max_producers: LogConfig::default().max_producers,
            },
            max_message_bytes,
            min_insync_replicas,
            unclean_leader_election,
            log_append_time,
            message_timestamp_before_max_ms,
            message_timestamp_after_max_ms,
            cleanup_policy: match (compact, delete) {
                (true, true) => "compact,delete",
                (true, false) => "compact",
                _ => "delete",
            },
            retention_settings: (retention_ms, retention_bytes),
            compaction_settings: compaction,
        })
    }

    /// The effective value of every key, as strings.
    pub fn describe(&self) -> BTreeMap<String, String> {
        let l = &self.log;
        // The compaction settings as set, shown whatever the policy.
        let compaction = self.compaction_settings;
        [
            ("cleanup_policy", self.cleanup_policy.to_string()),
            ("delete_retention_ms", compaction.delete_retention_ms.to_string()),
            ("max_compaction_lag_ms", compaction.max_lag_ms.to_string()),
            ("min_cleanable_dirty_ratio", compaction.min_cleanable_dirty_ratio.to_string()),
            ("min_compaction_lag_ms", compaction.min_lag_ms.to_string()),
            ("compression_type", COMPRESSION_PRODUCER.to_string()),
            ("flush", format_flush(l.flush)),
            ("index_interval_bytes", l.index_interval_bytes.to_string()),
            ("max_message_bytes", self.max_message_bytes.to_string()),
            ("message_timestamp_after_max_ms", self.message_timestamp_after_max_ms.to_string()),
            ("message_timestamp_before_max_ms", self.message_timestamp_before_max_ms.to_string()),
            ("message_timestamp_type", if self.log_append_time { "LogAppendTime" } else { "CreateTime" }.to_string()),
            ("min_insync_replicas", self.min_insync_replicas.to_string()),
            ("retention_bytes", self.retention_settings.1.to_string()),
            ("retention_ms", self.retention_settings.0.to_string()),
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

    #[test]
    fn cleanup_policies_choose_compaction_retention_or_both() {
        let d = LogDefaults::default();
        let with = |pairs: &[(&str, &str)]| {
            let o: BTreeMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            TopicConfig::with_overrides(&d, &o)
        };
        let compact = with(&[("cleanup.policy", "compact"), ("retention.ms", "1000")]).unwrap();
        assert!(compact.is_compacted());
        assert_eq!(compact.log.retention_ms, None, "compact alone keeps every key forever");
        assert_eq!(
            (compact.describe()["cleanup_policy"].as_str(), compact.describe()["retention_ms"].as_str()),
            ("compact", "1000")
        );
        let both = with(&[("cleanup_policy", "delete, compact"), ("retention_ms", "1000")]).unwrap();
        assert!(both.is_compacted());
        assert_eq!((both.cleanup_policy, both.log.retention_ms), ("compact,delete", Some(1000)));
        let delete = with(&[]).unwrap();
        assert!(!delete.is_compacted() && delete.log.retention_ms.is_some());
        let err = with(&[("cleanup_policy", "shred")]).unwrap_err();
        assert!(err.key == "cleanup_policy" && err.reason.contains("delete, compact, compact,delete"), "{err:?}");
        let err = with(&[("cleanup_policy", "compact"), ("min_cleanable_dirty_ratio", "1.5")]).unwrap_err();
        assert_eq!(err.key, "min_cleanable_dirty_ratio");
        let err = with(&[("cleanup_policy", "compact"), ("delete_retention_ms", "-5")]).unwrap_err();
        assert_eq!(err.key, "delete_retention_ms");
        let err = with(&[("max_compaction_lag_ms", "0")]).unwrap_err();
        assert_eq!(err.key, "max_compaction_lag_ms");
    }
}
