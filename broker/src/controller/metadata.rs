//! The cluster metadata state machine: brokers, topics, partitions and
//! producer-id blocks, changed only by [`MetadataCommand`]s applied in the
//! order of the metadata log.
//!
//! Sans-IO and deterministic: [`MetadataImage::apply`] reads no clock, does
//! no I/O and draws no random number, so every replica of the metadata log
//! that applies the same commands holds the same image and reports the same
//! effects. The controller decides *when* to propose a command (a broker's
//! lease lapsed, an admin request arrived); this module decides *what it
//! does*, and refuses what may not happen.
//!
//! Rules:
//! - A broker registers with an incarnation id, new at every process start.
//!   While an id is registered and unfenced, a registration with another
//!   incarnation is refused: two processes with one id must never both
//!   serve. A registered broker starts fenced; the controller unfences it
//!   once it has caught up with the metadata log.
//! - Fencing a broker removes it from every ISR it is in, unless it is the
//!   last member, and moves the leadership of each partition it leads by
//!   the rules of [`super::election`]: the first other live replica in the
//!   ISR, else one in the ELR (KIP-966's eligible leader replicas), else,
//!   only with `unclean_leader_election`, any live replica. A partition left
//!   with no candidate has no leader (it is offline) and keeps its last ISR
//!   member, which leads again once unfenced: a partition is never handed
//!   silently to a replica that may lack acknowledged records.
//! - A broker that may have lost unsynced writes (`ReplicaLostWrites`)
//!   leaves every ISR and ELR, even as the last member.
//! - Every leader change bumps the leader epoch; every change to the leader
//!   or the ISR bumps the partition epoch. An ISR change from a leader must
//!   name both current epochs (compare-and-set), so a stale leader cannot
//!   overwrite a newer state, and may add only unfenced replicas.
//! - Producer ids are handed out in blocks, never twice.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::election::{ElectionRules, forget_replica, install, pick_leader, set_isr};
use crate::topic::TopicName;

/// A `u32` newtype that prints as its number.
macro_rules! numeric_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub u32);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

numeric_id!(
    /// A broker's node id.
    BrokerId
);
numeric_id!(
    /// A partition's leader epoch: grows with every leader change.
    LeaderEpoch
);
numeric_id!(
    /// A partition's epoch: grows with every change to its leader or ISR.
    PartitionEpoch
);

/// A topic's stable id (32 hex digits), fixed at creation: a topic deleted
/// and created again under the same name has another id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TopicId(pub String);

impl fmt::Display for TopicId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A registered broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerRegistration {
    /// Node id.
    pub id: BrokerId,
    /// Address clients and peers reach it at (`host:port`).
    pub address: String,
    /// Random per process start: tells a restarted broker from the old one.
    pub incarnation: u64,
    /// A fenced broker leads nothing and is not added to any ISR.
    pub fenced: bool,
}

/// One partition's replicas, leader and epochs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionState {
    /// Replicas in preference order: the first is the preferred leader.
    pub replicas: Vec<BrokerId>,
    /// In-sync replicas: never empty, always a subset of `replicas`.
    pub isr: Vec<BrokerId>,
    /// Eligible leader replicas (KIP-966): replicas that left the ISR while
    /// it was below `min_insync_replicas`; each holds everything below the
    /// high watermark (see [`super::election`]).
    #[serde(default)]
    pub elr: Vec<BrokerId>,
    /// The leader, or `None` while the partition is offline.
    pub leader: Option<BrokerId>,
    /// Grows with every leader change.
    pub leader_epoch: LeaderEpoch,
    /// Grows with every change to the leader or ISR.
    pub partition_epoch: PartitionEpoch,
}

/// One topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicState {
    /// Stable id.
    pub id: TopicId,
    /// Name.
    pub name: String,
    /// Config overrides (canonical names), validated before proposing.
    pub configs: BTreeMap<String, String>,
    /// Partitions, by number.
    pub partitions: Vec<PartitionState>,
    /// Grows with every config change: what config compare-and-sets check.
    #[serde(default)]
    pub config_version: u64,
}

