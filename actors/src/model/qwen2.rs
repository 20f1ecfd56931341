//! Qwen2 decoder-only LLM (Qwen2 / Qwen2.5 / QwQ-32B): GQA attention with q/k/v bias, RoPE,
//! RMSNorm, SwiGLU MLP, tied or separate `lm_head`.
//!
//! Reference: transformers `models/qwen2/modeling_qwen2.py` (eager attention); the file follows
//! candle-transformers' `models/qwen2.rs`, but every op on the training path has a backward
//! (r1v2_kernels), and rows may be padded anywhere (see [`super::kv_cache`]).

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, VarBuilder};
use r1v2_kernels::{
    cached_attention, no_grad_f32_cpu, rms_norm, rope, scaled_masked_softmax, softmax_last_dim,
    swiglu, token_logprobs,
};

use super::kv_cache::{mask_rows, prefixed_layouts, KvCache, Layout};
use super::linear::{linear, linear_no_bias, Linear};
pub use super::qwen2_config::Config;
use crate::{Error, Result};

/// Rotary embedding: inverse frequencies `theta^(-2i/d)`, angles computed in f32 per position.
#[derive(Debug, Clone)]
struct RotaryEmbedding {
    /// (1, 1, D/2) f32.
    inv_freq: Tensor,
}

