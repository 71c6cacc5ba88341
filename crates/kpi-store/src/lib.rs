//! Durable state of the engine, in one sled tree.
//!
//! | prefix | key | value |
//! |---|---|---|
//! | `m` | `schema` | store layout version |
//! | `r` | [`RecordKey::encode`] | a postcard [`Record`] |
//! | `n` | counter kind, tenant, 0, label | `u64` big-endian (absolute value) |
//! | `x` | stream sequence (`u64` big-endian) | empty: this message was dead-lettered |
//! | `c` | connector id | the connector's state (cursor, versions of the spend lines it sent) |
//! | `w` | commit sequence (`u64` big-endian) | redo entry: the record writes of a large commit |
//!
//! Invariant: a [`Store::commit`] is atomic and durable when it returns. The ingest
//! acknowledges messages only after that, so after a crash the store holds every
//! acknowledged checkpoint completely and no unacknowledged one partially. Aggregates are not
//! stored: they are a function of the records ([`Store::rebuild`]).
//!
//! A commit of up to [`WRITE_CHUNK`] records is one sled batch, flushed. A larger one is first
//! written whole as one redo entry, with its counters and dead-letter marks, in one flushed
//! batch: from then on it is durable, and `commit` returns. A background thread then writes
//! its records in place, one sled `insert` each and unflushed, while reads see them through
//! the commit's sorted writes. The next commit waits for that thread, and its atomic batch
//! removes the redo entry; its flush makes the in-place writes durable too. Opening the store
//! replays the redo entries left (records hold final states: a redo entry still present means
//! no later commit reached the disk, so replaying it is exact), then removes them.
//!
//! Why not one sled batch: sled pins one epoch guard for a whole batch, so every node it copies
//! stays allocated until the batch ends, about 4 KiB per record written; and a batch holds
//! sled's global write lock, which stops every read, while single inserts and reads proceed
//! side by side. So the in-place writes of one checkpoint overlap the next one's reads on
//! another core.

pub mod key_filter;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

pub use key_filter::KeyFilter;

use kpi_model::record::Record;
use kpi_model::{aggregate_records, Aggregates, RecordKey, RecordSource, Tenants};

const SCHEMA_KEY: &[u8] = b"mschema";
const SCHEMA_VERSION: &[u8] = b"1";
const RECORD_PREFIX: u8 = b'r';
const COUNTER_PREFIX: u8 = b'n';
const REJECTED_PREFIX: u8 = b'x';
const CONNECTOR_PREFIX: u8 = b'c';
const REDO_PREFIX: u8 = b'w';

/// A commit of more records than this goes through a redo entry; replaying one writes sled
/// batches of this many.
pub const WRITE_CHUNK: usize = 1000;

/// Encoded record writes: key, and value or `None` for a removal; sorted by key in a commit.
type Writes = Vec<(Vec<u8>, Option<Vec<u8>>)>;

/// A large commit, durable through its redo entry, whose records are being written in place.
struct InPlace {
    redo: [u8; 9],
    writes: Arc<Writes>,
    writer: std::thread::JoinHandle<Result<(), sled::Error>>,
}

impl InPlace {
    fn wait(self) -> Result<[u8; 9], StoreError> {
        match self.writer.join() {
            Ok(Ok(())) => Ok(self.redo),
            Ok(Err(error)) => Err(StoreError::Sled(error)),
            Err(_) => Err(StoreError::Writer("panicked".into())),
        }
    }
}
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store at {path}: {source}")]
    Open { path: String, source: sled::Error },
    #[error("store at {path} has layout version {found}, this build reads version 1")]
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
    #[error("store: record {key:?} is corrupt: {source}")]
    Corrupt {
        key: Vec<u8>,
        source: postcard::Error,
    },
}

/// Which event counter.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CounterKey {
    /// `kpi_events_processed_total{tenant,type}`
    Processed { tenant: String, event_type: String },
    /// `kpi_events_duplicate_total{tenant,type}`
    Duplicate { tenant: String, event_type: String },
    /// `kpi_events_rejected_total{tenant,reason}`
    Rejected { tenant: String, reason: String },
}

