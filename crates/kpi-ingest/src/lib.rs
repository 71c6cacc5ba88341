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

pub mod dead_letter;
pub mod state;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use chrono::Utc;
use futures_util::StreamExt;
use kpi_config::Config;
use kpi_model::event::{tenant_of_subject, INVALID_TENANT, REJECTED_SUBJECT_PREFIX};
use kpi_model::{
    decode_event, Aggregates, DecodeLimits, Outcome, RecordSource, Rejection, WorkingSet,
};
use kpi_store::{Commit, CounterKey, KeyFilter, Store, StoreError};
use tokio::sync::watch;
use tracing::{debug, info, warn};

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

/// What a consumer handed over.
enum Delivery {
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
    fn of(message: &jetstream::Message) -> Delivery {
        match message.info() {
            Ok(info) => Delivery::Stream(
                Incoming {
                    subject: message.subject.to_string(),
                    payload: message.payload.clone(),
                    stream_sequence: info.stream_sequence,
                    published_unix_seconds: info.published.unix_timestamp_nanos() as f64 / 1e9,
                },
                info.consumer_sequence,
            ),
            Err(_) if is_jetstream_reply(message.reply.as_deref()) => Delivery::Unreadable,
            Err(_) => Delivery::Foreign,
        }
    }
}

/// Whether a reply subject is a JetStream acknowledgement subject.
fn is_jetstream_reply(reply: Option<&str>) -> bool {
    reply.is_some_and(|reply| reply.starts_with("$JS.ACK."))
}

/// What applying a batch to the working set produced.
struct Prepared {
    /// New absolute values of the processed and duplicate counters the batch changed.
    counters: BTreeMap<CounterKey, u64>,
    /// New absolute values of the rejected counters, to stage once the dead letters are
    /// stored.
    rejected_counters: BTreeMap<CounterKey, u64>,
    rejected_sequences: Vec<u64>,
    delta: Aggregates,
    dead_letters: Vec<(Incoming, String, Rejection)>,
    applied: usize,
}

/// What the ingest applied since its last checkpoint, not yet written to sled.
struct Staged {
    /// Every key in the store: lets a batch skip sled for entities it has never seen.
    filter: KeyFilter,
    set: WorkingSet,
    /// Absolute values of the counters changed since the checkpoint.
    counters: BTreeMap<CounterKey, u64>,
    /// Stream sequences dead-lettered since the checkpoint.
    rejected: BTreeSet<u64>,
    events: usize,
    since: Option<Instant>,
}

impl Staged {
    fn is_empty(&self) -> bool {
        self.set.changed() == 0 && self.counters.is_empty() && self.rejected.is_empty()
    }
}

/// Who connects: the engine keeps trying until NATS answers (and reconnects for ever); a
/// command fails at once with the server's reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Connection {
    Engine,
    Command,
}

/// The options of every connection to NATS, from `[nats]`: servers, credentials (a `.creds`
/// file, user and password, or a token) and time-outs. Every command and the engine connect
/// with these.
async fn connect_options(
    config: &Config,
    connection: Connection,
) -> Result<async_nats::ConnectOptions, IngestError> {
    let nats = &config.nats;
    let mut options = async_nats::ConnectOptions::new()
        .name(match connection {
            Connection::Engine => "kpi-engine",
            Connection::Command => "kpi-command",
        })
        .connection_timeout(Duration::from_secs(5));
    if connection == Connection::Engine {
        options = options.retry_on_initial_connect();
    }
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
    Ok(options)
}

/// The servers of `nats.url` (one, or several separated by commas), for `connect`.
fn server_addrs(config: &Config) -> Result<Vec<async_nats::ServerAddr>, IngestError> {
    config
        .nats
        .servers()
        .into_iter()
        .map(|server| {
            server.parse().map_err(|error| IngestError::Connect {
                url: config.nats.url.clone(),
                message: format!("nats.url: `{server}`: {error}"),
            })
        })
        .collect()
}

