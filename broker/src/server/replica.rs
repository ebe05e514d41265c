//! The `tally.internal.v1.Replication` service: followers' fetches, served
//! by the partitions' leaders, in fetch sessions (Kafka's KIP-227: the wire
//! rules are in `replication.proto`, the state machine in
//! [`crate::replication::fetch_session`]).
//!
//! A fetch reads what its session plans (the partitions the request listed
//! or whose log end moved, and a sweep that reads every partition at least
//! once per `max_wait_ms`, which keeps each follower's progress and ISR
//! standing current), answers what is
//! new to the follower, and when nothing is new holds the request until a
//! log end moves or `max_wait_ms` passes: an idle follower costs one small
//! request per wait, and a busy one hears of an append at once.
//!
//! Each session keeps a watcher of every partition's log end for its whole
//! life (not one per request), so a wait costs nothing per idle partition
//! and a wake-up reads only the partitions that moved. The session is
//! checked out of the cache for the request and checked in when the request
//! ends or is cancelled; no lock is held across an `.await`.

use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use futures_util::future::{AbortHandle, Abortable, Aborted, BoxFuture};
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use tally_proto::ErrorCode;
use tally_proto::internal::v1 as pb;
use tally_proto::internal::v1::replication_server::Replication;
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use crate::broker::Broker;
use crate::controller::BrokerId;
use crate::error::BrokerError;
use crate::partition::{Partition, ReplicaRead};
use crate::replication::fetch_session::{
    AnswerAt, FetchEntry, FetchKind, FetchPosition, FetchSessionCache, MAX_SESSIONS, PartitionKey, ReadSummary,
    Session, SessionError, Ticket,
};
use crate::replication::isr::now_ms;
use crate::storage::Offset;

/// Longest hold of a follower's fetch.
const MAX_WAIT: Duration = Duration::from_secs(5);

type FetchSession = Session<Watched, Waits>;
type Sessions = FetchSessionCache<Watched, Waits>;

/// Implements the replication service.
#[derive(Debug, Clone)]
pub struct ReplicationService {
    broker: Arc<Broker>,
    sessions: Arc<Mutex<Sessions>>,
}

/// The server's handle on one partition of a session: the partition object
/// its watcher subscribed to, and the watcher. Dropping it (the partition
/// left the session, or the session ended) stops the watcher.
#[derive(Debug, Default)]
pub struct Watched {
    partition: Weak<Partition>,
    abort: Option<AbortHandle>,
    /// Counts the watchers armed; a wake-up from any but the latest is
    /// ignored (it must not re-arm beside the current one).
    armed: u64,
}

impl Drop for Watched {
    fn drop(&mut self) {
        if let Some(abort) = self.abort.take() {
            abort.abort();
        }
    }
}

/// A session's watchers, one per partition, each resolving once when that
/// partition's log end moves (then armed again).
#[derive(Default)]
pub struct Waits {
    waiting: FuturesUnordered<Abortable<BoxFuture<'static, LogEndMoved>>>,
}

impl std::fmt::Debug for Waits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waits").field("waiting", &self.waiting.len()).finish()
    }
}

/// A partition's log end moved (or its partition closed).
struct LogEndMoved {
    slot: usize,
    generation: u32,
    /// [`Watched::armed`] when this watcher was armed.
    token: u64,
    log_end: watch::Receiver<Offset>,
    closed: bool,
}

/// Partition reads between yields to the runtime in one pass.
const READS_PER_YIELD: usize = 256;

/// Wake-ups taken in one drain at most: an endless stream of appends cannot
/// keep a request from answering.
const DRAIN_MAX: usize = 4096;

/// A session checked out for one request. Checked in when dropped, so a
/// request that is cancelled (its follower went away) still returns it; a
/// sessionless fetch's state is simply dropped.
struct Lease {
    sessions: Arc<Mutex<Sessions>>,
    /// The cache entry it goes back to; none for a sessionless fetch.
    ticket: Option<Ticket>,
    session: Option<FetchSession>,
}

impl Lease {
    fn session(&mut self) -> &mut FetchSession {
        self.session.as_mut().expect("held until dropped")
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let (Some(ticket), Some(session)) = (self.ticket, self.session.take()) else { return };
        let stale = lock(&self.sessions).check_in(ticket, session);
        // A session replaced meanwhile ends here, outside the lock.
        drop(stale);
    }
}

