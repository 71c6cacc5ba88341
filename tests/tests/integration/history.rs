//! KPI history: the series endpoints of SPEC section 3 (every period of a range, empty ones
//! included, restatements and late events counted), the OpenAPI description checked against
//! the real answers, and `kpi report --trend / --retention / --csv`.

use std::collections::BTreeMap;
use std::time::Duration;

use kpi_tests::{drained, event, publish, wait_until, Engine, NatsServer};
use serde_json::{json, Value};

const CONFIG: &str = r#"
[tenants.acme]
currency = "EUR"
cac_threshold = { all = 250.0 }
"#;

type Published = (String, String, Option<String>);

fn history() -> Vec<Published> {
    vec![
        // November 2025: a lead, its deal in December, spend in both months
        event(
            "l1",
            "lead.created",
            "2025-11-03T10:00:00Z",
            "acme",
            json!({"lead_id": "L1", "channel": "paid_search", "campaign": "brand", "qualified": true}),
        ),
        event(
            "l2",
            "lead.created",
            "2025-11-20T10:00:00Z",
            "acme",
            json!({"lead_id": "L2", "channel": "social", "qualified": false}),
        ),
        event(
            "s1",
            "lead.stage_changed",
            "2025-11-21T10:00:00Z",
            "acme",
            json!({"lead_id": "L1", "stage": "meeting_booked"}),
        ),
        event(
            "sp1",
            "spend.reported",
            "2025-11-30T23:00:00Z",
            "acme",
            json!({"date": "2025-11-30", "amount": "300.00", "currency": "EUR", "channel": "paid_search", "campaign": "brand", "source": "google_ads", "account": "a"}),
        ),
        event(
            "sp2",
            "spend.reported",
            "2025-12-31T23:00:00Z",
            "acme",
            json!({"date": "2025-12-31", "amount": "200.00", "currency": "EUR", "channel": "paid_search", "campaign": "brand", "source": "google_ads", "account": "a"}),
        ),
        event(
            "d1",
            "deal.won",
            "2025-12-01T09:00:00Z",
            "acme",
            json!({"deal_id": "D1", "customer_id": "C1", "lead_id": "L1", "amount": "1000.00", "currency": "EUR"}),
        ),
        // nothing in January 2026; February: a returning customer and a new lead
        event(
            "d2",
            "deal.won",
            "2026-02-10T09:00:00Z",
            "acme",
            json!({"deal_id": "D2", "customer_id": "C1", "amount": "400.00", "currency": "EUR"}),
        ),
        event(
            "l3",
            "lead.created",
            "2026-02-11T10:00:00Z",
            "acme",
            json!({"lead_id": "L3", "channel": "paid_search", "campaign": "brand"}),
        ),
        // customers over the years, for retention and loyalty
        event(
            "y1",
            "deal.won",
            "2023-05-01T09:00:00Z",
            "acme",
            json!({"deal_id": "Y1", "customer_id": "C1", "amount": "10", "currency": "EUR"}),
        ),
        event(
            "y2",
            "deal.won",
            "2024-05-01T09:00:00Z",
            "acme",
            json!({"deal_id": "Y2", "customer_id": "C1", "amount": "10", "currency": "EUR"}),
        ),
        event(
            "y3",
            "deal.won",
            "2024-06-01T09:00:00Z",
            "acme",
            json!({"deal_id": "Y3", "customer_id": "C2", "amount": "10", "currency": "EUR"}),
        ),
    ]
}

async fn drain(client: &async_nats::Client) {
    wait_until(
        "the engine drains the stream",
        Duration::from_secs(30),
        || drained(client, "kpi-engine"),
    )
    .await;
}

/// A nats-server and an engine that applied [`history`]; the client publishes more.
async fn engine_with_history() -> (NatsServer, Engine, async_nats::Client) {
    let nats = NatsServer::start();
    let mut engine = Engine::start(&nats.url(), CONFIG);
    engine.wait_ready().await;
    let client = nats.client().await;
    publish(&client, &history()).await;
    drain(&client).await;
    (nats, engine, client)
}

