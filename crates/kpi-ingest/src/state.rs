//! The live view of the engine shared by the ingest (the only writer) and the HTTP server.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, RwLock, RwLockReadGuard};

use crate::cluster::ClusterView;

use kpi_model::{Aggregates, Clock, Tenants};
use kpi_store::CounterKey;
use prometheus::{
    Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntGauge, Opts, Registry,
};

/// Engine health metrics (`kpi_engine_*`).
pub struct EngineMetrics {
    pub batch_commit_seconds: Histogram,
    pub batch_events: Histogram,
    pub checkpoint_records: Histogram,
    /// Time in each stage: per batch `fetch` (waiting for and collecting messages), `apply`
    /// (decode and apply in memory), `dead_letter` (republish rejected messages); per
    /// checkpoint `commit` (sled write and flush) and `ack`.
    pub batch_stage_seconds: HistogramVec,
    pub event_latency_seconds: Histogram,
    pub consumer_pending: IntGauge,
    pub consumer_ack_pending: IntGauge,
    pub last_event_timestamp: Gauge,
    pub nats_connected: IntGauge,
    pub ready: IntGauge,
    pub recoveries_total: IntCounter,
    pub rebuild_seconds: Gauge,
    pub store_records: IntGauge,
}

fn register<T: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: T) -> T {
    // Names are static and distinct: registration cannot collide.
    let _ = registry.register(Box::new(metric.clone()));
    metric
}

impl EngineMetrics {
    fn new(registry: &Registry) -> Result<EngineMetrics, prometheus::Error> {
        let latency_buckets = vec![
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ];
        Ok(EngineMetrics {
            batch_commit_seconds: register(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "kpi_engine_batch_commit_seconds",
                        "Time to write a checkpoint (the records changed since the last one) to the store and flush it to disk",
                    )
                    .buckets(latency_buckets.clone()),
                )?,
            ),
            batch_events: register(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new("kpi_engine_batch_events", "Messages per committed batch")
                        .buckets(vec![1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 5000.0]),
                )?,
            ),
            batch_stage_seconds: register(
                registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "kpi_engine_batch_stage_seconds",
                        "Time per batch spent in each stage of the ingest",
                    )
                    .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0]),
                    &["stage"],
                )?,
            ),
            checkpoint_records: register(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "kpi_engine_checkpoint_records",
                        "Records written per checkpoint (each once, however many events changed it)",
                    )
                    .buckets(vec![1.0, 10.0, 100.0, 1000.0, 5000.0, 10000.0, 20000.0, 50000.0]),
                )?,
            ),
            event_latency_seconds: register(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "kpi_engine_event_latency_seconds",
                        "From the event's arrival in JetStream to its effect on the aggregates",
                    )
                    .buckets(latency_buckets),
                )?,
            ),
            consumer_pending: register(
                registry,
                IntGauge::new(
                    "kpi_engine_consumer_pending_messages",
                    "Messages in the stream not yet delivered to the engine's consumer",
                )?,
            ),
            consumer_ack_pending: register(
                registry,
                IntGauge::new(
                    "kpi_engine_consumer_ack_pending_messages",
                    "Messages delivered to the engine and not yet acknowledged",
                )?,
            ),
            last_event_timestamp: register(
                registry,
                Gauge::new(
                    "kpi_engine_last_event_timestamp_seconds",
                    "Unix time at which the engine last applied an event",
                )?,
            ),
            nats_connected: register(
                registry,
                IntGauge::new("kpi_engine_nats_connected", "1 while connected to NATS")?,
            ),
            ready: register(
                registry,
                IntGauge::new(
                    "kpi_engine_ready",
                    "1 once connected, with stream and consumer in place and aggregates rebuilt",
                )?,
            ),
            recoveries_total: register(
                registry,
                IntCounter::with_opts(Opts::new(
                    "kpi_engine_recoveries_total",
                    "Times the engine re-read delivered but unacknowledged messages from the stream",
                ))?,
            ),
            rebuild_seconds: register(
                registry,
                Gauge::new(
                    "kpi_engine_rebuild_seconds",
                    "Time the last start-up took to rebuild the aggregates from the store",
                )?,
            ),
            store_records: register(
                registry,
                IntGauge::new(
                    "kpi_engine_store_records",
                    "Entity records in the store at the last rebuild",
                )?,
            ),
        })
    }
}

