//! The partition actor with an in-memory store, a recording sink and a scripted model (pure Rust,
//! no Kafka, no libtorch): what the actor answers and stores for inputs the pipeline tests cannot
//! make a real model produce.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use partita_proto::v1::{DeadLetter, DeadLetterReason, Event, Score};
use prost::Message;
use ractor::{Actor, ActorRef};

use super::records::dead_letter;
use super::*;
use crate::inference::{
    BackendError, BackendFactory, BatchInput, BatchOutput, Device, InferenceBackend, ModelReady,
};
use crate::model::{BatchPolicy, ModelSpec};
use crate::pool::{InferencePool, PoolConfig, RestartPolicy};
use crate::state::mem::MemStore;
use crate::state::{Epoch, FORMAT_SEQ_F32_LE, Offset, Sequenced, StateCache, StateStore, StateValue};
use sha2::{Digest, Sha256};
use supervisor::{PartitionDown, PartitionSupervisor, SupervisorMsg};

const F: usize = 2;
const H: usize = 2;
const P: PartitionId = PartitionId(0);

/// First-feature values that make the model misbehave.
const NAN_SCORE: f32 = 13.0;
const INF_STATE: f32 = 14.0;
/// Takes 300 ms.
const SLOW: f32 = 99.0;
/// In a row of several steps, the device is lost (the worker dies); one step at a time it is an
/// ordinary event.
const LOSES_ROWS: f32 = 16.0;

/// score = sum(features) + sum(state); new_state = state + features[0]. A row of several steps
/// applies them in order, as the sequence form does.
struct Scripted;

impl InferenceBackend for Scripted {
    fn run(&mut self, _model: usize, b: &BatchInput<'_>) -> Result<BatchOutput, BackendError> {
        if b.steps > 1 && b.features.chunks(F).any(|f| f[0] == LOSES_ROWS) {
            return Err(BackendError::Fatal("device lost".into()));
        }
        let mut out = BatchOutput::default();
        for r in 0..b.rows {
            let mut s = b.state[r * H..(r + 1) * H].to_vec();
            for t in 0..b.steps {
                let at = (r * b.steps + t) * F;
                let f = &b.features[at..at + F];
                if f[0] == SLOW {
                    std::thread::sleep(Duration::from_millis(300));
                }
                let score = f.iter().sum::<f32>() + s.iter().sum::<f32>();
                out.scores.push(if f[0] == NAN_SCORE { f32::NAN } else { score });
                let add = if f[0] == INF_STATE { f32::INFINITY } else { f[0] };
                s.iter_mut().for_each(|v| *v += add);
            }
            out.new_state.extend(s);
        }
        Ok(out)
    }
}

struct ScriptedFactory;

impl BackendFactory for ScriptedFactory {
    fn create(
        &self,
        _device: Device,
        specs: &[ModelSpec],
    ) -> Result<(Box<dyn InferenceBackend>, Vec<ModelReady>), BackendError> {
        let ready = specs
            .iter()
            .map(|s| ModelReady { name: s.name.clone(), version: s.version, warmup: Duration::ZERO })
            .collect();
        Ok((Box::new(Scripted), ready))
    }
}

/// Records what the actor produces and commits.
#[derive(Default)]
struct Sink {
    outputs: Mutex<Vec<OutputRecord>>,
    commits: Mutex<Vec<Offset>>,
    /// While set, produced records are not acknowledged (a slow broker).
    hold_acks: AtomicBool,
}

impl PartitionSink for Sink {
    async fn produce(&self, records: &[OutputRecord]) -> Result<(), SinkError> {
        self.outputs.lock().unwrap().extend_from_slice(records);
        while self.hold_acks.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(())
    }

    fn commit(&self, _partition: PartitionId, next_offset: Offset) {
        self.commits.lock().unwrap().push(next_offset);
    }
}

/// What one output decodes to.
#[derive(Debug)]
enum Out {
    Score(Score),
    Dead(DeadLetter),
}

