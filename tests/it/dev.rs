//! `tally dev`: a cluster of child processes a user breaks by hand: kill a
//! leader and see it move, restart it and see it rejoin the ISR, pause and
//! resume, bad broker ids, a second `tally dev` on the same data directory,
//! and Ctrl-C stopping every broker.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

fn tally(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tally")).args(args).stdin(Stdio::null()).output().expect("run tally")
}

/// `tally dev --data-dir DIR ARGS --output json`, parsed.
fn dev_json(dir: &Path, args: &[&str]) -> Value {
    let dir = dir.to_str().unwrap();
    let mut all = vec!["--output", "json", "dev", "--data-dir", dir];
    all.extend_from_slice(args);
    let out = tally(&all);
    assert!(out.status.success(), "tally dev {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("json")
}

fn dev(dir: &Path, args: &[&str]) -> std::process::Output {
    let mut all = vec!["dev", "--data-dir", dir.to_str().unwrap()];
    all.extend_from_slice(args);
    tally(&all)
}

/// The running supervisor and the lines it printed up to its banner.
struct Supervisor {
    child: Child,
    bootstrap: String,
    metrics: Vec<String>,
}

impl Supervisor {
    fn start(dir: &Path) -> Supervisor {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(["dev", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--fresh", "--data-dir"])
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tally dev");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut banner = Vec::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.starts_with("bootstrap: ") || line.starts_with("metrics: ") {
                    banner.push(line.clone());
                }
                if line.starts_with("Ctrl-C stops them all") {
                    let _ = tx.send(std::mem::take(&mut banner));
                }
            }
        });
        let banner = rx.recv_timeout(Duration::from_secs(90)).expect("tally dev printed its banner");
        let field = |prefix: &str| banner.iter().find_map(|l| l.strip_prefix(prefix)).unwrap_or_default().to_string();
        let bootstrap = field("bootstrap: ");
        let metrics = field("metrics: ").split_whitespace().map(str::to_string).collect();
        Supervisor { child, bootstrap, metrics }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn brokers(status: &Value) -> Vec<(u64, String, Option<u64>)> {
    status["brokers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["id"].as_u64().unwrap(), b["state"].as_str().unwrap().to_string(), b["pid"].as_u64()))
        .collect()
}

fn partition(status: &Value, topic: &str, index: u64) -> Option<(Option<u64>, usize)> {
    status["partitions"]
        .as_array()?
        .iter()
        .find(|p| p["topic"] == topic && p["partition"] == index)
        .map(|p| (p["leader"].as_u64(), p["isr"].as_array().map_or(0, Vec::len)))
}

fn wait(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    false
}

fn alive(pid: u64) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

#[test]
fn a_dev_cluster_fails_over_when_a_broker_is_killed_and_the_broker_rejoins_on_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut supervisor = Supervisor::start(dir.path());
    assert_eq!(supervisor.bootstrap.split(',').count(), 3, "three brokers: {}", supervisor.bootstrap);
    assert_eq!(supervisor.metrics.len(), 3, "a metrics endpoint per broker");

    let status = dev_json(dir.path(), &["status"]);
    let listed = brokers(&status);
    assert_eq!(listed.iter().map(|b| b.0).collect::<Vec<_>>(), [1, 2, 3]);
    assert!(listed.iter().all(|b| b.1 == "running" && b.2.is_some()), "{listed:?}");
    let pids: Vec<u64> = listed.iter().filter_map(|b| b.2).collect();
    let (leader, isr) = partition(&status, "demo", 0).expect("demo/0 listed");
    let leader = leader.expect("demo/0 has a leader");
    assert_eq!(isr, 3);

    // A second cluster on the same data directory is refused, naming why.
    let second = dev(dir.path(), &["--listen", "127.0.0.1:0", "--no-metrics"]);
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("already running"), "{second:?}");

    // A broker that does not exist is named as such, with those that do.
    let bad = dev(dir.path(), &["kill", "7"]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("there is no broker 7: this dev cluster has brokers 1, 2, 3")
    );

    // Kill demo/0's leader: another replica takes over, and the ISR shrinks.
    let killed = dev(dir.path(), &["kill", &leader.to_string()]);
    assert!(killed.status.success(), "{killed:?}");
    let moved = wait(Duration::from_secs(40), || {
        let s = dev_json(dir.path(), &["status"]);
        matches!(partition(&s, "demo", 0), Some((Some(l), 2)) if l != leader)
    });
    assert!(moved, "demo/0's leadership moved off the killed broker {leader}");
    let s = dev_json(dir.path(), &["status"]);
    assert!(brokers(&s).iter().any(|b| b.0 == leader && b.1 == "killed" && b.2.is_none()));

    // Restart it: it runs again and rejoins demo/0's ISR.
    let restarted = dev(dir.path(), &["restart", &leader.to_string()]);
    assert!(restarted.status.success(), "{restarted:?}");
    let rejoined = wait(Duration::from_secs(60), || {
        let s = dev_json(dir.path(), &["status"]);
        matches!(partition(&s, "demo", 0), Some((Some(_), 3)))
    });
    assert!(rejoined, "the restarted broker rejoined demo/0's ISR");

    // Pause and resume another broker.
    let other = if leader == 1 { 2 } else { 1 };
    assert!(dev(dir.path(), &["pause", &other.to_string()]).status.success());
    let s = dev_json(dir.path(), &["status"]);
    assert!(brokers(&s).iter().any(|b| b.0 == other && b.1 == "paused"));
    assert!(dev(dir.path(), &["resume", &other.to_string()]).status.success());
    let s = dev_json(dir.path(), &["status"]);
    assert!(brokers(&s).iter().all(|b| b.1 == "running"), "{:?}", brokers(&s));
    let pids: Vec<u64> = pids.into_iter().chain(brokers(&s).iter().filter_map(|b| b.2)).collect();

    // Ctrl-C stops every broker and the supervisor, cleanly.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(supervisor.child.id() as i32, libc::SIGINT) };
    let stopped = wait(Duration::from_secs(60), || supervisor.child.try_wait().ok().flatten().is_some());
    assert!(stopped, "tally dev exited after SIGINT");
    assert!(supervisor.child.wait().unwrap().success());
    assert!(pids.iter().all(|p| !alive(*p)), "no broker process is left");
    let gone = dev(dir.path(), &["status"]);
    assert!(String::from_utf8_lossy(&gone.stderr).contains("no dev cluster is running"), "{gone:?}");
}

#[test]
fn fresh_refuses_to_wipe_brokers_left_running_by_a_killed_supervisor() {
    let dir = tempfile::tempdir().unwrap();
    let mut supervisor = Supervisor::start(dir.path());
    let pids: Vec<u64> = brokers(&dev_json(dir.path(), &["status"])).iter().filter_map(|b| b.2).collect();
    assert_eq!(pids.len(), 3);
    // SIGKILL reaches the supervisor alone: its brokers keep running.
    supervisor.child.kill().unwrap();
    supervisor.child.wait().unwrap();
    assert!(pids.iter().all(|p| alive(*p)));
    let fresh = dev(dir.path(), &["--fresh", "--listen", "127.0.0.1:0", "--no-metrics"]);
    for pid in &pids {
        // SAFETY: signalling the brokers this test started.
        unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
    }
    assert!(!fresh.status.success());
    let stderr = String::from_utf8_lossy(&fresh.stderr);
    assert!(stderr.contains("a broker still runs on") && stderr.contains("stop it before --fresh"), "{stderr}");
    assert!(dir.path().join("1").join("__cluster_metadata").exists(), "nothing was wiped");
}
