//! `kpi report`: KPI tables of a tenant, read from a running engine's API — one period per
//! channel and campaign, a trend (one row per period), or retention and loyalty by year — as
//! a table, CSV or the API's JSON.

use anyhow::Context;
use kpi_model::{Period, Window};
use serde_json::Value;

/// How a report is printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Table,
    Csv,
    Json,
}

/// What a report shows.
#[derive(Clone, Debug)]
pub enum Kind {
    /// One period, per channel and campaign.
    Period { period: Option<String> },
    /// The last `last` periods of a window up to `until` (included), for a scope.
    Trend {
        window: Window,
        until: Period,
        last: u32,
        channel: Option<String>,
        campaign: Option<String>,
    },
    /// Retention and loyalty for the last `last` years up to `until`.
    Retention { until: i32, last: u32 },
}

fn money(value: &Value) -> String {
    value.as_str().unwrap_or("-").to_string()
}

fn number(value: &Value, percent: bool) -> String {
    match value.as_f64() {
        Some(v) if v.is_infinite() => "inf".into(),
        Some(v) if percent => format!("{:.1}%", v * 100.0),
        Some(v) => format!("{v:.2}"),
        None => "-".into(),
    }
}

/// CAC as a person reads it: undefined with spend means money spent and no customer yet.
fn cac(kpis: &Value) -> String {
    match kpis["cac"].as_f64() {
        Some(value) => format!("{value:.2}"),
        None if kpis["spend"].as_str().is_some_and(|s| s != "0.00") => "no customer".into(),
        None => "-".into(),
    }
}

/// A CSV cell of a JSON value: the number at full precision, the string as is, empty for null.
fn raw(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

const KPI_HEADER: [&str; 9] = [
    "spend",
    "leads",
    "qualified",
    "conversion",
    "new cust.",
    "CAC",
    "revenue",
    "ROI",
    "ROAS",
];

fn row(name: &str, kpis: &Value) -> Vec<String> {
    vec![
        name.to_string(),
        money(&kpis["spend"]),
        kpis["leads"].to_string(),
        number(&kpis["qualified_lead_rate"], true),
        number(&kpis["conversion_rate"], true),
        kpis["new_customers"].to_string(),
        cac(kpis),
        money(&kpis["revenue"]),
        number(&kpis["roi"], false),
        number(&kpis["roas"], false),
    ]
}

/// The fields of a KPI row, in the API's names, for CSV.
const CSV_FIELDS: [&str; 11] = [
    "spend",
    "new_customers",
    "cac",
    "leads",
    "qualified_leads",
    "qualified_lead_rate",
    "converted_leads",
    "conversion_rate",
    "revenue",
    "roi",
    "roas",
];

fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([header[i].chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i == 0 {
                    format!("{c:<w$}", w = widths[i])
                } else {
                    format!("{c:>w$}", w = widths[i])
                }
            })
            .collect::<Vec<_>>()
            .join("  ")
    };
    println!("{}", line(header.iter().map(|h| h.to_string()).collect()));
    println!(
        "{}",
        widths
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .join("  ")
    );
    for r in rows {
        println!("{}", line(r.clone()));
    }
}

fn print_csv(header: &[&str], rows: &[Vec<String>]) -> anyhow::Result<()> {
    let mut writer = csv::Writer::from_writer(std::io::stdout().lock());
    writer.write_record(header)?;
    for row in rows {
        writer.write_record(row)?;
    }
    writer.flush()?;
    Ok(())
}

/// One GET of the API, its JSON, or the engine's error.
async fn get(
    client: &reqwest::Client,
    url: &str,
    query: &[(&str, String)],
) -> anyhow::Result<Value> {
    let response = client
        .get(url)
        .query(query)
        .send()
        .await
        .with_context(|| format!("cannot reach the engine at {url}"))?;
    let status = response.status();
    let body: Value = response
        .json()
        .await
        .context("the engine's answer is not JSON")?;
    if !status.is_success() {
        anyhow::bail!(
            "{status}: {}",
            body["error"].as_str().unwrap_or("unknown error")
        );
    }
    Ok(body)
}

