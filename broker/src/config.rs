//! Broker configuration: data, read from TOML (unknown keys are errors),
//! overridden by the command line, checked by [`BrokerConfig::validate`]
//! which lists every problem at once.

use std::path::PathBuf;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::storage::{FlushPolicy, LogConfig};

/// Everything a broker needs to start.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// This broker's id in the cluster. Default 1.
    pub node_id: u32,
    /// Address clients are told to dial (`host:port`). Default: the address
    /// the listener is bound to.
    pub advertised_address: Option<String>,
    /// Where topics, partitions and their logs live. Default `./data`.
    pub data_dir: PathBuf,
    /// Defaults for every topic; topics override them one key at a time.
    pub log: LogDefaults,
    /// Largest gRPC request or response. Default 64 MiB; range 1 MiB ..= 1 GiB.
    pub max_request_bytes: u64,
    /// Produce bytes one partition may have in flight before new produce
    /// requests for it wait. Default 64 MiB; at least `max_request_bytes`.
    pub max_inflight_bytes_per_partition: u64,
    /// Requests one connection may have in flight. Default 256.
    pub max_concurrent_requests_per_connection: usize,
    /// Upper bound on a fetch's `max_wait_ms`. Default 30 000.
    pub max_fetch_wait_ms: u64,
    /// How often retention runs. Default 300 000 (5 minutes, like Kafka).
    pub retention_check_interval_ms: u64,
    /// How often checkpoint files are written. Default 60 000.
    pub checkpoint_interval_ms: u64,
    /// Partitions of a topic created without a count. Default 1.
    pub default_partitions: u32,
    /// Most partitions one topic may have. Default 10 000.
    pub max_partitions_per_topic: u32,
    /// Most partition replicas one broker may host; a topic creation or
    /// partition increase that would place more on any broker is refused
    /// with INVALID_PARTITIONS, as is one beyond what this broker's
    /// open-file limit (one descriptor per segment) or the kernel's `vm.max_map_count`
    /// (three maps per segment) holds. Default 20 000.
    pub max_partitions_per_broker: u32,
    /// The controller voters, `id@host:port,...` (each voter's advertised
    /// address). A broker whose id is not among them is an observer: it
    /// follows the metadata log without voting. Default: this broker
    /// alone, a cluster of its own.
    pub voters: Option<String>,
    /// A broker the active controller has not heard from for this long is
    /// fenced and its partitions move (Kafka's `broker.session.timeout.ms`).
    /// Default 9000.
    pub broker_session_timeout_ms: u64,
    /// How often this broker heartbeats to the active controller. Default
    /// 2000; below `broker_session_timeout_ms`.
    pub broker_heartbeat_interval_ms: u64,
    /// A controller voter that hears from no leader for 3/4 of this to all
    /// of it starts an election. Default 1000; above 4 ×
    /// `controller_heartbeat_interval_ms`.
    pub controller_election_timeout_ms: u64,
    /// How often the controller leader sends Raft heartbeats to the other
    /// voters. Also the time limit of every AppendEntries and of the
    /// leadership check each broker heartbeat waits for at the active
    /// controller: one round trip between voters (a kept connection) plus a
    /// follower's fsync must fit in it, or brokers are fenced although Raft
    /// is healthy. Default 100; positive.
    pub controller_heartbeat_interval_ms: u64,
    /// Time limit for sending a snapshot to a voter or observer that is
    /// too far behind for the log. Default 10 000; positive.
    pub controller_install_snapshot_timeout_ms: u64,
    /// An in-sync follower that has not caught up with the leader's log end
    /// for this long leaves the ISR (Kafka's `replica.lag.time.max.ms`).
    /// Default 30 000.
    pub replica_lag_time_max_ms: u64,
    /// How long a leader holds a follower's fetch that finds nothing new.
    /// Default 500; below `replica_lag_time_max_ms`.
    pub replica_fetch_wait_max_ms: u32,
    /// Bytes of batches per follower fetch response at most (Kafka's
    /// `replica.fetch.response.max.bytes`). Default 10 MiB.
    pub replica_fetch_response_max_bytes: u32,
    /// First pause of a follower's fetch after an error; doubles up to 1 s.
    /// Default 50.
    pub replica_fetch_backoff_ms: u64,
    /// How often the active controller moves leaderships back to preferred
    /// replicas that are in sync again (Kafka's
    /// `leader.imbalance.check.interval.seconds`); 0 turns it off. Default 30 000.
    pub leader_imbalance_check_interval_ms: u64,
    /// The local IP address of this broker's connections to other brokers
    /// (Raft, forwarding, replica fetches), for hosts with several
    /// addresses. Default: the system picks.
    pub peer_source_address: Option<String>,
    /// The local IP address of this broker's controller connections only
    /// (Raft, forwarded broker heartbeats and proposals), so that a host or
    /// a test can treat controller traffic apart from replica fetches.
    /// Default: `peer_source_address`.
    pub controller_source_address: Option<String>,
    /// Where to serve Prometheus metrics (`host:port`, `GET /metrics`);
    /// off unless set. See docs/metrics.md for what is exported.
    pub metrics_listen: Option<String>,
    /// Threads compacting `cleanup_policy = compact` partitions (Kafka's
    /// `log.cleaner.threads`); 0 turns compaction off. Default 1.
    pub log_cleaner_threads: u32,
    /// Memory for the cleaners' offset maps, shared among the threads
    /// (`log.cleaner.dedupe.buffer.size`). Default 128 MiB.
    pub log_cleaner_dedupe_buffer_bytes: u64,
    /// Bytes per second each cleaner reads and writes at most
    /// (`log.cleaner.io.max.bytes.per.second`); 0 for no limit. Default 0.
    pub log_cleaner_io_max_bytes_per_second: u64,
    /// How long a cleaner with nothing due sleeps
    /// (`log.cleaner.backoff.ms`). Default 15 000.
    pub log_cleaner_backoff_ms: u64,
    /// Partitions of `__consumer_offsets`, fixed when it is created on first
    /// use (Kafka's `offsets.topic.num.partitions`). Default 50.
    pub offsets_topic_num_partitions: u32,
    /// Its replication factor, or the number of brokers if fewer
    /// (`offsets.topic.replication.factor`). Default 3.
    pub offsets_topic_replication_factor: u32,
    /// Its segment size: small, so compaction reaches old group state soon
    /// and an idle offsets partition reserves little disk. Default 4 MiB.
    pub offsets_topic_segment_bytes: u64,
    /// How long an empty group's committed offsets are kept
    /// (`offsets.retention.minutes`). Default 10 080 (7 days).
    pub offsets_retention_minutes: u64,
    /// How long a producer that appends nothing is remembered by each
    /// partition's producer-state table (`producer.id.expiration.ms`,
    /// KIP-854). Default 86 400 000 (a day).
    pub producer_id_expiration_ms: u64,
    /// Most producers one partition's producer-state table tracks; a new
    /// producer past it is refused with POLICY_VIOLATION until idle ones
    /// expire. Bounds the table's memory (about 200 bytes a producer).
    /// Default 10 000.
    pub max_producers_per_partition: u32,
    /// Write-behind and drop-behind take a partition's pages out of the
    /// page cache only while free memory (the machine's, or a cgroup
    /// limit's, whichever is lower) is below this percent. With memory to
    /// spare, written and read-back data stays cached for catch-up readers;
    /// 100 always drops (each partition caches only its newest windows), 0
    /// never does. Default 10, or 100 on a VM whose balloon reports free
    /// pages to its host (where growing the cache is slow; see
    /// `storage::page_cache::default_min_free_percent`).
    pub page_cache_min_free_percent: u8,
    /// A group member's session when it asks for none
    /// (`group.consumer.session.timeout.ms`). Default 45 000.
    pub group_consumer_session_timeout_ms: u32,
    /// The shortest session a member may ask for. Default 45 000.
    pub group_consumer_min_session_timeout_ms: u32,
    /// The longest session a member may ask for. Default 60 000.
    pub group_consumer_max_session_timeout_ms: u32,
    /// How often members heartbeat (`group.consumer.heartbeat.interval.ms`;
    /// never above a third of a member's session). Default 5000.
    pub group_consumer_heartbeat_interval_ms: u32,
    /// Most members per group (`group.consumer.max.size`). Default 1000.
    pub group_consumer_max_size: u32,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            node_id: 1,
            advertised_address: None,
            data_dir: PathBuf::from("./data"),
            log: LogDefaults::default(),
            max_request_bytes: 64 << 20,
            max_inflight_bytes_per_partition: 64 << 20,
            max_concurrent_requests_per_connection: 256,
            max_fetch_wait_ms: 30_000,
            retention_check_interval_ms: 300_000,
            checkpoint_interval_ms: 60_000,
            default_partitions: 1,
            max_partitions_per_topic: 10_000,
            max_partitions_per_broker: 20_000,
            voters: None,
            broker_session_timeout_ms: 9000,
            broker_heartbeat_interval_ms: 2000,
            controller_election_timeout_ms: 1000,
            controller_heartbeat_interval_ms: 100,
            controller_install_snapshot_timeout_ms: 10_000,
            replica_lag_time_max_ms: 30_000,
            replica_fetch_wait_max_ms: 500,
            replica_fetch_response_max_bytes: 10 << 20,
            replica_fetch_backoff_ms: 50,
            leader_imbalance_check_interval_ms: 30_000,
            peer_source_address: None,
            metrics_listen: None,
            offsets_topic_num_partitions: 50,
            offsets_topic_replication_factor: 3,
            offsets_topic_segment_bytes: 4 << 20,
            offsets_retention_minutes: 7 * 24 * 60,
            producer_id_expiration_ms: 24 * 3600 * 1000,
            max_producers_per_partition: 10_000,
            page_cache_min_free_percent: crate::storage::page_cache::default_min_free_percent(),
            group_consumer_session_timeout_ms: 45_000,
            group_consumer_min_session_timeout_ms: 45_000,
            group_consumer_max_session_timeout_ms: 60_000,
            group_consumer_heartbeat_interval_ms: 5_000,
            group_consumer_max_size: 1_000,
            controller_source_address: None,
            log_cleaner_threads: 1,
            log_cleaner_dedupe_buffer_bytes: 128 << 20,
            log_cleaner_io_max_bytes_per_second: 0,
            log_cleaner_backoff_ms: 15_000,
        }
    }
}

