use super::*;
use crate::rl::config::RmNormalisation;
use crate::rl::group::Sample;
use crate::rl::PromptId;
use crate::verifiers::{HallucinationFlags, VerifyFailure};

fn group(prompt: u64, lengths: &[usize]) -> Group {
    Group {
        prompt_id: PromptId(prompt),
        policy_version: 3,
        samples: lengths
            .iter()
            .map(|&n| Sample::scored(vec![7; n], vec![-0.5; n], 0.0, 0.0, None))
            .collect(),
    }
}

fn verdict(score: f32, format_ok: bool) -> Verdict {
    Verdict {
        score,
        format_ok,
        extracted: None,
        reason: String::new(),
        hallucination: None,
        failure: None,
    }
}

fn config<'a>(
    reward: &'a RewardConfig,
    advantage: &'a AdvantageConfig,
    calibration: &'a Calibration,
) -> ScoringConfig<'a> {
    ScoringConfig {
        reward,
        advantage,
        calibration,
    }
}

#[test]
fn verdicts_land_on_their_samples_and_rewards_and_advantages_follow() -> Result<()> {
    let reward = RewardConfig::default();
    let advantage = AdvantageConfig::default();
    let calibration = Calibration::default();
    let groups = vec![group(0, &[3, 4]), group(1, &[5, 6, 7])];
    let verdicts = vec![
        verdict(1.0, true),  // group 0: right, formatted -> 2
        verdict(0.0, true),  // wrong, formatted -> 1
        verdict(1.0, false), // group 1: right, unformatted -> 1
        verdict(1.0, false), // -> 1
        verdict(1.0, false), // -> 1: the group is all right and tied
    ];
    let scoring = score_groups(
        groups,
        verdicts,
        None,
        config(&reward, &advantage, &calibration),
    )?;
    let rewards: Vec<Vec<f64>> = scoring
        .groups
        .iter()
        .map(|g| g.samples.iter().map(|s| s.reward).collect())
        .collect();
    assert_eq!(rewards, vec![vec![2.0, 1.0], vec![1.0, 1.0, 1.0]]);
    // Group 0: (r - mean) / (std + eps), std unbiased as TRL's torch.std: sqrt(0.5).
    let a = &scoring.groups[0].samples;
    let expected = 0.5 / (0.5f64.sqrt() + 1e-4);
    assert!(
        (a[0].advantage - expected).abs() < 1e-12,
        "{}",
        a[0].advantage
    );
    assert!(
        (a[1].advantage + expected).abs() < 1e-12,
        "{}",
        a[1].advantage
    );
    assert!(scoring.groups[1].samples.iter().all(|s| s.advantage == 0.0));
    assert_eq!(a[0].correct, Some(true));
    assert_eq!(a[1].correct, Some(false));
    assert_eq!(scoring.groups[1].samples[2].token_ids.len(), 7);
    assert_eq!(
        scoring.groups[1].samples[2].verdict,
        Some(verdict(1.0, false))
    );

    let m = scoring.metrics;
    assert!((m.mean - 6.0 / 5.0).abs() < 1e-12);
    assert!((m.std - ((0.64 + 4.0 * 0.04) / 5.0f64).sqrt()).abs() < 1e-12);
    assert!((m.accuracy - 0.8).abs() < 1e-12);
    assert!((m.rule - 0.8).abs() < 1e-12);
    assert!((m.format - 0.4).abs() < 1e-12);
    assert_eq!(m.rm, 0.0);
    assert_eq!(m.verify_failures, 0);
    // The monitor sees every sample, grouped, with its length.
    let lengths: Vec<Vec<usize>> = scoring
        .observation
        .groups
        .iter()
        .map(|g| g.iter().map(|s| s.response_len).collect())
        .collect();
    assert_eq!(lengths, vec![vec![3, 4], vec![5, 6, 7]]);
    Ok(())
}

#[test]
fn rm_scores_failures_and_flags_are_carried() -> Result<()> {
    let reward = RewardConfig {
        rm_normalisation: RmNormalisation::Affine {
            scale: 0.5,
            offset: 0.0,
        },
        ..RewardConfig::default()
    };
    let advantage = AdvantageConfig::default();
    let calibration = Calibration {
        rm_threshold: 10.0,
        rm_weight: 1.0,
    };
    let failed = VerifyFailure::Timeout("math".into(), 2.0).into_verdict();
    let mut flagged = verdict(1.0, true);
    flagged.hallucination = Some(HallucinationFlags {
        claims_checked: 2,
        unsupported: vec!["red square".into()],
    });
    let scoring = score_groups(
        vec![group(4, &[1, 1])],
        vec![flagged, failed],
        Some(vec![2.0, -4.0]),
        config(&reward, &advantage, &calibration),
    )?;
    let s = &scoring.groups[0].samples;
    assert_eq!((s[0].rm_score, s[1].rm_score), (Some(2.0), Some(-4.0)));
    // rule + format + 0.5 * rm.
    assert!((s[0].reward - (1.0 + 1.0 + 1.0)).abs() < 1e-12);
    assert!((s[1].reward - (0.0 + 0.0 - 2.0)).abs() < 1e-12);
    assert_eq!(scoring.metrics.verify_failures, 1);
    assert_eq!(scoring.metrics.rm_threshold, 10.0);
    assert_eq!(scoring.observation.flags.len(), 1);
    assert_eq!(scoring.observation.groups[0][1].rm_score, -4.0);
    Ok(())
}

#[test]
fn counts_that_do_not_match_the_samples_are_errors() {
    let reward = RewardConfig::default();
    let advantage = AdvantageConfig::default();
    let calibration = Calibration::default();
    let cfg = config(&reward, &advantage, &calibration);
    let short = score_groups(vec![group(0, &[1, 1])], vec![verdict(1.0, true)], None, cfg)
        .expect_err("one verdict for two samples");
    assert!(
        short.to_string().contains("1 verdicts for 2 samples"),
        "{short}"
    );
    let rm = score_groups(
        vec![group(0, &[1, 1])],
        vec![verdict(1.0, true), verdict(0.0, true)],
        Some(vec![0.5]),
        cfg,
    )
    .expect_err("one RM score for two samples");
    assert!(rm.to_string().contains("1 reward-model scores"), "{rm}");
}
