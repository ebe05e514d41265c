//! The leader's bookkeeping of one partition's replicas, as a plain state
//! machine: inputs are follower fetches, ticks and committed metadata;
//! outputs are the high watermark and ISR changes to propose. No I/O, no
//! clock (times come in as milliseconds), so every rule has a unit test.
//!
//! Rules (Kafka's, with KIP-966's high-watermark rule):
//! - A follower's log end offset is the fetch offset it last sent.
//! - HW = min log end over the *maximal* ISR (the committed ISR plus a
//!   member being added), and the leader's own end. A member whose log end
//!   is unknown (no fetch in this epoch yet) holds the HW where it is.
//! - The HW advances only while the committed ISR holds at least
//!   `min_insync_replicas` members (capped at the replica count): so every
//!   offset below the HW is on at least that many replicas, and a replica
//!   removed from a too-small ISR has everything below the HW.
//! - A member leaves the ISR when it has not caught up with the leader's log
//!   end for `replica_lag_time_max_ms`; a replica joins once its log end
//!   reaches both the HW and the offset this leader epoch began at.
//! - One ISR change is in flight at a time; only the committed ISR counts
//!   for acks=all.
//! - A change whose fate is unknown (the controller timed out, a forward was
//!   lost: the entry may still commit) stays pending, so a joining member
//!   keeps holding the HW, and the same compare-and-set is retried until the
//!   image shows a newer partition epoch or the controller refuses it against
//!   the state it was based on. Only a refusal proves it was not applied.
//! - A replica the image shows fenced does not join (Kafka's KIP-841), and a
//!   refused change backs off before the next proposal, so a fenced follower
//!   that keeps fetching does not flood the metadata log.

use std::collections::{BTreeMap, BTreeSet};

use crate::controller::BrokerId;
use crate::storage::Offset;

/// A follower's progress as the leader sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Progress {
    /// Its log end offset, once it fetched in this leader epoch.
    log_end: Option<Offset>,
    /// When its log end last reached the leader's (Kafka's lastCaughtUpTime).
    caught_up_ms: u64,
    /// When it last fetched, and the leader's log end then.
    last_fetch_ms: u64,
    last_fetch_leader_end: Offset,
}

/// The ISR change in flight, and when to send it again when its fate is
/// unknown.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pending {
    change: IsrChange,
    /// Set while the outcome is unknown: when to send the same change again.
    retry_at_ms: Option<u64>,
}

/// How long an ISR change of unknown fate waits before the same
/// compare-and-set is sent again.
pub const UNKNOWN_RETRY_MS: u64 = 500;
/// The first wait after a refused ISR change; it doubles with every further
/// refusal, up to [`REFUSED_BACKOFF_MAX_MS`].
pub const REFUSED_BACKOFF_MS: u64 = 500;
/// The longest wait after refused ISR changes.
pub const REFUSED_BACKOFF_MAX_MS: u64 = 8_000;

/// What the leader learned of an ISR change it proposed and that did not
/// come back committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProposalOutcome {
    /// It never reached the controller's log, or the controller refused it
    /// against the very state it was based on: it was not applied, and an
    /// earlier attempt of it was not either.
    NotApplied,
    /// The partition moved on at the controller (a newer partition or leader
    /// epoch): the image will bring what was committed instead.
    Superseded,
    /// It may or may not commit (a timeout, a lost answer, a leader change of
    /// the controller): it must be treated as possibly applied.
    Unknown,
}

/// An ISR change for the controller (AlterPartition), compare-and-set on
/// the epochs it was computed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IsrChange {
    /// The new ISR, in replica order.
    pub isr: Vec<BrokerId>,
    /// The leader epoch it was computed in.
    pub leader_epoch: u32,
    /// The partition epoch it replaces.
    pub partition_epoch: u32,
}

/// The committed replica state of a partition this broker leads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    /// Replicas in preference order.
    pub replicas: Vec<BrokerId>,
    /// The committed ISR.
    pub isr: Vec<BrokerId>,
    /// The leader epoch.
    pub leader_epoch: u32,
    /// The partition epoch.
    pub partition_epoch: u32,
}

/// Settings that shape the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaderSettings {
    /// The topic's `min_insync_replicas`.
    pub min_insync_replicas: u32,
    /// How long a member may lag before it leaves the ISR.
    pub replica_lag_time_max_ms: u64,
}

