//! The state contract on the CQL backend (`ScyllaStore`): the same suite as RocksDB, run against
//! this test binary's local Apache Cassandra, or against a real ScyllaDB when `PARTITA_SCYLLA_URI`
//! points at one (`PARTITA_SCYLLA_DATACENTER`, default `datacenter1`). Never skipped: a server that
//! cannot start fails the tests. Each run uses its own keyspace and drops nothing (inspect it after
//! a failure).

use std::sync::OnceLock;

use partita_actors::state::PartitionId;
use partita_runtime::local::cassandra::DATACENTER;
use partita_runtime::state::scylla::{ScyllaConfig, ScyllaStore};
use partita_tests::state_contract::Harness;

struct Cql {
    config: ScyllaConfig,
}

impl Harness for Cql {
    type Store = ScyllaStore;

    async fn open(&self) -> ScyllaStore {
        ScyllaStore::connect(&self.config).await.unwrap()
    }

    fn partition(&self, n: u32) -> PartitionId {
        PartitionId(n)
    }
}

/// One keyspace per test process, so reruns never see old data.
fn keyspace() -> &'static str {
    static KS: OnceLock<String> = OnceLock::new();
    KS.get_or_init(|| partita_tests::unique_keyspace("partita_test"))
}

async fn harness() -> Cql {
    let uri = match std::env::var("PARTITA_SCYLLA_URI") {
        Ok(uri) => uri,
        Err(_) => partita_tests::cassandra().await.uri(),
    };
    let mut config = ScyllaConfig::new(&uri);
    config.keyspace = keyspace().to_owned();
    // One test node: replication 1 in the node's datacenter.
    let dc = std::env::var("PARTITA_SCYLLA_DATACENTER").unwrap_or_else(|_| DATACENTER.into());
    config.replication = [(dc, 1)].into();
    Cql { config }
}

partita_tests::state_contract_suite!(harness());
