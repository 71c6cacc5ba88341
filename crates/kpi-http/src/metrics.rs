//! The KPI gauges of SPEC section 3, computed from the live aggregates at scrape time.
//!
//! Every scrape reads the *current* period of each window in each tenant's time zone, so a
//! new day, month or year starts at local midnight without any timer. Beside SPEC's windows,
//! `window="30d"` is the rolling last 30 days (today included) and `window="previous_30d"`
//! the 30 days before them: alert rules compare them, without the jump of the 1st. A series whose KPI is
//! undefined is absent; CAC is +Inf when money was spent and no customer came.
//!
//! Cardinality is bounded by `[metrics]` in the configuration: at most `max_tenants` tenants
//! (configured tenants first, then by name), and per tenant the `max_channels_per_tenant`
//! channels, `max_campaigns_per_tenant` campaigns and `max_stages_per_tenant` stages with the
//! most all-time activity (spend + revenue, then leads; ties by name). What is left out stays
//! in the JSON API and is counted in `kpi_engine_series_omitted{tenant,kind}`.
//!
//! Beside the current period, `kpi_history_*` gauges carry the last `history_months` months,
//! `history_quarters` quarters and `history_years` years (a `window` and a `period` label), so
//! a Grafana trend reads every past month exactly as the API does today — restatements and
//! late events included, whatever Prometheus scraped back then.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use chrono::Datelike;
use kpi_config::MetricsConfig;
use kpi_model::aggregate::PeriodCells;
use kpi_model::event::{EventType, RejectReason, INVALID_TENANT};
use kpi_model::money::to_f64;
use kpi_model::report::{cac_gauge, ratio, roas, roi};
use kpi_model::{Cell, CounterKey, Period, RetentionReport, TenantAggregates, Window};

use crate::KpiSource;

/// The `window` label of the rolling last 30 days (today included), and of the 30 days
/// before them.
pub const ROLLING_30_DAYS: &str = "30d";
pub const PREVIOUS_30_DAYS: &str = "previous_30d";

/// Tenant label of rejections of tenants left out by `max_tenants`.
pub const OTHER_TENANTS: &str = "_other";
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{CounterVec, GaugeVec, IntGaugeVec, Opts};

struct Families {
    cac: GaugeVec,
    conversion: GaugeVec,
    stage_conversion: GaugeVec,
    qualified_ratio: GaugeVec,
    roi: GaugeVec,
    roas: GaugeVec,
    campaign_roi: GaugeVec,
    campaign_roas: GaugeVec,
    retention: GaugeVec,
    loyalty: GaugeVec,
    spend: GaugeVec,
    revenue: GaugeVec,
    new_customers: GaugeVec,
    leads: GaugeVec,
    qualified_leads: GaugeVec,
    converted_leads: GaugeVec,
    active_customers: GaugeVec,
    retained_customers: GaugeVec,
    cac_threshold: GaugeVec,
    processed: CounterVec,
    duplicate: CounterVec,
    rejected: CounterVec,
    omitted: IntGaugeVec,
    history: History,
}

/// The `kpi_history_*` gauges: the KPIs of past periods (a `period` label), recomputed at
/// every scrape from the aggregates, so a restated month shows its new value at once.
struct History {
    cac: GaugeVec,
    conversion: GaugeVec,
    qualified_ratio: GaugeVec,
    roi: GaugeVec,
    spend: GaugeVec,
    revenue: GaugeVec,
    new_customers: GaugeVec,
    leads: GaugeVec,
    campaign_roi: GaugeVec,
    retention: GaugeVec,
    loyalty: GaugeVec,
}

const PERIOD_CHANNEL: &[&str] = &["tenant", "window", "period", "channel"];
const PERIOD_CHANNEL_CURRENCY: &[&str] = &["tenant", "window", "period", "channel", "currency"];

