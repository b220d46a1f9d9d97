//! `partita loadgen`: an open-loop producer of input events at a fixed rate (Zipf-distributed
//! keys, per-key sequence numbers, optionally a share of bad records of every kind), and a reader
//! of the scores and dead-letter topics that measures end-to-end latency and checks that every
//! record came back exactly once.
//!
//! Latency counts from the moment an event was *scheduled* to be sent (its event time), not from
//! when the producer got to it, so a stalled pipeline cannot hide its delay (no coordinated
//! omission). One machine, one clock.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use hdrhistogram::Histogram;
use partita_actors::partition::{HEADER_SOURCE_OFFSET, HEADER_SOURCE_PARTITION, unix_micros};
use partita_proto::v1::{DeadLetter, Event, InferBatchRequest, Score};
use prost::Message as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use serde::Serialize;

use crate::kafka::owned_headers;

#[derive(Debug, Clone, Args)]
pub struct LoadgenOptions {
    #[arg(long, env = "PARTITA_INGESTION_BOOTSTRAP", default_value = "127.0.0.1:9092")]
    pub bootstrap: String,
    /// Where scores and dead letters are read (default: --bootstrap).
    #[arg(long, env = "PARTITA_PROCESSING_BOOTSTRAP")]
    pub processing_bootstrap: Option<String>,
    #[arg(long, default_value = "transactions")]
    pub topic: String,
    #[arg(long, default_value = "scores")]
    pub scores_topic: String,
    #[arg(long, default_value = "transactions.dlq")]
    pub dlq_topic: String,
    /// Events per second (open loop).
    #[arg(long, default_value_t = 2000.0)]
    pub rate: f64,
    /// How long to produce.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    pub duration: Duration,
    /// Distinct keys (cards).
    #[arg(long, default_value_t = 1_000_000)]
    pub keys: usize,
    /// Zipf exponent of the key distribution. A key's events apply one after another, so a key
    /// far hotter than a card ever is (Zipf 1.1 gives one key 10 % of all events) measures that
    /// chain rather than the pipeline; 0.6 over a million cards gives the hottest 0.2 %.
    #[arg(long, default_value_t = 0.6)]
    pub zipf: f64,
    /// Share of events on one hot key (0 to 1; its card is [`HOT_CARD`]), the rest over `keys`
    /// by `zipf`: a test card, a bot, a merchant-keyed model. The report gives its latency and the
    /// other keys' apart.
    #[arg(long, default_value_t = 0.0)]
    pub hot_share: f64,
    /// Share of bad records, spread over every kind (0 to 1).
    #[arg(long, default_value_t = 0.0)]
    pub bad_ratio: f64,
    /// Features per event (the model's input size).
    #[arg(long, default_value_t = 16)]
    pub features: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Namespace of this run's card keys (default: the start time, so runs never share cards).
    #[arg(long)]
    pub run_id: Option<u64>,
    /// After producing, how long to wait for the last outputs.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "15s")]
    pub drain: Duration,
    /// Print a line per second instead of a progress bar (the default when not on a terminal).
    #[arg(long)]
    pub plain: bool,
}

impl LoadgenOptions {
    /// Defaults against `bootstrap` (demo, tests, benchmarks).
    pub fn local(bootstrap: &str) -> Self {
        let mut o: LoadgenOptions = crate::node::config::defaults();
        o.bootstrap = bootstrap.to_owned();
        o
    }
}

/// The kinds of bad record the generator mixes in, and the dead-letter reason each must get.
pub const BAD_KINDS: &[(&str, &str)] = &[
    ("empty value", "INVALID_FIELDS"),
    ("truncated protobuf", "DECODE"),
    ("length prefix claiming 2 GiB", "DECODE"),
    ("invalid UTF-8", "DECODE"),
    ("another message type", "SCHEMA"),
    ("unsupported schema version", "SCHEMA"),
    ("record over the size limit", "TOO_LARGE"),
    ("wrong feature count", "SHAPE"),
    ("NaN feature", "VALUE_RANGE"),
    ("unknown model", "UNKNOWN_MODEL"),
    ("no record key", "NO_KEY"),
    ("64 headers", "HEADERS"),
    ("sequence 0", "INVALID_FIELDS"),
    ("duplicate of an applied event", "DUPLICATE"),
];

