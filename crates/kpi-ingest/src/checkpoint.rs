//! Checkpoints: what was applied since the last one, written atomically, then acknowledged.

use std::collections::BTreeMap;
use std::time::Instant;

use crate::{js_error, Ingest, IngestError};
use async_nats::jetstream::{self};
use kpi_store::{Commit, StoreError};

impl Ingest {
    /// Writes what was applied since the last checkpoint to sled (one atomic batch, one
    /// flush), then acknowledges `ack` and, with it, every message delivered before it.
    pub(crate) async fn checkpoint(
        &self,
        ack: Option<jetstream::Message>,
    ) -> Result<(), IngestError> {
        let started = Instant::now();
        let store = self.store.clone();
        let staged = self.staged.clone();
        let state = self.state.clone();
        let written = tokio::task::spawn_blocking(move || {
            let mut staged = staged.lock().unwrap_or_else(|e| e.into_inner());
            staged.events = 0;
            staged.since = None;
            if staged.is_empty() {
                return Ok(None);
            }
            let output = std::mem::take(&mut staged.set).finish(&state.tenants);
            let commit = Commit {
                records: output.writes,
                counters: std::mem::take(&mut staged.counters),
                rejected_sequences: std::mem::take(&mut staged.rejected).into_iter().collect(),
                applied: staged.applied.clone().unwrap_or_default(),
            };
            // Before the commit: if it fails, a key too many only costs a sled read.
            for (key, record) in &commit.records {
                if record.is_some() {
                    staged.filter.insert(&key.encode());
                }
            }
            store.commit(&commit)?;
            Ok::<_, StoreError>(Some((commit.records.len(), output.delta)))
        })
        .await
        .map_err(|error| IngestError::Join(error.to_string()))??;
        if let Some((records, delta)) = written {
            // Deltas are taken after every batch; this one is empty unless that changes.
            self.state.apply(delta, &BTreeMap::new());
            let metrics = &self.state.metrics;
            metrics
                .batch_stage_seconds
                .with_label_values(&["commit"])
                .observe(started.elapsed().as_secs_f64());
            metrics
                .batch_commit_seconds
                .observe(started.elapsed().as_secs_f64());
            metrics.checkpoint_records.observe(records as f64);
        }
        if let Some(message) = ack {
            let ack_started = Instant::now();
            // Acknowledges every message up to this one (AckPolicy::All).
            message.ack().await.map_err(js_error)?;
            self.state
                .metrics
                .batch_stage_seconds
                .with_label_values(&["ack"])
                .observe(ack_started.elapsed().as_secs_f64());
        }
        Ok(())
    }
}
