//! The router: the one handle callers use to run inference on the pool.
//!
//! It validates a request against its model before anything is queued, bounds the pool's total
//! in-flight work with a semaphore (callers wait, or get [`InferError::Overloaded`] from
//! [`Router::try_infer`]), sends to the least-loaded healthy worker, and retries on another worker
//! when the one holding the request died. Every request ends in exactly one `Ok` or `Err`.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use crate::gpu_worker::{Job, JobFailure, JobReply, WorkerLink};
use crate::inference::{InferError, InferOutput, InferRequest, validate};
use crate::model::ModelSpec;

#[derive(Clone, Debug)]
pub struct Router {
    inner: Arc<RouterInner>,
}

#[derive(Debug)]
struct RouterInner {
    specs: Arc<[ModelSpec]>,
    by_name: HashMap<String, usize>,
    /// One slot per configured worker; `None` while it is down or restarting. The supervisor
    /// writes, callers read.
    workers: RwLock<Vec<Option<Arc<WorkerLink>>>>,
    /// Bounds requests in flight across the pool (queued + running): backpressure to callers.
    permits: Arc<Semaphore>,
    capacity: usize,
    max_retries: usize,
    retry_backoff: Duration,
}

impl Router {
    pub(crate) fn new(
        specs: Arc<[ModelSpec]>,
        workers: usize,
        capacity: usize,
        max_retries: usize,
        retry_backoff: Duration,
    ) -> Self {
        let by_name = specs.iter().enumerate().map(|(i, s)| (s.name.clone(), i)).collect();
        Self {
            inner: Arc::new(RouterInner {
                specs,
                by_name,
                workers: RwLock::new(vec![None; workers]),
                permits: Arc::new(Semaphore::new(capacity)),
                capacity,
                max_retries,
                retry_backoff,
            }),
        }
    }

    pub fn models(&self) -> &[ModelSpec] {
        &self.inner.specs
    }

    pub fn model(&self, name: &str) -> Option<&ModelSpec> {
        self.inner.by_name.get(name).map(|&i| &self.inner.specs[i])
    }

    /// Requests in flight across the pool, and the limit.
    pub fn load(&self) -> (usize, usize) {
        (self.inner.capacity - self.inner.permits.available_permits(), self.inner.capacity)
    }

    /// Run one request, waiting for room in the pool if it is full.
    pub async fn infer(&self, req: InferRequest) -> Result<InferOutput, InferError> {
        let model = self.check(&req)?;
        let permit =
            self.inner.permits.clone().acquire_owned().await.map_err(|_| InferError::ShuttingDown)?;
        self.dispatch(model, Arc::new(req), permit, None)
            .await
            .expect("without a deadline there is an answer")
    }

    /// Run one request with a deadline on the work, not on the waiting: admission to a full pool
    /// and a worker's queue are backpressure (the caller waits, however long), and `deadline`
    /// starts when the request's batch starts on a worker. `None` when the deadline passed.
    pub async fn infer_within(
        &self,
        req: InferRequest,
        deadline: Duration,
    ) -> Option<Result<InferOutput, InferError>> {
        let model = match self.check(&req) {
            Ok(m) => m,
            Err(e) => return Some(Err(e)),
        };
        let permit = match self.inner.permits.clone().acquire_owned().await {
            Ok(p) => p,
            Err(_) => return Some(Err(InferError::ShuttingDown)),
        };
        self.dispatch(model, Arc::new(req), permit, Some(deadline)).await
    }

    /// Run one request, or fail at once with [`InferError::Overloaded`] if the pool is full.
    pub async fn try_infer(&self, req: InferRequest) -> Result<InferOutput, InferError> {
        let model = self.check(&req)?;
        let permit = self.inner.permits.clone().try_acquire_owned().map_err(|e| match e {
            tokio::sync::TryAcquireError::Closed => InferError::ShuttingDown,
            tokio::sync::TryAcquireError::NoPermits => {
                InferError::Overloaded { capacity: self.inner.capacity }
            }
        })?;
        self.dispatch(model, Arc::new(req), permit, None)
            .await
            .expect("without a deadline there is an answer")
    }

    fn check(&self, req: &InferRequest) -> Result<usize, InferError> {
        let &model = self
            .inner
            .by_name
            .get(&*req.model)
            .ok_or_else(|| InferError::UnknownModel { model: req.model.to_string() })?;
        validate(&self.inner.specs[model], req)?;
        Ok(model)
    }

