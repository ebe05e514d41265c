//! Tests of the metadata state machine: one per transition and per rule.

use super::*;

fn b(id: u32) -> BrokerId {
    BrokerId(id)
}

fn register(image: &mut MetadataImage, id: u32) {
    let cmd = MetadataCommand::RegisterBroker {
        id: b(id),
        address: format!("127.0.0.1:{}", 9000 + id),
        incarnation: incarnation(id),
        previous_incarnation: None,
    };
    image.apply(&cmd).unwrap();
    image.apply(&MetadataCommand::UnfenceBroker { id: b(id), incarnation: incarnation(id) }).unwrap();
}

fn incarnation(id: u32) -> u64 {
    0xabc0 + u64::from(id)
}

/// Three live brokers and topic `t` with the given assignments.
fn cluster(assignments: &[&[u32]]) -> MetadataImage {
    let mut image = MetadataImage::default();
    for id in 1..=3 {
        register(&mut image, id);
    }
    let assignments = assignments.iter().map(|r| r.iter().map(|&i| b(i)).collect()).collect();
    image.apply(&create("t", "id-t", assignments)).unwrap();
    image
}

fn create(name: &str, id: &str, assignments: Vec<Vec<BrokerId>>) -> MetadataCommand {
    MetadataCommand::CreateTopic {
        name: name.to_string(),
        id: TopicId(id.to_string()),
        configs: BTreeMap::from([("retention_ms".to_string(), "1000".to_string())]),
        assignments,
    }
}

fn fence(id: u32) -> MetadataCommand {
    MetadataCommand::FenceBroker { id: b(id), incarnation: incarnation(id) }
}

fn unfence(id: u32) -> MetadataCommand {
    MetadataCommand::UnfenceBroker { id: b(id), incarnation: incarnation(id) }
}

fn ids(v: &[u32]) -> Vec<BrokerId> {
    v.iter().map(|&i| b(i)).collect()
}

/// Applies `cmd` and checks that a refusal left the image as it was.
fn refused(image: &mut MetadataImage, cmd: &MetadataCommand) -> MetadataError {
    let before = image.clone();
    let err = image.apply(cmd).unwrap_err();
    assert_eq!(*image, before, "a refused {cmd:?} changed the image");
    err
}

#[test]
fn registration_starts_fenced_and_a_retry_of_the_same_incarnation_changes_nothing() {
    let mut image = MetadataImage::default();
    let cmd =
        MetadataCommand::RegisterBroker { id: b(1), address: "h:1".into(), incarnation: 7, previous_incarnation: None };
    assert_eq!(image.apply(&cmd).unwrap(), vec![MetadataEffect::BrokerRegistered { id: b(1), incarnation: 7 }]);
    let reg = image.broker(b(1)).unwrap();
    assert!(reg.fenced, "a new broker leads nothing until it has caught up");
    assert_eq!((reg.address.as_str(), reg.incarnation), ("h:1", 7));
    let before = image.clone();
    assert_eq!(image.apply(&cmd).unwrap(), vec![]);
    assert_eq!(image, before);
}

#[test]
fn a_second_live_process_with_the_same_id_is_refused() {
    let mut image = MetadataImage::default();
    register(&mut image, 1);
    let other = MetadataCommand::RegisterBroker {
        id: b(1),
        address: "h:2".into(),
        incarnation: 99,
        previous_incarnation: None,
    };
    assert_eq!(refused(&mut image, &other), MetadataError::BrokerIdInUse { id: b(1), incarnation: incarnation(1) });
    // Once the old process is fenced (its lease lapsed), the new one may register.
    image.apply(&fence(1)).unwrap();
    image.apply(&other).unwrap();
    assert_eq!(image.broker(b(1)).unwrap().incarnation, 99);
    assert_eq!(image.broker(b(1)).unwrap().address, "h:2");
}

