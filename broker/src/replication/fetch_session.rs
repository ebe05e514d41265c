//! A leader's fetch sessions (Kafka's KIP-227, incremental fetch): for each
//! follower, the partitions it fetches from this leader and the position it
//! last sent for each, so that its requests carry only what changed and the
//! answers only what is new to it. With thousands of idle partitions per
//! leader, a round then costs bytes in proportion to what moved, not to what
//! is followed. The wire rules (session ids, epochs, markers, errors) are
//! written in `replication.proto`; this module is their state machine.
//!
//! Sans-IO: no tokio, no clock (callers pass `now_ms`), no partitions. The
//! server (`server/replica.rs`) reads the partitions and waits for appends;
//! this module decides:
//! - what kind of fetch a request is ([`FetchKind::of`]) and whether its
//!   session id, follower and epoch are valid ([`FetchSessionCache::check_out`]);
//! - what a session holds after an incremental request ([`Session::merge`]):
//!   forgotten partitions removed, listed ones updated or added;
//! - which partitions a pass reads, in which order ([`Session::plan`]):
//!   those the request listed or whose log end moved (hot), and a sweep of
//!   the others that reads each at least once per interval;
//! - which reads the answer includes, and what the session remembers it
//!   sent ([`Session::record`]).
//!
//! Invariants:
//! - A session serves one request at a time: it is checked out of the cache
//!   for the request and checked in after; a request for a session that is
//!   out is refused (INVALID_FETCH_SESSION_EPOCH).
//! - An accepted incremental request moves the expected epoch on before
//!   anything is read, so a repeated or stale request is refused.
//! - A follower holds at most one session per leader (a new one replaces
//!   it); the cache holds at most `max_sessions` and evicts the least
//!   recently used; a session holds at most [`MAX_SESSION_PARTITIONS`], and
//!   all of them together at most [`MAX_CACHED_PARTITIONS`].
//! - A checked-out session goes back only into the opening it came from
//!   (its [`Ticket`]'s generation), never into a newer session that drew
//!   the same id.
//! - Every partition of a session is read at its cached position at least
//!   once per interval (the request's wait) plus the gap between two
//!   requests, as often as a sessionless follower's idle requests read it:
//!   a follower that says nothing about a partition is still counted where
//!   it is (its progress, the ISR), as if it had repeated itself.
//! - The answer to a full fetch includes every partition; an incremental
//!   answer includes a partition when its read has records, an error or a
//!   diverging epoch, when its high watermark or log start differ from what
//!   the session last sent, when the request listed it, or when it was
//!   already answered earlier in the same request (the newer read wins).

use std::collections::HashMap;
use std::num::NonZeroU32;

use tally_proto::ErrorCode;

use crate::controller::BrokerId;

/// `session_epoch` of a full fetch that opens a session (Kafka uses 0 with
/// session id 0, which proto3 cannot tell from an unset field).
pub const NEW_SESSION_EPOCH: i32 = -1;
/// `session_epoch` of a sessionless fetch (the proto3 default: what a
/// follower older than sessions sends), or, with a session id, of a request
/// that closes that session.
pub const SESSIONLESS_EPOCH: i32 = 0;
/// The epoch of the first incremental fetch of a session.
pub const FIRST_INCREMENTAL_EPOCH: i32 = 1;
/// Sessions a leader caches at most: one per follower broker, and the rest
/// slack. Past it, the least recently used session is evicted (its follower
/// gets FETCH_SESSION_ID_NOT_FOUND and opens a new one).
pub const MAX_SESSIONS: usize = 128;
/// Partitions one session holds at most; a larger full fetch is served
/// without a session.
pub const MAX_SESSION_PARTITIONS: usize = 200_000;
/// Partitions all the sessions of a leader hold together at most (each costs
/// a few hundred bytes: its key, position and log-end watcher). A session
/// that would take the total past it is not opened (the follower is answered
/// session id 0 and goes on with full fetches), and one that grows past it
/// through incremental requests is closed at its check-in (its follower gets
/// FETCH_SESSION_ID_NOT_FOUND and asks again). Sessions are also opened only
/// for registered brokers (the server checks), so together with
/// [`MAX_SESSIONS`] this bounds the memory followers can make a leader hold.
pub const MAX_CACHED_PARTITIONS: usize = 1_000_000;

/// A session's id: never 0 (0 on the wire means "no session").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(NonZeroU32);

impl SessionId {
    /// The id `id` names, if any (0 names none).
    pub fn new(id: u32) -> Option<SessionId> {
        NonZeroU32::new(id).map(SessionId)
    }

    /// The id on the wire.
    pub fn get(self) -> u32 {
        self.0.get()
    }
}

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The epoch the request after one of `epoch` carries (wrapping past
/// `i32::MAX` to [`FIRST_INCREMENTAL_EPOCH`], never to 0 or below).
pub fn next_epoch(epoch: i32) -> i32 {
    if (FIRST_INCREMENTAL_EPOCH..i32::MAX).contains(&epoch) { epoch + 1 } else { FIRST_INCREMENTAL_EPOCH }
}

/// What a request's `session_id` and `session_epoch` ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchKind {
    /// A full fetch without a session (0, 0): as before sessions existed.
    Sessionless,
    /// A full fetch that opens a session (any id, [`NEW_SESSION_EPOCH`]).
    Open,
    /// An incremental fetch in a session.
    Incremental {
        /// The session.
        id: SessionId,
        /// The request's epoch (at least [`FIRST_INCREMENTAL_EPOCH`]).
        epoch: i32,
    },
    /// Close a session, then a sessionless full fetch (id, 0).
    Close(SessionId),
}

impl FetchKind {
    /// Reads the request's session fields.
    pub fn of(session_id: u32, session_epoch: i32) -> Result<FetchKind, SessionError> {
        match (SessionId::new(session_id), session_epoch) {
            (_, NEW_SESSION_EPOCH) => Ok(FetchKind::Open),
            (None, SESSIONLESS_EPOCH) => Ok(FetchKind::Sessionless),
            (Some(id), SESSIONLESS_EPOCH) => Ok(FetchKind::Close(id)),
            (Some(id), epoch) if epoch >= FIRST_INCREMENTAL_EPOCH => Ok(FetchKind::Incremental { id, epoch }),
            // An incremental epoch without a session names a session that
            // cannot exist.
            (None, epoch) if epoch >= FIRST_INCREMENTAL_EPOCH => Err(SessionError::NotFound { session_id: 0 }),
            (id, epoch) => {
                Err(SessionError::InvalidEpoch { session_id: id.map_or(0, SessionId::get), expected: None, got: epoch })
            }
        }
    }
}

/// Why a request's session is refused; the request is answered with the
/// code and no partition.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// No such session here for this follower (never opened, evicted,
    /// replaced, closed, or the leader restarted).
    #[error("fetch session {session_id} not found (evicted, replaced, or the leader restarted)")]
    NotFound {
        /// The id asked for.
        session_id: u32,
    },
    /// The request's epoch is not the one the session expects next.
    #[error("fetch session {session_id} expects epoch {expected:?}, the request carries {got}")]
    InvalidEpoch {
        /// The id asked for.
        session_id: u32,
        /// The epoch expected, when the session exists.
        expected: Option<i32>,
        /// The request's epoch.
        got: i32,
    },
    /// The session is serving another request.
    #[error("fetch session {session_id} is serving another request")]
    InUse {
        /// The id asked for.
        session_id: u32,
    },
    /// An incremental request would grow the session past its bound: the
    /// session is closed.
    #[error("fetch session {session_id} would hold {partitions} partitions, more than {max}; closed")]
    TooManyPartitions {
        /// The id asked for.
        session_id: u32,
        /// Partitions it would hold.
        partitions: usize,
        /// The bound.
        max: usize,
    },
}

