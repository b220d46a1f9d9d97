//! Remote inference workers: the router's [`RemoteWorkers`] over the Open Inference Protocol
//! (gRPC) of worker nodes.
//!
//! **Endpoints** come from `[inference] worker_endpoints` as `ZONE=HOST:PORT`; a host name
//! (a Kubernetes headless service) is resolved again every [`RESOLVE_EVERY`], each address an
//! endpoint of its own.
//!
//! **Routing order**: the router uses its own workers first (none on a scorer node); then among
//! the endpoints that are healthy, whose breaker is not open and that have room (`max_inflight`
//! rows), those in this node's zone before the others, the least loaded first. An endpoint that
//! refuses without running anything (connection refused, draining, overloaded) is skipped for
//! the next within the same call.
//!
//! **Health**: each endpoint's `grpc.health.v1` status (`""`), or OIP `ServerReady` where the
//! server has no health service, polled every [`HEALTH_EVERY`] with that as the timeout.
//!
//! **Circuit breaker** per endpoint ([`Breaker`]): `failures` consecutive failures (a refused
//! connection, a call that broke or timed out, an answer that does not fit the model) open it
//! for `open_for`; then one call goes through as a probe (half-open): success closes it, failure
//! opens it again.
//!
//! **Traces**: the call carries the `traceparent` of the span it runs in (a partition's batch
//! span) as gRPC metadata; the worker's `partita.infer` span is its child.
//!
//! **Transport security** (`[inference] worker_security`): TLS checks each worker's
//! certificate against `worker_tls_ca` for the endpoint's host name (or `worker_tls_domain`);
//! mutual TLS also presents `worker_tls_cert`. The files are read again with each resolution:
//! when they changed, every endpoint connects again with them.
//!
//! **Deadlines** travel as the gRPC deadline (`grpc-timeout`); the call is also cancelled here
//! when it passes. A call that broke after it was sent is `Lost` (the rows may have run: the
//! router goes on row by row, the poison-row rule of a local worker's death); the model failing
//! on one of several rows is `RowFailed` (row by row too).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use partita_actors::inference::{Device, InferError, InferRows, Served};
use partita_actors::model::ModelSpec;
use partita_actors::pool::remote::{RemoteAnswer, RemoteWorkers};
use partita_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use partita_proto::inference::model_infer_request::InferInputTensor;
use partita_proto::inference::{
    InferParameter, ModelInferRequest, ModelInferResponse, ServerReadyRequest, infer_parameter,
};
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::telemetry::Metrics;

/// How often each endpoint's health is checked (and the check's timeout).
pub const HEALTH_EVERY: Duration = Duration::from_secs(1);
/// How often endpoint host names are resolved again.
pub const RESOLVE_EVERY: Duration = Duration::from_secs(10);
/// How long one resolution may take before the previous addresses are kept.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);

/// One configured worker address: `ZONE=HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerEndpoint {
    pub zone: String,
    pub host: String,
    pub port: u16,
}

impl std::str::FromStr for WorkerEndpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let parsed = s.trim().split_once('=').and_then(|(zone, addr)| {
            let (host, port) = addr.rsplit_once(':')?;
            let port = port.parse::<u16>().ok()?;
            (!zone.is_empty() && !host.is_empty()).then(|| Self {
                zone: zone.to_owned(),
                host: host.trim_start_matches('[').trim_end_matches(']').to_owned(),
                port,
            })
        });
        parsed.ok_or_else(|| format!("expected ZONE=HOST:PORT, got {s:?}"))
    }
}

/// The remote workers' settings.
#[derive(Debug, Clone)]
pub struct RemoteSettings {
    pub endpoints: Vec<WorkerEndpoint>,
    /// This node's zone: its endpoints come first.
    pub zone: String,
    /// Consecutive failures that open an endpoint's breaker.
    pub breaker_failures: u32,
    /// How long an open breaker stays open before a probe.
    pub breaker_open_for: Duration,
    /// Rows in flight per endpoint; a call that would pass it goes elsewhere (a call alone on
    /// an endpoint always may).
    pub max_inflight: usize,
    pub connect_timeout: Duration,
    pub max_message_size: usize,
    /// TLS to the workers; plaintext when `None`.
    pub tls: Option<ClientTls>,
}

/// TLS settings of the calls to workers (files read again when they change).
#[derive(Debug, Clone)]
pub struct ClientTls {
    /// PEM CA certificate(s) the workers' certificates are checked against.
    pub ca: PathBuf,
    /// PEM certificate chain and key this node presents (mutual TLS).
    pub identity: Option<(PathBuf, PathBuf)>,
    /// The name the workers' certificates must hold; default: each endpoint's host.
    pub domain: Option<String>,
}

/// The TLS files' contents: CA, and certificate and key.
type TlsPem = (Vec<u8>, Option<(Vec<u8>, Vec<u8>)>);

