//! B4: end to end through the local broker: Kafka -> state -> model -> Kafka, against the
//! pipeline's limit measured in the same run on the same broker.
//!
//! 1. **pass-through**: an rdkafka consumer (group member) that decodes each event and produces a
//!    minimal score (source headers, event time) with the same producer settings as the node
//!    (idempotent, `acks=all`), on one thread: what the broker and clients alone sustain.
//! 2. **node**: `partita node` in process (RocksDB state, fraud_gru on CPU) on its own topics.
//! 3. **split**: the same node as role scorer, with its inference on a role-worker node (same
//!    process, plaintext gRPC on loopback, the same worker settings): what the scorer -> worker
//!    hop costs against the in-process workers of `node` (`ratio_split_vs_node`).
//!
//! The broker is Apache Kafka (one KRaft node on loopback). Every rung runs on a fresh broker with
//! fresh topics, so a rung's backlog or log size never carries into the next. For each, the load generator offers a ladder of rates (open loop, latency from the scheduled
//! send time) for `--seconds` each, `--runs` times (default 3; the median run by p99 counts, the
//! spread is printed); the **max sustainable rate** is the highest rung whose median run has p99
//! at most 50 ms with every record answered and throughput >= 95 % of the offered rate.
//! `ratio_vs_pass_through` = node / pass-through. For the node (and split) each rung also prints
//! where a score's time went (mean ms per score of the median run, from the score's own stage
//! timings and the reader's clock) and the node's state writes (from its `/metrics`). Ends with
//! `RESULT {json}`.
//! Usage: `scripts/bench.sh b4 [--seconds 5] [--runs 3] [--rates 1000,2000,...] [--partitions 4] [--sync-wal false]
//! [--modes pass-through,node,split] [--intra-op-threads N] [--cpu-affinity 1]`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::Parser;
use partita_actors::partition::{HEADER_SOURCE_OFFSET, HEADER_SOURCE_PARTITION};
use partita_bench::{NodeUnderTest, TOPICS, fresh_broker, git_rev, init_logs, load_options};
use partita_proto::v1::{Event, Score};
use partita_runtime::loadgen::{LoadReport, run as run_load};
use partita_runtime::local::scrape::{http_get, metric};
use prost::Message as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use serde_json::json;

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value = "models")]
    repository: std::path::PathBuf,
    /// Seconds per rung.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Offered rates, events/s, in increasing order.
    #[arg(long, value_delimiter = ',', default_value = "500,1000,2000,3000,5000,10000,20000")]
    rates: Vec<f64>,
    /// Offered rate of the saturation run (capacity regardless of latency).
    #[arg(long, default_value_t = 50_000.0)]
    saturate: f64,
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    #[arg(long, default_value_t = 1_000_000)]
    keys: usize,
    #[arg(long, default_value_t = 0.6)]
    zipf: f64,
    /// Runs per rung (each on a fresh broker); a rung counts by its median run, and the spread is
    /// printed.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// The node's `--sync-wal` (fsync RocksDB's log on every state write).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    sync_wal: bool,
    /// The node's `[state] write_window` (state writes of every partition grouped into one RocksDB write per window; default 0: off).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0ms")]
    write_window: Duration,
    /// The node's libtorch intra-op threads (default: the node's).
    #[arg(long)]
    intra_op_threads: Option<usize>,
    /// The node's `--cpu-affinity` (cores its inference threads are pinned to; default none).
    #[arg(long, value_parser = partita_runtime::inference::affinity::parse_cpu_list, default_value = "")]
    cpu_affinity: partita_runtime::inference::affinity::CpuList,
    /// The node's `[inference] slo` (deadline-aware batching; default none: the models' fixed
    /// delay).
    #[arg(long, value_parser = humantime::parse_duration)]
    slo: Option<Duration>,
    /// What to measure, in this order (pass-through is the limit the ratios are against).
    #[arg(long, value_delimiter = ',', default_value = "pass-through,node,split")]
    modes: Vec<Mode>,
}

const P99_LIMIT_MS: f64 = 50.0;

fn sustained(r: &LoadReport) -> bool {
    r.p99_ms <= P99_LIMIT_MS && r.missing == 0 && r.throughput >= 0.95 * r.offered_rate
}

