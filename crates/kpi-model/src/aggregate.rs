//! KPI aggregates: additive counters per tenant, period and scope (total, channel, campaign),
//! and per tenant and year for retention.
//!
//! Aggregates are a pure function of the records: the sum of every record's contribution
//! ([`contribute`]). The same type holds live aggregates and signed deltas, so applying a batch
//! is one [`Aggregates::merge`]; cells that fall back to zero are removed, which keeps the
//! result independent of the history that led to it. Reading one period touches only that
//! period's cells, whatever the size of the history.

use std::collections::{BTreeMap, HashMap};

use rust_decimal::Decimal;

use crate::period::Period;
use crate::record::{Attribution, Record};
use crate::settings::TenantSettings;

/// Additive counters of one scope in one period.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Cell {
    pub spend: Decimal,
    pub revenue: Decimal,
    pub new_customers: i64,
    pub leads: i64,
    pub qualified_leads: i64,
    pub converted_leads: i64,
    /// Leads created in the period that reached each stage.
    pub stages: BTreeMap<String, i64>,
    /// For campaign cells: how many spend lines and deals of each channel make it up, to name
    /// the campaign's channel.
    pub channel_votes: BTreeMap<String, i64>,
}

fn add_counts(into: &mut BTreeMap<String, i64>, from: &BTreeMap<String, i64>) {
    for (name, count) in from {
        if let Some(existing) = into.get_mut(name) {
            *existing += count;
        } else {
            into.insert(name.clone(), *count);
        }
    }
    into.retain(|_, count| *count != 0);
}

fn bump(into: &mut BTreeMap<String, i64>, name: &str, sign: i64) {
    if let Some(existing) = into.get_mut(name) {
        *existing += sign;
        if *existing == 0 {
            into.remove(name);
        }
    } else {
        into.insert(name.to_string(), sign);
    }
}

/// Adds money to a total. Amounts are bounded ([`crate::money::MAX_AMOUNT`], and the
/// configured rates by [`crate::money::MAX_FX_RATE`]) so that no realistic history overflows
/// a total; past about eight billion events of the maximum amount in one cell the total would
/// saturate rather than stop the engine.
fn add_money_to(total: &mut Decimal, amount: Decimal) {
    *total = total.saturating_add(amount);
}

impl Cell {
    fn add(&mut self, other: &Cell) {
        add_money_to(&mut self.spend, other.spend);
        add_money_to(&mut self.revenue, other.revenue);
        self.new_customers += other.new_customers;
        self.leads += other.leads;
        self.qualified_leads += other.qualified_leads;
        self.converted_leads += other.converted_leads;
        add_counts(&mut self.stages, &other.stages);
        add_counts(&mut self.channel_votes, &other.channel_votes);
    }

    pub fn is_zero(&self) -> bool {
        self.spend.is_zero()
            && self.revenue.is_zero()
            && self.new_customers == 0
            && self.leads == 0
            && self.qualified_leads == 0
            && self.converted_leads == 0
            && self.stages.is_empty()
            && self.channel_votes.is_empty()
    }

    /// Whether money was counted in this cell: spend, revenue, or a spend line or deal of some
    /// channel (a zero-amount deal). The campaigns of `/api/v1/kpis` and of the campaign gauges
    /// are those with money; a campaign known only from its leads is still a series scope.
    pub fn has_money(&self) -> bool {
        !self.spend.is_zero() || !self.revenue.is_zero() || !self.channel_votes.is_empty()
    }

    /// The channel a campaign is shown under: the one most of its lines and deals carry (ties
    /// to the smallest name, so the answer does not depend on arrival order).
    pub fn main_channel(&self) -> Option<&str> {
        self.channel_votes
            .iter()
            .max_by(|(name_a, a), (name_b, b)| a.cmp(b).then(name_b.cmp(name_a)))
            .map(|(name, _)| name.as_str())
    }
}

/// The cells of one period.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PeriodCells {
    pub total: Cell,
    pub channels: BTreeMap<String, Cell>,
    pub campaigns: BTreeMap<String, Cell>,
}

fn cell_mut<'m>(cells: &'m mut BTreeMap<String, Cell>, name: &str) -> &'m mut Cell {
    if !cells.contains_key(name) {
        cells.insert(name.to_string(), Cell::default());
    }
    cells.get_mut(name).expect("inserted just above")
}

fn merge_cells(into: &mut BTreeMap<String, Cell>, from: BTreeMap<String, Cell>) {
    for (name, cell) in from {
        match into.get_mut(&name) {
            Some(existing) => {
                existing.add(&cell);
                if existing.is_zero() {
                    into.remove(&name);
                }
            }
            None if !cell.is_zero() => {
                into.insert(name, cell);
            }
            None => {}
        }
    }
}