/// A circuit breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    /// Calls are not sent until the instant; then one probe.
    Open {
        until: Instant,
    },
    /// One probe is under way (`true`) or may go (`false`).
    HalfOpen {
        probing: bool,
    },
}

/// Opens after `threshold` consecutive failures for `open_for`, then lets one probe through.
#[derive(Debug, Clone)]
pub struct Breaker {
    threshold: u32,
    open_for: Duration,
    failures: u32,
    state: BreakerState,
}

impl Breaker {
    pub fn new(threshold: u32, open_for: Duration) -> Self {
        Self { threshold: threshold.max(1), open_for, failures: 0, state: BreakerState::Closed }
    }

    /// The state as of `now` (an open breaker whose time is up is half-open).
    pub fn state(&self, now: Instant) -> BreakerState {
        match self.state {
            BreakerState::Open { until } if now >= until => BreakerState::HalfOpen { probing: false },
            s => s,
        }
    }

    /// Whether a call may be sent now; a half-open breaker lets one through and counts it as
    /// its probe.
    pub fn try_pass(&mut self, now: Instant) -> bool {
        match self.state(now) {
            BreakerState::Closed => true,
            BreakerState::Open { .. } | BreakerState::HalfOpen { probing: true } => false,
            BreakerState::HalfOpen { probing: false } => {
                self.state = BreakerState::HalfOpen { probing: true };
                true
            }
        }
    }

    /// Whether a call could be sent now (without taking the probe).
    pub fn would_pass(&self, now: Instant) -> bool {
        matches!(self.state(now), BreakerState::Closed | BreakerState::HalfOpen { probing: false })
    }

    /// A call let through that ended without news (cancelled): a half-open breaker's probe may
    /// go again.
    pub fn abandon(&mut self) {
        if self.state == (BreakerState::HalfOpen { probing: true }) {
            self.state = BreakerState::HalfOpen { probing: false };
        }
    }

    pub fn success(&mut self) {
        self.failures = 0;
        self.state = BreakerState::Closed;
    }

    /// A failed call; `true` when it opened the breaker. The count is kept until a success, so
    /// a failed probe opens it again.
    pub fn failure(&mut self, now: Instant) -> bool {
        self.failures = self.failures.saturating_add(1);
        let was_open = matches!(self.state, BreakerState::Open { until } if now < until);
        if self.failures >= self.threshold {
            self.state = BreakerState::Open { until: now + self.open_for };
        }
        !was_open && self.failures >= self.threshold
    }
}

#[derive(Debug)]
struct Endpoint {
    addr: SocketAddr,
    zone: String,
    /// `HOST:PORT (ADDRESS)` for logs and metrics.
    label: String,
    client: GrpcInferenceServiceClient<Channel>,
    health: HealthClient<Channel>,
    healthy: AtomicBool,
    breaker: Mutex<Breaker>,
    in_flight: AtomicUsize,
}

/// The remote workers; cheap to clone. Background health checks and name resolution run while
/// a clone lives.
#[derive(Debug, Clone)]
pub struct RemotePool {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    settings: RemoteSettings,
    endpoints: RwLock<Vec<Arc<Endpoint>>>,
    metrics: Arc<Metrics>,
    /// The TLS files as last read (endpoints are made again when they change).
    tls_pem: Mutex<Option<TlsPem>>,
    /// Notified when a call ends (room on its endpoint).
    freed: tokio::sync::Notify,
}

impl RemotePool {
    /// Resolve the endpoints and check their health once, then keep both up to date in the
    /// background.
    pub async fn start(settings: RemoteSettings, metrics: Arc<Metrics>) -> Self {
        let inner = Arc::new(Inner {
            settings,
            endpoints: RwLock::default(),
            metrics,
            tls_pem: Mutex::default(),
            freed: tokio::sync::Notify::new(),
        });
        inner.resolve().await;
        inner.check_health().await;
        let weak = Arc::downgrade(&inner);
        tokio::spawn(background(weak));
        Self { inner }
    }

    /// Each endpoint: its label, zone, health and breaker state, rows in flight.
    pub fn status(&self) -> Vec<(String, String, bool, BreakerState, usize)> {
        let now = Instant::now();
        self.inner
            .endpoints()
            .iter()
            .map(|e| {
                (
                    e.label.clone(),
                    e.zone.clone(),
                    e.healthy.load(Ordering::SeqCst),
                    e.breaker.lock().unwrap().state(now),
                    e.in_flight.load(Ordering::SeqCst),
                )
            })
            .collect()
    }
}

async fn background(inner: Weak<Inner>) {
    let mut resolved = Instant::now();
    loop {
        tokio::time::sleep(HEALTH_EVERY).await;
        let Some(inner) = inner.upgrade() else { return };
        if resolved.elapsed() >= RESOLVE_EVERY {
            inner.resolve().await;
            resolved = Instant::now();
        }
        inner.check_health().await;
    }
}

