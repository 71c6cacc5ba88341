//! Publishing events to JetStream, each with `Nats-Msg-Id` set to its id, waiting until the
//! stream stored them all.

use std::collections::VecDeque;

use async_nats::jetstream;
use bytes::Bytes;

/// An event ready to publish.
#[derive(Clone, Debug)]
pub struct Outgoing {
    pub subject: String,
    pub id: Option<String>,
    pub payload: Bytes,
}

impl Outgoing {
    /// The event as SPEC publishes it: its subject, its encoding, `Nats-Msg-Id` = its id.
    pub fn from_event(event: &kpi_model::Event) -> Outgoing {
        Outgoing {
            subject: event.subject(),
            id: Some(event.id.clone()),
            payload: Bytes::from(event.encode()),
        }
    }
}

/// Publishes `events`, keeping a window of a few thousand acknowledgements outstanding;
/// `on_ack` learns, for each event in order, whether JetStream found it a duplicate.
pub async fn publish_all(
    js: &jetstream::Context,
    events: impl IntoIterator<Item = Outgoing>,
    mut on_ack: impl FnMut(bool),
) -> Result<(), String> {
    const WINDOW: usize = 4096;
    let mut pending = VecDeque::with_capacity(WINDOW);
    for event in events {
        let mut headers = async_nats::HeaderMap::new();
        if let Some(id) = &event.id {
            headers.insert("Nats-Msg-Id", id.as_str());
        }
        pending.push_back(
            js.publish_with_headers(event.subject, headers, event.payload)
                .await
                .map_err(|error| error.to_string())?,
        );
        if pending.len() >= WINDOW {
            for ack in pending.drain(..WINDOW / 2) {
                on_ack(stored(ack.await)?);
            }
        }
    }
    for ack in pending {
        on_ack(stored(ack.await)?);
    }
    Ok(())
}

fn stored(
    ack: Result<jetstream::publish::PublishAck, jetstream::context::PublishError>,
) -> Result<bool, String> {
    ack.map(|ack| ack.duplicate)
        .map_err(|error| format!("JetStream did not store an event: {error}"))
}
