//! A Skywork-VL-Reward-layout reward model (Qwen2.5-VL + value head) in `r1v2 train`: the controller encodes
//! each prompt again with the reward model's own template and vision runs and sends the images with
//! `ScoreWithImages`, so the hybrid reward's model half sees the pixels.

use std::path::Path;
use std::process::Command;

use r1v2::telemetry::read_metrics;

const BIN: &str = env!("CARGO_BIN_EXE_r1v2");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// A word-level tokenizer over the tiny fixture's 256 ids, with the chat and vision tokens where the
/// fixture's config.json names them (250..=253).
fn tokenizer_json() -> String {
    let mut vocab = serde_json::Map::new();
    let specials = [
        (0, "[UNK]"),
        (1, "<|im_start|>"),
        (2, "<|im_end|>"),
        (250, "<|vision_start|>"),
        (251, "<|vision_end|>"),
        (252, "<|image_pad|>"),
        (253, "<|video_pad|>"),
    ];
    for (id, token) in specials {
        vocab.insert(token.into(), id.into());
    }
    let words =
        "user assistant system the a is what colour color fills image red green blue yellow \
                 answer think which of these options A B C D ( ) . , : ? \\boxed { } 1 2 3 4";
    for (i, word) in words.split_whitespace().enumerate() {
        vocab.insert(word.into(), (10 + i).into());
    }
    let added: Vec<serde_json::Value> = specials
        .iter()
        .map(|(id, token)| {
            serde_json::json!({"id": id, "content": token, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    })
    .to_string()
}

#[test]
fn a_qwen2_5_vl_reward_model_scores_the_pipeline_s_samples_with_their_images() {
    let dir = tempfile::tempdir().unwrap();
    let rm = dir.path().join("rm");
    std::fs::create_dir_all(&rm).unwrap();
    let fixture = Path::new(ROOT).join("tests/fixtures/qwen2_5_vl/released");
    for file in [
        "config.json",
        "model.safetensors",
        "value_head.safetensors",
        "preprocessor_config.json",
    ] {
        std::fs::copy(fixture.join(file), rm.join(file)).unwrap();
    }
    std::fs::write(rm.join("tokenizer.json"), tokenizer_json()).unwrap();

    // tiny.toml with GRPO only and this reward model in place of the tiny text one.
    let tiny = std::fs::read_to_string(Path::new(ROOT).join("configs/tiny.toml")).unwrap();
    let text = tiny
        .replace("kind = \"sft\"\nsteps = 2", "kind = \"grpo\"\nsteps = 2")
        .replace(
            "[[stages]]\nkind = \"mpo\"\nrounds = 1\nsteps_per_round = 2\n\n",
            "",
        )
        .replace(
            "tiny = { seed = 1, hidden = 64, layers = 2 }",
            &format!("dir = {:?}", rm.display().to_string()),
        );
    assert!(
        text.contains("dir = ") && !text.contains("kind = \"mpo\""),
        "{text}"
    );
    let config = dir.path().join("vl.toml");
    std::fs::write(&config, text).unwrap();
    let run = dir.path().join("run");
    let output = Command::new(BIN)
        .arg("train")
        .arg(&config)
        .arg("--run-dir")
        .arg(&run)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("reward model reads images (qwen2_5_vl)"),
        "{stderr}"
    );
    let records = read_metrics(&run.join("metrics.jsonl")).unwrap();
    assert_eq!(records.len(), 5);
    for record in &records {
        let rm = record.values["reward/rm"];
        assert!(rm.is_finite(), "step {}: reward/rm {rm}", record.step);
        assert!(record.values["timing_s/reward"] > 0.0);
    }
}

#[test]
fn reward_model_train_fits_the_reward_model_on_pairs_from_the_task_once() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = std::fs::read_to_string(Path::new(ROOT).join("configs/tiny.toml")).unwrap();
    let text = tiny.replace(
        "tiny = { seed = 1, hidden = 64, layers = 2 }",
        "tiny = { seed = 1, hidden = 64, layers = 2 }\n\
         train = { steps = 6, batch_pairs = 8, lr = 0.003, eval_every = 3 }",
    );
    assert!(text.contains("train = { steps = 6"));
    let config = dir.path().join("rm.toml");
    std::fs::write(&config, text).unwrap();
    let run = dir.path().join("run");
    let train = |flag: &str| {
        Command::new(BIN)
            .arg("train")
            .arg(&config)
            .arg(flag)
            .arg(&run)
            .output()
            .unwrap()
    };
    let output = train("--run-dir");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("reward model trained on pairs from the task"),
        "{stderr}"
    );
    // One pair per prompt whose answer some other prompt does not share (the demo task: all of them).
    let pairs = std::fs::read_to_string(run.join("reward-model-training/pairs.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = pairs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.len() >= 8, "{} pairs", lines.len());
    for line in &lines {
        assert_ne!(line["chosen"], line["rejected"]);
        for image in line["images"].as_array().unwrap() {
            assert!(Path::new(image.as_str().unwrap()).is_absolute());
        }
    }
    let metrics = read_metrics(&run.join("reward-model-training/run/metrics.jsonl")).unwrap();
    assert!(
        !metrics.is_empty(),
        "the reward model's training logged its steps"
    );

    // A resumed run reuses the trained reward model instead of training it again.
    let output = train("--resume");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        !stderr.contains("reward model trained on pairs"),
        "{stderr}"
    );
}

#[test]
fn the_demo_s_image_reading_reward_model_learns_the_task_and_a_text_only_one_cannot() {
    // configs/demo.toml's [reward_model] (tiny_vl + train) on tiny.toml's run, against the tiny text-only one.
    let demo = std::fs::read_to_string(Path::new(ROOT).join("configs/demo.toml")).unwrap();
    let section = demo
        .split("[reward_model]")
        .nth(1)
        .and_then(|rest| rest.split("\n[").next())
        .unwrap()
        .to_string();
    assert!(
        section.contains("tiny_vl") && section.contains("train = "),
        "{section}"
    );
    let tiny = std::fs::read_to_string(Path::new(ROOT).join("configs/tiny.toml")).unwrap();
    let (head, tail) = tiny.split_once("[reward_model]").unwrap();
    let tail = tail.split_once("\n[").map(|(_, t)| t).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let accuracy_after = |name: &str, rm: &str| -> f64 {
        let config = dir.path().join(format!("{name}.toml"));
        std::fs::write(&config, format!("{head}[reward_model]{rm}\n[{tail}")).unwrap();
        let run = dir.path().join(name);
        let output = Command::new(BIN)
            .arg("train")
            .arg(&config)
            .arg("--run-dir")
            .arg(&run)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let records = read_metrics(&run.join("reward-model-training/run/metrics.jsonl")).unwrap();
        records
            .iter()
            .rev()
            .find_map(|r| r.values.get("eval/accuracy").copied())
            .expect("held-out accuracy logged")
    };
    let vl = accuracy_after("vl", &section);
    let text_only = section.replace("tiny_vl", "tiny");
    let text = accuracy_after("text", &text_only);
    // Held-out pairs of the same question whose right letter depends on the image.
    assert!(
        vl >= 0.8,
        "the image-reading reward model reached only {vl}"
    );
    assert!(
        text <= 0.6,
        "a text-only reward model cannot tell the images apart, yet reached {text}"
    );
}
