//! Sends the ISR changes of the partitions this broker leads to the
//! controller (AlterPartition, compare-and-set on the leader and partition
//! epochs), ticks the leaders so lagging members leave the ISR, and retries
//! leaderships that could not be taken (see `Partition::retry_leadership`).
//!
//! The committed result comes back through the metadata image like any
//! other change. A proposal the controller refused is released (the leader
//! backs off, then may propose again); one whose fate is unknown stays
//! pending and is sent again unchanged (see [`ProposalOutcome`]). Proposals go through a bounded queue; one per partition
//! is in flight at a time (the leader state keeps it pending).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::broker::Broker;
use crate::controller::{ControllerError, LeaderEpoch, MetadataCommand, MetadataError, PartitionEpoch};
use crate::error::BrokerError;
use crate::partition::Partition;
use crate::replication::{IsrChange, ProposalOutcome};

/// Proposals waiting to be sent, at most.
pub const QUEUE: usize = 1024;

/// An ISR change of one partition.
#[derive(Debug)]
pub struct Proposal {
    /// Topic.
    pub topic: String,
    /// The partition it is for.
    pub partition: Arc<Partition>,
    /// The change.
    pub change: IsrChange,
}

/// The sending side of the proposal queue; a full queue drops the proposal
/// and releases it, so the next fetch or tick proposes it again.
#[derive(Debug, Clone)]
pub struct IsrProposer(mpsc::Sender<Proposal>);

impl IsrProposer {
    /// A proposer and the receiver [`run`] drains.
    pub fn new() -> (IsrProposer, mpsc::Receiver<Proposal>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (IsrProposer(tx), rx)
    }

    /// Queues `proposal`.
    pub fn propose(&self, proposal: Proposal) {
        if let Err(e) = self.0.try_send(proposal) {
            let p = e.into_inner();
            p.partition.isr_proposal_failed(&p.change, ProposalOutcome::NotApplied, now_ms());
        }
    }
}

/// Monotonic milliseconds since the process started: the clock of the
/// replication state machines.
pub fn now_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let start = *START.get_or_init(std::time::Instant::now);
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Ticks every led partition each `tick` and sends queued proposals to the
/// controller, until the queue closes.
pub async fn run(broker: Arc<Broker>, proposer: IsrProposer, mut queue: mpsc::Receiver<Proposal>, tick: Duration) {
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                let now = now_ms();
                for (topic, p) in broker.led_partitions() {
                    if let Some(change) = p.isr_tick(now) {
                        proposer.propose(Proposal { topic, partition: p, change });
                    }
                }
                // Leaderships the image gave this broker that it could not
                // take yet (recording the epoch failed) are tried again.
                for p in broker.all_partitions() {
                    if let Some(Ok(())) = p.retry_leadership(now) {
                        tracing::info!(topic = p.topic(), partition = p.index(), "took the leadership after all");
                    }
                }
            }
            next = queue.recv() => {
                let Some(proposal) = next else { return };
                let b = broker.clone();
                // Each proposal waits on the controller on its own, so one
                // slow commit does not hold back the other partitions.
                tokio::spawn(async move { send(&b, proposal).await });
            }
        }
    }
}

async fn send(broker: &Broker, p: Proposal) {
    let command = MetadataCommand::AlterPartition {
        topic: p.topic.clone(),
        partition: p.partition.index(),
        leader_epoch: LeaderEpoch(p.change.leader_epoch),
        partition_epoch: PartitionEpoch(p.change.partition_epoch),
        isr: p.change.isr.clone(),
    };
    let before = broker
        .topic(&p.topic)
        .and_then(|t| t.states.get(p.partition.index() as usize).map(|s| s.isr.len()))
        .unwrap_or(0);
    match broker.propose(command).await {
        Ok(()) => {
            tracing::info!(topic = %p.topic, partition = p.partition.index(), isr = ?p.change.isr, "ISR changed");
            match p.change.isr.len().cmp(&before) {
                std::cmp::Ordering::Less => metrics::counter!(crate::metrics::ISR_SHRINKS).increment(1),
                std::cmp::Ordering::Greater => metrics::counter!(crate::metrics::ISR_EXPANDS).increment(1),
                std::cmp::Ordering::Equal => {}
            }
        }
        Err(e) => {
            let outcome = outcome_of(&e);
            tracing::info!(topic = %p.topic, partition = p.partition.index(), isr = ?p.change.isr, error = %e, ?outcome, "ISR change not taken");
            p.partition.isr_proposal_failed(&p.change, outcome, now_ms());
        }
    }
}

/// What a failed proposal tells of its fate. Only the state machine's own
/// refusal of the change, judged against the partition state it was based
/// on, proves it was not applied; a refusal for stale epochs means the
/// partition moved on (perhaps by this very change, sent before); anything
/// else (a timeout, a lost forward, a controller leader change) may still
/// commit.
fn outcome_of(e: &BrokerError) -> ProposalOutcome {
    match e {
        BrokerError::Controller(ControllerError::Refused(
            MetadataError::StalePartitionEpoch { .. } | MetadataError::FencedLeaderEpoch { .. },
        )) => ProposalOutcome::Superseded,
        BrokerError::Controller(ControllerError::Refused(_)) => ProposalOutcome::NotApplied,
        _ => ProposalOutcome::Unknown,
    }
}
