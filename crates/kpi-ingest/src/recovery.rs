//! Re-reading delivered but unacknowledged messages straight from the stream.

use std::time::Duration;

use crate::apply::{Delivery, Incoming};
use crate::{js_error, Ingest, IngestError};
use async_nats::jetstream::{self, consumer, stream};
use chrono::Utc;
use futures_util::StreamExt;
use tracing::{debug, info};

impl Ingest {
    /// Re-reads from the stream the messages delivered to the consumer but not acknowledged,
    /// and applies them (idempotently), so that acknowledging later messages loses nothing.
    /// Returns the consumer's delivered sequence at the time of the re-read.
    pub(crate) async fn recover(
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
    pub(crate) async fn read_directly(
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
                    partition: None,
                    migrated_from: None,
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
    pub(crate) async fn read_range(
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
}
