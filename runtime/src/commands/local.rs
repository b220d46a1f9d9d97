//! `partita local`: a whole cluster on loopback, started by one command and shown while it runs.
//! Kafka brokers (`broker.rack` = zone), Cassandra nodes (one rack per zone) for the shared state,
//! `partita node` processes spread over the zones (`client.rack`, the metrics' `zone`, the CQL
//! driver's preferred rack), with `--workers-per-zone` inference worker nodes that the nodes
//! (then scorers) send their inference to, and the load generator. It prints what runs where, then a status
//! line per node (partitions, rate, p99, lag, from each node's `/metrics`) that a person can watch
//! while killing a pid by hand. Ctrl-C stops everything it started.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::loadgen::{LoadgenOptions, run as run_load};
use crate::local::cassandra::{CassandraOptions, DATACENTER, LocalCassandra};
use crate::local::kafka::{CHANGELOG_CONFIG, KafkaOptions, LocalKafka, create_topics, create_topics_with};
use crate::local::scrape::{http_get, label, series};
use crate::local::{DataDir, free_port, log_tail};
use crate::node::Role;
use crate::state::Backend;
use clap::ValueEnum as _;

#[derive(Debug, clap::Args)]
pub struct LocalArgs {
    /// partita nodes.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Inference worker nodes (role worker) per zone; with any, the nodes are scorers (role
    /// scorer) that send their inference to them over gRPC, their own zone's first.
    #[arg(long, default_value_t = 0)]
    pub workers_per_zone: usize,
    /// Zones: nodes, brokers and Cassandra nodes are spread over them round-robin.
    #[arg(long, value_delimiter = ',', default_value = "a,b,c")]
    pub zones: Vec<String>,
    /// Kafka brokers (default: 3 for a cluster, 1 for a single node).
    #[arg(long)]
    pub brokers: Option<usize>,
    /// Where per-key state lives: cql (Cassandra nodes, the store every node shares; the default
    /// for a cluster) or rocksdb (on each node's disk; with several nodes through a changelog
    /// topic, which a node restores a partition from when it gets it).
    #[arg(long, value_enum)]
    pub state: Option<Backend>,
    /// Cassandra nodes for `--state cql` (default: one per zone, at most 3).
    #[arg(long)]
    pub cassandra_nodes: Option<usize>,
    /// Partitions of the input and score topics (default: 4 per node).
    #[arg(long)]
    pub partitions: Option<i32>,
    /// Events per second from the load generator (0: no load).
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,
    /// How long the load runs; 0 = until Ctrl-C.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    pub duration: Duration,
    /// Distinct keys (cards) of the load.
    #[arg(long, default_value_t = 100_000)]
    pub keys: usize,
    /// The nodes' consumer-group session timeout: a killed node's partitions move after about
    /// this long.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "3s")]
    pub session_timeout: Duration,
    /// Seconds between status lines.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    pub every: Duration,
    /// The model repository the nodes serve.
    #[arg(long, default_value = "models")]
    pub repository: PathBuf,
    /// Keep the servers' data and the nodes' logs here (default: a temporary folder, removed).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// An extra flag for every node, e.g. `--node-arg=--max-batch=256` (repeatable).
    #[arg(long = "node-arg", allow_hyphen_values = true)]
    pub node_args: Vec<String>,
}

/// One `partita node` child process.
struct LocalNode {
    name: String,
    zone: String,
    /// A worker node (role worker): it serves inference, owns no partitions.
    worker: bool,
    http: String,
    grpc: String,
    log: PathBuf,
    child: Child,
    /// Held open: the node exits when it closes (`PARTITA_EXIT_WITH_STDIN`), so no node
    /// outlives `partita local`, kill -9 included.
    _stdin: Option<ChildStdin>,
    /// The last scrape: when, records received, latency histogram buckets.
    last: Option<(Instant, f64, BTreeMap<String, f64>)>,
}

