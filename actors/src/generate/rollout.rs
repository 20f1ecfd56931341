//! What the engine takes and returns: prompts in, `n` rollouts per prompt out (the pipeline wraps them in
//! `rl::Group`s).

use super::processors::TokenLogprobs;

/// One prompt to answer `n` times.
#[derive(Debug, Clone)]
pub struct PromptInput {
    /// The prompt's token ids (chat template already applied). Must not be empty.
    pub token_ids: Vec<u32>,
    /// The prompt's index in the run's stream of prompts. It keys the random streams of its responses
    /// (with the seed and the sample index), so give a prompt the same index to get the same responses
    /// whatever else is generated beside it.
    pub prompt_index: u64,
    /// The image tiles `(tiles, 3, S, S)` whose features replace the prompt's `<IMG_CONTEXT>` tokens, for a
    /// model that takes images; none for a text-only prompt.
    pub pixel_values: Option<candle_core::Tensor>,
}

impl PromptInput {
    /// A text-only prompt.
    pub fn text(token_ids: Vec<u32>, prompt_index: u64) -> Self {
        Self {
            token_ids,
            prompt_index,
            pixel_values: None,
        }
    }
}

/// Why a response ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum FinishReason {
    /// It produced one of `SamplingParams::stop_token_ids` (kept as its last token).
    StopToken(u32),
    /// Its decoded text came to contain `SamplingParams::stop_strings[index]`.
    StopString(usize),
    /// It reached `max_new_tokens`, or the model's maximum sequence length.
    Length,
}

/// One response to a prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct Rollout {
    /// Which response of its group this is (0..n); keys its random stream.
    pub sample_index: u64,
    /// The generated token ids (the prompt excluded), stop token included.
    pub token_ids: Vec<u32>,
    /// Per generated token: its log-probs (`policy` is the behaviour log-prob of GRPO's importance ratio).
    pub logprobs: Vec<TokenLogprobs>,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// The decoded response, when a decode function was given.
    pub text: Option<String>,
}

impl Rollout {
    /// Per token: `log_softmax(logits)[token]`, the policy's log-prob at temperature 1.
    pub fn behaviour_logprobs(&self) -> Vec<f32> {
        self.logprobs.iter().map(|lp| lp.policy).collect()
    }
}
