//! The rdkafka adapter: client settings per Kafka tier, the producer behind
//! [`PartitionSink`], and the consumer thread that owns the group membership and feeds partition
//! actors.
//!
//! librdkafka's polling runs on one dedicated OS thread (`partita-consumer`), never on the async
//! runtime. Rebalance callbacks run on that thread too: on assign they pause the new partitions
//! and start their claims in the state store (which fence older owners, and may restore the
//! partition first) on the async runtime, so the node's other partitions keep flowing meanwhile;
//! each partition starts its actor at the stored applied offset once its claim is done. On revoke
//! they wait for a claim still running, drain the actor and commit before giving the partition up.
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use partita_actors::partition::decode::Limits;
use partita_actors::partition::supervisor::{self, PartitionDown, PartitionSupervisor, SupervisorMsg};
use partita_actors::partition::{
    InputRecord, PartitionArgs, PartitionConfig, PartitionMsg, PipelineCounters, PipelineObserver, Tracer,
};
use partita_actors::pool::Router;
use partita_actors::state::{Epoch, Offset, PartitionId, PartitionMeta, StateCache, StateStore, StoreError};
use partita_actors::supervision::{RestartBudget, RestartPolicy};
use ractor::{Actor, ActorRef};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Offset as KOffset, TopicPartitionList};
use tokio::runtime::Handle;

use super::{KafkaSink, KafkaTier};

/// What the consumer thread needs to start partition actors.
pub struct Wiring<S: StateStore> {
    pub topic: Arc<str>,
    pub cache: Arc<StateCache<S>>,
    pub router: Router,
    pub sink: Arc<KafkaSink>,
    pub limits: Arc<Limits>,
    pub config: PartitionConfig,
    pub counters: Arc<PipelineCounters>,
    pub observer: Arc<dyn PipelineObserver>,
    pub tracer: Arc<dyn Tracer>,
    /// `joined` is set once the group assigned this node (possibly nothing).
    pub health: Arc<crate::telemetry::Health>,
    /// Records queued per partition before the consumer pauses it.
    pub queue_capacity: usize,
    /// Bytes queued per partition before the consumer pauses it.
    pub queue_bytes: usize,
    /// Longest wait for a partition actor to drain on revoke or shutdown.
    pub drain_timeout: Duration,
    /// Restart budget of each partition actor.
    pub restart: RestartPolicy,
    /// A partition with records waiting and no commit for this long is frozen: its actor is
    /// killed and restarted.
    pub frozen_after: Duration,
    /// The input topic's partition count the deployment expects (`None`: the first one seen).
    pub input_partitions: Option<usize>,
}

/// A partition's actor and its queue.
struct Running {
    tx: Sender<InputRecord>,
    wake_pending: Arc<AtomicBool>,
    queued_bytes: Arc<AtomicUsize>,
    actor: ActorRef<PartitionMsg>,
}

impl Running {
    /// Queue `rec` unless the queue is full in records, or in bytes (one record always fits an
    /// empty queue, however large: the consumer cut it down to the limits already).
    #[allow(clippy::result_large_err)] // crossbeam's own `try_send` shape: the record comes back
    fn try_send(&self, rec: InputRecord, max_bytes: usize) -> Result<(), TrySendError<InputRecord>> {
        let size = rec.size();
        let before = self.queued_bytes.fetch_add(size, Ordering::SeqCst);
        if before > 0 && before + size > max_bytes {
            self.queued_bytes.fetch_sub(size, Ordering::SeqCst);
            return Err(TrySendError::Full(rec));
        }
        self.tx.try_send(rec).inspect_err(|_| {
            self.queued_bytes.fetch_sub(size, Ordering::SeqCst);
        })
    }
}

/// What a partition of this node is doing, for `partita_partition_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    /// Its actor runs.
    Running,
    /// Waiting to (re)start: its actor failed (restart after the backoff), or the store could not
    /// take the claim yet. The Kafka partition is paused meanwhile.
    Starting,
    /// A newer owner fenced it: this node stopped processing it and waits for the group to take
    /// it away.
    Fenced,
}

impl SlotState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Starting => "starting",
            Self::Fenced => "fenced",
        }
    }
}

/// An assigned partition: its actor (while one runs), records held back while it is paused, and
/// its supervision (restart budget, next start).
struct Slot {
    run: Option<Running>,
    /// Records polled after the queue filled. librdkafka purges a paused partition's prefetched
    /// records and resumes after the last one polled, so this holds one record, or a few polled
    /// in the instant before the pause took effect; none may be dropped (they count as consumed).
    held: VecDeque<InputRecord>,
    /// Offsets below this were handed over already (librdkafka may redeliver after a pause).
    next_offset: i64,
    /// The actor's queue is gone (it stopped); its records are dropped until it restarts (they
    /// are read again from the stored offset).
    dead: bool,
    /// The epoch this node claimed; `None` until a claim succeeded.
    epoch: Option<Epoch>,
    /// The newest epoch a failed claim of this node tried: the store may hold it (a claim can
    /// fail after taking the epoch, e.g. during a changelog restore), and it is still this node's.
    attempted: Option<Epoch>,
    state: SlotState,
    budget: RestartBudget,
    /// When to try (re)starting the actor.
    start_at: Option<Instant>,
    restarts: u64,
    /// Last time the partition made progress (a commit, or nothing waiting): frozen detection.
    progress_at: Instant,
    /// The claim running for it, if one does.
    claiming: Option<Claiming>,
}

