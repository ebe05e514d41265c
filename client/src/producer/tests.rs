//! Producer tests against a fake cluster that applies produce requests to
//! in-memory logs, and can hold, fail, or lose the answer of chosen requests.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use tally_proto::ErrorCode;
use tally_proto::batch::{BatchLimits, RecordBatch};
use tally_proto::v1::{self as pb};
use tokio::sync::Semaphore;

use super::transport::{Layout, Transport};
use super::*;

/// What the fake does with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Refused at the transport before anything is appended.
    Unavailable,
    /// Every partition answers NOT_LEADER_OR_FOLLOWER, nothing appended.
    NotLeader,
    /// Appended, but the answer is lost.
    LoseReply,
    /// Each partition appends only its first batch; the rest fail with a
    /// retriable storage error (a disk that filled up mid-request).
    FirstBatchOnly,
    /// Every partition refuses its batch for good (MESSAGE_TOO_LARGE),
    /// nothing appended.
    Refuse,
    /// The leaders forget every producer (the KIP-360 case), then apply
    /// the request.
    ForgetProducers,
}

/// The fake's producer-state table of one partition: per producer id, its
/// epoch and last five batches (first seq, last seq, base offset), with the
/// broker's rules.
#[derive(Default)]
struct Producers(HashMap<i64, (i16, LastBatches)>);

/// A producer's last batches: (first seq, last seq, base offset).
type LastBatches = std::collections::VecDeque<(i32, i32, i64)>;

enum SeqCheck {
    Append,
    Duplicate(i64),
    Refused(ErrorCode),
}

impl Producers {
    fn check(&self, pid: i64, epoch: i16, first: i32, last: i32) -> SeqCheck {
        let Some((known, batches)) = self.0.get(&pid) else {
            return if first == 0 { SeqCheck::Append } else { SeqCheck::Refused(ErrorCode::UnknownProducerId) };
        };
        if epoch < *known {
            return SeqCheck::Refused(ErrorCode::InvalidProducerEpoch);
        }
        if epoch > *known {
            return if first == 0 { SeqCheck::Append } else { SeqCheck::Refused(ErrorCode::OutOfOrderSequenceNumber) };
        }
        if let Some((_, _, base)) = batches.iter().find(|(f, l, _)| *f == first && *l == last) {
            return SeqCheck::Duplicate(*base);
        }
        let expected = batches.back().map_or(0, |(_, l, _)| l + 1);
        if first == expected { SeqCheck::Append } else { SeqCheck::Refused(ErrorCode::OutOfOrderSequenceNumber) }
    }

    fn record(&mut self, pid: i64, epoch: i16, first: i32, last: i32, base: i64) {
        let entry = self.0.entry(pid).or_insert_with(|| (epoch, Default::default()));
        if entry.0 != epoch {
            *entry = (epoch, Default::default());
        }
        entry.1.push_back((first, last, base));
        if entry.1.len() > 5 {
            entry.1.pop_front();
        }
    }
}

fn refusal(partition: u32, code: ErrorCode) -> pb::PartitionProduceResponse {
    pb::PartitionProduceResponse {
        partition,
        error_code: code as i32,
        error_message: format!("{code:?}"),
        base_offset: -1,
        log_append_time_ms: -1,
        log_start_offset: 0,
        leader_id: None,
        leader_epoch: None,
        appended_batches: 0,
        current_end_offset: None,
    }
}

type Script = Box<dyn Fn(usize, &pb::ProduceRequest) -> Option<Fault> + Send + Sync>;

struct Fake {
    partitions: Mutex<u32>,
    /// Leader of each partition (`None`: no leader right now).
    leaders: Mutex<Vec<Option<Arc<str>>>>,
    /// Record values appended to each partition, in order.
    logs: Mutex<HashMap<u32, Vec<Bytes>>>,
    /// Values whose request's answer was lost.
    lost: Mutex<Vec<Bytes>>,
    /// Producer state per partition.
    producers: Mutex<HashMap<u32, Producers>>,
    /// Producer ids handed out.
    next_producer_id: AtomicUsize,
    /// InitProducerId calls that bumped an epoch.
    bumps: AtomicUsize,
    /// Bumps to refuse (as a broker that cannot reach the controller would)
    /// before one succeeds.
    failing_bumps: AtomicUsize,
    /// Batches answered as duplicates.
    duplicates: AtomicUsize,
    /// Batches refused for their sequence (or epoch, or unknown producer).
    sequence_refusals: AtomicUsize,
    /// Most requests seen in flight for one partition at once.
    max_partition_in_flight: AtomicUsize,
    partition_in_flight: Mutex<HashMap<u32, usize>>,
    requests: AtomicUsize,
    /// Partition answers that appended only a prefix.
    partial: AtomicUsize,
    /// Requests a fault was applied to.
    faults: AtomicUsize,
    /// Partitions per request, in arrival order.
    shapes: Mutex<Vec<usize>>,
    in_flight: AtomicUsize,
    max_in_flight_seen: AtomicUsize,
    /// Requests wait for a permit here (none taken while `gate` is open).
    gate: Arc<Semaphore>,
    gated: std::sync::atomic::AtomicBool,
    /// How long each request takes.
    delay: Mutex<Duration>,
    script: Script,
}

