//! Liveness: every request the controller makes runs under a deadline, and a background task heartbeats
//! every actor. A request past its deadline, or an actor that misses a heartbeat for the stall timeout, is a
//! [`Stall`] naming the actor and the message: the controller then stops the run with a checkpoint instead
//! of hanging forever.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::dev::ToEnvelope;
use actix::{Actor, Addr, Handler};
use parking_lot::Mutex;
use r1v2_actors::protocol::{ActorName, Heartbeat};

use crate::{Error, Result};

/// An actor that did not answer in time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stall {
    /// The actor.
    pub actor: ActorName,
    /// The message it was handling (or the last one it handled, for a missed heartbeat).
    pub message: String,
    /// How long it was waited for.
    pub waited: Duration,
}

impl std::fmt::Display for Stall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "actor `{}` stalled on `{}`: no answer after {:.1} s (watchdog.stall_timeout_s)",
            self.actor,
            self.message,
            self.waited.as_secs_f64()
        )
    }
}

/// The watchdog's shared record: the first stall seen (by a deadline or a heartbeat).
#[derive(Debug, Clone, Default)]
pub struct Watchdog {
    /// `Mutex`: written by the heartbeat task and the controller, read by the controller between steps.
    stalled: Arc<Mutex<Option<Stall>>>,
    timeout: Duration,
}

impl Watchdog {
    /// A watchdog with this stall timeout.
    pub fn new(timeout: Duration) -> Self {
        Self {
            stalled: Arc::default(),
            timeout,
        }
    }

    /// The first stall seen, if any.
    pub fn stalled(&self) -> Option<Stall> {
        self.stalled.lock().clone()
    }

    fn record(&self, stall: Stall) -> Error {
        let mut slot = self.stalled.lock();
        tracing::error!("watchdog: {stall}");
        let error = Error::Msg(format!("watchdog: {stall}"));
        slot.get_or_insert(stall);
        error
    }

    /// Awaits `request` (a message sent to `actor`) within the stall timeout; a mailbox error (the actor is
    /// gone) or the timeout is an error naming both.
    pub async fn call<T>(
        &self,
        actor: ActorName,
        message: &str,
        request: impl Future<Output = std::result::Result<T, actix::MailboxError>>,
    ) -> Result<T> {
        let started = Instant::now();
        match actix::clock::timeout(self.timeout, request).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(mailbox)) => Err(Error::Msg(format!(
                "actor `{actor}` did not answer `{message}`: {mailbox}"
            ))),
            Err(_) => Err(self.record(Stall {
                actor,
                message: message.into(),
                waited: started.elapsed(),
            })),
        }
    }

    /// Heartbeats `addr` every `every` until the process ends; a heartbeat unanswered for the stall timeout
    /// records a stall naming the actor and the last message it handled.
    pub fn watch<A>(&self, name: ActorName, addr: Addr<A>, every: Duration)
    where
        A: Actor + Handler<Heartbeat>,
        A::Context: ToEnvelope<A, Heartbeat>,
    {
        let watchdog = self.clone();
        actix::spawn(async move {
            let mut last_message = String::from("(none yet)");
            loop {
                actix::clock::sleep(every).await;
                let started = Instant::now();
                match actix::clock::timeout(watchdog.timeout, addr.send(Heartbeat)).await {
                    Ok(Ok(reply)) => {
                        if let Some(message) = reply.last_message {
                            last_message = message.to_string();
                        }
                        tracing::trace!(
                            actor = %name,
                            handled = reply.handled,
                            restarts = reply.restarts,
                            "heartbeat"
                        );
                    }
                    // The actor is gone: the run is ending.
                    Ok(Err(_)) => return,
                    Err(_) => {
                        watchdog.record(Stall {
                            actor: name,
                            message: last_message.clone(),
                            waited: started.elapsed(),
                        });
                        return;
                    }
                }
            }
        });
    }
}
