//! partita as a cluster on one machine: three Apache Kafka brokers (`broker.rack` a, b, c),
//! `partita node`s in zones a, b, c (`client.rack`), state in the shared CQL store (the test
//! binary's local Cassandra). Under steady load a node is killed (kill -9), a zone is lost, a node
//! is frozen past its session (SIGSTOP) and the nodes are restarted one by one; each time the
//! checker of `tests/pipeline.rs` runs on everything produced: every input answered by the right
//! output, copies only as identical repeats with the same source coordinates, every score equal to
//! a one-by-one replay of its key's history on the real model, per-key order, stored state and
//! applied offsets equal to the replay.
//!
//! B5, the failover time, is printed: from the kill to the first output (by its producer
//! timestamp) of each partition the dead node owned.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use partita_runtime::loadgen::{GenRecord, Output, OutputReader, ReaderResult};
use partita_runtime::local::kafka::{
    CHANGELOG_CONFIG, KafkaOptions, LocalKafka, create_topics, create_topics_with,
};
use partita_runtime::local::scrape::{http_get, label, series};
use partita_runtime::state::Backend;
use partita_tests::pipeline::{
    self, DLQ, INPUT, NodeProcess, Produced, SCORES, TestStore, produce_paced, wait_answered,
};

const PARTITIONS: i32 = 6;

/// One cluster at a time: two would share two cores with seven JVMs and eight nodes, and a
/// starved node misses its 3 s session.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const ZONES: [&str; 3] = ["a", "b", "c"];
const CHANGELOG: &str = "transactions.changelog";

/// Leader (broker id) of each input partition: no two partitions a node may own together (p and
/// p + 3 under round-robin assignment, 2k and 2k + 1 under range) are led by one broker. Kafka's
/// own placement leads partition p from broker p % 3 + 1, the zone round-robin assignment then
/// can give every node only partitions led in its own zone, and the rack-aware fetch test shows
/// nothing (it failed so, once in about six runs).
const INPUT_LEADERS: [i32; PARTITIONS as usize] = [1, 2, 3, 2, 3, 1];

/// The input topic with its partitions led as [`INPUT_LEADERS`] says (the other two brokers
/// follow); `create_topics` then waits until every partition is led.
async fn create_input(bootstrap: &str) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        partita_runtime::kafka::client_config(bootstrap).create().unwrap();
    let replicas: Vec<Vec<i32>> =
        INPUT_LEADERS.iter().map(|&l| (0..3).map(|k| (l - 1 + k) % 3 + 1).collect()).collect();
    let replicas: Vec<&[i32]> = replicas.iter().map(Vec::as_slice).collect();
    let topic = NewTopic::new(INPUT, PARTITIONS, TopicReplication::Variable(&replicas));
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin.create_topics([&topic], &opts).await.unwrap() {
        result.unwrap_or_else(|(name, e)| panic!("creating {name}: {e}"));
    }
}

/// The brokers, the store and the nodes (`None` while a node is down).
struct Cluster {
    kafka: LocalKafka,
    _dir: tempfile::TempDir,
    state: TestStore,
    nodes: Vec<Option<NodeProcess>>,
    /// Each node's own flags (zone, session, instance id, HTTP address).
    args: Vec<Vec<String>>,
    /// Each node's `/metrics` address.
    http: Vec<String>,
    /// Held until everything above is stopped (fields drop in order).
    _turn: tokio::sync::MutexGuard<'static, ()>,
}

