//! The worker's OS thread: batches queued jobs per model and runs the backend.
//!
//! Never runs on the async runtime. A job carries one row or many (a partition's wave) and gets
//! one answer. A backend error or panic fails only the row that fails when run alone (a failed
//! batch is split in halves by rows, across job boundaries, until the culprit is found); a
//! [`BackendError::Fatal`] ends the thread, and every job still queued is answered "worker lost"
//! so the router retries it elsewhere.

use std::any::Any;
use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{Receiver, RecvTimeoutError};

use super::link::{Job, JobFailure, JobOutput, JobValues, WorkerShared};
use crate::batcher::{Batcher, Pending};
use crate::inference::{
    BackendError, BatchInput, BatchOutput, Device, InferError, InferRows, InferenceBackend, Served,
};
use crate::model::ModelSpec;

/// Why the thread stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ThreadExit {
    /// Every sender is gone (the worker is stopping); queued work was finished first.
    Drained,
    /// The backend reported the device gone; queued work was handed back for retry.
    Fatal(String),
}

pub(crate) struct WorkerThread {
    backend: Box<dyn InferenceBackend>,
    specs: Arc<[ModelSpec]>,
    batchers: Vec<Batcher<Job>>,
    shared: Arc<WorkerShared>,
    device: Device,
    /// Reused across batches so a steady load allocates nothing per batch for inputs.
    features: Vec<f32>,
    state: Vec<f32>,
    cancelled: Vec<Job>,
    /// Retried requests, each run in a batch of its own before anything else.
    isolated: Vec<Job>,
}

impl WorkerThread {
    pub(crate) fn new(
        backend: Box<dyn InferenceBackend>,
        specs: Arc<[ModelSpec]>,
        shared: Arc<WorkerShared>,
        device: Device,
    ) -> Self {
        let batchers = specs.iter().map(|s| Batcher::new(s.batch.clone())).collect();
        Self {
            backend,
            specs,
            batchers,
            shared,
            device,
            features: Vec::new(),
            state: Vec::new(),
            cancelled: Vec::new(),
            isolated: Vec::new(),
        }
    }

