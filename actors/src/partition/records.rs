//! Records in and out of a partition actor: the input copied from the consumer, the scores and
//! dead letters it produces, and the `PartitionSink` port they leave through.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use partita_proto::v1::{DeadLetter, DeadLetterReason, Score, StageLatencies};
use prost::Message;
use sha2::{Digest, Sha256};

use super::decode::{Limits, ValidEvent};
use super::{
    DEAD_LETTER_PREFIX, HEADER_DLQ_REASON, HEADER_SOURCE_OFFSET, HEADER_SOURCE_PARTITION,
    HEADER_SOURCE_TOPIC, HEADER_TRACEPARENT, MAX_TRACEPARENT, micros, unix_micros,
};
use crate::inference::InferOutput;
use crate::state::{Offset, PartitionId};

/// One record of the ingestion topic, copied out of the consumer.
#[derive(Debug, Clone)]
pub struct InputRecord {
    pub topic: Arc<str>,
    pub partition: PartitionId,
    pub offset: Offset,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    /// When the consumer handed it over (node latency starts here).
    pub received: Instant,
    /// What [`InputRecord::bounded`] cut from a record over a limit (it is dead-lettered anyway).
    pub trimmed: Trimmed,
}

/// What the consumer cut from a record that breaks a limit: partition queues hold at most a
/// 1 KiB prefix of an oversized value or key, never megabytes, and the hash of a large value is
/// computed on the consumer thread, not on the async runtime.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Trimmed {
    /// The value's real length and SHA-256, when only its first 1 KiB is kept.
    pub value: Option<(usize, [u8; 32])>,
    /// The key's real length, when only its first 1 KiB is kept.
    pub key_len: Option<usize>,
    /// The headers' count and bytes, when they were dropped.
    pub headers: Option<(usize, usize)>,
    /// The headers could not be read (a header name that is not UTF-8): their count.
    pub headers_unreadable: Option<usize>,
}

impl InputRecord {
    /// A record as the consumer hands it over, with whatever breaks `limits` cut down (see
    /// [`Trimmed`]); the rest as is.
    #[allow(clippy::too_many_arguments)]
    pub fn bounded(
        topic: Arc<str>,
        partition: PartitionId,
        offset: Offset,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: Vec<(String, Vec<u8>)>,
        limits: &Limits,
    ) -> Self {
        let mut trimmed = Trimmed::default();
        let value = value.map(|v| {
            if v.len() > limits.max_value_bytes {
                trimmed.value = Some((v.len(), Sha256::digest(v).into()));
                v[..DEAD_LETTER_PREFIX].to_vec()
            } else {
                v.to_vec()
            }
        });
        let key = key.map(|k| {
            if k.len() > limits.max_key_bytes {
                trimmed.key_len = Some(k.len());
                k[..DEAD_LETTER_PREFIX.min(k.len())].to_vec()
            } else {
                k.to_vec()
            }
        });
        let (count, bytes) = (headers.len(), headers.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>());
        let headers = if count > limits.max_headers || bytes > limits.max_header_bytes {
            trimmed.headers = Some((count, bytes));
            // Only the trace context stays: the dead letter still joins the producer's trace.
            headers
                .into_iter()
                .filter(|(k, v)| k == HEADER_TRACEPARENT && v.len() <= MAX_TRACEPARENT)
                .take(1)
                .collect()
        } else {
            headers
        };
        Self { topic, partition, offset, key, value, headers, received: Instant::now(), trimmed }
    }

    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_slice())
    }

    /// Bytes this record holds in a partition queue (key, value, headers).
    pub fn size(&self) -> usize {
        self.key.as_ref().map_or(0, Vec::len)
            + self.value.as_ref().map_or(0, Vec::len)
            + self.headers.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
    }
}

/// Which topic of the processing tier an output goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputTopic {
    Scores,
    DeadLetters,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OutputRecord {
    pub topic: OutputTopic,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
    /// The input record it answers (its partition is the actor's).
    pub source_offset: Offset,
}

/// Not every record was acknowledged.
#[derive(Debug, Clone, Default, thiserror::Error)]
#[error("{} outputs not delivered, {} refused for good: {detail}", unacked.len(), rejected.len())]
pub struct SinkError {
    pub detail: String,
    /// Indices of records that failed for now (broker down, timeout): produce them again.
    pub unacked: Vec<usize>,
    /// Indices of records the broker will never take (too large), with the reason.
    pub rejected: Vec<(usize, String)>,
}

