//! The InternVL-chat / Skywork-R1V model: `y = f_llm(f_adapter(f_vit(image)), text)`, with
//! per-module freezing.
//!
//! Reference: InternVL `modeling_internvl_chat.py` (`InternVLChatModel.forward`):
//!
//! ```python
//! input_embeds = self.language_model.get_input_embeddings()(input_ids)
//! vit_embeds = self.extract_feature(pixel_values)
//! ...
//! selected = (input_ids == self.img_context_token_id)
//! input_embeds[selected] = input_embeds[selected] * 0.0 + vit_embeds.reshape(-1, C)
//! ```
//!
//! Checkpoint layout: `vision_model.*` ([`VisionModel`]), `mlp1.*` ([`Adapter`]), `language_model.*`
//! (a Qwen2ForCausalLM). Which of the three get trainable [`Var`]s is decided by [`Trainable`] when the
//! checkpoint is loaded, so that an optimizer only ever sees the trainable parameters.

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;

use super::adapter::Adapter;
use super::chat_config::ChatConfig;
use super::qwen2::ForCausalLM;
use super::vision::VisionModel;
use super::weights::WeightStore;
use crate::{Error, Result};

/// The name InternVL's tokenizer gives the image placeholder token.
pub const IMG_CONTEXT_TOKEN: &str = "<IMG_CONTEXT>";

/// Which modules train; the rest are loaded as plain tensors that gradients never reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Trainable {
    /// The InternViT tower (`vision_model.*`); Qwen2.5-VL's vision tower (`visual.*` but the merger).
    pub vision: bool,
    /// The `mlp1` adapter; Qwen2.5-VL's patch merger (`visual.merger.*`).
    pub adapter: bool,
    /// The LLM (`language_model.*`); Qwen2.5-VL's LLM and LM head (`model.*` but `model.visual.*`,
    /// `lm_head.*`).
    pub llm: bool,
}

impl Default for Trainable {
    /// Adapter only: the best setting of the R1V2 paper's Table 4.
    fn default() -> Self {
        Self {
            vision: false,
            adapter: true,
            llm: false,
        }
    }
}

impl Trainable {
    /// Nothing trains (inference, reference policies).
    pub fn frozen() -> Self {
        Self {
            vision: false,
            adapter: false,
            llm: false,
        }
    }

    /// Whether the checkpoint tensor `name` is trainable under this setting, in the InternVL-chat layout
    /// or either Qwen2.5-VL layout (released: `visual.*`, `model.*`; transformers 5: `model.visual.*`,
    /// `model.language_model.*`; both `lm_head.*`). The families' names do not overlap.
    pub fn contains(&self, name: &str) -> bool {
        let visual = name
            .strip_prefix("model.")
            .unwrap_or(name)
            .strip_prefix("visual.");
        let merger = visual.is_some_and(|rest| rest.starts_with("merger."));
        let vision = name.starts_with("vision_model.") || (visual.is_some() && !merger);
        let adapter = name.starts_with("mlp1.") || merger;
        let llm = name.starts_with("language_model.")
            || name.starts_with("lm_head.")
            || (name.starts_with("model.") && visual.is_none());
        (self.vision && vision) || (self.adapter && adapter) || (self.llm && llm)
    }
}

/// A loaded chat model with the handles training needs.
pub struct LoadedChat {
    /// The model.
    pub model: ChatModel,
    /// The trainable parameters, by checkpoint name (what the optimizer gets).
    pub trainable_vars: Vec<(String, Var)>,
    /// The store the model reads from (current values of every tensor, for saving).
    pub store: WeightStore,
    /// Checkpoint tensors the model did not use (reported with a warning when loading).
    pub unexpected: Vec<String>,
}

/// Files besides the weights that make a checkpoint directory usable (copied by [`LoadedChat::save`]).
const SIDE_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "preprocessor_config.json",
    "chat_template.json",
];

impl LoadedChat {
    /// Parameter counts per module, in checkpoint order: `vision_model`, `mlp1`, `language_model`
    /// (and any other top-level prefix the checkpoint has), for `r1v2 inspect`.
    pub fn parameter_counts(&self) -> Vec<(String, usize)> {
        let mut counts: Vec<(String, usize)> = Vec::new();
        for (name, shape) in self.store.shapes() {
            let module = name.split('.').next().unwrap_or(&name).to_string();
            match counts.iter_mut().find(|(m, _)| *m == module) {
                Some((_, n)) => *n += shape.elem_count(),
                None => counts.push((module, shape.elem_count())),
            }
        }
        counts
    }

    /// Writes the current weights (trained Vars included) in the checkpoint's layout and dtype to `dir`,
    /// sharded like `save_pretrained` above `max_shard_bytes`, with the source's config.json and
    /// tokenizer files.
    pub fn save(&self, dir: &Path, max_shard_bytes: usize) -> Result<()> {
        save_model_dir(&self.store, dir, max_shard_bytes)
    }
}

