//! Model configuration (Triton-style `config.toml`) and the validated [`ModelSpec`] the workers and
//! the router use.
//!
//! partita's model contract is fixed and checked here, once, when a repository loads:
//!
//! * inputs: `features [F]`, then `state [H]` when the model is stateful (`[state] size = H`);
//! * outputs: `score []` (one scalar per row), then `new_state [H]` when stateful;
//! * data type `fp32` only;
//! * optionally, for a stateful model, the **sequence form** (`[sequence] max_steps = T`): a
//!   TorchScript method `forward_sequence(features [B, S, F], state [B, H]) -> (score [B, S],
//!   new_state [B, H])` that applies `S <= T` events of each row in order, as `S` calls of
//!   `forward` would. A key's backlog is then scored in one pass (docs/pipeline.md, "A key's
//!   backlog in one pass").
//!
//! A batch dimension is implicit, as in Triton (`max_batch_size > 0`).

use std::time::Duration;

use serde::Deserialize;

/// The parsed `config.toml` of one model, before validation.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub name: String,
    /// Only `torchscript` is served today.
    pub platform: String,
    #[serde(default)]
    pub description: String,
    /// Largest batch one `forward` call receives.
    pub max_batch_size: usize,
    #[serde(default)]
    pub state: Option<StateConfig>,
    pub input: Vec<TensorConfig>,
    pub output: Vec<TensorConfig>,
    #[serde(default)]
    pub dynamic_batching: Option<DynamicBatchingConfig>,
    #[serde(default)]
    pub warmup: WarmupConfig,
    #[serde(default)]
    pub sequence: Option<SequenceConfig>,
}

/// The optional sequence form of a stateful model.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SequenceConfig {
    /// Most events of one row in one `forward_sequence` call (at least 2).
    pub max_steps: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// Number of f32 values of per-key state.
    pub size: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorConfig {
    pub name: String,
    pub data_type: String,
    /// Shape of one row, without the batch dimension.
    pub dims: Vec<usize>,
    /// `features` only: the range `[min, max]` every value must lie in (RELIABILITY's
    /// "out-of-range features"); none by default (any finite value).
    #[serde(default)]
    pub range: Option<[f32; 2]>,
    /// `features` only: what to do with a value outside `range`.
    #[serde(default)]
    pub out_of_range: OutOfRange,
}

/// What happens to an event whose features lie outside the model's `range`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutOfRange {
    /// Dead-letter it `VALUE_RANGE`.
    #[default]
    Reject,
    /// Clamp each value into the range and score it (counted).
    Clamp,
}

/// The validated feature range of a model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FeatureRange {
    pub min: f32,
    pub max: f32,
    pub on_violation: OutOfRange,
}

/// Triton's dynamic batcher knobs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DynamicBatchingConfig {
    #[serde(default)]
    pub preferred_batch_size: Vec<usize>,
    #[serde(with = "humantime_serde")]
    pub max_queue_delay: Duration,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarmupConfig {
    /// Batch sizes run once each at load so the first real request does not pay for lazy init.
    #[serde(default)]
    pub batch_sizes: Vec<usize>,
}

/// Batching policy of one model on one worker; see [`crate::batcher::Batcher`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchPolicy {
    pub max_batch_size: usize,
    /// Sorted ascending, each `<= max_batch_size`. Empty means "batch up to `max_batch_size`".
    pub preferred_batch_sizes: Vec<usize>,
    pub max_queue_delay: Duration,
}

impl BatchPolicy {
    /// One request per `forward`, no waiting: the "batching off" baseline.
    pub fn unbatched() -> Self {
        Self { max_batch_size: 1, preferred_batch_sizes: Vec::new(), max_queue_delay: Duration::ZERO }
    }

    /// The queue length at which a batch runs without waiting for the delay.
    pub fn target(&self) -> usize {
        self.preferred_batch_sizes.last().copied().unwrap_or(self.max_batch_size).min(self.max_batch_size)
    }
}

/// A validated model: what the router checks requests against and the worker batches by.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub name: String,
    pub version: u32,
    pub description: String,
    /// Values per row of the `features` input.
    pub feature_count: usize,
    /// Values per row of per-key state; 0 for a stateless model.
    pub state_size: usize,
    pub batch: BatchPolicy,
    pub warmup_batch_sizes: Vec<usize>,
    /// Bounds on every feature value, when the config sets them.
    pub feature_range: Option<FeatureRange>,
    /// Most events of one row in the sequence form; 1 when the model has none (each event is a
    /// row of its own).
    pub max_steps: usize,
}

impl ModelSpec {
    pub fn is_stateful(&self) -> bool {
        self.state_size > 0
    }

    /// Whether rows of `steps` events are served: 1 always, more up to `max_steps`.
    pub fn takes_steps(&self, steps: usize) -> bool {
        (1..=self.max_steps).contains(&steps)
    }
}

