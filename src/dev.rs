//! `tally dev`: a local cluster of `tally serve` child processes, one per
//! broker (so one can die without the others), supervised by the `tally dev`
//! process, which other `tally dev` commands steer through a Unix socket in
//! the data directory (kill, restart, pause, resume, status).
//!
//! The data directory holds `dev.lock` (held while a cluster runs there, so
//! a second `tally dev` on it is refused), `dev.sock` (the control socket),
//! and one subdirectory per broker.

use std::fs::File;
use std::io::Read as _;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use crate::child::BrokerProcess;

/// The control socket's file name in the data directory.
pub const SOCKET: &str = "dev.sock";
const LOCK: &str = "dev.lock";
/// Settings of the dev brokers: a dead broker is noticed in 4 s instead
/// of Kafka's 9 (so a user sees a leader move soon after `kill`), and the
/// terminal shows warnings without the Raft library's routine ones.
const DEV_ENV: &[(&str, &str)] = &[
    ("TALLY_BROKER_SESSION_TIMEOUT_MS", "4000"),
    ("TALLY_BROKER_HEARTBEAT_INTERVAL_MS", "500"),
    ("TALLY_LOG", "warn,openraft=error"),
];
/// Largest control request or answer line.
const MAX_LINE: usize = 64 << 10;

/// How to run the dev cluster.
#[derive(Debug, Clone)]
pub struct DevOptions {
    /// The `tally` binary to run for each broker.
    pub binary: PathBuf,
    /// Brokers, all controller voters.
    pub brokers: u32,
    /// First broker's address; the others take the next ports (port 0:
    /// free ports).
    pub listen: SocketAddr,
    /// First broker's metrics address, the others on the next ports (port
    /// 0: free ports); `None`: no metrics.
    pub metrics_listen: Option<SocketAddr>,
    /// Data directory (one subdirectory per broker).
    pub data_dir: PathBuf,
    /// Wipe the brokers' data first.
    pub fresh: bool,
}

/// What a control request asks of the supervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// SIGKILL a broker.
    Kill,
    /// Stop a broker if it runs (SIGTERM), then start it again.
    Restart,
    /// Freeze a broker (SIGSTOP).
    Pause,
    /// Unfreeze a broker (SIGCONT).
    Resume,
}

impl Action {
    fn name(self) -> &'static str {
        match self {
            Action::Kill => "kill",
            Action::Restart => "restart",
            Action::Pause => "pause",
            Action::Resume => "resume",
        }
    }

    fn parse(s: &str) -> Option<Action> {
        Some(match s {
            "kill" => Action::Kill,
            "restart" => Action::Restart,
            "pause" => Action::Pause,
            "resume" => Action::Resume,
            _ => return None,
        })
    }
}

/// One broker of the dev cluster as its supervisor knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerSlot {
    /// Node id.
    pub id: u32,
    /// gRPC address.
    pub address: String,
    /// Metrics address, when served.
    pub metrics: Option<String>,
    /// Process id while it runs.
    pub pid: Option<u32>,
    /// `running`, `paused`, `killed`, `stopped` or `exited (STATUS)`.
    pub state: String,
}

impl BrokerSlot {
    fn to_json(&self) -> Value {
        json!({"id": self.id, "address": self.address, "metrics": self.metrics, "pid": self.pid, "state": self.state})
    }

    fn from_json(v: &Value) -> Option<BrokerSlot> {
        Some(BrokerSlot {
            id: u32::try_from(v["id"].as_u64()?).ok()?,
            address: v["address"].as_str()?.to_string(),
            metrics: v["metrics"].as_str().map(str::to_string),
            pid: v["pid"].as_u64().and_then(|p| u32::try_from(p).ok()),
            state: v["state"].as_str()?.to_string(),
        })
    }
}

struct Broker {
    id: u32,
    listen: String,
    metrics_listen: Option<String>,
    metrics: Option<String>,
    process: Option<BrokerProcess>,
    paused: bool,
    /// Why it is not running.
    down: &'static str,
}

impl Broker {
    fn slot(&self) -> BrokerSlot {
        let state = match (&self.process, self.paused) {
            (Some(_), true) => "paused".to_string(),
            (Some(_), false) => "running".to_string(),
            (None, _) => self.down.to_string(),
        };
        BrokerSlot {
            id: self.id,
            address: self.listen.clone(),
            metrics: self.metrics.clone(),
            pid: self.process.as_ref().map(BrokerProcess::pid),
            state,
        }
    }
}

