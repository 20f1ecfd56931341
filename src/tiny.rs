//! Random tiny models in the real checkpoint layouts, for CI, the demo and tests: an InternVL-chat policy
//! (InternViT + `mlp1` + Qwen2), a Qwen2ForSequenceClassification reward model, and Qwen2.5-VL as a reward
//! model (value head) or a policy (LM head), all with the shipped 328-id byte-level BPE tokenizer
//! (`tests/fixtures/preprocess/tokenizer.json`, embedded; Qwen2.5-VL adds its four vision tokens).
//!
//! The weights are drawn once from a seeded ChaCha stream in sorted-name order (normal(0, 0.02) for
//! matrices, ones for norm weights, zeros for biases), so a seed always gives the same model. The directories
//! are ordinary checkpoints: `r1v2 inspect`, `r1v2 forward` and `ChatModel::load` read them.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use r1v2_actors::model::chat::ChatModel;
use r1v2_actors::model::chat_config::ChatConfig;
use r1v2_actors::model::qwen2;
use r1v2_actors::model::value_head::ValueModel;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::config::TinySpec;
use crate::{Error, Result};

/// The shipped tokenizer: 320 byte-level BPE ids + 8 special tokens (`<|im_end|>` = 322, `<IMG_CONTEXT>` = 325).
pub const TOKENIZER_JSON: &str = include_str!("../tests/fixtures/preprocess/tokenizer.json");

/// Vocabulary size of [`TOKENIZER_JSON`].
pub const VOCAB_SIZE: usize = 328;

fn llm_config(spec: &TinySpec, architecture: &str) -> serde_json::Value {
    let heads = (spec.hidden / 16).max(2);
    serde_json::json!({
        "architectures": [architecture],
        "model_type": "qwen2",
        "vocab_size": VOCAB_SIZE,
        "hidden_size": spec.hidden,
        "intermediate_size": spec.hidden * 2,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads / 2,
        "hidden_act": "silu",
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": false,
        "use_sliding_window": false,
        "eos_token_id": 322,
        "pad_token_id": 320,
        "torch_dtype": "float32"
    })
}

/// The InternVL-chat `config.json` of a tiny policy.
pub fn chat_config_json(spec: &TinySpec) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "downsample_ratio": 0.5,
        "select_layer": -1,
        "ps_version": "v2",
        "force_image_size": spec.image_size,
        "template": "internvl2_5",
        "dynamic_image_size": false,
        "max_dynamic_patch": 1,
        "min_dynamic_patch": 1,
        "use_thumbnail": false,
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "model_type": "intern_vit_6b",
            "hidden_size": spec.vision_hidden,
            "num_hidden_layers": spec.vision_layers,
            "num_attention_heads": 2,
            "intermediate_size": spec.vision_hidden * 2,
            "image_size": spec.image_size,
            "patch_size": 14,
            "num_channels": 3,
            "qkv_bias": true,
            "qk_normalization": false,
            "norm_type": "layer_norm",
            "layer_norm_eps": 1e-6,
            "hidden_act": "gelu",
            "drop_path_rate": 0.0,
            "initializer_factor": 1.0,
            "use_flash_attn": false
        },
        "llm_config": llm_config(spec, "Qwen2ForCausalLM")
    })
}

/// Fills every variable of `varmap` from one seeded stream, in sorted-name order.
fn randomise(varmap: &VarMap, seed: u64) -> Result<Vec<(String, Tensor)>> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| Error::Msg("tiny model: poisoned var map".into()))?;
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // Normal::new fails only for a negative or non-finite std.
    let normal = Normal::new(0.0f32, 0.02).map_err(|e| Error::Msg(e.to_string()))?;
    let mut tensors = Vec::with_capacity(names.len());
    for name in names {
        let var = &data[name];
        let shape = var.shape().clone();
        let count = shape.elem_count();
        // Norm weights (also the adapter's `mlp1.0` LayerNorm and Qwen2.5-VL's merger `ln_q`, whose names
        // do not say so) and InternViT's layer scales start at one.
        let is_one = (name.contains("norm") && name.ends_with("weight"))
            || name.ends_with("mlp1.0.weight")
            || name.ends_with("ln_q.weight")
            || name.ends_with("ls1")
            || name.ends_with("ls2");
        let values: Vec<f32> = if name.ends_with(".bias") {
            vec![0.0; count]
        } else if is_one {
            vec![1.0; count]
        } else {
            (0..count).map(|_| normal.sample(&mut rng)).collect()
        };
        let tensor = Tensor::from_vec(values, shape, &Device::Cpu)?;
        var.set(&tensor)?;
        tensors.push((name.clone(), tensor));
    }
    Ok(tensors)
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    // A serde_json::Value always serialises.
    let text = serde_json::to_string_pretty(value).unwrap_or_default();
    std::fs::write(path, text).map_err(|source| Error::Io {
        path: path.into(),
        source,
    })
}

