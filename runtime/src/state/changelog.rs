//! RocksDB state that follows its partition: every state write first goes to a **changelog
//! topic** (compacted, partitioned like the input) in a Kafka transaction, then to the local
//! RocksDB; a node that claims a partition restores it from the changelog before it resumes. The
//! design, its wire format and why it is correct: `docs/state.md`, "RocksDB changelog".
//!
//! Fencing across nodes: each partition has one transactional producer per owner, with
//! `transactional.id` = `partita-<group>-<changelog topic>-<partition>`. A new owner's
//! `init_transactions` bumps the producer epoch: the previous owner's next transaction fails
//! `ProducerFenced` (its state write is then `Fenced` and never reaches its RocksDB), and its
//! open transaction is aborted. Restores read `read_committed`, so a zombie's unfinished writes
//! are never restored, and compaction never keeps an aborted record.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use partita_actors::state::{
    Epoch, Offset, PartitionId, PartitionMeta, StateStore, StateValue, StateWrite, StoreError,
};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset as KOffset, TopicPartitionList};

use super::rocks::RocksStore;
use crate::kafka::KafkaTier;

/// Changelog record keys: a tag byte, then (for state) the state key.
const STATE: u8 = b's';
/// The partition's applied offset after a write (value: i64 big-endian).
const APPLIED: u8 = b'm';
/// How long a transaction step or a restore read may take before the write or claim fails as
/// unavailable (and is retried).
const TIMEOUT: Duration = Duration::from_secs(30);

/// A RocksDB store whose writes go through a changelog topic first.
#[derive(Clone)]
pub struct ChangelogStore {
    local: RocksStore,
    inner: Arc<Inner>,
}

struct Inner {
    tier: KafkaTier,
    topic: String,
    group: String,
    /// The transactional producer of each partition this node claimed, with the claim's epoch.
    producers: Mutex<HashMap<PartitionId, (Epoch, Arc<FutureProducer>)>>,
}

impl std::fmt::Debug for ChangelogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangelogStore")
            .field("local", &self.local)
            .field("topic", &self.inner.topic)
            .finish()
    }
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable { detail: format!("changelog: {e}") }
}

/// A fenced producer (librdkafka reports it as its own `Fenced`, or the broker's codes) or any
/// fatal transactional error: this producer is done (another node took the transactional id, or
/// the client cannot go on). Anything else is worth retrying.
fn is_fenced(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::Fenced
                | RDKafkaErrorCode::ProducerFenced
                | RDKafkaErrorCode::InvalidProducerEpoch
        )
    ) || matches!(e, KafkaError::Transaction(t) if t.is_fatal())
}

impl ChangelogStore {
    /// `local` keeps the state; `topic` (on `tier`) is the changelog; `group` names the
    /// transactional ids (one consumer group = one set of owners).
    pub fn new(local: RocksStore, tier: KafkaTier, topic: &str, group: &str) -> Self {
        let inner = Inner {
            tier,
            topic: topic.to_owned(),
            group: group.to_owned(),
            producers: Mutex::new(HashMap::new()),
        };
        Self { local, inner: Arc::new(inner) }
    }

    /// Refuse a changelog topic that is missing or not compacted: with `cleanup.policy=delete` the
    /// broker would drop old states after the retention time, and a restore would lose them.
    pub async fn check_topic(&self, input_topic: &str) -> anyhow::Result<()> {
        use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
        use rdkafka::client::DefaultClientContext;
        let topic = &self.inner.topic;
        let client: BaseConsumer = self.inner.tier.client_config(&[]).create()?;
        let names = [topic.clone(), input_topic.to_owned()];
        let counts = tokio::task::spawn_blocking(move || {
            client.fetch_metadata(None, Duration::from_secs(10)).map(|m| {
                names.map(|n| {
                    m.topics()
                        .iter()
                        .filter(|t| t.name() == n && t.error().is_none())
                        .map(|t| t.partitions().len())
                        .sum::<usize>()
                })
            })
        })
        .await??;
        let [partitions, input] = counts;
        anyhow::ensure!(
            partitions > 0,
            "changelog topic {topic} not found on {}: create it compacted (cleanup.policy=compact) with as many partitions as the input",
            self.inner.tier.bootstrap
        );
        anyhow::ensure!(
            partitions >= input,
            "changelog topic {topic} has {partitions} partitions, the input {input_topic} has {input}: the changelog needs one per input partition"
        );
        let admin: AdminClient<DefaultClientContext> = self.inner.tier.client_config(&[]).create()?;
        let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
        let described = admin.describe_configs(&[ResourceSpecifier::Topic(topic)], &opts).await;
        let policy = match described.as_deref() {
            Ok([Ok(config)]) => config.get("cleanup.policy").and_then(|e| e.value.clone()),
            Ok([Err(e)]) => anyhow::bail!("describing changelog topic {topic}: {e}"),
            other => anyhow::bail!("describing changelog topic {topic}: {other:?}"),
        };
        anyhow::ensure!(
            policy.as_deref() == Some("compact"),
            "changelog topic {topic} has cleanup.policy {policy:?}: it must be compacted (and only compacted), or the broker drops states a restore needs"
        );
        Ok(())
    }

