//! KPI tables computed from aggregates, in the shape of the JSON API (SPEC section 3).
//!
//! Money is a string with two decimals; ratios are numbers at full precision; an undefined
//! KPI is `null` (and its gauge is absent).

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::aggregate::{Cell, PeriodCells, TenantAggregates};
use crate::money::{format_money, to_f64};
use crate::period::Period;

/// The KPIs of one scope (total or a channel).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct KpiRow {
    pub spend: String,
    pub new_customers: i64,
    pub cac: Option<f64>,
    pub leads: i64,
    pub qualified_leads: i64,
    pub qualified_lead_rate: Option<f64>,
    pub converted_leads: i64,
    pub conversion_rate: Option<f64>,
    pub revenue: String,
    pub roi: Option<f64>,
    pub roas: Option<f64>,
    pub stages: BTreeMap<String, f64>,
}

/// The money KPIs of one campaign.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CampaignRow {
    pub channel: Option<String>,
    pub spend: String,
    pub revenue: String,
    pub roi: Option<f64>,
    pub roas: Option<f64>,
}

/// The answer of `GET /api/v1/kpis`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct KpiReport {
    pub tenant: String,
    pub period: String,
    pub currency: String,
    pub total: KpiRow,
    pub channels: BTreeMap<String, KpiRow>,
    pub campaigns: BTreeMap<String, CampaignRow>,
    /// Present only when the answer holds part of the channels or campaigns.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub page: Option<Page>,
}

/// Which rows of a long list an answer holds: `limit` rows from `offset`, in name order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rows {
    pub offset: usize,
    pub limit: usize,
}

impl Rows {
    /// Every row.
    pub const ALL: Rows = Rows {
        offset: 0,
        limit: usize::MAX,
    };
}

/// What part of its lists an answer holds, when it does not hold them all.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Page {
    pub offset: usize,
    pub limit: usize,
    /// How many rows each list has in all (`channels`, `campaigns`, `tenants`).
    pub totals: BTreeMap<&'static str, usize>,
    /// The `offset` of the next page, while some list has more rows.
    pub next_offset: Option<usize>,
}

