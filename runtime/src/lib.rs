//! partita's adapters, wiring and commands. The `partita` binary (`main.rs`) only parses flags and
//! calls into here.
//!
//! # Layout
//!
//! - [`node`]: a node's wiring (`Node`, `NodeOptions`) and its layered configuration
//!   ([`node::config`]).
//! - Adapters, one folder per component: [`kafka`] (client settings, the output producer, the
//!   consumer thread), [`state`] (RocksDB and CQL stores), [`inference`] (the LibTorch backend,
//!   the model repository, starting the worker pool).
//! - [`telemetry`]: metrics, health endpoints, logs and traces.
//! - [`local`]: real servers (Kafka, Cassandra) as local child processes, for `partita demo`,
//!   tests and benchmarks.
//! - [`loadgen`]: the load generator and output reader.
//! - [`commands`]: one module per subcommand.

pub mod commands;
pub mod inference;
pub mod kafka;
pub mod loadgen;
pub mod local;
pub mod node;
pub mod state;
pub mod telemetry;
