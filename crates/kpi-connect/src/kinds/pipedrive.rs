//! `pipedrive`: leads and deals from Pipedrive.
//!
//! - Leads (Leads Inbox): `GET /api/v1/leads`, paged with `start` / `limit` until the flat
//!   `additional_data.more_items_in_collection` is false, `updated_since` the cursor minus the
//!   window after the first run. A lead becomes
//!   `lead.created` at its `add_time`; its id is the lead's person (`P{person_id}`) when it has
//!   one, so that the person's deals find it; its channel is its `source_name` (`Web forms` →
//!   `web_forms`) unless `channel` maps it.
//! - Deals: `GET /api/v2/deals?updated_since=...`, paged with `cursor` /
//!   `additional_data.next_cursor`. A won deal is `deal.won` (`value`, `currency`, `won_time`,
//!   customer = person or organization), a lost one `deal.lost`; the deal's person is the lead,
//!   qualified (it reached a deal) and at the deal's stage (`GET /api/v2/stages`, names as
//!   `lead.stage_changed`).
//! - Authentication: an API token in the `x-api-token` header; 429 replies are retried after
//!   their `Retry-After`.
//!
//! Leads and deals are read incrementally: the first run reads all, later ones from the latest
//! `update_time` seen minus the window (`lookback_days`); what is read again unchanged is not
//! sent again (the runner's fingerprints). `base_url` is the company domain
//! (`https://acme.pipedrive.com`; `https://api.pipedrive.com` works too): paths are
//! `/api/v1/...` and `/api/v2/...` under it. Rate limits: a 429 is retried after its
//! `Retry-After`, or `x-ratelimit-reset` (seconds until the 2-second window resets,
//! <https://pipedrive.readme.io/docs/core-api-concepts-rate-limiting>).

use std::collections::HashMap;

use chrono::{DateTime, Days, NaiveDateTime, Utc};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use kpi_model::event::clean_identifier;
use kpi_model::EventData;

use super::{base, text};
use crate::http::Http;
use crate::{ConnectError, Connector, Emit, RunContext, RunOutput};

/// `[connectors.params]` of `pipedrive`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipedriveParams {
    /// A personal API token (Settings → Personal preferences → API).
    pub api_token: String,
    /// `https://{company}.pipedrive.com`.
    pub base_url: String,
    /// Lead `source_name` → channel, for names that should not be used as they are.
    #[serde(default)]
    pub channel: Map<String, Value>,
}

pub struct Pipedrive {
    params: PipedriveParams,
    http: Http,
}

/// Pipedrive writes times as RFC 3339 (v2, leads) or `YYYY-MM-DD HH:MM:SS` in UTC (v1).
fn time(value: &Value, pointer: &str) -> Option<DateTime<Utc>> {
    let text = text(value, pointer)?;
    DateTime::parse_from_rfc3339(text)
        .map(|time| time.with_timezone(&Utc))
        .ok()
        .or_else(|| {
            NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S")
                .ok()
                .map(|time| time.and_utc())
        })
}

fn id_text(value: &Value, pointer: &str) -> Option<String> {
    match value.pointer(pointer)? {
        // v1 sometimes nests the related object: {"value": 7, "name": "..."}.
        Value::Object(object) => object.get("value").and_then(|v| id_text(v, "")),
        other => super::scalar(other).filter(|text| !text.is_empty()),
    }
}

/// A name as a SPEC identifier: `Web forms` → `web_forms`.
fn identifier(name: &str) -> String {
    let mut out = String::new();
    for character in name.trim().chars() {
        if character.is_ascii_alphanumeric() {
            out.push(character.to_ascii_lowercase());
        } else if !out.ends_with('_') && !out.is_empty() {
            out.push('_');
        }
    }
    out.trim_end_matches('_').to_string()
}

#[derive(Deserialize)]
struct Reply {
    #[serde(default)]
    data: Option<Value>,
    #[serde(default)]
    additional_data: Option<Value>,
}

