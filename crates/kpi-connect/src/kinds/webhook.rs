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
//! Every event is checked as the engine will check it (the same decoder, the tenant's exchange
//! rates) before anything is published: a request with one bad event publishes nothing and is
//! refused with 400 naming the item and the field, so a sender's mistake is never retried as
//! if the engine were down. Amounts keep every digit the sender wrote (the body is read as raw
//! JSON, never through binary floats).
//!
//! Replies: 202 `{"accepted": n}` once JetStream stored the events; 400 naming the bad field;
//! 401; 404 for an unknown connector; 503 while NATS is not connected or does not store them.

use std::collections::{BTreeMap, HashMap};
use std::sync::OnceLock;

use async_nats::jetstream;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use kpi_config::Config;
use kpi_model::event::EVENTS_SUBJECT_PREFIX;
use kpi_model::{decode_event, Clock, DecodeLimits, Event, EventData, TenantSettings, Tenants};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;
use sha2::Sha256;

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
            if kpi_model::EventType::parse(&mapping.event_type).is_none() {
                return Err(ConnectError::Config {
                    key: "mapping.event_type".into(),
                    message: format!(
                        "`{}` is not an event type (lead.created, lead.qualified, lead.stage_changed, deal.won, deal.lost, spend.reported)",
                        mapping.event_type
                    ),
                });
            }
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
    tenants: Tenants,
    limits: DecodeLimits,
    /// Dates and the future-time check of the events (signatures use the wall clock).
    clock: Clock,
    js: OnceLock<jetstream::Context>,
    metrics: Option<ConnectorMetrics>,
}

impl WebhookReceiver {
    pub fn from_config(
        config: &Config,
        env: &dyn Fn(&str) -> Option<String>,
        metrics: Option<ConnectorMetrics>,
        clock: Clock,
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
            tenants: config.tenants(),
            limits: config.decode_limits(),
            clock,
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
        let body: &RawValue = serde_json::from_slice(body)
            .map_err(|error| refuse(400, format!("body is not JSON: {error}")))?;
        let settings = self.tenants.get(&endpoint.tenant);
        let checks = Checks {
            tenant: &endpoint.tenant,
            settings,
            limits: &self.limits,
            now: self.clock.now(),
        };
        let events = match &endpoint.params.mapping {
            None => envelopes(body, &checks)?,
            Some(mapping) => mapped(body, mapping, connector_id, &checks)?,
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
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// What every event of a request is checked against: the engine's own rules.
struct Checks<'a> {
    tenant: &'a str,
    settings: &'a TenantSettings,
    limits: &'a DecodeLimits,
    now: DateTime<Utc>,
}

impl Checks<'_> {
    /// Decodes `envelope` as the engine will (and checks its currency has a rate): a refusal
    /// names the field, prefixed by `at`.
    fn event(&self, at: &str, event_type: &str, envelope: &[u8]) -> Result<Event, Refusal> {
        let subject = format!("{EVENTS_SUBJECT_PREFIX}{}.{event_type}", self.tenant);
        let event = decode_event(&subject, envelope, self.now, self.limits)
            .map_err(|rejection| refuse(400, format!("{at}{rejection}")))?;
        if let EventData::DealWon {
            amount, currency, ..
        }
        | EventData::SpendReported {
            amount, currency, ..
        } = &event.data
        {
            self.settings
                .to_reporting(*amount, currency)
                .map_err(|rejection| refuse(400, format!("{at}{rejection}")))?;
        }
        Ok(event)
    }
}

/// The items of a body: its elements if it is an array, else the body itself.
fn items_of(body: &RawValue) -> Result<(Vec<&RawValue>, bool), Refusal> {
    if body.get().trim_start().starts_with('[') {
        let items: Vec<&RawValue> = serde_json::from_str(body.get())
            .map_err(|error| refuse(400, format!("body is not JSON: {error}")))?;
        Ok((items, true))
    } else {
        Ok((vec![body], false))
    }
}

#[derive(Deserialize)]
struct TypeOnly {
    #[serde(rename = "type", default)]
    event_type: Option<Value>,
}

fn envelopes(body: &RawValue, checks: &Checks<'_>) -> Result<Vec<Outgoing>, Refusal> {
    let (items, many) = items_of(body)?;
    items
        .into_iter()
        .enumerate()
        .map(|(index, item)| {
            let at = if many {
                format!("[{index}]: ")
            } else {
                String::new()
            };
            let event_type = match serde_json::from_str::<TypeOnly>(item.get()) {
                Ok(TypeOnly {
                    event_type: Some(Value::String(event_type)),
                }) => event_type,
                Ok(_) => return Err(refuse(400, format!("{at}missing_field: type: required"))),
                Err(error) => return Err(refuse(400, format!("{at}invalid_json: {error}"))),
            };
            let event = checks.event(&at, &event_type, item.get().as_bytes())?;
            Ok(Outgoing::from_event(&event))
        })
        .collect()
}

/// The value at a JSON pointer (RFC 6901) inside `raw`, still as raw JSON text (so numbers
/// keep every digit).
fn raw_pointer<'a>(raw: &'a RawValue, pointer: &str) -> Option<&'a RawValue> {
    if pointer.is_empty() {
        return Some(raw);
    }
    let mut current = raw;
    for token in pointer.strip_prefix('/')?.split('/') {
        let token = token.replace("~1", "/").replace("~0", "~");
        let text: &'a str = current.get();
        current = match text.trim_start().as_bytes().first() {
            Some(b'{') => {
                let object: HashMap<String, &'a RawValue> = serde_json::from_str(text).ok()?;
                *object.get(&token)?
            }
            Some(b'[') => {
                let array: Vec<&'a RawValue> = serde_json::from_str(text).ok()?;
                *array.get(token.parse::<usize>().ok()?)?
            }
            _ => return None,
        };
    }
    Some(current)
}

