//! `tally bench idempotence`: what the idempotent producer costs and what
//! its pipelining gains, on a three-broker local cluster (replication
//! factor 3, `min_insync_replicas` 2, acks=all), records sent one by one
//! through the batching `Producer`:
//! - idempotence off and on, for each partition count and record size,
//!   alternating over `rounds` rounds (so drift on a shared machine hits
//!   both alike);
//! - one partition, 1 KiB records, one producer, idempotent, with one
//!   request in flight per partition and with five.

use tally_client::Acks;

use crate::bench::{LocalCluster, ProduceParams, Report, SweepParams, create_replicated, produce};

/// Parameters of the sweep: the cluster and dimensions of
/// `tally bench replication`, and how many rounds of each setting.
#[derive(Debug, Clone)]
pub struct IdempotenceParams {
    /// Binary, data directory, partition counts, record sizes, producers
    /// per partition and times, as for the replication sweep.
    pub sweep: SweepParams,
    /// Runs of each setting, alternating.
    pub rounds: usize,
}

/// One run.
#[derive(Debug, Clone)]
pub struct IdempotenceRow {
    /// Partitions of the topic.
    pub partitions: u32,
    /// Value bytes per record.
    pub record_size: usize,
    /// Producer tasks.
    pub producers: usize,
    /// `idempotence off`, `idempotence on`, `in flight 1`, `in flight 5`.
    pub setting: String,
    /// The figures.
    pub report: Report,
}

fn params(
    topic: String,
    partitions: u32,
    record_size: usize,
    producers: usize,
    p: &IdempotenceParams,
) -> ProduceParams {
    ProduceParams {
        topic,
        producers,
        partitions,
        record_size,
        records_per_batch: (100_000 / record_size.max(1)).clamp(1, 1000),
        acks: Acks::All,
        duration: p.sweep.duration,
        warmup: p.sweep.warmup,
        topic_configs: vec![("min_insync_replicas".into(), "2".into())],
        broker_pid: None,
        replication_factor: 3,
        compression: tally_client::Compression::None,
        rate_records_per_s: None,
        through_producer: true,
        idempotence: None,
        max_in_flight: None,
    }
}

/// Runs the sweep, calling `row` after each run; returns each broker's
/// peak RssAnon in MiB.
pub async fn idempotence_sweep(
    p: &IdempotenceParams,
    mut row: impl FnMut(&IdempotenceRow),
) -> anyhow::Result<Vec<(u32, f64)>> {
    let cluster = LocalCluster::start(&p.sweep.binary, &p.sweep.data_dir).await?;
    let client = cluster.client.clone();
    let mut run = 0u32;
    let mut one = async |mut params: ProduceParams, setting: &str| -> anyhow::Result<IdempotenceRow> {
        run += 1;
        params.topic = format!("{}-{run}", params.topic);
        create_replicated(&client, &params).await?;
        let report = produce(&client, &params).await?;
        client.admin().delete_topic(&params.topic).await?;
        Ok(IdempotenceRow {
            partitions: params.partitions,
            record_size: params.record_size,
            producers: params.producers,
            setting: setting.to_string(),
            report,
        })
    };
    for &partitions in &p.sweep.partitions {
        for &record_size in &p.sweep.record_sizes {
            let producers = partitions as usize * p.sweep.producers_per_partition.max(1);
            for _ in 0..p.rounds.max(1) {
                for (setting, idempotence) in [("idempotence off", false), ("idempotence on", true)] {
                    let mut q =
                        params(format!("idem-p{partitions}-s{record_size}"), partitions, record_size, producers, p);
                    q.idempotence = Some(idempotence);
                    row(&one(q, setting).await?);
                }
            }
        }
    }
    for _ in 0..p.rounds.max(1) {
        for in_flight in [1usize, 5] {
            let mut q = params("idem-inflight".into(), 1, 1024, 1, p);
            q.idempotence = Some(true);
            q.max_in_flight = Some(in_flight);
            row(&one(q, &format!("in flight {in_flight}")).await?);
        }
    }
    Ok(cluster.stop().await)
}
