//! The gRPC edge: turns `tally.v1` requests into calls on [`Broker`] and
//! [`Partition`](crate::partition::Partition), and errors into per-partition
//! codes. Generated types stop here.

mod admin;
mod data;
mod groups;
mod replica;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tally_proto::internal::v1::replication_server::ReplicationServer;
use tally_proto::v1::admin_server::AdminServer;
use tally_proto::v1::groups_server::GroupsServer;
use tally_proto::v1::tally_server::TallyServer;
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;

use crate::broker::Broker;
use crate::config::BrokerConfig;
use crate::controller::{BrokerId, Controller, ControllerConfig, LeaseConfig};
use crate::error::BrokerError;
use crate::membership::{Membership, new_incarnation, take_over_incarnation};

pub use admin::AdminService;
pub use data::TallyService;
pub use groups::GroupsService;
pub use replica::ReplicationService;

/// Runs a broker on `listener` until `shutdown` completes, then asks the
/// controller to fence it (its partitions move), stops accepting requests,
/// lets in-flight ones finish, stops its controller voter, and flushes and
/// closes every log. Every broker embeds a controller voter of the
/// metadata log (alone, without `voters`).
pub async fn run(
    config: BrokerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), BrokerError> {
    let metrics = match config.metrics_listen.as_deref().map(str::parse::<std::net::SocketAddr>) {
        None => None,
        Some(Ok(address)) => Some(bind_metrics(address).await?),
        // `validate` below names the problem.
        Some(Err(_)) => None,
    };
    run_with_metrics(config, listener, metrics, shutdown).await
}

/// Binds the metrics endpoint's listener; the error names the address.
pub async fn bind_metrics(address: std::net::SocketAddr) -> Result<TcpListener, BrokerError> {
    TcpListener::bind(address)
        .await
        .map_err(|e| BrokerError::InvalidRequest(format!("cannot serve metrics on {address} (metrics_listen): {e}")))
}

