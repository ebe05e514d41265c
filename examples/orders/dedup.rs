//! Downstream de-duplication of shipments by their `order-id` header: the
//! first shipment of an order is kept, later ones are dropped and counted.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tally_client::{Client, Consumer, ConsumerConfig, ConsumerRecord, OffsetSpec, SeekTo};

use super::order::{ORDER_ID_HEADER, Shipment};

/// The shipments kept, by order id, and how many duplicates were dropped.
#[derive(Debug, Default)]
pub struct Deduplicator {
    /// The first shipment seen for each order.
    pub kept: BTreeMap<String, Shipment>,
    /// Shipments dropped because their order had one already, by order id.
    pub dropped: BTreeMap<String, usize>,
    /// Duplicates whose content differed from the kept one (never, since a
    /// shipment is a function of its order).
    pub conflicting: usize,
}

impl Deduplicator {
    /// Shipments dropped, in all.
    pub fn duplicates(&self) -> usize {
        self.dropped.values().sum()
    }

    /// Takes one `shipments` record; returns whether it was new. A record
    /// without the header or with a value that is not a shipment is an
    /// error.
    pub fn offer(&mut self, record: &ConsumerRecord) -> anyhow::Result<bool> {
        let id = record.headers.get(ORDER_ID_HEADER).flatten().ok_or_else(|| {
            anyhow::anyhow!("shipment at {}/{} has no {ORDER_ID_HEADER} header", record.partition, record.offset)
        })?;
        let id = String::from_utf8(id.to_vec())?;
        let value = record.value.as_deref().ok_or_else(|| anyhow::anyhow!("shipment without a value"))?;
        let shipment: Shipment = serde_json::from_slice(value)?;
        anyhow::ensure!(shipment.order_id == id, "header says {id}, shipment says {}", shipment.order_id);
        match self.kept.get(&id) {
            Some(kept) => {
                *self.dropped.entry(id).or_default() += 1;
                if *kept != shipment {
                    self.conflicting += 1;
                }
                Ok(false)
            }
            None => {
                self.kept.insert(id, shipment);
                Ok(true)
            }
        }
    }
}

/// Every record of `topic` from offset 0 to the partitions' ends now,
/// through a [`Deduplicator`].
pub async fn read_all(client: &Client, topic: &str) -> anyhow::Result<Deduplicator> {
    let partitions = u32::try_from(client.topic_info(topic).await?.leaders.len())?;
    let mut config = ConsumerConfig::default();
    config.max_wait = Duration::from_millis(200);
    let consumer = Consumer::new(client.clone(), config);
    let mut ends = BTreeMap::new();
    for p in 0..partitions {
        ends.insert(p, client.partition_client(topic, p).list_offset(OffsetSpec::Latest).await?.unwrap_or(0));
        consumer.assign(topic, p, SeekTo::Offset(0)).await?;
    }
    let mut out = Deduplicator::default();
    let deadline = Instant::now() + Duration::from_secs(30);
    while ends.iter().any(|(p, end)| consumer.position(topic, *p).unwrap_or(0) < *end) {
        anyhow::ensure!(Instant::now() < deadline, "{topic} not read to {ends:?} in time");
        match consumer.poll().await {
            Ok(records) => {
                for r in &records {
                    out.offer(r)?;
                }
            }
            Err(e) if e.is_retriable() => {}
            Err(e) => return Err(e.into()),
        }
    }
    consumer.close().await?;
    Ok(out)
}
