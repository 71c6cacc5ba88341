//! Entity records: the durable state the KPIs are derived from.
//!
//! Every record is made of last-writer-wins registers (keyed by [`Version`]) and grow-only
//! sets, so applying the same event twice, or events in any order, ends in the same record.
//! Each record also keeps the ids of the events applied to it: an event always targets exactly
//! one record, so this is an exact `(tenant, id)` de-duplication without a key per event.
//!
//! Derived fields that link records (a lead's won deals, a deal's resolved attribution, a
//! customer's deals) are kept in the records too, so that the contribution of a record to the
//! aggregates is a function of that record alone (see [`crate::contribution`]).

use std::collections::{BTreeMap, BTreeSet};

use chrono::NaiveDate;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::event::{SpendCategory, Timestamp, Version, CHANNEL_UNATTRIBUTED};

/// What kind of entity a record describes; also its byte in the storage key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RecordKind {
    Lead,
    Deal,
    Customer,
    Spend,
}

impl RecordKind {
    fn byte(self) -> u8 {
        match self {
            RecordKind::Lead => b'L',
            RecordKind::Deal => b'D',
            RecordKind::Customer => b'C',
            RecordKind::Spend => b'S',
        }
    }

    fn from_byte(byte: u8) -> Option<RecordKind> {
        match byte {
            b'L' => Some(RecordKind::Lead),
            b'D' => Some(RecordKind::Deal),
            b'C' => Some(RecordKind::Customer),
            b'S' => Some(RecordKind::Spend),
            _ => None,
        }
    }
}

/// The key of a record: tenant, kind and the entity's id within them.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RecordKey {
    pub tenant: String,
    pub kind: RecordKind,
    pub id: Vec<u8>,
}

impl RecordKey {
    pub fn lead(tenant: &str, lead_id: &str) -> RecordKey {
        RecordKey::new(tenant, RecordKind::Lead, lead_id.as_bytes().to_vec())
    }

    pub fn deal(tenant: &str, deal_id: &str) -> RecordKey {
        RecordKey::new(tenant, RecordKind::Deal, deal_id.as_bytes().to_vec())
    }

    pub fn customer(tenant: &str, customer_id: &str) -> RecordKey {
        RecordKey::new(
            tenant,
            RecordKind::Customer,
            customer_id.as_bytes().to_vec(),
        )
    }

    /// A spend line is identified by `source, account, channel, campaign, category, date`.
    pub fn spend(tenant: &str, line: &SpendLineKey) -> RecordKey {
        let id = postcard::to_stdvec(line).unwrap_or_default();
        RecordKey::new(tenant, RecordKind::Spend, id)
    }

    fn new(tenant: &str, kind: RecordKind, id: Vec<u8>) -> RecordKey {
        RecordKey {
            tenant: tenant.to_string(),
            kind,
            id,
        }
    }

    /// `tenant 0x00 kind id`: tenants never contain a zero byte, so the encoding is unambiguous
    /// and all records of a tenant share a prefix.
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(self.tenant.len() + 2 + self.id.len());
        bytes.extend_from_slice(self.tenant.as_bytes());
        bytes.push(0);
        bytes.push(self.kind.byte());
        bytes.extend_from_slice(&self.id);
        bytes
    }

    pub fn decode(bytes: &[u8]) -> Option<RecordKey> {
        let split = bytes.iter().position(|&b| b == 0)?;
        let tenant = std::str::from_utf8(&bytes[..split]).ok()?.to_string();
        let kind = RecordKind::from_byte(*bytes.get(split + 1)?)?;
        Some(RecordKey {
            tenant,
            kind,
            id: bytes[split + 2..].to_vec(),
        })
    }
}

/// The identity of a spend line.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SpendLineKey {
    pub source: Option<String>,
    pub account: Option<String>,
    pub channel: Option<String>,
    pub campaign: Option<String>,
    pub category: SpendCategory,
    pub date: NaiveDate,
}

/// The channel and campaign a deal (or a new customer) counts under.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Attribution {
    pub channel: String,
    pub campaign: Option<String>,
}

impl Attribution {
    pub fn from_fields(channel: Option<&str>, campaign: Option<&str>) -> Attribution {
        Attribution {
            channel: channel.unwrap_or(CHANNEL_UNATTRIBUTED).to_string(),
            campaign: campaign.map(str::to_string),
        }
    }
}

/// Any stored record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Record {
    Lead(LeadRecord),
    Deal(DealRecord),
    Customer(CustomerRecord),
    Spend(SpendRecord),
}

