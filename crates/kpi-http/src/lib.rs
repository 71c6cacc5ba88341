//! The engine's HTTP server: `/metrics`, `/healthz`, `/readyz`, the JSON API (`/api/v1/kpis`,
//! `/api/v1/kpis/series`, `/api/v1/retention`, `/api/v1/retention/series`, `/api/v1/tenants`,
//! as SPEC section 3 shows them, described by `/api/v1/openapi.json`) and the KPI page at `/`.
//!
//! Handlers only read the live state; they never touch sled or NATS, so answering costs the
//! same whatever the size of the history.

pub mod metrics;
pub mod page;
pub mod security;
pub mod server;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::Datelike;
use kpi_model::event::is_valid_tenant;
use kpi_model::{
    Aggregates, Clock, CounterKey, KpiReport, KpiSeries, Page, Period, RetentionReport,
    RetentionSeries, Rows, Scope, Tenants, Window,
};
use prometheus::{Encoder, Registry, TextEncoder};
use serde_json::json;

pub use metrics::KpiCollector;

/// What the server reads on this engine: the tenants' settings, the clock, the live
/// aggregates and event counters, which tenants it shows (with several engines, those of the
/// partitions it owns and has caught up on) and whether it is ready. The binary implements it
/// over the ingest's state (the local implementation); the tenants other engines show are
/// read through [`Cluster`] (the remote one).
pub trait KpiSource: Send + Sync + 'static {
    fn tenants(&self) -> &Tenants;
    /// "Now" for every date decision.
    fn clock(&self) -> &Clock;
    fn aggregates(&self) -> std::sync::RwLockReadGuard<'_, Aggregates>;
    fn counters(
        &self,
    ) -> std::sync::RwLockReadGuard<'_, std::collections::BTreeMap<CounterKey, u64>>;
    /// Whether this engine shows `tenant` (always, with one engine).
    fn exports(&self, tenant: &str) -> bool;
    /// With several engines, the partition of `tenant`.
    fn partition_of(&self, tenant: &str) -> Option<u32>;
    /// With several engines, whether this engine shows `partition` (false with one engine).
    fn exports_partition(&self, partition: u32) -> bool;
    fn is_ready(&self) -> bool;
}

/// The header a forwarded request carries: the engine receiving it answers itself or says it
/// cannot (it never forwards again).
pub const FORWARDED_HEADER: &str = "x-kpi-forwarded";

/// What another engine answered to a forwarded request.
pub struct Forwarded {
    pub status: u16,
    pub content_type: String,
    pub retry_after: Option<String>,
    pub body: Vec<u8>,
}

/// A future of the cluster.
pub type ClusterFuture<'a, T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, String>> + Send + 'a>>;

/// Multi-engine mode (SPEC section 5): reaches the engines that own the tenants this one does
/// not show (implemented over NATS request/reply by the binary).
pub trait Cluster: Send + Sync + 'static {
    /// Sends a request about `tenant` to the engine that shows it.
    fn forward<'a>(
        &'a self,
        tenant: &'a str,
        path_and_query: String,
        authorization: Option<String>,
    ) -> ClusterFuture<'a, Forwarded>;

    /// The tenants shown by the other engines.
    fn remote_tenants(&self) -> ClusterFuture<'_, RemoteTenants>;
}

/// The tenants of the partitions other engines show, and the partitions this engine showed
/// when it asked (its own tenants are listed from those, so a partition changing hands
/// meanwhile is listed once, by one side or the other).
pub struct RemoteTenants {
    pub local: Vec<u32>,
    pub tenants: Vec<String>,
}

/// Answers 503 with a JSON error and `Retry-After`: the tenant's partition is changing hands.
fn unavailable(message: String) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::RETRY_AFTER, "2")],
        Json(json!({ "error": message })),
    )
        .into_response()
}

/// What the tenant router needs.
#[derive(Clone)]
struct Routing {
    state: Arc<dyn KpiSource>,
    cluster: Option<Arc<dyn Cluster>>,
}

