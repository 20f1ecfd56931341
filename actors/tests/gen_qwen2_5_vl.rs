//! The cached generation engine on Qwen2.5-VL (tests/fixtures/qwen2_5_vl: the tiny random model whose full
//! forward matches transformers) equals generation by full forwards without a cache: greedy tokens are the
//! argmax of the full forward after every token, sampled rows (rows leaving and joining the batch, several
//! shards) equal the uncached reference, and per-token log-probs agree.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{ensure, Result};
use candle_core::{DType, Device, IndexOp, Tensor};
use r1v2_actors::generate::qwen2_5_vl::Qwen25VlGenerator;
use r1v2_actors::generate::shards::ShardPlan;
use r1v2_actors::generate::{
    generate_groups, generate_groups_batched, generate_one_uncached, BatchOptions, PromptInput,
    Rollout, SamplingParams,
};
use r1v2_actors::model::qwen2::ForCausalLM;
use r1v2_actors::model::qwen2_5_vl::{load_dir, Images, Qwen25Vl};

const VISION_START: u32 = 250;
const VISION_END: u32 = 251;
const IMAGE_PAD: u32 = 252;

struct Fixture {
    model: Qwen25Vl,
    decoder: ForCausalLM,
    io: HashMap<String, Tensor>,
}

fn load() -> Result<Fixture> {
    let dir = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/qwen2_5_vl"
    ));
    let model = load_dir(&dir.join("released"), DType::F32, &Device::Cpu, |_| false)?.model;
    let decoder = model.causal_lm()?;
    let io = candle_core::safetensors::load(dir.join("io.safetensors"), &Device::Cpu)?;
    Ok(Fixture { model, decoder, io })
}

impl Fixture {
    /// Image `key` of the fixture as the processor gives it: (patches, 3 * 2 * 14 * 14) and its grid.
    fn image(&self, key: &str) -> Result<(Tensor, [usize; 3])> {
        let frame = self.io[&format!("pixels_{key}")].unsqueeze(2)?; // (N, 3, 1, 196)
        let n = frame.dim(0)?;
        let pixels = Tensor::cat(&[&frame, &frame], 2)?.reshape((n, 3 * 2 * 196))?;
        let grid = self.io[&format!("grid_{key}")]
            .to_dtype(DType::U32)?
            .to_vec1::<u32>()?;
        Ok((
            pixels,
            [grid[0] as usize, grid[1] as usize, grid[2] as usize],
        ))
    }

    /// A prompt with images `keys` (each `<|vision_start|><|image_pad|>*N<|vision_end|>` between text).
    fn prompt(&self, keys: &[&str], index: u64) -> Result<PromptInput> {
        let mut token_ids = vec![5, 17];
        let mut pixels = Vec::new();
        let mut grids = Vec::new();
        for (k, key) in keys.iter().enumerate() {
            let (p, grid) = self.image(key)?;
            token_ids.push(VISION_START);
            token_ids.extend(std::iter::repeat_n(
                IMAGE_PAD,
                self.model.config().image_tokens(grid),
            ));
            token_ids.extend([VISION_END, 30 + k as u32]);
            pixels.push(p);
            grids.push(grid);
        }
        token_ids.extend([40, 41, 42]);
        Ok(PromptInput {
            token_ids,
            prompt_index: index,
            pixel_values: (!pixels.is_empty())
                .then(|| Tensor::cat(&pixels, 0))
                .transpose()?,
            image_grids: grids,
        })
    }

    /// Two image prompts (one image; two images) and a text-only one.
    fn prompts(&self) -> Result<Vec<PromptInput>> {
        Ok(vec![
            self.prompt(&["a"], 0)?,
            self.prompt(&["d", "b"], 1)?,
            self.prompt(&[], 2)?,
        ])
    }