#[test]
fn the_successor_of_an_exited_process_replaces_its_registration_at_once() {
    let mut image = cluster(&[&[1]]);
    let wrong = MetadataCommand::RegisterBroker {
        id: b(1),
        address: "h:9".into(),
        incarnation: 42,
        previous_incarnation: Some(12345),
    };
    assert!(matches!(refused(&mut image, &wrong), MetadataError::BrokerIdInUse { .. }), "must name the live one");
    let successor = MetadataCommand::RegisterBroker {
        id: b(1),
        address: "h:9".into(),
        incarnation: 42,
        previous_incarnation: Some(incarnation(1)),
    };
    let effects = image.apply(&successor).unwrap();
    assert!(effects.contains(&MetadataEffect::BrokerFenced(b(1))), "the old incarnation is fenced first: {effects:?}");
    assert_eq!(effects.last(), Some(&MetadataEffect::BrokerRegistered { id: b(1), incarnation: 42 }));
    let reg = image.broker(b(1)).unwrap();
    assert_eq!((reg.incarnation, reg.fenced, reg.address.as_str()), (42, true, "h:9"));
    assert_eq!(image.partition("t", 0).unwrap().leader, None, "its partition waits for the new incarnation");
}

#[test]
fn fence_and_unfence_name_the_current_incarnation() {
    let mut image = MetadataImage::default();
    register(&mut image, 1);
    let stale = MetadataCommand::FenceBroker { id: b(1), incarnation: 5 };
    assert!(
        matches!(refused(&mut image, &stale), MetadataError::StaleIncarnation { current, got: 5, .. } if current == incarnation(1))
    );
    assert_eq!(
        refused(&mut image, &MetadataCommand::FenceBroker { id: b(9), incarnation: 1 }),
        MetadataError::UnknownBroker(b(9))
    );
    assert_eq!(image.apply(&fence(1)).unwrap(), vec![MetadataEffect::BrokerFenced(b(1))]);
    assert_eq!(image.apply(&fence(1)).unwrap(), vec![], "fencing twice is a no-op");
    assert_eq!(image.apply(&unfence(1)).unwrap(), vec![MetadataEffect::BrokerUnfenced(b(1))]);
    assert_eq!(image.apply(&unfence(1)).unwrap(), vec![]);
    assert_eq!(image.live_brokers().collect::<Vec<_>>(), vec![b(1)]);
}

#[test]
fn a_created_topic_has_its_first_replica_as_leader_and_every_replica_in_sync() {
    let image = cluster(&[&[1, 2, 3], &[2, 3, 1]]);
    let t = image.topic("t").unwrap();
    assert_eq!(t.id, TopicId("id-t".into()));
    assert_eq!(t.configs["retention_ms"], "1000");
    assert_eq!(t.partitions.len(), 2);
    let p1 = image.partition("t", 1).unwrap();
    assert_eq!(p1.replicas, ids(&[2, 3, 1]));
    assert_eq!(p1.isr, ids(&[2, 3, 1]));
    assert_eq!(p1.leader, Some(b(2)));
    assert_eq!((p1.leader_epoch, p1.partition_epoch), (LeaderEpoch(0), PartitionEpoch(0)));
}

#[test]
fn a_fenced_replica_of_a_new_topic_is_left_out_of_its_isr() {
    let mut image = cluster(&[&[1]]);
    image.apply(&fence(1)).unwrap();
    image.apply(&create("u", "id-u", vec![ids(&[1, 2])])).unwrap();
    let p = image.partition("u", 0).unwrap();
    assert_eq!((p.leader, p.isr.clone()), (Some(b(2)), ids(&[2])));
    let none_live = create("v", "id-v", vec![ids(&[1])]);
    assert!(matches!(refused(&mut image, &none_live), MetadataError::InvalidAssignment(_)));
}