/// Zipf(s) over 0..n by inverse-CDF sampling on a precomputed table (built once).
#[derive(Debug, Clone)]
pub struct Zipf {
    cdf: Vec<f64>,
    rng: XorShift,
}

impl Zipf {
    pub fn new(n: usize, s: f64, seed: u64) -> Self {
        let mut cdf = Vec::with_capacity(n);
        let mut sum = 0.0;
        for i in 1..=n {
            sum += 1.0 / (i as f64).powf(s);
            cdf.push(sum);
        }
        for c in &mut cdf {
            *c /= sum;
        }
        Self { cdf, rng: XorShift::new(seed) }
    }

    pub fn sample(&mut self) -> u64 {
        let u = self.rng.unit();
        self.cdf.partition_point(|c| *c < u) as u64
    }
}

/// xorshift64: deterministic, fast, good enough for load shapes.
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The card of the hot key (`--hot-share`).
pub const HOT_CARD: u64 = u64::MAX;

/// The record key of card `k` in run `run` (each run has its own cards, so a second run against
/// the same state does not replay sequence numbers the first one applied).
pub fn card_key(run: u64, k: u64) -> Vec<u8> {
    format!("card-{run}-{k:08}").into_bytes()
}

/// One generated record.
#[derive(Debug, Clone)]
pub struct GenRecord {
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
    /// `None` for a good event; else the index into [`BAD_KINDS`].
    pub bad: Option<usize>,
}

/// The event stream: deterministic for a seed, good events in per-key sequence.
#[derive(Debug)]
pub struct Generator {
    run: u64,
    zipf: Zipf,
    rng: XorShift,
    features: usize,
    bad_ratio: f64,
    next_bad: usize,
    sequences: HashMap<u64, u64>,
    last_good: HashMap<u64, Vec<u8>>,
    produced: u64,
    hot_share: f64,
}

impl Generator {
    pub fn new(run: u64, keys: usize, zipf: f64, features: usize, bad_ratio: f64, seed: u64) -> Self {
        Self {
            run,
            zipf: Zipf::new(keys, zipf, seed),
            rng: XorShift::new(seed ^ 0x5151),
            features,
            bad_ratio,
            next_bad: 0,
            sequences: HashMap::new(),
            last_good: HashMap::new(),
            produced: 0,
            hot_share: 0.0,
        }
    }

    /// A share `share` of the events on [`HOT_CARD`].
    pub fn with_hot_share(mut self, share: f64) -> Self {
        self.hot_share = share;
        self
    }

    /// The next record, stamped with `event_time` (µs since the epoch).
    pub fn record(&mut self, event_time: i64) -> GenRecord {
        self.produced += 1;
        let card = if self.hot_share > 0.0 && self.rng.unit() < self.hot_share {
            HOT_CARD
        } else {
            self.zipf.sample()
        };
        let key = card_key(self.run, card);
        let seq = self.sequences.get(&card).copied().unwrap_or(0) + 1;
        let mut event = Event {
            event_id: format!("ev-{}", self.produced),
            key: key.clone(),
            sequence: seq,
            event_time_unix_micros: event_time,
            features: (0..self.features).map(|_| (self.rng.unit() * 2.0 - 1.0) as f32).collect(),
            schema_version: 1,
            model: String::new(),
        };
        if self.bad_ratio > 0.0 && self.rng.unit() < self.bad_ratio {
            let kind = self.next_bad % BAD_KINDS.len();
            self.next_bad += 1;
            if let Some(rec) = self.bad(kind, card, &key, &mut event) {
                return rec;
            }
        }
        self.sequences.insert(card, seq);
        let value = event.encode_to_vec();
        self.last_good.insert(card, value.clone());
        GenRecord { key: Some(key), value, headers: Vec::new(), bad: None }
    }

