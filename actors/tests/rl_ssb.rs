//! The Selective Sample Buffer: filtering, replay, caps, staleness, eviction, serde state, and chi-square
//! tests that its weighted sampling without replacement follows the intended distribution.

use anyhow::Result;
use r1v2_actors::rl::config::{Eviction, SsbConfig};
use r1v2_actors::rl::ssb::{
    prefilter_prompt_pool, weighted_sample_without_replacement, SelectiveSampleBuffer,
};
use r1v2_actors::rl::{Group, PromptId, Sample};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// A group of 4 whose advantages are `[a, -a, a, -a]` (a = 0: zero-advantage) and verdicts `correct`.
fn group(prompt: u64, version: u64, a: f64, correct: bool) -> Group {
    let samples = (0..4)
        .map(|i| {
            Sample::scored(
                vec![1, 2, i],
                vec![-0.5, -0.25, -1.0],
                if correct { 1.0 } else { 0.0 },
                if i % 2 == 0 { a } else { -a },
                Some(correct),
            )
        })
        .collect();
    Group {
        prompt_id: PromptId(prompt),
        policy_version: version,
        samples,
    }
}

/// Pearson chi-square statistic of observed counts against expected probabilities.
fn chi_square(counts: &[u64], probs: &[f64]) -> f64 {
    let n: u64 = counts.iter().sum();
    counts
        .iter()
        .zip(probs)
        .map(|(&c, &p)| (c as f64 - n as f64 * p).powi(2) / (n as f64 * p))
        .sum()
}

#[test]
fn first_draw_follows_the_weights() {
    // One draw = one categorical sample: chi-square with 4 degrees of freedom; 0.999 quantile 18.47.
    let weights = [1.0, 2.0, 3.0, 4.0, 10.0];
    let total: f64 = weights.iter().sum();
    let probs: Vec<f64> = weights.iter().map(|w| w / total).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut counts = [0u64; 5];
    for _ in 0..20_000 {
        counts[weighted_sample_without_replacement(&mut rng, &weights, 1)[0]] += 1;
    }
    let stat = chi_square(&counts, &probs);
    assert!(stat < 18.47, "chi-square {stat} for counts {counts:?}");
    // Sanity: the test can fail: uniform probabilities are rejected by the same data.
    assert!(chi_square(&counts, &[0.2; 5]) > 18.47);
}

#[test]
fn ordered_pairs_follow_successive_sampling() {
    // k = 2 without replacement: P(i then j) = w_i / W * w_j / (W - w_i); 20 ordered cells, 19 degrees of
    // freedom, 0.999 quantile 43.82. Inclusion probabilities are not w_i / W: the test checks the exact law.
    let weights = [1.0, 2.0, 3.0, 4.0, 10.0];
    let total: f64 = weights.iter().sum();
    let mut cells = Vec::new();
    for i in 0..5 {
        for j in 0..5 {
            if i != j {
                cells.push((
                    (i, j),
                    weights[i] / total * weights[j] / (total - weights[i]),
                ));
            }
        }
    }
    let probs: Vec<f64> = cells.iter().map(|c| c.1).collect();
    assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let mut counts = vec![0u64; cells.len()];
    for _ in 0..40_000 {
        let draw = weighted_sample_without_replacement(&mut rng, &weights, 2);
        assert_eq!(draw.len(), 2);
        assert_ne!(draw[0], draw[1]);
        let cell = cells
            .iter()
            .position(|c| c.0 == (draw[0], draw[1]))
            .expect("cell");
        counts[cell] += 1;
    }
    let stat = chi_square(&counts, &probs);
    assert!(stat < 43.82, "chi-square {stat}");
    // Treating the second draw as independent (w_j / W, renormalised) is rejected by the same data.
    let naive_wrong: Vec<f64> = cells
        .iter()
        .map(|&((i, j), _)| weights[i] / total * weights[j] / total)
        .collect();
    let norm: f64 = naive_wrong.iter().sum();
    let naive_wrong: Vec<f64> = naive_wrong.iter().map(|p| p / norm).collect();
    assert!(chi_square(&counts, &naive_wrong) > 43.82);
}

#[test]
fn zero_weights_are_never_drawn() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for _ in 0..200 {
        let d = weighted_sample_without_replacement(&mut rng, &[0.0, 1.0, 0.0, 2.0], 4);
        assert_eq!(d.len(), 2);
        assert!(d.iter().all(|&i| i == 1 || i == 3));
    }
}

