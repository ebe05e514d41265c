//! Who may lead a partition, and how its ISR and eligible leader replicas
//! (KIP-966's ELR) change: plain functions on a [`PartitionState`], used by
//! the metadata state machine.
//!
//! Rules:
//! - A replica that leaves the ISR while the ISR is below the topic's
//!   `min_insync_replicas` joins the ELR. Leaders move the high watermark
//!   only while the ISR holds `min_insync_replicas` (see
//!   `replication::leader`), so an ELR member holds every offset below the
//!   HW and may lead without losing an acknowledged record.
//! - A replica that joins the ISR leaves the ELR; an ISR that holds
//!   `min_insync_replicas` again clears the ELR.
//! - A new leader is the first live replica (in replica order) in the ISR,
//!   else the first live one in the ELR (which then becomes the whole ISR),
//!   else, with `unclean_leader_election = true`, the first live replica
//!   (its log becomes the truth, and may lack acknowledged records).
//! - A broker that may have lost writes it had not synced (its machine
//!   restarted after an unclean stop) leaves every ELR, and every ISR: it
//!   must catch up again before it counts. Unless it is the only replica
//!   left in either: then nothing better exists (with
//!   `min_insync_replicas` >= 2 the replicas that left the ISR are in the
//!   ELR, so this happens only with 1).

use super::metadata::{BrokerId, PartitionState};

/// The settings of a topic that shape elections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ElectionRules {
    /// The topic's `min_insync_replicas` (1 when unset).
    pub min_insync_replicas: usize,
    /// The topic's `unclean_leader_election`.
    pub unclean: bool,
}

/// Replaces the ISR, moving the members it drops into the ELR while the
/// new ISR is below `min_insync_replicas`.
pub fn set_isr(p: &mut PartitionState, isr: Vec<BrokerId>, rules: ElectionRules) {
    let small = isr.len() < rules.min_insync_replicas;
    let dropped: Vec<BrokerId> = p.isr.iter().copied().filter(|b| !isr.contains(b)).collect();
    p.elr.retain(|b| !isr.contains(b));
    if small {
        for b in dropped {
            if !p.elr.contains(&b) {
                p.elr.push(b);
            }
        }
    } else {
        p.elr.clear();
    }
    p.isr = isr;
}

/// Takes `broker` out of the partition's ISR and ELR without making it
/// eligible (it may have lost writes), unless no other replica is in
/// either: then its log is the best that exists, and it stays. Returns
/// true when anything changed.
pub fn forget_replica(p: &mut PartitionState, broker: BrokerId, rules: ElectionRules) -> bool {
    if !p.isr.iter().chain(&p.elr).any(|b| *b != broker) {
        return false;
    }
    let before = (p.isr.len(), p.elr.len());
    p.isr.retain(|b| *b != broker);
    p.elr.retain(|b| *b != broker);
    if p.isr.len() >= rules.min_insync_replicas {
        p.elr.clear();
    }
    before != (p.isr.len(), p.elr.len())
}

/// How a leader was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elected {
    /// From the ISR.
    InSync(BrokerId),
    /// From the ELR: it becomes the whole ISR.
    Eligible(BrokerId),
    /// Unclean: a live replica outside ISR and ELR.
    Unclean(BrokerId),
}

/// The leader the rules pick among the replicas `live` says are up.
pub fn pick_leader(p: &PartitionState, rules: ElectionRules, live: impl Fn(BrokerId) -> bool) -> Option<Elected> {
    let first = |set: &[BrokerId]| p.replicas.iter().copied().find(|b| set.contains(b) && live(*b));
    if let Some(b) = first(&p.isr) {
        return Some(Elected::InSync(b));
    }
    if let Some(b) = first(&p.elr) {
        return Some(Elected::Eligible(b));
    }
    if rules.unclean {
        return p.replicas.iter().copied().find(|b| live(*b)).map(Elected::Unclean);
    }
    None
}