/// The running dev cluster: its brokers, the data directory's lock, and the
/// control socket.
pub struct DevCluster {
    options: DevOptions,
    brokers: Vec<Broker>,
    voters: String,
    _lock: File,
    control: Option<UnixListener>,
}

/// A control request and where its answer goes.
type Request = (Value, oneshot::Sender<Value>);

impl DevCluster {
    /// Takes the data directory (refused while another dev cluster holds
    /// it), wipes it with `fresh`, and starts every broker.
    pub async fn start(options: DevOptions) -> anyhow::Result<DevCluster> {
        anyhow::ensure!((1..=9).contains(&options.brokers), "--brokers takes 1 to 9, not {}", options.brokers);
        std::fs::create_dir_all(&options.data_dir)
            .with_context(|| format!("cannot create the data directory {}", options.data_dir.display()))?;
        let lock = take_lock(&options.data_dir)?;
        if options.fresh {
            wipe(&options.data_dir)?;
        }
        let listens = addresses(options.listen, options.brokers)?;
        let metrics = match options.metrics_listen {
            Some(m) => addresses(m, options.brokers)?.into_iter().map(Some).collect(),
            None => vec![None; options.brokers as usize],
        };
        let voters = listens.iter().enumerate().map(|(i, a)| format!("{}@{a}", i + 1)).collect::<Vec<_>>().join(",");
        let socket = options.data_dir.join(SOCKET);
        // Held lock: a socket file left here belongs to a cluster that died.
        let _ = std::fs::remove_file(&socket);
        let control = UnixListener::bind(&socket)
            .with_context(|| format!("cannot open the control socket {}", socket.display()))?;
        let brokers = listens
            .into_iter()
            .zip(metrics)
            .enumerate()
            .map(|(i, (listen, metrics_listen))| Broker {
                id: i as u32 + 1,
                listen,
                metrics_listen,
                metrics: None,
                process: None,
                paused: false,
                down: "stopped",
            })
            .collect();
        let mut cluster = DevCluster { options, brokers, voters, _lock: lock, control: Some(control) };
        let starts = cluster.brokers.iter().map(|b| cluster.spawn(b)).collect::<Vec<_>>();
        for (b, started) in cluster.brokers.iter_mut().zip(futures_util::future::join_all(starts).await) {
            let process = started.with_context(|| format!("broker {} did not start on {}", b.id, b.listen))?;
            b.metrics = process.metrics_address.clone();
            b.process = Some(process);
        }
        Ok(cluster)
    }

    /// The brokers' gRPC addresses.
    pub fn addresses(&self) -> Vec<String> {
        self.brokers.iter().map(|b| b.listen.clone()).collect()
    }

    /// The brokers' metrics addresses (those that serve them).
    pub fn metrics_addresses(&self) -> Vec<String> {
        self.brokers.iter().filter_map(|b| b.metrics.clone()).collect()
    }

    /// The brokers as they are now.
    pub fn slots(&self) -> Vec<BrokerSlot> {
        self.brokers.iter().map(Broker::slot).collect()
    }

    fn spawn(&self, b: &Broker) -> impl std::future::Future<Output = anyhow::Result<BrokerProcess>> + use<> {
        let binary = self.options.binary.clone();
        let dir = self.options.data_dir.join(b.id.to_string());
        let mut args = vec!["--node-id".to_string(), b.id.to_string(), "--voters".to_string(), self.voters.clone()];
        if let Some(m) = &b.metrics_listen {
            args.extend(["--metrics-listen".to_string(), m.clone()]);
        }
        let listen = b.listen.clone();
        let label = format!("broker {}", b.id);
        async move {
            tokio::task::spawn_blocking(move || {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                BrokerProcess::start_labeled(&binary, &dir, &listen, &args, DEV_ENV, &label)
            })
            .await?
        }
    }

