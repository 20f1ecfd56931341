//! End-to-end tests of `r1v2 train`: the tiny config through every stage and actor, resume after SIGKILL,
//! injected faults, config errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use r1v2::checkpoint::RunDir;
use r1v2::telemetry::read_metrics;

const BIN: &str = env!("CARGO_BIN_EXE_r1v2");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The metric names design.md promises in metrics.jsonl.
const DESIGN_KEYS: &[&str] = &[
    "reward/mean",
    "reward/std",
    "reward/rule",
    "reward/rm",
    "reward/format",
    "ssb/effective_share_before",
    "ssb/effective_share_after",
    "ssb/replayed",
    "ssb/size",
    "actor/pg_loss",
    "actor/kl",
    "actor/clipfrac",
    "actor/entropy",
    "actor/grad_norm",
    "actor/lr",
    "mpo/dpo",
    "mpo/bco",
    "mpo/sft",
    "mpo/delta",
    "response_length/mean",
    "response_length/clip_ratio",
    "hallucination/rate",
    "calibration/rm_threshold",
    "timing_s/gen",
    "timing_s/verify",
    "timing_s/reward",
    "timing_s/update",
    "timing_s/sync",
    "perf/tokens_per_s",
];

fn tiny_config() -> String {
    std::fs::read_to_string(Path::new(ROOT).join("configs/tiny.toml")).unwrap()
}

fn write_config(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn train(config: &Path, run_dir: &Path, resume: bool) -> Output {
    let flag = if resume { "--resume" } else { "--run-dir" };
    Command::new(BIN)
        .arg("train")
        .arg(config)
        .arg(flag)
        .arg(run_dir)
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .unwrap()
}

fn assert_ok(output: &Output) {
    assert!(
        output.status.success(),
        "r1v2 train failed:\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn final_weights(run_dir: &Path) -> (u64, Vec<u8>) {
    let (step, dir) = RunDir::open(run_dir)
        .unwrap()
        .latest_checkpoint()
        .unwrap()
        .expect("a checkpoint");
    (
        step,
        std::fs::read(dir.join("model/model.safetensors")).unwrap(),
    )
}

#[test]
fn tiny_config_runs_every_stage_and_actor_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let config = write_config(dir.path(), "tiny.toml", &tiny_config());
    let output = train(&config, &run, false);
    assert_ok(&output);
    // Piped, not a terminal: plain log lines, no colour codes.
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("INFO"), "{stderr}");
    assert!(!stderr.contains('\x1b'), "ANSI escapes in piped output");

    let records = read_metrics(&run.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = records.iter().map(|r| r.step).collect();
    assert_eq!(steps, (1..=7).collect::<Vec<_>>(), "one record per step");
    for key in DESIGN_KEYS {
        assert!(
            records.iter().any(|r| r.values.contains_key(*key)),
            "metrics.jsonl never has `{key}`"
        );
    }
    // Every GRPO step carries the whole GRPO set; every MPO step the MPO set.
    for record in &records[4..] {
        for key in DESIGN_KEYS
            .iter()
            .filter(|k| !k.starts_with("mpo/") && !k.starts_with("actor/"))
        {
            assert!(
                record.values.contains_key(*key),
                "GRPO step {} lacks `{key}`",
                record.step
            );
        }
    }
    // The weights moved, and the versions add up: each stage's updates bump the policy version.
    let (step, weights) = final_weights(&run);
    assert_eq!(step, 7);
    let initial = std::fs::read(run.join("init-model/model.safetensors")).unwrap();
    assert_ne!(weights, initial, "training changed the weights");
    // The checkpoint is an ordinary model directory.
    let loaded = r1v2_actors::model::chat::ChatModel::load(
        &run.join("checkpoints/step-7/model"),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
        r1v2_actors::model::chat::Trainable::frozen(),
    )
    .unwrap();
    assert!(loaded.unexpected.is_empty());
    // Live logs: JSON lines with the stage span.
    let log = std::fs::read_to_string(run.join("log.jsonl")).unwrap();
    assert!(log.lines().count() > 7);
    assert!(
        log.contains("\"stage\":\"grpo\"") || log.contains("\"stage\": \"grpo\""),
        "no grpo span in log.jsonl"
    );
    assert_shut_down_in_order(&log);
    assert!(run.join("config.toml").is_file());
}

/// The end of a run closes every actor, in pipeline order, and says so.
fn assert_shut_down_in_order(log: &str) {
    let order = [
        "policy_generator",
        "rule_verifier",
        "reward_model",
        "sample_buffer",
        "hallucination_monitor",
        "optimizer",
    ];
    let closed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("\"shut down\""))
        .filter_map(|l| {
            order
                .iter()
                .copied()
                .find(|a| l.contains(&format!("\"{a}\"")))
        })
        .collect();
    // (tiny.toml has a reward model, so all six run.)
    assert_eq!(closed, order, "actors shut down out of order (log.jsonl)");
    assert!(
        log.contains("every actor shut down"),
        "no end-of-run shutdown logged"
    );
}

