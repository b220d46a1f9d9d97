//! B2, the inference service over gRPC: a partita worker node (`--role worker`) against NVIDIA
//! Triton (`tritonserver` 2.51 from the PyPI `nvidia-pytriton` wheel), the same TorchScript model
//! with the same batch settings on the same device (CPU here), under the same load from Triton's
//! own `perf_analyzer` over gRPC (the Open Inference Protocol both serve). Both servers run
//! during the whole benchmark; they take turns under load, and which goes first alternates run
//! by run.
//!
//! The wheel ships only Triton's python backend, so Triton runs the model in its python backend
//! process with the torch of partita's virtualenv (one intra-op thread, like the partita worker);
//! it batches with its dynamic batcher configured from the model's `config.toml`
//! (`max_batch_size`, `preferred_batch_size`, `max_queue_delay`).
//!
//! Per run and server:
//! 1. a concurrency ladder (`--concurrency`, each level `perf_analyzer --concurrency-range C`, one
//!    row per request): throughput and p99 per level; the **highest throughput with p99 <= 50 ms**;
//! 2. **latency at equal throughput**: both at the same fixed request rate (`--request-rate-range`),
//!    80 % of the lower of the two highest throughputs of the run: p50 and p99.
//!
//! Ratios: partita ÷ Triton for throughput, Triton ÷ partita for p99 at equal rate (above 1:
//! partita is better). Tools: `scripts/b2-tools.sh` (run by `scripts/bench.sh b2`). Ends with
//! `RESULT {json}`. Usage: `scripts/bench.sh b2 [--runs 3] [--concurrency 1,2,4,8,16,32,64]`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use partita_bench::git_rev;
use partita_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use partita_proto::inference::{ModelReadyRequest, ServerMetadataRequest, ServerReadyRequest};
use partita_runtime::inference::repository::ModelRepository;
use serde_json::json;

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Concurrency levels of the ladder.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,32,64,128,256")]
    concurrency: Vec<u32>,
    /// perf_analyzer's measurement window, ms (three windows per level).
    #[arg(long, default_value_t = 2000)]
    window_ms: u64,
    #[arg(long, default_value = "fraud_gru")]
    model: String,
    #[arg(long, default_value = "models")]
    repository: PathBuf,
    /// libtorch intra-op threads of both servers.
    #[arg(long, default_value_t = 1)]
    intra_op_threads: usize,
}

/// The p99 budget a level must meet to count.
const BUDGET_US: f64 = 50_000.0;

fn env(name: &str) -> anyhow::Result<String> {
    std::env::var(name).with_context(|| format!("{name} is not set: run through `scripts/bench.sh b2`"))
}

/// A child process killed when dropped.
struct Server {
    name: &'static str,
    child: Child,
    grpc: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_addr() -> anyhow::Result<String> {
    Ok(format!("127.0.0.1:{}", partita_runtime::local::free_port()?))
}

fn partita_worker(args: &Args, log: &Path) -> anyhow::Result<Server> {
    let exe = std::env::current_exe()?.with_file_name("partita");
    let grpc = free_addr()?;
    let file = std::fs::File::create(log)?;
    let child = Command::new(&exe)
        .args(["node", "--role", "worker", "--grpc-security", "plaintext"])
        .args(["--device", "cpu", "--cpu-workers", "1"])
        .args(["--intra-op-threads", &args.intra_op_threads.to_string()])
        .arg("--repository")
        .arg(&args.repository)
        .args(["--grpc-listen", &grpc, "--http-listen", &free_addr()?])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))?;
    Ok(Server { name: "partita", child, grpc })
}

