//! The engine's bookkeeping (prefix sharing, rows leaving the batch, determinism, finish reasons, bad input)
//! on a toy model whose logits are a pseudo-random function of the whole sequence, so any mix-up of rows,
//! caches or random streams changes the tokens.

use std::cell::RefCell;

use r1v2_actors::generate::{
    generate_groups, generate_groups_batched, generate_one_uncached, BatchOptions, FinishReason,
    PromptInput, Rollout, SamplingParams, StepModel,
};
use r1v2_actors::Result;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const VOCAB: usize = 24;

/// Its cache is each row's sequence; it records every call's batch size.
#[derive(Default)]
struct ToyLm {
    prefills: RefCell<usize>,
    step_batches: RefCell<Vec<usize>>,
    /// Per `append_rows`: (running rows, joining rows).
    appends: RefCell<Vec<(usize, usize)>>,
}

/// Logits after `sequence`: seeded by an FNV hash of it, peaked enough that stop tokens show up.
fn toy_logits(sequence: &[u32]) -> Vec<f32> {
    let hash = sequence.iter().fold(0xcbf29ce484222325u64, |h, &t| {
        (h ^ t as u64).wrapping_mul(0x100000001b3)
    });
    let mut rng = ChaCha8Rng::seed_from_u64(hash);
    (0..VOCAB).map(|_| rng.gen_range(-3.0f32..3.0)).collect()
}

impl StepModel for ToyLm {
    type Cache = Vec<Vec<u32>>;

    fn vocab_size(&self) -> usize {
        VOCAB
    }

    fn max_sequence_len(&self) -> usize {
        40
    }

    fn prefill(&self, prompt: &PromptInput, rows: usize) -> Result<(Vec<f32>, Self::Cache)> {
        *self.prefills.borrow_mut() += 1;
        let prompt = &prompt.token_ids;
        Ok((toy_logits(prompt), vec![prompt.to_vec(); rows]))
    }

    fn decode_step(&self, tokens: &[u32], cache: &mut Self::Cache) -> Result<Vec<Vec<f32>>> {
        assert_eq!(tokens.len(), cache.len(), "one token per cached row");
        self.step_batches.borrow_mut().push(tokens.len());
        Ok(cache
            .iter_mut()
            .zip(tokens)
            .map(|(sequence, &token)| {
                sequence.push(token);
                toy_logits(sequence)
            })
            .collect())
    }

    fn select_rows(&self, cache: &mut Self::Cache, keep: &[usize]) -> Result<()> {
        assert!(keep.windows(2).all(|w| w[0] < w[1]), "increasing rows");
        *cache = keep.iter().map(|&r| cache[r].clone()).collect();
        Ok(())
    }

    fn can_append_rows(&self) -> bool {
        true
    }

    fn append_rows(&self, cache: &mut Self::Cache, joining: Self::Cache) -> Result<()> {
        self.appends.borrow_mut().push((cache.len(), joining.len()));
        cache.extend(joining);
        Ok(())
    }
}

/// The toy without `append_rows`: the engine must run its groups one after another.
struct NoAppend(ToyLm);

impl StepModel for NoAppend {
    type Cache = Vec<Vec<u32>>;

    fn vocab_size(&self) -> usize {
        VOCAB
    }

    fn max_sequence_len(&self) -> usize {
        40
    }

    fn prefill(&self, prompt: &PromptInput, rows: usize) -> Result<(Vec<f32>, Self::Cache)> {
        self.0.prefill(prompt, rows)
    }

    fn decode_step(&self, tokens: &[u32], cache: &mut Self::Cache) -> Result<Vec<Vec<f32>>> {
        self.0.decode_step(tokens, cache)
    }

    fn select_rows(&self, cache: &mut Self::Cache, keep: &[usize]) -> Result<()> {
        self.0.select_rows(cache, keep)
    }
}

fn prompt(index: u64, ids: &[u32]) -> PromptInput {
    PromptInput::text(ids.to_vec(), index)
}

fn params() -> SamplingParams {
    SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
        max_new_tokens: 12,
        stop_token_ids: vec![0, 1],
        seed: 42,
        ..SamplingParams::default()
    }
}

/// Decodes token i as the letter 'a' + i.
fn letters(ids: &[u32]) -> Result<String> {
    Ok(ids.iter().map(|&i| (b'a' + i as u8) as char).collect())
}

#[test]
fn shared_prefix_batch_equals_uncached_rows() {
    let model = ToyLm::default();
    let prompts = [prompt(0, &[3, 4, 5]), prompt(1, &[7, 7])];
    let groups = generate_groups(&model, &prompts, 6, &params(), Some(&letters)).unwrap();
    assert_eq!(*model.prefills.borrow(), 2, "one prefill per prompt");
    for (group, prompt) in groups.iter().zip(&prompts) {
        for rollout in group {
            let reference = generate_one_uncached(
                |seq| Ok(toy_logits(seq)),
                VOCAB,
                40,
                prompt,
                rollout.sample_index,
                &params(),
                Some(&letters),
            )
            .unwrap();
            assert_eq!(rollout, &reference);
        }
    }
    let lengths: Vec<usize> = groups[0].iter().map(|r| r.token_ids.len()).collect();
    assert!(
        lengths.iter().any(|&l| l != lengths[0]),
        "rows should finish at different steps: {lengths:?}"
    );
}

