//! Conditional append (`expected_end_offset`): appended only when the
//! partition's log ends where the writer expected, refused with
//! END_OFFSET_MISMATCH and the log's end otherwise (nothing appended);
//! a retried idempotent batch that was appended is answered as that append;
//! of writers racing on one expected offset exactly one wins; and
//! `tally produce --expect-end-offset` for scripts.

use std::time::Duration;

use tally_client::{Acks, AppendIfError, ErrorCode, NewTopic};
use tally_proto::batch::{BatchBuilder, RecordRef};
use tally_proto::v1 as pb;

use crate::harness::TestBroker;

fn batch(value: &str, producer: Option<(i64, i16, i32)>) -> bytes::Bytes {
    let mut b = BatchBuilder::new();
    if let Some((pid, epoch, seq)) = producer {
        b.set_producer(pid, epoch, seq);
    }
    b.push(&RecordRef { timestamp: 1, value: Some(value.as_bytes()), ..Default::default() });
    b.finish()
}

async fn produce(
    rpc: &mut pb::tally_client::TallyClient<tally_proto::connection::Connection>,
    records: bytes::Bytes,
    expected_end_offset: Option<i64>,
) -> pb::PartitionProduceResponse {
    let request = pb::ProduceRequest {
        acks: pb::Acks::All as i32,
        timeout_ms: 5000,
        topics: vec![pb::TopicProduceData {
            name: "events".into(),
            partitions: vec![pb::PartitionProduceData { partition: 0, records: vec![records], expected_end_offset }],
        }],
    };
    rpc.produce(request).await.unwrap().into_inner().topics.remove(0).partitions.remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_happens_only_at_the_expected_end_and_a_retried_one_is_answered_as_itself() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path()).await;
    let client = broker.client().await;
    client.admin().create_topic(NewTopic::new("events", 1)).await.unwrap();
    let mut rpc = crate::harness::raw_client(&broker.address);

    let first = produce(&mut rpc, batch("opened", None), Some(0)).await;
    assert_eq!((first.error_code, first.base_offset), (0, 0), "{}", first.error_message);
    let stale = produce(&mut rpc, batch("deposited", None), Some(0)).await;
    assert_eq!(stale.error_code, ErrorCode::EndOffsetMismatch as i32);
    assert_eq!(stale.current_end_offset, Some(1));
    assert!(stale.error_message.contains("nothing was appended"), "{}", stale.error_message);
    let ahead = produce(&mut rpc, batch("deposited", None), Some(5)).await;
    assert_eq!((ahead.error_code, ahead.current_end_offset), (ErrorCode::EndOffsetMismatch as i32, Some(1)));
    let negative = produce(&mut rpc, batch("x", None), Some(-1)).await;
    assert_eq!(negative.error_code, ErrorCode::InvalidRequest as i32);
    let next = produce(&mut rpc, batch("deposited", None), Some(1)).await;
    assert_eq!((next.error_code, next.base_offset), (0, 1));

    // With idempotence: a retry of an append that happened is that append,
    // though the log has moved past its expected end.
    let init = rpc
        .init_producer_id(pb::InitProducerIdRequest {
            transactional_id: None,
            transaction_timeout_ms: 0,
            producer_id: -1,
            producer_epoch: -1,
        })
        .await
        .unwrap()
        .into_inner();
    let pid = init.producer_id;
    let appended = produce(&mut rpc, batch("withdrawn", Some((pid, 0, 0))), Some(2)).await;
    assert_eq!((appended.error_code, appended.base_offset), (0, 2));
    let retried = produce(&mut rpc, batch("withdrawn", Some((pid, 0, 0))), Some(2)).await;
    assert_eq!((retried.error_code, retried.base_offset), (0, 2), "answered as the append: {}", retried.error_message);
    let end = client.partition_client("events", 0).list_offset(tally_client::OffsetSpec::Latest).await.unwrap();
    assert_eq!(end, Some(3), "nothing appended twice, nothing on a mismatch");
    broker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_writers_racing_on_one_expected_end_exactly_one_appends() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path()).await;
    let client = broker.client().await;
    client.admin().create_topic(NewTopic::new("events", 1)).await.unwrap();
    let pc = client.partition_client("events", 0);
    for round in 0..20i64 {
        let writers: Vec<_> = (0..4)
            .map(|w| {
                let pc = pc.clone();
                tokio::spawn(async move {
                    let value = format!("round {round} writer {w}");
                    let record = RecordRef { timestamp: 1, value: Some(value.as_bytes()), ..Default::default() };
                    pc.append_if(round, &[record], Acks::All).await
                })
            })
            .collect();
        let mut won = 0;
        for w in writers {
            match w.await.unwrap() {
                Ok(offset) => {
                    assert_eq!(offset, round);
                    won += 1;
                }
                Err(AppendIfError::Conflict { current_end_offset }) => assert_eq!(current_end_offset, round + 1),
                Err(e) => panic!("round {round}: {e}"),
            }
        }
        assert_eq!(won, 1, "round {round}: exactly one writer appended");
    }
    let fetched = pc.fetch(0, 1 << 20, Duration::from_millis(100)).await.unwrap();
    let count: usize = fetched.batches.iter().map(|b| b.header().record_count() as usize).sum();
    assert_eq!(count, 20);
    broker.stop().await.unwrap();
}