/// As [`merge_cells`], from borrowed cells: only the names not there yet are cloned.
fn add_cells(into: &mut BTreeMap<String, Cell>, from: &BTreeMap<String, Cell>) {
    for (name, cell) in from {
        match into.get_mut(name) {
            Some(existing) => existing.add(cell),
            None => {
                into.insert(name.clone(), cell.clone());
            }
        }
    }
    into.retain(|_, cell| !cell.is_zero());
}

impl PeriodCells {
    /// Adds `other` without consuming it (rolling windows sum stored days).
    fn add(&mut self, other: &PeriodCells) {
        self.total.add(&other.total);
        add_cells(&mut self.channels, &other.channels);
        add_cells(&mut self.campaigns, &other.campaigns);
    }

    fn merge(&mut self, other: PeriodCells) {
        self.total.add(&other.total);
        merge_cells(&mut self.channels, other.channels);
        merge_cells(&mut self.campaigns, other.campaigns);
    }

    fn is_zero(&self) -> bool {
        self.total.is_zero() && self.channels.is_empty() && self.campaigns.is_empty()
    }
}

/// Customers active in a year, and how many of them bought in each of the k years up to it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetentionCell {
    pub active_customers: i64,
    /// `consecutive[k]`, k = 2..=5: customers with a won deal in each of the years `Y-k+1..=Y`.
    /// `consecutive[2]` is also the number of customers retained from `Y-1`.
    pub consecutive: [i64; 6],
}

impl RetentionCell {
    fn add(&mut self, other: &RetentionCell) {
        self.active_customers += other.active_customers;
        for (into, from) in self.consecutive.iter_mut().zip(other.consecutive.iter()) {
            *into += from;
        }
    }

    fn is_zero(&self) -> bool {
        self.active_customers == 0 && self.consecutive.iter().all(|count| *count == 0)
    }
}

/// All aggregates of one tenant.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TenantAggregates {
    pub periods: HashMap<Period, PeriodCells>,
    pub retention: BTreeMap<i32, RetentionCell>,
}

impl TenantAggregates {
    pub fn period(&self, period: &Period) -> Option<&PeriodCells> {
        self.periods.get(period)
    }

    /// The cells of the days `first..=last` added up: a rolling window (the last 30 days)
    /// costs one lookup per day, whatever the size of the history. Every counter is additive
    /// over days, so the sum is exact (stage counts and campaign votes included).
    pub fn sum_of_days(&self, first: chrono::NaiveDate, last: chrono::NaiveDate) -> PeriodCells {
        let mut sum = PeriodCells::default();
        for day in Period::Day(first).through(Period::Day(last)) {
            if let Some(cells) = self.periods.get(&day) {
                sum.add(cells);
            }
        }
        sum
    }

    pub fn retention_of(&self, year: i32) -> RetentionCell {
        self.retention.get(&year).cloned().unwrap_or_default()
    }

    fn merge(&mut self, other: TenantAggregates) {
        for (period, cells) in other.periods {
            let existing = self.periods.entry(period).or_default();
            existing.merge(cells);
            if existing.is_zero() {
                self.periods.remove(&period);
            }
        }
        for (year, cell) in other.retention {
            let existing = self.retention.entry(year).or_default();
            existing.add(&cell);
            if existing.is_zero() {
                self.retention.remove(&year);
            }
        }
    }
}

/// Aggregates of every tenant (live values, or a signed delta).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Aggregates {
    pub tenants: BTreeMap<String, TenantAggregates>,
}

impl Aggregates {
    pub fn tenant(&self, tenant: &str) -> Option<&TenantAggregates> {
        self.tenants.get(tenant)
    }

    fn tenant_mut(&mut self, tenant: &str) -> &mut TenantAggregates {
        if !self.tenants.contains_key(tenant) {
            self.tenants
                .insert(tenant.to_string(), TenantAggregates::default());
        }
        self.tenants.get_mut(tenant).expect("inserted just above")
    }

    /// Adds a delta. A tenant, once seen, stays known even if its counters return to zero.
    pub fn merge(&mut self, delta: Aggregates) {
        for (tenant, aggregates) in delta.tenants {
            self.tenant_mut(&tenant).merge(aggregates);
        }
    }
}