impl Fake {
    fn new(partitions: u32, script: Script) -> Arc<Fake> {
        Arc::new(Fake {
            partitions: Mutex::new(partitions),
            leaders: Mutex::new((0..partitions).map(|p| Some(Arc::from(format!("b{}", p % 2)))).collect()),
            logs: Mutex::new(HashMap::new()),
            lost: Mutex::new(Vec::new()),
            producers: Mutex::new(HashMap::new()),
            next_producer_id: AtomicUsize::new(1000),
            bumps: AtomicUsize::new(0),
            failing_bumps: AtomicUsize::new(0),
            duplicates: AtomicUsize::new(0),
            sequence_refusals: AtomicUsize::new(0),
            max_partition_in_flight: AtomicUsize::new(0),
            partition_in_flight: Mutex::new(HashMap::new()),
            requests: AtomicUsize::new(0),
            partial: AtomicUsize::new(0),
            faults: AtomicUsize::new(0),
            shapes: Mutex::new(Vec::new()),
            in_flight: AtomicUsize::new(0),
            max_in_flight_seen: AtomicUsize::new(0),
            gate: Arc::new(Semaphore::new(0)),
            gated: std::sync::atomic::AtomicBool::new(false),
            delay: Mutex::new(Duration::ZERO),
            script,
        })
    }

    fn healthy(partitions: u32) -> Arc<Fake> {
        Fake::new(partitions, Box::new(|_, _| None))
    }

    fn log(&self, partition: u32) -> Vec<Bytes> {
        self.logs.lock().unwrap().get(&partition).cloned().unwrap_or_default()
    }

    /// Applies the request; the answer per partition.
    fn apply(&self, request: &pb::ProduceRequest, fault: Option<Fault>) -> pb::ProduceResponse {
        let mut logs = self.logs.lock().unwrap();
        let mut producers = self.producers.lock().unwrap();
        if fault == Some(Fault::ForgetProducers) {
            producers.clear();
        }
        let mut topics = Vec::new();
        for t in &request.topics {
            let mut partitions = Vec::new();
            for p in &t.partitions {
                if fault == Some(Fault::Refuse) {
                    partitions.push(refusal(p.partition, ErrorCode::MessageTooLarge));
                    continue;
                }
                let first = RecordBatch::validate(p.records[0].clone(), &BatchLimits::default()).expect("valid");
                let h = first.header();
                if h.producer_id() >= 0 {
                    assert_eq!(p.records.len(), 1, "one batch per partition from an idempotent producer");
                    let (pid, epoch, seq) = (h.producer_id(), h.producer_epoch(), h.base_sequence());
                    let last = seq + h.last_offset_delta();
                    let table = producers.entry(p.partition).or_default();
                    let log = logs.entry(p.partition).or_default();
                    let answer = match (fault, table.check(pid, epoch, seq, last)) {
                        (Some(Fault::NotLeader), _) => refusal(p.partition, ErrorCode::NotLeaderOrFollower),
                        (_, SeqCheck::Refused(code)) => {
                            self.sequence_refusals.fetch_add(1, Ordering::SeqCst);
                            refusal(p.partition, code)
                        }
                        (_, SeqCheck::Duplicate(base)) => {
                            self.duplicates.fetch_add(1, Ordering::SeqCst);
                            pb::PartitionProduceResponse {
                                base_offset: base,
                                error_code: 0,
                                ..refusal(p.partition, ErrorCode::None)
                            }
                        }
                        (_, SeqCheck::Append) => {
                            let base = log.len() as i64;
                            for r in first.records().expect("records") {
                                let value = r.expect("record").value.expect("value");
                                if fault == Some(Fault::LoseReply) {
                                    self.lost.lock().unwrap().push(value.clone());
                                }
                                log.push(value);
                            }
                            table.record(pid, epoch, seq, last, base);
                            pb::PartitionProduceResponse {
                                base_offset: base,
                                error_code: 0,
                                ..refusal(p.partition, ErrorCode::None)
                            }
                        }
                    };
                    partitions.push(pb::PartitionProduceResponse { error_message: String::new(), ..answer });
                    continue;
                }
                if fault == Some(Fault::NotLeader) {
                    partitions.push(refusal(p.partition, ErrorCode::NotLeaderOrFollower));
                    continue;
                }
                let log = logs.entry(p.partition).or_default();
                let base = log.len() as i64;
                let cut = if fault == Some(Fault::FirstBatchOnly) && p.records.len() > 1 { 1 } else { usize::MAX };
                for chunk in p.records.iter().take(cut) {
                    // The broker's own checks: a batch it would refuse fails the test.
                    let batch =
                        RecordBatch::validate(chunk.clone(), &BatchLimits::default()).expect("a valid batch per chunk");
                    for r in batch.records().expect("records") {
                        let value = r.expect("record").value.expect("value");
                        if fault == Some(Fault::LoseReply) {
                            self.lost.lock().unwrap().push(value.clone());
                        }
                        log.push(value);
                    }
                }
                let partial = cut < p.records.len();
                partitions.push(pb::PartitionProduceResponse {
                    partition: p.partition,
                    error_code: if partial { ErrorCode::KafkaStorageError as i32 } else { 0 },
                    error_message: if partial { "disk full".into() } else { String::new() },
                    base_offset: base,
                    log_append_time_ms: -1,
                    log_start_offset: 0,
                    leader_id: None,
                    leader_epoch: None,
                    appended_batches: if partial { 1 } else { 0 },
                    current_end_offset: None,
                });
                if partial {
                    self.partial.fetch_add(1, Ordering::SeqCst);
                }
            }
            topics.push(pb::TopicProduceResponse { name: t.name.clone(), partitions });
        }
        pb::ProduceResponse { topics }
    }
}

