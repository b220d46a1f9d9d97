//! Wiring of the inference half: options, device selection, and starting the worker pool on the
//! model repository with the LibTorch adapter.

pub mod affinity;
pub mod oip;
pub mod remote;
pub mod repository;
pub mod tch;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};
use partita_actors::inference::Device;
use partita_actors::model::BatchPolicy;
use partita_actors::pool::remote::RemoteWorkers;
use partita_actors::pool::{InferencePool, PoolConfig, RestartPolicy};

use repository::ModelRepository;
use tch::{TchFactory, cuda_device_count, set_intra_op_threads};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceChoice {
    /// One worker per CUDA GPU if libtorch sees any, else CPU workers.
    Auto,
    Cpu,
    Cuda,
}

/// How the inference pool runs. Flags of `partita models` (and later of `partita node`).
#[derive(Debug, Clone, Args)]
pub struct InferenceOptions {
    /// The model repository: <model>/config.toml and <model>/<version>/model.pt.
    #[arg(long, env = "PARTITA_MODEL_REPOSITORY", default_value = "models")]
    pub repository: PathBuf,
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
    /// Workers when running on CPU (each runs one batch at a time).
    #[arg(long, default_value_t = 1)]
    pub cpu_workers: usize,
    /// libtorch intra-op threads (process-wide); 0 = the number of CPU cores. One by default:
    /// per-event models this small run fastest on one thread, and the other cores stay free for
    /// the consumer, the committers and the Kafka clients (B4 on 2 cores: capacity 26.7 K/s with
    /// one thread against 15.7 K/s with two, p50 at 1000/s 43 ms against 168 ms). Large models
    /// on CPU may want more.
    #[arg(long, default_value_t = 1)]
    pub intra_op_threads: usize,
    /// Cores the inference threads run on (a CPU list: `1`, `2-3,6`); empty: wherever the
    /// scheduler puts them. Each worker's device and feeder threads, and libtorch's intra-op
    /// threads they start, are pinned to these cores (with a GPU: the cores NUMA-local to it,
    /// from `nvidia-smi topo -m`).
    #[arg(long, value_parser = affinity::parse_cpu_list, default_value = "")]
    pub cpu_affinity: affinity::CpuList,
    /// Rows in flight across the pool before callers wait (backpressure); a wave of n rows takes n.
    #[arg(long, default_value_t = 4096)]
    pub max_inflight: usize,
    /// Ignore the models' dynamic batching and run one request per forward (for comparison).
    #[arg(long)]
    pub no_batching: bool,
    /// The budget from an event's time to its score (e.g. `30ms`, 1 ms to 1 h): deadline-aware
    /// batching. Each request then carries its events' due time, and a batch grows (past the
    /// model's `max_queue_delay`) while it can still be computed in time: its expected compute
    /// time (learned from the batches run), that of two full batches, and 1 ms before the due
    /// time. Leave the time the score's delivery takes out of it. Unset: the models' fixed
    /// `max_queue_delay`.
    #[arg(long, value_parser = parse_slo)]
    pub slo: Option<Duration>,
    /// A worker whose model call runs longer than this is hung: its requests go to another
    /// worker and a new worker replaces it.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    pub worker_hang_after: Duration,
    /// Inference workers on other nodes (role worker), ZONE=HOST:PORT[,...]: used while no
    /// worker of this node is healthy (a scorer node has none), this zone's first. A host name
    /// may resolve to several addresses (a headless service): each is an endpoint.
    #[arg(long, value_delimiter = ',')]
    pub worker_endpoints: Vec<remote::WorkerEndpoint>,
    /// Consecutive failures (refused, broken or timed-out calls) that open a remote worker's
    /// circuit breaker.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub breaker_failures: u32,
    /// How long an open breaker keeps calls away from its worker before one probe call.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    pub breaker_open_for: Duration,
    /// Rows in flight to one remote worker; past it calls go to the next one.
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u64).range(1..))]
    pub endpoint_max_inflight: u64,
    /// Transport security of the calls to remote workers: plaintext, tls (worker_tls_ca) or mtls
    /// (also this node's worker_tls_cert and _key). Needs saying (plaintext included) with
    /// worker_endpoints.
    #[arg(long, value_enum)]
    pub worker_security: Option<crate::node::grpc::Security>,
    /// PEM CA certificate(s) that sign the workers' certificates.
    #[arg(long)]
    pub worker_tls_ca: Option<PathBuf>,
    /// PEM client certificate chain this node presents to workers (mtls).
    #[arg(long)]
    pub worker_tls_cert: Option<PathBuf>,
    /// PEM private key of `worker_tls_cert`.
    #[arg(long)]
    pub worker_tls_key: Option<PathBuf>,
    /// The name the workers' certificates are checked against (default: each endpoint's host).
    #[arg(long)]
    pub worker_tls_domain: Option<String>,
}

