//! The inference half on real LibTorch and the shipped TorchScript models.

use std::sync::Arc;

use partita_actors::inference::{
    BackendError, BackendFactory, BatchInput, BatchOutput, Device, InferError, InferRequest, InferRows,
    InferenceBackend, ModelReady, RowAnswer,
};
use partita_actors::model::ModelSpec;
use partita_actors::pool::{InferencePool, PoolConfig, RestartPolicy};
use partita_runtime::inference::repository::ModelRepository;
use partita_runtime::inference::tch::TchFactory;
use partita_runtime::inference::{DeviceChoice, InferenceOptions, StartError};
use partita_tests::{Lcg, fixture_repo, models_dir};

fn opts(repository: std::path::PathBuf) -> InferenceOptions {
    InferenceOptions {
        repository,
        device: DeviceChoice::Cpu,
        cpu_workers: 2,
        intra_op_threads: 1,
        ..Default::default()
    }
}

fn req(model: &str, features: Vec<f32>, state: Option<Vec<f32>>) -> InferRequest {
    InferRequest { model: model.into(), features, state }
}

fn assert_close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= 1e-4 + 1e-4 * y.abs(), "{what}[{i}]: {x} vs {y}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_results_equal_one_by_one_results_row_by_row() {
    let (pool, _) = opts(models_dir()).start().await.unwrap();
    let router = pool.router();
    let mut rng = Lcg::new(1);
    let rows: Vec<(Vec<f32>, Vec<f32>)> = (0..300).map(|_| (rng.vec(16), rng.vec(64))).collect();

    let mut alone = Vec::new();
    for (f, s) in &rows {
        let out = router.infer(req("fraud_gru", f.clone(), Some(s.clone()))).await.unwrap();
        assert_eq!(out.batch_size, 1, "sequential requests run alone");
        alone.push(out);
    }
    let tasks: Vec<_> = rows
        .iter()
        .map(|(f, s)| {
            let (r, f, s) = (router.clone(), f.clone(), s.clone());
            tokio::spawn(async move { r.infer(req("fraud_gru", f, Some(s))).await })
        })
        .collect();
    let mut max_batch = 0;
    for (i, t) in tasks.into_iter().enumerate() {
        let out = t.await.unwrap().unwrap();
        max_batch = max_batch.max(out.batch_size);
        assert_close(&[out.score], &[alone[i].score], &format!("score of row {i}"));
        assert_close(&out.new_state, &alone[i].new_state, &format!("new_state of row {i}"));
        assert!((0.0..=1.0).contains(&out.score), "score is a probability: {}", out.score);
        assert_eq!(out.new_state.len(), 64);
        assert_eq!(out.model_version, 1);
    }
    assert!(max_batch > 1, "concurrent requests were batched (largest batch {max_batch})");
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_carries_history_and_stateless_models_return_none() {
    let (pool, _) = opts(models_dir()).start().await.unwrap();
    let router = pool.router();
    let f = Lcg::new(2).vec(16);
    let first = router.infer(req("fraud_gru", f.clone(), None)).await.unwrap();
    let zeros = router.infer(req("fraud_gru", f.clone(), Some(vec![0.0; 64]))).await.unwrap();
    assert_close(&first.new_state, &zeros.new_state, "missing state = zeros");
    let second = router.infer(req("fraud_gru", f.clone(), Some(first.new_state.clone()))).await.unwrap();
    assert_ne!(second.new_state, first.new_state, "the state evolves with each event");

    let mlp = router.infer(req("fraud_mlp", f, None)).await.unwrap();
    assert!(mlp.new_state.is_empty());
    assert!((0.0..=1.0).contains(&mlp.score));
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_request_kind_is_rejected_before_a_tensor_is_built() {
    let (pool, _) = opts(models_dir()).start().await.unwrap();
    let router = pool.router();
    let f = vec![0.1; 16];
    type Expect = fn(&InferError) -> bool;
    let cases: Vec<(InferRequest, Expect)> = vec![
        (req("no_such_model", f.clone(), None), |e| matches!(e, InferError::UnknownModel { .. })),
        (req("fraud_gru", vec![0.1; 15], None), |e| {
            matches!(e, InferError::Shape { input: "features", got: 15, .. })
        }),
        (req("fraud_gru", vec![0.1; 100_000], None), |e| matches!(e, InferError::Shape { got: 100_000, .. })),
        (req("fraud_gru", f.clone(), Some(vec![0.0; 63])), |e| {
            matches!(e, InferError::Shape { input: "state", .. })
        }),
        (req("fraud_mlp", f.clone(), Some(vec![0.0; 64])), |e| {
            matches!(e, InferError::Shape { input: "state", .. })
        }),
        (req("fraud_gru", [vec![f32::NAN], vec![0.0; 15]].concat(), None), |e| {
            matches!(e, InferError::ValueRange { input: "features", index: 0, .. })
        }),
        (req("fraud_gru", [vec![0.0; 15], vec![f32::NEG_INFINITY]].concat(), None), |e| {
            matches!(e, InferError::ValueRange { index: 15, .. })
        }),
        (req("fraud_gru", f.clone(), Some([vec![0.0; 63], vec![f32::INFINITY]].concat())), |e| {
            matches!(e, InferError::ValueRange { input: "state", index: 63, .. })
        }),
    ];
    for (i, (r, expected)) in cases.into_iter().enumerate() {
        let err = router.infer(r).await.unwrap_err();
        assert!(expected(&err), "case {i}: unexpected error {err:?}");
        assert!(err.is_bad_request(), "case {i}");
        assert!(!err.to_string().is_empty());
    }
    assert_eq!(pool.status().await.iter().map(|w| w.restarts).sum::<usize>(), 0);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_libtorch_error_fails_only_its_batch() {
    let (pool, _) = opts(fixture_repo("faulty")).start().await.unwrap();
    let router = pool.router();
    let bad = [vec![1e31], vec![0.0; 15]].concat();
    let err = router.infer(req("faulty", bad, None)).await.unwrap_err();
    assert!(matches!(&err, InferError::Backend(m) if m.contains("faulty fixture")), "{err:?}");
    let ok = router.infer(req("faulty", vec![1.0; 16], Some(vec![0.5; 64]))).await.unwrap();
    assert_eq!(ok.score, 16.0);
    assert_eq!(ok.new_state, vec![1.5; 64]);
    let status = pool.status().await;
    assert!(status.iter().all(|w| w.healthy && w.restarts == 0), "{status:?}");
    pool.shutdown().await;
}

/// The real LibTorch backend, wrapped so a magic feature value panics inside `run`.
struct PanicOn(Box<dyn InferenceBackend>);

impl InferenceBackend for PanicOn {
    fn run(&mut self, model: usize, batch: &BatchInput<'_>) -> Result<BatchOutput, BackendError> {
        assert!(!batch.features.contains(&12345.0), "injected panic");
        self.0.run(model, batch)
    }
}

struct PanicFactory(TchFactory);

impl BackendFactory for PanicFactory {
    fn create(
        &self,
        device: Device,
        specs: &[ModelSpec],
    ) -> Result<(Box<dyn InferenceBackend>, Vec<ModelReady>), BackendError> {
        let (inner, ready) = self.0.create(device, specs)?;
        Ok((Box::new(PanicOn(inner)), ready))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_panic_does_not_take_the_pool_down() {
    let repo = ModelRepository::load(&models_dir()).unwrap();
    let factory = PanicFactory(TchFactory::new(repo.models.iter().map(|m| m.path.clone()).collect()));
    let config = PoolConfig {
        devices: vec![Device::Cpu; 2],
        max_inflight: 256,
        max_retries: 2,
        retry_backoff: std::time::Duration::from_millis(20),
        restart: RestartPolicy::default(),
        hang_after: None,
        remote: None,
    };
    let pool = InferencePool::start(config, repo.specs(), Arc::new(factory)).await.unwrap();
    let router = pool.router();
    for _ in 0..3 {
        let poison = [vec![12345.0], vec![0.0; 15]].concat();
        let err = router.infer(req("fraud_gru", poison, None)).await.unwrap_err();
        assert!(matches!(&err, InferError::Panicked(m) if m.contains("injected panic")), "{err:?}");
        let ok = router.infer(req("fraud_gru", vec![0.0; 16], None)).await.unwrap();
        assert!((0.0..=1.0).contains(&ok.score));
    }
    let status = pool.status().await;
    assert!(status.iter().all(|w| w.healthy && w.restarts == 0), "{status:?}");
    pool.shutdown().await;
}

#[tokio::test]
async fn a_model_that_breaks_its_contract_fails_at_warm_up() {
    let err = opts(fixture_repo("short_state")).start().await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, StartError::Pool(_)), "{text}");
    assert!(text.contains("short_state") && text.contains("warm-up"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_backlog_in_one_forward_sequence_equals_its_events_one_by_one() {
    let (pool, _) = opts(models_dir()).start().await.unwrap();
    let router = pool.router();
    let spec = router.model("fraud_gru").unwrap().clone();
    assert_eq!(spec.max_steps, 64, "the shipped model has the sequence form");
    let mut rng = Lcg::new(5);
    for steps in [2, 17, 64] {
        // 5 keys, each `steps` events and a state.
        let keys: Vec<(Vec<Vec<f32>>, Vec<f32>)> =
            (0..5).map(|_| ((0..steps).map(|_| rng.vec(16)).collect(), rng.vec(64))).collect();
        let mut rows = InferRows::sequences(&spec, keys.len(), steps);
        for (events, state) in &keys {
            rows.push(&spec, &events.concat(), Some(state)).unwrap();
        }
        let out =
            router.infer_rows_within("fraud_gru", Arc::new(rows), std::time::Duration::from_secs(30)).await;
        for (k, (events, state)) in keys.iter().enumerate() {
            assert!(matches!(out.answers[k], RowAnswer::Scored(_)), "{:?}", out.answers[k]);
            let mut s = state.clone();
            for (t, f) in events.iter().enumerate() {
                let one = router.infer(req("fraud_gru", f.clone(), Some(s))).await.unwrap();
                assert_close(
                    &out.scores(k)[t..=t],
                    &[one.score],
                    &format!("{steps} steps: key {k} score {t}"),
                );
                s = one.new_state;
            }
            assert_close(out.new_state(k), &s, &format!("{steps} steps: key {k} new_state"));
        }
    }
    pool.shutdown().await;
}

#[tokio::test]
async fn a_sequence_form_in_the_config_without_forward_sequence_fails_at_warm_up() {
    let dir = tempfile::tempdir().unwrap();
    let from = fixture_repo("faulty").join("faulty");
    let to = dir.path().join("faulty");
    std::fs::create_dir_all(to.join("1")).unwrap();
    std::fs::copy(from.join("1/model.pt"), to.join("1/model.pt")).unwrap();
    let config = std::fs::read_to_string(from.join("config.toml")).unwrap();
    std::fs::write(to.join("config.toml"), format!("{config}\n[sequence]\nmax_steps = 8\n")).unwrap();
    let err = opts(dir.path().to_path_buf()).start().await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("faulty") && text.contains("forward_sequence"), "{text}");
}

#[tokio::test]
async fn device_cuda_without_a_gpu_is_a_clear_error() {
    if partita_runtime::inference::tch::cuda_device_count() > 0 {
        return; // this machine has a GPU: covered by `partita models --device cuda` instead
    }
    let o = InferenceOptions { device: DeviceChoice::Cuda, ..opts(models_dir()) };
    assert!(matches!(o.start().await, Err(StartError::NoCuda)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_affinity_pins_the_workers_threads_and_unavailable_cores_are_refused() {
    use partita_runtime::inference::affinity::{CpuList, available};
    // The factory pins the thread that creates a backend: a worker's device thread (the feeder and
    // libtorch's threads it starts inherit the mask: `affinity::tests`). Checked on a thread of
    // this test's own, as other tests' workers run in this process meanwhile.
    let last = *available().unwrap().last().unwrap();
    let repo = ModelRepository::load(&models_dir()).unwrap();
    let factory =
        TchFactory::new(repo.models.iter().map(|m| m.path.clone()).collect()).pinned_to(CpuList(vec![last]));
    let specs = repo.specs();
    let cores = std::thread::spawn(move || {
        let (mut backend, _) = factory.create(Device::Cpu, &specs).unwrap();
        let (features, state) = (vec![0.5; 16], vec![0.0; 64]);
        let gru = specs.iter().position(|s| s.name == "fraud_gru").unwrap();
        let out =
            backend.run(gru, &BatchInput { rows: 1, steps: 1, features: &features, state: &state }).unwrap();
        assert!(out.scores[0].is_finite());
        available().unwrap()
    })
    .join()
    .unwrap();
    assert_eq!(cores, vec![last], "the worker thread runs on core {last} only");
    // A pool with pinning starts and scores; cores the process may not use are refused.
    let o = InferenceOptions { cpu_affinity: CpuList(vec![last]), ..opts(models_dir()) };
    let (pool, _) = o.start().await.unwrap();
    let out = pool.router().infer(req("fraud_gru", vec![0.5; 16], Some(vec![0.0; 64]))).await.unwrap();
    assert!(out.score.is_finite());
    pool.shutdown().await;
    let refused = InferenceOptions { cpu_affinity: CpuList(vec![4000]), ..opts(models_dir()) };
    match refused.start().await {
        Err(StartError::Affinity(e)) => assert!(e.contains("4000") && e.contains("not available"), "{e}"),
        other => panic!("expected an affinity error, got {:?}", other.map(|_| ())),
    }
}
