//! Broker sessions as the active controller keeps them: heartbeats in,
//! fence and unfence proposals out.
//!
//! Sans-IO: the caller passes a monotonic time in milliseconds and the Raft
//! term it leads in with every input, and proposes whatever commands come
//! out; the commands take effect only once committed to the metadata log,
//! and the state machine makes a repeated fence or unfence a no-op.
//!
//! Rules (the shape of KRaft's broker heartbeats):
//! - Sessions belong to one controller term. A controller that leads in a
//!   new term (a new leader, or this one again after losing the leadership)
//!   forgets what it knew and first gives every broker a whole session
//!   timeout from the moment it took over, since heartbeats went to another
//!   leader until then. A heartbeat or tick of an older term decides nothing.
//! - A broker whose last heartbeat is older than the session timeout is
//!   fenced.
//! - A registered, fenced broker is unfenced only once it heartbeats within
//!   the session with a metadata image at or past the controller's
//!   committed index as of the first heartbeat that found it fenced (Kafka's
//!   rule: caught up to the metadata log's high watermark). That index is
//!   past its registration and past its own fencing, so a broker is never
//!   unfenced with an image older than its fencing (which may have moved
//!   its leaderships away).
//! - Every answer names the controller's committed index when it confirmed
//!   its leadership and its session length: a broker extends its lease only
//!   on an unfenced answer once its image reaches that index, by the shorter
//!   of its own session and the controller's.
//! - A heartbeat from an id that is not registered, or from another
//!   incarnation than the registered one, is answered "register first".
//! - A broker shutting down cleanly asks to be fenced at once, so its
//!   partitions move before it stops serving.
//! - A proposal that has not shown up in the image is repeated only after
//!   `retry_ms`, so a slow commit does not flood the log.

use std::collections::BTreeMap;

use super::metadata::{BrokerId, MetadataCommand, MetadataImage};

/// Timing of broker sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseConfig {
    /// A broker not heard from for this long is fenced (Kafka's
    /// `broker.session.timeout.ms`). Default 9000 ms.
    pub session_timeout_ms: u64,
    /// How long before an unapplied proposal is made again. Default 1000 ms.
    pub retry_ms: u64,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig { session_timeout_ms: 9000, retry_ms: 1000 }
    }
}

/// What the controller answers a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum HeartbeatAnswer {
    /// The session is alive.
    Alive {
        /// True while the broker is fenced: it may not lead, and its lease
        /// is not extended.
        fenced: bool,
        /// The metadata log's committed index when the controller confirmed
        /// its leadership for this answer (or the index of the unfencing it
        /// committed for it): the broker's lease is extended only once its
        /// image has reached it. An answer without it (an older controller)
        /// extends nothing.
        #[serde(default)]
        metadata_index: Option<u64>,
        /// The controller's session timeout: the broker's lease lasts no
        /// longer than this, since the controller fences after it.
        #[serde(default)]
        session_timeout_ms: u64,
    },
    /// No such registration (or another incarnation): register first.
    Register,
}

/// A heartbeat as the controller's session bookkeeping needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// The broker.
    pub id: BrokerId,
    /// Its incarnation.
    pub incarnation: u64,
    /// The metadata log index of the image the broker serves from, when it
    /// said (a broker that does not say is never caught up).
    pub metadata_index: Option<u64>,
}

#[derive(Debug, Clone, Copy)]
struct Session {
    incarnation: u64,
    last_heartbeat_ms: u64,
    /// Set by the first heartbeat that found the broker fenced: the index
    /// its image must reach before it is unfenced.
    catch_up_to: Option<u64>,
    /// The broker's image had reached `catch_up_to` at its last heartbeat.
    caught_up: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    Fence,
    Unfence,
}

