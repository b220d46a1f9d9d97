//! Helpers for partita's integration tests, which run on the real components.

pub mod otlp;
pub mod pipeline;
pub mod state_contract;

use std::path::PathBuf;

use partita_runtime::local::cassandra::{CassandraOptions, LocalCassandra};

/// The repository root (tests run with the package directory as working directory).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// The shipped model repository.
pub fn models_dir() -> PathBuf {
    repo_root().join("models")
}

/// A test-fixture model repository under `tests/fixtures/models/<name>`.
pub fn fixture_repo(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures/models").join(name)
}

/// The local Apache Cassandra this test binary shares between its tests (each test uses its own
/// keyspace). Started on first use, in a folder named after the test binary (the previous run's
/// is removed first); it stops when the test binary exits (`ParentWatch`). Panics, failing the
/// test, if it cannot start: the CQL tests never skip. A failed start is not retried by the next
/// test (each would wait for it again): they all fail with the first error.
pub async fn cassandra() -> &'static LocalCassandra {
    static CASSANDRA: tokio::sync::OnceCell<Result<LocalCassandra, String>> =
        tokio::sync::OnceCell::const_new();
    let started = CASSANDRA
        .get_or_init(|| async {
            let exe = std::env::current_exe().expect("test executable path");
            let name = exe.file_stem().and_then(|s| s.to_str()).unwrap_or("tests").to_owned();
            let dir = std::env::temp_dir().join(format!("partita-test-cassandra-{name}"));
            let _ = std::fs::remove_dir_all(&dir);
            let started = std::time::Instant::now();
            let c = LocalCassandra::start(CassandraOptions { dir: Some(dir), ..Default::default() })
                .await
                .map_err(|e| format!("{e:#}"))?;
            eprintln!("local Cassandra on {} ready in {:.1} s", c.uri(), started.elapsed().as_secs_f64());
            Ok(c)
        })
        .await;
    match started {
        Ok(c) => c,
        Err(e) => panic!("starting a local Apache Cassandra (scripts/setup.sh fetches its jars): {e}"),
    }
}

/// A keyspace name no other test of any run has used.
pub fn unique_keyspace(prefix: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!(
        "{prefix}_{}_{}_{}",
        std::process::id(),
        nanos % 1_000_000_000,
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// A small deterministic generator, so tests need no extra crates and always see the same rows.
#[derive(Debug, Clone)]
pub struct Lcg(u64);

impl Lcg {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407))
    }

    /// Uniform in [-1, 1).
    pub fn next_f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    pub fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next_f32()).collect()
    }
}
