//! The router: the one handle callers use to run inference on the pool.
//!
//! It validates a request against its model before anything is queued, bounds the pool's total
//! in-flight rows with a semaphore (callers wait, or get [`InferError::Overloaded`] from
//! [`Router::try_infer`]), sends to the least-loaded healthy worker, and retries on another worker
//! when the one holding the request died. Every request ends in exactly one `Ok` or `Err`.
//!
//! [`Router::infer_many_within`] sends many rows (a partition's wave) as few jobs: one per model
//! and up to `max_batch_size` rows, each with one permit count per row, one queue hop and one
//! answer, instead of one of each per row.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, oneshot};

use crate::gpu_worker::{Job, JobFailure, JobOutput, JobReply, JobRows, WorkerLink};
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
    /// Bounds rows in flight across the pool (queued + running): backpressure to callers.
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

    /// Rows in flight across the pool, and the limit.
    pub fn load(&self) -> (usize, usize) {
        (self.inner.capacity - self.inner.permits.available_permits(), self.inner.capacity)
    }

    /// Run one request, waiting for room in the pool if it is full.
    pub async fn infer(&self, req: InferRequest) -> Result<InferOutput, InferError> {
        let model = self.check(&req)?;
        let _permit =
            self.inner.permits.clone().acquire_owned().await.map_err(|_| InferError::ShuttingDown)?;
        self.one_row(model, &req, None, 1).await.expect("without a deadline there is an answer")
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
        let Ok(_permit) = self.inner.permits.clone().acquire_owned().await else {
            return Some(Err(InferError::ShuttingDown));
        };
        self.one_row(model, &req, Some(deadline), 1).await
    }

    /// [`Router::infer_within`] for many requests at once (a partition's wave), answered in
    /// their order: the valid ones go as one job per model and up to `max_batch_size` rows (and
    /// the pool's capacity), all in flight together; a request that is invalid, or whose row
    /// failed when run alone, gets its own error; `None` for the rows of a job whose deadline
    /// passed.
    pub async fn infer_many_within(
        &self,
        reqs: &[InferRequest],
        deadline: Duration,
    ) -> Vec<Option<Result<InferOutput, InferError>>> {
        let n = reqs.len();
        let mut answers: Vec<Option<Option<Result<InferOutput, InferError>>>> =
            (0..n).map(|_| None).collect();
        // Valid requests by model, in order.
        let mut by_model: Vec<(usize, Vec<(usize, &InferRequest)>)> = Vec::new();
        for (i, req) in reqs.iter().enumerate() {
            match self.check(req) {
                Err(e) => answers[i] = Some(Some(Err(e))),
                Ok(m) => match by_model.iter_mut().find(|(model, _)| *model == m) {
                    Some((_, rows)) => rows.push((i, req)),
                    None => by_model.push((m, vec![(i, req)])),
                },
            }
        }
        let mut jobs = Vec::new();
        for (model, rows) in by_model {
            let size = self.inner.specs[model].batch.max_batch_size.min(self.inner.capacity).max(1);
            let mut rows = rows.into_iter().peekable();
            while rows.peek().is_some() {
                let (index, chunk): (Vec<usize>, Vec<&InferRequest>) = rows.by_ref().take(size).unzip();
                jobs.push(self.many_rows(model, index, chunk, deadline));
            }
        }
        for (i, answer) in futures::future::join_all(jobs).await.into_iter().flatten() {
            answers[i] = Some(answer);
        }
        answers.into_iter().map(|a| a.expect("every request is answered")).collect()
    }

    /// One job of `reqs` (validated, of `model`), answered per request index. A job that was
    /// running when its worker died goes on as one job per row, each isolated: one of its rows
    /// may have killed the worker, and the others must not share its fate again.
    async fn many_rows(
        &self,
        model: usize,
        index: Vec<usize>,
        reqs: Vec<&InferRequest>,
        deadline: Duration,
    ) -> Vec<(usize, Option<Result<InferOutput, InferError>>)> {
        let count = u32::try_from(reqs.len()).unwrap_or(u32::MAX);
        let Ok(_permit) = self.inner.permits.clone().acquire_many_owned(count).await else {
            return index.into_iter().map(|i| (i, Some(Err(InferError::ShuttingDown)))).collect();
        };
        let packed = self.pack(model, reqs.iter().copied());
        let answers: Vec<Option<Result<InferOutput, InferError>>> =
            match self.dispatch(model, packed, Some(deadline), 1, reqs.len() > 1).await {
                Dispatched::Answered(Ok(out)) => {
                    (0..reqs.len()).map(|k| Some(self.row(model, &out, k))).collect()
                }
                Dispatched::Answered(Err(e)) => reqs.iter().map(|_| Some(Err(e.clone()))).collect(),
                Dispatched::TimedOut => reqs.iter().map(|_| None).collect(),
                Dispatched::LostRunning { attempt } => {
                    // Each row's retries go on from the attempt the wave used up.
                    let alone = reqs.iter().map(|req| self.one_row(model, req, Some(deadline), attempt + 1));
                    futures::future::join_all(alone).await
                }
            };
        index.into_iter().zip(answers).collect()
    }

    /// Run one request, or fail at once with [`InferError::Overloaded`] if the pool is full.
    pub async fn try_infer(&self, req: InferRequest) -> Result<InferOutput, InferError> {
        let model = self.check(&req)?;
        let _permit = self.inner.permits.clone().try_acquire_owned().map_err(|e| match e {
            tokio::sync::TryAcquireError::Closed => InferError::ShuttingDown,
            tokio::sync::TryAcquireError::NoPermits => {
                InferError::Overloaded { capacity: self.inner.capacity }
            }
        })?;
        self.one_row(model, &req, None, 1).await.expect("without a deadline there is an answer")
    }

    /// One validated request as a job of one row, from attempt `attempt` (the caller holds its
    /// permit).
    async fn one_row(
        &self,
        model: usize,
        req: &InferRequest,
        deadline: Option<Duration>,
        attempt: usize,
    ) -> Option<Result<InferOutput, InferError>> {
        match self.dispatch(model, self.pack(model, [req]), deadline, attempt, false).await {
            Dispatched::Answered(out) => Some(out.and_then(|out| self.row(model, &out, 0))),
            Dispatched::TimedOut => None,
            Dispatched::LostRunning { .. } => unreachable!("a job of one row is retried whole"),
        }
    }

    /// Validated requests of `model` as one job's rows (a key without state gets zeros).
    fn pack<'a>(&self, model: usize, reqs: impl IntoIterator<Item = &'a InferRequest>) -> Arc<JobRows> {
        let spec = &self.inner.specs[model];
        let (f, h) = (spec.feature_count, spec.state_size);
        let reqs = reqs.into_iter();
        let hint = reqs.size_hint().0;
        let mut rows =
            JobRows { rows: 0, features: Vec::with_capacity(hint * f), state: Vec::with_capacity(hint * h) };
        for req in reqs {
            rows.rows += 1;
            rows.features.extend_from_slice(&req.features);
            if h > 0 {
                match &req.state {
                    Some(s) => rows.state.extend_from_slice(s),
                    None => rows.state.resize(rows.state.len() + h, 0.0),
                }
            }
        }
        Arc::new(rows)
    }

    /// Row `k` of a job's answer.
    fn row(&self, model: usize, out: &JobOutput, k: usize) -> Result<InferOutput, InferError> {
        // `failed` is sorted by row.
        if let Ok(i) = out.failed.binary_search_by_key(&k, |(row, _)| *row) {
            return Err(out.failed[i].1.clone());
        }
        let h = self.inner.specs[model].state_size;
        Ok(InferOutput {
            score: out.scores[k],
            new_state: out.new_state[k * h..(k + 1) * h].to_vec(),
            model_version: out.model_version,
            batch_size: out.batch_size,
            device: out.device,
            queue_time: out.queue_time,
            compute_time: out.compute_time,
        })
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

    /// Send to workers until one answers (retrying lost jobs), counting attempts from `first`
    /// (above 1: a retry, run alone). With a `deadline`, an attempt that runs longer than it
    /// (from the moment its batch starts) ends the job: `TimedOut`. With `split`, a job that was
    /// running when its worker died is not retried whole: `LostRunning`. The caller holds the
    /// job's permits.
    async fn dispatch(
        &self,
        model: usize,
        rows: Arc<JobRows>,
        deadline: Option<Duration>,
        first: usize,
        split: bool,
    ) -> Dispatched {
        let attempts = 1 + self.inner.max_retries;
        // Jobs handed back unrun are bounded by the deaths of the workers holding them, which the
        // restart budget bounds; this cap is a second fence. Each wait for a healthy worker (all
        // restarting) is bounded too.
        let (max_handbacks, max_waits) = (8 * attempts, 4 * attempts);
        let (mut attempt, mut handbacks, mut waits) = (first.min(attempts), 0, 0);
        loop {
            let Some(link) = self.pick() else {
                if waits == max_waits {
                    return Dispatched::Answered(Err(InferError::WorkerLost { attempts: attempt }));
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
                rows: rows.clone(),
                enqueued_at: Instant::now(),
                isolate,
                reply,
                started: Some(started_tx),
            };
            if link.try_send(job).is_err() {
                // Its thread is gone: wait for the supervisor like when no worker is healthy.
                waits += 1;
                if waits > max_waits {
                    return Dispatched::Answered(Err(InferError::WorkerLost { attempts: attempt }));
                }
                tokio::time::sleep(self.inner.retry_backoff).await;
                continue;
            }
            waits = 0;
            let Some(answer) = wait_for_answer(answer, started, &link, deadline).await else {
                return Dispatched::TimedOut;
            };
            match answer {
                Ok(Ok(output)) => return Dispatched::Answered(Ok(output)),
                Ok(Err(JobFailure::Error(e))) => return Dispatched::Answered(Err(e)),
                Ok(Err(JobFailure::Lost { ran: false })) if handbacks < max_handbacks => {
                    handbacks += 1;
                    tracing::debug!(worker = link.index, "worker handed back a request unrun; retrying");
                }
                Ok(Err(JobFailure::Lost { ran: true })) if split => {
                    return Dispatched::LostRunning { attempt };
                }
                // Ran in the batch that killed the worker, or its queue vanished with it.
                _ => {
                    if attempt == attempts {
                        return Dispatched::Answered(Err(InferError::WorkerLost { attempts }));
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

/// How a job's dispatch ended.
enum Dispatched {
    Answered(Result<JobOutput, InferError>),
    /// Its deadline passed after its batch started.
    TimedOut,
    /// It was running when its worker died, at this attempt (only with `split`).
    LostRunning {
        attempt: usize,
    },
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
            // A reply channel dropped after the job started counts as lost while running.
            a = &mut answer => return Some(Ok(a.unwrap_or(Err(JobFailure::Lost { ran })))),
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
