//! `kpi serve`: wires the store, the ingest and the HTTP server, and shuts them down cleanly.
//!
//! Shutdown: SIGINT or SIGTERM flips a watch channel; the ingest finishes its current batch,
//! writes a checkpoint and acknowledges it, the HTTP server stops accepting, and the store is
//! flushed. A `kill -9` instead loses nothing either: unacknowledged messages come back.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use kpi_config::Config;
use kpi_connect::state::StateBucket;
use kpi_http::KpiCollector;
use kpi_ingest::{EngineState, Ingest};
use kpi_model::Clock;
use kpi_store::Store;
use tracing::{error, info};

pub async fn run(config_path: Option<&Path>, clock: Clock) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    // Connector params (`${ENV}` secrets included) are checked before anything starts.
    let runners = crate::connectors::build_all(&config, clock)?;
    info!(connectors = runners.len(), "configuration loaded");
    let store_path = config.store.path.clone();
    let cache = config.store.cache_capacity_mb * 1024 * 1024;
    let store = tokio::task::spawn_blocking(move || Store::open(&store_path, cache)).await??;

    check_store_mode(&store, &config).await?;
    // The binary's registry: the engine's, the cluster's, the KPIs', the connectors' and the
    // process's metrics.
    let registry = prometheus::Registry::new();
    let state = Arc::new(EngineState::new(config.tenants(), clock, &registry)?);
    // Multi-engine mode: the view exists before anything is shown, so that nothing of a
    // partition this engine does not own is (its store may hold an old copy).
    let cluster = if config.cluster.enabled {
        let view = Arc::new(
            kpi_ingest::cluster::ClusterView::new(
                config.cluster.engine_name(),
                config.cluster.partitions,
                config.nats.stream.clone(),
                Duration::from_millis(config.cluster.lease_ms),
            )
            .with_standbys(config.cluster.standby),
        );
        registry
            .register(Box::new(kpi_ingest::cluster::ClusterCollector::new(
                view.clone(),
            )?))
            .context("registering the cluster metrics")?;
        state.set_cluster(view);
        Some(Arc::new(ClusterLink::default()))
    } else {
        None
    };
    register_process_metrics(&registry).context("registering the process metrics")?;
    let source: Arc<dyn kpi_http::KpiSource> = Arc::new(Local(state.clone()));
    registry
        .register(Box::new(KpiCollector::new(
            source.clone(),
            config.metrics.clone(),
        )))
        .context("registering the KPI collector")?;

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let connector_metrics = kpi_connect::ConnectorMetrics::new(&registry)
        .context("registering the connector metrics")?;
    let webhooks = Arc::new(crate::connectors::webhooks(
        &config,
        connector_metrics.clone(),
        clock,
    )?);
    let http_webhooks: Option<Arc<dyn kpi_http::Webhooks>> = if webhooks.is_empty() {
        None
    } else {
        Some(Arc::new(crate::connectors::WebhookService(
            webhooks.clone(),
        )))
    };
    let security = http_security(&config)?;
    let scheme = if security.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let sources = kpi_http::Sources {
        local: source,
        cluster: cluster
            .clone()
            .map(|link| link as Arc<dyn kpi_http::Cluster>),
        registry,
    };
    let (address, http, router) = kpi_http::serve(
        config.listen_addr(),
        sources,
        http_webhooks,
        security,
        http_limits(&config),
        stopped.clone(),
    )
    .await
    .with_context(|| format!("http.listen: cannot listen on {}", config.http.listen))?;
    info!(%address, scheme, "HTTP server listening (/metrics, /api/v1/kpis, /api/v1/retention, /healthz, /readyz)");

    let filter = {
        let store = store.clone();
        let state = state.clone();
        tokio::task::spawn_blocking(move || kpi_ingest::load_state(&store, &state)).await??
    };

    let client = kpi_ingest::connect(&config, Some(state.clone())).await?;
    if let (Some(link), Some(view)) = (&cluster, state.cluster()) {
        let _ = link.0.set(kpi_ingest::cluster::Forwarder::new(
            client.clone(),
            view.clone(),
            Duration::from_secs(5),
        ));
        view.set_query_handler(Arc::new(move |query| {
            let router = router.clone();
            Box::pin(async move {
                let answer = kpi_http::answer_forwarded(
                    router,
                    &query.path_and_query,
                    query.authorization.as_deref(),
                )
                .await;
                kpi_ingest::cluster::QueryReply {
                    status: answer.status,
                    content_type: answer.content_type,
                    retry_after: answer.retry_after,
                    body: answer.body.into(),
                }
            })
        }));
    }
    webhooks.set_jetstream(async_nats::jetstream::new(client.clone()));
    let connector_ids: Vec<String> = runners.iter().map(|runner| runner.id.clone()).collect();
    let scheduler = kpi_connect::Scheduler::new(runners, connector_metrics);
    let connectors = tokio::spawn(start_connectors(
        scheduler,
        connector_ids,
        async_nats::jetstream::new(client.clone()),
        (
            config.nats.connector_state_bucket.clone(),
            config.nats.replicas,
        ),
        store.clone(),
        stopped.clone(),
    ));
    let ingest = Ingest::new(config, store.clone(), state, filter);
    let mut ingest_task = tokio::spawn(ingest.run(client, stopped));

    let outcome = tokio::select! {
        result = &mut ingest_task => Some(result),
        () = shutdown_signal() => None,
    };
    let _ = stop.send(true);
    let result = match outcome {
        Some(result) => result,
        None => {
            info!("shutting down");
            ingest_task.await
        }
    };
    let _ = http.await;
    if let Ok(tasks) = connectors.await {
        for task in tasks {
            let _ = task.await;
        }
    }
    tokio::task::spawn_blocking(move || store.flush()).await??;
    match result {
        Ok(Ok(())) => {
            info!("stopped");
            Ok(())
        }
        Ok(Err(ingest_error)) => {
            error!(error = %ingest_error, "ingest stopped");
            Err(ingest_error.into())
        }
        Err(join_error) => Err(join_error.into()),
    }
}

