//! The worker's two OS threads: the feeder batches queued jobs per model and row length (one
//! event, or a sequence of `steps`: a batch's rows all have the same), builds each batch's input
//! and answers its jobs; the device thread runs the backend, one `forward` after another.
//!
//! Neither runs on the async runtime. The device thread never waits for the feeder while there
//! is work: when `max_batch_size` rows wait, the feeder hands them over while the device still
//! runs the previous batch (two batches in flight: double buffering), and it answers a finished
//! batch's callers while the next one runs. Otherwise (a lighter load) a batch is formed when the
//! device is free, by the batcher's rules, so the rows that arrive meanwhile join it.
//!
//! A job carries one row or many (a partition's wave) and gets one answer. A backend error or
//! panic fails only the row that fails when run alone (a failed batch is split in halves by rows,
//! across job boundaries, until the culprit is found); a [`BackendError::Fatal`] ends both
//! threads, and every job still queued is answered "worker lost" so the router retries it
//! elsewhere.

use std::any::Any;
use std::collections::VecDeque;
use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};

use super::link::{Job, JobFailure, JobOutput, JobStart, JobValues, WorkerShared};
use crate::batcher::{Batcher, Pending};
use crate::inference::{
    BackendError, BatchInput, BatchOutput, Device, InferError, InferRows, InferenceBackend, Served,
};
use crate::model::ModelSpec;

/// Batches handed to the device thread and not yet answered: the one it runs and the next.
const IN_FLIGHT: usize = 2;

/// Why the thread stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ThreadExit {
    /// Every sender is gone (the worker is stopping); queued work was finished first.
    Drained,
    /// The backend reported the device gone; queued work was handed back for retry.
    Fatal(String),
}

/// One `forward` for the device thread.
pub(crate) struct Forward {
    id: u64,
    model: usize,
    rows: usize,
    /// Events per row.
    steps: usize,
    input: Input,
    /// The jobs whose first `forward` this is: their deadlines start when it starts.
    starts: Vec<Arc<JobStart>>,
}

/// A `forward`'s rows: one job's, as they are, or copied from several into one buffer.
enum Input {
    Rows(Arc<InferRows>, Range<usize>),
    Copied { features: Vec<f32>, state: Vec<f32> },
}

/// What became of a [`Forward`]; its input comes back so the buffers are reused.
pub(crate) struct Forwarded {
    id: u64,
    result: Result<BatchOutput, Failed>,
    started: Instant,
    /// How long the `forward` took.
    took: std::time::Duration,
    input: Input,
}

/// The device thread: runs every `forward` it is handed, in order, until the feeder is gone. After
/// a fatal error it runs nothing more (the feeder stops at that error).
pub(crate) fn run_device(
    mut backend: Box<dyn InferenceBackend>,
    specs: Arc<[ModelSpec]>,
    shared: Arc<WorkerShared>,
    forwards: Receiver<Forward>,
    done: Sender<Forwarded>,
) {
    let mut gone: Option<String> = None;
    for f in forwards {
        let started = Instant::now();
        let result = if let Some(reason) = &gone {
            Err(Failed::NotRun(reason.clone()))
        } else {
            for s in &f.starts {
                s.mark(started);
            }
            forward(&mut *backend, &specs[f.model], f.model, (f.rows, f.steps), &f.input, &shared)
        };
        if let Err(Failed::Fatal(reason)) = &result {
            gone = Some(reason.clone());
        }
        let took = started.elapsed();
        if done.send(Forwarded { id: f.id, result, started, took, input: f.input }).is_err() {
            return;
        }
    }
}