#[test]
fn a_run_killed_mid_way_and_resumed_ends_with_the_same_weights() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "tiny.toml",
        &tiny_config().replace("checkpoint_every = 2", "checkpoint_every = 1"),
    );
    let straight = dir.path().join("straight");
    assert_ok(&train(&config, &straight, false));

    let killed = dir.path().join("killed");
    let mut child = Command::new(BIN)
        .arg("train")
        .arg(&config)
        .arg("--run-dir")
        .arg(&killed)
        .env("RAYON_NUM_THREADS", "2")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !killed.join("checkpoints/step-3").is_dir() {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "no checkpoint appeared"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let (at_kill, _) = final_weights(&killed);
    assert!(
        at_kill < 7,
        "the run finished before the kill (step {at_kill}): nothing was resumed"
    );

    assert_ok(&train(&config, &killed, true));
    let (step_a, weights_a) = final_weights(&straight);
    let (step_b, weights_b) = final_weights(&killed);
    assert_eq!((step_a, step_b), (7, 7));
    assert!(
        weights_a == weights_b,
        "resumed run ended with other weights (killed at step {at_kill})"
    );
    // The metrics agree too (timings aside), one record per step.
    let a = read_metrics(&straight.join("metrics.jsonl")).unwrap();
    let b = read_metrics(&killed.join("metrics.jsonl")).unwrap();
    assert_eq!(a.len(), b.len());
    for (ra, rb) in a.iter().zip(&b) {
        for (key, value) in &ra.values {
            if key.starts_with("timing_s/") || key.starts_with("perf/") {
                continue;
            }
            let other = rb.values[key];
            assert!(
                value.to_bits() == other.to_bits() || (value.is_nan() && other.is_nan()),
                "step {} `{key}`: {value} vs {other}",
                ra.step
            );
        }
    }
}

#[test]
fn a_panicking_actor_and_a_hanging_verifier_plugin_do_not_stop_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let dataset = r1v2::demo::colour::write_colour_task(&data_dir)
        .unwrap()
        .train;
    // Half the prompts go to the plugin.
    let text = std::fs::read_to_string(&dataset).unwrap();
    let lines: Vec<String> = text
        .lines()
        .enumerate()
        .map(|(i, line)| {
            if i % 2 == 0 {
                line.replace("\"verifier\":\"choice\"", "\"verifier\":\"first_letter\"")
            } else {
                line.to_string()
            }
        })
        .collect();
    std::fs::write(&dataset, lines.join("\n")).unwrap();
    let plugin = Path::new(ROOT).join("tests/plugins/hang_once_plugin.py");
    let marker = dir.path().join("hung");
    let config = tiny_config()
        .replace("path = \"demo-colour\"", &format!("path = {:?}", dataset.display().to_string()))
        .replace("prompts_per_step = 4", "prompts_per_step = 8")
        + &format!(
            "\n[faults]\npanic_sample_buffer_at_versions = [0, 1, 2, 3, 4, 5, 6, 7, 8]\n\n\
             [[verifiers.plugins]]\nname = \"first_letter\"\n\
             command = \"python3\"\nargs = [{:?}]\ntimeout_secs = 2\nstartup_secs = 5\nenv = {{ HANG_MARKER = {:?}, HANG_SECONDS = \"20\" }}\n",
            plugin.display().to_string(),
            marker.display().to_string()
        );
    let config = write_config(dir.path(), "faults.toml", &config);
    let run = dir.path().join("run");
    let output = train(&config, &run, false);
    assert_ok(&output);
    assert!(
        marker.exists(),
        "the plugin never hung: the test proved nothing"
    );
    let records = read_metrics(&run.join("metrics.jsonl")).unwrap();
    assert_eq!(records.len(), 7, "every step ran");
    let failures: f64 = records
        .iter()
        .filter_map(|r| r.values.get("verify/failures"))
        .sum();
    assert!(
        failures >= 1.0,
        "the hung request should cost its sample a zero reward"
    );
    let log = std::fs::read_to_string(run.join("log.jsonl")).unwrap();
    assert!(
        log.contains("injected fault"),
        "the sample buffer never panicked"
    );
    assert!(
        log.contains("re-sending NextBatch"),
        "the failed request was not re-sent"
    );
}

