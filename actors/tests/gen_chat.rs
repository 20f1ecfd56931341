//! The engine on the InternVL-chat model (the tiny fixtures of tests/fixtures/internvl, both ViT kinds):
//! cached, grouped generation with images equals the uncached reference that reruns the full chat forward
//! (vision tower included) for every token; the vision tower runs once per group; bad prompts are errors
//! naming the prompt.

use std::path::Path;

use anyhow::{ensure, Result};
use candle_core::{DType, Device, IndexOp, Tensor};
use r1v2_actors::generate::chat::ChatGenerator;
use r1v2_actors::generate::qwen2::Qwen2Generator;
use r1v2_actors::generate::{
    generate_groups, generate_groups_streaming, generate_one_uncached, PromptInput, Rollout,
    SamplingParams, StepModel,
};
use r1v2_actors::model::chat::{ChatModel, Trainable};

/// The fixture model and its reference tensors (`input_ids` (2, 18), `pixel_values` (3, 3, S, S)).
struct Fixture {
    model: ChatModel,
    input_ids: Vec<Vec<u32>>,
    pixel_values: Tensor,
    context_id: u32,
}

fn load(variant: &str) -> Result<Fixture> {
    let dir = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/internvl"
    ))
    .join(variant);
    let mut loaded = ChatModel::load(&dir, DType::F32, &Device::Cpu, Trainable::frozen())?;
    let reference =
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu)?;
    let context_id = reference["img_context_token_id"].to_vec1::<i64>()?[0] as u32;
    loaded.model.set_img_context_token_id(context_id);
    let input_ids = reference["input_ids"]
        .to_dtype(DType::U32)?
        .to_vec2::<u32>()?;
    Ok(Fixture {
        model: loaded.model,
        input_ids,
        pixel_values: reference["pixel_values"].clone(),
        context_id,
    })
}

impl Fixture {
    /// Two prompts with images (the reference rows: the first holds the IMG_CONTEXT runs of tiles 0-1, the
    /// second of tile 2) and a text-only one.
    fn prompts(&self) -> Result<Vec<PromptInput>> {
        let tokens_per_tile = self.model.tokens_per_tile();
        let count = |row: &[u32]| row.iter().filter(|&&id| id == self.context_id).count();
        ensure!(
            count(&self.input_ids[0]) == 2 * tokens_per_tile
                && count(&self.input_ids[1]) == tokens_per_tile,
            "the fixture's IMG_CONTEXT runs changed"
        );
        Ok(vec![
            PromptInput {
                token_ids: self.input_ids[0].clone(),
                prompt_index: 0,
                pixel_values: Some(self.pixel_values.narrow(0, 0, 2)?),
                image_grids: Vec::new(),
            },
            PromptInput {
                token_ids: self.input_ids[1].clone(),
                prompt_index: 1,
                pixel_values: Some(self.pixel_values.narrow(0, 2, 1)?),
                image_grids: Vec::new(),
            },
            PromptInput::text(vec![38, 14, 84, 68, 66], 2),
        ])
    }

    /// Next-token logits after `sequence` (prompt + response so far), from the full chat forward (vision
    /// tower included) without cache. As in InternVL's `generate`, the image features fill the prompt's
    /// IMG_CONTEXT positions only: a generated IMG_CONTEXT token is an ordinary token embedding.
    fn full_logits(&self, prompt: &PromptInput, sequence: &[u32]) -> r1v2_actors::Result<Vec<f32>> {
        let prompt_len = prompt.token_ids.len();
        let all = Tensor::new(sequence, &Device::Cpu)?.unsqueeze(0)?; // (1, T)
        let prompt_ids = all.narrow(1, 0, prompt_len)?; // (1, P)
        let logits = if sequence.len() == prompt_len {
            self.model
                .forward(&prompt_ids, prompt.pixel_values.as_ref(), None)?
        } else {
            let prompt_embeds = self
                .model
                .embed(&prompt_ids, prompt.pixel_values.as_ref())?; // (1, P, D)
            let response = all.narrow(1, prompt_len, sequence.len() - prompt_len)?; // (1, R)
            let response_embeds = self.model.llm.model.embed_tokens(&response)?; // (1, R, D)
            let embeds = Tensor::cat(&[&prompt_embeds, &response_embeds], 1)?; // (1, T, D)
            self.model.llm.forward_embeds(&embeds, None)?
        }; // (1, T, V)
        Ok(logits.i((0, sequence.len() - 1))?.to_vec1::<f32>()?)
    }

