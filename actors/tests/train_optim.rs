//! AdamW, the warmup + cosine schedule and global-norm clipping against torch / transformers
//! (fixtures from `tests/fixtures/gen_optim.py`: `torch.optim.AdamW`, transformers'
//! `get_cosine_with_min_lr_schedule_with_warmup`, `torch.nn.utils.clip_grad_norm_`).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor, Var};
use r1v2_actors::train::schedule::{clip_grad_norm, learning_rate, lr_multiplier};
use r1v2_actors::train::{AdamW, AdamWParams, AdamWState, OptimConfig};

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/optim");

#[derive(serde::Deserialize)]
struct Hyper {
    lr: f64,
    betas: (f64, f64),
    eps: f64,
    weight_decay: f64,
    warmup_steps: u64,
    total_steps: u64,
    min_lr_ratio: f64,
    max_grad_norm: f64,
    steps: usize,
}

#[derive(serde::Deserialize)]
struct Schedule {
    warmup_steps: u64,
    total_steps: u64,
    min_lr_ratio: f64,
    multipliers: Vec<f64>,
}

#[derive(serde::Deserialize)]
struct Reference {
    hyper: Hyper,
    names: Vec<String>,
    pre_clip_norms: Vec<f64>,
    lrs: Vec<f64>,
    schedules: Vec<Schedule>,
}

