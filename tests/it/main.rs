//! Integration tests: brokers in this process on port 0, driven through the
//! client crate, raw gRPC, and the real `tally` binary. One test binary keeps
//! link time down.

mod api;
mod checker;
mod cli;
mod cluster;
mod compaction;
mod conditional;
mod dev;
mod examples;
mod fault;
mod groups;
mod harness;
mod idempotence;
mod interop;
mod metrics;
mod process;
mod proxy;
mod replication;
