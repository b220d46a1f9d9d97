//! The state contract on RocksDB (always runs), plus RocksDB-only checks: kill -9 mid-stream.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use partita_actors::state::{Epoch, Offset, PartitionId, StateStore, StateValue, StateWrite, StoreError};
use partita_runtime::state::rocks::{RocksConfig, RocksStore};
use partita_tests::state_contract::Harness;

/// A fresh directory per check, so partition ids need no namespacing.
struct Rocks {
    dir: tempfile::TempDir,
    write_window: Duration,
}

impl Harness for Rocks {
    type Store = RocksStore;

    async fn open(&self) -> RocksStore {
        // RocksDB allows one open handle per directory: a reopen waits for the last one to close.
        loop {
            let config = RocksConfig { write_window: self.write_window, ..RocksConfig::new(self.dir.path()) };
            match RocksStore::open(&config) {
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
    Rocks { dir: tempfile::tempdir().unwrap(), write_window: Duration::ZERO }
}

partita_tests::state_contract_suite!(harness());

/// The same contract with write grouping on.
mod write_grouping {
    use super::*;

    async fn harness() -> Rocks {
        Rocks { dir: tempfile::tempdir().unwrap(), write_window: Duration::from_millis(2) }
    }

    partita_tests::state_contract_suite!(harness());
}

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

/// With a commit window, writes of many partitions that arrive within it (10 ms apart here) land
/// as one RocksDB write with one fsync; a write that fails its check (fenced, or moving its
/// partition's offset back behind an earlier write of the same group) fails alone, and a later
/// write of a partition in the same group wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_within_the_write_window_share_one_write_and_fsync_and_a_bad_one_fails_alone() {
    let dir = tempfile::tempdir().unwrap();
    let config = RocksConfig { write_window: Duration::from_secs(1), ..RocksConfig::new(dir.path()) };
    let store = RocksStore::open(&config).unwrap();
    let write = |p: u32, epoch: u64, offset: i64| StateWrite {
        partition: PartitionId(p),
        epoch: Epoch(epoch),
        applied_offset: Offset(offset),
        entries: vec![(b"k".to_vec(), StateValue::from_f32(&[offset as f32]))],
    };
    for p in 0..8 {
        store.claim(PartitionId(p), Epoch(1)).await.unwrap();
    }
    let before = store.wal();
    let mut writes: Vec<StateWrite> = (0..8).map(|p| write(p, 1, 10)).collect();
    writes.extend([write(0, 1, 11), write(3, 1, 5), write(5, 0, 12)]);
    let mut tasks = Vec::new();
    for w in writes {
        let store = store.clone();
        tasks.push(tokio::spawn(async move { store.write(w).await }));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    let after = store.wal();
    for (i, r) in results[..9].iter().enumerate() {
        assert_eq!(r, &Ok(()), "write {i}");
    }
    assert!(
        matches!(&results[9], Err(StoreError::Corrupt { detail }) if detail.contains("back")),
        "{:?}",
        results[9]
    );
    assert!(matches!(results[10], Err(StoreError::Fenced { .. })), "{:?}", results[10]);
    assert_eq!((after.writes - before.writes, after.syncs - before.syncs), (1, 1), "one write, one fsync");
    let store = &store;
    let stored = |p: u32| async move {
        let meta = store.meta(PartitionId(p)).await.unwrap();
        let value = store.read(PartitionId(p), &[b"k".to_vec()]).await.unwrap().remove(0);
        (meta.applied_offset, value)
    };
    assert_eq!(
        stored(0).await,
        (Some(Offset(11)), Some(StateValue::from_f32(&[11.0]))),
        "the later write wins"
    );
    for p in 1..8 {
        assert_eq!(stored(p).await, (Some(Offset(10)), Some(StateValue::from_f32(&[10.0]))), "partition {p}");
    }
}