    fn bad(&mut self, kind: usize, card: u64, key: &[u8], event: &mut Event) -> Option<GenRecord> {
        let rec = |key: Option<&[u8]>, value: Vec<u8>| GenRecord {
            key: key.map(<[u8]>::to_vec),
            value,
            headers: Vec::new(),
            bad: Some(kind),
        };
        let k = Some(key);
        Some(match BAD_KINDS[kind].0 {
            "empty value" => rec(k, Vec::new()),
            "truncated protobuf" => {
                let mut v = event.encode_to_vec();
                v.truncate(v.len() / 2);
                rec(k, v)
            }
            "length prefix claiming 2 GiB" => rec(k, vec![0x12, 0x80, 0x80, 0x80, 0x80, 0x08, 1, 2, 3]),
            "invalid UTF-8" => rec(k, vec![0x0a, 0x02, 0xff, 0xfe]),
            "another message type" => {
                rec(k, InferBatchRequest { model: "fraud_gru".into(), rows: vec![] }.encode_to_vec())
            }
            "unsupported schema version" => {
                event.schema_version = 2;
                rec(k, event.encode_to_vec())
            }
            "record over the size limit" => rec(k, vec![0x55; 100 * 1024]),
            "wrong feature count" => {
                event.features.pop();
                rec(k, event.encode_to_vec())
            }
            "NaN feature" => {
                event.features[0] = f32::NAN;
                rec(k, event.encode_to_vec())
            }
            "unknown model" => {
                event.model = "no_such_model".into();
                rec(k, event.encode_to_vec())
            }
            "no record key" => rec(None, event.encode_to_vec()),
            "64 headers" => {
                let mut r = rec(k, event.encode_to_vec());
                r.headers = (0..64).map(|i| (format!("x-h{i}"), b"v".to_vec())).collect();
                r
            }
            "sequence 0" => {
                event.sequence = 0;
                rec(k, event.encode_to_vec())
            }
            "duplicate of an applied event" => rec(k, self.last_good.get(&card)?.clone()),
            other => unreachable!("bad kind {other} has no generator"),
        })
    }
}

/// One output seen on the scores or dead-letter topic.
#[derive(Debug, Clone)]
pub enum Output {
    Score(Score),
    DeadLetter(DeadLetter),
}