    /// Serves control requests until `shutdown` completes, then stops every
    /// broker (SIGTERM, a clean shutdown) and removes the control socket.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
        let (tx, mut requests) = mpsc::channel::<Request>(16);
        let control = self.control.take().context("the dev cluster runs once")?;
        let accept = tokio::spawn(accept_control(control, tx));
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                Some((request, reply)) = requests.recv() => {
                    let answer = self.handle(&request).await;
                    let _ = reply.send(answer);
                }
                _ = tick.tick() => self.notice_exits(),
            }
        }
        accept.abort();
        let _ = std::fs::remove_file(self.options.data_dir.join(SOCKET));
        self.stop_all().await;
        Ok(())
    }

    /// Reports brokers that ended without being told to.
    fn notice_exits(&mut self) {
        for b in &mut self.brokers {
            if let Some(status) = b.process.as_mut().and_then(BrokerProcess::exited) {
                eprintln!("broker {} exited by itself ({status}); `tally dev restart {}` starts it again", b.id, b.id);
                b.process = None;
                b.paused = false;
                b.down = "exited";
            }
        }
    }

    async fn handle(&mut self, request: &Value) -> Value {
        let op = request["op"].as_str().unwrap_or_default();
        if op == "status" {
            self.notice_exits();
            return json!({"ok": true, "brokers": self.slots().iter().map(BrokerSlot::to_json).collect::<Vec<_>>()});
        }
        let Some(action) = Action::parse(op) else {
            return json!({"ok": false, "message": format!("unknown request `{op}`")});
        };
        let id = request["broker"].as_u64().unwrap_or(0);
        let Some(index) = self.brokers.iter().position(|b| u64::from(b.id) == id) else {
            let ids = self.brokers.iter().map(|b| b.id.to_string()).collect::<Vec<_>>().join(", ");
            return json!({"ok": false, "message": format!("there is no broker {id}: this dev cluster has brokers {ids}")});
        };
        match self.act(index, action).await {
            Ok(message) => json!({"ok": true, "message": message}),
            Err(e) => json!({"ok": false, "message": format!("{e:#}")}),
        }
    }

    async fn act(&mut self, index: usize, action: Action) -> anyhow::Result<String> {
        self.notice_exits();
        let id = self.brokers[index].id;
        match action {
            Action::Kill => {
                let b = &mut self.brokers[index];
                let Some(process) = b.process.take() else { bail!("broker {id} is not running") };
                let pid = process.pid();
                // Dropping it kills (SIGKILL) and reaps it.
                tokio::task::spawn_blocking(move || drop(process)).await?;
                b.paused = false;
                b.down = "killed";
                Ok(format!("killed broker {id} (pid {pid}, SIGKILL)"))
            }
            Action::Pause | Action::Resume => {
                let pause = action == Action::Pause;
                let b = &mut self.brokers[index];
                let Some(process) = &b.process else { bail!("broker {id} is not running") };
                if b.paused == pause {
                    return Ok(format!("broker {id} is already {}", if pause { "paused" } else { "running" }));
                }
                if pause {
                    process.pause()
                } else {
                    process.resume()
                }
                b.paused = pause;
                let (done, signal) = if pause { ("paused", "SIGSTOP") } else { ("resumed", "SIGCONT") };
                Ok(format!("{done} broker {id} (pid {}, {signal})", process.pid()))
            }
            Action::Restart => {
                let b = &mut self.brokers[index];
                if let Some(process) = b.process.take() {
                    if b.paused {
                        process.resume();
                    }
                    tokio::task::spawn_blocking(move || process.stop()).await??;
                }
                b.paused = false;
                b.down = "stopped";
                let started = self.spawn(&self.brokers[index]).await?;
                let b = &mut self.brokers[index];
                let pid = started.pid();
                b.metrics = started.metrics_address.clone();
                b.process = Some(started);
                Ok(format!("restarted broker {id} (pid {pid}) on {}", b.listen))
            }
        }
    }

    /// Lets paused brokers run, then stops every broker cleanly (SIGTERM),
    /// all at once.
    async fn stop_all(&mut self) {
        let stops = self.brokers.iter_mut().filter_map(|b| b.process.take().map(|p| (b.id, b.paused, p))).map(
            |(id, paused, p)| async move {
                if paused {
                    p.resume();
                }
                match tokio::task::spawn_blocking(move || p.stop()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => eprintln!("broker {id}: {e:#}"),
                    Err(e) => eprintln!("broker {id}: {e}"),
                }
            },
        );
        futures_util::future::join_all(stops).await;
    }
}

async fn accept_control(listener: UnixListener, requests: mpsc::Sender<Request>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let requests = requests.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            let mut reader = BufReader::new(read).take(MAX_LINE as u64);
            if reader.read_line(&mut line).await.is_err() {
                return;
            }
            let answer = match serde_json::from_str::<Value>(&line) {
                Ok(request) => {
                    let (tx, rx) = oneshot::channel();
                    if requests.send((request, tx)).await.is_err() {
                        return;
                    }
                    rx.await.unwrap_or_else(|_| json!({"ok": false, "message": "the dev cluster is stopping"}))
                }
                Err(e) => json!({"ok": false, "message": format!("bad request: {e}")}),
            };
            let _ = write.write_all(format!("{answer}\n").as_bytes()).await;
        });
    }
}

