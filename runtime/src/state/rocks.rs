//! The RocksDB state backend.
//!
//! Key layout (one keyspace, prefixes keep each partition contiguous for scans and rebuilds):
//!
//! ```text
//! 's' | partition u32 BE | key bytes   →  state value (format u16 BE | data)
//! 'm' | partition u32 BE              →  meta: has_offset u8 | applied offset i64 BE | epoch u64 BE
//! 'c' | partition u32 BE              →  changelog position i64 BE (with a changelog topic only)
//! ```
//!
//! A write is one RocksDB `WriteBatch` holding every state put and the meta put, so state and
//! applied offset land together or not at all, also across `kill -9` (the WAL is always on;
//! `sync_wal` decides whether each write waits for fsync). The epoch check and the write run under
//! a per-partition lock: RocksDB allows one process per database (its LOCK file), so in-process
//! locking is enough to make check-then-write atomic.
//!
//! Every call runs on tokio's blocking pool: RocksDB may stall on compaction or fsync.
//!
//! **Write grouping** (`write_window` > 0; docs/state.md): state writes go to one thread per
//! store, which gathers every write queued within the window after the first one's arrival, checks
//! each against its partition's stored meta (under the locks of all their partitions, taken in
//! stripe order), and writes the accepted ones as one `WriteBatch`: one RocksDB write and one
//! fsync per group, however many partitions the node owns. A write that fails its check is
//! answered alone; a failed RocksDB write fails every write of its group, none of which landed
//! (the batch is atomic). With a zero window every write is its own RocksDB write; RocksDB still
//! shares one fsync among writes that arrive while the previous one syncs. Claims, resets and
//! changelog replays always write on their own.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use partita_actors::state::{
    Epoch, Offset, PartitionId, PartitionMeta, StateStore, StateValue, StateWrite, StoreError,
};
use rocksdb::{BlockBasedOptions, Cache, DB, Options, WriteBatch, WriteOptions};

const STATE: u8 = b's';
const META: u8 = b'm';
const POSITION: u8 = b'c';
const LOCK_STRIPES: usize = 64;

#[derive(Debug, Clone)]
pub struct RocksConfig {
    pub path: PathBuf,
    /// fsync the WAL on every write (durable across power loss); otherwise durable across a
    /// process crash only.
    pub sync_wal: bool,
    /// RocksDB's block cache (decompressed blocks), bounded.
    pub block_cache_bytes: usize,
    /// Size of one memtable; RocksDB keeps at most two.
    pub write_buffer_bytes: usize,
    /// Zero: each state write is its own RocksDB write. Above: state writes arriving within this
    /// long of the first share one write and one fsync (write grouping, module doc).
    pub write_window: Duration,
}

impl RocksConfig {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            sync_wal: true,
            block_cache_bytes: 32 << 20,
            write_buffer_bytes: 16 << 20,
            write_window: Duration::ZERO,
        }
    }
}

/// Cheap to clone; every clone shares the database.
#[derive(Clone)]
pub struct RocksStore {
    inner: Arc<Inner>,
    /// The write grouping thread (`write_window` > 0).
    group: Option<Arc<WriteGrouper>>,
}

/// What RocksDB holds in memory, by its own accounting, bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RocksMemory {
    /// The block cache in use: data, index and filter blocks, and the memtables charged to it.
    pub block_cache: u64,
    /// Memtables, active and immutable (not yet flushed).
    pub memtables: u64,
    /// Table readers' memory outside the block cache.
    pub table_readers: u64,
}

/// Writes with the write-ahead log and the log's fsyncs since the store opened. RocksDB syncs
/// writes that arrive together (several partitions' batches) with one fsync: writes per sync
/// above 1 is that grouping at work.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RocksWal {
    pub writes: u64,
    pub syncs: u64,
}

struct Inner {
    db: DB,
    /// Kept for its statistics (tickers only: counters, no timers).
    opts: Options,
    block_cache: Cache,
    sync_wal: bool,
    /// Serialises epoch-check-then-write per partition (striped).
    locks: Vec<Mutex<()>>,
}

impl std::fmt::Debug for RocksStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocksStore").field("path", &self.inner.db.path()).finish()
    }
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable { detail: e.to_string() }
}

