//! [`Client`]: connections to the cluster and its metadata.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tally_proto::connection::{Connection as Channel, ConnectionSettings};
use tally_proto::v1::admin_client::AdminClient;
use tally_proto::v1::groups_client::GroupsClient;
use tally_proto::v1::tally_client::TallyClient;
use tally_proto::v1::{self as pb};

use crate::error::{Error, Result};

/// Largest message the client sends or accepts.
pub(crate) const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Settings for [`Client`] (set through [`ClientBuilder`]).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClientConfig {
    /// Brokers to ask for metadata first (`host:port`).
    pub bootstrap: Vec<String>,
    /// Time allowed to open a connection. Default 5 s.
    pub connect_timeout: Duration,
    /// Time allowed for one request, on top of any long-poll wait. Default 30 s.
    pub request_timeout: Duration,
    /// Cached topic metadata older than this is fetched again, so added
    /// partitions and moved leaders are seen (Kafka's `metadata.max.age.ms`).
    /// Default 5 minutes.
    pub metadata_max_age: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            bootstrap: vec!["127.0.0.1:9092".to_string()],
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            metadata_max_age: Duration::from_secs(300),
        }
    }
}

/// Builds a [`Client`].
#[derive(Debug, Clone, Default)]
pub struct ClientBuilder {
    config: ClientConfig,
}

impl ClientBuilder {
    /// Brokers to bootstrap from.
    pub fn bootstrap<I, S>(mut self, addresses: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.config.bootstrap = addresses.into_iter().map(Into::into).collect();
        self
    }

    /// Time allowed to open a connection.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.config.connect_timeout = timeout;
        self
    }

    /// Time allowed for one request.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.config.request_timeout = timeout;
        self
    }

    /// How long cached topic metadata is used before it is fetched again.
    pub fn metadata_max_age(mut self, age: Duration) -> Self {
        self.config.metadata_max_age = age;
        self
    }

    /// Connects to the first bootstrap broker that answers a metadata request.
    pub async fn connect(self) -> Result<Client> {
        let config = self.config;
        if config.bootstrap.is_empty() {
            return Err(Error::InvalidArgument("no bootstrap address".into()));
        }
        let mut last = String::new();
        for address in &config.bootstrap {
            // Opens on the metadata request below; a broker that is not
            // there fails that request.
            let channel = connection(address, &config)?;
            let client = Client {
                inner: Arc::new(Inner {
                    config: config.clone(),
                    bootstrap: channel.clone(),
                    answering: RwLock::new(address.clone()),
                    channels: RwLock::new(HashMap::from([(address.clone(), channel)])),
                    metadata: RwLock::new(Metadata::default()),
                    refresh: tokio::sync::Mutex::new(Refreshed::default()),
                    refresh_generation: std::sync::atomic::AtomicU64::new(0),
                }),
            };
            match client.refresh_metadata(&[]).await {
                Ok(()) => return Ok(client),
                Err(e) => last = format!("{address}: {e}"),
            }
        }
        Err(Error::Connect { addresses: config.bootstrap.join(","), message: last })
    }
}

fn connection(address: &str, config: &ClientConfig) -> Result<Channel> {
    let mut settings = ConnectionSettings::default();
    settings.connect_timeout = config.connect_timeout;
    Channel::lazy(address, settings).map_err(Error::InvalidArgument)
}

/// What the client knows of one topic.
#[derive(Debug, Clone)]
pub struct TopicInfo {
    /// Leader broker id of each partition (`None` while leaderless).
    pub leaders: Vec<Option<u32>>,
    /// Leader epoch of each partition.
    pub leader_epochs: Vec<u32>,
    /// When this was fetched.
    fetched_at: std::time::Instant,
}

impl TopicInfo {
    /// This info with `partition` led by `leader` in `epoch`, when that is
    /// newer than what it has (a NOT_LEADER_OR_FOLLOWER answer's hint);
    /// `None` when the hint is stale or names no partition of it.
    pub fn with_leader(&self, partition: u32, leader: u32, epoch: u32) -> Option<TopicInfo> {
        let i = partition as usize;
        let known = *self.leader_epochs.get(i)?;
        if epoch < known || (epoch == known && self.leaders[i] == Some(leader)) {
            return None;
        }
        let mut next = self.clone();
        next.leaders[i] = Some(leader);
        next.leader_epochs[i] = epoch;
        Some(next)
    }
}

