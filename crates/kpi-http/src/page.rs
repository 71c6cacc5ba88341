//! The page at `/`: the five KPIs of a tenant for a chosen period, with their change against
//! the previous period and the same period a year earlier; charts of their history; the
//! retention and loyalty table; per-channel and per-campaign tables.
//!
//! Everything is rendered here, on the server, from the same report builders as the JSON API
//! (so the page and the API cannot disagree): HTML, CSS and SVG charts, no script needed, no
//! file fetched from anywhere (the page works offline). The pickers are a plain GET form; a
//! few lines of inline script submit it when a picker changes, and a button does the same
//! without script. Charts are SVG images with a text alternative and their data in a table.

use std::fmt::Write;

use chrono::{Datelike, NaiveDate};
use kpi_model::aggregate::TenantAggregates;
use kpi_model::report::{cac, ratio, roi};
use kpi_model::{Cell, KpiReport, KpiSeries, Period, RetentionSeries, Rows, Scope, Window};

/// The page's colours (Okabe–Ito, distinguishable with the common colour-vision deficiencies,
/// each with at least 3:1 contrast on white).
const PALETTE: [&str; 6] = [
    "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#8a6d00", "#555555",
];
/// Most channels or campaigns one chart draws (the largest by all-time spend).
const CHART_SCOPES: usize = 5;
/// Periods the charts cover: 24 months, quarters, weeks or days; 6 years.
const CHART_PERIODS: usize = 24;
const CHART_YEARS: usize = 6;
/// Years in the retention table.
const RETENTION_YEARS: i32 = 6;

/// Escapes text for HTML content and attribute values.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `1234567.891` → `1,234,567.89` (`decimals` places).
fn grouped(value: f64, decimals: usize) -> String {
    let text = format!("{:.*}", decimals, value.abs());
    let (whole, fraction) = text.split_once('.').unwrap_or((&text, ""));
    let mut out = String::new();
    for (index, digit) in whole.chars().enumerate() {
        if index > 0 && (whole.len() - index) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    if !fraction.is_empty() {
        out.push('.');
        out.push_str(fraction);
    }
    if value < 0.0 && out.chars().any(|c| c != '0' && c != '.' && c != ',') {
        out.insert(0, '−');
    }
    out
}

/// Money in the tenant's currency: `€12,345.67`, `$12.00`, `1,200.00 CHF`.
fn money(value: f64, currency: &str, decimals: usize) -> String {
    let amount = grouped(value, decimals);
    let (sign, digits) = match amount.strip_prefix('−') {
        Some(rest) => ("−", rest.to_string()),
        None => ("", amount.clone()),
    };
    match currency {
        "EUR" => format!("{sign}€{digits}"),
        "USD" => format!("{sign}${digits}"),
        "GBP" => format!("{sign}£{digits}"),
        other => format!("{amount} {other}"),
    }
}

fn percent(value: f64) -> String {
    format!("{:.1}%", value * 100.0)
}

/// The money of a report field (`"1234.50"`) as a number.
fn amount(text: &str) -> f64 {
    text.parse().unwrap_or(0.0)
}

/// What the page shows, chosen by its query.
pub struct PageQuery {
    pub tenant: String,
    pub period: Period,
}

/// Everything the page needs from the engine's state, read under one lock.
pub struct PageData<'a> {
    pub tenants: Vec<String>,
    pub tenant: &'a str,
    pub currency: &'a str,
    pub today: NaiveDate,
    pub aggregates: Option<&'a TenantAggregates>,
    pub cac_threshold: &'a std::collections::BTreeMap<String, f64>,
}

/// One KPI card: its name, value and comparisons.
struct Card {
    key: &'static str,
    label: &'static str,
    /// The value as the API gives it (for tests and screen readers), and as shown.
    raw: String,
    shown: String,
    /// Change against the previous period and against a year earlier.
    changes: [Option<Change>; 2],
    note: &'static str,
}

struct Change {
    text: String,
    /// Good news, bad news, or neither (for colour; the text says it too).
    good: Option<bool>,
}

/// How a KPI changes: money and CAC in percent, rates in percentage points.
#[derive(Clone, Copy)]
enum Measure {
    /// Lower is better (CAC).
    Cost,
    /// Higher is better, shown as a rate.
    Rate,
    /// Higher is better, a plain ratio (ROI).
    Ratio,
    /// Neither better nor worse (spend).
    Neutral,
    /// Higher is better (revenue).
    Money,
}

fn change(now: Option<f64>, before: Option<f64>, measure: Measure, label: &str) -> Option<Change> {
    let (now, before) = (now?, before?);
    if !now.is_finite() || !before.is_finite() {
        return None;
    }
    let delta = now - before;
    let text = match measure {
        Measure::Rate => format!("{:+.1} pp {label}", delta * 100.0),
        Measure::Ratio => format!("{delta:+.2} {label}"),
        Measure::Cost | Measure::Neutral | Measure::Money => {
            if before == 0.0 {
                return None;
            }
            format!("{:+.1}% {label}", delta / before.abs() * 100.0)
        }
    };
    let good = if delta.abs() < 1e-12 {
        None
    } else {
        match measure {
            Measure::Cost => Some(delta < 0.0),
            Measure::Rate | Measure::Ratio | Measure::Money => Some(delta > 0.0),
            Measure::Neutral => None,
        }
    };
    Some(Change { text, good })
}

