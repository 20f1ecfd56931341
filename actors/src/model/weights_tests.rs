//! Checkpoint I/O: round trips, sharding, dtypes, errors naming tensors and files, freezing.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::model::qwen2::{Config, ForCausalLM};
use crate::model::weights::{read_config, save, WeightStore, INDEX_FILE, SINGLE_FILE};
use crate::Error;

fn fixture(rel: &str) -> PathBuf {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/qwen2"
    ))
    .join(rel)
}

fn tied_config() -> anyhow::Result<Config> {
    Ok(Config::from_file(&fixture("tied/config.json"))?)
}

fn assert_same_tensors(a: &WeightStore, b: &WeightStore) -> anyhow::Result<()> {
    assert_eq!(a.names(), b.names());
    for ((name, x), (_, y)) in a.tensors()?.into_iter().zip(b.tensors()?) {
        let x = x.to_dtype(DType::F32)?;
        let y = y.to_dtype(DType::F32)?;
        let diff = (x - y)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0, "{name} differs");
    }
    Ok(())
}

#[test]
fn save_then_load_round_trips_single_and_sharded() -> anyhow::Result<()> {
    let original = WeightStore::load(fixture("tied"), DType::F32, &Device::Cpu)?;
    let tmp = tempfile::tempdir()?;
    // One file.
    save(tmp.path(), &original.tensors()?, DType::F32, usize::MAX)?;
    assert!(tmp.path().join(SINGLE_FILE).is_file());
    assert_same_tensors(
        &original,
        &WeightStore::load(tmp.path(), DType::F32, &Device::Cpu)?,
    )?;
    // Shards of at most 100 kB into the same directory: the single file is replaced.
    save(tmp.path(), &original.tensors()?, DType::F32, 100_000)?;
    assert!(!tmp.path().join(SINGLE_FILE).exists());
    let index: serde_json::Value = read_config(&tmp.path().join(INDEX_FILE))?;
    let shards: std::collections::BTreeSet<_> = index["weight_map"]
        .as_object()
        .expect("weight_map is an object")
        .values()
        .map(|v| v.as_str().unwrap_or_default().to_string())
        .collect();
    assert!(shards.len() > 2, "expected several shards, got {shards:?}");
    let total: usize = original
        .tensors()?
        .iter()
        .map(|(_, t)| t.elem_count() * 4)
        .sum();
    assert_eq!(index["metadata"]["total_size"].as_u64(), Some(total as u64));
    assert_same_tensors(
        &original,
        &WeightStore::load(tmp.path(), DType::F32, &Device::Cpu)?,
    )?;
    Ok(())
}

#[test]
fn bf16_and_f16_on_disk_convert_to_the_asked_dtype() -> anyhow::Result<()> {
    let original = WeightStore::load(fixture("tied"), DType::F32, &Device::Cpu)?;
    for disk in [DType::BF16, DType::F16] {
        let tmp = tempfile::tempdir()?;
        save(tmp.path(), &original.tensors()?, disk, usize::MAX)?;
        let back = WeightStore::load(tmp.path(), DType::F32, &Device::Cpu)?;
        for ((name, x), (_, y)) in original.tensors()?.into_iter().zip(back.tensors()?) {
            assert_eq!(y.dtype(), DType::F32);
            let rounded = x.to_dtype(disk)?.to_dtype(DType::F32)?;
            let diff = (rounded - y)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert_eq!(diff, 0.0, "{name} ({disk:?} on disk)");
        }
    }
    Ok(())
}

#[test]
fn missing_tensor_is_an_error_naming_it() -> anyhow::Result<()> {
    let full = WeightStore::load(fixture("tied"), DType::F32, &Device::Cpu)?;
    let partial = full
        .tensors()?
        .into_iter()
        .filter(|(name, _)| name != "model.layers.1.mlp.up_proj.weight");
    let store =
        WeightStore::from_tensors(partial, "partial.safetensors", DType::F32, &Device::Cpu)?;
    let err = ForCausalLM::new(&tied_config()?, store.frozen_var_builder())
        .expect_err("a tensor is missing");
    let msg = err.to_string();
    assert!(
        msg.contains("model.layers.1.mlp.up_proj.weight") && msg.contains("missing"),
        "{msg}"
    );
    Ok(())
}

#[test]
fn mis_shaped_tensor_is_an_error_naming_tensor_and_file() -> anyhow::Result<()> {
    let full = WeightStore::load(fixture("tied"), DType::F32, &Device::Cpu)?;
    let bad = full.tensors()?.into_iter().map(|(name, t)| {
        if name == "model.norm.weight" {
            (
                name,
                Tensor::ones(63, DType::F32, &Device::Cpu).expect("ones"),
            )
        } else {
            (name, t)
        }
    });
    let tmp = tempfile::tempdir()?;
    save(tmp.path(), &bad.collect::<Vec<_>>(), DType::F32, usize::MAX)?;
    let store = WeightStore::load(tmp.path(), DType::F32, &Device::Cpu)?;
    let err =
        ForCausalLM::new(&tied_config()?, store.frozen_var_builder()).expect_err("wrong shape");
    let msg = err.to_string();
    assert!(
        msg.contains("model.norm.weight") && msg.contains(SINGLE_FILE) && msg.contains("[63]"),
        "{msg}"
    );
    Ok(())
}

