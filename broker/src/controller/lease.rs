//! Broker sessions as the active controller keeps them: heartbeats in,
//! fence and unfence proposals out.
//!
//! Sans-IO: the caller passes a monotonic time in milliseconds with every
//! input and proposes whatever commands come out; the commands take effect
//! only once committed to the metadata log, and the state machine makes a
//! repeated fence or unfence a no-op.
//!
//! Rules (the shape of KRaft's broker heartbeats):
//! - A broker whose last heartbeat is older than the session timeout is
//!   fenced. A new controller leader first gives every broker a whole
//!   session timeout from the moment it took over, since heartbeats went to
//!   the old leader until then.
//! - A registered, fenced broker is unfenced once it heartbeats within the
//!   session and reports that it has caught up with the metadata log.
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
    /// The session is alive; `fenced` says whether the broker may lead.
    Alive {
        /// True while the broker is fenced.
        fenced: bool,
    },
    /// No such registration (or another incarnation): register first.
    Register,
}

#[derive(Debug, Clone, Copy)]
struct Session {
    incarnation: u64,
    last_heartbeat_ms: u64,
    caught_up: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    Fence,
    Unfence,
}

/// The active controller's view of broker sessions.
#[derive(Debug, Clone, Default)]
pub struct BrokerLeases {
    config: LeaseConfig,
    /// When this controller became leader: sessions are measured from here.
    leader_since_ms: Option<u64>,
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

    /// This controller became the leader at `now_ms`: every broker gets a
    /// whole session from now. Forgets what an earlier term knew.
    pub fn became_leader(&mut self, now_ms: u64) {
        self.leader_since_ms = Some(now_ms);
        self.sessions.clear();
        self.pending.clear();
        self.shutting_down.clear();
    }

    /// This controller lost the leadership: it decides nothing until it
    /// leads again.
    pub fn lost_leadership(&mut self) {
        self.leader_since_ms = None;
    }

    /// A heartbeat from `id`.
    pub fn heartbeat(
        &mut self,
        image: &MetadataImage,
        now_ms: u64,
        id: BrokerId,
        incarnation: u64,
        caught_up: bool,
    ) -> HeartbeatAnswer {
        let Some(registration) = image.broker(id).filter(|r| r.incarnation == incarnation) else {
            return HeartbeatAnswer::Register;
        };
        self.sessions.insert(id, Session { incarnation, last_heartbeat_ms: now_ms, caught_up });
        HeartbeatAnswer::Alive { fenced: registration.fenced }
    }

    /// Incarnation `incarnation` of `id` is shutting down cleanly: fence it
    /// at the next tick, and keep it fenced.
    pub fn shutting_down(&mut self, id: BrokerId, incarnation: u64) {
        self.shutting_down.insert(id, incarnation);
    }

    /// The commands to propose now. Nothing unless this controller leads.
    pub fn tick(&mut self, image: &MetadataImage, now_ms: u64) -> Vec<MetadataCommand> {
        let Some(since) = self.leader_since_ms else { return Vec::new() };
        let timeout = self.config.session_timeout_ms;
        let mut out = Vec::new();
        for registration in image.brokers().values() {
            let id = registration.id;
            let session = self.sessions.get(&id).filter(|s| s.incarnation == registration.incarnation);
            let last = session.map_or(since, |s| s.last_heartbeat_ms.max(since));
            let leaving = self.shutting_down.get(&id) == Some(&registration.incarnation);
            let alive = now_ms.saturating_sub(last) <= timeout && !leaving;
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

    #[test]
    fn a_broker_that_stops_heartbeating_is_fenced_after_the_session_timeout() {
        let image = image_with(&[(1, false), (2, false)]);
        let mut l = leases();
        l.became_leader(0);
        l.heartbeat(&image, 500, BrokerId(1), 5, true);
        l.heartbeat(&image, 900, BrokerId(2), 5, true);
        assert_eq!(l.tick(&image, 1000), vec![], "both within the session");
        assert_eq!(l.tick(&image, 1501), vec![fence(1)]);
        assert_eq!(l.tick(&image, 1600), vec![], "not proposed again while it may still commit");
        assert_eq!(
            l.tick(&image, 1901),
            vec![fence(1), fence(2)],
            "the fence of 1 is repeated after retry_ms; 2 has lapsed too"
        );
    }

    #[test]
    fn a_new_leader_gives_every_broker_a_whole_session_first() {
        let image = image_with(&[(1, false)]);
        let mut l = leases();
        assert_eq!(l.tick(&image, 50_000), vec![], "a follower decides nothing");
        l.became_leader(50_000);
        assert_eq!(l.tick(&image, 50_900), vec![], "heartbeats went to the old leader until now");
        assert_eq!(l.tick(&image, 51_001), vec![fence(1)]);
        l.lost_leadership();
        assert_eq!(l.tick(&image, 60_000), vec![]);
    }

    #[test]
    fn a_fenced_broker_is_unfenced_once_it_heartbeats_caught_up() {
        let image = image_with(&[(1, true)]);
        let mut l = leases();
        l.became_leader(0);
        assert_eq!(l.heartbeat(&image, 10, BrokerId(1), 5, false), HeartbeatAnswer::Alive { fenced: true });
        assert_eq!(l.tick(&image, 20), vec![], "not caught up with the metadata log yet");
        l.heartbeat(&image, 30, BrokerId(1), 5, true);
        assert_eq!(l.tick(&image, 40), vec![unfence(1)]);
        let image = image_with(&[(1, false)]);
        assert_eq!(l.tick(&image, 50), vec![], "applied: nothing more to do");
    }

    #[test]
    fn heartbeats_from_unknown_ids_or_old_incarnations_must_register_first() {
        let image = image_with(&[(1, false)]);
        let mut l = leases();
        l.became_leader(0);
        assert_eq!(l.heartbeat(&image, 10, BrokerId(2), 5, true), HeartbeatAnswer::Register);
        assert_eq!(l.heartbeat(&image, 10, BrokerId(1), 6, true), HeartbeatAnswer::Register);
        // A heartbeat from an old incarnation does not keep the registered one alive.
        assert_eq!(l.tick(&image, 1001), vec![fence(1)]);
    }

    #[test]
    fn a_broker_shutting_down_is_fenced_at_once() {
        let image = image_with(&[(1, false)]);
        let mut l = leases();
        l.became_leader(0);
        l.heartbeat(&image, 10, BrokerId(1), 5, true);
        l.shutting_down(BrokerId(1), 5);
        assert_eq!(l.tick(&image, 30), vec![fence(1)]);
        // Once fenced it stays fenced, though its last heartbeat is recent.
        let fenced = image_with(&[(1, true)]);
        l.heartbeat(&fenced, 40, BrokerId(1), 5, true);
        assert_eq!(l.tick(&fenced, 50), vec![]);
    }
}
