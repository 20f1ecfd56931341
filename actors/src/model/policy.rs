//! The policy of a run, of either family, behind one type: [`PolicyNet`] is the InternVL-chat model
//! ([`ChatModel`]) or Qwen2.5-VL with its LM head ([`Qwen25Vl`], `Qwen2_5_VLForConditionalGeneration`), and
//! [`load_policy`] picks by config.json's `model_type`. The generator, the trainer (log-probs with a
//! backward, the reference, weight sync, checkpoints) go through it; nothing else depends on the family.
//!
//! [`Trainable`] names both layouts: vision = `vision_model.*` / Qwen2.5-VL's `visual.*` (merger excluded),
//! adapter = `mlp1.*` / `visual.merger.*`, llm = `language_model.*` / `model.*` + `lm_head.*` (the
//! transformers-5 layout's `model.visual.*` and `model.language_model.*` alike).

use std::path::Path;

use candle_core::{DType, Device, Var};
use candle_nn::VarBuilder;

use super::chat::{save_model_dir, ChatModel, LoadedChat, Trainable};
use super::qwen2::ForCausalLM;
use super::qwen2_5_vl::{self, Qwen25Vl};
use super::weights::{read_config, WeightStore};
use crate::generate::chat::ChatGenerator;
use crate::generate::qwen2_5_vl::Qwen25VlGenerator;
use crate::generate::{self, DecodeFn, PromptInput, Rollout, SamplingParams};
use crate::{Error, Result};

/// Qwen2.5-VL as a policy: the model, and its LLM + head as a Qwen2 causal LM (the same tensors) for
/// decode steps, which the generator packs.
#[derive(Debug, Clone)]
pub struct VlPolicy {
    /// The model.
    pub model: Qwen25Vl,
    /// `model.causal_lm()`.
    pub decoder: ForCausalLM,
}

/// The policy model.
#[derive(Debug, Clone)]
pub enum PolicyNet {
    /// InternViT + `mlp1` + Qwen2.
    Chat(Box<ChatModel>),
    /// Qwen2.5-VL with its LM head.
    Qwen25Vl(Box<VlPolicy>),
}

impl From<ChatModel> for PolicyNet {
    fn from(model: ChatModel) -> Self {
        Self::Chat(Box::new(model))
    }
}

impl PolicyNet {
    /// Qwen2.5-VL as a policy; an error without an LM head.
    pub fn qwen2_5_vl(model: Qwen25Vl) -> Result<Self> {
        let decoder = model.causal_lm()?;
        Ok(Self::Qwen25Vl(Box::new(VlPolicy { model, decoder })))
    }

    /// The chat model, when the policy is one.
    pub fn as_chat(&self) -> Option<&ChatModel> {
        match self {
            Self::Chat(model) => Some(model.as_ref()),
            Self::Qwen25Vl(_) => None,
        }
    }

    /// The Qwen2.5-VL model, when the policy is one.
    pub fn as_qwen2_5_vl(&self) -> Option<&Qwen25Vl> {
        match self {
            Self::Chat(_) => None,
            Self::Qwen25Vl(policy) => Some(&policy.model),
        }
    }

    /// The same family and configuration with the tensors of `vb` (the reference policy).
    pub fn rebuild(&self, vb: VarBuilder) -> Result<Self> {
        match self {
            Self::Chat(model) => {
                let mut rebuilt = ChatModel::new(model.config(), vb)?;
                if let Some(id) = model.img_context_token_id() {
                    rebuilt.set_img_context_token_id(id);
                }
                Ok(Self::Chat(Box::new(rebuilt)))
            }
            Self::Qwen25Vl(policy) => {
                Self::qwen2_5_vl(Qwen25Vl::new(policy.model.config(), vb, None)?)
            }
        }
    }

    /// Packs the weights the decode loop reads for the CPU (see `ForCausalLM::pack_weights`): only for a
    /// model that is not trained.
    pub fn pack_weights(&mut self) -> Result<()> {
        match self {
            Self::Chat(model) => model.llm.pack_weights(),
            Self::Qwen25Vl(policy) => policy.decoder.pack_weights(),
        }
    }

