//! A history checker for the fault test, after Jepsen's Kafka queue
//! workload: it reads every send (acknowledged, failed, or indeterminate),
//! every poll, and the final contents of each partition, and reports
//! lost writes, two values at one offset, records read and then gone,
//! polls that go back or skip, duplicates, and failed writes that were
//! stored anyway.

use std::collections::{BTreeMap, BTreeSet};

/// What the producer learned of one send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Acknowledged at this offset.
    Acked(i64),
    /// Refused before it was appended (NOT_ENOUGH_REPLICAS, or not the
    /// leader): it must never be read.
    Failed,
    /// Unknown: a timeout or a broken connection.
    Unknown,
}

/// One send: a value of its own to one partition.
#[derive(Debug, Clone)]
pub struct Send {
    pub partition: u32,
    pub value: String,
    pub outcome: Outcome,
    /// The writer that sent it. A writer's sends are in `History::sends`
    /// in the order it made them, and its acknowledged ones must sit at
    /// increasing offsets (every writer keeps one partition's order).
    pub writer: usize,
    /// Sent by a producer that retries on its own (not yet idempotent): a
    /// retry after a lost answer may store it twice.
    pub may_repeat: bool,
}

/// One fetch of one consumer: the records it returned, in order.
#[derive(Debug, Clone)]
pub struct Poll {
    pub consumer: usize,
    pub partition: u32,
    pub records: Vec<(i64, String)>,
}

/// Everything that happened.
#[derive(Debug, Default)]
pub struct History {
    pub sends: Vec<Send>,
    pub polls: Vec<Poll>,
    /// Each partition read from offset 0 to its end after healing.
    pub final_logs: BTreeMap<u32, Vec<(i64, String)>>,
    /// What the members of a consumer group were handed (their sequences
    /// may go back: a partition moves and is re-read from its commit).
    pub group_polls: Vec<Poll>,
    /// Commits the coordinator acknowledged: (partition, offset).
    pub commits: Vec<(u32, i64)>,
    /// The group's committed offsets as read over time, in order.
    pub committed_snapshots: Vec<BTreeMap<u32, i64>>,
    /// The group's committed offsets at the end.
    pub final_committed: BTreeMap<u32, i64>,
}

/// The anomalies found; all empty means the history is valid.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Acknowledged, never in the final log.
    pub lost: Vec<String>,
    /// (partition, offset) holding two different values somewhere.
    pub inconsistent: Vec<(u32, i64)>,
    /// Read by a consumer, then gone from the final log at that offset
    /// (partition, offset, value): a committed record that vanished.
    pub vanished: Vec<(u32, i64, String)>,
    /// A consumer's offsets went back (consumer, partition, from, to).
    pub nonmonotonic: Vec<(usize, u32, i64, i64)>,
    /// A consumer's offsets skipped (consumer, partition, from, to).
    pub skipped: Vec<(usize, u32, i64, i64)>,
    /// A value at more than one offset.
    pub duplicates: Vec<String>,
    /// Refused, yet stored.
    pub failed_but_stored: Vec<String>,
    /// The final log is not dense from 0 (partition, expected, found).
    pub gaps: Vec<(u32, i64, i64)>,
    /// A writer's acknowledged value at an offset not after the one it
    /// acknowledged before it (earlier value, later value).
    pub reordered: Vec<(String, String)>,
    /// A group's committed offset went back (partition, from, to).
    pub commit_went_back: Vec<(u32, i64, i64)>,
    /// An acknowledged commit above the final committed offset (partition,
    /// acknowledged, final).
    pub commit_lost: Vec<(u32, i64, i64)>,
    /// An offset below the final committed one that no group member was
    /// handed (partition, offset): the group skipped it.
    pub skipped_below_commit: Vec<(u32, i64)>,
}

impl Report {
    /// True when no anomaly was found.
    pub fn is_valid(&self) -> bool {
        *self == Report::default()
    }
}