/// Per-topic defaults, with Kafka's names (dots become underscores).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogDefaults {
    /// `segment.bytes`. Default 1 GiB; range 1 KiB ..= 2 GiB - 1.
    pub segment_bytes: u64,
    /// `segment.ms`. Default 7 days.
    pub segment_ms: i64,
    /// `retention.ms`; -1 keeps data forever. Default 7 days.
    pub retention_ms: i64,
    /// `retention.bytes` per partition; -1 for no limit. Default -1.
    pub retention_bytes: i64,
    /// `index.interval.bytes`. Default 4096.
    pub index_interval_bytes: u64,
    /// `segment.index.bytes`. Default 10 MiB.
    pub segment_index_bytes: u64,
    /// `max.message.bytes`: largest batch accepted. Default 1 MiB + 12.
    pub max_message_bytes: u64,
    /// `flush`: `always`, `os`, or a number of milliseconds (`200ms`). Default `os`.
    pub flush: String,
    /// `min.insync.replicas`: replicas that must have a batch for acks=all. Default 1.
    pub min_insync_replicas: u32,
    /// `cleanup.policy`: `delete` (retention by time and size), `compact`
    /// (keep the last record of every key), or `compact,delete` (both).
    /// Default `delete`.
    pub cleanup_policy: String,
    /// `min.compaction.lag.ms`: records younger than this are not
    /// compacted. Default 0.
    pub min_compaction_lag_ms: i64,
    /// `max.compaction.lag.ms`: a compacted log whose oldest uncleaned data
    /// is older than this is cleaned whatever its dirty ratio. Default
    /// i64::MAX (never).
    pub max_compaction_lag_ms: i64,
    /// `min.cleanable.dirty.ratio`: the share of uncleaned bytes that makes a
    /// compacted log due for cleaning. Default 0.5.
    pub min_cleanable_dirty_ratio: f64,
    /// `delete.retention.ms`: how long a tombstone of a compacted topic
    /// outlives the clean that first kept it. Default 86 400 000 (a day).
    pub delete_retention_ms: i64,
    /// `unclean.leader.election.enable`: `true` lets a replica outside the
    /// ISR and the eligible replicas lead when none of them can, at the
    /// price of losing acknowledged records. Default `false`.
    pub unclean_leader_election: String,
    /// `compression.type`: only `producer` (batches are stored as the
    /// producer compressed them) for now. Default `producer`.
    pub compression_type: String,
    /// `message.timestamp.type`: `CreateTime` (the producer's) or
    /// `LogAppendTime` (the broker stamps its clock). Default `CreateTime`.
    pub message_timestamp_type: String,
    /// `message.timestamp.before.max.ms`: how far in the past a CreateTime
    /// record may be. Default i64::MAX (no limit).
    pub message_timestamp_before_max_ms: i64,
    /// `message.timestamp.after.max.ms`: how far in the future a CreateTime
    /// record may be. Default 3 600 000 (one hour, Kafka 4's default).
    pub message_timestamp_after_max_ms: i64,
    /// Write-behind window per partition (see `storage::LogConfig`): bounds
    /// dirty and cached bytes of the active segment. 0 leaves it to the OS.
    /// Default 32 MiB; a multiple of 1 MiB.
    pub writeback_window_bytes: u64,
}

