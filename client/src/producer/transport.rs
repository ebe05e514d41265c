//! The producer's view of the cluster: partition layouts, cached leaders, and
//! one Produce call to one broker. Behind a trait so the accumulator and
//! sender can be tested against a fake cluster that fails, delays or loses
//! chosen requests.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use tally_proto::ErrorCode;
use tally_proto::v1::{self as pb};

use crate::client::Client;
use crate::error::{Error, Result};

/// The partitions of a topic, as the metadata has them.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    /// Partition count.
    pub partitions: u32,
    /// Whether each partition has a leader the client can reach.
    pub available: Vec<bool>,
}

/// What the producer needs from a cluster.
pub(crate) trait Transport: Send + Sync + 'static {
    /// The topic's layout; `fresh` asks the cluster instead of the cache.
    fn layout<'a>(&'a self, topic: &'a str, fresh: bool) -> BoxFuture<'a, Result<Layout>>;

    /// The address of the partition's leader, from the cache only (the
    /// sender never waits on metadata); `None` when unknown.
    fn leader(&self, topic: &str, partition: u32) -> Option<Arc<str>>;

    /// Asks the cluster for the topic's metadata again (after `leader`
    /// answered `None`).
    fn refresh(&self, topic: Arc<str>) -> BoxFuture<'static, ()>;

    /// Sends one Produce request to the broker at `leader`.
    fn produce(&self, leader: Arc<str>, request: pb::ProduceRequest)
    -> BoxFuture<'static, Result<pb::ProduceResponse>>;

    /// Learns from a partition's failed answer: follows a NOT_LEADER hint, or
    /// forgets what is cached about the topic.
    fn partition_failed(&self, topic: &str, partition: u32, error: &Error, hint: Option<(u32, u32)>);

    /// InitProducerId: a new producer id (`None`), or the epoch after
    /// `current` (KIP-360's bump).
    fn init_producer_id(&self, current: Option<(i64, i16)>) -> BoxFuture<'static, Result<(i64, i16)>>;
}

/// The real cluster, through a [`Client`].
#[derive(Debug, Clone)]
pub(crate) struct ClientTransport(pub Client);

impl Transport for ClientTransport {
    fn layout<'a>(&'a self, topic: &'a str, fresh: bool) -> BoxFuture<'a, Result<Layout>> {
        Box::pin(async move {
            if fresh {
                self.0.refresh_metadata(&[topic.to_string()]).await?;
            }
            let info = self.0.topic_info(topic).await?;
            let available: Vec<bool> = info.leaders.iter().map(Option::is_some).collect();
            Ok(Layout { partitions: u32::try_from(available.len()).unwrap_or(u32::MAX), available })
        })
    }

    fn leader(&self, topic: &str, partition: u32) -> Option<Arc<str>> {
        self.0.cached_leader_address(topic, partition)
    }

    fn refresh(&self, topic: Arc<str>) -> BoxFuture<'static, ()> {
        let client = self.0.clone();
        Box::pin(async move {
            if let Err(e) = client.refresh_metadata(&[topic.to_string()]).await {
                tracing::debug!(topic = %topic, error = %e, "metadata refresh failed");
            }
        })
    }

    fn produce(
        &self,
        leader: Arc<str>,
        request: pb::ProduceRequest,
    ) -> BoxFuture<'static, Result<pb::ProduceResponse>> {
        let client = self.0.clone();
        Box::pin(async move {
            let mut rpc = client.rpc_at(&leader)?;
            let mut call = tonic::Request::new(request);
            call.set_timeout(client.config().request_timeout);
            match rpc.produce(call).await {
                Ok(r) => Ok(r.into_inner()),
                Err(status) => {
                    let e = Error::from(status);
                    if e.is_retriable() {
                        client.forget_channel(&leader);
                    }
                    Err(e)
                }
            }
        })
    }

    fn init_producer_id(&self, current: Option<(i64, i16)>) -> BoxFuture<'static, Result<(i64, i16)>> {
        let client = self.0.clone();
        Box::pin(async move { client.init_producer_id(current).await })
    }

    fn partition_failed(&self, topic: &str, partition: u32, error: &Error, hint: Option<(u32, u32)>) {
        match (error.code(), hint) {
            (Some(ErrorCode::NotLeaderOrFollower), Some((leader, epoch))) => {
                self.0.follow_leader_hint(topic, partition, leader, epoch);
            }
            _ if error.is_retriable() => self.0.invalidate(topic),
            _ => {}
        }
    }
}
