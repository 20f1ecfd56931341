//! Rule-based verifiers: pure functions behind the [`Verifier`] trait.
//!
//! A verifier reads the prompt, the response, the reference answer and the dataset line's free-form
//! metadata, and returns a [`Verdict`]. Verifiers never panic or hang the pipeline: the registry turns an
//! error, a panic or a timeout into a zero-score verdict that carries the typed [`VerifyFailure`].

pub mod choice;
pub mod code;
pub mod code_cases;
pub mod config;
pub mod format;
pub mod grounding;
pub mod math;
pub mod plugin;
pub mod registry;
pub mod sandbox;

use serde::{Deserialize, Serialize};

/// What a verifier is asked to check.
#[derive(Debug, Clone, Copy)]
pub struct VerifyInput<'a> {
    /// The prompt (question) the response answers.
    pub prompt: &'a str,
    /// The full model response, `<think>` part included.
    pub response: &'a str,
    /// The reference answer from the dataset line.
    pub answer: &'a str,
    /// Free-form metadata from the dataset line (`null` when absent).
    pub meta: &'a serde_json::Value,
}

/// A claim about the image that the image's annotation does not support.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HallucinationFlags {
    /// How many checkable claims (object / attribute mentions) the response made.
    pub claims_checked: u32,
    /// The claims the annotation does not support.
    pub unsupported: Vec<String>,
}

/// A verifier's judgement of one response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// Accuracy score in [0, 1].
    pub score: f32,
    /// Whether the response has the expected format.
    pub format_ok: bool,
    /// The answer the verifier extracted from the response, if any.
    pub extracted: Option<String>,
    /// A human-readable reason for the score.
    pub reason: String,
    /// Hallucination flags, for verifiers that can check claims against the image's annotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hallucination: Option<HallucinationFlags>,
    /// Set when the verifier failed (error, panic, timeout, a broken plugin) rather than judged: the score
    /// is then 0 and `reason` is this failure's message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<VerifyFailure>,
}

/// Why a verification produced no verdict of its own: the verifier failed, not the answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, Deserialize)]
pub enum VerifyFailure {
    /// No verifier of that name is registered.
    #[error("no verifier named `{0}` (registered: {1})")]
    UnknownVerifier(String, String),
    /// The verifier returned an error.
    #[error("verifier `{0}` failed: {1}")]
    Error(String, String),
    /// The verifier panicked.
    #[error("verifier `{0}` panicked: {1}")]
    Panic(String, String),
    /// The verifier did not return within the timeout.
    #[error("verifier `{0}` timed out after {1} s")]
    Timeout(String, f64),
    /// A plugin process failed the request: it exited, hung, restarted or sent a malformed reply.
    #[error("plugin `{0}`: {1}")]
    Plugin(String, String),
}

impl VerifyFailure {
    /// The zero-score verdict this failure turns into (its reason is the failure's message).
    pub fn into_verdict(self) -> Verdict {
        Verdict {
            failure: Some(self.clone()),
            ..Verdict::zero(self.to_string())
        }
    }
}

impl Verdict {
    /// A zero-score verdict for a verifier that failed (error, panic, timeout).
    pub fn zero(reason: impl Into<String>) -> Self {
        Verdict {
            score: 0.0,
            format_ok: false,
            extracted: None,
            reason: reason.into(),
            hallucination: None,
            failure: None,
        }
    }
}

/// A rule-based verifier. Implementations are pure and cheap to share across threads.
pub trait Verifier: Send + Sync {
    /// The name datasets use in their `verifier` field.
    fn name(&self) -> &str;
    /// Judge one response. An `Err` becomes a zero-score verdict carrying the error as its reason.
    fn verify(&self, input: &VerifyInput<'_>) -> crate::Result<Verdict>;
}
