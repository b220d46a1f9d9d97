//! Pool, router and worker actors with a fake backend (pure Rust, no libtorch).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};

use super::*;
use crate::inference::{
    BackendError, BatchInput, BatchOutput, InferError, InferOutput, InferRequest, InferRows,
    InferenceBackend, RowAnswer, RowsOutput,
};
use crate::model::BatchPolicy;

const F: usize = 3;
const H: usize = 2;

/// Magic first-feature values that make the fake misbehave.
const PANIC: f32 = 1e6;
const FAIL: f32 = 2e6;
const DEVICE_LOST: f32 = -1.0;
/// Never returns (a hung kernel).
const HANG: f32 = 3e6;

#[derive(Default)]
struct Record {
    batch_sizes: Mutex<Vec<usize>>,
    /// (rows, steps) of each batch.
    batch_shapes: Mutex<Vec<(usize, usize)>>,
    rows: AtomicUsize,
    created: AtomicUsize,
    /// Batches that entered `run` (before waiting on the gate).
    entered: AtomicUsize,
}

/// score = sum(features) + sum(state); new_state = state + features[0]; a row of several steps
/// applies them in order.
struct Fake {
    record: Arc<Record>,
    /// When set, every batch waits for one message before running.
    gate: Option<Receiver<()>>,
}

impl InferenceBackend for Fake {
    fn run(&mut self, _model: usize, b: &BatchInput<'_>) -> Result<BatchOutput, BackendError> {
        self.record.entered.fetch_add(1, Ordering::SeqCst);
        if let Some(gate) = &self.gate {
            let _ = gate.recv();
        }
        self.record.batch_sizes.lock().unwrap().push(b.rows);
        self.record.batch_shapes.lock().unwrap().push((b.rows, b.steps));
        self.record.rows.fetch_add(b.rows, Ordering::SeqCst);
        let mut out = BatchOutput::default();
        for r in 0..b.rows {
            let mut s = b.state[r * H..(r + 1) * H].to_vec();
            for t in 0..b.steps {
                let f = &b.features[(r * b.steps + t) * F..(r * b.steps + t + 1) * F];
                match f[0] {
                    PANIC => panic!("poisoned input"),
                    FAIL => return Err(BackendError::Batch("kernel failed".into())),
                    DEVICE_LOST => return Err(BackendError::Fatal("device lost".into())),
                    HANG => loop {
                        std::thread::park();
                    },
                    _ => {}
                }
                out.scores.push(f.iter().sum::<f32>() + s.iter().sum::<f32>());
                s.iter_mut().for_each(|v| *v += f[0]);
            }
            out.new_state.extend(s);
        }
        Ok(out)
    }
}

struct FakeFactory {
    record: Arc<Record>,
    gate: Option<Receiver<()>>,
    /// Fail `create` with this message.
    fail_start: Option<String>,
}

impl BackendFactory for FakeFactory {
    fn create(
        &self,
        _device: Device,
        specs: &[ModelSpec],
    ) -> Result<(Box<dyn InferenceBackend>, Vec<ModelReady>), BackendError> {
        if let Some(msg) = &self.fail_start {
            return Err(BackendError::Load { model: specs[0].name.clone(), detail: msg.clone() });
        }
        self.record.created.fetch_add(1, Ordering::SeqCst);
        let ready = specs
            .iter()
            .map(|s| ModelReady { name: s.name.clone(), version: s.version, warmup: Duration::ZERO })
            .collect();
        Ok((Box::new(Fake { record: self.record.clone(), gate: self.gate.clone() }), ready))
    }
}

fn spec(batch: BatchPolicy) -> ModelSpec {
    ModelSpec {
        name: "m".into(),
        version: 7,
        description: String::new(),
        feature_count: F,
        state_size: H,
        batch,
        warmup_batch_sizes: vec![],
        feature_range: None,
        max_steps: 1,
    }
}

fn batched() -> BatchPolicy {
    BatchPolicy {
        max_batch_size: 8,
        preferred_batch_sizes: vec![],
        max_queue_delay: Duration::from_millis(2),
    }
}

fn config(workers: usize, max_inflight: usize) -> PoolConfig {
    config_with_retries(workers, max_inflight, 3)
}

fn config_with_retries(workers: usize, max_inflight: usize, max_retries: usize) -> PoolConfig {
    PoolConfig {
        devices: vec![Device::Cpu; workers],
        max_inflight,
        max_retries,
        retry_backoff: Duration::from_millis(20),
        restart: RestartPolicy {
            max_restarts: 10,
            within: Duration::from_secs(60),
            backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(10),
        },
        hang_after: None,
        remote: None,
    }
}

struct Harness {
    pool: InferencePool,
    record: Arc<Record>,
}

async fn start(
    workers: usize,
    max_inflight: usize,
    batch: BatchPolicy,
    gate: Option<Receiver<()>>,
) -> Harness {
    start_with(config(workers, max_inflight), batch, gate).await
}

async fn start_with(config: PoolConfig, batch: BatchPolicy, gate: Option<Receiver<()>>) -> Harness {
    let record = Arc::new(Record::default());
    let factory = FakeFactory { record: record.clone(), gate, fail_start: None };
    let pool = InferencePool::start(config, vec![spec(batch)], Arc::new(factory)).await.unwrap();
    Harness { pool, record }
}

