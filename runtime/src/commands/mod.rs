//! One module per `partita` subcommand; `main.rs` only parses and dispatches.

pub mod check_config;
pub mod demo;
pub mod loadgen;
pub mod local;
pub mod models;
pub mod node;
pub mod schema;
