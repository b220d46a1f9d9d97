//! State backends behind `partita_actors::state::StateStore`.
//!
//! - [`rocks`]: RocksDB, embedded (the default; one node's partitions on its local disk).
//! - [`changelog`]: RocksDB whose writes go to a changelog topic first, restored from it on
//!   claim: state that follows its partition across nodes.
//! - [`standby`]: warm copies of other nodes' partitions, tailed from the changelog.
//! - [`scylla`]: ScyllaDB (or any CQL store speaking its dialect, Apache Cassandra 5 included),
//!   for clusters: state shared across nodes and zones.
//!
//! Both pass the same contract suite (`tests/src/state_contract.rs`); the CQL run uses a local
//! Cassandra, or a real ScyllaDB when `PARTITA_SCYLLA_URI` is set. [`NodeStore`] is the one a node
//! opens, chosen by `[state] backend`.

pub mod changelog;
pub mod rocks;
pub mod scylla;
pub mod standby;

use partita_actors::state::{PartitionId, PartitionMeta, StateStore, StateValue, StateWrite, StoreError};

/// `[state] backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// RocksDB on the node's disk (embedded; state does not follow a partition to another node).
    Rocksdb,
    /// A CQL cluster (ScyllaDB, Cassandra): the shared store every node reads and writes.
    Cql,
}

/// The store a node runs on.
#[derive(Debug, Clone)]
pub enum NodeStore {
    Rocks(rocks::RocksStore),
    /// RocksDB behind a changelog topic (`[state] changelog_topic`).
    Changelog(changelog::ChangelogStore),
    Cql(scylla::ScyllaStore),
}

impl NodeStore {
    /// The RocksDB this node keeps its state in, if any (not on CQL).
    pub fn rocks(&self) -> Option<&rocks::RocksStore> {
        match self {
            Self::Rocks(r) => Some(r),
            Self::Changelog(c) => Some(c.local()),
            Self::Cql(_) => None,
        }
    }
}

impl StateStore for NodeStore {
    async fn read(
        &self,
        partition: PartitionId,
        keys: &[Vec<u8>],
    ) -> Result<Vec<Option<StateValue>>, StoreError> {
        match self {
            Self::Rocks(s) => s.read(partition, keys).await,
            Self::Changelog(s) => s.read(partition, keys).await,
            Self::Cql(s) => s.read(partition, keys).await,
        }
    }

    async fn write(&self, write: StateWrite) -> Result<(), StoreError> {
        match self {
            Self::Rocks(s) => s.write(write).await,
            Self::Changelog(s) => s.write(write).await,
            Self::Cql(s) => s.write(write).await,
        }
    }

    async fn meta(&self, partition: PartitionId) -> Result<PartitionMeta, StoreError> {
        match self {
            Self::Rocks(s) => s.meta(partition).await,
            Self::Changelog(s) => s.meta(partition).await,
            Self::Cql(s) => s.meta(partition).await,
        }
    }

    fn release(&self, partition: PartitionId) {
        if let Self::Changelog(s) = self {
            s.release(partition);
        }
    }

    async fn claim(
        &self,
        partition: PartitionId,
        epoch: partita_actors::state::Epoch,
    ) -> Result<PartitionMeta, StoreError> {
        match self {
            Self::Rocks(s) => s.claim(partition, epoch).await,
            Self::Changelog(s) => s.claim(partition, epoch).await,
            Self::Cql(s) => s.claim(partition, epoch).await,
        }
    }
}
