//! `meta_ads`: daily spend (and lead actions) per campaign from the Meta Marketing API.
//!
//! An asynchronous insights report: `POST {base_url}/{api_version}/act_{ad_account_id}/insights`
//! (`level=campaign`, `time_increment=1`, `time_range`) returns a `report_run_id`; the run polls
//! `GET /{report_run_id}` until `async_status` is `Job Completed` (fails on `Job Failed` /
//! `Job Skipped`), then reads `GET /{report_run_id}/insights`, following `paging.next`.
//! Each row becomes a `spend.reported` line (channel `social`, the account currency); with
//! `emit_leads`, the `lead` action count of a campaign-day becomes that many `lead.created`
//! events with ids derived from the campaign, the day and the rank (a count that grows adds
//! leads; one that shrinks removes none).
//!
//! Meta reports errors in the body: code 190 is an invalid or expired token, codes 4, 17, 32,
//! 613 and 80000-80014 are rate limits (HTTP 400 or 403), both handled as such.

use std::time::Duration;

use chrono::{NaiveDate, NaiveTime};
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::{json, Value};

use kpi_model::event::SpendCategory;
use kpi_model::EventData;

use super::{base, text};
use crate::http::{Http, Verdict};
use crate::{ConnectError, Connector, Coverage, Emit, RunContext, RunOutput, SpendLine};

/// `[connectors.params]` of `meta_ads`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetaAdsParams {
    /// The ad account id, with or without `act_`.
    pub ad_account_id: String,
    /// A system-user access token with `ads_read`.
    pub access_token: String,
    #[serde(default = "default_base_url")]
    pub base_url: String,
    #[serde(default = "default_api_version")]
    pub api_version: String,
    #[serde(default = "default_channel")]
    pub channel: String,
    /// Emit `lead.created` events from the `lead` actions.
    #[serde(default = "default_true")]
    pub emit_leads: bool,
    /// Seconds between two polls of the report run.
    #[serde(default = "default_poll_interval_s")]
    pub poll_interval_s: u64,
    /// Longest wait for the report run.
    #[serde(default = "default_report_timeout_s")]
    pub report_timeout_s: u64,
}

fn default_base_url() -> String {
    "https://graph.facebook.com".into()
}
/// The newest version the platform supports (see [`crate::versions`]).
fn default_api_version() -> String {
    crate::versions::default_version(<MetaAds as Connector>::KIND)
        .unwrap_or_default()
        .into()
}
fn default_channel() -> String {
    "social".into()
}
fn default_true() -> bool {
    true
}
fn default_poll_interval_s() -> u64 {
    5
}
fn default_report_timeout_s() -> u64 {
    900
}

pub struct MetaAds {
    params: MetaAdsParams,
    account: String,
    http: Http,
}

fn classify(_status: StatusCode, body: &str) -> Option<Verdict> {
    let value: Value = serde_json::from_str(body).ok()?;
    let code = value.pointer("/error/code")?.as_i64()?;
    match code {
        190 | 102 => Some(Verdict::Unauthorized),
        4 | 17 | 32 | 613 | 80_000..=80_014 => Some(Verdict::RateLimited),
        1 | 2 => Some(Verdict::Transient),
        _ => None,
    }
}

#[derive(Deserialize)]
struct Page {
    #[serde(default)]
    data: Vec<Value>,
    #[serde(default)]
    paging: Option<Value>,
}

impl MetaAds {
    fn url(&self, path: &str) -> String {
        format!(
            "{}/{}/{path}",
            base(&self.params.base_url),
            self.params.api_version
        )
    }

    async fn report_rows(
        &self,
        since: NaiveDate,
        until: NaiveDate,
    ) -> Result<Vec<Value>, ConnectError> {
        let time_range =
            json!({"since": since.to_string(), "until": until.to_string()}).to_string();
        let started: Value = self
            .http
            .json(|client| {
                client.post(self.url(&format!("{}/insights", self.account))).form(&[
                    ("level", "campaign"),
                    ("time_increment", "1"),
                    ("time_range", time_range.as_str()),
                    ("fields", "campaign_id,campaign_name,spend,account_currency,actions,date_start,date_stop"),
                    ("access_token", self.params.access_token.as_str()),
                ])
            })
            .await?;
        let run_id = text(&started, "/report_run_id")
            .ok_or_else(|| self.http.protocol("no report_run_id"))?
            .to_string();
        let deadline =
            std::time::Instant::now() + Duration::from_secs(self.params.report_timeout_s);
        loop {
            let status: Value = self
                .http
                .json(|client| {
                    client
                        .get(self.url(&run_id))
                        .query(&[("access_token", self.params.access_token.as_str())])
                })
                .await?;
            match text(&status, "/async_status") {
                Some("Job Completed") => break,
                Some(failed @ ("Job Failed" | "Job Skipped")) => {
                    return Err(ConnectError::Transient {
                        service: "meta_ads".into(),
                        message: format!("report run {run_id}: {failed}"),
                    })
                }
                _ if std::time::Instant::now() > deadline => {
                    return Err(ConnectError::Transient {
                        service: "meta_ads".into(),
                        message: format!(
                            "report run {run_id} not done after {} s",
                            self.params.report_timeout_s
                        ),
                    })
                }
                _ => tokio::time::sleep(Duration::from_secs(self.params.poll_interval_s)).await,
            }
        }
        let mut rows = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let page: Page = match &next {
                None => {
                    self.http
                        .json(|client| {
                            client.get(self.url(&format!("{run_id}/insights"))).query(&[
                                ("access_token", self.params.access_token.as_str()),
                                ("limit", "500"),
                            ])
                        })
                        .await?
                }
                // `paging.next` is a complete URL (with the token and the cursor).
                Some(url) => self.http.json(|client| client.get(url)).await?,
            };
            rows.extend(page.data);
            next = page
                .paging
                .as_ref()
                .and_then(|paging| text(paging, "/next"))
                .map(str::to_string);
            if next.is_none() {
                return Ok(rows);
            }
        }
    }
}

