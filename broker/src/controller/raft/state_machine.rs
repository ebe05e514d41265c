//! The metadata log's state machine for openraft: committed entries applied
//! to a [`MetadataImage`] in log order, and snapshots of the whole image.
//!
//! The image lives in memory; what survives a restart is the latest
//! snapshot (file `raft-snapshot`, replaced atomically) plus the log after
//! it, which openraft applies again up to the committed id the log store
//! kept. A snapshot file is `[crc32c u32][JSON of version, meta, image]`,
//! the CRC over the whole record; one that does not read back is an error,
//! never an empty image.
//!
//! Snapshots are stored both by the build task and by an install from the
//! leader, which can race: each writes its own temp file (fsynced), then
//! under the `snapshot` lock the one whose `last_log_id` is not older than
//! the current snapshot's is renamed into place (then the directory is
//! fsynced, outside the lock); an older one is dropped. So a build captured
//! before an install can never put the older image back after the log was
//! purged past it.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    AnyError, BasicNode, EntryPayload, ErrorSubject, ErrorVerb, RaftSnapshotBuilder, SnapshotMeta, StorageIOError,
    StoredMembership,
};
use serde::{Deserialize, Serialize};

use super::{ApplyOutcome, Entry, LogId, StorageError, TypeConfig};
use crate::controller::metadata::MetadataImage;
use crate::storage::fs::{remove_if_exists, sync_dir, write_new_synced};

const SNAPSHOT: &str = "raft-snapshot";
/// Prefix of a snapshot's temp files (one per store, never shared).
const SNAPSHOT_TMP: &str = "raft-snapshot.tmp-";
/// Version of the snapshot record; a file of another version is refused.
const SNAPSHOT_VERSION: u32 = 1;
/// Temp files made by this process, for unique names.
static TMP_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

type Meta = SnapshotMeta<u64, BasicNode>;
type Membership = StoredMembership<u64, BasicNode>;

/// The applied state of the metadata log.
#[derive(Debug, Clone)]
pub struct StateMachine {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    dir: PathBuf,
    state: Mutex<Applied>,
    /// The latest snapshot: its meta and encoded image. Held while a new
    /// snapshot file is renamed into place, so the file and this agree and
    /// a snapshot never replaces one with a newer `last_log_id`.
    snapshot: Mutex<Option<(Meta, Vec<u8>)>>,
    /// Snapshots built so far by this process, for unique ids.
    built: std::sync::atomic::AtomicU64,
    /// The image and the log index it is at, after every apply.
    published: tokio::sync::watch::Sender<AppliedImage>,
}

/// The metadata image as of one index of the metadata log.
#[derive(Debug, Clone, Default)]
pub struct AppliedImage {
    /// Index of the last entry applied (0 before any).
    pub index: u64,
    /// The image.
    pub image: Arc<MetadataImage>,
}

#[derive(Debug, Clone, Default)]
struct Applied {
    image: Arc<MetadataImage>,
    last_applied: Option<LogId>,
    membership: Membership,
}

/// The JSON part of a snapshot file: the version, meta and encoded image.
#[derive(Serialize, Deserialize)]
struct SnapshotRecord {
    version: u32,
    meta: Meta,
    image: String,
}

/// A snapshot file as written before the record had a version and a CRC
/// over its meta (the CRC covered the image only); still read.
#[derive(Deserialize)]
struct LegacySnapshotFile {
    meta: Meta,
    crc: u32,
    image: String,
}

fn encode_snapshot(meta: &Meta, image_bytes: &[u8]) -> Result<Vec<u8>, StorageError> {
    let image = String::from_utf8(image_bytes.to_vec()).map_err(|e| sm_error(ErrorVerb::Write, e))?;
    let record = SnapshotRecord { version: SNAPSHOT_VERSION, meta: meta.clone(), image };
    let json = serde_json::to_vec(&record).map_err(|e| sm_error(ErrorVerb::Write, e))?;
    let mut out = Vec::with_capacity(4 + json.len());
    out.extend_from_slice(&crc32c::crc32c(&json).to_be_bytes());
    out.extend_from_slice(&json);
    Ok(out)
}

