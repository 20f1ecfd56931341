//! MPO pair mining (chosen = best eligible, rejected = worst, margin threshold) and the reference cache.

use anyhow::Result;
use r1v2_actors::rl::mpo::{
    mine_pairs, ReferenceCache, ReferenceLogprobs, ScoredGroup, ScoredResponse, VerifierOutcome,
};
use r1v2_actors::rl::PromptId;

fn r(score: f64, verifier: VerifierOutcome, format_ok: bool) -> ScoredResponse {
    ScoredResponse {
        score,
        verifier,
        format_ok,
    }
}

#[test]
fn pairs_are_best_eligible_against_worst_with_drop_counts() -> Result<()> {
    use VerifierOutcome::{Fail, NotApplicable, Pass};
    let groups = vec![
        // The top score fails its verifier: the chosen is the best passing one (index 2).
        ScoredGroup {
            prompt_id: PromptId(0),
            responses: vec![r(9.0, Fail, true), r(-12.0, Fail, true), r(6.0, Pass, true)],
        },
        // The best passing one has a bad format: the chosen is index 1 (no verifier applies).
        ScoredGroup {
            prompt_id: PromptId(1),
            responses: vec![
                r(8.0, Pass, false),
                r(4.0, NotApplicable, true),
                r(-14.0, Pass, true),
            ],
        },
        // Margin 10 < 15: dropped.
        ScoredGroup {
            prompt_id: PromptId(2),
            responses: vec![r(5.0, Pass, true), r(-5.0, Fail, true)],
        },
        // Nothing eligible.
        ScoredGroup {
            prompt_id: PromptId(3),
            responses: vec![r(5.0, Fail, true), r(-15.0, Pass, false)],
        },
        // One response.
        ScoredGroup {
            prompt_id: PromptId(4),
            responses: vec![r(5.0, Pass, true)],
        },
    ];
    let mined = mine_pairs(&groups, 15.0)?;
    let ids: Vec<(u64, usize, usize)> = mined
        .pairs
        .iter()
        .map(|p| (p.id.prompt_id.0, p.id.chosen, p.id.rejected))
        .collect();
    assert_eq!(ids, vec![(0, 2, 1), (1, 1, 2)]);
    assert_eq!(mined.pairs[0].margin, 18.0);
    assert_eq!(mined.pairs[1].margin, 18.0);
    assert_eq!(
        (
            mined.dropped.below_margin,
            mined.dropped.no_eligible_chosen,
            mined.dropped.too_few_responses
        ),
        (1, 1, 1)
    );
    // A lower threshold keeps the third group.
    assert_eq!(mine_pairs(&groups, 10.0)?.pairs.len(), 3);
    let bad = vec![ScoredGroup {
        prompt_id: PromptId(7),
        responses: vec![r(f64::NAN, Pass, true)],
    }];
    assert!(mine_pairs(&bad, 0.0)
        .unwrap_err()
        .to_string()
        .contains("prompt 7"));
    Ok(())
}

#[test]
fn reference_cache_computes_once_per_pair() -> Result<()> {
    let groups = vec![ScoredGroup {
        prompt_id: PromptId(3),
        responses: vec![
            r(20.0, VerifierOutcome::Pass, true),
            r(0.0, VerifierOutcome::Fail, true),
        ],
    }];
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
