//! The event-sourcing examples (`examples/bank`, `examples/orders`) run
//! against an in-process cluster of three brokers, their library parts
//! included from the example directories. Every claim of their doc
//! comments is checked here: concurrent withdrawals never both pass a
//! balance check; the balances read model resumes from its committed
//! offsets and can be rebuilt from offset 0; a restart loads the snapshot
//! and replays only what came after it; a failed transfer credit is
//! refunded and no balance is ever negative; and an order processor killed
//! at random points ships every order, exactly once after de-duplication
//! by the order-id header.

#[allow(dead_code)]
#[path = "../../examples/bank/bank.rs"]
mod bank;
#[allow(dead_code)]
#[path = "../../examples/orders/orders.rs"]
mod orders;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tally_client::{Client, TopicPartitions};

use crate::harness::wait_for;
use crate::replication::Cluster;

use bank::account::{Command, Rejection, Status};
use bank::event::{Event, StoredEvent};
use bank::projection::{Balances, Projection, ends, rebuild};
use bank::saga::{Fault, TransferOutcome, transfer};
use bank::snapshot::SnapshotStore;
use bank::store::{CommandError, EventStore};
use bank::topics::Topics;
use orders::dedup::{Deduplicator, read_all};
use orders::order::{Order, Shipment};
use orders::processor::{Processor, ProcessorConfig};
use orders::setup::{create_topics, make_orders, produce_orders};

/// Waits until every partition of `topics` has a leader.
async fn wait_leaders(client: &Client, topics: &[&str]) {
    for topic in topics {
        let led = wait_for(Duration::from_secs(20), async || {
            client.admin().describe_topic(topic).await.is_ok_and(|d| d.partitions.iter().all(|p| p.leader.is_some()))
        })
        .await;
        assert!(led, "{topic} has leaders");
    }
}

/// The bank's topics on a fresh three-broker cluster (replication factor 3).
async fn bank_cluster(root: &std::path::Path) -> (Cluster, Client, Topics) {
    let cluster = Cluster::start(root).await;
    let client = cluster.client().await;
    let topics = Topics {
        events: "bank-events".into(),
        snapshots: "bank-snapshots".into(),
        partitions: 3,
        replication_factor: 3,
    };
    topics.create(&client).await.unwrap();
    wait_leaders(&client, &[&topics.events, &topics.snapshots]).await;
    (cluster, client, topics)
}

async fn run(store: &EventStore, account: &str, command: Command) {
    store.execute(account, &command).await.unwrap_or_else(|e| panic!("{account}: {command:?}: {e}"));
}

