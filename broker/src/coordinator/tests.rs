//! Unit tests of the coordinator's state machine and assignors.

use std::collections::{BTreeMap, BTreeSet};

use super::records::{CoordinatorRecord, RecordKey, RecordValue};
use super::*;

fn config() -> GroupConfig {
    GroupConfig { min_session_timeout_ms: 1000, ..GroupConfig::default() }
}

fn topics(list: &[(&str, u32)]) -> TopicsView {
    list.iter().map(|(t, n)| (t.to_string(), *n)).collect()
}

fn subscribe(topics: &[&str]) -> Option<BTreeSet<String>> {
    Some(topics.iter().map(|t| t.to_string()).collect())
}

fn count(a: &Assignment) -> usize {
    a.values().map(BTreeSet::len).sum()
}

/// A client as the protocol expects it to behave: it owns what the last
/// answer assigned it, and reports that in every heartbeat.
#[derive(Debug, Clone)]
struct Client {
    id: String,
    epoch: i32,
    owned: Assignment,
    topics: Vec<String>,
}

struct Sim {
    shard: Shard,
    topics: TopicsView,
    clients: BTreeMap<String, Client>,
    now: u64,
    log: Vec<CoordinatorRecord>,
}

impl Sim {
    fn new(topics: TopicsView) -> Sim {
        Sim { shard: Shard::new(config()), topics, clients: BTreeMap::new(), now: 1_000_000, log: Vec::new() }
    }

    fn join(&mut self, id: &str, subscribed: &[&str]) {
        let c = Client {
            id: id.to_string(),
            epoch: 0,
            owned: Assignment::new(),
            topics: subscribed.iter().map(|t| t.to_string()).collect(),
        };
        self.clients.insert(id.to_string(), c);
        self.heartbeat(id).expect("join");
    }

    fn request(&self, c: &Client) -> HeartbeatRequest {
        HeartbeatRequest {
            group: "g".into(),
            member_id: c.id.clone(),
            member_epoch: c.epoch,
            topics: Some(c.topics.iter().cloned().collect()),
            regex: None,
            assignor: None,
            rebalance_timeout_ms: 10_000,
            session_timeout_ms: 5_000,
            owned: Some(c.owned.clone()),
            client_id: "test".into(),
            client_host: "127.0.0.1".into(),
        }
    }

    fn heartbeat(&mut self, id: &str) -> Result<HeartbeatResponse, GroupError> {
        let req = self.request(&self.clients[id]);
        let (records, response) = self.shard.heartbeat(&req, &self.topics, self.now)?;
        self.log.extend(records);
        let c = self.clients.get_mut(id).unwrap();
        c.epoch = response.member_epoch;
        // The client drops what it was not assigned and takes the rest.
        c.owned = response.assignment.clone();
        self.check_no_two_owners();
        Ok(response)
    }

    /// What a fenced client does: drops what it owns, leaves, joins again.
    fn rejoin(&mut self, id: &str) {
        let mut c = self.clients[id].clone();
        c.owned.clear();
        let mut req = self.request(&c);
        req.member_epoch = -1;
        let (records, _) = self.shard.heartbeat(&req, &self.topics, self.now).unwrap();
        self.log.extend(records);
        c.epoch = 0;
        self.clients.insert(id.to_string(), c);
        self.heartbeat(id).unwrap();
    }

    fn leave(&mut self, id: &str) {
        let mut req = self.request(&self.clients[id]);
        req.member_epoch = -1;
        let (records, _) = self.shard.heartbeat(&req, &self.topics, self.now).unwrap();
        self.log.extend(records);
        self.clients.remove(id);
    }

    /// No partition is owned by two clients that are members: a client the
    /// coordinator removed (its session lapsed) is a zombie, fenced on its
    /// next heartbeat or commit.
    fn check_no_two_owners(&self) {
        let members: BTreeSet<String> =
            self.shard.describe("g").map(|d| d.members.into_iter().map(|m| m.member_id).collect()).unwrap_or_default();
        let mut seen: BTreeMap<(String, u32), &str> = BTreeMap::new();
        for c in self.clients.values().filter(|c| members.contains(&c.id)) {
            for (t, ps) in &c.owned {
                for p in ps {
                    if let Some(other) = seen.insert((t.clone(), *p), &c.id) {
                        panic!("{t}/{p} owned by {other} and {}", c.id);
                    }
                }
            }
        }
    }

