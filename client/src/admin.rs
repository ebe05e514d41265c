//! [`Admin`]: create, delete, list, describe and alter topics.

use std::collections::BTreeMap;

use tally_proto::v1::{self as pb};

use crate::client::Client;
use crate::error::{Error, Result};

/// A topic to create.
#[derive(Debug, Clone, Default)]
pub struct NewTopic {
    /// Name.
    pub name: String,
    /// Partitions (0: the broker default).
    pub partitions: u32,
    /// Replicas per partition (0: the default).
    pub replication_factor: u32,
    /// Config overrides, e.g. `retention_ms`.
    pub configs: BTreeMap<String, String>,
}

impl NewTopic {
    /// A topic with `partitions` partitions and one replica each.
    pub fn new(name: impl Into<String>, partitions: u32) -> Self {
        NewTopic { name: name.into(), partitions, replication_factor: 1, configs: BTreeMap::new() }
    }

    /// Sets a config override.
    pub fn config(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.configs.insert(key.into(), value.into());
        self
    }
}

/// One partition as `describe` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct PartitionDescription {
    /// Partition number.
    pub partition: u32,
    /// Leader broker, if any.
    pub leader: Option<u32>,
    /// Leader epoch.
    pub leader_epoch: u32,
    /// Replica brokers.
    pub replicas: Vec<u32>,
    /// In-sync replicas.
    pub isr: Vec<u32>,
    /// First offset.
    pub log_start_offset: i64,
    /// High watermark (-1 when the leader could not be asked).
    pub high_watermark: i64,
    /// The leader's log end offset (-1 when it could not be asked).
    pub log_end_offset: i64,
    /// Each follower's lag behind the leader's log end, in offsets (`None`
    /// before its first fetch in this leader epoch).
    pub replica_lags: Vec<(u32, Option<u64>)>,
    /// Why the named leader cannot serve the partition, when it said so (it
    /// could not take the leadership, or its log failed; it retries).
    pub leader_error: Option<String>,
    /// Compaction progress, for a compacted topic (from its leader).
    pub compaction: Option<CompactionProgress>,
}

/// How far compaction of a partition got, as its leader reports it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CompactionProgress {
    /// Share of the cleanable bytes not cleaned yet (0 to 1).
    pub dirty_ratio: f64,
    /// The log is cleaned below this offset.
    pub cleaner_offset: i64,
    /// When the last clean ended (ms since the epoch), if since the leader
    /// started.
    pub last_clean_ms: Option<i64>,
}

/// A topic as `describe` shows it.
#[derive(Debug, Clone)]
pub struct TopicDescription {
    /// Name.
    pub name: String,
    /// Effective configs.
    pub configs: BTreeMap<String, String>,
    /// Partitions.
    pub partitions: Vec<PartitionDescription>,
}

/// A topic as `list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicListing {
    /// Name.
    pub name: String,
    /// Partition count.
    pub partitions: u32,
    /// Replication factor.
    pub replication_factor: u32,
}

/// A controller voter as `describe_cluster` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VoterDescription {
    /// Node id.
    pub id: u32,
    /// Highest metadata log index known on it (when the leader answered).
    pub matched_index: Option<u64>,
    /// Entries it is behind the leader (when the leader answered).
    pub lag: Option<u64>,
}

/// A broker as `describe_cluster` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerDescription {
    /// Node id.
    pub id: u32,
    /// Advertised address.
    pub address: String,
    /// Random per process start.
    pub incarnation: u64,
    /// True while it may not lead (its session lapsed, or it is starting).
    pub fenced: bool,
}

/// The controller quorum and the brokers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterDescription {
    /// The broker that answered.
    pub answered_by: u32,
    /// The controller leader, or `None` during an election.
    pub leader: Option<u32>,
    /// Raft term.
    pub term: u64,
    /// Highest metadata log index the answering voter applied (applied
    /// entries are committed).
    pub commit_index: Option<u64>,
    /// Controller voters.
    pub voters: Vec<VoterDescription>,
    /// Registered brokers.
    pub brokers: Vec<BrokerDescription>,
}

/// Admin operations; get one from [`Client::admin`].
///
/// ```no_run
/// # async fn demo(client: tally_client::Client) -> Result<(), tally_client::Error> {
/// use tally_client::NewTopic;
/// client.admin().create_topic(NewTopic::new("orders", 3).config("retention_ms", "86400000")).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Admin {
    client: Client,
}

fn check(r: Option<pb::TopicResult>, topic: &str) -> Result<()> {
    let r = r.ok_or_else(|| Error::InvalidArgument("empty answer from the broker".into()))?;
    if r.error_code != 0 {
        return Err(Error::broker(r.error_code, r.error_message, topic, None));
    }
    Ok(())
}

/// Attempts of an admin change whose answer left its outcome unknown.
const ADMIN_ATTEMPTS: usize = 4;
/// The wait before such an attempt.
const ADMIN_RETRY_BACKOFF: std::time::Duration = std::time::Duration::from_millis(200);

