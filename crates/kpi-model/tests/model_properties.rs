//! Property tests of the KPI model: whatever the order, duplication and batching of a set of
//! events, the incremental aggregates equal a straightforward batch recomputation over the
//! distinct events (written here independently of the engine, after SPEC sections 1-2), and
//! equal a rebuild from the stored records.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::str::FromStr;

use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};
use kpi_model::money::{format_money, to_f64, Decimal};
use kpi_model::record::Record;
use kpi_model::settings::{TenantSettings, Tenants};
use kpi_model::{
    aggregate_records, Aggregates, Event, EventData, KpiReport, KpiSeries, Outcome, Period,
    RecordKey, RecordSource, RetentionReport, RetentionSeries, Scope, Timestamp, WorkingSet,
};
use proptest::prelude::*;
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// Random histories

const CHANNELS: [Option<&str>; 4] = [None, Some("seo"), Some("social"), Some("email")];
const CAMPAIGNS: [Option<&str>; 3] = [None, Some("spring"), Some("retarget")];
const STAGES: [&str; 2] = ["quote_requested", "meeting_booked"];
const TENANTS: [&str; 2] = ["plain", "paris"];

#[derive(Clone, Debug)]
enum Spec {
    LeadCreated {
        lead: u8,
        channel: u8,
        campaign: u8,
        qualified: Option<bool>,
    },
    LeadQualified {
        lead: u8,
        qualified: bool,
    },
    Stage {
        lead: u8,
        stage: u8,
    },
    DealWon {
        deal: u8,
        customer: u8,
        lead: Option<u8>,
        channel: u8,
        campaign: u8,
        cents: u32,
        usd: bool,
    },
    DealLost {
        deal: u8,
    },
    Spend {
        line: u8,
        channel: u8,
        campaign: u8,
        day: u16,
        cents: u32,
        usd: bool,
    },
}

fn spec_strategy() -> impl Strategy<Value = Spec> {
    prop_oneof![
        3 => (0..8u8, 0..4u8, 0..3u8, prop::option::of(any::<bool>()))
            .prop_map(|(lead, channel, campaign, qualified)| Spec::LeadCreated { lead, channel, campaign, qualified }),
        1 => (0..8u8, any::<bool>()).prop_map(|(lead, qualified)| Spec::LeadQualified { lead, qualified }),
        1 => (0..8u8, 0..2u8).prop_map(|(lead, stage)| Spec::Stage { lead, stage }),
        3 => (0..8u8, 0..5u8, prop::option::of(0..10u8), 0..4u8, 0..3u8, 0..100_000u32, any::<bool>())
            .prop_map(|(deal, customer, lead, channel, campaign, cents, usd)| Spec::DealWon { deal, customer, lead, channel, campaign, cents, usd }),
        1 => (0..8u8).prop_map(|deal| Spec::DealLost { deal }),
        2 => (0..4u8, 0..4u8, 0..3u8, 0..1500u16, 0..50_000u32, any::<bool>())
            .prop_map(|(line, channel, campaign, day, cents, usd)| Spec::Spend { line, channel, campaign, day, cents, usd }),
    ]
}

/// Times cluster around year and month boundaries (where time zones matter) and repeat
/// (where ties are broken by id).
fn time_strategy() -> impl Strategy<Value = i64> {
    let base = Utc
        .with_ymd_and_hms(2022, 12, 31, 22, 30, 0)
        .single()
        .map(|t| t.timestamp())
        .unwrap_or(0);
    prop_oneof![
        (0..4i64, 0..8i64).prop_map(move |(year, step)| base + year * 365 * 86_400 + step * 1_800),
        (0..4 * 365 * 86_400i64).prop_map(move |offset| base + offset),
        Just(base + 1_000_000),
    ]
}

fn history_strategy() -> impl Strategy<Value = Vec<Event>> {
    prop::collection::vec((0..2usize, spec_strategy(), time_strategy()), 0..70).prop_map(|specs| {
        specs
            .into_iter()
            .enumerate()
            .map(|(n, (tenant, spec, seconds))| to_event(n, TENANTS[tenant], spec, seconds))
            .collect()
    })
}

fn money(cents: u32) -> Decimal {
    Decimal::new(i64::from(cents), 2)
}

fn name(options: &[Option<&str>], index: u8) -> Option<String> {
    options[usize::from(index)].map(str::to_string)
}

