//! Multi-engine mode's ingest: the partitions this engine owns, each read from its last
//! applied sequence, applied and checkpointed together.
//!
//! Each owned partition has a reader: an ordered consumer on `<partition>.>` starting after
//! the partition's last applied stream sequence, which the checkpoint writes atomically with
//! the records (the partition's exactly-once checkpoint, as the acknowledged floor is the
//! single engine's). Nothing is acknowledged: the stream keeps every event, and a message at
//! or below a partition's applied sequence is skipped, whoever delivers it. A reader's
//! messages carry the epoch of its claim, so what a released reader had in flight is dropped.
//!
//! Every fifth of a lease, a task of its own ([`Partitions::round`]) renews the leases held
//! and the heartbeat, reads the engines alive, computes the assignment, gives back or claims
//! leases, and starts or stops the standbys' readers; it never waits for the apply loop, so a
//! slow batch or checkpoint cannot let a lease lapse. While another engine's heartbeat is
//! silent, rounds come every twentieth of a lease, so that its leases are claimed soon after
//! they expire. A
//! partition is exported (tenants on /metrics and in the API, queries answered for the others)
//! once its reader has caught up.
//!
//! With `cluster.standby`, an engine also reads and applies, without exporting, the
//! partitions it would take over if their owner stopped. Taking one of them over keeps the
//! standby's reader: the partition is exported as soon as it has applied the partition's last
//! message stored when the lease was taken.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use futures_util::StreamExt;
use kpi_model::partition::split_partitioned_subject;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::apply::{migrated_from, Incoming, Staged};
use crate::cluster::{ClusterView, Responders};
use crate::consume::sleep_until;
use crate::ownership::{assign, standbys, Membership};
use crate::streams::ensure_partitioned_streams;
use crate::{EngineState, Ingest, IngestError};

/// What a partition's reader hands to the ingest.
enum Feed {
    Message {
        partition: u32,
        epoch: u64,
        incoming: Incoming,
        /// Messages of the partition after this one (the lag).
        pending: u64,
    },
    /// Every message the partition held when the reader started was handed over; none of
    /// the partition's messages up to stream sequence `through` is still to come.
    CaughtUp {
        partition: u32,
        epoch: u64,
        through: u64,
    },
    /// A reader cannot read its partition: the engine stops with this message.
    Failed(String),
}

/// The reader of a partition held or followed as a standby: dropping it stops the tasks
/// reading the partition.
struct Reader {
    epoch: u64,
    /// Follows the partition as a standby (applied, not exported).
    standby: bool,
    _stop: watch::Sender<()>,
}

/// What a task reading a partition is told when the partition's [`Reader`] is dropped.
type Stop = watch::Receiver<()>;

fn stopped(stop: &Stop) -> bool {
    stop.has_changed().is_err()
}

/// Partitions taken in one round from which on they are caught up together, in one pass over
/// the stream (the server scans the whole stream for each filtered reader; one unfiltered
/// reader scans it once), before each gets its own reader of what comes next.
const CATCH_UP_TOGETHER: usize = 4;

/// How long a reader catching up waits for its next message before it reads again.
const QUIET: Duration = Duration::from_secs(2);

/// A partition of a catch-up together.
struct Member {
    from: u64,
    epoch: u64,
    stop: Stop,
}

/// What the ownership task and the apply loop share: the readers (whose epochs say which
/// messages still count) and the responders (started as soon as a partition is caught up).
struct Shared {
    readers: Mutex<BTreeMap<u32, Reader>>,
    responders: Mutex<Responders>,
    /// A copy of each partition's applied sequence, updated with the staged one: the rounds
    /// read it without waiting for the staged batch, which a batch holds while it applies.
    applied: Mutex<BTreeMap<u32, u64>>,
}

impl Shared {
    fn readers(&self) -> MutexGuard<'_, BTreeMap<u32, Reader>> {
        self.readers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn responders(&self) -> MutexGuard<'_, Responders> {
        self.responders.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn applied_of(&self, partition: u32) -> u64 {
        self.applied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&partition)
            .copied()
            .unwrap_or(0)
    }

    fn epoch_of(&self, partition: u32) -> Option<u64> {
        self.readers().get(&partition).map(|reader| reader.epoch)
    }
}

