//! Per-key model state: the store port that every backend implements, and the byte-bounded
//! [`StateCache`] in front of it.
//!
//! The port's promises (the contract suite in `tests/src/state_contract.rs` checks them on every
//! backend):
//!
//! - [`StateStore::write`] stores a batch of `(key → state)` **together with** the partition's
//!   applied offset and the writer's epoch in one atomic operation: after a crash either all of it
//!   is visible or none of it.
//! - **Fencing**: a write whose epoch is not exactly the stored one (older: a zombie; newer: a
//!   writer that never claimed), or a claim whose epoch is not strictly newer, fails with
//!   [`StoreError::Fenced`] and changes nothing; of two concurrent claims of the same epoch
//!   exactly one succeeds.
//! - The applied offset never moves backwards: such a write fails with [`StoreError::Corrupt`].
//! - Reads return exactly what the last successful write stored (read-your-writes), `None` for
//!   a key never written.
//! - Values carry a format version ([`StateValue::format`]) so a layout change can be read back.

mod cache;
#[cfg(test)]
pub(crate) mod mem;

use std::fmt;
use std::future::Future;

pub use cache::{CacheObserver, CacheStats, ENTRY_OVERHEAD, NoopObserver, StateCache};

/// A Kafka partition of the ingestion topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PartitionId(pub u32);

/// The owner generation of a partition (the consumer-group generation that assigned it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Epoch(pub u64);

/// A Kafka offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Offset(pub i64);

impl fmt::Display for PartitionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// One key's state as stored: a format version and opaque bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateValue {
    /// Layout of `data`; readers reject formats they do not know ([`StoreError::Corrupt`]).
    pub format: u16,
    pub data: Vec<u8>,
}

/// Format 1: the model's state vector as little-endian f32 values.
pub const FORMAT_F32_LE: u16 = 1;

/// Format 2: the key's last applied sequence number (u64 LE), then its state vector (f32 LE).
/// Written by earlier versions; read as format 3 with every earlier sequence counted as applied.
pub const FORMAT_SEQ_F32_LE: u16 = 2;

/// Format 3: the key's last applied sequence (u64 LE), the window of the 64 sequences before it
/// (u64 LE, bit `i` set: sequence − 1 − i was applied), then its state vector (f32 LE). Written
/// by earlier versions; read as format 4 with no offset.
pub const FORMAT_SEQ_WINDOW_F32_LE: u16 = 3;

/// Format 4: as format 3 with, after the window, the input offset of the key's last applied
/// record (i64 LE, −1: none). What partition actors store: the sequence and window tell a
/// duplicate from a late event (`partition::sequence`); the offset tells a record applied above
/// the partition's applied offset (a partition applies its keys out of offset order,
/// `docs/pipeline.md`) from one still to apply.
pub const FORMAT_SEQ_WINDOW_OFFSET_F32_LE: u16 = 4;

/// A key's state as partition actors keep it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Sequenced {
    pub sequence: u64,
    pub window: u64,
    /// The input offset of the key's last applied record (`None`: written before format 4, or
    /// never applied).
    pub offset: Option<Offset>,
    pub state: Vec<f32>,
}

impl StateValue {
    /// Bytes of the stored encoding besides `data`.
    pub const HEADER_LEN: usize = 2;

    pub fn from_f32(values: &[f32]) -> Self {
        Self { format: FORMAT_F32_LE, data: values.iter().flat_map(|v| v.to_le_bytes()).collect() }
    }

