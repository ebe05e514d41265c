//! Replication in an in-process cluster of three brokers: acks=all across a
//! leader change, byte-identical replicas, ISR shrink and rejoin.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use tally_broker::BrokerConfig;
use tally_client::{Acks, Client, NewTopic, OffsetSpec};
use tally_proto::ErrorCode;
use tally_proto::batch::RecordRef;

use crate::harness::{TestBroker, test_config, wait_for};

/// Three brokers, all voters, each restartable on its address and data.
pub struct Cluster {
    pub configs: Vec<BrokerConfig>,
    pub addresses: Vec<String>,
    pub brokers: Vec<Option<TestBroker>>,
}

impl Cluster {
    pub async fn start(root: &Path) -> Cluster {
        Self::start_with(root, |_| {}).await
    }

    /// Three brokers whose configurations `adjust` changes after the test
    /// defaults.
    pub async fn start_with(root: &Path, adjust: impl Fn(&mut BrokerConfig)) -> Cluster {
        let mut listeners = Vec::new();
        for _ in 0..3 {
            listeners.push(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap());
        }
        let addresses: Vec<String> = listeners.iter().map(|l| l.local_addr().unwrap().to_string()).collect();
        let voters = addresses.iter().enumerate().map(|(i, a)| format!("{}@{a}", i + 1)).collect::<Vec<_>>().join(",");
        let configs: Vec<BrokerConfig> = (0..3)
            .map(|i| {
                let mut config = test_config(&root.join(format!("b{}", i + 1)));
                config.node_id = i as u32 + 1;
                config.voters = Some(voters.clone());
                config.broker_heartbeat_interval_ms = 200;
                config.broker_session_timeout_ms = 2000;
                config.controller_election_timeout_ms = 500;
                config.replica_lag_time_max_ms = 2000;
                config.replica_fetch_wait_max_ms = 200;
                config.leader_imbalance_check_interval_ms = 500;
                adjust(&mut config);
                config
            })
            .collect();
        let starting = configs.iter().cloned().zip(listeners).map(|(c, l)| TestBroker::start_on(c, l));
        let brokers = futures_util::future::join_all(starting).await.into_iter().map(Some).collect();
        Cluster { configs, addresses, brokers }
    }

    /// A client that knows every broker.
    pub async fn client(&self) -> Client {
        Client::builder().bootstrap(self.addresses.clone()).connect().await.expect("connect")
    }

    /// Stops broker `id` cleanly (it hands its leaderships over first).
    pub async fn stop(&mut self, id: u32) {
        let b = self.brokers[id as usize - 1].take().expect("running");
        b.stop().await.expect("clean stop");
    }

    /// Starts broker `id` again on its address and data directory.
    pub async fn restart(&mut self, id: u32) {
        let i = id as usize - 1;
        assert!(self.brokers[i].is_none());
        let b = TestBroker::start_at(self.configs[i].clone(), &self.addresses[i]).await;
        self.brokers[i] = Some(b);
    }

    pub async fn stop_all(mut self) {
        for id in 1..=3 {
            if self.brokers[id as usize - 1].is_some() {
                self.stop(id).await;
            }
        }
    }
}