/// A claim running on the async runtime; its result comes back as a [`Claimed`].
struct Claiming {
    token: u64,
    /// The epoch this node held (a restart), `None` for a new assignment.
    expected: Option<Epoch>,
    task: tokio::task::JoinHandle<()>,
}

/// A finished claim, for the poll loop.
struct Claimed {
    p: i32,
    token: u64,
    result: Result<PartitionMeta, StartError>,
    /// The epoch it asked the store for, if it got that far.
    attempted: Option<Epoch>,
}

/// The epochs of a partition that are this node's: the one it holds and the newest it tried.
#[derive(Debug, Clone, Copy)]
struct Mine {
    held: Epoch,
    attempted: Option<Epoch>,
}

impl Slot {
    fn new(policy: &RestartPolicy) -> Self {
        Self {
            run: None,
            held: VecDeque::new(),
            next_offset: 0,
            dead: false,
            epoch: None,
            attempted: None,
            state: SlotState::Starting,
            budget: RestartBudget::new(policy.clone()),
            start_at: None,
            restarts: 0,
            progress_at: Instant::now(),
            claiming: None,
        }
    }

    fn set_running(&mut self, run: Running, meta: PartitionMeta) {
        self.run = Some(run);
        self.held.clear();
        self.dead = false;
        self.next_offset = meta.applied_offset.map_or(0, |o| o.0 + 1);
        self.epoch = Some(meta.epoch);
        self.attempted = None;
        self.state = SlotState::Running;
        self.start_at = None;
        self.progress_at = Instant::now();
    }
}

/// Become the owner of `p` in the store. `mine`: the epochs this node holds or tried (a restart):
/// if the store holds another, a newer owner exists and the partition is not taken back. Also
/// returns the epoch it asked the store for, if it got that far.
async fn claim<S: StateStore>(
    cache: &StateCache<S>,
    p: i32,
    mine: Option<Mine>,
) -> (Result<PartitionMeta, StartError>, Option<Epoch>) {
    let mut attempted = None;
    let result = claim_as(cache, p, mine, &mut attempted).await;
    (result, attempted)
}

async fn claim_as<S: StateStore>(
    cache: &StateCache<S>,
    p: i32,
    mine: Option<Mine>,
    attempted: &mut Option<Epoch>,
) -> Result<PartitionMeta, StartError> {
    let partition = PartitionId(p as u32);
    let store = cache.store();
    let to_start = |e: StoreError| match e {
        StoreError::Unavailable { .. } => StartError::Retry(e.to_string()),
        StoreError::Fenced { .. } => StartError::Fenced(e.to_string()),
        StoreError::Corrupt { .. } => StartError::Fatal(e.to_string()),
    };
    // Crash tests: `claim=3*return` makes three claims meet an unavailable store;
    // `claim-delay=N*return(MS)` makes N claims take MS ms longer (a slow restore).
    fail::fail_point!("claim", |_| Err(StartError::Retry("fail point claim".into())));
    if let Some(ms) = claim_delay() {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let meta = store.meta(partition).await.map_err(to_start)?;
    if let Some(mine) = mine
        && meta.epoch != mine.held
        && Some(meta.epoch) != mine.attempted
    {
        return Err(StartError::Fenced(format!(
            "partition {p} is held by epoch {}, this node had {}",
            meta.epoch, mine.held
        )));
    }
    let epoch = Epoch(meta.epoch.0 + 1);
    *attempted = Some(epoch);
    let meta = store.claim(partition, epoch).await.map_err(to_start)?;
    // A write the previous actor had in flight either landed before the claim (and is in
    // `meta`) or is fenced now; cached states of the partition may predate it.
    cache.invalidate_partition(partition);
    Ok(meta)
}

/// The fail point `claim-delay`'s milliseconds, when it fires.
fn claim_delay() -> Option<u64> {
    fail::fail_point!("claim-delay", |ms| ms.and_then(|m| m.parse().ok()));
    None
}

/// Why a partition could not be (re)started now.
enum StartError {
    /// Try again after a backoff (the store is unavailable, a seek failed).
    Retry(String),
    /// A newer owner holds the partition: do not claim it back.
    Fenced(String),
    /// Retrying cannot help (corrupt store metadata): the node stops.
    Fatal(String),
}

/// The consumer's context: rebalance handling, partition supervision and statistics.
pub struct NodeContext<S: StateStore> {
    wiring: Wiring<S>,
    handle: Handle,
    slots: Mutex<HashMap<i32, Slot>>,
    commits: Receiver<(PartitionId, Offset)>,
    supervisor: ActorRef<SupervisorMsg<S, KafkaSink>>,
    downs: Receiver<PartitionDown>,
    /// Claims finished on the async runtime, and the source of their tokens.
    claimed: (Sender<Claimed>, Receiver<Claimed>),
    claims: AtomicU64,
    /// Consumer lag per partition, from librdkafka's statistics.
    pub lag: Mutex<HashMap<i32, i64>>,
    /// The broker each owned partition is fetched from (librdkafka's statistics): a same-zone
    /// follower when rack-aware fetching works.
    pub fetched_from: Mutex<HashMap<i32, i32>>,
    /// Set when the node cannot continue (it stops with this error).
    fatal: Mutex<Option<String>>,
    /// Partitions assigned now.
    pub assigned: AtomicI64,
    /// The input topic's partition count, as first seen (or configured).
    partition_count: Mutex<Option<usize>>,
}

impl<S: StateStore> ClientContext for NodeContext<S> {
    fn stats(&self, stats: Statistics) {
        let mut lag = self.lag.lock().unwrap();
        let mut fetched_from = self.fetched_from.lock().unwrap();
        if let Some(t) = stats.topics.get(&*self.wiring.topic) {
            for (p, part) in &t.partitions {
                if *p >= 0 && part.desired && part.broker >= 0 {
                    fetched_from.insert(*p, part.broker);
                }
                // From the offset stored for commit (records applied and durable), known as soon as
                // the first batch is written; `consumer_lag` counts from the last *committed*
                // offset and stays unknown until the first auto-commit.
                let l =
                    if part.consumer_lag_stored >= 0 { part.consumer_lag_stored } else { part.consumer_lag };
                if *p >= 0 && l >= 0 {
                    lag.insert(*p, l);
                }
            }
        }
    }
}

impl<S: StateStore> ConsumerContext for NodeContext<S> {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: rdkafka::types::RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        use rdkafka::types::RDKafkaRespErr as E;
        let cooperative = matches!(consumer.rebalance_protocol(), RebalanceProtocol::Cooperative);
        let result = match err {
            E::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.check_partition_count(consumer);
                let claiming = self.on_assign(tpl);
                self.wiring.health.joined.store(true, Ordering::SeqCst);
                let assigned =
                    if cooperative { consumer.incremental_assign(tpl) } else { consumer.assign(tpl) };
                // Fetched once claimed (librdkafka also keeps a partition's pause flag across
                // unassign/assign: the claim's completion resumes it either way).
                for p in claiming {
                    pause(consumer, &self.wiring.topic, p, true);
                }
                assigned
            }
            E::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                if consumer.assignment_lost() {
                    self.on_lost(tpl);
                } else {
                    self.on_revoke(consumer, tpl);
                }
                if cooperative { consumer.incremental_unassign(tpl) } else { consumer.unassign() }
            }
            other => {
                tracing::error!(error = ?other, "rebalance error");
                consumer.unassign()
            }
        };
        if let Err(e) = result {
            self.set_fatal(format!("applying the rebalance: {e}"));
        }
        let n = consumer.assignment().map_or(0, |a| a.count());
        self.assigned.store(n as i64, Ordering::SeqCst);
    }
}

