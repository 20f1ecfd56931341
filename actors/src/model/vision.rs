//! InternViT, the vision encoder of InternVL / Skywork-R1V, trainable.
//!
//! Reference: OpenGVLab InternVL `internvl_chat/internvl/model/internvl_chat/modeling_intern_vit.py`
//! (`InternVisionEmbeddings`, `InternAttention`, `InternMLP`, `InternVisionEncoderLayer`,
//! `InternVisionModel`) and its HF-converted twin, transformers' `models/internvl/modeling_internvl.py`
//! (`InternVLVisionModel`), against which `tests/fixtures/gen_internvl.py` checks this file.
//! Two variants share the code: the 300M kind (`norm_type = "layer_norm"`, qkv bias, no q/k norm) and the
//! 6B kind (`norm_type = "rms_norm"`, `qk_normalization = true`).
//!
//! Tensor names follow the InternVL-chat checkpoint under `vision_model.`:
//! `embeddings.{class_embedding, patch_embedding.{weight,bias}, position_embedding}` and
//! `encoder.layers.N.{norm1, norm2, attn.{qkv, proj, q_norm, k_norm}, ls1, ls2, mlp.{fc1, fc2}}`.
//! Every op used has a backward (norms and softmax from `r1v2_kernels`, the patch convolution as a
//! reshape + matmul, bicubic position interpolation as two matmuls with fixed weights).

use candle_core::{DType, Tensor, D};
use candle_nn::VarBuilder;

use crate::model::linear::{linear_b, Linear};

pub use super::vision_config::{NormType, VisionConfig};
use crate::{Error, Result};

/// LayerNorm or RMSNorm over the last dimension, differentiable (`r1v2_kernels`).
#[derive(Debug, Clone)]
pub(crate) enum Norm {
    Layer {
        weight: Tensor,
        bias: Tensor,
        eps: f64,
    },
    Rms {
        weight: Tensor,
        eps: f64,
    },
}

impl Norm {
    pub(crate) fn new(kind: NormType, size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(match kind {
            NormType::LayerNorm => Norm::Layer {
                weight: vb.get(size, "weight")?,
                bias: vb.get(size, "bias")?,
                eps,
            },
            NormType::RmsNorm => Norm::Rms {
                weight: vb.get(size, "weight")?,
                eps,
            },
        })
    }

    pub(crate) fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Norm::Layer { weight, bias, eps } => {
                r1v2_kernels::layer_norm(xs, weight, Some(bias), *eps)?
            }
            Norm::Rms { weight, eps } => r1v2_kernels::rms_norm(xs, weight, *eps)?,
        })
    }
}

/// Cubic-convolution weights of PyTorch's `upsample_bicubic2d` (A = -0.75, align_corners = False,
/// border indices clamped), as an (out, in) matrix so that interpolation is a differentiable matmul.
/// Mirrors aten/src/ATen/native/UpSample.h: `real = scale * (dst + 0.5) - 0.5`, `scale = in / out`,
/// `cubic_convolution1(x) = ((A + 2) x - (A + 3)) x^2 + 1` for |x| <= 1,
/// `cubic_convolution2(x) = ((A x - 5A) x + 8A) x - 4A` for 1 < |x| < 2.
fn bicubic_matrix(in_size: usize, out_size: usize) -> Vec<f32> {
    const A: f64 = -0.75;
    let conv1 = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let conv2 = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    let scale = in_size as f64 / out_size as f64;
    let mut m = vec![0f32; out_size * in_size];
    for dst in 0..out_size {
        let real = scale * (dst as f64 + 0.5) - 0.5;
        let base = real.floor();
        let t = real - base;
        let weights = [conv2(t + 1.0), conv1(t), conv1(1.0 - t), conv2(2.0 - t)];
        for (k, w) in weights.iter().enumerate() {
            let src = (base as i64 - 1 + k as i64).clamp(0, in_size as i64 - 1) as usize;
            m[dst * in_size + src] += *w as f32;
        }
    }
    m
}