impl Record {
    pub fn encode(&self) -> Vec<u8> {
        // Serialising these plain structs cannot fail.
        postcard::to_stdvec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<Record, postcard::Error> {
        postcard::from_bytes(bytes)
    }

    /// A record that holds nothing is deleted rather than stored.
    pub fn is_empty(&self) -> bool {
        match self {
            Record::Lead(lead) => {
                lead.applied.is_empty() && lead.won_deals.is_empty() && lead.created.is_none()
            }
            Record::Deal(deal) => deal.applied.is_empty(),
            Record::Customer(customer) => customer.deals.is_empty(),
            Record::Spend(spend) => spend.applied.is_empty(),
        }
    }

    /// Has the event `event_id` been applied to this record? (Customers are never the target
    /// of an event.)
    pub fn has_applied(&self, event_id: &str) -> bool {
        match self {
            Record::Lead(lead) => lead.applied.contains(event_id),
            Record::Deal(deal) => deal.applied.contains(event_id),
            Record::Customer(_) => false,
            Record::Spend(spend) => spend.applied.contains(event_id),
        }
    }
}

/// A lead's attributes from its latest `lead.created`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LeadCreation {
    /// The winning `lead.created`; its time is the lead's creation time.
    pub version: Version,
    pub channel: Option<String>,
    pub campaign: Option<String>,
    pub customer_id: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LeadRecord {
    pub applied: BTreeSet<String>,
    /// `None` while only qualifications, stages or deals have named this lead.
    pub created: Option<LeadCreation>,
    /// Latest of `lead.created.qualified` and `lead.qualified`.
    pub qualified: Option<(Version, bool)>,
    /// Stages reached: a grow-only set.
    pub stages: BTreeSet<String>,
    /// Won deals whose `lead_id` names this lead (derived, for conversion and attribution).
    pub won_deals: BTreeSet<String>,
}

impl LeadRecord {
    /// Where deals of this lead are attributed, once the lead is known.
    pub fn attribution(&self) -> Option<Attribution> {
        self.created.as_ref().map(|created| {
            Attribution::from_fields(created.channel.as_deref(), created.campaign.as_deref())
        })
    }

    pub fn is_qualified(&self) -> bool {
        self.qualified.as_ref().is_some_and(|(_, value)| *value)
    }
}

/// The state set by a deal's latest event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum DealState {
    Won {
        customer_id: String,
        /// In the tenant's reporting currency.
        amount: Decimal,
        lead_id: Option<String>,
        channel: Option<String>,
        campaign: Option<String>,
    },
    Lost,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DealRecord {
    pub applied: BTreeSet<String>,
    pub latest: Option<(Version, DealState)>,
    /// Resolved attribution while won (derived: from the lead when known).
    pub attribution: Option<Attribution>,
}

impl DealRecord {
    /// `(customer_id, lead_id)` while the deal is won.
    pub fn won_links(&self) -> Option<(String, Option<String>)> {
        match &self.latest {
            Some((
                _,
                DealState::Won {
                    customer_id,
                    lead_id,
                    ..
                },
            )) => Some((customer_id.clone(), lead_id.clone())),
            _ => None,
        }
    }
}

/// A won deal as its customer sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CustomerDeal {
    pub time: Timestamp,
    pub attribution: Attribution,
}

/// A customer: the set of their won deals (derived from deal records).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CustomerRecord {
    pub deals: BTreeMap<String, CustomerDeal>,
}

impl CustomerRecord {
    /// The first won deal, `(time, deal_id)` smallest: it makes the customer new.
    pub fn first_deal(&self) -> Option<(&String, &CustomerDeal)> {
        self.deals
            .iter()
            .min_by(|(id_a, a), (id_b, b)| (a.time, *id_a).cmp(&(b.time, *id_b)))
    }
}

/// A spend line's current amount.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SpendLine {
    pub date: NaiveDate,
    /// In the tenant's reporting currency.
    pub amount: Decimal,
    pub channel: Option<String>,
    pub campaign: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SpendRecord {
    pub applied: BTreeSet<String>,
    pub latest: Option<(Version, SpendLine)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_group_by_tenant() {
        let key = RecordKey::deal("acme", "D\u{0}17");
        let encoded = key.encode();
        assert!(encoded.starts_with(b"acme\0D"));
        assert_eq!(RecordKey::decode(&encoded), Some(key));
    }

    #[test]
    fn records_round_trip() {
        let record = Record::Lead(LeadRecord {
            applied: ["e1".to_string()].into_iter().collect(),
            stages: ["meeting".to_string()].into_iter().collect(),
            ..LeadRecord::default()
        });
        assert_eq!(Record::decode(&record.encode()).ok(), Some(record));
    }
}
