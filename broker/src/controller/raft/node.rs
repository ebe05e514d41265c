//! One controller voter: an openraft node over the metadata log's storage
//! and the gRPC peer network, with a static voter set.
//!
//! Every voter is started with the same voter list; the first start of a
//! voter initializes the cluster with it (doing so on every voter with the
//! same list is what openraft expects), and records the list in
//! `cluster.json` beside the log, so a later start with a different list is
//! refused rather than forming a second cluster.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::error::{ClientWriteError, InitializeError, RaftError};
use openraft::{BasicNode, Raft, ServerState};
use serde::{Deserialize, Serialize};
use tally_proto::internal::v1::controller_api_server::ControllerApiServer;
use tally_proto::internal::v1::controller_raft_server::ControllerRaftServer;

use super::TypeConfig;
use super::api::{ControllerApiService, add_observer, forward_heartbeat, forward_propose};
use super::log_store::LogStore;
use super::network::{MAX_MESSAGE_BYTES, Network, RaftService};
use super::state_machine::{AppliedImage, StateMachine};
use crate::controller::lease::{BrokerLeases, Heartbeat, HeartbeatAnswer, LeaseConfig};
use crate::controller::metadata::{BrokerId, MetadataCommand, MetadataEffect, MetadataError, MetadataImage};
use crate::storage::fs::write_atomic;

const CLUSTER_FILE: &str = "cluster.json";

/// Settings of a controller voter.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// This voter's id; must be one of `voters`.
    pub node_id: BrokerId,
    /// Every voter: id and peer address (`host:port`).
    pub voters: BTreeMap<BrokerId, String>,
    /// Directory of the metadata log, vote and snapshot.
    pub dir: PathBuf,
    /// Leader heartbeat. Also openraft's time limit for each AppendEntries
    /// and for each voter's answer to a leadership check
    /// (`ensure_linearizable`, run on every broker heartbeat). Default 100 ms.
    pub heartbeat_interval_ms: u64,
    /// Time limit for sending a snapshot to a lagging voter. Default 10 s.
    pub install_snapshot_timeout_ms: u64,
    /// Election timeout: a follower that hears from no leader for between
    /// 3/4 of this and all of it starts an election (openraft waits for the
    /// old leader's lease, half of this, plus a random 1/4 to 1/2 of it).
    /// Must exceed 4 heartbeats. Default 1000 ms.
    pub election_timeout_ms: u64,
    /// Entries between snapshots. Default 10,000.
    pub snapshot_every_entries: u64,
    /// How long a proposal may wait for a majority. Default 5 s.
    pub propose_timeout_ms: u64,
    /// Broker sessions, kept by whichever voter leads.
    pub leases: LeaseConfig,
    /// How often the active controller moves leaderships back to preferred
    /// replicas that are in sync (Kafka's auto leader rebalance); 0 never.
    /// Default 30 000 ms.
    pub leader_rebalance_interval_ms: u64,
    /// Local address of connections to other voters and forwarded calls
    /// (the broker's `controller_source_address`), when set.
    pub peer_source_address: Option<std::net::IpAddr>,
    /// This node's own address, which a node that is not a voter (an
    /// observer) gives the leader so the log can be replicated to it.
    pub own_address: String,
}

impl ControllerConfig {
    /// Defaults for everything but the identity and the directory.
    pub fn new(node_id: BrokerId, voters: BTreeMap<BrokerId, String>, dir: PathBuf) -> ControllerConfig {
        ControllerConfig {
            node_id,
            voters,
            dir,
            heartbeat_interval_ms: 100,
            install_snapshot_timeout_ms: 10_000,
            election_timeout_ms: 1000,
            snapshot_every_entries: 10_000,
            propose_timeout_ms: 5000,
            leases: LeaseConfig::default(),
            leader_rebalance_interval_ms: 30_000,
            peer_source_address: None,
            own_address: String::new(),
        }
    }
}

