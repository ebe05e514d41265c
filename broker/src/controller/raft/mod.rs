//! The metadata log's Raft storage, for openraft (`=0.9.25`, storage v2).
//!
//! This module and its children are the only code that names openraft
//! types; the rest of the controller, and the broker, see our own types.
//!
//! - [`log_store::LogStore`]: the Raft log, vote and committed index in the
//!   data directory, each write fsynced before openraft is told it is
//!   durable.
//! - [`state_machine::StateMachine`]: applies committed
//!   [`MetadataCommand`]s to a [`MetadataImage`] and keeps its snapshot.

// openraft's traits return its `StorageError` (over 200 bytes); the
// helpers here return the same type rather than box and unbox it.
#![allow(clippy::result_large_err)]

pub mod api;
pub mod log_store;
pub mod network;
pub mod node;
pub mod state_machine;

use std::io::Cursor;

use serde::{Deserialize, Serialize};

use super::metadata::{MetadataCommand, MetadataEffect, MetadataError};

/// What applying one log entry gave: the effects, or why the command was
/// refused (a refused command is still a committed entry: it changes
/// nothing, on every replica alike).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyOutcome {
    /// The refusal, if the command was refused.
    pub error: Option<MetadataError>,
    /// What changed.
    pub effects: Vec<MetadataEffect>,
}

openraft::declare_raft_types!(
    /// openraft's type configuration for the metadata log.
    pub TypeConfig:
        D = MetadataCommand,
        R = ApplyOutcome,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A Raft log entry of the metadata log.
pub type Entry = openraft::Entry<TypeConfig>;
/// A Raft log id.
pub type LogId = openraft::LogId<u64>;
/// openraft's storage error for this config.
pub type StorageError = openraft::StorageError<u64>;

#[cfg(test)]
mod node_tests;
#[cfg(test)]
mod store_tests;
