//! Events in (SPEC section 1): subjects, the CloudEvents envelope, typed payloads, and the
//! reasons an event is rejected.
//!
//! Decoding reads the envelope with every field kept as raw JSON, then checks each field on its
//! own, so that a rejection always names the field at fault (`data.amount: ...`). This is also
//! about twice as fast as a `serde(flatten)` tagged enum.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::money::{parse_amount_json, AmountError};

/// Subject prefix of incoming events: `kpi.events.<tenant>.<type>`.
pub const EVENTS_SUBJECT_PREFIX: &str = "kpi.events.";
/// Subject prefix of dead letters: `kpi.rejected.<tenant>`.
pub const REJECTED_SUBJECT_PREFIX: &str = "kpi.rejected.";
/// Tenant used for a dead letter whose subject names no valid tenant.
pub const INVALID_TENANT: &str = "_invalid";
/// The reserved channel name of blended figures.
pub const CHANNEL_ALL: &str = "all";
/// The channel of leads and deals that name none.
pub const CHANNEL_UNATTRIBUTED: &str = "unattributed";
/// Longest accepted identifier (ids, channel, campaign, stage...), in bytes.
pub const MAX_IDENTIFIER_BYTES: usize = 256;

/// An instant with nanosecond precision, as nanoseconds since the Unix epoch (UTC).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub fn from_datetime(time: DateTime<Utc>) -> Option<Timestamp> {
        time.timestamp_nanos_opt().map(Timestamp)
    }

    pub fn to_datetime(self) -> DateTime<Utc> {
        DateTime::from_timestamp_nanos(self.0)
    }
}

/// The last-writer-wins order of events on one entity attribute: the latest `time` wins, ties
/// broken by the greater `id`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Version {
    pub time: Timestamp,
    pub id: String,
}

/// An upstream name made into a valid identifier: control characters (a tab, a line break)
/// become spaces, surrounding spaces go, and it is cut to [`MAX_IDENTIFIER_BYTES`] on a
/// character boundary. Connectors pass campaign and stage names through it.
pub fn clean_identifier(name: &str) -> String {
    let replaced: String = name
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let mut cleaned = replaced.trim().to_string();
    if cleaned.len() > MAX_IDENTIFIER_BYTES {
        let mut end = MAX_IDENTIFIER_BYTES;
        while !cleaned.is_char_boundary(end) {
            end -= 1;
        }
        cleaned.truncate(end);
    }
    cleaned
}

/// Is `tenant` a valid tenant name (`[a-z0-9_-]{1,64}`)?
pub fn is_valid_tenant(tenant: &str) -> bool {
    (1..=64).contains(&tenant.len())
        && tenant
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// The tenant named by an event subject, if the subject has the right shape.
pub fn tenant_of_subject(subject: &str) -> Option<&str> {
    let rest = subject.strip_prefix(EVENTS_SUBJECT_PREFIX)?;
    let (tenant, _type) = rest.split_once('.')?;
    is_valid_tenant(tenant).then_some(tenant)
}

/// The subject an event of `tenant` and `event_type` is published to.
pub fn event_subject(tenant: &str, event_type: EventType) -> String {
    format!("{EVENTS_SUBJECT_PREFIX}{tenant}.{}", event_type.as_str())
}

/// The six event types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum EventType {
    LeadCreated,
    LeadQualified,
    LeadStageChanged,
    DealWon,
    DealLost,
    SpendReported,
}

impl EventType {
    pub const ALL: [EventType; 6] = [
        EventType::LeadCreated,
        EventType::LeadQualified,
        EventType::LeadStageChanged,
        EventType::DealWon,
        EventType::DealLost,
        EventType::SpendReported,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::LeadCreated => "lead.created",
            EventType::LeadQualified => "lead.qualified",
            EventType::LeadStageChanged => "lead.stage_changed",
            EventType::DealWon => "deal.won",
            EventType::DealLost => "deal.lost",
            EventType::SpendReported => "spend.reported",
        }
    }

    pub fn parse(text: &str) -> Option<EventType> {
        EventType::ALL.into_iter().find(|t| t.as_str() == text)
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Category of a spend line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum SpendCategory {
    Media,
    Tools,
    Prospecting,
    Other,
}

impl SpendCategory {
    pub fn as_str(self) -> &'static str {
        match self {
            SpendCategory::Media => "media",
            SpendCategory::Tools => "tools",
            SpendCategory::Prospecting => "prospecting",
            SpendCategory::Other => "other",
        }
    }
}

