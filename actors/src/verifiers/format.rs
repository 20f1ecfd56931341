//! The `format` verifier: R1-style `<think>...</think>` followed by a non-empty final answer.
//!
//! Used for the format reward. Rules (each failure is named in the verdict's reason): the response
//! opens with the think tag (or the chat template put it in the prompt, see
//! [`FormatConfig::open_tag_in_prompt`]), has exactly one think block with non-empty reasoning,
//! closes it exactly once, and then gives a non-empty answer, with a `\boxed{}` when
//! [`FormatConfig::require_boxed`] is set.

use serde::{Deserialize, Serialize};

use super::math::{last_boxed, tail_bytes};
use super::{Verdict, Verifier, VerifyInput};

/// Settings of the `format` verifier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FormatConfig {
    /// The tag that opens the reasoning block.
    pub think_open: String,
    /// The tag that closes the reasoning block.
    pub think_close: String,
    /// The chat template already ends the prompt with `think_open`, so the response starts
    /// inside the reasoning and must not repeat the opening tag.
    pub open_tag_in_prompt: bool,
    /// Require the final answer (after the reasoning) to contain a `\boxed{...}` (math data).
    pub require_boxed: bool,
    /// Fewest non-whitespace characters the final answer must have.
    pub min_answer_chars: usize,
}

impl Default for FormatConfig {
    fn default() -> Self {
        FormatConfig {
            think_open: "<think>".into(),
            think_close: "</think>".into(),
            open_tag_in_prompt: false,
            require_boxed: false,
            min_answer_chars: 1,
        }
    }
}

/// The `format` verifier: score 1 when the response follows the configured layout, else 0.
#[derive(Debug, Clone, Default)]
pub struct FormatVerifier {
    /// Its settings.
    pub config: FormatConfig,
}

impl FormatVerifier {
    /// A verifier with the given settings.
    pub fn new(config: FormatConfig) -> Self {
        FormatVerifier { config }
    }

    /// Check `response`; `Ok(final answer)` or `Err(the rule it breaks)`.
    pub fn check<'a>(&self, response: &'a str) -> Result<&'a str, String> {
        let cfg = &self.config;
        let (open, close) = (cfg.think_open.as_str(), cfg.think_close.as_str());
        if open.is_empty() || close.is_empty() {
            return Err("think tags are not configured".into());
        }
        let body = response.trim_start();
        let inside_start = if cfg.open_tag_in_prompt {
            if body.contains(open) {
                return Err(format!(
                    "`{open}` repeated: the prompt already opened the reasoning"
                ));
            }
            0
        } else {
            if !body.starts_with(open) {
                return Err(format!("response does not start with `{open}`"));
            }
            if body[open.len()..].contains(open) {
                return Err(format!("more than one `{open}`"));
            }
            open.len()
        };
        let Some(close_pos) = body.find(close) else {
            return Err(format!("no `{close}`: the reasoning is never closed"));
        };
        if close_pos < inside_start {
            return Err(format!("`{close}` before `{open}`"));
        }
        if body[close_pos + close.len()..].contains(close) {
            return Err(format!("more than one `{close}`"));
        }
        if body[inside_start..close_pos].trim().is_empty() {
            return Err("empty reasoning".into());
        }
        let answer = body[close_pos + close.len()..].trim();
        if answer.chars().filter(|c| !c.is_whitespace()).count() < cfg.min_answer_chars.max(1) {
            return Err(format!("no final answer after `{close}`"));
        }
        if cfg.require_boxed && last_boxed(answer).is_none() {
            return Err("final answer has no \\boxed{...}".into());
        }
        Ok(answer)
    }
}

impl Verifier for FormatVerifier {
    fn name(&self) -> &str {
        "format"
    }

    fn verify(&self, input: &VerifyInput<'_>) -> crate::Result<Verdict> {
        Ok(match self.check(input.response) {
            Ok(answer) => Verdict {
                score: 1.0,
                format_ok: true,
                extracted: Some(tail_bytes(answer, 2000).to_string()),
                reason: "think block followed by a final answer".into(),
                hallucination: None,
                failure: None,
            },
            Err(why) => Verdict {
                score: 0.0,
                format_ok: false,
                extracted: None,
                reason: why,
                hallucination: None,
                failure: None,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(cfg: FormatConfig, response: &str) -> Result<&str, String> {
        FormatVerifier::new(cfg).check(response)
    }

    #[test]
    fn accepts_r1_layout() {
        let r = "<think>\nadd them\n</think>\nThe answer is \\boxed{4}.";
        assert_eq!(
            check(FormatConfig::default(), r),
            Ok("The answer is \\boxed{4}.")
        );
        let boxed = FormatConfig {
            require_boxed: true,
            ..FormatConfig::default()
        };
        assert!(check(boxed, r).is_ok());
        let in_prompt = FormatConfig {
            open_tag_in_prompt: true,
            ..FormatConfig::default()
        };
        assert!(check(in_prompt, "add them</think>4").is_ok());
        let tags = FormatConfig {
            think_open: "<reason>".into(),
            think_close: "</reason>".into(),
            ..FormatConfig::default()
        };
        assert!(check(tags, "<reason>x</reason> 4").is_ok());
    }

    #[test]
    fn names_each_broken_rule() {
        let d = FormatConfig::default;
        let cases = [
            ("The answer is 4", "does not start with"),
            ("<think>add", "never closed"),
            (
                "<think>a</think><think>b</think>4",
                "more than one `<think>`",
            ),
            ("<think>a</think>4</think>", "more than one `</think>`"),
            ("<think>  </think>4", "empty reasoning"),
            ("<think>add</think>  \n", "no final answer"),
        ];
        for (response, why) in cases {
            let err = check(d(), response).expect_err(response);
            assert!(err.contains(why), "{response}: {err}");
        }
        let boxed = FormatConfig {
            require_boxed: true,
            ..d()
        };
        assert!(check(boxed, "<think>a</think>4")
            .unwrap_err()
            .contains("boxed"));
        let in_prompt = FormatConfig {
            open_tag_in_prompt: true,
            ..d()
        };
        assert!(check(in_prompt, "<think>a</think>4")
            .unwrap_err()
            .contains("repeated"));
    }

    #[test]
    fn verdict_scores_one_or_zero() {
        let meta = serde_json::Value::Null;
        let v = FormatVerifier::default();
        let ok = VerifyInput {
            prompt: "q",
            response: "<think>a</think>4",
            answer: "4",
            meta: &meta,
        };
        let bad = VerifyInput {
            response: "4",
            ..ok
        };
        let (good, poor) = (
            v.verify(&ok).expect("no error"),
            v.verify(&bad).expect("no error"),
        );
        assert_eq!((good.score, good.format_ok), (1.0, true));
        assert_eq!((poor.score, poor.format_ok), (0.0, false));
        assert_eq!(v.name(), "format");
    }
}