    /// Heartbeats every client round robin until nothing changes.
    fn settle(&mut self) {
        for _ in 0..20 {
            let before: Vec<(i32, Assignment)> = self.clients.values().map(|c| (c.epoch, c.owned.clone())).collect();
            let ids: Vec<String> = self.clients.keys().cloned().collect();
            for id in ids {
                self.heartbeat(&id).unwrap();
            }
            let after: Vec<(i32, Assignment)> = self.clients.values().map(|c| (c.epoch, c.owned.clone())).collect();
            if before == after {
                return;
            }
        }
        panic!("the group did not settle");
    }

    fn owned_counts(&self) -> BTreeMap<String, usize> {
        self.clients.values().map(|c| (c.id.clone(), count(&c.owned))).collect()
    }
}

#[test]
fn members_converge_to_a_balanced_assignment_with_every_partition_owned_once() {
    let mut sim = Sim::new(topics(&[("t", 12)]));
    for id in ["a", "b", "c"] {
        sim.join(id, &["t"]);
    }
    sim.settle();
    assert_eq!(sim.owned_counts().values().copied().collect::<Vec<_>>(), vec![4, 4, 4]);
    let all: BTreeSet<u32> = sim.clients.values().flat_map(|c| c.owned["t"].iter().copied()).collect();
    assert_eq!(all, (0..12).collect());
    let d = sim.shard.describe("g").unwrap();
    assert_eq!(d.state, GroupState::Stable);
    assert!(d.members.iter().all(|m| m.member_epoch == d.epoch));
}

#[test]
fn a_joining_member_takes_partitions_only_after_they_are_revoked_and_others_keep_theirs() {
    let mut sim = Sim::new(topics(&[("t", 12)]));
    for id in ["a", "b", "c"] {
        sim.join(id, &["t"]);
    }
    sim.settle();
    let before: BTreeMap<String, Assignment> = sim.clients.values().map(|c| (c.id.clone(), c.owned.clone())).collect();
    // d joins: the target gives it 3, but they are still owned by a, b, c.
    let first = {
        sim.join("d", &["t"]);
        sim.clients["d"].owned.clone()
    };
    assert!(count(&first) == 0, "d got partitions others still own: {first:?}");
    sim.settle();
    assert_eq!(sim.owned_counts().values().copied().collect::<Vec<_>>(), vec![3, 3, 3, 3]);
    // Sticky: each old member kept a subset of what it had.
    for id in ["a", "b", "c"] {
        assert!(member::is_subset(&sim.clients[id].owned, &before[id]), "{id} moved partitions");
    }
}

#[test]
fn leaving_and_session_expiry_hand_partitions_to_the_others() {
    let mut sim = Sim::new(topics(&[("t", 6)]));
    for id in ["a", "b", "c"] {
        sim.join(id, &["t"]);
    }
    sim.settle();
    sim.leave("a");
    sim.settle();
    assert_eq!(sim.owned_counts().values().copied().collect::<Vec<_>>(), vec![3, 3]);
    // b stops heartbeating; c keeps going; b's session (5 s) lapses.
    let b = sim.clients.remove("b").unwrap();
    for _ in 0..6 {
        sim.now += 1_000;
        let expired = sim.shard.tick(sim.now);
        sim.log.extend(expired);
        sim.heartbeat("c").unwrap();
    }
    assert!(sim.shard.describe("g").unwrap().members.iter().all(|m| m.member_id == "c"));
    sim.settle();
    assert_eq!(count(&sim.clients["c"].owned), 6);
    // The removed member's next heartbeat is refused; it must rejoin.
    sim.clients.insert("b".into(), b);
    assert!(matches!(sim.heartbeat("b"), Err(GroupError::UnknownMemberId { .. })));
}

