//! `tally bench partitions --brokers 3 --replication-factor 3`: what
//! replication costs at partition scale. A local cluster of `tally serve`
//! children (every broker a controller voter, metrics on) gets one busy
//! partition and then `count - 1` idle ones, and the benchmark prints:
//!
//! - acks=all produce latency (p50/p99/p99.9) and records/s of the busy
//!   partition (its own topic, min ISR 2) through one Producer sending one
//!   record at a time, the next after the previous one's acknowledgement:
//!   first alone, then with the idle partitions replicating beside it;
//! - the time from the idle topic's create request until every partition is
//!   replicated: led, its ISR the whole replica set, and each follower
//!   fetching in the leader's epoch (as `describe` reports its lag);
//! - over a quiet window (no produce) before and after the idle partitions
//!   exist: the gRPC listeners' traffic (`tally_network_received_bytes_total`
//!   plus `tally_network_sent_bytes_total`, summed over the brokers, as
//!   bytes/s) and each broker's CPU (utime + stime from /proc, as a share of
//!   one core);
//! - each broker's RssAnon before any topic and with all partitions.
//!
//! The quiet windows come after a settling pause and before each latency
//! run, with no producer open; the client's own connection stays open (its
//! metadata traffic, if any, is counted).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hdrhistogram::Histogram;
use tally_client::{Acks, Client, NewTopic, Producer, ProducerConfig, ProducerRecord};

use super::{PartitionsParams, metric_value, scrape};
use crate::bench::{LocalCluster, cpu_seconds, text_values};
use crate::child::rss_anon_kib;

/// Most brokers the replicated mode starts.
pub const BROKERS_MAX: u32 = 9;
/// The busy partition's topic.
pub const BUSY_TOPIC: &str = "busy";
/// The idle partitions' topic.
pub const IDLE_TOPIC: &str = "idle";
/// Pause before each quiet window, so the tail of creation or of the last
/// run is not counted.
const SETTLE: Duration = Duration::from_secs(2);
/// Longest wait for a topic's partitions to be replicated.
const REPLICATED_MAX: Duration = Duration::from_secs(900);
/// How often `describe` is asked while waiting.
const POLL: Duration = Duration::from_millis(250);
/// Longest unmeasured warm-up before each latency run (a fifth of the run
/// when that is shorter).
const WARMUP_MAX: Duration = Duration::from_secs(1);

/// One acks=all latency run of the busy partition.
#[derive(Debug, Clone, Copy, Default)]
pub struct LatencyRun {
    /// Records acknowledged in the measured time (each one a sample).
    pub records: u64,
    /// Records acknowledged per second.
    pub records_per_s: f64,
    /// p50, p99 and p99.9 of send to acknowledgement, ms.
    pub latency_ms: [f64; 3],
}

/// One quiet window.
#[derive(Debug, Clone, Default)]
pub struct IdleWindow {
    /// Its length, s.
    pub seconds: f64,
    /// Bytes received plus sent on every broker's gRPC listener.
    pub network_bytes: u64,
    /// Each broker's CPU over the window, % of one core (broker 1 first).
    pub cpu_percent: Vec<f64>,
}

impl IdleWindow {
    /// Network bytes per second.
    pub fn bytes_per_s(&self) -> f64 {
        self.network_bytes as f64 / self.seconds.max(f64::EPSILON)
    }
}

/// The replicated mode's figures.
#[derive(Debug, Clone, Default)]
pub struct ReplicatedReport {
    /// Brokers in the cluster.
    pub brokers: u32,
    /// Replicas per partition.
    pub replication_factor: u32,
    /// The busy topic's min_insync_replicas.
    pub min_insync_replicas: u32,
    /// Partitions in all: the busy one and the idle ones.
    pub partitions: u64,
    /// Value bytes of the latency runs' records.
    pub record_size: usize,
    /// The busy partition alone.
    pub alone: LatencyRun,
    /// The busy partition beside the idle ones.
    pub with_idle: LatencyRun,
    /// Seconds from the idle topic's create request until every partition
    /// is replicated.
    pub create_s: f64,
    /// The quiet window with the busy partition only.
    pub idle_alone: IdleWindow,
    /// The quiet window with every partition.
    pub idle_with: IdleWindow,
    /// Each broker's RssAnon in KiB: before any topic, and with every
    /// partition (broker 1 first).
    pub rss_anon_kib: Vec<(u64, u64)>,
    /// Each broker's peak RssAnon over the whole run, MiB.
    pub peak_rss_anon_mib: Vec<f64>,
}

