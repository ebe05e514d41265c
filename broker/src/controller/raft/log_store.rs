//! The metadata log's Raft log, vote and committed log id, in files of one
//! directory: `raft-log` (entries), `raft-vote`, `raft-committed` and
//! `raft-purged`.
//!
//! `raft-log` holds records `[length u32][crc32c u32][entry as JSON]`, in
//! index order with no holes. Invariants:
//! - An append is written and fdatasynced before openraft's callback hears
//!   of it; a vote is on disk before `save_vote` returns.
//! - A truncation cuts the file at the first removed record and syncs it.
//! - A purge records the purged log id durably, then rewrites the file
//!   without the purged records (temp file, fsync, rename, directory fsync).
//! - Open reads records up to the first one that fails its framing (length)
//!   or its CRC (an append whose callback never ran) and cuts the file
//!   there. A record that passes its CRC was written whole: if it does not
//!   decode (a newer metadata version, a bug) open fails with
//!   [`LogOpenError`] and the file is left as it is, since cutting it could
//!   erase committed entries. A hole in the indexes is an error too.
//!
//! Every write, fsync and directory fsync goes through `storage::fs`, the
//! seam the test file system (`storage/testfs.rs`) hooks for injected
//! errors and power loss.
//!
//! File work runs on a blocking thread under the `io` lock, which serializes
//! writes as openraft requires; readers only take the `entries` lock, for a
//! copy of what they asked for.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{AnyError, ErrorSubject, ErrorVerb, RaftLogReader, StorageIOError, Vote};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{Entry, LogId, METADATA_VERSION, StorageError, TypeConfig};
use crate::storage::fs::{pwrite_all, remove_if_exists, sync_data, sync_dir, write_atomic, write_new_synced};

const LOG: &str = "raft-log";
const VOTE: &str = "raft-vote";
const COMMITTED: &str = "raft-committed";
const PURGED: &str = "raft-purged";
const RECORD_HEADER: usize = 8;
/// Largest entry accepted from the file: a length above it is a torn record.
const MAX_ENTRY_BYTES: u32 = 64 << 20;

/// Why the Raft log could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum LogOpenError {
    /// A record passes its CRC, so it was written whole, but does not
    /// decode. It is not a torn append, so it is not cut.
    #[error(
        "{}: the record at byte {position} passes its CRC but does not decode ({reason}). It was written whole, so \
         it is not cut: the file is left as it is and this voter does not start. If a newer build wrote it, run \
         that build; otherwise restore this directory from a copy",
        path.display()
    )]
    Undecodable {
        /// The log file.
        path: PathBuf,
        /// Byte position of the record.
        position: u64,
        /// What the decoder said.
        reason: String,
    },
    /// A record holds a command of a metadata version newer than this
    /// build knows.
    #[error(
        "{}: the record at byte {position} has metadata version {version}, newer than this build knows \
         ({METADATA_VERSION}); run a build that knows it. The file is left as it is",
        path.display()
    )]
    UnknownVersion {
        /// The log file.
        path: PathBuf,
        /// Byte position of the record.
        position: u64,
        /// Its metadata version.
        version: u64,
    },
    /// Reading or writing the files failed, or the log is inconsistent.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl From<LogOpenError> for StorageError {
    fn from(e: LogOpenError) -> StorageError {
        match e {
            LogOpenError::Storage(e) => e,
            other => corrupt(ErrorSubject::Logs, other.to_string()),
        }
    }
}

/// The Raft log of the metadata log.
#[derive(Debug, Clone)]
pub struct LogStore {
    shared: Arc<Shared>,
}

/// A reader of the log, for openraft's replication tasks.
#[derive(Debug, Clone)]
pub struct LogReader {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    dir: PathBuf,
    /// Entries present (after the last purged), by index, with the byte
    /// position of their record in `raft-log`.
    entries: Mutex<BTreeMap<u64, (Entry, u64)>>,
    io: Mutex<Io>,
}

