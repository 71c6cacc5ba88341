//! `google_ads`: daily cost per campaign from the Google Ads API.
//!
//! One `POST {base_url}/{api_version}/customers/{customer_id}/googleAds:searchStream` with the
//! GAQL query below; the reply is a JSON array of batches, each with `results`. Authentication:
//! an OAuth access token minted from a refresh token (`Authorization: Bearer`), the
//! `developer-token` header, and `login-customer-id` when the account is reached through a
//! manager account. Each row becomes a `spend.reported` line: channel `paid_search` (or
//! `channel`), campaign name, the account's currency, `metrics.cost_micros / 10^6`.

use std::collections::BTreeMap;

use chrono::NaiveDate;
use serde::Deserialize;
use serde_json::{json, Value};

use kpi_model::event::SpendCategory;

use super::oauth::RefreshToken;
use super::{base, text};
use crate::http::Http;
use crate::{
    micros_to_decimal, ConnectError, Connector, Coverage, Emit, RunContext, RunOutput, SpendLine,
};

/// `[connectors.params]` of `google_ads`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GoogleAdsParams {
    /// The advertiser account, `1234567890` (dashes allowed).
    pub customer_id: String,
    /// The manager account the credentials belong to, when there is one.
    #[serde(default)]
    pub login_customer_id: Option<String>,
    /// The API developer token of your Google Ads manager account.
    pub developer_token: String,
    /// OAuth client of a Google Cloud project with the Google Ads API enabled.
    pub client_id: String,
    pub client_secret: String,
    /// A refresh token for a user with access to the account (scope `adwords`).
    pub refresh_token: String,
    #[serde(default = "default_base_url")]
    pub base_url: String,
    #[serde(default = "default_token_url")]
    pub token_url: String,
    #[serde(default = "default_api_version")]
    pub api_version: String,
    #[serde(default = "default_channel")]
    pub channel: String,
}

fn default_base_url() -> String {
    "https://googleads.googleapis.com".into()
}
fn default_token_url() -> String {
    "https://oauth2.googleapis.com/token".into()
}
/// The newest version the platform supports (see [`crate::versions`]).
fn default_api_version() -> String {
    crate::versions::default_version(<GoogleAds as Connector>::KIND)
        .unwrap_or_default()
        .into()
}
fn default_channel() -> String {
    "paid_search".into()
}

pub struct GoogleAds {
    params: GoogleAdsParams,
    customer_id: String,
    login_customer_id: Option<String>,
    oauth: RefreshToken,
    http: Http,
}

impl GoogleAds {
    /// Runs a GAQL query through `searchStream`, refreshing the access token once if the API
    /// refuses it; returns every row of every batch.
    async fn search_stream(&self, query: &str) -> Result<Vec<Value>, ConnectError> {
        let url = format!(
            "{}/{}/customers/{}/googleAds:searchStream",
            base(&self.params.base_url),
            self.params.api_version,
            self.customer_id
        );
        let batches: Vec<Value> = self
            .oauth
            .call(&self.http, |token| {
                let url = &url;
                async move {
                    self.http
                        .json(|client| {
                            let mut request = client
                                .post(url)
                                .bearer_auth(&token)
                                .header("developer-token", &self.params.developer_token)
                                .json(&json!({ "query": query }));
                            if let Some(login) = &self.login_customer_id {
                                request = request.header("login-customer-id", login);
                            }
                            request
                        })
                        .await
                }
            })
            .await?;
        let mut rows = Vec::new();
        for batch in batches {
            if let Some(Value::Array(results)) = batch.get("results") {
                rows.extend(results.iter().cloned());
            }
        }
        Ok(rows)
    }
}

fn digits(id: &str) -> String {
    id.chars().filter(char::is_ascii_digit).collect()
}

impl Connector for GoogleAds {
    type Params = GoogleAdsParams;
    const KIND: &'static str = "google_ads";
    const DESCRIPTION: &'static str =
        "Google Ads: daily cost per campaign (searchStream, OAuth refresh token) -> spend.reported";

