//! The LibTorch adapter behind the inference port: TorchScript models run through tch.

use std::path::PathBuf;
use std::time::Instant;

use partita_actors::inference::{
    BackendError, BackendFactory, BatchInput, BatchOutput, Device, InferenceBackend, ModelReady,
};
use partita_actors::model::ModelSpec;
use tch::{CModule, IValue, Kind, TchError, Tensor};

use super::affinity::{CpuList, pin_current_thread};

/// Loads the repository's TorchScript files onto a worker's device.
#[derive(Debug, Clone)]
pub struct TchFactory {
    /// `model.pt` of each spec, in the same order as the specs the pool is started with.
    paths: Vec<PathBuf>,
    /// Cores the worker threads are pinned to (empty: not pinned).
    cores: CpuList,
}

impl TchFactory {
    pub fn new(paths: Vec<PathBuf>) -> Self {
        Self { paths, cores: CpuList::default() }
    }

    /// Pin each worker's threads to `cores` (its device thread, when it creates the backend; the
    /// threads it starts after inherit the mask).
    pub fn pinned_to(mut self, cores: CpuList) -> Self {
        self.cores = cores;
        self
    }
}

/// CUDA devices libtorch sees (0 without a GPU or with a CPU-only libtorch).
pub fn cuda_device_count() -> usize {
    if tch::Cuda::is_available() { usize::try_from(tch::Cuda::device_count()).unwrap_or(0) } else { 0 }
}

/// Threads libtorch uses inside one operator (intra-op), process-wide.
pub fn set_intra_op_threads(n: usize) {
    tch::set_num_threads(i32::try_from(n.max(1)).unwrap_or(i32::MAX));
}

/// The libtorch device of a partita [`Device`].
pub fn tch_device(device: Device) -> tch::Device {
    match device {
        Device::Cpu => tch::Device::Cpu,
        Device::Cuda(i) => tch::Device::Cuda(i),
    }
}

struct Loaded {
    module: CModule,
    features: i64,
    state: i64,
}

/// One worker's models on one device. Lives on the worker's OS thread.
pub struct TchBackend {
    device: tch::Device,
    models: Vec<Loaded>,
}

impl BackendFactory for TchFactory {
    fn create(
        &self,
        device: Device,
        specs: &[ModelSpec],
    ) -> Result<(Box<dyn InferenceBackend>, Vec<ModelReady>), BackendError> {
        if !self.cores.is_empty() {
            pin_current_thread(&self.cores).map_err(|e| {
                BackendError::Fatal(format!("pinning the worker to cores {}: {e}", self.cores))
            })?;
        }
        let tdev = tch_device(device);
        let mut backend = TchBackend { device: tdev, models: Vec::with_capacity(specs.len()) };
        let mut ready = Vec::with_capacity(specs.len());
        for (i, spec) in specs.iter().enumerate() {
            let load_err = |detail: String| BackendError::Load { model: spec.name.clone(), detail };
            let path = self.paths.get(i).ok_or_else(|| load_err("no model file given".into()))?;
            let started = Instant::now();
            let mut module = CModule::load_on_device(path, tdev)
                .map_err(|e| load_err(format!("{}: {}", path.display(), first_line(&e))))?;
            module.set_eval();
            backend.models.push(Loaded {
                module,
                features: to_i64(spec.feature_count),
                state: to_i64(spec.state_size),
            });
            // Warm up: run each configured batch size once, and check the outputs' shapes, so a
            // model that does not honour the contract fails here rather than on live traffic.
            for &rows in &spec.warmup_batch_sizes {
                let features = vec![0.0; rows * spec.feature_count];
                let state = vec![0.0; rows * spec.state_size];
                let out = backend
                    .run(i, &BatchInput { rows, steps: 1, features: &features, state: &state })
                    .map_err(|e| load_err(format!("warm-up with batch {rows}: {e}")))?;
                if out.scores.len() != rows || out.new_state.len() != rows * spec.state_size {
                    return Err(load_err(format!(
                        "warm-up with batch {rows}: got {} scores and {} state values, expected {rows} and {}",
                        out.scores.len(),
                        out.new_state.len(),
                        rows * spec.state_size
                    )));
                }
            }
            // The sequence form: its method must exist and answer in shape, checked here too.
            if spec.max_steps > 1 {
                let steps = spec.max_steps.min(2);
                let features = vec![0.0; steps * spec.feature_count];
                let state = vec![0.0; spec.state_size];
                let out = backend
                    .run(i, &BatchInput { rows: 1, steps, features: &features, state: &state })
                    .map_err(|e| {
                        load_err(format!("warm-up of forward_sequence ([sequence] max_steps): {e}"))
                    })?;
                if out.scores.len() != steps || out.new_state.len() != spec.state_size {
                    return Err(load_err(format!(
                        "warm-up of forward_sequence with {steps} steps: got {} scores and {} state values, expected {steps} and {}",
                        out.scores.len(),
                        out.new_state.len(),
                        spec.state_size
                    )));
                }
            }
            ready.push(ModelReady {
                name: spec.name.clone(),
                version: spec.version,
                warmup: started.elapsed(),
            });
        }
        Ok((Box::new(backend), ready))
    }
}