fn mapped(
    body: &RawValue,
    mapping: &Mapping,
    connector_id: &str,
    checks: &Checks<'_>,
) -> Result<Vec<Outgoing>, Refusal> {
    let items = match &mapping.items {
        None => vec![body],
        Some(pointer) => raw_pointer(body, pointer)
            .filter(|items| items.get().trim_start().starts_with('['))
            .and_then(|items| serde_json::from_str::<Vec<&RawValue>>(items.get()).ok())
            .ok_or_else(|| refuse(400, format!("{pointer}: not an array")))?,
    };
    let json_text = |text: &str| serde_json::to_string(text).unwrap_or_default();
    items
        .iter()
        .enumerate()
        .map(|(index, item)| {
            let at = format!("[{index}]: ");
            let value = |pointer: &str| -> Option<Value> {
                raw_pointer(item, pointer).and_then(|raw| serde_json::from_str(raw.get()).ok())
            };
            let id = match value(&mapping.id) {
                Some(Value::String(text)) if !text.is_empty() => text,
                Some(Value::Number(_)) | Some(Value::Bool(_)) => raw_pointer(item, &mapping.id)
                    .map(|raw| raw.get().trim().to_string())
                    .unwrap_or_default(),
                _ => return Err(refuse(400, format!("{at}{}: missing", mapping.id))),
            };
            let time = match value(&mapping.time) {
                Some(Value::String(text)) => DateTime::parse_from_rfc3339(&text)
                    .map(|time| time.with_timezone(&Utc))
                    .ok(),
                Some(Value::Number(number)) => number
                    .as_i64()
                    .and_then(|seconds| DateTime::from_timestamp(seconds, 0)),
                _ => None,
            }
            .ok_or_else(|| {
                refuse(
                    400,
                    format!("{at}{}: missing or not a time", mapping.time),
                )
            })?;
            let mut fields = Vec::new();
            for (field, pointer) in &mapping.fields {
                if let Some(raw) = raw_pointer(item, pointer) {
                    if raw.get().trim() != "null" {
                        fields.push(format!("{}:{}", json_text(field), raw.get()));
                    }
                }
            }
            let envelope = format!(
                r#"{{"specversion":"1.0","id":{},"source":{},"type":{},"time":{},"tenant":{},"data":{{{}}}}}"#,
                json_text(&format!("{connector_id}-{id}")),
                json_text(&format!("kpi-webhook/{connector_id}")),
                json_text(&mapping.event_type),
                json_text(&time.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)),
                json_text(checks.tenant),
                fields.join(",")
            );
            let event = checks
                .event(&at, &mapping.event_type, envelope.as_bytes())
                .map_err(|mut refusal| {
                    // Name where the faulty field came from in the sender's body.
                    if let Some((field, pointer)) = mapping.fields.iter().find(|(field, _)| {
                        refusal.message.contains(&format!("data.{field}:"))
                    }) {
                        refusal.message.push_str(&format!(
                            " (mapping.fields.{field} = {pointer})"
                        ));
                    }
                    refusal
                })?;
            Ok(Outgoing::from_event(&event))
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
