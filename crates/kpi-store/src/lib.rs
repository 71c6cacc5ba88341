//! Durable state of the engine, in one sled tree.
//!
//! | prefix | key | value |
//! |---|---|---|
//! | `m` | `schema` | store layout version |
//! | `b` | tenant, 0, record kind, bucket number (`u32` big-endian) | the records of a bucket ([`bucket`]) |
//! | `n` | counter kind, tenant, 0, label | `u64` big-endian (absolute value) |
//! | `x` | stream sequence (`u64` big-endian) | empty: this message was dead-lettered |
//! | `c` | connector id | a connector's state as earlier versions kept it; `kpi serve` moves it to the `KPI_CONNECTORS` key-value bucket at start and removes it here |
//! | `w` | commit sequence (`u64` big-endian) | redo entry: the record writes of a large commit |
//!
//! Records are grouped in buckets (see [`bucket`] for why): writing a record rewrites its
//! bucket. Layout version 1 had one `r` key per record; opening such a store moves its records
//! into buckets once, then marks it version 2.
//!
//! Invariant: a [`Store::commit`] is atomic and durable when it returns. The ingest
//! acknowledges messages only after that, so after a crash the store holds every
//! acknowledged checkpoint completely and no unacknowledged one partially. Aggregates are not
//! stored: they are a function of the records ([`Store::rebuild`]).
//!
//! A commit of up to [`WRITE_CHUNK`] records is one sled batch, flushed. A larger one is first
//! written whole as one redo entry, with its counters and dead-letter marks, in one flushed
//! batch: from then on it is durable, and `commit` returns. A background thread then writes
//! its records in place, rewriting each bucket touched with one sled `insert`, unflushed,
//! while reads see the records through the commit's sorted writes. The next commit waits for
//! that thread, and its atomic batch removes the redo entry; its flush makes the in-place
//! writes durable too. Opening the store replays the redo entries left (records hold final
//! states: a redo entry still present means no later commit reached the disk, so merging its
//! records into their buckets again is exact), then removes them.
//!
//! Why not one sled batch: sled pins one epoch guard for a whole batch, so every node it copies
//! stays allocated until the batch ends, about 4 KiB per record written; and a batch holds
//! sled's global write lock, which stops every read, while single inserts and reads proceed
//! side by side. So the in-place writes of one checkpoint overlap the next one's reads on
//! another core.

pub mod bucket;
pub mod key_filter;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

pub use key_filter::KeyFilter;

use kpi_model::record::Record;
use kpi_model::{aggregate_records, Aggregates, RecordKey, RecordSource, Tenants};

const SCHEMA_KEY: &[u8] = b"mschema";
const SCHEMA_VERSION: &[u8] = b"2";
/// Layout version 1: one `r` key per record (migrated on open).
const LEGACY_SCHEMA_VERSION: &[u8] = b"1";
/// A record's key in commits and redo entries, and its key in layout version 1.
const RECORD_PREFIX: u8 = b'r';
const BUCKET_PREFIX: u8 = b'b';
const COUNTER_PREFIX: u8 = b'n';
const REJECTED_PREFIX: u8 = b'x';
const CONNECTOR_PREFIX: u8 = b'c';
const REDO_PREFIX: u8 = b'w';
/// Multi-engine mode: the last stream sequence applied of each partition (`a` + partition).
const APPLIED_PREFIX: u8 = b'a';
/// Multi-engine mode: the number of partitions the store's applied sequences refer to.
const PARTITIONS_KEY: &[u8] = b"mpartitions";
/// Multi-engine mode: which stream the applied sequences are sequences of.
const STREAM_KEY: &[u8] = b"mstream";

/// A commit of more records than this goes through a redo entry; migrating a version 1 store
/// moves this many records between flushes.
pub const WRITE_CHUNK: usize = 1000;

/// Encoded record writes: key, and value or `None` for a removal; sorted by key in a commit.
type Writes = Vec<(Vec<u8>, Option<Vec<u8>>)>;

/// A large commit, durable through its redo entry, whose records are being written in place.
struct InPlace {
    redo: [u8; 9],
    writes: Arc<Writes>,
    writer: std::thread::JoinHandle<Result<(), StoreError>>,
}