#[test]
fn replay_through_the_buffer_follows_priority_power_alpha() -> Result<()> {
    // Stored groups with mean |A| 1, 2, 3; alpha = 2 gives priorities 1, 4, 9. Each fill with no fresh groups
    // and target 2 (replay cap 1) replays one group; replays never exhaust (max_replays huge).
    let cfg = SsbConfig {
        alpha: 2.0,
        capacity: 10,
        max_staleness: u64::MAX,
        max_replay_share: 0.5,
        max_replays_per_group: u32::MAX,
        seed: 5,
        ..Default::default()
    };
    let mut ssb = SelectiveSampleBuffer::new(cfg)?;
    ssb.fill_batch(
        vec![
            group(0, 0, 1.0, true),
            group(1, 0, 2.0, true),
            group(2, 0, 3.0, true),
        ],
        3,
        0,
    )?;
    let mut counts = [0u64; 3];
    for _ in 0..14_000 {
        let batch = ssb.fill_batch(vec![], 2, 0)?;
        assert_eq!(batch.replayed, 1);
        counts[batch.groups[0].prompt_id.0 as usize] += 1;
    }
    let stat = chi_square(&counts, &[1.0 / 14.0, 4.0 / 14.0, 9.0 / 14.0]);
    assert!(
        stat < 13.82,
        "chi-square {stat} (2 dof, 0.999 quantile 13.82), counts {counts:?}"
    );
    Ok(())
}

#[test]
fn fill_batch_filters_counts_caps_and_stores() -> Result<()> {
    let cfg = SsbConfig {
        capacity: 3,
        max_staleness: 2,
        max_replay_share: 0.5,
        seed: 9,
        ..Default::default()
    };
    let mut ssb = SelectiveSampleBuffer::new(cfg)?;
    // Step 0: 2 informative, 1 all-correct, 1 all-wrong; empty buffer: nothing to replay.
    let fresh = vec![
        group(0, 0, 1.0, true),
        group(1, 0, 0.0, true),
        group(2, 0, 0.0, false),
        group(3, 0, 0.5, false),
    ];
    let b0 = ssb.fill_batch(fresh, 4, 0)?;
    assert_eq!(b0.groups.len(), 2);
    assert_eq!(
        (
            b0.metrics.kinds.all_correct,
            b0.metrics.kinds.all_wrong,
            b0.metrics.kinds.informative
        ),
        (1, 1, 2)
    );
    assert_eq!(b0.metrics.effective_share_before, 0.5);
    assert_eq!(b0.metrics.replayed, 0);
    assert_eq!(b0.metrics.buffer_size, 2);
    // Step 1: all fresh groups are zero-advantage; target 4, replay cap floor(0.5 * 4) = 2, buffer has 2.
    let b1 = ssb.fill_batch(vec![group(4, 1, 0.0, true), group(5, 1, 0.0, true)], 4, 1)?;
    assert_eq!(b1.replayed, 2);
    assert_eq!(b1.metrics.effective_share_before, 0.0);
    assert_eq!(b1.metrics.effective_share_after, 0.5);
    // Replayed once each (max_replays_per_group = 1): they left the buffer.
    assert_eq!(b1.metrics.buffer_size, 0);
    // Step 2: capacity 3 with 4 informative groups: the lowest priority (|A| = 0.1) is evicted.
    let fresh = vec![
        group(6, 2, 0.1, true),
        group(7, 2, 2.0, true),
        group(8, 2, 1.0, true),
        group(9, 2, 3.0, true),
    ];
    let b2 = ssb.fill_batch(fresh, 4, 2)?;
    assert_eq!(b2.metrics.evicted_capacity, 1);
    let kept: Vec<u64> = ssb.entries().iter().map(|e| e.group.prompt_id.0).collect();
    assert_eq!(kept, vec![7, 8, 9]);
    // Step 5: versions 2 are 3 > max_staleness = 2 versions old: dropped, nothing to replay.
    let b5 = ssb.fill_batch(vec![], 4, 5)?;
    assert_eq!(
        (
            b5.metrics.evicted_stale,
            b5.replayed,
            b5.metrics.buffer_size
        ),
        (3, 0, 0)
    );
    Ok(())
}

