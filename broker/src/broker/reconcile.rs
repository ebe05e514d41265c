//! Following the metadata image: opening, re-roling, closing and deleting
//! the partitions this broker hosts.
//!
//! Reconciling is incremental. An image shares every unchanged topic with
//! the image before it (the same `Arc<TopicState>`), and a hosted [`Topic`]
//! remembers the state it was built from, so a new image costs work only
//! for the topics it changed: one created topic among a thousand opens its
//! partitions and gives them roles, and leaves the other thousand alone.
//! A change of the broker registrations (a broker fenced, unfenced or
//! re-registered at another address) touches every partition's roles (its
//! followers' addresses, its fenced replicas), so it re-roles every topic.
//! A topic whose partitions did not all open, or whose roles did not all
//! take, is done again at the next image.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::{Broker, PARTITION_METADATA, Topic, partition_dir};
use crate::controller::{AppliedImage, BrokerId, BrokerRegistration, TopicState, recorded_min_insync_replicas};
use crate::error::BrokerError;
use crate::partition::{LeaderSession, Partition};
use crate::replication::fetcher::Follow;
use crate::replication::isr::now_ms;
use crate::replication::{Assignment, LeaderSettings};
use crate::storage::{Log, SystemClock};
use crate::topic::{TopicConfig, TopicName};

/// Threads that open partitions (or take their leaderships) at once: each
/// is mostly waiting on file creation and fsyncs, and concurrent fsyncs
/// share the file system's journal commits, so many more threads than cores
/// pay off (64 rather than 16: 10,000 new partitions led in 6.5 s instead of
/// 10 s on this machine).
const OPEN_THREADS: usize = 64;

/// What the last reconcile left for the next one to compare against.
#[derive(Debug, Default)]
pub(super) struct Reconciled {
    /// The broker registrations of the last image.
    brokers: BTreeMap<BrokerId, BrokerRegistration>,
    /// Per hosted topic (by name), the partitions it follows and their
    /// leaders, as last handed to the fetchers.
    follows: BTreeMap<String, Vec<(BrokerId, Follow)>>,
}

/// `open(item)` for every item, on up to [`OPEN_THREADS`] threads; the
/// results in the items' order.
pub(super) fn in_parallel<I: Clone + Sync, T: Send>(items: &[I], open: impl Fn(I) -> T + Sync) -> Vec<T> {
    if items.len() < 8 {
        return items.iter().map(|i| open(i.clone())).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let threads = OPEN_THREADS.min(items.len());
    let mut results: Vec<(usize, T)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(item) = items.get(i) else { return done };
                        done.push((i, open(item.clone())));
                    }
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().expect("an opening thread panicked")).collect()
    });
    results.sort_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, r)| r).collect()
}

/// A topic of the new image that needs work: new, changed, or left
/// incomplete by an earlier reconcile.
struct Pending<'a> {
    name: &'a String,
    topic_name: TopicName,
    image: &'a Arc<TopicState>,
    config: TopicConfig,
    existing: Option<&'a Arc<Topic>>,
    partitions: BTreeMap<u32, Arc<Partition>>,
    complete: bool,
}

/// True when two follow lists name the same partitions (the same open
/// partition values) in the same leader epochs under the same leaders.
fn same_follows(a: &[(BrokerId, Follow)], b: &[(BrokerId, Follow)]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|((la, fa), (lb, fb))| {
            la == lb
                && fa.leader_epoch == fb.leader_epoch
                && fa.topic_id == fb.topic_id
                && Arc::ptr_eq(&fa.partition, &fb.partition)
        })
}