impl Default for LogDefaults {
    fn default() -> Self {
        let log = LogConfig::default();
        let compaction = crate::storage::Compaction::default();
        LogDefaults {
            segment_bytes: log.segment_bytes,
            segment_ms: log.segment_ms,
            retention_ms: log.retention_ms.unwrap_or(-1),
            retention_bytes: -1,
            index_interval_bytes: log.index_interval_bytes,
            segment_index_bytes: log.segment_index_bytes,
            max_message_bytes: (1 << 20) + 12,
            flush: "os".to_string(),
            min_insync_replicas: 1,
            cleanup_policy: "delete".to_string(),
            min_compaction_lag_ms: compaction.min_lag_ms,
            max_compaction_lag_ms: compaction.max_lag_ms,
            min_cleanable_dirty_ratio: compaction.min_cleanable_dirty_ratio,
            delete_retention_ms: compaction.delete_retention_ms,
            unclean_leader_election: "false".to_string(),
            compression_type: "producer".to_string(),
            message_timestamp_type: "CreateTime".to_string(),
            message_timestamp_before_max_ms: i64::MAX,
            message_timestamp_after_max_ms: 3_600_000,
            writeback_window_bytes: log.writeback_window_bytes,
        }
    }
}

impl BrokerConfig {
    /// Reads a TOML file; unknown keys are errors.
    pub fn from_toml_file(path: &std::path::Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("invalid config {}: {e}", path.display()))
    }

    /// Every problem with this config; empty when it can be used.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if !((1 << 20)..=(1 << 30)).contains(&self.max_request_bytes) {
            problems.push(format!("max_request_bytes must be in 1 MiB ..= 1 GiB, got {}", self.max_request_bytes));
        }
        if self.max_inflight_bytes_per_partition < self.max_request_bytes {
            problems.push("max_inflight_bytes_per_partition must be at least max_request_bytes".to_string());
        }
        if self.max_inflight_bytes_per_partition > u64::from(u32::MAX) {
            problems.push("max_inflight_bytes_per_partition must be below 4 GiB".to_string());
        }
        if self.max_partitions_per_broker == 0 {
            problems.push("max_partitions_per_broker must be at least 1".to_string());
        }
        if self.max_producers_per_partition == 0 {
            problems.push("max_producers_per_partition must be at least 1".to_string());
        }
        if self.page_cache_min_free_percent > 100 {
            problems.push("page_cache_min_free_percent must be at most 100".to_string());
        }
        if self.producer_id_expiration_ms == 0 {
            problems.push("producer_id_expiration_ms must be positive".to_string());
        }
        if self.max_concurrent_requests_per_connection == 0 {
            problems.push("max_concurrent_requests_per_connection must be positive".to_string());
        }
        if self.default_partitions == 0 || self.default_partitions > self.max_partitions_per_topic {
            problems.push("default_partitions must be in 1 ..= max_partitions_per_topic".to_string());
        }
        if self.log.max_message_bytes + 1024 > self.max_request_bytes {
            problems.push(
                "log.max_message_bytes must leave room for a request header inside max_request_bytes".to_string(),
            );
        }
        let defaults = crate::topic::TopicConfig::from_defaults(&self.log);
        if let Err(e) = defaults {
            problems.push(format!("log.{e}"));
        }
        if let Err(e) = self.parsed_voters() {
            problems.push(e);
        }
        if self.broker_heartbeat_interval_ms == 0 || self.broker_heartbeat_interval_ms >= self.broker_session_timeout_ms
        {
            problems.push(format!(
                "broker_heartbeat_interval_ms ({}) must be positive and below broker_session_timeout_ms ({})",
                self.broker_heartbeat_interval_ms, self.broker_session_timeout_ms
            ));
        }
        if self.controller_heartbeat_interval_ms == 0 {
            problems.push("controller_heartbeat_interval_ms must be positive".to_string());
        } else if self.controller_election_timeout_ms / 4 <= self.controller_heartbeat_interval_ms {
            problems.push(format!(
                "controller_election_timeout_ms ({}) must be above 4 x controller_heartbeat_interval_ms ({}), \
                 or voters start elections between heartbeats",
                self.controller_election_timeout_ms, self.controller_heartbeat_interval_ms
            ));
        }
        if self.offsets_topic_num_partitions == 0 || self.offsets_topic_num_partitions > self.max_partitions_per_topic {
            problems.push("offsets_topic_num_partitions must be in 1 ..= max_partitions_per_topic".to_string());
        }
        if self.offsets_topic_replication_factor == 0 {
            problems.push("offsets_topic_replication_factor must be positive".to_string());
        }
        if !(1024..=crate::storage::LogConfig::MAX_SEGMENT_BYTES).contains(&self.offsets_topic_segment_bytes) {
            problems
                .push("offsets_topic_segment_bytes must be at least 1024 and at most the segment limit".to_string());
        }
        let (min, default, max) = (
            self.group_consumer_min_session_timeout_ms,
            self.group_consumer_session_timeout_ms,
            self.group_consumer_max_session_timeout_ms,
        );
        if min == 0 || !(min <= default && default <= max) {
            problems.push(format!(
                "group_consumer_min_session_timeout_ms ({min}) <= group_consumer_session_timeout_ms ({default}) \
                 <= group_consumer_max_session_timeout_ms ({max}) must hold, with a positive minimum"
            ));
        }
        if self.group_consumer_heartbeat_interval_ms == 0 || self.group_consumer_heartbeat_interval_ms >= default {
            problems.push("group_consumer_heartbeat_interval_ms must be positive and below the session timeout".into());
        }
        if self.group_consumer_max_size == 0 {
            problems.push("group_consumer_max_size must be positive".to_string());
        }
        if self.controller_install_snapshot_timeout_ms == 0 {
            problems.push("controller_install_snapshot_timeout_ms must be positive".to_string());
        }
        if let Some(address) = &self.metrics_listen
            && address.parse::<std::net::SocketAddr>().is_err()
        {
            problems
                .push(format!("metrics_listen must be an IP address and port (e.g. 127.0.0.1:9644), got `{address}`"));
        }
        for (name, value) in [
            ("peer_source_address", &self.peer_source_address),
            ("controller_source_address", &self.controller_source_address),
        ] {
            if let Some(ip) = value
                && ip.parse::<std::net::IpAddr>().is_err()
            {
                problems.push(format!("{name} must be an IP address, got `{ip}`"));
            }
        }
        if self.log_cleaner_threads > 16 {
            problems.push(format!("log_cleaner_threads must be 0 to 16, got {}", self.log_cleaner_threads));
        }
        let per_thread = self.log_cleaner_dedupe_buffer_bytes / u64::from(self.log_cleaner_threads.max(1));
        if self.log_cleaner_threads > 0 && per_thread < 1 << 20 {
            problems.push(format!(
                "log_cleaner_dedupe_buffer_bytes must give each cleaner thread at least 1 MiB, got {} for {} threads",
                self.log_cleaner_dedupe_buffer_bytes, self.log_cleaner_threads
            ));
        }
        if self.log_cleaner_backoff_ms == 0 || self.log_cleaner_backoff_ms > 86_400_000 {
            problems.push(format!("log_cleaner_backoff_ms must be 1 to 86400000, got {}", self.log_cleaner_backoff_ms));
        }
        if u64::from(self.replica_fetch_wait_max_ms) >= self.replica_lag_time_max_ms {
            problems.push(format!(
                "replica_fetch_wait_max_ms ({}) must be below replica_lag_time_max_ms ({}), or idle followers leave the ISR",
                self.replica_fetch_wait_max_ms, self.replica_lag_time_max_ms
            ));
        }
        if self.replica_fetch_response_max_bytes < 64 << 10 {
            problems.push(format!(
                "replica_fetch_response_max_bytes must be at least 65536, got {}",
                self.replica_fetch_response_max_bytes
            ));
        }
        if self.replica_fetch_backoff_ms == 0 || self.replica_fetch_backoff_ms > 10_000 {
            problems
                .push(format!("replica_fetch_backoff_ms must be 1 to 10000, got {}", self.replica_fetch_backoff_ms));
        }
        problems
    }

    /// `peer_source_address` as an IP (checked by `validate`).
    pub fn peer_source_ip(&self) -> Option<std::net::IpAddr> {
        self.peer_source_address.as_deref().and_then(|ip| ip.parse().ok())
    }

    /// The local IP of controller connections: `controller_source_address`,
    /// else `peer_source_address` (both checked by `validate`).
    pub fn controller_source_ip(&self) -> Option<std::net::IpAddr> {
        self.controller_source_address.as_deref().and_then(|ip| ip.parse().ok()).or_else(|| self.peer_source_ip())
    }

    /// The voters from `voters` (`id@host:port,...`), or `None` when unset.
    pub fn parsed_voters(&self) -> Result<Option<BTreeMap<u32, String>>, String> {
        let Some(text) = &self.voters else { return Ok(None) };
        let mut out = BTreeMap::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (id, address) =
                part.split_once('@').ok_or_else(|| format!("voters: `{part}` is not `id@host:port`"))?;
            let id: u32 = id.parse().map_err(|_| format!("voters: `{id}` in `{part}` is not a node id"))?;
            if !address.contains(':') {
                return Err(format!("voters: `{address}` in `{part}` is not `host:port`"));
            }
            if out.insert(id, address.to_string()).is_some() {
                return Err(format!("voters: node id {id} is listed twice"));
            }
        }
        if out.is_empty() {
            return Err("voters: the list is empty".to_string());
        }
        Ok(Some(out))
    }
}