    /// Every rollout equals the uncached reference: same tokens and finish reason, log-probs within 1e-4.
    fn check_against_uncached(
        &self,
        prompts: &[PromptInput],
        groups: &[Vec<Rollout>],
        params: &SamplingParams,
    ) -> Result<()> {
        let cfg = self.model.llm.config();
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
                ensure!(rollout.token_ids == reference.token_ids);
                ensure!(rollout.finish_reason == reference.finish_reason);
                for (ours, theirs) in rollout.logprobs.iter().zip(&reference.logprobs) {
                    ensure!(
                        (ours.policy - theirs.policy).abs() < 1e-4
                            && (ours.processed - theirs.processed).abs() < 1e-4,
                        "{ours:?} vs {theirs:?}"
                    );
                }
            }
        }
        Ok(())
    }
}

fn greedy_equals_argmax_of_full_chat_forwards(variant: &str) -> Result<()> {
    let fixture = load(variant)?;
    let prompts = fixture.prompts()?;
    let params = SamplingParams {
        temperature: 0.0,
        repetition_penalty: 1.0,
        max_new_tokens: 8,
        ..SamplingParams::default()
    };
    let generator = ChatGenerator::new(&fixture.model, &Device::Cpu);
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
                "{variant} prompt {}: {:?} vs argmax {expected:?}",
                prompt.prompt_index,
                rollout.token_ids
            );
        }
    }
    fixture.check_against_uncached(&prompts, &groups, &params)?;
    // (vit6b's greedy responses include the IMG_CONTEXT id itself, which stays a plain token.)
    // The image matters: the two image prompts would not give these tokens with other pixels.
    let mut dimmed = prompts[0].clone();
    dimmed.pixel_values = Some((prompts[0].pixel_values.as_ref().expect("has images") * 0.1)?);
    let moved = fixture.full_logits(&dimmed, &dimmed.token_ids)?;
    let base = fixture.full_logits(&prompts[0], &prompts[0].token_ids)?;
    let diff = moved
        .iter()
        .zip(&base)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    ensure!(
        diff > 1e-3,
        "{variant}: the prompt's logits ignore the image"
    );
    Ok(())
}

#[test]
fn greedy_equals_argmax_of_full_chat_forwards_vit300m() -> Result<()> {
    greedy_equals_argmax_of_full_chat_forwards("vit300m")
}

#[test]
fn greedy_equals_argmax_of_full_chat_forwards_vit6b() -> Result<()> {
    greedy_equals_argmax_of_full_chat_forwards("vit6b")
}

fn sampled_groups_equal_uncached_rows(variant: &str) -> Result<()> {
    let fixture = load(variant)?;
    let prompts = fixture.prompts()?;
    let params = SamplingParams {
        temperature: 1.0,
        top_p: 0.9,
        top_k: 40,
        repetition_penalty: 1.05,
        max_new_tokens: 10,
        // A tenth of the vocabulary stops a row, so rows finish at different steps and leave the batch.
        stop_token_ids: (0..10).collect(),
        seed: 5,
        ..SamplingParams::default()
    };
    let generator = ChatGenerator::new(&fixture.model, &Device::Cpu);
    let mut streamed = vec![vec![Vec::new(); 4]; prompts.len()];
    let groups = generate_groups_streaming(
        &generator,
        &prompts,
        4,
        &params,
        None,
        &mut |at, sample, token| streamed[at][sample as usize].push(token),
    )?;
    fixture.check_against_uncached(&prompts, &groups, &params)?;
    // The vision tower ran once per prompt with images, not once per response.
    ensure!(
        generator.vision_runs() == 2,
        "{variant}: the vision tower ran {} times for 2 image prompts x 4 responses",
        generator.vision_runs()
    );
    for (group, tokens) in groups.iter().zip(&streamed) {
        for (rollout, tokens) in group.iter().zip(tokens) {
            ensure!(&rollout.token_ids == tokens, "the sink missed tokens");
        }
    }
    let lengths: Vec<usize> = groups
        .iter()
        .flat_map(|g| g.iter().map(|r| r.token_ids.len()))
        .collect();
    ensure!(
        lengths.iter().any(|&l| l != lengths[0]),
        "{variant}: every row has the same length {lengths:?}: nothing left the batch early"
    );
    Ok(())
}

