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

use std::collections::{HashMap, HashSet};
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

use super::rocks::{ChangelogChunk, RocksStore};
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
    /// The last claim's restore of each partition.
    restores: Mutex<HashMap<PartitionId, Restore>>,
    /// Partitions this node claims or owns (until released): no standby copy is started for
    /// them.
    owned: Mutex<HashSet<PartitionId>>,
    /// Releases of each partition: a claim still running when its partition was released must
    /// not keep its producer (the next owner fenced it).
    releases: Mutex<HashMap<PartitionId, u64>>,
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

/// The codes of a fenced producer (librdkafka's own `Fenced`, or the broker's): another node took
/// the transactional id.
fn fence_code(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::Fenced | RDKafkaErrorCode::ProducerFenced | RDKafkaErrorCode::InvalidProducerEpoch
    )
}

fn is_fenced(e: &KafkaError) -> bool {
    e.rdkafka_error_code().is_some_and(fence_code)
}

/// A fatal error that is not a fence (an authorization failure, a broken sequence): the producer
/// cannot go on, but no other owner exists.
fn is_fatal(e: &KafkaError) -> bool {
    matches!(e, KafkaError::Transaction(t) if t.is_fatal())
}

impl ChangelogStore {
    /// The local RocksDB copy.
    pub fn local(&self) -> &RocksStore {
        &self.local
    }

