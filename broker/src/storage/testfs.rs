//! A test seam over the file system (compiled into tests only): injected
//! I/O errors, and a model of power loss that keeps only what was fsynced.
//!
//! The helpers in `fs` call [`before_write`], [`before_sync`],
//! [`after_sync`] and [`after_sync_dir`] around every `pwrite`, fsync and
//! directory fsync the storage code does. Nothing happens unless a test arms
//! a fault or watches a directory, so other tests running in parallel in the
//! same process are unaffected (everything is keyed by directory).
//!
//! Power-loss model, per watched directory:
//! - an fsync of a file records its contents at that moment (however they
//!   were written: `pwrite`, stores through a map, `set_len`) as the durable
//!   image of its inode;
//! - an fsync of the directory records which names point at which inodes;
//! - [`power_loss`] rewrites the directory to what was durable: names
//!   created since the last directory fsync vanish, names removed since come
//!   back, and every file holds its inode's durable image (empty if it was
//!   never fsynced).
//!
//! A failed fsync behaves as Linux's does (PostgreSQL's "fsyncgate"): the
//! dirty data is gone, and a later fsync of the same file that succeeds does
//! not bring it back: the inode's image stops following its contents.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// Which operation a fault hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    /// A `pwrite` of data.
    Write,
    /// An fsync or fdatasync of a file.
    Fsync,
    /// An fsync of the watched directory itself (its entries).
    DirFsync,
}

/// Work a test runs right after a fault fired, before the failing call
/// returns to the storage code (to race another operation into that window).
type AfterFault = Box<dyn FnOnce() + Send>;

struct Fault {
    dir: PathBuf,
    op: Op,
    /// Only files whose name contains this, when set.
    name_contains: Option<String>,
    /// Faults left to fire.
    remaining: u32,
    /// Runs once, when the fault fires.
    then: Option<AfterFault>,
}

impl std::fmt::Debug for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fault")
            .field("dir", &self.dir)
            .field("op", &self.op)
            .field("name_contains", &self.name_contains)
            .field("remaining", &self.remaining)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct Watched {
    /// Durable image of each inode, by inode number.
    images: HashMap<u64, Vec<u8>>,
    /// Inodes whose fsync failed: their image no longer follows them.
    poisoned: HashSet<u64>,
    /// Names and inodes as of the last directory fsync.
    names: BTreeMap<String, u64>,
    /// Whether the directory's own entry in its parent is durable (it
    /// existed when watching began, or the parent was fsynced since it was
    /// created). Power loss removes a directory whose entry is not.
    entry_durable: bool,
}

#[derive(Debug, Default)]
struct State {
    faults: Vec<Fault>,
    watched: HashMap<PathBuf, Watched>,
    /// Keys for the images of unlinked inodes (counting down from
    /// `u64::MAX`, never a real inode number).
    detached: u64,
}

static ACTIVE: AtomicBool = AtomicBool::new(false);
static STATE: Mutex<Option<State>> = Mutex::new(None);

fn with_state<T>(f: impl FnOnce(&mut State) -> T) -> T {
    let mut guard = STATE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let state = guard.get_or_insert_with(State::default);
    let out = f(state);
    ACTIVE.store(!state.faults.is_empty() || !state.watched.is_empty(), Ordering::SeqCst);
    out
}

/// The path an open file has now (`None` once it was unlinked).
fn path_of(file: &File) -> Option<PathBuf> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).ok()?;
    (!link.to_string_lossy().ends_with(" (deleted)")).then_some(link)
}

fn canonical(dir: &Path) -> PathBuf {
    dir.canonicalize().unwrap_or_else(|_| match (dir.parent(), dir.file_name()) {
        (Some(parent), Some(name)) => canonical(parent).join(name),
        _ => dir.to_path_buf(),
    })
}

/// Makes the next `count` operations `op` on files in `dir` (whose names
/// contain `name_contains`, when given) fail with EIO.
pub(crate) fn fail_next(dir: &Path, op: Op, name_contains: Option<&str>, count: u32) {
    let dir = canonical(dir);
    with_state(|s| {
        s.faults.push(Fault { dir, op, name_contains: name_contains.map(str::to_string), remaining: count, then: None })
    });
}

