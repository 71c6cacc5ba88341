//! `mailchimp`: campaigns sent and new subscribers from the Mailchimp Marketing API 3.0.
//!
//! - Campaigns: `GET /3.0/reports?since_send_time=&before_send_time=`, paged with `count` /
//!   `offset` up to `total_items`; each sent campaign costs `cost_per_campaign` (see
//!   [`super::emailing`]); the plan costs `monthly_plan_price`.
//! - Subscribers: `GET /3.0/lists/{list_id}/members?status=subscribed&since_timestamp_opt=`,
//!   paged the same way; each is a `lead.created` (channel `email`, campaign
//!   `lead_campaign` when set) at its opt-in time.
//! - Authentication: the API key with HTTP basic auth; the data centre is the key's suffix
//!   (`...-us21` → `https://us21.api.mailchimp.com`).

use chrono::NaiveDate;
use serde::Deserialize;
use serde_json::Value;

use super::emailing::EmailingCost;
use super::{base, offset_pages, page_items, rfc3339, text};
use kpi_model::EventData;

use crate::http::Http;
use crate::{ConnectError, Connector, Coverage, Emit, RunContext, RunOutput};

/// `[connectors.params]` of `mailchimp`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MailchimpParams {
    /// An API key (Profile → Extras → API keys), ending in its data centre: `...-us21`.
    pub api_key: String,
    /// The audience whose new subscribers are leads; no leads when absent.
    #[serde(default)]
    pub list_id: Option<String>,
    /// The campaign new subscribers count under.
    #[serde(default)]
    pub lead_campaign: Option<String>,
    /// Default `https://{dc}.api.mailchimp.com`.
    #[serde(default)]
    pub base_url: Option<String>,
    /// The subscription's price per month, e.g. `"59.00"` (see the README).
    #[serde(default)]
    pub monthly_plan_price: Option<String>,
    /// A cost per campaign sent, e.g. `"12.50"`.
    #[serde(default)]
    pub cost_per_campaign: Option<String>,
    /// The currency of those prices.
    #[serde(default = "default_currency")]
    pub currency: String,
}

fn default_currency() -> String {
    "EUR".into()
}

pub struct Mailchimp {
    params: MailchimpParams,
    cost: EmailingCost,
    base_url: String,
    http: Http,
}

impl Mailchimp {
    /// Every item of a paged collection (`count` / `offset`, `total_items`).
    async fn collect(
        &self,
        path: &str,
        field: &str,
        query: &[(&str, String)],
    ) -> Result<Vec<Value>, ConnectError> {
        let url = format!("{}/3.0{path}", base(&self.base_url));
        offset_pages(|offset| {
            let mut page_query = query.to_vec();
            page_query.push(("count", "1000".into()));
            page_query.push(("offset", offset.to_string()));
            let url = &url;
            async move {
                let page: Value = self
                    .http
                    .json(|client| {
                        client
                            .get(url)
                            .basic_auth("kpi-engine", Some(&self.params.api_key))
                            .query(&page_query)
                    })
                    .await?;
                Ok(page_items(&page, field, "total_items"))
            }
        })
        .await
    }
}

impl Connector for Mailchimp {
    type Params = MailchimpParams;
    const KIND: &'static str = "mailchimp";
    const DESCRIPTION: &'static str =
        "Mailchimp: plan and campaign costs -> spend.reported (email), new subscribers -> lead.created";

    fn new(params: MailchimpParams) -> Result<Mailchimp, ConnectError> {
        let cost = EmailingCost {
            monthly_plan_price: params.monthly_plan_price.clone(),
            cost_per_campaign: params.cost_per_campaign.clone(),
            currency: params.currency.clone(),
        };
        cost.validate()?;
        let base_url = match &params.base_url {
            Some(url) => url.clone(),
            None => {
                let data_centre = params
                    .api_key
                    .rsplit_once('-')
                    .map(|(_, dc)| dc)
                    .filter(|dc| !dc.is_empty() && dc.chars().all(|c| c.is_ascii_alphanumeric()))
                    .ok_or_else(|| ConnectError::Config {
                        key: "api_key".into(),
                        message: "does not end in its data centre (e.g. -us21)".into(),
                    })?;
                format!("https://{data_centre}.api.mailchimp.com")
            }
        };
        Ok(Mailchimp {
            base_url,
            cost,
            http: Http::new("mailchimp")?,
            params,
        })
    }

    async fn check(&self, _context: &RunContext) -> Result<String, ConnectError> {
        let url = format!("{}/3.0/", base(&self.base_url));
        let account: Value = self
            .http
            .json(|client| {
                client
                    .get(&url)
                    .basic_auth("kpi-engine", Some(&self.params.api_key))
            })
            .await?;
        Ok(format!(
            "account `{}`",
            text(&account, "/account_name").unwrap_or("?")
        ))
    }

    async fn run(&self, context: &RunContext) -> Result<RunOutput, ConnectError> {
        let since = context
            .window
            .since
            .and_hms_opt(0, 0, 0)
            .unwrap_or_default()
            .and_utc();
        let until = context
            .window
            .until
            .succ_opt()
            .unwrap_or(context.window.until)
            .and_hms_opt(0, 0, 0)
            .unwrap_or_default()
            .and_utc();
        let account = "mailchimp";
        // The plan's and the campaigns' lines of the window's days are all computed or read
        // each run: a campaign that is gone withdraws its cost.
        let mut output = RunOutput {
            coverage: vec![Coverage::Window],
            ..RunOutput::default()
        };
        output
            .emits
            .extend(self.cost.plan_lines(context.window, "mailchimp", account));
        if self.cost.cost_per_campaign.is_some() {
            let reports = self
                .collect(
                    "/reports",
                    "reports",
                    &[
                        ("since_send_time", since.to_rfc3339()),
                        ("before_send_time", until.to_rfc3339()),
                    ],
                )
                .await?;
            for report in reports {
                let (Some(sent), Some(title)) = (
                    rfc3339(&report, "/send_time"),
                    text(&report, "/campaign_title"),
                ) else {
                    continue;
                };
                let date: NaiveDate = sent.date_naive();
                output
                    .emits
                    .extend(self.cost.campaign_line(date, title, "mailchimp", account));
            }
        }
        if let Some(list_id) = &self.params.list_id {
            let members = self
                .collect(
                    &format!("/lists/{list_id}/members"),
                    "members",
                    &[
                        ("status", "subscribed".into()),
                        ("since_timestamp_opt", since.to_rfc3339()),
                    ],
                )
                .await?;
            for member in members {
                let Some(id) = text(&member, "/id") else {
                    continue;
                };
                let Some(opted_in) = rfc3339(&member, "/timestamp_opt")
                    .or_else(|| rfc3339(&member, "/timestamp_signup"))
                else {
                    continue;
                };
                let data = EventData::LeadCreated {
                    lead_id: format!("mc-{id}"),
                    channel: Some("email".into()),
                    campaign: self.params.lead_campaign.clone(),
                    qualified: None,
                    customer_id: None,
                };
                output.emits.push(Emit::Event {
                    time: opted_in,
                    upstream_key: format!("member:{id}:{}", crate::content_of(&data)),
                    version: None,
                    data,
                });
            }
        }
        Ok(output)
    }
}
