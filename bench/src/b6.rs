//! B6 + B3: state larger than memory, through the byte-bounded cache and RocksDB, against RocksDB's
//! own `db_bench` and Redis with `maxmemory`, in the same run.
//!
//! 1. **stream**: every key of a universe holding `--factor` × the cache budget of state, as the
//!    cache weighs it (values of pseudo-random bytes, 256 B to `--max-value` bytes, fixed per key)
//!    is read-modified-written once, in waves, through `StateCache` + `RocksStore`. RSS is
//!    sampled throughout; nothing may fail.
//! 2. **zipf**: read-modify-write waves of Zipf(1.1)-distributed keys for `--seconds`: keys/s.
//!    Then single-key reads of the hottest key: p50/p99.
//! 3. **db_bench** `updaterandom` (RocksDB's own read-modify-write loop, one thread) on the same
//!    number of keys and mean value size: the raw store's rate. `ratio_vs_db_bench` = 2 ÷ 3.
//! 4. **redis** with `maxmemory` = the same memory budget and `noeviction` (the case study's
//!    setup): the same key stream until Redis answers "OOM command not allowed".
//!
//! Ends with `RESULT {json}`. Usage: `scripts/bench.sh b6 [--budget-mib 64] [--factor 10]`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use hdrhistogram::Histogram;
use partita_actors::state::{
    Epoch, NoopObserver, Offset, PartitionId, StateCache, StateStore, StateValue, StateWrite,
};
use partita_bench::git_rev;
use partita_runtime::loadgen::Zipf;
use partita_runtime::state::rocks::{RocksConfig, RocksMemory, RocksStore};
use serde_json::json;

#[derive(Debug, Parser)]
struct Args {
    /// The state cache's byte budget, MiB.
    #[arg(long, default_value_t = 64)]
    budget_mib: u64,
    /// Distinct state streamed, as a multiple of the budget.
    #[arg(long, default_value_t = 10)]
    factor: u64,
    #[arg(long, default_value_t = 4096)]
    max_value: usize,
    /// Keys per wave (one batched load and one atomic write per wave).
    #[arg(long, default_value_t = 256)]
    wave: usize,
    /// Seconds of Zipf read-modify-write.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Where RocksDB and db_bench put their files (default: a temporary directory).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
}

/// Deterministic per-key value size between 256 B and `max` (log-uniform).
fn value_len(key: u64, max: usize) -> usize {
    let h = key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11;
    let u = (h as f64) / ((1u64 << 53) as f64);
    (256.0 * ((max as f64 / 256.0).powf(u))) as usize
}

/// A key's first value: `len` pseudo-random bytes (a model's state is floats, which compress
/// little; zeros would let LZ4 pack the whole stream into a few blocks and flatter RocksDB).
fn initial_value(key: u64, len: usize) -> Vec<u8> {
    let mut x = key ^ 0x2545_F491_4F6C_DD1D;
    (0..len)
        .map(|_| {
            // xorshift64
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Where the process's memory stands at one instant, bytes.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    rss: u64,
    /// Anonymous memory (the heap: malloc's arenas, whatever they hold) and file pages (code,
    /// RocksDB's files mapped).
    anon: u64,
    file: u64,
    /// The state cache's accounted bytes (what its budget bounds).
    cache: u64,
    rocks: RocksMemory,
}

impl Sample {
    fn take(cache: &StateCache<RocksStore>, rocks: &RocksStore) -> Self {
        Self { cache: cache.stats().bytes, rocks: rocks.memory(), ..Self::process() }
    }

    /// The process's part only (`/proc/self/status`).
    fn process() -> Self {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let kib = |field: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()))
                .map_or(0, |n| n * 1024)
        };
        Self { rss: kib("VmRSS:"), anon: kib("RssAnon:"), file: kib("RssFile:"), ..Self::default() }
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / 1048576.0
}

fn key_bytes(k: u64) -> Vec<u8> {
    format!("card-{k:012}").into_bytes()
}

/// Read-modify-write one wave: one batched load, change each value, one atomic write.
async fn rmw(
    cache: &StateCache<RocksStore>,
    keys: &[u64],
    offset: i64,
    max_value: usize,
) -> anyhow::Result<u64> {
    let p = PartitionId(0);
    let kb: Vec<Vec<u8>> = keys.iter().map(|&k| key_bytes(k)).collect();
    let current = cache.get_many(p, &kb).await?;
    let entries = kb
        .into_iter()
        .zip(keys)
        .zip(current)
        .map(|((key, &k), cur)| {
            let mut data = cur.map_or_else(|| initial_value(k, value_len(k, max_value)), |v| v.data.clone());
            data[0] = data[0].wrapping_add(1);
            (key, StateValue { format: 1, data })
        })
        .collect::<Vec<_>>();
    let bytes = entries.iter().map(|(_, v): &(Vec<u8>, StateValue)| v.data.len() as u64).sum();
    cache
        .apply(StateWrite { partition: p, epoch: Epoch(1), applied_offset: Offset(offset), entries })
        .await?;
    Ok(bytes)
}