/// Bicubic resize of a (g_h, g_w, D) grid to (h, w, D), computed in f32 like the reference
/// (`pos_embed.float()` ... `F.interpolate(..., mode='bicubic', align_corners=False)`).
fn interpolate_bicubic(grid: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (gh, gw, d) = grid.dims3()?;
    let dev = grid.device();
    let a_h = Tensor::from_vec(bicubic_matrix(gh, h), (h, gh), dev)?;
    let a_w = Tensor::from_vec(bicubic_matrix(gw, w), (w, gw), dev)?;
    let x = grid.to_dtype(DType::F32)?.reshape((gh, gw * d))?;
    let x = a_h.matmul(&x)?.reshape((h, gw, d))?; // (h, g_w, D)
    let x = x.transpose(0, 1)?.contiguous()?.reshape((gw, h * d))?; // (g_w, h*D)
    let x = a_w.matmul(&x)?.reshape((w, h, d))?; // (w, h, D)
    Ok(x.transpose(0, 1)?.contiguous()?) // (h, w, D)
}

/// `InternVisionEmbeddings`: patch embedding, CLS token, (interpolated) position embedding.
#[derive(Debug, Clone)]
struct Embeddings {
    class_embedding: Tensor,
    patch_weight: Tensor,
    patch_bias: Tensor,
    position_embedding: Tensor,
    grid: usize,
    patch: usize,
    channels: usize,
    hidden: usize,
}

impl Embeddings {
    fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let (d, p, c, g) = (
            cfg.hidden_size,
            cfg.patch_size,
            cfg.num_channels,
            cfg.grid_size(),
        );
        Ok(Self {
            class_embedding: vb.get((1, 1, d), "class_embedding")?,
            patch_weight: vb.get((d, c, p, p), "patch_embedding.weight")?,
            patch_bias: vb.get(d, "patch_embedding.bias")?,
            position_embedding: vb.get((1, g * g + 1, d), "position_embedding")?,
            grid: g,
            patch: p,
            channels: c,
            hidden: d,
        })
    }

    /// pixel_values (B, C, H, W) -> (B, 1 + (H/p)(W/p), D).
    fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (b, c, h_px, w_px) = pixel_values.dims4()?;
        let p = self.patch;
        if c != self.channels || !h_px.is_multiple_of(p) || !w_px.is_multiple_of(p) {
            return Err(Error::msg(format!(
                "pixel_values: shape ({b}, {c}, {h_px}, {w_px}) needs {} channels and sides divisible by the patch size {p}",
                self.channels
            )));
        }
        let (h, w, d) = (h_px / p, w_px / p, self.hidden);
        let dtype = self.patch_weight.dtype();
        // nn.Conv2d(C, D, kernel_size=p, stride=p) == patchify then matmul.
        let patches = pixel_values.to_dtype(dtype)?.reshape((b, c, h, p, w, p))?; // (B, C, h, p, w, p)
        let patches = patches.permute((0, 2, 4, 1, 3, 5))?.contiguous()?; // (B, h, w, C, p, p)
        let patches = patches.reshape((b, h * w, c * p * p))?; // (B, h*w, C*p*p)
        let kernel = self.patch_weight.reshape((d, c * p * p))?.t()?; // (C*p*p, D)
        let patch_embeds = patches
            .broadcast_matmul(&kernel)?
            .broadcast_add(&self.patch_bias)?; // (B, h*w, D)
        let class_embeds = self.class_embedding.broadcast_as((b, 1, d))?.contiguous()?;
        let embeddings = Tensor::cat(&[&class_embeds, &patch_embeds], 1)?; // (B, 1+h*w, D)

        // position_embedding = cat([pos[:, :1], _get_pos_embed(pos[:, 1:], H, W)], dim=1)
        let cls_pos = self.position_embedding.narrow(1, 0, 1)?; // (1, 1, D)
        let patch_pos = self
            .position_embedding
            .narrow(1, 1, self.grid * self.grid)?;
        let patch_pos = if (h, w) == (self.grid, self.grid) {
            patch_pos
        } else {
            let grid = patch_pos.reshape((self.grid, self.grid, d))?;
            interpolate_bicubic(&grid, h, w)?
                .reshape((1, h * w, d))?
                .to_dtype(dtype)?
        };
        let pos = Tensor::cat(&[&cls_pos, &patch_pos], 1)?; // (1, 1+h*w, D)
        Ok(embeddings.broadcast_add(&pos)?)
    }
}