impl Pipedrive {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", base(&self.params.base_url))
    }

    async fn get(&self, path: &str, query: &[(&str, String)]) -> Result<Reply, ConnectError> {
        let url = self.url(path);
        self.http
            .json(|client| {
                client
                    .get(&url)
                    .header("x-api-token", &self.params.api_token)
                    .query(query)
            })
            .await
    }

    /// The Leads Inbox, `updated_since` when given. `GET /api/v1/leads` pages with
    /// `start`/`limit` and answers with a flat `additional_data: {start, limit,
    /// more_items_in_collection}` (<https://developers.pipedrive.com/docs/api/v1/Leads#getLeads>);
    /// the nested `additional_data.pagination` of other v1 endpoints is read too.
    async fn leads(&self, since: Option<DateTime<Utc>>) -> Result<Vec<Value>, ConnectError> {
        const LIMIT: u64 = 500;
        let mut leads = Vec::new();
        let mut start = 0u64;
        loop {
            let mut query = vec![("start", start.to_string()), ("limit", LIMIT.to_string())];
            if let Some(since) = since {
                query.push((
                    "updated_since",
                    since.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
                ));
            }
            let reply = self.get("/api/v1/leads", &query).await?;
            let count = match reply.data {
                Some(Value::Array(data)) => {
                    let count = data.len() as u64;
                    leads.extend(data);
                    count
                }
                _ => 0,
            };
            let paging = reply
                .additional_data
                .as_ref()
                .map(|data| data.get("pagination").unwrap_or(data).clone());
            let more = paging
                .as_ref()
                .and_then(|p| p.get("more_items_in_collection"))
                .and_then(Value::as_bool)
                .unwrap_or(false);
            if !more || count == 0 {
                return Ok(leads);
            }
            let next = paging
                .as_ref()
                .and_then(|p| p.get("next_start"))
                .and_then(Value::as_u64);
            let limit = paging
                .as_ref()
                .and_then(|p| p.get("limit"))
                .and_then(Value::as_u64)
                .unwrap_or(count);
            start = next.unwrap_or(start + limit.max(count));
        }
    }

    async fn deals(&self, since: DateTime<Utc>) -> Result<Vec<Value>, ConnectError> {
        let mut deals = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut query = vec![
                (
                    "updated_since",
                    since.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
                ),
                ("limit", "500".to_string()),
            ];
            if let Some(cursor) = &cursor {
                query.push(("cursor", cursor.clone()));
            }
            let reply = self.get("/api/v2/deals", &query).await?;
            if let Some(Value::Array(data)) = reply.data {
                deals.extend(data);
            }
            cursor = reply
                .additional_data
                .as_ref()
                .and_then(|data| text(data, "/next_cursor"))
                .map(str::to_string);
            if cursor.is_none() {
                return Ok(deals);
            }
        }
    }

    /// Stage names, `GET /api/v2/stages`, cursor-paged like deals.
    async fn stage_names(&self) -> Result<HashMap<String, String>, ConnectError> {
        let mut names = HashMap::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut query = vec![("limit", "500".to_string())];
            if let Some(cursor) = &cursor {
                query.push(("cursor", cursor.clone()));
            }
            let reply = self.get("/api/v2/stages", &query).await?;
            names.extend(
                reply
                    .data
                    .as_ref()
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|stage| {
                        Some((id_text(stage, "/id")?, identifier(text(stage, "/name")?)))
                    }),
            );
            cursor = reply
                .additional_data
                .as_ref()
                .and_then(|data| text(data, "/next_cursor"))
                .map(str::to_string);
            if cursor.is_none() {
                return Ok(names);
            }
        }
    }

    fn channel(&self, source: &str) -> String {
        self.params
            .channel
            .get(source)
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| identifier(source))
    }
}

impl Connector for Pipedrive {
    type Params = PipedriveParams;
    const KIND: &'static str = "pipedrive";
    const DESCRIPTION: &'static str =
        "Pipedrive CRM: leads -> lead.created, deals -> deal.won/lost, stages and qualification of their person";

    fn new(params: PipedriveParams) -> Result<Pipedrive, ConnectError> {
        if params.api_token.trim().is_empty() {
            return Err(ConnectError::Config {
                key: "api_token".into(),
                message: "is empty".into(),
            });
        }
        Ok(Pipedrive {
            http: Http::new("pipedrive")?,
            params,
        })
    }

    async fn check(&self, _context: &RunContext) -> Result<String, ConnectError> {
        let reply = self.get("/api/v1/users/me", &[]).await?;
        let user = reply.data.unwrap_or_default();
        Ok(format!(
            "signed in as {} ({})",
            text(&user, "/name").unwrap_or("?"),
            text(&user, "/company_name").unwrap_or("?")
        ))
    }