/// The transport over a shared fake.
struct FakeTransport(Arc<Fake>);

impl Transport for FakeTransport {
    fn layout<'a>(&'a self, _topic: &'a str, _fresh: bool) -> BoxFuture<'a, crate::Result<Layout>> {
        Box::pin(async move {
            let n = *self.0.partitions.lock().unwrap();
            let leaders = self.0.leaders.lock().unwrap();
            Ok(Layout { partitions: n, available: (0..n as usize).map(|p| leaders[p].is_some()).collect() })
        })
    }

    fn leader(&self, _topic: &str, partition: u32) -> Option<Arc<str>> {
        self.0.leaders.lock().unwrap().get(partition as usize).cloned().flatten()
    }

    fn refresh(&self, _topic: Arc<str>) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }

    fn produce(
        &self,
        _leader: Arc<str>,
        request: pb::ProduceRequest,
    ) -> BoxFuture<'static, crate::Result<pb::ProduceResponse>> {
        let fake = self.0.clone();
        Box::pin(async move {
            let n = fake.requests.fetch_add(1, Ordering::SeqCst);
            let now = fake.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            fake.max_in_flight_seen.fetch_max(now, Ordering::SeqCst);
            let partitions: Vec<u32> =
                request.topics.iter().flat_map(|t| t.partitions.iter().map(|p| p.partition)).collect();
            for p in &partitions {
                let mut counts = fake.partition_in_flight.lock().unwrap();
                let c = counts.entry(*p).or_default();
                *c += 1;
                fake.max_partition_in_flight.fetch_max(*c, Ordering::SeqCst);
            }
            fake.shapes.lock().unwrap().push(request.topics.iter().map(|t| t.partitions.len()).sum());
            if fake.gated.load(Ordering::SeqCst) {
                fake.gate.acquire().await.expect("gate").forget();
            }
            let delay = *fake.delay.lock().unwrap();
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let fault = (fake.script)(n, &request);
            if fault.is_some() {
                fake.faults.fetch_add(1, Ordering::SeqCst);
            }
            let answer = match fault {
                Some(Fault::Unavailable) => Err(Error::Rpc { code: tonic::Code::Unavailable, message: "down".into() }),
                Some(Fault::LoseReply) => {
                    fake.apply(&request, fault);
                    Err(Error::Rpc { code: tonic::Code::Unavailable, message: "reply lost".into() })
                }
                _ => Ok(fake.apply(&request, fault)),
            };
            fake.in_flight.fetch_sub(1, Ordering::SeqCst);
            for p in &partitions {
                *fake.partition_in_flight.lock().unwrap().get_mut(p).expect("counted") -= 1;
            }
            answer
        })
    }

    fn partition_failed(&self, _topic: &str, _partition: u32, _error: &Error, _hint: Option<(u32, u32)>) {}

    fn init_producer_id(&self, current: Option<(i64, i16)>) -> BoxFuture<'static, crate::Result<(i64, i16)>> {
        let fake = self.0.clone();
        Box::pin(async move {
            match current {
                None => Ok((fake.next_producer_id.fetch_add(1, Ordering::SeqCst) as i64, 0)),
                Some((id, epoch)) => {
                    let refuse =
                        fake.failing_bumps.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
                    if refuse.is_ok() {
                        return Err(Error::Rpc { code: tonic::Code::Unavailable, message: "controller away".into() });
                    }
                    fake.bumps.fetch_add(1, Ordering::SeqCst);
                    Ok((id, epoch + 1))
                }
            }
        })
    }
}

/// A producer without idempotence (the tests of batching and plain
/// retries); `idempotent_config` for the idempotent one.
fn config() -> ProducerConfig {
    ProducerConfig {
        linger: Duration::from_millis(2),
        batch_bytes: 2048,
        retry_backoff: Duration::from_millis(1),
        retry_backoff_max: Duration::from_millis(4),
        idempotence: Some(false),
        ..ProducerConfig::default()
    }
}

