//! What a node tells the outside: Prometheus metrics (here), health and the HTTP / gRPC endpoints
//! that serve both ([`health`]), and logs and OpenTelemetry traces ([`traces`]).
//!
//! Metric meanings follow Triton's where they overlap: `partita_inference_requests_total` counts
//! rows requested, `partita_inference_executions_total` counts model executions (batches), so the
//! average batch size is requests ÷ executions. Base units only (`_seconds`), counters end in
//! `_total`, histograms have buckets chosen for a 50 ms budget. Every series carries the node's
//! `zone`; inference series carry `model`, `version` and `device`, partition series `partition`, worker
//! series `worker` and `device`.

pub mod health;
pub mod traces;

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::state::rocks::RocksStore;
pub use health::{Health, serve};
use partita_actors::inference::{InferOutput, Served};
use partita_actors::partition::{PipelineCounters, PipelineObserver};
use partita_actors::pool::{StatusProbe, WorkerStatus};
use partita_actors::state::{CacheObserver, CacheStats, PartitionId};
use partita_proto::v1::DeadLetterReason;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// Latency buckets, seconds: fine below the 50 ms budget, coarse above.
const SECONDS: [f64; 14] =
    [0.0005, 0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0];
const BATCH: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

fn seconds_histogram() -> Histogram {
    Histogram::new(SECONDS)
}

fn batch_histogram() -> Histogram {
    Histogram::new(BATCH)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    model: String,
    /// The gRPC status code's name, as go-grpc-prometheus writes it (`OK`, `InvalidArgument`).
    grpc_code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    /// `HOST:PORT (ADDRESS)` of a remote worker.
    endpoint: String,
    worker_zone: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RemoteCallLabels {
    endpoint: String,
    worker_zone: String,
    grpc_code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: String,
    version: String,
    device: String,
}

/// The values of `partita_partition_state`'s `state` label.
pub const PARTITION_STATES: [&str; 3] = ["running", "starting", "fenced"];

/// What the scrape-time collector reads: counters the actors keep, cache stats, consumer lag,
/// worker status.
pub struct Sources {
    pub counters: Arc<PipelineCounters>,
    pub cache: Box<dyn Fn() -> CacheStats + Send + Sync>,
    /// The node's RocksDB (none on CQL): its memory and write-ahead log counts.
    pub rocks: Option<RocksStore>,
    pub lag: Box<dyn Fn() -> Vec<(i32, i64)> + Send + Sync>,
    /// The broker id each owned partition is fetched from.
    pub fetched_from: Box<dyn Fn() -> Vec<(i32, i64)> + Send + Sync>,
    /// Each assigned partition: its supervision state (`running`, `starting`, `fenced`) and
    /// its actor's restarts.
    pub partitions: Box<dyn Fn() -> Vec<(i32, &'static str, u64)> + Send + Sync>,
    /// Standby copies this node keeps: the changelog position each reached.
    pub standby: Box<dyn Fn() -> Vec<(i32, i64)> + Send + Sync>,
    pub workers: Mutex<Vec<WorkerStatus>>,
}

impl Sources {
    /// A node without partitions (role worker): its counters, nothing else.
    pub fn without_partitions(counters: Arc<PipelineCounters>) -> Self {
        Self {
            counters,
            cache: Box::new(CacheStats::default),
            rocks: None,
            lag: Box::new(Vec::new),
            fetched_from: Box::new(Vec::new),
            partitions: Box::new(Vec::new),
            standby: Box::new(Vec::new),
            workers: Mutex::default(),
        }
    }
}

struct NodeCollector(Arc<Mutex<Option<Sources>>>);

impl fmt::Debug for NodeCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NodeCollector")
    }
}

fn counter(enc: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: u64) -> fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    v: i64,
) -> fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(enc.encode_descriptor(name, help, unit, g.metric_type())?)
}