impl RocksStore {
    pub fn open(config: &RocksConfig) -> Result<Self, StoreError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.set_write_buffer_size(config.write_buffer_bytes);
        opts.set_max_write_buffer_number(2);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        opts.set_max_background_jobs(2);
        opts.enable_statistics();
        opts.set_statistics_level(rocksdb::statistics::StatsLevel::ExceptHistogramOrTimers);
        let block_cache = Cache::new_lru_cache(config.block_cache_bytes);
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(&block_cache);
        // Index and filter blocks live in the block cache, so they count against its bound.
        table.set_cache_index_and_filter_blocks(true);
        table.set_bloom_filter(10.0, false);
        opts.set_block_based_table_factory(&table);
        let db = DB::open(&opts, &config.path)
            .map_err(|e| unavailable(format!("opening RocksDB at {}: {e}", config.path.display())))?;
        let locks = (0..LOCK_STRIPES).map(|_| Mutex::new(())).collect();
        let inner = Arc::new(Inner { db, opts, block_cache, sync_wal: config.sync_wal, locks });
        let group = if config.write_window.is_zero() {
            None
        } else {
            Some(Arc::new(WriteGrouper::start(inner.clone(), config.write_window).map_err(unavailable)?))
        };
        Ok(Self { inner, group })
    }

    /// The write-ahead log's writes and fsyncs so far.
    pub fn wal(&self) -> RocksWal {
        use rocksdb::statistics::Ticker;
        RocksWal {
            writes: self.inner.opts.get_ticker_count(Ticker::WriteWithWal),
            syncs: self.inner.opts.get_ticker_count(Ticker::WalFileSynced),
        }
    }

    /// RocksDB's memory by its own accounting (a property it cannot read counts 0).
    pub fn memory(&self) -> RocksMemory {
        let property = |name: &str| self.inner.db.property_int_value(name).ok().flatten().unwrap_or(0);
        RocksMemory {
            block_cache: self.inner.block_cache.get_usage() as u64,
            memtables: property("rocksdb.cur-size-all-mem-tables"),
            table_readers: property("rocksdb.estimate-table-readers-mem"),
        }
    }

    pub fn path(&self) -> &Path {
        self.inner.db.path()
    }

    /// The changelog offset of the last change this node's copy of `partition` holds (its own
    /// write or one replayed from the changelog); `None` when it holds none.
    pub fn changelog_position(&self, partition: PartitionId) -> Result<Option<i64>, StoreError> {
        self.inner.position(partition)
    }

    /// [`StateStore::meta`] on the calling thread.
    pub fn meta_blocking(&self, partition: PartitionId) -> Result<PartitionMeta, StoreError> {
        self.inner.meta(partition)
    }

    /// Forget everything stored for `partition` except its epoch (the start of a full replay of
    /// its changelog). Fenced unless the stored epoch is `epoch`.
    pub fn reset(&self, partition: PartitionId, epoch: Epoch) -> Result<(), StoreError> {
        let (inner, p) = (&self.inner, partition);
        let _guard = inner.lock(p);
        let stored = inner.meta(p)?;
        if stored.epoch != epoch {
            return Err(StoreError::Fenced { partition: p, epoch, current: stored.epoch });
        }
        let mut batch = WriteBatch::default();
        batch.delete_range(state_key(p, b""), state_key(PartitionId(p.0 + 1), b""));
        batch.delete(position_key(p));
        batch.put(meta_key(p), encode_meta(&PartitionMeta { applied_offset: None, epoch }));
        inner.db.write_opt(batch, &inner.write_opts()).map_err(unavailable)
    }

    /// Apply changes replayed from the changelog, in one atomic batch: the states, the applied
    /// offset (when the chunk holds one) and the new changelog position. Compare-and-set twice:
    /// the stored epoch must be `epoch` (a claim on this node since then stops a standby's replay)
    /// and the stored position must be `after` (the chunk continues exactly what is stored).
    /// Unlike a write, the applied offset may move back (a claim's replay replaces what a zombie
    /// held), and no epoch is claimed.
    pub fn apply_changelog(
        &self,
        partition: PartitionId,
        epoch: Epoch,
        after: Option<i64>,
        chunk: &ChangelogChunk,
    ) -> Result<(), StoreError> {
        let (inner, p) = (&self.inner, partition);
        let _guard = inner.lock(p);
        let stored = inner.meta(p)?;
        if stored.epoch != epoch {
            return Err(StoreError::Fenced { partition: p, epoch, current: stored.epoch });
        }
        let position = inner.position(p)?;
        if position != after {
            return Err(StoreError::Unavailable {
                detail: format!(
                    "partition {p}: changelog replay continues after {after:?} but the store holds {position:?}"
                ),
            });
        }
        let mut batch = WriteBatch::default();
        for (k, v) in &chunk.entries {
            batch.put(state_key(p, k), v.encode());
        }
        let applied = chunk.applied.or(stored.applied_offset);
        batch.put(meta_key(p), encode_meta(&PartitionMeta { applied_offset: applied, epoch }));
        batch.put(position_key(p), chunk.position.to_be_bytes());
        inner.db.write_opt(batch, &inner.write_opts()).map_err(unavailable)
    }

    /// A state write that came through the changelog at `position`: the write and the position in
    /// one batch, checked like [`StateStore::write`].
    pub async fn write_logged(&self, write: StateWrite, position: i64) -> Result<(), StoreError> {
        self.write_at(write, Some(position)).await
    }

    async fn write_at(&self, write: StateWrite, position: Option<i64>) -> Result<(), StoreError> {
        match &self.group {
            Some(group) => group.write(write, position).await,
            None => self.blocking(move |inner| inner.write(vec![(write, position)]).remove(0)).await,
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner)).await.map_err(unavailable)?
    }
}

