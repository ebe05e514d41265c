//! Runs `tally serve` as a child process on a free port, for benchmarks and
//! process-level tests.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// A `tally serve` child; killed when dropped.
#[derive(Debug)]
pub struct BrokerProcess {
    child: Child,
    /// `host:port` it listens on.
    pub address: String,
    /// `host:port` of its metrics endpoint, when it serves one.
    pub metrics_address: Option<String>,
}

impl BrokerProcess {
    /// Starts `binary serve --listen 127.0.0.1:0 --data-dir DIR` with extra
    /// `args`, and waits (up to 30 s) for it to print its address.
    pub fn start(binary: &Path, data_dir: &Path, args: &[&str]) -> anyhow::Result<BrokerProcess> {
        Self::start_with_env(binary, data_dir, args, &[])
    }

    /// [`BrokerProcess::start`] with extra environment variables (config
    /// overrides such as `TALLY_RETENTION_CHECK_INTERVAL_MS`).
    pub fn start_with_env(
        binary: &Path,
        data_dir: &Path,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> anyhow::Result<BrokerProcess> {
        Self::start_listening(binary, data_dir, "127.0.0.1:0", args, envs)
    }

    /// [`BrokerProcess::start_with_env`] listening on `listen` (a cluster's
    /// voters must know each other's addresses before they start).
    pub fn start_listening(
        binary: &Path,
        data_dir: &Path,
        listen: &str,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> anyhow::Result<BrokerProcess> {
        Self::start_labeled(binary, data_dir, listen, args, envs, "broker")
    }

    /// [`BrokerProcess::start_listening`], its log lines on our stderr
    /// prefixed with `[label]`.
    pub fn start_labeled(
        binary: &Path,
        data_dir: &Path,
        listen: &str,
        args: &[&str],
        envs: &[(&str, &str)],
        label: &str,
    ) -> anyhow::Result<BrokerProcess> {
        let mut child = Command::new(binary)
            .arg("serve")
            .arg("--listen")
            .arg(listen)
            .arg("--data-dir")
            .arg(data_dir)
            .args(args)
            .env("TALLY_LOG", "warn")
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let stderr = child.stderr.take().context("no stderr")?;
        let (tx, rx) = std::sync::mpsc::channel();
        let label = label.to_string();
        std::thread::spawn(move || {
            let mut sent = false;
            let mut metrics = None;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if !sent && let Some(addr) = line.strip_prefix("tally metrics listening on ") {
                    metrics = Some(addr.trim().to_string());
                } else if !sent && let Some(addr) = line.strip_prefix("tally broker listening on ") {
                    let _ = tx.send((addr.trim().to_string(), metrics.take()));
                    sent = true;
                } else {
                    eprintln!("[{label}] {line}");
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let (address, metrics_address) = loop {
            if let Ok(a) = rx.recv_timeout(Duration::from_millis(100)) {
                break a;
            }
            if let Some(status) = child.try_wait()? {
                bail!("broker exited early: {status}");
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("broker did not start within 30 s");
            }
        };
        Ok(BrokerProcess { child, address, metrics_address })
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How the process ended, if it has.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Freezes the process (SIGSTOP), as a stalled machine would be.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Lets a paused process run again (SIGCONT).
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, signal: i32) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: signalling our own child, which we have not yet reaped.
            unsafe { libc::kill(pid, signal) };
        }
    }

    /// Sends SIGTERM and waits for a clean exit (up to 30 s).
    pub fn stop(mut self) -> anyhow::Result<std::process::ExitStatus> {
        let pid = i32::try_from(self.child.id()).context("pid out of range")?;
        // SAFETY: signalling our own child, which we have not yet reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                bail!("broker did not stop within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `VmRSS` of a process (anonymous and mapped file pages) in KiB, from /proc.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// `RssAnon` of a process in KiB, from /proc.
pub fn rss_anon_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("RssAnon:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
