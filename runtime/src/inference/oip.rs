//! The Open Inference Protocol (KServe V2) gRPC service, `inference.GRPCInferenceService`, over
//! the node's worker pool: what a worker node serves, so that Triton's `tritonclient` and
//! `perf_analyzer`, KServe, and partita's scorer nodes call it alike.
//!
//! Triton's `ModelConfig` extension is answered too (name, max batch size, inputs, outputs,
//! dynamic batching), because Triton's load tool `perf_analyzer` will not start without it.
//!
//! A model's inputs are `features` (FP32 `[-1, feature_count]`) and, for a stateful model,
//! `state` (FP32 `[-1, state_size]`, the keys' states before their events: an ordinary input);
//! its outputs are `score` (FP32 `[-1]`) and, for a stateful model, `new_state` (FP32
//! `[-1, state_size]`). Values come typed (`contents.fp32_contents`) or raw
//! (`raw_input_contents`, little-endian) and are answered raw, as Triton answers.
//!
//! A request's rows go to the pool as one wave ([`Router::infer_rows_within`]): batched with
//! other callers' rows, a row that fails run alone without sinking the others. OIP has no
//! per-row answer, so a request with a failed row fails whole, naming the row. Status codes:
//!
//! | what | code |
//! |---|---|
//! | unknown model, or a version that is not loaded | `NOT_FOUND` |
//! | wrong inputs, datatype, shape or size; a value not finite | `INVALID_ARGUMENT` |
//! | the model runtime failed or panicked on the row | `INTERNAL` |
//! | pool full, models loading, node draining: nothing ran | `UNAVAILABLE` (retry elsewhere) |
//! | the row's worker died running it and its retries ran out | `ABORTED` |
//! | not scored within the deadline counted from its batch's start | `DEADLINE_EXCEEDED` |
//!
//! A call's `traceparent` metadata parents its `partita.infer` span (a scorer's batch span).
//!
//! The caller's gRPC deadline (`grpc-timeout`) is enforced by the server: the call is dropped
//! when it passes, and rows still queued are withdrawn.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use partita_actors::inference::{InferError, InferRows, RowAnswer, RowsOutput, check_finite};
use partita_actors::model::ModelSpec;
use partita_actors::pool::Router;
use partita_proto::inference::grpc_inference_service_server::{
    GrpcInferenceService, GrpcInferenceServiceServer,
};
use partita_proto::inference::model_infer_request::InferInputTensor;
use partita_proto::inference::model_infer_response::InferOutputTensor;
use partita_proto::inference::model_metadata_response::TensorMetadata;
use partita_proto::inference::*;
use tonic::{Request, Response, Status};
use tracing::Instrument as _;

use crate::telemetry::{Health, Metrics};

/// The platform a model is reported as: Triton's name for a TorchScript model.
pub const PLATFORM: &str = "pytorch_libtorch";
const FP32: &str = "FP32";

/// The service; cheap to clone. Answers `UNAVAILABLE` to inference until [`Oip::set_router`]
/// (the pool starts after the gRPC port is open, so probes get an answer during warm-up).
#[derive(Clone, Debug)]
pub struct Oip {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    router: OnceLock<Router>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    /// Rows not scored within this of their batch's start are `DEADLINE_EXCEEDED`.
    deadline: Duration,
    /// `ModelInfer` calls being answered (a draining node waits for them).
    in_flight: AtomicUsize,
}

