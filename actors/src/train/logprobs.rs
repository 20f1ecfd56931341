//! Log-probs of responses under the chat model, for a micro-batch of (prompt, response) rows, at
//! temperature 1 (`log_softmax(logits)[token]`, no logits processors: what the generator records as the
//! behaviour log-probs, so the importance ratio compares like with like).
//!
//! Rows are `prompt ++ response`, right-padded. Each distinct prompt's image tiles go through the vision
//! tower and adapter once, however many rows (the G responses of a group) share the prompt; the adapter's
//! tokens replace the `<IMG_CONTEXT>` embeddings with a differentiable gather, as
//! [`ChatModel::embed`](crate::model::chat::ChatModel::embed) does. The LM head runs only at the positions
//! that predict response tokens: with hundreds of image tokens per prompt, most positions of a row are prompt.

use std::sync::Arc;

use candle_core::{DType, Tensor, D};
use candle_nn::{Linear, Module, VarBuilder};

use crate::model::chat::ChatModel;
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

/// A chat model with its LM head weight at hand, to score responses.
#[derive(Debug, Clone)]
pub struct ResponseScorer {
    model: ChatModel,
    lm_head: Linear,
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
            model,
            lm_head: Linear::new(weight, None),
        })
    }

    /// The model.
    pub fn model(&self) -> &ChatModel {
        &self.model
    }

    /// Log-probs (with grad), mask and, when `with_entropy`, entropies of every row's response tokens.
    pub fn response_logprobs(
        &self,
        rows: &[ResponseRow],
        with_entropy: bool,
    ) -> Result<ResponseLogprobs> {
        if rows.is_empty() {
            return Err(Error::msg("response log-probs: no rows"));
        }
        let device = self.lm_head.weight().device().clone();
        let batch = rows.len();
        let mut seq_len = 0;
        let mut resp_len = 1;
        for row in rows {
            if row.prompt.token_ids.is_empty() {
                return Err(Error::msg(format!(
                    "prompt {} has no tokens: nothing to condition the response on",
                    row.prompt.id.0
                )));
            }
            seq_len = seq_len.max(row.prompt.token_ids.len() + row.response.len());
            resp_len = resp_len.max(row.response.len());
        }
        let ctx = self.model.img_context_token_id();
        // Padding must not be read as an image token.
        let pad = if ctx == Some(0) { 1 } else { 0 };

        // Right-padded ids and attention mask.
        let mut ids = vec![pad; batch * seq_len];
        let mut attention = vec![0f32; batch * seq_len];
        for (r, row) in rows.iter().enumerate() {
            let start = r * seq_len;
            let prompt_len = row.prompt.token_ids.len();
            ids[start..start + prompt_len].copy_from_slice(&row.prompt.token_ids);
            ids[start + prompt_len..start + prompt_len + row.response.len()]
                .copy_from_slice(row.response);
            attention[start..start + prompt_len + row.response.len()].fill(1.0);
        }
        let input_ids = Tensor::from_vec(ids.clone(), (batch, seq_len), &device)?;
        let attention = Tensor::from_vec(attention, (batch, seq_len), &device)?;
        let embeds = self.embed(rows, &ids, &input_ids, seq_len)?; // (B, L, D)
        let hidden = self
            .model
            .llm
            .model
            .forward_embeds(&embeds, Some(&attention))?; // (B, L, D)
        let width = hidden.dim(2)?;

        // Positions that predict response tokens: row r's token j comes from position P_r - 1 + j.
        let mut positions = vec![0u32; batch * resp_len];
        let mut targets = vec![0u32; batch * resp_len];
        let mut mask = vec![0f32; batch * resp_len];
        for (r, row) in rows.iter().enumerate() {
            let first = r * seq_len + row.prompt.token_ids.len() - 1;
            for (j, &token) in row.response.iter().enumerate() {
                let k = r * resp_len + j;
                positions[k] = (first + j) as u32;
                targets[k] = token;
                mask[k] = 1.0;
            }
        }
        let positions = Tensor::from_vec(positions, batch * resp_len, &device)?;
        let targets = Tensor::from_vec(targets, batch * resp_len, &device)?;
        let mask = Tensor::from_vec(mask, (batch, resp_len), &device)?;
        let selected = hidden
            .reshape((batch * seq_len, width))? // (B*L, D)
            .index_select(&positions, 0)?; // (B*T, D)
        let logits = self.lm_head.forward(&selected)?; // (B*T, V)
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

    /// Token embeddings (B, L, D) with every IMG_CONTEXT position replaced by its prompt's image tokens;
    /// each distinct prompt's tiles are encoded once.
    fn embed(
        &self,
        rows: &[ResponseRow],
        ids: &[u32],
        input_ids: &Tensor,
        seq_len: usize,
    ) -> Result<Tensor> {
        let embeds = self.model.llm.model.embed_tokens(input_ids)?; // (B, L, D)
        let (batch, _, width) = embeds.dims3()?;
        let ctx = self.model.img_context_token_id();
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
                    let expected = pixels.dim(0)? * self.model.tokens_per_tile();
                    if context.len() != expected {
                        return Err(Error::msg(format!(
                            "prompt {} holds {} IMG_CONTEXT tokens but its {} tiles give {expected} image tokens",
                            prompt.id.0,
                            context.len(),
                            pixels.dim(0)?
                        )));
                    }
                    let features = self
                        .model
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
}