impl<S: StateStore> NodeContext<S> {
    fn set_fatal(&self, msg: String) {
        tracing::error!(%msg, "consumer cannot continue");
        self.wiring.health.set_failed(&msg);
        self.fatal.lock().unwrap().get_or_insert(msg);
    }

    /// The input topic's partition count must not change: keys hash to partitions, and a key's
    /// state lives with the partition that applied its events, so new partitions would split
    /// keys from their state. A change (or a count other than the configured one) stops the node.
    fn check_partition_count(&self, consumer: &BaseConsumer<Self>) {
        let topic = &self.wiring.topic;
        let count = match consumer.fetch_metadata(Some(topic), Duration::from_secs(10)) {
            Ok(md) => md.topics().iter().find(|t| t.name() == &**topic).map_or(0, |t| t.partitions().len()),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the input topic's partition count");
                return;
            }
        };
        let mut known = self.partition_count.lock().unwrap();
        match *known {
            Some(expected) if expected != count && count > 0 => {
                drop(known);
                self.set_fatal(format!(
                    "the input topic {topic} has {count} partitions, {expected} expected: keys moved between partitions and \
                     would be scored without their state (docs/pipeline.md, \"Partition count\")"
                ));
            }
            Some(_) => {}
            None if count > 0 => *known = Some(count),
            None => {}
        }
    }

    /// Start each new partition's claim (fencing older owners; it may restore the partition
    /// first) on the async runtime; the partition stays paused until [`Self::on_claimed`] seeks
    /// it to the stored applied offset and starts its actor. Returns the partitions.
    fn on_assign(&self, tpl: &mut TopicPartitionList) -> Vec<i32> {
        let parts: Vec<(String, i32)> =
            tpl.elements().iter().map(|e| (e.topic().to_owned(), e.partition())).collect();
        let mut slots = self.slots.lock().unwrap();
        for (topic, p) in &parts {
            // A valid start for librdkafka while it is paused (the claim seeks it to the stored
            // offset): with `auto.offset.reset=error` an unset one is an error.
            let _ = tpl.set_partition_offset(topic, *p, KOffset::Beginning);
            let mut slot = Slot::new(&self.wiring.restart);
            slot.claiming = Some(self.start_claim(*p, None));
            slots.insert(*p, slot);
        }
        parts.into_iter().map(|(_, p)| p).collect()
    }

    /// Run the claim of `p` on the async runtime. `mine`: the epochs this node holds or tried
    /// (a restart).
    fn start_claim(&self, p: i32, mine: Option<Mine>) -> Claiming {
        let token = self.claims.fetch_add(1, Ordering::SeqCst);
        let (cache, done) = (self.wiring.cache.clone(), self.claimed.0.clone());
        let task = self.handle.spawn(async move {
            let (result, attempted) = claim(&cache, p, mine).await;
            let _ = done.send(Claimed { p, token, result, attempted });
        });
        Claiming { token, expected: mine.map(|m| m.held), task }
    }

    /// A claim finished: seek the partition to its stored offset, start its actor and resume it;
    /// or retry after the backoff, give it up when a newer owner holds it, stop the node when the
    /// store is corrupt.
    fn on_claimed(&self, consumer: &BaseConsumer<Self>, claimed: Claimed) {
        let Claimed { p, token, result, attempted } = claimed;
        let topic = &self.wiring.topic;
        let expected = {
            let mut slots = self.slots.lock().unwrap();
            match slots.get_mut(&p) {
                Some(slot) if slot.claiming.as_ref().is_some_and(|c| c.token == token) => {
                    slot.attempted = slot.attempted.max(attempted);
                    slot.claiming.take().and_then(|c| c.expected)
                }
                // Revoked since (the revoke waited for this claim), or assigned anew.
                _ => return,
            }
        };
        let started = result.and_then(|meta| {
            // From the one after the stored applied offset (Kafka's committed offset is only a
            // lower bound: the store is the truth); records past it were dropped with an old
            // actor's queue, or never fetched. Seeking a paused partition is allowed; it fetches once
            // resumed.
            let from = resume_from(meta);
            consumer
                .seek(topic, p, from, Duration::from_secs(5))
                .map_err(|e| StartError::Retry(format!("seeking partition {p} to {from:?}: {e}")))?;
            Ok((meta, self.spawn(p, meta)?))
        });
        let mut slots = self.slots.lock().unwrap();
        let Some(slot) = slots.get_mut(&p) else { return };
        match started {
            Ok((meta, run)) => {
                let what = if expected.is_none() { "partition assigned" } else { "partition started" };
                tracing::info!(partition = p, epoch = meta.epoch.0, resume_after = ?meta.applied_offset.map(|o| o.0), restarts = slot.restarts, "{what}");
                slot.set_running(run, meta);
                pause(consumer, topic, p, false);
            }
            Err(StartError::Retry(e)) => {
                tracing::warn!(partition = p, error = %e, "partition not started; retrying");
                slot.start_at = Some(Instant::now() + self.wiring.restart.backoff);
            }
            Err(StartError::Fenced(e)) if expected.is_none() => {
                // A new assignment's claim lost a race with a concurrent claim: claim again.
                tracing::warn!(partition = p, error = %e, "partition assigned but not claimed yet; retrying");
                slot.start_at = Some(Instant::now() + self.wiring.restart.backoff);
            }
            Err(StartError::Fenced(e)) => {
                tracing::warn!(partition = p, error = %e, "a newer owner holds the partition; not taking it back");
                slot.state = SlotState::Fenced;
                slot.start_at = None;
            }
            Err(StartError::Fatal(e)) => {
                slot.start_at = None;
                drop(slots);
                self.set_fatal(format!("claiming partition {p}: {e}"));
            }
        }
    }

    /// Wait for the claims still running for `slots` (revoked, lost or shutting down): a claim
    /// that finished after its partition went could take the partition's changelog id from the
    /// next owner. Bounded by the drain timeout.
    fn await_claims<'a>(&self, slots: impl IntoIterator<Item = &'a mut Slot>) {
        let tasks: Vec<_> = slots.into_iter().filter_map(|s| s.claiming.take()).map(|c| c.task).collect();
        if tasks.is_empty() {
            return;
        }
        let (timeout, n) = (self.wiring.drain_timeout, tasks.len());
        let aborts: Vec<_> = tasks.iter().map(tokio::task::JoinHandle::abort_handle).collect();
        // The timer is made inside the runtime (its constructor needs the runtime's clock).
        let finished = self
            .handle
            .block_on(async move { tokio::time::timeout(timeout, futures::future::join_all(tasks)).await });
        if finished.is_err() {
            // Cancelled at their next await; a claim that still finishes finds its partition
            // released and keeps nothing (`ChangelogStore::claim`).
            aborts.iter().for_each(tokio::task::AbortHandle::abort);
            tracing::error!(
                claims = n,
                ?timeout,
                "claims of partitions being given up did not finish in time; cancelled"
            );
        }
    }

    /// Start `p`'s actor (a child of the partition supervisor) resuming after `meta`'s offset.
    fn spawn(&self, p: i32, meta: PartitionMeta) -> Result<Running, StartError> {
        let w = &self.wiring;
        let (tx, rx) = crossbeam_channel::bounded(w.queue_capacity);
        let wake_pending = Arc::new(AtomicBool::new(false));
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let args = PartitionArgs {
            queued_bytes: queued_bytes.clone(),
            topic: w.topic.clone(),
            partition: PartitionId(p as u32),
            epoch: meta.epoch,
            applied: meta.applied_offset,
            queue: rx,
            wake_pending: wake_pending.clone(),
            cache: w.cache.clone(),
            router: w.router.clone(),
            sink: w.sink.clone(),
            limits: w.limits.clone(),
            config: w.config.clone(),
            counters: w.counters.clone(),
            observer: w.observer.clone(),
            tracer: w.tracer.clone(),
        };
        let spawned = self.handle.block_on(async {
            ractor::call!(self.supervisor, SupervisorMsg::Spawn, Box::new(args))
                .map_err(|e| e.to_string())
                .and_then(|r| r)
        });
        match spawned {
            Ok(actor) => Ok(Running { tx, wake_pending, queued_bytes, actor }),
            Err(e) => Err(StartError::Retry(format!("starting the actor of partition {p}: {e}"))),
        }
    }

    /// Drain each revoked partition's actor (it finishes what it has, writes state, hands over its
    /// offset), then commit synchronously before the partition goes.
    fn on_revoke(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList) {
        let revoked: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
        let slots: Vec<(i32, Slot)> = {
            let mut all = self.slots.lock().unwrap();
            revoked.iter().filter_map(|p| all.remove(p).map(|s| (*p, s))).collect()
        };
        self.drain(slots);
        // Crash tests: drained (outputs out, state written), the group commit not yet done.
        partita_actors::crash_point!("during-revoke-drain");
        self.store_commits(consumer);
        if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync)
            && !matches!(e, KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset))
        {
            tracing::warn!(error = %e, "commit on revoke failed; the stored applied offsets still hold");
        }
        self.forget(&revoked);
    }

    /// The assignment was lost (session timeout, fenced instance): the partitions may already be
    /// another member's. Nothing is drained, produced or committed: the actors stop at once; a
    /// state write they had in flight is fenced by the new owner's claim.
    fn on_lost(&self, tpl: &TopicPartitionList) {
        let lost: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
        let mut slots: Vec<Slot> = {
            let mut all = self.slots.lock().unwrap();
            lost.iter().filter_map(|p| all.remove(p)).collect()
        };
        for run in slots.iter_mut().filter_map(|s| s.run.take()) {
            run.actor.stop(Some(supervisor::DRAINED.into()));
        }
        self.await_claims(&mut slots);
        tracing::warn!(partitions = ?lost, "assignment lost: partitions stopped without draining or committing");
        self.forget(&lost);
    }

    fn forget(&self, partitions: &[i32]) {
        for &p in partitions {
            self.wiring.cache.invalidate_partition(PartitionId(p as u32));
            self.wiring.cache.store().release(PartitionId(p as u32));
            self.lag.lock().unwrap().remove(&p);
            self.fetched_from.lock().unwrap().remove(&p);
            tracing::info!(partition = p, "partition revoked");
        }
    }

    fn drain(&self, mut slots: Vec<(i32, Slot)>) {
        self.await_claims(slots.iter_mut().map(|(_, s)| s));
        let timeout = self.wiring.drain_timeout;
        self.handle.block_on(async {
            let calls = slots.into_iter().filter_map(|(p, slot)| Some((p, slot.run?))).map(|(p, run)| async move {
                drop(run.tx);
                // Compute for half the grace, commit within 90 % of it, answer within all of it.
                let now = Instant::now();
                let (compute_until, commit_until) = (now + timeout / 2, now + timeout * 9 / 10);
                match ractor::call_t!(run.actor, PartitionMsg::Drain, timeout.as_millis() as u64, compute_until, commit_until) {
                    Ok(applied) => tracing::info!(partition = p, applied = ?applied.map(|o| o.0), "partition drained"),
                    Err(e) => {
                        tracing::error!(partition = p, error = %e, "partition did not drain in time; nothing past its stored offset is committed");
                        run.actor.kill();
                    }
                }
            });
            futures::future::join_all(calls).await;
        });
    }

    fn store_commits(&self, consumer: &BaseConsumer<Self>) {
        // `store_offsets` takes the next offset to consume as is (the single-partition
        // `store_offset` would add one to it: it takes a message's offset).
        let commits: Vec<(PartitionId, Offset)> = self.commits.try_iter().collect();
        if commits.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut slots = self.slots.lock().unwrap();
        for (p, next) in commits {
            if let Some(slot) = slots.get_mut(&(p.0 as i32)) {
                slot.progress_at = now;
            }
            partita_actors::crash_point!("during-commit");
            let mut tpl = TopicPartitionList::new();
            let stored = tpl
                .add_partition_offset(&self.wiring.topic, p.0 as i32, KOffset::Offset(next.0))
                .and_then(|()| consumer.store_offsets(&tpl));
            if let Err(e) = stored {
                tracing::debug!(partition = p.0, error = %e, "offset not stored (partition no longer assigned)");
            }
        }
    }

    /// Partition supervision, on each turn of the poll loop: handle actors that went down
    /// (restart within the budget, give up a fenced partition, stop the node once a budget is
    /// spent), kill frozen actors, and (re)start partitions whose time has come.
    fn supervise(&self, consumer: &BaseConsumer<Self>) {
        for claimed in self.claimed.1.try_iter() {
            self.on_claimed(consumer, claimed);
        }
        let now = Instant::now();
        for down in self.downs.try_iter() {
            self.on_down(consumer, down, now);
        }
        let frozen_after = self.wiring.frozen_after;
        let mut slots = self.slots.lock().unwrap();
        for (&p, slot) in slots.iter_mut() {
            if slot.start_at.is_some_and(|t| t <= now) {
                slot.start_at = None;
                let mine = slot.epoch.map(|held| Mine { held, attempted: slot.attempted });
                slot.claiming = Some(self.start_claim(p, mine));
            }
            let Some(run) = &slot.run else { continue };
            // Records wait in the queue, here (paused), held by the actor behind a hot key, or in
            // the batch it computes (their bytes stay counted until that batch is computed).
            let waiting = run.tx.len() + slot.held.len();
            if waiting == 0 && run.queued_bytes.load(Ordering::SeqCst) == 0 {
                slot.progress_at = now;
            } else if now.duration_since(slot.progress_at) > frozen_after {
                tracing::error!(
                    partition = p,
                    waiting,
                    ?frozen_after,
                    "partition frozen: records wait and nothing was committed; restarting it"
                );
                slot.progress_at = now;
                run.actor.kill();
            }
        }
    }

    fn on_down(&self, consumer: &BaseConsumer<Self>, down: PartitionDown, now: Instant) {
        let p = down.partition.0 as i32;
        let mut slots = self.slots.lock().unwrap();
        let Some(slot) = slots.get_mut(&p) else { return };
        if slot.run.as_ref().is_none_or(|r| r.actor.get_id() != down.actor) {
            return; // an actor this slot no longer runs (revoked and assigned again meanwhile)
        }
        slot.run = None;
        slot.dead = true;
        slot.held.clear();
        pause(consumer, &self.wiring.topic, p, true);
        if down.fenced {
            slot.state = SlotState::Fenced;
            tracing::warn!(partition = p, reason = %down.reason, "a newer owner holds the partition; this node stopped processing it");
            return;
        }
        slot.state = SlotState::Starting;
        match slot.budget.on_failure(now) {
            Some(wait) => {
                slot.start_at = Some(now + wait);
                slot.restarts += 1;
                tracing::warn!(partition = p, reason = %down.reason, ?wait, "restarting the partition from its stored offset");
            }
            None => {
                let policy = slot.budget.policy();
                let msg = format!(
                    "partition {p} failed more than {} times within {:?} (last: {}); giving it up: the node stops so the group can move its partitions",
                    policy.max_restarts, policy.within, down.reason
                );
                drop(slots);
                self.set_fatal(msg);
            }
        }
    }

    /// Each assigned partition's state and restarts, for metrics.
    pub fn partition_states(&self) -> Vec<(i32, SlotState, u64)> {
        self.slots.lock().unwrap().iter().map(|(p, s)| (*p, s.state, s.restarts)).collect()
    }

    /// Hand a record to its partition's actor; pause the partition when its queue is full.
    fn route(&self, consumer: &BaseConsumer<Self>, rec: InputRecord) {
        // Tests: `consumer-stall=1*sleep(MS)` stops polling for a while (past max.poll.interval.ms,
        // the group takes the assignment away).
        fail::fail_point!("consumer-stall");
        let p = rec.partition.0 as i32;
        let mut slots = self.slots.lock().unwrap();
        let Some(slot) = slots.get_mut(&p) else { return };
        let Some(run) = slot.run.as_ref().filter(|_| !slot.dead) else {
            return; // no actor now: read again from the stored offset when one starts
        };
        if rec.offset.0 < slot.next_offset {
            return; // redelivered
        }
        slot.next_offset = rec.offset.0 + 1;
        if !slot.held.is_empty() {
            slot.held.push_back(rec);
            if slot.held.len() > MAX_HELD {
                // The pause is not holding (it failed, or librdkafka delivered a burst): do not
                // buffer without bound; drop what is held and fetch it again later.
                let from = slot.held[0].offset.0;
                slot.held.clear();
                slot.next_offset = from;
                pause(consumer, &self.wiring.topic, p, true);
                if let Err(e) =
                    consumer.seek(&self.wiring.topic, p, KOffset::Offset(from), Duration::from_secs(5))
                {
                    tracing::warn!(partition = p, error = %e, "seeking back over held records failed");
                }
                tracing::warn!(
                    partition = p,
                    from,
                    "records kept arriving while paused; dropped the held ones to fetch again"
                );
            }
            return;
        }
        match run.try_send(rec, self.wiring.queue_bytes) {
            Ok(()) => wake(run),
            Err(TrySendError::Full(rec)) => {
                slot.held.push_back(rec);
                pause(consumer, &self.wiring.topic, p, true);
            }
            Err(TrySendError::Disconnected(_)) => {
                // The actor stopped; its supervisor reports it and the partition restarts.
                slot.dead = true;
                pause(consumer, &self.wiring.topic, p, true);
            }
        }
    }

    /// Retry held records; resume a partition once its record went in.
    fn unblock(&self, consumer: &BaseConsumer<Self>) {
        let mut slots = self.slots.lock().unwrap();
        for (&p, slot) in slots.iter_mut() {
            if slot.held.is_empty() {
                continue;
            }
            let Some(run) = slot.run.as_ref().filter(|_| !slot.dead) else {
                slot.held.clear();
                continue;
            };
            while let Some(rec) = slot.held.pop_front() {
                match run.try_send(rec, self.wiring.queue_bytes) {
                    Ok(()) => wake(run),
                    Err(TrySendError::Full(rec)) => {
                        slot.held.push_front(rec);
                        break;
                    }
                    Err(TrySendError::Disconnected(_)) => {
                        slot.dead = true;
                        slot.held.clear();
                    }
                }
            }
            if slot.held.is_empty() && !slot.dead {
                pause(consumer, &self.wiring.topic, p, false);
            }
        }
    }

    /// A consumer error from `poll`: fatal ones stop the node; an offset outside the log (records
    /// deleted before they were applied, or a recreated topic) stops it with the partitions and
    /// ranges concerned; the rest are logged (librdkafka retries them).
    fn on_consumer_error(&self, consumer: &BaseConsumer<Self>, e: &KafkaError) {
        if e.rdkafka_error_code() == Some(RDKafkaErrorCode::AutoOffsetReset) {
            let detail = self.out_of_range(consumer);
            self.set_fatal(format!(
                "{e}: {detail}. Records were deleted before this node applied them (retention), or the \
                 topic was recreated: the node does not skip records silently. To go on, remove the \
                 partition's stored state (docs/pipeline.md, \"Offsets outside the log\")"
            ));
        } else if is_fatal_consumer_error(e) {
            self.set_fatal(format!("fatal consumer error: {e}"));
        } else {
            tracing::warn!(error = %e, "consumer error");
        }
    }

    /// The assigned partitions whose next offset lies outside their log, with the log's range.
    fn out_of_range(&self, consumer: &BaseConsumer<Self>) -> String {
        let topic = &self.wiring.topic;
        let next: Vec<(i32, i64)> =
            self.slots.lock().unwrap().iter().map(|(p, s)| (*p, s.next_offset)).collect();
        let mut found = Vec::new();
        for (p, next) in next {
            match consumer.fetch_watermarks(topic, p, Duration::from_secs(5)) {
                Ok((low, high)) if next < low || next > high => {
                    found.push(format!("partition {p} resumes at {next}, its log holds [{low}, {high})"));
                }
                Ok(_) => {}
                Err(e) => found.push(format!("partition {p}: watermarks unknown ({e})")),
            }
        }
        if found.is_empty() {
            "no assigned partition is outside its log now".into()
        } else {
            found.join("; ")
        }
    }

    fn take_fatal(&self) -> Option<String> {
        self.fatal.lock().unwrap().take()
    }
}