fn write_weights(dir: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let path = dir.join("model.safetensors");
    let map: std::collections::HashMap<String, Tensor> = tensors.iter().cloned().collect();
    candle_core::safetensors::save(&map, &path)?;
    Ok(())
}

fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.into(),
        source,
    })
}

/// Writes a random tiny InternVL-chat policy (config.json, model.safetensors, tokenizer.json) to `dir`.
pub fn write_chat_model(dir: &Path, spec: &TinySpec) -> Result<()> {
    create_dir(dir)?;
    let config_json = chat_config_json(spec);
    let config: ChatConfig = serde_json::from_value(config_json.clone())
        .map_err(|e| Error::Msg(format!("tiny chat config: {e}")))?;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    ChatModel::new(&config, vb)?;
    let tensors = randomise(&varmap, spec.seed)?;
    write_json(&dir.join("config.json"), &config_json)?;
    write_weights(dir, &tensors)?;
    write_tokenizer(dir)
}

/// Writes a random tiny reward model (Qwen2ForSequenceClassification, `score.weight`) to `dir`.
pub fn write_reward_model(dir: &Path, spec: &TinySpec) -> Result<()> {
    create_dir(dir)?;
    let config_json = llm_config(spec, "Qwen2ForSequenceClassification");
    let config: qwen2::Config = serde_json::from_value(config_json.clone())
        .map_err(|e| Error::Msg(format!("tiny reward model config: {e}")))?;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    ValueModel::new(&config, vb)?;
    let tensors = randomise(&varmap, spec.seed)?;
    write_json(&dir.join("config.json"), &config_json)?;
    write_weights(dir, &tensors)?;
    write_tokenizer(dir)
}

/// The vision tokens of a tiny Qwen2.5-VL reward model, appended to [`TOKENIZER_JSON`]'s vocabulary.
const VL_TOKENS: [&str; 4] = [
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
];

/// A random tiny reward model in the Skywork-VL Reward layout (Qwen2.5-VL + `value_head.safetensors`) that
/// reads images: the policy's tokenizer plus the four vision tokens (ids 328..=331), a 2-block vision tower
/// with window attention, a value head. Reproducible from `spec.seed`.
pub fn write_vl_reward_model(dir: &Path, spec: &TinySpec) -> Result<()> {
    write_vl_model(dir, spec, VlHead::Value)
}

/// A random tiny Qwen2.5-VL policy (`Qwen2_5_VLForConditionalGeneration` with `lm_head.weight`, no value
/// head), otherwise as [`write_vl_reward_model`]. Reproducible from `spec.seed`.
pub fn write_vl_policy_model(dir: &Path, spec: &TinySpec) -> Result<()> {
    write_vl_model(dir, spec, VlHead::Lm)
}

/// Which head a tiny Qwen2.5-VL gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VlHead {
    /// TRL's value head in `value_head.safetensors` (a reward model).
    Value,
    /// The LM head `lm_head.weight` (a policy).
    Lm,
}

