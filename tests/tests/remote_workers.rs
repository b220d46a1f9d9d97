//! A scorer node and two worker nodes, each its own `partita node` process: the scorer (zone a,
//! `--role scorer`) owns the partitions and sends its inference over the Open Inference Protocol
//! to the workers (`--role worker`) in zones a and b. Under steady load the same-zone worker is
//! killed (kill -9), restarted, and frozen (SIGSTOP); the scorer's metrics show where each call
//! went, and the checker of `tests/pipeline.rs` runs on everything produced: every input answered
//! by the right output (nothing dead-lettered that a retry could answer), every score equal to a
//! one-by-one replay on the real model, per-key order, stored state and offsets equal to the replay.
//! Every node exports its spans: a worker's inference span is a child of the scorer's batch span.

use std::time::{Duration, Instant};

use partita_runtime::local::kafka::{KafkaOptions, LocalKafka, create_topics};
use partita_runtime::local::scrape::{http_get, label, series};
use partita_runtime::state::Backend;
use partita_tests::otlp::OtlpReceiver;
use partita_tests::pipeline::{self, DLQ, INPUT, NodeProcess, SCORES, TestStore, produce_paced, wait_unique};

const PARTITIONS: i32 = 3;
const KEYS: usize = 200;

fn free_addr() -> String {
    format!("127.0.0.1:{}", partita_runtime::local::free_port().unwrap())
}

/// A worker node in `zone` serving on `grpc`, exporting every span to `otlp`.
fn worker(bootstrap: &str, store: &TestStore, zone: &str, grpc: &str, otlp: &str) -> NodeProcess {
    let http = free_addr();
    let args = [
        "--role",
        "worker",
        "--grpc-security",
        "plaintext",
        "--zone",
        zone,
        "--grpc-listen",
        grpc,
        "--http-listen",
        &http,
        "--otlp-endpoint",
        otlp,
        "--trace-sample-ratio",
        "1",
    ];
    NodeProcess::start_named(bootstrap, store, &format!("worker-{zone}"), &args)
}

/// Calls from the scorer to the worker on `port` that ended with `code`, by its `/metrics`.
fn calls(metrics: &str, port: &str, code: &str) -> f64 {
    series(metrics, "partita_remote_requests_total")
        .filter(|(l, _)| {
            label(l, "endpoint").is_some_and(|e| e.contains(&format!(":{port} ")))
                && label(l, "grpc_code") == Some(code)
        })
        .map(|(_, v)| v)
        .sum()
}

/// The value of series `name` for the worker on `port`.
fn of_endpoint(metrics: &str, name: &str, port: &str) -> Option<f64> {
    series(metrics, name)
        .find(|(l, _)| label(l, "endpoint").is_some_and(|e| e.contains(&format!(":{port} "))))
        .map(|(_, v)| v)
}

fn healthy(metrics: &str, port: &str) -> Option<f64> {
    of_endpoint(metrics, "partita_remote_endpoint_healthy", port)
}

fn scrape(http: &str) -> String {
    http_get(http, "/metrics").map(|(_, body)| body).unwrap_or_default()
}

