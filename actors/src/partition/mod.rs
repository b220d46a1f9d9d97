//! The partition actor: owns one Kafka partition of the ingestion topic and the state of its keys.
//!
//! Records arrive through a bounded channel that the consumer thread fills (when it is full the
//! consumer pauses the Kafka partition: pressure never turns into buffering). Two stages, so a
//! batch is scored while the previous ones wait for the broker and the disk:
//!
//! **Compute** (the actor, one batch at a time):
//! 1. skip records at or below the last computed offset (redelivered after a restart);
//! 2. decode and validate ([`decode`]); bad records become dead letters;
//! 3. group the good ones into per-key [`waves`], so one key's records apply in offset order;
//! 4. per wave: load the keys' states (from batches not yet written first, then through the
//!    cache in one batched read), drop duplicates (sequence at or below the key's), run the rows
//!    through the inference [`Router`] (deadline, bounded retries), keep the new states;
//! 5. hand the batch (outputs, new states, last offset) to the committer, in order, through a
//!    bounded channel (`max_pending_batches`; full: the actor waits, its queue fills, the
//!    partition pauses).
//!
//! **Commit** (the committer task, in batch order; everything waiting goes as one group):
//! 6. produce the group's scores and dead letters and wait until the broker acknowledged each;
//! 7. write the new states **with** the group's last offset in one atomic, fenced store write;
//! 8. hand `last + 1` to the group's offset commit.
//!
//! A crash before 7 re-runs the batches from the stored offset: the state effect happens once,
//! outputs may repeat (at least once), recognisable by their source coordinates. A crash after 7
//! skips them (step 1). Transient failures (broker, store, no healthy worker) retry their step
//! with backoff and never commit past it; a fenced or corrupt store stops the actor.

pub mod decode;
pub mod sequence;
pub mod supervisor;
#[cfg(test)]
mod tests;
pub mod trace;
pub mod waves;

use std::collections::HashMap;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::Receiver;
use partita_proto::v1::{DeadLetter, DeadLetterReason, Score, StageLatencies};
use prost::Message;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use sha2::{Digest, Sha256};
use tracing::{Instrument as _, Span};

use crate::inference::{InferError, InferOutput, InferRequest};
use crate::pool::Router;
use crate::state::{
    Epoch, Offset, PartitionId, Sequenced, StateCache, StateStore, StateValue, StateWrite, StoreError,
};
pub use decode::{Limits, Rejection, ValidEvent};
pub use trace::{NoTraces, Tracer};

/// Header names on scores and dead letters.
pub const HEADER_SOURCE_TOPIC: &str = "partita-source-topic";
pub const HEADER_SOURCE_PARTITION: &str = "partita-source-partition";
pub const HEADER_SOURCE_OFFSET: &str = "partita-source-offset";
pub const HEADER_DLQ_REASON: &str = "partita-dlq-reason";
/// W3C trace context: read from the input record; its score or dead letter carries the node's
/// span for the record (or, without traces, the input's header unchanged).
pub const HEADER_TRACEPARENT: &str = "traceparent";

/// Longest `traceparent` header copied to an output (a W3C one is 55 bytes).
const MAX_TRACEPARENT: usize = 512;

/// Bytes of an oversized value kept in its dead letter (with the hash of the whole value).
pub const DEAD_LETTER_PREFIX: usize = 1024;

/// One record of the ingestion topic, copied out of the consumer.
#[derive(Debug, Clone)]
pub struct InputRecord {
    pub topic: Arc<str>,
    pub partition: PartitionId,
    pub offset: Offset,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    /// When the consumer handed it over (node latency starts here).
    pub received: Instant,
    /// What [`InputRecord::bounded`] cut from a record over a limit (it is dead-lettered anyway).
    pub trimmed: Trimmed,
}

