//! Apache Kafka on loopback: 1 or N combined KRaft nodes (broker + controller) with a static
//! quorum, each with its own ports, log dir and `broker.rack`, formatted by us, ready when metadata
//! lists every broker, and restartable on the same log dirs (chaos tests kill -9 a node and start
//! it again). Sized for a 2-core machine: small heaps, few threads and internal-topic partitions,
//! no initial rebalance delay. Topics are created with [`create_topics`].

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::BaseConsumer;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::{BaseProducer, Producer};

use super::{DataDir, JvmCommand, JvmProcess, free_port, write_file};

/// How to start a local Kafka cluster.
#[derive(Debug, Clone)]
pub struct KafkaOptions {
    /// Combined broker + controller nodes (node ids 1..=nodes); all of them vote.
    pub nodes: usize,
    /// `broker.rack` of node i is `racks[i % len]` (zones); none when empty.
    pub racks: Vec<String>,
    /// Where the nodes keep their log dirs, configs and logs; a temporary folder when `None`.
    pub dir: Option<PathBuf>,
    /// JVM heap per node (`-Xmx`).
    pub heap: String,
}

impl Default for KafkaOptions {
    fn default() -> Self {
        Self { nodes: 1, racks: Vec::new(), dir: None, heap: "512m".into() }
    }
}

#[derive(Debug)]
struct KafkaNode {
    id: usize,
    port: u16,
    rack: Option<String>,
    command: JvmCommand,
    process: Option<JvmProcess>,
}

/// A Kafka cluster started by us. Dropping it kills every node.
#[derive(Debug)]
pub struct LocalKafka {
    nodes: Vec<KafkaNode>,
    /// `127.0.0.1:port,...` of every node.
    pub bootstrap: String,
    pub cluster_id: String,
    dir: DataDir,
}

const LOG4J2: &str = "\
rootLogger.level=WARN
rootLogger.appenderRef.out.ref=OUT
appender.out.type=Console
appender.out.name=OUT
appender.out.layout.type=PatternLayout
appender.out.layout.pattern=[%d] %p %m (%c)%n
logger.started.name=kafka.server.KafkaRaftServer
logger.started.level=INFO
";

impl LocalKafka {
    /// Format and start the nodes, and wait until metadata lists every broker. Blocking: call
    /// from a plain thread or `spawn_blocking` (or use [`LocalKafka::start`]).
    pub fn start_blocking(opts: &KafkaOptions) -> anyhow::Result<Self> {
        anyhow::ensure!(opts.nodes >= 1, "a Kafka cluster needs at least one node");
        let dir = DataDir::new(opts.dir.clone(), "partita-kafka-")?;
        let n = opts.nodes;
        let ports: Vec<(u16, u16)> =
            (0..n).map(|_| Ok((free_port()?, free_port()?))).collect::<std::io::Result<_>>()?;
        let voters: Vec<String> =
            ports.iter().enumerate().map(|(i, (_, c))| format!("{}@127.0.0.1:{c}", i + 1)).collect();
        let log4j = dir.path().join("log4j2.properties");
        write_file(&log4j, LOG4J2)?;
        let cluster_id = new_cluster_id();
        let mut nodes = Vec::with_capacity(n);
        for (i, (port, controller)) in ports.iter().enumerate() {
            let id = i + 1;
            let home = dir.path().join(format!("kafka-{id}"));
            let rack = (!opts.racks.is_empty()).then(|| opts.racks[i % opts.racks.len()].clone());
            let config = home.join("server.properties");
            write_file(
                &config,
                &server_properties(id, *port, *controller, &voters, n, rack.as_deref(), &home),
            )?;
            let jvm_flags = vec![
                "-Xms256m".into(),
                format!("-Xmx{}", opts.heap),
                "-XX:+UseG1GC".into(),
                "-XX:MaxGCPauseMillis=20".into(),
                "-XX:+ExitOnOutOfMemoryError".into(),
                "-Djava.awt.headless=true".into(),
                format!("-Dlog4j2.configurationFile={}", log4j.display()),
                format!("-Dkafka.logs.dir={}", home.display()),
            ];
            let format = JvmCommand {
                jars: "kafka",
                main_class: "kafka.tools.StorageTool",
                jvm_flags: jvm_flags.clone(),
                args: vec![
                    "format".into(),
                    "--ignore-formatted".into(),
                    "-t".into(),
                    cluster_id.clone(),
                    "-c".into(),
                    config.display().to_string(),
                ],
                log: home.join("format.log"),
            };
            let command = JvmCommand {
                jars: "kafka",
                main_class: "kafka.Kafka",
                jvm_flags,
                args: vec![config.display().to_string()],
                log: dir.path().join(format!("kafka-{id}.log")),
            };
            nodes.push((format, KafkaNode { id, port: *port, rack, command, process: None }));
        }
        // Format every log dir (one JVM each, in parallel).
        std::thread::scope(|s| {
            let runs: Vec<_> =
                nodes.iter().map(|(f, _)| s.spawn(move || f.run(Duration::from_secs(120)))).collect();
            runs.into_iter().try_for_each(|r| r.join().map_err(|_| anyhow::anyhow!("format panicked"))?)
        })
        .context("formatting the Kafka log dirs")?;
        let nodes: Vec<KafkaNode> = nodes.into_iter().map(|(_, node)| node).collect();
        let bootstrap = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect::<Vec<_>>().join(",");
        let mut kafka = Self { nodes, bootstrap, cluster_id, dir };
        for node in &mut kafka.nodes {
            node.process = Some(node.command.spawn()?);
        }
        kafka.wait_ready(Duration::from_secs(90))?;
        Ok(kafka)
    }