/// One `forward`, panics caught, output shapes checked.
fn forward(
    backend: &mut dyn InferenceBackend,
    spec: &ModelSpec,
    m: usize,
    (rows, steps): (usize, usize),
    input: &Input,
    shared: &WorkerShared,
) -> Result<BatchOutput, Failed> {
    // Tests: `forward=1*sleep(60000)` makes one model call take a minute (a stuck device).
    fail::fail_point!("forward");
    let (f, h) = (steps * spec.feature_count, spec.state_size);
    let batch = match input {
        Input::Rows(job, range) => BatchInput {
            rows,
            steps,
            features: &job.features[range.start * f..range.end * f],
            state: &job.state[range.start * h..range.end * h],
        },
        Input::Copied { features, state } => BatchInput { rows, steps, features, state },
    };
    shared.set_busy(Some(Instant::now()));
    let result = catch_unwind(AssertUnwindSafe(|| backend.run(m, &batch)));
    shared.set_busy(None);
    match result {
        Ok(Ok(out)) if out.scores.len() == rows * steps && out.new_state.len() == rows * h => Ok(out),
        Ok(Ok(out)) => Err(Failed::Batch(InferError::Backend(format!(
            "model {} returned {} scores and {} state values for {rows} rows of {steps} step(s)",
            spec.name,
            out.scores.len(),
            out.new_state.len()
        )))),
        Ok(Err(BackendError::Fatal(reason))) => Err(Failed::Fatal(reason)),
        Ok(Err(e)) => Err(Failed::Batch(InferError::Backend(e.to_string()))),
        Err(panic) => Err(Failed::Batch(InferError::Panicked(panic_message(&*panic)))),
    }
}

/// The feeder thread's state.
pub(crate) struct WorkerThread {
    specs: Arc<[ModelSpec]>,
    /// One per model for rows of one event (index = the model's), then one per model and
    /// sequence length seen, added as they come (at most `max_steps - 1` more per model).
    lanes: Vec<Lane>,
    shared: Arc<WorkerShared>,
    device: Device,
    forwards: Sender<Forward>,
    done: Receiver<Forwarded>,
    next_id: u64,
    /// Batches handed to the device thread, oldest first.
    launched: VecDeque<Launched>,
    /// Results received while waiting for another (a failed batch's halves run behind the next
    /// batch).
    stash: Vec<Forwarded>,
    /// Input buffers back from the device thread, reused so a steady load allocates none.
    spare: Vec<(Vec<f32>, Vec<f32>)>,
    cancelled: Vec<Job>,
    /// Retried requests, each run in a batch of its own before anything else.
    isolated: Vec<Job>,
}

/// The queued jobs of one model whose rows have `steps` events each: batched together only.
struct Lane {
    model: usize,
    steps: usize,
    batcher: Batcher<Job>,
}

/// A batch handed to the device thread: its jobs' rows and answers.
struct Launched {
    id: u64,
    model: usize,
    /// The lane it came from, which learns its compute time (`None`: a retried job, run alone).
    lane: Option<usize>,
    jobs: Vec<Arc<InferRows>>,
    answers: Vec<Answer>,
}

impl WorkerThread {
    pub(crate) fn new(
        specs: Arc<[ModelSpec]>,
        shared: Arc<WorkerShared>,
        device: Device,
        forwards: Sender<Forward>,
        done: Receiver<Forwarded>,
    ) -> Self {
        let lanes = specs
            .iter()
            .enumerate()
            .map(|(model, s)| Lane { model, steps: 1, batcher: Batcher::new(s.batch.clone()) })
            .collect();
        Self {
            specs,
            lanes,
            shared,
            device,
            forwards,
            done,
            next_id: 0,
            launched: VecDeque::new(),
            stash: Vec::new(),
            spare: Vec::new(),
            cancelled: Vec::new(),
            isolated: Vec::new(),
        }
    }

