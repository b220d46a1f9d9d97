//! Helpers for the end-to-end tests: `partita node` as a child process on either state backend,
//! a producer that remembers where each record landed, and the checker's expectations.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use partita_actors::inference::InferRequest;
use partita_actors::state::{Epoch, PartitionId, StateStore};
use partita_proto::v1::Event;
use partita_runtime::inference::{DeviceChoice, InferenceOptions};
use partita_runtime::loadgen::{BAD_KINDS, GenRecord, Generator, Output, OutputReader, ReaderResult, send};
use partita_runtime::local::cassandra::DATACENTER;
pub use partita_runtime::local::scrape::{http_get, metric};
use partita_runtime::node::NodeOptions;
use partita_runtime::state::{Backend, NodeStore};
use prost::Message;
use rdkafka::ClientContext;
use rdkafka::producer::{BaseProducer, DeliveryResult, Producer, ProducerContext};

use crate::models_dir;

pub const INPUT: &str = "transactions";
pub const SCORES: &str = "scores";
pub const DLQ: &str = "transactions.dlq";

/// The `partita` binary of this build (cargo builds it for the workspace's tests).
pub fn partita_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>");
    let bin = dir.join("partita");
    assert!(bin.exists(), "{} not built: run `cargo test --workspace`", bin.display());
    bin
}

/// A node started with `FAILPOINTS` aborted at fail point `point` (its log says so). A binary
/// built without the feature ignores `FAILPOINTS`: said plainly, as that is the usual cause.
pub fn assert_crashed_at(status: Option<std::process::ExitStatus>, log: &str, point: &str) {
    let hint = if log.contains("fail points configured") {
        String::new()
    } else {
        format!(
            " ({} was built without fail points: `cargo build -p partita-runtime --features \
             partita-runtime/failpoints --bin partita`, as scripts/test.sh does)",
            partita_bin().display()
        )
    };
    assert!(status.is_some_and(|s| !s.success()), "fail point {point} did not fire{hint}: {status:?}\n{log}");
    assert!(log.contains(&format!("fail point {point}: aborting")), "{log}");
}

/// Where a test node keeps its state: RocksDB in `dir` (with a changelog topic, for several
/// nodes), or (backend cql) a keyspace of its own on the test binary's local Cassandra. Node logs
/// go next to `dir` either way.
#[derive(Debug, Clone)]
pub struct TestStore {
    pub backend: Backend,
    pub dir: PathBuf,
    cql: Option<(String, String)>,
    /// (bootstrap, changelog topic) when RocksDB state goes through a changelog.
    changelog: Option<(String, String)>,
}

impl TestStore {
    pub async fn new(backend: Backend, dir: &Path) -> Self {
        let cql = match backend {
            Backend::Rocksdb => None,
            Backend::Cql => Some((crate::cassandra().await.uri(), crate::unique_keyspace("pipeline"))),
        };
        Self { backend, dir: dir.to_path_buf(), cql, changelog: None }
    }

    /// RocksDB on each node, through the changelog `topic` on `bootstrap` (which must exist).
    pub fn with_changelog(dir: &Path, bootstrap: &str, topic: &str) -> Self {
        Self {
            backend: Backend::Rocksdb,
            dir: dir.to_path_buf(),
            cql: None,
            changelog: Some((bootstrap.to_owned(), topic.to_owned())),
        }
    }

    /// The flags of `partita node` that select this store (what [`NodeOptions::local_cql`] sets).
    pub fn node_args(&self) -> Vec<String> {
        self.node_args_in(&self.dir)
    }

    /// [`TestStore::node_args`] with RocksDB (or the unused state dir, for CQL) in `dir`.
    pub fn node_args_in(&self, dir: &Path) -> Vec<String> {
        let mut args = vec!["--state-dir".to_owned(), dir.display().to_string()];
        if let Some((_, topic)) = &self.changelog {
            args.extend(["--changelog-topic".to_owned(), topic.clone()]);
        }
        if let Some((uri, keyspace)) = &self.cql {
            args.extend(
                [
                    "--state-backend",
                    "cql",
                    "--cql-uri",
                    uri,
                    "--cql-keyspace",
                    keyspace,
                    "--cql-datacenter",
                    DATACENTER,
                    "--cql-replication",
                    &format!("{DATACENTER}=1"),
                ]
                .map(str::to_owned),
            );
        }
        args
    }