/// One load run against the topics on `bootstrap`.
fn load(args: &Args, bootstrap: &str, rate: f64, drain: u64) -> anyhow::Result<LoadReport> {
    let mut o = load_options(bootstrap, rate, args.seconds, Duration::from_secs(drain));
    o.keys = args.keys;
    o.zipf = args.zipf;
    run_load(&o, &AtomicBool::new(false))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    PassThrough,
    Node,
    Split,
}

/// One rung on a fresh broker (rungs must not inherit each other's records): topics, the system
/// under test, the load, teardown.
async fn rung(args: &Arc<Args>, mode: Mode, rate: f64, drain: u64) -> anyhow::Result<LoadReport> {
    let p = args.partitions;
    let broker = fresh_broker(p).await?;
    let b = broker.bootstrap.clone();
    let run = {
        let (args, b) = (args.clone(), b.clone());
        move || load(&args, &b, rate, drain)
    };
    let report = match mode {
        Mode::PassThrough => {
            let stop = Arc::new(AtomicBool::new(false));
            let assigned = Arc::new(AtomicBool::new(false));
            let pt = {
                let (b, stop) = (b.clone(), stop.clone());
                let assigned = assigned.clone();
                std::thread::spawn(move || pass_through(&b, TOPICS.0, TOPICS.1, &stop, &assigned))
            };
            // Load starts once the pass-through owns the partitions (as for the node below).
            let since = std::time::Instant::now();
            while !assigned.load(Ordering::SeqCst) {
                anyhow::ensure!(
                    since.elapsed() < Duration::from_secs(60),
                    "the pass-through never got its partitions"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let r = tokio::task::spawn_blocking(run).await?;
            stop.store(true, Ordering::SeqCst);
            pt.join().map_err(|_| anyhow::anyhow!("pass-through panicked"))??;
            r?
        }
        Mode::Node | Mode::Split => {
            let node = NodeUnderTest::start(&b, p, mode == Mode::Split, |o| {
                o.inference.repository = args.repository.clone();
                o.sync_wal = args.sync_wal;
                o.write_window = args.write_window;
                if let Some(n) = args.intra_op_threads {
                    o.inference.intra_op_threads = n;
                }
                o.inference.cpu_affinity = args.cpu_affinity.clone();
                o.inference.slo = args.slo;
            })
            .await?;
            let mut r = tokio::task::spawn_blocking(run).await?;
            // The node's state writes of this run (a fresh node per run): not on a score's path,
            // but each batch waits for its write before its offset may be committed.
            let text =
                http_get(&node.node.http.to_string(), "/metrics").map(|(_, body)| body).unwrap_or_default();
            if let Ok(r) = r.as_mut() {
                let (sum, count) = (
                    metric(&text, "partita_state_write_seconds_sum", &[]).unwrap_or(0.0),
                    metric(&text, "partita_state_write_seconds_count", &[]).unwrap_or(0.0),
                );
                r.state_writes = count as u64;
                r.state_write_ms = if count > 0.0 { sum / count * 1000.0 } else { 0.0 };
                r.wal_syncs = metric(&text, "partita_rocksdb_wal_syncs_total", &[]).unwrap_or(0.0) as u64;
            }
            node.stop().await?;
            r?
        }
    };
    broker.stop().await;
    Ok(report)
}

/// `args.runs` runs of one rung; returns the median run by p99 (by answered rate for a saturation
/// run) and prints the spread.
async fn runs(
    args: &Arc<Args>,
    mode: Mode,
    rate: f64,
    drain: u64,
    saturation: bool,
) -> anyhow::Result<LoadReport> {
    let mut reports = Vec::with_capacity(args.runs.max(1));
    for _ in 0..args.runs.max(1) {
        reports.push(rung(args, mode, rate, drain).await?);
    }
    let spread = |f: fn(&LoadReport) -> f64| {
        let mut v: Vec<f64> = reports.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        (v[0], v[v.len() / 2], v[v.len() - 1])
    };
    let (p99, tput) = (spread(|r| r.p99_ms), spread(|r| r.answered_rate));
    println!(
        "{:<13} {} runs: p99 min {:.1} / median {:.1} / max {:.1} ms; answered min {:.0} / median {:.0} / max {:.0}/s",
        label(mode),
        reports.len(),
        p99.0,
        p99.1,
        p99.2,
        tput.0,
        tput.1,
        tput.2
    );
    // On a ladder rung, a run that left records unanswered decides the rung: it is reported
    // instead of the median (a saturation run measures capacity only).
    if !saturation && let Some(worst) = reports.iter().filter(|r| r.missing > 0).max_by_key(|r| r.missing) {
        println!(
            "{:<13} a run left {} records unanswered: the rung counts as that run",
            label(mode),
            worst.missing
        );
        return Ok(worst.clone());
    }
    if saturation {
        reports.sort_by(|a, b| a.answered_rate.total_cmp(&b.answered_rate));
    } else {
        reports.sort_by(|a, b| a.p99_ms.total_cmp(&b.p99_ms));
    }
    let n = reports.len();
    Ok(reports.swap_remove(n / 2))
}

fn label(mode: Mode) -> &'static str {
    match mode {
        Mode::PassThrough => "pass-through",
        Mode::Node => "node",
        Mode::Split => "split",
    }
}

/// Every rate (a noisy rung does not end the ladder), then the saturation runs.
async fn ladder(args: &Arc<Args>, mode: Mode) -> anyhow::Result<(Vec<LoadReport>, LoadReport)> {
    let label = label(mode);
    let mut rungs = Vec::new();
    for &rate in &args.rates {
        let r = runs(args, mode, rate, 10, false).await?;
        println!(
            "{label:<13} offered {:>7.0}/s  median run: answered {:>8.0}/s  p50 {:>7.1} ms  p99 {:>8.1} ms  p99.9 {:>8.1} ms  missing {:>6}  {}",
            rate,
            r.answered_rate,
            r.p50_ms,
            r.p99_ms,
            r.p999_ms,
            r.missing,
            if sustained(&r) { "sustained" } else { "NOT sustained" }
        );
        if mode != Mode::PassThrough {
            print_stages(label, &r);
        }
        println!("{}", json!({"name": format!("b4/{label}"), "rate": rate, "report": r, "git": git_rev()}));
        rungs.push(r);
    }
    let sat = runs(args, mode, args.saturate, 60, true).await?;
    println!(
        "{label:<13} saturation (median run): offered {:.0}/s, sent {}, answered {:.0}/s from first send to last answer",
        args.saturate, sat.sent, sat.answered_rate,
    );
    if mode != Mode::PassThrough {
        print_stages(label, &sat);
    }
    println!("{}", json!({"name": format!("b4/{label}/saturation"), "report": sat, "git": git_rev()}));
    Ok((rungs, sat))
}

/// Where a score's time went (the median run): mean and p99 per stage along its path (p99s do not
/// add up), then the node's state writes.
fn print_stages(label: &str, r: &LoadReport) {
    let stages: Vec<String> =
        r.stages.iter().map(|t| format!("{} {:.1}/{:.1}", t.stage, t.mean_ms, t.p99_ms)).collect();
    println!(
        "{label:<13}   ms per score, mean/p99: {} | end to end {:.1}/{:.1}; state writes {} of {:.1} ms each, {} log fsyncs",
        stages.join(", "),
        r.mean_ms,
        r.p99_ms,
        r.state_writes,
        r.state_write_ms,
        r.wal_syncs,
    );
}

fn best(reports: &[LoadReport]) -> f64 {
    reports.iter().filter(|r| sustained(r)).map(|r| r.offered_rate).fold(0.0, f64::max)
}

/// The pass-through: consume, decode, produce a minimal score, on one thread.
/// `assigned` is set once the consumer group gave it every partition.
fn pass_through(
    bootstrap: &str,
    input: &str,
    output: &str,
    stop: &AtomicBool,
    assigned: &AtomicBool,
) -> anyhow::Result<()> {
    let consumer: BaseConsumer = partita_runtime::kafka::client_config(bootstrap)
        .set("group.id", "b4-pass-through")
        // Fresh topics per rung: nothing produced before the assignment may be skipped.
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "10")
        .create()?;
    consumer.subscribe(&[input])?;
    let producer: BaseProducer = partita_runtime::kafka::client_config(bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "1")
        .create()?;
    while !stop.load(Ordering::Relaxed) {
        if !assigned.load(Ordering::Relaxed) && consumer.assignment().is_ok_and(|a| a.count() > 0) {
            assigned.store(true, Ordering::SeqCst);
        }
        producer.poll(Duration::ZERO);
        let Some(Ok(m)) = consumer.poll(Duration::from_millis(20)) else { continue };
        let Ok(e) = Event::decode(m.payload().unwrap_or_default()) else { continue };
        let score = Score {
            source_partition: m.partition(),
            source_offset: m.offset(),
            key: e.key.clone(),
            sequence: e.sequence,
            event_time_unix_micros: e.event_time_unix_micros,
            ..Default::default()
        }
        .encode_to_vec();
        let (p, o) = (m.partition().to_string(), m.offset().to_string());
        let headers = OwnedHeaders::new()
            .insert(Header { key: HEADER_SOURCE_PARTITION, value: Some(&p) })
            .insert(Header { key: HEADER_SOURCE_OFFSET, value: Some(&o) });
        let mut rec = BaseRecord::to(output).key(&e.key[..]).payload(&score[..]).headers(headers);
        loop {
            match producer.send(rec) {
                Ok(()) => break,
                Err((_, back)) => {
                    rec = back;
                    producer.poll(Duration::from_millis(1));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(10))?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_logs();
    let args = Arc::new(Args::parse());
    let p = args.partitions;
    let mut measured = std::collections::BTreeMap::new();
    for &mode in &args.modes {
        measured.insert(label(mode), ladder(&args, mode).await?);
    }
    let best_of = |m: &str| measured.get(m).map(|l| best(&l.0));
    let cap_of = |m: &str| measured.get(m).map(|l| l.1.answered_rate);
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let show =
        |v: Option<f64>, digits: usize| v.map_or("not measured".to_owned(), |v| format!("{v:.digits$}"));
    let (pt_best, node_best, split_best) = (best_of("pass-through"), best_of("node"), best_of("split"));
    let (pt_cap, node_cap, split_cap) = (cap_of("pass-through"), cap_of("node"), cap_of("split"));
    println!();
    println!(
        "max sustainable rate (p99 <= {P99_LIMIT_MS} ms): pass-through {}/s, node {}/s, split {}/s; node / pass-through {}, split / node {}",
        show(pt_best, 0),
        show(node_best, 0),
        show(split_best, 0),
        show(ratio(node_best, pt_best), 2),
        show(ratio(split_best, node_best), 2)
    );
    println!(
        "capacity (saturated, latency ignored): pass-through {}/s, node {}/s, split {}/s; node / pass-through {}, split / node {}",
        show(pt_cap, 0),
        show(node_cap, 0),
        show(split_cap, 0),
        show(ratio(node_cap, pt_cap), 2),
        show(ratio(split_cap, node_cap), 2)
    );
    println!("targets: node >= 20000/s on 2 cores; node / pass-through >= 0.7");
    let result = json!({
        "name": "b4",
        "git": git_rev(),
        "partitions": p,
        "seconds_per_rung": args.seconds,
        "runs_per_rung": args.runs,
        "keys": args.keys,
        "zipf": args.zipf,
        "sync_wal": args.sync_wal,
        "write_window_ms": args.write_window.as_secs_f64() * 1e3,
        "cpu_affinity": args.cpu_affinity.to_string(),
        "slo_ms": args.slo.map(|d| d.as_secs_f64() * 1e3),
        "pass_through_max_rate": pt_best,
        "node_max_rate": node_best,
        "split_max_rate": split_best,
        "ratio_vs_pass_through": ratio(node_best, pt_best),
        "ratio_split_vs_node": ratio(split_best, node_best),
        "pass_through_capacity": pt_cap,
        "node_capacity": node_cap,
        "split_capacity": split_cap,
        "capacity_ratio": ratio(node_cap, pt_cap),
        "capacity_ratio_split_vs_node": ratio(split_cap, node_cap),
        "ladders": measured.iter().map(|(m, l)| (m.to_string(), json!({"rungs": l.0, "saturation": l.1}))).collect::<serde_json::Map<_, _>>(),
    });
    println!("RESULT {result}");
    Ok(())
}