/// How often the consumer checks the input topic's partition count (besides every assignment).
const PARTITION_COUNT_CHECK: Duration = Duration::from_secs(10);

/// Records polled past a full queue that the consumer holds before it drops them and seeks back.
const MAX_HELD: usize = 1024;

/// Where a partition's consumption starts: after the stored applied offset, or at the beginning
/// of the log when nothing was applied (the state is built from the whole retained log; Kafka's
/// committed offset is never trusted over the store).
fn resume_from(meta: PartitionMeta) -> KOffset {
    meta.applied_offset.map_or(KOffset::Beginning, |o| KOffset::Offset(o.0 + 1))
}

/// Consumer errors after which the node must not go on as if nothing happened: it stops with the
/// error (the group then moves its partitions; a supervisor or operator sees the reason).
fn is_fatal_consumer_error(e: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    matches!(e, KafkaError::MessageConsumptionFatal(_))
        || matches!(
            e.rdkafka_error_code(),
            Some(
                C::Fatal
                    | C::FencedInstanceId
                    | C::SaslAuthenticationFailed
                    | C::Authentication
                    | C::TopicAuthorizationFailed
                    | C::GroupAuthorizationFailed
                    | C::ClusterAuthorizationFailed
            )
        )
}

fn wake(run: &Running) {
    if !run.wake_pending.swap(true, Ordering::SeqCst) {
        let _ = run.actor.cast(PartitionMsg::Wake);
    }
}

