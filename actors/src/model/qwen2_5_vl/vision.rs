//! The Qwen2.5-VL vision tower (transformers `Qwen2_5_VisionTransformerPretrainedModel`): a Conv3d patch
//! embedding over (temporal 2, 14 x 14) patches, blocks of RMSNorm + attention with 2D rotary embeddings +
//! RMSNorm + SwiGLU MLP (biased), windowed attention except in `fullatt_block_indexes`, and the patch merger
//! (RMSNorm, 2 x 2 patches -> Linear, GELU, Linear).
//!
//! Tensor names under `visual.`: `patch_embed.proj.weight`, `blocks.N.{norm1, norm2, attn.{qkv, proj},
//! mlp.{gate_proj, up_proj, down_proj}}`, `merger.{ln_q, mlp.0, mlp.2}`. Input patches arrive flattened as
//! the image processor writes them (channel, temporal, row, column), so the convolution is one matmul.
//!
//! Reference (transformers `modeling_qwen2_5_vl.py`): `get_window_index` pads each image's merged grid to
//! whole windows of `window_size / merge / patch` merged patches, orders the merged patches window by window
//! (the blocks run in that order) and `merger` output is put back with the inverse order; `rot_pos_emb` gives
//! each patch the angles `(row * inv_freq, col * inv_freq)` with rows and columns walked in 2 x 2 merge
//! blocks. Every op has a backward (norms and softmax from `r1v2_kernels`).

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::model::linear::{linear, Linear};
use r1v2_kernels::{rope, softmax_last_dim, swiglu};

use super::config::VisionConfig;
use crate::model::vision::Norm;
use crate::model::vision_config::NormType;
use crate::{Error, Result};

/// The RMSNorm epsilon transformers hard-codes for the vision tower.
const VISION_EPS: f64 = 1e-6;

#[derive(Debug, Clone)]
struct Attention {
    qkv: Linear,
    proj: Linear,
    num_heads: usize,
}

impl Attention {
    /// x (N, C) -> (N, C): attention inside each `[start, end)` of `segments`.
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        segments: &[(usize, usize)],
    ) -> Result<Tensor> {
        let (n, c) = x.dims2()?;
        let (h, d) = (self.num_heads, c / self.num_heads);
        let qkv = self.qkv.forward(x)?.reshape((n, 3, h, d))?; // (N, 3, H, D)
        let qkv = qkv.permute((1, 2, 0, 3))?; // (3, H, N, D)
        let part = |i: usize| -> Result<Tensor> { Ok(qkv.get(i)?.unsqueeze(0)?.contiguous()?) }; // (1, H, N, D)
        let q = rope(&part(0)?, cos, sin)?;
        let k = rope(&part(1)?, cos, sin)?;
        let v = part(2)?;
        let scale = 1.0 / (d as f64).sqrt();
        let softmax_dtype = if v.dtype() == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let mut outs = Vec::with_capacity(segments.len());
        for &(start, end) in segments {
            let len = end - start;
            let q = q.narrow(2, start, len)?; // (1, H, L, D)
            let k = k.narrow(2, start, len)?;
            let v = v.narrow(2, start, len)?;
            let scores = (q.matmul(&k.t()?)? * scale)?; // (1, H, L, L)
            let probs = softmax_last_dim(&scores.to_dtype(softmax_dtype)?)?.to_dtype(v.dtype())?;
            outs.push(probs.matmul(&v)?); // (1, H, L, D)
        }
        let out = Tensor::cat(&outs, 2)?; // (1, H, N, D)
        let out = out.squeeze(0)?.transpose(0, 1)?.reshape((n, c))?; // (N, H*D)
        self.proj.forward(&out)
    }
}