impl RotaryEmbedding {
    fn new(cfg: &Config, device: &Device) -> Result<Self> {
        let dim = cfg.head_dim();
        let inv_freq: Vec<f32> = (0..dim / 2)
            .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / dim as f64) as f32)
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, 1, dim / 2), device)?;
        Ok(Self { inv_freq })
    }

    /// positions (B, T) f32 -> cos, sin (B, T, D/2) in `dtype`.
    fn cos_sin(&self, positions: &Tensor, dtype: DType) -> Result<(Tensor, Tensor)> {
        let angles = positions.unsqueeze(2)?.broadcast_mul(&self.inv_freq)?; // (B, T, D/2)
        Ok((
            angles.cos()?.to_dtype(dtype)?,
            angles.sin()?.to_dtype(dtype)?,
        ))
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let (hidden, head_dim) = (cfg.hidden_size, cfg.head_dim());
        let (num_heads, num_kv_heads) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        Ok(Self {
            q_proj: linear(hidden, num_heads * head_dim, vb.pp("q_proj"))?,
            k_proj: linear(hidden, num_kv_heads * head_dim, vb.pp("k_proj"))?,
            v_proj: linear(hidden, num_kv_heads * head_dim, vb.pp("v_proj"))?,
            o_proj: linear_no_bias(num_heads * head_dim, hidden, vb.pp("o_proj"))?,
            num_heads,
            num_kv_heads,
            head_dim,
        })
    }

    /// x (B, T, D) -> the roped queries (B, H, T, D) and keys (B, Hkv, T, D), and the values (B, Hkv, T, D).
    fn project(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t, _) = x.dims3()?;
        let (h, h_kv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let q = self
            .q_proj
            .forward(x)?
            .reshape((b, t, h, d))?
            .transpose(1, 2)?; // (B, H, T, D)
        let k = self
            .k_proj
            .forward(x)?
            .reshape((b, t, h_kv, d))?
            .transpose(1, 2)?; // (B, Hkv, T, D)
        let v = self
            .v_proj
            .forward(x)?
            .reshape((b, t, h_kv, d))?
            .transpose(1, 2)?; // (B, Hkv, T, D)
        let q = rope(&q.contiguous()?, cos, sin)?;
        let k = rope(&k.contiguous()?, cos, sin)?;
        Ok((q, k, v.contiguous()?))
    }

    /// x (B, T, D) -> (B, T, D). `mask` (B, 1, 1, T, S) f32 additive; the cache supplies the
    /// S - T earlier keys and values and receives this step's.
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        layer: usize,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (q, k, v) = self.project(x, cos, sin)?;
        // Generation on the CPU (a cached step, nothing tracked) takes the fused kernel, which has no backward.
        let fused = cache.is_some() && no_grad_f32_cpu(&[&q, &k, &v]);
        let (k, v) = match cache {
            Some(cache) => cache.append(layer, &k, &v)?,
            None => (k, v),
        };
        if fused {
            // One pass per query over the cache, read in place.
            let scale = 1.0 / (self.head_dim as f64).sqrt();
            let out = cached_attention(&q, &k, &v, mask, scale)?; // (B, T, H*D)
            return self.o_proj.forward(&out);
        }
        self.attend(&q, &k, &v, mask)
    }

    /// [`Self::forward`] without a cache, after `prefix` (keys, values (B, Hkv, S - T, D), differentiable):
    /// returns the output (B, T, D) and this step's roped keys and values (B, Hkv, T, D).
    fn forward_prefixed(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        prefix: Option<(&Tensor, &Tensor)>,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (q, k, v) = self.project(x, cos, sin)?;
        let out = match prefix {
            Some((pk, pv)) => {
                let keys = Tensor::cat(&[pk, &k], 2)?; // (B, Hkv, S, D)
                let values = Tensor::cat(&[pv, &v], 2)?;
                self.attend(&q, &keys, &values, mask)?
            }
            None => self.attend(&q, &k, &v, mask)?,
        };
        Ok((out, k, v))
    }

    /// The composed (differentiable) attention of queries q (B, H, T, D) over keys and values
    /// (B, Hkv, S, D) under `mask` (B, 1, 1, T, S), then `o_proj` -> (B, T, D).
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, _, t, _) = q.dims4()?;
        let (h, h_kv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let group = h / h_kv;
        let scale = 1.0 / (d as f64).sqrt();
        let s = k.dim(2)?;
        // GQA without copying K/V: the `group` query heads of one KV head become one longer
        // query sequence. Head h uses KV head h / group, as transformers' repeat_kv.
        let q = q.reshape((b, h_kv, group * t, d))?; // (B, Hkv, G*T, D)
        let scores = q.matmul(&k.t()?)?; // (B, Hkv, G*T, S)
        let probs = if matches!(scores.dtype(), DType::F32 | DType::F64) {
            // Scale, mask and softmax in one op: the bits of the composition below, without two (B, H, T, S)
            // temporaries that the graph would keep until the backward.
            let scores = scores.reshape((b, h_kv, group, t, s))?; // (B, Hkv, G, T, S)
            scaled_masked_softmax(&scores, &mask.to_dtype(scores.dtype())?, scale)?
        } else {
            // Softmax in f32 at least (as transformers' eager attention).
            let scores = (scores * scale)?
                .to_dtype(DType::F32)?
                .reshape((b, h_kv, group, t, s))?; // (B, Hkv, G, T, S)
            softmax_last_dim(&scores.broadcast_add(&mask.to_dtype(DType::F32)?)?)?
        };
        let probs = probs
            .to_dtype(v.dtype())?
            .reshape((b, h_kv, group * t, s))?; // (B, Hkv, G*T, S)
        let out = probs.matmul(v)?.reshape((b, h, t, d))?; // (B, H, T, D)
        let out = out.transpose(1, 2)?.reshape((b, t, h * d))?; // (B, T, H*D)
        self.o_proj.forward(&out)
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let (hidden, inter) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: linear_no_bias(hidden, inter, vb.pp("gate_proj"))?,
            up_proj: linear_no_bias(hidden, inter, vb.pp("up_proj"))?,
            down_proj: linear_no_bias(inter, hidden, vb.pp("down_proj"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gated = swiglu(&self.gate_proj.forward(x)?, &self.up_proj.forward(x)?)?;
        self.down_proj.forward(&gated)
    }
}

/// RMSNorm weight and epsilon, applied through the differentiable kernel.
#[derive(Debug, Clone)]
pub(crate) struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            eps,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(rms_norm(x, &self.weight, self.eps)?)
    }
}

#[derive(Debug, Clone)]
pub(crate) struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    /// The layer's seven projections.
    fn linears_mut(&mut self) -> [&mut Linear; 7] {
        let (attn, mlp) = (&mut self.self_attn, &mut self.mlp);
        [
            &mut attn.q_proj,
            &mut attn.k_proj,
            &mut attn.v_proj,
            &mut attn.o_proj,
            &mut mlp.gate_proj,
            &mut mlp.up_proj,
            &mut mlp.down_proj,
        ]
    }

    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let eps = cfg.rms_norm_eps;
        Ok(Self {
            self_attn: Attention::new(cfg, vb.pp("self_attn"))?,
            mlp: Mlp::new(cfg, vb.pp("mlp"))?,
            input_layernorm: RmsNorm::new(cfg.hidden_size, eps, vb.pp("input_layernorm"))?,
            post_attention_layernorm: RmsNorm::new(
                cfg.hidden_size,
                eps,
                vb.pp("post_attention_layernorm"),
            )?,
        })
    }

    pub(crate) fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        layer: usize,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let attn = self.self_attn.forward(
            &self.input_layernorm.forward(x)?,
            cos,
            sin,
            mask,
            layer,
            cache,
        )?;
        self.mlp_block(x, &attn)
    }

    /// The attention's residual, then the MLP block with its own: `y = x + attn; y + mlp(norm(y))`.
    fn mlp_block(&self, x: &Tensor, attn: &Tensor) -> Result<Tensor> {
        let x = (x + attn)?;
        let mlp = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&x)?)?;
        Ok((x + mlp)?)
    }

    /// [`Self::forward`] without a cache, after `prefix` (see [`Attention::forward_prefixed`]); returns the
    /// output and this step's keys and values.
    fn forward_prefixed(
        &self,
        x: &Tensor,
        stream: &Stream,
        prefix: Option<(&Tensor, &Tensor)>,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (attn, k, v) = self.self_attn.forward_prefixed(
            &self.input_layernorm.forward(x)?,
            stream.cos,
            stream.sin,
            stream.mask,
            prefix,
        )?;
        Ok((self.mlp_block(x, &attn)?, k, v))
    }
}