/// Top-level keys of [`BrokerConfig`], for environment overrides.
const BROKER_KEYS: &[&str] = &[
    "node_id",
    "advertised_address",
    "data_dir",
    "max_request_bytes",
    "max_inflight_bytes_per_partition",
    "max_concurrent_requests_per_connection",
    "max_fetch_wait_ms",
    "retention_check_interval_ms",
    "checkpoint_interval_ms",
    "default_partitions",
    "max_partitions_per_topic",
    "max_partitions_per_broker",
    "voters",
    "broker_session_timeout_ms",
    "broker_heartbeat_interval_ms",
    "controller_election_timeout_ms",
    "controller_heartbeat_interval_ms",
    "controller_install_snapshot_timeout_ms",
    "replica_lag_time_max_ms",
    "replica_fetch_wait_max_ms",
    "replica_fetch_response_max_bytes",
    "replica_fetch_backoff_ms",
    "leader_imbalance_check_interval_ms",
    "peer_source_address",
    "metrics_listen",
    "controller_source_address",
    "log_cleaner_threads",
    "log_cleaner_dedupe_buffer_bytes",
    "log_cleaner_io_max_bytes_per_second",
    "log_cleaner_backoff_ms",
    "offsets_topic_num_partitions",
    "offsets_topic_replication_factor",
    "offsets_topic_segment_bytes",
    "offsets_retention_minutes",
    "producer_id_expiration_ms",
    "max_producers_per_partition",
    "page_cache_min_free_percent",
    "group_consumer_session_timeout_ms",
    "group_consumer_min_session_timeout_ms",
    "group_consumer_max_session_timeout_ms",
    "group_consumer_heartbeat_interval_ms",
    "group_consumer_max_size",
];

