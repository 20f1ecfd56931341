//! Log-probs of responses under the policy (InternVL-chat or Qwen2.5-VL), for a micro-batch of (prompt,
//! response) rows, at temperature 1 (`log_softmax(logits)[token]`, no logits processors: what the generator
//! records as the behaviour log-probs, so the importance ratio compares like with like).
//!
//! Rows that share a prompt (the G responses of a GRPO group, an MPO pair) share its forward: each distinct
//! prompt runs through the LLM once (right-padded), and every response attends to its prompt's keys and
//! values, gathered per layer so the gradients of all G responses reach the prompt
//! ([`qwen2::Model::forward_prefixed`](crate::model::qwen2::Model::forward_prefixed)); the same log-probs as
//! each row `prompt ++ response` on its own, up to rounding (tested), at about `P + G * R` token forwards
//! instead of `G * (P + R)`. Without repeats (SFT) each row runs whole, right-padded. Each distinct prompt's
//! image tiles go through the vision tower and adapter once, however many rows share the prompt; the adapter's
//! tokens replace the `<IMG_CONTEXT>` embeddings with a differentiable gather, as
//! [`ChatModel::embed`](crate::model::chat::ChatModel::embed) does. Qwen2.5-VL: the merged patch tokens
//! replace the prompt's `<|image_pad|>` embeddings the same way, and the positions are `get_rope_index` on
//! the prompt, then `max + 1 + j` for response token j on all three axes (what the generator's decode steps
//! use; a generated `<|image_pad|>` is an ordinary token). The LM head runs only at the positions that predict
//! response tokens: with hundreds of image tokens per prompt, most positions of a row are prompt.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;

use crate::model::chat::ChatModel;
use crate::model::linear::Linear;
use crate::model::policy::PolicyNet;
use crate::model::qwen2_5_vl::text::{rope_index, MropePositions};
use crate::model::qwen2_5_vl::Qwen25Vl;
use crate::prompt::EncodedPrompt;
use crate::{Error, Result};

/// One row: a prompt and a response to it.
#[derive(Debug, Clone)]
pub struct ResponseRow<'a> {
    /// The prompt (token ids with IMG_CONTEXT runs expanded, image tiles).
    pub prompt: Arc<EncodedPrompt>,
    /// The response's token ids (the prompt excluded).
    pub response: &'a [u32],
}

/// Per-token log-probs of a micro-batch of responses.
#[derive(Debug, Clone)]
pub struct ResponseLogprobs {
    /// `log p(response[j] | prompt, response[..j])`, 0 at padding, with grad. (B, T) f32
    pub logprobs: Tensor,
    /// 1 for response tokens, 0 for padding. (B, T) f32
    pub mask: Tensor,
    /// Entropy of the next-token distribution at each response position, 0 at padding, no grad. (B, T) f32
    pub entropy: Option<Tensor>,
}

/// A policy model with its LM head at hand, to score responses.
#[derive(Debug, Clone)]
pub struct ResponseScorer {
    model: PolicyNet,
    /// The chat model's LM head (Qwen2.5-VL's is the model's own).
    lm_head: Option<Linear>,
    /// Rows that share a prompt share its forward (on by default).
    share_prefixes: bool,
}

/// Name of the untied LM head in the InternVL-chat checkpoint layout.
const LM_HEAD: &str = "language_model.lm_head.weight";

impl ResponseScorer {
    /// Wraps `model`; `vb` is the builder it was built from (or one handing out the same tensors), from
    /// which the LM head weight is read: the trainable Var when the LLM trains, the loaded tensor otherwise;
    /// with tied embeddings, the embedding matrix.
    pub fn new(model: ChatModel, vb: &VarBuilder) -> Result<Self> {
        let weight = if model.config().llm()?.tie_word_embeddings {
            model.llm.model.embedding_weight().clone()
        } else {
            vb.get_unchecked(LM_HEAD)?
        };
        Ok(Self {
            model: model.into(),
            lm_head: Some(Linear::new(candle_nn::Linear::new(weight, None))),
            share_prefixes: true,
        })
    }