fn raw_number(value: Option<f64>) -> String {
    value.map(|v| v.to_string()).unwrap_or_default()
}

/// The page for `query`, as HTML.
pub fn render(query: &PageQuery, data: &PageData) -> String {
    let period = query.period;
    let currency = data.currency;
    let aggregates = data.aggregates;
    let report = KpiReport::build_rows(data.tenant, currency, aggregates, period, Rows::ALL);
    let empty = Cell::default();
    let cell_of = |period: Option<Period>| -> Option<&Cell> {
        let period = period?;
        Some(
            aggregates
                .and_then(|a| a.period(&period))
                .map(|cells| &cells.total)
                .unwrap_or(&empty),
        )
    };
    let now = cell_of(Some(period)).unwrap_or(&empty);
    let comparisons = [
        (cell_of(period.previous()), "vs previous period"),
        (cell_of(period.year_earlier()), "vs a year earlier"),
    ];
    let retention_year = match period {
        Period::All => data.today.year(),
        other => other
            .first_day()
            .map(|d| d.year())
            .unwrap_or(data.today.year()),
    };
    let retention = RetentionSeries::build(
        data.tenant,
        aggregates,
        retention_year - RETENTION_YEARS + 1..=retention_year,
    );
    let retention_now = retention.series.last().and_then(|e| e.retention_rate);
    let retention_before = retention
        .series
        .iter()
        .rev()
        .nth(1)
        .and_then(|e| e.retention_rate);

    type Measurement = fn(&Cell) -> Option<f64>;
    let card =
        |key, label, value: Measurement, measure, shown: &dyn Fn(Option<f64>) -> String, note| {
            Card {
                key,
                label,
                raw: raw_number(value(now)),
                shown: shown(value(now)),
                changes: [0, 1].map(|i| {
                    let (before, label) = comparisons[i];
                    change(value(now), before.and_then(value), measure, label)
                }),
                note,
            }
        };
    let show_rate = |v: Option<f64>| v.map(percent).unwrap_or_else(|| "—".into());
    let show_cac = |v: Option<f64>| match v {
        Some(v) => money(v, currency, 2),
        None if !now.spend.is_zero() => "spend, no customer yet".into(),
        None => "—".into(),
    };
    let show_ratio = |v: Option<f64>| v.map(|v| format!("{v:.2}")).unwrap_or_else(|| "—".into());
    let mut cards = vec![
        card(
            "cac",
            "Customer acquisition cost",
            cac,
            Measure::Cost,
            &show_cac,
            "spend ÷ new customers",
        ),
        card(
            "conversion_rate",
            "Lead-to-customer conversion",
            |c| ratio(c.converted_leads, c.leads),
            Measure::Rate,
            &show_rate,
            "leads of the period with a won deal",
        ),
        card(
            "qualified_lead_rate",
            "Qualified-lead rate",
            |c| ratio(c.qualified_leads, c.leads),
            Measure::Rate,
            &show_rate,
            "qualified leads ÷ leads",
        ),
        card(
            "roi",
            "Marketing ROI",
            roi,
            Measure::Ratio,
            &show_ratio,
            "(revenue − spend) ÷ spend",
        ),
    ];
    cards.push(Card {
        key: "retention_rate",
        label: "Year-over-year retention",
        raw: raw_number(retention_now),
        shown: show_rate(retention_now),
        changes: [
            change(
                retention_now,
                retention_before,
                Measure::Rate,
                "vs previous year",
            ),
            None,
        ],
        note: "last year's customers who bought again",
    });
    let money_cards = [
        card(
            "spend",
            "Spend",
            |c| Some(kpi_model::money::to_f64(c.spend)),
            Measure::Neutral,
            &|v| money(v.unwrap_or(0.0), currency, 0),
            "all channels and costs",
        ),
        card(
            "revenue",
            "Revenue",
            |c| Some(kpi_model::money::to_f64(c.revenue)),
            Measure::Money,
            &|v| money(v.unwrap_or(0.0), currency, 0),
            "won deals",
        ),
        card(
            "new_customers",
            "New customers",
            |c| Some(c.new_customers as f64),
            Measure::Money,
            &|v| grouped(v.unwrap_or(0.0), 0),
            "first won deal in the period",
        ),
    ];
    // The money cards carry the API's exact strings.
    let mut money_cards: Vec<Card> = money_cards.into_iter().collect();
    money_cards[0].raw = report.total.spend.clone();
    money_cards[1].raw = report.total.revenue.clone();
    cards.extend(money_cards);

    let mut html = String::with_capacity(64 * 1024);
    head(&mut html, data.tenant, &period);
    pickers(&mut html, query, data);
    html.push_str("<main id=\"main\">\n");
    let in_progress = match (
        period.first_day(),
        period.next().and_then(|p| p.first_day()),
    ) {
        (Some(first), Some(after)) => first <= data.today && data.today < after,
        _ => false,
    };
    let _ = write!(
        html,
        "<h1>Marketing KPIs of <span data-tenant>{}</span> for <span data-period>{}</span>{}</h1>\n\
         <p class=\"sub\">Money in <span data-currency>{}</span>. Figures are exact and include late \
         and restated events; they update as events arrive.{}</p>\n",
        esc(data.tenant),
        esc(&period.to_string()),
        if in_progress { " <span class=\"badge\">in progress</span>" } else { "" },
        esc(currency),
        if in_progress {
            " This period is not over: its changes compare a part of it with whole periods."
        } else {
            ""
        }
    );
    html.push_str("<section aria-labelledby=\"kpis-title\"><h2 id=\"kpis-title\" class=\"visually-hidden\">The KPIs</h2><ul class=\"cards\">\n");
    for card in &cards {
        let _ = write!(
            html,
            "<li class=\"card\" data-kpi=\"{key}\" data-value=\"{raw}\"><span class=\"label\">{label}</span>\
             <span class=\"value\">{shown}</span>",
            key = card.key,
            raw = esc(&card.raw),
            label = card.label,
            shown = esc(&card.shown)
        );
        for change in card.changes.iter().flatten() {
            let class = match change.good {
                Some(true) => "good",
                Some(false) => "bad",
                None => "flat",
            };
            let mark = match change.good {
                Some(true) => "▲ better",
                Some(false) => "▼ worse",
                None => "",
            };
            let _ = write!(
                html,
                "<span class=\"change {class}\">{} <span class=\"visually-hidden\">{mark}</span></span>",
                esc(&change.text)
            );
        }
        let _ = writeln!(html, "<span class=\"note\">{}</span></li>", card.note);
    }
    html.push_str("</ul></section>\n");

    charts(&mut html, &period, data);
    retention_table(&mut html, &retention);
    scope_tables(&mut html, &report);
    html.push_str(
        "</main>\n<footer><p>Served by the KPI engine. The same figures are in the JSON API \
         (<a href=\"/api/v1/openapi.json\">OpenAPI description</a>) and on <a href=\"/metrics\">/metrics</a>.</p></footer>\n",
    );
    html.push_str(SCRIPT);
    html.push_str("</body></html>\n");
    html
}