/// Prints the report `kind` of `tenant` from the engine at `base_url`.
pub async fn print(
    base_url: &str,
    tenant: &str,
    kind: &Kind,
    format: Format,
) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let base = base_url.trim_end_matches('/');
    match kind {
        Kind::Period { period } => {
            print_period(&client, base, tenant, period.as_deref(), format).await
        }
        Kind::Trend {
            window,
            until,
            last,
            channel,
            campaign,
        } => {
            let mut from = *until;
            for _ in 1..(*last).max(1) {
                from = from.previous().context("the trend starts before year 1")?;
            }
            let mut query = vec![
                ("tenant", tenant.to_string()),
                ("granularity", window.label().to_string()),
                ("from", from.to_string()),
                ("to", until.to_string()),
            ];
            if let Some(channel) = channel {
                query.push(("channel", channel.clone()));
            }
            if let Some(campaign) = campaign {
                query.push(("campaign", campaign.clone()));
            }
            let body = get(&client, &format!("{base}/api/v1/kpis/series"), &query).await?;
            print_trend(&body, format)
        }
        Kind::Retention { until, last } => {
            let from = until - (*last).max(1) as i32 + 1;
            let query = vec![
                ("tenant", tenant.to_string()),
                ("from", from.to_string()),
                ("to", until.to_string()),
            ];
            let body = get(&client, &format!("{base}/api/v1/retention/series"), &query).await?;
            print_retention(&body, format)
        }
    }
}

fn print_trend(body: &Value, format: Format) -> anyhow::Result<()> {
    let entries = body["series"].as_array().cloned().unwrap_or_default();
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(body)?),
        Format::Csv => {
            let mut header = vec!["period"];
            header.extend(CSV_FIELDS);
            let rows: Vec<Vec<String>> = entries
                .iter()
                .map(|entry| {
                    std::iter::once(raw(&entry["period"]))
                        .chain(CSV_FIELDS.iter().map(|field| raw(&entry[*field])))
                        .collect()
                })
                .collect();
            print_csv(&header, &rows)?;
        }
        Format::Table => {
            let scope = match body["campaign"].as_str() {
                Some(campaign) => format!("campaign {campaign}"),
                None => match body["channel"].as_str() {
                    Some("all") | None => "all channels".to_string(),
                    Some(channel) => format!("channel {channel}"),
                },
            };
            println!(
                "KPIs of {} by {}, {} (money in {})\n",
                body["tenant"].as_str().unwrap_or("?"),
                body["granularity"].as_str().unwrap_or("?"),
                scope,
                body["currency"].as_str().unwrap_or("?")
            );
            let rows: Vec<Vec<String>> = entries
                .iter()
                .map(|entry| row(entry["period"].as_str().unwrap_or("?"), entry))
                .collect();
            let mut header = vec!["period"];
            header.extend(KPI_HEADER);
            print_table(&header, &rows);
        }
    }
    Ok(())
}

/// One year of a retention series: year, customers, retained, then the retention rate and
/// loyalty 2 to 5 written by `rate`.
fn retention_cells(entry: &Value, rate: impl Fn(&Value) -> String) -> Vec<String> {
    let mut cells = vec![
        raw(&entry["year"]),
        raw(&entry["active_customers"]),
        raw(&entry["retained_customers"]),
        rate(&entry["retention_rate"]),
    ];
    cells.extend((2..=5).map(|k| rate(&entry["loyalty"][k.to_string()])));
    cells
}

fn print_retention(body: &Value, format: Format) -> anyhow::Result<()> {
    let entries = body["series"].as_array().cloned().unwrap_or_default();
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(body)?),
        Format::Csv => {
            let header = [
                "year",
                "active_customers",
                "retained_customers",
                "retention_rate",
                "loyalty_2",
                "loyalty_3",
                "loyalty_4",
                "loyalty_5",
            ];
            let rows: Vec<Vec<String>> = entries
                .iter()
                .map(|entry| retention_cells(entry, raw))
                .collect();
            print_csv(&header, &rows)?;
        }
        Format::Table => {
            println!(
                "Retention and loyalty of {} by year\n\
                 (loyalty k: share of the year's customers who bought in each of the last k years)\n",
                body["tenant"].as_str().unwrap_or("?")
            );
            let rows: Vec<Vec<String>> = entries
                .iter()
                .map(|entry| retention_cells(entry, |rate| number(rate, true)))
                .collect();
            print_table(
                &[
                    "year",
                    "customers",
                    "retained",
                    "retention",
                    "2 years",
                    "3 years",
                    "4 years",
                    "5 years",
                ],
                &rows,
            );
        }
    }
    Ok(())
}

async fn print_period(
    client: &reqwest::Client,
    base: &str,
    tenant: &str,
    period: Option<&str>,
    format: Format,
) -> anyhow::Result<()> {
    let mut query = vec![("tenant", tenant.to_string())];
    if let Some(period) = period {
        query.push(("period", period.to_string()));
    }
    let url = format!("{base}/api/v1/kpis");
    // An answer holds at most `http.max_rows` channels and campaigns: read every page.
    let mut body = Value::Null;
    let mut offset = 0u64;
    loop {
        let mut page_query = query.clone();
        page_query.push(("offset", offset.to_string()));
        let mut page = get(client, &url, &page_query).await?;
        let next = page["page"]["next_offset"].as_u64();
        if let Some(object) = page.as_object_mut() {
            object.remove("page");
        }
        if body.is_null() {
            body = page;
        } else {
            for list in ["channels", "campaigns"] {
                if let (Some(into), Some(from)) =
                    (body[list].as_object_mut(), page[list].as_object().cloned())
                {
                    into.extend(from);
                }
            }
        }
        match next {
            Some(next) => offset = next,
            None => break,
        }
    }
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&body)?),
        Format::Csv => print_period_csv(&body)?,
        Format::Table => print_period_table(&body, tenant),
    }
    Ok(())
}