    /// `local` keeps the state; `topic` (on `tier`) is the changelog; `group` names the
    /// transactional ids (one consumer group = one set of owners).
    pub fn new(local: RocksStore, tier: KafkaTier, topic: &str, group: &str) -> Self {
        let inner = Inner {
            tier,
            topic: topic.to_owned(),
            group: group.to_owned(),
            producers: Mutex::new(HashMap::new()),
            restores: Mutex::new(HashMap::new()),
            owned: Mutex::new(HashSet::new()),
            releases: Mutex::new(HashMap::new()),
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

    pub(crate) fn tier(&self) -> &KafkaTier {
        &self.inner.tier
    }

    /// A replayer of this store's changelog into its RocksDB.
    pub(crate) fn replayer(&self) -> Result<Replayer, StoreError> {
        Replayer::new(&self.inner.tier, &self.inner.topic, self.local.clone())
    }

    /// Start keeping a standby copy of `p` in `replayer`, unless this node claims or owns it
    /// (then nothing: `Ok(false)`). The copy is written at the epoch read here: a claim marks the
    /// partition owned before it bumps the epoch, so one that starts after this check stops the
    /// copy's writes (they are fenced).
    pub(crate) fn stand_by(&self, replayer: &mut Replayer, p: PartitionId) -> Result<bool, StoreError> {
        let epoch = {
            let owned = self.inner.owned.lock().unwrap();
            if owned.contains(&p) {
                return Ok(false);
            }
            self.local.meta_blocking(p)?.epoch
        };
        replayer.add(p, epoch)?;
        Ok(true)
    }

    fn releases(&self, p: PartitionId) -> u64 {
        self.inner.releases.lock().unwrap().get(&p).copied().unwrap_or_default()
    }

    /// What the last claim of `p` on this node replayed.
    pub fn last_restore(&self, p: PartitionId) -> Option<Restore> {
        self.inner.restores.lock().unwrap().get(&p).copied()
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

    /// Bring this node's copy of `p` up to the changelog's end (committed records only): from its
    /// stored changelog position when that still describes it, else from the beginning after
    /// forgetting the local copy. `epoch` is the claim's (fenced if another claim on this node
    /// overtakes it).
    fn restore(&self, p: PartitionId, epoch: Epoch) -> Result<Restore, StoreError> {
        let mut replayer = self.replayer()?;
        replayer.add(p, epoch)?;
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
            match replayer.poll(Duration::from_millis(500))? {
                Polled::Nothing => {}
                Polled::Record => deadline = std::time::Instant::now() + TIMEOUT,
                Polled::End(_) => break,
            }
        }
        let tail = replayer.tails.remove(&(p.0 as i32)).expect("added above");
        Ok(Restore { after: tail.from, records: tail.records, bytes: tail.bytes })
    }
}

/// What a claim's restore did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restore {
    /// Where the replay started: `Some` after the stored position, `None` from the beginning.
    pub after: Option<i64>,
    /// Records and bytes read (compaction leaves about one record per key).
    pub records: u64,
    pub bytes: u64,
}

/// Changes of one changelog partition read but not yet applied.
struct Tail {
    epoch: Epoch,
    /// The stored position the pending chunk continues.
    after: Option<i64>,
    /// Where this replay started: after this position, or (`None`) from the beginning.
    from: Option<i64>,
    /// Before the replay continues after a stored position, the record at it must be the `m`
    /// record it names with the local applied offset: the changelog is still the log this copy
    /// came from (not a recreated or truncated one that grew past the position).
    verify: Option<(i64, Option<Offset>)>,
    chunk: ChangelogChunk,
    pending: usize,
    pending_bytes: usize,
    /// The last record read ends a transaction (an `m` record): the chunk may be applied.
    at_boundary: bool,
    records: u64,
    bytes: u64,
}

impl Tail {
    fn new(epoch: Epoch, after: Option<i64>, verify: Option<(i64, Option<Offset>)>) -> Self {
        Self {
            epoch,
            after,
            from: after,
            verify,
            chunk: ChangelogChunk::default(),
            pending: 0,
            pending_bytes: 0,
            at_boundary: true,
            records: 0,
            bytes: 0,
        }
    }
}

/// What one poll of a [`Replayer`] brought.
#[derive(Debug, PartialEq)]
pub(crate) enum Polled {
    Nothing,
    Record,
    /// The partition's end was reached and everything read is applied.
    End(PartitionId),
}

/// A chunk is applied (one RocksDB batch) at the first transaction end past this many records or
/// bytes: a replay holds about this much in memory (plus one transaction).
const CHUNK: usize = 4096;
const CHUNK_BYTES: usize = 8 << 20;

/// Replays changelog partitions into the local RocksDB: a claim's restore (one partition, to its
/// end) and a standby's tailing (several, for good). Each chunk ends at a transaction's end and is
/// applied with a compare-and-set on the stored epoch and changelog position
/// ([`RocksStore::apply_changelog`]), so a copy always holds whole transactions.
pub(crate) struct Replayer {
    consumer: BaseConsumer,
    topic: String,
    local: RocksStore,
    tails: HashMap<i32, Tail>,
}

impl Replayer {
    pub(crate) fn new(tier: &KafkaTier, topic: &str, local: RocksStore) -> Result<Self, StoreError> {
        let consumer: BaseConsumer = tier
            .client_config(&[])
            .set("isolation.level", "read_committed")
            // librdkafka assigns only in a group; this one never joins or commits.
            .set("group.id", format!("partita-restore-{}", std::process::id()))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            // A start outside the log is an error, never a silent jump to its end.
            .set("auto.offset.reset", "error")
            // The end is reached when a fetch comes back empty: don't let the broker hold it for
            // the default 500 ms.
            .set("fetch.wait.max.ms", "10")
            .create()
            .map_err(unavailable)?;
        Ok(Self { consumer, topic: topic.to_owned(), local, tails: HashMap::new() })
    }

    pub(crate) fn partitions(&self) -> impl Iterator<Item = PartitionId> + '_ {
        self.tails.keys().map(|p| PartitionId(*p as u32))
    }

