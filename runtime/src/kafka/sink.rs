//! The producer of scores and dead letters: [`KafkaSink`], the partition actors' [`PartitionSink`].

use std::time::Duration;

use crossbeam_channel::Sender;
use partita_actors::partition::{OutputRecord, OutputTopic, PartitionSink, SinkError};
use partita_actors::state::{Offset, PartitionId};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;

use super::{KafkaTier, owned_headers};

/// Scores and dead letters to the processing tier; commits through the consumer thread.
///
/// An idempotent producer that hits a fatal error (the broker rejected its sequence numbers) is
/// unusable for good; the sink then builds a new one and fails the batch, which the partition
/// actor retries (outputs may repeat: at least once).
pub struct KafkaSink {
    tier: KafkaTier,
    producer: std::sync::RwLock<FutureProducer>,
    scores_topic: String,
    dlq_topic: String,
    commits: Sender<(PartitionId, Offset)>,
}

impl KafkaSink {
    pub fn new(
        tier: KafkaTier,
        scores_topic: String,
        dlq_topic: String,
        commits: Sender<(PartitionId, Offset)>,
    ) -> anyhow::Result<Self> {
        let producer = std::sync::RwLock::new(tier.producer()?);
        Ok(Self { tier, producer, scores_topic, dlq_topic, commits })
    }

    fn current(&self) -> FutureProducer {
        self.producer.read().unwrap().clone()
    }

    /// Replace a producer that reported a fatal error (once, whoever sees it first).
    fn replace_fatal(&self, failed: &FutureProducer, error: &KafkaError) {
        let mut p = self.producer.write().unwrap();
        if !std::ptr::eq(p.client().native_ptr(), failed.client().native_ptr()) {
            return; // already replaced
        }
        tracing::error!(%error, "the output producer hit a fatal error; replacing it");
        match self.tier.producer() {
            Ok(fresh) => *p = fresh,
            Err(e) => tracing::error!(error = %e, "cannot create a new output producer"),
        }
    }
}

/// Errors the broker (or librdkafka's local checks) will answer again for the same record: the
/// record is refused for good, retrying it would stall its partition.
fn is_refused_for_good(e: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(C::MessageSizeTooLarge | C::InvalidMessageSize | C::InvalidMessage | C::InvalidRecord)
    )
}

fn is_fatal(e: &KafkaError) -> bool {
    e.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal)
}

impl PartitionSink for KafkaSink {
    async fn produce(&self, records: &[OutputRecord]) -> Result<(), SinkError> {
        let producer = self.current();
        let mut failed = SinkError::default();
        let note = |failed: &mut SinkError, i: usize, topic: &str, e: &KafkaError| {
            if is_fatal(e) {
                self.replace_fatal(&producer, e);
            }
            if failed.detail.is_empty() {
                failed.detail = format!("{topic}: {e}");
            }
            if is_refused_for_good(e) {
                failed.rejected.push((i, e.to_string()));
            } else {
                failed.unacked.push(i);
            }
        };
        let mut pending = Vec::with_capacity(records.len());
        for (i, r) in records.iter().enumerate() {
            let topic = match r.topic {
                OutputTopic::Scores => &self.scores_topic,
                OutputTopic::DeadLetters => &self.dlq_topic,
            };
            let mut record =
                FutureRecord::to(topic).key(&r.key).payload(&r.value).headers(owned_headers(&r.headers));
            loop {
                match producer.send_result(record) {
                    Ok(delivery) => {
                        pending.push((i, delivery));
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        record = back;
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    Err((e, _)) => {
                        note(&mut failed, i, topic, &e);
                        break;
                    }
                }
            }
        }
        let (indices, deliveries): (Vec<usize>, Vec<_>) = pending.into_iter().unzip();
        for (i, delivery) in indices.into_iter().zip(futures::future::join_all(deliveries).await) {
            match delivery {
                Ok(Ok(_)) => {}
                Ok(Err((e, m))) => note(&mut failed, i, m.topic(), &e),
                Err(_) => note(&mut failed, i, "?", &KafkaError::Canceled),
            }
        }
        if !failed.unacked.is_empty() || !failed.rejected.is_empty() {
            failed.unacked.sort_unstable();
            return Err(failed);
        }
        // Crash tests: `after-produce=2*off->return` dies like kill -9 right after the third
        // acknowledged output batch, before its state write.
        partita_actors::crash_point!("after-produce");
        Ok(())
    }

    fn commit(&self, partition: PartitionId, next_offset: Offset) {
        // The consumer thread stores it; a closed channel means the node is stopping.
        let _ = self.commits.send((partition, next_offset));
    }
}
