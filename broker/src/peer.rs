//! Connections from one broker to another (controller voters, replica
//! fetchers): they connect lazily, reconnect by themselves, and ping while
//! idle, so a connection never stays dead after a network partition heals.

use std::net::IpAddr;
use std::time::Duration;

use tally_proto::connection::{Connection, ConnectionSettings};

/// A lazily opened connection to the broker at `address`, from the local
/// address `source` when set (`peer_source_address`). A peer that stops
/// answering pings for 10 s is dropped and dialled again.
pub fn peer_channel(address: &str, source: Option<IpAddr>) -> Result<Connection, String> {
    let mut settings = ConnectionSettings::default();
    settings.connect_timeout = Duration::from_secs(2);
    settings.keepalive_interval = Duration::from_secs(5);
    settings.keepalive_timeout = Duration::from_secs(10);
    settings.source = source;
    Connection::lazy(address, settings).map_err(|e| format!("bad peer address {address:?}: {e}"))
}