/// A gauge family with one series per partition.
fn per_partition(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    values: impl IntoIterator<Item = (i64, i64)>,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (p, v) in values {
        let labels = [("partition", p.to_string())];
        ConstGauge::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for NodeCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> fmt::Result {
        let guard = self.0.lock().unwrap();
        let Some(s) = guard.as_ref() else { return Ok(()) };
        let c = &s.counters;
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        counter(
            &mut enc,
            "partita_records_received",
            "Records taken from the ingestion topic",
            get(&c.received),
        )?;
        counter(
            &mut enc,
            "partita_records_redelivered",
            "Records at or below the stored applied offset, skipped",
            get(&c.redelivered),
        )?;
        counter(&mut enc, "partita_scores", "Scores produced", get(&c.scored))?;
        counter(&mut enc, "partita_batches", "Partition batches applied", get(&c.batches))?;
        counter(&mut enc, "partita_retries", "Produce or state-write attempts retried", get(&c.retries))?;
        counter(
            &mut enc,
            "partita_backlog_events",
            "Events scored in a key's backlog row (the model's sequence form)",
            get(&c.backlog_events),
        )?;
        counter(
            &mut enc,
            "partita_backlog_fallbacks",
            "Backlog rows not scored in full, whose events went on one by one",
            get(&c.backlog_fallbacks),
        )?;
        counter(
            &mut enc,
            "partita_unknown_field_events",
            "Events carrying fields this schema does not know (accepted)",
            get(&c.unknown_fields),
        )?;
        counter(
            &mut enc,
            "partita_features_clamped",
            "Events whose features were clamped into their model's range (out_of_range = \"clamp\")",
            get(&c.clamped),
        )?;
        counter(
            &mut enc,
            "partita_event_time_suspect",
            "Events whose event time is over an hour from the node's clock (accepted, flagged)",
            get(&c.time_suspect),
        )?;
        {
            let mut m = enc.encode_descriptor(
                "partita_dead_letters",
                "Records sent to the dead-letter topic, by reason",
                None,
                MetricType::Counter,
            )?;
            for (i, n) in c.dead_letters.iter().enumerate().skip(1) {
                let Ok(reason) = DeadLetterReason::try_from(i as i32) else { continue };
                let labels = [("reason", reason.as_str_name())];
                ConstCounter::new(n.load(Ordering::Relaxed)).encode(m.encode_family(&labels)?)?;
            }
        }
        per_partition(
            &mut enc,
            "partita_applied_offset",
            "The stored applied offset of each partition (state and offset written together)",
            c.applied_offsets.lock().unwrap().iter().map(|(p, o)| (i64::from(*p), *o)),
        )?;
        per_partition(
            &mut enc,
            "partita_consumer_lag",
            "Records behind the end of each owned partition (librdkafka statistics)",
            (s.lag)().into_iter().map(|(p, lag)| (i64::from(p), lag)),
        )?;
        per_partition(
            &mut enc,
            "partita_fetch_broker",
            "Broker id each owned partition is fetched from: a broker in this node's zone when rack-aware fetching works (client.rack = zone, brokers with RackAwareReplicaSelector)",
            (s.fetched_from)().into_iter().map(|(p, b)| (i64::from(p), b)),
        )?;
        per_partition(
            &mut enc,
            "partita_standby_position",
            "Changelog offset each standby copy this node keeps has applied (-1: none yet); [state] standby_replicas",
            (s.standby)().into_iter().map(|(p, at)| (i64::from(p), at)),
        )?;
        let partitions = (s.partitions)();
        {
            let mut m = enc.encode_descriptor(
                "partita_partition_state",
                "1 for the supervision state each assigned partition is in (running, starting, fenced), 0 for the others",
                None,
                MetricType::Gauge,
            )?;
            for (p, state, _) in &partitions {
                for st in PARTITION_STATES {
                    let labels = [("partition", p.to_string()), ("state", (*st).to_owned())];
                    ConstGauge::new(i64::from(st == *state)).encode(m.encode_family(&labels)?)?;
                }
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "partita_partition_restarts",
                "Restarts of each assigned partition's actor after a failure (panic, store error, frozen)",
                None,
                MetricType::Counter,
            )?;
            for (p, _, restarts) in &partitions {
                let labels = [("partition", p.to_string())];
                ConstCounter::new(*restarts).encode(m.encode_family(&labels)?)?;
            }
        }
        let cache = (s.cache)();
        counter(&mut enc, "partita_state_cache_hits", "State cache hits", cache.hits)?;
        counter(
            &mut enc,
            "partita_state_cache_misses",
            "State cache misses (loaded from the store)",
            cache.misses,
        )?;
        counter(&mut enc, "partita_state_cache_evictions", "State cache evictions", cache.evictions)?;
        gauge(&mut enc, "partita_state_cache", "State cache size", Some(&Unit::Bytes), cache.bytes as i64)?;
        gauge(
            &mut enc,
            "partita_state_cache_budget",
            "State cache budget",
            Some(&Unit::Bytes),
            cache.budget as i64,
        )?;
        if let Some(store) = &s.rocks {
            let rocks = store.memory();
            {
                let mut m = enc.encode_descriptor(
                    "partita_rocksdb_memory",
                    "RocksDB's memory by its own accounting: block cache (with the index and filter blocks), \
                 memtables, table readers outside the block cache",
                    Some(&Unit::Bytes),
                    MetricType::Gauge,
                )?;
                for (part, v) in [
                    ("block_cache", rocks.block_cache),
                    ("memtables", rocks.memtables),
                    ("table_readers", rocks.table_readers),
                ] {
                    ConstGauge::new(v as i64).encode(m.encode_family(&[("part", part)])?)?;
                }
            }
            let wal = store.wal();
            counter(
                &mut enc,
                "partita_rocksdb_wal_writes",
                "RocksDB writes through its write-ahead log (with [state] write_window, one per group of state writes)",
                wal.writes,
            )?;
            counter(
                &mut enc,
                "partita_rocksdb_wal_syncs",
                "fsyncs of RocksDB's write-ahead log (writes that arrive together share one)",
                wal.syncs,
            )?;
        }
        let workers = s.workers.lock().unwrap();
        {
            let mut m = enc.encode_descriptor(
                "partita_worker_healthy",
                "1 if the worker serves",
                None,
                MetricType::Gauge,
            )?;
            for w in workers.iter() {
                let labels = [("worker", w.index.to_string()), ("device", w.device.to_string())];
                ConstGauge::new(i64::from(w.healthy)).encode(m.encode_family(&labels)?)?;
            }
        }
        let mut m = enc.encode_descriptor(
            "partita_worker_restarts",
            "Restarts of each worker by its supervisor",
            None,
            MetricType::Counter,
        )?;
        for w in workers.iter() {
            let labels = [("worker", w.index.to_string()), ("device", w.device.to_string())];
            ConstCounter::new(w.restarts as u64).encode(m.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// The node's metrics: the registry, the recorded families, and the collector's sources.
pub struct Metrics {
    registry: Registry,
    requests: Family<ModelLabels, Counter>,
    executions: Family<ModelLabels, Counter<f64>>,
    queue: Family<ModelLabels, Histogram, fn() -> Histogram>,
    compute: Family<ModelLabels, Histogram, fn() -> Histogram>,
    batch_size: Family<ModelLabels, Histogram, fn() -> Histogram>,
    oip_requests: Family<CallLabels, Counter>,
    oip_duration: Family<CallLabels, Histogram, fn() -> Histogram>,
    remote_calls: Family<RemoteCallLabels, Counter>,
    remote_duration: Family<EndpointLabels, Histogram, fn() -> Histogram>,
    remote_healthy: Family<EndpointLabels, Gauge>,
    remote_breaker: Family<EndpointLabels, Gauge>,
    remote_opened: Family<EndpointLabels, Counter>,
    in_node: Histogram,
    event_latency: Histogram,
    state_write: Histogram,
    state_load: Histogram,
    sources: Arc<Mutex<Option<Sources>>>,
    probe: Mutex<Option<StatusProbe>>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    pub fn new(zone: &str) -> Self {
        let mut registry = Registry::with_labels([("zone".into(), zone.to_owned().into())].into_iter());
        let requests = Family::<ModelLabels, Counter>::default();
        let executions = Family::<ModelLabels, Counter<f64>>::default();
        let queue = Family::new_with_constructor(seconds_histogram as fn() -> Histogram);
        let compute = Family::new_with_constructor(seconds_histogram as fn() -> Histogram);
        let batch_size = Family::new_with_constructor(batch_histogram as fn() -> Histogram);
        let oip_requests = Family::<CallLabels, Counter>::default();
        let oip_duration = Family::new_with_constructor(seconds_histogram as fn() -> Histogram);
        let remote_calls = Family::<RemoteCallLabels, Counter>::default();
        let remote_duration = Family::new_with_constructor(seconds_histogram as fn() -> Histogram);
        let remote_healthy = Family::<EndpointLabels, Gauge>::default();
        let remote_breaker = Family::<EndpointLabels, Gauge>::default();
        let remote_opened = Family::<EndpointLabels, Counter>::default();
        let in_node = seconds_histogram();
        let event_latency = seconds_histogram();
        let state_write = seconds_histogram();
        let state_load = seconds_histogram();
        registry.register(
            "partita_inference_requests",
            "Inference requests (rows) that succeeded, as Triton's nv_inference_request_success",
            requests.clone(),
        );
        registry.register(
            "partita_inference_executions",
            "Model executions (batches) that served them, as Triton's nv_inference_exec_count; average batch = requests / executions",
            executions.clone(),
        );
        registry.register_with_unit(
            "partita_inference_queue",
            "Time a request waited for its batch",
            Unit::Seconds,
            queue.clone(),
        );
        registry.register_with_unit(
            "partita_inference_compute",
            "Forward pass of the batch a request was in",
            Unit::Seconds,
            compute.clone(),
        );
        registry.register(
            "partita_inference_batch_size",
            "Rows in the batch each request ran in",
            batch_size.clone(),
        );
        registry.register(
            "partita_oip_requests",
            "ModelInfer calls served over the Open Inference Protocol, by model and gRPC status",
            oip_requests.clone(),
        );
        registry.register_with_unit(
            "partita_oip_request_duration",
            "ModelInfer calls from receipt to answer, by model and gRPC status",
            Unit::Seconds,
            oip_duration.clone(),
        );
        registry.register(
            "partita_remote_requests",
            "Calls to remote inference workers, by endpoint, its zone and the gRPC status",
            remote_calls.clone(),
        );
        registry.register_with_unit(
            "partita_remote_request_duration",
            "Calls to remote inference workers, from send to answer",
            Unit::Seconds,
            remote_duration.clone(),
        );
        registry.register(
            "partita_remote_endpoint_healthy",
            "1 while a remote worker's health check says SERVING",
            remote_healthy.clone(),
        );
        registry.register(
            "partita_remote_breaker_state",
            "A remote worker's circuit breaker: 0 closed, 1 half-open, 2 open",
            remote_breaker.clone(),
        );
        registry.register(
            "partita_remote_breaker_opened",
            "Times a remote worker's circuit breaker opened",
            remote_opened.clone(),
        );
        registry.register_with_unit(
            "partita_event_in_node",
            "From the node receiving a record to its score being ready",
            Unit::Seconds,
            in_node.clone(),
        );
        registry.register_with_unit(
            "partita_event_latency",
            "From an event's event time (producer clock) to its score being ready (node clock)",
            Unit::Seconds,
            event_latency.clone(),
        );
        registry.register_with_unit(
            "partita_state_write",
            "Atomic state + applied-offset writes, one per batch",
            Unit::Seconds,
            state_write.clone(),
        );
        registry.register_with_unit(
            "partita_state_load",
            "Batched state loads from the store on cache misses",
            Unit::Seconds,
            state_load.clone(),
        );
        let sources = Arc::new(Mutex::new(None));
        registry.register_collector(Box::new(NodeCollector(sources.clone())));
        Self {
            registry,
            requests,
            executions,
            queue,
            compute,
            batch_size,
            oip_requests,
            oip_duration,
            remote_calls,
            remote_duration,
            remote_healthy,
            remote_breaker,
            remote_opened,
            in_node,
            event_latency,
            state_write,
            state_load,
            sources,
            probe: Mutex::new(None),
        }
    }

    /// Connect the scrape-time sources once the node's parts exist.
    pub fn attach(&self, sources: Sources, probe: StatusProbe) {
        *self.sources.lock().unwrap() = Some(sources);
        *self.probe.lock().unwrap() = Some(probe);
    }

    /// Drop the scrape-time sources (they hold the consumer's context and with it the producer),
    /// so a stopped node's Kafka clients close even while the HTTP endpoint lives on.
    pub fn detach(&self) {
        *self.sources.lock().unwrap() = None;
        *self.probe.lock().unwrap() = None;
    }

    /// The Prometheus text exposition, refreshing the worker status first.
    pub async fn render(&self) -> String {
        let probe = self.probe.lock().unwrap().clone();
        if let Some(probe) = probe {
            let status = probe.get().await;
            if let Some(s) = self.sources.lock().unwrap().as_ref() {
                *s.workers.lock().unwrap() = status;
            }
        }
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "encoding metrics");
        }
        out
    }

    /// One row served by the pool (the `partita_inference_*` families).
    pub fn inferred(&self, model: &str, served: &Served) {
        let labels = ModelLabels {
            model: model.to_owned(),
            version: served.model_version.to_string(),
            device: served.device.to_string(),
        };
        self.requests.get_or_create(&labels).inc();
        // Each row of a batch of n adds 1/n: the batch adds up to one execution.
        self.executions.get_or_create(&labels).inc_by(1.0 / served.batch_size.max(1) as f64);
        self.queue.get_or_create(&labels).observe(served.queue_time.as_secs_f64());
        self.compute.get_or_create(&labels).observe(served.compute_time.as_secs_f64());
        self.batch_size.get_or_create(&labels).observe(served.batch_size as f64);
    }

    /// One `ModelInfer` call answered with `code` after `elapsed`.
    pub fn oip_request(&self, model: &str, code: tonic::Code, elapsed: Duration) {
        let labels = CallLabels { model: model.to_owned(), grpc_code: code_name(code) };
        self.oip_requests.get_or_create(&labels).inc();
        self.oip_duration.get_or_create(&labels).observe(elapsed.as_secs_f64());
    }
}

impl Metrics {
    /// One call to a remote worker, answered with `code` (`DeadlineExceeded` when it timed out
    /// here) after `elapsed`.
    pub fn remote_call(&self, endpoint: &str, zone: &str, code: tonic::Code, elapsed: Duration) {
        let labels = EndpointLabels { endpoint: endpoint.to_owned(), worker_zone: zone.to_owned() };
        let call = RemoteCallLabels {
            endpoint: labels.endpoint.clone(),
            worker_zone: labels.worker_zone.clone(),
            grpc_code: code_name(code),
        };
        self.remote_calls.get_or_create(&call).inc();
        self.remote_duration.get_or_create(&labels).observe(elapsed.as_secs_f64());
    }

    /// A remote worker's circuit breaker opened.
    pub fn remote_breaker_opened(&self, endpoint: &str, zone: &str) {
        let labels = EndpointLabels { endpoint: endpoint.to_owned(), worker_zone: zone.to_owned() };
        self.remote_opened.get_or_create(&labels).inc();
    }

    /// A remote worker's health and breaker state (each health check).
    pub fn remote_endpoint(
        &self,
        endpoint: &str,
        zone: &str,
        healthy: bool,
        breaker: crate::inference::remote::BreakerState,
    ) {
        use crate::inference::remote::BreakerState;
        let labels = EndpointLabels { endpoint: endpoint.to_owned(), worker_zone: zone.to_owned() };
        self.remote_healthy.get_or_create(&labels).set(i64::from(healthy));
        let state = match breaker {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen { .. } => 1,
            BreakerState::Open { .. } => 2,
        };
        self.remote_breaker.get_or_create(&labels).set(state);
    }
}

/// A gRPC status code's name as go-grpc-prometheus writes it (`OK`, `InvalidArgument`).
fn code_name(code: tonic::Code) -> String {
    match code {
        tonic::Code::Ok => "OK".to_owned(),
        other => format!("{other:?}"),
    }
}

impl PipelineObserver for Metrics {
    fn scored(&self, model: &str, out: &InferOutput, in_node: Duration, since_event: Option<Duration>) {
        self.inferred(model, &out.served());
        self.in_node.observe(in_node.as_secs_f64());
        if let Some(d) = since_event {
            self.event_latency.observe(d.as_secs_f64());
        }
    }

    fn state_written(&self, _partition: PartitionId, elapsed: Duration) {
        self.state_write.observe(elapsed.as_secs_f64());
    }
}

impl CacheObserver for Metrics {
    fn loaded(&self, _keys: usize, elapsed: Duration) {
        self.state_load.observe(elapsed.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn recorded_inferences_render_in_prometheus_text_with_the_zone() {
        let m = Metrics::new("zone-a");
        let out = InferOutput {
            score: 0.5,
            new_state: vec![],
            model_version: 3,
            batch_size: 4,
            device: partita_actors::inference::Device::Cpu,
            queue_time: Duration::from_millis(2),
            compute_time: Duration::from_millis(1),
        };
        for _ in 0..4 {
            m.scored("m", &out, Duration::from_millis(5), Some(Duration::from_millis(9)));
        }
        let text = m.render().await;
        assert!(
            text.contains(
                r#"partita_inference_requests_total{zone="zone-a",model="m",version="3",device="cpu"} 4"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"partita_inference_executions_total{zone="zone-a",model="m",version="3",device="cpu"} 1.0"#
            ),
            "{text}"
        );
        assert!(text.contains("# TYPE partita_inference_queue_seconds histogram"), "{text}");
        assert!(
            text.contains(r#"partita_event_latency_seconds_bucket{zone="zone-a",le="0.01"} 4"#),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "OpenMetrics text ends with # EOF");
    }
}
