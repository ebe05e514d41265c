//! One module per subcommand, plus what they share.

pub mod bench;
pub mod cluster;
pub mod consume;
pub mod dev;
pub mod dump_log;
pub mod group;
pub mod offsets;
pub mod produce;
pub mod serve;
pub mod topic;

use anyhow::Context as _;
use tally_client::Client;

/// Output format for commands that print tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    Table,
    /// JSON for scripts (a stable interface).
    Json,
}

/// What every command gets from the global flags.
#[derive(Debug, Clone)]
pub struct Context {
    /// Bootstrap brokers.
    pub bootstrap: Vec<String>,
    /// Output format.
    pub output: Output,
}

impl Context {
    /// Connects to the cluster.
    pub async fn connect(&self) -> anyhow::Result<Client> {
        Client::builder()
            .bootstrap(self.bootstrap.iter().cloned())
            .connect()
            .await
            .with_context(|| format!("cannot reach a broker at {}", self.bootstrap.join(",")))
    }
}

/// Prints rows as aligned columns under `header`.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// Parses `k=v`.
pub fn parse_key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected KEY=VALUE, got `{s}`"))
}