/// RocksDB's own read-modify-write rate: `fillseq` of `num` keys, then `updaterandom` (uniform
/// random keys, one thread) on that database for `seconds`.
fn db_bench(dir: &std::path::Path, num: u64, value_size: usize, seconds: f64) -> anyhow::Result<f64> {
    let run = |bench: &str, extra: &[String]| -> anyhow::Result<String> {
        let mut args = vec![
            format!("--benchmarks={bench}"),
            format!("--num={num}"),
            format!("--value_size={value_size}"),
            format!("--db={}", dir.join("db_bench").display()),
            "--compression_type=lz4".to_owned(),
            "--threads=1".to_owned(),
            "--cache_size=33554432".to_owned(),
            "--write_buffer_size=16777216".to_owned(),
            "--sync=false".to_owned(),
        ];
        args.extend_from_slice(extra);
        let out = Command::new("db_bench").args(&args).output()?;
        anyhow::ensure!(
            out.status.success(),
            "db_bench {bench} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    run("fillseq", &[])?;
    let text = run(
        "updaterandom",
        &["--use_existing_db=1".to_owned(), format!("--duration={}", seconds.ceil() as u64)],
    )?;
    let line = text
        .lines()
        .find(|l| l.starts_with("updaterandom"))
        .ok_or_else(|| anyhow::anyhow!("db_bench printed no updaterandom line:\n{text}"))?;
    // "updaterandom :  12.345 micros/op 81000 ops/sec ..."
    let ops = line
        .split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .find(|w| w[1] == "ops/sec")
        .and_then(|w| w[0].parse::<f64>().ok())
        .ok_or_else(|| anyhow::anyhow!("cannot parse {line:?}"))?;
    Ok(ops)
}

/// Start redis-server with `maxmemory` and write the key stream until it refuses.
fn redis(budget: u64, keys: u64, max_value: usize) -> anyhow::Result<serde_json::Value> {
    let port = 20000 + (std::process::id() % 20000) as u16;
    let mut server = Command::new("redis-server")
        .args([
            "--port".to_owned(),
            port.to_string(),
            "--bind".to_owned(),
            "127.0.0.1".to_owned(),
            "--maxmemory".to_owned(),
            budget.to_string(),
            "--maxmemory-policy".to_owned(),
            "noeviction".to_owned(),
            "--save".to_owned(),
            String::new(),
            "--appendonly".to_owned(),
            "no".to_owned(),
        ])
        .stdout(Stdio::null())
        .spawn()?;
    let result = (|| -> anyhow::Result<serde_json::Value> {
        let start = Instant::now();
        let conn = loop {
            match TcpStream::connect(("127.0.0.1", port)) {
                Ok(c) => break c,
                Err(_) if start.elapsed() < Duration::from_secs(5) => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => return Err(e.into()),
            }
        };
        let mut writer = conn.try_clone()?;
        let mut reader = BufReader::new(conn);
        let started = Instant::now();
        let (mut written, mut oom) = (0u64, None);
        'outer: for chunk in (0..keys).collect::<Vec<_>>().chunks(256) {
            let mut buf = Vec::new();
            for &k in chunk {
                let key = key_bytes(k);
                let value = vec![b'x'; value_len(k, max_value)];
                write!(buf, "*3\r\n$3\r\nSET\r\n${}\r\n", key.len())?;
                buf.extend_from_slice(&key);
                write!(buf, "\r\n${}\r\n", value.len())?;
                buf.extend_from_slice(&value);
                buf.extend_from_slice(b"\r\n");
            }
            writer.write_all(&buf)?;
            for _ in chunk {
                let mut line = String::new();
                reader.read_line(&mut line)?;
                if line.starts_with('-') {
                    oom.get_or_insert_with(|| line.trim().to_owned());
                } else if oom.is_none() {
                    written += 1;
                }
            }
            if oom.is_some() {
                break 'outer;
            }
        }
        let secs = started.elapsed().as_secs_f64();
        let mut info = String::new();
        writer.write_all(b"*2\r\n$4\r\nINFO\r\n$6\r\nmemory\r\n")?;
        let mut header = String::new();
        reader.read_line(&mut header)?;
        if let Some(n) = header.trim().strip_prefix('$').and_then(|n| n.parse::<usize>().ok()) {
            let mut body = vec![0; n + 2];
            reader.read_exact(&mut body)?;
            info = String::from_utf8_lossy(&body).into_owned();
        }
        let used = info.lines().find_map(|l| l.strip_prefix("used_memory:")).unwrap_or("?").trim().to_owned();
        Ok(json!({
            "keys_offered": keys,
            "keys_written_before_refusal": written,
            "error": oom,
            "used_memory_bytes": used,
            "sets_per_s": written as f64 / secs,
        }))
    })();
    let _ = server.kill();
    let _ = server.wait();
    result
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let parent = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp = tempfile::tempdir_in(&parent)?;
    let budget = args.budget_mib << 20;
    let mean_value = {
        let n = 10_000u64;
        (0..n).map(|k| value_len(k, args.max_value) as u64).sum::<u64>() / n
    };
    let per_key = mean_value + 17 + partita_actors::state::ENTRY_OVERHEAD;
    let keys = args.factor * budget / per_key;
    let rocks_cfg = RocksConfig {
        sync_wal: false,
        block_cache_bytes: 32 << 20,
        write_buffer_bytes: 16 << 20,
        ..RocksConfig::new(tmp.path().join("partita"))
    };
    // The memory the configuration allows for state: cache + RocksDB block cache + 2 memtables.
    let configured = budget + rocks_cfg.block_cache_bytes as u64 + 2 * rocks_cfg.write_buffer_bytes as u64;
    // glibc reads it at start: the image and scripts/bench.sh set 2 (docs/memory.md).
    let arena_max = std::env::var("MALLOC_ARENA_MAX").unwrap_or_else(|_| "unset (glibc default)".into());
    println!("MALLOC_ARENA_MAX: {arena_max}");
    println!(
        "B6: {keys} keys, mean value {mean_value} B, {:.0} MiB of state through a {} MiB cache ({:.0} MiB configured in all)",
        (keys * mean_value) as f64 / 1048576.0,
        args.budget_mib,
        configured as f64 / 1048576.0
    );

    let baseline = Sample::process();
    let store = RocksStore::open(&rocks_cfg)?;
    let rocks = store.clone();
    // Writes come from the partition's owner: claim it (epoch 1) as a node would.
    store.claim(PartitionId(0), Epoch(1)).await?;
    let cache = Arc::new(StateCache::new(store, budget, Arc::new(NoopObserver)));
    // The sample with the highest RSS: where the memory was then.
    let mut peak = Sample::default();
    let sample = |peak: &mut Sample| {
        let now = Sample::take(&cache, &rocks);
        if now.rss > peak.rss {
            *peak = now;
        }
    };
    let mut offset = 0i64;
    let started = Instant::now();
    let all: Vec<u64> = (0..keys).collect();
    // Counted, not assumed: bytes of state written, and waves whose read or write failed.
    let (mut streamed_bytes, mut failures) = (0u64, 0u64);
    for wave in all.chunks(args.wave) {
        match rmw(&cache, wave, offset, args.max_value).await {
            Ok(bytes) => streamed_bytes += bytes,
            Err(e) => {
                failures += 1;
                eprintln!("stream wave {offset} failed: {e:#}");
            }
        }
        offset += 1;
        if offset % 64 == 0 {
            sample(&mut peak);
        }
    }
    let stream_secs = started.elapsed().as_secs_f64();
    let stream_rate = keys as f64 / stream_secs;
    let stats = cache.stats();
    println!(
        "{}",
        json!({"name": "stream", "keys": keys, "keys_per_s": stream_rate, "cache": format!("{stats:?}"), "rss_growth_peak": peak.rss.saturating_sub(baseline.rss)})
    );

    let mut zipf = Zipf::new(keys as usize, 1.1, 1);
    let started = Instant::now();
    let mut done = 0u64;
    while started.elapsed().as_secs_f64() < args.seconds {
        let wave: Vec<u64> = (0..args.wave).map(|_| zipf.sample()).collect();
        if let Err(e) = rmw(&cache, &wave, offset, args.max_value).await {
            failures += 1;
            eprintln!("Zipf wave {offset} failed: {e:#}");
        }
        offset += 1;
        done += wave.len() as u64;
        if offset % 64 == 0 {
            sample(&mut peak);
        }
    }
    let zipf_rate = done as f64 / started.elapsed().as_secs_f64();
    let mut hot = Histogram::<u64>::new_with_bounds(1, 10_000_000, 3)?;
    let hot_key = vec![key_bytes(0)];
    for _ in 0..100_000 {
        let t = Instant::now();
        cache.get_many(PartitionId(0), &hot_key).await?;
        hot.record(t.elapsed().as_nanos().max(1) as u64)?;
    }
    sample(&mut peak);
    let stats = cache.stats();
    let hit_ratio = stats.hits as f64 / (stats.hits + stats.misses).max(1) as f64;
    println!(
        "{}",
        json!({"name": "zipf_rmw", "keys_per_s": zipf_rate, "hit_ratio": hit_ratio,
               "hot_read_p50_us": hot.value_at_quantile(0.5) as f64 / 1e3,
               "hot_read_p99_us": hot.value_at_quantile(0.99) as f64 / 1e3})
    );
    drop(cache);

    let db_bench_rate = db_bench(tmp.path(), keys, mean_value as usize, args.seconds)?;
    println!("{}", json!({"name": "db_bench_updaterandom", "ops_per_s": db_bench_rate}));
    let redis = redis(budget, keys, args.max_value)?;
    println!("{}", json!({"name": "redis_maxmemory", "result": redis}));

    let ratio = zipf_rate / db_bench_rate;
    let ratio_cold = stream_rate / db_bench_rate;
    let growth = peak.rss.saturating_sub(baseline.rss);
    let rss_ratio = growth as f64 / configured as f64;
    let anon = peak.anon.saturating_sub(baseline.anon);
    let file = peak.file.saturating_sub(baseline.file);
    let rocks_mem = peak.rocks.block_cache + peak.rocks.memtables + peak.rocks.table_readers;
    let state_vs_budget = streamed_bytes as f64 / budget as f64;
    println!();
    println!(
        "state streamed: {:.0} MiB = {state_vs_budget:.1}x the cache budget; failed waves: {failures}",
        streamed_bytes as f64 / 1048576.0,
    );
    println!(
        "RSS growth peak: {:.1} MiB vs {:.1} MiB configured (cache {} + block cache {} + memtables {}): {:.2}x",
        mib(growth),
        mib(configured),
        args.budget_mib,
        rocks_cfg.block_cache_bytes >> 20,
        (2 * rocks_cfg.write_buffer_bytes) >> 20,
        rss_ratio
    );
    // The parts at the peak: what the state cache and RocksDB count, and what the process holds
    // (anonymous: the heap; file: mapped files). Anonymous growth beyond the counted parts is the
    // allocator's (arenas, fragmentation, freed memory not returned) or uncounted allocations.
    println!(
        "at the RSS peak: state cache {:.1} MiB accounted; RocksDB {:.1} MiB (block cache {:.1}, memtables {:.1}, \
         table readers {:.1}); anonymous growth {:.1} MiB ({:.1} MiB beyond those counts); file pages {:.1} MiB",
        mib(peak.cache),
        mib(rocks_mem),
        mib(peak.rocks.block_cache),
        mib(peak.rocks.memtables),
        mib(peak.rocks.table_readers),
        mib(anon),
        mib(anon.saturating_sub(peak.cache + rocks_mem)),
        mib(file),
    );
    println!(
        "Zipf RMW through cache + RocksDB: {zipf_rate:.0} keys/s (hit ratio {hit_ratio:.3}); db_bench updaterandom: {db_bench_rate:.0} ops/s; ratio {ratio:.2} (target >= 0.5)"
    );
    println!("all-miss RMW (the stream): {stream_rate:.0} keys/s; ratio {ratio_cold:.2}");
    println!("hot-key read p99: {:.1} us (target <= 1 ms)", hot.value_at_quantile(0.99) as f64 / 1e3);
    println!("redis (maxmemory {} MiB, noeviction): {}", args.budget_mib, redis);
    println!(
        "RESULT {}",
        json!({
            "bench": "B6+B3",
            "git": git_rev(),
            "keys": keys,
            "state_bytes": streamed_bytes,
            "state_vs_budget": state_vs_budget,
            "budget_bytes": budget,
            "configured_bytes": configured,
            "malloc_arena_max": arena_max,
            "rss_growth_peak_bytes": growth,
            "at_peak": {
                "state_cache_bytes": peak.cache,
                "rocksdb_block_cache_bytes": peak.rocks.block_cache,
                "rocksdb_memtables_bytes": peak.rocks.memtables,
                "rocksdb_table_readers_bytes": peak.rocks.table_readers,
                "anonymous_growth_bytes": anon,
                "file_pages_growth_bytes": file,
            },
            "rss_vs_configured": rss_ratio,
            "stream_keys_per_s": stream_rate,
            "zipf_rmw_keys_per_s": zipf_rate,
            "db_bench_updaterandom_ops_per_s": db_bench_rate,
            "ratio_vs_db_bench": ratio,
            "ratio_vs_db_bench_all_misses": ratio_cold,
            "hit_ratio": hit_ratio,
            "hot_read_p99_us": hot.value_at_quantile(0.99) as f64 / 1e3,
            "failed_waves": failures,
            "redis": redis,
        })
    );
    Ok(())
}
