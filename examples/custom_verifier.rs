//! A custom Rust verifier: implement [`Verifier`], register it, and datasets reach it by name.
//!
//! Dataset lines with `"verifier": "word_count"` are scored by [`WordCount`]: the response's final answer
//! (after `</think>`) must have exactly as many words as the reference answer says.
//!
//! Run: `cargo run --example custom_verifier`

use std::sync::Arc;
use std::time::Duration;

use r1v2_actors::verifiers::registry::{VerifierRegistry, VerifyRequest};
use r1v2_actors::verifiers::{Verdict, Verifier, VerifyInput};

/// Scores 1 when the final answer has the number of words given by the reference answer.
struct WordCount;

impl Verifier for WordCount {
    fn name(&self) -> &str {
        "word_count"
    }

    fn verify(&self, input: &VerifyInput<'_>) -> r1v2_actors::Result<Verdict> {
        let wanted: usize = input.answer.trim().parse().map_err(|_| {
            r1v2_actors::Error::msg(format!("answer `{}` is not a word count", input.answer))
        })?;
        let (format_ok, answer) = match input.response.rsplit_once("</think>") {
            Some((_, after)) => (true, after.trim()),
            None => (false, input.response.trim()),
        };
        let words = answer.split_whitespace().count();
        Ok(Verdict {
            score: if words == wanted { 1.0 } else { 0.0 },
            format_ok,
            extracted: Some(words.to_string()),
            reason: format!("{words} words, wanted {wanted}"),
            hallucination: None,
            failure: None,
        })
    }
}

fn main() {
    let mut registry = VerifierRegistry::new(Duration::from_secs(5), 2);
    registry.register(Arc::new(WordCount));
    let line = |response: &str, answer: &str| VerifyRequest {
        verifier: "word_count".into(),
        prompt: "Describe the sky in three words.".into(),
        response: response.into(),
        answer: answer.into(),
        meta: serde_json::Value::Null,
    };
    let requests = [
        line("<think>short and vivid</think> Blue, vast, calm.", "3"),
        line("<think>more</think> The sky is very blue today.", "3"),
        line("Blue vast calm", "three"),
    ];
    for (request, verdict) in requests.iter().zip(registry.verify_batch(&requests)) {
        println!(
            "{:<50} score {} format_ok {:<5} {}",
            request.response, verdict.score, verdict.format_ok, verdict.reason
        );
    }
}
