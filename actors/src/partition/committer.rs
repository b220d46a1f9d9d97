//! The commit stage (steps 6-8 of the module doc of `partition`): one task per partition actor.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use partita_proto::v1::DeadLetterReason;
use ractor::ActorRef;
use tracing::Instrument as _;

use super::actor::{Computed, Pending};
use super::records::refused_output;
use super::{
    OutputRecord, OutputTopic, PartitionConfig, PartitionMsg, PartitionSink, PipelineCounters,
    PipelineObserver, micros,
};
use crate::state::{Epoch, Offset, PartitionId, StateCache, StateStore, StateValue, StateWrite, StoreError};

/// The commit stage of one partition: produces computed batches' outputs, writes their states
/// with the offset, hands the offset to the group commit; strictly in batch order.
pub(super) struct Committer<S, K> {
    pub(super) topic: Arc<str>,
    pub(super) partition: PartitionId,
    pub(super) epoch: Epoch,
    pub(super) cache: Arc<StateCache<S>>,
    pub(super) sink: Arc<K>,
    pub(super) counters: Arc<PipelineCounters>,
    pub(super) observer: Arc<dyn PipelineObserver>,
    pub(super) config: PartitionConfig,
    pub(super) pending: Pending,
    pub(super) actor: ActorRef<PartitionMsg>,
}

impl<S: StateStore, K: PartitionSink> Committer<S, K> {
    /// Until the actor drops its sender; returns the last applied offset it wrote.
    pub(super) async fn run(self, mut rx: tokio::sync::mpsc::Receiver<Computed>) -> Option<Offset> {
        let mut applied = None;
        while let Some(first) = rx.recv().await {
            // Everything computed meanwhile goes out together: one wait for acks, one write.
            let mut group = vec![first];
            while let Ok(next) = rx.try_recv() {
                group.push(next);
            }
            let span = group[0].span.clone();
            match self.commit(&mut group).instrument(span).await {
                Ok(last) => applied = Some(last),
                Err(e) => {
                    tracing::error!(partition = %self.partition, error = %e, "partition stops");
                    let _ = self.actor.cast(PartitionMsg::Failed(e));
                    return applied;
                }
            }
        }
        applied
    }

    /// Moves the group's outputs and states out (no copies); its spans end when it is dropped.
    async fn commit(&self, group: &mut [Computed]) -> Result<Offset, StoreError> {
        let started = Instant::now();
        let mut outputs: Vec<OutputRecord> =
            group.iter_mut().flat_map(|b| std::mem::take(&mut b.outputs)).collect();
        let mut backoff = self.config.backoff;
        // Scores refused for good, replaced by minimal dead letters.
        let mut refused_scores = 0u64;
        while let Err(e) = self.sink.produce(&outputs).await {
            self.counters.retries.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(partition = %self.partition, error = %e, ?backoff, "produce failed; retrying what was not acknowledged");
            // Again: only what was not acknowledged (no duplicates of the rest), and a minimal
            // dead letter for each output the broker will never take (no retry loop on it).
            let rejected: HashMap<usize, String> = e.rejected.into_iter().collect();
            let unacked: std::collections::HashSet<usize> = e.unacked.into_iter().collect();
            let mut next = Vec::with_capacity(unacked.len() + rejected.len());
            for (i, out) in outputs.into_iter().enumerate() {
                if let Some(why) = rejected.get(&i) {
                    match refused_output(&self.topic, self.partition, &out, why) {
                        Some(minimal) => {
                            if out.topic == OutputTopic::Scores {
                                refused_scores += 1;
                            }
                            tracing::error!(partition = %self.partition, offset = out.source_offset.0, bytes = out.value.len(), reason = %why, "output refused for good; a minimal dead letter replaces it");
                            next.push(minimal);
                        }
                        // Already minimal: nothing smaller to send; keep trying it.
                        None => next.push(out),
                    }
                } else if unacked.contains(&i) {
                    next.push(out);
                }
            }
            outputs = next;
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.config.max_backoff);
        }
        // A later batch's state of a key replaces an earlier one's.
        let mut entries: HashMap<Vec<u8>, StateValue> = HashMap::new();
        for b in group.iter_mut() {
            entries.extend(std::mem::take(&mut b.entries));
        }
        let last = group.last().expect("a group has a batch").applied;
        let write = StateWrite {
            partition: self.partition,
            epoch: self.epoch,
            applied_offset: last,
            entries: entries.into_iter().collect(),
        };
        let produced = Instant::now();
        self.store_with_retry(&write).await?;
        self.observer.state_written(self.partition, produced.elapsed());
        // Written, so in the cache: drop the pending states unless a later batch changed the key.
        let newest = group.last().expect("a group has a batch").no;
        {
            let mut pending = self.pending.lock().unwrap();
            for (k, _) in &write.entries {
                if pending.get(k).is_some_and(|(no, _)| *no <= newest) {
                    pending.remove(k);
                }
            }
        }
        tracing::debug!(
            partition = %self.partition,
            batches = group.len(),
            records = group.iter().map(|b| b.records).sum::<usize>(),
            produce_us = micros(produced - started),
            store_us = micros(produced.elapsed()),
            "batches applied"
        );
        crate::crash_point!("after-state-write");
        let c = &self.counters;
        c.applied_offsets.lock().unwrap().insert(self.partition.0, last.0);
        self.sink.commit(self.partition, Offset(last.0 + 1));
        c.scored.fetch_sub(refused_scores, Ordering::Relaxed);
        c.dead_letters[DeadLetterReason::OutputRejected as usize]
            .fetch_add(refused_scores, Ordering::Relaxed);
        for b in group.iter() {
            c.scored.fetch_add(b.scored, Ordering::Relaxed);
            for r in &b.dead {
                c.dead_letters[*r as usize].fetch_add(1, Ordering::Relaxed);
            }
        }
        c.batches.fetch_add(group.len() as u64, Ordering::Relaxed);
        Ok(last)
    }

    /// The outputs are out: the state write must now succeed (or the actor stop) before anything
    /// else happens, so it retries here.
    async fn store_with_retry(&self, write: &StateWrite) -> Result<(), StoreError> {
        let mut backoff = self.config.backoff;
        loop {
            match self.cache.apply(write.clone()).await {
                Ok(()) => return Ok(()),
                Err(StoreError::Unavailable { detail }) => {
                    self.counters.retries.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(partition = %self.partition, %detail, "state write failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.config.max_backoff);
                }
                Err(fatal) => return Err(fatal),
            }
        }
    }
}