/// Makes the next operation `op` on a file in `dir` (whose name contains
/// `name_contains`, when given) fail with EIO, and runs `then` on the
/// failing thread right after, before the error reaches the caller.
pub(crate) fn fail_next_then(dir: &Path, op: Op, name_contains: Option<&str>, then: impl FnOnce() + Send + 'static) {
    let dir = canonical(dir);
    let then: Option<AfterFault> = Some(Box::new(then));
    with_state(|s| {
        s.faults.push(Fault { dir, op, name_contains: name_contains.map(str::to_string), remaining: 1, then })
    });
}

/// Starts modelling power loss for `dir`: what is in it now counts as durable.
pub(crate) fn watch(dir: &Path) {
    let dir = canonical(dir);
    let mut watched = Watched { entry_durable: true, ..Watched::default() };
    for (name, path) in entries(&dir) {
        let data = std::fs::read(&path).unwrap_or_default();
        let ino = std::fs::metadata(&path).map(|m| m.ino()).unwrap_or(0);
        watched.images.insert(ino, data);
        watched.names.insert(name, ino);
    }
    with_state(|s| s.watched.insert(dir, watched));
}

/// Starts modelling power loss for a directory that does not exist yet:
/// until its parent is fsynced after it was created, power loss removes it
/// with everything in it.
pub(crate) fn watch_new(dir: &Path) {
    let dir = canonical(dir);
    assert!(!dir.exists(), "watch_new on a directory that exists");
    with_state(|s| s.watched.insert(dir, Watched::default()));
}

/// Stops watching `dir` and drops its faults.
pub(crate) fn forget(dir: &Path) {
    let dir = canonical(dir);
    with_state(|s| {
        s.watched.remove(&dir);
        s.faults.retain(|f| f.dir != dir);
    });
}

fn entries(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_file()) {
            out.push((entry.file_name().to_string_lossy().into_owned(), entry.path()));
        }
    }
    out
}

/// Rewrites `dir` to what the model says survived a power loss, and keeps
/// watching it (the rewritten state is durable).
pub(crate) fn power_loss(dir: &Path) {
    let dir = canonical(dir);
    let watched = with_state(|s| s.watched.remove(&dir)).expect("power_loss on a directory that is not watched");
    if !watched.entry_durable {
        // Its entry in the parent never reached the disk: it is gone.
        if dir.exists() {
            std::fs::remove_dir_all(&dir).unwrap();
        }
        watch_new(&dir);
        return;
    }
    for (_, path) in entries(&dir) {
        std::fs::remove_file(&path).unwrap();
    }
    for (name, ino) in &watched.names {
        let data = watched.images.get(ino).map_or(&[][..], Vec::as_slice);
        std::fs::write(dir.join(name), data).unwrap();
    }
    watch(&dir);
}

fn take_fault(file: &File, op: Op) -> std::io::Result<()> {
    if !ACTIVE.load(Ordering::SeqCst) {
        return Ok(());
    }
    let Some(path) = path_of(file) else { return Ok(()) };
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else { return Ok(()) };
    let name = name.to_string_lossy();
    let hit = with_state(|s| {
        fire(&mut s.faults, |f| {
            f.op == op && f.dir == dir && f.name_contains.as_deref().is_none_or(|n| name.contains(n))
        })
    });
    injected(hit)
}

/// Spends one shot of the first armed fault that `hits`, taking its hook:
/// `None` when none hits.
fn fire(faults: &mut Vec<Fault>, hits: impl Fn(&Fault) -> bool) -> Option<Option<AfterFault>> {
    let fault = faults.iter_mut().find(|f| hits(f))?;
    fault.remaining -= 1;
    let then = fault.then.take();
    faults.retain(|f| f.remaining > 0);
    Some(then)
}

/// EIO when a fault fired (after running its hook), else success.
fn injected(hit: Option<Option<AfterFault>>) -> std::io::Result<()> {
    match hit {
        Some(then) => {
            if let Some(then) = then {
                then();
            }
            Err(std::io::Error::from_raw_os_error(libc::EIO))
        }
        None => Ok(()),
    }
}