fn to_event(n: usize, tenant: &str, spec: Spec, seconds: i64) -> Event {
    // Only the Paris tenant has a USD rate: elsewhere USD would be (rightly) rejected.
    let currency = |usd: bool| {
        if usd && tenant == "paris" {
            "USD".to_string()
        } else {
            "EUR".to_string()
        }
    };
    let data = match spec {
        Spec::LeadCreated {
            lead,
            channel,
            campaign,
            qualified,
        } => EventData::LeadCreated {
            lead_id: format!("L{lead}"),
            channel: name(&CHANNELS, channel),
            campaign: name(&CAMPAIGNS, campaign),
            qualified,
            customer_id: None,
        },
        Spec::LeadQualified { lead, qualified } => EventData::LeadQualified {
            lead_id: format!("L{lead}"),
            qualified,
        },
        Spec::Stage { lead, stage } => EventData::LeadStageChanged {
            lead_id: format!("L{lead}"),
            stage: STAGES[usize::from(stage)].to_string(),
        },
        Spec::DealWon {
            deal,
            customer,
            lead,
            channel,
            campaign,
            cents,
            usd,
        } => EventData::DealWon {
            deal_id: format!("D{deal}"),
            customer_id: format!("C{customer}"),
            amount: money(cents),
            currency: currency(usd),
            lead_id: lead.map(|lead| format!("L{lead}")),
            channel: name(&CHANNELS, channel),
            campaign: name(&CAMPAIGNS, campaign),
        },
        Spec::DealLost { deal } => EventData::DealLost {
            deal_id: format!("D{deal}"),
            lead_id: None,
        },
        Spec::Spend {
            line,
            channel,
            campaign,
            day,
            cents,
            usd,
        } => EventData::SpendReported {
            date: NaiveDate::from_ymd_opt(2023, 1, 1).expect("date")
                + chrono::Days::new(u64::from(day)),
            amount: money(cents),
            currency: currency(usd),
            channel: name(&CHANNELS, channel),
            campaign: name(&CAMPAIGNS, campaign),
            category: kpi_model::event::SpendCategory::Media,
            source: Some(format!("src{line}")),
            account: None,
        },
    };
    Event {
        tenant: tenant.to_string(),
        // Ids are unique per event, and not in time order, so ties test the id rule.
        id: format!("e{:03}", (n * 37) % 1000),
        source: "proptest".to_string(),
        time: Timestamp(seconds * 1_000_000_000),
        data,
    }
}

fn tenants() -> Tenants {
    let paris = TenantSettings {
        timezone: chrono_tz::Europe::Paris,
        currency: "EUR".into(),
        fx: [("USD".to_string(), Decimal::from_str("0.9").expect("rate"))]
            .into_iter()
            .collect(),
        cac_threshold: BTreeMap::new(),
    };
    Tenants::new([("paris".to_string(), paris)].into_iter().collect())
}

// ---------------------------------------------------------------------------------------------
// The engine side: batches over an in-memory store

#[derive(Default)]
struct MemoryStore {
    records: BTreeMap<RecordKey, Record>,
}

impl RecordSource for MemoryStore {
    type Error = Infallible;
    fn load(&self, key: &RecordKey) -> Result<Option<Record>, Infallible> {
        Ok(self.records.get(key).cloned())
    }
}

/// The engine's way of applying events: a working set kept across delivery batches, its delta
/// taken after each batch, and its records written to the store every `checkpoint_every`
/// batches.
struct Engine {
    store: MemoryStore,
    set: WorkingSet,
    aggregates: Aggregates,
    tenants: Tenants,
    checkpoint_every: usize,
    batches: usize,
}

impl Engine {
    fn new() -> Engine {
        Engine::with_checkpoints(1)
    }

    fn with_checkpoints(checkpoint_every: usize) -> Engine {
        Engine {
            store: MemoryStore::default(),
            set: WorkingSet::new(),
            aggregates: Aggregates::default(),
            tenants: tenants(),
            checkpoint_every,
            batches: 0,
        }
    }

    fn apply_batch(&mut self, events: &[Event]) -> Vec<Outcome> {
        let mut batch = self.set.batch(&self.store, &self.tenants);
        let outcomes = events
            .iter()
            .map(|event| batch.apply(event).expect("memory store"))
            .collect();
        self.aggregates.merge(self.set.take_delta(&self.tenants));
        self.batches += 1;
        if self.batches.is_multiple_of(self.checkpoint_every) {
            self.checkpoint();
        }
        outcomes
    }

    /// Writes the changed records; their delta was already taken.
    fn checkpoint(&mut self) {
        let output = std::mem::take(&mut self.set).finish(&self.tenants);
        assert_eq!(output.delta, Aggregates::default(), "delta taken per batch");
        for (key, record) in output.writes {
            match record {
                Some(record) => self.store.records.insert(key, record),
                None => self.store.records.remove(&key),
            };
        }
    }
}