/// `InternAttention`: fused qkv, optional q/k RMSNorm over the full width, softmax attention, proj.
#[derive(Debug, Clone)]
struct Attention {
    qkv: Linear,
    proj: Linear,
    qk_norm: Option<(Norm, Norm)>,
    num_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let qk_norm = if cfg.qk_normalization {
            let eps = cfg.layer_norm_eps;
            Some((
                Norm::new(NormType::RmsNorm, d, eps, vb.pp("q_norm"))?,
                Norm::new(NormType::RmsNorm, d, eps, vb.pp("k_norm"))?,
            ))
        } else {
            None
        };
        Ok(Self {
            qkv: linear_b(d, 3 * d, cfg.qkv_bias, vb.pp("qkv"))?,
            proj: linear_b(d, d, true, vb.pp("proj"))?,
            qk_norm,
            num_heads: cfg.num_attention_heads,
            head_dim: d / cfg.num_attention_heads,
        })
    }

    /// xs (B, N, D) -> (B, N, D).
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, n, d) = xs.dims3()?;
        let (nh, hd) = (self.num_heads, self.head_dim);
        // qkv = self.qkv(x).reshape(B, N, 3, H, D // H): q, k, v are consecutive thirds of the width.
        let qkv = self.qkv.forward(xs)?; // (B, N, 3D)
        let (mut q, mut k) = (qkv.narrow(D::Minus1, 0, d)?, qkv.narrow(D::Minus1, d, d)?);
        let v = qkv.narrow(D::Minus1, 2 * d, d)?;
        // q = self.q_norm(q.transpose(1, 2).flatten(-2, -1)).view(B_, N_, H_, D_).transpose(1, 2)
        if let Some((q_norm, k_norm)) = &self.qk_norm {
            q = q_norm.forward(&q)?;
            k = k_norm.forward(&k)?;
        }
        let heads = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, n, nh, hd))?.transpose(1, 2)?.contiguous()?) // (B, H, N, Dh)
        };
        let (q, k, v) = (heads(q)?, heads(k)?, heads(v)?);
        // attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1); x = (attn @ v)
        let scale = (hd as f64).powf(-0.5);
        let attn = (q * scale)?.matmul(&k.t()?)?; // (B, H, N, N)
        let attn = r1v2_kernels::softmax_last_dim(&attn)?;
        let out = attn.matmul(&v)?; // (B, H, N, Dh)
        let out = out.transpose(1, 2)?.reshape((b, n, d))?; // (B, N, D)
        self.proj.forward(&out)
    }
}

/// `InternMLP`: fc1, GELU (erf), fc2.
#[derive(Debug, Clone)]
struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            fc1: linear_b(cfg.hidden_size, cfg.intermediate_size, true, vb.pp("fc1"))?,
            fc2: linear_b(cfg.intermediate_size, cfg.hidden_size, true, vb.pp("fc2"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.fc1.forward(xs)?.gelu_erf()?)
    }
}

/// `InternVisionEncoderLayer`: pre-norm attention and MLP, each scaled by a layer-scale vector.
#[derive(Debug, Clone)]
struct EncoderLayer {
    norm1: Norm,
    attn: Attention,
    ls1: Tensor,
    norm2: Norm,
    mlp: Mlp,
    ls2: Tensor,
}