    /// [`LocalKafka::start_blocking`] on the blocking pool.
    pub async fn start(opts: KafkaOptions) -> anyhow::Result<Self> {
        tokio::task::spawn_blocking(move || Self::start_blocking(&opts)).await?
    }

    /// Wait until every running node answers a metadata request on its own address that lists
    /// every running node as a broker (a node killed moments ago may still be listed by the
    /// others, so asking the cluster as a whole is not enough).
    fn wait_ready(&mut self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        let expected: Vec<i32> =
            self.nodes.iter().filter(|n| n.process.is_some()).map(|n| n.id as i32).collect();
        loop {
            for node in &mut self.nodes {
                if let Some(p) = &mut node.process {
                    p.check_running(&format!("Kafka node {}", node.id))?;
                }
            }
            let up = self
                .nodes
                .iter()
                .filter(|n| n.process.is_some())
                .map(|n| broker_ids(&format!("127.0.0.1:{}", n.port)))
                .reduce(|a, b| a.into_iter().filter(|id| b.contains(id)).collect())
                .unwrap_or_default();
            if expected.iter().all(|id| up.contains(id)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "Kafka on {} did not list brokers {expected:?} within {within:?} (listed {up:?}); logs in {}",
                    self.bootstrap,
                    self.dir.path().display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The broker ids the cluster's metadata lists now (empty if nothing answers).
    pub fn broker_ids(&self) -> Vec<i32> {
        broker_ids(&self.bootstrap)
    }

    /// Node `i`'s (0-based) client address.
    pub fn node_address(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.nodes[i].port)
    }

    pub fn nodes(&self) -> usize {
        self.nodes.len()
    }

    /// (node id, address, rack, pid) of each node; pid `None` while stopped.
    pub fn describe(&self) -> Vec<(usize, String, Option<String>, Option<u32>)> {
        self.nodes
            .iter()
            .map(|n| {
                (
                    n.id,
                    format!("127.0.0.1:{}", n.port),
                    n.rack.clone(),
                    n.process.as_ref().map(JvmProcess::pid),
                )
            })
            .collect()
    }

    /// The replication factor topics get: 3, or fewer on a smaller cluster.
    pub fn replication(&self) -> i32 {
        self.nodes.len().min(3) as i32
    }

    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// SIGKILL node `i` (0-based), as a crash would.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.nodes[i].process.take() {
            p.kill();
        }
    }

    /// Start node `i` again on its log dir and wait until it is a broker again. Blocking.
    pub fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.kill(i);
        self.nodes[i].process = Some(self.nodes[i].command.spawn()?);
        self.wait_ready(Duration::from_secs(90))
    }

    /// Stop every node (SIGTERM to all at once; SIGKILL after 20 s). Blocking.
    pub fn stop_blocking(mut self) {
        JvmProcess::stop_all(
            self.nodes.iter_mut().filter_map(|n| n.process.as_mut()),
            Duration::from_secs(20),
        );
    }

    /// [`LocalKafka::stop_blocking`] on the blocking pool.
    pub async fn stop(self) {
        let _ = tokio::task::spawn_blocking(move || self.stop_blocking()).await;
    }
}

