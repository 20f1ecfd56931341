//! The preallocated KV cache on the tiny untied Qwen2 fixture: in-place writes past the first capacity,
//! reservation, rows of different lengths joined into one batch (continuous batching), trimming of padding
//! when rows leave, and clones that do not share buffers. Each is checked against full forwards.

use std::path::Path;

use candle_core::{DType, Device, IndexOp, Tensor};
use r1v2_actors::model::kv_cache::KvCache;
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

/// Next-token logits (V) after `sequence`, from a full forward without cache.
fn full_last(model: &ForCausalLM, sequence: &[u32]) -> anyhow::Result<Tensor> {
    let ids = Tensor::new(sequence, &Device::Cpu)?.unsqueeze(0)?; // (1, T)
    Ok(model.forward(&ids, None)?.i((0, sequence.len() - 1))?)
}

fn max_diff(a: &Tensor, b: &Tensor) -> anyhow::Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

/// Prefills `prompt` alone (batch 1) into a fresh cache.
fn prefill(model: &ForCausalLM, prompt: &[u32]) -> anyhow::Result<KvCache> {
    let mut cache = model.new_cache();
    let ids = Tensor::new(prompt, &Device::Cpu)?.unsqueeze(0)?; // (1, T)
    model.forward_step_last_ids(&ids, None, &mut cache)?;
    Ok(cache)
}

/// One decode step of one token per row -> logits (B, V).
fn step(model: &ForCausalLM, cache: &mut KvCache, tokens: &[u32]) -> anyhow::Result<Tensor> {
    let ids = Tensor::from_vec(tokens.to_vec(), (tokens.len(), 1), &Device::Cpu)?; // (B, 1)
    Ok(model.forward_step_last_ids(&ids, None, cache)?)
}

#[test]
fn decoding_past_the_first_capacity_equals_the_full_forward() -> anyhow::Result<()> {
    let model = load_model()?;
    let mut sequence = vec![3u32, 17, 42];
    let mut cache = prefill(&model, &sequence)?;
    let first_capacity = cache.capacity();
    assert!(first_capacity >= 3);
    let mut worst = 0f32;
    // Run well past the first capacity, so the buffers grow (by doubling) at least once.
    for i in 0..(first_capacity + 10) as u32 {
        let token = (i * 37 + 11) % 256;
        let logits = step(&model, &mut cache, &[token])?;
        sequence.push(token);
        if i % 9 == 0 || sequence.len() > first_capacity {
            worst = worst.max(max_diff(&logits.i(0)?, &full_last(&model, &sequence)?)?);
        }
    }
    assert!(cache.capacity() >= sequence.len() && cache.capacity() > first_capacity);
    assert_eq!(cache.seq_len(), sequence.len());
    assert!(worst < 1e-5, "cached decode vs full forward: {worst}");
    Ok(())
}

#[test]
fn reserve_presizes_the_buffers_without_changing_results() -> anyhow::Result<()> {
    let model = load_model()?;
    let prompt = [5u32, 6, 7, 8];
    let mut reserved = model.new_cache();
    reserved.reserve(100)?;
    let ids = Tensor::new(&prompt, &Device::Cpu)?.unsqueeze(0)?; // (1, T)
    model.forward_step_last_ids(&ids, None, &mut reserved)?;
    assert_eq!(reserved.capacity(), 100);
    let mut plain = prefill(&model, &prompt)?;
    plain.reserve(120)?; // grows existing buffers, keeping their contents
    assert_eq!(plain.capacity(), 120);
    let a = step(&model, &mut reserved, &[9])?;
    let b = step(&model, &mut plain, &[9])?;
    let want = full_last(&model, &[5, 6, 7, 8, 9])?;
    assert!(max_diff(&a.i(0)?, &want)? < 1e-5);
    assert!(max_diff(&b.i(0)?, &want)? < 1e-5);
    Ok(())
}

#[test]
fn appended_rows_of_other_lengths_continue_like_alone() -> anyhow::Result<()> {
    let model = load_model()?;
    let long: &[u32] = &[17, 42, 99, 3, 250, 8];
    let short: &[u32] = &[5, 77];
    // A running batch (the long prompt, decoded two steps) joined by a short prompt's two-row group,
    // then by a longer one: the cache left-pads whichever side is shorter.
    let mut running = prefill(&model, long)?;
    step(&model, &mut running, &[11])?;
    step(&model, &mut running, &[12])?;
    let mut group = prefill(&model, short)?;
    group.select_rows(&[0, 0])?;
    running.append_rows(group)?;
    let longer: &[u32] = &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11];
    running.append_rows(prefill(&model, longer)?)?;
    assert_eq!(running.batch_size(), 4);
    assert_eq!(running.next_positions(), &[8, 2, 2, 11]);
    let logits = step(&model, &mut running, &[20, 21, 22, 23])?; // (4, V)
    let expected: [Vec<u32>; 4] = [
        [long, &[11, 12, 20]].concat(),
        [short, &[21]].concat(),
        [short, &[22]].concat(),
        [longer, &[23]].concat(),
    ];
    for (row, sequence) in expected.iter().enumerate() {
        let diff = max_diff(&logits.i(row)?, &full_last(&model, sequence)?)?;
        assert!(diff < 1e-5, "row {row}: {diff}");
    }
    // The longest row leaves: the padding slots no kept row uses are dropped, the rest continue.
    let before = running.seq_len();
    running.select_rows(&[0, 1, 2])?;
    assert_eq!(running.seq_len(), before - (11 - 8));
    let logits = step(&model, &mut running, &[30, 31, 32])?;
    for (row, sequence) in expected[..3].iter().enumerate() {
        let sequence = [sequence.as_slice(), &[30 + row as u32]].concat();
        let diff = max_diff(&logits.i(row)?, &full_last(&model, &sequence)?)?;
        assert!(diff < 1e-5, "row {row} after select: {diff}");
    }
    // Caches of another model depth are refused.
    assert!(running.append_rows(KvCache::new(7)).is_err());
    Ok(())
}

#[test]
fn a_clone_does_not_share_buffers() -> anyhow::Result<()> {
    let model = load_model()?;
    let prompt = [3u32, 4, 5];
    let mut original = prefill(&model, &prompt)?;
    let mut copy = original.clone();
    // Writing into the copy (in place) must leave the original's slots untouched.
    step(&model, &mut copy, &[100])?;
    step(&model, &mut copy, &[101])?;
    let logits = step(&model, &mut original, &[7])?;
    let diff = max_diff(&logits.i(0)?, &full_last(&model, &[3, 4, 5, 7])?)?;
    assert!(diff < 1e-5, "{diff}");
    Ok(())
}
