//! Qwen2.5-VL / Skywork-VL Reward end to end: preprocessing against transformers' processor, `r1v2 forward`
//! and `r1v2 inspect` on both checkpoint layouts, and `r1v2 train-rm` (training, held-out accuracy, resume,
//! bad lines).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::Result;
use candle_core::{DType, Device, Tensor, D};
use r1v2::images::qwen2_vl::{preprocess, ProcessorConfig};
use r1v2::images::read_rgb;

fn r1v2(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_r1v2"))
        .args(args)
        .output()
        .expect("the r1v2 binary runs")
}

fn ok(output: &Output) -> String {
    assert!(
        output.status.success(),
        "r1v2 failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/qwen2_5_vl")
        .join(rel)
}

fn io() -> Result<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(
        fixture("io.safetensors"),
        &Device::Cpu,
    )?)
}

fn s(path: &Path) -> &str {
    path.to_str().expect("UTF-8 paths")
}

#[test]
fn qwen2_vl_preprocessing_equals_the_transformers_processor() -> Result<()> {
    let io = io()?;
    let cfg = ProcessorConfig::from_dir(&fixture("released"))?;
    assert_eq!(cfg, ProcessorConfig::from_dir(&fixture("v5"))?);
    for key in ["a", "b", "c", "d"] {
        let patches = preprocess(&read_rgb(&fixture(&format!("img_{key}.png")))?, &cfg)?;
        let want_grid = io[&format!("grid_{key}")]
            .to_dtype(DType::U32)?
            .to_vec1::<u32>()?;
        let grid: Vec<u32> = patches.grid.iter().map(|&g| g as u32).collect();
        assert_eq!(grid, want_grid, "img_{key}: grid");
        let n = patches.values.len() / (3 * 2 * 196);
        let ours = Tensor::from_vec(patches.values, (n, 3, 2, 196), &Device::Cpu)?;
        let first = ours.narrow(2, 0, 1)?.squeeze(2)?;
        let second = ours.narrow(2, 1, 1)?.squeeze(2)?;
        let want = &io[&format!("pixels_{key}")];
        let diff = (&first - want)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert_eq!(diff, 0.0, "img_{key}: pixel values differ by {diff}");
        assert_eq!(first.to_vec3::<f32>()?, second.to_vec3::<f32>()?);
    }
    Ok(())
}

/// The fixture batch as a forward input file (images by absolute path).
fn forward_input(dir: &Path, with_images: bool) -> Result<PathBuf> {
    let io = io()?;
    let ids = io["input_ids"].to_dtype(DType::U32)?.to_vec2::<u32>()?;
    let mask = io["attention_mask"]
        .to_dtype(DType::U32)?
        .to_vec2::<u32>()?;
    let images: Vec<String> = ["a", "b", "d"]
        .iter()
        .map(|k| s(&fixture(&format!("img_{k}.png"))).to_string())
        .collect();
    let input = if with_images {
        serde_json::json!({"input_ids": ids, "attention_mask": mask, "images": images})
    } else {
        serde_json::json!({"input_ids": ids, "attention_mask": mask})
    };
    let path = dir.join("input.json");
    std::fs::write(&path, serde_json::to_string(&input)?)?;
    Ok(path)
}

#[test]
fn forward_on_qwen2_5_vl_from_image_files_matches_transformers() -> Result<()> {
    let io = io()?;
    let tmp = tempfile::tempdir()?;
    let input = forward_input(tmp.path(), true)?;

    // With value_head.safetensors: scores.
    let out = tmp.path().join("scores.safetensors");
    ok(&r1v2(&[
        "forward",
        "--model",
        s(&fixture("released")),
        "--input",
        s(&input),
        "--output",
        s(&out),
    ]));
    let scores = candle_core::safetensors::load(&out, &Device::Cpu)?["scores"].clone();
    let diff = (&scores - &io["scores"])?
        .abs()?
        .max(0)?
        .to_scalar::<f32>()?;
    assert!(diff < 1e-4, "scores differ by {diff}");

    // Without: logits (transformers 5 layout).
    let out = tmp.path().join("logits.safetensors");
    ok(&r1v2(&[
        "forward",
        "--model",
        s(&fixture("v5")),
        "--input",
        s(&input),
        "--output",
        s(&out),
    ]));
    let logits = candle_core::safetensors::load(&out, &Device::Cpu)?["logits"].clone();
    let mask = io["attention_mask"]
        .to_dtype(DType::F32)?
        .unsqueeze(D::Minus1)?;
    let diff = (&logits - &io["logits"])?.abs()?.broadcast_mul(&mask)?;
    let diff = diff.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    assert!(diff < 1e-4, "logits differ by {diff}");

    // The pad runs without their images are refused, naming the input file.
    let bare = forward_input(&tmp.path().join(""), false)?;
    let output = r1v2(&[
        "forward",
        "--model",
        s(&fixture("v5")),
        "--input",
        s(&bare),
        "--output",
        s(&out),
    ]);
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(err.contains("pad tokens"), "{err}");
    Ok(())
}

