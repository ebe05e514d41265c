//! Consumer group benchmark, against three in-process brokers (RF 3) on
//! this machine: `cargo bench --bench groups`.
//!
//! Prints:
//! - rebalance: a group of 3 over 64 partitions while a producer writes to
//!   every partition; a 4th member joins, then one dies (no leave), then one
//!   leaves: the time until every partition has an owner again, and the
//!   longest time a member that kept partitions went without a record,
//!   against the same figure before the rebalance (target: no longer);
//! - commits per second at acks=all, one commit at a time and 16 at once;
//! - end-to-end latency (produce to `poll`) of a group member against a
//!   manually assigned consumer reading the same partitions (target: within
//!   5%).
//!
//! TALLY_BENCH_QUICK=1 shortens the measured windows.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tally_broker::BrokerConfig;
use tally_client::{
    Acks, Client, Consumer, ConsumerConfig, NewTopic, OffsetReset, Producer, ProducerConfig, ProducerRecord, SeekTo,
};

fn quick() -> bool {
    std::env::var("TALLY_BENCH_QUICK").is_ok_and(|v| v == "1")
}

struct Cluster {
    addresses: Vec<String>,
    stops: Vec<tokio::sync::oneshot::Sender<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

async fn start_cluster() -> Cluster {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut listeners = Vec::new();
    for _ in 0..3 {
        listeners.push(tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind"));
    }
    let addresses: Vec<String> = listeners.iter().map(|l| l.local_addr().expect("addr").to_string()).collect();
    let voters = addresses.iter().enumerate().map(|(i, a)| format!("{}@{a}", i + 1)).collect::<Vec<_>>().join(",");
    let (mut stops, mut tasks) = (Vec::new(), Vec::new());
    for (i, listener) in listeners.into_iter().enumerate() {
        let config = BrokerConfig {
            node_id: i as u32 + 1,
            data_dir: dir.path().join(format!("b{}", i + 1)),
            voters: Some(voters.clone()),
            group_consumer_min_session_timeout_ms: 1000,
            offsets_topic_num_partitions: 10,
            ..BrokerConfig::default()
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        stops.push(tx);
        tasks.push(tokio::spawn(async move {
            if let Err(e) = tally_broker::run(config, listener, async move {
                let _ = rx.await;
            })
            .await
            {
                eprintln!("broker {}: {e}", i + 1);
            }
        }));
    }
    Cluster { addresses, stops, tasks, _dir: dir }
}

async fn connect(c: &Cluster) -> Client {
    let client = Client::builder().bootstrap(c.addresses.clone()).connect().await.expect("connect");
    // Every broker registered and unfenced.
    for _ in 0..200 {
        if client
            .admin()
            .describe_cluster()
            .await
            .is_ok_and(|d| d.brokers.len() == 3 && d.brokers.iter().all(|b| !b.fenced))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    client
}

/// When each member last got a record, and the longest gap it saw.
#[derive(Default)]
struct Gaps {
    last: Option<Instant>,
    longest: Duration,
}

struct Member {
    consumer: Arc<Consumer>,
    reader: tokio::task::JoinHandle<()>,
    gaps: Arc<Mutex<Gaps>>,
}

fn member(client: &Client, group: &str, topic: &str, session: Duration) -> Member {
    let mut config = ConsumerConfig::default();
    config.group_id = Some(group.to_string());
    config.auto_offset_reset = OffsetReset::Latest;
    config.session_timeout = Some(session);
    config.max_wait = Duration::from_millis(100);
    let consumer = Arc::new(Consumer::new(client.clone(), config));
    consumer.subscribe(&[topic]).expect("subscribe");
    let gaps = Arc::new(Mutex::new(Gaps::default()));
    let (c, g) = (consumer.clone(), gaps.clone());
    let reader = tokio::spawn(async move {
        loop {
            if let Ok(records) = c.poll().await
                && !records.is_empty()
            {
                let now = Instant::now();
                let mut g = g.lock().unwrap();
                if let Some(last) = g.last {
                    g.longest = g.longest.max(now - last);
                }
                g.last = Some(now);
            }
        }
    });
    Member { consumer, reader, gaps }
}

fn reset_gaps(members: &[Option<Member>]) {
    for m in members.iter().flatten() {
        *m.gaps.lock().unwrap() = Gaps::default();
    }
}

fn longest_gap(members: &[Option<Member>], skip: Option<usize>) -> Duration {
    members
        .iter()
        .enumerate()
        .filter(|(i, _)| Some(*i) != skip)
        .filter_map(|(_, m)| m.as_ref())
        .map(|m| m.gaps.lock().unwrap().longest)
        .max()
        .unwrap_or_default()
}

/// Waits until `want` members own all `partitions`; the time it took.
async fn until_owned(client: &Client, group: &str, partitions: usize, want: usize) -> Duration {
    let start = Instant::now();
    loop {
        if let Ok(d) = client.admin().describe_group(group).await {
            let owned: usize = d.members.iter().map(|m| m.assignment.values().map(|p| p.len()).sum::<usize>()).sum();
            if d.members.len() == want && owned == partitions && d.state == "Stable" {
                return start.elapsed();
            }
        }
        if start.elapsed() > Duration::from_secs(120) {
            panic!("the group did not settle with {want} members");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Writes to every partition of `topic`, round robin, until stopped.
fn background_producer(
    client: &Client,
    topic: &str,
    partitions: u32,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    let producer = Producer::new(client.clone(), ProducerConfig::default());
    let topic = topic.to_string();
    tokio::spawn(async move {
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            for p in 0..partitions {
                let value = i.to_le_bytes();
                let _ = producer.send(ProducerRecord::new(&topic, &value).partition(p)).await;
            }
            i += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        producer.flush().await;
    })
}

async fn rebalance(client: &Client) {
    let (topic, group, partitions) = ("rebalance", "rebalance-bench", 64u32);
    client
        .admin()
        .create_topic(
            NewTopic { replication_factor: 3, ..NewTopic::new(topic, partitions) }.config("segment_bytes", "4194304"),
        )
        .await
        .expect("create");
    let stop = Arc::new(AtomicBool::new(false));
    let writer = background_producer(client, topic, partitions, stop.clone());
    let session = Duration::from_secs(3);
    let mut members: Vec<Option<Member>> = (0..3).map(|_| Some(member(client, group, topic, session))).collect();
    let settled = until_owned(client, group, partitions as usize, 3).await;
    println!("  3 members join an empty group:     every partition owned after {:>7.1} ms", ms(settled));
    tokio::time::sleep(Duration::from_secs(2)).await;
    reset_gaps(&members);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let baseline = longest_gap(&members, None);
    println!("  steady state:                      longest gap between records of a member {:>7.1} ms", ms(baseline));

    reset_gaps(&members);
    members.push(Some(member(client, group, topic, session)));
    let joined = until_owned(client, group, partitions as usize, 4).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    println!(
        "  a 4th member joins:                every partition owned after {:>7.1} ms; members that kept partitions: longest gap {:>7.1} ms",
        ms(joined),
        ms(longest_gap(&members, Some(3)))
    );

    reset_gaps(&members);
    let dead = members[0].take().expect("member");
    dead.reader.abort();
    let died = Instant::now();
    drop(dead.consumer);
    let _ = until_owned(client, group, partitions as usize, 3).await;
    println!(
        "  a member dies (session {:>5} ms):  every partition owned after {:>7.1} ms; the others' longest gap {:>7.1} ms",
        session.as_millis(),
        ms(died.elapsed()),
        ms(longest_gap(&members, None))
    );

    reset_gaps(&members);
    let leaving = members[1].take().expect("member");
    let left = Instant::now();
    leaving.consumer.close().await.expect("close");
    leaving.reader.abort();
    let _ = until_owned(client, group, partitions as usize, 2).await;
    println!(
        "  a member leaves:                   every partition owned after {:>7.1} ms; the others' longest gap {:>7.1} ms",
        ms(left.elapsed()),
        ms(longest_gap(&members, None))
    );
    stop.store(true, Ordering::Relaxed);
    let _ = writer.await;
    for m in members.into_iter().flatten() {
        let _ = m.consumer.close().await;
        m.reader.abort();
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn commits(client: &Client) {
    let (topic, group) = ("commits", "commit-bench");
    client.admin().create_topic(NewTopic { replication_factor: 3, ..NewTopic::new(topic, 16) }).await.expect("create");
    let admin = client.admin();
    let secs = if quick() { 2 } else { 5 };
    for parallel in [1usize, 16] {
        let start = Instant::now();
        let deadline = start + Duration::from_secs(secs);
        let mut tasks = Vec::new();
        for w in 0..parallel {
            let admin = admin.clone();
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < deadline {
                    let offsets = BTreeMap::from([((topic.to_string(), (w % 16) as u32), n as i64)]);
                    admin.alter_group_offsets(group, &offsets).await.expect("commit");
                    n += 1;
                }
                n
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.expect("committer");
        }
        let rate = total as f64 / start.elapsed().as_secs_f64();
        println!("  {parallel:>2} committer(s): {rate:>8.0} commits/s at acks=all (RF 3, min ISR 2)");
    }
}

async fn latency(client: &Client) {
    let (topic, partitions) = ("latency", 8u32);
    client
        .admin()
        .create_topic(NewTopic { replication_factor: 3, ..NewTopic::new(topic, partitions) })
        .await
        .expect("create");
    let count = if quick() { 2_000 } else { 10_000 };
    for grouped in [false, true] {
        let mut config = ConsumerConfig::default();
        config.max_wait = Duration::from_millis(500);
        if grouped {
            config.group_id = Some("latency-bench".into());
            config.auto_offset_reset = OffsetReset::Latest;
        }
        let consumer = Arc::new(Consumer::new(client.clone(), config));
        if grouped {
            consumer.subscribe(&[topic]).expect("subscribe");
            let _ = until_owned(client, "latency-bench", partitions as usize, 1).await;
        } else {
            for p in 0..partitions {
                // Right after the topic's creation, its leaders may not be known yet.
                let mut attempts = 0;
                while let Err(e) = consumer.assign(topic, p, SeekTo::End).await {
                    attempts += 1;
                    assert!(attempts < 100, "assign: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let epoch = Instant::now();
        let samples = Arc::new(Mutex::new(Vec::with_capacity(count)));
        let (c, s) = (consumer.clone(), samples.clone());
        let reader = tokio::spawn(async move {
            while s.lock().unwrap().len() < count {
                if let Ok(records) = c.poll().await {
                    let now = epoch.elapsed().as_micros() as u64;
                    let mut s = s.lock().unwrap();
                    for r in records {
                        let sent =
                            u64::from_le_bytes(r.value.as_deref().unwrap_or(&[0; 8])[..8].try_into().unwrap_or([0; 8]));
                        s.push(now.saturating_sub(sent));
                    }
                }
            }
        });
        let mut pc = ProducerConfig::default();
        pc.acks = Acks::All;
        pc.linger = Duration::ZERO;
        let producer = Producer::new(client.clone(), pc);
        for i in 0..count {
            let sent = (epoch.elapsed().as_micros() as u64).to_le_bytes();
            let d =
                producer.send(ProducerRecord::new(topic, &sent).partition(i as u32 % partitions)).await.expect("send");
            if i % 100 == 99 {
                let _ = d.await;
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        producer.flush().await;
        let _ = tokio::time::timeout(Duration::from_secs(30), reader).await;
        let mut s = samples.lock().unwrap().clone();
        s.sort_unstable();
        let pct = |q: f64| s.get(((s.len() as f64 * q) as usize).min(s.len().saturating_sub(1))).copied().unwrap_or(0);
        println!(
            "  {:<22} p50 {:>6} µs  p99 {:>6} µs  ({} records)",
            if grouped { "group member:" } else { "manual assignment:" },
            pct(0.5),
            pct(0.99),
            s.len()
        );
        let _ = consumer.close().await;
    }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    runtime.block_on(async {
        let cluster = start_cluster().await;
        let client = connect(&cluster).await;
        println!("rebalance (3 brokers, RF 3, 64 partitions, a producer writing to each every ~5 ms):");
        rebalance(&client).await;
        println!("offset commits:");
        commits(&client).await;
        println!("end-to-end latency, 8 partitions, acks=all, one record per 0.5 ms:");
        latency(&client).await;
        for stop in cluster.stops {
            let _ = stop.send(());
        }
        for t in cluster.tasks {
            let _ = t.await;
        }
    });
}
