//! Qwen2.5-VL as a policy (tests/fixtures/qwen2_5_vl/released: the tiny random model whose forward matches
//! transformers): the response scorer's log-probs equal the full forward's (positions as the generator's decode
//! steps: the prompt's `get_rope_index`, then `max + 1 + j`) with gradients reaching the vision tower, the
//! merger and the LLM, and the prefix-shared forward equals row by row; GRPO updates change only the trainable groups, save -> load -> step equals an
//! uninterrupted step bit for bit, and MPO / SFT updates lower their losses.

mod train_common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor, D};
use r1v2_actors::model::chat::Trainable;
use r1v2_actors::model::policy::{load_policy, LoadedPolicy};
use r1v2_actors::model::qwen2_5_vl::{Images, Qwen25Vl};
use r1v2_actors::prompt::{EncodedPrompt, PromptBank};
use r1v2_actors::protocol::{MpoPair, SftExample, TrainBatch};
use r1v2_actors::rl::config::{GrpoConfig, MpoConfig};
use r1v2_actors::rl::mpo::BcoRewardMean;
use r1v2_actors::rl::{Group, PromptId, Sample};
use r1v2_actors::train::{OptimConfig, PolicyTrainer, ResponseRow, ResponseScorer};
use train_common::{max_diff, response_rows, same_gradients};

const VISION_START: u32 = 250;
const VISION_END: u32 = 251;
const IMAGE_PAD: u32 = 252;

fn fixture() -> PathBuf {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/qwen2_5_vl"
    ))
    .to_path_buf()
}

fn load(trainable: Trainable) -> Result<LoadedPolicy> {
    Ok(load_policy(
        &fixture().join("released"),
        DType::F32,
        &Device::Cpu,
        trainable,
    )?)
}

/// Prompts: 0 = image a, 1 = images d and b, 2 = text only.
fn prompts(model: &Qwen25Vl) -> Result<Vec<Arc<EncodedPrompt>>> {
    let io = candle_core::safetensors::load(fixture().join("io.safetensors"), &Device::Cpu)?;
    let image = |key: &str| -> Result<(Tensor, [usize; 3])> {
        let frame = io[&format!("pixels_{key}")].unsqueeze(2)?; // (N, 3, 1, 196)
        let n = frame.dim(0)?;
        let grid = io[&format!("grid_{key}")]
            .to_dtype(DType::U32)?
            .to_vec1::<u32>()?;
        Ok((
            Tensor::cat(&[&frame, &frame], 2)?.reshape((n, 3 * 2 * 196))?,
            [grid[0] as usize, grid[1] as usize, grid[2] as usize],
        ))
    };
    let mut out = Vec::new();
    for (id, keys) in [vec!["a"], vec!["d", "b"], vec![]].into_iter().enumerate() {
        let mut token_ids = vec![5, 17];
        let (mut pixels, mut grids) = (Vec::new(), Vec::new());
        for key in keys {
            let (p, grid) = image(key)?;
            token_ids.push(VISION_START);
            token_ids.extend(std::iter::repeat_n(
                IMAGE_PAD,
                model.config().image_tokens(grid),
            ));
            token_ids.push(VISION_END);
            pixels.push(p);
            grids.push(grid);
        }
        token_ids.extend([40, 41, 42]);
        out.push(Arc::new(EncodedPrompt {
            id: PromptId(id as u64),
            token_ids,
            pixel_values: (!pixels.is_empty())
                .then(|| Tensor::cat(&pixels, 0))
                .transpose()?,
            image_grids: grids,
            answer: String::new(),
            verifier: "math".into(),
            question: format!("prompt {id}"),
            meta: None,
        }));
    }
    Ok(out)
}

