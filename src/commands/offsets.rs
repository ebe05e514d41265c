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
    /// earliest, latest, or a timestamp in ms.
    #[arg(long, default_value = "latest")]
    time: String,
}

/// Runs `tally offsets`.
pub async fn run(ctx: &Context, args: OffsetsArgs) -> anyhow::Result<()> {
    let spec = match args.time.as_str() {
        "earliest" => OffsetSpec::Earliest,
        "latest" => OffsetSpec::Latest,
        ms => OffsetSpec::Timestamp(
            ms.parse().with_context(|| format!("--time takes earliest, latest or ms, not `{ms}`"))?,
        ),
    };
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