#[test]
fn topic_creation_refuses_bad_names_duplicates_and_bad_assignments() {
    let mut image = cluster(&[&[1]]);
    assert!(matches!(
        refused(&mut image, &create("bad name", "x", vec![ids(&[1])])),
        MetadataError::InvalidTopicName(_)
    ));
    assert_eq!(refused(&mut image, &create("t", "other", vec![ids(&[1])])), MetadataError::TopicExists("t".into()));
    assert!(
        matches!(refused(&mut image, &create("u", "id-t", vec![ids(&[1])])), MetadataError::TopicExists(_)),
        "ids are unique too"
    );
    for assignments in [vec![], vec![ids(&[])], vec![ids(&[1, 1])], vec![ids(&[1, 2]), ids(&[1])], vec![ids(&[4])]] {
        let cmd = create("u", "id-u", assignments.clone());
        assert!(matches!(refused(&mut image, &cmd), MetadataError::InvalidAssignment(_)), "{assignments:?}");
    }
}

#[test]
fn deleting_a_topic_reports_its_id_and_a_recreated_topic_gets_a_new_one() {
    let mut image = cluster(&[&[1]]);
    let effects = image.apply(&MetadataCommand::DeleteTopic { name: "t".into(), id: None }).unwrap();
    assert_eq!(effects, vec![MetadataEffect::TopicDeleted { name: "t".into(), id: TopicId("id-t".into()) }]);
    assert!(image.topic("t").is_none());
    assert_eq!(
        refused(&mut image, &MetadataCommand::DeleteTopic { name: "t".into(), id: None }),
        MetadataError::UnknownTopic("t".into())
    );
    image.apply(&create("t", "id-t2", vec![ids(&[2])])).unwrap();
    assert_eq!(image.topic("t").unwrap().id, TopicId("id-t2".into()));
}

#[test]
fn partitions_are_added_with_the_topics_replication_factor() {
    let mut image = cluster(&[&[1, 2], &[2, 3]]);
    let add =
        MetadataCommand::CreatePartitions { name: "t".into(), assignments: vec![ids(&[3, 1])], expected_count: None };
    assert_eq!(
        image.apply(&add).unwrap(),
        vec![MetadataEffect::PartitionsCreated { name: "t".into(), from: 2, to: 3 }]
    );
    assert_eq!(image.partition("t", 2).unwrap().leader, Some(b(3)));
    let wrong_rf =
        MetadataCommand::CreatePartitions { name: "t".into(), assignments: vec![ids(&[1])], expected_count: None };
    assert!(matches!(refused(&mut image, &wrong_rf), MetadataError::InvalidAssignment(_)));
    let unknown = MetadataCommand::CreatePartitions {
        name: "nope".into(),
        assignments: vec![ids(&[1, 2])],
        expected_count: None,
    };
    assert_eq!(refused(&mut image, &unknown), MetadataError::UnknownTopic("nope".into()));
}

#[test]
fn fencing_a_leader_elects_the_next_in_sync_live_replica_and_bumps_both_epochs() {
    let mut image = cluster(&[&[1, 2, 3], &[2, 1, 3]]);
    let effects = image.apply(&fence(1)).unwrap();
    let p0 = image.partition("t", 0).unwrap().clone();
    assert_eq!(p0.leader, Some(b(2)));
    assert_eq!(p0.isr, ids(&[2, 3]));
    assert_eq!((p0.leader_epoch, p0.partition_epoch), (LeaderEpoch(1), PartitionEpoch(1)));
    // Partition 1 keeps its leader; 1 only leaves its ISR.
    let p1 = image.partition("t", 1).unwrap().clone();
    assert_eq!((p1.leader, p1.isr.clone()), (Some(b(2)), ids(&[2, 3])));
    assert_eq!((p1.leader_epoch, p1.partition_epoch), (LeaderEpoch(0), PartitionEpoch(1)));
    assert_eq!(
        effects,
        vec![
            MetadataEffect::BrokerFenced(b(1)),
            MetadataEffect::PartitionChanged { topic: "t".into(), partition: 0, state: p0 },
            MetadataEffect::PartitionChanged { topic: "t".into(), partition: 1, state: p1 },
        ]
    );
}

