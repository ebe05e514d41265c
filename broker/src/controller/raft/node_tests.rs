//! Three controller voters in one runtime, each serving its peer gRPC
//! service on 127.0.0.1: elections, replication, failover, restart.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use super::delay_proxy::DelayProxy;
use super::node::{Controller, ControllerConfig, ControllerError, HeartbeatRequest};
use crate::controller::HeartbeatAnswer;
use crate::controller::metadata::{BrokerId, MetadataCommand, MetadataEffect, TopicId};

struct Voter {
    controller: Controller,
    server: tokio::task::JoinHandle<()>,
}

impl Voter {
    async fn stop(self) {
        self.controller.shutdown().await;
        self.server.abort();
        let _ = self.server.await;
    }
}

fn config(id: u32, voters: &BTreeMap<BrokerId, String>, root: &std::path::Path) -> ControllerConfig {
    let mut c = ControllerConfig::new(BrokerId(id), voters.clone(), root.join(format!("node-{id}")));
    c.heartbeat_interval_ms = 50;
    c.election_timeout_ms = 400;
    c.propose_timeout_ms = 3000;
    c.leases = crate::controller::LeaseConfig { session_timeout_ms: 1000, retry_ms: 200 };
    c
}

async fn start(id: u32, voters: &BTreeMap<BrokerId, String>, root: &std::path::Path, listener: TcpListener) -> Voter {
    start_with(config(id, voters, root), listener).await
}

async fn start_with(config: ControllerConfig, listener: TcpListener) -> Voter {
    let controller = Controller::start(config).await.unwrap();
    let service = controller.service();
    let api = controller.api_service();
    let server = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .add_service(api)
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await;
    });
    Voter { controller, server }
}

/// Binds `addr` again after its voter stopped (a voter's address is its
/// identity in the voter set), retrying while the old socket lets go.
async fn rebind(addr: SocketAddr) -> TcpListener {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("cannot bind {addr} again: {e}"),
        }
    }
}

