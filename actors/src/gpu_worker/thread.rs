//! The worker's OS thread: batches queued jobs per model and runs the backend.
//!
//! Never runs on the async runtime. A backend error or panic fails only the row that fails when
//! run alone (a failed batch is split in halves until the culprit is found); a
//! [`BackendError::Fatal`] ends the thread, and every job still queued is answered "worker lost"
//! so the router retries it elsewhere.

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{Receiver, RecvTimeoutError};

use super::link::{Job, JobFailure, WorkerShared};
use crate::batcher::{Batcher, Pending};
use crate::inference::{
    BackendError, BatchInput, BatchOutput, Device, InferError, InferOutput, InferenceBackend,
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
                self.shared.finished(1);
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
            self.shared.finished(self.cancelled.len());
            self.cancelled.clear();
        }
    }

    fn fail(&self, jobs: Vec<Job>, err: &JobFailure) {
        self.shared.finished(jobs.len());
        for job in jobs {
            let _ = job.reply.send(Err(err.clone()));
        }
    }

    /// Run one batch and answer each of its jobs. `Err` only when the device is gone.
    ///
    /// A batch that fails (error or panic) is run again as two halves, down to single rows: one
    /// poison row costs about 2·log2(rows) extra calls, and only a row that fails **alone** is
    /// answered with the error; its batch-mates get their scores.
    fn execute(&mut self, m: usize, mut batch: Vec<Job>) -> Result<(), String> {
        for job in &mut batch {
            if let Some(started) = job.started.take() {
                let _ = started.send(());
            }
        }
        let started = Instant::now();
        let rows = batch.len();
        let result = self.forward(m, &batch);
        let compute_time = started.elapsed();
        let spec = &self.specs[m];
        match result {
            Ok(out) => {
                self.shared.finished(rows);
                let h = spec.state_size;
                for (i, job) in batch.into_iter().enumerate() {
                    let output = InferOutput {
                        score: out.scores[i],
                        new_state: out.new_state[i * h..(i + 1) * h].to_vec(),
                        model_version: spec.version,
                        batch_size: rows,
                        device: self.device,
                        queue_time: started.saturating_duration_since(job.enqueued_at),
                        compute_time,
                    };
                    let _ = job.reply.send(Ok(output));
                }
                Ok(())
            }
            Err(Failed::Fatal(reason)) => {
                // Unhealthy before anyone hears back, so no caller sees this worker as usable.
                self.shared.set_healthy(false);
                self.fail(batch, &JobFailure::Lost { ran: true });
                Err(reason)
            }
            Err(Failed::Batch(err)) if rows > 1 => {
                tracing::warn!(model = %spec.name, rows, error = %err, "batch failed; running its halves apart");
                let second = batch.split_off(rows / 2);
                if let Err(fatal) = self.execute(m, batch) {
                    self.fail(second, &JobFailure::Lost { ran: false });
                    return Err(fatal);
                }
                self.execute(m, second)
            }
            Err(Failed::Batch(err)) => {
                tracing::warn!(model = %spec.name, error = %err, "row failed alone");
                self.fail(batch, &JobFailure::Error(err));
                Ok(())
            }
        }
    }

    /// One `forward` over `batch`, panics caught, output shapes checked.
    fn forward(&mut self, m: usize, batch: &[Job]) -> Result<BatchOutput, Failed> {
        // Tests: `forward=1*sleep(60000)` makes one model call take a minute (a stuck device).
        fail::fail_point!("forward");
        let spec = &self.specs[m];
        let rows = batch.len();
        self.features.clear();
        self.state.clear();
        for job in batch {
            self.features.extend_from_slice(&job.request.features);
            if spec.is_stateful() {
                match &job.request.state {
                    Some(s) => self.state.extend_from_slice(s),
                    None => self.state.resize(self.state.len() + spec.state_size, 0.0),
                }
            }
        }
        let input = BatchInput { rows, features: &self.features, state: &self.state };
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

/// Why a `forward` produced nothing.
enum Failed {
    /// This batch only: the worker keeps serving.
    Batch(InferError),
    /// The device is gone: the worker stops.
    Fatal(String),
}

fn chunks(mut jobs: Vec<Job>, size: usize) -> Vec<Vec<Job>> {
    let mut out = Vec::new();
    while !jobs.is_empty() {
        let rest = jobs.split_off(size.min(jobs.len()));
        out.push(std::mem::replace(&mut jobs, rest));
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