/// One CSV table of the period: the total, each channel and each campaign, a row each.
fn print_period_csv(body: &Value) -> anyhow::Result<()> {
    let mut header = vec!["period", "scope", "name", "channel"];
    header.extend(CSV_FIELDS);
    let period = raw(&body["period"]);
    let kpi_cells = |scope: &str, name: &str, channel: &str, kpis: &Value| -> Vec<String> {
        [period.clone(), scope.into(), name.into(), channel.into()]
            .into_iter()
            .chain(CSV_FIELDS.iter().map(|field| raw(&kpis[*field])))
            .collect()
    };
    let mut rows = vec![kpi_cells("total", "all", "all", &body["total"])];
    for (name, kpis) in body["channels"].as_object().into_iter().flatten() {
        rows.push(kpi_cells("channel", name, name, kpis));
    }
    for (name, kpis) in body["campaigns"].as_object().into_iter().flatten() {
        rows.push(kpi_cells(
            "campaign",
            name,
            kpis["channel"].as_str().unwrap_or(""),
            kpis,
        ));
    }
    print_csv(&header, &rows)
}

fn print_period_table(body: &Value, tenant: &str) {
    println!(
        "KPIs of {} for {} (money in {})\n",
        body["tenant"].as_str().unwrap_or(tenant),
        body["period"].as_str().unwrap_or("?"),
        body["currency"].as_str().unwrap_or("?")
    );
    let mut rows = vec![row("all channels", &body["total"])];
    if let Some(channels) = body["channels"].as_object() {
        rows.extend(channels.iter().map(|(name, kpis)| row(name, kpis)));
    }
    let mut header = vec!["channel"];
    header.extend(KPI_HEADER);
    print_table(&header, &rows);
    if let Some(campaigns) = body["campaigns"].as_object().filter(|c| !c.is_empty()) {
        println!();
        let rows: Vec<Vec<String>> = campaigns
            .iter()
            .map(|(name, c)| {
                vec![
                    name.clone(),
                    c["channel"].as_str().unwrap_or("-").to_string(),
                    money(&c["spend"]),
                    money(&c["revenue"]),
                    number(&c["roi"], false),
                    number(&c["roas"], false),
                ]
            })
            .collect();
        print_table(
            &["campaign", "channel", "spend", "revenue", "ROI", "ROAS"],
            &rows,
        );
    }
    let stages = body["total"]["stages"]
        .as_object()
        .filter(|s| !s.is_empty());
    if let Some(stages) = stages {
        println!();
        for (stage, rate) in stages {
            println!(
                "stage {stage}: {} of the period's leads",
                number(rate, true)
            );
        }
    }
}

/// The report the command line asks for; `today` is the tenant's local date (the default
/// last period of a trend, and year of a retention table).
pub fn kind(
    today: chrono::NaiveDate,
    period: Option<String>,
    trend: Option<String>,
    retention: bool,
    last: u32,
    channel: Option<String>,
    campaign: Option<String>,
) -> anyhow::Result<Kind> {
    use chrono::Datelike;
    if retention {
        let until = match period {
            Some(text) => match text.parse::<Period>() {
                Ok(Period::Year(year)) => year,
                _ => anyhow::bail!("--period: `{text}` is not a year such as 2026 (--retention)"),
            },
            None => today.year(),
        };
        return Ok(Kind::Retention { until, last });
    }
    let Some(granularity) = trend else {
        return Ok(Kind::Period { period });
    };
    let window = Window::from_label(&granularity)
        .filter(|window| *window != Window::All)
        .with_context(|| {
            format!("--trend: `{granularity}` is not one of day, week, month, quarter, year")
        })?;
    let until = match period {
        Some(text) => {
            let period: Period = text
                .parse()
                .map_err(|error| anyhow::anyhow!("--period: {error}"))?;
            if period.window() != window {
                anyhow::bail!(
                    "--period: `{text}` is not a {granularity} period (--trend {granularity})"
                );
            }
            period
        }
        None => window.period_of(today),
    };
    Ok(Kind::Trend {
        window,
        until,
        last,
        channel,
        campaign,
    })
}