#[test]
fn config_errors_name_the_file_and_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write_config(
        dir.path(),
        "bad.toml",
        &tiny_config().replace("[rl.grpo]\n", "[rl.grpo]\nepsilon_high = 0.3\n"),
    );
    let output = train(&bad, &dir.path().join("run"), false);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("bad.toml"), "{stderr}");
    assert!(stderr.contains("epsilon_high"), "{stderr}");

    let invalid = write_config(
        dir.path(),
        "invalid.toml",
        &tiny_config().replace("group_size = 4", "group_size = 1"),
    );
    let output = train(&invalid, &dir.path().join("run2"), false);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("invalid.toml") && stderr.contains("generation.group_size"),
        "{stderr}"
    );
}

#[test]
fn async_mode_trains_one_version_behind() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config()
        .replace("mode = \"sync\"", "mode = \"async\"\nmax_staleness = 1")
        .replace("deterministic = true", "deterministic = false");
    let config = write_config(dir.path(), "async.toml", &config);
    let run = dir.path().join("run");
    assert_ok(&train(&config, &run, false));
    let records = read_metrics(&run.join("metrics.jsonl")).unwrap();
    assert_eq!(records.len(), 7);
    // GRPO steps after the first one train on rollouts sampled before the previous update.
    let staleness: Vec<f64> = records
        .iter()
        .filter_map(|r| r.values.get("async/staleness").copied())
        .collect();
    assert!(!staleness.is_empty());
    assert!(
        staleness.iter().any(|&s| s >= 1.0),
        "async mode never ran ahead: {staleness:?}"
    );
    assert!(
        staleness.iter().all(|&s| s <= 1.0),
        "staleness above max_staleness: {staleness:?}"
    );
}

#[test]
fn ctrl_c_stops_after_the_current_step_with_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config()
        .replace("checkpoint_every = 2", "checkpoint_every = 0")
        .replace("steps = 3", "steps = 400");
    let config = write_config(dir.path(), "long.toml", &config);
    let run = dir.path().join("run");
    let child = Command::new(BIN)
        .arg("train")
        .arg(&config)
        .arg("--run-dir")
        .arg(&run)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    // Wait until a GRPO step has been logged.
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "no GRPO step logged"
        );
        let logged = read_metrics(&run.join("metrics.jsonl")).map_or(0, |r| r.len());
        if logged >= 5 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "Ctrl-C should end the run cleanly");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("stopped at step"), "{stdout}");
    let (step, _) = final_weights(&run);
    let logged = read_metrics(&run.join("metrics.jsonl")).unwrap().len() as u64;
    assert_eq!(step, logged, "the checkpoint is of the last finished step");
    assert!(step < 405, "the run did not stop early");
    assert_shut_down_in_order(&std::fs::read_to_string(run.join("log.jsonl")).unwrap());
}

