//! B8: hot keys. A stateful model applies one key's events one after another, so a key far
//! hotter than the rest tests two things: whether the other keys of its partition wait behind its
//! backlog, and how fast one key alone can go. End to end through a local Apache Kafka (a fresh
//! one-node broker and a fresh `partita node` in process per run, RocksDB state, fraud_gru on
//! CPU), open loop from the load generator.
//!
//! 1. **cold keys with and without a hot key**: `--rate` events/s over `--keys` keys (Zipf
//!    `--zipf`), once with no hot key and once with `--hot-share` of the events on one key; the
//!    other keys' p99 in each (`cold_p99_ratio` = with / without; goal <= 1.2). `--runs` pairs, the
//!    order alternating; the median run of each counts and the spread is printed.
//! 2. **one key alone**: every event on one key at each of `--alone-rates`; the highest rate whose
//!    run has p99 <= 50 ms with every record answered and throughput >= 95 % of the offered rate
//!    (goal >= 5000 events/s on CPU).
//!
//! A model with a sequence form (the shipped fraud_gru) scores a key's backlog in one pass;
//! `--one-by-one` runs everything with that form off (a copy of the repository without its
//! `[sequence]` sections), one inference round per event, for comparison.
//!
//! Ends with `RESULT {json}`. Usage: `scripts/bench.sh b8 [--rate 1000] [--hot-share 0.3]
//! [--seconds 10] [--runs 2] [--alone-rates 100,200,...] [--intra-op-threads N] [--max-batch N]
//! [--one-by-one]`.

use std::sync::atomic::AtomicBool;
use std::time::Duration;

use clap::Parser;
use partita_bench::{NodeUnderTest, fresh_broker, git_rev, init_logs, load_options};
use partita_runtime::loadgen::{LoadReport, run as run_load};
use serde_json::json;

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value = "models")]
    repository: std::path::PathBuf,
    /// Offered events/s of the runs with and without the hot key.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    #[arg(long, default_value_t = 100_000)]
    keys: usize,
    #[arg(long, default_value_t = 0.6)]
    zipf: f64,
    /// Share of the events on the hot key.
    #[arg(long, default_value_t = 0.3)]
    hot_share: f64,
    /// Seconds of load per run.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Pairs of runs (without, with the hot key).
    #[arg(long, default_value_t = 2)]
    runs: usize,
    /// Offered rates of the one-key ladder, increasing.
    #[arg(long, value_delimiter = ',', default_value = "100,200,500,1000,2000,5000")]
    alone_rates: Vec<f64>,
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// The node's libtorch intra-op threads (default: the node's).
    #[arg(long)]
    intra_op_threads: Option<usize>,
    /// The node's `--max-batch` (records per partition batch; also the most held back).
    #[arg(long)]
    max_batch: Option<usize>,
    /// The models' sequence form off: every event is one inference round.
    #[arg(long)]
    one_by_one: bool,
}

/// A copy of the model repository at `from` whose configs have no `[sequence]` section (the
/// TorchScript files are linked, not copied).
fn without_sequence_form(from: &std::path::Path) -> anyhow::Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    for model in std::fs::read_dir(from)? {
        let model = model?.path();
        let config = model.join("config.toml");
        if !config.is_file() {
            continue;
        }
        let to = dir.path().join(model.file_name().unwrap_or_default());
        std::fs::create_dir_all(&to)?;
        let text = std::fs::read_to_string(&config)?;
        let kept = text.split("\n[sequence]").next().unwrap_or_default();
        anyhow::ensure!(
            !kept.contains("[sequence]"),
            "{}: [sequence] must be its last section",
            config.display()
        );
        std::fs::write(to.join("config.toml"), kept)?;
        for version in std::fs::read_dir(&model)? {
            let version = version?.path();
            if version.is_dir() {
                std::os::unix::fs::symlink(
                    std::fs::canonicalize(&version)?,
                    to.join(version.file_name().unwrap_or_default()),
                )?;
            }
        }
    }
    Ok(dir)
}

const P99_LIMIT_MS: f64 = 50.0;

/// One run on a fresh broker and node: `hot_share` of `rate` on the hot key.
async fn run(args: &Args, rate: f64, keys: usize, hot_share: f64) -> anyhow::Result<LoadReport> {
    let broker = fresh_broker(args.partitions).await?;
    let b = broker.bootstrap.clone();
    let node = NodeUnderTest::start(&b, args.partitions, false, |o| {
        o.inference.repository = args.repository.clone();
        if let Some(n) = args.intra_op_threads {
            o.inference.intra_op_threads = n;
        }
        if let Some(n) = args.max_batch {
            o.max_batch = n;
        }
    })
    .await?;
    let mut o = load_options(&b, rate, args.seconds, Duration::from_secs(30));
    (o.keys, o.zipf, o.hot_share) = (keys, args.zipf, hot_share);
    let report = tokio::task::spawn_blocking(move || run_load(&o, &AtomicBool::new(false))).await?;
    node.stop().await?;
    broker.stop().await;
    report
}