/// A valid event: envelope and typed payload.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub tenant: String,
    pub id: String,
    pub source: String,
    pub time: Timestamp,
    pub data: EventData,
}

impl Event {
    pub fn event_type(&self) -> EventType {
        self.data.event_type()
    }

    /// An event at `time`; `None` when the time is outside what an event can carry
    /// (1677..2262, nanoseconds since 1970 in 64 bits).
    pub fn new(
        tenant: &str,
        id: &str,
        source: &str,
        time: DateTime<Utc>,
        data: EventData,
    ) -> Option<Event> {
        Some(Event {
            tenant: tenant.to_string(),
            id: id.to_string(),
            source: source.to_string(),
            time: Timestamp::from_datetime(time)?,
            data,
        })
    }

    pub fn version(&self) -> Version {
        Version {
            time: self.time,
            id: self.id.clone(),
        }
    }
}

/// The typed `data` of each event type. Empty optional strings are read as absent.
#[derive(Clone, Debug, PartialEq)]
pub enum EventData {
    LeadCreated {
        lead_id: String,
        channel: Option<String>,
        campaign: Option<String>,
        qualified: Option<bool>,
        customer_id: Option<String>,
    },
    LeadQualified {
        lead_id: String,
        qualified: bool,
    },
    LeadStageChanged {
        lead_id: String,
        stage: String,
    },
    DealWon {
        deal_id: String,
        customer_id: String,
        amount: Decimal,
        currency: String,
        lead_id: Option<String>,
        channel: Option<String>,
        campaign: Option<String>,
    },
    DealLost {
        deal_id: String,
        lead_id: Option<String>,
    },
    SpendReported {
        date: NaiveDate,
        amount: Decimal,
        currency: String,
        channel: Option<String>,
        campaign: Option<String>,
        category: SpendCategory,
        source: Option<String>,
        account: Option<String>,
    },
}

/// Why an event was rejected: the low-cardinality `reason` label of
/// `kpi_events_rejected_total`. The detail, naming the field, travels in the
/// `Kpi-Reject-Reason` header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum RejectReason {
    InvalidJson,
    InvalidSubject,
    MissingField,
    InvalidField,
    UnknownType,
    TypeMismatch,
    NegativeAmount,
    UnknownCurrency,
    TenantMismatch,
    FutureTime,
    TooLarge,
}

impl RejectReason {
    pub const ALL: [RejectReason; 11] = [
        RejectReason::InvalidJson,
        RejectReason::InvalidSubject,
        RejectReason::MissingField,
        RejectReason::InvalidField,
        RejectReason::UnknownType,
        RejectReason::TypeMismatch,
        RejectReason::NegativeAmount,
        RejectReason::UnknownCurrency,
        RejectReason::TenantMismatch,
        RejectReason::FutureTime,
        RejectReason::TooLarge,
    ];

    pub fn label(self) -> &'static str {
        match self {
            RejectReason::InvalidJson => "invalid_json",
            RejectReason::InvalidSubject => "invalid_subject",
            RejectReason::MissingField => "missing_field",
            RejectReason::InvalidField => "invalid_field",
            RejectReason::UnknownType => "unknown_type",
            RejectReason::TypeMismatch => "type_mismatch",
            RejectReason::NegativeAmount => "negative_amount",
            RejectReason::UnknownCurrency => "unknown_currency",
            RejectReason::TenantMismatch => "tenant_mismatch",
            RejectReason::FutureTime => "future_time",
            RejectReason::TooLarge => "too_large",
        }
    }

    pub fn from_label(label: &str) -> Option<RejectReason> {
        RejectReason::ALL.into_iter().find(|r| r.label() == label)
    }
}

