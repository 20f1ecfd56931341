//! `r1v2 generate` end to end: its output for a fixed seed equals the library's `generate_groups` on the same
//! prompt, for a chat model with an image, a tiny Qwen2.5-VL with images and a plain Qwen2; bad input is an error, never a panic.
//!
//! Model directories are built in a temp dir from the tiny fixtures (tests/fixtures/internvl/vit300m and
//! tests/fixtures/qwen2/untied) with the tokenizer of tests/fixtures/preprocess (328 ids): the fixtures'
//! vocabularies (96 and 256 ids) are widened to 328 by appending embedding and LM-head rows (copies of the
//! first rows, scaled so that no two rows are equal), and `vocab_size` is set to match.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor};
use r1v2::cli::generate::describe_finish;
use r1v2::prompting::PromptEncoder;
use r1v2_actors::generate::chat::ChatGenerator;
use r1v2_actors::generate::qwen2::Qwen2Generator;
use r1v2_actors::generate::qwen2_5_vl::Qwen25VlGenerator;
use r1v2_actors::generate::{generate_groups, PromptInput, Rollout, SamplingParams};
use r1v2_actors::model::chat::{ChatModel, Trainable};
use r1v2_actors::model::weights::WeightStore;
use r1v2_actors::model::{qwen2, qwen2_5_vl};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
const VOCAB: usize = 328;

fn fixture(path: &str) -> PathBuf {
    Path::new(FIXTURES).join(path)
}

fn r1v2(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_r1v2"))
        .args(args)
        .output()
        .expect("the r1v2 binary runs")
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}

/// `rows` rows of `weight` (V, D): the original ones, then copies of them scaled by 1 + 0.05 k.
fn widen(weight: &Tensor, rows: usize) -> Result<Tensor> {
    let original = weight.dim(0)?;
    let mut parts = vec![weight.clone()];
    let mut have = original;
    let mut copy = 1;
    while have < rows {
        let take = (rows - have).min(original);
        parts.push((weight.narrow(0, 0, take)? * (1.0 + 0.05 * copy as f64))?);
        have += take;
        copy += 1;
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// A copy of the fixture model in `fixture_dir` with a vocabulary of [`VOCAB`] ids and the fixture tokenizer.
/// `prefix` is where the LLM's tensors live (`language_model.` for a chat model), `vocab_pointer` the JSON
/// pointer of its config's `vocab_size`.
fn widened_model(
    fixture_dir: &str,
    prefix: &str,
    vocab_pointer: &str,
) -> Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    let source = fixture(fixture_dir);
    let mut tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(source.join("model.safetensors"), &Device::Cpu)?;
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
        let name = format!("{prefix}{name}");
        let widened = widen(&tensors[&name], VOCAB)?;
        tensors.insert(name, widened);
    }
    candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors"))?;
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(source.join("config.json"))?)?;
    *config
        .pointer_mut(vocab_pointer)
        .expect("the fixture config has a vocab size") = VOCAB.into();
    std::fs::write(dir.path().join("config.json"), config.to_string())?;
    std::fs::copy(
        fixture("preprocess/tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )?;
    Ok(dir)
}

fn chat_model() -> Result<tempfile::TempDir> {
    widened_model(
        "internvl/vit300m",
        "language_model.",
        "/llm_config/vocab_size",
    )
}

fn qwen2_model() -> Result<tempfile::TempDir> {
    widened_model("qwen2/untied", "", "/vocab_size")
}

/// The sampling the tests ask the CLI for (and give the library).
fn params(encoder: &PromptEncoder, seed: u64, max_new_tokens: usize) -> SamplingParams {
    SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
        top_k: 50,
        repetition_penalty: 1.1,
        max_new_tokens,
        stop_token_ids: encoder.stop_token_ids(),
        seed,
        ..SamplingParams::default()
    }
}

fn cli_args<'a>(dir: &'a Path, prompt: &'a str, seed: &'a str, max: &'a str) -> Vec<&'a str> {
    vec![
        "generate",
        "--model",
        path_str(dir),
        "--prompt",
        prompt,
        "--seed",
        seed,
        "--temperature",
        "0.9",
        "--top-p",
        "0.95",
        "--top-k",
        "50",
        "--repetition-penalty",
        "1.1",
        "--max-new-tokens",
        max,
    ]
}