impl ReplicatedReport {
    /// Idle partitions.
    pub fn idle_partitions(&self) -> u64 {
        self.partitions.saturating_sub(1)
    }
}

/// `with / alone`, or NaN when `alone` is 0.
fn ratio(with: f64, alone: f64) -> f64 {
    if alone > 0.0 { with / alone } else { f64::NAN }
}

impl std::fmt::Display for ReplicatedReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let idle = self.idle_partitions();
        let with_label = format!("with {idle} idle");
        writeln!(
            f,
            "brokers {}, replication factor {}, min ISR {} (busy topic): {} partitions, {} replicas; 1 busy, {idle} idle",
            self.brokers,
            self.replication_factor,
            self.min_insync_replicas,
            self.partitions,
            self.partitions * u64::from(self.replication_factor)
        )?;
        writeln!(
            f,
            "create until replicated     {:.2} s for {idle} idle partitions (each led, full ISR, every follower fetching)",
            self.create_s
        )?;
        writeln!(f)?;
        writeln!(
            f,
            "{:<36} {:>8} {:>8} {:>8} {:>10} {:>8}",
            format!("acks=all, one {} B record at a time", self.record_size),
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "records/s",
            "samples"
        )?;
        let run = |f: &mut std::fmt::Formatter<'_>, label: &str, r: &LatencyRun| {
            writeln!(
                f,
                "{:<36} {:>8.3} {:>8.3} {:>8.3} {:>10.0} {:>8}",
                label, r.latency_ms[0], r.latency_ms[1], r.latency_ms[2], r.records_per_s, r.records
            )
        };
        run(f, "latency alone", &self.alone)?;
        run(f, &format!("latency {with_label}"), &self.with_idle)?;
        let (a, w) = (&self.alone, &self.with_idle);
        writeln!(
            f,
            "{:<36} {:>8.2} {:>8.2} {:>8.2} {:>10.2}",
            "latency ratio (with / alone)",
            ratio(w.latency_ms[0], a.latency_ms[0]),
            ratio(w.latency_ms[1], a.latency_ms[1]),
            ratio(w.latency_ms[2], a.latency_ms[2]),
            ratio(w.records_per_s, a.records_per_s)
        )?;
        writeln!(f)?;
        writeln!(
            f,
            "{:<36} {:>12}  CPU % of one core, per broker",
            format!("quiet window of {:.0} s, no produce", self.idle_with.seconds),
            "network B/s"
        )?;
        let window = |f: &mut std::fmt::Formatter<'_>, label: &str, w: &IdleWindow| {
            let cpu: Vec<String> = w.cpu_percent.iter().map(|c| format!("{c:.1}")).collect();
            writeln!(f, "{:<36} {:>12.0}  {}", label, w.bytes_per_s(), cpu.join(" "))
        };
        window(f, "idle traffic alone", &self.idle_alone)?;
        window(f, &format!("idle traffic {with_label}"), &self.idle_with)?;
        let per_partition = (self.idle_with.bytes_per_s() - self.idle_alone.bytes_per_s()) / idle.max(1) as f64;
        writeln!(f, "{:<36} {:>12.2}", "idle traffic per idle partition", per_partition)?;
        writeln!(f)?;
        let hosted = self.partitions as f64 * f64::from(self.replication_factor) / f64::from(self.brokers.max(1));
        writeln!(
            f,
            "{:<36} {:>10} {:>10} {:>9} {:>11}",
            format!("RssAnon ({hosted:.0} replicas per broker)"),
            "before MiB",
            "after MiB",
            "peak MiB",
            "KiB/replica"
        )?;
        for (i, (before, after)) in self.rss_anon_kib.iter().enumerate() {
            let peak = self.peak_rss_anon_mib.get(i).copied().unwrap_or(f64::NAN);
            write!(
                f,
                "{:<36} {:>10.1} {:>10.1} {:>9.1} {:>11.1}",
                format!("broker {}", i + 1),
                *before as f64 / 1024.0,
                *after as f64 / 1024.0,
                peak,
                after.saturating_sub(*before) as f64 / hosted.max(1.0)
            )?;
            if i + 1 < self.rss_anon_kib.len() {
                writeln!(f)?;
            }
        }
        Ok(())
    }
}