fn is_unknown_topic(e: &Error) -> bool {
    matches!(e, Error::Broker { code, .. } if *code == tally_proto::ErrorCode::UnknownTopicOrPartition)
}

impl Admin {
    pub(crate) fn new(client: Client) -> Self {
        Admin { client }
    }

    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    /// Creates a topic.
    pub async fn create_topic(&self, topic: NewTopic) -> Result<()> {
        let name = topic.name.clone();
        let request = pb::CreateTopicsRequest {
            topics: vec![pb::NewTopic {
                name: topic.name,
                num_partitions: topic.partitions,
                replication_factor: topic.replication_factor,
                configs: topic.configs.into_iter().collect(),
            }],
            validate_only: false,
        };
        let response = self.client.admin_rpc().create_topics(request).await?.into_inner();
        check(response.results.into_iter().next(), &name)?;
        self.client.invalidate(&name);
        Ok(())
    }

    /// Deletes a topic and its data. An answer that may or may not have
    /// applied (a timeout, a lost connection) is retried; a retry that finds
    /// the topic gone counts as done.
    pub async fn delete_topic(&self, name: &str) -> Result<()> {
        let mut attempt = 0;
        loop {
            let outcome = self.delete_topic_once(name).await;
            match outcome {
                // Gone on a retry: the earlier attempt (or someone) deleted it.
                Err(e) if attempt > 0 && is_unknown_topic(&e) => return Ok(()),
                // A definite answer about a topic that was never there.
                Err(e) if is_unknown_topic(&e) => return Err(e),
                Err(e) if e.is_retriable() && attempt + 1 < ADMIN_ATTEMPTS => {
                    attempt += 1;
                    tokio::time::sleep(ADMIN_RETRY_BACKOFF).await;
                }
                other => return other,
            }
        }
    }

    async fn delete_topic_once(&self, name: &str) -> Result<()> {
        let request = pb::DeleteTopicsRequest { names: vec![name.to_string()] };
        let response = self.client.admin_rpc().delete_topics(request).await?.into_inner();
        self.client.invalidate(name);
        check(response.results.into_iter().next(), name)
    }

    /// Every topic.
    pub async fn list_topics(&self) -> Result<Vec<TopicListing>> {
        let response = self.client.admin_rpc().list_topics(pb::ListTopicsRequest {}).await?.into_inner();
        Ok(response
            .topics
            .into_iter()
            .map(|t| TopicListing { name: t.name, partitions: t.partitions, replication_factor: t.replication_factor })
            .collect())
    }

    /// A topic's partitions, offsets and configs. Offsets and lags come
    /// from each partition's leader (asked in turn when the answering
    /// broker does not lead it); a leader that cannot be reached leaves
    /// them at -1.
    pub async fn describe_topic(&self, name: &str) -> Result<TopicDescription> {
        let mut t = self.describe_at(None, name).await?;
        let elsewhere: std::collections::BTreeSet<u32> =
            t.partitions.iter().filter(|p| !p.from_leader).filter_map(|p| u32::try_from(p.leader_id).ok()).collect();
        for leader in elsewhere {
            let Ok(address) = self.client.broker_address(leader).await else { continue };
            let Ok(at_leader) = self.describe_at(Some(&address), name).await else { continue };
            for theirs in at_leader.partitions.into_iter().filter(|p| p.from_leader) {
                if let Some(ours) = t.partitions.iter_mut().find(|p| p.partition == theirs.partition && !p.from_leader)
                {
                    *ours = theirs;
                }
            }
        }
        Ok(TopicDescription {
            name: t.name,
            configs: t.configs.into_iter().collect(),
            partitions: t
                .partitions
                .into_iter()
                .map(|p| PartitionDescription {
                    partition: p.partition,
                    leader: u32::try_from(p.leader_id).ok(),
                    leader_epoch: p.leader_epoch,
                    replicas: p.replicas,
                    isr: p.isr,
                    log_start_offset: p.log_start_offset,
                    high_watermark: p.high_watermark,
                    log_end_offset: p.log_end_offset,
                    replica_lags: p.replica_lags.iter().map(|l| (l.broker_id, u64::try_from(l.lag).ok())).collect(),
                    compaction: (p.cleaner_offset >= 0).then_some(CompactionProgress {
                        dirty_ratio: p.dirty_ratio,
                        cleaner_offset: p.cleaner_offset,
                        last_clean_ms: (p.last_clean_ms >= 0).then_some(p.last_clean_ms),
                    }),
                    leader_error: (!p.leader_error.is_empty()).then_some(p.leader_error),
                })
                .collect(),
        })
    }

    /// Every partition's leader, replicas and ISR as the metadata image has
    /// them (one request; no offsets), by topic name.
    pub async fn partition_states(&self) -> Result<Vec<(String, PartitionDescription)>> {
        self.partition_states_at(None).await
    }