#[test]
fn sampled_groups_equal_uncached_rows_vit300m() -> Result<()> {
    sampled_groups_equal_uncached_rows("vit300m")
}

#[test]
fn sampled_groups_equal_uncached_rows_vit6b() -> Result<()> {
    sampled_groups_equal_uncached_rows("vit6b")
}

/// Runs the generator on one prompt and returns the error message it must give.
fn prefill_error(generator: &ChatGenerator, prompt: &PromptInput) -> String {
    match generator.prefill(prompt, 2) {
        Ok(_) => panic!("prompt {} was accepted", prompt.prompt_index),
        Err(err) => err.to_string(),
    }
}

#[test]
fn bad_image_prompts_are_errors_naming_the_prompt() -> Result<()> {
    let fixture = load("vit300m")?;
    let prompts = fixture.prompts()?;
    let generator = ChatGenerator::new(&fixture.model, &Device::Cpu);

    // Three tiles for a prompt with the IMG_CONTEXT run of two.
    let mut too_many_tiles = prompts[0].clone();
    too_many_tiles.prompt_index = 7;
    too_many_tiles.pixel_values = Some(fixture.pixel_values.clone());
    let err = prefill_error(&generator, &too_many_tiles);
    ensure!(
        err.contains("prompt 7") && err.contains("8 <IMG_CONTEXT>") && err.contains("need 12"),
        "{err}"
    );

    // IMG_CONTEXT tokens without images.
    let mut no_images = prompts[0].clone();
    no_images.pixel_values = None;
    let err = prefill_error(&generator, &no_images);
    ensure!(
        err.contains("prompt 0") && err.contains("no images"),
        "{err}"
    );

    // Tiles of the wrong size.
    let mut wrong_size = prompts[1].clone();
    wrong_size.pixel_values = Some(Tensor::zeros((1, 3, 84, 84), DType::F32, &Device::Cpu)?);
    let err = prefill_error(&generator, &wrong_size);
    ensure!(
        err.contains("prompt 1") && err.contains("(tiles, 3, 56, 56)"),
        "{err}"
    );

    // Images for a model whose IMG_CONTEXT id is unknown (the fixture directory has no tokenizer.json).
    let dir = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/internvl/vit300m"
    ));
    let unknown = ChatModel::load(dir, DType::F32, &Device::Cpu, Trainable::frozen())?;
    ensure!(unknown.model.img_context_token_id().is_none());
    let err = prefill_error(
        &ChatGenerator::new(&unknown.model, &Device::Cpu),
        &prompts[1],
    );
    ensure!(
        err.contains("prompt 1") && err.contains("token id is unknown"),
        "{err}"
    );

    // Images for the LLM alone (a model without vision).
    let llm_only = Qwen2Generator::new(&fixture.model.llm, &Device::Cpu);
    let err = match llm_only.prefill(&prompts[1], 1) {
        Ok(_) => panic!("the LLM took images"),
        Err(err) => err.to_string(),
    };
    ensure!(
        err.contains("prompt 1") && err.contains("text only"),
        "{err}"
    );

    // Through the engine too, and nothing ran the vision tower.
    let err = generate_groups(
        &generator,
        &[too_many_tiles],
        2,
        &SamplingParams::default(),
        None,
    )
    .expect_err("a mismatched prompt")
    .to_string();
    ensure!(err.contains("prompt 7"), "{err}");
    ensure!(generator.vision_runs() == 0);
    Ok(())
}