/// Refuses settings the replicated mode cannot run, listing every problem.
pub fn validate(p: &PartitionsParams) -> anyhow::Result<()> {
    let mut problems = Vec::new();
    if p.brokers < 2 || p.brokers > BROKERS_MAX {
        problems.push(format!("--brokers must be 2 ..= {BROKERS_MAX} for the replicated mode, not {}", p.brokers));
    }
    if p.replication_factor < 1 || p.replication_factor > p.brokers {
        problems.push(format!("--replication-factor {} needs 1 ..= --brokers ({})", p.replication_factor, p.brokers));
    }
    if p.count < 2 {
        problems.push(format!("--count {} leaves no idle partition beside the busy one: use at least 2", p.count));
    }
    if p.topics != 1 {
        problems.push("--topics applies to one broker only: the replicated mode has one idle topic".to_string());
    }
    if p.produce.is_zero() || p.idle.is_zero() {
        problems.push("--produce-s and --idle-s must be above 0".to_string());
    }
    anyhow::ensure!(problems.is_empty(), "{}", problems.join("; "));
    Ok(())
}

/// Runs the replicated mode: starts the cluster (data under
/// `p.data_dir`, which the caller removes), measures, stops it.
pub async fn run(p: &PartitionsParams, mut progress: impl FnMut(&str)) -> anyhow::Result<ReplicatedReport> {
    validate(p)?;
    std::fs::create_dir_all(&p.data_dir)?;
    progress(&format!("starting {} brokers", p.brokers));
    let cluster = LocalCluster::start_with(&p.binary, &p.data_dir, p.brokers, &["--metrics-listen", "127.0.0.1:0"])
        .await
        .context("cannot start the cluster")?;
    let measured = measure(&cluster, p, &mut progress).await;
    progress("stopping the brokers");
    let peaks = cluster.stop().await;
    let mut report = measured?;
    report.peak_rss_anon_mib = peaks.into_iter().map(|(_, mib)| mib).collect();
    Ok(report)
}

/// A broker as the measurements see it.
struct Observed {
    pid: u32,
    metrics: String,
}

async fn measure(
    cluster: &LocalCluster,
    p: &PartitionsParams,
    progress: &mut impl FnMut(&str),
) -> anyhow::Result<ReplicatedReport> {
    let brokers: Vec<Observed> = cluster
        .processes()
        .iter()
        .map(|b| {
            let metrics = b.metrics_address.clone().context("a broker printed no metrics address")?;
            Ok(Observed { pid: b.pid(), metrics })
        })
        .collect::<anyhow::Result<_>>()?;
    let client = &cluster.client;
    let rf = p.replication_factor;
    let min_isr = rf.min(2);
    let record_size = p.record_size;
    let mut report = ReplicatedReport {
        brokers: p.brokers,
        replication_factor: rf,
        min_insync_replicas: min_isr,
        partitions: u64::from(p.count),
        record_size,
        ..Default::default()
    };
    let rss_before: Vec<u64> = brokers.iter().map(|b| rss_anon_kib(b.pid).unwrap_or(0)).collect();

    progress("creating the busy partition");
    let configs = BTreeMap::from([("min_insync_replicas".to_string(), min_isr.to_string())]);
    create(client, NewTopic { name: BUSY_TOPIC.into(), partitions: 1, replication_factor: rf, configs }).await?;
    wait_replicated(client, BUSY_TOPIC, 1, rf).await?;
    progress(&format!("quiet window, busy partition alone ({:?})", p.idle));
    tokio::time::sleep(SETTLE).await;
    report.idle_alone = idle_window(&brokers, p.idle).await?;
    progress("acks=all latency, busy partition alone");
    report.alone = latency_run(client, p).await?;

    let idle = p.count - 1;
    progress(&format!("creating {idle} idle partitions, replication factor {rf}"));
    let started = Instant::now();
    let topic =
        NewTopic { name: IDLE_TOPIC.into(), partitions: idle, replication_factor: rf, configs: BTreeMap::new() };
    create(client, topic).await?;
    wait_replicated(client, IDLE_TOPIC, idle, rf).await?;
    report.create_s = started.elapsed().as_secs_f64();
    tokio::time::sleep(SETTLE).await;
    let rss_after = brokers.iter().map(|b| rss_anon_kib(b.pid).unwrap_or(0));
    report.rss_anon_kib = rss_before.into_iter().zip(rss_after).collect();
    progress(&format!("quiet window with {idle} idle partitions ({:?})", p.idle));
    report.idle_with = idle_window(&brokers, p.idle).await?;
    progress(&format!("acks=all latency, busy partition with {idle} idle ones"));
    report.with_idle = latency_run(client, p).await?;
    Ok(report)
}