impl SessionError {
    /// The wire code (Kafka's numbers).
    pub fn code(&self) -> ErrorCode {
        match self {
            SessionError::NotFound { .. } | SessionError::TooManyPartitions { .. } => ErrorCode::FetchSessionIdNotFound,
            SessionError::InvalidEpoch { .. } | SessionError::InUse { .. } => ErrorCode::InvalidFetchSessionEpoch,
        }
    }
}

/// A partition as a session knows it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PartitionKey {
    /// Topic name.
    pub topic: String,
    /// Partition number.
    pub partition: u32,
}

/// Where a follower's fetch of one partition stands, as it last sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchPosition {
    /// The topic's stable id (a recreated topic has another).
    pub topic_id: String,
    /// The follower's log end, as sent (the leader checks its range).
    pub fetch_offset: i64,
    /// The leader epoch the follower believes current.
    pub current_leader_epoch: u32,
    /// The epoch of the follower's last batch; `None` when its log is empty.
    pub last_fetched_epoch: Option<u32>,
}

/// One partition of a request: a full fetch's, or an incremental one's
/// addition or change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchEntry {
    /// Which partition.
    pub key: PartitionKey,
    /// Where the follower stands.
    pub position: FetchPosition,
}

/// What one read of a partition found, for deciding whether to answer it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReadSummary {
    /// Bytes of records read.
    pub bytes: u64,
    /// The read failed (the answer carries an error code).
    pub error: bool,
    /// The follower's log diverges (the answer carries where).
    pub diverging: bool,
    /// The high watermark the answer carries.
    pub high_watermark: i64,
    /// The log start offset the answer carries.
    pub log_start_offset: i64,
    /// The read found records for the follower but carries none: the
    /// response's byte budget was spent. The follower's standing was counted
    /// (the read was made); the partition is read first in the next request.
    pub deferred: bool,
}

impl ReadSummary {
    /// Whether this read ends a long poll: records, an error or a diverging
    /// epoch. A high watermark that moved does not (it rides along).
    pub fn is_news(&self) -> bool {
        self.bytes > 0 || self.error || self.diverging
    }
}

/// What a session last told its follower about a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sent {
    high_watermark: i64,
    log_start_offset: i64,
}

/// A partition in a session. `H` is the server's handle for it (its
/// watcher of the partition's log end).
#[derive(Debug)]
pub struct CachedPartition<H> {
    key: PartitionKey,
    position: FetchPosition,
    /// What the last answer of it carried; `None` before any, and after an
    /// error (so the next good read is answered, as Kafka does).
    sent: Option<Sent>,
    /// The request number that last listed it.
    listed_in: u64,
    /// The pass number that last read it.
    read_in: u64,
    /// Its index among the current request's answers, when it has one.
    answer: Option<usize>,
    /// Read in the next pass (listed, or its log end moved).
    hot: bool,
    /// The server's handle.
    handle: H,
}

impl<H> CachedPartition<H> {
    /// Which partition.
    pub fn key(&self) -> &PartitionKey {
        &self.key
    }

    /// The position the follower last sent.
    pub fn position(&self) -> &FetchPosition {
        &self.position
    }
}

#[derive(Debug)]
struct Slot<H> {
    /// Bumped whenever the slot is freed, so a handle's late signal about a
    /// partition that left is not taken for the one that took its place.
    generation: u32,
    partition: Option<CachedPartition<H>>,
}

/// Where a read's answer goes in the response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerAt {
    /// Appended: at this index (the number of answers so far).
    Push(usize),
    /// Replaces this request's earlier answer of the same partition.
    Replace(usize),
}

/// Counters of a session, since it opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SessionStats {
    /// Partitions the opening full fetch listed.
    pub opened_with: usize,
    /// Incremental requests accepted.
    pub incremental_fetches: u64,
    /// Partition entries (listed plus forgotten) those requests carried.
    pub incremental_request_partitions: u64,
    /// Partition entries the answers to them carried.
    pub incremental_response_partitions: u64,
}

/// One follower's session (or, for a sessionless fetch, the same state for
/// one request, never cached). `H` is the server's per-partition handle, `W`
/// its per-session state (what it waits on).
#[derive(Debug)]
pub struct Session<H, W> {
    follower: BrokerId,
    slots: Vec<Slot<H>>,
    free: Vec<usize>,
    by_key: HashMap<PartitionKey, usize>,
    /// Slots marked hot since the last plan.
    hot: Vec<usize>,
    /// Where passes start reading (rotated so one busy partition does not
    /// always take the byte budget first, and partitions deferred for lack of
    /// room go first next time).
    cursor: usize,
    /// Numbers the current request and pass.
    request: u64,
    pass: u64,
    /// Passes planned in the current request.
    passes_this_request: u32,
    /// Whether the current request is a full fetch (answer everything).
    full: bool,
    /// Where the sweep of cold partitions goes on, and when it last did.
    sweep_cursor: usize,
    swept_at_ms: Option<u64>,
    /// Partition-milliseconds of sweeping owed but not yet a whole read.
    sweep_credit: u128,
    /// The slots answered in the current request, in answer order.
    answered: Vec<usize>,
    /// The slot after the first one whose read had records this request.
    past_first_records: Option<usize>,
    /// The first slot deferred this request (records, but no room left).
    first_deferred: Option<usize>,
    stats: SessionStats,
    /// The server's per-session state.
    pub watch: W,
}

impl<H: Default, W: Default> Session<H, W> {
    /// A session of `follower` holding `entries` (a later entry for the same
    /// partition wins), serving its first request: a full fetch.
    pub fn new(follower: BrokerId, entries: Vec<FetchEntry>) -> Session<H, W> {
        let mut session = Session {
            follower,
            slots: Vec::with_capacity(entries.len()),
            free: Vec::new(),
            by_key: HashMap::with_capacity(entries.len()),
            hot: Vec::new(),
            cursor: 0,
            request: 1,
            pass: 0,
            passes_this_request: 0,
            full: true,
            sweep_cursor: 0,
            swept_at_ms: None,
            sweep_credit: 0,
            answered: Vec::new(),
            past_first_records: None,
            first_deferred: None,
            stats: SessionStats::default(),
            watch: W::default(),
        };
        for entry in entries {
            session.upsert(entry);
        }
        session.stats.opened_with = session.len();
        session
    }

    /// Takes an incremental request: `forgotten` leave the session, then
    /// `listed` are updated or added (so a partition both forgotten and
    /// listed starts afresh). Returns the handles of the partitions that
    /// left, for the server to release. Refuses to grow past
    /// [`MAX_SESSION_PARTITIONS`] (the caller closes the session).
    pub fn merge(
        &mut self,
        session_id: SessionId,
        listed: Vec<FetchEntry>,
        forgotten: Vec<PartitionKey>,
    ) -> Result<Vec<H>, SessionError> {
        // A request that was cancelled never finished: forget its answers.
        self.clear_answers();
        self.request += 1;
        self.passes_this_request = 0;
        self.full = false;
        self.stats.incremental_fetches += 1;
        self.stats.incremental_request_partitions += (listed.len() + forgotten.len()) as u64;
        let mut released = Vec::new();
        for key in &forgotten {
            if let Some(handle) = self.remove(key) {
                released.push(handle);
            }
        }
        let added = listed.iter().filter(|e| !self.by_key.contains_key(&e.key)).count();
        if self.len() + added > MAX_SESSION_PARTITIONS {
            return Err(SessionError::TooManyPartitions {
                session_id: session_id.get(),
                partitions: self.len() + added,
                max: MAX_SESSION_PARTITIONS,
            });
        }
        for entry in listed {
            self.upsert(entry);
        }
        Ok(released)
    }

