//! Connectors inside `kpi serve`, against local servers that answer like the real APIs, with
//! the KPI totals checked through the engine.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use chrono::{Datelike, Days};
use kpi_tests::{metric_value, repo_root, wait_until, Engine, NatsServer};
use serde_json::{json, Value};

/// A request the mock received.
#[derive(Clone, Debug)]
struct Seen {
    at: Instant,
    path: String,
    headers: HeaderMap,
    body: String,
    status: u16,
}

/// Google Ads and Google's OAuth token endpoint, as documented: `POST /token` (form, refresh
/// token grant, <https://developers.google.com/identity/protocols/oauth2/web-server#offline>)
/// and `POST /v26/customers/{id}/googleAds:searchStream`: a JSON array of batches of
/// `results` in lowerCamelCase, int64 as strings, `fieldMask`, `requestId`, and
/// `queryResourceConsumption` in the final batch
/// (<https://developers.google.com/google-ads/api/rest/design/json-mappings>). Rows whose
/// selected metrics are all zero are left out of a date-segmented report
/// (<https://developers.google.com/google-ads/api/docs/reporting/zero-metrics>).
#[derive(Default)]
struct GoogleMock {
    tokens_issued: u32,
    /// Replies to play before the normal ones: (status, Retry-After, body).
    script: VecDeque<(u16, Option<&'static str>, Value)>,
    /// The second round: day 1 of `brand` restated, day 2 of `generic` refunded (its cost is
    /// zero, so Google leaves the row out) and campaign 222 renamed `generic-2025`.
    restated: bool,
    seen: Vec<Seen>,
}

type Shared = Arc<Mutex<GoogleMock>>;

async fn token(State(mock): State<Shared>, headers: HeaderMap, body: String) -> Response {
    let mut mock = mock.lock().unwrap();
    let (status, reply) = if body.contains("client_id=revoked-client") {
        (
            400,
            json!({"error": "invalid_grant", "error_description": "Token has been expired or revoked."}),
        )
    } else {
        mock.tokens_issued += 1;
        (
            200,
            json!({"access_token": format!("ya29.t{}", mock.tokens_issued), "expires_in": 3599, "token_type": "Bearer", "scope": "https://www.googleapis.com/auth/adwords"}),
        )
    };
    mock.seen.push(Seen {
        at: Instant::now(),
        path: "/token".into(),
        headers,
        body,
        status,
    });
    (StatusCode::from_u16(status).unwrap(), axum::Json(reply)).into_response()
}

async fn search_stream(State(mock): State<Shared>, headers: HeaderMap, body: String) -> Response {
    let mut mock = mock.lock().unwrap();
    let today = kpi_tests::now().date_naive();
    let day1 = today.checked_sub_days(Days::new(1)).unwrap().to_string();
    let day2 = today.checked_sub_days(Days::new(2)).unwrap().to_string();
    let authorization = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let (status, retry_after, reply) = if authorization == "Bearer ya29.t1" {
        // The first token "expired": the connector must refresh and retry.
        (
            401,
            None,
            json!({"error": {"code": 401, "message": "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential.", "status": "UNAUTHENTICATED"}}),
        )
    } else if let Some(scripted) = mock.script.pop_front() {
        scripted
    } else {
        let row = |id: &str, name: &str, micros: &str, day: &str| {
            json!({"customer": {"resourceName": "customers/1234567890", "currencyCode": "EUR"},
                   "campaign": {"resourceName": format!("customers/1234567890/campaigns/{id}"), "id": id, "name": name},
                   "metrics": {"costMicros": micros}, "segments": {"date": day}})
        };
        let field_mask =
            "customer.currencyCode,campaign.id,campaign.name,metrics.costMicros,segments.date";
        let (first, second) = if mock.restated {
            (
                vec![
                    row("111", "brand", "20000000", &day1),
                    row("222", "generic-2025", "5500000", &day1),
                ],
                vec![],
            )
        } else {
            (
                vec![
                    row("111", "brand", "12340000", &day1),
                    row("222", "generic", "5500000", &day1),
                ],
                vec![row("222", "generic", "7250000", &day2)],
            )
        };
        // Two batches, as searchStream streams them; the resource consumption in the last.
        (
            200,
            None,
            json!([
                {"results": first, "fieldMask": field_mask, "requestId": "req-1"},
                {"results": second, "fieldMask": field_mask, "requestId": "req-1", "queryResourceConsumption": "2148"}
            ]),
        )
    };
    mock.seen.push(Seen {
        at: Instant::now(),
        path: "searchStream".into(),
        headers,
        body,
        status,
    });
    let mut response = (StatusCode::from_u16(status).unwrap(), axum::Json(reply)).into_response();
    if let Some(seconds) = retry_after {
        response
            .headers_mut()
            .insert("retry-after", seconds.parse().unwrap());
    }
    response
}

async fn start_google_mock(mock: Shared) -> SocketAddr {
    let app = Router::new()
        .route("/token", post(token))
        .route(
            "/v26/customers/1234567890/googleAds:searchStream",
            post(search_stream),
        )
        .with_state(mock);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    address
}

fn connector_config(id: &str, base: &str, client_id: &str) -> String {
    format!(
        r#"
[[connectors]]
id = "{id}"
kind = "google_ads"
tenant = "acme"
every = "1s"
lookback_days = 3
[connectors.params]
customer_id = "123-456-7890"
login_customer_id = "9876543210"
developer_token = "${{GADS_DEVELOPER_TOKEN}}"
client_id = "{client_id}"
client_secret = "cs-secret-42"
refresh_token = "${{GADS_REFRESH_TOKEN}}"
base_url = "{base}"
token_url = "{base}/token"
"#
    )
}

async fn paid_search_spend(engine: &Engine) -> Option<String> {
    let (status, body) = engine.get("/api/v1/kpis?tenant=acme&period=all").await;
    if status != 200 {
        return None;
    }
    body["channels"]["paid_search"]["spend"]
        .as_str()
        .map(str::to_string)
}

#[tokio::test]
async fn google_ads_spend_is_refreshed_retried_restated_and_resumed() {
    let nats = NatsServer::start();
    let mock: Shared = Arc::default();
    mock.lock().unwrap().script.extend([
        // A rate limit as the Google Ads API signals it: google.rpc.Status with a
        // GoogleAdsFailure whose quota details give the wait
        // (<https://developers.google.com/google-ads/api/docs/best-practices/understand-api-errors>,
        // QuotaErrorDetails.retry_delay); no Retry-After header.
        (
            429,
            None,
            json!({"error": {"code": 429, "message": "Resource has been exhausted (e.g. check quota).", "status": "RESOURCE_EXHAUSTED",
                "details": [{"@type": "type.googleapis.com/google.ads.googleads.v26.errors.GoogleAdsFailure",
                    "errors": [{"errorCode": {"quotaError": "RESOURCE_TEMPORARILY_EXHAUSTED"},
                        "message": "Too many requests in a short amount of time.",
                        "details": {"quotaErrorDetails": {"rateScope": "DEVELOPER", "rateName": "Number of operations for basic access", "retryDelay": "1s"}}}],
                    "requestId": "req-0"}]}}),
        ),
        (
            503,
            None,
            // An upstream that echoes a credential in its error: the log must still not show it.
            json!({"error": {"code": 503, "message": "The service is currently unavailable (developer-token dev-token-7).", "status": "UNAVAILABLE"}}),
        ),
    ]);
    let address = start_google_mock(mock.clone()).await;
    let base = format!("http://{address}");
    let config = format!(
        "{}{}",
        connector_config("gads", &base, "client-1"),
        connector_config("gads-revoked", &base, "revoked-client")
    );
    let env = [
        ("GADS_DEVELOPER_TOKEN", "dev-token-7"),
        ("GADS_REFRESH_TOKEN", "rt-secret-99"),
    ];
    let mut engine = Engine::start_with_env(&nats.url(), &config, &env);
    engine.wait_ready().await;

    // 12.34 + 5.50 (day 1) + 7.25 (day 2)
    wait_until(
        "the first run's spend in the API",
        Duration::from_secs(30),
        || async { paid_search_spend(&engine).await.as_deref() == Some("25.09") },
    )
    .await;
    let (_, all) = engine.get("/api/v1/kpis?tenant=acme&period=all").await;
    assert_eq!(all["campaigns"]["brand"]["spend"], "12.34");
    assert_eq!(all["campaigns"]["generic"]["spend"], "12.75");

    {
        let mock = mock.lock().unwrap();
        let streams: Vec<&Seen> = mock
            .seen
            .iter()
            .filter(|seen| seen.path == "searchStream")
            .collect();
        let statuses: Vec<u16> = streams.iter().take(4).map(|seen| seen.status).collect();
        assert_eq!(
            statuses,
            [401, 429, 503, 200],
            "expired token, rate limit, 5xx, success"
        );
        assert!(
            streams[2].at.duration_since(streams[1].at) >= Duration::from_millis(950),
            "the retryDelay of 1s was not honoured"
        );
        let success = streams[3];
        assert_eq!(success.headers["authorization"], "Bearer ya29.t2");
        assert_eq!(success.headers["developer-token"], "dev-token-7");
        assert_eq!(success.headers["login-customer-id"], "9876543210");
        let query: Value = serde_json::from_str(&success.body).unwrap();
        let today = kpi_tests::now().date_naive();
        let since = today.checked_sub_days(Days::new(3)).unwrap();
        let query = query["query"].as_str().unwrap();
        assert!(query.contains("metrics.cost_micros"), "{query}");
        assert!(
            query.contains(&format!("segments.date BETWEEN '{since}' AND '{today}'")),
            "{query}"
        );
        let refresh = mock
            .seen
            .iter()
            .find(|seen| seen.path == "/token" && seen.status == 200)
            .unwrap();
        assert!(refresh.body.contains("grant_type=refresh_token"));
        assert!(refresh.body.contains("refresh_token=rt-secret-99"));
    }

    // A connector whose refresh token was revoked shows up in metrics and logs.
    wait_until(
        "the revoked connector's failure",
        Duration::from_secs(20),
        || async {
            let metrics = engine.metrics().await;
            metric_value(
                &metrics,
                "kpi_connector_runs_total",
                &[("connector", "gads-revoked"), ("outcome", "error")],
            )
            .is_some_and(|runs| runs >= 1.0)
        },
    )
    .await;
    let metrics = engine.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "kpi_connector_up",
            &[("connector", "gads-revoked")]
        ),
        Some(0.0)
    );
    assert_eq!(
        metric_value(&metrics, "kpi_connector_up", &[("connector", "gads")]),
        Some(1.0)
    );
    assert_eq!(
        metric_value(
            &metrics,
            "kpi_connector_events_total",
            &[("connector", "gads")]
        ),
        Some(3.0)
    );
    // The version it calls, v26, is switched off in November 2027.
    assert_eq!(
        metric_value(
            &metrics,
            "kpi_connector_api_sunset_timestamp_seconds",
            &[("connector", "gads")]
        ),
        Some(
            chrono::NaiveDate::from_ymd_opt(2027, 11, 1)
                .unwrap()
                .and_hms_opt(0, 0, 0)
                .unwrap()
                .and_utc()
                .timestamp() as f64
        )
    );
    assert!(metric_value(
        &metrics,
        "kpi_connector_last_success_timestamp_seconds",
        &[("connector", "gads")]
    )
    .is_some());
    let log = engine.log();
    assert!(log.contains("Token has been expired or revoked."), "{log}");
    assert!(
        log.contains("The service is currently unavailable (developer-token ***)."),
        "{log}"
    );
    for secret in ["rt-secret-99", "cs-secret-42", "dev-token-7"] {
        assert!(!log.contains(secret), "secret {secret} in the log");
    }

    // Google restates day 1 of `brand` (20.00 replaces 12.34), leaves out day 2 of `generic`
    // (refunded: zero cost) and names campaign 222 `generic-2025`: the lines `generic` had are
    // withdrawn, not left to count twice.
    mock.lock().unwrap().restated = true;
    wait_until("the restated spend", Duration::from_secs(20), || async {
        paid_search_spend(&engine).await.as_deref() == Some("25.50")
    })
    .await;
    let (_, all) = engine.get("/api/v1/kpis?tenant=acme&period=all").await;
    assert_eq!(all["campaigns"]["brand"]["spend"], "20.00");
    assert_eq!(all["campaigns"]["generic"]["spend"], "0.00");
    assert_eq!(all["campaigns"]["generic-2025"]["spend"], "5.50");
    let day2 = kpi_tests::today()
        .checked_sub_days(Days::new(2))
        .unwrap()
        .to_string();
    let (_, refunded) = engine
        .get(&format!("/api/v1/kpis?tenant=acme&period={day2}"))
        .await;
    assert_eq!(refunded["total"]["spend"], "0.00", "{refunded}");

    // After a restart the stored state says what was sent: a run sends nothing new.
    restart_sends_nothing_new(&mut engine, "gads").await;
    assert_eq!(paid_search_spend(&engine).await.as_deref(), Some("25.50"));
}