impl Oip {
    pub fn new(health: Arc<Health>, metrics: Arc<Metrics>, deadline: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                router: OnceLock::new(),
                health,
                metrics,
                deadline,
                in_flight: AtomicUsize::new(0),
            }),
        }
    }

    /// Serve inference on the pool behind `router` from now on.
    pub fn set_router(&self, router: Router) {
        let _ = self.inner.router.set(router);
    }

    /// `ModelInfer` calls being answered now.
    pub fn in_flight(&self) -> usize {
        self.inner.in_flight.load(Ordering::SeqCst)
    }

    /// The tonic service (with the message size limit, both ways).
    pub fn service(&self, max_message_size: usize) -> GrpcInferenceServiceServer<Self> {
        GrpcInferenceServiceServer::new(self.clone())
            .max_decoding_message_size(max_message_size)
            .max_encoding_message_size(max_message_size)
    }

    fn router(&self) -> Result<&Router, Status> {
        self.inner.router.get().ok_or_else(|| Status::unavailable("models loading"))
    }

    fn spec<'a>(router: &'a Router, name: &str, version: &str) -> Result<&'a ModelSpec, Status> {
        let spec = router.model(name).ok_or_else(|| Status::not_found(format!("unknown model {name:?}")))?;
        if !version.is_empty() && version != spec.version.to_string() {
            return Err(Status::not_found(format!(
                "version {version:?} of model {name:?} is not loaded (loaded: {})",
                spec.version
            )));
        }
        Ok(spec)
    }

    async fn infer(&self, req: ModelInferRequest) -> Result<ModelInferResponse, Status> {
        if self.inner.health.draining.load(Ordering::SeqCst) {
            return Err(Status::unavailable("the node is draining"));
        }
        let router = self.router()?;
        let spec = Self::spec(router, &req.model_name, &req.model_version)?;
        let outputs = requested_outputs(spec, &req)?;
        let rows = Arc::new(rows_from(spec, &req)?);
        let n = rows.rows;
        // A partita scorer sends its partition's deadline; other clients get the node's.
        let deadline = match req
            .parameters
            .get(crate::inference::remote::DEADLINE_US)
            .and_then(|p| p.parameter_choice.clone())
        {
            Some(infer_parameter::ParameterChoice::Int64Param(us)) if us > 0 => {
                Duration::from_micros(us.unsigned_abs())
            }
            _ => self.inner.deadline,
        };
        let answer = router.infer_rows_within(&spec.name, rows, deadline).await;
        for a in &answer.answers {
            if let RowAnswer::Scored(served) = a {
                self.inner.metrics.inferred(&spec.name, served);
            }
        }
        check_rows(&answer, deadline)?;
        let first = answer.answers.iter().find_map(|a| match a {
            RowAnswer::Scored(served) => Some(served),
            _ => None,
        });
        let mut response = ModelInferResponse {
            model_name: spec.name.clone(),
            model_version: spec.version.to_string(),
            id: req.id,
            parameters: first.map(crate::inference::remote::served_parameters).unwrap_or_default(),
            ..Default::default()
        };
        for name in outputs {
            let (shape, values): (Vec<usize>, &[f32]) = match name {
                "score" if answer.steps > 1 => (vec![n, answer.steps], &answer.scores),
                "score" => (vec![n], &answer.scores),
                _ => (vec![n, spec.state_size], &answer.new_state),
            };
            response.outputs.push(InferOutputTensor {
                name: name.to_owned(),
                datatype: FP32.to_owned(),
                shape: shape.iter().map(|&d| d as i64).collect(),
                ..Default::default()
            });
            response.raw_output_contents.push(values.iter().flat_map(|v| v.to_le_bytes()).collect());
        }
        Ok(response)
    }
}

/// The model's inputs and outputs with their shapes (`-1`: the batch).
fn tensors(spec: &ModelSpec) -> (Vec<TensorMetadata>, Vec<TensorMetadata>) {
    let t = |name: &str, shape: Vec<i64>| TensorMetadata {
        name: name.to_owned(),
        datatype: FP32.to_owned(),
        shape,
    };
    let h = spec.state_size as i64;
    let mut inputs = vec![t("features", vec![-1, spec.feature_count as i64])];
    let mut outputs = vec![t("score", vec![-1])];
    if spec.is_stateful() {
        inputs.push(t("state", vec![-1, h]));
        outputs.push(t("new_state", vec![-1, h]));
    }
    (inputs, outputs)
}

/// Triton's `ModelConfig` of a model (what perf_analyzer reads): dims without the batch.
fn model_config(spec: &ModelSpec) -> ModelConfig {
    let (inputs, outputs) = tensors(spec);
    let dims = |t: &TensorMetadata| t.shape[1..].to_vec();
    let fp32 = DataType::TypeFp32 as i32;
    ModelConfig {
        name: spec.name.clone(),
        platform: PLATFORM.into(),
        backend: "pytorch".into(),
        max_batch_size: i32::try_from(spec.batch.max_batch_size).unwrap_or(i32::MAX),
        input: inputs
            .iter()
            .map(|t| ModelInput { name: t.name.clone(), data_type: fp32, dims: dims(t) })
            .collect(),
        output: outputs
            .iter()
            .map(|t| ModelOutput { name: t.name.clone(), data_type: fp32, dims: dims(t) })
            .collect(),
        dynamic_batching: Some(ModelDynamicBatching {
            preferred_batch_size: spec.batch.preferred_batch_sizes.iter().map(|&b| b as i32).collect(),
            max_queue_delay_microseconds: u64::try_from(spec.batch.max_queue_delay.as_micros())
                .unwrap_or(u64::MAX),
        }),
    }
}

