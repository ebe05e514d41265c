//! The controller quorum: one broker alone, and three `tally serve`
//! processes of which the controller leader is killed.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tally::child::BrokerProcess;

use crate::harness::{TestBroker, wait_for};

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
    for p in processes.into_iter().flatten() {
        let _ = p.stop();
    }
}
