//! The connectors of `kpi serve`: one task per connector, so a connector never runs twice at
//! once; a run every `every`; after a failed run, the next one comes sooner with exponential
//! back-off (transient errors: 5xx, rate limits, NATS) or at the usual interval (credentials,
//! configuration), and never later than `every`.
//!
//! Metrics (`connector` is the configured id):
//! - `kpi_connector_runs_total{connector,outcome}`: outcome `success` or `error`;
//! - `kpi_connector_last_success_timestamp_seconds{connector}` (from the saved state after a
//!   restart; the engine's start while no success is known);
//! - `kpi_connector_last_run_duration_seconds{connector}`;
//! - `kpi_connector_events_total{connector}`: events JetStream stored;
//! - `kpi_connector_up{connector}`: 1 if the last run succeeded;
//! - `kpi_connector_interval_seconds{connector}`: its `every` (for "gone silent" alerts);
//! - `kpi_connector_api_sunset_timestamp_seconds{connector}`: when the platform switches off
//!   the API version it calls (kinds with versions; see [`crate::versions`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use chrono::Utc;
use prometheus::{GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::runner::Runner;
use crate::state::StateBucket;

/// The `kpi_connector_*` metrics.
#[derive(Clone)]
pub struct ConnectorMetrics {
    pub runs: IntCounterVec,
    pub last_success: GaugeVec,
    pub last_duration: GaugeVec,
    pub events: IntCounterVec,
    pub up: IntGaugeVec,
    pub interval: GaugeVec,
    pub api_sunset: GaugeVec,
}

impl ConnectorMetrics {
    pub fn new(registry: &Registry) -> Result<ConnectorMetrics, prometheus::Error> {
        let metrics = ConnectorMetrics {
            runs: IntCounterVec::new(
                Opts::new(
                    "kpi_connector_runs_total",
                    "Connector runs by outcome (success, error)",
                ),
                &["connector", "outcome"],
            )?,
            last_success: GaugeVec::new(
                Opts::new(
                    "kpi_connector_last_success_timestamp_seconds",
                    "Unix time of the connector's last successful run",
                ),
                &["connector"],
            )?,
            last_duration: GaugeVec::new(
                Opts::new(
                    "kpi_connector_last_run_duration_seconds",
                    "Duration of the connector's last run",
                ),
                &["connector"],
            )?,
            events: IntCounterVec::new(
                Opts::new(
                    "kpi_connector_events_total",
                    "Events the connector published that JetStream stored (not duplicates)",
                ),
                &["connector"],
            )?,
            up: IntGaugeVec::new(
                Opts::new(
                    "kpi_connector_up",
                    "1 if the connector's last run succeeded, else 0",
                ),
                &["connector"],
            )?,
            interval: GaugeVec::new(
                Opts::new(
                    "kpi_connector_interval_seconds",
                    "The connector's configured poll interval (every)",
                ),
                &["connector"],
            )?,
            api_sunset: GaugeVec::new(
                Opts::new(
                    "kpi_connector_api_sunset_timestamp_seconds",
                    "Unix time at which the platform switches off the API version the connector calls",
                ),
                &["connector"],
            )?,
        };
        registry.register(Box::new(metrics.runs.clone()))?;
        registry.register(Box::new(metrics.last_success.clone()))?;
        registry.register(Box::new(metrics.last_duration.clone()))?;
        registry.register(Box::new(metrics.events.clone()))?;
        registry.register(Box::new(metrics.up.clone()))?;
        registry.register(Box::new(metrics.interval.clone()))?;
        registry.register(Box::new(metrics.api_sunset.clone()))?;
        Ok(metrics)
    }

    /// Makes every configured connector's series exist from the start (a connector that never
    /// succeeded shows `runs_total{outcome="success"} 0`, which alert rules can see).
    fn declare(&self, runner: &Runner) {
        let connector = runner.id.as_str();
        self.interval
            .with_label_values(&[connector])
            .set(runner.interval.as_secs_f64());
        if let Some(version) = runner.api_sunset() {
            let sunset = version
                .sunset()
                .and_hms_opt(0, 0, 0)
                .unwrap_or_default()
                .and_utc();
            self.api_sunset
                .with_label_values(&[connector])
                .set(sunset.timestamp() as f64);
        }
        self.runs.with_label_values(&[connector, "success"]);
        self.runs.with_label_values(&[connector, "error"]);
        self.events.with_label_values(&[connector]);
        self.up.with_label_values(&[connector]).set(0);
        // Until a success is known (from the connector's saved state, or a run), the last
        // success is when the engine started waiting for one: a connector that never runs
        // well, or a webhook that never receives a request, goes silent like any other.
        self.last_success
            .with_label_values(&[connector])
            .set(Utc::now().timestamp_millis() as f64 / 1000.0);
    }
}

/// Runs the configured connectors until shutdown.
pub struct Scheduler {
    runners: Vec<Arc<Runner>>,
    metrics: ConnectorMetrics,
}

impl Scheduler {
    /// Schedules every runner that polls (webhooks receive through the HTTP server).
    pub fn new(runners: Vec<Runner>, metrics: ConnectorMetrics) -> Scheduler {
        for runner in &runners {
            metrics.declare(runner);
            if let Some(warning) = runner.api_warning() {
                warn!(connector = %runner.id, kind = %runner.kind, "{warning}");
            }
        }
        let runners: Vec<Runner> = runners.into_iter().filter(Runner::polls).collect();
        Scheduler {
            runners: runners.into_iter().map(Arc::new).collect(),
            metrics,
        }
    }

    /// Spawns one task per connector; they stop when `shutdown` turns true.
    pub fn spawn(
        self,
        js: jetstream::Context,
        states: StateBucket,
        shutdown: watch::Receiver<bool>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        self.runners
            .into_iter()
            .map(|runner| {
                let js = js.clone();
                let states = states.clone();
                let metrics = self.metrics.clone();
                let shutdown = shutdown.clone();
                tokio::spawn(run_forever(runner, js, states, metrics, shutdown))
            })
            .collect()
    }
}

async fn run_forever(
    runner: Arc<Runner>,
    js: jetstream::Context,
    states: StateBucket,
    metrics: ConnectorMetrics,
    mut shutdown: watch::Receiver<bool>,
) {
    let id = runner.id.clone();
    // The last success survives restarts: it is when the connector's state was last saved.
    if let Ok(Some((manifest, _))) = states.read(&id).await {
        if let Some(saved_at) = manifest.saved_at {
            metrics
                .last_success
                .with_label_values(&[&id])
                .set(saved_at.timestamp_millis() as f64 / 1000.0);
        }
    }
    let mut backoff = Duration::from_secs(5);
    loop {
        if *shutdown.borrow() {
            return;
        }
        let started = Instant::now();
        // A shutdown stops the run, which then releases its connector.
        let mut stop = shutdown.clone();
        let stopped = async move {
            let _ = stop.wait_for(|stop| *stop).await;
        };
        let outcome = runner.run(&js, &states, None, |_, _| {}, stopped).await;
        if matches!(outcome, Err(crate::ConnectError::Stopped)) {
            return;
        }
        metrics
            .last_duration
            .with_label_values(&[&id])
            .set(started.elapsed().as_secs_f64());
        let wait = match outcome {
            Ok(report) => {
                metrics.runs.with_label_values(&[&id, "success"]).inc();
                metrics
                    .events
                    .with_label_values(&[&id])
                    .inc_by(report.published);
                metrics
                    .last_success
                    .with_label_values(&[&id])
                    .set(Utc::now().timestamp_millis() as f64 / 1000.0);
                metrics.up.with_label_values(&[&id]).set(1);
                info!(connector = %id, since = %report.window.since, until = %report.window.until,
                    published = report.published, duplicates = report.duplicates,
                    unchanged = report.unchanged, withdrawn = report.withdrawn,
                    unchanged_events = report.unchanged_events, "connector run succeeded");
                backoff = Duration::from_secs(5);
                runner.interval
            }
            Err(error) => {
                metrics.runs.with_label_values(&[&id, "error"]).inc();
                metrics.up.with_label_values(&[&id]).set(0);
                let transient = error.is_transient();
                let wait = if transient {
                    let wait = match &error {
                        crate::ConnectError::RateLimited {
                            retry_after: Some(after),
                            ..
                        } => (*after).max(backoff),
                        _ => backoff,
                    };
                    backoff = (backoff * 2).min(Duration::from_secs(600));
                    wait.min(runner.interval)
                } else {
                    runner.interval
                };
                warn!(connector = %id, kind = %runner.kind, error = %runner.redact(&error.to_string()),
                    transient, retry_in_s = wait.as_secs(), "connector run failed");
                wait
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
    }
}
