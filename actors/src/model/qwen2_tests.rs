//! Qwen2 and value head against transformers (fixtures from tests/fixtures/gen_qwen2.py), the KV
//! cache against the full forward, and gradients against finite differences.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor};

use crate::model::kv_cache::KvCache;
use crate::model::qwen2::{Config, ForCausalLM};
use crate::model::value_head::ValueModel;
use crate::model::weights::WeightStore;

fn fixture(rel: &str) -> PathBuf {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/qwen2"
    ))
    .join(rel)
}

/// input_ids (u32), attention_mask (u32) and expected outputs written by gen_qwen2.py.
fn io() -> anyhow::Result<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(
        fixture("io.safetensors"),
        &Device::Cpu,
    )?)
}

fn ids_and_mask(io: &HashMap<String, Tensor>) -> anyhow::Result<(Tensor, Tensor)> {
    Ok((
        io["input_ids"].to_dtype(DType::U32)?,
        io["attention_mask"].to_dtype(DType::U32)?,
    ))
}

fn load_lm(name: &str, dtype: DType) -> anyhow::Result<(ForCausalLM, WeightStore)> {
    let dir = fixture(name);
    let cfg = Config::from_file(&dir.join("config.json"))?;
    let store = WeightStore::load(&dir, dtype, &Device::Cpu)?;
    let model = ForCausalLM::new(&cfg, store.frozen_var_builder())?;
    Ok((model, store))
}

/// Largest |a - b| over the positions where `mask` is 1; a, b (B, T, ...) f32.
fn max_diff_at_real(a: &Tensor, b: &Tensor, mask: &Tensor) -> anyhow::Result<f32> {
    let mask = mask.to_dtype(DType::U32)?.to_vec2::<u32>()?;
    let mut worst = 0f32;
    for (row, flags) in mask.iter().enumerate() {
        for (t, &m) in flags.iter().enumerate() {
            if m == 1 {
                let d = (a.i((row, t))?.to_dtype(DType::F32)?
                    - b.i((row, t))?.to_dtype(DType::F32)?)?;
                worst = worst.max(d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?);
            }
        }
    }
    Ok(worst)
}

#[test]
fn tied_sharded_f32_matches_transformers() -> anyhow::Result<()> {
    let io = io()?;
    let (ids, mask) = ids_and_mask(&io)?;
    let (model, store) = load_lm("tied", DType::F32)?;
    assert!(
        store.unexpected().is_empty(),
        "unexpected: {:?}",
        store.unexpected()
    );
    let logits = model.forward(&ids, Some(&mask))?;
    assert_eq!(logits.dims(), io["tied_logits"].dims());
    let diff = max_diff_at_real(&logits, &io["tied_logits"], &mask)?;
    assert!(diff < 1e-4, "max |logits - transformers| = {diff}");
    Ok(())
}

#[test]
fn untied_bf16_checkpoint_matches_transformers() -> anyhow::Result<()> {
    let io = io()?;
    let (ids, mask) = ids_and_mask(&io)?;
    let (model, store) = load_lm("untied", DType::F32)?;
    assert!(
        store.unexpected().is_empty(),
        "unexpected: {:?}",
        store.unexpected()
    );
    assert!(!model.config().tie_word_embeddings);
    assert_eq!(model.config().rope_theta, 1e6);
    let logits = model.forward(&ids, Some(&mask))?;
    let diff = max_diff_at_real(&logits, &io["untied_logits"], &mask)?;
    assert!(diff < 1e-4, "max |logits - transformers| = {diff}");
    // The same model run in bf16 stays close (bf16 has ~3 significant digits).
    let (model_bf16, _) = load_lm("untied", DType::BF16)?;
    let logits_bf16 = model_bf16.forward(&ids, Some(&mask))?;
    let diff = max_diff_at_real(&logits_bf16, &io["untied_logits"], &mask)?;
    assert!(diff < 0.1, "bf16 max diff {diff}");
    Ok(())
}