/// Writes every tensor of `store` (trained Vars included) in its layout and dtype to `dir`, sharded like
/// `save_pretrained` above `max_shard_bytes`, with the source directory's config, tokenizer and processor
/// files.
pub(crate) fn save_model_dir(
    store: &WeightStore,
    dir: &Path,
    max_shard_bytes: usize,
) -> Result<()> {
    store.save(dir, store.dtype(), max_shard_bytes)?;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    for name in SIDE_FILES {
        let (source, target) = (store.dir().join(name), dir.join(name));
        // Saving over the source directory: the file is already there (and copying a file onto
        // itself would truncate it).
        let same = match (source.canonicalize(), target.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        };
        if source.is_file() && !same {
            std::fs::copy(&source, &target).map_err(io(&target))?;
        }
    }
    Ok(())
}

/// InternVL-chat: InternViT, `mlp1`, Qwen2.
#[derive(Debug, Clone)]
pub struct ChatModel {
    /// The vision tower.
    pub vision: VisionModel,
    /// The adapter.
    pub adapter: Adapter,
    /// The language model.
    pub llm: ForCausalLM,
    config: ChatConfig,
    img_context_token_id: Option<u32>,
}

impl ChatModel {
    /// Builds the model from `vb` at the checkpoint root.
    pub fn new(config: &ChatConfig, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        let llm_config = config.llm()?;
        let vision = VisionModel::new(&config.vision_config, vb.pp("vision_model"))?;
        let adapter = Adapter::new(
            config.vision_config.hidden_size,
            llm_config.hidden_size,
            config.downsample_ratio,
            config.pixel_shuffle_version()?,
            vb.pp("mlp1"),
        )?;
        let llm = ForCausalLM::new(&llm_config, vb.pp("language_model"))?;
        Ok(Self {
            vision,
            adapter,
            llm,
            config: config.clone(),
            img_context_token_id: None,
        })
    }

    /// Loads `dir` (config.json + model.safetensors or a sharded index) in `dtype` on `device`;
    /// the tensors selected by `trainable` come back as [`Var`]s. The IMG_CONTEXT token id is read from
    /// `dir/tokenizer.json` when there is one (else set it with [`Self::set_img_context_token_id`]).
    pub fn load(
        dir: &Path,
        dtype: DType,
        device: &Device,
        trainable: Trainable,
    ) -> Result<LoadedChat> {
        let config = ChatConfig::from_file(&dir.join("config.json"))?;
        let store = WeightStore::load(dir, dtype, device)?;
        let vb = store.var_builder(move |name| trainable.contains(name));
        let mut model = Self::new(&config, vb)?;
        model.img_context_token_id = img_context_id_from_tokenizer(&dir.join("tokenizer.json"))?;
        let unexpected = store.report_unexpected();
        let trainable_vars = store.trainable_vars();
        Ok(LoadedChat {
            model,
            trainable_vars,
            store,
            unexpected,
        })
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &ChatConfig {
        &self.config
    }

    /// The token id whose embeddings are replaced by image features, if known.
    pub fn img_context_token_id(&self) -> Option<u32> {
        self.img_context_token_id
    }

    /// Sets the IMG_CONTEXT token id (the tokenizer's id of [`IMG_CONTEXT_TOKEN`]).
    pub fn set_img_context_token_id(&mut self, id: u32) {
        self.img_context_token_id = Some(id);
    }

    /// Image tokens one tile gives (`num_image_token`, 256 for 448 px tiles).
    pub fn tokens_per_tile(&self) -> usize {
        self.config.num_image_token()
    }

    /// `extract_feature`: pixel_values (tiles, 3, S, S) -> image tokens (tiles, tokens_per_tile, D_llm).
    pub fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let vit = self
            .vision
            .forward(pixel_values, self.config.select_layer)?; // (tiles, N, D_vit)
        self.adapter.forward(&vit)
    }