/// The broker ids that metadata from `bootstrap` lists (empty if nothing answers).
fn broker_ids(bootstrap: &str) -> Vec<i32> {
    let Ok(p) = crate::kafka::client_config(bootstrap).create::<BaseProducer>() else {
        return Vec::new();
    };
    p.client()
        .fetch_metadata(None, Duration::from_millis(1000))
        .map(|m| m.brokers().iter().map(|b| b.id()).collect())
        .unwrap_or_default()
}

/// A Kafka cluster id: 16 bytes, base64url without padding (what `kafka-storage random-uuid`
/// prints), first character a letter so no tool reads it as a flag.
fn new_cluster_id() -> String {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    let mut bytes = (nanos ^ (u128::from(std::process::id()) << 96)).to_be_bytes();
    bytes[0] &= 0x7f;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn server_properties(
    id: usize,
    port: u16,
    controller: u16,
    voters: &[String],
    n: usize,
    rack: Option<&str>,
    home: &std::path::Path,
) -> String {
    let rf = n.min(3);
    let min_isr = n.min(2);
    let mut p = format!(
        "process.roles=broker,controller
node.id={id}
controller.quorum.voters={voters}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs={logs}
num.partitions=1
default.replication.factor={rf}
min.insync.replicas={min_isr}
offsets.topic.replication.factor={rf}
offsets.topic.num.partitions=4
transaction.state.log.replication.factor={rf}
transaction.state.log.min.isr={min_isr}
transaction.state.log.num.partitions=4
group.initial.rebalance.delay.ms=0
# Let consumers choose sessions down to 1 s (default floor 6 s): partita's failover time is
# about its session timeout.
group.min.session.timeout.ms=1000
auto.create.topics.enable=false
num.network.threads=2
num.io.threads=2
num.replica.fetchers=1
background.threads=2
log.cleaner.threads=1
broker.heartbeat.interval.ms=1000
broker.session.timeout.ms=4000
replica.lag.time.max.ms=5000
replica.selector.class=org.apache.kafka.common.replica.RackAwareReplicaSelector
",
        voters = voters.join(","),
        logs = home.join("data").display(),
    );
    if let Some(rack) = rack {
        p.push_str(&format!("broker.rack={rack}\n"));
    }
    p
}

/// Create `topics` (name, partitions) with `replication` replicas each; existing topics are left
/// as they are. Returns once every partition has a leader that answers.
pub async fn create_topics(bootstrap: &str, topics: &[(&str, i32)], replication: i32) -> anyhow::Result<()> {
    create_topics_with(bootstrap, topics, replication, &[]).await
}

/// The topic configuration of a changelog: compacted (the latest state of each key stays).
pub const CHANGELOG_CONFIG: &[(&str, &str)] = &[("cleanup.policy", "compact")];

/// [`create_topics`] with topic-level `config` (e.g. [`CHANGELOG_CONFIG`]).
pub async fn create_topics_with(
    bootstrap: &str,
    topics: &[(&str, i32)],
    replication: i32,
    config: &[(&str, &str)],
) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> =
        crate::kafka::client_config(bootstrap).create().context("creating an admin client")?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(name, n)| {
            config
                .iter()
                .fold(NewTopic::new(name, *n, TopicReplication::Fixed(replication)), |t, (k, v)| t.set(k, v))
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin.create_topics(&new, &opts).await.context("creating topics")? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, e)) => bail!("creating topic {name}: {e}"),
        }
    }
    // Created is not yet led: a partition answers NotLeaderForPartition until its leader has
    // taken over. Return when every partition answers a watermark request.
    let consumer: BaseConsumer =
        crate::kafka::client_config(bootstrap).create().context("creating a consumer")?;
    let topics: Vec<(String, i32)> = topics.iter().map(|(t, n)| ((*t).to_owned(), *n)).collect();
    tokio::task::spawn_blocking(move || {
        for (topic, n) in &topics {
            for p in 0..*n {
                crate::kafka::watermarks(&consumer, topic, p, Duration::from_secs(30))?;
            }
        }
        anyhow::Ok(())
    })
    .await?
}
