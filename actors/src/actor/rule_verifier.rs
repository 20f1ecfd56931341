//! RuleVerifier: a pool of sync actors over one shared [`VerifierRegistry`].
//!
//! Receives [`Verify`] and replies [`Verdicts`] in request order. The registry already turns a verifier's
//! error, panic or timeout into a zero-score verdict that says why, so a bad verifier costs its items their
//! rule reward and never the actor. The pool runs on its own threads (`SyncArbiter`): a slow verifier never
//! blocks message routing, and `width` requests are verified at once.

use std::sync::Arc;

use actix::{Actor, Addr, Handler, SyncArbiter, SyncContext};
use parking_lot::Mutex;

use super::{catch_panic, Closed, Liveness};
use crate::protocol::{ActorName, Heartbeat, HeartbeatReply, Shutdown, Verdicts, Verify};
use crate::verifiers::registry::VerifierRegistry;
use crate::Result;

const NAME: ActorName = ActorName::RuleVerifier;

/// One worker of the pool.
pub struct RuleVerifier {
    registry: Arc<VerifierRegistry>,
    /// Shared by the pool's workers: a heartbeat, whichever worker takes it, reports the whole pool. Held
    /// only to note a message, never while verifying, so a heartbeat never waits for a slow verifier.
    liveness: Arc<Mutex<Liveness>>,
    /// Shared by the pool's workers.
    closed: Closed,
}

impl RuleVerifier {
    /// Starts `width` workers (at least one) sharing `registry`; needs a running actix `System`.
    pub fn start_pool(registry: Arc<VerifierRegistry>, width: usize) -> Addr<Self> {
        let liveness = Arc::new(Mutex::new(Liveness::new(NAME)));
        let closed = Closed::default();
        SyncArbiter::start(width.max(1), move || RuleVerifier {
            registry: Arc::clone(&registry),
            liveness: Arc::clone(&liveness),
            closed: closed.clone(),
        })
    }
}

impl Actor for RuleVerifier {
    type Context = SyncContext<Self>;
}

impl Handler<Verify> for RuleVerifier {
    type Result = Result<Verdicts>;

    fn handle(&mut self, msg: Verify, _ctx: &mut SyncContext<Self>) -> Result<Verdicts> {
        self.liveness.lock().handling("Verify");
        self.closed.check(NAME, "Verify")?;
        // The registry already turns each verifier's panic into its verdict; this catches the rest.
        let verdicts = catch_panic(NAME, "Verify", || self.registry.verify_batch(&msg.items))?;
        Ok(Verdicts { verdicts })
    }
}

impl Handler<Shutdown> for RuleVerifier {
    type Result = ();

    fn handle(&mut self, _msg: Shutdown, _ctx: &mut SyncContext<Self>) {
        self.liveness.lock().handling("Shutdown");
        self.closed.close(NAME);
    }
}

impl Handler<Heartbeat> for RuleVerifier {
    type Result = HeartbeatReply;