/// A rejected event's reason and a human explanation naming the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}: {detail}", reason.label())]
pub struct Rejection {
    pub reason: RejectReason,
    pub detail: String,
}

impl Rejection {
    pub fn new(reason: RejectReason, detail: impl Into<String>) -> Rejection {
        Rejection {
            reason,
            detail: detail.into(),
        }
    }

    fn missing(field: &str) -> Rejection {
        Rejection::new(RejectReason::MissingField, format!("{field}: required"))
    }

    fn invalid(field: &str, what: &str) -> Rejection {
        Rejection::new(RejectReason::InvalidField, format!("{field}: {what}"))
    }
}

/// Limits applied while decoding.
#[derive(Clone, Debug)]
pub struct DecodeLimits {
    pub max_event_bytes: usize,
    /// How far in the future an event time may be (SPEC: 24 h).
    pub max_future: Duration,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_event_bytes: 64 * 1024,
            max_future: Duration::from_secs(24 * 3600),
        }
    }
}

#[derive(Deserialize)]
struct RawEnvelope<'a> {
    #[serde(borrow)]
    specversion: Option<&'a RawValue>,
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    source: Option<&'a RawValue>,
    #[serde(borrow, rename = "type")]
    event_type: Option<&'a RawValue>,
    #[serde(borrow)]
    time: Option<&'a RawValue>,
    #[serde(borrow)]
    tenant: Option<&'a RawValue>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize, Default)]
struct RawData<'a> {
    #[serde(borrow)]
    lead_id: Option<&'a RawValue>,
    #[serde(borrow)]
    deal_id: Option<&'a RawValue>,
    #[serde(borrow)]
    customer_id: Option<&'a RawValue>,
    #[serde(borrow)]
    channel: Option<&'a RawValue>,
    #[serde(borrow)]
    campaign: Option<&'a RawValue>,
    #[serde(borrow)]
    qualified: Option<&'a RawValue>,
    #[serde(borrow)]
    stage: Option<&'a RawValue>,
    #[serde(borrow)]
    amount: Option<&'a RawValue>,
    #[serde(borrow)]
    currency: Option<&'a RawValue>,
    #[serde(borrow)]
    date: Option<&'a RawValue>,
    #[serde(borrow)]
    category: Option<&'a RawValue>,
    #[serde(borrow)]
    source: Option<&'a RawValue>,
    #[serde(borrow)]
    account: Option<&'a RawValue>,
}

/// How a value from the message is quoted in a rejection detail: control characters escaped
/// (`\r`, `\n`, `\u{7}`), at most 64 characters. Details travel in a NATS header
/// (`Kpi-Reject-Reason`), where a CR or LF would break the message, and in logs.
pub fn shown(value: &str) -> String {
    const LONGEST: usize = 64;
    let mut out = String::new();
    for (index, character) in value.chars().enumerate() {
        if index == LONGEST {
            out.push('…');
            break;
        }
        if character.is_control() {
            out.extend(character.escape_debug());
        } else {
            out.push(character);
        }
    }
    out
}

fn is_null(raw: Option<&RawValue>) -> bool {
    raw.is_none_or(|value| value.get().trim() == "null")
}