#[test]
fn value_head_matches_transformers() -> anyhow::Result<()> {
    let io = io()?;
    let (ids, mask) = ids_and_mask(&io)?;
    let dir = fixture("value");
    let cfg = Config::from_file(&dir.join("config.json"))?;
    let store = WeightStore::load(&dir, DType::F32, &Device::Cpu)?;
    let model = ValueModel::new(&cfg, store.frozen_var_builder())?;
    assert!(
        store.unexpected().is_empty(),
        "unexpected: {:?}",
        store.unexpected()
    );
    let scores = model.forward(&ids, Some(&mask))?;
    assert_eq!(scores.dims(), &[3]);
    let diff = (scores - &io["value_scores"])?
        .abs()?
        .max(0)?
        .to_scalar::<f32>()?;
    assert!(diff < 1e-4, "max |scores - transformers| = {diff}");
    Ok(())
}

#[test]
fn padded_row_equals_the_row_alone() -> anyhow::Result<()> {
    let io = io()?;
    let (ids, mask) = ids_and_mask(&io)?;
    let (model, _) = load_lm("tied", DType::F32)?;
    let batched = model.forward(&ids, Some(&mask))?;
    let alone = model.forward(&ids.i((2..3, 5..))?, None)?;
    let diff = (batched.i((2..3, 5..))? - alone)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    assert!(diff < 1e-5, "padded vs alone: {diff}");
    Ok(())
}

/// Runs the cache over column chunks of (ids, mask) and stacks the logits.
fn decode_in_chunks(
    model: &ForCausalLM,
    ids: &Tensor,
    mask: &Tensor,
    chunks: &[usize],
) -> anyhow::Result<Tensor> {
    let mut cache: KvCache = model.new_cache();
    let mut start = 0;
    let mut outs = vec![];
    for &len in chunks {
        let step_ids = ids.narrow(1, start, len)?;
        let step_mask = mask.narrow(1, start, len)?;
        outs.push(model.forward_step_ids(&step_ids, Some(&step_mask), &mut cache)?);
        start += len;
    }
    assert_eq!(start, ids.dim(1)?);
    assert_eq!(cache.seq_len(), start);
    Ok(Tensor::cat(&outs, 1)?)
}

#[test]
fn kv_cache_decode_matches_full_forward() -> anyhow::Result<()> {
    let io = io()?;
    let (ids, mask) = ids_and_mask(&io)?;
    let (model, _) = load_lm("untied", DType::F32)?;
    let full = model.forward(&ids, Some(&mask))?;
    // Prefill of the left-padded prompt, then one token at a time; and uneven chunks.
    for chunks in [&[6, 1, 1, 1][..], &[1; 9][..], &[2, 4, 3][..]] {
        let stepped = decode_in_chunks(&model, &ids, &mask, chunks)?;
        let diff = max_diff_at_real(&stepped, &full, &mask)?;
        assert!(diff < 1e-5, "chunks {chunks:?}: max diff {diff}");
    }
    // Also equal to transformers.
    let stepped = decode_in_chunks(&model, &ids, &mask, &[6, 1, 1, 1])?;
    let diff = max_diff_at_real(&stepped, &io["untied_logits"], &mask)?;
    assert!(diff < 1e-4, "cached decode vs transformers: {diff}");
    Ok(())
}

#[test]
fn kv_cache_skips_padding_fed_mid_sequence() -> anyhow::Result<()> {
    // A row that pauses (pad tokens with mask 0) and resumes computes as if the pads were absent.
    let (model, _) = load_lm("tied", DType::F32)?;
    let dev = Device::Cpu;
    let tokens = [5u32, 17, 99, 3, 42];
    let reference = model.forward(&Tensor::new(&tokens[..], &dev)?.unsqueeze(0)?, None)?;
    let mut cache = model.new_cache();
    let mut got = vec![];
    for (chunk, chunk_mask) in [
        (vec![5u32, 17], vec![1u32, 1]),
        (vec![0], vec![0]),
        (vec![99, 0, 3], vec![1, 0, 1]),
        (vec![42], vec![1]),
    ] {
        let n = chunk.len();
        let ids = Tensor::from_vec(chunk, (1, n), &dev)?;
        let m = Tensor::from_vec(chunk_mask.clone(), (1, n), &dev)?;
        let logits = model.forward_step_ids(&ids, Some(&m), &mut cache)?;
        for (t, &flag) in chunk_mask.iter().enumerate() {
            if flag == 1 {
                got.push(logits.i((0, t))?);
            }
        }
    }
    assert_eq!(cache.next_positions(), &[5]);
    let got = Tensor::stack(&got, 0)?.unsqueeze(0)?;
    let diff = (got - reference)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    assert!(diff < 1e-5, "diff {diff}");
    Ok(())
}

