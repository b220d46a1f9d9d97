//! Decoding and validating one input record: every single-record row of the bad-input table in
//! RELIABILITY.md. Pure: no IO, no clock (the caller passes `now`).

use std::sync::Arc;
use std::time::Duration;

use partita_proto::v1::{DeadLetterReason, Event};
use prost::Message;

use super::InputRecord;
use crate::model::{ModelSpec, OutOfRange};

/// The schema version of [`Event`] this node reads.
pub const EVENT_SCHEMA_VERSION: u32 = 1;

/// Bounds on what one record may carry.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest record value accepted; larger goes to the DLQ as `TOO_LARGE`.
    pub max_value_bytes: usize,
    /// Largest record key accepted (`TOO_LARGE`): every output copies the key.
    pub max_key_bytes: usize,
    pub max_headers: usize,
    /// Sum of header key and value lengths.
    pub max_header_bytes: usize,
    /// Model for events that name none.
    pub default_model: Arc<str>,
    /// An event time further than this from the node's clock is flagged (never rejected).
    pub event_time_skew: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_value_bytes: 64 * 1024,
            max_key_bytes: 4 * 1024,
            max_headers: 32,
            max_header_bytes: 16 * 1024,
            default_model: Arc::from("fraud_gru"),
            event_time_skew: Duration::from_secs(3600),
        }
    }
}

/// A record that passed every check.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidEvent {
    pub event: Event,
    pub model: Arc<str>,
    /// The value carried fields this schema does not know (a newer producer): accepted, counted.
    pub unknown_fields: bool,
    /// The event time is further than [`Limits::event_time_skew`] from the node's clock.
    pub time_suspect: bool,
    /// Features outside the model's range were clamped into it (`out_of_range = "clamp"`).
    pub clamped: bool,
}

/// Why a record is dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: DeadLetterReason,
    pub detail: String,
}

fn reject(reason: DeadLetterReason, detail: impl Into<String>) -> Rejection {
    Rejection { reason, detail: detail.into() }
}