fn idempotent_config() -> ProducerConfig {
    ProducerConfig { idempotence: None, ..config() }
}

fn producer(fake: &Arc<Fake>, config: ProducerConfig) -> Producer {
    Producer::with_transport(Arc::new(FakeTransport(fake.clone())), config, Duration::from_secs(300))
        .expect("valid config")
}

fn value(i: usize) -> Vec<u8> {
    format!("record-{i:06}").into_bytes()
}

/// Sends `n` records keyed to `partitions` partitions round robin; returns
/// what each partition was sent, in order, and the delivery futures.
async fn send_keyed(p: &Producer, n: usize, partitions: u32) -> (HashMap<u32, Vec<Bytes>>, Vec<DeliveryFuture>) {
    let mut sent: HashMap<u32, Vec<Bytes>> = HashMap::new();
    let mut deliveries = Vec::new();
    for i in 0..n {
        let partition = (i as u32) % partitions;
        let v = value(i);
        deliveries.push(p.send(ProducerRecord::new("t", &v).partition(partition)).await.unwrap());
        sent.entry(partition).or_default().push(Bytes::from(v));
    }
    (sent, deliveries)
}

#[tokio::test]
async fn every_record_lands_once_in_order_with_its_offset() {
    let fake = Fake::healthy(3);
    let p = producer(&fake, config());
    let (sent, deliveries) = send_keyed(&p, 3000, 3).await;
    for (i, d) in deliveries.into_iter().enumerate() {
        let meta = d.await.unwrap();
        assert_eq!(meta.partition, (i as u32) % 3);
        assert_eq!(fake.log(meta.partition)[meta.offset as usize], Bytes::from(value(i)), "offset of record {i}");
    }
    for (partition, values) in sent {
        assert_eq!(fake.log(partition), values, "partition {partition}");
    }
    p.close().await;
}

#[tokio::test]
async fn batches_seal_by_size_without_waiting_for_linger() {
    let fake = Fake::healthy(1);
    let p = producer(&fake, ProducerConfig { linger: Duration::from_secs(3600), ..config() });
    let (_, deliveries) = send_keyed(&p, 500, 1).await;
    // 500 records of ~20 bytes are ~5 batches of 2 KiB; all but the last
    // are sealed by size, long before the hour of linger.
    let full = deliveries.len() - 150;
    tokio::time::timeout(Duration::from_secs(10), deliveries.into_iter().nth(full).unwrap())
        .await
        .expect("sealed by size")
        .unwrap();
    assert!(fake.log(0).len() >= full, "{} records landed", fake.log(0).len());
}

#[tokio::test(start_paused = true)]
async fn a_lone_record_is_sent_when_its_linger_runs_out() {
    let fake = Fake::healthy(1);
    let p = producer(&fake, ProducerConfig { linger: Duration::from_millis(50), ..config() });
    let started = tokio::time::Instant::now();
    let d = p.send(ProducerRecord::new("t", b"lonely")).await.unwrap();
    d.await.unwrap();
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(50) && waited < Duration::from_millis(100), "{waited:?}");
}

#[tokio::test]
async fn unkeyed_records_stick_to_a_partition_until_its_batch_is_sealed() {
    let fake = Fake::healthy(4);
    // Partition 2 has no leader: KIP-794 keeps unkeyed records away from it.
    fake.leaders.lock().unwrap()[2] = None;
    let p = producer(&fake, config());
    let mut deliveries = Vec::new();
    for i in 0..2000 {
        deliveries.push(p.send(ProducerRecord::new("t", &value(i))).await.unwrap());
    }
    fake.leaders.lock().unwrap()[2] = Some(Arc::from("b0"));
    let mut partitions = Vec::new();
    for d in deliveries {
        partitions.push(d.await.unwrap().partition);
    }
    // Runs of one partition, each about one batch long (~100 records).
    let runs: Vec<(u32, usize)> = partitions.chunk_by(|a, b| a == b).map(|r| (r[0], r.len())).collect();
    assert!(runs.len() >= 10, "the partition moved on with each batch: {runs:?}");
    assert!(runs.iter().all(|&(p, _)| p != 2), "no unkeyed record went to the leaderless partition: {runs:?}");
    let used: std::collections::BTreeSet<u32> = runs.iter().map(|r| r.0).collect();
    assert_eq!(used, [0, 1, 3].into(), "every available partition got some");
    assert!(runs.iter().all(|&(_, n)| n <= 200), "no partition kept records past a batch: {runs:?}");
    p.close().await;
}

