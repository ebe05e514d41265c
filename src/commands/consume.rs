//! `tally consume`: print records, kcat-style.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tally_client::{Consumer, ConsumerConfig, ConsumerRecord, OffsetReset, SeekTo};

use super::Context;

/// Flags of `tally consume`.
#[derive(Debug, clap::Args)]
pub struct ConsumeArgs {
    /// Topic.
    topic: String,
    /// Read only this partition (default: all).
    #[arg(long, conflicts_with = "group")]
    partition: Option<u32>,
    /// Where to start: beginning, end, an offset, or @TIMESTAMP_MS. With
    /// --group: where a partition without a committed offset starts
    /// (beginning or end); a committed offset always wins.
    #[arg(long, default_value = "end")]
    from: String,
    /// Consume as a member of this consumer group: the group's partitions
    /// are shared with its other members, and what was printed is committed
    /// (at least once: a kill never skips a record).
    #[arg(long)]
    group: Option<String>,
    /// Stop after this many records.
    #[arg(short = 'n', long = "count")]
    count: Option<u64>,
    /// Stop when every partition has been read to its high watermark.
    #[arg(long)]
    exit_at_end: bool,
    /// Output format, kcat's tokens: %s value (%v too), %k key, %S value
    /// size and %K key size (-1 for null), %t topic, %p partition, %o offset,
    /// %T timestamp, %h headers, %% a percent sign; \n, \t escapes. An
    /// unknown token is an error.
    #[arg(long, default_value = "%v\\n")]
    format: String,
}

fn parse_from(s: &str) -> anyhow::Result<SeekTo> {
    Ok(match s {
        "beginning" | "earliest" => SeekTo::Beginning,
        "end" | "latest" => SeekTo::End,
        ts if ts.starts_with('@') => {
            SeekTo::Timestamp(ts[1..].parse().with_context(|| format!("bad timestamp in `{s}`"))?)
        }
        offset => SeekTo::Offset(
            offset
                .parse()
                .with_context(|| format!("--from takes beginning, end, OFFSET or @TIMESTAMP_MS, not `{s}`"))?,
        ),
    })
}

/// One piece of a parsed `--format`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Literal(String),
    Topic,
    Partition,
    Offset,
    Key,
    Value,
    KeySize,
    ValueSize,
    Timestamp,
    Headers,
}

fn parse_format(format: &str) -> anyhow::Result<Vec<Token>> {
    let mut out = Vec::new();
    let mut lit = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        let token = match (c, chars.clone().next()) {
            ('%', Some(n)) => {
                chars.next();
                match n {
                    't' => Some(Token::Topic),
                    'p' => Some(Token::Partition),
                    'o' => Some(Token::Offset),
                    'k' => Some(Token::Key),
                    's' | 'v' => Some(Token::Value),
                    'K' => Some(Token::KeySize),
                    'S' => Some(Token::ValueSize),
                    'T' => Some(Token::Timestamp),
                    'h' => Some(Token::Headers),
                    '%' => {
                        lit.push('%');
                        None
                    }
                    other => bail!("--format: unknown token `%{other}` (known: %s %v %k %S %K %t %p %o %T %h %%)"),
                }
            }
            ('%', None) => bail!("--format ends with a lone `%` (write %% for a percent sign)"),
            ('\\', Some(n)) => {
                chars.next();
                lit.push(match n {
                    'n' => '\n',
                    't' => '\t',
                    '\\' => '\\',
                    other => other,
                });
                None
            }
            (c, _) => {
                lit.push(c);
                None
            }
        };
        if let Some(t) = token {
            if !lit.is_empty() {
                out.push(Token::Literal(std::mem::take(&mut lit)));
            }
            out.push(t);
        }
    }
    if !lit.is_empty() {
        out.push(Token::Literal(lit));
    }
    Ok(out)
}

fn write_record(out: &mut impl Write, tokens: &[Token], r: &ConsumerRecord) -> std::io::Result<()> {
    for t in tokens {
        match t {
            Token::Literal(s) => out.write_all(s.as_bytes())?,
            Token::Topic => out.write_all(r.topic.as_bytes())?,
            Token::Partition => write!(out, "{}", r.partition)?,
            Token::Offset => write!(out, "{}", r.offset)?,
            Token::Key => out.write_all(r.key.as_deref().unwrap_or(b""))?,
            Token::Value => out.write_all(r.value.as_deref().unwrap_or(b""))?,
            Token::KeySize => write!(out, "{}", r.key.as_ref().map_or(-1, |k| k.len() as i64))?,
            Token::ValueSize => write!(out, "{}", r.value.as_ref().map_or(-1, |v| v.len() as i64))?,
            Token::Timestamp => write!(out, "{}", r.timestamp)?,
            Token::Headers => {
                for (i, (k, v)) in r.headers.iter().enumerate() {
                    if i > 0 {
                        out.write_all(b",")?;
                    }
                    out.write_all(k.as_bytes())?;
                    out.write_all(b"=")?;
                    out.write_all(v.as_deref().unwrap_or(b""))?;
                }
            }
        }
    }
    Ok(())
}

