//! Grouped autoregressive sampling with prefix sharing: the loop the policy generator runs.
//!
//! For each prompt: [`StepModel::prefill`] runs the prompt and returns a cache holding `n` copies of it (a
//! model prefills once and shares or copies the cache to the rows), every row draws its first token from the
//! same prefill logits, then the rows decode one token per step together. A row that finishes (stop token,
//! stop string, `max_new_tokens`, the model's context) leaves the running batch at once: the engine asks the
//! model to keep only the running rows ([`StepModel::select_rows`]), so no compute goes to finished rows. Each row samples with its own [`RowRng`] keyed by
//! `(seed, prompt_index, sample_index)`, so its tokens do not depend on its batch-mates.

use super::processors::{sample_next, Scratch, SeenTokens, TokenLogprobs};
use super::rollout::{FinishReason, Group, PromptInput, Rollout};
use super::sampling::{validate_group_size, RowRng, SamplingParams};
use super::stop::{DecodeFn, StopStrings};
use crate::{Error, Result};

/// What the engine needs from a causal language model with a KV cache.
pub trait StepModel {
    /// The model's KV cache for a batch of rows.
    type Cache;

    /// Number of logits per position (the LM head's output size).
    fn vocab_size(&self) -> usize;

    /// The longest sequence (prompt + response) the model takes.
    fn max_sequence_len(&self) -> usize;

    /// Runs `prompt` (its tokens, and its images for a model that takes them) from an empty cache; returns
    /// the logits (V) after its last token and a cache holding `rows` copies of the prompt (the rows of one
    /// group). A model that takes no images rejects a prompt that has some.
    fn prefill(&self, prompt: &PromptInput, rows: usize) -> Result<(Vec<f32>, Self::Cache)>;

    /// Appends one token per cached row (`tokens[b]` to row `b`); returns each row's next-token logits (V).
    fn decode_step(&self, tokens: &[u32], cache: &mut Self::Cache) -> Result<Vec<Vec<f32>>>;

    /// Keeps only rows `keep` of `cache` (increasing indices): the others finished.
    fn select_rows(&self, cache: &mut Self::Cache, keep: &[usize]) -> Result<()>;
}

/// One response being generated.
struct Row {
    rng: RowRng,
    seen: SeenTokens,
    tokens: Vec<u32>,
    logprobs: Vec<TokenLogprobs>,
    finish_reason: Option<FinishReason>,
}

/// Checks the request before any compute: sampling parameters, `n`, prompts (non-empty, ids inside the
/// vocabulary, shorter than the model's context), and a decode function when stop strings are asked for.
fn validate_request<M: StepModel>(
    model: &M,
    prompts: &[PromptInput],
    n: usize,
    params: &SamplingParams,
    decode: Option<DecodeFn>,
) -> Result<()> {
    params.validate()?;
    validate_group_size(n)?;
    if !params.stop_strings.is_empty() && decode.is_none() {
        return Err(Error::msg(
            "generate: stop strings need a decode function (the tokenizer's decode)",
        ));
    }
    let context = model.max_sequence_len();
    for (at, prompt) in prompts.iter().enumerate() {
        let name = format!("prompt {at} (prompt_index {})", prompt.prompt_index);
        if prompt.token_ids.is_empty() {
            return Err(Error::msg(format!("generate: {name} is empty")));
        }
        if prompt.token_ids.len() >= context {
            return Err(Error::msg(format!(
                "generate: {name} has {} tokens, the model's context is {context}: no room to generate",
                prompt.token_ids.len()
            )));
        }
        if let Some(&id) = prompt
            .token_ids
            .iter()
            .find(|&&id| id as usize >= model.vocab_size())
        {
            return Err(Error::msg(format!(
                "generate: {name} holds token id {id}, outside the vocabulary of {}",
                model.vocab_size()
            )));
        }
    }
    Ok(())
}