    /// Each partition's position applied so far (`None`: nothing yet since a full replay began).
    pub(crate) fn positions(&self) -> impl Iterator<Item = (i32, Option<i64>)> + '_ {
        self.tails.iter().map(|(p, t)| (*p, t.after))
    }

    /// Start replaying `p` into the local copy held at `epoch`: after the stored changelog
    /// position when the changelog still holds it (and it proves to be the record this copy
    /// stopped at, see [`Tail::verify`]), else from the beginning, after forgetting the local copy.
    /// Returns the position it continues after.
    pub(crate) fn add(&mut self, p: PartitionId, epoch: Epoch) -> Result<Option<i64>, StoreError> {
        let partition = p.0 as i32;
        let (low, high) = self
            .consumer
            .fetch_watermarks(&self.topic, partition, Duration::from_secs(10))
            .map_err(unavailable)?;
        let position = self.local.changelog_position(p)?;
        let applied = self.local.meta_blocking(p)?.applied_offset;
        let after = match position {
            Some(at) if at >= low && at < high => Some(at),
            _ => {
                if high <= low
                    && let Some(mine) = applied
                {
                    // Recreated, mistyped, or switched on after this node applied records:
                    // replacing the partition by nothing would lose its state.
                    return Err(StoreError::Corrupt {
                        detail: format!(
                            "changelog {} holds nothing for partition {} but this node's RocksDB applied it up to offset {}; refusing to replace that state",
                            self.topic, p.0, mine.0
                        ),
                    });
                }
                if let Some(at) = position {
                    tracing::warn!(
                        partition = p.0,
                        position = at,
                        low,
                        high,
                        "the changelog no longer holds the position of this node's copy; replaying it whole"
                    );
                }
                self.local.reset(p, epoch)?;
                None
            }
        };
        // From the position's own record (verified, then skipped), or from the beginning.
        self.assign(partition, after.map_or(KOffset::Beginning, KOffset::Offset))?;
        self.tails.insert(partition, Tail::new(epoch, after, after.map(|at| (at, applied))));
        Ok(after)
    }

    fn assign(&self, partition: i32, start: KOffset) -> Result<(), StoreError> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, partition, start).map_err(unavailable)?;
        self.consumer.incremental_assign(&tpl).map_err(unavailable)
    }

    /// Stop replaying `p` (what was read but not applied is dropped: the stored position says
    /// where to continue).
    pub(crate) fn remove(&mut self, p: PartitionId) {
        if self.tails.remove(&(p.0 as i32)).is_some() {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&self.topic, p.0 as i32);
            if let Err(e) = self.consumer.incremental_unassign(&tpl) {
                tracing::warn!(partition = p.0, error = %e, "changelog replay: unassign failed");
            }
        }
    }

    /// Read one record (or the end of a partition); apply a full chunk at a transaction's end.
    pub(crate) fn poll(&mut self, timeout: Duration) -> Result<Polled, StoreError> {
        match self.consumer.poll(timeout) {
            None => Ok(Polled::Nothing),
            Some(Err(KafkaError::PartitionEOF(p))) => {
                let p = PartitionId(p as u32);
                if self.tails.get(&(p.0 as i32)).is_some_and(|t| t.verify.is_some()) {
                    // Nothing at the stored position: it cannot be checked, so it is not trusted.
                    self.replay_whole(p, "the stored position's record is gone")?;
                    return Ok(Polled::Record);
                }
                self.flush(p)?;
                Ok(Polled::End(p))
            }
            // A start outside the log, or a fatal consumer error: this replay cannot go on.
            Some(Err(e @ KafkaError::MessageConsumptionFatal(_))) => Err(unavailable(e)),
            Some(Err(e)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::AutoOffsetReset) => {
                Err(unavailable(e))
            }
            // Anything else (a broker down, a transport error) librdkafka recovers from itself:
            // the replay goes on, bounded by its caller's no-progress timeout.
            Some(Err(e)) => {
                tracing::debug!(error = %e, "changelog replay: consumer error; going on");
                Ok(Polled::Nothing)
            }
            Some(Ok(m)) => {
                let p = PartitionId(m.partition() as u32);
                let Some(tail) = self.tails.get_mut(&(m.partition())) else {
                    return Ok(Polled::Nothing); // removed meanwhile
                };
                let (key, value) = (m.key().unwrap_or_default(), m.payload().unwrap_or_default());
                if let Some((at, applied)) = tail.verify.take() {
                    let same = m.offset() == at
                        && key == [APPLIED]
                        && decode_applied(value).ok().map(Some) == Some(applied);
                    if !same {
                        let why = format!(
                            "the record at the stored position {at} is not the one this copy stopped at (found offset {})",
                            m.offset()
                        );
                        self.replay_whole(p, &why)?;
                    }
                    return Ok(Polled::Record);
                }
                tail.records += 1;
                tail.bytes += (key.len() + value.len()) as u64;
                tail.pending_bytes += key.len() + value.len();
                tail.at_boundary = false;
                match key.split_first() {
                    Some((&STATE, k)) => tail.chunk.entries.push((k.to_vec(), StateValue::decode(value)?)),
                    Some((&APPLIED, _)) => {
                        tail.chunk.applied = Some(decode_applied(value)?);
                        tail.at_boundary = true;
                    }
                    _ => {
                        return Err(StoreError::Corrupt {
                            detail: format!("changelog record with key tag {:?}", key.first()),
                        });
                    }
                }
                tail.chunk.position = m.offset();
                tail.pending += 1;
                if tail.at_boundary && (tail.pending >= CHUNK || tail.pending_bytes >= CHUNK_BYTES) {
                    self.flush(p)?;
                }
                Ok(Polled::Record)
            }
        }
    }

    /// The stored position cannot be trusted: forget the copy and replay `p` from the beginning.
    fn replay_whole(&mut self, p: PartitionId, why: &str) -> Result<(), StoreError> {
        let partition = p.0 as i32;
        let Some(tail) = self.tails.get(&partition) else { return Ok(()) };
        let epoch = tail.epoch;
        tracing::warn!(partition = p.0, reason = why, "changelog replay: replaying the partition whole");
        self.remove(p);
        self.local.reset(p, epoch)?;
        self.assign(partition, KOffset::Beginning)?;
        self.tails.insert(partition, Tail::new(epoch, None, None));
        Ok(())
    }

    /// Apply what was read of `p` up to its last complete transaction (nothing when nothing was,
    /// or while a transaction is half read).
    pub(crate) fn flush(&mut self, p: PartitionId) -> Result<(), StoreError> {
        let Some(tail) = self.tails.get_mut(&(p.0 as i32)) else { return Ok(()) };
        if tail.pending == 0 || !tail.at_boundary {
            return Ok(());
        }
        let chunk = std::mem::take(&mut tail.chunk);
        (tail.pending, tail.pending_bytes) = (0, 0);
        match self.local.apply_changelog(p, tail.epoch, tail.after, &chunk) {
            Ok(()) => {
                tail.after = Some(chunk.position);
                Ok(())
            }
            Err(e) => {
                // What follows no longer continues the stored copy.
                self.remove(p);
                Err(e)
            }
        }
    }
}

