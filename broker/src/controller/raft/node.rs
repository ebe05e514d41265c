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
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, InitializeError, RaftError};
use openraft::{BasicNode, Raft, ServerState};
use serde::{Deserialize, Serialize};
use tally_proto::internal::v1::controller_raft_server::ControllerRaftServer;

use super::TypeConfig;
use super::log_store::LogStore;
use super::network::{MAX_MESSAGE_BYTES, Network, RaftService};
use super::state_machine::StateMachine;
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
    /// Leader heartbeat. Default 100 ms.
    pub heartbeat_interval_ms: u64,
    /// Election timeout: a follower that hears from no leader for between
    /// 3/4 of this and all of it starts an election (openraft waits for the
    /// old leader's lease, half of this, plus a random 1/4 to 1/2 of it).
    /// Must exceed 4 heartbeats. Default 1000 ms.
    pub election_timeout_ms: u64,
    /// Entries between snapshots. Default 10,000.
    pub snapshot_every_entries: u64,
    /// How long a proposal may wait for a majority. Default 5 s.
    pub propose_timeout_ms: u64,
}

impl ControllerConfig {
    /// Defaults for everything but the identity and the directory.
    pub fn new(node_id: BrokerId, voters: BTreeMap<BrokerId, String>, dir: PathBuf) -> ControllerConfig {
        ControllerConfig {
            node_id,
            voters,
            dir,
            heartbeat_interval_ms: 100,
            election_timeout_ms: 1000,
            snapshot_every_entries: 10_000,
            propose_timeout_ms: 5000,
        }
    }
}

/// Why the controller could not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
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
#[derive(Debug, Clone, PartialEq, Eq)]
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

#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
struct ClusterFile {
    voters: BTreeMap<u32, String>,
}

/// One running controller voter.
#[derive(Clone)]
pub struct Controller {
    raft: Raft<TypeConfig>,
    state_machine: StateMachine,
    node_id: BrokerId,
    voters: BTreeMap<BrokerId, String>,
    propose_timeout: Duration,
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

impl Controller {
    /// Opens the metadata log in `config.dir` and starts the voter. The
    /// first start of each voter initializes the cluster with the voters.
    pub async fn start(config: ControllerConfig) -> Result<Controller, ControllerError> {
        if !config.voters.contains_key(&config.node_id) {
            return Err(ControllerError::Config(format!(
                "node {} is not one of the voters {:?}",
                config.node_id,
                config.voters.keys().map(|b| b.0).collect::<Vec<_>>()
            )));
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
        if config.election_timeout_ms <= 4 * config.heartbeat_interval_ms {
            return Err(ControllerError::Config(format!(
                "election_timeout_ms ({}) must exceed 4 x heartbeat_interval_ms ({})",
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
            install_snapshot_timeout: 10_000,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(config.snapshot_every_entries),
            max_in_snapshot_log_to_keep: 1000,
            snapshot_max_chunk_size: (MAX_MESSAGE_BYTES / 4) as u64,
            ..openraft::Config::default()
        }
        .validate()
        .map_err(|e| ControllerError::Config(e.to_string()))?;
        let id = u64::from(config.node_id.0);
        let raft = Raft::new(id, Arc::new(raft_config), Network, log, state_machine.clone())
            .await
            .map_err(|e| ControllerError::Stopped(e.to_string()))?;
        let initialized = raft.is_initialized().await.map_err(|e| ControllerError::Stopped(e.to_string()))?;
        if !initialized {
            let members: BTreeMap<u64, BasicNode> =
                config.voters.iter().map(|(id, addr)| (u64::from(id.0), BasicNode::new(addr))).collect();
            match raft.initialize(members).await {
                Ok(()) | Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {}
                Err(e) => return Err(ControllerError::Stopped(e.to_string())),
            }
        }
        Ok(Controller {
            raft,
            state_machine,
            node_id: config.node_id,
            voters: config.voters,
            propose_timeout: Duration::from_millis(config.propose_timeout_ms),
        })
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
        let write = tokio::time::timeout(self.propose_timeout, self.raft.client_write(command)).await;
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
        let _ = self.raft.shutdown().await;
    }
}