#[test]
fn the_watchdog_names_a_stalled_actor_and_stops_with_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let dataset = r1v2::demo::colour::write_colour_task(&data_dir)
        .unwrap()
        .train;
    let text = std::fs::read_to_string(&dataset)
        .unwrap()
        .replace("\"verifier\":\"choice\"", "\"verifier\":\"slow\"");
    std::fs::write(&dataset, text).unwrap();
    let plugin = Path::new(ROOT).join("tests/plugins/hang_once_plugin.py");
    let marker = dir.path().join("hung");
    // The plugin's own timeout (40 s) is longer than the watchdog's (3 s): the verifier pool stalls.
    let config = tiny_config()
        .replace(
            "path = \"demo-colour\"",
            &format!("path = {:?}", dataset.display().to_string()),
        )
        .replace("kind = \"sft\"\nsteps = 2", "kind = \"sft\"\nsteps = 1")
        + &format!(
            "\n[watchdog]\nheartbeat_every_s = 0.5\nstall_timeout_s = 3.0\n\n\
             [[verifiers.plugins]]\nname = \"slow\"\ncommand = \"python3\"\nargs = [{:?}]\n\
             timeout_secs = 40\nenv = {{ HANG_MARKER = {:?}, HANG_SECONDS = \"8\" }}\n",
            plugin.display().to_string(),
            marker.display().to_string()
        );
    let config = write_config(dir.path(), "stall.toml", &config);
    let run = dir.path().join("run");
    let started = Instant::now();
    let output = train(&config, &run, false);
    assert!(
        !output.status.success(),
        "a stalled run must not end as a success"
    );
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "the run hung instead of stopping"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("`rule_verifier` stalled on `Verify`"),
        "the error should name the actor and the message: {stderr}"
    );
    // The SFT step finished before the stall: its checkpoint was written on the way out.
    let (step, _) = final_weights(&run);
    assert_eq!(step, 1);
}

#[test]
fn stages_set_their_own_prompts_per_step_and_learning_rate_scale() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let text = tiny_config()
        .replace(
            "kind = \"sft\"\nsteps = 2\n",
            "kind = \"sft\"\nsteps = 2\nprompts_per_step = 2\n",
        )
        .replace(
            "steps_per_round = 2\n",
            "steps_per_round = 2\nlr_scale = 0.5\n",
        )
        .replace(
            "kind = \"grpo\"\nsteps = 3\n",
            "kind = \"grpo\"\nsteps = 3\nprompts_per_step = 6\nlr_scale = 0.25\n",
        );
    let config = write_config(dir.path(), "stages.toml", &text);
    assert_ok(&train(&config, &run, false));

    // Prompts drawn: SFT 2 x 2, MPO 2 x data.prompts_per_step (4), GRPO 3 x 6.
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run.join("checkpoints/step-7/trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        state["sections"]["loop"]["prompts_drawn"],
        2 * 2 + 2 * 4 + 3 * 6
    );

    // Each update's rate: [optimizer]'s warmup + cosine (lr 0.003, warmup 2, over 7 updates, indexed by the
    // updates done: a step with nothing to train on skips one) times its stage's scale.
    let records = read_metrics(&run.join("metrics.jsonl")).unwrap();
    let scales = [1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.25];
    let mut updates = 0;
    let mut scaled = std::collections::BTreeSet::new();
    for (k, (record, scale)) in records.iter().zip(scales).enumerate() {
        let Some(&got) = record.values.get("actor/lr") else {
            continue;
        };
        let want = 0.003 * r1v2_actors::train::schedule::lr_multiplier(updates, 2, 7, 0.0) * scale;
        assert!(
            (got - want).abs() < 1e-12,
            "step {}: lr {got}, want {want}",
            k + 1
        );
        if got > 0.0 {
            scaled.insert(scale.to_string());
        }
        updates += 1;
    }
    assert_eq!(
        scaled.len(),
        3,
        "updates at every stage's scale, saw {scaled:?}"
    );

    // A scale that is not positive, or an empty batch, is an error naming the stage's key.
    let refused = |name: &str, text: String, key: &str| {
        let config = write_config(dir.path(), name, &text);
        let output = train(&config, &dir.path().join(format!("{name}-run")), false);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success());
        assert!(stderr.contains(name) && stderr.contains(key), "{stderr}");
    };
    refused(
        "bad.toml",
        text.replace("lr_scale = 0.25", "lr_scale = 0.0"),
        "stages[2].lr_scale",
    );
    refused(
        "empty.toml",
        text.replace("prompts_per_step = 2\n", "prompts_per_step = 0\n"),
        "stages[0].prompts_per_step",
    );
}

