//! SampleBuffer: owns the Selective Sample Buffer ([`SelectiveSampleBuffer`]).
//!
//! - [`ScoredGroups`]: drops the zero-advantage groups (counting every group by kind) and keeps the
//!   informative ones for the next batch.
//! - [`NextBatch`]: hands the kept groups to [`SelectiveSampleBuffer::fill_batch`], which tops the batch up
//!   by replay and stores them; replies [`TrainBatch`] with the ssb/* metrics of all groups received since
//!   the previous batch.
//! - [`Snapshot`]: the whole state, serde-serialisable, for a checkpoint; [`SampleBuffer::from_snapshot`]
//!   resumes from it.
//!
//! Bookkeeping only, no compute: it runs on an ordinary arbiter, under an actix `Supervisor`. A handler that
//! panics gets an error reply, and the actor stops and is restarted (`restarting` rolls the state back to
//! what it was before that message), so the next message succeeds.

use actix::{Actor, ActorContext, Addr, Context, Handler, Supervised, Supervisor};

use super::{catch_panic, Liveness};
use crate::protocol::{
    Accepted, ActorName, BufferSnapshot, Group, Heartbeat, HeartbeatReply, NextBatch, ScoredGroups,
    Shutdown, Snapshot, TrainBatch,
};
use crate::rl::advantages::GroupKindCounts;
use crate::rl::config::SsbConfig;
use crate::rl::ssb::SelectiveSampleBuffer;
use crate::{Error, Result};

/// The sample buffer actor.
pub struct SampleBuffer {
    ssb: SelectiveSampleBuffer,
    /// Informative groups received since the last batch.
    pending: Vec<Group>,
    /// Groups received since the last batch, zero-advantage ones included.
    pending_received: usize,
    /// Their kinds.
    pending_kinds: GroupKindCounts,
    /// The state before the message being handled: what a restart after a panic rolls back to.
    last_good: Option<BufferSnapshot>,
    /// Set by [`Shutdown`]: work messages are refused.
    closed: bool,
    /// Fault injection: the [`NextBatch`] for these policy versions panics once each (see
    /// [`SampleBuffer::inject_panics_at`]). Kept across restarts, so each fires once.
    panic_at_versions: Vec<u64>,
    liveness: Liveness,
}

impl SampleBuffer {
    /// An empty buffer (the configuration is validated).
    pub fn new(config: SsbConfig) -> Result<Self> {
        Ok(Self::with_buffer(SelectiveSampleBuffer::new(config)?))
    }

    /// A buffer resumed from a [`Snapshot`] reply.
    pub fn from_snapshot(snapshot: BufferSnapshot) -> Result<Self> {
        let mut actor = Self::with_buffer(SelectiveSampleBuffer::from_state(snapshot.ssb)?);
        actor.pending = snapshot.pending;
        actor.pending_received = snapshot.pending_received;
        actor.pending_kinds = snapshot.pending_kinds;
        Ok(actor)
    }

    fn with_buffer(ssb: SelectiveSampleBuffer) -> Self {
        Self {
            ssb,
            pending: Vec::new(),
            pending_received: 0,
            pending_kinds: GroupKindCounts::default(),
            last_good: None,
            closed: false,
            panic_at_versions: Vec::new(),
            liveness: Liveness::new(ActorName::SampleBuffer),
        }
    }

    /// Fault drill: the first [`NextBatch`] for each of `versions` panics inside the handler (after the state
    /// was remembered), so the supervisor restart, the rollback and the caller's retry are exercised for real.
    pub fn inject_panics_at(mut self, versions: Vec<u64>) -> Self {
        self.panic_at_versions = versions;
        self
    }

    /// Starts the actor under a supervisor on the current arbiter.
    pub fn start_supervised(self) -> Addr<Self> {
        Supervisor::start(move |_ctx| self)
    }

    /// The whole state.
    pub fn snapshot(&self) -> BufferSnapshot {
        BufferSnapshot {
            ssb: self.ssb.state(),
            pending: self.pending.clone(),
            pending_received: self.pending_received,
            pending_kinds: self.pending_kinds,
        }
    }

    /// Keeps the informative groups of `groups` (every group with the buffer disabled: plain GRPO),
    /// counting all of them.
    fn insert(&mut self, groups: Vec<Group>) -> Accepted {
        let zero_tolerance = self.ssb.config().zero_tolerance;
        let keep_all = !self.ssb.config().enabled;
        let mut accepted = Accepted::default();
        for group in groups {
            let kind = group.kind(zero_tolerance);
            accepted.kinds.add(kind);
            self.pending_kinds.add(kind);
            self.pending_received += 1;
            if keep_all || !kind.is_zero_advantage() {
                accepted.kept += 1;
                self.pending.push(group);
            }
        }
        accepted
    }

