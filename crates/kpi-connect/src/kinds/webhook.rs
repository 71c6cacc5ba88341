//! `webhook`: events pushed to the engine, `POST /webhooks/{connector_id}` on its HTTP server.
//!
//! ## Signature
//!
//! Every request carries `X-Kpi-Signature: t=<unix seconds>,v1=<hex>`, where `<hex>` is the
//! HMAC-SHA256, keyed with the connector's `secret`, of `<t>.<raw body>`. A request without the
//! header, with a wrong signature, or with `t` further than `tolerance_s` from the engine's
//! clock (a replay) is refused with 401 before the body is read as JSON.
//!
//! ## Body
//!
//! Without `mapping`: one SPEC envelope, or an array of them; each is published as it is
//! (its `id` is the producer's). With `mapping`, any JSON (a form tool's, a shop's): `items`
//! points at the array of records (the whole body when absent), and each record gives one event
//! of type `event_type`: its id from `id` (prefixed with the connector id), its time from
//! `time` (RFC 3339 or Unix seconds), and `data` fields from JSON pointers.
//!
//! Replies: 202 `{"accepted": n}` once JetStream stored the events; 400 naming the bad field;
//! 401; 404 for an unknown connector; 503 while NATS is not connected.

use std::collections::{BTreeMap, HashMap};
use std::sync::OnceLock;

use async_nats::jetstream;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use kpi_config::Config;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::Sha256;

use crate::runner::envelope;
use crate::scheduler::ConnectorMetrics;
use crate::sink::{publish_all, Outgoing};
use crate::{ConnectError, Connector, RunContext, RunOutput};

/// The header with the signature.
pub const SIGNATURE_HEADER: &str = "x-kpi-signature";

/// `[connectors.params]` of `webhook`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookParams {
    /// The HMAC key shared with the sender (use `${ENV}`).
    pub secret: String,
    /// Largest accepted distance between the signature's time and the engine's clock.
    #[serde(default = "default_tolerance_s")]
    pub tolerance_s: u64,
    /// How to read a body that is not SPEC envelopes.
    #[serde(default)]
    pub mapping: Option<Mapping>,
}

fn default_tolerance_s() -> u64 {
    300
}

/// How a foreign JSON body becomes events.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mapping {
    /// The SPEC type of every event, e.g. `lead.created`.
    pub event_type: String,
    /// JSON pointer to the array of records; the whole body is one record when absent.
    #[serde(default)]
    pub items: Option<String>,
    /// JSON pointer (in a record) to its id.
    pub id: String,
    /// JSON pointer to its time.
    pub time: String,
    /// `data` field → JSON pointer in the record.
    #[serde(default)]
    pub fields: BTreeMap<String, String>,
}

pub struct Webhook {
    params: WebhookParams,
}

impl Connector for Webhook {
    type Params = WebhookParams;
    const KIND: &'static str = "webhook";
    const DESCRIPTION: &'static str =
        "Inbound webhook: POST /webhooks/{id}, HMAC-SHA256 signed, SPEC events or a mapped JSON body";
    const POLLS: bool = false;

    fn new(params: WebhookParams) -> Result<Webhook, ConnectError> {
        if params.secret.len() < 16 {
            return Err(ConnectError::Config {
                key: "secret".into(),
                message: "must be at least 16 characters".into(),
            });
        }
        if let Some(mapping) = &params.mapping {
            for (key, pointer) in [("mapping.id", &mapping.id), ("mapping.time", &mapping.time)]
                .into_iter()
                .chain(mapping.fields.values().map(|p| ("mapping.fields", p)))
                .chain(mapping.items.iter().map(|p| ("mapping.items", p)))
            {
                if !pointer.is_empty() && !pointer.starts_with('/') {
                    return Err(ConnectError::Config {
                        key: key.into(),
                        message: format!("`{pointer}` is not a JSON pointer (e.g. /lead/id)"),
                    });
                }
            }
        }
        Ok(Webhook { params })
    }

    async fn check(&self, context: &RunContext) -> Result<String, ConnectError> {
        Ok(format!(
            "receives POST /webhooks/{} ({})",
            context.connector_id,
            if self.params.mapping.is_some() {
                "mapped JSON"
            } else {
                "SPEC events"
            }
        ))
    }

    /// Nothing to poll: events arrive through the HTTP server.
    async fn run(&self, _context: &RunContext) -> Result<RunOutput, ConnectError> {
        Ok(RunOutput::default())
    }
}

struct Endpoint {
    tenant: String,
    secret: String,
    params: WebhookParams,
}

/// Why a webhook request was refused: an HTTP status and a message.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub message: String,
}

