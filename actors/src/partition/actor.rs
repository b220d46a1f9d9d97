//! The partition actor: the compute stage (steps 1-5 of the module doc of `partition`).

use std::collections::{HashMap, VecDeque};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use partita_proto::v1::DeadLetterReason;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tracing::{Instrument as _, Span};

use super::committer::Committer;
use super::decode::{self, Limits, ValidEvent};
use super::records::{dead_letter, score};
use super::trace::{self, Tracer};
use super::{
    HEADER_TRACEPARENT, InputRecord, OutputRecord, PartitionConfig, PartitionSink, PipelineCounters,
    PipelineObserver, micros, sequence, supervisor, unix_micros, waves,
};
use crate::inference::{
    InferError, InferOutput, InferRequest, InferRows, RowAnswer, RowsOutput, Served, due_at,
};
use crate::pool::Router;
use crate::state::{Epoch, Offset, PartitionId, Sequenced, StateCache, StateStore, StateValue, StoreError};

pub struct PartitionArgs<S, K> {
    pub topic: Arc<str>,
    pub partition: PartitionId,
    /// This owner's epoch (fences older owners' writes).
    pub epoch: Epoch,
    /// The stored applied offset to resume after.
    pub applied: Option<Offset>,
    pub queue: Receiver<InputRecord>,
    /// Set by the consumer when it sends a `Wake`; cleared by the actor before it drains.
    pub wake_pending: Arc<AtomicBool>,
    /// Bytes of the records in `queue` ([`InputRecord::size`]), held by the actor, or in the batch
    /// it computes: the consumer adds, the actor subtracts a batch's once it is computed, so the
    /// queue is bounded in bytes as well as in records, and a batch that never finishes leaves
    /// its records counted (the consumer's frozen detection sees them waiting).
    pub queued_bytes: Arc<AtomicUsize>,
    pub cache: Arc<StateCache<S>>,
    pub router: Router,
    pub sink: Arc<K>,
    pub limits: Arc<Limits>,
    pub config: PartitionConfig,
    pub counters: Arc<PipelineCounters>,
    pub observer: Arc<dyn PipelineObserver>,
    pub tracer: Arc<dyn Tracer>,
}

pub struct PartitionState<S, K> {
    args: PartitionArgs<S, K>,
    /// Records taken from the queue but held back, in offset order: their key had `max_waves`
    /// records in the batch already. They go first into the next batches; at most `max_batch`,
    /// then the actor stops taking from the queue (the queue fills, the partition pauses).
    held: VecDeque<InputRecord>,
    /// The highest offset taken from the queue.
    taken: Option<Offset>,
    /// Records at or below this offset were computed (or applied before this actor started); the
    /// ones above it that were computed are told apart by their key's offset.
    computed: Option<Offset>,
    /// Number of the next batch computed.
    next_no: u64,
    /// New states of computed batches not yet written.
    pending: Pending,
    /// The committer task and the channel to it; taken when the actor drains.
    committer: Option<(tokio::sync::mpsc::Sender<Computed>, tokio::task::JoinHandle<Option<Offset>>)>,
}

#[derive(Debug)]
pub enum PartitionMsg {
    /// Records are waiting in the queue.
    Wake,
    /// Compute what is queued until the first instant, let the committer finish until the
    /// second, then stop; replies with the applied offset (`None` when the committer did not
    /// finish in time). What was not computed or committed is dropped, held records included:
    /// whoever owns the partition next reads from the stored applied offset + 1 again, and skips
    /// what its keys' states say was answered.
    Drain(Instant, Instant, RpcReplyPort<Option<Offset>>),
    /// The committer hit a fenced or corrupt store: stop.
    Failed(StoreError),
}

/// Config-less actor type; everything lives in [`PartitionState`].
pub struct PartitionActor<S, K>(PhantomData<fn() -> (S, K)>);