impl RemoteWorkers for RemotePool {
    fn available(&self) -> bool {
        let now = Instant::now();
        self.inner
            .endpoints()
            .iter()
            .any(|e| e.healthy.load(Ordering::SeqCst) && e.breaker.lock().unwrap().would_pass(now))
    }

    fn infer(
        &self,
        spec: &ModelSpec,
        rows: Arc<InferRows>,
        deadline: Option<Duration>,
    ) -> BoxFuture<'static, RemoteAnswer> {
        let inner = self.inner.clone();
        let spec = spec.clone();
        Box::pin(async move { inner.infer(&spec, &rows, deadline).await })
    }
}

/// How one call to one endpoint went.
enum Outcome {
    Answered(RemoteAnswer),
    /// Nothing ran there (connection refused, the node refused): try the next endpoint.
    Refused,
    /// The endpoint answered what does not fit the model (a scorer and worker configured with
    /// different models), or refused this node's credentials: a failure of the endpoint (it is
    /// misconfigured); try the next.
    Mismatch(String),
}

impl Inner {
    fn endpoints(&self) -> Vec<Arc<Endpoint>> {
        self.endpoints.read().unwrap().clone()
    }

    /// Read the TLS files; `true` when they changed since the last read (or could not be read:
    /// the previous contents stay).
    fn tls_changed(&self) -> bool {
        let Some(tls) = &self.settings.tls else { return false };
        let read = || -> std::io::Result<TlsPem> {
            let identity = match &tls.identity {
                Some((cert, key)) => Some((std::fs::read(cert)?, std::fs::read(key)?)),
                None => None,
            };
            Ok((std::fs::read(&tls.ca)?, identity))
        };
        match read().and_then(|pem| check_pem(&pem).map(|()| pem)) {
            Ok(pem) => {
                let mut last = self.tls_pem.lock().unwrap();
                let changed = last.as_ref() != Some(&pem);
                if changed && last.is_some() {
                    tracing::info!("worker TLS files changed: connecting again with them");
                }
                *last = Some(pem);
                changed
            }
            Err(e) => {
                tracing::warn!(error = %e, "the worker TLS files do not load; keeping the previous ones");
                false
            }
        }
    }