    /// Drop `p`'s producer if it is still the one claimed at `epoch`.
    fn forget_producer(&self, p: PartitionId, epoch: Epoch) {
        let mut producers = self.inner.producers.lock().unwrap();
        if producers.get(&p).is_some_and(|(claimed, _)| *claimed == epoch) {
            producers.remove(&p);
        }
    }

    /// The producer of `p` for a write at `epoch`: `Fenced` if this node has not claimed `p`, or
    /// claimed it again since (an earlier actor's write must not go out through the new claim's
    /// transactions).
    fn producer(&self, p: PartitionId, epoch: Epoch) -> Result<Arc<FutureProducer>, StoreError> {
        match self.inner.producers.lock().unwrap().get(&p) {
            Some((claimed, producer)) if *claimed == epoch => Ok(producer.clone()),
            Some((claimed, _)) => Err(StoreError::Fenced { partition: p, epoch, current: *claimed }),
            None => Err(StoreError::Fenced { partition: p, epoch, current: Epoch(epoch.0 + 1) }),
        }
    }

    /// A transactional producer for `p`, initialised (which fences every earlier one).
    async fn new_producer(&self, p: PartitionId) -> Result<Arc<FutureProducer>, StoreError> {
        let id = format!("partita-{}-{}-{}", self.inner.group, self.inner.topic, p.0);
        let producer: FutureProducer = self
            .inner
            .tier
            .client_config(&[
                ("transactional.id", &id),
                ("enable.idempotence", "true"),
                ("acks", "all"),
                ("linger.ms", "1"),
                ("transaction.timeout.ms", "60000"),
            ])
            .create()
            .map_err(unavailable)?;
        let producer = Arc::new(producer);
        let init = producer.clone();
        tokio::task::spawn_blocking(move || init.init_transactions(TIMEOUT))
            .await
            .map_err(unavailable)?
            .map_err(unavailable)?;
        Ok(producer)
    }

    /// Everything the changelog holds for `p` (committed records only).
    fn read_changelog(&self, p: PartitionId) -> Result<Restored, StoreError> {
        let consumer: BaseConsumer = self
            .inner
            .tier
            .client_config(&[])
            .set("isolation.level", "read_committed")
            // librdkafka assigns only in a group; this one never joins or commits.
            .set("group.id", format!("partita-restore-{}", std::process::id()))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            // The end is reached when a fetch comes back empty: don't let the broker hold it for
            // the default 500 ms.
            .set("fetch.wait.max.ms", "10")
            .create()
            .map_err(unavailable)?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.inner.topic, p.0 as i32, KOffset::Beginning).map_err(unavailable)?;
        consumer.assign(&tpl).map_err(unavailable)?;
        let mut r = Restored::default();
        // A restore takes as long as the partition is large; it fails only when nothing arrives
        // for TIMEOUT.
        let mut deadline = std::time::Instant::now() + TIMEOUT;
        loop {
            if std::time::Instant::now() > deadline {
                return Err(unavailable(format!(
                    "reading {}/{}: nothing for {TIMEOUT:?}",
                    self.inner.topic, p.0
                )));
            }
            match consumer.poll(Duration::from_millis(500)) {
                None => continue,
                Some(Err(KafkaError::PartitionEOF(_))) => break,
                Some(Err(e)) => return Err(unavailable(e)),
                Some(Ok(m)) => {
                    deadline = std::time::Instant::now() + TIMEOUT;
                    let (key, value) = (m.key().unwrap_or_default(), m.payload().unwrap_or_default());
                    r.records += 1;
                    r.bytes += (key.len() + value.len()) as u64;
                    match key.split_first() {
                        Some((&STATE, k)) => {
                            r.entries.insert(k.to_vec(), StateValue::decode(value)?);
                        }
                        Some((&APPLIED, _)) => {
                            let b: [u8; 8] = value.try_into().map_err(|_| StoreError::Corrupt {
                                detail: format!("changelog applied offset of {} bytes", value.len()),
                            })?;
                            r.applied = Some(Offset(i64::from_be_bytes(b)));
                        }
                        _ => {
                            return Err(StoreError::Corrupt {
                                detail: format!("changelog record with key tag {:?}", key.first()),
                            });
                        }
                    }
                }
            }
        }
        Ok(r)
    }
}

/// A partition as the changelog holds it.
#[derive(Debug, Default)]
struct Restored {
    /// The latest state of every key.
    entries: HashMap<Vec<u8>, StateValue>,
    /// The applied offset of the last write.
    applied: Option<Offset>,
    /// Records and bytes read (compaction leaves about one record per key).
    records: u64,
    bytes: u64,
}

impl StateStore for ChangelogStore {
    async fn read(
        &self,
        partition: PartitionId,
        keys: &[Vec<u8>],
    ) -> Result<Vec<Option<StateValue>>, StoreError> {
        self.local.read(partition, keys).await
    }