#[test]
fn kv_cache_misuse_is_an_error() -> anyhow::Result<()> {
    let (model, _) = load_lm("tied", DType::F32)?;
    let ids = Tensor::new(&[[1u32, 2], [3, 4]], &Device::Cpu)?;
    let err = model
        .forward_step_ids(&ids, None, &mut KvCache::new(5))
        .expect_err("wrong layer count");
    assert!(err.to_string().contains("5 layers"), "{err}");
    let mut cache = model.new_cache();
    model.forward_step_ids(&ids, None, &mut cache)?;
    let err = model
        .forward_step_ids(&ids.narrow(0, 0, 1)?, None, &mut cache)
        .expect_err("batch changed");
    assert!(err.to_string().contains("2 rows"), "{err}");
    Ok(())
}

#[test]
fn token_logprobs_match_log_softmax_of_logits() -> anyhow::Result<()> {
    let io = io()?;
    let (ids, mask) = ids_and_mask(&io)?;
    let (model, _) = load_lm("tied", DType::F32)?;
    let logprobs = model.token_logprobs(&ids, Some(&mask))?;
    assert_eq!(logprobs.dims(), &[3, 8]);
    // From the transformers logits directly: log_softmax(logits[t])[ids[t+1]].
    let expected = candle_nn::ops::log_softmax(&io["tied_logits"], 2)?;
    let ids_v = ids.to_vec2::<u32>()?;
    let mask_v = mask.to_vec2::<u32>()?;
    let got = logprobs.to_vec2::<f32>()?;
    for b in 0..3 {
        for t in 0..8 {
            // Only a real token predicted from a real slot counts (the first real token of a
            // left-padded row has no context; transformers' logits at pad slots are arbitrary).
            let want = if mask_v[b][t] == 1 && mask_v[b][t + 1] == 1 {
                expected
                    .i((b, t, ids_v[b][t + 1] as usize))?
                    .to_scalar::<f32>()?
            } else {
                0.0
            };
            assert!(
                (got[b][t] - want).abs() < 1e-4,
                "({b},{t}): {} vs {want}",
                got[b][t]
            );
        }
    }
    Ok(())
}

/// Loss of the gradient check, all in f64: minus the summed log-softmax of the next tokens at
/// real positions (candle's composed log_softmax, differentiable).
fn nll(model: &ForCausalLM, ids: &Tensor, mask: &Tensor) -> anyhow::Result<Tensor> {
    let t = ids.dim(1)?;
    let logits = model.forward(ids, Some(mask))?.narrow(1, 0, t - 1)?; // (B, T-1, V)
    let logprobs = candle_nn::ops::log_softmax(&logits, 2)?;
    let targets = ids.narrow(1, 1, t - 1)?.unsqueeze(2)?.contiguous()?; // (B, T-1, 1)
    let picked = logprobs.gather(&targets, 2)?.squeeze(2)?; // (B, T-1)
    let weights = (mask.narrow(1, 0, t - 1)? * mask.narrow(1, 1, t - 1)?)?.to_dtype(DType::F64)?;
    Ok((picked * weights)?.sum_all()?.neg()?)
}

