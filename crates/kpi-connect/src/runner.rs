//! One run of one connector: the window of days, the cursor, turning what the connector read
//! into SPEC events with deterministic ids, publishing them, and saving the state.
//!
//! The window starts `lookback_days` before today, or earlier where the previous run stopped
//! (a connector that was down for a week catches up), or at `--since` for a backfill; it ends
//! today (UTC).
//!
//! Spend lines are versioned here: the state remembers, for each spend line of the window, the
//! amount sent last. An unchanged amount is not sent again; a changed one (a restated day) is
//! sent as a new event with a newer `time`, which replaces the earlier value in the engine
//! (SPEC: last writer wins). The id of that event is derived from the line, the amount and the
//! time, so an amount that goes back to an earlier value is still a new event.
//!
//! Spend that disappears upstream is withdrawn: when a kind says it read a set of lines
//! completely ([`Coverage`]: every line of the window's days, or every line of one CSV file),
//! a line it sent earlier in that set and did not read again (a day whose cost became zero,
//! which ad platforms leave out; a refund; a renamed campaign, whose old name's lines vanish) is
//! sent again with amount 0 and a newer `time`.
//!
//! Other events are sent again only when something the engine reads from them changed: the
//! state keeps, per entity attribute (a lead's creation, qualification or stage, a deal), a
//! fingerprint of what was sent last, for the entities read within the window.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use async_nats::jetstream;
use chrono::{DateTime, Days, NaiveDate, SecondsFormat, Utc};
use kpi_config::ConnectorConfig;
use kpi_model::{decode_event, Clock, DecodeLimits, Event, EventData};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::registry::DynConnector;
use crate::secrets::Redactor;
use crate::sink::{publish_all, Outgoing};
use crate::state::StateBucket;
use crate::{ConnectError, Coverage, Emit, RunContext, Window};

/// A configured connector, ready to run.
pub struct Runner {
    pub id: String,
    pub kind: String,
    pub tenant: String,
    pub lookback_days: u32,
    pub interval: Duration,
    connector: Box<dyn DynConnector>,
    redactor: Redactor,
    clock: Clock,
}

/// What a run did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunReport {
    pub window: Window,
    /// Events JetStream stored.
    pub published: u64,
    /// Events JetStream already had (same id within its duplicate window).
    pub duplicates: u64,
    /// Spend lines read with the amount already sent.
    pub unchanged: u64,
    /// Lead and deal events read as they were sent last (not sent again).
    pub unchanged_events: u64,
    /// Spend lines sent earlier that upstream no longer has: sent again with amount 0.
    pub withdrawn: u64,
}