/// Replays `history` one event at a time and checks the balance after each
/// is at least zero; returns the final balance.
fn never_negative(account: &str, history: &[StoredEvent]) -> i64 {
    let mut state = bank::account::Account::new(account);
    for e in history {
        state.apply(&e.event);
        assert!(state.balance >= 0, "{account} went to {} at offset {}: {history:#?}", state.balance, e.offset);
    }
    state.balance
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bank_concurrent_withdrawals_never_both_pass_a_balance_check() {
    let root = tempfile::tempdir().unwrap();
    let (cluster, client, topics) = bank_cluster(root.path()).await;
    let store = EventStore::open(client.clone(), &topics.events, None).await.unwrap();
    run(&store, "ann", Command::Open).await;
    // The guard is the partition's end: an append for another account of
    // the partition makes a decision on a state read before it conflict.
    let partition = store.partition_of("ann");
    let neighbour = (0..).map(|i| format!("n{i}")).find(|n| store.partition_of(n) == partition).unwrap();
    let mut stale = store.load("ann").await.unwrap();
    run(&store, &neighbour, Command::Open).await;
    let deposited = store.decide_and_append(&mut stale, &Command::Deposit { amount: 100 }).await.unwrap();
    assert_eq!(
        (deposited.conflicts, deposited.offset),
        (1, Some(stale.version)),
        "retried after the neighbour's event"
    );

    // All twenty read balance 100 at the same version before any appends,
    // so every one but the first to append meets a conflict.
    let barrier = Arc::new(tokio::sync::Barrier::new(20));
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let (store, barrier) = (store.clone(), barrier.clone());
            tokio::spawn(async move {
                let mut loaded = store.load("ann").await.unwrap();
                assert_eq!(loaded.account.balance, 100);
                barrier.wait().await;
                store.decide_and_append(&mut loaded, &Command::Withdraw { amount: 10 }).await
            })
        })
        .collect();
    let (mut succeeded, mut refused) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(appended) => {
                assert_eq!(appended.events, vec![Event::Withdrawn { amount: 10 }]);
                succeeded += 1;
            }
            Err(CommandError::Rejected(Rejection::InsufficientFunds { balance: 0, amount: 10 })) => refused += 1,
            Err(e) => panic!("a withdrawal failed otherwise: {e}"),
        }
    }
    assert_eq!((succeeded, refused), (10, 10), "exactly the ten the balance covers went through");
    assert!(store.conflicts() >= 19, "the withdrawals raced: {} conflicts", store.conflicts());
    assert_eq!(store.load("ann").await.unwrap().account.balance, 0);
    let history = store.history("ann").await.unwrap();
    assert_eq!(history.iter().filter(|e| e.event == Event::Withdrawn { amount: 10 }).count(), 10);
    assert_eq!(never_negative("ann", &history), 0);
    cluster.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bank_projection_resumes_from_its_commits_and_rebuilds_from_offset_zero() {
    let root = tempfile::tempdir().unwrap();
    let (cluster, client, topics) = bank_cluster(root.path()).await;
    let store = EventStore::open(client.clone(), &topics.events, None).await.unwrap();
    let accounts: Vec<String> = (0..6).map(|i| format!("acct-{i}")).collect();
    for (i, a) in accounts.iter().enumerate() {
        run(&store, a, Command::Open).await;
        run(&store, a, Command::Deposit { amount: 100 + i64::try_from(i).unwrap() }).await;
        run(&store, a, Command::Withdraw { amount: 7 }).await;
    }
    transfer(&store, "t1", &accounts[0], &accounts[1], 50, Fault::None).await.unwrap();
    run(&store, &accounts[5], Command::Withdraw { amount: 98 }).await;
    run(&store, &accounts[5], Command::Close).await;
    let expected = async || {
        let mut out = BTreeMap::new();
        for a in &accounts {
            let loaded = store.load(a).await.unwrap();
            if loaded.account.status == Status::Open {
                out.insert(a.clone(), loaded.account.balance);
            }
        }
        out
    };

    let group = "balances";
    let session = Some(Duration::from_millis(1500));
    let model = Arc::new(Mutex::new(Balances::default()));
    let first_ends = ends(&client, &topics.events).await.unwrap();
    let mut first = Projection::start(client.clone(), &topics.events, group, model.clone(), session).unwrap();
    first.run_to(&first_ends, Duration::from_secs(30)).await.unwrap();
    let before = expected().await;
    assert_eq!(before.len(), 5, "the closed account is gone");
    assert_eq!(model.lock().unwrap().balances, before);
    first.close().await.unwrap();
    let committed = client.admin().group_offsets(group, &TopicPartitions::new()).await.unwrap();
    let committed: BTreeMap<u32, i64> = committed.iter().map(|((_, p), c)| (*p, c.offset)).collect();
    assert_eq!(committed, first_ends.iter().filter(|(_, e)| **e > 0).map(|(p, e)| (*p, *e)).collect());

    // More events; a new projection instance resumes at the commits.
    for a in &accounts[..3] {
        run(&store, a, Command::Deposit { amount: 1000 }).await;
    }
    let second_ends = ends(&client, &topics.events).await.unwrap();
    let mut second = Projection::start(client.clone(), &topics.events, group, model.clone(), session).unwrap();
    second.run_to(&second_ends, Duration::from_secs(30)).await.unwrap();
    let new_records: i64 = second_ends.iter().map(|(p, e)| e - first_ends[p]).sum();
    assert_eq!(new_records, 3);
    let received = second.received().clone();
    assert_eq!(received.records as i64, new_records, "nothing below the commits was read again: {received:?}");
    for (p, first_offset) in &received.first {
        assert_eq!(*first_offset, first_ends[p], "partition {p} resumed at its commit");
    }
    second.close().await.unwrap();
    let after = expected().await;
    assert_eq!(model.lock().unwrap().balances, after);
    assert_ne!(after, before);

    // Rebuilt from offset 0, without a group and with a new one: the same.
    assert_eq!(rebuild(&client, &topics.events).await.unwrap().balances, after);
    let fresh = Arc::new(Mutex::new(Balances::default()));
    let mut replay = Projection::start(client.clone(), &topics.events, "balances-v2", fresh.clone(), session).unwrap();
    replay.run_to(&second_ends, Duration::from_secs(30)).await.unwrap();
    replay.close().await.unwrap();
    assert_eq!(fresh.lock().unwrap().balances, after);
    cluster.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bank_restart_loads_the_snapshot_and_replays_only_the_events_after_it() {
    let root = tempfile::tempdir().unwrap();
    let (cluster, client, topics) = bank_cluster(root.path()).await;
    let described = client.admin().describe_topic(&topics.snapshots).await.unwrap();
    assert_eq!(described.configs.get("cleanup_policy").map(String::as_str), Some("compact"));

    let snapshots = SnapshotStore::load(client.clone(), &topics.snapshots).await.unwrap();
    assert!(snapshots.get("bea").is_none());
    let store = EventStore::open(client.clone(), &topics.events, Some(snapshots.clone())).await.unwrap();
    run(&store, "bea", Command::Open).await;
    for _ in 0..5 {
        run(&store, "bea", Command::Deposit { amount: 10 }).await;
    }
    assert_eq!(store.load("bea").await.unwrap().events_applied, 6, "no snapshot yet: every event replayed");
    let early = store.load("bea").await.unwrap();
    snapshots.save(&early).await.unwrap();
    run(&store, "bea", Command::Withdraw { amount: 5 }).await;
    run(&store, "bea", Command::Deposit { amount: 5 }).await;
    // Loading starts at the snapshot.
    let loaded = store.load("bea").await.unwrap();
    assert_eq!((loaded.replayed_from, loaded.events_applied), (early.version, 2));
    let saved = snapshots.save(&loaded).await.unwrap();
    assert_eq!((saved.account.balance, saved.covers), (50, loaded.version));
    // After the snapshot: three of bea's events, and one of an account in
    // the same partition (read, not applied).
    let partition = store.partition_of("bea");
    let neighbour = (0..).map(|i| format!("n{i}")).find(|n| store.partition_of(n) == partition).unwrap();
    run(&store, &neighbour, Command::Open).await;
    for _ in 0..3 {
        run(&store, "bea", Command::Deposit { amount: 1 }).await;
    }

    // A restart: a new client, the snapshots read back from their topic.
    let client2 = cluster.client().await;
    let reloaded = SnapshotStore::load(client2.clone(), &topics.snapshots).await.unwrap();
    assert_eq!(
        reloaded.get("bea"),
        Some(saved.clone()),
        "the last of bea's two snapshots (compaction may drop the other)"
    );
    let restarted = EventStore::open(client2, &topics.events, Some(reloaded)).await.unwrap();
    let from_snapshot = restarted.load("bea").await.unwrap();
    assert_eq!(from_snapshot.replayed_from, saved.covers, "started at the snapshot");
    assert_eq!(from_snapshot.events_applied, 3, "only bea's events after it");
    assert_eq!(from_snapshot.records_read, 4, "the partition's records after it");
    // The same state as a replay of everything.
    let full = EventStore::open(client.clone(), &topics.events, None).await.unwrap().load("bea").await.unwrap();
    assert_eq!((full.replayed_from, full.events_applied), (0, 11));
    assert_eq!(from_snapshot.account, full.account);
    assert_eq!((from_snapshot.version, from_snapshot.account.balance), (full.version, 53));
    cluster.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bank_transfer_whose_credit_fails_is_refunded_and_no_balance_is_ever_negative() {
    let root = tempfile::tempdir().unwrap();
    let (cluster, client, topics) = bank_cluster(root.path()).await;
    let store = EventStore::open(client.clone(), &topics.events, None).await.unwrap();
    let (source, target) = ("src", "dst");
    // Accounts on partitions other than the source's: a saga, not one append.
    let others: Vec<String> = (0..)
        .map(|i| format!("x{i}"))
        .filter(|a| store.partition_of(a) != store.partition_of(source))
        .take(2)
        .collect();
    let (closed, never_opened) = (&others[0], &others[1]);
    let target = if store.partition_of(target) != store.partition_of(source) {
        target.to_string()
    } else {
        (0..).map(|i| format!("dst{i}")).find(|a| store.partition_of(a) != store.partition_of(source)).unwrap()
    };
    run(&store, source, Command::Open).await;
    run(&store, source, Command::Deposit { amount: 100 }).await;
    run(&store, &target, Command::Open).await;
    run(&store, closed, Command::Open).await;
    run(&store, closed, Command::Close).await;
    let balance = async |a: &str| store.load(a).await.unwrap().account.balance;

    assert_eq!(transfer(&store, "t1", source, &target, 30, Fault::None).await.unwrap(), TransferOutcome::Completed);
    assert_eq!((balance(source).await, balance(&target).await), (70, 30));
    let refunded = |status| TransferOutcome::Refunded { reason: Rejection::NotOpen { status } };
    assert_eq!(transfer(&store, "t2", source, closed, 50, Fault::None).await.unwrap(), refunded(Status::Closed));
    assert_eq!(
        transfer(&store, "t3", source, never_opened, 70, Fault::None).await.unwrap(),
        refunded(Status::Unopened)
    );
    let forced = transfer(&store, "t4", source, &target, 60, Fault::RejectCredit).await.unwrap();
    assert_eq!(forced, TransferOutcome::Refunded { reason: Rejection::Forced });
    let too_much = transfer(&store, "t5", source, &target, 71, Fault::None).await;
    assert!(matches!(too_much, Err(CommandError::Rejected(Rejection::InsufficientFunds { .. }))), "{too_much:?}");
    assert_eq!((balance(source).await, balance(&target).await), (70, 30), "the money is back");
    assert_eq!((balance(closed).await, balance(never_opened).await), (0, 0));

    // Every intermediate state of every account, and each step once.
    let source_history = store.history(source).await.unwrap();
    assert_eq!(never_negative(source, &source_history), 70);
    assert_eq!(never_negative(&target, &store.history(&target).await.unwrap()), 30);
    assert_eq!(never_negative(closed, &store.history(closed).await.unwrap()), 0);
    assert!(store.history(never_opened).await.unwrap().is_empty(), "a refused credit appends nothing");
    let steps = |id: &str| -> Vec<&'static str> {
        source_history
            .iter()
            .filter_map(|e| match &e.event {
                Event::TransferDebited { transfer_id, .. } if transfer_id == id => Some("debited"),
                Event::TransferRefunded { transfer_id, .. } if transfer_id == id => Some("refunded"),
                _ => None,
            })
            .collect()
    };
    assert_eq!(steps("t1"), ["debited"]);
    for t in ["t2", "t3", "t4"] {
        assert_eq!(steps(t), ["debited", "refunded"], "{t}");
    }
    assert!(steps("t5").is_empty(), "a refused debit appends nothing");
    cluster.stop_all().await;
}

/// A small xorshift generator: reproducible kill points without a new
/// dependency.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u32) -> u32 {
        u32::try_from(self.next() % u64::from(n)).expect("below n")
    }
}

