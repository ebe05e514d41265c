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
//!
//! The lease the data path checks is tied to current metadata: a heartbeat
//! carries the index of the image this broker serves from, and an answer
//! extends the lease (from the heartbeat's send time, by the shorter of the
//! two sessions) only when it is unfenced and this broker's image has
//! reached the committed index the controller named. A broker whose image
//! stays behind for a session, its lease lapsed, asks to be fenced.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;

use crate::controller::{
    BrokerId, Controller, ControllerError, HeartbeatAnswer, HeartbeatRequest, MetadataCommand, MetadataError,
};

/// Now on the lease clock, in nanoseconds: `CLOCK_BOOTTIME` on Linux, which
/// keeps counting while the machine is suspended (`CLOCK_MONOTONIC`, what
/// `Instant` reads, stops), so a lease cannot outlive a suspend. Elsewhere
/// the monotonic clock. `None` if the clock cannot be read: no lease then.
#[cfg(target_os = "linux")]
pub fn lease_clock_ns() -> Option<u64> {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `now` is a valid, writable timespec for the call's duration.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut now) };
    if rc != 0 {
        return None;
    }
    let secs = u64::try_from(now.tv_sec).ok()?;
    let nanos = u64::try_from(now.tv_nsec).ok()?;
    secs.checked_mul(1_000_000_000)?.checked_add(nanos)
}

/// Now on the lease clock, in nanoseconds (the monotonic clock, counted
/// from the first read in this process).
#[cfg(not(target_os = "linux"))]
pub fn lease_clock_ns() -> Option<u64> {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let start = *START.get_or_init(std::time::Instant::now);
    u64::try_from(start.elapsed().as_nanos()).ok()
}

/// How long this broker may still act as a leader: until a session after
/// the send time of the last heartbeat whose answer allowed it (see
/// [`lease_extension`]). The data path checks it on every produce, so it is
/// one atomic and a clock read (the lease clock, [`lease_clock_ns`]).
#[derive(Debug, Default)]
pub struct Lease {
    /// End of the lease on the lease clock, in nanoseconds (0: none).
    until_ns: AtomicU64,
}

impl Lease {
    /// A heartbeat sent at `sent_ns` (lease clock) allowed `session`: the
    /// lease runs until `sent_ns + session`, unless it already runs longer.
    pub fn extend(&self, sent_ns: u64, session: Duration) {
        let session_ns = u64::try_from(session.as_nanos()).unwrap_or(u64::MAX);
        self.until_ns.fetch_max(sent_ns.saturating_add(session_ns), Ordering::SeqCst);
    }

    /// True while the lease runs.
    pub fn is_valid(&self) -> bool {
        lease_clock_ns().is_some_and(|now| self.is_valid_at(now))
    }

    /// True while the lease runs at `now_ns` on the lease clock.
    pub fn is_valid_at(&self, now_ns: u64) -> bool {
        now_ns < self.until_ns.load(Ordering::SeqCst)
    }
}

/// The broker's side of the lease rule: how long an answer to a heartbeat
/// lets this broker lead, counted from when the heartbeat was sent, given
/// `image_index`, the metadata log index of the image this broker serves
/// from now. Only an unfenced answer counts, only once the image has
/// reached the committed index the controller named (so a broker whose
/// metadata stopped moving, say because the controller's log no longer
/// reaches it while its heartbeats still get out, stops leading within a
/// session of the last commit it saw), and for the shorter of this broker's
/// session and the controller's (which fences after its own).
pub fn lease_extension(answer: &HeartbeatAnswer, image_index: u64, own_session: Duration) -> Option<Duration> {
    match *answer {
        HeartbeatAnswer::Alive { fenced: false, metadata_index: Some(needed), session_timeout_ms }
            if image_index >= needed && session_timeout_ms > 0 =>
        {
            Some(own_session.min(Duration::from_millis(session_timeout_ms)))
        }
        _ => None,
    }
}

/// How long this broker's image has stayed behind the index that unfenced
/// answers named: a broker behind for a whole session, whose lease has
/// lapsed, asks the controller to fence it, so its leaderships move to
/// brokers that can serve them instead of staying with one that cannot.
#[derive(Debug, Default)]
struct Behind {
    since: Option<std::time::Instant>,
}

