//! `tally offsets`: earliest, latest or by-time offsets per partition.

use anyhow::Context as _;
use serde_json::json;
use tally_client::OffsetSpec;

use super::{Context, Output, print_table};

/// Flags of `tally offsets`.
#[derive(Debug, clap::Args)]
pub struct OffsetsArgs {
    /// Topic.
    topic: String,
    /// earliest (or -2, as in Kafka's tools), latest (or -1), max-timestamp
    /// (or -3: the record with the largest timestamp), or a timestamp in
    /// ms: the first offset whose record is at least that old.
    #[arg(long, default_value = "latest", allow_hyphen_values = true)]
    time: String,
}

/// `--time` as Kafka's tools read it.
fn parse_time(time: &str) -> anyhow::Result<OffsetSpec> {
    Ok(match time {
        "earliest" | "-2" => OffsetSpec::Earliest,
        "latest" | "-1" => OffsetSpec::Latest,
        "max-timestamp" | "-3" => OffsetSpec::MaxTimestamp,
        ms => {
            let ms: i64 = ms.parse().with_context(|| {
                format!("--time takes earliest, latest, max-timestamp, -1, -2, -3 or ms, not `{ms}`")
            })?;
            anyhow::ensure!(ms >= 0, "--time {ms}: a timestamp is at least 0 (-1 is latest, -2 earliest)");
            OffsetSpec::Timestamp(ms)
        }
    })
}

/// Runs `tally offsets`.
pub async fn run(ctx: &Context, args: OffsetsArgs) -> anyhow::Result<()> {
    let spec = parse_time(&args.time)?;
    let client = ctx.connect().await?;
    let info = client.topic_info(&args.topic).await?;
    let mut rows = Vec::new();
    for p in 0..info.leaders.len() as u32 {
        let offset = client.partition_client(args.topic.clone(), p).list_offset(spec).await?;
        rows.push((p, offset));
    }
    match ctx.output {
        Output::Json => {
            let list: Vec<_> = rows.iter().map(|(p, o)| json!({"partition": p, "offset": o})).collect();
            println!("{}", serde_json::to_string_pretty(&list)?);
        }
        Output::Table => {
            let rows: Vec<Vec<String>> =
                rows.iter().map(|(p, o)| vec![p.to_string(), o.map_or("-".to_string(), |o| o.to_string())]).collect();
            print_table(&["PARTITION", "OFFSET"], &rows);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_reads_kafkas_special_values() {
        assert_eq!(parse_time("-1").unwrap(), OffsetSpec::Latest);
        assert_eq!(parse_time("-2").unwrap(), OffsetSpec::Earliest);
        assert_eq!(parse_time("latest").unwrap(), OffsetSpec::Latest);
        assert_eq!(parse_time("1700000000000").unwrap(), OffsetSpec::Timestamp(1_700_000_000_000));
        assert!(matches!(parse_time("-3").unwrap(), OffsetSpec::MaxTimestamp));
        assert!(parse_time("-7").is_err());
        assert!(parse_time("soon").is_err());
    }
}
