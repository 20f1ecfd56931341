//! Loading a multi-GB checkpoint: peak resident memory and time of `WeightStore` (one tensor at a time,
//! positioned reads) against reading the files (`cat`-like) and against reading each file whole, as the
//! loader did before. Generates a Qwen2-shaped bf16 checkpoint sharded like `save_pretrained` (index +
//! shards) in a temporary directory, then measures each way of loading in a fresh child process: wall
//! time, its ratio to reading the files in the same state, user and system CPU time and minor page faults
//! (getrusage: where the time goes), and peak RSS (VmHWM from /proc/self/status, which counts mapped file
//! pages while they are resident too).
//!
//!     cargo run --release --example bench_load -- [--gb 3] [--shard-mb 1000] [--dir PATH] [--cold]
//!
//! By default every way runs after the files were read once, so all of them read from the page cache
//! (warm). With `--cold` the files are dropped from the page cache (`posix_fadvise(DONTNEED)`, no root
//! needed) before each way, so each reads the disk.
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use half::bf16;
use r1v2_actors::model::weights::{save, WeightStore};

/// A Qwen2-like decoder with hidden 2048, GQA 16/2 heads of 128, MLP 11008, untied 151936-row embedding
/// and head: the embedding is the largest tensor (311M values, 622 MB in bf16).
fn shapes(layers: usize) -> Vec<(String, Vec<usize>)> {
    let (vocab, hidden, kv, mlp) = (151_936, 2048, 256, 11_008);
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![vocab, hidden])];
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        for (name, dims) in [
            ("self_attn.q_proj.weight", vec![hidden, hidden]),
            ("self_attn.k_proj.weight", vec![kv, hidden]),
            ("self_attn.v_proj.weight", vec![kv, hidden]),
            ("self_attn.o_proj.weight", vec![hidden, hidden]),
            ("mlp.gate_proj.weight", vec![mlp, hidden]),
            ("mlp.up_proj.weight", vec![mlp, hidden]),
            ("mlp.down_proj.weight", vec![hidden, mlp]),
            ("input_layernorm.weight", vec![hidden]),
            ("post_attention_layernorm.weight", vec![hidden]),
        ] {
            out.push((format!("{p}.{name}"), dims));
        }
    }
    out.push(("model.norm.weight".to_string(), vec![hidden]));
    out.push(("lm_head.weight".to_string(), vec![vocab, hidden]));
    out
}

/// Writes the checkpoint shard by shard (one shard's tensors in memory at a time) with our `save`, then
/// renames the shards and merges the indices so the directory looks like one `save_pretrained` call.
fn generate(dir: &Path, gb: f64, shard_bytes: usize) -> Result<()> {
    let per_layer: usize = shapes(1)
        .iter()
        .skip(1)
        .take(9)
        .map(|(_, d)| d.iter().product::<usize>())
        .sum();
    let fixed = 2 * 151_936 * 2048;
    let layers = ((gb * 1e9 / 2.0 - fixed as f64) / per_layer as f64)
        .round()
        .max(1.0) as usize;
    let all = shapes(layers);
    // Greedy groups of at most `shard_bytes`, each saved on its own and renamed to its place.
    let mut groups: Vec<Vec<(String, Vec<usize>)>> = vec![vec![]];
    let mut bytes = 0;
    for (name, dims) in all {
        let b = dims.iter().product::<usize>() * 2;
        if bytes + b > shard_bytes && !groups.last().is_none_or(|g| g.is_empty()) {
            groups.push(vec![]);
            bytes = 0;
        }
        bytes += b;
        groups.last_mut().context("a group")?.push((name, dims));
    }
    let count = groups.len();
    let mut weight_map = serde_json::Map::new();
    let mut total = 0usize;
    let scratch = dir.join("scratch");
    for (k, group) in groups.into_iter().enumerate() {
        let file = format!("model-{:05}-of-{count:05}.safetensors", k + 1);
        let mut tensors = Vec::new();
        for (i, (name, dims)) in group.into_iter().enumerate() {
            let n: usize = dims.iter().product();
            // A cheap deterministic fill in [-0.05, 0.05).
            let mut state = (k * 1000 + i) as u64 * 0x9E37_79B9_7F4A_7C15 + 1;
            let values: Vec<bf16> = (0..n)
                .map(|_| {
                    state = state
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1);
                    bf16::from_f32(((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1)
                })
                .collect();
            total += n * 2;
            weight_map.insert(name.clone(), file.clone().into());
            tensors.push((name, Tensor::from_vec(values, dims, &Device::Cpu)?));
        }
        save(&scratch, &tensors, DType::BF16, usize::MAX)?;
        std::fs::rename(scratch.join("model.safetensors"), dir.join(&file))?;
    }
    std::fs::remove_dir(&scratch)?;
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index)?,
    )?;
    Ok(())
}

