//! Multi-engine mode, what the rest of the engine sees of it: which partitions this engine
//! exports, their metrics, and queries for the tenants of other engines' partitions, sent to
//! their owner over NATS request/reply.
//!
//! An engine *exports* a partition (its tenants on /metrics and in the API) while it holds
//! the partition's lease, has caught up on it, and sent its last successful renewal less than
//! three quarters of a lease ago (the *fence*). Another engine can take the lease only once it
//! has expired on the server (a whole lease after the server stored the last renewal, so after
//! it was sent) or was given back, and must then catch up before it exports: two engines never
//! export one partition at the same time, whatever happens to the network between them, as
//! long as the NATS servers' clocks agree within a quarter of a lease.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use bytes::Bytes;
use futures_util::StreamExt;
use kpi_model::partition_of;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntCounterVec, IntGaugeVec, Opts};
use tracing::{debug, warn};

use crate::EngineState;

/// A partition this engine holds the lease of.
#[derive(Clone, Debug)]
struct Held {
    /// Applied every message the partition held when the engine took it.
    caught_up: bool,
    /// When the lease was taken.
    taken: Instant,
    /// When the last successful renewal was sent.
    renewed: Instant,
    /// Messages of the partition not yet applied (from the last delivery's metadata).
    lag: u64,
}

/// A partition this engine follows as a standby: applied, never exported.
#[derive(Clone, Debug, Default)]
struct Followed {
    /// Applied every message the partition held when the engine started following it.
    caught_up: bool,
    lag: u64,
}

#[derive(Default)]
struct Inner {
    held: BTreeMap<u32, Held>,
    standby: BTreeMap<u32, Followed>,
    /// Joined running engines and applying its share before taking it.
    warming: bool,
    /// Engines seen alive at the last membership read (this one included).
    engines: usize,
    /// The first round of membership and claims is done.
    settled: bool,
    takeovers: u64,
}

/// A query forwarded to this engine: the request's path and query, and its `Authorization`.
pub struct ForwardedQuery {
    pub path_and_query: String,
    pub authorization: Option<String>,
}

/// The answer to a forwarded query.
pub struct QueryReply {
    pub status: u16,
    pub content_type: String,
    pub retry_after: Option<String>,
    pub body: Bytes,
}

/// Answers a forwarded query locally (set by the binary, which owns the HTTP router).
pub type QueryHandler =
    Arc<dyn Fn(ForwardedQuery) -> Pin<Box<dyn Future<Output = QueryReply> + Send>> + Send + Sync>;

/// Headers of a forwarded query's reply.
const STATUS_HEADER: &str = "Kpi-Status";
const RETRY_AFTER_HEADER: &str = "Kpi-Retry-After";
const AUTHORIZATION_HEADER: &str = "Kpi-Authorization";

/// This engine's view of the partitions, shared by the ingest (the only writer), the HTTP
/// server and the metrics.
pub struct ClusterView {
    pub engine: String,
    pub partitions: u32,
    /// `nats.stream`: names the subjects of forwarded queries, so two deployments on one NATS
    /// account stay apart.
    pub stream: String,
    pub lease: Duration,
    /// `cluster.standby`: the standby gauges are exported only with it.
    pub standbys: bool,
    inner: Mutex<Inner>,
    handler: OnceLock<QueryHandler>,
}

impl ClusterView {
    pub fn new(engine: String, partitions: u32, stream: String, lease: Duration) -> ClusterView {
        ClusterView {
            engine,
            partitions,
            stream,
            lease,
            standbys: true,
            inner: Mutex::new(Inner::default()),
            handler: OnceLock::new(),
        }
    }

