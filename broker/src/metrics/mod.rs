//! Prometheus metrics: the catalogue of every metric the broker exports,
//! the process-wide recorder, per-topic traffic counters, and the endpoint
//! (`metrics_listen`) that serves them in Prometheus's text format.
//!
//! Counters and histograms are updated where things happen (a produce, a
//! fetch, an fsync, an ISR change); gauges that describe state (partition
//! health, log sizes, group lag, the controller's role) are read at each
//! scrape by [`sample`], so they are never stale and cost nothing between
//! scrapes. Labels are bounded: per topic, partition, group, acks level or
//! error code, never per record key or client.
//!
//! The recorder is global to the process (the `metrics` facade has one): a
//! test that runs several brokers in one process sees their sum. `tally dev`
//! and real deployments run one broker per process.

mod connections;
mod http;
pub mod sample;

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{Counter, Unit, counter, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

pub use connections::{CountedStream, open_connections, received_bytes, sent_bytes};
pub use http::MetricsServer;

/// What kind of series a metric is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (`_total`).
    Counter,
    /// Goes up and down; read at each scrape.
    Gauge,
    /// Observations in buckets (`_seconds`).
    Histogram,
}

/// One exported metric: its name, kind, labels and meaning (the table in
/// docs/metrics.md lists the same).
#[derive(Debug, Clone, Copy)]
pub struct MetricInfo {
    /// Full name, `tally_` prefixed, in base units.
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: Kind,
    /// Label names.
    pub labels: &'static [&'static str],
    /// What it measures.
    pub help: &'static str,
}

macro_rules! catalogue {
    ($($const:ident = $name:literal, $kind:ident, [$($label:literal),*], $help:literal;)*) => {
        $(
            #[doc = $help]
            pub const $const: &str = $name;
        )*
        /// Every metric the broker exports.
        pub const CATALOGUE: &[MetricInfo] = &[
            $(MetricInfo { name: $name, kind: Kind::$kind, labels: &[$($label),*], help: $help },)*
        ];
    };
}

catalogue! {
    BYTES_IN = "tally_bytes_in_total", Counter, ["topic"], "Record batch bytes appended by produce requests.";
    RECORDS_IN = "tally_records_in_total", Counter, ["topic"], "Records appended by produce requests.";
    BYTES_OUT = "tally_bytes_out_total", Counter, ["topic"], "Record batch bytes sent to consumers by fetches.";
    RECORDS_OUT = "tally_records_out_total", Counter, ["topic"], "Records in the batches sent to consumers by fetches.";
    PRODUCE_DURATION = "tally_produce_request_duration_seconds", Histogram, ["acks"], "Time from receiving a produce request to answering it (acks=all includes waiting for the ISR).";
    FETCH_DURATION = "tally_fetch_request_duration_seconds", Histogram, [], "Time from receiving a consumer fetch to answering it (includes the long-poll wait).";
    REQUEST_ERRORS = "tally_request_errors_total", Counter, ["api", "code"], "Partitions of requests answered with an error, by API and error code name.";
    UNDER_REPLICATED = "tally_partitions_under_replicated", Gauge, [], "Partitions led here whose ISR is smaller than their replica set.";
    UNDER_MIN_ISR = "tally_partitions_under_min_isr", Gauge, [], "Partitions led here whose ISR is smaller than min_insync_replicas (acks=all produce fails).";
    OFFLINE = "tally_partitions_offline", Gauge, [], "Partitions without a leader; reported by the active controller only (0 elsewhere).";
    PARTITIONS_LED = "tally_partitions_leader", Gauge, [], "Partitions this broker leads.";
    ISR_SHRINKS = "tally_isr_shrinks_total", Counter, [], "ISR shrinks this broker proposed as leader and the controller committed.";
    ISR_EXPANDS = "tally_isr_expands_total", Counter, [], "ISR expansions this broker proposed as leader and the controller committed.";
    LEADER_ELECTIONS = "tally_leader_elections_total", Counter, [], "Partition leaderships this broker took on, each a new leader epoch (the cluster's sum counts every election of a live leader).";
    CONTROLLER_ACTIVE = "tally_controller_active", Gauge, [], "1 on the broker whose voter leads the controller quorum, else 0.";
    RAFT_TERM = "tally_raft_term", Gauge, [], "The controller quorum's current Raft term as this voter knows it.";
    RAFT_LAST_LOG_INDEX = "tally_raft_last_log_index", Gauge, [], "Last index in this voter's metadata log.";
    RAFT_APPLIED_INDEX = "tally_raft_applied_index", Gauge, [], "Highest committed metadata log index applied by this voter.";
    FLUSH_DURATION = "tally_log_flush_duration_seconds", Histogram, [], "Time of one fsync of a partition's log files (one group commit).";
    LOG_SIZE = "tally_log_size_bytes", Gauge, ["topic", "partition"], "Bytes of a hosted partition's segments on disk.";
    GROUP_LAG = "tally_consumer_group_lag", Gauge, ["group", "topic", "partition"], "High watermark minus the committed offset, per group and partition, reported by the group's coordinator.";
    GROUP_MEMBERS = "tally_consumer_group_members", Gauge, ["group"], "Members of a group, reported by its coordinator.";
    PRODUCER_IDS = "tally_producer_ids", Gauge, [], "Producer ids tracked by the partitions hosted here (idempotence state).";
    CONNECTIONS = "tally_connections_open", Gauge, [], "Client and peer TCP connections open to the broker's gRPC listener.";
    NETWORK_RECEIVED = "tally_network_received_bytes_total", Counter, [], "Bytes received on the gRPC listener's connections (client and peer requests, including replica fetches), TCP payload.";
    NETWORK_SENT = "tally_network_sent_bytes_total", Counter, [], "Bytes sent on the gRPC listener's connections (answers to clients and peers, including replica fetches), TCP payload.";
}

