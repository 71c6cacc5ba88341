//! Connector plugins: they pull spend, leads and deals from the tools an SME uses and publish
//! SPEC events into JetStream, like any other producer.
//!
//! ## Layout
//!
//! - [`Connector`] is the typed trait a kind implements: its `Params` (deserialised from
//!   `[connectors.params]`, every field documented), `check` (credentials and reachability) and
//!   `run` (one poll over a window of days, from a cursor). [`registry`] erases the kinds behind
//!   [`DynConnector`] and lists them by hand.
//! - [`http`]: the HTTP client every HTTP kind uses: retries with exponential back-off on
//!   transient errors, `Retry-After` honoured, upstream error messages kept.
//! - [`runner`]: one run of one connector: window, cursor, spend versions, publication, state.
//! - [`scheduler`]: the connectors of `kpi serve`, each every `every`, never two runs of one
//!   connector at once, with back-off after failures, and the `kpi_connector_*` metrics.
//!
//! ## Invariants
//!
//! - Connectors never touch the engine's store or the consumer: what they produce goes
//!   through JetStream, so the engine's ingest stays the one path to keep correct.
//! - Event ids are deterministic: the same upstream row in the same version gives the same id
//!   (and `Nats-Msg-Id`), so re-reads, retries and crashes between publishing and saving the
//!   cursor never count anything twice.
//! - A connector's state (cursor, versions of the spend lines it sent) is saved only after
//!   JetStream stored every event of the run, in a JetStream key-value bucket with
//!   compare-and-set ([`state`]): two runs of one connector never interleave.
//! - Secrets (`${ENV}` values) never appear in logs or errors: [`secrets::Redactor`].

pub mod http;
pub mod kinds;
pub mod registry;
pub mod runner;
pub mod scheduler;
pub mod secrets;
pub mod sink;
pub mod state;
pub mod versions;

use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use kpi_model::event::SpendCategory;
use kpi_model::money::Decimal;
use kpi_model::record::SpendLineKey;
use kpi_model::{Event, EventData};
use serde::de::DeserializeOwned;
use serde_json::Value;

pub use registry::{build, kinds, DynConnector, KindInfo};
pub use runner::{RunReport, Runner};
pub use scheduler::{ConnectorMetrics, Scheduler};

/// Why a connector could not be built, checked or run.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// A bad `params` value; `key` is the full configuration key.
    #[error("{key}: {message}")]
    Config { key: String, message: String },
    /// The upstream refused the credentials.
    #[error("{service} refused the credentials: {message}")]
    Unauthorized { service: String, message: String },
    /// The upstream asked to slow down and the retries ran out.
    #[error("{service} rate limit: {message}")]
    RateLimited {
        service: String,
        message: String,
        retry_after: Option<Duration>,
    },
    /// The upstream failed in a way that may pass (5xx, network); the retries ran out.
    #[error("{service} unavailable: {message}")]
    Transient { service: String, message: String },
    /// The upstream answered with an error that retrying will not change.
    #[error("{service} error: {message}")]
    Upstream { service: String, message: String },
    /// The upstream answered something this connector cannot read.
    #[error("{service} answered unexpectedly: {message}")]
    Protocol { service: String, message: String },
    /// A local failure (file, process).
    #[error("{0}")]
    Local(String),
    /// JetStream did not store the events.
    #[error("publishing to JetStream: {0}")]
    Publish(String),
    /// The connector state could not be read or saved.
    #[error("connector state: {0}")]
    State(String),
    /// Another run holds the connector.
    #[error("{0}")]
    Busy(String),
    /// The run was stopped by a shutdown (its connector released).
    #[error("stopped by the shutdown")]
    Stopped,
}

impl ConnectError {
    /// The same error with its messages passed through `map` (to mask secrets).
    pub fn map_messages(self, map: impl Fn(String) -> String) -> ConnectError {
        match self {
            ConnectError::Config { key, message } => ConnectError::Config {
                key,
                message: map(message),
            },
            ConnectError::Unauthorized { service, message } => ConnectError::Unauthorized {
                service,
                message: map(message),
            },
            ConnectError::RateLimited {
                service,
                message,
                retry_after,
            } => ConnectError::RateLimited {
                service,
                message: map(message),
                retry_after,
            },
            ConnectError::Transient { service, message } => ConnectError::Transient {
                service,
                message: map(message),
            },
            ConnectError::Upstream { service, message } => ConnectError::Upstream {
                service,
                message: map(message),
            },
            ConnectError::Protocol { service, message } => ConnectError::Protocol {
                service,
                message: map(message),
            },
            ConnectError::Local(message) => ConnectError::Local(map(message)),
            ConnectError::Publish(message) => ConnectError::Publish(map(message)),
            ConnectError::State(message) => ConnectError::State(map(message)),
            ConnectError::Busy(message) => ConnectError::Busy(map(message)),
            ConnectError::Stopped => ConnectError::Stopped,
        }
    }