#[test]
fn inspect_reports_the_qwen2_5_vl_modules_and_the_value_head() -> Result<()> {
    for (layout, head) in [("released", 32 * 256 + 33), ("v5", 32 * 256)] {
        let out = ok(&r1v2(&[
            "inspect",
            "--model",
            s(&fixture(layout)),
            "--json",
        ]));
        let summary: serde_json::Value = serde_json::from_str(&out)?;
        assert_eq!(summary["model_type"], "qwen2_5_vl");
        let params = &summary["parameters"];
        assert_eq!(params["head"], head, "{layout}: {summary}");
        // vision: patch embed 16 x 1176 + 3 blocks; adapter: the merger 64 x 64 + 64 + 64 x 32 + 32 + 16.
        assert_eq!(
            params["adapter"],
            64 * 64 + 64 + 64 * 32 + 32 + 16,
            "{layout}: {summary}"
        );
        assert!(
            params["vision"].as_u64() > Some(16 * 1176),
            "{layout}: {summary}"
        );
        assert!(
            params["llm"].as_u64() > Some(256 * 32),
            "{layout}: {summary}"
        );
        assert!(params.get("other").is_none(), "{layout}: {summary}");
        assert_eq!(summary["vision"]["depth"], 3);
    }
    Ok(())
}

/// Separable pairs: the chosen answer gives one (a colour), the rejected one refuses.
fn write_pairs(path: &Path, count: usize, offset: usize) -> Result<()> {
    let colours = ["red", "green", "blue", "yellow", "purple", "white"];
    let refusals = ["I do not know.", "No idea, sorry.", "Cannot tell."];
    let mut lines = String::new();
    for i in offset..offset + count {
        let right = colours[(i * 7 + i / 3) % colours.len()];
        let line = serde_json::json!({
            "question": format!("What colour is shape {i}?"),
            "images": [],
            "chosen": format!("The answer is {right}."),
            "rejected": refusals[i % refusals.len()],
        });
        lines += &format!("{line}\n");
    }
    std::fs::write(path, lines)?;
    Ok(())
}

fn rm_config(dir: &Path, steps: u64) -> Result<PathBuf> {
    write_pairs(&dir.join("pairs.jsonl"), 48, 0)?;
    write_pairs(&dir.join("held_out.jsonl"), 16, 100)?;
    let config = format!(
        "[model]\ntiny = {{ seed = 3, hidden = 32, layers = 1 }}\n\n[data]\ntrain = \"pairs.jsonl\"\neval = \"held_out.jsonl\"\n\n\
         [train]\nsteps = {steps}\nbatch_pairs = 8\nlr = 1e-2\nwarmup_steps = 2\neval_every = 10\ncheckpoint_every = 10\nkeep_checkpoints = 3\n"
    );
    let path = dir.join("rm.toml");
    std::fs::write(&path, config)?;
    Ok(path)
}

fn accuracy_line(stdout: &str, prefix: &str) -> f64 {
    let line = stdout
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no `{prefix}` line in {stdout}"));
    let value = line[prefix.len()..].trim_start_matches([':', ' ']);
    let value = value.split_whitespace().next().expect("a number");
    value.parse().expect("accuracy is a number")
}

#[test]
fn train_rm_raises_held_out_accuracy_and_resumes_bit_exact() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let config = rm_config(tmp.path(), 30)?;
    let run = tmp.path().join("run");
    let out = ok(&r1v2(&["train-rm", s(&config), "--run-dir", s(&run)]));
    let before = accuracy_line(&out, "held-out pairwise accuracy before");
    let after = accuracy_line(&out, "held-out pairwise accuracy after 30 steps");
    assert!(after >= 0.8 && after > before, "{out}");
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl"))?;
    assert_eq!(metrics.lines().count(), 30);
    assert!(metrics.contains("eval/accuracy"), "{metrics}");
    let final_model = std::fs::read(run.join("checkpoints/step-30/model/model.safetensors"))?;

    // Interrupted after step 20: the resumed run ends with the same weights.
    std::fs::remove_dir_all(run.join("checkpoints/step-30"))?;
    ok(&r1v2(&["train-rm", s(&config), "--resume", s(&run)]));
    let resumed = std::fs::read(run.join("checkpoints/step-30/model/model.safetensors"))?;
    assert!(resumed == final_model, "resumed weights differ");
    assert_eq!(
        std::fs::read_to_string(run.join("metrics.jsonl"))?
            .lines()
            .count(),
        30
    );

    // The trained model serves as a reward model: `forward` reads the checkpoint.
    let input = tmp.path().join("input.json");
    std::fs::write(&input, r#"{"input_ids": [[1, 2, 3]]}"#)?;
    let scores = tmp.path().join("scores.safetensors");
    ok(&r1v2(&[
        "forward",
        "--model",
        s(&run.join("checkpoints/step-30/model")),
        "--input",
        s(&input),
        "--output",
        s(&scores),
    ]));
    Ok(())
}

#[test]
fn train_rm_bad_lines_and_keys_name_the_file() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let config = rm_config(tmp.path(), 2)?;
    let pairs = tmp.path().join("pairs.jsonl");
    let mut text = std::fs::read_to_string(&pairs)?;
    text = text.replacen("\"rejected\"", "\"rejectd\"", 2); // lines 1 and 2; line 1 fails first
    std::fs::write(&pairs, text)?;
    let output = r1v2(&[
        "train-rm",
        s(&config),
        "--run-dir",
        s(&tmp.path().join("run")),
    ]);
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        err.contains("pairs.jsonl:1:") && err.contains("rejectd"),
        "{err}"
    );

    std::fs::write(
        &config,
        "[model]\ntiny = { seed = 1 }\n[data]\ntrain = \"p.jsonl\"\n[train]\nstep = 3\n",
    )?;
    let output = r1v2(&[
        "train-rm",
        s(&config),
        "--run-dir",
        s(&tmp.path().join("run2")),
    ]);
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && err.contains("rm.toml") && err.contains("step"),
        "{err}"
    );
    Ok(())
}