#[derive(Debug, Clone)]
struct Block {
    norm1: Norm,
    norm2: Norm,
    attn: Attention,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Block {
    fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let (c, inter) = (cfg.hidden_size, cfg.intermediate_size);
        let mlp = vb.pp("mlp");
        Ok(Self {
            norm1: Norm::new(NormType::RmsNorm, c, VISION_EPS, vb.pp("norm1"))?,
            norm2: Norm::new(NormType::RmsNorm, c, VISION_EPS, vb.pp("norm2"))?,
            attn: Attention {
                qkv: linear(c, 3 * c, vb.pp("attn").pp("qkv"))?,
                proj: linear(c, c, vb.pp("attn").pp("proj"))?,
                num_heads: cfg.num_heads,
            },
            gate_proj: linear(c, inter, mlp.pp("gate_proj"))?,
            up_proj: linear(c, inter, mlp.pp("up_proj"))?,
            down_proj: linear(inter, c, mlp.pp("down_proj"))?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        segments: &[(usize, usize)],
    ) -> Result<Tensor> {
        let x = (x + self
            .attn
            .forward(&self.norm1.forward(x)?, cos, sin, segments)?)?;
        let normed = self.norm2.forward(&x)?;
        let gated = swiglu(
            &self.gate_proj.forward(&normed)?,
            &self.up_proj.forward(&normed)?,
        )?;
        Ok((&x + self.down_proj.forward(&gated)?)?)
    }
}

/// Where the patches of a batch of images go: the window order and the attention segments.
#[derive(Debug, Clone, PartialEq)]
pub struct PatchLayout {
    /// Merged-patch index (in the processor's order) of each position in window order.
    pub window_index: Vec<usize>,
    /// Patch (unmerged) ranges of the attention windows, in window order.
    pub windows: Vec<(usize, usize)>,
    /// Patch ranges of whole frames (full attention), in window order.
    pub frames: Vec<(usize, usize)>,
    /// (row, column) of each patch, in window order (for the 2D rotary angles).
    pub rows_cols: Vec<(usize, usize)>,
}

impl PatchLayout {
    /// transformers' `get_window_index` and `rot_pos_emb` for images of `grids` = (t, h, w) patches.
    pub fn new(cfg: &VisionConfig, grids: &[[usize; 3]]) -> Result<Self> {
        let merge = cfg.spatial_merge_size;
        let unit = merge * merge;
        let window = cfg.window_size / merge / cfg.patch_size; // merged patches per window side
        let (mut window_index, mut windows, mut frames, mut rows_cols) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut merged_base = 0;
        for (image, &[t, h, w]) in grids.iter().enumerate() {
            if t == 0 || h == 0 || w == 0 || h % merge != 0 || w % merge != 0 {
                return Err(Error::msg(format!(
                    "image {image}: grid (t, h, w) = ({t}, {h}, {w}) is not a positive multiple of the merge size {merge}"
                )));
            }
            let (mh, mw) = (h / merge, w / merge);
            // As the reference: pad = window - m % window, a whole empty window when m divides evenly.
            let (wh, ww) = (
                (mh + window - mh % window) / window,
                (mw + window - mw % window) / window,
            );
            for frame in 0..t {
                let frame_start = window_index.len() * unit;
                for win_r in 0..wh {
                    for win_c in 0..ww {
                        let start = window_index.len() * unit;
                        for r in win_r * window..((win_r + 1) * window).min(mh) {
                            for c in win_c * window..((win_c + 1) * window).min(mw) {
                                window_index.push(merged_base + frame * mh * mw + r * mw + c);
                                for (dr, dc) in
                                    (0..merge).flat_map(|i| (0..merge).map(move |j| (i, j)))
                                {
                                    rows_cols.push((r * merge + dr, c * merge + dc));
                                }
                            }
                        }
                        let end = window_index.len() * unit;
                        if end > start {
                            windows.push((start, end));
                        }
                    }
                }
                frames.push((frame_start, window_index.len() * unit));
            }
            merged_base += t * mh * mw;
        }
        Ok(Self {
            window_index,
            windows,
            frames,
            rows_cols,
        })
    }

    /// Number of patches.
    pub fn num_patches(&self) -> usize {
        self.rows_cols.len()
    }
}

/// The vision tower; `VarBuilder` at `visual`.
#[derive(Debug, Clone)]
pub struct VisionTower {
    /// Conv3d weight as a matrix (C_out, channels * temporal * patch * patch).
    patch_weight: Tensor,
    blocks: Vec<Block>,
    ln_q: Norm,
    merger_fc1: Linear,
    merger_fc2: Linear,
    cfg: VisionConfig,
}

impl VisionTower {
    /// Builds the tower from `vb` (at the checkpoint's `visual` prefix).
    pub fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let (c, k) = (cfg.hidden_size, cfg.patch_size);
        let patch_weight = vb
            .pp("patch_embed")
            .pp("proj")
            .get(
                (c, cfg.in_channels, cfg.temporal_patch_size, k, k),
                "weight",
            )?
            .reshape((c, cfg.patch_len()))?;
        let blocks = (0..cfg.depth)
            .map(|i| Block::new(cfg, vb.pp("blocks").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let merger = vb.pp("merger");
        let merged = c * cfg.spatial_merge_size * cfg.spatial_merge_size;
        Ok(Self {
            patch_weight,
            blocks,
            ln_q: Norm::new(NormType::RmsNorm, c, VISION_EPS, merger.pp("ln_q"))?,
            merger_fc1: linear(merged, merged, merger.pp("mlp").pp("0"))?,
            merger_fc2: linear(merged, cfg.out_hidden_size, merger.pp("mlp").pp("2"))?,
            cfg: cfg.clone(),
        })
    }

    /// The configuration the tower was built from.
    pub fn config(&self) -> &VisionConfig {
        &self.cfg
    }

    /// cos, sin (N, head_dim / 2) f32 of the patches in window order:
    /// `[row * inv_freq, col * inv_freq]`, `inv_freq_i = 10000^(-2i / (head_dim / 2))`.
    fn rotary(&self, layout: &PatchLayout, device: &Device) -> Result<(Tensor, Tensor)> {
        let dim = self.cfg.head_dim() / 2;
        let inv_freq: Vec<f32> = (0..dim / 2)
            .map(|i| 1.0 / 10_000f32.powf((2 * i) as f32 / dim as f32))
            .collect();
        let mut angles = Vec::with_capacity(layout.num_patches() * dim);
        for &(row, col) in &layout.rows_cols {
            angles.extend(inv_freq.iter().map(|f| row as f32 * f));
            angles.extend(inv_freq.iter().map(|f| col as f32 * f));
        }
        let angles = Tensor::from_vec(angles, (layout.num_patches(), dim), device)?;
        Ok((angles.cos()?, angles.sin()?))
    }

    /// pixel_values (N, channels * temporal * patch * patch), the patches of every image in the processor's
    /// order, and each image's (t, h, w) grid -> merged image tokens (N / merge^2, out_hidden_size), images
    /// one after another.
    pub fn forward(&self, pixel_values: &Tensor, grids: &[[usize; 3]]) -> Result<Tensor> {
        let layout = PatchLayout::new(&self.cfg, grids)?;
        let (n, len) = pixel_values.dims2()?;
        if n != layout.num_patches() || len != self.cfg.patch_len() {
            return Err(Error::msg(format!(
                "pixel_values are ({n}, {len}) but the grids {grids:?} need ({}, {})",
                layout.num_patches(),
                self.cfg.patch_len()
            )));
        }
        let unit = self.cfg.spatial_merge_size * self.cfg.spatial_merge_size;
        let device = pixel_values.device();
        let dtype = self.patch_weight.dtype();
        let x = pixel_values
            .to_dtype(dtype)?
            .matmul(&self.patch_weight.t()?)?; // (N, C)
        let c = x.dim(1)?;
        // Window order: merged patches (groups of `unit` consecutive patches) reordered.
        let order = Tensor::from_vec(
            layout
                .window_index
                .iter()
                .map(|&i| i as u32)
                .collect::<Vec<_>>(),
            n / unit,
            device,
        )?;
        let mut x = x
            .reshape((n / unit, unit * c))?
            .index_select(&order, 0)?
            .reshape((n, c))?; // (N, C) in window order
        let (cos, sin) = self.rotary(&layout, device)?;
        let (cos, sin) = (cos.to_dtype(dtype)?, sin.to_dtype(dtype)?);
        for (i, block) in self.blocks.iter().enumerate() {
            let segments = if self.cfg.fullatt_block_indexes.contains(&i) {
                &layout.frames
            } else {
                &layout.windows
            };
            x = block.forward(&x, &cos, &sin, segments)?;
        }
        // Merger: (N, C) -> (N / unit, unit * C) -> (N / unit, D).
        let merged = self.ln_q.forward(&x)?.reshape((n / unit, unit * c))?;
        let merged = self.merger_fc1.forward(&merged)?.gelu_erf()?;
        let merged = self.merger_fc2.forward(&merged)?;
        // Back to the processor's order.
        let mut inverse = vec![0u32; n / unit];
        for (pos, &i) in layout.window_index.iter().enumerate() {
            inverse[i] = pos as u32;
        }
        let inverse = Tensor::from_vec(inverse, n / unit, device)?;
        Ok(merged.index_select(&inverse, 0)?)
    }
}
