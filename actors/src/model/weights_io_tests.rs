//! Memory-mapped reading and atomic sharded writing: files other tools read, saving over the loaded
//! directory, dtypes kept or converted bit-exactly, frozen tensors shared, errors naming tensor and file.

use std::collections::BTreeSet;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::model::weights::{read_config, save, WeightStore, INDEX_FILE, SINGLE_FILE};

/// Deterministic named tensors of a few shapes (one scalar-like, one odd-sized).
fn sample_tensors() -> anyhow::Result<Vec<(String, Tensor)>> {
    let cpu = &Device::Cpu;
    let mut out = Vec::new();
    for (i, dims) in [
        vec![64, 48],
        vec![1],
        vec![3, 5, 7],
        vec![1000],
        vec![64, 48],
    ]
    .into_iter()
    .enumerate()
    {
        let n: usize = dims.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|k| ((k * 37 + i * 11) % 101) as f32 / 7.0 - 6.5)
            .collect();
        out.push((
            format!("layer.{i}.weight"),
            Tensor::from_vec(values, dims, cpu)?,
        ));
    }
    Ok(out)
}

fn max_diff(a: &Tensor, b: &Tensor) -> anyhow::Result<f32> {
    let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

fn files_in(dir: &Path) -> anyhow::Result<BTreeSet<String>> {
    let mut names = BTreeSet::new();
    for entry in std::fs::read_dir(dir)? {
        names.insert(entry?.file_name().to_string_lossy().to_string());
    }
    Ok(names)
}

#[test]
fn written_files_are_what_the_safetensors_crate_reads() -> anyhow::Result<()> {
    let tensors = sample_tensors()?;
    let tmp = tempfile::tempdir()?;
    for dtype in [DType::F32, DType::BF16, DType::F16, DType::F64] {
        save(tmp.path(), &tensors, dtype, usize::MAX)?;
        let bytes = std::fs::read(tmp.path().join(SINGLE_FILE))?;
        let file = safetensors::SafeTensors::deserialize(&bytes)?;
        let (_, metadata) = safetensors::SafeTensors::read_metadata(&bytes)?;
        let format = metadata
            .metadata()
            .as_ref()
            .and_then(|m| m.get("format").cloned());
        assert_eq!(
            format.as_deref(),
            Some("pt"),
            "transformers checks format=pt"
        );
        for (name, tensor) in &tensors {
            let view = file.tensor(name)?;
            assert_eq!(view.shape(), tensor.dims(), "{name}");
            let back = candle_core::safetensors::Load::load(&view, &Device::Cpu)?;
            assert_eq!(back.dtype(), dtype);
            let expected = tensor.to_dtype(dtype)?;
            assert_eq!(max_diff(&back, &expected)?, 0.0, "{name} as {dtype:?}");
        }
    }
    Ok(())
}

#[test]
fn sharded_save_writes_an_index_that_loads_back_and_leaves_no_temporaries() -> anyhow::Result<()> {
    let tensors = sample_tensors()?;
    let tmp = tempfile::tempdir()?;
    // 64 * 48 * 4 = 12288 bytes: each large tensor overflows a 13 kB shard with the others.
    save(tmp.path(), &tensors, DType::F32, 13_000)?;
    let index: serde_json::Value = read_config(&tmp.path().join(INDEX_FILE))?;
    let total: usize = tensors.iter().map(|(_, t)| t.elem_count() * 4).sum();
    assert_eq!(index["metadata"]["total_size"].as_u64(), Some(total as u64));
    let map = index["weight_map"]
        .as_object()
        .expect("weight_map is an object");
    assert_eq!(map.len(), tensors.len());
    let shards: BTreeSet<String> = map
        .values()
        .filter_map(|v| v.as_str().map(String::from))
        .collect();
    let mut expected: BTreeSet<String> = shards.clone();
    expected.insert(INDEX_FILE.to_string());
    assert!(shards.len() >= 2, "{shards:?}");
    assert!(shards
        .iter()
        .all(|s| s.ends_with(&format!("-of-{:05}.safetensors", shards.len()))));
    // Exactly the checkpoint's files: no temporaries left, no single file.
    assert_eq!(files_in(tmp.path())?, expected);
    let store = WeightStore::load(tmp.path(), DType::F32, &Device::Cpu)?;
    for (name, tensor) in &tensors {
        assert_eq!(max_diff(&store.tensor(name)?, tensor)?, 0.0, "{name}");
    }
    // Back to one file: the shards and the index go.
    save(tmp.path(), &tensors, DType::F32, usize::MAX)?;
    assert_eq!(files_in(tmp.path())?, [SINGLE_FILE.to_string()].into());
    Ok(())
}

#[test]
fn saving_over_the_loaded_directory_keeps_the_old_store_readable() -> anyhow::Result<()> {
    let tensors = sample_tensors()?;
    let tmp = tempfile::tempdir()?;
    save(tmp.path(), &tensors, DType::BF16, 13_000)?;
    let store = WeightStore::load(tmp.path(), DType::F32, &Device::Cpu)?;
    // Streaming save of the mapped store into its own directory, as one file in f32.
    store.save(tmp.path(), DType::F32, usize::MAX)?;
    assert_eq!(files_in(tmp.path())?, [SINGLE_FILE.to_string()].into());
    let again = WeightStore::load(tmp.path(), DType::F32, &Device::Cpu)?;
    for (name, tensor) in &tensors {
        let rounded = tensor.to_dtype(DType::BF16)?;
        // The old store still reads its (now unlinked) mapped shards.
        assert_eq!(max_diff(&store.tensor(name)?, &rounded)?, 0.0, "{name} old");
        assert_eq!(max_diff(&again.tensor(name)?, &rounded)?, 0.0, "{name} new");
        assert_eq!(store.stored_dtype(name), Some(DType::BF16));
        assert_eq!(again.stored_dtype(name), Some(DType::F32));
    }
    Ok(())
}

#[test]
fn stored_half_precision_reads_as_itself_or_converts_like_to_dtype() -> anyhow::Result<()> {
    let tensors = sample_tensors()?;
    for disk in [DType::BF16, DType::F16] {
        let tmp = tempfile::tempdir()?;
        save(tmp.path(), &tensors, disk, usize::MAX)?;
        for want in [DType::F32, DType::F64, DType::BF16, DType::F16] {
            let store = WeightStore::load(tmp.path(), want, &Device::Cpu)?;
            for (name, tensor) in &tensors {
                let got = store.tensor(name)?;
                assert_eq!(got.dtype(), want);
                // candle's conversion of the stored values is the reference, bit for bit.
                let expected = tensor.to_dtype(disk)?.to_dtype(want)?;
                let same = got
                    .to_dtype(DType::F64)?
                    .eq(&expected.to_dtype(DType::F64)?)?
                    .to_dtype(DType::F32)?
                    .mean_all()?
                    .to_scalar::<f32>()?;
                assert_eq!(same, 1.0, "{name}: {disk:?} on disk read as {want:?}");
            }
        }
    }
    Ok(())
}

#[test]
fn frozen_tensors_are_read_once_and_shared_by_every_model() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    save(tmp.path(), &sample_tensors()?, DType::F32, usize::MAX)?;
    let store = WeightStore::load(tmp.path(), DType::F32, &Device::Cpu)?;
    let a = store.frozen_var_builder().get((64, 48), "layer.0.weight")?;
    let b = store.frozen_var_builder().get((64, 48), "layer.0.weight")?;
    assert_eq!(
        a.id(),
        b.id(),
        "two models asking for a frozen tensor share it"
    );
    assert_eq!(store.tensor("layer.0.weight")?.id(), a.id());
    // Another dtype is a private copy.
    let c = store.frozen_var_builder().get_with_hints_dtype(
        (64, 48),
        "layer.0.weight",
        candle_nn::Init::Const(0.),
        DType::F64,
    )?;
    assert_eq!(c.dtype(), DType::F64);
    assert_ne!(c.id(), a.id());
    // Trainable: a Var, and the same Var on the next request.
    let trainable = store.var_builder(|name| name == "layer.3.weight");
    let v = trainable.get(1000, "layer.3.weight")?;
    assert_eq!(trainable.get(1000, "layer.3.weight")?.id(), v.id());
    assert_eq!(store.trainable_vars().len(), 1);
    assert_eq!(store.tensor("layer.3.weight")?.id(), v.id());
    Ok(())
}

