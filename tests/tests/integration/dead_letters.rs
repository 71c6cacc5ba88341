//! Bad input is never lost and never stops the engine: it goes to `kpi.rejected.<tenant>`
//! with its reason, is acknowledged and counted.

use std::time::Duration;

use futures_util::StreamExt;
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

/// Each of these once stopped the engine (a panic on a header, an overflow, a dead letter
/// too large to publish): now each is dead-lettered with its reason, the engine keeps
/// consuming, and a restart does not bring the failure back.
#[tokio::test]
async fn messages_that_once_stopped_the_engine_are_dead_lettered_and_it_keeps_consuming() {
    let nats = NatsServer::start();
    let mut engine = Engine::start(&nats.url(), "");
    engine.wait_ready().await;
    let client = nats.client().await;
    let envelope = |id: &str, event_type: &str, fields: serde_json::Value| {
        let mut body = json!({"specversion": "1.0", "id": id, "source": "test", "type": event_type,
                              "time": "2025-06-01T10:00:00Z"});
        body.as_object_mut()
            .unwrap()
            .extend(fields.as_object().unwrap().clone());
        body.to_string()
    };
    let lead = |id: &str| {
        envelope(
            id,
            "lead.created",
            json!({"data": {"lead_id": format!("L-{id}")}}),
        )
    };
    let huge = |id: &str| {
        envelope(
            id,
            "deal.won",
            json!({"data": {"deal_id": id, "customer_id": "C", "amount": "50000000000000000000000000000", "currency": "EUR"}}),
        )
    };
    let max_payload = client.server_info().max_payload;
    assert_eq!(max_payload, 1024 * 1024, "the server's default");
    let mut oversized = lead("big").into_bytes();
    oversized.truncate(oversized.len() - 1);
    oversized.extend(std::iter::repeat_n(b' ', max_payload - oversized.len() - 1));
    oversized.push(b'}');
    assert_eq!(oversized.len(), max_payload);

    let subject = |event_type: &str| format!("kpi.events.acme.{event_type}");
    let bad: Vec<(String, Vec<u8>, &str, &str)> = vec![
        (
            subject("lead.created"),
            envelope(
                "t",
                "lead.created",
                json!({"time": "x\r\ny", "data": {"lead_id": "L"}}),
            )
            .into_bytes(),
            "invalid_field",
            "time",
        ),
        (
            subject("lead.created"),
            envelope("ty", "lead.created\r\n", json!({"data": {"lead_id": "L"}})).into_bytes(),
            "invalid_field",
            "type",
        ),
        (
            subject("lead.created"),
            envelope(
                "te",
                "lead.created",
                json!({"tenant": "acme\r\nX-Evil: 1", "data": {"lead_id": "L"}}),
            )
            .into_bytes(),
            "invalid_field",
            "tenant",
        ),
        (
            subject("lead.created"),
            envelope(
                "sv",
                "lead.created",
                json!({"specversion": "1.0\n", "data": {"lead_id": "L"}}),
            )
            .into_bytes(),
            "invalid_field",
            "specversion",
        ),
        (
            subject("deal.won"),
            huge("huge-1").into_bytes(),
            "invalid_field",
            "data.amount",
        ),
        (
            subject("deal.won"),
            huge("huge-2").into_bytes(),
            "invalid_field",
            "data.amount",
        ),
        (
            subject("lead.created"),
            oversized.clone(),
            "too_large",
            "bytes",
        ),
    ];
    let js = async_nats::jetstream::new(client.clone());
    for (subject, payload, _, _) in &bad {
        js.publish(subject.clone(), payload.clone().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    publish(
        &client,
        &[(subject("lead.created"), lead("after"), Some("after".into()))],
    )
    .await;
    wait_until(
        "the engine drains the stream",
        Duration::from_secs(30),
        || drained(&client, "kpi-engine"),
    )
    .await;

    let mut rejected = js.get_stream("KPI_REJECTED").await.unwrap();
    assert_eq!(
        rejected.info().await.unwrap().state.messages,
        bad.len() as u64
    );
    for (index, (subject, payload, reason, field)) in bad.iter().enumerate() {
        let sequence = index as u64 + 1;
        let message = rejected.get_raw_message(sequence).await.unwrap();
        let headers = message.headers;
        let why = headers.get("Kpi-Reject-Reason").unwrap().as_str();
        assert!(
            why.starts_with(reason) && why.contains(field),
            "{why} should give {reason} and name {field}"
        );
        assert!(!why.contains(['\r', '\n']), "{why:?}");
        assert_eq!(
            headers.get("Kpi-Original-Subject").unwrap().as_str(),
            subject
        );
        assert_eq!(
            headers.get("Kpi-Original-Sequence").unwrap().as_str(),
            sequence.to_string(),
            "the original's place in KPI_EVENTS"
        );
        if payload.len() == max_payload {
            assert_eq!(
                headers.get("Kpi-Truncated").unwrap().as_str(),
                max_payload.to_string()
            );
            assert!(message.payload.len() < max_payload);
            assert_eq!(message.payload.as_ref(), &payload[..message.payload.len()]);
        } else {
            assert!(headers.get("Kpi-Truncated").is_none());
            assert_eq!(message.payload.as_ref(), payload.as_slice());
        }
    }
    let check = |metrics: &str| {
        assert_eq!(
            metric_value(
                metrics,
                "kpi_events_processed_total",
                &[("tenant", "acme"), ("type", "lead.created")]
            ),
            Some(1.0),
            "the lead after them is applied"
        );
        assert_eq!(
            metric_value(
                metrics,
                "kpi_events_duplicate_total",
                &[("tenant", "acme"), ("type", "lead.created")]
            )
            .unwrap_or(0.0),
            0.0,
            "and not taken for a duplicate"
        );
        assert_eq!(
            metric_value(
                metrics,
                "kpi_events_rejected_total",
                &[("tenant", "acme"), ("reason", "invalid_field")]
            ),
            Some(6.0)
        );
    };
    check(&engine.metrics().await);

    // A restart rebuilds the store and reads on: nothing is dead-lettered or counted again.
    engine.restart().await;
    check(&engine.metrics().await);
    publish(
        &client,
        &[(subject("lead.created"), lead("later"), Some("later".into()))],
    )
    .await;
    wait_until("a later lead counted", Duration::from_secs(20), || async {
        engine.get("/api/v1/kpis?tenant=acme&period=all").await.1["total"]["leads"] == 2
    })
    .await;
    assert_eq!(
        rejected.info().await.unwrap().state.messages,
        bad.len() as u64
    );
}

/// Anyone who may publish on the engine's inbox can hand it messages that JetStream never
/// delivered (no `$JS.ACK` reply, or one that cannot be read). None of them may be applied,
/// and none may make the engine acknowledge a real message it did not apply.
#[tokio::test]
async fn messages_jetstream_did_not_deliver_are_never_applied_nor_let_real_ones_be_skipped() {
    let nats = NatsServer::start();
    let client = nats.client().await;
    // The engine's pull requests name the inbox its deliveries come to.
    let mut requests = client
        .subscribe("$JS.API.CONSUMER.MSG.NEXT.KPI_EVENTS.kpi-engine")
        .await
        .unwrap();
    let mut intruder = client.subscribe("_INBOX.intruder").await.unwrap();
    client.flush().await.unwrap();
    let mut engine = Engine::start(&nats.url(), "[ingest]\nbatch_max_wait_ms = 200\n");
    engine.wait_ready().await;
    let inbox = tokio::time::timeout(Duration::from_secs(40), requests.next())
        .await
        .expect("a pull request within the heartbeat period")
        .unwrap()
        .reply
        .expect("pull requests carry an inbox")
        .to_string();
    let fake = |id: &str| {
        json!({"specversion": "1.0", "id": id, "source": "intruder", "type": "lead.created",
               "time": "2025-06-01T10:00:00Z", "data": {"lead_id": id}})
        .to_string()
    };
    // No reply, and a reply of the intruder's (the server refuses `$JS.ACK.` replies from
    // clients, so a forged acknowledgement subject cannot be sent).
    client
        .publish(inbox.clone(), fake("forged-1").into())
        .await
        .unwrap();
    client
        .publish_with_reply(inbox.clone(), "_INBOX.intruder", fake("forged-2").into())
        .await
        .unwrap();
    client.flush().await.unwrap();
    let real: Vec<(String, String, Option<String>)> = (0..50)
        .map(|n| {
            event(
                &format!("real-{n}"),
                "lead.created",
                "2025-06-01T10:00:00Z",
                "acme",
                json!({"lead_id": format!("L{n}")}),
            )
        })
        .collect();
    publish(&client, &real).await;
    wait_until(
        "the engine drains the stream",
        Duration::from_secs(30),
        || drained(&client, "kpi-engine"),
    )
    .await;
    let (_, body) = engine.get("/api/v1/kpis?tenant=acme&period=all").await;
    assert_eq!(body["total"]["leads"], 50, "{body}");
    let log = engine.log();
    assert_eq!(
        log.matches("ignoring a message that JetStream did not deliver")
            .count(),
        2,
        "{log}"
    );
    // The engine acknowledged real deliveries only: nothing was sent to the intruder's reply.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), intruder.next())
            .await
            .is_err(),
        "an acknowledgement went to the intruder's reply subject"
    );
    engine.restart().await;
    let (_, body) = engine.get("/api/v1/kpis?tenant=acme&period=all").await;
    assert_eq!(body["total"]["leads"], 50);
    let (_, tenants) = engine.get("/api/v1/tenants").await;
    assert_eq!(tenants["tenants"], json!(["acme"]));
}
