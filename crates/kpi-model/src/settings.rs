//! Per-tenant settings: time zone, reporting currency, fixed FX rates and CAC thresholds.
//!
//! Tenants need no declaration: a tenant without settings gets [`TenantSettings::default`].

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;
use rust_decimal::Decimal;

use crate::event::{RejectReason, Rejection};
use crate::Timestamp;

/// The settings of one tenant, already validated.
#[derive(Clone, Debug, PartialEq)]
pub struct TenantSettings {
    pub timezone: Tz,
    /// ISO 4217 code of the reporting currency.
    pub currency: String,
    /// `1 unit of the key = rate units of the reporting currency`.
    pub fx: BTreeMap<String, Decimal>,
    /// CAC thresholds per channel (`all` for the blended figure), exported for alert rules.
    pub cac_threshold: BTreeMap<String, f64>,
}

impl Default for TenantSettings {
    fn default() -> Self {
        TenantSettings {
            timezone: Tz::UTC,
            currency: "EUR".to_string(),
            fx: BTreeMap::new(),
            cac_threshold: BTreeMap::new(),
        }
    }
}

impl TenantSettings {
    /// The calendar date of an instant in this tenant's time zone.
    pub fn local_date(&self, time: Timestamp) -> NaiveDate {
        self.timezone
            .from_utc_datetime(&time.to_datetime().naive_utc())
            .date_naive()
    }

    /// Today's date in this tenant's time zone.
    pub fn today(&self, now: DateTime<Utc>) -> NaiveDate {
        now.with_timezone(&self.timezone).date_naive()
    }

    /// Converts an amount to the reporting currency with the configured fixed rate.
    pub fn to_reporting(&self, amount: Decimal, currency: &str) -> Result<Decimal, Rejection> {
        if currency == self.currency {
            return Ok(amount);
        }
        match self.fx.get(currency) {
            Some(rate) => amount.checked_mul(*rate).ok_or_else(|| {
                Rejection::new(
                    RejectReason::InvalidField,
                    format!("data.amount: {amount} {currency} overflows when converted"),
                )
            }),
            None => Err(Rejection::new(
                RejectReason::UnknownCurrency,
                format!(
                    "data.currency: no exchange rate from {currency} to the reporting currency {}",
                    self.currency
                ),
            )),
        }
    }
}

/// Settings of every configured tenant, with the default for the others.
#[derive(Clone, Debug, Default)]
pub struct Tenants {
    configured: HashMap<String, TenantSettings>,
    default: TenantSettings,
}

impl Tenants {
    pub fn new(configured: HashMap<String, TenantSettings>) -> Self {
        Tenants {
            configured,
            default: TenantSettings::default(),
        }
    }

    pub fn get(&self, tenant: &str) -> &TenantSettings {
        self.configured.get(tenant).unwrap_or(&self.default)
    }

    pub fn is_configured(&self, tenant: &str) -> bool {
        self.configured.contains_key(tenant)
    }

    pub fn configured(&self) -> impl Iterator<Item = (&String, &TenantSettings)> {
        self.configured.iter()
    }
}