#[test]
fn a_member_that_does_not_revoke_is_removed_after_its_rebalance_timeout() {
    let mut sim = Sim::new(topics(&[("t", 4)]));
    sim.join("a", &["t"]);
    sim.settle();
    sim.join("b", &["t"]);
    // a is told to give up two partitions but keeps reporting them.
    let mut req = sim.request(&sim.clients["a"]);
    req.owned = Some(BTreeMap::from([("t".to_string(), (0..4).collect())]));
    let (_, r) = sim.shard.heartbeat(&req, &sim.topics, sim.now).unwrap();
    assert_eq!(count(&r.assignment), 2);
    let d = sim.shard.describe("g").unwrap();
    let a = d.members.iter().find(|m| m.member_id == "a").unwrap();
    assert_eq!(a.state, MemberState::UnrevokedPartitions);
    // b gets nothing while a still owns the partitions.
    assert_eq!(count(&sim.heartbeat("b").unwrap().assignment), 0);
    for _ in 0..4 {
        sim.now += 3_000;
        sim.shard.heartbeat(&req, &sim.topics, sim.now).ok();
        sim.heartbeat("b").unwrap();
        sim.shard.tick(sim.now);
    }
    let d = sim.shard.describe("g").unwrap();
    assert_eq!(d.members.len(), 1, "a was not fenced: {d:?}");
    sim.clients.remove("a");
    sim.settle();
    assert_eq!(count(&sim.clients["b"].owned), 4);
}

#[test]
fn epochs_ahead_or_behind_are_fenced_but_a_retried_heartbeat_is_not() {
    let mut sim = Sim::new(topics(&[("t", 4)]));
    sim.join("a", &["t"]);
    sim.settle();
    let epoch = sim.clients["a"].epoch;
    let mut req = sim.request(&sim.clients["a"]);
    req.member_epoch = epoch + 5;
    assert!(matches!(sim.shard.heartbeat(&req, &sim.topics, sim.now), Err(GroupError::FencedMemberEpoch { .. })));
    // b joins: a's epoch moves on; a heartbeat at the previous epoch with
    // what a owns then is a lost answer retried, and is fine.
    sim.join("b", &["t"]);
    sim.settle();
    sim.join("c", &["t"]);
    sim.settle();
    let a = sim.clients["a"].clone();
    assert!(a.epoch >= 3, "{a:?}");
    let mut req = sim.request(&a);
    req.member_epoch = a.epoch - 1;
    req.owned = Some(a.owned.clone());
    assert!(sim.shard.heartbeat(&req, &sim.topics, sim.now).is_ok());
    req.member_epoch = 1;
    assert!(matches!(sim.shard.heartbeat(&req, &sim.topics, sim.now), Err(GroupError::FencedMemberEpoch { .. })));
}

#[test]
fn subscription_changes_and_partition_growth_bump_the_epoch_and_reassign() {
    let mut sim = Sim::new(topics(&[("t", 2), ("u", 2)]));
    sim.join("a", &["t"]);
    sim.join("b", &["t"]);
    sim.settle();
    let e1 = sim.shard.describe("g").unwrap().epoch;
    sim.clients.get_mut("b").unwrap().topics = vec!["t".into(), "u".into()];
    sim.settle();
    assert!(sim.shard.describe("g").unwrap().epoch > e1);
    assert_eq!(sim.clients["b"].owned.get("u").map(BTreeSet::len), Some(2));
    sim.topics.insert("t".into(), 6);
    sim.settle();
    let t: usize = sim.clients.values().map(|c| c.owned.get("t").map_or(0, BTreeSet::len)).sum();
    assert_eq!(t, 6);
}

#[test]
fn a_pattern_subscription_picks_up_topics_created_later() {
    let mut sim = Sim::new(topics(&[("orders-eu", 2), ("payments", 2)]));
    sim.clients.insert("a".into(), Client { id: "a".into(), epoch: 0, owned: Assignment::new(), topics: Vec::new() });
    let mut req = sim.request(&sim.clients["a"]);
    req.topics = Some(BTreeSet::new());
    req.regex = Some("orders-.*".into());
    let (_, r) = sim.shard.heartbeat(&req, &sim.topics, sim.now).unwrap();
    assert_eq!(r.assignment.keys().collect::<Vec<_>>(), vec!["orders-eu"]);
    sim.topics.insert("orders-us".into(), 1);
    req.member_epoch = r.member_epoch;
    req.owned = Some(r.assignment);
    let (_, r) = sim.shard.heartbeat(&req, &sim.topics, sim.now).unwrap();
    assert_eq!(r.assignment.keys().collect::<Vec<_>>(), vec!["orders-eu", "orders-us"]);
    req.regex = Some("(".into());
    assert!(matches!(
        sim.shard.heartbeat(&req, &sim.topics, sim.now),
        Err(GroupError::InvalidRegularExpression { .. })
    ));
}

