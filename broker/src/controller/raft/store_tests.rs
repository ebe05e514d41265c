//! The metadata log's storage against openraft's own storage test suite,
//! and what the suite does not check: durability across reopen and power
//! loss (through the test file system, `storage/testfs.rs`), a torn
//! last record, and a purge that survives a restart.

use std::collections::BTreeMap;

use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{CommittedLeaderId, EntryPayload, RaftLogReader, RaftSnapshotBuilder, Vote};

use super::log_store::{LogOpenError, LogStore};
use super::state_machine::StateMachine;
use super::{Entry, LogId, StorageError, TypeConfig, VersionedCommand};
use crate::controller::metadata::{BrokerId, MetadataCommand, TopicId};
use crate::storage::testfs;

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError> {
        let dir = tempfile::tempdir().unwrap();
        let log = LogStore::open(dir.path()).map_err(StorageError::from)?;
        let sm = StateMachine::open(dir.path())?;
        Ok((dir, log, sm))
    }
}

#[test]
fn passes_openraft_storage_suite() {
    Suite::test_all(Builder).unwrap();
}

fn log_id(term: u64, index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

fn entry(term: u64, index: u64, command: MetadataCommand) -> Entry {
    Entry { log_id: log_id(term, index), payload: EntryPayload::Normal(VersionedCommand::current(command)) }
}

fn register(id: u32) -> MetadataCommand {
    MetadataCommand::RegisterBroker {
        id: BrokerId(id),
        address: format!("h:{id}"),
        incarnation: u64::from(id),
        previous_incarnation: None,
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// Appends `entries` and waits for the flush callback.
async fn append(log: &mut LogStore, entries: Vec<Entry>) {
    log.blocking_append(entries).await.unwrap();
}

async fn indexes(log: &mut LogStore) -> Vec<u64> {
    log.try_get_log_entries(0..).await.unwrap().iter().map(|e| e.log_id.index).collect()
}

#[test]
fn log_vote_and_committed_survive_reopen_and_a_torn_record_is_cut() {
    rt().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let mut log = LogStore::open(dir.path()).unwrap();
        append(&mut log, (1..=5).map(|i| entry(1, i, register(i as u32))).collect()).await;
        log.save_vote(&Vote::new(3, 2)).await.unwrap();
        log.save_committed(Some(log_id(1, 4))).await.unwrap();
        drop(log);
        // A crash mid-append leaves half a record at the end.
        let path = dir.path().join("raft-log");
        let mut data = std::fs::read(&path).unwrap();
        let whole = data.len();
        data.extend_from_slice(&[0, 0, 1, 0, 9, 9, 9, 9, b'{']);
        std::fs::write(&path, &data).unwrap();
        let mut log = LogStore::open(dir.path()).unwrap();
        assert_eq!(indexes(&mut log).await, vec![1, 2, 3, 4, 5]);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), whole as u64, "the torn record was cut");
        assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(3, 2)));
        assert_eq!(log.read_committed().await.unwrap(), Some(log_id(1, 4)));
        // Appends after the cut land where the valid records end.
        append(&mut log, vec![entry(2, 6, register(6))]).await;
        drop(log);
        let mut log = LogStore::open(dir.path()).unwrap();
        assert_eq!(indexes(&mut log).await, vec![1, 2, 3, 4, 5, 6]);
    });
}

#[test]
fn a_corrupt_record_ends_the_log_and_a_hole_is_an_error() {
    rt().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let mut log = LogStore::open(dir.path()).unwrap();
        append(&mut log, (1..=3).map(|i| entry(1, i, register(i as u32))).collect()).await;
        drop(log);
        let path = dir.path().join("raft-log");
        let mut data = std::fs::read(&path).unwrap();
        let last = data.len() - 3;
        data[last] ^= 0x20; // inside the last record's JSON
        std::fs::write(&path, &data).unwrap();
        let mut log = LogStore::open(dir.path()).unwrap();
        assert_eq!(indexes(&mut log).await, vec![1, 2], "a record whose CRC fails is not taken");
        drop(log);
        // A file whose indexes skip one is refused, not read around.
        let dir = tempfile::tempdir().unwrap();
        let mut log = LogStore::open(dir.path()).unwrap();
        append(&mut log, vec![entry(1, 1, register(1))]).await;
        append(&mut log, vec![entry(1, 3, register(3))]).await;
        drop(log);
        assert!(LogStore::open(dir.path()).is_err());
    });
}