impl EncoderLayer {
    fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let (d, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        Ok(Self {
            norm1: Norm::new(cfg.norm_type, d, eps, vb.pp("norm1"))?,
            attn: Attention::new(cfg, vb.pp("attn"))?,
            ls1: vb.get(d, "ls1")?,
            norm2: Norm::new(cfg.norm_type, d, eps, vb.pp("norm2"))?,
            mlp: Mlp::new(cfg, vb.pp("mlp"))?,
            ls2: vb.get(d, "ls2")?,
        })
    }

    /// hidden_states = hidden_states + self.attn(self.norm1(hidden_states)) * self.ls1
    /// hidden_states = hidden_states + self.mlp(self.norm2(hidden_states)) * self.ls2
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let attn = self
            .attn
            .forward(&self.norm1.forward(xs)?)?
            .broadcast_mul(&self.ls1)?;
        let xs = (xs + attn)?;
        let mlp = self
            .mlp
            .forward(&self.norm2.forward(&xs)?)?
            .broadcast_mul(&self.ls2)?;
        Ok((xs + mlp)?)
    }
}

/// `InternVisionModel`: embeddings then the encoder; no final norm.
#[derive(Debug, Clone)]
pub struct VisionModel {
    embeddings: Embeddings,
    layers: Vec<EncoderLayer>,
    cfg: VisionConfig,
}

impl VisionModel {
    /// Builds the tower from `vb` at the `vision_model` prefix.
    pub fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate("vision_config")?;
        let embeddings = Embeddings::new(cfg, vb.pp("embeddings"))?;
        let vb_layers = vb.pp("encoder").pp("layers");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::new(cfg, vb_layers.pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embeddings,
            layers,
            cfg: cfg.clone(),
        })
    }

    /// The configuration the tower was built from.
    pub fn config(&self) -> &VisionConfig {
        &self.cfg
    }

    /// Hidden states after `select_layer` (python indexing into `hidden_states`, whose entry 0 is the
    /// embeddings: -1 is the last layer), CLS token kept. pixel_values (B, C, H, W) -> (B, 1+N, D).
    pub fn forward_hidden(&self, pixel_values: &Tensor, select_layer: i64) -> Result<Tensor> {
        let total = self.layers.len() as i64 + 1;
        let index = if select_layer < 0 {
            total + select_layer
        } else {
            select_layer
        };
        if !(0..total).contains(&index) {
            return Err(Error::Config {
                key: "select_layer".into(),
                msg: format!(
                    "{select_layer} is out of range for {} layers",
                    self.layers.len()
                ),
            });
        }
        let mut xs = self.embeddings.forward(pixel_values)?;
        for layer in &self.layers[..index as usize] {
            xs = layer.forward(&xs)?;
        }
        Ok(xs)
    }

    /// The features the adapter reads (`extract_feature`: `vit_embeds[:, 1:, :]`):
    /// pixel_values (B, C, H, W) -> (B, N, D) with the CLS token dropped.
    pub fn forward(&self, pixel_values: &Tensor, select_layer: i64) -> Result<Tensor> {
        let hidden = self.forward_hidden(pixel_values, select_layer)?;
        let n = hidden.dim(1)?;
        Ok(hidden.narrow(1, 1, n - 1)?)
    }
}

#[cfg(test)]
mod tests {
    use super::bicubic_matrix;

    #[test]
    fn bicubic_rows_sum_to_one_and_same_size_is_identity() {
        for (n_in, n_out) in [(4, 6), (6, 4), (32, 45), (3, 3)] {
            let m = bicubic_matrix(n_in, n_out);
            for row in m.chunks(n_in) {
                let sum: f32 = row.iter().sum();
                assert!(
                    (sum - 1.0).abs() < 1e-6,
                    "row sum {sum} for {n_in}->{n_out}"
                );
            }
        }
        let m = bicubic_matrix(5, 5);
        for (i, row) in m.chunks(5).enumerate() {
            for (j, v) in row.iter().enumerate() {
                assert_eq!(*v, if i == j { 1.0 } else { 0.0 });
            }
        }
    }
}