/// Multi-engine mode: a request about a tenant this engine does not show goes to the engine
/// that does; its answer is passed back as it is. With one engine every tenant is shown here.
async fn route_tenant(
    axum::extract::State(routing): axum::extract::State<Routing>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let tenant = Query::<HashMap<String, String>>::try_from_uri(request.uri())
        .ok()
        .and_then(|Query(params)| params.get("tenant").cloned())
        .unwrap_or_else(|| "default".to_string());
    if !is_valid_tenant(&tenant) || routing.state.exports(&tenant) {
        return next.run(request).await;
    }
    let partition = routing.state.partition_of(&tenant).unwrap_or(0);
    if request.headers().contains_key(FORWARDED_HEADER) {
        return unavailable(format!(
            "tenant `{tenant}`: partition {partition} is changing engines; retry in a moment"
        ));
    }
    let Some(cluster) = routing.cluster.clone() else {
        return next.run(request).await;
    };
    let path_and_query = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .map(str::to_string);
    match cluster.forward(&tenant, path_and_query, authorization).await {
        Ok(answer) => {
            let mut response = (
                StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY),
                answer.body,
            )
                .into_response();
            let headers = response.headers_mut();
            if let Ok(value) = header::HeaderValue::from_str(&answer.content_type) {
                headers.insert(header::CONTENT_TYPE, value);
            }
            if let Some(value) = answer
                .retry_after
                .and_then(|value| header::HeaderValue::from_str(&value).ok())
            {
                headers.insert(header::RETRY_AFTER, value);
            }
            response
        }
        Err(error) => unavailable(format!(
            "tenant `{tenant}`: partition {partition} has no engine ready ({error}); retry in a moment"
        )),
    }
}