/// A deterministic shuffle, duplication and split of the history into batches.
fn deliveries(events: &[Event], seed: u64) -> Vec<Vec<Event>> {
    let mut state = seed | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut stream: Vec<Event> = Vec::new();
    for event in events {
        stream.push(event.clone());
        while next() % 4 == 0 {
            stream.push(event.clone());
        }
    }
    for i in (1..stream.len()).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        stream.swap(i, j);
    }
    let mut batches = Vec::new();
    while !stream.is_empty() {
        let size = 1 + (next() % 9) as usize;
        let rest = stream.split_off(size.min(stream.len()));
        batches.push(std::mem::replace(&mut stream, rest));
    }
    batches
}

// ---------------------------------------------------------------------------------------------
// The reference: a batch recomputation over the distinct events, read off SPEC

struct RefLead {
    channel: String,
    campaign: Option<String>,
    created: DateTime<Utc>,
    qualified: bool,
    stages: BTreeSet<String>,
}
struct RefDeal {
    time: DateTime<Utc>,
    amount: Decimal,
    customer: String,
    lead_id: Option<String>,
    channel: String,
    campaign: Option<String>,
}
struct RefSpend {
    date: NaiveDate,
    amount: Decimal,
    channel: Option<String>,
    campaign: Option<String>,
}

struct RefTenant {
    settings: TenantSettings,
    leads: BTreeMap<String, RefLead>,
    deals: BTreeMap<String, RefDeal>,
    spend: Vec<RefSpend>,
}

fn latest<'e>(events: &[&'e Event]) -> Option<&'e Event> {
    events
        .iter()
        .copied()
        .max_by(|a, b| (a.time, &a.id).cmp(&(b.time, &b.id)))
}

fn reference(events: &[Event], tenants: &Tenants) -> BTreeMap<String, RefTenant> {
    let mut seen = BTreeSet::new();
    let mut by_tenant: BTreeMap<&str, Vec<&Event>> = BTreeMap::new();
    for event in events {
        if seen.insert((event.tenant.clone(), event.id.clone())) {
            by_tenant.entry(&event.tenant).or_default().push(event);
        }
    }
    let mut out = BTreeMap::new();
    for (tenant, events) in by_tenant {
        let settings = tenants.get(tenant).clone();
        let convert = |amount: Decimal, currency: &str| {
            if currency == settings.currency {
                amount
            } else {
                amount * settings.fx[currency]
            }
        };
        let mut created: BTreeMap<&str, Vec<&Event>> = BTreeMap::new();
        let mut qualifications: BTreeMap<&str, Vec<(Timestamp, &str, bool)>> = BTreeMap::new();
        let mut stages: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
        let mut deal_events: BTreeMap<&str, Vec<&Event>> = BTreeMap::new();
        let mut spend_events: BTreeMap<String, Vec<&Event>> = BTreeMap::new();
        for event in &events {
            match &event.data {
                EventData::LeadCreated {
                    lead_id, qualified, ..
                } => {
                    created.entry(lead_id).or_default().push(event);
                    if let Some(q) = qualified {
                        qualifications
                            .entry(lead_id)
                            .or_default()
                            .push((event.time, &event.id, *q));
                    }
                }
                EventData::LeadQualified { lead_id, qualified } => {
                    qualifications
                        .entry(lead_id)
                        .or_default()
                        .push((event.time, &event.id, *qualified));
                }
                EventData::LeadStageChanged { lead_id, stage } => {
                    stages.entry(lead_id).or_default().insert(stage.clone());
                }
                EventData::DealWon { deal_id, .. } | EventData::DealLost { deal_id, .. } => {
                    deal_events.entry(deal_id).or_default().push(event);
                }
                EventData::SpendReported {
                    date,
                    channel,
                    campaign,
                    category,
                    source,
                    account,
                    ..
                } => {
                    let key = format!(
                        "{source:?}|{account:?}|{channel:?}|{campaign:?}|{category:?}|{date}"
                    );
                    spend_events.entry(key).or_default().push(event);
                }
            }
        }
        let mut leads = BTreeMap::new();
        for (lead_id, list) in &created {
            let event = latest(list).expect("non-empty");
            let EventData::LeadCreated {
                channel, campaign, ..
            } = &event.data
            else {
                unreachable!()
            };
            let qualified = qualifications
                .get(lead_id)
                .and_then(|q| q.iter().max())
                .is_some_and(|q| q.2);
            leads.insert(
                lead_id.to_string(),
                RefLead {
                    channel: channel.clone().unwrap_or_else(|| "unattributed".into()),
                    campaign: campaign.clone(),
                    created: event.time.to_datetime(),
                    qualified,
                    stages: stages.get(lead_id).cloned().unwrap_or_default(),
                },
            );
        }
        let mut deals = BTreeMap::new();
        for (deal_id, list) in &deal_events {
            let event = latest(list).expect("non-empty");
            let EventData::DealWon {
                customer_id,
                amount,
                currency,
                lead_id,
                channel,
                campaign,
                ..
            } = &event.data
            else {
                continue;
            };
            let (channel, campaign) = match lead_id.as_ref().and_then(|id| leads.get(id)) {
                Some(lead) => (lead.channel.clone(), lead.campaign.clone()),
                None => (
                    channel.clone().unwrap_or_else(|| "unattributed".into()),
                    campaign.clone(),
                ),
            };
            deals.insert(
                deal_id.to_string(),
                RefDeal {
                    time: event.time.to_datetime(),
                    amount: convert(*amount, currency),
                    customer: customer_id.clone(),
                    lead_id: lead_id.clone(),
                    channel,
                    campaign,
                },
            );
        }
        let spend = spend_events
            .values()
            .map(|list| {
                let event = latest(list).expect("non-empty");
                let EventData::SpendReported {
                    date,
                    amount,
                    currency,
                    channel,
                    campaign,
                    ..
                } = &event.data
                else {
                    unreachable!()
                };
                RefSpend {
                    date: *date,
                    amount: convert(*amount, currency),
                    channel: channel.clone(),
                    campaign: campaign.clone(),
                }
            })
            .collect();
        out.insert(
            tenant.to_string(),
            RefTenant {
                settings,
                leads,
                deals,
                spend,
            },
        );
    }
    out
}

