//! Connector state in a JetStream key-value bucket (`KPI_CONNECTORS` by default), beside the
//! event log it describes, not in the engine's store: rebuilding the store (an empty
//! `store.path`) keeps every cursor, and a foreground `kpi connectors run` works while
//! `kpi serve` runs.
//!
//! ## Layout
//!
//! - `<connector id>`: the manifest (JSON): the generation of the saved state, how many parts
//!   it has, when it was saved, and the lease of the run that holds the connector, if any;
//! - `<connector id>.part.<tag>.<n>`: the state itself (the runner's JSON, compressed
//!   with LZ4), cut in parts of at most 256 KiB so that a large state fits any server's
//!   `max_payload`.
//!
//! ## Two runs never interleave
//!
//! Every write of the manifest is a compare-and-set on the revision the writer read last. A
//! run starts by writing its lease into the manifest (refused while another live run holds
//! it), renews it while it works, and ends by writing the manifest of its new state (parts
//! first, under a tag no other writer uses: the generation and the revision of the writer's
//! own lease), which also clears the lease. If anyone else wrote the manifest in between, the
//! compare-and-set fails and nothing of the run's state is kept; the events it published are
//! de-duplicated by their ids. A run that loses its lease (someone else wrote the manifest, or
//! it could not renew before expiry) stops before publishing. A run stopped by a shutdown
//! releases its lease; one left by a process that was killed expires after [`LEASE`].

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tracing::{debug, info, warn};

use crate::ConnectError;

/// How long a lease lasts without renewal.
pub const LEASE: Duration = Duration::from_secs(120);
/// How often a run renews its lease.
const RENEW_EVERY: Duration = Duration::from_secs(30);
/// Largest part of a saved state.
const PART_BYTES: usize = 256 * 1024;

fn state_error(message: impl std::fmt::Display) -> ConnectError {
    ConnectError::State(message.to_string())
}

/// Who runs a connector: `host:pid:token`, and what for (`kpi serve`, `kpi connectors run`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub owner: String,
    pub by: String,
    pub since: DateTime<Utc>,
    pub until: DateTime<Utc>,
}

/// The manifest of a connector's saved state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub generation: u64,
    /// Names the parts of this state (`<id>.part.<tag>.<n>`).
    #[serde(default)]
    pub tag: String,
    pub parts: u32,
    /// Size of the (uncompressed) state.
    pub bytes: usize,
    pub saved_at: Option<DateTime<Utc>>,
    pub lease: Option<Lease>,
}

/// This process, as a lease owner.
#[derive(Clone, Debug)]
struct Owner {
    host: String,
    pid: u32,
    token: String,
    by: String,
}

impl Owner {
    fn new(by: &str) -> Owner {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|name| name.trim().to_string())
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "unknown-host".into());
        let token = format!(
            "{:x}",
            Utc::now().timestamp_nanos_opt().unwrap_or(0) ^ i64::from(std::process::id())
        );
        Owner {
            host,
            pid: std::process::id(),
            token,
            by: by.to_string(),
        }
    }

    fn id(&self) -> String {
        format!("{}:{}:{}", self.host, self.pid, self.token)
    }

    /// Whether `lease` may be taken: it expired, or it is this process's own. Liveness is
    /// not guessed from process ids, which containers reuse and hide.
    fn may_take_over(&self, lease: &Lease, now: DateTime<Utc>) -> bool {
        lease.until <= now || lease.owner == self.id()
    }
}

/// The bucket of connector states.
#[derive(Clone)]
pub struct StateBucket {
    kv: kv::Store,
    name: String,
    owner: Owner,
}

impl std::fmt::Debug for StateBucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateBucket")
            .field("name", &self.name)
            .finish()
    }
}

fn part_key(connector: &str, tag: &str, index: u32) -> String {
    format!("{connector}.part.{tag}.{index}")
}