/// The longest `--slo`; also the most time left a remote request's due time may claim.
pub const MAX_SLO: Duration = Duration::from_secs(3600);

/// `--slo`: a duration from 1 ms to 1 h.
fn parse_slo(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    let range = Duration::from_millis(1)..=MAX_SLO;
    if range.contains(&d) { Ok(d) } else { Err(format!("{text} is outside 1ms..=1h")) }
}

impl Default for InferenceOptions {
    /// The flags' defaults (one source: clap's).
    fn default() -> Self {
        crate::node::config::defaults()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Repository(#[from] crate::inference::repository::RepoError),
    #[error("--device cuda: libtorch sees no CUDA device (CPU-only build, or no GPU)")]
    NoCuda,
    #[error("--cpu-workers must be at least 1")]
    NoWorkers,
    #[error("--cpu-affinity {0}")]
    Affinity(String),
    #[error("starting the worker pool: {0}")]
    Pool(#[from] partita_actors::pool::PoolError),
}

impl InferenceOptions {
    pub fn devices(&self) -> Result<Vec<Device>, StartError> {
        let gpus = cuda_device_count();
        let cpu = || {
            if self.cpu_workers == 0 {
                Err(StartError::NoWorkers)
            } else {
                Ok(vec![Device::Cpu; self.cpu_workers])
            }
        };
        match self.device {
            DeviceChoice::Cuda if gpus == 0 => Err(StartError::NoCuda),
            DeviceChoice::Cuda => Ok((0..gpus).map(Device::Cuda).collect()),
            DeviceChoice::Auto if gpus > 0 => Ok((0..gpus).map(Device::Cuda).collect()),
            DeviceChoice::Auto | DeviceChoice::Cpu => cpu(),
        }
    }

    /// The remote workers' TLS settings (`None`: plaintext).
    pub fn worker_tls(&self) -> Option<remote::ClientTls> {
        use crate::node::grpc::Security;
        let security = self.worker_security.unwrap_or(Security::Plaintext);
        let ca = self.worker_tls_ca.clone().filter(|_| security != Security::Plaintext)?;
        let identity = match (&self.worker_tls_cert, &self.worker_tls_key) {
            (Some(c), Some(k)) if security == Security::Mtls => Some((c.clone(), k.clone())),
            _ => None,
        };
        Some(remote::ClientTls { ca, identity, domain: self.worker_tls_domain.clone() })
    }

    /// Load and validate the repository, then start one warmed-up worker per device.
    pub async fn start(&self) -> Result<(InferencePool, ModelRepository), StartError> {
        self.start_with(true, None).await
    }

    /// [`InferenceOptions::start`] with `remote` workers beside this node's; `local: false`
    /// starts none here (a scorer node: the repository's configs give the models' shapes).
    pub async fn start_with(
        &self,
        local: bool,
        remote: Option<Arc<dyn RemoteWorkers>>,
    ) -> Result<(InferencePool, ModelRepository), StartError> {
        let repo = ModelRepository::load(&self.repository)?;
        let devices = if local { self.devices()? } else { Vec::new() };
        let threads = if self.intra_op_threads == 0 {
            std::thread::available_parallelism().map_or(1, usize::from)
        } else {
            self.intra_op_threads
        };
        set_intra_op_threads(threads);
        let mut specs = repo.specs();
        if self.no_batching {
            for s in &mut specs {
                s.batch = BatchPolicy::unbatched();
            }
        }
        if local && !self.cpu_affinity.is_empty() {
            affinity::check_available(&self.cpu_affinity).map_err(StartError::Affinity)?;
        }
        let factory = TchFactory::new(repo.models.iter().map(|m| m.path.clone()).collect())
            .pinned_to(self.cpu_affinity.clone());
        let config = PoolConfig {
            devices,
            max_inflight: self.max_inflight,
            max_retries: 2,
            retry_backoff: Duration::from_millis(100),
            restart: RestartPolicy::default(),
            hang_after: Some(self.worker_hang_after),
            remote,
        };
        let pool = InferencePool::start(config, specs, Arc::new(factory)).await?;
        Ok((pool, repo))
    }
}
