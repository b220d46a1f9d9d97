//! Logs and traces: the `tracing` subscriber of the `partita` binary (text or JSON logs on stderr,
//! filtered by `RUST_LOG`) and, when an OTLP endpoint is configured, an OpenTelemetry layer that
//! exports spans over OTLP/gRPC; plus [`OtelTracer`], the partition actors' trace port.
//!
//! Spans (names and fields are part of what operators query, keep them stable):
//! - `partita.batch` (INFO): one partition batch; `node`, `zone`, `partition`, `records`,
//!   `trace_id`. A root: each batch starts a trace, sampled at `[traces] sample_ratio`.
//! - `partita.record` (DEBUG): one input record; `partition`, `offset`, `outcome` (`SCORED` or
//!   the dead letter reason), `model`, `model_version`, `device`, `inference_batch_size`,
//!   `trace_id`. Its parent is the span named by the record's W3C `traceparent` header (then the
//!   producer's sampling decision holds), otherwise the batch; the batch links to it. The
//!   record's score or dead letter carries a `traceparent` naming this span, so one trace runs
//!   producer -> node -> consumer of the scores.
//!
//! - `partita.infer` (INFO): one Open Inference Protocol `ModelInfer` call served by a worker
//!   node; `model`, `rows`. Its parent is the span named by the call's `traceparent` gRPC
//!   metadata: a scorer node sends its batch span's, so one trace runs scorer -> worker.
//!
//! Record spans are DEBUG so that, with the exporter off and the default log filter, they are
//! never built (a disabled callsite costs nothing); the exporter's layer takes `partita` spans
//! and events at DEBUG whatever `RUST_LOG` says. `trace_id` is a span field, so JSON log lines
//! written inside a batch or record span carry it.
//!
//! The batch span processor exports from its own thread; tonic needs a Tokio reactor there, so
//! [`OnRuntime`] runs each export on the node's runtime.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use anyhow::Context as _;
use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanData, SpanExporter};
use partita_actors::partition::{HEADER_TRACEPARENT, InputRecord, Tracer};
use partita_actors::state::PartitionId;
use tracing::Span;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    /// One JSON object per line, with the current span's fields (`trace_id` among them).
    Json,
}

/// Where and how spans are exported.
#[derive(Debug, Clone)]
pub struct Otlp {
    /// OTLP/gRPC endpoint of a collector, e.g. `http://otel-collector:4317`.
    pub endpoint: String,
    /// Share of batch traces sampled (records carrying a `traceparent` follow its sampled flag).
    pub sample_ratio: f64,
    /// `service.instance.id`.
    pub node: String,
    /// `cloud.availability_zone`.
    pub zone: String,
}

/// Keeps the exporter; [`Telemetry::shutdown`] flushes the spans not yet sent.
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Export what is buffered and stop the exporter. Call outside the async runtime (it blocks
    /// until the export thread is done) while the runtime still runs.
    pub fn shutdown(self) {
        if let Some(p) = self.provider
            && let Err(e) = p.shutdown()
        {
            eprintln!("warning: flushing traces: {e}");
        }
    }
}

/// Install the global subscriber: logs on stderr (`RUST_LOG`, default `warn,partita=info`), and
/// the OTLP exporter when `otlp` is given. Call inside the Tokio runtime's context (the gRPC
/// channel is created on it).
pub fn init(format: LogFormat, otlp: Option<&Otlp>) -> anyhow::Result<Telemetry> {
    init_with_writer(format, otlp, std::io::stderr)
}

/// [`init`] with logs written to `writer` (tests read them back).
///
/// Without an exporter the log filter is the subscriber's global filter. It is a per-layer filter
/// only when the exporter needs `partita` spans at DEBUG that the logs do not show, because a
/// per-layer `EnvFilter` swallows the next event on a thread after a `log` crate `enabled()`
/// query (tokio-rs/tracing#2519), and rdkafka makes one each time a Kafka client is created: the
/// first line logged after creating a client vanished. With an exporter that bug still applies.
pub fn init_with_writer<W>(format: LogFormat, otlp: Option<&Otlp>, writer: W) -> anyhow::Result<Telemetry>
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn,partita=info".into());
    let provider = otlp.map(provider).transpose()?;
    let installed = match &provider {
        None => tracing_subscriber::registry().with(filter).with(logs_layer(format, writer)).try_init(),
        Some(p) => {
            let spans = tracing_opentelemetry::layer()
                .with_tracer(p.tracer("partita"))
                .with_tracked_inactivity(false)
                .with_filter(Targets::new().with_target("partita", tracing::Level::DEBUG));
            tracing_subscriber::registry()
                .with(logs_layer(format, writer).with_filter(filter))
                .with(spans)
                .try_init()
        }
    };
    installed.context("installing the log subscriber")?;
    Ok(Telemetry { provider })
}