/// Sends one request to the dev cluster running on `data_dir` and returns
/// its answer; the error says when none runs there.
pub async fn request(data_dir: &Path, request: Value) -> anyhow::Result<Value> {
    let socket = data_dir.join(SOCKET);
    let stream = UnixStream::connect(&socket).await.map_err(|e| {
        anyhow::anyhow!(
            "no dev cluster is running on {} ({e}); start one with `tally dev` (or pass the --data-dir it uses)",
            data_dir.display()
        )
    })?;
    let (read, mut write) = stream.into_split();
    write.write_all(format!("{request}\n").as_bytes()).await?;
    let mut line = String::new();
    // A restart stops the broker (up to 30 s) and starts it (up to 30 s).
    tokio::time::timeout(Duration::from_secs(90), BufReader::new(read).take(MAX_LINE as u64).read_line(&mut line))
        .await
        .context("the dev cluster did not answer within 90 s")??;
    let answer: Value = serde_json::from_str(&line).context("the dev cluster's answer is not JSON")?;
    if answer["ok"].as_bool() != Some(true) {
        bail!("{}", answer["message"].as_str().unwrap_or("refused"));
    }
    Ok(answer)
}

/// Asks the dev cluster on `data_dir` to act on broker `id`; its message.
pub async fn act(data_dir: &Path, action: Action, id: u32) -> anyhow::Result<String> {
    let answer = request(data_dir, json!({"op": action.name(), "broker": id})).await?;
    Ok(answer["message"].as_str().unwrap_or_default().to_string())
}

/// The brokers of the dev cluster on `data_dir`.
pub async fn slots(data_dir: &Path) -> anyhow::Result<Vec<BrokerSlot>> {
    let answer = request(data_dir, json!({"op": "status"})).await?;
    let brokers = answer["brokers"].as_array().context("no brokers in the answer")?;
    brokers.iter().map(|b| BrokerSlot::from_json(b).context("a broker entry is malformed")).collect()
}

/// `count` addresses from `first`: the next ports, or free ports when
/// `first` has port 0.
fn addresses(first: SocketAddr, count: u32) -> anyhow::Result<Vec<String>> {
    (0..count)
        .map(|i| {
            let mut at = first;
            if at.port() == 0 {
                let probe = std::net::TcpListener::bind(at).with_context(|| format!("cannot bind {at}"))?;
                at = probe.local_addr()?;
            } else {
                let port = at.port().checked_add(i as u16).context("port out of range")?;
                at.set_port(port);
            }
            Ok(at.to_string())
        })
        .collect()
}

/// Locks `dir/dev.lock` for as long as the returned file is open; refused,
/// with the holder's pid, while another dev cluster runs there.
fn take_lock(dir: &Path) -> anyhow::Result<File> {
    let path = dir.join(LOCK);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: flock on a descriptor we own and keep open.
    let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
    if !locked {
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        bail!(
            "a dev cluster is already running on {} (pid {}): stop it with Ctrl-C in its terminal, \
             steer it with `tally dev status|kill|restart|pause|resume`, or pass another --data-dir",
            dir.display(),
            holder.trim()
        );
    }
    file.set_len(0)?;
    std::io::Write::write_all(&mut file, std::process::id().to_string().as_bytes())?;
    Ok(file)
}

/// Removes every broker's data (the numbered subdirectories) under `dir`;
/// refused while a broker process still holds one (a broker left running
/// by a supervisor that was killed holds its directory's `.lock`).
fn wipe(dir: &Path) -> anyhow::Result<()> {
    let mut brokers = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() && entry.file_name().to_string_lossy().parse::<u32>().is_ok() {
            brokers.push(entry.path());
        }
    }
    for broker in &brokers {
        let lock = broker.join(".lock");
        let Ok(file) = File::open(&lock) else { continue };
        // SAFETY: flock on a descriptor we own; released when `file` drops.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            bail!(
                "a broker still runs on {} (its .lock is held): stop it before --fresh wipes its data",
                broker.display()
            );
        }
    }
    for broker in brokers {
        std::fs::remove_dir_all(&broker).with_context(|| format!("cannot wipe {}", broker.display()))?;
    }
    Ok(())
}

/// Waits until `f` holds, polling every 100 ms, up to `limit`.
pub async fn wait_until(limit: Duration, mut f: impl AsyncFnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}
