//! The real `tally serve` process: SIGTERM shuts it down cleanly, and a
//! SIGKILL mid-load loses no acknowledged record (flush = always).

use std::path::Path;
use std::time::Duration;

use tally::child::BrokerProcess;
use tally_client::{Acks, Client, NewTopic, OffsetSpec};
use tally_proto::batch::RecordRef;

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_tally"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_no_acknowledged_record() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(binary(), dir.path(), &["--flush", "always"]).unwrap();
    let client = Client::builder().bootstrap([broker.address.clone()]).connect().await.unwrap();
    client.admin().create_topic(NewTopic::new("durable", 1).config("segment_bytes", "65536")).await.unwrap();
    let pc = client.partition_client("durable", 0);
    let mut acked: Vec<(i64, String)> = Vec::new();
    let producer = {
        let pc = pc.clone();
        tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0.. {
                let v = format!("record-{i}");
                match pc
                    .produce_records(
                        &[RecordRef { timestamp: i, value: Some(v.as_bytes()), ..Default::default() }],
                        Acks::All,
                    )
                    .await
                {
                    Ok(offset) => acked.push((offset, v)),
                    Err(_) => break,
                }
            }
            acked
        })
    };
    let enough = crate::harness::wait_for(Duration::from_secs(30), async || {
        pc.list_offset(OffsetSpec::Latest).await.is_ok_and(|o| o.unwrap_or(0) >= 300)
    })
    .await;
    assert!(enough);
    drop(broker); // SIGKILL
    acked.extend(producer.await.unwrap());
    assert!(acked.len() >= 300);

    // Restarted with the default 9 s session: it names the killed
    // incarnation it follows on this data directory, and serves at once.
    let broker = BrokerProcess::start(binary(), dir.path(), &[]).unwrap();
    let client = Client::builder().bootstrap([broker.address.clone()]).connect().await.unwrap();
    let pc = client.partition_client("durable", 0);
    let serving =
        crate::harness::wait_for(Duration::from_secs(5), async || pc.list_offset(OffsetSpec::Latest).await.is_ok())
            .await;
    assert!(serving, "the restarted broker replaced its killed incarnation well inside the session");
    let end = pc.list_offset(OffsetSpec::Latest).await.unwrap().unwrap();
    let mut stored = std::collections::HashMap::new();
    let mut next = 0;
    while next < end {
        let f = pc.fetch(next, 1 << 20, Duration::ZERO).await.unwrap();
        for r in f.records(next) {
            let r = r.unwrap();
            stored.insert(r.offset, r.value.unwrap());
            next = r.offset + 1;
        }
    }
    for (offset, value) in &acked {
        assert_eq!(
            stored.get(offset).map(|b| b.as_ref()),
            Some(value.as_bytes()),
            "acknowledged record at {offset} survived"
        );
    }
    let status = broker.stop().unwrap();
    assert!(status.success(), "SIGTERM is a clean shutdown: {status}");
}