/// The outputs to answer, in the order asked (all of the model's when none is named).
fn requested_outputs(spec: &ModelSpec, req: &ModelInferRequest) -> Result<Vec<&'static str>, Status> {
    let all: &[&'static str] = if spec.is_stateful() { &["score", "new_state"] } else { &["score"] };
    if req.outputs.is_empty() {
        return Ok(all.to_vec());
    }
    req.outputs
        .iter()
        .map(|o| {
            all.iter().copied().find(|&name| name == o.name).ok_or_else(|| {
                Status::invalid_argument(format!(
                    "model {:?} has no output {:?} (outputs: {})",
                    spec.name,
                    o.name,
                    all.join(", ")
                ))
            })
        })
        .collect()
}

/// When the request's rows are due: its receipt + `partita_due_in_us`, within 0 (due now) and
/// the longest `[inference] slo` (no request waits longer for batch mates than a local one
/// could); `None` without the parameter.
fn due_of(req: &ModelInferRequest) -> Result<Option<Instant>, Status> {
    let Some(p) = req.parameters.get(crate::inference::remote::DUE_IN_US) else { return Ok(None) };
    match p.parameter_choice {
        Some(infer_parameter::ParameterChoice::Int64Param(us)) => {
            let left = Duration::from_micros(us.max(0).unsigned_abs()).min(crate::inference::MAX_SLO);
            Ok(Some(Instant::now() + left))
        }
        _ => Err(Status::invalid_argument(format!(
            "parameter {:?} must be an int64 (microseconds until the rows are due)",
            crate::inference::remote::DUE_IN_US
        ))),
    }
}

/// The request's tensors as rows of `spec`: every input present once, FP32, `[rows, width]`
/// with the same `rows`, and exactly as many values as the shape says.
fn rows_from(spec: &ModelSpec, req: &ModelInferRequest) -> Result<InferRows, Status> {
    let bad = |m: String| Status::invalid_argument(m);
    let raw = !req.raw_input_contents.is_empty();
    if raw && req.raw_input_contents.len() != req.inputs.len() {
        return Err(bad(format!(
            "raw_input_contents has {} entries for {} inputs: one per input, in order",
            req.raw_input_contents.len(),
            req.inputs.len()
        )));
    }
    // (name, values per step, most steps)
    let mut wanted = vec![("features", spec.feature_count, spec.max_steps)];
    if spec.is_stateful() {
        wanted.push(("state", spec.state_size, 1));
    }
    let names = wanted.iter().map(|(n, ..)| *n).collect::<Vec<_>>().join(", ");
    for input in &req.inputs {
        if !wanted.iter().any(|(n, ..)| *n == input.name) {
            return Err(bad(format!(
                "model {:?} has no input {:?} (inputs: {names})",
                spec.name, input.name
            )));
        }
        if req.inputs.iter().filter(|i| i.name == input.name).count() > 1 {
            return Err(bad(format!("input {:?} is given more than once", input.name)));
        }
    }
    let (mut rows, mut steps): (Option<usize>, usize) = (None, 1);
    let mut values = Vec::with_capacity(wanted.len());
    for &(name, width, max_steps) in &wanted {
        let Some(k) = req.inputs.iter().position(|i| i.name == name) else {
            return Err(bad(format!("model {:?} needs input {name:?} (inputs: {names})", spec.name)));
        };
        let input = &req.inputs[k];
        let (n, t) = batch_of(input, width, max_steps)?;
        if name == "features" {
            steps = t;
        }
        if rows.is_some_and(|r| r != n) {
            return Err(bad(format!(
                "input {name:?} has {n} rows, the inputs before it {}",
                rows.unwrap_or_default()
            )));
        }
        rows = Some(n);
        // A shape whose size does not fit a usize (or its bytes) is refused, not multiplied.
        let count = n.checked_mul(t * width).filter(|c| c.checked_mul(4).is_some()).ok_or_else(|| {
            bad(format!("input {name:?} has shape {:?}: more values than any request holds", input.shape))
        })?;
        values.push(tensor_values(input, raw.then(|| req.raw_input_contents[k].as_slice()), count)?);
    }
    let mut values = values.into_iter();
    let rows = InferRows {
        rows: rows.unwrap_or_default(),
        steps,
        features: values.next().unwrap_or_default(),
        state: values.next().unwrap_or_default(),
        // A partita scorer's rows carry the time left to their due time; other clients' rows
        // get the model's fixed delay.
        due: due_of(req)?,
    };
    // A value that is not finite refuses the whole request before any row runs.
    for k in 0..rows.rows {
        let (features, state) = rows.row(spec, k);
        if let Err(e) = check_finite("features", features).and_then(|()| check_finite("state", state)) {
            return Err(status_of(&e, &format!("row {k}: ")));
        }
    }
    Ok(rows)
}

