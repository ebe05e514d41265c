//! The broker's state: its topics and their partitions, persisted in the
//! data directory, and the admin operations that change them.
//!
//! Layout of the data directory:
//!
//! ```text
//! .lock                 held (flock) while a broker runs on this directory
//! topics.json           every topic: name, id, partition count, config overrides
//! <topic>-<partition>/  one partition's log (see `storage`)
//! ```
//!
//! Topics are immutable values behind `Arc`; a change builds a new `Topic`
//! that shares the old one's partitions and swaps it in. Admin operations are
//! serialized by one async mutex, held across the disk work they do (they
//! are rare, and must not interleave); the topic map's own lock is only held
//! for in-memory reads and swaps.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use crate::config::BrokerConfig;
use crate::error::BrokerError;
use crate::partition::Partition;
use crate::storage::{Log, SystemClock};
use crate::topic::{TopicConfig, TopicName, canonical_key};

/// A topic and its partitions.
#[derive(Debug)]
pub struct Topic {
    /// Name.
    pub name: TopicName,
    /// Random id, fixed at creation.
    pub id: String,
    /// Replicas per partition.
    pub replication_factor: u32,
    /// Config keys set on this topic (canonical names).
    pub overrides: BTreeMap<String, String>,
    /// Effective config.
    pub config: TopicConfig,
    /// Partitions, by number.
    pub partitions: Vec<Arc<Partition>>,
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

impl Broker {
    /// Opens the data directory (locking it), recovers every partition log,
    /// and removes what an interrupted topic deletion left behind. Blocking.
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
        let broker = Broker {
            advertised_address,
            topics: RwLock::new(BTreeMap::new()),
            admin: tokio::sync::Mutex::new(()),
            _lock: lock,
            config,
        };
        let stored = broker.read_store()?;
        let mut topics = BTreeMap::new();
        for t in stored.topics {
            let name = TopicName::new(&t.name).map_err(BrokerError::InvalidTopic)?;
            let config = TopicConfig::with_overrides(&broker.config.log, &t.configs)?;
            let partitions =
                (0..t.partitions).map(|p| broker.open_partition(&name, p, &config)).collect::<Result<_, _>>()?;
            tracing::info!(topic = %name, partitions = t.partitions, "loaded topic");
            let topic = Topic {
                name,
                id: t.id,
                replication_factor: t.replication_factor,
                overrides: t.configs,
                config,
                partitions,
            };
            topics.insert(t.name, Arc::new(topic));
        }
        *broker.topics.write().unwrap_or_else(std::sync::PoisonError::into_inner) = topics;
        Ok(broker)
    }

    fn store_path(&self) -> PathBuf {
        self.config.data_dir.join("topics.json")
    }