/// A page that only says what went wrong, with the pickers (unknown tenant, bad period, no data).
pub fn message(
    title: &str,
    text: &str,
    query: Option<&PageQuery>,
    data: Option<&PageData>,
) -> String {
    let mut html = String::new();
    head(&mut html, "", &Period::All);
    if let (Some(query), Some(data)) = (query, data) {
        pickers(&mut html, query, data);
    }
    let _ = writeln!(
        html,
        "<main id=\"main\"><h1>{}</h1><p class=\"message\" role=\"alert\">{}</p></main>{SCRIPT}</body></html>",
        esc(title),
        esc(text)
    );
    html
}

fn head(html: &mut String, tenant: &str, period: &Period) {
    let title = if tenant.is_empty() {
        "Marketing KPIs".to_string()
    } else {
        format!("Marketing KPIs · {} · {}", esc(tenant), period)
    };
    let _ = write!(
        html,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title}</title><link rel=\"icon\" href=\"{FAVICON}\"><style>{STYLE}</style></head>\n<body>\
         <a class=\"skip\" href=\"#main\">Skip to the figures</a>\n"
    );
}

/// The tenant and period pickers: a GET form.
fn pickers(html: &mut String, query: &PageQuery, data: &PageData) {
    html.push_str("<header><form method=\"get\" action=\"/\" id=\"pickers\"><span class=\"brand\">KPI engine</span>");
    html.push_str("<label for=\"tenant\">Tenant</label><select id=\"tenant\" name=\"tenant\">");
    for tenant in &data.tenants {
        let _ = write!(
            html,
            "<option value=\"{0}\"{1}>{0}</option>",
            esc(tenant),
            if *tenant == query.tenant {
                " selected"
            } else {
                ""
            }
        );
    }
    html.push_str(
        "</select><label for=\"period\">Period</label><select id=\"period\" name=\"period\">",
    );
    let current_month = Window::Month.period_of(data.today);
    let mut groups: Vec<(&str, Vec<Period>)> = vec![
        ("Months", back_from(current_month, 36)),
        (
            "Quarters",
            back_from(Window::Quarter.period_of(data.today), 12),
        ),
        ("Years", back_from(Window::Year.period_of(data.today), 8)),
        ("All time", vec![Period::All]),
    ];
    // A period asked by URL that the lists do not hold (a day, a week, an old month) is offered
    // too, so the picker always shows what the page shows.
    if !groups
        .iter()
        .any(|(_, periods)| periods.contains(&query.period))
    {
        groups.insert(0, ("Asked", vec![query.period]));
    }
    for (label, periods) in groups {
        let _ = write!(html, "<optgroup label=\"{label}\">");
        for period in periods {
            let text = period.to_string();
            let _ = write!(
                html,
                "<option value=\"{text}\"{}>{}</option>",
                if period == query.period {
                    " selected"
                } else {
                    ""
                },
                period_label(&period)
            );
        }
        html.push_str("</optgroup>");
    }
    html.push_str("</select><button type=\"submit\">Show</button></form></header>\n");
}

