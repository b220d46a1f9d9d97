//! The local multi-node servers the cluster work runs on: three Apache Kafka KRaft nodes (a rack
//! each) survive a broker's kill -9 and restart without losing an acknowledged record, and three
//! Cassandra nodes (127.0.0.1-3, a rack each) serve the CQL state store at LOCAL_QUORUM with one
//! node down. Topics answer on every partition as soon as `create_topics` returns.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use partita_actors::state::{Epoch, Offset, PartitionId, StateStore, StateValue, StateWrite, StoreError};
use partita_runtime::loadgen::{GenRecord, send};
use partita_runtime::local::cassandra::{CassandraOptions, DATACENTER, LocalCassandra};
use partita_runtime::local::kafka::{KafkaOptions, LocalKafka, create_topics};
use partita_runtime::state::scylla::{ScyllaConfig, ScyllaStore};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, DeliveryResult, Producer, ProducerContext};
use rdkafka::{ClientContext, TopicPartitionList};

const TOPIC: &str = "chaos";
const PARTITIONS: i32 = 3;

/// Which records the brokers acknowledged.
#[derive(Default)]
struct Acked(Mutex<Vec<u32>>, Mutex<u32>);

impl ClientContext for Acked {}
impl ProducerContext for Acked {
    type DeliveryOpaque = Box<u32>;
    fn delivery(&self, result: &DeliveryResult<'_>, id: Box<u32>) {
        match result {
            Ok(_) => self.0.lock().unwrap().push(*id),
            Err(_) => *self.1.lock().unwrap() += 1,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_broker_killed_and_restarted_loses_no_acknowledged_record() {
    let started = Instant::now();
    let mut kafka = LocalKafka::start(KafkaOptions {
        nodes: 3,
        racks: vec!["zone-a".into(), "zone-b".into(), "zone-c".into()],
        ..Default::default()
    })
    .await
    .expect("three local Kafka nodes");
    eprintln!("3 Kafka nodes ready in {:.1} s: {:?}", started.elapsed().as_secs_f64(), kafka.describe());
    assert_eq!(kafka.replication(), 3);
    create_topics(&kafka.bootstrap, &[(TOPIC, PARTITIONS)], kafka.replication()).await.unwrap();
    let bootstrap = kafka.bootstrap.clone();
    tokio::task::block_in_place(|| {
        let producer: BaseProducer<Acked> = partita_runtime::kafka::client_config(&bootstrap)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "1")
            .set("message.timeout.ms", "60000")
            .create_with_context(Acked::default())
            .unwrap();
        // The leader of partition 0 is the node to kill.
        let meta = producer.client().fetch_metadata(Some(TOPIC), Duration::from_secs(10)).unwrap();
        let leader = meta.topics()[0].partitions().iter().find(|p| p.id() == 0).unwrap().leader();
        assert!(
            meta.topics()[0].partitions().iter().all(|p| p.replicas().len() == 3),
            "replication factor 3"
        );
        let victim = (leader - 1) as usize;
        let total = 3000u32;
        for id in 0..total {
            let rec = GenRecord {
                key: Some((id % 97).to_be_bytes().to_vec()),
                value: id.to_be_bytes().to_vec(),
                headers: Vec::new(),
                bad: None,
            };
            send(&producer, TOPIC, &rec, Box::new(id)).expect("produce");
            producer.poll(Duration::ZERO);
            if id == total / 3 {
                // Mid-stream: records are in flight to the leader when it dies.
                eprintln!("kill -9 Kafka node {} (leader of partition 0)", victim + 1);
                kafka.kill(victim);
            }
            if id == 2 * total / 3 {
                let t = Instant::now();
                kafka.restart(victim).expect("the killed node restarts on its log dir");
                eprintln!("node {} back in {:.1} s", victim + 1, t.elapsed().as_secs_f64());
            }
            if id % 10 == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        producer.flush(Duration::from_secs(60)).unwrap();
        // The restarted node (its log dir kept) catches up and rejoins every partition's ISR.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let meta = producer.client().fetch_metadata(Some(TOPIC), Duration::from_secs(10)).unwrap();
            if meta.topics()[0].partitions().iter().all(|p| p.isr().contains(&leader)) {
                break;
            }
            assert!(Instant::now() < deadline, "node {leader} never rejoined the ISR of every partition");
            std::thread::sleep(Duration::from_millis(200));
        }
        let acked = producer.context().0.lock().unwrap().clone();
        let failed = *producer.context().1.lock().unwrap();
        eprintln!("{} of {total} acknowledged, {failed} failed", acked.len());
        assert!(acked.len() as u32 + failed == total, "every record got an answer");
        assert!(acked.len() as u32 > total / 2, "most records acknowledged through the failover");

        // Read everything back: every acknowledged record exactly once (idempotence).
        let consumer: BaseConsumer = partita_runtime::kafka::client_config(&bootstrap)
            .set("group.id", "chaos-check")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in 0..PARTITIONS {
            tpl.add_partition_offset(TOPIC, p, rdkafka::Offset::Beginning).unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let mut seen: HashMap<u32, u32> = HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while acked.iter().any(|id| !seen.contains_key(id)) && Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                let id = u32::from_be_bytes(m.payload().unwrap().try_into().unwrap());
                *seen.entry(id).or_default() += 1;
            }
        }
        let lost: Vec<&u32> = acked.iter().filter(|id| !seen.contains_key(id)).collect();
        assert!(
            lost.is_empty(),
            "{} acknowledged records lost, e.g. {:?}",
            lost.len(),
            &lost[..lost.len().min(10)]
        );
        let twice: Vec<(&u32, &u32)> = seen.iter().filter(|(_, n)| **n > 1).collect();
        assert!(twice.is_empty(), "records written twice despite idempotence: {twice:?}");
    });
    kafka.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_cassandra_nodes_with_a_rack_each_keep_serving_state_with_one_down() {
    let started = Instant::now();
    let mut cassandra = LocalCassandra::start(CassandraOptions {
        nodes: 3,
        racks: vec!["zone-a".into(), "zone-b".into(), "zone-c".into()],
        ..Default::default()
    })
    .await
    .expect("three local Cassandra nodes");
    eprintln!(
        "3 Cassandra nodes ready in {:.1} s: {:?}",
        started.elapsed().as_secs_f64(),
        cassandra.describe()
    );
    let mut config = ScyllaConfig::new(&cassandra.uri());
    config.keyspace = partita_tests::unique_keyspace("cluster");
    config.replication = [(DATACENTER.to_owned(), 3)].into();
    config.datacenter = Some(DATACENTER.into());
    config.zone = Some("zone-a".into());
    config.request_timeout = Duration::from_secs(10);
    let store = ScyllaStore::connect(&config).await.expect("the CQL store on three nodes");
    let p = PartitionId(0);
    let write = |offset: i64, tag: &str| StateWrite {
        partition: p,
        epoch: Epoch(1),
        applied_offset: Offset(offset),
        entries: vec![(b"card".to_vec(), StateValue { format: 1, data: tag.as_bytes().to_vec() })],
    };
    store.claim(p, Epoch(1)).await.unwrap();
    store.write(write(1, "all three up")).await.unwrap();
    // A node down: LOCAL_QUORUM (2 of 3) and LOCAL_SERIAL still succeed.
    cassandra.kill(2);
    let t = Instant::now();
    loop {
        match store.write(write(2, "one down")).await {
            Ok(()) => break,
            Err(e) => {
                assert!(t.elapsed() < Duration::from_secs(60), "no write with a node down: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    let got = store.read(p, &[b"card".to_vec()]).await.unwrap();
    assert_eq!(got[0].as_ref().map(|v| v.data.as_slice()), Some(&b"one down"[..]));
    assert_eq!(store.meta(p).await.unwrap().applied_offset, Some(Offset(2)));
    // A stale owner stays fenced with a node down.
    store.claim(p, Epoch(2)).await.unwrap();
    let zombie = store.write(write(3, "zombie")).await;
    assert!(
        matches!(zombie, Err(StoreError::Fenced { current: Epoch(2), .. })),
        "epoch 1 is fenced by epoch 2: {zombie:?}"
    );
    cassandra.restart(2).await.expect("the killed node restarts on its data");
    assert_eq!(store.meta(p).await.unwrap().applied_offset, Some(Offset(2)));
    cassandra.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn created_topics_answer_at_once_on_every_partition() {
    let kafka = LocalKafka::start(KafkaOptions::default()).await.expect("a local Kafka");
    let names: Vec<String> = (0..20).map(|i| format!("fresh-{i}")).collect();
    let topics: Vec<(&str, i32)> = names.iter().map(|n| (n.as_str(), PARTITIONS)).collect();
    create_topics(&kafka.bootstrap, &topics, 1).await.unwrap();
    // A plain watermark request, asked once: right after creation a partition's leader may not
    // know it leads yet (NotLeaderForPartition), which create_topics must have waited out.
    let consumer: BaseConsumer = partita_runtime::kafka::client_config(&kafka.bootstrap).create().unwrap();
    tokio::task::block_in_place(|| {
        for (topic, n) in &topics {
            for p in 0..*n {
                if let Err(e) = consumer.fetch_watermarks(topic, p, Duration::from_secs(5)) {
                    panic!("{topic}/{p} not ready after create_topics returned: {e}");
                }
            }
        }
    });
    kafka.stop().await;
}