fn in_period(settings: &TenantSettings, time: DateTime<Utc>, period: Period) -> bool {
    Period::containing(time.with_timezone(&settings.timezone).date_naive()).contains(&period)
}

#[derive(Default)]
struct RefRow {
    spend: Decimal,
    revenue: Decimal,
    new_customers: i64,
    leads: i64,
    qualified: i64,
    converted: i64,
    stages: BTreeMap<String, i64>,
}

fn ratio_json(numerator: f64, denominator: f64) -> Value {
    if denominator == 0.0 {
        Value::Null
    } else {
        serde_json::json!(numerator / denominator)
    }
}

fn row_json(row: &RefRow) -> Value {
    let spend = to_f64(row.spend);
    serde_json::json!({
        "spend": format_money(row.spend), "new_customers": row.new_customers,
        "cac": if row.new_customers == 0 { Value::Null } else { serde_json::json!(spend / row.new_customers as f64) },
        "leads": row.leads, "qualified_leads": row.qualified, "qualified_lead_rate": ratio_json(row.qualified as f64, row.leads as f64),
        "converted_leads": row.converted, "conversion_rate": ratio_json(row.converted as f64, row.leads as f64),
        "revenue": format_money(row.revenue),
        "roi": if row.spend.is_zero() { Value::Null } else { serde_json::json!(to_f64(row.revenue - row.spend) / spend) },
        "roas": ratio_json(to_f64(row.revenue), spend),
        "stages": row.stages.iter().map(|(s, n)| (s.clone(), serde_json::json!(*n as f64 / row.leads as f64))).collect::<serde_json::Map<_, _>>(),
    })
}