/// [`run`] with the metrics endpoint on a listener the caller bound (to
/// learn its port before the broker starts); `config.metrics_listen` is
/// then not bound again.
pub async fn run_with_metrics(
    config: BrokerConfig,
    listener: TcpListener,
    metrics: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), BrokerError> {
    let problems = config.validate();
    if !problems.is_empty() {
        return Err(BrokerError::InvalidRequest(format!("invalid broker config: {}", problems.join("; "))));
    }
    // Before any partition opens: a broker that cannot hold its segments
    // says so now, not with EMFILE in the middle of a roll.
    crate::limits::check_start(&config.data_dir).map_err(BrokerError::InvalidRequest)?;
    let metrics_handle = match &metrics {
        Some(_) => Some(crate::metrics::install().map_err(BrokerError::InvalidRequest)?),
        None => None,
    };
    let local =
        listener.local_addr().map_err(|e| BrokerError::InvalidRequest(format!("listener has no address: {e}")))?;
    let advertised = config.advertised_address.clone().unwrap_or_else(|| local.to_string());
    let data_dir = config.data_dir.clone();
    let controller_config = controller_config(&config, &advertised)?;
    let heartbeat_interval = Duration::from_millis(config.broker_heartbeat_interval_ms);
    let session_timeout = Duration::from_millis(config.broker_session_timeout_ms);
    let address = advertised.clone();
    match config.page_cache_min_free_percent {
        100 => tracing::info!(
            "page cache: each partition caches only its newest write-behind windows (page_cache_min_free_percent = 100)"
        ),
        p => tracing::info!(
            "page cache: written and read-back data stays cached while at least {p}% of memory is free (page_cache_min_free_percent)"
        ),
    }
    let broker = tokio::task::spawn_blocking(move || Broker::open(config, advertised))
        .await
        .map_err(|e| BrokerError::InvalidRequest(format!("startup task failed: {e}")))??;
    let broker = Arc::new(broker);
    // After Broker::open, which holds the data directory's lock.
    let controller = Controller::start(controller_config).await?;
    let incarnation = new_incarnation();
    // Under the data directory's lock: the process that wrote the previous
    // incarnation has exited.
    let metadata_dir = data_dir.join("__cluster_metadata");
    let succession = take_over_incarnation(&metadata_dir, incarnation).map_err(BrokerError::InvalidRequest)?;
    broker.attach(controller.clone(), incarnation);
    let reconciler = tokio::spawn(follow_metadata(broker.clone(), controller.subscribe()));
    let migration = tokio::spawn(migrate_legacy_topics(broker.clone()));
    let (member_stop, member_stop_rx) = tokio::sync::watch::channel(false);
    let (fatal_tx, fatal_rx) = tokio::sync::oneshot::channel::<String>();
    let membership = Membership {
        controller: controller.clone(),
        broker: BrokerId(broker.node_id()),
        address,
        incarnation,
        previous_incarnation: succession.previous,
        may_have_lost_writes: succession.may_have_lost_writes,
        heartbeat_interval,
        session_timeout,
        image_index: broker.reconciled_index(),
        lease: broker.lease(),
    };
    let membership = tokio::spawn(async move {
        if let Err(e) = membership.run(member_stop_rx).await {
            let _ = fatal_tx.send(e);
        }
    });
    tracing::info!(node_id = broker.node_id(), address = %local, data_dir = %data_dir.display(), "broker serving");

    let (proposer, proposals) = crate::replication::isr::IsrProposer::new();
    broker.set_isr_proposer(proposer.clone());
    let isr_tick = Duration::from_millis((broker.config().replica_lag_time_max_ms / 4).clamp(10, 1000));
    let isr = tokio::spawn(crate::replication::isr::run(broker.clone(), proposer, proposals, isr_tick));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let maintenance = tokio::spawn(crate::maintenance::run(broker.clone(), stop_rx));
    let cleaners = crate::log_cleaner::LogCleaners::start(broker.clone())
        .map_err(|e| BrokerError::InvalidRequest(format!("cannot start the log cleaner: {e}")))?;

    let max_bytes = usize::try_from(broker.config().max_request_bytes).unwrap_or(usize::MAX);
    let tally = TallyServer::new(TallyService::new(broker.clone()))
        .max_decoding_message_size(max_bytes)
        .max_encoding_message_size(max_bytes);
    let admin = AdminServer::new(AdminService::new(broker.clone(), controller.clone()))
        .max_decoding_message_size(max_bytes)
        .max_encoding_message_size(max_bytes);
    let coordinators = crate::coordinator::Coordinators::start(broker.clone());
    let _metrics_server = match (metrics, metrics_handle) {
        (Some(listener), Some(handle)) => {
            let sampler = Arc::new(crate::metrics::sample::Sampler::new(broker.clone(), coordinators.clone()));
            let server = crate::metrics::MetricsServer::start(listener, handle, sampler)
                .map_err(|e| BrokerError::InvalidRequest(format!("metrics listener: {e}")))?;
            tracing::info!(address = %server.local_addr(), "serving metrics");
            Some(server)
        }
        _ => None,
    };
    let groups = GroupsServer::new(GroupsService::new(coordinators.clone()))
        .max_decoding_message_size(max_bytes)
        .max_encoding_message_size(max_bytes);
    // A follower's fetch response holds up to its max_bytes, plus one batch.
    let replica_response_bytes = max_bytes
        .saturating_add(usize::try_from(broker.config().replica_fetch_response_max_bytes).unwrap_or(usize::MAX));
    let replication = ReplicationServer::new(ReplicationService::new(broker.clone()))
        .max_decoding_message_size(max_bytes)
        .max_encoding_message_size(replica_response_bytes);
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<TallyServer<TallyService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tally_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| BrokerError::InvalidRequest(format!("reflection service: {e}")))?;

    let incoming = TcpListenerStream::new(listener).map(|conn| {
        conn.map(|stream| {
            let _ = stream.set_nodelay(true);
            crate::metrics::CountedStream::new(stream)
        })
    });
    let fatal = Arc::new(std::sync::Mutex::new(None::<String>));
    let fatal_slot = fatal.clone();
    let shutdown = async move {
        tokio::select! {
            _ = shutdown => {}
            Ok(e) = fatal_rx => {
                tracing::error!(error = %e, "stopping");
                *fatal_slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(e);
            }
        }
        // Controlled shutdown: the membership task asks to be fenced first.
        let _ = member_stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(3), membership).await;
    };
    let served = tonic::transport::Server::builder()
        .concurrency_limit_per_connection(broker.config().max_concurrent_requests_per_connection)
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .initial_connection_window_size(Some(16 << 20))
        .initial_stream_window_size(Some(8 << 20))
        .max_frame_size(Some(1 << 20))
        .add_service(tally)
        .add_service(admin)
        .add_service(groups)
        .add_service(replication)
        .add_service(health)
        .add_service(reflection)
        .add_service(controller.service())
        .add_service(controller.api_service())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    let _ = stop_tx.send(true);
    coordinators.stop();
    let _ = maintenance.await;
    let _ = tokio::task::spawn_blocking(move || cleaners.stop()).await;
    // Every task holding the broker ends before it closes, so the data
    // directory's lock is free when run returns.
    migration.abort();
    reconciler.abort();
    isr.abort();
    let _ = migration.await;
    let _ = reconciler.await;
    controller.shutdown().await;
    let closing = broker.clone();
    let closed = tokio::task::spawn_blocking(move || closing.close())
        .await
        .map_err(|e| BrokerError::InvalidRequest(format!("shutdown task failed: {e}")))?;
    if closed {
        // Every log synced and closed: the next start knows nothing was lost.
        if let Err(e) = crate::membership::record_clean_shutdown(&metadata_dir, incarnation) {
            tracing::warn!(error = %e, "cannot record the clean shutdown");
        }
    }
    tracing::info!("broker stopped");
    served.map_err(|e| BrokerError::InvalidRequest(format!("server failed: {e}")))?;
    match fatal.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() {
        Some(e) => Err(BrokerError::InvalidRequest(e)),
        None => Ok(()),
    }
}