/// A change to the metadata, as the metadata log carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetadataCommand {
    /// A broker starts (or restarts with a new incarnation).
    RegisterBroker {
        /// Node id.
        id: BrokerId,
        /// Address.
        address: String,
        /// New at every process start.
        incarnation: u64,
        /// The incarnation this process follows on the same data directory
        /// (whose lock proves that process has exited): it may replace that
        /// registration even while it still looks active.
        #[serde(default)]
        previous_incarnation: Option<u64>,
    },
    /// A broker's lease lapsed, or it is shutting down.
    FenceBroker {
        /// Node id.
        id: BrokerId,
        /// The incarnation being fenced.
        incarnation: u64,
    },
    /// A registered broker caught up and may lead again.
    UnfenceBroker {
        /// Node id.
        id: BrokerId,
        /// The incarnation being unfenced.
        incarnation: u64,
    },
    /// A new topic with its replica assignment (one list per partition).
    CreateTopic {
        /// Name.
        name: String,
        /// Stable id, drawn by the proposer.
        id: TopicId,
        /// Config overrides.
        configs: BTreeMap<String, String>,
        /// Replicas of each partition.
        assignments: Vec<Vec<BrokerId>>,
    },
    /// Deletes a topic.
    DeleteTopic {
        /// Name.
        name: String,
        /// The topic's id as the proposer saw it: a topic re-created under
        /// the name since then is not deleted. (`None` in entries written
        /// before ids were checked: by name.)
        #[serde(default)]
        id: Option<TopicId>,
    },
    /// Replaces a topic's config overrides (validated by the proposer).
    AlterTopicConfigs {
        /// Name.
        name: String,
        /// The new overrides, whole.
        configs: BTreeMap<String, String>,
        /// The config version they were computed from (compare-and-set: a
        /// change based on an older version is refused, not lost). `None`
        /// in entries written before versions existed.
        #[serde(default)]
        expected_version: Option<u64>,
    },
    /// Adds partitions to a topic.
    CreatePartitions {
        /// Name.
        name: String,
        /// Replicas of each new partition.
        assignments: Vec<Vec<BrokerId>>,
        /// The partition count they were placed for (compare-and-set: a
        /// retry or a second admin working from the same count cannot grow
        /// the topic twice). `None` in entries written before the check.
        #[serde(default)]
        expected_count: Option<u32>,
    },
    /// A partition leader changes its ISR (KIP-497's AlterPartition).
    AlterPartition {
        /// Topic.
        topic: String,
        /// Partition number.
        partition: u32,
        /// The leader epoch the leader holds.
        leader_epoch: LeaderEpoch,
        /// The partition epoch the change is based on.
        partition_epoch: PartitionEpoch,
        /// The new ISR.
        isr: Vec<BrokerId>,
    },
    /// A broker whose machine restarted after it stopped uncleanly may have
    /// lost writes it had not synced: it leaves every ISR and ELR until it
    /// catches up again (proposed by the broker right after it registers,
    /// while it is still fenced).
    ReplicaLostWrites {
        /// Node id.
        id: BrokerId,
        /// Its new incarnation.
        incarnation: u64,
    },
    /// Moves each partition's leadership back to its preferred replica (the
    /// first) where that replica is live, in the ISR and not leading.
    ElectPreferredLeaders,
    /// Hands a block of producer ids to a broker (for idempotent producers).
    AllocateProducerIds {
        /// The broker that asked.
        broker: BrokerId,
        /// How many ids.
        count: u64,
    },
}

/// What applying a command changed, for the brokers following the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetadataEffect {
    /// A broker (re)registered.
    BrokerRegistered {
        /// Node id.
        id: BrokerId,
        /// Its incarnation.
        incarnation: u64,
    },
    /// A broker was fenced.
    BrokerFenced(BrokerId),
    /// A broker was unfenced.
    BrokerUnfenced(BrokerId),
    /// A topic was created.
    TopicCreated {
        /// Name.
        name: String,
        /// Id.
        id: TopicId,
    },
    /// A topic was deleted.
    TopicDeleted {
        /// Name.
        name: String,
        /// Id.
        id: TopicId,
    },
    /// A topic's config overrides changed.
    TopicConfigsChanged {
        /// Topic.
        name: String,
    },
    /// Partitions `[from, to)` were added to a topic.
    PartitionsCreated {
        /// Topic.
        name: String,
        /// First new partition.
        from: u32,
        /// One past the last.
        to: u32,
    },
    /// A partition's leader or ISR changed.
    PartitionChanged {
        /// Topic.
        topic: String,
        /// Partition number.
        partition: u32,
        /// The state after the change.
        state: PartitionState,
    },
    /// Producer ids `[first, first + count)` now belong to `broker`.
    ProducerIdsAllocated {
        /// The broker.
        broker: BrokerId,
        /// First id of the block.
        first: u64,
        /// Ids in the block.
        count: u64,
    },
}