/// Triton's model repository for `model`: its config from partita's `config.toml`, and a
/// python-backend model that runs the same TorchScript file, batched as Triton hands it over.
fn triton_repository(args: &Args, dir: &Path) -> anyhow::Result<()> {
    let repo = ModelRepository::load(&args.repository)?;
    let m = repo
        .models
        .iter()
        .find(|m| m.spec.name == args.model)
        .context("the model is not in the repository")?;
    let spec = &m.spec;
    let model_dir = dir.join(&spec.name);
    std::fs::create_dir_all(model_dir.join("1"))?;
    let preferred: Vec<String> = spec.batch.preferred_batch_sizes.iter().map(ToString::to_string).collect();
    let mut config = format!(
        "name: \"{}\"\nbackend: \"python\"\nmax_batch_size: {}\ninput [\n  {{ name: \"features\" data_type: TYPE_FP32 dims: [ {} ] }}",
        spec.name, spec.batch.max_batch_size, spec.feature_count
    );
    if spec.is_stateful() {
        config += &format!(",\n  {{ name: \"state\" data_type: TYPE_FP32 dims: [ {} ] }}", spec.state_size);
    }
    // Triton wants a dimension per output: score is [1] per row, reshaped to one value.
    config += "\n]\noutput [\n  { name: \"score\" data_type: TYPE_FP32 dims: [ 1 ] reshape: { shape: [ ] } }";
    if spec.is_stateful() {
        config +=
            &format!(",\n  {{ name: \"new_state\" data_type: TYPE_FP32 dims: [ {} ] }}", spec.state_size);
    }
    config += &format!(
        "\n]\ninstance_group [ {{ kind: KIND_CPU count: 1 }} ]\ndynamic_batching {{ preferred_batch_size: [ {} ] max_queue_delay_microseconds: {} }}\n",
        preferred.join(", "),
        spec.batch.max_queue_delay.as_micros()
    );
    let path = std::fs::canonicalize(&m.path)?;
    config += &format!(
        "parameters {{ key: \"model_path\" value: {{ string_value: \"{}\" }} }}\nparameters {{ key: \"sys_path\" value: {{ string_value: \"{}\" }} }}\nparameters {{ key: \"threads\" value: {{ string_value: \"{}\" }} }}\n",
        path.display(),
        env("PARTITA_B2_TRITON_SITE")?,
        args.intra_op_threads
    );
    std::fs::write(model_dir.join("config.pbtxt"), config)?;
    std::fs::write(model_dir.join("1/model.py"), TRITON_MODEL)?;
    Ok(())
}

/// The python-backend model: one batch of requests, one forward, answers split by request.
const TRITON_MODEL: &str = r#"import json, sys


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"])["parameters"]
        # The backend's stub does not read PYTHONPATH: pytriton's packages, then partita's torch.
        sys.path[:0] = params["sys_path"]["string_value"].split(":")
        global np, torch, pb_utils
        import numpy as np
        import torch
        import triton_python_backend_utils as pb_utils
        torch.set_num_threads(int(params["threads"]["string_value"]))
        self.model = torch.jit.load(params["model_path"]["string_value"]).eval()
        self.stateful = len(json.loads(args["model_config"])["input"]) > 1

    def execute(self, requests):
        names = ["features", "state"] if self.stateful else ["features"]
        inputs = [[pb_utils.get_input_tensor_by_name(r, n).as_numpy() for r in requests] for n in names]
        sizes = [f.shape[0] for f in inputs[0]]
        with torch.inference_mode():
            out = self.model(*[torch.from_numpy(np.concatenate(x)) for x in inputs])
        outs = out if isinstance(out, tuple) else (out,)
        answers, i = [], 0
        for n in sizes:
            tensors = [pb_utils.Tensor("score", outs[0][i:i + n].numpy())]
            if self.stateful:
                tensors.append(pb_utils.Tensor("new_state", outs[1][i:i + n].numpy()))
            answers.append(pb_utils.InferenceResponse(output_tensors=tensors))
            i += n
        return answers
"#;

fn triton(args: &Args, dir: &Path, log: &Path) -> anyhow::Result<Server> {
    triton_repository(args, &dir.join("models"))?;
    let root = PathBuf::from(env("PARTITA_B2_TRITON")?);
    let grpc_port = partita_runtime::local::free_port()?;
    let file = std::fs::File::create(log)?;
    let child = Command::new(root.join("bin/tritonserver"))
        .arg(format!("--model-repository={}", dir.join("models").display()))
        .arg(format!("--backend-directory={}", root.join("backends").display()))
        .arg(format!("--cache-directory={}", root.join("caches").display()))
        .arg(format!("--grpc-port={grpc_port}"))
        .arg(format!("--http-port={}", partita_runtime::local::free_port()?))
        .args(["--allow-metrics=false", "--allow-http=true"])
        // The python backend's stub links the interpreter's libpython.
        .env("LD_LIBRARY_PATH", env("PARTITA_B2_PYTHON_LIB")?)
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .context("starting tritonserver")?;
    Ok(Server { name: "triton", child, grpc: format!("127.0.0.1:{grpc_port}") })
}