fn lock(sessions: &Mutex<Sessions>) -> MutexGuard<'_, Sessions> {
    sessions.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ReplicationService {
    /// A service over `broker`, with no fetch session yet.
    pub fn new(broker: Arc<Broker>) -> Self {
        // Random ids: a restarted leader is unlikely to hand out an id a
        // follower still holds from its previous process.
        let seed = std::collections::hash_map::RandomState::new().hash_one(std::process::id());
        ReplicationService { broker, sessions: Arc::new(Mutex::new(FetchSessionCache::new(MAX_SESSIONS, seed))) }
    }

    /// The partition a follower asks for, if this broker leads it (topic id
    /// checked: a recreated topic is another topic).
    fn resolve(&self, key: &PartitionKey, topic_id: &str) -> Result<Arc<Partition>, BrokerError> {
        let (topic, partition) = self.broker.partition(&key.topic, key.partition)?;
        if topic.id != topic_id {
            return Err(BrokerError::UnknownTopicOrPartition {
                topic: key.topic.clone(),
                partition: Some(key.partition),
            });
        }
        Ok(partition)
    }

    /// The session state a request is served with: a new or checked-out
    /// session, or a detached one for a sessionless fetch.
    fn lease(
        &self,
        kind: FetchKind,
        follower: BrokerId,
        listed: Vec<FetchEntry>,
        forgotten: Vec<PartitionKey>,
    ) -> Result<Lease, SessionError> {
        let detached = |session| Lease { sessions: self.sessions.clone(), ticket: None, session: Some(session) };
        match kind {
            FetchKind::Sessionless => Ok(detached(Session::new(follower, listed))),
            FetchKind::Close(id) => {
                let closed = lock(&self.sessions).close(id, follower);
                drop(closed);
                Ok(detached(Session::new(follower, listed)))
            }
            FetchKind::Open => {
                let session = Session::new(follower, listed);
                // Only brokers of the cluster get a session (what the cache
                // holds is bounded, but strangers need not fill it).
                if !self.broker.is_registered(follower) {
                    return Ok(detached(session));
                }
                let (ticket, dropped) = lock(&self.sessions).open(&session);
                drop(dropped);
                Ok(Lease { sessions: self.sessions.clone(), ticket, session: Some(session) })
            }
            FetchKind::Incremental { id, epoch } => {
                let (ticket, session) = lock(&self.sessions).check_out(id, epoch, follower)?;
                let mut lease = Lease { sessions: self.sessions.clone(), ticket: Some(ticket), session: Some(session) };
                match lease.session().merge(id, listed, forgotten) {
                    Ok(released) => drop(released),
                    Err(e) => {
                        // The lease's check-in finds the session gone.
                        let closed = lock(&self.sessions).close(id, follower);
                        drop(closed);
                        return Err(e);
                    }
                }
                Ok(lease)
            }
        }
    }

    /// Serves one request from `session`: passes over what it plans until
    /// one finds news or the wait ends. Returns the answers.
    async fn serve(
        &self,
        session: &mut FetchSession,
        wait: Duration,
        max_bytes: u64,
    ) -> Vec<pb::ReplicaFetchPartitionResponse> {
        let deadline = Instant::now() + wait;
        let every_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
        let mut answers = Vec::new();
        let mut total = 0u64;
        loop {
            drain_moved(session);
            let now = now_ms();
            let mut news = false;
            for (i, slot) in session.plan(now, every_ms).into_iter().enumerate() {
                news |= self.read_one(session, slot, max_bytes, &mut total, now, &mut answers);
                if i % READS_PER_YIELD == READS_PER_YIELD - 1 {
                    // A full pass over thousands of partitions lets other
                    // requests (a busy partition's fetch) run in between.
                    tokio::task::yield_now().await;
                }
            }
            if news || Instant::now() >= deadline {
                break;
            }
            // Until a log end moves or the wait ends (no request lasts
            // longer than the sweep's interval: the next one sweeps).
            wait_moved(session, deadline).await;
        }
        session.finish_request();
        answers
    }

    /// Reads the partition in `slot` at the session's position for it, and
    /// answers it if the session says so. Returns whether the read was news.
    fn read_one(
        &self,
        session: &mut FetchSession,
        slot: usize,
        max_bytes: u64,
        total: &mut u64,
        now_ms: u64,
        answers: &mut Vec<pb::ReplicaFetchPartitionResponse>,
    ) -> bool {
        let follower = session.follower();
        let resolved = {
            let p = session.partition(slot);
            self.resolve(p.key(), &p.position().topic_id)
        };
        let outcome = resolved.and_then(|partition| {
            let generation = session.generation(slot);
            let (handle, waits) = session.handle_mut(slot);
            // Before the read: an append after it wakes the session.
            watch_log_end(handle, waits, slot, generation, &partition);
            let p = session.partition(slot);
            let position = p.position();
            // Only the first read of a response may go past the budget (by
            // one batch, so a batch larger than the budget still moves);
            // once it is spent, reads take no records but still count the
            // follower's position (its ISR standing) and say whether records
            // were left behind.
            let left = max_bytes.saturating_sub(*total);
            let read = partition.replica_fetch(
                follower,
                position.fetch_offset,
                position.current_leader_epoch,
                position.last_fetched_epoch,
                left,
                now_ms,
            )?;
            if let Some(change) = read.isr_change.clone() {
                self.broker.propose_isr_change(&p.key().topic, partition, change);
            }
            Ok(read)
        });
        let summary = summarize(&outcome, *total >= max_bytes);
        *total += summary.bytes;
        if let Some(at) = session.record(slot, &summary) {
            let p = session.partition(slot);
            let answer = answer(p.key(), p.position(), outcome);
            match at {
                AnswerAt::Push(index) => {
                    debug_assert_eq!(index, answers.len());
                    answers.push(answer);
                }
                AnswerAt::Replace(index) => answers[index] = answer,
            }
        }
        summary.is_news()
    }
}

