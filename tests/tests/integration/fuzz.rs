//! The class, not the instances: arbitrary bytes and arbitrary JSON, on arbitrary subjects and
//! through the webhook, fed to the real decode, apply and dead-letter path of a real engine.
//! Every message must end applied (or counted as a duplicate) or dead-lettered, exactly once,
//! and the engine must still be consuming afterwards, also after a restart.
//!
//! The inputs come from proptest strategies run with a fixed seed (`KPI_FUZZ_SEED` picks
//! another, `KPI_FUZZ_MESSAGES` how many), so a failure can be replayed.

use std::time::Duration;

use kpi_tests::{drained, metric_value, wait_until, Engine, NatsServer};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use serde_json::{json, Value};

const WEBHOOK_SECRET: &str = "a-fuzzing-secret-0123456789";

/// Any JSON value, nested a few levels, with the strings and numbers that have broken
/// decoders: control characters, long texts, numbers with more digits than a float holds.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        "\\PC{0,20}".prop_map(Value::from),
        "[\\x00-\\x1f\\r\\n\\t ]{0,8}".prop_map(Value::from),
        "[0-9]{1,40}(\\.[0-9]{1,40})?".prop_map(Value::from),
        "x{300,600}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 40, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::btree_map("[a-z_]{1,12}", inner, 0..6)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

const FIELDS: [&str; 7] = [
    "specversion",
    "id",
    "source",
    "type",
    "time",
    "tenant",
    "data",
];
const DATA_FIELDS: [&str; 14] = [
    "lead_id",
    "deal_id",
    "customer_id",
    "channel",
    "campaign",
    "qualified",
    "stage",
    "amount",
    "currency",
    "date",
    "category",
    "source",
    "account",
    "unknown",
];
const TYPES: [&str; 6] = [
    "lead.created",
    "lead.qualified",
    "lead.stage_changed",
    "deal.won",
    "deal.lost",
    "spend.reported",
];

/// A valid event of a random type, for a tenant of a few.
fn valid_event() -> impl Strategy<Value = Value> {
    (0..TYPES.len(), 0..3usize, 0..5000u32, "[0-9]{1,6}(\\.[0-9]{1,2})?").prop_map(
        |(type_index, tenant, n, amount)| {
            let event_type = TYPES[type_index];
            let data = match event_type {
                "lead.created" => json!({"lead_id": format!("L{n}"), "channel": "seo", "qualified": n % 2 == 0}),
                "lead.qualified" => json!({"lead_id": format!("L{n}")}),
                "lead.stage_changed" => json!({"lead_id": format!("L{n}"), "stage": "meeting"}),
                "deal.won" => json!({"deal_id": format!("D{n}"), "customer_id": format!("C{}", n % 50), "lead_id": format!("L{n}"), "amount": amount, "currency": "EUR"}),
                "deal.lost" => json!({"deal_id": format!("D{n}")}),
                _ => json!({"date": "2025-06-01", "amount": amount, "currency": "EUR", "channel": "social"}),
            };
            json!({"specversion": "1.0", "id": format!("e{n}-{type_index}"), "source": "fuzz",
                   "type": event_type, "time": "2025-06-01T10:00:00Z",
                   "tenant": format!("t{tenant}"), "data": data})
        },
    )
}

/// A valid event with one envelope or data field replaced by anything, or removed.
fn mutated_event() -> impl Strategy<Value = Value> {
    (
        valid_event(),
        prop::bool::ANY,
        0..FIELDS.len(),
        0..DATA_FIELDS.len(),
        prop::option::of(any_json()),
    )
        .prop_map(|(mut event, in_data, field, data_field, value)| {
            let target = if in_data {
                event["data"].as_object_mut()
            } else {
                event.as_object_mut()
            };
            if let Some(object) = target {
                let name = if in_data {
                    DATA_FIELDS[data_field]
                } else {
                    FIELDS[field]
                };
                match value {
                    Some(value) => {
                        object.insert(name.to_string(), value);
                    }
                    None => {
                        object.remove(name);
                    }
                }
            }
            event
        })
}

