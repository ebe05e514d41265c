//! The `tally` binary end to end against an in-process broker.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::harness::TestBroker;

fn tally(address: &str, args: &[&str], stdin: Option<&str>) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(args)
        .env("TALLY_BOOTSTRAP", address)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tally");
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

async fn run(address: &str, args: &[&str], stdin: Option<&str>) -> std::process::Output {
    let (address, args, stdin) =
        (address.to_string(), args.iter().map(|s| s.to_string()).collect::<Vec<_>>(), stdin.map(str::to_string));
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        tally(&address, &args, stdin.as_deref())
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_produces_lines_and_consumes_them_back_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path()).await;
    let a = broker.address.clone();

    let out = run(&a, &["topic", "create", "lines", "--partitions", "1", "--config", "retention_ms=-1"], None).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let input: String = (0..500).map(|i| format!("line number {i}\n")).collect();
    let out = run(&a, &["produce", "lines", "--acks", "all"], Some(&input)).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let out = run(&a, &["consume", "lines", "--from", "beginning", "--exit-at-end"], None).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8(out.stdout).unwrap(), input);

    let out = run(&a, &["consume", "lines", "--from", "10", "-n", "2", "--format", "%p:%o:%v\\n"], None).await;
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "0:10:line number 10\n0:11:line number 11\n");

    let out = run(&a, &["produce", "lines", "--key-separator", "=", "--header", "h=1"], Some("k=v\n")).await;
    assert!(out.status.success());
    let out = run(&a, &["consume", "lines", "--from", "500", "--exit-at-end", "--format", "%k|%v|%h\\n"], None).await;
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "k|v|h=1\n");

    let out = run(&a, &["topic", "describe", "lines", "--output", "json"], None).await;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["name"], "lines");
    assert_eq!(json["configs"]["retention_ms"], "-1");
    assert_eq!(json["partitions"][0]["partition"], 0);
    assert_eq!(json["partitions"][0]["leader"], 1);
    assert_eq!(json["partitions"][0]["high_watermark"], 501);
    assert_eq!(json["partitions"][0]["log_start_offset"], 0);
    assert_eq!(json["partitions"][0]["isr"], serde_json::json!([1]));

    let out = run(&a, &["offsets", "lines", "--time", "earliest", "--output", "json"], None).await;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json[0]["offset"], 0);
    // Kafka's tools' -1 (latest) and -2 (earliest).
    let out = run(&a, &["offsets", "lines", "--time", "-1", "--output", "json"], None).await;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json[0]["offset"], 501, "-1 is latest, not the timestamp -1");
    let out = run(&a, &["offsets", "lines", "--time", "-2", "--output", "json"], None).await;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json[0]["offset"], 0);
    // kcat's %s and sizes; an unknown token is refused, not printed.
    let out = run(&a, &["consume", "lines", "--from", "500", "-n", "1", "--format", "%s %S %K\n"], None).await;
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "v 1 1\n");
    let out = run(&a, &["consume", "lines", "--from", "500", "-n", "1", "--format", "%x"], None).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown token `%x`"));

    // Errors exit non-zero with a message.
    let out = run(&a, &["produce", "nope"], Some("x\n")).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("UnknownTopicOrPartition"));
    let out = run(&a, &["topic", "create", "bad/name"], None).await;
    assert!(!out.status.success());
    let out = run("127.0.0.1:1", &["topic", "list"], None).await;
    assert!(!out.status.success(), "an unreachable broker is an error");

    broker.stop().await.unwrap();
    // dump-log reads the closed segment and verifies it.
    let out =
        run(&a, &["dump-log", dir.path().join("lines-0").to_str().unwrap(), "--verify", "--print-data"], None).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("value: line number 499"), "{text}");
    assert!(text.contains("valid: ok"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_deletes_keys_of_a_compacted_topic_and_shows_its_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path()).await;
    let a = broker.address.clone();
    let configs = ["cleanup_policy=compact", "segment_bytes=1024", "min_cleanable_dirty_ratio=0.01"];
    let mut args = vec!["topic", "create", "table", "--partitions", "1"];
    for c in &configs {
        args.extend(["--config", c]);
    }
    let out = run(&a, &args, None).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let input: String = (0..200).map(|i| format!("key-{}={}-{}\n", i % 4, i, "x".repeat(30))).collect();
    let out = run(&a, &["produce", "table", "--acks", "all", "--key-separator", "="], Some(&input)).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = run(&a, &["produce", "table", "--acks", "all", "--tombstone"], Some("key-0\n")).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // An unkeyed line is refused on a compacted topic.
    let out = run(&a, &["produce", "table"], Some("no key\n")).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no key"), "{}", String::from_utf8_lossy(&out.stderr));

    let compacted = crate::harness::wait_for(std::time::Duration::from_secs(30), async || {
        let out = run(&a, &["topic", "describe", "table", "--output", "json"], None).await;
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        json["partitions"][0]["compaction"]["cleaner_offset"].as_i64().is_some_and(|o| o > 0)
    })
    .await;
    assert!(compacted, "describe shows a clean");
    let out = run(&a, &["topic", "describe", "table"], None).await;
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("compacted below offset") && text.contains("dirty ratio"), "{text}");

    // The tombstone reads as Kafka's tools show it: %s empty, %S -1.
    let out = run(&a, &["consume", "table", "--from", "200", "-n", "1", "--format", "%k:%s:%S\n"], None).await;
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "key-0::-1\n");
    let out = run(&a, &["consume", "table", "--from", "beginning", "--exit-at-end", "--format", "%o %k\n"], None).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines = String::from_utf8(out.stdout).unwrap();
    assert!(lines.lines().count() < 100, "superseded records are gone: {lines}");
    assert!(lines.contains("199 key-3"), "the last record of a key stays: {lines}");

    broker.stop().await.unwrap();
    let out = run(&a, &["dump-log", dir.path().join("table-0").to_str().unwrap(), "--verify"], None).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("compacted: 196 of 200 offsets removed"), "dump-log shows what compaction removed: {text}");
}

