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
//!
//! Every command in the log carries the metadata version it was written in
//! ([`VersionedCommand`], like Kafka's `metadata.version`): a voter that
//! meets a version newer than [`METADATA_VERSION`] (in an AppendEntries or
//! in its own log) refuses it instead of decoding it as something else.
//!
//! [`MetadataImage`]: super::metadata::MetadataImage

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

/// The metadata version this build writes and the newest it reads: the
/// set of [`MetadataCommand`]s and their meaning. Bump it when a command is
/// added or changes meaning, so older voters refuse what they cannot read.
pub const METADATA_VERSION: u16 = 1;

/// A command as the metadata log carries it: with the metadata version it
/// was written in. Decoding refuses a version newer than
/// [`METADATA_VERSION`] before it looks at the command, so a newer
/// command is never misread (a new field silently dropped, say). A bare
/// command, as written before versions, reads as version 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VersionedCommand {
    /// The metadata version the command was written in.
    pub version: u16,
    /// The command.
    pub command: MetadataCommand,
}

impl VersionedCommand {
    /// `command` in this build's [`METADATA_VERSION`].
    pub fn current(command: MetadataCommand) -> VersionedCommand {
        VersionedCommand { version: METADATA_VERSION, command }
    }
}

/// The message of a command refused for its version (also matched by the
/// log store to report it as such).
pub(crate) fn unknown_version_message(version: u64) -> String {
    format!("metadata version {version} is newer than this build knows ({METADATA_VERSION}); run a build that knows it")
}

impl<'de> Deserialize<'de> for VersionedCommand {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let value = serde_json::Value::deserialize(deserializer)?;
        let versioned = value.as_object().filter(|o| o.len() == 2 && o.contains_key("version"));
        let Some(fields) = versioned else {
            let command = MetadataCommand::deserialize(value).map_err(D::Error::custom)?;
            return Ok(VersionedCommand { version: 1, command });
        };
        let version = fields["version"].as_u64().ok_or_else(|| D::Error::custom("metadata version is not a number"))?;
        if version == 0 || version > u64::from(METADATA_VERSION) {
            return Err(D::Error::custom(unknown_version_message(version)));
        }
        let command = fields.get("command").ok_or_else(|| D::Error::missing_field("command"))?;
        let command = MetadataCommand::deserialize(command).map_err(D::Error::custom)?;
        Ok(VersionedCommand { version: version as u16, command })
    }
}

openraft::declare_raft_types!(
    /// openraft's type configuration for the metadata log.
    pub TypeConfig:
        D = VersionedCommand,
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
mod delay_proxy;
#[cfg(test)]
mod node_tests;
#[cfg(test)]
mod store_tests;