    /// Next-token logits after `sequence` (prompt + response so far) from the full forward without cache:
    /// the prompt's embeddings with the image tokens, then the response's token embeddings; positions are
    /// `get_rope_index` on the prompt, then `max + 1 + j` on all three axes (transformers' decode positions:
    /// a generated `<|image_pad|>` is an ordinary token). Without a pad token in the response this is the
    /// model's plain forward on the whole sequence (checked).
    fn full_logits(&self, prompt: &PromptInput, sequence: &[u32]) -> r1v2_actors::Result<Vec<f32>> {
        let images = prompt.pixel_values.as_ref().map(|pixels| Images {
            pixel_values: pixels.clone(),
            grids: prompt.image_grids.clone(),
        });
        let p = prompt.token_ids.len();
        let all = Tensor::new(sequence, &Device::Cpu)?.unsqueeze(0)?; // (1, T)
        let prompt_ids = all.narrow(1, 0, p)?; // (1, P)
        let mut positions = self.model.positions(&prompt_ids, images.as_ref(), None)?;
        let next = positions
            .iter()
            .flat_map(|axis| axis[0].iter())
            .max()
            .map_or(0, |&m| m + 1);
        for axis in positions.iter_mut() {
            axis[0].extend((0..(sequence.len() - p) as u32).map(|j| next + j));
        }
        let mut embeds = self.model.embed(&prompt_ids, images.as_ref())?; // (1, P, D)
        if sequence.len() > p {
            let response = all.narrow(1, p, sequence.len() - p)?; // (1, R)
            let response = self.model.llm.model.embed_tokens(&response)?; // (1, R, D)
            embeds = Tensor::cat(&[&embeds, &response], 1)?; // (1, T, D)
        }
        let hidden = self.model.llm.forward_embeds(&embeds, None, &positions)?; // (1, T, D)
        let last = self
            .model
            .logits(&hidden.narrow(1, sequence.len() - 1, 1)?)? // (1, 1, V)
            .flatten_all()?
            .to_vec1::<f32>()?; // (V)
        if !sequence[p..].contains(&IMAGE_PAD) {
            let plain = self.model.forward(&all, images.as_ref(), None)?; // (1, T, V)
            let plain = plain.i((0, sequence.len() - 1))?.to_vec1::<f32>()?;
            let diff = max_abs_diff(&plain, &last);
            if diff > 1e-5 {
                return Err(r1v2_actors::Error::msg(format!(
                    "the reference differs from the plain forward by {diff}"
                )));
            }
        }
        Ok(last)
    }