/// `TALLY_*` variables that are not config fields: the command line's own.
const NOT_CONFIG: &[&str] = &["TALLY_BOOTSTRAP", "TALLY_CONFIG", "TALLY_LISTEN", "TALLY_LOG"];

impl BrokerConfig {
    /// Overrides fields from environment variables: `TALLY_<FIELD>` for a
    /// top-level field (`TALLY_NODE_ID=3`) and `TALLY_LOG_<FIELD>` for a
    /// `[log]` field (`TALLY_LOG_RETENTION_MS=3600000`). Values are parsed as
    /// the field's type. A `TALLY_` variable that names no field is an error,
    /// so a typo cannot silently leave a setting at its default. The command
    /// line's own variables (`TALLY_BOOTSTRAP`, `TALLY_CONFIG`,
    /// `TALLY_LISTEN`, `TALLY_LOG`), `TALLY_BENCH_*` and `TALLY_TEST_*` are skipped.
    pub fn apply_env(self, vars: impl IntoIterator<Item = (String, String)>) -> Result<Self, String> {
        let mut tree = toml::Value::try_from(&self).map_err(|e| format!("cannot represent the config: {e}"))?;
        for (name, raw) in vars {
            let Some(key) = name.strip_prefix("TALLY_") else { continue };
            if NOT_CONFIG.contains(&name.as_str()) || key.starts_with("BENCH_") || key.starts_with("TEST_") {
                continue;
            }
            let key = key.to_ascii_lowercase();
            let table = tree.as_table_mut().expect("a struct is a table");
            let (table, field) = match key.strip_prefix("log_") {
                Some(field) if crate::topic::TOPIC_CONFIG_KEYS.contains(&field) => {
                    (table.get_mut("log").and_then(toml::Value::as_table_mut).expect("log is a table"), field)
                }
                _ if BROKER_KEYS.contains(&key.as_str()) => (table, key.as_str()),
                _ => return Err(format!("{name} names no config field (known: TALLY_<FIELD> and TALLY_LOG_<FIELD>)")),
            };
            let value = match table.get(field) {
                Some(toml::Value::Integer(_)) => {
                    toml::Value::Integer(raw.trim().parse().map_err(|_| format!("{name}={raw} is not an integer"))?)
                }
                Some(toml::Value::Boolean(_)) => {
                    toml::Value::Boolean(raw.trim().parse().map_err(|_| format!("{name}={raw} is not true or false"))?)
                }
                _ => toml::Value::String(raw),
            };
            table.insert(field.to_string(), value);
        }
        tree.try_into().map_err(|e| format!("invalid config from the environment: {e}"))
    }
}

