//! The GPU-worker actor: owns one device and the two OS threads that feed it and run the model
//! on it (`thread.rs`).
//!
//! The actor is the threads' lifecycle: `pre_start` spawns the device thread, which loads and
//! warms up every model and starts the feeder before the actor counts as started; the feeder
//! reports the exit back as a message, and a fatal exit fails the actor so its supervisor
//! ([`crate::pool::WorkerPool`]) restarts it.
//! Requests do not pass through the actor's mailbox: the router sends them straight into the
//! thread's bounded queue ([`WorkerLink`]), so the hot path is one channel hop.

mod link;
mod thread;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use crossbeam_channel::Receiver;
use ractor::{Actor, ActorProcessingErr, ActorRef};

pub use link::{Job, JobFailure, JobOutput, JobReply, JobStart, JobValues, WorkerLink, WorkerShared};
pub use thread::ThreadExit;
use thread::{WorkerThread, panic_message, run_device};

use crate::inference::{BackendError, BackendFactory};
use crate::model::ModelSpec;

/// Config-only actor struct; everything lives in [`GpuWorkerState`].
#[derive(Debug, Default)]
pub struct GpuWorker;

pub struct GpuWorkerArgs {
    pub link: Arc<WorkerLink>,
    /// The receiving end of `link`'s queue, handed to the thread.
    pub queue: Receiver<Job>,
    pub factory: Arc<dyn BackendFactory>,
    pub specs: Arc<[ModelSpec]>,
}

pub struct GpuWorkerState {
    /// Our copy of the queue's sender; dropped in `post_stop` so the thread can drain and exit.
    link: Option<Arc<WorkerLink>>,
    /// The device thread, joined in `post_stop` (off the async runtime) so a stopped worker has
    /// finished its queue (it joins the feeder).
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Debug)]
pub enum GpuWorkerMsg {
    /// Sent by the feeder thread as its last act (or by the device thread when the feeder
    /// panicked).
    ThreadExited(ThreadExit),
}

/// Why a worker failed; its supervisor restarts it.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Loading or warming up a model failed (bad model file, device unavailable).
    #[error("worker {index} on {device} did not start: {source}")]
    Start { index: usize, device: String, source: BackendError },
    /// The device failed while serving.
    #[error("worker {index} on {device} stopped: {reason}")]
    DeviceLost { index: usize, device: String, reason: String },
}

impl Actor for GpuWorker {
    type Msg = GpuWorkerMsg;
    type State = GpuWorkerState;
    type Arguments = GpuWorkerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: GpuWorkerArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let GpuWorkerArgs { link, queue, factory, specs } = args;
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let shared = link.shared.clone();
        let device = link.device;
        let index = link.index;
        // The device thread creates the backend (which need not be `Send`) and runs every
        // `forward`; the feeder thread it starts batches and answers. The feeder reports the exit.
        let thread =
            std::thread::Builder::new().name(format!("partita-worker-{index}")).spawn(move || {
                let created = catch_unwind(AssertUnwindSafe(|| factory.create(device, &specs)))
                    .unwrap_or_else(|p| Err(BackendError::Fatal(format!("panic: {}", panic_message(&*p)))));
                let backend = match created {
                    Ok((backend, ready)) => {
                        shared.set_ready(ready);
                        backend
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let (forwards_tx, forwards) = crossbeam_channel::unbounded();
                let (done, done_rx) = crossbeam_channel::unbounded();
                let feeder = std::thread::Builder::new().name(format!("partita-feeder-{index}")).spawn({
                    let (specs, shared, myself) = (specs.clone(), shared.clone(), myself.clone());
                    move || {
                        let exit =
                            WorkerThread::new(specs, shared.clone(), device, forwards_tx, done_rx).run(queue);
                        shared.set_healthy(false);
                        let _ = myself.send_message(GpuWorkerMsg::ThreadExited(exit));
                    }
                });
                let feeder = match feeder {
                    Ok(feeder) => feeder,
                    Err(e) => {
                        let _ = ready_tx
                            .send(Err(BackendError::Fatal(format!("starting the feeder thread: {e}"))));
                        return;
                    }
                };
                shared.set_healthy(true);
                let _ = ready_tx.send(Ok(()));
                // Until the feeder is gone (its end drops the queue of forwards).
                run_device(backend, specs, shared.clone(), forwards, done);
                if let Err(panic) = feeder.join() {
                    // A defect, not the device: fail the actor so its supervisor restarts it.
                    shared.set_healthy(false);
                    let reason = format!("the feeder thread panicked: {}", panic_message(&*panic));
                    let _ = myself.send_message(GpuWorkerMsg::ThreadExited(ThreadExit::Fatal(reason)));
                }
            })?;
        let start_error =
            |source| WorkerError::Start { index: link.index, device: link.device.to_string(), source };
        match ready_rx.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(start_error(e).into()),
            Err(_) => return Err(start_error(BackendError::Fatal("worker thread ended".into())).into()),
        }
        tracing::info!(worker = link.index, device = %link.device, "worker ready");
        Ok(GpuWorkerState { link: Some(link), thread: Some(thread) })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            GpuWorkerMsg::ThreadExited(ThreadExit::Drained) => myself.stop(Some("drained".into())),
            GpuWorkerMsg::ThreadExited(ThreadExit::Fatal(reason)) => {
                let (index, device) =
                    state.link.as_ref().map_or((0, String::new()), |l| (l.index, l.device.to_string()));
                return Err(WorkerError::DeviceLost { index, device, reason }.into());
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // The thread drains and exits once every sender is gone: the supervisor drops the router's
        // copy of the link before stopping us, so joining here waits for in-flight batches only.
        if let Some(link) = state.link.take() {
            link.shared.set_healthy(false);
        }
        if let Some(thread) = state.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        Ok(())
    }
}