impl History {
    fn new() -> History {
        History {
            cac: gauge(
                "kpi_history_cac",
                "CAC of a past or current period (+Inf: spend and no new customer)",
                PERIOD_CHANNEL_CURRENCY,
            ),
            conversion: gauge(
                "kpi_history_conversion_ratio",
                "Lead-to-customer conversion of a period",
                PERIOD_CHANNEL,
            ),
            qualified_ratio: gauge(
                "kpi_history_qualified_lead_ratio",
                "Qualified-lead rate of a period",
                PERIOD_CHANNEL,
            ),
            roi: gauge(
                "kpi_history_roi_ratio",
                "Marketing ROI of a period",
                PERIOD_CHANNEL,
            ),
            spend: gauge(
                "kpi_history_spend",
                "Marketing spend of a period in the reporting currency",
                PERIOD_CHANNEL_CURRENCY,
            ),
            revenue: gauge(
                "kpi_history_revenue",
                "Revenue of won deals of a period in the reporting currency",
                PERIOD_CHANNEL_CURRENCY,
            ),
            new_customers: gauge(
                "kpi_history_new_customers",
                "New customers of a period",
                PERIOD_CHANNEL,
            ),
            leads: gauge(
                "kpi_history_leads",
                "Leads created in a period",
                PERIOD_CHANNEL,
            ),
            campaign_roi: gauge(
                "kpi_history_campaign_roi_ratio",
                "Campaign ROI of a period",
                &["tenant", "window", "period", "channel", "campaign"],
            ),
            retention: gauge(
                "kpi_history_retention_ratio",
                "Year-over-year retention of a year",
                &["tenant", "year"],
            ),
            loyalty: gauge(
                "kpi_history_loyalty_ratio",
                "Share of a year's customers with a won deal in each of the last `years` years",
                &["tenant", "year", "years"],
            ),
        }
    }

    fn gauges(&self) -> [&GaugeVec; 11] {
        [
            &self.cac,
            &self.conversion,
            &self.qualified_ratio,
            &self.roi,
            &self.spend,
            &self.revenue,
            &self.new_customers,
            &self.leads,
            &self.campaign_roi,
            &self.retention,
            &self.loyalty,
        ]
    }

    /// One scope of one period: `[tenant, window, period, channel]`.
    fn fill_row(&self, labels: [&str; 4], currency: &str, cell: &Cell) {
        let [tenant, window, period, channel] = labels;
        let with_currency = [tenant, window, period, channel, currency];
        if let Some(value) = cac_gauge(cell) {
            self.cac.with_label_values(&with_currency).set(value);
        }
        self.spend
            .with_label_values(&with_currency)
            .set(to_f64(cell.spend));
        self.revenue
            .with_label_values(&with_currency)
            .set(to_f64(cell.revenue));
        self.new_customers
            .with_label_values(&labels)
            .set(cell.new_customers as f64);
        self.leads.with_label_values(&labels).set(cell.leads as f64);
        if let Some(value) = ratio(cell.converted_leads, cell.leads) {
            self.conversion.with_label_values(&labels).set(value);
        }
        if let Some(value) = ratio(cell.qualified_leads, cell.leads) {
            self.qualified_ratio.with_label_values(&labels).set(value);
        }
        if let Some(value) = roi(cell) {
            self.roi.with_label_values(&labels).set(value);
        }
    }
}

fn gauge(name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    GaugeVec::new(Opts::new(name, help), labels).expect("static metric definition")
}

fn counter(name: &str, help: &str, labels: &[&str]) -> CounterVec {
    CounterVec::new(Opts::new(name, help), labels).expect("static metric definition")
}

const WINDOW_CHANNEL: &[&str] = &["tenant", "window", "channel"];
const WINDOW_CHANNEL_CURRENCY: &[&str] = &["tenant", "window", "channel", "currency"];

