//! A batch of messages to the working set and the live state: decode, apply, dead-letter.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use crate::{dead_letter, js_error, EngineState, Ingest, IngestError};
use async_nats::jetstream::{self};
use bytes::Bytes;
use chrono::Utc;
use kpi_model::event::{tenant_of_subject, INVALID_TENANT};
use kpi_model::{
    decode_event, Aggregates, DecodeLimits, Outcome, RecordSource, Rejection, WorkingSet,
};
use kpi_store::{CounterKey, KeyFilter, Store, StoreError};
use tracing::warn;

/// One message to apply, from the durable consumer or from a recovery read.
#[derive(Clone, Debug)]
pub(crate) struct Incoming {
    pub(crate) subject: String,
    pub(crate) payload: Bytes,
    pub(crate) stream_sequence: u64,
    pub(crate) published_unix_seconds: f64,
    /// Multi-engine mode: the partition the message came from.
    pub(crate) partition: Option<u32>,
    /// A copy made by `kpi cluster migrate`: the original's stream sequence
    /// (`Kpi-Migrated-From`). An interrupted migration run again may store a copy twice; an
    /// invalid one is dead-lettered and counted once, as its original was.
    pub(crate) migrated_from: Option<u64>,
}

impl Incoming {
    /// The sequence a dead letter of this message is remembered by: the original's for a
    /// migration's copy (the originals' sequences all come before any copy's, so they are
    /// never a stored message's of the partitioned stream), else its own.
    fn rejected_as(&self) -> u64 {
        self.migrated_from.unwrap_or(self.stream_sequence)
    }
}

/// The original's sequence a migration's copy carries.
pub(crate) fn migrated_from(headers: Option<&async_nats::HeaderMap>) -> Option<u64> {
    headers?
        .get(crate::migrate::MIGRATED_FROM_HEADER)?
        .as_str()
        .parse()
        .ok()
}

/// What a consumer handed over.
pub(crate) enum Delivery {
    /// A message of the stream, with its consumer sequence.
    Stream(Incoming, u64),
    /// A JetStream delivery (`$JS.ACK.` reply) whose metadata cannot be read: its sequence is
    /// unknown, so nothing may be acknowledged past it before its range is re-read.
    Unreadable,
    /// Not a JetStream delivery (no `$JS.ACK.` reply): something published straight to the
    /// engine's inbox. It is not in the stream; there is nothing to apply or acknowledge.
    Foreign,
}

impl Delivery {
    pub(crate) fn of(message: &jetstream::Message) -> Delivery {
        match message.info() {
            Ok(info) => Delivery::Stream(
                Incoming {
                    subject: message.subject.to_string(),
                    payload: message.payload.clone(),
                    stream_sequence: info.stream_sequence,
                    published_unix_seconds: info.published.unix_timestamp_nanos() as f64 / 1e9,
                    partition: None,
                    migrated_from: None,
                },
                info.consumer_sequence,
            ),
            Err(_) if is_jetstream_reply(message.reply.as_deref()) => Delivery::Unreadable,
            Err(_) => Delivery::Foreign,
        }
    }
}

/// Whether a reply subject is a JetStream acknowledgement subject.
pub(crate) fn is_jetstream_reply(reply: Option<&str>) -> bool {
    reply.is_some_and(|reply| reply.starts_with("$JS.ACK."))
}

/// What applying a batch to the working set produced.
pub(crate) struct Prepared {
    /// New absolute values of the processed and duplicate counters the batch changed.
    pub(crate) counters: BTreeMap<CounterKey, u64>,
    /// New absolute values of the rejected counters, to stage once the dead letters are
    /// stored.
    pub(crate) rejected_counters: BTreeMap<CounterKey, u64>,
    pub(crate) rejected_sequences: Vec<u64>,
    pub(crate) delta: Aggregates,
    pub(crate) dead_letters: Vec<(Incoming, String, Rejection)>,
    pub(crate) applied: usize,
}

/// What the ingest applied since its last checkpoint, not yet written to sled.
pub(crate) struct Staged {
    /// Every key in the store: lets a batch skip sled for entities it has never seen.
    pub(crate) filter: KeyFilter,
    pub(crate) set: WorkingSet,
    /// Absolute values of the counters changed since the checkpoint.
    pub(crate) counters: BTreeMap<CounterKey, u64>,
    /// Stream sequences dead-lettered since the checkpoint.
    pub(crate) rejected: BTreeSet<u64>,
    pub(crate) events: usize,
    pub(crate) since: Option<Instant>,
    /// Multi-engine mode: the last stream sequence applied of each partition (loaded from the
    /// store, then advanced by every batch; every checkpoint writes it with the records).
    pub(crate) applied: Option<BTreeMap<u32, u64>>,
}