#[test]
fn unsupported_dtypes_and_bad_files_are_errors_naming_them() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let path = tmp.path().join(SINGLE_FILE);
    let ids = Tensor::new(&[1i64, 2, 3], &Device::Cpu)?;
    candle_core::safetensors::save(&[("position_ids".to_string(), ids)].into(), &path)?;
    let err = WeightStore::load(tmp.path(), DType::F32, &Device::Cpu)
        .err()
        .expect("i64 is not a weight dtype");
    let msg = err.to_string();
    assert!(
        msg.contains("position_ids") && msg.contains(SINGLE_FILE) && msg.contains("I64"),
        "{msg}"
    );
    // A truncated file: the header promises more bytes than there are.
    save(tmp.path(), &sample_tensors()?, DType::F32, usize::MAX)?;
    let bytes = std::fs::read(&path)?;
    std::fs::write(&path, &bytes[..bytes.len() - 10])?;
    let err = WeightStore::load(tmp.path(), DType::F32, &Device::Cpu)
        .err()
        .expect("truncated");
    let msg = err.to_string();
    assert!(
        msg.contains(SINGLE_FILE) && msg.contains("not a safetensors file"),
        "{msg}"
    );
    Ok(())
}

#[test]
fn chunked_reads_of_every_stored_dtype_equal_candles_conversion() -> anyhow::Result<()> {
    use crate::model::weights::io::CheckpointFile;
    let cpu = &Device::Cpu;
    // 1031 values (prime, so no chunk size below divides it) spanning many binades, signs and a zero.
    let values: Vec<f64> = (0..1031)
        .map(|k| {
            let k = k as f64;
            if k == 500.0 {
                0.0
            } else {
                (k * 0.37).sin() * 10f64.powf((k % 13.0) - 6.0)
            }
        })
        .collect();
    let base = Tensor::from_vec(values, 1031, cpu)?;
    for disk in [DType::F32, DType::F64, DType::BF16, DType::F16] {
        let tmp = tempfile::tempdir()?;
        let stored = base.to_dtype(disk)?;
        save(
            tmp.path(),
            &[("t".to_string(), stored.clone())],
            disk,
            usize::MAX,
        )?;
        let (file, tensors) = CheckpointFile::open(&tmp.path().join(SINGLE_FILE))?;
        let tensor = &tensors[0];
        assert_eq!(tensor.stored, disk);
        for want in [DType::F32, DType::F64, DType::BF16, DType::F16] {
            // candle's conversion of the stored values is the reference, bit for bit.
            let expected = stored
                .to_dtype(want)?
                .to_dtype(DType::F64)?
                .to_vec1::<f64>()?;
            for chunk in [1, 3, 64, 1000, 1031, 1 << 20] {
                let got = file.read_chunked(tensor, want, cpu, chunk)?;
                assert_eq!(got.dtype(), want);
                assert_eq!(got.dims(), &[1031]);
                let got = got.to_dtype(DType::F64)?.to_vec1::<f64>()?;
                let same = got
                    .iter()
                    .zip(&expected)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{disk:?} read as {want:?} in chunks of {chunk}");
            }
        }
    }
    Ok(())
}

#[test]
fn a_header_whose_byte_range_does_not_match_the_shape_is_an_error_naming_the_tensor(
) -> anyhow::Result<()> {
    use crate::model::weights::io::CheckpointFile;
    let tmp = tempfile::tempdir()?;
    save(tmp.path(), &sample_tensors()?, DType::F32, usize::MAX)?;
    let (file, tensors) = CheckpointFile::open(&tmp.path().join(SINGLE_FILE))?;
    let mut wrong = tensors[0].clone();
    wrong.shape = vec![wrong.shape.iter().product::<usize>() + 1];
    let err = file
        .read(&wrong, DType::F32, &Device::Cpu)
        .expect_err("one element more than the bytes hold");
    let msg = err.to_string();
    assert!(
        msg.contains(&wrong.name) && msg.contains(SINGLE_FILE),
        "{msg}"
    );
    Ok(())
}
