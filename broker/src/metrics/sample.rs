//! Gauges read at each scrape: partition health and sizes, producer ids,
//! the controller voter's role and log, consumer groups' members and lag,
//! open connections; and the network byte counters, which are atomics
//! added to by every connection and copied into the recorder here.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use metrics::{counter, gauge};
use tally_proto::v1 as pb;
use tally_proto::v1::tally_client::TallyClient;

use super::*;
use crate::broker::Broker;
use crate::controller::BrokerId;
use crate::coordinator::Coordinators;
use crate::coordinator::shard::GroupSample;
use crate::peer::PeerConnections;

/// How long a scrape waits for another leader's end offsets (group lag).
const PEER_TIMEOUT: Duration = Duration::from_secs(2);

/// Reads the state gauges of one broker.
#[derive(Debug)]
pub struct Sampler {
    broker: Arc<Broker>,
    coordinators: Arc<Coordinators>,
    peers: PeerConnections,
}

impl Sampler {
    /// A sampler of `broker` and its group coordinators.
    pub fn new(broker: Arc<Broker>, coordinators: Arc<Coordinators>) -> Sampler {
        let peers = PeerConnections::new(broker.config().peer_source_ip());
        Sampler { broker, coordinators, peers }
    }

    /// Sets every state gauge to its value now.
    pub async fn refresh(&self) {
        self.partitions();
        self.controller();
        self.groups().await;
        gauge!(CONNECTIONS).set(open_connections() as f64);
        // Monotonic process-wide totals: `absolute` raises the counter to them.
        counter!(NETWORK_RECEIVED).absolute(received_bytes());
        counter!(NETWORK_SENT).absolute(sent_bytes());
    }

    fn partitions(&self) {
        let me = BrokerId(self.broker.node_id());
        let active = self.broker.controller_status().is_some_and(|s| s.leader == Some(s.node_id));
        let (mut led, mut under, mut under_min, mut offline, mut producers) = (0u64, 0u64, 0u64, 0u64, 0usize);
        for t in self.broker.topics() {
            for state in &t.states {
                match state.leader {
                    None => offline += 1,
                    Some(leader) if leader == me => {
                        led += 1;
                        under += u64::from(state.isr.len() < state.replicas.len());
                        // What the leader enforces: the recorded value.
                        let min_isr = crate::controller::recorded_min_insync_replicas(&t.overrides);
                        under_min += u64::from((state.isr.len() as u32) < min_isr);
                    }
                    Some(_) => {}
                }
            }
            for (index, p) in &t.partitions {
                let (size, tracked) = p.sizes();
                producers += tracked;
                gauge!(LOG_SIZE, "topic" => t.name.as_str().to_string(), "partition" => index.to_string())
                    .set(size as f64);
            }
        }
        gauge!(PARTITIONS_LED).set(led as f64);
        gauge!(UNDER_REPLICATED).set(under as f64);
        gauge!(UNDER_MIN_ISR).set(under_min as f64);
        gauge!(OFFLINE).set(if active { offline as f64 } else { 0.0 });
        gauge!(PRODUCER_IDS).set(producers as f64);
    }

    fn controller(&self) {
        let Some(s) = self.broker.controller_status() else { return };
        gauge!(CONTROLLER_ACTIVE).set(if s.leader == Some(s.node_id) { 1.0 } else { 0.0 });
        gauge!(RAFT_TERM).set(s.term as f64);
        gauge!(RAFT_LAST_LOG_INDEX).set(s.last_log_index.unwrap_or(0) as f64);
        gauge!(RAFT_APPLIED_INDEX).set(s.applied_index.unwrap_or(0) as f64);
    }

    async fn groups(&self) {
        let samples: Vec<GroupSample> = self
            .coordinators
            .run_all(|shard| shard.samples())
            .await
            .into_iter()
            .filter_map(Result::ok)
            .flatten()
            .collect();
        if samples.is_empty() {
            return;
        }
        let wanted: BTreeSet<(String, u32)> =
            samples.iter().flat_map(|s| s.committed.iter().map(|(k, _)| k.clone())).collect();
        let ends = self.high_watermarks(&wanted).await;
        for s in samples {
            gauge!(GROUP_MEMBERS, "group" => s.group.clone()).set(s.members as f64);
            for ((topic, partition), committed) in s.committed {
                let Some(end) = ends.get(&(topic.clone(), partition)) else { continue };
                let lag = (end - committed).max(0);
                gauge!(GROUP_LAG, "group" => s.group.clone(), "topic" => topic, "partition" => partition.to_string())
                    .set(lag as f64);
            }
        }
    }

    /// The high watermark of each partition in `wanted`: read here where
    /// this broker leads, else asked of its leader (ListOffsets latest);
    /// a partition whose leader does not answer in time is left out.
    async fn high_watermarks(&self, wanted: &BTreeSet<(String, u32)>) -> HashMap<(String, u32), i64> {
        let me = BrokerId(self.broker.node_id());
        let mut ends = HashMap::new();
        let mut remote: BTreeMap<BrokerId, BTreeMap<String, Vec<u32>>> = BTreeMap::new();
        for (topic, partition) in wanted {
            let Some(t) = self.broker.topic(topic) else { continue };
            let Some(leader) = t.states.get(*partition as usize).and_then(|s| s.leader) else { continue };
            match t.partitions.get(partition) {
                Some(p) if leader == me && p.leading_epoch().is_some() => {
                    ends.insert((topic.clone(), *partition), p.offsets().1.to_wire());
                }
                _ => remote.entry(leader).or_default().entry(topic.clone()).or_default().push(*partition),
            }
        }
        let addresses: HashMap<u32, String> = self.broker.brokers().into_iter().collect();
        let asks = remote.into_iter().filter_map(|(leader, topics)| {
            let address = addresses.get(&leader.0)?;
            let channel = self.peers.get(address).ok()?;
            let request = pb::ListOffsetsRequest {
                topics: topics
                    .into_iter()
                    .map(|(name, partitions)| pb::ListOffsetsTopic {
                        name,
                        partitions: partitions
                            .into_iter()
                            .map(|partition| pb::ListOffsetsPartition { partition, timestamp: -1 })
                            .collect(),
                    })
                    .collect(),
            };
            Some(async move {
                let answer = tokio::time::timeout(PEER_TIMEOUT, TallyClient::new(channel).list_offsets(request)).await;
                match answer {
                    Ok(Ok(r)) => r.into_inner().topics,
                    _ => Vec::new(),
                }
            })
        });
        for topic in futures_util::future::join_all(asks).await.into_iter().flatten() {
            for p in topic.partitions.into_iter().filter(|p| p.error_code == 0) {
                ends.insert((topic.name.clone(), p.partition), p.offset);
            }
        }
        ends
    }
}