impl Staged {
    pub(crate) fn is_empty(&self) -> bool {
        self.set.changed() == 0 && self.counters.is_empty() && self.rejected.is_empty()
    }
}

impl Ingest {
    /// The largest dead letter the server and the dead-letter stream take (headers included):
    /// the connection's `max_payload`, and the stream's `max_msg_size` when it has one.
    pub(crate) async fn dead_letter_max_bytes(&self, js: &jetstream::Context) -> usize {
        let max_payload = js.client().server_info().max_payload;
        let stream_limit = match js.get_stream(&self.config.nats.rejected_stream).await {
            Ok(stream) if stream.cached_info().config.max_message_size > 0 => {
                stream.cached_info().config.max_message_size as usize
            }
            _ => usize::MAX,
        };
        max_payload.min(stream_limit)
    }

    /// Applies a batch to the working set and the live state, and dead-letters what it
    /// rejects; the next checkpoint makes it durable.
    pub(crate) async fn process(
        &self,
        js: &jetstream::Context,
        items: Vec<Incoming>,
    ) -> Result<(), IngestError> {
        if items.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let store = self.store.clone();
        let state = self.state.clone();
        let limits = self.limits.clone();
        let staged = self.staged.clone();
        let (prepared, items) = tokio::task::spawn_blocking(move || {
            let mut staged = staged.lock().unwrap_or_else(|e| e.into_inner());
            let staged = &mut *staged;
            let source = Filtered {
                store: &store,
                filter: &staged.filter,
            };
            let prepared = prepare(
                &items,
                &source,
                &mut staged.set,
                &state,
                &limits,
                &staged.rejected,
            );
            (prepared, items)
        })
        .await
        .map_err(|error| IngestError::Join(error.to_string()))?;
        let prepared = prepared?;
        let stage = |name: &str, since: Instant| {
            self.state
                .metrics
                .batch_stage_seconds
                .with_label_values(&[name])
                .observe(since.elapsed().as_secs_f64());
        };
        stage("apply", started);
        let dead_letter_started = Instant::now();

        // What was applied is live and staged before anything else can fail: a dead letter
        // that does not publish must not leave applied events out of the aggregates (a
        // redelivery would then find them applied and count them as duplicates).
        {
            let mut staged = self.staged();
            staged.events += items.len();
            staged.since.get_or_insert(started);
            for (key, value) in &prepared.counters {
                staged.counters.insert(key.clone(), *value);
            }
        }
        self.state.apply(prepared.delta, &prepared.counters);

        // Dead letters are counted and remembered only once JetStream stored them: after a
        // failure, the redelivered messages are dead-lettered (and counted) again, once.
        let max_message_bytes = if prepared.dead_letters.is_empty() {
            0
        } else {
            self.dead_letter_max_bytes(js).await
        };
        for (incoming, tenant, rejection) in &prepared.dead_letters {
            warn!(subject = %incoming.subject, sequence = incoming.stream_sequence, reason = %rejection, "event rejected");
            let letter = dead_letter::dead_letter(
                &self.config.nats.stream,
                incoming.stream_sequence,
                &incoming.subject,
                &incoming.payload,
                tenant,
                rejection,
                max_message_bytes,
            );
            js.publish_with_headers(letter.subject, letter.headers, letter.payload)
                .await
                .map_err(js_error)?
                .await
                .map_err(js_error)?;
        }
        if !prepared.dead_letters.is_empty() {
            stage("dead_letter", dead_letter_started);
        }

        if !prepared.dead_letters.is_empty() {
            let mut staged = self.staged();
            staged.rejected.extend(&prepared.rejected_sequences);
            for (key, value) in &prepared.rejected_counters {
                staged.counters.insert(key.clone(), *value);
            }
            drop(staged);
            self.state
                .apply(Aggregates::default(), &prepared.rejected_counters);
        }
        let metrics = &self.state.metrics;
        metrics.batch_events.observe(items.len() as f64);
        // Wall-clock time: compared with JetStream's publication times and Prometheus' time().
        let now = Utc::now();
        let now_seconds = now.timestamp_nanos_opt().unwrap_or(0) as f64 / 1e9;
        if prepared.applied > 0 {
            metrics.last_event_timestamp.set(now_seconds);
        }
        for incoming in &items {
            metrics
                .event_latency_seconds
                .observe((now_seconds - incoming.published_unix_seconds).max(0.0));
        }
        Ok(())
    }
}

