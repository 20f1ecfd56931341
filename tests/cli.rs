//! The `r1v2` binary end to end: `inspect` and `forward` on model directories, and their error messages.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

fn r1v2(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_r1v2"))
        .args(args)
        .output()
        .expect("the r1v2 binary runs")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A model directory with `config` and zero-filled tensors of the given shapes.
fn fake_model(
    dir: &Path,
    config: serde_json::Value,
    tensors: &[(&str, &[usize], DType)],
) -> Result<()> {
    std::fs::write(dir.join("config.json"), serde_json::to_string(&config)?)?;
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(name, shape, dtype)| {
            Ok((
                name.to_string(),
                Tensor::zeros(*shape, *dtype, &Device::Cpu)?,
            ))
        })
        .collect::<Result<_>>()?;
    candle_core::safetensors::save(&map, dir.join("model.safetensors"))?;
    Ok(())
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}

#[test]
fn inspect_counts_parameters_per_module() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = serde_json::json!({
        "model_type": "internvl_chat", "architectures": ["InternVLChatModel"], "force_image_size": 32,
        "max_dynamic_patch": 6, "downsample_ratio": 0.5,
        "vision_config": {"image_size": 32, "patch_size": 8, "hidden_size": 16},
        "llm_config": {"model_type": "qwen2", "hidden_size": 24, "num_hidden_layers": 1, "vocab_size": 10,
                       "tie_word_embeddings": false}
    });
    fake_model(
        dir.path(),
        config,
        &[
            (
                "vision_model.embeddings.patch_embedding.weight",
                &[16, 3, 8, 8],
                DType::F32,
            ),
            ("mlp1.1.weight", &[24, 64], DType::F32),
            (
                "language_model.model.embed_tokens.weight",
                &[10, 24],
                DType::BF16,
            ),
            ("language_model.lm_head.weight", &[10, 24], DType::BF16),
        ],
    )?;
    let output = r1v2(&["inspect", "--model", path_str(dir.path()), "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    assert_eq!(summary["parameters"]["vision"], 16 * 3 * 8 * 8);
    assert_eq!(summary["parameters"]["adapter"], 24 * 64);
    assert_eq!(summary["parameters"]["llm"], 240);
    assert_eq!(summary["parameters"]["head"], 240);
    assert_eq!(summary["total_parameters"], 3072 + 1536 + 480);
    assert_eq!(summary["dtypes"]["bf16"], 2);
    assert_eq!(summary["dtypes"]["f32"], 2);
    assert_eq!(summary["vision"]["tile_size"], 32);
    let text = r1v2(&["inspect", "--model", path_str(dir.path())]);
    assert!(text.status.success(), "{}", stderr(&text));
    let text = String::from_utf8(text.stdout)?;
    assert!(
        text.contains("adapter") && text.contains("1536") && text.contains("bf16 (2 tensors)"),
        "{text}"
    );
    Ok(())
}

#[test]
fn inspect_reports_value_head_models() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = serde_json::json!({"model_type": "qwen2", "architectures": ["Qwen2ForSequenceClassification"],
                                    "hidden_size": 8, "vocab_size": 5, "num_labels": 1});
    fake_model(
        dir.path(),
        config,
        &[
            ("model.embed_tokens.weight", &[5, 8], DType::F32),
            ("score.weight", &[1, 8], DType::F32),
        ],
    )?;
    let output = r1v2(&["inspect", "--model", path_str(dir.path()), "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    assert!(
        summary["kind"]
            .as_str()
            .unwrap_or_default()
            .contains("value head"),
        "{summary}"
    );
    assert_eq!(summary["parameters"]["head"], 8);
    assert_eq!(summary["parameters"]["llm"], 40);
    Ok(())
}

#[test]
fn unknown_model_type_is_a_clear_error() -> Result<()> {
    let dir = tempfile::tempdir()?;
    fake_model(
        dir.path(),
        serde_json::json!({"model_type": "llama"}),
        &[("w", &[1], DType::F32)],
    )?;
    let output = r1v2(&["inspect", "--model", path_str(dir.path())]);
    assert!(!output.status.success());
    let err = stderr(&output);
    assert!(
        err.contains("config.json")
            && err.contains("llama")
            && err.contains("qwen2, internvl_chat, skywork_chat"),
        "{err}"
    );
    Ok(())
}

#[test]
fn missing_config_or_weights_name_the_path() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let output = r1v2(&["inspect", "--model", path_str(dir.path())]);
    assert!(!output.status.success());
    let err = stderr(&output);
    assert!(
        err.contains(&dir.path().join("config.json").display().to_string()),
        "{err}"
    );
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"model_type": "qwen2",}"#,
    )?;
    let err = stderr(&r1v2(&["inspect", "--model", path_str(dir.path())]));
    assert!(
        err.contains("config.json") && err.contains("invalid JSON"),
        "{err}"
    );
    std::fs::write(dir.path().join("config.json"), r#"{"model_type": "qwen2"}"#)?;
    let err = stderr(&r1v2(&["inspect", "--model", path_str(dir.path())]));
    assert!(
        err.contains("neither model.safetensors nor model.safetensors.index.json"),
        "{err}"
    );
    std::fs::write(dir.path().join("model.safetensors"), b"\x05\x00")?;
    let err = stderr(&r1v2(&["inspect", "--model", path_str(dir.path())]));
    assert!(
        err.contains("model.safetensors") && err.contains("not a safetensors file"),
        "{err}"
    );
    Ok(())
}