async fn total(engine: &Engine, tenant: &str, field: &str) -> Value {
    let (_, body) = engine
        .get(&format!("/api/v1/kpis?tenant={tenant}&period=all"))
        .await;
    body["total"][field].clone()
}

#[tokio::test]
async fn exec_plugin_publishes_events_spend_and_resumes_from_its_state() {
    let nats = NatsServer::start();
    let work = tempfile::tempdir().unwrap();
    let orders = work.path().join("orders.jsonl");
    let yesterday = kpi_tests::now()
        .date_naive()
        .checked_sub_days(Days::new(1))
        .unwrap();
    let order = |id: u32, customer: &str, amount: &str, status: &str, updated: &str| {
        json!({"order_id": id, "customer": customer, "amount": amount, "currency": "EUR",
               "placed_at": format!("{yesterday}T10:0{id}:00Z"), "updated_at": updated, "status": status})
        .to_string()
            + "\n"
    };
    std::fs::write(
        &orders,
        order(1, "C1", "100.00", "paid", &format!("{yesterday}T10:01:00Z"))
            + &order(2, "C2", "50.00", "paid", &format!("{yesterday}T10:02:00Z")),
    )
    .unwrap();
    let plugin = repo_root().join("examples/plugins/shop_orders.py");
    let config = format!(
        r#"
[[connectors]]
id = "shop"
kind = "exec"
tenant = "shop"
every = "1s"
lookback_days = 2
[connectors.params]
command = "python3"
args = ["{}"]
timeout_s = 30
[connectors.params.settings]
orders_file = "{}"
fee_rate = "0.10"
"#,
        plugin.display(),
        orders.display()
    );
    let mut engine = Engine::start(&nats.url(), &config);
    engine.wait_ready().await;
    wait_until(
        "the plugin's first orders",
        Duration::from_secs(30),
        || async { total(&engine, "shop", "revenue").await == "150.00" },
    )
    .await;
    assert_eq!(total(&engine, "shop", "spend").await, "15.00");
    assert_eq!(total(&engine, "shop", "new_customers").await, 2);

    // Order 1 is refunded and order 3 comes in: only they are read (the cursor), and the
    // commission of the day is restated, not added.
    let now = kpi_tests::now().format("%Y-%m-%dT%H:%M:%SZ").to_string();
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&orders)
        .unwrap();
    std::io::Write::write_all(
        &mut file,
        (order(1, "C1", "100.00", "refunded", &now) + &order(3, "C3", "30.00", "paid", &now))
            .as_bytes(),
    )
    .unwrap();
    drop(file);
    wait_until(
        "the refund and the new order",
        Duration::from_secs(30),
        || async { total(&engine, "shop", "revenue").await == "80.00" },
    )
    .await;
    wait_until(
        "the restated commission",
        Duration::from_secs(10),
        || async { total(&engine, "shop", "spend").await == "8.00" },
    )
    .await;
    let log = engine.log();
    assert!(log.contains("resuming after the beginning"), "{log}");
    assert!(
        log.contains(&format!("resuming after {yesterday}T10:02:00Z")),
        "the second run did not get the state of the first:\n{log}"
    );
    assert!(
        log.contains("done, cursor at"),
        "stderr is not logged:\n{log}"
    );
    assert_eq!(
        metric_value(
            &engine.metrics().await,
            "kpi_connector_up",
            &[("connector", "shop")]
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn csv_files_import_once_by_command_and_from_a_watched_folder() {
    let nats = NatsServer::start();
    let work = tempfile::tempdir().unwrap();
    let inbox = work.path().join("inbox");
    std::fs::create_dir(&inbox).unwrap();
    let config = format!(
        r#"
[[connectors]]
id = "crm-export"
kind = "csv"
tenant = "csvco"
every = "1s"
[connectors.params]
dir = "{}"
kind = "deals"
"#,
        inbox.display()
    );
    let mut engine = Engine::start(&nats.url(), &config);
    engine.wait_ready().await;

    let leads = work.path().join("leads.csv");
    std::fs::write(
        &leads,
        "lead_id,created_at,channel,campaign,qualified\n\
         L1,2026-01-05T09:00:00Z,seo,,yes\n\
         L2,2026-01-06,paid_search,brand,no\n\
         L3,2026-01-07T12:00:00+01:00,paid_search,brand,true\n",
    )
    .unwrap();
    let import = |file: &std::path::Path| {
        kpi_tests::kpi_command()
            .args(["import", "--kind", "leads", "--tenant", "csvco", "--config"])
            .arg(engine.config_path())
            .arg(file)
            .output()
            .unwrap()
    };
    let first = import(&leads);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(String::from_utf8_lossy(&first.stdout)
        .contains("3 events published (0 already in the stream)"));
    let again = import(&leads);
    assert!(String::from_utf8_lossy(&again.stdout)
        .contains("0 events published (3 already in the stream)"));

    std::fs::write(
        inbox.join("deals-january.csv"),
        "deal_id,status,closed_at,customer_id,amount,currency,lead_id\n\
         D1,won,2026-01-20T10:00:00Z,C1,1000.00,EUR,L1\n\
         D3,won,2026-01-21T10:00:00Z,C3,500.00,EUR,L3\n",
    )
    .unwrap();
    wait_until(
        "the watched folder's deals",
        Duration::from_secs(20),
        || async { total(&engine, "csvco", "revenue").await == "1500.00" },
    )
    .await;
    assert_eq!(total(&engine, "csvco", "leads").await, 3);
    assert_eq!(total(&engine, "csvco", "qualified_leads").await, 2);
    assert_eq!(total(&engine, "csvco", "converted_leads").await, 2);
    let (_, all) = engine.get("/api/v1/kpis?tenant=csvco&period=all").await;
    assert_eq!(all["channels"]["paid_search"]["revenue"], "500.00");

    // A file that changes is read again; its rows that did not change count once.
    std::fs::write(
        inbox.join("deals-january.csv"),
        "deal_id,status,closed_at,customer_id,amount,currency,lead_id\n\
         D1,won,2026-01-20T10:00:00Z,C1,1000.00,EUR,L1\n\
         D3,won,2026-01-21T10:00:00Z,C3,500.00,EUR,L3\n\
         D3,lost,2026-01-25T10:00:00Z,,,,L3\n",
    )
    .unwrap();
    wait_until("the cancelled deal", Duration::from_secs(20), || async {
        total(&engine, "csvco", "revenue").await == "1000.00"
    })
    .await;

    // A bad file stops the run with the file, line and column, in the log and the metrics.
    std::fs::write(
        inbox.join("zz-bad.csv"),
        "deal_id,status,closed_at\nD9,won,2026-02-01\n",
    )
    .unwrap();
    wait_until("the bad file's error", Duration::from_secs(20), || async {
        engine
            .log()
            .contains("zz-bad.csv, line 2: `customer_id` is empty")
    })
    .await;
    assert_eq!(
        metric_value(
            &engine.metrics().await,
            "kpi_connector_up",
            &[("connector", "crm-export")]
        ),
        Some(0.0)
    );
}

async fn social_channel(engine: &Engine) -> Value {
    let (_, body) = engine.get("/api/v1/kpis?tenant=acme&period=all").await;
    body["channels"]["social"].clone()
}

/// The Meta Marketing API's asynchronous insights, as documented: `POST /act_{id}/insights`
/// starts a report run (`report_run_id`), `GET /{run}` reports its `async_status` until `Job
/// Completed`, and `GET /{run}/insights` gives its rows in pages linked by `paging.next`
/// (<https://developers.facebook.com/docs/marketing-api/insights/best-practices>,
/// <https://developers.facebook.com/docs/graph-api/results/>); numbers are strings. Rate
/// limits are errors in the body (code 17, subcode 2446079) with an `X-Business-Use-Case-Usage`
/// header (<https://developers.facebook.com/docs/marketing-api/overview/rate-limiting>).
#[derive(Default)]
struct MetaMock {
    base: String,
    polls: u32,
    restated: bool,
    seen: Vec<(String, String)>,
}

type SharedMeta = Arc<Mutex<MetaMock>>;

async fn meta_start(State(mock): State<SharedMeta>, body: String) -> Response {
    mock.lock().unwrap().seen.push(("start".into(), body));
    axum::Json(json!({"report_run_id": "6023920149050"})).into_response()
}

async fn meta_poll(
    State(mock): State<SharedMeta>,
    axum::extract::Path(run): axum::extract::Path<String>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Response {
    let mut mock = mock.lock().unwrap();
    mock.seen.push(("poll".into(), query.unwrap_or_default()));
    mock.polls += 1;
    match mock.polls {
        1 => axum::Json(
            json!({"id": run, "async_status": "Job Running", "async_percent_completion": 40}),
        )
        .into_response(),
        2 => {
            let mut response = (
                StatusCode::BAD_REQUEST,
                axum::Json(json!({"error": {"message": "(#17) User request limit reached", "type": "OAuthException", "code": 17, "error_subcode": 2446079, "fbtrace_id": "EJplcsCHuLu"}})),
            )
                .into_response();
            response.headers_mut().insert(
                "x-business-use-case-usage",
                r#"{"555":[{"type":"ads_insights","call_count":100,"total_cputime":30,"total_time":40,"estimated_time_to_regain_access":0}]}"#
                    .parse()
                    .unwrap(),
            );
            response
        }
        _ => axum::Json(
            json!({"id": run, "async_status": "Job Completed", "async_percent_completion": 100}),
        )
        .into_response(),
    }
}

async fn meta_rows(
    State(mock): State<SharedMeta>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Response {
    let mut mock = mock.lock().unwrap();
    let query = query.unwrap_or_default();
    mock.seen.push(("rows".into(), query.clone()));
    let day1 = kpi_tests::now()
        .date_naive()
        .checked_sub_days(Days::new(1))
        .unwrap()
        .to_string();
    let row = |campaign_id: &str, name: &str, spend: &str, leads: &str| {
        json!({"campaign_id": campaign_id, "campaign_name": name, "spend": spend, "account_currency": "EUR",
               "actions": [{"action_type": "link_click", "value": "40"}, {"action_type": "lead", "value": leads}],
               "date_start": day1, "date_stop": day1})
    };
    // The second round: day 1 of `retarget` restated, `prospecting` without delivery (Meta
    // returns no row for it) and `lookalike` renamed `lookalike-eu`.
    if query.contains("after=CURSOR1") {
        let lookalike = if mock.restated {
            "lookalike-eu"
        } else {
            "lookalike"
        };
        return axum::Json(json!({"data": [row("c3", lookalike, "3.00", "0")],
            "paging": {"cursors": {"before": "CURSOR1", "after": "CURSOR2"}}}))
        .into_response();
    }
    let first = if mock.restated {
        vec![row("c1", "retarget", "9.50", "2")]
    } else {
        vec![
            row("c1", "retarget", "8.25", "2"),
            row("c2", "prospecting", "10.00", "1"),
        ]
    };
    axum::Json(json!({
        "data": first,
        "paging": {"cursors": {"before": "CURSOR0", "after": "CURSOR1"},
                   "next": format!("{}/v27.0/6023920149050/insights?access_token=meta-token-5&limit=500&after=CURSOR1", mock.base)}
    }))
    .into_response()
}

#[tokio::test]
async fn meta_ads_report_run_is_polled_paged_and_restated() {
    let nats = NatsServer::start();
    let mock: SharedMeta = Arc::default();
    let app = Router::new()
        .route("/v27.0/act_555/insights", post(meta_start))
        .route("/v27.0/{run}", axum::routing::get(meta_poll))
        .route("/v27.0/{run}/insights", axum::routing::get(meta_rows))
        .with_state(mock.clone());
    let base = serve_mock(flaky(app)).await;
    mock.lock().unwrap().base = base.clone();
    let config = format!(
        r#"
[[connectors]]
id = "meta"
kind = "meta_ads"
tenant = "acme"
every = "1s"
lookback_days = 2
[connectors.params]
ad_account_id = "act_555"
access_token = "${{META_TOKEN}}"
base_url = "{base}"
poll_interval_s = 1
"#
    );
    let mut engine =
        Engine::start_with_env(&nats.url(), &config, &[("META_TOKEN", "meta-token-5")]);
    engine.wait_ready().await;
    wait_until("Meta spend and leads", Duration::from_secs(30), || async {
        social_channel(&engine).await["spend"] == "21.25"
    })
    .await;
    assert_eq!(social_channel(&engine).await["leads"], 3);
    {
        let mock = mock.lock().unwrap();
        let start = &mock
            .seen
            .iter()
            .find(|(what, _)| what == "start")
            .unwrap()
            .1;
        for part in [
            "level=campaign",
            "time_increment=1",
            "access_token=meta-token-5",
            "time_range=%7B%22since%22",
        ] {
            assert!(start.contains(part), "{part} missing from {start}");
        }
        assert!(mock
            .seen
            .iter()
            .any(|(what, query)| what == "rows" && query.contains("after=CURSOR1")));
    }
    assert!(engine.log().contains("(#17) User request limit reached"));
    assert!(
        !engine.log().contains("meta-token-5"),
        "the token is in the log"
    );

    // 9.50 (restated) + 0 (no delivery: withdrawn) + 3.00 (under its new name only)
    mock.lock().unwrap().restated = true;
    wait_until(
        "the restated Meta spend",
        Duration::from_secs(30),
        || async { social_channel(&engine).await["spend"] == "12.50" },
    )
    .await;
    let (_, all) = engine.get("/api/v1/kpis?tenant=acme&period=all").await;
    assert_eq!(all["campaigns"]["prospecting"]["spend"], "0.00");
    assert_eq!(all["campaigns"]["lookalike"]["spend"], "0.00");
    assert_eq!(all["campaigns"]["lookalike-eu"]["spend"], "3.00");
    // Leads already counted stay: a lead count that shrinks removes none.
    assert_eq!(social_channel(&engine).await["leads"], 3);
    assert!(engine.log().contains("HTTP 503: upstream connect error"));
    restart_sends_nothing_new(&mut engine, "meta").await;
    assert_eq!(social_channel(&engine).await["spend"], "12.50");
}

/// HubSpot's CRM search and associations APIs, as documented.
#[derive(Default)]
struct HubSpotMock {
    corrected: bool,
    contact_searches: Vec<Value>,
    deal_searches: u32,
    authorizations: Vec<String>,
}

type SharedHubSpot = Arc<Mutex<HubSpotMock>>;

fn hubspot_object(id: &str, properties: Value) -> Value {
    json!({"id": id, "properties": properties, "createdAt": "2026-01-01T00:00:00Z",
           "updatedAt": "2026-03-01T00:00:00Z", "archived": false})
}

async fn hubspot_contacts(
    State(mock): State<SharedHubSpot>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let mut mock = mock.lock().unwrap();
    let request: Value = serde_json::from_str(&body).unwrap();
    mock.authorizations
        .push(headers["authorization"].to_str().unwrap().to_string());
    mock.contact_searches.push(request.clone());
    if mock.contact_searches.len() == 1 {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            axum::Json(json!({"status": "error", "message": "You have reached your secondly limit.", "errorType": "RATE_LIMIT", "correlationId": "c0ffee", "policyName": "SECONDLY"})),
        )
            .into_response();
    }
    let contact = |id: &str, created: &str, source: &str, campaign: Option<&str>, stage: &str| {
        let mut properties = json!({"createdate": created, "lastmodifieddate": "2026-03-01T10:00:00.000Z",
            "hs_analytics_source": source, "lifecyclestage": stage, "hs_object_id": id});
        if let Some(campaign) = campaign {
            properties["hs_analytics_source_data_1"] = json!(campaign);
        }
        hubspot_object(id, properties)
    };
    if request.get("after").is_none() {
        axum::Json(json!({"total": 3, "results": [
            contact("101", "2026-01-10T09:00:00.000Z", "PAID_SEARCH", Some("brand"), "salesqualifiedlead"),
            contact("102", "2026-01-11T09:00:00.000Z", "ORGANIC_SEARCH", None, "lead"),
        ], "paging": {"next": {"after": "2", "link": "https://api.hubapi.com/crm/v3/objects/contacts/search?after=2"}}}))
        .into_response()
    } else {
        assert_eq!(request["after"], "2");
        axum::Json(json!({"total": 3, "results": [
            contact("103", "2026-01-12T09:00:00.000Z", "PAID_SEARCH", Some("brand"), "customer"),
        ]}))
        .into_response()
    }
}

async fn hubspot_deals(State(mock): State<SharedHubSpot>) -> Response {
    let mut mock = mock.lock().unwrap();
    mock.deal_searches += 1;
    if mock.deal_searches == 1 {
        return (StatusCode::BAD_GATEWAY, "<html>502 Bad Gateway</html>").into_response();
    }
    let (amount, modified) = if mock.corrected {
        ("1500", "2026-03-05T10:00:00.000Z")
    } else {
        ("1200", "2026-03-01T10:00:00.000Z")
    };
    let deal = |id: &str, amount: &str, closed: bool, won: bool, modified: &str| {
        hubspot_object(
            id,
            json!({"amount": amount, "deal_currency_code": "EUR", "closedate": "2026-02-01T12:00:00.000Z",
            "dealstage": if won { "closedwon" } else if closed { "closedlost" } else { "appointmentscheduled" },
            "hs_is_closed": closed.to_string(), "hs_is_closed_won": won.to_string(), "hs_lastmodifieddate": modified}),
        )
    };
    axum::Json(json!({"total": 4, "results": [
        deal("d1", amount, true, true, modified),
        deal("d2", "900", true, false, "2026-03-01T10:00:00.000Z"),
        deal("d3", "700", false, false, "2026-03-01T10:00:00.000Z"),
        deal("d4", "300", true, true, "2026-03-01T10:00:00.000Z"),
    ]}))
    .into_response()
}

async fn hubspot_associations(body: String) -> Response {
    let request: Value = serde_json::from_str(&body).unwrap();
    let results: Vec<Value> = request["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|input| {
            let deal = input["id"].as_str().unwrap();
            let contact = match deal {
                "d1" => 101,
                "d2" => 102,
                _ => 103,
            };
            json!({"from": {"id": deal}, "to": [{"toObjectId": contact, "associationTypes": [{"category": "HUBSPOT_DEFINED", "typeId": 3, "label": null}]}]})
        })
        .collect();
    axum::Json(json!({"status": "COMPLETE", "results": results, "startedAt": "2026-03-01T10:00:00Z", "completedAt": "2026-03-01T10:00:01Z"})).into_response()
}

#[tokio::test]
async fn hubspot_contacts_and_deals_become_leads_and_deals_incrementally() {
    let nats = NatsServer::start();
    let mock: SharedHubSpot = Arc::default();
    let app = Router::new()
        .route("/crm/v3/objects/contacts/search", post(hubspot_contacts))
        .route("/crm/v3/objects/deals/search", post(hubspot_deals))
        .route(
            "/crm/v4/associations/deals/contacts/batch/read",
            post(hubspot_associations),
        )
        .with_state(mock.clone());
    let base = serve_mock(flaky(app)).await;
    let config = format!(
        r#"
[[connectors]]
id = "crm"
kind = "hubspot"
tenant = "crmco"
every = "1s"
lookback_days = 7
[connectors.params]
access_token = "${{HUBSPOT_TOKEN}}"
base_url = "{base}"
"#
    );
    let mut engine =
        Engine::start_with_env(&nats.url(), &config, &[("HUBSPOT_TOKEN", "pat-eu1-secret")]);
    engine.wait_ready().await;
    wait_until(
        "HubSpot deals in the API",
        Duration::from_secs(30),
        || async { total(&engine, "crmco", "revenue").await == "1500.00" },
    )
    .await;
    let (_, all) = engine.get("/api/v1/kpis?tenant=crmco&period=all").await;
    assert_eq!(all["total"]["leads"], 3);
    assert_eq!(all["total"]["qualified_leads"], 2);
    assert_eq!(all["total"]["converted_leads"], 2);
    assert_eq!(all["total"]["new_customers"], 2);
    assert_eq!(all["channels"]["paid_search"]["revenue"], "1500.00");
    assert_eq!(all["campaigns"]["brand"]["revenue"], "1500.00");
    assert_eq!(all["channels"]["seo"]["leads"], 1);

    // A corrected amount at the same close date: the later version wins.
    mock.lock().unwrap().corrected = true;
    wait_until("the corrected deal", Duration::from_secs(20), || async {
        total(&engine, "crmco", "revenue").await == "1800.00"
    })
    .await;
    {
        let mock = mock.lock().unwrap();
        assert!(mock
            .authorizations
            .iter()
            .all(|a| a == "Bearer pat-eu1-secret"));
        let first_filter = &mock.contact_searches[1]["filterGroups"][0]["filters"][0];
        assert_eq!(first_filter["propertyName"], "lastmodifieddate");
        assert_eq!(first_filter["value"], "0", "the first run reads everything");
        let later_filter = &mock.contact_searches.last().unwrap()["filterGroups"][0]["filters"][0];
        let later: i64 = later_filter["value"].as_str().unwrap().parse().unwrap();
        // cursor 2026-03-01T10:00Z minus the 7-day lookback
        assert_eq!(
            later,
            chrono::DateTime::parse_from_rfc3339("2026-02-22T10:00:00Z")
                .unwrap()
                .timestamp_millis()
        );
        assert!(engine
            .log()
            .contains("You have reached your secondly limit."));
    }
    let searches_before = mock.lock().unwrap().contact_searches.len();
    restart_sends_nothing_new(&mut engine, "crm").await;
    assert_eq!(total(&engine, "crmco", "revenue").await, "1800.00");
    let after_restart = mock.lock().unwrap().contact_searches[searches_before]["filterGroups"][0]
        ["filters"][0]
        .clone();
    // From the stored cursor (the corrected deal, 2026-03-05T10:00Z) minus the lookback, not
    // from the beginning.
    assert_eq!(
        after_restart["value"],
        chrono::DateTime::parse_from_rfc3339("2026-02-26T10:00:00Z")
            .unwrap()
            .timestamp_millis()
            .to_string()
    );
}

/// Pipedrive as documented, under a company domain (`https://{company}.pipedrive.com/api/v1`,
/// <https://pipedrive.readme.io/docs/core-api-concepts-requests>): the Leads Inbox
/// `GET /api/v1/leads`, paged with `start`/`limit` (at most 500) and a flat
/// `additional_data: {start, limit, more_items_in_collection}`
/// (<https://developers.pipedrive.com/docs/api/v1/Leads#getLeads>, `GetLeadsResponse`), deals
/// and stages in API v2 with cursor paging (`additional_data.next_cursor`,
/// <https://developers.pipedrive.com/docs/api/v1/Deals#getDeals> v2), the token in
/// `x-api-token`, and 429 with the `x-ratelimit-*` headers
/// (<https://pipedrive.readme.io/docs/core-api-concepts-rate-limiting>).
#[derive(Default)]
struct PipedriveMock {
    deal_requests: Vec<(Instant, String, u16)>,
    lead_queries: Vec<String>,
    tokens: Vec<String>,
}

type SharedPipedrive = Arc<Mutex<PipedriveMock>>;

/// 620 leads: more than one page. The one of person 7, whose deal is won, is the newest.
const PIPEDRIVE_LEADS: usize = 620;

fn pipedrive_lead(n: usize) -> Value {
    let (person, source) = match n {
        619 => (json!(7), "Web forms"),
        618 => (json!(8), "Prospector"),
        617 => (Value::Null, "Manually created"),
        _ => (json!(1000 + n), "Web forms"),
    };
    let added = format!("2026-01-{:02}T09:{:02}:00.000Z", 1 + n / 60, n % 60);
    json!({"id": format!("adf21080-0e10-11eb-879b-{n:012}"), "title": format!("Lead {n}"),
           "owner_id": 1, "creator_id": 1, "label_ids": [], "person_id": person, "organization_id": null,
           "source_name": source, "origin": "API", "origin_id": null, "channel": 52, "channel_id": "Jun23 Billboards",
           "is_archived": false, "was_seen": false, "value": {"amount": 999, "currency": "USD"},
           "expected_close_date": null, "next_activity_id": null, "add_time": added, "update_time": added,
           "visible_to": "3", "cc_email": "company+1+lead@dev.pipedrivemail.com"})
}

async fn pipedrive_leads(
    State(mock): State<SharedPipedrive>,
    headers: HeaderMap,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Response {
    let query = query.unwrap_or_default();
    {
        let mut mock = mock.lock().unwrap();
        mock.tokens
            .push(headers["x-api-token"].to_str().unwrap().to_string());
        mock.lead_queries.push(query.clone());
    }
    let param = |name: &str| -> Option<usize> {
        query
            .split('&')
            .find_map(|pair| pair.strip_prefix(&format!("{name}=")))
            .and_then(|value| value.parse().ok())
    };
    let start = param("start").unwrap_or(0);
    let limit = param("limit").unwrap_or(100).min(500);
    // Leads changed since `updated_since`: none after the first read (they are all older).
    let leads: Vec<Value> = if query.contains("updated_since=") {
        Vec::new()
    } else {
        (start..(start + limit).min(PIPEDRIVE_LEADS))
            .map(pipedrive_lead)
            .collect()
    };
    let more = !query.contains("updated_since=") && start + limit < PIPEDRIVE_LEADS;
    axum::Json(json!({"success": true, "data": leads,
        "additional_data": {"start": start, "limit": limit, "more_items_in_collection": more}}))
    .into_response()
}

async fn pipedrive_deals(
    State(mock): State<SharedPipedrive>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Response {
    let mut mock = mock.lock().unwrap();
    let query = query.unwrap_or_default();
    let first = mock.deal_requests.is_empty();
    mock.deal_requests
        .push((Instant::now(), query.clone(), if first { 429 } else { 200 }));
    if first {
        let mut response = (
            StatusCode::TOO_MANY_REQUESTS,
            axum::Json(json!({"success": false, "error": "Request over limit", "error_info": "Please check developers.pipedrive.com", "data": null, "additional_data": null})),
        )
            .into_response();
        for (name, value) in [
            ("x-ratelimit-limit", "40"),
            ("x-ratelimit-remaining", "0"),
            ("x-ratelimit-reset", "1"),
        ] {
            response.headers_mut().insert(name, value.parse().unwrap());
        }
        return response;
    }
    let deal = |id: u32, person: u32, status: &str, stage: u32, value: u32| {
        json!({"id": id, "title": format!("deal {id}"), "person_id": person, "org_id": null, "stage_id": stage,
               "pipeline_id": 1, "value": value, "currency": "EUR", "status": status,
               "add_time": "2026-01-10T10:00:00Z", "update_time": "2026-02-01T10:00:00Z",
               "won_time": if status == "won" { json!("2026-02-01T10:00:00Z") } else { Value::Null },
               "lost_time": if status == "lost" { json!("2026-02-01T11:00:00Z") } else { Value::Null }})
    };
    if query.contains("cursor=c2") {
        axum::Json(json!({"success": true, "data": [deal(2, 8, "lost", 1, 900), deal(3, 8, "open", 2, 400)],
            "additional_data": {"next_cursor": null}}))
        .into_response()
    } else {
        axum::Json(
            json!({"success": true, "data": [deal(1, 7, "won", 2, 2500)],
            "additional_data": {"next_cursor": "c2"}}),
        )
        .into_response()
    }
}

async fn pipedrive_stages(axum::extract::RawQuery(query): axum::extract::RawQuery) -> Response {
    let stage = |id: u32, name: &str| {
        json!({"id": id, "order_nr": id, "name": name, "is_deleted": false, "deal_probability": 100,
               "pipeline_id": 1, "is_deal_rot_enabled": false, "days_to_rotten": null,
               "add_time": "2024-01-01T00:00:00Z", "update_time": "2024-01-01T00:00:00Z"})
    };
    if query.unwrap_or_default().contains("cursor=s2") {
        axum::Json(json!({"success": true, "data": [stage(2, "Proposal Made")],
            "additional_data": {"next_cursor": null}}))
        .into_response()
    } else {
        axum::Json(json!({"success": true, "data": [stage(1, "Qualified")],
            "additional_data": {"next_cursor": "s2"}}))
        .into_response()
    }
}

#[tokio::test]
async fn pipedrive_leads_and_deals_are_paged_and_linked_by_person() {
    let nats = NatsServer::start();
    let mock: SharedPipedrive = Arc::default();
    let app = Router::new()
        .route("/api/v1/leads", axum::routing::get(pipedrive_leads))
        .route("/api/v2/deals", axum::routing::get(pipedrive_deals))
        .route("/api/v2/stages", axum::routing::get(pipedrive_stages))
        .with_state(mock.clone());
    let base = serve_mock(flaky(app)).await;
    let config = format!(
        r#"
[[connectors]]
id = "pipedrive"
kind = "pipedrive"
tenant = "pdco"
every = "1s"
lookback_days = 3
[connectors.params]
api_token = "${{PIPEDRIVE_TOKEN}}"
base_url = "{base}"
channel = {{ "Manually created" = "outbound" }}
"#
    );
    let mut engine =
        Engine::start_with_env(&nats.url(), &config, &[("PIPEDRIVE_TOKEN", "pd-token-3")]);
    engine.wait_ready().await;
    wait_until(
        "Pipedrive deals in the API",
        Duration::from_secs(30),
        || async { total(&engine, "pdco", "revenue").await == "2500.00" },
    )
    .await;
    wait_until(
        "every lead, both pages",
        Duration::from_secs(30),
        || async { total(&engine, "pdco", "leads").await == PIPEDRIVE_LEADS },
    )
    .await;
    let (_, all) = engine.get("/api/v1/kpis?tenant=pdco&period=all").await;
    assert_eq!(
        all["channels"]["unattributed"]["revenue"],
        Value::Null,
        "{all}"
    );
    assert_eq!(all["total"]["qualified_leads"], 2);
    assert_eq!(all["total"]["converted_leads"], 1);
    assert_eq!(all["channels"]["web_forms"]["revenue"], "2500.00");
    assert_eq!(all["channels"]["outbound"]["leads"], 1);
    assert_eq!(
        all["channels"]["prospector"]["stages"]["proposal_made"],
        1.0
    );
    {
        let mock = mock.lock().unwrap();
        assert!(mock.tokens.iter().all(|token| token == "pd-token-3"));
        let (rate_limited, _, _) = mock.deal_requests[0];
        let (retried, first_query, _) = &mock.deal_requests[1];
        assert!(retried.duration_since(rate_limited) >= Duration::from_millis(950));
        assert!(
            first_query.contains("updated_since=1970-01-01T00%3A00%3A00Z"),
            "{first_query}"
        );
        assert!(mock
            .deal_requests
            .iter()
            .any(|(_, query, _)| query.contains("cursor=c2")));
        assert!(
            mock.lead_queries[0].contains("start=0") && mock.lead_queries[0].contains("limit=500")
        );
        assert!(mock
            .lead_queries
            .iter()
            .any(|query| query.contains("start=500")));
    }
    // Later runs read what changed since their cursor and send nothing that did not change.
    let events = |metrics: String| {
        metric_value(
            &metrics,
            "kpi_connector_events_total",
            &[("connector", "pipedrive")],
        )
    };
    let sent = events(engine.metrics().await);
    wait_until("two more runs", Duration::from_secs(20), || async {
        mock.lock()
            .unwrap()
            .lead_queries
            .iter()
            .filter(|q| q.contains("updated_since="))
            .count()
            >= 2
    })
    .await;
    assert_eq!(
        events(engine.metrics().await),
        sent,
        "unchanged leads and deals sent again"
    );
    restart_sends_nothing_new(&mut engine, "pipedrive").await;
    assert_eq!(total(&engine, "pdco", "revenue").await, "2500.00");
}

#[tokio::test]
async fn webhooks_accept_signed_bodies_and_refuse_unsigned_stale_or_forged_ones() {
    use kpi_connect::kinds::webhook::sign;
    let nats = NatsServer::start();
    let config = r#"
[[connectors]]
id = "forms"
kind = "webhook"
tenant = "hooks"
every = "1h"
[connectors.params]
secret = "${FORMS_SECRET}"
tolerance_s = 300
[connectors.params.mapping]
event_type = "lead.created"
items = "/submissions"
id = "/submission_id"
time = "/submitted_at"
fields = { lead_id = "/submission_id", channel = "/utm/source", campaign = "/utm/campaign" }

[[connectors]]
id = "shop-events"
kind = "webhook"
tenant = "hooks"
every = "1h"
[connectors.params]
secret = "another-secret-of-16+"
"#;
    let secret = "forms-secret-0123456789";
    let mut engine = Engine::start_with_env(&nats.url(), config, &[("FORMS_SECRET", secret)]);
    engine.wait_ready().await;
    let client = reqwest::Client::new();
    let post = |path: &str, signature: Option<String>, body: String| {
        let mut request = client.post(format!("{}{path}", engine.base())).body(body);
        if let Some(signature) = signature {
            request = request.header("X-Kpi-Signature", signature);
        }
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap())
        }
    };
    // Signatures carry the sender's wall clock, whatever clock the engine reads dates from.
    let now = kpi_tests::wall_clock().timestamp();
    let body = json!({"form": "contact", "submissions": [
        {"submission_id": "s-1", "submitted_at": "2025-11-20T10:00:00Z", "utm": {"source": "social", "campaign": "autumn"}},
        {"submission_id": "s-2", "submitted_at": 1_763_640_000, "utm": {"source": "seo", "campaign": null}}
    ]})
    .to_string();

    let (status, reply) = post("/webhooks/forms", None, body.clone()).await;
    assert_eq!(
        (status, reply["error"].as_str().unwrap()),
        (401, "unsigned: the X-Kpi-Signature header is missing")
    );
    let (status, reply) = post(
        "/webhooks/forms",
        Some(sign(secret, now - 400, body.as_bytes())),
        body.clone(),
    )
    .await;
    assert_eq!(status, 401);
    assert!(
        reply["error"]
            .as_str()
            .unwrap()
            .starts_with("stale signature"),
        "{reply}"
    );
    let (status, reply) = post(
        "/webhooks/forms",
        Some(sign("not-the-secret-at-all", now, body.as_bytes())),
        body.clone(),
    )
    .await;
    assert_eq!(
        (status, reply["error"].as_str().unwrap()),
        (401, "signature mismatch")
    );
    let forged = body.replace("s-2", "s-3");
    let (status, _) = post(
        "/webhooks/forms",
        Some(sign(secret, now, body.as_bytes())),
        forged,
    )
    .await;
    assert_eq!(status, 401, "a body changed after signing");
    let (status, _) = post(
        "/webhooks/nobody",
        Some(sign(secret, now, body.as_bytes())),
        body.clone(),
    )
    .await;
    assert_eq!(status, 404);
    let no_id = json!({"submissions": [{"submitted_at": "2025-11-20T10:00:00Z"}]}).to_string();
    let (status, reply) = post(
        "/webhooks/forms",
        Some(sign(secret, now, no_id.as_bytes())),
        no_id,
    )
    .await;
    assert_eq!(
        (status, reply["error"].as_str().unwrap()),
        (400, "[0]: /submission_id: missing")
    );

    let (status, reply) = post(
        "/webhooks/forms",
        Some(sign(secret, now, body.as_bytes())),
        body.clone(),
    )
    .await;
    assert_eq!((status, reply), (202, json!({"accepted": 2})));
    // The same delivery again (webhook senders retry): nothing counts twice.
    let (status, _) = post(
        "/webhooks/forms",
        Some(sign(secret, now, body.as_bytes())),
        body.clone(),
    )
    .await;
    assert_eq!(status, 202);

    let envelopes = json!([{"specversion": "1.0", "id": "shop-9", "source": "shop", "type": "deal.won",
        "time": "2025-11-21T10:00:00Z", "tenant": "hooks",
        "data": {"deal_id": "D9", "customer_id": "C9", "lead_id": "s-1", "amount": "240.00", "currency": "EUR"}}])
    .to_string();
    let (status, reply) = post(
        "/webhooks/shop-events",
        Some(sign("another-secret-of-16+", now, envelopes.as_bytes())),
        envelopes,
    )
    .await;
    assert_eq!((status, reply), (202, json!({"accepted": 1})));

    wait_until(
        "the webhook events in the API",
        Duration::from_secs(20),
        || async { total(&engine, "hooks", "revenue").await == "240.00" },
    )
    .await;
    let (_, all) = engine.get("/api/v1/kpis?tenant=hooks&period=all").await;
    assert_eq!(all["total"]["leads"], 2);
    assert_eq!(all["channels"]["social"]["revenue"], "240.00");
    assert_eq!(all["campaigns"]["autumn"]["revenue"], "240.00");
    let metrics = engine.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "kpi_connector_runs_total",
            &[("connector", "forms"), ("outcome", "error")]
        ),
        Some(5.0)
    );
    assert_eq!(
        metric_value(
            &metrics,
            "kpi_connector_runs_total",
            &[("connector", "forms"), ("outcome", "success")]
        ),
        Some(2.0)
    );
    assert!(!engine.log().contains(secret));
}

