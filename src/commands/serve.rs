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
    /// Address of the first broker; the others listen on the next ports
    /// (port 0: any free ports).
    #[arg(long, default_value = "127.0.0.1:9092")]
    listen: SocketAddr,
    /// Brokers to run, all controller voters, in this one process.
    #[arg(long, default_value_t = 3)]
    brokers: u32,
    /// Data directory, kept across runs (one subdirectory per broker).
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

/// `tally dev`: a local cluster (three brokers in this process by default,
/// all controller voters) with a `demo` topic.
pub async fn dev(args: DevArgs) -> anyhow::Result<()> {
    anyhow::ensure!((1..=9).contains(&args.brokers), "--brokers takes 1 to 9, not {}", args.brokers);
    let mut listeners = Vec::new();
    for i in 0..args.brokers {
        let mut at = args.listen;
        if at.port() != 0 {
            at.set_port(at.port() + i as u16);
        }
        listeners.push(bind(at).await?);
    }
    let addresses: Vec<String> =
        listeners.iter().map(|l| l.local_addr().map(|a| a.to_string())).collect::<Result<_, _>>()?;
    let voters = addresses.iter().enumerate().map(|(i, a)| format!("{}@{a}", i + 1)).collect::<Vec<_>>().join(",");
    let mut stops = Vec::new();
    let mut brokers = Vec::new();
    for (i, listener) in listeners.into_iter().enumerate() {
        let id = i as u32 + 1;
        let config = BrokerConfig {
            node_id: id,
            data_dir: args.data_dir.join(id.to_string()),
            voters: Some(voters.clone()),
            ..BrokerConfig::default()
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        stops.push(stop_tx);
        brokers.push(tokio::spawn(tally_broker::run(config, listener, async move {
            let _ = stop_rx.await;
        })));
    }
    let client = tally_client::Client::builder().bootstrap([addresses[0].clone()]).connect().await?;
    // Wait (a while) for every broker to register, so `demo` spreads over all.
    for _ in 0..100 {
        let cluster = client.admin().describe_cluster().await;
        if cluster.is_ok_and(|c| c.brokers.iter().filter(|b| !b.fenced).count() == args.brokers as usize) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // Six partitions, each on three brokers (fewer with fewer brokers), and
    // acks=all needing two copies: one broker may die without losing an
    // acknowledged record.
    let replication_factor = args.brokers.min(3);
    let mut demo =
        tally_client::NewTopic::new("demo", 6).config("min_insync_replicas", replication_factor.min(2).to_string());
    demo.replication_factor = replication_factor;
    let mut created = Err(anyhow::anyhow!("not tried"));
    // The brokers register once a majority of them runs: retry for a while.
    for _ in 0..100 {
        created = match client.admin().create_topic(demo.clone()).await {
            Ok(()) => Ok(()),
            Err(e) if e.code() == Some(tally_client::ErrorCode::TopicAlreadyExists) => Ok(()),
            Err(e) => Err(e.into()),
        };
        if created.is_ok() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    created.context("cannot create the demo topic")?;
    eprintln!(
        "\nTally is running: {} broker(s) in this process at {} (data in {}),\n\
         with topic `demo`: 6 partitions, replication factor {replication_factor}.\n\
         Try, in another terminal:\n\
         \n  echo hello | cargo run --release -- produce demo\
         \n  cargo run --release -- consume demo --from beginning --exit-at-end\
         \n  cargo run --release -- topic describe demo\
         \n  cargo run --release -- cluster status\n\
         \nCtrl-C stops them all.",
        args.brokers,
        addresses.join(", "),
        args.data_dir.display()
    );
    shutdown_signal().await;
    for stop in stops {
        let _ = stop.send(());
    }
    for broker in brokers {
        broker.await.context("broker task failed")??;
    }
    Ok(())
}