impl Families {
    fn new() -> Families {
        Families {
            cac: gauge("kpi_cac", "Customer acquisition cost: spend / new customers (+Inf: spend and no new customer)", WINDOW_CHANNEL_CURRENCY),
            conversion: gauge("kpi_conversion_ratio", "Leads created in the period that have a won deal / leads created", WINDOW_CHANNEL),
            stage_conversion: gauge("kpi_stage_conversion_ratio", "Leads created in the period that reached the stage / leads created", &["tenant", "window", "channel", "stage"]),
            qualified_ratio: gauge("kpi_qualified_lead_ratio", "Qualified leads / leads created in the period", WINDOW_CHANNEL),
            roi: gauge("kpi_roi_ratio", "Marketing ROI: (attributed revenue - spend) / spend", WINDOW_CHANNEL),
            roas: gauge("kpi_roas_ratio", "Return on ad spend: attributed revenue / spend", WINDOW_CHANNEL),
            campaign_roi: gauge("kpi_campaign_roi_ratio", "Campaign ROI: (revenue - spend) / spend", &["tenant", "window", "channel", "campaign"]),
            campaign_roas: gauge("kpi_campaign_roas_ratio", "Campaign ROAS: revenue / spend", &["tenant", "window", "channel", "campaign"]),
            retention: gauge("kpi_retention_ratio", "Customers with a won deal last year and this year / customers with a won deal last year", &["tenant"]),
            loyalty: gauge("kpi_loyalty_ratio", "Customers with a won deal in each of the last `years` years / customers with a won deal this year", &["tenant", "years"]),
            spend: gauge("kpi_spend", "Marketing spend in the reporting currency", WINDOW_CHANNEL_CURRENCY),
            revenue: gauge("kpi_revenue", "Revenue of won deals in the reporting currency", WINDOW_CHANNEL_CURRENCY),
            new_customers: gauge("kpi_new_customers", "Customers whose first won deal falls in the period", WINDOW_CHANNEL),
            leads: gauge("kpi_leads", "Leads created in the period", WINDOW_CHANNEL),
            qualified_leads: gauge("kpi_qualified_leads", "Leads created in the period that are qualified", WINDOW_CHANNEL),
            converted_leads: gauge("kpi_converted_leads", "Leads created in the period that have a won deal", WINDOW_CHANNEL),
            active_customers: gauge("kpi_active_customers", "Customers with a won deal this year", &["tenant"]),
            retained_customers: gauge("kpi_retained_customers", "Customers with a won deal last year and this year", &["tenant"]),
            cac_threshold: gauge("kpi_cac_threshold", "Configured CAC alert threshold", &["tenant", "channel"]),
            processed: counter("kpi_events_processed_total", "Distinct events applied", &["tenant", "type"]),
            duplicate: counter("kpi_events_duplicate_total", "Events ignored because the same (tenant, id) was already applied", &["tenant", "type"]),
            rejected: counter("kpi_events_rejected_total", "Events sent to the dead-letter stream", &["tenant", "reason"]),
            omitted: IntGaugeVec::new(Opts::new("kpi_engine_series_omitted", "Channels, campaigns or stages left out of the KPI gauges by the cardinality bounds"), &["tenant", "kind"]).expect("static metric definition"),
            history: History::new(),
        }
    }

    /// The KPI gauge families (all but the counters and the omission gauge).
    fn gauges(&self) -> [&GaugeVec; 19] {
        [
            &self.cac,
            &self.conversion,
            &self.stage_conversion,
            &self.qualified_ratio,
            &self.roi,
            &self.roas,
            &self.campaign_roi,
            &self.campaign_roas,
            &self.retention,
            &self.loyalty,
            &self.spend,
            &self.revenue,
            &self.new_customers,
            &self.leads,
            &self.qualified_leads,
            &self.converted_leads,
            &self.active_customers,
            &self.retained_customers,
            &self.cac_threshold,
        ]
    }

    fn collectors(&self) -> Vec<&dyn Collector> {
        let mut collectors: Vec<&dyn Collector> = self
            .gauges()
            .into_iter()
            .chain(self.history.gauges())
            .map(|gauge| gauge as &dyn Collector)
            .collect();
        collectors.extend([
            &self.processed as &dyn Collector,
            &self.duplicate,
            &self.rejected,
            &self.omitted,
        ]);
        collectors
    }

    /// Drops every series, before a scrape fills them again from the current state.
    fn reset(&self) {
        for gauge in self.gauges().into_iter().chain(self.history.gauges()) {
            gauge.reset();
        }
        self.processed.reset();
        self.duplicate.reset();
        self.rejected.reset();
        self.omitted.reset();
    }
}

/// The collector registered in the engine's registry.
pub struct KpiCollector {
    state: Arc<dyn KpiSource>,
    bounds: MetricsConfig,
    families: Mutex<Families>,
    descs: Vec<Desc>,
}

impl KpiCollector {
    pub fn new(state: Arc<dyn KpiSource>, bounds: MetricsConfig) -> KpiCollector {
        let families = Families::new();
        let descs = families
            .collectors()
            .iter()
            .flat_map(|collector| collector.desc().into_iter().cloned())
            .collect();
        KpiCollector {
            state,
            bounds,
            families: Mutex::new(families),
            descs,
        }
    }
}

fn activity(cell: &Cell) -> (f64, i64) {
    (to_f64(cell.spend) + to_f64(cell.revenue), cell.leads)
}

/// The names of `cells` with the most activity, at most `limit`, and how many were left out.
fn top<'a>(
    cells: impl Iterator<Item = (&'a String, &'a Cell)>,
    limit: usize,
) -> (BTreeSet<String>, usize) {
    let mut ranked: Vec<(&String, (f64, i64))> =
        cells.map(|(name, cell)| (name, activity(cell))).collect();
    ranked.sort_by(|a, b| {
        b.1 .0
            .total_cmp(&a.1 .0)
            .then(b.1 .1.cmp(&a.1 .1))
            .then(a.0.cmp(b.0))
    });
    let omitted = ranked.len().saturating_sub(limit);
    (
        ranked
            .into_iter()
            .take(limit)
            .map(|(name, _)| name.clone())
            .collect(),
        omitted,
    )
}

