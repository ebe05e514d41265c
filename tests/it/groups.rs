//! Consumer groups in an in-process cluster of three brokers: partitions
//! shared and moved without ever having two owners, every record processed,
//! committed offsets resumed after a restart of the whole group, and a
//! coordinator failover under load.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tally_client::{
    Acks, Client, Consumer, ConsumerConfig, NewTopic, OffsetReset, Producer, ProducerConfig, ProducerRecord,
    RebalanceEvent, TopicPartitions,
};
use tally_proto::ErrorCode;

use crate::harness::wait_for;
use crate::replication::Cluster;

/// What the consumers did, in the order it happened.
#[derive(Debug, Clone)]
enum Event {
    Assigned(usize, Vec<(String, u32)>),
    Revoked(usize, Vec<(String, u32)>),
    /// The consumer stopped reading everything (crashed or closed).
    Stopped(usize),
}

type History = Arc<Mutex<Vec<Event>>>;
type Seen = Arc<Mutex<BTreeMap<(u32, i64), usize>>>;

fn group_config(group: &str) -> ConsumerConfig {
    let mut c = ConsumerConfig::default();
    c.group_id = Some(group.to_string());
    c.auto_offset_reset = OffsetReset::Earliest;
    c.session_timeout = Some(Duration::from_millis(2000));
    c.auto_commit_interval = Duration::from_millis(200);
    c.max_wait = Duration::from_millis(100);
    c
}

/// A group member that records what it owns and every record it reads.
struct Member {
    consumer: Arc<Consumer>,
    reader: tokio::task::JoinHandle<()>,
}

fn start_member(client: &Client, id: usize, group: &str, topic: &str, history: &History, seen: &Seen) -> Member {
    let consumer = Arc::new(Consumer::new(client.clone(), group_config(group)));
    let h = history.clone();
    consumer
        .on_rebalance(move |e| {
            let event = match e {
                RebalanceEvent::Assigned(p) => Event::Assigned(id, p.clone()),
                RebalanceEvent::Revoked(p) | RebalanceEvent::Lost(p) => Event::Revoked(id, p.clone()),
            };
            h.lock().unwrap().push(event);
        })
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let (c, seen) = (consumer.clone(), seen.clone());
    let reader = tokio::spawn(async move {
        loop {
            match c.poll().await {
                Ok(records) => {
                    let mut s = seen.lock().unwrap();
                    for r in records {
                        *s.entry((r.partition, r.offset)).or_default() += 1;
                    }
                }
                Err(e) if e.is_retriable() => {}
                Err(e) => panic!("consumer {id}: {e}"),
            }
        }
    });
    Member { consumer, reader }
}

/// Replays the history: no partition is ever owned by two consumers.
fn check_single_owner(history: &[Event]) {
    let mut owner: BTreeMap<(String, u32), usize> = BTreeMap::new();
    for (i, e) in history.iter().enumerate() {
        match e {
            Event::Assigned(c, ps) => {
                for p in ps {
                    if let Some(other) = owner.insert(p.clone(), *c) {
                        assert_eq!(other, *c, "step {i}: {p:?} given to {c} while {other} owns it: {history:#?}");
                    }
                }
            }
            Event::Revoked(c, ps) => {
                for p in ps {
                    if owner.get(p) == Some(c) {
                        owner.remove(p);
                    }
                }
            }
            Event::Stopped(c) => owner.retain(|_, o| o != c),
        }
    }
}

async fn produce(client: &Client, topic: &str, from: usize, n: usize) {
    let mut config = ProducerConfig::default();
    config.acks = Acks::All;
    let producer = Producer::new(client.clone(), config);
    let mut pending = Vec::new();
    for i in from..from + n {
        let key = format!("k{i}");
        let value = format!("v{i}");
        pending.push(producer.send(ProducerRecord::new(topic, value.as_bytes()).key(key.as_bytes())).await.unwrap());
    }
    for d in pending {
        d.await.expect("acknowledged");
    }
}

