//! This broker's membership in the cluster: it registers with the active
//! controller under a new incarnation, then keeps its session alive with a
//! heartbeat every `broker_heartbeat_interval_ms`; on a clean shutdown it
//! asks to be fenced first, so its partitions move before it stops.
//!
//! Registration runs in the background, after the listener serves, because
//! in a cluster of several voters the first broker up cannot commit anything
//! until a second voter answers. A broker restarted on its data directory
//! names the incarnation it follows (recorded there; the directory's lock
//! proves that process exited), which the controller fences and replaces at
//! once. Any other registration is refused while another incarnation of
//! this id is active: that lasts until the old session lapses, so the
//! refusal is retried;
//! if it lasts longer than two sessions, another live process holds the id,
//! and the task ends with the error and the broker stops (two processes with
//! one id must never both serve).

use std::time::Duration;

use tokio::sync::watch;

use crate::controller::{
    BrokerId, Controller, ControllerError, HeartbeatAnswer, HeartbeatRequest, MetadataCommand, MetadataError,
};

/// How long this broker may still act as a leader: until a session timeout
/// after the last heartbeat the active controller answered (counted from
/// when it was sent, so the broker stops no later than the controller
/// fences it). Monotonic time.
#[derive(Debug)]
pub struct Lease {
    epoch: std::time::Instant,
    until_ms: std::sync::atomic::AtomicU64,
}

impl Default for Lease {
    fn default() -> Self {
        Lease { epoch: std::time::Instant::now(), until_ms: std::sync::atomic::AtomicU64::new(0) }
    }
}