#[tokio::test]
async fn ready_batches_of_one_broker_travel_in_one_request() {
    let fake = Fake::healthy(4); // partitions 0 and 2 on b0, 1 and 3 on b1
    fake.gated.store(true, Ordering::SeqCst);
    let p = producer(&fake, ProducerConfig { max_in_flight: 1, ..config() });
    let (sent, deliveries) = send_keyed(&p, 4000, 4).await;
    fake.gated.store(false, Ordering::SeqCst);
    fake.gate.add_permits(1000);
    for d in deliveries {
        d.await.unwrap();
    }
    let shapes = fake.shapes.lock().unwrap().clone();
    assert!(shapes.contains(&2), "a request carried both partitions of its broker: {shapes:?}");
    assert!(shapes.len() < 40, "batches were bundled, not sent one per request: {} requests", shapes.len());
    assert!(fake.max_in_flight_seen.load(Ordering::SeqCst) <= 2, "one request per broker");
    for (partition, values) in sent {
        assert_eq!(fake.log(partition), values);
    }
}

#[tokio::test]
async fn retries_keep_each_partitions_order_and_send_nothing_twice() {
    // Every third request fails at the transport, every fifth gets
    // NOT_LEADER for all its partitions: neither appends anything.
    let fake = Fake::new(
        4,
        Box::new(|n, _| match n {
            n if n % 3 == 1 => Some(Fault::Unavailable),
            n if n % 5 == 2 => Some(Fault::NotLeader),
            _ => None,
        }),
    );
    *fake.delay.lock().unwrap() = Duration::from_millis(1);
    let p = producer(&fake, ProducerConfig { max_in_flight: 5, ..config() });
    let (sent, deliveries) = send_keyed(&p, 4000, 4).await;
    for d in deliveries {
        d.await.unwrap();
    }
    for (partition, values) in sent {
        assert_eq!(fake.log(partition), values, "partition {partition}: in order, each once");
    }
    assert!(fake.faults.load(Ordering::SeqCst) >= 2, "faults were injected and ridden out");
    assert!(fake.max_in_flight_seen.load(Ordering::SeqCst) >= 2, "several requests were in flight at once");
}

#[tokio::test]
async fn batches_appended_before_a_partition_failed_are_acknowledged_and_never_sent_again() {
    // Every other request appends only the first batch of each partition.
    let fake = Fake::new(2, Box::new(|n, _| (n % 2 == 0).then_some(Fault::FirstBatchOnly)));
    // Small batches and a long linger, so requests carry several per partition.
    let p = producer(&fake, ProducerConfig { batch_bytes: 256, ..config() });
    let (sent, deliveries) = send_keyed(&p, 2000, 2).await;
    for (i, d) in deliveries.into_iter().enumerate() {
        let meta = d.await.unwrap();
        assert_eq!(fake.log(meta.partition)[meta.offset as usize], Bytes::from(value(i)), "offset of record {i}");
    }
    assert!(fake.partial.load(Ordering::SeqCst) > 0, "some requests were applied in part");
    for (partition, values) in sent {
        assert_eq!(fake.log(partition), values, "partition {partition}: in order, each once");
    }
}

#[tokio::test]
async fn only_a_lost_reply_sends_records_twice_and_order_still_holds() {
    let fake = Fake::new(2, Box::new(|n, _| (n % 4 == 1).then_some(Fault::LoseReply)));
    let p = producer(&fake, config());
    let (sent, deliveries) = send_keyed(&p, 2000, 2).await;
    for d in deliveries {
        d.await.unwrap();
    }
    let lost: std::collections::HashSet<Bytes> = fake.lost.lock().unwrap().iter().cloned().collect();
    assert!(!lost.is_empty(), "some replies were lost");
    for (partition, values) in sent {
        let log = fake.log(partition);
        let mut seen = std::collections::HashSet::new();
        let firsts: Vec<Bytes> = log.iter().filter(|v| seen.insert((*v).clone())).cloned().collect();
        assert_eq!(firsts, values, "partition {partition}: first copies in order");
        for v in &log {
            let copies = log.iter().filter(|w| *w == v).count();
            assert!(copies == 1 || lost.contains(v), "{v:?} appears {copies} times without a lost reply");
        }
    }
}

#[tokio::test]
async fn acks_zero_resolves_without_waiting_for_the_broker_and_never_retries() {
    let fake = Fake::new(1, Box::new(|_, _| Some(Fault::Unavailable)));
    fake.gated.store(true, Ordering::SeqCst);
    let p = producer(&fake, ProducerConfig { acks: Acks::None, ..config() });
    let d = p.send(ProducerRecord::new("t", b"fire and forget")).await.unwrap();
    let meta = tokio::time::timeout(Duration::from_secs(5), d).await.expect("not waiting for the answer").unwrap();
    assert_eq!(meta.offset, -1);
    fake.gated.store(false, Ordering::SeqCst);
    fake.gate.add_permits(100);
    p.flush().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(fake.requests.load(Ordering::SeqCst), 1, "a failed acks=0 request is not sent again");
}