fn median_by(mut reports: Vec<LoadReport>, f: fn(&LoadReport) -> f64) -> LoadReport {
    reports.sort_by(|a, b| f(a).total_cmp(&f(b)));
    let n = reports.len();
    reports.swap_remove(n / 2)
}

fn line(label: &str, r: &LoadReport) {
    println!(
        "{label:<18} offered {:>6.0}/s answered {:>6.0}/s missing {:>5}  all p99 {:>8.1} ms  other keys p99 {:>8.1} ms  hot key: {:>6} events p50 {:>8.1} ms p99 {:>8.1} ms",
        r.offered_rate,
        r.answered_rate,
        r.missing,
        r.p99_ms,
        r.cold_p99_ms,
        r.hot_sent,
        r.hot_p50_ms,
        r.hot_p99_ms
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_logs();
    let mut args = Args::parse();
    let _copy = if args.one_by_one {
        let copy = without_sequence_form(&args.repository)?;
        args.repository = copy.path().to_path_buf();
        println!("the models' sequence form is off: one inference round per event");
        Some(copy)
    } else {
        None
    };
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for i in 0..args.runs.max(1) {
        // Alternate which goes first, so drift in the machine does not favour one.
        for hot in if i % 2 == 0 { [false, true] } else { [true, false] } {
            let r = run(&args, args.rate, args.keys, if hot { args.hot_share } else { 0.0 }).await?;
            line(if hot { "with hot key" } else { "without hot key" }, &r);
            println!("{}", json!({"name": "b8/cold", "hot": hot, "report": r, "git": git_rev()}));
            if hot { with.push(r) } else { without.push(r) }
        }
    }
    let spread = |v: &[LoadReport]| {
        let mut p: Vec<f64> = v.iter().map(|r| r.cold_p99_ms).collect();
        p.sort_by(f64::total_cmp);
        (p[0], p[p.len() - 1])
    };
    let (s0, s1) = (spread(&without), spread(&with));
    let without = median_by(without, |r| r.cold_p99_ms);
    let with = median_by(with, |r| r.cold_p99_ms);
    let ratio = if without.cold_p99_ms > 0.0 { with.cold_p99_ms / without.cold_p99_ms } else { 0.0 };

    let mut alone = Vec::new();
    for &rate in &args.alone_rates {
        let r = run(&args, rate, 1, 1.0).await?;
        line("one key alone", &r);
        println!("{}", json!({"name": "b8/alone", "rate": rate, "report": r, "git": git_rev()}));
        alone.push(r);
    }
    let sustained = |r: &LoadReport| {
        r.hot_p99_ms <= P99_LIMIT_MS && r.missing == 0 && r.throughput >= 0.95 * r.offered_rate
    };
    let alone_best = alone.iter().filter(|r| sustained(r)).map(|r| r.offered_rate).fold(0.0, f64::max);

    println!();
    println!(
        "other keys' p99 at {:.0}/s: without a hot key {:.1} ms (runs {:.1}-{:.1}), with {:.0} % on one key {:.1} ms (runs {:.1}-{:.1}); ratio {ratio:.2} (goal <= 1.2)",
        args.rate,
        without.cold_p99_ms,
        s0.0,
        s0.1,
        args.hot_share * 100.0,
        with.cold_p99_ms,
        s1.0,
        s1.1
    );
    println!("the hot key in that run: p50 {:.1} ms, p99 {:.1} ms", with.hot_p50_ms, with.hot_p99_ms);
    println!(
        "one key alone: highest rate with p99 <= {P99_LIMIT_MS} ms {alone_best:.0} events/s (goal >= 5000)"
    );
    let result = json!({
        "name": "b8",
        "git": git_rev(),
        "rate": args.rate,
        "keys": args.keys,
        "zipf": args.zipf,
        "hot_share": args.hot_share,
        "seconds": args.seconds,
        "runs": args.runs,
        "one_by_one": args.one_by_one,
        "cold_p99_without_ms": without.cold_p99_ms,
        "cold_p99_with_ms": with.cold_p99_ms,
        "cold_p99_ratio": ratio,
        "hot_p50_ms": with.hot_p50_ms,
        "hot_p99_ms": with.hot_p99_ms,
        "one_key_max_rate": alone_best,
        "without": without,
        "with": with,
        "alone": alone,
    });
    println!("RESULT {result}");
    Ok(())
}
