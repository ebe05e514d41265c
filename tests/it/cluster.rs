//! The controller quorum: one broker alone, and three `tally serve`
//! processes of which the controller leader is killed.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tally::child::BrokerProcess;

use tally_client::{Acks, Client as TallyClient, NewTopic, OffsetSpec};
use tally_proto::batch::RecordRef;
use tally_proto::v1 as pb;

use crate::harness::{TestBroker, test_config, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_broker_is_a_controller_quorum_of_its_own_and_registers() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path()).await;
    let client = broker.client().await;
    let registered = wait_for(Duration::from_secs(20), async || {
        client.admin().describe_cluster().await.is_ok_and(|c| c.brokers.iter().any(|b| b.id == 1 && !b.fenced))
    })
    .await;
    assert!(registered, "broker 1 registered and unfenced");
    let c = client.admin().describe_cluster().await.unwrap();
    assert_eq!(c.leader, Some(1));
    assert!(c.term >= 1);
    assert_eq!(c.voters.len(), 1);
    assert_eq!(c.brokers[0].address, broker.address);
    assert!(c.commit_index.is_some_and(|i| i >= 2), "registration and unfencing were committed: {c:?}");
    broker.stop().await.unwrap();
    // A clean shutdown fenced it before it stopped.
    // Restarted on the same data directory, it keeps its metadata log.
    let broker = TestBroker::start(dir.path()).await;
    let client = broker.client().await;
    let first = c.brokers[0].incarnation;
    // Well inside the 9 s session: it can only register this soon if the
    // clean shutdown fenced the old incarnation.
    let again = wait_for(Duration::from_secs(6), async || {
        let c = client.admin().describe_cluster().await;
        c.is_ok_and(|c| c.brokers.iter().any(|b| b.id == 1 && !b.fenced && b.incarnation != first))
    })
    .await;
    assert!(again, "the restarted broker registered a new incarnation (the old one was fenced at shutdown)");
    assert!(client.admin().describe_cluster().await.unwrap().commit_index > c.commit_index, "the log went on");
}

/// A port nobody listens on now (the voters' addresses must be known
/// before they start).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn cluster_status(address: &str) -> Option<serde_json::Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["cluster", "status", "--output", "json", "--bootstrap", address])
        .output()
        .ok()?;
    out.status.success().then(|| serde_json::from_slice(&out.stdout).ok()).flatten()
}

fn broker_state(status: &serde_json::Value, id: u64) -> Option<bool> {
    status["brokers"].as_array()?.iter().find(|b| b["id"] == id).and_then(|b| b["fenced"].as_bool())
}