fn periods(series: &Value) -> Vec<&str> {
    series["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| entry["period"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn series_hold_every_period_with_restatements_and_late_events() {
    let (_nats, engine, client) = engine_with_history().await;

    let (status, months) = engine
        .get("/api/v1/kpis/series?tenant=acme&granularity=month&from=2025-10&to=2026-03")
        .await;
    assert_eq!(status, 200, "{months}");
    assert_eq!(months["granularity"], "month");
    assert_eq!(months["currency"], "EUR");
    assert_eq!(months["channel"], "all");
    assert_eq!(
        periods(&months),
        ["2025-10", "2025-11", "2025-12", "2026-01", "2026-02", "2026-03"],
        "every month of the range, the empty ones included"
    );
    let entries = months["series"].as_array().unwrap();
    assert_eq!(
        entries[0],
        json!({"period": "2025-10", "spend": "0.00", "new_customers": 0, "cac": null, "leads": 0,
               "qualified_leads": 0, "qualified_lead_rate": null, "converted_leads": 0,
               "conversion_rate": null, "revenue": "0.00", "roi": null, "roas": null, "stages": {}}),
        "an empty period: zero counts and null KPIs"
    );
    assert_eq!(entries[1]["spend"], "300.00");
    assert_eq!(entries[1]["leads"], 2);
    assert_eq!(
        entries[1]["conversion_rate"], 0.5,
        "L1 converted in December"
    );
    assert_eq!(
        entries[1]["cac"],
        Value::Null,
        "spend, no new customer in November"
    );
    assert_eq!(entries[1]["stages"], json!({"meeting_booked": 0.5}));
    assert_eq!(entries[2]["new_customers"], 0, "C1 was new in 2023");
    assert_eq!(entries[2]["revenue"], "1000.00");
    assert_eq!(entries[4]["revenue"], "400.00");
    assert_eq!(
        entries[4]["stages"],
        json!({"meeting_booked": 0.0}),
        "a stage the tenant has seen is rated 0 in a period with leads"
    );
    // Each entry is the period's `/api/v1/kpis` total.
    for entry in entries {
        let period = entry["period"].as_str().unwrap();
        let (_, single) = engine
            .get(&format!("/api/v1/kpis?tenant=acme&period={period}"))
            .await;
        let mut total = single["total"].clone();
        total["period"] = json!(period);
        assert_eq!(entry, &total, "{period}");
    }

    let (_, channel) = engine
        .get("/api/v1/kpis/series?tenant=acme&granularity=quarter&from=2025-Q4&to=2026-Q1&channel=social")
        .await;
    assert_eq!(channel["channel"], "social");
    assert_eq!(periods(&channel), ["2025-Q4", "2026-Q1"]);
    assert_eq!(channel["series"][0]["leads"], 1);
    assert_eq!(channel["series"][0]["qualified_lead_rate"], 0.0);
    assert_eq!(channel["series"][1]["leads"], 0);

    let (_, campaign) = engine
        .get("/api/v1/kpis/series?tenant=acme&granularity=year&from=2025&to=2026&campaign=brand")
        .await;
    assert_eq!(campaign["campaign"], "brand");
    assert_eq!(campaign["channel"], "paid_search");
    let year_2025 = &campaign["series"][0];
    assert_eq!(year_2025["spend"], "500.00");
    assert_eq!(year_2025["leads"], 1, "the campaign's own leads");
    assert_eq!(year_2025["conversion_rate"], 1.0);
    assert_eq!(year_2025["revenue"], "1000.00");
    assert_eq!(year_2025["roi"], 1.0);
    assert_eq!(campaign["series"][1]["leads"], 1);

    // A restatement of November's spend and a late lead change the past periods at once.
    publish(
        &client,
        &[
            event("sp1b", "spend.reported", "2025-12-01T07:00:00Z", "acme", json!({"date": "2025-11-30", "amount": "250.00", "currency": "EUR", "channel": "paid_search", "campaign": "brand", "source": "google_ads", "account": "a"})),
            event("late", "lead.created", "2025-10-15T10:00:00Z", "acme", json!({"lead_id": "L0", "channel": "seo", "qualified": true})),
        ],
    )
    .await;
    drain(&client).await;
    let (_, restated) = engine
        .get("/api/v1/kpis/series?tenant=acme&granularity=month&from=2025-10&to=2025-11")
        .await;
    assert_eq!(restated["series"][0]["leads"], 1);
    assert_eq!(restated["series"][0]["qualified_lead_rate"], 1.0);
    assert_eq!(
        restated["series"][1]["spend"], "250.00",
        "the restated amount replaces the first"
    );

    let (_, weeks) = engine
        .get("/api/v1/kpis/series?tenant=acme&granularity=week&from=2025-W52&to=2026-W02")
        .await;
    assert_eq!(periods(&weeks), ["2025-W52", "2026-W01", "2026-W02"]);
    let (_, days) = engine
        .get("/api/v1/kpis/series?tenant=acme&granularity=day&from=2025-11-29&to=2025-12-01")
        .await;
    assert_eq!(periods(&days), ["2025-11-29", "2025-11-30", "2025-12-01"]);
    assert_eq!(days["series"][1]["spend"], "250.00");
    assert_eq!(days["series"][2]["revenue"], "1000.00");

    let (status, retention) = engine
        .get("/api/v1/retention/series?tenant=acme&from=2022&to=2026")
        .await;
    assert_eq!(status, 200, "{retention}");
    let years: Vec<i64> = retention["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| entry["year"].as_i64().unwrap())
        .collect();
    assert_eq!(years, [2022, 2023, 2024, 2025, 2026]);
    for entry in retention["series"].as_array().unwrap() {
        let year = entry["year"].as_i64().unwrap();
        let (_, single) = engine
            .get(&format!("/api/v1/retention?tenant=acme&year={year}"))
            .await;
        let mut expected = single.clone();
        expected.as_object_mut().unwrap().remove("tenant");
        assert_eq!(entry, &expected, "{year}");
    }
    assert_eq!(
        retention["series"][4],
        json!({"year": 2026, "active_customers": 1, "retained_customers": 1, "retention_rate": 1.0,
               "loyalty": {"2": 1.0, "3": 1.0, "4": 1.0, "5": 0.0}}),
        "C1 bought in 2023, 2024, 2025 and 2026"
    );
    assert_eq!(
        retention["series"][2]["retention_rate"], 1.0,
        "C1 from 2023 came back in 2024"
    );
    assert_eq!(
        retention["series"][3]["retention_rate"], 0.5,
        "of C1 and C2 (2024) only C1 came back"
    );

    for (query, field) in [
        ("granularity=month&from=2026-05&to=2026-01", "from"),
        (
            "granularity=fortnight&from=2026-01&to=2026-02",
            "granularity",
        ),
        (
            "granularity=day&from=2020-01-01&to=2026-01-01",
            "at most 400",
        ),
        ("granularity=month&from=2026-01&to=2026-Q2", "to"),
        (
            "granularity=month&from=2026-01&to=2026-02&channel=social&campaign=x",
            "not both",
        ),
        ("granularity=month&to=2026-02", "from: missing"),
        ("granularity=all&from=all&to=all", "granularity"),
    ] {
        let (status, body) = engine
            .get(&format!("/api/v1/kpis/series?tenant=acme&{query}"))
            .await;
        assert_eq!(status, 400, "{query}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains(field),
            "{query}: {body}"
        );
    }
    let (status, _) = engine
        .get("/api/v1/kpis/series?tenant=acme&granularity=day&from=2025-01-01&to=2026-02-04")
        .await;
    assert_eq!(status, 200, "400 days is the most one answer holds");
    for query in [
        "from=2026&to=2020",
        "from=1900&to=2026",
        "from=20x6&to=2026",
        "to=2026",
    ] {
        let (status, body) = engine
            .get(&format!("/api/v1/retention/series?tenant=acme&{query}"))
            .await;
        assert_eq!(status, 400, "{query}: {body}");
    }
    let (status, _) = engine
        .get("/api/v1/kpis/series?tenant=nobody&granularity=month&from=2026-01&to=2026-02")
        .await;
    assert_eq!(status, 404);
    let (status, _) = engine
        .get("/api/v1/retention/series?tenant=nobody&from=2025&to=2026")
        .await;
    assert_eq!(status, 404);
}

// ---------------------------------------------------------------------------------------------
// OpenAPI: every real answer matches its documented schema.

/// Checks `value` against the JSON Schema subset the description uses; returns the first
/// mismatch, with its path.
fn validate(root: &Value, schema: &Value, value: &Value, path: &str) -> Result<(), String> {
    if let Some(reference) = schema["$ref"].as_str() {
        let name = reference
            .strip_prefix("#/components/schemas/")
            .ok_or_else(|| format!("{path}: unsupported $ref {reference}"))?;
        let target = &root["components"]["schemas"][name];
        if target.is_null() {
            return Err(format!("{path}: $ref {reference} is not defined"));
        }
        return validate(root, target, value, path);
    }
    if let Some(options) = schema["oneOf"].as_array() {
        let matching = options
            .iter()
            .filter(|option| validate(root, option, value, path).is_ok())
            .count();
        if matching != 1 {
            return Err(format!("{path}: {value} matches {matching} of oneOf"));
        }
    }
    if let Some(types) = match &schema["type"] {
        Value::String(one) => Some(vec![one.as_str()]),
        Value::Array(many) => Some(many.iter().filter_map(Value::as_str).collect()),
        _ => None,
    } {
        let actual = match value {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::Number(number) if number.is_i64() || number.is_u64() => "integer",
            Value::Number(_) => "number",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
        };
        let fits = types.contains(&actual) || (actual == "integer" && types.contains(&"number"));
        if !fits {
            return Err(format!(
                "{path}: {value} is {actual}, the schema says {types:?}"
            ));
        }
    }
    if let Some(allowed) = schema["enum"].as_array() {
        if !allowed.contains(value) {
            return Err(format!("{path}: {value} is not one of {allowed:?}"));
        }
    }
    if let (Some(minimum), Some(number)) = (schema["minimum"].as_f64(), value.as_f64()) {
        if number < minimum {
            return Err(format!("{path}: {number} is below {minimum}"));
        }
    }
    if let Value::Object(object) = value {
        for required in schema["required"].as_array().into_iter().flatten() {
            let name = required.as_str().unwrap_or_default();
            if !object.contains_key(name) {
                return Err(format!("{path}: `{name}` is required and missing"));
            }
        }
        let properties = schema["properties"].as_object();
        for (name, field) in object {
            let field_path = format!("{path}.{name}");
            match properties.and_then(|p| p.get(name)) {
                Some(field_schema) => validate(root, field_schema, field, &field_path)?,
                None => match &schema["additionalProperties"] {
                    Value::Bool(false) => {
                        return Err(format!("{field_path}: not in the schema"));
                    }
                    Value::Object(_) => {
                        validate(root, &schema["additionalProperties"], field, &field_path)?
                    }
                    _ => {}
                },
            }
        }
    }
    if let (Value::Array(items), Some(item_schema)) = (value, schema.get("items")) {
        for (index, item) in items.iter().enumerate() {
            validate(root, item_schema, item, &format!("{path}[{index}]"))?;
        }
    }
    Ok(())
}

#[tokio::test]
async fn the_openapi_description_matches_every_answer() {
    let nats = NatsServer::start();
    let mut engine = Engine::start_with_env(&nats.url(), CONFIG, &[("KPI__HTTP__MAX_ROWS", "2")]);
    engine.wait_ready().await;
    let client = nats.client().await;
    let mut events = history();
    events.push(event(
        "l9",
        "lead.created",
        "2025-11-04T10:00:00Z",
        "acme",
        json!({"lead_id": "L9", "channel": "email", "campaign": "news"}),
    ));
    publish(&client, &events).await;
    drain(&client).await;

    let (status, document) = engine.get("/api/v1/openapi.json").await;
    assert_eq!(status, 200);
    assert!(document["openapi"].as_str().unwrap().starts_with("3."));
    let paths = document["paths"].as_object().unwrap();
    for documented in [
        "/api/v1/kpis",
        "/api/v1/kpis/series",
        "/api/v1/retention",
        "/api/v1/retention/series",
        "/api/v1/tenants",
        "/api/v1/openapi.json",
        "/metrics",
        "/healthz",
        "/readyz",
        "/",
    ] {
        assert!(
            paths.contains_key(documented),
            "{documented} is not described"
        );
    }
    let mut checked = BTreeMap::new();
    for path_and_query in [
        "/api/v1/kpis?tenant=acme&period=2025-11",
        "/api/v1/kpis?tenant=acme&period=all",
        "/api/v1/kpis?tenant=acme&period=all&offset=2",
        "/api/v1/kpis?tenant=acme&period=2025-13",
        "/api/v1/kpis?tenant=nobody",
        "/api/v1/kpis/series?tenant=acme&granularity=month&from=2025-10&to=2026-03",
        "/api/v1/kpis/series?tenant=acme&granularity=week&from=2025-W40&to=2026-W10&channel=paid_search",
        "/api/v1/kpis/series?tenant=acme&granularity=quarter&from=2025-Q1&to=2026-Q4&campaign=brand",
        "/api/v1/kpis/series?tenant=acme&granularity=year&from=2020&to=2026&campaign=unknown",
        "/api/v1/kpis/series?tenant=acme&granularity=month&from=2026-05&to=2026-01",
        "/api/v1/retention?tenant=acme&year=2026",
        "/api/v1/retention/series?tenant=acme&from=2021&to=2026",
        "/api/v1/retention/series?tenant=acme&from=2026&to=2021",
        "/api/v1/tenants",
        "/healthz",
        "/readyz",
    ] {
        let (status, body) = engine.get(path_and_query).await;
        let path = path_and_query.split('?').next().unwrap();
        let operation = &document["paths"][path]["get"];
        let response = &operation["responses"][status.to_string()];
        assert!(
            response.is_object(),
            "{path_and_query}: status {status} is not described"
        );
        let response = match response["$ref"].as_str() {
            Some(reference) => {
                let name = reference.rsplit('/').next().unwrap();
                &document["components"]["responses"][name]
            }
            None => response,
        };
        let schema = &response["content"]["application/json"]["schema"];
        assert!(schema.is_object(), "{path_and_query}: no JSON schema for {status}");
        if let Err(mismatch) = validate(&document, schema, &body, "$") {
            panic!("{path_and_query} ({status}): {mismatch}\n{body}");
        }
        checked.insert(path_and_query, status);
    }
    assert_eq!(checked["/api/v1/kpis?tenant=acme&period=2025-13"], 400);
    assert_eq!(checked["/api/v1/kpis?tenant=nobody"], 404);
    // The validator itself refuses what the description does not allow.
    let series_schema = &document["paths"]["/api/v1/kpis/series"]["get"]["responses"]["200"]
        ["content"]["application/json"]["schema"];
    let (_, mut series) = engine
        .get("/api/v1/kpis/series?tenant=acme&granularity=month&from=2025-10&to=2025-11")
        .await;
    series["series"][0]["spend"] = json!(12.5);
    assert!(validate(&document, series_schema, &series, "$").is_err());
    series["series"][0]["spend"] = json!("12.50");
    series["series"][0]["surprise"] = json!(1);
    assert!(validate(&document, series_schema, &series, "$").is_err());
}

// ---------------------------------------------------------------------------------------------
// The terminal: trends, retention and CSV.

fn report(engine: &Engine, args: &[&str]) -> String {
    let output = kpi_tests::kpi_command()
        .arg("report")
        .args(["--url", &engine.base(), "--tenant", "acme"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "kpi report {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test]
async fn report_prints_trends_retention_and_csv_from_the_api() {
    let (_nats, engine, _client) = engine_with_history().await;

    let csv = report(
        &engine,
        &[
            "--trend", "month", "--period", "2026-03", "--last", "6", "--csv",
        ],
    );
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "period,spend,new_customers,cac,leads,qualified_leads,qualified_lead_rate,converted_leads,conversion_rate,revenue,roi,roas"
    );
    let (_, series) = engine
        .get("/api/v1/kpis/series?tenant=acme&granularity=month&from=2025-10&to=2026-03")
        .await;
    assert_eq!(lines.len(), 7, "a header and six months:\n{csv}");
    for (line, entry) in lines[1..].iter().zip(series["series"].as_array().unwrap()) {
        let cells: Vec<&str> = line.split(',').collect();
        assert_eq!(cells[0], entry["period"]);
        assert_eq!(cells[1], entry["spend"]);
        assert_eq!(cells[4], entry["leads"].to_string());
        let rate = match &entry["conversion_rate"] {
            Value::Null => String::new(),
            number => number.to_string(),
        };
        assert_eq!(cells[8], rate, "full precision, empty when undefined");
        assert_eq!(cells[9], entry["revenue"]);
    }

    let table = report(
        &engine,
        &["--trend", "month", "--period", "2026-02", "--last", "4"],
    );
    let rows: Vec<&str> = table
        .lines()
        .filter(|line| line.starts_with("202"))
        .collect();
    assert_eq!(rows.len(), 4, "{table}");
    assert!(
        rows[0].starts_with("2025-11") && rows[0].contains("no customer"),
        "{table}"
    );
    assert!(
        rows[1].starts_with("2025-12") && rows[1].contains("1000.00"),
        "{table}"
    );

    let retention = report(
        &engine,
        &["--retention", "--period", "2026", "--last", "3", "--csv"],
    );
    assert_eq!(
        retention.lines().collect::<Vec<_>>(),
        [
            "year,active_customers,retained_customers,retention_rate,loyalty_2,loyalty_3,loyalty_4,loyalty_5",
            "2024,2,1,1.0,0.5,0.0,0.0,0.0",
            "2025,1,1,0.5,1.0,1.0,0.0,0.0",
            "2026,1,1,1.0,1.0,1.0,1.0,0.0",
        ]
    );
    let period_csv = report(&engine, &["--period", "2025-11", "--csv"]);
    let first_rows: Vec<&str> = period_csv.lines().take(2).collect();
    assert_eq!(
        first_rows[0],
        "period,scope,name,channel,spend,new_customers,cac,leads,qualified_leads,qualified_lead_rate,converted_leads,conversion_rate,revenue,roi,roas"
    );
    assert!(
        first_rows[1].starts_with("2025-11,total,all,all,300.00,0,,2,1,0.5,1,0.5,0.00,-1.0,0.0"),
        "{period_csv}"
    );
    assert!(
        period_csv.contains("\n2025-11,campaign,brand,paid_search,300.00"),
        "{period_csv}"
    );

    let channel_trend = report(
        &engine,
        &[
            "--trend",
            "quarter",
            "--period",
            "2026-Q1",
            "--last",
            "2",
            "--channel",
            "social",
            "--json",
        ],
    );
    let channel_trend: Value = serde_json::from_str(&channel_trend).unwrap();
    assert_eq!(channel_trend["channel"], "social");
    assert_eq!(periods(&channel_trend), ["2025-Q4", "2026-Q1"]);
}

// ---------------------------------------------------------------------------------------------
// Grafana's source: the history gauges in a real Prometheus.

/// `query`'s samples by the value of `label`.
async fn samples_by(
    prometheus: &kpi_tests::Prometheus,
    query: &str,
    label: &str,
) -> BTreeMap<String, f64> {
    prometheus
        .query(query)
        .await
        .iter()
        .map(|sample| {
            let value = sample["value"][1].as_str().unwrap();
            let value = match value {
                "+Inf" => f64::INFINITY,
                other => other.parse().unwrap(),
            };
            (sample["metric"][label].as_str().unwrap().to_string(), value)
        })
        .collect()
}

#[tokio::test]
async fn history_gauges_in_prometheus_equal_the_api_and_follow_restatements() {
    // A fixed day, so the thirteen months exported (2025-03 to 2026-03) hold the history.
    const DAY: &str = "2026-03-15T12:00:00Z";
    let nats = NatsServer::start();
    let mut engine = Engine::start_with_env(&nats.url(), CONFIG, &[("KPI_CLOCK", DAY)]);
    engine.wait_ready().await;
    let prometheus = kpi_tests::Prometheus::start(
        &format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: kpi-engine\n    static_configs:\n      - targets: [\"127.0.0.1:{}\"]\n",
            engine.port
        ),
        &[],
    )
    .await;
    let client = nats.client().await;
    publish(&client, &history()).await;
    drain(&client).await;

    let spend = r#"kpi_history_spend{tenant="acme", window="month", channel="all"}"#;
    wait_until(
        "Prometheus scrapes 13 months",
        Duration::from_secs(30),
        || async {
            let months = samples_by(&prometheus, spend, "period").await;
            months.len() == 13 && months.get("2025-11") == Some(&300.0)
        },
    )
    .await;
    let (_, api) = engine
        .get("/api/v1/kpis/series?tenant=acme&granularity=month&from=2025-03&to=2026-03")
        .await;
    let months = samples_by(&prometheus, spend, "period").await;
    let leads = samples_by(
        &prometheus,
        r#"kpi_history_leads{tenant="acme", window="month", channel="all"}"#,
        "period",
    )
    .await;
    for entry in api["series"].as_array().unwrap() {
        let period = entry["period"].as_str().unwrap();
        let api_spend: f64 = entry["spend"].as_str().unwrap().parse().unwrap();
        assert_eq!(months[period], api_spend, "spend of {period}");
        assert_eq!(
            leads[period],
            entry["leads"].as_f64().unwrap(),
            "leads of {period}"
        );
    }
    // CAC: +Inf in November (spend, no new customer), which the dashboard's query turns into
    // its "spend, no customer yet" sentinel.
    let cac = r#"kpi_history_cac{tenant="acme", window="month", channel="all"}"#;
    assert_eq!(
        samples_by(&prometheus, cac, "period").await["2025-11"],
        f64::INFINITY
    );
    let shown = samples_by(
        &prometheus,
        &format!("({cac} < +Inf) or (({cac} == bool +Inf) * -1)"),
        "period",
    )
    .await;
    assert_eq!(shown["2025-11"], -1.0);
    assert_eq!(
        shown["2025-12"], -1.0,
        "200 spent on 31 December, no new customer"
    );
    assert!(
        !shown.contains_key("2025-10"),
        "no spend and no new customer: no CAC ({shown:?})"
    );

    let retention = samples_by(
        &prometheus,
        r#"kpi_history_retention_ratio{tenant="acme"}"#,
        "year",
    )
    .await;
    let (_, api_retention) = engine
        .get("/api/v1/retention/series?tenant=acme&from=2021&to=2026")
        .await;
    for entry in api_retention["series"].as_array().unwrap() {
        let year = entry["year"].to_string();
        assert_eq!(
            retention.get(&year).copied(),
            entry["retention_rate"].as_f64(),
            "retention of {year}"
        );
    }
    let loyalty = samples_by(
        &prometheus,
        r#"kpi_history_loyalty_ratio{tenant="acme", year="2026"}"#,
        "years",
    )
    .await;
    assert_eq!(loyalty["4"], 1.0, "C1 bought in 2023, 2024, 2025 and 2026");

    // November restated: the next scrape shows the new amount for that past month.
    publish(
        &client,
        &[event("sp1b", "spend.reported", "2025-12-01T07:00:00Z", "acme", json!({"date": "2025-11-30", "amount": "250.00", "currency": "EUR", "channel": "paid_search", "campaign": "brand", "source": "google_ads", "account": "a"}))],
    )
    .await;
    drain(&client).await;
    wait_until(
        "Prometheus shows the restated month",
        Duration::from_secs(30),
        || async {
            samples_by(&prometheus, spend, "period")
                .await
                .get("2025-11")
                == Some(&250.0)
        },
    )
    .await;
    let campaign = samples_by(
        &prometheus,
        r#"kpi_history_campaign_roi_ratio{tenant="acme", window="year", campaign="brand"}"#,
        "period",
    )
    .await;
    assert_eq!(
        campaign["2025"],
        (1000.0 - 450.0) / 450.0,
        "250 + 200 spent, 1000 earned"
    );
}