/// Why the controller could not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum ControllerError {
    /// This voter is not the leader; retry at the leader (or, with `None`,
    /// after the election under way).
    #[error("this controller is not the leader{}", .leader.map(|l| format!("; the leader is {l}")).unwrap_or_else(|| "; an election is under way".into()))]
    NotLeader {
        /// The leader, when known.
        leader: Option<BrokerId>,
        /// Its peer address, when known.
        address: Option<String>,
    },
    /// No majority answered in time.
    #[error("no majority of controller voters answered within {timeout_ms} ms")]
    Timeout {
        /// How long it waited.
        timeout_ms: u64,
    },
    /// The command was committed and refused by the state machine.
    #[error(transparent)]
    Refused(#[from] MetadataError),
    /// Settings that cannot work, or disagree with what the directory recorded.
    #[error("controller configuration: {0}")]
    Config(String),
    /// The Raft node stopped (storage failure or shutdown).
    #[error("the controller stopped: {0}")]
    Stopped(String),
}

impl ControllerError {
    /// True when the same request may succeed later or elsewhere.
    pub fn is_retriable(&self) -> bool {
        matches!(self, ControllerError::NotLeader { .. } | ControllerError::Timeout { .. })
    }
}

/// A committed proposal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Committed {
    /// Its index in the metadata log.
    pub index: u64,
    /// What applying it changed.
    pub effects: Vec<MetadataEffect>,
}

/// A voter's replication progress, as the leader sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VoterStatus {
    /// Voter id.
    pub id: BrokerId,
    /// Highest log index known to be on that voter (leader only).
    pub matched_index: Option<u64>,
    /// Entries it is behind the leader's log (leader only).
    pub lag: Option<u64>,
}

/// What a voter knows of the controller quorum.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ControllerStatus {
    /// This voter.
    pub node_id: BrokerId,
    /// The leader, or `None` during an election.
    pub leader: Option<BrokerId>,
    /// Current term.
    pub term: u64,
    /// Highest index applied here (committed entries only are applied).
    pub applied_index: Option<u64>,
    /// Last index in this voter's log.
    pub last_log_index: Option<u64>,
    /// Every voter; progress is known on the leader only.
    pub voters: Vec<VoterStatus>,
}

/// A broker's session heartbeat to the active controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatRequest {
    /// The broker.
    pub broker: BrokerId,
    /// Its incarnation.
    pub incarnation: u64,
    /// The metadata log index of the image it serves from (`None`: it
    /// does not know yet). A fenced broker is unfenced only once this
    /// reaches the controller's committed index as of the first heartbeat
    /// that found it fenced.
    #[serde(default)]
    pub metadata_index: Option<u64>,
    /// True when it is shutting down cleanly and wants to be fenced now.
    pub shutting_down: bool,
    /// True when its image has stayed behind the index the controller's
    /// answers named for a whole session, so it has no lease: it asks to
    /// be fenced, so its leaderships move to brokers that can serve them
    /// (Kafka's `wantFence`). Unfenced again once caught up.
    #[serde(default)]
    pub want_fence: bool,
}

#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
struct ClusterFile {
    voters: BTreeMap<u32, String>,
}

/// How many of a batch of session changes were proposed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Proposed {
    made: usize,
    of: usize,
}

impl Proposed {
    /// How many were dropped because the leadership changed, if any.
    pub(super) fn dropped(self) -> Option<usize> {
        (self.made < self.of).then_some(self.of - self.made)
    }
}

/// Proposes `commands` in order, each only while `still_leading()` holds:
/// a proposal may wait seconds, and a session change decided in a term
/// this voter no longer leads in must not be committed late.
pub(super) async fn propose_while_leading<T, F: std::future::Future<Output = ()>>(
    commands: Vec<T>,
    still_leading: impl Fn() -> bool,
    mut propose: impl FnMut(T) -> F,
) -> Proposed {
    let of = commands.len();
    let mut made = 0;
    for command in commands {
        if !still_leading() {
            break;
        }
        propose(command).await;
        made += 1;
    }
    Proposed { made, of }
}