    fn upsert(&mut self, entry: FetchEntry) {
        let request = self.request;
        let slot = match self.by_key.get(&entry.key) {
            Some(&slot) => {
                let p = self.slots[slot].partition.as_mut().expect("indexed slots are occupied");
                p.position = entry.position;
                slot
            }
            None => {
                let cached = CachedPartition {
                    key: entry.key.clone(),
                    position: entry.position,
                    sent: None,
                    listed_in: 0,
                    read_in: 0,
                    answer: None,
                    hot: false,
                    handle: H::default(),
                };
                let slot = match self.free.pop() {
                    Some(slot) => {
                        self.slots[slot].partition = Some(cached);
                        slot
                    }
                    None => {
                        self.slots.push(Slot { generation: 0, partition: Some(cached) });
                        self.slots.len() - 1
                    }
                };
                self.by_key.insert(entry.key, slot);
                slot
            }
        };
        let p = self.slots[slot].partition.as_mut().expect("just filled");
        p.listed_in = request;
        if !p.hot {
            p.hot = true;
            self.hot.push(slot);
        }
    }

    fn remove(&mut self, key: &PartitionKey) -> Option<H> {
        let slot = self.by_key.remove(key)?;
        let s = &mut self.slots[slot];
        let p = s.partition.take().expect("indexed slots are occupied");
        s.generation = s.generation.wrapping_add(1);
        self.free.push(slot);
        Some(p.handle)
    }
}

impl<H, W> Session<H, W> {
    /// The follower this session belongs to.
    pub fn follower(&self) -> BrokerId {
        self.follower
    }

    /// Partitions in the session.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// True when the session holds no partition.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// Its counters.
    pub fn stats(&self) -> SessionStats {
        self.stats
    }

    /// The partition in `slot` (a slot [`Session::plan`] returned).
    pub fn partition(&self, slot: usize) -> &CachedPartition<H> {
        self.slots[slot].partition.as_ref().expect("planned slots are occupied")
    }

    /// The generation of `slot`: what a handle's signal about it carries.
    pub fn generation(&self, slot: usize) -> u32 {
        self.slots[slot].generation
    }

    /// The handle of the partition in `slot`, and the session's state.
    pub fn handle_mut(&mut self, slot: usize) -> (&mut H, &mut W) {
        let p = self.slots[slot].partition.as_mut().expect("planned slots are occupied");
        (&mut p.handle, &mut self.watch)
    }

    /// [`Session::handle_mut`] if `slot` still holds the partition of
    /// `generation` (a handle's late signal may be about one that left).
    pub fn handle_of(&mut self, slot: usize, generation: u32) -> Option<(&mut H, &mut W)> {
        let s = self.slots.get_mut(slot).filter(|s| s.generation == generation)?;
        let p = s.partition.as_mut()?;
        Some((&mut p.handle, &mut self.watch))
    }

    /// The partition in `slot` of `generation` may have something new (its
    /// log end moved): read it in the next pass. A signal about a partition
    /// that has left the slot since is ignored. Returns whether it counted.
    pub fn mark_hot(&mut self, slot: usize, generation: u32) -> bool {
        let Some(s) = self.slots.get_mut(slot) else { return false };
        if s.generation != generation {
            return false;
        }
        let Some(p) = s.partition.as_mut() else { return false };
        if !p.hot {
            p.hot = true;
            self.hot.push(slot);
        }
        true
    }

    /// Starts a pass: the slots to read, in order. Hot partitions first (in
    /// an order that rotates: see [`Session::finish_request`]), then the
    /// sweep: cold partitions in turn, as many as keep every partition read
    /// at least once per `every_ms` (spread over the requests of that
    /// time, so a busy session reads a few per round and an idle one, asking
    /// once per wait, reads them all). A full fetch reads everything in its
    /// first pass. Each slot appears once per pass.
    pub fn plan(&mut self, now_ms: u64, every_ms: u64) -> Vec<usize> {
        self.pass += 1;
        let n = self.slots.len();
        let cursor = if n == 0 { 0 } else { self.cursor % n };
        let rotated = |slot: usize| (slot + n - cursor) % n;
        let mut hot = std::mem::take(&mut self.hot);
        hot.retain(|&slot| self.slots[slot].partition.as_ref().is_some_and(|p| p.hot));
        hot.sort_by_key(|&slot| rotated(slot));
        hot.dedup();
        let first = self.passes_this_request == 0;
        self.passes_this_request = self.passes_this_request.saturating_add(1);
        let mut plan = hot;
        for &slot in &plan {
            let p = self.slots[slot].partition.as_mut().expect("retained occupied");
            p.hot = false;
            p.read_in = self.pass;
        }
        let owed = self.sweep_owed(now_ms, every_ms);
        let owed = if self.full && first { self.len() } else { owed };
        self.sweep(owed, &mut plan);
        plan
    }

    /// How many partitions the sweep reads now: `len` per `every_ms` since
    /// it last ran (all of them at most, and on its first run).
    fn sweep_owed(&mut self, now_ms: u64, every_ms: u64) -> usize {
        let n = self.len();
        let Some(last) = self.swept_at_ms.replace(now_ms) else { return n };
        if every_ms == 0 {
            return n;
        }
        let elapsed = u128::from(now_ms.saturating_sub(last));
        self.sweep_credit = self.sweep_credit.saturating_add(elapsed * n as u128);
        let owed = self.sweep_credit / u128::from(every_ms);
        if owed >= n as u128 {
            self.sweep_credit = 0;
            return n;
        }
        self.sweep_credit -= owed * u128::from(every_ms);
        usize::try_from(owed).expect("below len")
    }

    /// Adds the next `owed` partitions of the sweep to `plan` (those read in
    /// this pass already count, and are not read twice).
    fn sweep(&mut self, mut owed: usize, plan: &mut Vec<usize>) {
        let slots = self.slots.len();
        let pass = self.pass;
        let mut visited = 0;
        while owed > 0 && visited < slots {
            let slot = self.sweep_cursor % slots;
            self.sweep_cursor = slot + 1;
            visited += 1;
            let Some(p) = self.slots[slot].partition.as_mut() else { continue };
            owed -= 1;
            if p.read_in != pass {
                p.read_in = pass;
                p.hot = false;
                plan.push(slot);
            }
        }
    }

    /// Takes a read of `slot` in this pass: whether the answer includes it,
    /// and where. Remembers what was sent. A deferred read (records, no
    /// room) makes the partition hot again, for the next request.
    pub fn record(&mut self, slot: usize, read: &ReadSummary) -> Option<AnswerAt> {
        let (full, request) = (self.full, self.request);
        let p = self.slots[slot].partition.as_mut().expect("planned slots are occupied");
        if read.deferred {
            if !p.hot {
                p.hot = true;
                self.hot.push(slot);
            }
            self.first_deferred.get_or_insert(slot);
        }
        if read.bytes > 0 {
            self.past_first_records.get_or_insert(slot + 1);
        }
        let sent = Sent { high_watermark: read.high_watermark, log_start_offset: read.log_start_offset };
        let include = full || read.is_news() || p.listed_in == request || p.answer.is_some() || p.sent != Some(sent);
        if !include {
            return None;
        }
        p.sent = if read.error { None } else { Some(sent) };
        match p.answer {
            Some(index) => Some(AnswerAt::Replace(index)),
            None => {
                let index = self.answered.len();
                p.answer = Some(index);
                self.answered.push(slot);
                Some(AnswerAt::Push(index))
            }
        }
    }

