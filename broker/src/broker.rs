//! The broker's state: the topics and partitions it hosts, following the
//! cluster metadata image, and the admin operations, which it proposes to
//! the controller.
//!
//! Layout of the data directory:
//!
//! ```text
//! .lock                 held (flock) while a broker runs on this directory
//! __cluster_metadata/   the controller voter's log, vote and snapshot
//! <topic>-<partition>/  one partition's log (see `storage`), with a
//!                       `partition.metadata` file naming its topic id
//! topics.json.migrated  the single-broker version's topic list, once moved
//!                       into the metadata log
//! ```
//!
//! Topics are immutable values behind `Arc`, rebuilt by
//! [`Broker::reconcile`] (in `reconcile.rs`) for each metadata image that
//! changes them: a broker opens the partitions whose replicas include it and
//! closes and deletes what the image no longer has.
//! The data path reads only these values (never Raft). Admin operations
//! are proposed to the controller, then wait until this broker has
//! reconciled the image that holds them. They are serialized by one async
//! mutex up to the point where the local voter has applied them (so each is
//! computed from an image holding the ones before); the wait for the
//! reconcile happens outside it, so changes made at once are reconciled
//! together. Reconciling is serialized by its own lock.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::BrokerConfig;
use crate::controller::{
    BrokerId, Controller, ControllerError, MetadataCommand, MetadataError, MetadataImage, PartitionState, TopicId,
    TopicState, place,
};
use crate::error::BrokerError;
use crate::partition::Partition;

mod reconcile;

use crate::producer_ids::ProducerIds;
use crate::replication::ProposalOutcome;
use crate::replication::fetcher::{FetcherSettings, Fetchers};
use crate::replication::isr::{IsrProposer, Proposal, now_ms};
use crate::topic::{TopicConfig, TopicName, canonical_key};
use reconcile::in_parallel;