/// Makes every path of a mock fail twice before it answers: first a 503, then a 429 with
/// `Retry-After: 1`, as platforms do under load. The connector must retry through both.
fn flaky(app: Router) -> Router {
    let failures: Arc<Mutex<std::collections::HashMap<String, u32>>> = Arc::default();
    app.layer(axum::middleware::from_fn(
        move |request: axum::extract::Request, next: axum::middleware::Next| {
            let failures = failures.clone();
            async move {
                let seen = {
                    let mut failures = failures.lock().unwrap();
                    let count = failures
                        .entry(request.uri().path().to_string())
                        .or_insert(0);
                    *count += 1;
                    *count
                };
                match seen {
                    1 => {
                        (StatusCode::SERVICE_UNAVAILABLE, "upstream connect error").into_response()
                    }
                    2 => {
                        let mut response = (
                            StatusCode::TOO_MANY_REQUESTS,
                            axum::Json(json!({"message": "Too Many Requests"})),
                        )
                            .into_response();
                        response
                            .headers_mut()
                            .insert("retry-after", "1".parse().unwrap());
                        response
                    }
                    _ => next.run(request).await,
                }
            }
        },
    ))
}

/// Stops and restarts the engine, waits for the connector's first run, and checks that the
/// stored state left nothing new to send.
async fn restart_sends_nothing_new(engine: &mut Engine, connector: &str) {
    assert!(engine.stop().success());
    engine.restart().await;
    wait_until(
        "a run after the restart",
        Duration::from_secs(30),
        || async {
            let metrics = engine.metrics().await;
            metric_value(
                &metrics,
                "kpi_connector_runs_total",
                &[("connector", connector), ("outcome", "success")],
            )
            .is_some_and(|runs| runs >= 1.0)
        },
    )
    .await;
    let metrics = engine.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "kpi_connector_events_total",
            &[("connector", connector)]
        ),
        Some(0.0),
        "the run after the restart sent events again"
    );
}

