//! The partition actor: owns one Kafka partition of the ingestion topic and the state of its keys.
//!
//! Records arrive through a bounded channel that the consumer thread fills (when it is full the
//! consumer pauses the Kafka partition: pressure never turns into buffering). Two stages, so a
//! batch is scored while the previous ones wait for the broker and the disk:
//!
//! **Compute** (the actor, one batch at a time):
//! 1. skip records at or below the last computed offset (redelivered after a restart);
//! 2. decode and validate ([`decode`]); bad records become dead letters;
//! 3. group the good ones into per-key [`waves`], so one key's records apply in offset order;
//! 4. per wave: load the keys' states (from batches not yet written first, then through the
//!    cache in one batched read), drop duplicates (sequence at or below the key's), run the rows
//!    through the inference [`Router`] (deadline, bounded retries), keep the new states;
//! 5. hand the batch (outputs, new states, last offset) to the committer, in order, through a
//!    bounded channel (`max_pending_batches`; full: the actor waits, its queue fills, the
//!    partition pauses).
//!
//! **Commit** (the committer task, in batch order; everything waiting goes as one group):
//! 6. produce the group's scores and dead letters and wait until the broker acknowledged each;
//! 7. write the new states **with** the group's last offset in one atomic, fenced store write;
//! 8. hand `last + 1` to the group's offset commit.
//!
//! Step 6 of a group runs while step 7 of the groups before it is in flight (two stages in the
//! committer task, room for 2 x `max_pending_batches` acknowledged batches between them), so a
//! slow write (the fsync, `[state] write_window`) delays the offset, never the next outputs. A
//! group is written only after its own outputs are acknowledged, and in order; groups
//! acknowledged while a write was in flight go in the next write together.
//!
//! A crash before 7 re-runs the batches from the stored offset: the state effect happens once,
//! outputs may repeat (at least once), recognisable by their source coordinates. A crash after 7
//! skips them (step 1). Transient failures (broker, store, no healthy worker) retry their step
//! with backoff and never commit past it; a fenced or corrupt store stops the actor.

pub mod actor;
mod committer;
pub mod decode;
pub mod records;
pub mod sequence;
pub mod supervisor;
#[cfg(test)]
mod tests;
pub mod trace;
pub mod waves;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use partita_proto::v1::DeadLetterReason;

use crate::inference::InferOutput;
use crate::state::PartitionId;
pub use actor::{PartitionActor, PartitionArgs, PartitionMsg, PartitionState};
pub use decode::{Limits, Rejection, ValidEvent};
pub use records::{InputRecord, OutputRecord, OutputTopic, PartitionSink, SinkError, Trimmed};
pub use trace::{NoTraces, Tracer};

/// Header names on scores and dead letters.
pub const HEADER_SOURCE_TOPIC: &str = "partita-source-topic";
pub const HEADER_SOURCE_PARTITION: &str = "partita-source-partition";
pub const HEADER_SOURCE_OFFSET: &str = "partita-source-offset";
pub const HEADER_DLQ_REASON: &str = "partita-dlq-reason";
/// W3C trace context: read from the input record; its score or dead letter carries the node's
/// span for the record (or, without traces, the input's header unchanged).
pub const HEADER_TRACEPARENT: &str = "traceparent";

/// Longest `traceparent` header copied to an output (a W3C one is 55 bytes).
const MAX_TRACEPARENT: usize = 512;

/// Bytes of an oversized value kept in its dead letter (with the hash of the whole value).
pub const DEAD_LETTER_PREFIX: usize = 1024;