#[tokio::test]
async fn send_waits_while_the_buffer_is_full_and_a_cancelled_send_gives_its_memory_back() {
    let fake = Fake::healthy(1);
    fake.gated.store(true, Ordering::SeqCst);
    let buffer_bytes = 64 << 10;
    let p = producer(&fake, ProducerConfig { buffer_bytes, batch_bytes: 8 << 10, ..config() });
    let big = vec![b'x'; 1000];
    let mut deliveries = Vec::new();
    let mut accepted = 0usize;
    loop {
        match tokio::time::timeout(Duration::from_millis(100), p.send(ProducerRecord::new("t", &big))).await {
            Ok(d) => {
                deliveries.push(d.unwrap());
                accepted += big.len();
            }
            Err(_) => break, // waiting for buffer: dropped here, mid-wait
        }
        assert!(accepted <= buffer_bytes, "accepted {accepted} bytes into a {buffer_bytes}-byte buffer");
    }
    assert!(accepted >= buffer_bytes / 2, "the buffer filled before send waited ({accepted} bytes)");
    fake.gated.store(false, Ordering::SeqCst);
    fake.gate.add_permits(1000);
    for d in deliveries {
        d.await.unwrap();
    }
    p.flush().await;
    let shared = p.shared().clone();
    // Settled batches and the cancelled send's credit are all given back.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while shared.buffer.available_permits() != buffer_bytes {
        assert!(tokio::time::Instant::now() < deadline, "{} of {buffer_bytes} free", shared.buffer.available_permits());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn a_shared_producer_closed_from_another_handle_delivers_what_was_sent() {
    let fake = Fake::healthy(2);
    fake.gated.store(true, Ordering::SeqCst);
    let p = producer(&fake, config());
    let other = p.clone();
    let (sent, deliveries) = send_keyed(&p, 500, 2).await;
    let closing = tokio::spawn(async move { other.close().await });
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!closing.is_finished(), "close waits for the records in flight");
    assert!(matches!(p.send(ProducerRecord::new("t", b"late")).await, Err(Error::Closed)));
    fake.gated.store(false, Ordering::SeqCst);
    fake.gate.add_permits(1000);
    for d in deliveries {
        d.await.unwrap();
    }
    closing.await.unwrap();
    for (partition, values) in sent {
        assert_eq!(fake.log(partition), values);
    }
}

#[tokio::test]
async fn a_partition_without_a_leader_waits_and_is_sent_once_one_is_known() {
    let fake = Fake::healthy(1);
    fake.leaders.lock().unwrap()[0] = None;
    let p = producer(&fake, config());
    let d = p.send(ProducerRecord::new("t", b"patient").partition(0)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert_eq!(fake.requests.load(Ordering::SeqCst), 0);
    fake.leaders.lock().unwrap()[0] = Some(Arc::from("b0"));
    assert_eq!(d.await.unwrap().offset, 0);
}

#[tokio::test]
async fn a_batch_past_its_delivery_timeout_fails_and_hands_its_records_back() {
    let fake = Fake::new(1, Box::new(|_, _| Some(Fault::Unavailable)));
    let p = producer(&fake, ProducerConfig { delivery_timeout: Duration::from_millis(50), ..config() });
    let d = p.send(ProducerRecord::new("t", b"doomed").key(b"k")).await.unwrap();
    let e = tokio::time::timeout(Duration::from_secs(5), d).await.expect("gave up in time").unwrap_err();
    assert!(e.error.is_retriable(), "{e}");
    let r = e.record.expect("record handed back");
    assert_eq!((r.key.as_deref(), r.value.as_deref()), (Some(&b"k"[..]), Some(&b"doomed"[..])));
}

#[tokio::test]
async fn added_partitions_are_used_once_the_metadata_ages_out() {
    let fake = Fake::healthy(1);
    let p = Producer::with_transport(Arc::new(FakeTransport(fake.clone())), config(), Duration::from_millis(20))
        .expect("valid config");
    p.send(ProducerRecord::new("t", b"first")).await.unwrap().await.unwrap();
    fake.leaders.lock().unwrap().extend([Some(Arc::from("b1")), Some(Arc::from("b0"))]);
    *fake.partitions.lock().unwrap() = 3;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let meta = p.send(ProducerRecord::new("t", b"more").partition(0)).await.unwrap().await.unwrap();
        assert_eq!(meta.partition, 0);
        if p.send(ProducerRecord::new("t", b"new").partition(2)).await.is_ok() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "partition 2 never became known");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    p.flush().await;
    assert_eq!(fake.log(2), vec![Bytes::from_static(b"new")]);
}