impl Connector for MetaAds {
    type Params = MetaAdsParams;
    const KIND: &'static str = "meta_ads";
    const DESCRIPTION: &'static str =
        "Meta (Facebook, Instagram) ads: async insights per campaign-day -> spend.reported, lead actions -> lead.created";

    fn new(params: MetaAdsParams) -> Result<MetaAds, ConnectError> {
        let id = params.ad_account_id.trim_start_matches("act_");
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
            return Err(ConnectError::Config {
                key: "ad_account_id".into(),
                message: "must be the numeric ad account id (act_ optional)".into(),
            });
        }
        Ok(MetaAds {
            account: format!("act_{id}"),
            http: Http::new("meta_ads")?.with_classifier(classify),
            params,
        })
    }

    fn api_version(&self) -> Option<&str> {
        Some(&self.params.api_version)
    }

    async fn check(&self, _context: &RunContext) -> Result<String, ConnectError> {
        let account: Value = self
            .http
            .json(|client| {
                client.get(self.url(&self.account)).query(&[
                    ("fields", "name,currency,account_status"),
                    ("access_token", self.params.access_token.as_str()),
                ])
            })
            .await?;
        Ok(format!(
            "ad account {} `{}` ({})",
            self.account,
            text(&account, "/name").unwrap_or(""),
            text(&account, "/currency").unwrap_or("?")
        ))
    }

    async fn run(&self, context: &RunContext) -> Result<RunOutput, ConnectError> {
        let rows = self
            .report_rows(context.window.since, context.window.until)
            .await?;
        // The insights report covers every campaign-day with delivery in the window.
        let mut output = RunOutput {
            coverage: vec![Coverage::Window],
            ..RunOutput::default()
        };
        for row in rows {
            let date = text(&row, "/date_start")
                .and_then(|date| NaiveDate::parse_from_str(date, "%Y-%m-%d").ok())
                .ok_or_else(|| self.http.protocol("a row without date_start"))?;
            let campaign = text(&row, "/campaign_name")
                .ok_or_else(|| self.http.protocol("a row without campaign_name"))?;
            let campaign_id = text(&row, "/campaign_id").unwrap_or(campaign);
            let currency = text(&row, "/account_currency")
                .ok_or_else(|| self.http.protocol("a row without account_currency"))?;
            let campaign = kpi_model::event::clean_identifier(campaign);
            let spend = row
                .get("spend")
                .and_then(super::scalar)
                .unwrap_or_else(|| "0".into());
            output.emits.push(Emit::Spend(SpendLine {
                date,
                amount: crate::amount(&spend).map_err(|error| self.http.protocol(error))?,
                currency: currency.to_string(),
                channel: Some(self.params.channel.clone()),
                campaign: Some(campaign.clone()),
                category: SpendCategory::Media,
                source: "meta_ads".into(),
                account: Some(self.account.clone()),
                reported_at: None,
                group: None,
            }));
            if !self.params.emit_leads {
                continue;
            }
            let leads = row
                .get("actions")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter(|action| text(action, "/action_type") == Some("lead"))
                .filter_map(|action| text(action, "/value").and_then(|v| v.parse::<u64>().ok()))
                .sum::<u64>();
            let time = date
                .and_time(NaiveTime::from_hms_opt(12, 0, 0).unwrap_or_default())
                .and_utc();
            for rank in 1..=leads {
                let lead_id = format!("meta-{campaign_id}-{date}-{rank}");
                output.emits.push(Emit::Event {
                    time,
                    upstream_key: lead_id.clone(),
                    version: None,
                    data: EventData::LeadCreated {
                        lead_id,
                        channel: Some(self.params.channel.clone()),
                        campaign: Some(campaign.clone()),
                        qualified: None,
                        customer_id: None,
                    },
                });
            }
        }
        Ok(output)
    }
}
