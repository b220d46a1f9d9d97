//! The commit stage (steps 6-8 of the module doc of `partition`): one task per partition actor,
//! in two stages so a group's state write never holds back the next group's outputs.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use partita_proto::v1::DeadLetterReason;
use ractor::ActorRef;
use tokio::sync::mpsc;
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

/// A group whose outputs the broker acknowledged, on its way to the state write.
struct Produced {
    /// Its batches, outputs moved out; their spans end when the group is written.
    batches: Vec<Computed>,
    /// Scores refused for good, replaced by minimal dead letters.
    refused_scores: u64,
    produce_time: Duration,
    /// Its room among the acknowledged batches not yet written, given back once it is written.
    room: u32,
}

impl<S: StateStore, K: PartitionSink> Committer<S, K> {
    /// Until the actor drops its sender and everything it sent is written; returns the last
    /// applied offset it wrote.
    ///
    /// Producing and writing run side by side: while a group's state write (with its fsync, or a
    /// `[state] write_window`) is in flight, the next group's outputs go to the broker. The order
    /// that matters holds: a group's states are written only after its outputs are acknowledged,
    /// and groups are written in batch order. A crash in between re-runs from the stored offset,
    /// as before: outputs of unwritten groups may repeat (at least once), states apply once.
    pub(super) async fn run(self, rx: mpsc::Receiver<Computed>) -> Option<Offset> {
        // Acknowledged batches not yet written: at most 2 x max_pending_batches (a larger group
        // takes all the room), so what a partition holds computed and unwritten stays bounded
        // (docs/pipeline.md) in batches, however small the groups.
        let room = tokio::sync::Semaphore::new(self.acked_limit() as usize);
        let (produced_tx, produced_rx) = mpsc::unbounded_channel();
        let writing = self.write_stage(produced_rx, &room);
        tokio::pin!(writing);
        tokio::select! {
            // The writer stopped on a failure: nothing more goes out.
            applied = &mut writing => return applied,
            () = self.produce_stage(rx, produced_tx, &room) => {}
        }
        // Everything is produced and the writer's channel closed: it writes what is left.
        writing.await
    }

    fn acked_limit(&self) -> u32 {
        u32::try_from(2 * self.config.max_pending_batches.max(1)).unwrap_or(u32::MAX)
    }

    /// Produces each group of computed batches (everything computed meanwhile goes out together:
    /// one wait for acks) and hands it to the writer once there is room for it, until the actor
    /// or the writer stops.
    async fn produce_stage(
        &self,
        mut rx: mpsc::Receiver<Computed>,
        tx: mpsc::UnboundedSender<Produced>,
        room: &tokio::sync::Semaphore,
    ) {
        while let Some(first) = rx.recv().await {
            let mut batches = vec![first];
            while let Ok(next) = rx.try_recv() {
                batches.push(next);
            }
            let span = batches[0].span.clone();
            let mut produced = self.produce(batches).instrument(span).await;
            produced.room = u32::try_from(produced.batches.len()).unwrap_or(u32::MAX).min(self.acked_limit());
            let Ok(permits) = room.acquire_many(produced.room).await else { return };
            permits.forget();
            if tx.send(produced).is_err() {
                return;
            }
        }
    }

    /// Writes what was produced (every group waiting goes in one write), until the producer's
    /// channel closes; stops the actor on a fatal store error.
    async fn write_stage(
        &self,
        mut rx: mpsc::UnboundedReceiver<Produced>,
        room: &tokio::sync::Semaphore,
    ) -> Option<Offset> {
        let mut applied = None;
        while let Some(first) = rx.recv().await {
            let mut groups = vec![first];
            while let Ok(next) = rx.try_recv() {
                groups.push(next);
            }
            let span = groups[0].batches[0].span.clone();
            match self.write(&mut groups).instrument(span).await {
                Ok(last) => {
                    applied = Some(last);
                    room.add_permits(groups.iter().map(|g| g.room as usize).sum());
                }
                Err(e) => {
                    tracing::error!(partition = %self.partition, error = %e, "partition stops");
                    let _ = self.actor.cast(PartitionMsg::Failed(e));
                    return applied;
                }
            }
        }
        applied
    }

    /// Moves the batches' outputs out (no copies) and waits until the broker acknowledged each.
    async fn produce(&self, mut batches: Vec<Computed>) -> Produced {
        let started = Instant::now();
        let mut outputs: Vec<OutputRecord> =
            batches.iter_mut().flat_map(|b| std::mem::take(&mut b.outputs)).collect();
        let mut backoff = self.config.backoff;
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
        Produced { batches, refused_scores, produce_time: started.elapsed(), room: 0 }
    }

    /// Writes the groups' states (a later batch's state of a key replaces an earlier one's) with
    /// the last batch's offset in one write, then hands the offset to the group commit.
    async fn write(&self, groups: &mut [Produced]) -> Result<Offset, StoreError> {
        let mut entries: HashMap<Vec<u8>, StateValue> = HashMap::new();
        for b in groups.iter_mut().flat_map(|g| g.batches.iter_mut()) {
            entries.extend(std::mem::take(&mut b.entries));
        }
        let newest = groups.last().and_then(|g| g.batches.last()).expect("a group has a batch");
        let (last, newest_no) = (newest.applied, newest.no);
        let write = StateWrite {
            partition: self.partition,
            epoch: self.epoch,
            applied_offset: last,
            entries: entries.into_iter().collect(),
        };
        let started = Instant::now();
        self.store_with_retry(&write).await?;
        self.observer.state_written(self.partition, started.elapsed());
        // Written, so in the cache: drop the pending states unless a later batch changed the key.
        {
            let mut pending = self.pending.lock().unwrap();
            for (k, _) in &write.entries {
                if pending.get(k).is_some_and(|(no, _)| *no <= newest_no) {
                    pending.remove(k);
                }
            }
        }
        let batches = || groups.iter().flat_map(|g| g.batches.iter());
        tracing::debug!(
            partition = %self.partition,
            groups = groups.len(),
            batches = batches().count(),
            records = batches().map(|b| b.records).sum::<usize>(),
            produce_us = groups.iter().map(|g| micros(g.produce_time)).max(),
            store_us = micros(started.elapsed()),
            "batches applied"
        );
        crate::crash_point!("after-state-write");
        let c = &self.counters;
        c.applied_offsets.lock().unwrap().insert(self.partition.0, last.0);
        self.sink.commit(self.partition, Offset(last.0 + 1));
        let refused_scores: u64 = groups.iter().map(|g| g.refused_scores).sum();
        c.scored.fetch_sub(refused_scores, Ordering::Relaxed);
        c.dead_letters[DeadLetterReason::OutputRejected as usize]
            .fetch_add(refused_scores, Ordering::Relaxed);
        for b in batches() {
            c.scored.fetch_add(b.scored, Ordering::Relaxed);
            for r in &b.dead {
                c.dead_letters[*r as usize].fetch_add(1, Ordering::Relaxed);
            }
        }
        c.batches.fetch_add(batches().count() as u64, Ordering::Relaxed);
        Ok(last)
    }

    /// The outputs are out: the state write must now succeed (or the actor stop) before any later
    /// group is written, so it retries here.
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