#[tokio::test]
async fn try_send_never_waits_and_queues_once_the_topic_and_the_buffer_allow() {
    let fake = Fake::healthy(1);
    fake.gated.store(true, Ordering::SeqCst);
    let buffer_bytes = 64 << 10;
    let p = producer(&fake, ProducerConfig { buffer_bytes, batch_bytes: 8 << 10, ..config() });
    let big = vec![b'x'; 1000];
    // Unknown topic: refused at once, and its metadata fetched behind it.
    let e = p.try_send(ProducerRecord::new("t", &big)).unwrap_err();
    assert!(matches!(e, Error::WouldBlock(_)) && e.is_retriable(), "{e:?}");
    let mut deliveries = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while deliveries.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "the topic's metadata never arrived");
        match p.try_send(ProducerRecord::new("t", &big)) {
            Ok(d) => deliveries.push(d),
            Err(Error::WouldBlock(_)) => tokio::time::sleep(Duration::from_millis(5)).await,
            Err(e) => panic!("{e:?}"),
        }
    }
    // Full buffer: refused at once, nothing queued.
    let full = loop {
        match p.try_send(ProducerRecord::new("t", &big)) {
            Ok(d) => deliveries.push(d),
            Err(e) => break e,
        }
        assert!(deliveries.len() * big.len() <= buffer_bytes, "queued more than the buffer holds");
    };
    assert!(matches!(full, Error::WouldBlock(m) if m.contains("buffer")), "{full:?}");
    let queued = deliveries.len();
    fake.gated.store(false, Ordering::SeqCst);
    fake.gate.add_permits(1000);
    for d in deliveries {
        d.await.unwrap();
    }
    assert_eq!(fake.log(0).len(), queued, "exactly the records try_send accepted were sent");
    // Room again.
    p.try_send(ProducerRecord::new("t", &big)).unwrap().await.unwrap();
    p.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn try_send_works_from_a_thread_outside_the_runtime_with_compression() {
    let fake = Fake::healthy(2);
    let p = producer(&fake, ProducerConfig { compression: Compression::Lz4, batch_bytes: 4 << 10, ..config() });
    // Make the topic known first (a send inside the runtime).
    p.send(ProducerRecord::new("t", b"first").partition(0)).await.unwrap().await.unwrap();
    let sender = p.clone();
    let deliveries = std::thread::spawn(move || {
        (0..200)
            .map(|i| {
                let v = value(i);
                loop {
                    match sender.try_send(ProducerRecord::new("t", &v).partition(1)) {
                        Ok(d) => break d,
                        Err(Error::WouldBlock(_)) => std::thread::sleep(Duration::from_millis(1)),
                        Err(e) => panic!("{e:?}"),
                    }
                }
            })
            .collect::<Vec<_>>()
    })
    .join()
    .expect("the sending thread");
    for (i, d) in deliveries.into_iter().enumerate() {
        assert_eq!(d.await.unwrap().offset, i as i64);
    }
    let log = fake.log(1);
    assert_eq!(log.len(), 200);
    assert!(log.iter().enumerate().all(|(i, v)| *v == value(i)), "in order, each once");
    p.close().await;
}

/// Every record is in its partition's log exactly once, in send order, and
/// each delivery's offset holds its own record.
async fn assert_exactly_once_in_order(
    fake: &Fake,
    sent: HashMap<u32, Vec<Bytes>>,
    deliveries: Vec<DeliveryFuture>,
    partitions: u32,
) {
    for (i, d) in deliveries.into_iter().enumerate() {
        let meta = d.await.unwrap_or_else(|e| panic!("record {i}: {e}"));
        assert_eq!(meta.partition, (i as u32) % partitions);
        assert_eq!(fake.log(meta.partition)[meta.offset as usize], Bytes::from(value(i)), "offset of record {i}");
    }
    for (partition, values) in sent {
        assert_eq!(fake.log(partition), values, "partition {partition}: every record once, in order");
    }
}

#[tokio::test]
async fn idempotence_is_the_default_with_acks_all_and_refused_with_acks_one_when_asked_for() {
    let fake = Fake::healthy(1);
    assert!(producer(&fake, idempotent_config()).is_idempotent());
    assert!(!producer(&fake, ProducerConfig { acks: Acks::Leader, ..idempotent_config() }).is_idempotent());
    let transport = || Arc::new(FakeTransport(fake.clone())) as Arc<dyn Transport>;
    let asked = ProducerConfig { acks: Acks::Leader, idempotence: Some(true), ..config() };
    let e = Producer::with_transport(transport(), asked, Duration::from_secs(1)).unwrap_err();
    assert!(e.to_string().contains("acks=all"), "{e}");
    let too_many = ProducerConfig { max_in_flight: 6, idempotence: Some(true), ..config() };
    assert!(Producer::with_transport(transport(), too_many, Duration::from_secs(1)).is_err());
}

#[tokio::test]
async fn lost_replies_are_retried_and_answered_as_duplicates_never_appended_twice() {
    let fake = Fake::new(3, Box::new(|n, _| (n % 4 == 1).then_some(Fault::LoseReply)));
    *fake.delay.lock().unwrap() = Duration::from_millis(1);
    let p = producer(&fake, idempotent_config());
    let (sent, deliveries) = send_keyed(&p, 4000, 3).await;
    assert_exactly_once_in_order(&fake, sent, deliveries, 3).await;
    assert!(!fake.lost.lock().unwrap().is_empty(), "some replies were lost");
    assert!(fake.duplicates.load(Ordering::SeqCst) > 0, "their retries were answered as duplicates");
    p.close().await;
}