#[test]
fn random_joins_leaves_and_expiries_never_give_a_partition_two_owners() {
    // A small deterministic generator: no dependency on rand.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    for _round in 0..20 {
        let mut sim = Sim::new(topics(&[("t", 16), ("u", 5)]));
        let mut joined = 0;
        for _step in 0..200 {
            match next(10) {
                0 | 1 if sim.clients.len() < 6 => {
                    joined += 1;
                    let subs: &[&str] = if next(2) == 0 { &["t"] } else { &["t", "u"] };
                    sim.join(&format!("m{joined}"), subs);
                }
                2 if !sim.clients.is_empty() => {
                    let id = sim.clients.keys().nth(next(sim.clients.len() as u64) as usize).unwrap().clone();
                    sim.leave(&id);
                }
                3 if !sim.clients.is_empty() => {
                    // A crash: the client is gone; its session lapses later.
                    let id = sim.clients.keys().nth(next(sim.clients.len() as u64) as usize).unwrap().clone();
                    sim.clients.remove(&id);
                }
                4 => {
                    sim.now += 2_000;
                    let r = sim.shard.tick(sim.now);
                    sim.log.extend(r);
                }
                _ if !sim.clients.is_empty() => {
                    let id = sim.clients.keys().nth(next(sim.clients.len() as u64) as usize).unwrap().clone();
                    // A removed or fenced member lets go of everything,
                    // leaves, and joins again.
                    if sim.heartbeat(&id).is_err() {
                        sim.rejoin(&id);
                    }
                }
                _ => {}
            }
        }
        // Everyone alive converges on every partition, once.
        sim.now += 10_000;
        let expired = sim.shard.tick(sim.now);
        sim.log.extend(expired);
        let ids: Vec<String> = sim.clients.keys().cloned().collect();
        for id in ids {
            sim.rejoin(&id);
        }
        if sim.clients.is_empty() {
            continue;
        }
        sim.settle();
        let owned: usize = sim.clients.values().map(|c| count(&c.owned)).sum();
        let wanted = if sim.clients.values().any(|c| c.topics.len() == 2) { 21 } else { 16 };
        assert_eq!(owned, wanted);
        // Replaying the records gives the same state.
        let mut replayed = Shard::new(config());
        for r in &sim.log {
            replayed.replay(r, sim.now);
        }
        assert_eq!(replayed.describe("g"), sim.shard.describe("g"));
    }
}

#[test]
fn replay_through_encoded_records_gives_the_same_state() {
    let mut sim = Sim::new(topics(&[("t", 8)]));
    sim.join("a", &["t"]);
    sim.join("b", &["t"]);
    sim.settle();
    let owned = sim.clients["a"].owned.clone();
    let offsets: Vec<CommitOffset> = owned["t"]
        .iter()
        .map(|p| CommitOffset { topic: "t".into(), partition: *p, offset: 42, leader_epoch: 3, metadata: "m".into() })
        .collect();
    let (records, results) =
        sim.shard.commit("g", "a", sim.clients["a"].epoch, &offsets, &sim.topics, sim.now).unwrap();
    assert!(results.iter().all(Result::is_ok));
    sim.log.extend(records);
    let mut replayed = Shard::new(config());
    for (i, r) in sim.log.iter().enumerate() {
        let decoded = CoordinatorRecord::decode(i as i64, &r.encode_key(), r.encode_value().as_deref()).unwrap();
        assert_eq!(&decoded, r);
        replayed.replay(&decoded, sim.now);
    }
    assert_eq!(replayed.describe("g"), sim.shard.describe("g"));
    assert_eq!(replayed.offsets("g", None), sim.shard.offsets("g", None));
    // A value of the wrong kind for its key is refused.
    let key = serde_json::to_vec(&RecordKey::Group { group: "g".into() }).unwrap();
    let value = serde_json::to_vec(&RecordValue::Target(Assignment::new())).unwrap();
    assert!(CoordinatorRecord::decode(7, &key, Some(&value)).is_err());
}