    /// Wraps a policy of either family; `vb` as [`Self::new`] for a chat model (Qwen2.5-VL reads none).
    pub fn for_policy(model: PolicyNet, vb: &VarBuilder) -> Result<Self> {
        match model {
            PolicyNet::Chat(model) => Self::new(*model, vb),
            model @ PolicyNet::Qwen25Vl(_) => Ok(Self {
                model,
                lm_head: None,
                share_prefixes: true,
            }),
        }
    }

    /// The scorer that runs every row `prompt ++ response` on its own, as a reference for the
    /// prefix-shared forward (the same log-probs up to rounding, more work when prompts repeat).
    pub fn without_prefix_sharing(mut self) -> Self {
        self.share_prefixes = false;
        self
    }

    /// The model.
    pub fn model(&self) -> &PolicyNet {
        &self.model
    }

    /// The LM head on (N, D) hidden states -> (N, V) logits.
    fn head(&self, hidden: &Tensor) -> Result<Tensor> {
        match (&self.model, &self.lm_head) {
            (PolicyNet::Chat(_), Some(head)) => Ok(head.forward(hidden)?),
            (PolicyNet::Qwen25Vl(policy), _) => policy.model.logits(hidden),
            (PolicyNet::Chat(_), None) => Err(Error::msg("response scorer: no LM head")),
        }
    }

    /// Log-probs (with grad), mask and, when `with_entropy`, entropies of every row's response tokens.
    /// Rows that share a prompt (a GRPO group, an MPO pair) share its forward (see
    /// [`Self::without_prefix_sharing`]).
    pub fn response_logprobs(
        &self,
        rows: &[ResponseRow],
        with_entropy: bool,
    ) -> Result<ResponseLogprobs> {
        if rows.is_empty() {
            return Err(Error::msg("response log-probs: no rows"));
        }
        for row in rows {
            if row.prompt.token_ids.is_empty() {
                return Err(Error::msg(format!(
                    "prompt {} has no tokens: nothing to condition the response on",
                    row.prompt.id.0
                )));
            }
        }
        let device = match &self.model {
            PolicyNet::Chat(model) => model.llm.model.embedding_weight().device().clone(),
            PolicyNet::Qwen25Vl(policy) => {
                policy.model.llm.model.embedding_weight().device().clone()
            }
        };
        let batch = rows.len();
        let resp_len = rows
            .iter()
            .map(|r| r.response.len())
            .max()
            .unwrap_or(0)
            .max(1);
        // Each distinct prompt (by id, in order of first appearance) and the prompt of each row.
        let mut distinct: Vec<usize> = Vec::new();
        let mut prompt_of = Vec::with_capacity(batch);
        for (r, row) in rows.iter().enumerate() {
            let id = row.prompt.id.0;
            let g = match distinct.iter().position(|&d| rows[d].prompt.id.0 == id) {
                Some(g) => g,
                None => {
                    distinct.push(r);
                    distinct.len() - 1
                }
            };
            prompt_of.push(g);
        }
        let (pool, positions) = if self.share_prefixes && distinct.len() < batch {
            let prompts: Vec<ResponseRow> = distinct
                .iter()
                .map(|&d| ResponseRow {
                    prompt: Arc::clone(&rows[d].prompt),
                    response: &[],
                })
                .collect();
            self.prefixed_hidden(&prompts, rows, &prompt_of, resp_len, &device)?
        } else {
            self.full_hidden(rows, resp_len, &device)?
        };

        let mut targets = vec![0u32; batch * resp_len];
        let mut mask = vec![0f32; batch * resp_len];
        for (r, row) in rows.iter().enumerate() {
            for (j, &token) in row.response.iter().enumerate() {
                targets[r * resp_len + j] = token;
                mask[r * resp_len + j] = 1.0;
            }
        }
        let positions = Tensor::from_vec(positions, batch * resp_len, &device)?;
        let targets = Tensor::from_vec(targets, batch * resp_len, &device)?;
        let mask = Tensor::from_vec(mask, (batch, resp_len), &device)?;
        let selected = pool.index_select(&positions, 0)?; // (B*T, D)
        let logits = self.head(&selected)?; // (B*T, V)
        let logprobs = r1v2_kernels::token_logprobs(&logits, &targets)?
            .reshape((batch, resp_len))? // (B, T)
            .mul(&mask)?;
        let entropy = if with_entropy {
            let log_p =
                candle_nn::ops::log_softmax(&logits.detach().to_dtype(DType::F32)?, D::Minus1)?;
            let entropy = (log_p.exp()? * &log_p)?.sum(D::Minus1)?.neg()?; // (B*T,)
            Some((entropy.reshape((batch, resp_len))? * &mask)?)
        } else {
            None
        };
        Ok(ResponseLogprobs {
            logprobs,
            mask,
            entropy,
        })
    }

