//! The port to inference workers in other processes. The router uses it when no worker of its
//! own is healthy (a scorer node has none); the runtime implements it with its gRPC client
//! (Open Inference Protocol), which picks the endpoint: same zone first, then the others.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

use crate::inference::{InferError, InferRows, Served};
use crate::model::ModelSpec;

/// How one remote call of validated rows ended.
#[derive(Debug, Clone, PartialEq)]
pub enum RemoteAnswer {
    /// Every row scored: one score per row and step, `rows × state_size` new-state values.
    Scored { scores: Vec<f32>, new_state: Vec<f32>, served: Served },
    /// The call's own rows are the cause (a lone row the model failed on): no retry helps.
    Failed(InferError),
    /// The model failed on one of several rows: run each alone to find it.
    RowFailed,
    /// Not answered within the deadline (the call was cancelled).
    TimedOut,
    /// The call broke after it was sent: the rows may have run, and one of them may have killed
    /// the worker.
    Lost,
    /// No endpoint took the rows (none healthy, breakers open, every one refused): nothing ran.
    Unavailable,
}

/// Inference workers in other processes.
pub trait RemoteWorkers: Send + Sync + fmt::Debug + 'static {
    /// Whether some endpoint may take a call now (healthy, its breaker not open).
    fn available(&self) -> bool;

    /// Run `rows` of `spec` (validated) on one endpoint within `deadline` (the gRPC deadline),
    /// moving on to the next endpoint while they refuse without running anything.
    fn infer(
        &self,
        spec: &ModelSpec,
        rows: Arc<InferRows>,
        deadline: Option<Duration>,
    ) -> BoxFuture<'static, RemoteAnswer>;
}