async fn create(client: &Client, topic: NewTopic) -> anyhow::Result<()> {
    let name = topic.name.clone();
    client.admin().create_topic(topic).await.with_context(|| format!("cannot create topic {name}"))?;
    Ok(())
}

/// Waits until each of `topic`'s `partitions` partitions is led, its ISR
/// is all `replication_factor` replicas, its leader serves it (answers
/// with a high watermark) and every follower has fetched in the leader's
/// epoch (the leader reports its lag).
async fn wait_replicated(client: &Client, topic: &str, partitions: u32, replication_factor: u32) -> anyhow::Result<()> {
    let deadline = Instant::now() + REPLICATED_MAX;
    let rf = replication_factor as usize;
    loop {
        let ready = client.admin().describe_topic(topic).await.is_ok_and(|d| {
            d.partitions.len() == partitions as usize
                && d.partitions.iter().all(|q| {
                    q.leader.is_some()
                        && q.isr.len() == rf
                        && q.high_watermark >= 0
                        && q.replica_lags.len() == rf - 1
                        && q.replica_lags.iter().all(|(_, lag)| lag.is_some())
                })
        });
        if ready {
            client.refresh_metadata(&[topic.to_string()]).await?;
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "topic {topic}'s {partitions} partitions were not all replicated within {REPLICATED_MAX:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Network bytes (received + sent) of a broker's gRPC listener so far.
async fn network_bytes(b: &Observed) -> anyhow::Result<u64> {
    let body = scrape(&b.metrics).await.with_context(|| format!("cannot scrape {}", b.metrics))?;
    let value = |name| metric_value(&body, name).with_context(|| format!("no {name} in the scrape of {}", b.metrics));
    let total = value("tally_network_received_bytes_total")? + value("tally_network_sent_bytes_total")?;
    Ok(total as u64)
}

/// Waits `length` with nothing produced; returns the traffic and CPU.
async fn idle_window(brokers: &[Observed], length: Duration) -> anyhow::Result<IdleWindow> {
    let mut net_before = 0u64;
    for b in brokers {
        net_before += network_bytes(b).await?;
    }
    let cpu_before: Vec<Option<f64>> = brokers.iter().map(|b| cpu_seconds(b.pid)).collect();
    let started = Instant::now();
    tokio::time::sleep(length).await;
    let cpu_after: Vec<Option<f64>> = brokers.iter().map(|b| cpu_seconds(b.pid)).collect();
    let seconds = started.elapsed().as_secs_f64();
    let mut net_after = 0u64;
    for b in brokers {
        net_after += network_bytes(b).await?;
    }
    let cpu_percent = cpu_before
        .iter()
        .zip(&cpu_after)
        .map(|(before, after)| match (before, after) {
            (Some(b), Some(a)) => 100.0 * (a - b) / seconds,
            _ => f64::NAN,
        })
        .collect();
    Ok(IdleWindow { seconds, network_bytes: net_after.saturating_sub(net_before), cpu_percent })
}

/// One Producer (acks=all, no linger) sends one record to the busy
/// partition, waits for its acknowledgement, sends the next: a warm-up,
/// then `p.produce` measured.
async fn latency_run(client: &Client, p: &PartitionsParams) -> anyhow::Result<LatencyRun> {
    let mut config = ProducerConfig::default();
    config.acks = Acks::All;
    config.linger = Duration::ZERO;
    let producer = Producer::try_new(client.clone(), config)?;
    let value = text_values(p.record_size, 1).pop().unwrap_or_default();
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).context("histogram bounds")?;
    let warmup = (p.produce / 5).min(WARMUP_MAX);
    let measure_from = Instant::now() + warmup;
    let end = measure_from + p.produce;
    let outcome = async {
        loop {
            let sent = Instant::now();
            if sent >= end {
                return anyhow::Ok(());
            }
            let delivery = producer.send(ProducerRecord::new(BUSY_TOPIC, &value)).await?;
            delivery.await.map_err(|e| anyhow::anyhow!("acks=all produce failed: {e}"))?;
            if sent >= measure_from {
                let micros = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
                histogram.saturating_record(micros.max(1));
            }
        }
    }
    .await;
    producer.close().await;
    outcome?;
    let records = histogram.len();
    Ok(LatencyRun {
        records,
        records_per_s: records as f64 / p.produce.as_secs_f64(),
        latency_ms: [0.5, 0.99, 0.999].map(|q| histogram.value_at_quantile(q) as f64 / 1000.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> PartitionsParams {
        PartitionsParams {
            binary: "tally".into(),
            data_dir: "unused".into(),
            count: 30,
            topics: 1,
            produce: Duration::from_secs(1),
            record_size: 1024,
            brokers: 3,
            replication_factor: 3,
            idle: Duration::from_secs(1),
        }
    }

    #[test]
    fn validate_lists_every_impossible_setting() {
        assert!(validate(&params()).is_ok());
        let p = PartitionsParams { replication_factor: 4, count: 1, topics: 3, ..params() };
        let err = validate(&p).unwrap_err().to_string();
        assert!(err.contains("--replication-factor 4 needs 1 ..= --brokers (3)"), "{err}");
        assert!(err.contains("--count 1 leaves no idle partition"), "{err}");
        assert!(err.contains("--topics applies to one broker only"), "{err}");
        let err = validate(&PartitionsParams { brokers: 1, ..params() }).unwrap_err().to_string();
        assert!(err.contains("--brokers must be 2 ..= 9"), "{err}");
    }

    #[test]
    fn the_ratio_row_divides_with_by_alone() {
        let run = |p50: f64, rate: f64| LatencyRun { records: 10, records_per_s: rate, latency_ms: [p50, p50, p50] };
        let report = ReplicatedReport {
            brokers: 3,
            replication_factor: 3,
            min_insync_replicas: 2,
            partitions: 30,
            record_size: 1024,
            alone: run(2.0, 500.0),
            with_idle: run(3.0, 250.0),
            idle_alone: IdleWindow { seconds: 2.0, network_bytes: 100, cpu_percent: vec![1.0, 2.0, 3.0] },
            idle_with: IdleWindow { seconds: 2.0, network_bytes: 1260, cpu_percent: vec![1.0, 2.0, 3.0] },
            rss_anon_kib: vec![(1024, 2048); 3],
            ..Default::default()
        };
        let text = report.to_string();
        let ratio = text.lines().find(|l| l.starts_with("latency ratio")).unwrap();
        let figures: Vec<&str> = ratio.split_whitespace().skip(5).collect();
        assert_eq!(figures, ["1.50", "1.50", "1.50", "0.50"], "{text}");
        // (1260 - 100) / 2 s / 29 idle partitions.
        let per = text.lines().find(|l| l.starts_with("idle traffic per idle partition")).unwrap();
        assert_eq!(per.split_whitespace().last(), Some("20.00"), "{text}");
    }
}
