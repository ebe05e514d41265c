//! Group commit: concurrent callers that need the log durable up to some
//! offset share one fsync.
//!
//! The first caller that finds no sync running becomes the leader: it syncs
//! everything appended so far (which covers every waiter's offset), then wakes
//! the others. Callers that arrive during a sync wait for it and, if it did
//! not reach their offset, lead the next one. The lock is never held across
//! the sync itself.
//!
//! The durable offset is the log's (its recovery point), read through a
//! closure, so a truncation that moves it back is seen at once.
//!
//! A failed sync is never retried: after an fsync error Linux may have
//! dropped the dirty pages and marked them clean, so a second fsync would
//! succeed without the data ever reaching the disk (PostgreSQL's
//! "fsyncgate"). The first error fails the group commit for good: the leader
//! gets the error, and every waiter, now and later, gets
//! [`StorageError::LogFailed`].

use std::sync::{Condvar, Mutex};

use super::{Offset, Result, StorageError};

/// Shared fsync bookkeeping for one log.
#[derive(Debug, Default)]
pub struct GroupCommit {
    state: Mutex<State>,
    done: Condvar,
}

#[derive(Debug, Default)]
struct State {
    syncing: bool,
    /// Why syncing stopped for good.
    failed: Option<String>,
}

impl GroupCommit {
    /// A group commit with no sync running.
    pub fn new() -> Self {
        GroupCommit::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Why syncs stopped, once one failed.
    pub fn failure(&self) -> Option<String> {
        self.lock().failed.clone()
    }

    /// Returns once `durable()` reaches `target`. `sync` performs one sync
    /// of everything appended so far and returns the durable offset after
    /// it; it runs on at most one thread at a time, and never again after it
    /// failed once.
    pub fn sync_to(
        &self,
        target: Offset,
        durable: impl Fn() -> Offset,
        mut sync: impl FnMut() -> Result<Offset>,
    ) -> Result<Offset> {
        let mut state = self.lock();
        loop {
            if let Some(reason) = &state.failed {
                return Err(StorageError::LogFailed { reason: reason.clone() });
            }
            let now = durable();
            if now >= target {
                return Ok(now);
            }
            if state.syncing {
                state = self.done.wait(state).unwrap_or_else(std::sync::PoisonError::into_inner);
                continue;
            }
            state.syncing = true;
            drop(state);
            let result = sync();
            state = self.lock();
            state.syncing = false;
            if let Err(e) = &result {
                state.failed = Some(e.to_string());
            }
            self.done.notify_all();
            result?;
        }
    }

    /// Runs `sync` once, as a sync of this group commit: after any sync in
    /// progress, never alongside one, and not at all once a sync failed. Its
    /// failure fails the group commit for good, like a failed
    /// [`GroupCommit::sync_to`]. Every fsync of a log's files goes through
    /// here or `sync_to`, so no fsync can succeed after another one on the
    /// same files failed and be taken for durability.
    pub fn sync_now<T>(&self, sync: impl FnOnce() -> Result<T>) -> Result<T> {
        let mut state = self.lock();
        while state.syncing {
            state = self.done.wait(state).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        if let Some(reason) = &state.failed {
            return Err(StorageError::LogFailed { reason: reason.clone() });
        }
        state.syncing = true;
        drop(state);
        let result = sync();
        let mut state = self.lock();
        state.syncing = false;
        if let Err(e) = &result {
            state.failed = Some(e.to_string());
        }
        self.done.notify_all();
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    fn eio() -> StorageError {
        StorageError::Io { op: "fdatasync", path: "seg".into(), source: std::io::Error::from_raw_os_error(libc::EIO) }
    }

    #[test]
    fn concurrent_waiters_share_syncs() {
        let gc = Arc::new(GroupCommit::new());
        let appended = Arc::new(AtomicU64::new(0));
        let durable = Arc::new(AtomicU64::new(0));
        let syncs = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (gc, appended, durable, syncs) = (gc.clone(), appended.clone(), durable.clone(), syncs.clone());
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        let mine = Offset(appended.fetch_add(1, Ordering::SeqCst) + 1);
                        let reached = gc
                            .sync_to(
                                mine,
                                || Offset(durable.load(Ordering::SeqCst)),
                                || {
                                    syncs.fetch_add(1, Ordering::SeqCst);
                                    let upto = appended.load(Ordering::SeqCst);
                                    std::thread::sleep(std::time::Duration::from_micros(200));
                                    durable.fetch_max(upto, Ordering::SeqCst);
                                    Ok(Offset(upto))
                                },
                            )
                            .unwrap();
                        assert!(reached >= mine);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(durable.load(Ordering::SeqCst), 400);
        let syncs = syncs.load(Ordering::SeqCst);
        assert!(syncs < 400, "8 threads x 50 waits shared syncs: {syncs}");
    }

    #[test]
    fn a_failed_sync_fails_every_later_caller_without_syncing_again() {
        let gc = GroupCommit::new();
        let calls = AtomicU64::new(0);
        let durable = AtomicU64::new(0);
        let sync = || {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(eio())
        };
        let now = || Offset(durable.load(Ordering::SeqCst));
        assert!(matches!(gc.sync_to(Offset(5), now, sync), Err(StorageError::Io { .. })));
        let ok_sync = || {
            calls.fetch_add(1, Ordering::SeqCst);
            durable.store(5, Ordering::SeqCst);
            Ok(Offset(5))
        };
        let again = gc.sync_to(Offset(5), now, ok_sync);
        assert!(matches!(again, Err(StorageError::LogFailed { .. })), "{again:?}");
        assert_eq!(calls.load(Ordering::SeqCst), 1, "a failed fsync is never retried");
        assert!(gc.failure().unwrap().contains("fdatasync"));
    }

    #[test]
    fn waiters_of_a_failing_sync_all_get_the_failure() {
        use std::sync::mpsc;
        use std::time::Duration;
        const WAITERS: usize = 4;
        let deadline = Duration::from_secs(10);
        let gc = Arc::new(GroupCommit::new());
        let durable = Arc::new(AtomicU64::new(0));
        // Syncs after the first succeed: only the sticky failure can fail the waiters.
        let later_syncs = Arc::new(AtomicU64::new(0));
        let ok_sync = {
            let (durable, later_syncs) = (durable.clone(), later_syncs.clone());
            move || {
                later_syncs.fetch_add(1, Ordering::SeqCst);
                durable.store(1, Ordering::SeqCst);
                Ok(Offset(1))
            }
        };
        // The leader's sync blocks until released, then fails.
        let (in_sync_tx, in_sync) = mpsc::channel();
        let (release, release_rx) = mpsc::channel::<()>();
        let leader = {
            let (gc, durable) = (gc.clone(), durable.clone());
            std::thread::spawn(move || {
                gc.sync_to(
                    Offset(1),
                    || Offset(durable.load(Ordering::SeqCst)),
                    || {
                        in_sync_tx.send(()).unwrap();
                        release_rx.recv().unwrap();
                        Err(eio())
                    },
                )
            })
        };
        in_sync.recv_timeout(deadline).expect("the leader started its sync");
        // Waiters: each reads the durable offset under the lock on its way
        // to waiting; counting those reads tells when each has arrived.
        let arrived = Arc::new(AtomicU64::new(0));
        let (results_tx, results) = mpsc::channel();
        for _ in 0..WAITERS {
            let (gc, durable, arrived, ok_sync, results_tx) =
                (gc.clone(), durable.clone(), arrived.clone(), ok_sync.clone(), results_tx.clone());
            std::thread::spawn(move || {
                let first = std::sync::atomic::AtomicBool::new(true);
                let now = || {
                    if first.swap(false, Ordering::SeqCst) {
                        arrived.fetch_add(1, Ordering::SeqCst);
                    }
                    Offset(durable.load(Ordering::SeqCst))
                };
                results_tx.send(gc.sync_to(Offset(1), now, ok_sync)).unwrap();
            });
        }
        let start = std::time::Instant::now();
        while arrived.load(Ordering::SeqCst) < WAITERS as u64 {
            assert!(start.elapsed() < deadline, "waiters did not arrive");
            std::thread::yield_now();
        }
        // A waiter reads the durable offset holding the lock and, the sync
        // still running, waits on the condvar, which releases the lock: so
        // once the lock is ours, every waiter is parked.
        {
            let state = gc.lock();
            assert!(state.syncing && state.failed.is_none(), "the leader's sync is still running");
        }
        assert!(results.try_recv().is_err(), "no waiter returned while the sync ran");
        release.send(()).unwrap();
        let led = leader.join().unwrap();
        assert!(matches!(led, Err(StorageError::Io { op: "fdatasync", .. })), "the leader gets the I/O error: {led:?}");
        for i in 0..WAITERS {
            let got = results.recv_timeout(deadline).unwrap_or_else(|_| panic!("waiter {i} was never woken"));
            assert!(matches!(&got, Err(StorageError::LogFailed { reason }) if reason.contains("fdatasync")), "{got:?}");
        }
        let later = gc.sync_to(Offset(1), || Offset(durable.load(Ordering::SeqCst)), ok_sync);
        assert!(matches!(later, Err(StorageError::LogFailed { .. })), "a later caller too: {later:?}");
        assert_eq!(later_syncs.load(Ordering::SeqCst), 0, "no sync ran after the failure");
        assert_eq!(durable.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_failed_sync_now_fails_every_later_group_sync() {
        let gc = GroupCommit::new();
        let calls = AtomicU64::new(0);
        let failed: Result<()> = gc.sync_now(|| Err(eio()));
        assert!(matches!(failed, Err(StorageError::Io { .. })), "{failed:?}");
        let later = gc.sync_to(
            Offset(1),
            || Offset(0),
            || {
                calls.fetch_add(1, Ordering::SeqCst);
                Ok(Offset(1))
            },
        );
        assert!(matches!(later, Err(StorageError::LogFailed { .. })), "{later:?}");
        assert_eq!(calls.load(Ordering::SeqCst), 0, "no fsync after the failed one");
        assert!(matches!(gc.sync_now(|| Ok(())), Err(StorageError::LogFailed { .. })));
    }
}