/// Connects a command (`kpi publish`, `demo`, `import`, `connectors ...`) to NATS with the
/// configured servers and credentials; fails with the server's reason.
pub async fn connect_command(config: &Config) -> Result<async_nats::Client, IngestError> {
    let options = connect_options(config, Connection::Command).await?;
    let url = &config.nats.url;
    let servers = server_addrs(config)?;
    tokio::time::timeout(Duration::from_secs(30), options.connect(servers))
        .await
        .map_err(|_| IngestError::Connect {
            url: url.clone(),
            message: "no answer within 30 s".into(),
        })?
        .map_err(|error| IngestError::Connect {
            url: url.clone(),
            message: error.to_string(),
        })
}

/// Connects the engine to NATS (with its settings and credentials) and records connection
/// state in the engine's metrics.
pub async fn connect(
    config: &Config,
    state: Option<Arc<EngineState>>,
) -> Result<async_nats::Client, IngestError> {
    let nats = &config.nats;
    let mut options = connect_options(config, Connection::Engine).await?;
    if let Some(state) = state {
        options = options.event_callback(move |event| {
            let state = state.clone();
            async move {
                match event {
                    async_nats::Event::Connected => state.set_nats_connected(true),
                    async_nats::Event::Disconnected => {
                        state.set_nats_connected(false);
                        warn!("disconnected from NATS; reconnecting");
                    }
                    other => debug!(event = %other, "NATS event"),
                }
            }
        });
    }
    let servers = server_addrs(config)?;
    let client = tokio::time::timeout(Duration::from_secs(30), options.connect(servers))
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
            num_replicas: config.nats.replicas.max(1),
            ..Default::default()
        })
        .await
        .map_err(js_error)?;
    js.get_or_create_stream(stream::Config {
        name: config.nats.rejected_stream.clone(),
        subjects: vec![format!("{REJECTED_SUBJECT_PREFIX}>")],
        storage: stream::StorageType::File,
        duplicate_window,
        num_replicas: config.nats.replicas.max(1),
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
        let checkpoint_wait = Duration::from_millis(self.config.ingest.checkpoint_max_wait_ms);
        // A consumer created earlier keeps its own max_ack_pending: never wait for more
        // unacknowledged messages than the server hands out.
        let checkpoint_events = match info.config.max_ack_pending {
            limit if limit > 0 => self.config.ingest.checkpoint_max_events.min(limit as usize),
            _ => self.config.ingest.checkpoint_max_events,
        };
        // The last message applied and not yet acknowledged.
        let mut to_ack: Option<jetstream::Message> = None;
        loop {
            let fetch_started = Instant::now();
            let checkpoint_due = self
                .staged()
                .since
                .map(|since| tokio::time::Instant::from_std(since + checkpoint_wait));
            let first = tokio::select! {
                next = messages.next() => next,
                _ = sleep_until(checkpoint_due) => {
                    self.checkpoint(to_ack.take()).await?;
                    continue;
                }
                _ = shutdown.changed() => {
                    self.checkpoint(to_ack.take()).await?;
                    return Ok(());
                }
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
            let mut last_delivery = None;
            for (index, message) in batch.iter().enumerate() {
                match Delivery::of(message) {
                    Delivery::Stream(incoming, consumer_sequence) => {
                        if let Some(expected) = expected_consumer_sequence {
                            if consumer_sequence != expected {
                                hole = true;
                            }
                        }
                        expected_consumer_sequence = Some(consumer_sequence + 1);
                        last_delivery = Some(index);
                        items.push(incoming);
                    }
                    Delivery::Unreadable => {
                        warn!(subject = %message.subject, reply = ?message.reply, "a delivery without readable metadata: re-reading unacknowledged messages");
                        hole = true;
                    }
                    Delivery::Foreign => {
                        warn!(subject = %message.subject, "ignoring a message that JetStream did not deliver");
                    }
                }
            }
            if let Some(last) = batch.last().and_then(|m| m.info().ok()) {
                self.state.metrics.consumer_pending.set(last.pending as i64);
            }
            self.process(js, items).await?;
            if hole {
                warn!("delivery sequence skipped: re-reading unacknowledged messages");
                // Checkpoints before returning: acknowledging what follows is then safe.
                self.recover(js, &events_stream).await?;
            }
            // The last stream message: acknowledging it acknowledges every one before it.
            to_ack = last_delivery
                .map(|index| batch.swap_remove(index))
                .or(to_ack);
            let due = {
                let staged = self.staged();
                staged.events >= checkpoint_events
                    || staged
                        .since
                        .is_some_and(|since| since.elapsed() >= checkpoint_wait)
            };
            if hole || due {
                self.checkpoint(to_ack.take()).await?;
            }
        }
    }

    /// Writes what was applied since the last checkpoint to sled (one atomic batch, one
    /// flush), then acknowledges `ack` and, with it, every message delivered before it.
    async fn checkpoint(&self, ack: Option<jetstream::Message>) -> Result<(), IngestError> {
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
        let result = self.read_range(js, events_stream, &reader, from, to).await;
        if let Err(error) = events_stream.delete_consumer(&reader_name).await {
            debug!(%error, "recovery consumer not deleted; the server expires it");
        }
        result?;
        self.checkpoint(None).await?;
        Ok(delivered)
    }

    /// Reads the stream's messages `from..=to` one by one (`STREAM.MSG.GET`), skipping the
    /// sequences the stream no longer holds.
    async fn read_directly(
        &self,
        events_stream: &stream::Stream,
        from: u64,
        to: u64,
    ) -> Result<Vec<Incoming>, IngestError> {
        let mut items = Vec::new();
        for sequence in from..=to {
            match events_stream.get_raw_message(sequence).await {
                Ok(message) => items.push(Incoming {
                    subject: message.subject.to_string(),
                    payload: message.payload,
                    stream_sequence: message.sequence,
                    published_unix_seconds: message.time.unix_timestamp_nanos() as f64 / 1e9,
                }),
                Err(error)
                    if error.kind()
                        == async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound =>
                {
                    debug!(sequence, "not in the stream any more (deleted)");
                }
                Err(error) => return Err(js_error(error)),
            }
        }
        Ok(items)
    }

    /// Applies the stream's messages from the reader's start to `to`, every one of them:
    /// what the reader cannot describe is read again directly from the stream.
    async fn read_range(
        &self,
        js: &jetstream::Context,
        events_stream: &stream::Stream,
        reader: &consumer::PullConsumer,
        from: u64,
        to: u64,
    ) -> Result<(), IngestError> {
        // The next sequence of the range not yet applied.
        let mut next = from;
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
            let mut unreadable = false;
            while let Some(message) = messages.next().await {
                let message = message.map_err(js_error)?;
                let incoming = match Delivery::of(&message) {
                    Delivery::Stream(incoming, _) => incoming,
                    Delivery::Unreadable => {
                        unreadable = true;
                        continue;
                    }
                    Delivery::Foreign => continue,
                };
                if incoming.stream_sequence > to {
                    done = true;
                    break;
                }
                if unreadable && incoming.stream_sequence > next {
                    // What the reader could not describe lies before this message.
                    items.extend(
                        self.read_directly(events_stream, next, incoming.stream_sequence - 1)
                            .await?,
                    );
                    unreadable = false;
                }
                next = incoming.stream_sequence + 1;
                done = incoming.stream_sequence == to;
                items.push(incoming);
                if done {
                    break;
                }
            }
            if unreadable || (items.is_empty() && !done) {
                // Read the rest of the range message by message: what is still there is
                // applied, and a sequence the stream no longer has was deleted.
                items.extend(self.read_directly(events_stream, next, to).await?);
                done = true;
            }
            self.process(js, items).await?;
            if done {
                return Ok(());
            }
        }
    }

    /// The largest dead letter the server and the dead-letter stream take (headers included):
    /// the connection's `max_payload`, and the stream's `max_msg_size` when it has one.
    async fn dead_letter_max_bytes(&self, js: &jetstream::Context) -> usize {
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

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Decodes and applies a batch to the working set (blocking: it reads sled). `rejected` holds
/// the sequences dead-lettered since the last checkpoint.
fn prepare(
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
        if !seen_rejected.insert(incoming.stream_sequence)
            || rejected.contains(&incoming.stream_sequence)
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
