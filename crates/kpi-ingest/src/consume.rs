//! The single engine's consumer loop: batches from the durable consumer, checkpoints, and
//! holes in the delivery sequence.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::apply::Delivery;
use crate::streams::ensure_streams;
use crate::{js_error, EngineState, Ingest, IngestError};
use async_nats::jetstream::{self, consumer, stream};
use futures_util::StreamExt;
use tokio::sync::watch;
use tracing::{debug, info, warn};

impl Ingest {
    pub(crate) async fn consume(
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
}

/// Sleeps until `deadline`, or forever without one.
pub(crate) async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Refreshes the consumer's pending counts every few seconds (also while idle).
pub(crate) async fn poll_consumer_info(
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

pub(crate) struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