    /// Worth running again soon (the scheduler backs off exponentially).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ConnectError::RateLimited { .. }
                | ConnectError::Transient { .. }
                | ConnectError::Publish(_)
                | ConnectError::Busy(_)
        )
    }
}

/// The days a run reads, in the connector's upstream calendar: `since` to `until` inclusive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub since: NaiveDate,
    pub until: NaiveDate,
}

/// What a run is given.
#[derive(Clone, Debug)]
pub struct RunContext {
    pub connector_id: String,
    pub tenant: String,
    pub window: Window,
    /// The cursor the previous successful run returned (kind-specific), if any.
    pub cursor: Option<Value>,
    /// When the run started.
    pub now: DateTime<Utc>,
}

/// One fact a connector read.
#[derive(Clone, Debug, PartialEq)]
pub enum Emit {
    /// The amount spent on one spend line (SPEC key: source, account, channel, campaign,
    /// category, date). The runner turns it into a `spend.reported` event only when the amount
    /// differs from the one it sent last, with a newer `time`, so a restated day replaces the
    /// earlier value.
    Spend(SpendLine),
    /// Another SPEC event. `upstream_key` names the upstream row *and its version* (e.g. a
    /// contact id and its modification time): the event id is derived from it.
    Event {
        time: DateTime<Utc>,
        upstream_key: String,
        /// The upstream version (e.g. a modification time in milliseconds). SPEC breaks ties
        /// between events of one entity with the same `time` by the greater id: with a
        /// version, the id starts with it, zero-padded, so the latest version wins.
        version: Option<u64>,
        data: EventData,
    },
    /// A complete event from an external plugin (already decoded and checked against SPEC
    /// for this connector's tenant), published as it is with its own deterministic id.
    External(Event),
}

/// A spend line as a connector reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpendLine {
    pub date: NaiveDate,
    pub amount: Decimal,
    pub currency: String,
    pub channel: Option<String>,
    pub campaign: Option<String>,
    pub category: SpendCategory,
    pub source: String,
    pub account: Option<String>,
    /// When upstream reported this amount (a CSV column): the event's time. Without it, the
    /// runner dates a new amount now.
    pub reported_at: Option<DateTime<Utc>>,
    /// The set this line is read in, for [`Coverage::Group`] (a CSV file); `None`: the
    /// window's lines.
    pub group: Option<String>,
}

impl SpendLine {
    /// The `data` of the `spend.reported` event for this line.
    pub fn data(&self) -> EventData {
        EventData::SpendReported {
            date: self.date,
            amount: self.amount,
            currency: self.currency.clone(),
            channel: self.channel.clone(),
            campaign: self.campaign.clone(),
            category: self.category,
            source: Some(self.source.clone()),
            account: self.account.clone(),
        }
    }

    /// The SPEC identity of the line (source, account, channel, campaign, category, date).
    pub fn key(&self) -> SpendLineKey {
        SpendLineKey {
            source: Some(self.source.clone()),
            account: self.account.clone(),
            channel: self.channel.clone(),
            campaign: self.campaign.clone(),
            category: self.category,
            date: self.date,
        }
    }
}

/// The content of an event's data as text (JSON, keys in order): part of the upstream key of
/// events whose id changes when their content does.
pub fn content_of(data: &EventData) -> String {
    serde_json::to_string(&data.to_json()).unwrap_or_default()
}

/// An amount an upstream wrote as text, exactly (see [`kpi_model::money::parse_amount_text`]).
pub fn amount(text: &str) -> Result<Decimal, String> {
    kpi_model::money::parse_amount_text(text.trim())
        .map_err(|error| format!("amount `{}`: {error}", kpi_model::event::shown(text)))
}

/// A deterministic event id: `{namespace}-{24 hex digits of SHA-256(namespace, parts)}`.
pub fn event_id(namespace: &str, parts: &[&str]) -> String {
    format!("{namespace}-{}", digest(namespace, parts))
}