/// A JSON string field; `None` when absent, null or empty.
fn optional_string(raw: Option<&RawValue>, field: &str) -> Result<Option<String>, Rejection> {
    if is_null(raw) {
        return Ok(None);
    }
    let text = raw.map(RawValue::get).unwrap_or_default();
    let value: String = if !text.contains('\\') && text.len() >= 2 && text.starts_with('"') {
        text[1..text.len() - 1].to_string()
    } else {
        serde_json::from_str(text).map_err(|_| Rejection::invalid(field, "expected a string"))?
    };
    if value.len() > MAX_IDENTIFIER_BYTES {
        return Err(Rejection::invalid(
            field,
            &format!("longer than {MAX_IDENTIFIER_BYTES} bytes"),
        ));
    }
    // Identifiers end up in subjects, headers, metric labels and terminal tables, where a line
    // break or a tab is never meant.
    if let Some(control) = value.chars().find(|c| c.is_control()) {
        return Err(Rejection::invalid(
            field,
            &format!(
                "`{}` contains the control character U+{:04X}",
                shown(&value),
                u32::from(control)
            ),
        ));
    }
    Ok((!value.is_empty()).then_some(value))
}

fn required_string(raw: Option<&RawValue>, field: &str) -> Result<String, Rejection> {
    optional_string(raw, field)?.ok_or_else(|| Rejection::missing(field))
}

fn optional_bool(raw: Option<&RawValue>, field: &str) -> Result<Option<bool>, Rejection> {
    if is_null(raw) {
        return Ok(None);
    }
    match raw.map(|value| value.get().trim()) {
        Some("true") => Ok(Some(true)),
        Some("false") => Ok(Some(false)),
        _ => Err(Rejection::invalid(field, "expected true or false")),
    }
}

fn optional_channel(raw: Option<&RawValue>, field: &str) -> Result<Option<String>, Rejection> {
    let channel = optional_string(raw, field)?;
    if channel.as_deref() == Some(CHANNEL_ALL) {
        return Err(Rejection::invalid(
            field,
            "the channel name `all` is reserved for blended figures",
        ));
    }
    Ok(channel)
}

fn required_amount(raw: Option<&RawValue>, field: &str) -> Result<Decimal, Rejection> {
    if is_null(raw) {
        return Err(Rejection::missing(field));
    }
    let text = raw.map(RawValue::get).unwrap_or_default();
    parse_amount_json(text).map_err(|error| match error {
        AmountError::Negative => Rejection::new(
            RejectReason::NegativeAmount,
            format!(
                "{field}: {} is negative",
                shown(text.trim().trim_matches('"'))
            ),
        ),
        AmountError::NotADecimal => Rejection::invalid(field, &error.to_string()),
        AmountError::TooPrecise | AmountError::TooLarge => Rejection::invalid(
            field,
            &format!("{}: {error}", shown(text.trim().trim_matches('"'))),
        ),
    })
}

fn required_currency(raw: Option<&RawValue>, field: &str) -> Result<String, Rejection> {
    let currency = required_string(raw, field)?;
    if currency.len() == 3 && currency.bytes().all(|b| b.is_ascii_uppercase()) {
        Ok(currency)
    } else {
        Err(Rejection::invalid(
            field,
            "expected an ISO 4217 code such as EUR",
        ))
    }
}

fn parse_time(raw: Option<&RawValue>) -> Result<DateTime<Utc>, Rejection> {
    let text = required_string(raw, "time")?;
    DateTime::parse_from_rfc3339(&text)
        .map(|time| time.with_timezone(&Utc))
        .map_err(|_| {
            Rejection::invalid(
                "time",
                &format!("`{}` is not an RFC 3339 time with an offset", shown(&text)),
            )
        })
}