/// Reads the scores and dead-letter topics from their ends at start, on its own thread.
pub struct OutputReader {
    stop: Arc<AtomicBool>,
    shared: Arc<ReaderShared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct ReaderShared {
    outputs: Mutex<Vec<(i32, i64, Output)>>,
    produced_ms: Mutex<Vec<i64>>,
    /// Distinct source (partition, offset) seen.
    unique: AtomicU64,
    duplicates: AtomicU64,
    scored: AtomicU64,
    reasons: Mutex<BTreeMap<String, u64>>,
    /// The scores' stage latencies, µs, in [`STAGES`] order.
    stages: Mutex<Vec<Histogram<u64>>>,
    latency: Mutex<Option<Histogram<u64>>>,
    /// The hot key ([`OutputReader::track_hot`]), and the latency of its scores and of the
    /// others' apart.
    hot_key: Mutex<Option<Vec<u8>>>,
    hot_latency: Mutex<Option<Histogram<u64>>>,
    cold_latency: Mutex<Option<Histogram<u64>>>,
    /// Latency since the last progress line.
    window: Mutex<Option<Histogram<u64>>>,
    /// When the latest new source record was answered.
    last_answer: Mutex<Option<Instant>>,
}

impl OutputReader {
    /// Start reading `scores` and `dlq` on `bootstrap` from their current ends.
    pub fn start(bootstrap: &str, scores: &str, dlq: &str, keep: bool) -> anyhow::Result<Self> {
        let consumer: BaseConsumer = crate::kafka::client_config(bootstrap)
            .set("group.id", format!("partita-loadgen-{}", std::process::id()))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", "10")
            .create()
            .context("creating the output reader")?;
        let mut tpl = TopicPartitionList::new();
        for topic in [scores, dlq] {
            let md = consumer
                .fetch_metadata(Some(topic), Duration::from_secs(10))
                .with_context(|| format!("metadata of {topic}"))?;
            let parts: Vec<i32> =
                md.topics().iter().flat_map(|t| t.partitions().iter().map(|p| p.id())).collect();
            anyhow::ensure!(!parts.is_empty(), "topic {topic} does not exist");
            for p in parts {
                let (_, high) = crate::kafka::watermarks(&consumer, topic, p, Duration::from_secs(10))?;
                tpl.add_partition_offset(topic, p, Offset::Offset(high))?;
            }
        }
        consumer.assign(&tpl).context("assigning the output topics")?;
        let shared = Arc::new(ReaderShared {
            latency: Mutex::new(Some(Histogram::new_with_bounds(1, 600_000_000, 3)?)),
            hot_latency: Mutex::new(Some(Histogram::new_with_bounds(1, 600_000_000, 3)?)),
            cold_latency: Mutex::new(Some(Histogram::new_with_bounds(1, 600_000_000, 3)?)),
            window: Mutex::new(Some(Histogram::new_with_bounds(1, 600_000_000, 3)?)),
            stages: Mutex::new(
                STAGES
                    .iter()
                    .map(|_| Histogram::new_with_bounds(1, 600_000_000, 3))
                    .collect::<Result<_, _>>()?,
            ),
            ..ReaderShared::default()
        });
        let stop = Arc::new(AtomicBool::new(false));
        let scores_topic = scores.to_owned();
        let thread = {
            let (stop, shared) = (stop.clone(), shared.clone());
            std::thread::Builder::new().name("partita-loadgen-reader".into()).spawn(move || {
                let mut seen: HashSet<(i32, i64)> = HashSet::new();
                while !stop.load(Ordering::SeqCst) {
                    let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) else { continue };
                    let now = unix_micros();
                    let payload = m.payload().unwrap_or_default();
                    let out = if m.topic() == scores_topic {
                        let Ok(s) = Score::decode(payload) else { continue };
                        let us = now.saturating_sub(s.event_time_unix_micros).max(1) as u64;
                        let hot = shared.hot_key.lock().unwrap().as_ref().is_some_and(|k| *k == s.key);
                        let class = if hot { &shared.hot_latency } else { &shared.cold_latency };
                        for h in [&shared.latency, &shared.window, class] {
                            if let Some(h) = h.lock().unwrap().as_mut() {
                                h.saturating_record(us);
                            }
                        }
                        shared.scored.fetch_add(1, Ordering::Relaxed);
                        let l = s.latency.unwrap_or_default();
                        // What the node does not see: from handing the score to its producer to
                        // this reader having it (produce, acknowledgement, this fetch).
                        let delivery = us.saturating_sub(l.fetch_us + l.node_us);
                        let stages =
                            [l.fetch_us, l.node_us, l.queue_us, l.compute_us, l.state_load_us, delivery];
                        for (h, v) in shared.stages.lock().unwrap().iter_mut().zip(stages) {
                            h.saturating_record(v.max(1));
                        }
                        Output::Score(s)
                    } else {
                        let Ok(d) = DeadLetter::decode(payload) else { continue };
                        *shared
                            .reasons
                            .lock()
                            .unwrap()
                            .entry(d.reason().as_str_name().to_owned())
                            .or_default() += 1;
                        Output::DeadLetter(d)
                    };
                    let source = source_of(&m).unwrap_or((-1, m.offset()));
                    if seen.insert(source) {
                        shared.unique.fetch_add(1, Ordering::Relaxed);
                        *shared.last_answer.lock().unwrap() = Some(Instant::now());
                    } else {
                        shared.duplicates.fetch_add(1, Ordering::Relaxed);
                    }
                    if keep {
                        shared.outputs.lock().unwrap().push((source.0, source.1, out));
                        shared.produced_ms.lock().unwrap().push(m.timestamp().to_millis().unwrap_or(-1));
                    }
                }
            })?
        };
        Ok(Self { stop, shared, thread: Some(thread) })
    }

