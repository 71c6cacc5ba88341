//! Events out: the one encoder of SPEC section 1, used by every producer (connectors, the
//! webhook, `kpi publish`, `kpi demo`, `kpi import`, the test helpers).
//!
//! [`Event::encode`] writes the CloudEvents envelope (structured JSON mode) that
//! [`crate::decode_event`] reads back as the same event: amounts as decimal strings with every
//! digit, times in RFC 3339 UTC with as many fractional digits as they have, absent optional
//! fields left out. [`Event::subject`] is the subject it is published to, and its `id` the
//! `Nats-Msg-Id`. The spend line's identity is [`SpendLineKey`], whatever produced the line.

use chrono::SecondsFormat;
use serde_json::{Map, Value};

use crate::event::{event_subject, Event, EventData, SpendCategory};
use crate::record::SpendLineKey;

impl Event {
    /// The subject the event is published to: `kpi.events.<tenant>.<type>`.
    pub fn subject(&self) -> String {
        event_subject(&self.tenant, self.event_type())
    }

    /// The CloudEvents JSON of the event.
    pub fn encode(&self) -> Vec<u8> {
        let mut envelope = Map::new();
        envelope.insert("specversion".into(), Value::from("1.0"));
        envelope.insert("id".into(), Value::from(self.id.as_str()));
        envelope.insert("source".into(), Value::from(self.source.as_str()));
        envelope.insert("type".into(), Value::from(self.event_type().as_str()));
        envelope.insert(
            "time".into(),
            Value::from(
                self.time
                    .to_datetime()
                    .to_rfc3339_opts(SecondsFormat::AutoSi, true),
            ),
        );
        envelope.insert("tenant".into(), Value::from(self.tenant.as_str()));
        envelope.insert("data".into(), Value::Object(self.data.to_json()));
        // A map of strings, booleans and objects always serialises.
        serde_json::to_vec(&Value::Object(envelope)).unwrap_or_default()
    }
}

fn put(data: &mut Map<String, Value>, name: &str, value: &Option<String>) {
    if let Some(value) = value {
        data.insert(name.into(), Value::from(value.as_str()));
    }
}

impl EventData {
    /// The type of an event with this data.
    pub fn event_type(&self) -> crate::EventType {
        use crate::EventType;
        match self {
            EventData::LeadCreated { .. } => EventType::LeadCreated,
            EventData::LeadQualified { .. } => EventType::LeadQualified,
            EventData::LeadStageChanged { .. } => EventType::LeadStageChanged,
            EventData::DealWon { .. } => EventType::DealWon,
            EventData::DealLost { .. } => EventType::DealLost,
            EventData::SpendReported { .. } => EventType::SpendReported,
        }
    }

    /// The `data` object of the event.
    pub fn to_json(&self) -> Map<String, Value> {
        let mut data = Map::new();
        let text = |value: &str| Value::from(value);
        match self {
            EventData::LeadCreated {
                lead_id,
                channel,
                campaign,
                qualified,
                customer_id,
            } => {
                data.insert("lead_id".into(), text(lead_id));
                put(&mut data, "channel", channel);
                put(&mut data, "campaign", campaign);
                if let Some(qualified) = qualified {
                    data.insert("qualified".into(), Value::from(*qualified));
                }
                put(&mut data, "customer_id", customer_id);
            }
            EventData::LeadQualified { lead_id, qualified } => {
                data.insert("lead_id".into(), text(lead_id));
                data.insert("qualified".into(), Value::from(*qualified));
            }
            EventData::LeadStageChanged { lead_id, stage } => {
                data.insert("lead_id".into(), text(lead_id));
                data.insert("stage".into(), text(stage));
            }
            EventData::DealWon {
                deal_id,
                customer_id,
                amount,
                currency,
                lead_id,
                channel,
                campaign,
            } => {
                data.insert("deal_id".into(), text(deal_id));
                data.insert("customer_id".into(), text(customer_id));
                data.insert("amount".into(), Value::from(amount.to_string()));
                data.insert("currency".into(), text(currency));
                put(&mut data, "lead_id", lead_id);
                put(&mut data, "channel", channel);
                put(&mut data, "campaign", campaign);
            }
            EventData::DealLost { deal_id, lead_id } => {
                data.insert("deal_id".into(), text(deal_id));
                put(&mut data, "lead_id", lead_id);
            }
            EventData::SpendReported {
                date,
                amount,
                currency,
                channel,
                campaign,
                category,
                source,
                account,
            } => {
                data.insert("date".into(), Value::from(date.to_string()));
                data.insert("amount".into(), Value::from(amount.to_string()));
                data.insert("currency".into(), text(currency));
                put(&mut data, "channel", channel);
                put(&mut data, "campaign", campaign);
                data.insert("category".into(), text(category.as_str()));
                put(&mut data, "source", source);
                put(&mut data, "account", account);
            }
        }
        data
    }

    /// The identity of the spend line this event reports, for a `spend.reported`.
    pub fn spend_line_key(&self) -> Option<SpendLineKey> {
        match self {
            EventData::SpendReported {
                date,
                channel,
                campaign,
                category,
                source,
                account,
                ..
            } => Some(SpendLineKey {
                source: source.clone(),
                account: account.clone(),
                channel: channel.clone(),
                campaign: campaign.clone(),
                category: *category,
                date: *date,
            }),
            _ => None,
        }
    }
}

impl SpendLineKey {
    /// The identity as text, the same wherever it is written (a connector's state, an event
    /// id): the JSON array `[source, account, channel, campaign, category, date]`.
    pub fn to_text(&self) -> String {
        serde_json::to_string(&(
            &self.source,
            &self.account,
            &self.channel,
            &self.campaign,
            self.category.as_str(),
            self.date.to_string(),
        ))
        .unwrap_or_default()
    }
}

impl SpendLineKey {
    /// The identity [`SpendLineKey::to_text`] wrote.
    pub fn from_text(text: &str) -> Option<SpendLineKey> {
        type Parts = (
            Option<String>,
            Option<String>,
            Option<String>,
            Option<String>,
            String,
            String,
        );
        let (source, account, channel, campaign, category, date): Parts =
            serde_json::from_str(text).ok()?;
        Some(SpendLineKey {
            source,
            account,
            channel,
            campaign,
            category: SpendCategory::parse(&category)?,
            date: chrono::NaiveDate::parse_from_str(&date, "%Y-%m-%d").ok()?,
        })
    }
}

impl SpendCategory {
    /// The category named `text` (`media`, `tools`, `prospecting`, `other`).
    pub fn parse(text: &str) -> Option<SpendCategory> {
        [
            SpendCategory::Media,
            SpendCategory::Tools,
            SpendCategory::Prospecting,
            SpendCategory::Other,
        ]
        .into_iter()
        .find(|category| category.as_str() == text)
    }
}
