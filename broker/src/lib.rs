//! The Tally broker as a library: `tally_broker::run(config, listener,
//! shutdown)` serves the `tally.v1` gRPC API on a listener until `shutdown`
//! completes.
//!
//! Layers, outermost first: `server` (gRPC edge, the only place that sees
//! generated types) → `broker` (topics, admin) → `partition` (one partition's
//! log, high watermark, group commit) → `storage` (synchronous segment files;
//! knows nothing of tokio, protobuf or replication).

pub mod broker;
pub mod config;
pub mod controller;
pub mod coordinator;
pub mod error;
pub mod limits;
mod log_cleaner;
mod maintenance;
pub mod membership;
pub mod metrics;
pub mod partition;
pub mod peer;
pub mod producer_ids;
pub mod replication;
pub mod server;
pub mod storage;
pub mod topic;

pub use config::BrokerConfig;
pub use error::BrokerError;
pub use server::{run, run_with_metrics};

#[cfg(not(target_pointer_width = "64"))]
compile_error!("Tally maps whole segments into memory and needs a 64-bit target");
