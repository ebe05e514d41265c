//! `tally topic ...`.

use std::collections::BTreeMap;

use anyhow::bail;
use serde_json::json;
use tally_client::NewTopic;

use super::{Context, Output, parse_key_value, print_table};

/// Topic subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum TopicCommand {
    /// Create a topic.
    Create {
        /// Topic name.
        name: String,
        /// Number of partitions.
        #[arg(long, default_value_t = 1)]
        partitions: u32,
        /// Replicas per partition.
        #[arg(long, default_value_t = 1)]
        replication_factor: u32,
        /// Config override, KEY=VALUE (repeatable), e.g. retention_ms=86400000.
        #[arg(long = "config", value_parser = parse_key_value)]
        configs: Vec<(String, String)>,
    },
    /// List topics.
    List,
    /// Show partitions (leader, replicas, ISR, offsets) and configs.
    Describe {
        /// Topic name.
        name: String,
    },
    /// Add partitions or change configs.
    Alter {
        /// Topic name.
        name: String,
        /// New total number of partitions.
        #[arg(long)]
        partitions: Option<u32>,
        /// Config to set, KEY=VALUE (repeatable).
        #[arg(long = "config", value_parser = parse_key_value)]
        configs: Vec<(String, String)>,
        /// Config to reset to the broker default (repeatable).
        #[arg(long = "delete-config")]
        delete_configs: Vec<String>,
    },
    /// Delete a topic and its data.
    Delete {
        /// Topic name.
        name: String,
    },
}

/// Runs a topic subcommand.
pub async fn run(ctx: &Context, cmd: TopicCommand) -> anyhow::Result<()> {
    let client = ctx.connect().await?;
    let admin = client.admin();
    match cmd {
        TopicCommand::Create { name, partitions, replication_factor, configs } => {
            let topic =
                NewTopic { name: name.clone(), partitions, replication_factor, configs: configs.into_iter().collect() };
            admin.create_topic(topic).await?;
            eprintln!("created topic {name} with {partitions} partition(s)");
        }
        TopicCommand::List => {
            let topics = admin.list_topics().await?;
            match ctx.output {
                Output::Json => {
                    let list: Vec<_> = topics
                        .iter()
                        .map(|t| json!({"name": t.name, "partitions": t.partitions, "replication_factor": t.replication_factor}))
                        .collect();
                    println!("{}", serde_json::to_string_pretty(&list)?);
                }
                Output::Table => {
                    let rows: Vec<Vec<String>> = topics
                        .iter()
                        .map(|t| vec![t.name.clone(), t.partitions.to_string(), t.replication_factor.to_string()])
                        .collect();
                    print_table(&["TOPIC", "PARTITIONS", "REPLICATION"], &rows);
                }
            }
        }
        TopicCommand::Describe { name } => {
            let d = admin.describe_topic(&name).await?;
            match ctx.output {
                Output::Json => {
                    let partitions: Vec<_> = d
                        .partitions
                        .iter()
                        .map(|p| {
                            json!({
                                "partition": p.partition,
                                "leader": p.leader,
                                "leader_epoch": p.leader_epoch,
                                "replicas": p.replicas,
                                "isr": p.isr,
                                "log_start_offset": p.log_start_offset,
                                "high_watermark": p.high_watermark,
                                "log_end_offset": p.log_end_offset,
                                "replica_lags": p.replica_lags.iter()
                                    .map(|(b, lag)| json!({"broker": b, "lag": lag}))
                                    .collect::<Vec<_>>(),
                                "leader_error": p.leader_error,
                                "compaction": p.compaction.map(|c| json!({
                                    "dirty_ratio": c.dirty_ratio,
                                    "cleaner_offset": c.cleaner_offset,
                                    "last_clean_ms": c.last_clean_ms,
                                })),
                            })
                        })
                        .collect();
                    let out = json!({"name": d.name, "configs": d.configs, "partitions": partitions});
                    println!("{}", serde_json::to_string_pretty(&out)?);
                }
                Output::Table => {
                    let list = |v: &[u32]| v.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
                    let rows: Vec<Vec<String>> = d
                        .partitions
                        .iter()
                        .map(|p| {
                            let lags = p
                                .replica_lags
                                .iter()
                                .map(|(b, lag)| format!("{b}:{}", lag.map_or("?".to_string(), |l| l.to_string())))
                                .collect::<Vec<_>>()
                                .join(",");
                            vec![
                                p.partition.to_string(),
                                p.leader.map_or("-".to_string(), |l| l.to_string()),
                                p.leader_epoch.to_string(),
                                list(&p.replicas),
                                list(&p.isr),
                                p.log_start_offset.to_string(),
                                p.high_watermark.to_string(),
                                p.log_end_offset.to_string(),
                                if lags.is_empty() { "-".to_string() } else { lags },
                            ]
                        })
                        .collect();
                    println!("Topic: {}", d.name);
                    print_table(
                        &[
                            "PARTITION",
                            "LEADER",
                            "EPOCH",
                            "REPLICAS",
                            "ISR",
                            "LOG-START",
                            "HIGH-WATERMARK",
                            "LOG-END",
                            "FOLLOWER-LAG",
                        ],
                        &rows,
                    );
                    for p in &d.partitions {
                        if let Some(c) = &p.compaction {
                            let last = c.last_clean_ms.map_or("not since its leader started".to_string(), |ms| {
                                format!("{} s ago", (now_ms() - ms).max(0) / 1000)
                            });
                            println!(
                                "partition {}: compacted below offset {}, dirty ratio {:.2}, last clean {last}",
                                p.partition, c.cleaner_offset, c.dirty_ratio
                            );
                        }
                        if let Some(e) = &p.leader_error {
                            println!(
                                "partition {}: unavailable, its leader cannot serve it (retrying): {e}",
                                p.partition
                            );
                        }
                    }
                    println!();
                    let rows: Vec<Vec<String>> = d.configs.iter().map(|(k, v)| vec![k.clone(), v.clone()]).collect();
                    print_table(&["CONFIG", "VALUE"], &rows);
                }
            }
        }
        TopicCommand::Alter { name, partitions, configs, delete_configs } => {
            if partitions.is_none() && configs.is_empty() && delete_configs.is_empty() {
                bail!("nothing to change: give --partitions, --config or --delete-config");
            }
            if let Some(count) = partitions {
                admin.create_partitions(&name, count).await?;
                eprintln!("topic {name} now has {count} partitions");
            }
            if !configs.is_empty() || !delete_configs.is_empty() {
                let set: BTreeMap<String, String> = configs.into_iter().collect();
                admin.alter_topic_configs(&name, set, delete_configs).await?;
                eprintln!("updated configs of {name}");
            }
        }
        TopicCommand::Delete { name } => {
            admin.delete_topic(&name).await?;
            eprintln!("deleted topic {name}");
        }
    }
    Ok(())
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> i64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
}