impl Cluster {
    /// Three brokers (a rack per zone), the topics with replication 3, and `n` nodes over the
    /// zones round-robin with `extra` flags; returns once every partition has an owner.
    async fn start(n: usize, backend: Backend, extra: &[&str], static_members: bool) -> Self {
        let turn = ONE_AT_A_TIME.lock().await;
        let started = Instant::now();
        let kafka = LocalKafka::start(KafkaOptions {
            nodes: 3,
            racks: ZONES.map(String::from).to_vec(),
            heap: "384m".into(),
            ..Default::default()
        })
        .await
        .expect("three local Kafka brokers");
        create_input(&kafka.bootstrap).await;
        create_topics(&kafka.bootstrap, &[(INPUT, PARTITIONS), (SCORES, PARTITIONS), (DLQ, 1)], 3)
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let state = match backend {
            Backend::Cql => TestStore::new(Backend::Cql, &dir.path().join("state")).await,
            Backend::Rocksdb => {
                create_topics_with(&kafka.bootstrap, &[(CHANGELOG, PARTITIONS)], 3, CHANGELOG_CONFIG)
                    .await
                    .unwrap();
                TestStore::with_changelog(&dir.path().join("state"), &kafka.bootstrap, CHANGELOG)
            }
        };
        let http: Vec<String> =
            (0..n).map(|_| format!("127.0.0.1:{}", partita_runtime::local::free_port().unwrap())).collect();
        let args: Vec<Vec<String>> = (0..n)
            .map(|i| {
                let mut a: Vec<String> = vec![
                    "--zone".into(),
                    ZONES[i % ZONES.len()].into(),
                    "--http-listen".into(),
                    http[i].clone(),
                ];
                if static_members {
                    a.extend(["--instance-id".into(), name(i)]);
                }
                a.extend(extra.iter().map(|s| s.to_string()));
                a
            })
            .collect();
        let mut cluster = Self { _turn: turn, kafka, _dir: dir, state, nodes: Vec::new(), args, http };
        for i in 0..n {
            let node = cluster.spawn(i);
            cluster.nodes.push(Some(node));
        }
        tokio::task::block_in_place(|| cluster.wait_owned(Duration::from_secs(120)));
        eprintln!(
            "cluster of {n} nodes ready in {:.1} s: {:?}",
            started.elapsed().as_secs_f64(),
            cluster.owners()
        );
        cluster
    }

    fn spawn(&self, i: usize) -> NodeProcess {
        let args: Vec<&str> = self.args[i].iter().map(String::as_str).collect();
        NodeProcess::start_named(&self.kafka.bootstrap, &self.state, &name(i), &args)
    }

    fn node(&self, i: usize) -> &NodeProcess {
        self.nodes[i].as_ref().expect("node is up")
    }

    /// The partitions each running node owns now, by its log.
    fn owners(&self) -> Vec<Option<BTreeSet<i32>>> {
        self.nodes.iter().map(|n| n.as_ref().map(|n| owned(&n.log_text()))).collect()
    }