    pub fn to_f32(&self) -> Result<Vec<f32>, StoreError> {
        if self.format != FORMAT_F32_LE || !self.data.len().is_multiple_of(4) {
            return Err(StoreError::Corrupt {
                detail: format!(
                    "expected format {FORMAT_F32_LE} with 4-byte values, found format {} with {} bytes",
                    self.format,
                    self.data.len()
                ),
            });
        }
        Ok(self.data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }

    /// A key's state as partition actors store it (format 4).
    pub fn sequenced(s: &Sequenced) -> Self {
        let mut data = Vec::with_capacity(24 + 4 * s.state.len());
        data.extend_from_slice(&s.sequence.to_le_bytes());
        data.extend_from_slice(&s.window.to_le_bytes());
        data.extend_from_slice(&s.offset.map_or(-1, |o| o.0).to_le_bytes());
        data.extend(s.state.iter().flat_map(|v| v.to_le_bytes()));
        Self { format: FORMAT_SEQ_WINDOW_OFFSET_F32_LE, data }
    }

    /// A format-4 value, or one of the formats before it: 3 (no offset), 2 (no offset, and its
    /// window: every earlier sequence applied).
    pub fn to_sequenced(&self) -> Result<Sequenced, StoreError> {
        let f32s = |rest: &[u8]| {
            rest.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
        };
        let u64_at = |d: &[u8], i: usize| u64::from_le_bytes(d[i..i + 8].try_into().expect("8 bytes"));
        let d = &self.data;
        let fits = |header: usize| d.len() >= header && (d.len() - header).is_multiple_of(4);
        match self.format {
            FORMAT_SEQ_WINDOW_OFFSET_F32_LE if fits(24) => {
                let offset = i64::from_le_bytes(d[16..24].try_into().expect("8 bytes"));
                Ok(Sequenced {
                    sequence: u64_at(d, 0),
                    window: u64_at(d, 8),
                    offset: (offset >= 0).then_some(Offset(offset)),
                    state: f32s(&d[24..]),
                })
            }
            FORMAT_SEQ_WINDOW_F32_LE if fits(16) => Ok(Sequenced {
                sequence: u64_at(d, 0),
                window: u64_at(d, 8),
                offset: None,
                state: f32s(&d[16..]),
            }),
            FORMAT_SEQ_F32_LE if fits(8) => {
                Ok(Sequenced { sequence: u64_at(d, 0), window: u64::MAX, offset: None, state: f32s(&d[8..]) })
            }
            _ => Err(StoreError::Corrupt {
                detail: format!(
                    "expected format {FORMAT_SEQ_WINDOW_OFFSET_F32_LE}, {FORMAT_SEQ_WINDOW_F32_LE} or {FORMAT_SEQ_F32_LE} (sequence [+ window [+ offset]] + f32 values), found format {} with {} bytes",
                    self.format,
                    d.len()
                ),
            }),
        }
    }

    /// The stored bytes: format (u16, big-endian) then data.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::HEADER_LEN + self.data.len());
        out.extend_from_slice(&self.format.to_be_bytes());
        out.extend_from_slice(&self.data);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        match bytes {
            [a, b, data @ ..] => Ok(Self { format: u16::from_be_bytes([*a, *b]), data: data.to_vec() }),
            _ => Err(StoreError::Corrupt {
                detail: format!("state value of {} bytes has no format header", bytes.len()),
            }),
        }
    }
}

/// What a store knows about one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PartitionMeta {
    /// The highest input offset whose effect is in the stored state; `None` before the first write.
    pub applied_offset: Option<Offset>,
    /// The newest owner epoch that claimed or wrote the partition.
    pub epoch: Epoch,
}

/// One atomic write: new states of some keys, with the offset they bring the partition to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateWrite {
    pub partition: PartitionId,
    pub epoch: Epoch,
    pub applied_offset: Offset,
    pub entries: Vec<(Vec<u8>, StateValue)>,
}

/// Why a store operation failed. Each variant says what the partition actor does about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// A newer owner holds the partition: this writer is a zombie. Stop the partition actor, do
    /// not retry, do not commit offsets.
    #[error("partition {partition}: epoch {epoch} is fenced by epoch {current}")]
    Fenced { partition: PartitionId, epoch: Epoch, current: Epoch },
    /// Stored bytes cannot be decoded (unknown format, truncated). Stop the partition and alert:
    /// retrying cannot help and overwriting would lose state.
    #[error("corrupt state: {detail}")]
    Corrupt { detail: String },
    /// The store failed or timed out. Pause the partition and retry with backoff; nothing was
    /// applied (the write is atomic).
    #[error("state store unavailable: {detail}")]
    Unavailable { detail: String },
}