    /// The changelog transaction first (fenced if another node claimed the partition since), then
    /// the local write.
    async fn write(&self, write: StateWrite) -> Result<(), StoreError> {
        let (p, epoch) = (write.partition, write.epoch);
        let producer = self.producer(p, epoch)?;
        let topic = self.inner.topic.clone();
        let records: Vec<(Vec<u8>, Vec<u8>)> = write
            .entries
            .iter()
            .map(|(k, v)| ([&[STATE][..], k].concat(), v.encode()))
            .chain(std::iter::once((vec![APPLIED], write.applied_offset.0.to_be_bytes().to_vec())))
            .collect();
        // Send, then wait for every record's acknowledgement here: rdkafka's commit flushes by
        // polling in steps of 100 ms, and with the FutureProducer's own thread serving the
        // delivery reports a commit with anything outstanding waited one whole step (every
        // transaction took about 100 ms, `b5`). With nothing outstanding it returns at once.
        let delivered: Result<(), KafkaError> = async {
            producer.begin_transaction()?;
            let mut deliveries = Vec::with_capacity(records.len());
            for (k, v) in &records {
                let record = FutureRecord::to(&topic).partition(p.0 as i32).key(k).payload(v);
                deliveries.push(producer.send_result(record).map_err(|(e, _)| e)?);
            }
            for d in futures::future::join_all(deliveries).await {
                match d {
                    Ok(Ok(_)) => {}
                    Ok(Err((e, _))) => return Err(e),
                    Err(_) => return Err(KafkaError::Canceled),
                }
            }
            Ok(())
        }
        .await;
        let txn = producer.clone();
        let sent = tokio::task::spawn_blocking(move || -> Result<(), KafkaError> {
            // A retriable failure (a timeout: the outcome is not known yet) is resumed by
            // committing again; only an abortable one is aborted; a fatal one leaves the producer
            // to be replaced.
            let mut result = delivered.and_then(|()| txn.commit_transaction(TIMEOUT));
            for _ in 0..3 {
                match &result {
                    Err(KafkaError::Transaction(t)) if t.is_retriable() => {
                        result = txn.commit_transaction(TIMEOUT)
                    }
                    _ => break,
                }
            }
            let abortable = match &result {
                Err(KafkaError::Transaction(t)) => t.txn_requires_abort(),
                // A failed delivery: the transaction cannot commit.
                Err(e) => !is_fenced(e),
                Ok(()) => false,
            };
            if abortable {
                let _ = txn.abort_transaction(TIMEOUT);
            }
            result
        })
        .await
        .map_err(unavailable)?;
        match sent {
            Ok(()) => self.local.write(write).await,
            Err(e) if is_fenced(&e) => {
                // Another node holds the transactional id (or the producer is unusable): this
                // partition's writes from this claim are over.
                self.forget_producer(p, epoch);
                Err(StoreError::Fenced { partition: p, epoch, current: Epoch(epoch.0 + 1) })
            }
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn meta(&self, partition: PartitionId) -> Result<PartitionMeta, StoreError> {
        self.local.meta(partition).await
    }

    /// Revoked or lost: the next claim of the partition takes the transactional id anew.
    fn release(&self, partition: PartitionId) {
        self.inner.producers.lock().unwrap().remove(&partition);
    }

    /// Claim locally; take the changelog's transactional id (fencing the previous owner) unless
    /// this claim restarts the partition's actor on a node that still holds the id (taking it
    /// again would fence a node the group may have given the partition to meanwhile; a fenced id
    /// shows at the first write); then restore the partition from the changelog, replacing
    /// whatever this node held.
    async fn claim(&self, partition: PartitionId, epoch: Epoch) -> Result<PartitionMeta, StoreError> {
        let p = partition;
        let local = self.local.claim(p, epoch).await?;
        let held = self.inner.producers.lock().unwrap().get(&p).map(|(_, producer)| producer.clone());
        let producer = match held {
            Some(producer) => producer,
            None => self.new_producer(p).await?,
        };
        let started = std::time::Instant::now();
        let this = self.clone();
        let Restored { entries, applied, records, bytes } =
            tokio::task::spawn_blocking(move || this.read_changelog(p)).await.map_err(unavailable)??;
        if applied.is_none()
            && let Some(mine) = local.applied_offset
        {
            // Recreated, mistyped, or switched on after this node applied records: replacing the
            // partition by nothing would lose its state.
            return Err(StoreError::Corrupt {
                detail: format!(
                    "changelog {} holds nothing for partition {} but this node's RocksDB applied it up to offset {}; refusing to replace that state",
                    self.inner.topic, p.0, mine.0
                ),
            });
        }
        let keys = entries.len();
        self.local.restore(p, epoch, applied, entries.into_iter().collect()).await?;
        let secs = started.elapsed().as_secs_f64();
        tracing::info!(
            partition = p.0,
            keys,
            records,
            bytes,
            applied = ?applied.map(|o| o.0),
            seconds = secs,
            keys_per_second = (keys as f64 / secs.max(1e-6)) as u64,
            "partition restored from the changelog"
        );
        self.inner.producers.lock().unwrap().insert(p, (epoch, producer));
        Ok(PartitionMeta { applied_offset: applied, epoch })
    }
}
