//! Start-up, readiness, configuration errors, broker restarts.

use std::time::Duration;

use kpi_tests::{drained, event, free_port, metric_value, publish, wait_until, Engine, NatsServer};
use serde_json::json;

/// Runs `kpi serve` with `config` as its file; it must fail: returns what it printed.
fn serve_must_fail(config: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, config).unwrap();
    let output = kpi_tests::kpi_command()
        .arg("serve")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        !output.status.success(),
        "start-up must fail with:\n{config}"
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test]
async fn a_bad_configuration_stops_start_up_naming_every_key() {
    let stderr = serve_must_fail(
        "[http]\nlisten = \"nowhere\"\n[tenants.acme]\ntimezone = \"Mars/Olympus\"\nfx = { usd = 1.1 }\n",
    );
    for key in [
        "http.listen",
        "tenants.acme.timezone",
        "tenants.acme.fx.usd",
    ] {
        assert!(stderr.contains(key), "{key} not named in:\n{stderr}");
    }
    let stderr = serve_must_fail("[nats]\nurll = \"nats://x\"\n");
    assert!(stderr.contains("urll"), "{stderr}");
}

/// `lead.created` events for leads `L{n}`, n in `range`.
fn leads(range: std::ops::Range<u32>) -> Vec<(String, String, Option<String>)> {
    range
        .map(|n| {
            event(
                &format!("a{n}"),
                "lead.created",
                "2025-01-10T10:00:00Z",
                "acme",
                json!({"lead_id": format!("L{n}")}),
            )
        })
        .collect()
}

