//! Shared by the `train_*` tests: the tiny InternVL-chat fixture (`tests/fixtures/internvl/vit300m`, from
//! `gen_internvl.py`) and prompts built from its reference inputs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use r1v2_actors::model::chat::{ChatModel, LoadedChat, Trainable};
use r1v2_actors::prompt::{EncodedPrompt, PromptBank};
use r1v2_actors::rl::PromptId;
use r1v2_actors::train::ResponseRow;

/// The fixture checkpoint.
pub fn model_dir() -> PathBuf {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/internvl/vit300m"
    ))
    .to_path_buf()
}

/// The IMG_CONTEXT id of the fixture (it has no tokenizer.json).
pub fn img_context_id() -> Result<u32> {
    let reference = reference()?;
    Ok(reference["img_context_token_id"].to_vec1::<i64>()?[0] as u32)
}

fn reference() -> Result<std::collections::HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(
        model_dir().join("reference.safetensors"),
        &Device::Cpu,
    )?)
}

/// Loads the fixture model from `dir` with `trainable` Vars and the IMG_CONTEXT id set.
pub fn load_from(dir: &Path, trainable: Trainable) -> Result<LoadedChat> {
    load_as(dir, DType::F32, trainable)
}

/// [`load_from`] in `dtype` (bf16: the mixed-precision working copies).
pub fn load_as(dir: &Path, dtype: DType, trainable: Trainable) -> Result<LoadedChat> {
    let mut loaded = ChatModel::load(dir, dtype, &Device::Cpu, trainable)?;
    loaded.model.set_img_context_token_id(img_context_id()?);
    Ok(loaded)
}

/// Loads the fixture model.
pub fn load(trainable: Trainable) -> Result<LoadedChat> {
    load_from(&model_dir(), trainable)
}

fn prompt(id: u64, token_ids: Vec<u32>, pixel_values: Option<Tensor>) -> EncodedPrompt {
    EncodedPrompt {
        id: PromptId(id),
        token_ids,
        pixel_values,
        image_grids: Vec::new(),
        answer: String::new(),
        verifier: "math".into(),
        question: format!("prompt {id}"),
        meta: None,
    }
}

/// Four prompts: 0 = two tiles, 1 = one tile, 2 = text only, 3 = prompt 0's tokens with other pixels.
pub fn prompts() -> Result<Vec<Arc<EncodedPrompt>>> {
    let reference = reference()?;
    let ids = reference["input_ids"]
        .to_dtype(DType::U32)?
        .to_vec2::<u32>()?;
    let pixels = &reference["pixel_values"];
    let ctx = img_context_id()?;
    let text_only: Vec<u32> = ids[1].iter().copied().filter(|&t| t != ctx).collect();
    Ok(vec![
        Arc::new(prompt(0, ids[0].clone(), Some(pixels.narrow(0, 0, 2)?))),
        Arc::new(prompt(1, ids[1].clone(), Some(pixels.narrow(0, 2, 1)?))),
        Arc::new(prompt(2, text_only, None)),
        Arc::new(prompt(
            3,
            ids[0].clone(),
            Some((pixels.narrow(0, 0, 2)? * 0.5)?),
        )),
    ])
}

/// The prompts in a bank.
pub fn bank() -> Result<PromptBank> {
    let bank = PromptBank::new();
    for p in prompts()? {
        bank.insert((*p).clone());
    }
    Ok(bank)
}

/// A deterministic pseudo-random response of `len` tokens (never the IMG_CONTEXT id), from `seed`.
pub fn response(seed: u64, len: usize) -> Vec<u32> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) % 90) as u32
        })
        .collect()
}

/// A GRPO batch: for each `(prompt, advantages)`, one group whose responses have lengths 2..; behaviour
/// log-probs are the policy's own (on-policy) when `scorer` is given, else a constant.
pub fn grpo_batch(
    groups: &[(u64, &[f64])],
    scorer: Option<&r1v2_actors::train::ResponseScorer>,
) -> Result<r1v2_actors::protocol::TrainBatch> {
    use r1v2_actors::rl::{Group, Sample};
    let prompts = prompts()?;
    let mut out = Vec::new();
    for (g, (prompt, advantages)) in groups.iter().enumerate() {
        let mut samples = Vec::new();
        for (i, &advantage) in advantages.iter().enumerate() {
            let token_ids = response(100 * g as u64 + i as u64, 2 + (i * 3 + g) % 5);
            let behaviour_logprobs = match scorer {
                Some(scorer) => {
                    let rows = [r1v2_actors::train::ResponseRow {
                        prompt: prompts[*prompt as usize].clone(),
                        response: &token_ids,
                    }];
                    let lp = scorer.response_logprobs(&rows, false)?.logprobs;
                    lp.get(0)?.to_vec1::<f32>()?
                }
                None => vec![-4.0; token_ids.len()],
            };
            samples.push(Sample::scored(
                token_ids,
                behaviour_logprobs,
                advantage,
                advantage,
                None,
            ));
        }
        out.push(Group {
            prompt_id: PromptId(*prompt),
            policy_version: 0,
            samples,
        });
    }
    Ok(r1v2_actors::protocol::TrainBatch {
        policy_version: 0,
        groups: out,
        replayed: 0,
        metrics: Default::default(),
    })
}

/// MPO pairs over prompts 0..=3 with responses of different lengths.
pub fn mpo_pairs(count: usize) -> Vec<r1v2_actors::protocol::MpoPair> {
    (0..count)
        .map(|i| r1v2_actors::protocol::MpoPair {
            prompt_id: PromptId((i % 4) as u64),
            chosen: response(500 + i as u64, 2 + i % 4),
            rejected: response(700 + i as u64, 3 + (i * 2) % 5),
        })
        .collect()
}

/// The scorer's rows for `(prompt index, response)` pairs over `prompts`.
pub fn response_rows<'a>(
    prompts: &[Arc<EncodedPrompt>],
    responses: &'a [(usize, Vec<u32>)],
) -> Vec<ResponseRow<'a>> {
    responses
        .iter()
        .map(|(p, r)| ResponseRow {
            prompt: prompts[*p].clone(),
            response: r,
        })
        .collect()
}

/// Max |a - b| over two tensors of one shape.
pub fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    anyhow::ensure!(a.dims() == b.dims(), "{:?} vs {:?}", a.dims(), b.dims());
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

/// An error unless every Var of `vars` has a gradient in both stores and they agree to 1e-5 + 1e-4 x the
/// largest component; returns the worst difference relative to that largest component.
pub fn same_gradients(
    vars: &[(String, candle_core::Var)],
    a: &candle_core::backprop::GradStore,
    b: &candle_core::backprop::GradStore,
) -> Result<f32> {
    let mut worst = 0f32;
    for (name, var) in vars {
        let (Some(ga), Some(gb)) = (a.get(var.as_tensor()), b.get(var.as_tensor())) else {
            anyhow::bail!("no gradient for {name}");
        };
        let scale = gb.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        let diff = max_diff(ga, gb)?;
        worst = worst.max(diff / scale.max(1e-6));
        anyhow::ensure!(
            diff <= 1e-5 + 1e-4 * scale,
            "{name}: gradients differ by {diff} (largest {scale})"
        );
    }
    Ok(worst)
}