/// One side of a prefix-shared forward: its embeddings (B, T, D), rotary cos and sin (B, T, D/2) and
/// additive mask (B, 1, 1, T, S).
struct Stream<'a> {
    embeds: &'a Tensor,
    cos: &'a Tensor,
    sin: &'a Tensor,
    mask: &'a Tensor,
}

/// The Qwen2 decoder (`Qwen2Model`): token embeddings, decoder layers, final norm.
/// Its `VarBuilder` sits at the checkpoint's `model` prefix.
#[derive(Debug, Clone)]
pub struct Model {
    embed_tokens: Embedding,
    pub(crate) layers: Vec<DecoderLayer>,
    pub(crate) norm: RmsNorm,
    rotary: RotaryEmbedding,
    cfg: Config,
}

impl Model {
    /// Builds the decoder from `vb` (tensors `embed_tokens.weight`, `layers.N.*`, `norm.weight`).
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let embed_tokens =
            candle_nn::embedding(cfg.vocab_size, cfg.hidden_size, vb.pp("embed_tokens"))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(cfg, vb.pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("norm"))?;
        let rotary = RotaryEmbedding::new(cfg, vb.device())?;
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            rotary,
            cfg: cfg.clone(),
        })
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The embedding matrix (V, D) (the tied `lm_head` reuses it).
    pub fn embedding_weight(&self) -> &Tensor {
        self.embed_tokens.embeddings()
    }

    /// input_ids (B, T) u32 -> embeddings (B, T, D).
    pub fn embed_tokens(&self, input_ids: &Tensor) -> Result<Tensor> {
        Ok(self.embed_tokens.forward(input_ids)?)
    }

    /// Full-sequence forward: embeds (B, T, D), attention mask (B, T) with 1 = token, 0 = padding
    /// (`None`: no padding); causal inside. Returns the final-normed hidden states (B, T, D);
    /// states at padding slots are finite but meaningless.
    pub fn forward_embeds(
        &self,
        embeds: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, t, _) = embeds.dims3()?;
        let mut scratch = KvCache::new(0);
        let layout = scratch.begin_step(&mask_rows(attention_mask, b, t)?, embeds.device())?;
        self.run_layers(embeds, &layout, None)
    }

    /// A fresh KV cache sized for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }

    /// Incremental forward: the step's embeds (B, T, D) and mask (B, T) come after what `cache`
    /// holds (see [`Self::new_cache`]), which then also holds this step. Returns the final-normed
    /// hidden states (B, T, D). After an error the cache is unusable: clear it.
    pub fn forward_step(
        &self,
        embeds: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        if cache.num_layers() != self.layers.len() {
            return Err(Error::msg(format!(
                "KV cache made for {} layers, the model has {}",
                cache.num_layers(),
                self.layers.len()
            )));
        }
        let (b, t, _) = embeds.dims3()?;
        let layout = cache.begin_step(&mask_rows(attention_mask, b, t)?, embeds.device())?;
        self.run_layers(embeds, &layout, Some(cache))
    }

    /// Prefix-shared full-sequence forward, for training on several responses to one prompt: each distinct
    /// prompt runs through the layers once, and response row b attends to the keys and values of prompt
    /// `prompt_of[b]` (gathered, so gradients from every response reach the prompt) before its own. Prompt
    /// embeds (Bp, P, D) with mask (Bp, P), response embeds (B, R, D) with mask (B, R); 1 = token, 0 =
    /// padding (`None`: none), padding anywhere. A response's positions continue after its prompt's real
    /// tokens. Returns the final-normed hidden states of the prompts (Bp, P, D) and of the responses
    /// (B, R, D): row b of the responses is the forward of `prompt ++ response` up to rounding.
    pub fn forward_prefixed(
        &self,
        prompt_embeds: &Tensor,
        prompt_mask: Option<&Tensor>,
        embeds: &Tensor,
        attention_mask: Option<&Tensor>,
        prompt_of: &[usize],
    ) -> Result<(Tensor, Tensor)> {
        self.forward_prefixed_with(
            prompt_embeds,
            prompt_mask,
            embeds,
            attention_mask,
            prompt_of,
            |_, positions, dtype| self.rotary.cos_sin(positions, dtype),
        )
    }

    /// [`Self::forward_prefixed`] with the rotary cos and sin of each side from `rope(is_prompt, positions,
    /// dtype)`, `positions` (rows, T) f32 the 1D positions of the side's layout (Qwen2.5-VL brings its own
    /// three-axis angles).
    pub(crate) fn forward_prefixed_with(
        &self,
        prompt_embeds: &Tensor,
        prompt_mask: Option<&Tensor>,
        embeds: &Tensor,
        attention_mask: Option<&Tensor>,
        prompt_of: &[usize],
        rope: impl Fn(bool, &Tensor, DType) -> Result<(Tensor, Tensor)>,
    ) -> Result<(Tensor, Tensor)> {
        let (bp, p, _) = prompt_embeds.dims3()?;
        let (b, r, _) = embeds.dims3()?;
        let (prompts, responses) = prefixed_layouts(
            &mask_rows(prompt_mask, bp, p)?,
            &mask_rows(attention_mask, b, r)?,
            prompt_of,
            embeds.device(),
        )?;
        let (prompt_cos, prompt_sin) = rope(true, &prompts.positions, prompt_embeds.dtype())?;
        let (cos, sin) = rope(false, &responses.positions, embeds.dtype())?;
        self.run_layers_prefixed(
            &Stream {
                embeds: prompt_embeds,
                cos: &prompt_cos,
                sin: &prompt_sin,
                mask: &prompts.mask,
            },
            &Stream {
                embeds,
                cos: &cos,
                sin: &sin,
                mask: &responses.mask,
            },
            prompt_of,
        )
    }

    /// The layers of [`Self::forward_prefixed`] on its two streams (masks from `prefixed_layouts`).
    fn run_layers_prefixed(
        &self,
        prompts: &Stream,
        responses: &Stream,
        prompt_of: &[usize],
    ) -> Result<(Tensor, Tensor)> {
        // `prefixed_layouts` checked every index against the prompts.
        let index: Vec<u32> = prompt_of.iter().map(|&g| g as u32).collect();
        let index = Tensor::from_vec(index, prompt_of.len(), responses.embeds.device())?;
        let (mut x_prompt, mut x) = (prompts.embeds.clone(), responses.embeds.clone());
        for layer in &self.layers {
            let (out, k, v) = layer.forward_prefixed(&x_prompt, prompts, None)?;
            let (k, v) = (k.index_select(&index, 0)?, v.index_select(&index, 0)?); // (B, Hkv, P, D)
            x = layer.forward_prefixed(&x, responses, Some((&k, &v)))?.0;
            x_prompt = out;
        }
        Ok((self.norm.forward(&x_prompt)?, self.norm.forward(&x)?))
    }

    fn run_layers(
        &self,
        embeds: &Tensor,
        layout: &Layout,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (cos, sin) = self.rotary.cos_sin(&layout.positions, embeds.dtype())?;
        let mut x = embeds.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, &cos, &sin, &layout.mask, i, cache.as_deref_mut())?;
        }
        self.norm.forward(&x)
    }
}