    /// Input embeddings (B, T, D) for input_ids (B, T), the IMG_CONTEXT positions (in row-major order)
    /// replaced by the image tokens of `pixel_values` (tiles in the same order). It is an error when
    /// the number of IMG_CONTEXT positions is not tiles x tokens_per_tile.
    pub fn embed(&self, input_ids: &Tensor, pixel_values: Option<&Tensor>) -> Result<Tensor> {
        let input_ids = input_ids.to_dtype(DType::U32)?;
        let embeds = self.llm.model.embed_tokens(&input_ids)?; // (B, T, D)
        let (b, t, d) = embeds.dims3()?;
        let ids = input_ids.flatten_all()?.to_vec1::<u32>()?;
        let context_positions: Vec<usize> = match self.img_context_token_id {
            Some(ctx) => ids
                .iter()
                .enumerate()
                .filter(|(_, id)| **id == ctx)
                .map(|(i, _)| i)
                .collect(),
            None => Vec::new(),
        };
        let Some(pixel_values) = pixel_values else {
            if context_positions.is_empty() {
                return Ok(embeds);
            }
            return Err(Error::msg(format!(
                "input_ids hold {} IMG_CONTEXT tokens but no pixel_values were given",
                context_positions.len()
            )));
        };
        if self.img_context_token_id.is_none() {
            return Err(Error::msg(
                "pixel_values given but the IMG_CONTEXT token id is unknown (no tokenizer.json; call set_img_context_token_id)",
            ));
        }
        let tiles = pixel_values.dim(0)?;
        let expected = tiles * self.tokens_per_tile();
        if context_positions.len() != expected {
            return Err(Error::msg(format!(
                "input_ids hold {} IMG_CONTEXT tokens but {tiles} tiles x {} tokens per tile = {expected} image tokens were computed",
                context_positions.len(),
                self.tokens_per_tile()
            )));
        }
        let features = self.image_features(pixel_values)?; // (tiles, n, D)
        let features = features.reshape((expected, d))?.to_dtype(embeds.dtype())?; // (tiles*n, D)
                                                                                   // Differentiable scatter: gather rows from [text embeddings; image tokens] so that gradients reach
                                                                                   // both (index_select has a backward; an in-place write would not).
        let mut source_rows: Vec<u32> = (0..(b * t) as u32).collect();
        for (k, &pos) in context_positions.iter().enumerate() {
            source_rows[pos] = (b * t + k) as u32;
        }
        let index = Tensor::from_vec(source_rows, b * t, embeds.device())?;
        let pool = Tensor::cat(&[&embeds.reshape((b * t, d))?, &features], 0)?; // (B*T + tiles*n, D)
        Ok(pool.index_select(&index, 0)?.reshape((b, t, d))?) // (B, T, D)
    }

    /// Full-sequence forward: input_ids (B, T), pixel_values (tiles, 3, S, S) or none, attention mask
    /// (B, T) with 1 = token (none: no padding) -> logits (B, T, V).
    pub fn forward(
        &self,
        input_ids: &Tensor,
        pixel_values: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let embeds = self.embed(input_ids, pixel_values)?;
        self.llm.forward_embeds(&embeds, attention_mask)
    }
}

/// The id of [`IMG_CONTEXT_TOKEN`] among `added_tokens` of a tokenizer.json; `None` when the file is absent.
fn img_context_id_from_tokenizer(path: &Path) -> Result<Option<u32>> {
    if !path.is_file() {
        return Ok(None);
    }
    #[derive(serde::Deserialize)]
    struct AddedToken {
        id: u32,
        content: String,
    }
    #[derive(serde::Deserialize)]
    struct TokenizerFile {
        #[serde(default)]
        added_tokens: Vec<AddedToken>,
    }
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.into(),
        source,
    })?;
    let file: TokenizerFile = serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.into(),
        source,
    })?;
    Ok(file
        .added_tokens
        .into_iter()
        .find(|t| t.content == IMG_CONTEXT_TOKEN)
        .map(|t| t.id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn img_context_id_comes_from_tokenizer_added_tokens() -> Result<()> {
        let tmp = tempfile::tempdir().map_err(|source| Error::Io {
            path: "tempdir".into(),
            source,
        })?;
        let dir = tmp.path();
        let path = dir.join("tokenizer.json");
        let json = r#"{"version": "1.0", "added_tokens": [
            {"id": 7, "content": "<img>", "special": true},
            {"id": 9, "content": "<IMG_CONTEXT>", "special": true}], "model": {}}"#;
        std::fs::write(&path, json).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let found = img_context_id_from_tokenizer(&path)?;
        assert_eq!(found, Some(9));
        assert_eq!(
            img_context_id_from_tokenizer(&dir.join("absent.json"))?,
            None
        );
        std::fs::write(&path, "{ not json").map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let err = img_context_id_from_tokenizer(&path).expect_err("corrupt tokenizer.json");
        assert!(err.to_string().contains("tokenizer.json"), "{err}");
        Ok(())
    }

    #[test]
    fn default_trainable_is_adapter_only() {
        let t = Trainable::default();
        assert!(t.contains("mlp1.1.weight"));
        assert!(!t.contains("vision_model.embeddings.class_embedding"));
        assert!(!t.contains("language_model.model.embed_tokens.weight"));
    }

    #[test]
    fn trainable_groups_name_both_qwen2_5_vl_layouts() {
        let only = |vision, adapter, llm| Trainable {
            vision,
            adapter,
            llm,
        };
        let cases = [
            ("visual.blocks.0.attn.qkv.weight", only(true, false, false)),
            (
                "model.visual.patch_embed.proj.weight",
                only(true, false, false),
            ),
            ("visual.merger.mlp.0.weight", only(false, true, false)),
            ("model.visual.merger.ln_q.weight", only(false, true, false)),
            (
                "model.layers.0.mlp.up_proj.weight",
                only(false, false, true),
            ),
            ("model.language_model.norm.weight", only(false, false, true)),
            ("lm_head.weight", only(false, false, true)),
        ];
        for (name, group) in cases {
            for setting in [
                only(true, false, false),
                only(false, true, false),
                only(false, false, true),
            ] {
                assert_eq!(
                    setting.contains(name),
                    setting == group,
                    "{name} {setting:?}"
                );
            }
        }
    }
}
