//! Inference requests, their validation, errors, and the port a model runtime implements.
//!
//! The port is synchronous on purpose: a backend lives on one dedicated OS thread (the GPU
//! worker's), never on the async runtime (ARCHITECTURE.md, invariant "the async runtime never
//! blocks").

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::model::ModelSpec;

/// One row of work: the features of one event and, for a stateful model, its key's state.
#[derive(Debug, Clone, PartialEq)]
pub struct InferRequest {
    pub model: Arc<str>,
    pub features: Vec<f32>,
    /// The key's state before this event; `None` means "no state yet" (all zeros).
    pub state: Option<Vec<f32>>,
}

/// The answer for one row.
#[derive(Debug, Clone, PartialEq)]
pub struct InferOutput {
    pub score: f32,
    /// The key's state after this event; empty for a stateless model.
    pub new_state: Vec<f32>,
    pub model_version: u32,
    /// Rows in the `forward` call that served this request.
    pub batch_size: usize,
    /// The device of the worker that ran it.
    pub device: Device,
    /// From the router's send to the start of the batch.
    pub queue_time: Duration,
    /// The `forward` call, tensor building and copying out included.
    pub compute_time: Duration,
}

/// Many rows of one model, row-major: a partition's wave (and, later, a gRPC request's
/// tensors). [`crate::pool::Router::infer_rows_within`] sends them as one job per batch limit,
/// with one answer each, so a row costs a copy of its values, not a request, a queue hop and a
/// reply of its own.
///
/// With `steps > 1` each row is one key's `steps` events in order, for the model's sequence
/// form: `steps × feature_count` feature values and one state per row, `steps` scores out.
#[derive(Debug, Clone, PartialEq)]
pub struct InferRows {
    pub rows: usize,
    /// Events per row: 1, or up to the model's `max_steps` for its sequence form.
    pub steps: usize,
    /// `rows × steps × feature_count` values.
    pub features: Vec<f32>,
    /// `rows × state_size` values for a stateful model (zeros for a key without state), else
    /// empty.
    pub state: Vec<f32>,
    /// When the earliest of its rows' answers is due (an event's deadline, [`due_at`]): the
    /// worker's batcher then lets the batch grow while it can still be computed in time instead
    /// of waiting the model's `max_queue_delay` ([`crate::batcher`], rule 4). `None`: the fixed
    /// delay.
    pub due: Option<Instant>,
}

impl Default for InferRows {
    fn default() -> Self {
        Self { rows: 0, steps: 1, features: Vec::new(), state: Vec::new(), due: None }
    }
}

/// When the score of an event that happened at `event_time_unix_micros` is due with a budget of
/// `slo` from its event time, on this process's monotonic clock. An event time ahead of this
/// node's clock counts as now (a skewed producer gets no extra time).
pub fn due_at(event_time_unix_micros: i64, slo: Duration) -> Instant {
    let now = Instant::now();
    let age = crate::partition::unix_micros().saturating_sub(event_time_unix_micros).max(0);
    let budget = slo.saturating_sub(Duration::from_micros(age.unsigned_abs()));
    now + budget
}

impl InferRows {
    /// Room for `rows` rows of `spec`, one event each.
    pub fn with_capacity(spec: &ModelSpec, rows: usize) -> Self {
        Self::sequences(spec, rows, 1)
    }

    /// Room for `rows` rows of `spec` of `steps` events each (the sequence form when `steps > 1`).
    pub fn sequences(spec: &ModelSpec, rows: usize, steps: usize) -> Self {
        Self {
            rows: 0,
            steps,
            features: Vec::with_capacity(rows * steps * spec.feature_count),
            state: Vec::with_capacity(rows * spec.state_size),
            due: None,
        }
    }

    /// Append one row of `spec`: its features (`steps` events' worth) and, for a stateful model,
    /// its key's state (`None`: no state yet, zeros). A row of the wrong shape is refused and
    /// nothing is appended.
    pub fn push(
        &mut self,
        spec: &ModelSpec,
        features: &[f32],
        state: Option<&[f32]>,
    ) -> Result<(), InferError> {
        let shape =
            |input, expected, got| InferError::Shape { model: spec.name.clone(), input, expected, got };
        if features.len() != self.steps * spec.feature_count {
            return Err(shape("features", self.steps * spec.feature_count, features.len()));
        }
        match state {
            Some(s) if s.len() != spec.state_size => return Err(shape("state", spec.state_size, s.len())),
            Some(s) => self.state.extend_from_slice(s),
            None => self.state.resize(self.state.len() + spec.state_size, 0.0),
        }
        self.features.extend_from_slice(features);
        self.rows += 1;
        Ok(())
    }

