//! The shared handle of one worker: what the router sends through and reads load and health from.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use tokio::sync::oneshot;

use crate::batcher::Pending;
use crate::inference::{BatchOutput, Device, InferError, InferRows, ModelReady, Served};

/// One queued job (one or more rows of one model), as it travels from the router to the worker
/// thread. The batcher packs whole jobs; the worker answers each job once.
#[derive(Debug)]
pub struct Job {
    /// Index of the model in the pool's spec table.
    pub model: usize,
    /// Shared with the router, which keeps it to retry on another worker if this one dies.
    pub rows: Arc<InferRows>,
    pub enqueued_at: Instant,
    /// Run in a batch of its own: set on retries, so a request that kills its worker cannot take
    /// innocent batch-mates down with it again.
    pub isolate: bool,
    /// Answered exactly once, by the worker's feeder thread (or dropped with the queue if the
    /// thread died, which the router reads as "worker lost" and retries).
    pub reply: oneshot::Sender<JobReply>,
    /// Written by the worker's device thread when the job's first `forward` starts: its deadline starts then (the
    /// wait in the queue is not timed), and if the worker is then lost or abandoned as hung, the
    /// job ran (it counts against its retries); if not, it only waited. Read, not signalled: the
    /// waiting caller is woken once per job, by its answer.
    pub started: Arc<JobStart>,
}

/// When a job entered a `forward` (µs since [`EPOCH`] + 1; 0 until then).
#[derive(Debug, Default)]
pub struct JobStart(AtomicU64);

impl JobStart {
    pub(crate) fn mark(&self, at: Instant) {
        self.0.store(micros_since_epoch(at), Ordering::Release);
    }

    /// When the job's first `forward` started; `None` while it waits in the queue.
    pub fn at(&self) -> Option<Instant> {
        match self.0.load(Ordering::Acquire) {
            0 => None,
            m => Some(*EPOCH + Duration::from_micros(m - 1)),
        }
    }
}

/// What the worker thread answers a job with.
pub type JobReply = Result<JobOutput, JobFailure>;

/// The answer for a job's rows.
#[derive(Debug, Clone, PartialEq)]
pub struct JobOutput {
    pub values: JobValues,
    /// Rows that failed when run alone, with why, sorted by row; their batch-mates have their
    /// scores.
    pub failed: Vec<(usize, InferError)>,
    /// Of the first `forward` that served the job (if it was split).
    pub served: Served,
}

/// A job's scores and new states: `steps` per row (NaN for a failed row), and `rows × state_size`
/// values for a stateful model (zeros for a failed row), else none.
#[derive(Debug, Clone, PartialEq)]
pub enum JobValues {
    /// Rows `start..start + rows` of the output of the one `forward` that ran the whole job
    /// (the common case): the worker thread, which feeds the device, neither allocates nor copies
    /// per job; the caller copies what it keeps.
    Shared { batch: Arc<BatchOutput>, start: usize, rows: usize, steps: usize, state_size: usize },
    /// Assembled row by row (a job that was split when its batch failed).
    Owned { scores: Vec<f32>, new_state: Vec<f32> },
}

impl JobValues {
    pub fn scores(&self) -> &[f32] {
        match self {
            Self::Shared { batch, start, rows, steps, .. } => {
                &batch.scores[start * steps..(start + rows) * steps]
            }
            Self::Owned { scores, .. } => scores,
        }
    }