    /// Count `key`'s scores apart from the others' ([`ReaderResult::hot_latency_us`]).
    pub fn track_hot(&self, key: Vec<u8>) {
        *self.shared.hot_key.lock().unwrap() = Some(key);
    }

    /// Distinct source records answered so far (scores and dead letters).
    pub fn unique(&self) -> u64 {
        self.shared.unique.load(Ordering::Relaxed)
    }

    /// p99 end-to-end latency (ms) of the scores seen since the last call.
    pub fn window_p99_ms(&self) -> f64 {
        let mut w = self.shared.window.lock().unwrap();
        let Some(h) = w.as_mut() else { return 0.0 };
        let p99 = h.value_at_quantile(0.99) as f64 / 1000.0;
        h.reset();
        p99
    }

    /// Stop reading and return what was seen.
    pub fn finish(mut self) -> ReaderResult {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let sh = &self.shared;
        ReaderResult {
            outputs: std::mem::take(&mut *sh.outputs.lock().unwrap()),
            produced_ms: std::mem::take(&mut *sh.produced_ms.lock().unwrap()),
            latency_us: sh.latency.lock().unwrap().take().expect("histogram taken once"),
            hot_latency_us: sh.hot_latency.lock().unwrap().take().expect("histogram taken once"),
            cold_latency_us: sh.cold_latency.lock().unwrap().take().expect("histogram taken once"),
            unique: sh.unique.load(Ordering::Relaxed),
            duplicates: sh.duplicates.load(Ordering::Relaxed),
            scores: sh.scored.load(Ordering::Relaxed),
            last_answer: *sh.last_answer.lock().unwrap(),
            stages: std::mem::take(&mut *sh.stages.lock().unwrap()),
            dead_letters_by_reason: std::mem::take(&mut *sh.reasons.lock().unwrap()),
        }
    }
}

/// What an [`OutputReader`] saw.
#[derive(Debug)]
pub struct ReaderResult {
    /// (source partition, source offset, output), when the reader was told to keep them.
    pub outputs: Vec<(i32, i64, Output)>,
    /// When each of `outputs` was produced (its record's timestamp, ms since the epoch; -1: none).
    pub produced_ms: Vec<i64>,
    /// End-to-end latency of every score seen, µs.
    pub latency_us: Histogram<u64>,
    /// ... of the tracked hot key's scores, and of the other keys' (all, when none is tracked).
    pub hot_latency_us: Histogram<u64>,
    pub cold_latency_us: Histogram<u64>,
    /// Distinct source records answered (scores and dead letters).
    pub unique: u64,
    /// Outputs whose source record was answered before.
    pub duplicates: u64,
    /// Score records seen (duplicates included).
    pub scores: u64,
    pub last_answer: Option<Instant>,
    /// The scores' stage latencies, µs, in [`STAGES`] order.
    pub stages: Vec<Histogram<u64>>,
    pub dead_letters_by_reason: BTreeMap<String, u64>,
}

/// The source coordinates partita puts in an output's headers.
pub fn source_of<M: Message>(m: &M) -> Option<(i32, i64)> {
    let headers = m.headers()?;
    let get = |name: &str| {
        headers
            .iter()
            .find(|h| h.key == name)
            .and_then(|h| std::str::from_utf8(h.value?).ok().map(str::to_owned))
    };
    Some((get(HEADER_SOURCE_PARTITION)?.parse().ok()?, get(HEADER_SOURCE_OFFSET)?.parse().ok()?))
}

/// Counts delivery failures of the load producer.
#[derive(Default)]
struct DeliveryCounter {
    failed: AtomicU64,
}