/// A payload: raw bytes, any JSON, a mutated event, a valid one, or a very large one.
fn payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        2 => prop::collection::vec(any::<u8>(), 0..600),
        2 => any_json().prop_map(|value| value.to_string().into_bytes()),
        5 => mutated_event().prop_map(|value| value.to_string().into_bytes()),
        3 => valid_event().prop_map(|value| value.to_string().into_bytes()),
        1 => (60_000..200_000usize).prop_map(|size| {
            let mut event = json!({"specversion": "1.0", "id": "big", "source": "fuzz", "type": "lead.created",
                "time": "2025-06-01T10:00:00Z", "data": {"lead_id": "L", "padding": ""}});
            event["data"]["padding"] = Value::from("p".repeat(size));
            event.to_string().into_bytes()
        }),
    ]
}

/// A message: a payload, on the subject its envelope names when it has one (most of the time:
/// so that valid and nearly valid events reach the apply path) or on any other.
fn message() -> impl Strategy<Value = (String, Vec<u8>)> {
    (payload(), subject(), 0..4u8).prop_map(|(payload, other, choice)| {
        let own = serde_json::from_slice::<Value>(&payload)
            .ok()
            .and_then(|value| {
                let tenant = value.get("tenant")?.as_str()?.to_string();
                let event_type = value.get("type")?.as_str()?.to_string();
                let subject = format!("kpi.events.{tenant}.{event_type}");
                // Only what NATS takes as a subject: non-empty tokens, no white space or wildcard.
                let valid = subject.split('.').all(|token| {
                    !token.is_empty()
                        && !token.contains(char::is_whitespace)
                        && !token.contains(['*', '>'])
                });
                valid.then_some(subject)
            });
        match own {
            Some(subject) if choice > 0 => (subject, payload),
            _ => (other, payload),
        }
    })
}

/// A subject under `kpi.events.>`: a tenant token and type tokens of any shape NATS accepts.
fn subject() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        "[a-z0-9_-]{1,10}",
        "[A-Za-z0-9_$:@!%&()+=-]{1,20}",
        "\\p{L}{1,8}",
        Just("x".repeat(300)),
    ];
    prop_oneof![
        4 => (0..3usize, 0..TYPES.len()).prop_map(|(tenant, t)| format!("kpi.events.t{tenant}.{}", TYPES[t])),
        3 => (token.clone(), prop::collection::vec(token, 0..4))
            .prop_map(|(tenant, rest)| {
                let mut subject = format!("kpi.events.{tenant}");
                for part in rest {
                    subject.push('.');
                    subject.push_str(&part);
                }
                subject
            }),
    ]
}

fn runner() -> TestRunner {
    let seed: u64 = std::env::var("KPI_FUZZ_SEED")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(20_261_201);
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &bytes),
    )
}

fn sample<S: Strategy>(runner: &mut TestRunner, strategy: &S) -> S::Value {
    strategy
        .new_tree(runner)
        .expect("the strategies always generate")
        .current()
}

/// Messages applied, counted as duplicates, and dead-lettered, from /metrics.
fn outcomes(metrics: &str) -> (f64, f64, f64) {
    let sum = |name: &str| -> f64 {
        metrics
            .lines()
            .filter(|line| line.starts_with(&format!("{name}{{")))
            .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    };
    (
        sum("kpi_events_processed_total"),
        sum("kpi_events_duplicate_total"),
        sum("kpi_events_rejected_total"),
    )
}