/// With a gated pool: a request whose batch holds the worker on the gate; returns once it entered.
async fn hold_worker(h: &Harness) -> tokio::task::JoinHandle<Result<InferOutput, InferError>> {
    let first = tokio::spawn({
        let r = h.pool.router();
        async move { r.infer(req(100.0, None)).await }
    });
    wait_for(|| async { h.record.entered.load(Ordering::SeqCst) }, |&n| n == 1).await;
    first
}

/// A request per row (its first feature `f`), each answered as `(f, answer)`.
type Row = tokio::task::JoinHandle<(f32, Result<InferOutput, InferError>)>;

/// With a gated pool (8 rows per batch) whose worker is held on the gate: queue the 8 rows of `a`,
/// a full batch handed to the device behind the held one, then the 8 of `b`, which wait in the
/// feeder (two batches are on the device already).
async fn queue_two_batches(h: &Harness, a: &[f32], b: &[f32]) -> (Vec<Row>, Vec<Row>) {
    let router = h.pool.router();
    let spawn = |firsts: &[f32]| -> Vec<Row> {
        firsts
            .iter()
            .map(|&f| {
                let r = router.clone();
                tokio::spawn(async move { (f, r.infer(req(f, None)).await) })
            })
            .collect()
    };
    let first = spawn(a);
    wait_for(|| async { router.load().0 }, |&n| n == 9).await;
    let second = spawn(b);
    wait_for(|| async { router.load().0 }, |&n| n == 17).await;
    (first, second)
}