    /// With `cluster.standby` off, no standby gauge is exported (so no alert counts
    /// partitions without one).
    pub fn with_standbys(mut self, standbys: bool) -> ClusterView {
        self.standbys = standbys;
        self
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How long after its last renewal was sent a partition stays exported.
    fn fence(&self) -> Duration {
        self.lease * 3 / 4
    }

    /// How long after taking a partition this engine waits before exporting it, caught up or
    /// not: the engine that gave it back stopped exporting it before, and this margin keeps
    /// the two apart for anyone comparing scrapes of both taken a moment apart.
    fn grace(&self) -> Duration {
        self.lease / 4
    }

    fn is_exported(&self, held: &Held, now: Instant) -> bool {
        held.caught_up && now >= held.taken + self.grace() && now < held.renewed + self.fence()
    }

    /// Whether this engine exports `partition` right now.
    pub fn exports_partition(&self, partition: u32) -> bool {
        let now = Instant::now();
        self.inner()
            .held
            .get(&partition)
            .is_some_and(|held| self.is_exported(held, now))
    }

    /// Whether this engine exports `tenant`'s partition right now.
    pub fn exports(&self, tenant: &str) -> bool {
        self.exports_partition(partition_of(tenant, self.partitions))
    }

    /// The partitions this engine exports right now.
    pub fn exported(&self) -> Vec<u32> {
        let now = Instant::now();
        self.inner()
            .held
            .iter()
            .filter(|(_, held)| self.is_exported(held, now))
            .map(|(partition, _)| *partition)
            .collect()
    }

    /// The partitions this engine holds the lease of.
    pub fn held(&self) -> Vec<u32> {
        self.inner().held.keys().copied().collect()
    }

    /// Ready: the first round of claims is done and every partition held is caught up.
    pub fn is_caught_up(&self) -> bool {
        let inner = self.inner();
        inner.settled && inner.held.values().all(|held| held.caught_up)
    }

    pub(crate) fn settle(&self, engines: usize) {
        let mut inner = self.inner();
        inner.settled = true;
        inner.engines = engines;
    }

    pub(crate) fn take(&self, partition: u32, renewed: Instant) {
        let mut inner = self.inner();
        inner.takeovers += 1;
        inner.held.insert(
            partition,
            Held {
                caught_up: false,
                taken: renewed,
                renewed,
                lag: 0,
            },
        );
    }

    pub(crate) fn renewed(&self, partition: u32, at: Instant) {
        if let Some(held) = self.inner().held.get_mut(&partition) {
            held.renewed = at;
        }
    }

    pub(crate) fn drop_partition(&self, partition: u32) {
        self.inner().held.remove(&partition);
    }

    pub(crate) fn caught_up(&self, partition: u32) {
        let mut inner = self.inner();
        if let Some(held) = inner.held.get_mut(&partition) {
            held.caught_up = true;
        } else if let Some(followed) = inner.standby.get_mut(&partition) {
            followed.caught_up = true;
        }
    }

    pub(crate) fn set_lag(&self, partition: u32, lag: u64) {
        let mut inner = self.inner();
        if let Some(held) = inner.held.get_mut(&partition) {
            held.lag = lag;
        } else if let Some(followed) = inner.standby.get_mut(&partition) {
            followed.lag = lag;
        }
    }

    /// Starts following `partition` as a standby.
    pub(crate) fn follow(&self, partition: u32) {
        self.inner().standby.insert(partition, Followed::default());
    }

    /// Stops following `partition` as a standby; returns whether it had caught up on it.
    pub(crate) fn unfollow(&self, partition: u32) -> bool {
        self.inner()
            .standby
            .remove(&partition)
            .is_some_and(|followed| followed.caught_up)
    }

    /// The partitions followed as a standby.
    pub fn following(&self) -> Vec<u32> {
        self.inner().standby.keys().copied().collect()
    }

    /// Whether this engine follows at least one partition and has caught up on every one.
    pub(crate) fn standbys_caught_up(&self) -> bool {
        let inner = self.inner();
        !inner.standby.is_empty() && inner.standby.values().all(|followed| followed.caught_up)
    }

    pub(crate) fn set_warming(&self, warming: bool) {
        self.inner().warming = warming;
    }

    /// Messages not yet applied, over the partitions held.
    pub fn total_lag(&self) -> u64 {
        self.inner().held.values().map(|held| held.lag).sum()
    }

    /// Sets how forwarded queries are answered here (once).
    pub fn set_query_handler(&self, handler: QueryHandler) {
        let _ = self.handler.set(handler);
    }

    fn query_subject(&self, partition: u32) -> String {
        format!("kpi.cluster.{}.query.{partition}", self.stream)
    }

    fn tenants_subject(&self, partition: u32) -> String {
        format!("kpi.cluster.{}.tenants.{partition}", self.stream)
    }
}

/// Why a forwarded query got no answer.
#[derive(Debug, thiserror::Error)]
#[error("partition {partition} has no engine answering: {reason}")]
pub struct Unavailable {
    pub partition: u32,
    pub reason: String,
}

/// Sends queries for the tenants this engine does not export to the engine that does.
#[derive(Clone)]
pub struct Forwarder {
    client: async_nats::Client,
    view: Arc<ClusterView>,
    timeout: Duration,
}

impl Forwarder {
    pub fn new(client: async_nats::Client, view: Arc<ClusterView>, timeout: Duration) -> Self {
        Forwarder {
            client,
            view,
            timeout,
        }
    }