/// Why a command was refused. The image is unchanged after a refusal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum MetadataError {
    /// Another live process holds this broker id.
    #[error(
        "broker id {id} is registered to a running broker (incarnation {incarnation:#x}); two brokers must not share an id"
    )]
    BrokerIdInUse {
        /// The id.
        id: BrokerId,
        /// The live incarnation.
        incarnation: u64,
    },
    /// No broker with that id is registered.
    #[error("broker {0} is not registered")]
    UnknownBroker(BrokerId),
    /// A fence or unfence for an incarnation that is no longer registered.
    #[error("broker {id} is registered with incarnation {current:#x}, not {got:#x}")]
    StaleIncarnation {
        /// The id.
        id: BrokerId,
        /// Registered incarnation.
        current: u64,
        /// The command's.
        got: u64,
    },
    /// The topic name breaks the naming rules.
    #[error("invalid topic name: {0}")]
    InvalidTopicName(String),
    /// A topic with that name or id exists.
    #[error("topic `{0}` already exists")]
    TopicExists(String),
    /// No such topic.
    #[error("unknown topic `{0}`")]
    UnknownTopic(String),
    /// No such partition.
    #[error("unknown partition {topic}/{partition}")]
    UnknownPartition {
        /// Topic.
        topic: String,
        /// Partition.
        partition: u32,
    },
    /// A replica assignment that cannot be used.
    #[error("invalid replica assignment: {0}")]
    InvalidAssignment(String),
    /// An AlterPartition from a leader of an older (or unknown) epoch.
    #[error("{topic}/{partition}: leader epoch {got} is not the current epoch {current}")]
    FencedLeaderEpoch {
        /// Topic.
        topic: String,
        /// Partition.
        partition: u32,
        /// Current leader epoch.
        current: LeaderEpoch,
        /// The command's.
        got: LeaderEpoch,
    },
    /// An AlterPartition based on an older partition state.
    #[error("{topic}/{partition}: partition epoch {got} is not the current epoch {current}")]
    StalePartitionEpoch {
        /// Topic.
        topic: String,
        /// Partition.
        partition: u32,
        /// Current partition epoch.
        current: PartitionEpoch,
        /// The command's.
        got: PartitionEpoch,
    },
    /// An ISR that breaks the rules.
    #[error("invalid ISR for {topic}/{partition}: {reason}")]
    InvalidIsr {
        /// Topic.
        topic: String,
        /// Partition.
        partition: u32,
        /// What is wrong.
        reason: String,
    },
    /// A delete by id whose topic was re-created under the name meanwhile.
    #[error("topic `{name}` is now a different topic (id {current}, not {got}): it was deleted and created again")]
    TopicIdMismatch {
        /// Name.
        name: String,
        /// The id it has now.
        current: TopicId,
        /// The id the command named.
        got: TopicId,
    },
    /// A partition-count compare-and-set that lost: the count changed.
    #[error("topic `{name}` has {current} partitions now, not the {expected} the change was computed from")]
    PartitionCountChanged {
        /// Name.
        name: String,
        /// Its count now.
        current: u32,
        /// The count the command expected.
        expected: u32,
    },
    /// A config compare-and-set that lost: another change landed first.
    #[error("the configs of topic `{name}` changed meanwhile (version {current}, not {expected})")]
    ConfigVersionChanged {
        /// Name.
        name: String,
        /// The version now.
        current: u64,
        /// The version the command expected.
        expected: u64,
    },
    /// A producer-id block that cannot be given.
    #[error("invalid producer id request: {0}")]
    InvalidProducerIdRequest(String),
}

