//! `partita node`: the inference pool, the state store and cache, the producer and the consumer
//! group, wired together; runs until a shutdown signal, then drains in order.

pub mod config;
pub mod grpc;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use partita_actors::partition::decode::Limits;
use partita_actors::partition::{PartitionConfig, PipelineCounters};
use partita_actors::state::StateCache;
use partita_actors::supervision::RestartPolicy;
use std::sync::atomic::Ordering;

use crate::inference::InferenceOptions;
use crate::inference::oip::Oip;
use crate::inference::remote::{RemotePool, RemoteSettings};
use crate::kafka::{ConsumerSettings, KafkaSink, KafkaTier, Wiring, parse_property, start_consumer};
use crate::state::changelog::ChangelogStore;
use crate::state::rocks::{RocksConfig, RocksStore};
use crate::state::scylla::{CqlConsistency, Replication, ScyllaConfig, ScyllaStore};
use crate::state::{Backend, NodeStore};
use crate::telemetry::traces::{OtelTracer, Otlp};
use crate::telemetry::{Health, Metrics, Sources, serve};
use grpc::{GrpcServing, Security, serve_grpc};
use partita_actors::pool::remote::RemoteWorkers;

fn parse_cql_uri(s: &str) -> Result<String, String> {
    for node in s.split(',').map(str::trim) {
        match node.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {}
            _ => return Err(format!("expected HOST:PORT[,HOST:PORT...], got {node:?}")),
        }
    }
    Ok(s.to_owned())
}

/// A CQL keyspace name: a letter, then letters, digits or `_`, at most 48 characters.
fn parse_keyspace(s: &str) -> Result<String, String> {
    let ok = s.len() <= 48
        && s.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!("{s:?} is not a keyspace name (a letter, then letters, digits, _; at most 48)"))
    }
}

/// A count that wedges the node at 0 (a batch, a queue, waves).
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        Ok(_) => Err("must be at least 1 (0 would stall every partition)".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// A duration above zero (a zero deadline would time out every record).
fn positive_duration(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err("must be above zero".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// 0 to 100 ms: a longer window would hold every partition's commit for it.
fn parse_write_window(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d <= Duration::from_millis(100) { Ok(d) } else { Err(format!("{s} is above 100ms")) }
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("expected a number from 0 to 1, got {s:?}")),
    }
}

/// What a node runs (`[node] role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// Partition actors and the inference workers they use, in one process.
    Both,
    /// Partition actors; inference on the worker nodes of `[inference] worker_endpoints`.
    Scorer,
    /// Inference workers only, served over the Open Inference Protocol.
    Worker,
}