fn fixtures() -> Result<(Reference, HashMap<String, Tensor>)> {
    let dir = Path::new(DIR);
    let reference: Reference =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json"))?)?;
    let tensors = candle_core::safetensors::load(dir.join("adamw.safetensors"), &Device::Cpu)?;
    Ok((reference, tensors))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    ensure!(a.dims() == b.dims(), "{:?} vs {:?}", a.dims(), b.dims());
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

fn config(h: &Hyper) -> OptimConfig {
    OptimConfig {
        lr: h.lr,
        betas: h.betas,
        eps: h.eps,
        weight_decay: h.weight_decay,
        warmup_steps: h.warmup_steps,
        total_steps: h.total_steps,
        min_lr_ratio: h.min_lr_ratio,
        max_grad_norm: h.max_grad_norm,
        ..Default::default()
    }
}

#[test]
fn schedule_matches_transformers() -> Result<()> {
    let (reference, _) = fixtures()?;
    for s in &reference.schedules {
        for (step, want) in s.multipliers.iter().enumerate() {
            let got = lr_multiplier(step as u64, s.warmup_steps, s.total_steps, s.min_lr_ratio);
            ensure!(
                (got - want).abs() < 1e-12,
                "warmup {} total {} min {}: step {step}: {got} vs transformers {want}",
                s.warmup_steps,
                s.total_steps,
                s.min_lr_ratio
            );
        }
    }
    // Past the horizon the rate stays at its minimum (transformers' cosine would rise again).
    assert_eq!(lr_multiplier(100, 2, 6, 0.1), 0.1);
    assert_eq!(lr_multiplier(7, 0, 0, 0.0), 1.0);
    Ok(())
}

/// Replays the fixture's steps: clip, lr, AdamW; `resume_after` saves and reloads the optimizer there.
fn replay(resume_after: Option<usize>) -> Result<()> {
    let (reference, tensors) = fixtures()?;
    let h = &reference.hyper;
    let cfg = config(h);
    cfg.validate()?;
    let params = AdamWParams {
        betas: h.betas,
        eps: h.eps,
        weight_decay: h.weight_decay,
    };
    let vars: Vec<(String, Var)> = reference
        .names
        .iter()
        .map(|n| Ok((n.clone(), Var::from_tensor(&tensors[&format!("init.{n}")])?)))
        .collect::<Result<_>>()?;
    let mut adamw = AdamW::new(vars.clone(), params)?;
    let tmp = tempfile::tempdir()?;
    let mut worst = 0f32;
    for step in 0..h.steps {
        let mut grads: Vec<Tensor> = reference
            .names
            .iter()
            .map(|n| tensors[&format!("grad.{step}.{n}")].clone())
            .collect();
        let norm = clip_grad_norm(&mut grads, h.max_grad_norm)?;
        let want_norm = reference.pre_clip_norms[step];
        ensure!(
            (norm - want_norm).abs() < 1e-5 * want_norm,
            "step {step}: norm {norm} vs torch {want_norm}"
        );
        let lr = learning_rate(&cfg, adamw.step_count());
        ensure!(
            (lr - reference.lrs[step]).abs() < 1e-12,
            "step {step}: lr {lr} vs {}",
            reference.lrs[step]
        );
        adamw.step(&grads, lr)?;
        for (name, var) in &vars {
            let want = &tensors[&format!("param.{step}.{name}")];
            let diff = max_abs_diff(var.as_tensor(), want)?;
            worst = worst.max(diff);
            ensure!(diff < 1e-6, "step {step}: `{name}` differs by {diff}");
        }
        if resume_after == Some(step) {
            adamw.state().save(tmp.path())?;
            let state = AdamWState::load(tmp.path())?;
            adamw = AdamW::from_state(vars.clone(), params, state)?;
        }
    }
    let state = adamw.state();
    for (name, m) in &state.exp_avg {
        let diff = max_abs_diff(m, &tensors[&format!("exp_avg.{name}")])?;
        ensure!(diff < 1e-6, "exp_avg of `{name}` differs by {diff}");
    }
    for (name, v) in &state.exp_avg_sq {
        let diff = max_abs_diff(v, &tensors[&format!("exp_avg_sq.{name}")])?;
        ensure!(diff < 1e-6, "exp_avg_sq of `{name}` differs by {diff}");
    }
    eprintln!(
        "AdamW over {} steps: max |param - torch| = {worst:e}",
        h.steps
    );
    Ok(())
}

#[test]
fn adamw_clip_and_schedule_match_torch() -> Result<()> {
    replay(None)
}

#[test]
fn adamw_state_round_trips_mid_run() -> Result<()> {
    replay(Some(2))
}

#[test]
fn adamw_state_is_bit_exact_and_checked() -> Result<()> {
    let (reference, tensors) = fixtures()?;
    let params = AdamWParams {
        betas: reference.hyper.betas,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let vars: Vec<(String, Var)> = reference
        .names
        .iter()
        .map(|n| Ok((n.clone(), Var::from_tensor(&tensors[&format!("init.{n}")])?)))
        .collect::<Result<_>>()?;
    let mut adamw = AdamW::new(vars.clone(), params)?;
    let grads: Vec<Tensor> = reference
        .names
        .iter()
        .map(|n| tensors[&format!("grad.0.{n}")].clone())
        .collect();
    adamw.step(&grads, 1e-2)?;
    let tmp = tempfile::tempdir()?;
    adamw.state().save(tmp.path())?;
    let loaded = AdamWState::load(tmp.path())?;
    ensure!(loaded.step == 1);
    for ((n1, a), (n2, b)) in adamw.state().exp_avg_sq.iter().zip(&loaded.exp_avg_sq) {
        ensure!(n1 == n2);
        ensure!(
            a.flatten_all()?.to_vec1::<f32>()? == b.flatten_all()?.to_vec1::<f32>()?,
            "{n1} not bit-exact"
        );
    }
    // A state for other parameters is refused with a message naming the parameter.
    let other = vec![(
        "c.weight".to_string(),
        Var::zeros((2, 2), candle_core::DType::F32, &Device::Cpu)?,
    )];
    let err = AdamW::from_state(other, params, loaded).expect_err("mismatched state");
    ensure!(err.to_string().contains("parameters"), "{err}");
    // Wrong number of gradients.
    let err = adamw
        .step(&grads[..1], 1e-2)
        .expect_err("too few gradients");
    ensure!(err.to_string().contains("gradients"), "{err}");
    std::fs::remove_file(tmp.path().join("adamw.safetensors"))?;
    let err = AdamWState::load(tmp.path()).expect_err("missing moments");
    ensure!(err.to_string().contains("adamw.safetensors"), "{err}");
    Ok(())
}

/// The fixture's parameters as bf16 Vars (the model's working copies in mixed precision).
fn bf16_vars(names: &[String], tensors: &HashMap<String, Tensor>) -> Result<Vec<(String, Var)>> {
    names
        .iter()
        .map(|n| {
            let init = tensors[&format!("init.{n}")].to_dtype(DType::BF16)?;
            Ok((n.clone(), Var::from_tensor(&init)?))
        })
        .collect()
}

#[test]
fn bf16_parameters_keep_f32_masters_that_follow_torch_and_survive_a_resume() -> Result<()> {
    // Mixed precision: the bf16 Vars start from the fixture's values rounded to bf16, so the reference is an
    // f32 AdamW (checked against torch above) started from those same rounded values and fed the same
    // f32 gradients. The masters must equal it bit for bit, the Vars must be the masters rounded to bf16.
    let (reference, tensors) = fixtures()?;
    let h = &reference.hyper;
    let cfg = config(h);
    let params = AdamWParams {
        betas: h.betas,
        eps: h.eps,
        weight_decay: h.weight_decay,
    };
    let half = bf16_vars(&reference.names, &tensors)?;
    let full: Vec<(String, Var)> = half
        .iter()
        .map(|(n, v)| {
            Ok((
                n.clone(),
                Var::from_tensor(&v.as_tensor().to_dtype(DType::F32)?)?,
            ))
        })
        .collect::<Result<_>>()?;
    let mut mixed = AdamW::new(half.clone(), params)?;
    let mut plain = AdamW::new(full.clone(), params)?;
    let tmp = tempfile::tempdir()?;
    for step in 0..h.steps {
        let mut grads: Vec<Tensor> = reference
            .names
            .iter()
            .map(|n| tensors[&format!("grad.{step}.{n}")].clone())
            .collect();
        clip_grad_norm(&mut grads, h.max_grad_norm)?;
        let lr = learning_rate(&cfg, plain.step_count());
        plain.step(&grads, lr)?;
        mixed.step(&grads, lr)?;
        for ((name, var), (_, want)) in half.iter().zip(&full) {
            ensure!(var.dtype() == DType::BF16, "the working copy stays bf16");
            let master = mixed.master(name).expect("a bf16 parameter has a master");
            ensure!(master.dtype() == DType::F32, "the master is f32");
            ensure!(
                master.flatten_all()?.to_vec1::<f32>()?
                    == want.as_tensor().flatten_all()?.to_vec1::<f32>()?,
                "step {step}: master of `{name}` differs from f32 AdamW"
            );
            ensure!(
                var.as_tensor().flatten_all()?.to_vec1::<half::bf16>()?
                    == master
                        .to_dtype(DType::BF16)?
                        .flatten_all()?
                        .to_vec1::<half::bf16>()?,
                "step {step}: `{name}` is not its master rounded to bf16"
            );
        }
        for (_, m) in mixed
            .state()
            .exp_avg
            .iter()
            .chain(&mixed.state().exp_avg_sq)
        {
            ensure!(m.dtype() == DType::F32, "AdamW moments are f32");
        }
        if step == 1 {
            // Save and resume mid-run: the masters come back bit for bit (not re-read from the bf16 Vars).
            mixed.state().save(tmp.path())?;
            let state = AdamWState::load(tmp.path())?;
            ensure!(state.master.len() == reference.names.len());
            mixed = AdamW::from_state(half.clone(), params, state)?;
        }
    }
    Ok(())
}

#[test]
fn updates_below_bf16_resolution_move_the_f32_master_not_the_bf16_copy() -> Result<()> {
    // bf16 keeps 8 significant bits: below 1.0 its values are 2^-8 apart, 2^-7 in [1, 2), 2^-6 in [2, 4),
    // so a change of ~1e-3 (under half a step) rounds away for these values. Ten AdamW steps of lr 1e-4
    // with a constant gradient move each parameter by ~1e-3 in all (m / sqrt(v) = sign(g)).
    let params = AdamWParams {
        betas: (0.9, 0.999),
        eps: 1e-8,
        weight_decay: 0.0,
    };
    let start = Tensor::new(&[1.0f32, -1.5, 2.0, 3.0], &Device::Cpu)?;
    let half = Var::from_tensor(&start.to_dtype(DType::BF16)?)?;
    let full = Var::from_tensor(&start)?;
    let mut mixed = AdamW::new(vec![("w".into(), half.clone())], params)?;
    let mut plain = AdamW::new(vec![("w".into(), full.clone())], params)?;
    let grad = Tensor::new(&[1.0f32, -1.0, 0.5, 2.0], &Device::Cpu)?;
    for _ in 0..10 {
        mixed.step(std::slice::from_ref(&grad), 1e-4)?;
        plain.step(std::slice::from_ref(&grad), 1e-4)?;
    }
    let master = mixed.master("w").expect("master").to_vec1::<f32>()?;
    let want = full.as_tensor().to_vec1::<f32>()?;
    ensure!(master == want, "master {master:?} vs f32 AdamW {want:?}");
    let moved: Vec<f32> = master
        .iter()
        .zip(start.to_vec1::<f32>()?)
        .map(|(m, s)| (m - s).abs())
        .collect();
    ensure!(
        moved.iter().all(|&d| d > 5e-4 && d < 2e-3),
        "the master moved by {moved:?}, expected ~1e-3 each"
    );
    // The bf16 copy is the master rounded: still the starting values.
    ensure!(
        half.as_tensor().to_dtype(DType::F32)?.to_vec1::<f32>()? == start.to_vec1::<f32>()?,
        "the bf16 copy moved: {:?}",
        half.as_tensor().to_dtype(DType::F32)?.to_vec1::<f32>()?
    );
    // A reset (a new stage's fresh moments) keeps the master; re-reading it from the bf16 copy would
    // undo the ten steps.
    mixed.reset()?;
    ensure!(mixed.step_count() == 0);
    ensure!(mixed.master("w").expect("master").to_vec1::<f32>()? == master);
    ensure!(mixed.state().exp_avg[0].1.to_vec1::<f32>()? == vec![0.0; 4]);
    // Without a master (a bf16 update applied to the bf16 value itself) the steps would be lost: each
    // one alone rounds back to the start.
    let alone = (start.to_dtype(DType::BF16)? - (grad.sign()? * 1e-4)?.to_dtype(DType::BF16)?)?;
    ensure!(alone.to_dtype(DType::F32)?.to_vec1::<f32>()? == start.to_vec1::<f32>()?);
    Ok(())
}
