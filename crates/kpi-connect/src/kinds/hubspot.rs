//! `hubspot`: contacts and deals from the HubSpot CRM (API v3), incrementally by modification
//! time.
//!
//! - Contacts: `POST /crm/v3/objects/contacts/search`, filtered on `lastmodifieddate >=` the
//!   cursor minus `lookback_days`, sorted ascending, paged with `paging.next.after`. Each
//!   contact is a lead: `lead.created` (time `createdate`; channel from
//!   `hs_analytics_source`, campaign from `hs_analytics_source_data_1`), its lifecycle stage as
//!   `lead.stage_changed`, and `lead.qualified` (true from `marketingqualifiedlead` on, false
//!   for `subscriber` and `lead`).
//! - Deals: `POST /crm/v3/objects/deals/search` the same way; the closed ones become
//!   `deal.won` (`hs_is_closed_won`) or `deal.lost`, with `amount`, `deal_currency_code` (or
//!   `currency`), `closedate`, and the first associated contact (from
//!   `POST /crm/v4/associations/deals/contacts/batch/read`) as both lead and customer.
//! - Authentication: a private app's access token (`Authorization: Bearer`), scopes
//!   `crm.objects.contacts.read` and `crm.objects.deals.read`.
//!
//! The first run reads everything; later runs read what changed since the cursor minus the
//! window (`lookback_days`), or since `--since` when that is earlier. Event ids carry the
//! object's modification time, so a later version of a deal (a corrected
//! amount at the same close date) wins. The cursor is the latest `lastmodifieddate` seen.

use chrono::{DateTime, Days, Utc};
use serde::Deserialize;
use serde_json::{json, Value};

use kpi_model::event::clean_identifier;
use kpi_model::EventData;

use super::{base, rfc3339, text};
use crate::http::Http;
use crate::{ConnectError, Connector, Emit, RunContext, RunOutput};

/// `[connectors.params]` of `hubspot`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubSpotParams {
    /// A private app access token.
    pub access_token: String,
    #[serde(default = "default_base_url")]
    pub base_url: String,
    /// Currency of deals without `deal_currency_code`.
    #[serde(default = "default_currency")]
    pub currency: String,
}

fn default_base_url() -> String {
    "https://api.hubapi.com".into()
}
fn default_currency() -> String {
    "EUR".into()
}

pub struct HubSpot {
    params: HubSpotParams,
    http: Http,
}

const CONTACT_PROPERTIES: &[&str] = &[
    "createdate",
    "lastmodifieddate",
    "lifecyclestage",
    "hs_analytics_source",
    "hs_analytics_source_data_1",
];
const DEAL_PROPERTIES: &[&str] = &[
    "dealname",
    "amount",
    "deal_currency_code",
    "closedate",
    "dealstage",
    "hs_is_closed",
    "hs_is_closed_won",
    "hs_lastmodifieddate",
];

#[derive(Deserialize)]
struct SearchPage {
    #[serde(default)]
    results: Vec<Value>,
    #[serde(default)]
    paging: Option<Value>,
}

/// HubSpot's original-source values, as SPEC channels.
fn channel_of_source(source: &str) -> &'static str {
    match source {
        "ORGANIC_SEARCH" => "seo",
        "PAID_SEARCH" => "paid_search",
        "EMAIL_MARKETING" => "email",
        "SOCIAL_MEDIA" | "PAID_SOCIAL" => "social",
        "REFERRALS" => "referral",
        "DIRECT_TRAFFIC" => "direct",
        "OFFLINE" => "offline",
        _ => "other",
    }
}

/// Stages before qualification; any other lifecycle stage means the lead is qualified.
fn is_qualified_stage(stage: &str) -> bool {
    !matches!(stage, "subscriber" | "lead" | "other")
}