fn fixture(group: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures")).join(group)
}

/// Writes the Qwen2 fixture's padded batch (tests/fixtures/gen_qwen2.py) as a forward input file.
fn qwen2_input(dir: &Path) -> Result<(PathBuf, HashMap<String, Tensor>)> {
    let io = candle_core::safetensors::load(fixture("qwen2").join("io.safetensors"), &Device::Cpu)?;
    let ids: Vec<Vec<i64>> = io["input_ids"].to_vec2()?;
    let mask: Vec<Vec<i64>> = io["attention_mask"].to_vec2()?;
    let path = dir.join("input.json");
    std::fs::write(
        &path,
        serde_json::to_string(&serde_json::json!({"input_ids": ids, "attention_mask": mask}))?,
    )?;
    Ok((path, io))
}

/// Max |a - b| over the real (mask 1) positions of (B, T, V) logits.
fn max_diff_real_positions(ours: &Tensor, reference: &Tensor, mask: &Tensor) -> Result<f32> {
    let keep = mask.to_dtype(DType::F32)?.unsqueeze(2)?; // (B, T, 1)
    let diff = (ours - reference)?.abs()?.broadcast_mul(&keep)?;
    Ok(diff.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

/// Runs `r1v2 forward` and returns the written tensors.
fn run_forward(model: &Path, input: &Path, out_dir: &Path) -> Result<HashMap<String, Tensor>> {
    let output_path = out_dir.join("out.safetensors");
    let output = r1v2(&[
        "forward",
        "--model",
        path_str(model),
        "--input",
        path_str(input),
        "--output",
        path_str(&output_path),
    ]);
    assert!(
        output.status.success(),
        "forward failed: {}",
        stderr(&output)
    );
    Ok(candle_core::safetensors::load(&output_path, &Device::Cpu)?)
}

#[test]
fn forward_matches_transformers_qwen2_logits() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (input, io) = qwen2_input(dir.path())?;
    // tied: f32, sharded checkpoint; untied: stored bf16 (reference ran on the same rounded weights).
    for name in ["tied", "untied"] {
        let out = run_forward(&fixture("qwen2").join(name), &input, dir.path())?;
        let logits = &out["logits"];
        let reference = &io[&format!("{name}_logits")];
        assert_eq!(logits.dtype(), DType::F32);
        assert_eq!(logits.dims(), reference.dims(), "{name}");
        let diff = max_diff_real_positions(logits, reference, &io["attention_mask"])?;
        println!("{name}: max |logits - transformers| = {diff:.2e}");
        assert!(diff < 1e-4, "{name}: max |diff| {diff}");
    }
    Ok(())
}

#[test]
fn forward_writes_value_head_scores() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (input, io) = qwen2_input(dir.path())?;
    let out = run_forward(&fixture("qwen2").join("value"), &input, dir.path())?;
    assert!(!out.contains_key("logits"));
    let scores = &out["scores"];
    assert_eq!(scores.dims(), io["value_scores"].dims());
    let diff = (scores - &io["value_scores"])?
        .abs()?
        .max(0)?
        .to_scalar::<f32>()?;
    println!("value: max |scores - transformers| = {diff:.2e}");
    assert!(diff < 1e-4, "max |diff| {diff}");
    Ok(())
}