/// How long `tally consume` rides out retriable errors before giving up.
const RETRY_FOR: Duration = Duration::from_secs(60);

/// A poll's records; `None` after a retriable failure (a leader moving, a
/// broker restarting: ridden out, as the Rust stream does, for
/// `RETRY_FOR`); an error past that or for anything else.
async fn ride_out(
    polled: tally_client::Result<Vec<ConsumerRecord>>,
    failing_since: &mut Option<std::time::Instant>,
) -> anyhow::Result<Option<Vec<ConsumerRecord>>> {
    match polled {
        Ok(records) => {
            *failing_since = None;
            Ok(Some(records))
        }
        Err(e) if e.is_retriable() => {
            let since = *failing_since.get_or_insert_with(std::time::Instant::now);
            if since.elapsed() > RETRY_FOR {
                return Err(e).context(format!("still failing after {} s", RETRY_FOR.as_secs()));
            }
            eprintln!("tally consume: {e}; retrying");
            tokio::time::sleep(Duration::from_millis(200)).await;
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// Runs `tally consume`.
pub async fn run(ctx: &Context, args: ConsumeArgs) -> anyhow::Result<()> {
    let client = ctx.connect().await?;
    let from = parse_from(&args.from)?;
    if ctx.output == super::Output::Json {
        bail!("tally consume prints records with --format, not --output json");
    }
    let tokens = parse_format(&args.format)?;
    if let Some(group) = args.group.clone() {
        let reset = match from {
            SeekTo::Beginning => OffsetReset::Earliest,
            SeekTo::End => OffsetReset::Latest,
            _ => bail!("with --group, --from is beginning or end (a committed offset always wins)"),
        };
        return run_in_group(client, args, group, reset, tokens).await;
    }
    let info = client.topic_info(&args.topic).await.with_context(|| format!("cannot consume `{}`", args.topic))?;
    let partitions: Vec<u32> = match args.partition {
        Some(p) if (p as usize) < info.leaders.len() => vec![p],
        Some(p) => bail!("topic `{}` has {} partitions; there is no partition {p}", args.topic, info.leaders.len()),
        None => (0..info.leaders.len() as u32).collect(),
    };
    let mut config = ConsumerConfig::default();
    config.max_wait = if args.exit_at_end { Duration::from_millis(100) } else { Duration::from_millis(500) };
    config.auto_offset_reset = OffsetReset::Earliest;
    let consumer = Consumer::new(client, config);
    for p in &partitions {
        consumer.assign(&args.topic, *p, from).await?;
    }
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut printed = 0u64;
    let mut failing_since: Option<std::time::Instant> = None;
    loop {
        let Some(records) = ride_out(consumer.poll().await, &mut failing_since).await? else { continue };
        for r in &records {
            if args.count.is_some_and(|n| printed >= n) {
                break;
            }
            match write_record(&mut out, &tokens, r) {
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
                other => other?,
            }
            printed += 1;
        }
        match out.flush() {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            other => other?,
        }
        if args.count.is_some_and(|n| printed >= n) || (args.exit_at_end && consumer.at_end()) {
            return Ok(());
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM.
async fn stop_signal() {
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// `tally consume --group`: prints the partitions the group gives this
/// member, and commits what was printed and flushed (never more), every
/// second, on exit and on Ctrl-C / SIGTERM, after which it leaves the group.
async fn run_in_group(
    client: tally_client::Client,
    args: ConsumeArgs,
    group: String,
    reset: OffsetReset,
    tokens: Vec<Token>,
) -> anyhow::Result<()> {
    let mut config = ConsumerConfig::default();
    config.max_wait = if args.exit_at_end { Duration::from_millis(100) } else { Duration::from_millis(500) };
    config.auto_offset_reset = reset;
    config.group_id = Some(group.clone());
    // Auto-commit counts what poll handed out; only what reached stdout
    // may be committed here.
    config.enable_auto_commit = false;
    let consumer = Consumer::new(client, config);
    consumer.subscribe(&[args.topic.as_str()])?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut printed = 0u64;
    // Offset after the last printed record, per partition, and what of it
    // is committed.
    let mut done: BTreeMap<(String, u32), i64> = BTreeMap::new();
    let mut committed: BTreeMap<(String, u32), i64> = BTreeMap::new();
    let mut last_commit = std::time::Instant::now();
    let mut failing_since: Option<std::time::Instant> = None;
    let stop = stop_signal();
    tokio::pin!(stop);
    let outcome: anyhow::Result<()> = loop {
        let polled = tokio::select! {
            () = &mut stop => break Ok(()),
            polled = consumer.poll() => polled,
        };
        let records = match ride_out(polled, &mut failing_since).await {
            Ok(Some(records)) => records,
            Ok(None) => continue,
            Err(e) => break Err(e),
        };
        let mut pipe_closed = false;
        for r in &records {
            if args.count.is_some_and(|n| printed >= n) {
                break;
            }
            match write_record(&mut out, &tokens, r) {
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                    pipe_closed = true;
                    break;
                }
                other => other?,
            }
            done.insert((r.topic.to_string(), r.partition), r.offset + 1);
            printed += 1;
        }
        match out.flush() {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => pipe_closed = true,
            other => other?,
        }
        if pipe_closed {
            // What was not flushed may not have reached the reader.
            break Ok(());
        }
        let finished = args.count.is_some_and(|n| printed >= n);
        if finished || last_commit.elapsed() >= Duration::from_secs(1) {
            commit_printed(&consumer, &done, &mut committed).await;
            last_commit = std::time::Instant::now();
        }
        if finished {
            break Ok(());
        }
        if args.exit_at_end {
            let joined = consumer.group_assignment().is_some_and(|(_, epoch, owned)| epoch > 0 && !owned.is_empty());
            if joined && consumer.at_end() {
                commit_printed(&consumer, &done, &mut committed).await;
                let owned = consumer.group_assignment().map(|(_, _, o)| o).unwrap_or_default();
                let mine = |(t, p): &(String, u32)| owned.get(t).is_some_and(|ps| ps.contains(p));
                if done.iter().filter(|(k, _)| mine(k)).all(|(k, v)| committed.get(k) == Some(v)) {
                    break Ok(());
                }
            }
        }
    };
    commit_printed(&consumer, &done, &mut committed).await;
    consumer.close().await?;
    outcome
}

/// Commits the printed positions of the partitions this member still owns.
async fn commit_printed(
    consumer: &Consumer,
    done: &BTreeMap<(String, u32), i64>,
    committed: &mut BTreeMap<(String, u32), i64>,
) {
    let Some((_, _, owned)) = consumer.group_assignment() else { return };
    let due: BTreeMap<(String, u32), i64> = done
        .iter()
        .filter(|((t, p), v)| {
            owned.get(t).is_some_and(|ps| ps.contains(p)) && committed.get(&(t.clone(), *p)) != Some(*v)
        })
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    if due.is_empty() {
        return;
    }
    match consumer.commit_offsets(&due).await {
        Ok(()) => committed.extend(due),
        Err(e) => eprintln!("tally consume: commit failed (retried later): {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_tokens_parse_like_kcat() {
        assert_eq!(
            parse_format("%t/%p@%o %k=%v\\n").unwrap(),
            vec![
                Token::Topic,
                Token::Literal("/".into()),
                Token::Partition,
                Token::Literal("@".into()),
                Token::Offset,
                Token::Literal(" ".into()),
                Token::Key,
                Token::Literal("=".into()),
                Token::Value,
                Token::Literal("\n".into()),
            ]
        );
        assert_eq!(parse_format("100%%").unwrap(), vec![Token::Literal("100%".into())]);
        assert_eq!(
            parse_format("%s %S %K").unwrap(),
            vec![
                Token::Value,
                Token::Literal(" ".into()),
                Token::ValueSize,
                Token::Literal(" ".into()),
                Token::KeySize
            ]
        );
        assert!(parse_format("%x").unwrap_err().to_string().contains("unknown token `%x`"));
        assert!(parse_format("50%").is_err());
    }

    #[test]
    fn from_accepts_names_offsets_and_timestamps() {
        assert_eq!(parse_from("beginning").unwrap(), SeekTo::Beginning);
        assert_eq!(parse_from("42").unwrap(), SeekTo::Offset(42));
        assert_eq!(parse_from("@1700000000000").unwrap(), SeekTo::Timestamp(1_700_000_000_000));
        assert!(parse_from("soon").is_err());
    }
}