impl Page {
    /// The page of `rows` over lists of these sizes; `None` when it holds them all.
    pub fn of(rows: Rows, totals: &[(&'static str, usize)]) -> Option<Page> {
        let largest = totals.iter().map(|(_, total)| *total).max().unwrap_or(0);
        let end = rows.offset.saturating_add(rows.limit);
        (rows.offset > 0 || end < largest).then(|| Page {
            offset: rows.offset,
            limit: rows.limit,
            totals: totals.iter().copied().collect(),
            next_offset: (end < largest).then_some(end),
        })
    }
}

/// The answer of `GET /api/v1/retention`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RetentionReport {
    pub tenant: String,
    pub year: i32,
    pub active_customers: i64,
    pub retained_customers: i64,
    pub retention_rate: Option<f64>,
    pub loyalty: BTreeMap<String, Option<f64>>,
}

/// `numerator / denominator`, undefined when the denominator is zero.
pub fn ratio(numerator: i64, denominator: i64) -> Option<f64> {
    (denominator != 0).then(|| numerator as f64 / denominator as f64)
}

/// CAC as a number: spend per new customer. `None` without new customers (the gauge shows
/// +Inf when there was spend, see [`cac_gauge`]).
pub fn cac(cell: &Cell) -> Option<f64> {
    (cell.new_customers != 0).then(|| to_f64(cell.spend) / cell.new_customers as f64)
}

/// CAC as a gauge value: +Inf when money was spent and no customer came, absent when neither.
pub fn cac_gauge(cell: &Cell) -> Option<f64> {
    match cac(cell) {
        Some(value) => Some(value),
        None if !cell.spend.is_zero() => Some(f64::INFINITY),
        None => None,
    }
}

pub fn roi(cell: &Cell) -> Option<f64> {
    (!cell.spend.is_zero())
        .then(|| to_f64(cell.revenue.saturating_sub(cell.spend)) / to_f64(cell.spend))
}

pub fn roas(cell: &Cell) -> Option<f64> {
    (!cell.spend.is_zero()).then(|| to_f64(cell.revenue) / to_f64(cell.spend))
}

/// Every stage a lead of the tenant ever reached: each has a rate (0 included) in every
/// period with leads (SPEC: a stage rate is defined whenever the period has leads).
pub fn known_stages(aggregates: Option<&TenantAggregates>) -> BTreeSet<String> {
    aggregates
        .and_then(|aggregates| aggregates.period(&Period::All))
        .map(|cells| cells.total.stages.keys().cloned().collect())
        .unwrap_or_default()
}

impl KpiRow {
    /// The row of one cell; `stages` are the stages to rate (see [`known_stages`]).
    pub fn from_cell(cell: &Cell, stages: &BTreeSet<String>) -> KpiRow {
        let stages = if cell.leads == 0 {
            BTreeMap::new()
        } else {
            stages
                .iter()
                .chain(cell.stages.keys())
                .map(|stage| {
                    let count = cell.stages.get(stage).copied().unwrap_or(0);
                    (stage.clone(), count as f64 / cell.leads as f64)
                })
                .collect()
        };
        KpiRow {
            spend: format_money(cell.spend),
            new_customers: cell.new_customers,
            cac: cac(cell),
            leads: cell.leads,
            qualified_leads: cell.qualified_leads,
            qualified_lead_rate: ratio(cell.qualified_leads, cell.leads),
            converted_leads: cell.converted_leads,
            conversion_rate: ratio(cell.converted_leads, cell.leads),
            revenue: format_money(cell.revenue),
            roi: roi(cell),
            roas: roas(cell),
            stages,
        }
    }
}

impl CampaignRow {
    pub fn from_cell(cell: &Cell) -> CampaignRow {
        CampaignRow {
            channel: cell.main_channel().map(str::to_string),
            spend: format_money(cell.spend),
            revenue: format_money(cell.revenue),
            roi: roi(cell),
            roas: roas(cell),
        }
    }
}

impl KpiReport {
    /// The KPI table of `tenant` for `period`; an empty table when nothing happened then.
    pub fn build(
        tenant: &str,
        currency: &str,
        aggregates: Option<&TenantAggregates>,
        period: Period,
    ) -> KpiReport {
        KpiReport::build_rows(tenant, currency, aggregates, period, Rows::ALL)
    }

    /// As [`KpiReport::build`], with only `rows` of the channels and of the campaigns (by name).
    pub fn build_rows(
        tenant: &str,
        currency: &str,
        aggregates: Option<&TenantAggregates>,
        period: Period,
        rows: Rows,
    ) -> KpiReport {
        let empty = PeriodCells::default();
        let cells = aggregates
            .and_then(|aggregates| aggregates.period(&period))
            .unwrap_or(&empty);
        let stages = known_stages(aggregates);
        let campaigns: Vec<(&String, &Cell)> = cells
            .campaigns
            .iter()
            .filter(|(_, cell)| cell.has_money())
            .collect();
        KpiReport {
            tenant: tenant.to_string(),
            period: period.to_string(),
            currency: currency.to_string(),
            total: KpiRow::from_cell(&cells.total, &stages),
            channels: cells
                .channels
                .iter()
                .skip(rows.offset)
                .take(rows.limit)
                .map(|(name, cell)| (name.clone(), KpiRow::from_cell(cell, &stages)))
                .collect(),
            campaigns: campaigns
                .iter()
                .skip(rows.offset)
                .take(rows.limit)
                .map(|(name, cell)| ((*name).clone(), CampaignRow::from_cell(cell)))
                .collect(),
            page: Page::of(
                rows,
                &[
                    ("channels", cells.channels.len()),
                    ("campaigns", campaigns.len()),
                ],
            ),
        }
    }
}

impl RetentionReport {
    pub fn build(
        tenant: &str,
        aggregates: Option<&TenantAggregates>,
        year: i32,
    ) -> RetentionReport {
        let (current, previous) = match aggregates {
            Some(aggregates) => (
                aggregates.retention_of(year),
                aggregates.retention_of(year - 1),
            ),
            None => Default::default(),
        };
        let loyalty = (2..=5)
            .map(|k| {
                (
                    k.to_string(),
                    ratio(current.consecutive[k], current.active_customers),
                )
            })
            .collect();
        RetentionReport {
            tenant: tenant.to_string(),
            year,
            active_customers: current.active_customers,
            retained_customers: current.consecutive[2],
            retention_rate: ratio(current.consecutive[2], previous.active_customers),
            loyalty,
        }
    }
}

/// The scope of a series: the blended total, one channel, or one campaign.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    Total,
    Channel(String),
    Campaign(String),
}