fn write_vl_model(dir: &Path, spec: &TinySpec, head_kind: VlHead) -> Result<()> {
    create_dir(dir)?;
    let heads = (spec.hidden / 16).max(2);
    let id = |i: usize| VOCAB_SIZE + i;
    let config_json = serde_json::json!({
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "vocab_size": VOCAB_SIZE + VL_TOKENS.len(),
        "hidden_size": spec.hidden,
        "intermediate_size": spec.hidden * 2,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": heads,
        "num_key_value_heads": (heads / 2).max(1),
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "rope_theta": 10000.0,
        // head_dim / 2 rotary pairs split over (time, height, width).
        "rope_scaling": {"type": "mrope", "mrope_section": mrope_section(spec.hidden / heads)},
        "tie_word_embeddings": false,
        "vision_start_token_id": id(0),
        "vision_end_token_id": id(1),
        "image_token_id": id(2),
        "video_token_id": id(3),
        "torch_dtype": "float32",
        "vision_config": {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "out_hidden_size": spec.hidden,
            "fullatt_block_indexes": [1],
            "hidden_act": "silu",
            "in_chans": 3
        }
    });
    let config = r1v2_actors::model::qwen2_5_vl::Config::from_value(&config_json)?;
    let (model, head) = (VarMap::new(), VarMap::new());
    let model_vb = VarBuilder::from_varmap(&model, DType::F32, &Device::Cpu);
    if head_kind == VlHead::Lm {
        candle_nn::linear_no_bias(
            spec.hidden,
            VOCAB_SIZE + VL_TOKENS.len(),
            model_vb.pp("lm_head"),
        )?;
    }
    r1v2_actors::model::qwen2_5_vl::Qwen25Vl::new(
        &config,
        model_vb,
        (head_kind == VlHead::Value)
            .then(|| VarBuilder::from_varmap(&head, DType::F32, &Device::Cpu)),
    )?;
    write_json(&dir.join("config.json"), &config_json)?;
    write_weights(dir, &randomise(&model, spec.seed)?)?;
    if head_kind == VlHead::Value {
        let head: std::collections::HashMap<String, Tensor> =
            randomise(&head, spec.seed + 1)?.into_iter().collect();
        candle_core::safetensors::save(&head, dir.join("value_head.safetensors"))?;
    }
    write_json(
        &dir.join("preprocessor_config.json"),
        &serde_json::json!({
            "min_pixels": 56 * 56,
            "max_pixels": 112 * 112,
            "patch_size": 14,
            "merge_size": 2,
            "temporal_patch_size": 2,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "image_processor_type": "Qwen2VLImageProcessor"
        }),
    )?;
    let mut tokenizer: serde_json::Value = serde_json::from_str(TOKENIZER_JSON)
        .map_err(|e| Error::Msg(format!("tiny tokenizer: {e}")))?;
    let added = tokenizer["added_tokens"]
        .as_array_mut()
        .ok_or_else(|| Error::Msg("tiny tokenizer: no added_tokens".into()))?;
    for (i, token) in VL_TOKENS.iter().enumerate() {
        added.push(serde_json::json!({
            "id": id(i), "content": token, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true
        }));
    }
    write_json(&dir.join("tokenizer.json"), &tokenizer)
}

/// Qwen2.5-VL's split of `head_dim / 2` rotary pairs over (time, height, width): time a quarter, the rest
/// shared by height and width (Qwen2.5-VL-7B: head_dim 128 -> [16, 24, 24]).
fn mrope_section(head_dim: usize) -> [usize; 3] {
    let pairs = head_dim / 2;
    let time = pairs / 4;
    let height = (pairs - time) / 2;
    [time, height, pairs - time - height]
}

fn write_tokenizer(dir: &Path) -> Result<()> {
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, TOKENIZER_JSON).map_err(|source| Error::Io { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use r1v2_actors::model::chat::Trainable;

    #[test]
    fn tiny_chat_model_loads_and_is_reproducible() {
        let dir = tempfile::tempdir().unwrap();
        let spec = TinySpec::default();
        write_chat_model(&dir.path().join("a"), &spec).unwrap();
        write_chat_model(&dir.path().join("b"), &spec).unwrap();
        let a = std::fs::read(dir.path().join("a/model.safetensors")).unwrap();
        let b = std::fs::read(dir.path().join("b/model.safetensors")).unwrap();
        assert_eq!(a, b, "same seed, same bytes");
        let loaded = ChatModel::load(
            &dir.path().join("a"),
            DType::F32,
            &Device::Cpu,
            Trainable::default(),
        )
        .unwrap();
        assert!(loaded.unexpected.is_empty());
        assert_eq!(loaded.model.img_context_token_id(), Some(325));
        assert_eq!(loaded.model.tokens_per_tile(), 4);
        let other = TinySpec { seed: 1, ..spec };
        write_chat_model(&dir.path().join("c"), &other).unwrap();
        let c = std::fs::read(dir.path().join("c/model.safetensors")).unwrap();
        assert_ne!(a, c, "another seed, other weights");
    }
}