#[test]
fn unexpected_tensors_are_reported() -> anyhow::Result<()> {
    let full = WeightStore::load(fixture("tied"), DType::F32, &Device::Cpu)?;
    let mut tensors = full.tensors()?;
    tensors.push((
        "model.extra.weight".into(),
        Tensor::zeros(4, DType::F32, &Device::Cpu)?,
    ));
    let store = WeightStore::from_tensors(tensors, "extra", DType::F32, &Device::Cpu)?;
    ForCausalLM::new(&tied_config()?, store.frozen_var_builder())?;
    assert_eq!(store.unexpected(), vec!["model.extra.weight".to_string()]);
    assert_eq!(store.report_unexpected(), store.unexpected());
    Ok(())
}

#[test]
fn missing_checkpoint_and_bad_index_are_clear_errors() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let err = WeightStore::load(tmp.path(), DType::F32, &Device::Cpu)
        .err()
        .expect("empty dir");
    assert!(err.to_string().contains(SINGLE_FILE), "{err}");
    // An index naming a tensor its shard lacks.
    let original = WeightStore::load(fixture("tied"), DType::F32, &Device::Cpu)?;
    save(tmp.path(), &original.tensors()?, DType::F32, 100_000)?;
    let index_path = tmp.path().join(INDEX_FILE);
    let mut index: serde_json::Value = read_config(&index_path)?;
    index["weight_map"]["model.ghost.weight"] = "model-00001-of-00004.safetensors".into();
    std::fs::write(&index_path, index.to_string())?;
    let err = WeightStore::load(tmp.path(), DType::F32, &Device::Cpu)
        .err()
        .expect("ghost tensor");
    assert!(err.to_string().contains("model.ghost.weight"), "{err}");
    Ok(())
}

#[test]
fn only_trainable_names_become_vars_and_get_gradients() -> anyhow::Result<()> {
    let store = WeightStore::load(fixture("tied"), DType::F32, &Device::Cpu)?;
    let model = ForCausalLM::new(
        &tied_config()?,
        store.var_builder(|name| name.contains("layers.1.mlp.")),
    )?;
    let names: Vec<String> = store
        .trainable_vars()
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    assert_eq!(
        names,
        [
            "model.layers.1.mlp.down_proj.weight",
            "model.layers.1.mlp.gate_proj.weight",
            "model.layers.1.mlp.up_proj.weight"
        ]
    );
    let ids = Tensor::new(&[[3u32, 9, 27, 81]], &Device::Cpu)?;
    let loss = model.token_logprobs(&ids, None)?.sum_all()?;
    let grads = loss.backward()?;
    for (name, var) in store.trainable_vars() {
        let g = grads
            .get(var.as_tensor())
            .expect("trainable var has a gradient");
        assert!(
            g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0,
            "{name} gradient is zero"
        );
    }
    // A frozen tensor is not tracked: the embedding gets no gradient.
    let frozen = store
        .tensors()?
        .into_iter()
        .find(|(name, _)| name == "model.embed_tokens.weight")
        .map(|(_, t)| t)
        .expect("embedding present");
    assert!(grads.get(&frozen).is_none());
    Ok(())
}

#[test]
fn trained_values_are_what_save_writes() -> anyhow::Result<()> {
    let store = WeightStore::load(fixture("tied"), DType::F32, &Device::Cpu)?;
    ForCausalLM::new(
        &tied_config()?,
        store.var_builder(|name| name == "model.norm.weight"),
    )?;
    let (_, var) = store.trainable_vars().pop().expect("one trainable");
    var.set(&Tensor::full(2.5f32, 64, &Device::Cpu)?)?;
    let tmp = tempfile::tempdir()?;
    save(tmp.path(), &store.tensors()?, DType::F32, usize::MAX)?;
    let back = WeightStore::load(tmp.path(), DType::F32, &Device::Cpu)?;
    let norm = back
        .tensors()?
        .into_iter()
        .find(|(n, _)| n == "model.norm.weight")
        .expect("saved");
    assert_eq!(norm.1.to_vec1::<f32>()?, vec![2.5f32; 64]);
    Ok(())
}

#[test]
fn config_errors_name_file_and_key() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let path = tmp.path().join("config.json");
    std::fs::write(
        &path,
        r#"{"hidden_size": "wide", "num_attention_heads": 4}"#,
    )?;
    match Config::from_file(&path) {
        Err(Error::ConfigFile { path: p, key, .. }) => {
            assert_eq!(p, path);
            assert_eq!(key, "hidden_size");
        }
        other => panic!("expected a ConfigFile error, got {other:?}"),
    }
    std::fs::write(
        &path,
        r#"{"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 3}"#,
    )?;
    let err = Config::from_file(&path).expect_err("3 does not divide 4");
    assert!(err.to_string().contains("num_key_value_heads"), "{err}");
    // transformers 4.x layout: rope_theta at the top level; defaults fill the rest.
    std::fs::write(
        &path,
        r#"{"hidden_size": 64, "num_attention_heads": 4, "rope_theta": 1000000.0}"#,
    )?;
    let cfg = Config::from_file(&path)?;
    assert_eq!(
        (cfg.rope_theta, cfg.num_key_value_heads, cfg.vocab_size),
        (1e6, 4, 151_936)
    );
    std::fs::write(
        &path,
        r#"{"rope_scaling": {"type": "yarn", "factor": 4.0}}"#,
    )?;
    let err = Config::from_file(&path).expect_err("yarn unsupported");
    assert!(
        err.to_string().contains("rope_scaling") && err.to_string().contains("yarn"),
        "{err}"
    );
    Ok(())
}