#[derive(Debug)]
struct Io {
    file: File,
    /// Bytes of valid records in the file.
    len: u64,
    vote: Option<Vote<u64>>,
    committed: Option<LogId>,
    purged: Option<LogId>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn io_error(subject: ErrorSubject<u64>, verb: ErrorVerb, e: impl std::error::Error + 'static) -> StorageError {
    StorageError::IO { source: StorageIOError::new(subject, verb, AnyError::new(&e)) }
}

fn write_error(subject: ErrorSubject<u64>, e: impl std::error::Error + 'static) -> StorageError {
    io_error(subject, ErrorVerb::Write, e)
}

fn read_error(subject: ErrorSubject<u64>, e: impl std::error::Error + 'static) -> StorageError {
    io_error(subject, ErrorVerb::Read, e)
}

fn corrupt(subject: ErrorSubject<u64>, what: String) -> StorageError {
    read_error(subject, std::io::Error::new(std::io::ErrorKind::InvalidData, what))
}

/// Writes `value` as JSON to `dir/name`, atomically and durably.
fn save<T: Serialize>(dir: &Path, name: &str, value: &T, subject: ErrorSubject<u64>) -> Result<(), StorageError> {
    let json = serde_json::to_vec(value).map_err(|e| write_error(subject.clone(), e))?;
    write_atomic(&dir.join(name), &json).map_err(|e| write_error(subject, e))
}

/// Reads `dir/name` as JSON; `None` when the file does not exist.
fn load<T: DeserializeOwned>(dir: &Path, name: &str, subject: ErrorSubject<u64>) -> Result<Option<T>, StorageError> {
    match std::fs::read(dir.join(name)) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| corrupt(subject, format!("{}: {e}", dir.join(name).display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(read_error(subject, e)),
    }
}

fn encode_record(entry: &Entry) -> Result<Vec<u8>, StorageError> {
    let json = serde_json::to_vec(entry).map_err(|e| write_error(ErrorSubject::Log(entry.log_id), e))?;
    let len = u32::try_from(json.len())
        .ok()
        .filter(|l| *l <= MAX_ENTRY_BYTES)
        .ok_or_else(|| corrupt(ErrorSubject::Log(entry.log_id), format!("entry of {} bytes", json.len())))?;
    let mut out = Vec::with_capacity(RECORD_HEADER + json.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&crc32c::crc32c(&json).to_be_bytes());
    out.extend_from_slice(&json);
    Ok(out)
}

/// The metadata version of an entry's command, when its JSON has one.
fn command_version(json: &[u8]) -> Option<u64> {
    let value: serde_json::Value = serde_json::from_slice(json).ok()?;
    value.get("payload")?.get("Normal")?.get("version")?.as_u64()
}

/// Decodes the records of `data`: the entries with their positions, and
/// the byte length of the valid prefix. A record that fails its framing or
/// CRC ends it (a torn append); one that passes its CRC and does not decode
/// is an error.
fn decode_records(path: &Path, data: &[u8]) -> Result<(Vec<(Entry, u64)>, u64), LogOpenError> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while data.len() - pos >= RECORD_HEADER {
        let len = u32::from_be_bytes(data[pos..pos + 4].try_into().expect("4 bytes"));
        let crc = u32::from_be_bytes(data[pos + 4..pos + 8].try_into().expect("4 bytes"));
        let end = pos + RECORD_HEADER + len as usize;
        if len > MAX_ENTRY_BYTES || end > data.len() {
            break;
        }
        let json = &data[pos + RECORD_HEADER..end];
        if crc32c::crc32c(json) != crc {
            break;
        }
        let entry = serde_json::from_slice::<Entry>(json).map_err(|e| {
            let (path, position) = (path.to_path_buf(), pos as u64);
            match command_version(json) {
                Some(version) if version > u64::from(METADATA_VERSION) => {
                    LogOpenError::UnknownVersion { path, position, version }
                }
                _ => LogOpenError::Undecodable { path, position, reason: e.to_string() },
            }
        })?;
        out.push((entry, pos as u64));
        pos = end;
    }
    Ok((out, pos as u64))
}

impl LogStore {
    /// Opens (creating if needed) the log in `dir`, cutting a torn last
    /// append; refuses a log with a whole record it cannot decode.
    pub fn open(dir: &Path) -> Result<LogStore, LogOpenError> {
        std::fs::create_dir_all(dir).map_err(|e| write_error(ErrorSubject::Store, e))?;
        let vote = load(dir, VOTE, ErrorSubject::Vote)?;
        let committed = load(dir, COMMITTED, ErrorSubject::Store)?;
        let purged: Option<LogId> = load(dir, PURGED, ErrorSubject::Store)?;
        let path = dir.join(LOG);
        let created = !path.exists();
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| write_error(ErrorSubject::Logs, e))?;
        if created {
            sync_dir(dir).map_err(|e| write_error(ErrorSubject::Logs, e))?;
        }
        let mut data = Vec::new();
        file.read_to_end(&mut data).map_err(|e| read_error(ErrorSubject::Logs, e))?;
        let (records, len) = decode_records(&path, &data)?;
        if len < data.len() as u64 {
            tracing::warn!(path = %path.display(), valid_bytes = len, cut_bytes = data.len() as u64 - len, "cutting a torn metadata log record");
            file.set_len(len).map_err(|e| write_error(ErrorSubject::Logs, e))?;
            sync_data(&file, &path).map_err(|e| write_error(ErrorSubject::Logs, e))?;
        }
        let floor = purged.map_or(0, |p| p.index + 1);
        let mut entries = BTreeMap::new();
        let mut expected: Option<u64> = None;
        for (entry, position) in records {
            let index = entry.log_id.index;
            if index < floor {
                continue; // purged, the rewrite did not happen before a crash
            }
            if let Some(e) = expected
                && index != e
            {
                return Err(corrupt(
                    ErrorSubject::Logs,
                    format!("{}: index {index} follows {}", path.display(), e - 1),
                )
                .into());
            }
            if expected.is_none() && purged.is_some() && index != floor {
                return Err(corrupt(
                    ErrorSubject::Logs,
                    format!("{}: first index {index}, expected {floor}", path.display()),
                )
                .into());
            }
            expected = Some(index + 1);
            entries.insert(index, (entry, position));
        }
        let io = Io { file, len, vote, committed, purged };
        Ok(LogStore {
            shared: Arc::new(Shared { dir: dir.to_path_buf(), entries: Mutex::new(entries), io: Mutex::new(io) }),
        })
    }

