//! The bank's two topics: the events (the truth) and the snapshots
//! (compacted: the last one per account).

use tally_client::{Client, ErrorCode, NewTopic};

/// Names and shape of the bank's topics.
#[derive(Debug, Clone)]
pub struct Topics {
    /// The events topic.
    pub events: String,
    /// The compacted snapshots topic.
    pub snapshots: String,
    /// Partitions of each.
    pub partitions: u32,
    /// Replicas of each partition (with 3, `min_insync_replicas` is 2).
    pub replication_factor: u32,
}

impl Topics {
    /// Creates both topics; one that exists already is left as it is.
    pub async fn create(&self, client: &Client) -> anyhow::Result<()> {
        let min_isr = if self.replication_factor >= 3 { "2" } else { "1" };
        let events = NewTopic {
            replication_factor: self.replication_factor,
            ..NewTopic::new(&self.events, self.partitions).config("min_insync_replicas", min_isr)
        };
        let snapshots = NewTopic {
            replication_factor: self.replication_factor,
            ..NewTopic::new(&self.snapshots, self.partitions)
                .config("min_insync_replicas", min_isr)
                .config("cleanup_policy", "compact")
        };
        for topic in [events, snapshots] {
            match client.admin().create_topic(topic).await {
                Err(e) if e.code() != Some(ErrorCode::TopicAlreadyExists) => return Err(e.into()),
                _ => {}
            }
        }
        Ok(())
    }
}
