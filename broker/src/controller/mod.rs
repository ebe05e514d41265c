//! The cluster controller's protocol logic: the metadata state machine that
//! the metadata log drives, and replica placement.
//!
//! Everything here is sans-IO and deterministic (no clock, no I/O, no
//! random numbers): the Raft driver, the network and the metadata log's
//! storage sit around it and feed it commands in log order. No module
//! outside `controller` changes metadata except by proposing a
//! [`MetadataCommand`]; the data path reads only a [`MetadataImage`].

pub mod election;
pub mod lease;
pub mod metadata;
pub mod placement;
pub mod raft;

pub use lease::{BrokerLeases, HeartbeatAnswer, LeaseConfig};
pub use metadata::{
    BrokerId, BrokerRegistration, LeaderEpoch, MetadataCommand, MetadataEffect, MetadataError, MetadataImage,
    PartitionEpoch, PartitionState, TopicId, TopicState, recorded_min_insync_replicas,
};
pub use placement::{PlacementError, place};
pub use raft::node::{
    Committed, Controller, ControllerConfig, ControllerError, ControllerStatus, HeartbeatRequest, VoterStatus,
};
pub use raft::state_machine::AppliedImage;