    /// The state the nodes left, to check: the store they wrote (after they stopped, for
    /// RocksDB), or with a changelog a fresh node's, restored from the changelog by claiming each
    /// of `partitions` (what the next owner of each partition would start from).
    pub async fn open_checked(&self, partitions: i32) -> NodeStore {
        let Some((bootstrap, topic)) = &self.changelog else { return self.open().await };
        let fresh = self.dir.with_file_name("restored-for-check");
        let mut o = NodeOptions::local(bootstrap, fresh);
        o.changelog_topic = topic.clone();
        let store = o.open_store().await.expect("opening a fresh changelog store");
        for p in 0..partitions {
            store.claim(PartitionId(p as u32), Epoch(1)).await.expect("restoring from the changelog");
        }
        store
    }

    /// Open the store the node wrote (after it stopped, for RocksDB).
    pub async fn open(&self) -> NodeStore {
        let mut o = NodeOptions::local("unused:9092", self.dir.clone());
        if let Some((uri, keyspace)) = &self.cql {
            o.local_cql(uri, keyspace);
        }
        o.open_store().await.expect("opening the test node's state store")
    }
}

/// `partita node` as a child process, logging to `<state dir>.log` (appended: a restarted node
/// writes after the previous run's lines; [`NodeProcess::log_text`] shows this run's only).
pub struct NodeProcess {
    pub child: Child,
    pub log: PathBuf,
    /// Length of the log file when this process started.
    log_start: u64,
}

impl NodeProcess {
    pub fn start(bootstrap: &str, store: &TestStore, extra: &[&str]) -> Self {
        Self::start_with_env(bootstrap, store, extra, &[])
    }

    /// Like [`NodeProcess::start`], with extra environment variables (failpoints).
    pub fn start_with_env(bootstrap: &str, store: &TestStore, extra: &[&str], env: &[(&str, &str)]) -> Self {
        Self::spawn(bootstrap, store, &store.dir, extra, env)
    }

    /// One of several nodes on `store`: its RocksDB directory (unused on CQL) is `<dir>-<name>`,
    /// its log `<dir>-<name>.log`.
    pub fn start_named(bootstrap: &str, store: &TestStore, name: &str, extra: &[&str]) -> Self {
        let dir = store.dir.with_file_name(format!(
            "{}-{name}",
            store.dir.file_name().and_then(|n| n.to_str()).unwrap_or("state")
        ));
        Self::spawn(bootstrap, store, &dir, extra, &[])
    }