/// Keeps the broker's topics in line with every metadata image its voter
/// applies (the file work on a blocking thread), until aborted.
async fn follow_metadata(
    broker: Arc<Broker>,
    mut images: tokio::sync::watch::Receiver<crate::controller::AppliedImage>,
) {
    loop {
        let applied = images.borrow_and_update().clone();
        let b = broker.clone();
        match tokio::task::spawn_blocking(move || b.reconcile(&applied)).await {
            Ok(Err(e)) => tracing::error!(error = %e, "applying the metadata image left partitions unopened"),
            Err(e) => tracing::error!(error = %e, "metadata reconcile task failed"),
            Ok(Ok(())) => {}
        }
        if images.changed().await.is_err() {
            return;
        }
    }
}

/// Moves a single-broker data directory's `topics.json` into the metadata
/// log, retrying while the controller is not ready.
async fn migrate_legacy_topics(broker: Arc<Broker>) {
    // Its partitions are placed on this broker, which must be running first.
    while !broker.is_serving() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    loop {
        match broker.migrate_legacy_topics().await {
            Ok(0) => return,
            Ok(n) => {
                tracing::info!(topics = n, "moved topics.json into the metadata log (kept as topics.json.migrated)");
                return;
            }
            Err(e) if e.code().is_retriable() || matches!(e, BrokerError::Controller(_)) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot move topics.json into the metadata log; its topics are not served");
                return;
            }
        }
    }
}

/// The embedded controller voter's settings: the configured voters, or this
/// broker alone at its advertised address.
fn controller_config(config: &BrokerConfig, advertised: &str) -> Result<ControllerConfig, BrokerError> {
    let voters = match config.parsed_voters().map_err(BrokerError::InvalidRequest)? {
        Some(voters) => voters.into_iter().map(|(id, address)| (BrokerId(id), address)).collect(),
        None => std::collections::BTreeMap::from([(BrokerId(config.node_id), advertised.to_string())]),
    };
    let dir = config.data_dir.join("__cluster_metadata");
    let mut controller = ControllerConfig::new(BrokerId(config.node_id), voters, dir);
    controller.election_timeout_ms = config.controller_election_timeout_ms;
    controller.heartbeat_interval_ms = config.controller_heartbeat_interval_ms;
    controller.install_snapshot_timeout_ms = config.controller_install_snapshot_timeout_ms;
    controller.leader_rebalance_interval_ms = config.leader_imbalance_check_interval_ms;
    controller.peer_source_address = config.controller_source_ip();
    controller.own_address = advertised.to_string();
    controller.leases = LeaseConfig { session_timeout_ms: config.broker_session_timeout_ms, retry_ms: 1000 };
    Ok(controller)
}