/// Called before `path` is unlinked or renamed over: its inode's durable
/// image stays with the names that still point at it durably (a power loss
/// may bring such a name back, with that content), but no longer with the
/// inode number, which the file system may give to a new file.
pub(crate) fn before_unlink(path: &Path) {
    if !ACTIVE.load(Ordering::SeqCst) {
        return;
    }
    let (Ok(meta), Some(dir)) = (std::fs::symlink_metadata(path), path.parent()) else { return };
    let dir = canonical(dir);
    let ino = meta.ino();
    with_state(|s| {
        let key = u64::MAX - s.detached;
        let Some(w) = s.watched.get_mut(&dir) else { return };
        s.detached += 1;
        if let Some(image) = w.images.remove(&ino) {
            w.images.insert(key, image);
        }
        if w.poisoned.remove(&ino) {
            w.poisoned.insert(key);
        }
        for v in w.names.values_mut() {
            if *v == ino {
                *v = key;
            }
        }
    });
}

/// Called before a directory fsync; fails when a `DirFsync` fault is armed
/// for that directory (then its entries changed since the last successful
/// directory fsync stay as a power loss would leave them).
pub(crate) fn before_sync_dir(dir: &Path) -> std::io::Result<()> {
    if !ACTIVE.load(Ordering::SeqCst) {
        return Ok(());
    }
    let dir = canonical(dir);
    let hit = with_state(|s| fire(&mut s.faults, |f| f.op == Op::DirFsync && f.dir == dir));
    injected(hit)
}

/// Like [`power_loss`], but each file whose durable name points at a live
/// inode also keeps a prefix of what was written to it since its last
/// fsync, of a length drawn from `seed`: writes reach the disk in part, in
/// file order (a torn write), not only all or nothing.
pub(crate) fn power_loss_torn(dir: &Path, seed: u64) {
    let dir = canonical(dir);
    let mut rng = seed | 1;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let torn: Vec<(String, Vec<u8>)> = with_state(|s| {
        let Some(w) = s.watched.get_mut(&dir) else { return Vec::new() };
        let mut out = Vec::new();
        for (name, key) in &w.names {
            let path = dir.join(name);
            let live = std::fs::metadata(&path).is_ok_and(|m| m.ino() == *key);
            if !live || w.poisoned.contains(key) {
                continue;
            }
            let Ok(now) = std::fs::read(&path) else { continue };
            let image = w.images.get(key).cloned().unwrap_or_default();
            let keep = usize::try_from(next() % (now.len() as u64 + 1)).unwrap_or(0);
            let mut data = now[..keep].to_vec();
            if image.len() > keep {
                data.extend_from_slice(&image[keep..]);
            }
            out.push((name.clone(), data));
        }
        out
    });
    with_state(|s| {
        if let Some(w) = s.watched.get_mut(&dir) {
            for (name, data) in torn {
                let key = w.names[&name];
                w.images.insert(key, data);
            }
        }
    });
    power_loss(&dir);
}

/// Called before a data write; fails when a write fault is armed.
pub(crate) fn before_write(file: &File) -> std::io::Result<()> {
    take_fault(file, Op::Write)
}

/// Called before an fsync; fails when an fsync fault is armed, and then the
/// file's unsynced data is lost for good, as on Linux.
pub(crate) fn before_sync(file: &File) -> std::io::Result<()> {
    let result = take_fault(file, Op::Fsync);
    if result.is_err()
        && let (Some(path), Ok(meta)) = (path_of(file), file.metadata())
        && let Some(dir) = path.parent()
    {
        with_state(|s| {
            if let Some(w) = s.watched.get_mut(dir) {
                w.poisoned.insert(meta.ino());
            }
        });
    }
    result
}

/// Called after a successful fsync: records the file's durable image.
pub(crate) fn after_sync(file: &File) {
    if !ACTIVE.load(Ordering::SeqCst) {
        return;
    }
    let (Some(path), Ok(meta)) = (path_of(file), file.metadata()) else { return };
    let Some(dir) = path.parent() else { return };
    let watching = with_state(|s| s.watched.get(dir).is_some_and(|w| !w.poisoned.contains(&meta.ino())));
    if !watching {
        return;
    }
    // Read by path: the descriptor may be write-only.
    let Ok(data) = std::fs::read(&path) else { return };
    with_state(|s| {
        if let Some(w) = s.watched.get_mut(dir) {
            w.images.insert(meta.ino(), data);
        }
    });
}

