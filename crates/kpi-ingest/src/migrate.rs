//! `kpi cluster migrate`: a single engine's event stream made partitioned in place, its whole
//! history kept, so that engines in multi-engine mode rebuild every figure from it.
//!
//! 1. The stream's subjects become `kpi.events.*.>` with the partition transform: from then
//!    on, every event published (producers are unchanged) is stored under its partition.
//! 2. The events stored before, under their original subjects, are published again to their
//!    subjects, so the stream stores a copy under the partition (with `Kpi-Migrated-From`, the
//!    original's sequence); after each batch is stored, the originals copied are purged. A
//!    migration interrupted and run again copies what is left; at most the batch in flight
//!    when it stopped is stored twice, which the engines apply once (every record knows the
//!    event ids applied to it); an invalid event of it is dead-lettered and counted once, as
//!    the engines remember a copy's dead letter by the original's sequence.
//! 3. The single engine's durable consumer is deleted.
//!
//! Events are applied whatever their order, so copies stored after newer events change
//! nothing. The partitioned engines start from empty stores: each rebuilds its partitions
//! from the stream.

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use async_nats::HeaderMap;
use futures_util::StreamExt;
use kpi_config::Config;

use crate::streams::{
    check_partitioned, partition_transform, require_cluster_server, PARTITIONED_SUBJECTS,
};
use crate::{connect_command, js_error, IngestError};

/// The header of a copy: the stream sequence of the original.
pub const MIGRATED_FROM_HEADER: &str = "Kpi-Migrated-From";

/// Subjects of the events stored before the migration: partitioned subjects begin with the
/// partition's number, so they never match.
const UNPARTITIONED: &str = "kpi.events.>";

/// Copies published before their acknowledgements are awaited and their originals purged.
const BATCH: usize = 512;

/// What a migration did.
#[derive(Debug, Default)]
pub struct Migration {
    /// The stream was partitioned by an earlier run.
    pub already_partitioned: bool,
    /// Events copied under their partition (and their originals purged).
    pub copied: u64,
    /// Messages on a subject without an event type (`kpi.events.<tenant>`), invalid and
    /// dead-lettered by the single engine: purged, not copied.
    pub left_out: u64,
    /// The single engine's durable consumer was there and is deleted.
    pub consumer_deleted: bool,
}

/// Migrates `nats.stream` to `cluster.partitions` partitions; `progress` hears the events
/// copied so far and the total.
pub async fn migrate(
    config: &Config,
    progress: impl Fn(u64, u64),
) -> Result<Migration, IngestError> {
    let client = connect_command(config).await?;
    let js = jetstream::new(client.clone());
    let version = require_cluster_server(&js, config).await?;
    let name = &config.nats.stream;
    let mut events = js.get_stream(name).await.map_err(|error| {
        IngestError::Cluster(format!(
            "nats.stream: no stream `{name}` ({error}): nothing to migrate (a new install starts with [cluster] directly)"
        ))
    })?;
    let info = events.info().await.map_err(js_error)?.clone();
    let mut migration = Migration {
        already_partitioned: info.config.subject_transform.is_some(),
        ..Migration::default()
    };
    if !migration.already_partitioned {
        let state = &info.state;
        let held = state.last_sequence.saturating_sub(state.first_sequence) + 1;
        if state.messages > 0 && (state.first_sequence > 1 || state.messages != held) {
            return Err(IngestError::Cluster(format!(
                "nats.stream: `{name}` no longer holds every event since the first (it holds {} of sequences 1 to {}: limits or a purge removed the others); the single engine's store has history the stream cannot give back, so engines in multi-engine mode could not rebuild it",
                state.messages, state.last_sequence
            )));
        }
        let mut updated = info.config.clone();
        updated.subjects = vec![PARTITIONED_SUBJECTS.to_string()];
        updated.subject_transform = Some(partition_transform(config.cluster.partitions));
        js.update_stream(&updated).await.map_err(js_error)?;
        events = js.get_stream(name).await.map_err(js_error)?;
    }
    check_partitioned(&events.cached_info().config, config, &version)?;

    let mut originals = events
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: UNPARTITIONED.to_string(),
            deliver_policy: consumer::DeliverPolicy::All,
            description: Some("kpi cluster migrate".into()),
            ..Default::default()
        })
        .await
        .map_err(js_error)?;
    let total = originals.info().await.map_err(js_error)?.num_pending;
    progress(0, total);
    if total > 0 {
        let mut messages = originals.messages().await.map_err(js_error)?;
        let mut acks = Vec::with_capacity(BATCH);
        let mut read = 0u64;
        while read < total {
            let message = tokio::time::timeout(Duration::from_secs(30), messages.next())
                .await
                .map_err(|_| js_error("no message from the stream within 30 s"))?
                .ok_or_else(|| js_error("the stream's messages ended"))?
                .map_err(js_error)?;
            let sequence = message.info().map_err(js_error)?.stream_sequence;
            read += 1;
            // `kpi.events.<tenant>` with no type: invalid, already dead-lettered by the single
            // engine, and not a subject the partitioned stream takes: left out.
            if message.subject.split('.').count() < 4 {
                migration.left_out += 1;
            } else {
                let mut headers = HeaderMap::new();
                if let Some(original) = &message.headers {
                    for (key, values) in original.iter() {
                        // The server's own headers (message id, expected sequences, rollups, TTL)
                        // are not the event's: a copy without them is stored as it is.
                        if !AsRef::<str>::as_ref(key).starts_with("Nats-") {
                            for value in values {
                                headers.append(key.clone(), value.clone());
                            }
                        }
                    }
                }
                headers.insert(MIGRATED_FROM_HEADER, sequence.to_string().as_str());
                let ack = js
                    .publish_with_headers(message.subject.clone(), headers, message.payload.clone())
                    .await
                    .map_err(js_error)?;
                acks.push(ack);
            }
            if acks.len() == BATCH || read == total {
                for ack in acks.drain(..) {
                    ack.await.map_err(js_error)?;
                    migration.copied += 1;
                }
                events
                    .purge()
                    .filter(UNPARTITIONED)
                    .sequence(sequence + 1)
                    .await
                    .map_err(js_error)?;
                progress(read, total);
            }
        }
    }
    migration.consumer_deleted = events.delete_consumer(&config.nats.consumer).await.is_ok();
    client.flush().await.map_err(js_error)?;
    Ok(migration)
}
