//! Helpers shared by the benchmark binaries.

/// Logs to stderr, `warn` and up unless `RUST_LOG` says otherwise (stdout carries the results).
pub fn init_logs() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// The short git revision of the working tree, for `RESULT` lines.
pub fn git_rev() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map_or_else(|| "unknown".into(), |s| s.trim().to_owned())
}

use std::time::Duration;

use partita_runtime::inference::remote::WorkerEndpoint;
use partita_runtime::loadgen::LoadgenOptions;
use partita_runtime::local::kafka::{KafkaOptions, LocalKafka, create_topics};
use partita_runtime::node::grpc::Security;
use partita_runtime::node::{Node, NodeOptions, Role};

/// The input, scores and dead-letter topics of the end-to-end benchmarks.
pub const TOPICS: (&str, &str, &str) = ("transactions", "scores", "transactions.dlq");

/// A fresh one-node Apache Kafka with [`TOPICS`] (`partitions` each, one for dead letters): a run
/// never inherits another's records or log.
pub async fn fresh_broker(partitions: i32) -> anyhow::Result<LocalKafka> {
    let broker = LocalKafka::start(KafkaOptions::default()).await?;
    let b = broker.bootstrap.clone();
    create_topics(&b, &[(TOPICS.0, partitions), (TOPICS.1, partitions), (TOPICS.2, 1)], 1).await?;
    Ok(broker)
}

/// Load generator settings on [`TOPICS`] for `seconds` at `rate`, plain progress lines.
pub fn load_options(bootstrap: &str, rate: f64, seconds: f64, drain: Duration) -> LoadgenOptions {
    let mut o = LoadgenOptions::local(bootstrap);
    (o.topic, o.scores_topic, o.dlq_topic) = (TOPICS.0.into(), TOPICS.1.into(), TOPICS.2.into());
    o.rate = rate;
    o.duration = Duration::from_secs_f64(seconds);
    o.plain = true;
    o.drain = drain;
    o
}

/// `partita node` in process on [`TOPICS`] (RocksDB state in a temporary directory), once it
/// owns every partition; with `split`, as role scorer with its inference on a role-worker node
/// of the same settings (plaintext gRPC on loopback).
pub struct NodeUnderTest {
    pub node: Node,
    worker: Option<Node>,
    _dir: tempfile::TempDir,
}

impl NodeUnderTest {
    pub async fn start(
        bootstrap: &str,
        partitions: i32,
        split: bool,
        tweak: impl FnOnce(&mut NodeOptions),
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut opts = NodeOptions::local(bootstrap, dir.path().join("state"));
        tweak(&mut opts);
        let worker = if split {
            let mut w = opts.clone();
            w.role = Role::Worker;
            w.grpc_security = Some(Security::Plaintext);
            let worker = Node::start(&w).await?;
            let since = std::time::Instant::now();
            while !worker.health.ready() {
                anyhow::ensure!(since.elapsed() < Duration::from_secs(60), "the worker node never got ready");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            opts.role = Role::Scorer;
            opts.inference.worker_security = Some(Security::Plaintext);
            opts.inference.worker_endpoints = vec![WorkerEndpoint {
                zone: opts.zone.clone(),
                host: worker.grpc.ip().to_string(),
                port: worker.grpc.port(),
            }];
            Some(worker)
        } else {
            None
        };
        let node = Node::start(&opts).await?;
        let since = std::time::Instant::now();
        while node.assigned() < i64::from(partitions) {
            anyhow::ensure!(since.elapsed() < Duration::from_secs(60), "the node never got its partitions");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Self { node, worker, _dir: dir })
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        self.node.stop().await?;
        if let Some(worker) = self.worker {
            worker.stop().await?;
        }
        Ok(())
    }
}
