//! The example's topics, and orders to process.

use tally_client::{Client, ErrorCode, NewTopic, Producer, ProducerConfig, ProducerRecord};

use super::order::{Order, encode};

/// Creates `orders` and `shipments` with `partitions` partitions of
/// `replication_factor` replicas each; a topic that exists is left as it is.
pub async fn create_topics(
    client: &Client,
    names: [&str; 2],
    partitions: u32,
    replication_factor: u32,
) -> anyhow::Result<()> {
    let min_isr = if replication_factor >= 3 { "2" } else { "1" };
    for name in names {
        let topic =
            NewTopic { replication_factor, ..NewTopic::new(name, partitions).config("min_insync_replicas", min_isr) };
        match client.admin().create_topic(topic).await {
            Err(e) if e.code() != Some(ErrorCode::TopicAlreadyExists) => return Err(e.into()),
            _ => {}
        }
    }
    Ok(())
}

/// `count` orders with ids `{prefix}-{n}` for `n` from `first`.
pub fn make_orders(prefix: &str, first: usize, count: usize) -> Vec<Order> {
    let items = ["lamp", "chair", "desk", "rug", "vase"];
    (first..first + count)
        .map(|n| Order {
            id: format!("{prefix}-{n}"),
            customer: format!("customer-{}", n % 7),
            item: items[n % items.len()].to_string(),
            quantity: u32::try_from(n % 4 + 1).unwrap_or(1),
        })
        .collect()
}

/// Produces `orders` to `topic` (keyed by order id) and waits until each
/// is acknowledged.
pub async fn produce_orders(client: &Client, topic: &str, orders: &[Order]) -> anyhow::Result<()> {
    let producer = Producer::try_new(client.clone(), ProducerConfig::default())?;
    let mut deliveries = Vec::with_capacity(orders.len());
    for order in orders {
        let value = encode(order);
        deliveries.push(producer.send(ProducerRecord::new(topic, &value).key(order.id.as_bytes())).await?);
    }
    for d in deliveries {
        d.await?;
    }
    producer.close().await;
    Ok(())
}