/// How a partition actor processes.
#[derive(Debug, Clone)]
pub struct PartitionConfig {
    /// Records taken from the queue into one batch.
    pub max_batch: usize,
    /// Records of one key in one batch (= waves per batch). A hot key's records must run one
    /// after another; capping them keeps a batch's other keys from waiting on that chain.
    pub max_waves: usize,
    /// Computed batches that may wait for the committer (their outputs' acknowledgements and
    /// state write) while the next batch is scored.
    pub max_pending_batches: usize,
    /// Per-record inference deadline, from the start of its batch on a worker (waiting for room
    /// in the pool or a worker's queue is not counted); a record that misses it is retried, then
    /// dead-lettered.
    pub infer_deadline: Duration,
    /// The budget from an event's time to its score (`[inference] slo`): each inference request
    /// carries its events' due time, and the workers' batchers let a batch grow while it can
    /// still be computed in time ([`crate::batcher`]). `None`: the models' fixed
    /// `max_queue_delay`.
    pub slo: Option<Duration>,
    /// Inference attempts per record before it is dead-lettered (errors, panics, deadlines).
    pub max_attempts: u32,
    /// An event more than this above its key's applied sequence is dead-lettered `SEQUENCE_GAP`.
    pub max_sequence_gap: u64,
    /// First wait before retrying a failed produce or store write (doubles up to `max_backoff`).
    pub backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for PartitionConfig {
    fn default() -> Self {
        Self {
            max_batch: 1024,
            max_waves: 4,
            max_pending_batches: 4,
            infer_deadline: Duration::from_secs(2),
            slo: None,
            max_attempts: 3,
            max_sequence_gap: 1_000_000,
            backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// Node-wide counters, shared by every partition actor (read by the node's report and metrics).
#[derive(Debug, Default)]
pub struct PipelineCounters {
    /// Records taken from the ingestion topic (redeliveries included).
    pub received: AtomicU64,
    /// Records at or below the stored applied offset: already applied, skipped.
    pub redelivered: AtomicU64,
    pub scored: AtomicU64,
    /// Dead letters, indexed by `DeadLetterReason as usize`.
    pub dead_letters: [AtomicU64; DEAD_LETTER_REASONS],
    pub unknown_fields: AtomicU64,
    /// Events whose features were clamped into their model's range.
    pub clamped: AtomicU64,
    pub time_suspect: AtomicU64,
    /// Batches committed (a group of batches committed together makes one state write).
    pub batches: AtomicU64,
    /// Produce or store-write attempts that failed and were retried.
    pub retries: AtomicU64,
    /// Events scored in a key's backlog row (a model's sequence form), several per inference row.
    pub backlog_events: AtomicU64,
    /// Backlog rows that were not scored in full (failed, timed out, not finite): their events
    /// went on one by one.
    pub backlog_fallbacks: AtomicU64,
    /// The stored applied offset of each partition this node applied to.
    pub applied_offsets: std::sync::Mutex<std::collections::BTreeMap<u32, i64>>,
}

/// Hooks for metrics, called by partition actors. Every method has a no-op default.
pub trait PipelineObserver: Send + Sync + 'static {
    /// One record scored by `model`: its inference result, the time from the node receiving it to
    /// its score being ready, and from its event time to then (`None` when the event time is
    /// in the future of this node's clock).
    fn scored(&self, _model: &str, _out: &InferOutput, _in_node: Duration, _since_event: Option<Duration>) {}
    /// One batch's state write (with its offset) took `elapsed`.
    fn state_written(&self, _partition: PartitionId, _elapsed: Duration) {}
}

#[derive(Debug, Default, Clone, Copy)]
pub struct NoopPipelineObserver;
impl PipelineObserver for NoopPipelineObserver {}

/// Number of `DeadLetterReason` values (the enum's highest value + 1).
pub const DEAD_LETTER_REASONS: usize = DeadLetterReason::OutOfOrder as usize + 1;

impl PipelineCounters {
    pub fn dead_lettered(&self, reason: DeadLetterReason) -> u64 {
        self.dead_letters[reason as usize].load(Ordering::Relaxed)
    }

    pub fn dead_lettered_total(&self) -> u64 {
        self.dead_letters.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Microseconds since the Unix epoch on this node's clock.
pub fn unix_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}
