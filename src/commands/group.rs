//! `tally group ...`: list, describe, delete consumer groups and reset their
//! offsets (Kafka's `kafka-consumer-groups.sh`).

use std::collections::BTreeMap;

use anyhow::{Context as _, bail};
use serde_json::json;
use tally_client::{Client, OffsetSpec, TopicPartitions};
use tally_proto::ErrorCode;

use super::{Context, Output, parse_key_value, print_table};

/// Group subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum GroupCommand {
    /// List the cluster's consumer groups.
    List,
    /// Show a group's state, members, and each partition's committed offset
    /// and lag.
    Describe {
        /// Group id.
        group: String,
    },
    /// Set a group's committed offsets for a topic (the group must have no
    /// members). Prints the plan; applies it only with --execute.
    ResetOffsets {
        /// Group id.
        group: String,
        /// Topic whose partitions to reset.
        #[arg(long)]
        topic: String,
        /// To the first offset of each partition.
        #[arg(long, group = "to")]
        to_earliest: bool,
        /// To the end of each partition.
        #[arg(long, group = "to")]
        to_latest: bool,
        /// To this offset (clamped to each partition's range).
        #[arg(long, group = "to")]
        to_offset: Option<i64>,
        /// To the first record at or after this time (ms since the epoch).
        #[arg(long, group = "to")]
        to_datetime: Option<i64>,
        /// Move each committed offset by N (negative: back), clamped.
        #[arg(long, group = "to", allow_hyphen_values = true)]
        shift_by: Option<i64>,
        /// Apply the plan (without it, only print it).
        #[arg(long)]
        execute: bool,
    },
    /// Set or remove a group's own configs: consumer_session_timeout_ms,
    /// consumer_heartbeat_interval_ms (unset ones follow the broker's).
    Alter {
        /// Group id.
        group: String,
        /// Config to set, KEY=VALUE (repeatable).
        #[arg(long = "config", value_parser = parse_key_value)]
        configs: Vec<(String, String)>,
        /// Config to remove (repeatable).
        #[arg(long = "delete-config")]
        delete_configs: Vec<String>,
    },
    /// Delete a group (it must have no members) and its committed offsets.
    Delete {
        /// Group id.
        group: String,
    },
}

/// Runs a group subcommand.
pub async fn run(ctx: &Context, cmd: GroupCommand) -> anyhow::Result<()> {
    let client = ctx.connect().await?;
    let admin = client.admin();
    match cmd {
        GroupCommand::List => {
            let groups = admin.list_groups().await?;
            match ctx.output {
                Output::Json => {
                    let list: Vec<_> = groups.iter().map(|g| json!({"group": g.group, "state": g.state})).collect();
                    println!("{}", serde_json::to_string_pretty(&list)?);
                }
                Output::Table => {
                    let rows: Vec<Vec<String>> =
                        groups.iter().map(|g| vec![g.group.clone(), g.state.clone()]).collect();
                    print_table(&["GROUP", "STATE"], &rows);
                }
            }
        }
        GroupCommand::Describe { group } => describe(ctx, &client, &group).await?,
        GroupCommand::Alter { group, configs, delete_configs } => {
            if configs.is_empty() && delete_configs.is_empty() {
                bail!("nothing to change: give --config KEY=VALUE or --delete-config KEY");
            }
            let mut changes: Vec<(&str, Option<&str>)> =
                configs.iter().map(|(k, v)| (k.as_str(), Some(v.as_str()))).collect();
            changes.extend(delete_configs.iter().map(|k| (k.as_str(), None)));
            admin
                .alter_group_configs(&group, &changes)
                .await
                .with_context(|| format!("cannot alter group `{group}`"))?;
            eprintln!("altered group {group}");
        }
        GroupCommand::Delete { group } => {
            admin.delete_group(&group).await.with_context(|| format!("cannot delete group `{group}`"))?;
            eprintln!("deleted group {group}");
        }
        GroupCommand::ResetOffsets {
            group,
            topic,
            to_earliest,
            to_latest,
            to_offset,
            to_datetime,
            shift_by,
            execute,
        } => {
            let to = match (to_earliest, to_latest, to_offset, to_datetime, shift_by) {
                (true, ..) => Target::Earliest,
                (_, true, ..) => Target::Latest,
                (_, _, Some(o), ..) => Target::Offset(o),
                (_, _, _, Some(ms), _) => Target::Datetime(ms),
                (_, _, _, _, Some(n)) => Target::Shift(n),
                _ => bail!("say where to: --to-earliest, --to-latest, --to-offset N, --to-datetime MS or --shift-by N"),
            };
            reset(ctx, &client, &group, &topic, to, execute).await?;
        }
    }
    Ok(())
}

