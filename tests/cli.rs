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
    assert!(err.contains("no *.safetensors"), "{err}");
    std::fs::write(dir.path().join("model.safetensors"), b"\x05\x00")?;
    let err = stderr(&r1v2(&["inspect", "--model", path_str(dir.path())]));
    assert!(
        err.contains("model.safetensors") && err.contains("not a safetensors file"),
        "{err}"
    );
    Ok(())
}

#[allow(dead_code)]
fn fixture(group: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures")).join(group)
}