impl LocalNode {
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// One status line from the node's `/metrics` (rates and p99 since the previous line).
    fn status(&mut self) -> String {
        let head = format!("  {:<8} zone {:<4} pid {:<8}", self.name, self.zone, self.child.id());
        if let Some(status) = self.exited() {
            return format!("{head} EXITED ({status})");
        }
        let Some((200, text)) = http_get(&self.http, "/metrics") else {
            return format!("{head} not answering on {}", self.http);
        };
        let ready =
            http_get(&self.http, "/readyz").map(|(_, body)| body.trim().to_owned()).unwrap_or_default();
        // The zone the node itself reports (its metrics' label), not the one it was given.
        let zone = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| label(l.split_once('{')?.1.split_once('}')?.0, "zone"));
        let head = format!("  {:<8} zone {:<4} pid {:<8}", self.name, zone.unwrap_or("?"), self.child.id());
        let mut partitions: Vec<u32> = series(&text, "partita_partition_state")
            .filter(|(labels, v)| *v > 0.0 && label(labels, "state") == Some("running"))
            .filter_map(|(labels, _)| label(labels, "partition")?.parse().ok())
            .collect();
        partitions.sort_unstable();
        // A worker's rate is the rows it scored for the scorers.
        let counted =
            if self.worker { "partita_inference_requests_total" } else { "partita_records_received_total" };
        let received: f64 = series(&text, counted).map(|(_, v)| v).sum();
        let lag: f64 = series(&text, "partita_consumer_lag").map(|(_, v)| v).sum();
        let buckets: BTreeMap<String, f64> = series(&text, "partita_event_latency_seconds_bucket")
            .filter_map(|(labels, v)| Some((label(labels, "le")?.to_owned(), v)))
            .collect();
        let now = Instant::now();
        let (rate, p99) = match &self.last {
            Some((at, before, old)) => {
                let secs = (now - *at).as_secs_f64().max(1e-3);
                ((received - before) / secs, p99_text(&buckets, old))
            }
            None => (0.0, "-".into()),
        };
        self.last = Some((now, received, buckets));
        if self.worker {
            return format!("{head} {ready:<10} worker                      {rate:>7.0} rows/s");
        }
        format!(
            "{head} {ready:<10} partitions {:<16} {rate:>7.0} ev/s  p99 {p99:>9}  lag {}",
            format!("{partitions:?}"),
            lag.max(0.0) as u64,
        )
    }
}

/// The p99 between two scrapes of a cumulative histogram, as text: `≤` the upper bound of the
/// first bucket holding 99 % of the events scored in between (`>` the last finite bound when
/// that is the overflow bucket; `-` without events).
fn p99_text(now: &BTreeMap<String, f64>, before: &BTreeMap<String, f64>) -> String {
    let mut bounds: Vec<(f64, f64)> = now
        .iter()
        .map(|(le, v)| {
            let bound = if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap_or(f64::INFINITY) };
            (bound, v - before.get(le).copied().unwrap_or(0.0))
        })
        .collect();
    bounds.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = bounds.last().map_or(0.0, |b| b.1);
    if total <= 0.0 {
        return "-".into();
    }
    match bounds.iter().find(|(_, n)| *n >= 0.99 * total) {
        Some((b, _)) if b.is_finite() => format!("≤{:.0} ms", b * 1000.0),
        _ => {
            let last = bounds.iter().rev().find(|(b, _)| b.is_finite()).map_or(0.0, |(b, _)| *b);
            format!(">{:.0} ms", last * 1000.0)
        }
    }
}

impl Drop for LocalNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn run(args: &LocalArgs) -> anyhow::Result<()> {
    let zones: Vec<String> = args.zones.iter().filter(|z| !z.is_empty()).cloned().collect();
    if args.nodes == 0 || zones.is_empty() {
        bail!("--nodes and --zones need at least one each");
    }
    let state = args.state.unwrap_or(if args.nodes > 1 { Backend::Cql } else { Backend::Rocksdb });
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("Ctrl-C: stopping the load, the nodes, the brokers and the store");
                stop.store(true, Ordering::SeqCst);
            }
        });
    }
    let dir = DataDir::new(args.dir.clone(), "partita-local-")?;
    let brokers = args.brokers.unwrap_or(if args.nodes > 1 { 3 } else { 1 });
    eprintln!("starting {brokers} Apache Kafka broker(s) over zones {zones:?} ...");
    let kafka = LocalKafka::start(KafkaOptions {
        nodes: brokers,
        racks: zones.clone(),
        dir: Some(dir.path().join("kafka")),
        heap: "384m".into(),
    })
    .await?;
    let cassandra = match state {
        Backend::Rocksdb => None,
        Backend::Cql => {
            let n = args.cassandra_nodes.unwrap_or(zones.len().min(3));
            eprintln!("starting {n} Apache Cassandra node(s) (one rack per zone) for the shared state ...");
            Some(
                LocalCassandra::start(CassandraOptions {
                    nodes: n,
                    racks: zones.clone(),
                    dir: Some(dir.path().join("cassandra")),
                    ..Default::default()
                })
                .await?,
            )
        }
    };
    let result = with_servers(args, &zones, &kafka, cassandra.as_ref(), dir.path(), &stop).await;
    eprintln!("stopping the servers ...");
    if let Some(c) = cassandra {
        c.stop().await;
    }
    kafka.stop().await;
    if args.dir.is_some() {
        eprintln!("data and logs kept in {}", dir.path().display());
    }
    result
}