impl StateBucket {
    /// Opens `bucket`, creating it when absent (file storage, `replicas` replicas). `by` names
    /// this process in the leases it takes (`kpi serve`, `kpi connectors run`).
    pub async fn open(
        js: &jetstream::Context,
        bucket: &str,
        replicas: usize,
        by: &str,
    ) -> Result<StateBucket, ConnectError> {
        let kv = match js.get_key_value(bucket).await {
            Ok(kv) => kv,
            Err(_) => {
                // The stream of a key-value bucket (ADR-8), created directly:
                // `create_key_value` first reads the account info, which async-nats cannot
                // parse from nats-server 2.9.
                js.get_or_create_stream(jetstream::stream::Config {
                    name: format!("KV_{bucket}"),
                    description: Some("KPI engine: connector cursors and what they sent".into()),
                    subjects: vec![format!("$KV.{bucket}.>")],
                    max_messages_per_subject: 5,
                    storage: jetstream::stream::StorageType::File,
                    num_replicas: replicas.max(1),
                    allow_rollup: true,
                    deny_delete: true,
                    allow_direct: true,
                    discard: jetstream::stream::DiscardPolicy::New,
                    duplicate_window: Duration::from_secs(120),
                    ..Default::default()
                })
                .await
                .map_err(|error| state_error(format!("key-value bucket {bucket}: {error}")))?;
                js.get_key_value(bucket)
                    .await
                    .map_err(|error| state_error(format!("key-value bucket {bucket}: {error}")))?
            }
        };
        Ok(StateBucket {
            kv,
            name: bucket.to_string(),
            owner: Owner::new(by),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    async fn manifest(&self, connector: &str) -> Result<Option<(Manifest, u64)>, ConnectError> {
        let entry = self
            .kv
            .entry(connector)
            .await
            .map_err(|error| state_error(format!("reading {connector}: {error}")))?;
        match entry {
            Some(entry) if entry.operation == kv::Operation::Put => {
                let manifest: Manifest = serde_json::from_slice(&entry.value).map_err(|error| {
                    state_error(format!("{connector}: unreadable manifest, {error}"))
                })?;
                Ok(Some((manifest, entry.revision)))
            }
            // Deleted or purged: as if never saved, but its revision still guards the writes.
            Some(entry) => Ok(Some((Manifest::default(), entry.revision))),
            None => Ok(None),
        }
    }

    /// Writes `manifest` if the key is still at `revision` (`None`: if it does not exist).
    async fn swap(
        &self,
        connector: &str,
        manifest: &Manifest,
        revision: Option<u64>,
    ) -> Result<Option<u64>, ConnectError> {
        let value = Bytes::from(serde_json::to_vec(manifest).map_err(state_error)?);
        let lost = |error: &dyn std::fmt::Display| {
            debug!(connector, %error, "compare-and-set lost");
            Ok(None)
        };
        match revision {
            Some(revision) => match self.kv.update(connector, value, revision).await {
                Ok(revision) => Ok(Some(revision)),
                Err(error) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    lost(&error)
                }
                Err(error) => Err(state_error(format!("writing {connector}: {error}"))),
            },
            None => match self.kv.create(connector, value).await {
                Ok(revision) => Ok(Some(revision)),
                Err(error) if error.kind() == kv::CreateErrorKind::AlreadyExists => lost(&error),
                Err(error) => Err(state_error(format!("writing {connector}: {error}"))),
            },
        }
    }

    async fn read_parts(
        &self,
        connector: &str,
        manifest: &Manifest,
    ) -> Result<Vec<u8>, ConnectError> {
        let mut compressed = Vec::new();
        for index in 0..manifest.parts {
            let key = part_key(connector, &manifest.tag, index);
            let part = self
                .kv
                .get(key.clone())
                .await
                .map_err(|error| state_error(format!("reading {key}: {error}")))?
                .ok_or_else(|| state_error(format!("{key} is missing")))?;
            compressed.extend_from_slice(&part);
        }
        if compressed.is_empty() {
            return Ok(Vec::new());
        }
        lz4_flex::decompress_size_prepended(&compressed)
            .map_err(|error| state_error(format!("{connector}: unreadable state, {error}")))
    }

    /// The saved state of `connector` and its manifest, if it has any (for `kpi connectors
    /// state`).
    pub async fn read(&self, connector: &str) -> Result<Option<(Manifest, Vec<u8>)>, ConnectError> {
        match self.manifest(connector).await? {
            Some((manifest, _)) if manifest.parts > 0 || manifest.lease.is_some() => {
                let state = self.read_parts(connector, &manifest).await?;
                Ok(Some((manifest, state)))
            }
            _ => Ok(None),
        }
    }

    /// Takes `connector` for one run: its state and a lease, renewed until the run commits or
    /// releases. Refused (a transient error: the scheduler retries later) while another live
    /// run holds it.
    pub async fn acquire(&self, connector: &str) -> Result<Held, ConnectError> {
        let now = Utc::now();
        let current = self.manifest(connector).await?;
        let (manifest, revision) = match current {
            Some((manifest, revision)) => (manifest, Some(revision)),
            None => (Manifest::default(), None),
        };
        if let Some(lease) = &manifest.lease {
            if !self.owner.may_take_over(lease, now) {
                return Err(ConnectError::Busy(format!(
                    "connector `{connector}` is being run by {} ({}) since {}; its lease ends at {} unless renewed",
                    lease.by,
                    lease.owner,
                    lease.since.to_rfc3339(),
                    lease.until.to_rfc3339()
                )));
            }
            warn!(connector, owner = %lease.owner, "taking over the lease of a run that is gone");
        }
        let state = self.read_parts(connector, &manifest).await?;
        let mut leased = manifest.clone();
        leased.lease = Some(Lease {
            owner: self.owner.id(),
            by: self.owner.by.clone(),
            since: now,
            until: now + chrono::Duration::from_std(LEASE).unwrap_or_default(),
        });
        let Some(revision) = self.swap(connector, &leased, revision).await? else {
            return Err(ConnectError::Busy(format!(
                "connector `{connector}` was taken by another run at the same moment"
            )));
        };
        let shared = Arc::new(Mutex::new(Lock {
            revision,
            manifest: leased,
            ended: false,
            lost: false,
        }));
        let renewal = tokio::spawn(renew(self.clone(), connector.to_string(), shared.clone()));
        Ok(Held {
            bucket: self.clone(),
            connector: connector.to_string(),
            previous: manifest.clone(),
            state: (!state.is_empty()).then_some(state),
            lock: shared,
            renewal,
        })
    }

    /// Saves `state` for `connector` unless it already has one (moving a state kept
    /// elsewhere); returns whether it was saved.
    pub async fn import(&self, connector: &str, state: &[u8]) -> Result<bool, ConnectError> {
        if self.manifest(connector).await?.is_some() {
            return Ok(false);
        }
        let held = self.acquire(connector).await?;
        held.commit(state.to_vec()).await?;
        Ok(true)
    }

    /// Forgets everything `connector` saved (its next run starts from scratch). Refused while
    /// a live run holds it.
    pub async fn reset(&self, connector: &str) -> Result<bool, ConnectError> {
        let Some((manifest, revision)) = self.manifest(connector).await? else {
            return Ok(false);
        };
        if let Some(lease) = &manifest.lease {
            if !self.owner.may_take_over(lease, Utc::now()) {
                return Err(ConnectError::Busy(format!(
                    "connector `{connector}` is being run by {} ({}); reset it once that run ends",
                    lease.by, lease.owner
                )));
            }
        }
        let cleared = Manifest {
            generation: manifest.generation + 1,
            ..Manifest::default()
        };
        if self
            .swap(connector, &cleared, Some(revision))
            .await?
            .is_none()
        {
            return Err(ConnectError::Busy(format!(
                "connector `{connector}` was written by a run meanwhile; try again"
            )));
        }
        self.remove_parts(connector, &manifest.tag, manifest.parts)
            .await;
        Ok(true)
    }

    async fn remove_parts(&self, connector: &str, tag: &str, parts: u32) {
        for index in 0..parts {
            let key = part_key(connector, tag, index);
            if let Err(error) = self.kv.purge(key.clone()).await {
                debug!(%key, %error, "old state part not removed");
            }
        }
    }

    /// Connectors with a saved state or a lease (for listings).
    pub async fn connectors(&self) -> Result<Vec<String>, ConnectError> {
        let mut keys = self
            .kv
            .keys()
            .await
            .map_err(|error| state_error(format!("listing {}: {error}", self.name)))?;
        let mut names = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(state_error)?;
            if !key.contains('.') {
                names.push(key);
            }
        }
        names.sort();
        Ok(names)
    }
}

/// The lease and the revision a run last wrote.
struct Lock {
    revision: u64,
    manifest: Manifest,
    ended: bool,
    /// Someone else wrote the manifest, or the lease expired unrenewed.
    lost: bool,
}

async fn renew(bucket: StateBucket, connector: String, lock: Arc<Mutex<Lock>>) {
    loop {
        tokio::time::sleep(RENEW_EVERY).await;
        let mut lock = lock.lock().await;
        if lock.ended {
            return;
        }
        let now = Utc::now();
        let mut manifest = lock.manifest.clone();
        if let Some(lease) = &mut manifest.lease {
            lease.until = now + chrono::Duration::from_std(LEASE).unwrap_or_default();
        }
        match bucket
            .swap(&connector, &manifest, Some(lock.revision))
            .await
        {
            Ok(Some(revision)) => {
                lock.revision = revision;
                lock.manifest = manifest;
            }
            Ok(None) => {
                warn!(connector, "lost the lease: another run wrote the state");
                lock.lost = true;
                return;
            }
            Err(error) => {
                let until = lock.manifest.lease.as_ref().map(|lease| lease.until);
                let margin = chrono::Duration::from_std(RENEW_EVERY).unwrap_or_default();
                if until.is_none_or(|until| now + margin >= until) {
                    warn!(connector, %error, "lease not renewed before it ends: the run stops");
                    lock.lost = true;
                    return;
                }
                warn!(connector, %error, "lease not renewed; trying again");
            }
        }
    }
}

/// A connector taken for one run.
pub struct Held {
    bucket: StateBucket,
    connector: String,
    /// The manifest the run started from.
    previous: Manifest,
    state: Option<Vec<u8>>,
    lock: Arc<Mutex<Lock>>,
    renewal: tokio::task::JoinHandle<()>,
}

impl Held {
    /// The state the previous successful run saved.
    pub fn state(&self) -> Option<&[u8]> {
        self.state.as_deref()
    }