impl Lease {
    fn ms(&self, at: std::time::Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    /// The controller answered a heartbeat sent at `sent`.
    pub fn extend(&self, sent: std::time::Instant, session: Duration) {
        self.until_ms.fetch_max(self.ms(sent + session), std::sync::atomic::Ordering::SeqCst);
    }

    /// True while the last answered heartbeat is less than a session old.
    pub fn is_valid(&self) -> bool {
        self.ms(std::time::Instant::now()) < self.until_ms.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Settings of the session.
#[derive(Debug, Clone)]
pub struct Membership {
    /// The controller voter embedded in this broker.
    pub controller: Controller,
    /// This broker.
    pub broker: BrokerId,
    /// The address clients and peers reach it at.
    pub address: String,
    /// New for every start of the process.
    pub incarnation: u64,
    /// The incarnation of the last process on this data directory, which
    /// has exited (the directory's lock says so): registering may replace it.
    pub previous_incarnation: Option<u64>,
    /// The last process on this data directory may have lost writes it had
    /// not synced (see [`Succession`]): tell the controller right after
    /// registering, before this broker is unfenced.
    pub may_have_lost_writes: bool,
    /// Time between heartbeats.
    pub heartbeat_interval: Duration,
    /// The controller's session timeout: an old incarnation of this id that
    /// is still active after two of these belongs to another live process.
    pub session_timeout: Duration,
    /// Extended by every answered heartbeat; the data path checks it.
    pub lease: std::sync::Arc<Lease>,
}

impl Membership {
    /// Registers, then heartbeats until `stop` turns true, extending the
    /// lease with every answer. Returns an error only for a refusal that
    /// must stop the broker.
    pub async fn run(self, stop: watch::Receiver<bool>) -> Result<(), String> {
        let mut stop = stop;
        let mut registered_at: Option<u64> = None;
        let mut warned = false;
        let mut id_in_use_since: Option<std::time::Instant> = None;
        let mut just_registered = false;
        while !*stop.borrow() {
            let step = match registered_at {
                None => self.register().await.map(|index| {
                    registered_at = Some(index);
                    just_registered = true;
                    tracing::info!(broker = %self.broker, incarnation = format!("{:#x}", self.incarnation), "registered with the controller");
                }),
                Some(index) => {
                    let sent = std::time::Instant::now();
                    self.heartbeat(index, false).await.map(|answer| match answer {
                    HeartbeatAnswer::Alive { .. } => self.lease.extend(sent, self.session_timeout),
                    HeartbeatAnswer::Register => {
                        tracing::warn!(broker = %self.broker, "the controller does not know this incarnation; registering again");
                        registered_at = None;
                    }
                })
                }
            };
            match step {
                Ok(()) => {
                    warned = false;
                    id_in_use_since = None;
                }
                Err(ControllerError::Refused(MetadataError::BrokerIdInUse { id, incarnation })) => {
                    let since = *id_in_use_since.get_or_insert_with(std::time::Instant::now);
                    if since.elapsed() > 2 * self.session_timeout {
                        return Err(format!(
                            "broker id {id} is in use by another running broker (incarnation {incarnation:#x}); \
                             give this broker another node_id"
                        ));
                    }
                    if !warned {
                        tracing::warn!(broker = %id, old_incarnation = format!("{incarnation:#x}"), "an earlier incarnation of this broker is still registered; waiting for its session to lapse");
                        warned = true;
                    }
                }
                Err(e) if !warned => {
                    tracing::warn!(broker = %self.broker, error = %e, "cannot reach the active controller yet; retrying");
                    warned = true;
                }
                Err(_) => {}
            }
            let pause = match (registered_at, just_registered) {
                // The first heartbeat right after registering: it unfences.
                (Some(_), true) => Duration::ZERO,
                (Some(_), false) => self.heartbeat_interval,
                (None, _) => Duration::from_millis(200),
            };
            just_registered = false;
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.changed() => {}
            }
        }
        if let Some(index) = registered_at {
            // Controlled shutdown: ask to be fenced now, bounded.
            let _ = tokio::time::timeout(Duration::from_secs(2), self.heartbeat(index, true)).await;
        }
        Ok(())
    }

    async fn register(&self) -> Result<u64, ControllerError> {
        let command = MetadataCommand::RegisterBroker {
            id: self.broker,
            address: self.address.clone(),
            incarnation: self.incarnation,
            previous_incarnation: self.previous_incarnation,
        };
        let mut index = self.controller.propose_anywhere(command).await?.index;
        if self.may_have_lost_writes {
            tracing::warn!(broker = %self.broker, "the last process stopped uncleanly and the machine restarted since: this broker leaves every ISR until it catches up");
            let command = MetadataCommand::ReplicaLostWrites { id: self.broker, incarnation: self.incarnation };
            index = self.controller.propose_anywhere(command).await?.index;
        }
        Ok(index)
    }

    async fn heartbeat(&self, registered_at: u64, shutting_down: bool) -> Result<HeartbeatAnswer, ControllerError> {
        let caught_up = self.controller.status().applied_index.is_some_and(|applied| applied >= registered_at);
        let request = HeartbeatRequest { broker: self.broker, incarnation: self.incarnation, caught_up, shutting_down };
        self.controller.heartbeat(&request).await
    }
}

/// A fresh incarnation id: different for every process start.
pub fn new_incarnation() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.write_u32(std::process::id());
    h.finish()
}

/// What a new process learns of the last one on its data directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Succession {
    /// The incarnation the last process registered, if any.
    pub previous: Option<u64>,
    /// True when that process stopped uncleanly and the machine restarted
    /// since (another boot id), so writes it had not synced may be gone. A
    /// process that was killed leaves its writes in the page cache, which
    /// survives it; a clean stop syncs everything.
    pub may_have_lost_writes: bool,
}

/// The file naming the last incarnation and the boot it ran in.
const INCARNATION_FILE: &str = "incarnation";
/// Written once a clean shutdown has synced and closed every log.
const CLEAN_SHUTDOWN_FILE: &str = "clean-shutdown";

/// This machine's boot id (Linux), which changes at every boot.
fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok().map(|s| s.trim().to_string())
}

