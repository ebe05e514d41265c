//! The process-level fault test: three real `tally serve` processes behind
//! fault-injecting proxies, writers with acks=all (raw one-record requests,
//! and the batching, retrying, idempotent `Producer`) and consumers reading, while a
//! seeded nemesis injects faults and an admin task changes the topics. The
//! history checker then looks for every anomaly it knows (lost, inconsistent,
//! read-then-vanished, reordered, duplicated (no writer may store a value
//! twice: the `Producer`'s retries are deduplicated by the broker's
//! producer-state table), nonmonotonic, skipped), and
//! after healing the replicas must hold identical bytes below the high
//! watermark.
//!
//! Fault kinds (see [`Kind`]): SIGKILL a partition leader; SIGSTOP a
//! follower; SIGKILL the controller leader; cut every link of a broker; a
//! leader paused past its broker session (a zombie with requests in flight);
//! a leader cut from the other brokers while clients still reach it; a
//! one-way link (one broker's connections to another dropped, the other way
//! up); both followers of a partition paused until the ISR falls below
//! `min_insync_replicas` and the eligible leader replicas (ELR) take over,
//! then its leader killed; and overlapping faults (a follower paused, then
//! the leader killed before it resumes); and a leader cut from the
//! controller alone (Raft, heartbeats and forwarded calls; each broker dials
//! controller traffic from an address of its own, `controller_source_address`),
//! its followers still fetching from it. Even seeds use `flush = always`.
//! Meanwhile an admin task moves `min_insync_replicas` between 1 and 2,
//! grows a scratch topic, and deletes and re-creates it.
//!
//! A consumer group of two members reads the topic too, committing after
//! each poll; the checker asserts its committed offsets never go back, no
//! acknowledged commit is lost, and no offset below the final commit went
//! unread.
//!
//! Each seed's first fault is kind `seed % KINDS`, so the default seeds
//! (`1..=10`) cover every kind; later faults are drawn from the seed.
//! `TALLY_TEST_FAULT_SEEDS` (a list like `1,2,5` or a range like `1..=20`)
//! and `TALLY_TEST_FAULT_SECS` (default 6) set the seeds and how long the
//! nemesis runs for each. A long run:
//! `TALLY_TEST_FAULT_SEEDS=1..=20 TALLY_TEST_FAULT_SECS=60 cargo test --test it fault:: -- --nocapture`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::collections::BTreeMap;
use tally::child::BrokerProcess;

use tally_client::{
    Acks, Client, Consumer, ConsumerConfig, ErrorCode, NewTopic, OffsetReset, Producer, ProducerConfig, ProducerRecord,
    TopicPartitions,
};
use tally_proto::batch::RecordRef;
use tokio::sync::watch;

use crate::checker::{self, History, Outcome, Poll, Send};
use crate::proxy::Proxy;
use crate::replication::{log_bytes, read_to};

const PARTITIONS: u32 = 2;
/// Writer ids from here on are the `Producer` writers (one per partition).
const PRODUCER_WRITER: usize = 1000;
const WRITERS_PER_PARTITION: usize = 2;

/// splitmix64: small, seeded, good enough to pick faults.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.below(to - from))
    }
}