    pub(crate) fn run(mut self, rx: Receiver<Job>) -> ThreadExit {
        let no_results = crossbeam_channel::never();
        loop {
            if let Err(reason) = self.launch_ready() {
                return self.die(reason, &rx);
            }
            // With nothing on the device, wait for a job or the batcher's deadline; with one batch
            // on it, for a job (the next batch may fill) or its result; with two, for a result
            // only (jobs wait in the queue without waking this thread).
            let idle = self.launched.is_empty();
            let jobs = if self.launched.len() < IN_FLIGHT { rx.clone() } else { crossbeam_channel::never() };
            let deadline =
                if idle { self.lanes.iter().filter_map(|l| l.batcher.deadline()).min() } else { None };
            let timer = deadline.map_or_else(crossbeam_channel::never, crossbeam_channel::at);
            let results = if idle { no_results.clone() } else { self.done.clone() };
            crossbeam_channel::select! {
                recv(jobs) -> job => match job {
                    Ok(job) => {
                        self.enqueue(job);
                        // Take what else is already queued, so the batcher sees the real queue length.
                        for job in rx.try_iter() {
                            self.enqueue(job);
                        }
                    }
                    Err(_) => {
                        self.finish_all();
                        return ThreadExit::Drained;
                    }
                },
                recv(results) -> done => {
                    let settled = match done {
                        Ok(done) => {
                            self.stash.push(done);
                            self.complete_received()
                        }
                        Err(_) => Err("the device thread ended".to_owned()),
                    };
                    if let Err(reason) = settled {
                        return self.die(reason, &rx);
                    }
                }
                recv(timer) -> _ => {}
            }
        }
    }

    /// The device is gone: every job not answered yet is handed back.
    fn die(&mut self, reason: String, rx: &Receiver<Job>) -> ThreadExit {
        self.shared.set_healthy(false);
        self.hand_back(rx);
        ThreadExit::Fatal(reason)
    }

    fn enqueue(&mut self, job: Job) {
        if job.isolate {
            self.isolated.push(job);
            return;
        }
        let (model, steps) = (job.model, job.rows.steps);
        let lane = if steps == 1 {
            model
        } else if let Some(l) = self.lanes.iter().position(|l| l.model == model && l.steps == steps) {
            l
        } else {
            let batcher = Batcher::new(self.specs[model].batch.clone());
            self.lanes.push(Lane { model, steps, batcher });
            self.lanes.len() - 1
        };
        self.lanes[lane].batcher.push(job);
    }

    /// Hand the device what is due: each retried job alone (and answered before anything else
    /// runs), then batches while fewer than [`IN_FLIGHT`] are on it; behind a running batch only
    /// a full one ([`Batcher::pop_full`]).
    fn launch_ready(&mut self) -> Result<(), String> {
        let mut isolated = std::mem::take(&mut self.isolated).into_iter();
        while let Some(job) = isolated.next() {
            if job.is_cancelled() {
                self.shared.finished(job.rows.rows);
                continue;
            }
            self.launch(job.model, None, vec![job]);
            if let Err(fatal) = self.complete_all() {
                self.isolated.extend(isolated);
                return Err(fatal);
            }
        }
        while self.launched.len() < IN_FLIGHT {
            let now = Instant::now();
            let busy = !self.launched.is_empty();
            // Lanes by their start time (then by index), so that none waits behind another's
            // stream of full batches; and behind a running batch no full batch of one lane jumps
            // ahead of another lane's overdue one.
            let start: Vec<Option<Instant>> = self.lanes.iter().map(|l| l.batcher.deadline()).collect();
            let overdue = |l: usize| start[l].is_some_and(|d| d <= now);
            let mut order: Vec<usize> = (0..self.lanes.len()).collect();
            order.sort_by_key(|&l| (start[l].is_none(), start[l]));
            let next = order.into_iter().find_map(|l| {
                let lane = &mut self.lanes[l];
                let batch = if !busy {
                    lane.batcher.pop_ready(now, &mut self.cancelled)
                } else if (0..start.len()).any(|o| o != l && overdue(o)) {
                    None
                } else {
                    lane.batcher.pop_full(&mut self.cancelled)
                };
                batch.map(|b| (l, b))
            });
            self.drop_cancelled();
            let Some((l, batch)) = next else { break };
            self.launch(self.lanes[l].model, Some(l), batch);
        }
        Ok(())
    }

