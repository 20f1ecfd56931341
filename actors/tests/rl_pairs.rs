//! MPO pair mining (chosen = best eligible, rejected = worst not verified correct, margin threshold) and the
//! reference cache.

use anyhow::Result;
use r1v2_actors::rl::mpo::{
    mine_pairs, ReferenceCache, ReferenceLogprobs, ScoredResponse, VerifierOutcome,
};
use r1v2_actors::rl::{Group, PromptId, Sample};
use r1v2_actors::verifiers::Verdict;

/// A scored sample that pair mining sees as `(score, verifier, format_ok)`: `score` is its RM score, the
/// verdict passes or fails (none for `NotApplicable`, which is never blocked by the format).
fn r(score: f64, verifier: VerifierOutcome, format_ok: bool) -> Sample {
    let mut sample = Sample::scored(vec![1, 2], vec![-1.0, -1.0], 0.0, 0.0, None);
    sample.rm_score = Some(score);
    sample.verdict = match verifier {
        VerifierOutcome::Pass | VerifierOutcome::Fail => Some(Verdict {
            score: if verifier == VerifierOutcome::Pass {
                1.0
            } else {
                0.0
            },
            format_ok,
            extracted: None,
            reason: String::new(),
            hallucination: None,
            failure: None,
        }),
        VerifierOutcome::NotApplicable => {
            assert!(
                format_ok,
                "a sample without a verdict is not blocked by the format"
            );
            None
        }
    };
    let seen = ScoredResponse::of(&sample);
    assert_eq!((seen.verifier, seen.format_ok), (verifier, format_ok));
    assert!(seen.score == score || (seen.score.is_nan() && score.is_nan()));
    sample
}

fn group(prompt: u64, samples: Vec<Sample>) -> Group {
    Group {
        prompt_id: PromptId(prompt),
        policy_version: 0,
        samples,
    }
}

#[test]
fn pairs_are_best_eligible_against_worst_with_drop_counts() -> Result<()> {
    use VerifierOutcome::{Fail, NotApplicable, Pass};
    let groups = vec![
        // The top score fails its verifier: the chosen is the best passing one (index 2).
        group(
            0,
            vec![r(9.0, Fail, true), r(-12.0, Fail, true), r(6.0, Pass, true)],
        ),
        // The best passing one has a bad format: the chosen is index 1 (no verifier applies); the verified
        // index 2 scores lowest but is never rejected: the rejected is the bad format (index 0).
        group(
            1,
            vec![
                r(8.0, Pass, false),
                r(24.0, NotApplicable, true),
                r(-14.0, Pass, true),
            ],
        ),
        // Margin 10 < 15: dropped.
        group(2, vec![r(5.0, Pass, true), r(-5.0, Fail, true)]),
        // Nothing eligible.
        group(3, vec![r(5.0, Fail, true), r(-15.0, Pass, false)]),
        // One response.
        group(4, vec![r(5.0, Pass, true)]),
        // Every response verified correct: however far apart the RM puts them, nothing is rejected.
        group(5, vec![r(40.0, Pass, true), r(-40.0, Pass, true)]),
        // A correct response the RM scores lowest is passed over for the wrong one.
        group(
            6,
            vec![
                r(30.0, Pass, true),
                r(-30.0, Pass, true),
                r(0.0, Fail, true),
            ],
        ),
    ];
    let mined = mine_pairs(&groups, 15.0)?;
    let ids: Vec<(u64, usize, usize)> = mined
        .pairs
        .iter()
        .map(|p| (p.id.prompt_id.0, p.id.chosen, p.id.rejected))
        .collect();
    assert_eq!(ids, vec![(0, 2, 1), (1, 1, 0), (6, 0, 2)]);
    assert_eq!(mined.pairs[0].margin, 18.0);
    assert_eq!(mined.pairs[1].margin, 16.0);
    assert_eq!(mined.pairs[2].margin, 30.0);
    assert_eq!(
        (
            mined.dropped.below_margin,
            mined.dropped.no_eligible_chosen,
            mined.dropped.no_eligible_rejected,
            mined.dropped.too_few_responses
        ),
        (1, 1, 1, 1)
    );
    // A lower threshold keeps the third group.
    assert_eq!(mine_pairs(&groups, 10.0)?.pairs.len(), 4);
    let bad = vec![group(7, vec![r(f64::NAN, Pass, true)])];
    assert!(mine_pairs(&bad, 0.0)
        .unwrap_err()
        .to_string()
        .contains("prompt 7"));
    Ok(())
}

#[test]
fn reference_cache_computes_once_per_pair() -> Result<()> {
    let groups = vec![group(
        3,
        vec![
            r(20.0, VerifierOutcome::Pass, true),
            r(0.0, VerifierOutcome::Fail, true),
        ],
    )];
    let pair = mine_pairs(&groups, 15.0)?.pairs[0];
    let mut cache = ReferenceCache::default();
    let mut calls = 0;
    for _ in 0..3 {
        let v = cache.get_or_compute(pair.id, || {
            calls += 1;
            Ok(ReferenceLogprobs {
                chosen: -10.0,
                rejected: -20.0,
            })
        })?;
        assert_eq!(v.chosen, -10.0);
    }
    assert_eq!((calls, cache.len(), cache.stats()), (1, 1, (2, 1)));
    cache.clear();
    assert!(cache.is_empty());
    Ok(())
}
