//! The order processor as a library, shared by the `orders` example's
//! `main.rs` and its test (`tests/it/examples.rs`).
//!
//! Consume-transform-produce: a processor in a consumer group reads the
//! `orders` topic, writes one `shipments` record per order through the
//! idempotent producer (acks=all), carrying the order id in a header,
//! waits until every shipment is acknowledged, and only then commits the
//! orders' offsets. A crash anywhere loses nothing: what was not committed
//! is read again by the next processor.
//!
//! Tally has no transactions yet, so the shipments and the offset commit
//! are not written atomically: a crash after the shipments were written
//! and before the commit makes the next processor send them again. The
//! idempotent producer only removes duplicates of its own retries, not of
//! a new processor's re-sends. So consumers of `shipments` drop duplicates
//! by the `order-id` header ([`dedup::Deduplicator`]): at-least-once
//! delivery plus downstream de-duplication gives each order exactly one
//! shipment.
//!
//! - [`order`]: orders, shipments, and the header.
//! - [`processor`]: the processor.
//! - [`dedup`]: downstream de-duplication.
//! - [`setup`]: the topics, and orders to process.

pub mod dedup;
pub mod order;
pub mod processor;
pub mod setup;