    /// Resolve every configured name; keep the endpoints whose address stays (all are made
    /// again when the TLS files changed).
    async fn resolve(&self) {
        let mut wanted: Vec<(String, SocketAddr, String, String)> = Vec::new();
        let current = self.endpoints();
        for e in &self.settings.endpoints {
            let lookup = tokio::net::lookup_host((e.host.as_str(), e.port));
            let addrs: Vec<SocketAddr> = match tokio::time::timeout(RESOLVE_TIMEOUT, lookup).await {
                Ok(Ok(addrs)) => addrs.collect(),
                failed => {
                    let error = match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => format!("no answer within {RESOLVE_TIMEOUT:?}"),
                    };
                    // Keep what the name resolved to before: a resolver's hiccup must not empty
                    // a zone.
                    tracing::warn!(host = %e.host, %error, "resolving a worker endpoint; keeping its previous addresses");
                    let prefix = format!("{}:{} (", e.host, e.port);
                    current
                        .iter()
                        .filter(|c| c.zone == e.zone && c.label.starts_with(&prefix))
                        .map(|c| c.addr)
                        .collect()
                }
            };
            for addr in addrs {
                if !wanted.iter().any(|(z, a, _, _)| *a == addr && *z == e.zone) {
                    let label = format!("{}:{} ({addr})", e.host, e.port);
                    wanted.push((e.zone.clone(), addr, label, e.host.clone()));
                }
            }
        }
        let old: HashMap<(String, SocketAddr), Arc<Endpoint>> = if self.tls_changed() {
            HashMap::new()
        } else {
            self.endpoints().into_iter().map(|e| ((e.zone.clone(), e.addr), e)).collect()
        };
        let mut next = Vec::with_capacity(wanted.len());
        for (zone, addr, label, host) in wanted {
            match old.get(&(zone.clone(), addr)) {
                Some(e) => next.push(e.clone()),
                None => match self.endpoint(zone, addr, label, &host) {
                    Ok(e) => {
                        tracing::info!(endpoint = %e.label, zone = %e.zone, "worker endpoint added");
                        next.push(Arc::new(e));
                    }
                    Err(err) => tracing::warn!(%addr, error = %err, "a worker endpoint"),
                },
            }
        }
        for e in old.values() {
            if !next.iter().any(|n| Arc::ptr_eq(n, e)) {
                tracing::info!(endpoint = %e.label, zone = %e.zone, "worker endpoint gone");
            }
        }
        // Made again (TLS files changed): keep the health the old ones had until checked.
        let previous = self.endpoints();
        for e in &next {
            if let Some(prev) = previous.iter().find(|p| p.addr == e.addr && !Arc::ptr_eq(p, e)) {
                e.healthy.store(prev.healthy.load(Ordering::SeqCst), Ordering::SeqCst);
            }
        }
        *self.endpoints.write().unwrap() = next;
    }

    fn endpoint(
        &self,
        zone: String,
        addr: SocketAddr,
        label: String,
        host: &str,
    ) -> Result<Endpoint, tonic::transport::Error> {
        let pem = self.tls_pem.lock().unwrap().clone();
        let scheme = if pem.is_some() { "https" } else { "http" };
        let mut channel = tonic::transport::Endpoint::from_shared(format!("{scheme}://{addr}"))?
            .connect_timeout(self.settings.connect_timeout)
            .tcp_nodelay(true);
        if let (Some(tls), Some((ca, identity))) = (&self.settings.tls, pem) {
            use tonic::transport::{Certificate, ClientTlsConfig, Identity};
            let mut config = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .domain_name(tls.domain.clone().unwrap_or_else(|| host.to_owned()));
            if let Some((cert, key)) = identity {
                config = config.identity(Identity::from_pem(cert, key));
            }
            channel = channel.tls_config(config)?;
        }
        let channel = channel.connect_lazy();
        let size = self.settings.max_message_size;
        Ok(Endpoint {
            addr,
            zone,
            label,
            client: GrpcInferenceServiceClient::new(channel.clone())
                .max_decoding_message_size(size)
                .max_encoding_message_size(size),
            health: HealthClient::new(channel),
            healthy: AtomicBool::new(false),
            breaker: Mutex::new(Breaker::new(self.settings.breaker_failures, self.settings.breaker_open_for)),
            in_flight: AtomicUsize::new(0),
        })
    }

    async fn check_health(&self) {
        let endpoints = self.endpoints();
        let checks = endpoints.iter().map(|e| async move {
            let ready = tokio::time::timeout(HEALTH_EVERY, serving(e)).await.unwrap_or(false);
            if e.healthy.swap(ready, Ordering::SeqCst) != ready {
                tracing::info!(endpoint = %e.label, zone = %e.zone, healthy = ready, "worker endpoint health changed");
            }
            let state = e.breaker.lock().unwrap().state(Instant::now());
            self.metrics.remote_endpoint(&e.label, &e.zone, ready, state);
        });
        futures::future::join_all(checks).await;
    }

    /// Endpoints that may take `rows` rows now, this zone's first, then the least loaded;
    /// `tried` excluded.
    fn candidates(&self, rows: usize, tried: &[SocketAddr]) -> Vec<Arc<Endpoint>> {
        let now = Instant::now();
        let mut out: Vec<Arc<Endpoint>> = self
            .endpoints()
            .into_iter()
            .filter(|e| {
                let load = e.in_flight.load(Ordering::SeqCst);
                !tried.contains(&e.addr)
                    && e.healthy.load(Ordering::SeqCst)
                    && e.breaker.lock().unwrap().would_pass(now)
                    && (load == 0 || load + rows <= self.settings.max_inflight)
            })
            .collect();
        out.sort_by_key(|e| (e.zone != self.settings.zone, e.in_flight.load(Ordering::SeqCst)));
        out
    }

    async fn infer(&self, spec: &ModelSpec, rows: &InferRows, deadline: Option<Duration>) -> RemoteAnswer {
        // One budget for the whole try, whichever endpoints it takes.
        let until = deadline.map(|d| Instant::now() + outer_timeout(d));
        let mut tried = Vec::new();
        loop {
            // Made before looking, so room freed meanwhile is not missed.
            let freed = self.freed.notified();
            let now = Instant::now();
            let candidates = self.candidates(rows.rows, &tried);
            let Some(e) = candidates.into_iter().find(|e| e.breaker.lock().unwrap().try_pass(now)) else {
                if !self.full(&tried) {
                    return RemoteAnswer::Unavailable;
                }
                // Every endpoint that could take the rows is at its limit: wait for room
                // (backpressure), within the budget.
                match until {
                    Some(until) if now >= until => return RemoteAnswer::TimedOut,
                    Some(until) => {
                        let _ = tokio::time::timeout(until - now, freed).await;
                    }
                    None => freed.await,
                }
                continue;
            };
            tried.push(e.addr);
            let remaining = until.map(|u| u.saturating_duration_since(Instant::now()));
            if remaining.is_some_and(|r| r.is_zero()) {
                e.breaker.lock().unwrap().abandon();
                return RemoteAnswer::TimedOut;
            }
            let started = Instant::now();
            let (outcome, code) = {
                let _call = InFlight::enter(&e, rows.rows, &self.freed);
                call(&e, spec, rows, deadline, remaining).await
            };
            self.metrics.remote_call(&e.label, &e.zone, code, started.elapsed());
            let failed = |e: &Endpoint| {
                if e.breaker.lock().unwrap().failure(Instant::now()) {
                    tracing::warn!(endpoint = %e.label, zone = %e.zone, "circuit breaker opened");
                    self.metrics.remote_breaker_opened(&e.label, &e.zone);
                }
            };
            match outcome {
                Outcome::Answered(answer) => {
                    match answer {
                        RemoteAnswer::TimedOut | RemoteAnswer::Lost => {
                            failed(&e);
                            // Out of the choice until its health check passes again, so the
                            // router's next try goes elsewhere when there is an elsewhere.
                            e.healthy.store(false, Ordering::SeqCst);
                        }
                        _ => e.breaker.lock().unwrap().success(),
                    }
                    return answer;
                }
                Outcome::Refused => {
                    failed(&e);
                    // Not ready for calls: wait for its health check to say it is again.
                    e.healthy.store(false, Ordering::SeqCst);
                }
                Outcome::Mismatch(why) => {
                    failed(&e);
                    tracing::error!(endpoint = %e.label, model = %spec.name, "{why}; is the worker configured like this node (models, TLS)?");
                }
            }
        }
    }

    /// Whether some endpoint not in `tried` would take a call but for its row limit.
    fn full(&self, tried: &[SocketAddr]) -> bool {
        let now = Instant::now();
        self.endpoints().iter().any(|e| {
            !tried.contains(&e.addr)
                && e.healthy.load(Ordering::SeqCst)
                && e.breaker.lock().unwrap().would_pass(now)
        })
    }
}