/// Answers a request forwarded by another engine with this engine's routes.
pub async fn answer_forwarded(
    router: Router,
    path_and_query: &str,
    authorization: Option<&str>,
) -> Forwarded {
    use tower::ServiceExt;
    let mut request = axum::http::Request::get(path_and_query).header(FORWARDED_HEADER, "1");
    if let Some(authorization) = authorization {
        request = request.header(header::AUTHORIZATION, authorization);
    }
    let Ok(request) = request.body(axum::body::Body::empty()) else {
        return Forwarded {
            status: 400,
            content_type: "application/json".into(),
            retry_after: None,
            body: br#"{"error":"bad forwarded request"}"#.to_vec(),
        };
    };
    let response = match router.oneshot(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    let (parts, body) = response.into_parts();
    let header_text = |name: header::HeaderName| {
        parts
            .headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(str::to_string)
    };
    let content_type =
        header_text(header::CONTENT_TYPE).unwrap_or_else(|| "application/json".into());
    let retry_after = header_text(header::RETRY_AFTER);
    let status = parts.status.as_u16();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .map(|bytes| bytes.to_vec())
        .unwrap_or_default();
    Forwarded {
        status,
        content_type,
        retry_after,
        body,
    }
}

/// An API error: a status and `{"error": "..."}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }

    fn not_found(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

type Params = Query<HashMap<String, String>>;

/// What the API handlers read: the live state, and the longest list an answer may hold.
#[derive(Clone)]
struct Api {
    state: Arc<dyn KpiSource>,
    /// The binary's registry: every metric of the engine, this crate's collector included.
    registry: Registry,
    max_rows: usize,
    cluster: Option<Arc<dyn Cluster>>,
}

/// `?limit=` (default and at most `max_rows`) and `?offset=` (default 0).
fn rows(params: &HashMap<String, String>, max_rows: usize) -> Result<Rows, ApiError> {
    let number = |name: &str, default: usize| -> Result<usize, ApiError> {
        match params.get(name) {
            None => Ok(default),
            Some(text) => text.parse().map_err(|_| {
                ApiError::bad_request(format!(
                    "{name}: `{}` is not a whole number",
                    kpi_model::event::shown(text)
                ))
            }),
        }
    };
    let limit = number("limit", max_rows)?;
    if limit == 0 || limit > max_rows {
        return Err(ApiError::bad_request(format!(
            "limit: must be between 1 and {max_rows} (http.max_rows)"
        )));
    }
    Ok(Rows {
        offset: number("offset", 0)?,
        limit,
    })
}

/// The tenant named by `?tenant=` (default `default`), which must be known: configured, or
/// seen in at least one event.
fn known_tenant(
    state: &dyn KpiSource,
    params: &HashMap<String, String>,
) -> Result<String, ApiError> {
    let tenant = params
        .get("tenant")
        .map(String::as_str)
        .unwrap_or("default");
    if !is_valid_tenant(tenant) {
        return Err(ApiError::bad_request(format!(
            "tenant: `{tenant}` is not a tenant name [a-z0-9_-]{{1,64}}"
        )));
    }
    if !state.tenants().is_configured(tenant) && state.aggregates().tenant(tenant).is_none() {
        return Err(ApiError::not_found(format!("tenant `{tenant}` is unknown")));
    }
    Ok(tenant.to_string())
}

async fn kpis(State(api): State<Api>, Query(params): Params) -> Result<Json<KpiReport>, ApiError> {
    let state = &api.state;
    let tenant = known_tenant(state.as_ref(), &params)?;
    let rows = rows(&params, api.max_rows)?;
    let settings = state.tenants().get(&tenant);
    let period = match params.get("period") {
        Some(text) => text
            .parse::<Period>()
            .map_err(|error| ApiError::bad_request(format!("period: {error}")))?,
        None => Window::Month.period_of(settings.today(state.clock().now())),
    };
    let aggregates = state.aggregates();
    Ok(Json(KpiReport::build_rows(
        &tenant,
        &settings.currency,
        aggregates.tenant(&tenant),
        period,
        rows,
    )))
}

async fn retention(
    State(api): State<Api>,
    Query(params): Params,
) -> Result<Json<RetentionReport>, ApiError> {
    let state = &api.state;
    let tenant = known_tenant(state.as_ref(), &params)?;
    let year = match params.get("year") {
        Some(text) => parse_year("year", text)?,
        None => state
            .tenants()
            .get(&tenant)
            .today(state.clock().now())
            .year(),
    };
    let aggregates = state.aggregates();
    Ok(Json(RetentionReport::build(
        &tenant,
        aggregates.tenant(&tenant),
        year,
    )))
}

/// Most periods one series answer holds (SPEC section 3).
pub const MAX_SERIES_PERIODS: u64 = 400;
/// Most years one retention series answer holds (SPEC section 3).
pub const MAX_SERIES_YEARS: i32 = 100;

/// A year parameter (four digits).
fn parse_year(name: &str, text: &str) -> Result<i32, ApiError> {
    text.parse::<i32>()
        .ok()
        .filter(|year| (1000..=9999).contains(year))
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "{name}: `{}` is not a year such as 2026",
                kpi_model::event::shown(text)
            ))
        })
}

/// A required query parameter.
fn required<'p>(params: &'p HashMap<String, String>, name: &str) -> Result<&'p str, ApiError> {
    params
        .get(name)
        .map(String::as_str)
        .ok_or_else(|| ApiError::bad_request(format!("{name}: missing")))
}

/// A period parameter of the series' granularity.
fn series_period(
    params: &HashMap<String, String>,
    name: &str,
    window: Window,
) -> Result<Period, ApiError> {
    let text = required(params, name)?;
    let period = text
        .parse::<Period>()
        .map_err(|error| ApiError::bad_request(format!("{name}: {error}")))?;
    if period.window() != window {
        return Err(ApiError::bad_request(format!(
            "{name}: `{}` is not a {} period (granularity={})",
            kpi_model::event::shown(text),
            window.label(),
            window.label()
        )));
    }
    Ok(period)
}