    fn new(params: GoogleAdsParams) -> Result<GoogleAds, ConnectError> {
        let customer_id = digits(&params.customer_id);
        if customer_id.len() != 10 {
            return Err(ConnectError::Config {
                key: "customer_id".into(),
                message: "must be the 10-digit account id".into(),
            });
        }
        let login_customer_id = params.login_customer_id.as_deref().map(digits);
        let oauth = RefreshToken::new(
            params.token_url.clone(),
            params.client_id.clone(),
            params.client_secret.clone(),
            params.refresh_token.clone(),
        );
        Ok(GoogleAds {
            customer_id,
            login_customer_id,
            oauth,
            http: Http::new("google_ads")?,
            params,
        })
    }

    fn api_version(&self) -> Option<&str> {
        Some(&self.params.api_version)
    }

    async fn check(&self, _context: &RunContext) -> Result<String, ConnectError> {
        let rows = self
            .search_stream(
                "SELECT customer.id, customer.descriptive_name, customer.currency_code FROM customer LIMIT 1",
            )
            .await?;
        let row = rows
            .first()
            .ok_or_else(|| self.http.protocol("no customer row"))?;
        Ok(format!(
            "account {} `{}` ({})",
            self.customer_id,
            text(row, "/customer/descriptiveName").unwrap_or(""),
            text(row, "/customer/currencyCode").unwrap_or("?")
        ))
    }

    async fn run(&self, context: &RunContext) -> Result<RunOutput, ConnectError> {
        let query = format!(
            "SELECT customer.currency_code, campaign.id, campaign.name, metrics.cost_micros, segments.date \
             FROM campaign WHERE segments.date BETWEEN '{}' AND '{}'",
            context.window.since, context.window.until
        );
        let rows = self.search_stream(&query).await?;
        // Campaign names are the SPEC's campaign identity: two campaigns of one name add up.
        let mut lines: BTreeMap<(String, NaiveDate), (i64, String)> = BTreeMap::new();
        for row in &rows {
            let date = text(row, "/segments/date")
                .and_then(|date| NaiveDate::parse_from_str(date, "%Y-%m-%d").ok())
                .ok_or_else(|| self.http.protocol("a row without segments.date"))?;
            let campaign = text(row, "/campaign/name")
                .ok_or_else(|| self.http.protocol("a row without campaign.name"))?;
            let currency = text(row, "/customer/currencyCode")
                .ok_or_else(|| self.http.protocol("a row without customer.currencyCode"))?;
            // int64 fields are JSON strings in the REST API; an absent one is zero.
            let micros = match row.pointer("/metrics/costMicros") {
                None => 0,
                Some(Value::String(text)) => text
                    .parse::<i64>()
                    .map_err(|_| self.http.protocol(format!("costMicros `{text}`")))?,
                Some(Value::Number(number)) => number
                    .as_i64()
                    .ok_or_else(|| self.http.protocol(format!("costMicros {number}")))?,
                Some(other) => return Err(self.http.protocol(format!("costMicros {other}"))),
            };
            let entry = lines
                .entry((kpi_model::event::clean_identifier(campaign), date))
                .or_insert((0, currency.to_string()));
            entry.0 = entry.0.saturating_add(micros);
        }
        let emits = lines
            .into_iter()
            .map(|((campaign, date), (micros, currency))| {
                Emit::Spend(SpendLine {
                    date,
                    amount: micros_to_decimal(micros),
                    currency,
                    channel: Some(self.params.channel.clone()),
                    campaign: Some(campaign),
                    category: SpendCategory::Media,
                    source: "google_ads".into(),
                    account: Some(self.customer_id.clone()),
                    reported_at: None,
                    group: None,
                })
            })
            .collect();
        // The report holds every campaign-day with a cost in the window: a day it leaves out
        // (zero metrics) cost nothing.
        Ok(RunOutput {
            emits,
            cursor: None,
            coverage: vec![Coverage::Window],
        })
    }
}