/// Called with every sampled token, as soon as it is drawn: `(position of its prompt in the request,
/// sample index, token id)`. Streaming output hangs on it.
pub type TokenSink<'a> = &'a mut dyn FnMut(usize, u64, u32);

/// Samples `n` responses to every prompt; returns one [`Group`] per prompt, in the prompts' order.
///
/// `decode` (the tokenizer's decode) is needed for stop strings and fills [`Rollout::text`].
pub fn generate_groups<M: StepModel>(
    model: &M,
    prompts: &[PromptInput],
    n: usize,
    params: &SamplingParams,
    decode: Option<DecodeFn>,
) -> Result<Vec<Group<Rollout>>> {
    generate_groups_streaming(model, prompts, n, params, decode, &mut |_, _, _| {})
}

/// [`generate_groups`] that hands every token to `on_token` as soon as it is sampled.
pub fn generate_groups_streaming<M: StepModel>(
    model: &M,
    prompts: &[PromptInput],
    n: usize,
    params: &SamplingParams,
    decode: Option<DecodeFn>,
    on_token: TokenSink,
) -> Result<Vec<Group<Rollout>>> {
    validate_request(model, prompts, n, params, decode)?;
    prompts
        .iter()
        .enumerate()
        .map(|(at, prompt)| {
            generate_group(model, prompt, n, params, decode, &mut |sample, token| {
                on_token(at, sample, token)
            })
        })
        .collect()
}

/// Decides whether `row` ends after its newest token.
fn finish_reason(
    row: &Row,
    params: &SamplingParams,
    stop_strings: &StopStrings,
    max_new_tokens: usize,
    decode: Option<DecodeFn>,
) -> Result<Option<FinishReason>> {
    // `tokens` is non-empty: the caller pushed a token just before.
    let newest = row.tokens[row.tokens.len() - 1];
    if params.stop_token_ids.contains(&newest) {
        return Ok(Some(FinishReason::StopToken(newest)));
    }
    if let Some(decode) = decode {
        if let Some(index) = stop_strings.find(&row.tokens, decode)? {
            return Ok(Some(FinishReason::StopString(index)));
        }
    }
    if row.tokens.len() >= max_new_tokens {
        return Ok(Some(FinishReason::Length));
    }
    Ok(None)
}

