//! Bad input is never lost and never stops the engine: it goes to `kpi.rejected.<tenant>`
//! with its reason, is acknowledged and counted.

use std::time::Duration;

use kpi_tests::{drained, event, metric_value, publish, wait_until, Engine, NatsServer};
use serde_json::json;

#[tokio::test]
async fn invalid_events_go_to_the_dead_letter_stream_with_their_reason() {
    let nats = NatsServer::start();
    let mut engine = Engine::start(&nats.url(), "");
    engine.wait_ready().await;
    let client = nats.client().await;

    let base = |id: &str, extra: serde_json::Value| {
        let mut body = json!({"specversion": "1.0", "id": id, "source": "test", "time": "2025-06-01T10:00:00Z"});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body.to_string()
    };
    let bad: Vec<(String, String, Option<String>, &str, &str)> = vec![
        (
            "kpi.events.acme.lead.created".into(),
            base(
                "b1",
                json!({"type": "lead.created", "data": {"channel": "seo"}}),
            ),
            None,
            "missing_field",
            "data.lead_id",
        ),
        (
            "kpi.events.acme.deal.won".into(),
            base(
                "b2",
                json!({"type": "deal.won", "data": {"deal_id": "D", "customer_id": "C", "amount": "-5", "currency": "EUR"}}),
            ),
            None,
            "negative_amount",
            "data.amount",
        ),
        (
            "kpi.events.acme.spend.reported".into(),
            base(
                "b3",
                json!({"type": "spend.reported", "data": {"date": "2025-06-01", "amount": "5", "currency": "JPY"}}),
            ),
            None,
            "unknown_currency",
            "data.currency",
        ),
        (
            "kpi.events.acme.lead.created".into(),
            base(
                "b4",
                json!({"type": "lead.created", "tenant": "other", "data": {"lead_id": "x"}}),
            ),
            None,
            "tenant_mismatch",
            "tenant",
        ),
        (
            "kpi.events.acme.lead.created".into(),
            "{not json".into(),
            None,
            "invalid_json",
            "JSON",
        ),
        (
            "kpi.events.acme.lead.exploded".into(),
            base(
                "b6",
                json!({"type": "lead.exploded", "data": {"lead_id": "x"}}),
            ),
            None,
            "unknown_type",
            "type",
        ),
        (
            "kpi.events.acme.lead.created".into(),
            base(
                "b7",
                json!({"type": "lead.created", "time": "2999-01-01T00:00:00Z", "data": {"lead_id": "x"}}),
            ),
            None,
            "future_time",
            "time",
        ),
        (
            "kpi.events.acme.lead.created".into(),
            base(
                "b8",
                json!({"type": "lead.created", "data": {"lead_id": "x".repeat(70_000)}}),
            ),
            None,
            "too_large",
            "bytes",
        ),
    ];
    let valid = event(
        "ok1",
        "lead.created",
        "2025-06-01T10:00:00Z",
        "acme",
        json!({"lead_id": "L1"}),
    );
    let mut all: Vec<(String, String, Option<String>)> = bad
        .iter()
        .map(|(s, p, i, _, _)| (s.clone(), p.clone(), i.clone()))
        .collect();
    all.push(valid);
    publish(&client, &all).await;
    wait_until(
        "the engine drains the stream",
        Duration::from_secs(30),
        || drained(&client, "kpi-engine"),
    )
    .await;

    let js = async_nats::jetstream::new(client.clone());
    let mut rejected = js.get_stream("KPI_REJECTED").await.unwrap();
    assert_eq!(
        rejected.info().await.unwrap().state.messages,
        bad.len() as u64
    );
    for (sequence, (subject, payload, _, reason, field)) in bad.iter().enumerate() {
        let message = rejected.get_raw_message(sequence as u64 + 1).await.unwrap();
        assert_eq!(message.subject.as_str(), "kpi.rejected.acme");
        assert_eq!(
            message.payload.as_ref(),
            payload.as_bytes(),
            "the original payload is kept"
        );
        let headers = message.headers;
        let why = headers
            .get("Kpi-Reject-Reason")
            .unwrap()
            .as_str()
            .to_string();
        assert!(
            why.starts_with(reason) && why.contains(field),
            "{why} should give {reason} and name {field}"
        );
        assert_eq!(
            headers.get("Kpi-Original-Subject").unwrap().as_str(),
            subject.as_str()
        );
    }
    let metrics = engine.metrics().await;
    for (_, _, _, reason, _) in &bad {
        assert_eq!(
            metric_value(
                &metrics,
                "kpi_events_rejected_total",
                &[("tenant", "acme"), ("reason", reason)]
            ),
            Some(1.0),
            "{reason}"
        );
    }
    let (_, body) = engine.get("/api/v1/kpis?tenant=acme&period=all").await;
    assert_eq!(
        body["total"]["leads"], 1,
        "valid events around bad ones are applied"
    );

    // After a restart the dead letters are neither republished nor counted again.
    engine.restart().await;
    let metrics = engine.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "kpi_events_rejected_total",
            &[("tenant", "acme"), ("reason", "invalid_json")]
        ),
        Some(1.0)
    );
    assert_eq!(
        rejected.info().await.unwrap().state.messages,
        bad.len() as u64
    );
}
