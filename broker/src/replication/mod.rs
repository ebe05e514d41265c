//! Replication: followers pull from partition leaders (Kafka's model).
//!
//! - [`leader`]: the leader's sans-IO bookkeeping of one partition's
//!   replicas (high watermark, ISR changes).
//! - [`fetch_session`]: the leader's sans-IO fetch sessions (KIP-227): what
//!   each follower fetches and where it stands, so requests and answers
//!   carry only what changed.
//! - [`fetcher`]: a follower's fetchers, one task per leader broker, which
//!   keep a fetch session with their leader, append the leader's batches as
//!   the same bytes and truncate where the logs diverge.
//! - [`isr`]: sends the leaders' ISR changes to the controller.
//!
//! Storage knows nothing of this module; the partition
//! ([`crate::partition::Partition`]) holds a role (leader with its
//! [`leader::LeaderState`], or follower) next to its log.

pub mod fetch_session;
pub mod fetcher;
pub mod isr;
pub mod leader;

pub use leader::{Assignment, IsrChange, LeaderSettings, LeaderState, ProposalOutcome};