/// Reopens the log in `dir` as after a power loss: only what was fsynced
/// (file contents and directory entries) survives.
fn reopen_after_power_loss(dir: &std::path::Path) -> LogStore {
    testfs::power_loss(dir);
    LogStore::open(dir).unwrap()
}

#[test]
fn truncate_and_purge_are_durable() {
    rt().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let mut log = LogStore::open(dir.path()).unwrap();
        testfs::watch(dir.path());
        append(&mut log, (1..=10).map(|i| entry(1, i, register(i as u32))).collect()).await;
        // The truncation alone, with nothing appended after it to sync the file.
        log.truncate(log_id(1, 8)).await.unwrap();
        drop(log);
        let mut log = reopen_after_power_loss(dir.path());
        assert_eq!(indexes(&mut log).await, (1..=7).collect::<Vec<_>>(), "the truncation survived a power loss");
        // A purge alone, then an append to the rewritten file.
        log.purge(log_id(1, 3)).await.unwrap();
        drop(log);
        let mut log = reopen_after_power_loss(dir.path());
        assert_eq!(indexes(&mut log).await, vec![4, 5, 6, 7], "the purge survived a power loss");
        append(&mut log, vec![entry(2, 8, register(80))]).await;
        drop(log);
        let mut log = reopen_after_power_loss(dir.path());
        testfs::forget(dir.path());
        assert_eq!(indexes(&mut log).await, vec![4, 5, 6, 7, 8]);
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(log_id(1, 3)), "the purge survived a power loss");
        assert_eq!(state.last_log_id, Some(log_id(2, 8)));
        let eighth = log.try_get_log_entries(8..9).await.unwrap();
        assert_eq!(
            eighth[0].payload,
            EntryPayload::Normal(VersionedCommand::current(register(80))),
            "the truncated entry was replaced"
        );
    });
}

#[test]
fn a_snapshot_restores_the_image_after_reopen() {
    rt().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = StateMachine::open(dir.path()).unwrap();
        let create = MetadataCommand::CreateTopic {
            name: "t".into(),
            id: TopicId("id".into()),
            configs: BTreeMap::new(),
            assignments: vec![vec![BrokerId(1)]],
        };
        let unfence = MetadataCommand::UnfenceBroker { id: BrokerId(1), incarnation: 1 };
        let outcomes = sm
            .apply(vec![
                entry(1, 1, register(1)),
                entry(1, 2, unfence),
                entry(1, 3, create.clone()),
                entry(1, 4, create),
            ])
            .await
            .unwrap();
        assert!(outcomes[..3].iter().all(|o| o.error.is_none()));
        assert!(outcomes[3].error.is_some(), "a refused command is reported, and changes nothing");
        let built = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
        assert_eq!(built.meta.last_log_id, Some(log_id(1, 4)));
        let image = sm.image();
        drop(sm);
        let mut sm = StateMachine::open(dir.path()).unwrap();
        assert_eq!(*sm.image(), *image);
        assert_eq!(sm.applied_state().await.unwrap().0, Some(log_id(1, 4)));
        // A damaged snapshot file is an error, never an empty image.
        let path = dir.path().join("raft-snapshot");
        let mut bytes = std::fs::read(&path).unwrap();
        let topic = b"\\\"t\\\"";
        let at = bytes.windows(topic.len()).position(|w| w == topic).expect("the topic name is in the file");
        bytes[at + 2] = b'u';
        std::fs::write(&path, bytes).unwrap();
        assert!(StateMachine::open(dir.path()).is_err());
    });
}