/// `log p(response[j] | ...)` from one full forward of prompt + response (batch 1, no padding).
fn full_forward_logprobs(
    model: &Qwen25Vl,
    prompt: &EncodedPrompt,
    response: &[u32],
) -> Result<Vec<f32>> {
    let images = prompt.pixel_values.as_ref().map(|pixels| Images {
        pixel_values: pixels.clone(),
        grids: prompt.image_grids.clone(),
    });
    let p = prompt.token_ids.len();
    let prompt_ids = Tensor::new(prompt.token_ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
    let mut positions = model.positions(&prompt_ids, images.as_ref(), None)?;
    let next = positions
        .iter()
        .flat_map(|axis| axis[0].iter())
        .max()
        .map_or(0, |&m| m + 1);
    for axis in positions.iter_mut() {
        axis[0].extend((0..response.len() as u32).map(|j| next + j));
    }
    let response_ids = Tensor::new(response, &Device::Cpu)?.unsqueeze(0)?;
    let embeds = Tensor::cat(
        &[
            &model.embed(&prompt_ids, images.as_ref())?,
            &model.llm.model.embed_tokens(&response_ids)?,
        ],
        1,
    )?; // (1, P + R, D)
    let hidden = model.llm.forward_embeds(&embeds, None, &positions)?;
    let logits = model.logits(&hidden.narrow(1, p - 1, response.len())?)?; // (1, R, V)
    let log_p = candle_nn::ops::log_softmax(&logits, D::Minus1)?.squeeze(0)?; // (R, V)
    let log_p = log_p.to_vec2::<f32>()?;
    Ok(response
        .iter()
        .zip(&log_p)
        .map(|(&t, row)| row[t as usize])
        .collect())
}

const ALL: Trainable = Trainable {
    vision: true,
    adapter: true,
    llm: true,
};

#[test]
fn qwen2_5_vl_response_logprobs_equal_the_full_forward_and_reach_every_group() -> Result<()> {
    let policy = load(ALL)?;
    let model = policy.model.as_qwen2_5_vl().expect("a Qwen2.5-VL policy");
    let prompts = prompts(model)?;
    let scorer =
        ResponseScorer::for_policy(policy.model.clone(), &policy.store.frozen_var_builder())?;
    // Rows of different lengths, two sharing a prompt; one response holds an <|image_pad|> token, which is an
    // ordinary token there (its slot takes no image feature, its position continues the text).
    let responses: [(usize, Vec<u32>); 4] = [
        (0, vec![7, 8, 9]),
        (0, vec![11, IMAGE_PAD, 3, 60, 2]),
        (1, vec![33, 34]),
        (2, vec![1, 2, 3, 4]),
    ];
    let rows = response_rows(&prompts, &responses);
    let scored = scorer.response_logprobs(&rows, true)?;
    let got = scored.logprobs.to_vec2::<f32>()?;
    let mut worst = 0f32;
    for ((p, response), row) in responses.iter().zip(&got) {
        let want = full_forward_logprobs(model, &prompts[*p], response)?;
        for (j, w) in want.iter().enumerate() {
            worst = worst.max((row[j] - w).abs());
        }
        ensure!(row[response.len()..].iter().all(|&v| v == 0.0));
    }
    println!("max |log-prob diff| scorer vs full forward {worst:.2e}");
    ensure!(worst < 1e-5, "log-probs differ by {worst}");
    ensure!(scored.entropy.is_some());

    // Gradients reach the vision tower, the merger, the LLM and the LM head.
    let grads = scored.logprobs.sum_all()?.backward()?;
    for group in [
        "visual.blocks.0.",
        "visual.merger.",
        "model.layers.1.",
        "lm_head.",
    ] {
        let (name, var) = policy
            .trainable_vars
            .iter()
            .find(|(n, _)| n.starts_with(group))
            .expect("a trainable tensor of each group");
        let grad = grads.get(var.as_tensor()).expect(name);
        let norm = grad.sqr()?.sum_all()?.to_scalar::<f32>()?;
        ensure!(norm > 0.0 && norm.is_finite(), "{name}: |grad|^2 = {norm}");
    }
    Ok(())
}

/// The prefix-shared forward (three-axis prompt positions, responses at max + 1 + j) gives the log-probs and
/// gradients of every row run on its own, for prompts with two images, one, and none.
#[test]
fn qwen2_5_vl_prefix_shared_logprobs_and_gradients_equal_row_by_row() -> Result<()> {
    let policy = load(ALL)?;
    let model = policy.model.as_qwen2_5_vl().expect("a Qwen2.5-VL policy");
    let prompts = prompts(model)?;
    let shared =
        ResponseScorer::for_policy(policy.model.clone(), &policy.store.frozen_var_builder())?;
    let plain = shared.clone().without_prefix_sharing();
    let responses: [(usize, Vec<u32>); 6] = [
        (1, vec![7, 8, 9, 10]),
        (0, vec![11, IMAGE_PAD, 3, 60, 2]),
        (1, vec![33]),
        (2, vec![1, 2, 3]),
        (0, vec![4, 5]),
        (2, vec![6, 7, 8, 9, 10, 11]),
    ];
    let rows = response_rows(&prompts, &responses);
    let weights = Tensor::arange(0f32, 36f32, &Device::Cpu)?
        .affine(0.41, 0.2)?
        .sin()?
        .reshape((6, 6))?;
    let a = shared.response_logprobs(&rows, false)?;
    let b = plain.response_logprobs(&rows, false)?;
    let logprob_diff = max_diff(&a.logprobs, &b.logprobs)?;
    ensure!(logprob_diff < 1e-5, "log-probs differ by {logprob_diff}");
    let grads_a = (a.logprobs * &weights)?.sum_all()?.backward()?;
    let grads_b = (b.logprobs * &weights)?.sum_all()?.backward()?;
    same_gradients(&policy.trainable_vars, &grads_a, &grads_b)?;
    Ok(())
}

/// A GRPO batch on the prompts with on-policy behaviour log-probs.
fn grpo_batch(scorer: &ResponseScorer, prompts: &[Arc<EncodedPrompt>]) -> Result<TrainBatch> {
    let mut groups = Vec::new();
    for (g, advantages) in [[1.0, -1.0], [0.5, -0.5], [-0.8, 0.8]].iter().enumerate() {
        let mut samples = Vec::new();
        for (i, &advantage) in advantages.iter().enumerate() {
            let token_ids: Vec<u32> = (0..2 + g + 2 * i)
                .map(|k| (17 * g + 31 * i + 7 * k) as u32 % 200)
                .collect();
            let rows = [ResponseRow {
                prompt: prompts[g].clone(),
                response: &token_ids,
            }];
            let lp = scorer.response_logprobs(&rows, false)?.logprobs;
            let behaviour = lp.get(0)?.to_vec1::<f32>()?;
            samples.push(Sample::scored(
                token_ids, behaviour, advantage, advantage, None,
            ));
        }
        groups.push(Group {
            prompt_id: PromptId(g as u64),
            policy_version: 0,
            samples,
        });
    }
    Ok(TrainBatch {
        policy_version: 0,
        groups,
        replayed: 0,
        metrics: Default::default(),
    })
}

#[test]
fn qwen2_5_vl_grpo_trains_the_chosen_groups_and_resumes_bit_for_bit() -> Result<()> {
    let trainable = Trainable {
        vision: false,
        adapter: true,
        llm: true,
    };
    let config = OptimConfig {
        lr: 1e-2,
        micro_batch: 4,
        warmup_steps: 1,
        total_steps: 10,
        trainable,
        ..Default::default()
    };
    let mut trainer = PolicyTrainer::new(load(trainable)?, config.clone())?;
    let model = trainer.policy().model.as_qwen2_5_vl().expect("Qwen2.5-VL");
    let prompts = prompts(model)?;
    let bank = PromptBank::new();
    for p in &prompts {
        bank.insert((**p).clone());
    }
    let scorer = ResponseScorer::for_policy(
        trainer.policy().model.clone(),
        &trainer.policy().store.frozen_var_builder(),
    )?;
    let batch = grpo_batch(&scorer, &prompts)?;
    let before: Vec<(String, Vec<f32>)> = trainer
        .policy()
        .store
        .tensors()?
        .into_iter()
        .map(|(n, t)| Ok((n, t.flatten_all()?.to_vec1::<f32>()?)))
        .collect::<Result<_>>()?;
    let grpo = GrpoConfig::default();
    for _ in 0..2 {
        let report = trainer.grpo_update(&batch, &bank, &grpo)?;
        for key in [
            "actor/pg_loss",
            "actor/kl",
            "actor/grad_norm",
            "actor/entropy",
        ] {
            ensure!(
                report.metrics.get(key).is_some_and(|v| v.is_finite()),
                "metric {key}: {:?}",
                report.metrics.get(key)
            );
        }
    }
    let mut changed = Vec::new();
    for ((name, a), (_, b)) in before.iter().zip(trainer.policy().store.tensors()?) {
        if *a != b.flatten_all()?.to_vec1::<f32>()? {
            changed.push(name.clone());
        }
    }
    ensure!(
        changed.iter().any(|n| n.starts_with("visual.merger.")),
        "{changed:?}"
    );
    ensure!(
        changed.iter().any(|n| n.starts_with("model.layers.")),
        "{changed:?}"
    );
    ensure!(
        changed
            .iter()
            .all(|n| trainable.contains(n) && !n.starts_with("visual.blocks.")),
        "frozen tensors moved: {changed:?}"
    );

    // Checkpoint, then one more step here and on the reloaded trainer.
    let dir = tempfile::tempdir()?;
    ensure!(trainer.save_state(dir.path())? == 2);
    ensure!(dir.path().join("model/preprocessor_config.json").is_file());
    let expected = trainer.grpo_update(&batch, &bank, &grpo)?;
    let mut resumed =
        PolicyTrainer::load_checkpoint(dir.path(), DType::F32, &Device::Cpu, config, None)?;
    ensure!(resumed.version() == 2 && resumed.policy().model.as_qwen2_5_vl().is_some());
    let got = resumed.grpo_update(&batch, &bank, &grpo)?;
    for ((n1, a), (n2, b)) in expected
        .weights
        .tensors
        .iter()
        .zip(got.weights.tensors.iter())
    {
        ensure!(n1 == n2);
        ensure!(
            a.flatten_all()?.to_vec1::<f32>()? == b.flatten_all()?.to_vec1::<f32>()?,
            "`{n1}` differs after resume"
        );
    }
    for key in ["actor/kl", "actor/pg_loss", "actor/grad_norm"] {
        ensure!(
            expected.metrics[key] == got.metrics[key],
            "{key} differs after resume"
        );
    }
    Ok(())
}

#[test]
fn qwen2_5_vl_mpo_and_sft_updates_lower_their_losses() -> Result<()> {
    let trainable = Trainable {
        vision: false,
        adapter: true,
        llm: true,
    };
    let config = OptimConfig {
        lr: 1e-2,
        micro_batch: 4,
        warmup_steps: 1,
        total_steps: 20,
        trainable,
        ..Default::default()
    };
    let mut trainer = PolicyTrainer::new(load(trainable)?, config)?;
    let prompts = prompts(trainer.policy().model.as_qwen2_5_vl().expect("Qwen2.5-VL"))?;
    let bank = PromptBank::new();
    for p in &prompts {
        bank.insert((**p).clone());
    }
    let pairs: Vec<MpoPair> = (0..3)
        .map(|i| MpoPair {
            prompt_id: PromptId(i as u64),
            chosen: vec![10 + i, 20, 30],
            rejected: vec![90, 80 + i, 70, 60],
        })
        .collect();
    let mut delta = BcoRewardMean::default();
    let cfg = MpoConfig::default();
    let first = trainer.mpo_update(&pairs, &bank, &cfg, &mut delta)?;
    let mut last = first.clone();
    for _ in 0..4 {
        last = trainer.mpo_update(&pairs, &bank, &cfg, &mut delta)?;
    }
    for key in ["mpo/dpo", "mpo/sft"] {
        ensure!(
            last.metrics[key] < first.metrics[key],
            "{key} did not fall: {} -> {}",
            first.metrics[key],
            last.metrics[key]
        );
    }
    let examples: Vec<SftExample> = (0..3)
        .map(|i| SftExample {
            prompt_id: PromptId(i as u64),
            response: vec![3 + i, 4, 5, 6],
        })
        .collect();
    let first = trainer.sft_update(&examples, &bank)?;
    let mut last = first.clone();
    for _ in 0..4 {
        last = trainer.sft_update(&examples, &bank)?;
    }
    ensure!(
        last.metrics["sft/nll"] < first.metrics["sft/nll"],
        "sft/nll did not fall: {} -> {}",
        first.metrics["sft/nll"],
        last.metrics["sft/nll"]
    );
    Ok(())
}

#[test]
fn qwen2_5_vl_bf16_gradients_agree_with_f32_from_the_same_weights() -> Result<()> {
    // Mixed precision (`[model] dtype = "bf16"`) on the Qwen2.5-VL policy: vision tower, merger and LLM
    // all train, so the backward runs through every bf16 layer of both towers.
    let config = OptimConfig {
        lr: 1e-3,
        micro_batch: 2,
        trainable: ALL,
        ..Default::default()
    };
    let full = PolicyTrainer::new(load(ALL)?, config.clone())?;
    let half = PolicyTrainer::new(
        load_policy(&fixture().join("released"), DType::BF16, &Device::Cpu, ALL)?,
        config,
    )?;
    for ((_, f), (_, h)) in full
        .policy()
        .trainable_vars
        .iter()
        .zip(&half.policy().trainable_vars)
    {
        ensure!(h.dtype() == DType::BF16);
        f.set(&h.as_tensor().to_dtype(DType::F32)?)?;
    }
    let model = full.policy().model.as_qwen2_5_vl().expect("Qwen2.5-VL");
    let prompts = prompts(model)?;
    let bank = PromptBank::new();
    for p in &prompts {
        bank.insert((**p).clone());
    }
    let scorer = ResponseScorer::for_policy(
        full.policy().model.clone(),
        &full.policy().store.frozen_var_builder(),
    )?;
    let batch = grpo_batch(&scorer, &prompts)?;
    let grpo = GrpoConfig::default();
    let a = full.grpo_gradients(&batch, &bank, &grpo)?;
    let b = half.grpo_gradients(&batch, &bank, &grpo)?;
    let (mut worst, mut scale, mut dot, mut na, mut nb) = (0f32, 0f32, 0f64, 0f64, 0f64);
    for (ga, gb) in a.grads.iter().zip(&b.grads) {
        ensure!(gb.dtype() == DType::F32, "accumulated gradients are f32");
        let x = ga.flatten_all()?.to_vec1::<f32>()?;
        let y = gb.flatten_all()?.to_vec1::<f32>()?;
        for (x, y) in x.into_iter().zip(y) {
            worst = worst.max((x - y).abs());
            scale = scale.max(x.abs());
            dot += f64::from(x) * f64::from(y);
            na += f64::from(x) * f64::from(x);
            nb += f64::from(y) * f64::from(y);
        }
    }
    let cosine = dot / (na.sqrt() * nb.sqrt());
    eprintln!(
        "qwen2.5-vl bf16 vs f32 gradients: max |diff| = {worst:e} (max |grad| {scale:e}), cosine {cosine}"
    );
    ensure!(
        scale > 1e-4,
        "the gradient is ~0: the check would be vacuous"
    );
    ensure!(
        worst < 0.05 * scale,
        "bf16 gradients differ by {worst} (scale {scale})"
    );
    ensure!(
        cosine > 0.995,
        "bf16 gradients point elsewhere: cosine {cosine}"
    );
    Ok(())
}