fn processor_config() -> ProcessorConfig {
    ProcessorConfig {
        orders: "orders".into(),
        shipments: "shipments".into(),
        group: "shipping".into(),
        records_per_commit: 7,
        session_timeout: Some(Duration::from_millis(1000)),
    }
}

async fn orders_cluster(root: &std::path::Path) -> (Cluster, Client) {
    let cluster = Cluster::start(root).await;
    let client = cluster.client().await;
    create_topics(&client, ["orders", "shipments"], 3, 3).await.unwrap();
    wait_leaders(&client, &["orders", "shipments"]).await;
    (cluster, client)
}

/// Runs a processor until every order has a shipment, then closes it.
async fn ship_the_rest(client: &Client, orders: &[Order]) -> Deduplicator {
    let mut processor = Processor::start(client.clone(), processor_config()).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let running = {
        let stop = stop.clone();
        tokio::spawn(async move {
            processor.run(&stop).await.unwrap();
            processor.close().await.unwrap();
        })
    };
    let mut seen = Deduplicator::default();
    let all_shipped = wait_for(Duration::from_secs(30), async || {
        seen = read_all(client, "shipments").await.unwrap();
        orders.iter().all(|o| seen.kept.contains_key(&o.id))
    })
    .await;
    stop.store(true, Ordering::Release);
    running.await.unwrap();
    assert!(all_shipped, "{} of {} orders shipped", seen.kept.len(), orders.len());
    read_all(client, "shipments").await.unwrap()
}

