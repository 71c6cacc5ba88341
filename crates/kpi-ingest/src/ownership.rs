//! Who applies which partition: membership and leases in a JetStream key-value bucket, and the
//! assignment every engine computes the same way from the engines it sees.
//!
//! The bucket (`cluster.bucket`) keeps one revision per key for at most `cluster.lease_ms`:
//!
//! - `engines.<name>`: an engine's heartbeat (its instance, partitions and version), renewed
//!   five times per lease; an engine whose heartbeat expired is gone.
//! - `partitions.<n>`: the lease of partition `n`, `<name> <instance>`. An engine takes a
//!   lease by creating the key (only one create succeeds), keeps it by updating it at its
//!   revision, and gives it back by deleting it at its revision. A lease not renewed for a
//!   whole lease expires on the server.
//!
//! The assignment is a bounded-load rendezvous hash: each partition goes to the engine that
//! ranks it highest among those with room, every engine having room for `⌊P/N⌋` partitions and
//! `P mod N` of them for one more. Every engine thus owns `⌊P/N⌋` or `⌈P/N⌉` partitions, and
//! at least one when there are at least as many partitions as engines.
//!
//! With `cluster.standby`, a partition's *standby* is the engine that would own it if its
//! owner stopped ([`standbys`]); it applies the partition without exporting it. An engine
//! that joins running engines is *warming* (its heartbeat says so) until it has applied the
//! partitions it is to own: the others leave it out of the assignment until then.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures_util::StreamExt;
use kpi_config::Config;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::{js_error, IngestError};

/// FNV-1a 64 of `bytes`, then `partition` mixed in with SplitMix64's finaliser: a well-mixed
/// rank of an engine for a partition (plain FNV ranks cluster on similar names).
fn rank(engine: &str, partition: u32) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in engine.as_bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mut z = hash ^ u64::from(partition).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The owner of every partition `0..partitions` among `engines` (names, any order; duplicates
/// count once). Empty when there is no engine.
pub fn assign(engines: &[String], partitions: u32) -> Vec<String> {
    let mut engines: Vec<&String> = engines.iter().collect();
    engines.sort();
    engines.dedup();
    if engines.is_empty() {
        return Vec::new();
    }
    let count = engines.len();
    let floor = partitions as usize / count;
    let extra = partitions as usize % count;
    let mut load = vec![0usize; count];
    let mut extras_used = 0;
    let mut owners = Vec::with_capacity(partitions as usize);
    for partition in 0..partitions {
        let mut ranked: Vec<usize> = (0..count).collect();
        ranked.sort_by_key(|&index| std::cmp::Reverse((rank(engines[index], partition), index)));
        let chosen = ranked
            .into_iter()
            .find(|&index| load[index] < floor || (load[index] == floor && extras_used < extra))
            .unwrap_or(0);
        if load[chosen] == floor {
            extras_used += 1;
        }
        load[chosen] += 1;
        owners.push(engines[chosen].clone());
    }
    owners
}

/// The partitions `me` is a standby of: those that `assign` gives to another engine and would
/// give to `me` if any one engine stopped. That is mostly the stopped engine's own partitions
/// (each has one standby, the engine it goes to), plus the few that the bounded load moves
/// between the engines left (a second standby for them), so that every partition that changes
/// hands when one engine stops goes to an engine that has applied it.
pub fn standbys(engines: &[String], partitions: u32, me: &str) -> Vec<u32> {
    let owners = assign(engines, partitions);
    let mut others: Vec<&String> = engines.iter().filter(|engine| *engine != me).collect();
    others.sort();
    others.dedup();
    let mut mine = Vec::new();
    for gone in others {
        let rest: Vec<String> = engines
            .iter()
            .filter(|engine| *engine != gone)
            .cloned()
            .collect();
        let after = assign(&rest, partitions);
        mine.extend((0..partitions).filter(|&partition| {
            owners[partition as usize] != me && after[partition as usize] == me
        }));
    }
    mine.sort_unstable();
    mine.dedup();
    mine
}

/// An engine's heartbeat in the bucket.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct Heartbeat {
    instance: String,
    partitions: u32,
    version: String,
    /// Applying the partitions it is to own before it takes them.
    #[serde(default)]
    warming: bool,
}

/// A running engine, as its heartbeat shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Engine {
    pub(crate) name: String,
    pub(crate) warming: bool,
}

const ENGINES: &str = "engines.";
const PARTITIONS: &str = "partitions.";