/// Histogram buckets for request and fsync times, in seconds.
const BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// A gauge not set for this long leaves the output (see [`install`]).
const GAUGE_IDLE: Duration = Duration::from_secs(10);

static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();

/// Installs the process's Prometheus recorder (once; later calls return the
/// same handle) and describes every metric of the [`CATALOGUE`].
pub fn install() -> Result<PrometheusHandle, String> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets(BUCKETS)
                .map_err(|e| format!("metrics buckets: {e}"))?
                // Every gauge is set at each scrape, just before the render
                // (`sample.rs`): one not set for this long belongs to a
                // partition or group that went away (or a coordinator that
                // moved), and leaves the output.
                .idle_timeout(metrics_util::MetricKindMask::GAUGE, Some(GAUGE_IDLE));
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
            describe();
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(Duration::from_secs(5));
                        upkeep.run_upkeep();
                    }
                })
                .map_err(|e| format!("cannot start the metrics upkeep thread: {e}"))?;
            Ok(handle)
        })
        .clone()
}

/// Describes every metric, and registers the unlabelled counters at zero
/// so a scrape lists them before their first event.
fn describe() {
    for m in CATALOGUE {
        if m.kind == Kind::Counter && m.labels.is_empty() {
            counter!(m.name).increment(0);
        }
        match m.kind {
            Kind::Counter => describe_counter!(m.name, m.help),
            Kind::Gauge => {
                let unit = if m.name.ends_with("_bytes") { Unit::Bytes } else { Unit::Count };
                describe_gauge!(m.name, unit, m.help);
            }
            Kind::Histogram => describe_histogram!(m.name, Unit::Seconds, m.help),
        }
    }
}

/// A topic's traffic counters, registered once per topic so the hot path
/// only adds to atomics.
#[derive(Debug, Clone)]
pub struct TopicMetrics {
    bytes_in: Counter,
    records_in: Counter,
    bytes_out: Counter,
    records_out: Counter,
}

impl TopicMetrics {
    /// The counters of `topic`.
    pub fn new(topic: &str) -> TopicMetrics {
        let label = || [("topic", topic.to_string())];
        TopicMetrics {
            bytes_in: counter!(BYTES_IN, &label()),
            records_in: counter!(RECORDS_IN, &label()),
            bytes_out: counter!(BYTES_OUT, &label()),
            records_out: counter!(RECORDS_OUT, &label()),
        }
    }

    /// A produce appended `records` records in `bytes` bytes.
    pub fn produced(&self, bytes: u64, records: u64) {
        self.bytes_in.increment(bytes);
        self.records_in.increment(records);
    }