#[test]
fn gradients_match_finite_differences() -> anyhow::Result<()> {
    // f64 weights and loss; each probe perturbs the entry of its tensor with the largest gradient.
    // The kernels' RMSNorm runs in f32 inside (as transformers'), so the loss carries ~1e-7
    // relative noise; h = 1e-2 keeps that noise (~1e-5 / h) and the O(h^2) truncation small.
    // Measured at h = 1e-2: relative agreement 3e-4 (embedding, gradient 7.26) to 1e-6.
    let io = io()?;
    let (ids, mask) = ids_and_mask(&io)?;
    let dir = fixture("tied");
    let cfg = Config::from_file(&dir.join("config.json"))?;
    let store = WeightStore::load(&dir, DType::F64, &Device::Cpu)?;
    let model = ForCausalLM::new(&cfg, store.var_builder(|_| true))?;
    let grads = nll(&model, &ids, &mask)?.backward()?;
    let vars: HashMap<String, candle_core::Var> = store.trainable_vars().into_iter().collect();
    assert_eq!(
        vars.len(),
        store.names().len(),
        "every tensor is trainable here"
    );
    let probes = [
        "model.embed_tokens.weight", // also the tied lm_head
        "model.layers.0.self_attn.q_proj.bias",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.1.self_attn.v_proj.bias",
        "model.layers.1.self_attn.o_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.0.input_layernorm.weight",
        "model.norm.weight",
    ];
    let h = 1e-2;
    for name in probes {
        let var = &vars[name];
        let grad = grads
            .get(var.as_tensor())
            .expect("every trainable tensor gets a gradient");
        let grad = grad.flatten_all()?.to_vec1::<f64>()?;
        let (index, &analytic) = grad
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            .expect("non-empty tensor");
        let original = var.as_tensor().copy()?;
        let mut bump = vec![0f64; original.elem_count()];
        bump[index] = h;
        let bump = Tensor::from_vec(bump, original.shape(), &Device::Cpu)?;
        var.set(&(&original + &bump)?)?;
        let plus = nll(&model, &ids, &mask)?.to_scalar::<f64>()?;
        var.set(&(&original - &bump)?)?;
        let minus = nll(&model, &ids, &mask)?.to_scalar::<f64>()?;
        var.set(&original)?;
        let numeric = (plus - minus) / (2.0 * h);
        let tolerance = 5e-5 + 1e-3 * analytic.abs();
        assert!(
            (analytic - numeric).abs() < tolerance,
            "{name}[{index}]: analytic {analytic} vs numeric {numeric}"
        );
    }
    Ok(())
}

#[test]
fn selected_rows_continue_like_their_source_rows() -> anyhow::Result<()> {
    let (model, _) = load_lm("untied", DType::F32)?;
    let device = Device::Cpu;
    let prompts: [&[u32]; 2] = [&[3, 17, 42, 5], &[9, 8, 7, 6]];
    let ids = Tensor::from_vec(prompts.concat(), (2, 4), &device)?; // (2, T)
    let mut cache = model.new_cache();
    model.forward_step_ids(&ids, None, &mut cache)?;
    // Repeat row 1, reorder: what prefix sharing (repeat) and finished rows (drop) do.
    let sources = [1usize, 0, 1];
    let next_tokens = [11u32, 12, 13];
    cache.select_rows(&sources)?;
    assert_eq!(cache.batch_size(), 3);
    let next = Tensor::from_vec(next_tokens.to_vec(), (3, 1), &device)?; // (3, 1)
    let stepped = model.forward_step_ids(&next, None, &mut cache)?; // (3, 1, V)
    for (row, (&source, &token)) in sources.iter().zip(&next_tokens).enumerate() {
        let mut full = prompts[source].to_vec();
        full.push(token);
        let full_ids = Tensor::new(full.as_slice(), &device)?.unsqueeze(0)?; // (1, 5)
        let want = model.forward(&full_ids, None)?.i((0, 4))?; // (V)
        let got = stepped.i((row, 0))?;
        let diff = (want - got)?.abs()?.max(0)?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "row {row} (from {source}): max diff {diff}");
    }
    // Dropping rows keeps the rest intact; an index past the batch is an error.
    cache.select_rows(&[2])?;
    assert_eq!(cache.next_positions(), &[5]);
    assert!(cache.select_rows(&[1]).is_err());
    Ok(())
}