    /// Ends the current request: returns how many partitions it answered,
    /// and rotates where the next passes start: at the first partition
    /// deferred for lack of room (those not served go first), else past the
    /// first partition that had records (so with several busy partitions
    /// each takes the byte budget first in turn).
    pub fn finish_request(&mut self) -> usize {
        let answered = self.answered.len();
        if !self.full {
            self.stats.incremental_response_partitions += answered as u64;
        }
        if let Some(next) = self.first_deferred.or(self.past_first_records) {
            self.cursor = next;
        }
        self.clear_answers();
        answered
    }

    fn clear_answers(&mut self) {
        for i in 0..self.answered.len() {
            let slot = self.answered[i];
            if let Some(p) = self.slots[slot].partition.as_mut() {
                p.answer = None;
            }
        }
        self.answered.clear();
        self.past_first_records = None;
        self.first_deferred = None;
    }

    /// Every handle, for the server to release (a session that ends).
    pub fn into_handles(self) -> impl Iterator<Item = H> {
        self.slots.into_iter().filter_map(|s| s.partition.map(|p| p.handle))
    }
}

/// What [`FetchSessionCache::describe`] shows of one session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    /// The session.
    pub id: SessionId,
    /// Its follower.
    pub follower: BrokerId,
    /// The epoch its next incremental fetch must carry.
    pub next_epoch: i32,
    /// Partitions it holds (as of its last check-in).
    pub partitions: usize,
    /// Its counters (as of its last check-in).
    pub stats: SessionStats,
}

/// A checked-out session's claim on its cache entry: the id, and which
/// opening of that id it is. Ids are random and may be drawn again once
/// their session left the cache; the generation tells a late check-in of a
/// replaced or evicted session from the session that now holds the id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    /// The session's id.
    pub id: SessionId,
    generation: u64,
}

#[derive(Debug)]
struct Entry<S> {
    follower: BrokerId,
    /// Which opening this is (unique for the cache's life).
    generation: u64,
    next_epoch: i32,
    last_used: u64,
    /// `None` while a request has it checked out.
    session: Option<S>,
    /// As of the last check-in (or the opening); counted in
    /// [`FetchSessionCache::partitions`].
    partitions: usize,
    stats: SessionStats,
}

/// The sessions a leader holds, bounded (sessions, and partitions over all
/// of them), least recently used evicted first.
#[derive(Debug)]
pub struct FetchSessionCache<H, W> {
    entries: HashMap<SessionId, Entry<Session<H, W>>>,
    by_follower: HashMap<BrokerId, SessionId>,
    max_sessions: usize,
    /// Partitions held over all entries at most.
    max_partitions: usize,
    /// The sum of the entries' `partitions`.
    partitions: usize,
    /// splitmix64 state for session ids (random, so a restarted leader is
    /// unlikely to hand out an id a follower still holds from before).
    rng: u64,
    /// Logical clock for least-recently-used.
    tick: u64,
    /// Openings so far: the next entry's generation.
    opened: u64,
}

impl<H, W> FetchSessionCache<H, W> {
    /// An empty cache of at most `max_sessions` (at least 1) holding at most
    /// [`MAX_CACHED_PARTITIONS`] partitions, drawing ids from `seed`.
    pub fn new(max_sessions: usize, seed: u64) -> FetchSessionCache<H, W> {
        FetchSessionCache {
            entries: HashMap::new(),
            by_follower: HashMap::new(),
            max_sessions: max_sessions.max(1),
            max_partitions: MAX_CACHED_PARTITIONS,
            partitions: 0,
            rng: seed,
            tick: 0,
            opened: 0,
        }
    }

    /// The same cache holding at most `max_partitions` partitions over all
    /// its sessions.
    pub fn with_max_partitions(mut self, max_partitions: usize) -> FetchSessionCache<H, W> {
        self.max_partitions = max_partitions;
        self
    }

    /// Sessions held (checked out ones included).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no session is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Partitions held over all sessions (as of their last check-in).
    pub fn partitions(&self) -> usize {
        self.partitions
    }

    fn next_id(&mut self) -> SessionId {
        loop {
            // splitmix64
            self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.rng;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let candidate = u32::try_from(z >> 32).expect("the high half fits");
            if let Some(id) = SessionId::new(candidate)
                && !self.entries.contains_key(&id)
            {
                return id;
            }
        }
    }

    /// Opens a session for `session` (checked out to the caller, who checks
    /// it in with the ticket when its first request ends). It replaces the
    /// follower's previous session, and evicts the least recently used one
    /// when the cache is full. Returns the ticket, and the sessions that
    /// left, for the caller to drop outside any lock. No ticket when the
    /// session is too large to cache, alone or beside the others (the
    /// follower's previous session is still replaced): serve it without one.
    pub fn open(&mut self, session: &Session<H, W>) -> (Option<Ticket>, Vec<Session<H, W>>) {
        let (room, dropped) = self.make_room(session);
        if !room {
            return (None, dropped);
        }
        let id = self.next_id();
        (Some(self.insert(id, session)), dropped)
    }

    /// Removes the follower's previous session, then checks the bounds and
    /// evicts for a new `session`. Returns whether it fits, and what left.
    fn make_room(&mut self, session: &Session<H, W>) -> (bool, Vec<Session<H, W>>) {
        let mut dropped = Vec::new();
        if let Some(old) = self.by_follower.get(&session.follower).copied() {
            dropped.extend(self.remove(old));
        }
        if session.len() > MAX_SESSION_PARTITIONS || self.partitions + session.len() > self.max_partitions {
            return (false, dropped);
        }
        while self.entries.len() >= self.max_sessions {
            let Some(lru) = self.entries.iter().min_by_key(|(_, e)| e.last_used).map(|(id, _)| *id) else { break };
            dropped.extend(self.remove(lru));
        }
        (true, dropped)
    }

    /// Enters `session` under `id` (not held), checked out.
    fn insert(&mut self, id: SessionId, session: &Session<H, W>) -> Ticket {
        debug_assert!(!self.entries.contains_key(&id));
        self.tick += 1;
        self.opened += 1;
        let generation = self.opened;
        self.entries.insert(
            id,
            Entry {
                follower: session.follower,
                generation,
                next_epoch: FIRST_INCREMENTAL_EPOCH,
                last_used: self.tick,
                session: None,
                partitions: session.len(),
                stats: session.stats,
            },
        );
        self.partitions += session.len();
        self.by_follower.insert(session.follower, id);
        Ticket { id, generation }
    }

    /// Takes session `id` out for an incremental request of `follower` with
    /// `epoch`, moving its expected epoch on. Refused when no such session
    /// belongs to this follower, when the epoch is not the expected one, or
    /// when another request has it.
    pub fn check_out(
        &mut self,
        id: SessionId,
        epoch: i32,
        follower: BrokerId,
    ) -> Result<(Ticket, Session<H, W>), SessionError> {
        let session_id = id.get();
        let entry = match self.entries.get_mut(&id) {
            Some(entry) if entry.follower == follower => entry,
            _ => return Err(SessionError::NotFound { session_id }),
        };
        if epoch != entry.next_epoch {
            return Err(SessionError::InvalidEpoch { session_id, expected: Some(entry.next_epoch), got: epoch });
        }
        let session = entry.session.take().ok_or(SessionError::InUse { session_id })?;
        entry.next_epoch = next_epoch(epoch);
        self.tick += 1;
        entry.last_used = self.tick;
        Ok((Ticket { id, generation: entry.generation }, session))
    }

