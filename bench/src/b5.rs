//! B5, the cost of a RocksDB failover: how fast a node restores a partition from its changelog
//! topic (what a new owner does before it resumes, `docs/state.md`), against a plain consumer
//! reading the same changelog partition to its end in the same run (the limit: the restore cannot
//! read faster than that).
//!
//! 1. **fill**: a `ChangelogStore` claims partition 0 and writes `--keys` keys of the reference
//!    model's state (64 floats with the sequence window: 529 bytes) in writes of `--per-write`
//!    keys, each one Kafka transaction then one RocksDB write: writes/s and keys/s.
//! 2. **raw read**: a `read_committed` consumer reads the changelog partition to its end (the
//!    faster of two runs).
//! 3. **restore**: a fresh node (empty RocksDB) claims the partition: `init_transactions`, read,
//!    apply. keys/s, MB/s, and `ratio_vs_raw_read` = raw read time ÷ restore time.
//! 4. **warm claim**: the restorer writes 10 more transactions as the new owner, then the first
//!    node, whose copy stops where it filled, claims the partition back: it replays only those
//!    (what a failover to a standby copy costs, the copy a moment behind). Its time against the
//!    full restore's.
//!
//! The time-based failover numbers (kill to first output) are printed by the cluster tests
//! (`tests/tests/cluster.rs`). Ends with `RESULT {json}`. Usage: `scripts/bench.sh b5 [--keys
//! 100000]`.

use std::time::{Duration, Instant};

use clap::Parser;
use partita_actors::state::{Epoch, Offset, PartitionId, Sequenced, StateStore, StateValue, StateWrite};
use partita_bench::git_rev;
use partita_runtime::kafka::KafkaTier;
use partita_runtime::local::kafka::{CHANGELOG_CONFIG, KafkaOptions, LocalKafka, create_topics_with};
use partita_runtime::state::changelog::ChangelogStore;
use partita_runtime::state::rocks::{RocksConfig, RocksStore};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Offset as KOffset, TopicPartitionList};
use serde_json::json;

const TOPIC: &str = "b5.changelog";

#[derive(Debug, Parser)]
struct Args {
    /// Keys in the partition.
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// Keys per state write (one transaction each).
    #[arg(long, default_value_t = 1000)]
    per_write: u64,
}

fn store(dir: &std::path::Path, bootstrap: &str) -> anyhow::Result<ChangelogStore> {
    let local = RocksStore::open(&RocksConfig { sync_wal: false, ..RocksConfig::new(dir) })?;
    let tier = KafkaTier { bootstrap: bootstrap.to_owned(), properties: vec![] };
    Ok(ChangelogStore::new(local, tier, TOPIC, "b5"))
}

