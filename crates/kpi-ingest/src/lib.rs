//! The ingest: events from JetStream to durable records and live aggregates.
//!
//! ## Exactly-once effect
//!
//! The engine reads `KPI_EVENTS` through one durable pull consumer with `AckPolicy::All`, in
//! batches. For each batch it (1) decodes and applies every message to the records of its
//! working set (loaded from sled when first needed) and to the live aggregates, and
//! (2) republishes rejected messages to `kpi.rejected.<tenant>`, waiting for JetStream to store
//! them. At a checkpoint (every `ingest.checkpoint_max_events` events or
//! `ingest.checkpoint_max_wait_ms`) it (3) writes the records changed since the last
//! checkpoint, once each however many events changed them, with the counters and dead-letter
//! marks, atomically and durably (a large checkpoint through a redo entry, see kpi-store), and
//! only then (4) acknowledges the last message, which acknowledges every message before it. A crash before (4) means redelivery;
//! records remember the event ids applied to them and stream sequences already
//! dead-lettered, so a redelivered message changes nothing and is counted once. The live
//! aggregates may run ahead of the store by one checkpoint: after a crash they restart from
//! the store and the redelivered events bring them back.
//!
//! `AckPolicy::All` acknowledges *every* message up to the one acknowledged, including
//! messages delivered earlier that the engine never saw (lost in a reconnect, or delivered to
//! an engine process that was killed). Consumer delivery sequences are contiguous, so such a
//! hole is visible: at start-up (acknowledged floor below the delivered sequence) and whenever
//! a delivery sequence skips, the engine re-reads the unacknowledged range straight from the
//! stream with an ordered consumer and applies it before acknowledging anything past it.

mod apply;
mod checkpoint;
pub mod cluster;
mod connection;
mod consume;
pub mod dead_letter;
pub mod migrate;
pub mod ownership;
mod partitioned;
mod recovery;
pub mod state;
pub mod streams;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self};
use kpi_config::Config;
use kpi_model::{DecodeLimits, WorkingSet};
use kpi_store::{KeyFilter, Store, StoreError};
use tokio::sync::watch;
use tracing::{info, warn};

pub use state::EngineState;

pub use dead_letter::{
    ORIGINAL_SEQUENCE_HEADER, ORIGINAL_SUBJECT_HEADER, REJECT_REASON_HEADER, TRUNCATED_HEADER,
};

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("cannot connect to NATS at {url}: {message}")]
    Connect { url: String, message: String },
    #[error("JetStream: {0}")]
    JetStream(String),
    #[error("consumer `{0}` exists with an ack policy other than `all`; the engine needs `all` (use another nats.consumer name)")]
    ConsumerPolicy(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("a blocking task failed: {0}")]
    Join(String),
    /// A setting multi-engine mode cannot run with (named in the message): the engine stops.
    #[error("{0}")]
    Cluster(String),
}

fn js_error(error: impl std::fmt::Display) -> IngestError {
    IngestError::JetStream(error.to_string())
}

pub use apply::invalid_tenant_of;
pub use connection::{connect, connect_command, Connection};
pub use streams::ensure_streams;

use apply::Staged;

/// The engine's ingest task.
pub struct Ingest {
    config: Config,
    store: Store,
    state: Arc<EngineState>,
    limits: DecodeLimits,
    staged: Arc<Mutex<Staged>>,
}

impl Ingest {
    /// `filter` holds every key in `store` (from [`load_state`]).
    pub fn new(config: Config, store: Store, state: Arc<EngineState>, filter: KeyFilter) -> Ingest {
        let limits = config.decode_limits();
        Ingest {
            config,
            store,
            state,
            limits,
            staged: Arc::new(Mutex::new(Staged {
                filter,
                set: WorkingSet::new(),
                counters: BTreeMap::new(),
                rejected: BTreeSet::new(),
                events: 0,
                since: None,
                applied: None,
            })),
        }
    }

    fn staged(&self) -> std::sync::MutexGuard<'_, Staged> {
        self.staged.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs until `shutdown` turns true; reconnects and re-creates missing streams or consumer
    /// on errors, with back-off.
    pub async fn run(
        self,
        client: async_nats::Client,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), IngestError> {
        let js = jetstream::new(client);
        let mut backoff = Duration::from_millis(250);
        loop {
            if *shutdown.borrow() {
                return Ok(());
            }
            let consumed = if self.config.cluster.enabled {
                self.partitioned(&js, &mut shutdown).await
            } else {
                self.consume(&js, &mut shutdown).await
            };
            match consumed {
                Ok(()) => return Ok(()),
                Err(error @ IngestError::ConsumerPolicy(_)) => return Err(error),
                Err(error @ IngestError::Cluster(_)) => return Err(error),
                Err(error @ IngestError::Store(_)) => return Err(error),
                Err(error) => {
                    self.state.set_ready(false);
                    warn!(%error, retry_in_ms = backoff.as_millis() as u64, "ingest interrupted");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.changed() => return Ok(()),
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }
}

/// Loads the store into the live state (counters, and aggregates rebuilt from the records);
/// returns the filter of stored keys for [`Ingest::new`].
pub fn load_state(store: &Store, state: &EngineState) -> Result<KeyFilter, StoreError> {
    let started = Instant::now();
    let (aggregates, filter, records) = store.rebuild(&state.tenants)?;
    let counters = store.counters()?;
    state.reset(aggregates, counters);
    let seconds = started.elapsed().as_secs_f64();
    state.metrics.rebuild_seconds.set(seconds);
    state.metrics.store_records.set(records as i64);
    info!(records, seconds, "aggregates rebuilt from the store");
    Ok(filter)
}
