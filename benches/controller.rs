//! Controller benchmark: three Raft voters of the metadata log in one
//! process, each serving its peer gRPC service on 127.0.0.1.
//!
//! `cargo bench --bench controller` prints:
//! - failover: time from stopping the leader (its Raft node and its server,
//!   as a crash would) to a new leader committing an entry, over 20 trials,
//!   with the default election timeout (1000 ms: a follower starts an
//!   election after 750-1000 ms without a leader; heartbeat 100 ms);
//! - propagation: time from a commit at the leader until every voter has
//!   applied it (p50/p99/max over 1000 proposals);
//! - topic creations per second for 1000 topics, one proposal at a time and
//!   with 32 in flight.
//!
//! TALLY_BENCH_QUICK=1 runs 3 failover trials and 200 of the rest.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tally_broker::controller::{BrokerId, Controller, ControllerConfig, MetadataCommand, TopicId};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

fn quick() -> bool {
    std::env::var("TALLY_BENCH_QUICK").is_ok_and(|v| v == "1")
}

struct Voter {
    controller: Controller,
    server: tokio::task::JoinHandle<()>,
}

async fn start(id: u32, voters: &BTreeMap<BrokerId, String>, root: &std::path::Path, listener: TcpListener) -> Voter {
    let config = ControllerConfig::new(BrokerId(id), voters.clone(), root.join(format!("node-{id}")));
    let controller = Controller::start(config).await.expect("start voter");
    let service = controller.service();
    let server = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await;
    });
    Voter { controller, server }
}

async fn stop(v: Voter) {
    v.controller.shutdown().await;
    v.server.abort();
    let _ = v.server.await;
}

async fn rebind(addr: SocketAddr) -> TcpListener {
    for _ in 0..500 {
        if let Ok(l) = TcpListener::bind(addr).await {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("cannot bind {addr} again");
}

/// Proposes at whichever voter accepts it; returns the leader and index.
async fn propose_anywhere(nodes: &BTreeMap<u32, Voter>, command: &MetadataCommand) -> (u32, u64) {
    loop {
        for (id, v) in nodes {
            if v.controller.status().leader != Some(BrokerId(*id)) {
                continue;
            }
            let attempt =
                tokio::time::timeout(Duration::from_millis(500), v.controller.propose_indexed(command.clone()));
            if let Ok(Ok(c)) = attempt.await {
                return (*id, c.index);
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn register(id: u32) -> MetadataCommand {
    MetadataCommand::RegisterBroker {
        id: BrokerId(id),
        address: format!("h:{id}"),
        incarnation: 1,
        previous_incarnation: None,
    }
}

fn create(name: &str) -> MetadataCommand {
    MetadataCommand::CreateTopic {
        name: name.to_string(),
        id: TopicId(name.to_string()),
        configs: BTreeMap::new(),
        assignments: vec![vec![BrokerId(1)]; 3],
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let root = tempfile::tempdir().expect("temp dir");
    let mut listeners = BTreeMap::new();
    for id in 1..=3u32 {
        listeners.insert(id, TcpListener::bind("127.0.0.1:0").await.expect("bind"));
    }
    let addrs: BTreeMap<u32, SocketAddr> = listeners.iter().map(|(id, l)| (*id, l.local_addr().unwrap())).collect();
    let voters: BTreeMap<BrokerId, String> = addrs.iter().map(|(id, a)| (BrokerId(*id), a.to_string())).collect();
    let mut nodes = BTreeMap::new();
    for (id, listener) in listeners {
        nodes.insert(id, start(id, &voters, root.path(), listener).await);
    }
    propose_anywhere(&nodes, &register(1)).await;
    propose_anywhere(&nodes, &MetadataCommand::UnfenceBroker { id: BrokerId(1), incarnation: 1 }).await;
    println!("controller benchmark: 3 voters in one process, election timeout 1000 ms, heartbeat 100 ms");

    // Failover.
    let trials = if quick() { 3 } else { 20 };
    let mut failovers = Vec::new();
    for trial in 0..trials {
        let (leader, _) = propose_anywhere(&nodes, &register(100 + trial)).await;
        let stopped = Instant::now();
        stop(nodes.remove(&leader).expect("leader")).await;
        let (new_leader, _) = propose_anywhere(&nodes, &register(200 + trial)).await;
        let took = stopped.elapsed();
        assert_ne!(new_leader, leader);
        failovers.push(took);
        let listener = rebind(addrs[&leader]).await;
        nodes.insert(leader, start(leader, &voters, root.path(), listener).await);
        // Let the restarted voter catch up before the next trial.
        let (_, index) = propose_anywhere(&nodes, &register(300 + trial)).await;
        for v in nodes.values() {
            assert!(v.controller.wait_applied(index, Duration::from_secs(30)).await, "voter caught up");
        }
    }
    failovers.sort();
    println!(
        "failover (leader stopped -> new leader commits), {} trials: median {:.0} ms, max {:.0} ms (target: median < 2x the election timeout = 2000 ms)",
        trials,
        ms(percentile(&failovers, 0.5)),
        ms(*failovers.last().unwrap())
    );

    // Propagation.
    let n = if quick() { 200 } else { 1000 };
    let mut lags = Vec::with_capacity(n);
    for i in 0..n {
        let (leader, index) = propose_anywhere(&nodes, &register(10_000 + i as u32)).await;
        let committed = Instant::now();
        for (id, v) in &nodes {
            if *id != leader {
                assert!(v.controller.wait_applied(index, Duration::from_secs(10)).await);
            }
        }
        lags.push(committed.elapsed());
    }
    lags.sort();
    println!(
        "propagation (commit at the leader -> applied on every voter), {n} proposals: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (target p99 < 50 ms)",
        ms(percentile(&lags, 0.5)),
        ms(percentile(&lags, 0.99)),
        ms(*lags.last().unwrap())
    );

    // Topic creations.
    let started = Instant::now();
    for i in 0..n {
        propose_anywhere(&nodes, &create(&format!("seq-{i}"))).await;
    }
    let sequential = n as f64 / started.elapsed().as_secs_f64();
    let leader = nodes.values().find_map(|v| v.controller.status().leader).expect("a leader").0;
    let controller = nodes[&leader].controller.clone();
    let started = Instant::now();
    let mut in_flight = std::collections::VecDeque::new();
    for i in 0..n {
        if in_flight.len() == 32 {
            let oldest: tokio::task::JoinHandle<_> = in_flight.pop_front().expect("in flight");
            oldest.await.expect("task");
        }
        let c = controller.clone();
        in_flight.push_back(tokio::spawn(async move { c.propose(create(&format!("par-{i}"))).await.expect("create") }));
    }
    for t in in_flight {
        t.await.expect("task");
    }
    let pipelined = n as f64 / started.elapsed().as_secs_f64();
    println!(
        "topic creations, {n} topics of 3 partitions: {sequential:.0}/s one at a time, {pipelined:.0}/s with 32 in flight"
    );
    for (_, v) in nodes {
        stop(v).await;
    }
}