/// Every order has exactly one shipment after de-duplication, with the
/// content made from it, and the group committed every order.
async fn check_shipments(client: &Client, orders: &[Order], seen: &Deduplicator) {
    assert_eq!(seen.kept.len(), orders.len(), "one shipment per order, none for anything else");
    for o in orders {
        assert_eq!(seen.kept.get(&o.id), Some(&Shipment::for_order(o)), "order {}", o.id);
    }
    assert_eq!(seen.conflicting, 0, "a re-sent shipment has the same content");
    let committed = client.admin().group_offsets("shipping", &TopicPartitions::new()).await.unwrap();
    let committed: BTreeMap<u32, i64> = committed.iter().map(|((_, p), c)| (*p, c.offset)).collect();
    let order_ends = ends(client, "orders").await.unwrap();
    assert_eq!(committed, order_ends.into_iter().filter(|(_, e)| *e > 0).collect(), "every order committed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_crash_between_shipping_and_committing_ships_again_and_dedup_drops_it() {
    let root = tempfile::tempdir().unwrap();
    let (cluster, client) = orders_cluster(root.path()).await;
    let orders = make_orders("o", 0, 30);
    produce_orders(&client, "orders", &orders).await.unwrap();

    let mut crashed = Processor::start(client.clone(), processor_config()).unwrap();
    let mut shipped = orders::processor::Shipped::default();
    let got_some = wait_for(Duration::from_secs(20), async || {
        shipped = crashed.ship_next().await.unwrap();
        shipped.count > 0
    })
    .await;
    assert!(got_some, "the first processor shipped nothing");
    drop(crashed); // no commit, no leave

    let seen = ship_the_rest(&client, &orders).await;
    check_shipments(&client, &orders, &seen).await;
    for id in &shipped.order_ids {
        assert!(
            seen.dropped.get(id).is_some_and(|n| *n >= 1),
            "order {id} was shipped, not committed, and shipped again"
        );
    }
    println!("dropped {} duplicate shipments", seen.duplicates());
    cluster.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_processor_killed_at_random_points_ships_every_order_once_after_dedup() {
    let seed = std::env::var("TALLY_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
        (now.as_secs() ^ u64::from(now.subsec_nanos()) << 20) | 1
    });
    println!("seed {seed} (set TALLY_TEST_SEED to repeat)");
    let mut rng = XorShift(seed);
    let root = tempfile::tempdir().unwrap();
    let (cluster, client) = orders_cluster(root.path()).await;
    let mut orders = Vec::new();
    for round in 0..4 {
        let wave = make_orders("o", orders.len(), 60);
        produce_orders(&client, "orders", &wave).await.unwrap();
        orders.extend(wave);
        let mut processor = Processor::start(client.clone(), processor_config()).unwrap();
        let (shipped_tx, mut shipped) = tokio::sync::watch::channel(0usize);
        let task = tokio::spawn(async move {
            loop {
                match processor.step().await {
                    Ok(n) => shipped_tx.send_modify(|total| *total += n),
                    Err(e) => return e,
                }
            }
        });
        // Kill it at a random point once it is working: after its first
        // shipments, somewhere in the steps that follow (polling, sending,
        // flushing or committing).
        let after = 1 + usize::try_from(rng.below(14)).unwrap();
        // (The `Ref` that `wait_for` answers holds the value's lock: it is
        // dropped at the end of this statement.)
        let working =
            matches!(tokio::time::timeout(Duration::from_secs(20), shipped.wait_for(|n| *n >= after)).await, Ok(Ok(_)));
        assert!(working, "round {round}: the processor never shipped {after} orders");
        let delay_ms = rng.below(15);
        tokio::time::sleep(Duration::from_millis(delay_ms.into())).await;
        task.abort();
        match task.await {
            Err(e) if e.is_cancelled() => {}
            other => panic!("round {round}: the processor stopped on its own: {other:?}"),
        }
        let so_far = read_all(&client, "shipments").await.unwrap();
        let committed = client.admin().group_offsets("shipping", &TopicPartitions::new()).await.unwrap();
        println!(
            "round {round}: killed {delay_ms} ms after its first {after} shipments; {} of {} orders shipped, {} committed",
            so_far.kept.len(),
            orders.len(),
            committed.values().map(|c| c.offset).sum::<i64>()
        );
    }
    let seen = ship_the_rest(&client, &orders).await;
    check_shipments(&client, &orders, &seen).await;
    println!("{} orders, {} duplicate shipments dropped (seed {seed})", orders.len(), seen.duplicates());
    cluster.stop_all().await;
}
