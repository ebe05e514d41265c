//! `tally serve`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use tally_broker::BrokerConfig;
use tokio::net::TcpListener;

/// Flags of `tally serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// TOML config file (unknown keys are errors).
    #[arg(long, env = "TALLY_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory (overrides the config file and TALLY_DATA_DIR).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Address to listen on; port 0 picks a free port and prints it.
    #[arg(long, env = "TALLY_LISTEN", default_value = "127.0.0.1:9092")]
    listen: SocketAddr,
    /// This broker's id (overrides the config file and TALLY_NODE_ID).
    #[arg(long)]
    node_id: Option<u32>,
    /// Address clients and peers are told to dial, when it differs from
    /// `--listen` (overrides the config file and TALLY_ADVERTISED_ADDRESS).
    #[arg(long)]
    advertised_addr: Option<String>,
    /// Controller voters, `id@host:port,...` with each voter's advertised
    /// address; this broker must be one (overrides the config file and
    /// TALLY_VOTERS). Without it the broker is a cluster of its own.
    #[arg(long)]
    voters: Option<String>,
    /// Default flush policy for topics: always, os, or milliseconds
    /// (overrides the config file and TALLY_LOG_FLUSH).
    #[arg(long)]
    flush: Option<String>,
    /// Serve Prometheus metrics on this address (`GET /metrics`; port 0
    /// picks a free port and prints it); overrides the config file and
    /// TALLY_METRICS_LISTEN. Off unless set.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops the broker");
            let _ = ctrl_c.await;
            return;
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down: finishing requests, flushing logs");
}

async fn bind(listen: SocketAddr) -> anyhow::Result<TcpListener> {
    let listener = TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
    let local = listener.local_addr()?;
    // Scripts and tests read this line to find the port.
    eprintln!("tally broker listening on {local}");
    Ok(listener)
}

/// `tally serve`.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = match &args.config {
        Some(path) => BrokerConfig::from_toml_file(path).map_err(anyhow::Error::msg)?,
        None => BrokerConfig::default(),
    };
    // Precedence: the TOML file, then TALLY_* variables, then flags.
    let mut config = config.apply_env(std::env::vars()).map_err(anyhow::Error::msg)?;
    if let Some(dir) = args.data_dir {
        config.data_dir = dir;
    }
    if let Some(id) = args.node_id {
        config.node_id = id;
    }
    if let Some(addr) = args.advertised_addr {
        config.advertised_address = Some(addr);
    }
    if let Some(voters) = args.voters {
        config.voters = Some(voters);
    }
    if let Some(flush) = args.flush {
        config.log.flush = flush;
    }
    if let Some(address) = args.metrics_listen {
        config.metrics_listen = Some(address.to_string());
    }
    let problems = config.validate();
    if !problems.is_empty() {
        bail!("invalid configuration:\n  {}", problems.join("\n  "));
    }
    tracing::info!(config = ?config, "effective configuration");
    // Bound first, so its line comes before the broker's, which scripts
    // take to mean "started".
    let metrics = match config.metrics_listen.as_deref() {
        Some(address) => {
            let address: SocketAddr = address.parse().context("metrics_listen")?;
            let listener = tally_broker::server::bind_metrics(address).await?;
            // Scripts and tests read this line to find the port.
            eprintln!("tally metrics listening on {}", listener.local_addr()?);
            Some(listener)
        }
        None => None,
    };
    let listener = bind(args.listen).await?;
    tally_broker::run_with_metrics(config, listener, metrics, shutdown_signal()).await?;
    Ok(())
}
