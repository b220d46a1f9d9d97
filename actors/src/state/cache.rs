//! The state cache: bounded by bytes, loads lazily in one batch per wave of keys, writes through.
//!
//! **Architecture invariant:** the cache never holds the only copy of applied state. `apply`
//! writes to the store first (atomically with the offset) and only then updates the cache; a
//! failed write leaves the cache as it was, which still matches the store.
//!
//! Eviction is quick_cache's CLOCK-Pro with a byte weigher: entries that are rarely hit go first,
//! a burst of one-off keys does not flush the hot set. Keys never written are cached as absent
//! (small entries), so a new card does not cost a store read per event.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use quick_cache::sync::Cache;
use quick_cache::{Lifecycle, Weighter};

use super::{PartitionId, StateStore, StateValue, StateWrite, StoreError};

/// Heap bytes an entry costs beyond its key and value bytes, so the budget bounds what the cache
/// really holds, small values included. Measured (actors/tests/cache_memory.rs): 330-520 bytes
/// with glibc and quick_cache 0.7, whatever the value size: quick_cache's slot (its slab grows by
/// doubling, per shard) and hash table, ghost entries of evicted keys, the `Arc<StateValue>`
/// (64 bytes), malloc's headers and rounding of the key and the value.
pub const ENTRY_OVERHEAD: u64 = 512;

type Key = (PartitionId, Vec<u8>);
type Val = Option<Arc<StateValue>>;

#[derive(Clone, Copy, Debug, Default)]
struct ByteWeigher;

impl Weighter<Key, Val> for ByteWeigher {
    fn weight(&self, key: &Key, val: &Val) -> u64 {
        let value = val.as_ref().map_or(0, |v| v.data.len());
        (key.1.len() + value) as u64 + ENTRY_OVERHEAD
    }
}

/// Hooks for metrics. Every method has a no-op default.
pub trait CacheObserver: Send + Sync + 'static {
    fn hits(&self, _n: u64) {}
    fn misses(&self, _n: u64) {}
    fn evicted(&self, _entries: u64, _bytes: u64) {}
    /// One batched load of `keys` keys from the store took `elapsed`.
    fn loaded(&self, _keys: usize, _elapsed: Duration) {}
}

#[derive(Debug, Default, Clone, Copy)]
pub struct NoopObserver;
impl CacheObserver for NoopObserver {}

/// Counters kept by the cache itself, for tests, benchmarks and status output.
#[derive(Debug, Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
    loads: AtomicU64,
    load_nanos: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    /// Batched store loads (one per wave with at least one miss).
    pub loads: u64,
    pub load_time: Duration,
    /// Bytes held now, as the weigher counts them.
    pub bytes: u64,
    pub entries: u64,
    pub budget: u64,
}

#[derive(Clone)]
struct Evictions {
    counters: Arc<Counters>,
    observer: Arc<dyn CacheObserver>,
}

impl Lifecycle<Key, Val> for Evictions {
    type RequestState = ();

    fn on_evict(&self, _state: &mut (), key: Key, val: Val) {
        self.counters.evictions.fetch_add(1, Ordering::Relaxed);
        self.observer.evicted(1, ByteWeigher.weight(&key, &val));
    }
}

/// A byte-bounded, write-through cache over a [`StateStore`].
pub struct StateCache<S> {
    store: S,
    cache: Cache<Key, Val, ByteWeigher, quick_cache::DefaultHashBuilder, Evictions>,
    counters: Arc<Counters>,
    observer: Arc<dyn CacheObserver>,
    budget: u64,
}