/// Wait until `done` holds on the scorer's metrics.
fn wait_metrics(http: &str, within: Duration, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + within;
    loop {
        let text = scrape(http);
        if done(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "{what} not within {within:?}; scorer metrics:\n{text}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scorer_prefers_its_zones_worker_and_fails_over_when_it_dies_or_hangs() {
    let kafka = LocalKafka::start(KafkaOptions::default()).await.expect("a local Apache Kafka");
    create_topics(&kafka.bootstrap, &[(INPUT, PARTITIONS), (SCORES, PARTITIONS), (DLQ, 1)], 1).await.unwrap();
    let bootstrap = kafka.bootstrap.clone();
    let dir = tempfile::tempdir().unwrap();
    let store = TestStore::new(Backend::Rocksdb, &dir.path().join("state")).await;
    let (grpc_a, grpc_b) = (free_addr(), free_addr());
    let port_a = grpc_a.rsplit_once(':').unwrap().1.to_owned();
    let port_b = grpc_b.rsplit_once(':').unwrap().1.to_owned();
    let collector = OtlpReceiver::start().await;
    let otlp = collector.endpoint.clone();
    let mut worker_a = Some(worker(&bootstrap, &store, "a", &grpc_a, &otlp));
    let _worker_b = worker(&bootstrap, &store, "b", &grpc_b, &otlp);
    let scorer_http = free_addr();
    let endpoints = format!("a={grpc_a},b={grpc_b}");
    // The scorer keeps its state in the store's own directory, where the checker reads it.
    let scorer = NodeProcess::start(
        &bootstrap,
        &store,
        &[
            "--role",
            "scorer",
            "--zone",
            "a",
            "--http-listen",
            &scorer_http,
            "--worker-endpoints",
            &endpoints,
            "--worker-security",
            "plaintext",
            "--infer-deadline",
            "1s",
            "--breaker-failures",
            "1",
            "--breaker-open-for",
            "3s",
            "--otlp-endpoint",
            &otlp,
            "--trace-sample-ratio",
            "1",
        ],
    );
    let reader = pipeline::reader(&bootstrap);
    tokio::task::block_in_place(|| scorer.wait_assigned(PARTITIONS as usize, Duration::from_secs(120)));
    let (mut records, mut landed) = (Vec::new(), Vec::new());
    let mut produce = |n: usize, seed: u64, during: &mut dyn FnMut()| {
        let load = produce_paced(&bootstrap, n, KEYS, 0.05, seed, 100.0);
        during();
        let (r, l) = load.join().unwrap();
        records.extend(r);
        landed.extend(l);
        records.len() as u64
    };
    let log = || scorer.log_text();

    // Both workers healthy: every call goes to the worker in the scorer's zone.
    tokio::task::block_in_place(|| {
        wait_metrics(&scorer_http, Duration::from_secs(60), "both workers healthy", |m| {
            healthy(m, &port_a) == Some(1.0) && healthy(m, &port_b) == Some(1.0)
        })
    });
    tokio::task::block_in_place(|| {
        let total = produce(300, 1, &mut || {});
        wait_unique(&reader, total, Duration::from_secs(60), log);
    });
    let m = scrape(&scorer_http);
    assert!(calls(&m, &port_a, "OK") > 0.0, "zone a's worker took the calls:\n{m}");
    assert_eq!(calls(&m, &port_b, "OK"), 0.0, "zone b's worker took none while a's was healthy:\n{m}");

    // kill -9 the same-zone worker mid-stream: the calls move to zone b, nothing is lost.
    tokio::task::block_in_place(|| {
        let total = produce(400, 2, &mut || {
            std::thread::sleep(Duration::from_millis(1500));
            worker_a.take().unwrap().kill9();
        });
        wait_unique(&reader, total, Duration::from_secs(90), log);
    });
    let m = scrape(&scorer_http);
    let b_after_kill = calls(&m, &port_b, "OK");
    assert!(b_after_kill > 0.0, "zone b's worker took over:\n{m}");

    // Restarted, it gets the calls back (once its health check passes and its breaker closes).
    worker_a = Some(worker(&bootstrap, &store, "a", &grpc_a, &otlp));
    let a_before = calls(&scrape(&scorer_http), &port_a, "OK");
    tokio::task::block_in_place(|| {
        let total = produce(500, 3, &mut || {});
        wait_unique(&reader, total, Duration::from_secs(90), log);
        wait_metrics(&scorer_http, Duration::from_secs(30), "calls back on zone a", |m| {
            calls(m, &port_a, "OK") > a_before
        });
    });

    // Frozen (SIGSTOP): its calls pass their deadline, its breaker opens, the calls move to b.
    let b_before = calls(&scrape(&scorer_http), &port_b, "OK");
    let total = tokio::task::block_in_place(|| {
        let total = produce(400, 4, &mut || {
            std::thread::sleep(Duration::from_millis(1000));
            worker_a.as_ref().unwrap().signal("STOP");
        });
        wait_unique(&reader, total, Duration::from_secs(90), log);
        total
    });
    let m = scrape(&scorer_http);
    assert!(calls(&m, &port_b, "OK") > b_before, "zone b's worker took over from the frozen one:\n{m}");
    let timed_out = calls(&m, &port_a, "DeadlineExceeded") + calls(&m, &port_a, "Cancelled");
    assert!(timed_out > 0.0, "calls to the frozen worker passed their deadline:\n{m}");
    let of_a = |name: &str| {
        series(&m, name)
            .find(|(l, _)| label(l, "endpoint").is_some_and(|e| e.contains(&format!(":{port_a} "))))
            .map(|(_, v)| v)
    };
    assert_eq!(of_a("partita_remote_endpoint_healthy"), Some(0.0), "the frozen worker is unhealthy:\n{m}");
    assert!(
        of_a("partita_remote_breaker_opened_total").unwrap_or(0.0) >= 2.0,
        "its breaker opened (after the kill, and now):\n{m}"
    );
    worker_a.as_ref().unwrap().signal("CONT");

    let seen =
        tokio::task::block_in_place(|| pipeline::wait_answered(reader, total, Duration::from_secs(60), log));
    let (_, scorer_log) = scorer.terminate(Duration::from_secs(30));
    assert!(!scorer_log.contains("panicked"), "{scorer_log}");

    // One trace runs scorer -> worker: a worker's `partita.infer` span is the child of a scorer's
    // `partita.batch` span (the call's traceparent metadata). Spans are exported every 5 s.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let spans = collector.spans();
        let batches: std::collections::HashSet<(Vec<u8>, Vec<u8>)> = spans
            .iter()
            .filter(|r| r.span.name == "partita.batch")
            .map(|r| (r.span.trace_id.clone(), r.span.span_id.clone()))
            .collect();
        let infers: Vec<_> = spans.iter().filter(|r| r.span.name == "partita.infer").collect();
        let linked = infers
            .iter()
            .filter(|r| batches.contains(&(r.span.trace_id.clone(), r.span.parent_span_id.clone())))
            .count();
        if linked > 0 {
            eprintln!("{linked} of {} worker spans are children of scorer batch spans", infers.len());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no worker span is a child of a scorer batch span: {} batch spans, {} worker spans",
            batches.len(),
            infers.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let dups = pipeline::check(&records, &landed, &seen, &store, PARTITIONS).await;
    eprintln!("{} records checked, {dups} duplicate outputs", records.len());
}