    /// Runs `f` on a blocking thread with the I/O state locked.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Shared, &mut Io) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, StorageError> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            let mut io = lock(&shared.io);
            f(&shared, &mut io)
        })
        .await
        .map_err(|e| write_error(ErrorSubject::Store, std::io::Error::other(e.to_string())))?
    }
}

impl Shared {
    fn read_range<RB: RangeBounds<u64>>(&self, range: RB) -> Vec<Entry> {
        lock(&self.entries).range(range).map(|(_, (e, _))| e.clone()).collect()
    }
}

impl RaftLogReader<TypeConfig> for LogReader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        Ok(self.shared.read_range(range))
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        Ok(self.shared.read_range(range))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogReader;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let purged = lock(&self.shared.io).purged;
        let last = lock(&self.shared.entries).values().next_back().map(|(e, _)| e.log_id);
        Ok(LogState { last_purged_log_id: purged, last_log_id: last.or(purged) })
    }

    async fn get_log_reader(&mut self) -> LogReader {
        LogReader { shared: self.shared.clone() }
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError> {
        let vote = *vote;
        self.blocking(move |shared, io| {
            save(&shared.dir, VOTE, &vote, ErrorSubject::Vote)?;
            io.vote = Some(vote);
            Ok(())
        })
        .await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError> {
        Ok(lock(&self.shared.io).vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.blocking(move |shared, io| {
            save(&shared.dir, COMMITTED, &committed, ErrorSubject::Store)?;
            io.committed = committed;
            Ok(())
        })
        .await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(lock(&self.shared.io).committed)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let result = self
            .blocking(move |shared, io| {
                let mut bytes = Vec::new();
                let mut placed = Vec::with_capacity(entries.len());
                for entry in entries {
                    let position = io.len + bytes.len() as u64;
                    bytes.extend_from_slice(&encode_record(&entry)?);
                    placed.push((entry, position));
                }
                let subject = ErrorSubject::Logs;
                let path = shared.dir.join(LOG);
                pwrite_all(&io.file, &[&bytes, &[]], io.len).map_err(|e| write_error(subject.clone(), e))?;
                sync_data(&io.file, &path).map_err(|e| write_error(subject, e))?;
                io.len += bytes.len() as u64;
                let mut present = lock(&shared.entries);
                for (entry, position) in placed {
                    present.insert(entry.log_id.index, (entry, position));
                }
                Ok(())
            })
            .await;
        match result {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(e)
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.blocking(move |shared, io| {
            let cut = {
                let mut entries = lock(&shared.entries);
                let removed = entries.split_off(&log_id.index);
                removed.values().next().map(|(_, position)| *position)
            };
            if let Some(position) = cut {
                let subject = ErrorSubject::Logs;
                io.file.set_len(position).map_err(|e| write_error(subject.clone(), e))?;
                sync_data(&io.file, &shared.dir.join(LOG)).map_err(|e| write_error(subject, e))?;
                io.len = position;
            }
            Ok(())
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.blocking(move |shared, io| {
            if io.purged.is_some_and(|p| p.index >= log_id.index) {
                return Ok(());
            }
            save(&shared.dir, PURGED, &Some(log_id), ErrorSubject::Store)?;
            io.purged = Some(log_id);
            // Rewrite the file with what remains, then swap it in.
            let mut entries = lock(&shared.entries);
            let kept = entries.split_off(&(log_id.index + 1));
            *entries = BTreeMap::new();
            let mut bytes = Vec::new();
            for (index, (entry, _)) in kept {
                let position = bytes.len() as u64;
                bytes.extend_from_slice(&encode_record(&entry)?);
                entries.insert(index, (entry, position));
            }
            drop(entries);
            let path = shared.dir.join(LOG);
            let tmp = shared.dir.join(format!("{LOG}.tmp"));
            let subject = ErrorSubject::Logs;
            remove_if_exists(&tmp).map_err(|e| write_error(subject.clone(), e))?;
            write_new_synced(&tmp, &bytes).map_err(|e| write_error(subject.clone(), e))?;
            std::fs::rename(&tmp, &path).map_err(|e| write_error(subject.clone(), e))?;
            sync_dir(&shared.dir).map_err(|e| write_error(subject.clone(), e))?;
            io.file = OpenOptions::new().read(true).write(true).open(&path).map_err(|e| write_error(subject, e))?;
            io.len = bytes.len() as u64;
            Ok(())
        })
        .await
    }
}

impl LogStore {
    /// The directory the files live in.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }
}