/// The library's group for `question` (+ `images`) on the model of `dir`.
fn library_group(
    dir: &Path,
    question: &str,
    images: &[PathBuf],
    n: usize,
    seed: u64,
    max_new_tokens: usize,
) -> Result<Vec<Rollout>> {
    let encoder = PromptEncoder::from_model_dir(dir, &Device::Cpu, DType::F32)?;
    let encoded = encoder.encode(question, images)?;
    let prompt = PromptInput {
        token_ids: encoded.token_ids,
        prompt_index: 0,
        pixel_values: encoded.pixel_values,
        image_grids: encoded.image_grids,
    };
    let params = params(&encoder, seed, max_new_tokens);
    let decode = |ids: &[u32]| {
        encoder
            .decode(ids)
            .map_err(|err| r1v2_actors::Error::msg(err.to_string()))
    };
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
    let mut groups = if config["model_type"] == "qwen2" {
        let cfg = qwen2::Config::from_file(&dir.join("config.json"))?;
        let store = WeightStore::load(dir, DType::F32, &Device::Cpu)?;
        let mut model = qwen2::ForCausalLM::new(&cfg, store.frozen_var_builder())?;
        model.pack_weights()?; // as the CLI does
        let generator = Qwen2Generator::new(&model, &Device::Cpu);
        generate_groups(&generator, &[prompt], n, &params, Some(&decode))?
    } else if config["model_type"] == "qwen2_5_vl" {
        let model = qwen2_5_vl::load_dir(dir, DType::F32, &Device::Cpu, |_| false)?.model;
        let mut decoder = model.causal_lm()?;
        decoder.pack_weights()?; // as the CLI does
        let generator = Qwen25VlGenerator::new(&model, &decoder, &Device::Cpu);
        generate_groups(&generator, &[prompt], n, &params, Some(&decode))?
    } else {
        let mut loaded = ChatModel::load(dir, DType::F32, &Device::Cpu, Trainable::frozen())?;
        loaded.model.llm.pack_weights()?; // as the CLI does
        let generator = ChatGenerator::new(&loaded.model, &Device::Cpu);
        generate_groups(&generator, &[prompt], n, &params, Some(&decode))?
    };
    Ok(groups.remove(0))
}

/// The CLI's `--json` lines equal the library's rollouts: token ids, text, finish reason, log-probs.
fn check_json_output(output: &Output, group: &[Rollout]) -> Result<()> {
    ensure!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(output.stdout.clone())?
        .lines()
        .map(serde_json::from_str)
        .collect::<std::result::Result<_, _>>()?;
    ensure!(lines.len() == group.len());
    for (line, rollout) in lines.iter().zip(group) {
        let ids: Vec<u32> = serde_json::from_value(line["token_ids"].clone())?;
        ensure!(
            ids == rollout.token_ids,
            "{ids:?} vs {:?}",
            rollout.token_ids
        );
        ensure!(line["sample_index"] == rollout.sample_index);
        ensure!(line["text"].as_str() == rollout.text.as_deref());
        ensure!(line["finish_reason"] == describe_finish(rollout.finish_reason));
        let logprobs: Vec<f32> = serde_json::from_value(line["logprobs"].clone())?;
        ensure!(logprobs == rollout.behaviour_logprobs());
    }
    Ok(())
}

#[test]
fn chat_model_with_an_image_matches_the_library() -> Result<()> {
    let dir = chat_model()?;
    let image = fixture("preprocess/img_wide.png");
    let question = "What is in <image>?";
    let group = library_group(
        dir.path(),
        question,
        std::slice::from_ref(&image),
        3,
        11,
        12,
    )?;
    let mut args = cli_args(dir.path(), question, "11", "12");
    args.extend(["--image", path_str(&image), "-n", "3", "--json"]);
    check_json_output(&r1v2(&args), &group)?;
    // Text output for n > 1: every response with its finish reason.
    args.pop();
    let output = r1v2(&args);
    ensure!(output.status.success());
    let stdout = String::from_utf8(output.stdout)?;
    for rollout in group {
        let header = format!(
            "--- response {}/3 (finish: {}, {} tokens) ---\n",
            rollout.sample_index + 1,
            describe_finish(rollout.finish_reason),
            rollout.token_ids.len()
        );
        let text = rollout.text.as_deref().unwrap_or_default();
        ensure!(stdout.contains(&format!("{header}{text}\n")), "{stdout}");
    }
    Ok(())
}

#[test]
fn streamed_single_response_is_the_library_text() -> Result<()> {
    let dir = chat_model()?;
    let image = fixture("preprocess/img_square.png");
    let group = library_group(
        dir.path(),
        "Describe it.",
        std::slice::from_ref(&image),
        1,
        3,
        20,
    )?;
    let mut args = cli_args(dir.path(), "Describe it.", "3", "20");
    args.extend(["--image", path_str(&image)]);
    let output = r1v2(&args);
    ensure!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let rollout = &group[0];
    let text = rollout.text.as_deref().unwrap_or_default();
    ensure!(!text.is_empty(), "the library produced no text to compare");
    ensure!(String::from_utf8(output.stdout)? == format!("{text}\n"));
    let stderr = String::from_utf8(output.stderr)?;
    ensure!(
        stderr.contains(&format!(
            "[finish: {}",
            describe_finish(rollout.finish_reason)
        )),
        "{stderr}"
    );
    Ok(())
}