/// Makes `elected` the leader: a new leader epoch, and for an ELR or
/// unclean pick, an ISR of the new leader alone.
pub fn install(p: &mut PartitionState, elected: Elected, rules: ElectionRules) {
    match elected {
        Elected::InSync(b) => p.leader = Some(b),
        Elected::Eligible(b) => {
            p.leader = Some(b);
            set_isr(p, vec![b], rules);
        }
        Elected::Unclean(b) => {
            p.leader = Some(b);
            p.isr = vec![b];
            p.elr.clear();
        }
    }
    p.leader_epoch.0 += 1;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::metadata::{LeaderEpoch, PartitionEpoch};

    fn b(id: u32) -> BrokerId {
        BrokerId(id)
    }

    fn state(isr: &[u32], elr: &[u32]) -> PartitionState {
        PartitionState {
            replicas: vec![b(1), b(2), b(3)],
            isr: isr.iter().map(|i| b(*i)).collect(),
            elr: elr.iter().map(|i| b(*i)).collect(),
            leader: isr.first().map(|i| b(*i)),
            leader_epoch: LeaderEpoch(5),
            partition_epoch: PartitionEpoch(9),
        }
    }

    const MIN2: ElectionRules = ElectionRules { min_insync_replicas: 2, unclean: false };

    #[test]
    fn members_that_leave_a_too_small_isr_become_eligible() {
        let mut p = state(&[1, 2, 3], &[]);
        set_isr(&mut p, vec![b(1), b(2)], MIN2);
        assert!(p.elr.is_empty(), "the ISR still holds min_insync_replicas: the HW may pass broker 3");
        set_isr(&mut p, vec![b(1)], MIN2);
        assert_eq!(p.elr, vec![b(2)], "the HW stopped when broker 2 left");
        set_isr(&mut p, vec![b(1), b(3)], MIN2);
        assert!(p.elr.is_empty(), "a large enough ISR clears the ELR");
    }

    #[test]
    fn a_replica_that_rejoins_the_isr_leaves_the_elr() {
        let mut p = state(&[1], &[2, 3]);
        let rules = ElectionRules { min_insync_replicas: 3, unclean: false };
        set_isr(&mut p, vec![b(1), b(2)], rules);
        assert_eq!(p.elr, vec![b(3)]);
    }

    #[test]
    fn the_leader_comes_from_the_isr_then_the_elr_then_only_if_unclean_anywhere() {
        let p = state(&[1], &[2]);
        assert_eq!(pick_leader(&p, MIN2, |_| true), Some(Elected::InSync(b(1))));
        assert_eq!(pick_leader(&p, MIN2, |x| x != b(1)), Some(Elected::Eligible(b(2))));
        assert_eq!(pick_leader(&p, MIN2, |x| x == b(3)), None, "broker 3 may lack acknowledged records");
        let unclean = ElectionRules { unclean: true, ..MIN2 };
        assert_eq!(pick_leader(&p, unclean, |x| x == b(3)), Some(Elected::Unclean(b(3))));
    }

    #[test]
    fn the_last_replica_standing_case_elects_the_eligible_replica_not_the_one_that_lost_writes() {
        // ISR {1,2} shrinks to {1}: broker 2 becomes eligible; the HW stops.
        let mut p = state(&[1, 2], &[]);
        set_isr(&mut p, vec![b(1)], MIN2);
        // Broker 1, the last ISR member, crashes with its machine and loses
        // writes it had not synced: it is forgotten as a candidate.
        assert!(forget_replica(&mut p, b(1), MIN2));
        assert!(p.isr.is_empty() && p.elr == vec![b(2)]);
        // Whatever comes back first, broker 2 leads, never broker 1.
        assert_eq!(pick_leader(&p, MIN2, |_| true), Some(Elected::Eligible(b(2))));
        assert_eq!(pick_leader(&p, MIN2, |x| x == b(1)), None, "broker 1 alone waits");
        let picked = pick_leader(&p, MIN2, |_| true).unwrap();
        install(&mut p, picked, MIN2);
        assert_eq!((p.leader, p.isr.clone(), p.leader_epoch), (Some(b(2)), vec![b(2)], LeaderEpoch(6)));
        assert!(p.elr.is_empty());
    }

    #[test]
    fn a_replica_that_lost_writes_stays_when_no_other_holds_the_data() {
        let mut p = state(&[1], &[]);
        assert!(!forget_replica(&mut p, b(1), MIN2));
        assert_eq!(p.isr, vec![b(1)]);
        let mut p = state(&[1, 2], &[]);
        assert!(forget_replica(&mut p, b(1), MIN2));
        assert_eq!((p.isr.clone(), p.elr.clone()), (vec![b(2)], vec![]), "it is not eligible either");
    }

    #[test]
    fn an_eligible_leader_moves_the_old_isr_into_the_elr() {
        // Broker 1 (sole ISR member, in sync) is fenced while broker 2 is eligible.
        let mut p = state(&[1], &[2]);
        install(&mut p, Elected::Eligible(b(2)), MIN2);
        assert_eq!(p.isr, vec![b(2)]);
        assert_eq!(p.elr, vec![b(1)], "broker 1 held everything below the HW too");
    }
}