    /// The next batch from the kept groups and the buffer; the counts start again.
    fn next_batch(&mut self, request: NextBatch) -> Result<TrainBatch> {
        // On an error the kept groups stay for the next request.
        let fresh = self.pending.clone();
        let batch = self
            .ssb
            .fill_batch(fresh, request.target, request.policy_version)?;
        let mut metrics = batch.metrics;
        metrics.fresh_groups = self.pending_received;
        metrics.kinds = self.pending_kinds;
        self.pending.clear();
        self.pending_received = 0;
        self.pending_kinds = GroupKindCounts::default();
        Ok(TrainBatch {
            policy_version: request.policy_version,
            groups: batch.groups,
            replayed: batch.replayed,
            metrics,
        })
    }

    /// Runs a state-changing handler body: remembers the state first, and on a panic stops the actor so its
    /// supervisor restarts it from that state. A closed buffer refuses.
    fn guarded<T>(
        &mut self,
        ctx: &mut Context<Self>,
        message: &'static str,
        body: impl FnOnce(&mut Self) -> Result<T>,
    ) -> Result<T> {
        self.liveness.handling(message);
        if self.closed {
            return Err(Error::msg(format!(
                "sample_buffer: {message} after Shutdown"
            )));
        }
        self.last_good = Some(self.snapshot());
        let outcome = catch_panic(ActorName::SampleBuffer, message, || body(self));
        match &outcome {
            Ok(_) => self.last_good = None,
            Err(error) => {
                tracing::error!(%error, "sample_buffer: restarting");
                ctx.stop();
            }
        }
        outcome.and_then(|inner| inner)
    }
}

impl Actor for SampleBuffer {
    type Context = Context<Self>;
}

impl Supervised for SampleBuffer {
    /// Rolls back to the state before the message that panicked.
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        self.liveness.restarted();
        let Some(snapshot) = self.last_good.take() else {
            return;
        };
        // The snapshot was taken from a valid buffer, so its configuration validates again.
        match SelectiveSampleBuffer::from_state(snapshot.ssb) {
            Ok(ssb) => self.ssb = ssb,
            Err(error) => tracing::error!(%error, "sample_buffer: cannot roll back the buffer"),
        }
        self.pending = snapshot.pending;
        self.pending_received = snapshot.pending_received;
        self.pending_kinds = snapshot.pending_kinds;
    }
}

impl Handler<ScoredGroups> for SampleBuffer {
    type Result = Result<Accepted>;

    fn handle(&mut self, msg: ScoredGroups, ctx: &mut Context<Self>) -> Result<Accepted> {
        self.guarded(ctx, "ScoredGroups", |actor| Ok(actor.insert(msg.groups)))
    }
}

impl Handler<NextBatch> for SampleBuffer {
    type Result = Result<TrainBatch>;

    fn handle(&mut self, msg: NextBatch, ctx: &mut Context<Self>) -> Result<TrainBatch> {
        self.guarded(ctx, "NextBatch", |actor| {
            if let Some(at) = actor
                .panic_at_versions
                .iter()
                .position(|&v| v == msg.policy_version)
            {
                actor.panic_at_versions.remove(at);
                panic!("injected fault at policy version {}", msg.policy_version);
            }
            actor.next_batch(msg)
        })
    }
}

impl Handler<Snapshot> for SampleBuffer {
    type Result = BufferSnapshot;

    fn handle(&mut self, _msg: Snapshot, _ctx: &mut Context<Self>) -> BufferSnapshot {
        self.liveness.handling("Snapshot");
        self.snapshot()
    }
}

impl Handler<Heartbeat> for SampleBuffer {
    type Result = HeartbeatReply;

    fn handle(&mut self, _msg: Heartbeat, _ctx: &mut Context<Self>) -> HeartbeatReply {
        self.liveness.reply()
    }
}

impl Handler<Shutdown> for SampleBuffer {
    type Result = ();

    /// Closes the buffer (see [`Shutdown`]); it stops when its last address is dropped.
    fn handle(&mut self, _msg: Shutdown, _ctx: &mut Context<Self>) {
        self.liveness.handling("Shutdown");
        self.closed = true;
        tracing::info!(actor = %ActorName::SampleBuffer, "shut down");
    }
}

#[cfg(test)]
#[path = "sample_buffer_tests.rs"]
mod tests;