impl Families {
    fn fill_row(&self, labels: [&str; 3], currency: &str, cell: &Cell, stages: &BTreeSet<String>) {
        let [tenant, window, channel] = labels;
        let with_currency = [tenant, window, channel, currency];
        self.spend
            .with_label_values(&with_currency)
            .set(to_f64(cell.spend));
        self.revenue
            .with_label_values(&with_currency)
            .set(to_f64(cell.revenue));
        if let Some(value) = cac_gauge(cell) {
            self.cac.with_label_values(&with_currency).set(value);
        }
        self.new_customers
            .with_label_values(&labels)
            .set(cell.new_customers as f64);
        self.leads.with_label_values(&labels).set(cell.leads as f64);
        self.qualified_leads
            .with_label_values(&labels)
            .set(cell.qualified_leads as f64);
        self.converted_leads
            .with_label_values(&labels)
            .set(cell.converted_leads as f64);
        if let Some(value) = ratio(cell.converted_leads, cell.leads) {
            self.conversion.with_label_values(&labels).set(value);
        }
        if let Some(value) = ratio(cell.qualified_leads, cell.leads) {
            self.qualified_ratio.with_label_values(&labels).set(value);
        }
        if let Some(value) = roi(cell) {
            self.roi.with_label_values(&labels).set(value);
        }
        if let Some(value) = roas(cell) {
            self.roas.with_label_values(&labels).set(value);
        }
        // Every exported stage has a rate in a period with leads, 0 when no lead reached it.
        if cell.leads > 0 {
            for stage in stages {
                let count = cell.stages.get(stage).copied().unwrap_or(0);
                self.stage_conversion
                    .with_label_values(&[tenant, window, channel, stage])
                    .set(count as f64 / cell.leads as f64);
            }
        }
    }

    fn fill_tenant(
        &self,
        tenant: &str,
        state: &dyn KpiSource,
        aggregates: Option<&TenantAggregates>,
        bounds: &MetricsConfig,
    ) {
        let settings = state.tenants().get(tenant);
        let today = settings.today(state.clock().now());
        let currency = settings.currency.as_str();
        let all_time = aggregates.and_then(|a| a.period(&Period::All));
        let (channels, channels_omitted) = top(
            all_time.iter().flat_map(|c| c.channels.iter()),
            bounds.max_channels_per_tenant,
        );
        let (campaigns, campaigns_omitted) = top(
            all_time
                .iter()
                .flat_map(|c| c.campaigns.iter())
                .filter(|(_, cell)| cell.has_money()),
            bounds.max_campaigns_per_tenant,
        );
        let (stages, stages_omitted) = {
            let mut ranked: Vec<(&String, &i64)> = all_time
                .iter()
                .flat_map(|c| c.total.stages.iter())
                .collect();
            ranked.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            let omitted = ranked.len().saturating_sub(bounds.max_stages_per_tenant);
            let kept: BTreeSet<String> = ranked
                .into_iter()
                .take(bounds.max_stages_per_tenant)
                .map(|(s, _)| s.clone())
                .collect();
            (kept, omitted)
        };
        for (kind, omitted) in [
            ("channel", channels_omitted),
            ("campaign", campaigns_omitted),
            ("stage", stages_omitted),
        ] {
            self.omitted
                .with_label_values(&[tenant, kind])
                .set(omitted as i64);
        }

        let empty = Default::default();
        let rolling = |from_days_ago: u64, to_days_ago: u64| -> PeriodCells {
            match (
                aggregates,
                today.checked_sub_days(chrono::Days::new(from_days_ago)),
                today.checked_sub_days(chrono::Days::new(to_days_ago)),
            ) {
                (Some(aggregates), Some(first), Some(last)) => aggregates.sum_of_days(first, last),
                _ => PeriodCells::default(),
            }
        };
        // Beside the calendar windows, two rolling ones: the last 30 days (today included)
        // and the 30 days before them, for alerts that must not jump on the 1st of a month.
        let last_30_days = rolling(29, 0);
        let previous_30_days = rolling(59, 30);
        let windows = Window::ALL
            .into_iter()
            .map(|window| {
                let period = window.period_of(today);
                let cells = aggregates.and_then(|a| a.period(&period)).unwrap_or(&empty);
                (window.label(), cells)
            })
            .chain([
                (ROLLING_30_DAYS, &last_30_days),
                (PREVIOUS_30_DAYS, &previous_30_days),
            ]);
        for (window, cells) in windows {
            self.fill_row([tenant, window, "all"], currency, &cells.total, &stages);
            for (channel, cell) in &cells.channels {
                if channels.contains(channel) {
                    self.fill_row([tenant, window, channel], currency, cell, &stages);
                }
            }
            for (campaign, cell) in &cells.campaigns {
                if !campaigns.contains(campaign) {
                    continue;
                }
                let channel = cell
                    .main_channel()
                    .unwrap_or(kpi_model::event::CHANNEL_UNATTRIBUTED);
                let labels = [tenant, window, channel, campaign.as_str()];
                if let Some(value) = roi(cell) {
                    self.campaign_roi.with_label_values(&labels).set(value);
                }
                if let Some(value) = roas(cell) {
                    self.campaign_roas.with_label_values(&labels).set(value);
                }
            }
        }

        self.fill_history(
            tenant, currency, today, aggregates, bounds, &channels, &campaigns,
        );

        let retention = RetentionReport::build(tenant, aggregates, today.year());
        self.active_customers
            .with_label_values(&[tenant])
            .set(retention.active_customers as f64);
        self.retained_customers
            .with_label_values(&[tenant])
            .set(retention.retained_customers as f64);
        if let Some(value) = retention.retention_rate {
            self.retention.with_label_values(&[tenant]).set(value);
        }
        for (years, value) in &retention.loyalty {
            if let Some(value) = value {
                self.loyalty.with_label_values(&[tenant, years]).set(*value);
            }
        }
        for (channel, threshold) in &settings.cac_threshold {
            self.cac_threshold
                .with_label_values(&[tenant, channel])
                .set(*threshold);
        }
    }
}