    fn spawn(bootstrap: &str, store: &TestStore, dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let log = dir.with_extension("log");
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("node log file");
        let log_start = file.metadata().expect("node log file").len();
        let child = Command::new(partita_bin())
            .arg("node")
            .args(["--ingestion-bootstrap", bootstrap])
            .args(store.node_args_in(dir))
            .arg("--repository")
            .arg(models_dir())
            .args(extra)
            // Defaults a test may override. Tests run in parallel: each node picks a free port.
            .args(
                [
                    ("--device", "cpu"),
                    ("--intra-op-threads", "1"),
                    ("--session-timeout", "6s"),
                    ("--grace", "15s"),
                    ("--http-listen", "127.0.0.1:0"),
                    ("--grpc-listen", "127.0.0.1:0"),
                ]
                .iter()
                .filter(|(f, _)| !extra.contains(f))
                .flat_map(|(f, v)| [*f, *v]),
            )
            .env("RUST_LOG", "warn,partita=info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log handle"))
            .stderr(file)
            .spawn()
            .expect("starting partita node");
        Self { child, log, log_start }
    }

    /// What this process has logged so far (not earlier runs on the same state).
    pub fn log_text(&self) -> String {
        let all = std::fs::read(&self.log).unwrap_or_default();
        String::from_utf8_lossy(all.get(self.log_start as usize..).unwrap_or_default()).into_owned()
    }

    /// Wait until this run's log shows `n` partitions assigned.
    pub fn wait_assigned(&self, n: usize, within: Duration) {
        let deadline = Instant::now() + within;
        while self.log_text().matches("partition assigned").count() < n {
            assert!(
                Instant::now() < deadline,
                "node not assigned {n} partitions in {within:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM, then the exit status, or `None` if it did not exit within `grace` (then killed).
    pub fn terminate(mut self, grace: Duration) -> (Option<std::process::ExitStatus>, String) {
        self.signal("TERM");
        let deadline = Instant::now() + grace;
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for the node") {
                return (Some(status), self.log_text());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return (None, self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wait until the process exits on its own (a failpoint), within `within`.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(s) = self.child.try_wait().expect("waiting for the node") {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Send a signal (`TERM`, `STOP`, `CONT`, ...).
    pub fn signal(&self, name: &str) {
        let _ = Command::new("kill").args([&format!("-{name}"), &self.child.id().to_string()]).status();
    }

    /// SIGKILL (kill -9) and reap.
    pub fn kill9(mut self) {
        self.child.kill().expect("kill -9");
        self.child.wait().expect("reaping the node");
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A reader of the output topics from their ends, keeping every output.
pub fn reader(bootstrap: &str) -> OutputReader {
    OutputReader::start(bootstrap, SCORES, DLQ, true).expect("the output reader")
}

/// Where each record landed, by its index in the produced slice.
#[derive(Default)]
struct Landed(Mutex<Vec<Option<(i32, i64)>>>);

impl ClientContext for Landed {}
impl ProducerContext for Landed {
    type DeliveryOpaque = Box<usize>;
    fn delivery(&self, result: &DeliveryResult<'_>, index: Box<usize>) {
        use rdkafka::message::Message;
        let m = result.as_ref().expect("test records are delivered");
        self.0.lock().unwrap()[*index] = Some((m.partition(), m.offset()));
    }
}

/// Produce `records` in order (idempotent producer: order kept per partition across retries) and
/// return where each landed (partition, offset).
pub fn produce_tracked(bootstrap: &str, records: &[GenRecord]) -> Vec<(i32, i64)> {
    let mut each = records.iter().cloned();
    produce_at(bootstrap, records.len(), None, || each.next().expect("one per index")).1
}

/// What a producer sent, in order, and where each record landed (partition, offset).
pub type Produced = (Vec<GenRecord>, Vec<(i32, i64)>);

/// Steady load on a thread of its own: `n` records over `keys` keys (a share `bad_ratio` bad) at
/// `rate` per second, each generated as it is sent (its event time is its send time, so event
/// time to score is the pipeline's latency). Join for the records and where each landed.
pub fn produce_paced(
    bootstrap: &str,
    n: usize,
    keys: usize,
    bad_ratio: f64,
    seed: u64,
    rate: f64,
) -> std::thread::JoinHandle<Produced> {
    let bootstrap = bootstrap.to_owned();
    std::thread::spawn(move || {
        let mut g = Generator::new(seed, keys, 0.9, 16, bad_ratio, seed);
        produce_at(&bootstrap, n, Some(rate), || g.record(partita_actors::partition::unix_micros()))
    })
}

/// Produce `n` records from `next`, at `rate` per second if given; (the records, where each
/// landed).
fn produce_at(bootstrap: &str, n: usize, rate: Option<f64>, mut next: impl FnMut() -> GenRecord) -> Produced {
    let started = Instant::now();
    let producer: BaseProducer<Landed> = partita_runtime::kafka::client_config(bootstrap)
        // As users run producers: idempotent (acks=all, order kept per partition across retries).
        .set("enable.idempotence", "true")
        .set("linger.ms", "1")
        .create_with_context(Landed(Mutex::new(vec![None; n])))
        .expect("test producer");
    let mut records = Vec::with_capacity(n);
    for i in 0..n {
        if let Some(rate) = rate {
            let due = started + Duration::from_secs_f64(i as f64 / rate);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
        }
        let rec = next();
        send(&producer, INPUT, &rec, Box::new(i)).expect("produce");
        records.push(rec);
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(30)).expect("flush");
    let landed = producer.context().0.lock().unwrap().clone();
    (records, landed.into_iter().map(|l| l.expect("every record acknowledged")).collect())
}

pub fn records(n: usize, keys: usize, bad_ratio: f64, seed: u64) -> Vec<GenRecord> {
    let mut g = Generator::new(seed, keys, 0.9, 16, bad_ratio, seed);
    let now = partita_actors::partition::unix_micros();
    (0..n).map(|_| g.record(now)).collect()
}

/// Wait until the reader has outputs for `n` distinct source records (the reader keeps reading).
pub fn wait_unique(reader: &OutputReader, n: u64, within: Duration, node_log: impl Fn() -> String) {
    let deadline = Instant::now() + within;
    while reader.unique() < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} records answered within {within:?}; node log:\n{}",
            reader.unique(),
            node_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Read outputs until `n` distinct source records are answered.
pub fn wait_answered(
    reader: OutputReader,
    n: u64,
    within: Duration,
    node_log: impl Fn() -> String,
) -> ReaderResult {
    wait_unique(&reader, n, within, node_log);
    // Anything still in flight (a duplicate) shows up within a moment.
    std::thread::sleep(Duration::from_millis(500));
    reader.finish()
}

/// The checker: every record answered by exactly the right output, every score equal to a
/// one-by-one replay on the real model, per-key order in the outputs, and the stored state and
/// applied offsets equal to that replay. Returns the number of duplicate outputs.
pub async fn check(
    records: &[GenRecord],
    landed: &[(i32, i64)],
    seen: &ReaderResult,
    store: &TestStore,
    partitions: i32,
) -> u64 {
    let mut by_source: HashMap<(i32, i64), Vec<&Output>> = HashMap::new();
    for (p, o, out) in &seen.outputs {
        by_source.entry((*p, *o)).or_default().push(out);
    }
    // The replay: every good event scored alone (no batching), in production order, each with the
    // state the previous one of its key left. A key maps to one partition, and the idempotent
    // producer keeps production order within a partition, so this is offset order per key.
    let replay = InferenceOptions {
        repository: models_dir(),
        device: DeviceChoice::Cpu,
        intra_op_threads: 1,
        no_batching: true,
        ..Default::default()
    };
    let (pool, _) = replay.start().await.unwrap();
    let router = pool.router();
    let mut expected: HashMap<Vec<u8>, (i32, u64, Vec<f32>)> = HashMap::new();
    let mut expected_score: HashMap<(i32, i64), f32> = HashMap::new();
    for (rec, source) in records.iter().zip(landed) {
        if rec.bad.is_some() {
            continue;
        }
        let e = Event::decode(rec.value.as_slice()).unwrap();
        let entry = expected.entry(e.key.clone()).or_insert((source.0, 0, Vec::new()));
        let state = (!entry.2.is_empty()).then(|| entry.2.clone());
        let out = router
            .infer(InferRequest { model: Arc::from("fraud_gru"), features: e.features, state })
            .await
            .unwrap();
        expected_score.insert(*source, out.score);
        *entry = (source.0, e.sequence, out.new_state);
    }
    pool.shutdown().await;

    // INV-1 and INV-2: each input has an output, the right one; copies (at least once) agree.
    let mut duplicates = 0;
    for (i, (rec, source)) in records.iter().zip(landed).enumerate() {
        let outs = by_source.get(source).unwrap_or_else(|| panic!("record {i} at {source:?} has no output"));
        duplicates += outs.len() as u64 - 1;
        for out in outs {
            match (rec.bad, out) {
                (None, Output::Score(s)) => {
                    let e = Event::decode(rec.value.as_slice()).unwrap();
                    assert_eq!(
                        (&s.key, s.sequence),
                        (&e.key, e.sequence),
                        "record {i}: score of the wrong event"
                    );
                    let want = expected_score[source];
                    assert!(
                        (s.score - want).abs() < 1e-4,
                        "record {i} at {source:?}: score {} but the one-by-one replay gives {want}",
                        s.score
                    );
                }
                (Some(k), Output::DeadLetter(d)) => {
                    assert_eq!(
                        d.reason().as_str_name(),
                        BAD_KINDS[k].1,
                        "record {i} ({}): {}",
                        BAD_KINDS[k].0,
                        d.detail
                    );
                    assert_eq!((d.source_partition, d.source_offset), *source);
                    assert!(!d.detail.is_empty());
                }
                (bad, out) => panic!("record {i} (bad kind {bad:?}) got the wrong output: {out:?}"),
            }
        }
    }
    // INV-3: per key, the scores come out in source-offset order (a key's scores share an output
    // partition, which the reader reads in order; a repeat after a crash is a copy of a source
    // already seen and is skipped).
    let mut first_seen: std::collections::HashSet<(i32, i64)> = std::collections::HashSet::new();
    let mut last_offset: HashMap<Vec<u8>, i64> = HashMap::new();
    for (p, o, out) in &seen.outputs {
        if let Output::Score(s) = out
            && first_seen.insert((*p, *o))
            && let Some(prev) = last_offset.insert(s.key.clone(), *o)
        {
            assert!(
                prev < *o,
                "key {}: the score of offset {o} came out after that of offset {prev}",
                String::from_utf8_lossy(&s.key)
            );
        }
    }

    // Stored state == the replay's, every element and the length.
    let store = store.open_checked(partitions).await;
    for (key, (p, seq, state)) in &expected {
        let stored = store.read(PartitionId(*p as u32), std::slice::from_ref(key)).await.unwrap();
        let stored = stored[0].as_ref().expect("key has state").to_sequenced().unwrap();
        let (stored_seq, stored_state) = (stored.sequence, stored.state);
        let k = String::from_utf8_lossy(key);
        assert_eq!(stored_seq, *seq, "key {k}: last applied sequence");
        assert_eq!(stored_state.len(), state.len(), "key {k}: stored state length");
        for (a, b) in stored_state.iter().zip(state) {
            assert!((a - b).abs() < 1e-3, "key {k}: stored state {a} vs replay {b}");
        }
    }
    // INV-4: each partition's stored applied offset is its last input offset.
    for p in 0..partitions {
        let last = landed.iter().filter(|(lp, _)| *lp == p).map(|(_, o)| *o).max();
        let meta = store.meta(PartitionId(p as u32)).await.unwrap();
        assert_eq!(meta.applied_offset.map(|o| o.0), last, "partition {p}: stored applied offset");
    }
    duplicates
}
