//! The partition actor's trace port: a span per batch and per record, and the W3C `traceparent`
//! a record's outputs carry. The runtime implements it with OpenTelemetry
//! (`partita_runtime::telemetry::traces::OtelTracer`); the default methods make no spans, and then the
//! outputs carry the input's `traceparent` unchanged.
//!
//! The actor records these fields on a record's span; an implementation declares them (as
//! `tracing::field::Empty`) or they are dropped: [`OUTCOME`], [`MODEL`], [`MODEL_VERSION`],
//! [`DEVICE`], [`INFERENCE_BATCH`].

use tracing::Span;

use super::InputRecord;
use crate::state::PartitionId;

/// `SCORED`, or the dead letter reason (`DECODE`, `DUPLICATE`, ...).
pub const OUTCOME: &str = "outcome";
pub const MODEL: &str = "model";
pub const MODEL_VERSION: &str = "model_version";
/// The device of the worker that scored the record (`cpu`, `cuda:0`).
pub const DEVICE: &str = "device";
/// Rows in the forward pass that scored the record.
pub const INFERENCE_BATCH: &str = "inference_batch_size";

pub trait Tracer: Send + Sync + 'static {
    /// The span of one batch of `partition` holding `records` records.
    fn batch_span(&self, _partition: PartitionId, _records: usize) -> Span {
        Span::none()
    }

    /// The span of one record of `batch`: a child of the remote span named by the record's
    /// `traceparent` header when it has one; `batch` links to it.
    fn record_span(&self, _batch: &Span, _rec: &InputRecord) -> Span {
        Span::none()
    }

    /// The `traceparent` to write on the outputs of the record whose span is `span` (so the
    /// trace continues from this node's span); `None` copies the input's header, if any.
    fn traceparent(&self, _span: &Span) -> Option<Vec<u8>> {
        None
    }
}

/// No spans; outputs carry the input's `traceparent` unchanged.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoTraces;
impl Tracer for NoTraces {}