/// Reads what the last process on `dir` recorded and records `incarnation`
/// (with this boot's id) in its place, atomically, so the next start can
/// name it. Call under the data directory's lock.
pub fn take_over_incarnation(dir: &std::path::Path, incarnation: u64) -> Result<Succession, String> {
    take_over_incarnation_in_boot(dir, incarnation, boot_id().as_deref())
}

fn take_over_incarnation_in_boot(
    dir: &std::path::Path,
    incarnation: u64,
    boot: Option<&str>,
) -> Result<Succession, String> {
    let path = dir.join(INCARNATION_FILE);
    let parse = |text: &str| {
        u64::from_str_radix(text.trim().trim_start_matches("0x"), 16)
            .map_err(|e| format!("{} is unreadable: {e}", path.display()))
    };
    let (previous, previous_boot) = match std::fs::read_to_string(&path) {
        Ok(text) => {
            let mut lines = text.lines();
            let previous = parse(lines.next().unwrap_or_default())?;
            let boot = lines.find_map(|l| l.strip_prefix("boot ")).map(|b| b.trim().to_string());
            (Some(previous), boot)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (None, None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let clean_path = dir.join(CLEAN_SHUTDOWN_FILE);
    let clean = match std::fs::read_to_string(&clean_path) {
        Ok(text) => previous.is_some() && parse(&text).ok() == previous,
        Err(_) => false,
    };
    // A file without a boot line was written before boot ids were kept.
    let same_boot = previous_boot.is_none() || previous_boot.as_deref() == boot;
    let may_have_lost_writes = previous.is_some() && !clean && !same_boot;
    let mut record = format!("{incarnation:#x}\n");
    if let Some(boot) = boot {
        record.push_str(&format!("boot {boot}\n"));
    }
    crate::storage::fs::write_atomic(&path, record.as_bytes()).map_err(|e| format!("{}: {e}", path.display()))?;
    match std::fs::remove_file(&clean_path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{}: {e}", clean_path.display())),
    }
    Ok(Succession { previous, may_have_lost_writes })
}

/// Records that `incarnation` stopped cleanly: every log synced and closed.
pub fn record_clean_shutdown(dir: &std::path::Path, incarnation: u64) -> Result<(), String> {
    let path = dir.join(CLEAN_SHUTDOWN_FILE);
    crate::storage::fs::write_atomic(&path, format!("{incarnation:#x}\n").as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_unclean_stop_followed_by_a_reboot_may_have_lost_writes() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let first = take_over_incarnation_in_boot(d, 1, Some("boot-a")).unwrap();
        assert_eq!(first, Succession { previous: None, may_have_lost_writes: false });
        // Killed, restarted in the same boot: the page cache kept its writes.
        let killed = take_over_incarnation_in_boot(d, 2, Some("boot-a")).unwrap();
        assert_eq!(killed, Succession { previous: Some(1), may_have_lost_writes: false });
        // Killed, then the machine restarted: unsynced writes may be gone.
        let rebooted = take_over_incarnation_in_boot(d, 3, Some("boot-b")).unwrap();
        assert_eq!(rebooted, Succession { previous: Some(2), may_have_lost_writes: true });
        // A clean stop synced everything, reboot or not.
        record_clean_shutdown(d, 3).unwrap();
        let clean = take_over_incarnation_in_boot(d, 4, Some("boot-c")).unwrap();
        assert_eq!(clean, Succession { previous: Some(3), may_have_lost_writes: false });
        // The marker is used once: the next unclean stop counts again.
        let again = take_over_incarnation_in_boot(d, 5, Some("boot-d")).unwrap();
        assert_eq!(again, Succession { previous: Some(4), may_have_lost_writes: true });
        // A stale marker (from an older incarnation) does not count.
        record_clean_shutdown(d, 4).unwrap();
        let stale = take_over_incarnation_in_boot(d, 6, Some("boot-e")).unwrap();
        assert!(stale.may_have_lost_writes);
    }
}