/// `count` periods ending with `last`, latest first.
fn back_from(last: Period, count: usize) -> Vec<Period> {
    std::iter::successors(Some(last), Period::previous)
        .take(count)
        .collect()
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// A period as a person reads it: `Mar 2026`, `Q1 2026`, `2026`, `all time`.
fn period_label(period: &Period) -> String {
    match period {
        Period::Month { year, month } => format!("{} {year}", MONTHS[(*month as usize - 1) % 12]),
        Period::Quarter { year, quarter } => format!("Q{quarter} {year}"),
        Period::All => "all time".to_string(),
        other => other.to_string(),
    }
}

/// A short axis label: `Mar 26`, `Q1 26`, `2026`, `W10`, `03-04`.
fn axis_label(period: &Period) -> String {
    match period {
        Period::Month { year, month } => {
            format!("{} {:02}", MONTHS[(*month as usize - 1) % 12], year % 100)
        }
        Period::Quarter { year, quarter } => format!("Q{quarter} {:02}", year % 100),
        Period::Week { week, .. } => format!("W{week:02}"),
        Period::Day(date) => date.format("%m-%d").to_string(),
        other => other.to_string(),
    }
}

/// The periods the charts cover for a chosen period: 24 (6 years) of its window, ending with it;
/// for `all`, the 24 months up to this one.
fn chart_range(period: &Period, today: NaiveDate) -> (Period, Period) {
    let last = match period {
        Period::All => Window::Month.period_of(today),
        other => *other,
    };
    let count = if last.window() == Window::Year {
        CHART_YEARS
    } else {
        CHART_PERIODS
    };
    let first = back_from(last, count).last().copied().unwrap_or(last);
    (first, last)
}

/// One line (or bar set) of a chart.
struct Line {
    name: String,
    color: &'static str,
    values: Vec<Option<f64>>,
    /// Periods where the KPI is +Inf (spend, no customer): drawn as a mark at the top.
    infinite: Vec<bool>,
    dashed: bool,
}

#[derive(Clone, Copy)]
enum Axis {
    Money,
    Rate,
    Ratio,
}

fn axis_text(value: f64, axis: Axis, currency: &str) -> String {
    match axis {
        Axis::Money if value.abs() >= 10_000.0 => {
            money(value / 1000.0, currency, 0).replace(currency, "") + "k"
        }
        Axis::Money => money(value, currency, 0),
        Axis::Rate => format!("{:.0}%", value * 100.0),
        Axis::Ratio => format!("{value:.1}"),
    }
}

/// A tick step of 1, 2 or 5 times a power of ten, for about four steps up to `span`.
fn nice_step(span: f64) -> f64 {
    if span.is_nan() || span <= 0.0 || span.is_infinite() {
        return 1.0;
    }
    let raw = span / 4.0;
    let power = 10f64.powf(raw.log10().floor());
    let fraction = raw / power;
    let nice = if fraction <= 1.0 {
        1.0
    } else if fraction <= 2.0 {
        2.0
    } else if fraction <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * power
}

const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 240.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 12.0;
const TOP: f64 = 14.0;
const BOTTOM: f64 = 34.0;

/// An SVG chart (lines, or grouped bars) with its legend, caption and data table.
#[allow(clippy::too_many_arguments)]
fn chart(
    html: &mut String,
    id: &str,
    title: &str,
    description: &str,
    periods: &[Period],
    lines: &[Line],
    axis: Axis,
    bars: bool,
    currency: &str,
) {
    let values = lines
        .iter()
        .flat_map(|l| l.values.iter().flatten().copied());
    let (mut low, mut high) = values.fold((0.0f64, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if high <= low {
        high = low + 1.0;
    }
    let step = nice_step(high - low);
    low = (low / step).floor() * step;
    high = (high / step).ceil() * step;
    let plot_width = WIDTH - LEFT - RIGHT;
    let plot_height = HEIGHT - TOP - BOTTOM;
    let n = periods.len().max(1) as f64;
    let slot = plot_width / n;
    let x = |i: usize| LEFT + slot * (i as f64 + 0.5);
    let y = |v: f64| TOP + plot_height * (1.0 - (v - low) / (high - low));

    let _ = write!(
        html,
        "<figure class=\"chart\" id=\"{id}\"><figcaption id=\"{id}-title\">{}</figcaption>\
         <svg viewBox=\"0 0 {WIDTH} {HEIGHT}\" role=\"img\" aria-labelledby=\"{id}-title {id}-desc\" data-chart=\"{id}\">\
         <desc id=\"{id}-desc\">{}</desc>",
        esc(title),
        esc(description)
    );
    // Grid and y labels.
    let mut tick = low;
    while tick <= high + step / 2.0 {
        let ty = y(tick);
        let _ = write!(
            html,
            "<line class=\"grid\" x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{ty:.1}\" y2=\"{ty:.1}\"/>\
             <text class=\"tick\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            WIDTH - RIGHT,
            LEFT - 6.0,
            ty + 4.0,
            esc(&axis_text(tick, axis, currency))
        );
        tick += step;
    }
    // X labels: about eight.
    let every = (periods.len() / 8).max(1);
    for (i, period) in periods.iter().enumerate() {
        if i % every == 0 || i + 1 == periods.len() {
            let _ = write!(
                html,
                "<text class=\"tick\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
                x(i),
                HEIGHT - BOTTOM + 18.0,
                esc(&axis_label(period))
            );
        }
    }
    if bars {
        let group = slot * 0.8;
        let width = group / lines.len().max(1) as f64;
        for (index, line) in lines.iter().enumerate() {
            for (i, value) in line.values.iter().enumerate() {
                let Some(value) = value else { continue };
                let left = x(i) - group / 2.0 + width * index as f64;
                let (top, bottom) = (y(value.max(0.0)), y(value.min(0.0)));
                let _ = write!(
                    html,
                    "<rect x=\"{left:.1}\" y=\"{top:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\">\
                     <title>{} {}: {}</title></rect>",
                    (width - 1.0).max(1.0),
                    (bottom - top).max(0.5),
                    line.color,
                    esc(&periods[i].to_string()),
                    esc(&line.name),
                    esc(&axis_text(*value, axis, currency))
                );
            }
        }
    } else {
        for line in lines {
            let mut path = String::new();
            let mut pen_down = false;
            for (i, value) in line.values.iter().enumerate() {
                match value {
                    Some(v) => {
                        let _ = write!(
                            path,
                            "{}{:.1},{:.1} ",
                            if pen_down { "L" } else { "M" },
                            x(i),
                            y(*v)
                        );
                        pen_down = true;
                    }
                    None => pen_down = false,
                }
            }
            let _ = write!(
                html,
                "<path d=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"2.2\"{}/>",
                path.trim_end(),
                line.color,
                if line.dashed {
                    " stroke-dasharray=\"6 4\""
                } else {
                    ""
                }
            );
            if line.dashed {
                continue;
            }
            for (i, value) in line.values.iter().enumerate() {
                if let Some(v) = value {
                    let _ = write!(
                        html,
                        "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"2.6\" fill=\"{}\"><title>{} {}: {}</title></circle>",
                        x(i),
                        y(*v),
                        line.color,
                        esc(&periods[i].to_string()),
                        esc(&line.name),
                        esc(&axis_text(*v, axis, currency))
                    );
                } else if line.infinite.get(i).copied().unwrap_or(false) {
                    let (cx, cy) = (x(i), TOP + 2.0);
                    let _ = write!(
                        html,
                        "<path d=\"M{:.1},{:.1} L{:.1},{:.1} L{:.1},{:.1} Z\" fill=\"{}\"><title>{} {}: spend, no customer yet</title></path>",
                        cx - 4.0, cy + 7.0, cx + 4.0, cy + 7.0, cx, cy,
                        line.color,
                        esc(&periods[i].to_string()),
                        esc(&line.name)
                    );
                }
            }
        }
    }
    html.push_str("</svg><ul class=\"legend\">");
    for line in lines {
        let _ = write!(
            html,
            "<li><span class=\"swatch{}\" style=\"--c:{}\"></span>{}</li>",
            if line.dashed { " dashed" } else { "" },
            line.color,
            esc(&line.name)
        );
    }
    if lines.iter().any(|l| l.infinite.iter().any(|i| *i)) {
        html.push_str("<li><span aria-hidden=\"true\">▲</span> spend, no customer yet</li>");
    }
    html.push_str("</ul>");
    // The data, for screen readers and for copying.
    let _ = write!(html, "<details><summary>Data of this chart</summary><div class=\"scroll\"><table><thead><tr><th scope=\"col\">Period</th>");
    for line in lines {
        let _ = write!(html, "<th scope=\"col\">{}</th>", esc(&line.name));
    }
    html.push_str("</tr></thead><tbody>");
    for (i, period) in periods.iter().enumerate() {
        let _ = write!(
            html,
            "<tr><th scope=\"row\">{}</th>",
            esc(&period.to_string())
        );
        for line in lines {
            let text = match line.values.get(i).copied().flatten() {
                Some(v) => match axis {
                    Axis::Money => money(v, currency, 2),
                    Axis::Rate => percent(v),
                    Axis::Ratio => format!("{v:.2}"),
                },
                None if line.infinite.get(i).copied().unwrap_or(false) => {
                    "spend, no customer yet".into()
                }
                None => "—".into(),
            };
            let _ = write!(html, "<td>{}</td>", esc(&text));
        }
        html.push_str("</tr>");
    }
    html.push_str("</tbody></table></div></details></figure>\n");
}

/// The largest `CHART_SCOPES` of `cells` by all-time spend (then revenue), with money only.
fn largest<'c>(cells: impl Iterator<Item = (&'c String, &'c Cell)>) -> Vec<String> {
    let mut ranked: Vec<(&String, &Cell)> =
        cells.filter(|(_, cell)| !cell.spend.is_zero()).collect();
    ranked.sort_by(|a, b| {
        b.1.spend
            .cmp(&a.1.spend)
            .then(b.1.revenue.cmp(&a.1.revenue))
            .then(a.0.cmp(b.0))
    });
    ranked
        .into_iter()
        .take(CHART_SCOPES)
        .map(|(name, _)| name.clone())
        .collect()
}

fn charts(html: &mut String, period: &Period, data: &PageData) {
    let (from, to) = chart_range(period, data.today);
    let periods: Vec<Period> = from.through(to).collect();
    let series = |scope: Scope| {
        KpiSeries::build(
            data.tenant,
            data.currency,
            data.aggregates,
            &scope,
            from,
            to,
        )
    };
    let all_time = data.aggregates.and_then(|a| a.period(&Period::All));
    let channels = all_time
        .map(|c| largest(c.channels.iter()))
        .unwrap_or_default();
    let campaigns = all_time
        .map(|c| largest(c.campaigns.iter().filter(|(_, cell)| cell.has_money())))
        .unwrap_or_default();
    let total = series(Scope::Total);
    let span = format!("{} to {}", period_label(&from), period_label(&to));
    html.push_str("<section aria-labelledby=\"history-title\"><h2 id=\"history-title\">History</h2><div class=\"charts\">\n");

    // CAC per channel, with thresholds.
    let mut lines = Vec::new();
    let cac_line = |name: String, color, entries: &KpiSeries| Line {
        name,
        color,
        values: entries.series.iter().map(|e| e.row.cac).collect(),
        infinite: entries
            .series
            .iter()
            .map(|e| e.row.cac.is_none() && amount(&e.row.spend) != 0.0)
            .collect(),
        dashed: false,
    };
    lines.push(cac_line("all channels".into(), PALETTE[0], &total));
    for (index, channel) in channels.iter().enumerate() {
        let entries = series(Scope::Channel(channel.clone()));
        lines.push(cac_line(
            channel.clone(),
            PALETTE[(index + 1) % PALETTE.len()],
            &entries,
        ));
    }
    let thresholds: Vec<Line> = lines
        .iter()
        .filter_map(|line| {
            let key = if line.name == "all channels" {
                "all"
            } else {
                line.name.as_str()
            };
            data.cac_threshold.get(key).map(|threshold| Line {
                name: format!("threshold {}", line.name),
                color: line.color,
                values: vec![Some(*threshold); periods.len()],
                infinite: Vec::new(),
                dashed: true,
            })
        })
        .collect();
    lines.extend(thresholds);
    chart(
        html,
        "chart-cac",
        "Customer acquisition cost per channel",
        &format!("CAC per period, {span}, for all channels and the largest channels by spend, with the alert thresholds dashed."),
        &periods,
        &lines,
        Axis::Money,
        false,
        data.currency,
    );

    let rate_line =
        |name: &str, color, value: fn(&kpi_model::report::KpiRow) -> Option<f64>| Line {
            name: name.to_string(),
            color,
            values: total.series.iter().map(|e| value(&e.row)).collect(),
            infinite: Vec::new(),
            dashed: false,
        };
    chart(
        html,
        "chart-rates",
        "Conversion and qualified-lead rate",
        &format!(
            "Share of each period's leads that became customers, and that were qualified, {span}."
        ),
        &periods,
        &[
            rate_line("conversion rate", PALETTE[0], |r| r.conversion_rate),
            rate_line("qualified-lead rate", PALETTE[2], |r| r.qualified_lead_rate),
        ],
        Axis::Rate,
        false,
        data.currency,
    );

    let money_line = |name: &str, color, value: fn(&kpi_model::report::KpiRow) -> &String| Line {
        name: name.to_string(),
        color,
        values: total
            .series
            .iter()
            .map(|e| Some(amount(value(&e.row))))
            .collect(),
        infinite: Vec::new(),
        dashed: false,
    };
    chart(
        html,
        "chart-money",
        "Spend and revenue",
        &format!("Marketing spend and revenue of won deals per period, {span}."),
        &periods,
        &[
            money_line("spend", PALETTE[1], |r| &r.spend),
            money_line("revenue", PALETTE[0], |r| &r.revenue),
        ],
        Axis::Money,
        true,
        data.currency,
    );

    let roi_lines: Vec<Line> = campaigns
        .iter()
        .enumerate()
        .map(|(index, campaign)| {
            let entries = series(Scope::Campaign(campaign.clone()));
            Line {
                name: campaign.clone(),
                color: PALETTE[index % PALETTE.len()],
                values: entries.series.iter().map(|e| e.row.roi).collect(),
                infinite: Vec::new(),
                dashed: false,
            }
        })
        .collect();
    chart(
        html,
        "chart-roi",
        "ROI per campaign",
        &format!("(revenue − spend) ÷ spend of the largest campaigns by spend, {span}; a gap is a period without spend."),
        &periods,
        &roi_lines,
        Axis::Ratio,
        false,
        data.currency,
    );
    html.push_str("</div></section>\n");
}

fn rate_cell(value: Option<f64>) -> String {
    value.map(percent).unwrap_or_else(|| "—".into())
}

fn retention_table(html: &mut String, retention: &RetentionSeries) {
    html.push_str(
        "<section aria-labelledby=\"retention-title\"><h2 id=\"retention-title\">Retention and loyalty by year</h2>\
         <p class=\"sub\">Retention: share of the previous year's customers who bought again. \
         Loyalty <i>k</i>: share of the year's customers who bought in each of the last <i>k</i> years.</p>\
         <div class=\"scroll\"><table id=\"retention\"><thead><tr><th scope=\"col\">Year</th><th scope=\"col\">Customers</th>\
         <th scope=\"col\">Retained</th><th scope=\"col\">Retention</th><th scope=\"col\">2 years</th><th scope=\"col\">3 years</th>\
         <th scope=\"col\">4 years</th><th scope=\"col\">5 years</th></tr></thead><tbody>",
    );
    for entry in retention.series.iter().rev() {
        let _ = write!(
            html,
            "<tr data-year=\"{0}\"><th scope=\"row\">{0}</th><td>{1}</td><td>{2}</td><td data-value=\"{3}\">{4}</td>",
            entry.year,
            entry.active_customers,
            entry.retained_customers,
            raw_number(entry.retention_rate),
            rate_cell(entry.retention_rate)
        );
        for k in 2..=5 {
            let value = entry.loyalty.get(&k.to_string()).copied().flatten();
            let _ = write!(
                html,
                "<td data-value=\"{}\">{}</td>",
                raw_number(value),
                rate_cell(value)
            );
        }
        html.push_str("</tr>");
    }
    html.push_str("</tbody></table></div></section>\n");
}

fn scope_tables(html: &mut String, report: &KpiReport) {
    let currency = report.currency.as_str();
    let show_money = |text: &str| money(amount(text), currency, 2);
    let show_cac = |row: &kpi_model::report::KpiRow| match row.cac {
        Some(v) => money(v, currency, 2),
        None if amount(&row.spend) != 0.0 => "spend, no customer yet".into(),
        None => "—".into(),
    };
    let ratio_cell = |v: Option<f64>| v.map(|v| format!("{v:.2}")).unwrap_or_else(|| "—".into());
    html.push_str(
        "<section aria-labelledby=\"channels-title\"><h2 id=\"channels-title\">Channels</h2><div class=\"scroll\">\
         <table id=\"channels\"><thead><tr><th scope=\"col\">Channel</th><th scope=\"col\">Spend</th><th scope=\"col\">Leads</th>\
         <th scope=\"col\">Qualified</th><th scope=\"col\">Conversion</th><th scope=\"col\">New customers</th><th scope=\"col\">CAC</th>\
         <th scope=\"col\">Revenue</th><th scope=\"col\">ROI</th></tr></thead><tbody>",
    );
    let rows = std::iter::once(("all channels", &report.total)).chain(
        report
            .channels
            .iter()
            .map(|(name, row)| (name.as_str(), row)),
    );
    for (name, row) in rows {
        let _ = write!(
            html,
            "<tr data-channel=\"{}\"><th scope=\"row\">{}</th><td data-value=\"{}\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td data-value=\"{}\">{}</td><td data-value=\"{}\">{}</td><td>{}</td></tr>",
            esc(if name == "all channels" { "all" } else { name }),
            esc(name),
            esc(&row.spend),
            esc(&show_money(&row.spend)),
            row.leads,
            rate_cell(row.qualified_lead_rate),
            rate_cell(row.conversion_rate),
            row.new_customers,
            raw_number(row.cac),
            esc(&show_cac(row)),
            esc(&row.revenue),
            esc(&show_money(&row.revenue)),
            ratio_cell(row.roi)
        );
    }
    html.push_str("</tbody></table></div></section>\n");
    html.push_str(
        "<section aria-labelledby=\"campaigns-title\"><h2 id=\"campaigns-title\">Campaigns</h2><div class=\"scroll\">\
         <table id=\"campaigns\"><thead><tr><th scope=\"col\">Campaign</th><th scope=\"col\">Channel</th><th scope=\"col\">Spend</th>\
         <th scope=\"col\">Revenue</th><th scope=\"col\">ROI</th><th scope=\"col\">ROAS</th></tr></thead><tbody>",
    );
    if report.campaigns.is_empty() {
        html.push_str(
            "<tr><td colspan=\"6\">No campaign spent or earned in this period.</td></tr>",
        );
    }
    for (name, row) in &report.campaigns {
        let _ = write!(
            html,
            "<tr data-campaign=\"{0}\"><th scope=\"row\">{0}</th><td>{1}</td><td data-value=\"{2}\">{3}</td><td data-value=\"{4}\">{5}</td><td data-value=\"{6}\">{7}</td><td>{8}</td></tr>",
            esc(name),
            esc(row.channel.as_deref().unwrap_or("—")),
            esc(&row.spend),
            esc(&show_money(&row.spend)),
            esc(&row.revenue),
            esc(&show_money(&row.revenue)),
            raw_number(row.roi),
            ratio_cell(row.roi),
            ratio_cell(row.roas)
        );
    }
    html.push_str("</tbody></table></div></section>\n");
}

/// The tab icon, inline (the page fetches nothing else): three rising bars.
const FAVICON: &str = "data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 16 16'%3E%3Crect x='1' y='9' width='4' height='6' fill='%230072B2'/%3E%3Crect x='6' y='5' width='4' height='10' fill='%23009E73'/%3E%3Crect x='11' y='1' width='4' height='14' fill='%23D55E00'/%3E%3C/svg%3E";

const SCRIPT: &str = "<script>document.querySelectorAll('#pickers select').forEach(function(s){s.addEventListener('change',function(){s.form.submit();});});</script>\n";

const STYLE: &str = r#"
:root{--ink:#1b1f24;--muted:#4d5661;--line:#d8dde3;--bg:#f6f7f9;--card:#fff;--good:#0a6b3d;--bad:#b3261e;--accent:#0072B2}
*{box-sizing:border-box}
body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Noto Sans",sans-serif;color:var(--ink);background:var(--bg)}
.skip{position:absolute;left:-999px}.skip:focus{left:8px;top:8px;background:#fff;padding:6px 10px;z-index:2}
header{background:#fff;border-bottom:1px solid var(--line);position:sticky;top:0;z-index:1}
header form{display:flex;flex-wrap:wrap;gap:8px 12px;align-items:center;max-width:1200px;margin:0 auto;padding:10px 20px}
.brand{font-weight:700;margin-right:auto;color:var(--accent)}
label{font-weight:600;color:var(--muted)}
select,button{font:inherit;padding:6px 10px;border:1px solid #8a949e;border-radius:6px;background:#fff;color:var(--ink)}
button{background:var(--accent);border-color:var(--accent);color:#fff;cursor:pointer}
select:focus-visible,button:focus-visible,a:focus-visible,summary:focus-visible{outline:3px solid #ffbf47;outline-offset:2px}
main{max-width:1200px;margin:0 auto;padding:8px 20px 24px}
h1{font-size:1.5rem;margin:18px 0 2px}h2{font-size:1.15rem;margin:28px 0 10px}
.sub{color:var(--muted);margin:0 0 10px}
.visually-hidden{position:absolute!important;width:1px;height:1px;overflow:hidden;clip:rect(0 0 0 0);white-space:nowrap}
.cards{list-style:none;padding:0;margin:14px 0 0;display:grid;grid-template-columns:repeat(auto-fill,minmax(210px,1fr));gap:12px}
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:12px 14px;display:flex;flex-direction:column;gap:2px}
.card .label{color:var(--muted);font-weight:600;font-size:.9rem}
.card .value{font-size:1.6rem;font-weight:700;font-variant-numeric:tabular-nums}
.change{font-size:.85rem;font-variant-numeric:tabular-nums}.change.good{color:var(--good)}.change.bad{color:var(--bad)}.change.flat{color:var(--muted)}
.note{font-size:.8rem;color:var(--muted)}
.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,520px),1fr));gap:14px}
.chart{background:var(--card);border:1px solid var(--line);border-radius:10px;margin:0;padding:12px 14px}
.chart figcaption{font-weight:700;margin-bottom:6px}
.chart svg{width:100%;height:auto;display:block}
.chart .grid{stroke:#e3e7eb;stroke-width:1}.chart .tick{font-size:11px;fill:var(--muted)}
.legend{list-style:none;display:flex;flex-wrap:wrap;gap:4px 14px;padding:0;margin:6px 0;font-size:.85rem}
.swatch{display:inline-block;width:14px;height:4px;background:var(--c);margin-right:6px;vertical-align:middle;border-radius:2px}
.swatch.dashed{background:repeating-linear-gradient(90deg,var(--c) 0 5px,transparent 5px 8px)}
details summary{cursor:pointer;color:var(--accent);font-size:.85rem}
.scroll{overflow-x:auto}
table{border-collapse:collapse;width:100%;background:var(--card);font-variant-numeric:tabular-nums}
th,td{padding:6px 10px;border-bottom:1px solid var(--line);text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left}thead th{color:var(--muted);font-size:.85rem}
footer{max-width:1200px;margin:0 auto;padding:0 20px 30px;color:var(--muted);font-size:.85rem}
.badge{font-size:.8rem;font-weight:600;vertical-align:middle;background:#e8f1f8;color:#00507d;border-radius:999px;padding:2px 10px;margin-left:8px}
.message{background:#fff;border:1px solid var(--line);border-left:4px solid var(--bad);padding:12px}
@media (max-width:560px){.card .value{font-size:1.3rem}h1{font-size:1.25rem}}
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_reads_as_in_the_tenants_currency() {
        assert_eq!(money(1234567.891, "EUR", 2), "€1,234,567.89");
        assert_eq!(money(-42.0, "USD", 0), "−$42");
        assert_eq!(money(999.5, "CHF", 2), "999.50 CHF");
        assert_eq!(money(-0.001, "EUR", 2), "€0.00");
    }

    #[test]
    fn changes_say_whether_they_are_good_news() {
        let cost = change(Some(120.0), Some(100.0), Measure::Cost, "vs x").expect("defined");
        assert_eq!(cost.text, "+20.0% vs x");
        assert_eq!(cost.good, Some(false));
        let rate = change(Some(0.25), Some(0.2), Measure::Rate, "vs x").expect("defined");
        assert_eq!(rate.text, "+5.0 pp vs x");
        assert_eq!(rate.good, Some(true));
        assert!(change(None, Some(1.0), Measure::Rate, "").is_none());
        assert!(change(Some(1.0), Some(0.0), Measure::Cost, "").is_none());
    }

    #[test]
    fn ticks_are_round_numbers() {
        assert_eq!(nice_step(1000.0), 500.0);
        assert_eq!(nice_step(800.0), 200.0);
        assert!((nice_step(0.8) - 0.2).abs() < 1e-12);
        assert_eq!(nice_step(0.0), 1.0);
        assert_eq!(nice_step(f64::NAN), 1.0);
    }

    #[test]
    fn html_is_escaped() {
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }
}