    /// A copy of rows `index`, in that order.
    pub fn select(&self, spec: &ModelSpec, index: &[usize]) -> Self {
        let mut out = Self::sequences(spec, index.len(), self.steps);
        for &k in index {
            let (features, state) = self.row(spec, k);
            out.features.extend_from_slice(features);
            out.state.extend_from_slice(state);
        }
        out.rows = index.len();
        out.due = self.due;
        out
    }

    /// Make `due` the earlier of its due time and `at` (a row of an event due at `at` joined).
    pub fn due_by(&mut self, at: Instant) {
        self.due = Some(self.due.map_or(at, |d| d.min(at)));
    }

    /// Row `k`'s features (all its steps) and state.
    pub fn row(&self, spec: &ModelSpec, k: usize) -> (&[f32], &[f32]) {
        let (f, h) = (self.steps * spec.feature_count, spec.state_size);
        (&self.features[k * f..(k + 1) * f], &self.state[k * h..(k + 1) * h])
    }
}

/// How a row was served: the batch it ran in.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Served {
    pub model_version: u32,
    /// Rows in the `forward` call that served the row.
    pub batch_size: usize,
    pub device: Device,
    /// From the router's send to the start of the batch.
    pub queue_time: Duration,
    /// The `forward` call(s), tensor building and copying out included.
    pub compute_time: Duration,
}

/// What became of one row of an [`InferRows`].
#[derive(Debug, Clone, PartialEq)]
pub enum RowAnswer {
    /// Its score and new state are in the [`RowsOutput`].
    Scored(Served),
    /// Refused (bad input) or failed when run alone.
    Failed(InferError),
    /// No answer within the deadline (counted from the start of its batch).
    TimedOut,
}

/// The answer to an [`InferRows`], row by row.
#[derive(Debug, Clone, PartialEq)]
pub struct RowsOutput {
    /// `steps` per row (one per event); NaN where the row was not scored.
    pub scores: Vec<f32>,
    /// `rows × state_size` values (zeros where the row was not scored); empty for a stateless
    /// model.
    pub new_state: Vec<f32>,
    pub answers: Vec<RowAnswer>,
    pub state_size: usize,
    /// Events per row, as in the [`InferRows`].
    pub steps: usize,
}

impl RowsOutput {
    /// Every row answered `answer`.
    pub(crate) fn all(rows: usize, steps: usize, state_size: usize, answer: RowAnswer) -> Self {
        Self {
            scores: vec![f32::NAN; rows * steps],
            new_state: vec![0.0; rows * state_size],
            answers: vec![answer; rows],
            state_size,
            steps,
        }
    }

    pub fn len(&self) -> usize {
        self.answers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.answers.is_empty()
    }

    /// Row `k`'s new state (empty for a stateless model).
    pub fn new_state(&self, k: usize) -> &[f32] {
        let h = self.state_size;
        &self.new_state[k * h..(k + 1) * h]
    }

    /// Row `k`'s scores, one per step.
    pub fn scores(&self, k: usize) -> &[f32] {
        &self.scores[k * self.steps..(k + 1) * self.steps]
    }

    /// Row `k` as [`crate::pool::Router::infer_within`] answers one request: `None` when its
    /// deadline passed. Rows of one step only (a sequence row has a score per step:
    /// [`RowsOutput::scores`]).
    pub fn get(&self, k: usize) -> Option<Result<InferOutput, InferError>> {
        debug_assert_eq!(self.steps, 1, "a row of one event");
        match &self.answers[k] {
            RowAnswer::Scored(s) => {
                Some(Ok(InferOutput::new(self.scores[k], self.new_state(k).to_vec(), *s)))
            }
            RowAnswer::Failed(e) => Some(Err(e.clone())),
            RowAnswer::TimedOut => None,
        }
    }
}

impl InferOutput {
    pub fn new(score: f32, new_state: Vec<f32>, served: Served) -> Self {
        let Served { model_version, batch_size, device, queue_time, compute_time } = served;
        Self { score, new_state, model_version, batch_size, device, queue_time, compute_time }
    }