/// The prefix-shared forward with padding anywhere in the prompts (left, mid) and responses (right) gives each
/// row's hidden states of `prompt ++ response` run alone without padding.
#[test]
fn prefix_shared_forward_equals_each_row_alone() -> anyhow::Result<()> {
    let (model, _) = load_lm("tied", DType::F32)?;
    let model = &model.model;
    let prompts: [(&[u32], &[u32]); 2] = [
        (&[3, 4, 5, 6, 7], &[1, 1, 1, 1, 1]),
        (&[0, 8, 9, 0, 10], &[0, 1, 1, 0, 1]),
    ];
    let responses: [(usize, &[u32], &[u32]); 3] = [
        (0, &[11, 12, 13], &[1, 1, 1]),
        (1, &[14, 15, 0], &[1, 1, 0]),
        (0, &[16, 0, 0], &[1, 0, 0]),
    ];
    let tensor = |rows: Vec<&[u32]>| -> anyhow::Result<Tensor> {
        let (b, t) = (rows.len(), rows[0].len());
        Ok(Tensor::from_vec(rows.concat(), (b, t), &Device::Cpu)?)
    };
    let prompt_embeds = model.embed_tokens(&tensor(prompts.iter().map(|p| p.0).collect())?)?;
    let prompt_mask = tensor(prompts.iter().map(|p| p.1).collect())?;
    let embeds = model.embed_tokens(&tensor(responses.iter().map(|r| r.1).collect())?)?;
    let mask = tensor(responses.iter().map(|r| r.2).collect())?;
    let prompt_of: Vec<usize> = responses.iter().map(|r| r.0).collect();
    let (prompt_hidden, hidden) = model.forward_prefixed(
        &prompt_embeds,
        Some(&prompt_mask),
        &embeds,
        Some(&mask),
        &prompt_of,
    )?;
    assert_eq!(prompt_hidden.dims()[..2], [2, 5]);
    assert_eq!(hidden.dims()[..2], [3, 3]);
    let real = |(ids, flags): (&[u32], &[u32])| -> Vec<(usize, u32)> {
        ids.iter()
            .zip(flags)
            .enumerate()
            .filter(|(_, (_, &f))| f == 1)
            .map(|(slot, (&id, _))| (slot, id))
            .collect()
    };
    let mut worst = 0f32;
    for (b, &(g, ids, flags)) in responses.iter().enumerate() {
        let prompt = real(prompts[g]);
        let response = real((ids, flags));
        let row: Vec<u32> = prompt.iter().chain(&response).map(|&(_, id)| id).collect();
        let len = row.len();
        let alone = model.forward_embeds(
            &model.embed_tokens(&Tensor::from_vec(row, (1, len), &Device::Cpu)?)?,
            None,
        )?;
        let pairs =
            prompt
                .iter()
                .enumerate()
                .map(|(k, &(slot, _))| Ok((prompt_hidden.i((g, slot))?, alone.i((0, k))?)))
                .chain(response.iter().enumerate().map(|(j, &(slot, _))| {
                    Ok((hidden.i((b, slot))?, alone.i((0, prompt.len() + j))?))
                }))
                .collect::<candle_core::Result<Vec<_>>>()?;
        for (got, want) in pairs {
            let d = (got - want)?.abs()?.max(0)?.to_scalar::<f32>()?;
            worst = worst.max(d);
        }
    }
    assert!(worst < 1e-5, "prefix-shared vs alone: {worst}");
    // A bad prompt index is an error, not a panic.
    let err = model
        .forward_prefixed(
            &prompt_embeds,
            Some(&prompt_mask),
            &embeds,
            Some(&mask),
            &[0, 2, 0],
        )
        .expect_err("prompt 2 of 2");
    assert!(err.to_string().contains("prompt index 2"), "{err}");
    Ok(())
}
