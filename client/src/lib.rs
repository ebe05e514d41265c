//! The Rust client for Tally.
//!
//! - [`Client`]: connections and cluster metadata; cheap to clone.
//! - [`Producer`]: batching, partitioning (Kafka's murmur2 for keys, sticky
//!   for the rest), retries with backoff, bounded memory.
//! - [`Consumer`]: manual assignment, seeking and pausing while streaming,
//!   background fetching bounded in bytes.
//! - [`PartitionClient`]: one partition, no batching; for tools and tests.
//! - [`Admin`]: topics and their configs.
//!
//! ```no_run
//! # async fn demo() -> Result<(), tally_client::Error> {
//! use tally_client::{Client, NewTopic, Producer, ProducerConfig, ProducerRecord};
//! let client = Client::builder().bootstrap(["127.0.0.1:9092"]).connect().await?;
//! client.admin().create_topic(NewTopic::new("greetings", 3)).await?;
//! let producer = Producer::new(client.clone(), ProducerConfig::default());
//! let meta = producer.send(ProducerRecord::new("greetings", b"hello").key(b"me")).await?.await?;
//! println!("partition {} offset {}", meta.partition, meta.offset);
//! # Ok(()) }
//! ```

mod admin;
mod client;
mod consumer;
mod error;
mod fetch_buffer;
mod group;
mod membership;
mod partition_client;
pub use tally_proto::partitioner;
mod producer;

pub use admin::{
    Admin, BrokerDescription, ClusterDescription, CompactionProgress, NewTopic, PartitionDescription, TopicDescription,
    TopicListing, VoterDescription,
};
pub use client::{Client, ClientBuilder, ClientConfig, TopicInfo};
pub use consumer::{Consumer, ConsumerConfig, ConsumerRecord, Headers, OffsetReset, RecordStream, SeekTo};
pub use error::{Error, Result};
pub use group::{CommittedOffset, GroupDescription, GroupListing, GroupMember, TopicPartitions};
pub use membership::{RebalanceEvent, RebalanceListener};
pub use partition_client::{Acks, AppendIfError, FetchedBatches, OffsetSpec, PartitionClient};
pub use producer::{
    DeliveryError, DeliveryFuture, Producer, ProducerConfig, ProducerRecord, RecordMetadata, UndeliveredRecord,
};
pub use tally_proto::ErrorCode;
pub use tally_proto::batch::HeaderRef;
pub use tally_proto::compression::Compression;