/// The scope of a series: `channel=C` or `campaign=K` (not both), or the blended total.
fn series_scope(params: &HashMap<String, String>) -> Result<Scope, ApiError> {
    let named = |name: &str| -> Result<Option<String>, ApiError> {
        match params.get(name) {
            None => Ok(None),
            Some(value) if value.is_empty() || value.chars().any(char::is_control) => {
                Err(ApiError::bad_request(format!(
                    "{name}: `{}` is not a {name} name",
                    kpi_model::event::shown(value)
                )))
            }
            Some(value) => Ok(Some(value.clone())),
        }
    };
    match (named("channel")?, named("campaign")?) {
        (Some(_), Some(_)) => Err(ApiError::bad_request(
            "channel, campaign: give one of them, not both",
        )),
        (Some(channel), None) if channel == "all" => Ok(Scope::Total),
        (Some(channel), None) => Ok(Scope::Channel(channel)),
        (None, Some(campaign)) => Ok(Scope::Campaign(campaign)),
        (None, None) => Ok(Scope::Total),
    }
}

async fn kpi_series(
    State(api): State<Api>,
    Query(params): Params,
) -> Result<Json<KpiSeries>, ApiError> {
    let state = &api.state;
    let tenant = known_tenant(state.as_ref(), &params)?;
    let granularity = required(&params, "granularity")?;
    let window = Window::from_label(granularity)
        .filter(|window| *window != Window::All)
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "granularity: `{}` is not one of day, week, month, quarter, year",
                kpi_model::event::shown(granularity)
            ))
        })?;
    let from = series_period(&params, "from", window)?;
    let to = series_period(&params, "to", window)?;
    if from > to {
        return Err(ApiError::bad_request(format!(
            "from: `{from}` comes after to `{to}`"
        )));
    }
    let count = from.count_through(to);
    if count > MAX_SERIES_PERIODS {
        return Err(ApiError::bad_request(format!(
            "from, to: {count} periods asked, at most {MAX_SERIES_PERIODS} per answer"
        )));
    }
    let scope = series_scope(&params)?;
    let settings = state.tenants().get(&tenant);
    let aggregates = state.aggregates();
    Ok(Json(KpiSeries::build(
        &tenant,
        &settings.currency,
        aggregates.tenant(&tenant),
        &scope,
        from,
        to,
    )))
}

async fn retention_series(
    State(api): State<Api>,
    Query(params): Params,
) -> Result<Json<RetentionSeries>, ApiError> {
    let state = &api.state;
    let tenant = known_tenant(state.as_ref(), &params)?;
    let from = parse_year("from", required(&params, "from")?)?;
    let to = parse_year("to", required(&params, "to")?)?;
    if from > to {
        return Err(ApiError::bad_request(format!(
            "from: {from} comes after to {to}"
        )));
    }
    if to - from + 1 > MAX_SERIES_YEARS {
        return Err(ApiError::bad_request(format!(
            "from, to: {} years asked, at most {MAX_SERIES_YEARS} per answer",
            to - from + 1
        )));
    }
    let aggregates = state.aggregates();
    Ok(Json(RetentionSeries::build(
        &tenant,
        aggregates.tenant(&tenant),
        from..=to,
    )))
}

async fn tenants(State(api): State<Api>, Query(params): Params) -> Result<Response, ApiError> {
    let rows = rows(&params, api.max_rows)?;
    let mut names: std::collections::BTreeSet<String> = api
        .state
        .tenants()
        .configured()
        .map(|(name, _)| name.clone())
        .collect();
    // With several engines, the other engines' partitions are asked first; this engine's
    // tenants are those of the partitions it showed then.
    let local = match &api.cluster {
        None => None,
        Some(cluster) => match cluster.remote_tenants().await {
            Ok(remote) => {
                names.extend(remote.tenants);
                Some(remote.local)
            }
            Err(error) => {
                return Ok(unavailable(format!(
                    "the tenant list needs every partition: {error}; retry in a moment"
                )))
            }
        },
    };
    names.extend(
        api.state
            .aggregates()
            .tenants
            .keys()
            .filter(|name| match (&local, api.state.partition_of(name)) {
                (Some(local), Some(partition)) => local.contains(&partition),
                _ => api.state.exports(name),
            })
            .cloned(),
    );
    let page = Page::of(rows, &[("tenants", names.len())]);
    let names: Vec<String> = names
        .into_iter()
        .skip(rows.offset)
        .take(rows.limit)
        .collect();
    Ok(Json(match page {
        None => json!({ "tenants": names }),
        Some(page) => json!({ "tenants": names, "page": page }),
    })
    .into_response())
}