impl Behind {
    /// An answer arrived; the image is at `image_index` now.
    fn observe(&mut self, answer: &HeartbeatAnswer, image_index: u64, now: std::time::Instant) {
        match *answer {
            HeartbeatAnswer::Alive { fenced: false, metadata_index: Some(needed), .. } if image_index < needed => {
                self.since.get_or_insert(now);
            }
            _ => self.since = None,
        }
    }

    /// True when the next heartbeat should ask to be fenced.
    fn want_fence(&self, now: std::time::Instant, session: Duration, lease_valid: bool) -> bool {
        !lease_valid && self.since.is_some_and(|since| now.saturating_duration_since(since) >= session)
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
    /// This broker's session timeout: its lease lasts no longer (nor longer
    /// than the controller's). An old incarnation of this id that is still
    /// active after two of these belongs to another live process.
    pub session_timeout: Duration,
    /// The metadata log index of the image the data path serves from (the
    /// broker's reconciled index).
    pub image_index: watch::Receiver<u64>,
    /// Extended by answered heartbeats; the data path checks it.
    pub lease: std::sync::Arc<Lease>,
}

impl Membership {
    /// Registers, then heartbeats until `stop` turns true, extending the
    /// lease as answers allow. Returns an error only for a refusal that
    /// must stop the broker.
    pub async fn run(self, stop: watch::Receiver<bool>) -> Result<(), String> {
        let mut stop = stop;
        let mut registered = false;
        let mut warned = false;
        let mut id_in_use_since: Option<std::time::Instant> = None;
        let mut just_registered = false;
        let mut behind = Behind::default();
        while !*stop.borrow() {
            let started = std::time::Instant::now();
            let step = if registered {
                self.beat(&mut behind).await.map(|answer| {
                    if answer == HeartbeatAnswer::Register {
                        tracing::warn!(broker = %self.broker, "the controller does not know this incarnation; registering again");
                        registered = false;
                    }
                })
            } else {
                self.register().await.map(|()| {
                    registered = true;
                    just_registered = true;
                    tracing::info!(broker = %self.broker, incarnation = format!("{:#x}", self.incarnation), "registered with the controller");
                })
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
            let pause = match (registered, just_registered) {
                // The first heartbeat right after registering: it unfences.
                (true, true) => Duration::ZERO,
                (true, false) => self.heartbeat_interval.saturating_sub(started.elapsed()),
                (false, _) => Duration::from_millis(200),
            };
            just_registered = false;
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.changed() => {}
            }
        }
        if registered {
            // Controlled shutdown: ask to be fenced now, bounded.
            let _ = tokio::time::timeout(Duration::from_secs(2), self.heartbeat(true, false)).await;
        }
        Ok(())
    }

    async fn register(&self) -> Result<(), ControllerError> {
        let command = MetadataCommand::RegisterBroker {
            id: self.broker,
            address: self.address.clone(),
            incarnation: self.incarnation,
            previous_incarnation: self.previous_incarnation,
        };
        self.controller.propose_anywhere(command).await?;
        if self.may_have_lost_writes {
            tracing::warn!(broker = %self.broker, "the last process stopped uncleanly and the machine restarted since: this broker leaves every ISR until it catches up");
            let command = MetadataCommand::ReplicaLostWrites { id: self.broker, incarnation: self.incarnation };
            self.controller.propose_anywhere(command).await?;
        }
        Ok(())
    }

    /// One heartbeat, and the lease it allows: the lease counts from the
    /// send time, and is extended only once this broker's image has reached
    /// the index the answer names, waited for at most until the next
    /// heartbeat is due.
    async fn beat(&self, behind: &mut Behind) -> Result<HeartbeatAnswer, ControllerError> {
        let sent = std::time::Instant::now();
        let sent_ns = lease_clock_ns();
        let want_fence = behind.want_fence(sent, self.session_timeout, self.lease.is_valid());
        if want_fence {
            tracing::warn!(broker = %self.broker, "this broker's metadata has stayed behind the controller's for a session; asking to be fenced so its partitions move");
        }
        let answer = self.heartbeat(false, want_fence).await?;
        let Some(sent_ns) = sent_ns else { return Ok(answer) };
        if let HeartbeatAnswer::Alive { fenced: false, metadata_index: Some(needed), .. } = answer {
            let mut image_index = self.image_index.clone();
            let wait = self.heartbeat_interval.saturating_sub(sent.elapsed());
            let _ = tokio::time::timeout(wait, image_index.wait_for(|i| *i >= needed)).await;
        }
        let image_index = *self.image_index.borrow();
        behind.observe(&answer, image_index, std::time::Instant::now());
        match lease_extension(&answer, image_index, self.session_timeout) {
            Some(session) => self.lease.extend(sent_ns, session),
            None => {
                tracing::debug!(broker = %self.broker, ?answer, image_index, "heartbeat answered without extending the lease")
            }
        }
        Ok(answer)
    }

