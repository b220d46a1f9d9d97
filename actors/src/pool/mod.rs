//! The worker pool: a supervisor actor over one [`GpuWorker`] per device, and the [`Router`]
//! callers use.
//!
//! Restart policy: a failed worker leaves the router at once (its queued requests are handed back
//! and retried on the others), then restarts after `restart.backoff`. A worker that fails more than
//! `restart.max_restarts` times within `restart.within` stays down and is logged at ERROR; the
//! pool keeps serving on the rest. A worker that stops normally is restarted too, unless the pool
//! itself is stopping.

pub mod remote;
mod router;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
pub use router::Router;

use crate::gpu_worker::{GpuWorker, GpuWorkerArgs, GpuWorkerMsg, WorkerLink};
use crate::inference::{BackendFactory, Device, ModelReady};
use crate::model::ModelSpec;
pub use crate::supervision::RestartPolicy;
use crate::supervision::{RestartBudget, child_stopped};

#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// One worker per entry (one per GPU, or several CPU workers).
    pub devices: Vec<Device>,
    /// Rows in flight across the pool; past it callers wait or get `Overloaded`.
    pub max_inflight: usize,
    /// Tries on another worker when the one holding a request dies.
    pub max_retries: usize,
    pub retry_backoff: Duration,
    pub restart: RestartPolicy,
    /// A worker whose `forward` runs longer than this is hung: it is abandoned (its callers retry
    /// elsewhere) and replaced. `None`: never.
    pub hang_after: Option<Duration>,
    /// Workers in other processes, used while none of `devices` is healthy (with no devices:
    /// always).
    pub remote: Option<Arc<dyn remote::RemoteWorkers>>,
}

/// What `partita models` and health checks show of one worker.
#[derive(Debug, Clone)]
pub struct WorkerStatus {
    pub index: usize,
    pub device: Device,
    pub healthy: bool,
    pub inflight: usize,
    pub restarts: usize,
    pub models: Vec<ModelReady>,
}

/// Config-only supervisor; everything lives in [`WorkerPoolState`].
#[derive(Debug, Default)]
pub struct WorkerPool;

pub struct WorkerPoolArgs {
    pub config: PoolConfig,
    pub factory: Arc<dyn BackendFactory>,
    pub specs: Arc<[ModelSpec]>,
    pub router: Router,
}

pub struct WorkerPoolState {
    args: WorkerPoolArgs,
    children: Vec<Option<ActorRef<GpuWorkerMsg>>>,
    /// Each worker's restart budget.
    budgets: Vec<RestartBudget>,
    restarts: Vec<usize>,
    /// Set in `post_stop`: children that stop now are not restarted.
    stopping: bool,
}

#[derive(Debug)]
pub enum WorkerPoolMsg {
    Status(RpcReplyPort<Vec<WorkerStatus>>),
    /// Start worker `n` again (sent to ourselves after the restart backoff).
    Restart(usize),
    /// Look for hung workers (sent to ourselves periodically when `hang_after` is set).
    Watchdog,
}