fn decode_applied(value: &[u8]) -> Result<Offset, StoreError> {
    let b: [u8; 8] = value.try_into().map_err(|_| StoreError::Corrupt {
        detail: format!("changelog applied offset of {} bytes", value.len()),
    })?;
    Ok(Offset(i64::from_be_bytes(b)))
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
        let delivered: Result<i64, KafkaError> = async {
            producer.begin_transaction()?;
            let mut deliveries = Vec::with_capacity(records.len());
            for (k, v) in &records {
                let record = FutureRecord::to(&topic).partition(p.0 as i32).key(k).payload(v);
                deliveries.push(producer.send_result(record).map_err(|(e, _)| e)?);
            }
            // The applied-offset record goes last: its offset is this write's changelog position.
            let mut position = -1;
            for d in futures::future::join_all(deliveries).await {
                match d {
                    Ok(Ok(delivery)) => position = delivery.offset,
                    Ok(Err((e, _))) => return Err(e),
                    Err(_) => return Err(KafkaError::Canceled),
                }
            }
            Ok(position)
        }
        .await;
        let txn = producer.clone();
        let sent = tokio::task::spawn_blocking(move || -> Result<i64, KafkaError> {
            // A retriable failure (a timeout: the outcome is not known yet) is resumed by
            // committing again; only an abortable one is aborted; a fatal one leaves the producer
            // to be replaced.
            let position = *delivered.as_ref().unwrap_or(&-1);
            let mut result = delivered.and_then(|_| txn.commit_transaction(TIMEOUT));
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
                Err(e) => !is_fenced(e) && !is_fatal(e),
                Ok(()) => false,
            };
            if abortable {
                let _ = txn.abort_transaction(TIMEOUT);
            }
            result.map(|()| position)
        })
        .await
        .map_err(unavailable)?;
        // A fenced producer's queued records fail as purged: its fatal error tells why.
        let fatal = producer.client().fatal_error();
        match sent {
            Ok(position) => self.local.write_logged(write, position).await,
            Err(e) if is_fenced(&e) || fatal.as_ref().is_some_and(|(code, _)| fence_code(*code)) => {
                // Another node holds the transactional id: this partition's writes from this
                // claim are over.
                self.forget_producer(p, epoch);
                Err(StoreError::Fenced { partition: p, epoch, current: Epoch(epoch.0 + 1) })
            }
            Err(e) if is_fatal(&e) || fatal.is_some() => {
                // Unusable, but nobody else owns the partition: the actor fails and its restart
                // claims it again with a new producer (or the node stops once that keeps failing).
                self.forget_producer(p, epoch);
                let why = fatal.map_or_else(|| e.to_string(), |(code, reason)| format!("{code:?}: {reason}"));
                Err(StoreError::Corrupt {
                    detail: format!("changelog producer of partition {} failed fatally: {why}", p.0),
                })
            }
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn meta(&self, partition: PartitionId) -> Result<PartitionMeta, StoreError> {
        self.local.meta(partition).await
    }

    /// Revoked or lost: the next claim of the partition takes the transactional id anew.
    fn release(&self, partition: PartitionId) {
        let mut producers = self.inner.producers.lock().unwrap();
        producers.remove(&partition);
        *self.inner.releases.lock().unwrap().entry(partition).or_default() += 1;
        self.inner.owned.lock().unwrap().remove(&partition);
    }

    /// Claim locally; take the changelog's transactional id (fencing the previous owner) unless
    /// this claim restarts the partition's actor on a node that still holds the id (taking it
    /// again would fence a node the group may have given the partition to meanwhile; a fenced id
    /// shows at the first write); then bring this node's copy up to the changelog's end: only the
    /// tail after its stored changelog position when it holds one (it owned the partition before,
    /// or kept a standby copy), else the whole partition, replacing whatever this node held.
    async fn claim(&self, partition: PartitionId, epoch: Epoch) -> Result<PartitionMeta, StoreError> {
        let p = partition;
        let releases = self.releases(p);
        self.inner.owned.lock().unwrap().insert(p);
        self.local.claim(p, epoch).await?;
        let held = self.inner.producers.lock().unwrap().get(&p).map(|(_, producer)| producer.clone());
        let producer = match held {
            Some(producer) => producer,
            None => self.new_producer(p).await?,
        };
        let started = std::time::Instant::now();
        let this = self.clone();
        let restore =
            tokio::task::spawn_blocking(move || this.restore(p, epoch)).await.map_err(unavailable)??;
        let Restore { after, records, bytes } = restore;
        let meta = self.local.meta(p).await?;
        let secs = started.elapsed().as_secs_f64();
        tracing::info!(
            partition = p.0,
            after_position = ?after,
            records,
            bytes,
            applied = ?meta.applied_offset.map(|o| o.0),
            seconds = secs,
            records_per_second = (records as f64 / secs.max(1e-6)) as u64,
            "partition restored from the changelog"
        );
        {
            let mut producers = self.inner.producers.lock().unwrap();
            if self.releases(p) != releases {
                return Err(unavailable(format!(
                    "partition {} was released while it was being claimed",
                    p.0
                )));
            }
            producers.insert(p, (epoch, producer));
        }
        self.inner.restores.lock().unwrap().insert(p, restore);
        Ok(meta)
    }
}
