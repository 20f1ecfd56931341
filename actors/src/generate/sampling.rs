//! Sampling parameters and the per-row random stream.
//!
//! [`SamplingParams`] is the serde block a run config carries for the policy generator; it is validated once
//! ([`SamplingParams::validate`]) with errors naming the key. [`RowRng`] is the random stream of one response:
//! it is derived from `(seed, prompt index, sample index)` only, so a response's tokens do not depend on the
//! batch it was generated in nor on the number of threads.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// How the next token is chosen, and when a response stops.
///
/// The logits processors run in the order Hugging Face transformers chains them in
/// `GenerationMixin._get_logits_processor` (repetition penalty, temperature, top-k, top-p, min-p); see
/// [`super::processors`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingParams {
    /// Softmax temperature the logits are divided by. `0` means greedy decoding (argmax after the repetition
    /// penalty, the other filters are not applied). Must be finite and `>= 0`.
    pub temperature: f64,
    /// Nucleus sampling: keep the most probable tokens whose cumulative probability reaches `top_p`.
    /// In `(0, 1]`; `1` disables it.
    pub top_p: f64,
    /// Keep only the `top_k` most probable tokens (ties with the k-th are kept, as in transformers);
    /// `0` disables it.
    pub top_k: usize,
    /// Drop tokens whose probability is below `min_p` times the top token's probability. In `[0, 1]`;
    /// `0` disables it.
    pub min_p: f64,
    /// transformers' `RepetitionPenaltyLogitsProcessor`: every token already in the context (prompt and
    /// generated) has its logit divided by this value when positive, multiplied when negative. `> 0`;
    /// `1` disables it. R1V2 samples with 1.05.
    pub repetition_penalty: f64,
    /// The most tokens a response may have; reaching it finishes the row with `FinishReason::Length`.
    /// Must be `>= 1`.
    pub max_new_tokens: usize,
    /// Token ids that end a response (put the tokenizer's EOS and the chat template's end-of-turn here).
    /// The stop token is kept as the response's last token.
    pub stop_token_ids: Vec<u32>,
    /// Strings that end a response as soon as the decoded response text contains one, even when it spans
    /// several tokens. Needs a decode function; empty strings are rejected.
    pub stop_strings: Vec<String>,
    /// Seed of every row's random stream (see [`RowRng`]).
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.05,
            max_new_tokens: 1024,
            stop_token_ids: Vec::new(),
            stop_strings: Vec::new(),
            seed: 0,
        }
    }
}

fn config_error(key: &str, msg: String) -> Error {
    Error::Config {
        key: format!("sampling.{key}"),
        msg,
    }
}

impl SamplingParams {
    /// Greedy decoding: `temperature == 0`.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Checks every field, returning an error that names the first bad key (`sampling.<key>`).
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(config_error(
                "temperature",
                format!(
                    "must be a finite number >= 0 (0 = greedy), got {}",
                    self.temperature
                ),
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(config_error(
                "top_p",
                format!("must lie in (0, 1] (1 disables it), got {}", self.top_p),
            ));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(config_error(
                "min_p",
                format!("must lie in [0, 1] (0 disables it), got {}", self.min_p),
            ));
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return Err(config_error(
                "repetition_penalty",
                format!(
                    "must be a finite number > 0 (1 disables it), got {}",
                    self.repetition_penalty
                ),
            ));
        }
        if self.max_new_tokens == 0 {
            return Err(config_error("max_new_tokens", "must be >= 1, got 0".into()));
        }
        if let Some(i) = self.stop_strings.iter().position(|s| s.is_empty()) {
            return Err(config_error(
                "stop_strings",
                format!(
                    "entry {i} is empty: an empty stop string would stop every response at once"
                ),
            ));
        }
        Ok(())
    }
}

/// Checks the number of responses asked for per prompt (GRPO's group size G).
pub fn validate_group_size(n: usize) -> Result<()> {
    if n == 0 {
        return Err(config_error(
            "n",
            "the number of responses per prompt must be >= 1, got 0".into(),
        ));
    }
    Ok(())
}

