//! The state contract on RocksDB (always runs), plus RocksDB-only checks: kill -9 mid-stream.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use partita_actors::state::{Offset, PartitionId, StateStore, StateValue};
use partita_runtime::state::rocks::{RocksConfig, RocksStore};
use partita_tests::state_contract::Harness;

/// A fresh directory per check, so partition ids need no namespacing.
struct Rocks {
    dir: tempfile::TempDir,
}

impl Harness for Rocks {
    type Store = RocksStore;

    async fn open(&self) -> RocksStore {
        // RocksDB allows one open handle per directory: a reopen waits for the last one to close.
        loop {
            match RocksStore::open(&RocksConfig::new(self.dir.path())) {
                Ok(s) => return s,
                Err(e) if e.to_string().contains("lock") => {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    fn partition(&self, n: u32) -> PartitionId {
        PartitionId(n)
    }
}

async fn harness() -> Rocks {
    Rocks { dir: tempfile::tempdir().unwrap() }
}

partita_tests::state_contract_suite!(harness());

/// A writer process applies batches (every key of the batch gets the batch's offset as its value)
/// with fsync on, printing each acknowledged offset; it is killed with SIGKILL mid-stream. After
/// reopening: the stored applied offset is at least the last acknowledged one (durability), and
/// every key holds exactly the stored offset (state and offset landed together, never apart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_loses_no_acknowledged_write_and_never_splits_state_from_offset() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_state-writer"))
        .arg(dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut last_acked = -1i64;
    while last_acked < 300 {
        let line = lines.next().expect("writer ended early").unwrap();
        last_acked = line.parse().unwrap();
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let store = RocksStore::open(&RocksConfig::new(dir.path())).unwrap();
    let p = PartitionId(0);
    let applied = store.meta(p).await.unwrap().applied_offset.expect("an applied offset");
    assert!(applied >= Offset(last_acked), "acknowledged offset {last_acked} lost: stored {applied:?}");
    let keys: Vec<Vec<u8>> = (0..64).map(|k: u32| k.to_be_bytes().to_vec()).collect();
    for (k, v) in keys.iter().zip(store.read(p, &keys).await.unwrap()) {
        let v = v.expect("every key was written by the first batch");
        assert_eq!(
            v,
            StateValue::from_f32(&[applied.0 as f32]),
            "key {k:?} out of step with offset {applied:?}"
        );
    }
}