/// Decodes and validates one message of `subject` against SPEC section 1 (everything but the
/// currency rate, which needs the tenant's settings).
pub fn decode_event(
    subject: &str,
    payload: &[u8],
    now: DateTime<Utc>,
    limits: &DecodeLimits,
) -> Result<Event, Rejection> {
    let (subject_tenant, subject_type) = subject
        .strip_prefix(EVENTS_SUBJECT_PREFIX)
        .and_then(|rest| rest.split_once('.'))
        .filter(|(tenant, _)| is_valid_tenant(tenant))
        .ok_or_else(|| {
            Rejection::new(
                RejectReason::InvalidSubject,
                format!(
                    "subject `{}` is not kpi.events.<tenant>.<type>",
                    shown(subject)
                ),
            )
        })?;
    if payload.len() > limits.max_event_bytes {
        return Err(Rejection::new(
            RejectReason::TooLarge,
            format!(
                "payload of {} bytes is over the maximum of {} bytes",
                payload.len(),
                limits.max_event_bytes
            ),
        ));
    }
    let envelope: RawEnvelope = serde_json::from_slice(payload).map_err(|error| {
        Rejection::new(
            RejectReason::InvalidJson,
            format!("not a JSON object: {error}"),
        )
    })?;

    match optional_string(envelope.specversion, "specversion")?.as_deref() {
        Some("1.0") => {}
        Some(other) => {
            return Err(Rejection::invalid(
                "specversion",
                &format!("`{}` is not 1.0", shown(other)),
            ))
        }
        None => return Err(Rejection::missing("specversion")),
    }
    let id = required_string(envelope.id, "id")?;
    let source = required_string(envelope.source, "source")?;
    let type_text = required_string(envelope.event_type, "type")?;
    let event_type = EventType::parse(&type_text).ok_or_else(|| {
        Rejection::new(
            RejectReason::UnknownType,
            format!("type: `{}` is not a known event type", shown(&type_text)),
        )
    })?;
    if subject_type != type_text {
        return Err(Rejection::new(
            RejectReason::TypeMismatch,
            format!(
                "type: `{}` does not match the subject's type `{}`",
                shown(&type_text),
                shown(subject_type)
            ),
        ));
    }
    let time = parse_time(envelope.time)?;
    if let Some(tenant) = optional_string(envelope.tenant, "tenant")? {
        if tenant != subject_tenant {
            return Err(Rejection::new(
                RejectReason::TenantMismatch,
                format!(
                    "tenant: `{}` does not match the subject's tenant `{subject_tenant}`",
                    shown(&tenant)
                ),
            ));
        }
    }
    if time > now + limits.max_future {
        return Err(Rejection::new(
            RejectReason::FutureTime,
            format!(
                "time: {} is more than {} s in the future",
                time.to_rfc3339(),
                limits.max_future.as_secs()
            ),
        ));
    }
    let time = Timestamp::from_datetime(time)
        .ok_or_else(|| Rejection::invalid("time", "out of the supported range (1677..2262)"))?;
    let data_raw = envelope.data.ok_or_else(|| Rejection::missing("data"))?;
    if !data_raw.get().trim_start().starts_with('{') {
        return Err(Rejection::invalid("data", "expected a JSON object"));
    }
    let data: RawData = serde_json::from_str(data_raw.get())
        .map_err(|error| Rejection::new(RejectReason::InvalidJson, format!("data: {error}")))?;
    let data = decode_data(event_type, &data)?;
    Ok(Event {
        tenant: subject_tenant.to_string(),
        id,
        source,
        time,
        data,
    })
}

