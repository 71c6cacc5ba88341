//! `kpi report`: the KPI table of a tenant, read from a running engine's API.

use anyhow::Context;
use serde_json::Value;

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

fn row(name: &str, kpis: &Value) -> Vec<String> {
    vec![
        name.to_string(),
        money(&kpis["spend"]),
        kpis["leads"].to_string(),
        number(&kpis["qualified_lead_rate"], true),
        number(&kpis["conversion_rate"], true),
        kpis["new_customers"].to_string(),
        number(&kpis["cac"], false),
        money(&kpis["revenue"]),
        number(&kpis["roi"], false),
        number(&kpis["roas"], false),
    ]
}

fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([header[i].len()])
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

pub async fn print(
    base_url: &str,
    tenant: &str,
    period: Option<&str>,
    json: bool,
) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let mut query = vec![("tenant", tenant.to_string())];
    if let Some(period) = period {
        query.push(("period", period.to_string()));
    }
    let url = format!("{}/api/v1/kpis", base_url.trim_end_matches('/'));
    // An answer holds at most `http.max_rows` channels and campaigns: read every page.
    let mut body = Value::Null;
    let mut offset = 0u64;
    loop {
        let mut page_query = query.clone();
        page_query.push(("offset", offset.to_string()));
        let response = client
            .get(&url)
            .query(&page_query)
            .send()
            .await
            .with_context(|| format!("cannot reach the engine at {url}"))?;
        let status = response.status();
        let mut page: Value = response
            .json()
            .await
            .context("the engine's answer is not JSON")?;
        if !status.is_success() {
            anyhow::bail!(
                "{status}: {}",
                page["error"].as_str().unwrap_or("unknown error")
            );
        }
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
    if json {
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(());
    }
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
    print_table(
        &[
            "channel",
            "spend",
            "leads",
            "qualified",
            "conversion",
            "new cust.",
            "CAC",
            "revenue",
            "ROI",
            "ROAS",
        ],
        &rows,
    );
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
    Ok(())
}