#[tokio::test]
async fn several_requests_per_partition_are_in_flight_and_the_log_keeps_send_order() {
    let fake = Fake::healthy(1);
    *fake.delay.lock().unwrap() = Duration::from_millis(3);
    let p = producer(&fake, ProducerConfig { batch_bytes: 512, ..idempotent_config() });
    let (sent, deliveries) = send_keyed(&p, 3000, 1).await;
    assert_exactly_once_in_order(&fake, sent, deliveries, 1).await;
    let most = fake.max_partition_in_flight.load(Ordering::SeqCst);
    assert!((2..=5).contains(&most), "up to five requests of one partition in flight, saw {most}");
    p.close().await;
}

#[tokio::test]
async fn a_leader_change_and_transport_failures_mid_stream_lose_and_duplicate_nothing() {
    let fake = Fake::new(
        4,
        Box::new(|n, _| match n {
            n if n % 7 == 3 => Some(Fault::NotLeader),
            n if n % 5 == 1 => Some(Fault::LoseReply),
            n if n % 11 == 4 => Some(Fault::Unavailable),
            _ => None,
        }),
    );
    *fake.delay.lock().unwrap() = Duration::from_millis(1);
    let p = producer(&fake, ProducerConfig { batch_bytes: 512, ..idempotent_config() });
    let (sent, deliveries) = send_keyed(&p, 4000, 4).await;
    assert_exactly_once_in_order(&fake, sent, deliveries, 4).await;
    assert!(fake.faults.load(Ordering::SeqCst) > 5);
    p.close().await;
}

#[tokio::test]
async fn a_batch_refused_for_good_fails_its_records_and_the_rest_follow_after_an_epoch_bump() {
    let fake = Fake::new(1, Box::new(|n, _| (n == 3).then_some(Fault::Refuse)));
    let p =
        producer(&fake, ProducerConfig { batch_bytes: 256, linger: Duration::from_millis(1), ..idempotent_config() });
    let mut deliveries = Vec::new();
    for i in 0..400 {
        let v = value(i);
        deliveries.push(p.send(ProducerRecord::new("t", &v).partition(0)).await.unwrap());
        if i % 50 == 0 {
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    }
    let mut delivered = Vec::new();
    let mut failed = 0;
    for (i, d) in deliveries.into_iter().enumerate() {
        match d.await {
            Ok(meta) => {
                assert_eq!(fake.log(0)[meta.offset as usize], Bytes::from(value(i)));
                delivered.push(Bytes::from(value(i)));
            }
            Err(e) => {
                assert_eq!(e.error.code(), Some(ErrorCode::MessageTooLarge), "{e}");
                assert_eq!(e.record.as_ref().and_then(|r| r.value.clone()), Some(Bytes::from(value(i))));
                failed += 1;
            }
        }
    }
    assert!(failed > 0, "the refused batch's records failed");
    assert_eq!(fake.log(0), delivered, "everything else once, in order");
    assert!(fake.bumps.load(Ordering::SeqCst) >= 1, "the epoch was bumped past the spent sequence numbers");
    p.close().await;
}

#[tokio::test]
async fn a_leader_that_forgot_the_producer_gets_the_rest_under_a_bumped_epoch() {
    let fake = Fake::new(2, Box::new(|n, _| (n == 6).then_some(Fault::ForgetProducers)));
    let p = producer(&fake, ProducerConfig { batch_bytes: 512, ..idempotent_config() });
    let (sent, deliveries) = send_keyed(&p, 3000, 2).await;
    assert_exactly_once_in_order(&fake, sent, deliveries, 2).await;
    assert!(fake.sequence_refusals.load(Ordering::SeqCst) > 0, "UNKNOWN_PRODUCER_ID was answered");
    assert!(fake.bumps.load(Ordering::SeqCst) >= 1, "and recovered from by a bump");
    p.close().await;
}

#[tokio::test]
async fn an_epoch_bump_that_fails_is_tried_again_until_the_partition_sends() {
    let fake = Fake::new(2, Box::new(|n, _| (n == 6).then_some(Fault::ForgetProducers)));
    fake.failing_bumps.store(3, Ordering::SeqCst);
    let p = producer(&fake, ProducerConfig { batch_bytes: 512, ..idempotent_config() });
    let (sent, deliveries) = send_keyed(&p, 3000, 2).await;
    tokio::time::timeout(Duration::from_secs(20), assert_exactly_once_in_order(&fake, sent, deliveries, 2))
        .await
        .expect("the partitions waiting for a bump are sent again");
    assert_eq!(fake.failing_bumps.load(Ordering::SeqCst), 0, "the refused bumps were tried again");
    assert!(fake.bumps.load(Ordering::SeqCst) >= 1);
    p.close().await;
}