async fn serve_mock(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    base
}

fn header(headers: &HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

async fn email_channel(engine: &Engine, tenant: &str) -> Value {
    let (_, body) = engine
        .get(&format!("/api/v1/kpis?tenant={tenant}&period=all"))
        .await;
    body["channels"]["email"].clone()
}

#[tokio::test]
/// LinkedIn's Marketing API as documented: versioned `/rest/` endpoints
/// (`LinkedIn-Version: YYYYMM`, `X-Restli-Protocol-Version: 2.0.0`,
/// <https://learn.microsoft.com/linkedin/marketing/versioning>); `adAnalytics` answers every
/// element at once, without paging, and leaves out what had no activity
/// (<https://learn.microsoft.com/linkedin/marketing/integrations/ads-reporting/ads-reporting>);
/// campaign search pages with `pageToken` / `metadata.nextPageToken`
/// (<https://learn.microsoft.com/linkedin/marketing/integrations/ads/cursor-based-pagination>);
/// errors are `{"message", "serviceErrorCode", "status"}` and a rate limit a 429
/// (<https://learn.microsoft.com/linkedin/shared/api-guide/concepts/error-handling>).
async fn linkedin_ads_analytics_are_read_with_rest_li_parameters() {
    let nats = NatsServer::start();
    let seen: Arc<Mutex<Vec<(Instant, String, u16)>>> = Arc::default();
    let today = kpi_tests::now().date_naive();
    let day = |back: u64| today.checked_sub_days(Days::new(back)).unwrap();
    let date = |d: chrono::NaiveDate| json!({"year": chrono::Datelike::year(&d), "month": chrono::Datelike::month(&d), "day": chrono::Datelike::day(&d)});
    let restated = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tokens = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let element = |cost: &str, back: u64, campaign: u32| {
        json!({"costInLocalCurrency": cost, "dateRange": {"start": date(day(back)), "end": date(day(back))},
               "pivotValues": [format!("urn:li:sponsoredCampaign:{campaign}")], "impressions": 165, "clicks": 11})
    };
    let analytics = json!({"elements": [element("40.5", 1, 901), element("9.502617801047121", 1, 902), element("10", 2, 901)]});
    // The second round: day 1 of campaign 901 restated, 902 without activity (left out), and
    // 901 renamed.
    let restated_analytics = json!({"elements": [element("45.00", 1, 901), element("10", 2, 901)]});
    let app = Router::new()
        .route("/oauth/v2/accessToken", post({
            let tokens = tokens.clone();
            move |body: String| {
                let tokens = tokens.clone();
                async move {
                    assert!(body.contains("grant_type=refresh_token") && body.contains("client_secret=li-secret-1"), "{body}");
                    let n = tokens.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                    axum::Json(json!({"access_token": format!("AQV-li-{n}"), "expires_in": 5_184_000, "refresh_token": "li-refresh", "refresh_token_expires_in": 31_536_000}))
                }
            }
        }))
        .route("/rest/adAccounts/508", axum::routing::get(|headers: HeaderMap| async move {
            if header(&headers, "authorization") == "Bearer AQV-li-1" {
                // The first token has expired: the connector must mint another one.
                return (StatusCode::UNAUTHORIZED, axum::Json(json!({"status": 401, "serviceErrorCode": 65600, "message": "The token used in the request has expired"}))).into_response();
            }
            axum::Json(json!({"id": 508, "name": "Acme", "currency": "EUR", "status": "ACTIVE"})).into_response()
        }))
        .route("/rest/adAccounts/508/adCampaigns", axum::routing::get({
            let restated = restated.clone();
            move |axum::extract::RawQuery(query): axum::extract::RawQuery| {
                let name = if restated.load(std::sync::atomic::Ordering::SeqCst) { "b2b-awareness-q4" } else { "b2b-awareness" };
                async move {
                    if query.unwrap_or_default().contains("pageToken=p2") {
                        axum::Json(json!({"elements": [{"id": 902, "name": "retarget-li", "account": "urn:li:sponsoredAccount:508"}], "metadata": {}}))
                    } else {
                        axum::Json(json!({"elements": [{"id": 901, "name": name, "account": "urn:li:sponsoredAccount:508"}], "metadata": {"nextPageToken": "p2"}}))
                    }
                }
            }
        }))
        .route("/rest/adAnalytics", axum::routing::get({
            let seen = seen.clone();
            let restated = restated.clone();
            move |headers: HeaderMap, axum::extract::RawQuery(query): axum::extract::RawQuery| {
                let seen = seen.clone();
                let analytics = if restated.load(std::sync::atomic::Ordering::SeqCst) {
                    restated_analytics.clone()
                } else {
                    analytics.clone()
                };
                async move {
                    let mut seen = seen.lock().unwrap();
                    let query = format!("{} {} {}", query.unwrap_or_default(), header(&headers, "linkedin-version"), header(&headers, "x-restli-protocol-version"));
                    let status = if seen.is_empty() { 429 } else { 200 };
                    seen.push((Instant::now(), query, status));
                    if status == 429 {
                        // No Retry-After is documented: the connector backs off on its own.
                        return (StatusCode::TOO_MANY_REQUESTS, axum::Json(json!({"status": 429, "serviceErrorCode": 101, "message": "Resource level throttle APPLICATION DAY limit for calls to this resource is reached."}))).into_response();
                    }
                    axum::Json(analytics).into_response()
                }
            }
        }));
    let base = serve_mock(flaky(app)).await;
    let config = format!(
        r#"
[[connectors]]
id = "linkedin"
kind = "linkedin_ads"
tenant = "lico"
every = "1s"
lookback_days = 5
[connectors.params]
ad_account_id = "508"
client_id = "li-client"
client_secret = "${{LI_SECRET}}"
refresh_token = "li-refresh"
base_url = "{base}"
token_url = "{base}/oauth/v2/accessToken"
"#
    );
    let mut engine = Engine::start_with_env(&nats.url(), &config, &[("LI_SECRET", "li-secret-1")]);
    engine.wait_ready().await;
    wait_until("LinkedIn spend", Duration::from_secs(30), || async {
        let (_, body) = engine.get("/api/v1/kpis?tenant=lico&period=all").await;
        body["channels"]["social"]["spend"] == "60.00"
    })
    .await;
    let (_, body) = engine.get("/api/v1/kpis?tenant=lico&period=all").await;
    assert_eq!(body["campaigns"]["b2b-awareness"]["spend"], "50.50");
    assert_eq!(body["campaigns"]["retarget-li"]["spend"], "9.50");
    let query = {
        let seen = seen.lock().unwrap();
        assert!(seen[1].0.duration_since(seen[0].0) >= Duration::from_millis(200));
        seen[1].1.clone()
    };
    for part in [
        "q=analytics",
        "pivot=CAMPAIGN",
        "timeGranularity=DAILY",
        &format!(
            "dateRange=(start:(year:{},month:{},day:{}),end:(",
            chrono::Datelike::year(&day(5)),
            chrono::Datelike::month(&day(5)),
            chrono::Datelike::day(&day(5))
        ),
        "accounts=List(urn%3Ali%3AsponsoredAccount%3A508)",
        "costInLocalCurrency",
        " 202608 2.0.0",
    ] {
        assert!(query.contains(part), "{part} missing from {query}");
    }
    let log = engine.log();
    assert!(
        log.contains("access token refused; minting a new one"),
        "{log}"
    );
    assert_eq!(tokens.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert!(log.contains("HTTP 503: upstream connect error"), "{log}");
    assert!(!log.contains("li-secret-1"));

    // LinkedIn restates day 1 of 901 (replaced, not added), reports nothing for 902 (its line
    // is withdrawn) and 901 is renamed: its lines move to the new name.
    restated.store(true, std::sync::atomic::Ordering::SeqCst);
    wait_until(
        "the restated LinkedIn spend",
        Duration::from_secs(30),
        || async {
            let (_, body) = engine.get("/api/v1/kpis?tenant=lico&period=all").await;
            body["channels"]["social"]["spend"] == "55.00"
        },
    )
    .await;
    restart_sends_nothing_new(&mut engine, "linkedin").await;
    let (_, body) = engine.get("/api/v1/kpis?tenant=lico&period=all").await;
    assert_eq!(body["campaigns"]["b2b-awareness-q4"]["spend"], "55.00");
    assert_eq!(body["campaigns"]["b2b-awareness"]["spend"], "0.00");
    assert_eq!(body["campaigns"]["retarget-li"]["spend"], "0.00");
}

/// The page `offset..offset + count` of `items` (`count` at most `max`), with the total: the
/// offset paging of Mailchimp (`count`/`offset`, `total_items`) and Brevo (`limit`/`offset`,
/// `count`).
fn offset_page(items: &[Value], query: &str, count_name: &str, max: usize) -> (Vec<Value>, usize) {
    let param = |name: &str| -> Option<usize> {
        query
            .split('&')
            .find_map(|pair| pair.strip_prefix(&format!("{name}=")))
            .and_then(|value| value.parse().ok())
    };
    let offset = param("offset").unwrap_or(0);
    let count = param(count_name).unwrap_or(10).min(max);
    let page = items.iter().skip(offset).take(count).cloned().collect();
    (page, items.len())
}

/// Mailchimp's Marketing API 3.0 as documented: `GET /3.0/reports` and
/// `GET /3.0/lists/{list_id}/members`, paged with `count` (at most 1000) and `offset`, the
/// collection's size in `total_items` (<https://mailchimp.com/developer/marketing/api/reports/>,
/// <https://mailchimp.com/developer/marketing/api/list-members/>); Basic auth with any user and
/// the API key (<https://mailchimp.com/developer/marketing/docs/fundamentals/>). 1,001 reports
/// and 1,050 subscribers: two pages each.
#[tokio::test]
async fn mailchimp_costs_and_subscribers_are_paged() {
    let nats = NatsServer::start();
    let yesterday = kpi_tests::now() - chrono::Duration::days(1);
    let sent = yesterday.to_rfc3339();
    let deleted = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reports: Vec<Value> = (0..1001)
        .map(|n| {
            let title = if n == 0 { "black-friday".to_string() } else { format!("news-{n}") };
            json!({"id": format!("42694e9e{n:02}"), "campaign_title": title, "type": "regular",
                   "list_id": "aud-1", "subject_line": "Our news", "emails_sent": 1200, "send_time": sent,
                   "opens": {"opens_total": 300}, "clicks": {"clicks_total": 40}, "unsubscribed": 2})
        })
        .collect();
    let members: Vec<Value> = (0..1050)
        .map(|n| {
            json!({"id": format!("852aaa9532cb36adfb5e9fef7a4206a9{n:04}"), "email_address": format!("m{n}@example.com"),
                   "status": "subscribed", "timestamp_signup": "", "timestamp_opt": "2025-11-20T08:00:00+00:00",
                   "last_changed": "2025-11-20T08:00:00+00:00", "source": "Hosted Signup Form", "list_id": "aud-1"})
        })
        .collect();
    let app = Router::new()
        .route(
            "/3.0/reports",
            axum::routing::get({
                let deleted = deleted.clone();
                move |headers: HeaderMap,
                      axum::extract::RawQuery(query): axum::extract::RawQuery| {
                    let mut reports = reports.clone();
                    // The second round: campaign black-friday was deleted, its report is gone.
                    if deleted.load(std::sync::atomic::Ordering::SeqCst) {
                        reports.remove(0);
                    }
                    async move {
                        // Basic auth, any user name, the API key as password: "kpi-engine:key-us21".
                        assert_eq!(
                            header(&headers, "authorization"),
                            "Basic a3BpLWVuZ2luZTprZXktdXMyMQ=="
                        );
                        let query = query.unwrap_or_default();
                        assert!(query.contains("since_send_time="), "{query}");
                        let (page, total) = offset_page(&reports, &query, "count", 1000);
                        axum::Json(json!({"reports": page, "total_items": total}))
                    }
                }
            }),
        )
        .route(
            "/3.0/lists/{list}/members",
            axum::routing::get(
                move |axum::extract::Path(list): axum::extract::Path<String>,
                      axum::extract::RawQuery(query): axum::extract::RawQuery| {
                    let members = members.clone();
                    async move {
                        assert_eq!(list, "aud-1");
                        let query = query.unwrap_or_default();
                        assert!(query.contains("status=subscribed"), "{query}");
                        let (page, total) = offset_page(&members, &query, "count", 1000);
                        axum::Json(
                            json!({"members": page, "list_id": "aud-1", "total_items": total}),
                        )
                    }
                },
            ),
        );
    let base = serve_mock(flaky(app)).await;
    let config = format!(
        r#"
[[connectors]]
id = "mailchimp"
kind = "mailchimp"
tenant = "mailco"
every = "1s"
lookback_days = 40
[connectors.params]
api_key = "${{MAILCHIMP_KEY}}"
list_id = "aud-1"
lead_campaign = "newsletter"
monthly_plan_price = "59.00"
cost_per_campaign = "0.50"
base_url = "{base}"
"#
    );
    let mut engine = Engine::start_with_env(&nats.url(), &config, &[("MAILCHIMP_KEY", "key-us21")]);
    engine.wait_ready().await;
    // The plan on each 1st of a month inside the 40-day window (one or two, depending on the
    // day), and 1,001 campaigns of 0.50.
    let today = kpi_tests::today();
    let window_start = today.checked_sub_days(Days::new(40)).unwrap();
    let firsts = window_start
        .iter_days()
        .take_while(|day| *day <= today)
        .filter(|day| day.day() == 1)
        .count();
    let expected = format!("{:.2}", 59.0 * firsts as f64 + 500.50);
    wait_until(
        "Mailchimp spend and leads",
        Duration::from_secs(30),
        || async {
            let email = email_channel(&engine, "mailco").await;
            email["spend"] == expected.as_str() && email["leads"] == 1050
        },
    )
    .await;
    let (_, body) = engine.get("/api/v1/kpis?tenant=mailco&period=all").await;
    assert_eq!(body["campaigns"]["black-friday"]["spend"], "0.50");
    // Runs every second: the unchanged subscribers are not sent again.
    let sent_events = |metrics: String| {
        metric_value(
            &metrics,
            "kpi_connector_events_total",
            &[("connector", "mailchimp")],
        )
    };
    let first = sent_events(engine.metrics().await);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(sent_events(engine.metrics().await), first);

    // A deleted campaign's report is gone: its cost is withdrawn. (A run whose two pages
    // straddle the deletion reads the last report as missing instead, offset paging being
    // what it is; the next run puts it back. So wait for the state a whole run gives.)
    deleted.store(true, std::sync::atomic::Ordering::SeqCst);
    let expected = format!("{:.2}", 59.0 * firsts as f64 + 500.00);
    wait_until(
        "the deleted campaign's cost withdrawn",
        Duration::from_secs(30),
        || async {
            let (_, body) = engine.get("/api/v1/kpis?tenant=mailco&period=all").await;
            body["channels"]["email"]["spend"] == expected.as_str()
                && body["campaigns"]["black-friday"]["spend"] == "0.00"
        },
    )
    .await;
    let (_, body) = engine.get("/api/v1/kpis?tenant=mailco&period=all").await;
    assert_eq!(body["campaigns"]["black-friday"]["spend"], "0.00");
    assert_eq!(body["campaigns"]["news-1000"]["spend"], "0.50");
    restart_sends_nothing_new(&mut engine, "mailchimp").await;
    assert_eq!(email_channel(&engine, "mailco").await["leads"], 1050);
}

/// Brevo's API v3 as documented: `GET /v3/contacts` (`limit` at most 1000, `offset`,
/// `createdSince`; `contacts` and `count`, <https://developers.brevo.com/reference/get-contacts>)
/// and `GET /v3/emailCampaigns` (`limit` at most 100, `status=sent`; `campaigns` and `count`),
/// the `api-key` header, and a 429 whose `x-sib-ratelimit-reset` says when to come back
/// (<https://developers.brevo.com/docs/limit-headers>). 1,020 contacts and 105 campaigns: two
/// pages each.
#[tokio::test]
async fn brevo_contacts_honour_its_rate_limit_header_and_list_filter() {
    let nats = NatsServer::start();
    let calls: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let sent = (kpi_tests::now() - chrono::Duration::days(2))
        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string();
    let campaigns: Vec<Value> = (0..105)
        .map(|n| {
            json!({"id": n + 1, "name": if n == 0 { "winter-promo".to_string() } else { format!("promo-{n}") },
                   "subject": "Winter", "type": "classic", "status": "sent", "sentDate": sent,
                   "createdAt": sent, "modifiedAt": sent, "statistics": {"globalStats": {}}})
        })
        .collect();
    // 1,020 contacts, one in three in list 7 (not followed).
    let contacts: Vec<Value> = (1..=1020u64)
        .map(|id| {
            let list = if id % 3 == 0 { 7 } else { 2 };
            json!({"id": id, "email": format!("c{id}@example.com"), "emailBlacklisted": false, "smsBlacklisted": false,
                   "createdAt": "2025-11-20T08:00:00.000+01:00", "modifiedAt": "2025-11-20T08:00:00.000+01:00",
                   "listIds": [list], "attributes": {}})
        })
        .collect();
    let app = Router::new()
        .route("/v3/emailCampaigns", axum::routing::get(move |headers: HeaderMap, axum::extract::RawQuery(query): axum::extract::RawQuery| {
            let campaigns = campaigns.clone();
            async move {
                assert_eq!(header(&headers, "api-key"), "xkeysib-123");
                let (page, count) = offset_page(&campaigns, &query.unwrap_or_default(), "limit", 100);
                axum::Json(json!({"campaigns": page, "count": count}))
            }
        }))
        .route("/v3/contacts", axum::routing::get({
            let calls = calls.clone();
            move |axum::extract::RawQuery(query): axum::extract::RawQuery| {
                let calls = calls.clone();
                let contacts = contacts.clone();
                async move {
                    let mut calls = calls.lock().unwrap();
                    calls.push(Instant::now());
                    if calls.len() == 1 {
                        let mut response = (StatusCode::TOO_MANY_REQUESTS, axum::Json(json!({"code": "too_many_requests", "message": "The expected rate limit is exceeded."}))).into_response();
                        for (name, value) in [("x-sib-ratelimit-limit", "10"), ("x-sib-ratelimit-remaining", "0"), ("x-sib-ratelimit-reset", "1")] {
                            response.headers_mut().insert(name, value.parse().unwrap());
                        }
                        return response;
                    }
                    let (page, count) = offset_page(&contacts, &query.unwrap_or_default(), "limit", 1000);
                    axum::Json(json!({"contacts": page, "count": count})).into_response()
                }
            }
        }));
    let base = serve_mock(flaky(app)).await;
    let config = format!(
        r#"
[[connectors]]
id = "brevo"
kind = "brevo"
tenant = "brevoco"
every = "1h"
lookback_days = 5
[connectors.params]
api_key = "${{BREVO_KEY}}"
list_ids = [2]
cost_per_campaign = "1.00"
base_url = "{base}"
"#
    );
    let mut engine = Engine::start_with_env(&nats.url(), &config, &[("BREVO_KEY", "xkeysib-123")]);
    engine.wait_ready().await;
    wait_until("Brevo leads", Duration::from_secs(30), || async {
        let email = email_channel(&engine, "brevoco").await;
        email["leads"] == 680 && email["spend"] == "105.00"
    })
    .await;
    assert_eq!(email_channel(&engine, "brevoco").await["spend"], "105.00");
    let (first, second) = {
        let calls = calls.lock().unwrap();
        (calls[0], calls[1])
    };
    assert!(second.duration_since(first) >= Duration::from_millis(950));
    restart_sends_nothing_new(&mut engine, "brevo").await;
    assert_eq!(email_channel(&engine, "brevoco").await["spend"], "105.00");
}

#[tokio::test]
async fn connector_commands_list_check_and_backfill_in_the_foreground() {
    let nats = NatsServer::start();
    let mock: Shared = Arc::default();
    let address = start_google_mock(mock.clone()).await;
    let base = format!("http://{address}");
    // An engine to read the results (without the connector), and a configuration with it for
    // the foreground runs, which need no engine of their own.
    let mut engine = Engine::start(&nats.url(), "");
    engine.wait_ready().await;
    let work = tempfile::tempdir().unwrap();
    let config_path = work.path().join("kpi.toml");
    std::fs::write(
        &config_path,
        format!(
            "[nats]\nurl = \"{}\"\n[store]\npath = \"{}\"\n{}",
            nats.url(),
            work.path().join("store").display(),
            connector_config("gads", &base, "client-1")
                + &connector_config("gads-old", &base, "client-1")
                + "api_version = \"v21\"\n"
        ),
    )
    .unwrap();
    // Async: the mock serves on this test's runtime while the command runs.
    let kpi = |args: &[&str]| {
        tokio::process::Command::from(kpi_tests::kpi_command())
            .args(args)
            .arg("--config")
            .arg(&config_path)
            .env("GADS_DEVELOPER_TOKEN", "dev-token-7")
            .env("GADS_REFRESH_TOKEN", "rt-secret-99")
            .env("RUST_BACKTRACE", "0")
            .output()
    };
    let list = kpi(&["connectors", "list"]).await.unwrap();
    let listed = String::from_utf8_lossy(&list.stdout);
    for kind in [
        "google_ads",
        "meta_ads",
        "linkedin_ads",
        "mailchimp",
        "brevo",
        "hubspot",
        "pipedrive",
        "csv",
        "webhook",
        "exec",
    ] {
        assert!(listed.contains(kind), "{kind} missing from:\n{listed}");
    }
    assert!(listed.contains("gads "), "{listed}");

    let check = kpi(&["connectors", "check", "gads"]).await.unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(
        String::from_utf8_lossy(&check.stdout)
            .contains("gads: API version v26, switched off on 2027-11-01"),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    // A version past its sunset: warned, naming the day and the version to move to.
    let old = kpi(&["connectors", "check", "gads-old"]).await.unwrap();
    let stderr = String::from_utf8_lossy(&old.stderr);
    assert!(
        stderr.contains("warning: gads-old: API version v21 was switched off on 2026-08-05: set api_version to v26"),
        "{stderr}"
    );
    let missing = kpi(&["connectors", "check", "nope"]).await.unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr)
        .contains("no connector `nope` in the configuration (configured: gads, gads-old)"));

    let unset = tokio::process::Command::from(kpi_tests::kpi_command())
        .args(["connectors", "check", "gads", "--config"])
        .arg(&config_path)
        .env("GADS_DEVELOPER_TOKEN", "dev-token-7")
        .env_remove("GADS_REFRESH_TOKEN")
        .output()
        .await
        .unwrap();
    assert!(!unset.status.success());
    assert!(
        String::from_utf8_lossy(&unset.stderr).contains(
            "connectors[0].params.refresh_token: environment variable `GADS_REFRESH_TOKEN` is not set"
        ),
        "{}",
        String::from_utf8_lossy(&unset.stderr)
    );

    let since = kpi_tests::now()
        .date_naive()
        .checked_sub_days(Days::new(30))
        .unwrap();
    let run = kpi(&["connectors", "run", "gads", "--since", &since.to_string()])
        .await
        .unwrap();
    let out = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(out.contains(&format!("gads: read {since} to")), "{out}");
    assert!(out.contains("published 3 events"), "{out}");
    let query = mock
        .lock()
        .unwrap()
        .seen
        .iter()
        .rev()
        .find(|seen| seen.path == "searchStream" && seen.status == 200)
        .map(|seen| seen.body.clone())
        .unwrap();
    assert!(query.contains(&format!("BETWEEN '{since}'")), "{query}");

    // The state was saved: a second run sends nothing new.
    let again = kpi(&["connectors", "run", "gads"]).await.unwrap();
    let out = String::from_utf8_lossy(&again.stdout);
    assert!(out.contains("published 0 events"), "{out}");
    assert!(out.contains("3 spend lines unchanged"), "{out}");
    wait_until("the backfilled spend", Duration::from_secs(20), || async {
        let (status, body) = engine.get("/api/v1/kpis?tenant=acme&period=all").await;
        status == 200 && body["channels"]["paid_search"]["spend"] == "25.09"
    })
    .await;
}

#[tokio::test]
async fn hubspot_reads_past_the_search_apis_ten_thousand_results() {
    let nats = NatsServer::start();
    // 10,050 contacts, modified one millisecond apart (two share each millisecond).
    const CONTACTS: i64 = 10_050;
    let base_ms = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
        .unwrap()
        .timestamp_millis();
    let contacts = move |body: String| async move {
        let request: Value = serde_json::from_str(&body).unwrap();
        let from: i64 = request["filterGroups"][0]["filters"][0]["value"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        let offset: usize = request["after"]
            .as_str()
            .map_or(0, |after| after.parse().unwrap());
        if offset >= 10_000 {
            return (StatusCode::BAD_REQUEST, axum::Json(json!({"status": "error", "message": "Paging beyond 10000 results is not supported.", "category": "VALIDATION_ERROR"}))).into_response();
        }
        let matching: Vec<i64> = (0..CONTACTS).filter(|n| base_ms + n / 2 >= from).collect();
        let page: Vec<Value> = matching
            .iter()
            .skip(offset)
            .take(100)
            .map(|n| {
                let modified = chrono::DateTime::from_timestamp_millis(base_ms + n / 2).unwrap().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
                json!({"id": n.to_string(), "properties": {"createdate": "2026-01-01T00:00:00.000Z", "lastmodifieddate": modified, "hs_analytics_source": "DIRECT_TRAFFIC"}})
            })
            .collect();
        let mut reply = json!({"total": matching.len(), "results": page});
        if offset + 100 < matching.len() {
            reply["paging"] = json!({"next": {"after": (offset + 100).to_string()}});
        }
        axum::Json(reply).into_response()
    };
    let app = Router::new()
        .route("/crm/v3/objects/contacts/search", post(contacts))
        .route(
            "/crm/v3/objects/deals/search",
            post(|| async { axum::Json(json!({"total": 0, "results": []})) }),
        );
    let base = serve_mock(app).await;
    let config = format!(
        "[[connectors]]\nid = \"crm\"\nkind = \"hubspot\"\ntenant = \"bigcrm\"\nevery = \"1h\"\n[connectors.params]\naccess_token = \"pat\"\nbase_url = \"{base}\"\n"
    );
    let mut engine = Engine::start(&nats.url(), &config);
    engine.wait_ready().await;
    wait_until(
        "10,050 HubSpot contacts as leads",
        Duration::from_secs(60),
        || async { total(&engine, "bigcrm", "leads").await == CONTACTS },
    )
    .await;
}

/// The webhook checks every event as the engine will (the same decoder, the tenant's rates):
/// a sender's mistake is a 400 naming the item and the field, and publishes nothing, never a
/// 503 to retry forever; and amounts keep every digit, as on the NATS path.
#[tokio::test]
async fn webhooks_refuse_what_the_engine_would_reject_and_keep_amounts_exact() {
    let nats = NatsServer::start();
    let config = r#"
[tenants.hooks]
fx = { USD = 0.9 }

[[connectors]]
id = "events"
kind = "webhook"
tenant = "hooks"
every = "1h"
[connectors.params]
secret = "another-secret-of-16+"

[[connectors]]
id = "orders"
kind = "webhook"
tenant = "hooks"
every = "1h"
[connectors.params]
secret = "another-secret-of-16+"
[connectors.params.mapping]
event_type = "deal.won"
items = "/orders"
id = "/number"
time = "/paid_at"
[connectors.params.mapping.fields]
deal_id = "/number"
customer_id = "/buyer"
amount = "/total"
currency = "/currency"
"#;
    let mut engine = Engine::start(&nats.url(), config);
    engine.wait_ready().await;
    let client = reqwest::Client::new();
    let post = |path: &'static str, body: String| {
        let signature = kpi_connect::kinds::webhook::sign(
            "another-secret-of-16+",
            kpi_tests::wall_clock().timestamp(),
            body.as_bytes(),
        );
        let request = client
            .post(format!("{}{path}", engine.base()))
            .header("X-Kpi-Signature", signature)
            .body(body);
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap())
        }
    };
    // Written as text: through serde_json's Value the amount would become the float 0.125.
    let good_text = r#"{"specversion":"1.0","id":"ok-1","source":"shop","type":"deal.won","time":"2025-11-21T10:00:00Z","data":{"deal_id":"D1","customer_id":"C1","amount":0.125000000000000001,"currency":"EUR"}}"#;
    let good: Value = serde_json::from_str(good_text).unwrap();
    let with = |field: &str, value: Value| {
        let mut event = good.clone();
        let pointer: Vec<&str> = field.split('.').collect();
        match pointer.as_slice() {
            [name] => event[*name] = value,
            [outer, inner] => event[*outer][*inner] = value,
            _ => unreachable!(),
        }
        event
    };
    let cases = [
        (with("time", json!("x\r\ny")), "[1]: invalid_field: time"),
        (
            with("type", json!("deal.won\t")),
            "[1]: invalid_field: type",
        ),
        (
            with("data.amount", json!("-5")),
            "[1]: negative_amount: data.amount",
        ),
        (
            with("data.amount", json!("50000000000000000000000000000")),
            "[1]: invalid_field: data.amount",
        ),
        (
            with("data.currency", json!("JPY")),
            "[1]: unknown_currency: data.currency",
        ),
        (
            with("tenant", json!("other")),
            "[1]: tenant_mismatch: tenant",
        ),
        (
            with("data.deal_id", json!(null)),
            "[1]: missing_field: data.deal_id",
        ),
        (
            with("type", json!("deal.exploded")),
            "[1]: unknown_type: type",
        ),
    ];
    for (bad, want) in cases {
        let body = format!("[{good_text},{bad}]");
        let (status, reply) = post("/webhooks/events", body).await;
        let error = reply["error"].as_str().unwrap_or_default().to_string();
        assert_eq!(status, 400, "{bad}: {reply}");
        assert!(error.starts_with(want), "{error} should start with {want}");
        assert!(!error.contains(['\r', '\n', '\t']), "{error:?}");
    }
    // A mapped body: the faulty field is named with where it came from.
    let (status, reply) = post(
        "/webhooks/orders",
        r#"{"orders":[{"number":"A1","paid_at":"2025-11-21T10:00:00Z","buyer":"C2","total":"12,50","currency":"EUR"}]}"#.into(),
    )
    .await;
    assert_eq!(status, 400, "{reply}");
    assert_eq!(
        reply["error"],
        "[0]: invalid_field: data.amount: expected a decimal as a string or number (mapping.fields.amount = /total)"
    );

    // Nothing of the refused requests was published.
    let js = async_nats::jetstream::new(nats.client().await);
    let mut stream = js.get_stream("KPI_EVENTS").await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 0);

    // Good events: both paths keep all eighteen digits.
    let (status, reply) = post("/webhooks/events", good_text.to_string()).await;
    assert_eq!((status, reply), (202, json!({"accepted": 1})));
    let (status, reply) = post(
        "/webhooks/orders",
        r#"{"orders":[{"number":"A2","paid_at":"2025-11-21T11:00:00Z","buyer":"C2","total":100.000000000000000001,"currency":"USD"}]}"#.into(),
    )
    .await;
    assert_eq!((status, reply), (202, json!({"accepted": 1})));
    let stored = |sequence: u64| {
        let stream = stream.clone();
        async move {
            let message = stream.get_raw_message(sequence).await.unwrap();
            serde_json::from_slice::<Value>(&message.payload).unwrap()["data"]["amount"].clone()
        }
    };
    assert_eq!(stored(1).await, "0.125000000000000001");
    assert_eq!(stored(2).await, "100.000000000000000001");
    wait_until("both deals applied", Duration::from_secs(20), || async {
        total(&engine, "hooks", "new_customers").await == 2
    })
    .await;
    // 0.125000000000000001 + 100.000000000000000001 x 0.9, to the cent.
    assert_eq!(total(&engine, "hooks", "revenue").await, "90.13");
}