/// A partition of a group: topic, partition, committed offset, log end,
/// lag, member id, host.
type Row = (String, u32, Option<i64>, Option<i64>, Option<i64>, String, String);

async fn describe(ctx: &Context, client: &Client, group: &str) -> anyhow::Result<()> {
    let admin = client.admin();
    let d = admin.describe_group(group).await.with_context(|| format!("cannot describe group `{group}`"))?;
    let committed = admin.group_offsets(group, &TopicPartitions::new()).await?;
    // Every partition the group owns or has committed, with its owner.
    let mut owner: BTreeMap<(String, u32), (String, String)> = BTreeMap::new();
    for m in &d.members {
        for (t, ps) in &m.assignment {
            for p in ps {
                owner.insert((t.clone(), *p), (m.member_id.clone(), m.client_host.clone()));
            }
        }
    }
    let mut keys: Vec<(String, u32)> = committed.keys().cloned().chain(owner.keys().cloned()).collect();
    keys.sort();
    keys.dedup();
    let mut ends: BTreeMap<String, BTreeMap<u32, i64>> = BTreeMap::new();
    for (t, _) in &keys {
        if !ends.contains_key(t) {
            let e = match admin.describe_topic(t).await {
                Ok(desc) => desc.partitions.iter().map(|p| (p.partition, p.high_watermark)).collect(),
                Err(_) => BTreeMap::new(),
            };
            ends.insert(t.clone(), e);
        }
    }
    let rows: Vec<Row> = keys
        .iter()
        .map(|(t, p)| {
            let current = committed.get(&(t.clone(), *p)).map(|c| c.offset).filter(|o| *o >= 0);
            let end = ends.get(t).and_then(|e| e.get(p)).copied().filter(|e| *e >= 0);
            let lag = end.map(|e| e - current.unwrap_or(0)).map(|l| l.max(0));
            let (member, host) = owner.get(&(t.clone(), *p)).cloned().unwrap_or_default();
            (t.clone(), *p, current, end, lag, member, host)
        })
        .collect();
    match ctx.output {
        Output::Json => {
            let members: Vec<_> = d
                .members
                .iter()
                .map(|m| {
                    let assigned: Vec<_> = m
                        .assignment
                        .iter()
                        .flat_map(|(t, ps)| ps.iter().map(move |p| json!({"topic": t, "partition": p})))
                        .collect();
                    json!({"id": m.member_id, "epoch": m.member_epoch, "state": m.state, "host": m.client_host, "assigned": assigned})
                })
                .collect();
            let partitions: Vec<_> = rows
                .iter()
                .map(|(t, p, c, e, l, m, _)| {
                    json!({"topic": t, "partition": p, "committed_offset": c, "log_end_offset": e, "lag": l,
                           "member_id": if m.is_empty() { None } else { Some(m) }})
                })
                .collect();
            let out = json!({"group": d.group, "state": d.state, "epoch": d.epoch, "assignor": d.assignor,
                             "configs": d.configs, "members": members, "partitions": partitions});
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        Output::Table => {
            let configs: Vec<String> = d.configs.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!(
                "GROUP {}  STATE {}  EPOCH {}  ASSIGNOR {}  MEMBERS {}{}\n",
                d.group,
                d.state,
                d.epoch,
                d.assignor,
                d.members.len(),
                if configs.is_empty() { String::new() } else { format!("  CONFIGS {}", configs.join(",")) }
            );
            let dash = |v: &Option<i64>| v.map_or("-".to_string(), |v| v.to_string());
            let table: Vec<Vec<String>> = rows
                .iter()
                .map(|(t, p, c, e, l, m, h)| {
                    vec![
                        d.group.clone(),
                        t.clone(),
                        p.to_string(),
                        dash(c),
                        dash(e),
                        dash(l),
                        if m.is_empty() { "-".into() } else { m.clone() },
                        if h.is_empty() { "-".into() } else { h.clone() },
                    ]
                })
                .collect();
            print_table(
                &["GROUP", "TOPIC", "PARTITION", "CURRENT-OFFSET", "LOG-END-OFFSET", "LAG", "MEMBER-ID", "HOST"],
                &table,
            );
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
enum Target {
    Earliest,
    Latest,
    Offset(i64),
    Datetime(i64),
    Shift(i64),
}

async fn reset(
    ctx: &Context,
    client: &Client,
    group: &str,
    topic: &str,
    to: Target,
    execute: bool,
) -> anyhow::Result<()> {
    let admin = client.admin();
    match admin.describe_group(group).await {
        Ok(d) if !d.members.is_empty() => bail!(
            "group `{group}` has {} active member(s); stop its consumers (or wait for their sessions to end) first",
            d.members.len()
        ),
        Ok(_) => {}
        Err(e) if e.code() == Some(ErrorCode::GroupIdNotFound) => {}
        Err(e) => return Err(e).context(format!("cannot read group `{group}`")),
    }
    let info = client.topic_info(topic).await.with_context(|| format!("cannot reset offsets of `{topic}`"))?;
    let partitions: TopicPartitions = BTreeMap::from([(topic.to_string(), (0..info.leaders.len() as u32).collect())]);
    let committed = admin.group_offsets(group, &partitions).await?;
    let mut plan: BTreeMap<(String, u32), i64> = BTreeMap::new();
    for p in 0..info.leaders.len() as u32 {
        let pc = client.partition_client(topic.to_string(), p);
        let earliest = pc.list_offset(OffsetSpec::Earliest).await?.unwrap_or(0);
        let latest = pc.list_offset(OffsetSpec::Latest).await?.unwrap_or(0);
        let current = committed.get(&(topic.to_string(), p)).map(|c| c.offset).filter(|o| *o >= 0);
        let target = match to {
            Target::Earliest => earliest,
            Target::Latest => latest,
            Target::Offset(o) => o,
            Target::Datetime(ms) => pc.list_offset(OffsetSpec::Timestamp(ms)).await?.unwrap_or(latest),
            Target::Shift(n) => current.unwrap_or(latest).saturating_add(n),
        };
        plan.insert((topic.to_string(), p), target.clamp(earliest, latest));
    }
    match ctx.output {
        Output::Json => {
            let list: Vec<_> = plan
                .iter()
                .map(|((t, p), o)| json!({"group": group, "topic": t, "partition": p, "new_offset": o}))
                .collect();
            println!("{}", serde_json::to_string_pretty(&json!({"executed": execute, "offsets": list}))?);
        }
        Output::Table => {
            let rows: Vec<Vec<String>> = plan
                .iter()
                .map(|((t, p), o)| vec![group.to_string(), t.clone(), p.to_string(), o.to_string()])
                .collect();
            print_table(&["GROUP", "TOPIC", "PARTITION", "NEW-OFFSET"], &rows);
        }
    }
    if execute {
        admin.alter_group_offsets(group, &plan).await.with_context(|| format!("cannot reset group `{group}`"))?;
        eprintln!("reset {} partition(s) of group {group}", plan.len());
    } else {
        eprintln!("dry run: add --execute to apply");
    }
    Ok(())
}