impl Families {
    /// The `kpi_history_*` gauges of the last `history_*` months, quarters and years (the
    /// current one included), for the same channels and campaigns as the current gauges.
    #[allow(clippy::too_many_arguments)]
    fn fill_history(
        &self,
        tenant: &str,
        currency: &str,
        today: chrono::NaiveDate,
        aggregates: Option<&TenantAggregates>,
        bounds: &MetricsConfig,
        channels: &BTreeSet<String>,
        campaigns: &BTreeSet<String>,
    ) {
        let history = &self.history;
        let empty = Default::default();
        for (window, count) in [
            (Window::Month, bounds.history_months),
            (Window::Quarter, bounds.history_quarters),
            (Window::Year, bounds.history_years),
        ] {
            let periods = std::iter::successors(Some(window.period_of(today)), Period::previous)
                .take(count as usize);
            for period in periods {
                let cells = aggregates.and_then(|a| a.period(&period)).unwrap_or(&empty);
                let (window, period) = (window.label(), period.to_string());
                history.fill_row([tenant, window, &period, "all"], currency, &cells.total);
                for (channel, cell) in &cells.channels {
                    if channels.contains(channel) {
                        history.fill_row([tenant, window, &period, channel], currency, cell);
                    }
                }
                for (campaign, cell) in &cells.campaigns {
                    if !campaigns.contains(campaign) {
                        continue;
                    }
                    if let Some(value) = roi(cell) {
                        let channel = cell
                            .main_channel()
                            .unwrap_or(kpi_model::event::CHANNEL_UNATTRIBUTED);
                        history
                            .campaign_roi
                            .with_label_values(&[tenant, window, &period, channel, campaign])
                            .set(value);
                    }
                }
            }
        }
        let this_year = today.year();
        for year in (this_year - bounds.history_years as i32 + 1)..=this_year {
            let report = RetentionReport::build(tenant, aggregates, year);
            let year = year.to_string();
            if let Some(value) = report.retention_rate {
                history
                    .retention
                    .with_label_values(&[tenant, &year])
                    .set(value);
            }
            for (years, value) in &report.loyalty {
                if let Some(value) = value {
                    history
                        .loyalty
                        .with_label_values(&[tenant, &year, years])
                        .set(*value);
                }
            }
        }
    }
}

