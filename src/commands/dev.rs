//! `tally dev`: run a local cluster (one child process per broker) and
//! break it by hand from another terminal.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use serde_json::json;
use tally::dev::{Action, BrokerSlot, DevCluster, DevOptions};

use super::{Output, print_table};

/// Flags of `tally dev`.
#[derive(Debug, clap::Args)]
pub struct DevArgs {
    /// Act on the running dev cluster instead of starting one.
    #[command(subcommand)]
    action: Option<DevAction>,
    /// Address of the first broker; the others listen on the next ports
    /// (port 0: any free ports).
    #[arg(long, default_value = "127.0.0.1:9092", global = true)]
    listen: SocketAddr,
    /// Brokers to run, all controller voters, each its own process.
    #[arg(long, default_value_t = 3)]
    brokers: u32,
    /// Data directory, kept across runs (one subdirectory per broker); the
    /// other `tally dev` commands find the running cluster through it.
    #[arg(long, default_value = ".tally/dev", global = true)]
    data_dir: PathBuf,
    /// Wipe the brokers' data before starting.
    #[arg(long)]
    fresh: bool,
    /// Prometheus metrics of the first broker on this address, the others
    /// on the next ports (port 0: any free ports).
    #[arg(long, default_value = "127.0.0.1:9644")]
    metrics_listen: SocketAddr,
    /// No metrics endpoints.
    #[arg(long)]
    no_metrics: bool,
}

/// What to do to the running dev cluster.
#[derive(Debug, clap::Subcommand)]
pub enum DevAction {
    /// Brokers (process state, address, metrics), the controller leader,
    /// and each partition's leader and ISR.
    Status,
    /// Kill broker N at once (SIGKILL), as a crash would.
    Kill {
        /// Broker id.
        broker: u32,
    },
    /// Start broker N again (a running one is stopped cleanly first).
    Restart {
        /// Broker id.
        broker: u32,
    },
    /// Freeze broker N (SIGSTOP), as a stalled machine would be.
    Pause {
        /// Broker id.
        broker: u32,
    },
    /// Let a paused broker N run again (SIGCONT).
    Resume {
        /// Broker id.
        broker: u32,
    },
}

impl DevArgs {
    /// Whether this runs the cluster (rather than acting on a running one).
    pub fn starts_cluster(&self) -> bool {
        self.action.is_none()
    }
}

/// Runs `tally dev` or one of its actions.
pub async fn run(output: Output, args: DevArgs) -> anyhow::Result<()> {
    let (action, broker) = match args.action {
        None => return start(args).await,
        Some(DevAction::Status) => return status(output, &args.data_dir).await,
        Some(DevAction::Kill { broker }) => (Action::Kill, broker),
        Some(DevAction::Restart { broker }) => (Action::Restart, broker),
        Some(DevAction::Pause { broker }) => (Action::Pause, broker),
        Some(DevAction::Resume { broker }) => (Action::Resume, broker),
    };
    println!("{}", tally::dev::act(&args.data_dir, action, broker).await?);
    Ok(())
}

async fn start(args: DevArgs) -> anyhow::Result<()> {
    let options = DevOptions {
        binary: std::env::current_exe().context("cannot find the tally binary")?,
        brokers: args.brokers,
        listen: args.listen,
        metrics_listen: (!args.no_metrics).then_some(args.metrics_listen),
        data_dir: args.data_dir.clone(),
        fresh: args.fresh,
    };
    // Watched from the start, so a Ctrl-C while the brokers start stops
    // them too instead of leaving them running.
    let shutdown = crate::commands::serve::shutdown_signal();
    tokio::pin!(shutdown);
    let cluster = tokio::select! {
        started = DevCluster::start(options) => started?,
        () = &mut shutdown => anyhow::bail!("interrupted while the brokers were starting"),
    };
    let addresses = cluster.addresses();
    let replication_factor = tokio::select! {
        created = create_demo(&addresses, args.brokers) => created?,
        () = &mut shutdown => {
            cluster.run(std::future::ready(())).await?;
            anyhow::bail!("interrupted while the brokers were starting");
        }
    };
    let metrics = cluster.metrics_addresses();
    let dir = args.data_dir.display();
    let on_dir = if args.data_dir == Path::new(".tally/dev") { String::new() } else { format!(" --data-dir {dir}") };
    let bootstrap = if args.listen.port() == 9092 { String::new() } else { format!(" --bootstrap {}", addresses[0]) };
    let mut banner = format!(
        "\nTally is running: {} brokers, each its own process (data in {dir}).\n\
         bootstrap: {}\n\
         topic `demo`: 6 partitions, replication factor {replication_factor}\n",
        args.brokers,
        addresses.join(","),
    );
    if !metrics.is_empty() {
        banner += &format!(
            "metrics: {}\n",
            metrics.iter().map(|m| format!("http://{m}/metrics")).collect::<Vec<_>>().join(" ")
        );
    }
    banner += &format!(
        "\nTry, in another terminal:\n\
         \n  echo hello | cargo run --release --{bootstrap} produce demo\
         \n  cargo run --release --{bootstrap} consume demo --from beginning --exit-at-end\
         \n  cargo run --release --{bootstrap} topic describe demo\n\
         \nBreak it: `tally dev{on_dir} status`, `kill N`, `restart N`, `pause N`, `resume N`.\
         \nCtrl-C stops them all.\n"
    );
    eprintln!("{banner}");
    cluster.run(shutdown).await?;
    eprintln!("dev cluster stopped");
    Ok(())
}