#[test]
fn forward_rejects_bad_inputs_with_clear_errors() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = fixture("qwen2").join("tied");
    let out = dir.path().join("out.safetensors");
    let cases: [(&str, &str); 6] = [
        (
            "{\"input_ids\": [[1, 2], [3]]}",
            "`input_ids[1]` has 1 tokens",
        ),
        (
            "{\"input_ids\": [[1, 2]], \"extra\": 1}",
            "unknown field `extra`",
        ),
        ("{\"input_ids\": [[1, 2]]", "invalid forward input"),
        ("{\"input_ids\": []}", "`input_ids` is empty"),
        (
            "{\"input_ids\": [[1, 99999]]}",
            "token id 99999 is out of the model's vocabulary (256 ids)",
        ),
        (
            "{\"input_ids\": [[1, 2]], \"images\": [\"a.png\"]}",
            "takes no images",
        ),
    ];
    for (json, expected) in cases {
        let input = dir.path().join("bad.json");
        std::fs::write(&input, json)?;
        let output = r1v2(&[
            "forward",
            "--model",
            path_str(&model),
            "--input",
            path_str(&input),
            "--output",
            path_str(&out),
        ]);
        assert!(!output.status.success(), "{json} was accepted");
        let err = stderr(&output);
        assert!(
            err.contains("bad.json") && err.contains(expected),
            "{json}: {err}"
        );
    }
    let missing = dir.path().join("missing.json");
    let output = r1v2(&[
        "forward",
        "--model",
        path_str(&model),
        "--input",
        path_str(&missing),
        "--output",
        path_str(&out),
    ]);
    assert!(
        stderr(&output).contains("missing.json"),
        "{}",
        stderr(&output)
    );
    Ok(())
}

/// A copy of the vit300m chat fixture (tests/fixtures/gen_internvl.py) with a minimal tokenizer.json that
/// names the fixture's `<IMG_CONTEXT>` id, and an input file asking for one image file.
fn chat_model_with_image(
    dir: &Path,
    image_tokens: usize,
) -> Result<(PathBuf, PathBuf, HashMap<String, Tensor>)> {
    let source = fixture("internvl").join("vit300m");
    let model = dir.join("model");
    std::fs::create_dir_all(&model)?;
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(source.join(file), model.join(file))?;
    }
    let reference =
        candle_core::safetensors::load(source.join("reference.safetensors"), &Device::Cpu)?;
    let id = |name: &str| -> Result<i64> { Ok(reference[name].to_vec1::<i64>()?[0]) };
    let (context, start, end) = (
        id("img_context_token_id")?,
        id("img_start_token_id")?,
        id("img_end_token_id")?,
    );
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "normalizer": null, "pre_tokenizer": null,
        "post_processor": null, "decoder": null,
        "added_tokens": [{"id": context, "content": "<IMG_CONTEXT>", "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": true}],
        "model": {"type": "WordLevel", "vocab": {"<unk>": 0, "<IMG_CONTEXT>": context}, "unk_token": "<unk>"}
    });
    std::fs::write(
        model.join("tokenizer.json"),
        serde_json::to_string(&tokenizer)?,
    )?;
    std::fs::copy(
        fixture("preprocess").join("img_wide.png"),
        dir.join("wide.png"),
    )?;
    let mut ids = vec![5, 7, start];
    ids.extend(std::iter::repeat_n(context, image_tokens));
    ids.extend([end, 9, 11]);
    let input = dir.join("input.json");
    std::fs::write(
        &input,
        serde_json::to_string(&serde_json::json!({"input_ids": [ids], "images": ["wide.png"]}))?,
    )?;
    Ok((model, input, reference))
}