async fn wait_status(address: &str, what: &str, check: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let address = address.to_string();
        let status = tokio::task::spawn_blocking(move || cluster_status(&address)).await.unwrap();
        if let Some(s) = status.filter(|s| check(s)) {
            return s;
        }
        assert!(std::time::Instant::now() < deadline, "cluster never showed: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_controller_leader_process_elects_another_which_fences_it() {
    let root = tempfile::tempdir().unwrap();
    let addresses: Vec<String> = (0..3).map(|_| format!("127.0.0.1:{}", free_port())).collect();
    let voters = addresses.iter().enumerate().map(|(i, a)| format!("{}@{a}", i + 1)).collect::<Vec<_>>().join(",");
    let envs = [("TALLY_BROKER_SESSION_TIMEOUT_MS", "2000"), ("TALLY_BROKER_HEARTBEAT_INTERVAL_MS", "200")];
    let binary = Path::new(env!("CARGO_BIN_EXE_tally"));
    let mut processes: Vec<Option<BrokerProcess>> = Vec::new();
    for (i, address) in addresses.iter().enumerate() {
        let dir = root.path().join(format!("b{}", i + 1));
        let id = (i + 1).to_string();
        let args = ["--node-id", id.as_str(), "--voters", voters.as_str()];
        processes.push(Some(BrokerProcess::start_listening(binary, &dir, address, &args, &envs).expect("start")));
    }
    let all_up = |s: &serde_json::Value| !s["leader"].is_null() && (1..=3).all(|id| broker_state(s, id) == Some(false));
    let status = wait_status(&addresses[0], "a leader and three active brokers", all_up).await;
    let leader = status["leader"].as_u64().unwrap();
    assert_eq!(status["voters"].as_array().unwrap().len(), 3);
    // SIGKILL the controller leader.
    drop(processes[leader as usize - 1].take());
    let survivor = &addresses[if leader == 1 { 1 } else { 0 }];
    let after = wait_status(survivor, "a new leader that fenced the old one", |s| {
        s["leader"].as_u64().is_some_and(|l| l != leader) && broker_state(s, leader) == Some(true)
    })
    .await;
    assert!(after["term"].as_u64() > status["term"].as_u64(), "a new term: {after}");
    // Metadata changes go on: a topic can be created, and is spread over the two survivors.
    let survivor = survivor.clone();
    let created = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(["topic", "create", "after-kill", "--partitions", "4", "--bootstrap", survivor.as_str()])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    for p in processes.into_iter().flatten() {
        let _ = p.stop();
    }
}

/// Three in-process brokers, all voters, on listeners bound first.
async fn three_brokers(root: &Path) -> Vec<TestBroker> {
    let mut listeners = Vec::new();
    for _ in 0..3 {
        listeners.push(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    let voters = listeners
        .iter()
        .enumerate()
        .map(|(i, l)| format!("{}@{}", i + 1, l.local_addr().unwrap()))
        .collect::<Vec<_>>()
        .join(",");
    let mut starting = Vec::new();
    for (i, listener) in listeners.into_iter().enumerate() {
        let mut config = test_config(&root.join(format!("b{}", i + 1)));
        config.node_id = i as u32 + 1;
        config.voters = Some(voters.clone());
        config.broker_heartbeat_interval_ms = 200;
        config.broker_session_timeout_ms = 2000;
        config.controller_election_timeout_ms = 500;
        // Start them together: none can register before a majority runs.
        starting.push(TestBroker::start_on(config, listener));
    }
    futures_util::future::join_all(starting).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_created_at_any_broker_spreads_over_all_and_each_partition_is_served_by_its_leader() {
    let root = tempfile::tempdir().unwrap();
    let brokers = three_brokers(root.path()).await;
    let client = brokers[2].client().await;
    client.admin().create_topic(NewTopic::new("spread", 6)).await.unwrap();
    // Every broker's metadata has the topic, with leaders spread over all three.
    for b in &brokers {
        let c = b.client().await;
        let seen = wait_for(Duration::from_secs(10), async || {
            c.admin().describe_topic("spread").await.is_ok_and(|d| d.partitions.iter().all(|p| p.leader.is_some()))
        })
        .await;
        assert!(seen, "broker at {} sees the topic with leaders", b.address);
    }
    let d = client.admin().describe_topic("spread").await.unwrap();
    let mut leaders: Vec<u32> = d.partitions.iter().map(|p| p.leader.unwrap()).collect();
    leaders.sort();
    assert_eq!(leaders, vec![1, 1, 2, 2, 3, 3], "two partitions led by each broker");
    // A client that knows one broker produces to every partition at its leader.
    let bootstrap = TallyClient::builder().bootstrap([brokers[0].address.clone()]).connect().await.unwrap();
    for p in 0..6 {
        let pc = bootstrap.partition_client("spread", p);
        let record = RecordRef { timestamp: 1, value: Some(b"x"), ..Default::default() };
        pc.produce_records(&[record], Acks::Leader).await.unwrap();
        assert_eq!(pc.list_offset(OffsetSpec::Latest).await.unwrap(), Some(1), "partition {p}");
    }
    // A consumer bootstrapped at one broker reads every partition from its leader.
    let mut config = tally_client::ConsumerConfig::default();
    config.max_wait = Duration::from_millis(100);
    let consumer = tally_client::Consumer::new(bootstrap.clone(), config);
    for p in 0..6 {
        consumer.assign("spread", p, tally_client::SeekTo::Beginning).await.unwrap();
    }
    let mut seen = std::collections::BTreeSet::new();
    let read_all = wait_for(Duration::from_secs(20), async || {
        if let Ok(records) = consumer.poll().await {
            seen.extend(records.iter().map(|r| (r.partition, r.offset)));
        }
        seen.len() == 6
    })
    .await;
    assert!(read_all, "one record from each of the six partitions: {seen:?}");
    // Sent to a broker that does not lead it, a produce names the leader.
    let (partition, leader) =
        d.partitions.iter().map(|p| (p.partition, p.leader.unwrap())).find(|(_, l)| *l != 1).unwrap();
    let mut raw = crate::harness::raw_client(&brokers[0].address);
    let mut b = tally_proto::batch::BatchBuilder::new();
    b.push(&RecordRef { timestamp: 1, value: Some(b"y"), ..Default::default() });
    let request = pb::ProduceRequest {
        acks: pb::Acks::Leader as i32,
        timeout_ms: 1000,
        topics: vec![pb::TopicProduceData {
            name: "spread".into(),
            partitions: vec![pb::PartitionProduceData {
                partition,
                records: vec![b.finish()],
                expected_end_offset: None,
            }],
        }],
    };
    let answer = raw.produce(request).await.unwrap().into_inner();
    let r = &answer.topics[0].partitions[0];
    assert_eq!(r.error_code, tally_proto::ErrorCode::NotLeaderOrFollower as i32, "{}", r.error_message);
    assert!(r.error_message.contains(&format!("broker {leader} does")), "{}", r.error_message);
    assert_eq!(r.leader_id, Some(leader), "the answer carries the leader");
    assert!(r.leader_epoch.is_some());
    // So does a fetch.
    let fetch = pb::FetchRequest {
        max_wait_ms: 0,
        min_bytes: 0,
        max_bytes: 1 << 20,
        topics: vec![pb::FetchTopic {
            name: "spread".into(),
            partitions: vec![pb::FetchPartition { partition, fetch_offset: 0, partition_max_bytes: 0 }],
        }],
    };
    let answer = raw.fetch(fetch).await.unwrap().into_inner();
    let r = &answer.topics[0].partitions[0];
    assert_eq!(r.error_code, tally_proto::ErrorCode::NotLeaderOrFollower as i32, "{}", r.error_message);
    assert_eq!(r.leader_id, Some(leader));
    // The broker the client bootstrapped from stops: it carries on through the others.
    let mut brokers = brokers.into_iter();
    brokers.next().unwrap().stop().await.unwrap();
    let elsewhere = d.partitions.iter().find(|p| p.leader != Some(1)).unwrap().partition;
    bootstrap.refresh_metadata(&[]).await.expect("metadata from another broker");
    assert!(bootstrap.admin().list_topics().await.unwrap().iter().any(|t| t.name == "spread"));
    let pc = bootstrap.partition_client("spread", elsewhere);
    let record = RecordRef { timestamp: 1, value: Some(b"z"), ..Default::default() };
    pc.produce_records(&[record], Acks::Leader).await.unwrap();
    for b in brokers {
        b.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_of_the_single_broker_version_opens_with_its_topics() {
    let dir = tempfile::tempdir().unwrap();
    // What the single-broker version left: topics.json and a partition log.
    let topics = serde_json::json!({"version": 1, "topics": [{
        "name": "old", "id": "0123456789abcdef0123456789abcdef", "partitions": 1,
        "replication_factor": 1, "configs": {"retention_ms": "-1"}
    }]});
    std::fs::write(dir.path().join("topics.json"), serde_json::to_vec(&topics).unwrap()).unwrap();
    {
        let mut log = tally_broker::storage::Log::open(
            &dir.path().join("old-0"),
            tally_broker::storage::LogConfig::default(),
            std::sync::Arc::new(tally_broker::storage::SystemClock),
        )
        .unwrap();
        let mut b = tally_proto::batch::BatchBuilder::new();
        b.push(&RecordRef { timestamp: 1, value: Some(b"kept"), ..Default::default() });
        let batch = tally_proto::batch::RecordBatch::validate(b.finish(), &Default::default()).unwrap();
        log.append(&batch, 0).unwrap();
        log.close().unwrap();
    }
    let broker = TestBroker::start(dir.path()).await;
    let client = broker.client().await;
    let migrated = wait_for(Duration::from_secs(20), async || {
        client.partition_client("old", 0).list_offset(OffsetSpec::Latest).await.is_ok_and(|o| o == Some(1))
    })
    .await;
    assert!(migrated, "the old topic is served with its record");
    let d = client.admin().describe_topic("old").await.unwrap();
    assert_eq!(d.configs["retention_ms"], "-1");
    assert!(dir.path().join("topics.json.migrated").exists());
    assert!(!dir.path().join("topics.json").exists());
    broker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_without_a_controller_quorum_leads_until_its_session_runs_out() {
    let root = tempfile::tempdir().unwrap();
    let brokers = three_brokers(root.path()).await;
    let client = brokers[0].client().await;
    client.admin().create_topic(NewTopic::new("alone", 3)).await.unwrap();
    let d = client.admin().describe_topic("alone").await.unwrap();
    let mine = d.partitions.iter().find(|p| p.leader == Some(1)).expect("broker 1 leads one").partition;
    let mut brokers = brokers.into_iter();
    let first = brokers.next().unwrap();
    for b in brokers {
        b.stop().await.unwrap();
    }
    // The majority is gone: broker 1 keeps serving what it leads for a while...
    let pc = client.partition_client("alone", mine);
    let record = RecordRef { timestamp: 1, value: Some(b"x"), ..Default::default() };
    pc.produce_records(std::slice::from_ref(&record), Acks::Leader).await.expect("still leading within its session");
    // ...metadata changes fail with a clear error, which depends on whether
    // it led the controller quorum when the others stopped...
    let controller = client.admin().describe_cluster().await.expect("broker 1 answers").leader;
    let e = client.admin().create_topic(NewTopic::new("never", 1)).await.unwrap_err();
    if controller == Some(1) {
        // A controller leader without its majority cannot commit: the proposal times out.
        assert_eq!(e.code(), Some(tally_proto::ErrorCode::RequestTimedOut), "{e}");
        assert!(e.to_string().contains("no majority of controller voters answered within"), "{e}");
    } else {
        // A voter whose leader is gone cannot win an election alone.
        assert_eq!(e.code(), Some(tally_proto::ErrorCode::LeaderNotAvailable), "controller leader {controller:?}: {e}");
        assert!(e.to_string().contains("this controller is not the leader; an election is under way"), "{e}");
    }
    // ...and once its session runs out (2 s) it stops leading.
    let stopped = wait_for(Duration::from_secs(15), async || {
        pc.produce_records(std::slice::from_ref(&record), Acks::Leader).await.is_err_and(|e| {
            e.code() == Some(tally_proto::ErrorCode::LeaderNotAvailable)
                || e.code() == Some(tally_proto::ErrorCode::NotLeaderOrFollower)
        })
    })
    .await;
    assert!(stopped, "a broker cut off from the controller stops acting as leader");
    first.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_at_different_brokers_grow_a_topic_once_and_lose_no_config_change() {
    let root = tempfile::tempdir().unwrap();
    let brokers = three_brokers(root.path()).await;
    let clients = futures_util::future::join_all(brokers.iter().map(|b| b.client())).await;
    clients[0].admin().create_topic(NewTopic::new("grow", 2)).await.unwrap();
    for c in &clients {
        let seen = wait_for(Duration::from_secs(10), async || c.admin().describe_topic("grow").await.is_ok()).await;
        assert!(seen, "every broker knows the topic");
    }
    // Three admins ask at once, each at its own broker, for 4 partitions:
    // each computes "2 more" from its image; only one may apply.
    let grows = futures_util::future::join_all(clients.iter().map(|c| async move {
        let admin = c.admin();
        admin.create_partitions("grow", 4).await
    }))
    .await;
    for outcome in &grows {
        if let Err(e) = outcome {
            assert!(e.to_string().contains("must be larger"), "only a count already reached is refused: {e}");
        }
    }
    assert!(grows.iter().any(Result::is_ok), "{grows:?}");
    for c in &clients {
        let grown = wait_for(Duration::from_secs(10), async || {
            c.admin().describe_topic("grow").await.is_ok_and(|d| d.partitions.len() >= 4)
        })
        .await;
        assert!(grown);
        let d = c.admin().describe_topic("grow").await.unwrap();
        assert_eq!(d.partitions.len(), 4, "grown once, not once per admin");
    }
    // Two admins set different keys at once: neither change is lost.
    let keys = ["retention_ms", "segment_ms", "max_message_bytes"];
    let values = ["3600000", "7200000", "2000000"];
    let alters = futures_util::future::join_all(clients.iter().zip(keys.iter().zip(values)).map(|(c, (k, v))| {
        let set = std::collections::BTreeMap::from([(k.to_string(), v.to_string())]);
        async move { c.admin().alter_topic_configs("grow", set, vec![]).await }
    }))
    .await;
    for outcome in alters {
        outcome.unwrap();
    }
    // Each answer waited for its own broker's image; broker 1's may lag.
    let all_kept = wait_for(Duration::from_secs(10), async || {
        let configs = clients[0].admin().describe_topic("grow").await.map(|d| d.configs).unwrap_or_default();
        keys.iter().zip(values).all(|(k, v)| configs.get(*k).map(String::as_str) == Some(v))
    })
    .await;
    let configs = clients[0].admin().describe_topic("grow").await.unwrap().configs;
    assert!(all_kept, "every key kept: {configs:?}");
    for b in brokers {
        b.stop().await.unwrap();
    }
}