/// Multi-engine mode's link from the HTTP server to the other engines, set once NATS is
/// connected.
#[derive(Default)]
struct ClusterLink(std::sync::OnceLock<kpi_ingest::cluster::Forwarder>);

/// What the HTTP server reads on this engine: the ingest's live state.
struct Local(Arc<EngineState>);

impl kpi_http::KpiSource for Local {
    fn tenants(&self) -> &kpi_model::Tenants {
        &self.0.tenants
    }
    fn clock(&self) -> &Clock {
        &self.0.clock
    }
    fn aggregates(&self) -> std::sync::RwLockReadGuard<'_, kpi_model::Aggregates> {
        self.0.aggregates()
    }
    fn counters(
        &self,
    ) -> std::sync::RwLockReadGuard<'_, std::collections::BTreeMap<kpi_model::CounterKey, u64>>
    {
        self.0.counters()
    }
    fn exports(&self, tenant: &str) -> bool {
        self.0.exports(tenant)
    }
    fn partition_of(&self, tenant: &str) -> Option<u32> {
        self.0
            .cluster()
            .map(|cluster| kpi_model::partition_of(tenant, cluster.partitions))
    }
    fn exports_partition(&self, partition: u32) -> bool {
        self.0
            .cluster()
            .is_some_and(|cluster| cluster.exports_partition(partition))
    }
    fn is_ready(&self) -> bool {
        self.0.is_ready()
    }
}

impl kpi_http::Cluster for ClusterLink {
    fn forward<'a>(
        &'a self,
        tenant: &'a str,
        path_and_query: String,
        authorization: Option<String>,
    ) -> kpi_http::ClusterFuture<'a, kpi_http::Forwarded> {
        Box::pin(async move {
            let forwarder = self.0.get().ok_or("not connected to NATS yet")?;
            let reply = forwarder
                .query(
                    tenant,
                    kpi_ingest::cluster::ForwardedQuery {
                        path_and_query,
                        authorization,
                    },
                )
                .await
                .map_err(|error| error.to_string())?;
            Ok(kpi_http::Forwarded {
                status: reply.status,
                content_type: reply.content_type,
                retry_after: reply.retry_after,
                body: reply.body.to_vec(),
            })
        })
    }

    fn remote_tenants(&self) -> kpi_http::ClusterFuture<'_, kpi_http::RemoteTenants> {
        Box::pin(async move {
            let forwarder = self.0.get().ok_or("not connected to NATS yet")?;
            let (local, tenants) = forwarder
                .remote_tenants()
                .await
                .map_err(|error| error.to_string())?;
            Ok(kpi_http::RemoteTenants { local, tenants })
        })
    }
}

/// Refuses a store of the other mode: a single engine's store holds figures without the
/// partitions' applied sequences (multi-engine mode rebuilds from the stream into an empty
/// store), and a multi-engine store holds copies of partitions other engines moved on.
async fn check_store_mode(store: &Store, config: &Config) -> anyhow::Result<()> {
    let (partitions, empty) = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || {
            Ok::<_, kpi_store::StoreError>((store.partitions()?, store.is_empty_of_events()?))
        })
        .await??
    };
    let path = config.store.path.display();
    match (config.cluster.enabled, partitions) {
        (false, None) => Ok(()),
        (false, Some(_)) => anyhow::bail!(
            "store.path: {path} is the store of an engine in multi-engine mode; run this engine with the [cluster] settings it had, or give it another store.path"
        ),
        (true, Some(partitions)) if partitions == config.cluster.partitions => Ok(()),
        (true, Some(partitions)) => anyhow::bail!(
            "cluster.partitions: the store at {path} holds {partitions} partitions, not {}; give the engine an empty store.path to rebuild it",
            config.cluster.partitions
        ),
        (true, None) if !empty => anyhow::bail!(
            "store.path: {path} is a single engine's store; in multi-engine mode each engine starts from an empty store.path and rebuilds its partitions from the stream (README, \"Moving to several engines\")"
        ),
        (true, None) => {
            let store = store.clone();
            let partitions = config.cluster.partitions;
            tokio::task::spawn_blocking(move || store.set_partitions(partitions)).await??;
            Ok(())
        }
    }
}