/// The membership side of the partitioned ingest, run as its own task every fifth of a
/// lease: however long a batch, a checkpoint or a dead letter takes, the leases are renewed
/// on time.
struct Partitions {
    view: Arc<ClusterView>,
    membership: Membership,
    events: stream::Stream,
    shared: Arc<Shared>,
    feed: mpsc::Sender<Feed>,
    epoch: u64,
    state: Arc<EngineState>,
    /// `cluster.standby`.
    standby: bool,
    /// Partitions taken from their standby, with the last message they held when taken and
    /// when.
    confirming: BTreeMap<u32, (u64, std::time::Instant)>,
}

impl Partitions {
    fn applied_of(&self, partition: u32) -> u64 {
        self.shared.applied_of(partition)
    }

    /// Rounds until `stop` changes; then hands the membership back for leaving.
    ///
    /// A round starts every fifth of a lease, and every twentieth while another engine's
    /// heartbeat has not changed for two rounds (that engine probably stopped: its partitions
    /// are claimed soon after its leases expire rather than up to a fifth of a lease later).
    async fn run(mut self, mut stop: watch::Receiver<()>) -> Partitions {
        let period = (self.view.lease / 5).max(Duration::from_millis(100));
        let watching = (self.view.lease / 20).max(Duration::from_millis(50));
        let mut next = tokio::time::Instant::now();
        let mut watched: Option<String> = None;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {
                    let started = tokio::time::Instant::now();
                    self.round().await;
                    let silent = self.membership.silent(period * 2);
                    match (&silent, &watched) {
                        (Some((engine, silent)), None) => info!(
                            engine,
                            silent_ms = silent.as_millis() as u64,
                            "an engine's heartbeat is not renewed; watching for its leases to expire"
                        ),
                        (None, Some(engine)) => debug!(engine, "no engine's heartbeat is silent any more"),
                        _ => {}
                    }
                    watched = silent.map(|(engine, _)| engine.to_string());
                    let step = if watched.is_some() { watching } else { period };
                    next = started + step;
                }
                _ = stop.changed() => return self,
            }
        }
    }

    /// Replaces `partition`'s reader (stopping the one it had) by one from stream sequence
    /// `from`, to be spawned with [`Partitions::spawn_readers`].
    fn start_reader(&mut self, partition: u32, standby: bool, from: u64) -> Member {
        self.epoch += 1;
        let (stop, stop_told) = watch::channel(());
        self.shared.readers().insert(
            partition,
            Reader {
                epoch: self.epoch,
                standby,
                _stop: stop,
            },
        );
        Member {
            from,
            epoch: self.epoch,
            stop: stop_told,
        }
    }

    /// Reads `members`: in one pass over the stream when they are many, else each apart.
    fn spawn_readers(&self, members: BTreeMap<u32, Member>) {
        if members.len() >= CATCH_UP_TOGETHER {
            tokio::spawn(catch_up_together(
                self.events.clone(),
                members,
                self.feed.clone(),
            ));
        } else {
            self.spawn_readers_apart(members);
        }
    }

    /// Reads each of `members` with its own reader (those with little left to read).
    fn spawn_readers_apart(&self, members: BTreeMap<u32, Member>) {
        for (partition, member) in members {
            tokio::spawn(read_partition(
                self.events.clone(),
                partition,
                member,
                false,
                self.feed.clone(),
            ));
        }
    }

    /// One round of membership: renewals, heartbeat, assignment, hand-overs, claims and
    /// standbys. NATS errors are logged and the round ends; leases not renewed stop being
    /// exported three quarters of a lease after their last renewal was sent.
    async fn round(&mut self) {
        let view = self.view.clone();
        let started = std::time::Instant::now();
        // A step that takes longer than this (a NATS server slow to answer) ends the round:
        // the next one, a fifth of a lease later, renews the leases again.
        let patience = view.lease / 4;
        // The leases first: what keeps the partitions exported does not wait behind reading
        // the engines (a lease about to be given back is renewed too, harmlessly).
        self.renew(&view.held()).await;
        match tokio::time::timeout(patience, self.membership.heartbeat()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => warn!(%error, "heartbeat not renewed"),
            Err(_) => warn!(
                waited_ms = patience.as_millis() as u64,
                "heartbeat not renewed in time"
            ),
        }
        let engines = match tokio::time::timeout(patience, self.membership.engines()).await {
            Ok(Ok(engines)) => engines,
            Ok(Err(error)) => {
                warn!(%error, "cannot read the engines; keeping the partitions held");
                return;
            }
            Err(_) => {
                warn!(
                    waited_ms = patience.as_millis() as u64,
                    "the engines not read in time; keeping the partitions held"
                );
                return;
            }
        };
        let me = self.membership.engine.clone();
        let all: Vec<String> = engines.iter().map(|engine| engine.name.clone()).collect();
        let running: Vec<String> = engines
            .iter()
            .filter(|engine| !engine.warming)
            .map(|engine| engine.name.clone())
            .collect();
        if self.membership.warming && running.is_empty() {
            // Nobody else applies the partitions: waiting would leave them without an owner.
            self.warmed_up("no other engine is running").await;
        }
        // Warming engines are left out while any other runs (all warming: all count).
        let members = if running.is_empty() { &all } else { &running };
        let owners = assign(members, view.partitions);
        let given: Vec<u32> = view
            .held()
            .into_iter()
            .filter(|&partition| owners[partition as usize] != me)
            .collect();
        for partition in given {
            let owner = &owners[partition as usize];
            // Stop exporting first, then give the lease back: the next owner can only take
            // it once this engine no longer shows the partition.
            self.shared.responders().stop(partition);
            view.drop_partition(partition);
            self.shared.readers().remove(&partition);
            self.membership.release(partition).await;
            info!(partition, to = %owner, "gave the partition to another engine");
        }
        let held = view.held();
        let unclaimed: Vec<u32> = (0..view.partitions)
            .filter(|&partition| owners[partition as usize] == me && !held.contains(&partition))
            .collect();
        let mut taken = BTreeMap::new();
        let mut warm = BTreeMap::new();
        let claimed: Vec<(u32, std::time::Instant, bool)> = self
            .membership
            .claim(&unclaimed)
            .await
            .into_iter()
            .map(|(partition, at)| {
                let followed =
                    view.unfollow(partition) && self.shared.readers().contains_key(&partition);
                (partition, at, followed)
            })
            .collect();
        // A standby that caught up goes on reading as the owner: no new consumer to make
        // (which the server takes longer to set up the more messages the partition has). It
        // is caught up once it has applied the partition's last message stored when it took
        // the partition (what the engine before may have shown).
        let events = &self.events;
        let lasts: BTreeMap<u32, u64> = futures_util::future::join_all(
            claimed.iter().filter(|(_, _, followed)| *followed).map(
                |&(partition, _, _)| async move {
                    (partition, last_of(events, partition, patience).await)
                },
            ),
        )
        .await
        .into_iter()
        .filter_map(|(partition, last)| last.map(|last| (partition, last)))
        .collect();
        for (partition, at, followed) in claimed {
            view.take(partition, at);
            if let Some(&last) = lasts.get(&partition) {
                if let Some(reader) = self.shared.readers().get_mut(&partition) {
                    reader.standby = false;
                }
                self.confirming
                    .insert(partition, (last, std::time::Instant::now()));
                info!(
                    partition,
                    through = last,
                    "took the partition its standby follows"
                );
                continue;
            }
            let from = self.applied_of(partition) + 1;
            info!(
                partition,
                from,
                standby = followed,
                "took the partition; catching up"
            );
            let member = self.start_reader(partition, false, from);
            if followed {
                warm.insert(partition, member);
            } else {
                taken.insert(partition, member);
            }
        }
        self.spawn_readers(taken);
        self.spawn_readers_apart(warm);
        self.confirm_caught_up();
        view.settle(all.len());

        // Standbys: the partitions this engine would take over if an engine stopped; those
        // assigned to it that it could not take yet; and those it is to own once the engines
        // warming have joined (all of them, for an engine warming: a join can also move
        // partitions between the engines already running).
        let wanted: std::collections::BTreeSet<u32> = if !self.standby {
            Default::default()
        } else {
            let held = view.held();
            let joined = assign(&all, view.partitions);
            let next = (0..view.partitions)
                .filter(|partition| {
                    let partition = *partition as usize;
                    joined[partition] == me || (!self.membership.warming && owners[partition] == me)
                })
                .filter(|partition| !held.contains(partition));
            let standing = if self.membership.warming {
                Vec::new()
            } else {
                standbys(members, view.partitions, &me)
            };
            next.chain(standing).collect()
        };
        for partition in view.following() {
            if !wanted.contains(&partition) {
                view.unfollow(partition);
                if self
                    .shared
                    .readers()
                    .get(&partition)
                    .is_some_and(|reader| reader.standby)
                {
                    self.shared.readers().remove(&partition);
                }
                info!(partition, "no longer the partition's standby");
            }
        }
        // The partitions owned are caught up on first: following more before would slow
        // them down.
        if self.membership.warming || view.is_caught_up() {
            let mut followed = BTreeMap::new();
            for &partition in &wanted {
                if self.shared.readers().contains_key(&partition) {
                    continue;
                }
                view.follow(partition);
                let from = self.applied_of(partition) + 1;
                info!(partition, from, "following the partition as its standby");
                followed.insert(partition, self.start_reader(partition, true, from));
            }
            self.spawn_readers(followed);
        }
        if self.membership.warming {
            let following = view.following();
            if wanted.is_empty() {
                self.warmed_up("no partition to own").await;
            } else if view.standbys_caught_up() && wanted.iter().all(|p| following.contains(p)) {
                self.warmed_up("caught up on the partitions to own").await;
            }
        }
        self.shared.responders().sync();
        self.state.set_ready(true);
        if started.elapsed() > patience {
            warn!(
                took_ms = started.elapsed().as_millis() as u64,
                "an ownership round took over a quarter of a lease"
            );
        }
    }

    /// The partitions taken from their standby that have applied the last message they held
    /// when taken are caught up (and exported after the grace). One still behind a quarter of
    /// a lease later (its standby's reader stalled, say, after a NATS server was lost) is read
    /// anew from its applied sequence, as a partition taken without a standby.
    fn confirm_caught_up(&mut self) {
        let held = self.view.held();
        let patience = self.view.lease / 4;
        let confirming: Vec<(u32, u64, std::time::Instant, u64)> = self
            .confirming
            .iter()
            .map(|(&partition, &(last, since))| {
                (partition, last, since, self.applied_of(partition))
            })
            .collect();
        let mut anew = BTreeMap::new();
        for (partition, last, since, applied) in confirming {
            if !held.contains(&partition) {
                self.confirming.remove(&partition);
            } else if applied >= last {
                self.confirming.remove(&partition);
                self.view.caught_up(partition);
                self.view.set_lag(partition, 0);
                info!(partition, applied, "caught up: exporting the partition");
            } else if since.elapsed() > patience {
                self.confirming.remove(&partition);
                warn!(
                    partition,
                    applied,
                    through = last,
                    "the standby's reader is behind; reading the partition anew"
                );
                anew.insert(partition, self.start_reader(partition, false, applied + 1));
            }
        }
        self.spawn_readers_apart(anew);
    }

    /// Ends warming: the heartbeat says so at once, and the others hand the partitions over.
    async fn warmed_up(&mut self, why: &str) {
        self.membership.warming = false;
        self.view.set_warming(false);
        info!(why, "warmed up: taking a share of the partitions");
        if let Err(error) = self.membership.heartbeat().await {
            warn!(%error, "heartbeat not renewed");
        }
    }

    async fn renew(&mut self, held: &[u32]) {
        for (partition, outcome) in self.membership.renew(held).await {
            match outcome {
                Ok(Some(at)) => self.view.renewed(partition, at),
                Ok(None) => {}
                Err(()) => {
                    self.shared.responders().stop(partition);
                    self.view.drop_partition(partition);
                    self.shared.readers().remove(&partition);
                    warn!(
                        partition,
                        "lost the partition's lease (not renewed in time)"
                    );
                }
            }
        }
    }
}

