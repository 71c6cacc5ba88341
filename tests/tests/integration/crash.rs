//! `kill -9` at any instant loses nothing and counts nothing twice.
//!
//! A realistic history (`kpi demo`), shuffled and partly redelivered without `Nats-Msg-Id`,
//! is consumed by two engines on the same stream: one killed with SIGKILL again and again
//! while it works, the other left alone. Both must end with the same KPIs for every period
//! checked, and with every distinct event counted exactly once.

use std::collections::HashSet;
use std::time::Duration;

use kpi_tests::{drained, metric_value, publish, wait_until, Engine, NatsServer};
use serde_json::Value;

fn demo_history(dir: &std::path::Path) -> Vec<(String, String, Option<String>)> {
    let file = dir.join("history.jsonl");
    let status = kpi_tests::kpi_command()
        .args([
            "demo",
            "--tenant",
            "crashco",
            "--leads-per-day",
            "8",
            "--years",
            "2",
            "--seed",
            "7",
            "--out",
        ])
        .arg(&file)
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(|line| {
            let value: Value = serde_json::from_str(line).unwrap();
            let subject = format!("kpi.events.crashco.{}", value["type"].as_str().unwrap());
            (
                subject,
                line.to_string(),
                value["id"].as_str().map(str::to_string),
            )
        })
        .collect()
}

/// A deterministic shuffle with about 10 % extra deliveries that JetStream cannot de-duplicate.
fn shuffled_with_redeliveries(
    events: &[(String, String, Option<String>)],
) -> Vec<(String, String, Option<String>)> {
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut out = Vec::with_capacity(events.len() * 11 / 10);
    for event in events {
        out.push(event.clone());
        if next() % 10 == 0 {
            out.push((event.0.clone(), event.1.clone(), None));
        }
    }
    for i in (1..out.len()).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        out.swap(i, j);
    }
    out
}

fn processed_total(metrics: &str) -> f64 {
    [
        "lead.created",
        "lead.qualified",
        "lead.stage_changed",
        "deal.won",
        "deal.lost",
        "spend.reported",
    ]
    .iter()
    .filter_map(|t| {
        metric_value(
            metrics,
            "kpi_events_processed_total",
            &[("tenant", "crashco"), ("type", t)],
        )
    })
    .sum()
}

#[tokio::test]
async fn killed_engine_loses_nothing_and_counts_nothing_twice() {
    let nats = NatsServer::start();
    let work = tempfile::tempdir().unwrap();
    let history = demo_history(work.path());
    let distinct_valid = history
        .iter()
        .filter_map(|e| e.2.clone())
        .collect::<HashSet<_>>()
        .len()
        - 2;
    let deliveries = shuffled_with_redeliveries(&history);
    assert!(
        deliveries.len() > 10_000,
        "a history long enough to kill the engine mid-stream"
    );

    let mut crashing = Engine::start(
        &nats.url(),
        "[ingest]\nbatch_max_events = 200\ncheckpoint_max_events = 2000\n",
    );
    crashing.wait_ready().await;
    let mut reference =
        Engine::start_with_env(&nats.url(), "", &[("KPI__NATS__CONSUMER", "reference")]);
    reference.wait_ready().await;
    let client = nats.client().await;

    let chunks: Vec<_> = deliveries.chunks(deliveries.len() / 4 + 1).collect();
    for (round, chunk) in chunks.iter().enumerate() {
        publish(&client, chunk).await;
        // Let it work, then kill it wherever it is: mid-batch, mid-flush, between ack and fetch.
        tokio::time::sleep(Duration::from_millis(60 + 90 * round as u64)).await;
        crashing.kill9();
        crashing.restart().await;
    }
    for consumer in ["kpi-engine", "reference"] {
        wait_until(
            &format!("{consumer} drains the stream"),
            Duration::from_secs(120),
            || drained(&client, consumer),
        )
        .await;
    }

    let mut periods = vec!["all".to_string()];
    let (_, all) = reference
        .get("/api/v1/kpis?tenant=crashco&period=all")
        .await;
    assert!(all["total"]["leads"].as_i64().unwrap() > 1000, "{all}");
    let this_year = chrono::Datelike::year(&kpi_tests::now());
    for year in this_year - 2..=this_year {
        periods.push(year.to_string());
        periods.push(format!("{year}-Q2"));
        for month in 1..=12 {
            periods.push(format!("{year}-{month:02}"));
        }
        periods.push(format!("{year}-W23"));
        periods.push(format!("{year}-06-15"));
    }
    for period in &periods {
        let query = format!("/api/v1/kpis?tenant=crashco&period={period}");
        let (_, want) = reference.get(&query).await;
        let (_, got) = crashing.get(&query).await;
        assert_eq!(got, want, "period {period} differs after crashes");
    }
    for year in this_year - 2..=this_year {
        let query = format!("/api/v1/retention?tenant=crashco&year={year}");
        assert_eq!(
            crashing.get(&query).await.1,
            reference.get(&query).await.1,
            "retention {year}"
        );
    }
    let crashed_metrics = crashing.metrics().await;
    assert!(
        crashing.log().matches("re-reading messages delivered but not acknowledged").count() >= 1,
        "at least one kill must have hit the engine with messages in flight, or this test proves nothing"
    );
    let reference_metrics = reference.metrics().await;
    assert_eq!(
        processed_total(&reference_metrics),
        distinct_valid as f64,
        "every distinct event applied once"
    );
    assert_eq!(
        processed_total(&crashed_metrics),
        distinct_valid as f64,
        "crashes count no event twice nor lose one"
    );
    for reason in ["negative_amount", "unknown_currency"] {
        let labels = [("tenant", "crashco"), ("reason", reason)];
        assert_eq!(
            metric_value(&crashed_metrics, "kpi_events_rejected_total", &labels),
            Some(1.0),
            "{reason}"
        );
    }
    let js = async_nats::jetstream::new(client.clone());
    let mut rejected = js.get_stream("KPI_REJECTED").await.unwrap();
    // Both engines dead-letter each bad message once (the same Nats-Msg-Id: JetStream keeps one).
    assert_eq!(rejected.info().await.unwrap().state.messages, 2);
}