/// An input's rows and steps: FP32 of shape `[rows, width]` (one step), or `[rows, steps, width]`
/// with `2 <= steps <= max_steps` (a sequence model's features); `rows` at least 1.
fn batch_of(input: &InferInputTensor, width: usize, max_steps: usize) -> Result<(usize, usize), Status> {
    let name = &input.name;
    if input.datatype != FP32 {
        return Err(Status::invalid_argument(format!(
            "input {name:?} has datatype {:?}, the model takes FP32",
            input.datatype
        )));
    }
    let (rows, steps) = match input.shape[..] {
        [rows, w] if rows >= 1 && w == width as i64 => (rows, 1),
        [rows, steps, w] if rows >= 1 && w == width as i64 && (2..=max_steps as i64).contains(&steps) => {
            (rows, steps as usize)
        }
        _ if max_steps > 1 => {
            return Err(Status::invalid_argument(format!(
                "input {name:?} has shape {:?}, the model takes [rows, {width}] or [rows, steps, {width}] with rows >= 1 and 2 <= steps <= {max_steps}",
                input.shape
            )));
        }
        _ => {
            return Err(Status::invalid_argument(format!(
                "input {name:?} has shape {:?}, the model takes [rows, {width}] with rows >= 1",
                input.shape
            )));
        }
    };
    let rows = usize::try_from(rows)
        .map_err(|_| Status::invalid_argument(format!("input {name:?}: {rows} rows is too many")))?;
    Ok((rows, steps))
}

/// The `count` values of one input, from its raw bytes or its typed contents.
fn tensor_values(input: &InferInputTensor, raw: Option<&[u8]>, count: usize) -> Result<Vec<f32>, Status> {
    let name = &input.name;
    let got = match (raw, &input.contents) {
        (Some(_), Some(_)) => {
            return Err(Status::invalid_argument(format!(
                "input {name:?} has contents while the request uses raw_input_contents"
            )));
        }
        (Some(bytes), None) => {
            if bytes.len() != count * 4 {
                return Err(Status::invalid_argument(format!(
                    "input {name:?} has {} raw bytes, its shape {:?} needs {}",
                    bytes.len(),
                    input.shape,
                    count * 4
                )));
            }
            bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
        }
        (None, Some(c)) => c.fp32_contents.clone(),
        (None, None) => Vec::new(),
    };
    if got.len() != count {
        return Err(Status::invalid_argument(format!(
            "input {name:?} has {} values, its shape {:?} needs {count}",
            got.len(),
            input.shape
        )));
    }
    Ok(got)
}

/// OK when every row was scored; else the status of the first row that was not.
fn check_rows(answer: &RowsOutput, deadline: Duration) -> Result<(), Status> {
    let many = answer.len() > 1;
    for (k, a) in answer.answers.iter().enumerate() {
        let row = if many { format!("row {k}: ") } else { String::new() };
        match a {
            RowAnswer::Scored(_) => {}
            RowAnswer::Failed(e) => return Err(status_of(e, &row)),
            RowAnswer::TimedOut => {
                return Err(Status::deadline_exceeded(format!(
                    "{row}not scored within {deadline:?} of its batch's start"
                )));
            }
        }
    }
    Ok(())
}

