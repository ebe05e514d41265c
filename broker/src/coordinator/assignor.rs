//! Server-side assignors: given the members' subscriptions, the subscribed
//! topics' partition counts and the previous target, compute each member's
//! target assignment. Deterministic: ties go to the smaller member id.

use std::collections::{BTreeMap, BTreeSet};

use super::{Assignment, GroupError};

/// The assignor used when members ask for none.
pub const DEFAULT_ASSIGNOR: &str = "uniform";

/// The assignors this broker has.
pub const ASSIGNORS: [&str; 2] = ["uniform", "range"];

/// What an assignor sees of one member: the topics it is subscribed to.
pub type Subscriptions<'a> = BTreeMap<&'a str, BTreeSet<String>>;

/// Refuses an assignor name this broker does not have.
pub fn check_assignor(name: &str) -> Result<(), GroupError> {
    if ASSIGNORS.contains(&name) { Ok(()) } else { Err(GroupError::UnsupportedAssignor(name.to_string())) }
}

/// Runs the assignor `name` (one of [`ASSIGNORS`]).
pub fn assign(
    name: &str,
    members: &Subscriptions<'_>,
    counts: &BTreeMap<String, u32>,
    previous: &BTreeMap<String, Assignment>,
) -> BTreeMap<String, Assignment> {
    match name {
        "range" => range(members, counts),
        _ => uniform(members, counts, previous),
    }
}

/// Kafka's `uniform` assignor: every partition of a subscribed topic goes to
/// one subscribed member, the counts per member are as even as the
/// subscriptions allow, and partitions stay where they were whenever that
/// keeps the balance (a member joining takes partitions only from the
/// members above the new average; the others keep everything).
pub fn uniform(
    members: &Subscriptions<'_>,
    counts: &BTreeMap<String, u32>,
    previous: &BTreeMap<String, Assignment>,
) -> BTreeMap<String, Assignment> {
    // Eligible members of each topic.
    let mut eligible: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (member, topics) in members {
        for topic in topics {
            if counts.get(topic).is_some_and(|n| *n > 0) {
                eligible.entry(topic.as_str()).or_default().push(member);
            }
        }
    }
    let mut owner: BTreeMap<(&str, u32), &str> = BTreeMap::new();
    let mut owned: BTreeMap<&str, BTreeSet<(&str, u32)>> = members.keys().map(|m| (*m, BTreeSet::new())).collect();
    // 1. Sticky: a partition stays with its previous owner while it is
    //    subscribed to the topic.
    for (member, assignment) in previous {
        let Some((member, topics)) = members.get_key_value(member.as_str()) else { continue };
        for (topic, partitions) in assignment {
            let Some(n) = counts.get(topic) else { continue };
            if !topics.contains(topic) {
                continue;
            }
            let Some((topic, _)) = eligible.get_key_value(topic.as_str()) else { continue };
            for p in partitions.iter().filter(|p| **p < *n) {
                if owner.insert((topic, *p), member).is_none() {
                    owned.get_mut(member).expect("member").insert((topic, *p));
                }
            }
        }
    }
    // 2. Every unowned partition to the least loaded eligible member.
    for (topic, candidates) in &eligible {
        for p in 0..counts[*topic] {
            if owner.contains_key(&(topic, p)) {
                continue;
            }
            let to = least_loaded(candidates.iter().copied(), &owned).expect("an eligible member");
            owner.insert((topic, p), to);
            owned.get_mut(to).expect("member").insert((topic, p));
        }
    }
    // 3. Balance: move partitions from the most loaded member to an eligible
    //    member holding at least two fewer, until no such move exists. Each
    //    move lowers the sum of squared loads, so this ends.
    while let Some((from, tp, to)) = find_move(&owned, &eligible) {
        owned.get_mut(from).expect("member").remove(&tp);
        owned.get_mut(to).expect("member").insert(tp);
    }
    to_assignments(owned)
}

/// A partition of the most loaded member that an eligible member holding at
/// least two fewer can take (from the highest partitions, so low ones stay).
fn find_move<'a>(
    owned: &BTreeMap<&'a str, BTreeSet<(&'a str, u32)>>,
    eligible: &BTreeMap<&'a str, Vec<&'a str>>,
) -> Option<(&'a str, (&'a str, u32), &'a str)> {
    let mut by_load: Vec<&str> = owned.keys().copied().collect();
    by_load.sort_by(|a, b| owned[b].len().cmp(&owned[a].len()).then(a.cmp(b)));
    for from in by_load {
        let load = owned[from].len();
        for tp in owned[from].iter().rev() {
            let to = eligible[tp.0].iter().copied().filter(|m| owned[m].len() + 2 <= load);
            if let Some(to) = least_loaded(to, owned) {
                return Some((from, *tp, to));
            }
        }
    }
    None
}

fn least_loaded<'a>(
    candidates: impl Iterator<Item = &'a str>,
    owned: &BTreeMap<&'a str, BTreeSet<(&'a str, u32)>>,
) -> Option<&'a str> {
    candidates.min_by(|a, b| owned[a].len().cmp(&owned[b].len()).then(a.cmp(b)))
}

fn to_assignments(owned: BTreeMap<&str, BTreeSet<(&str, u32)>>) -> BTreeMap<String, Assignment> {
    owned
        .into_iter()
        .map(|(member, tps)| {
            let mut a = Assignment::new();
            for (topic, p) in tps {
                a.entry(topic.to_string()).or_default().insert(p);
            }
            (member.to_string(), a)
        })
        .collect()
}

/// Kafka's `range` assignor: per topic, its subscribed members (by id) get
/// contiguous ranges of partitions, the first ones one more when the count
/// does not divide evenly. Co-partitioned topics land together.
pub fn range(members: &Subscriptions<'_>, counts: &BTreeMap<String, u32>) -> BTreeMap<String, Assignment> {
    let mut out: BTreeMap<String, Assignment> = members.keys().map(|m| (m.to_string(), Assignment::new())).collect();
    for (topic, n) in counts {
        let subscribed: Vec<&str> = members.iter().filter(|(_, t)| t.contains(topic)).map(|(m, _)| *m).collect();
        if subscribed.is_empty() {
            continue;
        }
        let (each, extra) = (*n / subscribed.len() as u32, *n % subscribed.len() as u32);
        let mut next = 0;
        for (i, member) in subscribed.iter().enumerate() {
            let take = each + u32::from((i as u32) < extra);
            if take > 0 {
                out.get_mut(*member).expect("member").insert(topic.clone(), (next..next + take).collect());
            }
            next += take;
        }
    }
    out
}