/// One partition's leader bookkeeping.
#[derive(Debug, Clone)]
pub struct LeaderState {
    me: BrokerId,
    assignment: Assignment,
    settings: LeaderSettings,
    /// The leader's log end when this epoch began.
    epoch_start: Offset,
    pending: Option<Pending>,
    followers: BTreeMap<BrokerId, Progress>,
    /// Replicas the image shows fenced: they may not join the ISR.
    fenced: BTreeSet<BrokerId>,
    /// No new change is proposed before this time (after refusals).
    backoff_until_ms: u64,
    /// Refusals in a row, for the backoff.
    refusals: u32,
}

impl LeaderState {
    /// Bookkeeping for a leader that took `assignment.leader_epoch` with its
    /// log ending at `log_end`. Every member starts as caught up now, so the
    /// ISR is not shrunk before followers had a chance to fetch.
    pub fn new(me: BrokerId, assignment: Assignment, settings: LeaderSettings, log_end: Offset, now_ms: u64) -> Self {
        let followers = assignment
            .replicas
            .iter()
            .filter(|r| **r != me)
            .map(|r| {
                (
                    *r,
                    Progress {
                        log_end: None,
                        caught_up_ms: now_ms,
                        last_fetch_ms: 0,
                        last_fetch_leader_end: Offset(0),
                    },
                )
            })
            .collect();
        LeaderState {
            me,
            assignment,
            settings,
            epoch_start: log_end,
            pending: None,
            followers,
            fenced: BTreeSet::new(),
            backoff_until_ms: 0,
            refusals: 0,
        }
    }

    /// The replicas the latest image shows fenced: they may not join the ISR.
    pub fn set_fenced(&mut self, fenced: BTreeSet<BrokerId>) {
        self.fenced = fenced;
    }

    /// The committed assignment.
    pub fn assignment(&self) -> &Assignment {
        &self.assignment
    }

    /// The leader's log end when this epoch began.
    pub fn epoch_start(&self) -> Offset {
        self.epoch_start
    }

    /// The leader epoch this state belongs to.
    pub fn leader_epoch(&self) -> u32 {
        self.assignment.leader_epoch
    }

    /// The ISR change in flight, if any.
    pub fn pending(&self) -> Option<&IsrChange> {
        self.pending.as_ref().map(|p| &p.change)
    }

    /// A newer committed assignment of the same leader epoch arrived (an
    /// ISR change, ours or the controller's): it replaces the old, and a
    /// pending change based on an older partition epoch is settled.
    pub fn committed(&mut self, assignment: Assignment, settings: LeaderSettings) {
        debug_assert_eq!(assignment.leader_epoch, self.assignment.leader_epoch);
        if assignment.partition_epoch > self.assignment.partition_epoch {
            if self.pending.as_ref().is_some_and(|p| p.change.partition_epoch < assignment.partition_epoch) {
                self.pending = None;
            }
            self.assignment = assignment;
            self.refusals = 0;
        }
        self.settings = settings;
    }

    /// The pending `change` did not come back committed. Only a change known
    /// not applied is released (and the next proposal backs off); one that
    /// may still commit stays pending, so a joining member keeps holding the
    /// HW, and is sent again after [`UNKNOWN_RETRY_MS`]; a superseded one
    /// waits for the image.
    pub fn proposal_failed(&mut self, change: &IsrChange, outcome: ProposalOutcome, now_ms: u64) {
        let Some(pending) = self.pending.as_mut().filter(|p| p.change == *change) else { return };
        match outcome {
            ProposalOutcome::NotApplied => {
                self.pending = None;
                let backoff = REFUSED_BACKOFF_MS.saturating_mul(1 << self.refusals.min(16)).min(REFUSED_BACKOFF_MAX_MS);
                self.refusals = self.refusals.saturating_add(1);
                self.backoff_until_ms = now_ms.saturating_add(backoff);
            }
            ProposalOutcome::Unknown => pending.retry_at_ms = Some(now_ms.saturating_add(UNKNOWN_RETRY_MS)),
            ProposalOutcome::Superseded => pending.retry_at_ms = None,
        }
    }