/// A free port below the kernel's ephemeral range, for a broker that must
/// listen on the same port again after a restart: an ephemeral port the OS
/// picks could meanwhile be the local end of some outgoing connection, and
/// the restart would fail with EADDRINUSE (seen under load). Ports below the
/// range are never handed to outgoing connections, and the OS still tells
/// which one is free.
fn free_port() -> u16 {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (from, to) = (low.saturating_sub(12_000).max(1024), low);
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    let mut rng = Rng(u64::from(seed) ^ u64::from(std::process::id()) << 32);
    for _ in 0..1000 {
        let port = from + rng.below(u64::from(to - from)) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {from}..{to}");
}

const ENVS: &[(&str, &str)] = &[
    ("TALLY_BROKER_SESSION_TIMEOUT_MS", "2000"),
    ("TALLY_BROKER_HEARTBEAT_INTERVAL_MS", "200"),
    ("TALLY_CONTROLLER_ELECTION_TIMEOUT_MS", "800"),
    ("TALLY_REPLICA_LAG_TIME_MAX_MS", "2000"),
    ("TALLY_REPLICA_FETCH_WAIT_MAX_MS", "200"),
    ("TALLY_GROUP_CONSUMER_MIN_SESSION_TIMEOUT_MS", "1000"),
    ("TALLY_OFFSETS_TOPIC_NUM_PARTITIONS", "3"),
];

/// The consumer group whose commits the checker follows.
const GROUP: &str = "fault-readers";
/// Its members.
const GROUP_MEMBERS: usize = 2;

/// The local address broker `id` dials its peers from (replica fetches).
fn source_of(id: u32) -> std::net::IpAddr {
    format!("127.0.0.{}", id + 1).parse().expect("an IP")
}

/// The local address broker `id` dials controller traffic from (Raft,
/// forwarded heartbeats and proposals): apart from [`source_of`], so a proxy
/// can cut the controller's links while replica fetches flow.
fn controller_source_of(id: u32) -> std::net::IpAddr {
    format!("127.0.0.{}", id + 4).parse().expect("an IP")
}

/// Three brokers, each behind its proxy (what every peer and client dials).
pub(crate) struct Cluster {
    root: PathBuf,
    listen: Vec<String>,
    proxies: Vec<Proxy>,
    voters: String,
    processes: Vec<Option<BrokerProcess>>,
    paused: Vec<bool>,
}

impl Cluster {
    pub(crate) async fn start(root: &Path) -> Cluster {
        let listen: Vec<String> = (0..3).map(|_| format!("127.0.0.1:{}", free_port())).collect();
        let mut proxies = Vec::new();
        for l in &listen {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            proxies.push(Proxy::start(listener, l.parse().unwrap()));
        }
        let voters = proxies.iter().enumerate().map(|(i, p)| format!("{}@{}", i + 1, p.address)).collect::<Vec<_>>();
        let mut cluster = Cluster {
            root: root.to_path_buf(),
            listen,
            proxies,
            voters: voters.join(","),
            processes: (0..3).map(|_| None).collect(),
            paused: vec![false; 3],
        };
        for id in 1..=3 {
            cluster.start_broker(id).await;
        }
        cluster
    }

    fn addresses(&self) -> Vec<String> {
        self.proxies.iter().map(|p| p.address.to_string()).collect()
    }

    fn dir(&self, id: u32) -> PathBuf {
        self.root.join(format!("b{id}"))
    }

    pub(crate) async fn start_broker(&mut self, id: u32) {
        let i = id as usize - 1;
        let (binary, dir, listen) = (PathBuf::from(env!("CARGO_BIN_EXE_tally")), self.dir(id), self.listen[i].clone());
        let (voters, advertised) = (self.voters.clone(), self.proxies[i].address.to_string());
        let process = tokio::task::spawn_blocking(move || {
            let node = id.to_string();
            let args =
                ["--node-id", node.as_str(), "--voters", voters.as_str(), "--advertised-addr", advertised.as_str()];
            // Each broker dials its peers from an address of its own, so a
            // proxy can refuse one broker's connections: a cut is both ways.
            let (source, controller_source) = (source_of(id).to_string(), controller_source_of(id).to_string());
            let mut envs = ENVS.to_vec();
            envs.push(("TALLY_PEER_SOURCE_ADDRESS", source.as_str()));
            envs.push(("TALLY_CONTROLLER_SOURCE_ADDRESS", controller_source.as_str()));
            BrokerProcess::start_listening(&binary, &dir, &listen, &args, &envs)
        })
        .await
        .unwrap()
        .expect("broker starts");
        self.processes[i] = Some(process);
    }

    pub(crate) fn kill(&mut self, id: u32) {
        drop(self.processes[id as usize - 1].take());
        self.paused[id as usize - 1] = false;
    }

    /// Undoes every fault: proxies healed, frozen brokers resumed, dead ones started.
    pub(crate) async fn heal(&mut self) {
        for p in &self.proxies {
            p.heal();
            for id in 1..=3 {
                p.unblock(source_of(id));
                p.unblock(controller_source_of(id));
            }
        }
        for id in 1..=3u32 {
            let i = id as usize - 1;
            if self.paused[i] {
                self.processes[i].as_ref().expect("a paused broker runs").resume();
                self.paused[i] = false;
            }
            if self.processes[i].is_none() {
                self.start_broker(id).await;
            }
        }
    }

    pub(crate) fn stop_all(&mut self) {
        for p in self.processes.iter_mut().filter_map(Option::take) {
            let _ = p.stop();
        }
    }
}

/// The leader and replicas of every partition, and the controller leader.
async fn roles(client: &Client) -> Option<(Vec<(Option<u32>, Vec<u32>)>, Option<u32>)> {
    let states = client.admin().partition_states().await.ok()?;
    let parts = states.into_iter().filter(|(t, _)| t == "faults").map(|(_, p)| (p.leader, p.replicas)).collect();
    let controller = client.admin().describe_cluster().await.ok()?.leader;
    Some((parts, controller))
}

/// The fault kinds the nemesis picks from.
const KINDS: u64 = 10;

impl Cluster {
    pub(crate) fn pause(&mut self, id: u32) -> Option<()> {
        self.processes[id as usize - 1].as_ref()?.pause();
        self.paused[id as usize - 1] = true;
        Some(())
    }

    pub(crate) fn resume(&mut self, id: u32) -> Option<()> {
        self.processes[id as usize - 1].as_ref()?.resume();
        self.paused[id as usize - 1] = false;
        Some(())
    }

    /// Drops `from`'s connections to `to` (and refuses new ones); `to`'s
    /// connections to `from` stay up.
    fn drop_link(&self, from: u32, to: u32) {
        self.proxies[to as usize - 1].block(source_of(from));
        self.proxies[to as usize - 1].block(controller_source_of(from));
    }

    fn restore_link(&self, from: u32, to: u32) {
        self.proxies[to as usize - 1].unblock(source_of(from));
        self.proxies[to as usize - 1].unblock(controller_source_of(from));
    }
}

/// One fault of kind `kind`, then its undoing. Returns what it did.
async fn one_fault(cluster: &mut Cluster, client: &Client, rng: &mut Rng, kind: u64) -> Option<String> {
    let _ = client.refresh_metadata(&[]).await;
    let (parts, controller) = roles(client).await?;
    let partition = rng.below(u64::from(PARTITIONS)) as usize;
    let (leader, replicas) = parts.get(partition)?.clone();
    let followers: Vec<u32> = replicas.iter().copied().filter(|r| Some(*r) != leader).collect();
    match kind {
        0 => {
            let leader = leader?;
            cluster.kill(leader);
            tokio::time::sleep(rng.millis(300, 2000)).await;
            cluster.start_broker(leader).await;
            Some(format!("SIGKILL leader {leader} of partition {partition}, restarted"))
        }
        1 => {
            let follower = *followers.get(rng.below(followers.len().max(1) as u64) as usize)?;
            cluster.pause(follower)?;
            tokio::time::sleep(rng.millis(500, 3000)).await;
            cluster.resume(follower)?;
            Some(format!("SIGSTOP follower {follower} of partition {partition}, SIGCONT"))
        }
        2 => {
            let controller = controller?;
            cluster.kill(controller);
            tokio::time::sleep(rng.millis(200, 1500)).await;
            cluster.start_broker(controller).await;
            Some(format!("SIGKILL controller leader {controller}, restarted"))
        }
        3 => {
            // Every link of one broker: nobody reaches it, it reaches nobody.
            let victim = rng.below(3) as usize;
            let sources = [source_of(victim as u32 + 1), controller_source_of(victim as u32 + 1)];
            cluster.proxies[victim].cut();
            for (p, source) in cluster.proxies.iter().flat_map(|p| sources.iter().map(move |s| (p, *s))) {
                p.block(source);
            }
            tokio::time::sleep(rng.millis(1000, 3500)).await;
            cluster.proxies[victim].heal();
            for (p, source) in cluster.proxies.iter().flat_map(|p| sources.iter().map(move |s| (p, *s))) {
                p.unblock(source);
            }
            Some(format!("cut every link of broker {}, healed", victim + 1))
        }
        4 => {
            // Past the session (2 s): fenced and replaced while frozen, it
            // wakes with requests in flight and a lease that ran out.
            let leader = leader?;
            cluster.pause(leader)?;
            tokio::time::sleep(rng.millis(3000, 5000)).await;
            cluster.resume(leader)?;
            Some(format!("SIGSTOP leader {leader} of partition {partition} past its session, SIGCONT"))
        }
        5 => {
            // The other brokers lose it both ways; clients still reach it.
            let leader = leader?;
            let others: Vec<u32> = (1..=3).filter(|b| *b != leader).collect();
            for o in &others {
                cluster.drop_link(leader, *o);
                cluster.drop_link(*o, leader);
            }
            tokio::time::sleep(rng.millis(2500, 5000)).await;
            for o in &others {
                cluster.restore_link(leader, *o);
                cluster.restore_link(*o, leader);
            }
            Some(format!("cut leader {leader} of partition {partition} from the other brokers (clients reach it)"))
        }
        6 => {
            let from = rng.below(3) as u32 + 1;
            let to = (from + rng.below(2) as u32) % 3 + 1;
            cluster.drop_link(from, to);
            tokio::time::sleep(rng.millis(1000, 4000)).await;
            cluster.restore_link(from, to);
            Some(format!("one-way link: broker {from}'s connections to {to} dropped, healed"))
        }
        7 => {
            // Both followers stop: past the lag time the ISR shrinks below
            // min ISR 2 and they enter the ELR; then the leader dies and an
            // eligible replica must take over without losing a record.
            let leader = leader?;
            for f in &followers {
                cluster.pause(*f)?;
            }
            tokio::time::sleep(rng.millis(2500, 4000)).await;
            cluster.kill(leader);
            for f in &followers {
                cluster.resume(*f)?;
            }
            tokio::time::sleep(rng.millis(1000, 2500)).await;
            cluster.start_broker(leader).await;
            Some(format!(
                "SIGSTOP followers {followers:?} of partition {partition} (ISR below min ISR), SIGKILL leader {leader}, SIGCONT, restarted"
            ))
        }
        9 => {
            // Controller traffic alone: the leader's Raft, heartbeats and
            // forwarded calls are cut both ways, replica fetches flow. Past
            // its session it is fenced and replaced while its followers can
            // still fetch from it (and move its high watermark), so its lease
            // must end its leadership before the new leader's starts.
            let leader = leader?;
            let controller_links = |cluster: &Cluster, block: bool| {
                for other in (1..=3).filter(|b| *b != leader) {
                    let (to_other, to_leader) =
                        (&cluster.proxies[other as usize - 1], &cluster.proxies[leader as usize - 1]);
                    if block {
                        to_other.block(controller_source_of(leader));
                        to_leader.block(controller_source_of(other));
                    } else {
                        to_other.unblock(controller_source_of(leader));
                        to_leader.unblock(controller_source_of(other));
                    }
                }
            };
            controller_links(cluster, true);
            tokio::time::sleep(rng.millis(2500, 5000)).await;
            // Asked of another broker: the cut one still has its old image.
            let other = cluster.proxies[leader as usize % 3].address.to_string();
            let asked = Client::builder().bootstrap([other]).request_timeout(Duration::from_secs(2)).connect().await;
            let during = match asked {
                Ok(c) => roles(&c).await.and_then(|(parts, _)| parts.get(partition).map(|p| p.0)),
                Err(_) => None,
            };
            controller_links(cluster, false);
            Some(format!(
                "cut the controller links of leader {leader} of partition {partition} (replica fetches flow; \
                 leader before healing {during:?}), healed"
            ))
        }
        _ => {
            // Overlapping: a follower is still frozen when the leader dies.
            let leader = leader?;
            let follower = *followers.get(rng.below(followers.len().max(1) as u64) as usize)?;
            cluster.pause(follower)?;
            tokio::time::sleep(rng.millis(300, 1500)).await;
            cluster.kill(leader);
            tokio::time::sleep(rng.millis(300, 1500)).await;
            cluster.start_broker(leader).await;
            tokio::time::sleep(rng.millis(200, 1000)).await;
            cluster.resume(follower)?;
            Some(format!(
                "overlapping: SIGSTOP follower {follower}, then SIGKILL leader {leader} of partition {partition}, restarted, SIGCONT"
            ))
        }
    }
}

/// Admin changes while the nemesis runs: `min_insync_replicas` of the
/// checked topic between 1 and 2, a scratch topic grown, deleted and created
/// again. Returns what was asked and how it ended.
async fn admin_changes(client: Client, mut stop: watch::Receiver<bool>, seed: u64) -> Vec<String> {
    let mut rng = Rng(seed ^ 0xad31);
    let mut done = Vec::new();
    let mut scratch = 1;
    let mut step = 0u64;
    loop {
        let pause = rng.millis(800, 2500);
        if tokio::time::timeout(pause, stop.changed()).await.is_ok() {
            return done;
        }
        let admin = client.admin();
        let (what, outcome) = match step % 4 {
            0 | 2 => {
                let min_isr = if step.is_multiple_of(4) { "1" } else { "2" };
                let set = std::collections::BTreeMap::from([("min_insync_replicas".to_string(), min_isr.to_string())]);
                (
                    format!("faults min_insync_replicas={min_isr}"),
                    admin.alter_topic_configs("faults", set, vec![]).await,
                )
            }
            1 => {
                scratch += 1;
                (format!("scratch to {scratch} partitions"), admin.create_partitions("scratch", scratch).await)
            }
            _ => {
                let deleted = admin.delete_topic("scratch").await;
                scratch = 1;
                let created = admin.create_topic(NewTopic::new("scratch", 1)).await;
                ("scratch deleted and created again".to_string(), deleted.and(created))
            }
        };
        done.push(format!("{what}: {}", outcome.map_or_else(|e| format!("error {e}"), |()| "ok".into())));
        step += 1;
    }
}

/// Writes values of its own to `partition` with acks=all until `stop`.
async fn writer(client: Client, partition: u32, w: usize, stop: watch::Receiver<bool>, sends: Arc<Mutex<Vec<Send>>>) {
    let pc = client.partition_client("faults", partition);
    for n in 0.. {
        if *stop.borrow() {
            return;
        }
        let value = format!("p{partition}-w{w}-{n}");
        let record = RecordRef { timestamp: now_ms(), value: Some(value.as_bytes()), ..Default::default() };
        let outcome = match pc.produce_records(&[record], Acks::All).await {
            Ok(offset) => Outcome::Acked(offset),
            // Refused before the append: it was never stored. (Not
            // NOT_LEADER_OR_FOLLOWER: an acks=all wait that ends on a
            // leadership change answers it after the append, so the record
            // may survive on the new leader.)
            Err(e) if e.code() == Some(ErrorCode::NotEnoughReplicas) => Outcome::Failed,
            Err(_) => Outcome::Unknown,
        };
        let failed = !matches!(outcome, Outcome::Acked(_));
        let writer = partition as usize * WRITERS_PER_PARTITION + w;
        sends.lock().unwrap().push(Send { partition, value, outcome, writer, may_repeat: false });
        if failed {
            let _ = client.refresh_metadata(&["faults".to_string()]).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Writes values of its own to `partition` through an idempotent
/// `Producer` with acks=all (batching, retrying with the same sequence
/// numbers, up to five requests in flight, up to 32 deliveries
/// outstanding, about one record a millisecond) until `stop`, then waits
/// for every delivery. Its values may not be stored twice: the checker
/// counts any duplicate.
async fn producer_writer(client: Client, partition: u32, stop: watch::Receiver<bool>, sends: Arc<Mutex<Vec<Send>>>) {
    let mut config = ProducerConfig::default();
    config.acks = Acks::All;
    config.linger = Duration::from_millis(2);
    // Bounded, so a partition that never heals fails the test instead of hanging it.
    config.delivery_timeout = Duration::from_secs(60);
    let producer = Producer::new(client, config);
    assert!(producer.is_idempotent(), "the default producer with acks=all is idempotent");
    let writer = PRODUCER_WRITER + partition as usize;
    let mut pending = std::collections::VecDeque::new();
    let settle = |value: String, result: Result<tally_client::RecordMetadata, tally_client::DeliveryError>| {
        let outcome = match result {
            Ok(meta) => {
                assert_eq!(meta.partition, partition, "delivered to the partition it was sent to");
                Outcome::Acked(meta.offset)
            }
            // Failed for good after retries: an earlier try may have been stored.
            Err(_) => Outcome::Unknown,
        };
        sends.lock().unwrap().push(Send { partition, value, outcome, writer, may_repeat: false });
    };
    for n in 0.. {
        if *stop.borrow() {
            break;
        }
        let value = format!("p{partition}-producer-{n}");
        match producer.send(ProducerRecord::new("faults", value.as_bytes()).partition(partition)).await {
            Ok(delivery) => pending.push_back((value, delivery)),
            // Never queued, so never stored.
            Err(_) => sends.lock().unwrap().push(Send {
                partition,
                value,
                outcome: Outcome::Failed,
                writer,
                may_repeat: false,
            }),
        }
        if pending.len() >= 32
            && let Some((value, delivery)) = pending.pop_front()
        {
            settle(value, delivery.await);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    for (value, delivery) in pending {
        settle(value, delivery.await);
    }
    producer.close().await;
}

/// Reads `partition` from 0 until `stop` and it has reached `end` (set at
/// the end), recording every poll.
async fn reader(client: Client, partition: u32, stop: watch::Receiver<Option<i64>>, polls: Arc<Mutex<Vec<Poll>>>) {
    let pc = client.partition_client("faults", partition);
    let mut position = 0;
    loop {
        if stop.borrow().is_some_and(|end| position >= end) {
            return;
        }
        match pc.fetch(position, 1 << 20, Duration::from_millis(200)).await {
            Ok(fetched) => {
                let mut records = Vec::new();
                for batch in &fetched.batches {
                    for r in batch.records().expect("records") {
                        let r = r.expect("record");
                        let offset = batch.header().base_offset() + i64::from(r.offset_delta);
                        let value = String::from_utf8(r.value.expect("a value").to_vec()).expect("utf-8");
                        records.push((offset, value));
                    }
                }
                if let Some((last, _)) = records.last() {
                    position = last + 1;
                    polls.lock().unwrap().push(Poll { consumer: partition as usize, partition, records });
                }
            }
            Err(_) => {
                let _ = client.refresh_metadata(&["faults".to_string()]).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// A member of [`GROUP`]: reads what the group gives it and commits, after
/// each poll, the offset after the last record it was handed.
async fn group_member(
    client: Client,
    id: usize,
    stop: watch::Receiver<bool>,
    polls: Arc<Mutex<Vec<Poll>>>,
    commits: Arc<Mutex<Vec<(u32, i64)>>>,
) {
    let mut config = ConsumerConfig::default();
    config.group_id = Some(GROUP.to_string());
    config.enable_auto_commit = false;
    config.auto_offset_reset = OffsetReset::Earliest;
    config.session_timeout = Some(Duration::from_secs(3));
    config.max_wait = Duration::from_millis(200);
    let consumer = Consumer::new(client, config);
    consumer.subscribe(&["faults"]).expect("subscribe");
    // What this member last committed per partition. Each round it commits
    // the position of every partition it owns that moved since: a commit
    // that fails (the coordinator moving) is thus tried again, and the
    // position is always its reading of its current ownership (a partition
    // lost and regained starts again at the group's committed offset), never
    // an offset left from an earlier ownership, which committed now could
    // move the group back (last writer wins, in Kafka's protocol as here).
    let mut last_committed: BTreeMap<u32, i64> = BTreeMap::new();
    while !*stop.borrow() {
        let records = match consumer.poll().await {
            Ok(records) => records,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Vec::new()
            }
        };
        let mut handed: BTreeMap<u32, Vec<(i64, String)>> = BTreeMap::new();
        for r in records {
            let value = String::from_utf8(r.value.as_deref().unwrap_or_default().to_vec()).expect("utf-8");
            handed.entry(r.partition).or_default().push((r.offset, value));
        }
        {
            let mut polls = polls.lock().unwrap();
            for (partition, records) in handed {
                polls.push(Poll { consumer: 100 + id, partition, records });
            }
        }
        let owned = consumer.group_assignment().map(|(_, _, o)| o).unwrap_or_default();
        let offsets: BTreeMap<(String, u32), i64> = owned
            .get("faults")
            .into_iter()
            .flatten()
            .filter_map(|p| consumer.position("faults", *p).map(|position| (*p, position)))
            .filter(|(p, position)| last_committed.get(p) != Some(position))
            .map(|(p, position)| (("faults".to_string(), p), position))
            .collect();
        if !offsets.is_empty() && consumer.commit_offsets(&offsets).await.is_ok() {
            commits.lock().unwrap().extend(offsets.iter().map(|((_, p), o)| (*p, *o)));
            last_committed.extend(offsets.iter().map(|((_, p), o)| (*p, *o)));
        }
    }
    let _ = consumer.close().await;
}

/// The group's committed offsets of `faults`, by partition.
async fn group_offsets(client: &Client) -> Option<BTreeMap<u32, i64>> {
    let offsets = client.admin().group_offsets(GROUP, &TopicPartitions::new()).await.ok()?;
    Some(offsets.into_iter().filter(|((t, _), _)| t == "faults").map(|((_, p), c)| (p, c.offset)).collect())
}

fn now_ms() -> i64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    i64::try_from(since.as_millis()).unwrap()
}

pub(crate) async fn client_for(cluster: &Cluster) -> Client {
    Client::builder().bootstrap(cluster.addresses()).request_timeout(Duration::from_secs(3)).connect().await.unwrap()
}

/// Waits until every partition has all three replicas in sync and its high
/// watermark at its log end; returns each partition's high watermark.
async fn settled(client: &Client) -> Option<Vec<i64>> {
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut last = None;
    while Instant::now() < deadline {
        let _ = client.refresh_metadata(&[]).await;
        let described = client.admin().describe_topic("faults").await;
        last = Some(format!("{described:?}"));
        if let Ok(d) = described {
            let done = d
                .partitions
                .iter()
                .all(|p| p.isr.len() == 3 && p.high_watermark >= 0 && p.high_watermark == p.log_end_offset);
            if done {
                return Some(d.partitions.iter().map(|p| p.high_watermark).collect());
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("not settled: {}", last.unwrap_or_default());
    None
}

async fn run_seed(seed: u64, nemesis_for: Duration) {
    let root = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(root.path()).await;
    let client = client_for(&cluster).await;
    let flush = if seed.is_multiple_of(2) { "always" } else { "os" };
    let mut topic = NewTopic::new("faults", PARTITIONS).config("min_insync_replicas", "2").config("flush", flush);
    topic.replication_factor = 3;
    let mut created = Err(None);
    for _ in 0..100 {
        match client.admin().create_topic(topic.clone()).await {
            Ok(()) => {
                created = Ok(());
                break;
            }
            Err(e) if e.code() == Some(ErrorCode::TopicAlreadyExists) => {
                created = Ok(());
                break;
            }
            Err(e) => created = Err(Some(e)),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    created.unwrap_or_else(|e| panic!("seed {seed}: cannot create the topic: {e:?}"));
    assert!(settled(&client).await.is_some(), "seed {seed}: the topic never got three in-sync replicas");

    let sends = Arc::new(Mutex::new(Vec::new()));
    let polls = Arc::new(Mutex::new(Vec::new()));
    let (stop_writers, writers_stop) = watch::channel(false);
    let mut writers = Vec::new();
    for partition in 0..PARTITIONS {
        for w in 0..WRITERS_PER_PARTITION {
            let c = client_for(&cluster).await;
            writers.push(tokio::spawn(writer(c, partition, w, writers_stop.clone(), sends.clone())));
        }
        let c = client_for(&cluster).await;
        writers.push(tokio::spawn(producer_writer(c, partition, writers_stop.clone(), sends.clone())));
    }
    let mut readers = Vec::new();
    let (end_tx, end_rx): (Vec<_>, Vec<_>) = (0..PARTITIONS).map(|_| watch::channel(None::<i64>)).unzip();
    for (partition, end) in (0..PARTITIONS).zip(end_rx) {
        let c = client_for(&cluster).await;
        readers.push(tokio::spawn(reader(c, partition, end, polls.clone())));
    }

    let group_polls = Arc::new(Mutex::new(Vec::new()));
    let commits = Arc::new(Mutex::new(Vec::new()));
    let (stop_group, group_stop) = watch::channel(false);
    let mut members = Vec::new();
    for id in 0..GROUP_MEMBERS {
        let c = client_for(&cluster).await;
        members.push(tokio::spawn(group_member(c, id, group_stop.clone(), group_polls.clone(), commits.clone())));
    }
    let snapshots = Arc::new(Mutex::new(Vec::new()));
    let watcher = {
        let (c, snapshots, mut stop) = (client_for(&cluster).await, snapshots.clone(), group_stop.clone());
        tokio::spawn(async move {
            while !*stop.borrow() {
                if let Some(s) = group_offsets(&c).await {
                    snapshots.lock().unwrap().push(s);
                }
                let _ = tokio::time::timeout(Duration::from_millis(300), stop.changed()).await;
            }
        })
    };

    let _ = client.admin().create_topic(NewTopic::new("scratch", 1)).await;
    let (stop_admin, admin_stop) = watch::channel(false);
    let admin = tokio::spawn(admin_changes(client_for(&cluster).await, admin_stop, seed));
    let mut rng = Rng(seed);
    let mut faults = Vec::new();
    let began = Instant::now();
    // The first fault's kind comes from the seed, so a few seeds cover them all.
    let mut kind = seed % KINDS;
    while began.elapsed() < nemesis_for || faults.is_empty() {
        tokio::time::sleep(rng.millis(200, 800)).await;
        if let Some(done) = one_fault(&mut cluster, &client, &mut rng, kind).await {
            faults.push(done);
            kind = rng.below(KINDS);
        } else if began.elapsed() > nemesis_for + Duration::from_secs(30) {
            break;
        }
    }
    let _ = stop_admin.send(true);
    let admin_changes = admin.await.unwrap();
    cluster.heal().await;
    let _ = stop_writers.send(true);
    for w in writers {
        w.await.unwrap();
    }
    let Some(ends) = settled(&client).await else {
        let exits: Vec<_> = cluster.processes.iter_mut().map(|p| p.as_mut().map(BrokerProcess::exited)).collect();
        panic!("seed {seed}: the cluster never healed; faults: {faults:?}; exits {exits:?}");
    };
    for (tx, end) in end_tx.iter().zip(&ends) {
        let _ = tx.send(Some(*end));
    }
    for r in readers {
        tokio::time::timeout(Duration::from_secs(60), r).await.expect("readers reach the end").unwrap();
    }
    // The group reads everything and commits the ends.
    let caught_up = crate::harness::wait_for(Duration::from_secs(60), async || {
        group_offsets(&client).await.is_some_and(|c| (0..PARTITIONS).all(|p| c.get(&p) == Some(&ends[p as usize])))
    })
    .await;
    let _ = stop_group.send(true);
    for m in members {
        tokio::time::timeout(Duration::from_secs(30), m).await.expect("group members stop").unwrap();
    }
    watcher.await.unwrap();
    let mut final_committed = None;
    for _ in 0..100 {
        final_committed = group_offsets(&client).await;
        if final_committed.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let final_committed = final_committed.expect("the group's offsets can be read");
    assert!(caught_up, "seed {seed}: the group never committed the ends {ends:?}: {final_committed:?}");
    let mut history = History {
        group_polls: std::mem::take(&mut *group_polls.lock().unwrap()),
        commits: std::mem::take(&mut *commits.lock().unwrap()),
        committed_snapshots: std::mem::take(&mut *snapshots.lock().unwrap()),
        final_committed,
        ..History::default()
    };
    for (partition, end) in (0..PARTITIONS).zip(&ends) {
        history.final_logs.insert(partition, read_to(&client, "faults", partition, *end).await);
    }
    history.sends = std::mem::take(&mut *sends.lock().unwrap());
    history.polls = std::mem::take(&mut *polls.lock().unwrap());
    let count = |f: fn(&Outcome) -> bool| history.sends.iter().filter(|s| f(&s.outcome)).count();
    let acked = count(|o| matches!(o, Outcome::Acked(_)));
    let (failed, unknown) = (count(|o| *o == Outcome::Failed), count(|o| *o == Outcome::Unknown));
    let through_producer = history.sends.iter().filter(|s| s.writer >= PRODUCER_WRITER).count();
    let producer_acked =
        history.sends.iter().filter(|s| s.writer >= PRODUCER_WRITER && matches!(s.outcome, Outcome::Acked(_))).count();
    let report = checker::check(&history);
    eprintln!(
        "fault test seed {seed}: {} faults, {} sends ({acked} acked, {failed} failed, {unknown} indeterminate; \
         {through_producer} through the Producer, {producer_acked} of them acked), {} polls, \
         final ends {ends:?}; lost {}, inconsistent {}, vanished {}, nonmonotonic {}, skipped {}, duplicates {}, \
         failed-but-stored {}, reordered {}; group: {} commits, {} snapshots, commit back {}, commit lost {}, \
         skipped below commit {}",
        faults.len(),
        history.sends.len(),
        history.polls.len(),
        report.lost.len(),
        report.inconsistent.len(),
        report.vanished.len(),
        report.nonmonotonic.len(),
        report.skipped.len(),
        report.duplicates.len(),
        report.failed_but_stored.len(),
        report.reordered.len(),
        history.commits.len(),
        history.committed_snapshots.len(),
        report.commit_went_back.len(),
        report.commit_lost.len(),
        report.skipped_below_commit.len(),
    );
    eprintln!("fault test seed {seed}: faults {faults:?}");
    eprintln!("fault test seed {seed}: admin changes {admin_changes:?}");
    cluster.stop_all();
    // Replicas in sync hold the same bytes below the high watermark.
    for (partition, end) in (0..PARTITIONS).zip(&ends) {
        let logs: Vec<Vec<u8>> =
            (1..=3).map(|id| log_bytes(&cluster.dir(id).join(format!("faults-{partition}")), *end as u64)).collect();
        assert!(
            logs[0] == logs[1] && logs[1] == logs[2],
            "seed {seed}: replicas of partition {partition} differ below the high watermark"
        );
    }
    // The raw writers never retry a send (a retry is a new value), and the
    // Producer is idempotent (a retry is recognised by its sequence
    // numbers), so any value stored twice is a bug. Every writer's
    // acknowledgements must follow its send order.
    assert!(report.is_valid(), "seed {seed}: anomalies {report:#?}\nfaults: {faults:#?}");
    assert!(!faults.is_empty(), "seed {seed}: no fault was injected");
    assert!(acked > 0, "seed {seed}: nothing was acknowledged");
    assert!(producer_acked > 0, "seed {seed}: nothing sent through the Producer was acknowledged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acknowledged_record_is_lost_under_a_seeded_nemesis() {
    let seeds = parse_seeds(&std::env::var("TALLY_TEST_FAULT_SEEDS").unwrap_or_else(|_| "1..=10".into()));
    let secs: u64 =
        std::env::var("TALLY_TEST_FAULT_SECS").map_or(6, |s| s.parse().expect("TALLY_TEST_FAULT_SECS is a number"));
    for seed in seeds {
        run_seed(seed, Duration::from_secs(secs)).await;
    }
}

/// `1,2,5` or `1..=20` (or both: `1..=3,7`).
fn parse_seeds(spec: &str) -> Vec<u64> {
    let number = |s: &str| s.trim().parse::<u64>().expect("TALLY_TEST_FAULT_SEEDS: numbers, `a..=b` ranges, commas");
    let mut seeds = Vec::new();
    for part in spec.split(',').filter(|p| !p.trim().is_empty()) {
        match part.split_once("..=") {
            Some((from, to)) => seeds.extend(number(from)..=number(to)),
            None => seeds.push(number(part)),
        }
    }
    seeds
}

#[test]
fn seeds_are_listed_or_ranged() {
    assert_eq!(parse_seeds("1..=3,7"), vec![1, 2, 3, 7]);
    assert_eq!(parse_seeds("4"), vec![4]);
}