/// Read the changelog partition to its end with a plain consumer: (records, bytes).
fn raw_read(bootstrap: &str) -> anyhow::Result<(u64, u64)> {
    let consumer: BaseConsumer = partita_runtime::kafka::client_config(bootstrap)
        .set("group.id", "b5-raw")
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("fetch.wait.max.ms", "10")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(TOPIC, 0, KOffset::Beginning)?;
    consumer.assign(&tpl)?;
    let (mut records, mut bytes) = (0u64, 0u64);
    loop {
        use rdkafka::message::Message;
        match consumer.poll(Duration::from_millis(500)) {
            None => continue,
            Some(Err(KafkaError::PartitionEOF(_))) => return Ok((records, bytes)),
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(m)) => {
                records += 1;
                bytes += (m.key().map_or(0, <[u8]>::len) + m.payload().map_or(0, <[u8]>::len)) as u64;
            }
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let tmp = tempfile::tempdir()?;
    let kafka = LocalKafka::start(KafkaOptions::default()).await?;
    create_topics_with(&kafka.bootstrap, &[(TOPIC, 1)], 1, CHANGELOG_CONFIG).await?;
    let p = PartitionId(0);

    // 1. fill
    let writer = store(&tmp.path().join("writer"), &kafka.bootstrap)?;
    writer.claim(p, Epoch(1)).await?;
    let value = StateValue::sequenced(&Sequenced {
        sequence: 1,
        window: 0,
        offset: Some(Offset(0)),
        state: vec![0.25; 64],
    });
    let started = Instant::now();
    let mut written = 0u64;
    let mut writes = 0u64;
    while written < args.keys {
        let n = args.per_write.min(args.keys - written);
        let entries =
            (written..written + n).map(|k| (format!("card-{k:08}").into_bytes(), value.clone())).collect();
        writer
            .write(StateWrite {
                partition: p,
                epoch: Epoch(1),
                applied_offset: Offset(writes as i64),
                entries,
            })
            .await?;
        written += n;
        writes += 1;
    }
    let fill = started.elapsed().as_secs_f64();
    drop(writer);
    println!(
        "fill: {written} keys in {writes} writes, {fill:.1} s ({:.0} keys/s, {:.1} transactions/s)",
        written as f64 / fill,
        writes as f64 / fill
    );

    // 2. raw read
    // The faster of two reads: the first also pays for warming up what the restore finds warm.
    let mut raw = f64::MAX;
    let (mut records, mut bytes) = (0, 0);
    for _ in 0..2 {
        let bootstrap = kafka.bootstrap.clone();
        let started = Instant::now();
        (records, bytes) = tokio::task::spawn_blocking(move || raw_read(&bootstrap)).await??;
        raw = raw.min(started.elapsed().as_secs_f64());
    }
    println!(
        "raw read: {records} records, {:.1} MB in {raw:.2} s ({:.0} records/s)",
        bytes as f64 / 1e6,
        records as f64 / raw
    );

    // 3. restore into a fresh node
    let restorer = store(&tmp.path().join("restorer"), &kafka.bootstrap)?;
    let started = Instant::now();
    let meta = restorer.claim(p, Epoch(1)).await?;
    let restore = started.elapsed().as_secs_f64();
    let check = restorer.read(p, &[format!("card-{:08}", args.keys - 1).into_bytes()]).await?;
    anyhow::ensure!(check[0].as_ref() == Some(&value), "the last key was not restored");
    anyhow::ensure!(meta.applied_offset == Some(Offset(writes as i64 - 1)), "restored {meta:?}");
    let ratio = raw / restore;
    let replayed = restorer.last_restore(p).map(|r| r.records).unwrap_or_default();
    anyhow::ensure!(
        replayed == records,
        "the restore read {replayed} records, the changelog holds {records}"
    );
    println!(
        "restore: {} keys ({replayed} records), {:.1} MB in {restore:.2} s ({:.0} keys/s, {:.1} MB/s); raw read / restore = {ratio:.2}",
        args.keys,
        bytes as f64 / 1e6,
        args.keys as f64 / restore,
        bytes as f64 / 1e6 / restore
    );

    // 4. warm claim: the first node claims back, its copy 10 transactions behind
    for i in 0..10u64 {
        let entries = (0..10).map(|k| (format!("card-{k:08}").into_bytes(), value.clone())).collect();
        let applied_offset = Offset((writes + i) as i64);
        restorer.write(StateWrite { partition: p, epoch: Epoch(1), applied_offset, entries }).await?;
    }
    drop(restorer);
    let warm = store(&tmp.path().join("writer"), &kafka.bootstrap)?;
    let started = Instant::now();
    let meta = warm.claim(p, Epoch(2)).await?;
    let warm_claim = started.elapsed().as_secs_f64();
    anyhow::ensure!(meta.applied_offset == Some(Offset(writes as i64 + 9)), "warm claim {meta:?}");
    let replayed = warm.last_restore(p).map(|r| r.records).unwrap_or_default();
    println!(
        "warm claim: {replayed} changelog records replayed in {warm_claim:.3} s, {:.1}x faster than the full restore",
        restore / warm_claim
    );
    println!(
        "RESULT {}",
        json!({
            "bench": "b5-restore",
            "rev": git_rev(),
            "keys": args.keys,
            "changelog_records": records,
            "changelog_mb": bytes as f64 / 1e6,
            "fill_keys_per_s": written as f64 / fill,
            "fill_transactions_per_s": writes as f64 / fill,
            "raw_read_s": raw,
            "restore_s": restore,
            "restore_keys_per_s": args.keys as f64 / restore,
            "restore_mb_per_s": bytes as f64 / 1e6 / restore,
            "ratio_vs_raw_read": ratio,
            "warm_claim_s": warm_claim,
            "warm_claim_records": replayed,
        })
    );
    kafka.stop().await;
    Ok(())
}