/// The active controller's view of broker sessions, for one term.
#[derive(Debug, Clone, Default)]
pub struct BrokerLeases {
    config: LeaseConfig,
    /// The term these sessions belong to.
    term: Option<u64>,
    /// True while this controller leads in `term`.
    leading: bool,
    /// When this controller began leading in `term`: sessions are measured
    /// from here.
    leader_since_ms: u64,
    sessions: BTreeMap<BrokerId, Session>,
    pending: BTreeMap<BrokerId, (Pending, u64)>,
    /// Brokers shutting down, with the incarnation that is: it stays
    /// fenced until a new incarnation registers.
    shutting_down: BTreeMap<BrokerId, u64>,
}

impl BrokerLeases {
    /// Sessions with `config`, not leading yet.
    pub fn new(config: LeaseConfig) -> BrokerLeases {
        BrokerLeases { config, ..BrokerLeases::default() }
    }

    /// This controller leads in `term` as of `now_ms`. The first call for a
    /// term newer than the sessions' forgets what an earlier term knew and
    /// gives every broker a whole session from now; later calls for the
    /// same term change nothing. Returns false (and changes nothing) for a
    /// term older than the sessions'.
    pub fn became_leader(&mut self, term: u64, now_ms: u64) -> bool {
        match self.term {
            Some(t) if t > term => return false,
            Some(t) if t == term => {}
            _ => {
                self.term = Some(term);
                self.leader_since_ms = now_ms;
                self.sessions.clear();
                self.pending.clear();
                self.shutting_down.clear();
            }
        }
        self.leading = true;
        true
    }

    /// This controller lost the leadership: it decides nothing until it
    /// leads again, which is always in a newer term.
    pub fn lost_leadership(&mut self) {
        self.leading = false;
    }

    /// True while this controller leads in `term`.
    pub fn leads_in(&self, term: u64) -> bool {
        self.leading && self.term == Some(term)
    }

    /// The session timeout this controller fences after.
    pub fn session_timeout_ms(&self) -> u64 {
        self.config.session_timeout_ms
    }

    /// A heartbeat, answered by the leader of `term` after it confirmed its
    /// leadership with `committed` as the metadata log's committed index,
    /// from `image` (at or past `committed`). `None` when `term` is older
    /// than the sessions' (the answer would speak for a lost leadership).
    pub fn heartbeat(
        &mut self,
        term: u64,
        image: &MetadataImage,
        now_ms: u64,
        heartbeat: Heartbeat,
        committed: u64,
    ) -> Option<HeartbeatAnswer> {
        if !self.became_leader(term, now_ms) {
            return None;
        }
        let id = heartbeat.id;
        let Some(registration) = image.broker(id).filter(|r| r.incarnation == heartbeat.incarnation) else {
            return Some(HeartbeatAnswer::Register);
        };
        let earlier = self.sessions.get(&id).filter(|s| s.incarnation == heartbeat.incarnation);
        // The image shows the broker fenced, so `committed` (or the image's
        // own index, which the caller passes when larger) is at or past the
        // entry that fenced it or registered it.
        let catch_up_to = registration.fenced.then(|| earlier.and_then(|s| s.catch_up_to).unwrap_or(committed));
        let caught_up = match (catch_up_to, heartbeat.metadata_index) {
            (Some(needed), Some(has)) => has >= needed,
            _ => false,
        };
        let session = Session { incarnation: heartbeat.incarnation, last_heartbeat_ms: now_ms, catch_up_to, caught_up };
        self.sessions.insert(id, session);
        Some(HeartbeatAnswer::Alive {
            fenced: registration.fenced,
            metadata_index: Some(committed),
            session_timeout_ms: self.config.session_timeout_ms,
        })
    }

    /// True when `id` is fenced in `image` and its last heartbeat showed it
    /// caught up: the heartbeat's answer may unfence it at once.
    pub fn may_unfence(&self, image: &MetadataImage, id: BrokerId) -> bool {
        let Some(registration) = image.broker(id).filter(|r| r.fenced) else { return false };
        let leaving = self.shutting_down.get(&id) == Some(&registration.incarnation);
        let session = self.sessions.get(&id).filter(|s| s.incarnation == registration.incarnation);
        !leaving && session.is_some_and(|s| s.caught_up)
    }