impl<S: StateStore> StateCache<S> {
    /// A cache holding at most `budget_bytes` of keys, values and per-entry overhead.
    pub fn new(store: S, budget_bytes: u64, observer: Arc<dyn CacheObserver>) -> Self {
        let counters = Arc::new(Counters::default());
        let lifecycle = Evictions { counters: counters.clone(), observer: observer.clone() };
        // Sized for ~512-byte entries; quick_cache grows its table if more fit.
        let estimated = usize::try_from(budget_bytes / 512).unwrap_or(usize::MAX).max(16);
        let cache = Cache::with(estimated, budget_bytes, ByteWeigher, Default::default(), lifecycle);
        Self { store, cache, counters, observer, budget: budget_bytes }
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    /// The states of `keys` (one partition), loading every miss in one batched read.
    pub async fn get_many(
        &self,
        partition: PartitionId,
        keys: &[Vec<u8>],
    ) -> Result<Vec<Option<Arc<StateValue>>>, StoreError> {
        let mut out: Vec<Option<Arc<StateValue>>> = Vec::with_capacity(keys.len());
        let mut missing: Vec<usize> = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            match self.cache.get(&(partition, k.clone())) {
                Some(v) => out.push(v),
                None => {
                    out.push(None);
                    missing.push(i);
                }
            }
        }
        let hits = (keys.len() - missing.len()) as u64;
        self.counters.hits.fetch_add(hits, Ordering::Relaxed);
        self.observer.hits(hits);
        if missing.is_empty() {
            return Ok(out);
        }
        self.counters.misses.fetch_add(missing.len() as u64, Ordering::Relaxed);
        self.observer.misses(missing.len() as u64);
        let wanted: Vec<Vec<u8>> = missing.iter().map(|&i| keys[i].clone()).collect();
        let started = Instant::now();
        let loaded = self.store.read(partition, &wanted).await?;
        let elapsed = started.elapsed();
        self.counters.loads.fetch_add(1, Ordering::Relaxed);
        self.counters
            .load_nanos
            .fetch_add(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
        self.observer.loaded(wanted.len(), elapsed);
        for ((i, key), value) in missing.into_iter().zip(wanted).zip(loaded) {
            let value = value.map(Arc::new);
            out[i] = value.clone();
            self.cache.insert((partition, key), value);
        }
        Ok(out)
    }

    /// Write `write` through to the store (atomically with its offset), then cache the new states.
    pub async fn apply(&self, write: StateWrite) -> Result<(), StoreError> {
        let partition = write.partition;
        let fresh: Vec<(Vec<u8>, Arc<StateValue>)> =
            write.entries.iter().map(|(k, v)| (k.clone(), Arc::new(v.clone()))).collect();
        self.store.write(write).await?;
        for (k, v) in fresh {
            self.cache.insert((partition, k), Some(v));
        }
        Ok(())
    }

    /// Forget every cached key of `partition` (on revoke: another owner may change it).
    pub fn invalidate_partition(&self, partition: PartitionId) {
        self.cache.retain(|(p, _), _| *p != partition);
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.counters.hits.load(Ordering::Relaxed),
            misses: self.counters.misses.load(Ordering::Relaxed),
            evictions: self.counters.evictions.load(Ordering::Relaxed),
            loads: self.counters.loads.load(Ordering::Relaxed),
            load_time: Duration::from_nanos(self.counters.load_nanos.load(Ordering::Relaxed)),
            bytes: self.cache.weight(),
            entries: self.cache.len() as u64,
            budget: self.budget,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::mem::MemStore;
    use crate::state::{Epoch, Offset};

    fn write(p: u32, entries: &[(&str, u8, usize)]) -> StateWrite {
        StateWrite {
            partition: PartitionId(p),
            epoch: Epoch(1),
            applied_offset: Offset(0),
            entries: entries
                .iter()
                .map(|(k, b, n)| (k.as_bytes().to_vec(), StateValue { format: 1, data: vec![*b; *n] }))
                .collect(),
        }
    }

    fn keys(ks: &[&str]) -> Vec<Vec<u8>> {
        ks.iter().map(|k| k.as_bytes().to_vec()).collect()
    }

    #[tokio::test]
    async fn misses_load_in_one_batch_then_hit() {
        let store = MemStore::claimed(0..4);
        store.write(write(0, &[("a", 1, 10), ("b", 2, 10)])).await.unwrap();
        let cache = StateCache::new(store.clone(), 1 << 20, Arc::new(NoopObserver));
        let got = cache.get_many(PartitionId(0), &keys(&["a", "b", "new"])).await.unwrap();
        assert_eq!(got[0].as_ref().unwrap().data, vec![1; 10]);
        assert_eq!(got[1].as_ref().unwrap().data, vec![2; 10]);
        assert!(got[2].is_none());
        assert_eq!(store.reads.load(Ordering::SeqCst), 1, "one batched load for the wave");
        let again = cache.get_many(PartitionId(0), &keys(&["a", "b", "new"])).await.unwrap();
        assert_eq!(again, got);
        assert_eq!(store.reads.load(Ordering::SeqCst), 1, "absent keys are cached too");
        let s = cache.stats();
        assert_eq!((s.hits, s.misses, s.loads), (3, 3, 1));
    }

    #[tokio::test]
    async fn writes_go_through_and_a_failed_write_changes_nothing() {
        let store = MemStore::claimed(0..4);
        let cache = StateCache::new(store.clone(), 1 << 20, Arc::new(NoopObserver));
        cache.apply(write(3, &[("k", 7, 4)])).await.unwrap();
        assert_eq!(store.data.lock().unwrap()[&(PartitionId(3), b"k".to_vec())].data, vec![7; 4]);
        store.fail_writes.store(true, Ordering::SeqCst);
        assert!(cache.apply(write(3, &[("k", 9, 4)])).await.is_err());
        let got = cache.get_many(PartitionId(3), &keys(&["k"])).await.unwrap();
        assert_eq!(got[0].as_ref().unwrap().data, vec![7; 4], "cache still matches the store");
        assert_eq!(store.reads.load(Ordering::SeqCst), 0, "served from the cache");
    }

    #[tokio::test]
    async fn stays_within_its_byte_budget_and_counts_evictions() {
        let store = MemStore::claimed(0..4);
        let budget = 64 * 1024;
        let cache = StateCache::new(store.clone(), budget, Arc::new(NoopObserver));
        for i in 0..2_000 {
            let key = format!("key-{i}");
            cache.apply(write(0, &[(&key, 1, 256 + (i % 7) * 300)])).await.unwrap();
            assert!(cache.stats().bytes <= budget, "over budget after {i} writes: {:?}", cache.stats());
        }
        let s = cache.stats();
        assert!(s.evictions > 1_500, "{s:?}");
        assert!(s.bytes > budget / 2, "the budget is used: {s:?}");
        // Every key is still readable: evicted entries come back from the store.
        let got = cache.get_many(PartitionId(0), &keys(&["key-0", "key-1999"])).await.unwrap();
        assert!(got.iter().all(Option::is_some));
    }

    #[tokio::test]
    async fn invalidating_a_partition_forgets_only_its_keys() {
        let store = MemStore::claimed(0..4);
        let cache = StateCache::new(store.clone(), 1 << 20, Arc::new(NoopObserver));
        cache.apply(write(1, &[("k", 1, 4)])).await.unwrap();
        cache.apply(write(2, &[("k", 2, 4)])).await.unwrap();
        cache.invalidate_partition(PartitionId(1));
        cache.get_many(PartitionId(2), &keys(&["k"])).await.unwrap();
        assert_eq!(store.reads.load(Ordering::SeqCst), 0);
        cache.get_many(PartitionId(1), &keys(&["k"])).await.unwrap();
        assert_eq!(store.reads.load(Ordering::SeqCst), 1);
    }
}
