//! partita's adapters, wiring and commands. The `partita` binary (`main.rs`) only parses flags and
//! calls into here.
//!
//! # Layout
//!
//! - [`model_repo`]: the model repository on disk (Triton-style).
//! - [`tch_backend`]: the LibTorch adapter behind `partita_actors::inference::InferenceBackend`.
//! - [`inference`]: options, device selection, and starting the worker pool.
//! - [`commands`]: one module per subcommand.

pub mod commands;
pub mod config;
pub mod inference;
pub mod kafka;
pub mod loadgen;
pub mod local;
pub mod model_repo;
pub mod node;
pub mod state;
pub mod tch_backend;
pub mod telemetry;
pub mod traces;