/// Flags of `partita node` (and the node inside `partita demo`).
#[derive(Debug, Clone, Args)]
pub struct NodeOptions {
    /// Ingestion tier: bootstrap servers of the cluster holding the input topic.
    #[arg(long, default_value = "127.0.0.1:9092")]
    pub ingestion_bootstrap: String,
    /// Extra librdkafka setting for the ingestion consumer, KEY=VALUE (repeatable).
    #[arg(long = "ingestion-property", value_parser = parse_property)]
    pub ingestion_properties: Vec<(String, String)>,
    /// Processing tier: bootstrap servers for scores and dead letters (default: the ingestion tier's).
    #[arg(long)]
    pub processing_bootstrap: Option<String>,
    /// Extra librdkafka setting for the output producer, KEY=VALUE (repeatable).
    #[arg(long = "processing-property", value_parser = parse_property)]
    pub processing_properties: Vec<(String, String)>,
    #[arg(long, default_value = "transactions")]
    pub input_topic: String,
    #[arg(long, default_value = "scores")]
    pub scores_topic: String,
    #[arg(long, default_value = "transactions.dlq")]
    pub dlq_topic: String,
    #[arg(long, default_value = "partita")]
    pub group: String,
    /// This node's zone (`client.rack` for rack-aware assignment).
    #[arg(long, default_value = "local")]
    pub zone: String,
    /// Static group membership id (a quick restart keeps the assignment).
    #[arg(long)]
    pub instance_id: Option<String>,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    pub session_timeout: Duration,
    /// RocksDB directory for per-key state and applied offsets.
    #[arg(long, default_value = "partita-state")]
    pub state_dir: PathBuf,
    /// fsync RocksDB's write-ahead log on every state write. `false`: a write still lands in the
    /// log atomically with its offset and survives a process crash, but a power loss may rewind
    /// state and offset together (those batches run again, their outputs repeat).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub sync_wal: bool,
    /// Backend rocksdb: state writes of every partition arriving within this long of the first
    /// share one RocksDB write and one fsync (write grouping, docs/state.md; at most 100 ms). Each
    /// write waits up to about the window more, and a partition's next outputs wait for its write.
    /// 0: each write alone (RocksDB still shares an fsync among writes that overlap).
    #[arg(long, value_parser = parse_write_window, default_value = "0ms")]
    pub write_window: Duration,
    /// Backend rocksdb in a cluster: the changelog topic (compacted, partitioned like the input)
    /// every state write goes to first, and a node restores a partition from when it claims it, so
    /// state follows its partition to another node. Empty: none (one node only).
    #[arg(long, default_value = "")]
    pub changelog_topic: String,
    /// With a changelog: how many other nodes keep a warm copy of each partition this node owns
    /// (other zones first), so a failover to one of them replays seconds of changelog instead of
    /// the whole partition. The group's assignor picks the new owner: nodes - 1 makes every
    /// failover warm.
    #[arg(long, default_value_t = 0)]
    pub standby_replicas: usize,
    /// Where per-key state lives: rocksdb (embedded, this node's disk) or cql (a ScyllaDB or
    /// Cassandra cluster that every node shares).
    #[arg(long, value_enum, default_value = "rocksdb")]
    pub state_backend: Backend,
    /// CQL contact points, HOST:PORT[,HOST:PORT...] (backend cql).
    #[arg(long, default_value = "127.0.0.1:9042", value_parser = parse_cql_uri)]
    pub cql_uri: String,
    /// Keyspace of the state table (created if missing, with `cql_replication`).
    #[arg(long, default_value = "partita", value_parser = parse_keyspace)]
    pub cql_keyspace: String,
    /// This node's CQL datacenter: requests prefer its replicas (and those in this node's zone as
    /// rack); LOCAL_QUORUM counts in it. Unset: no preference.
    #[arg(long)]
    pub cql_datacenter: Option<String>,
    /// Replication of the keyspace when partita creates it: DC=RF[,DC=RF...].
    #[arg(long, default_value = "datacenter1=3", value_parser = Replication::parse)]
    pub cql_replication: Replication,
    /// Consistency of state reads and writes (the epoch fence uses the matching serial level).
    #[arg(long, value_enum, default_value = "local_quorum")]
    pub cql_consistency: CqlConsistency,
    /// CQL user (password authentication; with `cql_password`). Unset: no authentication.
    #[arg(long)]
    pub cql_username: Option<String>,
    /// CQL password: better from the environment (PARTITA_STATE__CQL_PASSWORD, e.g. from a
    /// Kubernetes Secret) than from a file. Never printed.
    #[arg(long)]
    pub cql_password: Option<Redacted>,
    /// Heap budget of the state cache (e.g. 256MiB): each cached key counts its key, its state and
    /// 512 bytes of measured overhead.
    #[arg(long, default_value = "256MiB")]
    pub cache_size: bytesize::ByteSize,
    /// Model for events that name none.
    #[arg(long, default_value = "fraud_gru")]
    pub default_model: String,
    /// Largest record value accepted (larger: dead letter TOO_LARGE).
    #[arg(long, default_value = "64KiB")]
    pub max_value_size: bytesize::ByteSize,
    /// Largest record key accepted (larger: dead letter TOO_LARGE); every output copies the key.
    #[arg(long, default_value = "4KiB")]
    pub max_key_size: bytesize::ByteSize,
    /// Records per partition batch.
    #[arg(long, default_value_t = 1024, value_parser = at_least_one)]
    pub max_batch: usize,
    /// Records of one key per batch (a hot key's records run one after another; the cap keeps
    /// the batch's other keys from waiting on it).
    #[arg(long, default_value_t = 4, value_parser = at_least_one)]
    pub max_waves: usize,
    /// Scored batches per partition that may wait for their outputs' acknowledgements and state
    /// write while the next batch is scored (waiting batches are committed together).
    #[arg(long, default_value_t = 4, value_parser = at_least_one)]
    pub max_pending_batches: usize,
    /// Records queued per partition before its Kafka partition is paused.
    #[arg(long, default_value_t = 4096, value_parser = at_least_one)]
    pub partition_queue: usize,
    /// The input topic's partition count; the node refuses another (keys would be split from their
    /// state). 0: the count first seen, and any later change stops the node.
    #[arg(long, default_value_t = 0)]
    pub input_partitions: usize,
    /// Bytes queued per partition (keys, values, headers) before its Kafka partition is paused.
    #[arg(long, default_value = "16MiB")]
    pub partition_queue_bytes: bytesize::ByteSize,
    /// Per-record inference deadline, counted from the start of the record's batch on a worker
    /// (waiting for room in the pool or a worker's queue is backpressure, not counted); then
    /// retried, then dead letter TIMEOUT.
    #[arg(long, value_parser = positive_duration, default_value = "2s")]
    pub infer_deadline: Duration,
    /// An event more than this above its key's applied sequence is dead-lettered SEQUENCE_GAP (one
    /// bogus sequence would otherwise make every later event of the key a duplicate).
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_sequence_gap: u64,
    /// Restarts of one partition's actor (after a panic, a store error or a freeze) allowed within
    /// `--partition-restart-window`; one more and the node stops, so the group moves its partitions.
    #[arg(long, default_value_t = 5, value_parser = at_least_one)]
    pub partition_restarts: usize,
    #[arg(long, value_parser = positive_duration, default_value = "60s")]
    pub partition_restart_window: Duration,
    /// A partition with records waiting and no commit for this many inference deadlines is frozen:
    /// its actor is killed and restarted from the stored offset.
    #[arg(long, default_value_t = 10, value_parser = at_least_one)]
    pub frozen_deadlines: usize,
    /// How long shutdown may take to drain partitions before the node exits anyway.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "20s")]
    pub grace: Duration,
    /// Where `/metrics`, `/livez` and `/readyz` are served.
    #[arg(long, default_value = "0.0.0.0:9464")]
    pub http_listen: std::net::SocketAddr,
    /// Where the gRPC health service (grpc.health.v1) is served, and with role worker or both the
    /// Open Inference Protocol (inference.GRPCInferenceService) over this node's workers.
    #[arg(long, default_value = "0.0.0.0:50051")]
    pub grpc_listen: std::net::SocketAddr,
    /// Largest gRPC message received or sent (an inference request or answer).
    #[arg(long, default_value = "4MiB")]
    pub grpc_max_message_size: bytesize::ByteSize,
    /// Concurrent calls per gRPC connection.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub grpc_max_concurrent_streams: u32,
    /// Transport security of the gRPC endpoint: plaintext, tls (grpc_tls_cert and _key) or mtls
    /// (also grpc_tls_client_ca: clients must present a certificate it signed). A worker node
    /// needs it said (plaintext included); unset, a node with role both serves only gRPC health,
    /// in plaintext.
    #[arg(long, value_enum)]
    pub grpc_security: Option<Security>,
    /// PEM certificate chain of the gRPC endpoint (read again when it changes).
    #[arg(long)]
    pub grpc_tls_cert: Option<PathBuf>,
    /// PEM private key of `grpc_tls_cert`.
    #[arg(long)]
    pub grpc_tls_key: Option<PathBuf>,
    /// PEM CA certificate(s) that sign the clients' certificates (mtls).
    #[arg(long)]
    pub grpc_tls_client_ca: Option<PathBuf>,
    /// What this node runs: both (partitions and inference workers in one process), scorer
    /// (partitions; inference on `[inference] worker_endpoints`) or worker (inference workers
    /// only, served over gRPC; no Kafka, no state).
    #[arg(long, value_enum, default_value_t = Role::Both)]
    pub role: Role,
    /// Export spans over OTLP/gRPC to this collector (e.g. http://otel-collector:4317); unset: off.
    #[arg(long)]
    pub otlp_endpoint: Option<String>,
    /// Share of batch traces exported (0..=1); records with a `traceparent` follow its sampled flag.
    #[arg(long, value_parser = parse_ratio, default_value_t = 0.01)]
    pub trace_sample_ratio: f64,
    #[command(flatten)]
    pub inference: InferenceOptions,
}