struct Harness {
    store: Arc<MemStore>,
    counters: Arc<PipelineCounters>,
    sink: Arc<Sink>,
    pool: InferencePool,
    tx: Option<Sender<InputRecord>>,
    wake: Arc<AtomicBool>,
    actor: ActorRef<PartitionMsg>,
    next_offset: i64,
    supervisor: ActorRef<SupervisorMsg<Arc<MemStore>, Sink>>,
    downs: crossbeam_channel::Receiver<PartitionDown>,
}

impl Harness {
    async fn start() -> Self {
        Self::start_with_store(Arc::new(MemStore::default())).await
    }

    /// With `max_inflight` requests admitted to the pool at once and `config`.
    async fn start_with(max_inflight: usize, config: PartitionConfig) -> Self {
        Self::start_full(Arc::new(MemStore::default()), max_inflight, config, None).await
    }

    /// With `key`'s state already stored as `value`.
    async fn start_with_stored(key: &[u8], value: StateValue) -> Self {
        let store = Arc::new(MemStore::default());
        store.data.lock().unwrap().insert((P, key.to_vec()), value);
        Self::start_with_store(store).await
    }

    async fn start_with_store(store: Arc<MemStore>) -> Self {
        Self::start_full(store, 64, PartitionConfig::default(), None).await
    }

    /// `applied`: the stored applied offset the actor resumes after (as the consumer passes it).
    async fn start_full(
        store: Arc<MemStore>,
        max_inflight: usize,
        config: PartitionConfig,
        applied: Option<Offset>,
    ) -> Self {
        Self::start_model(store, max_inflight, config, applied, 1).await
    }

    /// ... with a model whose sequence form takes `max_steps` (1: none).
    async fn start_model(
        store: Arc<MemStore>,
        max_inflight: usize,
        config: PartitionConfig,
        applied: Option<Offset>,
        max_steps: usize,
    ) -> Self {
        let spec = ModelSpec {
            name: "m".into(),
            version: 1,
            description: String::new(),
            feature_count: F,
            state_size: H,
            batch: BatchPolicy::unbatched(),
            warmup_batch_sizes: vec![],
            feature_range: None,
            max_steps,
        };
        let pool_config = PoolConfig {
            devices: vec![Device::Cpu],
            max_inflight,
            max_retries: 2,
            retry_backoff: Duration::from_millis(5),
            // A lost worker is back within milliseconds (the default's backoff starts at 200 ms,
            // longer than a request waits for a healthy worker).
            restart: RestartPolicy { backoff: Duration::from_millis(1), ..RestartPolicy::default() },
            hang_after: None,
            remote: None,
        };
        let pool = InferencePool::start(pool_config, vec![spec], Arc::new(ScriptedFactory)).await.unwrap();
        store.claim(P, Epoch(1)).await.unwrap();
        let sink = Arc::new(Sink::default());
        let (tx, rx) = crossbeam_channel::bounded(1024);
        let wake = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(PipelineCounters::default());
        let args = PartitionArgs {
            topic: Arc::from("in"),
            partition: P,
            epoch: Epoch(1),
            applied,
            queue: rx,
            wake_pending: wake.clone(),
            queued_bytes: Default::default(),
            cache: Arc::new(StateCache::new(store.clone(), 1 << 20, Arc::new(crate::state::NoopObserver))),
            router: pool.router(),
            sink: sink.clone(),
            limits: Arc::new(Limits { default_model: Arc::from("m"), ..Limits::default() }),
            config,
            counters: counters.clone(),
            observer: Arc::new(NoopPipelineObserver),
            tracer: Arc::new(NoTraces),
        };
        let (downs_tx, downs) = crossbeam_channel::unbounded();
        let (supervisor, _) =
            Actor::spawn(None, PartitionSupervisor::<Arc<MemStore>, Sink>::default(), downs_tx)
                .await
                .unwrap();
        let actor = ractor::call!(supervisor, SupervisorMsg::Spawn, Box::new(args)).unwrap().unwrap();
        let next_offset = applied.map_or(0, |o| o.0 + 1);
        Self { store, counters, sink, pool, tx: Some(tx), wake, actor, next_offset, supervisor, downs }
    }

