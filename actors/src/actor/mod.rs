//! The actix actors of the trainer (design.md "Actors"); their messages are in [`crate::protocol`].
//!
//! | actor | runs on | owns |
//! |---|---|---|
//! | [`rule_verifier::RuleVerifier`] | a `SyncArbiter` pool | the verifier registry |
//! | [`reward_model::RewardModel`] | a `SyncArbiter` of one thread | the frozen reward model |
//! | [`sample_buffer::SampleBuffer`] | any arbiter, under a `Supervisor` | the Selective Sample Buffer |
//! | [`policy_generator::PolicyGenerator`] | a `SyncArbiter` of one thread | a policy snapshot and its version |
//! | [`monitor::MonitorActor`] | any arbiter | the hallucination monitor and the calibration |
//! | [`optimizer::Optimizer`] | a dedicated `Arbiter` (its own thread) | the policy trainer: weights, AdamW state, reference |
//!
//! Handlers are thin: they call the pure functions of `verifiers`, `model` and `rl`. Every actor answers
//! [`crate::protocol::Heartbeat`] from its [`Liveness`] record, turns a panic in a handler into an error reply
//! ([`catch_panic`]), and closes on [`crate::protocol::Shutdown`] (later work is refused with an error).

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::protocol::{ActorName, HeartbeatReply};
use crate::Error;

pub mod monitor;
pub mod optimizer;
pub mod policy_generator;
pub mod reward_model;
pub mod rule_verifier;
pub mod sample_buffer;

/// What an actor did last: the answer to a heartbeat.
#[derive(Debug, Clone)]
pub struct Liveness {
    actor: ActorName,
    last_message: Option<&'static str>,
    handled: u64,
    restarts: u32,
}

impl Liveness {
    /// A record for `actor` that has handled nothing yet.
    pub fn new(actor: ActorName) -> Self {
        Self {
            actor,
            last_message: None,
            handled: 0,
            restarts: 0,
        }
    }

    /// Notes that a message called `message` is being handled.
    pub fn handling(&mut self, message: &'static str) {
        self.last_message = Some(message);
        self.handled += 1;
    }

    /// Notes a restart after a panic.
    pub fn restarted(&mut self) {
        self.restarts += 1;
    }

    /// The heartbeat reply.
    pub fn reply(&self) -> HeartbeatReply {
        HeartbeatReply {
            actor: self.actor,
            last_message: self.last_message,
            handled: self.handled,
            restarts: self.restarts,
        }
    }
}

/// Runs a handler's body, turning a panic into an error that names the actor and the message; `Ok(Err)` is
/// the body's own error, `Err` the panic (the caller then stops the actor so its supervisor restarts it).
pub(crate) fn catch_panic<T>(
    actor: ActorName,
    message: &str,
    body: impl FnOnce() -> T,
) -> std::result::Result<T, Error> {
    std::panic::catch_unwind(AssertUnwindSafe(body)).map_err(|payload| {
        let why = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a non-string panic payload".into());
        Error::msg(format!("actor {actor} panicked handling {message}: {why}"))
    })
}

/// Set by [`crate::protocol::Shutdown`]; shared by the workers of a pool (an `Arc`: every worker reads it,
/// the one that takes the message sets it).
#[derive(Debug, Clone, Default)]
pub(crate) struct Closed(Arc<AtomicBool>);

impl Closed {
    /// Closes the actor (later work is refused).
    pub(crate) fn close(&self, actor: ActorName) {
        self.0.store(true, Ordering::SeqCst);
        tracing::info!(actor = %actor, "shut down");
    }

    /// `Err` naming the actor and the message once closed.
    pub(crate) fn check(&self, actor: ActorName, message: &str) -> crate::Result<()> {
        if self.0.load(Ordering::SeqCst) {
            return Err(Error::msg(format!("{actor}: {message} after Shutdown")));
        }
        Ok(())
    }
}

/// Runs a handler body: refuses it when closed, notes it in `liveness`, and turns a panic into an error
/// reply naming the actor and the message.
pub(crate) fn handle_guarded<T>(
    liveness: &mut Liveness,
    closed: &Closed,
    message: &'static str,
    body: impl FnOnce() -> crate::Result<T>,
) -> crate::Result<T> {
    liveness.handling(message);
    closed.check(liveness.actor, message)?;
    catch_panic(liveness.actor, message, body)?
}