/// Parses a flush policy: `always`, `os`, or milliseconds (`200` or `200ms`).
pub fn parse_flush(value: &str) -> Result<FlushPolicy, String> {
    match value.trim() {
        "always" => Ok(FlushPolicy::Always),
        "os" => Ok(FlushPolicy::Os),
        other => other
            .trim_end_matches("ms")
            .parse::<u64>()
            .ok()
            .filter(|&ms| ms > 0)
            .map(FlushPolicy::IntervalMs)
            .ok_or_else(|| format!("must be `always`, `os` or a positive number of milliseconds, got `{value}`")),
    }
}

/// Formats a flush policy the way [`parse_flush`] reads it.
pub fn format_flush(policy: FlushPolicy) -> String {
    match policy {
        FlushPolicy::Always => "always".to_string(),
        FlushPolicy::Os => "os".to_string(),
        FlushPolicy::IntervalMs(ms) => format!("{ms}ms"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_rejected_so_a_typo_cannot_disable_fsync() {
        let err = toml::from_str::<BrokerConfig>("[log]\nenforce_fsync = true\n").unwrap_err();
        assert!(err.to_string().contains("enforce_fsync"), "{err}");
    }

    #[test]
    fn every_broker_field_can_be_set_from_the_environment() {
        let table = toml::Value::try_from(BrokerConfig::default()).unwrap();
        for key in table.as_table().unwrap().keys().filter(|k| *k != "log") {
            assert!(BROKER_KEYS.contains(&key.as_str()), "TALLY_{} is not read", key.to_uppercase());
        }
    }

    #[test]
    fn validate_lists_every_problem() {
        let mut c = BrokerConfig { max_request_bytes: 10, default_partitions: 0, ..BrokerConfig::default() };
        c.log.flush = "sometimes".into();
        let problems = c.validate();
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(BrokerConfig::default().validate().is_empty());
    }

    #[test]
    fn controller_traffic_leaves_from_its_own_address_or_else_the_peer_one() {
        let mut c = BrokerConfig { peer_source_address: Some("127.0.0.2".into()), ..BrokerConfig::default() };
        assert_eq!(c.controller_source_ip(), Some("127.0.0.2".parse().unwrap()));
        c.controller_source_address = Some("127.0.0.5".into());
        assert_eq!(c.controller_source_ip(), Some("127.0.0.5".parse().unwrap()));
        assert_eq!(c.peer_source_ip(), Some("127.0.0.2".parse().unwrap()));
        c.controller_source_address = Some("here".into());
        let problems = c.validate();
        assert!(problems.len() == 1 && problems[0].contains("controller_source_address"), "{problems:?}");
    }

    #[test]
    fn controller_timings_are_read_and_impossible_combinations_refused() {
        let c: BrokerConfig = toml::from_str(
            "controller_heartbeat_interval_ms = 250\ncontroller_election_timeout_ms = 3000\n\
             controller_install_snapshot_timeout_ms = 30000\n",
        )
        .unwrap();
        assert_eq!(
            (
                c.controller_heartbeat_interval_ms,
                c.controller_election_timeout_ms,
                c.controller_install_snapshot_timeout_ms
            ),
            (250, 3000, 30_000)
        );
        assert!(c.validate().is_empty(), "{:?}", c.validate());
        let slow_heartbeat = BrokerConfig { controller_heartbeat_interval_ms: 300, ..BrokerConfig::default() };
        let problems = slow_heartbeat.validate();
        assert!(
            problems.len() == 1 && problems[0].contains("4 x controller_heartbeat_interval_ms (300)"),
            "{problems:?}"
        );
        let zero = BrokerConfig {
            controller_heartbeat_interval_ms: 0,
            controller_install_snapshot_timeout_ms: 0,
            ..BrokerConfig::default()
        };
        assert_eq!(zero.validate().len(), 2, "{:?}", zero.validate());
        // The election timeout's own floor follows the heartbeat interval.
        let fast = BrokerConfig {
            controller_heartbeat_interval_ms: 50,
            controller_election_timeout_ms: 300,
            ..BrokerConfig::default()
        };
        assert!(fast.validate().is_empty(), "{:?}", fast.validate());
    }

    #[test]
    fn environment_overrides_fields_and_refuses_unknown_names() {
        let env =
            |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Vec<_>>();
        let c = BrokerConfig::default()
            .apply_env(env(&[
                ("TALLY_NODE_ID", "3"),
                ("TALLY_LOG_RETENTION_MS", "5000"),
                ("TALLY_LOG_FLUSH", "always"),
                ("TALLY_DATA_DIR", "/srv/tally"),
                ("TALLY_ADVERTISED_ADDRESS", "broker-3:9092"),
                ("TALLY_BOOTSTRAP", "ignored:1"),
                ("PATH", "/bin"),
            ]))
            .unwrap();
        assert_eq!(c.node_id, 3);
        assert_eq!(c.log.retention_ms, 5000);
        assert_eq!(c.log.flush, "always");
        assert_eq!(c.data_dir, PathBuf::from("/srv/tally"));
        assert_eq!(c.advertised_address.as_deref(), Some("broker-3:9092"));
        let err = BrokerConfig::default().apply_env(env(&[("TALLY_LOG_RETENTION_HOURS", "1")])).unwrap_err();
        assert!(err.contains("TALLY_LOG_RETENTION_HOURS"), "{err}");
        let err = BrokerConfig::default().apply_env(env(&[("TALLY_NODE_ID", "three")])).unwrap_err();
        assert!(err.contains("not an integer"), "{err}");
    }

    #[test]
    fn flush_values_parse() {
        assert_eq!(parse_flush("always"), Ok(FlushPolicy::Always));
        assert_eq!(parse_flush("250ms"), Ok(FlushPolicy::IntervalMs(250)));
        assert_eq!(parse_flush("250"), Ok(FlushPolicy::IntervalMs(250)));
        assert!(parse_flush("0").is_err());
        assert_eq!(parse_flush(&format_flush(FlushPolicy::IntervalMs(7))), Ok(FlushPolicy::IntervalMs(7)));
    }
}