fn decode_data(event_type: EventType, data: &RawData) -> Result<EventData, Rejection> {
    Ok(match event_type {
        EventType::LeadCreated => EventData::LeadCreated {
            lead_id: required_string(data.lead_id, "data.lead_id")?,
            channel: optional_channel(data.channel, "data.channel")?,
            campaign: optional_string(data.campaign, "data.campaign")?,
            qualified: optional_bool(data.qualified, "data.qualified")?,
            customer_id: optional_string(data.customer_id, "data.customer_id")?,
        },
        EventType::LeadQualified => EventData::LeadQualified {
            lead_id: required_string(data.lead_id, "data.lead_id")?,
            qualified: optional_bool(data.qualified, "data.qualified")?.unwrap_or(true),
        },
        EventType::LeadStageChanged => EventData::LeadStageChanged {
            lead_id: required_string(data.lead_id, "data.lead_id")?,
            stage: required_string(data.stage, "data.stage")?,
        },
        EventType::DealWon => EventData::DealWon {
            deal_id: required_string(data.deal_id, "data.deal_id")?,
            customer_id: required_string(data.customer_id, "data.customer_id")?,
            amount: required_amount(data.amount, "data.amount")?,
            currency: required_currency(data.currency, "data.currency")?,
            lead_id: optional_string(data.lead_id, "data.lead_id")?,
            channel: optional_channel(data.channel, "data.channel")?,
            campaign: optional_string(data.campaign, "data.campaign")?,
        },
        EventType::DealLost => EventData::DealLost {
            deal_id: required_string(data.deal_id, "data.deal_id")?,
            lead_id: optional_string(data.lead_id, "data.lead_id")?,
        },
        EventType::SpendReported => {
            let date_text = required_string(data.date, "data.date")?;
            let date = NaiveDate::parse_from_str(&date_text, "%Y-%m-%d")
                .ok()
                .filter(|_| date_text.len() == 10)
                .ok_or_else(|| {
                    Rejection::invalid(
                        "data.date",
                        &format!("`{}` is not a date YYYY-MM-DD", shown(&date_text)),
                    )
                })?;
            let category = match optional_string(data.category, "data.category")?.as_deref() {
                None | Some("media") => SpendCategory::Media,
                Some("tools") => SpendCategory::Tools,
                Some("prospecting") => SpendCategory::Prospecting,
                Some("other") => SpendCategory::Other,
                Some(other) => {
                    return Err(Rejection::invalid(
                        "data.category",
                        &format!(
                            "`{}` is not media, tools, prospecting or other",
                            shown(other)
                        ),
                    ))
                }
            };
            EventData::SpendReported {
                date,
                amount: required_amount(data.amount, "data.amount")?,
                currency: required_currency(data.currency, "data.currency")?,
                channel: optional_channel(data.channel, "data.channel")?,
                campaign: optional_string(data.campaign, "data.campaign")?,
                category,
                source: optional_string(data.source, "data.source")?,
                account: optional_string(data.account, "data.account")?,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-03-05T00:00:00Z")
            .expect("valid")
            .with_timezone(&Utc)
    }

    fn decode(subject: &str, body: &str) -> Result<Event, Rejection> {
        decode_event(subject, body.as_bytes(), now(), &DecodeLimits::default())
    }

    #[test]
    fn spec_example_decodes() {
        let body = r#"{"specversion":"1.0","id":"crm-88412","source":"hubspot","type":"deal.won",
 "time":"2026-03-04T10:00:00Z","tenant":"acme",
 "data":{"deal_id":"D-17","customer_id":"C-9","lead_id":"L-3","amount":"1250.00","currency":"EUR"}}"#;
        let event = decode("kpi.events.acme.deal.won", body).expect("valid");
        assert_eq!(event.tenant, "acme");
        assert_eq!(event.event_type(), EventType::DealWon);
        match event.data {
            EventData::DealWon {
                amount, lead_id, ..
            } => {
                assert_eq!(amount, Decimal::from_str("1250").expect("d"));
                assert_eq!(lead_id.as_deref(), Some("L-3"));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    fn reason(subject: &str, body: &str) -> (RejectReason, String) {
        let rejection = decode(subject, body).expect_err("must be rejected");
        (rejection.reason, rejection.detail)
    }

    const BASE: &str =
        r#""specversion":"1.0","id":"e1","source":"t","time":"2026-03-04T10:00:00+01:00""#;

    #[test]
    fn rejections_name_the_field() {
        let cases = [
            ("lead.created", format!(r#"{{{BASE},"type":"lead.created","data":{{"channel":"seo"}}}}"#), RejectReason::MissingField, "data.lead_id"),
            ("deal.won", format!(r#"{{{BASE},"type":"deal.won","data":{{"deal_id":"d","customer_id":"c","amount":"-5.00","currency":"EUR"}}}}"#), RejectReason::NegativeAmount, "data.amount"),
            ("deal.won", format!(r#"{{{BASE},"type":"deal.won","data":{{"deal_id":"d","customer_id":"c","amount":"abc","currency":"EUR"}}}}"#), RejectReason::InvalidField, "data.amount"),
            ("spend.reported", format!(r#"{{{BASE},"type":"spend.reported","data":{{"date":"2026/03/04","amount":"1","currency":"EUR"}}}}"#), RejectReason::InvalidField, "data.date"),
            ("lead.created", format!(r#"{{{BASE},"type":"lead.created","tenant":"other","data":{{"lead_id":"x"}}}}"#), RejectReason::TenantMismatch, "tenant"),
            ("lead.exploded", format!(r#"{{{BASE},"type":"lead.exploded","data":{{"lead_id":"x"}}}}"#), RejectReason::UnknownType, "type"),
            ("lead.created", r#"{"id":"e","source":"s","type":"lead.created","time":"2026-03-04T10:00:00Z","data":{"lead_id":"x"}}"#.to_string(), RejectReason::MissingField, "specversion"),
            ("lead.created", r#"{"specversion":"1.0","id":"e","source":"s","type":"lead.created","time":"2026-03-04T10:00:00","data":{"lead_id":"x"}}"#.to_string(), RejectReason::InvalidField, "time"),
            ("lead.created", r#"{"specversion":"1.0","id":"e","source":"s","type":"lead.created","time":"2026-03-16T10:00:00Z","data":{"lead_id":"x"}}"#.to_string(), RejectReason::FutureTime, "time"),
            ("lead.created", format!(r#"{{{BASE},"type":"lead.created","data":{{"lead_id":"x","channel":"all"}}}}"#), RejectReason::InvalidField, "data.channel"),
            ("lead.created", format!(r#"{{{BASE},"type":"lead.created","data":{{"lead_id":"x","qualified":"yes"}}}}"#), RejectReason::InvalidField, "data.qualified"),
            ("deal.lost", format!(r#"{{{BASE},"type":"lead.created","data":{{"lead_id":"x"}}}}"#), RejectReason::TypeMismatch, "type"),
            ("lead.created", "{not json at all".to_string(), RejectReason::InvalidJson, "JSON"),
            ("deal.won", format!(r#"{{{BASE},"type":"deal.won","data":{{"deal_id":"d","customer_id":"c","amount":"50000000000000000000000000000","currency":"EUR"}}}}"#), RejectReason::InvalidField, "data.amount"),
            ("deal.won", format!(r#"{{{BASE},"type":"deal.won","data":{{"deal_id":"d","customer_id":"c","amount":1000000000000.5,"currency":"EUR"}}}}"#), RejectReason::InvalidField, "maximum amount"),
            ("spend.reported", format!(r#"{{{BASE},"type":"spend.reported","data":{{"date":"2026-03-04","amount":0.00000000000000000000000000011,"currency":"EUR"}}}}"#), RejectReason::InvalidField, "data.amount"),
            ("lead.created", format!(r#"{{{BASE},"type":"lead.created","data":{{"lead_id":"L\tx"}}}}"#), RejectReason::InvalidField, "data.lead_id"),
            ("lead.created", format!(r#"{{{BASE},"type":"lead.created","data":{{"lead_id":"x","campaign":"a\u0000b"}}}}"#), RejectReason::InvalidField, "data.campaign"),
            ("lead.created", r#"{"specversion":"1.0","id":"e","source":"s","type":"lead.created\t","time":"2026-03-04T10:00:00Z","data":{"lead_id":"x"}}"#.to_string(), RejectReason::InvalidField, "type"),
            ("lead.created", r#"{"specversion":"1.0\r\n","id":"e","source":"s","type":"lead.created","time":"2026-03-04T10:00:00Z","data":{"lead_id":"x"}}"#.to_string(), RejectReason::InvalidField, "specversion"),
        ];
        for (subject_type, body, want_reason, want_field) in cases {
            let (got_reason, detail) = reason(&format!("kpi.events.acme.{subject_type}"), &body);
            assert_eq!(got_reason, want_reason, "{body}: {detail}");
            assert!(
                detail.contains(want_field),
                "`{detail}` should name {want_field}"
            );
        }
    }

    #[test]
    fn a_line_break_in_any_field_never_reaches_the_rejection_detail() {
        // The detail becomes a NATS header value, where CR or LF would break the message.
        for body in [
            r#"{"specversion":"1.0","id":"e","source":"s","type":"lead.created","time":"x\r\ny","data":{"lead_id":"x"}}"#,
            r#"{"specversion":"1.0","id":"e","source":"s","type":"lead.created","time":"2026-03-04T10:00:00Z","tenant":"a\r\nb","data":{"lead_id":"x"}}"#,
            r#"{"specversion":"1.0","id":"e","source":"s","type":"lead\n.created","time":"2026-03-04T10:00:00Z","data":{"lead_id":"x"}}"#,
            r#"{"specversion":"1\r\n","id":"e","source":"s","type":"lead.created","time":"2026-03-04T10:00:00Z","data":{"lead_id":"x"}}"#,
            r#"{"specversion":"1.0","id":"e","source":"s","type":"spend.reported","time":"2026-03-04T10:00:00Z","data":{"date":"2026\r\n","amount":"1","currency":"EUR"}}"#,
            r#"{"specversion":"1.0","id":"e","source":"s","type":"deal.won","time":"2026-03-04T10:00:00Z","data":{"deal_id":"d","customer_id":"c","amount":"-1\r\n","currency":"EUR"}}"#,
        ] {
            let subject_type = if body.contains("spend.reported") {
                "spend.reported"
            } else if body.contains("deal.won") {
                "deal.won"
            } else {
                "lead.created"
            };
            let rejection = decode(&format!("kpi.events.acme.{subject_type}"), body)
                .expect_err("must be rejected");
            let text = rejection.to_string();
            assert!(
                !text.contains(['\r', '\n']) && !text.chars().any(char::is_control),
                "{text:?}"
            );
        }
        assert_eq!(shown("a\r\nb"), "a\\r\\nb");
        assert_eq!(shown(&"x".repeat(100)).chars().count(), 65);
    }

    #[test]
    fn amounts_are_kept_to_the_last_digit() {
        let body = format!(
            r#"{{{BASE},"type":"deal.won","data":{{"deal_id":"d","customer_id":"c","amount":0.125000000000000001,"currency":"EUR"}}}}"#
        );
        match decode("kpi.events.a.deal.won", &body).expect("valid").data {
            EventData::DealWon { amount, .. } => {
                assert_eq!(amount.to_string(), "0.125000000000000001")
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn subject_must_name_a_valid_tenant() {
        let body = format!(r#"{{{BASE},"type":"lead.created","data":{{"lead_id":"x"}}}}"#);
        assert_eq!(
            reason("kpi.events.ACME.lead.created", &body).0,
            RejectReason::InvalidSubject
        );
        assert_eq!(
            reason("other.subject", &body).0,
            RejectReason::InvalidSubject
        );
    }

    #[test]
    fn oversized_payloads_are_rejected() {
        let limits = DecodeLimits {
            max_event_bytes: 10,
            ..DecodeLimits::default()
        };
        let body = format!(r#"{{{BASE},"type":"lead.created","data":{{"lead_id":"x"}}}}"#);
        let rejection = decode_event("kpi.events.a.lead.created", body.as_bytes(), now(), &limits)
            .expect_err("too large");
        assert_eq!(rejection.reason, RejectReason::TooLarge);
    }

    #[test]
    fn optional_strings_accept_null_and_empty_and_escapes() {
        let body = format!(
            r#"{{{BASE},"type":"lead.created","data":{{"lead_id":"L\"1","channel":null,"campaign":""}}}}"#
        );
        match decode("kpi.events.a.lead.created", &body)
            .expect("valid")
            .data
        {
            EventData::LeadCreated {
                lead_id,
                channel,
                campaign,
                ..
            } => {
                assert_eq!(lead_id, "L\"1");
                assert_eq!(channel, None);
                assert_eq!(campaign, None);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