    /// The id that pads rows: never the image token, which the embedding would replace.
    fn pad_id(&self) -> u32 {
        let image_token = match &self.model {
            PolicyNet::Chat(model) => model.img_context_token_id(),
            PolicyNet::Qwen25Vl(policy) => Some(policy.model.config().image_token_id),
        };
        if image_token == Some(0) {
            1
        } else {
            0
        }
    }

    /// Every row `prompt ++ response` on its own, right-padded to (B, L): the hidden states (B*L, D) and,
    /// for response token j of row r at `r * T + j` (T = `resp_len`), the row of the state that predicts it
    /// (0 at padding).
    fn full_hidden(
        &self,
        rows: &[ResponseRow],
        resp_len: usize,
        device: &Device,
    ) -> Result<(Tensor, Vec<u32>)> {
        let batch = rows.len();
        let seq_len = rows
            .iter()
            .map(|r| r.prompt.token_ids.len() + r.response.len())
            .max()
            .unwrap_or(0);
        let mut ids = vec![self.pad_id(); batch * seq_len];
        let mut attention = vec![0f32; batch * seq_len];
        let mut positions = vec![0u32; batch * resp_len];
        for (r, row) in rows.iter().enumerate() {
            let start = r * seq_len;
            let prompt_len = row.prompt.token_ids.len();
            ids[start..start + prompt_len].copy_from_slice(&row.prompt.token_ids);
            ids[start + prompt_len..start + prompt_len + row.response.len()]
                .copy_from_slice(row.response);
            attention[start..start + prompt_len + row.response.len()].fill(1.0);
            // Row r's token j comes from position P_r - 1 + j.
            for j in 0..row.response.len() {
                positions[r * resp_len + j] = (start + prompt_len - 1 + j) as u32;
            }
        }
        let input_ids = Tensor::from_vec(ids.clone(), (batch, seq_len), device)?;
        let attention = Tensor::from_vec(attention, (batch, seq_len), device)?;
        let hidden = match &self.model {
            PolicyNet::Chat(model) => {
                let embeds = embed_chat(model, rows, &ids, &input_ids, seq_len)?; // (B, L, D)
                model.llm.model.forward_embeds(&embeds, Some(&attention))? // (B, L, D)
            }
            PolicyNet::Qwen25Vl(policy) => {
                let (embeds, positions) =
                    embed_qwen2_5_vl(&policy.model, rows, &input_ids, seq_len)?; // (B, L, D)
                policy
                    .model
                    .llm
                    .forward_embeds(&embeds, Some(&attention), &positions)? // (B, L, D)
            }
        };
        let width = hidden.dim(2)?;
        Ok((hidden.reshape((batch * seq_len, width))?, positions))
    }

