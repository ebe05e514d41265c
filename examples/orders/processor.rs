//! The processor: orders in, shipments out, offsets committed only after
//! the shipments are acknowledged.
//!
//! One step: take up to `records_per_commit` polled orders, send a
//! shipment for each (the idempotent producer, acks=all, the order id in
//! the `order-id` header), flush and check every delivery, then commit the
//! offsets after those orders. Invariant: an order's offset is committed
//! only once its shipment is acknowledged, so a crash at any point loses
//! no order (it may ship one again: see the crate docs).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tally_client::{
    Client, Consumer, ConsumerConfig, ConsumerRecord, HeaderRef, OffsetReset, Producer, ProducerConfig, ProducerRecord,
};

use super::order::{ORDER_ID_HEADER, Order, Shipment, encode};

/// Settings of a [`Processor`].
#[derive(Debug, Clone)]
pub struct ProcessorConfig {
    /// Topic read.
    pub orders: String,
    /// Topic written.
    pub shipments: String,
    /// Consumer group.
    pub group: String,
    /// Orders shipped between two commits.
    pub records_per_commit: usize,
    /// The group session (`None`: the broker's, 45 s): how long a crashed
    /// processor's partitions wait before another takes them.
    pub session_timeout: Option<Duration>,
}

/// Orders shipped by one step, not committed yet.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Shipped {
    /// The next offset to read, by (topic, partition): what to commit.
    pub offsets: BTreeMap<(String, u32), i64>,
    /// Shipments sent and acknowledged.
    pub count: usize,
    /// The orders they ship.
    pub order_ids: Vec<String>,
}

/// A member of the processor group.
#[derive(Debug)]
pub struct Processor {
    consumer: Consumer,
    producer: Producer,
    config: ProcessorConfig,
    /// Polled orders not shipped yet.
    pending: VecDeque<ConsumerRecord>,
}

impl Processor {
    /// Joins the group; a partition the group never committed starts at
    /// offset 0.
    pub fn start(client: Client, config: ProcessorConfig) -> anyhow::Result<Processor> {
        let mut consumer_config = ConsumerConfig::default();
        consumer_config.group_id = Some(config.group.clone());
        consumer_config.enable_auto_commit = false;
        consumer_config.auto_offset_reset = OffsetReset::Earliest;
        consumer_config.max_wait = Duration::from_millis(200);
        consumer_config.session_timeout = config.session_timeout;
        let consumer = Consumer::new(client.clone(), consumer_config);
        consumer.subscribe(&[&config.orders])?;
        // The default: idempotent, acks=all.
        let producer = Producer::try_new(client, ProducerConfig::default())?;
        anyhow::ensure!(producer.is_idempotent(), "the default producer is idempotent");
        Ok(Processor { consumer, producer, config, pending: VecDeque::new() })
    }

    /// Ships the next orders (polling if none are waiting) and waits until
    /// every shipment is acknowledged. Commits nothing.
    pub async fn ship_next(&mut self) -> anyhow::Result<Shipped> {
        if self.pending.is_empty() {
            match self.consumer.poll().await {
                Ok(records) => self.pending.extend(records),
                // A leader moving or a broker restarting: the consumer rides
                // it out in the background. Do not spin meanwhile.
                Err(e) if e.is_retriable() => tokio::time::sleep(Duration::from_millis(100)).await,
                Err(e) => return Err(e.into()),
            }
        }
        let take = self.pending.len().min(self.config.records_per_commit.max(1));
        let mut shipped = Shipped::default();
        let mut deliveries = Vec::with_capacity(take);
        for record in self.pending.drain(..take) {
            shipped.offsets.insert((record.topic.to_string(), record.partition), record.offset + 1);
            let value = record.value.as_deref().unwrap_or_default();
            let order: Order = match serde_json::from_slice(value) {
                Ok(order) => order,
                Err(e) => {
                    eprintln!("skipping the record at {}/{}: not an order: {e}", record.partition, record.offset);
                    continue;
                }
            };
            let shipment = encode(&Shipment::for_order(&order));
            let headers = [HeaderRef { key: ORDER_ID_HEADER, value: Some(order.id.as_bytes()) }];
            let out = ProducerRecord::new(&self.config.shipments, &shipment).key(order.id.as_bytes()).headers(&headers);
            let delivery = self.producer.send(out).await?;
            deliveries.push((order.id, delivery));
        }
        self.producer.flush().await;
        for (id, d) in deliveries {
            d.await?;
            shipped.count += 1;
            shipped.order_ids.push(id);
        }
        Ok(shipped)
    }

    /// Commits what `shipped` covers.
    pub async fn commit(&self, shipped: &Shipped) -> anyhow::Result<()> {
        self.consumer.commit_offsets(&shipped.offsets).await?;
        Ok(())
    }

    /// One step: ship, then commit. A refused commit (this processor lost
    /// the partitions to another member) drops what it had polled: the new
    /// owner reads it again from the last commit. Returns the orders shipped.
    pub async fn step(&mut self) -> anyhow::Result<usize> {
        let shipped = self.ship_next().await?;
        if let Err(e) = self.commit(&shipped).await {
            eprintln!("commit refused ({e:#}); the orders will be shipped again by their new owner");
            self.pending.clear();
        }
        Ok(shipped.count)
    }

    /// Steps until `stop` is set (checked between steps) or an error.
    pub async fn run(&mut self, stop: &AtomicBool) -> anyhow::Result<()> {
        while !stop.load(Ordering::Acquire) {
            self.step().await?;
        }
        Ok(())
    }

    /// Stops as a crash right after [`Processor::ship_next`] would, but
    /// leaves the group at once (a crashed member's partitions wait for its
    /// session to lapse first): what was shipped since the last commit stays
    /// uncommitted, so the next owner ships it again.
    pub async fn abandon(self) -> anyhow::Result<()> {
        self.consumer.close().await?;
        Ok(())
    }

    /// Stops: leaves the group and closes the producer (everything shipped
    /// was committed at its step).
    pub async fn close(self) -> anyhow::Result<()> {
        self.consumer.close().await?;
        self.producer.close().await;
        Ok(())
    }
}