impl SinkError {
    /// Every one of `n` records failed for now.
    pub fn all(n: usize, detail: impl Into<String>) -> Self {
        Self { detail: detail.into(), unacked: (0..n).collect(), rejected: Vec::new() }
    }
}

/// The port to the processing tier and the consumer group (the rdkafka adapter implements it).
pub trait PartitionSink: Send + Sync + 'static {
    /// Produce `records` in order; resolves once the broker acknowledged all of them (`acks=all`),
    /// or says which were not and which never will be.
    fn produce(&self, records: &[OutputRecord]) -> impl Future<Output = Result<(), SinkError>> + Send;
    /// Every record of `partition` below `next_offset` is durable: the group may commit it.
    fn commit(&self, partition: PartitionId, next_offset: Offset);
}

fn source_headers(rec: &InputRecord) -> Vec<(String, Vec<u8>)> {
    vec![
        (HEADER_SOURCE_TOPIC.to_owned(), rec.topic.as_bytes().to_vec()),
        (HEADER_SOURCE_PARTITION.to_owned(), rec.partition.0.to_string().into_bytes()),
        (HEADER_SOURCE_OFFSET.to_owned(), rec.offset.0.to_string().into_bytes()),
    ]
}

impl OutputRecord {
    /// A W3C `traceparent` is 55 bytes; anything over [`MAX_TRACEPARENT`] is not one and is
    /// not copied.
    pub(super) fn with_traceparent(mut self, traceparent: Option<Vec<u8>>) -> Self {
        if let Some(tp) = traceparent.filter(|tp| tp.len() <= MAX_TRACEPARENT) {
            self.headers.push((HEADER_TRACEPARENT.to_owned(), tp));
        }
        self
    }
}

pub(super) fn score(rec: &InputRecord, v: &ValidEvent, out: &InferOutput, load_us: u64) -> OutputRecord {
    let e = &v.event;
    let msg = Score {
        source_topic: rec.topic.to_string(),
        source_partition: rec.partition.0 as i32,
        source_offset: rec.offset.0,
        event_id: e.event_id.clone(),
        key: e.key.clone(),
        sequence: e.sequence,
        model: v.model.to_string(),
        model_version: out.model_version,
        score: out.score,
        event_time_unix_micros: e.event_time_unix_micros,
        batch_size: out.batch_size as u32,
        latency: Some({
            let in_node = rec.received.elapsed();
            let received_unix = unix_micros().saturating_sub(micros(in_node) as i64);
            StageLatencies {
                node_us: micros(in_node),
                queue_us: micros(out.queue_time),
                compute_us: micros(out.compute_time),
                state_load_us: load_us,
                fetch_us: received_unix.saturating_sub(e.event_time_unix_micros).max(0) as u64,
            }
        }),
        event_time_suspect: v.time_suspect,
    };
    OutputRecord {
        topic: OutputTopic::Scores,
        key: e.key.clone(),
        value: msg.encode_to_vec(),
        headers: source_headers(rec),
        source_offset: rec.offset,
    }
}

pub(super) fn dead_letter(
    rec: &InputRecord,
    reason: DeadLetterReason,
    detail: &str,
    attempts: u32,
    limits: &Limits,
) -> OutputRecord {
    tracing::debug!(partition = %rec.partition, offset = rec.offset.0, ?reason, %detail, "dead letter");
    let raw = rec.value.as_deref().unwrap_or_default();
    // A value the consumer cut down comes with its real length and hash.
    let (value_len, value_sha256) = match rec.trimmed.value {
        Some((len, sha)) => (len, sha.to_vec()),
        None => (raw.len(), Sha256::digest(raw).to_vec()),
    };
    let truncated = rec.trimmed.value.is_some() || raw.len() > limits.max_value_bytes;
    let kept = if truncated { &raw[..DEAD_LETTER_PREFIX.min(raw.len())] } else { raw };
    // Keys are bounded by `max_key_bytes` only once decoded: a dead letter for a long one keeps
    // its first 1 KiB (and its length), once in the body and once as the record key.
    let key = rec.key.as_deref().unwrap_or_default();
    let key_kept = &key[..DEAD_LETTER_PREFIX.min(key.len())];
    let msg = DeadLetter {
        source_topic: rec.topic.to_string(),
        source_partition: rec.partition.0 as i32,
        source_offset: rec.offset.0,
        key: key_kept.to_vec(),
        reason: reason as i32,
        detail: detail.to_owned(),
        value: kept.to_vec(),
        truncated,
        value_sha256,
        value_len: value_len as u64,
        attempts,
        key_len: rec.trimmed.key_len.unwrap_or(key.len()) as u64,
    };
    let mut headers = source_headers(rec);
    headers.push((HEADER_DLQ_REASON.to_owned(), reason.as_str_name().as_bytes().to_vec()));
    OutputRecord {
        topic: OutputTopic::DeadLetters,
        key: key_kept.to_vec(),
        value: msg.encode_to_vec(),
        headers,
        source_offset: rec.offset,
    }
}

