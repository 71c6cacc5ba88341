//! The files under `deploy/`, checked as far as this machine allows: promtool on the rules and
//! their unit tests, and a real Prometheus scraping a real engine with the repository's rules.

use std::process::Command;
use std::time::Duration;

use kpi_tests::{event, publish, repo_root, wait_until, Engine, NatsServer, Prometheus};
use serde_json::{json, Value};

fn promtool(args: &[&str]) -> (bool, String) {
    let output = Command::new("promtool")
        .args(args)
        .current_dir(repo_root().join("deploy/prometheus"))
        .output()
        .expect("promtool (apt-get install prometheus)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[test]
fn prometheus_config_and_rules_pass_promtool_and_their_unit_tests() {
    let (ok, text) = promtool(&["check", "config", "prometheus.yml"]);
    assert!(ok, "{text}");
    let (ok, text) = promtool(&["check", "rules", "rules/kpi.yml"]);
    assert!(ok, "{text}");
    assert!(text.contains("SUCCESS: 9 rules found"), "{text}");
    let (ok, text) = promtool(&["test", "rules", "tests/kpi_test.yml"]);
    assert!(ok, "{text}");
}

/// The repository's rules with every `for:` shortened to two seconds, so that a test sees an
/// alert go from inactive to firing (promtool's unit tests check the real durations).
fn rules_with_short_for() -> String {
    let rules =
        std::fs::read_to_string(repo_root().join("deploy/prometheus/rules/kpi.yml")).unwrap();
    rules
        .lines()
        .map(|line| match line.trim_start().strip_prefix("for: ") {
            Some(_) => format!("{}for: 2s", &line[..line.len() - line.trim_start().len()]),
            None => line.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn scrape_config(engine: &Engine, rules: bool) -> String {
    format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n{}scrape_configs:\n  - job_name: kpi-engine\n    static_configs:\n      - targets: [\"127.0.0.1:{}\"]\n",
        if rules { "rule_files:\n  - kpi.yml\n" } else { "" },
        engine.port
    )
}

async fn cac_alerts(prometheus: &Prometheus) -> Vec<Value> {
    prometheus
        .alerts()
        .await
        .into_iter()
        .filter(|alert| alert["labels"]["alertname"] == "KpiCacAboveThreshold")
        .collect()
}

#[tokio::test]
async fn cac_alert_fires_in_a_real_prometheus_only_once_cac_passes_its_threshold() {
    let nats = NatsServer::start();
    let mut engine = Engine::start(
        &nats.url(),
        "[tenants.acme]\ncac_threshold = { all = 100.0, paid_search = 150.0 }\n",
    );
    engine.wait_ready().await;
    let prometheus = Prometheus::start(
        &scrape_config(&engine, true),
        &[("kpi.yml", rules_with_short_for())],
    )
    .await;
    let today = chrono::Utc::now();
    let now = today.to_rfc3339();
    let day = today.date_naive().to_string();
    let client = nats.client().await;
    // 160 spent and two new customers this month: CAC 80, under both thresholds.
    publish(&client, &[
        event("l1", "lead.created", &now, "acme", json!({"lead_id": "L1", "channel": "paid_search"})),
        event("l2", "lead.created", &now, "acme", json!({"lead_id": "L2", "channel": "paid_search"})),
        event("d1", "deal.won", &now, "acme", json!({"deal_id": "D1", "customer_id": "C1", "lead_id": "L1", "amount": "900", "currency": "EUR"})),
        event("d2", "deal.won", &now, "acme", json!({"deal_id": "D2", "customer_id": "C2", "lead_id": "L2", "amount": "900", "currency": "EUR"})),
        event("s1", "spend.reported", &now, "acme", json!({"date": day, "amount": "160", "currency": "EUR", "channel": "paid_search", "campaign": "brand", "source": "google_ads", "account": "a"})),
    ])
    .await;
    wait_until("CAC 80 in Prometheus", Duration::from_secs(30), || async {
        prometheus
            .query(r#"kpi_cac{tenant="acme",window="month",channel="all"}"#)
            .await
            .first()
            .is_some_and(|sample| sample["value"][1] == "80")
    })
    .await;
    // Several evaluations (every second, `for: 2s`) with CAC under the threshold: no alert.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(cac_alerts(&prometheus).await, Vec::<Value>::new());

    // The spend is restated to 500: CAC 250, above both thresholds.
    publish(&client, &[event("s1-restated", "spend.reported", &chrono::Utc::now().to_rfc3339(), "acme",
        json!({"date": day, "amount": "500", "currency": "EUR", "channel": "paid_search", "campaign": "brand", "source": "google_ads", "account": "a"}))])
    .await;
    wait_until("the CAC alerts firing", Duration::from_secs(40), || async {
        let alerts = cac_alerts(&prometheus).await;
        alerts.len() == 2 && alerts.iter().all(|alert| alert["state"] == "firing")
    })
    .await;
    let alerts = cac_alerts(&prometheus).await;
    let mut channels: Vec<&str> = alerts
        .iter()
        .map(|a| a["labels"]["channel"].as_str().unwrap())
        .collect();
    channels.sort_unstable();
    assert_eq!(channels, ["all", "paid_search"]);
    let blended = alerts
        .iter()
        .find(|a| a["labels"]["channel"] == "all")
        .unwrap();
    assert_eq!(blended["value"], "2.5e+02");
    assert!(blended["annotations"]["description"]
        .as_str()
        .unwrap()
        .contains("costs 250.00 EUR this month, for acme"));
    assert!(
        !prometheus.log().contains("level=error"),
        "{}",
        prometheus.log()
    );
}

/// Every query of a dashboard: (panel title, expression with the variables at their defaults).
fn dashboard_queries(file: &str) -> Vec<(String, String)> {
    let path = repo_root().join("deploy/grafana/dashboards").join(file);
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let defaults: Vec<(String, String)> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|variable| {
            (
                format!("${}", variable["name"].as_str().unwrap()),
                variable["current"]["value"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        assert_eq!(
            panel["datasource"]["uid"], "prometheus",
            "{file}: {}",
            panel["title"]
        );
        for target in panel["targets"].as_array().unwrap() {
            assert_eq!(target["datasource"]["uid"], "prometheus");
            let mut expr = target["expr"].as_str().unwrap().to_string();
            for (name, value) in &defaults {
                expr = expr.replace(name.as_str(), value);
            }
            assert!(
                !expr.contains('$'),
                "{file}: a variable without a default in {expr}"
            );
            queries.push((panel["title"].as_str().unwrap().to_string(), expr));
        }
    }
    queries
}

#[tokio::test]
async fn every_dashboard_panel_returns_series_from_a_prometheus_scraping_the_demo() {
    let nats = NatsServer::start();
    let inbox = tempfile::tempdir().unwrap();
    let mut engine = Engine::start(
        &nats.url(),
        &format!(
            "[tenants.default]\ncac_threshold = {{ all = 250.0, paid_search = 300.0 }}\n\
             [[connectors]]\nid = \"csv-inbox\"\nkind = \"csv\"\ntenant = \"default\"\nevery = \"1s\"\n\
             [connectors.params]\ndir = \"{}\"\nkind = \"spend\"\n",
            inbox.path().display()
        ),
    );
    engine.wait_ready().await;
    let prometheus = Prometheus::start(&scrape_config(&engine, false), &[]).await;
    let demo = tokio::process::Command::new(kpi_tests::kpi_binary())
        .args(["demo", "--leads-per-day", "4", "--config"])
        .arg(engine.config_path())
        .output()
        .await
        .unwrap();
    assert!(
        demo.status.success(),
        "{}",
        String::from_utf8_lossy(&demo.stderr)
    );
    // A redelivery without Nats-Msg-Id, so that the duplicates panel has a series.
    let now = chrono::Utc::now().to_rfc3339();
    let again = event(
        "again",
        "lead.created",
        &now,
        "default",
        json!({"lead_id": "L-again", "channel": "seo"}),
    );
    let client = nats.client().await;
    publish(
        &client,
        &[
            (again.0.clone(), again.1.clone(), None),
            (again.0, again.1, None),
        ],
    )
    .await;

    let mut queries = dashboard_queries("kpi-overview.json");
    queries.extend(dashboard_queries("kpi-engine.json"));
    assert!(queries.len() >= 25, "{} queries", queries.len());
    // Until every query returns series (rates need two scrapes), then name the empty ones.
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let mut empty = Vec::new();
        for (title, expr) in &queries {
            if prometheus.query(expr).await.is_empty() {
                empty.push(format!("{title}: {expr}"));
            }
        }
        if empty.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "panel queries without series: {empty:#?}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    // The tenant variable's own query.
    let tenants: Value = reqwest::get(format!(
        "{}/api/v1/label/tenant/values?match[]=kpi_leads",
        prometheus.base()
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert!(
        tenants["data"]
            .as_array()
            .unwrap()
            .contains(&json!("default")),
        "{tenants}"
    );
}