fn reference_kpis(tenant: &str, t: &RefTenant, period: Period) -> Value {
    let mut total = RefRow::default();
    let mut channels: BTreeMap<String, RefRow> = BTreeMap::new();
    let mut campaigns: BTreeMap<String, (Decimal, Decimal, BTreeMap<String, i64>)> =
        BTreeMap::new();
    for line in &t.spend {
        if !Period::containing(line.date).contains(&period) {
            continue;
        }
        total.spend += line.amount;
        if let Some(channel) = &line.channel {
            channels.entry(channel.clone()).or_default().spend += line.amount;
        }
        if let Some(campaign) = &line.campaign {
            let entry = campaigns.entry(campaign.clone()).or_default();
            entry.0 += line.amount;
            if let Some(channel) = &line.channel {
                *entry.2.entry(channel.clone()).or_default() += 1;
            }
        }
    }
    let converted: BTreeSet<&String> = t
        .deals
        .values()
        .filter_map(|d| d.lead_id.as_ref())
        .collect();
    for (lead_id, lead) in &t.leads {
        if !in_period(&t.settings, lead.created, period) {
            continue;
        }
        for row in [
            &mut total,
            channels.entry(lead.channel.clone()).or_default(),
        ] {
            row.leads += 1;
            row.qualified += i64::from(lead.qualified);
            row.converted += i64::from(converted.contains(lead_id));
            for stage in &lead.stages {
                *row.stages.entry(stage.clone()).or_default() += 1;
            }
        }
    }
    // SPEC: a stage rate is defined whenever the period has leads; every stage a lead of the
    // tenant ever reached is rated, 0 included.
    let known_stages: BTreeSet<&String> = t.leads.values().flat_map(|l| &l.stages).collect();
    for row in std::iter::once(&mut total).chain(channels.values_mut()) {
        if row.leads > 0 {
            for stage in &known_stages {
                row.stages.entry((*stage).clone()).or_default();
            }
        }
    }
    let mut first: BTreeMap<&String, (DateTime<Utc>, &String, &RefDeal)> = BTreeMap::new();
    for (deal_id, deal) in &t.deals {
        let candidate = (deal.time, deal_id, deal);
        match first.get(&deal.customer) {
            Some(existing) if (existing.0, existing.1) <= (deal.time, deal_id) => {}
            _ => {
                first.insert(&deal.customer, candidate);
            }
        }
        if in_period(&t.settings, deal.time, period) {
            total.revenue += deal.amount;
            channels.entry(deal.channel.clone()).or_default().revenue += deal.amount;
            if let Some(campaign) = &deal.campaign {
                let entry = campaigns.entry(campaign.clone()).or_default();
                entry.1 += deal.amount;
                *entry.2.entry(deal.channel.clone()).or_default() += 1;
            }
        }
    }
    for (time, _, deal) in first.values() {
        if in_period(&t.settings, *time, period) {
            total.new_customers += 1;
            channels
                .entry(deal.channel.clone())
                .or_default()
                .new_customers += 1;
        }
    }
    let channels: serde_json::Map<String, Value> = channels
        .iter()
        .filter(|(_, r)| {
            !(r.spend.is_zero() && r.revenue.is_zero() && r.leads == 0 && r.new_customers == 0)
        })
        .map(|(c, r)| (c.clone(), row_json(r)))
        .collect();
    let campaigns: serde_json::Map<String, Value> = campaigns.iter()
        .filter(|(_, (s, r, votes))| !(s.is_zero() && r.is_zero() && votes.is_empty()))
        .map(|(name, (spend, revenue, votes))| {
            let channel = votes.iter().max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0))).map(|(c, _)| c.clone());
            (name.clone(), serde_json::json!({
                "channel": channel, "spend": format_money(*spend), "revenue": format_money(*revenue),
                "roi": if spend.is_zero() { Value::Null } else { serde_json::json!(to_f64(*revenue - *spend) / to_f64(*spend)) },
                "roas": ratio_json(to_f64(*revenue), to_f64(*spend)),
            }))
        }).collect();
    serde_json::json!({"tenant": tenant, "period": period.to_string(), "currency": t.settings.currency,
        "total": row_json(&total), "channels": channels, "campaigns": campaigns})
}

