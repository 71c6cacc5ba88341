//! Connector state in a JetStream key-value bucket: a rebuilt store keeps every cursor,
//! foreground runs work beside `kpi serve` (or are refused while a run holds the connector),
//! `kpi connectors state` and `reset` show and forget it, and what earlier versions kept in
//! the store moves to the bucket once. Every command connects with the configured credentials.

use std::time::Duration;

use kpi_tests::{metric_value, wait_until, Engine, NatsServer};
use serde_json::json;
use sha2::Digest;

const SPEND_CSV: &str = "date,amount,currency,channel,campaign,source,account\n\
    2025-06-01,120.50,EUR,paid_search,brand,invoices,a\n\
    2025-06-02,80.00,EUR,paid_search,brand,invoices,a\n";

fn csv_connector(dir: &std::path::Path, every: &str) -> String {
    format!(
        "[[connectors]]\nid = \"csv-in\"\nkind = \"csv\"\ntenant = \"acme\"\nevery = \"{every}\"\n\
         [connectors.params]\ndir = \"{}\"\nkind = \"spend\"\n",
        dir.display()
    )
}

async fn kpi(engine: &Engine, args: &[&str]) -> std::process::Output {
    tokio::process::Command::from(kpi_tests::kpi_command())
        .args(args)
        .arg("--config")
        .arg(engine.config_path())
        .env("RUST_BACKTRACE", "0")
        .output()
        .await
        .unwrap()
}

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

async fn stored_events(nats: &NatsServer) -> u64 {
    let js = async_nats::jetstream::new(nats.client().await);
    js.get_stream("KPI_EVENTS")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages
}

async fn connector_runs(engine: &Engine) -> f64 {
    metric_value(
        &engine.metrics().await,
        "kpi_connector_runs_total",
        &[("connector", "csv-in"), ("outcome", "success")],
    )
    .unwrap_or(0.0)
}

#[tokio::test]
async fn a_rebuilt_store_keeps_every_cursor_and_foreground_runs_work_beside_serve() {
    let nats = NatsServer::start();
    let inbox = tempfile::tempdir().unwrap();
    std::fs::write(inbox.path().join("spend.csv"), SPEND_CSV).unwrap();
    let mut engine = Engine::start(&nats.url(), &csv_connector(inbox.path(), "1h"));
    engine.wait_ready().await;
    wait_until("the file imported", Duration::from_secs(20), || async {
        engine.get("/api/v1/kpis?tenant=acme&period=all").await.1["total"]["spend"] == "200.50"
    })
    .await;
    assert_eq!(stored_events(&nats).await, 2);
    let state = kpi(&engine, &["connectors", "state", "csv-in"]).await;
    let text = stdout(&state);
    assert!(state.status.success(), "{state:?}");
    assert!(
        text.contains("state saved") && text.contains("spend.csv"),
        "{text}"
    );
    assert!(text.contains("not running"), "{text}");

    // Rebuild: an empty store and a new consumer replay the stream; the connector's cursor,
    // in the bucket, is untouched: nothing is read or sent again.
    assert!(engine.stop().success());
    drop(engine);
    let mut rebuilt = Engine::start_with_env(
        &nats.url(),
        &csv_connector(inbox.path(), "1h"),
        &[("KPI__NATS__CONSUMER", "kpi-engine-2")],
    );
    rebuilt.wait_ready().await;
    wait_until(
        "a run after the rebuild",
        Duration::from_secs(20),
        || async { connector_runs(&rebuilt).await >= 1.0 },
    )
    .await;
    wait_until("the replayed spend", Duration::from_secs(20), || async {
        rebuilt.get("/api/v1/kpis?tenant=acme&period=all").await.1["total"]["spend"] == "200.50"
    })
    .await;
    assert_eq!(stored_events(&nats).await, 2, "the rebuild re-sent nothing");

    // A foreground run while serve runs: allowed, and it finds nothing new.
    let run = kpi(&rebuilt, &["connectors", "run", "csv-in"]).await;
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        stdout(&run).contains("published 0 events"),
        "{}",
        stdout(&run)
    );

    // Reset: the next run reads the folder from scratch. Its spend lines are sent again
    // (newer versions of the same lines, with the same amounts): the totals do not move.
    let reset = kpi(&rebuilt, &["connectors", "reset", "csv-in"]).await;
    assert!(stdout(&reset).contains("state forgotten"), "{reset:?}");
    let state = kpi(&rebuilt, &["connectors", "state", "csv-in"]).await;
    assert!(stdout(&state).contains("no saved state"), "{state:?}");
    let run = kpi(&rebuilt, &["connectors", "run", "csv-in"]).await;
    assert!(
        stdout(&run).contains("published 2 events"),
        "{}",
        stdout(&run)
    );
    wait_until(
        "the re-sent lines applied",
        Duration::from_secs(20),
        || async {
            stored_events(&nats).await == 4
                && kpi_tests::drained(&nats.client().await, "kpi-engine-2").await
        },
    )
    .await;
    assert_eq!(
        rebuilt.get("/api/v1/kpis?tenant=acme&period=all").await.1["total"]["spend"],
        "200.50"
    );
}