impl NodeOptions {
    /// Defaults for a node on `bootstrap` with state in `state_dir` (demo, tests, benchmarks).
    pub fn local(bootstrap: &str, state_dir: PathBuf) -> Self {
        let mut node: NodeOptions = crate::node::config::defaults();
        node.ingestion_bootstrap = bootstrap.to_owned();
        node.state_dir = state_dir;
        node.http_listen = ([127, 0, 0, 1], 0).into();
        node.grpc_listen = ([127, 0, 0, 1], 0).into();
        node
    }

    /// This node's name in traces: the static membership id, else the host name.
    pub fn node_name(&self) -> String {
        self.instance_id.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .or_else(|_| std::env::var("HOSTNAME"))
                .unwrap_or_else(|_| "partita".to_owned())
        })
    }

    /// The span exporter's settings, when `otlp_endpoint` is set.
    pub fn otlp(&self) -> Option<Otlp> {
        let endpoint = self.otlp_endpoint.clone().filter(|e| !e.is_empty())?;
        Some(Otlp {
            endpoint,
            sample_ratio: self.trace_sample_ratio,
            node: self.node_name(),
            zone: self.zone.clone(),
        })
    }

    /// Keep state on a local CQL cluster started by [`crate::local::cassandra::LocalCassandra`]
    /// (demo, tests): its contact points, `keyspace`, its datacenter, replication 1.
    pub fn local_cql(&mut self, uri: &str, keyspace: &str) {
        let dc = crate::local::cassandra::DATACENTER.to_owned();
        self.state_backend = Backend::Cql;
        self.cql_uri = uri.to_owned();
        self.cql_keyspace = keyspace.to_owned();
        self.cql_datacenter = Some(dc.clone());
        self.cql_replication = Replication([(dc, 1)].into());
    }

    /// The Kafka cluster of the input topic (and of the changelog topic).
    pub fn ingestion_tier(&self) -> KafkaTier {
        KafkaTier {
            bootstrap: self.ingestion_bootstrap.clone(),
            properties: self.ingestion_properties.clone(),
        }
    }

    /// The CQL backend's settings.
    pub fn cql(&self) -> ScyllaConfig {
        ScyllaConfig {
            keyspace: self.cql_keyspace.clone(),
            replication: self.cql_replication.0.clone(),
            datacenter: self.cql_datacenter.clone(),
            zone: self.cql_datacenter.as_ref().map(|_| self.zone.clone()),
            consistency: self.cql_consistency,
            username: self.cql_username.clone(),
            password: self.cql_password.as_ref().map(|p| p.0.clone()),
            ..ScyllaConfig::new(&self.cql_uri)
        }
    }

    /// Open the configured state store (`[state] backend`).
    pub async fn open_store(&self) -> anyhow::Result<NodeStore> {
        Ok(match self.state_backend {
            Backend::Rocksdb => {
                let local = RocksStore::open(&RocksConfig {
                    sync_wal: self.sync_wal,
                    write_window: self.write_window,
                    ..RocksConfig::new(&self.state_dir)
                })
                .with_context(|| format!("opening the state store in {}", self.state_dir.display()))?;
                if self.changelog_topic.is_empty() {
                    NodeStore::Rocks(local)
                } else {
                    NodeStore::Changelog(ChangelogStore::new(
                        local,
                        self.ingestion_tier(),
                        &self.changelog_topic,
                        &self.group,
                    ))
                }
            }
            Backend::Cql => NodeStore::Cql(
                ScyllaStore::connect(&self.cql())
                    .await
                    .with_context(|| format!("connecting to the CQL state store at {}", self.cql_uri))?,
            ),
        })
    }

    fn limits(&self) -> Limits {
        Limits {
            max_value_bytes: usize::try_from(self.max_value_size.as_u64()).unwrap_or(usize::MAX),
            max_key_bytes: usize::try_from(self.max_key_size.as_u64()).unwrap_or(usize::MAX),
            default_model: Arc::from(self.default_model.as_str()),
            ..Limits::default()
        }
    }
}

