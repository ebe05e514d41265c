//! Read every partition of the `quickstart` topic from the beginning and stop
//! at the end.
//!
//! Run `cargo run --example quickstart_producer` first, then:
//! `cargo run --example quickstart_consumer`.

use tally_client::{Client, Consumer, ConsumerConfig, SeekTo};

#[tokio::main]
async fn main() -> Result<(), tally_client::Error> {
    let bootstrap = std::env::var("TALLY_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let client = Client::builder().bootstrap([bootstrap]).connect().await?;
    let partitions = client.topic_info("quickstart").await?.leaders.len() as u32;
    let consumer = Consumer::new(client, ConsumerConfig::default());
    for p in 0..partitions {
        consumer.assign("quickstart", p, SeekTo::Beginning).await?;
    }
    loop {
        for r in consumer.poll().await? {
            let key = r.key.as_deref().map(String::from_utf8_lossy).unwrap_or_default();
            let value = r.value.as_deref().map(String::from_utf8_lossy).unwrap_or_default();
            println!("{}/{} @{}: {key} = {value}", r.topic, r.partition, r.offset);
        }
        if consumer.at_end() {
            return Ok(());
        }
    }
}