async fn with_servers(
    args: &LocalArgs,
    zones: &[String],
    kafka: &LocalKafka,
    cassandra: Option<&LocalCassandra>,
    dir: &Path,
    stop: &Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let load: LoadgenOptions = {
        let mut o = LoadgenOptions::local(&kafka.bootstrap);
        o.rate = args.rate;
        o.duration = if args.duration.is_zero() { Duration::from_secs(365 * 86_400) } else { args.duration };
        o.keys = args.keys;
        o.bad_ratio = 0.01;
        o.plain = true;
        o
    };
    let partitions = args.partitions.unwrap_or(4 * args.nodes as i32);
    create_topics(
        &kafka.bootstrap,
        &[(&load.topic, partitions), (&load.scores_topic, partitions), (&load.dlq_topic, 1)],
        kafka.replication(),
    )
    .await?;
    // RocksDB on several nodes: state follows its partition through a changelog.
    let changelog = (cassandra.is_none() && args.nodes > 1).then(|| format!("{}.changelog", load.topic));
    if let Some(topic) = &changelog {
        create_topics_with(&kafka.bootstrap, &[(topic, partitions)], kafka.replication(), CHANGELOG_CONFIG)
            .await?;
    }
    let mut servers = Servers { kafka, cassandra, changelog, worker_endpoints: None };
    let exe = std::env::current_exe().context("the partita executable")?;
    let mut nodes = Vec::new();
    for (w, zone) in zones.iter().flat_map(|z| std::iter::repeat_n(z, args.workers_per_zone)).enumerate() {
        nodes.push(spawn_node(&exe, args, &format!("worker-{w}"), zone, Role::Worker, &servers, dir)?);
    }
    if !nodes.is_empty() {
        let endpoints: Vec<String> = nodes.iter().map(|n| format!("{}={}", n.zone, n.grpc)).collect();
        servers.worker_endpoints = Some(endpoints.join(","));
    }
    let role = if servers.worker_endpoints.is_some() { Role::Scorer } else { Role::Both };
    for i in 0..args.nodes {
        nodes.push(spawn_node(
            &exe,
            args,
            &format!("node-{i}"),
            &zones[i % zones.len()],
            role,
            &servers,
            dir,
        )?);
    }
    eprintln!("starting {} partita nodes (loading and warming up the models) ...", nodes.len());
    wait_ready(&mut nodes, stop).await?;

    println!();
    println!("what runs where");
    for (id, addr, rack, pid) in kafka.describe() {
        println!(
            "  kafka-{id:<3}  zone {:<4} pid {:<8} {addr}",
            rack.as_deref().unwrap_or("-"),
            pid.map_or("?".into(), |p| p.to_string())
        );
    }
    if let Some(c) = cassandra {
        for (addr, rack, pid) in c.describe() {
            println!(
                "  cassandra  zone {rack:<4} pid {:<8} {addr}:{} (datacenter {DATACENTER})",
                pid.map_or("?".into(), |p| p.to_string()),
                c.port
            );
        }
    }
    for n in &mut nodes {
        let workers = http_get(&n.http, "/metrics")
            .map(|(_, text)| {
                series(&text, "partita_worker_healthy")
                    .filter_map(|(labels, _)| {
                        Some(format!("{}:{}", label(labels, "worker")?, label(labels, "device")?))
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        println!(
            "  {:<10} zone {:<4} pid {:<8} http {} grpc {} workers [{workers}] log {}",
            n.name,
            n.zone,
            n.child.id(),
            n.http,
            n.grpc,
            n.log.display()
        );
    }
    println!(
        "  topics     {} ({partitions} partitions) -> {} ({partitions}) + {} (1), replication {}",
        load.topic,
        load.scores_topic,
        load.dlq_topic,
        kafka.replication()
    );
    if let Some(topic) = &servers.changelog {
        println!(
            "  changelog  {topic} ({partitions} partitions, compacted): RocksDB state follows its partition"
        );
    }
    println!();
    println!(
        "load: {:.0} events/s over {} keys{}; kill a node's pid to watch its partitions move (Ctrl-C stops everything)",
        args.rate,
        args.keys,
        if args.duration.is_zero() { String::new() } else { format!(" for {:?}", args.duration) }
    );

    let generator = (args.rate > 0.0).then(|| {
        let (load, stop) = (load.clone(), stop.clone());
        tokio::task::spawn_blocking(move || run_load(&load, &stop))
    });
    let mut next = Instant::now();
    loop {
        if stop.load(Ordering::SeqCst) || generator.as_ref().is_some_and(|g| g.is_finished()) {
            break;
        }
        if Instant::now() >= next {
            next = Instant::now() + args.every;
            println!("status");
            for n in &mut nodes {
                println!("{}", n.status());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let report = match generator {
        Some(g) => Some(g.await.context("the load generator")??),
        None => None,
    };
    eprintln!("stopping the nodes (SIGTERM: drain, commit) ...");
    stop_nodes(&mut nodes);
    if let Some(report) = report {
        println!();
        println!("load results");
        print!("{}", report.table());
    }
    Ok(())
}

/// What the nodes run against.
struct Servers<'a> {
    kafka: &'a LocalKafka,
    cassandra: Option<&'a LocalCassandra>,
    /// The changelog topic (RocksDB state on several nodes).
    changelog: Option<String>,
    /// `ZONE=HOST:PORT,...` of the worker nodes, for the scorers.
    worker_endpoints: Option<String>,
}

fn spawn_node(
    exe: &Path,
    args: &LocalArgs,
    name: &str,
    zone: &str,
    role: Role,
    servers: &Servers<'_>,
    dir: &Path,
) -> anyhow::Result<LocalNode> {
    let (kafka, cassandra) = (servers.kafka, servers.cassandra);
    let name = name.to_owned();
    let http = format!("127.0.0.1:{}", free_port()?);
    let grpc = format!("127.0.0.1:{}", free_port()?);
    let log = dir.join(format!("{name}.log"));
    let file = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let mut cmd = Command::new(exe);
    cmd.arg("node")
        .args(["--ingestion-bootstrap", &kafka.bootstrap, "--zone", zone, "--instance-id", &name])
        .args(["--session-timeout", &humantime::format_duration(args.session_timeout).to_string()])
        .args(["--http-listen", &http, "--grpc-listen", &grpc])
        .arg("--repository")
        .arg(&args.repository)
        .arg("--state-dir")
        .arg(dir.join(&name))
        .args(["--role", role.to_possible_value().expect("a role has a name").get_name()]);
    // Loopback only: plaintext, said explicitly (a worker node needs it said).
    if let (Role::Scorer, Some(endpoints)) = (role, &servers.worker_endpoints) {
        cmd.args(["--worker-endpoints", endpoints, "--worker-security", "plaintext"]);
    }
    if role == Role::Worker {
        cmd.args(["--grpc-security", "plaintext"]);
    }
    if let Some(c) = cassandra {
        let replication = c.describe().len().min(3);
        cmd.args(["--state-backend", "cql", "--cql-uri", &c.uri(), "--cql-keyspace", "partita"])
            .args(["--cql-datacenter", DATACENTER])
            .args(["--cql-replication", &format!("{DATACENTER}={replication}")]);
    }
    if let Some(topic) = &servers.changelog {
        cmd.args(["--changelog-topic", topic]);
    }
    let mut child = cmd
        .args(&args.node_args)
        .env("PARTITA_EXIT_WITH_STDIN", "1")
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
        // As the image sets it (Dockerfile): B6 measured glibc's per-thread arenas as the
        // largest part of the memory beyond the configured bounds.
        .env("MALLOC_ARENA_MAX", std::env::var("MALLOC_ARENA_MAX").unwrap_or_else(|_| "2".into()))
        .stdin(Stdio::piped())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    let stdin = child.stdin.take();
    let worker = role == Role::Worker;
    Ok(LocalNode { name, zone: zone.to_owned(), worker, http, grpc, log, child, _stdin: stdin, last: None })
}

/// Until every node answers `/readyz` with 200; fails with a node's log if it exits first.
async fn wait_ready(nodes: &mut [LocalNode], stop: &AtomicBool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let mut ready = 0;
        for n in nodes.iter_mut() {
            if let Some(status) = n.exited() {
                bail!("{} exited ({status}); its log {}:\n{}", n.name, n.log.display(), log_tail(&n.log, 30));
            }
            if http_get(&n.http, "/readyz").is_some_and(|(code, _)| code == 200) {
                ready += 1;
            }
        }
        if ready == nodes.len() {
            return Ok(());
        }
        if stop.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        if Instant::now() > deadline {
            bail!(
                "only {ready} of {} nodes ready within 180 s (logs next to {})",
                nodes.len(),
                nodes[0].log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// SIGTERM every running node at once; SIGKILL what still runs after its grace plus 10 s.
fn stop_nodes(nodes: &mut [LocalNode]) {
    for n in nodes.iter_mut() {
        if n.exited().is_none() {
            let _ = Command::new("kill").args(["-TERM", &n.child.id().to_string()]).status();
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for n in nodes.iter_mut() {
        while n.exited().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        match n.exited() {
            Some(status) => eprintln!("  {} stopped ({status})", n.name),
            None => eprintln!("  {} did not stop within 30 s: killed", n.name),
        }
    }
}
