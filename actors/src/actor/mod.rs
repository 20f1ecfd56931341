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
//! [`crate::protocol::Heartbeat`] from its [`Liveness`] record.

use std::panic::AssertUnwindSafe;

use crate::protocol::HeartbeatReply;
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
    actor: &'static str,
    last_message: Option<&'static str>,
    handled: u64,
    restarts: u32,
}

impl Liveness {
    /// A record for the actor called `actor` that has handled nothing yet.
    pub fn new(actor: &'static str) -> Self {
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
    actor: &str,
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