fn text(out: &std::process::Output) -> String {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout.clone()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_consumes_in_a_group_commits_what_it_printed_and_manages_groups() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path()).await;
    let a = broker.address.clone();
    text(&run(&a, &["topic", "create", "jobs", "--partitions", "3"], None).await);
    let input: String = (0..300).map(|i| format!("k{i}=job {i}\n")).collect();
    text(&run(&a, &["produce", "jobs", "--key-separator", "=", "--acks", "all"], Some(&input)).await);

    let group = ["--group", "cli", "--exit-at-end", "--format", "%v\\n"];
    let first = text(&run(&a, &[&["consume", "jobs", "--from", "beginning"][..], &group[..]].concat(), None).await);
    assert_eq!(first.lines().count(), 300);
    let described = text(&run(&a, &["group", "describe", "cli", "--output", "json"], None).await);
    let d: serde_json::Value = serde_json::from_str(&described).unwrap();
    assert_eq!(d["state"], "Empty", "{d}");
    let parts = d["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), 3, "{d}");
    assert!(parts.iter().all(|p| p["lag"] == 0 && p["committed_offset"] == p["log_end_offset"]), "{d}");

    // A second run resumes at the commits: only what is new.
    let more: String = (300..330).map(|i| format!("k{i}=job {i}\n")).collect();
    text(&run(&a, &["produce", "jobs", "--key-separator", "=", "--acks", "all"], Some(&more)).await);
    let second = text(&run(&a, &[&["consume", "jobs"][..], &group[..]].concat(), None).await);
    assert_eq!(second.lines().count(), 30, "{second}");
    assert!(text(&run(&a, &["group", "list"], None).await).contains("cli"));

    // Reset: a dry run changes nothing, --execute rewinds.
    let plan = text(&run(&a, &["group", "reset-offsets", "cli", "--topic", "jobs", "--to-earliest"], None).await);
    assert!(plan.contains("NEW-OFFSET"), "{plan}");
    let d: serde_json::Value =
        serde_json::from_str(&text(&run(&a, &["group", "describe", "cli", "--output", "json"], None).await)).unwrap();
    assert!(d["partitions"].as_array().unwrap().iter().all(|p| p["lag"] == 0), "{d}");
    text(&run(&a, &["group", "reset-offsets", "cli", "--topic", "jobs", "--to-earliest", "--execute"], None).await);
    let again = text(&run(&a, &[&["consume", "jobs"][..], &group[..]].concat(), None).await);
    assert_eq!(again.lines().count(), 330);

    // SIGTERM: what was printed is committed, and the member leaves.
    let mut child = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["consume", "jobs", "--group", "term", "--from", "beginning"])
        .env("TALLY_BOOTSTRAP", &a)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut all).unwrap();
        all
    });
    let joined = crate::harness::wait_for(std::time::Duration::from_secs(20), async || {
        let out = run(&a, &["group", "describe", "term", "--output", "json"], None).await;
        let Ok(d) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else { return false };
        d["partitions"]
            .as_array()
            .is_some_and(|ps| ps.iter().map(|p| p["committed_offset"].as_i64().unwrap_or(0)).sum::<i64>() == 330)
            && d["members"][0]["host"] == "127.0.0.1"
    })
    .await;
    assert!(joined, "the group consumer did not commit everything it read");
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert_eq!(reader.join().unwrap().lines().count(), 330);
    let d: serde_json::Value =
        serde_json::from_str(&text(&run(&a, &["group", "describe", "term", "--output", "json"], None).await)).unwrap();
    assert_eq!(d["members"].as_array().unwrap().len(), 0, "the member did not leave: {d}");

    // The group's own configs.
    text(&run(&a, &["group", "alter", "cli", "--config", "consumer_session_timeout_ms=50000"], None).await);
    let d: serde_json::Value =
        serde_json::from_str(&text(&run(&a, &["group", "describe", "cli", "--output", "json"], None).await)).unwrap();
    assert_eq!(d["configs"]["consumer_session_timeout_ms"], 50000, "{d}");
    let out = run(&a, &["group", "alter", "cli", "--config", "consumer_session_timeout_ms=5"], None).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("outside"), "{}", String::from_utf8_lossy(&out.stderr));

    // Delete, then it is gone.
    text(&run(&a, &["group", "delete", "cli"], None).await);
    let out = run(&a, &["group", "describe", "cli"], None).await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not exist"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    broker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_appends_only_at_the_expected_end_offset() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path()).await;
    let a = broker.address.clone();
    let out = run(&a, &["topic", "create", "ledger", "--partitions", "1"], None).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let append = ["produce", "ledger", "--partition", "0", "--expect-end-offset", "0"];
    let out = run(&a, &append, Some("opened\ndeposited 10\n")).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = run(&a, &append, Some("withdrawn 10\n")).await;
    assert_eq!(out.status.code(), Some(3), "a conflict: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "2\n", "the log's end, for the script to retry at");
    let out =
        run(&a, &["produce", "ledger", "--partition", "0", "--expect-end-offset", "2"], Some("withdrawn 10\n")).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = run(&a, &["consume", "ledger", "--from", "beginning", "--exit-at-end"], None).await;
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "opened\ndeposited 10\nwithdrawn 10\n");
    // Refused before reading anything (no input, so no write into a closed pipe).
    let out = run(&a, &["produce", "ledger", "--expect-end-offset", "3"], None).await;
    assert!(!out.status.success(), "--expect-end-offset needs --partition");
    broker.stop().await.unwrap();
}