impl CounterKey {
    fn encode(&self) -> Vec<u8> {
        let (kind, tenant, label) = match self {
            CounterKey::Processed { tenant, event_type } => (b'p', tenant, event_type),
            CounterKey::Duplicate { tenant, event_type } => (b'd', tenant, event_type),
            CounterKey::Rejected { tenant, reason } => (b'r', tenant, reason),
        };
        let mut key = vec![COUNTER_PREFIX, kind];
        key.extend_from_slice(tenant.as_bytes());
        key.push(0);
        key.extend_from_slice(label.as_bytes());
        key
    }

    fn decode(bytes: &[u8]) -> Option<CounterKey> {
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
        match db.get(SCHEMA_KEY)? {
            Some(version) if version.as_ref() == SCHEMA_VERSION => {}
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
        store.replay_redo()?;
        Ok(store)
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
            self.write_chunks(&writes)?;
            self.db.remove(&key)?;
        }
        self.db.flush()?;
        Ok(())
    }

    fn write_chunks(&self, writes: &Writes) -> Result<(), StoreError> {
        for chunk in writes.chunks(WRITE_CHUNK) {
            let mut batch = sled::Batch::default();
            for (key, value) in chunk {
                match value {
                    Some(value) => batch.insert(key.as_slice(), value.as_slice()),
                    None => batch.remove(key.as_slice()),
                }
            }
            self.db.apply_batch(batch)?;
        }
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
        let stored;
        let bytes = match written {
            Some(value) => value,
            None => {
                stored = self.db.get(&stored_key)?;
                stored.as_deref()
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
            batch.insert(key.encode(), &value.to_be_bytes());
        }
        for sequence in &commit.rejected_sequences {
            batch.insert(&rejected_key(*sequence), &[]);
        }
        if writes.len() <= WRITE_CHUNK {
            for (key, value) in writes {
                match value {
                    Some(value) => batch.insert(key, value),
                    None => batch.remove(key),
                }
            }
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
            .spawn(move || {
                for (key, value) in to_write.iter() {
                    match value {
                        Some(value) => db.insert(key.as_slice(), value.as_slice())?,
                        None => db.remove(key.as_slice())?,
                    };
                }
                Ok(())
            })
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

    /// All event counters.
    pub fn counters(&self) -> Result<BTreeMap<CounterKey, u64>, StoreError> {
        let mut counters = BTreeMap::new();
        for entry in self.db.scan_prefix([COUNTER_PREFIX]) {
            let (key, value) = entry?;
            if let (Some(key), Ok(bytes)) = (
                CounterKey::decode(&key),
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
        for entry in self.db.scan_prefix([RECORD_PREFIX]) {
            let (stored_key, bytes) = entry?;
            let record = Record::decode(&bytes).map_err(|source| StoreError::Corrupt {
                key: stored_key.to_vec(),
                source,
            })?;
            if let Some(key) = RecordKey::decode(&stored_key[1..]) {
                filter.insert(&stored_key[1..]);
                records.push((key, record));
                count += 1;
            }
            if records.len() == 10_000 {
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

    /// The state a connector saved last (opaque to the store).
    pub fn connector_state(&self, connector_id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .db
            .get(connector_key(connector_id))?
            .map(|value| value.to_vec()))
    }

    /// Saves a connector's state durably (flushed before returning).
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
        let store = Store::open(dir.path(), 1 << 20).expect("reopen");
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
        let store = Store::open(dir.path(), 1 << 20).expect("reopen");
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
        store.db.remove(record_key(key)).expect("remove");
        assert_eq!(&store.record(key).expect("read"), record);
        store.commit(&Commit::default()).expect("commit");
        assert_eq!(store.record(key).expect("read"), None);
        assert_eq!(&store.record(&records[8].0).expect("read"), &records[8].1);
    }

    #[test]
    fn a_store_of_another_layout_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let db = sled::open(dir.path()).expect("open");
            db.insert(SCHEMA_KEY, b"99".as_slice()).expect("insert");
            db.flush().expect("flush");
        }
        let error = Store::open(dir.path(), 1 << 20).err().expect("refused");
        assert!(error.to_string().contains("layout version 99"), "{error}");
    }
}