    /// Send to workers until one answers (retrying lost requests). With a `deadline`, an attempt
    /// that runs longer than it (from the moment its batch starts) ends the request: `None`.
    async fn dispatch(
        &self,
        model: usize,
        request: Arc<InferRequest>,
        _permit: OwnedSemaphorePermit,
        deadline: Option<Duration>,
    ) -> Option<Result<InferOutput, InferError>> {
        let attempts = 1 + self.inner.max_retries;
        // Jobs handed back unrun are bounded by the deaths of the workers holding them, which the
        // restart budget bounds; this cap is a second fence. Each wait for a healthy worker (all
        // restarting) is bounded too.
        let (max_handbacks, max_waits) = (8 * attempts, 4 * attempts);
        let (mut attempt, mut handbacks, mut waits) = (1, 0, 0);
        loop {
            let Some(link) = self.pick() else {
                if waits == max_waits {
                    return Some(Err(InferError::WorkerLost { attempts: attempt }));
                }
                waits += 1;
                tokio::time::sleep(self.inner.retry_backoff).await;
                continue;
            };
            let (reply, answer) = oneshot::channel();
            let isolate = attempt > 1 || handbacks > 0;
            let (started_tx, started) = oneshot::channel();
            let job = Job {
                model,
                request: request.clone(),
                enqueued_at: Instant::now(),
                isolate,
                reply,
                started: Some(started_tx),
            };
            if link.try_send(job).is_err() {
                // Its thread is gone: wait for the supervisor like when no worker is healthy.
                waits += 1;
                if waits > max_waits {
                    return Some(Err(InferError::WorkerLost { attempts: attempt }));
                }
                tokio::time::sleep(self.inner.retry_backoff).await;
                continue;
            }
            waits = 0;
            let answer = wait_for_answer(answer, started, &link, deadline).await?;
            match answer {
                Ok(Ok(output)) => return Some(Ok(output)),
                Ok(Err(JobFailure::Error(e))) => return Some(Err(e)),
                Ok(Err(JobFailure::Lost { ran: false })) if handbacks < max_handbacks => {
                    handbacks += 1;
                    tracing::debug!(worker = link.index, "worker handed back a request unrun; retrying");
                }
                // Ran in the batch that killed the worker, or its queue vanished with it.
                _ => {
                    if attempt == attempts {
                        return Some(Err(InferError::WorkerLost { attempts }));
                    }
                    tracing::debug!(worker = link.index, attempt, "worker lost a request; retrying");
                    attempt += 1;
                    tokio::time::sleep(self.inner.retry_backoff).await;
                }
            }
        }
    }

    /// The healthy worker with the fewest requests in flight.
    fn pick(&self) -> Option<Arc<WorkerLink>> {
        let workers = self.inner.workers.read().unwrap_or_else(|e| e.into_inner());
        workers.iter().flatten().filter(|w| w.is_healthy()).min_by_key(|w| w.inflight()).cloned()
    }

    pub(crate) fn set_worker(&self, index: usize, link: Option<Arc<WorkerLink>>) {
        let mut workers = self.inner.workers.write().unwrap_or_else(|e| e.into_inner());
        workers[index] = link;
    }

    pub(crate) fn worker(&self, index: usize) -> Option<Arc<WorkerLink>> {
        self.inner.workers.read().unwrap_or_else(|e| e.into_inner())[index].clone()
    }

    /// Refuse new requests; those already admitted finish.
    pub(crate) fn close(&self) {
        self.inner.permits.close();
    }
}

/// One attempt's answer. A hung worker never answers: its supervisor abandons it, and the request
/// goes on as if the worker had died with it (`ran` when its batch had started). With a
/// `deadline`, the clock starts when the job's batch starts (queueing is not timed); `None` once
/// it has passed.
async fn wait_for_answer(
    mut answer: oneshot::Receiver<JobReply>,
    mut started: oneshot::Receiver<()>,
    link: &WorkerLink,
    deadline: Option<Duration>,
) -> Option<Result<JobReply, oneshot::error::RecvError>> {
    let abandoned = link.shared.abandoned();
    tokio::pin!(abandoned);
    let mut ran = false;
    let mut timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    loop {
        tokio::select! {
            a = &mut answer => return Some(a),
            () = &mut abandoned => return Some(Ok(Err(JobFailure::Lost { ran }))),
            s = &mut started, if !ran => {
                // Err: the job was dropped unrun (its worker went away); the answer says so.
                ran = s.is_ok();
                if ran && let Some(d) = deadline {
                    timer = Some(Box::pin(tokio::time::sleep(d)));
                }
                if !ran {
                    return Some(answer.await);
                }
            }
            () = async { timer.as_mut().expect("guarded").await }, if timer.is_some() => return None,
        }
    }
}
