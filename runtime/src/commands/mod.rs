//! One module per `partita` subcommand; `main.rs` only parses and dispatches.

pub mod models;
pub mod schema;