/// The port every state backend implements (RocksDB, ScyllaDB). Methods are async so a backend
/// can run blocking IO off the async runtime.
pub trait StateStore: Send + Sync + 'static {
    /// The states of `keys` of one partition, in order; `None` for keys never written.
    fn read(
        &self,
        partition: PartitionId,
        keys: &[Vec<u8>],
    ) -> impl Future<Output = Result<Vec<Option<StateValue>>, StoreError>> + Send;

    /// Store `write.entries` with the applied offset, atomically; fenced unless the stored epoch
    /// is exactly `write.epoch`; `Corrupt` if the offset is below the stored one.
    fn write(&self, write: StateWrite) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The partition's applied offset and epoch (defaults if never written).
    fn meta(&self, partition: PartitionId) -> impl Future<Output = Result<PartitionMeta, StoreError>> + Send;

    /// Become the owner of `partition` at `epoch`: raises the stored epoch (fencing older owners)
    /// and returns the meta to resume from. A compare-and-set: fenced unless `epoch` is strictly
    /// above the stored one, so of two claimers of the same epoch exactly one wins.
    fn claim(
        &self,
        partition: PartitionId,
        epoch: Epoch,
    ) -> impl Future<Output = Result<PartitionMeta, StoreError>> + Send;

    /// This node no longer owns `partition` (revoked or lost): drop what a claim set up for it.
    /// A later claim starts afresh. Nothing to do for most stores.
    fn release(&self, partition: PartitionId) {
        let _ = partition;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_with_their_format() {
        let v = StateValue::from_f32(&[1.5, -2.0]);
        let back = StateValue::decode(&v.encode()).unwrap();
        assert_eq!(back, v);
        assert_eq!(back.to_f32().unwrap(), vec![1.5, -2.0]);
        assert!(StateValue::decode(&[1]).is_err());
        let unknown = StateValue { format: 9, data: vec![0; 4] };
        assert!(matches!(unknown.to_f32(), Err(StoreError::Corrupt { .. })));
    }

    #[test]
    fn sequenced_values_round_trip_and_formats_2_and_3_still_read() {
        let s = Sequenced { sequence: 7, window: 0b101, offset: Some(Offset(42)), state: vec![0.5, -1.0] };
        let v = StateValue::sequenced(&s);
        assert_eq!(StateValue::decode(&v.encode()).unwrap().to_sequenced().unwrap(), s);
        let empty = Sequenced { sequence: 3, window: 0, offset: None, state: vec![] };
        assert_eq!(StateValue::sequenced(&empty).to_sequenced().unwrap(), empty);
        // Format 3 (earlier versions): sequence, window, state; no offset.
        let mut three = 7u64.to_le_bytes().to_vec();
        three.extend(0b101u64.to_le_bytes());
        three.extend(0.5f32.to_le_bytes());
        let three = StateValue { format: FORMAT_SEQ_WINDOW_F32_LE, data: three };
        assert_eq!(
            three.to_sequenced().unwrap(),
            Sequenced { sequence: 7, window: 0b101, offset: None, state: vec![0.5] }
        );
        // Format 2 (earlier versions): sequence then state; every earlier sequence counts as applied.
        let mut old = 9u64.to_le_bytes().to_vec();
        old.extend(2.5f32.to_le_bytes());
        let old = StateValue { format: FORMAT_SEQ_F32_LE, data: old };
        assert_eq!(
            old.to_sequenced().unwrap(),
            Sequenced { sequence: 9, window: u64::MAX, offset: None, state: vec![2.5] }
        );
        assert!(StateValue::from_f32(&[1.0, 2.0]).to_sequenced().is_err());
        assert!(StateValue { format: FORMAT_SEQ_F32_LE, data: vec![0; 5] }.to_sequenced().is_err());
        assert!(StateValue { format: FORMAT_SEQ_WINDOW_F32_LE, data: vec![0; 12] }.to_sequenced().is_err());
        assert!(
            StateValue { format: FORMAT_SEQ_WINDOW_OFFSET_F32_LE, data: vec![0; 20] }.to_sequenced().is_err()
        );
    }
}