#[test]
fn qwen2_model_matches_the_library() -> Result<()> {
    let dir = qwen2_model()?;
    let group = library_group(dir.path(), "Tell me a story.", &[], 2, 5, 15)?;
    let mut args = cli_args(dir.path(), "Tell me a story.", "5", "15");
    args.extend(["-n", "2", "--json"]);
    check_json_output(&r1v2(&args), &group)?;
    // Another seed gives other responses (the seed reaches the sampler).
    let other = library_group(dir.path(), "Tell me a story.", &[], 2, 6, 15)?;
    ensure!(other != group);
    Ok(())
}

#[test]
fn qwen2_5_vl_model_with_images_matches_the_library() -> Result<()> {
    let dir = tempfile::tempdir()?;
    r1v2::tiny::write_vl_policy_model(dir.path(), &r1v2::config::TinySpec::default())?;
    let images = [
        fixture("preprocess/img_wide.png"),
        fixture("preprocess/img_tall.png"),
    ];
    let question = "Compare <image> and <image>.";
    let group = library_group(dir.path(), question, &images, 2, 7, 10)?;
    let mut args = cli_args(dir.path(), question, "7", "10");
    for image in &images {
        args.extend(["--image", path_str(image)]);
    }
    args.extend(["-n", "2", "--json"]);
    check_json_output(&r1v2(&args), &group)?;
    // The images reach the model: other images give other responses.
    let other = library_group(
        dir.path(),
        question,
        &[images[1].clone(), images[0].clone()],
        2,
        7,
        10,
    )?;
    ensure!(other != group, "swapping the images changed nothing");
    Ok(())
}

/// Runs the CLI expecting a failure whose stderr holds every one of `needles`, and no panic.
fn expect_error(args: &[&str], needles: &[&str]) -> Result<()> {
    let output = r1v2(args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(!output.status.success(), "{args:?} succeeded");
    ensure!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    for needle in needles {
        ensure!(
            stderr.contains(needle),
            "{args:?}: no `{needle}` in {stderr}"
        );
    }
    Ok(())
}

#[test]
fn bad_input_is_a_clear_error() -> Result<()> {
    let chat = chat_model()?;
    let qwen = qwen2_model()?;
    let (chat_dir, qwen_dir) = (path_str(chat.path()), path_str(qwen.path()));
    let square = fixture("preprocess/img_square.png");
    let square = path_str(&square);
    expect_error(
        &["generate", "--model", chat_dir, "--prompt", " "],
        &["prompt is empty"],
    )?;
    expect_error(
        &["generate", "--model", chat_dir, "--prompt", "hi", "-n", "0"],
        &["n"],
    )?;
    expect_error(
        &[
            "generate", "--model", chat_dir, "--prompt", "hi", "--top-p", "1.5",
        ],
        &["top_p", "(0, 1]"],
    )?;
    expect_error(
        &[
            "generate", "--model", chat_dir, "--prompt", "hi", "--top-p", "0",
        ],
        &["top_p"],
    )?;
    expect_error(
        &[
            "generate", "--model", qwen_dir, "--prompt", "hi", "--image", square,
        ],
        &["config.json", "takes no images"],
    )?;
    expect_error(
        &[
            "generate",
            "--model",
            chat_dir,
            "--prompt",
            "hi",
            "--image",
            "/no/such/picture.png",
        ],
        &["/no/such/picture.png"],
    )?;
    expect_error(
        &["generate", "--model", "/no/such/model", "--prompt", "hi"],
        &["/no/such/model", "does not exist"],
    )?;
    // The Qwen2 fixture's context is 128 tokens.
    let long = "story ".repeat(200);
    expect_error(
        &["generate", "--model", qwen_dir, "--prompt", &long],
        &["context is 128"],
    )?;
    // More image tokens than the chat model's context (256) holds.
    let wide = fixture("preprocess/img_wide.png");
    let encoder = PromptEncoder::from_model_dir(chat.path(), &Device::Cpu, DType::F32)?;
    let one = encoder
        .encode("<image>", std::slice::from_ref(&wide))?
        .token_ids
        .len();
    let two = encoder
        .encode("<image><image>", &[wide.clone(), wide.clone()])?
        .token_ids
        .len();
    let per_image = two - one;
    let count = 256 / per_image + 1;
    let question = "<image>".repeat(count);
    let mut args = vec!["generate", "--model", chat_dir, "--prompt", &question];
    for _ in 0..count {
        args.extend(["--image", path_str(&wide)]);
    }
    expect_error(&args, &["context is 256"])?;
    Ok(())
}