#[tokio::test]
async fn arbitrary_input_on_any_subject_or_webhook_ends_applied_or_dead_lettered_once() {
    let messages: usize = std::env::var("KPI_FUZZ_MESSAGES")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(3000);
    let nats = NatsServer::start();
    let config = format!(
        "[[connectors]]\nid = \"hook\"\nkind = \"webhook\"\ntenant = \"t0\"\nevery = \"1h\"\n\
         [connectors.params]\nsecret = \"{WEBHOOK_SECRET}\"\n"
    );
    // Every tenant's counters exported, so that the sums below see every message.
    let mut engine = Engine::start_with_env(
        &nats.url(),
        &config,
        &[
            ("KPI__METRICS__MAX_TENANTS", "100000"),
            ("KPI__HTTP__MAX_BODY_BYTES", "262144"),
        ],
    );
    engine.wait_ready().await;
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());

    let mut runner = runner();
    let mut pending = Vec::new();
    for _ in 0..messages {
        let (subject, payload) = sample(&mut runner, &message());
        // No Nats-Msg-Id: every message is stored, however alike.
        match js.publish(subject.clone(), payload.into()).await {
            Ok(ack) => pending.push(ack),
            // The client refuses some subjects itself: nothing reached the stream.
            Err(error) => panic!("publishing on {subject:?}: {error}"),
        }
        if pending.len() >= 200 {
            for ack in pending.drain(..) {
                ack.await.unwrap();
            }
        }
    }
    for ack in pending.drain(..) {
        ack.await.unwrap();
    }

    // The webhook: bodies of any shape; each is accepted whole (its events published) or
    // refused whole with a 4xx, never a 5xx.
    let http = reqwest::Client::new();
    let body_strategy = prop_oneof![
        payload(),
        prop::collection::vec(prop_oneof![mutated_event(), valid_event()], 1..5)
            .prop_map(|events| Value::from(events).to_string().into_bytes()),
    ];
    for _ in 0..(messages / 5) {
        let body = sample(&mut runner, &body_strategy);
        let signature = kpi_connect::kinds::webhook::sign(
            WEBHOOK_SECRET,
            kpi_tests::wall_clock().timestamp(),
            &body,
        );
        let response = http
            .post(format!("{}/webhooks/hook", engine.base()))
            .header("X-Kpi-Signature", signature)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let reply: Value = response.json().await.unwrap_or(Value::Null);
        match status {
            202 => assert!(reply["accepted"].is_u64(), "{reply}"),
            400 | 413 => {}
            other => panic!(
                "webhook answered {other} {reply} to {:?}",
                String::from_utf8_lossy(&body)
            ),
        }
    }

    wait_until(
        "the engine drains everything",
        Duration::from_secs(120),
        || drained(&client, "kpi-engine"),
    )
    .await;
    // What the stream stored (webhook events JetStream found duplicates of were not stored).
    let published = js
        .get_stream("KPI_EVENTS")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages;
    let check = |metrics: String, published: u64| {
        let (applied, duplicates, rejected) = outcomes(&metrics);
        assert_eq!(
            applied + duplicates + rejected,
            published as f64,
            "each message applied, a duplicate or dead-lettered, once: \
             {applied} + {duplicates} + {rejected}"
        );
        rejected
    };
    let rejected = check(engine.metrics().await, published);
    eprintln!("fuzz: {published} messages stored, {rejected} dead-lettered");
    assert!(rejected > 0.0 && rejected < published as f64, "{rejected}");
    let mut dead_letters = js.get_stream("KPI_REJECTED").await.unwrap();
    assert_eq!(
        dead_letters.info().await.unwrap().state.messages as f64,
        rejected,
        "every rejected message is in KPI_REJECTED, once"
    );

    // Still consuming, and again after a restart (no message stops it at start-up).
    let sentinel = kpi_tests::event(
        "sentinel",
        "lead.created",
        "2025-06-01T10:00:00Z",
        "sentinel",
        json!({"lead_id": "S1"}),
    );
    kpi_tests::publish(&client, std::slice::from_ref(&sentinel)).await;
    wait_until("the sentinel applied", Duration::from_secs(30), || async {
        engine
            .get("/api/v1/kpis?tenant=sentinel&period=all")
            .await
            .1["total"]["leads"]
            == 1
    })
    .await;
    engine.restart().await;
    assert_eq!(check(engine.metrics().await, published + 1), rejected);
    let metrics = engine.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "kpi_events_processed_total",
            &[("tenant", "sentinel"), ("type", "lead.created")]
        ),
        Some(1.0)
    );
}