/// The OpenAPI 3.1 description of this API (`GET /api/v1/openapi.json`).
pub const OPENAPI: &str = include_str!("openapi.json");

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

/// `GET /`: the KPI page of a tenant and period (see [`page`]).
async fn home(State(api): State<Api>, Query(params): Params) -> Response {
    let state = &api.state;
    let aggregates = state.aggregates();
    let mut names: std::collections::BTreeSet<String> = state
        .tenants()
        .configured()
        .map(|(name, _)| name.clone())
        .collect();
    names.extend(
        aggregates
            .tenants
            .keys()
            .filter(|name| state.exports(name))
            .cloned(),
    );
    let tenants: Vec<String> = names.into_iter().take(api.max_rows).collect();
    let html = |status: StatusCode, body: String| {
        (
            status,
            [
                (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            body,
        )
            .into_response()
    };
    // Without `?tenant=`, `default` if it is known, else the first known tenant.
    let tenant = match params.get("tenant") {
        Some(tenant) => tenant.clone(),
        None if tenants.iter().any(|t| t == "default") || tenants.is_empty() => {
            "default".to_string()
        }
        None => tenants[0].clone(),
    };
    if tenants.is_empty() {
        return html(
            StatusCode::OK,
            page::message(
                "No data yet",
                "The engine has not applied any event yet. Publish events (see the README), or run `kpi demo`.",
                None,
                None,
            ),
        );
    }
    let settings = state.tenants().get(&tenant);
    let today = settings.today(state.clock().now());
    let mut query = page::PageQuery {
        tenant: tenant.clone(),
        period: Window::Month.period_of(today),
    };
    let known = is_valid_tenant(&tenant)
        && (state.tenants().is_configured(&tenant) || aggregates.tenant(&tenant).is_some());
    let data = page::PageData {
        tenants,
        tenant: &tenant,
        currency: &settings.currency,
        today,
        aggregates: aggregates.tenant(&tenant),
        cac_threshold: &settings.cac_threshold,
    };
    if !known {
        return html(
            StatusCode::NOT_FOUND,
            page::message(
                "Unknown tenant",
                &format!(
                    "tenant `{}` is unknown: pick one above",
                    kpi_model::event::shown(&tenant)
                ),
                Some(&query),
                Some(&data),
            ),
        );
    }
    if let Some(text) = params.get("period") {
        match text.parse::<Period>() {
            Ok(period) => query.period = period,
            Err(error) => {
                return html(
                    StatusCode::BAD_REQUEST,
                    page::message(
                        "Bad period",
                        &format!("period: {error}"),
                        Some(&query),
                        Some(&data),
                    ),
                )
            }
        }
    }
    html(StatusCode::OK, page::render(&query, &data))
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

async fn readyz(State(state): State<Arc<dyn KpiSource>>) -> Response {
    if state.is_ready() {
        (StatusCode::OK, Json(json!({ "status": "ready" }))).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "not ready", "reason": "waiting for NATS, the stream and consumer, or the start-up rebuild" })),
        )
            .into_response()
    }
}

async fn metrics_text(State(api): State<Api>) -> Response {
    // Gathering reads every exported tenant's figures under the aggregates' lock: on a
    // blocking thread, so that a large scrape never holds up the engine's async tasks (its
    // lease renewals among them).
    let registry = api.registry.clone();
    let encoded = tokio::task::spawn_blocking(move || {
        let families = registry.gather();
        let mut body = Vec::new();
        TextEncoder::new()
            .encode(&families, &mut body)
            .map(|()| body)
            .map_err(|error| error.to_string())
    })
    .await
    .unwrap_or_else(|error| Err(error.to_string()));
    match encoded {
        Ok(body) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], body).into_response(),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, error).into_response(),
    }
}