/// The tiny config (SFT, MPO and GRPO stages, a Qwen2 reward model) with a tiny Qwen2.5-VL policy (LM head, no
/// value head), `grpo_steps` GRPO steps and a checkpoint after each step.
fn vl_policy_config(model_dir: &Path, grpo_steps: usize) -> String {
    let config = tiny_config().replace("checkpoint_every = 2", "checkpoint_every = 1");
    let model_line = config
        .lines()
        .find(|l| l.starts_with("tiny = { seed = 0"))
        .expect("tiny.toml's [model] line");
    let grpo = "kind = \"grpo\"\nsteps = 3";
    assert!(config.contains(grpo), "tiny.toml's GRPO stage");
    config
        .replace(
            model_line,
            &format!("dir = {:?}", model_dir.to_str().expect("UTF-8 temp path")),
        )
        .replace(grpo, &format!("kind = \"grpo\"\nsteps = {grpo_steps}"))
}

#[test]
fn a_qwen2_5_vl_policy_trains_with_grpo_checkpoints_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("vl-policy");
    let spec = r1v2::config::TinySpec {
        hidden: 64,
        layers: 2,
        ..Default::default()
    };
    r1v2::tiny::write_vl_policy_model(&model, &spec).unwrap();
    let initial = std::fs::read(model.join("model.safetensors")).unwrap();
    let run = dir.path().join("run");
    // SFT 2 + MPO 2 + GRPO 2 steps.
    let config = write_config(dir.path(), "vl.toml", &vl_policy_config(&model, 2));
    assert_ok(&train(&config, &run, false));
    let (step, weights) = final_weights(&run);
    assert_eq!(step, 6);
    assert_ne!(weights, initial, "training left the weights as they were");
    let metrics = read_metrics(&run.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.len(), 6);
    // Every logged value is finite; the SFT and GRPO steps updated the policy (a GRPO update is skipped only
    // when no group is informative).
    for record in &metrics {
        for (key, value) in &record.values {
            assert!(value.is_finite(), "step {} `{key}` = {value}", record.step);
        }
    }
    // (The random policy never answers right, so MPO mines no pair here: actors/tests/train_qwen2_5_vl.rs
    // runs MPO and SFT updates on Qwen2.5-VL.)
    assert!(metrics[..2]
        .iter()
        .all(|r| r.values.contains_key("sft/nll")));
    assert!(metrics[4..]
        .iter()
        .any(|r| r.values.contains_key("actor/pg_loss")));
    for record in &metrics[4..] {
        let value = |key: &str| record.values.get(key).copied().unwrap_or(f64::NAN);
        println!(
            "GRPO step {}: actor/pg_loss {:.4e}, actor/kl {:.3e}, actor/grad_norm {:.4}, reward/mean {:.3}",
            record.step,
            value("actor/pg_loss"),
            value("actor/kl"),
            value("actor/grad_norm"),
            value("reward/mean")
        );
    }
    // The checkpoint is a Qwen2.5-VL policy directory again, trained tensors included.
    let checkpoint = run.join("checkpoints/step-6/model");
    let loaded = r1v2_actors::model::policy::load_policy(
        &checkpoint,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
        r1v2_actors::model::chat::Trainable::frozen(),
    )
    .unwrap();
    assert!(loaded.model.as_qwen2_5_vl().is_some() && loaded.unexpected.is_empty());
    assert!(checkpoint.join("preprocessor_config.json").is_file());

    // Resumed with two more GRPO steps, the run continues from step 6.
    let config = write_config(dir.path(), "vl4.toml", &vl_policy_config(&model, 4));
    assert_ok(&train(&config, &run, true));
    let (step, resumed) = final_weights(&run);
    assert_eq!(step, 8);
    assert_ne!(resumed, weights, "the resumed steps did not train");
    let metrics = read_metrics(&run.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = metrics.iter().map(|r| r.step).collect();
    assert_eq!(steps, (1..=8).collect::<Vec<u64>>());
    assert!(metrics[6..]
        .iter()
        .any(|r| r.values.contains_key("actor/pg_loss")));
}