/// Checks `h`.
pub fn check(h: &History) -> Report {
    let mut report = Report::default();
    // Every value seen at each offset, from polls, final logs and acks.
    let mut at: BTreeMap<(u32, i64), BTreeSet<&str>> = BTreeMap::new();
    for p in h.polls.iter().chain(&h.group_polls) {
        for (o, v) in &p.records {
            at.entry((p.partition, *o)).or_default().insert(v);
        }
    }
    for (partition, log) in &h.final_logs {
        for (o, v) in log {
            at.entry((*partition, *o)).or_default().insert(v);
        }
    }
    for s in &h.sends {
        if let Outcome::Acked(o) = s.outcome {
            at.entry((s.partition, o)).or_default().insert(&s.value);
        }
    }
    report.inconsistent = at.iter().filter(|(_, vs)| vs.len() > 1).map(|(k, _)| *k).collect();
    // Consumers read below the high watermark only: what one read must be in
    // the final log at that very offset.
    let finals: BTreeMap<(u32, i64), &str> =
        h.final_logs.iter().flat_map(|(p, log)| log.iter().map(move |(o, v)| ((*p, *o), v.as_str()))).collect();
    let mut vanished = BTreeSet::new();
    for p in h.polls.iter().chain(&h.group_polls) {
        for (o, v) in &p.records {
            if !finals.contains_key(&(p.partition, *o)) {
                vanished.insert((p.partition, *o, v.clone()));
            }
        }
    }
    report.vanished = vanished.into_iter().collect();
    check_group(h, &mut report);
    // The final logs: dense, each value once.
    let mut stored: BTreeMap<(u32, &str), usize> = BTreeMap::new();
    for (partition, log) in &h.final_logs {
        for (expected, (o, v)) in log.iter().enumerate() {
            if *o != expected as i64 {
                report.gaps.push((*partition, expected as i64, *o));
                break;
            }
            *stored.entry((*partition, v.as_str())).or_default() += 1;
        }
    }
    let may_repeat: BTreeSet<(u32, &str)> =
        h.sends.iter().filter(|s| s.may_repeat).map(|s| (s.partition, s.value.as_str())).collect();
    report.duplicates = stored
        .iter()
        .filter(|(key, n)| **n > 1 && !may_repeat.contains(key))
        .map(|((_, v), _)| v.to_string())
        .collect();
    // Each writer's acknowledgements, in its send order, at increasing offsets.
    let mut last_acked: BTreeMap<usize, (i64, &str)> = BTreeMap::new();
    for s in &h.sends {
        if let Outcome::Acked(o) = s.outcome {
            if let Some(&(before, value)) = last_acked.get(&s.writer)
                && o <= before
            {
                report.reordered.push((value.to_string(), s.value.clone()));
            }
            last_acked.insert(s.writer, (o, &s.value));
        }
    }
    for s in &h.sends {
        let present = stored.contains_key(&(s.partition, s.value.as_str()));
        match s.outcome {
            Outcome::Acked(_) if !present => report.lost.push(s.value.clone()),
            Outcome::Failed if present => report.failed_but_stored.push(s.value.clone()),
            _ => {}
        }
    }
    // Each consumer's view of each partition moves forward one by one.
    let mut last: BTreeMap<(usize, u32), i64> = BTreeMap::new();
    for p in &h.polls {
        for (o, _) in &p.records {
            let key = (p.consumer, p.partition);
            let previous = last.get(&key).copied().unwrap_or(-1);
            if *o <= previous {
                report.nonmonotonic.push((p.consumer, p.partition, previous, *o));
            } else if *o > previous + 1 {
                report.skipped.push((p.consumer, p.partition, previous, *o));
            }
            last.insert(key, *o);
        }
    }
    report
}