impl HubSpot {
    async fn search(
        &self,
        object: &str,
        modified_property: &str,
        properties: &[&str],
        since: DateTime<Utc>,
    ) -> Result<Vec<Value>, ConnectError> {
        let url = format!(
            "{}/crm/v3/objects/{object}/search",
            base(&self.params.base_url)
        );
        // The search API pages through at most 10,000 results of one query: past that, a new
        // query starts from the last modification time seen (results are sorted by it).
        const SEARCH_WINDOW: usize = 10_000;
        let mut results: Vec<Value> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut from = since;
        let mut after: Option<String> = None;
        let mut in_query = 0usize;
        loop {
            let mut body = json!({
                "filterGroups": [{"filters": [{
                    "propertyName": modified_property,
                    "operator": "GTE",
                    "value": from.timestamp_millis().to_string(),
                }]}],
                "sorts": [{"propertyName": modified_property, "direction": "ASCENDING"}],
                "properties": properties,
                "limit": 100,
            });
            if let Some(after) = &after {
                body["after"] = json!(after);
            }
            let page: SearchPage = self
                .http
                .json(|client| {
                    client
                        .post(&url)
                        .bearer_auth(&self.params.access_token)
                        .json(&body)
                })
                .await?;
            in_query += page.results.len();
            for result in page.results {
                // A restarted query repeats the objects of its first millisecond.
                if seen.insert(text(&result, "/id").unwrap_or_default().to_string()) {
                    results.push(result);
                }
            }
            after = page
                .paging
                .as_ref()
                .and_then(|paging| text(paging, "/next/after"))
                .map(str::to_string);
            if after.is_none() {
                return Ok(results);
            }
            if in_query + 100 > SEARCH_WINDOW {
                let last = results
                    .last()
                    .and_then(|last| rfc3339(last, &format!("/properties/{modified_property}")));
                match last {
                    Some(last) if last > from => {
                        from = last;
                        after = None;
                        in_query = 0;
                    }
                    _ => {
                        return Err(self.http.protocol(format!(
                            "more than {SEARCH_WINDOW} {object} modified at the same millisecond"
                        )))
                    }
                }
            }
        }
    }

    /// The first contact associated with each deal.
    async fn deal_contacts(
        &self,
        deal_ids: &[String],
    ) -> Result<std::collections::HashMap<String, String>, ConnectError> {
        let url = format!(
            "{}/crm/v4/associations/deals/contacts/batch/read",
            base(&self.params.base_url)
        );
        let mut contacts = std::collections::HashMap::new();
        for chunk in deal_ids.chunks(100) {
            let inputs: Vec<Value> = chunk.iter().map(|id| json!({"id": id})).collect();
            let reply: Value = self
                .http
                .json(|client| {
                    client
                        .post(&url)
                        .bearer_auth(&self.params.access_token)
                        .json(&json!({"inputs": inputs}))
                })
                .await?;
            for result in reply
                .get("results")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let from = text(result, "/from/id");
                let to = result.get("to").and_then(Value::as_array).and_then(|to| {
                    to.iter()
                        .filter_map(|t| t.get("toObjectId").and_then(super::scalar))
                        .min_by_key(|id| (id.len(), id.clone()))
                });
                if let (Some(from), Some(to)) = (from, to) {
                    contacts.insert(from.to_string(), to);
                }
            }
        }
        Ok(contacts)
    }
}

impl Connector for HubSpot {
    type Params = HubSpotParams;
    const KIND: &'static str = "hubspot";
    const DESCRIPTION: &'static str =
        "HubSpot CRM: contacts -> lead.created/qualified/stage_changed, closed deals -> deal.won/lost";

    fn new(params: HubSpotParams) -> Result<HubSpot, ConnectError> {
        if params.access_token.trim().is_empty() {
            return Err(ConnectError::Config {
                key: "access_token".into(),
                message: "is empty".into(),
            });
        }
        Ok(HubSpot {
            http: Http::new("hubspot")?,
            params,
        })
    }

    async fn check(&self, _context: &RunContext) -> Result<String, ConnectError> {
        let url = format!("{}/crm/v3/objects/contacts", base(&self.params.base_url));
        let _: Value = self
            .http
            .json(|client| {
                client
                    .get(&url)
                    .bearer_auth(&self.params.access_token)
                    .query(&[("limit", "1")])
            })
            .await?;
        Ok("contacts readable with the access token".into())
    }