impl InPlace {
    fn wait(self) -> Result<[u8; 9], StoreError> {
        match self.writer.join() {
            Ok(Ok(())) => Ok(self.redo),
            Ok(Err(error)) => Err(error),
            Err(_) => Err(StoreError::Writer("panicked".into())),
        }
    }
}
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store at {path}: {source}")]
    Open { path: String, source: sled::Error },
    #[error("store at {path} has layout version {found}, this build reads versions 1 and 2")]
    Schema { path: String, found: String },
    #[error("store: {0}")]
    Sled(#[from] sled::Error),
    #[error("store: redo entry {key:?} is corrupt: {source}")]
    CorruptRedo {
        key: Vec<u8>,
        source: postcard::Error,
    },
    #[error("store: the background writer stopped: {0}")]
    Writer(String),
    #[error("store: bucket {key:?} is corrupt")]
    CorruptBucket { key: Vec<u8> },
    #[error("store: record {key:?} is corrupt: {source}")]
    Corrupt {
        key: Vec<u8>,
        source: postcard::Error,
    },
}

pub use kpi_model::CounterKey;

/// A counter's key in the store: prefix, kind, tenant, 0, label.
fn counter_key(key: &CounterKey) -> Vec<u8> {
    let (kind, tenant, label) = match key {
        CounterKey::Processed { tenant, event_type } => (b'p', tenant, event_type),
        CounterKey::Duplicate { tenant, event_type } => (b'd', tenant, event_type),
        CounterKey::Rejected { tenant, reason } => (b'r', tenant, reason),
    };
    let mut bytes = vec![COUNTER_PREFIX, kind];
    bytes.extend_from_slice(tenant.as_bytes());
    bytes.push(0);
    bytes.extend_from_slice(label.as_bytes());
    bytes
}

fn decode_counter_key(bytes: &[u8]) -> Option<CounterKey> {
    let (&kind, rest) = bytes.get(1..)?.split_first()?;
    let split = rest.iter().position(|&b| b == 0)?;
    let tenant = String::from_utf8(rest[..split].to_vec()).ok()?;
    let label = String::from_utf8(rest[split + 1..].to_vec()).ok()?;
    match kind {
        b'p' => Some(CounterKey::Processed {
            tenant,
            event_type: label,
        }),
        b'd' => Some(CounterKey::Duplicate {
            tenant,
            event_type: label,
        }),
        b'r' => Some(CounterKey::Rejected {
            tenant,
            reason: label,
        }),
        _ => None,
    }
}

/// Everything one batch changes, written atomically.
#[derive(Debug, Default)]
pub struct Commit {
    /// Records to write; `None` deletes.
    pub records: Vec<(RecordKey, Option<Record>)>,
    /// New absolute values of the counters the batch changed.
    pub counters: BTreeMap<CounterKey, u64>,
    /// Stream sequences of messages dead-lettered by the batch.
    pub rejected_sequences: Vec<u64>,
    /// Multi-engine mode: the last stream sequence applied of each partition the commit
    /// covers, written with its records (the partition's exactly-once checkpoint).
    pub applied: BTreeMap<u32, u64>,
}

/// The engine's sled database.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    /// The last large commit while its records are written in place; the next commit's batch
    /// removes its redo entry. Held for the whole of a commit and of a record read.
    in_place: Arc<Mutex<Option<InPlace>>>,
}

fn record_key(key: &RecordKey) -> Vec<u8> {
    let mut bytes = vec![RECORD_PREFIX];
    bytes.extend_from_slice(&key.encode());
    bytes
}

/// The bucket of a record key (`r`, tenant, 0, kind, id), and the id.
fn bucket_key(record_key: &[u8]) -> (Vec<u8>, &[u8]) {
    let body = &record_key[1..];
    let split = body.iter().position(|&b| b == 0).unwrap_or(body.len());
    let prefix = &body[..(split + 2).min(body.len())];
    let id = &body[prefix.len()..];
    let mut key = Vec::with_capacity(prefix.len() + 5);
    key.push(BUCKET_PREFIX);
    key.extend_from_slice(prefix);
    key.extend_from_slice(&bucket::bucket_of(id).to_be_bytes());
    (key, id)
}