/// One running controller voter.
#[derive(Clone)]
pub struct Controller {
    raft: Raft<TypeConfig>,
    state_machine: StateMachine,
    node_id: BrokerId,
    voters: BTreeMap<BrokerId, String>,
    propose_timeout: Duration,
    leases: Arc<Mutex<BrokerLeases>>,
    /// The instant the voter's monotonic milliseconds count from.
    epoch: Instant,
    lease_task: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
    /// See [`ControllerConfig::leader_rebalance_interval_ms`].
    config_leader_rebalance_ms: u64,
    /// Connections to the other voters (from `peer_source_address`), for
    /// forwarded calls.
    peers: Arc<crate::peer::PeerConnections>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller").field("node_id", &self.node_id).finish_non_exhaustive()
    }
}

fn check_cluster_file(dir: &Path, voters: &BTreeMap<BrokerId, String>) -> Result<(), ControllerError> {
    let wanted = ClusterFile { voters: voters.iter().map(|(id, a)| (id.0, a.clone())).collect() };
    let path = dir.join(CLUSTER_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let recorded: ClusterFile = serde_json::from_slice(&bytes)
                .map_err(|e| ControllerError::Config(format!("{} is unreadable: {e}", path.display())))?;
            let ids = |f: &ClusterFile| f.voters.keys().copied().collect::<Vec<_>>();
            if ids(&recorded) != ids(&wanted) {
                return Err(ControllerError::Config(format!(
                    "the voters {:?} disagree with the voters {:?} this data directory was created with ({}); \
                     start with the recorded voters",
                    ids(&wanted),
                    ids(&recorded),
                    path.display()
                )));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let json = serde_json::to_vec_pretty(&wanted).map_err(|e| ControllerError::Config(e.to_string()))?;
            write_atomic(&path, &json).map_err(|e| ControllerError::Config(e.to_string()))
        }
        Err(e) => Err(ControllerError::Config(format!("{}: {e}", path.display()))),
    }
}

/// A voter starting with an empty metadata directory asks the other voters
/// whether they know it: if one has this node registered as a broker, the
/// directory was wiped. Such a voter must not join: it forgot its vote and
/// its log, so it could vote twice in one term and help elect a leader
/// without committed metadata. Voters that do not answer (the whole cluster
/// may be starting for the first time) are not waited for.
async fn check_not_wiped(config: &ControllerConfig) -> Result<(), ControllerError> {
    let peers = crate::peer::PeerConnections::new(config.peer_source_address);
    for (id, address) in config.voters.iter().filter(|(id, _)| **id != config.node_id) {
        let asked = super::api::knows_broker(&peers, address, config.node_id);
        if let Ok(Ok(true)) = tokio::time::timeout(Duration::from_secs(2), asked).await {
            return Err(ControllerError::Config(format!(
                "the metadata directory {} is empty, but voter {id} knows broker {} from before: this node's data \
                 directory was wiped or replaced. A voter that lost its log and vote could vote twice in one term \
                 and lose committed metadata, so it is refused; restore the directory (replacing a voter is not \
                 supported yet)",
                config.dir.display(),
                config.node_id
            )));
        }
    }
    Ok(())
}

