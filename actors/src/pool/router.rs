//! The router: the one handle callers use to run inference on the pool.
//!
//! It validates a request against its model before anything is queued, bounds the pool's total
//! in-flight rows with a semaphore (callers wait, or get [`InferError::Overloaded`] from
//! [`Router::try_infer`]), sends to the least-loaded healthy worker, and retries on another worker
//! when the one holding the request died. Every request ends in exactly one `Ok` or `Err`.
//!
//! [`Router::infer_rows_within`] sends many rows of one model (a partition's wave) as few jobs:
//! one per `max_batch_size` rows, each with one permit count per row, one queue hop and one
//! answer, instead of one of each per row.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, oneshot};

use crate::gpu_worker::{Job, JobFailure, JobOutput, JobReply, JobStart, JobValues, WorkerLink};
use crate::inference::{
    InferError, InferOutput, InferRequest, InferRows, RowAnswer, RowsOutput, check_finite, validate,
};
use crate::model::ModelSpec;
use crate::pool::remote::{RemoteAnswer, RemoteWorkers};

#[derive(Clone, Debug)]
pub struct Router {
    inner: Arc<RouterInner>,
    /// Workers in other processes, used while none of this pool's is healthy.
    remote: Option<Arc<dyn RemoteWorkers>>,
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
        remote: Option<Arc<dyn RemoteWorkers>>,
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
            remote,
        }
    }

    /// This router without the remote workers: what a node serves to others (a call from
    /// another node is never passed on to a third).
    pub fn local_only(&self) -> Self {
        Self { inner: self.inner.clone(), remote: None }
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
        self.one_row(model, self.one(model, &req), None, 1)
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
        let Ok(_permit) = self.inner.permits.clone().acquire_owned().await else {
            return Some(Err(InferError::ShuttingDown));
        };
        self.one_row(model, self.one(model, &req), Some(deadline), 1).await
    }

    /// [`Router::infer_within`] for many rows of one model at once (a partition's wave), answered
    /// row by row: the valid rows go as one job per `max_batch_size` rows (and the pool's
    /// capacity), all in flight together, each with one permit per row, one queue hop and one
    /// answer; a row with a value that is not finite, or that failed when run alone, gets its own
    /// error; [`RowAnswer::TimedOut`] for the rows of a job whose deadline passed. A wave that fits
    /// one job and is all valid is sent without a copy (the caller keeps its handle, to run a row
    /// again). Rows of several events (`rows.steps > 1`) run the model's sequence form; a model
    /// without one, or with fewer `max_steps`, refuses them ([`InferError::Steps`]).
    pub async fn infer_rows_within(
        &self,
        model: &str,
        rows: Arc<InferRows>,
        deadline: Duration,
    ) -> RowsOutput {
        let (n, steps) = (rows.rows, rows.steps);
        let Some(&m) = self.inner.by_name.get(model) else {
            return RowsOutput::all(
                n,
                steps,
                0,
                RowAnswer::Failed(InferError::UnknownModel { model: model.into() }),
            );
        };
        let spec = &self.inner.specs[m];
        let (f, h) = (steps * spec.feature_count, spec.state_size);
        let mut out = RowsOutput::all(n, steps, h, RowAnswer::TimedOut);
        if !spec.takes_steps(steps) {
            let e = InferError::Steps { model: spec.name.clone(), steps, max_steps: spec.max_steps };
            out.answers.fill(RowAnswer::Failed(e));
            return out;
        }
        for (input, per_row, got) in [("features", f, rows.features.len()), ("state", h, rows.state.len())] {
            if got != n * per_row {
                let e = InferError::Shape { model: spec.name.clone(), input, expected: n * per_row, got };
                out.answers.fill(RowAnswer::Failed(e));
                return out;
            }
        }
        // Rows by job, as indices into `rows`; a copy only when a row is refused or the wave
        // is larger than a job.
        let mut valid = Vec::with_capacity(n);
        for k in 0..n {
            let (features, state) = rows.row(spec, k);
            match check_finite("features", features).and_then(|()| check_finite("state", state)) {
                Ok(()) => valid.push(k),
                Err(e) => out.answers[k] = RowAnswer::Failed(e),
            }
        }
        let size = spec.batch.max_batch_size.min(self.inner.capacity).max(1);
        let jobs: Vec<(Vec<usize>, Arc<InferRows>)> = if valid.len() == n && n <= size {
            vec![(valid, rows)]
        } else {
            valid.chunks(size).map(|index| (index.to_vec(), Arc::new(rows.select(spec, index)))).collect()
        };
        let sent = jobs
            .into_iter()
            .map(|(index, job)| async move { (index, self.rows_job(m, job, deadline).await) });
        for (index, answer) in futures::future::join_all(sent).await {
            out.fill(&index, answer);
        }
        out
    }

    /// One job of validated rows of `model`. A job that was running when its worker died goes
    /// on as one job per row, each isolated: one of its rows may have killed the worker, and the
    /// others must not share its fate again.
    async fn rows_job(&self, model: usize, rows: Arc<InferRows>, deadline: Duration) -> JobAnswer {
        let count = u32::try_from(rows.rows).unwrap_or(u32::MAX);
        let Ok(_permit) = self.inner.permits.clone().acquire_many_owned(count).await else {
            return JobAnswer::Whole(Some(Err(InferError::ShuttingDown)));
        };
        // A job of sequence rows is retried whole (isolated); when that fails too (its worker lost
        // again), the partition actor goes on with its rows' events one by one, where a row that
        // kills a worker is isolated as above.
        let split = rows.rows > 1 && rows.steps == 1;
        match self.dispatch(model, rows.clone(), Some(deadline), 1, split).await {
            Dispatched::Answered(out) => JobAnswer::Whole(Some(out)),
            Dispatched::TimedOut => JobAnswer::Whole(None),
            Dispatched::LostRunning { attempt } => {
                // Each row's retries go on from the attempt the job used up.
                let spec = &self.inner.specs[model];
                let alone = (0..rows.rows).map(|k| {
                    self.one_row(model, Arc::new(rows.select(spec, &[k])), Some(deadline), attempt + 1)
                });
                JobAnswer::ByRow(futures::future::join_all(alone).await)
            }
        }
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
        self.one_row(model, self.one(model, &req), None, 1)
            .await
            .expect("without a deadline there is an answer")
    }

    /// One validated row as a job of its own, from attempt `attempt` (the caller holds its
    /// permit).
    async fn one_row(
        &self,
        model: usize,
        row: Arc<InferRows>,
        deadline: Option<Duration>,
        attempt: usize,
    ) -> Option<Result<InferOutput, InferError>> {
        match self.dispatch(model, row, deadline, attempt, false).await {
            Dispatched::Answered(Ok(out)) => Some(match out.failed.into_iter().next() {
                Some((_, e)) => Err(e),
                None => {
                    Ok(InferOutput::new(out.values.scores()[0], out.values.new_state().to_vec(), out.served))
                }
            }),
            Dispatched::Answered(Err(e)) => Some(Err(e)),
            Dispatched::TimedOut => None,
            Dispatched::LostRunning { .. } => unreachable!("a job of one row is retried whole"),
        }
    }

    /// A request as a job's row (checked first).
    fn one(&self, model: usize, req: &InferRequest) -> Arc<InferRows> {
        let spec = &self.inner.specs[model];
        let mut row = InferRows::with_capacity(spec, 1);
        row.push(spec, &req.features, req.state.as_deref()).expect("checked before");
        Arc::new(row)
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
        rows: Arc<InferRows>,
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
                match self.remote(model, &rows, deadline, split.then_some(attempt)).await {
                    Some(Remote::Done(answer)) => return answer,
                    Some(Remote::Lost) if attempt < attempts => {
                        tracing::debug!(attempt, "a remote worker lost a request; retrying");
                        attempt += 1;
                        tokio::time::sleep(self.inner.retry_backoff).await;
                        continue;
                    }
                    Some(Remote::Lost) => {
                        return Dispatched::Answered(Err(InferError::WorkerLost { attempts }));
                    }
                    None => {}
                }
                if waits == max_waits {
                    return Dispatched::Answered(Err(InferError::WorkerLost { attempts: attempt }));
                }
                waits += 1;
                tokio::time::sleep(self.inner.retry_backoff).await;
                continue;
            };
            let (reply, answer) = oneshot::channel();
            let isolate = attempt > 1 || handbacks > 0;
            let started = Arc::new(JobStart::default());
            let job = Job {
                model,
                rows: rows.clone(),
                enqueued_at: Instant::now(),
                isolate,
                reply,
                started: started.clone(),
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
            let Some(answer) = wait_for_answer(answer, &started, &link, deadline).await else {
                return Dispatched::TimedOut;
            };
            match answer {
                Ok(output) => return Dispatched::Answered(Ok(output)),
                Err(JobFailure::Error(e)) => return Dispatched::Answered(Err(e)),
                Err(JobFailure::Lost { ran: false }) if handbacks < max_handbacks => {
                    handbacks += 1;
                    tracing::debug!(worker = link.index, "worker handed back a request unrun; retrying");
                }
                Err(JobFailure::Lost { ran: true }) if split => {
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

    /// One try on the remote workers, when there are some and one may take a call: `None` when
    /// none can (wait as for a local worker). `split`: the attempt, when a job of several rows
    /// that broke goes on row by row (as when a local worker dies running it).
    async fn remote(
        &self,
        model: usize,
        rows: &Arc<InferRows>,
        deadline: Option<Duration>,
        split: Option<usize>,
    ) -> Option<Remote> {
        let remote = self.remote.as_ref().filter(|r| r.available())?;
        let spec = &self.inner.specs[model];
        Some(match remote.infer(spec, rows.clone(), deadline).await {
            RemoteAnswer::Scored { scores, new_state, served } => {
                Remote::Done(Dispatched::Answered(Ok(JobOutput {
                    values: JobValues::Owned { scores, new_state },
                    failed: Vec::new(),
                    served,
                })))
            }
            RemoteAnswer::Failed(e) => Remote::Done(Dispatched::Answered(Err(e))),
            RemoteAnswer::TimedOut => Remote::Done(Dispatched::TimedOut),
            RemoteAnswer::RowFailed | RemoteAnswer::Lost if split.is_some() => {
                Remote::Done(Dispatched::LostRunning { attempt: split.unwrap_or(1) })
            }
            RemoteAnswer::RowFailed => Remote::Done(Dispatched::Answered(Err(InferError::Backend(
                "a remote worker failed on the row".into(),
            )))),
            RemoteAnswer::Lost => Remote::Lost,
            RemoteAnswer::Unavailable => return None,
        })
    }

    /// Whether a call can be served now: a healthy worker here, or a remote one available.
    pub fn can_serve(&self) -> bool {
        self.pick().is_some() || self.remote.as_ref().is_some_and(|r| r.available())
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

/// How one job of [`Router::infer_rows_within`] ended: for all its rows (`None`: the deadline
/// passed), or row by row after its worker died running it.
enum JobAnswer {
    Whole(Option<Result<JobOutput, InferError>>),
    ByRow(Vec<Option<Result<InferOutput, InferError>>>),
}

impl RowsOutput {
    /// Write the answer of the job made of rows `index`.
    fn fill(&mut self, index: &[usize], answer: JobAnswer) {
        let (h, t) = (self.state_size, self.steps);
        match answer {
            JobAnswer::Whole(Some(Ok(job))) => {
                match job.values {
                    // The whole wave in one job, assembled for it: its buffers are the answer's.
                    JobValues::Owned { scores, new_state } if index.len() == self.len() => {
                        self.scores = scores;
                        self.new_state = new_state;
                    }
                    // The whole wave in one job: rows in the same order.
                    values if index.len() == self.len() => {
                        self.scores.copy_from_slice(values.scores());
                        self.new_state.copy_from_slice(values.new_state());
                    }
                    values => {
                        let (scores, new_state) = (values.scores(), values.new_state());
                        for (j, &k) in index.iter().enumerate() {
                            self.scores[k * t..(k + 1) * t].copy_from_slice(&scores[j * t..(j + 1) * t]);
                            self.new_state[k * h..(k + 1) * h]
                                .copy_from_slice(&new_state[j * h..(j + 1) * h]);
                        }
                    }
                }
                for &k in index {
                    self.answers[k] = RowAnswer::Scored(job.served);
                }
                // `failed` is by row of the job.
                for (j, e) in job.failed {
                    self.answers[index[j]] = RowAnswer::Failed(e);
                }
            }
            JobAnswer::Whole(Some(Err(e))) => {
                for &k in index {
                    self.answers[k] = RowAnswer::Failed(e.clone());
                }
            }
            JobAnswer::Whole(None) => {
                for &k in index {
                    self.answers[k] = RowAnswer::TimedOut;
                }
            }
            JobAnswer::ByRow(rows) => {
                for (&k, row) in index.iter().zip(rows) {
                    self.answers[k] = match row {
                        // Rows of one event only: a sequence row goes whole (see `rows_job`).
                        Some(Ok(o)) => {
                            self.scores[k] = o.score;
                            self.new_state[k * h..(k + 1) * h].copy_from_slice(&o.new_state);
                            RowAnswer::Scored(o.served())
                        }
                        Some(Err(e)) => RowAnswer::Failed(e),
                        None => RowAnswer::TimedOut,
                    };
                }
            }
        }
    }
}

/// A remote try: ended the dispatch, or lost the call (retry).
enum Remote {
    Done(Dispatched),
    Lost,
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

/// One attempt's answer. A hung worker never answers: its supervisor abandons it, and the job
/// goes on as if the worker had died with it; so does a job whose reply was dropped (its worker
/// went away). Either way it `ran` if its batch had started. With a `deadline`, the clock starts
/// when the job's batch starts (queueing is not timed); `None` once it has passed. The start is
/// read from `started` when a timer fires, armed for the earliest moment the deadline can pass
/// (`deadline` after the start, or after now while the job is queued), so the worker wakes this
/// task only to answer it. (`started` is wall-clock `Instant`s: under tokio's paused test clock a
/// started job's timer would fire again at once until real time catches up.)
async fn wait_for_answer(
    mut answer: oneshot::Receiver<JobReply>,
    started: &JobStart,
    link: &WorkerLink,
    deadline: Option<Duration>,
) -> Option<JobReply> {
    let abandoned = link.shared.abandoned();
    tokio::pin!(abandoned);
    let lost = || JobFailure::Lost { ran: started.at().is_some() };
    // The earliest the deadline can pass: `d` after the start; while the job is queued, `d` after
    // now (at least a timer tick, so a zero deadline does not spin).
    let due = |d: Duration| match started.at() {
        Some(start) => start.checked_add(d),
        None => Instant::now().checked_add(d.max(Duration::from_millis(1))),
    };
    let mut armed = deadline.and_then(due);
    let timer = tokio::time::sleep_until(armed.unwrap_or_else(Instant::now).into());
    tokio::pin!(timer);
    loop {
        tokio::select! {
            a = &mut answer => return Some(a.unwrap_or_else(|_| Err(lost()))),
            () = &mut abandoned => return Some(Err(lost())),
            () = &mut timer, if armed.is_some() => {
                armed = deadline.and_then(due);
                match armed {
                    Some(at) if started.at().is_some() && at <= Instant::now() => return None,
                    Some(at) => timer.as_mut().reset(at.into()),
                    None => {}
                }
            }
        }
    }
}
