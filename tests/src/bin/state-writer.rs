//! Test helper for `state_rocksdb.rs`: writes batches to a RocksDB store until killed.
//!
//! Batch `n` sets each of 64 keys of partition 0 to `[n as f32]` and the applied offset to `n`,
//! with fsync on; after each acknowledged write it prints `n`.

use std::io::Write;

use partita_actors::state::{Epoch, Offset, PartitionId, StateStore, StateValue, StateWrite};
use partita_runtime::state::rocks::{RocksConfig, RocksStore};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let dir = std::env::args().nth(1).expect("usage: state-writer DIR");
    let store = RocksStore::open(&RocksConfig::new(dir)).expect("open");
    let p = PartitionId(0);
    let stored = store.meta(p).await.expect("meta");
    let epoch = store.claim(p, Epoch(stored.epoch.0 + 1)).await.expect("claim").epoch;
    let mut out = std::io::stdout().lock();
    for n in stored.applied_offset.map_or(0, |o| o.0 + 1).. {
        let value = StateValue::from_f32(&[n as f32]);
        let entries = (0..64u32).map(|k| (k.to_be_bytes().to_vec(), value.clone())).collect();
        let write = StateWrite { partition: p, epoch, applied_offset: Offset(n), entries };
        store.write(write).await.expect("write");
        writeln!(out, "{n}").and_then(|()| out.flush()).expect("stdout");
    }
}
