//! What the state cache really holds on the heap, against what its weigher counts (and so what
//! `[state] cache_size` bounds). Its own test binary: the counting allocator is process-wide, and
//! nothing else may allocate while a measurement runs.

use std::alloc::System;
use std::sync::Arc;

use partita_actors::state::{
    Epoch, NoopObserver, Offset, PartitionId, PartitionMeta, StateCache, StateStore, StateValue, StateWrite,
    StoreError,
};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Keeps nothing: every byte measured is the cache's.
struct Nowhere;

impl StateStore for Nowhere {
    async fn read(&self, _: PartitionId, keys: &[Vec<u8>]) -> Result<Vec<Option<StateValue>>, StoreError> {
        Ok(vec![None; keys.len()])
    }
    async fn write(&self, _: StateWrite) -> Result<(), StoreError> {
        Ok(())
    }
    async fn meta(&self, _: PartitionId) -> Result<PartitionMeta, StoreError> {
        Ok(PartitionMeta::default())
    }
    async fn claim(&self, _: PartitionId, epoch: Epoch) -> Result<PartitionMeta, StoreError> {
        Ok(PartitionMeta { applied_offset: None, epoch })
    }
}

/// glibc's cost of one live allocation beyond the bytes asked for: an 8-byte header and rounding
/// to 16 (8 on average; at least 32 bytes in all, which the small keys here reach).
const MALLOC_OVERHEAD: i64 = 16;

/// Streams `keys` keys (values of `value_len(k)` bytes, written as a partition actor does: a wave
/// of 64 read then written) through a cache of `budget` bytes; returns (heap bytes the cache holds
/// at the end, as glibc counts them; bytes its weigher counts; entries).
async fn fill(budget: u64, keys: u64, value_len: impl Fn(u64) -> usize) -> (i64, u64, u64) {
    let region = Region::new(GLOBAL);
    let cache = StateCache::new(Nowhere, budget, Arc::new(NoopObserver));
    let p = PartitionId(0);
    let all: Vec<u64> = (0..keys).collect();
    for (i, wave) in all.chunks(64).enumerate() {
        let names: Vec<Vec<u8>> = wave.iter().map(|k| format!("card-{k:012}").into_bytes()).collect();
        cache.get_many(p, &names).await.unwrap();
        let entries = names
            .into_iter()
            .zip(wave)
            .map(|(key, &k)| (key, StateValue { format: 3, data: vec![7; value_len(k)] }))
            .collect();
        cache
            .apply(StateWrite { partition: p, epoch: Epoch(1), applied_offset: Offset(i as i64), entries })
            .await
            .unwrap();
    }
    drop(all);
    let stats = cache.stats();
    let c = region.change();
    let live_bytes = c.bytes_allocated as i64 - c.bytes_deallocated as i64 + c.bytes_reallocated as i64;
    let live_allocs = c.allocations as i64 - c.deallocations as i64;
    let heap = live_bytes + MALLOC_OVERHEAD * live_allocs;
    drop(cache);
    (heap, stats.bytes, stats.entries)
}

/// A value's length per key.
type ValueLen = Box<dyn Fn(u64) -> usize>;

#[tokio::test(flavor = "current_thread")]
async fn the_cache_holds_no_more_heap_than_its_budget_counts() {
    // A model's state as partita stores it (sequence, offset, 16 f32: 84 bytes), a larger state
    // (a few hundred floats), and B6's log-uniform 256 B to 4 KiB.
    let shapes: [(&str, ValueLen); 3] = [
        ("84-byte states", Box::new(|_| 84)),
        ("1 KiB states", Box::new(|_| 1024)),
        (
            "256 B to 4 KiB",
            Box::new(|k| {
                let u = ((k.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) as f64) / ((1u64 << 53) as f64);
                (256.0 * 16f64.powf(u)) as usize
            }),
        ),
    ];
    // Several budgets: quick_cache's slab grows by doubling per shard, so the slack differs.
    for (budget_mib, (name, len)) in
        [4u64, 11, 24].into_iter().flat_map(|b| shapes.iter().map(move |s| (b, s)))
    {
        let budget = budget_mib << 20;
        // Enough keys to fill the budget about 4 times over: evictions and ghost entries included.
        let keys = 4 * budget / (len(1) as u64 + 150);
        let (heap, weighed, entries) = fill(budget, keys, len).await;
        let ratio = heap as f64 / weighed as f64;
        println!(
            "{name}, {budget_mib} MiB: {entries} entries, heap {:.2} MiB, weighed {:.2} MiB, ratio {ratio:.3}, {:.0} heap bytes per entry beyond key and value",
            heap as f64 / 1048576.0,
            weighed as f64 / 1048576.0,
            (heap as f64 - weighed as f64) / entries as f64 + partita_actors::state::ENTRY_OVERHEAD as f64
        );
        assert!(weighed <= budget, "{name}, {budget_mib} MiB: weighed {weighed} over the budget {budget}");
        assert!(
            weighed > budget / 2,
            "{name}, {budget_mib} MiB: the cache did not fill ({weighed} of {budget})"
        );
        assert!(
            ratio <= 1.05,
            "{name}, {budget_mib} MiB: the cache holds {ratio:.3}x what its weigher counts"
        );
    }
}