    /// Wait until every partition has exactly one owner among the running nodes, and every
    /// running node owns one.
    fn wait_owned(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let owners = self.owners();
            let running: Vec<&BTreeSet<i32>> = owners.iter().flatten().collect();
            let total: usize = running.iter().map(|o| o.len()).sum();
            let all: BTreeSet<i32> = running.iter().flat_map(|o| o.iter().copied()).collect();
            if total == PARTITIONS as usize && all.len() == total && running.iter().all(|o| !o.is_empty()) {
                return;
            }
            if Instant::now() > deadline {
                let logs: Vec<String> = self.nodes.iter().flatten().map(NodeProcess::log_text).collect();
                panic!(
                    "partitions not spread over the nodes in {within:?}: {owners:?}\n{}",
                    logs.join("\n----\n")
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Wait for the steady load to be sent and every record answered: the records, where each
    /// landed, and the outputs.
    fn answered(
        &self,
        reader: OutputReader,
        n: usize,
        producer: std::thread::JoinHandle<Produced>,
    ) -> (Vec<GenRecord>, Vec<(i32, i64)>, ReaderResult) {
        let (recs, landed) = producer.join().expect("the producer thread");
        let seen = tokio::task::block_in_place(|| {
            wait_answered(reader, n as u64, Duration::from_secs(180), || self.node(1).log_text())
        });
        (recs, landed, seen)
    }

    fn kill9(&mut self, i: usize) -> BTreeSet<i32> {
        let node = self.nodes[i].take().expect("node is up");
        let had = owned(&node.log_text());
        node.kill9();
        had
    }

    /// SIGTERM every running node at once; each must exit cleanly.
    fn stop_all(&mut self) {
        let nodes: Vec<NodeProcess> = self.nodes.iter_mut().filter_map(Option::take).collect();
        nodes.iter().for_each(|n| n.signal("TERM"));
        for mut n in nodes {
            let status = n.wait_exit(Duration::from_secs(40));
            assert!(
                status.is_some_and(|s| s.success()),
                "a node did not stop cleanly: {status:?}\n{}",
                n.log_text()
            );
        }
    }
}

fn name(i: usize) -> String {
    format!("node-{i}")
}

/// The partitions a node's log says it owns: assigned and not since revoked or lost.
fn owned(log: &str) -> BTreeSet<i32> {
    let mut owned = BTreeSet::new();
    for line in log.lines() {
        let number = |field: &str| {
            line.split_once(field).and_then(|(_, rest)| {
                rest.split(|c: char| !c.is_ascii_digit()).next().and_then(|d| d.parse::<i32>().ok())
            })
        };
        if line.contains("partition assigned") {
            owned.extend(number(" partition="));
        } else if line.contains("partition revoked") {
            if let Some(p) = number(" partition=") {
                owned.remove(&p);
            }
        } else if line.contains("assignment lost") {
            owned.clear();
        }
    }
    owned
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

/// B5 per moved partition: ms from `since` to its first output produced after it.
fn failover_ms(seen: &ReaderResult, moved: &BTreeSet<i32>, since: i64) -> Vec<(i32, Option<i64>)> {
    moved
        .iter()
        .map(|&p| {
            let first = seen
                .outputs
                .iter()
                .zip(&seen.produced_ms)
                .filter(|((sp, _, _), at)| *sp == p && **at > since)
                .map(|(_, at)| *at)
                .min();
            (p, first.map(|at| at - since))
        })
        .collect()
}

/// p99 (ms) of event time → score produced, over the partitions not in `moved`, for the scores
/// produced in the 10 s from `since`: what the failover cost the partitions it did not move (and,
/// from 10 s before it, what they took before).
fn unaffected_p99_ms(seen: &ReaderResult, moved: &BTreeSet<i32>, since: i64) -> Option<i64> {
    let mut ms: Vec<i64> = seen
        .outputs
        .iter()
        .zip(&seen.produced_ms)
        .filter(|((p, _, _), at)| !moved.contains(p) && (since..since + 10_000).contains(*at))
        .filter_map(|((_, _, out), at)| match out {
            Output::Score(s) => Some(at - s.event_time_unix_micros / 1000),
            Output::DeadLetter(_) => None,
        })
        .collect();
    ms.sort_unstable();
    ms.get(ms.len().saturating_sub(1).min(ms.len() * 99 / 100)).copied()
}

/// Print B5 for the `moved` partitions and the unaffected partitions' p99, from `since`; fails if
/// a moved partition never answered again.
fn print_b5(what: &str, seen: &ReaderResult, moved: &BTreeSet<i32>, since: i64) {
    let b5 = failover_ms(seen, moved, since);
    let mut ms: Vec<i64> = b5.iter().filter_map(|(_, m)| *m).collect();
    ms.sort_unstable();
    eprintln!(
        "B5 {what}: per moved partition {b5:?}; min {:?} median {:?} max {:?} ms",
        ms.first(),
        ms.get(ms.len() / 2),
        ms.last()
    );
    assert_eq!(ms.len(), b5.len(), "a moved partition never answered again: {b5:?}");
    eprintln!(
        "  unaffected partitions: p99 event -> score {:?} ms in the 10 s after it ({:?} ms in the 10 s before); worst per second after {:?}",
        unaffected_p99_ms(seen, moved, since),
        unaffected_p99_ms(seen, moved, since - 10_000),
        unaffected_worst_per_second_ms(seen, moved, since)
    );
}

/// The worst event → score time (ms) of the partitions not in `moved`, per second after `since`
/// (by the second the score was produced in), for 10 s: when the failover slowed them.
fn unaffected_worst_per_second_ms(seen: &ReaderResult, moved: &BTreeSet<i32>, since: i64) -> Vec<i64> {
    let mut worst = vec![0i64; 10];
    for ((p, _, out), at) in seen.outputs.iter().zip(&seen.produced_ms) {
        if let (false, Output::Score(s)) = (moved.contains(p), out)
            && let Some(w) = usize::try_from((at - since) / 1000).ok().and_then(|i| worst.get_mut(i))
            && *at >= since
        {
            *w = (*w).max(at - s.event_time_unix_micros / 1000);
        }
    }
    worst
}

/// Steady load: `n` records over 200 keys (2 % bad) at `rate` per second.
fn steady(cluster: &Cluster, n: usize, rate: f64, seed: u64) -> std::thread::JoinHandle<Produced> {
    produce_paced(&cluster.kafka.bootstrap, n, 200, 0.02, seed, rate)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_stream_has_its_partitions_resumed_elsewhere_with_their_state_cql() {
    a_node_killed_mid_stream_has_its_partitions_resumed_elsewhere_with_their_state(Backend::Cql).await;
}

/// RocksDB on each node: the survivors restore the dead node's partitions from the changelog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_stream_has_its_partitions_resumed_elsewhere_with_their_state_rocksdb() {
    a_node_killed_mid_stream_has_its_partitions_resumed_elsewhere_with_their_state(Backend::Rocksdb).await;
}

async fn a_node_killed_mid_stream_has_its_partitions_resumed_elsewhere_with_their_state(backend: Backend) {
    let mut cluster = Cluster::start(3, backend, &["--session-timeout", "3s"], false).await;
    let reader = pipeline::reader(&cluster.kafka.bootstrap);
    let (n, producer) = (6000, steady(&cluster, 6000, 150.0, 501));
    std::thread::sleep(Duration::from_secs(10));
    let moved = cluster.kill9(0);
    // After the kill: any output produced later is another node's.
    let since = now_ms();
    eprintln!("killed node-0 (zone a) owning {moved:?}");
    // The survivors take its partitions over from the stored offsets; then it comes back.
    tokio::task::block_in_place(|| cluster.wait_owned(Duration::from_secs(60)));
    std::thread::sleep(Duration::from_secs(5));
    cluster.nodes[0] = Some(cluster.spawn(0));
    let (recs, landed, seen) = cluster.answered(reader, n, producer);
    for i in 1..3 {
        for line in cluster.node(i).log_text().lines().filter(|l| l.contains("restored from the changelog")) {
            eprintln!("node-{i}: {}", line.split_once("INFO ").map_or(line, |(_, l)| l));
        }
    }
    cluster.stop_all();
    print_b5(&format!("kill -9 of one node ({backend:?})"), &seen, &moved, since);
    let dups = pipeline::check(&recs, &landed, &seen, &cluster.state, PARTITIONS).await;
    eprintln!("node killed and restarted: {} records, {dups} duplicate outputs, state == replay", recs.len());
}

/// RocksDB with two standby copies of every partition (`--standby-replicas 2`: every other node
/// keeps one): the survivors that take the killed node's partitions replay only the changelog
/// after their copies' positions, not the whole partitions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_resumes_its_partitions_from_standby_copies_without_a_full_restore() {
    let extra = ["--session-timeout", "3s", "--standby-replicas", "2"];
    let mut cluster = Cluster::start(3, Backend::Rocksdb, &extra, false).await;
    let reader = pipeline::reader(&cluster.kafka.bootstrap);
    let (n, producer) = (6000, steady(&cluster, 6000, 150.0, 503));
    // Copies start within a group description (2 s) and keep up from there.
    std::thread::sleep(Duration::from_secs(10));
    // What each survivor keeps a copy of when node-0 dies.
    let kept: Vec<BTreeSet<i32>> = (0..3)
        .map(|i| {
            let log = cluster.node(i).log_text();
            let line = log.lines().rfind(|l| l.contains("standby copies")).unwrap_or_default().to_owned();
            eprintln!("node-{i}: {line}");
            line.split_once("partitions={")
                .map(|(_, rest)| rest.split('}').next().unwrap_or_default())
                .unwrap_or_default()
                .split(", ")
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .collect();
    // Only the survivors' restores after the kill count: a survivor may have restored one of
    // node-0's partitions while the group first formed.
    let before: Vec<usize> = (0..3).map(|i| cluster.node(i).log_text().len()).collect();
    let moved = cluster.kill9(0);
    let since = now_ms();
    eprintln!("killed node-0 (zone a) owning {moved:?}");
    tokio::task::block_in_place(|| cluster.wait_owned(Duration::from_secs(60)));
    let (recs, landed, seen) = cluster.answered(reader, n, producer);
    let mut restores = Vec::new();
    for (i, &from) in before.iter().enumerate().skip(1) {
        let log = cluster.node(i).log_text();
        for line in
            log.get(from..).unwrap_or_default().lines().filter(|l| l.contains("restored from the changelog"))
        {
            eprintln!("node-{i}: {}", line.split_once("INFO ").map_or(line, |(_, l)| l));
            restores.push((i, line.to_owned()));
        }
    }
    // Lines start with their time: in time order, the last restore of a partition is its owner's.
    restores.sort_by(|(_, a), (_, b)| a.cmp(b));
    cluster.stop_all();
    print_b5("kill -9 of one node (RocksDB, 2 standby copies)", &seen, &moved, since);
    // Each moved partition's restore on its new owner continued its copy.
    for p in &moved {
        let (owner, restore) = restores
            .iter()
            .rfind(|(_, l)| l.contains(&format!(" partition={p} ")))
            .unwrap_or_else(|| panic!("partition {p} was not restored: {restores:#?}"));
        assert!(kept[*owner].contains(p), "node-{owner} took partition {p} without a copy: {kept:?}");
        assert!(
            restore.contains("after_position=Some("),
            "partition {p} was restored whole, not from node-{owner}'s standby copy: {restore}"
        );
    }
    let dups = pipeline::check(&recs, &landed, &seen, &cluster.state, PARTITIONS).await;
    eprintln!(
        "node killed, standby copies took over: {} records, {dups} duplicate outputs, state == replay",
        recs.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_zone_lost_resumes_in_the_other_zones_and_loses_nothing_cql() {
    a_whole_zone_lost_resumes_in_the_other_zones_and_loses_nothing(Backend::Cql).await;
}

/// RocksDB: the changelog (replication 3) and the transaction coordinator lose a broker too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_zone_lost_resumes_in_the_other_zones_and_loses_nothing_rocksdb() {
    a_whole_zone_lost_resumes_in_the_other_zones_and_loses_nothing(Backend::Rocksdb).await;
}

async fn a_whole_zone_lost_resumes_in_the_other_zones_and_loses_nothing(backend: Backend) {
    // Four nodes: zone a holds node-0 and node-3, and broker 0.
    let mut cluster = Cluster::start(4, backend, &["--session-timeout", "3s"], false).await;
    let reader = pipeline::reader(&cluster.kafka.bootstrap);
    let (n, producer) = (5000, steady(&cluster, 5000, 150.0, 502));
    std::thread::sleep(Duration::from_secs(10));
    cluster.kafka.kill(0);
    let mut moved = cluster.kill9(0);
    moved.extend(cluster.kill9(3));
    let since = now_ms();
    eprintln!("zone a lost (broker 0, node-0, node-3), its nodes owned {moved:?}");
    tokio::task::block_in_place(|| cluster.wait_owned(Duration::from_secs(90)));
    let (recs, landed, seen) = cluster.answered(reader, n, producer);
    cluster.stop_all();
    print_b5(&format!("zone a lost (its nodes and its broker; {backend:?})"), &seen, &moved, since);
    let dups = pipeline::check(&recs, &landed, &seen, &cluster.state, PARTITIONS).await;
    eprintln!("zone lost: {} records, {dups} duplicate outputs, state == replay", recs.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_frozen_past_its_session_is_fenced_and_applies_nothing_twice_cql() {
    a_node_frozen_past_its_session_is_fenced_and_applies_nothing_twice(Backend::Cql).await;
}

/// RocksDB: the new owners' `init_transactions` on the changelog fence the zombie's producer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_frozen_past_its_session_is_fenced_and_applies_nothing_twice_rocksdb() {
    a_node_frozen_past_its_session_is_fenced_and_applies_nothing_twice(Backend::Rocksdb).await;
}

async fn a_node_frozen_past_its_session_is_fenced_and_applies_nothing_twice(backend: Backend) {
    let mut cluster = Cluster::start(3, backend, &["--session-timeout", "3s"], false).await;
    let reader = pipeline::reader(&cluster.kafka.bootstrap);
    let (n, producer) = (5000, steady(&cluster, 5000, 150.0, 503));
    std::thread::sleep(Duration::from_secs(10));
    // A zombie: frozen (a long GC pause, a VM migration) past its session; the group gives its
    // partitions to the others, which claim them with a newer epoch. Then it wakes up with
    // batches in flight.
    let moved = owned(&cluster.node(0).log_text());
    cluster.node(0).signal("STOP");
    let since = now_ms();
    std::thread::sleep(Duration::from_secs(10));
    cluster.node(0).signal("CONT");
    tokio::task::block_in_place(|| cluster.wait_owned(Duration::from_secs(60)));
    let zombie = cluster.node(0).log_text();
    assert!(zombie.contains("assignment lost"), "the zombie must find its assignment lost:\n{zombie}");
    eprintln!("zombie woke up: {} fenced store writes in its log", zombie.matches("Fenced").count());
    let (recs, landed, seen) = cluster.answered(reader, n, producer);
    cluster.stop_all();
    print_b5(&format!("node frozen (SIGSTOP) past its session ({backend:?})"), &seen, &moved, since);
    let dups = pipeline::check(&recs, &landed, &seen, &cluster.state, PARTITIONS).await;
    eprintln!("zombie fenced: {} records, {dups} duplicate outputs, state == replay", recs.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_with_static_membership_moves_no_partition_and_repeats_no_output() {
    // Each node stops (SIGTERM: drain, commit) and starts again well within its session.
    let mut cluster = Cluster::start(3, Backend::Cql, &["--session-timeout", "30s"], true).await;
    let reader = pipeline::reader(&cluster.kafka.bootstrap);
    let (n, producer) = (6000, steady(&cluster, 6000, 100.0, 504));
    std::thread::sleep(Duration::from_secs(5));
    let moves =
        |log: &str| log.matches("partition assigned").count() + log.matches("partition revoked").count();
    for i in 0..cluster.nodes.len() {
        let before: Vec<Option<(BTreeSet<i32>, usize)>> = cluster
            .nodes
            .iter()
            .map(|n| n.as_ref().map(|n| (owned(&n.log_text()), moves(&n.log_text()))))
            .collect();
        let mut node = cluster.nodes[i].take().expect("node is up");
        node.signal("TERM");
        let status = tokio::task::block_in_place(|| node.wait_exit(Duration::from_secs(30)));
        assert!(status.is_some_and(|s| s.success()), "node-{i} did not stop cleanly:\n{}", node.log_text());
        cluster.nodes[i] = Some(cluster.spawn(i));
        let had = &before[i].as_ref().expect("node was up").0;
        let deadline = Instant::now() + Duration::from_secs(30);
        while owned(&cluster.node(i).log_text()) != *had {
            assert!(
                Instant::now() < deadline,
                "node-{i} did not get {had:?} back:\n{}",
                cluster.node(i).log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        for (j, b) in before.iter().enumerate().filter(|(j, _)| *j != i) {
            let log = cluster.node(j).log_text();
            assert_eq!(
                (owned(&log), moves(&log)),
                b.clone().expect("node was up"),
                "node-{j}'s partitions moved while node-{i} restarted:\n{log}"
            );
        }
        eprintln!("node-{i} restarted with {had:?}; no other node's assignment changed");
    }
    let (recs, landed, seen) = cluster.answered(reader, n, producer);
    cluster.stop_all();
    let dups = pipeline::check(&recs, &landed, &seen, &cluster.state, PARTITIONS).await;
    assert_eq!(dups, 0, "a drained and committed hand-over repeats no output");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_partitions_over_at_once_drained_and_committed() {
    // A long session: a node that left without a word would keep its partitions for 30 s.
    let mut cluster = Cluster::start(3, Backend::Cql, &["--session-timeout", "30s"], false).await;
    let reader = pipeline::reader(&cluster.kafka.bootstrap);
    let (n, producer) = (4000, steady(&cluster, 4000, 150.0, 505));
    std::thread::sleep(Duration::from_secs(8));
    let mut node = cluster.nodes[0].take().expect("node is up");
    let moved = owned(&node.log_text());
    node.signal("TERM");
    let status = tokio::task::block_in_place(|| node.wait_exit(Duration::from_secs(30)));
    assert!(status.is_some_and(|s| s.success()), "node-0 did not stop cleanly:\n{}", node.log_text());
    assert!(node.log_text().contains("left the consumer group"), "{}", node.log_text());
    let since = now_ms();
    // The group saw it leave: the others own everything well before its session could expire.
    tokio::task::block_in_place(|| cluster.wait_owned(Duration::from_secs(15)));
    let (recs, landed, seen) = cluster.answered(reader, n, producer);
    cluster.stop_all();
    print_b5("SIGTERM of one node (session 30 s)", &seen, &moved, since);
    let dups = pipeline::check(&recs, &landed, &seen, &cluster.state, PARTITIONS).await;
    assert_eq!(dups, 0, "a drained and committed hand-over repeats no output");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_node_fetches_its_partitions_from_the_broker_in_its_own_zone() {
    let mut cluster = Cluster::start(3, Backend::Cql, &["--session-timeout", "3s"], false).await;
    let producer = steady(&cluster, 1000, 100.0, 506);
    let broker_of_zone: HashMap<String, f64> = cluster
        .kafka
        .describe()
        .into_iter()
        .filter_map(|(id, _, rack, _)| Some((rack?, id as f64)))
        .collect();
    // Not vacuous: some partition a node owns is led by a broker of another zone.
    let leaders: HashMap<i32, f64> = {
        use rdkafka::consumer::Consumer as _;
        let c: rdkafka::consumer::BaseConsumer =
            partita_runtime::kafka::client_config(&cluster.kafka.bootstrap).create().unwrap();
        let md = c.fetch_metadata(Some(INPUT), Duration::from_secs(10)).unwrap();
        md.topics()[0].partitions().iter().map(|p| (p.id(), f64::from(p.leader()))).collect()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut led_elsewhere = 0;
    for (i, addr) in cluster.http.iter().enumerate() {
        let zone = ZONES[i % ZONES.len()];
        let local = broker_of_zone[zone];
        loop {
            let text = http_get(addr, "/metrics").map(|(_, t)| t).unwrap_or_default();
            let fetched: Vec<(String, f64)> = series(&text, "partita_fetch_broker")
                .filter_map(|(labels, b)| Some((label(labels, "partition")?.to_owned(), b)))
                .collect();
            let owned = owned(&cluster.node(i).log_text());
            if fetched.len() == owned.len() && fetched.iter().all(|(_, b)| *b == local) {
                led_elsewhere += owned.iter().filter(|p| leaders[p] != local).count();
                eprintln!("node-{i} (zone {zone}) fetches {owned:?} from broker {local} (its zone's)");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node-{i} in zone {zone} (broker {local}) fetches {fetched:?}; leaders {leaders:?}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    assert!(led_elsewhere > 0, "every owned partition was led from its node's own zone: nothing shown");
    let _ = producer.join();
    cluster.stop_all();
}