impl Scope {
    /// The cell of this scope in one period's cells.
    fn cell<'c>(&self, cells: &'c PeriodCells) -> Option<&'c Cell> {
        match self {
            Scope::Total => Some(&cells.total),
            Scope::Channel(channel) => cells.channels.get(channel),
            Scope::Campaign(campaign) => cells.campaigns.get(campaign),
        }
    }
}

/// One period of a series: its name and the fields of a [`KpiRow`].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SeriesEntry {
    pub period: String,
    #[serde(flatten)]
    pub row: KpiRow,
}

/// The answer of `GET /api/v1/kpis/series`: one entry per period of the range, in order,
/// periods without data included (zero counts, `null` KPIs).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct KpiSeries {
    pub tenant: String,
    pub granularity: String,
    pub currency: String,
    /// The channel of the scope: `all` for the total, the campaign's main channel (or `null`).
    pub channel: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub campaign: Option<String>,
    pub series: Vec<SeriesEntry>,
}

impl KpiSeries {
    /// The series of `scope` over `from..=to` (periods of one window, `from <= to`; the caller
    /// bounds the length). Each period is one lookup in the live aggregates.
    pub fn build(
        tenant: &str,
        currency: &str,
        aggregates: Option<&TenantAggregates>,
        scope: &Scope,
        from: Period,
        to: Period,
    ) -> KpiSeries {
        let stages = known_stages(aggregates);
        let empty = Cell::default();
        let series = from
            .through(to)
            .map(|period| {
                let cell = aggregates
                    .and_then(|aggregates| aggregates.period(&period))
                    .and_then(|cells| scope.cell(cells))
                    .unwrap_or(&empty);
                SeriesEntry {
                    period: period.to_string(),
                    row: KpiRow::from_cell(cell, &stages),
                }
            })
            .collect();
        let (channel, campaign) = match scope {
            Scope::Total => (Some("all".to_string()), None),
            Scope::Channel(channel) => (Some(channel.clone()), None),
            Scope::Campaign(campaign) => (
                aggregates
                    .and_then(|aggregates| aggregates.period(&Period::All))
                    .and_then(|cells| cells.campaigns.get(campaign))
                    .and_then(Cell::main_channel)
                    .map(str::to_string),
                Some(campaign.clone()),
            ),
        };
        KpiSeries {
            tenant: tenant.to_string(),
            granularity: from.window().label().to_string(),
            currency: currency.to_string(),
            channel,
            campaign,
            series,
        }
    }
}

/// The answer of `GET /api/v1/retention/series`: one entry per year, each as
/// `/api/v1/retention` answers it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RetentionSeries {
    pub tenant: String,
    pub series: Vec<RetentionEntry>,
}

/// One year of a retention series (a [`RetentionReport`] without the tenant).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RetentionEntry {
    pub year: i32,
    pub active_customers: i64,
    pub retained_customers: i64,
    pub retention_rate: Option<f64>,
    pub loyalty: BTreeMap<String, Option<f64>>,
}

impl RetentionSeries {
    pub fn build(
        tenant: &str,
        aggregates: Option<&TenantAggregates>,
        years: std::ops::RangeInclusive<i32>,
    ) -> RetentionSeries {
        RetentionSeries {
            tenant: tenant.to_string(),
            series: years
                .map(|year| {
                    let report = RetentionReport::build(tenant, aggregates, year);
                    RetentionEntry {
                        year,
                        active_customers: report.active_customers,
                        retained_customers: report.retained_customers,
                        retention_rate: report.retention_rate,
                        loyalty: report.loyalty,
                    }
                })
                .collect(),
        }
    }
}