/// What the consumer cut from a record that breaks a limit: partition queues hold at most a
/// 1 KiB prefix of an oversized value or key, never megabytes, and the hash of a large value is
/// computed on the consumer thread, not on the async runtime.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Trimmed {
    /// The value's real length and SHA-256, when only its first 1 KiB is kept.
    pub value: Option<(usize, [u8; 32])>,
    /// The key's real length, when only its first 1 KiB is kept.
    pub key_len: Option<usize>,
    /// The headers' count and bytes, when they were dropped.
    pub headers: Option<(usize, usize)>,
    /// The headers could not be read (a header name that is not UTF-8): their count.
    pub headers_unreadable: Option<usize>,
}

impl InputRecord {
    /// A record as the consumer hands it over, with whatever breaks `limits` cut down (see
    /// [`Trimmed`]); the rest as is.
    #[allow(clippy::too_many_arguments)]
    pub fn bounded(
        topic: Arc<str>,
        partition: PartitionId,
        offset: Offset,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: Vec<(String, Vec<u8>)>,
        limits: &Limits,
    ) -> Self {
        let mut trimmed = Trimmed::default();
        let value = value.map(|v| {
            if v.len() > limits.max_value_bytes {
                trimmed.value = Some((v.len(), Sha256::digest(v).into()));
                v[..DEAD_LETTER_PREFIX].to_vec()
            } else {
                v.to_vec()
            }
        });
        let key = key.map(|k| {
            if k.len() > limits.max_key_bytes {
                trimmed.key_len = Some(k.len());
                k[..DEAD_LETTER_PREFIX.min(k.len())].to_vec()
            } else {
                k.to_vec()
            }
        });
        let (count, bytes) = (headers.len(), headers.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>());
        let headers = if count > limits.max_headers || bytes > limits.max_header_bytes {
            trimmed.headers = Some((count, bytes));
            // Only the trace context stays: the dead letter still joins the producer's trace.
            headers
                .into_iter()
                .filter(|(k, v)| k == HEADER_TRACEPARENT && v.len() <= MAX_TRACEPARENT)
                .take(1)
                .collect()
        } else {
            headers
        };
        Self { topic, partition, offset, key, value, headers, received: Instant::now(), trimmed }
    }

    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_slice())
    }

    /// Bytes this record holds in a partition queue (key, value, headers).
    pub fn size(&self) -> usize {
        self.key.as_ref().map_or(0, Vec::len)
            + self.value.as_ref().map_or(0, Vec::len)
            + self.headers.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
    }
}

/// Which topic of the processing tier an output goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputTopic {
    Scores,
    DeadLetters,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OutputRecord {
    pub topic: OutputTopic,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
    /// The input record it answers (its partition is the actor's).
    pub source_offset: Offset,
}

/// Not every record was acknowledged.
#[derive(Debug, Clone, Default, thiserror::Error)]
#[error("{} outputs not delivered, {} refused for good: {detail}", unacked.len(), rejected.len())]
pub struct SinkError {
    pub detail: String,
    /// Indices of records that failed for now (broker down, timeout): produce them again.
    pub unacked: Vec<usize>,
    /// Indices of records the broker will never take (too large), with the reason.
    pub rejected: Vec<(usize, String)>,
}

impl SinkError {
    /// Every one of `n` records failed for now.
    pub fn all(n: usize, detail: impl Into<String>) -> Self {
        Self { detail: detail.into(), unacked: (0..n).collect(), rejected: Vec::new() }
    }
}

/// The port to the processing tier and the consumer group (the rdkafka adapter implements it).
pub trait PartitionSink: Send + Sync + 'static {
    /// Produce `records` in order; resolves once the broker acknowledged all of them (`acks=all`),
    /// or says which were not and which never will be.
    fn produce(&self, records: &[OutputRecord]) -> impl Future<Output = Result<(), SinkError>> + Send;
    /// Every record of `partition` below `next_offset` is durable: the group may commit it.
    fn commit(&self, partition: PartitionId, next_offset: Offset);
}

