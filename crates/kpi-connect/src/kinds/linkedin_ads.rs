//! `linkedin_ads`: daily cost per campaign from the LinkedIn Marketing API.
//!
//! `GET {base_url}/rest/adAnalytics?q=analytics&pivot=CAMPAIGN&timeGranularity=DAILY&dateRange=
//! (start:(year:Y,month:M,day:D),end:(...))&accounts=List(urn:li:sponsoredAccount:ID)&fields=
//! costInLocalCurrency,dateRange,pivotValues` (Rest.li 2.0 syntax, `LinkedIn-Version` header);
//! campaign names from `GET /rest/adAccounts/{id}/adCampaigns?q=search` (paged with
//! `pageToken` / `metadata.nextPageToken`), the currency from `GET /rest/adAccounts/{id}`.
//! Authentication: an OAuth access token minted from a refresh token (LinkedIn's refresh tokens
//! last a year), `Authorization: Bearer`. Rows become `spend.reported` lines (channel `social`,
//! source `linkedin_ads`).

use std::collections::{BTreeMap, HashMap};

use chrono::{Datelike, NaiveDate};
use serde::Deserialize;
use serde_json::Value;

use kpi_model::event::SpendCategory;

use super::oauth::RefreshToken;
use super::{base, text};
use crate::http::Http;
use crate::{ConnectError, Connector, Coverage, Emit, RunContext, RunOutput, SpendLine};

/// `[connectors.params]` of `linkedin_ads`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkedInAdsParams {
    /// The sponsored ad account id (digits).
    pub ad_account_id: String,
    /// OAuth app credentials and a refresh token with `r_ads_reporting` and `r_ads`.
    pub client_id: String,
    pub client_secret: String,
    pub refresh_token: String,
    #[serde(default = "default_base_url")]
    pub base_url: String,
    #[serde(default = "default_token_url")]
    pub token_url: String,
    /// The `LinkedIn-Version` header (YYYYMM).
    #[serde(default = "default_version")]
    pub api_version: String,
    #[serde(default = "default_channel")]
    pub channel: String,
}

fn default_base_url() -> String {
    "https://api.linkedin.com".into()
}
fn default_token_url() -> String {
    "https://www.linkedin.com/oauth/v2/accessToken".into()
}
/// The newest version the platform supports (see [`crate::versions`]).
fn default_version() -> String {
    crate::versions::default_version(<LinkedInAds as Connector>::KIND)
        .unwrap_or_default()
        .into()
}
fn default_channel() -> String {
    "social".into()
}

pub struct LinkedInAds {
    params: LinkedInAdsParams,
    oauth: RefreshToken,
    http: Http,
}

impl LinkedInAds {
    /// GET with the headers LinkedIn's versioned API needs; refreshes the token once on 401.
    async fn get(&self, path_and_query: &str) -> Result<Value, ConnectError> {
        let url = format!("{}{path_and_query}", base(&self.params.base_url));
        self.oauth
            .call(&self.http, |token| {
                let url = &url;
                async move {
                    self.http
                        .json(|client| {
                            client
                                .get(url)
                                .bearer_auth(&token)
                                .header("LinkedIn-Version", &self.params.api_version)
                                .header("X-Restli-Protocol-Version", "2.0.0")
                        })
                        .await
                }
            })
            .await
    }

    async fn campaign_names(&self) -> Result<HashMap<String, String>, ConnectError> {
        let mut names = HashMap::new();
        let mut page_token: Option<String> = None;
        loop {
            let mut path = format!(
                "/rest/adAccounts/{}/adCampaigns?q=search&pageSize=1000",
                self.params.ad_account_id
            );
            if let Some(token) = &page_token {
                path.push_str(&format!("&pageToken={token}"));
            }
            let reply = self.get(&path).await?;
            for campaign in reply
                .get("elements")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let Some(id) = campaign.get("id").and_then(super::scalar) else {
                    continue;
                };
                if let Some(name) = text(campaign, "/name") {
                    names.insert(format!("urn:li:sponsoredCampaign:{id}"), name.to_string());
                }
            }
            page_token = text(&reply, "/metadata/nextPageToken")
                .filter(|token| !token.is_empty())
                .map(str::to_string);
            if page_token.is_none() {
                return Ok(names);
            }
        }
    }
}

