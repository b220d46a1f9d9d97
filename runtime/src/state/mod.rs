//! State backends behind `partita_actors::state::StateStore`.
//!
//! - [`rocks`]: RocksDB, embedded (the default; one node's partitions on its local disk).
//! - [`scylla`]: ScyllaDB, for clusters (state shared across nodes and zones).
//!
//! Both pass the same contract suite (`tests/src/state_contract.rs`); the ScyllaDB run needs
//! `PARTITA_SCYLLA_URI`.

pub mod rocks;
pub mod scylla;
