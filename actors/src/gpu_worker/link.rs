//! The shared handle of one worker: what the router sends through and reads load and health from.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use tokio::sync::oneshot;

use crate::batcher::Pending;
use crate::inference::{Device, InferError, InferOutput, InferRequest, ModelReady};

/// One queued request, as it travels from the router to the worker thread.
#[derive(Debug)]
pub struct Job {
    /// Index of the model in the pool's spec table.
    pub model: usize,
    /// Shared with the router, which keeps it to retry on another worker if this one dies.
    pub request: Arc<InferRequest>,
    pub enqueued_at: Instant,
    /// Run in a batch of its own: set on retries, so a request that kills its worker cannot take
    /// innocent batch-mates down with it again.
    pub isolate: bool,
    /// Answered exactly once, by the worker thread (or dropped with the queue if the thread died,
    /// which the router reads as "worker lost" and retries).
    pub reply: oneshot::Sender<JobReply>,
}

/// What the worker thread answers a job with.
pub type JobReply = Result<InferOutput, JobFailure>;

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

    fn is_cancelled(&self) -> bool {
        self.reply.is_closed()
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
#[derive(Debug, Default)]
pub struct WorkerShared {
    /// Requests sent and not yet answered or cancelled: the router's least-loaded measure.
    inflight: AtomicUsize,
    /// True between "models warmed up" and "thread stopped taking work".
    healthy: AtomicBool,
    /// Load and warm-up times, set once by the thread when it is ready.
    ready: OnceLock<Vec<ModelReady>>,
}

impl WorkerLink {
    pub fn new(index: usize, device: Device, capacity: usize) -> (Arc<Self>, Receiver<Job>) {
        let (tx, rx) = crossbeam_channel::bounded(capacity.max(1));
        (Arc::new(Self { index, device, tx, shared: Arc::default() }), rx)
    }

    /// Queue a job without blocking; the job comes back if the queue is full or the thread gone.
    pub fn try_send(&self, job: Job) -> Result<(), Job> {
        self.shared.inflight.fetch_add(1, Ordering::Relaxed);
        self.tx.try_send(job).map_err(|e| {
            self.shared.inflight.fetch_sub(1, Ordering::Relaxed);
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
}