    pub fn served(&self) -> Served {
        Served {
            model_version: self.model_version,
            batch_size: self.batch_size,
            device: self.device,
            queue_time: self.queue_time,
            compute_time: self.compute_time,
        }
    }
}

/// Why a request got no score. The variant says what the caller should do.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InferError {
    /// No model of that name is loaded. Bad input: dead-letter (`UNKNOWN_MODEL`).
    #[error("unknown model {model:?}")]
    UnknownModel { model: String },
    /// Wrong number of values. Bad input: dead-letter (`SHAPE`). Checked before any tensor is built.
    #[error("{input} has {got} values, model {model:?} expects {expected}")]
    Shape { model: String, input: &'static str, expected: usize, got: usize },
    /// Rows of `steps` events for a model whose sequence form takes at most `max_steps` (1: it
    /// has none). Bad input: the caller scores the events one by one.
    #[error("rows of {steps} steps, model {model:?} takes at most {max_steps}")]
    Steps { model: String, steps: usize, max_steps: usize },
    /// NaN or infinite value. Bad input: dead-letter (`VALUE_RANGE`).
    #[error("{input}[{index}] is {value}, not a finite number")]
    ValueRange { input: &'static str, index: usize, value: f32 },
    /// The model runtime failed on this request's batch (libtorch error, wrong output shape).
    /// Only that batch failed; the caller may retry once, then dead-letter.
    #[error("model runtime failed on this batch: {0}")]
    Backend(String),
    /// The model runtime panicked on this request's batch; the worker caught it and keeps serving.
    #[error("model runtime panicked on this batch: {0}")]
    Panicked(String),
    /// The pool's queue is full: back off (pause the Kafka partition) and try again.
    #[error("inference queue full ({capacity} requests in flight)")]
    Overloaded { capacity: usize },
    /// The worker holding the request died and the retries ran out, or none is healthy.
    #[error("no healthy worker answered after {attempts} attempt(s)")]
    WorkerLost { attempts: usize },
    /// The pool is shutting down.
    #[error("inference pool is shutting down")]
    ShuttingDown,
}

impl InferError {
    /// True for errors caused by the request itself: retrying cannot help.
    pub fn is_bad_request(&self) -> bool {
        matches!(
            self,
            Self::UnknownModel { .. } | Self::Shape { .. } | Self::Steps { .. } | Self::ValueRange { .. }
        )
    }
}

/// Check a request against its model before it is queued: shapes and finiteness.
pub fn validate(spec: &ModelSpec, req: &InferRequest) -> Result<(), InferError> {
    let shape = |input, expected, got| InferError::Shape { model: spec.name.clone(), input, expected, got };
    if req.features.len() != spec.feature_count {
        return Err(shape("features", spec.feature_count, req.features.len()));
    }
    check_finite("features", &req.features)?;
    match (&req.state, spec.is_stateful()) {
        (Some(s), true) => {
            if s.len() != spec.state_size {
                return Err(shape("state", spec.state_size, s.len()));
            }
            check_finite("state", s)?;
        }
        (Some(s), false) => return Err(shape("state", 0, s.len())),
        (None, _) => {}
    }
    Ok(())
}

/// `Ok` when every value is finite, else the first that is not, as [`InferError::ValueRange`].
pub fn check_finite(input: &'static str, values: &[f32]) -> Result<(), InferError> {
    // The common case in one pass without an early exit (vectorised), then where it failed.
    if values.iter().fold(true, |ok, v| ok & v.is_finite()) {
        return Ok(());
    }
    match values.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(InferError::ValueRange { input, index, value: values[index] }),
        None => Ok(()),
    }
}

/// Where a worker runs its model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// A batch handed to the backend: `rows` rows, row-major, already validated.
#[derive(Debug)]
pub struct BatchInput<'a> {
    pub rows: usize,
    /// Events per row: 1 (`forward`), or more for the model's sequence form
    /// (`forward_sequence`, features `[rows, steps, feature_count]`).
    pub steps: usize,
    /// `rows × steps × feature_count` values.
    pub features: &'a [f32],
    /// `rows × state_size` values for a stateful model, else empty.
    pub state: &'a [f32],
}