/// Decode and validate `record` against `limits` and the served models (`model` looks one up).
/// `now_micros` is the node's clock, for flagging far-off event times.
pub fn decode<'m>(
    record: &InputRecord,
    limits: &Limits,
    model: impl Fn(&str) -> Option<&'m ModelSpec>,
    now_micros: i64,
) -> Result<ValidEvent, Rejection> {
    use DeadLetterReason as R;
    let t = &record.trimmed;
    if let Some(count) = t.headers_unreadable {
        return Err(reject(R::Headers, format!("{count} headers, a header name is not valid UTF-8")));
    }
    if let Some((count, bytes)) = t.headers {
        return Err(reject(
            R::Headers,
            format!(
                "{count} headers of {bytes} bytes, at most {} headers and {} bytes allowed",
                limits.max_headers, limits.max_header_bytes
            ),
        ));
    }
    if let Some((len, _)) = t.value {
        return Err(reject(
            R::TooLarge,
            format!("value is {len} bytes, at most {} allowed", limits.max_value_bytes),
        ));
    }
    if let Some(len) = t.key_len {
        return Err(reject(
            R::TooLarge,
            format!("key is {len} bytes, at most {} allowed", limits.max_key_bytes),
        ));
    }
    if record.headers.len() > limits.max_headers {
        return Err(reject(
            R::Headers,
            format!("{} headers, at most {} allowed", record.headers.len(), limits.max_headers),
        ));
    }
    let header_bytes: usize = record.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
    if header_bytes > limits.max_header_bytes {
        return Err(reject(
            R::Headers,
            format!("headers total {header_bytes} bytes, at most {} allowed", limits.max_header_bytes),
        ));
    }
    let value = record.value.as_deref().unwrap_or_default();
    if value.len() > limits.max_value_bytes {
        return Err(reject(
            R::TooLarge,
            format!("value is {} bytes, at most {} allowed", value.len(), limits.max_value_bytes),
        ));
    }
    let Some(record_key) = record.key.as_deref().filter(|k| !k.is_empty()) else {
        return Err(reject(R::NoKey, "the record has no key"));
    };
    if record_key.len() > limits.max_key_bytes {
        return Err(reject(
            R::TooLarge,
            format!("key is {} bytes, at most {} allowed", record_key.len(), limits.max_key_bytes),
        ));
    }
    // prost checks every length prefix against the bytes left before allocating, so a prefix
    // claiming gigabytes fails here without allocating them.
    let mut event = Event::decode(value).map_err(|e| reject(R::Decode, e.to_string()))?;
    if event.schema_version != EVENT_SCHEMA_VERSION {
        if event == Event::default() {
            return Err(reject(R::InvalidFields, "empty event: every field is missing"));
        }
        if event.schema_version == 0 {
            return Err(reject(R::Schema, "no schema_version: not a partita.v1.Event"));
        }
        return Err(reject(
            R::Schema,
            format!(
                "schema_version {} is not supported (this node reads {EVENT_SCHEMA_VERSION})",
                event.schema_version
            ),
        ));
    }
    if event.key.is_empty() {
        return Err(reject(R::NoKey, "the event has no key"));
    }
    if event.key != record_key {
        return Err(reject(R::InvalidFields, "the event's key differs from the record key"));
    }
    if event.sequence == 0 {
        return Err(reject(R::InvalidFields, "sequence is 0 (sequences start at 1)"));
    }
    let model_name: Arc<str> =
        if event.model.is_empty() { limits.default_model.clone() } else { Arc::from(event.model.as_str()) };
    let Some(spec) = model(&model_name) else {
        return Err(reject(R::UnknownModel, format!("model {model_name:?} is not served here")));
    };
    if event.features.len() != spec.feature_count {
        return Err(reject(
            R::Shape,
            format!("{} features, model {model_name:?} expects {}", event.features.len(), spec.feature_count),
        ));
    }
    if let Some((i, v)) = event.features.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(reject(R::ValueRange, format!("features[{i}] is {v}, not a finite number")));
    }
    let unknown_fields = event.encoded_len() < value.len();
    let mut clamped = false;
    if let Some(r) = spec.feature_range
        && let Some((i, v)) = event.features.iter().enumerate().find(|(_, v)| **v < r.min || **v > r.max)
    {
        match r.on_violation {
            OutOfRange::Reject => {
                return Err(reject(
                    R::ValueRange,
                    format!(
                        "features[{i}] is {v}, outside model {model_name:?}'s range [{}, {}]",
                        r.min, r.max
                    ),
                ));
            }
            OutOfRange::Clamp => {
                event.features.iter_mut().for_each(|v| *v = v.clamp(r.min, r.max));
                clamped = true;
            }
        }
    }
    let skew = i64::try_from(limits.event_time_skew.as_micros()).unwrap_or(i64::MAX);
    let time_suspect = event.event_time_unix_micros.abs_diff(now_micros) > skew.unsigned_abs();
    Ok(ValidEvent { event, model: model_name, unknown_fields, time_suspect, clamped })
}

#[cfg(test)]
mod tests {
    use partita_proto::v1::InferBatchRequest;

    use super::*;
    use crate::model::{BatchPolicy, ModelSpec};
    use crate::state::{Offset, PartitionId};

    const NOW: i64 = 1_800_000_000_000_000;

    fn spec() -> ModelSpec {
        ModelSpec {
            name: "fraud_gru".into(),
            version: 1,
            description: String::new(),
            feature_count: 4,
            state_size: 2,
            batch: BatchPolicy::unbatched(),
            warmup_batch_sizes: vec![],
            feature_range: None,
            max_steps: 1,
        }
    }

    fn event() -> Event {
        Event {
            event_id: "e1".into(),
            key: b"card-1".to_vec(),
            sequence: 1,
            event_time_unix_micros: NOW,
            features: vec![0.5; 4],
            schema_version: 1,
            model: String::new(),
        }
    }

    fn record(key: Option<&[u8]>, value: Vec<u8>) -> InputRecord {
        InputRecord {
            topic: Arc::from("transactions"),
            partition: PartitionId(0),
            offset: Offset(0),
            key: key.map(<[u8]>::to_vec),
            value: Some(value),
            headers: vec![],
            received: std::time::Instant::now(),
            trimmed: Default::default(),
        }
    }

    fn check(rec: &InputRecord) -> Result<ValidEvent, Rejection> {
        let s = spec();
        decode(rec, &Limits::default(), |m| (m == "fraud_gru").then_some(&s), NOW)
    }

    fn reason(rec: &InputRecord) -> DeadLetterReason {
        check(rec).expect_err("should be rejected").reason
    }

    fn with(f: impl FnOnce(&mut Event)) -> InputRecord {
        let mut e = event();
        f(&mut e);
        record(Some(b"card-1"), e.encode_to_vec())
    }