/// The gRPC status for an inference error (the table in the module's documentation).
pub fn status_of(e: &InferError, row: &str) -> Status {
    let message = format!("{row}{e}");
    match e {
        InferError::UnknownModel { .. } => Status::not_found(message),
        InferError::Shape { .. } | InferError::Steps { .. } | InferError::ValueRange { .. } => {
            Status::invalid_argument(message)
        }
        InferError::Backend(_) | InferError::Panicked(_) => Status::internal(message),
        // The row ran and its worker died with it (maybe because of it): not "nothing ran", so a
        // scorer goes on row by row instead of trying the same rows elsewhere.
        InferError::WorkerLost { .. } => Status::aborted(message),
        InferError::Overloaded { .. } | InferError::ShuttingDown => Status::unavailable(message),
    }
}

/// Counts the call while it is answered.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn enter(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(count)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for Oip {
    async fn server_live(
        &self,
        _: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse { ready: self.inner.health.ready() }))
    }

    async fn model_ready(
        &self,
        req: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        let req = req.into_inner();
        let ready = self.inner.health.ready()
            && self.router().is_ok_and(|r| Self::spec(r, &req.name, &req.version).is_ok());
        Ok(Response::new(ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: "partita".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: vec![],
        }))
    }

    async fn model_metadata(
        &self,
        req: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let req = req.into_inner();
        let spec = Self::spec(self.router()?, &req.name, &req.version)?;
        let (inputs, outputs) = tensors(spec);
        Ok(Response::new(ModelMetadataResponse {
            name: spec.name.clone(),
            versions: vec![spec.version.to_string()],
            platform: PLATFORM.into(),
            inputs,
            outputs,
        }))
    }

    async fn model_config(
        &self,
        req: Request<ModelConfigRequest>,
    ) -> Result<Response<ModelConfigResponse>, Status> {
        let req = req.into_inner();
        let spec = Self::spec(self.router()?, &req.name, &req.version)?;
        Ok(Response::new(ModelConfigResponse { config: Some(model_config(spec)) }))
    }

    async fn model_infer(
        &self,
        req: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let _counted = InFlight::enter(&self.inner.in_flight);
        let started = Instant::now();
        let traceparent = req.metadata().get("traceparent").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let req = req.into_inner();
        let model = req.model_name.clone();
        let rows = req.inputs.first().and_then(|i| i.shape.first()).copied().unwrap_or(0);
        let span = crate::telemetry::traces::infer_span(
            traceparent.as_deref(),
            &model,
            usize::try_from(rows).unwrap_or(0),
        );
        let result = self.infer(req).instrument(span).await;
        let code = match &result {
            Ok(_) => tonic::Code::Ok,
            Err(s) => s.code(),
        };
        self.inner.metrics.oip_request(&model, code, started.elapsed());
        result.map(Response::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(state_size: usize) -> ModelSpec {
        ModelSpec {
            name: "m".into(),
            version: 2,
            description: String::new(),
            feature_count: 3,
            state_size,
            batch: partita_actors::model::BatchPolicy::unbatched(),
            warmup_batch_sizes: vec![],
            feature_range: None,
            max_steps: 1,
        }
    }

    fn input(name: &str, shape: &[i64], values: &[f32]) -> InferInputTensor {
        InferInputTensor {
            name: name.into(),
            datatype: FP32.into(),
            shape: shape.to_vec(),
            contents: Some(InferTensorContents { fp32_contents: values.to_vec(), ..Default::default() }),
            ..Default::default()
        }
    }

    fn request(inputs: Vec<InferInputTensor>) -> ModelInferRequest {
        ModelInferRequest { model_name: "m".into(), inputs, ..Default::default() }
    }

    fn refused(spec: &ModelSpec, req: &ModelInferRequest) -> String {
        let status = rows_from(spec, req).unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        status.message().to_owned()
    }

    #[test]
    fn typed_and_raw_inputs_give_the_same_rows_in_any_input_order() {
        let spec = spec(2);
        let features = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let state = [0.5, -0.5, 0.25, -0.25];
        let typed = request(vec![input("state", &[2, 2], &state), input("features", &[2, 3], &features)]);
        let rows = rows_from(&spec, &typed).unwrap();
        assert_eq!((rows.rows, &rows.features[..], &rows.state[..]), (2, &features[..], &state[..]));
        let mut raw = request(vec![input("features", &[2, 3], &[]), input("state", &[2, 2], &[])]);
        for i in &mut raw.inputs {
            i.contents = None;
        }
        raw.raw_input_contents = [&features[..], &state[..]]
            .iter()
            .map(|v| v.iter().flat_map(|x| x.to_le_bytes()).collect())
            .collect();
        assert_eq!(rows_from(&spec, &raw).unwrap(), rows);
    }

    #[test]
    fn a_scorers_due_time_crosses_the_hop_as_time_left_and_a_bad_one_is_refused() {
        let spec = spec(2);
        let rows_due = |due: Option<Instant>| InferRows {
            rows: 1,
            steps: 1,
            features: vec![1.0, 2.0, 3.0],
            state: vec![0.0, 0.0],
            due,
        };
        let hop = |due: Option<Instant>| {
            let req = crate::inference::remote::infer_request(&spec, &rows_due(due), None);
            rows_from(&spec, &req).unwrap().due
        };
        let before = Instant::now();
        let due = hop(Some(before + Duration::from_secs(2))).expect("a due time comes across");
        let after = Instant::now();
        assert!(
            due <= after + Duration::from_secs(2) && due >= before + Duration::from_millis(1900),
            "{:?}",
            due - before
        );
        assert_eq!(hop(None), None, "without one, the model's fixed delay");
        let passed = hop(Some(Instant::now() - Duration::from_secs(1))).unwrap();
        assert!(passed <= Instant::now(), "a due time already passed is due now");
        let far = hop(Some(Instant::now() + Duration::from_secs(36_000))).unwrap();
        assert!(far <= Instant::now() + crate::inference::MAX_SLO, "no longer than the longest slo");
        // With a deadline, at most the deadline: the scorer's call times out after 2 x it + 1 s.
        let capped = crate::inference::remote::infer_request(
            &spec,
            &rows_due(Some(Instant::now() + Duration::from_secs(2))),
            Some(Duration::from_millis(100)),
        );
        let due = rows_from(&spec, &capped).unwrap().due.unwrap();
        assert!(due <= Instant::now() + Duration::from_millis(100), "capped at the deadline");
        let mut bad = crate::inference::remote::infer_request(&spec, &rows_due(None), None);
        bad.parameters.insert(
            crate::inference::remote::DUE_IN_US.into(),
            InferParameter {
                parameter_choice: Some(infer_parameter::ParameterChoice::StringParam("soon".into())),
            },
        );
        assert!(refused(&spec, &bad).contains("partita_due_in_us"), "{}", refused(&spec, &bad));
    }

    #[test]
    fn a_sequence_models_features_may_have_steps_and_a_model_without_may_not() {
        let seq = ModelSpec { max_steps: 4, ..spec(2) };
        let features: Vec<f32> = (0..18).map(|v| v as f32).collect();
        let state = [0.5, -0.5, 0.25, -0.25, 1.0, 2.0];
        let req = request(vec![input("features", &[3, 2, 3], &features), input("state", &[3, 2], &state)]);
        let rows = rows_from(&seq, &req).unwrap();
        assert_eq!((rows.rows, rows.steps, rows.features.len(), rows.state.len()), (3, 2, 18, 6));
        assert_eq!(rows.row(&seq, 1).0, &features[6..12], "row 1: its 2 steps of 3 values");
        let too_many =
            request(vec![input("features", &[1, 5, 3], &[0.0; 15]), input("state", &[1, 2], &[0.0; 2])]);
        assert!(refused(&seq, &too_many).contains("2 <= steps <= 4"), "{}", refused(&seq, &too_many));
        assert!(
            refused(&spec(2), &req).contains("the model takes [rows, 3] with"),
            "{}",
            refused(&spec(2), &req)
        );
        let state_steps =
            request(vec![input("features", &[1, 2, 3], &[0.0; 6]), input("state", &[1, 2, 2], &[0.0; 4])]);
        assert!(refused(&seq, &state_steps).contains("\"state\" has shape [1, 2, 2]"));
    }

    #[test]
    fn malformed_inputs_are_refused_with_what_is_wrong() {
        let stateful = spec(2);
        let f = input("features", &[1, 3], &[1.0, 2.0, 3.0]);
        let s = input("state", &[1, 2], &[0.0, 0.0]);
        let cases: Vec<(ModelInferRequest, &str)> = vec![
            (request(vec![f.clone()]), "needs input \"state\""),
            (request(vec![f.clone(), s.clone(), input("extra", &[1, 1], &[0.0])]), "has no input \"extra\""),
            (request(vec![f.clone(), f.clone(), s.clone()]), "more than once"),
            (request(vec![input("features", &[1, 4], &[0.0; 4]), s.clone()]), "has shape [1, 4]"),
            (request(vec![input("features", &[3], &[0.0; 3]), s.clone()]), "has shape [3]"),
            (request(vec![input("features", &[0, 3], &[]), s.clone()]), "rows >= 1"),
            (request(vec![input("features", &[1 << 62, 3], &[]), s.clone()]), "more values than any request"),
            (request(vec![input("features", &[1, 3], &[0.0; 2]), s.clone()]), "has 2 values"),
            (request(vec![f.clone(), input("state", &[2, 2], &[0.0; 4])]), "has 2 rows"),
            (
                request(vec![
                    input("features", &[2, 3], &[0.0, 1.0, 2.0, 3.0, f32::NAN, 5.0]),
                    input("state", &[2, 2], &[0.0; 4]),
                ]),
                "row 1: features[1] is NaN",
            ),
            (
                request(vec![f.clone(), input("state", &[1, 2], &[0.0, f32::INFINITY])]),
                "row 0: state[1] is inf",
            ),
            (
                request(vec![InferInputTensor { datatype: "FP64".into(), ..f.clone() }, s.clone()]),
                "datatype \"FP64\"",
            ),
        ];
        for (req, needle) in cases {
            let message = refused(&stateful, &req);
            assert!(message.contains(needle), "{needle:?} not in {message:?}");
        }
        let mut raw = request(vec![f.clone(), s.clone()]);
        raw.raw_input_contents = vec![vec![0; 12]];
        assert!(refused(&stateful, &raw).contains("one per input"));
        raw.raw_input_contents = vec![vec![0; 12], vec![0; 8]];
        assert!(refused(&stateful, &raw).contains("has contents while the request uses raw"));
        for i in &mut raw.inputs {
            i.contents = None;
        }
        raw.raw_input_contents[1] = vec![0; 7];
        assert!(refused(&stateful, &raw).contains("has 7 raw bytes"));
        assert!(refused(&spec(0), &request(vec![f, s])).contains("has no input \"state\""));
    }

    #[test]
    fn outputs_are_the_models_or_those_asked_for_and_an_unknown_one_is_refused() {
        let stateful = spec(2);
        let mut req = request(vec![]);
        assert_eq!(requested_outputs(&stateful, &req).unwrap(), ["score", "new_state"]);
        assert_eq!(requested_outputs(&spec(0), &req).unwrap(), ["score"]);
        let ask = |name: &str| model_infer_request::InferRequestedOutputTensor {
            name: name.into(),
            ..Default::default()
        };
        req.outputs = vec![ask("new_state"), ask("score")];
        assert_eq!(requested_outputs(&stateful, &req).unwrap(), ["new_state", "score"]);
        req.outputs = vec![ask("probability")];
        let status = requested_outputs(&stateful, &req).unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("no output \"probability\""), "{status:?}");
        let (inputs, outputs) = tensors(&stateful);
        assert_eq!(inputs[1].shape, [-1, 2]);
        assert_eq!(outputs[0].shape, [-1]);
        let config = model_config(&stateful);
        assert_eq!(config.max_batch_size, 1);
        assert_eq!(
            config.input.iter().map(|i| (i.name.as_str(), i.dims.clone())).collect::<Vec<_>>(),
            [("features", vec![3]), ("state", vec![2])]
        );
        assert_eq!(config.output[0].dims, Vec::<i64>::new(), "score: one value per row");
    }

    #[test]
    fn each_inference_error_has_its_status_code() {
        use tonic::Code;
        let cases = [
            (InferError::UnknownModel { model: "x".into() }, Code::NotFound),
            (
                InferError::Shape { model: "m".into(), input: "features", expected: 3, got: 2 },
                Code::InvalidArgument,
            ),
            (InferError::ValueRange { input: "features", index: 1, value: f32::NAN }, Code::InvalidArgument),
            (InferError::Backend("boom".into()), Code::Internal),
            (InferError::Panicked("boom".into()), Code::Internal),
            (InferError::Overloaded { capacity: 4 }, Code::Unavailable),
            (InferError::WorkerLost { attempts: 3 }, Code::Aborted),
            (InferError::ShuttingDown, Code::Unavailable),
        ];
        for (e, code) in cases {
            let status = status_of(&e, "row 2: ");
            assert_eq!(status.code(), code, "{e:?}");
            assert_eq!(status.message(), format!("row 2: {e}"));
        }
    }
}
