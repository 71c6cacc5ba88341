//! `brevo`: campaigns sent and new contacts from the Brevo (ex-Sendinblue) API v3.
//!
//! - Campaigns: `GET /v3/emailCampaigns?status=sent&startDate=&endDate=`, paged with `limit` /
//!   `offset` up to `count`; each sent campaign costs `cost_per_campaign` (see
//!   [`super::emailing`]); the plan costs `monthly_plan_price`.
//! - Contacts: `GET /v3/contacts?createdSince=`, paged the same way; each contact (in one of
//!   `list_ids`, when given) is a `lead.created` (channel `email`) at its `createdAt`.
//! - Authentication: the `api-key` header. Brevo's 429 replies say when to come back in
//!   `x-sib-ratelimit-reset`, which is honoured.

use serde::Deserialize;
use serde_json::Value;

use super::emailing::EmailingCost;
use super::{base, offset_pages, page_items, rfc3339, text};
use kpi_model::EventData;

use crate::http::Http;
use crate::{ConnectError, Connector, Coverage, Emit, RunContext, RunOutput};

/// `[connectors.params]` of `brevo`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrevoParams {
    /// An API key (SMTP & API → API keys).
    pub api_key: String,
    #[serde(default = "default_base_url")]
    pub base_url: String,
    /// Only contacts in these lists are leads (all contacts when empty).
    #[serde(default)]
    pub list_ids: Vec<u64>,
    /// The campaign new contacts count under.
    #[serde(default)]
    pub lead_campaign: Option<String>,
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

fn default_base_url() -> String {
    "https://api.brevo.com".into()
}

pub struct Brevo {
    params: BrevoParams,
    cost: EmailingCost,
    http: Http,
}

impl Brevo {
    async fn collect(
        &self,
        path: &str,
        field: &str,
        query: &[(&str, String)],
    ) -> Result<Vec<Value>, ConnectError> {
        let url = format!("{}/v3{path}", base(&self.params.base_url));
        let limit = if field == "contacts" { "1000" } else { "100" };
        offset_pages(|offset| {
            let mut page_query = query.to_vec();
            page_query.push(("limit", limit.into()));
            page_query.push(("offset", offset.to_string()));
            let url = &url;
            async move {
                let page: Value = self
                    .http
                    .json(|client| {
                        client
                            .get(url)
                            .header("api-key", &self.params.api_key)
                            .query(&page_query)
                    })
                    .await?;
                Ok(page_items(&page, field, "count"))
            }
        })
        .await
    }
}

impl Connector for Brevo {
    type Params = BrevoParams;
    const KIND: &'static str = "brevo";
    const DESCRIPTION: &'static str =
        "Brevo: plan and campaign costs -> spend.reported (email), new contacts -> lead.created";

    fn new(params: BrevoParams) -> Result<Brevo, ConnectError> {
        let cost = EmailingCost {
            monthly_plan_price: params.monthly_plan_price.clone(),
            cost_per_campaign: params.cost_per_campaign.clone(),
            currency: params.currency.clone(),
        };
        cost.validate()?;
        if params.api_key.trim().is_empty() {
            return Err(ConnectError::Config {
                key: "api_key".into(),
                message: "is empty".into(),
            });
        }
        Ok(Brevo {
            cost,
            http: Http::new("brevo")?,
            params,
        })
    }

    async fn check(&self, _context: &RunContext) -> Result<String, ConnectError> {
        let url = format!("{}/v3/account", base(&self.params.base_url));
        let account: Value = self
            .http
            .json(|client| client.get(&url).header("api-key", &self.params.api_key))
            .await?;
        Ok(format!(
            "account `{}`",
            text(&account, "/companyName").unwrap_or("?")
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
            .and_hms_opt(23, 59, 59)
            .unwrap_or_default()
            .and_utc();
        let account = "brevo";
        // The plan's and the campaigns' lines of the window's days are all computed or read
        // each run: a campaign that is gone withdraws its cost.
        let mut output = RunOutput {
            coverage: vec![Coverage::Window],
            ..RunOutput::default()
        };
        output
            .emits
            .extend(self.cost.plan_lines(context.window, "brevo", account));
        if self.cost.cost_per_campaign.is_some() {
            let campaigns = self
                .collect(
                    "/emailCampaigns",
                    "campaigns",
                    &[
                        ("status", "sent".into()),
                        (
                            "startDate",
                            since.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
                        ),
                        (
                            "endDate",
                            until.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
                        ),
                    ],
                )
                .await?;
            for campaign in campaigns {
                let (Some(sent), Some(name)) =
                    (rfc3339(&campaign, "/sentDate"), text(&campaign, "/name"))
                else {
                    continue;
                };
                output.emits.extend(self.cost.campaign_line(
                    sent.date_naive(),
                    name,
                    "brevo",
                    account,
                ));
            }
        }
        let contacts = self
            .collect(
                "/contacts",
                "contacts",
                &[(
                    "createdSince",
                    since.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
                )],
            )
            .await?;
        for contact in contacts {
            let id = match contact.get("id") {
                Some(Value::Number(number)) => number.to_string(),
                _ => continue,
            };
            let Some(created) = rfc3339(&contact, "/createdAt") else {
                continue;
            };
            let lists: Vec<u64> = contact
                .get("listIds")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_u64)
                .collect();
            if !self.params.list_ids.is_empty()
                && !lists.iter().any(|list| self.params.list_ids.contains(list))
            {
                continue;
            }
            let data = EventData::LeadCreated {
                lead_id: format!("brevo-{id}"),
                channel: Some("email".into()),
                campaign: self.params.lead_campaign.clone(),
                qualified: None,
                customer_id: None,
            };
            output.emits.push(Emit::Event {
                time: created,
                upstream_key: format!("contact:{id}:{}", crate::content_of(&data)),
                version: None,
                data,
            });
        }
        Ok(output)
    }
}
