//! The ingest: events from JetStream to durable records and live aggregates.
//!
//! ## Exactly-once effect
//!
//! The engine reads `KPI_EVENTS` through one durable pull consumer with `AckPolicy::All`, in
//! batches. For each batch it (1) decodes and applies every message to the records in memory,
//! (2) republishes rejected messages to `kpi.rejected.<tenant>` and waits for JetStream to
//! store them, (3) writes records, counters and dead-letter marks in one atomic sled batch
//! and flushes it, and only then (4) acknowledges the batch's last message, which
//! acknowledges the whole batch. A crash before (4) means redelivery; records remember the
//! event ids applied to them and stream sequences already dead-lettered, so a redelivered
//! message changes nothing and is counted once.
//!
//! `AckPolicy::All` acknowledges *every* message up to the one acknowledged, including
//! messages delivered earlier that the engine never saw (lost in a reconnect, or delivered to
//! an engine process that was killed). Consumer delivery sequences are contiguous, so such a
//! hole is visible: at start-up (acknowledged floor below the delivered sequence) and whenever
//! a delivery sequence skips, the engine re-reads the unacknowledged range straight from the
//! stream with an ordered consumer and applies it before acknowledging anything past it.

pub mod state;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use chrono::Utc;
use futures_util::StreamExt;
use kpi_config::Config;
use kpi_model::event::{tenant_of_subject, INVALID_TENANT, REJECTED_SUBJECT_PREFIX};
use kpi_model::{decode_event, Batch, DecodeLimits, Outcome, RecordSource, Rejection, Tenants};
use kpi_store::{Commit, CounterKey, KeyFilter, Store, StoreError};
use tokio::sync::watch;
use tracing::{debug, info, warn};

pub use state::EngineState;

/// Header carrying the reason of a dead letter.
pub const REJECT_REASON_HEADER: &str = "Kpi-Reject-Reason";
/// Header carrying the subject a dead letter was first published to.
pub const ORIGINAL_SUBJECT_HEADER: &str = "Kpi-Original-Subject";

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
}

fn js_error(error: impl std::fmt::Display) -> IngestError {
    IngestError::JetStream(error.to_string())
}

/// One message to apply, from the durable consumer or from a recovery read.
#[derive(Clone, Debug)]
struct Incoming {
    subject: String,
    payload: Bytes,
    stream_sequence: u64,
    published_unix_seconds: f64,
}

impl Incoming {
    fn from_message(message: &jetstream::Message) -> Option<(Incoming, u64)> {
        let info = message.info().ok()?;
        let incoming = Incoming {
            subject: message.subject.to_string(),
            payload: message.payload.clone(),
            stream_sequence: info.stream_sequence,
            published_unix_seconds: info.published.unix_timestamp_nanos() as f64 / 1e9,
        };
        Some((incoming, info.consumer_sequence))
    }
}

/// What the blocking half of a batch prepared.
struct Prepared {
    commit: Commit,
    delta: kpi_model::Aggregates,
    dead_letters: Vec<(Incoming, String, Rejection)>,
    applied: usize,
}

/// Connects to NATS (with its settings and credentials) and records connection state.
pub async fn connect(
    config: &Config,
    state: Option<Arc<EngineState>>,
) -> Result<async_nats::Client, IngestError> {
    let nats = &config.nats;
    let mut options = async_nats::ConnectOptions::new()
        .name("kpi-engine")
        .connection_timeout(Duration::from_secs(5))
        .retry_on_initial_connect();
    if !nats.credentials_file.is_empty() {
        options = options
            .credentials_file(&nats.credentials_file)
            .await
            .map_err(|error| IngestError::Connect {
                url: nats.url.clone(),
                message: format!("nats.credentials_file: {error}"),
            })?;
    }
    if !nats.user.is_empty() {
        options = options.user_and_password(nats.user.clone(), nats.password.clone());
    }
    if !nats.token.is_empty() {
        options = options.token(nats.token.clone());
    }
    if let Some(state) = state {
        options = options.event_callback(move |event| {
            let state = state.clone();
            async move {
                match event {
                    async_nats::Event::Connected => state.metrics.nats_connected.set(1),
                    async_nats::Event::Disconnected => {
                        state.metrics.nats_connected.set(0);
                        warn!("disconnected from NATS; reconnecting");
                    }
                    other => debug!(event = %other, "NATS event"),
                }
            }
        });
    }
    let client = tokio::time::timeout(Duration::from_secs(30), options.connect(nats.url.as_str()))
        .await
        .map_err(|_| IngestError::Connect {
            url: nats.url.clone(),
            message: "no answer within 30 s".into(),
        })?
        .map_err(|error| IngestError::Connect {
            url: nats.url.clone(),
            message: error.to_string(),
        })?;
    Ok(client)
}