fn pause<C: ConsumerContext>(consumer: &BaseConsumer<C>, topic: &str, p: i32, paused: bool) {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, p);
    let r = if paused { consumer.pause(&tpl) } else { consumer.resume(&tpl) };
    if let Err(e) = r {
        tracing::warn!(partition = p, paused, error = %e, "pause/resume failed");
    }
}

/// The record as a partition actor gets it: over-limit parts cut down (and a large value hashed)
/// here, on the consumer thread, so queues stay small and the async runtime never hashes them.
fn to_record(topic: &Arc<str>, m: &rdkafka::message::BorrowedMessage<'_>, limits: &Limits) -> InputRecord {
    // rust-rdkafka's header accessors unwrap each name as UTF-8 (there is no raw one): a name
    // that is not panics. Caught here, the record is dead-lettered HEADERS instead of the panic
    // killing the consumer thread (and the node crash-looping on the same record).
    let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        m.headers()
            .map(|h| h.iter().map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec())).collect())
            .unwrap_or_default()
    }));
    let unreadable = read.is_err().then(|| m.headers().map_or(0, |h| h.count()));
    if unreadable.is_some() {
        tracing::warn!(
            partition = m.partition(),
            offset = m.offset(),
            "a header name is not UTF-8; the record goes to the dead-letter topic"
        );
    }
    let mut rec = InputRecord::bounded(
        topic.clone(),
        PartitionId(m.partition() as u32),
        Offset(m.offset()),
        m.key(),
        m.payload(),
        read.unwrap_or_default(),
        limits,
    );
    rec.trimmed.headers_unreadable = unreadable;
    rec
}