impl InferenceBackend for TchBackend {
    fn run(&mut self, model: usize, batch: &BatchInput<'_>) -> Result<BatchOutput, BackendError> {
        let m = &self.models[model];
        self.forward(m, batch).map_err(classify)
    }
}

impl TchBackend {
    fn forward(&self, m: &Loaded, batch: &BatchInput<'_>) -> Result<BatchOutput, TchError> {
        let _no_grad = tch::no_grad_guard();
        let rows = to_i64(batch.rows);
        let features = Tensor::f_from_slice(batch.features)?;
        if batch.steps > 1 {
            // The sequence form (stateful models only: checked when the config loads).
            let features =
                features.f_view([rows, to_i64(batch.steps), m.features])?.f_to_device(self.device)?;
            let state =
                Tensor::f_from_slice(batch.state)?.f_view([rows, m.state])?.f_to_device(self.device)?;
            let out =
                m.module.method_is("forward_sequence", &[IValue::Tensor(features), IValue::Tensor(state)])?;
            return pair(out);
        }
        let features = features.f_view([rows, m.features])?.f_to_device(self.device)?;
        if m.state == 0 {
            let score = m.module.forward_ts(&[features])?;
            return Ok(BatchOutput { scores: to_vec(&score)?, new_state: Vec::new() });
        }
        let state = Tensor::f_from_slice(batch.state)?.f_view([rows, m.state])?.f_to_device(self.device)?;
        pair(m.module.forward_is(&[IValue::Tensor(features), IValue::Tensor(state)])?)
    }
}

/// A stateful model's `(score, new_state)` answer.
fn pair(out: IValue) -> Result<BatchOutput, TchError> {
    match out {
        IValue::Tuple(mut out) if out.len() == 2 => match (out.pop(), out.pop()) {
            (Some(IValue::Tensor(new_state)), Some(IValue::Tensor(score))) => {
                Ok(BatchOutput { scores: to_vec(&score)?, new_state: to_vec(&new_state)? })
            }
            _ => Err(TchError::Kind("model must return (score, new_state) tensors".into())),
        },
        _ => Err(TchError::Kind("model must return a (score, new_state) tuple".into())),
    }
}

fn to_vec(t: &Tensor) -> Result<Vec<f32>, TchError> {
    let flat = t.f_to_device(tch::Device::Cpu)?.f_to_kind(Kind::Float)?.f_contiguous()?.f_view([-1])?;
    Vec::<f32>::try_from(&flat)
}

/// A CUDA error leaves the device unusable: the worker must restart. Anything else fails the batch.
fn classify(e: TchError) -> BackendError {
    let msg = first_line(&e);
    if msg.contains("CUDA error") { BackendError::Fatal(msg) } else { BackendError::Batch(msg) }
}

/// libtorch errors carry a TorchScript traceback and a C++ backtrace; logs and replies need the
/// summary line and, for TorchScript, the raised error (`RuntimeError: ...`), not the frames.
fn first_line(e: &TchError) -> String {
    let text = e.to_string();
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let head = lines.next().unwrap_or_default().to_owned();
    let raised = text
        .lines()
        .map(str::trim)
        .find(|l| l.contains("Error: ") || l.starts_with("Exception: ") || l.starts_with("builtins."));
    match raised {
        Some(r) if r != head => format!("{head} {r}"),
        _ => head,
    }
}

fn to_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
