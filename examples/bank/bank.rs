//! The bank as a library, shared by the `bank` example's `main.rs` and its
//! test (`tests/it/examples.rs`).
//!
//! Accounts are event-sourced aggregates: every change is an [`event::Event`]
//! in the `events` topic, keyed by account id, so an account's events all
//! land in one partition (Kafka's murmur2 partitioner). Several accounts may
//! share a partition: an account's stream is the records with its key in
//! that partition, and its version is the partition's end offset.
//!
//! - [`account`]: the aggregate: state rebuilt from events, and commands
//!   validated against it (pure, no I/O).
//! - [`event`]: the events and their encoding.
//! - [`store`]: the [`store::EventStore`]: read a partition to its end,
//!   rebuild, decide, append with `append_if` at the end offset seen; on a
//!   conflict, catch up and decide again.
//! - [`snapshot`]: account states in a compacted topic, with the offset each
//!   covers, so a restart replays only what came after.
//! - [`projection`]: a read model of balances built by a consumer group.
//! - [`saga`]: a transfer as debit, credit, and a compensating refund.
//! - [`read`]: reading a partition from an offset up to an end offset.
//! - [`topics`]: creating the two topics.

pub mod account;
pub mod event;
pub mod projection;
pub mod read;
pub mod saga;
pub mod snapshot;
pub mod store;
pub mod topics;