/// Creates `demo` (six partitions, replication factor up to 3, min ISR up
/// to 2: one broker may die without losing an acknowledged record);
/// returns its replication factor.
async fn create_demo(addresses: &[String], brokers: u32) -> anyhow::Result<u32> {
    let client = tally_client::Client::builder().bootstrap(addresses.iter().cloned()).connect().await?;
    // Every broker registered first, so `demo` spreads over all.
    let registered = tally::dev::wait_until(Duration::from_secs(30), async || {
        let cluster = client.admin().describe_cluster().await;
        cluster.is_ok_and(|c| c.brokers.iter().filter(|b| !b.fenced).count() == brokers as usize)
    })
    .await;
    anyhow::ensure!(registered, "the {brokers} brokers did not all register within 30 s");
    let replication_factor = brokers.min(3);
    let mut demo =
        tally_client::NewTopic::new("demo", 6).config("min_insync_replicas", replication_factor.min(2).to_string());
    demo.replication_factor = replication_factor;
    let mut created = Err(anyhow::anyhow!("not tried"));
    for _ in 0..100 {
        created = match client.admin().create_topic(demo.clone()).await {
            Ok(()) => Ok(()),
            Err(e) if e.code() == Some(tally_client::ErrorCode::TopicAlreadyExists) => Ok(()),
            Err(e) => Err(e.into()),
        };
        if created.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    created.context("cannot create the demo topic")?;
    Ok(replication_factor)
}

/// `tally dev status`.
async fn status(output: Output, data_dir: &std::path::Path) -> anyhow::Result<()> {
    let slots = tally::dev::slots(data_dir).await?;
    let live: Vec<String> = slots.iter().filter(|s| s.state == "running").map(|s| s.address.clone()).collect();
    let cluster = match live.is_empty() {
        true => None,
        false => view(&live).await.ok(),
    };
    match output {
        Output::Json => {
            let (leader, partitions) = match &cluster {
                Some((leader, partitions)) => (json!(leader), partitions_json(partitions)),
                None => (json!(null), json!([])),
            };
            let brokers: Vec<_> = slots
                .iter()
                .map(
                    |s| json!({"id": s.id, "state": s.state, "pid": s.pid, "address": s.address, "metrics": s.metrics}),
                )
                .collect();
            println!("{}", json!({"brokers": brokers, "controller_leader": leader, "partitions": partitions}));
        }
        Output::Table => print_status(&slots, cluster.as_ref()),
    }
    Ok(())
}

type Partitions = Vec<(String, tally_client::PartitionDescription)>;

/// The controller leader and every partition's state, from the live brokers.
async fn view(live: &[String]) -> anyhow::Result<(Option<u32>, Partitions)> {
    let client = tally_client::Client::builder().bootstrap(live.iter().cloned()).connect().await?;
    let cluster = tokio::time::timeout(Duration::from_secs(5), client.admin().describe_cluster()).await??;
    let partitions = tokio::time::timeout(Duration::from_secs(5), client.admin().partition_states()).await??;
    Ok((cluster.leader, partitions))
}

fn partitions_json(partitions: &Partitions) -> serde_json::Value {
    partitions
        .iter()
        .map(|(t, p)| json!({"topic": t, "partition": p.partition, "leader": p.leader, "isr": p.isr, "replicas": p.replicas}))
        .collect()
}

fn print_status(slots: &[BrokerSlot], cluster: Option<&(Option<u32>, Partitions)>) {
    let rows: Vec<Vec<String>> = slots
        .iter()
        .map(|s| {
            let controller = match cluster {
                Some((Some(leader), _)) if *leader == s.id => "leader",
                _ => "",
            };
            vec![
                s.id.to_string(),
                s.state.clone(),
                s.pid.map_or("-".into(), |p| p.to_string()),
                s.address.clone(),
                s.metrics.clone().unwrap_or_else(|| "-".into()),
                controller.to_string(),
            ]
        })
        .collect();
    print_table(&["BROKER", "STATE", "PID", "ADDRESS", "METRICS", "CONTROLLER"], &rows);
    let Some((_, partitions)) = cluster else {
        println!("\n(no running broker answered: no partition view)");
        return;
    };
    println!();
    let ids = |v: &[u32]| v.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let rows: Vec<Vec<String>> = partitions
        .iter()
        .filter(|(t, _)| !t.starts_with("__"))
        .map(|(t, p)| {
            let health = if p.leader.is_none() {
                "OFFLINE"
            } else if p.isr.len() < p.replicas.len() {
                "under-replicated"
            } else {
                ""
            };
            vec![
                t.clone(),
                p.partition.to_string(),
                p.leader.map_or("none".into(), |l| l.to_string()),
                ids(&p.replicas),
                ids(&p.isr),
                health.to_string(),
            ]
        })
        .collect();
    print_table(&["TOPIC", "PARTITION", "LEADER", "REPLICAS", "ISR", ""], &rows);
}
