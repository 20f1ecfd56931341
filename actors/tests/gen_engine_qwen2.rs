//! The engine on the Qwen2 LLM (the tiny untied checkpoint of tests/fixtures/qwen2): cached, batched,
//! grouped generation equals the uncached reference that reruns the full forward for every token.

use std::path::Path;

use candle_core::{DType, Device, IndexOp, Tensor};
use r1v2_actors::generate::qwen2::Qwen2Generator;
use r1v2_actors::generate::shards::ShardPlan;
use r1v2_actors::generate::{
    generate_groups, generate_groups_batched, generate_one_uncached, BatchOptions, PromptInput,
    Rollout, SamplingParams,
};
use r1v2_actors::model::qwen2::{Config, ForCausalLM};
use r1v2_actors::model::weights::WeightStore;

fn load_model() -> anyhow::Result<ForCausalLM> {
    let dir = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/qwen2/untied"
    ));
    let cfg = Config::from_file(&dir.join("config.json"))?;
    let store = WeightStore::load(dir, DType::F32, &Device::Cpu)?;
    Ok(ForCausalLM::new(&cfg, store.frozen_var_builder())?)
}

/// Next-token logits after `sequence`, from a full forward without cache.
fn full_logits(model: &ForCausalLM, sequence: &[u32]) -> r1v2_actors::Result<Vec<f32>> {
    let ids = Tensor::new(sequence, &Device::Cpu)?.unsqueeze(0)?; // (1, T)
    let logits = model.forward(&ids, None)?; // (1, T, V)
    Ok(logits.i((0, sequence.len() - 1))?.to_vec1::<f32>()?)
}

fn prompts() -> Vec<PromptInput> {
    vec![
        PromptInput::text(vec![17, 42, 99, 3, 250, 8], 0),
        PromptInput::text(vec![5, 77], 1),
    ]
}

/// Every rollout equals the uncached reference: same tokens and finish reason, log-probs within 1e-4.
fn check_against_uncached(model: &ForCausalLM, groups: &[Vec<Rollout>], params: &SamplingParams) {
    check_prompts_against_uncached(model, &prompts(), groups, params)
}

fn check_prompts_against_uncached(
    model: &ForCausalLM,
    prompts: &[PromptInput],
    groups: &[Vec<Rollout>],
    params: &SamplingParams,
) {
    let cfg = model.config();
    assert_eq!(groups.len(), prompts.len());
    for (group, prompt) in groups.iter().zip(prompts) {
        for rollout in group {
            let reference = generate_one_uncached(
                |seq| full_logits(model, seq),
                cfg.vocab_size,
                cfg.max_position_embeddings,
                prompt,
                rollout.sample_index,
                params,
                None,
            )
            .unwrap();
            assert_eq!(rollout.token_ids, reference.token_ids);
            assert_eq!(rollout.finish_reason, reference.finish_reason);
            for (ours, theirs) in rollout.logprobs.iter().zip(&reference.logprobs) {
                assert!(
                    (ours.policy - theirs.policy).abs() < 1e-4,
                    "{ours:?} vs {theirs:?}"
                );
                assert!((ours.processed - theirs.processed).abs() < 1e-4);
            }
        }
    }
}

/// `prompts` in groups of 3 through the continuous-batching engine, each rollout checked against the uncached
/// reference.
fn batched_checked(
    model: &ForCausalLM,
    generator: &Qwen2Generator,
    prompts: &[PromptInput],
    params: &SamplingParams,
    max_batch_rows: usize,
) -> anyhow::Result<Vec<Vec<Rollout>>> {
    let groups = generate_groups_batched(
        generator,
        prompts,
        3,
        params,
        None,
        &BatchOptions { max_batch_rows },
        &mut |_, _, _| {},
    )?;
    check_prompts_against_uncached(model, prompts, &groups, params);
    Ok(groups)
}

/// Same tokens in every run; log-probs within rounding (the matmuls' rounding may depend on the batch).
fn assert_same_rollouts<S: std::fmt::Debug>(runs: &[(S, Vec<Vec<Rollout>>)]) {
    let (_, first) = &runs[0];
    for (setup, groups) in &runs[1..] {
        for (a, b) in first.iter().zip(groups) {
            for (ra, rb) in a.iter().zip(b) {
                assert_eq!(ra.token_ids, rb.token_ids, "{setup:?}");
                for (x, y) in ra.logprobs.iter().zip(&rb.logprobs) {
                    assert!(
                        (x.policy - y.policy).abs() < 1e-5,
                        "{setup:?}: {x:?} vs {y:?}"
                    );
                }
            }
        }
    }
}

#[test]
fn greedy_equals_argmax_of_repeated_full_forwards() -> anyhow::Result<()> {
    let model = load_model()?;
    let params = SamplingParams {
        temperature: 0.0,
        repetition_penalty: 1.0,
        max_new_tokens: 10,
        ..SamplingParams::default()
    };
    let generator = Qwen2Generator::new(&model, &Device::Cpu);
    let groups = generate_groups(&generator, &prompts(), 2, &params, None)?;
    check_against_uncached(&model, &groups, &params);
    // Greedy rows of one prompt are identical.
    assert_eq!(groups[0][0].token_ids, groups[0][1].token_ids);
    Ok(())
}