    /// Queue one event of `key` and wake the actor.
    fn send(&mut self, key: &str, sequence: u64, first_feature: f32) {
        let event = Event {
            event_id: format!("{key}-{sequence}"),
            key: key.as_bytes().to_vec(),
            sequence,
            event_time_unix_micros: unix_micros(),
            features: vec![first_feature, 0.0],
            schema_version: 1,
            model: String::new(),
        };
        let rec = InputRecord {
            topic: Arc::from("in"),
            partition: P,
            offset: Offset(self.next_offset),
            key: Some(key.as_bytes().to_vec()),
            value: Some(event.encode_to_vec()),
            headers: vec![],
            received: Instant::now(),
            trimmed: Default::default(),
        };
        self.next_offset += 1;
        self.tx.as_ref().unwrap().send(rec).unwrap();
        if !self.wake.swap(true, Ordering::SeqCst) {
            self.actor.cast(PartitionMsg::Wake).unwrap();
        }
    }

    /// Queue `events` (key, sequence, first feature) before the actor looks at any of them.
    fn send_all(&mut self, events: &[(&str, u64, f32)]) {
        let woken = self.wake.swap(true, Ordering::SeqCst);
        for &(key, sequence, feature) in events {
            self.send(key, sequence, feature);
        }
        if !woken {
            self.actor.cast(PartitionMsg::Wake).unwrap();
        }
    }

    /// The source offsets of the outputs, in the order they were produced.
    fn output_offsets(&self) -> Vec<i64> {
        self.sink.outputs.lock().unwrap().iter().map(|o| o.source_offset.0).collect()
    }

    /// Let the actor finish everything queued and stop; the applied offset it reports.
    async fn drain(&mut self) -> Option<Offset> {
        drop(self.tx.take());
        let far = Instant::now() + Duration::from_secs(60);
        ractor::call_t!(self.actor, PartitionMsg::Drain, 10_000, far, far).unwrap()
    }

    fn outputs(&self) -> Vec<Out> {
        self.sink
            .outputs
            .lock()
            .unwrap()
            .iter()
            .map(|o| match o.topic {
                OutputTopic::Scores => Out::Score(Score::decode(&*o.value).unwrap()),
                OutputTopic::DeadLetters => Out::Dead(DeadLetter::decode(&*o.value).unwrap()),
            })
            .collect()
    }

    /// The stored (sequence, state) of `key`.
    fn stored(&self, key: &str) -> Option<(u64, Vec<f32>)> {
        self.store.value(P, key.as_bytes()).map(|v| v.to_sequenced().unwrap()).map(|s| (s.sequence, s.state))
    }

    /// The offset of `key`'s last answered record, as stored with its state.
    fn stored_offset(&self, key: &str) -> Option<Offset> {
        self.store.value(P, key.as_bytes()).and_then(|v| v.to_sequenced().unwrap().offset)
    }

    /// Neither a state write nor an offset commit happened yet, because of `why`.
    fn assert_nothing_written(&self, why: &str) {
        assert_eq!(self.store.writes.load(Ordering::SeqCst), 0, "a state was written: {why}");
        assert!(self.sink.commits.lock().unwrap().is_empty(), "an offset was committed: {why}");
    }

    /// The next partition actor the supervisor reports down, if one does `within`.
    fn next_down(&self, within: Duration) -> Option<PartitionDown> {
        self.downs.recv_timeout(within).ok()
    }

    async fn stop(self) {
        self.supervisor.stop(None);
        self.pool.shutdown().await;
    }
}