/// Adds `sign` (+1 or -1) times the contribution of `record` (of `tenant`) to `into`.
///
/// - a lead counts in the periods of its creation time, under total, its channel and its
///   campaign (if any): one lead, qualified or not, converted when a won deal names it, and
///   each stage it reached;
/// - a won deal adds its amount to revenue in the periods of its won time, under total, its
///   attributed channel and its campaign;
/// - a customer counts as new in the periods of their first won deal, under total, that
///   deal's channel and its campaign (if any), and as active in every year with a won deal
///   (retention and loyalty);
/// - a spend line adds its amount in the periods of its date, under total, its channel (if
///   any) and its campaign (if any).
pub fn contribute(
    tenant: &str,
    record: &Record,
    settings: &TenantSettings,
    sign: i64,
    into: &mut Aggregates,
) {
    let signed = Decimal::from(sign);
    // Every record makes its tenant known, whatever it contributes: a tenant is known once any
    // of its events was applied, in any order (an API question about it is then not a 404).
    into.tenant_mut(tenant);
    match record {
        Record::Lead(lead) => {
            let (Some(created), Some(attribution)) = (&lead.created, lead.attribution()) else {
                return;
            };
            let qualified = i64::from(lead.is_qualified()) * sign;
            let converted = i64::from(!lead.won_deals.is_empty()) * sign;
            let date = settings.local_date(created.version.time);
            let aggregates = into.tenant_mut(tenant);
            for period in Period::containing(date) {
                let cells = aggregates.periods.entry(period).or_default();
                let mut scopes = vec![
                    &mut cells.total,
                    cell_mut(&mut cells.channels, &attribution.channel),
                ];
                if let Some(campaign) = &attribution.campaign {
                    scopes.push(cell_mut(&mut cells.campaigns, campaign));
                }
                for cell in scopes {
                    cell.leads += sign;
                    cell.qualified_leads += qualified;
                    cell.converted_leads += converted;
                    for stage in &lead.stages {
                        bump(&mut cell.stages, stage, sign);
                    }
                }
            }
        }
        Record::Deal(deal) => {
            let (Some((version, crate::record::DealState::Won { amount, .. })), Some(attribution)) =
                (&deal.latest, &deal.attribution)
            else {
                return;
            };
            let revenue = *amount * signed;
            add_money(
                into.tenant_mut(tenant),
                settings.local_date(version.time),
                Some(&attribution.channel),
                attribution.campaign.as_deref(),
                sign,
                |cell| add_money_to(&mut cell.revenue, revenue),
            );
        }
        Record::Customer(customer) => {
            let Some((_, first)) = customer.first_deal() else {
                return;
            };
            let aggregates = into.tenant_mut(tenant);
            let first_date = settings.local_date(first.time);
            count_new_customer(aggregates, first_date, &first.attribution, sign);
            let years: std::collections::BTreeSet<i32> = customer
                .deals
                .values()
                .map(|deal| {
                    use chrono::Datelike;
                    settings.local_date(deal.time).year()
                })
                .collect();
            for &year in &years {
                let cell = aggregates.retention.entry(year).or_default();
                cell.active_customers += sign;
                let mut run = 1;
                while run < 5 && years.contains(&(year - run)) {
                    run += 1;
                    cell.consecutive[run as usize] += sign;
                }
            }
        }
        Record::Spend(spend) => {
            let Some((_, line)) = &spend.latest else {
                return;
            };
            let amount = line.amount * signed;
            add_money(
                into.tenant_mut(tenant),
                line.date,
                line.channel.as_deref(),
                line.campaign.as_deref(),
                sign,
                |cell| add_money_to(&mut cell.spend, amount),
            );
        }
    }
}

fn count_new_customer(
    aggregates: &mut TenantAggregates,
    date: chrono::NaiveDate,
    attribution: &Attribution,
    sign: i64,
) {
    for period in Period::containing(date) {
        let cells = aggregates.periods.entry(period).or_default();
        cells.total.new_customers += sign;
        cell_mut(&mut cells.channels, &attribution.channel).new_customers += sign;
        if let Some(campaign) = &attribution.campaign {
            cell_mut(&mut cells.campaigns, campaign).new_customers += sign;
        }
    }
}

fn add_money(
    aggregates: &mut TenantAggregates,
    date: chrono::NaiveDate,
    channel: Option<&str>,
    campaign: Option<&str>,
    sign: i64,
    add: impl Fn(&mut Cell),
) {
    for period in Period::containing(date) {
        let cells = aggregates.periods.entry(period).or_default();
        add(&mut cells.total);
        if let Some(channel) = channel {
            add(cell_mut(&mut cells.channels, channel));
        }
        if let Some(campaign) = campaign {
            let cell = cell_mut(&mut cells.campaigns, campaign);
            add(cell);
            if let Some(channel) = channel {
                bump(&mut cell.channel_votes, channel, sign);
            }
        }
    }
}
