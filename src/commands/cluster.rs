//! `tally cluster status`: the controller quorum and the brokers.

use tally_client::{Client, ClusterDescription};

use super::{Context, Output, print_table};

/// `tally cluster` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum ClusterCommand {
    /// The controller leader, term and commit index, each voter's progress,
    /// and each broker with its address, incarnation and fenced state.
    Status,
}

/// Runs a `tally cluster` subcommand.
pub async fn run(ctx: &Context, cmd: ClusterCommand) -> anyhow::Result<()> {
    match cmd {
        ClusterCommand::Status => status(ctx).await,
    }
}

async fn status(ctx: &Context) -> anyhow::Result<()> {
    let client = ctx.connect().await?;
    let mut cluster = client.admin().describe_cluster().await?;
    // Voter progress is known at the leader: ask it when someone else answered.
    if let Some(leader) = cluster.leader
        && leader != cluster.answered_by
        && let Some(address) = cluster.brokers.iter().find(|b| b.id == leader).map(|b| b.address.clone())
        && let Ok(at_leader) = async {
            let c = Client::builder().bootstrap([address]).connect().await?;
            c.admin().describe_cluster().await
        }
        .await
        && at_leader.leader == Some(leader)
    {
        cluster = at_leader;
    }
    let mut partitions = client.admin().partition_states().await?;
    // Only a leader knows it cannot serve a partition: ask each live broker.
    for b in cluster.brokers.iter().filter(|b| !b.fenced) {
        let Ok(theirs) = client.admin().partition_states_at(Some(&b.address)).await else { continue };
        for (topic, p) in theirs.into_iter().filter(|(_, p)| p.leader == Some(b.id) && p.leader_error.is_some()) {
            if let Some((_, ours)) = partitions.iter_mut().find(|(t, q)| *t == topic && q.partition == p.partition) {
                ours.leader_error = p.leader_error;
            }
        }
    }
    let health = PartitionHealth::of(&partitions);
    match ctx.output {
        Output::Json => {
            let mut out = to_json(&cluster);
            out["under_replicated_partitions"] = health.under_replicated.iter().map(|p| p.to_json()).collect();
            out["offline_partitions"] = health.offline.iter().map(|p| p.to_json()).collect();
            out["unavailable_partitions"] = health.unavailable.iter().map(|p| p.to_json()).collect();
            println!("{out}");
        }
        Output::Table => {
            print_status(&cluster);
            health.print();
        }
    }
    Ok(())
}

/// A partition that needs attention.
struct Trouble {
    topic: String,
    partition: u32,
    leader: Option<u32>,
    replicas: Vec<u32>,
    isr: Vec<u32>,
    /// Why its leader cannot serve it, when it said so.
    leader_error: Option<String>,
}

impl Trouble {
    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "topic": self.topic, "partition": self.partition, "leader": self.leader,
            "replicas": self.replicas, "isr": self.isr, "leader_error": self.leader_error,
        })
    }
}

/// Under-replicated (ISR smaller than the replica list), offline (no
/// leader) and unavailable (a leader that cannot serve it) partitions.
struct PartitionHealth {
    under_replicated: Vec<Trouble>,
    offline: Vec<Trouble>,
    unavailable: Vec<Trouble>,
}

impl PartitionHealth {
    fn of(partitions: &[(String, tally_client::PartitionDescription)]) -> Self {
        let mut health = PartitionHealth { under_replicated: Vec::new(), offline: Vec::new(), unavailable: Vec::new() };
        for (topic, p) in partitions {
            let trouble = || Trouble {
                topic: topic.clone(),
                partition: p.partition,
                leader: p.leader,
                replicas: p.replicas.clone(),
                isr: p.isr.clone(),
                leader_error: p.leader_error.clone(),
            };
            if p.leader.is_none() {
                health.offline.push(trouble());
            } else if p.leader_error.is_some() {
                health.unavailable.push(trouble());
            } else if p.isr.len() < p.replicas.len() {
                health.under_replicated.push(trouble());
            }
        }
        health
    }

    fn print(&self) {
        let list = |v: &[u32]| v.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        let groups = [
            ("under-replicated", &self.under_replicated),
            ("offline", &self.offline),
            ("unavailable", &self.unavailable),
        ];
        for (title, rows) in groups {
            println!();
            if rows.is_empty() {
                println!("{title} partitions: none");
                continue;
            }
            println!("{title} partitions: {}", rows.len());
            let rows: Vec<Vec<String>> = rows
                .iter()
                .map(|t| {
                    vec![
                        t.topic.clone(),
                        t.partition.to_string(),
                        or_dash(t.leader),
                        list(&t.replicas),
                        list(&t.isr),
                        t.leader_error.clone().unwrap_or_else(|| "-".into()),
                    ]
                })
                .collect();
            print_table(&["TOPIC", "PARTITION", "LEADER", "REPLICAS", "ISR", "LEADER-ERROR"], &rows);
        }
    }
}

fn to_json(c: &ClusterDescription) -> serde_json::Value {
    serde_json::json!({
        "leader": c.leader,
        "term": c.term,
        "commit_index": c.commit_index,
        "answered_by": c.answered_by,
        "voters": c.voters.iter().map(|v| serde_json::json!({
            "id": v.id, "matched_index": v.matched_index, "lag": v.lag,
        })).collect::<Vec<_>>(),
        "brokers": c.brokers.iter().map(|b| serde_json::json!({
            "id": b.id, "address": b.address, "incarnation": format!("{:#018x}", b.incarnation), "fenced": b.fenced,
        })).collect::<Vec<_>>(),
    })
}

fn or_dash<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

fn print_status(c: &ClusterDescription) {
    println!(
        "controller leader: {}  term: {}  commit index: {}  (answered by {})",
        c.leader.map_or_else(|| "none (election under way)".to_string(), |l| l.to_string()),
        c.term,
        or_dash(c.commit_index),
        c.answered_by
    );
    println!();
    let voters: Vec<Vec<String>> = c
        .voters
        .iter()
        .map(|v| {
            let role = if Some(v.id) == c.leader { "leader" } else { "follower" };
            vec![v.id.to_string(), role.to_string(), or_dash(v.matched_index), or_dash(v.lag)]
        })
        .collect();
    print_table(&["VOTER", "ROLE", "MATCHED", "LAG"], &voters);
    println!();
    let brokers: Vec<Vec<String>> = c
        .brokers
        .iter()
        .map(|b| {
            let state = if b.fenced { "fenced" } else { "active" };
            vec![b.id.to_string(), b.address.clone(), format!("{:#018x}", b.incarnation), state.to_string()]
        })
        .collect();
    print_table(&["BROKER", "ADDRESS", "INCARNATION", "STATE"], &brokers);
}