#[tokio::test]
async fn readiness_waits_for_nats_and_the_engine_follows_broker_restarts() {
    let port = free_port();
    let mut engine = Engine::start(&format!("nats://127.0.0.1:{port}"), "");
    wait_until("healthz answers", Duration::from_secs(30), || async {
        reqwest::get(format!("{}/healthz", engine.base()))
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    let (status, _) = engine.get("/readyz").await;
    assert_eq!(status, 503, "not ready without NATS");

    let mut nats = NatsServer::start_on(Some(port));
    engine.wait_ready().await;
    let client = nats.client().await;
    let first = leads(0..200);
    publish(&client, &first).await;
    wait_until("first half applied", Duration::from_secs(30), || {
        drained(&client, "kpi-engine")
    })
    .await;

    // NATS lost: the engine is unready as soon as it knows the connection is gone, /readyz
    // and the gauge together (not only when a fetch times out later).
    nats.kill();
    wait_until(
        "the engine sees NATS gone",
        Duration::from_secs(30),
        || async {
            metric_value(&engine.metrics().await, "kpi_engine_nats_connected", &[]) == Some(0.0)
        },
    )
    .await;
    let (status, _) = engine.get("/readyz").await;
    assert_eq!(status, 503, "not ready while NATS is gone");
    assert_eq!(
        metric_value(&engine.metrics().await, "kpi_engine_ready", &[]),
        Some(0.0)
    );
    nats.start_again();
    engine.wait_ready().await;
    let client = nats.client().await;
    let second = leads(200..400);
    publish(&client, &second).await;
    wait_until(
        "second half applied after the broker restart",
        Duration::from_secs(60),
        || async {
            let (_, body) = engine.get("/api/v1/kpis?tenant=acme&period=all").await;
            body["total"]["leads"] == 400
        },
    )
    .await;
    wait_until("drained", Duration::from_secs(30), || {
        drained(&client, "kpi-engine")
    })
    .await;
    let metrics = engine.metrics().await;
    assert_eq!(
        metric_value(&metrics, "kpi_engine_nats_connected", &[]),
        Some(1.0)
    );
    assert_eq!(
        metric_value(
            &metrics,
            "kpi_events_processed_total",
            &[("tenant", "acme"), ("type", "lead.created")]
        ),
        Some(400.0)
    );
}

#[tokio::test]
async fn a_clean_stop_and_restart_keeps_every_kpi() {
    let nats = NatsServer::start();
    let mut engine = Engine::start(&nats.url(), "");
    engine.wait_ready().await;
    let client = nats.client().await;
    let events: Vec<_> = (0..50)
        .flat_map(|n| {
            [
                event(&format!("l{n}"), "lead.created", "2025-05-10T10:00:00Z", "acme", json!({"lead_id": format!("L{n}"), "channel": "seo", "qualified": n % 2 == 0})),
                event(&format!("d{n}"), "deal.won", "2025-05-20T10:00:00Z", "acme", json!({"deal_id": format!("D{n}"), "customer_id": format!("C{}", n % 7), "lead_id": format!("L{n}"), "amount": "10.01", "currency": "EUR"})),
            ]
        })
        .collect();
    publish(&client, &events).await;
    wait_until("drained", Duration::from_secs(30), || {
        drained(&client, "kpi-engine")
    })
    .await;
    let (_, before) = engine.get("/api/v1/kpis?tenant=acme&period=2025-05").await;
    assert_eq!(before["total"]["revenue"], "500.50");
    assert_eq!(before["total"]["new_customers"], 7);
    assert!(
        engine.stop().success(),
        "SIGTERM ends the engine cleanly:\n{}",
        engine.log()
    );
    engine.restart().await;
    let (_, after) = engine.get("/api/v1/kpis?tenant=acme&period=2025-05").await;
    assert_eq!(
        before, after,
        "aggregates rebuilt from the store are the same"
    );
}

#[tokio::test]
async fn metrics_carry_the_process_and_the_build() {
    let nats = NatsServer::start();
    let mut engine = Engine::start(&nats.url(), "");
    engine.wait_ready().await;
    let metrics = engine.metrics().await;
    let resident = metric_value(&metrics, "process_resident_memory_bytes", &[]).unwrap();
    assert!(resident > 1_000_000.0, "{resident} bytes resident");
    let started = metric_value(&metrics, "process_start_time_seconds", &[]).unwrap();
    assert!((started - kpi_tests::wall_clock().timestamp() as f64).abs() < 600.0);
    assert!(metric_value(&metrics, "process_open_fds", &[]).unwrap() > 0.0);
    let build = metrics
        .lines()
        .find(|line| line.starts_with("kpi_build_info{"))
        .expect("kpi_build_info");
    assert!(
        build.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))),
        "{build}"
    );
    assert!(
        build.contains("revision=\"") && !build.contains("revision=\"\""),
        "{build}"
    );
    assert!(build.ends_with(" 1"), "{build}");
}

#[tokio::test]
async fn logs_are_json_lines_when_asked_and_never_coloured_off_a_terminal() {
    let nats = NatsServer::start();
    let mut json_engine = Engine::start_with_env(&nats.url(), "", &[("KPI__LOG__FORMAT", "json")]);
    json_engine.wait_ready().await;
    let log = json_engine.log();
    let lines: Vec<&str> = log.lines().filter(|line| !line.trim().is_empty()).collect();
    assert!(!lines.is_empty());
    for line in &lines {
        let entry: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|error| panic!("not a JSON line ({error}): {line}"));
        assert!(
            entry["level"].is_string() && entry["timestamp"].is_string(),
            "{line}"
        );
        assert!(entry["fields"].is_object(), "{line}");
    }
    assert!(log.contains("\"HTTP server listening"), "{log}");

    let nats_text = NatsServer::start();
    let mut text_engine = Engine::start(&nats_text.url(), "");
    text_engine.wait_ready().await;
    let text = text_engine.log();
    assert!(text.contains("HTTP server listening"), "{text}");
    assert!(
        !text.contains('\u{1b}'),
        "ANSI colour codes in a log file: {text}"
    );

    let refused = serve_must_fail("[log]\nformat = \"xml\"\n");
    assert!(
        refused.contains("log.format") || refused.contains("xml"),
        "{refused}"
    );
}

