//! The `tally` command line: flags, config and tracing, then calls into the
//! broker and client crates. Data goes to stdout, logs and progress to
//! stderr; any error exits non-zero.

mod commands;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use commands::{bench, cluster, consume, dev, dump_log, group, offsets, produce, serve, topic};

/// Tally: a replicated, partitioned event log.
#[derive(Debug, Parser)]
#[command(name = "tally", version, about)]
struct Cli {
    /// Brokers to connect to (host:port, comma-separated).
    #[arg(long, global = true, env = "TALLY_BOOTSTRAP", default_value = "127.0.0.1:9092", value_delimiter = ',')]
    bootstrap: Vec<String>,
    /// How to print results: `table` for people, `json` for scripts.
    #[arg(long, global = true, default_value = "table")]
    output: commands::Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one broker in the foreground.
    Serve(serve::ServeArgs),
    /// Run a local cluster (three brokers, each its own process, data in
    /// ./.tally/dev) with a `demo` topic; break it with `tally dev kill N`.
    Dev(dev::DevArgs),
    /// Create, list, describe, alter and delete topics.
    #[command(subcommand)]
    Topic(topic::TopicCommand),
    /// Produce one record per line of standard input.
    Produce(produce::ProduceArgs),
    /// Print records of a topic.
    Consume(consume::ConsumeArgs),
    /// List, describe and delete consumer groups; reset their offsets.
    #[command(subcommand)]
    Group(group::GroupCommand),
    /// Print the earliest, latest or by-time offset of each partition.
    Offsets(offsets::OffsetsArgs),
    /// Print the batches of a segment file (or of every segment in a directory).
    DumpLog(dump_log::DumpLogArgs),
    /// The controller quorum and the brokers of the cluster.
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// Measure produce or consume throughput and latency against a broker.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TALLY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let server = match &cli.command {
        Command::Serve(_) => true,
        Command::Dev(args) => args.starts_cluster(),
        _ => false,
    };
    if !server {
        // Like other Unix tools, end quietly when the reader of our output
        // goes away (`tally topic describe x | head`), instead of panicking
        // in println!. Never for a broker: hyper writes sockets with writev,
        // which raises SIGPIPE when a peer has reset the connection, and
        // that would kill the broker.
        // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    init_tracing(if server { "info,openraft=warn" } else { "warn" });
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let ctx = commands::Context { bootstrap: cli.bootstrap, output: cli.output };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve::serve(args).await,
            Command::Dev(args) => dev::run(ctx.output, args).await,
            Command::Topic(cmd) => topic::run(&ctx, cmd).await,
            Command::Produce(args) => produce::run(&ctx, args).await,
            Command::Consume(args) => consume::run(&ctx, args).await,
            Command::Group(cmd) => group::run(&ctx, cmd).await,
            Command::Offsets(args) => offsets::run(&ctx, args).await,
            Command::DumpLog(args) => dump_log::run(&ctx, args),
            Command::Bench(cmd) => bench::run(&ctx, cmd).await,
            Command::Cluster(cmd) => cluster::run(&ctx, cmd).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