impl ClientContext for DeliveryCounter {}
impl ProducerContext for DeliveryCounter {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if result.is_err() {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Send `rec` to `topic` with the delivery `opaque`, waiting while the producer's queue is full.
pub fn send<C: ProducerContext>(
    producer: &BaseProducer<C>,
    topic: &str,
    rec: &GenRecord,
    opaque: C::DeliveryOpaque,
) -> anyhow::Result<()> {
    let mut record: BaseRecord<'_, [u8], [u8], C::DeliveryOpaque> = BaseRecord::with_opaque_to(topic, opaque)
        .payload(&rec.value[..])
        .headers(owned_headers(&rec.headers));
    if let Some(k) = &rec.key {
        record = record.key(&k[..]);
    }
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                producer.poll(Duration::from_millis(1));
            }
            Err((e, _)) => return Err(e).context("producing"),
        }
    }
}

/// The stages a score's latency is split into, in order along its path: from its event time to
/// the node receiving it; in the node (receive to handing the score to the producer), of which
/// the inference queue, the forward pass and the state load are parts; from the node's producer
/// to the reader (produce, acknowledgement, the reader's fetch).
pub const STAGES: [&str; 6] = ["fetch", "in node", "inference queue", "forward", "state load", "delivery"];

/// One stage's time per score, ms.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct StageTime {
    pub stage: &'static str,
    pub mean_ms: f64,
    pub p99_ms: f64,
}

/// What a load run saw.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub offered_rate: f64,
    pub produce_seconds: f64,
    pub sent: u64,
    pub sent_bad: u64,
    pub send_failures: u64,
    pub scored: u64,
    pub dead_letters: u64,
    /// Sent records with no score and no dead letter when the reader stopped.
    pub missing: u64,
    /// Outputs seen more than once (same source partition/offset; at least once after a crash).
    pub duplicates: u64,
    /// Scores per second over the produce window.
    pub throughput: f64,
    /// Records answered per second from the first send to the last answer: the capacity when the
    /// offered rate is above it.
    pub answered_rate: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// Share of scores within 50 ms end to end.
    pub under_50ms: f64,
    /// With `--hot-share`: records sent on the hot key (bad ones included), its scores' latency,
    /// and the other keys' p99 (without: the hot figures are 0 and the cold p99 is everyone's).
    pub hot_sent: u64,
    pub hot_p50_ms: f64,
    pub hot_p99_ms: f64,
    pub cold_p99_ms: f64,
    /// Where the scores' time went, per stage of [`STAGES`] (partita nodes' scores carry their
    /// stage timings); and the end-to-end mean.
    pub stages: Vec<StageTime>,
    pub mean_ms: f64,
    /// Filled by a caller that reads the node's metrics (B4): the node's state writes during the
    /// run (one per batch: states, offset, fsync), their mean, ms, and the fsyncs of RocksDB's
    /// log (writes that arrive together share one); 0 otherwise.
    pub state_writes: u64,
    pub state_write_ms: f64,
    pub wal_syncs: u64,
    pub dead_letters_by_reason: BTreeMap<String, u64>,
    pub bad_sent_by_kind: BTreeMap<String, u64>,
}