/// A call's rows counted in its endpoint's load while it runs. Dropped without [`Breaker`]
/// news (the caller gave up: a partition stopped, a deadline passed), a half-open breaker's
/// probe is given back, so the endpoint is not shut out for good.
struct InFlight<'a> {
    endpoint: &'a Endpoint,
    rows: usize,
    freed: &'a tokio::sync::Notify,
}

impl<'a> InFlight<'a> {
    fn enter(endpoint: &'a Endpoint, rows: usize, freed: &'a tokio::sync::Notify) -> Self {
        endpoint.in_flight.fetch_add(rows, Ordering::SeqCst);
        Self { endpoint, rows, freed }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.endpoint.in_flight.fetch_sub(self.rows, Ordering::SeqCst);
        // A finished call has settled its probe already (success or failure) before the guard
        // drops only when cancelled; `abandon` changes nothing then.
        self.endpoint.breaker.lock().unwrap().abandon();
        self.freed.notify_waiters();
    }
}

/// The gRPC deadline of a call whose rows must be scored within `deadline` of their batch's
/// start on the worker: room for the wait in its queue and the connection, so a backlog there is
/// backpressure and not a timeout, while a worker that hangs is still given up on.
pub fn outer_timeout(deadline: Duration) -> Duration {
    deadline.saturating_mul(2) + Duration::from_secs(1)
}

/// Whether TLS files hold what they should: a certificate in the CA file, and a certificate
/// chain and a private key in the identity's (a rotation half written is refused).
fn check_pem((ca, identity): &TlsPem) -> std::io::Result<()> {
    use tokio_rustls::rustls::pki_types::pem::PemObject as _;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certificates = |pem: &[u8], what: &str| -> std::io::Result<()> {
        let all: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem).collect();
        match all {
            Ok(c) if !c.is_empty() => Ok(()),
            _ => Err(std::io::Error::other(format!("{what}: no PEM certificate"))),
        }
    };
    certificates(ca, "worker_tls_ca")?;
    if let Some((cert, key)) = identity {
        certificates(cert, "worker_tls_cert")?;
        PrivateKeyDer::from_pem_slice(key)
            .map_err(|e| std::io::Error::other(format!("worker_tls_key: {e}")))?;
    }
    Ok(())
}

/// Whether the endpoint is ready: its gRPC health status, or OIP `ServerReady` without one.
async fn serving(e: &Endpoint) -> bool {
    let check = tonic_health::pb::HealthCheckRequest { service: String::new() };
    match e.health.clone().check(check).await {
        Ok(r) => r.into_inner().status == ServingStatus::Serving as i32,
        Err(s) if s.code() == tonic::Code::Unimplemented => {
            e.client.clone().server_ready(ServerReadyRequest {}).await.is_ok_and(|r| r.into_inner().ready)
        }
        Err(s) => {
            tracing::debug!(endpoint = %e.label, status = ?s, "worker health check failed");
            false
        }
    }
}

/// An FP32 input of `rows` rows of `steps` steps of `width` values: `[rows, width]` for one step,
/// `[rows, steps, width]` for a sequence model's rows of several.
fn tensor(name: &str, rows: usize, steps: usize, width: usize) -> InferInputTensor {
    let shape = if steps > 1 { vec![rows, steps, width] } else { vec![rows, width] };
    InferInputTensor {
        name: name.into(),
        datatype: "FP32".into(),
        shape: shape.into_iter().map(|d| d as i64).collect(),
        ..Default::default()
    }
}