fn date_of(value: &Value) -> Option<NaiveDate> {
    let part = |name: &str| value.get(name).and_then(Value::as_u64);
    NaiveDate::from_ymd_opt(
        part("year")? as i32,
        part("month")? as u32,
        part("day")? as u32,
    )
}

fn rest_li_date(date: NaiveDate) -> String {
    format!(
        "(year:{},month:{},day:{})",
        date.year(),
        date.month(),
        date.day()
    )
}

impl Connector for LinkedInAds {
    type Params = LinkedInAdsParams;
    const KIND: &'static str = "linkedin_ads";
    const DESCRIPTION: &'static str =
        "LinkedIn ads: adAnalytics per campaign-day (costInLocalCurrency) -> spend.reported";

    fn new(params: LinkedInAdsParams) -> Result<LinkedInAds, ConnectError> {
        if params.ad_account_id.is_empty()
            || !params.ad_account_id.chars().all(|c| c.is_ascii_digit())
        {
            return Err(ConnectError::Config {
                key: "ad_account_id".into(),
                message: "must be the numeric ad account id".into(),
            });
        }
        let oauth = RefreshToken::new(
            params.token_url.clone(),
            params.client_id.clone(),
            params.client_secret.clone(),
            params.refresh_token.clone(),
        );
        Ok(LinkedInAds {
            oauth,
            http: Http::new("linkedin_ads")?,
            params,
        })
    }

    fn api_version(&self) -> Option<&str> {
        Some(&self.params.api_version)
    }

    async fn check(&self, _context: &RunContext) -> Result<String, ConnectError> {
        let account = self
            .get(&format!("/rest/adAccounts/{}", self.params.ad_account_id))
            .await?;
        Ok(format!(
            "ad account {} `{}` ({})",
            self.params.ad_account_id,
            text(&account, "/name").unwrap_or(""),
            text(&account, "/currency").unwrap_or("?")
        ))
    }

    async fn run(&self, context: &RunContext) -> Result<RunOutput, ConnectError> {
        let account = self
            .get(&format!("/rest/adAccounts/{}", self.params.ad_account_id))
            .await?;
        let currency = text(&account, "/currency")
            .ok_or_else(|| self.http.protocol("the ad account has no currency"))?
            .to_string();
        let names = self.campaign_names().await?;
        let path = format!(
            "/rest/adAnalytics?q=analytics&pivot=CAMPAIGN&timeGranularity=DAILY&dateRange=(start:{},end:{})&accounts=List(urn%3Ali%3AsponsoredAccount%3A{})&fields=costInLocalCurrency,dateRange,pivotValues",
            rest_li_date(context.window.since),
            rest_li_date(context.window.until),
            self.params.ad_account_id
        );
        let reply = self.get(&path).await?;
        // Several campaigns may share a name: their costs add up (SPEC keys campaigns by name).
        let mut lines: BTreeMap<(String, NaiveDate), Vec<String>> = BTreeMap::new();
        for element in reply
            .get("elements")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let date = element
                .pointer("/dateRange/start")
                .and_then(date_of)
                .ok_or_else(|| self.http.protocol("an element without dateRange.start"))?;
            let urn = text(element, "/pivotValues/0")
                .ok_or_else(|| self.http.protocol("an element without pivotValues"))?;
            let campaign = kpi_model::event::clean_identifier(
                names.get(urn).map(String::as_str).unwrap_or(urn),
            );
            let cost = element
                .get("costInLocalCurrency")
                .and_then(super::scalar)
                .unwrap_or_else(|| "0".into());
            lines.entry((campaign, date)).or_default().push(cost);
        }
        // adAnalytics returns every campaign-day with activity: one it leaves out cost nothing.
        let mut output = RunOutput {
            coverage: vec![Coverage::Window],
            ..RunOutput::default()
        };
        for ((campaign, date), costs) in lines {
            output.emits.push(Emit::Spend(SpendLine {
                date,
                amount: crate::sum_amounts(&costs).map_err(|error| self.http.protocol(error))?,
                currency: currency.clone(),
                channel: Some(self.params.channel.clone()),
                campaign: Some(campaign),
                category: SpendCategory::Media,
                source: "linkedin_ads".into(),
                account: Some(self.params.ad_account_id.clone()),
                reported_at: None,
                group: None,
            }));
        }
        Ok(output)
    }
}