    /// The prefix-shared forward: each of the distinct `prompts` (Bp, right-padded to P) once, the responses
    /// (B, right-padded to T = `resp_len`) after prompt `prompt_of[r]`. Returns the pool of hidden states
    /// (prompts' Bp*P, then responses' B*T; D wide) and, for response token j of row r at `r * T + j`, the
    /// pool row that predicts it: the prompt's last token for j = 0, the response's token j - 1 after.
    fn prefixed_hidden(
        &self,
        prompts: &[ResponseRow],
        rows: &[ResponseRow],
        prompt_of: &[usize],
        resp_len: usize,
        device: &Device,
    ) -> Result<(Tensor, Vec<u32>)> {
        let (n_prompts, batch) = (prompts.len(), rows.len());
        let pad = self.pad_id();
        let prompt_len = prompts
            .iter()
            .map(|p| p.prompt.token_ids.len())
            .max()
            .unwrap_or(0);
        let mut prompt_ids = vec![pad; n_prompts * prompt_len];
        let mut prompt_mask = vec![0f32; n_prompts * prompt_len];
        for (g, p) in prompts.iter().enumerate() {
            let tokens = &p.prompt.token_ids;
            prompt_ids[g * prompt_len..g * prompt_len + tokens.len()].copy_from_slice(tokens);
            prompt_mask[g * prompt_len..g * prompt_len + tokens.len()].fill(1.0);
        }
        let mut ids = vec![pad; batch * resp_len];
        let mut mask = vec![0f32; batch * resp_len];
        let mut positions = vec![0u32; batch * resp_len];
        let responses_at = n_prompts * prompt_len;
        for (r, row) in rows.iter().enumerate() {
            let at = r * resp_len;
            ids[at..at + row.response.len()].copy_from_slice(row.response);
            mask[at..at + row.response.len()].fill(1.0);
            let g = prompt_of[r];
            for j in 0..row.response.len() {
                positions[at + j] = if j == 0 {
                    g * prompt_len + prompts[g].prompt.token_ids.len() - 1
                } else {
                    responses_at + at + j - 1
                } as u32;
            }
        }
        let prompt_input = Tensor::from_vec(prompt_ids.clone(), (n_prompts, prompt_len), device)?;
        let prompt_mask = Tensor::from_vec(prompt_mask, (n_prompts, prompt_len), device)?;
        let input = Tensor::from_vec(ids, (batch, resp_len), device)?;
        let mask = Tensor::from_vec(mask, (batch, resp_len), device)?;
        let (prompt_hidden, hidden) = match &self.model {
            PolicyNet::Chat(model) => {
                let prompt_embeds =
                    embed_chat(model, prompts, &prompt_ids, &prompt_input, prompt_len)?; // (Bp, P, D)
                let embeds = model.llm.model.embed_tokens(&input)?; // (B, T, D)
                model.llm.model.forward_prefixed(
                    &prompt_embeds,
                    Some(&prompt_mask),
                    &embeds,
                    Some(&mask),
                    prompt_of,
                )?
            }
            PolicyNet::Qwen25Vl(policy) => {
                // Prompts (Bp, P, D), responses (B, T, D). Response token j of a prompt whose largest position
                // is m sits at m + 1 + j on every axis.
                let (prompt_embeds, prompt_positions) =
                    embed_qwen2_5_vl(&policy.model, prompts, &prompt_input, prompt_len)?;
                let embeds = policy.model.llm.model.embed_tokens(&input)?;
                let next: Vec<u32> = (0..n_prompts)
                    .map(|g| next_position(&prompt_positions, g))
                    .collect();
                let axis: Vec<Vec<u32>> = rows
                    .iter()
                    .zip(prompt_of)
                    .map(|(row, &g)| {
                        (0..resp_len)
                            .map(|j| {
                                if j < row.response.len() {
                                    next[g] + j as u32
                                } else {
                                    0
                                }
                            })
                            .collect()
                    })
                    .collect();
                let positions: MropePositions = [axis.clone(), axis.clone(), axis];
                policy.model.llm.forward_prefixed(
                    &prompt_embeds,
                    Some(&prompt_mask),
                    &prompt_positions,
                    &embeds,
                    Some(&mask),
                    &positions,
                    prompt_of,
                )?
            }
        };
        let width = hidden.dim(2)?;
        let pool = Tensor::cat(
            &[
                prompt_hidden.reshape((n_prompts * prompt_len, width))?,
                hidden.reshape((batch * resp_len, width))?,
            ],
            0,
        )?;
        Ok((pool, positions))
    }
}

