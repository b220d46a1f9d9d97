//! B1: batched inference through the GPU-worker pool, against limits measured in the same run.
//!
//! 1. **bare**: a `forward` loop on one thread at the batch size the pool formed under load (tensor
//!    in, tensors out, the same conversions the adapter does): the limit.
//! 2. **pool, saturated**: the worker pool with the model's dynamic batching, kept full by many
//!    concurrent callers, each sending waves of `--wave` rows (`Router::infer_rows_within`, what a
//!    partition actor sends): throughput, mean batch size. `ratio_vs_bare` = pool / bare, the
//!    median of the runs' ratios (each run takes `--slices` turns between the two, so a change
//!    in the machine's speed weighs on both alike). The same with one row
//!    per request (`Router::infer`) is printed beside it (`ratio_vs_bare_per_row`).
//! 3. **unbatched, saturated**: the same pool with batching off. `gain_vs_unbatched` = pool / unbatched.
//! 4. **open loop** at several offered rates, for both: latency measured from the *scheduled* send
//!    time (no coordinated omission), p50/p99/p99.9, the share answered within `--slo`, and
//!    whether the rate was sustained. The batched pool runs each rate twice: with the model's
//!    fixed `max_queue_delay`, and **deadline-aware** (each request due `--slo` after its
//!    scheduled send: its batch grows while it can still be computed in time).
//!
//! Each saturated figure is the median of `--runs` runs, with min and max. Ends with one
//! `RESULT {json}` line. Usage: `scripts/bench.sh b1 [--seconds S] [--runs N] [--model NAME]`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use partita_actors::inference::{InferRequest, InferRows, RowAnswer};
use partita_actors::model::ModelSpec;
use partita_actors::pool::Router;
use partita_bench::git_rev;
use partita_runtime::inference::repository::ModelRepository;
use partita_runtime::inference::{DeviceChoice, InferenceOptions};
use serde_json::json;
use tch::{CModule, IValue, Tensor};

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value = "models")]
    repository: std::path::PathBuf,
    #[arg(long, default_value = "fraud_gru")]
    model: String,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Runs per saturated measurement (median reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Batch size of the bare loop; defaults to the mean batch the pool formed when saturated.
    #[arg(long)]
    batch: Option<usize>,
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    device: DeviceChoice,
    /// libtorch intra-op threads, for the bare loop and the pool alike (0 = all cores).
    #[arg(long, default_value_t = 0)]
    intra_op_threads: usize,
    /// Rows per request in the saturated wave measurement (a partition's wave).
    #[arg(long, default_value_t = 32)]
    wave: usize,
    /// Turns per run between the pool and the bare loop (each `seconds / slices` long).
    #[arg(long, default_value_t = 6)]
    slices: usize,
    /// The open loop's budget per request (deadline-aware batching, and the share within it).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "20ms")]
    slo: Duration,
}

/// Random rows, generated once; requests clone them (as a caller building requests would).
struct Rows {
    features: Vec<Vec<f32>>,
    states: Vec<Vec<f32>>,
}

impl Rows {
    fn new(spec: &ModelSpec, n: usize) -> Self {
        let f = Tensor::randn([n as i64, spec.feature_count as i64], (tch::Kind::Float, tch::Device::Cpu));
        let s =
            Tensor::randn([n as i64, spec.state_size.max(1) as i64], (tch::Kind::Float, tch::Device::Cpu));
        let f: Vec<Vec<f32>> = Vec::try_from(&f).unwrap();
        let s: Vec<Vec<f32>> = Vec::try_from(&s).unwrap();
        Self { features: f, states: s }
    }

    /// Row `i`'s features and state (wrapping around).
    fn row(&self, i: usize) -> (&[f32], &[f32]) {
        let i = i % self.features.len();
        (&self.features[i], &self.states[i])
    }

