//! The `math` verifier: final-answer extraction and mathematical equivalence.
//!
//! The pipeline follows the public graders the field relies on:
//! - extraction ([`extract_answer`]): the last `\boxed{}` / `\fbox{}` (or a run of boxes listing
//!   several answers) outside `<think>` and before a next chat turn, else "the answer is ...",
//!   "Answer: ...", else the last `$...$` / `\(...\)` span, else a bare answer, else the last
//!   number (Qwen2.5-Math `extract_answer`, Hendrycks MATH `last_boxed_only_string`, math-verify);
//! - equivalence ([`math_equal`]): LaTeX normalisation (Hendrycks `strip_string`, Minerva / verl
//!   `math_dapo.normalize_final_answer`), then numbers with a relative tolerance and percent forms
//!   (Qwen2.5-Math `math_equal`), structures (tuples, intervals, sets, matrices and matrix
//!   expressions, equations, labelled answers, relations as solution sets), and
//!   symbolic expressions parsed into an AST and compared by evaluation at random points (the
//!   role sympy's `simplify(a - b) == 0` plays in PRM800K's grader).
//!
//! | file | role |
//! |---|---|
//! | `extract.rs`, `boxes.rs` | final answer out of a response; `\boxed{}` arguments |
//! | `normalize.rs`, `numbers.rs` | LaTeX / unit normalisation of one answer; thousands separators and decimal commas |
//! | `shape.rs` | answer structure: matrix, tuple, interval, set, union, inequality, equation |
//! | `matrix.rs` | matrices in every LaTeX form; matrix sums and products evaluated; determinants |
//! | `relation.rs` | relation chains (`<`, `\le`, `\ne`, ...) and the sets they describe, compared by membership |
//! | `token.rs`, `expr.rs` | bounded tokenizer and recursive-descent parser to an AST |
//! | `eval.rs` | AST evaluation, random-point identity test |
//! | `equal.rs` | [`math_equal`]: ties the above together |
//! | `testdata/pairs.tsv` | the answer-pair table the tests assert (both ways round, all must hold) |
//! | `testdata/grader_kinds.jsonl` | held-out-style grader cases through the whole verifier (>= 97%, no false pass) |
//!
//! Robustness: every step is linear or bounded (answer length, token count, nesting depth,
//! element counts, factorial size), so no input panics or hangs; `examples/fuzz_math.rs` drives
//! it with a million generated inputs.

mod boxes;
mod equal;
mod eval;
mod expr;
mod extract;
mod matrix;
mod normalize;
mod numbers;
mod relation;
mod shape;
mod token;

#[cfg(test)]
mod tests;

pub(crate) use boxes::last_boxed;
pub use equal::{math_equal, math_equal_explained};
pub(crate) use extract::{answer_region, strip_math_delimiters};
pub use extract::{extract_answer, extract_answer_with_tags};
pub use normalize::normalize_answer;

use serde::{Deserialize, Serialize};

use super::{Verdict, Verifier, VerifyInput};

/// Settings of the `math` verifier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MathConfig {
    /// Relative tolerance for numeric comparison (Qwen2.5-Math uses 1e-4).
    pub relative_tolerance: f64,
    /// Absolute tolerance for numeric comparison near zero; kept tiny so `1e-10` is not `2e-10`.
    pub absolute_tolerance: f64,
    /// Accept a percentage written as its fraction or vice versa (`50%` vs `0.5`), as
    /// Qwen2.5-Math's `include_percentage` does.
    pub percent_equivalence: bool,
    /// Compare symbolic expressions by evaluating both at random points.
    pub symbolic: bool,
    /// How many random points a symbolic comparison evaluates.
    pub symbolic_points: usize,
    /// Accept `x = 3` for a reference `3` (and the reverse) when the left side is a lone variable.
    pub strip_equation_lhs: bool,
    /// The tag that opens the reasoning part, never used as the answer.
    pub think_open: String,
    /// The tag that closes the reasoning part.
    pub think_close: String,
    /// Longest response (bytes) examined; longer ones are judged on their last this-many bytes.
    pub max_response_bytes: usize,
    /// Longest extracted answer (bytes) that is compared; longer answers score 0.
    pub max_answer_bytes: usize,
}

impl Default for MathConfig {
    fn default() -> Self {
        MathConfig {
            relative_tolerance: 1e-4,
            absolute_tolerance: 1e-12,
            percent_equivalence: true,
            symbolic: true,
            symbolic_points: 8,
            strip_equation_lhs: true,
            think_open: "<think>".into(),
            think_close: "</think>".into(),
            max_response_bytes: 1 << 20,
            max_answer_bytes: 2000,
        }
    }
}

/// The `math` verifier: score 1 when the extracted final answer equals the reference.
#[derive(Debug, Clone, Default)]
pub struct MathVerifier {
    /// Its settings.
    pub config: MathConfig,
}

impl MathVerifier {
    /// A verifier with the given settings.
    pub fn new(config: MathConfig) -> Self {
        MathVerifier { config }
    }
}

impl Verifier for MathVerifier {
    fn name(&self) -> &str {
        "math"
    }

    fn verify(&self, input: &VerifyInput<'_>) -> crate::Result<Verdict> {
        let cfg = &self.config;
        let region = answer_region(input.response, &cfg.think_open, &cfg.think_close);
        let region = tail_bytes(region, cfg.max_response_bytes);
        // The reasoning is already cut off: extract with no tags.
        let Some(extracted) = extract_answer_with_tags(region, "", "") else {
            return Ok(Verdict {
                score: 0.0,
                format_ok: false,
                extracted: None,
                reason: "no final answer found outside the reasoning part".into(),
                hallucination: None,
                failure: None,
            });
        };
        let (equal, why) = math_equal_explained(&extracted, input.answer, cfg);
        Ok(Verdict {
            score: if equal { 1.0 } else { 0.0 },
            format_ok: true,
            extracted: Some(extracted),
            reason: why,
            hallucination: None,
            failure: None,
        })
    }
}

/// The last `max` bytes of `s`, cut at a char boundary.
pub(crate) fn tail_bytes(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}
