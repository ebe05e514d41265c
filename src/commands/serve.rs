//! `tally serve` and `tally dev`.

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
}

/// Flags of `tally dev`.
#[derive(Debug, clap::Args)]
pub struct DevArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9092")]
    listen: SocketAddr,
    /// Data directory, kept across runs.
    #[arg(long, default_value = ".tally/dev")]
    data_dir: PathBuf,
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
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
    let problems = config.validate();
    if !problems.is_empty() {
        bail!("invalid configuration:\n  {}", problems.join("\n  "));
    }
    tracing::info!(config = ?config, "effective configuration");
    let listener = bind(args.listen).await?;
    tally_broker::run(config, listener, shutdown_signal()).await?;
    Ok(())
}

/// `tally dev`: a local broker with a `demo` topic.
pub async fn dev(args: DevArgs) -> anyhow::Result<()> {
    let config = BrokerConfig { data_dir: args.data_dir.clone(), ..BrokerConfig::default() };
    let listener = bind(args.listen).await?;
    let address = listener.local_addr()?.to_string();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let broker = tokio::spawn(tally_broker::run(config, listener, async move {
        let _ = stop_rx.await;
    }));
    let client = tally_client::Client::builder().bootstrap([address.clone()]).connect().await?;
    match client.admin().create_topic(tally_client::NewTopic::new("demo", 3)).await {
        Ok(()) => {}
        Err(e) if e.code() == Some(tally_client::ErrorCode::TopicAlreadyExists) => {}
        Err(e) => return Err(e).context("cannot create the demo topic"),
    }
    eprintln!(
        "\nTally is running at {address} (data in {}). Try, in another terminal:\n\
         \n  echo hello | cargo run --release -- produce demo\
         \n  cargo run --release -- consume demo --from beginning --exit-at-end\
         \n  cargo run --release -- topic describe demo\n\
         \nCtrl-C stops the broker.",
        args.data_dir.display()
    );
    shutdown_signal().await;
    let _ = stop_tx.send(());
    broker.await.context("broker task failed")??;
    Ok(())
}