/// This engine's membership and leases.
pub(crate) struct Membership {
    kv: kv::Store,
    pub(crate) engine: String,
    instance: String,
    partitions: u32,
    /// Revision of each lease held.
    leases: BTreeMap<u32, u64>,
    /// Joined running engines and not yet applied the partitions it is to own.
    pub(crate) warming: bool,
    /// The other engines' heartbeats as this engine read them.
    seen: Heartbeats,
}

/// The other engines' heartbeat revisions, each with when this engine first read it.
#[derive(Debug, Default)]
struct Heartbeats(BTreeMap<String, (u64, Instant)>);

impl Heartbeats {
    /// Records the heartbeats read at `now` (name and revision); returns the engines whose
    /// heartbeat was there at the last read and is not any more.
    fn read(&mut self, heartbeats: &[(String, u64)], now: Instant) -> Vec<String> {
        let mut seen = BTreeMap::new();
        for (name, revision) in heartbeats {
            let since = match self.0.get(name) {
                Some(&(known, since)) if known == *revision => since,
                _ => now,
            };
            seen.insert(name.clone(), (*revision, since));
        }
        let gone = self
            .0
            .keys()
            .filter(|name| !seen.contains_key(*name))
            .cloned()
            .collect();
        self.0 = seen;
        gone
    }

    /// The engine whose heartbeat has been read unchanged for the longest at `now`, if longer
    /// than `after`, and for how long.
    fn silent(&self, after: Duration, now: Instant) -> Option<(&str, Duration)> {
        self.0
            .iter()
            .map(|(name, (_, since))| (name.as_str(), now.saturating_duration_since(*since)))
            .filter(|(_, silent)| *silent > after)
            .max_by_key(|(_, silent)| *silent)
    }
}

