//! The verifier registry: picks a verifier by a dataset line's `verifier` field and runs it safely.
//!
//! Safely means the caller always gets a verdict, promptly: an `Err`, a panic (caught with `catch_unwind`)
//! or a run past the timeout becomes a zero-score verdict that says why. A verifier that overruns keeps its
//! thread until it returns (Rust cannot kill a thread); the caller has moved on. The code verifier and the
//! plugins have their own limits inside, so that case is left to a misbehaving custom verifier.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use serde_json::Value;

use super::choice::ChoiceVerifier;
use super::code::CodeVerifier;
use super::config::VerifiersConfig;
use super::format::FormatVerifier;
use super::grounding::GroundingVerifier;
use super::math::MathVerifier;
use super::plugin::PluginVerifier;
pub use super::VerifyFailure;
use super::{Verdict, Verifier, VerifyInput};
use crate::Result;

/// One owned verification request (a dataset line plus a response).
#[derive(Debug, Clone, Default)]
pub struct VerifyRequest {
    /// The verifier's name (the dataset line's `verifier` field).
    pub verifier: String,
    /// The prompt.
    pub prompt: String,
    /// The model response.
    pub response: String,
    /// The reference answer.
    pub answer: String,
    /// Free-form metadata (`null` when absent).
    pub meta: Value,
}

impl VerifyRequest {
    fn input(&self) -> VerifyInput<'_> {
        VerifyInput {
            prompt: &self.prompt,
            response: &self.response,
            answer: &self.answer,
            meta: &self.meta,
        }
    }
}

/// Verifiers by name, with the timeout and batch width they run under.
pub struct VerifierRegistry {
    verifiers: BTreeMap<String, Arc<dyn Verifier>>,
    timeout: Duration,
    parallel: usize,
}

impl VerifierRegistry {
    /// An empty registry.
    pub fn new(timeout: Duration, parallel: usize) -> Self {
        VerifierRegistry {
            verifiers: BTreeMap::new(),
            timeout,
            parallel: parallel.max(1),
        }
    }

    /// The built-in verifiers and the configured plugins (validates the config first).
    pub fn from_config(config: &VerifiersConfig) -> Result<Self> {
        config.validate()?;
        let mut registry = Self::new(
            Duration::from_secs_f64(config.timeout_secs),
            config.parallel,
        );
        registry.register(Arc::new(MathVerifier::new(config.math.clone())));
        registry.register(Arc::new(ChoiceVerifier::new(config.choice.clone())));
        registry.register(Arc::new(FormatVerifier::new(config.format.clone())));
        registry.register(Arc::new(CodeVerifier::new(config.code.clone())?));
        registry.register(Arc::new(GroundingVerifier::new(config.grounding.clone())?));
        for plugin in &config.plugins {
            registry.register(Arc::new(PluginVerifier::new(plugin.clone())?));
        }
        Ok(registry)
    }

    /// Add a verifier under its [`Verifier::name`], returning the one it replaces.
    pub fn register(&mut self, verifier: Arc<dyn Verifier>) -> Option<Arc<dyn Verifier>> {
        self.verifiers.insert(verifier.name().to_string(), verifier)
    }

    /// The verifier registered under `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn Verifier>> {
        self.verifiers.get(name)
    }

    /// The registered names, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.verifiers.keys().map(String::as_str).collect()
    }

    /// Verify one request; failures become zero-score verdicts.
    pub fn verify(&self, request: &VerifyRequest) -> Verdict {
        self.try_verify(request)
            .unwrap_or_else(VerifyFailure::into_verdict)
    }

    /// Verify one request, telling a verifier failure apart from a low score.
    pub fn try_verify(
        &self,
        request: &VerifyRequest,
    ) -> std::result::Result<Verdict, VerifyFailure> {
        let Some(verifier) = self.verifiers.get(&request.verifier).cloned() else {
            return Err(VerifyFailure::UnknownVerifier(
                request.verifier.clone(),
                self.names().join(", "),
            ));
        };
        let name = request.verifier.clone();
        let owned = request.clone();
        let (reply_tx, reply_rx) = mpsc::channel();
        // Its own thread, so that a verifier that never returns cannot hold the caller past the timeout.
        let spawned = std::thread::Builder::new()
            .name(format!("verify-{name}"))
            .spawn(move || {
                let outcome =
                    std::panic::catch_unwind(AssertUnwindSafe(|| verifier.verify(&owned.input())));
                let _ = reply_tx.send(outcome); // the caller may have given up waiting
            });
        if let Err(error) = spawned {
            return Err(VerifyFailure::Error(
                name,
                format!("cannot start a thread: {error}"),
            ));
        }
        match reply_rx.recv_timeout(self.timeout) {
            Ok(Ok(Ok(verdict))) => Ok(sanitise(verdict)),
            Ok(Ok(Err(error))) => Err(VerifyFailure::Error(name, error.to_string())),
            Ok(Err(payload)) => Err(VerifyFailure::Panic(name, panic_message(payload.as_ref()))),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                Err(VerifyFailure::Timeout(name, self.timeout.as_secs_f64()))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(VerifyFailure::Panic(
                name,
                "the verifier thread ended without a verdict".into(),
            )),
        }
    }

    /// Verify many requests, `parallel` at a time; verdicts come back in request order.
    pub fn verify_batch(&self, requests: &[VerifyRequest]) -> Vec<Verdict> {
        self.try_verify_batch(requests)
            .into_iter()
            .map(|outcome| outcome.unwrap_or_else(VerifyFailure::into_verdict))
            .collect()
    }

    /// [`Self::verify_batch`], keeping failures apart.
    pub fn try_verify_batch(
        &self,
        requests: &[VerifyRequest],
    ) -> Vec<std::result::Result<Verdict, VerifyFailure>> {
        let next = AtomicUsize::new(0);
        let mut outcomes: Vec<_> = requests
            .iter()
            .map(|request| {
                Err(VerifyFailure::Panic(
                    request.verifier.clone(),
                    "not run".into(),
                ))
            })
            .collect();
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..self.parallel.min(requests.len()))
                .map(|_| {
                    scope.spawn(|| {
                        let mut done = Vec::new();
                        loop {
                            let index = next.fetch_add(1, Ordering::Relaxed);
                            let Some(request) = requests.get(index) else {
                                break done;
                            };
                            done.push((index, self.try_verify(request)));
                        }
                    })
                })
                .collect();
            for worker in workers {
                // try_verify catches the verifier's panics; a worker has nothing else that can panic.
                for (index, outcome) in worker.join().unwrap_or_default() {
                    outcomes[index] = outcome;
                }
            }
        });
        outcomes
    }
}

/// A verdict with its score forced into [0, 1] (a NaN becomes 0).
fn sanitise(mut verdict: Verdict) -> Verdict {
    verdict.score = if verdict.score.is_finite() {
        verdict.score.clamp(0.0, 1.0)
    } else {
        0.0
    };
    verdict
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-text panic payload".into())
}