/// Tenants shown on /metrics: configured ones first, then the others by name, at most `limit`.
pub fn exported_tenants(state: &dyn KpiSource, limit: usize) -> Vec<String> {
    let mut configured: Vec<String> = state
        .tenants()
        .configured()
        .map(|(name, _)| name.clone())
        .collect();
    configured.sort();
    // In multi-engine mode, only the tenants of the partitions this engine exports.
    configured.retain(|name| state.exports(name));
    let aggregates = state.aggregates();
    let others = aggregates
        .tenants
        .keys()
        .filter(|name| !state.tenants().is_configured(name) && state.exports(name))
        .cloned();
    configured.into_iter().chain(others).take(limit).collect()
}

impl Collector for KpiCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let families = self.families.lock().unwrap_or_else(|e| e.into_inner());
        families.reset();
        let tenants = exported_tenants(self.state.as_ref(), self.bounds.max_tenants);
        {
            let aggregates = self.state.aggregates();
            for tenant in &tenants {
                families.fill_tenant(
                    tenant,
                    self.state.as_ref(),
                    aggregates.tenant(tenant),
                    &self.bounds,
                );
            }
        }
        // Every counter of a known tenant exists from the start, at 0, as Prometheus expects of
        // labelled counters: otherwise a series first seen at 1 hides its first event from
        // increase() and rate(), and the first rejection of a tenant would raise no alert.
        for tenant in &tenants {
            for event_type in EventType::ALL {
                families
                    .processed
                    .with_label_values(&[tenant, event_type.as_str()]);
                families
                    .duplicate
                    .with_label_values(&[tenant, event_type.as_str()]);
            }
        }
        for tenant in tenants
            .iter()
            .map(String::as_str)
            .chain([INVALID_TENANT, OTHER_TENANTS])
        {
            for reason in RejectReason::ALL {
                families
                    .rejected
                    .with_label_values(&[tenant, reason.label()]);
            }
        }
        let exported: BTreeSet<&str> = tenants.iter().map(String::as_str).collect();
        let mut folded_rejections: std::collections::BTreeMap<&str, u64> = Default::default();
        let counters = self.state.counters();
        for (key, value) in counters.iter() {
            let (family, tenant, label) = match key {
                CounterKey::Processed { tenant, event_type } => {
                    (&families.processed, tenant, event_type)
                }
                CounterKey::Duplicate { tenant, event_type } => {
                    (&families.duplicate, tenant, event_type)
                }
                CounterKey::Rejected { tenant, reason } => (&families.rejected, tenant, reason),
            };
            if exported.contains(tenant.as_str()) || tenant == INVALID_TENANT {
                family
                    .with_label_values(&[tenant, label])
                    .inc_by(*value as f64);
            } else if let Some(partition) = tenant
                .strip_prefix(INVALID_TENANT)
                .and_then(|rest| rest.strip_prefix('.'))
                .and_then(|partition| partition.parse::<u32>().ok())
            {
                // Multi-engine mode: an invalid tenant's rejections, counted per partition,
                // shown by the partition's owner.
                if self.state.exports_partition(partition) {
                    family
                        .with_label_values(&[INVALID_TENANT, label])
                        .inc_by(*value as f64);
                }
            } else if !self.state.exports(tenant) {
                // Another engine's tenant (multi-engine mode): it shows it.
            } else if let CounterKey::Rejected { reason, .. } = key {
                // Rejections of tenants past the bound still count, under one label.
                *folded_rejections.entry(reason).or_default() += value;
            }
        }
        for (reason, value) in folded_rejections {
            families
                .rejected
                .with_label_values(&[OTHER_TENANTS, reason])
                .inc_by(value as f64);
        }
        families
            .collectors()
            .iter()
            .flat_map(|collector| collector.collect())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::convert::Infallible;

    use chrono::{DateTime, Utc};
    use std::collections::BTreeMap;
    use std::sync::{RwLock, RwLockReadGuard};

    use kpi_model::{
        Aggregates, Clock, DecodeLimits, Record, RecordKey, TenantSettings, Tenants, WorkingSet,
    };
    use prometheus::core::Collector;

    use super::*;

    struct Nothing;

    impl kpi_model::RecordSource for Nothing {
        type Error = Infallible;
        fn load(&self, _key: &RecordKey) -> Result<Option<Record>, Infallible> {
            Ok(None)
        }
    }

    fn bounds() -> MetricsConfig {
        MetricsConfig {
            max_tenants: 10,
            max_channels_per_tenant: 10,
            max_campaigns_per_tenant: 10,
            max_stages_per_tenant: 10,
            history_months: 13,
            history_quarters: 5,
            history_years: 6,
        }
    }

    fn instant(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .expect("valid")
            .with_timezone(&Utc)
    }

    /// What one engine shows: everything.
    struct Source {
        tenants: Tenants,
        clock: Clock,
        aggregates: RwLock<Aggregates>,
        counters: RwLock<BTreeMap<CounterKey, u64>>,
    }

    impl KpiSource for Source {
        fn tenants(&self) -> &Tenants {
            &self.tenants
        }
        fn clock(&self) -> &Clock {
            &self.clock
        }
        fn aggregates(&self) -> RwLockReadGuard<'_, Aggregates> {
            self.aggregates.read().expect("not poisoned")
        }
        fn counters(&self) -> RwLockReadGuard<'_, BTreeMap<CounterKey, u64>> {
            self.counters.read().expect("not poisoned")
        }
        fn exports(&self, _tenant: &str) -> bool {
            true
        }
        fn partition_of(&self, _tenant: &str) -> Option<u32> {
            None
        }
        fn exports_partition(&self, _partition: u32) -> bool {
            false
        }
        fn is_ready(&self) -> bool {
            true
        }
    }

    /// An engine on `clock` with one lead per tenant, created at `lead_time`.
    fn state_with_leads(clock: Clock, lead_time: &str, tenants: &[&str]) -> Arc<Source> {
        let paris = TenantSettings {
            timezone: chrono_tz::Europe::Paris,
            ..TenantSettings::default()
        };
        let settings = Tenants::new(HashMap::from([("paris".to_string(), paris)]));
        let mut set = WorkingSet::new();
        let mut batch = set.batch(&Nothing, &settings);
        for tenant in tenants {
            let body = format!(
                r#"{{"specversion":"1.0","id":"e-{tenant}","source":"t","type":"lead.created","time":"{lead_time}","data":{{"lead_id":"L1","channel":"seo"}}}}"#
            );
            let event = kpi_model::decode_event(
                &format!("kpi.events.{tenant}.lead.created"),
                body.as_bytes(),
                clock.now(),
                &DecodeLimits::default(),
            )
            .expect("valid event");
            batch.apply(&event).expect("applies");
        }
        let mut aggregates = Aggregates::default();
        aggregates.merge(set.take_delta(&settings));
        Arc::new(Source {
            tenants: settings,
            clock,
            aggregates: RwLock::new(aggregates),
            counters: RwLock::new(BTreeMap::new()),
        })
    }

    fn leads_gauge(collector: &KpiCollector, tenant: &str, window: &str) -> Option<f64> {
        collector
            .collect()
            .iter()
            .filter(|family| family.name() == "kpi_leads")
            .flat_map(|family| family.get_metric().iter())
            .find(|metric| {
                let labels: Vec<(&str, &str)> = metric
                    .get_label()
                    .iter()
                    .map(|pair| (pair.name(), pair.value()))
                    .collect();
                labels.contains(&("tenant", tenant))
                    && labels.contains(&("window", window))
                    && labels.contains(&("channel", "all"))
            })
            .map(|metric| metric.get_gauge().get_value())
    }

    #[test]
    fn current_periods_follow_the_clock_and_each_tenants_time_zone_at_the_year_end() {
        // 23:30 UTC on 31 December is already 00:30 on 1 January in Paris. A lead created at
        // 23:10 UTC is in this day, month, quarter and year for both tenants.
        let clock = Clock::starting_at(instant("2026-12-31T23:30:00Z"));
        let state = state_with_leads(clock, "2026-12-31T23:10:00Z", &["paris", "london"]);
        let collector = KpiCollector::new(state, bounds());
        for window in ["day", "week", "month", "quarter", "year", "all"] {
            assert_eq!(
                leads_gauge(&collector, "paris", window),
                Some(1.0),
                "{window}"
            );
            assert_eq!(
                leads_gauge(&collector, "london", window),
                Some(1.0),
                "{window}"
            );
        }

        // A lead created at 22:50 UTC, 23:50 in Paris: still 2026 for both. On the same
        // clock, Paris is in 2027 and no longer counts it in its current periods; UTC does.
        let state = state_with_leads(clock, "2026-12-31T22:50:00Z", &["paris", "london"]);
        let collector = KpiCollector::new(state, bounds());
        for window in ["day", "month", "quarter", "year"] {
            assert_eq!(
                leads_gauge(&collector, "paris", window),
                Some(0.0),
                "{window}"
            );
            assert_eq!(
                leads_gauge(&collector, "london", window),
                Some(1.0),
                "{window}"
            );
        }
        assert_eq!(leads_gauge(&collector, "paris", "all"), Some(1.0));
    }

    #[test]
    fn current_periods_move_on_the_first_of_a_month_after_midnight() {
        let clock = Clock::starting_at(instant("2027-03-01T00:00:05Z"));
        let state = state_with_leads(clock, "2027-02-28T23:59:59Z", &["london"]);
        let collector = KpiCollector::new(state, bounds());
        assert_eq!(leads_gauge(&collector, "london", "month"), Some(0.0));
        assert_eq!(leads_gauge(&collector, "london", "quarter"), Some(1.0));
        assert_eq!(leads_gauge(&collector, "london", "all"), Some(1.0));
    }

    /// Every `kpi_history_leads` series of a tenant's total: (window, period) → value.
    fn history_leads(collector: &KpiCollector, tenant: &str) -> Vec<(String, String, f64)> {
        collector
            .collect()
            .iter()
            .filter(|family| family.name() == "kpi_history_leads")
            .flat_map(|family| family.get_metric().iter())
            .filter_map(|metric| {
                let label = |name: &str| {
                    metric
                        .get_label()
                        .iter()
                        .find(|pair| pair.name() == name)
                        .map(|pair| pair.value().to_string())
                };
                (label("tenant")? == tenant && label("channel")? == "all").then(|| {
                    (
                        label("window").unwrap_or_default(),
                        label("period").unwrap_or_default(),
                        metric.get_gauge().get_value(),
                    )
                })
            })
            .collect()
    }

    #[test]
    fn history_gauges_cover_the_last_periods_across_the_year_end() {
        // On 1 January 2027 in UTC: thirteen months back to January 2026, five quarters back
        // to 2026-Q1, six years back to 2022; the lead of 15 March 2026 is in its month,
        // quarter and year, the other periods are exported at 0.
        let clock = Clock::starting_at(instant("2027-01-01T00:10:00Z"));
        let state = state_with_leads(clock, "2026-03-15T10:00:00Z", &["london"]);
        let collector = KpiCollector::new(state, bounds());
        let series = history_leads(&collector, "london");
        let periods = |window: &str| -> Vec<(String, f64)> {
            let mut found: Vec<(String, f64)> = series
                .iter()
                .filter(|(w, _, _)| w == window)
                .map(|(_, period, value)| (period.clone(), *value))
                .collect();
            found.sort_by(|a, b| a.0.cmp(&b.0));
            found
        };
        let months = periods("month");
        assert_eq!(months.len(), 13);
        assert_eq!(months[0], ("2026-01".to_string(), 0.0));
        assert_eq!(months[2], ("2026-03".to_string(), 1.0));
        assert_eq!(months[12], ("2027-01".to_string(), 0.0));
        let quarters = periods("quarter");
        assert_eq!(
            quarters.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>(),
            ["2026-Q1", "2026-Q2", "2026-Q3", "2026-Q4", "2027-Q1"]
        );
        assert_eq!(quarters[0].1, 1.0);
        let years = periods("year");
        assert_eq!(
            years.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>(),
            ["2022", "2023", "2024", "2025", "2026", "2027"]
        );
        assert_eq!(years[4].1, 1.0);

        let mut none = bounds();
        none.history_months = 0;
        none.history_quarters = 0;
        none.history_years = 0;
        let state = state_with_leads(clock, "2026-03-15T10:00:00Z", &["london"]);
        assert!(history_leads(&KpiCollector::new(state, none), "london").is_empty());
    }

    #[test]
    fn rolling_windows_hold_the_last_30_days_and_the_30_before_across_month_ends() {
        // On 1 March: the last 30 days are 31 January to 1 March (February has 28 days); a
        // lead of 31 January is in them, one of 30 January in the 30 days before.
        let clock = Clock::starting_at(instant("2027-03-01T08:00:00Z"));
        let state = state_with_leads(clock, "2027-01-31T10:00:00Z", &["london"]);
        let collector = KpiCollector::new(state, bounds());
        assert_eq!(leads_gauge(&collector, "london", "30d"), Some(1.0));
        assert_eq!(leads_gauge(&collector, "london", "previous_30d"), Some(0.0));
        assert_eq!(leads_gauge(&collector, "london", "month"), Some(0.0));
        let state = state_with_leads(clock, "2027-01-30T10:00:00Z", &["london"]);
        let collector = KpiCollector::new(state, bounds());
        assert_eq!(leads_gauge(&collector, "london", "30d"), Some(0.0));
        assert_eq!(leads_gauge(&collector, "london", "previous_30d"), Some(1.0));
    }
}