fn refuse(status: u16, message: impl Into<String>) -> Refusal {
    Refusal {
        status,
        message: message.into(),
    }
}

/// The webhook connectors of the configuration, ready to receive.
pub struct WebhookReceiver {
    endpoints: HashMap<String, Endpoint>,
    js: OnceLock<jetstream::Context>,
    metrics: Option<ConnectorMetrics>,
}

impl WebhookReceiver {
    pub fn from_config(
        config: &Config,
        env: &dyn Fn(&str) -> Option<String>,
        metrics: Option<ConnectorMetrics>,
    ) -> Result<WebhookReceiver, ConnectError> {
        let mut endpoints = HashMap::new();
        for (index, connector) in config.connectors.iter().enumerate() {
            if connector.kind != Webhook::KIND {
                continue;
            }
            let key = format!("connectors[{index}].params");
            let (params, _) = crate::secrets::expand(&connector.params, &key, env)?;
            let params: WebhookParams =
                serde_json::from_value(Value::Object(params)).map_err(|error| {
                    ConnectError::Config {
                        key,
                        message: error.to_string(),
                    }
                })?;
            endpoints.insert(
                connector.id.clone(),
                Endpoint {
                    tenant: connector.tenant.clone(),
                    secret: params.secret.clone(),
                    params,
                },
            );
        }
        Ok(WebhookReceiver {
            endpoints,
            js: OnceLock::new(),
            metrics,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// Where to publish, once NATS is connected.
    pub fn set_jetstream(&self, js: jetstream::Context) {
        let _ = self.js.set(js);
    }

    /// Verifies, reads and publishes one request; returns the number of events accepted.
    pub async fn receive(
        &self,
        connector_id: &str,
        signature: Option<&str>,
        body: &[u8],
    ) -> Result<usize, Refusal> {
        // The signature's time is the sender's wall clock: compare it with ours.
        let now = Utc::now();
        let endpoint = self
            .endpoints
            .get(connector_id)
            .ok_or_else(|| refuse(404, format!("no webhook connector `{connector_id}`")))?;
        let result = self
            .accept(connector_id, endpoint, signature, body, now)
            .await;
        if let Some(metrics) = &self.metrics {
            match &result {
                Ok(count) => {
                    metrics
                        .runs
                        .with_label_values(&[connector_id, "success"])
                        .inc();
                    metrics
                        .events
                        .with_label_values(&[connector_id])
                        .inc_by(*count as u64);
                    metrics
                        .last_success
                        .with_label_values(&[connector_id])
                        .set(now.timestamp_millis() as f64 / 1000.0);
                    metrics.up.with_label_values(&[connector_id]).set(1);
                }
                Err(_) => {
                    metrics
                        .runs
                        .with_label_values(&[connector_id, "error"])
                        .inc();
                }
            }
        }
        if let Err(refusal) = &result {
            tracing::warn!(connector = connector_id, status = refusal.status, reason = %refusal.message, "webhook refused");
        }
        result
    }

    async fn accept(
        &self,
        connector_id: &str,
        endpoint: &Endpoint,
        signature: Option<&str>,
        body: &[u8],
        now: DateTime<Utc>,
    ) -> Result<usize, Refusal> {
        verify(
            &endpoint.secret,
            endpoint.params.tolerance_s,
            signature,
            body,
            now,
        )?;
        let value: Value = serde_json::from_slice(body)
            .map_err(|error| refuse(400, format!("body is not JSON: {error}")))?;
        let events = match &endpoint.params.mapping {
            None => envelopes(value, &endpoint.tenant)?,
            Some(mapping) => mapped(value, mapping, connector_id, &endpoint.tenant)?,
        };
        let js = self
            .js
            .get()
            .ok_or_else(|| refuse(503, "not connected to NATS yet"))?;
        let count = events.len();
        publish_all(js, events, |_| {})
            .await
            .map_err(|error| refuse(503, error))?;
        Ok(count)
    }
}

/// Checks `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`.
pub fn verify(
    secret: &str,
    tolerance_s: u64,
    header: Option<&str>,
    body: &[u8],
    now: DateTime<Utc>,
) -> Result<(), Refusal> {
    let header =
        header.ok_or_else(|| refuse(401, "unsigned: the X-Kpi-Signature header is missing"))?;
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", value)) => timestamp = value.parse::<i64>().ok(),
            Some(("v1", value)) => signatures.push(value.to_string()),
            _ => {}
        }
    }
    let timestamp =
        timestamp.ok_or_else(|| refuse(401, "X-Kpi-Signature has no t=<unix seconds>"))?;
    let age = (now.timestamp() - timestamp).unsigned_abs();
    if age > tolerance_s {
        return Err(refuse(
            401,
            format!("stale signature: its time is {age} s from the engine's clock (tolerance {tolerance_s} s)"),
        ));
    }
    for signature in signatures {
        let Some(expected) = decode_hex(&signature) else {
            continue;
        };
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
            continue;
        };
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        if mac.verify_slice(&expected).is_ok() {
            return Ok(());
        }
    }
    Err(refuse(401, "signature mismatch"))
}