#[test]
fn commits_from_zombies_or_for_partitions_not_owned_are_refused() {
    let mut sim = Sim::new(topics(&[("t", 4)]));
    sim.join("a", &["t"]);
    sim.join("b", &["t"]);
    sim.settle();
    let a = sim.clients["a"].clone();
    let mine = *a.owned["t"].iter().next().unwrap();
    let theirs = *sim.clients["b"].owned["t"].iter().next().unwrap();
    let commit = |p: u32| CommitOffset {
        topic: "t".into(),
        partition: p,
        offset: 10,
        leader_epoch: -1,
        metadata: String::new(),
    };
    let (_, results) =
        sim.shard.commit("g", "a", a.epoch, &[commit(mine), commit(theirs)], &sim.topics, sim.now).unwrap();
    assert!(results[0].is_ok());
    assert!(matches!(results[1], Err(GroupError::StaleMemberEpoch(_))));
    assert!(matches!(
        sim.shard.commit("g", "a", a.epoch - 1, &[commit(mine)], &sim.topics, sim.now),
        Err(GroupError::StaleMemberEpoch(_))
    ));
    assert!(matches!(
        sim.shard.commit("g", "", -1, &[commit(mine)], &sim.topics, sim.now),
        Err(GroupError::UnknownMemberId { .. })
    ));
    assert_eq!(sim.shard.offsets("g", Some(&[("t".into(), theirs)]))[0].2, None);
    // Bad partitions and metadata.
    let mut bad = commit(mine);
    bad.metadata = "x".repeat(5000);
    let unknown = CommitOffset { topic: "nope".into(), ..commit(0) };
    let (_, results) = sim.shard.commit("g", "a", a.epoch, &[bad, unknown], &sim.topics, sim.now).unwrap();
    assert!(matches!(results[0], Err(GroupError::OffsetMetadataTooLarge { .. })));
    assert!(matches!(results[1], Err(GroupError::UnknownTopicOrPartition { .. })));
    // A group without members takes commits without a member id.
    let (records, results) = sim.shard.commit("manual", "", -1, &[commit(1)], &sim.topics, sim.now).unwrap();
    assert!(results[0].is_ok() && !records.is_empty());
    assert_eq!(sim.shard.offsets("manual", None)[0].2.as_ref().unwrap().offset, 10);
}

#[test]
fn bad_ids_and_session_timeouts_are_refused_with_their_rule() {
    let mut shard = Shard::new(config());
    let t = topics(&[("t", 1)]);
    let mut req = HeartbeatRequest {
        group: String::new(),
        member_id: "m".into(),
        member_epoch: 0,
        topics: subscribe(&["t"]),
        rebalance_timeout_ms: 1000,
        ..HeartbeatRequest::default()
    };
    let e = shard.heartbeat(&req, &t, 0).unwrap_err();
    assert!(e.to_string().contains("must not be empty"), "{e}");
    req.group = "g".repeat(300);
    let e = shard.heartbeat(&req, &t, 0).unwrap_err();
    assert!(e.to_string().contains("at most 255"), "{e}");
    req.group = "g".into();
    req.session_timeout_ms = 10;
    assert_eq!(shard.heartbeat(&req, &t, 0).unwrap_err().kafka_code(), 26);
    req.session_timeout_ms = 0;
    req.assignor = Some("roundrobin".into());
    assert_eq!(shard.heartbeat(&req, &t, 0).unwrap_err().kafka_code(), 112);
    assert_eq!(shard.describe("nope").unwrap_err().kafka_code(), 69);
}