/// A topic's `min_insync_replicas` as the metadata records it (proposers
/// record the effective value with every create and config change; 1 when
/// absent). Leaders and the controller's elections both use this value.
pub fn recorded_min_insync_replicas(configs: &BTreeMap<String, String>) -> u32 {
    configs.get("min_insync_replicas").and_then(|v| v.parse().ok()).unwrap_or(1)
}

/// The election rules of a topic, from its configs (as validated by the
/// proposer).
fn election_rules(configs: &BTreeMap<String, String>) -> ElectionRules {
    ElectionRules {
        min_insync_replicas: recorded_min_insync_replicas(configs) as usize,
        unclean: configs.get("unclean_leader_election").is_some_and(|v| v == "true"),
    }
}

/// The effect of a change to partition `index` of `topic`.
fn changed(topic: &str, index: usize, state: &PartitionState) -> MetadataEffect {
    MetadataEffect::PartitionChanged { topic: topic.to_string(), partition: index as u32, state: state.clone() }
}

/// Most producer ids one request may take.
pub const MAX_PRODUCER_ID_BLOCK: u64 = 1 << 20;

/// The whole cluster metadata at one point of the metadata log. Brokers
/// share images behind `Arc` and swap in new ones. Topics are shared too:
/// cloning an image copies one pointer per topic, and an applied change
/// copies only the topics it changes (`Arc::make_mut`), so a topic that is
/// the same `Arc` in two images is unchanged between them (what a broker's
/// incremental reconcile relies on).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetadataImage {
    brokers: BTreeMap<BrokerId, BrokerRegistration>,
    topics: BTreeMap<String, Arc<TopicState>>,
    next_producer_id: u64,
}

impl MetadataImage {
    /// Registered brokers, by id.
    pub fn brokers(&self) -> &BTreeMap<BrokerId, BrokerRegistration> {
        &self.brokers
    }

    /// One broker.
    pub fn broker(&self, id: BrokerId) -> Option<&BrokerRegistration> {
        self.brokers.get(&id)
    }

