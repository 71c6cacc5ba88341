//! The KPI page at `/` in a real browser (Debian's chromium through chromedriver), against an
//! engine fed with the demo history: it loads without a console error, shows the API's
//! numbers, draws its charts, its pickers change what it shows, it works with the keyboard
//! and on a phone-sized screen.

use std::collections::BTreeMap;
use std::time::Duration;

use kpi_tests::browser::Browser;
use kpi_tests::{drained, wait_until, Engine, NatsServer};
use serde_json::{json, Value};

const CONFIG: &str = r#"
[tenants.default]
timezone = "Europe/Paris"
currency = "EUR"
cac_threshold = { all = 600.0, paid_search = 900.0 }
[tenants.shop]
currency = "USD"
"#;

fn demo(engine: &Engine, args: &[&str]) {
    let output = kpi_tests::kpi_command()
        .arg("demo")
        .arg("--config")
        .arg(engine.config_path())
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "kpi demo: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The page's KPI cards: name → the value as the API gives it (`data-value`).
async fn cards(browser: &Browser) -> BTreeMap<String, String> {
    let found = browser
        .run(
            "return Array.from(document.querySelectorAll('[data-kpi]')).map(e => [e.dataset.kpi, e.dataset.value]);",
            json!([]),
        )
        .await;
    found
        .as_array()
        .unwrap()
        .iter()
        .map(|pair| {
            (
                pair[0].as_str().unwrap().to_string(),
                pair[1].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// A card's value against the API's: the same number (or both undefined), the same money.
fn same(card: &str, api: &Value) -> bool {
    match api {
        Value::Null => card.is_empty(),
        Value::String(text) => card == text,
        // serde_json (without float_roundtrip) may read the API's shortest form one unit in
        // the last place off: compare at that precision.
        Value::Number(number) => match (card.parse::<f64>(), number.as_f64()) {
            (Ok(shown), Some(api)) => (shown - api).abs() <= 1e-14 * api.abs().max(1e-300),
            _ => false,
        },
        _ => false,
    }
}

async fn page_text(browser: &Browser, css: &str) -> String {
    browser
        .run(
            "const e = document.querySelector(arguments[0]); return e ? e.textContent : null;",
            json!([css]),
        )
        .await
        .as_str()
        .unwrap_or_default()
        .to_string()
}

async fn assert_cards_match_the_api(
    browser: &Browser,
    engine: &Engine,
    tenant: &str,
    period: &str,
) {
    let shown = cards(browser).await;
    let (status, kpis) = engine
        .get(&format!("/api/v1/kpis?tenant={tenant}&period={period}"))
        .await;
    assert_eq!(status, 200);
    for field in [
        "cac",
        "conversion_rate",
        "qualified_lead_rate",
        "roi",
        "spend",
        "revenue",
        "new_customers",
    ] {
        assert!(
            same(&shown[field], &kpis["total"][field]),
            "{tenant} {period} {field}: the page shows `{}`, the API {}",
            shown[field],
            kpis["total"][field]
        );
    }
    let year = &period[..4];
    let (_, retention) = engine
        .get(&format!("/api/v1/retention?tenant={tenant}&year={year}"))
        .await;
    assert!(
        same(&shown["retention_rate"], &retention["retention_rate"]),
        "{tenant} {year} retention: page `{}`, API {}",
        shown["retention_rate"],
        retention["retention_rate"]
    );
    // Every channel row carries the API's spend and CAC.
    let rows = browser
        .run(
            "return Array.from(document.querySelectorAll('#channels tr[data-channel]')).map(r => [r.dataset.channel, r.cells[1].dataset.value, r.cells[6].dataset.value]);",
            json!([]),
        )
        .await;
    let channels = kpis["channels"].as_object().unwrap();
    assert_eq!(rows.as_array().unwrap().len(), channels.len() + 1);
    for row in rows.as_array().unwrap() {
        let name = row[0].as_str().unwrap();
        let api = if name == "all" {
            &kpis["total"]
        } else {
            &channels[name]
        };
        assert!(
            same(row[1].as_str().unwrap(), &api["spend"]),
            "{name} spend"
        );
        assert!(same(row[2].as_str().unwrap(), &api["cac"]), "{name} cac");
    }
}

fn no_errors(console: &[(String, String)]) {
    let errors: Vec<_> = console
        .iter()
        .filter(|(level, _)| level == "SEVERE" || level == "WARNING")
        .collect();
    assert!(errors.is_empty(), "console: {errors:?}");
}

/// The month `back` months before `period` (YYYY-MM).
fn months_before(period: &str, back: i32) -> String {
    let (year, month) = period.split_once('-').unwrap();
    let index = year.parse::<i32>().unwrap() * 12 + month.parse::<i32>().unwrap() - 1 - back;
    format!("{:04}-{:02}", index / 12, index % 12 + 1)
}

#[tokio::test]
async fn the_page_shows_the_apis_numbers_and_its_charts_in_a_real_browser() {
    let nats = NatsServer::start();
    let mut engine = Engine::start(&nats.url(), CONFIG);
    engine.wait_ready().await;
    demo(&engine, &["--leads-per-day", "4"]);
    demo(
        &engine,
        &[
            "--tenant",
            "shop",
            "--leads-per-day",
            "2",
            "--years",
            "2",
            "--seed",
            "5",
        ],
    );
    let client = nats.client().await;
    wait_until(
        "the engine applies the demo",
        Duration::from_secs(120),
        || drained(&client, "kpi-engine"),
    )
    .await;

    let browser = Browser::start(1280, 1000).await;
    browser.open(&format!("{}/", engine.base())).await;
    no_errors(&browser.console().await);
    let period = page_text(&browser, "[data-period]").await;
    let (_, current) = engine.get("/api/v1/kpis").await;
    assert_eq!(
        period, current["period"],
        "the page opens on the API's default period"
    );
    assert_eq!(page_text(&browser, "[data-tenant]").await, "default");
    assert_eq!(page_text(&browser, "[data-currency]").await, "EUR");
    assert_cards_match_the_api(&browser, &engine, "default", &period).await;

    // The retention table is the API's series, year by year.
    let year: i32 = period[..4].parse().unwrap();
    let (_, retention) = engine
        .get(&format!(
            "/api/v1/retention/series?tenant=default&from={}&to={year}",
            year - 5
        ))
        .await;
    for entry in retention["series"].as_array().unwrap() {
        let shown = browser
            .run(
                "const r = document.querySelector(`#retention tr[data-year='${arguments[0]}']`); return r ? Array.from(r.cells).map(c => c.dataset.value ?? c.textContent) : null;",
                json!([entry["year"]]),
            )
            .await;
        let shown = shown.as_array().unwrap();
        assert_eq!(shown[1], entry["active_customers"].to_string());
        assert!(same(shown[3].as_str().unwrap(), &entry["retention_rate"]));
        for k in 2..=5 {
            assert!(
                same(
                    shown[2 + k].as_str().unwrap(),
                    &entry["loyalty"][k.to_string()]
                ),
                "{} loyalty {k}: page {:?}, API {}",
                entry["year"],
                shown,
                entry["loyalty"]
            );
        }
    }
    // (On 1 January the current year has no customer yet: look at every year shown.)
    let loyal_5: Vec<f64> = retention["series"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|entry| entry["loyalty"]["5"].as_f64())
        .collect();
    assert!(
        loyal_5.iter().any(|share| *share > 0.0),
        "six years of demo: some customers bought five years in a row ({loyal_5:?})"
    );

    // Each chart is drawn: ink, and one colour per series at least.
    for (chart, colours) in [
        ("chart-cac", 3),
        ("chart-rates", 2),
        ("chart-money", 2),
        ("chart-roi", 3),
    ] {
        let (_, picture) = browser.screenshot_of(&format!("#{chart} svg")).await;
        assert!(
            picture.width > 300 && picture.height > 100,
            "{chart} is {}x{}",
            picture.width,
            picture.height
        );
        let inked = picture.inked_share();
        assert!(
            inked > 0.03,
            "{chart} is blank ({:.1}% inked)",
            inked * 100.0
        );
        let strong = picture.strong_colours(40);
        assert!(
            strong >= colours,
            "{chart}: {strong} colours drawn, {colours} expected"
        );
    }
    let (full, _) = browser.screenshot().await;
    std::fs::write(
        kpi_tests::repo_root().join("target").join("kpi-page.png"),
        full,
    )
    .unwrap();

    // The period picker: a month more than a year back, then its numbers.
    let past = months_before(&period, 14);
    browser
        .click(&format!("#period option[value='{past}']"))
        .await;
    wait_until(
        "the page shows the picked month",
        Duration::from_secs(10),
        || async { page_text(&browser, "[data-period]").await == past },
    )
    .await;
    assert!(browser.url().await.contains(&format!("period={past}")));
    no_errors(&browser.console().await);
    assert_cards_match_the_api(&browser, &engine, "default", &past).await;
    let changes = browser
        .run(
            "return document.querySelectorAll('[data-kpi=cac] .change').length;",
            json!([]),
        )
        .await;
    assert_eq!(
        changes, 2,
        "CAC against the previous month and a year earlier"
    );

    // The tenant picker: another tenant, in its currency.
    browser.click("#tenant option[value='shop']").await;
    wait_until(
        "the page shows the other tenant",
        Duration::from_secs(10),
        || async { page_text(&browser, "[data-tenant]").await == "shop" },
    )
    .await;
    assert_eq!(page_text(&browser, "[data-currency]").await, "USD");
    assert!(page_text(&browser, "[data-kpi=spend] .value")
        .await
        .starts_with('$'));
    assert_cards_match_the_api(&browser, &engine, "shop", &past).await;
    no_errors(&browser.console().await);

    // The keyboard: the first Tab reaches the skip link, the next ones the pickers.
    browser.open(&format!("{}/", engine.base())).await;
    browser.press(&["\u{E004}"]).await;
    let focused = browser
        .run("return document.activeElement.className;", json!([]))
        .await;
    assert_eq!(focused, "skip");
    browser.press(&["\u{E004}"]).await;
    let focused = browser
        .run("return document.activeElement.id;", json!([]))
        .await;
    assert_eq!(focused, "tenant");

    // A phone-sized window: nothing wider than the screen.
    browser.resize(390, 844).await;
    let fits = browser
        .run(
            "return document.documentElement.scrollWidth <= window.innerWidth + 1;",
            json!([]),
        )
        .await;
    assert_eq!(fits, true, "the page scrolls sideways on a phone");

    // An unknown tenant and a bad period are said on the page, with the right status.
    let unknown = reqwest::get(format!("{}/?tenant=nobody", engine.base()))
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    assert!(unknown.text().await.unwrap().contains("unknown"));
    let bad = reqwest::get(format!("{}/?period=2026-13", engine.base()))
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
}