impl<S, K> Default for PartitionActor<S, K> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<S: StateStore, K: PartitionSink> Actor for PartitionActor<S, K> {
    type Msg = PartitionMsg;
    type State = PartitionState<S, K>;
    type Arguments = PartitionArgs<S, K>;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let pending = Pending::default();
        let (tx, rx) = tokio::sync::mpsc::channel(args.config.max_pending_batches.max(1));
        let committer = Committer {
            topic: args.topic.clone(),
            partition: args.partition,
            epoch: args.epoch,
            cache: args.cache.clone(),
            sink: args.sink.clone(),
            counters: args.counters.clone(),
            observer: args.observer.clone(),
            config: args.config.clone(),
            pending: pending.clone(),
            actor: myself,
        };
        let task = tokio::spawn(committer.run(rx));
        Ok(PartitionState {
            computed: args.applied,
            args,
            held: VecDeque::new(),
            taken: None,
            next_no: 0,
            pending,
            committer: Some((tx, task)),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            // One batch per message: a Drain (or a committer's failure) waiting in the mailbox is
            // handled between batches, not after the whole queue.
            PartitionMsg::Wake => {
                state.drain_queue(None, Some(1)).await?;
                if !state.held.is_empty() || !state.args.queue.is_empty() {
                    let _ = myself.cast(PartitionMsg::Wake);
                }
            }
            PartitionMsg::Drain(compute_until, commit_until, reply) => {
                state.drain_queue(Some(compute_until), None).await?;
                let applied = match state.committer.take() {
                    Some((tx, mut task)) => {
                        drop(tx);
                        match tokio::time::timeout_at(commit_until.into(), &mut task).await {
                            Ok(done) => done?.or(state.args.applied),
                            Err(_) => {
                                tracing::warn!(partition = %state.args.partition, "drain: the committer did not finish in time; stopping it");
                                task.abort();
                                None
                            }
                        }
                    }
                    None => state.args.applied,
                };
                let _ = reply.send(applied);
                myself.stop(Some(supervisor::DRAINED.into()));
            }
            // A newer owner holds the partition: stop without failing, so the supervisor gives
            // the partition up instead of restarting it (a restart would claim it back).
            PartitionMsg::Failed(e @ StoreError::Fenced { .. }) => {
                myself.stop(Some(format!("{}: {e}", supervisor::FENCED)));
            }
            PartitionMsg::Failed(e) => return Err(e.into()),
        }
        Ok(())
    }
}

/// The committer is the actor's child: it dies with it, however the actor ends (a panic or a
/// kill skips `post_stop`, never this). A batch it was producing is re-read from the stored
/// offset by whoever owns the partition next; a state write it had in flight is fenced by that
/// owner's newer epoch.
impl<S, K> Drop for PartitionState<S, K> {
    fn drop(&mut self) {
        if let Some((_, task)) = self.committer.take() {
            task.abort();
        }
    }
}

/// Why a batch stopped: retry it, or stop the actor.
enum Halt {
    Transient(String),
    Fatal(StoreError),
}

impl From<StoreError> for Halt {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable { detail } => Halt::Transient(detail),
            fatal => Halt::Fatal(fatal),
        }
    }
}

/// One key's state while a batch runs.
struct KeyState {
    seq: Sequenced,
    dirty: bool,
}

enum Outcome {
    Scored(Box<InferOutput>),
    Dead(DeadLetterReason, String, u32),
    /// No healthy worker or the pool is stopping: retry the batch later.
    Retry(InferError),
}

/// New states of batches computed but not yet written, by key: (batch number, value). A key's
/// entry is the newest batch's; the committer removes it once that batch is written (the cache
/// holds it then), so the next batches never read a state older than one already computed.
pub(super) type Pending = Arc<Mutex<HashMap<Vec<u8>, (u64, StateValue)>>>;

/// A computed batch on its way to the committer.
pub(super) struct Computed {
    pub(super) no: u64,
    /// Every record at or below this offset is in this batch or an earlier one.
    pub(super) applied: Offset,
    pub(super) records: usize,
    /// Scores and dead letters in offset order.
    pub(super) outputs: Vec<OutputRecord>,
    /// New states of the keys the batch changed.
    pub(super) entries: Vec<(Vec<u8>, StateValue)>,
    pub(super) scored: u64,
    pub(super) dead: Vec<DeadLetterReason>,
    /// The batch's and its records' spans: they end when the batch is durable.
    pub(super) span: Span,
    pub(super) _record_spans: Vec<Span>,
}