    /// Hand one batch of jobs (of one model, with rows of the same `steps`, from `lane`) to the
    /// device thread.
    fn launch(&mut self, m: usize, lane: Option<usize>, batch: Vec<Job>) {
        let (mut jobs, mut answers, mut starts) = (
            Vec::with_capacity(batch.len()),
            Vec::with_capacity(batch.len()),
            Vec::with_capacity(batch.len()),
        );
        for job in batch {
            answers.push(Answer {
                values: None,
                failed: Vec::new(),
                batch_size: 0,
                done: 0,
                rows: job.rows.rows,
                enqueued_at: job.enqueued_at,
                started: None,
                reply: Some(job.reply),
            });
            starts.push(job.started);
            jobs.push(job.rows);
        }
        let id = self.submit(m, &jobs, &whole(&jobs), starts);
        self.launched.push_back(Launched { id, model: m, lane, jobs, answers });
    }

    /// Queue one `forward` of `segments` (rows of `jobs`) on the device thread.
    fn submit(
        &mut self,
        m: usize,
        jobs: &[Arc<InferRows>],
        segments: &[Segment],
        starts: Vec<Arc<JobStart>>,
    ) -> u64 {
        let steps = segments.first().map_or(1, |(j, _)| jobs[*j].steps);
        let (f, h) = (steps * self.specs[m].feature_count, self.specs[m].state_size);
        let input = match segments {
            [(j, range)] => Input::Rows(jobs[*j].clone(), range.clone()),
            _ => {
                let (mut features, mut state) = self.spare.pop().unwrap_or_default();
                features.clear();
                state.clear();
                for (j, range) in segments {
                    features.extend_from_slice(&jobs[*j].features[range.start * f..range.end * f]);
                    state.extend_from_slice(&jobs[*j].state[range.start * h..range.end * h]);
                }
                Input::Copied { features, state }
            }
        };
        let id = self.next_id;
        self.next_id += 1;
        let rows = segments.iter().map(|(_, r)| r.len()).sum();
        // A send fails only when the device thread is gone; waiting for the result says so.
        let _ = self.forwards.send(Forward { id, model: m, rows, steps, input, starts });
        id
    }

    /// The result of `forward` `id`: from the stash, or received. A result that comes first is
    /// answered at once when it is the oldest launched batch's and clean (its callers' deadlines
    /// run while a failed batch's halves do), else stashed.
    fn wait_for(&mut self, id: u64) -> Result<Forwarded, String> {
        if let Some(i) = self.stash.iter().position(|f| f.id == id) {
            return Ok(self.stash.swap_remove(i));
        }
        loop {
            let f = self.done.recv().map_err(|_| "the device thread ended".to_owned())?;
            if f.id == id {
                return Ok(f);
            }
            if f.result.is_ok() && self.launched.front().is_some_and(|l| l.id == f.id) {
                let l = self.launched.pop_front().expect("checked");
                // A clean result settles without the device: no nested wait.
                let _ = self.complete(l, f);
            } else {
                self.stash.push(f);
            }
        }
    }

    /// Answer the oldest launched batches whose results have come.
    fn complete_received(&mut self) -> Result<(), String> {
        while let Some(l) = self.launched.front() {
            let Some(i) = self.stash.iter().position(|f| f.id == l.id) else { break };
            let done = self.stash.swap_remove(i);
            let l = self.launched.pop_front().expect("checked");
            self.complete(l, done)?;
        }
        Ok(())
    }

    /// Wait for every launched batch and answer it.
    fn complete_all(&mut self) -> Result<(), String> {
        while let Some(l) = self.launched.pop_front() {
            match self.wait_for(l.id) {
                Ok(done) => self.complete(l, done)?,
                Err(reason) => {
                    self.lose(vec![l], true);
                    let rest: Vec<Launched> = self.launched.drain(..).collect();
                    self.lose(rest, false);
                    return Err(reason);
                }
            }
        }
        Ok(())
    }