/// `kpi config check` with `config` as its file and `env`: (success, stdout, stderr).
fn config_check(config: &str, env: &[(&str, &str)]) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kpi.toml");
    std::fs::write(&path, config).unwrap();
    let output = kpi_tests::kpi_command()
        .args(["config", "check", "--config"])
        .arg(&path)
        .envs(env.iter().copied())
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn config_check_validates_what_serve_would_and_prints_the_effective_settings_masked() {
    let good = "[http]\nlisten = \"127.0.0.1:9999\"\nbasic_auth_username = \"prometheus\"\n\
                basic_auth_password = \"correct-horse-battery\"\n\
                [tenants.acme]\ncurrency = \"EUR\"\nfx = { USD = 0.92 }\n\
                [[connectors]]\nid = \"gads\"\nkind = \"google_ads\"\ntenant = \"acme\"\nevery = \"1h\"\n\
                [connectors.params]\ncustomer_id = \"1234567890\"\ndeveloper_token = \"${GADS_DEV}\"\n\
                client_id = \"id\"\nclient_secret = \"${GADS_SECRET}\"\nrefresh_token = \"${GADS_REFRESH}\"\n";
    let secrets = [
        ("GADS_DEV", "dev-token-0123"),
        ("GADS_SECRET", "client-secret-0123"),
        ("GADS_REFRESH", "refresh-token-0123"),
        ("KPI__NATS__URL", "nats://10.1.2.3:4222"),
    ];
    let (ok, stdout, stderr) = config_check(good, &secrets);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("listen = \"127.0.0.1:9999\""), "{stdout}");
    assert!(
        stdout.contains("url = \"nats://10.1.2.3:4222\""),
        "the environment applies: {stdout}"
    );
    assert!(
        stdout.contains("[metrics]") && stdout.contains("history_months = 13"),
        "{stdout}"
    );
    for secret in [
        "correct-horse-battery",
        "dev-token-0123",
        "client-secret-0123",
        "refresh-token-0123",
    ] {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "{secret} printed"
        );
    }
    assert!(stdout.contains("********"));
    assert!(stderr.contains("configuration OK"), "{stderr}");

    // A secret missing from the environment, a bad key: named, exit non-zero.
    let (ok, _, stderr) = config_check(good, &secrets[1..]);
    assert!(!ok);
    assert!(stderr.contains("GADS_DEV"), "{stderr}");
    let (ok, _, stderr) = config_check(
        "[http]\nlisten = \"nowhere\"\n[tenants.acme]\ntimezone = \"Mars/Olympus\"\n",
        &[],
    );
    assert!(!ok);
    assert!(
        stderr.contains("http.listen") && stderr.contains("tenants.acme.timezone"),
        "{stderr}"
    );
}

#[tokio::test]
async fn nats_url_may_list_several_servers_the_first_of_them_down() {
    let nats = NatsServer::start();
    let down = format!("nats://127.0.0.1:{}", free_port());
    let servers = format!("{down},{}", nats.url());
    let mut engine = Engine::start(&servers, "");
    engine.wait_ready().await;
    // A command connects through the same list.
    let output = kpi_tests::kpi_command()
        .args([
            "demo",
            "--tenant",
            "listed",
            "--leads-per-day",
            "1",
            "--years",
            "1",
            "--config",
        ])
        .arg(engine.config_path())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let client = nats.client().await;
    wait_until("the demo applied", Duration::from_secs(60), || {
        drained(&client, "kpi-engine")
    })
    .await;
    let (status, body) = engine.get("/api/v1/kpis?tenant=listed&period=all").await;
    assert_eq!(status, 200);
    assert!(body["total"]["leads"].as_i64().unwrap() > 0, "{body}");
    // With the default nats.replicas, the streams have one replica, as before.
    let js = async_nats::jetstream::new(client);
    let mut events = js.get_stream("KPI_EVENTS").await.unwrap();
    assert_eq!(events.info().await.unwrap().config.num_replicas, 1);
}