/// Applies record writes to their buckets: reads each bucket touched from `db` once, merges
/// all its writes into it and hands the new value (`None`: the bucket is now empty) to `put`,
/// which may write it at once or stage it in a batch.
fn write_buckets(
    db: &sled::Db,
    writes: &Writes,
    mut put: impl FnMut(Vec<u8>, Option<Vec<u8>>) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    // (bucket key, change)
    let mut grouped: Vec<(Vec<u8>, bucket::Change<'_>)> = writes
        .iter()
        .map(|(key, value)| {
            let (bucket, id) = bucket_key(key);
            (bucket, (id, value.as_deref()))
        })
        .collect();
    grouped.sort_unstable_by(|a, b| (&a.0, a.1 .0).cmp(&(&b.0, b.1 .0)));
    for run in grouped.chunk_by(|a, b| a.0 == b.0) {
        let key = &run[0].0;
        let corrupt = |_| StoreError::CorruptBucket { key: key.clone() };
        let old = match db.get(key)? {
            Some(stored) => bucket::unpack(&stored).map_err(corrupt)?,
            None => Vec::new(),
        };
        let changes: Vec<bucket::Change<'_>> = run.iter().map(|(_, change)| *change).collect();
        let merged = bucket::merge(&old, &changes).map_err(corrupt)?;
        put(key.clone(), merged.as_deref().map(bucket::pack))?;
    }
    Ok(())
}

/// [`write_buckets`] with one sled insert (or removal) per bucket, unflushed.
fn write_buckets_in_place(db: &sled::Db, writes: &Writes) -> Result<(), StoreError> {
    write_buckets(db, writes, |key, value| {
        match value {
            Some(value) => db.insert(key, value)?,
            None => db.remove(key)?,
        };
        Ok(())
    })
}

fn applied_key(partition: u32) -> [u8; 5] {
    let mut key = [APPLIED_PREFIX; 5];
    key[1..].copy_from_slice(&partition.to_be_bytes());
    key
}

fn rejected_key(sequence: u64) -> [u8; 9] {
    let mut key = [REJECTED_PREFIX; 9];
    key[1..].copy_from_slice(&sequence.to_be_bytes());
    key
}

fn redo_key(sequence: u64) -> [u8; 9] {
    let mut key = [REDO_PREFIX; 9];
    key[1..].copy_from_slice(&sequence.to_be_bytes());
    key
}

impl Store {
    /// Opens (or creates) the store at `path`. sled holds a lock on the directory: a second
    /// engine on the same store fails here.
    pub fn open(path: &Path, cache_capacity_bytes: u64) -> Result<Store, StoreError> {
        let display = path.display().to_string();
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(cache_capacity_bytes)
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(|source| StoreError::Open {
                path: display.clone(),
                source,
            })?;
        let mut legacy = false;
        match db.get(SCHEMA_KEY)? {
            Some(version) if version.as_ref() == SCHEMA_VERSION => {}
            Some(version) if version.as_ref() == LEGACY_SCHEMA_VERSION => legacy = true,
            Some(version) => {
                return Err(StoreError::Schema {
                    path: display,
                    found: String::from_utf8_lossy(&version).into_owned(),
                })
            }
            None => {
                db.insert(SCHEMA_KEY, SCHEMA_VERSION)?;
                db.flush()?;
            }
        }
        let store = Store {
            db,
            in_place: Arc::new(Mutex::new(None)),
        };
        if legacy {
            store.migrate_records()?;
        }
        store.replay_redo()?;
        if legacy {
            store.db.insert(SCHEMA_KEY, SCHEMA_VERSION)?;
            store.db.flush()?;
        }
        Ok(store)
    }

    /// Moves the records of layout version 1 (one `r` key each) into buckets, a chunk at a
    /// time: the chunk's buckets are written and flushed, then its old keys removed. An
    /// interruption leaves some records in both places, with the same bytes (nothing else
    /// writes meanwhile), and opening again carries on. Single inserts, not one batch: see the
    /// module documentation.
    fn migrate_records(&self) -> Result<(), StoreError> {
        let mut moved = 0u64;
        loop {
            let chunk = self
                .db
                .scan_prefix([RECORD_PREFIX])
                .take(WRITE_CHUNK)
                .collect::<Result<Vec<_>, _>>()?;
            if chunk.is_empty() {
                break;
            }
            if moved == 0 {
                tracing::info!(
                    "store layout version 1: moving its records into buckets (version 2), once"
                );
            }
            moved += chunk.len() as u64;
            let writes: Writes = chunk
                .iter()
                .map(|(key, value)| (key.to_vec(), Some(value.to_vec())))
                .collect();
            write_buckets_in_place(&self.db, &writes)?;
            self.db.flush()?;
            for (key, _) in &chunk {
                self.db.remove(key)?;
            }
        }
        self.db.flush()?;
        if moved > 0 {
            tracing::info!(records = moved, "store moved to layout version 2");
        }
        Ok(())
    }

    /// Finishes the large commits a crash interrupted.
    fn replay_redo(&self) -> Result<(), StoreError> {
        for entry in self.db.scan_prefix([REDO_PREFIX]) {
            let (key, value) = entry?;
            let writes: Writes =
                postcard::from_bytes(&value).map_err(|source| StoreError::CorruptRedo {
                    key: key.to_vec(),
                    source,
                })?;
            write_buckets_in_place(&self.db, &writes)?;
            self.db.remove(&key)?;
        }
        self.db.flush()?;
        Ok(())
    }

    fn in_place(&self) -> std::sync::MutexGuard<'_, Option<InPlace>> {
        self.in_place.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads one record.
    pub fn record(&self, key: &RecordKey) -> Result<Option<Record>, StoreError> {
        let stored_key = record_key(key);
        let in_flight = self
            .in_place()
            .as_ref()
            .map(|in_place| in_place.writes.clone());
        let written = in_flight.as_deref().and_then(|writes| {
            writes
                .binary_search_by(|(key, _)| key.as_slice().cmp(&stored_key))
                .ok()
                .map(|at| writes[at].1.as_deref())
        });
        let entries;
        let bytes = match written {
            Some(value) => value,
            None => {
                let (bucket_key, id) = bucket_key(&stored_key);
                match self.db.get(&bucket_key)? {
                    Some(stored) => {
                        let corrupt = |_| StoreError::CorruptBucket {
                            key: bucket_key.clone(),
                        };
                        entries = bucket::unpack(&stored).map_err(corrupt)?;
                        bucket::find(&entries, id).map_err(corrupt)?
                    }
                    None => None,
                }
            }
        };
        match bytes {
            Some(bytes) => Record::decode(bytes)
                .map(Some)
                .map_err(|source| StoreError::Corrupt {
                    key: stored_key,
                    source,
                }),
            None => Ok(None),
        }
    }

    /// Writes a commit atomically and waits until it is on disk (its records may still be on
    /// their way to their own keys, see the module documentation).
    pub fn commit(&self, commit: &Commit) -> Result<(), StoreError> {
        let mut writes: Writes = commit
            .records
            .iter()
            .map(|(key, record)| (record_key(key), record.as_ref().map(Record::encode)))
            .collect();
        writes.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut in_place = self.in_place();
        let mut batch = sled::Batch::default();
        if let Some(previous) = in_place.take() {
            batch.remove(&previous.wait()?);
        }
        for (key, value) in &commit.counters {
            batch.insert(counter_key(key), &value.to_be_bytes());
        }
        for sequence in &commit.rejected_sequences {
            batch.insert(&rejected_key(*sequence), &[]);
        }
        for (partition, sequence) in &commit.applied {
            batch.insert(&applied_key(*partition), &sequence.to_be_bytes());
        }
        if writes.len() <= WRITE_CHUNK {
            write_buckets(&self.db, &writes, |key, value| {
                match value {
                    Some(value) => batch.insert(key, value),
                    None => batch.remove(key),
                }
                Ok(())
            })?;
            self.db.apply_batch(batch)?;
            self.db.flush()?;
            return Ok(());
        }
        let redo = redo_key(self.db.generate_id()?);
        // Serialising byte vectors cannot fail.
        batch.insert(&redo, postcard::to_stdvec(&writes).unwrap_or_default());
        self.db.apply_batch(batch)?;
        self.db.flush()?;
        let writes = Arc::new(writes);
        let (db, to_write) = (self.db.clone(), writes.clone());
        let writer = std::thread::Builder::new()
            .name("kpi-store-writer".into())
            .spawn(move || write_buckets_in_place(&db, &to_write))
            .map_err(|error| StoreError::Writer(error.to_string()))?;
        *in_place = Some(InPlace {
            redo,
            writes,
            writer,
        });
        Ok(())
    }

    /// Was the message with this stream sequence already dead-lettered?
    pub fn is_rejected(&self, sequence: u64) -> Result<bool, StoreError> {
        Ok(self.db.contains_key(rejected_key(sequence))?)
    }

    /// Multi-engine mode: the last stream sequence applied of every partition the store has
    /// applied something of.
    pub fn applied_sequences(&self) -> Result<BTreeMap<u32, u64>, StoreError> {
        let mut applied = BTreeMap::new();
        for entry in self.db.scan_prefix([APPLIED_PREFIX]) {
            let (key, value) = entry?;
            if let (Ok(partition), Ok(sequence)) = (
                <[u8; 4]>::try_from(&key[1..]),
                <[u8; 8]>::try_from(value.as_ref()),
            ) {
                applied.insert(u32::from_be_bytes(partition), u64::from_be_bytes(sequence));
            }
        }
        Ok(applied)
    }

    /// The number of partitions of a multi-engine store, `None` for a single engine's.
    pub fn partitions(&self) -> Result<Option<u32>, StoreError> {
        Ok(self
            .db
            .get(PARTITIONS_KEY)?
            .and_then(|value| <[u8; 4]>::try_from(value.as_ref()).ok())
            .map(u32::from_be_bytes))
    }

    /// Marks the store as a multi-engine one of `partitions` partitions (durably).
    pub fn set_partitions(&self, partitions: u32) -> Result<(), StoreError> {
        self.db.insert(PARTITIONS_KEY, &partitions.to_be_bytes())?;
        self.db.flush()?;
        Ok(())
    }

    /// Multi-engine mode: the identity of the stream the applied sequences refer to (its
    /// creation time), if recorded.
    pub fn stream_identity(&self) -> Result<Option<String>, StoreError> {
        Ok(self
            .db
            .get(STREAM_KEY)?
            .map(|value| String::from_utf8_lossy(&value).into_owned()))
    }

    /// Records the identity of the stream the applied sequences refer to (durably).
    pub fn set_stream_identity(&self, identity: &str) -> Result<(), StoreError> {
        self.db.insert(STREAM_KEY, identity.as_bytes())?;
        self.db.flush()?;
        Ok(())
    }

    /// Whether the store holds nothing applied yet (no record, counter or dead-letter mark).
    pub fn is_empty_of_events(&self) -> Result<bool, StoreError> {
        for prefix in [
            BUCKET_PREFIX,
            RECORD_PREFIX,
            COUNTER_PREFIX,
            REJECTED_PREFIX,
        ] {
            if self.db.scan_prefix([prefix]).next().transpose()?.is_some() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// All event counters.
    pub fn counters(&self) -> Result<BTreeMap<CounterKey, u64>, StoreError> {
        let mut counters = BTreeMap::new();
        for entry in self.db.scan_prefix([COUNTER_PREFIX]) {
            let (key, value) = entry?;
            if let (Some(key), Ok(bytes)) = (
                decode_counter_key(&key),
                <[u8; 8]>::try_from(value.as_ref()),
            ) {
                counters.insert(key, u64::from_be_bytes(bytes));
            }
        }
        Ok(counters)
    }

    /// Sums the contributions of every stored record (the aggregates, rebuilt), and fills a
    /// [`KeyFilter`] with every record key. Returns the number of records too.
    pub fn rebuild(&self, tenants: &Tenants) -> Result<(Aggregates, KeyFilter, u64), StoreError> {
        let mut records = Vec::new();
        let mut aggregates = Aggregates::default();
        let mut filter = KeyFilter::new();
        let mut count = 0u64;
        // Sum in chunks so memory stays bounded whatever the number of records.
        for entry in self.db.scan_prefix([BUCKET_PREFIX]) {
            let (bucket_key, bucket) = entry?;
            // `b`, tenant, 0, kind, then the bucket number.
            let prefix = &bucket_key[1..bucket_key.len().saturating_sub(4).max(1)];
            let corrupt = || StoreError::CorruptBucket {
                key: bucket_key.to_vec(),
            };
            let entries = bucket::unpack(&bucket).map_err(|_| corrupt())?;
            for entry in bucket::entries(&entries) {
                let (id, bytes) = entry.map_err(|_| corrupt())?;
                let mut encoded = Vec::with_capacity(prefix.len() + id.len());
                encoded.extend_from_slice(prefix);
                encoded.extend_from_slice(id);
                let key = RecordKey::decode(&encoded).ok_or_else(corrupt)?;
                let record = Record::decode(bytes).map_err(|source| StoreError::Corrupt {
                    key: encoded.clone(),
                    source,
                })?;
                filter.insert(&encoded);
                records.push((key, record));
                count += 1;
            }
            if records.len() >= 10_000 {
                aggregates.merge(aggregate_records(
                    records.iter().map(|(k, r)| (k, r)),
                    tenants,
                ));
                records.clear();
            }
        }
        aggregates.merge(aggregate_records(
            records.iter().map(|(k, r)| (k, r)),
            tenants,
        ));
        Ok((aggregates, filter, count))
    }

    /// The state a connector saved here, as earlier versions did (opaque to the store).
    pub fn connector_state(&self, connector_id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .db
            .get(connector_key(connector_id))?
            .map(|value| value.to_vec()))
    }

    /// Forgets a connector's state (once moved elsewhere).
    pub fn remove_connector_state(&self, connector_id: &str) -> Result<(), StoreError> {
        self.db.remove(connector_key(connector_id))?;
        self.db.flush()?;
        Ok(())
    }

    /// Saves a connector's state durably (flushed before returning); only earlier versions and
    /// tests of the move to the key-value bucket write it.
    pub fn set_connector_state(&self, connector_id: &str, state: &[u8]) -> Result<(), StoreError> {
        self.db.insert(connector_key(connector_id), state)?;
        self.db.flush()?;
        Ok(())
    }

    /// Flushes everything to disk, the writes of the last large commit included, whose redo
    /// entry is then no longer needed (for shutdown).
    pub fn flush(&self) -> Result<(), StoreError> {
        let mut in_place = self.in_place();
        if let Some(previous) = in_place.take() {
            let redo = previous.wait()?;
            self.db.flush()?;
            self.db.remove(redo)?;
        }
        self.db.flush()?;
        Ok(())
    }
}

fn connector_key(connector_id: &str) -> Vec<u8> {
    let mut key = vec![CONNECTOR_PREFIX];
    key.extend_from_slice(connector_id.as_bytes());
    key
}

impl RecordSource for Store {
    type Error = StoreError;

    fn load(&self, key: &RecordKey) -> Result<Option<Record>, StoreError> {
        self.record(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kpi_model::record::LeadRecord;

    /// Opens a store whose directory was open in this process a moment ago: sled's flusher
    /// thread can hold the directory lock for a short while after the last handle is dropped
    /// (spacejam/sled#1234), so a lock error is retried for up to 5 s.
    fn open_again(path: &Path) -> Result<Store, StoreError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match Store::open(path, 1 << 20) {
                Err(StoreError::Open { source, .. })
                    if source.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                result => return result,
            }
        }
    }

    #[test]
    fn a_commit_survives_reopening() {
        let dir = tempfile::tempdir().expect("temp dir");
        let key = RecordKey::lead("acme", "L1");
        let record = Record::Lead(LeadRecord {
            applied: ["e1".to_string()].into_iter().collect(),
            ..LeadRecord::default()
        });
        let counter = CounterKey::Rejected {
            tenant: "acme".into(),
            reason: "invalid_json".into(),
        };
        {
            let store = Store::open(dir.path(), 1 << 20).expect("open");
            let mut commit = Commit::default();
            commit.records.push((key.clone(), Some(record.clone())));
            commit.counters.insert(counter.clone(), 3);
            commit.rejected_sequences.push(42);
            store.commit(&commit).expect("commit");
        }
        let store = open_again(dir.path()).expect("reopen");
        assert_eq!(store.record(&key).expect("read"), Some(record));
        assert_eq!(store.counters().expect("counters").get(&counter), Some(&3));
        assert!(store.is_rejected(42).expect("read"));
        assert!(!store.is_rejected(43).expect("read"));
        store
            .set_connector_state("gads", b"{\"cursor\":1}")
            .expect("save state");
        assert_eq!(
            store.connector_state("gads").expect("state").as_deref(),
            Some(b"{\"cursor\":1}".as_slice())
        );
        assert_eq!(store.connector_state("other").expect("state"), None);
        let mut delete = Commit::default();
        delete.records.push((key.clone(), None));
        store.commit(&delete).expect("commit");
        assert_eq!(store.record(&key).expect("read"), None);
    }

    #[test]
    fn partitions_applied_sequences_commit_with_the_records_and_survive_reopening() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let store = Store::open(dir.path(), 1 << 20).expect("open");
            assert!(store.is_empty_of_events().expect("read"));
            assert_eq!(store.partitions().expect("read"), None);
            store.set_partitions(16).expect("mark");
            let commit = Commit {
                records: leads(3),
                applied: [(0, 17), (15, 99)].into_iter().collect(),
                ..Default::default()
            };
            store.commit(&commit).expect("commit");
            let mut later = Commit::default();
            later.applied.insert(15, 120);
            store.commit(&later).expect("commit");
        }
        let store = open_again(dir.path()).expect("reopen");
        assert!(!store.is_empty_of_events().expect("read"));
        assert_eq!(store.partitions().expect("read"), Some(16));
        assert_eq!(
            store.applied_sequences().expect("read"),
            [(0, 17), (15, 120)].into_iter().collect()
        );
    }

    /// `count` lead records, each with one applied event.
    fn leads(count: usize) -> Vec<(RecordKey, Option<Record>)> {
        (0..count)
            .map(|n| {
                let record = Record::Lead(LeadRecord {
                    applied: [format!("e{n}")].into_iter().collect(),
                    ..LeadRecord::default()
                });
                (RecordKey::lead("acme", &format!("L{n}")), Some(record))
            })
            .collect()
    }

    #[test]
    fn a_large_commit_interrupted_after_its_redo_entry_is_finished_on_open() {
        let dir = tempfile::tempdir().expect("temp dir");
        let records = leads(WRITE_CHUNK * 2 + 10);
        {
            let store = Store::open(dir.path(), 1 << 20).expect("open");
            // A complete large commit, then the first step only of another, as a crash
            // right after the redo entry's flush leaves it.
            let commit = Commit {
                records: records[..WRITE_CHUNK + 1].to_vec(),
                ..Commit::default()
            };
            store.commit(&commit).expect("commit");
            assert_eq!(store.db.scan_prefix([REDO_PREFIX]).count(), 1);
            store.commit(&Commit::default()).expect("commit");
            assert_eq!(store.db.scan_prefix([REDO_PREFIX]).count(), 0);
            store.commit(&commit).expect("commit");
            store.flush().expect("flush");
            assert_eq!(store.db.scan_prefix([REDO_PREFIX]).count(), 0);
            let writes: Writes = records
                .iter()
                .map(|(key, record)| (record_key(key), record.as_ref().map(Record::encode)))
                .collect();
            store
                .db
                .insert(redo_key(99), postcard::to_stdvec(&writes).expect("encode"))
                .expect("insert");
            store.db.flush().expect("flush");
            assert_eq!(
                store.record(&records[WRITE_CHUNK + 5].0).expect("read"),
                None
            );
        }
        let store = open_again(dir.path()).expect("reopen");
        for (key, record) in &records {
            assert_eq!(&store.record(key).expect("read"), record);
        }
        assert_eq!(store.db.scan_prefix([REDO_PREFIX]).count(), 0);
    }

    #[test]
    fn records_of_a_large_commit_are_read_from_memory_until_the_next_commit() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path(), 1 << 20).expect("open");
        let records = leads(WRITE_CHUNK + 1);
        let commit = Commit {
            records: records.clone(),
            ..Commit::default()
        };
        store.commit(&commit).expect("commit");
        while !store
            .in_place()
            .as_ref()
            .is_some_and(|in_place| in_place.writer.is_finished())
        {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        // Behind the store's back: only the commit's writes still hold this record.
        let (key, record) = &records[7];
        let other = &records[20];
        assert_ne!(
            bucket_key(&record_key(key)).0,
            bucket_key(&record_key(&other.0)).0
        );
        store
            .db
            .remove(bucket_key(&record_key(key)).0)
            .expect("remove");
        assert_eq!(&store.record(key).expect("read"), record);
        store.commit(&Commit::default()).expect("commit");
        assert_eq!(store.record(key).expect("read"), None);
        assert_eq!(&store.record(&other.0).expect("read"), &other.1);
    }

    /// Two lead records in one bucket (their ids differ only in the last byte), named apart
    /// from those of [`leads`].
    fn leads_sharing_a_bucket() -> Vec<(RecordKey, Option<Record>)> {
        let pair: Vec<_> = ["M10", "M11"]
            .iter()
            .map(|id| {
                let record = Record::Lead(LeadRecord {
                    applied: [format!("created-{id}")].into_iter().collect(),
                    ..LeadRecord::default()
                });
                (RecordKey::lead("acme", id), Some(record))
            })
            .collect();
        assert_eq!(
            bucket_key(&record_key(&pair[0].0)).0,
            bucket_key(&record_key(&pair[1].0)).0
        );
        pair
    }

    #[test]
    fn records_sharing_a_bucket_are_written_read_and_removed_separately() {
        let dir = tempfile::tempdir().expect("temp dir");
        let pair = leads_sharing_a_bucket();
        let store = Store::open(dir.path(), 1 << 20).expect("open");
        // One in a small commit, the other in a large one (through the background writer).
        store
            .commit(&Commit {
                records: vec![pair[0].clone()],
                ..Commit::default()
            })
            .expect("commit");
        let mut large = leads(WRITE_CHUNK + 1);
        large.push(pair[1].clone());
        store
            .commit(&Commit {
                records: large.clone(),
                ..Commit::default()
            })
            .expect("commit");
        store.flush().expect("flush");
        for (key, record) in pair.iter().chain(&large) {
            assert_eq!(&store.record(key).expect("read"), record);
        }
        let (_, _, count) = store.rebuild(&Tenants::default()).expect("rebuild");
        assert_eq!(count, large.len() as u64 + 1);
        store
            .commit(&Commit {
                records: vec![(pair[1].0.clone(), None)],
                ..Commit::default()
            })
            .expect("commit");
        assert_eq!(store.record(&pair[1].0).expect("read"), None);
        assert_eq!(&store.record(&pair[0].0).expect("read"), &pair[0].1);
        drop(store);
        let store = open_again(dir.path()).expect("reopen");
        assert_eq!(store.record(&pair[1].0).expect("read"), None);
        assert_eq!(&store.record(&pair[0].0).expect("read"), &pair[0].1);
    }

    #[test]
    fn a_version_1_store_is_moved_into_buckets_on_open() {
        let dir = tempfile::tempdir().expect("temp dir");
        let records = leads(WRITE_CHUNK * 2 + 3);
        let (old, redone) = records.split_at(WRITE_CHUNK * 2);
        {
            let db = sled::open(dir.path()).expect("open");
            db.insert(SCHEMA_KEY, LEGACY_SCHEMA_VERSION)
                .expect("insert");
            for (key, record) in old {
                let record = record.as_ref().expect("a record");
                db.insert(record_key(key), record.encode()).expect("insert");
            }
            // A version 1 redo entry: it replaces the first record and adds the others.
            let mut writes: Writes = redone
                .iter()
                .map(|(key, record)| (record_key(key), record.as_ref().map(Record::encode)))
                .collect();
            writes.push((record_key(&old[0].0), None));
            writes.sort();
            db.insert(redo_key(5), postcard::to_stdvec(&writes).expect("encode"))
                .expect("insert");
            db.flush().expect("flush");
        }
        let store = open_again(dir.path()).expect("reopen");
        assert_eq!(store.record(&old[0].0).expect("read"), None);
        for (key, record) in old[1..].iter().chain(redone) {
            assert_eq!(&store.record(key).expect("read"), record);
        }
        assert_eq!(store.db.scan_prefix([RECORD_PREFIX]).count(), 0);
        assert_eq!(store.db.scan_prefix([REDO_PREFIX]).count(), 0);
        assert_eq!(
            store.db.get(SCHEMA_KEY).expect("read").as_deref(),
            Some(SCHEMA_VERSION)
        );
        let (_, filter, count) = store.rebuild(&Tenants::default()).expect("rebuild");
        assert_eq!(count, records.len() as u64 - 1);
        assert!(filter.may_contain(&redone[0].0.encode()));
    }

    #[test]
    fn a_store_of_another_layout_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let db = sled::open(dir.path()).expect("open");
            db.insert(SCHEMA_KEY, b"99".as_slice()).expect("insert");
            db.flush().expect("flush");
        }
        let error = open_again(dir.path()).err().expect("refused");
        assert!(error.to_string().contains("layout version 99"), "{error}");
    }
}
