//! Group commit: concurrent callers that need the log durable up to some
//! offset share one fsync.
//!
//! The first caller that finds no sync running becomes the leader: it syncs
//! everything appended so far (which covers every waiter's offset), then wakes
//! the others. Callers that arrive during a sync wait for it and, if it did
//! not reach their offset, lead the next one. The lock is never held across
//! the sync itself.

use std::sync::{Condvar, Mutex};

use super::Offset;

/// Shared fsync bookkeeping for one log.
#[derive(Debug, Default)]
pub struct GroupCommit {
    state: Mutex<State>,
    done: Condvar,
}

#[derive(Debug, Default)]
struct State {
    durable: Offset,
    syncing: bool,
}

impl GroupCommit {
    /// A group commit whose durable offset starts at `durable`.
    pub fn new(durable: Offset) -> Self {
        GroupCommit { state: Mutex::new(State { durable, syncing: false }), done: Condvar::new() }
    }

    /// Offsets below this are durable.
    pub fn durable(&self) -> Offset {
        self.lock().durable
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Returns once offsets below `target` are durable. `sync` performs one
    /// sync of everything appended so far and returns the offset it made
    /// durable; it runs on at most one thread at a time.
    pub fn sync_to<E>(&self, target: Offset, mut sync: impl FnMut() -> Result<Offset, E>) -> Result<Offset, E> {
        let mut state = self.lock();
        loop {
            if state.durable >= target {
                return Ok(state.durable);
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
            if let Ok(upto) = &result {
                state.durable = state.durable.max(*upto);
            }
            self.done.notify_all();
            match result {
                Ok(_) => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn concurrent_waiters_share_syncs() {
        let gc = Arc::new(GroupCommit::new(Offset(0)));
        let appended = Arc::new(AtomicU64::new(0));
        let syncs = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (gc, appended, syncs) = (gc.clone(), appended.clone(), syncs.clone());
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        let mine = Offset(appended.fetch_add(1, Ordering::SeqCst) + 1);
                        let durable = gc
                            .sync_to(mine, || {
                                syncs.fetch_add(1, Ordering::SeqCst);
                                let upto = appended.load(Ordering::SeqCst);
                                std::thread::sleep(std::time::Duration::from_micros(200));
                                Ok::<_, ()>(Offset(upto))
                            })
                            .unwrap();
                        assert!(durable >= mine);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(gc.durable(), Offset(400));
        assert!(syncs.load(Ordering::SeqCst) < 400, "syncs were shared: {}", syncs.load(Ordering::SeqCst));
    }

    #[test]
    fn a_failed_sync_is_reported_and_the_next_caller_retries() {
        let gc = GroupCommit::new(Offset(0));
        assert_eq!(gc.sync_to(Offset(5), || Err::<Offset, &str>("eio")), Err("eio"));
        assert_eq!(gc.sync_to(Offset(5), || Ok::<_, &str>(Offset(5))), Ok(Offset(5)));
    }
}
