//! Accounts as event-sourced aggregates on Tally, with conditional append.
//!
//! Start a cluster (`cargo run --release -- dev`), then:
//! `cargo run --example bank` (`TALLY_BOOTSTRAP` names the brokers; default
//! 127.0.0.1:9092).
//!
//! The demo opens three accounts, deposits and withdraws (an overdraft is
//! refused by the account's rules), races five withdrawals against one
//! balance (conditional append lets only the ones the balance covers
//! through), runs a transfer as a saga and two whose credit fails (a
//! closed target, a forced failure) and are compensated, builds the
//! balances read model with a consumer group and rebuilds it from offset
//! 0, and snapshots an account and reloads it from the snapshot. See `bank.rs` for the design; the test in
//! `tests/it/examples.rs` checks every claim.

#[path = "bank.rs"]
mod bank;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bank::account::Command;
use bank::projection::{Balances, Projection, ends, rebuild};
use bank::saga::{Fault, transfer};
use bank::snapshot::SnapshotStore;
use bank::store::EventStore;
use bank::topics::Topics;
use tally_client::Client;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let bootstrap = std::env::var("TALLY_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let client = Client::builder().bootstrap(bootstrap.split(',')).connect().await?;
    let topics = Topics {
        events: "bank-events".into(),
        snapshots: "bank-snapshots".into(),
        partitions: 3,
        replication_factor: 3,
    };
    topics.create(&client).await?;
    let snapshots = SnapshotStore::load(client.clone(), &topics.snapshots).await?;
    let store = EventStore::open(client.clone(), &topics.events, Some(snapshots.clone())).await?;

    // Account ids unique to this run, so the demo can run again.
    let run = bank::store::now_ms() % 1_000_000;
    let [alice, bob, carol] = ["alice", "bob", "carol"].map(|n| format!("{n}-{run}"));
    for (who, amount) in [(&alice, 100), (&bob, 20), (&carol, 0)] {
        store.execute(who, &Command::Open).await?;
        println!("opened {who} (partition {})", store.partition_of(who));
        if amount > 0 {
            store.execute(who, &Command::Deposit { amount }).await?;
            println!("  deposited {amount}");
        }
    }
    match store.execute(&bob, &Command::Withdraw { amount: 50 }).await {
        Ok(_) => println!("bob withdrew 50?!"),
        Err(e) => println!("bob withdraws 50: {e}"),
    }

    println!("five concurrent withdrawals of 30 from alice's 100:");
    let racing: Vec<_> = (0..5)
        .map(|_| {
            let (store, alice) = (store.clone(), alice.clone());
            tokio::spawn(async move { store.execute(&alice, &Command::Withdraw { amount: 30 }).await })
        })
        .collect();
    for r in racing {
        match r.await? {
            Ok(a) => println!("  withdrew 30 at offset {:?} after {} conflicts", a.offset, a.conflicts),
            Err(e) => println!("  {e}"),
        }
    }

    store.execute(&alice, &Command::Deposit { amount: 50 }).await?;
    let outcome = transfer(&store, &format!("t1-{run}"), &alice, &bob, 40, Fault::None).await?;
    println!("transfer 40 alice -> bob: {outcome:?}");
    store.execute(&carol, &Command::Close).await?;
    let outcome = transfer(&store, &format!("t2-{run}"), &bob, &carol, 10, Fault::None).await?;
    println!("transfer 10 bob -> carol (closed): {outcome:?}");
    let outcome = transfer(&store, &format!("t3-{run}"), &bob, &alice, 5, Fault::RejectCredit).await?;
    println!("transfer 5 bob -> alice, credit forced to fail: {outcome:?}");
    println!("bob's events:");
    for e in store.history(&bob).await? {
        println!("  {:>5}  {:?}", e.offset, e.event);
    }
    println!("conflicts met and retried: {}", store.conflicts());

    let model = Arc::new(Mutex::new(Balances::default()));
    // This read model lives in memory, so each run builds it afresh in a
    // group of its own, from offset 0. A model kept in a database would keep
    // one group and resume from its commits (the test shows both).
    let group = format!("bank-balances-{run}");
    let mut projection = Projection::start(client.clone(), &topics.events, &group, model.clone(), None)?;
    projection.run_to(&ends(&client, &topics.events).await?, Duration::from_secs(60)).await?;
    println!("projection: applied {} records, committing after each poll", projection.received().records);
    projection.close().await?;
    let balances = model.lock().unwrap_or_else(std::sync::PoisonError::into_inner).balances.clone();
    let rebuilt = rebuild(&client, &topics.events).await?.balances;
    for who in [&alice, &bob, &carol] {
        let shown =
            |b: &std::collections::BTreeMap<String, i64>| b.get(who.as_str()).map_or("closed".into(), i64::to_string);
        println!("read model: {who} = {} (rebuilt from offset 0: {})", shown(&balances), shown(&rebuilt));
    }

    let loaded = store.load(&alice).await?;
    let snapshot = snapshots.save(&loaded).await?;
    println!("snapshot of {alice}: balance {} covering offsets below {}", snapshot.account.balance, snapshot.covers);
    let restarted = EventStore::open(client.clone(), &topics.events, Some(snapshots)).await?;
    let again = restarted.load(&alice).await?;
    println!(
        "reloaded {alice} from its snapshot: replayed from offset {}, {} records read, balance {}",
        again.replayed_from, again.records_read, again.account.balance
    );
    Ok(())
}
