//! `r1v2 demo --quick` end to end on its fixed seed: the staged run with a held-out evaluation after every
//! stage, the four ablation arms from the MPO checkpoint, the tables and the charts; and each arm really
//! differs from the full method only in what it names (checked on its metrics and weights).
//!
//! Not asserted: that held-out accuracy after RL beats the SFT start. On this task and budget it does not
//! (the closing note of the demo issue and the README give the measured table): the test checks what the demo
//! measures and how, not a result it does not reach.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use r1v2::telemetry::read_metrics;
use r1v2::trainer::EvalRecord;

fn tensors(path: &Path) -> BTreeMap<String, Vec<f32>> {
    candle_core::safetensors::load(path, &candle_core::Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(name, t)| (name, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

#[test]
fn the_quick_demo_measures_every_stage_and_every_ablation() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("demo");
    let output = Command::new(env!("CARGO_BIN_EXE_r1v2"))
        .args(["demo", "--quick", "--run-dir"])
        .arg(&run)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // One evaluation per stage, on the whole held-out split, with its standard error.
    let evals = EvalRecord::load_all(&run.join("eval.jsonl")).unwrap();
    let labels: Vec<&str> = evals.iter().map(|e| e.label.as_str()).collect();
    assert_eq!(labels, ["sft", "mpo", "grpo"]);
    let steps: Vec<u64> = evals.iter().map(|e| e.step).collect();
    assert_eq!(steps, [60, 68, 84]);
    // The SFT warm start teaches the listing: its probe answers make claims, so the rate is measured.
    assert!(
        evals[0].claims > 0,
        "the probes made no claims: {:?}",
        evals[0]
    );
    let heldout = r1v2::demo::HELDOUT_SHAPES + r1v2::demo::HELDOUT_DIGITS;
    for eval in &evals {
        assert_eq!(eval.n, heldout, "{eval:?}");
        assert_eq!(
            (eval.by_set["shapes"].n, eval.by_set["digits"].n),
            (r1v2::demo::HELDOUT_SHAPES, r1v2::demo::HELDOUT_DIGITS)
        );
        let se = (eval.accuracy * (1.0 - eval.accuracy) / heldout as f64).sqrt();
        assert!((eval.stderr - se).abs() < 1e-12, "{eval:?}");
        // CHAIR-i exactly when the probe answers made claims (a policy may stop listing shapes after a stage).
        assert_eq!(
            eval.hallucination_rate.is_some(),
            eval.claims > 0,
            "{eval:?}"
        );
        // Every response was kept with its verdict: the held-out lines + the probes.
        let responses = std::fs::read_to_string(
            run.join("eval")
                .join(format!("{}-step-{}.jsonl", eval.label, eval.step)),
        )
        .unwrap();
        assert_eq!(responses.lines().count(), heldout + r1v2::demo::PROBES);
    }

    // The tables, printed and written.
    let summary = std::fs::read_to_string(run.join("summary.md")).unwrap();
    for row in [
        "| sft |",
        "| mpo |",
        "| grpo |",
        "| full |",
        "| no_ssb |",
        "| adapter_only |",
        "| no_calibration |",
    ] {
        assert!(summary.contains(row), "{row} missing from\n{summary}");
        assert!(stdout.contains(row), "{row} not printed");
    }
    assert!(run.join("report/ablation_nonzero_share.svg").is_file());

    // Each arm: GRPO x16 from the MPO checkpoint, evaluated at its end.
    let start = tensors(&run.join("checkpoints/step-68/model/model.safetensors"));
    let arm = |name: &str| {
        let dir = run.join("ablations").join(name);
        let evals = EvalRecord::load_all(&dir.join("eval.jsonl")).unwrap();
        assert_eq!(evals.len(), 1, "{name}");
        assert_eq!((evals[0].label.as_str(), evals[0].step), ("grpo", 16));
        let metrics = read_metrics(&dir.join("metrics.jsonl")).unwrap();
        assert_eq!(metrics.len(), 16, "{name}");
        let end = tensors(&dir.join("checkpoints/step-16/model/model.safetensors"));
        (metrics, end)
    };
    let value = |r: &r1v2::telemetry::MetricsRecord, k: &str| r.values.get(k).copied();

    // Without the SSB every fresh group trains and none is replayed: the trained share is the fresh one.
    let (no_ssb, _) = arm("no_ssb");
    for record in &no_ssb {
        assert_eq!(value(record, "ssb/replayed"), Some(0.0));
        assert_eq!(
            value(record, "ssb/effective_share_after"),
            value(record, "reward/nonzero_share"),
            "step {}",
            record.step
        );
    }
    // With it, zero-advantage groups are dropped and the batch topped up by replay: never a lower share.
    let (full, full_end) = arm("full");
    for record in &full {
        let trained = value(record, "ssb/effective_share_after").unwrap();
        let fresh = value(record, "reward/nonzero_share").unwrap();
        assert!(
            trained >= fresh - 1e-12,
            "step {}: {trained} < {fresh}",
            record.step
        );
    }
    // Adapter-only: the LLM (and the vision tower) end as they started; the adapter moved.
    let (_, adapter_end) = arm("adapter_only");
    for (name, values) in &adapter_end {
        let moved = values != &start[name];
        let adapter = name.starts_with("mlp1.");
        assert_eq!(moved, adapter, "{name}: moved = {moved}");
    }
    // The full arm trains the LLM too.
    assert!(full_end
        .iter()
        .any(|(name, v)| name.starts_with("language_model.") && v != &start[name]));
    // Calibration off: the RM threshold never moves.
    let (no_calibration, _) = arm("no_calibration");
    let thresholds: Vec<f64> = no_calibration
        .iter()
        .filter_map(|r| value(r, "calibration/rm_threshold"))
        .collect();
    assert_eq!(thresholds.len(), 16);
    assert!(
        thresholds.windows(2).all(|w| w[0] == w[1]),
        "{thresholds:?}"
    );
}