/// Shared state: aggregates, event counters, readiness, metrics.
pub struct EngineState {
    pub tenants: Tenants,
    /// "Now" for every date decision (current periods, the future-time check).
    pub clock: Clock,
    pub metrics: EngineMetrics,
    aggregates: RwLock<Aggregates>,
    counters: RwLock<BTreeMap<CounterKey, u64>>,
    ready: AtomicBool,
    /// Multi-engine mode: which partitions this engine owns and exports.
    cluster: OnceLock<Arc<ClusterView>>,
}

impl EngineState {
    /// The engine's state, its metrics registered in `registry` (the binary's).
    pub fn new(
        tenants: Tenants,
        clock: Clock,
        registry: &Registry,
    ) -> Result<EngineState, prometheus::Error> {
        let metrics = EngineMetrics::new(registry)?;
        Ok(EngineState {
            tenants,
            clock,
            metrics,
            aggregates: RwLock::new(Aggregates::default()),
            counters: RwLock::new(BTreeMap::new()),
            ready: AtomicBool::new(false),
            cluster: OnceLock::new(),
        })
    }

    pub fn aggregates(&self) -> RwLockReadGuard<'_, Aggregates> {
        self.aggregates.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn counters(&self) -> RwLockReadGuard<'_, BTreeMap<CounterKey, u64>> {
        self.counters.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Ready: consuming (stream and consumer there, start-up rebuild done) and connected to
    /// NATS right now; a lost connection makes the engine unready at once, not when the next
    /// fetch times out.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
            && self.metrics.nats_connected.get() == 1
            && self.cluster().is_none_or(|cluster| cluster.is_caught_up())
    }

    /// Multi-engine mode: this engine's view of the partitions (once set at start).
    pub fn cluster(&self) -> Option<&Arc<ClusterView>> {
        self.cluster.get()
    }

    /// Turns multi-engine mode on (once; its metrics are [`crate::cluster::ClusterCollector`]).
    pub fn set_cluster(&self, cluster: Arc<ClusterView>) {
        let _ = self.cluster.set(cluster);
    }

    /// Whether this engine shows `tenant` (on /metrics and in the API): always with one
    /// engine; in multi-engine mode only when it owns the tenant's partition and has caught up
    /// on it.
    pub fn exports(&self, tenant: &str) -> bool {
        self.cluster().is_none_or(|cluster| cluster.exports(tenant))
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
        self.metrics.ready.set(i64::from(self.is_ready()));
    }

    /// The NATS connection was made or lost (from the client's events).
    pub fn set_nats_connected(&self, connected: bool) {
        self.metrics.nats_connected.set(i64::from(connected));
        self.metrics.ready.set(i64::from(self.is_ready()));
    }

    /// Replaces everything (start-up rebuild).
    pub fn reset(&self, aggregates: Aggregates, counters: BTreeMap<CounterKey, u64>) {
        *self.aggregates.write().unwrap_or_else(|e| e.into_inner()) = aggregates;
        *self.counters.write().unwrap_or_else(|e| e.into_inner()) = counters;
    }

    /// Applies a committed batch.
    pub fn apply(&self, delta: Aggregates, counters: &BTreeMap<CounterKey, u64>) {
        self.aggregates
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .merge(delta);
        let mut current = self.counters.write().unwrap_or_else(|e| e.into_inner());
        for (key, value) in counters {
            current.insert(key.clone(), *value);
        }
    }
}