fn raw(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The request for `rows`: raw tensors, the deadline and the time left until the rows' due time
/// as partita parameters.
pub(crate) fn infer_request(
    spec: &ModelSpec,
    rows: &InferRows,
    deadline: Option<Duration>,
) -> ModelInferRequest {
    let mut request = ModelInferRequest {
        model_name: spec.name.clone(),
        inputs: vec![tensor("features", rows.rows, rows.steps, spec.feature_count)],
        raw_input_contents: vec![raw(&rows.features)],
        ..Default::default()
    };
    if spec.is_stateful() {
        request.inputs.push(tensor("state", rows.rows, 1, spec.state_size));
        request.raw_input_contents.push(raw(&rows.state));
    }
    let micros = |d: Duration| InferParameter {
        parameter_choice: Some(infer_parameter::ParameterChoice::Int64Param(
            i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        )),
    };
    if let Some(d) = deadline {
        // The worker times the rows from their batch's start, as a local worker does.
        request.parameters.insert(DEADLINE_US.to_owned(), micros(d));
    }
    if let Some(due) = rows.due {
        // Relative: the two nodes' clocks need not agree. Counted anew on every try. At most the
        // deadline: the worker may hold the rows that long before their batch starts, and the
        // call's timeout (2 x the deadline + 1 s) still covers the wait and the batch.
        let mut left = due.saturating_duration_since(Instant::now());
        if let Some(d) = deadline {
            left = left.min(d);
        }
        request.parameters.insert(DUE_IN_US.to_owned(), micros(left));
    }
    request
}

/// One call: the rows as raw tensors, the deadline as the gRPC deadline. Returns the outcome
/// and the gRPC code (for metrics).
async fn call(
    e: &Endpoint,
    spec: &ModelSpec,
    rows: &InferRows,
    deadline: Option<Duration>,
    timeout: Option<Duration>,
) -> (Outcome, tonic::Code) {
    let mut request = tonic::Request::new(infer_request(spec, rows, deadline));
    if let Some(tp) = crate::telemetry::traces::current_traceparent().and_then(|tp| tp.parse().ok()) {
        request.metadata_mut().insert("traceparent", tp);
    }
    if let Some(t) = timeout {
        request.set_timeout(t);
    }
    let mut client = e.client.clone();
    let sent = client.model_infer(request);
    let result = match timeout {
        Some(t) => match tokio::time::timeout(t, sent).await {
            Ok(r) => r,
            Err(_) => return (Outcome::Answered(RemoteAnswer::TimedOut), tonic::Code::DeadlineExceeded),
        },
        None => sent.await,
    };
    match result {
        Ok(response) => match scored(spec, (rows.rows, rows.steps), response.into_inner()) {
            Ok(answer) => (Outcome::Answered(answer), tonic::Code::Ok),
            Err(why) => (Outcome::Mismatch(why), tonic::Code::Ok),
        },
        Err(status) => (classify(&status, rows.rows, rows.steps), status.code()),
    }
}

/// Whether a status was made here from a failed connection attempt (nothing was sent).
fn connect_failed(status: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        if e.is::<tonic::ConnectError>() {
            return true;
        }
        source = e.source();
    }
    false
}

fn classify(status: &tonic::Status, rows: usize, steps: usize) -> Outcome {
    use tonic::Code;
    // A status with a source was made by this client from a transport error; one without came
    // from the server.
    let local = std::error::Error::source(status).is_some();
    match status.code() {
        _ if connect_failed(status) => Outcome::Refused,
        Code::Unavailable | Code::ResourceExhausted if !local => Outcome::Refused,
        Code::DeadlineExceeded | Code::Cancelled => Outcome::Answered(RemoteAnswer::TimedOut),
        // Rows of several steps refused: a worker whose model has no sequence form (an older one,
        // mid-upgrade). Not the endpoint's failure: the caller scores the events one by one.
        Code::InvalidArgument if !local && steps > 1 => Outcome::Answered(RemoteAnswer::Failed(
            InferError::Backend(format!("the worker refused rows of {steps} steps: {}", status.message())),
        )),
        Code::InvalidArgument | Code::NotFound | Code::FailedPrecondition if !local => {
            Outcome::Mismatch(format!("the worker refused rows this node validated: {}", status.message()))
        }
        Code::Unauthenticated | Code::PermissionDenied if !local => {
            Outcome::Mismatch(format!("the worker refused this node: {}", status.message()))
        }
        // The rows ran and the worker's own worker died with them: as if the call broke.
        Code::Aborted if !local => Outcome::Answered(RemoteAnswer::Lost),
        Code::Internal if !local && rows > 1 => Outcome::Answered(RemoteAnswer::RowFailed),
        Code::Internal if !local => {
            let message = status.message().to_owned();
            Outcome::Answered(RemoteAnswer::Failed(if message.contains("panicked") {
                InferError::Panicked(message)
            } else {
                InferError::Backend(message)
            }))
        }
        _ => Outcome::Answered(RemoteAnswer::Lost),
    }
}