/// Makes sure the session watches `partition`'s log end (a first read, or
/// the partition object changed: a recreated topic, a reopened log).
fn watch_log_end(handle: &mut Watched, waits: &mut Waits, slot: usize, generation: u32, partition: &Arc<Partition>) {
    if handle.abort.is_some() && std::ptr::eq(handle.partition.as_ptr(), Arc::as_ptr(partition)) {
        return;
    }
    if let Some(old) = handle.abort.take() {
        old.abort();
    }
    handle.partition = Arc::downgrade(partition);
    arm(handle, waits, slot, generation, partition.subscribe_log_end());
}

/// Waits (once) for `log_end` to move.
fn arm(handle: &mut Watched, waits: &mut Waits, slot: usize, generation: u32, mut log_end: watch::Receiver<Offset>) {
    let (abort, registration) = AbortHandle::new_pair();
    // The previous watcher (if any) has resolved or was aborted.
    handle.abort = Some(abort);
    handle.armed += 1;
    let token = handle.armed;
    let moved = async move {
        let closed = log_end.changed().await.is_err();
        LogEndMoved { slot, generation, token, log_end, closed }
    };
    waits.waiting.push(Abortable::new(moved.boxed(), registration));
}

/// Takes a watcher's wake-up: the partition is read in the next pass, and
/// its watcher armed again (or dropped, when the partition closed: the next
/// read subscribes to whatever serves it then).
fn on_moved(session: &mut FetchSession, moved: Result<LogEndMoved, Aborted>) {
    // Aborted: its partition left the session.
    let Ok(moved) = moved else { return };
    // Not the slot's partition any more, or not its latest watcher.
    let Some((handle, _)) = session.handle_of(moved.slot, moved.generation) else { return };
    if handle.armed != moved.token || !session.mark_hot(moved.slot, moved.generation) {
        return;
    }
    let (handle, waits) = session.handle_mut(moved.slot);
    if moved.closed {
        handle.abort = None;
        handle.partition = Weak::new();
        return;
    }
    arm(handle, waits, moved.slot, moved.generation, moved.log_end);
}

/// Takes every wake-up that has already happened.
fn drain_moved(session: &mut FetchSession) {
    for _ in 0..DRAIN_MAX {
        let Some(Some(moved)) = session.watch.waiting.next().now_or_never() else { return };
        on_moved(session, moved);
    }
}

/// Waits until a watched log end moves, or `until`.
async fn wait_moved(session: &mut FetchSession, until: Instant) {
    let sleep = tokio::time::sleep_until(until);
    if session.watch.waiting.is_empty() {
        sleep.await;
        return;
    }
    let moved = tokio::select! {
        moved = session.watch.waiting.next() => moved,
        () = sleep => None,
    };
    if let Some(moved) = moved {
        on_moved(session, moved);
    }
}

/// What a read came to; `spent` when the response's byte budget was spent
/// before it (so records it did not take were deferred, not absent).
fn summarize(outcome: &Result<ReplicaRead, BrokerError>, spent: bool) -> ReadSummary {
    match outcome {
        Ok(read) => ReadSummary {
            bytes: read.read.bytes,
            error: false,
            diverging: read.diverging.is_some(),
            high_watermark: read.high_watermark.to_wire(),
            log_start_offset: read.log_start_offset.to_wire(),
            deferred: spent
                && read.read.bytes == 0
                && read.diverging.is_none()
                && read.read.next_offset < read.log_end_offset,
        },
        Err(_) => ReadSummary {
            bytes: 0,
            error: true,
            diverging: false,
            high_watermark: -1,
            log_start_offset: -1,
            deferred: false,
        },
    }
}

