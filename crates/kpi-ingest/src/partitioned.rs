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
//! Every fifth of a lease, [`Ingest::ownership_round`] renews the heartbeat, reads the engines
//! alive, computes the assignment, renews or gives back the leases held, and claims the
//! partitions assigned and free. A partition is exported (tenants on /metrics and in the API,
//! queries answered for the others) once its reader has caught up.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use futures_util::StreamExt;
use kpi_model::partition::split_partitioned_subject;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::apply::Incoming;
use crate::cluster::{ClusterView, Responders};
use crate::consume::sleep_until;
use crate::ownership::{assign, Membership};
use crate::streams::ensure_partitioned_streams;
use crate::{Ingest, IngestError};

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

/// The reader of a partition held: dropping it stops the tasks reading the partition.
struct Reader {
    epoch: u64,
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

/// What the partitioned ingest keeps between rounds.
struct Partitions {
    view: Arc<ClusterView>,
    membership: Membership,
    events: stream::Stream,
    readers: BTreeMap<u32, Reader>,
    responders: Responders,
    feed: mpsc::Sender<Feed>,
    epoch: u64,
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
        self.load_applied().await?;
        let membership = Membership::join(js, &self.config).await?;
        let (feed, mut fed) = mpsc::channel(self.config.ingest.batch_max_events.max(64) * 4);
        let mut partitions = Partitions {
            view: view.clone(),
            membership,
            events,
            readers: BTreeMap::new(),
            responders: Responders::new(js.client(), self.state.clone(), view.clone()),
            feed,
            epoch: 0,
        };
        info!(engine = %view.engine, partitions = view.partitions, stream = %self.config.nats.stream, "joined the engines");
        self.state.set_ready(true);
        let result = self
            .run_partitions(js, &mut partitions, &mut fed, shutdown)
            .await;
        // Leaving, on a stop or an error: what was applied is checkpointed, then every lease
        // given back (the others take over at once rather than after a lease).
        let checkpointed = self.checkpoint(None).await;
        for partition in view.held() {
            partitions.responders.stop(partition);
            view.drop_partition(partition);
            partitions.readers.remove(&partition);
            partitions.membership.release(partition).await;
        }
        partitions.membership.leave().await;
        result.and(checkpointed)
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
        self.staged()
            .applied
            .as_ref()
            .and_then(|applied| applied.get(&partition).copied())
            .unwrap_or(0)
    }

    async fn run_partitions(
        &self,
        js: &jetstream::Context,
        partitions: &mut Partitions,
        fed: &mut mpsc::Receiver<Feed>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), IngestError> {
        let mut rounds =
            tokio::time::interval((partitions.view.lease / 5).max(Duration::from_millis(100)));
        rounds.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let batch_wait = Duration::from_millis(self.config.ingest.batch_max_wait_ms);
        let checkpoint_wait = Duration::from_millis(self.config.ingest.checkpoint_max_wait_ms);
        let batch_max = self.config.ingest.batch_max_events;
        loop {
            let checkpoint_due = self
                .staged()
                .since
                .map(|since| tokio::time::Instant::from_std(since + checkpoint_wait));
            let first = tokio::select! {
                _ = rounds.tick() => {
                    self.ownership_round(partitions).await;
                    continue;
                }
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
                        let current = partitions.readers.get(&partition).map(|r| r.epoch);
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
                        if partitions.readers.get(&partition).map(|r| r.epoch) == Some(epoch) {
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
                for (partition, sequence) in read {
                    let entry = applied.entry(partition).or_insert(0);
                    *entry = (*entry).max(sequence);
                }
            }
            for (partition, (_, pending)) in &advanced {
                partitions.view.set_lag(*partition, *pending);
            }
            self.state
                .metrics
                .consumer_pending
                .set(partitions.view.total_lag() as i64);
            for (partition, _) in &caught_up {
                partitions.view.caught_up(*partition);
                partitions.view.set_lag(*partition, 0);
                info!(
                    partition,
                    applied = self.applied_of(*partition),
                    "caught up: exporting the partition"
                );
            }
            if !caught_up.is_empty() {
                partitions.responders.sync();
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

    /// One round of membership: renewals, heartbeat, assignment, hand-overs and claims. NATS
    /// errors are logged and the round ends; leases not renewed stop being exported three
    /// quarters of a lease after their last renewal was sent.
    async fn ownership_round(&self, partitions: &mut Partitions) {
        let view = partitions.view.clone();
        // The leases first: what keeps the partitions exported does not wait behind reading
        // the engines (a lease about to be given back is renewed too, harmlessly).
        self.renew(partitions, &view.held()).await;
        if let Err(error) = partitions.membership.heartbeat().await {
            warn!(%error, "heartbeat not renewed");
        }
        let engines = match partitions.membership.engines().await {
            Ok(engines) => engines,
            Err(error) => {
                warn!(%error, "cannot read the engines; keeping the partitions held");
                return;
            }
        };
        let owners = assign(&engines, view.partitions);
        let me = partitions.membership.engine.clone();
        let given: Vec<u32> = view
            .held()
            .into_iter()
            .filter(|&partition| owners[partition as usize] != me)
            .collect();
        for partition in given {
            let owner = &owners[partition as usize];
            {
                // Stop exporting first, then give the lease back: the next owner can only
                // take it once this engine no longer shows the partition.
                partitions.responders.stop(partition);
                view.drop_partition(partition);
                partitions.readers.remove(&partition);
                partitions.membership.release(partition).await;
                info!(partition, to = %owner, "gave the partition to another engine");
            }
        }
        let mut taken = BTreeMap::new();
        for (partition, owner) in owners.iter().enumerate() {
            let partition = partition as u32;
            if *owner != me || partitions.readers.contains_key(&partition) {
                continue;
            }
            if let Some(at) = partitions.membership.claim(partition).await {
                view.take(partition, at);
                partitions.epoch += 1;
                let from = self.applied_of(partition) + 1;
                info!(partition, from, "took the partition; catching up");
                let (stop, stop_told) = watch::channel(());
                partitions.readers.insert(
                    partition,
                    Reader {
                        epoch: partitions.epoch,
                        _stop: stop,
                    },
                );
                taken.insert(
                    partition,
                    Member {
                        from,
                        epoch: partitions.epoch,
                        stop: stop_told,
                    },
                );
            }
        }
        if taken.len() >= CATCH_UP_TOGETHER {
            tokio::spawn(catch_up_together(
                partitions.events.clone(),
                taken,
                partitions.feed.clone(),
            ));
        } else {
            for (partition, member) in taken {
                tokio::spawn(read_partition(
                    partitions.events.clone(),
                    partition,
                    member,
                    false,
                    partitions.feed.clone(),
                ));
            }
        }
        view.settle(engines.len());
        partitions.responders.sync();
        self.state.set_ready(true);
    }

    async fn renew(&self, partitions: &mut Partitions, held: &[u32]) {
        for (partition, outcome) in partitions.membership.renew(held).await {
            match outcome {
                Ok(Some(at)) => partitions.view.renewed(partition, at),
                Ok(None) => {}
                Err(()) => {
                    partitions.responders.stop(partition);
                    partitions.view.drop_partition(partition);
                    partitions.readers.remove(&partition);
                    warn!(
                        partition,
                        "lost the partition's lease (not renewed in time)"
                    );
                }
            }
        }
    }
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