/// Decodes and applies a batch to the working set (blocking: it reads sled). `rejected` holds
/// the sequences dead-lettered since the last checkpoint.
pub(crate) fn prepare(
    items: &[Incoming],
    store: &Filtered<'_>,
    set: &mut WorkingSet,
    state: &EngineState,
    limits: &DecodeLimits,
    rejected: &BTreeSet<u64>,
) -> Result<Prepared, StoreError> {
    let now = state.clock.now();
    let tenants = &state.tenants;
    let counters = state.counters();
    let mut batch = set.batch(store, tenants);
    let mut increments: BTreeMap<CounterKey, u64> = BTreeMap::new();
    let mut dead_letters = Vec::new();
    let mut rejected_sequences = Vec::new();
    let mut seen_rejected = BTreeSet::new();
    let mut applied = 0;
    for incoming in items {
        let rejection = match decode_event(&incoming.subject, &incoming.payload, now, limits) {
            Ok(event) => {
                let counter = |make: fn(String, String) -> CounterKey| {
                    make(
                        event.tenant.clone(),
                        event.event_type().as_str().to_string(),
                    )
                };
                match batch.apply(&event)? {
                    Outcome::Applied => {
                        applied += 1;
                        *increments
                            .entry(counter(|tenant, event_type| CounterKey::Processed {
                                tenant,
                                event_type,
                            }))
                            .or_default() += 1;
                        continue;
                    }
                    Outcome::Duplicate => {
                        *increments
                            .entry(counter(|tenant, event_type| CounterKey::Duplicate {
                                tenant,
                                event_type,
                            }))
                            .or_default() += 1;
                        continue;
                    }
                    Outcome::Rejected(rejection) => rejection,
                }
            }
            Err(rejection) => rejection,
        };
        // A message dead-lettered by an earlier (crashed or unacknowledged) run is not
        // republished or counted again.
        let rejected_as = incoming.rejected_as();
        if !seen_rejected.insert(rejected_as)
            || rejected.contains(&rejected_as)
            || store.store.is_rejected(rejected_as)?
        {
            continue;
        }
        let tenant = tenant_of_subject(&incoming.subject)
            .unwrap_or(INVALID_TENANT)
            .to_string();
        // In multi-engine mode an invalid tenant's rejections are counted per partition, so
        // that each is exported by one engine, the partition's owner.
        let counted_as = match incoming.partition {
            Some(partition) if tenant == INVALID_TENANT => invalid_tenant_of(partition),
            _ => tenant.clone(),
        };
        *increments
            .entry(CounterKey::Rejected {
                tenant: counted_as,
                reason: rejection.reason.label().to_string(),
            })
            .or_default() += 1;
        rejected_sequences.push(rejected_as);
        dead_letters.push((incoming.clone(), tenant, rejection));
    }
    let delta = set.take_delta(tenants);
    let (rejected_counters, counters): (BTreeMap<_, _>, BTreeMap<_, _>) = increments
        .into_iter()
        .map(|(key, increment)| {
            let value = counters.get(&key).copied().unwrap_or(0) + increment;
            (key, value)
        })
        .partition(|(key, _)| matches!(key, CounterKey::Rejected { .. }));
    Ok(Prepared {
        counters,
        rejected_counters,
        rejected_sequences,
        delta,
        dead_letters,
        applied,
    })
}

/// The counter tenant of an invalid tenant's rejections in a partition (multi-engine mode):
/// `_invalid.<partition>`, exported as `_invalid` by the partition's owner.
pub fn invalid_tenant_of(partition: u32) -> String {
    format!("{INVALID_TENANT}.{partition}")
}

/// The store, read through the key filter.
pub(crate) struct Filtered<'a> {
    pub(crate) store: &'a Store,
    pub(crate) filter: &'a KeyFilter,
}

impl RecordSource for Filtered<'_> {
    type Error = StoreError;

    fn load(&self, key: &kpi_model::RecordKey) -> Result<Option<kpi_model::Record>, StoreError> {
        if self.filter.may_contain(&key.encode()) {
            self.store.record(key)
        } else {
            Ok(None)
        }
    }
}