    /// Row `i` as a job of one row, due at `due` if given.
    fn one_row(&self, spec: &ModelSpec, i: usize, due: Option<Instant>) -> Arc<InferRows> {
        let (features, state) = self.row(i);
        let mut rows = InferRows::with_capacity(spec, 1);
        rows.push(spec, features, spec.is_stateful().then_some(state)).expect("rows fit the model");
        rows.due = due;
        Arc::new(rows)
    }

    fn request(&self, model: &Arc<str>, stateful: bool, i: usize) -> InferRequest {
        let i = i % self.features.len();
        InferRequest {
            model: model.clone(),
            features: self.features[i].clone(),
            state: stateful.then(|| self.states[i].clone()),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Stat {
    median: f64,
    min: f64,
    max: f64,
}

fn stat(mut v: Vec<f64>) -> Stat {
    v.sort_by(f64::total_cmp);
    Stat { median: v[v.len() / 2], min: v[0], max: v[v.len() - 1] }
}

fn sjson(s: Stat) -> serde_json::Value {
    json!({"median": s.median, "min": s.min, "max": s.max})
}

/// A bare forward loop on a thread of its own, holding the model on `device` (the pool's): asked
/// to run at batch size `b` for a while, it answers the rows it ran and the seconds it took.
/// Inputs are copied to the device and outputs back, as the pool does.
struct BareLoop {
    tx: std::sync::mpsc::Sender<BareTurn>,
}

/// Batch size, seconds, and where to send (rows, seconds).
type BareTurn = (usize, f64, std::sync::mpsc::Sender<(usize, f64)>);

impl BareLoop {
    fn start(path: &std::path::Path, spec: &ModelSpec, rows: &Arc<Rows>, device: tch::Device) -> Self {
        let module = CModule::load_on_device(path, device).unwrap();
        let (spec, rows) = (spec.clone(), rows.clone());
        let (tx, rx) = std::sync::mpsc::channel::<BareTurn>();
        std::thread::spawn(move || {
            for (b, seconds, reply) in rx {
                let _ = reply.send(bare_loop(&module, &spec, &rows, b, seconds, device));
            }
        });
        Self { tx }
    }

    /// (rows, seconds) of `seconds` of the loop at batch size `b`.
    async fn run(&self, b: usize, seconds: f64) -> (usize, f64) {
        let (reply, answer) = std::sync::mpsc::channel();
        self.tx.send((b, seconds, reply)).unwrap();
        tokio::task::spawn_blocking(move || answer.recv().unwrap()).await.unwrap()
    }
}

fn bare_loop(
    module: &CModule,
    spec: &ModelSpec,
    rows: &Rows,
    b: usize,
    seconds: f64,
    device: tch::Device,
) -> (usize, f64) {
    let cpu = |t: &Tensor| t.to_device(tch::Device::Cpu);
    let _g = tch::no_grad_guard();
    let features: Vec<f32> = rows.features.iter().cycle().take(b).flatten().copied().collect();
    let states: Vec<f32> = rows.states.iter().cycle().take(b).flatten().copied().collect();
    let (bi, f, h) = (b as i64, spec.feature_count as i64, spec.state_size as i64);
    let step = || {
        let x = Tensor::from_slice(&features).view([bi, f]).to_device(device);
        if h == 0 {
            let s = module.forward_ts(&[x]).unwrap();
            Vec::<f32>::try_from(&cpu(&s).view([-1])).unwrap().len()
        } else {
            let st = Tensor::from_slice(&states[..b * h as usize]).view([bi, h]).to_device(device);
            match module.forward_is(&[IValue::Tensor(x), IValue::Tensor(st)]).unwrap() {
                IValue::Tuple(out) => match (&out[0], &out[1]) {
                    (IValue::Tensor(s), IValue::Tensor(n)) => {
                        Vec::<f32>::try_from(&cpu(s).view([-1])).unwrap().len()
                            + Vec::<f32>::try_from(&cpu(n).view([-1])).unwrap().len()
                    }
                    _ => unreachable!(),
                },
                _ => unreachable!(),
            }
        }
    };
    for _ in 0..3 {
        step();
    }
    let start = Instant::now();
    let mut done = 0usize;
    while start.elapsed().as_secs_f64() < seconds {
        std::hint::black_box(step());
        done += b;
    }
    (done, start.elapsed().as_secs_f64())
}

/// Keep `concurrency` requests in flight for `seconds`; returns (rows/s, mean batch size).
async fn saturate(
    router: &Router,
    rows: &Arc<Rows>,
    spec: &ModelSpec,
    concurrency: usize,
    seconds: f64,
) -> Saturated {
    let model: Arc<str> = spec.name.as_str().into();
    let stop = Instant::now() + Duration::from_secs_f64(seconds);
    let tasks: Vec<_> = (0..concurrency)
        .map(|c| {
            let (router, rows, model, stateful) =
                (router.clone(), rows.clone(), model.clone(), spec.is_stateful());
            tokio::spawn(async move {
                let (mut n, mut batch_sum, mut i) = (0usize, 0usize, c);
                while Instant::now() < stop {
                    let out = router.infer(rows.request(&model, stateful, i)).await.unwrap();
                    n += 1;
                    batch_sum += out.batch_size;
                    i += concurrency;
                }
                (n, batch_sum)
            })
        })
        .collect();
    rows_and_mean_batch(tasks).await
}

/// Keep `callers` waves of `wave` rows in flight for `seconds`, each one
/// `Router::infer_rows_within` call built and read as a partition actor does (rows appended to
/// one buffer, each row's answer taken with its own new state).
async fn saturate_waves(
    router: &Router,
    rows: &Arc<Rows>,
    spec: &ModelSpec,
    callers: usize,
    wave: usize,
    seconds: f64,
) -> Saturated {
    let stop = Instant::now() + Duration::from_secs_f64(seconds);
    let tasks: Vec<_> = (0..callers)
        .map(|c| {
            let (router, rows, spec) = (router.clone(), rows.clone(), spec.clone());
            tokio::spawn(async move {
                let (mut n, mut batch_sum, mut i) = (0usize, 0usize, c * wave);
                while Instant::now() < stop {
                    let mut batch = InferRows::with_capacity(&spec, wave);
                    for k in 0..wave {
                        let (features, state) = rows.row(i + k);
                        batch.push(&spec, features, spec.is_stateful().then_some(state)).unwrap();
                    }
                    let out =
                        router.infer_rows_within(&spec.name, Arc::new(batch), Duration::from_secs(60)).await;
                    for k in 0..out.len() {
                        batch_sum += out.get(k).expect("answered in time").unwrap().batch_size;
                        n += 1;
                    }
                    i += callers * wave;
                }
                (n, batch_sum)
            })
        })
        .collect();
    rows_and_mean_batch(tasks).await
}

/// Rows answered in a saturated measurement, the seconds it took and the rows' summed batch sizes.
#[derive(Debug, Default, Clone, Copy)]
struct Saturated {
    rows: usize,
    seconds: f64,
    batch_sum: usize,
}

impl Saturated {
    fn rows_per_s(&self) -> f64 {
        self.rows as f64 / self.seconds
    }

    fn mean_batch(&self) -> f64 {
        self.batch_sum as f64 / self.rows.max(1) as f64
    }

    fn add(&mut self, other: Self) {
        self.rows += other.rows;
        self.seconds += other.seconds;
        self.batch_sum += other.batch_sum;
    }
}

/// The callers' (rows, summed batch sizes), awaited.
async fn rows_and_mean_batch(tasks: Vec<tokio::task::JoinHandle<(usize, usize)>>) -> Saturated {
    let start = Instant::now();
    let mut out = Saturated::default();
    for t in tasks {
        let (rows, batch_sum) = t.await.unwrap();
        out.rows += rows;
        out.batch_sum += batch_sum;
    }
    out.seconds = start.elapsed().as_secs_f64();
    out
}

/// Offer `rate` requests/s for `seconds`, open loop; latencies from the scheduled send time.
/// With `due`, each request is due that long after its scheduled send (deadline-aware batching);
/// `slo` is the budget the share `within_slo` counts against.
///
/// The schedule runs on its own OS thread with sub-100 µs precision (tokio's timer wheel ticks
/// every millisecond, which would add up to 1 ms of artificial lag to every request).
async fn open_loop(
    router: &Router,
    rows: &Arc<Rows>,
    spec: &ModelSpec,
    (rate, seconds): (f64, f64),
    due: Option<Duration>,
    slo: Duration,
) -> serde_json::Value {
    let model: Arc<str> = spec.name.as_str().into();
    let n = (rate * seconds) as usize;
    let period = Duration::from_secs_f64(1.0 / rate);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let handle = tokio::runtime::Handle::current();
    let (router, rows, spec) = (router.clone(), rows.clone(), spec.clone());
    let start = Instant::now();
    let generator = std::thread::spawn(move || {
        for i in 0..n {
            let at = start + period.mul_f64(i as f64);
            loop {
                let now = Instant::now();
                if now >= at {
                    break;
                }
                if at - now > Duration::from_micros(200) {
                    std::thread::sleep(at - now - Duration::from_micros(100));
                } else {
                    std::hint::spin_loop();
                }
            }
            let job = rows.one_row(&spec, i, due.map(|d| at + d));
            let (router, model, tx) = (router.clone(), model.clone(), tx.clone());
            handle.spawn(async move {
                let out = router.infer_rows_within(&model, job, Duration::from_secs(60)).await;
                let ok = matches!(out.answers[..], [RowAnswer::Scored(_)]);
                let _ = tx.send((at.elapsed(), ok));
            });
        }
    });
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    let (mut failed, mut within) = (0, 0);
    for _ in 0..n {
        let Some((lat, ok)) = rx.recv().await else { break };
        failed += usize::from(!ok);
        within += usize::from(ok && lat <= slo);
        h.saturating_record(lat.as_micros() as u64);
    }
    let elapsed = start.elapsed().as_secs_f64();
    generator.join().expect("generator thread");
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1e3;
    json!({
        "offered_per_s": rate,
        "achieved_per_s": n as f64 / elapsed,
        "sustained": elapsed < seconds * 1.1 + 0.05,
        "failed": failed,
        "p50_ms": ms(0.5), "p99_ms": ms(0.99), "p999_ms": ms(0.999),
        "within_slo": within as f64 / n.max(1) as f64,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let repo = ModelRepository::load(&args.repository)?;
    let entry = repo
        .models
        .iter()
        .find(|m| m.spec.name == args.model)
        .ok_or_else(|| anyhow::anyhow!("model {} not in {}", args.model, args.repository.display()))?;
    let spec = entry.spec.clone();
    let rows = Arc::new(Rows::new(&spec, 4096));
    let opts = |no_batching| InferenceOptions {
        repository: args.repository.clone(),
        device: args.device,
        cpu_workers: 1,
        intra_op_threads: args.intra_op_threads,
        max_inflight: 4 * spec.batch.max_batch_size,
        no_batching,
        ..InferenceOptions::default()
    };
    // Starting a pool sets the intra-op threads, so the bare loop below runs with the same setting,
    // and on the same device as the pool's (first) worker.
    let device = partita_runtime::inference::tch::tch_device(opts(false).devices()?[0]);
    let (pool, _) = opts(false).start().await?;
    let concurrency = 2 * spec.batch.max_batch_size;
    let wave = args.wave.max(1);
    let wave_callers = concurrency.div_ceil(wave);
    println!(
        "B1 {} v{} on {:?} ({device:?}): {concurrency} concurrent callers of one row; {wave_callers} of waves of {wave} rows",
        spec.name, spec.version, args.device
    );

    // The pool forms its own batch sizes under load; the bare loop then runs at the same size. A
    // run takes turns, `--slices` times, between the pool (waves) and the bare loop, so a change in
    // the machine's speed (other load, clock) weighs on both alike; its ratio is their rows/s, each
    // summed over its slices. The one-row-per-request figure follows each run.
    let limit = BareLoop::start(&entry.path, &spec, &rows, device);
    let slice = args.seconds / args.slices.max(1) as f64;
    let mut bare = Vec::new();
    let mut batched = Vec::new();
    let mut per_row = Vec::new();
    let mut batch_sizes = Vec::new();
    for _ in 0..args.runs {
        let (mut pool_run, mut bare_run) = (Saturated::default(), Saturated::default());
        for _ in 0..args.slices.max(1) {
            pool_run.add(saturate_waves(&pool.router(), &rows, &spec, wave_callers, wave, slice).await);
            let b = args.batch.unwrap_or(pool_run.mean_batch().round() as usize).max(1);
            let (rows, seconds) = limit.run(b, slice).await;
            bare_run.add(Saturated { rows, seconds, batch_sum: rows * b });
        }
        batched.push(pool_run.rows_per_s());
        batch_sizes.push(pool_run.mean_batch());
        bare.push(bare_run.rows_per_s());
        per_row.push(saturate(&pool.router(), &rows, &spec, concurrency, args.seconds).await.rows_per_s());
    }
    // Each run's pool and bare loop ran interleaved: their ratio is less exposed to the machine's
    // drift than the ratio of two medians.
    let ratios = stat(batched.iter().zip(&bare).map(|(p, b)| p / b).collect());
    let ratios_per_row = stat(per_row.iter().zip(&bare).map(|(p, b)| p / b).collect());
    let (bare, batched, per_row, mean_batch) = (stat(bare), stat(batched), stat(per_row), stat(batch_sizes));
    let b = args.batch.unwrap_or(mean_batch.median.round() as usize);
    println!("{}", json!({"name": "bare_forward", "batch": b, "rows_per_s": sjson(bare)}));
    println!(
        "{}",
        json!({"name": "pool_batched_saturated", "rows_per_s": sjson(batched), "mean_batch": sjson(mean_batch)})
    );
    println!("{}", json!({"name": "pool_batched_saturated_per_row", "rows_per_s": sjson(per_row)}));

    let (unpool, _) = opts(true).start().await?;
    let mut unbatched = Vec::new();
    for _ in 0..args.runs {
        unbatched
            .push(saturate(&unpool.router(), &rows, &spec, concurrency, args.seconds).await.rows_per_s());
    }
    let unbatched = stat(unbatched);
    println!("{}", json!({"name": "pool_unbatched_saturated", "rows_per_s": sjson(unbatched)}));

    // Offered rates: below and near the unbatched limit (where both can keep up, so p99 compares
    // like for like), then beyond it, up to near the batched limit (where deadline-aware batching
    // has the most to win or lose).
    let u = unbatched.median;
    let p = batched.median;
    let mut rates = vec![0.5 * u, 0.9 * u, 2.0 * u, 0.05 * p, 0.1 * p, 0.25 * p, 0.5 * p, 0.75 * p, 0.9 * p];
    rates.retain(|r| *r >= 50.0);
    rates.sort_by(f64::total_cmp);
    rates.dedup_by(|a, b| (*a - *b).abs() < 1.0);
    let mut open = Vec::new();
    let slo = args.slo;
    for &rate in &rates {
        let rb = open_loop(&pool.router(), &rows, &spec, (rate, args.seconds), None, slo).await;
        let rd = open_loop(&pool.router(), &rows, &spec, (rate, args.seconds), Some(slo), slo).await;
        let ru = if rate <= 2.0 * u {
            open_loop(&unpool.router(), &rows, &spec, (rate, args.seconds), None, slo).await
        } else {
            json!(null)
        };
        let line = json!({"name": "open_loop", "offered_per_s": rate, "batched": rb, "deadline": rd, "unbatched": ru});
        println!("{line}");
        open.push(line);
    }
    pool.shutdown().await;
    unpool.shutdown().await;

    let p99_at = |mode: &str, i: usize| open.get(i).and_then(|l| l[mode]["p99_ms"].as_f64());
    // The rate at 0.9 x the unbatched limit: the highest where both should keep up.
    let near = rates.iter().position(|r| (*r - 0.9 * u).abs() < 1.0);
    let (p99_b, p99_u) = near.map_or((None, None), |i| (p99_at("batched", i), p99_at("unbatched", i)));
    let ratio_vs_bare = ratios.median;
    let ratio_per_row = ratios_per_row.median;
    let gain_vs_unbatched = batched.median / unbatched.median;
    let added_us = (1.0 / batched.median - 1.0 / bare.median) * 1e6;
    let added_us_per_row = (1.0 / per_row.median - 1.0 / bare.median) * 1e6;

    println!();
    println!("{:<34} {:>14} {:>14} {:>14}", "measurement (rows/s)", "median", "min", "max");
    let waves = format!("pool, batched, waves of {wave}");
    for (name, s) in [
        ("bare forward loop", bare),
        (waves.as_str(), batched),
        ("pool, batched, one row each", per_row),
        ("pool, batching off", unbatched),
    ] {
        println!("{name:<34} {:>14.0} {:>14.0} {:>14.0}", s.median, s.min, s.max);
    }
    println!("mean batch size (batched, saturated): {:.1}", mean_batch.median);
    println!(
        "{:<10} {:>30} {:>30} {:>30}",
        "offered/s",
        "batched p50/p99 ms, in slo",
        "deadline-aware p50/p99, in slo",
        "unbatched p50/p99, in slo"
    );
    for l in &open {
        let f = |m: &str| {
            if l[m].is_null() {
                "-".to_owned()
            } else {
                let ok = if l[m]["sustained"].as_bool() == Some(true) { "" } else { " (behind)" };
                format!(
                    "{:.2}/{:.2}, {:.1}%{ok}",
                    l[m]["p50_ms"].as_f64().unwrap_or(0.0),
                    l[m]["p99_ms"].as_f64().unwrap_or(0.0),
                    100.0 * l[m]["within_slo"].as_f64().unwrap_or(0.0)
                )
            }
        };
        println!(
            "{:<10.0} {:>30} {:>30} {:>30}",
            l["offered_per_s"].as_f64().unwrap_or(0.0),
            f("batched"),
            f("deadline"),
            f("unbatched")
        );
    }
    println!(
        "ratio vs bare (median of the runs' ratios): {ratio_vs_bare:.3} with waves ({:.3}-{:.3}; target >= 0.9; {added_us:.3} us added per row), {ratio_per_row:.3} one row each ({added_us_per_row:.3} us); gain vs unbatched: {gain_vs_unbatched:.2}x (target >= 5)",
        ratios.min, ratios.max
    );
    println!(
        "RESULT {}",
        json!({
            "bench": "B1",
            "git": git_rev(),
            "model": spec.name,
            "device": format!("{device:?}"),
            "batch": b,
            "bare_rows_per_s": bare.median,
            "batched_rows_per_s": batched.median,
            "unbatched_rows_per_s": unbatched.median,
            "mean_batch": mean_batch.median,
            "per_row_rows_per_s": per_row.median,
            "ratio_vs_bare": ratio_vs_bare,
            "ratio_vs_bare_runs": sjson(ratios),
            "ratio_vs_bare_per_row": ratio_per_row,
            "added_us_per_row_one_row_each": added_us_per_row,
            "gain_vs_unbatched": gain_vs_unbatched,
            "added_us_per_row_saturated": added_us,
            "p99_ms_at_0_9_unbatched_limit": {"batched": p99_b, "unbatched": p99_u},
            "slo_ms": slo.as_secs_f64() * 1e3,
            "open_loop": open,
        })
    );
    Ok(())
}