    /// Returns a checked-out session after its request. Only the opening the
    /// ticket names takes it back, and only from its follower: a session
    /// that was replaced, evicted or closed meanwhile (even if its id was
    /// drawn again since) is handed back, for the caller to drop outside any
    /// lock. So is one that grew past the cache's partition bound: it is
    /// closed (its follower asks again, and gets a session if there is room).
    pub fn check_in(&mut self, ticket: Ticket, session: Session<H, W>) -> Option<Session<H, W>> {
        let others = match self.entries.get(&ticket.id) {
            Some(entry)
                if entry.generation == ticket.generation
                    && entry.follower == session.follower
                    && entry.session.is_none() =>
            {
                self.partitions - entry.partitions
            }
            _ => return Some(session),
        };
        if others + session.len() > self.max_partitions {
            self.remove(ticket.id);
            return Some(session);
        }
        let entry = self.entries.get_mut(&ticket.id).expect("found above");
        entry.partitions = session.len();
        entry.stats = session.stats;
        entry.session = Some(session);
        self.partitions = others + entry.partitions;
        None
    }

    /// Closes session `id` if `follower` holds it; returns it, if it was
    /// checked in, for the caller to drop outside any lock.
    pub fn close(&mut self, id: SessionId, follower: BrokerId) -> Option<Session<H, W>> {
        match self.entries.get(&id) {
            Some(entry) if entry.follower == follower => self.remove(id),
            _ => None,
        }
    }

    fn remove(&mut self, id: SessionId) -> Option<Session<H, W>> {
        let entry = self.entries.remove(&id)?;
        self.partitions -= entry.partitions;
        if self.by_follower.get(&entry.follower) == Some(&id) {
            self.by_follower.remove(&entry.follower);
        }
        entry.session
    }