/// What the backend returns for a batch.
#[derive(Debug, Default, PartialEq)]
pub struct BatchOutput {
    /// One score per row and step.
    pub scores: Vec<f32>,
    /// `rows × state_size` values for a stateful model, else empty.
    pub new_state: Vec<f32>,
}

/// A failure of the model runtime.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// The model failed to load or warm up: the worker does not start.
    #[error("loading {model}: {detail}")]
    Load { model: String, detail: String },
    /// One batch failed; the worker keeps serving.
    #[error("{0}")]
    Batch(String),
    /// The device is gone (e.g. CUDA error): the worker stops and its supervisor restarts it.
    #[error("device failed: {0}")]
    Fatal(String),
}

/// A model timing after load, for `partita models` and logs.
#[derive(Debug, Clone)]
pub struct ModelReady {
    pub name: String,
    pub version: u32,
    pub warmup: Duration,
}

/// The port a model runtime implements. One instance lives on one worker thread and runs
/// `forward` for every model of the repository on one device.
pub trait InferenceBackend {
    /// Run one batch of model `model` (an index into the specs the backend was created with).
    fn run(&mut self, model: usize, batch: &BatchInput<'_>) -> Result<BatchOutput, BackendError>;
}

/// Makes backends. Called on the worker's own thread, so a backend need not be `Send`.
pub trait BackendFactory: Send + Sync + 'static {
    /// Load every model in `specs` onto `device` and warm each up.
    fn create(
        &self,
        device: Device,
        specs: &[ModelSpec],
    ) -> Result<(Box<dyn InferenceBackend>, Vec<ModelReady>), BackendError>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::BatchPolicy;

    #[test]
    fn an_events_due_time_is_its_event_time_plus_the_budget_and_never_later_than_now_plus_it() {
        let ms = Duration::from_millis;
        let (now_us, before) = (crate::partition::unix_micros(), Instant::now());
        let recent = due_at(now_us - 10_000, ms(30));
        let old = due_at(now_us - 60_000, ms(30));
        let ahead = due_at(now_us + 60_000_000, ms(30));
        let after = Instant::now();
        assert!(recent >= before + ms(19) && recent <= after + ms(20), "{:?}", recent - before);
        assert!(old <= after, "past its budget: due now");
        assert!(ahead >= before + ms(30) && ahead <= after + ms(30), "an event time ahead counts as now");
        let mut rows = InferRows::default();
        rows.due_by(after);
        rows.due_by(before);
        rows.due_by(after);
        assert_eq!(rows.due, Some(before), "the earliest row's");
    }

    fn spec(state_size: usize) -> ModelSpec {
        ModelSpec {
            name: "m".into(),
            version: 1,
            description: String::new(),
            feature_count: 3,
            state_size,
            batch: BatchPolicy::unbatched(),
            warmup_batch_sizes: vec![],
            feature_range: None,
            max_steps: 1,
        }
    }

    fn req(features: Vec<f32>, state: Option<Vec<f32>>) -> InferRequest {
        InferRequest { model: "m".into(), features, state }
    }

    #[test]
    fn bad_requests_are_rejected_with_their_reason() {
        let s = spec(2);
        assert!(validate(&s, &req(vec![1.0; 3], Some(vec![0.0; 2]))).is_ok());
        assert!(validate(&s, &req(vec![1.0; 3], None)).is_ok());
        assert_eq!(
            validate(&s, &req(vec![1.0; 4], None)),
            Err(InferError::Shape { model: "m".into(), input: "features", expected: 3, got: 4 })
        );
        assert_eq!(
            validate(&s, &req(vec![1.0; 3], Some(vec![0.0; 5]))),
            Err(InferError::Shape { model: "m".into(), input: "state", expected: 2, got: 5 })
        );
        let e = validate(&s, &req(vec![1.0, f32::NAN, 0.0], None)).unwrap_err();
        assert!(matches!(e, InferError::ValueRange { input: "features", index: 1, .. }), "{e}");
        let e = validate(&s, &req(vec![1.0; 3], Some(vec![f32::INFINITY, 0.0]))).unwrap_err();
        assert!(matches!(e, InferError::ValueRange { input: "state", index: 0, .. }), "{e}");
        assert!(e.is_bad_request());
        let e = validate(&spec(0), &req(vec![1.0; 3], Some(vec![0.0]))).unwrap_err();
        assert!(matches!(e, InferError::Shape { input: "state", expected: 0, .. }), "{e}");
    }
}