#[test]
fn a_partition_whose_last_in_sync_replica_is_fenced_goes_offline_and_keeps_it() {
    let mut image = cluster(&[&[1]]);
    image.apply(&fence(1)).unwrap();
    let p = image.partition("t", 0).unwrap();
    assert_eq!(p.leader, None, "offline, not moved to a replica without the data");
    assert_eq!(p.isr, ids(&[1]), "the last in-sync replica stays in the ISR");
    assert_eq!(p.leader_epoch, LeaderEpoch(1));
    // When it comes back it leads again, in a new epoch.
    let effects = image.apply(&unfence(1)).unwrap();
    let p = image.partition("t", 0).unwrap();
    assert_eq!((p.leader, p.leader_epoch, p.partition_epoch), (Some(b(1)), LeaderEpoch(2), PartitionEpoch(2)));
    assert_eq!(effects.len(), 2);
}

#[test]
fn an_in_sync_replica_that_is_fenced_is_never_elected() {
    let mut image = cluster(&[&[1, 2, 3]]);
    image.apply(&fence(2)).unwrap(); // ISR [1, 3]
    image.apply(&fence(3)).unwrap(); // ISR [1]
    image.apply(&unfence(2)).unwrap(); // 2 is live again but out of sync
    image.apply(&fence(1)).unwrap();
    let p = image.partition("t", 0).unwrap();
    assert_eq!(p.leader, None, "2 is live but not in sync: no unclean election");
    assert_eq!(p.isr, ids(&[1]));
}

#[test]
fn alter_partition_is_a_compare_and_set_on_both_epochs() {
    let mut image = cluster(&[&[1, 2, 3]]);
    let alter = |le: u32, pe: u32, isr: &[u32]| MetadataCommand::AlterPartition {
        topic: "t".into(),
        partition: 0,
        leader_epoch: LeaderEpoch(le),
        partition_epoch: PartitionEpoch(pe),
        isr: ids(isr),
    };
    // The leader shrinks the ISR.
    let effects = image.apply(&alter(0, 0, &[1, 2])).unwrap();
    let p = image.partition("t", 0).unwrap().clone();
    assert_eq!((p.isr.clone(), p.partition_epoch, p.leader_epoch), (ids(&[1, 2]), PartitionEpoch(1), LeaderEpoch(0)));
    assert_eq!(effects, vec![MetadataEffect::PartitionChanged { topic: "t".into(), partition: 0, state: p }]);
    // A change based on the old partition epoch is refused.
    assert!(matches!(
        refused(&mut image, &alter(0, 0, &[1])),
        MetadataError::StalePartitionEpoch { current: PartitionEpoch(1), got: PartitionEpoch(0), .. }
    ));
    // So is one from a leader of another epoch.
    assert!(matches!(
        refused(&mut image, &alter(3, 1, &[1])),
        MetadataError::FencedLeaderEpoch { current: LeaderEpoch(0), got: LeaderEpoch(3), .. }
    ));
    // A deposed leader cannot act after an election either.
    image.apply(&fence(1)).unwrap(); // leader 2, epochs (1, 2)
    assert!(matches!(refused(&mut image, &alter(0, 1, &[1, 2])), MetadataError::FencedLeaderEpoch { .. }));
    image.apply(&alter(1, 2, &[2])).unwrap();
    assert_eq!(image.partition("t", 0).unwrap().isr, ids(&[2]));
}

