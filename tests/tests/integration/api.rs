//! Events in, KPIs out: the JSON API and /metrics on a small history whose answers are
//! worked out by hand from SPEC.

use std::time::Duration;

use kpi_tests::{drained, event, metric_value, publish, wait_until, Engine, NatsServer};
use serde_json::{json, Value};

const CONFIG: &str = r#"
[tenants.acme]
cac_threshold = { all = 250.0, paid_search = 300.0 }
[tenants.paris]
timezone = "Europe/Paris"
fx = { USD = 0.5 }
"#;

fn history() -> Vec<(String, String, Option<String>)> {
    vec![
        event("l1", "lead.created", "2025-03-02T10:00:00Z", "acme", json!({"lead_id": "L1", "channel": "paid_search", "campaign": "spring", "qualified": true})),
        event("l2", "lead.created", "2025-03-03T10:00:00Z", "acme", json!({"lead_id": "L2", "channel": "social", "qualified": false})),
        event("q2", "lead.qualified", "2025-03-05T10:00:00Z", "acme", json!({"lead_id": "L2"})),
        event("s1", "lead.stage_changed", "2025-03-04T10:00:00Z", "acme", json!({"lead_id": "L1", "stage": "meeting_booked"})),
        event("d1", "deal.won", "2025-03-10T10:00:00Z", "acme", json!({"deal_id": "D1", "customer_id": "C1", "lead_id": "L1", "amount": "1000.00", "currency": "EUR"})),
        // a deal whose lead arrives later: first under `events`, then under the lead's `social`
        event("d2", "deal.won", "2025-03-11T10:00:00Z", "acme", json!({"deal_id": "D2", "customer_id": "C2", "lead_id": "L9", "amount": 500, "currency": "EUR", "channel": "events"})),
        event("l9", "lead.created", "2025-03-01T10:00:00Z", "acme", json!({"lead_id": "L9", "channel": "social", "campaign": "retarget"})),
        // a deal cancelled later
        event("d3", "deal.won", "2025-03-12T10:00:00Z", "acme", json!({"deal_id": "D3", "customer_id": "C3", "amount": "300", "currency": "EUR"})),
        event("d3x", "deal.lost", "2025-03-15T10:00:00Z", "acme", json!({"deal_id": "D3"})),
        // spend restated the next morning, and a stale correction that must lose
        event("sp1", "spend.reported", "2025-03-02T23:00:00Z", "acme", json!({"date": "2025-03-02", "amount": "100.00", "currency": "EUR", "channel": "paid_search", "campaign": "spring", "source": "google_ads", "account": "a"})),
        event("sp2", "spend.reported", "2025-03-03T06:00:00Z", "acme", json!({"date": "2025-03-02", "amount": "150.00", "currency": "EUR", "channel": "paid_search", "campaign": "spring", "source": "google_ads", "account": "a"})),
        event("sp0", "spend.reported", "2025-03-02T20:00:00Z", "acme", json!({"date": "2025-03-02", "amount": "999.00", "currency": "EUR", "channel": "paid_search", "campaign": "spring", "source": "google_ads", "account": "a"})),
        event("tools", "spend.reported", "2025-03-01T08:00:00Z", "acme", json!({"date": "2025-03-01", "amount": "49.90", "currency": "EUR", "category": "tools", "source": "billing"})),
        // a returning customer the next year
        event("d4", "deal.won", "2026-02-01T10:00:00Z", "acme", json!({"deal_id": "D4", "customer_id": "C1", "amount": "200", "currency": "EUR"})),
        // only spend: CAC is +Inf on /metrics, null in JSON
        event("x1", "spend.reported", "2025-03-02T23:00:00Z", "spendonly", json!({"date": "2025-03-02", "amount": "10", "currency": "EUR"})),
        // a lead at 00:30 in Paris on April 1st is 22:30 UTC on March 31st; USD at 0.5
        event("p1", "lead.created", "2025-03-31T22:30:00Z", "paris", json!({"lead_id": "P1", "channel": "seo"})),
        event("p2", "deal.won", "2025-12-31T23:30:00Z", "paris", json!({"deal_id": "PD", "customer_id": "PC", "lead_id": "P1", "amount": "100", "currency": "USD"})),
    ]
    .into_iter()
    .chain((0..10).map(|k| {
        event(&format!("dime{k}"), "spend.reported", "2025-03-05T12:00:00Z", "acme", json!({"date": "2025-03-05", "amount": 0.1, "currency": "EUR", "channel": "social", "campaign": "retarget", "source": "meta", "account": format!("acct{k}")}))
    }))
    .collect()
}

fn close(value: &Value, want: f64) -> bool {
    value.as_f64().is_some_and(|got| (got - want).abs() < 1e-9)
}