#[derive(Debug, Default)]
struct Metadata {
    brokers: HashMap<u32, String>,
    topics: HashMap<String, Arc<TopicInfo>>,
}

#[derive(Debug)]
struct Inner {
    config: ClientConfig,
    bootstrap: Channel,
    /// The broker that last answered a metadata request: admin requests go there.
    answering: RwLock<String>,
    channels: RwLock<HashMap<String, Channel>>,
    metadata: RwLock<Metadata>,
    /// One metadata refresh in flight at a time; callers that waited for
    /// one that covered their topics take its answer instead of asking again.
    refresh: tokio::sync::Mutex<Refreshed>,
    /// `Refreshed::generation`, readable without the lock.
    refresh_generation: std::sync::atomic::AtomicU64,
}

/// The last successful metadata refresh.
#[derive(Debug, Default)]
struct Refreshed {
    /// Counts successful refreshes.
    generation: u64,
    /// The topics it asked for; `None` for all.
    topics: Option<std::collections::BTreeSet<String>>,
}

impl Refreshed {
    fn covers(&self, topics: &[String]) -> bool {
        match &self.topics {
            None => true,
            Some(asked) => !topics.is_empty() && topics.iter().all(|t| asked.contains(t)),
        }
    }
}

/// A connection to a Tally cluster. Cheap to clone; clones share
/// connections and metadata.
///
/// ```no_run
/// # async fn demo() -> Result<(), tally_client::Error> {
/// let client = tally_client::Client::builder().bootstrap(["127.0.0.1:9092"]).connect().await?;
/// let topics = client.admin().list_topics().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl Client {
    /// A builder with default settings (bootstrap `127.0.0.1:9092`).
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// The settings.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// Admin operations.
    pub fn admin(&self) -> crate::Admin {
        crate::Admin::new(self.clone())
    }

    /// A client for one partition.
    pub fn partition_client(&self, topic: impl Into<String>, partition: u32) -> crate::PartitionClient {
        crate::PartitionClient::new(self.clone(), topic.into(), partition)
    }

    pub(crate) fn admin_rpc(&self) -> AdminClient<Channel> {
        let answering = self.inner.answering.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        let channel = self.channel(&answering).unwrap_or_else(|_| self.inner.bootstrap.clone());
        AdminClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    fn tally_rpc(channel: Channel) -> TallyClient<Channel> {
        TallyClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// Asks the cluster for brokers and topics (`topics` empty: all) and
    /// caches the answer. Refreshes are coalesced: while one is in flight,
    /// others wait for it, and take its answer when it covered their topics.
    pub async fn refresh_metadata(&self, topics: &[String]) -> Result<()> {
        use std::sync::atomic::Ordering;
        let seen = self.inner.refresh_generation.load(Ordering::Acquire);
        let mut last = self.inner.refresh.lock().await;
        if last.generation != seen && last.covers(topics) {
            return Ok(());
        }
        self.refresh_now(topics).await?;
        last.generation += 1;
        last.topics = (!topics.is_empty()).then(|| topics.iter().cloned().collect());
        self.inner.refresh_generation.store(last.generation, Ordering::Release);
        Ok(())
    }

    async fn refresh_now(&self, topics: &[String]) -> Result<()> {
        let response = self.metadata_from_any_broker(topics).await?;
        let mut md = self.inner.metadata.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        md.brokers = response.brokers.into_iter().map(|b| (b.node_id, b.address)).collect();
        for t in response.topics {
            if t.error_code != 0 {
                md.topics.remove(&t.name);
                continue;
            }
            let mut leaders = vec![None; t.partitions.len()];
            let mut leader_epochs = vec![0; t.partitions.len()];
            for p in &t.partitions {
                if let Some(slot) = leaders.get_mut(p.partition as usize) {
                    *slot = u32::try_from(p.leader_id).ok();
                    leader_epochs[p.partition as usize] = p.leader_epoch;
                }
            }
            let info = TopicInfo { leaders, leader_epochs, fetched_at: std::time::Instant::now() };
            md.topics.insert(t.name, Arc::new(info));
        }
        Ok(())
    }

    /// Cached metadata of `topic`, fetched if unknown.
    pub async fn topic_info(&self, topic: &str) -> Result<Arc<TopicInfo>> {
        if let Some(info) = self.cached_topic(topic) {
            return Ok(info);
        }
        self.refresh_metadata(&[topic.to_string()]).await?;
        self.cached_topic(topic).ok_or_else(|| Error::Broker {
            code: tally_proto::ErrorCode::UnknownTopicOrPartition,
            message: format!("topic `{topic}` does not exist"),
            topic: topic.to_string(),
            partition: None,
        })
    }

    pub(crate) fn cached_topic(&self, topic: &str) -> Option<Arc<TopicInfo>> {
        let md = self.inner.metadata.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        md.topics.get(topic).filter(|t| t.fetched_at.elapsed() < self.inner.config.metadata_max_age).cloned()
    }

    /// Asks the broker that answered last, then every other known broker and
    /// bootstrap address, until one answers: a cluster stays reachable while
    /// any of its brokers is.
    async fn metadata_from_any_broker(&self, topics: &[String]) -> Result<pb::MetadataResponse> {
        let answering = self.inner.answering.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        let mut candidates = vec![answering];
        {
            let md = self.inner.metadata.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            let mut known: Vec<&String> = md.brokers.values().collect();
            known.sort();
            candidates.extend(known.into_iter().cloned());
        }
        candidates.extend(self.inner.config.bootstrap.iter().cloned());
        let mut seen = std::collections::HashSet::new();
        candidates.retain(|a| seen.insert(a.clone()));
        // A broker that just started answers "catching up" until its image is
        // current: ask the others, and while one is only catching up (not
        // down), ask again with backoff within the request timeout.
        let deadline = std::time::Instant::now() + self.inner.config.request_timeout;
        let mut backoff = Duration::from_millis(50);
        loop {
            let mut last = None;
            let mut catching_up = false;
            for address in &candidates {
                let request = pb::MetadataRequest { topics: topics.to_vec() };
                let mut rpc = Self::tally_rpc(self.channel(address)?);
                let mut call = tonic::Request::new(request);
                call.set_timeout(self.inner.config.request_timeout);
                match rpc.metadata(call).await {
                    Ok(r) if r.get_ref().catching_up => {
                        catching_up = true;
                        last = Some(Error::Broker {
                            code: tally_proto::ErrorCode::LeaderNotAvailable,
                            message: format!("the broker at {address} is catching up with the cluster metadata"),
                            topic: String::new(),
                            partition: None,
                        });
                    }
                    Ok(r) => {
                        *self.inner.answering.write().unwrap_or_else(std::sync::PoisonError::into_inner) =
                            address.clone();
                        return Ok(r.into_inner());
                    }
                    Err(status) => last = Some(Error::from(status)),
                }
            }
            let last = last.unwrap_or_else(|| Error::InvalidArgument("no broker address known".into()));
            if !catching_up || std::time::Instant::now() + backoff > deadline {
                return Err(last);
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }

    /// Takes the leader a NOT_LEADER_OR_FOLLOWER answer named, so the retry
    /// goes there without a metadata round trip; keeps the cache when it
    /// already has that leader at that epoch (the answers of several
    /// requests in flight to the old leader name the same one); forgets the
    /// topic's metadata when the hint cannot be used (older than the cache,
    /// or a broker the cache does not know).
    pub(crate) fn follow_leader_hint(&self, topic: &str, partition: u32, leader: u32, epoch: u32) {
        let mut md = self.inner.metadata.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let known_broker = md.brokers.contains_key(&leader);
        let Some(info) = md.topics.get(topic) else { return };
        let i = partition as usize;
        let followed = info.leader_epochs.get(i) == Some(&epoch) && info.leaders.get(i) == Some(&Some(leader));
        match info.with_leader(partition, leader, epoch) {
            _ if followed && known_broker => {}
            Some(next) if known_broker => {
                md.topics.insert(topic.to_string(), Arc::new(next));
            }
            _ => {
                md.topics.remove(topic);
            }
        }
    }

    /// The error for a request to `address` about `topic` that failed at the
    /// transport: when retrying may help, the leader may have died or moved,
    /// so the topic's metadata and the channel are dropped first.
    pub(crate) fn transport_failed(&self, address: &str, topic: &str, status: tonic::Status) -> Error {
        let e = Error::from(status);
        if e.is_retriable() {
            self.forget_channel(address);
            self.invalidate(topic);
        }
        e
    }

    /// Drops the cached channel to `address` (after a transport error), so
    /// the next call connects afresh.
    pub(crate) fn forget_channel(&self, address: &str) {
        self.inner.channels.write().unwrap_or_else(std::sync::PoisonError::into_inner).remove(address);
    }

    /// Forgets what is cached about `topic` (after NOT_LEADER and the like).
    /// How long one request may take (and the bound on riding out a
    /// leader change or a broker catching up).
    pub(crate) fn request_timeout(&self) -> Duration {
        self.inner.config.request_timeout
    }

    pub(crate) fn invalidate(&self, topic: &str) {
        self.inner.metadata.write().unwrap_or_else(std::sync::PoisonError::into_inner).topics.remove(topic);
    }

    /// An admin gRPC client for the broker at `address`.
    pub(crate) fn admin_rpc_at(&self, address: &str) -> Result<AdminClient<Channel>> {
        Ok(AdminClient::new(self.channel(address)?)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }

    /// The address of broker `id`, from the cache (refreshed once if unknown).
    pub(crate) async fn broker_address(&self, id: u32) -> Result<String> {
        let cached = || {
            let md = self.inner.metadata.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            md.brokers.get(&id).cloned()
        };
        if let Some(a) = cached() {
            return Ok(a);
        }
        self.refresh_metadata(&[]).await?;
        cached().ok_or_else(|| Error::InvalidArgument(format!("broker {id} is not in the cluster metadata")))
    }

    /// A groups gRPC client for the broker at `address`.
    pub(crate) fn groups_rpc_at(&self, address: &str) -> Result<GroupsClient<Channel>> {
        Ok(GroupsClient::new(self.channel(address)?)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }

    /// A groups gRPC client for the broker admin requests go to (the one
    /// that answered last, else the bootstrap addresses).
    pub(crate) fn groups_rpc(&self) -> GroupsClient<Channel> {
        let answering = self.inner.answering.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        let channel = self.channel(&answering).unwrap_or_else(|_| self.inner.bootstrap.clone());
        GroupsClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// Every broker of the cluster, as a fresh metadata answer names them.
    pub(crate) async fn broker_addresses(&self) -> Result<Vec<(u32, String)>> {
        self.refresh_metadata(&[]).await?;
        let md = self.inner.metadata.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut out: Vec<(u32, String)> = md.brokers.iter().map(|(id, a)| (*id, a.clone())).collect();
        out.sort();
        Ok(out)
    }

    /// InitProducerId: a new producer id at epoch 0 (`current` `None`), or
    /// the next epoch of `current` (KIP-360). Any broker answers; the
    /// bootstrap broker is asked first, then every broker the metadata
    /// names while the answer is a retriable failure.
    pub(crate) async fn init_producer_id(&self, current: Option<(i64, i16)>) -> Result<(i64, i16)> {
        let (producer_id, producer_epoch) = current.map_or((-1, -1), |(id, epoch)| (id, i32::from(epoch)));
        let request = tally_proto::v1::InitProducerIdRequest {
            transactional_id: None,
            transaction_timeout_ms: 0,
            producer_id,
            producer_epoch,
        };
        let ask = |mut rpc: TallyClient<Channel>| {
            let request = request.clone();
            let timeout = self.config().request_timeout;
            async move {
                let mut call = tonic::Request::new(request);
                call.set_timeout(timeout);
                let answer = rpc.init_producer_id(call).await.map_err(Error::from)?.into_inner();
                if answer.error_code != 0 {
                    return Err(Error::broker(answer.error_code, answer.error_message, "", None));
                }
                let epoch = i16::try_from(answer.producer_epoch).map_err(|_| {
                    Error::InvalidArgument(format!("producer epoch {} out of range", answer.producer_epoch))
                })?;
                Ok((answer.producer_id, epoch))
            }
        };
        let mut last = match ask(Self::tally_rpc(self.inner.bootstrap.clone())).await {
            Err(e) if e.is_retriable() => e,
            done => return done,
        };
        for (_, address) in self.broker_addresses().await.unwrap_or_default() {
            match ask(self.rpc_at(&address)?).await {
                Err(e) if e.is_retriable() => last = e,
                done => return done,
            }
        }
        Err(last)
    }

    /// A gRPC client for the broker at `address`.
    pub(crate) fn rpc_at(&self, address: &str) -> Result<TallyClient<Channel>> {
        Ok(Self::tally_rpc(self.channel(address)?))
    }

    /// The address of the leader of `topic`/`partition`, from the cache
    /// (fetched if unknown). No leader, or a leader missing from the broker
    /// map (it has not registered yet), is a retriable error.
    pub(crate) async fn leader_address(&self, topic: &str, partition: u32) -> Result<String> {
        let mut info = self.topic_info(topic).await?;
        let known = |info: &TopicInfo| {
            let md = self.inner.metadata.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            info.leaders.get(partition as usize).is_some_and(|l| l.is_some_and(|l| md.brokers.contains_key(&l)))
        };
        if !known(&info) {
            // What is cached may be from before an election or a restart: ask again once.
            self.refresh_metadata(&[topic.to_string()]).await?;
            info = self.topic_info(topic).await?;
        }
        let no_leader = |message: String| Error::Broker {
            code: tally_proto::ErrorCode::LeaderNotAvailable,
            message,
            topic: topic.to_string(),
            partition: Some(partition),
        };
        let leader = match info.leaders.get(partition as usize) {
            None => {
                return Err(Error::Broker {
                    code: tally_proto::ErrorCode::UnknownTopicOrPartition,
                    message: format!("topic `{topic}` has no partition {partition}"),
                    topic: topic.to_string(),
                    partition: Some(partition),
                });
            }
            Some(None) => return Err(no_leader("no leader".into())),
            Some(Some(leader)) => *leader,
        };
        let md = self.inner.metadata.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        md.brokers.get(&leader).cloned().ok_or_else(|| no_leader(format!("leader {leader} is not in the metadata yet")))
    }

    /// The address of the leader of `topic`/`partition` from the cache
    /// alone (expired metadata counts as unknown); `None` when not known.
    pub(crate) fn cached_leader_address(&self, topic: &str, partition: u32) -> Option<Arc<str>> {
        let info = self.cached_topic(topic)?;
        let leader = (*info.leaders.get(partition as usize)?)?;
        let md = self.inner.metadata.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        md.brokers.get(&leader).map(|a| Arc::from(a.as_str()))
    }

    /// A gRPC client for the leader of `topic`/`partition`.
    pub(crate) async fn leader(&self, topic: &str, partition: u32) -> Result<TallyClient<Channel>> {
        let address = self.leader_address(topic, partition).await?;
        self.rpc_at(&address)
    }

    fn channel(&self, address: &str) -> Result<Channel> {
        if let Some(c) = self.inner.channels.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(address) {
            return Ok(c.clone());
        }
        let channel = connection(address, &self.inner.config)?;
        self.inner
            .channels
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(address.to_string(), channel.clone());
        Ok(channel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> TopicInfo {
        TopicInfo { leaders: vec![Some(1), None], leader_epochs: vec![3, 0], fetched_at: std::time::Instant::now() }
    }

    #[test]
    fn a_leader_hint_of_a_newer_epoch_replaces_the_cached_leader() {
        let next = info().with_leader(0, 2, 4).expect("newer epoch");
        assert_eq!((next.leaders[0], next.leader_epochs[0]), (Some(2), 4));
        assert_eq!(next.leaders[1], None, "other partitions unchanged");
        let next = info().with_leader(1, 3, 0).expect("a leader for a leaderless partition");
        assert_eq!(next.leaders[1], Some(3));
    }

    #[test]
    fn a_refresh_covers_the_topics_it_asked_for_and_all_covers_everything() {
        let all = Refreshed { generation: 1, topics: None };
        assert!(all.covers(&[]) && all.covers(&["a".into()]));
        let some = Refreshed { generation: 1, topics: Some(["a".to_string(), "b".to_string()].into()) };
        assert!(some.covers(&["a".into()]) && some.covers(&["b".into(), "a".into()]));
        assert!(!some.covers(&["c".into()]) && !some.covers(&[]), "a refresh of some topics is not one of all");
    }

    #[test]
    fn a_stale_or_useless_leader_hint_is_refused() {
        assert!(info().with_leader(0, 2, 2).is_none(), "older epoch");
        assert!(info().with_leader(0, 1, 3).is_none(), "what the cache already says");
        assert!(info().with_leader(5, 1, 9).is_none(), "no such partition");
    }
}
