//! `kpi demo`: a deterministic, realistic history of a small B2B company over six years (by
//! default), so a new user sees meaningful KPIs and their trends at once — loyalty over 2 to 5
//! years included.
//!
//! Six channels (paid search, social, email, trade shows, SEO, referral) with campaigns; daily
//! ad spend restated the next morning as ad platforms do; monthly tool subscriptions with no
//! channel; leads qualified and moving through stages; deals won weeks later, some cancelled;
//! customers coming back the following years; a business that grows and keeps its customers
//! better year after year; and two invalid events that land in the dead-letter stream.
//!
//! The figures are meant to look like an SME's: a few hundred euros of ads a day, a trade show
//! a year, first deals of 300 to 2,000 €, a blended ROI around 1, e-mail cheap but not free (a
//! tool plan and an agency writing the newsletter).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Utc};
use kpi_model::event::SpendCategory;
use kpi_model::money::Decimal;
use kpi_model::{Event, EventData};

use crate::publish::Outgoing;

/// A small deterministic generator (xorshift64*), enough for demo data.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn chance(&mut self, probability: f64) -> bool {
        self.unit() < probability
    }

    fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.next() % (high - low + 1)
    }

    /// An amount in cents between the bounds.
    fn money(&mut self, low_cents: u64, high_cents: u64) -> Decimal {
        Decimal::new(self.between(low_cents, high_cents) as i64, 2)
    }
}

struct Channel {
    name: &'static str,
    campaigns: &'static [&'static str],
    /// Share of leads.
    weight: f64,
    qualified: f64,
    source: &'static str,
}

const CHANNELS: &[Channel] = &[
    Channel {
        name: "paid_search",
        campaigns: &["brand-search", "generic-search"],
        weight: 0.30,
        qualified: 0.50,
        source: "google_ads",
    },
    Channel {
        name: "social",
        campaigns: &["spring-promo", "retargeting"],
        weight: 0.25,
        qualified: 0.35,
        source: "meta_ads",
    },
    Channel {
        name: "email",
        campaigns: &["newsletter"],
        weight: 0.15,
        qualified: 0.45,
        source: "mailchimp",
    },
    Channel {
        name: "seo",
        campaigns: &[],
        weight: 0.15,
        qualified: 0.55,
        source: "website",
    },
    Channel {
        name: "events",
        campaigns: &["trade-show"],
        weight: 0.05,
        qualified: 0.70,
        source: "salon",
    },
    Channel {
        name: "referral",
        campaigns: &[],
        weight: 0.10,
        qualified: 0.80,
        source: "crm",
    },
];

/// Collects events and releases them in time order once the generation passes their time,
/// so a long history streams with bounded memory.
struct Builder<'s> {
    tenant: String,
    count: u64,
    /// By time, then order of generation.
    pending: BTreeMap<(DateTime<Utc>, u64), Outgoing>,
    sink: &'s mut dyn FnMut(Outgoing),
}

impl Builder<'_> {
    fn emit(&mut self, time: DateTime<Utc>, data: EventData) {
        self.count += 1;
        let id = format!("demo-{}-{:08}", self.tenant, self.count);
        // Demo times are whole seconds between 2000 and now: always representable.
        let Some(event) = Event::new(&self.tenant, &id, "kpi-demo", time, data) else {
            return;
        };
        self.pending
            .insert((time, self.count), Outgoing::from_event(&event));
    }

    /// Hands over every event strictly before `until`, oldest first.
    fn release(&mut self, until: DateTime<Utc>) {
        while self
            .pending
            .first_key_value()
            .is_some_and(|((time, _), _)| *time < until)
        {
            let Some((_, event)) = self.pending.pop_first() else {
                break;
            };
            (self.sink)(event);
        }
    }
}

fn at(date: NaiveDate, seconds: u64) -> DateTime<Utc> {
    Utc.from_utc_datetime(&date.and_hms_opt(0, 0, 0).unwrap_or_default())
        + Duration::seconds(seconds as i64)
}

/// The history, oldest first, ending before `now`.
pub fn history(
    tenant: &str,
    seed: u64,
    leads_per_day: u32,
    years: u32,
    now: DateTime<Utc>,
) -> Vec<Outgoing> {
    let mut events = Vec::new();
    stream_history(tenant, seed, leads_per_day, years, now, &mut |event| {
        events.push(event)
    });
    events
}

