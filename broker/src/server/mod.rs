//! The gRPC edge: turns `tally.v1` requests into calls on [`Broker`] and
//! [`Partition`](crate::partition::Partition), and errors into per-partition
//! codes. Generated types stop here.

mod admin;
mod data;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tally_proto::v1::admin_server::AdminServer;
use tally_proto::v1::tally_server::TallyServer;
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;

use crate::broker::Broker;
use crate::config::BrokerConfig;
use crate::error::BrokerError;

pub use admin::AdminService;
pub use data::TallyService;

/// Runs a broker on `listener` until `shutdown` completes, then stops
/// accepting requests, lets in-flight ones finish, and flushes and closes
/// every log.
pub async fn run(
    config: BrokerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), BrokerError> {
    let problems = config.validate();
    if !problems.is_empty() {
        return Err(BrokerError::InvalidRequest(format!("invalid broker config: {}", problems.join("; "))));
    }
    let local =
        listener.local_addr().map_err(|e| BrokerError::InvalidRequest(format!("listener has no address: {e}")))?;
    let advertised = config.advertised_address.clone().unwrap_or_else(|| local.to_string());
    let data_dir = config.data_dir.clone();
    let broker = tokio::task::spawn_blocking(move || Broker::open(config, advertised))
        .await
        .map_err(|e| BrokerError::InvalidRequest(format!("startup task failed: {e}")))??;
    let broker = Arc::new(broker);
    tracing::info!(node_id = broker.node_id(), address = %local, data_dir = %data_dir.display(), "broker serving");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let maintenance = tokio::spawn(crate::maintenance::run(broker.clone(), stop_rx));

    let max_bytes = usize::try_from(broker.config().max_request_bytes).unwrap_or(usize::MAX);
    let tally = TallyServer::new(TallyService::new(broker.clone()))
        .max_decoding_message_size(max_bytes)
        .max_encoding_message_size(max_bytes);
    let admin = AdminServer::new(AdminService::new(broker.clone()))
        .max_decoding_message_size(max_bytes)
        .max_encoding_message_size(max_bytes);
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<TallyServer<TallyService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tally_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| BrokerError::InvalidRequest(format!("reflection service: {e}")))?;

    let incoming = TcpListenerStream::new(listener).map(|conn| {
        if let Ok(stream) = &conn {
            let _ = stream.set_nodelay(true);
        }
        conn
    });
    let served = tonic::transport::Server::builder()
        .concurrency_limit_per_connection(broker.config().max_concurrent_requests_per_connection)
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .initial_connection_window_size(Some(16 << 20))
        .initial_stream_window_size(Some(8 << 20))
        .max_frame_size(Some(1 << 20))
        .add_service(tally)
        .add_service(admin)
        .add_service(health)
        .add_service(reflection)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    let _ = stop_tx.send(true);
    let _ = maintenance.await;
    let closing = broker.clone();
    tokio::task::spawn_blocking(move || closing.close())
        .await
        .map_err(|e| BrokerError::InvalidRequest(format!("shutdown task failed: {e}")))?;
    tracing::info!("broker stopped");
    served.map_err(|e| BrokerError::InvalidRequest(format!("server failed: {e}")))
}