impl Ingest {
    pub(crate) async fn partitioned(
        &self,
        js: &jetstream::Context,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), IngestError> {
        let view = self
            .state
            .cluster()
            .cloned()
            .ok_or_else(|| IngestError::Cluster("cluster view not set".into()))?;
        let events = ensure_partitioned_streams(js, &self.config).await?;
        self.check_stream_identity(&events).await?;
        self.load_applied().await?;
        let membership = Membership::join(js, &self.config).await?;
        let (feed, mut fed) = mpsc::channel(self.config.ingest.batch_max_events.max(64) * 4);
        let shared = Arc::new(Shared {
            readers: Mutex::new(BTreeMap::new()),
            responders: Mutex::new(Responders::new(
                js.client(),
                self.state.clone(),
                view.clone(),
            )),
            applied: Mutex::new(self.staged().applied.clone().unwrap_or_default()),
        });
        let warming = membership.warming;
        let partitions = Partitions {
            view: view.clone(),
            membership,
            events,
            shared: shared.clone(),
            feed,
            epoch: 0,
            state: self.state.clone(),
            standby: self.config.cluster.standby,
            confirming: BTreeMap::new(),
        };
        view.set_warming(warming);
        info!(engine = %view.engine, partitions = view.partitions, stream = %self.config.nats.stream, warming, "joined the engines");
        self.state.set_ready(true);
        let (stop_rounds, rounds_stopped) = watch::channel(());
        let rounds = tokio::spawn(partitions.run(rounds_stopped));
        let result = self.run_partitions(js, &shared, &mut fed, shutdown).await;
        // Leaving, on a stop or an error: no more rounds, what was applied is checkpointed,
        // then every lease given back (the others take over at once rather than after a
        // lease).
        drop(stop_rounds);
        let rounds = rounds.await;
        let checkpointed = self.checkpoint(None).await;
        let mut partitions =
            rounds.map_err(|error| IngestError::Join(format!("ownership rounds: {error}")))?;
        for partition in view.held() {
            shared.responders().stop(partition);
            view.drop_partition(partition);
            shared.readers().remove(&partition);
            partitions.membership.release(partition).await;
        }
        shared.readers().clear();
        partitions.membership.leave().await;
        result.and(checkpointed)
    }