    pub(crate) fn run(mut self, rx: Receiver<Job>) -> ThreadExit {
        loop {
            let deadline = self.batchers.iter().filter_map(Batcher::deadline).min();
            let received = match deadline {
                Some(d) => rx.recv_deadline(d),
                None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            match received {
                Ok(job) => {
                    self.enqueue(job);
                    // Take what else is already queued, so the batcher sees the real queue length.
                    for job in rx.try_iter() {
                        self.enqueue(job);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    self.finish_all();
                    return ThreadExit::Drained;
                }
            }
            if let Err(reason) = self.run_ready() {
                self.shared.set_healthy(false);
                self.hand_back(rx);
                return ThreadExit::Fatal(reason);
            }
        }
    }

    fn enqueue(&mut self, job: Job) {
        if job.isolate {
            self.isolated.push(job);
        } else {
            self.batchers[job.model].push(job);
        }
    }

    /// Run every batch the batchers say is due.
    fn run_ready(&mut self) -> Result<(), String> {
        let mut isolated = std::mem::take(&mut self.isolated).into_iter();
        while let Some(job) = isolated.next() {
            if job.is_cancelled() {
                self.shared.finished(job.rows.rows);
            } else if let Err(fatal) = self.execute(job.model, vec![job]) {
                self.isolated.extend(isolated);
                return Err(fatal);
            }
        }
        for m in 0..self.batchers.len() {
            while let Some(batch) = self.batchers[m].pop_ready(Instant::now(), &mut self.cancelled) {
                self.drop_cancelled();
                self.execute(m, batch)?;
            }
            self.drop_cancelled();
        }
        Ok(())
    }

    /// Run everything queued regardless of delays (shutdown: finish in-flight work).
    fn finish_all(&mut self) {
        let lost = JobFailure::Lost { ran: false };
        let mut dead = self.run_ready().is_err();
        let isolated = std::mem::take(&mut self.isolated);
        self.fail(isolated, &lost);
        for m in 0..self.batchers.len() {
            let queued: Vec<Job> = self.batchers[m].drain_all().collect();
            for chunk in chunks(queued, self.specs[m].batch.max_batch_size) {
                if dead {
                    // The device died while draining: fail the rest explicitly.
                    self.fail(chunk, &lost);
                } else {
                    dead = self.execute(m, chunk).is_err();
                }
            }
        }
    }

    /// The device is gone: answer every queued job "worker lost" so the router retries elsewhere.
    fn hand_back(&mut self, rx: Receiver<Job>) {
        let lost = JobFailure::Lost { ran: false };
        let isolated = std::mem::take(&mut self.isolated);
        self.fail(isolated, &lost);
        for m in 0..self.batchers.len() {
            let queued: Vec<Job> = self.batchers[m].drain_all().collect();
            self.fail(queued, &lost);
        }
        let rest: Vec<Job> = rx.try_iter().collect();
        self.fail(rest, &lost);
    }

    fn drop_cancelled(&mut self) {
        if !self.cancelled.is_empty() {
            self.shared.finished(self.cancelled.iter().map(|j| j.rows.rows).sum());
            self.cancelled.clear();
        }
    }

    fn fail(&self, jobs: Vec<Job>, err: &JobFailure) {
        self.shared.finished(jobs.iter().map(|j| j.rows.rows).sum());
        for job in jobs {
            let _ = job.reply.send(Err(err.clone()));
        }
    }

    /// Run one batch of jobs and answer each job once. `Err` only when the device is gone.
    ///
    /// A batch that fails (error or panic) is run again as two halves by rows, down to single
    /// rows: one poison row costs about 2·log2(rows) extra calls, and only a row that fails
    /// **alone** is answered with the error; every other row of its job and batch gets its score.
    fn execute(&mut self, m: usize, batch: Vec<Job>) -> Result<(), String> {
        let started = Instant::now();
        let (mut rows, mut answers) = (Vec::with_capacity(batch.len()), Vec::with_capacity(batch.len()));
        for job in batch {
            job.started.mark(started);
            let n = job.rows.rows;
            answers.push(Answer {
                values: None,
                failed: Vec::new(),
                batch_size: 0,
                done: 0,
                rows: n,
                queue_time: started.saturating_duration_since(job.enqueued_at),
                reply: Some(job.reply),
            });
            rows.push(job.rows);
        }
        let segments: Vec<Segment> = rows.iter().enumerate().map(|(j, r)| (j, 0..r.rows)).collect();
        let Err(Fatal { reason, ran }) = self.run_segments(m, &rows, segments, &mut answers, started) else {
            return Ok(());
        };
        // Unhealthy before anyone hears back, so no caller sees this worker as usable. Jobs
        // answered in full before the device died keep their answers; the others are retried
        // elsewhere (counted against their retries if they were in the fatal call).
        self.shared.set_healthy(false);
        for (j, a) in answers.iter_mut().enumerate() {
            if let Some(reply) = a.reply.take() {
                self.shared.finished(a.rows);
                let _ = reply.send(Err(JobFailure::Lost { ran: ran.contains(&j) }));
            }
        }
        Err(reason)
    }

    /// Run `segments` (rows of `jobs`) as one `forward`, writing each row's result into
    /// `answers`; on a batch failure, run the halves, down to single rows. A job is answered as
    /// soon as all its rows are: its wave-mates do not wait for another row's halving.
    fn run_segments(
        &mut self,
        m: usize,
        jobs: &[Arc<InferRows>],
        segments: Vec<Segment>,
        answers: &mut [Answer],
        started: Instant,
    ) -> Result<(), Fatal> {
        let rows: usize = segments.iter().map(|(_, r)| r.len()).sum();
        let h = self.specs[m].state_size;
        match self.forward(m, jobs, &segments, rows) {
            Ok(out) => {
                let out = Arc::new(out);
                let mut at = 0;
                for (j, range) in &segments {
                    let a = &mut answers[*j];
                    if a.batch_size == 0 {
                        a.batch_size = rows;
                    }
                    let n = range.len();
                    a.done += n;
                    if n == a.rows {
                        // The whole job in this `forward`: its answer is a view of the output.
                        a.values =
                            Some(JobValues::Shared { batch: out.clone(), start: at, rows: n, state_size: h });
                    } else {
                        let (scores, new_state) = a.owned(h);
                        scores[range.clone()].copy_from_slice(&out.scores[at..at + n]);
                        new_state[range.start * h..range.end * h]
                            .copy_from_slice(&out.new_state[at * h..(at + n) * h]);
                    }
                    at += n;
                    self.answer_if_done(m, a, started);
                }
                Ok(())
            }
            Err(Failed::Fatal(reason)) => {
                Err(Fatal { reason, ran: segments.iter().map(|(j, _)| *j).collect() })
            }
            Err(Failed::Batch(err)) if rows > 1 => {
                let spec = &self.specs[m];
                tracing::warn!(model = %spec.name, rows, error = %err, "batch failed; running its halves apart");
                let (first, second) = halves(segments, rows / 2);
                self.run_segments(m, jobs, first, answers, started)?;
                self.run_segments(m, jobs, second, answers, started)
            }
            Err(Failed::Batch(err)) => {
                tracing::warn!(model = %self.specs[m].name, error = %err, "row failed alone");
                for (j, range) in segments {
                    let a = &mut answers[j];
                    a.owned(self.specs[m].state_size);
                    a.failed.push((range.start, err.clone()));
                    a.done += 1;
                    self.answer_if_done(m, a, started);
                }
                Ok(())
            }
        }
    }

    /// Send `a`'s job its answer once every row of it is scored or failed alone.
    fn answer_if_done(&self, m: usize, a: &mut Answer, started: Instant) {
        if a.done < a.rows {
            return;
        }
        let Some(reply) = a.reply.take() else { return };
        self.shared.finished(a.rows);
        let mut failed = std::mem::take(&mut a.failed);
        failed.sort_unstable_by_key(|(row, _)| *row);
        let output = JobOutput {
            values: a.values.take().expect("every row answered"),
            failed,
            served: Served {
                model_version: self.specs[m].version,
                batch_size: a.batch_size,
                device: self.device,
                queue_time: a.queue_time,
                compute_time: started.elapsed(),
            },
        };
        let _ = reply.send(Ok(output));
    }

    /// One `forward` over the rows of `segments`, panics caught, output shapes checked.
    fn forward(
        &mut self,
        m: usize,
        jobs: &[Arc<InferRows>],
        segments: &[Segment],
        rows: usize,
    ) -> Result<BatchOutput, Failed> {
        // Tests: `forward=1*sleep(60000)` makes one model call take a minute (a stuck device).
        fail::fail_point!("forward");
        let spec = &self.specs[m];
        let (f, h) = (spec.feature_count, spec.state_size);
        let input = match segments {
            // One job's rows are contiguous already.
            [(j, range)] => BatchInput {
                rows,
                features: &jobs[*j].features[range.start * f..range.end * f],
                state: &jobs[*j].state[range.start * h..range.end * h],
            },
            _ => {
                self.features.clear();
                self.state.clear();
                for (j, range) in segments {
                    let job = &jobs[*j];
                    self.features.extend_from_slice(&job.features[range.start * f..range.end * f]);
                    self.state.extend_from_slice(&job.state[range.start * h..range.end * h]);
                }
                BatchInput { rows, features: &self.features, state: &self.state }
            }
        };
        let backend = &mut self.backend;
        self.shared.set_busy(Some(Instant::now()));
        let result = catch_unwind(AssertUnwindSafe(|| backend.run(m, &input)));
        self.shared.set_busy(None);
        match result {
            Ok(Ok(out)) if out.scores.len() == rows && out.new_state.len() == rows * spec.state_size => {
                Ok(out)
            }
            Ok(Ok(out)) => Err(Failed::Batch(InferError::Backend(format!(
                "model {} returned {} scores and {} state values for {rows} rows",
                spec.name,
                out.scores.len(),
                out.new_state.len()
            )))),
            Ok(Err(BackendError::Fatal(reason))) => Err(Failed::Fatal(reason)),
            Ok(Err(e)) => Err(Failed::Batch(InferError::Backend(e.to_string()))),
            Err(panic) => Err(Failed::Batch(InferError::Panicked(panic_message(&*panic)))),
        }
    }
}

/// Rows `range` of job `j` of a batch.
type Segment = (usize, Range<usize>);

/// The first `n` rows of `segments` and the rest (a segment may be cut in two).
fn halves(segments: Vec<Segment>, n: usize) -> (Vec<Segment>, Vec<Segment>) {
    let (mut first, mut second, mut left) = (Vec::new(), Vec::new(), n);
    for (j, range) in segments {
        if left >= range.len() {
            left -= range.len();
            first.push((j, range));
        } else if left > 0 {
            first.push((j, range.start..range.start + left));
            second.push((j, range.start + left..range.end));
            left = 0;
        } else {
            second.push((j, range));
        }
    }
    (first, second)
}

/// A job's answer as its rows come out of the batch, and where it goes.
struct Answer {
    /// Set when its rows come out: a view of the one `forward` that ran them all, or buffers
    /// filled piece by piece when its batch was split.
    values: Option<JobValues>,
    failed: Vec<(usize, InferError)>,
    /// Rows of the first `forward` that served it.
    batch_size: usize,
    /// Rows answered (scored or failed alone), of `rows`.
    done: usize,
    rows: usize,
    queue_time: std::time::Duration,
    /// Taken when the answer is sent.
    reply: Option<tokio::sync::oneshot::Sender<super::link::JobReply>>,
}

impl Answer {
    /// Buffers for its rows, to fill piece by piece (NaN and zeros until then).
    fn owned(&mut self, state_size: usize) -> (&mut Vec<f32>, &mut Vec<f32>) {
        let rows = self.rows;
        let values = self.values.get_or_insert_with(|| JobValues::Owned {
            scores: vec![f32::NAN; rows],
            new_state: vec![0.0; rows * state_size],
        });
        match values {
            JobValues::Owned { scores, new_state } => (scores, new_state),
            JobValues::Shared { .. } => unreachable!("a job run whole is answered at once"),
        }
    }
}

/// The device died during a batch: the jobs in the `forward` that failed (`ran`).
struct Fatal {
    reason: String,
    ran: Vec<usize>,
}

/// Why a `forward` produced nothing.
enum Failed {
    /// This batch only: the worker keeps serving.
    Batch(InferError),
    /// The device is gone: the worker stops.
    Fatal(String),
}

/// Whole jobs in order, at most `size` rows per chunk (a larger job alone).
fn chunks(jobs: Vec<Job>, size: usize) -> Vec<Vec<Job>> {
    let mut out: Vec<Vec<Job>> = Vec::new();
    let mut rows = 0;
    for job in jobs {
        match out.last_mut() {
            Some(chunk) if rows + job.rows.rows <= size => {
                rows += job.rows.rows;
                chunk.push(job);
            }
            _ => {
                rows = job.rows.rows;
                out.push(vec![job]);
            }
        }
    }
    out
}

pub(crate) fn panic_message(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned())
}
