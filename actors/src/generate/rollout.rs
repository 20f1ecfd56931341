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
    /// The images of the prompt, for a model that takes them: InternVL-chat tiles `(tiles, 3, S, S)` whose
    /// features replace its `<IMG_CONTEXT>` tokens, or Qwen2.5-VL's flattened patches
    /// `(patches, C * T * P * P)` of the images in `image_grids`; none for a text-only prompt.
    pub pixel_values: Option<candle_core::Tensor>,
    /// Qwen2.5-VL: the `(t, h, w)` patch grid of each image in `pixel_values`, in prompt order; empty for
    /// InternVL tiles and text-only prompts.
    pub image_grids: Vec<[usize; 3]>,
}

impl PromptInput {
    /// A text-only prompt.
    pub fn text(token_ids: Vec<u32>, prompt_index: u64) -> Self {
        Self {
            token_ids,
            prompt_index,
            pixel_values: None,
            image_grids: Vec::new(),
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