    pub fn view(&self) -> &Arc<ClusterView> {
        &self.view
    }

    /// Sends a query about `tenant` to the engine exporting its partition.
    pub async fn query(
        &self,
        tenant: &str,
        query: ForwardedQuery,
    ) -> Result<QueryReply, Unavailable> {
        let partition = partition_of(tenant, self.view.partitions);
        let unavailable = |reason: String| Unavailable { partition, reason };
        let mut headers = HeaderMap::new();
        if let Some(authorization) = &query.authorization {
            headers.insert(AUTHORIZATION_HEADER, authorization.as_str());
        }
        let request = async_nats::Request::new()
            .payload(Bytes::from(query.path_and_query))
            .headers(headers)
            .timeout(Some(self.timeout));
        let message = self
            .client
            .send_request(self.view.query_subject(partition), request)
            .await
            .map_err(|error| unavailable(error.to_string()))?;
        let headers = message.headers.unwrap_or_default();
        let header = |name: &str| headers.get(name).map(|value| value.as_str().to_string());
        let status = header(STATUS_HEADER)
            .and_then(|status| status.parse().ok())
            .ok_or_else(|| unavailable("a reply without a status".into()))?;
        Ok(QueryReply {
            status,
            content_type: header("Content-Type").unwrap_or_else(|| "application/json".into()),
            retry_after: header(RETRY_AFTER_HEADER),
            body: message.payload,
        })
    }

    /// The tenants of every partition this engine does not export, from their owners, with
    /// the partitions it exported when it asked; fails naming the first partition without
    /// an owner.
    pub async fn remote_tenants(&self) -> Result<(Vec<u32>, Vec<String>), Unavailable> {
        let exported = self.view.exported();
        let requests = (0..self.view.partitions)
            .filter(|partition| !exported.contains(partition))
            .map(|partition| {
                let client = self.client.clone();
                let subject = self.view.tenants_subject(partition);
                let timeout = self.timeout;
                async move {
                    let reply =
                        tokio::time::timeout(timeout, client.request(subject, Bytes::new()))
                            .await
                            .map_err(|_| Unavailable {
                                partition,
                                reason: "no answer in time".into(),
                            })?
                            .map_err(|error| Unavailable {
                                partition,
                                reason: error.to_string(),
                            })?;
                    serde_json::from_slice::<Vec<String>>(&reply.payload).map_err(|error| {
                        Unavailable {
                            partition,
                            reason: error.to_string(),
                        }
                    })
                }
            });
        let answers = futures_util::future::join_all(requests).await;
        let mut tenants = Vec::new();
        for answer in answers {
            tenants.extend(answer?);
        }
        Ok((exported, tenants))
    }
}

/// The responders of the partitions this engine exports: one task per partition, answering
/// forwarded queries and tenant lists; started when the partition is caught up, stopped before
/// its lease is given back.
pub(crate) struct Responders {
    client: async_nats::Client,
    state: Arc<EngineState>,
    view: Arc<ClusterView>,
    tasks: BTreeMap<u32, tokio::task::JoinHandle<()>>,
}

impl Responders {
    pub(crate) fn new(
        client: async_nats::Client,
        state: Arc<EngineState>,
        view: Arc<ClusterView>,
    ) -> Self {
        Responders {
            client,
            state,
            view,
            tasks: BTreeMap::new(),
        }
    }

    /// Answers for exactly the partitions exported now.
    pub(crate) fn sync(&mut self) {
        let exported = self.view.exported();
        self.tasks.retain(|partition, task| {
            let keep = exported.contains(partition) && !task.is_finished();
            if !keep {
                task.abort();
            }
            keep
        });
        for partition in exported {
            self.tasks.entry(partition).or_insert_with(|| {
                tokio::spawn(respond(
                    self.client.clone(),
                    self.state.clone(),
                    self.view.clone(),
                    partition,
                ))
            });
        }
    }