#[test]
fn alter_partition_refuses_an_isr_that_breaks_the_rules() {
    let mut image = cluster(&[&[1, 2, 3]]);
    image.apply(&fence(3)).unwrap(); // ISR [1, 2], partition epoch 1
    let alter = |isr: &[u32]| MetadataCommand::AlterPartition {
        topic: "t".into(),
        partition: 0,
        leader_epoch: LeaderEpoch(0),
        partition_epoch: PartitionEpoch(1),
        isr: ids(isr),
    };
    for bad in [&[2][..], &[1, 1], &[1, 4], &[1, 2, 3]] {
        assert!(matches!(refused(&mut image, &alter(bad)), MetadataError::InvalidIsr { .. }), "{bad:?}");
    }
    let unknown = MetadataCommand::AlterPartition {
        topic: "t".into(),
        partition: 5,
        leader_epoch: LeaderEpoch(0),
        partition_epoch: PartitionEpoch(1),
        isr: ids(&[1]),
    };
    assert!(matches!(refused(&mut image, &unknown), MetadataError::UnknownPartition { partition: 5, .. }));
    // Once 3 is unfenced it may rejoin.
    image.apply(&unfence(3)).unwrap();
    image.apply(&alter(&[1, 2, 3])).unwrap();
}

#[test]
fn producer_id_blocks_never_overlap() {
    let mut image = cluster(&[&[1]]);
    let take = |broker: u32, count: u64| MetadataCommand::AllocateProducerIds { broker: b(broker), count };
    assert_eq!(
        image.apply(&take(1, 1000)).unwrap(),
        vec![MetadataEffect::ProducerIdsAllocated { broker: b(1), first: 0, count: 1000 }]
    );
    assert_eq!(
        image.apply(&take(2, 10)).unwrap(),
        vec![MetadataEffect::ProducerIdsAllocated { broker: b(2), first: 1000, count: 10 }]
    );
    assert_eq!(image.next_producer_id(), 1010);
    assert!(matches!(refused(&mut image, &take(1, 0)), MetadataError::InvalidProducerIdRequest(_)));
    assert!(matches!(
        refused(&mut image, &take(1, MAX_PRODUCER_ID_BLOCK + 1)),
        MetadataError::InvalidProducerIdRequest(_)
    ));
    assert_eq!(refused(&mut image, &take(9, 1)), MetadataError::UnknownBroker(b(9)));
}

#[test]
fn the_image_round_trips_through_a_snapshot_and_replays_identically() {
    let commands = vec![
        MetadataCommand::RegisterBroker { id: b(1), address: "a:1".into(), incarnation: 1, previous_incarnation: None },
        MetadataCommand::UnfenceBroker { id: b(1), incarnation: 1 },
        MetadataCommand::RegisterBroker { id: b(2), address: "a:2".into(), incarnation: 2, previous_incarnation: None },
        MetadataCommand::UnfenceBroker { id: b(2), incarnation: 2 },
        create("t", "id-t", vec![ids(&[1, 2]), ids(&[2, 1])]),
        MetadataCommand::FenceBroker { id: b(2), incarnation: 2 },
        MetadataCommand::AllocateProducerIds { broker: b(1), count: 5 },
    ];
    let mut a = MetadataImage::default();
    let mut b_image = MetadataImage::default();
    for cmd in &commands {
        let json = serde_json::to_vec(cmd).unwrap();
        let decoded: MetadataCommand = serde_json::from_slice(&json).unwrap();
        assert_eq!(a.apply(cmd).unwrap(), b_image.apply(&decoded).unwrap(), "same effects on every replica");
    }
    assert_eq!(a, b_image);
    let snapshot = serde_json::to_vec(&a).unwrap();
    let restored: MetadataImage = serde_json::from_slice(&snapshot).unwrap();
    assert_eq!(restored, a);
}

#[test]
fn topic_configs_are_replaced_whole() {
    let mut image = cluster(&[&[1]]);
    let alter = MetadataCommand::AlterTopicConfigs {
        name: "t".into(),
        configs: BTreeMap::from([("flush".to_string(), "always".to_string())]),
        expected_version: None,
    };
    assert_eq!(image.apply(&alter).unwrap(), vec![MetadataEffect::TopicConfigsChanged { name: "t".into() }]);
    let configs = &image.topic("t").unwrap().configs;
    assert_eq!(configs.len(), 1, "retention_ms is gone: the overrides are replaced, not merged");
    assert_eq!(configs["flush"], "always");
    let unknown =
        MetadataCommand::AlterTopicConfigs { name: "u".into(), configs: BTreeMap::new(), expected_version: None };
    assert_eq!(refused(&mut image, &unknown), MetadataError::UnknownTopic("u".into()));
}