    /// Every session, by id.
    pub fn describe(&self) -> Vec<SessionInfo> {
        let mut out: Vec<SessionInfo> = self
            .entries
            .iter()
            .map(|(id, e)| SessionInfo {
                id: *id,
                follower: e.follower,
                next_epoch: e.next_epoch,
                partitions: e.partitions,
                stats: e.stats,
            })
            .collect();
        out.sort_by_key(|s| s.id);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestSession = Session<u32, ()>;
    type TestCache = FetchSessionCache<u32, ()>;

    const EVERY_MS: u64 = 500;

    fn key(topic: &str, partition: u32) -> PartitionKey {
        PartitionKey { topic: topic.to_string(), partition }
    }

    fn at(topic: &str, partition: u32, offset: i64) -> FetchEntry {
        FetchEntry {
            key: key(topic, partition),
            position: FetchPosition {
                topic_id: format!("{topic}-id"),
                fetch_offset: offset,
                current_leader_epoch: 1,
                last_fetched_epoch: Some(1),
            },
        }
    }

    fn idle(partitions: u32) -> Vec<FetchEntry> {
        (0..partitions).map(|p| at("t", p, 10)).collect()
    }

    /// A read that found nothing new: the high watermark at `hw`.
    fn quiet(hw: i64) -> ReadSummary {
        ReadSummary { high_watermark: hw, log_start_offset: 0, ..ReadSummary::default() }
    }

    /// What one pass did: the partitions read (with the position read at),
    /// and those the answer includes.
    #[derive(Debug, Default)]
    struct Pass {
        read: Vec<(PartitionKey, i64)>,
        answered: Vec<PartitionKey>,
        news: bool,
    }

    fn pass(s: &mut TestSession, now_ms: u64, read: impl Fn(&PartitionKey) -> ReadSummary) -> Pass {
        let mut out = Pass::default();
        for slot in s.plan(now_ms, EVERY_MS) {
            let (k, offset) = (s.partition(slot).key().clone(), s.partition(slot).position().fetch_offset);
            let summary = read(&k);
            out.news |= summary.is_news();
            out.read.push((k.clone(), offset));
            if s.record(slot, &summary).is_some() {
                out.answered.push(k);
            }
        }
        out
    }

    fn keys(pass: &[(PartitionKey, i64)]) -> Vec<PartitionKey> {
        pass.iter().map(|(k, _)| k.clone()).collect()
    }

    /// A session of 5 idle partitions after its full fetch at t=0.
    fn opened() -> TestSession {
        let mut s = TestSession::new(BrokerId(2), idle(5));
        let first = pass(&mut s, 0, |_| quiet(10));
        assert_eq!(first.answered.len(), 5);
        s.finish_request();
        s
    }

    fn incremental(s: &mut TestSession, listed: Vec<FetchEntry>, forgotten: Vec<PartitionKey>) -> Vec<u32> {
        s.merge(SessionId::new(7).unwrap(), listed, forgotten).unwrap()
    }

    #[test]
    fn session_fields_name_the_kind_of_fetch() {
        let id = SessionId::new(7).unwrap();
        assert_eq!(FetchKind::of(0, 0), Ok(FetchKind::Sessionless), "the proto3 defaults: an older follower");
        assert_eq!(FetchKind::of(0, NEW_SESSION_EPOCH), Ok(FetchKind::Open));
        assert_eq!(FetchKind::of(7, NEW_SESSION_EPOCH), Ok(FetchKind::Open));
        assert_eq!(FetchKind::of(7, 0), Ok(FetchKind::Close(id)));
        assert_eq!(FetchKind::of(7, 3), Ok(FetchKind::Incremental { id, epoch: 3 }));
        let no_session = FetchKind::of(0, 3).unwrap_err();
        assert_eq!(no_session.code(), ErrorCode::FetchSessionIdNotFound);
        let below = FetchKind::of(7, -2).unwrap_err();
        assert_eq!(below.code(), ErrorCode::InvalidFetchSessionEpoch);
        assert_eq!(ErrorCode::FetchSessionIdNotFound as i32, 70, "Kafka's number");
        assert_eq!(ErrorCode::InvalidFetchSessionEpoch as i32, 71, "Kafka's number");
    }

    #[test]
    fn epochs_count_up_from_one_and_wrap_to_one() {
        assert_eq!(next_epoch(FIRST_INCREMENTAL_EPOCH), 2);
        assert_eq!(next_epoch(41), 42);
        assert_eq!(next_epoch(i32::MAX), FIRST_INCREMENTAL_EPOCH);
    }

    #[test]
    fn a_full_fetch_reads_and_answers_every_partition_once() {
        let mut s = TestSession::new(BrokerId(2), idle(4));
        let first = pass(&mut s, 0, |_| quiet(10));
        assert_eq!(keys(&first.read), (0..4).map(|p| key("t", p)).collect::<Vec<_>>(), "in request order");
        assert_eq!(first.answered, keys(&first.read));
        assert!(!first.news, "nothing new: the fetch long-polls");
        let again = pass(&mut s, 1, |_| quiet(10));
        assert!(again.read.is_empty(), "a later pass of the same request reads only what moved");
        assert_eq!(s.finish_request(), 4);
    }

    #[test]
    fn an_idle_session_reads_every_partition_where_it_stood_once_per_interval_and_answers_nothing() {
        let mut s = opened();
        incremental(&mut s, Vec::new(), Vec::new());
        let due = pass(&mut s, EVERY_MS, |_| quiet(10));
        assert_eq!(due.read.len(), 5, "the follower's standing is counted for every partition");
        assert!(due.read.iter().all(|(_, offset)| *offset == 10), "at the position it last sent");
        assert!(due.answered.is_empty(), "nothing changed: the answer is empty");
        assert_eq!(s.finish_request(), 0);
        incremental(&mut s, Vec::new(), Vec::new());
        assert!(pass(&mut s, EVERY_MS + 1, |_| quiet(10)).read.is_empty(), "not again so soon");
        // The next request, a wait later, reads them all again.
        assert_eq!(pass(&mut s, 2 * EVERY_MS + 1, |_| quiet(10)).read.len(), 5);
    }

    #[test]
    fn a_busy_session_spreads_the_sweep_over_its_requests() {
        let mut s = opened();
        let mut reads: Vec<Vec<u32>> = Vec::new();
        // Ten requests in one interval: one partition read per two requests.
        for round in 1..=10 {
            incremental(&mut s, Vec::new(), Vec::new());
            let read = pass(&mut s, round * EVERY_MS / 10, |_| quiet(10));
            reads.push(read.read.iter().map(|(k, _)| k.partition).collect());
            s.finish_request();
        }
        assert!(reads.iter().all(|r| r.len() <= 1), "{reads:?}");
        let mut swept: Vec<u32> = reads.concat();
        assert_eq!(swept.len(), 5, "each partition once in the interval: {reads:?}");
        swept.sort();
        assert_eq!(swept, vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn an_incremental_answer_holds_records_errors_divergence_moved_marks_and_listed_partitions_only() {
        let mut s = opened();
        incremental(&mut s, vec![at("t", 4, 12)], Vec::new());
        let read = pass(&mut s, EVERY_MS, |k| match k.partition {
            0 => ReadSummary { bytes: 100, ..quiet(10) },
            1 => ReadSummary { error: true, high_watermark: -1, log_start_offset: -1, ..ReadSummary::default() },
            2 => ReadSummary { diverging: true, ..quiet(10) },
            3 => quiet(11),
            _ => quiet(10),
        });
        let answered: Vec<u32> = read.answered.iter().map(|k| k.partition).collect();
        assert_eq!(answered.len(), 5, "{answered:?}");
        assert_eq!(read.read[0].0.partition, 4, "the listed partition is read first");
        assert!(read.news);
        s.finish_request();
        // Nothing moved since: nothing is answered.
        incremental(&mut s, Vec::new(), Vec::new());
        let next = pass(&mut s, 2 * EVERY_MS, |k| if k.partition == 1 { quiet(10) } else { quiet(11) });
        let mut answered: Vec<u32> = next.answered.iter().map(|k| k.partition).collect();
        answered.sort();
        assert_eq!(
            answered,
            vec![0, 1, 2, 4],
            "the errored partition's good read is answered again, the rest whose mark moved"
        );
        assert!(!next.news, "a high watermark that moved does not end the wait");
    }

    #[test]
    fn the_log_start_moving_is_answered() {
        let mut s = opened();
        incremental(&mut s, Vec::new(), Vec::new());
        let read =
            pass(&mut s, EVERY_MS, |k| ReadSummary { log_start_offset: i64::from(k.partition == 2), ..quiet(10) });
        assert_eq!(read.answered, vec![key("t", 2)]);
    }

    #[test]
    fn a_listed_position_replaces_the_cached_one_and_is_read_at_once() {
        let mut s = opened();
        // The follower appended to partition 3, and learned epoch 2 for 1.
        let mut moved = at("t", 1, 10);
        moved.position.current_leader_epoch = 2;
        incremental(&mut s, vec![at("t", 3, 15), moved], Vec::new());
        let read = pass(&mut s, 1, |_| quiet(10));
        assert_eq!(read.read, vec![(key("t", 1), 10), (key("t", 3), 15)], "only the listed, not yet a full pass");
        assert_eq!(read.answered.len(), 2, "a listed partition is always answered");
        let slot = s.by_key[&key("t", 1)];
        assert_eq!(s.partition(slot).position().current_leader_epoch, 2);
        s.finish_request();
        incremental(&mut s, Vec::new(), Vec::new());
        let later = pass(&mut s, EVERY_MS + 1, |_| quiet(10));
        assert!(later.read.contains(&(key("t", 3), 15)), "and read there from then on: {later:?}");
    }

    #[test]
    fn forgotten_partitions_are_neither_read_nor_answered_and_hand_back_their_handles() {
        let mut s = opened();
        for slot in 0..5 {
            *s.handle_mut(slot).0 = slot as u32 + 100;
        }
        let released = incremental(&mut s, Vec::new(), vec![key("t", 1), key("t", 3), key("other", 0)]);
        assert_eq!(released, vec![101, 103], "the unknown one is ignored");
        assert_eq!(s.len(), 3);
        let read = pass(&mut s, EVERY_MS, |_| ReadSummary { bytes: 1, ..quiet(10) });
        assert_eq!(keys(&read.read), vec![key("t", 0), key("t", 2), key("t", 4)]);
    }

    #[test]
    fn a_partition_forgotten_and_listed_in_one_request_starts_afresh() {
        let mut s = opened();
        *s.handle_mut(s.by_key[&key("t", 2)]).0 = 42;
        let released = incremental(&mut s, vec![at("t", 2, 3)], vec![key("t", 2)]);
        assert_eq!(released, vec![42], "the old watcher goes");
        let slot = s.by_key[&key("t", 2)];
        assert_eq!(*s.handle_mut(slot).0, 0, "a new handle");
        let read = pass(&mut s, 1, |_| quiet(10));
        assert_eq!(read.read, vec![(key("t", 2), 3)]);
        assert_eq!(read.answered, vec![key("t", 2)]);
    }

    #[test]
    fn a_recreated_topic_takes_its_new_id() {
        let mut s = opened();
        let mut recreated = at("t", 0, 0);
        recreated.position.topic_id = "t-new-id".to_string();
        recreated.position.last_fetched_epoch = None;
        incremental(&mut s, vec![recreated.clone()], Vec::new());
        let slot = s.by_key[&key("t", 0)];
        assert_eq!(s.partition(slot).position(), &recreated.position);
    }

    #[test]
    fn a_moved_log_end_makes_a_partition_hot_unless_it_left_the_slot() {
        let mut s = opened();
        incremental(&mut s, Vec::new(), Vec::new());
        let slot = s.by_key[&key("t", 2)];
        let generation = s.generation(slot);
        assert!(s.mark_hot(slot, generation));
        assert!(s.mark_hot(slot, generation), "twice is once");
        let read = pass(&mut s, 1, |_| ReadSummary { bytes: 7, ..quiet(10) });
        assert_eq!(read.read, vec![(key("t", 2), 10)]);
        assert!(read.news);
        s.finish_request();
        // The partition leaves and another takes its slot: the old watcher's
        // late signal is not taken for it.
        incremental(&mut s, Vec::new(), vec![key("t", 2)]);
        s.finish_request();
        incremental(&mut s, vec![at("u", 0, 0)], Vec::new());
        let reused = s.by_key[&key("u", 0)];
        assert_eq!(reused, slot, "the slot is reused");
        assert!(!s.mark_hot(slot, generation), "a signal from before is ignored");
        assert!(s.mark_hot(slot, s.generation(slot)));
    }

    #[test]
    fn a_partition_read_again_in_the_same_request_replaces_its_answer() {
        let mut s = opened();
        incremental(&mut s, Vec::new(), Vec::new());
        let slot = s.by_key[&key("t", 1)];
        s.mark_hot(slot, s.generation(slot));
        s.plan(1, EVERY_MS);
        assert_eq!(s.record(slot, &quiet(11)), Some(AnswerAt::Push(0)), "its high watermark moved");
        s.mark_hot(slot, s.generation(slot));
        assert_eq!(s.plan(2, EVERY_MS), vec![slot]);
        assert_eq!(s.record(slot, &ReadSummary { bytes: 5, ..quiet(11) }), Some(AnswerAt::Replace(0)));
        assert_eq!(s.finish_request(), 1);
    }

    #[test]
    fn a_cancelled_request_leaves_no_answer_behind() {
        let mut s = opened();
        incremental(&mut s, vec![at("t", 0, 11)], Vec::new());
        let slot = s.by_key[&key("t", 0)];
        s.plan(1, EVERY_MS);
        assert_eq!(s.record(slot, &quiet(10)), Some(AnswerAt::Push(0)));
        // No finish_request: the follower went away. The next request starts clean.
        incremental(&mut s, vec![at("t", 0, 11)], Vec::new());
        s.plan(2, EVERY_MS);
        assert_eq!(s.record(slot, &quiet(10)), Some(AnswerAt::Push(0)));
    }

    #[test]
    fn a_diverging_answer_ends_the_wait_and_the_truncated_position_is_read_next() {
        let mut s = opened();
        incremental(&mut s, vec![at("t", 2, 20)], Vec::new());
        let read = pass(&mut s, 1, |k| ReadSummary { diverging: k.partition == 2, ..quiet(10) });
        assert!(read.news);
        assert_eq!(read.answered, vec![key("t", 2)]);
        s.finish_request();
        // The follower truncated to 12 and fetches from there.
        incremental(&mut s, vec![at("t", 2, 12)], Vec::new());
        let read = pass(&mut s, 2, |_| ReadSummary { bytes: 30, ..quiet(10) });
        assert_eq!(read.read, vec![(key("t", 2), 12)]);
        assert_eq!(read.answered, vec![key("t", 2)]);
    }

    #[test]
    fn an_out_of_range_partition_is_answered_and_its_restart_position_read_next() {
        let mut s = opened();
        incremental(&mut s, vec![at("t", 0, 3)], Vec::new());
        let error = ReadSummary { error: true, high_watermark: -1, log_start_offset: 50, ..ReadSummary::default() };
        let read = pass(&mut s, 1, |_| error);
        assert_eq!(read.answered, vec![key("t", 0)]);
        assert!(read.news);
        s.finish_request();
        // restart_at(50) on the follower.
        incremental(&mut s, vec![at("t", 0, 50)], Vec::new());
        let read = pass(&mut s, 2, |_| quiet(60));
        assert_eq!(read.read, vec![(key("t", 0), 50)]);
    }

    #[test]
    fn hot_partitions_are_read_from_past_the_one_that_last_had_records() {
        let mut s = opened();
        let all_hot = |s: &mut TestSession| {
            for slot in 0..5 {
                s.mark_hot(slot, s.generation(slot));
            }
        };
        incremental(&mut s, Vec::new(), Vec::new());
        all_hot(&mut s);
        let read = pass(&mut s, 1, |k| ReadSummary { bytes: u64::from(k.partition == 1), ..quiet(10) });
        assert_eq!(read.read[0].0, key("t", 0));
        s.finish_request();
        incremental(&mut s, Vec::new(), Vec::new());
        all_hot(&mut s);
        let next = pass(&mut s, 2, |_| quiet(10));
        let order: Vec<u32> = next.read.iter().map(|(k, _)| k.partition).collect();
        assert_eq!(order, vec![2, 3, 4, 0, 1], "the busy partition no longer takes the byte budget first");
    }

    #[test]
    fn two_busy_partitions_take_the_byte_budget_first_in_turn() {
        let mut s = opened();
        let mut firsts = Vec::new();
        for round in 1..=4 {
            incremental(&mut s, Vec::new(), Vec::new());
            for p in [1, 3] {
                let slot = s.by_key[&key("t", p)];
                s.mark_hot(slot, s.generation(slot));
            }
            let read = pass(&mut s, round, |_| ReadSummary { bytes: 100, ..quiet(10) });
            firsts.push(read.read[0].0.partition);
            s.finish_request();
        }
        assert_eq!(firsts, vec![1, 3, 1, 3]);
    }

    #[test]
    fn partitions_deferred_for_lack_of_room_are_read_first_in_the_next_request() {
        let mut s = opened();
        incremental(&mut s, Vec::new(), Vec::new());
        for p in [0, 2, 4] {
            let slot = s.by_key[&key("t", p)];
            s.mark_hot(slot, s.generation(slot));
        }
        // Partition 0 takes the byte budget; 2 and 4 have records, no room.
        let read = pass(&mut s, 1, |k| match k.partition {
            0 => ReadSummary { bytes: 100, ..quiet(10) },
            _ => ReadSummary { deferred: true, ..quiet(10) },
        });
        assert_eq!(keys(&read.read), vec![key("t", 0), key("t", 2), key("t", 4)]);
        assert_eq!(read.answered, vec![key("t", 0)], "nothing new to say of the deferred ones yet");
        s.finish_request();
        // The follower lists its new position for 0; nothing moves for 2 and 4.
        incremental(&mut s, vec![at("t", 0, 20)], Vec::new());
        let next = pass(&mut s, 2, |_| quiet(10));
        assert_eq!(keys(&next.read), vec![key("t", 2), key("t", 4), key("t", 0)], "the deferred first");
    }

    #[test]
    fn a_session_grows_no_larger_than_its_bound() {
        let mut s = TestSession::new(BrokerId(2), Vec::new());
        s.finish_request();
        let too_many: Vec<FetchEntry> = (0..=MAX_SESSION_PARTITIONS as u32).map(|p| at("t", p, 0)).collect();
        let e = s.merge(SessionId::new(7).unwrap(), too_many, Vec::new()).unwrap_err();
        assert!(matches!(e, SessionError::TooManyPartitions { .. }), "{e}");
        assert_eq!(e.code(), ErrorCode::FetchSessionIdNotFound, "the follower opens a new session");
    }

    fn cache_with(follower: u32, partitions: u32) -> (TestCache, SessionId) {
        let mut cache = TestCache::new(4, 1);
        let id = open(&mut cache, follower, partitions);
        (cache, id)
    }

    fn open(cache: &mut TestCache, follower: u32, partitions: u32) -> SessionId {
        let mut session = TestSession::new(BrokerId(follower), idle(partitions));
        let ticket = cache.open(&session).0.expect("cached");
        pass(&mut session, 0, |_| quiet(10));
        session.finish_request();
        assert!(cache.check_in(ticket, session).is_none());
        ticket.id
    }

    #[test]
    fn a_session_is_found_only_by_its_follower_and_only_at_the_next_epoch() {
        let (mut cache, id) = cache_with(2, 3);
        let unknown = SessionId::new(id.get().wrapping_add(1).max(1)).unwrap();
        assert_eq!(cache.check_out(unknown, 1, BrokerId(2)).unwrap_err().code(), ErrorCode::FetchSessionIdNotFound);
        assert_eq!(
            cache.check_out(id, 1, BrokerId(3)).unwrap_err().code(),
            ErrorCode::FetchSessionIdNotFound,
            "another follower's session is not there for it"
        );
        assert_eq!(cache.check_out(id, 2, BrokerId(2)).unwrap_err().code(), ErrorCode::InvalidFetchSessionEpoch);
        let (ticket, s) = cache.check_out(id, FIRST_INCREMENTAL_EPOCH, BrokerId(2)).unwrap();
        assert_eq!(
            cache.check_out(id, 2, BrokerId(2)).unwrap_err(),
            SessionError::InUse { session_id: id.get() },
            "one request at a time"
        );
        assert!(cache.check_in(ticket, s).is_none());
        let repeat = cache.check_out(id, FIRST_INCREMENTAL_EPOCH, BrokerId(2)).unwrap_err();
        assert_eq!(
            repeat,
            SessionError::InvalidEpoch { session_id: id.get(), expected: Some(2), got: 1 },
            "an accepted epoch is spent, whether or not its answer arrived"
        );
        let (_, s) = cache.check_out(id, 2, BrokerId(2)).unwrap();
        assert_eq!(s.len(), 3);
    }

    #[test]
    fn a_followers_new_session_replaces_its_old_one() {
        let (mut cache, old) = cache_with(2, 3);
        let (ticket, out) = cache.check_out(old, 1, BrokerId(2)).unwrap();
        let new = open(&mut cache, 2, 5);
        assert_ne!(new, old);
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.check_out(old, 2, BrokerId(2)).unwrap_err().code(), ErrorCode::FetchSessionIdNotFound);
        assert!(cache.check_in(ticket, out).is_some(), "the replaced session, checked in late, is handed back to drop");
        assert_eq!(cache.check_out(new, 1, BrokerId(2)).unwrap().1.len(), 5);
        assert_eq!(cache.partitions(), 5, "the replaced session's partitions no longer count");
    }

    #[test]
    fn a_replaced_session_checked_in_late_does_not_overwrite_a_new_one_that_drew_its_id() {
        let (mut cache, id) = cache_with(2, 3);
        let (old_ticket, mut old) = cache.check_out(id, 1, BrokerId(2)).unwrap();
        // While the old session serves a request, its follower opens a new
        // one (a reset), and the new one draws the same id.
        let mut new = TestSession::new(BrokerId(2), idle(5));
        let (room, dropped) = cache.make_room(&new);
        assert!(room && dropped.is_empty(), "the old one is out, so nothing to drop here");
        let new_ticket = cache.insert(id, &new);
        assert_eq!(new_ticket.id, old_ticket.id);
        // The old request ends first, its session moved on to other positions.
        old.merge(id, vec![at("t", 0, 99)], Vec::new()).unwrap();
        old.finish_request();
        assert!(cache.check_in(old_ticket, old).is_some(), "the old opening is handed back, not taken in");
        pass(&mut new, 0, |_| quiet(10));
        new.finish_request();
        assert!(cache.check_in(new_ticket, new).is_none(), "the new one goes back in");
        let (_, held) = cache.check_out(id, FIRST_INCREMENTAL_EPOCH, BrokerId(2)).unwrap();
        assert_eq!(held.len(), 5, "the new session's partitions");
        let slot = held.by_key[&key("t", 0)];
        assert_eq!(held.partition(slot).position().fetch_offset, 10, "at the new session's positions");
    }

    #[test]
    fn a_session_is_checked_in_only_by_its_follower() {
        let (mut cache, id) = cache_with(2, 3);
        let (ticket, _) = cache.check_out(id, 1, BrokerId(2)).unwrap();
        let impostor = TestSession::new(BrokerId(3), idle(1));
        assert!(cache.check_in(ticket, impostor).is_some());
        assert_eq!(cache.describe()[0].partitions, 3);
    }

    #[test]
    fn the_partitions_of_all_sessions_are_bounded() {
        let mut cache = TestCache::new(8, 1).with_max_partitions(10);
        let first = open(&mut cache, 1, 6);
        let refused = TestSession::new(BrokerId(2), idle(5));
        let (ticket, dropped) = cache.open(&refused);
        assert!(ticket.is_none() && dropped.is_empty(), "6 + 5 > 10: served without a session");
        assert_eq!((cache.len(), cache.partitions()), (1, 6));
        open(&mut cache, 2, 4);
        assert_eq!(cache.partitions(), 10);
        // A session that grows past the bound is closed at its check-in.
        let (ticket, mut grown) = cache.check_out(first, 1, BrokerId(1)).unwrap();
        grown.merge(first, vec![at("t", 6, 0)], Vec::new()).unwrap();
        grown.finish_request();
        assert!(cache.check_in(ticket, grown).is_some());
        assert_eq!(cache.check_out(first, 2, BrokerId(1)).unwrap_err().code(), ErrorCode::FetchSessionIdNotFound);
        assert_eq!((cache.len(), cache.partitions()), (1, 4));
        // Its follower's new session fits again.
        open(&mut cache, 1, 6);
        assert_eq!(cache.partitions(), 10);
    }

    #[test]
    fn the_least_recently_used_session_is_evicted_when_the_cache_is_full() {
        let mut cache = TestCache::new(3, 9);
        let ids: Vec<SessionId> = (1..=3).map(|f| open(&mut cache, f, 1)).collect();
        // Follower 1 fetches again: follower 2's session is now the oldest.
        let (ticket, s) = cache.check_out(ids[0], 1, BrokerId(1)).unwrap();
        cache.check_in(ticket, s);
        let fourth = open(&mut cache, 4, 1);
        assert_eq!(cache.len(), 3);
        let held: Vec<SessionId> = cache.describe().iter().map(|i| i.id).collect();
        assert!(!held.contains(&ids[1]), "{held:?}");
        assert!(held.contains(&ids[0]) && held.contains(&ids[2]) && held.contains(&fourth));
    }

    #[test]
    fn a_restarted_leader_knows_no_session() {
        let (_, id) = cache_with(2, 3);
        let mut restarted = TestCache::new(4, 2);
        assert_eq!(restarted.check_out(id, 1, BrokerId(2)).unwrap_err().code(), ErrorCode::FetchSessionIdNotFound);
    }

    #[test]
    fn only_its_follower_closes_a_session() {
        let (mut cache, id) = cache_with(2, 3);
        assert!(cache.close(id, BrokerId(3)).is_none());
        assert_eq!(cache.len(), 1);
        assert!(cache.close(id, BrokerId(2)).is_some());
        assert!(cache.is_empty());
    }

    #[test]
    fn session_ids_are_never_zero_and_never_repeat_among_those_held() {
        let mut cache = TestCache::new(10_000, 0);
        let mut ids = std::collections::BTreeSet::new();
        for f in 0..5_000 {
            assert!(ids.insert(open(&mut cache, f, 0)));
        }
    }

    #[test]
    fn a_session_too_large_to_cache_is_served_without_one() {
        let mut cache = TestCache::new(4, 1);
        let session =
            TestSession::new(BrokerId(2), (0..=MAX_SESSION_PARTITIONS as u32).map(|p| at("t", p, 0)).collect());
        assert!(cache.open(&session).0.is_none());
        assert!(cache.is_empty());
    }

    #[test]
    fn describe_shows_what_incremental_fetches_carried() {
        let (mut cache, id) = cache_with(2, 5);
        let (ticket, mut s) = cache.check_out(id, 1, BrokerId(2)).unwrap();
        s.merge(id, vec![at("t", 0, 11)], vec![key("t", 4)]).unwrap();
        pass(&mut s, EVERY_MS, |_| quiet(10));
        s.finish_request();
        cache.check_in(ticket, s);
        let info = &cache.describe()[0];
        assert_eq!((info.follower, info.next_epoch, info.partitions), (BrokerId(2), 2, 4));
        assert_eq!(info.stats.opened_with, 5);
        assert_eq!(info.stats.incremental_fetches, 1);
        assert_eq!(info.stats.incremental_request_partitions, 2);
        assert_eq!(info.stats.incremental_response_partitions, 1, "only the listed one");
    }
}