/// Group membership settings for the ingestion consumer.
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    /// `client.id` (a configured one in the tier's properties wins).
    pub client_id: String,
    pub group: String,
    /// `client.rack`: the node's zone.
    pub zone: String,
    /// Static membership (`group.instance.id`): a restart within the session timeout keeps the
    /// assignment without a rebalance.
    pub instance_id: Option<String>,
    pub session_timeout: Duration,
}

/// The running consumer: the thread's handle and its shared context.
pub struct ConsumerHandle<S: StateStore> {
    pub context: Arc<NodeContext<S>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl<S: StateStore> ConsumerHandle<S> {
    /// Ask the thread to drain and leave the group; returns at once.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Wait for the thread (off the async runtime).
    pub async fn join(mut self) -> anyhow::Result<()> {
        let Some(t) = self.thread.take() else { return Ok(()) };
        tokio::task::spawn_blocking(move || {
            t.join().unwrap_or_else(|_| Err(anyhow::anyhow!("consumer thread panicked")))
        })
        .await
        .context("joining the consumer thread")?
    }
}

/// Subscribe to the ingestion topic and start the consumer thread.
pub async fn start_consumer<S: StateStore>(
    tier: &KafkaTier,
    settings: &ConsumerSettings,
    wiring: Wiring<S>,
    commits: Receiver<(PartitionId, Offset)>,
) -> anyhow::Result<ConsumerHandle<S>> {
    let topic = wiring.topic.clone();
    let wiring_partitions = wiring.input_partitions;
    let (downs_tx, downs) = crossbeam_channel::unbounded();
    let (supervisor, _) = Actor::spawn(None, PartitionSupervisor::<S, KafkaSink>::default(), downs_tx)
        .await
        .context("starting the partition supervisor")?;
    let context = NodeContext {
        wiring,
        handle: Handle::current(),
        slots: Mutex::new(HashMap::new()),
        commits,
        supervisor,
        downs,
        claimed: crossbeam_channel::unbounded(),
        claims: AtomicU64::new(0),
        lag: Mutex::new(HashMap::new()),
        fetched_from: Mutex::new(HashMap::new()),
        fatal: Mutex::new(None),
        assigned: AtomicI64::new(0),
        partition_count: Mutex::new(wiring_partitions),
    };
    let session = settings.session_timeout.as_millis().to_string();
    // The coordinator declares a member dead after the session timeout without a heartbeat;
    // five heartbeats per session (librdkafka's default is 3 s whatever the session) let a short
    // session survive a lost heartbeat or two.
    let heartbeat = (settings.session_timeout / 5).max(Duration::from_millis(100)).as_millis().to_string();
    let mut config = tier.client_config(&[
        ("client.id", &settings.client_id),
        ("group.id", &settings.group),
        ("client.rack", &settings.zone),
        ("partition.assignment.strategy", "cooperative-sticky"),
        ("enable.auto.commit", "true"),
        ("auto.commit.interval.ms", "1000"),
        ("enable.auto.offset.store", "false"),
        // Every assigned partition gets an explicit start (`resume_from`); a start or position
        // outside the log then fails loudly instead of jumping past unapplied records.
        ("auto.offset.reset", "error"),
        ("session.timeout.ms", &session),
        ("heartbeat.interval.ms", &heartbeat),
        ("statistics.interval.ms", "1000"),
        // A fetch returns at once when data is there; this bounds the wait when there is none
        // (the default 500 ms would be the floor of end-to-end latency on a quiet partition).
        ("fetch.wait.max.ms", "10"),
        ("enable.partition.eof", "false"),
    ]);
    if let Some(id) = &settings.instance_id {
        config.set("group.instance.id", id);
    }
    let consumer: BaseConsumer<NodeContext<S>> = config
        .create_with_context(context)
        .with_context(|| format!("creating the consumer for {}", tier.bootstrap))?;
    consumer.subscribe(&[&topic]).with_context(|| format!("subscribing to {topic}"))?;
    let consumer = Arc::new(consumer);
    let context = consumer.context().clone();
    let stop = Arc::new(AtomicBool::new(false));
    let static_member = settings.instance_id.is_some();
    let thread = {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("partita-consumer".into())
            .spawn(move || {
                let result = poll_loop(&consumer, &topic, &stop);
                close(consumer, static_member);
                result
            })
            .context("spawning the consumer thread")?
    };
    Ok(ConsumerHandle { context, stop, thread: Some(thread) })
}

fn poll_loop<S: StateStore>(
    consumer: &Arc<BaseConsumer<NodeContext<S>>>,
    topic: &Arc<str>,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let ctx = consumer.context().clone();
    let mut counted = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        // librdkafka notices new partitions at its next metadata refresh (5 minutes by default):
        // look more often.
        if counted.elapsed() >= PARTITION_COUNT_CHECK {
            counted = Instant::now();
            ctx.check_partition_count(consumer);
        }
        if let Some(msg) = ctx.take_fatal() {
            shutdown(consumer, &ctx);
            anyhow::bail!(msg);
        }
        // Block briefly for the first message, then take what is ready without blocking.
        let mut timeout = Duration::from_millis(20);
        for _ in 0..2048 {
            match consumer.poll(timeout) {
                None => break,
                Some(Ok(m)) => ctx.route(consumer, to_record(topic, &m, &ctx.wiring.limits)),
                Some(Err(e)) => ctx.on_consumer_error(consumer, &e),
            }
            timeout = Duration::ZERO;
        }
        ctx.store_commits(consumer);
        ctx.unblock(consumer);
        ctx.supervise(consumer);
    }
    shutdown(consumer, &ctx);
    Ok(())
}