/// Three live brokers and topic `t` on [1, 2, 3] with `configs`.
fn cluster_with(configs: &[(&str, &str)]) -> MetadataImage {
    let mut image = MetadataImage::default();
    for id in 1..=3 {
        register(&mut image, id);
    }
    let cmd = MetadataCommand::CreateTopic {
        name: "t".into(),
        id: TopicId("id-t".into()),
        configs: configs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        assignments: vec![ids(&[1, 2, 3])],
    };
    image.apply(&cmd).unwrap();
    image
}

#[test]
fn replicas_that_leave_a_too_small_isr_become_eligible_and_lead_when_the_last_member_is_fenced() {
    let mut image = cluster_with(&[("min_insync_replicas", "2")]);
    image.apply(&fence(3)).unwrap();
    let p = image.partition("t", 0).unwrap();
    assert_eq!((p.isr.clone(), p.elr.clone()), (ids(&[1, 2]), vec![]), "the ISR still holds two");
    image.apply(&fence(2)).unwrap();
    let p = image.partition("t", 0).unwrap();
    assert_eq!((p.isr.clone(), p.elr.clone()), (ids(&[1]), ids(&[2])));
    image.apply(&unfence(2)).unwrap();
    assert_eq!(image.partition("t", 0).unwrap().leader, Some(b(1)), "broker 1 still leads");
    image.apply(&fence(1)).unwrap();
    let p = image.partition("t", 0).unwrap();
    assert_eq!(p.leader, Some(b(2)), "the eligible replica leads");
    assert_eq!((p.isr.clone(), p.elr.clone()), (ids(&[2]), ids(&[1])));
    assert_eq!(p.leader_epoch, LeaderEpoch(1));
}

#[test]
fn a_broker_that_lost_unsynced_writes_is_never_elected_in_place_of_an_eligible_replica() {
    let mut image = cluster_with(&[("min_insync_replicas", "2")]);
    image.apply(&fence(3)).unwrap();
    image.apply(&fence(2)).unwrap(); // ISR [1], ELR [2]
    image.apply(&fence(1)).unwrap(); // all down: offline
    let p = image.partition("t", 0).unwrap();
    assert_eq!((p.leader, p.isr.clone(), p.elr.clone()), (None, ids(&[1]), ids(&[2])));
    // Broker 1 comes back after its machine restarted: it may have lost
    // acknowledged records it had not synced.
    let again = MetadataCommand::RegisterBroker {
        id: b(1),
        address: "127.0.0.1:9001".into(),
        incarnation: 77,
        previous_incarnation: Some(incarnation(1)),
    };
    image.apply(&again).unwrap();
    let lost = MetadataCommand::ReplicaLostWrites { id: b(1), incarnation: 77 };
    let stale = MetadataCommand::ReplicaLostWrites { id: b(1), incarnation: incarnation(1) };
    assert!(matches!(refused(&mut image, &stale), MetadataError::StaleIncarnation { .. }));
    let effects = image.apply(&lost).unwrap();
    assert_eq!(effects.len(), 1, "{effects:?}");
    let p = image.partition("t", 0).unwrap();
    assert_eq!((p.isr.clone(), p.elr.clone()), (vec![], ids(&[2])));
    image.apply(&MetadataCommand::UnfenceBroker { id: b(1), incarnation: 77 }).unwrap();
    assert_eq!(image.partition("t", 0).unwrap().leader, None, "broker 1 alone may not lead");
    image.apply(&unfence(2)).unwrap();
    let p = image.partition("t", 0).unwrap();
    assert_eq!((p.leader, p.isr.clone()), (Some(b(2)), ids(&[2])), "the eligible replica leads");
}