fn answer(
    key: &PartitionKey,
    position: &FetchPosition,
    outcome: Result<ReplicaRead, BrokerError>,
) -> pb::ReplicaFetchPartitionResponse {
    let mut out = pb::ReplicaFetchPartitionResponse {
        topic: key.topic.clone(),
        partition: key.partition,
        error_code: ErrorCode::None as i32,
        error_message: String::new(),
        high_watermark: -1,
        log_start_offset: -1,
        log_end_offset: -1,
        diverging_epoch: None,
        records: Vec::new(),
        fetch_offset: Some(position.fetch_offset),
        last_fetched_epoch: Some(position.last_fetched_epoch.and_then(|e| i32::try_from(e).ok()).unwrap_or(-1)),
    };
    match outcome {
        Ok(read) => {
            out.high_watermark = read.high_watermark.to_wire();
            out.log_start_offset = read.log_start_offset.to_wire();
            out.log_end_offset = read.log_end_offset.to_wire();
            out.diverging_epoch =
                read.diverging.map(|(epoch, end)| pb::DivergingEpoch { epoch, end_offset: end.to_wire() });
            out.records = read.read.chunks;
        }
        Err(e) => {
            if let BrokerError::OffsetOutOfRange { log_start, log_end, .. } = &e {
                out.log_start_offset = log_start.to_wire();
                out.log_end_offset = log_end.to_wire();
            }
            out.error_code = e.code() as i32;
            out.error_message = e.to_string();
        }
    }
    out
}

fn entry(p: pb::ReplicaFetchPartition) -> FetchEntry {
    FetchEntry {
        key: PartitionKey { topic: p.topic, partition: p.partition },
        position: FetchPosition {
            topic_id: p.topic_id,
            fetch_offset: p.fetch_offset,
            current_leader_epoch: p.current_leader_epoch,
            last_fetched_epoch: u32::try_from(p.last_fetched_epoch).ok(),
        },
    }
}

/// The answer to a request whose session is refused: the code, no partition.
fn refused(e: &SessionError) -> pb::ReplicaFetchResponse {
    pb::ReplicaFetchResponse {
        partitions: Vec::new(),
        session_id: 0,
        error_code: e.code() as i32,
        error_message: e.to_string(),
    }
}

#[tonic::async_trait]
impl Replication for ReplicationService {
    async fn replica_fetch(
        &self,
        request: Request<pb::ReplicaFetchRequest>,
    ) -> Result<Response<pb::ReplicaFetchResponse>, Status> {
        let req = request.into_inner();
        let follower = BrokerId(req.replica_id);
        let wait = Duration::from_millis(u64::from(req.max_wait_ms)).min(MAX_WAIT);
        // Capped by this leader's own bound, which its encoder is sized for.
        let max_bytes = u64::from(req.max_bytes.clamp(1, self.broker.config().replica_fetch_response_max_bytes));
        let kind = match FetchKind::of(req.session_id, req.session_epoch) {
            Ok(kind) => kind,
            Err(e) => return Ok(Response::new(refused(&e))),
        };
        let listed = req.partitions.into_iter().map(entry).collect();
        let forgotten =
            req.forgotten.into_iter().map(|f| PartitionKey { topic: f.topic, partition: f.partition }).collect();
        let mut lease = match self.lease(kind, follower, listed, forgotten) {
            Ok(lease) => lease,
            Err(e) => {
                tracing::debug!(follower = follower.0, error = %e, "replica fetch session refused");
                return Ok(Response::new(refused(&e)));
            }
        };
        let partitions = self.serve(lease.session(), wait, max_bytes).await;
        Ok(Response::new(pb::ReplicaFetchResponse {
            partitions,
            session_id: lease.ticket.map_or(0, |t| t.id.get()),
            error_code: ErrorCode::None as i32,
            error_message: String::new(),
        }))
    }