#[tokio::test]
async fn events_become_exact_kpis_on_the_api_and_metrics() {
    let nats = NatsServer::start();
    let mut engine = Engine::start(&nats.url(), CONFIG);
    engine.wait_ready().await;
    let client = nats.client().await;
    let events = history();
    publish(&client, &events).await;
    // a redelivery JetStream cannot see (no Nats-Msg-Id): the engine must ignore it
    let mut again = events[4].clone();
    again.2 = None;
    publish(&client, &[again]).await;
    wait_until(
        "the engine drains the stream",
        Duration::from_secs(30),
        || drained(&client, "kpi-engine"),
    )
    .await;

    let (status, march) = engine.get("/api/v1/kpis?tenant=acme&period=2025-03").await;
    assert_eq!(status, 200, "{march}");
    let total = &march["total"];
    assert_eq!(
        total["spend"], "200.90",
        "150 (restated) + 10 x 0.10 + 49.90 of tools"
    );
    assert_eq!(total["new_customers"], 2);
    assert!(close(&total["cac"], 100.45));
    assert_eq!(total["leads"], 3);
    assert_eq!(total["qualified_leads"], 2);
    assert!(close(&total["qualified_lead_rate"], 2.0 / 3.0));
    assert_eq!(total["converted_leads"], 2);
    assert!(close(&total["conversion_rate"], 2.0 / 3.0));
    assert_eq!(
        total["revenue"], "1500.00",
        "the cancelled deal does not count"
    );
    assert!(close(&total["roi"], (1500.0 - 200.9) / 200.9));
    assert!(close(&total["roas"], 1500.0 / 200.9));
    assert!(close(&total["stages"]["meeting_booked"], 1.0 / 3.0));
    assert_eq!(march["currency"], "EUR");

    let channels = march["channels"].as_object().unwrap();
    assert_eq!(
        channels.keys().collect::<Vec<_>>(),
        ["paid_search", "social"],
        "D2 moved to its lead's channel; D3 was cancelled"
    );
    assert_eq!(channels["paid_search"]["spend"], "150.00");
    assert!(close(&channels["paid_search"]["cac"], 150.0));
    assert_eq!(channels["social"]["spend"], "1.00");
    assert_eq!(channels["social"]["revenue"], "500.00");
    assert_eq!(channels["social"]["leads"], 2);
    assert_eq!(
        march["campaigns"]["spring"],
        json!({"channel": "paid_search", "spend": "150.00", "revenue": "1000.00", "roi": 1000.0 / 150.0 - 1.0, "roas": 1000.0 / 150.0})
    );
    assert_eq!(march["campaigns"]["retarget"]["revenue"], "500.00");

    let (_, day) = engine
        .get("/api/v1/kpis?tenant=acme&period=2025-03-02")
        .await;
    assert_eq!(day["total"]["spend"], "150.00");
    let (_, week) = engine.get("/api/v1/kpis?tenant=acme&period=2025-W11").await;
    assert_eq!(
        week["total"]["revenue"], "1500.00",
        "March 10 (a Monday) to 12 are in ISO week 11 of 2025"
    );

    let (_, retention) = engine.get("/api/v1/retention?tenant=acme&year=2026").await;
    assert_eq!(
        retention,
        json!({"tenant": "acme", "year": 2026, "active_customers": 1, "retained_customers": 1, "retention_rate": 0.5, "loyalty": {"2": 1.0, "3": 0.0, "4": 0.0, "5": 0.0}})
    );

    let (_, paris_april) = engine.get("/api/v1/kpis?tenant=paris&period=2025-04").await;
    assert_eq!(
        paris_april["total"]["leads"], 1,
        "local time decides the period"
    );
    let (_, paris_2026) = engine.get("/api/v1/kpis?tenant=paris&period=2026").await;
    assert_eq!(
        paris_2026["total"]["revenue"], "50.00",
        "100 USD at 0.5, won on January 1st in Paris"
    );

    let (_, spend_only) = engine.get("/api/v1/kpis?tenant=spendonly&period=all").await;
    assert_eq!(spend_only["total"]["cac"], Value::Null);

    let metrics = engine.metrics().await;
    let all = |channel| [("tenant", "acme"), ("window", "all"), ("channel", channel)];
    assert_eq!(
        metric_value(
            &metrics,
            "kpi_cac",
            &[
                ("tenant", "acme"),
                ("window", "all"),
                ("channel", "all"),
                ("currency", "EUR")
            ]
        ),
        Some(200.9 / 2.0),
        "all-time: 200.90 over 2 new customers"
    );
    assert_eq!(
        metric_value(
            &metrics,
            "kpi_cac",
            &[
                ("tenant", "spendonly"),
                ("window", "all"),
                ("channel", "all"),
                ("currency", "EUR")
            ]
        ),
        Some(f64::INFINITY)
    );
    assert_eq!(
        metric_value(&metrics, "kpi_leads", &all("social")),
        Some(2.0)
    );
    assert_eq!(
        metric_value(
            &metrics,
            "kpi_cac_threshold",
            &[("tenant", "acme"), ("channel", "paid_search")]
        ),
        Some(300.0)
    );
    assert_eq!(
        metric_value(
            &metrics,
            "kpi_campaign_roas_ratio",
            &[
                ("tenant", "acme"),
                ("window", "all"),
                ("channel", "paid_search"),
                ("campaign", "spring")
            ]
        ),
        Some(1000.0 / 150.0)
    );
    assert_eq!(
        metric_value(
            &metrics,
            "kpi_events_duplicate_total",
            &[("tenant", "acme"), ("type", "deal.won")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_value(
            &metrics,
            "kpi_events_processed_total",
            &[("tenant", "acme"), ("type", "spend.reported")]
        ),
        Some(14.0)
    );
    assert_eq!(
        metric_value(&metrics, "kpi_roi_ratio", &all("seo")),
        None,
        "undefined KPIs are absent"
    );
    assert!(
        metrics.contains("kpi_engine_batch_commit_seconds_bucket"),
        "engine health metrics are exported"
    );
    assert_eq!(
        metric_value(&metrics, "kpi_engine_consumer_ack_pending_messages", &[]).map(|v| v >= 0.0),
        Some(true)
    );
}

#[tokio::test]
async fn api_errors_are_json_with_400_and_404() {
    let nats = NatsServer::start();
    let mut engine = Engine::start(&nats.url(), CONFIG);
    engine.wait_ready().await;
    for (query, status, mentions) in [
        ("/api/v1/kpis?tenant=acme&period=2026-13", 400, "period"),
        ("/api/v1/kpis?tenant=acme&period=yesterday", 400, "period"),
        ("/api/v1/kpis?tenant=Not%20Valid", 400, "tenant"),
        ("/api/v1/kpis?tenant=nobody&period=all", 404, "nobody"),
        ("/api/v1/retention?tenant=acme&year=next", 400, "year"),
        ("/api/v1/retention?tenant=nobody", 404, "nobody"),
        ("/api/v2/everything", 404, "endpoint"),
    ] {
        let (got, body) = engine.get(query).await;
        assert_eq!(got, status, "{query}: {body}");
        assert!(
            body["error"].as_str().is_some_and(|e| e.contains(mentions)),
            "{query}: {body}"
        );
    }
    // a configured tenant with no events yet answers with an empty table
    let (status, body) = engine.get("/api/v1/kpis?tenant=acme&period=2026-03").await;
    assert_eq!(status, 200);
    assert_eq!(body["total"]["leads"], 0);
    assert_eq!(body["total"]["cac"], Value::Null);
    let (status, _) = engine.get("/healthz").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn metrics_keep_the_most_active_channels_within_the_bound() {
    let nats = NatsServer::start();
    let mut engine = Engine::start(
        &nats.url(),
        "[metrics]\nmax_channels_per_tenant = 1\nmax_campaigns_per_tenant = 1\n",
    );
    engine.wait_ready().await;
    let client = nats.client().await;
    let spend = |id: &str, channel: &str, campaign: &str, amount: &str| {
        event(
            id,
            "spend.reported",
            "2025-03-02T23:00:00Z",
            "acme",
            json!({"date": "2025-03-02", "amount": amount, "currency": "EUR", "channel": channel, "campaign": campaign}),
        )
    };
    publish(
        &client,
        &[
            spend("a", "social", "small", "10"),
            spend("b", "paid_search", "big", "500"),
        ],
    )
    .await;
    wait_until("drained", Duration::from_secs(30), || {
        drained(&client, "kpi-engine")
    })
    .await;

    let metrics = engine.metrics().await;
    let spend_of = |channel| {
        metric_value(
            &metrics,
            "kpi_spend",
            &[
                ("tenant", "acme"),
                ("window", "all"),
                ("channel", channel),
                ("currency", "EUR"),
            ],
        )
    };
    assert_eq!(
        spend_of("paid_search"),
        Some(500.0),
        "the most active channel is kept"
    );
    assert_eq!(
        spend_of("social"),
        None,
        "past the bound, a channel is left out of /metrics"
    );
    assert_eq!(
        spend_of("all"),
        Some(510.0),
        "the blended figure still counts everything"
    );
    assert_eq!(
        metric_value(
            &metrics,
            "kpi_engine_series_omitted",
            &[("tenant", "acme"), ("kind", "channel")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_value(
            &metrics,
            "kpi_engine_series_omitted",
            &[("tenant", "acme"), ("kind", "campaign")]
        ),
        Some(1.0)
    );
    let (_, body) = engine.get("/api/v1/kpis?tenant=acme&period=all").await;
    assert_eq!(
        body["channels"]["social"]["spend"], "10.00",
        "the API is not bounded"
    );
}
