//! Consume-transform-produce on Tally: orders in, one shipment per order
//! out, offsets committed after the shipments are acknowledged.
//!
//! Start a cluster (`cargo run --release -- dev`), then:
//! `cargo run --example orders` (`TALLY_BOOTSTRAP` names the brokers;
//! default 127.0.0.1:9092).
//!
//! The demo produces 20 orders, lets a processor ship some of them and
//! stop before it commits, as a crash there would (Tally has no
//! transactions: the shipments are written, the commit is not), starts a
//! new processor that ships the rest (re-sending the uncommitted ones), and
//! reads `shipments` back, de-duplicating by the `order-id` header. See
//! `orders.rs` for why.

#[path = "orders.rs"]
mod orders;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use orders::dedup::read_all;
use orders::processor::{Processor, ProcessorConfig};
use orders::setup::{create_topics, make_orders, produce_orders};
use tally_client::Client;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let bootstrap = std::env::var("TALLY_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let client = Client::builder().bootstrap(bootstrap.split(',')).connect().await?;
    create_topics(&client, ["orders", "shipments"], 3, 3).await?;
    // Order ids unique to this run, so the demo can run again.
    let run = format!("run{}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs());
    let orders = make_orders(&run, 0, 20);
    produce_orders(&client, "orders", &orders).await?;
    println!("produced {} orders", orders.len());

    let config = ProcessorConfig {
        orders: "orders".into(),
        shipments: "shipments".into(),
        group: "shipping".into(),
        records_per_commit: 5,
        session_timeout: None,
    };
    let mut first = Processor::start(client.clone(), config.clone())?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let shipped = loop {
        let shipped = first.ship_next().await?;
        if shipped.count > 0 || Instant::now() > deadline {
            break shipped;
        }
    };
    println!("processor 1 shipped {} orders and stopped before committing them", shipped.count);
    first.abandon().await?;

    println!("processor 2 starts from the last commit");
    let mut second = Processor::start(client.clone(), config)?;
    let stop = Arc::new(AtomicBool::new(false));
    let running = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let outcome = second.run(&stop).await;
            second.close().await?;
            outcome
        })
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    let seen = loop {
        let seen = read_all(&client, "shipments").await?;
        let done = orders.iter().all(|o| seen.kept.contains_key(&o.id));
        if done || Instant::now() > deadline {
            break seen;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    stop.store(true, Ordering::Release);
    running.await??;
    let ours = orders.iter().filter(|o| seen.kept.contains_key(&o.id)).count();
    let dropped: usize = orders.iter().filter_map(|o| seen.dropped.get(&o.id)).sum();
    println!(
        "shipments: {ours} of {} orders shipped; {dropped} duplicates dropped by the {} header ({} in the topic)",
        orders.len(),
        orders::order::ORDER_ID_HEADER,
        seen.duplicates()
    );
    Ok(())
}