    async fn run(&self, context: &RunContext) -> Result<RunOutput, ConnectError> {
        let window_start = context
            .window
            .since
            .and_hms_opt(0, 0, 0)
            .unwrap_or_default()
            .and_utc();
        // From the last modification seen, minus the lookback (CRMs change records late).
        let cursor = context
            .cursor
            .as_ref()
            .and_then(|cursor| rfc3339(cursor, "/modified_after"));
        let lookback = context
            .window
            .until
            .signed_duration_since(context.window.since)
            .num_days()
            .max(0) as u64;
        let since = match cursor {
            Some(cursor) => cursor
                .checked_sub_days(Days::new(lookback))
                .unwrap_or(cursor)
                .min(window_start),
            // The first run reads the whole CRM: every lead and deal counts.
            None => DateTime::<Utc>::UNIX_EPOCH,
        };
        let mut latest = cursor.unwrap_or(since);
        let mut output = RunOutput::default();

        for contact in self
            .search("contacts", "lastmodifieddate", CONTACT_PROPERTIES, since)
            .await?
        {
            let id =
                text(&contact, "/id").ok_or_else(|| self.http.protocol("a contact without id"))?;
            let created = rfc3339(&contact, "/properties/createdate")
                .or_else(|| rfc3339(&contact, "/createdAt"))
                .ok_or_else(|| {
                    self.http
                        .protocol(format!("contact {id} without createdate"))
                })?;
            let modified = rfc3339(&contact, "/properties/lastmodifieddate")
                .or_else(|| rfc3339(&contact, "/updatedAt"))
                .unwrap_or(created);
            latest = latest.max(modified);
            let version = Some(modified.timestamp_millis().max(0) as u64);
            let source = text(&contact, "/properties/hs_analytics_source");
            let data = EventData::LeadCreated {
                lead_id: id.to_string(),
                channel: source.map(|source| channel_of_source(source).to_string()),
                campaign: source
                    .and(text(&contact, "/properties/hs_analytics_source_data_1"))
                    .map(clean_identifier),
                qualified: None,
                customer_id: None,
            };
            output.emits.push(Emit::Event {
                time: created,
                upstream_key: format!("contact:{id}:{}", crate::content_of(&data)),
                version,
                data,
            });
            if let Some(stage) =
                text(&contact, "/properties/lifecyclestage").filter(|s| !s.is_empty())
            {
                output.emits.push(Emit::Event {
                    time: modified,
                    upstream_key: format!("contact:{id}:qualified:{}", is_qualified_stage(stage)),
                    version: None,
                    data: EventData::LeadQualified {
                        lead_id: id.to_string(),
                        qualified: is_qualified_stage(stage),
                    },
                });
                output.emits.push(Emit::Event {
                    time: modified,
                    upstream_key: format!("contact:{id}:stage:{stage}"),
                    version: None,
                    data: EventData::LeadStageChanged {
                        lead_id: id.to_string(),
                        stage: clean_identifier(stage),
                    },
                });
            }
        }

        let deals = self
            .search("deals", "hs_lastmodifieddate", DEAL_PROPERTIES, since)
            .await?;
        let closed: Vec<&Value> = deals
            .iter()
            .filter(|deal| text(deal, "/properties/hs_is_closed") == Some("true"))
            .collect();
        let ids: Vec<String> = closed
            .iter()
            .filter_map(|deal| text(deal, "/id").map(str::to_string))
            .collect();
        let contacts = if ids.is_empty() {
            Default::default()
        } else {
            self.deal_contacts(&ids).await?
        };
        for deal in &deals {
            let modified = rfc3339(deal, "/properties/hs_lastmodifieddate")
                .or_else(|| rfc3339(deal, "/updatedAt"));
            if let Some(modified) = modified {
                latest = latest.max(modified);
            }
        }
        for deal in closed {
            let id = text(deal, "/id").ok_or_else(|| self.http.protocol("a deal without id"))?;
            let closed_at = rfc3339(deal, "/properties/closedate").ok_or_else(|| {
                self.http
                    .protocol(format!("closed deal {id} without closedate"))
            })?;
            let modified = rfc3339(deal, "/properties/hs_lastmodifieddate").unwrap_or(closed_at);
            let version = Some(modified.timestamp_millis().max(0) as u64);
            let contact = contacts.get(id);
            let won = text(deal, "/properties/hs_is_closed_won") == Some("true");
            let data = if won {
                let Some(contact) = contact else {
                    // SPEC needs a customer: a won deal with no contact cannot count.
                    tracing::warn!(connector = %context.connector_id, deal = id, "won deal without an associated contact: skipped");
                    continue;
                };
                let amount = text(deal, "/properties/amount")
                    .filter(|a| !a.is_empty())
                    .unwrap_or("0");
                // One deal with an amount the engine cannot take (negative, or not a number)
                // must not stop the CRM's other deals: it is left out, and said so.
                let amount = match crate::amount(amount) {
                    Ok(amount) => amount,
                    Err(error) => {
                        tracing::warn!(connector = %context.connector_id, deal = id, %error, "won deal left out");
                        continue;
                    }
                };
                EventData::DealWon {
                    deal_id: id.to_string(),
                    customer_id: contact.clone(),
                    amount,
                    currency: text(deal, "/properties/deal_currency_code")
                        .filter(|code| !code.is_empty())
                        .unwrap_or(&self.params.currency)
                        .to_string(),
                    lead_id: Some(contact.clone()),
                    channel: None,
                    campaign: None,
                }
            } else {
                EventData::DealLost {
                    deal_id: id.to_string(),
                    lead_id: contact.cloned(),
                }
            };
            output.emits.push(Emit::Event {
                time: closed_at,
                upstream_key: format!("deal:{id}:{}", crate::content_of(&data)),
                version,
                data,
            });
        }
        output.cursor = Some(json!({"modified_after": latest.to_rfc3339()}));
        Ok(output)
    }
}