/// The durable state of a connector.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct ConnectorState {
    /// The kind's own cursor.
    cursor: Option<Value>,
    /// The last day the last successful run read.
    until: Option<NaiveDate>,
    /// Spend lines of the recent window (and of CSV files), by line key: what was sent last.
    spend: BTreeMap<String, SentSpend>,
    /// Lead and deal attributes read within the window, by entity: what was sent last.
    #[serde(default)]
    sent: BTreeMap<String, SentEvent>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct SentSpend {
    date: NaiveDate,
    amount: String,
    currency: String,
    time: DateTime<Utc>,
    /// The set the line was read in (a CSV file's name); empty for the window's lines.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    group: String,
    /// The last day a run read the line.
    #[serde(default)]
    seen: Option<NaiveDate>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct SentEvent {
    /// What the engine reads from the event (see [`fingerprint`]).
    fingerprint: String,
    /// The last day a run read it.
    seen: NaiveDate,
}

/// Which entity attribute an event sets: a lead's creation, qualification or stage, or a
/// deal (won and lost are two states of one deal).
fn entity_of(data: &EventData) -> String {
    match data {
        EventData::LeadCreated { lead_id, .. } => format!("lead.created:{lead_id}"),
        EventData::LeadQualified { lead_id, .. } => format!("lead.qualified:{lead_id}"),
        EventData::LeadStageChanged { lead_id, stage } => {
            format!("lead.stage_changed:{lead_id}:{stage}")
        }
        EventData::DealWon { deal_id, .. } | EventData::DealLost { deal_id, .. } => {
            format!("deal:{deal_id}")
        }
        EventData::SpendReported { .. } => String::new(),
    }
}

/// What the engine reads from an event: its data, and its time where the time places it in a
/// period (a lead's creation, a deal's win). A qualification, a stage or a loss sent again at
/// a later time with the same content changes no KPI.
fn fingerprint(data: &EventData, time: DateTime<Utc>) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    hasher.update(data.event_type().as_str());
    hasher.update([0]);
    hasher.update(crate::content_of(data));
    if matches!(
        data,
        EventData::LeadCreated { .. } | EventData::DealWon { .. }
    ) {
        hasher.update([0]);
        hasher.update(time.to_rfc3339_opts(SecondsFormat::Nanos, true));
    }
    hasher.finalize()[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Runner {
    /// Builds connector `index` of the configuration: params expanded (`${ENV}`) and checked
    /// by its kind, errors naming the key. `clock` says what today is (the window's end).
    pub fn from_config(
        config: &ConnectorConfig,
        index: usize,
        env: &dyn Fn(&str) -> Option<String>,
        clock: Clock,
    ) -> Result<Runner, ConnectError> {
        let key = format!("connectors[{index}].params");
        let (params, secrets) = crate::secrets::expand(&config.params, &key, env)?;
        let connector = crate::registry::build(&config.kind, params, &key)?;
        Ok(Runner {
            id: config.id.clone(),
            kind: config.kind.clone(),
            tenant: config.tenant.clone(),
            lookback_days: config.lookback_days,
            interval: config.interval(),
            connector,
            redactor: Redactor::new(secrets),
            clock,
        })
    }

    /// The platform API version it calls, if its kind has versions.
    pub fn api_version(&self) -> Option<&str> {
        self.connector.api_version()
    }

    /// When that version is switched off, if this build knows.
    pub fn api_sunset(&self) -> Option<crate::versions::ApiVersion> {
        crate::versions::lookup(&self.kind, self.api_version()?)
    }

    /// A warning when that version is past, or within 60 days of, its sunset (or unknown).
    pub fn api_warning(&self) -> Option<String> {
        let version = self.api_version()?;
        crate::versions::warning(&self.kind, version, self.clock.now().date_naive())
    }

    /// Whether the scheduler runs it (see [`crate::Connector::POLLS`]).
    pub fn polls(&self) -> bool {
        self.connector.polls()
    }

    /// The secret values of this connector's params (from `${ENV}`).
    pub fn secrets(&self) -> &[String] {
        self.redactor.secrets()
    }

    /// Masks this connector's secrets.
    pub fn redact(&self, text: &str) -> String {
        self.redactor.redact(text)
    }

    fn context(&self, window: Window, cursor: Option<Value>, now: DateTime<Utc>) -> RunContext {
        RunContext {
            connector_id: self.id.clone(),
            tenant: self.tenant.clone(),
            window,
            cursor,
            now,
        }
    }

    /// Checks credentials and reachability (reads nothing durable, publishes nothing).
    pub async fn check(&self) -> Result<String, String> {
        let now = self.clock.now();
        let today = now.date_naive();
        let window = Window {
            since: today,
            until: today,
        };
        self.connector
            .check(&self.context(window, None, now))
            .await
            .map_err(|error| self.redact(&error.to_string()))
    }

    /// One run: take the connector (its state and a lease), read, publish, save the state.
    /// `since` overrides the start of the window. Refused while another run holds the
    /// connector; a failed run keeps the state as it was.
    /// `stopped` resolving (a shutdown) ends the run at once, releasing the connector.
    pub async fn run(
        &self,
        js: &jetstream::Context,
        states: &StateBucket,
        since: Option<NaiveDate>,
        progress: impl FnMut(u64, u64),
        stopped: impl std::future::Future<Output = ()>,
    ) -> Result<RunReport, ConnectError> {
        let held = states.acquire(&self.id).await?;
        let state = match held.state() {
            None => ConnectorState::default(),
            Some(bytes) => match serde_json::from_slice(bytes) {
                Ok(state) => state,
                Err(error) => {
                    held.release().await;
                    return Err(ConnectError::State(format!("unreadable, {error}")));
                }
            },
        };
        let outcome = {
            let work = self.run_from(js, state, since, progress, &held);
            tokio::pin!(work);
            tokio::pin!(stopped);
            tokio::select! {
                outcome = &mut work => Some(outcome),
                () = &mut stopped => None,
            }
        };
        let Some(outcome) = outcome else {
            held.release().await;
            return Err(ConnectError::Stopped);
        };
        match outcome {
            Ok((report, state)) => {
                let bytes = serde_json::to_vec(&state)
                    .map_err(|error| ConnectError::State(error.to_string()))?;
                held.commit(bytes).await?;
                Ok(report)
            }
            Err(error) => {
                held.release().await;
                Err(error)
            }
        }
    }

    async fn run_from(
        &self,
        js: &jetstream::Context,
        mut state: ConnectorState,
        since: Option<NaiveDate>,
        mut progress: impl FnMut(u64, u64),
        held: &crate::state::Held,
    ) -> Result<(RunReport, ConnectorState), ConnectError> {
        let now = self.clock.now();
        let window = self.window(&state, now.date_naive(), since);
        let context = self.context(window, state.cursor.clone(), now);
        let output = self
            .connector
            .run(&context)
            .await
            .map_err(|error| self.redacted(error))?;

        let mut report = RunReport {
            window,
            published: 0,
            duplicates: 0,
            unchanged: 0,
            unchanged_events: 0,
            withdrawn: 0,
        };
        let today = now.date_naive();
        let mut outgoing = Vec::with_capacity(output.emits.len());
        let mut read: BTreeSet<String> = BTreeSet::new();
        let (lines, events) = self.consolidate(output.emits)?;
        for line in lines {
            let key = line.key().to_text();
            read.insert(key.clone());
            let amount = line.amount.normalize().to_string();
            if let Some(sent) = state.spend.get_mut(&key) {
                sent.seen = Some(today);
                if sent.amount == amount && sent.currency == line.currency {
                    report.unchanged += 1;
                    continue;
                }
            }
            let sent = state.spend.get(&key);
            let time = match (line.reported_at, sent) {
                // A line that says when it was reported keeps that time, unless what was sent
                // last is newer (a withdrawal, a later report): the line read now is then
                // dated after it, so that it replaces it.
                (Some(reported_at), Some(sent)) if reported_at <= sent.time => {
                    newer_than(Some(sent), now)
                }
                (Some(reported_at), _) => reported_at,
                (None, sent) => newer_than(sent, now),
            };
            let id = self.spend_id(&key, &amount, &line.currency, time);
            outgoing.push(self.outgoing(&id, time, line.data(), now)?);
            state.spend.insert(
                key,
                SentSpend {
                    date: line.date,
                    amount,
                    currency: line.currency,
                    time,
                    group: line.group.unwrap_or_default(),
                    seen: Some(today),
                },
            );
        }
        for candidate in events {
            let (data, time) = candidate.data_and_time();
            if self.unchanged(&mut state, data, time, today) {
                report.unchanged_events += 1;
                continue;
            }
            outgoing.push(match candidate {
                Candidate::Built { id, time, data } => self.outgoing(&id, time, data, now)?,
                Candidate::External(event) => Outgoing::from_event(&event),
            });
        }

        // Lines the kind read completely and no longer returned: withdrawn (amount 0).
        for coverage in &output.coverage {
            let gone: Vec<String> = state
                .spend
                .iter()
                .filter(|(key, sent)| {
                    !read.contains(*key)
                        && sent.amount != "0"
                        && match coverage {
                            Coverage::Window => {
                                sent.group.is_empty()
                                    && (window.since..=window.until).contains(&sent.date)
                            }
                            Coverage::Group(group) => sent.group == *group,
                        }
                })
                .map(|(key, _)| key.clone())
                .collect();
            for key in gone {
                let Some(line) = kpi_model::record::SpendLineKey::from_text(&key) else {
                    continue;
                };
                let Some(sent) = state.spend.get_mut(&key) else {
                    continue;
                };
                let time = newer_than(Some(sent), now);
                let id = self.spend_id(&key, "0", &sent.currency, time);
                let data = EventData::SpendReported {
                    date: line.date,
                    amount: kpi_model::money::Decimal::ZERO,
                    currency: sent.currency.clone(),
                    channel: line.channel,
                    campaign: line.campaign,
                    category: line.category,
                    source: line.source,
                    account: line.account,
                };
                outgoing.push(self.outgoing(&id, time, data, now)?);
                sent.amount = "0".into();
                sent.time = time;
                report.withdrawn += 1;
            }
        }

        if held.is_lost().await {
            return Err(ConnectError::Busy(format!(
                "connector `{}` lost its lease to another run; nothing was published",
                self.id
            )));
        }
        let total = outgoing.len() as u64;
        let mut done = 0;
        publish_all(js, outgoing, |duplicate| {
            done += 1;
            if duplicate {
                report.duplicates += 1;
            } else {
                report.published += 1;
            }
            progress(done, total);
        })
        .await
        .map_err(ConnectError::Publish)?;

        // Only now that JetStream holds every event: the next run starts from here.
        if output.cursor.is_some() {
            state.cursor = output.cursor;
        }
        state.until = Some(window.until);
        // The lines and entities of the window (and of the lookback, after a later
        // `--since`) are remembered; a CSV file's lines for [`GROUP_MEMORY_DAYS`] after the
        // file was last read, so that the file's next version may withdraw them.
        let lookback_start = today
            .checked_sub_days(Days::new(u64::from(self.lookback_days)))
            .unwrap_or(today);
        let keep_from = window.since.min(lookback_start);
        let group_from = today
            .checked_sub_days(Days::new(GROUP_MEMORY_DAYS))
            .unwrap_or(today);
        state.spend.retain(|_, sent| {
            if sent.group.is_empty() {
                sent.date >= keep_from
            } else {
                sent.seen.unwrap_or(sent.date) >= group_from
            }
        });
        state.sent.retain(|_, sent| sent.seen >= keep_from);
        Ok((report, state))
    }

    fn redacted(&self, error: ConnectError) -> ConnectError {
        error.map_messages(|message| self.redact(&message))
    }

    fn window(&self, state: &ConnectorState, today: NaiveDate, since: Option<NaiveDate>) -> Window {
        run_window(self.lookback_days, state.until, today, since)
    }

    fn event_id(&self, parts: &[&str]) -> String {
        crate::event_id(&self.id, parts)
    }

    /// What a run read, made one line per spend line and one event per entity attribute:
    /// lines of one identity add up (two campaigns of one name, names that clean up alike),
    /// and of several events setting one entity attribute (two leads of one person) only the
    /// one the engine keeps is sent (the latest `time`, then the greater id), so that they do
    /// not take turns being sent again.
    fn consolidate(
        &self,
        emits: Vec<Emit>,
    ) -> Result<(Vec<crate::SpendLine>, Vec<Candidate>), ConnectError> {
        let mut lines: Vec<crate::SpendLine> = Vec::new();
        let mut line_index: BTreeMap<String, usize> = BTreeMap::new();
        let mut events: Vec<Candidate> = Vec::new();
        let mut event_index: BTreeMap<String, usize> = BTreeMap::new();
        let mut keep = |candidate: Candidate, events: &mut Vec<Candidate>| {
            let entity = entity_of(candidate.data_and_time().0);
            match event_index.get(&entity) {
                Some(&index) if events[index].order() >= candidate.order() => {}
                Some(&index) => events[index] = candidate,
                None => {
                    event_index.insert(entity, events.len());
                    events.push(candidate);
                }
            }
        };
        for emit in emits {
            match emit {
                Emit::Spend(line) => {
                    let key = line.key().to_text();
                    match line_index.get(&key) {
                        Some(&index) if lines[index].currency == line.currency => {
                            let total = &mut lines[index];
                            total.amount = total.amount.saturating_add(line.amount);
                            total.reported_at = total.reported_at.max(line.reported_at);
                        }
                        Some(&index) => {
                            tracing::warn!(connector = %self.id, line = %key, "one spend line in two currencies: the last one read is kept");
                            lines[index] = line;
                        }
                        None => {
                            line_index.insert(key, lines.len());
                            lines.push(line);
                        }
                    }
                }
                Emit::Event {
                    time,
                    upstream_key,
                    version,
                    data,
                } => {
                    let event_type = data.event_type();
                    // The time is part of an unversioned id: the same row at another time (a
                    // qualification set back) is a new event, not a duplicate of the first.
                    let time_text = time.to_rfc3339_opts(SecondsFormat::Nanos, true);
                    let id = match version {
                        Some(version) => crate::versioned_event_id(
                            &self.id,
                            version,
                            &[event_type.as_str(), upstream_key.as_str()],
                        ),
                        None => {
                            self.event_id(&[event_type.as_str(), upstream_key.as_str(), &time_text])
                        }
                    };
                    keep(Candidate::Built { id, time, data }, &mut events);
                }
                Emit::External(event) => {
                    if event.tenant != self.tenant {
                        return Err(ConnectError::Protocol {
                            service: self.kind.clone(),
                            message: format!(
                                "event `{}` is for tenant `{}`, the connector's tenant is `{}`",
                                event.id, event.tenant, self.tenant
                            ),
                        });
                    }
                    keep(Candidate::External(event), &mut events);
                }
            }
        }
        Ok((lines, events))
    }

    /// The id of a spend line's version: its identity, amount, currency and time.
    fn spend_id(&self, key: &str, amount: &str, currency: &str, time: DateTime<Utc>) -> String {
        let time_text = time.to_rfc3339_opts(SecondsFormat::Millis, true);
        self.event_id(&["spend.reported", key, amount, currency, &time_text])
    }

    /// Whether the event says what was sent last for its entity attribute; remembers it
    /// either way (read today).
    fn unchanged(
        &self,
        state: &mut ConnectorState,
        data: &EventData,
        time: DateTime<Utc>,
        today: NaiveDate,
    ) -> bool {
        let print = fingerprint(data, time);
        let entry = state.sent.entry(entity_of(data)).or_insert(SentEvent {
            fingerprint: String::new(),
            seen: today,
        });
        entry.seen = today;
        if entry.fingerprint == print {
            return true;
        }
        entry.fingerprint = print;
        false
    }

    /// The event `id` of this connector, checked against SPEC the way the engine will read
    /// it: a connector never publishes what the engine would dead-letter for its shape.
    fn outgoing(
        &self,
        id: &str,
        time: DateTime<Utc>,
        data: EventData,
        now: DateTime<Utc>,
    ) -> Result<Outgoing, ConnectError> {
        let invalid = |message: String| ConnectError::Protocol {
            service: self.kind.clone(),
            message,
        };
        let event = Event::new(
            &self.tenant,
            id,
            &format!("kpi-connector/{}", self.id),
            time,
            data,
        )
        .ok_or_else(|| invalid(format!("event `{id}`: time {time} is out of range")))?;
        checked(event, now).map_err(invalid)
    }
}

/// How long a CSV file's lines are remembered after the file was last read (its next version
/// may withdraw them), whatever the lines' dates.
const GROUP_MEMORY_DAYS: u64 = 400;

/// An event a run may send.
enum Candidate {
    /// Built from what a kind read, with its id.
    Built {
        id: String,
        time: DateTime<Utc>,
        data: EventData,
    },
    /// A plugin's complete event.
    External(Event),
}

impl Candidate {
    fn data_and_time(&self) -> (&EventData, DateTime<Utc>) {
        match self {
            Candidate::Built { time, data, .. } => (data, *time),
            Candidate::External(event) => (&event.data, event.time.to_datetime()),
        }
    }

    /// The SPEC order of events on one entity attribute: latest time, then greater id.
    fn order(&self) -> (DateTime<Utc>, &str) {
        match self {
            Candidate::Built { id, time, .. } => (*time, id.as_str()),
            Candidate::External(event) => (event.time.to_datetime(), event.id.as_str()),
        }
    }
}

/// A time for a new version of a line sent at `sent.time`: now, or just after it if the
/// clock went back.
fn newer_than(sent: Option<&SentSpend>, now: DateTime<Utc>) -> DateTime<Utc> {
    match sent {
        Some(sent) if sent.time >= now => sent.time + chrono::Duration::milliseconds(1),
        _ => now,
    }
}

/// The event, encoded, once the engine's decoder accepted it.
fn checked(event: Event, now: DateTime<Utc>) -> Result<Outgoing, String> {
    let outgoing = Outgoing::from_event(&event);
    // What the engine reads is the decoded event (an empty optional field is absent).
    match decode_event(
        &outgoing.subject,
        &outgoing.payload,
        now,
        &DecodeLimits::default(),
    ) {
        Ok(_) => Ok(outgoing),
        Err(rejection) => Err(format!("event `{}`: {rejection}", event.id)),
    }
}

/// A saved state in words, for `kpi connectors state`.
pub fn describe_state(bytes: &[u8]) -> Result<Vec<String>, ConnectError> {
    let state: ConnectorState = serde_json::from_slice(bytes)
        .map_err(|error| ConnectError::State(format!("unreadable, {error}")))?;
    let mut lines = vec![
        format!(
            "cursor: {}",
            state
                .cursor
                .as_ref()
                .map(Value::to_string)
                .unwrap_or_else(|| "none".into())
        ),
        format!(
            "last run read up to: {}",
            state
                .until
                .map(|day| day.to_string())
                .unwrap_or_else(|| "never".into())
        ),
    ];
    let days: Vec<NaiveDate> = state.spend.values().map(|sent| sent.date).collect();
    lines.push(match (days.iter().min(), days.iter().max()) {
        (Some(first), Some(last)) => format!(
            "spend lines remembered: {} ({first} to {last})",
            state.spend.len()
        ),
        _ => "spend lines remembered: none".into(),
    });
    Ok(lines)
}

/// The days a run reads: from `lookback_days` before `today`, or from the last day the last
/// successful run read (`last_until`) if that is earlier, or from `since` (a backfill); to
/// `today`.
fn run_window(
    lookback_days: u32,
    last_until: Option<NaiveDate>,
    today: NaiveDate,
    since: Option<NaiveDate>,
) -> Window {
    let lookback = today
        .checked_sub_days(Days::new(u64::from(lookback_days)))
        .unwrap_or(today);
    let since = match (since, last_until) {
        (Some(since), _) => since,
        (None, Some(until)) => until.min(lookback),
        (None, None) => lookback,
    };
    Window {
        since: since.min(today),
        until: today,
    }
}

/// The events of a CSV file for `kpi import`: ids from the rows' content, so importing a file
/// again sends nothing new; spend rows without `reported_at` are dated now.
pub fn import_events(
    kind: crate::kinds::csv_folder::CsvKind,
    path: &std::path::Path,
    tenant: &str,
    now: DateTime<Utc>,
) -> Result<Vec<Outgoing>, ConnectError> {
    let file = std::fs::File::open(path)
        .map_err(|error| ConnectError::Local(format!("cannot open {}: {error}", path.display())))?;
    let emits = crate::kinds::csv_folder::parse(kind, file, &path.display().to_string())?;
    let source = "kpi-import";
    let mut events = Vec::with_capacity(emits.len());
    for emit in emits {
        let (id, time, data) = match emit {
            Emit::Spend(line) => {
                let id = crate::event_id(
                    "csv",
                    &[
                        tenant,
                        "spend.reported",
                        &line.key().to_text(),
                        &line.amount.normalize().to_string(),
                        &line.currency,
                    ],
                );
                (id, line.reported_at.unwrap_or(now), line.data())
            }
            Emit::Event {
                time,
                upstream_key,
                data,
                ..
            } => {
                let id =
                    crate::event_id("csv", &[tenant, data.event_type().as_str(), &upstream_key]);
                (id, time, data)
            }
            Emit::External(_) => continue,
        };
        let event = Event::new(tenant, &id, source, time, data).ok_or_else(|| {
            ConnectError::Local(format!("event `{id}`: time {time} is out of range"))
        })?;
        events.push(checked(event, now).map_err(ConnectError::Local)?);
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn date(text: &str) -> NaiveDate {
        NaiveDate::parse_from_str(text, "%Y-%m-%d").expect("a date")
    }

    fn window(since: &str, until: &str) -> Window {
        Window {
            since: date(since),
            until: date(until),
        }
    }

    fn runner() -> Runner {
        let config = ConnectorConfig {
            id: "files".into(),
            kind: "csv".into(),
            tenant: "acme".into(),
            every: "1h".into(),
            lookback_days: 3,
            params: serde_json::from_value(serde_json::json!({"dir": "/tmp", "kind": "spend"}))
                .expect("params"),
        };
        Runner::from_config(&config, 0, &|_| None, Clock::system()).expect("a runner")
    }

    fn lead(lead_id: &str, channel: &str, time: &str) -> Emit {
        Emit::Event {
            time: DateTime::parse_from_rfc3339(time)
                .expect("a time")
                .with_timezone(&Utc),
            upstream_key: format!("{lead_id}:{channel}"),
            version: None,
            data: EventData::LeadCreated {
                lead_id: lead_id.into(),
                channel: Some(channel.into()),
                campaign: None,
                qualified: None,
                customer_id: None,
            },
        }
    }

    fn spend(campaign: &str, amount: &str) -> Emit {
        Emit::Spend(crate::SpendLine {
            date: date("2026-11-30"),
            amount: crate::amount(amount).expect("an amount"),
            currency: "EUR".into(),
            channel: Some("social".into()),
            campaign: Some(campaign.into()),
            category: kpi_model::event::SpendCategory::Media,
            source: "meta_ads".into(),
            account: Some("act_1".into()),
            reported_at: None,
            group: None,
        })
    }

    #[test]
    fn one_run_sends_one_line_per_identity_and_one_event_per_entity_attribute() {
        let (lines, events) = runner()
            .consolidate(vec![
                spend("spring", "10.25"),
                lead("P7", "seo", "2026-11-01T10:00:00Z"),
                spend("autumn", "1"),
                spend("spring", "4.75"),
                // The same person's second lead, newer: the one the engine keeps.
                lead("P7", "social", "2026-11-03T10:00:00Z"),
                lead("P7", "email", "2026-11-02T10:00:00Z"),
            ])
            .expect("consolidated");
        let amounts: Vec<(Option<String>, String)> = lines
            .iter()
            .map(|line| (line.campaign.clone(), line.amount.to_string()))
            .collect();
        assert_eq!(
            amounts,
            [
                (Some("spring".into()), "15.00".into()),
                (Some("autumn".into()), "1".into())
            ]
        );
        assert_eq!(events.len(), 1);
        match events[0].data_and_time().0 {
            EventData::LeadCreated { channel, .. } => {
                assert_eq!(channel.as_deref(), Some("social"))
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn the_window_reaches_back_across_month_and_year_ends() {
        // On the 1st of a year, the window reaches into the previous December.
        assert_eq!(
            run_window(14, None, date("2027-01-01"), None),
            window("2026-12-18", "2027-01-01")
        );
        // Into February of a leap year, and of a common one.
        assert_eq!(
            run_window(3, None, date("2028-03-01"), None),
            window("2028-02-27", "2028-03-01")
        );
        assert_eq!(
            run_window(3, None, date("2027-03-01"), None),
            window("2027-02-26", "2027-03-01")
        );
        // The 31st, and a zero-day window.
        assert_eq!(
            run_window(0, None, date("2026-12-31"), None),
            window("2026-12-31", "2026-12-31")
        );
    }

    #[test]
    fn a_connector_that_was_down_catches_up_and_a_backfill_starts_where_asked() {
        // The last run read up to 20 December; ten days later the window starts there.
        assert_eq!(
            run_window(3, Some(date("2026-12-20")), date("2026-12-30"), None),
            window("2026-12-20", "2026-12-30")
        );
        // A recent run does not shorten the lookback.
        assert_eq!(
            run_window(3, Some(date("2026-12-30")), date("2026-12-31"), None),
            window("2026-12-28", "2026-12-31")
        );
        assert_eq!(
            run_window(
                3,
                Some(date("2026-12-30")),
                date("2026-12-31"),
                Some(date("2026-01-01"))
            ),
            window("2026-01-01", "2026-12-31")
        );
        // A backfill date after today reads today only.
        assert_eq!(
            run_window(3, None, date("2026-12-31"), Some(date("2027-02-01"))),
            window("2026-12-31", "2026-12-31")
        );
    }
}