/// Why a model configuration is invalid. Each is reported with the model's name and path by the
/// repository loader; the node refuses to start (fix the config).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelConfigError {
    #[error("invalid TOML: {0}")]
    Toml(String),
    #[error("unsupported platform {0:?} (supported: \"torchscript\")")]
    Platform(String),
    #[error("max_batch_size must be at least 1")]
    MaxBatchSize,
    #[error("{tensor}: unsupported data_type {data_type:?} (supported: \"fp32\")")]
    DataType { tensor: String, data_type: String },
    #[error("{0}")]
    Contract(String),
    #[error("dynamic_batching: preferred_batch_size {0} must be between 1 and max_batch_size")]
    PreferredBatchSize(usize),
    #[error("warmup: batch size {0} must be between 1 and max_batch_size")]
    WarmupBatchSize(usize),
    #[error("sequence: max_steps must be at least 2, and the model stateful")]
    Sequence,
    #[error("config name {config:?} does not match its directory {dir:?}")]
    NameMismatch { config: String, dir: String },
}

impl ModelConfig {
    pub fn parse(text: &str) -> Result<Self, ModelConfigError> {
        toml::from_str(text).map_err(|e| ModelConfigError::Toml(e.message().to_owned()))
    }

    /// Check the config against partita's model contract and turn it into a [`ModelSpec`].
    /// Returns every problem found, not only the first.
    pub fn validate(&self, version: u32) -> Result<ModelSpec, Vec<ModelConfigError>> {
        let mut errors = Vec::new();
        if self.platform != "torchscript" {
            errors.push(ModelConfigError::Platform(self.platform.clone()));
        }
        if self.max_batch_size == 0 {
            errors.push(ModelConfigError::MaxBatchSize);
        }
        for t in self.input.iter().chain(&self.output) {
            if t.data_type != "fp32" {
                errors.push(ModelConfigError::DataType {
                    tensor: t.name.clone(),
                    data_type: t.data_type.clone(),
                });
            }
        }
        let state_size = self.state.as_ref().map_or(0, |s| s.size);
        let contract = |msg: String| ModelConfigError::Contract(msg);
        let expect =
            |list: &[TensorConfig], idx: usize, name: &str, dims: &[usize], what: &str| match list.get(idx) {
                Some(t) if t.name == name && t.dims == dims => None,
                Some(t) => Some(contract(format!(
                    "{what} {idx} must be {name:?} with dims {dims:?}, found {:?} with dims {:?}",
                    t.name, t.dims
                ))),
                None => Some(contract(format!("{what} {idx} must be {name:?} with dims {dims:?}, missing"))),
            };
        let feature_count = match self.input.first() {
            Some(t) if t.name == "features" && t.dims.len() == 1 && t.dims[0] > 0 => t.dims[0],
            _ => {
                errors.push(contract("input 0 must be \"features\" with dims [F], F > 0".into()));
                0
            }
        };
        let feature_range = match self.input.first().and_then(|t| t.range.map(|r| (r, t.out_of_range))) {
            Some(([min, max], on_violation)) if min.is_finite() && max.is_finite() && min < max => {
                Some(FeatureRange { min, max, on_violation })
            }
            Some(([min, max], _)) => {
                errors
                    .push(contract(format!("features: range [{min}, {max}] must be finite with min < max")));
                None
            }
            None => None,
        };
        for t in self.input.iter().skip(1).chain(&self.output) {
            if t.range.is_some() || t.out_of_range != OutOfRange::Reject {
                errors
                    .push(contract(format!("{}: range and out_of_range apply to \"features\" only", t.name)));
            }
        }
        let (n_in, n_out) = if state_size > 0 { (2, 2) } else { (1, 1) };
        if state_size > 0 {
            errors.extend(expect(&self.input, 1, "state", &[state_size], "input"));
            errors.extend(expect(&self.output, 1, "new_state", &[state_size], "output"));
        }
        errors.extend(expect(&self.output, 0, "score", &[], "output"));
        if self.input.len() != n_in || self.output.len() != n_out {
            errors.push(contract(format!(
                "a {} model has {n_in} input(s) and {n_out} output(s), found {} and {}",
                if state_size > 0 { "stateful" } else { "stateless" },
                self.input.len(),
                self.output.len()
            )));
        }
        let (mut preferred, delay) = match &self.dynamic_batching {
            Some(d) => (d.preferred_batch_size.clone(), d.max_queue_delay),
            None => (Vec::new(), Duration::ZERO),
        };
        preferred.sort_unstable();
        preferred.dedup();
        for &p in &preferred {
            if p == 0 || p > self.max_batch_size {
                errors.push(ModelConfigError::PreferredBatchSize(p));
            }
        }
        for &w in &self.warmup.batch_sizes {
            if w == 0 || w > self.max_batch_size {
                errors.push(ModelConfigError::WarmupBatchSize(w));
            }
        }
        let max_steps = match &self.sequence {
            None => 1,
            Some(s) if s.max_steps >= 2 && state_size > 0 => s.max_steps,
            Some(_) => {
                errors.push(ModelConfigError::Sequence);
                1
            }
        };
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(ModelSpec {
            name: self.name.clone(),
            version,
            description: self.description.clone(),
            feature_count,
            state_size,
            batch: BatchPolicy {
                max_batch_size: self.max_batch_size,
                preferred_batch_sizes: preferred,
                max_queue_delay: delay,
            },
            warmup_batch_sizes: self.warmup.batch_sizes.clone(),
            feature_range,
            max_steps,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRU: &str = r#"
        name = "m"
        platform = "torchscript"
        max_batch_size = 8
        [state]
        size = 4
        [[input]]
        name = "features"
        data_type = "fp32"
        dims = [3]
        [[input]]
        name = "state"
        data_type = "fp32"
        dims = [4]
        [[output]]
        name = "score"
        data_type = "fp32"
        dims = []
        [[output]]
        name = "new_state"
        data_type = "fp32"
        dims = [4]
        [dynamic_batching]
        preferred_batch_size = [4, 2]
        max_queue_delay = "2ms"
    "#;

    #[test]
    fn valid_stateful_config() {
        let spec = ModelConfig::parse(GRU).unwrap().validate(3).unwrap();
        assert_eq!(spec.feature_count, 3);
        assert_eq!(spec.state_size, 4);
        assert_eq!(spec.version, 3);
        assert_eq!(spec.batch.preferred_batch_sizes, vec![2, 4]);
        assert_eq!(spec.batch.max_queue_delay, Duration::from_millis(2));
        assert_eq!(spec.batch.target(), 4);
        assert_eq!(spec.max_steps, 1);
        assert!(spec.takes_steps(1) && !spec.takes_steps(2));
    }

    #[test]
    fn the_sequence_form_is_read_and_checked() {
        let spec =
            ModelConfig::parse(&format!("{GRU}\n[sequence]\nmax_steps = 32")).unwrap().validate(1).unwrap();
        assert_eq!(spec.max_steps, 32);
        assert!(spec.takes_steps(1) && spec.takes_steps(32) && !spec.takes_steps(33) && !spec.takes_steps(0));
        let one = ModelConfig::parse(&format!("{GRU}\n[sequence]\nmax_steps = 1")).unwrap().validate(1);
        assert_eq!(one.unwrap_err(), vec![ModelConfigError::Sequence]);
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = ModelConfig::parse(&format!("{GRU}\nmax_bach_size = 3")).unwrap_err();
        assert!(err.to_string().contains("max_bach_size"), "{err}");
    }

    #[test]
    fn every_error_is_reported() {
        let bad = GRU
            .replace("max_batch_size = 8", "max_batch_size = 2")
            .replace("platform = \"torchscript\"", "platform = \"onnx\"")
            .replace("name = \"new_state\"", "name = \"h\"");
        let errors = ModelConfig::parse(&bad).unwrap().validate(1).unwrap_err();
        assert!(errors.contains(&ModelConfigError::Platform("onnx".into())), "{errors:?}");
        assert!(errors.contains(&ModelConfigError::PreferredBatchSize(4)), "{errors:?}");
        assert!(errors.iter().any(|e| e.to_string().contains("\"new_state\"")), "{errors:?}");
        assert_eq!(errors.len(), 3, "{errors:?}");
    }

    #[test]
    fn state_input_must_match_state_size() {
        let bad = GRU.replace("dims = [4]\n        [[output]]", "dims = [5]\n        [[output]]");
        let errors = ModelConfig::parse(&bad).unwrap().validate(1).unwrap_err();
        assert!(errors[0].to_string().contains("input 1 must be \"state\""), "{errors:?}");
    }

    #[test]
    fn a_feature_range_is_read_and_checked() {
        let ranged = GRU.replacen(
            "dims = [3]",
            "dims = [3]\n        range = [-5.0, 5.0]\n        out_of_range = \"clamp\"",
            1,
        );
        let spec = ModelConfig::parse(&ranged).unwrap().validate(1).unwrap();
        assert_eq!(
            spec.feature_range,
            Some(FeatureRange { min: -5.0, max: 5.0, on_violation: OutOfRange::Clamp })
        );
        assert_eq!(ModelConfig::parse(GRU).unwrap().validate(1).unwrap().feature_range, None);
        let inverted = GRU.replacen("dims = [3]", "dims = [3]\n        range = [5.0, -5.0]", 1);
        let errors = ModelConfig::parse(&inverted).unwrap().validate(1).unwrap_err();
        assert!(errors[0].to_string().contains("min < max"), "{errors:?}");
        let on_state = GRU.replacen("dims = [4]", "dims = [4]\n        range = [0.0, 1.0]", 1);
        let errors = ModelConfig::parse(&on_state).unwrap().validate(1).unwrap_err();
        assert!(errors[0].to_string().contains("\"features\" only"), "{errors:?}");
    }

    #[test]
    fn without_dynamic_batching_runs_whatever_is_queued() {
        let cfg = GRU.split("[dynamic_batching]").next().unwrap();
        let spec = ModelConfig::parse(cfg).unwrap().validate(1).unwrap();
        assert_eq!(spec.batch.max_queue_delay, Duration::ZERO);
        assert_eq!(spec.batch.target(), 8);
    }
}