#[test]
fn unclean_leader_election_is_off_by_default_and_elects_any_live_replica_when_on() {
    for (configs, leader) in [(vec![], None), (vec![("unclean_leader_election", "true")], Some(b(2)))] {
        let mut image = cluster_with(&configs);
        image.apply(&fence(2)).unwrap();
        image.apply(&fence(3)).unwrap(); // ISR [1]; min_insync_replicas 1: no ELR
        image.apply(&unfence(2)).unwrap();
        image.apply(&fence(1)).unwrap();
        let p = image.partition("t", 0).unwrap();
        assert_eq!(p.leader, leader, "{configs:?}");
        if leader.is_some() {
            assert_eq!(p.isr, ids(&[2]), "an unclean leader starts a new ISR of its own");
        }
    }
}

#[test]
fn an_alter_partition_that_shrinks_below_min_insync_replicas_fills_the_elr() {
    let mut image = cluster_with(&[("min_insync_replicas", "2")]);
    let alter = |isr: &[u32], epoch: u32| MetadataCommand::AlterPartition {
        topic: "t".into(),
        partition: 0,
        leader_epoch: LeaderEpoch(0),
        partition_epoch: PartitionEpoch(epoch),
        isr: ids(isr),
    };
    image.apply(&alter(&[1], 0)).unwrap();
    assert_eq!(image.partition("t", 0).unwrap().elr, ids(&[2, 3]));
    image.apply(&alter(&[1, 3], 1)).unwrap();
    assert_eq!(image.partition("t", 0).unwrap().elr, vec![], "two in sync again");
}

#[test]
fn preferred_leaders_return_only_when_live_and_in_sync() {
    let mut image = cluster(&[&[1, 2, 3], &[2, 3, 1]]);
    image.apply(&fence(1)).unwrap(); // partition 0 moves to 2
    assert_eq!(image.preferred_imbalance(), 0, "broker 1 is fenced");
    image.apply(&unfence(1)).unwrap();
    assert_eq!(image.preferred_imbalance(), 0, "broker 1 is not in sync yet");
    let p0 = image.partition("t", 0).unwrap().clone();
    let rejoin = MetadataCommand::AlterPartition {
        topic: "t".into(),
        partition: 0,
        leader_epoch: p0.leader_epoch,
        partition_epoch: p0.partition_epoch,
        isr: ids(&[2, 3, 1]),
    };
    image.apply(&rejoin).unwrap();
    assert_eq!(image.preferred_imbalance(), 1);
    let effects = image.apply(&MetadataCommand::ElectPreferredLeaders).unwrap();
    assert_eq!(effects.len(), 1, "partition 1 already has its preferred leader");
    let p0 = image.partition("t", 0).unwrap();
    assert_eq!((p0.leader, p0.leader_epoch), (Some(b(1)), LeaderEpoch(2)));
    assert_eq!(image.preferred_imbalance(), 0);
    assert!(image.apply(&MetadataCommand::ElectPreferredLeaders).unwrap().is_empty());
}