/// What a node did, for the caller's report.
#[derive(Debug, Clone)]
pub struct NodeSummary {
    pub counters: Arc<PipelineCounters>,
}

/// A started node: warm models and, with role both, an open store and a running consumer thread.
pub struct Node {
    pool: partita_actors::pool::InferencePool,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    /// Where the HTTP endpoints listen.
    pub http: std::net::SocketAddr,
    /// Where the gRPC services listen (health, and the Open Inference Protocol).
    pub grpc: std::net::SocketAddr,
    oip: Oip,
    /// The partitions' half (role both); `None` on a worker node.
    scoring: Option<Scoring>,
    counters: Arc<PipelineCounters>,
    pub devices: Vec<String>,
    grace: Duration,
}

/// The consumer group's side of a node: the consumer thread with its partition actors, and the
/// standby copies.
struct Scoring {
    consumer: crate::kafka::ConsumerHandle<NodeStore>,
    /// Warm copies of other nodes' partitions (`standby_replicas`), stopped when dropped.
    standby: Option<crate::state::standby::Standby>,
}

impl Node {
    pub async fn start(opts: &NodeOptions) -> anyhow::Result<Self> {
        // Health and metrics first: `/livez` answers (and `/readyz` says why not) during warm-up.
        let metrics = Arc::new(Metrics::new(&opts.zone));
        let health = Arc::new(Health::default());
        let http = serve(opts.http_listen, metrics.clone(), health.clone()).await?;
        let oip = Oip::new(health.clone(), metrics.clone(), opts.infer_deadline);
        let max_message = usize::try_from(opts.grpc_max_message_size.as_u64()).unwrap_or(usize::MAX);
        // Inference is served by a worker node, and by a node with role both whose gRPC
        // security is configured (secure by default: never to anyone by accident).
        let serves_inference = match opts.role {
            Role::Worker => true,
            Role::Both => opts.grpc_security.is_some(),
            Role::Scorer => false,
        };
        let local_workers = opts.role != Role::Scorer;
        let serving = GrpcServing {
            addr: opts.grpc_listen,
            security: opts.grpc_security.unwrap_or(Security::Plaintext),
            cert: opts.grpc_tls_cert.clone(),
            key: opts.grpc_tls_key.clone(),
            client_ca: opts.grpc_tls_client_ca.clone(),
            max_message_size: max_message,
            max_concurrent_streams: opts.grpc_max_concurrent_streams,
        };
        let grpc = serve_grpc(&serving, health.clone(), serves_inference.then(|| oip.clone()))
            .await
            .context("serving gRPC")?;
        let remote = match &opts.inference.worker_endpoints[..] {
            [] => None,
            endpoints => {
                let settings = RemoteSettings {
                    endpoints: endpoints.to_vec(),
                    zone: opts.zone.clone(),
                    breaker_failures: opts.inference.breaker_failures,
                    breaker_open_for: opts.inference.breaker_open_for,
                    max_inflight: usize::try_from(opts.inference.endpoint_max_inflight).unwrap_or(usize::MAX),
                    connect_timeout: Duration::from_secs(1),
                    max_message_size: max_message,
                    tls: opts.inference.worker_tls(),
                };
                let remote: Arc<dyn RemoteWorkers> =
                    Arc::new(RemotePool::start(settings, metrics.clone()).await);
                Some(remote)
            }
        };
        let (pool, _repo) =
            opts.inference.start_with(local_workers, remote).await.context("starting the inference pool")?;
        // Calls from other nodes run on this node's workers only, never passed on.
        oip.set_router(pool.router().local_only());
        health.models_ready.store(true, Ordering::SeqCst);
        let devices = pool.status().await.iter().map(|w| w.device.to_string()).collect();
        let counters = Arc::new(PipelineCounters::default());
        let (scoring, sources) = match opts.role {
            Role::Worker => {
                // A worker node joins no consumer group: ready once a worker is.
                health.joined.store(true, Ordering::SeqCst);
                (None, Sources::without_partitions(counters.clone()))
            }
            Role::Both | Role::Scorer => {
                let (scoring, sources) =
                    Scoring::start(opts, &metrics, &health, pool.router(), counters.clone()).await?;
                (Some(scoring), sources)
            }
        };
        metrics.attach(sources, pool.status_probe());
        tracing::info!(role = ?opts.role, "node started");
        Ok(Self { pool, metrics, health, http, grpc, oip, scoring, counters, devices, grace: opts.grace })
    }