    async fn heartbeat(&self, shutting_down: bool, want_fence: bool) -> Result<HeartbeatAnswer, ControllerError> {
        let metadata_index = Some(*self.image_index.borrow());
        let request = HeartbeatRequest {
            broker: self.broker,
            incarnation: self.incarnation,
            metadata_index,
            shutting_down,
            want_fence,
        };
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

    fn alive(fenced: bool, metadata_index: Option<u64>, session_timeout_ms: u64) -> HeartbeatAnswer {
        HeartbeatAnswer::Alive { fenced, metadata_index, session_timeout_ms }
    }

    const OWN: Duration = Duration::from_secs(9);

    #[test]
    fn the_lease_extends_only_on_an_unfenced_answer_once_the_image_reaches_the_committed_index() {
        let ok = alive(false, Some(40), 9000);
        assert_eq!(lease_extension(&ok, 40, OWN), Some(OWN));
        assert_eq!(lease_extension(&ok, 41, OWN), Some(OWN));
        assert_eq!(lease_extension(&ok, 39, OWN), None, "an image older than the controller's commit");
        assert_eq!(lease_extension(&alive(true, Some(40), 9000), 40, OWN), None, "fenced");
        assert_eq!(lease_extension(&alive(false, None, 9000), 40, OWN), None, "no index named (an older controller)");
        assert_eq!(lease_extension(&HeartbeatAnswer::Register, 40, OWN), None);
    }

    #[test]
    fn the_lease_lasts_the_shorter_of_the_brokers_and_the_controllers_session() {
        assert_eq!(lease_extension(&alive(false, Some(1), 4500), 1, OWN), Some(Duration::from_millis(4500)));
        assert_eq!(lease_extension(&alive(false, Some(1), 18_000), 1, OWN), Some(OWN));
        assert_eq!(lease_extension(&alive(false, Some(1), 0), 1, OWN), None, "no session named");
    }

    #[test]
    fn a_broker_asks_to_be_fenced_once_behind_for_a_session_without_a_lease() {
        let t0 = std::time::Instant::now();
        let session = Duration::from_secs(2);
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut behind = Behind::default();
        behind.observe(&alive(false, Some(50), 2000), 40, at(0));
        assert!(!behind.want_fence(at(1999), session, false), "not behind for a session yet");
        assert!(!behind.want_fence(at(2000), session, true), "still leading on an earlier lease");
        // Later answers name later indexes: still behind since the first.
        behind.observe(&alive(false, Some(60), 2000), 45, at(500));
        assert!(behind.want_fence(at(2000), session, false));
        // Caught up: no longer behind.
        behind.observe(&alive(false, Some(60), 2000), 60, at(2100));
        assert!(!behind.want_fence(at(9000), session, false));
        // A fenced answer never counts as behind (the controller decides
        // when to unfence).
        behind.observe(&alive(true, Some(90), 2000), 60, at(9000));
        assert!(!behind.want_fence(at(20_000), session, false));
    }

    #[test]
    fn a_lease_runs_a_session_from_the_send_time_and_never_shrinks() {
        let lease = Lease::default();
        assert!(!lease.is_valid_at(0), "no lease before an answer");
        let second = 1_000_000_000;
        lease.extend(10 * second, Duration::from_secs(2));
        assert!(lease.is_valid_at(11 * second));
        assert!(!lease.is_valid_at(12 * second), "ends a session after the send time");
        // An answer to an older heartbeat arriving late does not shorten it.
        lease.extend(9 * second, Duration::from_secs(2));
        assert!(lease.is_valid_at(12 * second - 1));
    }

    #[test]
    fn the_lease_clock_moves_forward_and_the_lease_reads_it() {
        let a = lease_clock_ns().expect("the lease clock");
        let b = lease_clock_ns().expect("the lease clock");
        assert!(b >= a);
        let lease = Lease::default();
        assert!(!lease.is_valid());
        lease.extend(a, Duration::from_secs(3600));
        assert!(lease.is_valid());
    }

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