/// Until the server says it and the model are ready (OIP `ServerReady`, `ModelReady`); then its
/// name and version (`ServerMetadata`).
async fn wait_ready(server: &mut Server, model: &str, log: &Path) -> anyhow::Result<String> {
    let started = Instant::now();
    loop {
        if let Some(status) = server.child.try_wait()? {
            bail!("{} exited ({status}):\n{}", server.name, std::fs::read_to_string(log).unwrap_or_default());
        }
        if let Ok(mut c) = GrpcInferenceServiceClient::connect(format!("http://{}", server.grpc)).await {
            let ready = c.server_ready(ServerReadyRequest {}).await.is_ok_and(|r| r.into_inner().ready);
            let model = ModelReadyRequest { name: model.to_owned(), version: String::new() };
            if ready && c.model_ready(model).await.is_ok_and(|r| r.into_inner().ready) {
                let meta = c.server_metadata(ServerMetadataRequest {}).await?.into_inner();
                return Ok(format!("{} {}", meta.name, meta.version));
            }
        }
        if started.elapsed() > Duration::from_secs(180) {
            bail!(
                "{} not ready within 180 s:\n{}",
                server.name,
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// One perf_analyzer measurement.
#[derive(Debug, Clone, Copy)]
struct Point {
    throughput: f64,
    p50_us: f64,
    p99_us: f64,
}

/// Run perf_analyzer against `server` with `load` (`--concurrency-range C` or
/// `--request-rate-range R`).
fn perf(args: &Args, server: &Server, load: &[String], dir: &Path) -> anyhow::Result<Point> {
    let csv = dir.join(format!("{}-{}.csv", server.name, load.join("_").replace('-', "")));
    let out = Command::new(env("PARTITA_B2_PERF_ANALYZER")?)
        .args(["-m", &args.model, "-i", "grpc", "-u", &server.grpc, "-b", "1"])
        .args(load)
        .args(["--measurement-interval", &args.window_ms.to_string(), "--percentile=99"])
        // Enough sending threads for a fixed rate to be reached (perf_analyzer's default of 4
        // synchronous senders tops out near 4 / latency requests per second).
        .args(["--max-threads", "64"])
        // Three windows per level (this machine's load varies too much to wait for stability).
        .args(["--stability-percentage", "1000", "--max-trials", "3", "--input-data", "random"])
        .arg("-f")
        .arg(&csv)
        .env("LD_LIBRARY_PATH", env("PARTITA_B2_PA_LIB")?)
        .output()
        .context("running perf_analyzer")?;
    if !out.status.success() {
        bail!(
            "perf_analyzer against {} failed: {}{}",
            server.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = std::fs::read_to_string(&csv)?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().context("an empty CSV")?.split(',').collect();
    let row: Vec<&str> = lines.next().context("a CSV without a row")?.split(',').collect();
    let col = |name: &str| -> anyhow::Result<f64> {
        let k = header
            .iter()
            .position(|h| *h == name)
            .with_context(|| format!("no {name} column in {header:?}"))?;
        Ok(row[k].trim().parse()?)
    };
    Ok(Point {
        throughput: col("Inferences/Second")?,
        p50_us: col("p50 latency")?,
        p99_us: col("p99 latency")?,
    })
}

/// The ladder: each level's point; and the best throughput with p99 within budget.
fn ladder(args: &Args, server: &Server, dir: &Path, run: usize) -> anyhow::Result<f64> {
    let mut best: f64 = 0.0;
    for &c in &args.concurrency {
        let p = perf(args, server, &["--concurrency-range".into(), c.to_string()], dir)?;
        let within = p.p99_us <= BUDGET_US;
        if within {
            best = best.max(p.throughput);
        }
        println!(
            "  {:<8} concurrency {c:>3}: {:>8.0} inferences/s  p50 {:>7.2} ms  p99 {:>7.2} ms{}",
            server.name,
            p.throughput,
            p.p50_us / 1e3,
            p.p99_us / 1e3,
            if within { "" } else { "  (over 50 ms)" }
        );
        println!(
            "RESULT {}",
            json!({"bench": "b2", "kind": "ladder", "server": server.name, "run": run, "concurrency": c,
                   "throughput": p.throughput, "p50_us": p.p50_us, "p99_us": p.p99_us, "rev": git_rev()})
        );
        if p.p99_us > 4.0 * BUDGET_US {
            break; // far past the budget: higher levels only queue more
        }
    }
    Ok(best)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let (plog, tlog) = (dir.path().join("partita.log"), dir.path().join("triton.log"));
    let mut servers = [partita_worker(&args, &plog)?, triton(&args, dir.path(), &tlog)?];
    let mut names = Vec::new();
    for (s, log) in servers.iter_mut().zip([&plog, &tlog]) {
        names.push(wait_ready(s, &args.model, log).await?);
    }
    println!(
        "B2: {} (worker node) vs {} (python backend), model {}, CPU, {} intra-op thread(s), perf_analyzer -b 1 over gRPC",
        names[0], names[1], args.model, args.intra_op_threads
    );
    let mut ratios = Vec::new();
    let mut latency_ratios = Vec::new();
    for run in 0..args.runs {
        println!("run {}", run + 1);
        let order: Vec<usize> = if run % 2 == 0 { vec![0, 1] } else { vec![1, 0] };
        let mut best = [0.0; 2];
        for &i in &order {
            best[i] = ladder(&args, &servers[i], dir.path(), run)?;
        }
        let ratio = best[0] / best[1].max(1e-9);
        println!(
            "  highest throughput with p99 <= 50 ms: partita {:.0}/s, triton {:.0}/s, ratio {ratio:.2}",
            best[0], best[1]
        );
        ratios.push(ratio);
        let rate = (0.8 * best[0].min(best[1])).floor().max(1.0);
        let mut at_rate = [None; 2];
        for &i in &order {
            let p =
                perf(&args, &servers[i], &["--request-rate-range".into(), format!("{rate}")], dir.path())?;
            println!(
                "  {:<8} at {rate:.0}/s: {:>8.0} inferences/s  p50 {:>7.2} ms  p99 {:>7.2} ms",
                servers[i].name,
                p.throughput,
                p.p50_us / 1e3,
                p.p99_us / 1e3
            );
            at_rate[i] = Some(p);
        }
        if let [Some(p), Some(t)] = at_rate {
            let r = t.p99_us / p.p99_us.max(1e-9);
            // Equal throughput only if both reached the rate (within 5 %).
            let reached = p.throughput.min(t.throughput) >= 0.95 * rate;
            println!(
                "  p99 at {rate:.0}/s: triton / partita = {r:.2}{}",
                if reached {
                    ""
                } else {
                    " (NOT at equal throughput: a server fell short of the rate; not counted)"
                }
            );
            if reached {
                latency_ratios.push(r);
            }
            println!(
                "RESULT {}",
                json!({"bench": "b2", "kind": "run", "run": run, "partita_throughput_50ms": best[0],
                       "triton_throughput_50ms": best[1], "ratio_throughput": ratio, "equal_rate": rate,
                       "partita_p99_us": p.p99_us, "triton_p99_us": t.p99_us, "ratio_p99_triton_over_partita": r,
                       "rev": git_rev()})
            );
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    };
    println!(
        "B2 summary over {} runs: throughput ratio (partita / triton) {:?}, median {:.2} (goal >= 2); p99 at equal rate (triton / partita) {:?}, median {:.2}",
        args.runs,
        ratios.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>(),
        median(&mut ratios.clone()),
        latency_ratios.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>(),
        median(&mut latency_ratios.clone()),
    );
    println!(
        "RESULT {}",
        json!({"bench": "b2", "kind": "summary", "runs": args.runs, "ratios_throughput": ratios,
               "ratios_p99": latency_ratios, "rev": git_rev()})
    );
    Ok(())
}
