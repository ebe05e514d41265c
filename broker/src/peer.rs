//! Channels from one broker to another (controller voters, replica
//! fetchers): they connect lazily, reconnect by themselves, and use HTTP/2
//! keepalive, so a channel never stays dead after a network partition heals.

use std::net::IpAddr;
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

/// A lazily connecting channel to `address` with HTTP/2 keepalive, from
/// the local address `source` when set (`peer_source_address`).
pub fn peer_channel(address: &str, source: Option<IpAddr>) -> Result<Channel, String> {
    let endpoint = Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| format!("bad peer address {address:?}: {e}"))?
        .local_address(source)
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    Ok(endpoint.connect_lazy())
}
