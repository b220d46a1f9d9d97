//! Helpers for the end-to-end tests: `partita node` as a child process on either state backend,
//! a producer that remembers where each record landed, and the checker's expectations.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use partita_runtime::loadgen::{GenRecord, send};
use partita_runtime::local::cassandra::DATACENTER;
use partita_runtime::node::NodeOptions;
use partita_runtime::state::{Backend, NodeStore};
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

/// Where a test node keeps its state: RocksDB in `dir`, or (backend cql) a keyspace of its own on
/// the test binary's local Cassandra. Node logs go next to `dir` either way.
#[derive(Debug, Clone)]
pub struct TestStore {
    pub backend: Backend,
    pub dir: PathBuf,
    cql: Option<(String, String)>,
}

impl TestStore {
    pub async fn new(backend: Backend, dir: &Path) -> Self {
        let cql = match backend {
            Backend::Rocksdb => None,
            Backend::Cql => Some((crate::cassandra().await.uri(), crate::unique_keyspace("pipeline"))),
        };
        Self { backend, dir: dir.to_path_buf(), cql }
    }

    /// The flags of `partita node` that select this store (what [`NodeOptions::local_cql`] sets).
    pub fn node_args(&self) -> Vec<String> {
        let mut args = vec!["--state-dir".to_owned(), self.dir.display().to_string()];
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
        let log = store.dir.with_extension("log");
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("node log file");
        let log_start = file.metadata().expect("node log file").len();
        let child = Command::new(partita_bin())
            .arg("node")
            .args(["--ingestion-bootstrap", bootstrap])
            .args(store.node_args())
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
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
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
    let producer: BaseProducer<Landed> = partita_runtime::kafka::client_config(bootstrap)
        // As users run producers: idempotent (acks=all, order kept per partition across retries).
        .set("enable.idempotence", "true")
        .set("linger.ms", "1")
        .create_with_context(Landed(Mutex::new(vec![None; records.len()])))
        .expect("test producer");
    for (i, rec) in records.iter().enumerate() {
        send(&producer, INPUT, rec, Box::new(i)).expect("produce");
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(30)).expect("flush");
    let landed = producer.context().0.lock().unwrap().clone();
    landed.into_iter().map(|l| l.expect("every record acknowledged")).collect()
}

/// `GET path` on `addr` over plain HTTP/1.1: (status, body). `None` if nothing listens yet.
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let status = raw.split_whitespace().nth(1)?.parse().ok()?;
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Some((status, body))
}

/// The value of the series `name{labels...}` in a Prometheus text exposition (labels may be a
/// subset of the series' labels).
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (n, rest) = series.split_once('{').unwrap_or((series, ""));
        (n == name && labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
            .then(|| value.parse().ok())
            .flatten()
    })
}