/// The log lines' layer: text or JSON, to `writer`.
fn logs_layer<S, W>(format: LogFormat, writer: W) -> Box<dyn tracing_subscriber::Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    // Colours only on a terminal: a log file or collector gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = tracing_subscriber::fmt::layer().with_writer(writer).with_ansi(ansi);
    match format {
        LogFormat::Text => logs.boxed(),
        LogFormat::Json => logs.json().with_current_span(true).boxed(),
    }
}

fn provider(otlp: &Otlp) -> anyhow::Result<SdkTracerProvider> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(&otlp.endpoint)
        .with_timeout(Duration::from_secs(5))
        .build()
        .with_context(|| format!("OTLP exporter for {}", otlp.endpoint))?;
    let resource = Resource::builder()
        .with_service_name("partita")
        .with_attributes([
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new("service.instance.id", otlp.node.clone()),
            KeyValue::new("cloud.availability_zone", otlp.zone.clone()),
        ])
        .build();
    let exporter = OnRuntime { inner: exporter, runtime: tokio::runtime::Handle::current() };
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(otlp.sample_ratio))))
        .with_resource(resource)
        .build())
}

/// Runs a span exporter's exports on a Tokio runtime. The SDK's batch processor calls `export`
/// on its own thread (no reactor there); `Handle::block_on` gives the call one.
struct OnRuntime<E> {
    inner: E,
    runtime: tokio::runtime::Handle,
}

impl<E> fmt::Debug for OnRuntime<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OnRuntime")
    }
}

impl<E: SpanExporter> SpanExporter for OnRuntime<E> {
    fn export(&self, batch: Vec<SpanData>) -> impl Future<Output = OTelSdkResult> + Send {
        std::future::ready(self.runtime.block_on(self.inner.export(batch)))
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The partition actors' [`Tracer`]: the spans above. Without the OpenTelemetry layer the spans
/// have no OpenTelemetry context: outputs then carry the input's `traceparent` unchanged, and
/// `trace_id` (when the span is logged at all) is the input's.
#[derive(Debug)]
pub struct OtelTracer {
    node: String,
    zone: String,
    propagator: TraceContextPropagator,
}

impl OtelTracer {
    pub fn new(node: &str, zone: &str) -> Self {
        Self { node: node.to_owned(), zone: zone.to_owned(), propagator: TraceContextPropagator::new() }
    }

    /// The context a `traceparent` header names (invalid if the header is malformed).
    fn remote(&self, traceparent: &[u8]) -> Context {
        let Ok(value) = std::str::from_utf8(traceparent) else { return Context::new() };
        let carrier = HashMap::from([(HEADER_TRACEPARENT.to_owned(), value.to_owned())]);
        self.propagator.extract(&carrier)
    }
}

/// The W3C `traceparent` naming the current span (the batch span around a partition's inference
/// call), for a call to another node; `None` without an exported span.
pub fn current_traceparent() -> Option<String> {
    let cx = Span::current().context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove(HEADER_TRACEPARENT)
}

/// The span of one inference call served to another node, a child of the span its
/// `traceparent` names (a root when it names none).
pub fn infer_span(traceparent: Option<&str>, model: &str, rows: usize) -> Span {
    let span = tracing::info_span!(parent: None, "partita.infer", model = %model, rows);
    if let Some(tp) = traceparent {
        let carrier = HashMap::from([(HEADER_TRACEPARENT.to_owned(), tp.to_owned())]);
        let cx = TraceContextPropagator::new().extract(&carrier);
        if cx.span().span_context().is_valid() {
            // Fails only without the OpenTelemetry layer: then there is nothing to parent.
            let _ = span.set_parent(cx);
        }
    }
    span
}

/// The OpenTelemetry span context of `span`, when the exporter's layer built one.
fn span_context(span: &Span) -> Option<opentelemetry::trace::SpanContext> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then_some(sc)
}

impl Tracer for OtelTracer {
    fn batch_span(&self, partition: PartitionId, records: usize) -> Span {
        let span = tracing::info_span!(
            parent: None,
            "partita.batch",
            node = %self.node,
            zone = %self.zone,
            partition = partition.0,
            records,
            trace_id = Empty,
        );
        if let Some(sc) = span_context(&span) {
            span.record("trace_id", tracing::field::display(sc.trace_id()));
        }
        span
    }