    /// Refuses a store whose applied sequences are those of another stream of the same name
    /// (deleted and created again: its sequences start over, and the store would skip them).
    /// The stream's creation time identifies it; a store that has none recorded yet records
    /// it.
    async fn check_stream_identity(&self, events: &stream::Stream) -> Result<(), IngestError> {
        let info = events.cached_info();
        let identity = info.created.unix_timestamp_nanos().to_string();
        let store = self.store.clone();
        let recorded = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || store.stream_identity())
                .await
                .map_err(|error| IngestError::Join(error.to_string()))??
        };
        match recorded {
            Some(recorded) if recorded == identity => Ok(()),
            Some(recorded) => Err(IngestError::Cluster(format!(
                "store.path: {} holds partitions applied from another stream {} (created at {} ns, this one at {identity} ns after the epoch: it was deleted and created again, and its sequences started over); give the engine an empty store.path to rebuild its partitions from this stream",
                self.config.store.path.display(),
                info.config.name,
                recorded
            ))),
            None => {
                tokio::task::spawn_blocking(move || store.set_stream_identity(&identity))
                    .await
                    .map_err(|error| IngestError::Join(error.to_string()))??;
                Ok(())
            }
        }
    }

    /// Loads the partitions' applied sequences from the store, once per process.
    async fn load_applied(&self) -> Result<(), IngestError> {
        if self.staged().applied.is_some() {
            return Ok(());
        }
        let store = self.store.clone();
        let applied = tokio::task::spawn_blocking(move || store.applied_sequences())
            .await
            .map_err(|error| IngestError::Join(error.to_string()))??;
        self.staged().applied = Some(applied);
        Ok(())
    }

    fn applied_of(&self, partition: u32) -> u64 {
        applied_in(&self.staged, partition)
    }

    async fn run_partitions(
        &self,
        js: &jetstream::Context,
        shared: &Shared,
        fed: &mut mpsc::Receiver<Feed>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), IngestError> {
        let view = self
            .state
            .cluster()
            .cloned()
            .ok_or_else(|| IngestError::Cluster("cluster view not set".into()))?;
        let batch_wait = Duration::from_millis(self.config.ingest.batch_max_wait_ms);
        let checkpoint_wait = Duration::from_millis(self.config.ingest.checkpoint_max_wait_ms);
        let batch_max = self.config.ingest.batch_max_events;
        loop {
            let checkpoint_due = self
                .staged()
                .since
                .map(|since| tokio::time::Instant::from_std(since + checkpoint_wait));
            let first = tokio::select! {
                feed = fed.recv() => match feed {
                    Some(feed) => feed,
                    None => return Err(IngestError::JetStream("the readers' channel closed".into())),
                },
                _ = sleep_until(checkpoint_due) => {
                    self.checkpoint(None).await?;
                    continue;
                }
                _ = shutdown.changed() => return Ok(()),
            };
            let mut feeds = vec![first];
            let deadline = tokio::time::Instant::now() + batch_wait;
            while feeds.len() < batch_max {
                match fed.try_recv() {
                    Ok(feed) => feeds.push(feed),
                    Err(_) => match tokio::time::timeout_at(deadline, fed.recv()).await {
                        Ok(Some(feed)) => feeds.push(feed),
                        _ => break,
                    },
                }
            }
            let mut items = Vec::with_capacity(feeds.len());
            let mut advanced: BTreeMap<u32, (u64, u64)> = BTreeMap::new();
            let mut caught_up = Vec::new();
            for feed in feeds {
                match feed {
                    Feed::Message {
                        partition,
                        epoch,
                        incoming,
                        pending,
                    } => {
                        let current = shared.epoch_of(partition);
                        let floor = advanced
                            .get(&partition)
                            .map(|(sequence, _)| *sequence)
                            .unwrap_or_else(|| self.applied_of(partition));
                        if current != Some(epoch) || incoming.stream_sequence <= floor {
                            continue;
                        }
                        advanced.insert(partition, (incoming.stream_sequence, pending));
                        items.push(incoming);
                    }
                    Feed::Failed(message) => return Err(IngestError::Cluster(message)),
                    Feed::CaughtUp {
                        partition,
                        epoch,
                        through,
                    } => {
                        if shared.epoch_of(partition) == Some(epoch) {
                            caught_up.push((partition, through));
                        }
                    }
                }
            }
            self.process(js, items).await?;
            {
                let mut staged = self.staged();
                let applied = staged.applied.get_or_insert_with(BTreeMap::new);
                // A partition read through sequence `through` resumes after it, even if its
                // own last message is far before (a pass over the whole stream read it).
                let read = advanced
                    .iter()
                    .map(|(partition, (sequence, _))| (*partition, *sequence))
                    .chain(caught_up.iter().copied());
                let mut copy = shared.applied.lock().unwrap_or_else(|e| e.into_inner());
                for (partition, sequence) in read {
                    let entry = applied.entry(partition).or_insert(0);
                    *entry = (*entry).max(sequence);
                    copy.insert(partition, *entry);
                }
            }
            for (partition, (_, pending)) in &advanced {
                view.set_lag(*partition, *pending);
            }
            self.state
                .metrics
                .consumer_pending
                .set(view.total_lag() as i64);
            for (partition, _) in &caught_up {
                view.caught_up(*partition);
                view.set_lag(*partition, 0);
                let applied = self.applied_of(*partition);
                if shared.readers().get(partition).is_some_and(|r| r.standby) {
                    info!(
                        partition,
                        applied, "caught up on the partition as its standby"
                    );
                } else {
                    info!(partition, applied, "caught up: exporting the partition");
                }
            }
            if !caught_up.is_empty() {
                shared.responders().sync();
            }
            let due = {
                let staged = self.staged();
                staged.events >= self.config.ingest.checkpoint_max_events
                    || staged
                        .since
                        .is_some_and(|since| since.elapsed() >= checkpoint_wait)
            };
            if due {
                self.checkpoint(None).await?;
            }
        }
    }
}