    /// Unfenced brokers, ascending by id.
    pub fn live_brokers(&self) -> impl Iterator<Item = BrokerId> + '_ {
        self.brokers.values().filter(|b| !b.fenced).map(|b| b.id)
    }

    /// Topics, by name.
    pub fn topics(&self) -> &BTreeMap<String, Arc<TopicState>> {
        &self.topics
    }

    /// One topic.
    pub fn topic(&self, name: &str) -> Option<&TopicState> {
        self.topics.get(name).map(|t| &**t)
    }

    /// One partition.
    pub fn partition(&self, topic: &str, partition: u32) -> Option<&PartitionState> {
        self.topics.get(topic)?.partitions.get(partition as usize)
    }

    /// The first producer id not yet handed out.
    pub fn next_producer_id(&self) -> u64 {
        self.next_producer_id
    }

    /// Applies one command. On error the image is unchanged.
    pub fn apply(&mut self, command: &MetadataCommand) -> Result<Vec<MetadataEffect>, MetadataError> {
        match command {
            MetadataCommand::RegisterBroker { id, address, incarnation, previous_incarnation } => {
                self.register_broker(*id, address, *incarnation, *previous_incarnation)
            }
            MetadataCommand::FenceBroker { id, incarnation } => self.fence_broker(*id, *incarnation),
            MetadataCommand::UnfenceBroker { id, incarnation } => self.unfence_broker(*id, *incarnation),
            MetadataCommand::CreateTopic { name, id, configs, assignments } => {
                self.create_topic(name, id, configs, assignments)
            }
            MetadataCommand::DeleteTopic { name, id } => self.delete_topic(name, id.as_ref()),
            MetadataCommand::AlterTopicConfigs { name, configs, expected_version } => {
                self.alter_topic_configs(name, configs, *expected_version)
            }
            MetadataCommand::CreatePartitions { name, assignments, expected_count } => {
                self.create_partitions(name, assignments, *expected_count)
            }
            MetadataCommand::AlterPartition { topic, partition, leader_epoch, partition_epoch, isr } => {
                self.alter_partition(topic, *partition, *leader_epoch, *partition_epoch, isr)
            }
            MetadataCommand::AllocateProducerIds { broker, count } => self.allocate_producer_ids(*broker, *count),
            MetadataCommand::ReplicaLostWrites { id, incarnation } => self.replica_lost_writes(*id, *incarnation),
            MetadataCommand::ElectPreferredLeaders => Ok(self.elect_preferred_leaders()),
        }
    }

    /// True when partition `p` would move to its preferred replica.
    fn off_preferred(&self, p: &PartitionState) -> bool {
        let Some(&preferred) = p.replicas.first() else { return false };
        let live = self.brokers.get(&preferred).is_some_and(|b| !b.fenced);
        p.leader != Some(preferred) && live && p.isr.contains(&preferred)
    }

    /// Partitions whose preferred replica could lead and does not.
    pub fn preferred_imbalance(&self) -> usize {
        self.topics.values().flat_map(|t| &t.partitions).filter(|p| self.off_preferred(p)).count()
    }

    fn elect_preferred_leaders(&mut self) -> Vec<MetadataEffect> {
        let moves: Vec<(String, usize)> = self
            .topics
            .values()
            .flat_map(|t| {
                t.partitions.iter().enumerate().filter(|(_, p)| self.off_preferred(p)).map(|(i, _)| (t.name.clone(), i))
            })
            .collect();
        let mut effects = Vec::new();
        for (topic, index) in moves {
            let p = &mut Arc::make_mut(self.topics.get_mut(&topic).expect("listed")).partitions[index];
            p.leader = p.replicas.first().copied();
            p.leader_epoch.0 += 1;
            p.partition_epoch.0 += 1;
            effects.push(changed(&topic, index, p));
        }
        effects
    }

    fn register_broker(
        &mut self,
        id: BrokerId,
        address: &str,
        incarnation: u64,
        previous_incarnation: Option<u64>,
    ) -> Result<Vec<MetadataEffect>, MetadataError> {
        let mut effects = Vec::new();
        if let Some(existing) = self.brokers.get(&id) {
            if existing.incarnation == incarnation {
                return Ok(Vec::new()); // a retried registration
            }
            if !existing.fenced {
                if previous_incarnation != Some(existing.incarnation) {
                    return Err(MetadataError::BrokerIdInUse { id, incarnation: existing.incarnation });
                }
                // The successor of a process that has exited: fence what
                // it left (leaderships move) before registering anew.
                effects = self.fence_broker(id, existing.incarnation)?;
            }
        }
        self.brokers.insert(id, BrokerRegistration { id, address: address.to_string(), incarnation, fenced: true });
        effects.push(MetadataEffect::BrokerRegistered { id, incarnation });
        Ok(effects)
    }

    fn registered(&self, id: BrokerId, incarnation: u64) -> Result<&BrokerRegistration, MetadataError> {
        let broker = self.brokers.get(&id).ok_or(MetadataError::UnknownBroker(id))?;
        if broker.incarnation != incarnation {
            return Err(MetadataError::StaleIncarnation { id, current: broker.incarnation, got: incarnation });
        }
        Ok(broker)
    }

    fn fence_broker(&mut self, id: BrokerId, incarnation: u64) -> Result<Vec<MetadataEffect>, MetadataError> {
        if self.registered(id, incarnation)?.fenced {
            return Ok(Vec::new());
        }
        self.brokers.get_mut(&id).expect("registered").fenced = true;
        let mut effects = vec![MetadataEffect::BrokerFenced(id)];
        let brokers = &self.brokers;
        let live = |b: BrokerId| brokers.get(&b).is_some_and(|r| !r.fenced);
        let touched = |p: &PartitionState| p.leader == Some(id) || (p.isr.contains(&id) && p.isr.len() > 1);
        for topic in self.topics.values_mut() {
            if !topic.partitions.iter().any(touched) {
                continue;
            }
            let topic = Arc::make_mut(topic);
            let rules = election_rules(&topic.configs);
            for (index, p) in topic.partitions.iter_mut().enumerate() {
                let leads = p.leader == Some(id);
                let leaves_isr = p.isr.contains(&id) && p.isr.len() > 1;
                if !leads && !leaves_isr {
                    continue;
                }
                if leaves_isr {
                    let isr = p.isr.iter().copied().filter(|b| *b != id).collect();
                    set_isr(p, isr, rules);
                }
                if leads {
                    match pick_leader(p, rules, live) {
                        Some(elected) => install(p, elected, rules),
                        None => {
                            // Offline: the last ISR member stays, and leads
                            // again when it returns.
                            p.leader = None;
                            p.leader_epoch.0 += 1;
                        }
                    }
                }
                p.partition_epoch.0 += 1;
                effects.push(changed(&topic.name, index, p));
            }
        }
        Ok(effects)
    }

    fn unfence_broker(&mut self, id: BrokerId, incarnation: u64) -> Result<Vec<MetadataEffect>, MetadataError> {
        if !self.registered(id, incarnation)?.fenced {
            return Ok(Vec::new());
        }
        self.brokers.get_mut(&id).expect("registered").fenced = false;
        let mut effects = vec![MetadataEffect::BrokerUnfenced(id)];
        effects.extend(self.elect_offline());
        Ok(effects)
    }

    /// Gives every offline partition a leader if the rules allow one now.
    fn elect_offline(&mut self) -> Vec<MetadataEffect> {
        let brokers = &self.brokers;
        let live = |b: BrokerId| brokers.get(&b).is_some_and(|r| !r.fenced);
        let mut effects = Vec::new();
        for topic in self.topics.values_mut() {
            if topic.partitions.iter().all(|p| p.leader.is_some()) {
                continue;
            }
            let topic = Arc::make_mut(topic);
            let rules = election_rules(&topic.configs);
            for (index, p) in topic.partitions.iter_mut().enumerate() {
                if p.leader.is_some() {
                    continue;
                }
                if let Some(elected) = pick_leader(p, rules, live) {
                    install(p, elected, rules);
                    p.partition_epoch.0 += 1;
                    effects.push(changed(&topic.name, index, p));
                }
            }
        }
        effects
    }

    fn replica_lost_writes(&mut self, id: BrokerId, incarnation: u64) -> Result<Vec<MetadataEffect>, MetadataError> {
        self.registered(id, incarnation)?;
        let mut effects = Vec::new();
        for topic in self.topics.values_mut() {
            // What `forget_replica` may change: a replica in the ISR or ELR
            // (or an ELR it clears).
            if !topic.partitions.iter().any(|p| p.leader != Some(id) && (p.isr.contains(&id) || !p.elr.is_empty())) {
                continue;
            }
            let topic = Arc::make_mut(topic);
            let rules = election_rules(&topic.configs);
            for (index, p) in topic.partitions.iter_mut().enumerate() {
                if p.leader == Some(id) || !forget_replica(p, id, rules) {
                    continue;
                }
                p.partition_epoch.0 += 1;
                effects.push(changed(&topic.name, index, p));
            }
        }
        effects.extend(self.elect_offline());
        Ok(effects)
    }

    /// New partitions for `assignments`: every replica registered, no
    /// duplicates, one replication factor (`rf`, when given), and at least
    /// one unfenced replica, which leads.
    fn new_partitions(
        &self,
        assignments: &[Vec<BrokerId>],
        rf: Option<usize>,
    ) -> Result<Vec<PartitionState>, MetadataError> {
        if assignments.is_empty() {
            return Err(MetadataError::InvalidAssignment("no partitions".into()));
        }
        let rf = rf.unwrap_or(assignments[0].len());
        let mut out = Vec::with_capacity(assignments.len());
        for (i, replicas) in assignments.iter().enumerate() {
            if replicas.len() != rf || rf == 0 {
                return Err(MetadataError::InvalidAssignment(format!(
                    "partition {i} has {} replicas; every partition needs {rf} (and at least one)",
                    replicas.len()
                )));
            }
            let distinct: BTreeSet<_> = replicas.iter().collect();
            if distinct.len() != replicas.len() {
                return Err(MetadataError::InvalidAssignment(format!("partition {i} names a broker twice")));
            }
            if let Some(unknown) = replicas.iter().find(|b| !self.brokers.contains_key(b)) {
                return Err(MetadataError::InvalidAssignment(format!("broker {unknown} is not registered")));
            }
            let isr: Vec<BrokerId> = replicas.iter().copied().filter(|b| !self.brokers[b].fenced).collect();
            let Some(&leader) = isr.first() else {
                return Err(MetadataError::InvalidAssignment(format!(
                    "partition {i}: none of its replicas is running"
                )));
            };
            out.push(PartitionState {
                replicas: replicas.clone(),
                isr,
                elr: Vec::new(),
                leader: Some(leader),
                leader_epoch: LeaderEpoch(0),
                partition_epoch: PartitionEpoch(0),
            });
        }
        Ok(out)
    }

    fn create_topic(
        &mut self,
        name: &str,
        id: &TopicId,
        configs: &BTreeMap<String, String>,
        assignments: &[Vec<BrokerId>],
    ) -> Result<Vec<MetadataEffect>, MetadataError> {
        TopicName::new(name).map_err(MetadataError::InvalidTopicName)?;
        if self.topics.contains_key(name) || self.topics.values().any(|t| t.id == *id) {
            return Err(MetadataError::TopicExists(name.to_string()));
        }
        let partitions = self.new_partitions(assignments, None)?;
        let topic = TopicState {
            id: id.clone(),
            name: name.to_string(),
            configs: configs.clone(),
            partitions,
            config_version: 0,
        };
        self.topics.insert(name.to_string(), Arc::new(topic));
        Ok(vec![MetadataEffect::TopicCreated { name: name.to_string(), id: id.clone() }])
    }

    fn delete_topic(&mut self, name: &str, id: Option<&TopicId>) -> Result<Vec<MetadataEffect>, MetadataError> {
        let topic = self.topics.get(name).ok_or_else(|| MetadataError::UnknownTopic(name.to_string()))?;
        if let Some(id) = id
            && *id != topic.id
        {
            return Err(MetadataError::TopicIdMismatch {
                name: name.to_string(),
                current: topic.id.clone(),
                got: id.clone(),
            });
        }
        let topic = self.topics.remove(name).expect("checked");
        Ok(vec![MetadataEffect::TopicDeleted { name: topic.name.clone(), id: topic.id.clone() }])
    }

    fn create_partitions(
        &mut self,
        name: &str,
        assignments: &[Vec<BrokerId>],
        expected_count: Option<u32>,
    ) -> Result<Vec<MetadataEffect>, MetadataError> {
        let topic = self.topics.get(name).ok_or_else(|| MetadataError::UnknownTopic(name.to_string()))?;
        let current = topic.partitions.len() as u32;
        if let Some(expected) = expected_count
            && expected != current
        {
            return Err(MetadataError::PartitionCountChanged { name: name.to_string(), current, expected });
        }
        let rf = topic.partitions.first().map(|p| p.replicas.len());
        let mut partitions = self.new_partitions(assignments, rf)?;
        let topic = Arc::make_mut(self.topics.get_mut(name).expect("checked"));
        let from = topic.partitions.len() as u32;
        topic.partitions.append(&mut partitions);
        let to = topic.partitions.len() as u32;
        Ok(vec![MetadataEffect::PartitionsCreated { name: name.to_string(), from, to }])
    }

    /// Replaces a topic's configs. When `min_insync_replicas` changes, every
    /// ELR is cleared (KIP-966): a replica is eligible because the HW stood
    /// still while the ISR was below the old minimum; under a lower one a
    /// lone leader moves the HW past it, and electing it would lose what
    /// that leader acknowledged.
    fn alter_topic_configs(
        &mut self,
        name: &str,
        configs: &BTreeMap<String, String>,
        expected_version: Option<u64>,
    ) -> Result<Vec<MetadataEffect>, MetadataError> {
        let topic = self.topics.get_mut(name).ok_or_else(|| MetadataError::UnknownTopic(name.to_string()))?;
        if let Some(expected) = expected_version
            && expected != topic.config_version
        {
            return Err(MetadataError::ConfigVersionChanged {
                name: name.to_string(),
                current: topic.config_version,
                expected,
            });
        }
        let topic = Arc::make_mut(topic);
        let before = election_rules(&topic.configs).min_insync_replicas;
        topic.configs = configs.clone();
        topic.config_version += 1;
        let mut effects = vec![MetadataEffect::TopicConfigsChanged { name: name.to_string() }];
        if election_rules(&topic.configs).min_insync_replicas != before {
            for (index, p) in topic.partitions.iter_mut().enumerate() {
                if !p.elr.is_empty() {
                    p.elr.clear();
                    p.partition_epoch.0 += 1;
                    effects.push(MetadataEffect::PartitionChanged {
                        topic: name.to_string(),
                        partition: index as u32,
                        state: p.clone(),
                    });
                }
            }
        }
        Ok(effects)
    }

    fn alter_partition(
        &mut self,
        topic: &str,
        partition: u32,
        leader_epoch: LeaderEpoch,
        partition_epoch: PartitionEpoch,
        isr: &[BrokerId],
    ) -> Result<Vec<MetadataEffect>, MetadataError> {
        let unknown = || MetadataError::UnknownPartition { topic: topic.to_string(), partition };
        let state = self.topics.get(topic).and_then(|t| t.partitions.get(partition as usize)).ok_or_else(unknown)?;
        let invalid = |reason: String| MetadataError::InvalidIsr { topic: topic.to_string(), partition, reason };
        if leader_epoch != state.leader_epoch {
            return Err(MetadataError::FencedLeaderEpoch {
                topic: topic.to_string(),
                partition,
                current: state.leader_epoch,
                got: leader_epoch,
            });
        }
        if partition_epoch != state.partition_epoch {
            return Err(MetadataError::StalePartitionEpoch {
                topic: topic.to_string(),
                partition,
                current: state.partition_epoch,
                got: partition_epoch,
            });
        }
        let Some(leader) = state.leader else {
            return Err(invalid("the partition has no leader".into()));
        };
        if !isr.contains(&leader) {
            return Err(invalid(format!("the leader {leader} must stay in the ISR")));
        }
        let distinct: BTreeSet<_> = isr.iter().collect();
        if distinct.len() != isr.len() {
            return Err(invalid("a broker is named twice".into()));
        }
        if let Some(b) = isr.iter().find(|b| !state.replicas.contains(b)) {
            return Err(invalid(format!("broker {b} is not a replica")));
        }
        let fenced = |b: &BrokerId| self.brokers.get(b).is_none_or(|r| r.fenced);
        if let Some(b) = isr.iter().find(|b| !state.isr.contains(b) && fenced(b)) {
            return Err(invalid(format!("broker {b} is fenced and cannot join the ISR")));
        }
        let t = Arc::make_mut(self.topics.get_mut(topic).expect("checked"));
        let rules = election_rules(&t.configs);
        let state = &mut t.partitions[partition as usize];
        set_isr(state, isr.to_vec(), rules);
        state.partition_epoch.0 += 1;
        Ok(vec![MetadataEffect::PartitionChanged { topic: topic.to_string(), partition, state: state.clone() }])
    }

    fn allocate_producer_ids(&mut self, broker: BrokerId, count: u64) -> Result<Vec<MetadataEffect>, MetadataError> {
        if !self.brokers.contains_key(&broker) {
            return Err(MetadataError::UnknownBroker(broker));
        }
        if count == 0 || count > MAX_PRODUCER_ID_BLOCK {
            return Err(MetadataError::InvalidProducerIdRequest(format!(
                "a block holds 1 to {MAX_PRODUCER_ID_BLOCK} ids, not {count}"
            )));
        }
        let first = self.next_producer_id;
        let next = first
            .checked_add(count)
            .filter(|n| *n <= i64::MAX as u64)
            .ok_or_else(|| MetadataError::InvalidProducerIdRequest("producer ids are exhausted".into()))?;
        self.next_producer_id = next;
        Ok(vec![MetadataEffect::ProducerIdsAllocated { broker, first, count }])
    }
}

#[cfg(test)]
#[path = "metadata_tests.rs"]
mod tests;