    fn read_store(&self) -> Result<StoredTopics, BrokerError> {
        let path = self.store_path();
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| BrokerError::InvalidRequest(format!("cannot parse {}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(StoredTopics { version: 1, topics: Vec::new() }),
            Err(source) => Err(BrokerError::Storage(crate::storage::StorageError::Io { op: "read", path, source })),
        }
    }

    fn write_store(&self, topics: &BTreeMap<String, Arc<Topic>>) -> Result<(), BrokerError> {
        let stored = StoredTopics {
            version: 1,
            topics: topics
                .values()
                .map(|t| StoredTopic {
                    name: t.name.to_string(),
                    id: t.id.clone(),
                    partitions: t.partitions.len() as u32,
                    replication_factor: t.replication_factor,
                    configs: t.overrides.clone(),
                })
                .collect(),
        };
        let json = serde_json::to_vec_pretty(&stored).expect("topics serialize");
        crate::storage::fs::write_atomic(&self.store_path(), &json).map_err(BrokerError::Storage)
    }

    fn open_partition(
        &self,
        topic: &TopicName,
        index: u32,
        config: &TopicConfig,
    ) -> Result<Arc<Partition>, BrokerError> {
        let dir = partition_dir(&self.config.data_dir, topic.as_str(), index);
        let log = Log::open(&dir, config.log.clone(), Arc::new(SystemClock))?;
        let limit = u32::try_from(self.config.max_inflight_bytes_per_partition).unwrap_or(u32::MAX);
        Ok(Arc::new(Partition::new(Arc::from(topic.as_str()), index, log, limit)))
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

    /// The topic called `name`.
    pub fn topic(&self, name: &str) -> Option<Arc<Topic>> {
        self.topics.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(name).cloned()
    }

    /// All topics, by name.
    pub fn topics(&self) -> Vec<Arc<Topic>> {
        self.topics.read().unwrap_or_else(std::sync::PoisonError::into_inner).values().cloned().collect()
    }

    /// Partition `index` of `topic`, with the topic.
    pub fn partition(&self, topic: &str, index: u32) -> Result<(Arc<Topic>, Arc<Partition>), BrokerError> {
        let unknown = || BrokerError::UnknownTopicOrPartition { topic: topic.to_string(), partition: Some(index) };
        let t = self.topic(topic).ok_or_else(unknown)?;
        let p = t.partitions.get(index as usize).cloned().ok_or_else(unknown)?;
        Ok((t, p))
    }

    fn swap_topics(&self, f: impl FnOnce(&mut BTreeMap<String, Arc<Topic>>)) -> Result<(), BrokerError> {
        let mut next = self.topics.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        f(&mut next);
        self.write_store(&next)?;
        *self.topics.write().unwrap_or_else(std::sync::PoisonError::into_inner) = next;
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
        if replication_factor > 1 {
            return Err(BrokerError::InvalidReplicationFactor(format!(
                "replication factor {replication_factor} is larger than the number of brokers (1)"
            )));
        }
        let overrides: BTreeMap<String, String> =
            new.configs.iter().map(|(k, v)| (canonical_key(k), v.clone())).collect();
        let config = TopicConfig::with_overrides(&self.config.log, &overrides)?;
        let _admin = self.admin.lock().await;
        if self.topic(name.as_str()).is_some() {
            return Err(BrokerError::TopicAlreadyExists(name.to_string()));
        }
        if validate_only {
            return Ok(());
        }
        let this = self.clone();
        let topic = tokio::task::spawn_blocking(move || -> Result<Topic, BrokerError> {
            let parts = (0..partitions).map(|p| this.open_partition(&name, p, &config)).collect::<Result<_, _>>()?;
            Ok(Topic { name, id: random_id(), replication_factor, overrides, config, partitions: parts })
        })
        .await
        .map_err(|e| BrokerError::InvalidRequest(format!("create task failed: {e}")))??;
        tracing::info!(topic = %topic.name, partitions, "created topic");
        let topic = Arc::new(topic);
        self.swap_topics(|m| {
            m.insert(topic.name.to_string(), topic.clone());
        })
    }

    /// Deletes a topic and its data.
    pub async fn delete_topic(self: &Arc<Self>, name: &str) -> Result<(), BrokerError> {
        let _admin = self.admin.lock().await;
        let topic = self
            .topic(name)
            .ok_or_else(|| BrokerError::UnknownTopicOrPartition { topic: name.to_string(), partition: None })?;
        self.swap_topics(|m| {
            m.remove(name);
        })?;
        let data_dir = self.config.data_dir.clone();
        tokio::task::spawn_blocking(move || {
            for p in &topic.partitions {
                let _ = p.close();
                let dir = partition_dir(&data_dir, topic.name.as_str(), p.index());
                let doomed = data_dir.join(format!("{}-{}.{}.delete", topic.name, p.index(), topic.id));
                if std::fs::rename(&dir, &doomed).is_ok() {
                    let _ = std::fs::remove_dir_all(&doomed);
                }
            }
        })
        .await
        .map_err(|e| BrokerError::InvalidRequest(format!("delete task failed: {e}")))?;
        tracing::info!(topic = name, "deleted topic");
        Ok(())
    }

    /// Sets and resets config keys of a topic.
    pub async fn alter_topic_configs(
        self: &Arc<Self>,
        name: &str,
        set: &BTreeMap<String, String>,
        delete: &[String],
    ) -> Result<(), BrokerError> {
        let _admin = self.admin.lock().await;
        let topic = self
            .topic(name)
            .ok_or_else(|| BrokerError::UnknownTopicOrPartition { topic: name.to_string(), partition: None })?;
        let mut overrides = topic.overrides.clone();
        for k in delete {
            overrides.remove(&canonical_key(k));
        }
        for (k, v) in set {
            overrides.insert(canonical_key(k), v.clone());
        }
        let config = TopicConfig::with_overrides(&self.config.log, &overrides)?;
        for p in &topic.partitions {
            p.set_config(&config)?;
        }
        let next = Arc::new(Topic {
            name: topic.name.clone(),
            id: topic.id.clone(),
            replication_factor: topic.replication_factor,
            overrides,
            config,
            partitions: topic.partitions.clone(),
        });
        self.swap_topics(|m| {
            m.insert(name.to_string(), next);
        })
    }

    /// Grows a topic to `count` partitions.
    pub async fn create_partitions(self: &Arc<Self>, name: &str, count: u32) -> Result<(), BrokerError> {
        let _admin = self.admin.lock().await;
        let topic = self
            .topic(name)
            .ok_or_else(|| BrokerError::UnknownTopicOrPartition { topic: name.to_string(), partition: None })?;
        let current = topic.partitions.len() as u32;
        if count <= current {
            return Err(BrokerError::InvalidPartitions(format!(
                "topic `{name}` has {current} partitions; the new count must be larger, got {count}"
            )));
        }
        if count > self.config.max_partitions_per_topic {
            return Err(BrokerError::InvalidPartitions(format!(
                "the limit is {} partitions",
                self.config.max_partitions_per_topic
            )));
        }
        let this = self.clone();
        let t = topic.clone();
        let added: Vec<Arc<Partition>> = tokio::task::spawn_blocking(move || {
            (current..count).map(|p| this.open_partition(&t.name, p, &t.config)).collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|e| BrokerError::InvalidRequest(format!("create task failed: {e}")))??;
        let mut partitions = topic.partitions.clone();
        partitions.extend(added);
        let next = Arc::new(Topic {
            name: topic.name.clone(),
            id: topic.id.clone(),
            replication_factor: topic.replication_factor,
            overrides: topic.overrides.clone(),
            config: topic.config.clone(),
            partitions,
        });
        self.swap_topics(|m| {
            m.insert(name.to_string(), next);
        })
    }

    /// Every partition of every topic.
    pub fn all_partitions(&self) -> Vec<Arc<Partition>> {
        self.topics().iter().flat_map(|t| t.partitions.iter().cloned()).collect()
    }

    /// Flushes, checkpoints and closes every log. Blocking.
    pub fn close(&self) {
        for p in self.all_partitions() {
            if let Err(e) = p.close() {
                tracing::error!(topic = p.topic(), partition = p.index(), error = %e, "closing partition failed");
            }
        }
    }
}