/// Spend a kind read completely and no longer returns is withdrawn: a CSV file re-exported
/// without a line (only that file's lines), and an exec plugin whose window leaves a line out
/// (unless it says it reports spend partially).
#[tokio::test]
async fn csv_and_exec_spend_lines_missing_from_a_complete_read_are_withdrawn() {
    let nats = NatsServer::start();
    let work = tempfile::tempdir().unwrap();
    let inbox = work.path().join("spend");
    std::fs::create_dir(&inbox).unwrap();
    let header = "date,amount,currency,channel,campaign,source,account\n";
    std::fs::write(
        inbox.join("ads.csv"),
        format!(
            "{header}2026-01-05,100.00,EUR,paid_search,brand,invoices,a\n\
             2026-01-06,50.00,EUR,paid_search,brand,invoices,a\n\
             2026-01-05,30.00,EUR,paid_search,generic,invoices,a\n"
        ),
    )
    .unwrap();
    std::fs::write(
        inbox.join("events.csv"),
        format!("{header}2026-01-10,900.00,EUR,events,trade-show,invoices,b\n"),
    )
    .unwrap();
    let yesterday = kpi_tests::today()
        .checked_sub_days(Days::new(1))
        .unwrap()
        .to_string();
    let spend = |campaign: &str, amount: &str| {
        format!(
            r#"{{"type":"spend","spend":{{"date":"{yesterday}","amount":"{amount}","currency":"EUR","channel":"social","campaign":"{campaign}","source":"shop"}}}}"#
        )
    };
    let complete = work.path().join("complete.jsonl");
    let partial = work.path().join("partial.jsonl");
    std::fs::write(
        &complete,
        format!("{}\n{}\n", spend("fees", "4.00"), spend("boost", "6.00")),
    )
    .unwrap();
    std::fs::write(&partial, format!("{}\n", spend("listing", "2.50"))).unwrap();
    let config = format!(
        r#"
[[connectors]]
id = "spend-files"
kind = "csv"
tenant = "files"
every = "1s"
[connectors.params]
dir = "{}"
kind = "spend"

[[connectors]]
id = "plugin"
kind = "exec"
tenant = "plugins"
every = "1s"
lookback_days = 3
[connectors.params]
command = "cat"
args = ["{}"]

[[connectors]]
id = "partial"
kind = "exec"
tenant = "partials"
every = "1s"
lookback_days = 3
[connectors.params]
command = "cat"
args = ["{}"]
"#,
        inbox.display(),
        complete.display(),
        partial.display()
    );
    let mut engine = Engine::start(&nats.url(), &config);
    engine.wait_ready().await;
    wait_until("every line read", Duration::from_secs(30), || async {
        total(&engine, "files", "spend").await == "1080.00"
            && total(&engine, "plugins", "spend").await == "10.00"
            && total(&engine, "partials", "spend").await == "2.50"
    })
    .await;

    // ads.csv re-exported: `generic` gone, day 2 of `brand` restated. events.csv untouched.
    std::fs::write(
        inbox.join("ads.csv"),
        format!(
            "{header}2026-01-05,100.00,EUR,paid_search,brand,invoices,a\n\
             2026-01-06,60.00,EUR,paid_search,brand,invoices,a\n"
        ),
    )
    .unwrap();
    // The plugins' next windows: `boost` gone from the complete one; the partial one says it
    // reports spend partially, and leaves `listing` out.
    std::fs::write(&complete, format!("{}\n", spend("fees", "4.00"))).unwrap();
    std::fs::write(&partial, "{\"type\":\"spend_partial\"}\n").unwrap();
    wait_until("the withdrawals", Duration::from_secs(30), || async {
        total(&engine, "files", "spend").await == "1060.00"
            && total(&engine, "plugins", "spend").await == "4.00"
    })
    .await;
    let (_, files) = engine.get("/api/v1/kpis?tenant=files&period=all").await;
    assert_eq!(files["campaigns"]["generic"]["spend"], "0.00");
    assert_eq!(files["campaigns"]["brand"]["spend"], "160.00");
    assert_eq!(files["campaigns"]["trade-show"]["spend"], "900.00");
    let (_, plugins) = engine.get("/api/v1/kpis?tenant=plugins&period=all").await;
    assert_eq!(plugins["campaigns"]["boost"]["spend"], "0.00");
    assert_eq!(total(&engine, "partials", "spend").await, "2.50");
    // Withdrawn once: later runs send nothing.
    restart_sends_nothing_new(&mut engine, "plugin").await;
    assert_eq!(total(&engine, "plugins", "spend").await, "4.00");
}