#[test]
fn finished_rows_leave_the_batch() {
    let model = ToyLm::default();
    let groups = generate_groups(&model, &[prompt(0, &[3, 4, 5])], 8, &params(), None).unwrap();
    let batches = model.step_batches.borrow().clone();
    assert!(
        batches.windows(2).all(|w| w[1] <= w[0]),
        "batch sizes only shrink: {batches:?}"
    );
    assert!(batches[0] <= 8);
    // Each decode step serves exactly the rows that still needed a token: a row of L tokens took L - 1 steps.
    let needed: usize = groups[0].iter().map(|r| r.token_ids.len() - 1).sum();
    assert_eq!(batches.iter().sum::<usize>(), needed);
    assert!(
        batches.last().copied().unwrap_or(0) < 8,
        "some rows finished early: {batches:?}"
    );
}

#[test]
fn tokens_do_not_depend_on_batch_mates_or_group_size() {
    let model = ToyLm::default();
    let a = prompt(10, &[2, 3]);
    let b = prompt(11, &[9, 8, 7, 6]);
    let together = generate_groups(&model, &[a.clone(), b.clone()], 4, &params(), None).unwrap();
    let alone = generate_groups(&model, std::slice::from_ref(&b), 2, &params(), None).unwrap();
    assert_eq!(together[1][..2], alone[0][..]);
    let moved = generate_groups(&model, &[b, a], 4, &params(), None).unwrap();
    assert_eq!(moved[1], together[0]);
    // Another seed gives other responses.
    let reseeded = SamplingParams {
        seed: 43,
        ..params()
    };
    let other = generate_groups(&model, &[prompt(10, &[2, 3])], 4, &reseeded, None).unwrap();
    assert_ne!(other[0], together[0]);
}

#[test]
fn finish_reasons_stop_tokens_strings_and_length() {
    let model = ToyLm::default();
    let prompts = [prompt(0, &[3, 4, 5]), prompt(1, &[7, 7]), prompt(2, &[12])];
    let groups = generate_groups(&model, &prompts, 8, &params(), None).unwrap();
    let mut seen_stop = false;
    let mut seen_length = false;
    for rollout in groups.iter().flatten() {
        let last = *rollout.token_ids.last().unwrap(); // every response has at least one token
        match rollout.finish_reason {
            FinishReason::StopToken(id) => {
                seen_stop = true;
                assert_eq!(id, last);
                assert!(id <= 1);
            }
            FinishReason::Length => {
                seen_length = true;
                assert_eq!(rollout.token_ids.len(), 12);
            }
            FinishReason::StopString(_) => panic!("no stop strings were given"),
        }
        assert_eq!(rollout.logprobs.len(), rollout.token_ids.len());
        assert!(rollout
            .behaviour_logprobs()
            .iter()
            .all(|&lp| lp <= 0.0 && lp.is_finite()));
    }
    assert!(seen_stop && seen_length);

    // Stop strings across token boundaries: stop at the first response's first two-letter window.
    let first = groups[0]
        .iter()
        .find(|r| r.token_ids.len() >= 3)
        .expect("a response of 3+ tokens");
    let stop = letters(&first.token_ids[1..3]).unwrap();
    let with_stop = SamplingParams {
        stop_strings: vec![stop.clone()],
        ..params()
    };
    let stopped = generate_groups(&model, &prompts[..1], 8, &with_stop, Some(&letters)).unwrap();
    let rollout = &stopped[0][first.sample_index as usize];
    assert_eq!(rollout.finish_reason, FinishReason::StopString(0));
    assert!(rollout.text.as_deref().unwrap().ends_with(&stop)); // text is set when decode is given
    assert!(first.token_ids.starts_with(&rollout.token_ids));
}

#[test]
fn context_limit_ends_rows_with_length() {
    let model = ToyLm::default();
    let long: Vec<u32> = (0..36).map(|i| 2 + i % 20).collect();
    let unbounded = SamplingParams {
        stop_token_ids: vec![],
        max_new_tokens: 100,
        ..params()
    };
    let groups = generate_groups(&model, &[prompt(0, &long)], 2, &unbounded, None).unwrap();
    for rollout in &groups[0] {
        assert_eq!(
            rollout.token_ids.len(),
            4,
            "40-token context minus a 36-token prompt"
        );
        assert_eq!(rollout.finish_reason, FinishReason::Length);
    }
}

