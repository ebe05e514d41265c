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

/// Connections to other brokers by address, each opened once and kept: a
/// [`Connection`] reopens by itself after a break, so a caller that talks
/// to the same peers again and again (forwarded heartbeats and proposals)
/// does not open a TCP connection per call.
#[derive(Debug, Default)]
pub struct PeerConnections {
    source: Option<IpAddr>,
    by_address: std::sync::Mutex<std::collections::HashMap<String, Connection>>,
}

impl PeerConnections {
    /// Connections dialled from `source` when set.
    pub fn new(source: Option<IpAddr>) -> Self {
        PeerConnections { source, by_address: Default::default() }
    }

    /// Drops the kept connection to `address`, so the next [`get`] dials
    /// anew (for a peer whose service answers but is no longer the one to
    /// talk to, which a reconnect on transport errors cannot notice).
    ///
    /// [`get`]: PeerConnections::get
    pub fn forget(&self, address: &str) {
        self.by_address.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(address);
    }

    /// The connection to `address`, made on first use.
    pub fn get(&self, address: &str) -> Result<Connection, String> {
        let mut by_address = self.by_address.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(c) = by_address.get(address) {
            return Ok(c.clone());
        }
        let c = peer_channel(address, self.source)?;
        by_address.insert(address.to_string(), c.clone());
        Ok(c)
    }
}