fn shard_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    Ok(files)
}

/// Peak resident set of this process so far, in bytes.
fn peak_rss() -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("VmHWM")?;
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .context("VmHWM value")?
        .parse()?;
    Ok(kb * 1024)
}

/// The trainable part of the `train` way: the last layer (what a partial fine-tune keeps as f32 Vars).
fn last_layer(store: &WeightStore) -> String {
    let layers = store
        .names()
        .iter()
        .filter(|n| n.ends_with("input_layernorm.weight"))
        .count();
    format!("model.layers.{}.", layers.saturating_sub(1))
}

/// This process's (user CPU s, system CPU s, minor page faults) so far.
fn cpu_usage() -> (f64, f64, i64) {
    // SAFETY: getrusage fills the zeroed struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    (secs(usage.ru_utime), secs(usage.ru_stime), usage.ru_minflt)
}

/// Drops the files' pages from the page cache (a clean file's pages; advisory).
fn evict(dir: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    for file in shard_files(dir)? {
        let f = std::fs::File::open(file)?;
        // SAFETY: an fadvise on an open file descriptor; offset 0, length 0 = the whole file.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }
    Ok(())
}

/// One way of loading, run in this (child) process; prints
/// `RESULT seconds peak_rss_bytes kept_bytes user_s sys_s minor_faults`.
fn child(way: &str, dir: &Path) -> Result<()> {
    let start = Instant::now();
    let mut kept = Vec::new();
    match way {
        "read" => {
            let mut buf = vec![0u8; 8 << 20];
            for file in shard_files(dir)? {
                let mut f = std::fs::File::open(file)?;
                while f.read(&mut buf)? > 0 {}
            }
        }
        "whole" => {
            for file in shard_files(dir)? {
                let bytes = std::fs::read(&file)?;
                let st = safetensors::SafeTensors::deserialize(&bytes)?;
                for (_, view) in st.tensors() {
                    let t = candle_core::safetensors::Load::load(&view, &Device::Cpu)?;
                    kept.push(t.to_dtype(DType::F32)?);
                }
            }
        }
        "stream_bf16" => {
            // The host side of a GPU load: each tensor read in the file's dtype, then (there) moved.
            let store = WeightStore::load(dir, DType::BF16, &Device::Cpu)?;
            for name in store.names() {
                drop(store.tensor(&name)?);
            }
        }
        "stream" | "train" => {
            let store = WeightStore::load(dir, DType::F32, &Device::Cpu)?;
            let prefix = last_layer(&store);
            let train = way == "train";
            let vb = store.var_builder(move |name| train && name.starts_with(&prefix));
            for (name, shape) in store.shapes() {
                if store.stored_dtype(&name).is_none() {
                    bail!("{name} has no dtype");
                }
                // A frozen tensor is read and dropped (on a GPU run it moves to the device); a trainable one
                // stays, a Var in the store.
                if way == "train" && name.starts_with(&last_layer(&store)) {
                    vb.get(shape, &name)?;
                } else {
                    drop(store.tensor(&name)?);
                }
            }
            kept.extend(
                store
                    .trainable_vars()
                    .into_iter()
                    .map(|(_, v)| v.as_tensor().clone()),
            );
        }
        "keep_f32" | "keep_bf16" => {
            let dtype = if way == "keep_f32" {
                DType::F32
            } else {
                DType::BF16
            };
            let store = WeightStore::load(dir, dtype, &Device::Cpu)?;
            let vb = store.frozen_var_builder();
            for (name, shape) in store.shapes() {
                kept.push(vb.get(shape, &name)?);
            }
        }
        "save" => {
            let store = WeightStore::load(dir, DType::BF16, &Device::Cpu)?;
            let out = dir.join("saved");
            store.save(&out, DType::BF16, 1_000_000_000)?;
            let secs = start.elapsed().as_secs_f64();
            std::fs::remove_dir_all(&out)?;
            let (user, sys, faults) = cpu_usage();
            println!("RESULT {secs} {} 0 {user} {sys} {faults}", peak_rss()?);
            return Ok(());
        }
        other => bail!("unknown way {other}"),
    }
    let secs = start.elapsed().as_secs_f64();
    let kept_bytes: usize = kept
        .iter()
        .map(|t| t.elem_count() * t.dtype().size_in_bytes())
        .sum();
    let (user, sys, faults) = cpu_usage();
    println!(
        "RESULT {secs} {} {kept_bytes} {user} {sys} {faults}",
        peak_rss()?
    );
    Ok(())
}

/// What one child measured.
struct Measured {
    secs: f64,
    peak_rss: f64,
    kept: f64,
    user: f64,
    sys: f64,
    faults: f64,
}

fn run_child(way: &str, dir: &Path) -> Result<Measured> {
    let out = Command::new(std::env::current_exe()?)
        .args(["--child", way])
        .arg(dir)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("{way}: {}{}", text, String::from_utf8_lossy(&out.stderr));
    }
    let line = text
        .lines()
        .find(|l| l.starts_with("RESULT"))
        .context("no RESULT line")?;
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    if v.len() < 6 {
        bail!("{way}: short RESULT line `{line}`");
    }
    Ok(Measured {
        secs: v[0],
        peak_rss: v[1],
        kept: v[2],
        user: v[3],
        sys: v[4],
        faults: v[5],
    })
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--child") {
        return child(&args[2], Path::new(&args[3]));
    }
    let arg = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let gb: f64 = arg("--gb").map(|s| s.parse()).transpose()?.unwrap_or(3.0);
    let shard_mb: usize = arg("--shard-mb")
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1000);
    let tmp = tempfile::tempdir()?;
    let dir = arg("--dir")
        .map(PathBuf::from)
        .unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&dir)?;
    let start = Instant::now();
    generate(&dir, gb, shard_mb * 1_000_000)?;
    let files = shard_files(&dir)?;
    let file_bytes: u64 = files
        .iter()
        .map(|f| f.metadata().map(|m| m.len()).unwrap_or(0))
        .sum();
    let store = WeightStore::load(&dir, DType::F32, &Device::Cpu)?;
    let largest = store
        .shapes()
        .iter()
        .map(|(_, s)| s.elem_count())
        .max()
        .unwrap_or(0);
    let prefix = last_layer(&store);
    let trainable: usize = store
        .shapes()
        .iter()
        .filter(|(n, _)| n.starts_with(&prefix))
        .map(|(_, s)| s.elem_count())
        .sum();
    drop(store);
    println!(
        "checkpoint: {:.2} GB in {} shards (bf16), generated in {:.1} s; largest tensor {:.0} MB as bf16, \
         {:.0} MB as f32; trainable part of `train` (last layer, f32) {:.0} MB",
        file_bytes as f64 / 1e9,
        files.len(),
        start.elapsed().as_secs_f64(),
        largest as f64 * 2.0 / 1e6,
        largest as f64 * 4.0 / 1e6,
        trainable as f64 * 4.0 / 1e6,
    );
    let cold = args.iter().any(|a| a == "--cold");
    let prepare = |dir: &Path| -> Result<()> {
        if cold {
            evict(dir)
        } else {
            run_child("read", dir).map(|_| ()) // warm the page cache
        }
    };
    println!(
        "page cache: {}",
        if cold {
            "cold (the files are evicted before each way: every way reads the disk)"
        } else {
            "warm (the files were read just before each way)"
        }
    );
    println!();
    println!(
        "| way | what stays in memory | time s | time / read | GB/s of file | user s | sys s | minor faults | peak RSS MB | RSS / file | kept MB |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut read_secs = f64::NAN;
    for (way, what) in [
        ("read", "nothing (cat-like: 8 MiB reads into one buffer)"),
        ("whole", "before: each file read whole, all tensors f32"),
        (
            "stream_bf16",
            "each tensor read in the file's dtype (bf16) and dropped: the host side of a GPU load",
        ),
        ("stream", "each tensor read as f32 and dropped"),
        (
            "train",
            "frozen read as f32 and dropped, last layer kept as f32 Vars",
        ),
        ("keep_bf16", "all kept in bf16 (the file's dtype)"),
        ("keep_f32", "all kept in f32 (an f32 CPU run)"),
        (
            "save",
            "bf16 store saved in 1 GB shards (one tensor at a time)",
        ),
    ] {
        prepare(&dir)?;
        let m = run_child(way, &dir)?;
        if way == "read" {
            read_secs = m.secs;
        }
        println!(
            "| {way} | {what} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} | {:.0} | {:.2} | {:.0} |",
            m.secs,
            m.secs / read_secs,
            file_bytes as f64 / m.secs / 1e9,
            m.user,
            m.sys,
            m.faults,
            m.peak_rss / 1e6,
            m.peak_rss / file_bytes as f64,
            m.kept / 1e6,
        );
    }
    Ok(())
}