/// Every acknowledged record's (partition, offset), from the log ends.
async fn log_ends(client: &Client, topic: &str) -> BTreeMap<u32, i64> {
    let d = client.admin().describe_topic(topic).await.unwrap();
    d.partitions.iter().map(|p| (p.partition, p.high_watermark)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_group_shares_partitions_with_one_owner_each_and_resumes_from_its_commits() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path()).await;
    let client = cluster.client().await;
    let topic = "events";
    client.admin().create_topic(NewTopic { replication_factor: 3, ..NewTopic::new(topic, 12) }).await.unwrap();
    let history: History = Arc::default();
    let seen: Seen = Arc::default();
    let group = "readers";

    let mut members: Vec<Option<Member>> =
        (0..3).map(|i| Some(start_member(&client, i, group, topic, &history, &seen))).collect();
    produce(&client, topic, 0, 600).await;
    let admin = client.admin();
    let owned_by_all = |want: usize| {
        let admin = admin.clone();
        async move {
            match admin.describe_group(group).await {
                Ok(d) => {
                    d.state == "Stable"
                        && d.members.len() == want
                        && d.members
                            .iter()
                            .map(|m| m.assignment.values().map(BTreeSet::len).sum::<usize>())
                            .sum::<usize>()
                            == 12
                }
                Err(_) => false,
            }
        }
    };
    assert!(wait_for(Duration::from_secs(20), async || owned_by_all(3).await).await, "three members never settled");

    // A fourth joins: everyone ends with 3, and the others keep consuming.
    members.push(Some(start_member(&client, 3, group, topic, &history, &seen)));
    produce(&client, topic, 600, 600).await;
    assert!(wait_for(Duration::from_secs(20), async || owned_by_all(4).await).await, "four members never settled");
    let d = admin.describe_group(group).await.unwrap();
    assert!(d.members.iter().all(|m| m.assignment.values().map(BTreeSet::len).sum::<usize>() == 3), "{d:?}");

    // One stops without leaving: its partitions move after its session.
    let crashed = members[0].take().unwrap();
    crashed.reader.abort();
    drop(crashed.consumer);
    history.lock().unwrap().push(Event::Stopped(0));
    produce(&client, topic, 1200, 300).await;
    assert!(wait_for(Duration::from_secs(20), async || owned_by_all(3).await).await, "the crashed member stayed");

    // One leaves: the others take over at once.
    let leaving = members[1].take().unwrap();
    leaving.consumer.close().await.unwrap();
    leaving.reader.abort();
    history.lock().unwrap().push(Event::Stopped(1));
    assert!(wait_for(Duration::from_secs(10), async || owned_by_all(2).await).await, "the leave was not noticed");
    produce(&client, topic, 1500, 300).await;

    // Every record is read at least once.
    let ends = log_ends(&client, topic).await;
    let total: i64 = ends.values().sum();
    assert_eq!(total, 1800);
    let all_read = || {
        let s = seen.lock().unwrap();
        ends.iter().all(|(p, end)| (0..*end).all(|o| s.contains_key(&(*p, o))))
    };
    assert!(wait_for(Duration::from_secs(20), async || all_read()).await, "records were not read");

    // The whole group stops (committing on close) and starts again: each
    // partition resumes exactly at its committed offset.
    for m in members.iter_mut().filter_map(Option::take) {
        m.consumer.close().await.unwrap();
        m.reader.abort();
    }
    history.lock().unwrap().push(Event::Stopped(2));
    history.lock().unwrap().push(Event::Stopped(3));
    let committed = admin.group_offsets(group, &TopicPartitions::new()).await.unwrap();
    assert_eq!(committed.len(), 12, "{committed:?}");
    for ((t, p), c) in &committed {
        let about: Vec<&Event> = history
            .lock()
            .unwrap()
            .iter()
            .filter(|e| match e {
                Event::Assigned(_, ps) | Event::Revoked(_, ps) => ps.contains(&(t.clone(), *p)),
                Event::Stopped(_) => true,
            })
            .cloned()
            .collect::<Vec<_>>()
            .leak()
            .iter()
            .collect();
        assert_eq!(c.offset, ends[p], "partition {p}: committed {} of {}; its history {about:?}", c.offset, ends[p]);
    }
    produce(&client, topic, 1800, 120).await;
    let after: Seen = Arc::default();
    let restarted: Vec<Member> = (4..6).map(|i| start_member(&client, i, group, topic, &history, &after)).collect();
    let new_ends = log_ends(&client, topic).await;
    let caught_up = || {
        let s = after.lock().unwrap();
        new_ends.iter().all(|(p, end)| *end == ends[p] || s.contains_key(&(*p, end - 1)))
    };
    assert!(wait_for(Duration::from_secs(20), async || caught_up()).await, "the restarted group did not catch up");
    {
        let s = after.lock().unwrap();
        for (p, end) in &new_ends {
            let offsets: Vec<i64> = s.keys().filter(|(q, _)| q == p).map(|(_, o)| *o).collect();
            // Nothing before the commit is read again, and nothing after it is skipped.
            assert!(offsets.iter().all(|o| *o >= ends[p]), "partition {p} re-read below its commit: {offsets:?}");
            assert_eq!(offsets.len() as i64, end - ends[p], "partition {p}: {offsets:?}");
        }
    }
    for m in restarted {
        m.consumer.close().await.unwrap();
        m.reader.abort();
    }
    check_single_owner(&history.lock().unwrap());
    cluster.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn committed_offsets_survive_a_coordinator_failover_and_never_go_backwards() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(dir.path()).await;
    let client = cluster.client().await;
    let topic = "orders";
    client.admin().create_topic(NewTopic { replication_factor: 3, ..NewTopic::new(topic, 4) }).await.unwrap();
    let history: History = Arc::default();
    let seen: Seen = Arc::default();
    let group = "billing";
    let members: Vec<Member> = (0..2).map(|i| start_member(&client, i, group, topic, &history, &seen)).collect();
    produce(&client, topic, 0, 400).await;

    // Watch the committed offsets: they must never go backwards.
    let admin = client.admin();
    let watching = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (w, a) = (watching.clone(), admin.clone());
    let watcher = tokio::spawn(async move {
        let mut last: BTreeMap<(String, u32), i64> = BTreeMap::new();
        let mut reads = 0;
        while w.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok(now) = a.group_offsets(group, &TopicPartitions::new()).await {
                reads += 1;
                for (k, c) in now {
                    let before = last.insert(k.clone(), c.offset).unwrap_or(-1);
                    assert!(c.offset >= before, "{k:?} went back from {before} to {}", c.offset);
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        reads
    });
    assert!(
        wait_for(Duration::from_secs(20), async || {
            admin.group_offsets(group, &TopicPartitions::new()).await.is_ok_and(|o| o.len() == 4)
        })
        .await,
        "nothing was committed"
    );

    // Stop the broker leading the group's offsets partition.
    let offsets_topic = admin.describe_topic("__consumer_offsets").await.unwrap();
    let n = offsets_topic.partitions.len() as u32;
    let index = tally_proto::partitioner::partition_for_key(group.as_bytes(), n);
    let coordinator = offsets_topic.partitions[index as usize].leader.expect("a coordinator");
    cluster.stop(coordinator).await;
    produce(&client, topic, 400, 400).await;
    let ends = log_ends(&client, topic).await;
    let all_read = || {
        let s = seen.lock().unwrap();
        ends.iter().all(|(p, end)| (0..*end).all(|o| s.contains_key(&(*p, o))))
    };
    assert!(wait_for(Duration::from_secs(30), async || all_read()).await, "the group stalled after the failover");
    // The commits reach the ends under the new coordinator.
    assert!(
        wait_for(Duration::from_secs(20), async || {
            admin
                .group_offsets(group, &TopicPartitions::new())
                .await
                .is_ok_and(|o| o.iter().all(|((_, p), c)| c.offset == ends[p]))
        })
        .await,
        "commits did not reach the log ends"
    );
    watching.store(false, std::sync::atomic::Ordering::Relaxed);
    assert!(watcher.await.unwrap() > 0);
    for m in members {
        m.consumer.close().await.unwrap();
        m.reader.abort();
    }
    check_single_owner(&history.lock().unwrap());
    cluster.restart(coordinator).await;
    cluster.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_group_requests_get_kafkas_codes_and_the_broker_serves_on() {
    let dir = tempfile::tempdir().unwrap();
    let broker = crate::harness::TestBroker::start(dir.path()).await;
    let client = broker.client().await;
    let admin = client.admin();
    client.admin().create_topic(NewTopic::new("t", 2)).await.unwrap();
    let e = admin.describe_group("nobody").await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::GroupIdNotFound), "{e}");
    let e = admin.describe_group("").await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::InvalidRequest), "{e}");
    // A session outside the bounds.
    let mut config = group_config("g");
    config.session_timeout = Some(Duration::from_millis(100));
    let consumer = Consumer::new(client.clone(), config);
    consumer.subscribe(&["t"]).unwrap();
    let e = consumer.poll().await;
    let e = match e {
        Err(e) => e,
        Ok(_) => consumer.poll().await.expect_err("refused"),
    };
    assert_eq!(e.code(), Some(ErrorCode::InvalidSessionTimeout), "{e}");
    // A group with no members takes commits without a member id, and
    // refuses an unknown partition per partition.
    let offsets = BTreeMap::from([(("t".to_string(), 0), 5), (("t".to_string(), 7), 1)]);
    let e = admin.alter_group_offsets("manual", &offsets).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::UnknownTopicOrPartition), "{e}");
    let committed = admin.group_offsets("manual", &TopicPartitions::new()).await.unwrap();
    assert_eq!(committed[&("t".to_string(), 0)].offset, 5);
    // The offsets topic is the coordinator's alone.
    let producer = Producer::new(client.clone(), ProducerConfig::default());
    let d = producer.send(ProducerRecord::new("__consumer_offsets", b"x").partition(0)).await.unwrap();
    let e = d.await.unwrap_err();
    assert!(e.to_string().contains("internal"), "{e}");
    // Delete: refused while members exist, then done.
    admin.delete_group("manual").await.unwrap();
    assert_eq!(admin.describe_group("manual").await.unwrap_err().code(), Some(ErrorCode::GroupIdNotFound));
    broker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn auto_commit_and_revocation_wait_for_the_application_to_finish_what_it_was_handed() {
    let dir = tempfile::tempdir().unwrap();
    let broker = crate::harness::TestBroker::start(dir.path()).await;
    let client = broker.client().await;
    let topic = "work";
    client.admin().create_topic(NewTopic::new(topic, 2)).await.unwrap();
    let producer = Producer::new(client.clone(), ProducerConfig::default());
    for i in 0..10u32 {
        producer.send(ProducerRecord::new(topic, b"job").partition(i % 2)).await.unwrap().await.unwrap();
    }
    let group = "workers";
    let first = Consumer::new(client.clone(), group_config(group));
    first.subscribe(&[topic]).unwrap();
    let (mut handed, mut last) = (0, 0);
    while handed < 10 {
        last = first.poll().await.unwrap().len();
        handed += last;
    }
    // Still working on them: auto-commit (every 200 ms) must not commit them.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let committed = |client: Client| async move {
        client
            .admin()
            .group_offsets(group, &TopicPartitions::new())
            .await
            .unwrap()
            .values()
            .map(|c| c.offset)
            .sum::<i64>()
    };
    let early = committed(client.clone()).await;
    assert!(early <= 10 - last as i64, "committed {early}, but the last {last} records are still being processed");

    // A second member joins; the partition it is to get stays with the
    // first (which holds records of it) until the first asks for more.
    let second = Consumer::new(client.clone(), group_config(group));
    second.subscribe(&[topic]).unwrap();
    for _ in 0..8 {
        assert!(second.poll().await.unwrap().is_empty());
    }
    let owned = |c: &Consumer| c.group_assignment().map_or(0, |(_, _, o)| o.values().map(BTreeSet::len).sum::<usize>());
    assert_eq!(owned(&second), 0, "the partition moved while the first member still held its records");
    // Done: the first asks again; its records are committed, the partition moves.
    let _ = first.poll().await.unwrap();
    assert!(
        wait_for(Duration::from_secs(10), async || {
            let _ = first.poll().await;
            let _ = second.poll().await;
            owned(&second) == 1
        })
        .await,
        "the partition never moved"
    );
    // The partition the first kept is auto-committed on its own schedule.
    assert!(
        wait_for(Duration::from_secs(10), async || {
            let _ = first.poll().await;
            committed(client.clone()).await == 10
        })
        .await,
        "auto-commit never committed what the first member finished"
    );
    first.close().await.unwrap();
    second.close().await.unwrap();
    broker.stop().await.unwrap();
}
