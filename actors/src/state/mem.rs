//! An in-memory [`StateStore`] for the actors' unit tests (pure logic only; the real backends
//! have the contract suite). Keeps the port's fencing rules so actor tests can rely on them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::{Epoch, PartitionId, PartitionMeta, StateStore, StateValue, StateWrite, StoreError};

#[derive(Default)]
pub(crate) struct MemStore {
    pub data: Mutex<HashMap<(PartitionId, Vec<u8>), StateValue>>,
    pub meta: Mutex<HashMap<PartitionId, PartitionMeta>>,
    /// Calls of `read`.
    pub reads: AtomicUsize,
    /// Successful calls of `write`.
    pub writes: AtomicUsize,
    /// While set, writes fail as `Unavailable`.
    pub fail_writes: AtomicBool,
    /// While set, writes wait (a slow disk) before they do anything.
    pub hold_writes: AtomicBool,
}

impl MemStore {
    /// A store whose `partitions` are claimed by epoch 1 (what a partition's owner writes with).
    pub fn claimed(partitions: std::ops::Range<u32>) -> Arc<Self> {
        let store = Self::default();
        for p in partitions {
            store
                .meta
                .lock()
                .unwrap()
                .insert(PartitionId(p), PartitionMeta { applied_offset: None, epoch: Epoch(1) });
        }
        Arc::new(store)
    }

    pub fn value(&self, p: PartitionId, key: &[u8]) -> Option<StateValue> {
        self.data.lock().unwrap().get(&(p, key.to_vec())).cloned()
    }
}

impl StateStore for Arc<MemStore> {
    async fn read(&self, p: PartitionId, keys: &[Vec<u8>]) -> Result<Vec<Option<StateValue>>, StoreError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        let data = self.data.lock().unwrap();
        Ok(keys.iter().map(|k| data.get(&(p, k.clone())).cloned()).collect())
    }

    async fn write(&self, w: StateWrite) -> Result<(), StoreError> {
        while self.hold_writes.load(Ordering::SeqCst) {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        if self.fail_writes.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable { detail: "down".into() });
        }
        let mut meta = self.meta.lock().unwrap();
        let m = meta.entry(w.partition).or_default();
        if w.epoch != m.epoch {
            return Err(StoreError::Fenced { partition: w.partition, epoch: w.epoch, current: m.epoch });
        }
        if m.applied_offset.is_some_and(|o| w.applied_offset < o) {
            return Err(StoreError::Corrupt { detail: "applied offset moving backwards".into() });
        }
        *m = PartitionMeta { applied_offset: Some(w.applied_offset), epoch: w.epoch };
        let mut data = self.data.lock().unwrap();
        for (k, v) in w.entries {
            data.insert((w.partition, k), v);
        }
        self.writes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn meta(&self, p: PartitionId) -> Result<PartitionMeta, StoreError> {
        Ok(self.meta.lock().unwrap().get(&p).copied().unwrap_or_default())
    }

    async fn claim(&self, p: PartitionId, epoch: Epoch) -> Result<PartitionMeta, StoreError> {
        let mut meta = self.meta.lock().unwrap();
        let m = meta.entry(p).or_default();
        if epoch <= m.epoch {
            return Err(StoreError::Fenced { partition: p, epoch, current: m.epoch });
        }
        m.epoch = epoch;
        Ok(*m)
    }
}
