//! `partita demo`: the whole pipeline on one machine. Starts Apache Kafka (one KRaft node) on
//! loopback, creates the topics, starts a node on embedded defaults (RocksDB state in a temporary
//! directory, the shipped models, CPU unless a GPU is seen; `--state cql` starts a local Cassandra
//! and keeps state there instead), runs the load generator for a bounded time, prints what ran
//! where and the results, and stops everything it started (also on Ctrl-C).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;

use crate::inference::InferenceOptions;
use crate::loadgen::{LoadgenOptions, run as run_load};
use crate::local::cassandra::{CassandraOptions, LocalCassandra};
use crate::local::kafka::{KafkaOptions, LocalKafka, create_topics};
use crate::node::{Node, NodeOptions};
use crate::state::Backend;

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// How long the load generator produces.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    pub duration: Duration,
    /// Events per second.
    #[arg(long, default_value_t = 2000.0)]
    pub rate: f64,
    /// How long to wait for the last outputs once the load stopped (an overloaded node works
    /// off its backlog meanwhile).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "15s")]
    pub drain: Duration,
    /// Partitions of the input and output topics.
    #[arg(long, default_value_t = 4)]
    pub partitions: i32,
    /// Distinct keys (cards).
    #[arg(long, default_value_t = 1_000_000)]
    pub keys: usize,
    /// Zipf exponent of the key distribution.
    #[arg(long, default_value_t = 0.6)]
    pub zipf: f64,
    /// Share of bad records mixed in (every kind of the bad-input table).
    #[arg(long, default_value_t = 0.01)]
    pub bad_ratio: f64,
    /// State backend: rocksdb (embedded) or cql (starts a local Apache Cassandra for it).
    #[arg(long = "state", value_enum, default_value = "rocksdb")]
    pub state: Backend,
    #[command(flatten)]
    pub inference: InferenceOptions,
}

pub async fn run(args: &DemoArgs) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("Ctrl-C: stopping the load, the node and the broker");
                stop.store(true, Ordering::SeqCst);
            }
        });
    }
    eprintln!("starting Apache Kafka (one KRaft node on loopback) ...");
    let started = Instant::now();
    let broker = LocalKafka::start(KafkaOptions::default()).await?;
    let kafka_start = started.elapsed();
    let cassandra = match args.state {
        Backend::Rocksdb => None,
        Backend::Cql => {
            eprintln!("starting Apache Cassandra (one node on loopback) for the state ...");
            let started = Instant::now();
            let c = LocalCassandra::start(CassandraOptions::default()).await;
            Some((c, started.elapsed()))
        }
    };
    let result = match cassandra {
        None => with_broker(args, &broker, kafka_start, None, &stop).await,
        Some((Err(e), _)) => Err(e),
        Some((Ok(c), took)) => {
            let r = with_broker(args, &broker, kafka_start, Some((&c, took)), &stop).await;
            c.stop().await;
            r
        }
    };
    broker.stop().await;
    result
}

async fn with_broker(
    args: &DemoArgs,
    broker: &LocalKafka,
    kafka_start: Duration,
    cassandra: Option<(&LocalCassandra, Duration)>,
    stop: &Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let p = args.partitions;
    let state_dir = std::env::temp_dir().join(format!("partita-demo-{}", std::process::id()));
    let mut node_opts = NodeOptions::local(&broker.bootstrap, state_dir.clone());
    node_opts.inference = args.inference.clone();
    if let Some((c, _)) = cassandra {
        node_opts.local_cql(&c.uri(), "partita");
    }
    create_topics(
        &broker.bootstrap,
        &[(&node_opts.input_topic, p), (&node_opts.scores_topic, p), (&node_opts.dlq_topic, 1)],
        broker.replication(),
    )
    .await?;
    eprintln!("starting the node (loading and warming up the models) ...");
    let node = Node::start(&node_opts).await?;
    let result = with_node(args, broker, &node_opts, &node, stop).await;
    let devices = node.devices.join(", ");
    let summary = node.stop().await;
    let _ = std::fs::remove_dir_all(&state_dir);
    let (report, started) = result?;
    let c = summary?.counters;
    println!();
    println!("what ran where");
    for (id, addr, _, pid) in broker.describe() {
        println!(
            "  kafka         Apache Kafka (KRaft) node {id} on {addr} (pid {}, started in {:.1} s)",
            pid.map_or("?".into(), |p| p.to_string()),
            kafka_start.as_secs_f64()
        );
    }
    println!(
        "  topics        {} ({p} partitions) -> {} ({p}) + dead letters {} (1)",
        node_opts.input_topic, node_opts.scores_topic, node_opts.dlq_topic
    );
    println!(
        "  node          group {}, zone {}, {} partition actors, workers on [{}]",
        node_opts.group, node_opts.zone, started, devices
    );
    match cassandra {
        None => println!(
            "  state         RocksDB in {} (removed), cache {}",
            state_dir.display(),
            node_opts.cache_size
        ),
        Some((c, took)) => {
            for (addr, rack, pid) in c.describe() {
                println!(
                    "  state         Apache Cassandra on {addr}:{} (rack {rack}, pid {}, started in {:.1} s), keyspace {}, cache {}",
                    c.port,
                    pid.map_or("?".into(), |p| p.to_string()),
                    took.as_secs_f64(),
                    node_opts.cql_keyspace,
                    node_opts.cache_size
                );
            }
        }
    }
    println!("  model         {} from {}", node_opts.default_model, node_opts.inference.repository.display());
    println!();
    println!("results");
    print!("{}", report.table());
    println!(
        "  node counters                scored {}, dead letters {}, redelivered {}, unknown-field events {}",
        c.scored.load(Ordering::Relaxed),
        c.dead_lettered_total(),
        c.redelivered.load(Ordering::Relaxed),
        c.unknown_fields.load(Ordering::Relaxed)
    );
    Ok(())
}

async fn with_node(
    args: &DemoArgs,
    broker: &LocalKafka,
    node_opts: &NodeOptions,
    node: &Node,
    stop: &Arc<AtomicBool>,
) -> anyhow::Result<(crate::loadgen::LoadReport, i64)> {
    let since = Instant::now();
    while node.assigned() < i64::from(args.partitions) {
        anyhow::ensure!(
            since.elapsed() < Duration::from_secs(30),
            "the node did not join its group within 30 s"
        );
        anyhow::ensure!(!stop.load(Ordering::SeqCst), "interrupted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let assigned = node.assigned();
    eprintln!(
        "node owns {assigned} partitions; producing {:.0} events/s for {:?} ...",
        args.rate, args.duration
    );
    let mut load = LoadgenOptions::local(&broker.bootstrap);
    load.topic = node_opts.input_topic.clone();
    load.scores_topic = node_opts.scores_topic.clone();
    load.dlq_topic = node_opts.dlq_topic.clone();
    load.rate = args.rate;
    load.duration = args.duration;
    load.keys = args.keys;
    load.zipf = args.zipf;
    load.bad_ratio = args.bad_ratio;
    load.drain = args.drain;
    let stop = stop.clone();
    let report =
        tokio::task::spawn_blocking(move || run_load(&load, &stop)).await.context("load generator")??;
    Ok((report, assigned))
}