/// Run the load: produce for `duration` at `rate`, read outputs until every record is answered
/// or `drain` passes; stops early (with what it saw) once `stop` is set.
pub fn run(opts: &LoadgenOptions, stop: &AtomicBool) -> anyhow::Result<LoadReport> {
    let out_bootstrap = opts.processing_bootstrap.as_deref().unwrap_or(&opts.bootstrap);
    let reader = OutputReader::start(out_bootstrap, &opts.scores_topic, &opts.dlq_topic, false)?;
    let producer: BaseProducer<DeliveryCounter> = crate::kafka::client_config(&opts.bootstrap)
        // As users run producers: idempotent (acks=all, up to 5 requests in flight, order kept per
        // partition and no duplicates across retries).
        .set("enable.idempotence", "true")
        .set("linger.ms", "1")
        .set("queue.buffering.max.messages", "1000000")
        .create_with_context(DeliveryCounter::default())
        .context("creating the load producer")?;
    // Warm up before the clock starts: connect, let the idempotent producer get its id and the
    // reader its first fetch position, so client start-up is not counted as pipeline latency.
    producer
        .client()
        .fetch_metadata(Some(&opts.topic), Duration::from_secs(10))
        .context("input topic metadata")?;
    std::thread::sleep(Duration::from_secs(1));
    let run = opts.run_id.unwrap_or_else(|| (unix_micros() / 1000) as u64);
    anyhow::ensure!(
        (0.0..=1.0).contains(&opts.hot_share),
        "--hot-share {} is not between 0 and 1",
        opts.hot_share
    );
    let mut generator = Generator::new(run, opts.keys, opts.zipf, opts.features, opts.bad_ratio, opts.seed)
        .with_hot_share(opts.hot_share);
    let hot_key = card_key(run, HOT_CARD);
    if opts.hot_share > 0.0 {
        reader.track_hot(hot_key.clone());
    }
    let mut hot_sent = 0u64;
    let total = (opts.rate * opts.duration.as_secs_f64()).round() as u64;
    let progress = Progress::new(total, opts.plain);
    let start_wall = unix_micros();
    let start = Instant::now();
    let mut bad_by_kind: BTreeMap<String, u64> = BTreeMap::new();
    let mut sent = 0u64;
    let mut last_tick = Instant::now();
    while sent < total && !stop.load(Ordering::Relaxed) {
        let due = ((start.elapsed().as_secs_f64() * opts.rate) as u64).min(total);
        if sent >= due {
            producer.poll(Duration::ZERO);
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        while sent < due {
            let scheduled = start_wall + (sent as f64 * 1e6 / opts.rate) as i64;
            let rec = generator.record(scheduled);
            if let Some(k) = rec.bad {
                *bad_by_kind.entry(BAD_KINDS[k].0.to_owned()).or_default() += 1;
            }
            if rec.key.as_ref() == Some(&hot_key) {
                hot_sent += 1;
            }
            send(&producer, &opts.topic, &rec, ())?;
            sent += 1;
        }
        producer.poll(Duration::ZERO);
        if last_tick.elapsed() >= Duration::from_secs(1) {
            last_tick = Instant::now();
            progress.tick(sent, reader.unique(), reader.window_p99_ms());
        }
    }
    producer.flush(Duration::from_secs(30)).context("flushing the load producer")?;
    let produce_seconds = start.elapsed().as_secs_f64();
    let drain_until = Instant::now() + opts.drain;
    while reader.unique() < sent && Instant::now() < drain_until && !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
        if last_tick.elapsed() >= Duration::from_secs(1) {
            last_tick = Instant::now();
            progress.tick(sent, reader.unique(), reader.window_p99_ms());
        }
    }
    progress.done();
    let r = reader.finish();
    let hist = &r.latency_us;
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    let ms_of = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let under = if hist.is_empty() { 0.0 } else { hist.count_between(0, 50_000) as f64 / hist.len() as f64 };
    Ok(LoadReport {
        offered_rate: opts.rate,
        produce_seconds,
        sent,
        sent_bad: bad_by_kind.values().sum(),
        send_failures: producer.context().failed.load(Ordering::Relaxed),
        scored: r.scores,
        dead_letters: r.dead_letters_by_reason.values().sum(),
        missing: sent.saturating_sub(r.unique),
        duplicates: r.duplicates,
        throughput: r.scores as f64 / produce_seconds.max(1e-9),
        answered_rate: r.last_answer.map_or(0.0, |t| r.unique as f64 / (t - start).as_secs_f64().max(1e-9)),
        p50_ms: ms(0.5),
        p90_ms: ms(0.9),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        max_ms: hist.max() as f64 / 1000.0,
        under_50ms: under,
        hot_sent,
        hot_p50_ms: ms_of(&r.hot_latency_us, 0.5),
        hot_p99_ms: ms_of(&r.hot_latency_us, 0.99),
        cold_p99_ms: ms_of(&r.cold_latency_us, 0.99),
        stages: STAGES
            .iter()
            .zip(&r.stages)
            .map(|(name, h)| StageTime {
                stage: name,
                mean_ms: if h.is_empty() { 0.0 } else { h.mean() / 1000.0 },
                p99_ms: h.value_at_quantile(0.99) as f64 / 1000.0,
            })
            .collect(),
        mean_ms: if hist.is_empty() { 0.0 } else { hist.mean() / 1000.0 },
        state_writes: 0,
        state_write_ms: 0.0,
        wal_syncs: 0,
        dead_letters_by_reason: r.dead_letters_by_reason,
        bad_sent_by_kind: bad_by_kind,
    })
}

