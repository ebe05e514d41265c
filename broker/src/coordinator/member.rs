//! A member's convergence to its target assignment (Kafka's
//! `CurrentAssignmentBuilder`). Partitions the target takes away are revoked
//! first, the member staying at its epoch until a heartbeat shows it no longer
//! owns them; a partition the target adds is given only once no other member
//! owns it (assigned or still revoking), so no partition ever has two owners.

use serde::{Deserialize, Serialize};

use super::Assignment;
use super::records::MemberValue;

/// Where a member stands against its target.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberState {
    /// At the target epoch, owning its whole target.
    #[default]
    Stable,
    /// Must revoke partitions before it moves to the target epoch.
    UnrevokedPartitions,
    /// At the target epoch, waiting for partitions other members still own.
    UnreleasedPartitions,
}

impl MemberState {
    /// Kafka's name for the state.
    pub fn name(self) -> &'static str {
        match self {
            MemberState::Stable => "STABLE",
            MemberState::UnrevokedPartitions => "UNREVOKED_PARTITIONS",
            MemberState::UnreleasedPartitions => "UNRELEASED_PARTITIONS",
        }
    }
}

/// A member as the coordinator keeps it (its persisted value).
pub type Member = MemberValue;

/// The member's next assignment state, given its target at `target_epoch`,
/// the partitions its heartbeat says it owns (`None` when it did not say),
/// and `owned_by_other(topic, partition)`: whether another member still owns
/// a partition. Returns the member unchanged when nothing may move yet.
pub fn reconcile(
    member: &Member,
    target_epoch: i32,
    target: &Assignment,
    owned: Option<&Assignment>,
    owned_by_other: impl Fn(&str, u32) -> bool,
) -> Member {
    match member.state {
        MemberState::Stable if member.epoch == target_epoch => member.clone(),
        MemberState::UnrevokedPartitions => {
            // It may move on only once it says it released every partition
            // it had to give up.
            let released = owned.is_some_and(|owned| !overlaps(owned, &member.revoking));
            if released { next_assignment(member, target_epoch, target, owned_by_other) } else { member.clone() }
        }
        _ => next_assignment(member, target_epoch, target, owned_by_other),
    }
}

fn next_assignment(
    member: &Member,
    target_epoch: i32,
    target: &Assignment,
    owned_by_other: impl Fn(&str, u32) -> bool,
) -> Member {
    let mut kept = Assignment::new();
    let mut revoking = Assignment::new();
    let mut gained = Assignment::new();
    let mut unreleased = false;
    let topics: std::collections::BTreeSet<&String> = target.keys().chain(member.assigned.keys()).collect();
    for topic in topics {
        let empty = Default::default();
        let want = target.get(topic).unwrap_or(&empty);
        let have = member.assigned.get(topic).unwrap_or(&empty);
        for p in have {
            if want.contains(p) {
                kept.entry(topic.clone()).or_default().insert(*p);
            } else {
                revoking.entry(topic.clone()).or_default().insert(*p);
            }
        }
        for p in want.difference(have) {
            if owned_by_other(topic, *p) {
                unreleased = true;
            } else {
                gained.entry(topic.clone()).or_default().insert(*p);
            }
        }
    }
    let mut next = member.clone();
    next.previous_epoch = member.epoch;
    if !revoking.is_empty() {
        // Revoke first, at the same epoch; nothing new until it is done.
        next.state = MemberState::UnrevokedPartitions;
        next.assigned = kept;
        next.revoking = revoking;
        return next;
    }
    for (topic, partitions) in gained {
        kept.entry(topic).or_default().extend(partitions);
    }
    next.epoch = target_epoch;
    next.assigned = kept;
    next.revoking = Assignment::new();
    next.state = if unreleased { MemberState::UnreleasedPartitions } else { MemberState::Stable };
    next
}

/// True when `a` and `b` share a partition.
pub fn overlaps(a: &Assignment, b: &Assignment) -> bool {
    a.iter().any(|(topic, ps)| b.get(topic).is_some_and(|other| !ps.is_disjoint(other)))
}

/// True when every partition of `a` is in `b`.
pub fn is_subset(a: &Assignment, b: &Assignment) -> bool {
    a.iter().all(|(topic, ps)| ps.is_empty() || b.get(topic).is_some_and(|other| ps.is_subset(other)))
}