async fn cluster(
    root: &std::path::Path,
) -> (BTreeMap<u32, Voter>, BTreeMap<BrokerId, String>, BTreeMap<u32, SocketAddr>) {
    let mut listeners = BTreeMap::new();
    for id in 1..=3u32 {
        listeners.insert(id, TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    let addrs: BTreeMap<u32, SocketAddr> = listeners.iter().map(|(id, l)| (*id, l.local_addr().unwrap())).collect();
    let voters: BTreeMap<BrokerId, String> = addrs.iter().map(|(id, a)| (BrokerId(*id), a.to_string())).collect();
    let mut nodes = BTreeMap::new();
    for (id, listener) in listeners {
        nodes.insert(id, start(id, &voters, root, listener).await);
    }
    (nodes, voters, addrs)
}

/// Waits until every voter in `nodes` names the same leader, one of them.
async fn agreed_leader(nodes: &BTreeMap<u32, Voter>) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let leaders: Vec<Option<BrokerId>> = nodes.values().map(|v| v.controller.status().leader).collect();
        if let Some(Some(l)) = leaders.first()
            && leaders.iter().all(|x| *x == Some(*l))
            && nodes.contains_key(&l.0)
        {
            return l.0;
        }
        assert!(Instant::now() < deadline, "no agreed leader: {leaders:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Proposes at whichever voter leads, following NotLeader answers.
async fn propose(nodes: &BTreeMap<u32, Voter>, command: MetadataCommand) -> Vec<MetadataEffect> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let leader = agreed_leader(nodes).await;
        match nodes[&leader].controller.propose(command.clone()).await {
            Ok(effects) => return effects,
            Err(e) if e.is_retriable() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("proposal failed: {e}"),
        }
    }
}

/// Waits until every voter's image satisfies `check`.
async fn converge(nodes: &BTreeMap<u32, Voter>, what: &str, check: impl Fn(&crate::controller::MetadataImage) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !nodes.values().all(|v| check(&v.controller.image())) {
        if Instant::now() >= deadline {
            let states: Vec<_> = nodes.values().map(|v| v.controller.status()).collect();
            panic!("voters did not converge on {what}: {states:#?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn register(id: u32) -> MetadataCommand {
    MetadataCommand::RegisterBroker {
        id: BrokerId(id),
        address: format!("h:{id}"),
        incarnation: 7,
        previous_incarnation: None,
    }
}

fn create(name: &str) -> MetadataCommand {
    MetadataCommand::CreateTopic {
        name: name.into(),
        id: TopicId(format!("id-{name}")),
        configs: BTreeMap::new(),
        assignments: vec![vec![BrokerId(1)]],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn voters_elect_one_leader_and_every_voter_applies_what_it_commits() {
    let root = tempfile::tempdir().unwrap();
    let (nodes, _, _) = cluster(root.path()).await;
    let leader = agreed_leader(&nodes).await;
    // A follower refuses proposals and names the leader.
    let follower = nodes.keys().copied().find(|id| *id != leader).unwrap();
    match nodes[&follower].controller.propose(register(1)).await {
        Err(ControllerError::NotLeader { leader: Some(l), address: Some(_) }) => assert_eq!(l, BrokerId(leader)),
        other => panic!("a follower must answer NotLeader naming the leader, got {other:?}"),
    }
    let effects = propose(&nodes, register(1)).await;
    assert_eq!(effects, vec![MetadataEffect::BrokerRegistered { id: BrokerId(1), incarnation: 7 }]);
    propose(&nodes, MetadataCommand::UnfenceBroker { id: BrokerId(1), incarnation: 7 }).await;
    propose(&nodes, create("t")).await;
    converge(&nodes, "topic t", |image| image.topic("t").is_some()).await;
    // A command the state machine refuses is reported as such.
    let leader = agreed_leader(&nodes).await;
    let refused = nodes[&leader].controller.propose(create("t")).await;
    assert!(matches!(refused, Err(ControllerError::Refused(_))), "{refused:?}");
    let status = nodes[&leader].controller.status();
    assert_eq!(status.leader, Some(BrokerId(leader)));
    assert!(status.term >= 1);
    assert_eq!(status.voters.len(), 3);
    assert!(status.voters.iter().all(|v| v.matched_index.is_some()), "{status:?}");
    for (_, v) in nodes {
        v.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_is_replaced_and_rejoins_with_its_log() {
    let root = tempfile::tempdir().unwrap();
    let (mut nodes, voters, addrs) = cluster(root.path()).await;
    propose(&nodes, register(1)).await;
    let old = agreed_leader(&nodes).await;
    nodes.remove(&old).unwrap().stop().await;
    let new = agreed_leader(&nodes).await;
    assert_ne!(new, old);
    propose(&nodes, MetadataCommand::UnfenceBroker { id: BrokerId(1), incarnation: 7 }).await;
    propose(&nodes, create("after-failover")).await;
    // The old leader restarts from its directory and catches up.
    let listener = rebind(addrs[&old]).await;
    nodes.insert(old, start(old, &voters, root.path(), listener).await);
    converge(&nodes, "the topic created while it was down", |image| image.topic("after-failover").is_some()).await;
    for (_, v) in nodes {
        v.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_voters_restarted_restore_the_same_metadata() {
    let root = tempfile::tempdir().unwrap();
    let (nodes, voters, addrs) = cluster(root.path()).await;
    propose(&nodes, register(1)).await;
    propose(&nodes, MetadataCommand::UnfenceBroker { id: BrokerId(1), incarnation: 7 }).await;
    for name in ["a", "b", "c"] {
        propose(&nodes, create(name)).await;
    }
    converge(&nodes, "three topics", |image| image.topics().len() == 3).await;
    let before = nodes.values().next().unwrap().controller.image();
    for (_, v) in nodes {
        v.stop().await;
    }
    let mut nodes = BTreeMap::new();
    for (id, addr) in &addrs {
        let listener = rebind(*addr).await;
        nodes.insert(*id, start(*id, &voters, root.path(), listener).await);
    }
    converge(&nodes, "the metadata before the restart", |image| *image == *before).await;
    // And the restarted quorum takes new changes.
    propose(&nodes, create("d")).await;
    for (_, v) in nodes {
        v.stop().await;
    }
}

#[tokio::test]
async fn a_voter_list_that_disagrees_with_the_data_directory_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let one: BTreeMap<BrokerId, String> = BTreeMap::from([(BrokerId(1), "127.0.0.1:1".to_string())]);
    let controller = Controller::start(config(1, &one, root.path())).await.unwrap();
    controller.shutdown().await;
    let two = BTreeMap::from([(BrokerId(1), "127.0.0.1:1".to_string()), (BrokerId(2), "127.0.0.1:2".to_string())]);
    let err = Controller::start(config(1, &two, root.path())).await.unwrap_err();
    assert!(matches!(&err, ControllerError::Config(m) if m.contains("disagree")), "{err}");
    let err = Controller::start(config(3, &two, root.path())).await.unwrap_err();
    assert!(matches!(&err, ControllerError::Config(m) if m.contains("not one of the voters")), "{err}");
}

#[tokio::test]
async fn a_single_voter_is_a_cluster_of_its_own() {
    let root = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let voters = BTreeMap::from([(BrokerId(1), listener.local_addr().unwrap().to_string())]);
    let mut nodes = BTreeMap::new();
    nodes.insert(1, start(1, &voters, root.path(), listener).await);
    assert_eq!(agreed_leader(&nodes).await, 1);
    propose(&nodes, register(1)).await;
    assert!(nodes[&1].controller.image().broker(BrokerId(1)).is_some());
    for (_, v) in nodes {
        v.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proposal_or_heartbeat_at_a_follower_is_forwarded_to_the_leader() {
    let root = tempfile::tempdir().unwrap();
    let (nodes, _, _) = cluster(root.path()).await;
    let leader = agreed_leader(&nodes).await;
    let follower = nodes.keys().copied().find(|id| *id != leader).unwrap();
    let committed = nodes[&follower].controller.propose_anywhere(register(1)).await.unwrap();
    assert_eq!(committed.effects, vec![MetadataEffect::BrokerRegistered { id: BrokerId(1), incarnation: 7 }]);
    assert!(nodes[&follower].controller.wait_applied(committed.index, Duration::from_secs(10)).await);
    let behind = HeartbeatRequest {
        broker: BrokerId(1),
        incarnation: 7,
        metadata_index: Some(0),
        shutting_down: false,
        want_fence: false,
    };
    let answer = nodes[&follower].controller.heartbeat(&behind).await.unwrap();
    let HeartbeatAnswer::Alive { fenced: true, metadata_index: Some(needed), session_timeout_ms: 1000 } = answer else {
        panic!("a fenced broker behind the log: {answer:?}");
    };
    assert!(needed >= committed.index, "the answer names the committed index: {answer:?}");
    // Caught up to that index, it is unfenced at once, and the answer names
    // the unfencing's index.
    let heartbeat = HeartbeatRequest { metadata_index: Some(needed), ..behind.clone() };
    let answer = nodes[&follower].controller.heartbeat(&heartbeat).await.unwrap();
    let HeartbeatAnswer::Alive { fenced: false, metadata_index: Some(unfenced), .. } = answer else {
        panic!("a caught-up broker is unfenced: {answer:?}");
    };
    assert!(unfenced > needed);
    // Behind for a session, it asks to be fenced: fenced at once, and not
    // unfenced again with the image it had before its fencing.
    let asks = HeartbeatRequest { want_fence: true, ..heartbeat.clone() };
    let answer = nodes[&follower].controller.heartbeat(&asks).await.unwrap();
    let HeartbeatAnswer::Alive { fenced: true, metadata_index: Some(fenced_at), .. } = answer else {
        panic!("a broker that asks is fenced: {answer:?}");
    };
    let stale = HeartbeatRequest { metadata_index: Some(unfenced), ..heartbeat.clone() };
    let answer = nodes[&follower].controller.heartbeat(&stale).await.unwrap();
    assert!(matches!(answer, HeartbeatAnswer::Alive { fenced: true, .. }), "{answer:?}");
    let current = HeartbeatRequest { metadata_index: Some(fenced_at), ..heartbeat.clone() };
    let answer = nodes[&follower].controller.heartbeat(&current).await.unwrap();
    assert!(matches!(answer, HeartbeatAnswer::Alive { fenced: false, .. }), "caught up again: {answer:?}");
    let stranger = HeartbeatRequest { broker: BrokerId(9), ..heartbeat };
    assert_eq!(nodes[&follower].controller.heartbeat(&stranger).await, Ok(HeartbeatAnswer::Register));
    for (_, v) in nodes {
        v.stop().await;
    }
}

/// Heartbeats for broker 1 through voter `via` every 100 ms until `stop`.
fn heartbeat_loop(controller: Controller, stop: tokio::sync::watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let heartbeat = HeartbeatRequest {
            broker: BrokerId(1),
            incarnation: 7,
            metadata_index: Some(u64::MAX),
            shutting_down: false,
            want_fence: false,
        };
        while !*stop.borrow() {
            let _ = controller.heartbeat(&heartbeat).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_broker_is_fenced_and_unfenced_when_it_heartbeats_again() {
    let root = tempfile::tempdir().unwrap();
    let (nodes, _, _) = cluster(root.path()).await;
    propose(&nodes, register(1)).await;
    let via = nodes.keys().copied().find(|id| Some(BrokerId(*id)) != nodes[id].controller.status().leader).unwrap();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let beats = heartbeat_loop(nodes[&via].controller.clone(), stop_rx);
    // Registered brokers start fenced; heartbeating and caught up, it is unfenced.
    converge(&nodes, "broker 1 unfenced", |image| image.broker(BrokerId(1)).is_some_and(|b| !b.fenced)).await;
    propose(&nodes, create("t")).await;
    converge(&nodes, "t led by 1", |image| image.partition("t", 0).is_some_and(|p| p.leader == Some(BrokerId(1))))
        .await;
    // Silence: after the session timeout it is fenced and its partition goes offline.
    stop_tx.send(true).unwrap();
    beats.await.unwrap();
    let silent = Instant::now();
    converge(&nodes, "broker 1 fenced", |image| image.broker(BrokerId(1)).is_some_and(|b| b.fenced)).await;
    assert!(silent.elapsed() >= Duration::from_millis(800), "not fenced before its session ran out");
    converge(&nodes, "t offline", |image| image.partition("t", 0).is_some_and(|p| p.leader.is_none())).await;
    // It comes back.
    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let _beats = heartbeat_loop(nodes[&via].controller.clone(), stop_rx);
    converge(&nodes, "t led by 1 again", |image| {
        image.partition("t", 0).is_some_and(|p| p.leader == Some(BrokerId(1)))
    })
    .await;
    for (_, v) in nodes {
        v.stop().await;
    }
}

#[tokio::test]
async fn the_lease_task_drops_session_changes_once_the_leadership_changed() {
    let leading = std::cell::Cell::new(true);
    let made = std::cell::RefCell::new(Vec::new());
    let proposed = super::node::propose_while_leading(
        vec![1, 2, 3],
        || leading.get(),
        |command| {
            made.borrow_mut().push(command);
            // The first proposal took long enough for the leadership to move.
            leading.set(false);
            std::future::ready(())
        },
    )
    .await;
    assert_eq!(made.into_inner(), vec![1], "decided in a term this voter no longer leads in");
    assert_eq!(proposed.dropped(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leadership_checks_reuse_connections_and_succeed_over_a_slow_link() {
    let root = tempfile::tempdir().unwrap();
    // Voters reach each other through proxies: 25 ms each way, and 200 ms
    // more to open a connection. A check must finish within the heartbeat
    // interval (200 ms): over a kept connection it takes one round trip
    // (50 ms), over a new one 250 ms.
    let (one_way, setup) = (Duration::from_millis(25), Duration::from_millis(200));
    let mut listeners = BTreeMap::new();
    let mut proxies = BTreeMap::new();
    for id in 1..=3u32 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        proxies.insert(id, DelayProxy::start(listener.local_addr().unwrap(), one_way, setup).await);
        listeners.insert(id, listener);
    }
    let voters: BTreeMap<BrokerId, String> =
        proxies.iter().map(|(id, p)| (BrokerId(*id), p.addr.to_string())).collect();
    let mut nodes = BTreeMap::new();
    for (id, listener) in listeners {
        let mut c = config(id, &voters, root.path());
        c.heartbeat_interval_ms = 200;
        c.election_timeout_ms = 2000;
        nodes.insert(id, start_with(c, listener).await);
    }
    let leader = agreed_leader(&nodes).await;
    let controller = &nodes[&leader].controller;
    let stranger = HeartbeatRequest {
        broker: BrokerId(9),
        incarnation: 1,
        metadata_index: None,
        shutting_down: false,
        want_fence: false,
    };
    // The first check may pay for opening the connections.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match controller.heartbeat_local(&stranger).await {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < deadline, "no leadership check succeeded over the slow link: {e}"),
        }
    }
    let opened = |proxies: &BTreeMap<u32, DelayProxy>| proxies.values().map(DelayProxy::accepted).sum::<usize>();
    let before = opened(&proxies);
    let checks = 30;
    for i in 0..checks {
        let answer = controller.heartbeat_local(&stranger).await;
        assert_eq!(answer, Ok(HeartbeatAnswer::Register), "check {i} over the slow link");
    }
    let new_connections = opened(&proxies) - before;
    assert!(new_connections <= 2, "{checks} leadership checks opened {new_connections} connections");
    for (_, v) in nodes {
        v.stop().await;
    }
}
