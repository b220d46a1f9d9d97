//! The partition supervisor: the parent (ractor supervision) of every partition actor of a node.
//!
//! It spawns partition actors linked to itself and reports each one that stops for any reason
//! other than a drain (an error, a panic, a kill, a fence) as a [`PartitionDown`] on a channel.
//! Whoever owns the Kafka side of the partitions reads that channel and decides: restart the
//! partition from its stored offset within a [`RestartBudget`](crate::supervision::RestartBudget),
//! or give it up. In a node that is the consumer thread (`runtime/src/kafka/consumer.rs`): only it can
//! seek the partition back to the stored offset, and it must not block on the actor system.

use std::collections::HashMap;
use std::marker::PhantomData;

use crossbeam_channel::Sender;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use super::{PartitionActor, PartitionArgs, PartitionMsg, PartitionSink};
use crate::state::{Epoch, PartitionId, StateStore};
use crate::supervision::child_stopped;

/// The stop reason of a partition actor that drained (a revoke or shutdown): not a failure.
pub const DRAINED: &str = "drained";
/// Prefix of the stop reason of a partition actor whose writes a newer owner fenced.
pub const FENCED: &str = "fenced";

/// A partition actor stopped without being drained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionDown {
    pub partition: PartitionId,
    pub epoch: Epoch,
    /// Which actor: a restarted partition's old actor must not be confused with its new one.
    pub actor: ActorId,
    pub reason: String,
    /// A newer owner claimed the partition: restarting would steal it back; give it up instead.
    pub fenced: bool,
}

pub struct PartitionSupervisor<S, K>(PhantomData<fn() -> (S, K)>);

impl<S, K> Default for PartitionSupervisor<S, K> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

pub enum SupervisorMsg<S, K> {
    /// Start a partition actor as a child; replies with it (or why it did not start).
    Spawn(Box<PartitionArgs<S, K>>, RpcReplyPort<Result<ActorRef<PartitionMsg>, String>>),
}

pub struct SupervisorState {
    children: HashMap<ActorId, (PartitionId, Epoch)>,
    downs: Sender<PartitionDown>,
}

impl<S: StateStore, K: PartitionSink> Actor for PartitionSupervisor<S, K> {
    type Msg = SupervisorMsg<S, K>;
    type State = SupervisorState;
    type Arguments = Sender<PartitionDown>;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        downs: Sender<PartitionDown>,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(SupervisorState { children: HashMap::new(), downs })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Spawn(args, reply) => {
                let (partition, epoch) = (args.partition, args.epoch);
                let spawned =
                    Actor::spawn_linked(None, PartitionActor::<S, K>::default(), *args, myself.get_cell())
                        .await;
                let answer = match spawned {
                    Ok((actor, _)) => {
                        // Recorded before any supervision event of the child can be handled.
                        state.children.insert(actor.get_id(), (partition, epoch));
                        Ok(actor)
                    }
                    Err(e) => Err(e.to_string()),
                };
                let _ = reply.send(answer);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<Self::Msg>,
        evt: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let Some((actor, reason)) = child_stopped(&evt) else { return Ok(()) };
        let Some((partition, epoch)) = state.children.remove(&actor) else { return Ok(()) };
        if reason == DRAINED {
            return Ok(());
        }
        let fenced = reason.starts_with(FENCED);
        let down = PartitionDown { partition, epoch, actor, reason, fenced };
        tracing::error!(partition = %partition, epoch = epoch.0, reason = %down.reason, "partition actor down");
        let _ = state.downs.send(down);
        Ok(())
    }
}