    /// Drops the packed copies (after the weights changed).
    pub fn unpack_weights(&mut self) {
        match self {
            Self::Chat(model) => model.llm.unpack_weights(),
            Self::Qwen25Vl(policy) => policy.decoder.unpack_weights(),
        }
    }

    /// Whether the decode loop's weights are packed.
    pub fn is_packed(&self) -> bool {
        match self {
            Self::Chat(model) => model.llm.is_packed(),
            Self::Qwen25Vl(policy) => policy.decoder.is_packed(),
        }
    }

    /// `n` responses per prompt with the generation engine (see `generate::generate_groups`).
    pub fn generate_groups(
        &self,
        prompts: &[PromptInput],
        n: usize,
        params: &SamplingParams,
        decode: Option<DecodeFn>,
        device: &Device,
    ) -> Result<Vec<Vec<Rollout>>> {
        match self {
            Self::Chat(model) => {
                let generator = ChatGenerator::new(model, device);
                generate::generate_groups(&generator, prompts, n, params, decode)
            }
            Self::Qwen25Vl(policy) => {
                let generator = Qwen25VlGenerator::new(&policy.model, &policy.decoder, device);
                generate::generate_groups(&generator, prompts, n, params, decode)
            }
        }
    }
}

/// A loaded policy with the handles training needs.
pub struct LoadedPolicy {
    /// The model.
    pub model: PolicyNet,
    /// The trainable parameters, by checkpoint name (what the optimizer gets).
    pub trainable_vars: Vec<(String, Var)>,
    /// The store the model reads from (current values of every tensor, for saving).
    pub store: WeightStore,
    /// Checkpoint tensors the model did not use (reported with a warning when loading).
    pub unexpected: Vec<String>,
}

impl From<LoadedChat> for LoadedPolicy {
    fn from(loaded: LoadedChat) -> Self {
        Self {
            model: loaded.model.into(),
            trainable_vars: loaded.trainable_vars,
            store: loaded.store,
            unexpected: loaded.unexpected,
        }
    }
}

impl LoadedPolicy {
    /// Writes the current weights (trained Vars included) in the checkpoint's layout and dtype to `dir`,
    /// with the source's config, tokenizer and processor files (see `LoadedChat::save`).
    pub fn save(&self, dir: &Path, max_shard_bytes: usize) -> Result<()> {
        save_model_dir(&self.store, dir, max_shard_bytes)
    }
}

/// Loads the policy in `dir` (config.json's `model_type`: `qwen2_5_vl`, else an InternVL-chat model) in
/// `dtype` on `device`; the tensors `trainable` selects come back as `Var`s. A Qwen2.5-VL policy needs its
/// LM head (`lm_head.weight`, or tied embeddings); a value head beside it is not loaded.
pub fn load_policy(
    dir: &Path,
    dtype: DType,
    device: &Device,
    trainable: Trainable,
) -> Result<LoadedPolicy> {
    let config_path = dir.join("config.json");
    let config: serde_json::Value = read_config(&config_path)?;
    if config.get("model_type").and_then(|v| v.as_str()) != Some("qwen2_5_vl") {
        return Ok(ChatModel::load(dir, dtype, device, trainable)?.into());
    }
    let cfg = qwen2_5_vl::Config::from_file(&config_path)?;
    let store = WeightStore::load(dir, dtype, device)?;
    let model = Qwen25Vl::new(
        &cfg,
        store.var_builder(move |name| trainable.contains(name)),
        None,
    )?;
    if !model.has_lm_head() {
        return Err(Error::Checkpoint {
            path: dir.to_path_buf(),
            msg: "a Qwen2.5-VL policy needs `lm_head.weight` (or tie_word_embeddings in config.json); \
                  this checkpoint has none (a reward model?)"
                .into(),
        });
    }
    let unexpected = store.report_unexpected();
    let trainable_vars = store.trainable_vars();
    Ok(LoadedPolicy {
        model: PolicyNet::qwen2_5_vl(model)?,
        trainable_vars,
        store,
        unexpected,
    })
}