    pub(crate) fn stop(&mut self, partition: u32) {
        if let Some(task) = self.tasks.remove(&partition) {
            task.abort();
        }
    }
}

impl Drop for Responders {
    fn drop(&mut self) {
        for task in self.tasks.values() {
            task.abort();
        }
    }
}

async fn respond(
    client: async_nats::Client,
    state: Arc<EngineState>,
    view: Arc<ClusterView>,
    partition: u32,
) {
    let (queries, tenants) = match (
        client.subscribe(view.query_subject(partition)).await,
        client.subscribe(view.tenants_subject(partition)).await,
    ) {
        (Ok(queries), Ok(tenants)) => (queries, tenants),
        (Err(error), _) | (_, Err(error)) => {
            warn!(partition, %error, "cannot answer the partition's queries");
            return;
        }
    };
    let mut queries = queries.fuse();
    let mut tenants = tenants.fuse();
    loop {
        tokio::select! {
            Some(message) = queries.next() => {
                let Some(reply) = message.reply else { continue };
                let Some(handler) = view.handler.get().cloned() else { continue };
                let client = client.clone();
                let view = view.clone();
                tokio::spawn(async move {
                    // An engine that no longer exports the partition (its responder not yet
                    // stopped) answers 503 late, so that the owner's answer comes first.
                    if !view.exports_partition(partition) {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    let authorization = message
                        .headers
                        .as_ref()
                        .and_then(|headers| headers.get(AUTHORIZATION_HEADER))
                        .map(|value| value.as_str().to_string());
                    let query = ForwardedQuery {
                        path_and_query: String::from_utf8_lossy(&message.payload).into_owned(),
                        authorization,
                    };
                    let answer = handler(query).await;
                    let mut headers = HeaderMap::new();
                    headers.insert(STATUS_HEADER, answer.status.to_string().as_str());
                    headers.insert("Content-Type", answer.content_type.as_str());
                    if let Some(retry_after) = &answer.retry_after {
                        headers.insert(RETRY_AFTER_HEADER, retry_after.as_str());
                    }
                    let limit = client.server_info().max_payload;
                    let body = if answer.body.len() + 512 > limit {
                        warn!(partition, bytes = answer.body.len(), limit, "a forwarded answer is larger than NATS max_payload; ask this engine directly");
                        headers.insert(STATUS_HEADER, "502");
                        headers.insert("Content-Type", "application/json");
                        Bytes::from(format!(
                            r#"{{"error":"the answer ({} bytes) is larger than NATS max_payload ({limit}): ask engine `{}`, which owns the tenant, directly"}}"#,
                            answer.body.len(),
                            view.engine
                        ))
                    } else {
                        answer.body
                    };
                    if let Err(error) = client.publish_with_headers(reply, headers, body).await {
                        warn!(%error, "a forwarded query's reply was not sent");
                    }
                });
            }
            Some(message) = tenants.next() => {
                let Some(reply) = message.reply else { continue };
                if !view.exports_partition(partition) {
                    continue;
                }
                let names: Vec<String> = state
                    .aggregates()
                    .tenants
                    .keys()
                    .filter(|tenant| partition_of(tenant, view.partitions) == partition)
                    .cloned()
                    .collect();
                let body = serde_json::to_vec(&names).unwrap_or_default();
                if let Err(error) = client.publish(reply, body.into()).await {
                    debug!(%error, "a tenant list was not sent");
                }
            }
            else => return,
        }
    }
}

/// The cluster metrics of SPEC section 5, read at every scrape (registered by the binary).
pub struct ClusterCollector {
    view: Arc<ClusterView>,
    owned: IntGaugeVec,
    lag: IntGaugeVec,
    standby: IntGaugeVec,
    standby_lag: IntGaugeVec,
    warming: IntGaugeVec,
    engines: IntGaugeVec,
    takeovers: IntCounterVec,
}

impl ClusterCollector {
    pub fn new(view: Arc<ClusterView>) -> Result<ClusterCollector, prometheus::Error> {
        Ok(ClusterCollector {
            view,
            owned: IntGaugeVec::new(
                Opts::new(
                    "kpi_engine_partition_owned",
                    "1 when this engine owns the partition and has caught up on it, else 0",
                ),
                &["engine", "partition"],
            )?,
            lag: IntGaugeVec::new(
                Opts::new(
                    "kpi_engine_partition_lag_messages",
                    "Messages of a partition this engine holds that it has not applied yet",
                ),
                &["engine", "partition"],
            )?,
            standby: IntGaugeVec::new(
                Opts::new(
                    "kpi_engine_partition_standby",
                    "1 when this engine follows the partition as a standby (applies it without exporting it) and has caught up on it, else 0 (exported with cluster.standby only)",
                ),
                &["engine", "partition"],
            )?,
            standby_lag: IntGaugeVec::new(
                Opts::new(
                    "kpi_engine_partition_standby_lag_messages",
                    "Messages of a partition this engine follows as a standby that it has not applied yet",
                ),
                &["engine", "partition"],
            )?,
            warming: IntGaugeVec::new(
                Opts::new(
                    "kpi_engine_warming",
                    "1 while this engine, joining running engines, applies the partitions it is to own before taking them",
                ),
                &["engine"],
            )?,
            engines: IntGaugeVec::new(
                Opts::new(
                    "kpi_engine_cluster_engines",
                    "Engines this engine sees running (itself included)",
                ),
                &["engine"],
            )?,
            takeovers: IntCounterVec::new(
                Opts::new(
                    "kpi_engine_partition_takeovers_total",
                    "Partitions this engine took ownership of since it started",
                ),
                &["engine"],
            )?,
        })
    }
}

impl Collector for ClusterCollector {
    fn desc(&self) -> Vec<&Desc> {
        let mut descs = self.owned.desc();
        descs.extend(self.lag.desc());
        descs.extend(self.standby.desc());
        descs.extend(self.standby_lag.desc());
        descs.extend(self.warming.desc());
        descs.extend(self.engines.desc());
        descs.extend(self.takeovers.desc());
        descs
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let view = &self.view;
        let engine = view.engine.as_str();
        self.owned.reset();
        self.lag.reset();
        self.standby.reset();
        self.standby_lag.reset();
        self.warming.reset();
        self.engines.reset();
        self.takeovers.reset();
        let exported = view.exported();
        for partition in 0..view.partitions {
            self.owned
                .with_label_values(&[engine, &partition.to_string()])
                .set(i64::from(exported.contains(&partition)));
        }
        {
            let inner = view.inner();
            for (partition, held) in &inner.held {
                self.lag
                    .with_label_values(&[engine, &partition.to_string()])
                    .set(held.lag as i64);
            }
            for partition in (0..view.partitions).filter(|_| view.standbys) {
                let followed = inner.standby.get(&partition);
                self.standby
                    .with_label_values(&[engine, &partition.to_string()])
                    .set(i64::from(
                        followed.is_some_and(|followed| followed.caught_up),
                    ));
            }
            for (partition, followed) in &inner.standby {
                self.standby_lag
                    .with_label_values(&[engine, &partition.to_string()])
                    .set(followed.lag as i64);
            }
            self.warming
                .with_label_values(&[engine])
                .set(i64::from(inner.warming));
            self.engines
                .with_label_values(&[engine])
                .set(inner.engines as i64);
            self.takeovers
                .with_label_values(&[engine])
                .inc_by(inner.takeovers);
        }
        let mut families = self.owned.collect();
        families.extend(self.lag.collect());
        families.extend(self.standby.collect());
        families.extend(self.standby_lag.collect());
        families.extend(self.warming.collect());
        families.extend(self.engines.collect());
        families.extend(self.takeovers.collect());
        families
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_is_exported_caught_up_past_the_grace_and_within_the_fence() {
        let view = ClusterView::new("a".into(), 4, "S".into(), Duration::from_secs(4));
        let now = Instant::now();
        view.take(1, now - Duration::from_millis(1100));
        view.renewed(1, now);
        assert!(!view.exports_partition(1), "not caught up yet");
        assert!(!view.is_caught_up(), "not settled yet");
        view.settle(1);
        assert!(!view.is_caught_up());
        view.caught_up(1);
        assert!(view.exports_partition(1));
        assert!(view.is_caught_up());
        assert_eq!(view.exported(), vec![1]);
        view.renewed(1, now - Duration::from_millis(2900));
        assert!(view.exports_partition(1), "renewed 0.725 lease ago");
        view.renewed(1, now - Duration::from_millis(3100));
        assert!(
            !view.exports_partition(1),
            "renewed 0.775 lease ago: fenced"
        );
        view.renewed(1, now);
        let tenant = (0..)
            .map(|n| format!("t{n}"))
            .find(|t| partition_of(t, 4) == 1)
            .expect("some tenant");
        assert!(view.exports(&tenant));
        view.drop_partition(1);
        assert!(!view.exports(&tenant));
        // Just taken and caught up at once: exported only a quarter of a lease after taking.
        view.take(2, now);
        view.caught_up(2);
        assert!(!view.exports_partition(2), "within the grace after taking");
        view.take(2, now - Duration::from_millis(1100));
        view.renewed(2, now);
        view.caught_up(2);
        assert!(view.exports_partition(2), "past the grace");
    }
}
