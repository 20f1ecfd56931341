//! The vision-language adapter `mlp1` of InternVL-chat / Skywork-R1V: pixel shuffle, then
//! LayerNorm(4 d_vit) -> Linear(4 d_vit, d_llm) -> GELU -> Linear(d_llm, d_llm).
//!
//! Reference: InternVL `modeling_internvl_chat.py` (`InternVLChatModel.pixel_shuffle`, `extract_feature`,
//! `self.mlp1 = nn.Sequential(nn.LayerNorm(vit_hidden_size * int(1 / self.downsample_ratio) ** 2),
//! nn.Linear(..., llm_hidden_size), nn.GELU(), nn.Linear(llm_hidden_size, llm_hidden_size))`), equal to
//! transformers' `InternVLMultiModalProjector` + `InternVLModel.pixel_shuffle`. Tensor names: `mlp1.0`
//! (LayerNorm), `mlp1.1` and `mlp1.3` (Linear); index 2 is the parameter-free GELU.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use crate::model::linear::{linear_b, Linear};
use crate::{Error, Result};

/// `nn.LayerNorm`'s default epsilon, which `mlp1.0` uses.
const LAYER_NORM_EPS: f64 = 1e-5;

/// Pixel-shuffle flavour (`ps_version`): v2 is the one every released InternVL2+ / R1V model uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PixelShuffleVersion {
    /// The original order (InternVL 1.5 warns that it is a legacy bug).
    V1,
    /// The corrected order, with the final `permute(0, 2, 1, 3)`.
    V2,
}

/// InternVL's `pixel_shuffle` with `scale_factor = 1 / ratio`: x (N, W, H, C) -> (N, W/r, H/r, C r^2).
///
/// ```python
/// n, w, h, c = x.size()
/// x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
/// x = x.permute(0, 2, 1, 3).contiguous()
/// x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
/// if self.ps_version != 'v1': x = x.permute(0, 2, 1, 3).contiguous()
/// ```
pub fn pixel_shuffle(x: &Tensor, ratio: usize, version: PixelShuffleVersion) -> Result<Tensor> {
    let (n, w, h, c) = x.dims4()?;
    if ratio == 0 || !w.is_multiple_of(ratio) || !h.is_multiple_of(ratio) {
        return Err(Error::msg(format!(
            "pixel shuffle: a {w}x{h} feature grid is not divisible by the downsample factor {ratio}"
        )));
    }
    let x = x.reshape((n, w, h / ratio, c * ratio))?; // (N, W, H/r, C r)
    let x = x.permute((0, 2, 1, 3))?.contiguous()?; // (N, H/r, W, C r)
    let x = x.reshape((n, h / ratio, w / ratio, c * ratio * ratio))?; // (N, H/r, W/r, C r^2)
    Ok(match version {
        PixelShuffleVersion::V1 => x,
        PixelShuffleVersion::V2 => x.permute((0, 2, 1, 3))?.contiguous()?, // (N, W/r, H/r, C r^2)
    })
}

/// `mlp1` with the pixel shuffle in front of it.
#[derive(Debug, Clone)]
pub struct Adapter {
    norm_weight: Tensor,
    norm_bias: Tensor,
    linear1: Linear,
    linear2: Linear,
    ratio: usize,
    version: PixelShuffleVersion,
}

impl Adapter {
    /// Builds `mlp1` from `vb` at the `mlp1` prefix. `downsample_ratio` is the config's (0.5: 2x2 patches
    /// become one token of width 4 d_vit).
    pub fn new(
        vit_hidden: usize,
        llm_hidden: usize,
        downsample_ratio: f64,
        version: PixelShuffleVersion,
        vb: VarBuilder,
    ) -> Result<Self> {
        let inverse = 1.0 / downsample_ratio;
        if !(downsample_ratio > 0.0 && (inverse - inverse.round()).abs() < 1e-6) {
            return Err(Error::Config {
                key: "downsample_ratio".into(),
                msg: format!("{downsample_ratio} is not 1/k for an integer k"),
            });
        }
        let ratio = inverse.round() as usize;
        let width = vit_hidden * ratio * ratio;
        Ok(Self {
            norm_weight: vb.get(width, "0.weight")?,
            norm_bias: vb.get(width, "0.bias")?,
            linear1: linear_b(width, llm_hidden, true, vb.pp("1"))?,
            linear2: linear_b(llm_hidden, llm_hidden, true, vb.pp("3"))?,
            ratio,
            version,
        })
    }

    /// Image tokens per tile for a tile of `grid x grid` patches.
    pub fn tokens_per_tile(&self, grid: usize) -> usize {
        (grid / self.ratio) * (grid / self.ratio)
    }

    /// ViT features without CLS (tiles, N, d_vit), N a square, -> image tokens (tiles, N / r^2, d_llm).
    pub fn forward(&self, vit_embeds: &Tensor) -> Result<Tensor> {
        let (tiles, n, c) = vit_embeds.dims3()?;
        // h = w = int(vit_embeds.shape[1] ** 0.5)
        let side = (n as f64).sqrt().round() as usize;
        if side * side != n {
            return Err(Error::msg(format!(
                "adapter: {n} patch features per tile are not a square grid"
            )));
        }
        let grid = vit_embeds.reshape((tiles, side, side, c))?; // (tiles, h, w, C)
        let shuffled = pixel_shuffle(&grid, self.ratio, self.version)?;
        let width = c * self.ratio * self.ratio;
        let xs = shuffled.reshape((tiles, (), width))?; // (tiles, N/r^2, C r^2)
        let xs = r1v2_kernels::layer_norm(
            &xs,
            &self.norm_weight,
            Some(&self.norm_bias),
            LAYER_NORM_EPS,
        )?;
        let xs = self.linear1.forward(&xs)?.gelu_erf()?;
        self.linear2.forward(&xs)
    }
}