    fn record_span(&self, batch: &Span, rec: &InputRecord) -> Span {
        let span = tracing::debug_span!(
            parent: batch,
            "partita.record",
            partition = rec.partition.0,
            offset = rec.offset.0,
            outcome = Empty,
            model = Empty,
            model_version = Empty,
            device = Empty,
            inference_batch_size = Empty,
            trace_id = Empty,
        );
        if span.is_disabled() {
            return span;
        }
        let remote = rec.header(HEADER_TRACEPARENT).map(|tp| self.remote(tp));
        if let Some(cx) = &remote {
            // Fails only without the OpenTelemetry layer: then there is nothing to parent.
            let _ = span.set_parent(cx.clone());
        }
        let trace_id = match span_context(&span) {
            Some(sc) => {
                batch.add_link(sc.clone());
                Some(sc.trace_id())
            }
            None => remote.map(|cx| cx.span().span_context().trace_id()),
        };
        if let Some(id) = trace_id.filter(|id| *id != opentelemetry::trace::TraceId::INVALID) {
            span.record("trace_id", tracing::field::display(id));
        }
        span
    }

    fn traceparent(&self, span: &Span) -> Option<Vec<u8>> {
        let cx = span.context();
        if !cx.span().span_context().is_valid() {
            return None;
        }
        let mut carrier = HashMap::new();
        self.propagator.inject_context(&cx, &mut carrier);
        carrier.remove(HEADER_TRACEPARENT).map(String::into_bytes)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    use partita_actors::state::Offset;

    use super::*;

    /// Log lines written to memory.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn record(traceparent: Option<&str>) -> InputRecord {
        InputRecord {
            topic: Arc::from("transactions"),
            partition: PartitionId(2),
            offset: Offset(41),
            key: Some(b"card-1".to_vec()),
            value: None,
            headers: traceparent
                .map(|tp| (HEADER_TRACEPARENT.to_owned(), tp.as_bytes().to_vec()))
                .into_iter()
                .collect(),
            received: Instant::now(),
            trimmed: Default::default(),
        }
    }

    #[test]
    fn json_log_lines_inside_a_record_span_carry_the_inputs_trace_id() {
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_current_span(true)
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(move || writer.clone())
            .finish();
        let tracer = OtelTracer::new("node-a", "zone-a");
        tracing::subscriber::with_default(subscriber, || {
            let batch = tracer.batch_span(PartitionId(2), 1);
            let span = tracer.record_span(
                &batch,
                &record(Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")),
            );
            span.in_scope(|| tracing::warn!("dead letter"));
            // No OpenTelemetry layer: the node has no span to name, the input's header goes out.
            assert_eq!(tracer.traceparent(&span), None);
        });
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        let line: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(line["span"]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736", "{text}");
        assert_eq!(line["span"]["offset"], 41, "{text}");
        assert_eq!(line["spans"][0]["node"], "node-a", "{text}");
    }

    #[test]
    fn a_malformed_traceparent_gives_no_trace_id() {
        let tracer = OtelTracer::new("n", "z");
        for bad in
            ["", "00-zz-00f067aa0ba902b7-01", "00-00000000000000000000000000000000-00f067aa0ba902b7-01"]
        {
            assert!(!tracer.remote(bad.as_bytes()).span().span_context().is_valid(), "{bad:?}");
        }
        assert!(
            tracer.remote(&[0xff, 0xfe]).span().span_context().trace_id()
                == opentelemetry::trace::TraceId::INVALID
        );
    }
}
