//! `kpi demo`: a deterministic, realistic history of a small B2B company over two years, so a
//! new user sees meaningful KPIs at once.
//!
//! Six channels (paid search, social, email, trade shows, SEO, referral) with campaigns; daily
//! ad spend restated the next morning as ad platforms do; monthly tool subscriptions with no
//! channel; leads qualified and moving through stages; deals won weeks later, some cancelled;
//! customers coming back the following years; and two invalid events that land in the
//! dead-letter stream.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::Write;
use std::path::Path;

use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Utc};
use serde_json::{json, Value};

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

    /// An amount in cents between the bounds, as a decimal string.
    fn money(&mut self, low_cents: u64, high_cents: u64) -> String {
        let cents = self.between(low_cents, high_cents);
        format!("{}.{:02}", cents / 100, cents % 100)
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
    pending: BinaryHeap<Reverse<(DateTime<Utc>, u64, String)>>,
    sink: &'s mut dyn FnMut(Outgoing),
}

impl Builder<'_> {
    fn emit(&mut self, event_type: &str, time: DateTime<Utc>, data: Value) {
        self.count += 1;
        let line = json!({
            "specversion": "1.0",
            "id": format!("demo-{}-{:08}", self.tenant, self.count),
            "source": "kpi-demo",
            "type": event_type,
            "time": time.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
            "tenant": self.tenant,
            "data": data,
        })
        .to_string();
        self.pending.push(Reverse((time, self.count, line)));
    }

    /// Hands over every event strictly before `until`, oldest first.
    fn release(&mut self, until: DateTime<Utc>) {
        while self
            .pending
            .peek()
            .is_some_and(|Reverse((time, _, _))| *time < until)
        {
            let Some(Reverse((_, _, line))) = self.pending.pop() else {
                break;
            };
            let event =
                crate::publish::outgoing_from_line(&line, &self.tenant, 0).unwrap_or_else(|_| {
                    Outgoing {
                        subject: format!("kpi.events.{}.invalid", self.tenant),
                        id: None,
                        payload: line.into(),
                    }
                });
            (self.sink)(event);
        }
    }
}

fn at(date: NaiveDate, seconds: u64) -> DateTime<Utc> {
    Utc.from_utc_datetime(&date.and_hms_opt(0, 0, 0).unwrap_or_default())
        + Duration::seconds(seconds as i64)
}

/// The history, oldest first, ending before `now`.
pub fn history(tenant: &str, seed: u64, leads_per_day: u32, now: DateTime<Utc>) -> Vec<Outgoing> {
    let mut events = Vec::new();
    stream_history(tenant, seed, leads_per_day, now, &mut |event| {
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
    now: DateTime<Utc>,
    sink: &mut dyn FnMut(Outgoing),
) {
    let mut random = Random(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut out = Builder {
        tenant: tenant.to_string(),
        count: 0,
        pending: BinaryHeap::new(),
        sink,
    };
    let today = now.date_naive();
    let start = NaiveDate::from_ymd_opt(today.year() - 2, today.month(), 1).unwrap_or(today);
    let past = |time: DateTime<Utc>| time < now - Duration::minutes(1);
    let mut customer_count = 0u64;
    let mut lead_count = 0u64;

    let mut day = start;
    while day <= today {
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
                let data = json!({"date": day.to_string(), "amount": random.money(8000, 30000), "currency": "EUR",
                    "channel": channel.name, "campaign": campaign, "source": channel.source, "account": "acct-1"});
                out.emit("spend.reported", reported, data.clone());
                let restated_at = reported + Duration::hours(7);
                if random.chance(0.2) && past(restated_at) {
                    let mut restated = data;
                    restated["amount"] = json!(random.money(8000, 30000));
                    out.emit("spend.reported", restated_at, restated);
                }
            }
        }
        if day.day() == 1 && past(at(day, 8 * 3600)) {
            out.emit("spend.reported", at(day, 8 * 3600), json!({"date": day.to_string(), "amount": "39.00", "currency": "EUR",
                "channel": "email", "campaign": "newsletter", "source": "mailchimp", "account": "plan", "category": "tools"}));
            out.emit(
                "spend.reported",
                at(day, 8 * 3600),
                json!({"date": day.to_string(), "amount": "49.90", "currency": "EUR",
                "category": "tools", "source": "billing", "account": "crm-subscription"}),
            );
        }
        if day.month() == 10 && day.day() == 15 && past(at(day, 9 * 3600)) {
            out.emit("spend.reported", at(day, 9 * 3600), json!({"date": day.to_string(), "amount": "3500.00", "currency": "EUR",
                "channel": "events", "campaign": "trade-show", "source": "invoice", "category": "media"}));
        }

        // Leads, their qualification and stages, and deals weeks later.
        let leads_today = random.between(0, u64::from(leads_per_day) * 2);
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
            let mut data = json!({"lead_id": lead_id, "channel": channel.name});
            if !channel.campaigns.is_empty() {
                data["campaign"] = json!(
                    channel.campaigns
                        [random.between(0, channel.campaigns.len() as u64 - 1) as usize]
                );
            }
            let qualified = random.chance(channel.qualified);
            let qualified_later = random.chance(0.3);
            if !qualified_later {
                data["qualified"] = json!(qualified);
            }
            out.emit("lead.created", created, data);
            if qualified_later {
                let when = created + Duration::hours(random.between(2, 72) as i64);
                if past(when) {
                    out.emit(
                        "lead.qualified",
                        when,
                        json!({"lead_id": lead_id, "qualified": qualified}),
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
                        "lead.stage_changed",
                        stage_time,
                        json!({"lead_id": lead_id, "stage": stage}),
                    );
                }
            }
            if !random.chance(if qualified { 0.28 } else { 0.03 }) {
                continue;
            }
            let won = created + Duration::hours(random.between(72, 45 * 24) as i64);
            if !past(won) {
                continue;
            }
            customer_count += 1;
            let customer = format!("C{customer_count}");
            let deal_id = format!("D{lead_count}");
            out.emit(
                "deal.won",
                won,
                json!({"deal_id": deal_id, "customer_id": customer, "lead_id": lead_id,
                "amount": random.money(30_000, 300_000), "currency": "EUR"}),
            );
            let cancelled = won + Duration::days(random.between(2, 20) as i64);
            if random.chance(0.05) && past(cancelled) {
                out.emit(
                    "deal.lost",
                    cancelled,
                    json!({"deal_id": deal_id, "lead_id": lead_id}),
                );
                continue;
            }
            // Customers who come back in the following years.
            let mut when = won;
            while random.chance(0.45) {
                when += Duration::days(random.between(300, 420) as i64);
                if !past(when) {
                    break;
                }
                out.emit("deal.won", when, json!({"deal_id": format!("{deal_id}-{}", when.year()), "customer_id": customer,
                    "lead_id": lead_id, "amount": random.money(15_000, 150_000), "currency": "EUR"}));
            }
        }
        // Everything generated from now on is dated from this day on.
        out.release(at(day, 0));
        day = day.succ_opt().unwrap_or(today + Duration::days(1));
    }

    // Two events a careful producer would not send: they go to the dead-letter stream.
    let yesterday = now - Duration::days(1);
    out.emit(
        "deal.won",
        yesterday,
        json!({"deal_id": "D-bad", "customer_id": "C-bad", "amount": "-120.00", "currency": "EUR"}),
    );
    out.emit("spend.reported", yesterday, json!({"date": yesterday.date_naive().to_string(), "amount": "12000", "currency": "JPY", "channel": "social"}));

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