/// The consumer group's commits: never backwards, an acknowledged commit
/// never lost, and nothing below the final commit left unread.
fn check_group(h: &History, report: &mut Report) {
    let mut last: BTreeMap<u32, i64> = BTreeMap::new();
    for snapshot in h.committed_snapshots.iter().chain(std::iter::once(&h.final_committed)) {
        for (p, o) in snapshot {
            if let Some(before) = last.insert(*p, *o)
                && *o < before
            {
                report.commit_went_back.push((*p, before, *o));
            }
        }
    }
    for (p, o) in &h.commits {
        let fin = h.final_committed.get(p).copied().unwrap_or(-1);
        if *o > fin {
            report.commit_lost.push((*p, *o, fin));
        }
    }
    let mut handed: BTreeMap<u32, BTreeSet<i64>> = BTreeMap::new();
    for poll in &h.group_polls {
        handed.entry(poll.partition).or_default().extend(poll.records.iter().map(|(o, _)| *o));
    }
    for (p, committed) in &h.final_committed {
        let seen = handed.get(p);
        if let Some(o) = (0..*committed).find(|o| !seen.is_some_and(|s| s.contains(o))) {
            report.skipped_below_commit.push((*p, o));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(values: &[&str]) -> Vec<(i64, String)> {
        values.iter().enumerate().map(|(i, v)| (i as i64, v.to_string())).collect()
    }

    fn send(value: &str, outcome: Outcome) -> Send {
        Send { partition: 0, value: value.into(), outcome, writer: 0, may_repeat: false }
    }

    fn valid() -> History {
        History {
            sends: vec![
                send("a", Outcome::Acked(0)),
                send("b", Outcome::Unknown),
                send("c", Outcome::Acked(2)),
                send("d", Outcome::Failed),
                send("e", Outcome::Unknown),
            ],
            polls: vec![
                Poll { consumer: 0, partition: 0, records: log(&["a", "b"]) },
                Poll { consumer: 0, partition: 0, records: vec![(2, "c".into())] },
            ],
            final_logs: BTreeMap::from([(0, log(&["a", "b", "c"]))]),
            group_polls: vec![
                Poll { consumer: 100, partition: 0, records: log(&["a", "b"]) },
                // Moved to another member, re-read from the commit.
                Poll { consumer: 101, partition: 0, records: vec![(1, "b".into()), (2, "c".into())] },
            ],
            commits: vec![(0, 2), (0, 3)],
            committed_snapshots: vec![BTreeMap::from([(0, 2)]), BTreeMap::from([(0, 3)])],
            final_committed: BTreeMap::from([(0, 3)]),
        }
    }

    #[test]
    fn a_group_commit_that_went_back_or_was_lost_or_skipped_records_is_reported() {
        let mut h = valid();
        h.committed_snapshots.push(BTreeMap::from([(0, 1)]));
        assert_eq!(check(&h).commit_went_back, vec![(0, 3, 1)]);
        let mut h = valid();
        h.commits.push((0, 9));
        assert_eq!(check(&h).commit_lost, vec![(0, 9, 3)]);
        let mut h = valid();
        h.group_polls.remove(1);
        assert_eq!(check(&h).skipped_below_commit, vec![(0, 2)]);
    }

    #[test]
    fn a_valid_history_has_no_anomaly() {
        assert_eq!(check(&valid()), Report::default());
    }

    #[test]
    fn an_acknowledged_value_missing_from_the_log_is_a_lost_write() {
        let mut h = valid();
        h.final_logs.insert(0, log(&["a", "b"]));
        h.polls.truncate(1);
        assert_eq!(check(&h).lost, vec!["c".to_string()]);
    }

    #[test]
    fn two_values_at_one_offset_are_inconsistent() {
        let mut h = valid();
        h.polls.push(Poll { consumer: 1, partition: 0, records: log(&["a", "x"]) });
        assert_eq!(check(&h).inconsistent, vec![(0, 1)]);
        // An ack naming an offset that holds another value is one too.
        let mut h = valid();
        h.sends[0].outcome = Outcome::Acked(1);
        assert!(check(&h).inconsistent.contains(&(0, 1)));
    }

    #[test]
    fn a_poll_that_goes_back_is_nonmonotonic() {
        let mut h = valid();
        h.polls.push(Poll { consumer: 0, partition: 0, records: vec![(1, "b".into())] });
        assert_eq!(check(&h).nonmonotonic, vec![(0, 0, 2, 1)]);
    }

    #[test]
    fn a_poll_that_jumps_ahead_skips() {
        let mut h = valid();
        h.polls = vec![
            Poll { consumer: 0, partition: 0, records: vec![(0, "a".into())] },
            Poll { consumer: 0, partition: 0, records: vec![(2, "c".into())] },
        ];
        assert_eq!(check(&h).skipped, vec![(0, 0, 0, 2)]);
        // Starting past 0 is a skip as well: consumers start at the beginning.
        h.polls = vec![Poll { consumer: 3, partition: 0, records: vec![(1, "b".into())] }];
        assert_eq!(check(&h).skipped, vec![(3, 0, -1, 1)]);
    }

    #[test]
    fn a_value_stored_twice_is_a_duplicate() {
        let mut h = valid();
        h.final_logs.insert(0, log(&["a", "b", "c", "a"]));
        assert_eq!(check(&h).duplicates, vec!["a".to_string()]);
    }

    #[test]
    fn a_value_of_a_retrying_producer_may_be_stored_twice_but_no_other() {
        let mut h = valid();
        h.sends[0].may_repeat = true;
        h.final_logs.insert(0, log(&["a", "a", "b", "c", "b"]));
        h.sends[2].outcome = Outcome::Acked(3);
        h.polls.clear();
        assert_eq!(check(&h).duplicates, vec!["b".to_string()]);
    }

    #[test]
    fn a_writer_acknowledged_out_of_its_send_order_is_reordered() {
        let mut h = valid();
        h.sends.insert(0, send("c", Outcome::Acked(2)));
        h.sends.truncate(2); // c at 2, then a at 0
        assert_eq!(check(&h).reordered, vec![("c".to_string(), "a".to_string())]);
        // Another writer's acknowledgements are its own sequence.
        h.sends[1].writer = 1;
        assert!(check(&h).reordered.is_empty());
    }

    #[test]
    fn a_refused_write_that_was_stored_is_reported() {
        let mut h = valid();
        h.final_logs.insert(0, log(&["a", "b", "c", "d"]));
        assert_eq!(check(&h).failed_but_stored, vec!["d".to_string()]);
    }

    #[test]
    fn a_hole_in_the_final_log_is_reported() {
        let mut h = valid();
        h.final_logs.insert(0, vec![(0, "a".into()), (2, "c".into())]);
        assert_eq!(check(&h).gaps, vec![(0, 1, 2)]);
    }

    #[test]
    fn a_record_read_then_gone_from_the_final_log_vanished() {
        let mut h = valid();
        // "b" was read at offset 1 and the final log ends before it: no
        // other value took its place, so only this check sees it.
        h.final_logs.insert(0, log(&["a"]));
        h.sends.retain(|s| s.value != "c");
        h.polls.truncate(1);
        h.group_polls.truncate(1);
        let report = check(&h);
        assert_eq!(report.vanished, vec![(0, 1, "b".to_string())]);
        assert!(report.inconsistent.is_empty(), "one value per offset");
    }
}