/// What a series entry of one scope must hold: the KPI row of the leads, deals, first deals
/// and spend lines attributed to it (SPEC section 3, series), computed on its own.
#[derive(Clone, Copy)]
enum RefScope<'a> {
    Total,
    Channel(&'a str),
    Campaign(&'a str),
}

fn reference_scope_row(t: &RefTenant, period: Period, scope: RefScope) -> Value {
    let matches = |channel: Option<&str>, campaign: Option<&str>| match scope {
        RefScope::Total => true,
        RefScope::Channel(name) => channel == Some(name),
        RefScope::Campaign(name) => campaign == Some(name),
    };
    let mut row = RefRow::default();
    for line in &t.spend {
        if Period::containing(line.date).contains(&period)
            && matches(line.channel.as_deref(), line.campaign.as_deref())
        {
            row.spend += line.amount;
        }
    }
    let converted: BTreeSet<&String> = t
        .deals
        .values()
        .filter_map(|d| d.lead_id.as_ref())
        .collect();
    for (lead_id, lead) in &t.leads {
        if in_period(&t.settings, lead.created, period)
            && matches(Some(&lead.channel), lead.campaign.as_deref())
        {
            row.leads += 1;
            row.qualified += i64::from(lead.qualified);
            row.converted += i64::from(converted.contains(lead_id));
            for stage in &lead.stages {
                *row.stages.entry(stage.clone()).or_default() += 1;
            }
        }
    }
    if row.leads > 0 {
        for stage in t.leads.values().flat_map(|l| &l.stages) {
            row.stages.entry(stage.clone()).or_default();
        }
    }
    let mut first: BTreeMap<&String, (DateTime<Utc>, &String, &RefDeal)> = BTreeMap::new();
    for (deal_id, deal) in &t.deals {
        match first.get(&deal.customer) {
            Some(existing) if (existing.0, existing.1) <= (deal.time, deal_id) => {}
            _ => {
                first.insert(&deal.customer, (deal.time, deal_id, deal));
            }
        }
        if in_period(&t.settings, deal.time, period)
            && matches(Some(&deal.channel), deal.campaign.as_deref())
        {
            row.revenue += deal.amount;
        }
    }
    for (time, _, deal) in first.values() {
        if in_period(&t.settings, *time, period)
            && matches(Some(&deal.channel), deal.campaign.as_deref())
        {
            row.new_customers += 1;
        }
    }
    row_json(&row)
}

fn reference_retention(tenant: &str, t: &RefTenant, year: i32) -> Value {
    let mut years: BTreeMap<&String, BTreeSet<i32>> = BTreeMap::new();
    for deal in t.deals.values() {
        years
            .entry(&deal.customer)
            .or_default()
            .insert(deal.time.with_timezone(&t.settings.timezone).year());
    }
    let active: Vec<_> = years.values().filter(|ys| ys.contains(&year)).collect();
    let previous = years.values().filter(|ys| ys.contains(&(year - 1))).count() as f64;
    let retained = active.iter().filter(|ys| ys.contains(&(year - 1))).count();
    let loyalty: serde_json::Map<String, Value> = (2..=5)
        .map(|k| {
            let loyal = active
                .iter()
                .filter(|ys| (year - k + 1..=year).all(|y| ys.contains(&y)))
                .count();
            (k.to_string(), ratio_json(loyal as f64, active.len() as f64))
        })
        .collect();
    serde_json::json!({"tenant": tenant, "year": year, "active_customers": active.len(), "retained_customers": retained,
        "retention_rate": ratio_json(retained as f64, previous), "loyalty": loyalty})
}

// ---------------------------------------------------------------------------------------------
// Comparison

fn assert_same(path: &str, want: &Value, got: &Value) -> Result<(), TestCaseError> {
    match (want, got) {
        (Value::Number(w), Value::Number(g)) => {
            let (w, g) = (
                w.as_f64().unwrap_or(f64::NAN),
                g.as_f64().unwrap_or(f64::NAN),
            );
            prop_assert!(
                (w - g).abs() <= 1e-9 * w.abs().max(1.0),
                "{path}: want {w} got {g}"
            );
        }
        (Value::Object(w), Value::Object(g)) => {
            let keys: BTreeSet<&String> = w.keys().chain(g.keys()).collect();
            for key in keys {
                assert_same(
                    &format!("{path}.{key}"),
                    w.get(key).unwrap_or(&Value::Null),
                    g.get(key).unwrap_or(&Value::Null),
                )?;
            }
        }
        _ => prop_assert_eq!(want, got, "at {}", path),
    }
    Ok(())
}

fn periods_to_check(events: &[Event], tenants: &Tenants) -> BTreeSet<(String, Period)> {
    let mut periods = BTreeSet::new();
    for event in events {
        let settings = tenants.get(&event.tenant);
        let mut dates = vec![settings.local_date(event.time)];
        if let EventData::SpendReported { date, .. } = &event.data {
            dates.push(*date);
        }
        for date in dates {
            for period in Period::containing(date) {
                periods.insert((event.tenant.clone(), period));
            }
        }
    }
    periods
}

fn check_history(events: &[Event], seed: u64) -> Result<(), TestCaseError> {
    // Records are written after every batch, or coalesced over up to five batches.
    let mut engine = Engine::with_checkpoints(1 + (seed % 5) as usize);
    let mut applied = 0;
    for batch in deliveries(events, seed) {
        applied += engine
            .apply_batch(&batch)
            .iter()
            .filter(|o| **o == Outcome::Applied)
            .count();
    }
    prop_assert_eq!(
        applied,
        events.len(),
        "each distinct event is applied exactly once"
    );

    let tenants = tenants();
    let expected = reference(events, &tenants);
    for (tenant, period) in periods_to_check(events, &tenants) {
        let want = reference_kpis(&tenant, &expected[&tenant], period);
        let got = serde_json::to_value(KpiReport::build(
            &tenant,
            "EUR",
            engine.aggregates.tenant(&tenant),
            period,
        ))
        .expect("serialisable");
        assert_same(&format!("{tenant} {period}"), &want, &got)?;
    }
    for (tenant, t) in &expected {
        for year in 2022..=2027 {
            let want = reference_retention(tenant, t, year);
            let got = serde_json::to_value(RetentionReport::build(
                tenant,
                engine.aggregates.tenant(tenant),
                year,
            ))
            .expect("serialisable");
            assert_same(&format!("{tenant} retention {year}"), &want, &got)?;
        }
    }
    for (tenant, t) in &expected {
        check_series(tenant, t, engine.aggregates.tenant(tenant))?;
    }
    engine.checkpoint();
    let rebuilt = aggregate_records(engine.store.records.iter(), &tenants);
    prop_assert!(
        rebuilt == engine.aggregates,
        "a rebuild from the records equals the incremental aggregates"
    );
    Ok(())
}

/// Every series (month, quarter and year over the whole history, and the retention series)
/// of every scope equals the reference, period by period, empty periods included.
fn check_series(
    tenant: &str,
    t: &RefTenant,
    aggregates: Option<&kpi_model::TenantAggregates>,
) -> Result<(), TestCaseError> {
    let mut scopes = vec![(Scope::Total, RefScope::Total)];
    for channel in ["unattributed", "seo", "social", "email"] {
        scopes.push((
            Scope::Channel(channel.to_string()),
            RefScope::Channel(channel),
        ));
    }
    for campaign in ["spring", "retarget"] {
        scopes.push((
            Scope::Campaign(campaign.to_string()),
            RefScope::Campaign(campaign),
        ));
    }
    for (from, to) in [
        ("2022-12", "2027-01"),
        ("2022-Q4", "2027-Q1"),
        ("2022", "2027"),
    ] {
        let (from, to): (Period, Period) =
            (from.parse().expect("period"), to.parse().expect("period"));
        for (scope, ref_scope) in &scopes {
            let series = KpiSeries::build(tenant, "EUR", aggregates, scope, from, to);
            let periods: Vec<Period> = from.through(to).collect();
            prop_assert_eq!(series.series.len(), periods.len());
            for (period, entry) in periods.iter().zip(&series.series) {
                prop_assert_eq!(&entry.period, &period.to_string());
                let want = reference_scope_row(t, *period, *ref_scope);
                let got = serde_json::to_value(&entry.row).expect("serialisable");
                assert_same(&format!("{tenant} {scope:?} {period}"), &want, &got)?;
            }
        }
    }
    let retention = RetentionSeries::build(tenant, aggregates, 2021..=2028);
    for entry in &retention.series {
        let want = reference_retention(tenant, t, entry.year);
        let mut got = serde_json::to_value(entry).expect("serialisable");
        got["tenant"] = Value::String(tenant.to_string());
        assert_same(
            &format!("{tenant} retention series {}", entry.year),
            &want,
            &got,
        )?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn any_order_duplication_and_batching_gives_the_batch_result(events in history_strategy(), seed in any::<u64>()) {
        check_history(&events, seed)?;
    }

    #[test]
    fn two_deliveries_of_one_history_agree_exactly(events in history_strategy(), seed_a in any::<u64>(), seed_b in any::<u64>()) {
        let run = |seed| {
            let mut engine = Engine::with_checkpoints(1 + (seed % 3) as usize);
            for batch in deliveries(&events, seed) { engine.apply_batch(&batch); }
            engine.checkpoint();
            (engine.aggregates, engine.store.records)
        };
        let (aggregates_a, records_a) = run(seed_a);
        let (aggregates_b, records_b) = run(seed_b);
        prop_assert!(aggregates_a == aggregates_b);
        prop_assert!(records_a == records_b);
    }
}

// ---------------------------------------------------------------------------------------------
// Named cases from SPEC

fn event(id: &str, time: &str, data: EventData) -> Event {
    let time = DateTime::parse_from_rfc3339(time)
        .expect("time")
        .with_timezone(&Utc);
    Event {
        tenant: "acme".into(),
        id: id.into(),
        source: "test".into(),
        time: Timestamp::from_datetime(time).expect("range"),
        data,
    }
}

fn spend(id: &str, time: &str, amount: &str) -> Event {
    event(
        id,
        time,
        EventData::SpendReported {
            date: NaiveDate::from_ymd_opt(2026, 3, 4).expect("date"),
            amount: Decimal::from_str(amount).expect("amount"),
            currency: "EUR".into(),
            channel: Some("social".into()),
            campaign: None,
            category: kpi_model::event::SpendCategory::Media,
            source: Some("meta".into()),
            account: Some("a".into()),
        },
    )
}

fn month_report(engine: &Engine) -> KpiReport {
    KpiReport::build(
        "acme",
        "EUR",
        engine.aggregates.tenant("acme"),
        "2026-03".parse().expect("period"),
    )
}

#[test]
fn restated_spend_replaces_and_a_stale_correction_loses() {
    let mut engine = Engine::new();
    engine.apply_batch(&[spend("s1", "2026-03-04T23:00:00Z", "100.00")]);
    engine.apply_batch(&[spend("s2", "2026-03-05T08:00:00Z", "120.00")]);
    engine.apply_batch(&[spend("s0", "2026-03-04T20:00:00Z", "999.00")]);
    assert_eq!(month_report(&engine).total.spend, "120.00");
    assert_eq!(month_report(&engine).channels["social"].spend, "120.00");
}

#[test]
fn a_deal_before_its_lead_moves_to_the_lead_channel_when_the_lead_arrives() {
    let mut engine = Engine::new();
    let won = event(
        "d1",
        "2026-03-10T10:00:00Z",
        EventData::DealWon {
            deal_id: "D1".into(),
            customer_id: "C1".into(),
            amount: Decimal::from(500),
            currency: "EUR".into(),
            lead_id: Some("L1".into()),
            channel: Some("events".into()),
            campaign: None,
        },
    );
    engine.apply_batch(std::slice::from_ref(&won));
    assert_eq!(month_report(&engine).channels["events"].revenue, "500.00");
    let lead = event(
        "l1",
        "2026-03-01T10:00:00Z",
        EventData::LeadCreated {
            lead_id: "L1".into(),
            channel: Some("seo".into()),
            campaign: None,
            qualified: Some(true),
            customer_id: None,
        },
    );
    engine.apply_batch(&[lead]);
    let report = month_report(&engine);
    assert!(
        !report.channels.contains_key("events"),
        "attribution moved away from the deal's own channel"
    );
    assert_eq!(report.channels["seo"].revenue, "500.00");
    assert_eq!(report.channels["seo"].new_customers, 1);
    assert_eq!(report.total.conversion_rate, Some(1.0));
    // the same deal delivered again changes nothing
    assert_eq!(engine.apply_batch(&[won]), vec![Outcome::Duplicate]);
    assert_eq!(month_report(&engine).total.revenue, "500.00");
}

#[test]
fn a_later_lost_cancels_a_won_deal_and_an_older_one_does_not() {
    let mut engine = Engine::new();
    let won = |id: &str, time: &str| {
        event(
            id,
            time,
            EventData::DealWon {
                deal_id: "D1".into(),
                customer_id: "C1".into(),
                amount: Decimal::from(80),
                currency: "EUR".into(),
                lead_id: None,
                channel: None,
                campaign: None,
            },
        )
    };
    let lost = |id: &str, time: &str| {
        event(
            id,
            time,
            EventData::DealLost {
                deal_id: "D1".into(),
                lead_id: None,
            },
        )
    };
    engine.apply_batch(&[
        won("w", "2026-03-10T10:00:00Z"),
        lost("old", "2026-03-09T10:00:00Z"),
    ]);
    assert_eq!(
        month_report(&engine).channels["unattributed"].revenue,
        "80.00"
    );
    engine.apply_batch(&[lost("new", "2026-03-11T10:00:00Z")]);
    let report = month_report(&engine);
    assert_eq!(report.total.revenue, "0.00");
    assert_eq!(report.total.new_customers, 0);
    assert!(report.channels.is_empty());
}

#[test]
fn cac_is_infinite_as_a_gauge_and_null_in_json_when_spend_brings_no_customer() {
    let mut engine = Engine::new();
    engine.apply_batch(&[spend("s1", "2026-03-04T23:00:00Z", "100.00")]);
    let cells = engine
        .aggregates
        .tenant("acme")
        .and_then(|t| t.period(&"2026-03".parse().expect("period")))
        .expect("cells");
    assert_eq!(
        kpi_model::report::cac_gauge(&cells.total),
        Some(f64::INFINITY)
    );
    assert_eq!(month_report(&engine).total.cac, None);
    assert_eq!(
        kpi_model::report::cac_gauge(&kpi_model::Cell::default()),
        None
    );
}

#[test]
fn loyalty_counts_customers_buying_in_consecutive_years() {
    let mut engine = Engine::new();
    let mut events = Vec::new();
    for (n, year) in [2023, 2024, 2025, 2026].iter().enumerate() {
        events.push(event(
            &format!("a{n}"),
            &format!("{year}-06-01T00:00:00Z"),
            EventData::DealWon {
                deal_id: format!("A{year}"),
                customer_id: "loyal".into(),
                amount: Decimal::ONE,
                currency: "EUR".into(),
                lead_id: None,
                channel: None,
                campaign: None,
            },
        ));
    }
    events.push(event(
        "b",
        "2026-02-01T00:00:00Z",
        EventData::DealWon {
            deal_id: "B".into(),
            customer_id: "new".into(),
            amount: Decimal::ONE,
            currency: "EUR".into(),
            lead_id: None,
            channel: None,
            campaign: None,
        },
    ));
    engine.apply_batch(&events);
    let report = RetentionReport::build("acme", engine.aggregates.tenant("acme"), 2026);
    assert_eq!(report.active_customers, 2);
    assert_eq!(report.retained_customers, 1);
    assert_eq!(report.retention_rate, Some(1.0));
    assert_eq!(report.loyalty["4"], Some(0.5));
    assert_eq!(report.loyalty["5"], Some(0.0));
}