    /// Every rollout equals the uncached reference: same tokens and finish reason; returns the largest
    /// log-prob difference (policy and processed).
    fn check_against_uncached(
        &self,
        prompts: &[PromptInput],
        groups: &[Vec<Rollout>],
        params: &SamplingParams,
    ) -> Result<f32> {
        let cfg = self.decoder.config();
        let mut worst = 0f32;
        for (group, prompt) in groups.iter().zip(prompts) {
            for rollout in group {
                let reference = generate_one_uncached(
                    |seq| self.full_logits(prompt, seq),
                    cfg.vocab_size,
                    cfg.max_position_embeddings,
                    prompt,
                    rollout.sample_index,
                    params,
                    None,
                )?;
                ensure!(
                    rollout.token_ids == reference.token_ids,
                    "prompt {} sample {}: {:?} vs uncached {:?}",
                    prompt.prompt_index,
                    rollout.sample_index,
                    rollout.token_ids,
                    reference.token_ids
                );
                ensure!(rollout.finish_reason == reference.finish_reason);
                for (ours, theirs) in rollout.logprobs.iter().zip(&reference.logprobs) {
                    worst = worst
                        .max((ours.policy - theirs.policy).abs())
                        .max((ours.processed - theirs.processed).abs());
                }
            }
        }
        Ok(worst)
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

#[test]
fn qwen2_5_vl_greedy_equals_argmax_of_full_forwards() -> Result<()> {
    let fixture = load()?;
    let prompts = fixture.prompts()?;
    let params = SamplingParams {
        temperature: 0.0,
        repetition_penalty: 1.0,
        max_new_tokens: 8,
        ..SamplingParams::default()
    };
    let generator = Qwen25VlGenerator::new(&fixture.model, &fixture.decoder, &Device::Cpu);
    let groups = generate_groups(&generator, &prompts, 2, &params, None)?;
    for (group, prompt) in groups.iter().zip(&prompts) {
        // Argmax of the full forward, recomputed from scratch after every token.
        let mut sequence = prompt.token_ids.clone();
        let mut expected = Vec::new();
        for _ in 0..params.max_new_tokens {
            let logits = fixture.full_logits(prompt, &sequence)?;
            let argmax = logits
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i as u32)
                .expect("the vocabulary is not empty");
            expected.push(argmax);
            sequence.push(argmax);
        }
        for rollout in group {
            ensure!(
                rollout.token_ids == expected,
                "prompt {}: {:?} vs argmax {expected:?}",
                prompt.prompt_index,
                rollout.token_ids
            );
        }
    }
    let worst = fixture.check_against_uncached(&prompts, &groups, &params)?;
    println!("greedy: max |log-prob diff| cached vs full forward {worst:.2e}");
    ensure!(worst < 1e-5, "log-probs differ by {worst}");
    ensure!(generator.vision_runs() == 2);
    // The image matters: dimmed pixels move the prompt's logits.
    let mut dimmed = prompts[0].clone();
    dimmed.pixel_values = Some((prompts[0].pixel_values.as_ref().expect("has images") * 0.1)?);
    let moved = fixture.full_logits(&dimmed, &dimmed.token_ids)?;
    let base = fixture.full_logits(&prompts[0], &prompts[0].token_ids)?;
    ensure!(
        max_abs_diff(&moved, &base) > 1e-3,
        "the prompt's logits ignore the image"
    );
    Ok(())
}

#[test]
fn qwen2_5_vl_sampled_groups_equal_uncached_rows() -> Result<()> {
    let fixture = load()?;
    let prompts = fixture.prompts()?;
    let params = SamplingParams {
        temperature: 1.0,
        top_p: 0.9,
        repetition_penalty: 1.05,
        max_new_tokens: 10,
        // Rows stop at different steps, leave the batch, and the next group joins it.
        stop_token_ids: (0..24).collect(),
        seed: 3,
        ..SamplingParams::default()
    };
    // Two shards of at least one row; at most 5 rows together, so groups of 3 join as others finish.
    let plan = ShardPlan {
        max_shards: 2,
        min_rows_per_shard: 1,
    };
    let generator = Qwen25VlGenerator::new(&fixture.model, &fixture.decoder, &Device::Cpu)
        .with_shard_plan(plan);
    let groups = generate_groups_batched(
        &generator,
        &prompts,
        3,
        &params,
        None,
        &BatchOptions { max_batch_rows: 5 },
        &mut |_, _, _| {},
    )?;
    let worst = fixture.check_against_uncached(&prompts, &groups, &params)?;
    println!("sampled: max |log-prob diff| cached vs full forward {worst:.2e}");
    ensure!(worst < 1e-5, "log-probs differ by {worst}");
    ensure!(generator.vision_runs() == 2);
    let lengths: Vec<usize> = groups
        .iter()
        .flat_map(|g| g.iter().map(|r| r.token_ids.len()))
        .collect();
    ensure!(
        lengths.iter().any(|&l| l != lengths[0]),
        "every row has the same length {lengths:?}: nothing left the batch early"
    );
    Ok(())
}

#[test]
fn qwen2_5_vl_bad_image_prompts_are_errors_naming_the_prompt() -> Result<()> {
    let fixture = load()?;
    let generator = Qwen25VlGenerator::new(&fixture.model, &fixture.decoder, &Device::Cpu);
    let params = SamplingParams {
        max_new_tokens: 2,
        ..SamplingParams::default()
    };
    let good = fixture.prompt(&["a"], 7)?;
    let mut cases = Vec::new();
    let mut no_grid = good.clone();
    no_grid.image_grids.clear();
    cases.push((no_grid, "image grids"));
    let mut short = good.clone();
    short.token_ids.retain(|&id| id != IMAGE_PAD);
    short.token_ids.insert(3, IMAGE_PAD);
    cases.push((short, "pad"));
    let mut no_pixels = good.clone();
    no_pixels.pixel_values = None;
    cases.push((no_pixels, "no pixel values"));
    for (prompt, needle) in cases {
        let err = generate_groups(&generator, &[prompt], 1, &params, None)
            .expect_err("a bad image prompt must be refused")
            .to_string();
        ensure!(
            err.contains("prompt 7") && err.contains(needle),
            "{needle}: {err}"
        );
    }
    Ok(())
}
