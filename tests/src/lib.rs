//! Helpers for partita's integration tests, which run on the real components.

pub mod otlp;
pub mod pipeline;
pub mod state_contract;

use std::path::PathBuf;

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