/// As [`event_id`], with an upstream version first, zero-padded so that ids sort by version:
/// `{namespace}-{version:016}-{digest}`.
pub fn versioned_event_id(namespace: &str, version: u64, parts: &[&str]) -> String {
    format!("{namespace}-{version:016}-{}", digest(namespace, parts))
}

fn digest(namespace: &str, parts: &[&str]) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    hasher.update(namespace.as_bytes());
    for part in parts {
        hasher.update([0]);
        hasher.update(part.as_bytes());
    }
    hasher.finalize()[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What a run returns.
#[derive(Debug, Default)]
pub struct RunOutput {
    pub emits: Vec<Emit>,
    /// The cursor the next run starts from; `None` keeps the previous one.
    pub cursor: Option<Value>,
    /// The sets of spend lines this run read completely: a line sent earlier in one of them
    /// and not among `emits` is withdrawn (sent again with amount 0).
    pub coverage: Vec<Coverage>,
}

/// A set of spend lines a run read completely.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Coverage {
    /// Every line of the run's window days (without a group): what an ad platform's report
    /// of those days returns.
    Window,
    /// Every line of one group (a CSV file's lines, whatever their dates).
    Group(String),
}

/// A connector kind, typed. Implementations are listed in [`registry`].
pub trait Connector: Sized + Send + Sync + 'static {
    /// The `[connectors.params]` table.
    type Params: DeserializeOwned;
    /// The `kind` value.
    const KIND: &'static str;
    /// One line for `kpi connectors list`.
    const DESCRIPTION: &'static str;
    /// Whether the scheduler runs it every `every` (false for kinds that receive, like
    /// webhooks).
    const POLLS: bool = true;

    /// Builds the connector from its params (after `${ENV}` expansion); errors name the key
    /// under `params.`.
    fn new(params: Self::Params) -> Result<Self, ConnectError>;

    /// The version of the platform's API it calls, for kinds whose platform switches versions
    /// off ([`versions`]).
    fn api_version(&self) -> Option<&str> {
        None
    }

    /// Checks credentials and reachability; returns what it found, for the operator.
    fn check(
        &self,
        context: &RunContext,
    ) -> impl Future<Output = Result<String, ConnectError>> + Send;

    /// Reads the window (and whatever the cursor says is new).
    fn run(
        &self,
        context: &RunContext,
    ) -> impl Future<Output = Result<RunOutput, ConnectError>> + Send;
}

/// The exact sum of amounts written as text (an error names the first that is not one).
pub fn sum_amounts(values: &[String]) -> Result<Decimal, String> {
    let mut total = Decimal::ZERO;
    for value in values {
        total = total
            .checked_add(amount(value)?)
            .ok_or_else(|| "the sum overflows".to_string())?;
    }
    Ok(total.normalize())
}

/// `micros / 1_000_000` (Google Ads' `cost_micros`), exact.
pub fn micros_to_decimal(micros: i64) -> Decimal {
    Decimal::new(micros, 6).normalize()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn micros_convert_exactly() {
        assert_eq!(micros_to_decimal(12_340_000).to_string(), "12.34");
        assert_eq!(micros_to_decimal(5_000_000).to_string(), "5");
        assert_eq!(micros_to_decimal(1).to_string(), "0.000001");
        assert_eq!(micros_to_decimal(0).to_string(), "0");
    }

    #[test]
    fn versioned_ids_sort_by_version_and_plain_ids_are_stable() {
        let older = versioned_event_id("crm", 9_000, &["deal.won", "deal:1:x"]);
        let newer = versioned_event_id("crm", 10_000, &["deal.won", "deal:1:y"]);
        assert!(older < newer, "{older} !< {newer}");
        assert_eq!(event_id("crm", &["a"]), event_id("crm", &["a"]));
        assert_ne!(event_id("crm", &["a", "b"]), event_id("crm", &["ab"]));
    }

    #[test]
    fn decimal_texts_add_exactly() {
        let tenths: Vec<String> = (0..10).map(|_| "0.10".to_string()).collect();
        assert_eq!(sum_amounts(&tenths).map(|d| d.to_string()), Ok("1".into()));
        assert!(sum_amounts(&["12.5".into(), "x".into()])
            .expect_err("x is not a decimal")
            .contains("`x`"));
    }
}