/// Qwen2 with its language-modelling head (`Qwen2ForCausalLM`); `VarBuilder` at the checkpoint
/// root (`model.*`, `lm_head.weight` unless `tie_word_embeddings`).
#[derive(Debug, Clone)]
pub struct ForCausalLM {
    /// The decoder.
    pub model: Model,
    lm_head: Linear,
}

impl ForCausalLM {
    /// Builds the model; a tied head reuses `model.embed_tokens.weight` (the same tensor, so a
    /// trainable embedding gets the gradient of both uses).
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let model = Model::new(cfg, vb.pp("model"))?;
        let lm_head = if cfg.tie_word_embeddings {
            Linear::new(candle_nn::Linear::new(
                model.embedding_weight().clone(),
                None,
            ))
        } else {
            linear_no_bias(cfg.hidden_size, cfg.vocab_size, vb.pp("lm_head"))?
        };
        Ok(Self { model, lm_head })
    }

    /// A decoder and its head, as built elsewhere (Qwen2.5-VL's LLM: the same tensors, shared).
    pub fn from_parts(model: Model, lm_head: Linear) -> Self {
        Self { model, lm_head }
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &Config {
        self.model.config()
    }

    /// input_ids (B, T) u32, mask (B, T) -> logits (B, T, V).
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        self.forward_embeds(&self.model.embed_tokens(input_ids)?, attention_mask)
    }

    /// embeds (B, T, D), mask (B, T) -> logits (B, T, V).
    pub fn forward_embeds(
        &self,
        embeds: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let hidden = self.model.forward_embeds(embeds, attention_mask)?;
        self.lm_head.forward(&hidden)
    }

    /// Incremental forward on embeddings (see [`Model::forward_step`]) -> logits (B, T, V).
    pub fn forward_step(
        &self,
        embeds: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let hidden = self.model.forward_step(embeds, attention_mask, cache)?;
        self.lm_head.forward(&hidden)
    }

    /// Incremental forward (see [`Model::forward_step`]) that returns only the logits after each row's last
    /// slot, (B, V): generation never reads the logits of earlier prompt positions, so the LM head runs on
    /// one position per row.
    pub fn forward_step_last(
        &self,
        embeds: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let t = embeds.dim(1)?;
        if t == 0 {
            return Err(Error::msg("forward_step_last: a step of 0 tokens"));
        }
        let hidden = self.model.forward_step(embeds, attention_mask, cache)?;
        let last = hidden.narrow(1, t - 1, 1)?.squeeze(1)?; // (B, D)
        self.lm_head.forward(&last)
    }

    /// [`Self::forward_step_last`] on token ids (B, T) -> logits (B, V).
    pub fn forward_step_last_ids(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        self.forward_step_last(&self.model.embed_tokens(input_ids)?, attention_mask, cache)
    }

    /// Incremental forward on token ids (B, T) -> logits (B, T, V).
    pub fn forward_step_ids(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        self.forward_step(&self.model.embed_tokens(input_ids)?, attention_mask, cache)
    }

    /// A fresh KV cache sized for this model.
    pub fn new_cache(&self) -> KvCache {
        self.model.new_cache()
    }

    /// Packs every projection and the LM head for fast CPU inference (see [`super::linear`]): f32 CPU forwards
    /// then run the packed kernel, which has no backward, so only pack a model that is not trained. The copies
    /// are taken now: after overwriting weights (`Var::set`), pack again. Weights elsewhere than f32 on the CPU
    /// stay unpacked. Costs a second copy of those weights in memory.
    pub fn pack_weights(&mut self) -> Result<()> {
        self.linears_mut().try_for_each(Linear::pack)
    }

    /// Drops the packed copies (see [`Self::pack_weights`]).
    pub fn unpack_weights(&mut self) {
        self.linears_mut().for_each(Linear::unpack);
    }

    /// Every projection of every layer, then the LM head.
    fn linears_mut(&mut self) -> impl Iterator<Item = &mut Linear> {
        let layers = self
            .model
            .layers
            .iter_mut()
            .flat_map(DecoderLayer::linears_mut);
        layers.chain(std::iter::once(&mut self.lm_head))
    }

    /// Whether the LM head (and so every projection, see [`Self::pack_weights`]) is packed.
    pub fn is_packed(&self) -> bool {
        self.lm_head.is_packed()
    }

    /// Log-probabilities of next tokens, for training: input_ids (B, T), mask (B, T) ->
    /// (B, T-1) f32 where entry t is `log p(ids[t+1] | ids[..=t])`, 0 unless both slot t and
    /// t+1 are real (a row's first real token has no context).
    /// Sum it (times a response mask) for sequence log-probs.
    pub fn token_logprobs(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let t = input_ids.dim(1)?;
        if t < 2 {
            return Err(Error::msg(format!(
                "token_logprobs needs at least 2 tokens per row, got {t}"
            )));
        }
        let logits = self
            .forward(input_ids, attention_mask)?
            .narrow(1, 0, t - 1)?; // (B, T-1, V)
        let targets = input_ids.narrow(1, 1, t - 1)?; // (B, T-1)
        let logprobs = token_logprobs(&logits, &targets)?;
        match attention_mask {
            Some(mask) => {
                let mask = mask.to_dtype(DType::F32)?;
                let both_real = (mask.narrow(1, 0, t - 1)? * mask.narrow(1, 1, t - 1)?)?; // (B, T-1)
                Ok((logprobs * both_real)?)
            }
            None => Ok(logprobs),
        }
    }
}

#[cfg(test)]
#[path = "qwen2_tests.rs"]
mod tests;