    /// [`Admin::partition_states`] as the broker at `address` answers it
    /// (the one this client reaches with `None`): a leader's answer says
    /// which of its partitions it cannot serve.
    pub async fn partition_states_at(&self, address: Option<&str>) -> Result<Vec<(String, PartitionDescription)>> {
        let request = pb::DescribeTopicsRequest { names: Vec::new() };
        let mut rpc = match address {
            Some(a) => self.client.admin_rpc_at(a)?,
            None => self.client.admin_rpc(),
        };
        let response = rpc.describe_topics(request).await?.into_inner();
        let mut out = Vec::new();
        for t in response.topics.into_iter().filter(|t| t.error_code == 0) {
            for p in t.partitions {
                out.push((
                    t.name.clone(),
                    PartitionDescription {
                        partition: p.partition,
                        leader: u32::try_from(p.leader_id).ok(),
                        leader_epoch: p.leader_epoch,
                        replicas: p.replicas,
                        isr: p.isr,
                        log_start_offset: -1,
                        high_watermark: -1,
                        log_end_offset: -1,
                        replica_lags: Vec::new(),
                        compaction: None,
                        leader_error: (!p.leader_error.is_empty()).then_some(p.leader_error),
                    },
                ));
            }
        }
        Ok(out)
    }

    /// One broker's description of topic `name` (the answering broker's
    /// when `address` is `None`).
    async fn describe_at(&self, address: Option<&str>, name: &str) -> Result<pb::TopicDescription> {
        let request = pb::DescribeTopicsRequest { names: vec![name.to_string()] };
        let mut rpc = match address {
            Some(a) => self.client.admin_rpc_at(a)?,
            None => self.client.admin_rpc(),
        };
        let response = rpc.describe_topics(request).await?.into_inner();
        let t = response.topics.into_iter().next().ok_or_else(|| Error::InvalidArgument("empty answer".into()))?;
        if t.error_code != 0 {
            return Err(Error::broker(t.error_code, t.error_message, name, None));
        }
        Ok(t)
    }

    /// Sets config keys (`set`) and resets others to the broker default
    /// (`reset`). Applying the same change twice gives the same configs, so
    /// an answer that may or may not have applied is simply retried; the
    /// broker applies it as a compare-and-set, so no other change is lost.
    pub async fn alter_topic_configs(
        &self,
        name: &str,
        set: BTreeMap<String, String>,
        reset: Vec<String>,
    ) -> Result<()> {
        let mut attempt = 0;
        loop {
            let request = pb::AlterTopicConfigsRequest {
                name: name.to_string(),
                set: set.clone().into_iter().collect(),
                delete: reset.clone(),
            };
            let outcome = async {
                let response = self.client.admin_rpc().alter_topic_configs(request).await?.into_inner();
                check(response.result, name)
            }
            .await;
            match outcome {
                Err(e) if e.is_retriable() && attempt + 1 < ADMIN_ATTEMPTS => {
                    attempt += 1;
                    tokio::time::sleep(ADMIN_RETRY_BACKOFF).await;
                }
                other => return other,
            }
        }
    }

    /// Grows a topic to `count` partitions. An answer that may or may not
    /// have applied is resolved by reading the count back: a topic that has
    /// `count` partitions is done, one with fewer is asked again (the broker
    /// grows it as a compare-and-set on its current count, so never twice).
    pub async fn create_partitions(&self, name: &str, count: u32) -> Result<()> {
        let mut attempt = 0;
        loop {
            let outcome = self.create_partitions_once(name, count).await;
            match outcome {
                Err(e) if e.is_retriable() && attempt + 1 < ADMIN_ATTEMPTS => {
                    attempt += 1;
                    tokio::time::sleep(ADMIN_RETRY_BACKOFF).await;
                    match self.describe_at(None, name).await {
                        Ok(t) if t.partitions.len() == count as usize => return Ok(()),
                        Ok(_) => {}
                        Err(read) if read.is_retriable() => {}
                        Err(read) => return Err(read),
                    }
                }
                other => return other,
            }
        }
    }

    async fn create_partitions_once(&self, name: &str, count: u32) -> Result<()> {
        let request = pb::CreatePartitionsRequest { name: name.to_string(), count };
        let response = self.client.admin_rpc().create_partitions(request).await?.into_inner();
        self.client.invalidate(name);
        check(response.result, name)
    }

    /// The controller quorum and the brokers, as the broker this client
    /// reaches knows them. Voter progress is filled in when that broker is
    /// the controller leader.
    pub async fn describe_cluster(&self) -> Result<ClusterDescription> {
        let r = self.client.admin_rpc().describe_cluster(pb::DescribeClusterRequest {}).await?.into_inner();
        Ok(ClusterDescription {
            answered_by: r.node_id,
            leader: r.leader,
            term: r.term,
            commit_index: r.applied_index,
            voters: r
                .voters
                .into_iter()
                .map(|v| VoterDescription { id: v.id, matched_index: v.matched_index, lag: v.lag })
                .collect(),
            brokers: r
                .brokers
                .into_iter()
                .map(|b| BrokerDescription {
                    id: b.id,
                    address: b.address,
                    incarnation: b.incarnation,
                    fenced: b.fenced,
                })
                .collect(),
        })
    }
}