/// The history, handed to `sink` oldest first; memory stays bounded by the events still to
/// come within a few weeks (a deal comes at most 45 days after its lead).
pub fn stream_history(
    tenant: &str,
    seed: u64,
    leads_per_day: u32,
    years: u32,
    now: DateTime<Utc>,
    sink: &mut dyn FnMut(Outgoing),
) {
    let mut random = Random(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut out = Builder {
        tenant: tenant.to_string(),
        count: 0,
        pending: BTreeMap::new(),
        sink,
    };
    let today = now.date_naive();
    let start =
        NaiveDate::from_ymd_opt(today.year() - years as i32, today.month(), 1).unwrap_or(today);
    let history_days = (today - start).num_days().max(1) as f64;
    let past = |time: DateTime<Utc>| time < now - Duration::minutes(1);
    let mut customer_count = 0u64;
    let mut lead_count = 0u64;

    let mut day = start;
    while day <= today {
        // 0 at the start of the history, 1 today: the company grows (more leads) and keeps its
        // customers better (more of them come back).
        let progress = (day - start).num_days() as f64 / history_days;
        // Spend: ads every day, restated the next morning one time in five.
        for channel in CHANNELS
            .iter()
            .filter(|c| matches!(c.name, "paid_search" | "social"))
        {
            for campaign in channel.campaigns {
                if *campaign == "spring-promo" && !(3..=5).contains(&day.month()) {
                    continue;
                }
                let reported = at(day, 23 * 3600 + 30 * 60);
                if !past(reported) {
                    continue;
                }
                let line = |amount| EventData::SpendReported {
                    date: day,
                    amount,
                    currency: "EUR".into(),
                    channel: Some(channel.name.into()),
                    campaign: Some((*campaign).into()),
                    category: SpendCategory::Media,
                    source: Some(channel.source.into()),
                    account: Some("acct-1".into()),
                };
                let (low, high) = if channel.name == "paid_search" {
                    (8_000, 30_000)
                } else {
                    (6_000, 26_000)
                };
                out.emit(reported, line(random.money(low, high)));
                let restated_at = reported + Duration::hours(7);
                if random.chance(0.2) && past(restated_at) {
                    out.emit(restated_at, line(random.money(low, high)));
                }
            }
        }
        let fixed = |amount: i64,
                     channel: Option<&str>,
                     campaign: Option<&str>,
                     category,
                     source: &str,
                     account: Option<&str>| {
            EventData::SpendReported {
                date: day,
                amount: Decimal::new(amount, 2),
                currency: "EUR".into(),
                channel: channel.map(str::to_string),
                campaign: campaign.map(str::to_string),
                category,
                source: Some(source.into()),
                account: account.map(str::to_string),
            }
        };
        if day.day() == 1 && past(at(day, 8 * 3600)) {
            out.emit(
                at(day, 8 * 3600),
                fixed(
                    3900,
                    Some("email"),
                    Some("newsletter"),
                    SpendCategory::Tools,
                    "mailchimp",
                    Some("plan"),
                ),
            );
            out.emit(
                at(day, 8 * 3600),
                fixed(
                    85_000,
                    Some("email"),
                    Some("newsletter"),
                    SpendCategory::Other,
                    "agency",
                    Some("newsletter-writing"),
                ),
            );
            out.emit(
                at(day, 8 * 3600),
                fixed(
                    4990,
                    None,
                    None,
                    SpendCategory::Tools,
                    "billing",
                    Some("crm-subscription"),
                ),
            );
        }
        if day.month() == 10 && day.day() == 15 && past(at(day, 9 * 3600)) {
            out.emit(
                at(day, 9 * 3600),
                fixed(
                    1_200_000,
                    Some("events"),
                    Some("trade-show"),
                    SpendCategory::Media,
                    "invoice",
                    None,
                ),
            );
        }

        // Leads, their qualification and stages, and deals weeks later.
        let leads_today = random.between(
            0,
            (f64::from(leads_per_day) * 2.0 * (0.6 + 0.4 * progress)).round() as u64,
        );
        for _ in 0..leads_today {
            let mut pick = random.unit();
            let channel = CHANNELS
                .iter()
                .find(|c| {
                    pick -= c.weight;
                    pick < 0.0
                })
                .unwrap_or(&CHANNELS[0]);
            let created = at(day, random.between(8 * 3600, 19 * 3600));
            if !past(created) {
                continue;
            }
            lead_count += 1;
            let lead_id = format!("L{lead_count}");
            let campaign = (!channel.campaigns.is_empty()).then(|| {
                channel.campaigns[random.between(0, channel.campaigns.len() as u64 - 1) as usize]
                    .to_string()
            });
            let qualified = random.chance(channel.qualified);
            let qualified_later = random.chance(0.3);
            out.emit(
                created,
                EventData::LeadCreated {
                    lead_id: lead_id.clone(),
                    channel: Some(channel.name.into()),
                    campaign,
                    qualified: (!qualified_later).then_some(qualified),
                    customer_id: None,
                },
            );
            if qualified_later {
                let when = created + Duration::hours(random.between(2, 72) as i64);
                if past(when) {
                    out.emit(
                        when,
                        EventData::LeadQualified {
                            lead_id: lead_id.clone(),
                            qualified,
                        },
                    );
                }
            }
            let mut stage_time = created;
            for (stage, probability) in [
                ("meeting_booked", if qualified { 0.6 } else { 0.1 }),
                ("quote_requested", if qualified { 0.7 } else { 0.3 }),
            ] {
                if !random.chance(probability) {
                    break;
                }
                stage_time += Duration::hours(random.between(4, 240) as i64);
                if past(stage_time) {
                    out.emit(
                        stage_time,
                        EventData::LeadStageChanged {
                            lead_id: lead_id.clone(),
                            stage: stage.into(),
                        },
                    );
                }
            }
            let win = if qualified { 0.15 } else { 0.015 };
            let win = if channel.name == "email" {
                win * 0.6
            } else {
                win
            };
            if !random.chance(win) {
                continue;
            }
            let won = created + Duration::hours(random.between(72, 45 * 24) as i64);
            if !past(won) {
                continue;
            }
            customer_count += 1;
            let customer = format!("C{customer_count}");
            let deal_id = format!("D{lead_count}");
            let won_deal = |deal_id: String, amount| EventData::DealWon {
                deal_id,
                customer_id: customer.clone(),
                amount,
                currency: "EUR".into(),
                lead_id: Some(lead_id.clone()),
                channel: None,
                campaign: None,
            };
            out.emit(
                won,
                won_deal(deal_id.clone(), random.money(30_000, 200_000)),
            );
            let cancelled = won + Duration::days(random.between(2, 20) as i64);
            if random.chance(0.05) && past(cancelled) {
                out.emit(
                    cancelled,
                    EventData::DealLost {
                        deal_id,
                        lead_id: Some(lead_id.clone()),
                    },
                );
                continue;
            }
            // Customers who come back in the following years.
            let mut when = won;
            while random.chance(0.38 + 0.14 * progress) {
                when += Duration::days(random.between(300, 420) as i64);
                if !past(when) {
                    break;
                }
                out.emit(
                    when,
                    won_deal(
                        format!("{deal_id}-{}", when.year()),
                        random.money(20_000, 140_000),
                    ),
                );
            }
        }
        // Everything generated from now on is dated from this day on.
        out.release(at(day, 0));
        day = day.succ_opt().unwrap_or(today + Duration::days(1));
    }

    // Two events a careful producer would not send: they go to the dead-letter stream.
    let yesterday = now - Duration::days(1);
    out.emit(
        yesterday,
        EventData::DealWon {
            deal_id: "D-bad".into(),
            customer_id: "C-bad".into(),
            amount: Decimal::new(-12_000, 2),
            currency: "EUR".into(),
            lead_id: None,
            channel: None,
            campaign: None,
        },
    );
    out.emit(
        yesterday,
        EventData::SpendReported {
            date: yesterday.date_naive(),
            amount: Decimal::new(12_000, 0),
            currency: "JPY".into(),
            channel: Some("social".into()),
            campaign: None,
            category: SpendCategory::Media,
            source: None,
            account: None,
        },
    );

    out.release(now + Duration::days(2));
}

pub fn write(events: &[Outgoing], path: &Path) -> anyhow::Result<()> {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    for event in events {
        file.write_all(&event.payload)?;
        file.write_all(b"\n")?;
    }
    file.flush()?;
    println!("wrote {} events to {}", events.len(), path.display());
    Ok(())
}