impl Controller {
    /// Opens the metadata log in `config.dir` and starts the voter. The
    /// first start of each voter initializes the cluster with the voters.
    pub async fn start(config: ControllerConfig) -> Result<Controller, ControllerError> {
        let observer = !config.voters.contains_key(&config.node_id);
        if observer && config.own_address.is_empty() {
            return Err(ControllerError::Config(format!(
                "node {} is not one of the voters {:?} and has no address to follow the metadata log at",
                config.node_id,
                config.voters.keys().map(|b| b.0).collect::<Vec<_>>()
            )));
        }
        if !observer && config.voters.len() > 1 && !config.dir.join(CLUSTER_FILE).exists() {
            check_not_wiped(&config).await?;
        }
        let dir = config.dir.clone();
        let voters = config.voters.clone();
        let (log, state_machine) = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir).map_err(|e| ControllerError::Config(format!("{}: {e}", dir.display())))?;
            check_cluster_file(&dir, &voters)?;
            let log = LogStore::open(&dir).map_err(|e| ControllerError::Stopped(e.to_string()))?;
            let sm = StateMachine::open(&dir).map_err(|e| ControllerError::Stopped(e.to_string()))?;
            Ok::<_, ControllerError>((log, sm))
        })
        .await
        .map_err(|e| ControllerError::Stopped(e.to_string()))??;
        if config.heartbeat_interval_ms == 0 || config.election_timeout_ms / 4 <= config.heartbeat_interval_ms {
            return Err(ControllerError::Config(format!(
                "election_timeout_ms ({}) must exceed 4 x heartbeat_interval_ms ({}), which must be positive",
                config.election_timeout_ms, config.heartbeat_interval_ms
            )));
        }
        // openraft starts an election after the leader lease (its
        // election_timeout_max) plus a random timeout in [min, max).
        let raft_config = openraft::Config {
            cluster_name: "tally".to_string(),
            heartbeat_interval: config.heartbeat_interval_ms,
            election_timeout_min: config.election_timeout_ms / 4,
            election_timeout_max: config.election_timeout_ms / 2,
            install_snapshot_timeout: config.install_snapshot_timeout_ms,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(config.snapshot_every_entries),
            max_in_snapshot_log_to_keep: 1000,
            snapshot_max_chunk_size: (MAX_MESSAGE_BYTES / 4) as u64,
            ..openraft::Config::default()
        }
        .validate()
        .map_err(|e| ControllerError::Config(e.to_string()))?;
        let id = u64::from(config.node_id.0);
        let raft =
            Raft::new(id, Arc::new(raft_config), Network::new(config.peer_source_address), log, state_machine.clone())
                .await
                .map_err(|e| ControllerError::Stopped(e.to_string()))?;
        let initialized = raft.is_initialized().await.map_err(|e| ControllerError::Stopped(e.to_string()))?;
        // An observer is added by the leader as a learner, never initializes.
        if !initialized && !observer {
            let members: BTreeMap<u64, BasicNode> =
                config.voters.iter().map(|(id, addr)| (u64::from(id.0), BasicNode::new(addr))).collect();
            match raft.initialize(members).await {
                Ok(()) | Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {}
                Err(e) => return Err(ControllerError::Stopped(e.to_string())),
            }
        }
        let controller = Controller {
            raft,
            state_machine,
            node_id: config.node_id,
            voters: config.voters,
            propose_timeout: Duration::from_millis(config.propose_timeout_ms),
            leases: Arc::new(Mutex::new(BrokerLeases::new(config.leases))),
            epoch: Instant::now(),
            lease_task: Arc::new(Mutex::new(None)),
            config_leader_rebalance_ms: config.leader_rebalance_interval_ms,
            peers: Arc::new(crate::peer::PeerConnections::new(config.peer_source_address)),
        };
        let sessions = controller.clone().keep_sessions();
        let task = if observer {
            let join = controller.clone().join_as_observer(config.own_address.clone());
            tokio::spawn(async move {
                tokio::join!(join, sessions);
            })
        } else {
            tokio::spawn(sessions)
        };
        *controller.lease_task.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(task);
        Ok(controller)
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn leases(&self) -> std::sync::MutexGuard<'_, BrokerLeases> {
        self.leases.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The term this voter leads in now, if it leads.
    fn leading_term(&self) -> Option<u64> {
        let m = self.raft.metrics();
        let m = m.borrow();
        let me = u64::from(self.node_id.0);
        (m.state == ServerState::Leader && m.current_leader == Some(me)).then_some(m.current_term)
    }

    /// While this voter leads: fences brokers whose session lapsed and
    /// unfences those that came back, four times a second. Sessions belong
    /// to the term they were kept in: a new term (this voter leading again
    /// after losing the leadership, however briefly) starts them afresh
    /// with a whole session of grace, and each proposal is made only while
    /// this voter still leads in the term it was decided in. Runs until the
    /// Raft node stops.
    async fn keep_sessions(self) {
        let mut metrics = self.raft.metrics();
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let rebalance_every = self.config_leader_rebalance_ms;
        let mut rebalanced_ms = self.now_ms();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                changed = metrics.changed() => if changed.is_err() { return },
            }
            let Some(term) = self.leading_term() else {
                self.leases().lost_leadership();
                continue;
            };
            let now = self.now_ms();
            let commands = {
                let mut leases = self.leases();
                if !leases.became_leader(term, now) {
                    continue;
                }
                leases.tick(term, &self.image(), now)
            };
            let still_leading = || self.leading_term() == Some(term) && self.leases().leads_in(term);
            let proposed = propose_while_leading(commands, still_leading, |command| async {
                tracing::info!(?command, "broker session change");
                if let Err(e) = self.propose(command).await {
                    tracing::warn!(error = %e, "could not propose a broker session change");
                }
            })
            .await;
            if let Some(dropped) = proposed.dropped() {
                tracing::info!(
                    term,
                    dropped,
                    "the controller term changed; dropped broker session changes decided in it"
                );
            }
            let now = self.now_ms();
            if rebalance_every > 0 && now.saturating_sub(rebalanced_ms) >= rebalance_every {
                rebalanced_ms = now;
                let off = self.image().preferred_imbalance();
                if off > 0 && self.leading_term() == Some(term) {
                    tracing::info!(partitions = off, "moving leaderships back to their preferred replicas");
                    if let Err(e) = self.propose(MetadataCommand::ElectPreferredLeaders).await {
                        tracing::warn!(error = %e, "could not propose preferred leaders");
                    }
                }
            }
        }
    }

    /// At the leader: adds `id` at `address` as a learner of the metadata
    /// log (an observer broker), unless it already is one.
    pub async fn add_observer_local(&self, id: BrokerId, address: &str) -> Result<(), ControllerError> {
        let status = self.status();
        if status.leader != Some(self.node_id) {
            let address = status.leader.and_then(|l| self.voters.get(&l).cloned());
            return Err(ControllerError::NotLeader { leader: status.leader, address });
        }
        if self.voters.contains_key(&id) {
            return Err(ControllerError::Config(format!("node {id} is a voter, not an observer")));
        }
        let known = self.raft.metrics().borrow().membership_config.nodes().any(|(n, _)| *n == u64::from(id.0));
        if known {
            return Ok(());
        }
        let added = tokio::time::timeout(
            self.propose_timeout,
            self.raft.add_learner(u64::from(id.0), BasicNode::new(address), false),
        )
        .await;
        match added {
            Ok(Ok(_)) => {
                tracing::info!(observer = %id, address, "added an observer of the metadata log");
                Ok(())
            }
            Ok(Err(e)) => Err(ControllerError::NotLeader { leader: None, address: Some(format!("not added: {e}")) }),
            Err(_) => Err(ControllerError::Timeout {
                timeout_ms: u64::try_from(self.propose_timeout.as_millis()).unwrap_or(u64::MAX),
            }),
        }
    }

    /// An observer: until the leader has added it as a learner, asks each
    /// voter in turn (a follower names the leader, which is asked next).
    async fn join_as_observer(self, own_address: String) {
        let me = u64::from(self.node_id.0);
        let mut pause = Duration::from_millis(100);
        loop {
            let joined = self.raft.metrics().borrow().membership_config.nodes().any(|(n, _)| *n == me);
            if joined {
                return;
            }
            for address in self.voters.values() {
                let asked = add_observer(&self.peers, address, self.node_id, &own_address).await;
                let asked = match asked {
                    Err(ControllerError::NotLeader { address: Some(leader), .. }) if !leader.contains(' ') => {
                        add_observer(&self.peers, &leader, self.node_id, &own_address).await
                    }
                    other => other,
                };
                if asked.is_ok() {
                    break;
                }
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }

    /// Answers a heartbeat at this voter (it must lead). A broker shutting
    /// down is fenced before the answer, so its partitions have moved when
    /// it stops. The answer names the metadata log's committed index as of
    /// the confirmation of this voter's leadership (or the index of the
    /// unfencing made for it): the broker extends its lease only once its
    /// image has reached it.
    pub async fn heartbeat_local(&self, heartbeat: &HeartbeatRequest) -> Result<HeartbeatAnswer, ControllerError> {
        let not_leader = |status: ControllerStatus| {
            let address = status.leader.and_then(|l| self.voters.get(&l).cloned());
            ControllerError::NotLeader { leader: status.leader, address }
        };
        let Some(term) = self.leading_term() else { return Err(not_leader(self.status())) };
        // A leader cut off from its quorum must not keep brokers' leases
        // alive: confirm the leadership with a majority first (bounded).
        // What it returns is the committed index a linearizable read must
        // see, and this voter has applied it when it returns.
        let confirmed = tokio::time::timeout(self.propose_timeout, self.raft.ensure_linearizable()).await;
        let read_index = match confirmed {
            Ok(Ok(read)) => read.map_or(0, |l| l.index),
            _ => return Err(ControllerError::NotLeader { leader: None, address: None }),
        };
        if self.leading_term() != Some(term) {
            return Err(not_leader(self.status()));
        }
        let applied = self.state_machine.subscribe().borrow().clone();
        let committed = read_index.max(applied.index);
        let now = self.now_ms();
        let seen = Heartbeat {
            id: heartbeat.broker,
            incarnation: heartbeat.incarnation,
            metadata_index: heartbeat.metadata_index,
        };
        let (answer, unfence) = {
            let mut leases = self.leases();
            if heartbeat.shutting_down {
                leases.shutting_down(heartbeat.broker, heartbeat.incarnation);
            }
            let Some(answer) = leases.heartbeat(term, &applied.image, now, seen, committed) else {
                return Err(ControllerError::NotLeader { leader: None, address: None });
            };
            (answer, leases.may_unfence(&applied.image, heartbeat.broker))
        };
        let HeartbeatAnswer::Alive { fenced, session_timeout_ms, .. } = answer else { return Ok(answer) };
        if heartbeat.shutting_down || (heartbeat.want_fence && !fenced) {
            // A broker that asks because it is behind holds no lease (it
            // lapsed before it asked) and this answer gives none: its
            // leaderships may move at once.
            let fence = MetadataCommand::FenceBroker { id: heartbeat.broker, incarnation: heartbeat.incarnation };
            let index = self.propose_indexed(fence).await?.index;
            return Ok(HeartbeatAnswer::Alive { fenced: true, metadata_index: Some(index), session_timeout_ms });
        }
        if unfence && !heartbeat.want_fence {
            // Caught up and heard from: unfence now rather than at the next
            // tick. Its lease waits until its image has the unfencing.
            let unfence = MetadataCommand::UnfenceBroker { id: heartbeat.broker, incarnation: heartbeat.incarnation };
            let index = self.propose_indexed(unfence).await?.index;
            return Ok(HeartbeatAnswer::Alive { fenced: false, metadata_index: Some(index), session_timeout_ms });
        }
        Ok(answer)
    }

    /// A heartbeat, answered here if this voter leads, else forwarded to
    /// the leader.
    pub async fn heartbeat(&self, heartbeat: &HeartbeatRequest) -> Result<HeartbeatAnswer, ControllerError> {
        match self.heartbeat_local(heartbeat).await {
            Err(ControllerError::NotLeader { address: Some(address), .. }) => {
                forward_heartbeat(&self.peers, &address, heartbeat).await
            }
            other => other,
        }
    }

    /// A proposal, made here if this voter leads, else forwarded to the
    /// leader (one hop: if the leadership moved meanwhile, the answer is a
    /// retriable NotLeader).
    pub async fn propose_anywhere(&self, command: MetadataCommand) -> Result<Committed, ControllerError> {
        match self.propose_indexed(command.clone()).await {
            Err(ControllerError::NotLeader { address: Some(address), .. }) => {
                forward_propose(&self.peers, &address, &command).await
            }
            other => other,
        }
    }

    /// The broker-facing gRPC service (proposals and heartbeats forwarded
    /// from other brokers), to serve on this broker's listener.
    pub fn api_service(&self) -> ControllerApiServer<ControllerApiService> {
        ControllerApiServer::new(ControllerApiService::new(self.clone()))
    }

    /// The peer-facing gRPC service, to serve on this broker's listener.
    pub fn service(&self) -> ControllerRaftServer<RaftService> {
        ControllerRaftServer::new(RaftService::new(self.raft.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// This voter's id.
    pub fn node_id(&self) -> BrokerId {
        self.node_id
    }

    /// Appends `command` to the metadata log (this voter must lead) and
    /// returns what applying it changed once a majority has it.
    pub async fn propose(&self, command: MetadataCommand) -> Result<Vec<MetadataEffect>, ControllerError> {
        self.propose_indexed(command).await.map(|c| c.effects)
    }

    /// [`Controller::propose`], also telling the log index it committed at.
    pub async fn propose_indexed(&self, command: MetadataCommand) -> Result<Committed, ControllerError> {
        let write = tokio::time::timeout(
            self.propose_timeout,
            self.raft.client_write(super::VersionedCommand::current(command)),
        )
        .await;
        let timeout_ms = u64::try_from(self.propose_timeout.as_millis()).unwrap_or(u64::MAX);
        match write {
            Err(_) => Err(ControllerError::Timeout { timeout_ms }),
            Ok(Ok(response)) => match response.data.error {
                Some(refusal) => Err(ControllerError::Refused(refusal)),
                None => Ok(Committed { index: response.log_id.index, effects: response.data.effects }),
            },
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                let leader = f.leader_id.and_then(|id| u32::try_from(id).ok()).map(BrokerId);
                Err(ControllerError::NotLeader { leader, address: f.leader_node.map(|n| n.addr) })
            }
            Ok(Err(e)) => Err(ControllerError::Stopped(e.to_string())),
        }
    }

    /// Waits until this voter has applied the entry at `index`; false when
    /// `timeout` passed first.
    pub async fn wait_applied(&self, index: u64, timeout: Duration) -> bool {
        self.raft.wait(Some(timeout)).applied_index_at_least(Some(index), "wait_applied").await.is_ok()
    }

    /// Builds a snapshot of this voter's image now, rather than when
    /// [`ControllerConfig::snapshot_every_entries`] entries have gathered,
    /// and waits until its latest snapshot covers every entry it had
    /// applied when asked (or `timeout` passes). Returns that snapshot's
    /// last log index. For benchmarks and operators; the policy needs no help.
    pub async fn snapshot_now(&self, timeout: Duration) -> Result<u64, ControllerError> {
        let applied = self.raft.metrics().borrow().last_applied.map_or(0, |l| l.index);
        self.raft.trigger().snapshot().await.map_err(|e| ControllerError::Stopped(e.to_string()))?;
        let covered = |m: &openraft::RaftMetrics<u64, BasicNode>| m.snapshot.is_some_and(|s| s.index >= applied);
        match self.raft.wait(Some(timeout)).metrics(covered, "snapshot_now").await {
            Ok(m) => Ok(m.snapshot.map_or(0, |s| s.index)),
            Err(openraft::metrics::WaitError::Timeout(..)) => {
                Err(ControllerError::Timeout { timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX) })
            }
            Err(e) => Err(ControllerError::Stopped(e.to_string())),
        }
    }

    /// Sees every image this voter applies, with its log index.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<AppliedImage> {
        self.state_machine.subscribe()
    }

    /// The metadata as of the last entry applied here.
    pub fn image(&self) -> Arc<MetadataImage> {
        self.state_machine.image()
    }

    /// What this voter knows of the quorum.
    pub fn status(&self) -> ControllerStatus {
        let m = self.raft.metrics().borrow().clone();
        let to_broker = |id: u64| u32::try_from(id).ok().map(BrokerId);
        let leader = m.current_leader.and_then(to_broker);
        let last = m.last_log_index;
        let voters = self
            .voters
            .keys()
            .map(|id| {
                let matched = m.replication.as_ref().and_then(|r| r.get(&u64::from(id.0))).map(|l| l.map(|l| l.index));
                let matched_index = matched.flatten();
                let lag = match (m.state, matched) {
                    (ServerState::Leader, Some(matched)) => {
                        Some(last.unwrap_or(0).saturating_sub(matched.unwrap_or(0)))
                    }
                    _ => None,
                };
                VoterStatus { id: *id, matched_index, lag }
            })
            .collect();
        ControllerStatus {
            node_id: self.node_id,
            leader,
            term: m.current_term,
            applied_index: m.last_applied.map(|l| l.index),
            last_log_index: last,
            voters,
        }
    }

    /// Stops the voter (its log stays on disk).
    pub async fn shutdown(&self) {
        if let Some(task) = self.lease_task.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() {
            task.abort();
        }
        let _ = self.raft.shutdown().await;
    }
}