fn req(first: f32, state: Option<Vec<f32>>) -> InferRequest {
    InferRequest { model: "m".into(), features: vec![first, 1.0, 2.0], state }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_row_gets_its_own_result_and_batches_stay_bounded() {
    let h = start(2, 4096, batched(), None).await;
    let router = h.pool.router();
    let tasks: Vec<_> = (0..2000)
        .map(|i| {
            let router = router.clone();
            tokio::spawn(async move { (i, router.infer(req(i as f32, Some(vec![0.5, i as f32]))).await) })
        })
        .collect();
    for t in tasks {
        let (i, out) = t.await.unwrap();
        let out = out.unwrap();
        let x = i as f32;
        assert_eq!(out.score, x + 3.0 + 0.5 + x, "row {i}");
        assert_eq!(out.new_state, vec![0.5 + x, x + x], "row {i}");
        assert_eq!(out.model_version, 7);
        assert!(out.batch_size >= 1 && out.batch_size <= 8);
    }
    let sizes = h.record.batch_sizes.lock().unwrap().clone();
    assert_eq!(sizes.iter().sum::<usize>(), 2000, "each row ran exactly once");
    assert!(sizes.iter().all(|&s| s <= 8), "{sizes:?}");
    assert!(sizes.iter().any(|&s| s > 1), "concurrent load should batch: {sizes:?}");
    assert_eq!(router.load().0, 0);
    h.pool.shutdown().await;
}

#[tokio::test]
async fn missing_state_starts_from_zeros() {
    let h = start(1, 16, batched(), None).await;
    let out = h.pool.router().infer(req(2.0, None)).await.unwrap();
    assert_eq!(out.score, 5.0);
    assert_eq!(out.new_state, vec![2.0, 2.0]);
    h.pool.shutdown().await;
}

#[tokio::test]
async fn bad_requests_never_reach_the_backend() {
    let h = start(1, 16, batched(), None).await;
    let router = h.pool.router();
    let unknown = InferRequest { model: "nope".into(), ..req(1.0, None) };
    assert!(matches!(router.infer(unknown).await, Err(InferError::UnknownModel { .. })));
    let short = InferRequest { features: vec![1.0], ..req(1.0, None) };
    assert!(matches!(router.infer(short).await, Err(InferError::Shape { input: "features", .. })));
    assert!(matches!(router.infer(req(f32::NAN, None)).await, Err(InferError::ValueRange { .. })));
    assert!(matches!(
        router.infer(req(1.0, Some(vec![0.0; 3]))).await,
        Err(InferError::Shape { input: "state", .. })
    ));
    assert_eq!(h.record.rows.load(Ordering::SeqCst), 0);
    h.pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_or_error_fails_only_its_batch_and_the_worker_keeps_serving() {
    let h = start(1, 64, BatchPolicy::unbatched(), None).await;
    let router = h.pool.router();
    assert!(
        matches!(router.infer(req(PANIC, None)).await, Err(InferError::Panicked(m)) if m.contains("poisoned"))
    );
    assert!(
        matches!(router.infer(req(FAIL, None)).await, Err(InferError::Backend(m)) if m.contains("kernel"))
    );
    assert_eq!(router.infer(req(1.0, None)).await.unwrap().score, 4.0);
    let status = h.pool.status().await;
    assert!(status[0].healthy);
    assert_eq!(status[0].restarts, 0);
    assert_eq!(h.record.created.load(Ordering::SeqCst), 1, "no restart was needed");
    h.pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_rows_that_fail_alone_get_the_error_their_batch_mates_are_scored() {
    let (open, gate) = crossbeam_channel::unbounded::<()>();
    let h = start(1, 64, batched(), Some(gate)).await;
    let router = h.pool.router();
    // The first batch holds the worker on the gate; the next 8 queue and run as one batch.
    let first = hold_worker(&h).await;
    let firsts = [1.0, 2.0, PANIC, 3.0, 4.0, 5.0, FAIL, 6.0];
    let tasks: Vec<_> = firsts
        .iter()
        .map(|&f| {
            let r = router.clone();
            tokio::spawn(async move { r.infer(req(f, None)).await })
        })
        .collect();
    wait_for(|| async { router.load().0 }, |&n| n == 9).await;
    release_forever(open);
    first.await.unwrap().unwrap();
    for (f, t) in firsts.iter().zip(tasks) {
        let answer = t.await.unwrap();
        match *f {
            PANIC => assert!(matches!(answer, Err(InferError::Panicked(_))), "{answer:?}"),
            FAIL => assert!(matches!(answer, Err(InferError::Backend(_))), "{answer:?}"),
            x => assert_eq!(answer.unwrap().score, x + 3.0, "batch-mate {x} is scored"),
        }
    }
    let sizes = h.record.batch_sizes.lock().unwrap().clone();
    assert_eq!(sizes[..2], [1, 8], "the 8 ran as one batch first: {sizes:?}");
    // Halves 4+4, then 2+2 of each failing half, then 1+1 of the failing quarters.
    assert!(sizes.len() <= 2 + 2 + 4 + 4, "found by halves, not row by row: {sizes:?}");
    assert_eq!(router.load().0, 0);
    let status = h.pool.status().await;
    assert!(status[0].healthy);
    h.pool.shutdown().await;
}

/// A deadline counts from the start of the request's batch: the request whose `forward` runs past
/// it times out, the one queued behind it all that time does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_counts_from_the_batch_start_and_the_wait_in_the_queue_is_not_timed() {
    let (open, gate) = crossbeam_channel::unbounded::<()>();
    let h = start(1, 16, BatchPolicy::unbatched(), Some(gate)).await;
    let router = h.pool.router();
    let deadline = Duration::from_millis(100);
    let running = tokio::spawn({
        let r = router.clone();
        async move { r.infer_within(req(1.0, None), deadline).await }
    });
    wait_for(|| async { h.record.entered.load(Ordering::SeqCst) }, |&n| n == 1).await;
    let queued = tokio::spawn({
        let r = router.clone();
        async move { r.infer_within(req(2.0, None), deadline).await }
    });
    // Three deadlines long: the running one's passes, the queued one's has not started.
    tokio::time::sleep(3 * deadline).await;
    assert!(running.is_finished(), "the running request's deadline passed and nothing said so");
    assert_eq!(running.await.unwrap(), None);
    assert!(!queued.is_finished(), "the queued request timed out while it waited: {:?}", queued.await);
    release_forever(open);
    assert_eq!(queued.await.unwrap().expect("answered within its deadline").unwrap().score, 5.0);
    h.pool.shutdown().await;
}

/// While the device runs a batch, the next full one waits on the device, not in the feeder: it runs
/// as soon as the device is free, before the halves of a batch that failed ahead of it, and is
/// answered while those run; every row of both gets its own answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_batch_waits_on_the_device_and_runs_before_the_halves_of_a_failed_one() {
    let (open, gate) = crossbeam_channel::unbounded::<()>();
    let h = start(1, 64, batched(), Some(gate)).await;
    let router = h.pool.router();
    let first = hold_worker(&h).await;
    // A full batch with a failing row, then a clean one.
    let (failing, clean) = queue_two_batches(
        &h,
        &[1.0, 2.0, 3.0, FAIL, 4.0, 5.0, 6.0, 7.0],
        &[11.0, 12.0, 13.0, 14.0, 15.0, 16.0, 17.0, 18.0],
    )
    .await;
    // Three batches through the gate: the held one, the failing one, the clean one. The failed
    // batch's first half then waits at the gate, and the clean batch is answered meanwhile.
    // The held one first: once the failing batch is at the gate, the feeder hands the clean one
    // to the device; give it that moment, or the failing batch could fail and queue its halves
    // first (a clean batch still in the feeder rightly runs after them).
    open.send(()).unwrap();
    wait_for(|| async { h.record.entered.load(Ordering::SeqCst) }, |&n| n == 2).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..2 {
        open.send(()).unwrap();
    }
    wait_for(|| async { clean.iter().all(|t| t.is_finished()) }, |&done| done).await;
    assert!(failing.iter().all(|t| !t.is_finished()), "the failed batch's halves have not run yet");
    release_forever(open);
    first.await.unwrap().unwrap();
    for t in failing.into_iter().chain(clean) {
        match t.await.unwrap() {
            (FAIL, answer) => assert!(matches!(answer, Err(InferError::Backend(_))), "{answer:?}"),
            (x, answer) => assert_eq!(answer.unwrap().score, x + 3.0, "row {x} is scored"),
        }
    }
    let sizes = h.record.batch_sizes.lock().unwrap().clone();
    assert_eq!(sizes[..3], [1, 8, 8], "the clean batch ran right after the failed one: {sizes:?}");
    assert_eq!(
        sizes.iter().skip(3).filter(|&&s| s == 1).count(),
        2,
        "halves down to the failing row: {sizes:?}"
    );
    assert_eq!(router.load().0, 0);
    h.pool.shutdown().await;
}

/// Two models on one worker: a stream of full batches of one does not hold back the other's
/// overdue batch (batches are formed oldest request first, and no full batch is handed to a busy
/// device past another model's overdue one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_of_full_batches_of_one_model_does_not_starve_another() {
    let (open, gate) = crossbeam_channel::unbounded::<()>();
    let record = Arc::new(Record::default());
    let factory = FakeFactory { record: record.clone(), gate: Some(gate), fail_start: None };
    let other = ModelSpec { name: "n".into(), ..spec(batched()) };
    let pool =
        InferencePool::start(config(1, 64), vec![spec(batched()), other], Arc::new(factory)).await.unwrap();
    let h = Harness { pool, record };
    let router = h.pool.router();
    let first = hold_worker(&h).await;
    let spawn = |model: &'static str, firsts: &[f32]| -> Vec<_> {
        firsts
            .iter()
            .map(|&f| {
                let r = router.clone();
                tokio::spawn(
                    async move { r.infer(InferRequest { model: model.into(), ..req(f, None) }).await },
                )
            })
            .collect()
    };
    // Model m: a full batch (handed to the device), then model n's lone request, then another
    // full batch of m, all while the device is held.
    let mut tasks = spawn("m", &[1.0; 8]);
    wait_for(|| async { router.load().0 }, |&n| n == 9).await;
    tasks.extend(spawn("n", &[2.0]));
    wait_for(|| async { router.load().0 }, |&n| n == 10).await;
    tasks.extend(spawn("m", &[3.0; 8]));
    wait_for(|| async { router.load().0 }, |&n| n == 18).await;
    release_forever(open);
    first.await.unwrap().unwrap();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let sizes = h.record.batch_sizes.lock().unwrap().clone();
    assert_eq!(sizes, [1, 8, 1, 8], "model n's request ran before the second full batch of m");
    h.pool.shutdown().await;
}

