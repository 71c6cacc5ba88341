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
    assert!(text.contains("SUCCESS: 18 rules found"), "{text}");
    let (ok, text) = promtool(&["test", "rules", "tests/kpi_test.yml"]);
    assert!(ok, "{text}");

    // Every alert links its own runbook section of the README, and its unit test.
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let anchors: Vec<String> = readme
        .lines()
        .filter_map(|line| line.strip_prefix("#### "))
        .map(|heading| heading.trim().to_lowercase())
        .collect();
    let tests =
        std::fs::read_to_string(repo_root().join("deploy/prometheus/tests/kpi_test.yml")).unwrap();
    let rules = &yaml("deploy/prometheus/rules/kpi.yml")[0];
    let mut alerts = 0;
    for group in rules["groups"].as_vec().unwrap() {
        for rule in group["rules"].as_vec().unwrap() {
            let Some(alert) = rule["alert"].as_str() else {
                continue;
            };
            alerts += 1;
            let url = rule["annotations"]["runbook_url"]
                .as_str()
                .unwrap_or_else(|| panic!("{alert} has no runbook_url"));
            let anchor = url.rsplit_once('#').map(|(_, anchor)| anchor).unwrap_or("");
            assert_eq!(anchor, alert.to_lowercase(), "{alert} links {url}");
            assert!(
                anchors.iter().any(|heading| heading == anchor),
                "README has no runbook section #### {alert}"
            );
            assert!(
                tests.contains(&format!("alertname: {alert}\n")),
                "{alert} has no promtool unit test"
            );
        }
    }
    assert_eq!(alerts, 18);
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
async fn the_first_rejection_of_a_tenant_fires_its_alert_in_a_real_prometheus() {
    let nats = NatsServer::start();
    let mut engine = Engine::start(&nats.url(), "[tenants.acme]\ncurrency = \"EUR\"\n");
    engine.wait_ready().await;
    let prometheus = Prometheus::start(
        &scrape_config(&engine, true),
        &[("kpi.yml", rules_with_short_for())],
    )
    .await;
    // Before anything is rejected, the counter is there at 0 (and so are the duplicates).
    let counter = r#"kpi_events_rejected_total{tenant="acme",reason="invalid_json"}"#;
    wait_until(
        "the rejection counter at 0 in Prometheus",
        Duration::from_secs(30),
        || async {
            prometheus
                .query(counter)
                .await
                .first()
                .is_some_and(|sample| sample["value"][1] == "0")
        },
    )
    .await;
    assert!(!prometheus
        .query(r#"kpi_events_duplicate_total{tenant="acme",type="lead.created"}"#)
        .await
        .is_empty());
    let client = nats.client().await;
    publish(
        &client,
        &[(
            "kpi.events.acme.lead.created".into(),
            "{not json".into(),
            None,
        )],
    )
    .await;
    wait_until(
        "KpiEventsRejected firing for the first rejection",
        Duration::from_secs(60),
        || async {
            prometheus.alerts().await.iter().any(|alert| {
                alert["labels"]["alertname"] == "KpiEventsRejected"
                    && alert["labels"]["tenant"] == "acme"
                    && alert["labels"]["reason"] == "invalid_json"
                    && alert["state"] == "firing"
            })
        },
    )
    .await;
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
    let today = kpi_tests::now();
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
    publish(&client, &[event("s1-restated", "spend.reported", &kpi_tests::now().to_rfc3339(), "acme",
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
    let description = blended["annotations"]["description"].as_str().unwrap();
    for said in [
        "all channels together",
        "spent 500.00 EUR",
        "for 2 new customer(s)",
        "a CAC of 250.00 EUR",
        "above the threshold of 100.00 EUR",
    ] {
        assert!(description.contains(said), "{said}: {description}");
    }
    let summary = blended["annotations"]["summary"].as_str().unwrap();
    assert!(summary.contains("(all channels)"), "{summary}");
    assert!(blended["annotations"]["runbook_url"]
        .as_str()
        .unwrap()
        .ends_with("#kpicacabovethreshold"));
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
            // "All" selected: Grafana puts the variable's allValue in the query.
            let current = variable["current"]["value"].as_str().unwrap();
            let value = if current == "$__all" {
                variable["allValue"].as_str().unwrap()
            } else {
                current
            };
            (
                format!("${}", variable["name"].as_str().unwrap()),
                value.to_string(),
            )
        })
        // Grafana's own: at least four scrape intervals (1 s here), as Grafana computes it.
        .chain([("$__rate_interval".to_string(), "1m".to_string())])
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
            // The Cluster row reads the metrics of several engines ([cluster] enabled), which
            // the single engine scraped here does not export: the cluster tests check them.
            if expr.contains("kpi_engine_partition_")
                || expr.contains("kpi_engine_cluster_")
                || expr.contains("kpi_engine_warming")
            {
                continue;
            }
            queries.push((panel["title"].as_str().unwrap().to_string(), expr));
        }
    }
    queries
}

#[tokio::test]
async fn every_dashboard_panel_returns_series_from_a_prometheus_scraping_the_demo() {
    // The gauges are the *current* period's: on the 1st of a month no spend was reported yet,
    // and CAC or ROI are rightly undefined. The panels are checked on an ordinary day, the
    // same whatever day the suite runs: the engine and the demo both read this clock.
    const ORDINARY_DAY: &str = "2026-06-17T12:00:00Z";
    let nats = NatsServer::start();
    let inbox = tempfile::tempdir().unwrap();
    let mut engine = Engine::start_with_env(
        &nats.url(),
        &format!(
            "[tenants.default]\ncac_threshold = {{ all = 250.0, paid_search = 300.0 }}\n\
             [[connectors]]\nid = \"csv-inbox\"\nkind = \"csv\"\ntenant = \"default\"\nevery = \"1s\"\n\
             [connectors.params]\ndir = \"{}\"\nkind = \"spend\"\n",
            inbox.path().display()
        ),
        &[("KPI_CLOCK", ORDINARY_DAY)],
    );
    engine.wait_ready().await;
    let prometheus = Prometheus::start(&scrape_config(&engine, false), &[]).await;
    let demo = tokio::process::Command::from(kpi_tests::kpi_command())
        .args(["demo", "--leads-per-day", "4", "--config"])
        .arg(engine.config_path())
        .env("KPI_CLOCK", ORDINARY_DAY)
        .output()
        .await
        .unwrap();
    assert!(
        demo.status.success(),
        "{}",
        String::from_utf8_lossy(&demo.stderr)
    );
    // A redelivery without Nats-Msg-Id, so that the duplicates panel has a series.
    let now = ORDINARY_DAY;
    let again = event(
        "again",
        "lead.created",
        now,
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

fn yaml(relative: &str) -> Vec<yaml_rust2::Yaml> {
    let path = repo_root().join(relative);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    yaml_rust2::YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

/// `kpi connectors list --config FILE` loads and validates a configuration file completely.
fn assert_engine_config_is_valid(path: &std::path::Path) {
    let output = kpi_tests::kpi_command()
        .args(["connectors", "list", "--config"])
        .arg(path)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}: {}",
        path.display(),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn toml_value(path: &std::path::Path, section: &str, key: &str) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let mut in_section = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_section = line == format!("[{section}]");
        } else if in_section {
            if let Some((name, value)) = line.split_once('=') {
                if name.trim() == key {
                    return value.trim().trim_matches('"').to_string();
                }
            }
        }
    }
    panic!("{}: no {section}.{key}", path.display())
}