/// Opens the connectors' state bucket once NATS answers, moves there what earlier versions
/// kept in the store, and starts the connectors; returns their tasks.
async fn start_connectors(
    scheduler: kpi_connect::Scheduler,
    connector_ids: Vec<String>,
    js: async_nats::jetstream::Context,
    (bucket, replicas): (String, usize),
    store: Store,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let states = loop {
        match StateBucket::open(&js, &bucket, replicas, "kpi serve").await {
            Ok(states) => break states,
            Err(error) => {
                tracing::warn!(%error, "connector state bucket unavailable; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = stopped.wait_for(|stop| *stop) => return Vec::new(),
                }
            }
        }
    };
    for id in connector_ids {
        if let Err(error) = move_connector_state(&states, &store, &id).await {
            error!(connector = %id, %error, "could not move the connector's state to the key-value bucket; it starts from the store's copy next time");
        }
    }
    scheduler.spawn(js, states, stopped)
}

/// Moves a connector's state from the store (where versions before the key-value bucket kept
/// it) to the bucket, once.
async fn move_connector_state(states: &StateBucket, store: &Store, id: &str) -> anyhow::Result<()> {
    let legacy = {
        let store = store.clone();
        let id = id.to_string();
        tokio::task::spawn_blocking(move || store.connector_state(&id)).await??
    };
    let Some(bytes) = legacy else {
        return Ok(());
    };
    if states.import(id, &bytes).await? {
        info!(connector = %id, bucket = %states.name(), bytes = bytes.len(), "moved the connector's state from the store to the key-value bucket");
    } else {
        info!(connector = %id, bucket = %states.name(), "the key-value bucket already has the connector's state; the store's older copy is dropped");
    }
    let store = store.clone();
    let id = id.to_string();
    tokio::task::spawn_blocking(move || store.remove_connector_state(&id)).await??;
    Ok(())
}

/// The HTTP server's limits, from `[http]`.
fn http_limits(config: &Config) -> kpi_http::server::Limits {
    let http = &config.http;
    kpi_http::server::Limits {
        request_timeout: Duration::from_millis(http.request_timeout_ms),
        idle_timeout: Duration::from_millis(http.idle_timeout_ms),
        max_connections: http.max_connections,
        max_concurrent_requests: http.max_concurrent_requests,
        max_body_bytes: http.max_body_bytes,
        max_rows: http.max_rows,
        shutdown_timeout: Duration::from_millis(http.shutdown_timeout_ms),
    }
}

/// Basic auth and TLS of the HTTP server, from `[http]`.
pub(crate) fn http_security(config: &Config) -> anyhow::Result<kpi_http::security::Security> {
    let basic_auth =
        config
            .http
            .basic_auth()
            .map_err(anyhow::Error::msg)?
            .map(|(username, password)| {
                Arc::new(kpi_http::security::BasicAuth::new(&username, &password))
            });
    let tls = match (&config.http.tls_cert_file, &config.http.tls_key_file) {
        (Some(cert), Some(key)) => {
            Some(kpi_http::security::tls_config(cert, key).map_err(anyhow::Error::msg)?)
        }
        _ => None,
    };
    Ok(kpi_http::security::Security { basic_auth, tls })
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(_) => return interrupt.await.unwrap_or(()),
            };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    interrupt.await.unwrap_or(());
}

/// `process_*` (CPU seconds, resident memory, open files, start time, from the prometheus
/// crate's process collector) and `kpi_build_info{version,revision}` at 1.
fn register_process_metrics(registry: &prometheus::Registry) -> Result<(), prometheus::Error> {
    registry.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ))?;
    let build_info = prometheus::IntGaugeVec::new(
        prometheus::Opts::new(
            "kpi_build_info",
            "The engine's version and source revision (always 1)",
        ),
        &["version", "revision"],
    )?;
    build_info
        .with_label_values(&[env!("CARGO_PKG_VERSION"), env!("KPI_REVISION")])
        .set(1);
    registry.register(Box::new(build_info))
}

/// `kpi config check`: what `serve` checks before it starts (the configuration, every
/// connector's params and `${ENV}` secrets, the HTTP password file and TLS files), then the
/// effective configuration, secrets masked, on standard output.
pub fn check_config(config_path: Option<&Path>, clock: Clock) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    let runners = crate::connectors::build_all(&config, clock)?;
    http_security(&config)?;
    let effective = Config::effective(config_path, std::env::vars())?;
    println!(
        "{}",
        toml::to_string_pretty(&effective).context("printing the configuration")?
    );
    eprintln!(
        "configuration OK: {} tenant(s) configured, {} connector(s)",
        config.tenants.len(),
        runners.len()
    );
    Ok(())
}