    #[test]
    fn a_valid_event_passes() {
        let ok = check(&with(|_| {})).unwrap();
        assert_eq!(&*ok.model, "fraud_gru");
        assert!(!ok.unknown_fields && !ok.time_suspect);
    }

    #[test]
    fn every_bad_input_gets_its_reason() {
        use DeadLetterReason as R;
        let key = Some(b"card-1".as_slice());
        assert_eq!(reason(&record(key, vec![])), R::InvalidFields, "empty value");
        let mut truncated = event().encode_to_vec();
        truncated.truncate(truncated.len() - 3);
        assert_eq!(reason(&record(key, truncated)), R::Decode);
        // Field 2 (bytes) claiming 2^31 bytes: rejected without allocating them.
        assert_eq!(reason(&record(key, vec![0x12, 0x80, 0x80, 0x80, 0x80, 0x08, 1, 2])), R::Decode);
        assert_eq!(reason(&record(key, vec![0x0a, 0x02, 0xff, 0xfe])), R::Decode, "invalid UTF-8");
        assert_eq!(
            reason(&record(
                key,
                vec![0x18, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]
            )),
            R::Decode,
            "over-long varint"
        );
        let wrong = InferBatchRequest { model: "x".into(), rows: vec![] }.encode_to_vec();
        assert_eq!(reason(&record(key, wrong)), R::Schema, "another message type");
        assert_eq!(reason(&with(|e| e.schema_version = 2)), R::Schema);
        assert_eq!(reason(&record(key, vec![0; 70 * 1024])), R::TooLarge);
        assert_eq!(reason(&with(|e| e.features = vec![1.0; 5])), R::Shape);
        assert_eq!(reason(&with(|e| e.features[2] = f32::NAN)), R::ValueRange);
        assert_eq!(reason(&with(|e| e.features[0] = f32::NEG_INFINITY)), R::ValueRange);
        assert_eq!(reason(&with(|e| e.model = "nope".into())), R::UnknownModel);
        assert_eq!(reason(&record(None, event().encode_to_vec())), R::NoKey);
        assert_eq!(reason(&with(|e| e.key.clear())), R::NoKey);
        assert_eq!(reason(&with(|e| e.key = b"card-2".to_vec())), R::InvalidFields);
        assert_eq!(reason(&with(|e| e.sequence = 0)), R::InvalidFields);
        let mut many = with(|_| {});
        many.headers = (0..40).map(|i| (format!("h{i}"), vec![])).collect();
        assert_eq!(reason(&many), R::Headers);
        let mut big = with(|_| {});
        big.headers = vec![("h".into(), vec![0; 20_000])];
        assert_eq!(reason(&big), R::Headers);
    }

    #[test]
    fn unknown_fields_and_far_times_are_accepted_and_flagged() {
        let mut value = event().encode_to_vec();
        value.extend_from_slice(&[0xa0, 0x06, 0x01]); // field 100, varint 1
        let ok = check(&record(Some(b"card-1"), value)).unwrap();
        assert!(ok.unknown_fields);
        let ok = check(&with(|e| e.event_time_unix_micros = NOW + 5 * 3_600_000_000)).unwrap();
        assert!(ok.time_suspect);
    }

    #[test]
    fn features_outside_the_models_range_are_rejected_or_clamped_as_configured() {
        use crate::model::{FeatureRange, OutOfRange};
        let decode_with = |on_violation, features: Vec<f32>| {
            let s = ModelSpec {
                feature_range: Some(FeatureRange { min: -1.0, max: 1.0, on_violation }),
                max_steps: 1,
                ..spec()
            };
            let rec = with(|e| e.features = features);
            decode(&rec, &Limits::default(), |m| (m == "fraud_gru").then_some(&s), NOW)
        };
        let err = decode_with(OutOfRange::Reject, vec![0.5, 1e9, 0.0, -0.5]).unwrap_err();
        assert_eq!(err.reason, DeadLetterReason::ValueRange);
        assert!(
            err.detail.contains("features[1] is 1000000000") && err.detail.contains("[-1, 1]"),
            "{err:?}"
        );
        let ok = decode_with(OutOfRange::Clamp, vec![0.5, 1e9, -7.0, -0.5]).unwrap();
        assert!(ok.clamped);
        assert_eq!(ok.event.features, vec![0.5, 1.0, -1.0, -0.5]);
        let ok = decode_with(OutOfRange::Reject, vec![0.5, 1.0, -1.0, 0.0]).unwrap();
        assert!(!ok.clamped, "the bounds are inclusive");
    }
}