/// Waits until `cond` holds; panics after 10 s.
async fn wait_until(cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "not reached within 10 s");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn reason(out: &Out) -> Option<DeadLetterReason> {
    match out {
        Out::Score(_) => None,
        Out::Dead(d) => Some(d.reason()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_finite_model_output_is_dead_lettered_and_leaves_the_key_state_unchanged() {
    let mut h = Harness::start().await;
    h.send("k", 1, 1.0);
    h.send("k", 2, NAN_SCORE);
    h.send("k", 3, 2.0);
    h.send("k", 4, INF_STATE);
    h.send("k", 5, 3.0);
    assert_eq!(h.drain().await, Some(Offset(4)));
    let outs = h.outputs();
    let reasons: Vec<Option<DeadLetterReason>> = outs.iter().map(reason).collect();
    assert_eq!(
        reasons,
        [None, Some(DeadLetterReason::OutputRange), None, Some(DeadLetterReason::OutputRange), None],
        "{outs:#?}"
    );
    // Only events 1, 3 and 5 took effect: state = 1 + 2 + 3 per element, sequence 5.
    assert_eq!(h.stored("k"), Some((5, vec![6.0, 6.0])));
    let Out::Score(last) = &outs[4] else { unreachable!() };
    assert_eq!(last.score, 9.0, "3 + 0 + the state [3, 3] of events 1 and 3");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_supervisor_reports_a_failed_or_fenced_partition_actor_and_not_a_drained_one() {
    // Drained: not a failure, nothing reported.
    let mut h = Harness::start().await;
    h.send("k", 1, 1.0);
    h.drain().await;
    assert_eq!(tokio::task::block_in_place(|| h.next_down(Duration::from_millis(500))), None);
    h.stop().await;

    // A corrupt stored state fails the actor: reported, not fenced (the consumer restarts it).
    let corrupt = StateValue { format: FORMAT_SEQ_F32_LE, data: vec![1, 2, 3] };
    let mut h = Harness::start_with_stored(b"bad", corrupt).await;
    h.send("bad", 1, 1.0);
    let down = tokio::task::block_in_place(|| h.next_down(Duration::from_secs(5)))
        .expect("the failed actor is reported");
    assert_eq!((down.partition, down.epoch, down.actor), (P, Epoch(1), h.actor.get_id()));
    assert!(!down.fenced && down.reason.contains("corrupt"), "{down:?}");
    h.stop().await;

    // A newer owner claims the partition: the next state write is fenced; reported as fenced
    // (the consumer gives the partition up instead of claiming it back).
    let mut h = Harness::start().await;
    h.store.claim(P, Epoch(2)).await.unwrap();
    h.send("k", 1, 1.0);
    let down = tokio::task::block_in_place(|| h.next_down(Duration::from_secs(5)))
        .expect("the fenced actor is reported");
    assert!(down.fenced && down.reason.contains("fenced by epoch 2"), "{down:?}");
    assert!(h.sink.commits.lock().unwrap().is_empty(), "nothing committed past the fence");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_write_stops_the_actor_as_fenced_while_it_waits_to_hand_over_a_batch() {
    let config = PartitionConfig { max_batch: 1, max_pending_batches: 1, ..PartitionConfig::default() };
    let mut h = Harness::start_with(64, config).await;
    h.store.hold_writes.store(true, Ordering::SeqCst);
    h.send("k", 1, 1.0);
    wait_until(|| h.output_offsets() == [0]).await;
    // A newer owner claims the partition while the first write is held; meanwhile the committer's
    // stages and channel fill, and the actor waits to hand over its next batch.
    h.store.claim(P, Epoch(2)).await.unwrap();
    for s in 2..=6 {
        h.send("k", s, 1.0);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    h.store.hold_writes.store(false, Ordering::SeqCst);
    let down = tokio::task::block_in_place(|| h.next_down(Duration::from_secs(5)))
        .expect("the fenced actor is reported");
    assert!(down.fenced && down.reason.contains("fenced by epoch 2"), "{down:?}");
    assert!(h.sink.commits.lock().unwrap().is_empty(), "nothing committed past the fence");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_over_the_limit_is_dead_lettered_with_only_its_first_kib_copied() {
    let mut h = Harness::start().await;
    let long = "x".repeat(10_000);
    h.send(&long, 1, 1.0);
    h.send("k", 1, 1.0);
    h.drain().await;
    let outs = h.outputs();
    let Out::Dead(d) = &outs[0] else { panic!("{outs:?}") };
    assert_eq!(d.reason(), DeadLetterReason::TooLarge, "{d:?}");
    assert_eq!((d.key.len(), d.key_len), (DEAD_LETTER_PREFIX, 10_000));
    assert_eq!(h.sink.outputs.lock().unwrap()[0].key.len(), DEAD_LETTER_PREFIX, "the record key too");
    assert!(matches!(outs[1], Out::Score(_)));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_repeated_and_jumping_sequences_get_their_own_answers_and_never_poison_the_key() {
    let mut h = Harness::start().await;
    h.send("k", 1, 1.0);
    h.send("k", 3, 1.0);
    h.send("k", 2, 1.0); // late: never applied
    h.send("k", 3, 1.0); // repeated
    h.send("k", 1 << 63, 1.0); // a bogus jump
    h.send("k", 4, 1.0); // the key goes on
    h.drain().await;
    let reasons: Vec<Option<DeadLetterReason>> = h.outputs().iter().map(reason).collect();
    use DeadLetterReason::{Duplicate, OutOfOrder, SequenceGap};
    assert_eq!(reasons, [None, None, Some(OutOfOrder), Some(Duplicate), Some(SequenceGap), None]);
    assert_eq!(h.stored("k"), Some((4, vec![3.0, 3.0])), "events 1, 3 and 4 applied");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_keys_backlog_never_holds_back_the_other_keys_and_commits_stay_below_it() {
    // 10 events of a hot key, then 3 cold keys; 2 records of a key per batch.
    let config = PartitionConfig { max_batch: 16, max_waves: 2, ..PartitionConfig::default() };
    let mut h = Harness::start_full(Arc::new(MemStore::default()), 64, config, None).await;
    let mut events: Vec<(&str, u64, f32)> = (1..=10).map(|s| ("hot", s, 1.0)).collect();
    // ... and a repeat of a's event, dead-lettered DUPLICATE ahead of the held hot records.
    events.extend([("a", 1, 1.0), ("b", 1, 1.0), ("c", 1, 1.0), ("a", 1, 1.0)]);
    h.send_all(&events);
    assert_eq!(h.drain().await, Some(Offset(13)));
    // The cold keys go out with the hot key's first two, not after its whole backlog.
    assert_eq!(h.output_offsets()[..6], [0, 1, 10, 11, 12, 13], "{:?}", h.output_offsets());
    assert_eq!(h.output_offsets().len(), 14);
    // Each key's state carries the offset of its last answered record, the dead-lettered one
    // included: a restart from below it skips it instead of answering it again.
    assert_eq!(h.stored_offset("a"), Some(Offset(13)));
    assert_eq!(h.stored_offset("hot"), Some(Offset(9)));
    // Every commit is at most the lowest offset not yet output when it was made: never past a
    // held record of the hot key.
    let commits = h.sink.commits.lock().unwrap().clone();
    assert!(commits.windows(2).all(|w| w[0] <= w[1]), "{commits:?}");
    assert!(commits[0] <= Offset(2), "the first commit stops below the held hot records: {commits:?}");
    assert_eq!(commits.last(), Some(&Offset(14)));
    // The hot key's events applied once each, in order: state 10 × 1.0, sequence 10.
    assert_eq!(h.stored("hot"), Some((10, vec![10.0, 10.0])));
    h.stop().await;
}

/// Run `events` through an actor whose model's sequence form takes `max_steps` (1: none), with
/// 2 records of a key per batch otherwise; its outputs by offset (score or dead-letter reason),
/// the stored states of `keys`, and its backlog counters (events, fallbacks).
async fn run_backlogs(
    events: &[(&str, u64, f32)],
    keys: &[&str],
    max_steps: usize,
) -> (Vec<(i64, Result<f32, DeadLetterReason>)>, Vec<Option<(u64, Vec<f32>)>>, (u64, u64)) {
    let config = PartitionConfig { max_batch: 64, max_waves: 2, ..PartitionConfig::default() };
    let mut h = Harness::start_model(Arc::new(MemStore::default()), 64, config, None, max_steps).await;
    h.send_all(events);
    assert_eq!(h.drain().await, Some(Offset(events.len() as i64 - 1)));
    let mut outs: Vec<(i64, Result<f32, DeadLetterReason>)> = h
        .outputs()
        .into_iter()
        .map(|o| match o {
            Out::Score(s) => (s.source_offset, Ok(s.score)),
            Out::Dead(d) => (d.source_offset, Err(d.reason())),
        })
        .collect();
    outs.sort_by_key(|(o, _)| *o);
    let stored = keys.iter().map(|k| h.stored(k)).collect();
    let c = &h.counters;
    let counts = (c.backlog_events.load(Ordering::Relaxed), c.backlog_fallbacks.load(Ordering::Relaxed));
    h.stop().await;
    (outs, stored, counts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_backlog_is_scored_in_one_row_with_the_answers_of_one_by_one() {
    // 12 events of a hot key (8 in the first batch: the sequence form's max_steps, not max_waves),
    // 3 of a warm key, one of a cold key, interleaved.
    let mut events: Vec<(&str, u64, f32)> = (1..=12).map(|s| ("hot", s, s as f32)).collect();
    events.insert(3, ("warm", 1, 0.5));
    events.insert(5, ("cold", 1, 2.0));
    events.insert(7, ("warm", 2, 0.25));
    events.push(("warm", 3, 4.0));
    let keys = ["hot", "warm", "cold"];
    let one_by_one = run_backlogs(&events, &keys, 1).await;
    let in_rows = run_backlogs(&events, &keys, 8).await;
    assert_eq!(one_by_one.2, (0, 0));
    assert_eq!(in_rows.0, one_by_one.0, "the same answers, offset by offset");
    assert_eq!(in_rows.1, one_by_one.1, "the same stored sequences and states");
    assert!(one_by_one.0.iter().all(|(_, r)| r.is_ok()), "{:?}", one_by_one.0);
    // hot: rows of 8 and 4; warm: a row of 3; cold alone.
    assert_eq!(in_rows.2, (15, 0), "backlog events, fallbacks");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_row_that_fails_goes_on_one_by_one_and_an_unusual_one_never_goes_in_a_row() {
    // hot: its 3rd event makes the model answer NaN (the row is not finite: fallback); dup: a
    // repeated sequence (judged one by one, never in a row).
    let events = [
        ("hot", 1, 1.0),
        ("hot", 2, 2.0),
        ("hot", 3, NAN_SCORE),
        ("hot", 4, 3.0),
        ("dup", 1, 1.0),
        ("dup", 1, 1.0),
        ("dup", 2, 1.0),
    ];
    let keys = ["hot", "dup"];
    let one_by_one = run_backlogs(&events, &keys, 1).await;
    let in_rows = run_backlogs(&events, &keys, 8).await;
    assert_eq!(in_rows.0, one_by_one.0);
    assert_eq!(in_rows.1, one_by_one.1);
    use DeadLetterReason::{Duplicate, OutputRange};
    let reasons: Vec<Option<DeadLetterReason>> = in_rows.0.iter().map(|(_, r)| r.err()).collect();
    assert_eq!(reasons, [None, None, Some(OutputRange), None, None, Some(Duplicate), None]);
    assert_eq!(in_rows.2, (0, 1), "one fallback, nothing scored in a row");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_row_whose_worker_is_lost_goes_on_one_by_one() {
    // hot's row loses its worker on every attempt (the pool restarts the worker and retries the
    // row alone, then gives up: WorkerLost); its events then run one by one, where they score.
    let events = [("hot", 1, 1.0), ("hot", 2, LOSES_ROWS), ("hot", 3, 2.0), ("cold", 1, 1.0)];
    let keys = ["hot", "cold"];
    let one_by_one = run_backlogs(&events, &keys, 1).await;
    let in_rows = run_backlogs(&events, &keys, 8).await;
    assert!(one_by_one.0.iter().all(|(_, r)| r.is_ok()), "{:?}", one_by_one.0);
    assert_eq!(in_rows.0, one_by_one.0, "the same answers, offset by offset");
    assert_eq!(in_rows.1, one_by_one.1, "the same stored sequences and states");
    assert_eq!(in_rows.2, (0, 1), "one fallback, nothing scored in a row");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_write_bounds_the_outputs_produced_ahead_of_it() {
    let config = PartitionConfig { max_batch: 1, max_pending_batches: 1, ..PartitionConfig::default() };
    let mut h = Harness::start_with(64, config).await;
    h.store.hold_writes.store(true, Ordering::SeqCst);
    for k in 0..10 {
        h.send(&format!("k{k}"), 1, 1.0);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The batch being written, then at most 2 x max_pending_batches acknowledged and unwritten
    // (a group of two batches may find room for one only, and wait with its outputs out).
    let ahead = h.output_offsets().len();
    assert!((2..=4).contains(&ahead), "{ahead} outputs went out while the first write was held");
    h.store.hold_writes.store(false, Ordering::SeqCst);
    assert_eq!(h.drain().await, Some(Offset(9)));
    assert_eq!(h.output_offsets(), (0..10).collect::<Vec<_>>());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_state_is_written_before_its_outputs_are_acknowledged() {
    let mut h = Harness::start().await;
    h.sink.hold_acks.store(true, Ordering::SeqCst);
    h.send("a", 1, 1.0);
    wait_until(|| h.output_offsets() == [0]).await;
    h.send("a", 2, 2.0);
    // Both batches are computed; neither may be written while the first one's ack is held.
    tokio::time::sleep(Duration::from_millis(200)).await;
    h.assert_nothing_written("the outputs are not acknowledged");
    h.sink.hold_acks.store(false, Ordering::SeqCst);
    assert_eq!(h.drain().await, Some(Offset(1)));
    assert_eq!(h.output_offsets(), [0, 1]);
    assert_eq!(h.stored("a"), Some((2, vec![3.0, 3.0])));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_state_write_holds_back_the_offset_but_not_the_next_batchs_outputs() {
    let mut h = Harness::start().await;
    h.store.hold_writes.store(true, Ordering::SeqCst);
    h.send("a", 1, 1.0);
    wait_until(|| h.output_offsets() == [0]).await;
    // Batch 0's write is in flight (held); batch 1 is scored and its output goes out meanwhile.
    h.send("a", 2, 2.0);
    wait_until(|| h.output_offsets() == [0, 1]).await;
    h.assert_nothing_written("the first write is held");
    h.store.hold_writes.store(false, Ordering::SeqCst);
    assert_eq!(h.drain().await, Some(Offset(1)));
    let commits = h.sink.commits.lock().unwrap().clone();
    assert_eq!(commits.last(), Some(&Offset(2)));
    assert!(commits.windows(2).all(|w| w[0] < w[1]), "commits in offset order: {commits:?}");
    // The second event read the first one's state while that was still unwritten.
    assert_eq!(h.stored("a"), Some((2, vec![3.0, 3.0])));
    let scores: Vec<f32> = h
        .outputs()
        .iter()
        .map(|o| match o {
            Out::Score(s) => s.score,
            Out::Dead(d) => panic!("{d:?}"),
        })
        .collect();
    assert_eq!(scores, [1.0, 4.0]);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_applied_above_the_applied_offset_is_not_applied_again_after_a_restart() {
    // A previous owner applied offsets 0-1 (hot) and 4 (cold, ahead of the held hot records 2-3)
    // and stored applied offset 1: the cold key's state carries offset 4.
    let store = Arc::new(MemStore::default());
    let cold = Sequenced { sequence: 1, window: 0, offset: Some(Offset(4)), state: vec![1.0, 1.0] };
    let hot = Sequenced { sequence: 2, window: 0b1, offset: Some(Offset(1)), state: vec![2.0, 2.0] };
    for (key, s) in [("cold", &cold), ("hot", &hot)] {
        store.data.lock().unwrap().insert((P, key.as_bytes().to_vec()), StateValue::sequenced(s));
    }
    let mut h = Harness::start_full(store, 64, PartitionConfig::default(), Some(Offset(1))).await;
    // Redelivered from offset 2 on: hot 3, hot 4, cold 1 (again), then a new cold event.
    h.send_all(&[("hot", 3, 1.0), ("hot", 4, 1.0), ("cold", 1, 1.0), ("cold", 2, 1.0)]);
    assert_eq!(h.drain().await, Some(Offset(5)));
    // Offset 4 has no second output (not even a DUPLICATE dead letter) and no second effect.
    assert_eq!(h.output_offsets(), [2, 3, 5]);
    assert!(h.outputs().iter().all(|o| reason(o).is_none()), "{:?}", h.outputs());
    assert_eq!(h.stored("cold"), Some((2, vec![2.0, 2.0])));
    assert_eq!(h.stored("hot"), Some((4, vec![4.0, 4.0])));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_is_backpressure_not_a_deadline_miss() {
    // Each request takes 300 ms on the one worker, the deadline is 500 ms: the third of three
    // concurrent events waits 600 ms, for room in the pool (one slot) or in the worker's queue
    // (64 slots), and must still be scored at its first attempt: the deadline times the run, not
    // the wait.
    for slots in [1, 64] {
        let config = PartitionConfig {
            infer_deadline: Duration::from_millis(500),
            max_attempts: 1,
            ..PartitionConfig::default()
        };
        let mut h = Harness::start_with(slots, config).await;
        for key in ["a", "b", "c"] {
            h.send(key, 1, SLOW);
        }
        h.drain().await;
        let reasons: Vec<Option<DeadLetterReason>> = h.outputs().iter().map(reason).collect();
        assert_eq!(reasons, [None, None, None], "{slots} slots: {:?}", h.outputs());
        h.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_stops_computing_at_its_deadline_and_leaves_the_rest_to_be_read_again() {
    // Batches of 2 events that take 600 ms each; the drain may compute for 1 s.
    let config = PartitionConfig { max_batch: 2, ..PartitionConfig::default() };
    let mut h = Harness::start_with(1, config).await;
    for i in 0..10 {
        h.send(&format!("k{i}"), 1, SLOW);
    }
    drop(h.tx.take());
    let until = Instant::now() + Duration::from_secs(1);
    let far = Instant::now() + Duration::from_secs(60);
    let applied = ractor::call_t!(h.actor, PartitionMsg::Drain, 20_000, until, far).unwrap();
    let applied = applied.expect("the batches computed before the deadline were written");
    assert!(applied.0 < 9, "stopped computing at the deadline: applied {applied:?} of 0..=9");
    assert_eq!(h.outputs().len() as i64, applied.0 + 1, "outputs exactly up to the applied offset");
    h.stop().await;
}

#[test]
fn records_over_the_limits_are_cut_down_before_they_are_queued() {
    let limits = Limits::default();
    let value = vec![7u8; 100_000];
    let key = vec![b'k'; 10_000];
    let mut headers: Vec<(String, Vec<u8>)> = (0..40).map(|i| (format!("h{i}"), vec![0; 10])).collect();
    headers.push((
        HEADER_TRACEPARENT.into(),
        b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_vec(),
    ));
    let rec = InputRecord::bounded(Arc::from("in"), P, Offset(5), Some(&key), Some(&value), headers, &limits);
    assert_eq!(rec.value.as_ref().map(Vec::len), Some(DEAD_LETTER_PREFIX), "only a prefix is queued");
    assert_eq!(rec.key.as_ref().map(Vec::len), Some(DEAD_LETTER_PREFIX));
    assert_eq!(rec.headers.len(), 1, "only the trace context stays");
    assert_eq!(rec.trimmed.key_len, Some(10_000));
    assert_eq!(rec.trimmed.headers.map(|(n, _)| n), Some(41));
    assert!(rec.size() < 3 * DEAD_LETTER_PREFIX, "{} bytes queued", rec.size());
    let rejection = decode::decode(&rec, &limits, |_| None, 0).unwrap_err();
    assert_eq!(rejection.reason, DeadLetterReason::Headers, "{rejection:?}");
    // The dead letter still describes the whole value.
    let out = dead_letter(&rec, DeadLetterReason::TooLarge, "", 1, &limits);
    let d = DeadLetter::decode(out.value.as_slice()).unwrap();
    assert_eq!((d.value_len, d.value.len(), d.key_len), (100_000, DEAD_LETTER_PREFIX, 10_000));
    assert_eq!(d.value_sha256, Sha256::digest(&value).to_vec());
    assert!(d.truncated);
    // Within the limits nothing is cut.
    let small = InputRecord::bounded(Arc::from("in"), P, Offset(6), Some(b"k"), Some(b"v"), vec![], &limits);
    assert_eq!((small.size(), small.trimmed), (2, Trimmed::default()));
}
