//! The state contract on ScyllaDB: the same suite as RocksDB, run when `PARTITA_SCYLLA_URI`
//! points at a real node (e.g. `127.0.0.1:9042`); otherwise every check prints SKIP and returns.
//! Each run uses its own keyspace and drops nothing (inspect it after a failure).

use std::sync::OnceLock;

use partita_actors::state::PartitionId;
use partita_runtime::state::scylla::{ScyllaConfig, ScyllaStore};
use partita_tests::state_contract::Harness;

struct Scylla {
    config: ScyllaConfig,
}

impl Harness for Scylla {
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
    KS.get_or_init(|| {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        format!("partita_test_{}_{}", std::process::id(), nanos % 1_000_000_000)
    })
}

async fn harness() -> Option<Scylla> {
    let Ok(uri) = std::env::var("PARTITA_SCYLLA_URI") else {
        eprintln!(
            "SKIP: ScyllaDB contract suite: PARTITA_SCYLLA_URI is not set (no ScyllaDB on this machine)"
        );
        return None;
    };
    let mut config = ScyllaConfig::new(&uri);
    config.keyspace = keyspace().to_owned();
    // A single test node: replication 1 in whatever datacenter the node reports.
    let dc = std::env::var("PARTITA_SCYLLA_DATACENTER").unwrap_or_else(|_| "datacenter1".into());
    config.replication = [(dc, 1)].into();
    Some(Scylla { config })
}

partita_tests::state_contract_suite!(harness());
