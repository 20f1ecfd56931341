//! `[placement]` through the whole `r1v2 train` path on simulated CPU devices: data-parallel optimizer
//! shards train the weights one optimizer would, several generators sample what one would, a shard that
//! panics stops the step on every shard, and bad devices are errors naming the key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use r1v2::checkpoint::RunDir;
use r1v2::telemetry::read_metrics;

const BIN: &str = env!("CARGO_BIN_EXE_r1v2");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The tiny CI config with `extra` appended (a `[placement]` / `[faults]` section).
fn config(dir: &Path, name: &str, extra: &str) -> PathBuf {
    // A checkpoint after every step, all kept: the weights after each update can be compared.
    let mut text = std::fs::read_to_string(Path::new(ROOT).join("configs/tiny.toml"))
        .unwrap()
        .replace("checkpoint_every = 2", "checkpoint_every = 1")
        .replace("keep_checkpoints = 2", "keep_checkpoints = 8");
    text.push('\n');
    text.push_str(extra);
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs `r1v2 train`, killing it (and failing) if it has not ended after five minutes: a hang is a bug.
fn train(config: &Path, run_dir: &Path) -> Output {
    let mut child = Command::new(BIN)
        .arg("train")
        .arg(config)
        .arg("--run-dir")
        .arg(run_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(300) {
            child.kill().unwrap();
            panic!("r1v2 train did not end within 300 s (a hang)");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

fn assert_ok(output: &Output) {
    assert!(
        output.status.success(),
        "r1v2 train failed:\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The last checkpoint's tensors, by name.
fn final_tensors(run_dir: &Path) -> BTreeMap<String, Vec<f32>> {
    let (step, _) = RunDir::open(run_dir)
        .unwrap()
        .latest_checkpoint()
        .unwrap()
        .expect("a checkpoint");
    tensors_at(run_dir, step)
}

/// Checkpoint `step-N`'s tensors, by name.
fn tensors_at(run_dir: &Path, step: u64) -> BTreeMap<String, Vec<f32>> {
    let dir = run_dir.join(format!("checkpoints/step-{step}"));
    let tensors = candle_core::safetensors::load(
        dir.join("model/model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    tensors
        .into_iter()
        .map(|(name, t)| {
            let values = t
                .to_dtype(candle_core::DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            (name, values)
        })
        .collect()
}

/// Each step's metrics without the timings (which depend on the machine's load).
fn metrics_without_timings(run_dir: &Path) -> Vec<BTreeMap<String, f64>> {
    read_metrics(&run_dir.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .map(|record| {
            record
                .values
                .into_iter()
                .filter(|(k, _)| !k.starts_with("timing_s/") && !k.starts_with("perf/"))
                .collect()
        })
        .collect()
}

#[test]
fn two_trainer_shards_train_the_weights_of_one_and_two_generators_sample_what_one_does() {
    let dir = tempfile::tempdir().unwrap();
    let one = dir.path().join("one");
    assert_ok(&train(&config(dir.path(), "one.toml", ""), &one));

    // Data parallel: the batch split over cpu:0 and cpu:1, gradients averaged through the collective.
    let sharded = dir.path().join("sharded");
    let extra = "[placement]\ntrainer = [\"cpu:0\", \"cpu:1\"]\n";
    assert_ok(&train(&config(dir.path(), "sharded.toml", extra), &sharded));
    let largest_difference = |step: u64| {
        let (a, b) = (tensors_at(&one, step), tensors_at(&sharded, step));
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
        let mut worst = 0f32;
        for (name, values) in &a {
            for (x, y) in values.iter().zip(&b[name]) {
                worst = worst.max((x - y).abs());
            }
        }
        worst
    };
    // Each update: the same up to the order of the sums (two shards sum their halves, then each other's).
    for step in 1..=3 {
        let worst = largest_difference(step);
        assert!(worst <= 1e-6, "step {step}: a weight differs by {worst}");
    }
    // AdamW divides by the root of the second moment, so those rounding differences grow a little with
    // every update (seen: 0, 1.5e-8, 1.8e-7, 1.8e-7, 2.7e-6, 4.5e-6, 5.3e-6 after steps 1..7).
    let worst = largest_difference(7);
    assert!(worst <= 2e-5, "after 7 updates a weight differs by {worst}");
    let a = final_tensors(&one);
    let initial = candle_core::safetensors::load(
        one.join("init-model/model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert!(
        initial.len() == a.len(),
        "the checkpoint holds the whole model"
    );
    // Both shards logged the same steps and updates.
    let (ma, mb) = (
        metrics_without_timings(&one),
        metrics_without_timings(&sharded),
    );
    assert_eq!(ma.len(), mb.len());
    for (x, y) in ma.iter().zip(&mb) {
        assert_eq!(x.get("actor/skipped"), y.get("actor/skipped"));
        assert_eq!(x.get("reward/mean"), y.get("reward/mean"));
    }

    // Two generators, the prompts split between them: the same samples, so the same run, bit for bit.
    let split = dir.path().join("split");
    let extra = "[placement]\ngenerator = [\"cpu:0\", \"cpu:1\"]\n";
    assert_ok(&train(&config(dir.path(), "split.toml", extra), &split));
    assert_eq!(metrics_without_timings(&split), ma);
    assert_eq!(final_tensors(&split), a);
    // Each sync reached both generators.
    let records = read_metrics(&split.join("metrics.jsonl")).unwrap();
    let single = read_metrics(&one.join("metrics.jsonl")).unwrap();
    let bytes = |r: &r1v2::telemetry::MetricsRecord| r.values.get("perf/sync_bytes").copied();
    assert!(bytes(&single[0]).unwrap() > 0.0);
    assert_eq!(bytes(&records[0]), bytes(&single[0]).map(|b| 2.0 * b));
}

#[test]
fn a_shard_that_panics_stops_the_step_on_every_shard_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let extra = "[placement]\ntrainer = [\"cpu:0\", \"cpu:1\"]\n\n[faults]\n\
                 panic_trainer_shard = { shard = 1, at_version = 3 }\n";
    let output = train(&config(dir.path(), "fault.toml", extra), &run);
    assert!(!output.status.success(), "the run must stop with an error");
    let stderr = String::from_utf8_lossy(&output.stderr);
    // Shard 1 reports its own panic; shard 0 that a rank failed. Both errors, neither waits.
    assert!(stderr.contains("injected fault"), "{stderr}");
    let log = std::fs::read_to_string(run.join("log.jsonl")).unwrap();
    assert!(
        stderr.contains("optimizer shard 0") && stderr.contains("rank(s) failed"),
        "{stderr}"
    );
    // The update from policy version 3 failed; the steps before it finished and the run stopped there.
    assert!(stderr.contains("at policy version 3"), "{stderr}");
    let logged = read_metrics(&run.join("metrics.jsonl")).unwrap().len();
    assert!((3..7).contains(&logged), "{logged} steps logged");
    assert!(log.contains("every actor shut down"));
}

#[test]
fn bad_devices_are_errors_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for (extra, key, why) in [
        (
            "[placement]\ntrainer = [\"cpu:0\", \"cuda:0\"]\n",
            "placement.trainer[1]",
            "no GPU",
        ),
        (
            "[placement]\ngenerator = [\"tpu:0\"]\n",
            "placement.generator[0]",
            "unknown device",
        ),
        (
            "[placement]\ntrainer = [\"cpu:0\"]\n\n[faults]\n\
             panic_trainer_shard = { shard = 1, at_version = 3 }\n",
            "faults.panic_trainer_shard.shard",
            "only 1",
        ),
    ] {
        let output = train(
            &config(dir.path(), "bad.toml", extra),
            &dir.path().join("bad"),
        );
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains(key) && stderr.contains(why) && stderr.contains("bad.toml"),
            "{stderr}"
        );
    }
}