    /// Whether the run no longer holds the connector (it must not publish or save).
    pub async fn is_lost(&self) -> bool {
        self.lock.lock().await.lost
    }

    async fn end(&self) -> tokio::sync::MutexGuard<'_, Lock> {
        let mut lock = self.lock.lock().await;
        lock.ended = true;
        self.renewal.abort();
        lock
    }

    /// Saves `state` and ends the lease; fails, keeping nothing, if another run wrote the
    /// state meanwhile.
    pub async fn commit(self, state: Vec<u8>) -> Result<(), ConnectError> {
        let lock = self.end().await;
        if lock.lost {
            return Err(state_error(format!(
                "connector `{}`: this run lost its lease; its state was not saved",
                self.connector
            )));
        }
        let generation = lock.manifest.generation.max(self.previous.generation) + 1;
        // The revision of this run's own last write: no other writer can use the same tag.
        let tag = format!("{generation}-{}", lock.revision);
        let compressed = lz4_flex::compress_prepend_size(&state);
        let chunks: Vec<&[u8]> = compressed.chunks(PART_BYTES).collect();
        for (index, chunk) in chunks.iter().enumerate() {
            let key = part_key(&self.connector, &tag, index as u32);
            self.bucket
                .kv
                .put(key.clone(), Bytes::copy_from_slice(chunk))
                .await
                .map_err(|error| state_error(format!("writing {key}: {error}")))?;
        }
        let manifest = Manifest {
            generation,
            tag: tag.clone(),
            parts: chunks.len() as u32,
            bytes: state.len(),
            saved_at: Some(Utc::now()),
            lease: None,
        };
        match self
            .bucket
            .swap(&self.connector, &manifest, Some(lock.revision))
            .await?
        {
            Some(_) => {
                self.bucket
                    .remove_parts(&self.connector, &self.previous.tag, self.previous.parts)
                    .await;
                Ok(())
            }
            None => {
                self.bucket
                    .remove_parts(&self.connector, &tag, chunks.len() as u32)
                    .await;
                Err(state_error(format!(
                    "connector `{}`: another run saved its state while this one ran; this run's state was not saved (its events are published and de-duplicated)",
                    self.connector
                )))
            }
        }
    }