/// A state machine in a fresh directory with `entries` applied, and the
/// snapshot it builds.
async fn snapshot_of(entries: Vec<Entry>) -> (tempfile::TempDir, openraft::storage::Snapshot<TypeConfig>) {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = StateMachine::open(dir.path()).unwrap();
    sm.apply(entries).await.unwrap();
    let built = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    (dir, built)
}

#[test]
fn a_snapshot_build_racing_an_install_never_puts_the_older_snapshot_back() {
    let rt = rt();
    for round in 0..60 {
        rt.block_on(async {
            // What the leader sends: a snapshot at (2, 10).
            let (_leader_dir, newer) = snapshot_of(vec![entry(1, 1, register(1)), entry(2, 10, register(2))]).await;
            let dir = tempfile::tempdir().unwrap();
            let mut sm = StateMachine::open(dir.path()).unwrap();
            sm.apply(vec![entry(1, 1, register(1))]).await.unwrap();
            // A build of the local state at (1, 1) races the install.
            let mut builder = sm.get_snapshot_builder().await;
            let mut installer = sm.clone();
            let meta = newer.meta.clone();
            let build = tokio::spawn(async move { builder.build_snapshot().await.map(|s| s.meta) });
            let install = tokio::spawn(async move { installer.install_snapshot(&meta, newer.snapshot).await });
            let built = build.await.unwrap();
            let installed = install.await.unwrap();
            assert!(built.is_ok(), "round {round}: build failed: {built:?}");
            assert!(installed.is_ok(), "round {round}: install failed: {installed:?}");
            drop(sm);
            let mut sm = StateMachine::open(dir.path()).unwrap();
            assert_eq!(
                sm.applied_state().await.unwrap().0,
                Some(log_id(2, 10)),
                "round {round}: the installed (newer) snapshot is the one on disk"
            );
            let current = sm.get_current_snapshot().await.unwrap().unwrap();
            assert_eq!(current.meta.last_log_id, Some(log_id(2, 10)));
            let leftovers: Vec<_> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains("tmp"))
                .collect();
            assert!(leftovers.is_empty(), "round {round}: temp files left: {leftovers:?}");
        });
    }
}

#[test]
fn a_damaged_snapshot_meta_is_refused() {
    rt().block_on(async {
        let (dir, built) = snapshot_of(vec![entry(1, 1, register(1)), entry(1, 2, register(2))]).await;
        assert_eq!(built.meta.last_log_id, Some(log_id(1, 2)));
        let path = dir.path().join("raft-snapshot");
        let bytes = std::fs::read(&path).unwrap();
        // Change the snapshot id (inside the meta) to another of the same length.
        let id = built.meta.snapshot_id.as_bytes();
        let at = bytes.windows(id.len()).position(|w| w == id).expect("the snapshot id is in the file");
        let mut damaged = bytes.clone();
        damaged[at] = if damaged[at] == b'9' { b'8' } else { b'9' };
        std::fs::write(&path, &damaged).unwrap();
        let err = StateMachine::open(dir.path()).expect_err("a meta that does not match its CRC is refused");
        assert!(err.to_string().contains("CRC"), "{err}");
        std::fs::write(&path, &bytes).unwrap();
        assert!(StateMachine::open(dir.path()).is_ok());
    });
}

/// A record framed as the log store frames them: `[len][crc32c][json]`.
fn framed(json: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(json.len() as u32).to_be_bytes());
    out.extend_from_slice(&crc32c::crc32c(json).to_be_bytes());
    out.extend_from_slice(json);
    out
}

/// Writes a log of entries 1..=3 in `dir` and returns its records' bytes,
/// one `Vec` per record.
async fn three_records(dir: &std::path::Path) -> Vec<Vec<u8>> {
    let mut log = LogStore::open(dir).unwrap();
    append(&mut log, (1..=3).map(|i| entry(1, i, register(i as u32))).collect()).await;
    drop(log);
    let data = std::fs::read(dir.join("raft-log")).unwrap();
    let mut records = Vec::new();
    let mut pos = 0;
    while pos < data.len() {
        let len = u32::from_be_bytes(data[pos..pos + 4].try_into().unwrap()) as usize;
        records.push(data[pos..pos + 8 + len].to_vec());
        pos += 8 + len;
    }
    records
}

