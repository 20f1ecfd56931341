//! The demo's tables, paper-style: one row per stage (held-out accuracy with its standard error,
//! hallucination rate, non-zero-advantage share), then one row per ablation arm. Pure functions of the runs'
//! eval.jsonl and metrics.jsonl, so `r1v2 demo` prints and writes the same text (RUN_DIR/summary.md).

use std::fmt::Write;

use crate::telemetry::MetricsRecord;
use crate::trainer::EvalRecord;

/// One arm of the ablation: its evaluation after GRPO and its metrics.
#[derive(Debug, Clone)]
pub struct ArmResult {
    pub name: String,
    /// What differs from the full method.
    pub change: String,
    pub eval: EvalRecord,
    pub metrics: Vec<MetricsRecord>,
}

/// Mean of `name` over the records with `first <= step <= last` that have it.
pub fn mean_over(records: &[MetricsRecord], name: &str, first: u64, last: u64) -> Option<f64> {
    let values: Vec<f64> = records
        .iter()
        .filter(|r| (first..=last).contains(&r.step))
        .filter_map(|r| r.values.get(name).copied())
        .filter(|v| v.is_finite())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

/// The non-zero-advantage share of the groups a stage trained on: the SSB's batch share in GRPO
/// (`ssb/effective_share_after`), the fresh groups' share in MPO (`reward/nonzero_share`).
pub fn nonzero_share(records: &[MetricsRecord], first: u64, last: u64) -> Option<f64> {
    mean_over(records, "ssb/effective_share_after", first, last)
        .or_else(|| mean_over(records, "reward/nonzero_share", first, last))
}

fn opt(value: Option<f64>) -> String {
    value.map_or("-".into(), |v| format!("{v:.3}"))
}

fn accuracy(eval: &EvalRecord) -> String {
    format!("{:.3} ± {:.3}", eval.accuracy, eval.stderr)
}

fn per_set(eval: &EvalRecord) -> String {
    eval.by_set
        .iter()
        .map(|(set, share)| format!("{set} {:.2}", share.accuracy))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The stage table: `stage | held-out accuracy ± SE | hallucination rate | non-zero-advantage share`.
pub fn stage_table(evals: &[EvalRecord], metrics: &[MetricsRecord]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| stage | steps | held-out accuracy ± SE | by set | hallucination rate (CHAIR-i) | non-zero-advantage share |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    let mut previous = 0;
    for eval in evals {
        let first = previous + 1;
        let share = if eval.label == "start" {
            None
        } else {
            nonzero_share(metrics, first, eval.step)
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} |",
            eval.label,
            eval.step - previous.min(eval.step),
            accuracy(eval),
            per_set(eval),
            opt(eval.hallucination_rate),
            opt(share)
        );
        previous = eval.step;
    }
    out
}

/// The ablation table, every arm GRPO from the same MPO checkpoint for the same steps.
pub fn ablation_table(arms: &[ArmResult]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| arm | change | held-out accuracy ± SE | hallucination rate | non-zero share: fresh -> trained | calibration changes |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    for arm in arms {
        let last = arm.metrics.last().map_or(0, |r| r.step);
        let fresh = mean_over(&arm.metrics, "reward/nonzero_share", 1, last);
        let trained = nonzero_share(&arm.metrics, 1, last);
        let changes = calibration_changes(&arm.metrics);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} -> {} | {} |",
            arm.name,
            arm.change,
            accuracy(&arm.eval),
            opt(arm.eval.hallucination_rate),
            opt(fresh),
            opt(trained),
            changes
        );
    }
    out
}

/// Steps whose RM threshold differs from the step before (the monitor moved the calibration).
pub fn calibration_changes(metrics: &[MetricsRecord]) -> usize {
    let thresholds: Vec<f64> = metrics
        .iter()
        .filter_map(|r| r.values.get("calibration/rm_threshold").copied())
        .collect();
    thresholds.windows(2).filter(|w| w[0] != w[1]).count()
}

/// `name` per step, for a chart.
pub fn series(metrics: &[MetricsRecord], name: &str) -> Vec<(f64, f64)> {
    metrics
        .iter()
        .filter_map(|r| r.values.get(name).map(|&v| (r.step as f64, v)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn record(step: u64, values: &[(&str, f64)]) -> MetricsRecord {
        MetricsRecord {
            step,
            values: values
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect::<BTreeMap<_, _>>(),
        }
    }

    fn eval(label: &str, step: u64, accuracy: f64) -> EvalRecord {
        EvalRecord {
            label: label.into(),
            step,
            accuracy,
            stderr: 0.05,
            n: 100,
            format_rate: 1.0,
            mean_length: 40.0,
            by_set: BTreeMap::new(),
            by_kind: BTreeMap::new(),
            hallucination_rate: Some(0.25),
            hallucinating_responses: None,
            claims: 10,
            seconds: 1.0,
        }
    }

    #[test]
    fn stage_rows_average_their_own_steps() {
        let metrics = vec![
            record(1, &[]),
            record(2, &[]),
            record(3, &[("reward/nonzero_share", 0.5)]),
            record(4, &[("reward/nonzero_share", 0.7)]),
            record(
                5,
                &[
                    ("reward/nonzero_share", 0.2),
                    ("ssb/effective_share_after", 1.0),
                ],
            ),
            record(
                6,
                &[
                    ("reward/nonzero_share", 0.4),
                    ("ssb/effective_share_after", 0.8),
                    ("calibration/rm_threshold", 0.4),
                ],
            ),
        ];
        let table = stage_table(
            &[
                eval("sft", 2, 0.3),
                eval("mpo", 4, 0.4),
                eval("grpo", 6, 0.6),
            ],
            &metrics,
        );
        let rows: Vec<&str> = table.lines().skip(2).collect();
        assert_eq!(rows[0], "| sft | 2 | 0.300 ± 0.050 |  | 0.250 | - |");
        assert_eq!(rows[1], "| mpo | 2 | 0.400 ± 0.050 |  | 0.250 | 0.600 |");
        assert_eq!(rows[2], "| grpo | 2 | 0.600 ± 0.050 |  | 0.250 | 0.900 |");
        assert_eq!(calibration_changes(&metrics), 0);
        let moved = vec![
            record(1, &[("calibration/rm_threshold", 0.5)]),
            record(2, &[("calibration/rm_threshold", 0.4)]),
            record(3, &[("calibration/rm_threshold", 0.4)]),
        ];
        assert_eq!(calibration_changes(&moved), 1);
    }
}