    /// The inference pool's router (this node's workers, then the remote ones).
    pub fn router(&self) -> partita_actors::pool::Router {
        self.pool.router()
    }

    pub fn counters(&self) -> &Arc<PipelineCounters> {
        &self.counters
    }

    /// Partitions this node owns now (none on a worker node).
    pub fn assigned(&self) -> i64 {
        self.scoring.as_ref().map_or(0, |s| s.consumer.context.assigned.load(Ordering::SeqCst))
    }

    /// Total consumer lag over the owned partitions (librdkafka statistics, refreshed each second).
    pub fn lag(&self) -> i64 {
        self.scoring.as_ref().map_or(0, |s| s.consumer.context.lag.lock().unwrap().values().sum())
    }

    /// Run until `shutdown` resolves or the consumer fails, then drain: stop intake, finish
    /// in-flight batches, write state, commit, leave the group, answer the inference calls under
    /// way (new ones are refused `UNAVAILABLE`), stop the workers.
    pub async fn run_until(
        self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<NodeSummary> {
        tokio::pin!(shutdown);
        let router = self.pool.router();
        let mut checked = tokio::time::Instant::now();
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                () = tokio::time::sleep(Duration::from_millis(100)) => {
                    if self.scoring.as_ref().is_some_and(|s| s.consumer.is_finished()) {
                        break;
                    }
                    if checked.elapsed() >= Duration::from_secs(1) {
                        checked = tokio::time::Instant::now();
                        let healthy = router.can_serve();
                        if self.health.workers_healthy.swap(healthy, Ordering::SeqCst) != healthy {
                            tracing::warn!(healthy, "inference workers' health changed");
                        }
                    }
                }
            }
        }
        self.stop().await
    }

    /// Drain in order, within `--grace` plus 10 s for leaving the group and stopping the workers;
    /// past that the node gives up on an orderly stop (nothing past the stored offsets was
    /// committed, so a forced exit loses nothing).
    pub async fn stop(self) -> anyhow::Result<NodeSummary> {
        let bound = self.grace + Duration::from_secs(10);
        tokio::time::timeout(bound, self.stop_in_order()).await.unwrap_or_else(|_| {
            Err(anyhow::anyhow!(
                "the orderly stop took longer than {bound:?} (--grace + 10 s); exiting without finishing it"
            ))
        })
    }

    async fn stop_in_order(self) -> anyhow::Result<NodeSummary> {
        tracing::info!(grace = ?self.grace, "draining");
        let started = tokio::time::Instant::now();
        self.health.draining.store(true, Ordering::SeqCst);
        let mut result = Ok(());
        if let Some(Scoring { consumer, standby }) = self.scoring {
            consumer.request_stop();
            result = consumer.join().await;
            if let Some(standby) = standby {
                // Its thread may be in a group description or a watermark query: joined off the
                // async runtime.
                let _ = tokio::task::spawn_blocking(move || drop(standby)).await;
            }
        }
        while self.oip.in_flight() > 0 && started.elapsed() < self.grace {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.metrics.detach();
        self.pool.shutdown().await;
        result.map(|()| NodeSummary { counters: self.counters })
    }
}