    async fn run(&self, context: &RunContext) -> Result<RunOutput, ConnectError> {
        let mut output = RunOutput::default();
        let window_days = (context.window.until - context.window.since)
            .num_days()
            .max(0) as u64;
        // From a cursor, minus the window (CRMs change records late); the first run reads all.
        let since_cursor = |name: &str| {
            context
                .cursor
                .as_ref()
                .and_then(|cursor| time(cursor, name))
                .map(|cursor| {
                    (
                        cursor,
                        cursor
                            .checked_sub_days(Days::new(window_days))
                            .unwrap_or(cursor),
                    )
                })
        };
        let leads_cursor = since_cursor("/leads_updated_after");
        let mut latest_lead = leads_cursor.map(|(cursor, _)| cursor);
        for lead in self.leads(leads_cursor.map(|(_, since)| since)).await? {
            if let Some(updated) = time(&lead, "/update_time") {
                latest_lead = Some(latest_lead.map_or(updated, |latest| latest.max(updated)));
            }
            let Some(id) = id_text(&lead, "/id") else {
                continue;
            };
            let Some(created) = time(&lead, "/add_time") else {
                continue;
            };
            let lead_id = id_text(&lead, "/person_id")
                .map(|person| format!("P{person}"))
                .unwrap_or(id.clone());
            let data = EventData::LeadCreated {
                lead_id,
                channel: text(&lead, "/source_name").map(|source| self.channel(source)),
                campaign: None,
                qualified: None,
                customer_id: None,
            };
            output.emits.push(Emit::Event {
                time: created,
                upstream_key: format!("lead:{id}:{}", crate::content_of(&data)),
                version: None,
                data,
            });
        }

        let deals_cursor = since_cursor("/updated_after");
        let cursor = deals_cursor.map(|(cursor, _)| cursor);
        let since = deals_cursor.map_or(DateTime::<Utc>::UNIX_EPOCH, |(_, since)| since);
        let deals = self.deals(since).await?;
        let stages = if deals.is_empty() {
            HashMap::new()
        } else {
            self.stage_names().await?
        };
        let mut latest = cursor.unwrap_or(since);
        for deal in &deals {
            let Some(id) = id_text(deal, "/id") else {
                continue;
            };
            let updated = time(deal, "/update_time");
            if let Some(updated) = updated {
                latest = latest.max(updated);
            }
            let version = updated.map(|time| time.timestamp_millis().max(0) as u64);
            let person = id_text(deal, "/person_id").map(|person| format!("P{person}"));
            if let Some(lead_id) = &person {
                let reached = updated
                    .or_else(|| time(deal, "/add_time"))
                    .unwrap_or(context.now);
                output.emits.push(Emit::Event {
                    time: reached,
                    upstream_key: format!("person:{lead_id}:qualified"),
                    version: None,
                    data: EventData::LeadQualified {
                        lead_id: lead_id.clone(),
                        qualified: true,
                    },
                });
                if let Some(stage) = id_text(deal, "/stage_id").and_then(|stage| stages.get(&stage))
                {
                    output.emits.push(Emit::Event {
                        time: reached,
                        upstream_key: format!("person:{lead_id}:stage:{stage}"),
                        version: None,
                        data: EventData::LeadStageChanged {
                            lead_id: lead_id.clone(),
                            stage: clean_identifier(stage),
                        },
                    });
                }
            }
            let deal_id = format!("pd-{id}");
            let (data, at, upstream_key) = match text(deal, "/status") {
                Some("won") => {
                    let customer = person
                        .clone()
                        .or_else(|| id_text(deal, "/org_id").map(|org| format!("O{org}")));
                    let (Some(customer), Some(won_at)) = (customer, time(deal, "/won_time")) else {
                        tracing::warn!(connector = %context.connector_id, deal = %id, "won deal without a person, organization or won_time: skipped");
                        continue;
                    };
                    let value = deal
                        .get("value")
                        .and_then(super::scalar)
                        .unwrap_or_else(|| "0".into());
                    // One deal with a value the engine cannot take (negative, or not a
                    // number) must not stop the CRM's other deals: it is left out, and said so.
                    let amount = match crate::amount(&value) {
                        Ok(amount) => amount,
                        Err(error) => {
                            tracing::warn!(connector = %context.connector_id, deal = %id, %error, "won deal left out");
                            continue;
                        }
                    };
                    let data = EventData::DealWon {
                        deal_id,
                        customer_id: customer,
                        amount,
                        currency: text(deal, "/currency").unwrap_or("EUR").to_string(),
                        lead_id: person.clone(),
                        channel: None,
                        campaign: None,
                    };
                    let key = format!("deal:{id}:{}", crate::content_of(&data));
                    (data, won_at, key)
                }
                Some("lost") | Some("deleted") => {
                    let lost_at = time(deal, "/lost_time").or(updated).unwrap_or(context.now);
                    let data = EventData::DealLost {
                        deal_id,
                        lead_id: person.clone(),
                    };
                    (data, lost_at, format!("deal:{id}:lost"))
                }
                _ => continue,
            };
            output.emits.push(Emit::Event {
                time: at,
                upstream_key,
                version,
                data,
            });
        }
        let mut next = json!({"updated_after": latest.to_rfc3339()});
        if let Some(latest_lead) = latest_lead {
            next["leads_updated_after"] = json!(latest_lead.to_rfc3339());
        }
        output.cursor = Some(next);
        Ok(output)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_identifiers() {
        assert_eq!(identifier("Web forms"), "web_forms");
        assert_eq!(identifier("  Proposal Made! "), "proposal_made");
        assert_eq!(identifier("LeadBooster"), "leadbooster");
    }

    #[test]
    fn both_time_formats_parse() {
        let value = json!({"a": "2026-01-04T10:44:11Z", "b": "2026-01-04 10:44:11"});
        assert_eq!(time(&value, "/a"), time(&value, "/b"));
        assert!(time(&value, "/a").is_some());
    }
}