    pub fn new_state(&self) -> &[f32] {
        match self {
            Self::Shared { batch, start, rows, state_size, .. } => {
                &batch.new_state[start * state_size..(start + rows) * state_size]
            }
            Self::Owned { new_state, .. } => new_state,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum JobFailure {
    /// A final answer for the caller.
    Error(InferError),
    /// The worker died. `ran` says whether this job was in the batch that killed it; the router
    /// retries either way but counts only jobs that ran against their retry budget, so a poison
    /// request cannot exhaust the retries of innocent requests queued behind it.
    Lost { ran: bool },
}

impl Pending for Job {
    fn enqueued_at(&self) -> Instant {
        self.enqueued_at
    }

    fn rows(&self) -> usize {
        self.rows.rows
    }

    fn is_cancelled(&self) -> bool {
        self.reply.is_closed()
    }

    fn due(&self) -> Option<Instant> {
        self.rows.due
    }
}

/// What the router holds of one worker: the queue's sending end plus the shared load and health.
///
/// The worker thread holds only the [`WorkerShared`] part, never a sender, so once the router's
/// and the actor's copies of the link are dropped the queue disconnects and the thread drains
/// and exits.
#[derive(Debug)]
pub struct WorkerLink {
    pub index: usize,
    pub device: Device,
    /// Bounded: the pool's in-flight limit keeps it from filling; never blocks the sender.
    tx: Sender<Job>,
    pub(crate) shared: Arc<WorkerShared>,
}

/// Load and health of one worker, written by its thread and read by the router.
#[derive(Debug)]
pub struct WorkerShared {
    /// Rows sent and not yet answered or cancelled: the router's least-loaded measure.
    inflight: AtomicUsize,
    /// True between "models warmed up" and "thread stopped taking work".
    healthy: AtomicBool,
    /// Load and warm-up times, set once by the thread when it is ready.
    ready: OnceLock<Vec<ModelReady>>,
    /// When the running `forward` started (µs since [`EPOCH`] + 1); 0 while idle.
    busy_since: AtomicU64,
    /// Set when the supervisor gave the worker up as hung: whoever waits on it stops waiting.
    abandoned: tokio::sync::watch::Sender<bool>,
}

impl Default for WorkerShared {
    fn default() -> Self {
        Self {
            inflight: AtomicUsize::new(0),
            healthy: AtomicBool::new(false),
            ready: OnceLock::new(),
            busy_since: AtomicU64::new(0),
            abandoned: tokio::sync::watch::Sender::new(false),
        }
    }
}

/// The origin of `busy_since`.
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

fn micros_since_epoch(t: Instant) -> u64 {
    u64::try_from(t.saturating_duration_since(*EPOCH).as_micros()).unwrap_or(u64::MAX - 1) + 1
}

impl WorkerLink {
    pub fn new(index: usize, device: Device, capacity: usize) -> (Arc<Self>, Receiver<Job>) {
        let (tx, rx) = crossbeam_channel::bounded(capacity.max(1));
        (Arc::new(Self { index, device, tx, shared: Arc::default() }), rx)
    }

    /// Queue a job without blocking; the job comes back if the queue is full or the thread gone.
    pub fn try_send(&self, job: Job) -> Result<(), Job> {
        let rows = job.rows.rows;
        self.shared.inflight.fetch_add(rows, Ordering::Relaxed);
        self.tx.try_send(job).map_err(|e| {
            self.shared.inflight.fetch_sub(rows, Ordering::Relaxed);
            e.into_inner()
        })
    }

    pub fn inflight(&self) -> usize {
        self.shared.inflight.load(Ordering::Relaxed)
    }

    pub fn is_healthy(&self) -> bool {
        self.shared.is_healthy()
    }

    pub fn ready_models(&self) -> &[ModelReady] {
        self.shared.ready.get().map_or(&[], Vec::as_slice)
    }
}

impl WorkerShared {
    /// `n` rows were answered or cancelled.
    pub(crate) fn finished(&self, n: usize) {
        self.inflight.fetch_sub(n, Ordering::Relaxed);
    }

    pub(crate) fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    pub(crate) fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Release);
    }

    pub(crate) fn set_ready(&self, ready: Vec<ModelReady>) {
        let _ = self.ready.set(ready);
    }

    /// The thread starts (`Some(now)`) or ends (`None`) a `forward`.
    pub(crate) fn set_busy(&self, since: Option<Instant>) {
        self.busy_since.store(since.map_or(0, micros_since_epoch), Ordering::Release);
    }

    /// How long the running `forward` has been running at `now`; `None` while idle.
    pub fn busy_for(&self, now: Instant) -> Option<Duration> {
        match self.busy_since.load(Ordering::Acquire) {
            0 => None,
            since => Some(Duration::from_micros(micros_since_epoch(now).saturating_sub(since))),
        }
    }

    /// Give the worker up (hung): callers waiting on its answers stop waiting and retry elsewhere.
    pub(crate) fn abandon(&self) {
        self.set_healthy(false);
        self.abandoned.send_replace(true);
    }

    /// Resolves once the worker is abandoned.
    pub(crate) async fn abandoned(&self) {
        let mut rx = self.abandoned.subscribe();
        let _ = rx.wait_for(|a| *a).await;
    }
}