#[test]
fn a_crc_valid_record_that_does_not_decode_refuses_to_open_and_leaves_the_file_alone() {
    rt().block_on(async {
        for at_tail in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let records = three_records(dir.path()).await;
            let alien = framed(br#"{"log_id":{"leader_id":{"term":1,"node_id":1},"index":3},"payload":{"Normal":{"NoSuchCommand":{}}}}"#);
            let mut data = records[..2].concat();
            let position = data.len() as u64;
            data.extend_from_slice(&alien);
            if !at_tail {
                data.extend_from_slice(&records[2]);
            }
            let path = dir.path().join("raft-log");
            std::fs::write(&path, &data).unwrap();
            let err = LogStore::open(dir.path()).expect_err("an undecodable whole record is not a torn tail");
            let message = err.to_string();
            assert!(matches!(err, LogOpenError::Undecodable { position: p, .. } if p == position), "{message}");
            assert!(message.contains(&path.display().to_string()) && message.contains(&position.to_string()), "{message}");
            assert_eq!(std::fs::read(&path).unwrap(), data, "at_tail={at_tail}: the file was changed");
        }
    });
}

#[test]
fn a_record_of_a_newer_metadata_version_is_refused_not_misread() {
    rt().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let records = three_records(dir.path()).await;
        let mut newer = serde_json::to_value(entry(1, 3, register(3))).unwrap();
        newer["payload"]["Normal"]["version"] = serde_json::json!(super::METADATA_VERSION + 1);
        let mut data = records[..2].concat();
        data.extend_from_slice(&framed(&serde_json::to_vec(&newer).unwrap()));
        let path = dir.path().join("raft-log");
        std::fs::write(&path, &data).unwrap();
        let err = LogStore::open(dir.path()).expect_err("a newer metadata version is refused");
        assert!(
            matches!(err, LogOpenError::UnknownVersion { version, .. } if version == u64::from(super::METADATA_VERSION) + 1),
            "{err}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), data);
        // The same entry arriving from a leader is refused too.
        let request = serde_json::json!({
            "vote": {"leader_id": {"term": 1, "node_id": 1}, "committed": true},
            "prev_log_id": null,
            "entries": [newer],
            "leader_commit": null,
        });
        let decoded = serde_json::from_value::<openraft::raft::AppendEntriesRequest<TypeConfig>>(request.clone());
        let refusal = decoded.expect_err("an AppendEntries with a newer metadata version is refused");
        assert!(refusal.to_string().contains("metadata version"), "{refusal}");
        // And the current version decodes.
        let mut current = request;
        current["entries"][0]["payload"]["Normal"]["version"] = serde_json::json!(super::METADATA_VERSION);
        serde_json::from_value::<openraft::raft::AppendEntriesRequest<TypeConfig>>(current).unwrap();
    });
}

#[test]
fn a_command_written_before_versions_reads_as_version_one() {
    let bare = serde_json::to_value(register(7)).unwrap();
    let read: VersionedCommand = serde_json::from_value(bare).unwrap();
    assert_eq!(read, VersionedCommand { version: 1, command: register(7) });
}

#[test]
fn a_stored_snapshot_survives_a_power_loss() {
    rt().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = StateMachine::open(dir.path()).unwrap();
        testfs::watch(dir.path());
        sm.apply(vec![entry(1, 1, register(1)), entry(1, 2, register(2))]).await.unwrap();
        sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
        drop(sm);
        testfs::power_loss(dir.path());
        testfs::forget(dir.path());
        let mut sm = StateMachine::open(dir.path()).unwrap();
        assert_eq!(sm.applied_state().await.unwrap().0, Some(log_id(1, 2)), "the snapshot is on disk");
        assert_eq!(sm.image().brokers().len(), 2);
    });
}