/// Token embeddings (B, L, D) with every IMG_CONTEXT position replaced by its prompt's image tokens; each
/// distinct prompt's tiles are encoded once.
fn embed_chat(
    model: &ChatModel,
    rows: &[ResponseRow],
    ids: &[u32],
    input_ids: &Tensor,
    seq_len: usize,
) -> Result<Tensor> {
    let embeds = model.llm.model.embed_tokens(input_ids)?; // (B, L, D)
    let (batch, _, width) = embeds.dims3()?;
    let ctx = model.img_context_token_id();
    let mut source_rows: Vec<u32> = (0..(batch * seq_len) as u32).collect();
    let mut pool = vec![embeds.reshape((batch * seq_len, width))?]; // (B*L, D) then image tokens
    let mut pool_len = batch * seq_len;
    // (prompt id, offset of its image tokens in the pool)
    let mut encoded: Vec<(u64, usize)> = Vec::new();
    for (r, row) in rows.iter().enumerate() {
        let prompt = &row.prompt;
        let context: Vec<usize> = match ctx {
            Some(ctx) => (0..prompt.token_ids.len())
                .filter(|&p| ids[r * seq_len + p] == ctx)
                .collect(),
            None => Vec::new(),
        };
        let Some(pixels) = &prompt.pixel_values else {
            if context.is_empty() {
                continue;
            }
            return Err(Error::msg(format!(
                "prompt {} holds {} IMG_CONTEXT tokens but no pixel values",
                prompt.id.0,
                context.len()
            )));
        };
        if ctx.is_none() {
            return Err(Error::msg(format!(
                "prompt {} has pixel values but the model's IMG_CONTEXT token id is unknown",
                prompt.id.0
            )));
        }
        let offset = match encoded.iter().find(|(id, _)| *id == prompt.id.0) {
            Some(&(_, offset)) => offset,
            None => {
                let expected = pixels.dim(0)? * model.tokens_per_tile();
                if context.len() != expected {
                    return Err(Error::msg(format!(
                        "prompt {} holds {} IMG_CONTEXT tokens but its {} tiles give {expected} image tokens",
                        prompt.id.0,
                        context.len(),
                        pixels.dim(0)?
                    )));
                }
                let features = model
                    .image_features(pixels)? // (tiles, n, D)
                    .reshape((expected, width))? // (tiles*n, D)
                    .to_dtype(embeds.dtype())?;
                let offset = pool_len;
                pool_len += expected;
                pool.push(features);
                encoded.push((prompt.id.0, offset));
                offset
            }
        };
        for (k, &p) in context.iter().enumerate() {
            source_rows[r * seq_len + p] = (offset + k) as u32;
        }
    }
    if pool.len() == 1 {
        return Ok(embeds);
    }
    let index = Tensor::from_vec(source_rows, batch * seq_len, embeds.device())?;
    let pool = Tensor::cat(&pool, 0)?; // (B*L + image tokens, D)
    Ok(pool
        .index_select(&index, 0)?
        .reshape((batch, seq_len, width))?) // (B, L, D)
}

/// The position after row `row` of three-axis prompt positions (its largest on any axis, + 1), where a
/// response continues on all three axes (transformers' rope delta); 0 for an empty row.
fn next_position(positions: &MropePositions, row: usize) -> u32 {
    positions
        .iter()
        .flat_map(|axis| axis[row].iter())
        .max()
        .map_or(0, |&m| m + 1)
}