    /// True when a new change may be proposed now.
    fn may_propose(&self, now_ms: u64) -> bool {
        self.pending.is_none() && now_ms >= self.backoff_until_ms
    }

    /// True when acks=all may be accepted: the committed ISR holds at least
    /// `min_insync_replicas` (as Kafka, not capped at the replica count: a
    /// topic with fewer replicas than that refuses acks=all).
    pub fn enough_replicas(&self) -> bool {
        self.assignment.isr.len() >= self.settings.min_insync_replicas.max(1) as usize
    }

    /// The committed ISR's size and the size acks=all needs.
    pub fn isr_size(&self) -> (usize, usize) {
        (self.assignment.isr.len(), self.settings.min_insync_replicas.max(1) as usize)
    }

    /// True when the high watermark may advance: the committed ISR holds
    /// `min_insync_replicas`, capped at the replica count (a topic with
    /// fewer replicas still makes progress).
    fn may_commit(&self) -> bool {
        let needed = (self.settings.min_insync_replicas.max(1) as usize).min(self.assignment.replicas.len());
        self.assignment.isr.len() >= needed
    }

    /// The committed ISR plus a member being added.
    fn maximal_isr(&self) -> impl Iterator<Item = BrokerId> + '_ {
        let adding = self.pending.iter().flat_map(|p| p.change.isr.iter()).filter(|b| !self.assignment.isr.contains(b));
        self.assignment.isr.iter().chain(adding).copied()
    }

    /// Where the high watermark may move, given the leader's own end (its
    /// log end, or durable end with flush `always`); `None` while it may
    /// not move at all.
    pub fn high_watermark(&self, leader_end: Offset) -> Option<Offset> {
        if !self.may_commit() {
            return None;
        }
        let mut hw = leader_end;
        for member in self.maximal_isr().filter(|m| *m != self.me) {
            hw = hw.min(self.followers.get(&member)?.log_end?);
        }
        Some(hw)
    }

    /// A follower fetched from `fetch_offset` while the leader's log ended
    /// at `leader_end` and its HW stood at `hw`. Returns an ISR expansion to
    /// propose, if the follower now qualifies.
    pub fn on_fetch(
        &mut self,
        follower: BrokerId,
        fetch_offset: Offset,
        leader_end: Offset,
        hw: Offset,
        now_ms: u64,
    ) -> Option<IsrChange> {
        let progress = self.followers.get_mut(&follower)?;
        if fetch_offset >= leader_end {
            progress.caught_up_ms = now_ms;
        } else if fetch_offset >= progress.last_fetch_leader_end {
            progress.caught_up_ms = progress.caught_up_ms.max(progress.last_fetch_ms);
        }
        progress.log_end = Some(fetch_offset);
        progress.last_fetch_ms = now_ms;
        progress.last_fetch_leader_end = leader_end;
        let joins = !self.assignment.isr.contains(&follower)
            && !self.fenced.contains(&follower)
            && self.may_propose(now_ms)
            && fetch_offset >= hw
            && fetch_offset >= self.epoch_start;
        if !joins {
            return None;
        }
        let isr = self
            .assignment
            .replicas
            .iter()
            .copied()
            .filter(|r| self.assignment.isr.contains(r) || *r == follower)
            .collect();
        Some(self.propose(isr))
    }

    /// Time passed: returns the pending change again when its fate is
    /// unknown and its retry is due, else an ISR shrink to propose when
    /// members lag.
    pub fn tick(&mut self, now_ms: u64) -> Option<IsrChange> {
        if let Some(pending) = &mut self.pending {
            if pending.retry_at_ms.is_some_and(|at| now_ms >= at) {
                pending.retry_at_ms = None;
                return Some(pending.change.clone());
            }
            return None;
        }
        if !self.may_propose(now_ms) {
            return None;
        }
        let lag_max = self.settings.replica_lag_time_max_ms;
        let lagging =
            |b: &BrokerId| self.followers.get(b).is_some_and(|p| now_ms.saturating_sub(p.caught_up_ms) > lag_max);
        if !self.assignment.isr.iter().any(|b| *b != self.me && lagging(b)) {
            return None;
        }
        let isr = self.assignment.isr.iter().copied().filter(|b| *b == self.me || !lagging(b)).collect();
        Some(self.propose(isr))
    }

    fn propose(&mut self, isr: Vec<BrokerId>) -> IsrChange {
        let change = IsrChange {
            isr,
            leader_epoch: self.assignment.leader_epoch,
            partition_epoch: self.assignment.partition_epoch,
        };
        self.pending = Some(Pending { change: change.clone(), retry_at_ms: None });
        change
    }

    /// Each follower's lag behind `leader_end` in offsets, `None` before its
    /// first fetch in this epoch.
    pub fn lags(&self, leader_end: Offset) -> Vec<(BrokerId, Option<u64>)> {
        self.followers.iter().map(|(b, p)| (*b, p.log_end.map(|e| leader_end.get().saturating_sub(e.get())))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAG_MS: u64 = 1000;

    fn b(id: u32) -> BrokerId {
        BrokerId(id)
    }

    fn leader(isr: &[u32], min_isr: u32, log_end: u64) -> LeaderState {
        let assignment = Assignment {
            replicas: vec![b(1), b(2), b(3)],
            isr: isr.iter().map(|i| b(*i)).collect(),
            leader_epoch: 4,
            partition_epoch: 10,
        };
        let settings = LeaderSettings { min_insync_replicas: min_isr, replica_lag_time_max_ms: LAG_MS };
        LeaderState::new(b(1), assignment, settings, Offset(log_end), 0)
    }

    fn commit(state: &mut LeaderState, change: &IsrChange) {
        let mut a = state.assignment().clone();
        a.isr = change.isr.clone();
        a.partition_epoch = change.partition_epoch + 1;
        let settings = state.settings;
        state.committed(a, settings);
    }

    #[test]
    fn the_high_watermark_is_the_least_log_end_over_the_isr() {
        let mut s = leader(&[1, 2, 3], 2, 0);
        assert_eq!(s.high_watermark(Offset(10)), None, "no follower has fetched in this epoch");
        s.on_fetch(b(2), Offset(7), Offset(10), Offset(0), 1);
        assert_eq!(s.high_watermark(Offset(10)), None, "broker 3's end is still unknown");
        s.on_fetch(b(3), Offset(5), Offset(10), Offset(0), 1);
        assert_eq!(s.high_watermark(Offset(10)), Some(Offset(5)));
        s.on_fetch(b(3), Offset(10), Offset(10), Offset(5), 2);
        assert_eq!(s.high_watermark(Offset(10)), Some(Offset(7)));
        assert_eq!(s.high_watermark(Offset(6)), Some(Offset(6)), "never above the leader's own end");
    }

    #[test]
    fn a_replica_outside_the_isr_does_not_hold_the_high_watermark() {
        let mut s = leader(&[1, 2], 2, 0);
        s.on_fetch(b(2), Offset(9), Offset(9), Offset(0), 1);
        assert_eq!(s.high_watermark(Offset(9)), Some(Offset(9)));
        // Broker 3 is far behind the HW: it does not qualify to join.
        assert_eq!(s.on_fetch(b(3), Offset(1), Offset(9), Offset(9), 1), None);
        assert_eq!(s.high_watermark(Offset(9)), Some(Offset(9)));
    }

    #[test]
    fn the_high_watermark_stops_while_the_isr_is_below_min_insync_replicas() {
        let mut s = leader(&[1], 2, 0);
        assert!(!s.enough_replicas());
        s.on_fetch(b(2), Offset(3), Offset(3), Offset(0), 1);
        assert_eq!(s.high_watermark(Offset(3)), None, "one copy is not enough to call anything committed");
        let single = leader(&[1], 1, 0);
        assert_eq!(single.high_watermark(Offset(3)), Some(Offset(3)), "min_insync_replicas 1 needs only the leader");
    }

    #[test]
    fn min_insync_replicas_above_the_replica_count_refuses_acks_all_but_commits() {
        let assignment = Assignment { replicas: vec![b(1)], isr: vec![b(1)], leader_epoch: 0, partition_epoch: 0 };
        let settings = LeaderSettings { min_insync_replicas: 2, replica_lag_time_max_ms: LAG_MS };
        let s = LeaderState::new(b(1), assignment, settings, Offset(0), 0);
        assert!(!s.enough_replicas(), "acks=all is refused, as Kafka refuses it");
        assert_eq!(s.high_watermark(Offset(4)), Some(Offset(4)), "acks=1 records still become visible");
    }

    #[test]
    fn a_member_that_stops_fetching_leaves_the_isr_after_the_lag_time() {
        let mut s = leader(&[1, 2, 3], 2, 0);
        s.on_fetch(b(2), Offset(0), Offset(0), Offset(0), 10);
        s.on_fetch(b(3), Offset(0), Offset(0), Offset(0), 10);
        assert_eq!(s.tick(LAG_MS), None, "within the lag time");
        s.on_fetch(b(2), Offset(0), Offset(0), Offset(0), LAG_MS);
        let change = s.tick(LAG_MS + 20).expect("broker 3 lags");
        assert_eq!(change, IsrChange { isr: vec![b(1), b(2)], leader_epoch: 4, partition_epoch: 10 });
        assert_eq!(s.tick(LAG_MS + 30), None, "one change in flight at a time");
        commit(&mut s, &change);
        assert_eq!(s.assignment().isr, vec![b(1), b(2)]);
        assert!(s.pending().is_none());
    }

    #[test]
    fn a_member_that_fetches_but_never_reaches_the_log_end_leaves_the_isr() {
        let mut s = leader(&[1, 2], 1, 0);
        // The leader's end keeps moving ahead of every fetch.
        for t in 1..=20u64 {
            s.on_fetch(b(2), Offset(t * 10 - 5), Offset(t * 10 + 100), Offset(0), t * 100);
        }
        assert!(s.tick(2000).is_some(), "it fetches, but never catches up");
    }

    #[test]
    fn a_follower_that_reaches_the_end_of_the_previous_fetch_counts_as_caught_up_then() {
        let mut s = leader(&[1, 2], 1, 0);
        s.on_fetch(b(2), Offset(10), Offset(10), Offset(0), 100);
        // The leader appended meanwhile; the follower reached the end of
        // the previous fetch, so it was caught up as of that fetch.
        s.on_fetch(b(2), Offset(10), Offset(20), Offset(0), 1050);
        s.on_fetch(b(2), Offset(20), Offset(30), Offset(0), 2000);
        assert_eq!(s.tick(2050), None, "caught up as of 1050");
        assert!(s.tick(2100).is_some());
    }

    #[test]
    fn a_caught_up_replica_rejoins_only_from_the_epoch_start_and_the_high_watermark() {
        let mut s = leader(&[1, 2], 2, 50);
        assert_eq!(s.on_fetch(b(3), Offset(40), Offset(60), Offset(45), 1), None, "below the HW");
        assert_eq!(s.on_fetch(b(3), Offset(48), Offset(60), Offset(45), 2), None, "below this epoch's start");
        let change = s.on_fetch(b(3), Offset(55), Offset(60), Offset(45), 3).expect("rejoins");
        assert_eq!(change.isr, vec![b(1), b(2), b(3)]);
        // While pending, the joining member already counts for the HW.
        s.on_fetch(b(2), Offset(60), Offset(60), Offset(45), 4);
        assert_eq!(s.high_watermark(Offset(60)), Some(Offset(55)));
        assert_eq!(s.on_fetch(b(3), Offset(56), Offset(60), Offset(45), 5), None, "already pending");
        s.proposal_failed(&change, ProposalOutcome::NotApplied, 6);
        assert_eq!(s.on_fetch(b(3), Offset(56), Offset(60), Offset(45), 7), None, "backing off after a refusal");
        let later = 7 + REFUSED_BACKOFF_MS;
        assert!(s.on_fetch(b(3), Offset(56), Offset(60), Offset(45), later).is_some(), "proposed again");
    }

    #[test]
    fn a_change_committed_by_the_controller_settles_the_pending_one() {
        let mut s = leader(&[1, 2, 3], 2, 0);
        s.on_fetch(b(2), Offset(0), Offset(0), Offset(0), 2000);
        let change = s.tick(2000).expect("3 lags");
        // The controller fenced broker 2 meanwhile (partition epoch 11): our
        // change will be refused, and the image's is what counts.
        let mut a = s.assignment().clone();
        a.isr = vec![b(1), b(3)];
        a.partition_epoch = 11;
        let settings = s.settings;
        s.committed(a, settings);
        assert!(s.pending().is_none(), "{change:?} is stale");
        assert_eq!(s.assignment().isr, vec![b(1), b(3)]);
        // An older assignment never replaces a newer one.
        let mut old = s.assignment().clone();
        old.partition_epoch = 10;
        old.isr = vec![b(1), b(2), b(3)];
        s.committed(old, settings);
        assert_eq!(s.assignment().isr, vec![b(1), b(3)]);
    }

    #[test]
    fn fetches_from_a_broker_that_is_not_a_replica_change_nothing() {
        let mut s = leader(&[1, 2, 3], 2, 0);
        assert_eq!(s.on_fetch(b(9), Offset(0), Offset(0), Offset(0), 1), None);
        assert_eq!(s.lags(Offset(0)).len(), 2);
    }

    #[test]
    fn an_expansion_of_unknown_fate_holds_the_high_watermark_until_it_is_settled() {
        let mut s = leader(&[1, 2], 2, 10);
        s.on_fetch(b(2), Offset(10), Offset(10), Offset(0), 1);
        let change = s.on_fetch(b(3), Offset(10), Offset(10), Offset(10), 2).expect("3 qualifies");
        // The controller timed out: the entry may still commit.
        s.proposal_failed(&change, ProposalOutcome::Unknown, 3);
        // The leader and 2 move on to 20; 3 stops fetching at 10.
        s.on_fetch(b(2), Offset(20), Offset(20), Offset(10), 4);
        let hw = s.high_watermark(Offset(20)).expect("the ISR holds min_insync_replicas");
        // The expansion commits after all.
        commit(&mut s, &change);
        assert_eq!(s.assignment().isr, vec![b(1), b(2), b(3)]);
        assert!(hw <= Offset(10), "ISR member 3 ends at 10, below the high watermark {hw}");
    }

    #[test]
    fn a_change_of_unknown_fate_is_sent_again_unchanged_until_the_image_settles_it() {
        let mut s = leader(&[1, 2], 2, 0);
        let change = s.on_fetch(b(3), Offset(0), Offset(0), Offset(0), 1).expect("3 qualifies");
        s.proposal_failed(&change, ProposalOutcome::Unknown, 10);
        assert_eq!(s.tick(10 + UNKNOWN_RETRY_MS - 1), None, "not yet");
        assert_eq!(s.tick(10 + UNKNOWN_RETRY_MS), Some(change.clone()), "the same compare-and-set");
        assert_eq!(s.tick(10 + 3 * UNKNOWN_RETRY_MS), None, "in flight again");
        // Refused as stale: the image will bring what was committed.
        s.proposal_failed(&change, ProposalOutcome::Superseded, 20 + UNKNOWN_RETRY_MS);
        assert_eq!(s.tick(u64::MAX / 2), None, "nothing to retry");
        assert_eq!(s.pending(), Some(&change), "3 still holds the HW");
        commit(&mut s, &change);
        assert_eq!(s.pending(), None);
    }

    #[test]
    fn a_fenced_follower_that_keeps_fetching_proposes_nothing() {
        let mut s = leader(&[1, 2], 2, 0);
        s.set_fenced([b(3)].into());
        let proposals = (0..1000u64).filter_map(|ms| s.on_fetch(b(3), Offset(0), Offset(0), Offset(0), ms)).count();
        assert_eq!(proposals, 0, "a fetch every millisecond for a second");
        s.set_fenced(BTreeSet::new());
        assert!(s.on_fetch(b(3), Offset(0), Offset(0), Offset(0), 1000).is_some(), "unfenced: it joins");
    }

    #[test]
    fn refused_expansions_back_off_exponentially() {
        let mut s = leader(&[1, 2], 2, 0);
        // The image does not know 3 is fenced; the controller refuses each time.
        let mut proposals = 0;
        for ms in 0..10_000u64 {
            if let Some(change) = s.on_fetch(b(3), Offset(0), Offset(0), Offset(0), ms) {
                proposals += 1;
                s.proposal_failed(&change, ProposalOutcome::NotApplied, ms);
            }
        }
        // Proposed at 0, 500, 1500, 3500, 7500 ms.
        assert_eq!(proposals, 5, "a fetch every millisecond for ten seconds");
    }
}
