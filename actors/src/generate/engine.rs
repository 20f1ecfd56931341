//! Grouped autoregressive sampling with prefix sharing and continuous batching: the loop the policy
//! generator runs.
//!
//! For each prompt: [`StepModel::prefill`] runs the prompt and returns a cache holding `n` copies of it (a
//! model prefills once and shares or copies the cache to the rows), and every row draws its first token from
//! the same prefill logits. The rows of every admitted prompt then decode one token per step together. A row
//! that finishes (stop token, stop string, `max_new_tokens`, the model's context) leaves the running batch at
//! once ([`StepModel::select_rows`]), so no compute goes to finished rows, and the next prompts' groups join
//! the running batch as soon as it has room for them ([`StepModel::append_rows`], bounded by
//! [`BatchOptions::max_batch_rows`]). Each row samples with its own [`RowRng`] keyed by
//! `(seed, prompt_index, sample_index)`, so its tokens do not depend on its batch-mates.

use candle_core::Device;
use rayon::prelude::*;

use super::processors::{sample_next, SampledToken, Scratch, SeenTokens, TokenLogprobs};
use super::rollout::{FinishReason, PromptInput, Rollout};
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

    /// Whether [`Self::append_rows`] is implemented. Without it the engine runs one group at a time.
    fn can_append_rows(&self) -> bool {
        false
    }

    /// Appends the rows of `joining` (a freshly prefilled group, possibly at another length) after the rows
    /// of `cache` (continuous batching); each row keeps its own positions.
    fn append_rows(&self, cache: &mut Self::Cache, joining: Self::Cache) -> Result<()> {
        let _ = (cache, joining);
        Err(Error::msg(
            "generate: this model cannot merge KV caches (StepModel::append_rows)",
        ))
    }
}

/// How the engine batches the rows of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchOptions {
    /// The most rows decoded together. A prompt's group joins the running batch when all its `n` rows fit;
    /// a group is never split, so a group larger than this runs alone. Tokens do not depend on it (only
    /// speed and memory do). Must be `>= 1`; default 64.
    pub max_batch_rows: usize,
}

impl Default for BatchOptions {
    fn default() -> Self {
        Self { max_batch_rows: 64 }
    }
}

/// One response being generated.
struct Row {
    /// Position of its prompt in the request.
    at: usize,
    sample: u64,
    max_new_tokens: usize,
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
    options: &BatchOptions,
) -> Result<()> {
    params.validate()?;
    validate_group_size(n)?;
    if options.max_batch_rows == 0 {
        return Err(Error::msg("generate: max_batch_rows must be >= 1, got 0"));
    }
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

/// Samples `n` responses to every prompt; returns the `n` rollouts of each prompt (in sample-index order),
/// prompts in their order.
///
/// `decode` (the tokenizer's decode) is needed for stop strings and fills [`Rollout::text`].
pub fn generate_groups<M: StepModel>(
    model: &M,
    prompts: &[PromptInput],
    n: usize,
    params: &SamplingParams,
    decode: Option<DecodeFn>,
) -> Result<Vec<Vec<Rollout>>> {
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
) -> Result<Vec<Vec<Rollout>>> {
    generate_groups_batched(
        model,
        prompts,
        n,
        params,
        decode,
        &BatchOptions::default(),
        on_token,
    )
}

/// Decides whether `row` ends after its newest token.
fn finish_reason(
    row: &Row,
    params: &SamplingParams,
    stop_strings: &StopStrings,
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
    if row.tokens.len() >= row.max_new_tokens {
        return Ok(Some(FinishReason::Length));
    }
    Ok(None)
}

/// The request's fixed parts, shared by every step.
struct Request<'a> {
    params: &'a SamplingParams,
    decode: Option<DecodeFn<'a>>,
    stop_strings: StopStrings,
    vocab: usize,
}

impl Request<'_> {
    /// Draws the next token of every row, `logits(i)` being row i's logits; the rows sample in parallel
    /// (each from its own stream, so the result does not depend on the threads). Then records the tokens in
    /// row order, hands them to `on_token` and decides which rows finish.
    fn sample_rows<'l>(
        &self,
        rows: &mut [Row],
        logits: impl Fn(usize) -> &'l [f32] + Sync,
        on_token: &mut TokenSink,
    ) -> Result<()> {
        let vocab = self.vocab;
        if let Some(bad) = (0..rows.len()).map(&logits).find(|l| l.len() != vocab) {
            return Err(Error::msg(format!(
                "generate: the model returned {} logits, its vocabulary has {vocab}",
                bad.len()
            )));
        }
        let params = self.params;
        let draw = |scratch: &mut Scratch, (i, row): (usize, &mut Row)| -> Result<SampledToken> {
            sample_next(params, logits(i), &row.seen, &mut row.rng, scratch)
        };
        let tokens: Vec<SampledToken> = if rows.len() > 1 {
            // In candle's CPU pool, where the model's forward just ran: its workers are awake, while the global
            // pool's would have to be woken (a futex wake per worker and step).
            Device::Cpu.with_context(|| {
                rows.par_iter_mut()
                    .enumerate()
                    .map_init(Scratch::default, draw)
                    .collect::<Result<_>>()
            })?
        } else {
            let mut scratch = Scratch::default();
            rows.iter_mut()
                .enumerate()
                .map(|item| draw(&mut scratch, item))
                .collect::<Result<_>>()?
        };
        for (row, token) in rows.iter_mut().zip(tokens) {
            row.tokens.push(token.token_id);
            row.logprobs.push(token.logprobs);
            row.seen.insert(token.token_id);
            on_token(row.at, row.sample, token.token_id);
            row.finish_reason = finish_reason(row, params, &self.stop_strings, self.decode)?;
        }
        Ok(())
    }

    /// Moves the finished rows of `rows` into `done`; returns the indices of the rows still running.
    fn retire(&self, rows: &mut Vec<Row>, done: &mut [Vec<Option<Rollout>>]) -> Result<Vec<usize>> {
        let keep: Vec<usize> = (0..rows.len())
            .filter(|&i| rows[i].finish_reason.is_none())
            .collect();
        if keep.len() == rows.len() {
            return Ok(keep);
        }
        for row in std::mem::take(rows) {
            match row.finish_reason {
                None => rows.push(row),
                Some(finish_reason) => {
                    let text = self.decode.map(|decode| decode(&row.tokens)).transpose()?;
                    done[row.at][row.sample as usize] = Some(Rollout {
                        sample_index: row.sample,
                        token_ids: row.tokens,
                        logprobs: row.logprobs,
                        finish_reason,
                        text,
                    });
                }
            }
        }
        Ok(keep)
    }
}