async fn not_found() -> ApiError {
    ApiError::not_found(
        "no such endpoint; see /api/v1/openapi.json for the API, /metrics, /healthz, /readyz, and / for the KPI page",
    )
}

/// What [`Webhooks::receive`] returns: events accepted, or a status and a message.
pub type WebhookReply<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<usize, (u16, String)>> + Send + 'a>>;

/// Receives `POST /webhooks/{connector_id}` (implemented by the connectors crate).
pub trait Webhooks: Send + Sync + 'static {
    /// Verifies and publishes one request.
    fn receive<'a>(
        &'a self,
        connector_id: &'a str,
        signature: Option<&'a str>,
        body: &'a [u8],
    ) -> WebhookReply<'a>;
}

async fn webhook(
    State(webhooks): State<Arc<dyn Webhooks>>,
    axum::extract::Path(connector_id): axum::extract::Path<String>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let signature = headers
        .get("x-kpi-signature")
        .and_then(|value| value.to_str().ok());
    match webhooks.receive(&connector_id, signature, &body).await {
        Ok(accepted) => {
            (StatusCode::ACCEPTED, Json(json!({ "accepted": accepted }))).into_response()
        }
        Err((status, message)) => ApiError {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
            message,
        }
        .into_response(),
    }
}

/// What the server reads and serves: this engine's KPIs, the other engines' (several
/// engines), and the binary's metrics registry.
pub struct Sources {
    pub local: Arc<dyn KpiSource>,
    pub cluster: Option<Arc<dyn Cluster>>,
    pub registry: Registry,
}

/// The routes, over the shared state: everything but the health probes under `limits`.
pub fn router(
    sources: Sources,
    webhooks: Option<Arc<dyn Webhooks>>,
    basic_auth: Option<Arc<security::BasicAuth>>,
    limits: &server::Limits,
) -> Router {
    let Sources {
        local: state,
        cluster,
        registry,
    } = sources;
    // The routes about one tenant, which another engine may have to answer.
    let by_tenant = Router::new()
        .route("/", get(home))
        .route("/api/v1/kpis", get(kpis))
        .route("/api/v1/kpis/series", get(kpi_series))
        .route("/api/v1/retention", get(retention))
        .route("/api/v1/retention/series", get(retention_series))
        .route_layer(axum::middleware::from_fn_with_state(
            Routing {
                state: state.clone(),
                cluster: cluster.clone(),
            },
            route_tenant,
        ));
    let mut protected = Router::new()
        .route("/api/v1/openapi.json", get(openapi))
        .route("/metrics", get(metrics_text))
        .route("/api/v1/tenants", get(tenants))
        .merge(by_tenant);
    if let Some(auth) = basic_auth {
        protected = protected.route_layer(axum::middleware::from_fn_with_state(
            auth,
            security::require_basic_auth,
        ));
    }
    let mut limited = protected.fallback(not_found).with_state(Api {
        state: state.clone(),
        registry,
        max_rows: limits.max_rows,
        cluster,
    });
    if let Some(webhooks) = webhooks {
        limited = limited.merge(
            Router::new()
                .route("/webhooks/{connector_id}", axum::routing::post(webhook))
                .with_state(webhooks),
        );
    }
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
        .merge(server::limited(limited, limits))
}

/// Binds `addr` (port 0 picks a free port) and returns the bound address and the server task;
/// with `security.tls`, it speaks HTTPS only.
pub async fn serve(
    addr: SocketAddr,
    sources: Sources,
    webhooks: Option<Arc<dyn Webhooks>>,
    security: security::Security,
    limits: server::Limits,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<(
    SocketAddr,
    tokio::task::JoinHandle<std::io::Result<()>>,
    Router,
)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = router(sources, webhooks, security.basic_auth, &limits);
    let task = tokio::spawn(server::run(
        listener,
        app.clone(),
        security.tls,
        limits,
        shutdown,
    ));
    Ok((bound, task, app))
}