/// A topic, as this broker hosts it.
#[derive(Debug)]
pub struct Topic {
    /// Name.
    pub name: TopicName,
    /// Stable id, fixed at creation.
    pub id: String,
    /// Replicas per partition.
    pub replication_factor: u32,
    /// Config keys set on this topic (canonical names).
    pub overrides: BTreeMap<String, String>,
    /// Effective config.
    pub config: TopicConfig,
    /// Every partition's replicas, leader and epochs, as the image has them.
    pub states: Vec<PartitionState>,
    /// The partitions this broker hosts, by number.
    pub partitions: BTreeMap<u32, Arc<Partition>>,
    /// Its traffic counters.
    pub metrics: crate::metrics::TopicMetrics,
    /// The image's state of the topic this value was built from: a later
    /// image holding the same `Arc` has not changed the topic.
    image: Arc<TopicState>,
    /// False when a partition did not open or a role did not take: the
    /// next reconcile works on the topic again even if it is unchanged.
    complete: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredTopic {
    name: String,
    id: String,
    partitions: u32,
    replication_factor: u32,
    configs: BTreeMap<String, String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredTopics {
    version: u32,
    topics: Vec<StoredTopic>,
}

/// A topic to create.
#[derive(Debug, Clone)]
pub struct NewTopic {
    /// Name (checked here).
    pub name: String,
    /// Partition count; 0 for the broker default.
    pub partitions: u32,
    /// Replication factor; 0 for the default (1).
    pub replication_factor: u32,
    /// Config overrides.
    pub configs: BTreeMap<String, String>,
}

/// The broker's state.
#[derive(Debug)]
pub struct Broker {
    config: BrokerConfig,
    advertised_address: String,
    topics: RwLock<BTreeMap<String, Arc<Topic>>>,
    admin: tokio::sync::Mutex<()>,
    reconcile_lock: Mutex<()>,
    /// What the last reconcile saw, for the next to compare against.
    reconciled_state: Mutex<reconcile::Reconciled>,
    /// The metadata log index this broker has reconciled its topics to.
    reconciled: tokio::sync::watch::Sender<u64>,
    controller: OnceLock<Controller>,
    /// This process's incarnation, once attached.
    incarnation: OnceLock<u64>,
    /// True while the image has this incarnation registered and unfenced:
    /// only then does the broker act as leader of anything.
    serving: Arc<std::sync::atomic::AtomicBool>,
    /// Latched by [`Broker::metadata_ready`].
    metadata_ready: std::sync::atomic::AtomicBool,
    /// This broker's session with the active controller, kept by its
    /// heartbeats: without it the broker leads nothing.
    lease: Arc<crate::membership::Lease>,
    /// The fetchers of the partitions this broker follows.
    fetchers: Fetchers,
    /// Where leaders send their ISR changes, once running.
    isr_proposer: OnceLock<IsrProposer>,
    /// Producer ids for InitProducerId.
    producer_ids: Arc<ProducerIds>,
    /// The first producer id not handed out yet, from the applied metadata.
    next_producer_id: std::sync::atomic::AtomicU64,
    _lock: File,
}

fn partition_dir(data_dir: &Path, topic: &str, partition: u32) -> PathBuf {
    data_dir.join(format!("{topic}-{partition}"))
}

fn random_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut out = String::with_capacity(32);
    for salt in 0..2u64 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(salt);
        h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out
}

/// The file in a partition directory that names the topic it belongs to.
const PARTITION_METADATA: &str = "partition.metadata";

/// How long an admin operation waits for this broker to reconcile the image
/// that holds it, after the controller committed it.
const RECONCILE_WAIT: Duration = Duration::from_secs(10);

/// How long topic creation waits for enough running brokers (a broker that
/// just started is fenced until its first heartbeats).
const PLACEMENT_WAIT: Duration = Duration::from_secs(5);

/// Checks `overrides` against the broker defaults and records the effective
/// `min_insync_replicas` in them: the controller's elections and the
/// leaders read it from the metadata image, which knows no broker defaults,
/// so both use the same value even when no override was given or one was
/// deleted.
fn record_min_insync_replicas(
    defaults: &crate::config::LogDefaults,
    overrides: &mut BTreeMap<String, String>,
) -> Result<(), BrokerError> {
    let config = TopicConfig::with_overrides(defaults, overrides)?;
    overrides.insert("min_insync_replicas".into(), config.min_insync_replicas.to_string());
    Ok(())
}

/// A topic's overrides after setting `set` and deleting `delete`, checked,
/// with the effective `min_insync_replicas` recorded.
fn altered_overrides(
    defaults: &crate::config::LogDefaults,
    current: &BTreeMap<String, String>,
    set: &BTreeMap<String, String>,
    delete: &[String],
) -> Result<BTreeMap<String, String>, BrokerError> {
    let mut overrides = current.clone();
    for k in delete {
        overrides.remove(&canonical_key(k));
    }
    for (k, v) in set {
        overrides.insert(canonical_key(k), v.clone());
    }
    record_min_insync_replicas(defaults, &mut overrides)?;
    Ok(overrides)
}

/// How many times an admin change computed from this broker's image is
/// computed again after losing its compare-and-set to a newer change.
const ADMIN_CAS_ATTEMPTS: usize = 5;

fn from_controller(e: ControllerError) -> BrokerError {
    match e {
        ControllerError::Refused(MetadataError::TopicExists(name)) => BrokerError::TopicAlreadyExists(name),
        ControllerError::Refused(MetadataError::UnknownTopic(name)) => {
            BrokerError::UnknownTopicOrPartition { topic: name, partition: None }
        }
        ControllerError::Refused(e @ MetadataError::TopicIdMismatch { .. }) => BrokerError::InvalidRequest(format!(
            "{e}; nothing was deleted: describe the topic and delete it again if you mean the new one"
        )),
        ControllerError::Refused(e @ MetadataError::PartitionCountChanged { .. }) => {
            BrokerError::InvalidPartitions(format!("{e}; describe the topic and ask again"))
        }
        ControllerError::Refused(MetadataError::InvalidTopicName(why)) => BrokerError::InvalidTopic(why),
        ControllerError::Refused(MetadataError::InvalidAssignment(why)) => BrokerError::InvalidReplicationFactor(why),
        other => BrokerError::Controller(other),
    }
}

impl Broker {
    /// Opens the data directory (locking it) and removes what an interrupted
    /// topic deletion left behind. Partitions open once the metadata image
    /// arrives ([`Broker::reconcile`]). Blocking.
    pub fn open(config: BrokerConfig, advertised_address: String) -> Result<Broker, BrokerError> {
        let dir = config.data_dir.clone();
        let io = |op: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| BrokerError::Storage(crate::storage::StorageError::Io { op, path, source })
        };
        std::fs::create_dir_all(&dir).map_err(io("create directory", &dir))?;
        let lock_path = dir.join(".lock");
        let lock = File::create(&lock_path).map_err(io("create", &lock_path))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(BrokerError::InvalidRequest(format!(
                "data directory {} is in use by another broker (cannot lock {})",
                dir.display(),
                lock_path.display()
            )));
        }
        for entry in std::fs::read_dir(&dir).map_err(io("read directory", &dir))? {
            let entry = entry.map_err(io("read directory", &dir))?;
            if entry.file_name().to_string_lossy().ends_with(".delete") {
                std::fs::remove_dir_all(entry.path()).map_err(io("remove directory", &entry.path()))?;
            }
        }
        Ok(Broker {
            advertised_address,
            topics: RwLock::new(BTreeMap::new()),
            admin: tokio::sync::Mutex::new(()),
            reconcile_lock: Mutex::new(()),
            reconciled_state: Mutex::new(reconcile::Reconciled::default()),
            reconciled: tokio::sync::watch::channel(0).0,
            controller: OnceLock::new(),
            incarnation: OnceLock::new(),
            serving: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            metadata_ready: std::sync::atomic::AtomicBool::new(false),
            lease: Arc::new(crate::membership::Lease::default()),
            fetchers: Fetchers::new(FetcherSettings {
                replica_id: BrokerId(config.node_id),
                max_wait_ms: config.replica_fetch_wait_max_ms,
                max_bytes: config.replica_fetch_response_max_bytes,
                max_batch_bytes: usize::try_from(config.max_request_bytes).unwrap_or(usize::MAX),
                backoff: Duration::from_millis(config.replica_fetch_backoff_ms),
                backoff_max: Duration::from_secs(1),
                source: config.peer_source_ip(),
            }),
            isr_proposer: OnceLock::new(),
            producer_ids: Arc::new(ProducerIds::new()),
            next_producer_id: std::sync::atomic::AtomicU64::new(0),
            _lock: lock,
            config,
        })
    }

    /// Connects the broker to its controller voter (admin operations need
    /// it) under `incarnation`, the id of this process's registration.
    pub fn attach(&self, controller: Controller, incarnation: u64) {
        let _ = self.controller.set(controller);
        let _ = self.incarnation.set(incarnation);
    }

    /// Where leaders send ISR changes (see [`crate::replication::isr`]).
    pub fn set_isr_proposer(&self, proposer: IsrProposer) {
        let _ = self.isr_proposer.set(proposer);
    }

    /// Queues a leader's ISR change for the controller.
    pub fn propose_isr_change(&self, topic: &str, partition: Arc<Partition>, change: crate::replication::IsrChange) {
        match self.isr_proposer.get() {
            Some(proposer) => proposer.propose(Proposal { topic: topic.to_string(), partition, change }),
            None => partition.isr_proposal_failed(&change, ProposalOutcome::NotApplied, now_ms()),
        }
    }

    /// Proposes a metadata command to the active controller (forwarded
    /// there when this voter is not it).
    pub async fn propose(&self, command: MetadataCommand) -> Result<(), BrokerError> {
        self.propose_with_effects(command).await.map(drop)
    }

    /// [`Broker::propose`], answering with what applying the command changed.
    pub async fn propose_with_effects(
        &self,
        command: MetadataCommand,
    ) -> Result<Vec<crate::controller::MetadataEffect>, BrokerError> {
        Ok(self.controller()?.propose_anywhere(command).await.map_err(from_controller)?.effects)
    }

    /// The broker's source of producer ids (InitProducerId).
    pub fn producer_ids(&self) -> &Arc<ProducerIds> {
        &self.producer_ids
    }

    /// Refuses a producer id this cluster has not handed out, as far as the
    /// metadata this broker applied knows (a block is committed before any
    /// of its ids is given, so only a broker lagging behind the metadata
    /// refuses a real one, until it catches up).
    pub fn check_producer_id(&self, producer_id: i64) -> Result<(), BrokerError> {
        use std::sync::atomic::Ordering;
        let below = |next: u64| u64::try_from(producer_id).is_ok_and(|id| id < next);
        let mut next = self.next_producer_id.load(Ordering::Acquire);
        if below(next) {
            return Ok(());
        }
        // The partitions' reconcile may lag this broker's voter: ask its
        // image, which applies each metadata record as it commits.
        if let Some(controller) = self.controller.get() {
            let fresh = controller.image().next_producer_id();
            self.next_producer_id.fetch_max(fresh, Ordering::AcqRel);
            next = next.max(fresh);
            if below(next) {
                return Ok(());
            }
        }
        Err(BrokerError::UnknownProducerId(format!(
            "producer id {producer_id} was not handed out by this cluster (ids below {next} were); \
             ask InitProducerId for one"
        )))
    }

    /// Every partition this broker leads now, with its topic name.
    pub fn led_partitions(&self) -> Vec<(String, Arc<Partition>)> {
        self.topics()
            .iter()
            .flat_map(|t| {
                t.partitions.values().filter(|p| p.leading_epoch().is_some()).map(|p| (t.name.to_string(), p.clone()))
            })
            .collect()
    }

    /// What this broker's controller voter knows of the quorum, once attached.
    pub fn controller_status(&self) -> Option<crate::controller::ControllerStatus> {
        self.controller.get().map(Controller::status)
    }

    fn controller(&self) -> Result<&Controller, BrokerError> {
        self.controller.get().ok_or(BrokerError::ShuttingDown)
    }

    fn legacy_store_path(&self) -> PathBuf {
        self.config.data_dir.join("topics.json")
    }

    /// Moves the topics of a data directory written by the single-broker
    /// version (`topics.json`) into the metadata log, with their ids and
    /// configs, every partition on this broker; then renames the file to
    /// `topics.json.migrated`. Topics the log already has are left alone.
    pub async fn migrate_legacy_topics(self: &Arc<Self>) -> Result<usize, BrokerError> {
        let path = self.legacy_store_path();
        let stored: StoredTopics = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| BrokerError::InvalidRequest(format!("cannot parse {}: {e}", path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(source) => {
                return Err(BrokerError::Storage(crate::storage::StorageError::Io { op: "read", path, source }));
            }
        };
        let controller = self.controller()?;
        let node = BrokerId(self.node_id());
        let mut moved = 0;
        for t in stored.topics {
            if controller.image().topic(&t.name).is_some() {
                continue;
            }
            let command = MetadataCommand::CreateTopic {
                name: t.name.clone(),
                id: TopicId(t.id),
                configs: t.configs,
                assignments: vec![vec![node]; t.partitions as usize],
            };
            let committed = controller.propose_anywhere(command).await.map_err(from_controller)?;
            self.wait_reconciled(committed.index).await?;
            tracing::info!(topic = %t.name, partitions = t.partitions, "moved topic into the metadata log");
            moved += 1;
        }
        let done = self.config.data_dir.join("topics.json.migrated");
        std::fs::rename(&path, &done).map_err(|source| {
            BrokerError::Storage(crate::storage::StorageError::Io { op: "rename", path: path.clone(), source })
        })?;
        Ok(moved)
    }

    /// Waits (up to [`RECONCILE_WAIT`]) until this broker has reconciled the
    /// metadata log up to `index`, so that what a committed change created
    /// is served here when the caller hears of it. A change is committed
    /// whatever this wait finds: past the limit (a topic of thousands of
    /// partitions still being opened) it is not an error; the partitions
    /// come online as the reconcile finishes, and clients retry meanwhile.
    async fn wait_reconciled(&self, index: u64) -> Result<(), BrokerError> {
        let mut seen = self.reconciled.subscribe();
        let reached = tokio::time::timeout(RECONCILE_WAIT, seen.wait_for(|i| *i >= index)).await;
        match reached {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(BrokerError::ShuttingDown),
            Err(_) => {
                tracing::warn!(index, "committed, but this broker is still applying it after {RECONCILE_WAIT:?}");
                Ok(())
            }
        }
    }

    /// True while this process's registration is active and unfenced, and
    /// its lease runs: the active controller answered a heartbeat sent less
    /// than a session ago, unfenced, and this broker's image has reached
    /// the committed index that answer named.
    pub fn is_serving(&self) -> bool {
        self.serving.load(std::sync::atomic::Ordering::SeqCst) && self.lease.is_valid()
    }

    /// True once this broker has served since it started: its image had
    /// reached the metadata the controller had committed when it answered a
    /// heartbeat after this broker registered (what a valid lease means).
    /// Before that its image may be older than what it had before a restart,
    /// so Metadata and DescribeTopics answer "catching up" instead of it
    /// (Kafka's brokers wait for their initial metadata catch-up too).
    pub fn metadata_ready(&self) -> bool {
        use std::sync::atomic::Ordering;
        if self.metadata_ready.load(Ordering::Acquire) {
            return true;
        }
        let ready = self.is_serving();
        if ready {
            self.metadata_ready.store(true, Ordering::Release);
        }
        ready
    }

    /// The lease the broker's heartbeats keep.
    pub fn lease(&self) -> Arc<crate::membership::Lease> {
        self.lease.clone()
    }

    /// Follows the metadata log index this broker has reconciled its topics
    /// to: the image its data path serves from.
    pub fn reconciled_index(&self) -> tokio::sync::watch::Receiver<u64> {
        self.reconciled.subscribe()
    }

    /// This broker's id.
    pub fn node_id(&self) -> u32 {
        self.config.node_id
    }

    /// The address clients dial.
    pub fn advertised_address(&self) -> &str {
        &self.advertised_address
    }

    /// The broker config.
    pub fn config(&self) -> &BrokerConfig {
        &self.config
    }

    /// The registered brokers and their addresses, this one always among
    /// them (it may not have registered yet).
    pub fn brokers(&self) -> Vec<(u32, String)> {
        let mut out: BTreeMap<u32, String> = match self.controller.get() {
            Some(c) => c.image().brokers().values().map(|b| (b.id.0, b.address.clone())).collect(),
            None => BTreeMap::new(),
        };
        out.insert(self.node_id(), self.advertised_address.clone());
        out.into_iter().collect()
    }

    /// Whether broker `id` is registered in the cluster's metadata (this
    /// one always is, as in [`Broker::brokers`]).
    pub fn is_registered(&self, id: BrokerId) -> bool {
        id.0 == self.node_id() || self.controller.get().is_some_and(|c| c.image().brokers().contains_key(&id))
    }

    /// The topic called `name`.
    pub fn topic(&self, name: &str) -> Option<Arc<Topic>> {
        self.topics.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(name).cloned()
    }

    /// All topics, by name.
    pub fn topics(&self) -> Vec<Arc<Topic>> {
        self.topics.read().unwrap_or_else(std::sync::PoisonError::into_inner).values().cloned().collect()
    }

    /// Partition `index` of `topic`, with the topic, if this broker leads
    /// it; otherwise NOT_LEADER_OR_FOLLOWER naming the leader (or
    /// LEADER_NOT_AVAILABLE while it has none).
    pub fn partition(&self, topic: &str, index: u32) -> Result<(Arc<Topic>, Arc<Partition>), BrokerError> {
        let unknown = || BrokerError::UnknownTopicOrPartition { topic: topic.to_string(), partition: Some(index) };
        let t = self.topic(topic).ok_or_else(unknown)?;
        let state = t.states.get(index as usize).ok_or_else(unknown)?;
        let me = BrokerId(self.node_id());
        // A broker that cannot reach the active controller for a whole
        // session stops leading: by then it may be fenced and replaced.
        let serving = self.is_serving();
        match (state.leader, t.partitions.get(&index)) {
            (Some(leader), Some(p)) if leader == me && serving => Ok((t.clone(), p.clone())),
            // Led by this broker id, but not by this process's registration
            // yet (it is starting, or an earlier incarnation's session has
            // not lapsed): never serve as a second process with one id.
            (Some(leader), _) if leader == me => Err(BrokerError::NotLeaderOrFollower {
                topic: topic.to_string(),
                partition: index,
                leader: None,
                leader_epoch: state.leader_epoch.0,
            }),
            (leader, _) => Err(BrokerError::NotLeaderOrFollower {
                topic: topic.to_string(),
                partition: index,
                leader: leader.map(|l| l.0),
                leader_epoch: state.leader_epoch.0,
            }),
        }
    }

    /// Replicas for `count` new partitions, waiting a little for brokers
    /// that are starting.
    async fn place(&self, count: u32, replication_factor: u32) -> Result<Vec<Vec<BrokerId>>, BrokerError> {
        let controller = self.controller()?;
        let deadline = tokio::time::Instant::now() + PLACEMENT_WAIT;
        loop {
            let image = controller.image();
            match place(&image, count, replication_factor) {
                Ok(assignments) => {
                    self.check_partition_limit(&image, &assignments)?;
                    return Ok(assignments);
                }
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(BrokerError::InvalidReplicationFactor(e.to_string()));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Refuses `assignments` when they would put more partition replicas on
    /// a broker than `max_partitions_per_broker`, or than this broker's
    /// open-file limit holds (brokers are assumed alike in that).
    fn check_partition_limit(&self, image: &MetadataImage, assignments: &[Vec<BrokerId>]) -> Result<(), BrokerError> {
        let max = u64::from(self.config.max_partitions_per_broker);
        let (soft, _) = crate::limits::open_files();
        let fd_limit = crate::limits::partitions_within(soft);
        let max_maps = crate::limits::max_map_count().unwrap_or(u64::MAX);
        let map_limit = max_maps.saturating_sub(crate::limits::RESERVED_MAPS) / crate::limits::MAPS_PER_SEGMENT;
        let limit = max.min(fd_limit).min(map_limit);
        let mut hosted: BTreeMap<BrokerId, u64> = BTreeMap::new();
        for p in image.topics().values().flat_map(|t| t.partitions.iter()) {
            for r in &p.replicas {
                *hosted.entry(*r).or_default() += 1;
            }
        }
        let mut added: BTreeMap<BrokerId, u64> = BTreeMap::new();
        for r in assignments.iter().flatten() {
            *added.entry(*r).or_default() += 1;
        }
        for (broker, new) in added {
            let now = hosted.get(&broker).copied().unwrap_or(0);
            if now + new > limit {
                let why = if map_limit < max && map_limit <= fd_limit {
                    format!(
                        "the kernel's map limit of {max_maps} (vm.max_map_count) holds about {map_limit} partitions \
                         of one segment at {} maps each (raise it with sysctl)",
                        crate::limits::MAPS_PER_SEGMENT
                    )
                } else if fd_limit < max {
                    format!(
                        "the open-file limit of {soft} descriptors holds about {fd_limit} partitions of one segment \
                         (raise it with `ulimit -n` or LimitNOFILE=)"
                    )
                } else {
                    format!("max_partitions_per_broker is {max}")
                };
                return Err(BrokerError::InvalidPartitions(format!(
                    "broker {} hosts {now} partition replicas and would get {new} more, above its limit of {limit}: \
                     {why}; use fewer partitions or more brokers",
                    broker.0
                )));
            }
        }
        Ok(())
    }

    /// Creates a topic (or only checks that it could be, with `validate_only`).
    pub async fn create_topic(self: &Arc<Self>, new: NewTopic, validate_only: bool) -> Result<(), BrokerError> {
        let name = TopicName::new(&new.name).map_err(BrokerError::InvalidTopic)?;
        let partitions = if new.partitions == 0 { self.config.default_partitions } else { new.partitions };
        if partitions > self.config.max_partitions_per_topic {
            return Err(BrokerError::InvalidPartitions(format!(
                "{partitions} partitions requested; the limit is {}",
                self.config.max_partitions_per_topic
            )));
        }
        let replication_factor = new.replication_factor.max(1);
        let mut overrides: BTreeMap<String, String> =
            new.configs.iter().map(|(k, v)| (canonical_key(k), v.clone())).collect();
        record_min_insync_replicas(&self.config.log, &mut overrides)?;
        let admin = self.admin.lock().await;
        let controller = self.controller()?;
        if controller.image().topic(name.as_str()).is_some() {
            return Err(BrokerError::TopicAlreadyExists(name.to_string()));
        }
        let assignments = self.place(partitions, replication_factor).await?;
        if validate_only {
            return Ok(());
        }
        let command = MetadataCommand::CreateTopic {
            name: name.to_string(),
            id: TopicId(random_id()),
            configs: overrides,
            assignments,
        };
        let committed = controller.propose_anywhere(command).await.map_err(from_controller)?;
        self.release_admin(admin, controller, committed.index).await;
        self.wait_reconciled(committed.index).await?;
        tracing::info!(topic = %name, partitions, "created topic");
        Ok(())
    }

    /// Deletes a topic and its data: the topic this broker's image knows by
    /// that name (by its id, so a topic created again under the name since
    /// is not deleted).
    pub async fn delete_topic(self: &Arc<Self>, name: &str) -> Result<(), BrokerError> {
        let admin = self.admin.lock().await;
        let controller = self.controller()?;
        let unknown = || BrokerError::UnknownTopicOrPartition { topic: name.to_string(), partition: None };
        let id = controller.image().topic(name).ok_or_else(unknown)?.id.clone();
        let command = MetadataCommand::DeleteTopic { name: name.to_string(), id: Some(id) };
        let committed = controller.propose_anywhere(command).await.map_err(from_controller)?;
        self.release_admin(admin, controller, committed.index).await;
        self.wait_reconciled(committed.index).await
    }

    /// Sets and resets config keys of a topic. The new overrides are
    /// computed from this broker's image and proposed as a compare-and-set
    /// on the topic's config version; when another change landed first, they
    /// are computed again from the newer image (nothing is lost).
    pub async fn alter_topic_configs(
        self: &Arc<Self>,
        name: &str,
        set: &BTreeMap<String, String>,
        delete: &[String],
    ) -> Result<(), BrokerError> {
        let admin = self.admin.lock().await;
        let controller = self.controller()?;
        let unknown = || BrokerError::UnknownTopicOrPartition { topic: name.to_string(), partition: None };
        let mut attempt = 0;
        loop {
            let image = controller.image();
            let topic = image.topic(name).ok_or_else(unknown)?;
            let overrides = altered_overrides(&self.config.log, &topic.configs, set, delete)?;
            let command = MetadataCommand::AlterTopicConfigs {
                name: name.to_string(),
                configs: overrides,
                expected_version: Some(topic.config_version),
            };
            match controller.propose_anywhere(command).await {
                Ok(committed) => {
                    self.release_admin(admin, controller, committed.index).await;
                    return self.wait_reconciled(committed.index).await;
                }
                Err(ControllerError::Refused(MetadataError::ConfigVersionChanged { current, .. }))
                    if attempt + 1 < ADMIN_CAS_ATTEMPTS =>
                {
                    attempt += 1;
                    self.wait_image(|image| image.topic(name).is_none_or(|t| t.config_version >= current)).await?;
                }
                Err(e) => return Err(from_controller(e)),
            }
        }
    }

    /// Grows a topic to `count` partitions: a compare-and-set on the count
    /// it was placed for, so a retry or a second admin cannot grow it twice.
    /// A topic that another change grew to exactly `count` meanwhile is
    /// already what was asked for.
    pub async fn create_partitions(self: &Arc<Self>, name: &str, count: u32) -> Result<(), BrokerError> {
        let admin = self.admin.lock().await;
        let controller = self.controller()?;
        let unknown = || BrokerError::UnknownTopicOrPartition { topic: name.to_string(), partition: None };
        if count > self.config.max_partitions_per_topic {
            return Err(BrokerError::InvalidPartitions(format!(
                "the limit is {} partitions",
                self.config.max_partitions_per_topic
            )));
        }
        let mut attempt = 0;
        loop {
            let image = controller.image();
            let topic = image.topic(name).ok_or_else(unknown)?;
            let current = topic.partitions.len() as u32;
            if count <= current {
                return Err(BrokerError::InvalidPartitions(format!(
                    "topic `{name}` has {current} partitions; the new count must be larger, got {count}"
                )));
            }
            let rf = topic.partitions.first().map_or(1, |p| p.replicas.len() as u32);
            let assignments = self.place(count - current, rf).await?;
            let command = MetadataCommand::CreatePartitions {
                name: name.to_string(),
                assignments,
                expected_count: Some(current),
            };
            match controller.propose_anywhere(command).await {
                Ok(committed) => {
                    self.release_admin(admin, controller, committed.index).await;
                    return self.wait_reconciled(committed.index).await;
                }
                Err(ControllerError::Refused(MetadataError::PartitionCountChanged { current, .. }))
                    if attempt + 1 < ADMIN_CAS_ATTEMPTS =>
                {
                    attempt += 1;
                    self.wait_image(|image| image.topic(name).is_none_or(|t| t.partitions.len() as u32 >= current))
                        .await?;
                    if current == count {
                        return Ok(());
                    }
                }
                Err(e) => return Err(from_controller(e)),
            }
        }
    }

    /// Ends an admin change's hold of the admin lock once its committed
    /// entry at `index` is in the local voter's image (bounded by
    /// [`RECONCILE_WAIT`]), so the next change, placement included, is
    /// computed from an image that holds this one. Opening and closing the
    /// files happens after, outside the lock: changes made at once (a script
    /// creating a thousand topics) are then reconciled together, their
    /// partitions opened in one parallel pass.
    async fn release_admin(&self, admin: tokio::sync::MutexGuard<'_, ()>, controller: &Controller, index: u64) {
        if !controller.wait_applied(index, RECONCILE_WAIT).await {
            tracing::warn!(index, "committed, but this voter has not applied it after {RECONCILE_WAIT:?}");
        }
        drop(admin);
    }

    /// Waits (bounded) until this broker's controller image satisfies `until`.
    async fn wait_image(&self, until: impl Fn(&MetadataImage) -> bool) -> Result<(), BrokerError> {
        let controller = self.controller()?;
        let mut applied = self.reconciled.subscribe();
        let wait = async {
            while !until(&controller.image()) {
                if applied.changed().await.is_err() {
                    return Err(BrokerError::ShuttingDown);
                }
            }
            Ok(())
        };
        tokio::time::timeout(RECONCILE_WAIT, wait).await.unwrap_or_else(|_| {
            Err(BrokerError::Controller(ControllerError::Timeout {
                timeout_ms: u64::try_from(RECONCILE_WAIT.as_millis()).unwrap_or(u64::MAX),
            }))
        })
    }

    /// Every partition this broker hosts.
    pub fn all_partitions(&self) -> Vec<Arc<Partition>> {
        self.topics().iter().flat_map(|t| t.partitions.values().cloned()).collect()
    }

    /// Flushes, checkpoints and closes every log; true when all closed
    /// cleanly. Blocking.
    pub fn close(&self) -> bool {
        self.fetchers.shutdown();
        // In parallel: each close syncs and writes its checkpoints.
        let partitions = self.all_partitions();
        let closed = in_parallel(&partitions, |p| match p.close() {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(topic = p.topic(), partition = p.index(), error = %e, "closing partition failed");
                false
            }
        });
        closed.into_iter().all(|ok| ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::recorded_min_insync_replicas;

    #[test]
    fn deleting_the_min_insync_replicas_override_records_the_broker_default() {
        let defaults = crate::config::LogDefaults { min_insync_replicas: 2, ..Default::default() };
        let current = BTreeMap::from([("min_insync_replicas".to_string(), "1".to_string())]);
        let altered = altered_overrides(&defaults, &current, &BTreeMap::new(), &["min.insync.replicas".into()]);
        let altered = altered.unwrap();
        assert_eq!(altered["min_insync_replicas"], "2", "what leaders use is what the controller reads");
        assert_eq!(recorded_min_insync_replicas(&altered), 2);
        let set = BTreeMap::from([("min_insync_replicas".to_string(), "3".to_string())]);
        let altered = altered_overrides(&defaults, &current, &set, &[]).unwrap();
        assert_eq!(recorded_min_insync_replicas(&altered), 3);
        let bad = BTreeMap::from([("min_insync_replicas".to_string(), "0".to_string())]);
        assert!(altered_overrides(&defaults, &current, &bad, &[]).is_err());
    }
}
