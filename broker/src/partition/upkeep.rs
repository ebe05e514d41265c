//! A partition's background upkeep: config changes, compaction, retention,
//! interval flushes, checkpoints, and closing.

use super::*;

impl Partition {
    /// Applies new topic settings to the log.
    pub fn set_config(&self, config: &TopicConfig) -> Result<(), BrokerError> {
        self.write_log().set_config(config.log.clone()).map_err(BrokerError::Storage)
    }

    /// One pass of log compaction if this partition's log is compacted and
    /// due (`force`: whenever anything is dirty). The log's lock is held
    /// only to plan and to install each cleaned group; a truncation or
    /// retention meanwhile makes the pass stop without installing more.
    pub fn clean(&self, cleaner: &mut Cleaner, force: bool) -> Result<Option<CleanOutcome>, BrokerError> {
        if self.upkeep().is_none() {
            return Ok(None); // closed
        }
        cleaner.clean_if_due(&self.log, force).map_err(BrokerError::Storage)
    }

    /// How much of this compacted partition is cleaned, and whether it is
    /// due; `None` unless compacted.
    pub fn cleaning_due(&self) -> Option<(CleanStats, bool)> {
        self.read_log().cleaning_due()
    }

    /// Deletes segments past retention.
    pub fn enforce_retention(&self) -> Result<usize, BrokerError> {
        let Some(_upkeep) = self.upkeep() else { return Ok(0) };
        // Checkpoint writes and file deletion happen outside the log lock.
        let (outcome, removed) = self.write_log().enforce_retention_deferred();
        removed.finish()?;
        Ok(outcome.segments_deleted)
    }

    /// Syncs if the interval flush policy says it is time.
    pub fn flush_if_due(&self) -> Result<(), BrokerError> {
        let Some(_upkeep) = self.upkeep() else { return Ok(()) };
        let due = self.read_log().flush_due();
        if due {
            let leo = self.read_log().log_end_offset();
            self.sync_blocking(leo)?;
        }
        Ok(())
    }

    /// Writes the checkpoint files (values taken under the lock, files
    /// written outside it by the log's one checkpoint writer, which never
    /// lets an older value replace a newer one).
    ///
    /// First syncs closed segments that are not yet durable, so the recovery
    /// point can move up to the active segment. Files are rewritten only when
    /// their values changed. Does nothing on a failed partition.
    pub fn checkpoint(&self) -> Result<(), BrokerError> {
        let Some(_upkeep) = self.upkeep() else { return Ok(()) };
        if self.read_log().failure().is_some() {
            return Ok(());
        }
        // The same group commit as producers' syncs: never alongside one,
        // and a failure here fails every later one (and the log) before
        // another fsync of these files can run.
        self.commit
            .sync_now(|| {
                let plan = {
                    let log = self.read_log();
                    if let Some(reason) = log.failure() {
                        return Err(StorageError::LogFailed { reason: reason.to_string() });
                    }
                    log.sync_plan_closed()
                };
                if let Err(e) = plan.execute() {
                    self.fail(&e);
                    return Err(e);
                }
                self.write_log().mark_durable(&plan);
                Ok(())
            })
            .map_err(BrokerError::Storage)?;
        let snapshot = self.read_log().checkpoint_snapshot();
        snapshot.write()?;
        Ok(())
    }

    /// Flushes and closes the log for shutdown.
    ///
    /// Waits for any upkeep in progress, and no upkeep runs afterwards: once
    /// this returns, the partition's directory may be renamed or removed
    /// without an old maintenance pass writing or deleting files by path in
    /// a directory that a new topic of the same name may own by then.
    pub fn close(&self) -> Result<(), BrokerError> {
        self.inflight_bytes.close();
        let mut closed = self.upkeep.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *closed = true;
        self.write_log().close().map_err(BrokerError::Storage)
    }

    /// The upkeep guard, or `None` once the partition is closed. Held across
    /// the file work of flushes, checkpoints and retention (that is its job),
    /// never by appends or fetches.
    pub(super) fn upkeep(&self) -> Option<std::sync::MutexGuard<'_, bool>> {
        let guard = self.upkeep.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        (!*guard).then_some(guard)
    }
}