/// Prefills `prompt` for its `n` rows: the rows' fresh state, the shared logits, the group's cache.
fn prefill_group<M: StepModel>(
    model: &M,
    request: &Request,
    at: usize,
    prompt: &PromptInput,
    n: usize,
) -> Result<(Vec<Row>, Vec<f32>, M::Cache)> {
    // The response may not run past the model's context (validation left at least one slot).
    let max_new_tokens = request
        .params
        .max_new_tokens
        .min(model.max_sequence_len() - prompt.token_ids.len());
    let seen = SeenTokens::new(request.vocab, &prompt.token_ids);
    let rows = (0..n as u64)
        .map(|sample| Row {
            at,
            sample,
            max_new_tokens,
            rng: RowRng::new(request.params.seed, prompt.prompt_index, sample),
            seen: seen.clone(),
            tokens: Vec::new(),
            logprobs: Vec::new(),
            finish_reason: None,
        })
        .collect();
    let (logits, cache) = model.prefill(prompt, n)?;
    Ok((rows, logits, cache))
}

/// [`generate_groups_streaming`] with explicit [`BatchOptions`]: continuous batching across the prompts.
///
/// Prompts are admitted in order; a prompt's group is prefilled and joins the running batch as soon as its
/// `n` rows fit under `options.max_batch_rows` (always when the batch is empty). Every step decodes the
/// running rows of all admitted prompts together; finished rows leave at once.
pub fn generate_groups_batched<M: StepModel>(
    model: &M,
    prompts: &[PromptInput],
    n: usize,
    params: &SamplingParams,
    decode: Option<DecodeFn>,
    options: &BatchOptions,
    mut on_token: TokenSink,
) -> Result<Vec<Vec<Rollout>>> {
    validate_request(model, prompts, n, params, decode, options)?;
    let request = Request {
        params,
        decode,
        stop_strings: StopStrings::new(&params.stop_strings),
        vocab: model.vocab_size(),
    };
    let mut done: Vec<Vec<Option<Rollout>>> = vec![vec![None; n]; prompts.len()];
    // The running rows, in the order of the cache's rows.
    let mut running: Vec<Row> = Vec::new();
    let mut cache: Option<M::Cache> = None;
    let mut next_prompt = 0;
    loop {
        // Admit the next prompts while their groups fit (one group at a time without append_rows).
        while next_prompt < prompts.len()
            && (running.is_empty()
                || (model.can_append_rows() && running.len() + n <= options.max_batch_rows))
        {
            let (at, prompt) = (next_prompt, &prompts[next_prompt]);
            next_prompt += 1;
            let (mut joining, prefill_logits, mut group_cache) =
                prefill_group(model, &request, at, prompt, n)?;
            // Every row starts from the prefill's logits, shared by the group.
            request.sample_rows(&mut joining, |_| &prefill_logits, &mut on_token)?;
            let keep = request.retire(&mut joining, &mut done)?;
            if keep.is_empty() {
                continue;
            }
            if keep.len() < n {
                model.select_rows(&mut group_cache, &keep)?;
            }
            match cache.as_mut() {
                Some(running_cache) if !running.is_empty() => {
                    model.append_rows(running_cache, group_cache)?
                }
                _ => cache = Some(group_cache),
            }
            running.append(&mut joining);
        }
        let Some(running_cache) = cache.as_mut().filter(|_| !running.is_empty()) else {
            break; // nothing running and nothing left to admit
        };
        let last_tokens: Vec<u32> = running
            .iter()
            .map(|row| row.tokens[row.tokens.len() - 1]) // every running row has a token
            .collect();
        let logits = model.decode_step(&last_tokens, running_cache)?;
        if logits.len() != running.len() {
            return Err(Error::msg(format!(
                "generate: the model returned logits for {} rows, {} are running",
                logits.len(),
                running.len()
            )));
        }
        request.sample_rows(&mut running, |i| &logits[i], &mut on_token)?;
        let before = running.len();
        let keep = request.retire(&mut running, &mut done)?;
        if keep.is_empty() {
            cache = None;
        } else if keep.len() < before {
            model.select_rows(running_cache, &keep)?;
        }
    }

    done.into_iter()
        .map(|rollouts| {
            rollouts
                .into_iter()
                .map(|r| r.ok_or_else(|| Error::msg("generate: a response never finished")))
                .collect::<Result<Vec<_>>>()
        })
        .collect()
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
        at: 0,
        sample: sample_index,
        max_new_tokens,
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
        row.finish_reason = finish_reason(&row, params, &stop_strings, decode)?;
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