/// The signature header for `body` at `timestamp` (for senders and tests).
pub fn sign(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("t={timestamp},v1={hex}")
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

fn envelopes(value: Value, tenant: &str) -> Result<Vec<Outgoing>, Refusal> {
    let (items, many) = match value {
        Value::Array(items) => (items, true),
        other => (vec![other], false),
    };
    items
        .into_iter()
        .enumerate()
        .map(|(index, item)| {
            let at = |field: &str| {
                if many {
                    format!("[{index}].{field}")
                } else {
                    field.to_string()
                }
            };
            let id = item
                .get("id")
                .and_then(Value::as_str)
                .filter(|id| !id.is_empty())
                .ok_or_else(|| refuse(400, format!("{}: missing", at("id"))))?
                .to_string();
            let event_type = item
                .get("type")
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty() && !t.contains(['*', '>', ' ']))
                .ok_or_else(|| refuse(400, format!("{}: missing or not a type", at("type"))))?
                .to_string();
            if let Some(other) = item.get("tenant").and_then(Value::as_str) {
                if other != tenant {
                    return Err(refuse(
                        400,
                        format!("{}: `{other}` is not this webhook's tenant", at("tenant")),
                    ));
                }
            }
            Ok(Outgoing {
                subject: format!("kpi.events.{tenant}.{event_type}"),
                id: Some(id),
                payload: bytes::Bytes::from(item.to_string()),
            })
        })
        .collect()
}

fn mapped(
    value: Value,
    mapping: &Mapping,
    connector_id: &str,
    tenant: &str,
) -> Result<Vec<Outgoing>, Refusal> {
    let items = match &mapping.items {
        None => vec![value],
        Some(pointer) => value
            .pointer(pointer)
            .and_then(Value::as_array)
            .cloned()
            .ok_or_else(|| refuse(400, format!("{pointer}: not an array")))?,
    };
    items
        .iter()
        .map(|item| {
            let scalar = |pointer: &str| -> Option<String> {
                match item.pointer(pointer)? {
                    Value::String(text) if !text.is_empty() => Some(text.clone()),
                    Value::Number(number) => Some(number.to_string()),
                    Value::Bool(flag) => Some(flag.to_string()),
                    _ => None,
                }
            };
            let id = scalar(&mapping.id)
                .ok_or_else(|| refuse(400, format!("{}: missing", mapping.id)))?;
            let time = match item.pointer(&mapping.time) {
                Some(Value::String(text)) => DateTime::parse_from_rfc3339(text)
                    .map(|time| time.with_timezone(&Utc))
                    .ok(),
                Some(Value::Number(number)) => number
                    .as_i64()
                    .and_then(|seconds| DateTime::from_timestamp(seconds, 0)),
                _ => None,
            }
            .ok_or_else(|| refuse(400, format!("{}: missing or not a time", mapping.time)))?;
            let mut data = json!({});
            for (field, pointer) in &mapping.fields {
                if let Some(value) = item.pointer(pointer) {
                    if !value.is_null() {
                        data[field] = value.clone();
                    }
                }
            }
            let event_id = format!("{connector_id}-{id}");
            Ok(envelope(
                &event_id,
                &format!("kpi-webhook/{connector_id}"),
                tenant,
                &mapping.event_type,
                time,
                data,
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_body_verifies_and_a_changed_one_does_not() {
        let now = Utc::now();
        let header = sign("0123456789abcdef", now.timestamp(), b"{\"a\":1}");
        assert_eq!(
            verify("0123456789abcdef", 300, Some(&header), b"{\"a\":1}", now),
            Ok(())
        );
        assert_eq!(
            verify("0123456789abcdef", 300, Some(&header), b"{\"a\":2}", now)
                .map_err(|r| r.message),
            Err("signature mismatch".to_string())
        );
        let old = sign("0123456789abcdef", now.timestamp() - 301, b"{}");
        let stale = verify("0123456789abcdef", 300, Some(&old), b"{}", now).expect_err("stale");
        assert!(
            stale.message.starts_with("stale signature"),
            "{}",
            stale.message
        );
        assert_eq!(
            verify("0123456789abcdef", 300, None, b"{}", now)
                .expect_err("unsigned")
                .status,
            401
        );
    }
}