fn stripe(p: PartitionId) -> usize {
    p.0 as usize % LOCK_STRIPES
}

/// One state write waiting for the write grouping thread.
struct Queued {
    write: StateWrite,
    position: Option<i64>,
    queued_at: Instant,
    done: tokio::sync::oneshot::Sender<Result<(), StoreError>>,
}

/// The write grouping thread (module doc). Its queue is unbounded but short: a partition's
/// committer waits for its write before the next, so it holds at most one write per partition
/// (and writes whose callers gave up waiting). Dropping the last store clone closes the queue; the
/// drop waits for the thread to write what it holds and release the database (one window and one
/// write at most).
struct WriteGrouper {
    queue: Option<crossbeam_channel::Sender<Queued>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl WriteGrouper {
    fn start(inner: Arc<Inner>, window: Duration) -> std::io::Result<Self> {
        let (queue, rx) = crossbeam_channel::unbounded::<Queued>();
        let thread = std::thread::Builder::new().name("partita-writes".into()).spawn(move || {
            while let Ok(first) = rx.recv() {
                // From the first write's arrival: one that queued during the previous group's
                // write has waited part of its window already.
                let until = first.queued_at + window;
                let mut group = vec![first];
                while let Ok(next) = rx.recv_deadline(until) {
                    group.push(next);
                }
                let (writes, answers): (Vec<_>, Vec<_>) =
                    group.into_iter().map(|q| ((q.write, q.position), q.done)).unzip();
                let n = writes.len();
                // A panic fails this group's writes (retried by their callers: a write that landed
                // passes its check again), not every later one.
                let results = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    fail::fail_point!("grouped-write");
                    inner.write(writes)
                }))
                .unwrap_or_else(|_| vec![Err(unavailable("a grouped state write panicked")); n]);
                for (answer, result) in answers.into_iter().zip(results) {
                    let _ = answer.send(result);
                }
            }
        })?;
        Ok(Self { queue: Some(queue), thread: Some(thread) })
    }

    async fn write(&self, write: StateWrite, position: Option<i64>) -> Result<(), StoreError> {
        let stopped = || unavailable("the write grouping thread stopped");
        let (done, answer) = tokio::sync::oneshot::channel();
        let queue = self.queue.as_ref().ok_or_else(stopped)?;
        queue.send(Queued { write, position, queued_at: Instant::now(), done }).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

impl Drop for WriteGrouper {
    fn drop(&mut self) {
        self.queue.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn state_key(p: PartitionId, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(5 + key.len());
    k.push(STATE);
    k.extend_from_slice(&p.0.to_be_bytes());
    k.extend_from_slice(key);
    k
}

fn meta_key(p: PartitionId) -> [u8; 5] {
    let b = p.0.to_be_bytes();
    [META, b[0], b[1], b[2], b[3]]
}

fn position_key(p: PartitionId) -> [u8; 5] {
    let b = p.0.to_be_bytes();
    [POSITION, b[0], b[1], b[2], b[3]]
}

/// Consecutive changes of one partition's changelog, ending at offset `position`.
#[derive(Debug, Default)]
pub struct ChangelogChunk {
    /// The latest state of each key changed.
    pub entries: Vec<(Vec<u8>, StateValue)>,
    /// The last applied offset recorded in the chunk.
    pub applied: Option<Offset>,
    pub position: i64,
}

fn encode_meta(m: &PartitionMeta) -> [u8; 17] {
    let mut out = [0u8; 17];
    if let Some(o) = m.applied_offset {
        out[0] = 1;
        out[1..9].copy_from_slice(&o.0.to_be_bytes());
    }
    out[9..17].copy_from_slice(&m.epoch.0.to_be_bytes());
    out
}

fn decode_meta(bytes: &[u8]) -> Result<PartitionMeta, StoreError> {
    let b: &[u8; 17] = bytes
        .try_into()
        .map_err(|_| StoreError::Corrupt { detail: format!("meta of {} bytes", bytes.len()) })?;
    let offset = i64::from_be_bytes(b[1..9].try_into().unwrap_or_default());
    let epoch = u64::from_be_bytes(b[9..17].try_into().unwrap_or_default());
    Ok(PartitionMeta { applied_offset: (b[0] == 1).then_some(Offset(offset)), epoch: Epoch(epoch) })
}

impl Inner {
    fn lock(&self, p: PartitionId) -> std::sync::MutexGuard<'_, ()> {
        self.locks[stripe(p)].lock().unwrap_or_else(|e| e.into_inner())
    }

    fn meta(&self, p: PartitionId) -> Result<PartitionMeta, StoreError> {
        match self.db.get_pinned(meta_key(p)).map_err(unavailable)? {
            Some(b) => decode_meta(&b),
            None => Ok(PartitionMeta::default()),
        }
    }

    fn position(&self, p: PartitionId) -> Result<Option<i64>, StoreError> {
        match self.db.get_pinned(position_key(p)).map_err(unavailable)? {
            Some(b) => {
                let b: [u8; 8] = b[..].try_into().map_err(|_| StoreError::Corrupt {
                    detail: format!("partition {p}: changelog position of {} bytes", b.len()),
                })?;
                Ok(Some(i64::from_be_bytes(b)))
            }
            None => Ok(None),
        }
    }

    /// Check each write against its partition's stored meta (or the group's earlier write of the
    /// same partition) and write the accepted ones as one atomic batch; one result per write, in
    /// order. Holds the locks of every partition involved, taken in stripe order (everything else
    /// holds one lock at a time, so no cycle of waiters can form).
    fn write(&self, writes: Vec<(StateWrite, Option<i64>)>) -> Vec<Result<(), StoreError>> {
        let mut stripes: Vec<usize> = writes.iter().map(|(w, _)| stripe(w.partition)).collect();
        stripes.sort_unstable();
        stripes.dedup();
        let _guards: Vec<_> =
            stripes.into_iter().map(|i| self.locks[i].lock().unwrap_or_else(|e| e.into_inner())).collect();
        let mut batch = WriteBatch::default();
        let mut written: HashMap<PartitionId, PartitionMeta> = HashMap::new();
        let mut results: Vec<Result<(), StoreError>> = writes
            .iter()
            .map(|(write, position)| {
                let p = write.partition;
                let stored = match written.get(&p) {
                    Some(meta) => *meta,
                    None => self.meta(p)?,
                };
                Inner::check_write(p, write, &stored)?;
                for (k, v) in &write.entries {
                    batch.put(state_key(p, k), v.encode());
                }
                let meta = PartitionMeta { applied_offset: Some(write.applied_offset), epoch: write.epoch };
                batch.put(meta_key(p), encode_meta(&meta));
                match position {
                    Some(position) => batch.put(position_key(p), position.to_be_bytes()),
                    // Written without the changelog: a position kept from an earlier run with one
                    // no longer describes this copy (a later claim replays the whole changelog).
                    None => batch.delete(position_key(p)),
                }
                written.insert(p, meta);
                Ok(())
            })
            .collect();
        if !written.is_empty()
            && let Err(e) = self.db.write_opt(batch, &self.write_opts()).map_err(unavailable)
        {
            for r in results.iter_mut().filter(|r| r.is_ok()) {
                *r = Err(e.clone());
            }
        }
        results
    }

    fn write_opts(&self) -> WriteOptions {
        let mut wo = WriteOptions::default();
        wo.set_sync(self.sync_wal);
        wo
    }

    /// A write must come from the owner of the stored epoch (exactly: a newer epoch that never
    /// claimed is no owner) and must not move the applied offset backwards.
    fn check_write(p: PartitionId, write: &StateWrite, stored: &PartitionMeta) -> Result<(), StoreError> {
        if write.epoch != stored.epoch {
            return Err(StoreError::Fenced { partition: p, epoch: write.epoch, current: stored.epoch });
        }
        if let Some(applied) = stored.applied_offset
            && write.applied_offset < applied
        {
            return Err(StoreError::Corrupt {
                detail: format!(
                    "partition {p}: a write would move the applied offset back from {} to {}",
                    applied.0, write.applied_offset.0
                ),
            });
        }
        Ok(())
    }
}

impl StateStore for RocksStore {
    async fn read(
        &self,
        partition: PartitionId,
        keys: &[Vec<u8>],
    ) -> Result<Vec<Option<StateValue>>, StoreError> {
        let keys: Vec<Vec<u8>> = keys.iter().map(|k| state_key(partition, k)).collect();
        self.blocking(move |inner| {
            inner
                .db
                .multi_get(&keys)
                .into_iter()
                .map(|r| match r.map_err(unavailable)? {
                    Some(bytes) => StateValue::decode(&bytes).map(Some),
                    None => Ok(None),
                })
                .collect()
        })
        .await
    }

    async fn write(&self, write: StateWrite) -> Result<(), StoreError> {
        self.write_at(write, None).await
    }

    async fn meta(&self, partition: PartitionId) -> Result<PartitionMeta, StoreError> {
        self.blocking(move |inner| inner.meta(partition)).await
    }

    async fn claim(&self, partition: PartitionId, epoch: Epoch) -> Result<PartitionMeta, StoreError> {
        self.blocking(move |inner| {
            let _guard = inner.lock(partition);
            let stored = inner.meta(partition)?;
            // Compare-and-set: only a strictly newer epoch claims, so two claimers of the same
            // epoch cannot both own the partition.
            if epoch <= stored.epoch {
                return Err(StoreError::Fenced { partition, epoch, current: stored.epoch });
            }
            let meta = PartitionMeta { applied_offset: stored.applied_offset, epoch };
            inner
                .db
                .put_opt(meta_key(partition), encode_meta(&meta), &inner.write_opts())
                .map_err(unavailable)?;
            Ok(meta)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The thread survives a panic: that group's writes fail (nothing landed), the retry lands.
    #[cfg(feature = "failpoints")]
    #[tokio::test]
    async fn a_panic_in_a_grouped_write_fails_its_group_and_the_next_group_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let config = RocksConfig { write_window: Duration::from_millis(1), ..RocksConfig::new(dir.path()) };
        let store = RocksStore::open(&config).unwrap();
        let p = PartitionId(0);
        store.claim(p, Epoch(1)).await.unwrap();
        let write = || StateWrite {
            partition: p,
            epoch: Epoch(1),
            applied_offset: Offset(7),
            entries: vec![(b"k".to_vec(), StateValue::from_f32(&[7.0]))],
        };
        fail::cfg("grouped-write", "1*panic").unwrap();
        let failed = store.write(write()).await;
        fail::remove("grouped-write");
        assert!(
            matches!(&failed, Err(StoreError::Unavailable { detail }) if detail.contains("panicked")),
            "{failed:?}"
        );
        assert_eq!(store.meta(p).await.unwrap().applied_offset, None, "nothing landed");
        store.write(write()).await.unwrap();
        assert_eq!(store.meta(p).await.unwrap().applied_offset, Some(Offset(7)));
        assert_eq!(store.read(p, &[b"k".to_vec()]).await.unwrap(), vec![Some(StateValue::from_f32(&[7.0]))]);
    }

    #[test]
    fn meta_encoding_round_trips() {
        for m in [
            PartitionMeta::default(),
            PartitionMeta { applied_offset: Some(Offset(-1)), epoch: Epoch(3) },
            PartitionMeta { applied_offset: Some(Offset(i64::MAX)), epoch: Epoch(u64::MAX) },
        ] {
            assert_eq!(decode_meta(&encode_meta(&m)).unwrap(), m);
        }
        assert!(decode_meta(&[1, 2]).is_err());
    }

    #[test]
    fn partitions_do_not_share_key_prefixes() {
        assert!(
            !state_key(PartitionId(1), b"").starts_with(&state_key(PartitionId(0), b"\x00\x00\x00")[..5])
        );
        assert_ne!(meta_key(PartitionId(1)), meta_key(PartitionId(256)));
        assert_ne!(&meta_key(PartitionId(1))[..], &position_key(PartitionId(1))[..]);
    }
}
