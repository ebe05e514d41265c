//! Counts heap allocations on the producer's hot path, against a real
//! `tally serve` child process.
//!
//! `cargo bench --bench producer_allocations` sends 100-byte records through
//! one `Producer` after a warm-up and prints allocations per record on the
//! sending thread (the `send` path: accumulator, batch buffers, delivery
//! futures) and in the whole client process (also the sender task, request
//! encoding and the HTTP/2 connection), plus per sealed batch. The steady
//! state target is zero allocations per record: what remains is per batch.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use tally::child::BrokerProcess;
use tally_client::{Client, NewTopic, Producer, ProducerConfig, ProducerRecord};

/// The system allocator, counting calls per thread and in all.
struct Counting;

static ALL: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static HERE: Cell<u64> = const { Cell::new(0) };
}

fn count() {
    ALL.fetch_add(1, Ordering::Relaxed);
    let _ = HERE.try_with(|c| c.set(c.get() + 1));
}

// SAFETY: forwards every call to `System` unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's contract is passed on as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const RECORD_BYTES: usize = 100;
const RECORDS_PER_BATCH: usize = 1000;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    // `block_on` runs the sending loop on this thread; the producer's sender
    // and request tasks run on the workers, so this thread's count is the
    // send path alone.
    runtime.block_on(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let broker =
            BrokerProcess::start(Path::new(env!("CARGO_BIN_EXE_tally")), dir.path(), &[]).expect("start broker");
        let client = Client::builder().bootstrap([broker.address.clone()]).connect().await.expect("connect");
        client.admin().create_topic(NewTopic::new("alloc", 1)).await.expect("topic");
        let mut config = ProducerConfig::default();
        config.batch_bytes = RECORDS_PER_BATCH * (RECORD_BYTES + 16);
        let producer = Producer::new(client, config);
        let value = vec![b'x'; RECORD_BYTES];
        let records: usize = 2_000_000;
        // Deliveries are kept in a buffer made up front, so the loop itself
        // allocates nothing; every 100,000 records they are awaited.
        let mut pending = Vec::with_capacity(100_000);
        let mut send = async |n: usize| {
            for _ in 0..n {
                let d = producer.send(ProducerRecord::new("alloc", &value).partition(0)).await.expect("send");
                pending.push(d);
                if pending.len() == pending.capacity() {
                    for d in pending.drain(..) {
                        d.await.expect("delivered");
                    }
                }
            }
            for d in pending.drain(..) {
                d.await.expect("delivered");
            }
        };
        send(200_000).await; // warm-up: connections, buffers, metadata
        let (here, all) = (HERE.with(Cell::get), ALL.load(Ordering::Relaxed));
        send(records).await;
        let here = HERE.with(Cell::get) - here;
        let all = ALL.load(Ordering::Relaxed) - all;
        let batches = (records / RECORDS_PER_BATCH) as f64;
        println!("{records} records of {RECORD_BYTES} B, {RECORDS_PER_BATCH} per batch, one partition");
        println!(
            "send path (calling thread): {here} allocations, {:.4} per record, {:.1} per batch",
            here as f64 / records as f64,
            here as f64 / batches
        );
        println!(
            "whole client process:       {all} allocations, {:.4} per record, {:.1} per batch",
            all as f64 / records as f64,
            all as f64 / batches
        );
        producer.close().await;
        broker.stop().expect("stop broker");
    });
}
