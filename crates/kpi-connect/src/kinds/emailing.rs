//! What the emailing kinds (`mailchimp`, `brevo`) share: the cost of emailing, which their
//! APIs do not report, from the configuration.
//!
//! - `monthly_plan_price`: one `spend.reported` line on the first day of every month of the
//!   window (category `tools`, channel `email`);
//! - `cost_per_campaign`: one line per campaign sent, on its send day (category `media`,
//!   channel `email`, the campaign's name).

use chrono::{Datelike, NaiveDate};

use kpi_model::event::SpendCategory;

use crate::{ConnectError, Emit, SpendLine, Window};

/// The cost settings of an emailing kind (from its params).
#[derive(Clone, Debug, Default)]
pub struct EmailingCost {
    pub monthly_plan_price: Option<String>,
    pub cost_per_campaign: Option<String>,
    pub currency: String,
}

impl EmailingCost {
    pub fn validate(&self) -> Result<(), ConnectError> {
        for (key, value) in [
            ("monthly_plan_price", &self.monthly_plan_price),
            ("cost_per_campaign", &self.cost_per_campaign),
        ] {
            if let Some(value) = value {
                if let Err(message) = crate::amount(value) {
                    return Err(ConnectError::Config {
                        key: key.into(),
                        message,
                    });
                }
            }
        }
        Ok(())
    }

    fn line(
        &self,
        date: NaiveDate,
        amount: &str,
        campaign: Option<String>,
        category: SpendCategory,
        source: &str,
        account: &str,
    ) -> Emit {
        Emit::Spend(SpendLine {
            date,
            // Checked by `validate` when the connector was built.
            amount: crate::amount(amount).unwrap_or_default(),
            currency: self.currency.clone(),
            channel: Some("email".into()),
            campaign,
            category,
            source: source.into(),
            account: Some(account.into()),
            reported_at: None,
            group: None,
        })
    }

    /// The plan's lines: the first days of months within the window.
    pub fn plan_lines(&self, window: Window, source: &str, account: &str) -> Vec<Emit> {
        let Some(price) = &self.monthly_plan_price else {
            return Vec::new();
        };
        let mut lines = Vec::new();
        let mut month = NaiveDate::from_ymd_opt(window.since.year(), window.since.month(), 1);
        while let Some(first) = month {
            if first > window.until {
                break;
            }
            if first >= window.since {
                lines.push(self.line(
                    first,
                    price,
                    None,
                    SpendCategory::Tools,
                    source,
                    &format!("{account}-plan"),
                ));
            }
            month = first.checked_add_months(chrono::Months::new(1));
        }
        lines
    }

    /// A campaign's line, when campaigns have a cost.
    pub fn campaign_line(
        &self,
        date: NaiveDate,
        campaign: &str,
        source: &str,
        account: &str,
    ) -> Option<Emit> {
        let cost = self.cost_per_campaign.as_ref()?;
        Some(self.line(
            date,
            cost,
            Some(kpi_model::event::clean_identifier(campaign)),
            SpendCategory::Media,
            source,
            account,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_costs_on_the_first_of_each_month_in_the_window() {
        let cost = EmailingCost {
            monthly_plan_price: Some("59.00".into()),
            ..EmailingCost::default()
        };
        let window = Window {
            since: NaiveDate::from_ymd_opt(2026, 10, 20).unwrap_or_default(),
            until: NaiveDate::from_ymd_opt(2026, 12, 2).unwrap_or_default(),
        };
        let dates: Vec<String> = cost
            .plan_lines(window, "mailchimp", "acct")
            .into_iter()
            .filter_map(|emit| match emit {
                Emit::Spend(line) => Some(line.date.to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(dates, ["2026-11-01", "2026-12-01"]);
    }
}