impl Broker {
    /// Opens (or creates) the log of partition `index` of topic `id`. A
    /// directory left by an earlier topic of the same name (another id) is
    /// deleted first, so a recreated topic never sees the old one's data.
    fn open_partition(
        &self,
        topic: &TopicName,
        id: &str,
        index: u32,
        config: &TopicConfig,
    ) -> Result<Arc<Partition>, BrokerError> {
        let dir = partition_dir(&self.config.data_dir, topic.as_str(), index);
        let marker = dir.join(PARTITION_METADATA);
        let io = |op: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| BrokerError::Storage(crate::storage::StorageError::Io { op, path, source })
        };
        match std::fs::read_to_string(&marker) {
            Ok(text) if text.trim() != format!("topic_id: {id}") => {
                tracing::warn!(dir = %dir.display(), found = text.trim(), wanted = id, "removing the data of an earlier topic with this name");
                let doomed = self.config.data_dir.join(format!("{}-{index}.stale.delete", topic));
                std::fs::rename(&dir, &doomed).map_err(io("rename", &dir))?;
                std::fs::remove_dir_all(&doomed).map_err(io("remove directory", &doomed))?;
            }
            _ => {}
        }
        let log = Log::open(&dir, config.log.clone(), Arc::new(SystemClock))?;
        if !marker.exists() {
            crate::storage::fs::write_atomic(&marker, format!("topic_id: {id}\n").as_bytes())?;
        }
        let limit = u32::try_from(self.config.max_inflight_bytes_per_partition).unwrap_or(u32::MAX);
        let (serving, lease) = (self.serving.clone(), self.lease.clone());
        let session = LeaderSession::new(move || serving.load(Ordering::SeqCst) && lease.is_valid());
        Ok(Arc::new(Partition::new(Arc::from(topic.as_str()), index, log, limit).with_session(session)))
    }

    /// The effective config of a topic of the image on this broker.
    fn topic_config(&self, name: &str, t: &TopicState) -> TopicConfig {
        let mut config = TopicConfig::with_overrides(&self.config.log, &t.configs).unwrap_or_else(|e| {
            tracing::error!(topic = %name, error = %e, "topic config does not apply here; using the defaults");
            TopicConfig::from_defaults(&self.config.log).expect("validated defaults")
        });
        config.log.max_producers = self.config.max_producers_per_partition.max(1) as usize;
        config.log.cache_min_free_percent = self.config.page_cache_min_free_percent.min(100);
        config
    }

    /// Brings the hosted topics and partitions in line with `applied`: opens
    /// the partitions whose replicas include this broker, applies config
    /// changes and roles, and closes and deletes what the image no longer
    /// holds. Only topics the image changed are worked on (see the module
    /// doc). Blocking; one at a time.
    pub fn reconcile(&self, applied: &AppliedImage) -> Result<(), BrokerError> {
        let _one = self.reconcile_lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let started = std::time::Instant::now();
        let mut reconciled = self.reconciled_state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.next_producer_id.fetch_max(applied.image.next_producer_id(), Ordering::AcqRel);
        let current = self.topics.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        let me = BrokerId(self.node_id());
        let brokers_changed = reconciled.brokers != *applied.image.brokers();
        let mut next: BTreeMap<String, Arc<Topic>> = BTreeMap::new();
        let mut failure = None;
        // First what each changed topic needs; then every new partition of
        // every topic opened at once (a restarted broker opens thousands);
        // then the topics.
        let mut pending = Vec::new();
        let mut to_open: Vec<(usize, u32)> = Vec::new();
        for (name, t) in applied.image.topics() {
            let existing = current.get(name).filter(|e| e.id == t.id.0);
            if let Some(e) = existing
                && Arc::ptr_eq(&e.image, t)
                && e.complete.load(Ordering::Acquire)
            {
                next.insert(name.clone(), e.clone());
                continue;
            }
            let Ok(topic_name) = TopicName::new(name) else { continue };
            let config = self.topic_config(name, t);
            let config_changed = existing.is_some_and(|e| e.overrides != t.configs);
            let mut partitions = BTreeMap::new();
            for (index, state) in t.partitions.iter().enumerate() {
                let index = index as u32;
                if !state.replicas.contains(&me) {
                    continue;
                }
                match existing.and_then(|e| e.partitions.get(&index)) {
                    Some(p) => {
                        if config_changed && let Err(e) = p.set_config(&config) {
                            tracing::error!(topic = %name, partition = index, error = %e, "config change failed");
                        }
                        partitions.insert(index, p.clone());
                    }
                    None => to_open.push((pending.len(), index)),
                }
            }
            pending.push(Pending { name, topic_name, image: t, config, existing, partitions, complete: true });
        }
        let opened = in_parallel(&to_open, |(slot, index)| {
            let p = &pending[slot];
            self.open_partition(&p.topic_name, &p.image.id.0, index, &p.config)
        });
        let (opened_count, open_took) = (to_open.len(), started.elapsed());
        for ((slot, index), opened) in to_open.into_iter().zip(opened) {
            match opened {
                Ok(p) => {
                    pending[slot].partitions.insert(index, p);
                }
                Err(e) => {
                    tracing::error!(topic = %pending[slot].name, partition = index, error = %e, "cannot open partition");
                    pending[slot].complete = false;
                    failure.get_or_insert(e);
                }
            }
        }
        let mut changed: BTreeSet<&str> = BTreeSet::new();
        for Pending { name, topic_name, image: t, config, existing, partitions, complete } in pending {
            let replication_factor = t.partitions.first().map_or(1, |p| p.replicas.len() as u32);
            changed.insert(name.as_str());
            next.insert(
                name.clone(),
                Arc::new(Topic {
                    name: topic_name,
                    id: t.id.0.clone(),
                    replication_factor,
                    overrides: t.configs.clone(),
                    config,
                    states: t.partitions.clone(),
                    partitions,
                    metrics: existing.map_or_else(|| crate::metrics::TopicMetrics::new(name), |e| e.metrics.clone()),
                    image: t.clone(),
                    complete: std::sync::atomic::AtomicBool::new(complete),
                }),
            );
        }
        let to_role: Vec<&Arc<Topic>> = if brokers_changed {
            next.values().collect()
        } else {
            next.iter().filter(|(name, _)| changed.contains(name.as_str())).map(|(_, t)| t).collect()
        };
        let roled = to_role.len();
        let roles_started = std::time::Instant::now();
        let leaderships = self.apply_roles(applied, &to_role, brokers_changed, &mut reconciled.follows);
        let roles_took = roles_started.elapsed();
        if brokers_changed {
            reconciled.brokers = applied.image.brokers().clone();
        }
        let mine = self.incarnation.get().copied();
        let serving = applied.image.broker(me).is_some_and(|b| Some(b.incarnation) == mine && !b.fenced);
        self.serving.store(serving, Ordering::SeqCst);
        let gone: Vec<Arc<Topic>> = current
            .values()
            .filter(|old| next.get(old.name.as_str()).is_none_or(|n| n.id != old.id))
            .cloned()
            .collect();
        *self.topics.write().unwrap_or_else(std::sync::PoisonError::into_inner) = next;
        drop(reconciled);
        for topic in gone {
            self.delete_local(&topic);
            tracing::info!(topic = %topic.name, "deleted topic");
        }
        self.reconciled.send_replace(applied.index);
        let took = started.elapsed();
        if took >= std::time::Duration::from_secs(1) {
            // What a slow start or a large creation spent its time on.
            tracing::info!(
                index = applied.index,
                opened = opened_count,
                open_ms = open_took.as_millis() as u64,
                topics_roled = roled,
                leaderships_taken = leaderships,
                roles_ms = roles_took.as_millis() as u64,
                took_ms = took.as_millis() as u64,
                "reconciled a metadata image"
            );
        } else {
            tracing::debug!(
                index = applied.index,
                opened = opened_count,
                topics_roled = roled,
                leaderships_taken = leaderships,
                took_ms = took.as_millis() as u64,
                "reconciled a metadata image"
            );
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Gives every hosted partition of `topics` its role from the image
    /// (leader with the committed ISR, or follower of the leader it names),
    /// records what each follows in `follows`, and points the fetchers at
    /// the leaders when that changed (always when `all`: every hosted topic
    /// is in `topics`, and leaders' addresses may have moved). A topic some
    /// role of which did not take is marked incomplete, to be done again at
    /// the next image. Returns how many leaderships it took in a new epoch.
    fn apply_roles(
        &self,
        applied: &AppliedImage,
        topics: &[&Arc<Topic>],
        all: bool,
        follows: &mut BTreeMap<String, Vec<(BrokerId, Follow)>>,
    ) -> usize {
        let me = BrokerId(self.node_id());
        let now = now_ms();
        let take = |t: &Topic, index: u32| {
            let settings = LeaderSettings {
                // The controller's elections use the recorded value too.
                min_insync_replicas: recorded_min_insync_replicas(&t.overrides),
                replica_lag_time_max_ms: self.config.replica_lag_time_max_ms,
            };
            let (p, state) = (&t.partitions[&index], &t.states[index as usize]);
            let elected = p.leading_epoch() != Some(state.leader_epoch.0);
            let assignment = Assignment {
                replicas: state.replicas.clone(),
                isr: state.isr.clone(),
                leader_epoch: state.leader_epoch.0,
                partition_epoch: state.partition_epoch.0,
            };
            match p.make_leader(me, assignment, settings, now) {
                Ok(()) if elected && p.leading_epoch() == Some(state.leader_epoch.0) => {
                    metrics::counter!(crate::metrics::LEADER_ELECTIONS).increment(1);
                }
                Ok(()) => {}
                Err(e) => {
                    t.complete.store(false, Ordering::Release);
                    tracing::error!(topic = %t.name, partition = index, error = %e, "cannot take the leadership")
                }
            }
            // KIP-841: what the controller would refuse to add.
            let fenced = |r: &&BrokerId| applied.image.broker(**r).is_none_or(|b| b.fenced);
            p.set_fenced_replicas(state.replicas.iter().filter(fenced).copied().collect());
        };
        // Leaderships in a new epoch are taken in parallel, over every
        // topic: each writes the epoch to its checkpoint file (an fsync),
        // and a restarted broker takes thousands at once. The rest is
        // bookkeeping, done here.
        let mut new_epoch: Vec<(&Topic, u32)> = Vec::new();
        let mut follows_changed = false;
        for t in topics {
            let mut followed = Vec::new();
            for (index, p) in &t.partitions {
                let Some(state) = t.states.get(*index as usize) else { continue };
                match state.leader {
                    Some(leader) if leader == me => {
                        if p.leading_epoch() == Some(state.leader_epoch.0) {
                            take(t, *index);
                        } else {
                            new_epoch.push((t, *index));
                        }
                    }
                    leader => {
                        p.make_follower(leader, state.leader_epoch.0);
                        let Some(leader) = leader else { continue };
                        followed.push((
                            leader,
                            Follow {
                                topic: Arc::from(t.name.as_str()),
                                topic_id: Arc::from(t.id.as_str()),
                                partition: p.clone(),
                                leader_epoch: state.leader_epoch.0,
                            },
                        ));
                    }
                }
            }
            let before = follows.get(t.name.as_str()).map_or(&[][..], Vec::as_slice);
            if !same_follows(before, &followed) {
                follows_changed = true;
                if followed.is_empty() {
                    follows.remove(t.name.as_str());
                } else {
                    follows.insert(t.name.as_str().to_string(), followed);
                }
            }
        }
        in_parallel(&new_epoch, |(t, index)| take(t, index));
        // Topics gone from the image stop being followed too.
        let before = follows.len();
        follows.retain(|name, _| applied.image.topics().contains_key(name));
        follows_changed |= follows.len() != before;
        if follows_changed || all {
            self.fetchers.update(self.wanted_fetches(applied, follows));
        }
        new_epoch.len()
    }

    /// Per leader broker, its address and every partition followed from it.
    fn wanted_fetches(
        &self,
        applied: &AppliedImage,
        follows: &BTreeMap<String, Vec<(BrokerId, Follow)>>,
    ) -> BTreeMap<BrokerId, (String, Vec<Follow>)> {
        let mut wanted: BTreeMap<BrokerId, (String, Vec<Follow>)> = BTreeMap::new();
        for (leader, follow) in follows.values().flatten() {
            let Some(address) = applied.image.broker(*leader).map(|b| b.address.clone()) else { continue };
            wanted.entry(*leader).or_insert_with(|| (address, Vec::new())).1.push(follow.clone());
        }
        wanted
    }

    /// Closes a topic's hosted partitions and deletes their data.
    pub(super) fn delete_local(&self, topic: &Topic) {
        for p in topic.partitions.values() {
            let _ = p.close();
            let dir = partition_dir(&self.config.data_dir, topic.name.as_str(), p.index());
            let doomed = self.config.data_dir.join(format!("{}-{}.{}.delete", topic.name, p.index(), topic.id));
            if std::fs::rename(&dir, &doomed).is_ok() {
                let _ = std::fs::remove_dir_all(&doomed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BrokerConfig;
    use crate::controller::{MetadataCommand, MetadataImage, TopicId};

    struct Cluster {
        image: MetadataImage,
        index: u64,
    }

    impl Cluster {
        fn new() -> Cluster {
            let mut c = Cluster { image: MetadataImage::default(), index: 0 };
            let id = BrokerId(1);
            c.apply(MetadataCommand::RegisterBroker {
                id,
                address: "127.0.0.1:1".into(),
                incarnation: 1,
                previous_incarnation: None,
            });
            c.apply(MetadataCommand::UnfenceBroker { id, incarnation: 1 });
            c
        }

        fn apply(&mut self, command: MetadataCommand) -> AppliedImage {
            self.image.apply(&command).expect("applies");
            self.index += 1;
            AppliedImage { index: self.index, image: Arc::new(self.image.clone()) }
        }

        fn create(&mut self, name: &str, partitions: usize) -> AppliedImage {
            self.apply(MetadataCommand::CreateTopic {
                name: name.into(),
                id: TopicId(format!("id-{name}")),
                configs: BTreeMap::new(),
                assignments: vec![vec![BrokerId(1)]; partitions],
            })
        }
    }

    fn broker(dir: &Path) -> Broker {
        let config = BrokerConfig { node_id: 1, data_dir: dir.to_path_buf(), ..BrokerConfig::default() };
        Broker::open(config, "127.0.0.1:1".into()).expect("open")
    }

    #[test]
    fn an_image_costs_work_only_for_the_topics_it_changed() {
        let dir = tempfile::tempdir().unwrap();
        let b = broker(dir.path());
        let mut c = Cluster::new();
        b.reconcile(&c.create("a", 2)).unwrap();
        let a = b.topic("a").expect("hosted");
        assert_eq!(a.partitions.len(), 2);

        b.reconcile(&c.create("b", 3)).unwrap();
        assert!(Arc::ptr_eq(&a, &b.topic("a").unwrap()), "an unchanged topic is the same value");
        assert_eq!(b.topic("b").unwrap().partitions.len(), 3);

        let altered = c.apply(MetadataCommand::AlterTopicConfigs {
            name: "a".into(),
            configs: BTreeMap::from([("retention_ms".to_string(), "60000".to_string())]),
            expected_version: None,
        });
        b.reconcile(&altered).unwrap();
        let a2 = b.topic("a").unwrap();
        assert!(!Arc::ptr_eq(&a, &a2), "a changed topic is rebuilt");
        assert_eq!(a2.overrides["retention_ms"], "60000");
        for (i, p) in &a.partitions {
            assert!(Arc::ptr_eq(p, &a2.partitions[i]), "its partitions stay open, not reopened");
        }

        b.reconcile(&c.apply(MetadataCommand::DeleteTopic { name: "b".into(), id: None })).unwrap();
        assert!(b.topic("b").is_none());
        assert!(!dir.path().join("b-0").exists(), "a deleted topic's data goes");
        assert!(Arc::ptr_eq(&a2, &b.topic("a").unwrap()));
        assert_eq!(*b.reconciled_index().borrow(), c.index);
    }

    #[test]
    fn a_topic_left_incomplete_is_done_again_at_the_next_image() {
        let dir = tempfile::tempdir().unwrap();
        let b = broker(dir.path());
        let mut c = Cluster::new();
        // A file where partition c-1's directory goes: it cannot open.
        std::fs::write(dir.path().join("c-1"), b"in the way").unwrap();
        let image = c.create("c", 2);
        assert!(b.reconcile(&image).is_err(), "the failure is reported");
        assert_eq!(b.topic("c").unwrap().partitions.len(), 1, "what could open is served");

        std::fs::remove_file(dir.path().join("c-1")).unwrap();
        b.reconcile(&c.create("d", 1)).unwrap();
        assert_eq!(b.topic("c").unwrap().partitions.len(), 2, "the unchanged but incomplete topic was retried");
        let c_topic = b.topic("c").unwrap();
        b.reconcile(&c.create("e", 1)).unwrap();
        assert!(Arc::ptr_eq(&c_topic, &b.topic("c").unwrap()), "complete now: left alone");
    }

    #[test]
    fn a_broker_change_re_roles_every_topic_and_the_images_share_unchanged_topics() {
        let mut c = Cluster::new();
        let first = c.create("a", 2);
        let second = c.create("b", 1);
        assert!(Arc::ptr_eq(&first.image.topics()["a"], &second.image.topics()["a"]));
        let registered = c.apply(MetadataCommand::RegisterBroker {
            id: BrokerId(2),
            address: "127.0.0.1:2".into(),
            incarnation: 1,
            previous_incarnation: None,
        });
        assert!(Arc::ptr_eq(&second.image.topics()["a"], &registered.image.topics()["a"]));
        let dir = tempfile::tempdir().unwrap();
        let b = broker(dir.path());
        b.reconcile(&second).unwrap();
        let a = b.topic("a").unwrap();
        b.reconcile(&registered).unwrap();
        assert!(Arc::ptr_eq(&a, &b.topic("a").unwrap()), "roles are re-applied in place; the topic is unchanged");
        let state = b.reconciled_state.lock().unwrap();
        assert!(state.brokers.contains_key(&BrokerId(2)), "the registrations are remembered for the next compare");
    }
}