/// A progress bar on a terminal, a plain line per second otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    total: u64,
}

impl Progress {
    fn new(total: u64, plain: bool) -> Self {
        let bar = (!plain && std::io::stderr().is_terminal()).then(|| {
            let b = indicatif::ProgressBar::new(total);
            b.set_style(
                indicatif::ProgressStyle::with_template("{elapsed:>4} [{bar:30}] {pos}/{len} sent  {msg}")
                    .expect("static template")
                    .progress_chars("=> "),
            );
            b
        });
        Self { bar, total }
    }

    fn tick(&self, sent: u64, answered: u64, p99_ms: f64) {
        let msg = format!("{answered} answered, p99 {p99_ms:.1} ms over the last second");
        match &self.bar {
            Some(b) => {
                b.set_position(sent);
                b.set_message(msg);
            }
            None => eprintln!("loadgen: sent {sent}/{}, {msg}", self.total),
        }
    }

    fn done(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

impl LoadReport {
    /// The human-readable results table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let mut row = |k: &str, v: String| s.push_str(&format!("  {k:<28} {v}\n"));
        row("offered rate", format!("{:.0} events/s for {:.1} s", self.offered_rate, self.produce_seconds));
        row("sent", format!("{} ({} bad)", self.sent, self.sent_bad));
        row("scored", format!("{} ({:.0} scores/s)", self.scored, self.throughput));
        row("dead letters", self.dead_letters.to_string());
        row("missing (no output)", self.missing.to_string());
        row("duplicate outputs", self.duplicates.to_string());
        row(
            "end-to-end latency",
            format!(
                "p50 {:.1} ms  p90 {:.1} ms  p99 {:.1} ms  p99.9 {:.1} ms  max {:.1} ms",
                self.p50_ms, self.p90_ms, self.p99_ms, self.p999_ms, self.max_ms
            ),
        );
        row("under 50 ms", format!("{:.2} %", self.under_50ms * 100.0));
        if self.hot_sent > 0 {
            row(
                "hot key",
                format!(
                    "{} events, p50 {:.1} ms  p99 {:.1} ms; the other keys' p99 {:.1} ms",
                    self.hot_sent, self.hot_p50_ms, self.hot_p99_ms, self.cold_p99_ms
                ),
            );
        }
        row(
            "time per score, ms",
            self.stages
                .iter()
                .map(|t| format!("{} {:.1} (p99 {:.1})", t.stage, t.mean_ms, t.p99_ms))
                .collect::<Vec<_>>()
                .join(", "),
        );
        for (reason, n) in &self.dead_letters_by_reason {
            row(&format!("  DLQ {reason}"), n.to_string());
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hot_share_puts_that_share_on_one_key_whose_sequences_run_on() {
        let mut g = Generator::new(1, 1000, 0.6, 4, 0.0, 7).with_hot_share(0.3);
        let hot = card_key(1, HOT_CARD);
        let mut hot_sequences = Vec::new();
        for _ in 0..10_000 {
            let rec = g.record(0);
            if rec.key.as_ref() == Some(&hot) {
                hot_sequences.push(Event::decode(&rec.value[..]).unwrap().sequence);
            }
        }
        let share = hot_sequences.len() as f64 / 10_000.0;
        assert!((0.28..0.32).contains(&share), "hot share {share}");
        assert!(hot_sequences.iter().copied().eq(1..=hot_sequences.len() as u64), "per-key sequences from 1");
        // Without a hot share, no event lands on the hot card.
        let mut cold = Generator::new(1, 1000, 0.6, 4, 0.0, 7);
        assert!((0..10_000).all(|_| cold.record(0).key.as_ref() != Some(&hot)));
    }
}