#[test]
fn sampled_groups_equal_uncached_rows_whatever_the_batch() -> anyhow::Result<()> {
    let model = load_model()?;
    let params = SamplingParams {
        temperature: 1.0,
        top_p: 0.9,
        repetition_penalty: 1.05,
        max_new_tokens: 12,
        // A tenth of the vocabulary stops a row, so rows finish at different steps and leave the batch.
        stop_token_ids: (0..26).collect(),
        seed: 9,
        ..SamplingParams::default()
    };
    let generator = Qwen2Generator::new(&model, &Device::Cpu);
    let groups = generate_groups(&generator, &prompts(), 4, &params, None)?;
    check_against_uncached(&model, &groups, &params);
    let lengths: Vec<usize> = groups
        .iter()
        .flat_map(|g| g.iter().map(|r| r.token_ids.len()))
        .collect();
    assert!(lengths.iter().any(|&l| l != lengths[0]), "{lengths:?}");
    // The second prompt alone, with a smaller group: its first two responses keep their tokens. Their
    // log-probs move in the last bits only (the matmuls' rounding depends on the batch size).
    let alone = generate_groups(&generator, &prompts()[1..], 2, &params, None)?;
    for (ours, batched) in alone[0].iter().zip(&groups[1]) {
        assert_eq!(ours.token_ids, batched.token_ids);
        assert_eq!(ours.finish_reason, batched.finish_reason);
        for (a, b) in ours.logprobs.iter().zip(&batched.logprobs) {
            assert!((a.policy - b.policy).abs() < 1e-5, "{a:?} vs {b:?}");
        }
    }
    Ok(())
}

#[test]
fn continuous_batching_equals_uncached_rows_whatever_max_batch_rows() -> anyhow::Result<()> {
    let model = load_model()?;
    let params = SamplingParams {
        temperature: 1.0,
        top_p: 0.9,
        max_new_tokens: 10,
        // Rows finish at different steps, so groups join a batch whose rows sit at other positions.
        stop_token_ids: (0..26).collect(),
        seed: 5,
        ..SamplingParams::default()
    };
    let prompts = vec![
        PromptInput::text(vec![17, 42, 99, 3, 250, 8], 0),
        PromptInput::text(vec![5, 77], 1),
        PromptInput::text(vec![31, 2, 200, 64], 2),
        PromptInput::text(vec![9], 3),
    ];
    let generator = Qwen2Generator::new(&model, &Device::Cpu);
    let mut runs = Vec::new();
    for max_batch_rows in [3, 4, 7, 64] {
        let groups = batched_checked(&model, &generator, &prompts, &params, max_batch_rows)?;
        runs.push((max_batch_rows, groups));
    }
    // Whatever the batch, the same tokens; log-probs differ in the last bits at most.
    assert_same_rollouts(&runs);
    Ok(())
}

#[test]
fn sharded_and_packed_decoding_equal_the_plain_batch_and_the_uncached_rows() -> anyhow::Result<()> {
    let plain = load_model()?;
    let mut packed = load_model()?;
    packed.pack_weights()?;
    assert!(packed.is_packed() && !plain.is_packed());
    let params = SamplingParams {
        temperature: 1.0,
        top_p: 0.9,
        max_new_tokens: 10,
        // Rows leave at different steps: shards shrink unevenly, rows move between them, shards merge.
        stop_token_ids: (0..26).collect(),
        seed: 11,
        ..SamplingParams::default()
    };
    let prompts: Vec<PromptInput> = (0..5u32)
        .map(|i| {
            PromptInput::text(
                vec![17 + i, 42, 99 - i, 3, 250 - 7 * i][..1 + i as usize].to_vec(),
                i as u64,
            )
        })
        .collect();
    let plans = [
        ShardPlan::single(),
        ShardPlan {
            max_shards: 2,
            min_rows_per_shard: 1,
        },
        ShardPlan {
            max_shards: 3,
            min_rows_per_shard: 2,
        },
    ];
    let mut runs = Vec::new();
    for model in [&plain, &packed] {
        for plan in plans {
            for max_batch_rows in [4, 9, 64] {
                let generator = Qwen2Generator::new(model, &Device::Cpu).with_shard_plan(plan);
                let groups = batched_checked(model, &generator, &prompts, &params, max_batch_rows)?;
                runs.push(((model.is_packed(), plan, max_batch_rows), groups));
            }
        }
    }
    let lengths: Vec<usize> = runs[0]
        .1
        .iter()
        .flat_map(|g| g.iter().map(|r| r.token_ids.len()))
        .collect();
    assert!(lengths.iter().any(|&l| l != lengths[0]), "{lengths:?}");
    // Same tokens whatever the shards, the batch or the kernel; log-probs within rounding.
    assert_same_rollouts(&runs);
    Ok(())
}

#[test]
fn packed_forward_equals_candle_and_unpacking_restores_it() -> anyhow::Result<()> {
    let mut model = load_model()?;
    let ids = Tensor::new(&[[17u32, 42, 99, 3], [5, 77, 8, 250]], &Device::Cpu)?; // (2, 4)
    let before = model.forward(&ids, None)?;
    model.pack_weights()?;
    let packed = model.forward(&ids, None)?;
    let diff = (&packed - &before)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    assert!(diff < 1e-5, "packed logits differ by {diff}");
    model.unpack_weights();
    assert!(!model.is_packed());
    let after = model.forward(&ids, None)?;
    assert_eq!(
        after.flatten_all()?.to_vec1::<f32>()?,
        before.flatten_all()?.to_vec1::<f32>()?
    );
    Ok(())
}