/// Qwen2.5-VL: token embeddings (B, L, D) with each prompt's `<|image_pad|>` slots replaced by its merged
/// patch tokens (each distinct prompt's images encoded once), and the rows' three-axis positions: the
/// prompt's `get_rope_index`, then `max + 1 + j` for response token j, 0 at padding.
fn embed_qwen2_5_vl(
    model: &Qwen25Vl,
    rows: &[ResponseRow],
    input_ids: &Tensor,
    seq_len: usize,
) -> Result<(Tensor, MropePositions)> {
    let cfg = model.config();
    let embeds = model.llm.model.embed_tokens(input_ids)?; // (B, L, D)
    let (batch, _, width) = embeds.dims3()?;
    let mut source_rows: Vec<u32> = (0..(batch * seq_len) as u32).collect();
    let mut pool = vec![embeds.reshape((batch * seq_len, width))?]; // (B*L, D) then image tokens
    let mut pool_len = batch * seq_len;
    let mut positions: MropePositions = std::array::from_fn(|_| vec![vec![0u32; seq_len]; batch]);
    // Per distinct prompt: its id, the offset of its image tokens in the pool, its positions.
    let mut encoded: Vec<(u64, usize, MropePositions)> = Vec::new();
    for (r, row) in rows.iter().enumerate() {
        let prompt = &row.prompt;
        let p = prompt.token_ids.len();
        let pads: Vec<usize> = (0..p)
            .filter(|&i| prompt.token_ids[i] == cfg.image_token_id)
            .collect();
        let at = match encoded.iter().position(|(id, _, _)| *id == prompt.id.0) {
            Some(at) => at,
            None => {
                let name = format!("prompt {}", prompt.id.0);
                let expected: usize = prompt
                    .image_grids
                    .iter()
                    .map(|&g| cfg.image_tokens(g))
                    .sum();
                if pads.len() != expected || prompt.pixel_values.is_none() != (expected == 0) {
                    return Err(Error::msg(format!(
                        "{name} holds {} <|image_pad|> tokens (id {}), its image grids {:?} give {expected} \
                         image tokens{}",
                        pads.len(),
                        cfg.image_token_id,
                        prompt.image_grids,
                        if prompt.pixel_values.is_some() { "" } else { " (and it has no pixel values)" }
                    )));
                }
                let prompt_positions = rope_index(
                    cfg,
                    std::slice::from_ref(&prompt.token_ids),
                    &[vec![true; p]],
                    &prompt.image_grids,
                )
                .map_err(|err| Error::msg(format!("{name}: {err}")))?;
                let offset = pool_len;
                if let Some(pixels) = prompt.pixel_values.as_ref().filter(|_| expected > 0) {
                    let features = model
                        .visual
                        .forward(pixels, &prompt.image_grids)
                        .map_err(|err| Error::msg(format!("{name}: {err}")))?
                        .to_dtype(embeds.dtype())?; // (n, D)
                    pool_len += expected;
                    pool.push(features);
                }
                encoded.push((prompt.id.0, offset, prompt_positions));
                encoded.len() - 1
            }
        };
        let (_, offset, prompt_positions) = &encoded[at];
        for (k, &slot) in pads.iter().enumerate() {
            source_rows[r * seq_len + slot] = (offset + k) as u32;
        }
        let next = next_position(prompt_positions, 0);
        for (axis, prompt_axis) in positions.iter_mut().zip(prompt_positions) {
            let slots = &mut axis[r];
            slots[..p].copy_from_slice(&prompt_axis[0]);
            for (j, slot) in slots[p..p + row.response.len()].iter_mut().enumerate() {
                *slot = next + j as u32;
            }
        }
    }
    if pool.len() == 1 {
        return Ok((embeds, positions));
    }
    let index = Tensor::from_vec(source_rows, batch * seq_len, embeds.device())?;
    let pool = Tensor::cat(&pool, 0)?; // (B*L + image tokens, D)
    let embeds = pool
        .index_select(&index, 0)?
        .reshape((batch, seq_len, width))?; // (B, L, D)
    Ok((embeds, positions))
}