    /// Ends the lease and keeps the saved state as it was (a failed run).
    pub async fn release(self) {
        let lock = self.end().await;
        let mut manifest = lock.manifest.clone();
        manifest.lease = None;
        match self
            .bucket
            .swap(&self.connector, &manifest, Some(lock.revision))
            .await
        {
            Ok(Some(_)) => {}
            Ok(None) => info!(connector = %self.connector, "lease already taken over"),
            Err(error) => {
                warn!(connector = %self.connector, %error, "lease not released; it expires")
            }
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.renewal.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .expect("valid")
            .with_timezone(&Utc)
    }

    fn lease(owner: &str, until: &str) -> Lease {
        Lease {
            owner: owner.into(),
            by: "kpi serve".into(),
            since: at("2026-12-01T10:00:00Z"),
            until: at(until),
        }
    }

    #[test]
    fn a_lease_is_taken_over_only_once_expired_or_from_this_very_process() {
        let me = Owner {
            host: "engine-0".into(),
            pid: 1,
            token: "b".into(),
            by: "kpi serve".into(),
        };
        let now = at("2026-12-01T10:05:00Z");
        assert!(!me.may_take_over(&lease("engine-1:1:a", "2026-12-01T10:10:00Z"), now));
        assert!(me.may_take_over(&lease("engine-1:1:a", "2026-12-01T10:04:59Z"), now));
        // The same host and pid is not enough (containers reuse pid 1): only the same token.
        assert!(!me.may_take_over(&lease("engine-0:1:a", "2026-12-01T10:10:00Z"), now));
        assert!(me.may_take_over(&lease("engine-0:1:b", "2026-12-01T10:10:00Z"), now));
    }
}