/// The device dies in the batch that waited on it while a failed batch's half queued behind:
/// only the killing batch's rows count the death against their retries; the half's rows never
/// ran and are handed back (with no retries left, they are still scored on the restarted worker).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_that_never_ran_when_the_device_died_keep_their_retries() {
    let (open, gate) = crossbeam_channel::unbounded::<()>();
    let h = start_with(config_with_retries(1, 64, 0), batched(), Some(gate)).await;
    let first = hold_worker(&h).await;
    // A batch that fails (FAIL), then one that kills the device.
    let (failing, killing) = queue_two_batches(
        &h,
        &[1.0, 2.0, 3.0, FAIL, 4.0, 5.0, 6.0, 7.0],
        &[DEVICE_LOST, 12.0, 13.0, 14.0, 15.0, 16.0, 17.0, 18.0],
    )
    .await;
    release_forever(open);
    first.await.unwrap().unwrap();
    for t in failing {
        match t.await.unwrap() {
            (FAIL, answer) => assert!(matches!(answer, Err(InferError::Backend(_))), "{answer:?}"),
            (x, answer) => {
                assert_eq!(answer.unwrap().score, x + 3.0, "row {x} never ran when the device died")
            }
        }
    }
    for t in killing {
        let (x, answer) = t.await.unwrap();
        assert_eq!(answer, Err(InferError::WorkerLost { attempts: 1 }), "row {x} ran in the killing batch");
    }
    h.pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_worker_is_abandoned_and_replaced_and_the_requests_behind_it_go_on() {
    let config = PoolConfig { hang_after: Some(Duration::from_millis(200)), ..config_with_retries(1, 64, 1) };
    let h = start_with(config, BatchPolicy::unbatched(), None).await;
    let router = h.pool.router();
    let hung = tokio::spawn({
        let r = router.clone();
        async move { r.infer(req(HANG, None)).await }
    });
    wait_for(|| async { h.record.entered.load(Ordering::SeqCst) }, |&n| n == 1).await;
    // Queued behind the hung forward on the only worker: answered by its replacement. (The
    // timeout only keeps a regression from hanging the test run.)
    let behind = tokio::time::timeout(Duration::from_secs(20), router.infer(req(1.0, None))).await;
    assert_eq!(behind.expect("never answered: the hung worker was not replaced").unwrap().score, 4.0);
    // The hanging request itself hangs its retry too, and then gives up.
    let hung =
        tokio::time::timeout(Duration::from_secs(20), hung).await.expect("the hung request never ended");
    assert!(matches!(hung.unwrap(), Err(InferError::WorkerLost { .. })));
    // Replaced twice (the first hang, then the retry's), and serving again.
    wait_for(|| async { h.pool.status().await[0].clone() }, |s| s.healthy && s.restarts == 2).await;
    assert_eq!(router.infer(req(2.0, None)).await.unwrap().score, 5.0);
    h.pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_worker_is_restarted_and_its_requests_are_retried() {
    let (open, gate) = crossbeam_channel::unbounded::<()>();
    let h = start(1, 64, batched(), Some(gate)).await;
    let router = h.pool.router();
    // Queue a poison batch and normal requests behind it on the only worker.
    let poison = tokio::spawn({
        let r = router.clone();
        async move { r.infer(req(DEVICE_LOST, None)).await }
    });
    let others: Vec<_> = (0..5)
        .map(|i| {
            let r = router.clone();
            tokio::spawn(async move { r.infer(req(i as f32, None)).await })
        })
        .collect();
    release_forever(open);
    // The whole batch is handed back and retried, each request alone: its batch-mates succeed on
    // the restarted worker, the poison kills it again until retries run out, and its caller gets
    // an explicit error, never silence.
    let lost = poison.await.unwrap();
    assert!(matches!(lost, Err(InferError::WorkerLost { attempts: 4 })), "{lost:?}");
    for (i, t) in others.into_iter().enumerate() {
        assert_eq!(t.await.unwrap().unwrap().score, i as f32 + 3.0);
    }
    let status = wait_for(|| async { h.pool.status().await }, |s| s[0].healthy && s[0].restarts >= 1).await;
    assert!(status[0].restarts <= 4, "one restart per run of the poison: {}", status[0].restarts);
    assert!(h.record.created.load(Ordering::SeqCst) >= 2);
    assert_eq!(router.infer(req(1.0, None)).await.unwrap().score, 4.0);
    h.pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pool_pushes_back() {
    let (open, gate) = crossbeam_channel::unbounded::<()>();
    let h = start(1, 2, BatchPolicy::unbatched(), Some(gate)).await;
    let router = h.pool.router();
    let held: Vec<_> = (0..2)
        .map(|i| {
            let r = router.clone();
            tokio::spawn(async move { r.infer(req(i as f32, None)).await })
        })
        .collect();
    wait_for(|| async { router.load().0 }, |&n| n == 2).await;
    assert_eq!(router.try_infer(req(5.0, None)).await, Err(InferError::Overloaded { capacity: 2 }));
    let waiting = tokio::spawn({
        let r = router.clone();
        async move { r.infer(req(5.0, None)).await }
    });
    release_forever(open);
    for t in held {
        t.await.unwrap().unwrap();
    }
    assert_eq!(waiting.await.unwrap().unwrap().score, 8.0, "infer() waited for room instead of failing");
    h.pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_requests_are_skipped_and_release_their_slot() {
    let (open, gate) = crossbeam_channel::unbounded::<()>();
    let h = start(1, 64, batched(), Some(gate)).await;
    let router = h.pool.router();
    // The first batch blocks the worker on the gate; the rest queue behind it: the first 8 as a
    // full batch handed to the device (formed: it runs whoever cancels), 12 in the feeder.
    let first = hold_worker(&h).await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let r = router.clone();
        tasks.push((i, tokio::spawn(async move { r.infer(req(i as f32, None)).await })));
    }
    wait_for(|| async { router.load().0 }, |&n| n == 21).await;
    let (cancelled, kept): (Vec<_>, Vec<_>) = tasks.into_iter().partition(|(i, _)| i % 2 == 0);
    for (_, t) in &cancelled {
        t.abort();
    }
    for (_, t) in cancelled {
        assert!(t.await.unwrap_err().is_cancelled());
    }
    release_forever(open);
    first.await.unwrap().unwrap();
    for (i, t) in kept {
        assert_eq!(t.await.unwrap().unwrap().score, i as f32 + 3.0);
    }
    wait_for(|| async { router.load().0 }, |&n| n == 0).await;
    let slot = h.pool.status().await[0].inflight;
    assert_eq!(slot, 0, "cancelled requests released their worker slot");
    let sizes = h.record.batch_sizes.lock().unwrap().clone();
    assert_eq!(sizes, [1, 8, 6], "the 6 requests cancelled in the queue never reached the model");
    h.pool.shutdown().await;
}

#[tokio::test]
async fn a_model_that_does_not_load_fails_the_start_with_its_reason() {
    let factory =
        FakeFactory { record: Arc::default(), gate: None, fail_start: Some("file is corrupt".into()) };
    let err = InferencePool::start(config(1, 4), vec![spec(batched())], Arc::new(factory)).await.unwrap_err();
    assert!(err.to_string().contains("file is corrupt"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_admitted_requests_then_refuses_new_ones() {
    let slow = BatchPolicy {
        max_batch_size: 64,
        preferred_batch_sizes: vec![],
        max_queue_delay: Duration::from_millis(200),
    };
    let h = start(1, 64, slow, None).await;
    let router = h.pool.router();
    let tasks: Vec<_> = (0..10)
        .map(|i| {
            let r = router.clone();
            tokio::spawn(async move { r.infer(req(i as f32, None)).await })
        })
        .collect();
    wait_for(|| async { h.pool.status().await[0].inflight }, |&n| n == 10).await;
    h.pool.shutdown().await;
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(t.await.unwrap().unwrap().score, i as f32 + 3.0, "queued request {i} was finished");
    }
    assert_eq!(router.infer(req(1.0, None)).await, Err(InferError::ShuttingDown));
}

#[tokio::test(start_paused = true)]
async fn restarts_respect_the_budget() {
    // Paused time: restart backoffs elapse at once; each poison request kills the worker once.
    let mut config = config_with_retries(1, 8, 0);
    config.restart.max_restarts = 3;
    let h = start_with(config, BatchPolicy::unbatched(), None).await;
    let router = h.pool.router();
    for restarts in 1..=3 {
        assert_eq!(router.infer(req(DEVICE_LOST, None)).await, Err(InferError::WorkerLost { attempts: 1 }));
        wait_for(|| async { h.pool.status().await }, |s| s[0].healthy && s[0].restarts == restarts).await;
    }
    assert_eq!(router.infer(req(DEVICE_LOST, None)).await, Err(InferError::WorkerLost { attempts: 1 }));
    // For 300 ms of real time (many restart backoffs of paused time), it never comes back.
    let watch = std::time::Instant::now();
    while watch.elapsed() < Duration::from_millis(300) {
        assert!(!h.pool.status().await[0].healthy, "past its budget the worker stays down");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status = h.pool.status().await;
    assert_eq!(status[0].restarts, 3, "budget is 3 restarts per minute");
    assert!(!status[0].healthy, "past its budget the worker stays down");
    assert_eq!(router.infer(req(1.0, None)).await, Err(InferError::WorkerLost { attempts: 1 }));
    h.pool.shutdown().await;
}

/// Let every gated batch run from now on.
fn release_forever(open: Sender<()>) {
    drop(open);
}

/// Poll `probe` until `done` holds, for at most 10 s of real time.
async fn wait_for<T: std::fmt::Debug, Fut>(probe: impl Fn() -> Fut, done: impl Fn(&T) -> bool) -> T
where
    Fut: std::future::Future<Output = T>,
{
    let start = std::time::Instant::now();
    loop {
        let v = probe().await;
        if done(&v) {
            return v;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "condition not reached within 10 s: {v:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `firsts` as the rows of one wave (features `[x, 1, 2]`, no state).
fn wave(firsts: &[f32]) -> Arc<InferRows> {
    let spec = spec(batched());
    let mut rows = InferRows::with_capacity(&spec, firsts.len());
    for &x in firsts {
        rows.push(&spec, &[x, 1.0, 2.0], None).unwrap();
    }
    Arc::new(rows)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wave_is_answered_row_by_row_in_order_and_invalid_rows_fail_alone() {
    let h = start(1, 64, batched(), None).await;
    let router = h.pool.router();
    let spec = spec(batched());
    let mut rows = InferRows::with_capacity(&spec, 21);
    for i in 0..21 {
        let x = if i == 5 { f32::NAN } else { i as f32 };
        rows.push(&spec, &[x, 1.0, 2.0], (i % 2 == 0).then_some(&[0.5, i as f32][..])).unwrap();
    }
    let wrong = InferError::Shape { model: "m".into(), input: "features", expected: 3, got: 1 };
    assert_eq!(rows.push(&spec, &[1.0], None), Err(wrong), "a row of the wrong shape is refused");
    assert_eq!(rows.rows, 21, "and not appended");
    let rows = Arc::new(rows);
    let out = router.infer_rows_within("m", rows.clone(), Duration::from_secs(10)).await;
    assert_eq!(out.len(), 21);
    for k in 0..21 {
        let (x, s) = (k as f32, if k % 2 == 0 { vec![0.5, k as f32] } else { vec![0.0; H] });
        match out.get(k).expect("answered in time") {
            Err(e) => {
                assert_eq!(k, 5, "only the NaN row fails: {e}");
                assert!(matches!(e, InferError::ValueRange { input: "features", index: 0, .. }), "{e:?}");
            }
            Ok(o) => {
                assert_eq!(o.score, x + 3.0 + s.iter().sum::<f32>(), "row {k}");
                assert_eq!(o.new_state, s.iter().map(|v| v + x).collect::<Vec<_>>(), "row {k}");
                assert_eq!(o.model_version, 7);
                assert!(o.batch_size <= 8, "{o:?}");
            }
        }
    }
    let sizes = h.record.batch_sizes.lock().unwrap().clone();
    assert_eq!(sizes.iter().sum::<usize>(), 20, "each valid row ran once: {sizes:?}");
    assert!(sizes.iter().all(|&s| s <= 8), "{sizes:?}");

    // A wave of an unknown model, or whose values do not add up to its rows, is refused whole.
    let out = router.infer_rows_within("nope", rows.clone(), Duration::from_secs(10)).await;
    assert!(out.answers.iter().all(|a| matches!(a, RowAnswer::Failed(InferError::UnknownModel { .. }))));
    let short = InferRows { state: vec![0.0; 3], ..(*rows).clone() };
    let out = router.infer_rows_within("m", Arc::new(short), Duration::from_secs(10)).await;
    assert_eq!(out.len(), 21);
    assert!(
        out.answers.iter().all(|a| matches!(a, RowAnswer::Failed(InferError::Shape { input: "state", .. })))
    );
    assert_eq!(h.record.batch_sizes.lock().unwrap().len(), sizes.len(), "nothing more reached the backend");
    assert_eq!(router.load().0, 0);
    h.pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_that_fails_in_a_wave_fails_alone_and_its_wave_mates_are_scored() {
    let h = start(1, 64, batched(), None).await;
    let router = h.pool.router();
    let firsts = [1.0, 2.0, PANIC, 3.0, 4.0, 5.0, FAIL, 6.0];
    let out = router.infer_rows_within("m", wave(&firsts), Duration::from_secs(10)).await;
    for (k, f) in firsts.iter().enumerate() {
        let answer = out.get(k).expect("answered in time");
        match *f {
            PANIC => assert!(matches!(answer, Err(InferError::Panicked(_))), "{answer:?}"),
            FAIL => assert!(matches!(answer, Err(InferError::Backend(_))), "{answer:?}"),
            x => assert_eq!(answer.unwrap().score, x + 3.0, "wave-mate {x} is scored"),
        }
    }
    let sizes = h.record.batch_sizes.lock().unwrap().clone();
    assert_eq!(sizes[0], 8, "the wave ran as one batch first: {sizes:?}");
    assert!(sizes.len() <= 1 + 2 + 4 + 4, "found by halves, not row by row: {sizes:?}");
    assert_eq!(router.load().0, 0);
    h.pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wave_whose_row_kills_the_worker_goes_on_row_by_row_and_only_that_row_is_lost() {
    let h = start(1, 64, batched(), None).await;
    let router = h.pool.router();
    let firsts = [1.0, 2.0, DEVICE_LOST, 3.0, 4.0];
    let out = router.infer_rows_within("m", wave(&firsts), Duration::from_secs(10)).await;
    for (k, f) in firsts.iter().enumerate() {
        let answer = out.get(k).expect("answered in time");
        if *f == DEVICE_LOST {
            assert!(matches!(answer, Err(InferError::WorkerLost { attempts: 4 })), "{answer:?}");
        } else {
            assert_eq!(answer.unwrap().score, f + 3.0, "wave-mate {f} is scored on the restarted worker");
        }
    }
    let status = wait_for(|| async { h.pool.status().await }, |s| s[0].healthy && s[0].restarts >= 1).await;
    // The wave's run and the row's own retries share its attempts: 1 + max_retries deaths.
    assert!(status[0].restarts <= 4, "one restart per run of the poison row: {}", status[0].restarts);
    assert_eq!(router.load().0, 0);
    h.pool.shutdown().await;
}

/// Remote workers for the router's tests: each call answers by the rows' first features, as
/// the fake backend scores: `DEVICE_LOST` in a call breaks it (`Lost`: the remote worker died),
/// `FAIL` fails the lone row it is in. Records each call's row count.
#[derive(Debug, Default)]
struct FakeRemote {
    calls: Mutex<Vec<usize>>,
    down: std::sync::atomic::AtomicBool,
}

impl remote::RemoteWorkers for FakeRemote {
    fn available(&self) -> bool {
        !self.down.load(Ordering::SeqCst)
    }

    fn infer(
        &self,
        spec: &ModelSpec,
        rows: Arc<InferRows>,
        _deadline: Option<Duration>,
    ) -> futures::future::BoxFuture<'static, remote::RemoteAnswer> {
        use remote::RemoteAnswer;
        self.calls.lock().unwrap().push(rows.rows);
        let firsts: Vec<f32> = (0..rows.rows).map(|k| rows.row(spec, k).0[0]).collect();
        let answer = if firsts.contains(&DEVICE_LOST) {
            RemoteAnswer::Lost
        } else if firsts.contains(&FAIL) {
            if rows.rows > 1 {
                RemoteAnswer::RowFailed
            } else {
                RemoteAnswer::Failed(InferError::Backend("kernel failed".into()))
            }
        } else {
            let (scores, new_state) = (0..rows.rows)
                .map(|k| {
                    let (f, s) = rows.row(spec, k);
                    (
                        f.iter().sum::<f32>() + s.iter().sum::<f32>(),
                        s.iter().map(|v| v + f[0]).collect::<Vec<_>>(),
                    )
                })
                .unzip::<_, _, Vec<f32>, Vec<Vec<f32>>>();
            RemoteAnswer::Scored {
                scores,
                new_state: new_state.concat(),
                served: crate::inference::Served {
                    model_version: 7,
                    batch_size: rows.rows,
                    device: Device::Cuda(0),
                    queue_time: Duration::ZERO,
                    compute_time: Duration::ZERO,
                },
            }
        };
        Box::pin(async move { answer })
    }
}

/// A pool with no workers of its own and `remote`.
async fn remote_only(remote: Arc<FakeRemote>) -> InferencePool {
    let config = PoolConfig { devices: vec![], remote: Some(remote), ..config_with_retries(0, 64, 2) };
    let factory = FakeFactory { record: Arc::default(), gate: None, fail_start: None };
    InferencePool::start(config, vec![spec(batched())], Arc::new(factory)).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_workers_of_its_own_the_router_sends_waves_to_the_remote_workers() {
    let remote = Arc::new(FakeRemote::default());
    let pool = remote_only(remote.clone()).await;
    let router = pool.router();
    assert!(router.can_serve());
    let out = router.infer_rows_within("m", wave(&[1.0, 2.0, 3.0]), Duration::from_secs(10)).await;
    for (k, x) in [1.0, 2.0, 3.0].into_iter().enumerate() {
        let o = out.get(k).unwrap().unwrap();
        assert_eq!((o.score, o.device, o.batch_size), (x + 3.0, Device::Cuda(0), 3), "row {k}");
    }
    assert_eq!(*remote.calls.lock().unwrap(), [3], "one call for the wave");

    // A call that broke goes on row by row (one of them may have killed the worker), and so does
    // one whose model failed on a row: only that row fails.
    remote.calls.lock().unwrap().clear();
    let out = router.infer_rows_within("m", wave(&[1.0, DEVICE_LOST, 2.0]), Duration::from_secs(10)).await;
    assert_eq!(out.get(0).unwrap().unwrap().score, 4.0);
    assert!(matches!(out.get(1), Some(Err(InferError::WorkerLost { attempts: 3 }))), "{:?}", out.get(1));
    assert_eq!(out.get(2).unwrap().unwrap().score, 5.0);
    let calls = remote.calls.lock().unwrap().clone();
    assert_eq!(calls[0], 3, "{calls:?}");
    assert!(calls[1..].iter().all(|&n| n == 1), "then each row alone: {calls:?}");
    let out = router.infer_rows_within("m", wave(&[1.0, FAIL, 2.0]), Duration::from_secs(10)).await;
    assert_eq!(out.get(0).unwrap().unwrap().score, 4.0);
    assert!(matches!(out.get(1), Some(Err(InferError::Backend(_)))), "{:?}", out.get(1));
    assert_eq!(out.get(2).unwrap().unwrap().score, 5.0);

    // No remote worker available and none here: the request waits, then fails WorkerLost.
    remote.down.store(true, Ordering::SeqCst);
    assert!(!router.can_serve());
    remote.calls.lock().unwrap().clear();
    let out = router.infer_rows_within("m", wave(&[1.0]), Duration::from_secs(10)).await;
    assert!(matches!(out.get(0), Some(Err(InferError::WorkerLost { .. }))), "{:?}", out.get(0));
    assert!(remote.calls.lock().unwrap().is_empty());
    assert_eq!(router.load().0, 0);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_of_several_steps_are_batched_only_with_rows_of_as_many_and_answered_per_step() {
    let (open, gate) = crossbeam_channel::unbounded();
    let record = Arc::new(Record::default());
    let factory = FakeFactory { record: record.clone(), gate: Some(gate), fail_start: None };
    let seq = ModelSpec { max_steps: 4, ..spec(batched()) };
    let pool = InferencePool::start(config(1, 64), vec![seq.clone()], Arc::new(factory)).await.unwrap();
    let h = Harness { pool, record };
    let router = h.pool.router();
    let held = hold_worker(&h).await;
    // Rows of `steps` steps: row r's step t has first feature 10 r + t, its state starts [r, 0].
    let rows_of = |n: usize, steps: usize| {
        let mut rows = InferRows::sequences(&seq, n, steps);
        for r in 0..n {
            let features: Vec<f32> = (0..steps).flat_map(|t| [(10 * r + t) as f32, 1.0, 2.0]).collect();
            rows.push(&seq, &features, Some(&[r as f32, 0.0])).unwrap();
        }
        Arc::new(rows)
    };
    let calls = [(3, 1), (2, 3), (1, 2), (2, 3)].map(|(n, steps)| {
        let (router, rows) = (router.clone(), rows_of(n, steps));
        tokio::spawn(async move {
            (rows.clone(), router.infer_rows_within("m", rows, Duration::from_secs(10)).await)
        })
    });
    wait_for(|| async { router.load().0 }, |&n| n == 1 + 3 + 2 + 1 + 2).await;
    release_forever(open);
    held.await.unwrap().unwrap();
    for call in calls {
        let (rows, out) = call.await.unwrap();
        assert_eq!((out.len(), out.steps), (rows.rows, rows.steps));
        for r in 0..rows.rows {
            assert!(matches!(out.answers[r], RowAnswer::Scored(_)), "{:?}", out.answers[r]);
            // Step by step, as rows of one step would be answered.
            let mut state = vec![r as f32, 0.0];
            for t in 0..rows.steps {
                let x = (10 * r + t) as f32;
                assert_eq!(out.scores(r)[t], x + 3.0 + state.iter().sum::<f32>(), "row {r} step {t}");
                state.iter_mut().for_each(|v| *v += x);
            }
            assert_eq!(out.new_state(r), state, "row {r}");
        }
    }
    // Behind the held batch: one batch per length, the two calls of 3 steps together.
    let mut shapes = h.record.batch_shapes.lock().unwrap()[1..].to_vec();
    shapes.sort_unstable();
    assert_eq!(shapes, [(1, 2), (3, 1), (4, 3)]);

    // More steps than the model takes, or steps for a model without a sequence form: refused.
    let out = router.infer_rows_within("m", rows_of(1, 5), Duration::from_secs(10)).await;
    let steps = InferError::Steps { model: "m".into(), steps: 5, max_steps: 4 };
    assert_eq!(out.answers, [RowAnswer::Failed(steps)]);
    h.pool.shutdown().await;
    let plain = start(1, 64, batched(), None).await;
    let out = plain.pool.router().infer_rows_within("m", rows_of(1, 2), Duration::from_secs(10)).await;
    assert!(matches!(&out.answers[0], RowAnswer::Failed(InferError::Steps { max_steps: 1, .. })), "{out:?}");
    plain.pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_with_time_to_spare_wait_for_batch_mates_past_the_fixed_delay() {
    // No fixed delay: a request without a due time runs as soon as the worker is free, alone.
    let policy = BatchPolicy { max_queue_delay: Duration::ZERO, ..batched() };
    let h = start(1, 64, policy, None).await;
    let router = h.pool.router();
    let send = |x: f32, due: Option<std::time::Instant>| {
        let (router, mut rows) = (router.clone(), (*wave(&[x])).clone());
        rows.due = due;
        tokio::spawn(
            async move { router.infer_rows_within("m", Arc::new(rows), Duration::from_secs(30)).await },
        )
    };
    let batch_size = |out: &RowsOutput| match out.answers[..] {
        [RowAnswer::Scored(ref served)] => served.batch_size,
        ref other => panic!("{other:?}"),
    };
    // Before the worker has run a batch it has no compute time to go by: the fixed delay.
    let due = || Some(std::time::Instant::now() + Duration::from_secs(2));
    assert_eq!(batch_size(&send(0.0, due()).await.unwrap()), 1, "nothing learned: at once, alone");
    // Now due in 2 s: the first waits for the second instead of running at once.
    let first = send(1.0, due());
    wait_for(|| async { h.pool.status().await[0].inflight }, |&n| n == 1).await;
    let second = send(2.0, due());
    let (first, second) = (first.await.unwrap(), second.await.unwrap());
    assert_eq!((batch_size(&first), batch_size(&second)), (2, 2), "one batch of both");
    assert_eq!((first.scores[0], second.scores[0]), (4.0, 5.0));
    assert_eq!(batch_size(&send(3.0, None).await.unwrap()), 1, "without a due time: at once, alone");
}