/// Checks that `svg` is one well-formed `<svg>` element: every tag closed in
/// order, nothing after the root. Returns the text of every `<text>` element.
fn svg_texts(svg: &str) -> Vec<String> {
    let mut open: Vec<String> = Vec::new();
    let mut texts = Vec::new();
    let mut rest = svg.trim();
    let mut roots = 0;
    while let Some(lt) = rest.find('<') {
        let content = rest[..lt].trim();
        if !content.is_empty() {
            assert!(!open.is_empty(), "text outside the root: {content}");
            if open.last().map(String::as_str) == Some("text") {
                texts.push(content.to_string());
            }
        }
        let gt = rest[lt..].find('>').expect("an unterminated tag") + lt;
        let tag = &rest[lt + 1..gt];
        rest = &rest[gt + 1..];
        if tag.starts_with('?') || tag.starts_with('!') {
            continue;
        }
        if let Some(name) = tag.strip_prefix('/') {
            assert_eq!(open.pop().as_deref(), Some(name.trim()), "a closing tag out of order");
            continue;
        }
        let name = tag.split_whitespace().next().unwrap_or_default().trim_end_matches('/').to_string();
        if open.is_empty() {
            roots += 1;
            assert_eq!(name, "svg", "the root element");
        }
        if !tag.ends_with('/') {
            open.push(name);
        }
    }
    assert!(open.is_empty(), "unclosed elements: {open:?}");
    assert!(rest.trim().is_empty(), "content after the root: {rest}");
    assert_eq!(roots, 1, "one root element");
    texts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_bench_sweep_writes_results_and_a_chart_for_every_possible_point() {
    let out_dir = tempfile::tempdir().unwrap();
    let out_path = out_dir.path().join("results");
    let args = [
        "bench",
        "sweep",
        "--acks",
        "1,all",
        "--record-sizes",
        "100",
        "--partitions",
        "1",
        "--idempotence",
        "off,on",
        "--duration-s",
        "1",
        "--warmup-s",
        "0.2",
        "--out",
        out_path.to_str().unwrap(),
    ];
    // A local three-broker cluster of its own: no bootstrap needed.
    let out = run("127.0.0.1:1", &args, None).await;
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("skipping 1 combination"), "acks=1 with idempotence is skipped, and said: {stderr}");
    let table = String::from_utf8(out.stdout).unwrap();
    let rows: Vec<&str> = table.lines().filter(|l| l.trim_start().starts_with(['1', 'a'])).collect();
    assert_eq!(rows.len(), 4, "header and three points: {table}");

    // results.json: the machine, the parameters and one result per possible point.
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_path.join("results.json")).unwrap()).unwrap();
    assert!(json["machine"]["cores"].as_u64().is_some_and(|c| c >= 1), "{json}");
    assert!(json["machine"]["kernel"].as_str().is_some_and(|k| !k.is_empty()), "{json}");
    assert_eq!(json["parameters"]["replication_factor"], 3);
    assert_eq!(json["parameters"]["min_insync_replicas"], 2);
    assert_eq!(json["brokers"], 3);
    assert_eq!(json["skipped"].as_array().unwrap().len(), 1, "{json}");
    assert_eq!(
        (json["skipped"][0]["acks"].as_str(), json["skipped"][0]["idempotence"].as_bool()),
        (Some("1"), Some(true))
    );
    let results = json["results"].as_array().unwrap();
    let points: Vec<(&str, bool)> =
        results.iter().map(|r| (r["acks"].as_str().unwrap(), r["idempotence"].as_bool().unwrap())).collect();
    assert_eq!(points, [("1", false), ("all", false), ("all", true)]);
    for r in results {
        assert_eq!((r["record_size"].as_u64(), r["partitions"].as_u64()), (Some(100), Some(1)), "{r}");
        // Something was measured (no speed is asserted): acknowledged
        // records, a produce latency, and records that reached a consumer.
        assert!(r["records_per_s"].as_f64().is_some_and(|v| v > 0.0), "{r}");
        assert!(r["produce_samples"].as_u64().is_some_and(|n| n > 0), "{r}");
        let p = &r["produce_latency_ms"];
        assert!(p["p50"].as_f64().unwrap() <= p["p99"].as_f64().unwrap(), "{r}");
        assert!(p["p99"].as_f64().unwrap() <= p["p99_9"].as_f64().unwrap(), "{r}");
        assert!(r["end_to_end_samples"].as_u64().is_some_and(|n| n > 0), "the consumers saw stamped records: {r}");
        assert!(r["end_to_end_latency_ms"]["p50"].as_f64().is_some_and(|v| v > 0.0), "{r}");
    }

    // results.csv: the header and the same rows.
    let csv = std::fs::read_to_string(out_path.join("results.csv")).unwrap();
    let lines: Vec<Vec<&str>> = csv.lines().map(|l| l.split(',').collect()).collect();
    assert_eq!(lines.len(), 4, "{csv}");
    let header = &lines[0];
    assert_eq!(header[..4], ["acks", "idempotence", "record_size", "partitions"], "{csv}");
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap_or_else(|| panic!("no column {name}"));
    let keys: Vec<(&str, &str)> = lines[1..].iter().map(|l| (l[0], l[1])).collect();
    assert_eq!(keys, [("1", "off"), ("all", "off"), ("all", "on")]);
    for (line, r) in lines[1..].iter().zip(results) {
        assert_eq!(line.len(), header.len(), "{csv}");
        let rate: f64 = line[col("records_per_s")].parse().unwrap();
        assert!((rate - r["records_per_s"].as_f64().unwrap()).abs() < 0.1, "csv and json agree: {csv}");
        let _: f64 = line[col("e2e_p99_ms")].parse().unwrap();
    }

    // chart.svg: well-formed, both panels, every series named.
    let svg = std::fs::read_to_string(out_path.join("chart.svg")).unwrap();
    let texts = svg_texts(&svg);
    for label in ["acks=1", "acks=all", "acks=all, idempotent", "100 B", "p50", "p99", "p99.9", "100B 1p"] {
        assert!(texts.iter().any(|t| t == label), "no `{label}` text in the chart: {texts:?}");
    }
    assert!(texts.iter().any(|t| t.contains("MB/s")), "{texts:?}");
    assert!(texts.iter().any(|t| t.contains("Produce latency")), "{texts:?}");
    assert!(svg.matches("<rect").count() >= 3, "a throughput bar per point");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_bench_sweep_refuses_impossible_settings_before_doing_work() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path()).await;
    let a = broker.address.clone();
    let out_dir = tempfile::tempdir().unwrap();
    let out_path = out_dir.path().join("results");
    let out_arg = out_path.to_str().unwrap();
    let refused = async |bootstrap: &str, args: &[&str]| {
        let out = run(bootstrap, &[&["bench", "sweep"][..], args].concat(), None).await;
        assert!(!out.status.success(), "{args:?} ran: {}", String::from_utf8_lossy(&out.stdout));
        String::from_utf8_lossy(&out.stderr).to_string()
    };

    // Replication factor 3 on a one-broker cluster: refused, no topic made.
    let existing_out = out_dir.path().join("existing");
    let err = refused(&a, &["--existing", "--duration-s", "1", "--out", existing_out.to_str().unwrap()]).await;
    assert!(err.contains("replication factor 3 needs 3 brokers") && err.contains("has 1 live broker"), "{err}");
    let topics = broker.client().await.admin().list_topics().await.unwrap();
    assert!(topics.iter().all(|t| !t.name.starts_with("bench-sweep")), "{topics:?}");

    // These are refused before any broker starts or the output directory
    // is made (the bootstrap address is unreachable and unused).
    let none = "127.0.0.1:1";
    let err = refused(none, &["--replication-factor", "2", "--min-insync-replicas", "3", "--out", out_arg]).await;
    assert!(err.contains("acks=all with --min-insync-replicas 3 above --replication-factor 2"), "{err}");
    let err = refused(none, &["--acks", "1,2", "--out", out_arg]).await;
    assert!(err.contains("acks must be 0, 1 or all, got `2`"), "{err}");
    let err = refused(none, &["--partitions", "", "--record-sizes", "4", "--out", out_arg]).await;
    assert!(err.contains("--partitions is empty") && err.contains("record size 4"), "every problem at once: {err}");
    let err = refused(none, &["--acks", "0,1", "--idempotence", "on", "--out", out_arg]).await;
    assert!(err.contains("no point to run") && err.contains("needs acks=all"), "{err}");
    let err = refused(none, &["--replication-factor", "4", "--min-insync-replicas", "2", "--out", out_arg]).await;
    assert!(err.contains("the local cluster has 3"), "{err}");
    assert!(!out_path.exists(), "no work was done");
    broker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_bench_partitions_replicated_reports_latency_idle_traffic_and_cpu_of_every_broker() {
    let args = [
        "bench",
        "partitions",
        "--brokers",
        "3",
        "--replication-factor",
        "3",
        "--count",
        "30",
        "--produce-s",
        "1",
        "--idle-s",
        "1",
    ];
    // A local three-broker cluster of its own: no bootstrap needed.
    let out = run("127.0.0.1:1", &args, None).await;
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{stderr}");
    let table = String::from_utf8(out.stdout).unwrap();
    // The figures after a row's label (which may hold numbers of its own).
    let figures = |label: &str| -> Vec<f64> {
        let line = table.lines().find(|l| l.starts_with(label)).unwrap_or_else(|| panic!("no `{label}`: {table}"));
        line[label.len()..]
            .split_whitespace()
            .map(|v| v.parse::<f64>().unwrap_or_else(|e| panic!("`{v}` in `{line}`: {e}")))
            .collect()
    };
    assert!(table.starts_with("brokers 3, replication factor 3, min ISR 2"), "{table}");
    assert!(table.contains("30 partitions, 90 replicas; 1 busy, 29 idle"), "{table}");
    let create = table.lines().find_map(|l| l.strip_prefix("create until replicated")).expect("a create time");
    let create_s: f64 = create.split_whitespace().next().unwrap().parse().unwrap();
    assert!(create_s > 0.0, "{table}");

    for label in ["latency alone", "latency with 29 idle"] {
        let [p50, p99, p999, rate, samples] = figures(label)[..] else { panic!("five figures: {table}") };
        assert!(p50 > 0.0 && p50 <= p99 && p99 <= p999, "{table}");
        assert!(rate > 0.0 && samples >= 1.0, "{table}");
    }
    let ratios = figures("latency ratio (with / alone)");
    assert_eq!(ratios.len(), 4, "{table}");
    assert!(ratios.iter().all(|r| r.is_finite() && *r > 0.0), "{table}");

    for label in ["idle traffic alone", "idle traffic with 29 idle"] {
        let row = figures(label);
        assert_eq!(row.len(), 4, "B/s and a CPU share per broker: {table}");
        // The controller quorum's heartbeats cross the listeners in any window.
        assert!(row[0] > 0.0, "{table}");
        assert!(row[1..].iter().all(|cpu| (0.0..=200.0).contains(cpu)), "{table}");
    }
    let _per_partition = figures("idle traffic per idle partition");

    for broker in 1..=3 {
        let [before, after, peak, _per_replica] = figures(&format!("broker {broker}"))[..] else {
            panic!("four figures for broker {broker}: {table}")
        };
        assert!(before > 0.0 && after > 0.0 && peak >= after.min(before), "{table}");
    }
}