#[test]
fn changing_min_insync_replicas_clears_the_eligible_leader_replicas() {
    // RF 2, min ISR 2; the follower is cut off: ISR {1}, ELR {2}, HW held.
    let mut image = MetadataImage::default();
    register(&mut image, 1);
    register(&mut image, 2);
    let cmd = MetadataCommand::CreateTopic {
        name: "t".into(),
        id: TopicId("id-t".into()),
        configs: BTreeMap::from([("min_insync_replicas".to_string(), "2".to_string())]),
        assignments: vec![ids(&[1, 2])],
    };
    image.apply(&cmd).unwrap();
    let shrink = MetadataCommand::AlterPartition {
        topic: "t".into(),
        partition: 0,
        leader_epoch: LeaderEpoch(0),
        partition_epoch: PartitionEpoch(0),
        isr: ids(&[1]),
    };
    image.apply(&shrink).unwrap();
    assert_eq!(image.partition("t", 0).unwrap().elr, ids(&[2]));
    // The operator lowers min ISR to 1: broker 1 alone now moves the HW and
    // acknowledges acks=all, so broker 2 no longer holds everything below it.
    let lower = MetadataCommand::AlterTopicConfigs {
        name: "t".into(),
        configs: BTreeMap::from([("min_insync_replicas".to_string(), "1".to_string())]),
        expected_version: None,
    };
    let effects = image.apply(&lower).unwrap();
    let p = image.partition("t", 0).unwrap().clone();
    assert_eq!(p.elr, vec![], "the ELR is cleared");
    assert_eq!(p.partition_epoch, PartitionEpoch(2), "leaders see the change");
    assert!(effects.contains(&MetadataEffect::PartitionChanged { topic: "t".into(), partition: 0, state: p }));
    image.apply(&fence(1)).unwrap();
    let p = image.partition("t", 0).unwrap();
    assert_eq!(p.leader, None, "broker 2 is not elected: the partition waits for broker 1");
    // A config change that keeps min ISR leaves the ELR alone.
    let mut image = cluster_with(&[("min_insync_replicas", "2")]);
    image.apply(&fence(3)).unwrap();
    image.apply(&fence(2)).unwrap();
    assert_eq!(image.partition("t", 0).unwrap().elr, ids(&[2]));
    let same = MetadataCommand::AlterTopicConfigs {
        name: "t".into(),
        configs: BTreeMap::from([
            ("min_insync_replicas".to_string(), "2".to_string()),
            ("flush".to_string(), "always".to_string()),
        ]),
        expected_version: None,
    };
    image.apply(&same).unwrap();
    assert_eq!(image.partition("t", 0).unwrap().elr, ids(&[2]));
}

#[test]
fn admin_changes_are_compare_and_sets_so_a_retry_or_a_stale_proposer_applies_nothing_twice() {
    let mut image = cluster(&[&[1, 2, 3]]);
    // Growing 1 -> 2; the same command again (a retry after a lost answer,
    // or a second admin working from the same image) is refused.
    let grow = MetadataCommand::CreatePartitions {
        name: "t".into(),
        assignments: vec![ids(&[2, 3, 1])],
        expected_count: Some(1),
    };
    image.apply(&grow).unwrap();
    assert_eq!(
        refused(&mut image, &grow),
        MetadataError::PartitionCountChanged { name: "t".into(), current: 2, expected: 1 }
    );
    assert_eq!(image.topic("t").unwrap().partitions.len(), 2, "grown once");
    // Configs: a change computed from version 0 after another landed is
    // refused instead of replacing it.
    let alter = |key: &str, version: u64| MetadataCommand::AlterTopicConfigs {
        name: "t".into(),
        configs: BTreeMap::from([(key.to_string(), "1".to_string())]),
        expected_version: Some(version),
    };
    image.apply(&alter("retention_ms", 0)).unwrap();
    assert_eq!(
        refused(&mut image, &alter("segment_ms", 0)),
        MetadataError::ConfigVersionChanged { name: "t".into(), current: 1, expected: 0 }
    );
    assert!(image.topic("t").unwrap().configs.contains_key("retention_ms"), "the first change stays");
    image.apply(&alter("segment_ms", 1)).unwrap();
    assert_eq!(image.topic("t").unwrap().config_version, 2);
    // Delete by id: a topic created again under the name is not deleted.
    let stale_delete = MetadataCommand::DeleteTopic { name: "t".into(), id: Some(TopicId("id-t".into())) };
    image.apply(&stale_delete).unwrap();
    image.apply(&create("t", "id-t2", vec![ids(&[1, 2, 3])])).unwrap();
    assert_eq!(
        refused(&mut image, &stale_delete),
        MetadataError::TopicIdMismatch {
            name: "t".into(),
            current: TopicId("id-t2".into()),
            got: TopicId("id-t".into())
        }
    );
    assert_eq!(image.topic("t").unwrap().id, TopicId("id-t2".into()), "the new topic survives");
}