#[test]
fn oldest_eviction_is_fifo_and_bad_input_is_named() -> Result<()> {
    let cfg = SsbConfig {
        capacity: 2,
        eviction: Eviction::Oldest,
        ..Default::default()
    };
    let mut ssb = SelectiveSampleBuffer::new(cfg)?;
    ssb.fill_batch(vec![group(0, 0, 3.0, true), group(1, 0, 0.1, true)], 2, 0)?;
    ssb.fill_batch(vec![group(2, 1, 0.2, true), group(3, 1, 0.3, true)], 2, 1)?;
    let kept: Vec<u64> = ssb.entries().iter().map(|e| e.group.prompt_id.0).collect();
    assert_eq!(kept, vec![2, 3]);
    let err = ssb
        .fill_batch(vec![group(4, 9, 1.0, true)], 2, 1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("prompt 4"), "{err}");
    assert!(ssb.fill_batch(vec![], 0, 1).is_err());
    Ok(())
}

#[test]
fn state_round_trips_through_serde_and_continues_identically() -> Result<()> {
    let cfg = SsbConfig {
        capacity: 8,
        max_replays_per_group: 3,
        max_staleness: 10,
        seed: 21,
        ..Default::default()
    };
    let mut ssb = SelectiveSampleBuffer::new(cfg)?;
    let fresh: Vec<Group> = (0..6)
        .map(|p| group(p, 0, 0.2 * (p + 1) as f64, p % 2 == 0))
        .collect();
    ssb.fill_batch(fresh, 6, 0)?;
    ssb.fill_batch(vec![], 4, 1)?;
    let json = serde_json::to_string(&ssb.state())?;
    let mut restored = SelectiveSampleBuffer::from_state(serde_json::from_str(&json)?)?;
    assert_eq!(restored.state(), ssb.state());
    for step in 2..6 {
        let (a, b) = (
            ssb.fill_batch(vec![], 4, step)?,
            restored.fill_batch(vec![], 4, step)?,
        );
        assert_eq!(a, b, "step {step}");
    }
    assert!(
        serde_json::from_str::<r1v2_actors::rl::ssb::SsbState>(&json.replacen(
            "\"entries\"",
            "\"entrys\"",
            1
        ))
        .is_err()
    );
    Ok(())
}

#[test]
fn offline_prefilter_drops_all_right_and_all_wrong_prompts() {
    let pool = vec![
        group(10, 0, 0.0, true),
        group(11, 0, 0.7, true),
        group(12, 0, 0.0, false),
        group(13, 0, 0.2, false),
    ];
    let report = prefilter_prompt_pool(&pool, 1e-6);
    assert_eq!(report.kept, vec![PromptId(11), PromptId(13)]);
    assert_eq!(
        (
            report.kinds.all_correct,
            report.kinds.all_wrong,
            report.kinds.informative
        ),
        (1, 1, 2)
    );
}

#[test]
fn a_disabled_buffer_is_plain_grpo() -> Result<()> {
    let mut ssb = SelectiveSampleBuffer::new(SsbConfig {
        enabled: false,
        ..Default::default()
    })?;
    // Two informative groups and two zero-advantage ones, twice: all four train each time, none is stored
    // or replayed, and the non-zero share is the fresh one.
    for _ in 0..2 {
        let fresh = vec![
            group(0, 0, 1.0, true),
            group(1, 0, 0.0, true),
            group(2, 0, 0.5, false),
            group(3, 0, 0.0, false),
        ];
        let batch = ssb.fill_batch(fresh, 4, 0)?;
        let ids: Vec<u64> = batch.groups.iter().map(|g| g.prompt_id.0).collect();
        assert_eq!(ids, [0, 1, 2, 3]);
        assert_eq!(batch.replayed, 0);
        assert_eq!(batch.metrics.effective_share_before, 0.5);
        assert_eq!(batch.metrics.effective_share_after, 0.5);
        assert!(ssb.entries().is_empty());
    }
    // Enabled, the same input keeps the informative groups and replays a stored one on the second fill.
    let mut ssb = SelectiveSampleBuffer::new(SsbConfig::default())?;
    let fresh = || vec![group(0, 0, 1.0, true), group(1, 0, 0.0, true)];
    assert_eq!(ssb.fill_batch(fresh(), 2, 0)?.groups.len(), 1);
    let second = ssb.fill_batch(fresh(), 2, 0)?;
    assert_eq!((second.groups.len(), second.replayed), (2, 1));
    assert_eq!(second.metrics.effective_share_after, 1.0);
    Ok(())
}