/// The answer's scores and new states, checked against the model.
fn scored(
    spec: &ModelSpec,
    (rows, steps): (usize, usize),
    response: ModelInferResponse,
) -> Result<RemoteAnswer, String> {
    let values = |name: &str, count: usize| -> Result<Vec<f32>, String> {
        let k = response.outputs.iter().position(|o| o.name == name).ok_or(format!("no output {name:?}"))?;
        let bytes =
            response.raw_output_contents.get(k).ok_or(format!("output {name:?} has no raw contents"))?;
        if bytes.len() != count * 4 {
            return Err(format!("output {name:?} has {} bytes for {count} values", bytes.len()));
        }
        Ok(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
    };
    let scores = values("score", rows * steps)?;
    let new_state =
        if spec.is_stateful() { values("new_state", rows * spec.state_size)? } else { Vec::new() };
    let int = |name: &str| match response.parameters.get(name).and_then(|p| p.parameter_choice.clone()) {
        Some(infer_parameter::ParameterChoice::Int64Param(v)) => u64::try_from(v).unwrap_or(0),
        _ => 0,
    };
    let device = match response.parameters.get(DEVICE).and_then(|p| p.parameter_choice.clone()) {
        Some(infer_parameter::ParameterChoice::StringParam(d)) => parse_device(&d),
        _ => Device::Cpu,
    };
    let served = Served {
        model_version: response.model_version.parse().unwrap_or(spec.version),
        batch_size: usize::try_from(int(BATCH_SIZE)).unwrap_or(1).max(1),
        device,
        queue_time: Duration::from_micros(int(QUEUE_US)),
        compute_time: Duration::from_micros(int(COMPUTE_US)),
    };
    Ok(RemoteAnswer::Scored { scores, new_state, served })
}

fn parse_device(s: &str) -> Device {
    s.strip_prefix("cuda:").and_then(|i| i.parse().ok()).map_or(Device::Cpu, Device::Cuda)
}

/// Response parameters a partita worker adds (other OIP clients ignore them): how the first row
/// was served.
pub const BATCH_SIZE: &str = "partita_batch_size";
pub const QUEUE_US: &str = "partita_queue_time_us";
pub const COMPUTE_US: &str = "partita_compute_time_us";
pub const DEVICE: &str = "partita_device";
/// Request parameter: the rows' deadline from their batch's start, microseconds (a partita
/// scorer sends it; without it a worker uses its own `[partition] infer_deadline`).
pub const DEADLINE_US: &str = "partita_deadline_us";
/// Request parameter: the time left until the rows' due time (event time + the scorer's
/// `[inference] slo`), microseconds, when the request was sent, at most the rows' deadline. The worker's batcher takes it as
/// a due time of its receipt + this (the one-way network time is not subtracted); without it,
/// its fixed delay.
pub const DUE_IN_US: &str = "partita_due_in_us";

/// The response parameters for `served`.
pub fn served_parameters(served: &Served) -> HashMap<String, InferParameter> {
    let int = |v: u64| InferParameter {
        parameter_choice: Some(infer_parameter::ParameterChoice::Int64Param(
            i64::try_from(v).unwrap_or(i64::MAX),
        )),
    };
    let micros = |d: Duration| int(u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    HashMap::from([
        (BATCH_SIZE.to_owned(), int(served.batch_size as u64)),
        (QUEUE_US.to_owned(), micros(served.queue_time)),
        (COMPUTE_US.to_owned(), micros(served.compute_time)),
        (
            DEVICE.to_owned(),
            InferParameter {
                parameter_choice: Some(infer_parameter::ParameterChoice::StringParam(
                    served.device.to_string(),
                )),
            },
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_as_zone_host_port() {
        let e: WorkerEndpoint = "zone-a=workers.partita.svc:50051".parse().unwrap();
        assert_eq!((e.zone.as_str(), e.host.as_str(), e.port), ("zone-a", "workers.partita.svc", 50051));
        let v6: WorkerEndpoint = "b=[::1]:7".parse().unwrap();
        assert_eq!(v6.host, "::1");
        for bad in ["workers:50051", "=h:1", "a=:1", "a=h", "a=h:port", "a=h:70000"] {
            assert!(bad.parse::<WorkerEndpoint>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_breaker_opens_after_consecutive_failures_then_lets_one_probe_through() {
        let t0 = Instant::now();
        let open_for = Duration::from_secs(5);
        let mut b = Breaker::new(3, open_for);
        b.failure(t0);
        b.failure(t0);
        b.success();
        b.failure(t0);
        b.failure(t0);
        assert!(b.try_pass(t0), "a success in between: two in a row do not open it");
        assert!(b.failure(t0), "the third opens it");
        assert_eq!(b.state(t0), BreakerState::Open { until: t0 + open_for });
        assert!(!b.try_pass(t0 + Duration::from_secs(4)));
        let later = t0 + open_for;
        assert!(b.would_pass(later));
        assert!(b.try_pass(later), "the probe");
        assert!(!b.try_pass(later), "one probe at a time");
        b.abandon();
        assert!(b.try_pass(later), "a probe whose call was cancelled may go again");
        b.failure(later);
        assert_eq!(
            b.state(later),
            BreakerState::Open { until: later + open_for },
            "a failed probe opens it again"
        );
        let again = later + open_for;
        assert!(b.try_pass(again));
        b.success();
        assert_eq!(b.state(again), BreakerState::Closed);
        assert!(b.try_pass(again) && b.try_pass(again));
    }

    #[tokio::test]
    async fn a_call_given_up_gives_back_its_rows_and_its_breakers_probe() {
        let inner = Inner {
            settings: RemoteSettings {
                endpoints: vec![],
                zone: "a".into(),
                breaker_failures: 1,
                breaker_open_for: Duration::ZERO,
                max_inflight: 8,
                connect_timeout: Duration::from_secs(1),
                max_message_size: 1 << 20,
                tls: None,
            },
            endpoints: RwLock::default(),
            metrics: Arc::new(Metrics::new("a")),
            tls_pem: Mutex::default(),
            freed: tokio::sync::Notify::new(),
        };
        let e = inner.endpoint("a".into(), "127.0.0.1:9".parse().unwrap(), "w".into(), "127.0.0.1").unwrap();
        assert!(e.breaker.lock().unwrap().failure(Instant::now()), "opened");
        assert!(e.breaker.lock().unwrap().try_pass(Instant::now()), "half-open: the probe goes");
        let freed = inner.freed.notified();
        {
            // The call's future is dropped while it waits (a partition stopped, a deadline).
            let _call = InFlight::enter(&e, 3, &inner.freed);
            assert_eq!(e.in_flight.load(Ordering::SeqCst), 3);
        }
        assert_eq!(e.in_flight.load(Ordering::SeqCst), 0, "its rows are given back");
        assert!(
            e.breaker.lock().unwrap().try_pass(Instant::now()),
            "and the probe: the endpoint is not shut out"
        );
        tokio::time::timeout(Duration::from_secs(1), freed).await.expect("waiters for room are woken");
    }

    #[test]
    fn tls_files_that_do_not_hold_certificates_or_a_key_are_refused() {
        assert!(check_pem(&(b"not a certificate".to_vec(), None)).is_err());
        assert!(check_pem(&(Vec::new(), None)).is_err());
    }

    #[test]
    fn statuses_are_classified_by_who_made_them() {
        use tonic::{Code, Status};
        let server = |code, msg: &str| Status::new(code, msg);
        assert!(matches!(
            classify(&server(Code::Unavailable, "the node is draining"), 4, 1),
            Outcome::Refused
        ));
        assert!(matches!(
            classify(&server(Code::Aborted, "row 1: no healthy worker answered after 3 attempt(s)"), 4, 1),
            Outcome::Answered(RemoteAnswer::Lost)
        ));
        assert!(matches!(
            classify(&server(Code::DeadlineExceeded, "late"), 4, 1),
            Outcome::Answered(RemoteAnswer::TimedOut)
        ));
        assert!(matches!(classify(&server(Code::NotFound, "unknown model"), 1, 1), Outcome::Mismatch(_)));
        // Rows of several steps refused (a worker without the sequence form): the rows' failure,
        // not the endpoint's (its breaker is not charged); one step refused is a mismatch.
        assert!(matches!(
            classify(&server(Code::InvalidArgument, "input \"features\" has shape [2, 8, 16]"), 2, 8),
            Outcome::Answered(RemoteAnswer::Failed(InferError::Backend(_)))
        ));
        assert!(matches!(classify(&server(Code::InvalidArgument, "shape"), 2, 1), Outcome::Mismatch(_)));
        assert!(matches!(
            classify(&server(Code::Internal, "row 2: boom"), 4, 1),
            Outcome::Answered(RemoteAnswer::RowFailed)
        ));
        assert!(matches!(
            classify(&server(Code::Internal, "model runtime panicked on this batch: x"), 1, 1),
            Outcome::Answered(RemoteAnswer::Failed(InferError::Panicked(_)))
        ));
        let broken = Status::from_error(Box::new(std::io::Error::other("connection reset")));
        assert!(matches!(classify(&broken, 4, 1), Outcome::Answered(RemoteAnswer::Lost)), "{broken:?}");
        let refused =
            Status::from_error(Box::new(tonic::ConnectError(Box::new(std::io::Error::other("refused")))));
        assert!(matches!(classify(&refused, 4, 1), Outcome::Refused), "{refused:?}");
    }
}