/// Stop intake, drain every partition actor, commit; [`close`] then leaves the group.
fn shutdown<S: StateStore>(consumer: &BaseConsumer<NodeContext<S>>, ctx: &NodeContext<S>) {
    let all: TopicPartitionList = consumer.assignment().unwrap_or_default();
    if let Err(e) = consumer.pause(&all) {
        tracing::debug!(error = %e, "pausing before shutdown");
    }
    let slots: Vec<(i32, Slot)> = ctx.slots.lock().unwrap().drain().collect();
    ctx.drain(slots);
    ctx.store_commits(consumer);
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(e) => tracing::warn!(error = %e, "final commit failed; the stored applied offsets still hold"),
    }
    ctx.supervisor.stop(None);
}

/// Close the consumer: librdkafka's close serves the last revoke (nothing is left to drain) and
/// leaves the group, waiting for the coordinator's answer, so the other members take the
/// partitions over at once. A static member (`group.instance.id`) does not leave (KIP-345): the
/// group keeps its partitions for it until the session timeout, so a restart within it (a rolling
/// restart) gets them back without a rebalance. An explicit unsubscribe before the close did not
/// work: the close could overtake the unassignment that triggers the leave, and no LeaveGroup
/// went out (the group noticed only at the session timeout; `tests/tests/cluster.rs` rolling
/// restart).
fn close<S: StateStore>(consumer: Arc<BaseConsumer<NodeContext<S>>>, static_member: bool) {
    match Arc::try_unwrap(consumer) {
        Ok(consumer) => drop(consumer),
        Err(_) => tracing::warn!("the consumer is still shared; it leaves the group when the process exits"),
    }
    if static_member {
        tracing::info!("consumer closed; the static membership stays until the session timeout");
    } else {
        tracing::info!("left the consumer group");
    }
}