/// Whether a compose service is in `profile` (`docker compose --profile PROFILE up`).
fn in_profile(service: &yaml_rust2::Yaml, profile: &str) -> bool {
    service["profiles"]
        .as_vec()
        .is_some_and(|profiles| profiles.iter().any(|p| p.as_str() == Some(profile)))
}

/// Whether a `nats:` image is a nats-server with the pinned-client fixes that multi-engine
/// mode relies on: 2.12.12 or later in 2.12, 2.14.3 or later in 2.14, or a later minor.
fn nats_image_has_the_pinned_client_fixes(image: &str) -> bool {
    let Some(tag) = image.strip_prefix("nats:") else {
        return false;
    };
    // `2.12.12-alpine`: 2, 12, 12; a tag without a patch version (`2.12-alpine`) moves.
    let version: Vec<u32> = tag
        .split(['.', '-'])
        .take(3)
        .map(|part| part.parse::<u32>().unwrap_or(0))
        .collect();
    match version.as_slice() {
        [2, 12, patch] => *patch >= 12,
        [2, 14, patch] => *patch >= 3,
        [2, minor, _] => *minor > 14,
        [major, _, _] => *major > 2,
        _ => false,
    }
}

#[test]
fn compose_mounts_existing_files_and_agrees_with_the_configurations() {
    let compose_dir = repo_root().join("deploy/compose");
    let compose = &yaml("deploy/compose/compose.yaml")[0];
    let services = compose["services"].as_hash().unwrap();
    // `docker compose up` starts the services without a profile; `--profile cluster` adds
    // three NATS servers and three engines.
    let names: Vec<&str> = services
        .iter()
        .filter(|(_, service)| service["profiles"].is_badvalue())
        .map(|(name, _)| name.as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["nats", "engine", "prometheus", "alertmanager", "grafana"]
    );
    let cluster_names: Vec<&str> = services
        .iter()
        .filter(|(_, service)| in_profile(service, "cluster"))
        .map(|(name, _)| name.as_str().unwrap())
        .collect();
    assert_eq!(
        cluster_names,
        ["nats-1", "nats-2", "nats-3", "kpi-1", "kpi-2", "kpi-3"]
    );
    assert_eq!(names.len() + cluster_names.len(), services.len());
    let mut mounts = std::collections::HashMap::new();
    for (name, service) in services {
        let name = name.as_str().unwrap();
        assert!(
            !service["healthcheck"]["test"].is_badvalue(),
            "{name} has no health check"
        );
        for volume in service["volumes"].as_vec().into_iter().flatten() {
            let volume = volume.as_str().unwrap();
            let mut parts = volume.split(':');
            let (source, target) = (parts.next().unwrap(), parts.next().unwrap());
            if source.starts_with('.') {
                let path = compose_dir.join(source);
                assert!(
                    path.exists(),
                    "{name} mounts {source}, which does not exist"
                );
                mounts.insert(source.to_string(), (name.to_string(), target.to_string()));
            } else {
                assert!(
                    !compose["volumes"][source].is_badvalue(),
                    "{name}: volume {source} is not declared"
                );
            }
        }
    }
    let context = compose_dir.join(
        services[&yaml_rust2::Yaml::from_str("engine")]["build"]["context"]
            .as_str()
            .unwrap(),
    );
    assert!(context.join("Dockerfile").exists());

    // The engine: its configuration, port and NATS address.
    let kpi_toml = compose_dir.join("kpi.toml");
    assert_engine_config_is_valid(&kpi_toml);
    assert_eq!(
        mounts["./kpi.toml"],
        ("engine".to_string(), "/etc/kpi/kpi.toml".to_string())
    );
    let listen = toml_value(&kpi_toml, "http", "listen");
    assert_eq!(listen, "0.0.0.0:9464");
    let engine = &compose["services"]["engine"];
    assert_eq!(engine["ports"][0].as_str().unwrap(), "127.0.0.1:9464:9464");
    assert_eq!(toml_value(&kpi_toml, "nats", "url"), "nats://nats:4222");
    assert!(toml_value(&kpi_toml, "store", "path").starts_with("/var/lib/kpi/"));
    assert!(engine["volumes"]
        .as_vec()
        .unwrap()
        .iter()
        .any(|v| v.as_str() == Some("kpi-data:/var/lib/kpi")));
    let dockerfile = std::fs::read_to_string(repo_root().join("Dockerfile")).unwrap();
    assert!(dockerfile.contains(r#"CMD ["serve", "--config", "/etc/kpi/kpi.toml"]"#));
    for line in dockerfile
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        for source in line
            .split_whitespace()
            .skip(1)
            .collect::<Vec<_>>()
            .split_last()
            .unwrap()
            .1
        {
            assert!(
                repo_root().join(source).exists(),
                "Dockerfile copies {source}, which does not exist"
            );
        }
    }

    // The `cluster` profile: three NATS servers with JetStream fsyncing every write and routes
    // to each other, and three engines of one configuration sharing the partitions on them.
    let nats_conf = std::fs::read_to_string(compose_dir.join("nats-cluster.conf")).unwrap();
    let setting = |line: &str| nats_conf.lines().any(|l| l.trim() == line);
    assert!(setting("jetstream {"), "{nats_conf}");
    assert!(setting("sync_interval: always"), "{nats_conf}");
    assert!(setting("server_name: $NATS_SERVER_NAME"), "{nats_conf}");
    assert!(setting("store_dir: /data"), "{nats_conf}");
    let cluster_toml = compose_dir.join("kpi-cluster.toml");
    assert_engine_config_is_valid(&cluster_toml);
    assert_eq!(toml_value(&cluster_toml, "cluster", "enabled"), "true");
    assert_eq!(toml_value(&cluster_toml, "nats", "replicas"), "3");
    assert_eq!(toml_value(&cluster_toml, "http", "listen"), listen);
    assert!(toml_value(&cluster_toml, "store", "path").starts_with("/var/lib/kpi/"));
    let urls = toml_value(&cluster_toml, "nats", "url");
    let servers: Vec<&str> = urls.split(',').map(str::trim).collect();
    assert_eq!(
        servers,
        [
            "nats://nats-1:4222",
            "nats://nats-2:4222",
            "nats://nats-3:4222"
        ]
    );
    for n in 1..=3 {
        let server = format!("nats-{n}");
        let nats = &compose["services"][server.as_str()];
        let image = nats["image"].as_str().unwrap();
        assert!(
            nats_image_has_the_pinned_client_fixes(image),
            "{server}: {image}"
        );
        assert_eq!(
            nats["environment"]["NATS_SERVER_NAME"].as_str(),
            Some(server.as_str())
        );
        assert_eq!(
            nats["command"][1].as_str(),
            Some("/etc/nats/nats-cluster.conf")
        );
        let volumes = nats["volumes"].as_vec().unwrap();
        assert!(volumes
            .iter()
            .any(|v| v.as_str() == Some("./nats-cluster.conf:/etc/nats/nats-cluster.conf:ro")));
        assert!(volumes
            .iter()
            .any(|v| v.as_str() == Some(format!("nats-{n}-data:/data").as_str())));
        assert!(
            setting(format!("nats://{server}:6222").as_str()),
            "no route to {server}: {nats_conf}"
        );

        let name = format!("kpi-{n}");
        let kpi = &compose["services"][name.as_str()];
        assert_eq!(
            kpi["environment"]["KPI__CLUSTER__ENGINE"].as_str(),
            Some(name.as_str())
        );
        assert_eq!(kpi["build"], engine["build"]);
        assert_eq!(kpi["image"], engine["image"]);
        assert_eq!(kpi["command"], engine["command"]);
        let volumes = kpi["volumes"].as_vec().unwrap();
        assert!(volumes
            .iter()
            .any(|v| v.as_str() == Some("./kpi-cluster.toml:/etc/kpi/kpi.toml:ro")));
        assert!(volumes
            .iter()
            .any(|v| v.as_str() == Some(format!("kpi-{n}-data:/var/lib/kpi").as_str())));
        assert_eq!(
            kpi["ports"][0].as_str(),
            Some(format!("127.0.0.1:{}:9464", 9464 + n).as_str())
        );
        for peer in ["nats-1", "nats-2", "nats-3"] {
            assert_eq!(
                kpi["depends_on"][peer]["condition"].as_str(),
                Some("service_healthy"),
                "{name} waits for {peer}"
            );
        }
    }

    // Prometheus scrapes the engine service and sends to the alertmanager service; its rules
    // are mounted where rule_files looks.
    let prometheus = &yaml("deploy/prometheus/prometheus.yml")[0];
    assert_eq!(
        prometheus["scrape_configs"][0]["static_configs"][0]["targets"][0].as_str(),
        Some("engine:9464")
    );
    assert_eq!(
        prometheus["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"][0].as_str(),
        Some("alertmanager:9093")
    );
    assert_eq!(
        prometheus["rule_files"][0].as_str(),
        Some("/etc/prometheus/rules/*.yml")
    );
    // The engines of the `cluster` profile, found by name when they run (job kpi-engine too).
    let found = &prometheus["scrape_configs"][0]["dns_sd_configs"][0];
    let found_names: Vec<&str> = found["names"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|name| name.as_str().unwrap())
        .collect();
    assert_eq!(found_names, ["kpi-1", "kpi-2", "kpi-3"]);
    assert_eq!(found["port"].as_i64(), Some(9464));
    assert_eq!(mounts["../prometheus/rules"].1, "/etc/prometheus/rules");
    assert_eq!(
        mounts["../prometheus/prometheus.yml"].1,
        "/etc/prometheus/prometheus.yml"
    );
    assert_eq!(
        mounts["../alertmanager/alertmanager.yml"].1,
        "/etc/alertmanager/alertmanager.yml"
    );

    // Grafana reads the prometheus service and the mounted dashboards.
    let datasources = &yaml("deploy/grafana/provisioning/datasources/prometheus.yml")[0];
    assert_eq!(
        datasources["datasources"][0]["url"].as_str(),
        Some("http://prometheus:9090")
    );
    assert_eq!(
        datasources["datasources"][0]["uid"].as_str(),
        Some("prometheus")
    );
    let providers = &yaml("deploy/grafana/provisioning/dashboards/kpi.yml")[0];
    let dashboards_path = providers["providers"][0]["options"]["path"]
        .as_str()
        .unwrap();
    assert_eq!(mounts["../grafana/dashboards"].1, dashboards_path);
    assert_eq!(
        mounts["../grafana/provisioning"].1,
        "/etc/grafana/provisioning"
    );
    let home = compose["services"]["grafana"]["environment"]
        ["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
        .as_str()
        .unwrap();
    let home_file = home.strip_prefix(&format!("{dashboards_path}/")).unwrap();
    assert!(repo_root()
        .join("deploy/grafana/dashboards")
        .join(home_file)
        .exists());

    // Every file alertmanager.yml reads (the SMTP password...) is mounted in its container.
    let alertmanager = &yaml("deploy/alertmanager/alertmanager.yml")[0];
    fn files_read(node: &yaml_rust2::Yaml, into: &mut Vec<String>) {
        match node {
            yaml_rust2::Yaml::Hash(map) => {
                for (key, value) in map {
                    match (key.as_str(), value.as_str()) {
                        (Some(key), Some(path)) if key.ends_with("_file") => {
                            into.push(path.to_string())
                        }
                        _ => files_read(value, into),
                    }
                }
            }
            yaml_rust2::Yaml::Array(items) => items.iter().for_each(|item| files_read(item, into)),
            _ => {}
        }
    }
    let mut read = Vec::new();
    files_read(alertmanager, &mut read);
    assert!(read.iter().any(|path| path.contains("smtp")), "{read:?}");
    let service = &compose["services"]["alertmanager"];
    let mut provided: Vec<String> = mounts
        .values()
        .filter(|(name, _)| name == "alertmanager")
        .map(|(_, target)| target.clone())
        .collect();
    for secret in service["secrets"].as_vec().into_iter().flatten() {
        let (name, target) = match secret.as_str() {
            Some(name) => (name.to_string(), format!("/run/secrets/{name}")),
            None => {
                let name = secret["source"].as_str().unwrap().to_string();
                let target = secret["target"].as_str().map(str::to_string);
                let target = target.unwrap_or_else(|| name.clone());
                let target = if target.starts_with('/') {
                    target
                } else {
                    format!("/run/secrets/{target}")
                };
                (name, target)
            }
        };
        let file = compose["secrets"][name.as_str()]["file"]
            .as_str()
            .unwrap_or_else(|| panic!("secret {name} is not declared with a file"));
        assert!(
            compose_dir.join(file).exists(),
            "secret {name}: {file} does not exist"
        );
        provided.push(target);
    }
    for path in &read {
        assert!(
            provided.iter().any(|target| target == path),
            "alertmanager.yml reads {path}, which compose does not mount ({provided:?})"
        );
    }

    let amtool = Command::new("amtool")
        .args(["check-config"])
        .arg(repo_root().join("deploy/alertmanager/alertmanager.yml"))
        .output()
        .expect("amtool (apt-get install prometheus-alertmanager)");
    assert!(
        amtool.status.success(),
        "{}",
        String::from_utf8_lossy(&amtool.stdout)
    );
}

/// `major.minor` of a `rust-version` or image tag (`1.89`, `1.89.0`, `1.89-bookworm`).
fn major_minor(version: &str) -> (u32, u32) {
    let mut parts = version
        .split(['.', '-'])
        .map(|part| part.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

#[test]
fn the_image_and_the_workspace_use_the_toolchain_the_locked_dependencies_need() {
    // The highest rust-version of the locked dependencies (workspace members excluded: their
    // rust-version is the one checked).
    let output = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["metadata", "--format-version", "1", "--locked"])
        .current_dir(repo_root())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: Value = serde_json::from_slice(&output.stdout).unwrap();
    let members: Vec<&str> = metadata["workspace_members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_str().unwrap())
        .collect();
    let (needed, by) = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|package| !members.contains(&package["id"].as_str().unwrap()))
        .filter_map(|package| {
            let version = package["rust_version"].as_str()?;
            Some((
                major_minor(version),
                package["name"].as_str().unwrap().to_string(),
            ))
        })
        .max()
        .unwrap();
    let workspace = std::fs::read_to_string(repo_root().join("Cargo.toml")).unwrap();
    let declared = workspace
        .lines()
        .find_map(|line| line.strip_prefix("rust-version = "))
        .unwrap()
        .trim_matches('"');
    assert_eq!(
        major_minor(declared),
        needed,
        "workspace rust-version {declared}, but {by} needs {needed:?}"
    );
    let dockerfile = std::fs::read_to_string(repo_root().join("Dockerfile")).unwrap();
    let image = dockerfile
        .lines()
        .find_map(|line| line.strip_prefix("FROM rust:"))
        .unwrap();
    assert!(
        major_minor(image) >= needed,
        "the Dockerfile builds with rust:{image}, but {by} needs {needed:?}"
    );
    assert!(dockerfile.contains("cargo build --release --locked"));
}

#[test]
fn kubernetes_manifests_are_consistent_and_their_configuration_valid() {
    let documents = yaml("deploy/kubernetes/kpi-engine.yaml");
    let find = |kind: &str| {
        documents
            .iter()
            .find(|document| document["kind"].as_str() == Some(kind))
            .unwrap_or_else(|| panic!("no {kind}"))
    };
    let config_map = find("ConfigMap");
    let secret = find("Secret");
    let service = find("Service");
    let statefulset = find("StatefulSet");
    let pod = &statefulset["spec"]["template"]["spec"];
    let container = &pod["containers"][0];

    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        config.path(),
        config_map["data"]["kpi.toml"].as_str().unwrap(),
    )
    .unwrap();
    assert_engine_config_is_valid(config.path());
    let listen = toml_value(config.path(), "http", "listen");
    let port: i64 = listen.rsplit(':').next().unwrap().parse().unwrap();
    assert_eq!(container["ports"][0]["containerPort"].as_i64(), Some(port));
    assert_eq!(
        container["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/readyz")
    );
    assert_eq!(service["spec"]["ports"][0]["port"].as_i64(), Some(port));
    assert_eq!(
        container["envFrom"][0]["secretRef"]["name"],
        secret["metadata"]["name"]
    );
    assert_eq!(
        pod["volumes"][0]["configMap"]["name"],
        config_map["metadata"]["name"]
    );
    assert_eq!(container["args"][2].as_str(), Some("/etc/kpi/kpi.toml"));
    // The store lives on the claimed volume.
    let claim = statefulset["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
        .as_str()
        .unwrap();
    let data_mount = container["volumeMounts"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|mount| mount["name"].as_str() == Some(claim))
        .unwrap()["mountPath"]
        .as_str()
        .unwrap();
    assert!(toml_value(config.path(), "store", "path").starts_with(&format!("{data_mount}/")));
    assert_eq!(statefulset["spec"]["replicas"].as_i64(), Some(1));

    // The StatefulSet's governing Service is headless; clients have their own.
    let services: Vec<&yaml_rust2::Yaml> = documents
        .iter()
        .filter(|document| document["kind"].as_str() == Some("Service"))
        .collect();
    let governing = services
        .iter()
        .find(|s| s["metadata"]["name"] == statefulset["spec"]["serviceName"])
        .expect("the StatefulSet's serviceName is a Service of the manifest");
    assert_eq!(governing["spec"]["clusterIP"].as_str(), Some("None"));

    // The image is set in one place (kustomization.yaml), to this version, never `latest`.
    let kustomization = &yaml("deploy/kubernetes/kustomization.yaml")[0];
    assert!(kustomization["resources"]
        .as_vec()
        .unwrap()
        .iter()
        .any(|r| r.as_str() == Some("kpi-engine.yaml")));
    let image = container["image"].as_str().unwrap();
    let (name, tag) = image.split_once(':').unwrap();
    let replaced = &kustomization["images"][0];
    assert_eq!(
        replaced["name"].as_str(),
        Some(name),
        "kustomization replaces {image}"
    );
    assert!(
        replaced["newName"].as_str().unwrap().contains('/'),
        "a registry path"
    );
    assert_eq!(tag, env!("CARGO_PKG_VERSION"));
    assert_eq!(replaced["newTag"].as_str(), Some(tag));
    assert!(!image.contains("latest"));

    // Prometheus scrapes it as job="kpi-engine", the job the alert rules watch: through the
    // Prometheus Operator (job named after the one Service it selects) or a plain config.
    let rules =
        std::fs::read_to_string(repo_root().join("deploy/prometheus/rules/kpi.yml")).unwrap();
    assert!(rules.contains(r#"up{job="kpi-engine"}"#));
    let monitor = &yaml("deploy/kubernetes/servicemonitor.yaml")[0];
    assert!(monitor["spec"]["jobLabel"].is_badvalue());
    let selected = [selected_service(monitor, &services)];
    let port = monitor["spec"]["endpoints"][0]["port"].as_str().unwrap();
    assert!(selected[0]["spec"]["ports"]
        .as_vec()
        .unwrap()
        .iter()
        .any(|p| p["name"].as_str() == Some(port)));
    let scrape = &yaml("deploy/kubernetes/prometheus-scrape.yml")[0];
    assert_eq!(
        scrape["scrape_configs"][0]["job_name"].as_str(),
        Some("kpi-engine")
    );
    // (Debian's promtool is built without Kubernetes discovery: the keep rule is checked here.)
    let keep = &scrape["scrape_configs"][0]["relabel_configs"][0];
    assert_eq!(keep["action"].as_str(), Some("keep"));
    assert_eq!(
        keep["regex"].as_str(),
        Some(format!("kpi-engine;{port}").as_str()),
        "keeps the kpi-engine Service's {port} port only"
    );
}

/// The first document of a manifest of kind `kind`.
/// The one Service of `services` the ServiceMonitor `monitor` selects: `kpi-engine`.
fn selected_service<'a>(
    monitor: &yaml_rust2::Yaml,
    services: &[&'a yaml_rust2::Yaml],
) -> &'a yaml_rust2::Yaml {
    let wanted = monitor["spec"]["selector"]["matchLabels"]
        .as_hash()
        .unwrap();
    let selected: Vec<&yaml_rust2::Yaml> = services
        .iter()
        .copied()
        .filter(|service| {
            wanted
                .iter()
                .all(|(key, value)| service["metadata"]["labels"][key.as_str().unwrap()] == *value)
        })
        .collect();
    assert_eq!(selected.len(), 1, "the ServiceMonitor selects one Service");
    assert_eq!(selected[0]["metadata"]["name"].as_str(), Some("kpi-engine"));
    selected[0]
}

fn document<'a>(documents: &'a [yaml_rust2::Yaml], kind: &str) -> &'a yaml_rust2::Yaml {
    documents
        .iter()
        .find(|document| document["kind"].as_str() == Some(kind))
        .unwrap_or_else(|| panic!("no {kind}"))
}

/// The `containerPort` of a container's port named `name`.
fn container_port(container: &yaml_rust2::Yaml, name: &str) -> i64 {
    container["ports"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|port| port["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no port {name}"))["containerPort"]
        .as_i64()
        .unwrap()
}

/// Where a container mounts volume `volume`.
fn mount_path(container: &yaml_rust2::Yaml, volume: &str) -> String {
    container["volumeMounts"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|mount| mount["name"].as_str() == Some(volume))
        .unwrap_or_else(|| panic!("no mount of {volume}"))["mountPath"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn kubernetes_cluster_manifests_run_three_engines_on_a_three_node_nats_cluster() {
    let kustomization = &yaml("deploy/kubernetes/cluster/kustomization.yaml")[0];
    let resources: Vec<&str> = kustomization["resources"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|resource| resource.as_str().unwrap())
        .collect();
    assert_eq!(resources, ["nats-cluster.yaml", "kpi-engine-cluster.yaml"]);
    let nats = yaml("deploy/kubernetes/cluster/nats-cluster.yaml");
    let engines = yaml("deploy/kubernetes/cluster/kpi-engine-cluster.yaml");

    // NATS: three servers named after their pods, JetStream on the claimed volume fsyncing
    // every write, routes to the three pods' stable names under the headless Service.
    let nats_set = document(&nats, "StatefulSet");
    assert_eq!(nats_set["spec"]["replicas"].as_i64(), Some(3));
    let nats_pod = &nats_set["spec"]["template"]["spec"];
    let nats_container = &nats_pod["containers"][0];
    let nats_image = nats_container["image"].as_str().unwrap();
    assert!(
        nats_image_has_the_pinned_client_fixes(nats_image),
        "{nats_image}"
    );
    let nats_name = nats_set["metadata"]["name"].as_str().unwrap();
    let nats_service = nats_set["spec"]["serviceName"].as_str().unwrap();
    let nats_governing = nats
        .iter()
        .find(|document| {
            document["kind"].as_str() == Some("Service")
                && document["metadata"]["name"].as_str() == Some(nats_service)
        })
        .expect("the NATS StatefulSet's serviceName is a Service of the manifest");
    assert_eq!(nats_governing["spec"]["clusterIP"].as_str(), Some("None"));
    // The servers find each other before they are ready.
    assert_eq!(
        nats_governing["spec"]["publishNotReadyAddresses"].as_bool(),
        Some(true)
    );
    let nats_map = document(&nats, "ConfigMap");
    let nats_conf = nats_map["data"]["nats.conf"].as_str().unwrap();
    let setting = |line: &str| nats_conf.lines().any(|l| l.trim() == line);
    assert!(setting("jetstream {"), "{nats_conf}");
    assert!(setting("sync_interval: always"), "{nats_conf}");
    assert!(setting("server_name: $SERVER_NAME"), "{nats_conf}");
    let server_name = nats_container["env"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|env| env["name"].as_str() == Some("SERVER_NAME"))
        .expect("SERVER_NAME in the NATS container's environment");
    assert_eq!(
        server_name["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        Some("metadata.name")
    );
    assert_eq!(
        nats_pod["volumes"][0]["configMap"]["name"],
        nats_map["metadata"]["name"]
    );
    let nats_config_dir = mount_path(nats_container, "config");
    assert_eq!(
        nats_container["args"][1].as_str(),
        Some(format!("{nats_config_dir}/nats.conf").as_str())
    );
    let nats_claim = nats_set["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
        .as_str()
        .unwrap();
    let nats_store = mount_path(nats_container, nats_claim);
    assert!(
        setting(format!("store_dir: {nats_store}").as_str()),
        "{nats_conf}"
    );
    let pods: Vec<String> = (0..3)
        .map(|index| format!("{nats_name}-{index}.{nats_service}"))
        .collect();
    let cluster_port = container_port(nats_container, "cluster");
    for pod in &pods {
        assert!(
            setting(format!("nats://{pod}:{cluster_port}").as_str()),
            "no route to {pod}: {nats_conf}"
        );
    }
    let nats_budget = document(&nats, "PodDisruptionBudget");
    assert_eq!(nats_budget["spec"]["maxUnavailable"].as_i64(), Some(1));
    assert_eq!(
        nats_budget["spec"]["selector"],
        nats_set["spec"]["selector"]
    );

    // The engines: three, each named after its pod, with a valid configuration in cluster
    // mode on the three NATS pods, R3 streams, and the store on the claimed volume.
    let statefulset = document(&engines, "StatefulSet");
    assert_eq!(statefulset["spec"]["replicas"].as_i64(), Some(3));
    let pod = &statefulset["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let config_map = document(&engines, "ConfigMap");
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        config.path(),
        config_map["data"]["kpi.toml"].as_str().unwrap(),
    )
    .unwrap();
    assert_engine_config_is_valid(config.path());
    assert_eq!(toml_value(config.path(), "cluster", "enabled"), "true");
    assert_eq!(toml_value(config.path(), "nats", "replicas"), "3");
    let urls = toml_value(config.path(), "nats", "url");
    let servers: Vec<&str> = urls.split(',').map(str::trim).collect();
    let client_port = container_port(nats_container, "client");
    let expected: Vec<String> = pods
        .iter()
        .map(|pod| format!("nats://{pod}:{client_port}"))
        .collect();
    assert_eq!(servers, expected);
    let engine_name = container["env"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|env| env["name"].as_str() == Some("KPI__CLUSTER__ENGINE"))
        .expect("KPI__CLUSTER__ENGINE in the engine's environment");
    assert_eq!(
        engine_name["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        Some("metadata.name")
    );
    let listen = toml_value(config.path(), "http", "listen");
    let port: i64 = listen.rsplit(':').next().unwrap().parse().unwrap();
    assert_eq!(container_port(container, "http"), port);
    assert_eq!(
        container["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/readyz")
    );
    assert_eq!(
        container["envFrom"][0]["secretRef"]["name"],
        document(&engines, "Secret")["metadata"]["name"]
    );
    assert_eq!(
        pod["volumes"][0]["configMap"]["name"],
        config_map["metadata"]["name"]
    );
    assert_eq!(mount_path(container, "config"), "/etc/kpi");
    assert_eq!(container["args"][2].as_str(), Some("/etc/kpi/kpi.toml"));
    let claim = statefulset["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
        .as_str()
        .unwrap();
    let data_mount = mount_path(container, claim);
    assert!(toml_value(config.path(), "store", "path").starts_with(&format!("{data_mount}/")));

    // Spread over the nodes, one engine down at a time at most.
    let spread = &pod["affinity"]["podAntiAffinity"]
        ["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"];
    assert_eq!(
        spread["topologyKey"].as_str(),
        Some("kubernetes.io/hostname")
    );
    assert_eq!(
        spread["labelSelector"]["matchLabels"],
        statefulset["spec"]["selector"]["matchLabels"]
    );
    let budget = document(&engines, "PodDisruptionBudget");
    assert_eq!(budget["spec"]["maxUnavailable"].as_i64(), Some(1));
    assert_eq!(budget["spec"]["selector"], statefulset["spec"]["selector"]);

    // The Services: a headless one governs the StatefulSet, and the client one is what the
    // ServiceMonitor of deploy/kubernetes selects (every engine scraped, job="kpi-engine").
    let services: Vec<&yaml_rust2::Yaml> = engines
        .iter()
        .filter(|document| document["kind"].as_str() == Some("Service"))
        .collect();
    let governing = services
        .iter()
        .find(|s| s["metadata"]["name"] == statefulset["spec"]["serviceName"])
        .expect("the StatefulSet's serviceName is a Service of the manifest");
    assert_eq!(governing["spec"]["clusterIP"].as_str(), Some("None"));
    let monitor = &yaml("deploy/kubernetes/servicemonitor.yaml")[0];
    let selected = [selected_service(monitor, &services)];
    assert_eq!(selected[0]["spec"]["ports"][0]["port"].as_i64(), Some(port));
    assert_eq!(
        selected[0]["spec"]["ports"][0]["name"].as_str(),
        monitor["spec"]["endpoints"][0]["port"].as_str()
    );

    // The image is set in kustomization.yaml, to this version.
    let image = container["image"].as_str().unwrap();
    let (name, tag) = image.split_once(':').unwrap();
    let replaced = &kustomization["images"][0];
    assert_eq!(
        replaced["name"].as_str(),
        Some(name),
        "kustomization replaces {image}"
    );
    assert_eq!(tag, env!("CARGO_PKG_VERSION"));
    assert_eq!(replaced["newTag"].as_str(), Some(tag));
}

#[test]
fn systemd_unit_verifies_and_hardens_the_service() {
    let unit =
        std::fs::read_to_string(repo_root().join("deploy/systemd/kpi-engine.service")).unwrap();
    for setting in [
        "User=kpi",
        "Restart=on-failure",
        "StateDirectory=kpi",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "CapabilityBoundingSet=",
        "ExecStart=/usr/local/bin/kpi serve --config /etc/kpi/kpi.toml",
    ] {
        assert!(
            unit.lines().any(|line| line == setting),
            "{setting} missing"
        );
    }
    // The install steps at the top: nothing names the kpi user or group before it exists.
    let steps: Vec<&str> = unit
        .lines()
        .take_while(|line| line.starts_with('#'))
        .filter_map(|line| line.strip_prefix("#   "))
        .collect();
    let created = steps
        .iter()
        .position(|step| step.starts_with("useradd ") && step.ends_with(" kpi"))
        .expect("an install step creates the kpi user");
    for (index, step) in steps.iter().enumerate() {
        let words: Vec<&str> = step.split_whitespace().collect();
        let names_kpi = words.windows(2).any(|pair| {
            matches!(
                pair[0],
                "-o" | "-g" | "--owner" | "--group" | "chown" | "chgrp"
            ) && (pair[1] == "kpi" || pair[1].starts_with("kpi:"))
        });
        assert!(
            !names_kpi || index > created,
            "install step {index} (`{step}`) names the kpi user before step {created} creates it"
        );
    }
    let config = repo_root().join("deploy/systemd/kpi.toml");
    assert_engine_config_is_valid(&config);
    assert!(toml_value(&config, "store", "path").starts_with("/var/lib/kpi/"));
    // systemd-analyze checks every directive; the binary is the one built here.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("kpi-engine.service");
    std::fs::write(
        &copy,
        unit.replace(
            "/usr/local/bin/kpi",
            kpi_tests::kpi_binary().to_str().unwrap(),
        ),
    )
    .unwrap();
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("systemd-analyze");
    let text = String::from_utf8_lossy(&verify.stderr);
    assert!(
        verify.status.success() && !text.contains("Unknown"),
        "{text}"
    );
}

#[tokio::test]
async fn metrics_behind_basic_auth_and_tls_are_scraped_by_a_real_prometheus() {
    let nats = NatsServer::start();
    let secrets = tempfile::tempdir().unwrap();
    let (cert, key, password_file) = (
        secrets.path().join("cert.pem"),
        secrets.path().join("key.pem"),
        secrets.path().join("metrics-password"),
    );
    let openssl = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            // A self-signed server certificate, not a CA (rustls refuses a CA as end entity).
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-addext",
            "extendedKeyUsage=serverAuth",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl");
    assert!(
        openssl.status.success(),
        "{}",
        String::from_utf8_lossy(&openssl.stderr)
    );
    std::fs::write(&password_file, "correct-horse-battery-staple\n").unwrap();
    // Through the environment (the test's configuration file already has an [http] table).
    let (password_path, cert_path, key_path) = (
        password_file.display().to_string(),
        cert.display().to_string(),
        key.display().to_string(),
    );
    let engine = Engine::start_with_env(
        &nats.url(),
        "",
        &[
            ("KPI__HTTP__BASIC_AUTH_USERNAME", "prometheus"),
            ("KPI__HTTP__BASIC_AUTH_PASSWORD_FILE", &password_path),
            ("KPI__HTTP__TLS_CERT_FILE", &cert_path),
            ("KPI__HTTP__TLS_KEY_FILE", &key_path),
        ],
    );
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&cert).unwrap()).unwrap();
    let client = reqwest::Client::builder()
        .add_root_certificate(ca)
        .build()
        .unwrap();
    let https = format!("https://127.0.0.1:{}", engine.port);
    wait_until(
        "the engine ready over HTTPS",
        Duration::from_secs(60),
        || async {
            client
                .get(format!("{https}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        },
    )
    .await;

    let metrics = client.get(format!("{https}/metrics")).send().await.unwrap();
    assert_eq!(metrics.status(), 401);
    assert_eq!(
        metrics.headers()["www-authenticate"],
        "Basic realm=\"kpi-engine\""
    );
    let wrong = client
        .get(format!("{https}/metrics"))
        .basic_auth("prometheus", Some("guess"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let api = client
        .get(format!("{https}/api/v1/tenants"))
        .send()
        .await
        .unwrap();
    assert_eq!(api.status(), 401, "the API is protected too");
    for path in ["/", "/api/v1/openapi.json", "/api/v1/kpis/series"] {
        let page = client.get(format!("{https}{path}")).send().await.unwrap();
        assert_eq!(
            page.status(),
            401,
            "{path} is behind the same auth as the API"
        );
    }
    let page = client
        .get(format!("{https}/"))
        .basic_auth("prometheus", Some("correct-horse-battery-staple"))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("<html"));
    let right = client
        .get(format!("{https}/metrics"))
        .basic_auth("prometheus", Some("correct-horse-battery-staple"))
        .send()
        .await
        .unwrap();
    assert_eq!(right.status(), 200);
    assert!(right.text().await.unwrap().contains("kpi_engine_ready 1"));
    assert_eq!(
        client
            .get(format!("{https}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert!(
        reqwest::get(format!("http://127.0.0.1:{}/healthz", engine.port))
            .await
            .is_err(),
        "plain HTTP must not be answered"
    );

    // Prometheus scrapes it as deploy/prometheus/prometheus.yml documents.
    let config = format!(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: kpi-engine\n    scheme: https\n    tls_config:\n      ca_file: {}\n    basic_auth:\n      username: prometheus\n      password_file: {}\n    static_configs:\n      - targets: [\"127.0.0.1:{}\"]\n",
        cert.display(),
        password_file.display(),
        engine.port
    );
    let prometheus = Prometheus::start(&config, &[]).await;
    wait_until(
        "Prometheus scraping over TLS with basic auth",
        Duration::from_secs(30),
        || async {
            prometheus
                .query(r#"kpi_engine_ready{job="kpi-engine"}"#)
                .await
                .first()
                .is_some_and(|sample| sample["value"][1] == "1")
        },
    )
    .await;
    assert!(!engine.log().contains("correct-horse-battery-staple"));
}

/// The repository's rules with time compressed for a test: every `for` and `keep_firing_for`
/// two seconds, 15-minute windows 10 seconds, a connector's minimum silence (an hour) six
/// seconds. The expressions are the repository's.
fn rules_compressed() -> String {
    rules_with_short_for()
        .lines()
        .map(
            |line| match line.trim_start().strip_prefix("keep_firing_for: ") {
                Some(_) => format!(
                    "{}keep_firing_for: 2s",
                    &line[..line.len() - line.trim_start().len()]
                ),
                None => line.replace("[15m]", "[10s]").replace("3600)", "6)"),
            },
        )
        .collect::<Vec<_>>()
        .join("\n")
}

/// The notifications a local webhook receiver got from Alertmanager: (alertname, status).
#[derive(Clone, Default)]
struct Received(std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>);

impl Received {
    fn has(&self, alert: &str, status: &str) -> bool {
        self.0
            .lock()
            .unwrap()
            .iter()
            .any(|(name, got)| name == alert && got == status)
    }
}

async fn webhook_receiver() -> (u16, Received) {
    let received = Received::default();
    let into = received.clone();
    let app = axum::Router::new().route(
        "/alerts",
        axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
            let into = into.clone();
            async move {
                for alert in body["alerts"].as_array().into_iter().flatten() {
                    into.0.lock().unwrap().push((
                        alert["labels"]["alertname"]
                            .as_str()
                            .unwrap_or("")
                            .to_string(),
                        alert["status"].as_str().unwrap_or("").to_string(),
                    ));
                }
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (port, received)
}

#[tokio::test]
async fn alertmanager_delivers_the_alerts_firing_and_resolved_to_a_receiver() {
    let nats = NatsServer::start();
    let secret = "forms-secret-0123456789";
    let mut engine = Engine::start(
        &nats.url(),
        &format!(
            "[tenants.acme]\ncac_threshold = {{ all = 100.0 }}\n\
             [[connectors]]\nid = \"forms\"\nkind = \"webhook\"\ntenant = \"acme\"\nevery = \"1s\"\n\
             [connectors.params]\nsecret = \"{secret}\"\n"
        ),
    );
    engine.wait_ready().await;
    let (receiver_port, received) = webhook_receiver().await;
    let alertmanager = kpi_tests::Alertmanager::start(&format!(
        "route:\n  receiver: test\n  group_by: [alertname, tenant, connector]\n  group_wait: 1s\n  group_interval: 1s\n  repeat_interval: 1h\n\
         receivers:\n  - name: test\n    webhook_configs:\n      - url: http://127.0.0.1:{receiver_port}/alerts\n        send_resolved: true\n"
    ))
    .await;
    let prometheus = Prometheus::start(
        &format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - kpi.yml\n\
             alerting:\n  alertmanagers:\n    - static_configs:\n        - targets: [\"127.0.0.1:{}\"]\n\
             scrape_configs:\n  - job_name: kpi-engine\n    static_configs:\n      - targets: [\"127.0.0.1:{}\"]\n",
            alertmanager.port, engine.port
        ),
        &[("kpi.yml", rules_compressed())],
    )
    .await;
    // Prometheus has seen the counters at 0 before the first rejection (as it would have, on
    // an engine running for more than a scrape).
    wait_until("a first scrape", Duration::from_secs(30), || async {
        !prometheus
            .query(r#"kpi_events_rejected_total{tenant="acme",reason="invalid_json"}"#)
            .await
            .is_empty()
    })
    .await;
    let client = nats.client().await;
    let now = kpi_tests::now().to_rfc3339();
    let day = kpi_tests::today().to_string();
    // 500 spent for two new customers: CAC 250 over a threshold of 100. And one message that
    // is not JSON. The webhook connector never receives a request.
    publish(&client, &[
        event("l1", "lead.created", &now, "acme", json!({"lead_id": "L1", "channel": "paid_search"})),
        event("l2", "lead.created", &now, "acme", json!({"lead_id": "L2", "channel": "paid_search"})),
        event("d1", "deal.won", &now, "acme", json!({"deal_id": "D1", "customer_id": "C1", "lead_id": "L1", "amount": "900", "currency": "EUR"})),
        event("d2", "deal.won", &now, "acme", json!({"deal_id": "D2", "customer_id": "C2", "lead_id": "L2", "amount": "900", "currency": "EUR"})),
        event("s1", "spend.reported", &now, "acme", json!({"date": day, "amount": "500", "currency": "EUR", "channel": "paid_search", "source": "google_ads", "account": "a"})),
        ("kpi.events.acme.lead.created".into(), "{not json".into(), None),
    ])
    .await;
    for alert in [
        "KpiCacAboveThreshold",
        "KpiEventsRejected",
        "KpiConnectorSilent",
    ] {
        wait_until(
            &format!("{alert} delivered firing"),
            Duration::from_secs(90),
            || async { received.has(alert, "firing") },
        )
        .await;
    }

    // Each resolves: the spend restated to 100 (CAC 50), no new rejection, the webhook called.
    publish(&client, &[event("s1b", "spend.reported", &kpi_tests::now().to_rfc3339(), "acme",
        json!({"date": day, "amount": "100", "currency": "EUR", "channel": "paid_search", "source": "google_ads", "account": "a"}))])
    .await;
    let body = json!([{"specversion": "1.0", "id": "form-1", "source": "forms", "type": "lead.created",
        "time": kpi_tests::now().to_rfc3339(), "tenant": "acme", "data": {"lead_id": "F1", "channel": "seo"}}])
    .to_string();
    let signature = kpi_connect::kinds::webhook::sign(
        secret,
        kpi_tests::wall_clock().timestamp(),
        body.as_bytes(),
    );
    let posted = reqwest::Client::new()
        .post(format!("{}/webhooks/forms", engine.base()))
        .header("X-Kpi-Signature", signature)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status(), 202);
    for alert in [
        "KpiCacAboveThreshold",
        "KpiEventsRejected",
        "KpiConnectorSilent",
    ] {
        wait_until(
            &format!("{alert} delivered resolved"),
            Duration::from_secs(90),
            || async { received.has(alert, "resolved") },
        )
        .await;
    }

    // The engine killed: KpiEngineDown fires; back up, it resolves.
    engine.kill9();
    wait_until(
        "KpiEngineDown delivered firing",
        Duration::from_secs(90),
        || async { received.has("KpiEngineDown", "firing") },
    )
    .await;
    engine.restart().await;
    wait_until(
        "KpiEngineDown delivered resolved",
        Duration::from_secs(90),
        || async { received.has("KpiEngineDown", "resolved") },
    )
    .await;
    assert!(
        !alertmanager.log().contains("level=error"),
        "{}",
        alertmanager.log()
    );
    assert!(
        !prometheus.log().contains("level=error"),
        "{}",
        prometheus.log()
    );
}