#[test]
fn groups_are_full_at_the_max_size() {
    let mut shard = Shard::new(GroupConfig { max_size: 2, ..config() });
    let t = topics(&[("t", 1)]);
    for (i, ok) in [(1, true), (2, true), (3, false)] {
        let req = HeartbeatRequest {
            group: "g".into(),
            member_id: format!("m{i}"),
            topics: subscribe(&["t"]),
            rebalance_timeout_ms: 1000,
            ..HeartbeatRequest::default()
        };
        assert_eq!(shard.heartbeat(&req, &t, 0).is_ok(), ok);
    }
}

#[test]
fn empty_groups_lose_their_offsets_after_the_retention_and_only_empty_groups_are_deleted() {
    let mut shard = Shard::new(GroupConfig { offsets_retention_ms: 60_000, ..config() });
    let t = topics(&[("t", 2)]);
    let c = CommitOffset { topic: "t".into(), partition: 0, offset: 5, leader_epoch: -1, metadata: String::new() };
    shard.commit("g", "", -1, std::slice::from_ref(&c), &t, 1_000).unwrap();
    assert!(shard.tick(30_000).is_empty());
    let records = shard.tick(62_000);
    assert!(records.iter().any(|r| matches!(r.key, RecordKey::Offset { .. }) && r.value.is_none()));
    assert_eq!(shard.group_count(), 0);
    // Delete refuses a group with members.
    let req = HeartbeatRequest {
        group: "h".into(),
        member_id: "m".into(),
        topics: subscribe(&["t"]),
        rebalance_timeout_ms: 1000,
        ..HeartbeatRequest::default()
    };
    shard.heartbeat(&req, &t, 0).unwrap();
    assert_eq!(shard.delete_group("h", 0).unwrap_err().kafka_code(), 68);
    assert_eq!(
        shard.delete_offsets("h", &[("t".into(), 0)], &t, 0).unwrap().1[0].as_ref().unwrap_err().kafka_code(),
        86
    );
}