/// The minimal dead letter that replaces `out` when the broker refuses it for good: source
/// coordinates, the key's first 256 bytes, the refused output's hash and length, no value. A score
/// becomes `OUTPUT_REJECTED`; a dead letter keeps its reason. `None` when `out` is minimal already.
pub(super) fn refused_output(
    topic: &str,
    partition: PartitionId,
    out: &OutputRecord,
    why: &str,
) -> Option<OutputRecord> {
    const KEY_KEPT: usize = 256;
    let (reason, attempts, key_len) = match out.topic {
        OutputTopic::Scores => (DeadLetterReason::OutputRejected, 1, out.key.len() as u64),
        OutputTopic::DeadLetters => {
            let d = DeadLetter::decode(out.value.as_slice()).ok()?;
            if d.truncated && d.value.is_empty() {
                return None;
            }
            (d.reason(), d.attempts, d.key_len)
        }
    };
    let key = out.key[..KEY_KEPT.min(out.key.len())].to_vec();
    let msg = DeadLetter {
        source_topic: topic.to_owned(),
        source_partition: partition.0 as i32,
        source_offset: out.source_offset.0,
        key: key.clone(),
        reason: reason as i32,
        detail: format!("the broker refused the {} bytes of this output for good: {why}", out.value.len()),
        value: Vec::new(),
        truncated: true,
        value_sha256: Sha256::digest(&out.value).to_vec(),
        value_len: out.value.len() as u64,
        attempts,
        key_len,
    };
    let headers = out
        .headers
        .iter()
        .filter(|(k, _)| k.starts_with("partita-source-") || k == HEADER_TRACEPARENT)
        .cloned()
        .chain(std::iter::once((HEADER_DLQ_REASON.to_owned(), reason.as_str_name().as_bytes().to_vec())))
        .collect();
    Some(OutputRecord {
        topic: OutputTopic::DeadLetters,
        key,
        value: msg.encode_to_vec(),
        headers,
        source_offset: out.source_offset,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use partita_proto::v1::Event;

    use super::*;
    use crate::inference::Device;

    /// The fetch time of a score whose record was received with an event time
    /// `event_time_from_now_us` from then (and spent 5 ms in the node), and how long taking the
    /// record took (the receive time is known within it).
    fn fetch_us(event_time_from_now_us: i64) -> (u64, u64) {
        let before = unix_micros();
        let rec = InputRecord::bounded(
            Arc::from("t"),
            PartitionId(0),
            Offset(1),
            Some(b"k"),
            Some(b"v"),
            Vec::new(),
            &Limits::default(),
        );
        let spread = (unix_micros() - before) as u64;
        let event = Event {
            key: b"k".to_vec(),
            event_time_unix_micros: before + event_time_from_now_us,
            ..Event::default()
        };
        let v = ValidEvent {
            event,
            model: Arc::from("m"),
            unknown_fields: false,
            time_suspect: false,
            clamped: false,
        };
        let out = InferOutput {
            score: 0.5,
            new_state: Vec::new(),
            model_version: 1,
            batch_size: 1,
            device: Device::Cpu,
            queue_time: Duration::ZERO,
            compute_time: Duration::ZERO,
        };
        std::thread::sleep(Duration::from_millis(5));
        let s = Score::decode(&score(&rec, &v, &out, 0).value[..]).unwrap();
        let l = s.latency.unwrap();
        assert!(l.node_us >= 5_000, "{l:?}");
        (l.fetch_us, spread)
    }

    #[test]
    fn a_scores_fetch_time_runs_from_its_event_time_to_the_node_receiving_it() {
        // An event time 20 ms before the record was received: 20 ms (within the time receiving
        // took, and a clock reading's rounding), and the 5 ms the record then spent in the node
        // are not part of it.
        let (fetch, spread) = fetch_us(-20_000);
        assert!((19_900..=20_100 + spread).contains(&fetch), "{fetch} (receiving took {spread} us)");
        // An event time ahead of the node's clock counts 0.
        assert_eq!(fetch_us(60_000_000).0, 0);
    }
}