/// The random stream of one response: ChaCha20 keyed by `(seed, prompt index, sample index)`.
///
/// The 32-byte ChaCha key is `seed | prompt_index | sample_index | "r1v2-gen"` (little-endian u64s), so
/// distinct triples give independent streams and the stream of a row never depends on its neighbours.
/// Exactly one uniform is drawn per sampled token (none when greedy), so token `t` of a response always
/// consumes the `t`-th number of its stream.
#[derive(Debug, Clone)]
pub struct RowRng(ChaCha20Rng);

impl RowRng {
    /// The stream of response `sample_index` to prompt `prompt_index` under `seed`.
    pub fn new(seed: u64, prompt_index: u64, sample_index: u64) -> Self {
        let mut key = [0u8; 32];
        key[0..8].copy_from_slice(&seed.to_le_bytes());
        key[8..16].copy_from_slice(&prompt_index.to_le_bytes());
        key[16..24].copy_from_slice(&sample_index.to_le_bytes());
        key[24..32].copy_from_slice(b"r1v2-gen");
        Self(ChaCha20Rng::from_seed(key))
    }

    /// The next uniform number in `[0, 1)` (53 random bits).
    pub fn next_uniform(&mut self) -> f64 {
        self.0.gen::<f64>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_of(err: Error) -> String {
        match err {
            Error::Config { key, .. } => key,
            other => panic!("expected a config error, got {other}"),
        }
    }

    #[test]
    fn defaults_are_valid_and_use_r1v2_penalty() {
        let params = SamplingParams::default();
        params.validate().unwrap();
        assert_eq!(params.repetition_penalty, 1.05);
        assert!(!params.is_greedy());
    }

    #[test]
    fn bad_values_name_their_key() {
        let bad = |edit: fn(&mut SamplingParams)| {
            let mut params = SamplingParams::default();
            edit(&mut params);
            key_of(params.validate().unwrap_err())
        };
        assert_eq!(bad(|p| p.top_p = 0.0), "sampling.top_p");
        assert_eq!(bad(|p| p.top_p = 1.5), "sampling.top_p");
        assert_eq!(bad(|p| p.top_p = f64::NAN), "sampling.top_p");
        assert_eq!(bad(|p| p.temperature = -0.1), "sampling.temperature");
        assert_eq!(
            bad(|p| p.temperature = f64::INFINITY),
            "sampling.temperature"
        );
        assert_eq!(bad(|p| p.min_p = 1.1), "sampling.min_p");
        assert_eq!(
            bad(|p| p.repetition_penalty = 0.0),
            "sampling.repetition_penalty"
        );
        assert_eq!(bad(|p| p.max_new_tokens = 0), "sampling.max_new_tokens");
        assert_eq!(
            bad(|p| p.stop_strings = vec!["a".into(), String::new()]),
            "sampling.stop_strings"
        );
        assert_eq!(key_of(validate_group_size(0).unwrap_err()), "sampling.n");
        validate_group_size(1).unwrap();
    }

    #[test]
    fn serde_fills_defaults_and_rejects_unknown_keys() {
        let params: SamplingParams =
            serde_json::from_str(r#"{"temperature": 0.0, "stop_strings": ["</answer>"]}"#).unwrap();
        assert!(params.is_greedy());
        assert_eq!(params.top_p, 1.0);
        assert_eq!(params.stop_strings, vec!["</answer>".to_string()]);
        let err = serde_json::from_str::<SamplingParams>(r#"{"top_q": 0.5}"#).unwrap_err();
        assert!(err.to_string().contains("top_q"), "{err}");
    }

    #[test]
    fn row_streams_depend_only_on_their_triple() {
        let draws = |seed, prompt, sample| {
            let mut rng = RowRng::new(seed, prompt, sample);
            (0..4).map(|_| rng.next_uniform()).collect::<Vec<_>>()
        };
        assert_eq!(draws(7, 3, 1), draws(7, 3, 1));
        assert_ne!(draws(7, 3, 1), draws(7, 3, 2));
        assert_ne!(draws(7, 3, 1), draws(7, 1, 3));
        assert_ne!(draws(7, 3, 1), draws(8, 3, 1));
        assert!(draws(1, 2, 3).iter().all(|u| (0.0..1.0).contains(u)));
    }
}
