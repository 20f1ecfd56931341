//! Finite-difference (f64, central) checks of the candle gradients of the GRPO and MPO losses w.r.t. the
//! policy log-probs, through the clipped, dual-clipped and unclipped regions.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use r1v2_actors::rl::config::{
    GrpoConfig, KlEstimator, LossAggregation, MpoConfig, SftNormalisation,
};
use r1v2_actors::rl::grpo::{grpo_loss, GrpoInputs};
use r1v2_actors::rl::mpo::{mpo_loss_with_delta, MpoInputs};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const H: f64 = 1e-6;

fn normal(rng: &mut ChaCha8Rng) -> f64 {
    // Box-Muller
    let (u1, u2): (f64, f64) = (rng.gen_range(1e-12..1.0), rng.gen());
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

fn assert_grad_close(what: &str, analytic: &[f64], numeric: &[f64]) {
    for (i, (a, n)) in analytic.iter().zip(numeric).enumerate() {
        assert!(
            (a - n).abs() <= 1e-6 * (1.0 + n.abs()),
            "{what}[{i}]: candle {a} vs finite difference {n}"
        );
    }
}

struct GrpoCase {
    b: usize,
    t: usize,
    policy: Vec<f64>,
    behaviour: Tensor,
    reference: Tensor,
    advantages: Tensor,
    mask: Tensor,
}

impl GrpoCase {
    fn new(seed: u64) -> Result<Self> {
        let (b, t) = (5, 6);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let behaviour: Vec<f64> = (0..b * t).map(|_| -3.0 * rng.gen::<f64>()).collect();
        let policy: Vec<f64> = behaviour
            .iter()
            .map(|x| x + 0.5 * normal(&mut rng))
            .collect();
        let reference: Vec<f64> = behaviour
            .iter()
            .map(|x| x + 0.3 * normal(&mut rng))
            .collect();
        let advantages: Vec<f64> = (0..b)
            .map(|i| (if i % 2 == 0 { 1.0 } else { -1.0 }) * (0.2 + rng.gen::<f64>()))
            .collect();
        let lengths = [1, 6, 3, 4, 5];
        let mask: Vec<f64> = (0..b * t)
            .map(|k| f64::from(u8::from(k % t < lengths[k / t])))
            .collect();
        let dev = Device::Cpu;
        Ok(Self {
            b,
            t,
            policy,
            behaviour: Tensor::from_vec(behaviour, (b, t), &dev)?,
            reference: Tensor::from_vec(reference, (b, t), &dev)?,
            advantages: Tensor::from_vec(advantages, b, &dev)?,
            mask: Tensor::from_vec(mask, (b, t), &dev)?,
        })
    }

    fn loss(
        &self,
        policy: &Tensor,
        cfg: &GrpoConfig,
    ) -> Result<(Tensor, r1v2_actors::rl::grpo::GrpoMetrics)> {
        let inputs = GrpoInputs {
            policy_logprobs: policy,
            behaviour_logprobs: &self.behaviour,
            reference_logprobs: Some(&self.reference),
            advantages: &self.advantages,
            response_mask: &self.mask,
            token_entropies: None,
        };
        let out = grpo_loss(&inputs, cfg)?;
        Ok((out.loss, out.metrics))
    }

    fn value(&self, policy: &[f64], cfg: &GrpoConfig) -> Result<f64> {
        let p = Tensor::from_vec(policy.to_vec(), (self.b, self.t), &Device::Cpu)?;
        Ok(self.loss(&p, cfg)?.0.to_scalar::<f64>()?)
    }
}

#[test]
fn grpo_gradients_match_finite_differences() -> Result<()> {
    let case = GrpoCase::new(7)?;
    let aggregations = [
        LossAggregation::SequenceMeanTokenMean,
        LossAggregation::TokenMean,
        LossAggregation::SequenceSumNormalised {
            max_completion_len: 8,
        },
    ];
    let mut saw = (false, false, false); // (low clip, high clip, dual clip) exercised
    for aggregation in aggregations {
        for kl_estimator in [KlEstimator::K1, KlEstimator::K2, KlEstimator::K3] {
            for dual_clip in [None, Some(1.35)] {
                let cfg = GrpoConfig {
                    eps_low: 0.2,
                    eps_high: 0.28,
                    dual_clip,
                    kl_coef: 0.3,
                    kl_estimator,
                    aggregation,
                };
                let var = Var::from_tensor(&Tensor::from_vec(
                    case.policy.clone(),
                    (case.b, case.t),
                    &Device::Cpu,
                )?)?;
                let (loss, metrics) = case.loss(var.as_tensor(), &cfg)?;
                saw.0 |= metrics.clipfrac_low > 0.0;
                saw.1 |= metrics.clipfrac_high > 0.0;
                let grads = loss.backward()?;
                let analytic = grads
                    .get(var.as_tensor())
                    .expect("grad")
                    .flatten_all()?
                    .to_vec1::<f64>()?;
                let mut numeric = Vec::with_capacity(case.policy.len());
                for k in 0..case.policy.len() {
                    let (mut plus, mut minus) = (case.policy.clone(), case.policy.clone());
                    plus[k] += H;
                    minus[k] -= H;
                    numeric
                        .push((case.value(&plus, &cfg)? - case.value(&minus, &cfg)?) / (2.0 * H));
                }
                assert_grad_close(
                    &format!("{aggregation:?} {kl_estimator:?} dual {dual_clip:?}"),
                    &analytic,
                    &numeric,
                );
            }
        }
    }
    // The dual clip bites where A < 0 and rho > c.
    let adv = case.advantages.to_vec1::<f64>()?;
    let beh = case.behaviour.flatten_all()?.to_vec1::<f64>()?;
    let mask = case.mask.flatten_all()?.to_vec1::<f64>()?;
    saw.2 = (0..case.policy.len())
        .any(|k| mask[k] > 0.0 && adv[k / case.t] < 0.0 && (case.policy[k] - beh[k]).exp() > 1.35);
    assert!(
        saw.0 && saw.1 && saw.2,
        "clipped regions exercised (low, high, dual): {saw:?}"
    );
    Ok(())
}

#[test]
fn mpo_gradients_match_finite_differences() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let n = 4;
    let mut draw = |scale: f64| -> Vec<f64> { (0..n).map(|_| -scale * rng.gen::<f64>()).collect() };
    let (pc, pr, rc, rr) = (draw(30.0), draw(30.0), draw(30.0), draw(30.0));
    let lengths: Vec<f64> = vec![5.0, 12.0, 1.0, 30.0];
    let dev = Device::Cpu;
    let (rc_t, rr_t, len_t) = (
        Tensor::new(rc.as_slice(), &dev)?,
        Tensor::new(rr.as_slice(), &dev)?,
        Tensor::new(lengths.as_slice(), &dev)?,
    );
    let value = |pc: &[f64], pr: &[f64], cfg: &MpoConfig, delta: f64| -> Result<f64> {
        let (a, b) = (Tensor::new(pc, &dev)?, Tensor::new(pr, &dev)?);
        let inputs = MpoInputs {
            policy_chosen: &a,
            policy_rejected: &b,
            reference_chosen: &rc_t,
            reference_rejected: &rr_t,
            chosen_lengths: &len_t,
        };
        Ok(mpo_loss_with_delta(&inputs, cfg, delta)?
            .loss
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?)
    };
    for sft_normalisation in [
        SftNormalisation::PerSequence,
        SftNormalisation::BatchTokenMean,
    ] {
        for delta in [0.0, -0.4, 1.7] {
            let cfg = MpoConfig {
                beta: 0.3,
                sft_normalisation,
                ..Default::default()
            };
            let (va, vb) = (
                Var::new(pc.as_slice(), &dev)?,
                Var::new(pr.as_slice(), &dev)?,
            );
            let inputs = MpoInputs {
                policy_chosen: va.as_tensor(),
                policy_rejected: vb.as_tensor(),
                reference_chosen: &rc_t,
                reference_rejected: &rr_t,
                chosen_lengths: &len_t,
            };
            let loss = mpo_loss_with_delta(&inputs, &cfg, delta)?.loss;
            let grads = loss.backward()?;
            for (which, var) in [("chosen", &va), ("rejected", &vb)] {
                let analytic = grads.get(var.as_tensor()).expect("grad").to_vec1::<f64>()?;
                let mut numeric = Vec::new();
                for k in 0..n {
                    let (mut plus_c, mut minus_c, mut plus_r, mut minus_r) =
                        (pc.clone(), pc.clone(), pr.clone(), pr.clone());
                    if which == "chosen" {
                        plus_c[k] += H;
                        minus_c[k] -= H;
                    } else {
                        plus_r[k] += H;
                        minus_r[k] -= H;
                    }
                    let d = value(&plus_c, &plus_r, &cfg, delta)?
                        - value(&minus_c, &minus_r, &cfg, delta)?;
                    numeric.push(d / (2.0 * H));
                }
                assert_grad_close(
                    &format!("mpo {sft_normalisation:?} delta {delta} {which}"),
                    &analytic,
                    &numeric,
                );
            }
        }
    }
    Ok(())
}