#[test]
fn a_bf16_run_trains_every_stage_with_f32_masters_and_its_checkpoint_loads_back() {
    // `[model] dtype = "bf16"`: generation, forward and backward in bf16, AdamW on f32 masters.
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let text = tiny_config().replace(
        "tiny = { seed = 0, hidden = 64, layers = 2 }",
        "tiny = { seed = 0, hidden = 64, layers = 2 }\ndtype = \"bf16\"",
    );
    assert!(text.contains("dtype = \"bf16\""));
    let config = write_config(dir.path(), "tiny_bf16.toml", &text);
    assert_ok(&train(&config, &run, false));
    let records = read_metrics(&run.join("metrics.jsonl")).unwrap();
    assert_eq!(records.len(), 7, "one record per step");
    // Every value is finite (losses, norms, rewards), and updates had a gradient.
    for record in &records {
        for (key, value) in &record.values {
            assert!(
                value.is_finite() || key.starts_with("hallucination/"),
                "step {} `{key}` = {value}",
                record.step
            );
        }
    }
    let norms: Vec<f64> = records
        .iter()
        .filter_map(|r| r.values.get("actor/grad_norm").copied())
        .collect();
    assert!(
        !norms.is_empty() && norms.iter().all(|&n| n > 0.0),
        "{norms:?}"
    );

    // The checkpoint: the model in bf16, the masters (f32) beside AdamW's f32 moments.
    let (step, dir7) = RunDir::open(&run)
        .unwrap()
        .latest_checkpoint()
        .unwrap()
        .expect("a checkpoint");
    assert_eq!(step, 7);
    let model = candle_core::safetensors::load(
        dir7.join("model/model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert!(model
        .values()
        .all(|t| t.dtype() == candle_core::DType::BF16));
    let state = candle_core::safetensors::load(
        dir7.join("optimizer/adamw.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let masters: Vec<_> = state.keys().filter(|k| k.starts_with("master.")).collect();
    assert!(
        !masters.is_empty(),
        "no master weights in the optimizer state"
    );
    assert!(state.values().all(|t| t.dtype() == candle_core::DType::F32));
    for key in masters {
        let name = key.trim_start_matches("master.");
        let rounded = state[key].to_dtype(candle_core::DType::BF16).unwrap();
        let saved = &model[name];
        let diff = (rounded.to_dtype(candle_core::DType::F32).unwrap()
            - saved.to_dtype(candle_core::DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
        assert_eq!(diff, 0.0, "`{name}` in the model is not its master rounded");
    }

    // It loads back as a trainer in bf16, continuing from the masters.
    let optimizer: r1v2_actors::train::OptimConfig =
        toml::from_str(&text[text.find("[optimizer]").unwrap() + "[optimizer]".len()..]).unwrap();
    let trainer = r1v2_actors::train::PolicyTrainer::load_checkpoint(
        &dir7,
        candle_core::DType::BF16,
        &candle_core::Device::Cpu,
        optimizer,
        None,
    )
    .unwrap();
    // One policy version per update (a GRPO step whose buffer had nothing to train on makes none).
    assert_eq!(trainer.version(), norms.len() as u64);
    for (name, var) in &trainer.policy().trainable_vars {
        assert_eq!(var.dtype(), candle_core::DType::BF16);
        let master = trainer.master_weight(name).expect("a master");
        let want = state[&format!("master.{name}")].flatten_all().unwrap();
        assert_eq!(
            master.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            want.to_vec1::<f32>().unwrap(),
            "`{name}`: the master did not come back from the checkpoint"
        );
    }
}

#[test]
fn a_bad_model_dtype_is_an_error_naming_the_file_and_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write_config(
        dir.path(),
        "fp16.toml",
        &tiny_config().replace(
            "tiny = { seed = 0, hidden = 64, layers = 2 }",
            "tiny = { seed = 0, hidden = 64, layers = 2 }\ndtype = \"fp16\"",
        ),
    );
    let output = train(&bad, &dir.path().join("run"), false);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("fp16.toml") && stderr.contains("dtype") && stderr.contains("bf16"),
        "{stderr}"
    );
}