/// Called after a successful directory fsync: records its names.
pub(crate) fn after_sync_dir(dir: &Path) {
    if !ACTIVE.load(Ordering::SeqCst) {
        return;
    }
    let dir = canonical(dir);
    let names: BTreeMap<String, u64> = entries(&dir)
        .into_iter()
        .filter_map(|(name, path)| std::fs::metadata(&path).ok().map(|m| (name, m.ino())))
        .collect();
    with_state(|s| {
        if let Some(w) = s.watched.get_mut(&dir) {
            w.names = names;
        }
        for (child, w) in &mut s.watched {
            if child.parent() == Some(dir.as_path()) && child.is_dir() {
                w.entry_durable = true;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn fsync(f: &File) {
        before_sync(f).unwrap();
        f.sync_all().unwrap();
        after_sync(f);
    }

    #[test]
    fn power_loss_keeps_only_fsynced_contents_and_names() {
        let dir = tempfile::tempdir().unwrap();
        watch(dir.path());
        let mut a = File::create(dir.path().join("a")).unwrap();
        a.write_all(b"one").unwrap();
        fsync(&a);
        crate::storage::fs::sync_dir(dir.path()).unwrap();
        a.write_all(b" two").unwrap(); // never synced
        File::create(dir.path().join("b")).unwrap(); // entry never synced
        power_loss(dir.path());
        assert_eq!(std::fs::read(dir.path().join("a")).unwrap(), b"one");
        assert!(!dir.path().join("b").exists());
        forget(dir.path());
    }

    #[test]
    fn a_failed_fsync_loses_the_data_even_if_the_next_one_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        watch(dir.path());
        let mut a = File::create(dir.path().join("a")).unwrap();
        crate::storage::fs::sync_dir(dir.path()).unwrap();
        a.write_all(b"lost").unwrap();
        fail_next(dir.path(), Op::Fsync, None, 1);
        assert!(before_sync(&a).is_err());
        fsync(&a);
        power_loss(dir.path());
        assert_eq!(std::fs::read(dir.path().join("a")).unwrap(), b"");
        forget(dir.path());
    }

    #[test]
    fn a_torn_power_loss_keeps_a_prefix_of_the_unsynced_writes() {
        let mut kept = HashSet::new();
        for seed in 1..=16u64 {
            let dir = tempfile::tempdir().unwrap();
            watch(dir.path());
            let mut a = File::create(dir.path().join("a")).unwrap();
            a.write_all(b"one").unwrap();
            fsync(&a);
            crate::storage::fs::sync_dir(dir.path()).unwrap();
            a.write_all(b" two three").unwrap();
            power_loss_torn(dir.path(), seed);
            let now = std::fs::read(dir.path().join("a")).unwrap();
            assert!(b"one two three".starts_with(&now) && now.len() >= 3, "seed {seed}: {now:?}");
            kept.insert(now.len());
            forget(dir.path());
        }
        assert!(kept.iter().any(|&n| n > 3 && n < 13), "some writes were torn part way: {kept:?}");
    }

    #[test]
    fn a_new_file_never_inherits_an_unlinked_files_image() {
        let dir = tempfile::tempdir().unwrap();
        watch(dir.path());
        for round in 0..20 {
            let old = dir.path().join(format!("old{round}"));
            let mut a = File::create(&old).unwrap();
            a.write_all(b"old contents").unwrap();
            fsync(&a);
            drop(a);
            crate::storage::fs::sync_dir(dir.path()).unwrap();
            crate::storage::fs::remove_if_exists(&old).unwrap();
            let new = dir.path().join(format!("new{round}"));
            File::create(&new).unwrap().write_all(b"unsynced").unwrap();
            crate::storage::fs::sync_dir(dir.path()).unwrap();
        }
        power_loss(dir.path());
        for round in 0..20 {
            assert_eq!(std::fs::read(dir.path().join(format!("new{round}"))).unwrap(), b"", "round {round}");
        }
        forget(dir.path());
    }

    #[test]
    fn a_directory_never_fsynced_in_its_parent_vanishes() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("p");
        watch_new(&dir);
        std::fs::create_dir(&dir).unwrap();
        let a = File::create(dir.join("a")).unwrap();
        fsync(&a);
        crate::storage::fs::sync_dir(&dir).unwrap();
        power_loss(&dir);
        assert!(!dir.exists());
        forget(&dir);
    }
}