/// Reads a snapshot file: its meta and encoded image.
fn decode_snapshot(path: &Path, bytes: &[u8]) -> Result<(Meta, Vec<u8>), StorageError> {
    let bad = |what: String| sm_error(ErrorVerb::Read, format!("{}: {what}", path.display()));
    if bytes.first() == Some(&b'{') {
        let file: LegacySnapshotFile = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        let image = file.image.into_bytes();
        if crc32c::crc32c(&image) != file.crc {
            return Err(bad("CRC mismatch".into()));
        }
        return Ok((file.meta, image));
    }
    if bytes.len() < 4 {
        return Err(bad(format!("{} bytes, too short for a snapshot", bytes.len())));
    }
    let (crc, json) = bytes.split_at(4);
    if crc32c::crc32c(json) != u32::from_be_bytes(crc.try_into().expect("4 bytes")) {
        return Err(bad("CRC mismatch".into()));
    }
    let record: SnapshotRecord = serde_json::from_slice(json).map_err(|e| bad(e.to_string()))?;
    if record.version != SNAPSHOT_VERSION {
        return Err(bad(format!(
            "snapshot version {} is not known to this build (it knows {SNAPSHOT_VERSION}); run a build that knows it",
            record.version
        )));
    }
    Ok((record.meta, record.image.into_bytes()))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn sm_error(verb: ErrorVerb, what: impl ToString) -> StorageError {
    let e = std::io::Error::other(what.to_string());
    StorageError::IO { source: StorageIOError::new(ErrorSubject::StateMachine, verb, AnyError::new(&e)) }
}

fn decode_image(bytes: &[u8]) -> Result<MetadataImage, StorageError> {
    serde_json::from_slice(bytes).map_err(|e| sm_error(ErrorVerb::Read, format!("snapshot image: {e}")))
}

impl StateMachine {
    /// Opens the state machine in `dir`: the image of the latest snapshot,
    /// or an empty image when there is none.
    pub fn open(dir: &Path) -> Result<StateMachine, StorageError> {
        std::fs::create_dir_all(dir).map_err(|e| sm_error(ErrorVerb::Write, e))?;
        // Temp files of stores a crash interrupted.
        for entry in std::fs::read_dir(dir).map_err(|e| sm_error(ErrorVerb::Read, e))?.flatten() {
            if entry.file_name().to_string_lossy().starts_with(SNAPSHOT_TMP) {
                remove_if_exists(&entry.path()).map_err(|e| sm_error(ErrorVerb::Write, e))?;
            }
        }
        let path = dir.join(SNAPSHOT);
        let (applied, snapshot) = match std::fs::read(&path) {
            Ok(bytes) => {
                let (meta, image_bytes) = decode_snapshot(&path, &bytes)?;
                let image = decode_image(&image_bytes)?;
                let applied = Applied {
                    image: Arc::new(image),
                    last_applied: meta.last_log_id,
                    membership: meta.last_membership.clone(),
                };
                (applied, Some((meta, image_bytes)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Applied::default(), None),
            Err(e) => return Err(sm_error(ErrorVerb::Read, format!("{}: {e}", path.display()))),
        };
        let first = AppliedImage { index: applied.last_applied.map_or(0, |l| l.index), image: applied.image.clone() };
        Ok(StateMachine {
            shared: Arc::new(Shared {
                dir: dir.to_path_buf(),
                state: Mutex::new(applied),
                snapshot: Mutex::new(snapshot),
                built: std::sync::atomic::AtomicU64::new(0),
                published: tokio::sync::watch::channel(first).0,
            }),
        })
    }

    /// The image as of the last applied entry.
    pub fn image(&self) -> Arc<MetadataImage> {
        lock(&self.shared.state).image.clone()
    }

    /// Sees every new image, with the log index it is at.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<AppliedImage> {
        self.shared.published.subscribe()
    }

    fn publish(&self, state: &Applied) {
        let index = state.last_applied.map_or(0, |l| l.index);
        self.shared.published.send_replace(AppliedImage { index, image: state.image.clone() });
    }

    /// Writes a snapshot file and makes it the current one, unless the
    /// current one has a newer `last_log_id` (then this one is dropped and
    /// `false` returned). The file is replaced atomically and durably: a
    /// temp file of its own, fsynced, renamed under the `snapshot` lock,
    /// then the directory fsynced.
    fn store_snapshot(&self, meta: &Meta, image_bytes: Vec<u8>) -> Result<bool, StorageError> {
        let record = encode_snapshot(meta, &image_bytes)?;
        let dir = &self.shared.dir;
        let n = TMP_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = dir.join(format!("{SNAPSHOT_TMP}{}-{n}", std::process::id()));
        let written = write_new_synced(&tmp, &record).map_err(|e| sm_error(ErrorVerb::Write, e));
        let replaced = written.and_then(|()| {
            let mut current = lock(&self.shared.snapshot);
            if current.as_ref().is_some_and(|(m, _)| m.last_log_id > meta.last_log_id) {
                return Ok(false);
            }
            std::fs::rename(&tmp, dir.join(SNAPSHOT))
                .map_err(|e| sm_error(ErrorVerb::Write, format!("rename {}: {e}", tmp.display())))?;
            *current = Some((meta.clone(), image_bytes));
            Ok(true)
        });
        if !matches!(replaced, Ok(true)) {
            let _ = remove_if_exists(&tmp);
            return replaced;
        }
        sync_dir(dir).map_err(|e| sm_error(ErrorVerb::Write, e))?;
        Ok(true)
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let applied = lock(&self.shared.state).clone();
        let image_bytes = serde_json::to_vec(&*applied.image).map_err(|e| sm_error(ErrorVerb::Write, e))?;
        let n = self.shared.built.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let snapshot_id = match applied.last_applied {
            Some(id) => format!("{}-{}-{n}", id.leader_id, id.index),
            None => format!("none-{n}"),
        };
        let meta = Meta { last_log_id: applied.last_applied, last_membership: applied.membership, snapshot_id };
        let this = self.clone();
        let stored = image_bytes.clone();
        let meta_for_store = meta.clone();
        let stored = tokio::task::spawn_blocking(move || this.store_snapshot(&meta_for_store, stored))
            .await
            .map_err(|e| sm_error(ErrorVerb::Write, e))??;
        if !stored {
            tracing::info!(snapshot = %meta.snapshot_id, "a newer snapshot was installed while this one was built");
        }
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(image_bytes)) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, Membership), StorageError> {
        let state = lock(&self.shared.state);
        Ok((state.last_applied, state.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<ApplyOutcome>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut guard = lock(&self.shared.state);
        let state = &mut *guard;
        // Copies the image only if a reader still holds the current one.
        let image = Arc::make_mut(&mut state.image);
        let mut outcomes = Vec::new();
        for entry in entries {
            state.last_applied = Some(entry.log_id);
            let outcome = match entry.payload {
                EntryPayload::Blank => ApplyOutcome::default(),
                EntryPayload::Normal(versioned) => match image.apply(&versioned.command) {
                    Ok(effects) => ApplyOutcome { error: None, effects },
                    Err(e) => ApplyOutcome { error: Some(e), effects: Vec::new() },
                },
                EntryPayload::Membership(m) => {
                    state.membership = StoredMembership::new(Some(entry.log_id), m);
                    ApplyOutcome::default()
                }
            };
            outcomes.push(outcome);
        }
        self.publish(state);
        Ok(outcomes)
    }

    async fn get_snapshot_builder(&mut self) -> Self {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(&mut self, meta: &Meta, snapshot: Box<Cursor<Vec<u8>>>) -> Result<(), StorageError> {
        let image_bytes = snapshot.into_inner();
        let image = decode_image(&image_bytes)?;
        let this = self.clone();
        let meta_for_store = meta.clone();
        let stored = tokio::task::spawn_blocking(move || this.store_snapshot(&meta_for_store, image_bytes))
            .await
            .map_err(|e| sm_error(ErrorVerb::Write, e))??;
        if !stored {
            tracing::warn!(snapshot = %meta.snapshot_id, "installed a snapshot older than the one on disk");
        }
        let mut state = lock(&self.shared.state);
        *state = Applied {
            image: Arc::new(image),
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
        };
        self.publish(&state);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let current = lock(&self.shared.snapshot).clone();
        Ok(current.map(|(meta, bytes)| Snapshot { meta, snapshot: Box::new(Cursor::new(bytes)) }))
    }
}
