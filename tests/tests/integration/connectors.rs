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
use chrono::{Days, Utc};
use kpi_tests::{metric_value, wait_until, Engine, NatsServer};
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
/// token grant) and `POST /v21/customers/{id}/googleAds:searchStream` (JSON array of batches).
#[derive(Default)]
struct GoogleMock {
    tokens_issued: u32,
    /// Replies to play before the normal ones: (status, Retry-After, body).
    script: VecDeque<(u16, Option<&'static str>, Value)>,
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
    let today = Utc::now().date_naive();
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
        let brand = if mock.restated {
            "20000000"
        } else {
            "12340000"
        };
        // Two batches, as searchStream streams them.
        (
            200,
            None,
            json!([
                {"results": [
                    {"customer": {"resourceName": "customers/1234567890", "currencyCode": "EUR"},
                     "campaign": {"resourceName": "customers/1234567890/campaigns/111", "id": "111", "name": "brand"},
                     "metrics": {"costMicros": brand}, "segments": {"date": day1}},
                    {"customer": {"resourceName": "customers/1234567890", "currencyCode": "EUR"},
                     "campaign": {"resourceName": "customers/1234567890/campaigns/222", "id": "222", "name": "generic"},
                     "metrics": {"costMicros": "5500000"}, "segments": {"date": day1}}
                 ],
                 "fieldMask": "customer.currencyCode,campaign.id,campaign.name,metrics.costMicros,segments.date",
                 "requestId": "req-1"},
                {"results": [
                    {"customer": {"resourceName": "customers/1234567890", "currencyCode": "EUR"},
                     "campaign": {"resourceName": "customers/1234567890/campaigns/222", "id": "222", "name": "generic"},
                     "metrics": {"costMicros": "7250000"}, "segments": {"date": day2}},
                    {"customer": {"resourceName": "customers/1234567890", "currencyCode": "EUR"},
                     "campaign": {"resourceName": "customers/1234567890/campaigns/333", "id": "333", "name": "paused"},
                     "metrics": {}, "segments": {"date": day2}}
                 ],
                 "fieldMask": "customer.currencyCode,campaign.id,campaign.name,metrics.costMicros,segments.date",
                 "requestId": "req-1"}
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
            "/v21/customers/1234567890/googleAds:searchStream",
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
        (
            429,
            Some("1"),
            json!({"error": {"code": 429, "message": "Resource has been exhausted (e.g. check quota).", "status": "RESOURCE_EXHAUSTED"}}),
        ),
        (
            503,
            None,
            json!({"error": {"code": 503, "message": "The service is currently unavailable.", "status": "UNAVAILABLE"}}),
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

    // 12.34 + 5.50 (day 1) + 7.25 (day 2) + 0 (a paused campaign without cost)
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
            "Retry-After: 1 was not honoured"
        );
        let success = streams[3];
        assert_eq!(success.headers["authorization"], "Bearer ya29.t2");
        assert_eq!(success.headers["developer-token"], "dev-token-7");
        assert_eq!(success.headers["login-customer-id"], "9876543210");
        let query: Value = serde_json::from_str(&success.body).unwrap();
        let today = Utc::now().date_naive();
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
        Some(4.0)
    );
    assert!(metric_value(
        &metrics,
        "kpi_connector_last_success_timestamp_seconds",
        &[("connector", "gads")]
    )
    .is_some());
    let log = engine.log();
    assert!(log.contains("Token has been expired or revoked."), "{log}");
    for secret in ["rt-secret-99", "cs-secret-42", "dev-token-7"] {
        assert!(!log.contains(secret), "secret {secret} in the log");
    }

    // Google restates day 1 of `brand`: the new value replaces the old one.
    mock.lock().unwrap().restated = true;
    wait_until("the restated spend", Duration::from_secs(20), || async {
        paid_search_spend(&engine).await.as_deref() == Some("32.75")
    })
    .await;
    let (_, all) = engine.get("/api/v1/kpis?tenant=acme&period=all").await;
    assert_eq!(all["campaigns"]["brand"]["spend"], "20.00");

    // After a restart the stored state says what was sent: a run sends nothing new.
    assert!(engine.stop().success());
    engine.restart().await;
    wait_until(
        "a run after the restart",
        Duration::from_secs(20),
        || async {
            let metrics = engine.metrics().await;
            metric_value(
                &metrics,
                "kpi_connector_runs_total",
                &[("connector", "gads"), ("outcome", "success")],
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
            &[("connector", "gads")]
        ),
        Some(0.0)
    );
    assert_eq!(paid_search_spend(&engine).await.as_deref(), Some("32.75"));
}