impl Actor for WorkerPool {
    type Msg = WorkerPoolMsg;
    type State = WorkerPoolState;
    type Arguments = WorkerPoolArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: WorkerPoolArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let n = args.config.devices.len();
        let budgets = vec![RestartBudget::new(args.config.restart.clone()); n];
        let mut state =
            WorkerPoolState { args, children: vec![None; n], budgets, restarts: vec![0; n], stopping: false };
        for i in 0..n {
            if let Err(e) = state.spawn_worker(myself.get_cell(), i).await {
                state.stop_children().await;
                return Err(e);
            }
        }
        if let Some(after) = state.args.config.hang_after {
            let period = (after / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
            myself.send_interval(period, || WorkerPoolMsg::Watchdog);
        }
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            WorkerPoolMsg::Status(reply) => {
                let _ = reply.send(state.status());
            }
            WorkerPoolMsg::Watchdog => state.replace_hung(&myself),
            WorkerPoolMsg::Restart(i) => {
                if state.stopping || state.children[i].is_some() {
                    return Ok(());
                }
                match state.spawn_worker(myself.get_cell(), i).await {
                    Ok(()) => {
                        state.restarts[i] += 1;
                        tracing::info!(worker = i, "worker restarted");
                    }
                    Err(e) => {
                        tracing::error!(worker = i, error = %e, "worker restart failed");
                        state.schedule_restart(&myself, i);
                    }
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        evt: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let Some((actor, reason)) = child_stopped(&evt) else { return Ok(()) };
        let Some(i) = state.children.iter().position(|c| c.as_ref().is_some_and(|c| c.get_id() == actor))
        else {
            return Ok(());
        };
        state.children[i] = None;
        state.args.router.set_worker(i, None);
        if !state.stopping {
            tracing::error!(worker = i, %reason, "worker down");
            state.schedule_restart(&myself, i);
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.stopping = true;
        state.stop_children().await;
        Ok(())
    }
}

impl WorkerPoolState {
    async fn spawn_worker(&mut self, supervisor: ActorCell, i: usize) -> Result<(), ActorProcessingErr> {
        let device = self.args.config.devices[i];
        let (link, queue) = WorkerLink::new(i, device, self.args.config.max_inflight);
        let worker_args = GpuWorkerArgs {
            link: link.clone(),
            queue,
            factory: self.args.factory.clone(),
            specs: self.args.specs.clone(),
        };
        let (child, _) = Actor::spawn_linked(None, GpuWorker, worker_args, supervisor).await?;
        self.children[i] = Some(child);
        self.args.router.set_worker(i, Some(link));
        Ok(())
    }

    /// Abandon and replace every worker whose `forward` has run longer than `hang_after`. Its
    /// thread cannot be stopped (a running `forward` cannot be interrupted): it is left to finish
    /// or not; nothing waits for it, and its queue is closed.
    fn replace_hung(&mut self, myself: &ActorRef<WorkerPoolMsg>) {
        let Some(after) = self.args.config.hang_after else { return };
        if self.stopping {
            return;
        }
        let now = Instant::now();
        for i in 0..self.children.len() {
            let Some(link) = self.args.router.worker(i) else { continue };
            let Some(busy) = link.shared.busy_for(now).filter(|b| *b > after) else { continue };
            tracing::error!(worker = i, device = %link.device, ?busy, hang_after = ?after, "worker hung in forward; abandoning and replacing it");
            link.shared.abandon();
            self.args.router.set_worker(i, None);
            if let Some(child) = self.children[i].take() {
                // Killed, not stopped: a stop would join the stuck thread.
                child.kill();
            }
            self.schedule_restart(myself, i);
        }
    }

    fn schedule_restart(&mut self, myself: &ActorRef<WorkerPoolMsg>, i: usize) {
        match self.budgets[i].on_failure(Instant::now()) {
            Some(wait) => {
                myself.send_after(wait, move || WorkerPoolMsg::Restart(i));
            }
            None => {
                let policy = self.budgets[i].policy();
                tracing::error!(
                    worker = i,
                    max_restarts = policy.max_restarts,
                    within = ?policy.within,
                    "worker exceeded its restart budget; it stays down"
                );
            }
        }
    }

    fn status(&self) -> Vec<WorkerStatus> {
        (0..self.children.len())
            .map(|i| {
                let link = self.args.router.worker(i);
                WorkerStatus {
                    index: i,
                    device: self.args.config.devices[i],
                    healthy: link.as_ref().is_some_and(|l| l.is_healthy()),
                    inflight: link.as_ref().map_or(0, |l| l.inflight()),
                    restarts: self.restarts[i],
                    models: link.map(|l| l.ready_models().to_vec()).unwrap_or_default(),
                }
            })
            .collect()
    }

    /// Drop the router's links first, so each worker thread drains its queue and exits, then wait.
    async fn stop_children(&mut self) {
        for i in 0..self.children.len() {
            self.args.router.set_worker(i, None);
        }
        for child in self.children.iter_mut().filter_map(Option::take) {
            let _ = child.stop_and_wait(Some("pool stopping".into()), Some(Duration::from_secs(30))).await;
        }
    }
}

/// Why the pool did not start.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("no workers configured")]
    NoWorkers,
    #[error("{0}")]
    Start(String),
}

/// Asks the pool supervisor for every worker's status; empty once the pool stopped.
#[derive(Debug, Clone)]
pub struct StatusProbe(ActorRef<WorkerPoolMsg>);

impl StatusProbe {
    pub async fn get(&self) -> Vec<WorkerStatus> {
        ractor::call!(self.0, WorkerPoolMsg::Status).unwrap_or_default()
    }
}

/// The running pool: its supervisor actor and the router handle.
#[derive(Debug)]
pub struct InferencePool {
    actor: ActorRef<WorkerPoolMsg>,
    join: tokio::task::JoinHandle<()>,
    router: Router,
}

impl InferencePool {
    /// Start one worker per configured device; returns once every model is loaded and warm.
    pub async fn start(
        config: PoolConfig,
        specs: Vec<ModelSpec>,
        factory: Arc<dyn BackendFactory>,
    ) -> Result<Self, PoolError> {
        if config.devices.is_empty() && config.remote.is_none() {
            return Err(PoolError::NoWorkers);
        }
        let specs: Arc<[ModelSpec]> = specs.into();
        let router = Router::new(
            specs.clone(),
            config.devices.len(),
            config.max_inflight,
            config.max_retries,
            config.retry_backoff,
            config.remote.clone(),
        );
        let args = WorkerPoolArgs { config, factory, specs, router: router.clone() };
        let (actor, join) = Actor::spawn(None, WorkerPool, args).await.map_err(|e| match e {
            ractor::SpawnErr::StartupFailed(inner) => PoolError::Start(inner.to_string()),
            other => PoolError::Start(other.to_string()),
        })?;
        Ok(Self { actor, join, router })
    }

    pub fn router(&self) -> Router {
        self.router.clone()
    }

    pub async fn status(&self) -> Vec<WorkerStatus> {
        self.status_probe().get().await
    }

    /// A cloneable handle that asks for the workers' status (for metrics and health).
    pub fn status_probe(&self) -> StatusProbe {
        StatusProbe(self.actor.clone())
    }

    /// Refuse new requests, finish the admitted ones, stop every worker.
    pub async fn shutdown(self) {
        self.router.close();
        self.actor.stop(Some("shutdown".into()));
        let _ = self.join.await;
    }
}