#[test]
fn bad_requests_are_clear_errors() {
    let model = ToyLm::default();
    let good = [prompt(0, &[3, 4])];
    let err = |prompts: &[PromptInput], n: usize, params: &SamplingParams| {
        generate_groups(&model, prompts, n, params, None)
            .unwrap_err()
            .to_string()
    };
    assert!(err(&good, 0, &params()).contains("sampling.n"));
    assert!(err(&[prompt(5, &[])], 1, &params()).contains("prompt_index 5) is empty"));
    let too_long: Vec<u32> = vec![2; 40];
    assert!(err(&[prompt(0, &too_long)], 1, &params()).contains("context is 40"));
    assert!(err(&[prompt(0, &[3, 99])], 1, &params()).contains("token id 99"));
    let bad_top_p = SamplingParams {
        top_p: 1.5,
        ..params()
    };
    assert!(err(&good, 1, &bad_top_p).contains("sampling.top_p"));
    let needs_decode = SamplingParams {
        stop_strings: vec!["x".into()],
        ..params()
    };
    assert!(err(&good, 1, &needs_decode).contains("decode function"));
    assert_eq!(*model.prefills.borrow(), 0, "nothing runs on a bad request");
}

/// Five prompts of different lengths, so joining groups sit at other positions than the running rows.
fn five_prompts() -> Vec<PromptInput> {
    vec![
        prompt(0, &[3, 4, 5]),
        prompt(1, &[7, 7]),
        prompt(2, &[12, 2, 9, 9, 4, 20]),
        prompt(3, &[6]),
        prompt(4, &[15, 3, 3, 8]),
    ]
}

fn batched(model: &impl StepModel, max_batch_rows: usize) -> Vec<Vec<Rollout>> {
    generate_groups_batched(
        model,
        &five_prompts(),
        3,
        &params(),
        Some(&letters),
        &BatchOptions { max_batch_rows },
        &mut |_, _, _| {},
    )
    .unwrap()
}

#[test]
fn continuous_batching_keeps_every_token_whatever_max_batch_rows() {
    let reference: Vec<Vec<Rollout>> = five_prompts()
        .iter()
        .map(|prompt| {
            (0..3)
                .map(|sample| {
                    generate_one_uncached(
                        |seq| Ok(toy_logits(seq)),
                        VOCAB,
                        40,
                        prompt,
                        sample,
                        &params(),
                        Some(&letters),
                    )
                    .unwrap()
                })
                .collect()
        })
        .collect();
    for max_batch_rows in [1, 3, 4, 7, 9, 100] {
        let model = ToyLm::default();
        let groups = batched(&model, max_batch_rows);
        for (group, expected) in groups.iter().zip(&reference) {
            assert_eq!(group, expected, "max_batch_rows {max_batch_rows}");
        }
        assert_eq!(*model.prefills.borrow(), 5, "one prefill per prompt");
        let batches = model.step_batches.borrow();
        // A group of 3 never splits: below 3 the groups run alone, else the batch never exceeds the bound.
        assert!(
            batches.iter().all(|&b| b <= max_batch_rows.max(3)),
            "{batches:?}"
        );
        let appends = model.appends.borrow();
        if max_batch_rows >= 6 {
            assert!(
                batches.iter().any(|&b| b > 3),
                "two groups decode together at max_batch_rows {max_batch_rows}: {batches:?}"
            );
            // Groups joined a batch that was already running, not only an empty one.
            assert!(appends.iter().any(|&(running, _)| running > 0));
        }
    }
}

#[test]
fn the_batch_refills_while_rows_still_run() {
    let model = ToyLm::default();
    let groups = batched(&model, 7);
    // Decode steps: fewer than running the five groups one after another, whose steps are each group's
    // longest response minus its first token (drawn from the prefill).
    let sequential: usize = groups
        .iter()
        .map(|g| g.iter().map(|r| r.token_ids.len() - 1).max().unwrap_or(0))
        .sum();
    let steps = model.step_batches.borrow().len();
    assert!(
        steps < sequential,
        "{steps} steps vs {sequential} one group at a time"
    );
    // Every decode step served exactly the rows that still needed a token.
    let needed: usize = groups
        .iter()
        .flat_map(|g| g.iter().map(|r| r.token_ids.len() - 1))
        .sum();
    assert_eq!(model.step_batches.borrow().iter().sum::<usize>(), needed);
}

#[test]
fn a_model_without_append_rows_runs_groups_one_after_another() {
    let plain = NoAppend(ToyLm::default());
    let groups = batched(&plain, 100);
    assert_eq!(groups, batched(&ToyLm::default(), 100));
    assert!(plain.0.step_batches.borrow().iter().all(|&b| b <= 3));
    let err = generate_groups_batched(
        &plain,
        &five_prompts(),
        3,
        &params(),
        None,
        &BatchOptions { max_batch_rows: 0 },
        &mut |_, _, _| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("max_batch_rows"), "{err}");
}