/// How a partition actor processes.
#[derive(Debug, Clone)]
pub struct PartitionConfig {
    /// Records taken from the queue into one batch.
    pub max_batch: usize,
    /// Records of one key in one batch (= waves per batch). A hot key's records must run one
    /// after another; capping them keeps a batch's other keys from waiting on that chain.
    pub max_waves: usize,
    /// Computed batches that may wait for the committer (their outputs' acknowledgements and
    /// state write) while the next batch is scored.
    pub max_pending_batches: usize,
    /// Per-record inference deadline, from the start of its batch on a worker (waiting for room
    /// in the pool or a worker's queue is not counted); a record that misses it is retried, then
    /// dead-lettered.
    pub infer_deadline: Duration,
    /// Inference attempts per record before it is dead-lettered (errors, panics, deadlines).
    pub max_attempts: u32,
    /// An event more than this above its key's applied sequence is dead-lettered `SEQUENCE_GAP`.
    pub max_sequence_gap: u64,
    /// First wait before retrying a failed produce or store write (doubles up to `max_backoff`).
    pub backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for PartitionConfig {
    fn default() -> Self {
        Self {
            max_batch: 1024,
            max_waves: 4,
            max_pending_batches: 4,
            infer_deadline: Duration::from_secs(2),
            max_attempts: 3,
            max_sequence_gap: 1_000_000,
            backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// Node-wide counters, shared by every partition actor (read by the node's report and metrics).
#[derive(Debug, Default)]
pub struct PipelineCounters {
    /// Records taken from the ingestion topic (redeliveries included).
    pub received: AtomicU64,
    /// Records at or below the stored applied offset: already applied, skipped.
    pub redelivered: AtomicU64,
    pub scored: AtomicU64,
    /// Dead letters, indexed by `DeadLetterReason as usize`.
    pub dead_letters: [AtomicU64; DEAD_LETTER_REASONS],
    pub unknown_fields: AtomicU64,
    /// Events whose features were clamped into their model's range.
    pub clamped: AtomicU64,
    pub time_suspect: AtomicU64,
    /// Batches committed (a group of batches committed together makes one state write).
    pub batches: AtomicU64,
    /// Produce or store-write attempts that failed and were retried.
    pub retries: AtomicU64,
    /// The stored applied offset of each partition this node applied to.
    pub applied_offsets: std::sync::Mutex<std::collections::BTreeMap<u32, i64>>,
}

/// Hooks for metrics, called by partition actors. Every method has a no-op default.
pub trait PipelineObserver: Send + Sync + 'static {
    /// One record scored by `model`: its inference result, the time from the node receiving it to
    /// its score being ready, and from its event time to then (`None` when the event time is
    /// in the future of this node's clock).
    fn scored(&self, _model: &str, _out: &InferOutput, _in_node: Duration, _since_event: Option<Duration>) {}
    /// One batch's state write (with its offset) took `elapsed`.
    fn state_written(&self, _partition: PartitionId, _elapsed: Duration) {}
}

#[derive(Debug, Default, Clone, Copy)]
pub struct NoopPipelineObserver;
impl PipelineObserver for NoopPipelineObserver {}

/// Number of `DeadLetterReason` values (the enum's highest value + 1).
pub const DEAD_LETTER_REASONS: usize = DeadLetterReason::OutOfOrder as usize + 1;

impl PipelineCounters {
    pub fn dead_lettered(&self, reason: DeadLetterReason) -> u64 {
        self.dead_letters[reason as usize].load(Ordering::Relaxed)
    }

    pub fn dead_lettered_total(&self) -> u64 {
        self.dead_letters.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

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
    /// Bytes of the records in `queue` ([`InputRecord::size`]): the consumer adds, the actor
    /// subtracts what it takes, so the queue is bounded in bytes as well as in records.
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
    /// The record that would have exceeded `max_waves`: first in the next batch.
    carry: Option<InputRecord>,
    /// Records at or below this offset were computed (or applied before this actor started).
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
    /// finish in time). What was not computed or committed is dropped: nothing past the stored
    /// offset was committed, so whoever owns the partition next reads it again.
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
            carry: None,
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
                if state.carry.is_some() || !state.args.queue.is_empty() {
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
type Pending = Arc<Mutex<HashMap<Vec<u8>, (u64, StateValue)>>>;

/// A computed batch on its way to the committer.
struct Computed {
    no: u64,
    last: Offset,
    records: usize,
    /// Scores and dead letters in offset order.
    outputs: Vec<OutputRecord>,
    /// New states of the keys the batch changed.
    entries: Vec<(Vec<u8>, StateValue)>,
    scored: u64,
    dead: Vec<DeadLetterReason>,
    /// The batch's and its records' spans: they end when the batch is durable.
    span: Span,
    _record_spans: Vec<Span>,
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
                tracing::info!(partition = %self.args.partition, queued = self.args.queue.len(), "drain deadline: leaving the rest to be read again");
                return Ok(());
            }
            let batch = self.next_batch();
            if batch.is_empty() {
                return Ok(());
            }
            // Crash tests: `partition-batch=1*panic(...)` fails the actor once;
            // `partition-batch-delay=N*return(MS)` makes N batches wait MS ms first.
            fail::fail_point!("partition-batch");
            if let Some(ms) = test_delay() {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            let Some(computed) = self.compute_with_retry(batch).await? else { continue };
            let Some((tx, _)) = &self.committer else { return Err("the partition is draining".into()) };
            if tx.send(computed).await.is_err() {
                return Err("the committer stopped".into());
            }
        }
        Ok(())
    }

    /// Up to `max_batch` queued records, at most `max_waves` of any one key.
    fn next_batch(&mut self) -> Vec<InputRecord> {
        let config = &self.args.config;
        let mut batch = Vec::new();
        let mut per_key: HashMap<Vec<u8>, usize> = HashMap::new();
        let take = |args: &PartitionArgs<S, K>| {
            let rec = args.queue.try_recv().ok()?;
            args.queued_bytes.fetch_sub(rec.size(), Ordering::SeqCst);
            Some(rec)
        };
        let mut next = self.carry.take().or_else(|| take(&self.args));
        while let Some(rec) = next {
            let n = per_key.entry(rec.key.clone().unwrap_or_default()).or_insert(0);
            if *n == config.max_waves {
                self.carry = Some(rec);
                break;
            }
            *n += 1;
            batch.push(rec);
            if batch.len() == config.max_batch {
                break;
            }
            next = take(&self.args);
        }
        batch
    }

    /// Compute `batch`, retrying transient failures (no healthy worker, store reads) with
    /// backoff. `None`: every record was computed before.
    async fn compute_with_retry(
        &mut self,
        batch: Vec<InputRecord>,
    ) -> Result<Option<Computed>, ActorProcessingErr> {
        let mut backoff = self.args.config.backoff;
        // One span for the batch, retries included (their warnings are logged inside it).
        let span = self.args.tracer.batch_span(self.args.partition, batch.len());
        loop {
            match self.compute(&batch, &span).instrument(span.clone()).await {
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

    /// Decode, validate and score `batch` (steps 1-4 of the module doc). `None`: nothing new.
    async fn compute(&mut self, batch: &[InputRecord], batch_span: &Span) -> Result<Option<Computed>, Halt> {
        let a = &self.args;
        let c = &a.counters;
        let Some(last) = batch.last().map(|r| r.offset) else { return Ok(None) };
        let started = Instant::now();
        c.received.fetch_add(batch.len() as u64, Ordering::Relaxed);
        let now = unix_micros();
        let fresh: Vec<&InputRecord> =
            batch.iter().filter(|r| self.computed.is_none_or(|done| r.offset > done)).collect();
        c.redelivered.fetch_add((batch.len() - fresh.len()) as u64, Ordering::Relaxed);
        if fresh.is_empty() {
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
        let waves = waves::waves(good.iter().map(|(_, v)| v.event.key.as_slice()));
        let n_waves = waves.len();
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

            let mut runs = Vec::with_capacity(wave.len());
            for &g in &wave {
                let (i, v) = &good[g];
                let ks = &keys[&v.event.key].seq;
                let verdict =
                    sequence::judge(ks.sequence, ks.window, v.event.sequence, a.config.max_sequence_gap);
                if let sequence::Verdict::Reject(reason, detail) = verdict {
                    dead.push(reason);
                    outputs.push((fresh[*i].offset, dead_out(*i, reason, &detail, 1)));
                    continue;
                }
                let req = InferRequest {
                    model: v.model.clone(),
                    features: v.event.features.clone(),
                    state: (!ks.state.is_empty()).then(|| ks.state.clone()),
                };
                runs.push((g, infer(router, req, &a.config)));
            }
            let (idx, futs): (Vec<usize>, Vec<_>) = runs.into_iter().unzip();
            for (g, outcome) in idx.into_iter().zip(futures::future::join_all(futs).await) {
                let (i, v) = &good[g];
                let rec = fresh[*i];
                match outcome {
                    Outcome::Scored(out) => {
                        let ks = keys.get_mut(&v.event.key).expect("loaded above");
                        let s = &mut ks.seq;
                        s.window = sequence::advance(s.sequence, s.window, v.event.sequence);
                        s.sequence = v.event.sequence;
                        s.state = out.new_state.clone();
                        ks.dirty = true;
                        scored += 1;
                        // Any i64 is a valid event time (far-off ones are flagged): no overflow.
                        let since_event = unix_micros()
                            .checked_sub(v.event.event_time_unix_micros)
                            .and_then(|us| u64::try_from(us).ok())
                            .map(Duration::from_micros);
                        a.observer.scored(&v.model, &out, rec.received.elapsed(), since_event);
                        let span = &spans[*i];
                        span.record(trace::OUTCOME, "SCORED");
                        span.record(trace::MODEL, &*v.model);
                        span.record(trace::MODEL_VERSION, out.model_version);
                        span.record(trace::DEVICE, tracing::field::display(&out.device));
                        span.record(trace::INFERENCE_BATCH, out.batch_size);
                        let output = score(rec, v, &out, load_us).with_traceparent(traceparent(*i));
                        outputs.push((rec.offset, output));
                    }
                    Outcome::Dead(reason, detail, attempts) => {
                        dead.push(reason);
                        outputs.push((rec.offset, dead_out(*i, reason, &detail, attempts)));
                    }
                    Outcome::Retry(e) => return Err(Halt::Transient(e.to_string())),
                }
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
        self.computed = Some(last);
        tracing::debug!(
            partition = %self.args.partition,
            records = batch.len(),
            waves = n_waves,
            compute_us = micros(started.elapsed()),
            "batch computed"
        );
        Ok(Some(Computed {
            no,
            last,
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

/// The commit stage of one partition: produces computed batches' outputs, writes their states
/// with the offset, hands the offset to the group commit; strictly in batch order.
struct Committer<S, K> {
    topic: Arc<str>,
    partition: PartitionId,
    epoch: Epoch,
    cache: Arc<StateCache<S>>,
    sink: Arc<K>,
    counters: Arc<PipelineCounters>,
    observer: Arc<dyn PipelineObserver>,
    config: PartitionConfig,
    pending: Pending,
    actor: ActorRef<PartitionMsg>,
}

impl<S: StateStore, K: PartitionSink> Committer<S, K> {
    /// Until the actor drops its sender; returns the last applied offset it wrote.
    async fn run(self, mut rx: tokio::sync::mpsc::Receiver<Computed>) -> Option<Offset> {
        let mut applied = None;
        while let Some(first) = rx.recv().await {
            // Everything computed meanwhile goes out together: one wait for acks, one write.
            let mut group = vec![first];
            while let Ok(next) = rx.try_recv() {
                group.push(next);
            }
            let span = group[0].span.clone();
            match self.commit(&mut group).instrument(span).await {
                Ok(last) => applied = Some(last),
                Err(e) => {
                    tracing::error!(partition = %self.partition, error = %e, "partition stops");
                    let _ = self.actor.cast(PartitionMsg::Failed(e));
                    return applied;
                }
            }
        }
        applied
    }

    /// Moves the group's outputs and states out (no copies); its spans end when it is dropped.
    async fn commit(&self, group: &mut [Computed]) -> Result<Offset, StoreError> {
        let started = Instant::now();
        let mut outputs: Vec<OutputRecord> =
            group.iter_mut().flat_map(|b| std::mem::take(&mut b.outputs)).collect();
        let mut backoff = self.config.backoff;
        // Scores refused for good, replaced by minimal dead letters.
        let mut refused_scores = 0u64;
        while let Err(e) = self.sink.produce(&outputs).await {
            self.counters.retries.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(partition = %self.partition, error = %e, ?backoff, "produce failed; retrying what was not acknowledged");
            // Again: only what was not acknowledged (no duplicates of the rest), and a minimal
            // dead letter for each output the broker will never take (no retry loop on it).
            let rejected: HashMap<usize, String> = e.rejected.into_iter().collect();
            let unacked: std::collections::HashSet<usize> = e.unacked.into_iter().collect();
            let mut next = Vec::with_capacity(unacked.len() + rejected.len());
            for (i, out) in outputs.into_iter().enumerate() {
                if let Some(why) = rejected.get(&i) {
                    match refused_output(&self.topic, self.partition, &out, why) {
                        Some(minimal) => {
                            if out.topic == OutputTopic::Scores {
                                refused_scores += 1;
                            }
                            tracing::error!(partition = %self.partition, offset = out.source_offset.0, bytes = out.value.len(), reason = %why, "output refused for good; a minimal dead letter replaces it");
                            next.push(minimal);
                        }
                        // Already minimal: nothing smaller to send; keep trying it.
                        None => next.push(out),
                    }
                } else if unacked.contains(&i) {
                    next.push(out);
                }
            }
            outputs = next;
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.config.max_backoff);
        }
        // A later batch's state of a key replaces an earlier one's.
        let mut entries: HashMap<Vec<u8>, StateValue> = HashMap::new();
        for b in group.iter_mut() {
            entries.extend(std::mem::take(&mut b.entries));
        }
        let last = group.last().expect("a group has a batch").last;
        let write = StateWrite {
            partition: self.partition,
            epoch: self.epoch,
            applied_offset: last,
            entries: entries.into_iter().collect(),
        };
        let produced = Instant::now();
        self.store_with_retry(&write).await?;
        self.observer.state_written(self.partition, produced.elapsed());
        // Written, so in the cache: drop the pending states unless a later batch changed the key.
        let newest = group.last().expect("a group has a batch").no;
        {
            let mut pending = self.pending.lock().unwrap();
            for (k, _) in &write.entries {
                if pending.get(k).is_some_and(|(no, _)| *no <= newest) {
                    pending.remove(k);
                }
            }
        }
        tracing::debug!(
            partition = %self.partition,
            batches = group.len(),
            records = group.iter().map(|b| b.records).sum::<usize>(),
            produce_us = micros(produced - started),
            store_us = micros(produced.elapsed()),
            "batches applied"
        );
        crate::crash_point!("after-state-write");
        let c = &self.counters;
        c.applied_offsets.lock().unwrap().insert(self.partition.0, last.0);
        self.sink.commit(self.partition, Offset(last.0 + 1));
        c.scored.fetch_sub(refused_scores, Ordering::Relaxed);
        c.dead_letters[DeadLetterReason::OutputRejected as usize]
            .fetch_add(refused_scores, Ordering::Relaxed);
        for b in group.iter() {
            c.scored.fetch_add(b.scored, Ordering::Relaxed);
            for r in &b.dead {
                c.dead_letters[*r as usize].fetch_add(1, Ordering::Relaxed);
            }
        }
        c.batches.fetch_add(group.len() as u64, Ordering::Relaxed);
        Ok(last)
    }

    /// The outputs are out: the state write must now succeed (or the actor stop) before anything
    /// else happens, so it retries here.
    async fn store_with_retry(&self, write: &StateWrite) -> Result<(), StoreError> {
        let mut backoff = self.config.backoff;
        loop {
            match self.cache.apply(write.clone()).await {
                Ok(()) => return Ok(()),
                Err(StoreError::Unavailable { detail }) => {
                    self.counters.retries.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(partition = %self.partition, %detail, "state write failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.config.max_backoff);
                }
                Err(fatal) => return Err(fatal),
            }
        }
    }
}

/// One record's inference: deadline per attempt, bounded attempts, bad requests dead-lettered.
async fn infer(router: &Router, req: InferRequest, config: &PartitionConfig) -> Outcome {
    let mut last = (DeadLetterReason::InferenceFailed, String::new());
    for _ in 0..config.max_attempts {
        // Waiting (for room in the pool, in a worker's queue) is backpressure, not part of the
        // deadline: a backlog or a catch-up must not turn valid events into TIMEOUT dead letters.
        match router.infer_within(req.clone(), config.infer_deadline).await.ok_or(()) {
            Ok(Ok(out)) => {
                // A model defect, not bad input: storing it would poison the key (every later
                // event VALUE_RANGE). Deterministic, so not retried.
                if let Some(bad) = non_finite(&out) {
                    return Outcome::Dead(DeadLetterReason::OutputRange, bad, 1);
                }
                return Outcome::Scored(Box::new(out));
            }
            Ok(Err(e)) => match e {
                InferError::UnknownModel { .. } => {
                    return Outcome::Dead(DeadLetterReason::UnknownModel, e.to_string(), 1);
                }
                InferError::Shape { .. } => return Outcome::Dead(DeadLetterReason::Shape, e.to_string(), 1),
                InferError::ValueRange { .. } => {
                    return Outcome::Dead(DeadLetterReason::ValueRange, e.to_string(), 1);
                }
                InferError::Backend(_) | InferError::Panicked(_) => {
                    last = (DeadLetterReason::InferenceFailed, e.to_string());
                }
                InferError::Overloaded { .. } | InferError::WorkerLost { .. } | InferError::ShuttingDown => {
                    return Outcome::Retry(e);
                }
            },
            Err(_) => {
                last = (DeadLetterReason::Timeout, format!("no answer within {:?}", config.infer_deadline));
            }
        }
    }
    Outcome::Dead(last.0, last.1, config.max_attempts)
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

fn source_headers(rec: &InputRecord) -> Vec<(String, Vec<u8>)> {
    vec![
        (HEADER_SOURCE_TOPIC.to_owned(), rec.topic.as_bytes().to_vec()),
        (HEADER_SOURCE_PARTITION.to_owned(), rec.partition.0.to_string().into_bytes()),
        (HEADER_SOURCE_OFFSET.to_owned(), rec.offset.0.to_string().into_bytes()),
    ]
}

impl OutputRecord {
    /// A W3C `traceparent` is 55 bytes; anything over [`MAX_TRACEPARENT`] is not one and is
    /// not copied.
    fn with_traceparent(mut self, traceparent: Option<Vec<u8>>) -> Self {
        if let Some(tp) = traceparent.filter(|tp| tp.len() <= MAX_TRACEPARENT) {
            self.headers.push((HEADER_TRACEPARENT.to_owned(), tp));
        }
        self
    }
}

fn score(rec: &InputRecord, v: &ValidEvent, out: &InferOutput, load_us: u64) -> OutputRecord {
    let e = &v.event;
    let msg = Score {
        source_topic: rec.topic.to_string(),
        source_partition: rec.partition.0 as i32,
        source_offset: rec.offset.0,
        event_id: e.event_id.clone(),
        key: e.key.clone(),
        sequence: e.sequence,
        model: v.model.to_string(),
        model_version: out.model_version,
        score: out.score,
        event_time_unix_micros: e.event_time_unix_micros,
        batch_size: out.batch_size as u32,
        latency: Some(StageLatencies {
            node_us: micros(rec.received.elapsed()),
            queue_us: micros(out.queue_time),
            compute_us: micros(out.compute_time),
            state_load_us: load_us,
        }),
        event_time_suspect: v.time_suspect,
    };
    OutputRecord {
        topic: OutputTopic::Scores,
        key: e.key.clone(),
        value: msg.encode_to_vec(),
        headers: source_headers(rec),
        source_offset: rec.offset,
    }
}

fn dead_letter(
    rec: &InputRecord,
    reason: DeadLetterReason,
    detail: &str,
    attempts: u32,
    limits: &Limits,
) -> OutputRecord {
    tracing::debug!(partition = %rec.partition, offset = rec.offset.0, ?reason, %detail, "dead letter");
    let raw = rec.value.as_deref().unwrap_or_default();
    // A value the consumer cut down comes with its real length and hash.
    let (value_len, value_sha256) = match rec.trimmed.value {
        Some((len, sha)) => (len, sha.to_vec()),
        None => (raw.len(), Sha256::digest(raw).to_vec()),
    };
    let truncated = rec.trimmed.value.is_some() || raw.len() > limits.max_value_bytes;
    let kept = if truncated { &raw[..DEAD_LETTER_PREFIX.min(raw.len())] } else { raw };
    // Keys are bounded by `max_key_bytes` only once decoded: a dead letter for a long one keeps
    // its first 1 KiB (and its length), once in the body and once as the record key.
    let key = rec.key.as_deref().unwrap_or_default();
    let key_kept = &key[..DEAD_LETTER_PREFIX.min(key.len())];
    let msg = DeadLetter {
        source_topic: rec.topic.to_string(),
        source_partition: rec.partition.0 as i32,
        source_offset: rec.offset.0,
        key: key_kept.to_vec(),
        reason: reason as i32,
        detail: detail.to_owned(),
        value: kept.to_vec(),
        truncated,
        value_sha256,
        value_len: value_len as u64,
        attempts,
        key_len: rec.trimmed.key_len.unwrap_or(key.len()) as u64,
    };
    let mut headers = source_headers(rec);
    headers.push((HEADER_DLQ_REASON.to_owned(), reason.as_str_name().as_bytes().to_vec()));
    OutputRecord {
        topic: OutputTopic::DeadLetters,
        key: key_kept.to_vec(),
        value: msg.encode_to_vec(),
        headers,
        source_offset: rec.offset,
    }
}

/// The minimal dead letter that replaces `out` when the broker refuses it for good: source
/// coordinates, the key's first 256 bytes, the refused output's hash and length, no value. A score
/// becomes `OUTPUT_REJECTED`; a dead letter keeps its reason. `None` when `out` is minimal already.
fn refused_output(
    topic: &str,
    partition: PartitionId,
    out: &OutputRecord,
    why: &str,
) -> Option<OutputRecord> {
    const KEY_KEPT: usize = 256;
    let (reason, attempts, key_len) = match out.topic {
        OutputTopic::Scores => (DeadLetterReason::OutputRejected, 1, out.key.len() as u64),
        OutputTopic::DeadLetters => {
            let d = DeadLetter::decode(out.value.as_slice()).ok()?;
            if d.truncated && d.value.is_empty() {
                return None;
            }
            (d.reason(), d.attempts, d.key_len)
        }
    };
    let key = out.key[..KEY_KEPT.min(out.key.len())].to_vec();
    let msg = DeadLetter {
        source_topic: topic.to_owned(),
        source_partition: partition.0 as i32,
        source_offset: out.source_offset.0,
        key: key.clone(),
        reason: reason as i32,
        detail: format!("the broker refused the {} bytes of this output for good: {why}", out.value.len()),
        value: Vec::new(),
        truncated: true,
        value_sha256: Sha256::digest(&out.value).to_vec(),
        value_len: out.value.len() as u64,
        attempts,
        key_len,
    };
    let headers = out
        .headers
        .iter()
        .filter(|(k, _)| k.starts_with("partita-source-") || k == HEADER_TRACEPARENT)
        .cloned()
        .chain(std::iter::once((HEADER_DLQ_REASON.to_owned(), reason.as_str_name().as_bytes().to_vec())))
        .collect();
    Some(OutputRecord {
        topic: OutputTopic::DeadLetters,
        key,
        value: msg.encode_to_vec(),
        headers,
        source_offset: out.source_offset,
    })
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Microseconds since the Unix epoch on this node's clock.
pub fn unix_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}