    async fn describe_fetch_sessions(
        &self,
        _request: Request<pb::DescribeFetchSessionsRequest>,
    ) -> Result<Response<pb::DescribeFetchSessionsResponse>, Status> {
        let sessions = lock(&self.sessions)
            .describe()
            .into_iter()
            .map(|s| pb::FetchSessionInfo {
                session_id: s.id.get(),
                replica_id: s.follower.0,
                next_epoch: s.next_epoch,
                partitions: u32::try_from(s.partitions).unwrap_or(u32::MAX),
                incremental_fetches: s.stats.incremental_fetches,
                incremental_request_partitions: s.stats.incremental_request_partitions,
                incremental_response_partitions: s.stats.incremental_response_partitions,
                opened_with_partitions: u32::try_from(s.stats.opened_with).unwrap_or(u32::MAX),
            })
            .collect();
        Ok(Response::new(pb::DescribeFetchSessionsResponse { sessions }))
    }
}

#[cfg(test)]
mod tests {
    use tally_proto::batch::{BatchBuilder, BatchLimits, RecordBatch, RecordRef};

    use super::*;
    use crate::replication::fetch_session::{FetchPosition, SessionId};
    use crate::replication::{Assignment, LeaderSettings};
    use crate::storage::{Log, LogConfig, SystemClock};

    fn led(index: u32) -> (Arc<Partition>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), LogConfig::default(), Arc::new(SystemClock)).unwrap();
        let p = Arc::new(Partition::new(Arc::from("t"), index, log, 1 << 20));
        let assignment =
            Assignment { replicas: vec![BrokerId(1)], isr: vec![BrokerId(1)], leader_epoch: 1, partition_epoch: 1 };
        let settings = LeaderSettings { min_insync_replicas: 1, replica_lag_time_max_ms: 10_000 };
        p.make_leader(BrokerId(1), assignment, settings, 0).unwrap();
        (p, dir)
    }

    async fn append(p: &Arc<Partition>) {
        let mut b = BatchBuilder::new();
        b.push(&RecordRef { timestamp: 1, value: Some(b"x"), ..Default::default() });
        let batch = RecordBatch::validate(b.finish(), &BatchLimits::default()).unwrap();
        p.produce(&[batch], 1, None).await.unwrap();
    }

    fn entry(index: u32) -> FetchEntry {
        FetchEntry {
            key: PartitionKey { topic: "t".into(), partition: index },
            position: FetchPosition {
                topic_id: "id".into(),
                fetch_offset: 0,
                current_leader_epoch: 1,
                last_fetched_epoch: None,
            },
        }
    }

    /// A session over `partitions` whose full fetch is done and which
    /// watches each (as the server's first reads leave it).
    fn watching(partitions: &[Arc<Partition>]) -> FetchSession {
        let mut session = FetchSession::new(BrokerId(2), (0..partitions.len() as u32).map(entry).collect());
        for slot in session.plan(0, 500) {
            let generation = session.generation(slot);
            let (handle, waits) = session.handle_mut(slot);
            watch_log_end(handle, waits, slot, generation, &partitions[slot]);
            session.record(slot, &ReadSummary::default());
        }
        session.finish_request();
        session
    }

    #[tokio::test]
    async fn a_session_hears_of_appends_to_the_partitions_it_watches_and_reads_only_those() {
        let (replicas, _dirs): (Vec<_>, Vec<_>) = (0..3).map(led).unzip();
        let mut session = watching(&replicas);
        drain_moved(&mut session);
        assert!(session.plan(1, 500).is_empty(), "nothing moved");
        append(&replicas[1]).await;
        drain_moved(&mut session);
        assert_eq!(session.plan(2, 500), vec![1], "the appended partition alone");
        // A waiting request wakes at the next append.
        let writer = {
            let p = replicas[2].clone();
            tokio::spawn(async move { append(&p).await })
        };
        wait_moved(&mut session, Instant::now() + Duration::from_secs(30)).await;
        writer.await.unwrap();
        drain_moved(&mut session);
        assert_eq!(session.plan(3, 500), vec![2]);
        // The watchers are armed again: the next append is heard too.
        append(&replicas[1]).await;
        drain_moved(&mut session);
        assert_eq!(session.plan(4, 500), vec![1]);
    }

    #[tokio::test]
    async fn a_partition_that_leaves_the_session_stops_waking_it() {
        let (replicas, _dirs): (Vec<_>, Vec<_>) = (0..2).map(led).unzip();
        let mut session = watching(&replicas);
        let released = session
            .merge(SessionId::new(5).unwrap(), Vec::new(), vec![PartitionKey { topic: "t".into(), partition: 0 }])
            .unwrap();
        drop(released);
        append(&replicas[0]).await;
        drain_moved(&mut session);
        assert!(session.plan(1, 500).is_empty(), "its watcher was stopped");
        assert!(session.watch.waiting.len() <= 1, "and is gone from the waiters once polled");
    }
}