    /// Answer a launched batch from its first `forward`'s result. `Err` only when the device is
    /// gone.
    ///
    /// A batch that fails (error or panic) is run again as two halves by rows, down to single
    /// rows: one poison row costs about 2·log2(rows) extra calls, and only a row that fails
    /// **alone** is answered with the error; every other row of its job and batch gets its score.
    fn complete(&mut self, l: Launched, done: Forwarded) -> Result<(), String> {
        let Launched { model: m, lane, jobs, mut answers, .. } = l;
        for a in &mut answers {
            a.started = Some(done.started);
        }
        if let (Some(lane), Ok(_)) = (lane, &done.result) {
            self.lanes[lane].batcher.learn(answers.iter().map(|a| a.rows).sum(), done.took);
        }
        let Err(Fatal { reason, ran }) = self.settle(m, &jobs, whole(&jobs), &mut answers, done) else {
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
        // The batches behind it: those that ran before the device died have their results here
        // (they came first) and keep a clean answer; the others never ran.
        for l in std::mem::take(&mut self.launched) {
            let ran_clean = self.stash.iter().position(|f| f.id == l.id && f.result.is_ok());
            match ran_clean {
                Some(i) => {
                    let done = self.stash.swap_remove(i);
                    let _ = self.complete(l, done);
                }
                None => {
                    // Only the `forward` that killed the device counts against its rows' retries.
                    let ran =
                        self.stash.iter().any(|f| f.id == l.id && matches!(f.result, Err(Failed::Fatal(_))));
                    self.lose(vec![l], ran);
                }
            }
        }
        Err(reason)
    }

    /// Answer every job of `batches` "worker lost".
    fn lose(&self, batches: Vec<Launched>, ran: bool) {
        for mut l in batches {
            for a in &mut l.answers {
                if let Some(reply) = a.reply.take() {
                    self.shared.finished(a.rows);
                    let _ = reply.send(Err(JobFailure::Lost { ran }));
                }
            }
        }
    }

    /// Write the result of the `forward` of `segments` (rows of `jobs`) into `answers`; on a
    /// batch failure, run the halves, down to single rows. A job is answered as soon as all its
    /// rows are: its wave-mates do not wait for another row's halving.
    fn settle(
        &mut self,
        m: usize,
        jobs: &[Arc<InferRows>],
        segments: Vec<Segment>,
        answers: &mut [Answer],
        done: Forwarded,
    ) -> Result<(), Fatal> {
        let Forwarded { result, input, .. } = done;
        if let Input::Copied { features, state } = input
            && self.spare.len() < IN_FLIGHT
        {
            self.spare.push((features, state));
        }
        let rows: usize = segments.iter().map(|(_, r)| r.len()).sum();
        let h = self.specs[m].state_size;
        let steps = jobs.first().map_or(1, |j| j.steps);
        let ran = |segments: &[Segment]| segments.iter().map(|(j, _)| *j).collect();
        match result {
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
                        a.values = Some(JobValues::Shared {
                            batch: out.clone(),
                            start: at,
                            rows: n,
                            steps,
                            state_size: h,
                        });
                    } else {
                        let (scores, new_state) = a.owned(steps, h);
                        scores[range.start * steps..range.end * steps]
                            .copy_from_slice(&out.scores[at * steps..(at + n) * steps]);
                        new_state[range.start * h..range.end * h]
                            .copy_from_slice(&out.new_state[at * h..(at + n) * h]);
                    }
                    at += n;
                    self.answer_if_done(m, a);
                }
                Ok(())
            }
            Err(Failed::Fatal(reason)) => Err(Fatal { reason, ran: ran(&segments) }),
            // The device died in another batch's `forward`: these rows did not run.
            Err(Failed::NotRun(reason)) => Err(Fatal { reason, ran: Vec::new() }),
            Err(Failed::Batch(err)) if rows > 1 => {
                let spec = &self.specs[m];
                tracing::warn!(model = %spec.name, rows, error = %err, "batch failed; running its halves apart");
                let (first, second) = halves(segments, rows / 2);
                for half in [first, second] {
                    let id = self.submit(m, jobs, &half, Vec::new());
                    let done = self.wait_for(id).map_err(|reason| Fatal { reason, ran: ran(&half) })?;
                    self.settle(m, jobs, half, answers, done)?;
                }
                Ok(())
            }
            Err(Failed::Batch(err)) => {
                tracing::warn!(model = %self.specs[m].name, error = %err, "row failed alone");
                for (j, range) in segments {
                    let a = &mut answers[j];
                    a.owned(steps, h);
                    a.failed.push((range.start, err.clone()));
                    a.done += 1;
                    self.answer_if_done(m, a);
                }
                Ok(())
            }
        }
    }

    /// Send `a`'s job its answer once every row of it is scored or failed alone.
    fn answer_if_done(&self, m: usize, a: &mut Answer) {
        if a.done < a.rows {
            return;
        }
        let Some(reply) = a.reply.take() else { return };
        self.shared.finished(a.rows);
        let mut failed = std::mem::take(&mut a.failed);
        failed.sort_unstable_by_key(|(row, _)| *row);
        let started = a.started.expect("set before its batch is settled");
        let output = JobOutput {
            values: a.values.take().expect("every row answered"),
            failed,
            served: Served {
                model_version: self.specs[m].version,
                batch_size: a.batch_size,
                device: self.device,
                queue_time: started.saturating_duration_since(a.enqueued_at),
                compute_time: started.elapsed(),
            },
        };
        let _ = reply.send(Ok(output));
    }

    /// Run everything queued regardless of delays (shutdown: finish in-flight work).
    fn finish_all(&mut self) {
        let lost = JobFailure::Lost { ran: false };
        let mut dead = self
            .complete_all()
            .and_then(|()| self.launch_ready())
            .and_then(|()| self.complete_all())
            .is_err();
        let isolated = std::mem::take(&mut self.isolated);
        self.fail(isolated, &lost);
        for l in 0..self.lanes.len() {
            let m = self.lanes[l].model;
            // Those whose callers went away never run (the batcher hands them back only when a
            // batch is due).
            let (gone, queued): (Vec<Job>, Vec<Job>) =
                self.lanes[l].batcher.drain_all().partition(Pending::is_cancelled);
            self.cancelled.extend(gone);
            self.drop_cancelled();
            for chunk in chunks(queued, self.specs[m].batch.max_batch_size) {
                if dead {
                    // The device died while draining: fail the rest explicitly.
                    self.fail(chunk, &lost);
                } else {
                    self.launch(m, Some(l), chunk);
                    dead = self.complete_all().is_err();
                }
            }
        }
    }

    /// The device is gone: answer every queued job "worker lost" so the router retries it elsewhere.
    fn hand_back(&mut self, rx: &Receiver<Job>) {
        let lost = JobFailure::Lost { ran: false };
        let launched: Vec<Launched> = self.launched.drain(..).collect();
        self.lose(launched, false);
        let isolated = std::mem::take(&mut self.isolated);
        self.fail(isolated, &lost);
        for l in 0..self.lanes.len() {
            let queued: Vec<Job> = self.lanes[l].batcher.drain_all().collect();
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
}

/// Rows `range` of job `j` of a batch.
type Segment = (usize, Range<usize>);

/// Every row of every job, in order.
fn whole(jobs: &[Arc<InferRows>]) -> Vec<Segment> {
    jobs.iter().enumerate().map(|(j, r)| (j, 0..r.rows)).collect()
}

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
    enqueued_at: Instant,
    /// When its batch's first `forward` started.
    started: Option<Instant>,
    /// Taken when the answer is sent.
    reply: Option<tokio::sync::oneshot::Sender<super::link::JobReply>>,
}

impl Answer {
    /// Buffers for its rows, to fill piece by piece (NaN and zeros until then).
    fn owned(&mut self, steps: usize, state_size: usize) -> (&mut Vec<f32>, &mut Vec<f32>) {
        let rows = self.rows;
        let values = self.values.get_or_insert_with(|| JobValues::Owned {
            scores: vec![f32::NAN; rows * steps],
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
pub(crate) enum Failed {
    /// This batch only: the worker keeps serving.
    Batch(InferError),
    /// The device is gone: the worker stops.
    Fatal(String),
    /// Not run: the device died earlier (in another batch's `forward`, for this reason).
    NotRun(String),
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