#[tokio::test]
async fn a_run_in_progress_holds_the_connector_and_a_second_one_is_refused_clearly() {
    let nats = NatsServer::start();
    // A plugin that takes a few seconds: its scheduled run holds the lease meanwhile.
    let config = r#"
[[connectors]]
id = "slow"
kind = "exec"
tenant = "acme"
every = "1h"
[connectors.params]
command = "sh"
args = ["-c", "sleep 6; echo '{\"type\":\"state\",\"state\":{\"done\":true}}'"]
timeout_s = 30
"#;
    let mut engine = Engine::start(&nats.url(), config);
    engine.wait_ready().await;
    wait_until(
        "the scheduled run holds the connector",
        Duration::from_secs(20),
        || async {
            stdout(&kpi(&engine, &["connectors", "state", "slow"]).await)
                .contains("held by kpi serve")
        },
    )
    .await;
    let refused = kpi(&engine, &["connectors", "run", "slow"]).await;
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("connector `slow` is being run by kpi serve"),
        "{stderr}"
    );
    let reset = kpi(&engine, &["connectors", "reset", "slow"]).await;
    assert!(
        !reset.status.success(),
        "a reset is refused during a run too"
    );
    wait_until(
        "the scheduled run ends",
        Duration::from_secs(30),
        || async {
            stdout(&kpi(&engine, &["connectors", "state", "slow"]).await).contains("not running")
        },
    )
    .await;
    let state = stdout(&kpi(&engine, &["connectors", "state", "slow"]).await);
    assert!(state.contains(r#"cursor: {"done":true}"#), "{state}");
}

#[tokio::test]
async fn the_state_an_earlier_version_kept_in_the_store_moves_to_the_bucket_once() {
    let nats = NatsServer::start();
    let inbox = tempfile::tempdir().unwrap();
    std::fs::write(inbox.path().join("spend.csv"), SPEND_CSV).unwrap();
    // An engine without connectors, stopped: its store is then free.
    let mut engine = Engine::start(&nats.url(), "");
    engine.wait_ready().await;
    assert!(engine.stop().success());
    // The state an earlier version saved in the store: this file was already imported.
    let digest: String = sha2::Sha256::digest(SPEND_CSV.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let legacy = json!({"cursor": {"spend.csv": digest}, "until": "2025-06-02", "spend": {}});
    {
        let store = kpi_store::Store::open(&engine.store_path(), 1024 * 1024).unwrap();
        store
            .set_connector_state("csv-in", legacy.to_string().as_bytes())
            .unwrap();
        store.flush().unwrap();
    }
    engine.set_extra_config(&csv_connector(inbox.path(), "1s"));
    engine.restart().await;
    wait_until(
        "runs with the moved state",
        Duration::from_secs(20),
        || async { connector_runs(&engine).await >= 2.0 },
    )
    .await;
    assert!(
        engine
            .log()
            .contains("moved the connector's state from the store to the key-value bucket"),
        "{}",
        engine.log()
    );
    assert_eq!(
        stored_events(&nats).await,
        0,
        "the cursor was kept: no re-import"
    );
    let state = stdout(&kpi(&engine, &["connectors", "state", "csv-in"]).await);
    assert!(state.contains(&digest), "{state}");
    // Once: a restart finds nothing to move.
    assert!(engine.stop().success());
    engine.restart().await;
    assert_eq!(
        engine
            .log()
            .matches("moved the connector's state from the store")
            .count(),
        1
    );
}

#[tokio::test]
async fn every_command_connects_with_the_configured_credentials() {
    let nats = NatsServer::start_with_args(None, &["--user", "kpi", "--pass", "s3cret-pass"]);
    let inbox = tempfile::tempdir().unwrap();
    // The helper writes its own [nats] table: the credentials come from the environment, as
    // the README documents for secrets.
    let mut engine = Engine::start_with_env(
        &nats.url(),
        &csv_connector(inbox.path(), "1h"),
        &[
            ("KPI__NATS__USER", "kpi"),
            ("KPI__NATS__PASSWORD", "s3cret-pass"),
        ],
    );
    engine.wait_ready().await;
    let with_credentials = |args: &[&str]| {
        let mut command = tokio::process::Command::from(kpi_tests::kpi_command());
        command
            .args(args)
            .arg("--config")
            .arg(engine.config_path())
            .env("KPI__NATS__USER", "kpi")
            .env("KPI__NATS__PASSWORD", "s3cret-pass")
            .env("RUST_BACKTRACE", "0");
        command.output()
    };
    let lines = inbox.path().join("events.jsonl");
    std::fs::write(
        &lines,
        r#"{"specversion":"1.0","id":"p1","source":"cli","type":"lead.created","time":"2025-06-01T10:00:00Z","tenant":"acme","data":{"lead_id":"L1"}}
"#,
    )
    .unwrap();
    let deals = inbox.path().join("deals.csv");
    std::fs::write(
        &deals,
        "deal_id,status,closed_at,customer_id,amount,currency,lead_id\nD1,won,2025-06-03T10:00:00Z,C1,300,EUR,L1\n",
    )
    .unwrap();
    let publish = with_credentials(&["publish", lines.to_str().unwrap(), "--tenant", "acme"])
        .await
        .unwrap();
    assert!(publish.status.success(), "{publish:?}");
    let import = with_credentials(&[
        "import",
        deals.to_str().unwrap(),
        "--kind",
        "deals",
        "--tenant",
        "acme",
    ])
    .await
    .unwrap();
    assert!(import.status.success(), "{import:?}");
    let demo = with_credentials(&[
        "demo",
        "--tenant",
        "demo",
        "--leads-per-day",
        "1",
        "--years",
        "2",
    ])
    .await
    .unwrap();
    assert!(demo.status.success(), "{demo:?}");
    let state = with_credentials(&["connectors", "state", "csv-in"])
        .await
        .unwrap();
    assert!(state.status.success(), "{state:?}");
    wait_until("all of it applied", Duration::from_secs(30), || async {
        let (_, acme) = engine.get("/api/v1/kpis?tenant=acme&period=all").await;
        let (status, _) = engine.get("/api/v1/kpis?tenant=demo&period=all").await;
        acme["total"]["revenue"] == "300.00" && acme["total"]["leads"] == 1 && status == 200
    })
    .await;

    // Without them, each command fails at once with the server's reason.
    let refused = tokio::process::Command::from(kpi_tests::kpi_command())
        .args(["publish", lines.to_str().unwrap(), "--config"])
        .arg(engine.config_path())
        .env("RUST_BACKTRACE", "0")
        .output()
        .await
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr).to_lowercase();
    assert!(stderr.contains("authorization"), "{stderr}");
}

fn last_success(metrics: &str, connector: &str) -> Option<f64> {
    metric_value(
        metrics,
        "kpi_connector_last_success_timestamp_seconds",
        &[("connector", connector)],
    )
}

#[tokio::test]
async fn the_last_success_survives_a_restart_and_a_silent_webhook_has_one_to_go_stale_from() {
    let nats = NatsServer::start();
    let inbox = tempfile::tempdir().unwrap();
    std::fs::write(inbox.path().join("spend.csv"), SPEND_CSV).unwrap();
    let webhook =
        "[[connectors]]\nid = \"forms\"\nkind = \"webhook\"\ntenant = \"acme\"\nevery = \"1h\"\n\
                   [connectors.params]\nsecret = \"forms-secret-0123456789\"\n";
    // Every hour: one run at start, then nothing until the restart.
    let config = format!("{}{webhook}", csv_connector(inbox.path(), "1h"));
    let started = kpi_tests::wall_clock().timestamp() as f64;
    let mut engine = Engine::start(&nats.url(), &config);
    engine.wait_ready().await;
    // A webhook that never received a request: its last success is when the engine started
    // waiting, so KpiConnectorSilent fires after three of its intervals without one.
    let waiting = last_success(&engine.metrics().await, "forms").expect("exported at start");
    assert!(
        waiting >= started - 1.0 && waiting <= kpi_tests::wall_clock().timestamp() as f64 + 1.0,
        "{waiting} vs a start at {started}"
    );
    wait_until(
        "the first run succeeds",
        Duration::from_secs(30),
        || async { connector_runs(&engine).await >= 1.0 },
    )
    .await;
    let succeeded = last_success(&engine.metrics().await, "csv-in").unwrap();

    // Restarted later, with a connector that now fails (its folder is gone): the last
    // success is still the one saved with its state, not the restart.
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(inbox);
    engine.restart().await;
    wait_until(
        "a failed run after the restart",
        Duration::from_secs(30),
        || async {
            metric_value(
                &engine.metrics().await,
                "kpi_connector_runs_total",
                &[("connector", "csv-in"), ("outcome", "error")],
            )
            .unwrap_or(0.0)
                >= 1.0
        },
    )
    .await;
    let after = last_success(&engine.metrics().await, "csv-in").unwrap();
    assert!(
        (after - succeeded).abs() < 0.5,
        "last success {after} after the restart, {succeeded} before it"
    );
}