    fn handle(&mut self, _msg: Heartbeat, _ctx: &mut SyncContext<Self>) -> HeartbeatReply {
        self.liveness.lock().reply()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::verifiers::registry::VerifyRequest;
    use crate::verifiers::{Verdict, Verifier, VerifyInput};
    use crate::{Error, Result};

    /// Scores 1 when the response equals the answer, else 0.
    struct Exact;
    impl Verifier for Exact {
        fn name(&self) -> &str {
            "exact"
        }
        fn verify(&self, input: &VerifyInput<'_>) -> Result<Verdict> {
            let hit = input.response.trim() == input.answer.trim();
            Ok(Verdict {
                score: if hit { 1.0 } else { 0.0 },
                format_ok: true,
                extracted: Some(input.response.trim().to_string()),
                reason: if hit { "match" } else { "mismatch" }.into(),
                hallucination: None,
                failure: None,
            })
        }
    }

    /// Misbehaves as its name says.
    struct Broken(&'static str);
    impl Verifier for Broken {
        fn name(&self) -> &str {
            self.0
        }
        fn verify(&self, _input: &VerifyInput<'_>) -> Result<Verdict> {
            match self.0 {
                "errs" => Err(Error::msg("cannot parse the answer")),
                "panics" => panic!("verifier bug"),
                _ => {
                    std::thread::sleep(Duration::from_secs(3));
                    Ok(Verdict::zero("late"))
                }
            }
        }
    }

    /// The four test verifiers; a verifier that runs past `timeout` is cut off.
    fn registry(timeout: Duration) -> Arc<VerifierRegistry> {
        let mut registry = VerifierRegistry::new(timeout, 4);
        for verifier in [
            Arc::new(Exact) as Arc<dyn Verifier>,
            Arc::new(Broken("errs")),
            Arc::new(Broken("panics")),
            Arc::new(Broken("hangs")),
        ] {
            registry.register(verifier);
        }
        Arc::new(registry)
    }

    fn request(verifier: &str, response: &str, answer: &str) -> VerifyRequest {
        VerifyRequest {
            verifier: verifier.into(),
            response: response.into(),
            answer: answer.into(),
            ..Default::default()
        }
    }

    #[actix::test]
    async fn verdicts_come_back_in_order_and_failures_cost_only_their_item() -> anyhow::Result<()> {
        // A generous timeout: the machine is shared, and only the 3 s hang may run past it.
        let pool = RuleVerifier::start_pool(registry(Duration::from_secs(1)), 2);
        let items = vec![
            request("exact", "42", "42"),
            request("errs", "42", "42"),
            request("exact", "41", "42"),
            request("panics", "42", "42"),
            request("hangs", "42", "42"),
            request("nope", "42", "42"),
            request("exact", " 7 ", "7"),
        ];
        let reply = pool.send(Verify { items }).await??;
        let scores: Vec<f32> = reply.verdicts.iter().map(|v| v.score).collect();
        assert_eq!(scores, vec![1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]);
        let reasons: Vec<&str> = reply.verdicts.iter().map(|v| v.reason.as_str()).collect();
        assert_eq!(reasons[0], "match");
        assert!(
            reasons[1].contains("cannot parse the answer"),
            "{}",
            reasons[1]
        );
        assert_eq!(reasons[2], "mismatch");
        assert!(reasons[3].contains("verifier bug"), "{}", reasons[3]);
        // Cut off by the timeout: had it run to the end, its own verdict would say "late".
        assert!(reasons[4].contains("`hangs` timed out"), "{}", reasons[4]);
        assert!(reasons[5].contains("nope"), "{}", reasons[5]);

        // The pool survived all of it.
        let again = pool
            .send(Verify {
                items: vec![request("exact", "1", "1")],
            })
            .await??;
        assert_eq!(again.verdicts[0].score, 1.0);
        let beat = pool.send(Heartbeat).await?;
        assert_eq!(beat.actor, ActorName::RuleVerifier);
        assert_eq!(beat.last_message, Some("Verify"));
        assert_eq!(beat.handled, 2);

        // Closed: every worker of the pool refuses later work.
        pool.send(Shutdown).await?;
        for _ in 0..2 {
            let refused = pool
                .send(Verify {
                    items: vec![request("exact", "1", "1")],
                })
                .await?
                .expect_err("a closed pool must refuse");
            assert!(refused.to_string().contains("after Shutdown"), "{refused}");
        }
        Ok(())
    }

    /// Two requests meet here: each scores 1 only if the other arrives while it is still inside
    /// `verify`, which happens only when two workers run them at once. Not a timing assertion: the
    /// wait bound only turns a serial pool into a failed verdict instead of a hang.
    struct Rendezvous(Arc<(std::sync::Mutex<usize>, std::sync::Condvar)>);
    impl Verifier for Rendezvous {
        fn name(&self) -> &str {
            "rendezvous"
        }
        fn verify(&self, _input: &VerifyInput<'_>) -> Result<Verdict> {
            let (count, arrived) = &*self.0;
            let mut count = count.lock().map_err(|_| Error::msg("poisoned"))?;
            *count += 1;
            arrived.notify_all();
            let (count, wait) = arrived
                .wait_timeout_while(count, Duration::from_secs(10), |n| *n < 2)
                .map_err(|_| Error::msg("poisoned"))?;
            if wait.timed_out() {
                return Err(Error::msg(format!("partner never arrived ({})", *count)));
            }
            Ok(Verdict {
                score: 1.0,
                format_ok: true,
                extracted: None,
                reason: "met".into(),
                hallucination: None,
                failure: None,
            })
        }
    }

    #[actix::test]
    async fn a_pool_of_two_verifies_two_requests_at_once() -> anyhow::Result<()> {
        let meeting = Arc::new((std::sync::Mutex::new(0), std::sync::Condvar::new()));
        let mut registry = VerifierRegistry::new(Duration::from_secs(20), 1);
        registry.register(Arc::new(Rendezvous(meeting)));
        let pool = RuleVerifier::start_pool(Arc::new(registry), 2);
        // `send` queues a message at once, so both are in the mailbox before either is awaited.
        let first = pool.send(Verify {
            items: vec![request("rendezvous", "", "")],
        });
        let second = pool.send(Verify {
            items: vec![request("rendezvous", "", "")],
        });
        let (a, b) = (first.await??, second.await??);
        for verdict in [&a.verdicts[0], &b.verdicts[0]] {
            assert_eq!(
                verdict.score, 1.0,
                "not run concurrently: {}",
                verdict.reason
            );
        }
        Ok(())
    }
}