/// Creates the event and dead-letter streams when absent (never deletes or changes them).
pub async fn ensure_streams(
    js: &jetstream::Context,
    config: &Config,
) -> Result<stream::Stream, IngestError> {
    let duplicate_window = Duration::from_secs(config.nats.duplicate_window_s);
    let events = js
        .get_or_create_stream(stream::Config {
            name: config.nats.stream.clone(),
            subjects: vec!["kpi.events.>".to_string()],
            storage: stream::StorageType::File,
            duplicate_window,
            ..Default::default()
        })
        .await
        .map_err(js_error)?;
    js.get_or_create_stream(stream::Config {
        name: config.nats.rejected_stream.clone(),
        subjects: vec![format!("{REJECTED_SUBJECT_PREFIX}>")],
        storage: stream::StorageType::File,
        duplicate_window,
        ..Default::default()
    })
    .await
    .map_err(js_error)?;
    Ok(events)
}

/// The engine's ingest task.
pub struct Ingest {
    config: Config,
    store: Store,
    state: Arc<EngineState>,
    limits: DecodeLimits,
    /// Every key in the store: lets a batch skip sled for entities it has never seen.
    filter: Arc<Mutex<KeyFilter>>,
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
            filter: Arc::new(Mutex::new(filter)),
        }
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
            match self.consume(&js, &mut shutdown).await {
                Ok(()) => return Ok(()),
                Err(error @ IngestError::ConsumerPolicy(_)) => return Err(error),
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

    async fn consume(
        &self,
        js: &jetstream::Context,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), IngestError> {
        let nats = &self.config.nats;
        let events_stream = ensure_streams(js, &self.config).await?;
        let mut consumer: consumer::PullConsumer = events_stream
            .get_or_create_consumer(
                &nats.consumer,
                consumer::pull::Config {
                    durable_name: Some(nats.consumer.clone()),
                    description: Some("KPI engine: applies events to the KPI store".into()),
                    ack_policy: consumer::AckPolicy::All,
                    ack_wait: Duration::from_millis(nats.ack_wait_ms),
                    max_ack_pending: nats.max_ack_pending,
                    // No filter: the stream holds only kpi.events.>, and a filtered consumer
                    // reads the stream's last block slowly on nats-server 2.9 (BENCHMARKS.md).
                    ..Default::default()
                },
            )
            .await
            .map_err(js_error)?;
        let info = consumer.info().await.map_err(js_error)?.clone();
        if info.config.ack_policy != consumer::AckPolicy::All {
            return Err(IngestError::ConsumerPolicy(nats.consumer.clone()));
        }
        self.state.set_ready(true);
        info!(stream = %nats.stream, consumer = %nats.consumer, pending = info.num_pending, "consuming");

        // Every delivery after the one the consumer reported during recovery must reach us; a
        // skipped sequence (e.g. messages the server handed to the pull request of a killed
        // process) triggers another recovery before anything is acknowledged past it.
        let delivered = self.recover(js, &events_stream).await?;
        let mut expected_consumer_sequence = Some(delivered + 1);

        let poller = tokio::spawn(poll_consumer_info(
            events_stream.clone(),
            nats.consumer.clone(),
            self.state.clone(),
        ));
        let _stop_poller = AbortOnDrop(poller);

        let mut messages = consumer
            .stream()
            .max_messages_per_batch(self.config.ingest.batch_max_events)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await
            .map_err(js_error)?;
        let batch_wait = Duration::from_millis(self.config.ingest.batch_max_wait_ms);
        loop {
            let fetch_started = Instant::now();
            let first = tokio::select! {
                next = messages.next() => next,
                _ = shutdown.changed() => return Ok(()),
            };
            let mut batch = match first {
                Some(Ok(message)) => vec![message],
                Some(Err(error)) => return Err(js_error(error)),
                None => return Err(IngestError::JetStream("message stream ended".into())),
            };
            let deadline = tokio::time::Instant::now() + batch_wait;
            while batch.len() < self.config.ingest.batch_max_events {
                match tokio::time::timeout_at(deadline, messages.next()).await {
                    Ok(Some(Ok(message))) => batch.push(message),
                    Ok(Some(Err(error))) => {
                        warn!(%error, "error while filling a batch");
                        break;
                    }
                    Ok(None) | Err(_) => break,
                }
            }

            self.state
                .metrics
                .batch_stage_seconds
                .with_label_values(&["fetch"])
                .observe(fetch_started.elapsed().as_secs_f64());
            let mut items = Vec::with_capacity(batch.len());
            let mut hole = false;
            for message in &batch {
                let Some((incoming, consumer_sequence)) = Incoming::from_message(message) else {
                    continue;
                };
                if let Some(expected) = expected_consumer_sequence {
                    if consumer_sequence != expected {
                        hole = true;
                    }
                }
                expected_consumer_sequence = Some(consumer_sequence + 1);
                items.push(incoming);
            }
            if let Some(last) = batch.last().and_then(|m| m.info().ok()) {
                self.state.metrics.consumer_pending.set(last.pending as i64);
            }
            self.process(js, items).await?;
            if hole {
                warn!("delivery sequence skipped: re-reading unacknowledged messages");
                self.recover(js, &events_stream).await?;
            }
            if let Some(last) = batch.last() {
                // Acknowledges every message up to this one (AckPolicy::All).
                let ack_started = Instant::now();
                last.ack().await.map_err(js_error)?;
                self.state
                    .metrics
                    .batch_stage_seconds
                    .with_label_values(&["ack"])
                    .observe(ack_started.elapsed().as_secs_f64());
            }
        }
    }

    /// Re-reads from the stream the messages delivered to the consumer but not acknowledged,
    /// and applies them (idempotently), so that acknowledging later messages loses nothing.
    /// Returns the consumer's delivered sequence at the time of the re-read.
    async fn recover(
        &self,
        js: &jetstream::Context,
        events_stream: &stream::Stream,
    ) -> Result<u64, IngestError> {
        let info = events_stream
            .consumer_info(&self.config.nats.consumer)
            .await
            .map_err(js_error)?;
        let delivered = info.delivered.consumer_sequence;
        let from = info.ack_floor.stream_sequence + 1;
        let to = info.delivered.stream_sequence;
        if from > to {
            return Ok(delivered);
        }
        info!(
            from,
            to, "re-reading messages delivered but not acknowledged"
        );
        self.state.metrics.recoveries_total.inc();
        // A short-lived consumer of our own, deleted when done (an ephemeral one left behind
        // would show as a lagging consumer of the stream until the server expires it).
        let reader_name = format!(
            "{}-recovery-{}",
            self.config.nats.consumer,
            Utc::now().timestamp_nanos_opt().unwrap_or(0)
        );
        let reader: consumer::PullConsumer = events_stream
            .create_consumer(consumer::pull::Config {
                name: Some(reader_name.clone()),
                description: Some("KPI engine: re-reads unacknowledged messages".into()),
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: from,
                },
                ack_policy: consumer::AckPolicy::None,
                inactive_threshold: Duration::from_secs(30),
                filter_subject: "kpi.events.>".into(),
                ..Default::default()
            })
            .await
            .map_err(js_error)?;
        let result = self.read_range(js, &reader, to).await.map(|()| delivered);
        if let Err(error) = events_stream.delete_consumer(&reader_name).await {
            debug!(%error, "recovery consumer not deleted; the server expires it");
        }
        result
    }

    async fn read_range(
        &self,
        js: &jetstream::Context,
        reader: &consumer::PullConsumer,
        to: u64,
    ) -> Result<(), IngestError> {
        loop {
            let mut messages = reader
                .fetch()
                .max_messages(self.config.ingest.batch_max_events)
                .expires(Duration::from_secs(1))
                .messages()
                .await
                .map_err(js_error)?;
            let mut items = Vec::new();
            let mut done = false;
            while let Some(message) = messages.next().await {
                let message = message.map_err(js_error)?;
                let Some((incoming, _)) = Incoming::from_message(&message) else {
                    continue;
                };
                if incoming.stream_sequence > to {
                    done = true;
                    break;
                }
                done = incoming.stream_sequence == to;
                items.push(incoming);
                if done {
                    break;
                }
            }
            // An empty fetch means the rest of the range is gone (deleted from the stream).
            done = done || items.is_empty();
            self.process(js, items).await?;
            if done {
                return Ok(());
            }
        }
    }

    /// Applies, dead-letters and commits a batch, then updates the live state.
    async fn process(
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
        let filter = self.filter.clone();
        let (prepared, items) = tokio::task::spawn_blocking(move || {
            let mut filter = filter.lock().unwrap_or_else(|e| e.into_inner());
            let source = Filtered {
                store: &store,
                filter: &filter,
            };
            let prepared = prepare(&items, &source, &state.tenants, &limits, &state.counters());
            if let Ok(prepared) = &prepared {
                // Before the commit: if it fails, a key too many only costs a sled read.
                for (key, record) in &prepared.commit.records {
                    if record.is_some() {
                        filter.insert(&key.encode());
                    }
                }
            }
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

        for (incoming, tenant, rejection) in &prepared.dead_letters {
            warn!(subject = %incoming.subject, sequence = incoming.stream_sequence, reason = %rejection, "event rejected");
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(REJECT_REASON_HEADER, rejection.to_string().as_str());
            headers.insert(ORIGINAL_SUBJECT_HEADER, incoming.subject.as_str());
            headers.insert(
                "Nats-Msg-Id",
                format!(
                    "kpi-rejected-{}-{}",
                    self.config.nats.stream, incoming.stream_sequence
                )
                .as_str(),
            );
            js.publish_with_headers(
                format!("{REJECTED_SUBJECT_PREFIX}{tenant}"),
                headers,
                incoming.payload.clone(),
            )
            .await
            .map_err(js_error)?
            .await
            .map_err(js_error)?;
        }

        if !prepared.dead_letters.is_empty() {
            stage("dead_letter", dead_letter_started);
        }
        let commit_started = Instant::now();
        let store = self.store.clone();
        let commit = prepared.commit;
        let commit = tokio::task::spawn_blocking(move || store.commit(&commit).map(|()| commit))
            .await
            .map_err(|error| IngestError::Join(error.to_string()))??;
        stage("commit", commit_started);
        let metrics = &self.state.metrics;
        metrics
            .batch_commit_seconds
            .observe(started.elapsed().as_secs_f64());
        metrics.batch_events.observe(items.len() as f64);
        self.state.apply(prepared.delta, &commit.counters);
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

/// Decodes and applies a batch against the store (blocking: it reads sled).
fn prepare(
    items: &[Incoming],
    store: &Filtered<'_>,
    tenants: &Tenants,
    limits: &DecodeLimits,
    counters: &BTreeMap<CounterKey, u64>,
) -> Result<Prepared, StoreError> {
    let now = Utc::now();
    let mut batch = Batch::new(store, tenants);
    let mut increments: BTreeMap<CounterKey, u64> = BTreeMap::new();
    let mut dead_letters = Vec::new();
    let mut rejected_sequences = Vec::new();
    let mut seen_rejected = HashSet::new();
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
        if !seen_rejected.insert(incoming.stream_sequence)
            || store.store.is_rejected(incoming.stream_sequence)?
        {
            continue;
        }
        let tenant = tenant_of_subject(&incoming.subject)
            .unwrap_or(INVALID_TENANT)
            .to_string();
        *increments
            .entry(CounterKey::Rejected {
                tenant: tenant.clone(),
                reason: rejection.reason.label().to_string(),
            })
            .or_default() += 1;
        rejected_sequences.push(incoming.stream_sequence);
        dead_letters.push((incoming.clone(), tenant, rejection));
    }
    let output = batch.finish();
    let counters = increments
        .into_iter()
        .map(|(key, increment)| {
            let value = counters.get(&key).copied().unwrap_or(0) + increment;
            (key, value)
        })
        .collect();
    Ok(Prepared {
        commit: Commit {
            records: output.writes,
            counters,
            rejected_sequences,
        },
        delta: output.delta,
        dead_letters,
        applied,
    })
}

/// The store, read through the key filter.
struct Filtered<'a> {
    store: &'a Store,
    filter: &'a KeyFilter,
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

/// Refreshes the consumer's pending counts every few seconds (also while idle).
async fn poll_consumer_info(
    events_stream: stream::Stream,
    consumer: String,
    state: Arc<EngineState>,
) {
    loop {
        match events_stream.consumer_info(&consumer).await {
            Ok(info) => {
                state.metrics.consumer_pending.set(info.num_pending as i64);
                state
                    .metrics
                    .consumer_ack_pending
                    .set(info.num_ack_pending as i64);
            }
            Err(error) => debug!(%error, "consumer info unavailable"),
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
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
