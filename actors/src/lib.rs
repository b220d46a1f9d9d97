//! partita's actors, their pure logic, and the ports (traits) they do IO through.
//!
//! Nothing here opens a socket or a file or links a native library: adapters live in
//! `partita-runtime`.
//!
//! # Layout
//!
//! - [`model`]: Triton-style model config, validated into a [`model::ModelSpec`].
//! - [`inference`]: requests, validation, errors, and the [`inference::InferenceBackend`] port.
//! - [`batcher`]: the dynamic batcher (pure, takes `now`).
//! - [`gpu_worker`]: the GPU-worker actor and the OS thread that runs the model.
//! - [`pool`]: the supervisor over workers, and the [`pool::Router`] callers use.
//! - [`state`]: the state store port and the byte-bounded cache.
//! - [`partition`]: the partition actor (decode, per-key waves, apply) and its output port.
//! - [`supervision`]: restart budgets the supervisors share.

pub mod batcher;

/// Re-exported for [`crash_point!`].
#[doc(hidden)]
pub use fail;

/// Crash tests (feature `failpoints`): with `FAILPOINTS=<name>=return` (or `N*off->return`) the
/// process aborts here, like kill -9. Compiles to nothing without the feature.
#[macro_export]
macro_rules! crash_point {
    ($name:literal) => {
        $crate::fail::fail_point!($name, |_| {
            eprintln!(concat!("fail point ", $name, ": aborting like kill -9"));
            std::process::abort()
        })
    };
}
pub mod gpu_worker;
pub mod inference;
pub mod model;
pub mod partition;
pub mod pool;
pub mod state;
pub mod supervision;
