//! Produce a few keyed records and print where they landed.
//!
//! Start a broker first (`cargo run --release -- dev`), then:
//! `cargo run --example quickstart_producer`.

use tally_client::{Client, NewTopic, Producer, ProducerConfig, ProducerRecord};

#[tokio::main]
async fn main() -> Result<(), tally_client::Error> {
    let bootstrap = std::env::var("TALLY_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let client = Client::builder().bootstrap([bootstrap]).connect().await?;
    match client.admin().create_topic(NewTopic::new("quickstart", 3)).await {
        Err(e) if e.code() != Some(tally_client::ErrorCode::TopicAlreadyExists) => return Err(e),
        _ => {}
    }
    let producer = Producer::new(client, ProducerConfig::default());
    let mut deliveries = Vec::new();
    for i in 0..10 {
        let key = format!("user-{}", i % 3);
        let value = format!("clicked button {i}");
        let record = ProducerRecord::new("quickstart", value.as_bytes()).key(key.as_bytes());
        deliveries.push(producer.send(record).await?);
    }
    for d in deliveries {
        let meta = d.await?;
        println!("{} -> partition {} offset {}", meta.topic(), meta.partition, meta.offset);
    }
    producer.close().await;
    Ok(())
}