impl<S: StateStore, K: PartitionSink> PartitionState<S, K> {
    /// Compute queued batches (and hand them to the committer) until the queue is empty, `batches`
    /// were computed, or `until` has passed: then what is still queued stays (a drain drops it
    /// with the actor).
    async fn drain_queue(
        &mut self,
        until: Option<Instant>,
        batches: Option<usize>,
    ) -> Result<(), ActorProcessingErr> {
        self.args.wake_pending.store(false, Ordering::SeqCst);
        for _ in 0..batches.unwrap_or(usize::MAX) {
            if until.is_some_and(|t| Instant::now() >= t) {
                tracing::info!(partition = %self.args.partition, queued = self.args.queue.len(), held = self.held.len(), "drain deadline: leaving the rest to be read again");
                return Ok(());
            }
            let (batch, applied) = self.next_batch();
            if batch.is_empty() {
                return Ok(());
            }
            // Crash tests: `partition-batch=1*panic(...)` fails the actor once;
            // `partition-batch-delay=N*return(MS)` makes N batches wait MS ms first.
            fail::fail_point!("partition-batch");
            if let Some(ms) = test_delay() {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            // Its bytes leave the queue's bound once it is computed (`queued_bytes`).
            let bytes: usize = batch.iter().map(InputRecord::size).sum();
            let computed = self.compute_with_retry(batch, applied).await?;
            self.args.queued_bytes.fetch_sub(bytes, Ordering::SeqCst);
            let Some(computed) = computed else { continue };
            let Some((tx, _)) = &self.committer else { return Err("the partition is draining".into()) };
            if tx.send(computed).await.is_err() {
                // The committer stopped on a fatal store error, and told the actor before it went
                // (`Failed` waits in the mailbox): handle that, fenced or not, rather than fail
                // here as if the committer had vanished. The batch is not written: the partition's
                // next owner runs it again.
                return Ok(());
            }
        }
        Ok(())
    }

    /// The next batch, scheduled by key: up to `max_batch` records, at most `max_waves` of any
    /// one key, the held records first, then the queue's. A record whose key is full in this
    /// batch is held for the next ones instead of ending the batch, so the other keys' records
    /// behind a hot key's backlog are not kept waiting by it (`docs/pipeline.md`, "Scheduling by
    /// key"). Also returns the batch's applied offset: every record at or below it is in this
    /// batch or an earlier one (the lowest held offset − 1, or the highest taken).
    fn next_batch(&mut self) -> (Vec<InputRecord>, Offset) {
        let config = &self.args.config;
        // A key's records beyond `max_waves` cost no more rounds when its model scores them in one
        // pass (its sequence form): then up to the default model's `max_steps` of them (records
        // are not decoded yet; those naming another model, or whose row falls back, still take a
        // wave each: docs/pipeline.md).
        let max_steps = self.args.router.model(&self.args.limits.default_model).map_or(1, |m| m.max_steps);
        let (max_batch, max_waves) = (config.max_batch.max(1), config.max_waves.max(max_steps).max(1));
        let mut batch = Vec::new();
        let mut per_key: HashMap<Vec<u8>, usize> = HashMap::new();
        // Records go into the batch or back into `held` (a key's order kept: once one of its
        // records is held, so are the later ones, as its count stays full).
        let mut place = |rec: InputRecord, batch: &mut Vec<InputRecord>, held: &mut VecDeque<InputRecord>| {
            let n = per_key.entry(rec.key.clone().unwrap_or_default()).or_insert(0);
            if *n < max_waves && batch.len() < max_batch {
                *n += 1;
                batch.push(rec);
            } else {
                held.push_back(rec);
            }
        };
        let mut held = VecDeque::with_capacity(self.held.len());
        for rec in std::mem::take(&mut self.held) {
            place(rec, &mut batch, &mut held);
        }
        while batch.len() < max_batch && held.len() < max_batch {
            let Ok(rec) = self.args.queue.try_recv() else { break };
            self.taken = Some(rec.offset);
            place(rec, &mut batch, &mut held);
        }
        self.held = held;
        let applied = match self.held.front() {
            Some(first) => Offset(first.offset.0 - 1),
            None => self.taken.unwrap_or(Offset(-1)),
        };
        (batch, applied)
    }

    /// Compute `batch`, retrying transient failures (no healthy worker, store reads) with
    /// backoff. `None`: every record was computed before.
    async fn compute_with_retry(
        &mut self,
        batch: Vec<InputRecord>,
        applied: Offset,
    ) -> Result<Option<Computed>, ActorProcessingErr> {
        let mut backoff = self.args.config.backoff;
        // One span for the batch, retries included (their warnings are logged inside it).
        let span = self.args.tracer.batch_span(self.args.partition, batch.len());
        loop {
            match self.compute(&batch, applied, &span).instrument(span.clone()).await {
                Ok(computed) => return Ok(computed),
                Err(Halt::Fatal(e)) => {
                    tracing::error!(partition = %self.args.partition, error = %e, "partition stops");
                    return Err(e.into());
                }
                Err(Halt::Transient(detail)) => {
                    self.args.counters.retries.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(partition = %self.args.partition, %detail, ?backoff, "batch failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.args.config.max_backoff);
                }
            }
        }
    }

    /// Load the states of `missing` keys: from batches not yet written, else through the cache.
    async fn load(&self, missing: Vec<Vec<u8>>, keys: &mut HashMap<Vec<u8>, KeyState>) -> Result<(), Halt> {
        let mut to_load = Vec::with_capacity(missing.len());
        {
            let pending = self.pending.lock().unwrap();
            for key in missing {
                match pending.get(&key) {
                    Some((_, v)) => {
                        keys.insert(key, KeyState { seq: v.to_sequenced()?, dirty: false });
                    }
                    None => to_load.push(key),
                }
            }
        }
        if to_load.is_empty() {
            return Ok(());
        }
        let loaded = self.args.cache.get_many(self.args.partition, &to_load).await?;
        for (key, value) in to_load.into_iter().zip(loaded) {
            let seq = match value {
                Some(v) => v.to_sequenced()?,
                None => Sequenced::default(),
            };
            keys.insert(key, KeyState { seq, dirty: false });
        }
        Ok(())
    }

    /// A key's backlog in one pass: the keys of `good` with two or more events for a model with a
    /// sequence form (up to its `max_steps`), each event new and next in its key's sequence, go
    /// as one row each, grouped by length into one call per model and length, started now and
    /// answered while the other events run in waves. Returns the events left for the waves (in
    /// order), and the rows started. Anything unusual about a key (a redelivery, a duplicate, a
    /// gap, two models) leaves its events to the waves, which judge them one by one.
    async fn start_backlogs(
        &self,
        fresh: &[&InputRecord],
        good: &[(usize, ValidEvent)],
        keys: &mut HashMap<Vec<u8>, KeyState>,
    ) -> Result<(Vec<usize>, Option<Backlogs>), Halt> {
        let router = &self.args.router;
        let all = || (0..good.len()).collect::<Vec<usize>>();
        if router.models().iter().all(|m| m.max_steps < 2) {
            return Ok((all(), None));
        }
        // Each key's events, in order.
        let mut by_key: HashMap<&[u8], Vec<usize>> = HashMap::new();
        let mut order: Vec<&[u8]> = Vec::new();
        for (g, (_, v)) in good.iter().enumerate() {
            let events = by_key.entry(v.event.key.as_slice()).or_default();
            if events.is_empty() {
                order.push(v.event.key.as_slice());
            }
            events.push(g);
        }
        let candidates: Vec<&[u8]> = order
            .into_iter()
            .filter(|k| {
                let events = &by_key[k];
                let model = &good[events[0]].1.model;
                events.len() >= 2
                    && events.iter().all(|&g| good[g].1.model == *model)
                    && router.model(model).is_some_and(|spec| spec.takes_steps(events.len()))
            })
            .collect();
        if candidates.is_empty() {
            return Ok((all(), None));
        }
        let load_started = Instant::now();
        let missing = candidates.iter().filter(|k| !keys.contains_key(**k)).map(|k| k.to_vec()).collect();
        self.load(missing, keys).await?;
        let load_us = micros(load_started.elapsed());
        let gap = self.args.config.max_sequence_gap;
        let mut jobs: Vec<BacklogJob> = Vec::new();
        let mut in_rows = vec![false; good.len()];
        for key in candidates {
            let events = &by_key[key];
            let ks = &keys[key].seq;
            let (mut seq, mut window) = (ks.sequence, ks.window);
            let clean = events.iter().all(|&g| {
                let (i, v) = &good[g];
                let fresh_here = ks.offset.is_none_or(|o| fresh[*i].offset > o);
                let next =
                    matches!(sequence::judge(seq, window, v.event.sequence, gap), sequence::Verdict::Apply);
                if next {
                    window = sequence::advance(seq, window, v.event.sequence);
                    seq = v.event.sequence;
                }
                fresh_here && next
            });
            if !clean {
                continue;
            }
            let model = &good[events[0]].1.model;
            let spec = router.model(model).expect("checked above");
            let steps = events.len();
            let at = match jobs.iter().position(|j| j.model == *model && j.rows.steps == steps) {
                Some(at) => at,
                None => {
                    let rows = InferRows::sequences(spec, 1, steps);
                    jobs.push(BacklogJob { model: model.clone(), rows, members: Vec::new() });
                    jobs.len() - 1
                }
            };
            let features: Vec<f32> =
                events.iter().flat_map(|&g| good[g].1.event.features.iter().copied()).collect();
            let state = (!ks.state.is_empty()).then_some(ks.state.as_slice());
            let job = &mut jobs[at];
            if job.rows.push(spec, &features, state).is_ok() {
                if let Some(slo) = self.args.config.slo {
                    // Its events are in offset order; the earliest event time is due first.
                    let earliest = events.iter().map(|&g| good[g].1.event.event_time_unix_micros).min();
                    job.rows.due_by(due_at(earliest.expect("two or more events"), slo));
                }
                job.members.push(BacklogRow { key: key.to_vec(), events: events.clone() });
                for &g in events {
                    in_rows[g] = true;
                }
            }
        }
        if jobs.is_empty() {
            return Ok((all(), None));
        }
        let rest = (0..good.len()).filter(|&g| !in_rows[g]).collect();
        let (router, deadline) = (router.clone(), self.args.config.infer_deadline);
        // The rows go to the task; the members stay to apply the answers.
        let calls: Vec<(Arc<str>, InferRows)> =
            jobs.iter_mut().map(|j| (j.model.clone(), std::mem::take(&mut j.rows))).collect();
        // Its own task, so that the waves of the other keys run meanwhile.
        let task = tokio::spawn(async move {
            let calls = calls.into_iter().map(|(model, rows)| {
                let router = &router;
                async move { router.infer_rows_within(&model, Arc::new(rows), deadline).await }
            });
            futures::future::join_all(calls).await
        });
        Ok((rest, Some(Backlogs { jobs, task: AbortOnDrop(task), load_us })))
    }

    /// Decode, validate and score `batch` (steps 1-4 of the module doc). `None`: nothing new.
    async fn compute(
        &mut self,
        batch: &[InputRecord],
        applied: Offset,
        batch_span: &Span,
    ) -> Result<Option<Computed>, Halt> {
        let a = &self.args;
        let c = &a.counters;
        if batch.is_empty() {
            return Ok(None);
        }
        let started = Instant::now();
        c.received.fetch_add(batch.len() as u64, Ordering::Relaxed);
        let now = unix_micros();
        let fresh: Vec<&InputRecord> =
            batch.iter().filter(|r| self.computed.is_none_or(|done| r.offset > done)).collect();
        c.redelivered.fetch_add((batch.len() - fresh.len()) as u64, Ordering::Relaxed);
        if fresh.is_empty() {
            self.computed = Some(applied);
            return Ok(None);
        }
        // Indexed like `fresh`; they end once the batch's outputs and state are durable.
        let spans: Vec<Span> = fresh.iter().map(|r| a.tracer.record_span(batch_span, r)).collect();
        let traceparent = |i: usize| {
            a.tracer
                .traceparent(&spans[i])
                .or_else(|| fresh[i].header(HEADER_TRACEPARENT).map(<[u8]>::to_vec))
        };
        let dead_out = |i: usize, reason: DeadLetterReason, detail: &str, attempts: u32| {
            let span = &spans[i];
            span.record(trace::OUTCOME, reason.as_str_name());
            let out = span.in_scope(|| dead_letter(fresh[i], reason, detail, attempts, &a.limits));
            out.with_traceparent(traceparent(i))
        };
        let router = &a.router;
        let mut outputs: Vec<(Offset, OutputRecord)> = Vec::with_capacity(fresh.len());
        let mut dead: Vec<DeadLetterReason> = Vec::new();
        // (index into `fresh`, the decoded event)
        let mut good: Vec<(usize, ValidEvent)> = Vec::with_capacity(fresh.len());
        for (i, &rec) in fresh.iter().enumerate() {
            match decode::decode(rec, &a.limits, |m| router.model(m), now) {
                Ok(v) => {
                    if v.unknown_fields {
                        c.unknown_fields.fetch_add(1, Ordering::Relaxed);
                    }
                    if v.clamped {
                        c.clamped.fetch_add(1, Ordering::Relaxed);
                    }
                    if v.time_suspect {
                        c.time_suspect.fetch_add(1, Ordering::Relaxed);
                    }
                    good.push((i, v));
                }
                Err(r) => {
                    dead.push(r.reason);
                    outputs.push((rec.offset, dead_out(i, r.reason, &r.detail, 1)));
                }
            }
        }

        crate::crash_point!("after-decode");
        let mut keys: HashMap<Vec<u8>, KeyState> = HashMap::new();
        let mut scored = 0u64;
        let emit_scored = |i: usize, v: &ValidEvent, out: &InferOutput, load_us: u64| {
            let rec = fresh[i];
            // Any i64 is a valid event time (far-off ones are flagged): no overflow.
            let since_event = unix_micros()
                .checked_sub(v.event.event_time_unix_micros)
                .and_then(|us| u64::try_from(us).ok())
                .map(Duration::from_micros);
            a.observer.scored(&v.model, out, rec.received.elapsed(), since_event);
            let span = &spans[i];
            span.record(trace::OUTCOME, "SCORED");
            span.record(trace::MODEL, &*v.model);
            span.record(trace::MODEL_VERSION, out.model_version);
            span.record(trace::DEVICE, tracing::field::display(&out.device));
            span.record(trace::INFERENCE_BATCH, out.batch_size);
            (rec.offset, score(rec, v, out, load_us).with_traceparent(traceparent(i)))
        };
        // Keys with a backlog go as one row each through their model's sequence form, while the
        // other records run in waves; a row that fails goes on in waves after them.
        let (mut todo, mut backlogs) = self.start_backlogs(&fresh, &good, &mut keys).await?;
        let mut n_waves = 0;
        loop {
            let waves: Vec<Vec<usize>> = waves::waves(todo.iter().map(|&g| good[g].1.event.key.as_slice()))
                .into_iter()
                .map(|wave| wave.into_iter().map(|w| todo[w]).collect())
                .collect();
            n_waves += waves.len();
            for wave in waves {
                let load_started = Instant::now();
                let missing: Vec<Vec<u8>> = wave
                    .iter()
                    .map(|&g| &good[g].1.event.key)
                    .filter(|k| !keys.contains_key(*k))
                    .cloned()
                    .collect();
                self.load(missing, &mut keys).await?;
                let load_us = micros(load_started.elapsed());

                let mut idx = Vec::with_capacity(wave.len());
                let mut by_model: Vec<ModelRows> = Vec::new();
                let mut refused = Vec::new();
                for &g in &wave {
                    let (i, v) = &good[g];
                    let ks = &keys[&v.event.key].seq;
                    // Applied (scored or dead-lettered) above the partition's applied offset before
                    // this actor started: its effect is in the key's state and its output was
                    // acknowledged before.
                    if ks.offset.is_some_and(|o| fresh[*i].offset <= o) {
                        c.redelivered.fetch_add(1, Ordering::Relaxed);
                        spans[*i].record(trace::OUTCOME, "REDELIVERED");
                        continue;
                    }
                    let verdict =
                        sequence::judge(ks.sequence, ks.window, v.event.sequence, a.config.max_sequence_gap);
                    if let sequence::Verdict::Reject(reason, detail) = verdict {
                        dead.push(reason);
                        outputs.push((fresh[*i].offset, dead_out(*i, reason, &detail, 1)));
                        mark_answered(&mut keys, &v.event.key, fresh[*i].offset);
                        continue;
                    }
                    let Some(spec) = router.model(&v.model) else {
                        let e = InferError::UnknownModel { model: v.model.to_string() };
                        refused.push((idx.len(), e));
                        idx.push(g);
                        continue;
                    };
                    let at = match by_model.iter().position(|w| w.model == v.model) {
                        Some(at) => at,
                        None => {
                            let rows = InferRows::with_capacity(spec, wave.len());
                            by_model.push(ModelRows { model: v.model.clone(), at: Vec::new(), rows });
                            by_model.len() - 1
                        }
                    };
                    let w = &mut by_model[at];
                    let state = (!ks.state.is_empty()).then_some(ks.state.as_slice());
                    match w.rows.push(spec, &v.event.features, state) {
                        Ok(()) => {
                            w.at.push(idx.len());
                            if let Some(slo) = a.config.slo {
                                w.rows.due_by(due_at(v.event.event_time_unix_micros, slo));
                            }
                        }
                        Err(e) => refused.push((idx.len(), e)),
                    }
                    idx.push(g);
                }
                let outcomes = infer_wave(router, by_model, refused, idx.len(), &a.config).await;
                for (g, outcome) in idx.into_iter().zip(outcomes) {
                    let (i, v) = &good[g];
                    let rec = fresh[*i];
                    match outcome {
                        Outcome::Scored(mut out) => {
                            let ks = keys.get_mut(&v.event.key).expect("loaded above");
                            apply_event(&mut ks.seq, v.event.sequence, rec.offset);
                            // The output's state is the key's now (nothing below reads it).
                            ks.seq.state = std::mem::take(&mut out.new_state);
                            ks.dirty = true;
                            scored += 1;
                            outputs.push(emit_scored(*i, v, &out, load_us));
                        }
                        Outcome::Dead(reason, detail, attempts) => {
                            dead.push(reason);
                            outputs.push((rec.offset, dead_out(*i, reason, &detail, attempts)));
                            mark_answered(&mut keys, &v.event.key, rec.offset);
                        }
                        Outcome::Retry(e) => return Err(Halt::Transient(e.to_string())),
                    }
                }
            }
            let Some(started) = backlogs.take() else { break };
            let (answers, load_us) = started.answers().await?;
            todo = Vec::new();
            for (row, answer) in answers {
                let Some((scores, new_state, served)) = answer else {
                    // Failed, timed out, or not finite: its events go on one by one, which
                    // dead-letters the one at fault and scores the others.
                    c.backlog_fallbacks.fetch_add(1, Ordering::Relaxed);
                    todo.extend_from_slice(&row.events);
                    continue;
                };
                let ks = keys.get_mut(&row.key).expect("loaded for its row");
                for (&g, &score) in row.events.iter().zip(&scores) {
                    let (i, v) = &good[g];
                    apply_event(&mut ks.seq, v.event.sequence, fresh[*i].offset);
                    let out = InferOutput::new(score, Vec::new(), served);
                    outputs.push(emit_scored(*i, v, &out, load_us));
                }
                ks.seq.state = new_state;
                ks.dirty = true;
                scored += row.events.len() as u64;
                c.backlog_events.fetch_add(row.events.len() as u64, Ordering::Relaxed);
            }
            if todo.is_empty() {
                break;
            }
        }

        let entries: Vec<(Vec<u8>, StateValue)> = keys
            .into_iter()
            .filter(|(_, ks)| ks.dirty)
            .map(|(k, ks)| (k, StateValue::sequenced(&ks.seq)))
            .collect();
        outputs.sort_by_key(|(o, _)| *o);
        let no = self.next_no;
        self.next_no += 1;
        {
            let mut pending = self.pending.lock().unwrap();
            for (k, v) in &entries {
                pending.insert(k.clone(), (no, v.clone()));
            }
        }
        crate::crash_point!("after-inference");
        self.computed = Some(applied);
        tracing::debug!(
            partition = %self.args.partition,
            records = batch.len(),
            waves = n_waves,
            compute_us = micros(started.elapsed()),
            "batch computed"
        );
        Ok(Some(Computed {
            no,
            applied,
            records: batch.len(),
            outputs: outputs.into_iter().map(|(_, o)| o).collect(),
            entries,
            scored,
            dead,
            span: batch_span.clone(),
            _record_spans: spans,
        }))
    }
}

/// An event of sequence `seq` at `offset` was applied to its key (its new state is set apart).
fn apply_event(s: &mut Sequenced, seq: u64, offset: Offset) {
    s.window = sequence::advance(s.sequence, s.window, seq);
    s.sequence = seq;
    s.offset = Some(offset);
}

/// A record of `key` at `offset` was dead-lettered: its key's state (unchanged otherwise) now
/// says so, so that a restart from below it skips the record instead of answering it again
/// (perhaps differently: a timeout may score the second time).
fn mark_answered(keys: &mut HashMap<Vec<u8>, KeyState>, key: &[u8], offset: Offset) {
    if let Some(ks) = keys.get_mut(key) {
        ks.seq.offset = Some(offset);
        ks.dirty = true;
    }
}

/// Keys' backlogs on their way through their models' sequence form.
struct Backlogs {
    jobs: Vec<BacklogJob>,
    task: AbortOnDrop<Vec<RowsOutput>>,
    /// Loading their keys' states.
    load_us: u64,
}

/// The rows of one model and length.
struct BacklogJob {
    model: Arc<str>,
    /// Taken when the call starts.
    rows: InferRows,
    members: Vec<BacklogRow>,
}

/// One key's backlog: its events (indices into the batch's decoded events), in order.
struct BacklogRow {
    key: Vec<u8>,
    events: Vec<usize>,
}

/// A row's scores (one per event), its key's new state and how it was served; `None` when the
/// row was not scored in full (its events go on one by one).
type BacklogAnswer = Option<(Vec<f32>, Vec<f32>, Served)>;

impl Backlogs {
    /// Each row with its answer, and the state-load time. A pool that is full or shutting down
    /// halts the batch, as in a wave; a row whose worker was lost goes on one by one like a
    /// failed one (one of its job's rows may have killed the worker: alone, in waves, it is
    /// isolated as there). A panic in the calls' task is the actor's, as in a wave.
    async fn answers(self) -> Result<(Vec<(BacklogRow, BacklogAnswer)>, u64), Halt> {
        let outputs = match self.task.join().await {
            Ok(outputs) => outputs,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => return Err(Halt::Transient(format!("backlog rows: {e}"))),
        };
        let mut answers = Vec::new();
        for (job, out) in self.jobs.into_iter().zip(outputs) {
            for (k, row) in job.members.into_iter().enumerate() {
                let answer = match &out.answers[k] {
                    RowAnswer::Scored(served) => {
                        let (scores, new_state) = (out.scores(k), out.new_state(k));
                        let finite = scores.iter().chain(new_state).all(|v| v.is_finite());
                        finite.then(|| (scores.to_vec(), new_state.to_vec(), *served))
                    }
                    RowAnswer::Failed(e @ (InferError::Overloaded { .. } | InferError::ShuttingDown)) => {
                        return Err(Halt::Transient(e.to_string()));
                    }
                    RowAnswer::Failed(_) | RowAnswer::TimedOut => None,
                };
                answers.push((row, answer));
            }
        }
        Ok((answers, self.load_us))
    }
}

/// A spawned task that is aborted when its handle is dropped (a batch that halts does not leave
/// its backlog rows' task behind).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> AbortOnDrop<T> {
    async fn join(mut self) -> Result<T, tokio::task::JoinError> {
        (&mut self.0).await
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The rows of one model in a wave, and the index of each in the wave's outcomes.
struct ModelRows {
    model: Arc<str>,
    at: Vec<usize>,
    rows: InferRows,
}

/// A wave's inference, `n` outcomes: the rows of each model in one call to the pool (one job
/// per batch limit, not one per row; `refused` rows never reach it), then each row that failed
/// or timed out alone, for the rest of its attempts. Per row: deadline per attempt, bounded
/// attempts, bad requests dead-lettered.
async fn infer_wave(
    router: &Router,
    by_model: Vec<ModelRows>,
    refused: Vec<(usize, InferError)>,
    n: usize,
    config: &PartitionConfig,
) -> Vec<Outcome> {
    let mut outcomes: Vec<Option<Outcome>> = (0..n).map(|_| None).collect();
    let mut again = Vec::new();
    for (i, e) in refused {
        // A refused row is bad input: dead-lettered at once, never retried.
        outcomes[i] = Some(judge(Some(Err(e)), config).unwrap_or_else(|(r, d)| Outcome::Dead(r, d, 1)));
    }
    // Waiting (for room in the pool, in a worker's queue) is backpressure, not part of the
    // deadline: a backlog or a catch-up must not turn valid events into TIMEOUT dead letters.
    let by_model: Vec<(Arc<str>, Vec<usize>, Arc<InferRows>)> =
        by_model.into_iter().map(|w| (w.model, w.at, Arc::new(w.rows))).collect();
    let answers = futures::future::join_all(
        by_model
            .iter()
            .map(|(model, _, rows)| router.infer_rows_within(model, rows.clone(), config.infer_deadline)),
    )
    .await;
    for ((model, at, rows), answer) in by_model.iter().zip(answers) {
        for (k, &i) in at.iter().enumerate() {
            match judge(answer.get(k), config) {
                Ok(outcome) => outcomes[i] = Some(outcome),
                Err(last) => again.push((i, model, rows, k, last)),
            }
        }
    }
    let retried = futures::future::join_all(again.into_iter().map(|(i, model, rows, k, last)| async move {
        let spec = router.model(model).expect("known: its rows were sent");
        let (features, state) = rows.row(spec, k);
        let req = InferRequest {
            model: model.clone(),
            features: features.to_vec(),
            state: spec.is_stateful().then(|| state.to_vec()),
        };
        (i, retry(router, &req, config, last).await)
    }))
    .await;
    for (i, outcome) in retried {
        outcomes[i] = Some(outcome);
    }
    outcomes.into_iter().map(|o| o.expect("every row is judged")).collect()
}

/// The attempts after the first, one row alone.
async fn retry(
    router: &Router,
    req: &InferRequest,
    config: &PartitionConfig,
    mut last: (DeadLetterReason, String),
) -> Outcome {
    let attempts = config.max_attempts.max(1);
    for _ in 1..attempts {
        match judge(router.infer_within(req.clone(), config.infer_deadline).await, config) {
            Ok(outcome) => return outcome,
            Err(failed) => last = failed,
        }
    }
    Outcome::Dead(last.0, last.1, attempts)
}

/// One attempt's answer: final (scored, dead-lettered, or the pool unable to serve: `Retry`
/// halts the batch), or `Err` with why, when another attempt may help (the model failed on the
/// row, or no answer within the deadline).
fn judge(
    answer: Option<Result<InferOutput, InferError>>,
    config: &PartitionConfig,
) -> Result<Outcome, (DeadLetterReason, String)> {
    match answer {
        Some(Ok(out)) => {
            // A model defect, not bad input: storing it would poison the key (every later
            // event VALUE_RANGE). Deterministic, so not retried.
            if let Some(bad) = non_finite(&out) {
                return Ok(Outcome::Dead(DeadLetterReason::OutputRange, bad, 1));
            }
            Ok(Outcome::Scored(Box::new(out)))
        }
        Some(Err(e)) => match e {
            InferError::UnknownModel { .. } => {
                Ok(Outcome::Dead(DeadLetterReason::UnknownModel, e.to_string(), 1))
            }
            InferError::Shape { .. } | InferError::Steps { .. } => {
                Ok(Outcome::Dead(DeadLetterReason::Shape, e.to_string(), 1))
            }
            InferError::ValueRange { .. } => {
                Ok(Outcome::Dead(DeadLetterReason::ValueRange, e.to_string(), 1))
            }
            InferError::Backend(_) | InferError::Panicked(_) => {
                Err((DeadLetterReason::InferenceFailed, e.to_string()))
            }
            InferError::Overloaded { .. } | InferError::WorkerLost { .. } | InferError::ShuttingDown => {
                Ok(Outcome::Retry(e))
            }
        },
        None => Err((DeadLetterReason::Timeout, format!("no answer within {:?}", config.infer_deadline))),
    }
}

/// The fail point `partition-batch-delay`'s milliseconds, when it fires.
fn test_delay() -> Option<u64> {
    fail::fail_point!("partition-batch-delay", |ms| ms.and_then(|m| m.parse().ok()));
    None
}

/// What is not finite in a model's answer, if anything.
fn non_finite(out: &InferOutput) -> Option<String> {
    if !out.score.is_finite() {
        return Some(format!("model returned score {}", out.score));
    }
    let i = out.new_state.iter().position(|v| !v.is_finite())?;
    Some(format!("model returned new_state[{i}] = {}", out.new_state[i]))
}