/// The applied sequence of `partition` in `staged` (0: none).
/// The stream sequence of the last message stored under `partition` (0 when none), or `None`
/// when the server does not say within `patience`.
async fn last_of(events: &stream::Stream, partition: u32, patience: Duration) -> Option<u64> {
    let subject = format!("{partition}.>");
    match tokio::time::timeout(patience, events.get_last_raw_message_by_subject(&subject)).await {
        Ok(Ok(message)) => Some(message.sequence),
        Ok(Err(error)) if error.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {
            Some(0)
        }
        Ok(Err(error)) => {
            warn!(partition, %error, "the partition's last message unknown; reading it anew");
            None
        }
        Err(_) => None,
    }
}

fn applied_in(staged: &Mutex<Staged>, partition: u32) -> u64 {
    staged
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .applied
        .as_ref()
        .and_then(|applied| applied.get(&partition).copied())
        .unwrap_or(0)
}

/// Reads partition `partition` from stream sequence `member.from` on, handing every message
/// over, and says when it has handed over all the partition held at the start (unless
/// `caught_up` already). Re-creates its ordered consumer after an error, from the next
/// sequence; ends when the partition's reader is dropped.
async fn read_partition(
    events: stream::Stream,
    partition: u32,
    member: Member,
    mut caught_up: bool,
    feed: mpsc::Sender<Feed>,
) {
    let Member {
        from,
        epoch,
        mut stop,
    } = member;
    let filter = format!("{partition}.>");
    let mut next = from;
    loop {
        if stopped(&stop) {
            return;
        }
        let created = events
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: filter.clone(),
                deliver_policy: if next <= 1 {
                    consumer::DeliverPolicy::All
                } else {
                    consumer::DeliverPolicy::ByStartSequence {
                        start_sequence: next,
                    }
                },
                description: Some(format!("KPI engine: partition {partition}")),
                ..Default::default()
            })
            .await;
        let mut reader = match created {
            Ok(reader) => reader,
            Err(error) => {
                warn!(partition, %error, "cannot read the partition; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        match reader.info().await {
            Ok(info) if info.config.filter_subject != filter => {
                let failed = format!(
                    "the server did not keep the filter subject `{filter}` of partition {partition}'s reader (it stored `{}`): multi-engine mode needs nats-server 2.11 or later",
                    info.config.filter_subject
                );
                let _ = feed.send(Feed::Failed(failed)).await;
                return;
            }
            Ok(info) if info.num_pending == 0 => {
                if !say_caught_up(&feed, partition, epoch, &mut caught_up).await {
                    return;
                }
            }
            Ok(_) => {}
            Err(error) => warn!(partition, %error, "partition reader info unavailable"),
        }
        let mut messages = match reader.messages().await {
            Ok(messages) => messages,
            Err(error) => {
                warn!(partition, %error, "cannot read the partition; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        loop {
            // Catching up, the partition has messages still to come: a reader silent for a
            // while has lost its consumer (the server drops an idle ephemeral one), so it is
            // made again from the next sequence rather than waiting for missed heartbeats.
            let quiet = if caught_up { Duration::MAX } else { QUIET };
            let message = tokio::select! {
                message = tokio::time::timeout(quiet, messages.next()) => match message {
                    Ok(message) => message,
                    Err(_) => {
                        warn!(partition, next, "partition reader silent while catching up; reading again");
                        break;
                    }
                },
                _ = stop.changed() => return,
            };
            let Some(message) = message else { break };
            let message = match message {
                Ok(message) => message,
                Err(error) => {
                    warn!(partition, %error, "partition reader interrupted; resuming");
                    break;
                }
            };
            // A message without its metadata is read again, never skipped.
            let Ok(info) = message.info() else { break };
            let subject = match split_partitioned_subject(&message.subject) {
                Some((_, subject)) => subject.to_string(),
                None => message.subject.to_string(),
            };
            let incoming = Incoming {
                subject,
                payload: message.payload.clone(),
                stream_sequence: info.stream_sequence,
                published_unix_seconds: info.published.unix_timestamp_nanos() as f64 / 1e9,
                partition: Some(partition),
                migrated_from: migrated_from(message.headers.as_ref()),
            };
            next = info.stream_sequence + 1;
            let pending = info.pending;
            if feed
                .send(Feed::Message {
                    partition,
                    epoch,
                    incoming,
                    pending,
                })
                .await
                .is_err()
            {
                return;
            }
            if pending == 0 && !say_caught_up(&feed, partition, epoch, &mut caught_up).await {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Hands over the reader's first [`Feed::CaughtUp`]; false when the ingest is gone.
async fn say_caught_up(
    feed: &mpsc::Sender<Feed>,
    partition: u32,
    epoch: u64,
    caught_up: &mut bool,
) -> bool {
    if *caught_up {
        return true;
    }
    *caught_up = true;
    let through = 0;
    feed.send(Feed::CaughtUp {
        partition,
        epoch,
        through,
    })
    .await
    .is_ok()
}

/// Catches up the partitions `members` in one pass over the stream: an unfiltered ordered
/// consumer from the lowest sequence any of them needs to the stream's last sequence when it
/// starts, handing over the messages of the members at or after their own start; then says
/// they are caught up and starts each member's own reader after the last sequence read.
async fn catch_up_together(
    mut events: stream::Stream,
    members: BTreeMap<u32, Member>,
    feed: mpsc::Sender<Feed>,
) {
    let Some(mut next) = members.values().map(|member| member.from).min() else {
        return;
    };
    let last = loop {
        match events.info().await {
            Ok(info) => break info.state.last_sequence,
            Err(error) => {
                warn!(%error, "stream info unavailable; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        if members.values().all(|member| stopped(&member.stop)) {
            return;
        }
    };
    info!(
        partitions = members.len(),
        from = next,
        to = last,
        "catching up the partitions taken in one pass"
    );
    'pass: while next <= last {
        if members.values().all(|member| stopped(&member.stop)) {
            return;
        }
        let created = events
            .create_consumer(consumer::pull::OrderedConfig {
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: next,
                },
                description: Some("KPI engine: partitions catching up".into()),
                ..Default::default()
            })
            .await;
        let mut messages = match created {
            Ok(mut reader) => match reader.info().await {
                // Nothing left up to `last` (purged or expired): the pass is over.
                Ok(info) if info.num_pending == 0 => {
                    next = last + 1;
                    break 'pass;
                }
                _ => match reader.messages().await {
                    Ok(messages) => messages,
                    Err(error) => {
                        warn!(%error, "cannot read the stream; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                },
            },
            Err(error) => {
                warn!(%error, "cannot read the stream; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        loop {
            if members.values().all(|member| stopped(&member.stop)) {
                return;
            }
            let message = match tokio::time::timeout(QUIET, messages.next()).await {
                Ok(Some(message)) => message,
                Ok(None) => break,
                Err(_) => {
                    warn!(next, last, "catch-up reader silent; reading again");
                    continue 'pass;
                }
            };
            let message = match message {
                Ok(message) => message,
                Err(error) => {
                    warn!(%error, "catch-up reader interrupted; resuming");
                    continue 'pass;
                }
            };
            let Ok(info) = message.info() else {
                continue 'pass;
            };
            let sequence = info.stream_sequence;
            let pending = info.pending;
            if let Some((partition, subject)) = split_partitioned_subject(&message.subject) {
                if let Some(member) = members.get(&partition) {
                    if sequence >= member.from && !stopped(&member.stop) {
                        let incoming = Incoming {
                            subject: subject.to_string(),
                            payload: message.payload.clone(),
                            stream_sequence: sequence,
                            published_unix_seconds: info.published.unix_timestamp_nanos() as f64
                                / 1e9,
                            partition: Some(partition),
                            migrated_from: migrated_from(message.headers.as_ref()),
                        };
                        let message = Feed::Message {
                            partition,
                            epoch: member.epoch,
                            incoming,
                            pending,
                        };
                        if feed.send(message).await.is_err() {
                            return;
                        }
                    }
                }
            }
            next = sequence + 1;
            if sequence >= last || pending == 0 {
                break 'pass;
            }
        }
    }
    for (partition, member) in members {
        if stopped(&member.stop) {
            continue;
        }
        let epoch = member.epoch;
        if feed
            .send(Feed::CaughtUp {
                partition,
                epoch,
                through: next - 1,
            })
            .await
            .is_err()
        {
            return;
        }
        let member = Member {
            from: member.from.max(next),
            ..member
        };
        tokio::spawn(read_partition(
            events.clone(),
            partition,
            member,
            true,
            feed.clone(),
        ));
    }
}