impl Scoring {
    /// Open the store, start the consumer (and the standby copies): the node's partitions.
    async fn start(
        opts: &NodeOptions,
        metrics: &Arc<Metrics>,
        health: &Arc<Health>,
        router: partita_actors::pool::Router,
        counters: Arc<PipelineCounters>,
    ) -> anyhow::Result<(Self, Sources)> {
        let store = opts.open_store().await?;
        let store_for_standby = match &store {
            NodeStore::Changelog(changelog) => {
                changelog.check_topic(&opts.input_topic).await?;
                Some(changelog.clone())
            }
            _ => None,
        };
        let cache = Arc::new(StateCache::new(store, opts.cache_size.as_u64(), metrics.clone()));
        let processing = KafkaTier {
            bootstrap: opts.processing_bootstrap.clone().unwrap_or_else(|| opts.ingestion_bootstrap.clone()),
            properties: opts.processing_properties.clone(),
        };
        let ingestion = opts.ingestion_tier();
        crate::kafka::warn_on_weak_durability(&processing, &[&opts.scores_topic, &opts.dlq_topic]).await;
        let commits = crossbeam_channel::unbounded();
        let sink = Arc::new(KafkaSink::new(
            processing,
            opts.scores_topic.clone(),
            opts.dlq_topic.clone(),
            commits.0.clone(),
        )?);
        let wiring = Wiring {
            topic: Arc::from(opts.input_topic.as_str()),
            cache: cache.clone(),
            router,
            sink,
            limits: Arc::new(opts.limits()),
            config: PartitionConfig {
                max_batch: opts.max_batch,
                max_waves: opts.max_waves.max(1),
                max_pending_batches: opts.max_pending_batches.max(1),
                infer_deadline: opts.infer_deadline,
                slo: opts.inference.slo,
                max_sequence_gap: opts.max_sequence_gap,
                ..PartitionConfig::default()
            },
            counters: counters.clone(),
            observer: metrics.clone(),
            tracer: Arc::new(OtelTracer::new(&opts.node_name(), &opts.zone)),
            health: health.clone(),
            queue_capacity: opts.partition_queue,
            queue_bytes: usize::try_from(opts.partition_queue_bytes.as_u64()).unwrap_or(usize::MAX),
            input_partitions: (opts.input_partitions > 0).then_some(opts.input_partitions),
            drain_timeout: opts.grace,
            restart: RestartPolicy {
                max_restarts: opts.partition_restarts,
                within: opts.partition_restart_window,
                ..RestartPolicy::default()
            },
            frozen_after: opts
                .infer_deadline
                .saturating_mul(u32::try_from(opts.frozen_deadlines).unwrap_or(u32::MAX)),
        };
        // How the standby finds this node among the group's members: the configured client.id,
        // else one of its own.
        let client_id = opts.ingestion_properties.iter().rev().find(|(k, _)| k == "client.id").map_or_else(
            || format!("partita-{}-{}", opts.node_name(), std::process::id()),
            |(_, v)| v.clone(),
        );
        let standby_store = match (&store_for_standby, opts.standby_replicas) {
            (Some(store), replicas) if replicas > 0 => Some(store.clone()),
            _ => None,
        };
        let settings = ConsumerSettings {
            client_id: client_id.clone(),
            group: opts.group.clone(),
            zone: opts.zone.clone(),
            instance_id: opts.instance_id.clone(),
            session_timeout: opts.session_timeout,
        };
        let consumer = start_consumer(&ingestion, &settings, wiring, commits.1).await?;
        let standby = match standby_store {
            Some(store) => Some(crate::state::standby::Standby::start(
                store,
                crate::state::standby::StandbySettings {
                    group: opts.group.clone(),
                    input_topic: opts.input_topic.clone(),
                    client_id,
                    replicas: opts.standby_replicas,
                },
            )?),
            None => None,
        };
        let context = consumer.context.clone();
        let partitions = consumer.context.clone();
        let fetch = consumer.context.clone();
        let rocks = cache.store().rocks().cloned();
        let sources = Sources {
            counters,
            cache: Box::new(move || cache.stats()),
            rocks,
            lag: Box::new(move || context.lag.lock().unwrap().iter().map(|(p, l)| (*p, *l)).collect()),
            fetched_from: Box::new(move || {
                fetch.fetched_from.lock().unwrap().iter().map(|(p, b)| (*p, i64::from(*b))).collect()
            }),
            partitions: Box::new(move || {
                partitions.partition_states().into_iter().map(|(p, s, n)| (p, s.as_str(), n)).collect()
            }),
            standby: match &standby {
                Some(s) => {
                    let copies = s.copies.clone();
                    Box::new(move || copies.lock().unwrap().iter().map(|(p, at)| (*p, *at)).collect())
                }
                None => Box::new(Vec::new),
            },
            workers: Default::default(),
        };
        Ok((Self { consumer, standby }, sources))
    }
}

/// A secret setting: parsed like a string, shown as `"***"` (check-config prints the options).
#[derive(Clone, PartialEq, Eq)]
pub struct Redacted(pub String);

impl std::str::FromStr for Redacted {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"***\"")
    }
}
