//! Replica placement: which brokers hold the replicas of new partitions.
//!
//! Sans-IO and deterministic: the same image and request give the same
//! assignment. Replicas go only to unfenced brokers; each new partition's
//! preferred leader (its first replica) is the live broker that leads the
//! fewest partitions so far, and its followers the brokers that hold the
//! fewest replicas, counting what the new partitions already took, so
//! leaders and replicas spread evenly over the cluster as topics come and
//! go. Ties go to the lower broker id, rotated by partition number so equal
//! brokers take turns.

use std::collections::BTreeMap;

use super::metadata::{BrokerId, MetadataImage};

/// Why no placement exists.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    /// More replicas per partition than running brokers (or none at all).
    #[error(
        "replication factor {replication_factor} cannot be met: {live} broker(s) are running; \
         the replication factor must be between 1 and the number of running brokers"
    )]
    InvalidReplicationFactor {
        /// Replicas asked for.
        replication_factor: u32,
        /// Unfenced brokers.
        live: usize,
    },
}

#[derive(Debug, Clone, Copy, Default)]
struct Load {
    leaders: u64,
    replicas: u64,
}

/// Replicas for `count` new partitions of `replication_factor` replicas.
pub fn place(image: &MetadataImage, count: u32, replication_factor: u32) -> Result<Vec<Vec<BrokerId>>, PlacementError> {
    let live: Vec<BrokerId> = image.live_brokers().collect();
    let rf = replication_factor as usize;
    if rf == 0 || rf > live.len() {
        return Err(PlacementError::InvalidReplicationFactor { replication_factor, live: live.len() });
    }
    let mut load: BTreeMap<BrokerId, Load> = live.iter().map(|b| (*b, Load::default())).collect();
    for topic in image.topics().values() {
        for p in &topic.partitions {
            for (i, b) in p.replicas.iter().enumerate() {
                if let Some(l) = load.get_mut(b) {
                    l.replicas += 1;
                    l.leaders += u64::from(i == 0);
                }
            }
        }
    }
    let mut out = Vec::with_capacity(count as usize);
    for partition in 0..count as usize {
        // Equal brokers take turns: rotate the tie-break order per partition.
        let turn = |b: &BrokerId| {
            let i = live.iter().position(|x| x == b).expect("live broker");
            (i + live.len() - partition % live.len()) % live.len()
        };
        let leader = *live
            .iter()
            .min_by_key(|b| (load[b].leaders, load[b].replicas, turn(b)))
            .expect("at least one live broker");
        let mut replicas = vec![leader];
        let mut rest: Vec<BrokerId> = live.iter().copied().filter(|b| *b != leader).collect();
        rest.sort_by_key(|b| (load[b].replicas, turn(b)));
        replicas.extend(rest.into_iter().take(rf - 1));
        for (i, b) in replicas.iter().enumerate() {
            let l = load.get_mut(b).expect("live broker");
            l.replicas += 1;
            l.leaders += u64::from(i == 0);
        }
        out.push(replicas);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::controller::metadata::{MetadataCommand, TopicId};

    fn image(brokers: u32) -> MetadataImage {
        let mut image = MetadataImage::default();
        for id in 1..=brokers {
            let cmd = MetadataCommand::RegisterBroker {
                id: BrokerId(id),
                address: format!("h:{id}"),
                incarnation: 1,
                previous_incarnation: None,
            };
            image.apply(&cmd).unwrap();
            image.apply(&MetadataCommand::UnfenceBroker { id: BrokerId(id), incarnation: 1 }).unwrap();
        }
        image
    }

    fn counts(image: &MetadataImage, extra: &[Vec<BrokerId>]) -> BTreeMap<BrokerId, (u64, u64)> {
        let mut out: BTreeMap<BrokerId, (u64, u64)> = image.live_brokers().map(|b| (b, (0, 0))).collect();
        let existing = image.topics().values().flat_map(|t| t.partitions.iter().map(|p| p.replicas.clone()));
        for replicas in existing.chain(extra.iter().cloned()) {
            for (i, b) in replicas.iter().enumerate() {
                let e = out.get_mut(b).unwrap();
                e.0 += u64::from(i == 0);
                e.1 += 1;
            }
        }
        out
    }

    fn create(image: &mut MetadataImage, name: &str, assignments: Vec<Vec<BrokerId>>) {
        let cmd = MetadataCommand::CreateTopic {
            name: name.into(),
            id: TopicId(name.into()),
            configs: BTreeMap::new(),
            assignments,
        };
        image.apply(&cmd).unwrap();
    }

    #[test]
    fn leaders_and_replicas_spread_evenly() {
        let three = image(3);
        let placed = place(&three, 6, 3).unwrap();
        assert!(placed.iter().all(|r| r.len() == 3 && r.iter().collect::<std::collections::BTreeSet<_>>().len() == 3));
        for (b, (leaders, replicas)) in counts(&three, &placed) {
            assert_eq!((leaders, replicas), (2, 6), "broker {b}");
        }
        let four = image(4);
        let placed = place(&four, 8, 2).unwrap();
        for (b, (leaders, replicas)) in counts(&four, &placed) {
            assert_eq!((leaders, replicas), (2, 4), "broker {b}");
        }
    }

    #[test]
    fn existing_load_is_taken_into_account() {
        let mut image = image(3);
        // Broker 1 already leads three single-replica partitions.
        create(&mut image, "old", vec![vec![BrokerId(1)]; 3]);
        let placed = place(&image, 3, 1).unwrap();
        let leaders: Vec<_> = placed.iter().map(|r| r[0]).collect();
        assert!(!leaders.contains(&BrokerId(1)), "{leaders:?}");
        let placed = place(&image, 6, 1).unwrap();
        for (b, (leaders, _)) in counts(&image, &placed) {
            assert_eq!(leaders, 3, "broker {b} after both topics");
        }
    }

    #[test]
    fn fenced_brokers_get_nothing_and_the_replication_factor_is_checked() {
        let mut image = image(3);
        image.apply(&MetadataCommand::FenceBroker { id: BrokerId(2), incarnation: 1 }).unwrap();
        let placed = place(&image, 4, 2).unwrap();
        assert!(placed.iter().all(|r| !r.contains(&BrokerId(2))), "{placed:?}");
        assert_eq!(
            place(&image, 1, 3),
            Err(PlacementError::InvalidReplicationFactor { replication_factor: 3, live: 2 })
        );
        assert!(matches!(place(&image, 1, 0), Err(PlacementError::InvalidReplicationFactor { .. })));
        assert!(place(&MetadataImage::default(), 1, 1).is_err());
    }

    #[test]
    fn placement_is_deterministic() {
        let image = image(5);
        assert_eq!(place(&image, 17, 3).unwrap(), place(&image, 17, 3).unwrap());
    }
}