#[test]
fn the_uniform_assignor_is_balanced_and_sticky_and_range_is_contiguous() {
    let subs = |ids: &[&'static str]| -> assignor::Subscriptions<'static> {
        ids.iter().map(|id| (*id, BTreeSet::from(["t".to_string()]))).collect()
    };
    let counts = BTreeMap::from([("t".to_string(), 64)]);
    let three = assignor::uniform(&subs(&["a", "b", "c"]), &counts, &BTreeMap::new());
    let sizes: Vec<usize> = three.values().map(count).collect();
    assert_eq!(sizes, vec![22, 21, 21]);
    let four = assignor::uniform(&subs(&["a", "b", "c", "d"]), &counts, &three);
    assert_eq!(four.values().map(count).collect::<Vec<_>>(), vec![16, 16, 16, 16]);
    for id in ["a", "b", "c"] {
        assert!(member::is_subset(&four[id], &three[id]), "{id} lost a partition it could keep");
    }
    let r = assignor::range(&subs(&["a", "b", "c"]), &BTreeMap::from([("t".to_string(), 8)]));
    assert_eq!(r["a"]["t"], (0..3).collect());
    assert_eq!(r["b"]["t"], (3..6).collect());
    assert_eq!(r["c"]["t"], (6..8).collect());
}

#[test]
fn the_group_partition_is_murmur2_of_the_group_id() {
    // Kafka's murmur2 vector: murmur2("21") = -973932308.
    assert_eq!(partition_for_group("21", 50), ((-973932308i32 & 0x7fff_ffff) as u32) % 50);
}

#[test]
fn a_late_join_of_a_live_member_is_fenced_and_takes_nothing_from_it() {
    let mut sim = Sim::new(topics(&[("t", 4)]));
    sim.join("a", &["t"]);
    sim.settle();
    sim.join("b", &["t"]);
    sim.settle();
    assert_eq!(count(&sim.clients["a"].owned), 2);
    // a's join request, delayed, arrives again after a moved on.
    let mut late = sim.request(&sim.clients["a"]);
    late.member_epoch = 0;
    late.owned = Some(Assignment::new());
    let e = sim.shard.heartbeat(&late, &sim.topics, sim.now).unwrap_err();
    assert_eq!(e.kafka_code(), 110, "{e}");
    assert_eq!(sim.shard.owners("g").len(), 4);
    // A retried first join (its answer lost) gets the member's state back.
    let mut sim = Sim::new(topics(&[("t", 4)]));
    let first = sim.request(&Client { id: "b".into(), epoch: 0, owned: Assignment::new(), topics: vec!["t".into()] });
    let (_, r1) = sim.shard.heartbeat(&first, &sim.topics, sim.now).unwrap();
    let (records, r2) = sim.shard.heartbeat(&first, &sim.topics, sim.now).unwrap();
    assert_eq!(r1, r2);
    assert!(records.is_empty(), "{records:?}");
}

#[test]
fn a_second_revocation_at_the_same_epoch_gets_its_own_deadline() {
    let mut sim = Sim::new(topics(&[("t", 6)]));
    sim.join("a", &["t"]);
    sim.settle();
    sim.join("b", &["t"]);
    // a is told to revoke (its 10 s timeout starts) and lets go at once...
    sim.heartbeat("a").unwrap();
    let state = |sim: &Sim| sim.shard.describe("g").unwrap().members.iter().find(|m| m.member_id == "a").unwrap().state;
    assert_eq!(state(&sim), MemberState::UnrevokedPartitions);
    sim.now += 9_000;
    sim.heartbeat("b").unwrap();
    // ...but c joins before a reports it, 9 s in: a has more to revoke,
    // at the same epoch.
    sim.join("c", &["t"]);
    sim.heartbeat("a").unwrap();
    assert_eq!(state(&sim), MemberState::UnrevokedPartitions);
    sim.now += 2_000;
    sim.shard.tick(sim.now);
    assert!(
        sim.shard.describe("g").unwrap().members.iter().any(|m| m.member_id == "a"),
        "a was fenced while responsive"
    );
    sim.settle();
    assert_eq!(sim.owned_counts().values().copied().collect::<Vec<_>>(), vec![2, 2, 2]);
}

#[test]
fn group_configs_set_the_session_and_interval_within_the_broker_bounds() {
    let mut sim = Sim::new(topics(&[("t", 2)]));
    let set = |k: &str, v: &str| (k.to_string(), Some(v.to_string()));
    let records = sim
        .shard
        .alter_configs(
            "g",
            &[set("consumer_session_timeout_ms", "20000"), set("consumer_heartbeat_interval_ms", "2000")],
            sim.now,
        )
        .unwrap();
    sim.log.extend(records);
    assert_eq!(sim.shard.describe("g").unwrap().configs["consumer_session_timeout_ms"], 20_000);
    // A member that asks for no session of its own gets the group's.
    let c = Client { id: "a".into(), epoch: 0, owned: Assignment::new(), topics: vec!["t".into()] };
    let mut req = sim.request(&c);
    req.session_timeout_ms = 0;
    let (records, r) = sim.shard.heartbeat(&req, &sim.topics, sim.now).unwrap();
    sim.log.extend(records);
    assert_eq!(r.heartbeat_interval_ms, 2000);
    sim.now += 19_000;
    assert!(sim.shard.tick(sim.now).is_empty(), "removed before the group's session");
    sim.now += 2_000;
    assert!(!sim.shard.tick(sim.now).is_empty(), "kept past the group's session");
    // Out of bounds, unknown, or an interval not below the session: refused,
    // and nothing changes.
    for bad in [
        set("consumer_session_timeout_ms", "500"),
        set("consumer_session_timeout_ms", "soon"),
        set("consumer_heartbeat_interval_ms", "20000"),
        set("consumer.session.timeout", "20000"),
    ] {
        let e = sim.shard.alter_configs("g", std::slice::from_ref(&bad), sim.now).unwrap_err();
        assert_eq!(e.kafka_code(), 40, "{bad:?}: {e}");
    }
    assert_eq!(sim.shard.describe("g").unwrap().configs.len(), 2);
    // Removing one falls back to the broker's.
    let records = sim.shard.alter_configs("g", &[("consumer_heartbeat_interval_ms".into(), None)], sim.now).unwrap();
    sim.log.extend(records);
    let mut replayed = Shard::new(config());
    for r in &sim.log {
        replayed.replay(r, sim.now);
    }
    assert_eq!(
        replayed.describe("g").unwrap().configs,
        BTreeMap::from([("consumer_session_timeout_ms".into(), 20_000)])
    );
}