/// The partition's leader, ISR and high watermark (from the leader) now,
/// retried for a while (a stopped broker may be the one asked first).
async fn leader_and_isr(client: &Client, topic: &str) -> Option<(u32, Vec<u32>, i64)> {
    for _ in 0..100 {
        if let Some(found) = try_leader_and_isr(client, topic).await {
            return Some(found);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

async fn try_leader_and_isr(client: &Client, topic: &str) -> Option<(u32, Vec<u32>, i64)> {
    // Metadata first: it finds a broker that answers, which admin calls use.
    client.refresh_metadata(&[topic.to_string()]).await.ok()?;
    let d = client.admin().describe_topic(topic).await.ok()?;
    let p = d.partitions.first()?;
    let mut isr = p.isr.clone();
    isr.sort();
    let hw = client.partition_client(topic, 0).list_offset(OffsetSpec::Latest).await.ok()?.unwrap_or(0);
    Some((p.leader?, isr, hw))
}

/// Produces one record with acks=all; each attempt sends a value of its
/// own, so the log shows which attempts were stored. Returns the value the
/// broker acknowledged, or the last error after `attempts`.
async fn produce_acked(client: &Client, topic: &str, n: usize, attempts: usize) -> Result<String, tally_client::Error> {
    let pc = client.partition_client(topic, 0);
    let mut last = None;
    for attempt in 0..attempts {
        let value = format!("r{n}-a{attempt}");
        // Today's time: records from 1970 would be past retention at once.
        let record = RecordRef { timestamp: now_ms(), value: Some(value.as_bytes()), ..Default::default() };
        match pc.produce_records(&[record], Acks::All).await {
            Ok(_) => return Ok(value),
            Err(e) if e.is_retriable() => {
                last = Some(e);
                let _ = client.refresh_metadata(&[topic.to_string()]).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.expect("at least one attempt"))
}

/// Every value of partition 0 in offset order, read from its leader up to
/// the high watermark.
async fn read_all(client: &Client, topic: &str) -> Vec<(i64, String)> {
    let end = client.partition_client(topic, 0).list_offset(OffsetSpec::Latest).await.unwrap().unwrap_or(0);
    read_to(client, topic, 0, end).await
}

/// Every value of `partition` below `end`, with its offset, from its leader.
pub async fn read_to(client: &Client, topic: &str, partition: u32, end: i64) -> Vec<(i64, String)> {
    let pc = client.partition_client(topic, partition);
    let mut out = Vec::new();
    let mut offset = 0;
    while offset < end {
        // Leaderships may still move (back to preferred replicas): ride it out.
        let mut attempts = 0;
        let fetched = loop {
            match pc.fetch(offset, 1 << 20, Duration::from_millis(100)).await {
                Ok(fetched) => break fetched,
                Err(e) if e.is_retriable() && attempts < 100 => {
                    attempts += 1;
                    let _ = client.refresh_metadata(&[topic.to_string()]).await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("a read from the leader: {e:?}"),
            }
        };
        for batch in &fetched.batches {
            for r in batch.records().unwrap() {
                let r = r.unwrap();
                let o = batch.header().base_offset() + i64::from(r.offset_delta);
                out.push((o, String::from_utf8(r.value.unwrap().to_vec()).unwrap()));
                offset = o + 1;
            }
        }
    }
    out
}

/// The bytes of a partition log below `end`, read from its directory.
pub fn log_bytes(dir: &Path, end: u64) -> Vec<u8> {
    let config = tally_broker::storage::LogConfig::default();
    let log = tally_broker::storage::Log::open(dir, config, std::sync::Arc::new(tally_broker::storage::SystemClock))
        .expect("open log");
    let read = log
        .read(tally_broker::storage::Offset(0), u64::MAX, tally_broker::storage::Offset(end))
        .unwrap_or_else(|e| panic!("reading {} below {end} (log end {}): {e}", dir.display(), log.log_end_offset()));
    read.chunks.iter().flat_map(|c| c.iter().copied()).collect()
}

fn now_ms() -> i64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    i64::try_from(since.as_millis()).unwrap()
}

fn rf3(name: &str) -> NewTopic {
    let mut t = NewTopic::new(name, 1).config("min_insync_replicas", "2");
    t.replication_factor = 3;
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_records_survive_the_leader_stopping_and_the_replicas_end_identical() {
    let root = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(root.path()).await;
    let client = cluster.client().await;
    client.admin().create_topic(rf3("replicated")).await.unwrap();
    let full = wait_for(Duration::from_secs(20), async || {
        leader_and_isr(&client, "replicated").await.is_some_and(|(_, isr, _)| isr == [1, 2, 3])
    })
    .await;
    assert!(full, "all three replicas in sync");
    // A consumer reads along from the start, through the leader move.
    let (stop_consumer, stop_at) = tokio::sync::watch::channel(None::<i64>);
    let consumer = {
        let client = cluster.client().await;
        tokio::spawn(async move {
            let mut config = tally_client::ConsumerConfig::default();
            config.max_wait = Duration::from_millis(100);
            let consumer = tally_client::Consumer::new(client, config);
            consumer.assign("replicated", 0, tally_client::SeekTo::Beginning).await.unwrap();
            let mut seen: Vec<(i64, String)> = Vec::new();
            let done = |seen: &Vec<(i64, String)>| {
                stop_at.borrow().is_some_and(|end| seen.last().map_or(0, |(o, _)| o + 1) >= end)
            };
            while !done(&seen) {
                if let Ok(records) = consumer.poll().await {
                    for r in records {
                        seen.push((r.offset, String::from_utf8(r.value.unwrap().to_vec()).unwrap()));
                    }
                }
            }
            seen
        })
    };
    let mut acked = Vec::new();
    for n in 0..50 {
        acked.push(produce_acked(&client, "replicated", n, 1).await.expect("acks=all with a full ISR"));
    }
    let (first_leader, _, hw) = leader_and_isr(&client, "replicated").await.unwrap();
    assert_eq!(hw, 50, "acks=all answered only once the high watermark passed each record");
    // The leader stops mid-stream; producing carries on at the next leader.
    // The producer runs until it is told how many acknowledgements are
    // enough (at most 1000 records).
    let streamed = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let (enough_tx, enough) = tokio::sync::watch::channel(None::<usize>);
    let producing = {
        let (client, streamed) = (cluster.client().await, streamed.clone());
        tokio::spawn(async move {
            for n in 50..1050 {
                let value = produce_acked(&client, "replicated", n, 200).await.expect("acked by the next leader");
                let count = {
                    let mut streamed = streamed.lock().unwrap();
                    streamed.push(value);
                    streamed.len()
                };
                if enough.borrow().is_some_and(|enough| count >= enough) {
                    return;
                }
            }
            panic!("1000 records and still not told to stop");
        })
    };
    let acked_count = || streamed.lock().unwrap().len();
    let streaming = wait_for(Duration::from_secs(20), async || acked_count() >= 10).await;
    assert!(streaming, "records are acknowledged by the first leader");
    assert!(!producing.is_finished(), "the producer is mid-stream");
    cluster.stop(first_leader).await;
    // The stopped leader acknowledges nothing more: whatever is acknowledged
    // from here on was acknowledged by another broker.
    let at_stop = acked_count();
    enough_tx.send(Some(at_stop + 20)).unwrap();
    tokio::time::timeout(Duration::from_secs(60), producing)
        .await
        .expect("acknowledgements continue after the leader stopped")
        .unwrap();
    acked.extend(streamed.lock().unwrap().drain(..));
    let (second_leader, isr, _) = leader_and_isr(&client, "replicated").await.unwrap();
    assert_ne!(second_leader, first_leader);
    assert!(!isr.contains(&first_leader), "the stopped broker left the ISR: {isr:?}");
    // Every acknowledged value is there exactly once, offsets without gaps.
    let log = read_all(&client, "replicated").await;
    for (i, (offset, _)) in log.iter().enumerate() {
        assert_eq!(*offset, i as i64, "offsets are dense");
    }
    let mut count: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, v) in &log {
        *count.entry(v.as_str()).or_default() += 1;
    }
    assert!(count.values().all(|c| *c == 1), "a value at two offsets");
    let lost: Vec<&String> = acked.iter().filter(|v| !count.contains_key(v.as_str())).collect();
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
    // In the order they were acknowledged.
    let position: BTreeMap<&str, usize> = log.iter().enumerate().map(|(i, (_, v))| (v.as_str(), i)).collect();
    assert!(acked.windows(2).all(|w| position[w[0].as_str()] < position[w[1].as_str()]), "acknowledged order kept");
    // The consumer followed the leader: it read the whole log, in order,
    // without a gap or a repeat.
    let end = log.len() as i64;
    let caught_up = wait_for(Duration::from_secs(20), async || {
        leader_and_isr(&client, "replicated").await.is_some_and(|(_, _, hw)| hw == end)
    })
    .await;
    assert!(caught_up);
    stop_consumer.send(Some(end)).unwrap();
    let seen =
        tokio::time::timeout(Duration::from_secs(20), consumer).await.expect("the consumer reaches the end").unwrap();
    assert_eq!(seen, log, "the consumer read exactly the log across the leader move");
    // The stopped broker comes back, catches up and rejoins the ISR.
    cluster.restart(first_leader).await;
    let rejoined = wait_for(Duration::from_secs(30), async || {
        leader_and_isr(&client, "replicated").await.is_some_and(|(_, isr, _)| isr == [1, 2, 3])
    })
    .await;
    assert!(rejoined, "the restarted broker rejoined the ISR");
    let back = wait_for(Duration::from_secs(30), async || {
        leader_and_isr(&client, "replicated").await.is_some_and(|(leader, _, _)| leader == first_leader)
    })
    .await;
    assert!(back, "the leadership moved back to the preferred replica once it was in sync");
    let (_, _, hw) = leader_and_isr(&client, "replicated").await.unwrap();
    cluster.stop_all().await;
    let logs: Vec<Vec<u8>> =
        (1..=3).map(|id| log_bytes(&root.path().join(format!("b{id}/replicated-0")), hw as u64)).collect();
    assert!(!logs[0].is_empty());
    assert_eq!(logs[0], logs[1], "brokers 1 and 2 hold the same bytes below the high watermark");
    assert_eq!(logs[1], logs[2], "brokers 2 and 3 hold the same bytes below the high watermark");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_all_needs_min_insync_replicas_and_stopped_followers_rejoin() {
    let root = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(root.path()).await;
    let client = cluster.client().await;
    client.admin().create_topic(rf3("shrink")).await.unwrap();
    let full = wait_for(Duration::from_secs(20), async || {
        leader_and_isr(&client, "shrink").await.is_some_and(|(_, isr, _)| isr == [1, 2, 3])
    })
    .await;
    assert!(full);
    let (leader, _, _) = leader_and_isr(&client, "shrink").await.unwrap();
    let followers: Vec<u32> = (1..=3).filter(|b| *b != leader).collect();
    for f in &followers {
        cluster.stop(*f).await;
    }
    let alone = wait_for(Duration::from_secs(20), async || {
        leader_and_isr(&client, "shrink").await.is_some_and(|(l, isr, _)| l == leader && isr == [leader])
    })
    .await;
    assert!(alone, "the ISR shrank to the leader");
    let pc = client.partition_client("shrink", 0);
    let record = RecordRef { timestamp: 1, value: Some(b"x"), ..Default::default() };
    let e = pc.produce_records(&[record], Acks::All).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotEnoughReplicas), "{e}");
    let offset = pc.produce_records(&[record], Acks::Leader).await.expect("acks=1 still works");
    assert_eq!(offset, 0, "the refused acks=all batch was not stored");
    let (_, _, hw) = leader_and_isr(&client, "shrink").await.unwrap();
    assert_eq!(hw, 0, "below min_insync_replicas nothing becomes committed");
    for f in &followers {
        cluster.restart(*f).await;
    }
    let back = wait_for(Duration::from_secs(30), async || {
        leader_and_isr(&client, "shrink").await.is_some_and(|(_, isr, hw)| isr == [1, 2, 3] && hw == 1)
    })
    .await;
    assert!(back, "both followers rejoined and the acks=1 record became committed");
    pc.produce_records(&[record], Acks::All).await.expect("acks=all works again");
    cluster.stop_all().await;
}

/// In-process brokers behind proxies (what every peer and client dials),
/// each connecting to its peers from an address of its own (127.0.0.<id+1>),
/// so all of one broker's links can be cut, or only those that reach it.
/// Brokers 1 to 3 are the controller voters, any more are observers.
struct IsolatableCluster {
    proxies: Vec<crate::proxy::Proxy>,
    listen: Vec<String>,
    brokers: Vec<TestBroker>,
}

impl IsolatableCluster {
    async fn start(root: &Path) -> IsolatableCluster {
        Self::start_n(root, 3, |_| {}).await
    }

    /// `count` brokers (the first three vote), each config passed through
    /// `adjust` before it starts.
    async fn start_n(root: &Path, count: usize, adjust: impl Fn(&mut BrokerConfig)) -> IsolatableCluster {
        let mut listeners = Vec::new();
        let mut proxies = Vec::new();
        for _ in 0..count {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let p = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            proxies.push(crate::proxy::Proxy::start(p, l.local_addr().unwrap()));
            listeners.push(l);
        }
        let listen = listeners.iter().map(|l| l.local_addr().unwrap().to_string()).collect();
        let voters = proxies
            .iter()
            .take(3)
            .enumerate()
            .map(|(i, p)| format!("{}@{}", i + 1, p.address))
            .collect::<Vec<_>>()
            .join(",");
        let starting = listeners.into_iter().enumerate().map(|(i, l)| {
            let mut config = test_config(&root.join(format!("b{}", i + 1)));
            config.node_id = i as u32 + 1;
            config.voters = Some(voters.clone());
            config.advertised_address = Some(proxies[i].address.to_string());
            config.peer_source_address = Some(format!("127.0.0.{}", i + 2));
            config.broker_heartbeat_interval_ms = 200;
            config.broker_session_timeout_ms = 2000;
            config.controller_election_timeout_ms = 500;
            config.replica_lag_time_max_ms = 2000;
            config.replica_fetch_wait_max_ms = 200;
            adjust(&mut config);
            TestBroker::start_on(config, l)
        });
        let brokers = futures_util::future::join_all(starting).await;
        IsolatableCluster { proxies, listen, brokers }
    }

    fn source(id: u32) -> std::net::IpAddr {
        format!("127.0.0.{}", id + 1).parse().unwrap()
    }

    /// Cuts every link of broker `id`: nobody reaches it, it reaches nobody.
    fn isolate(&self, id: u32) {
        self.proxies[id as usize - 1].cut();
        for p in &self.proxies {
            p.block(Self::source(id));
        }
    }

    fn heal(&self, id: u32) {
        self.proxies[id as usize - 1].heal();
        for p in &self.proxies {
            p.unblock(Self::source(id));
        }
    }

    async fn client_without(&self, id: u32) -> Client {
        let bootstrap: Vec<String> = self
            .proxies
            .iter()
            .enumerate()
            .filter(|(i, _)| *i as u32 + 1 != id)
            .map(|(_, p)| p.address.to_string())
            .collect();
        Client::builder().bootstrap(bootstrap).request_timeout(Duration::from_secs(3)).connect().await.unwrap()
    }
}

/// One produce to partition 0 of `isolated` straight to a broker's own
/// listener (past its proxy).
async fn produce_direct(address: &str, acks: tally_proto::v1::Acks, value: &str) -> (i32, String) {
    produce_direct_to(address, "isolated", 0, acks, value).await
}

/// One produce straight to a broker's own listener (past its proxy): the
/// partition's error code (-1 when unreachable) and message.
async fn produce_direct_to(
    address: &str,
    topic: &str,
    partition: u32,
    acks: tally_proto::v1::Acks,
    value: &str,
) -> (i32, String) {
    use tally_proto::v1 as pb;
    // A broker that cannot be reached answers UNAVAILABLE below.
    let mut raw = crate::harness::raw_client(address);
    let mut b = tally_proto::batch::BatchBuilder::new();
    b.push(&RecordRef { timestamp: now_ms(), value: Some(value.as_bytes()), ..Default::default() });
    let request = pb::ProduceRequest {
        acks: acks as i32,
        timeout_ms: 1000,
        topics: vec![pb::TopicProduceData {
            name: topic.into(),
            partitions: vec![pb::PartitionProduceData {
                partition,
                records: vec![b.finish()],
                expected_end_offset: None,
            }],
        }],
    };
    match raw.produce(request).await {
        Ok(r) => {
            let p = &r.into_inner().topics[0].partitions[0];
            (p.error_code, p.error_message.clone())
        }
        Err(status) => (-1, status.to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_leader_stops_acknowledging_and_the_majority_elects_another_without_losing_a_record() {
    use tally_proto::v1::Acks as WireAcks;
    let root = tempfile::tempdir().unwrap();
    let cluster = IsolatableCluster::start(root.path()).await;
    let client = cluster.client_without(0).await;
    let mut topic = NewTopic::new("isolated", 1).config("min_insync_replicas", "2");
    topic.replication_factor = 3;
    client.admin().create_topic(topic).await.unwrap();
    let full = wait_for(Duration::from_secs(20), async || {
        leader_and_isr(&client, "isolated").await.is_some_and(|(_, isr, _)| isr == [1, 2, 3])
    })
    .await;
    assert!(full);
    let mut acked = Vec::new();
    for n in 0..20 {
        acked.push(produce_acked(&client, "isolated", n, 1).await.expect("acks=all before the cut"));
    }
    let (old, _, _) = leader_and_isr(&client, "isolated").await.unwrap();
    let direct = cluster.listen[old as usize - 1].clone();
    cluster.isolate(old);
    // A client that still reaches the old leader gets no acks=all answer...
    let mut zombie_writes = Vec::new();
    for n in 0..3 {
        let value = format!("zombie-all-{n}");
        let (code, message) = produce_direct(&direct, WireAcks::All, &value).await;
        assert_ne!(code, 0, "an isolated leader acknowledged acks=all: {message}");
        zombie_writes.push(value);
    }
    // ...and once its session runs out it stops taking even acks=1.
    let mut n = 0;
    let stopped = wait_for(Duration::from_secs(10), async || {
        n += 1;
        let value = format!("zombie-one-{n}");
        let (code, _) = produce_direct(&direct, WireAcks::Leader, &value).await;
        zombie_writes.push(value);
        code == ErrorCode::NotLeaderOrFollower as i32 || code == ErrorCode::LeaderNotAvailable as i32
    })
    .await;
    assert!(stopped, "the isolated broker stopped leading");
    // The majority elected another leader and takes writes.
    let client = cluster.client_without(old).await;
    let moved = wait_for(Duration::from_secs(20), async || {
        leader_and_isr(&client, "isolated").await.is_some_and(|(leader, _, _)| leader != old)
    })
    .await;
    assert!(moved, "the majority elected a new leader");
    for n in 20..40 {
        acked.push(produce_acked(&client, "isolated", n, 100).await.expect("acks=all on the majority side"));
    }
    cluster.heal(old);
    let client = cluster.client_without(0).await;
    let rejoined = wait_for(Duration::from_secs(30), async || {
        leader_and_isr(&client, "isolated").await.is_some_and(|(_, isr, _)| isr == [1, 2, 3])
    })
    .await;
    assert!(rejoined, "the old leader rejoined the ISR after healing");
    let log = read_all(&client, "isolated").await;
    let values: Vec<&str> = log.iter().map(|(_, v)| v.as_str()).collect();
    for v in &acked {
        assert_eq!(values.iter().filter(|x| **x == v.as_str()).count(), 1, "{v} once");
    }
    // The cut reaches open connections a moment after `isolate` returns, so
    // the first zombie write may reach a follower and, unacknowledged, live
    // on in the next leader's log (as in Kafka). Nothing the isolated leader
    // took after that may: no zombie write sits after the majority's records.
    let majority_start = values.iter().position(|v| *v == acked[20].as_str()).expect("majority records");
    for v in &zombie_writes {
        let at: Vec<usize> = values.iter().enumerate().filter(|(_, x)| **x == v.as_str()).map(|(i, _)| i).collect();
        assert!(at.len() <= 1, "{v} twice");
        assert!(at.iter().all(|&i| i < majority_start), "{v}, written to the isolated leader, outlived the election");
    }
    let (_, _, hw) = leader_and_isr(&client, "isolated").await.unwrap();
    for b in cluster.brokers {
        b.stop().await.unwrap();
    }
    let logs: Vec<Vec<u8>> =
        (1..=3).map(|id| log_bytes(&root.path().join(format!("b{id}/isolated-0")), hw as u64)).collect();
    assert!(logs[0] == logs[1] && logs[1] == logs[2], "the replicas hold the same bytes below the HW");
}

/// True when broker `id` is registered and fenced, as the cluster seen
/// through `client` says.
async fn is_fenced(client: &Client, id: u32) -> Option<bool> {
    let cluster = client.admin().describe_cluster().await.ok()?;
    cluster.brokers.iter().find(|b| b.id == id).map(|b| b.fenced)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_whose_metadata_stops_while_its_heartbeats_get_out_stops_leading_and_is_not_unfenced_stale() {
    use tally_proto::v1::Acks as WireAcks;
    let session = Duration::from_millis(2000);
    let root = tempfile::tempdir().unwrap();
    // Broker 4 observes the metadata log (a Raft learner): it keeps its
    // leader's address while the log stops reaching it. Followers never lag
    // out of the ISR here, so its partition can move to the other replica.
    let cluster = IsolatableCluster::start_n(root.path(), 4, |c| c.replica_lag_time_max_ms = 60_000).await;
    let client = cluster.client_without(0).await;
    let mut topic = NewTopic::new("stale", 4);
    topic.replication_factor = 2;
    client.admin().create_topic(topic).await.unwrap();
    let mut led = None;
    let found = wait_for(Duration::from_secs(20), async || {
        let Ok(d) = client.admin().describe_topic("stale").await else { return false };
        led = d
            .partitions
            .iter()
            .find(|p| p.leader == Some(4) && p.isr.len() == 2)
            .map(|p| (p.partition, p.replicas.iter().copied().find(|r| *r != 4).unwrap()));
        led.is_some()
    })
    .await;
    assert!(found, "broker 4 leads a partition with both replicas in sync");
    let (partition, other) = led.unwrap();
    let direct = cluster.listen[3].clone();
    let mut n = 0;
    let mut produce_at_4 = async || {
        n += 1;
        produce_direct_to(&direct, "stale", partition, WireAcks::Leader, &format!("at-4-{n}")).await
    };
    let mut last = None;
    let leading = wait_for(Duration::from_secs(20), async || {
        last = Some(produce_at_4().await);
        last.as_ref().is_some_and(|(code, _)| *code == 0)
    })
    .await;
    assert!(leading, "broker 4 takes acks=1 writes as leader: {last:?}");

    // Nothing reaches broker 4 any more (the metadata log, fetches, clients
    // through its proxy); what it sends (heartbeats, proposals) gets out.
    cluster.proxies[3].cut();
    let client = cluster.client_without(4).await;
    // The metadata log moves on without it.
    client.admin().create_topic(NewTopic::new("unseen", 1)).await.unwrap();
    // Its heartbeats are answered, but its image is older than what the
    // controller had committed: its lease runs out within a session.
    let committed = std::time::Instant::now();
    let stopped = wait_for(session + Duration::from_millis(1000), async || {
        let (code, message) = produce_at_4().await;
        last = Some((code, message));
        code == ErrorCode::NotLeaderOrFollower as i32 || code == ErrorCode::LeaderNotAvailable as i32
    })
    .await;
    assert!(stopped, "broker 4 leads on with a stale image {:?} after the commit: {last:?}", committed.elapsed());
    // Behind for a session, it asks to be fenced, and its partition moves.
    let moved = wait_for(Duration::from_secs(20), async || {
        if is_fenced(&client, 4).await != Some(true) {
            return false;
        }
        let Ok(d) = client.admin().describe_topic("stale").await else { return false };
        d.partitions.iter().any(|p| p.partition == partition && p.leader == Some(other))
    })
    .await;
    assert!(moved, "broker 4 fenced and its partition led by {other}");
    // Its heartbeats still arrive, but its image predates its own fencing:
    // it is not unfenced and does not lead, for as long as the cut lasts
    // (watched for two sessions).
    let watch_until = std::time::Instant::now() + 2 * session;
    while std::time::Instant::now() < watch_until {
        let (code, message) = produce_at_4().await;
        assert_ne!(code, 0, "broker 4 took a write with an image older than its fencing: {message}");
        assert_ne!(is_fenced(&client, 4).await, Some(false), "broker 4 unfenced with a stale image");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Healed, it catches up, is unfenced, and follows the new leader.
    cluster.proxies[3].heal();
    let back = wait_for(Duration::from_secs(20), async || is_fenced(&client, 4).await == Some(false)).await;
    assert!(back, "broker 4 unfenced once caught up");
    let follows =
        wait_for(Duration::from_secs(10), async || produce_at_4().await.0 == ErrorCode::NotLeaderOrFollower as i32)
            .await;
    assert!(follows, "broker 4 no longer leads the partition that moved");
    for b in cluster.brokers {
        b.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_voter_whose_data_directory_was_wiped_is_refused_with_the_reason() {
    let root = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(root.path()).await;
    cluster.stop(3).await;
    let dir = cluster.configs[2].data_dir.clone();
    std::fs::remove_dir_all(&dir).unwrap();
    let listener = tokio::net::TcpListener::bind(&cluster.addresses[2]).await.unwrap();
    let outcome = tally_broker::run(cluster.configs[2].clone(), listener, std::future::pending::<()>()).await;
    let e = outcome.expect_err("a wiped voter must not join");
    assert!(e.to_string().contains("wiped"), "{e}");
    assert!(
        !dir.join("__cluster_metadata/cluster.json").exists(),
        "the refusal leaves nothing that hides it next time"
    );
    // The two others go on, and a first start of a whole fresh cluster is not refused (Cluster::start above).
    let client = cluster.client().await;
    let created = wait_for(Duration::from_secs(20), async || {
        match client.admin().create_topic(NewTopic::new("after", 1)).await {
            Ok(()) => true,
            Err(e) => e.code() == Some(ErrorCode::TopicAlreadyExists),
        }
    })
    .await;
    assert!(created, "the majority still works");
    cluster.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_is_not_a_voter_follows_the_metadata_log_and_hosts_partitions() {
    let root = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(root.path()).await;
    let mut config = test_config(&root.path().join("b4"));
    config.node_id = 4;
    config.voters = cluster.configs[0].voters.clone();
    config.broker_heartbeat_interval_ms = 200;
    config.broker_session_timeout_ms = 2000;
    config.controller_election_timeout_ms = 500;
    config.replica_fetch_wait_max_ms = 200;
    let observer = TestBroker::start_with(config.clone()).await;
    let client = cluster.client().await;
    let active = wait_for(Duration::from_secs(20), async || {
        client.admin().describe_cluster().await.is_ok_and(|c| c.brokers.iter().any(|b| b.id == 4 && !b.fenced))
    })
    .await;
    assert!(active, "the observer registered and was unfenced");
    let status = client.admin().describe_cluster().await.unwrap();
    assert_eq!(status.voters.len(), 3, "it does not vote");
    // Topics spread over it, and it follows the image: it leads partitions
    // and replicates others.
    let mut topic = NewTopic::new("four", 4);
    topic.replication_factor = 2;
    client.admin().create_topic(topic).await.unwrap();
    let d = client.admin().describe_topic("four").await.unwrap();
    assert!(d.partitions.iter().any(|p| p.leader == Some(4)), "{d:?}");
    let partition = d.partitions.iter().find(|p| p.leader == Some(4)).unwrap().partition;
    let pc = client.partition_client("four", partition);
    // The observer opens the partition once it applies the new image, which
    // may be a moment after the controller committed it: until then it
    // answers UNKNOWN_TOPIC_OR_PARTITION, which a producer retries.
    let record = RecordRef { timestamp: now_ms(), value: Some(b"x"), ..Default::default() };
    let mut last = None;
    let produced = wait_for(Duration::from_secs(20), async || match pc.produce_records(&[record], Acks::All).await {
        Ok(_) => true,
        Err(e) if e.is_retriable() => {
            last = Some(e);
            false
        }
        Err(e) => panic!("acks=all at the observer's partition: {e}"),
    })
    .await;
    assert!(produced, "acks=all at the observer's partition: {last:?}");
    // It answers metadata itself.
    let direct = observer.client().await;
    assert!(direct.admin().list_topics().await.unwrap().iter().any(|t| t.name == "four"));
    // Restarted, it follows again.
    let address = observer.address.clone();
    observer.stop().await.unwrap();
    let observer = TestBroker::start_at(config, &address).await;
    let back = wait_for(Duration::from_secs(20), async || {
        client.admin().describe_cluster().await.is_ok_and(|c| c.brokers.iter().any(|b| b.id == 4 && !b.fenced))
    })
    .await;
    assert!(back, "the restarted observer registered again");
    observer.stop().await.unwrap();
    cluster.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_producer_rides_a_leader_stopping_and_keeps_every_partitions_order() {
    let root = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(root.path()).await;
    let client = cluster.client().await;
    let mut topic = NewTopic::new("moving", 3).config("min_insync_replicas", "2");
    topic.replication_factor = 3;
    client.admin().create_topic(topic).await.unwrap();
    let mut config = tally_client::ProducerConfig::default();
    config.acks = Acks::All;
    config.linger = Duration::from_millis(2);
    config.batch_bytes = 2048;
    config.retry_backoff = Duration::from_millis(20);
    config.delivery_timeout = Duration::from_secs(60);
    let producer = tally_client::Producer::new(cluster.client().await, config);
    let victim = leader_and_isr(&client, "moving").await.unwrap().0;
    let mut deliveries = Vec::new();
    let mut sent: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for n in 0..1500u32 {
        let value = format!("v{n}");
        let partition = n % 3;
        let record = tally_client::ProducerRecord::new("moving", value.as_bytes()).partition(partition);
        deliveries.push((partition, value.clone(), producer.send(record).await.unwrap()));
        sent.entry(partition).or_default().push(value);
        if n == 500 {
            cluster.stop(victim).await; // leader of partition 0, and maybe of others
        }
        if n % 50 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let mut acked: BTreeMap<u32, Vec<(i64, String)>> = BTreeMap::new();
    for (partition, value, d) in deliveries {
        let meta = d.await.unwrap_or_else(|e| panic!("{value} was not delivered: {e}"));
        assert_eq!(meta.partition, partition);
        acked.entry(partition).or_default().push((meta.offset, value));
    }
    producer.close().await;
    // A fresh client: the first one's cache may still name the stopped leader.
    let reader = cluster.client().await;
    for (partition, values) in sent {
        let end = acked[&partition].iter().map(|(o, _)| o + 1).max().unwrap();
        let log = read_to(&reader, "moving", partition, end).await;
        // Each delivery's offset holds its record.
        let at: BTreeMap<i64, &str> = log.iter().map(|(o, v)| (*o, v.as_str())).collect();
        for (offset, value) in &acked[&partition] {
            assert_eq!(at.get(offset), Some(&value.as_str()), "partition {partition}: offset {offset}");
        }
        // Every record once, in send order: the producer is idempotent, so
        // a retry after a lost answer adds no copy.
        let stored: Vec<String> = log.iter().map(|(_, v)| v.clone()).collect();
        assert_eq!(stored, values, "partition {partition}");
    }
    cluster.restart(victim).await;
    cluster.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_broker_answers_no_metadata_older_than_its_restart_and_clients_ride_it_out() {
    let root = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(root.path()).await;
    let client = cluster.client().await;
    client.admin().create_topic(rf3("restart")).await.unwrap();
    let full = wait_for(Duration::from_secs(20), async || {
        leader_and_isr(&client, "restart").await.is_some_and(|(_, isr, _)| isr == [1, 2, 3])
    })
    .await;
    assert!(full, "all three replicas in sync");
    let (old_leader, _, _) = leader_and_isr(&client, "restart").await.unwrap();
    let old_epoch = client.admin().describe_topic("restart").await.unwrap().partitions[0].leader_epoch;
    let mut sent = Vec::new();
    for n in 0..5 {
        sent.push(produce_acked(&client, "restart", n, 50).await.unwrap());
    }
    // The leader stops; another takes over and takes more records.
    cluster.stop(old_leader).await;
    for n in 5..10 {
        sent.push(produce_acked(&client, "restart", n, 100).await.unwrap());
    }
    // Restarted, and asked at once: its listener is up before its image is
    // current (no waiting for it to serve, as the harness would).
    let address = cluster.addresses[old_leader as usize - 1].clone();
    let listener = tokio::net::TcpListener::bind(&address).await.unwrap();
    let (stop_restarted, stopped) = tokio::sync::oneshot::channel::<()>();
    let config = cluster.configs[old_leader as usize - 1].clone();
    let restarted = tokio::spawn(tally_broker::run(config, listener, async move {
        let _ = stopped.await;
    }));
    let only_there = Client::builder().bootstrap([address]).connect().await.expect("rides out the catch-up");
    let d = only_there.admin().describe_topic("restart").await.expect("the broker answered metadata: it is ready");
    {
        let p = &d.partitions[0];
        assert!(
            p.leader_epoch > old_epoch,
            "metadata from before the restart: epoch {} leader {:?}",
            p.leader_epoch,
            p.leader
        );
    }
    let mut config = tally_client::ConsumerConfig::default();
    config.max_wait = Duration::from_millis(100);
    let consumer = tally_client::Consumer::new(only_there.clone(), config);
    consumer.assign("restart", 0, tally_client::SeekTo::Beginning).await.expect("assign rides out the catch-up");
    let mut seen = Vec::new();
    let all = wait_for(Duration::from_secs(20), async || {
        if let Ok(records) = consumer.poll().await {
            seen.extend(records.iter().map(|r| String::from_utf8(r.value.clone().unwrap().to_vec()).unwrap()));
        }
        seen.len() >= sent.len()
    })
    .await;
    assert!(all, "read {seen:?} of {sent:?}");
    assert_eq!(seen, sent, "every record, in order, from the beginning");
    let _ = stop_restarted.send(());
    restarted.await.unwrap().unwrap();
    cluster.stop_all().await;
}

/// Whether `topic` has its `partitions`, each led and with all three
/// replicas in its ISR.
async fn fully_replicated(client: &Client, topic: &str, partitions: u32) -> bool {
    let Ok(d) = client.admin().describe_topic(topic).await else { return false };
    d.partitions.len() == partitions as usize && d.partitions.iter().all(|p| p.leader.is_some() && p.isr.len() == 3)
}

/// Every fetch session the brokers hold as leaders, by (leader, follower).
async fn fetch_sessions(cluster: &Cluster) -> BTreeMap<(u32, u32), tally_proto::internal::v1::FetchSessionInfo> {
    use tally_proto::internal::v1 as pb;
    let mut out = BTreeMap::new();
    for (i, address) in cluster.addresses.iter().enumerate() {
        let connection = tally_proto::connection::Connection::lazy(address, Default::default()).expect("address");
        let mut raw = pb::replication_client::ReplicationClient::new(connection);
        let described = raw.describe_fetch_sessions(pb::DescribeFetchSessionsRequest {}).await.expect("describe");
        for s in described.into_inner().sessions {
            out.insert((i as u32 + 1, s.replica_id), s);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_partitions_replicate_in_fetch_sessions_whose_requests_stay_empty_and_keep_the_isr_full() {
    const PARTITIONS: u32 = 200;
    let root = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(root.path()).await;
    let (lag_ms, wait_ms) =
        (cluster.configs[0].replica_lag_time_max_ms, u64::from(cluster.configs[0].replica_fetch_wait_max_ms));
    let client = cluster.client().await;
    let mut topic = NewTopic::new("many", PARTITIONS).config("min_insync_replicas", "2");
    topic.replication_factor = 3;
    client.admin().create_topic(topic).await.unwrap();
    let isr_full = async || fully_replicated(&client, "many", PARTITIONS).await;
    assert!(wait_for(Duration::from_secs(60), isr_full).await, "every partition replicated");
    // Each leader holds one session per follower, with the partitions it
    // leads (what a full fetch would carry in every request).
    let d = client.admin().describe_topic("many").await.unwrap();
    let led = |b: u32| d.partitions.iter().filter(|p| p.leader == Some(b)).count() as u32;
    let complete = |sessions: &BTreeMap<(u32, u32), tally_proto::internal::v1::FetchSessionInfo>| {
        (1..=3u32).all(|l| {
            (1..=3u32).filter(|f| *f != l).all(|f| sessions.get(&(l, f)).is_some_and(|s| s.partitions == led(l)))
        })
    };
    // Settled: a window of a few fetches per session in which nothing was
    // carried either way (a partition that answered an error at first, as
    // its leader opened it, is answered once more when it reads well).
    type Sessions = BTreeMap<(u32, u32), tally_proto::internal::v1::FetchSessionInfo>;
    let quiet = |from: &Sessions, to: &Sessions, fetches: u64| {
        to.iter().all(|(k, s)| {
            from.get(k).is_some_and(|f| {
                f.session_id == s.session_id
                    && f.incremental_request_partitions == s.incremental_request_partitions
                    && f.incremental_response_partitions == s.incremental_response_partitions
                    && s.incremental_fetches >= f.incremental_fetches + fetches
            })
        })
    };
    let mut before: Sessions = BTreeMap::new();
    let mut window: Option<Sessions> = None;
    let settled = wait_for(Duration::from_secs(30), async || {
        before = fetch_sessions(&cluster).await;
        match &window {
            Some(from) if complete(&before) && quiet(from, &before, 3) => return true,
            Some(from) if complete(&before) && quiet(from, &before, 0) => {}
            _ => window = Some(before.clone()),
        }
        false
    })
    .await;
    assert!(settled, "a session per leader and follower, holding what it leads, then quiet: {before:#?}");
    // Idle long polls for three lag times (counted in fetches, not slept).
    let rounds = 3 * lag_ms / wait_ms;
    let mut after = BTreeMap::new();
    let idled = wait_for(Duration::from_secs(60), async || {
        after = fetch_sessions(&cluster).await;
        before
            .iter()
            .all(|(k, s)| after.get(k).is_some_and(|a| a.incremental_fetches >= s.incremental_fetches + rounds))
    })
    .await;
    assert!(idled, "{rounds} idle rounds per session: {after:#?}");
    for (k, s) in &before {
        let a = &after[k];
        assert_eq!(a.session_id, s.session_id, "{k:?}: idle rounds keep their session");
        let fetches = a.incremental_fetches - s.incremental_fetches;
        let carried = a.incremental_request_partitions - s.incremental_request_partitions;
        let answered = a.incremental_response_partitions - s.incremental_response_partitions;
        // Sessionless, each of these requests and answers would have carried
        // every partition of the session.
        assert!(
            carried < u64::from(a.partitions) && answered < u64::from(a.partitions),
            "{k:?}: {fetches} idle fetches carried {carried} and answered {answered} partition entries of {}",
            a.partitions
        );
    }
    assert!(isr_full().await, "followers that said nothing stayed in the ISR");
    // A busy partition among the idle ones: acks=all is acknowledged, and
    // the followers hold the same bytes.
    let pc = client.partition_client("many", 7);
    for n in 0..20 {
        let value = format!("v{n}");
        let record = RecordRef { timestamp: now_ms(), value: Some(value.as_bytes()), ..Default::default() };
        pc.produce_records(&[record], Acks::All).await.expect("acks=all among idle partitions");
    }
    let hw = pc.list_offset(OffsetSpec::Latest).await.unwrap().unwrap();
    assert_eq!(hw, 20);
    let busy = fetch_sessions(&cluster).await;
    for (k, s) in &after {
        assert_eq!(busy.get(k).map(|b| b.session_id), Some(s.session_id), "{k:?}: records flow in the same session");
    }
    cluster.stop_all().await;
    let logs: Vec<Vec<u8>> = (1..=3).map(|id| log_bytes(&root.path().join(format!("b{id}/many-7")), 20)).collect();
    assert!(!logs[0].is_empty());
    assert_eq!(logs[0], logs[1], "brokers 1 and 2 hold the same bytes");
    assert_eq!(logs[1], logs[2], "brokers 2 and 3 hold the same bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_catches_up_on_many_partitions_whose_batches_together_exceed_its_response_size() {
    // Each partition's backlog alone fits a response; all of them together
    // are 20 times one. A leader that let every partition of a response
    // take one batch past the budget answered more than the follower can
    // decode, every time: the follower never caught up.
    const PARTITIONS: u32 = 20;
    const BATCH: usize = 900 << 10;
    let root = tempfile::tempdir().unwrap();
    let cluster = Cluster::start_with(root.path(), |c| c.replica_fetch_response_max_bytes = 1 << 20).await;
    let client = cluster.client().await;
    let mut topic = NewTopic::new("wide", PARTITIONS).config("min_insync_replicas", "3");
    topic.replication_factor = 3;
    client.admin().create_topic(topic).await.unwrap();
    let isr_full = async || fully_replicated(&client, "wide", PARTITIONS).await;
    assert!(wait_for(Duration::from_secs(60), isr_full).await, "every partition replicated");
    let value = vec![b'x'; BATCH];
    for round in 0..2 {
        // All partitions at once, acks=1: the followers find 20 large
        // batches waiting.
        let produced = (0..PARTITIONS).map(|p| {
            let (pc, value) = (client.partition_client("wide", p), &value);
            async move {
                let record = RecordRef { timestamp: now_ms(), value: Some(value), ..Default::default() };
                pc.produce_records(&[record], Acks::Leader).await
            }
        });
        for (p, outcome) in futures_util::future::join_all(produced).await.into_iter().enumerate() {
            outcome.unwrap_or_else(|e| panic!("round {round}, partition {p}: {e}"));
        }
    }
    // acks=all with min ISR 3 is acknowledged only once both followers hold
    // everything before it too.
    let confirmed = (0..PARTITIONS).map(|p| {
        let pc = client.partition_client("wide", p);
        async move {
            let record = RecordRef { timestamp: now_ms(), value: Some(b"last"), ..Default::default() };
            pc.produce_records(&[record], Acks::All).await
        }
    });
    for (p, outcome) in futures_util::future::join_all(confirmed).await.into_iter().enumerate() {
        assert_eq!(outcome.unwrap_or_else(|e| panic!("partition {p}: {e}")), 2, "partition {p}");
    }
    assert!(isr_full().await, "no follower fell out of the ISR");
    cluster.stop_all().await;
    for p in [0, PARTITIONS - 1] {
        let logs: Vec<Vec<u8>> = (1..=3).map(|id| log_bytes(&root.path().join(format!("b{id}/wide-{p}")), 3)).collect();
        assert!(logs[0].len() > 2 * BATCH, "partition {p} holds both batches");
        assert!(logs[0] == logs[1] && logs[1] == logs[2], "partition {p}: replicas hold the same bytes");
    }
}