/// The `n` responses to one prompt: one prefill, a shared prefix, rows leaving as they finish.
fn generate_group<M: StepModel>(
    model: &M,
    prompt: &PromptInput,
    n: usize,
    params: &SamplingParams,
    decode: Option<DecodeFn>,
    on_token: &mut dyn FnMut(u64, u32),
) -> Result<Group<Rollout>> {
    let vocab = model.vocab_size();
    let prompt_len = prompt.token_ids.len();
    // The response may not run past the model's context (validation left at least one slot).
    let max_new_tokens = params
        .max_new_tokens
        .min(model.max_sequence_len() - prompt_len);
    let stop_strings = StopStrings::new(&params.stop_strings);
    let prompt_seen = SeenTokens::new(vocab, &prompt.token_ids);
    let mut rows: Vec<Row> = (0..n as u64)
        .map(|sample| Row {
            rng: RowRng::new(params.seed, prompt.prompt_index, sample),
            seen: prompt_seen.clone(),
            tokens: Vec::new(),
            logprobs: Vec::new(),
            finish_reason: None,
        })
        .collect();

    // Prefill the prompt for the group; every row starts from the same logits.
    let (prefill_logits, mut cache) = model.prefill(prompt, n)?;
    let mut running: Vec<usize> = (0..n).collect();
    let mut logits: Vec<Vec<f32>> = vec![prefill_logits];
    let mut scratch = Scratch::default();

    loop {
        // Sample one token for every running row (the prefill's logits are shared by all rows).
        // (On the first pass `logits` holds only the prefill's row, which every row shares.)
        for (slot, &r) in running.iter().enumerate() {
            let row_logits = &logits[slot.min(logits.len() - 1)];
            if row_logits.len() != vocab {
                return Err(Error::msg(format!(
                    "generate: the model returned {} logits, its vocabulary has {vocab}",
                    row_logits.len()
                )));
            }
            let row = &mut rows[r];
            let token = sample_next(params, row_logits, &row.seen, &mut row.rng, &mut scratch)?;
            row.tokens.push(token.token_id);
            row.logprobs.push(token.logprobs);
            row.seen.insert(token.token_id);
            on_token(r as u64, token.token_id);
            row.finish_reason = finish_reason(row, params, &stop_strings, max_new_tokens, decode)?;
        }
        // Finished rows leave the batch, and the cache keeps only the rows still running.
        let keep: Vec<usize> = (0..running.len())
            .filter(|&slot| rows[running[slot]].finish_reason.is_none())
            .collect();
        if keep.is_empty() {
            break;
        }
        if keep.len() < running.len() {
            model.select_rows(&mut cache, &keep)?;
            running = keep.iter().map(|&slot| running[slot]).collect();
        }
        let last_tokens: Vec<u32> = running
            .iter()
            .map(|&r| rows[r].tokens[rows[r].tokens.len() - 1]) // every running row has a token
            .collect();
        logits = model.decode_step(&last_tokens, &mut cache)?;
        if logits.len() != running.len() {
            return Err(Error::msg(format!(
                "generate: the model returned logits for {} rows, {} are running",
                logits.len(),
                running.len()
            )));
        }
    }

    let rollouts = rows
        .into_iter()
        .enumerate()
        .map(|(sample, row)| {
            let text = decode.map(|decode| decode(&row.tokens)).transpose()?;
            Ok(Rollout {
                sample_index: sample as u64,
                token_ids: row.tokens,
                logprobs: row.logprobs,
                // Every row left the loop finished.
                finish_reason: row.finish_reason.unwrap_or(FinishReason::Length),
                text,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Group {
        prompt_index: prompt.prompt_index,
        prompt_len,
        rollouts,
    })
}

/// The reference definition of one response, without a cache, batch or shared prefix: `full_logits(sequence)`
/// returns the next-token logits after the whole sequence (prompt + response so far), recomputed from scratch
/// each step. Slow; the tests check [`generate_groups`] against it.
pub fn generate_one_uncached(
    mut full_logits: impl FnMut(&[u32]) -> Result<Vec<f32>>,
    vocab_size: usize,
    max_sequence_len: usize,
    prompt: &PromptInput,
    sample_index: u64,
    params: &SamplingParams,
    decode: Option<DecodeFn>,
) -> Result<Rollout> {
    let max_new_tokens = params
        .max_new_tokens
        .min(max_sequence_len.saturating_sub(prompt.token_ids.len()));
    let stop_strings = StopStrings::new(&params.stop_strings);
    let mut row = Row {
        rng: RowRng::new(params.seed, prompt.prompt_index, sample_index),
        seen: SeenTokens::new(vocab_size, &prompt.token_ids),
        tokens: Vec::new(),
        logprobs: Vec::new(),
        finish_reason: None,
    };
    let mut sequence = prompt.token_ids.clone();
    let mut scratch = Scratch::default();
    while row.finish_reason.is_none() {
        let logits = full_logits(&sequence)?;
        let token = sample_next(params, &logits, &row.seen, &mut row.rng, &mut scratch)?;
        row.tokens.push(token.token_id);
        row.logprobs.push(token.logprobs);
        row.seen.insert(token.token_id);
        sequence.push(token.token_id);
        row.finish_reason = finish_reason(&row, params, &stop_strings, max_new_tokens, decode)?;
    }
    let text = decode.map(|decode| decode(&row.tokens)).transpose()?;
    Ok(Rollout {
        sample_index,
        token_ids: row.tokens,
        logprobs: row.logprobs,
        // The loop above ran until it was set.
        finish_reason: row.finish_reason.unwrap_or(FinishReason::Length),
        text,
    })
}