    /// A fetch sent `chunks` (whole record batches) to a consumer.
    pub fn fetched(&self, chunks: &[bytes::Bytes]) {
        let (bytes, records) = chunks.iter().fold((0, 0), |(b, r), c| (b + c.len() as u64, r + records_in_batches(c)));
        self.bytes_out.increment(bytes);
        self.records_out.increment(records);
    }
}

/// Records counted from the headers of the v2 record batches in `data`
/// (no decoding: base offset 8, length 4, record count at byte 57).
pub fn records_in_batches(data: &[u8]) -> u64 {
    let mut at = 0usize;
    let mut records = 0u64;
    while at + 61 <= data.len() {
        let len = i32::from_be_bytes([data[at + 8], data[at + 9], data[at + 10], data[at + 11]]);
        let count = i32::from_be_bytes([data[at + 57], data[at + 58], data[at + 59], data[at + 60]]);
        records += u64::try_from(count).unwrap_or(0);
        let Ok(len) = usize::try_from(len) else { break };
        at += 12 + len;
    }
    records
}

/// Counts a partition of a request answered with `code` (a wire error code).
pub fn request_error(api: &'static str, code: i32) {
    let name = tally_proto::ErrorCode::try_from(code).map_or("UNKNOWN_SERVER_ERROR", |c| c.as_str_name());
    counter!(REQUEST_ERRORS, "api" => api, "code" => name).increment(1);
}

/// The request-time histograms of the data path, registered once (after
/// the recorder is installed) so a request records into an atomic instead
/// of looking its series up.
#[derive(Debug, Clone)]
pub struct RequestTimes {
    /// Produce, by acks level: 0, 1, all, invalid.
    produce: [metrics::Histogram; 4],
    fetch: metrics::Histogram,
}

impl RequestTimes {
    /// Registers the series.
    pub fn new() -> RequestTimes {
        RequestTimes {
            produce: ["0", "1", "all", "invalid"].map(|acks| metrics::histogram!(PRODUCE_DURATION, "acks" => acks)),
            fetch: metrics::histogram!(FETCH_DURATION),
        }
    }

    /// A produce request with wire `acks` took `seconds`.
    pub fn produce(&self, acks: i32, seconds: f64) {
        let i = match acks_label(acks) {
            "0" => 0,
            "1" => 1,
            "all" => 2,
            _ => 3,
        };
        self.produce[i].record(seconds);
    }

    /// A consumer fetch took `seconds`.
    pub fn fetch(&self, seconds: f64) {
        self.fetch.record(seconds);
    }
}

impl Default for RequestTimes {
    fn default() -> Self {
        Self::new()
    }
}

/// The `acks` label of a produce request.
pub fn acks_label(acks: i32) -> &'static str {
    match tally_proto::v1::Acks::try_from(acks) {
        Ok(tally_proto::v1::Acks::None) => "0",
        Ok(tally_proto::v1::Acks::Leader) => "1",
        Ok(tally_proto::v1::Acks::All) => "all",
        Err(_) => "invalid",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions() {
        let mut seen = std::collections::BTreeSet::new();
        for m in CATALOGUE {
            assert!(m.name.starts_with("tally_"), "{}", m.name);
            assert!(seen.insert(m.name), "{} listed twice", m.name);
            match m.kind {
                Kind::Counter => assert!(m.name.ends_with("_total"), "{}", m.name),
                Kind::Histogram => assert!(m.name.ends_with("_seconds"), "{}", m.name),
                Kind::Gauge => assert!(!m.name.ends_with("_total"), "{}", m.name),
            }
        }
    }

    #[test]
    fn records_are_counted_from_batch_headers() {
        let mut batch = vec![0u8; 61 + 9];
        let len = (batch.len() - 12) as i32;
        batch[8..12].copy_from_slice(&len.to_be_bytes());
        batch[57..61].copy_from_slice(&7i32.to_be_bytes());
        let two = [batch.clone(), batch].concat();
        assert_eq!(records_in_batches(&two), 14);
        // A torn tail (shorter than a header) counts nothing more.
        assert_eq!(records_in_batches(&two[..two.len() - 20]), 7);
    }
}
