//! The hallucination monitor: slopes on known series, leading signals, RM-rule disagreement, bounded
//! calibration (cooldown, floors, freshness, relaxation), a flat run that never changes anything, serde.

use std::path::Path;

use anyhow::Result;
use r1v2_actors::monitor::signals::{least_squares_slope, rm_rule_disagreement};
use r1v2_actors::monitor::{
    names, CalibrationPolicy, HallucinationMonitor, MonitorConfig, ProbeSchedule, ProbeSet,
    RateSource, SampleObservation, StepObservation,
};
use r1v2_actors::rl::config::Calibration;
use r1v2_actors::verifiers::HallucinationFlags;

/// Flags for one response with `claims` claims, `unsupported` of them unsupported.
fn flags(claims: u32, unsupported: u32) -> HallucinationFlags {
    HallucinationFlags {
        claims_checked: claims,
        unsupported: (0..unsupported).map(|i| format!("object{i}")).collect(),
    }
}

fn sample(rule_accuracy: f64, rm_score: f64, response_len: usize) -> SampleObservation {
    SampleObservation {
        rule_accuracy,
        rm_score,
        response_len,
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

#[test]
fn least_squares_slope_on_known_series() {
    // y = 2x + 1 exactly.
    let line: Vec<(f64, f64)> = (0..6).map(|x| (x as f64, 2.0 * x as f64 + 1.0)).collect();
    assert!(close(least_squares_slope(&line).expect("slope"), 2.0));
    // By hand: x mean 1.5, y mean 0.5, Sxx = 5, Sxy = 1 -> 0.2.
    let zigzag = [(0.0, 0.0), (1.0, 1.0), (2.0, 0.0), (3.0, 1.0)];
    assert!(close(least_squares_slope(&zigzag).expect("slope"), 0.2));
    assert_eq!(least_squares_slope(&[(1.0, 3.0)]), None);
    assert_eq!(least_squares_slope(&[(2.0, 3.0), (2.0, 5.0)]), None);
}

#[test]
fn rm_rule_disagreement_counts_reversed_pairs() {
    // Rule-right sample (rm 0.2) vs two rule-wrong ones (rm 0.9 above it, rm 0.1 below): 1 of 2 pairs.
    let group = [
        sample(1.0, 0.2, 10),
        sample(0.0, 0.9, 10),
        sample(0.0, 0.1, 10),
    ];
    assert_eq!(rm_rule_disagreement(&group), (2, 1));
    // All equally right: no ordered pair.
    let tied = [sample(1.0, 0.2, 10), sample(1.0, 0.9, 10)];
    assert_eq!(rm_rule_disagreement(&tied), (0, 0));
    // An RM tie is not a disagreement.
    let rm_tie = [sample(1.0, 0.5, 10), sample(0.0, 0.5, 10)];
    assert_eq!(rm_rule_disagreement(&rm_tie), (1, 0));
}

#[test]
fn leading_signals_over_the_window() -> Result<()> {
    let config = MonitorConfig {
        window: 10,
        ..Default::default()
    };
    let mut monitor = HallucinationMonitor::new(config, Calibration::default())?;
    // 15 steps; the window keeps steps 5..=14. RM mean = 0.1 * step (rising), rule accuracy 0.5 (flat),
    // mean length = 100 + 10 * step, one rule-ordered pair per step that the RM reverses on even steps.
    for step in 0..15u64 {
        let rm = 0.1 * step as f64;
        let len = 100 + 10 * step as usize;
        let (right_rm, wrong_rm) = if step % 2 == 0 {
            (rm - 0.05, rm + 0.05)
        } else {
            (rm + 0.05, rm - 0.05)
        };
        let observation = StepObservation {
            flags: vec![flags(4, u32::from(step >= 10))],
            groups: vec![vec![
                sample(1.0, right_rm, len - 5),
                sample(0.0, wrong_rm, len + 5),
            ]],
        };
        monitor.observe_step(step, &observation)?;
    }
    let signals = monitor.signals();
    assert!(close(signals.rm_slope.expect("rm"), 0.1));
    assert!(close(signals.accuracy_slope.expect("acc"), 0.0));
    // Length slope 10 per step over the mean length of steps 5..=14 (100 + 10 * 9.5 = 195).
    assert!(close(signals.length_growth.expect("len"), 10.0 / 195.0));
    // Steps 5..=14: 5 even steps of 10 reverse their pair.
    assert!(close(signals.rm_rule_disagreement.expect("pairs"), 0.5));
    assert!(signals.rm_up_accuracy_flat);
    // Window rate: steps 5..=14 have 40 claims, steps 10..=14 one unsupported each.
    assert!(close(monitor.rate().expect("rate"), 5.0 / 40.0));

    let metrics = monitor.metrics();
    let names_logged: Vec<&str> = metrics.iter().map(|m| m.0).collect();
    assert_eq!(
        names_logged,
        [
            names::RATE,
            names::PROBE_RATE,
            names::RM_RULE_DISAGREEMENT,
            names::RM_SLOPE,
            names::ACCURACY_SLOPE,
            names::LENGTH_GROWTH,
            names::RM_UP_ACCURACY_FLAT,
            names::RM_THRESHOLD,
            names::RM_WEIGHT,
        ]
    );
    assert_eq!(names::RATE, "hallucination/rate");
    assert_eq!(names::RM_WEIGHT, "calibration/rm_weight");
    let value = |name: &str| metrics.iter().find(|m| m.0 == name).map(|m| m.1);
    assert!(close(value(names::RM_SLOPE).expect("logged"), 0.1));
    assert_eq!(
        value(names::PROBE_RATE),
        Some(0.0),
        "no probe yet: logged as 0"
    );
    assert_eq!(value(names::RM_UP_ACCURACY_FLAT), Some(1.0));
    Ok(())
}

/// Probe-driven config: bound 0.1, cooldown 20, threshold -0.25 (floor 0.5), weight -0.1 (floor 0.7).
fn probe_config(relax_after_steps: u64) -> MonitorConfig {
    MonitorConfig {
        window: 10,
        probe: ProbeSchedule { every_n_steps: 10 },
        rate_bound: 0.1,
        rate_source: RateSource::Probe,
        min_claims: 50,
        calibration: CalibrationPolicy {
            threshold_step: 0.25,
            weight_step: 0.1,
            threshold_floor: 0.5,
            weight_floor: 0.7,
            cooldown_steps: 20,
            relax_after_steps,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// Runs steps `steps`, probing when due with `probe_rate(step)` over 100 claims, calibrating each step.
fn run(
    monitor: &mut HallucinationMonitor,
    steps: std::ops::Range<u64>,
    probe_rate: impl Fn(u64) -> u32,
) {
    for step in steps {
        if monitor.probe_due(step) {
            // 10 responses of 10 claims; `probe_rate(step)` % of all claims unsupported.
            let unsupported = probe_rate(step);
            let probe: Vec<HallucinationFlags> = (0..10)
                .map(|i| flags(10, unsupported / 10 + u32::from(i < unsupported % 10)))
                .collect();
            monitor.observe_probe(step, &probe);
        }
        monitor.calibrate(step);
    }
}

#[test]
fn rising_rate_tightens_in_bounded_steps_with_cooldown_and_floors() -> Result<()> {
    let mut monitor = HallucinationMonitor::new(probe_config(0), Calibration::default())?;
    // Probe rate: 5% at step 0, then 15%, 20%, 25%, ... (+5 points per probe).
    run(&mut monitor, 0..120, |step| {
        if step == 0 {
            5
        } else {
            10 + (step / 10) as u32 * 5
        }
    });
    let changes = monitor.changes();
    let steps: Vec<u64> = changes.iter().map(|c| c.step).collect();
    // First over the bound at step 10; then each 20 steps (cooldown) until both sit at their floors.
    assert_eq!(steps, [10, 30, 50]);
    let expected = [(0.75, 0.9), (0.5, 0.8), (0.5, 0.7)];
    for (change, (threshold, weight)) in changes.iter().zip(expected) {
        assert!(close(change.new.rm_threshold, threshold), "{change:?}");
        assert!(close(change.new.rm_weight, weight), "{change:?}");
        assert!(change.old.rm_threshold - change.new.rm_threshold <= 0.25 + 1e-12);
        assert!(change.old.rm_weight - change.new.rm_weight <= 0.1 + 1e-12);
        assert!(
            change.reason.contains("probe hallucination rate"),
            "{}",
            change.reason
        );
        assert!(
            change.reason.contains("> bound 0.100: tighten"),
            "{}",
            change.reason
        );
    }
    assert!(
        changes[0].reason.contains("0.150 (15/100 claims, step 10)"),
        "{}",
        changes[0].reason
    );
    assert!(changes[0]
        .reason
        .contains("rm_threshold 1.000 -> 0.750, rm_weight 1.000 -> 0.900"));
    assert!(
        changes[2].reason.contains("rm_weight 0.800 -> 0.700")
            && !changes[2].reason.contains("rm_threshold")
    );
    assert_eq!(monitor.calibration(), changes[2].new);
    assert!(close(monitor.probe_rate().expect("probe"), 0.65)); // step 110: 10 + 11 * 5 = 65%
    Ok(())
}

#[test]
fn a_stale_probe_does_not_tighten_twice() -> Result<()> {
    let mut config = probe_config(0);
    config.probe.every_n_steps = 50;
    let mut monitor = HallucinationMonitor::new(config, Calibration::default())?;
    // 30% at every probe (steps 0, 50, 100): one change per probe, not one per cooldown.
    run(&mut monitor, 0..101, |_| 30);
    let steps: Vec<u64> = monitor.changes().iter().map(|c| c.step).collect();
    assert_eq!(steps, [0, 50, 100]);
    Ok(())
}

#[test]
fn too_few_claims_do_not_act() -> Result<()> {
    let mut monitor = HallucinationMonitor::new(probe_config(0), Calibration::default())?;
    monitor.observe_probe(0, &[flags(10, 9)]); // 90% but 10 claims < min_claims 50
    assert_eq!(monitor.calibrate(0), None);
    assert!(monitor.changes().is_empty());
    Ok(())
}

#[test]
fn relaxes_back_to_the_initial_calibration_never_past_it() -> Result<()> {
    let mut monitor = HallucinationMonitor::new(probe_config(30), Calibration::default())?;
    // 20% until step 39 (changes at 0 and 20), then 5%.
    run(&mut monitor, 0..200, |step| if step < 40 { 20 } else { 5 });
    let summary: Vec<(u64, f64, f64)> = monitor
        .changes()
        .iter()
        .map(|c| (c.step, c.new.rm_threshold, c.new.rm_weight))
        .collect();
    // Under the bound from the step-40 probe: relax at 70 (30 steps later), again at 100, then at the
    // baseline nothing moves.
    assert_eq!(summary.len(), 4, "{summary:?}");
    assert_eq!(
        summary.iter().map(|s| s.0).collect::<Vec<_>>(),
        [0, 20, 70, 100]
    );
    assert!(close(summary[1].1, 0.5) && close(summary[1].2, 0.8));
    assert!(close(summary[2].1, 0.75) && close(summary[2].2, 0.9));
    assert_eq!(monitor.calibration(), Calibration::default());
    assert!(monitor.changes()[2]
        .reason
        .contains("<= bound 0.100 for 30 steps: relax"));
    Ok(())
}

#[test]
fn flat_scenario_never_changes_anything() -> Result<()> {
    let config = MonitorConfig {
        rate_source: RateSource::Training,
        min_claims: 10,
        calibration: CalibrationPolicy {
            cooldown_steps: 0,
            relax_after_steps: 5,
            ..Default::default()
        },
        ..Default::default()
    };
    let initial = Calibration {
        rm_threshold: 0.8,
        rm_weight: 0.6,
    };
    let mut monitor = HallucinationMonitor::new(config, initial)?;
    for step in 0..300u64 {
        // 5% of claims unsupported (bound 10%), flat RM, accuracy and lengths.
        let observation = StepObservation {
            flags: vec![flags(20, 1)],
            groups: vec![vec![sample(1.0, 0.7, 200), sample(0.0, 0.3, 200)]],
        };
        monitor.observe_step(step, &observation)?;
        assert_eq!(monitor.calibrate(step), None, "step {step}");
    }
    assert!(monitor.changes().is_empty());
    assert_eq!(monitor.calibration(), initial);
    let signals = monitor.signals();
    assert!(close(signals.rm_slope.expect("rm"), 0.0) && !signals.rm_up_accuracy_flat);
    assert!(close(signals.rm_rule_disagreement.expect("pairs"), 0.0));
    assert!(close(monitor.rate().expect("rate"), 0.05));
    Ok(())
}

#[test]
fn state_round_trips_through_serde_and_resumes_identically() -> Result<()> {
    let mut monitor = HallucinationMonitor::new(probe_config(30), Calibration::default())?;
    for step in 0..35u64 {
        let observation = StepObservation {
            flags: vec![flags(5, 1)],
            groups: vec![vec![
                sample(1.0, 0.1 * step as f64, 50),
                sample(0.0, 0.5, 60),
            ]],
        };
        monitor.observe_step(step, &observation)?;
    }
    run(&mut monitor, 0..35, |_| 25);
    assert!(!monitor.changes().is_empty());
    let json = serde_json::to_string(&monitor)?;
    let mut restored: HallucinationMonitor = serde_json::from_str(&json)?;
    // The workspace's serde_json lacks `float_roundtrip`: a mean like 1.6500000000000001 may come back
    // one ULP off, so floats are compared to 1e-12; counts, calibration and the change log exactly.
    let same = |a: &HallucinationMonitor, b: &HallucinationMonitor| {
        assert_eq!(a.calibration(), b.calibration());
        assert_eq!(a.changes(), b.changes());
        assert_eq!(a.last_probe(), b.last_probe());
        assert_eq!(a.window_claims(), b.window_claims());
        assert_eq!(a.config(), b.config());
        for ((name, x), (other, y)) in a.metrics().into_iter().zip(b.metrics()) {
            assert_eq!(name, other);
            assert!((x - y).abs() < 1e-12, "{name}: {x} vs {y}");
        }
    };
    same(&restored, &monitor);
    run(&mut monitor, 35..150, |step| if step < 60 { 25 } else { 2 });
    run(
        &mut restored,
        35..150,
        |step| if step < 60 { 25 } else { 2 },
    );
    same(&restored, &monitor);
    // The resumed run went on changing: tightened to the floors, then relaxed back.
    assert!(restored.changes().len() > 2, "{:?}", restored.changes());
    Ok(())
}

#[test]
fn bad_input_and_config_are_errors() -> Result<()> {
    let mut monitor = HallucinationMonitor::new(MonitorConfig::default(), Calibration::default())?;
    let nan = StepObservation {
        flags: vec![],
        groups: vec![vec![sample(1.0, 0.0, 1)], vec![sample(1.0, f64::NAN, 1)]],
    };
    let err = monitor.observe_step(3, &nan).unwrap_err().to_string();
    assert!(err.contains("step 3 group 1 sample 0"), "{err}");
    monitor.observe_step(3, &StepObservation::default())?;
    let err = monitor
        .observe_step(2, &StepObservation::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("step 2 observed after step 3"), "{err}");

    let bad = MonitorConfig {
        rate_bound: 1.5,
        ..Default::default()
    };
    let err = HallucinationMonitor::new(bad, Calibration::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("monitor.rate_bound"), "{err}");
    let unknown = serde_json::from_str::<MonitorConfig>(r#"{"calibration": {"cooldown": 3}}"#);
    assert!(unknown.is_err(), "unknown keys are errors");
    let partial: MonitorConfig =
        serde_json::from_str(r#"{"rate_bound": 0.2, "probe": {"every_n_steps": 7}}"#)?;
    assert_eq!(partial.window, MonitorConfig::default().window);
    assert!(partial.probe.is_due(14) && !partial.probe.is_due(15));
    assert!(!ProbeSchedule { every_n_steps: 0 }.is_due(0));
    Ok(())
}

#[test]
fn probe_set_parses_jsonl_and_names_bad_lines() -> Result<()> {
    let path = Path::new("probes.jsonl");
    let text = concat!(
        r#"{"id": "p1", "question": "Describe the image.", "images": ["a.png"], "meta": {"objects": ["dog"]}}"#,
        "\n\n",
        r#"{"id": "p2", "question": "What is there?", "images": [], "answer": "x", "meta": {"objects": []}}"#,
        "\n"
    );
    let set = ProbeSet::from_jsonl(text, path)?;
    assert_eq!(set.items.len(), 2);
    assert_eq!(set.items[0].verifier, "grounding");
    assert_eq!(set.items[1].answer, "x");
    let no_objects = r#"{"id": "p1", "question": "q", "images": [], "meta": {}}"#;
    let err = ProbeSet::from_jsonl(
        &format!("{}\n{no_objects}", text.lines().next().unwrap_or("")),
        path,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("probes.jsonl:2") && err.contains("meta.objects"),
        "{err}"
    );
    let err = ProbeSet::from_jsonl("{not json", path)
        .unwrap_err()
        .to_string();
    assert!(err.contains("probes.jsonl:1"), "{err}");
    Ok(())
}

#[test]
fn grounding_verdicts_feed_the_probe_rate() -> Result<()> {
    use r1v2_actors::verifiers::grounding::{chair_i, GroundingConfig, GroundingVerifier};
    use r1v2_actors::verifiers::{Verifier, VerifyInput};

    let verifier = GroundingVerifier::new(GroundingConfig::default())?;
    let meta = serde_json::json!({"objects": ["dog", "frisbee"]});
    let responses = [
        "A dog catches a frisbee.",
        "A dog, a cat and a frisbee.",
        "A horse.",
    ];
    let verdicts = responses
        .iter()
        .map(|response| {
            verifier.verify(&VerifyInput {
                prompt: "Describe.",
                response,
                answer: "",
                meta: &meta,
            })
        })
        .collect::<r1v2_actors::Result<Vec<_>>>()?;
    let probe_flags: Vec<HallucinationFlags> = verdicts
        .iter()
        .filter_map(|v| v.hallucination.clone())
        .collect();
    let config = MonitorConfig {
        min_claims: 1,
        ..Default::default()
    };
    let mut monitor = HallucinationMonitor::new(config, Calibration::default())?;
    monitor.observe_probe(0, &probe_flags);
    // Claims 2 + 3 + 1 = 6, unsupported cat + horse = 2: CHAIR-i 1/3 over the 10% bound.
    assert!(close(monitor.probe_rate().expect("rate"), 1.0 / 3.0));
    assert!(close(chair_i(&verdicts).expect("claims"), 1.0 / 3.0));
    assert_eq!(monitor.last_probe().map(|p| p.hallucinating), Some(2));
    let change = monitor.calibrate(0).expect("over the bound: tightens");
    assert!(
        change.reason.contains("0.333 (2/6 claims, step 0)"),
        "{}",
        change.reason
    );
    Ok(())
}