impl Membership {
    /// Opens (or creates) the bucket and joins: refuses a `cluster.partitions` other than the
    /// running engines' and an engine name a running engine uses.
    pub(crate) async fn join(
        js: &jetstream::Context,
        config: &Config,
    ) -> Result<Membership, IngestError> {
        let cluster = &config.cluster;
        let lease = Duration::from_millis(cluster.lease_ms);
        let kv = match js.get_key_value(&cluster.bucket).await {
            Ok(kv) => kv,
            Err(_) => js
                .create_key_value(kv::Config {
                    bucket: cluster.bucket.clone(),
                    description: "KPI engines: membership and partition leases".into(),
                    history: 1,
                    max_age: lease,
                    storage: jetstream::stream::StorageType::File,
                    num_replicas: config.nats.replicas.max(1),
                    ..Default::default()
                })
                .await
                .map_err(js_error)?,
        };
        let max_age = kv.status().await.map_err(js_error)?.info.config.max_age;
        if max_age != lease {
            return Err(IngestError::Cluster(format!(
                "cluster.lease_ms: this engine has {} ms but the bucket {} expires entries after {} ms; every engine needs the same lease (or delete the bucket while no engine runs)",
                lease.as_millis(),
                cluster.bucket,
                max_age.as_millis()
            )));
        }
        let engine = cluster.engine_name();
        let mut membership = Membership {
            kv,
            instance: format!(
                "{}-{}",
                std::process::id(),
                chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0)
            ),
            engine,
            partitions: cluster.partitions,
            leases: BTreeMap::new(),
            warming: false,
            seen: Heartbeats::default(),
        };
        let running = membership.heartbeats().await?;
        for (name, heartbeat, _) in &running {
            if heartbeat.partitions != membership.partitions {
                return Err(IngestError::Cluster(format!(
                    "cluster.partitions: this engine has {} but the running engine `{name}` has {}; every engine needs the same number",
                    membership.partitions, heartbeat.partitions
                )));
            }
        }
        // Engines already running keep their partitions until this one has applied its share.
        membership.warming = cluster.standby
            && running.iter().any(|(name, heartbeat, _)| {
                *name != membership.engine
                    && heartbeat.partitions == membership.partitions
                    && !heartbeat.warming
            });
        membership.take_name(lease).await?;
        Ok(membership)
    }

    /// Writes the first heartbeat, only where no running engine has one under this name: the
    /// key is created if absent (or a graceful leave's purge marker), or replaced at the
    /// revision of a heartbeat that was not renewed for a lease (a killed engine's, this
    /// engine's last run say). Of two engines started at once under one name, one fails here.
    async fn take_name(&self, lease: Duration) -> Result<(), IngestError> {
        let key = format!("{ENGINES}{}", self.engine);
        let value = self.heartbeat_value();
        let in_use = || {
            IngestError::Cluster(format!(
                "cluster.engine: `{}` is the name of a running engine; give each engine its own name",
                self.engine
            ))
        };
        // Whether the name was taken; a NATS error is an error (the ingest retries).
        let created = |result: Result<u64, kv::CreateError>| match result {
            Ok(_) => Ok(true),
            Err(error) if error.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
            Err(error) => Err(js_error(error)),
        };
        if created(self.kv.create(&key, value.clone()).await)? {
            return Ok(());
        }
        let Some(entry) = self.kv.entry(&key).await.map_err(js_error)? else {
            // Expired in between: ours now, unless another engine was faster.
            return if created(self.kv.create(&key, value).await)? {
                Ok(())
            } else {
                Err(in_use())
            };
        };
        if self.is_own(&entry.value) {
            // Our own create, stored though its answer was lost.
            return Ok(());
        }
        // A heartbeat under this name: a running engine renews it; a killed one lets it
        // expire.
        info!(engine = %self.engine, "a heartbeat under this engine's name exists; waiting one lease to see if it is renewed");
        tokio::time::sleep(lease + lease / 5).await;
        let taken = match self.kv.entry(&key).await.map_err(js_error)? {
            Some(later) if later.revision != entry.revision => {
                if later.operation == kv::Operation::Put && !self.is_own(&later.value) {
                    return Err(in_use());
                }
                created(self.kv.create(&key, value).await)?
            }
            // Not renewed, not expired yet: replaced at its revision, if nobody else did.
            Some(_) => match self.kv.update(&key, value, entry.revision).await {
                Ok(_) => true,
                Err(error) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => false,
                Err(error) => return Err(js_error(error)),
            },
            None => created(self.kv.create(&key, value).await)?,
        };
        if taken {
            Ok(())
        } else {
            Err(in_use())
        }
    }

    /// Whether a heartbeat value is this very process's.
    fn is_own(&self, value: &[u8]) -> bool {
        serde_json::from_slice::<Heartbeat>(value)
            .is_ok_and(|heartbeat| heartbeat.instance == self.instance)
    }

    fn heartbeat_value(&self) -> Bytes {
        let heartbeat = Heartbeat {
            instance: self.instance.clone(),
            partitions: self.partitions,
            version: env!("CARGO_PKG_VERSION").to_string(),
            warming: self.warming,
        };
        serde_json::to_vec(&heartbeat).unwrap_or_default().into()
    }

    /// The heartbeats in the bucket: name, heartbeat, revision.
    async fn heartbeats(&self) -> Result<Vec<(String, Heartbeat, u64)>, IngestError> {
        let mut keys = self.kv.keys().await.map_err(js_error)?;
        let mut names = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(js_error)?;
            if let Some(name) = key.strip_prefix(ENGINES) {
                names.push(name.to_string());
            }
        }
        let mut heartbeats = Vec::new();
        for name in names {
            let entry = self
                .kv
                .entry(format!("{ENGINES}{name}"))
                .await
                .map_err(js_error)?;
            if let Some(entry) = entry.filter(|entry| entry.operation == kv::Operation::Put) {
                match serde_json::from_slice::<Heartbeat>(&entry.value) {
                    Ok(heartbeat) => heartbeats.push((name, heartbeat, entry.revision)),
                    Err(error) => warn!(engine = %name, %error, "unreadable heartbeat"),
                }
            }
        }
        Ok(heartbeats)
    }

    /// The other engine whose heartbeat this engine has read unchanged for the longest, if
    /// longer than `after`: renewed five times per lease, it is probably gone, and its
    /// partitions free once its heartbeat and leases expire.
    pub(crate) fn silent(&self, after: Duration) -> Option<(&str, Duration)> {
        self.seen.silent(after, Instant::now())
    }

    /// Renews this engine's heartbeat.
    pub(crate) async fn heartbeat(&self) -> Result<(), IngestError> {
        self.kv
            .put(format!("{ENGINES}{}", self.engine), self.heartbeat_value())
            .await
            .map_err(js_error)?;
        Ok(())
    }

    /// The engines alive (heartbeat not expired) with this engine's number of partitions,
    /// this one included, by name.
    pub(crate) async fn engines(&mut self) -> Result<Vec<Engine>, IngestError> {
        let heartbeats = self.heartbeats().await?;
        let others: Vec<(String, u64)> = heartbeats
            .iter()
            .filter(|(name, _, _)| *name != self.engine)
            .map(|(name, _, revision)| (name.clone(), *revision))
            .collect();
        for name in self.seen.read(&others, Instant::now()) {
            info!(engine = %name, "an engine left (its heartbeat expired or was removed)");
        }
        let mut engines: Vec<Engine> = heartbeats
            .into_iter()
            .filter(|(name, heartbeat, _)| {
                heartbeat.partitions == self.partitions && *name != self.engine
            })
            .map(|(name, heartbeat, _)| Engine {
                name,
                warming: heartbeat.warming,
            })
            .collect();
        engines.push(Engine {
            name: self.engine.clone(),
            warming: self.warming,
        });
        engines.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(engines)
    }

    fn lease_value(&self) -> Bytes {
        Bytes::from(format!("{} {}", self.engine, self.instance))
    }

    /// Takes the lease of each of `partitions` that nobody holds, all at once; returns those
    /// it took, with when the claim was sent (the lease runs from then, at the latest).
    pub(crate) async fn claim(&mut self, partitions: &[u32]) -> Vec<(u32, Instant)> {
        let sent = Instant::now();
        let value = self.lease_value();
        let claims = partitions.iter().map(|&partition| {
            let value = value.clone();
            let this = &*self;
            async move {
                let key = format!("{PARTITIONS}{partition}");
                let revision = match this.kv.create(key, value).await {
                    Ok(revision) => Some(revision),
                    // Maybe our own earlier claim, stored though its answer was lost.
                    Err(_) => this.own_revision(partition).await,
                };
                (partition, revision)
            }
        });
        let outcomes = futures_util::future::join_all(claims).await;
        let mut taken = Vec::new();
        for (partition, revision) in outcomes {
            if let Some(revision) = revision {
                self.leases.insert(partition, revision);
                taken.push((partition, sent));
            }
        }
        taken
    }

    /// The revision of `partition`'s lease if it holds this very engine's value (a write
    /// of ours the server stored though its answer was lost).
    async fn own_revision(&self, partition: u32) -> Option<u64> {
        let entry = self
            .kv
            .entry(format!("{PARTITIONS}{partition}"))
            .await
            .ok()??;
        (entry.operation == kv::Operation::Put && entry.value == self.lease_value())
            .then_some(entry.revision)
    }

    /// Renews the leases of `partitions`, all at once (one round trip however many are
    /// held). For each: `Err` when it is not this engine's any more (expired and maybe
    /// taken), `Ok(None)` when NATS did not answer (the lease may still hold), else when the
    /// renewal was sent (the lease runs from then, at the latest).
    pub(crate) async fn renew(
        &mut self,
        partitions: &[u32],
    ) -> Vec<(u32, Result<Option<Instant>, ()>)> {
        let value = self.lease_value();
        let sent = Instant::now();
        let renewals = partitions.iter().map(|&partition| {
            let kv = self.kv.clone();
            let value = value.clone();
            let revision = self.leases.get(&partition).copied();
            async move {
                let Some(revision) = revision else {
                    return (partition, None);
                };
                let key = format!("{PARTITIONS}{partition}");
                (partition, Some(kv.update(key, value, revision).await))
            }
        });
        let mut renewed = Vec::with_capacity(partitions.len());
        for (partition, outcome) in futures_util::future::join_all(renewals).await {
            let outcome = match outcome {
                None => Err(()),
                Some(Ok(revision)) => {
                    self.leases.insert(partition, revision);
                    Ok(Some(sent))
                }
                Some(Err(error)) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    // Our previous renewal may have been stored, its answer lost: the lease
                    // is still ours if it holds our value (renewed at its revision next time).
                    match self.own_revision(partition).await {
                        Some(revision) => {
                            self.leases.insert(partition, revision);
                            Ok(None)
                        }
                        None => {
                            self.leases.remove(&partition);
                            Err(())
                        }
                    }
                }
                Some(Err(error)) => {
                    warn!(partition, %error, "lease not renewed");
                    Ok(None)
                }
            };
            renewed.push((partition, outcome));
        }
        renewed
    }

    /// Gives the lease of `partition` back.
    pub(crate) async fn release(&mut self, partition: u32) {
        if let Some(revision) = self.leases.remove(&partition) {
            if let Err(error) = self
                .kv
                .delete_expect_revision(format!("{PARTITIONS}{partition}"), Some(revision))
                .await
            {
                warn!(partition, %error, "lease not given back; it expires by itself");
            }
        }
    }

    /// Removes this engine's heartbeat (a graceful stop: the others rebalance at once).
    pub(crate) async fn leave(&self) {
        if let Err(error) = self.kv.purge(format!("{ENGINES}{}", self.engine)).await {
            warn!(%error, "heartbeat not removed; it expires by itself");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(count: usize) -> Vec<String> {
        (0..count).map(|n| format!("kpi-{n}")).collect()
    }

    fn loads(owners: &[String]) -> BTreeMap<&str, usize> {
        let mut loads = BTreeMap::new();
        for owner in owners {
            *loads.entry(owner.as_str()).or_default() += 1;
        }
        loads
    }

    #[test]
    fn a_heartbeat_read_unchanged_is_silent_from_its_first_read_and_gone_once_absent() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let after = Duration::from_millis(2000);
        let mut seen = Heartbeats::default();
        let read = |a: u64, b: u64| vec![("a".to_string(), a), ("b".to_string(), b)];
        assert!(seen.read(&read(1, 2), at(0)).is_empty());
        // `a` renewed every second, `b` not after its first read.
        assert!(seen.read(&read(3, 2), at(1000)).is_empty());
        assert_eq!(seen.silent(after, at(1000)), None);
        seen.read(&read(4, 2), at(2000));
        assert_eq!(seen.silent(after, at(2000)), None, "exactly two seconds");
        seen.read(&read(5, 2), at(2500));
        assert_eq!(
            seen.silent(after, at(2500)),
            Some(("b", Duration::from_millis(2500)))
        );
        // `b` renewed at last: silent no more; `a`'s revision is read again unchanged.
        seen.read(&read(5, 6), at(3000));
        assert_eq!(seen.silent(after, at(3000)), None);
        assert_eq!(
            seen.silent(after, at(4600)),
            Some(("a", Duration::from_millis(2100))),
            "the longest silent, counted from the first read of its revision"
        );
        // `b`'s heartbeat expired.
        assert_eq!(
            seen.read(&[("a".to_string(), 7)], at(5000)),
            vec!["b".to_string()]
        );
        assert_eq!(seen.silent(Duration::ZERO, at(5000)), None);
    }

    #[test]
    fn every_engine_gets_an_even_share_and_at_least_one_partition() {
        for partitions in [1u32, 3, 4, 7, 16, 64, 100] {
            for count in 1..=9usize {
                let engines = names(count);
                let owners = assign(&engines, partitions);
                assert_eq!(owners.len(), partitions as usize);
                let loads = loads(&owners);
                let floor = partitions as usize / count;
                let ceil = (partitions as usize).div_ceil(count);
                for engine in &engines {
                    let load = loads.get(engine.as_str()).copied().unwrap_or(0);
                    assert!(
                        load >= floor && load <= ceil,
                        "{partitions}/{count}: {engine} has {load}"
                    );
                    if partitions as usize >= count {
                        assert!(load >= 1);
                    }
                }
            }
        }
    }

    #[test]
    fn every_engine_computes_the_same_assignment_in_any_order() {
        let mut engines = names(5);
        let first = assign(&engines, 64);
        engines.reverse();
        engines.push("kpi-2".into());
        assert_eq!(assign(&engines, 64), first);
        assert!(assign(&[], 8).is_empty());
    }

    #[test]
    fn an_engine_joining_moves_few_partitions() {
        let before = assign(&names(3), 64);
        let after = assign(&names(4), 64);
        let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        // The new engine needs 16; a rebalance that reshuffled everything would move ~48.
        assert!((16..=32).contains(&moved), "moved {moved}");
    }

    #[test]
    fn every_partition_moved_by_an_engine_stopping_goes_to_one_of_its_standbys() {
        for count in 2..=6usize {
            let engines = names(count);
            let owners = assign(&engines, 64);
            let standbys: Vec<Vec<u32>> = engines
                .iter()
                .map(|engine| standbys(&engines, 64, engine))
                .collect();
            let mut followed = 0;
            for partition in 0..64u32 {
                let followers: Vec<&String> = (0..count)
                    .filter(|&index| standbys[index].contains(&partition))
                    .map(|index| &engines[index])
                    .collect();
                assert!(
                    !followers.is_empty(),
                    "{count} engines, partition {partition}"
                );
                assert!(!followers.contains(&&owners[partition as usize]));
                followed += followers.len();
            }
            // Mostly one standby per partition: the bounded load moves few others.
            assert!(
                followed <= 64 + 64 / 8,
                "{count} engines: {followed} standbys for 64 partitions"
            );
            for gone in &engines {
                let rest: Vec<String> = engines.iter().filter(|e| *e != gone).cloned().collect();
                let after = assign(&rest, 64);
                for partition in 0..64usize {
                    if after[partition] != owners[partition] {
                        let standby = engines
                            .iter()
                            .zip(&standbys)
                            .find(|(engine, _)| **engine == after[partition])
                            .map(|(_, followed)| followed);
                        assert!(
                            standby.is_some_and(|followed| followed.contains(&(partition as u32))),
                            "{count} engines, {gone} stops: partition {partition} goes to {} cold",
                            after[partition]
                        );
                    }
                }
            }
        }
        assert!(
            standbys(&names(1), 64, "kpi-0").is_empty(),
            "alone: no standby"
        );
    }
}
