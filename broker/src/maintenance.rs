//! Background upkeep of every partition: interval flushes, retention and
//! checkpoint files. One task, waking once a second; the disk work runs on a
//! blocking thread.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::broker::Broker;

/// Runs until `stop` turns true.
pub async fn run(broker: Arc<Broker>, mut stop: watch::Receiver<bool>) {
    let retention_every = Duration::from_millis(broker.config().retention_check_interval_ms);
    let checkpoint_every = Duration::from_millis(broker.config().checkpoint_interval_ms);
    let mut last_retention = Instant::now();
    let mut last_checkpoint = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let now = Instant::now();
        let retention = now.duration_since(last_retention) >= retention_every;
        let checkpoint = now.duration_since(last_checkpoint) >= checkpoint_every;
        if retention {
            last_retention = now;
        }
        if checkpoint {
            last_checkpoint = now;
        }
        let b = broker.clone();
        let expiration_ms = i64::try_from(broker.config().producer_id_expiration_ms).unwrap_or(i64::MAX);
        let work = tokio::task::spawn_blocking(move || {
            for p in b.all_partitions() {
                let span = tracing::info_span!("maintenance", topic = p.topic(), partition = p.index());
                let _enter = span.enter();
                if let Err(e) = p.flush_if_due() {
                    tracing::error!(error = %e, "interval flush failed");
                }
                if retention {
                    let expired = p.expire_producers(expiration_ms);
                    if expired > 0 {
                        tracing::debug!(producers = expired, "idle producers expired");
                    }
                    match p.enforce_retention() {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(segments = n, "retention deleted segments"),
                        Err(e) => tracing::error!(error = %e, "retention failed"),
                    }
                }
                if checkpoint && let Err(e) = p.checkpoint() {
                    tracing::error!(error = %e, "checkpoint failed");
                }
            }
        });
        let _ = work.await;
    }
}