    /// Incarnation `incarnation` of `id` is shutting down cleanly: fence it
    /// at the next tick, and keep it fenced.
    pub fn shutting_down(&mut self, id: BrokerId, incarnation: u64) {
        self.shutting_down.insert(id, incarnation);
    }

    /// The commands to propose now. Nothing unless this controller leads in
    /// `term`; the caller checks that it still does before proposing each.
    pub fn tick(&mut self, term: u64, image: &MetadataImage, now_ms: u64) -> Vec<MetadataCommand> {
        if !self.leads_in(term) {
            return Vec::new();
        }
        let since = self.leader_since_ms;
        let timeout = self.config.session_timeout_ms;
        let mut out = Vec::new();
        for registration in image.brokers().values() {
            let id = registration.id;
            let session = self.sessions.get(&id).filter(|s| s.incarnation == registration.incarnation).copied();
            let last = session.map_or(since, |s| s.last_heartbeat_ms.max(since));
            let leaving = self.shutting_down.get(&id) == Some(&registration.incarnation);
            let alive = now_ms.saturating_sub(last) <= timeout && !leaving;
            if !registration.fenced && !alive {
                // The fence about to be proposed is newer than any index a
                // broker had to reach before: the next heartbeat that finds
                // it fenced sets the index anew.
                if let Some(s) = self.sessions.get_mut(&id) {
                    s.catch_up_to = None;
                    s.caught_up = false;
                }
            }
            let want = match (registration.fenced, alive) {
                (false, false) => Some(Pending::Fence),
                (true, true) if session.is_some_and(|s| s.caught_up) => Some(Pending::Unfence),
                _ => None,
            };
            let Some(want) = want else {
                self.pending.remove(&id);
                continue;
            };
            if let Some((p, at)) = self.pending.get(&id)
                && *p == want
                && now_ms.saturating_sub(*at) < self.config.retry_ms
            {
                continue;
            }
            self.pending.insert(id, (want, now_ms));
            let incarnation = registration.incarnation;
            out.push(match want {
                Pending::Fence => MetadataCommand::FenceBroker { id, incarnation },
                Pending::Unfence => MetadataCommand::UnfenceBroker { id, incarnation },
            });
        }
        // A broker that registered again (a new incarnation) is not leaving.
        self.shutting_down.retain(|id, inc| image.broker(*id).is_some_and(|r| r.incarnation == *inc));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: u64 = 1000;
    const TERM: u64 = 3;

    fn leases() -> BrokerLeases {
        BrokerLeases::new(LeaseConfig { session_timeout_ms: TIMEOUT, retry_ms: 200 })
    }

    fn image_with(brokers: &[(u32, bool)]) -> MetadataImage {
        let mut image = MetadataImage::default();
        for &(id, fenced) in brokers {
            let id = BrokerId(id);
            image
                .apply(&MetadataCommand::RegisterBroker {
                    id,
                    address: "h:1".into(),
                    incarnation: 5,
                    previous_incarnation: None,
                })
                .unwrap();
            if !fenced {
                image.apply(&MetadataCommand::UnfenceBroker { id, incarnation: 5 }).unwrap();
            }
        }
        image
    }

    fn fence(id: u32) -> MetadataCommand {
        MetadataCommand::FenceBroker { id: BrokerId(id), incarnation: 5 }
    }

    fn unfence(id: u32) -> MetadataCommand {
        MetadataCommand::UnfenceBroker { id: BrokerId(id), incarnation: 5 }
    }

    /// A heartbeat from incarnation 5 of `id` with its image at `index`.
    fn beat(id: u32, index: u64) -> Heartbeat {
        Heartbeat { id: BrokerId(id), incarnation: 5, metadata_index: Some(index) }
    }

    fn alive(fenced: bool, committed: u64) -> Option<HeartbeatAnswer> {
        Some(HeartbeatAnswer::Alive { fenced, metadata_index: Some(committed), session_timeout_ms: TIMEOUT })
    }

    #[test]
    fn a_broker_that_stops_heartbeating_is_fenced_after_the_session_timeout() {
        let image = image_with(&[(1, false), (2, false)]);
        let mut l = leases();
        l.became_leader(TERM, 0);
        l.heartbeat(TERM, &image, 500, beat(1, 10), 10);
        l.heartbeat(TERM, &image, 900, beat(2, 10), 10);
        assert_eq!(l.tick(TERM, &image, 1000), vec![], "both within the session");
        assert_eq!(l.tick(TERM, &image, 1501), vec![fence(1)]);
        assert_eq!(l.tick(TERM, &image, 1600), vec![], "not proposed again while it may still commit");
        assert_eq!(
            l.tick(TERM, &image, 1901),
            vec![fence(1), fence(2)],
            "the fence of 1 is repeated after retry_ms; 2 has lapsed too"
        );
    }

    #[test]
    fn a_new_leader_gives_every_broker_a_whole_session_first() {
        let image = image_with(&[(1, false)]);
        let mut l = leases();
        assert_eq!(l.tick(TERM, &image, 50_000), vec![], "a follower decides nothing");
        l.became_leader(TERM, 50_000);
        assert_eq!(l.tick(TERM, &image, 50_900), vec![], "heartbeats went to the old leader until now");
        assert_eq!(l.tick(TERM, &image, 51_001), vec![fence(1)]);
        l.lost_leadership();
        assert_eq!(l.tick(TERM, &image, 60_000), vec![]);
    }

    #[test]
    fn leading_again_in_a_new_term_resets_sessions_and_grants_a_whole_session() {
        let image = image_with(&[(1, false)]);
        let mut l = leases();
        l.became_leader(TERM, 0);
        l.heartbeat(TERM, &image, 100, beat(1, 10), 10);
        // The leadership is lost and won back in a later term before the
        // lease task saw it lose: the sessions of the old term are gone and
        // the new term's grace runs from its start.
        assert!(l.became_leader(TERM + 2, 5_000));
        assert_eq!(l.tick(TERM, &image, 5_500), vec![], "the old term's tick decides nothing");
        assert_eq!(l.tick(TERM + 2, &image, 5_900), vec![], "a whole session from the new term's start");
        assert_eq!(l.tick(TERM + 2, &image, 6_001), vec![fence(1)]);
        // A heartbeat confirmed in the old term speaks for nothing.
        assert_eq!(l.heartbeat(TERM, &image, 6_100, beat(1, 10), 10), None);
        assert!(!l.became_leader(TERM, 6_100), "an older term never comes back");
        assert!(l.leads_in(TERM + 2));
    }

    #[test]
    fn the_first_heartbeat_of_a_new_term_starts_it_though_the_task_has_not_seen_it_yet() {
        let image = image_with(&[(1, false)]);
        let mut l = leases();
        l.became_leader(TERM, 0);
        l.lost_leadership();
        assert_eq!(l.heartbeat(TERM + 1, &image, 3_000, beat(1, 10), 10), alive(false, 10));
        // The task then sees the same term: the heartbeat is kept.
        l.became_leader(TERM + 1, 3_100);
        assert_eq!(l.tick(TERM + 1, &image, 3_900), vec![]);
        assert_eq!(l.tick(TERM + 1, &image, 4_001), vec![fence(1)], "its session ran from 3 000, the term's start");
    }

    #[test]
    fn a_fenced_broker_is_unfenced_only_once_its_image_reaches_the_commit_that_found_it_fenced() {
        let image = image_with(&[(1, true)]);
        let mut l = leases();
        l.became_leader(TERM, 0);
        // Found fenced at committed index 40; its image is at 30.
        assert_eq!(l.heartbeat(TERM, &image, 10, beat(1, 30), 40), alive(true, 40));
        assert!(!l.may_unfence(&image, BrokerId(1)));
        assert_eq!(l.tick(TERM, &image, 20), vec![], "its image is older than its fencing");
        // The log moves on (50) while it catches up to 40: 40 is enough.
        assert_eq!(l.heartbeat(TERM, &image, 30, beat(1, 45), 50), alive(true, 50));
        assert!(l.may_unfence(&image, BrokerId(1)));
        assert_eq!(l.tick(TERM, &image, 40), vec![unfence(1)]);
        let image = image_with(&[(1, false)]);
        assert_eq!(l.tick(TERM, &image, 50), vec![], "applied: nothing more to do");
        assert!(!l.may_unfence(&image, BrokerId(1)));
    }

    #[test]
    fn a_broker_that_does_not_say_where_its_image_is_stays_fenced() {
        let image = image_with(&[(1, true)]);
        let mut l = leases();
        l.became_leader(TERM, 0);
        let unknown = Heartbeat { metadata_index: None, ..beat(1, 0) };
        assert_eq!(l.heartbeat(TERM, &image, 10, unknown, 5), alive(true, 5));
        assert_eq!(l.tick(TERM, &image, 20), vec![]);
    }

    #[test]
    fn a_broker_fenced_again_must_catch_up_to_its_new_fencing() {
        let mut l = leases();
        l.became_leader(TERM, 0);
        let fenced = image_with(&[(1, true)]);
        l.heartbeat(TERM, &fenced, 10, beat(1, 20), 20);
        assert_eq!(l.tick(TERM, &fenced, 20), vec![unfence(1)]);
        // Unfenced, then silent past its session: fenced at a later index.
        let unfenced = image_with(&[(1, false)]);
        assert_eq!(l.tick(TERM, &unfenced, 1_011), vec![fence(1)]);
        // Its heartbeats come back with the image it had: not enough.
        assert_eq!(l.heartbeat(TERM, &fenced, 1_100, beat(1, 20), 60), alive(true, 60));
        assert_eq!(l.tick(TERM, &fenced, 1_200), vec![], "its image predates its second fencing");
        l.heartbeat(TERM, &fenced, 1_300, beat(1, 60), 61);
        assert_eq!(l.tick(TERM, &fenced, 1_400), vec![unfence(1)]);
    }

    #[test]
    fn every_answer_carries_the_committed_index_and_the_controllers_session() {
        let image = image_with(&[(1, false)]);
        let mut l = leases();
        assert_eq!(
            l.heartbeat(TERM, &image, 10, beat(1, 7), 9),
            Some(HeartbeatAnswer::Alive { fenced: false, metadata_index: Some(9), session_timeout_ms: TIMEOUT })
        );
        assert_eq!(l.session_timeout_ms(), TIMEOUT);
    }

    #[test]
    fn heartbeats_from_unknown_ids_or_old_incarnations_must_register_first() {
        let image = image_with(&[(1, false)]);
        let mut l = leases();
        l.became_leader(TERM, 0);
        assert_eq!(l.heartbeat(TERM, &image, 10, beat(2, 1), 1), Some(HeartbeatAnswer::Register));
        let old = Heartbeat { incarnation: 6, ..beat(1, 1) };
        assert_eq!(l.heartbeat(TERM, &image, 10, old, 1), Some(HeartbeatAnswer::Register));
        // A heartbeat from an old incarnation does not keep the registered one alive.
        assert_eq!(l.tick(TERM, &image, 1001), vec![fence(1)]);
    }

    #[test]
    fn a_broker_shutting_down_is_fenced_at_once() {
        let image = image_with(&[(1, false)]);
        let mut l = leases();
        l.became_leader(TERM, 0);
        l.heartbeat(TERM, &image, 10, beat(1, 1), 1);
        l.shutting_down(BrokerId(1), 5);
        assert_eq!(l.tick(TERM, &image, 30), vec![fence(1)]);
        // Once fenced it stays fenced, though its last heartbeat is recent.
        let fenced = image_with(&[(1, true)]);
        l.heartbeat(TERM, &fenced, 40, beat(1, 100), 1);
        assert!(!l.may_unfence(&fenced, BrokerId(1)));
        assert_eq!(l.tick(TERM, &fenced, 50), vec![]);
    }
}