#[test]
fn forward_runs_the_chat_model_on_an_image_file() -> Result<()> {
    use r1v2::images::{load_image, TilingConfig};
    use r1v2_actors::model::chat::{ChatModel, Trainable};
    let dir = tempfile::tempdir()?;
    // img_wide.png (61x23) with 56 px tiles, max 12: a 5x2 grid + thumbnail = 11 tiles x 4 tokens.
    let (model, input, reference) = chat_model_with_image(dir.path(), 44)?;
    let out = run_forward(&model, &input, dir.path())?;
    let logits = &out["logits"];
    // The same pass through the library: preprocessing (checked against PIL in tests/preprocess.rs) and the
    // chat model (checked against transformers in actors/tests/internvl_chat.rs).
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json"))?)?;
    let tiling = TilingConfig::from_model_config(&config, &model.join("config.json"))?;
    let image = load_image(&dir.path().join("wide.png"), &tiling, &Device::Cpu)?;
    assert_eq!(image.num_tiles(), 11);
    let mut loaded = ChatModel::load(&model, DType::F32, &Device::Cpu, Trainable::frozen())?;
    loaded
        .model
        .set_img_context_token_id(reference["img_context_token_id"].to_vec1::<i64>()?[0] as u32);
    let input_json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&input)?)?;
    let ids: Vec<Vec<u32>> = serde_json::from_value(input_json["input_ids"].clone())?;
    let ids = Tensor::new(ids, &Device::Cpu)?;
    let expected = loaded
        .model
        .forward(&ids, Some(&image.pixel_values), None)?;
    assert_eq!(logits.dims(), expected.dims());
    let diff = (logits - &expected)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    assert!(diff < 1e-5, "CLI vs library: {diff}");
    // The image matters: a different image gives different logits.
    let other = (&image.pixel_values * 0.5)?;
    let moved = (loaded.model.forward(&ids, Some(&other), None)? - &expected)?
        .abs()?
        .flatten_all()?
        .max(0)?;
    assert!(
        moved.to_scalar::<f32>()? > 1e-3,
        "the image does not change the logits"
    );
    Ok(())
}

#[test]
fn chat_forward_errors_name_the_problem() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("out.safetensors");
    // Wrong number of IMG_CONTEXT tokens for the image.
    let (model, input, _) = chat_model_with_image(dir.path(), 43)?;
    let output = r1v2(&[
        "forward",
        "--model",
        path_str(&model),
        "--input",
        path_str(&input),
        "--output",
        path_str(&out),
    ]);
    let err = stderr(&output);
    assert!(
        !output.status.success()
            && err.contains("input.json")
            && err.contains("hold 43")
            && err.contains("need 44"),
        "{err}"
    );
    // A missing image names the file.
    let (model, input, _) = chat_model_with_image(dir.path(), 44)?;
    std::fs::remove_file(dir.path().join("wide.png"))?;
    let err = stderr(&r1v2(&[
        "forward",
        "--model",
        path_str(&model),
        "--input",
        path_str(&input),
        "--output",
        path_str(&out),
    ]));
    assert!(err.contains("wide.png"), "{err}");
    // No tokenizer.json: the IMG_CONTEXT id cannot be known.
    let (model, input, _) = chat_model_with_image(dir.path(), 44)?;
    std::fs::remove_file(model.join("tokenizer.json"))?;
    let err = stderr(&r1v2(&[
        "forward",
        "--model",
        path_str(&model),
        "--input",
        path_str(&input),
        "--output",
        path_str(&out),
    ]));
    assert!(err.contains("tokenizer.json"), "{err}");
    Ok(())
}

#[test]
fn inspect_agrees_with_the_loaded_fixture_models() -> Result<()> {
    use r1v2_actors::model::chat::{ChatModel, Trainable};
    let chat = fixture("internvl").join("vit300m");
    let output = r1v2(&["inspect", "--model", path_str(&chat), "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let loaded = ChatModel::load(&chat, DType::F32, &Device::Cpu, Trainable::frozen())?;
    let counts: HashMap<String, usize> = loaded.parameter_counts().into_iter().collect();
    let parameters = &summary["parameters"];
    assert_eq!(parameters["vision"], counts["vision_model"]);
    assert_eq!(parameters["adapter"], counts["mlp1"]);
    let llm_and_head =
        parameters["llm"].as_u64().unwrap_or(0) + parameters["head"].as_u64().unwrap_or(0);
    assert_eq!(llm_and_head as usize, counts["language_model"]);
    assert_eq!(summary["total_parameters"], counts.values().sum::<usize>());
    assert!(summary["parameters"].get("other").is_none(), "{summary}");
    assert_eq!(summary["vision"]["tile_size"], 56);
    // A sharded checkpoint: every shard is counted.
    let sharded = r1v2(&[
        "inspect",
        "--model",
        path_str(&fixture("qwen2").join("tied")),
    ]);
    assert!(sharded.status.success(), "{}", stderr(&sharded));
    let text = String::from_utf8(sharded.stdout)?;
    assert!(text.contains("(tied to embed_tokens)"), "{text}");
    Ok(())
}
