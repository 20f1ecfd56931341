//! The RL losses against TRL 1.16 (fixtures from tests/fixtures/gen_rl.py): values and gradients to 1e-5.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use r1v2_actors::rl::advantages::group_advantages;
use r1v2_actors::rl::config::{
    AdvantageConfig, AdvantageScaling, GrpoConfig, KlEstimator, LossAggregation, MpoConfig,
    SftNormalisation,
};
use r1v2_actors::rl::grpo::{grpo_loss, GrpoInputs};
use r1v2_actors::rl::mpo::{mpo_loss, mpo_loss_with_delta, BcoRewardMean, MpoInputs};
use serde_json::Value;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/fixtures/rl/rl_reference.json"
);
const TOL: f64 = 1e-5;

fn fixture() -> Result<Value> {
    Ok(serde_json::from_str(&std::fs::read_to_string(FIXTURE)?)?)
}

fn vec1(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("fixture: array")
        .iter()
        .map(|x| x.as_f64().expect("fixture: number"))
        .collect()
}

fn vec2(v: &Value) -> Vec<Vec<f64>> {
    v.as_array()
        .expect("fixture: array of rows")
        .iter()
        .map(vec1)
        .collect()
}

fn t1(v: &Value) -> Result<Tensor> {
    Ok(Tensor::new(vec1(v), &Device::Cpu)?.to_dtype(DType::F32)?)
}

fn t2(v: &Value) -> Result<Tensor> {
    let rows = vec2(v);
    let (b, t) = (rows.len(), rows[0].len());
    let flat: Vec<f64> = rows.into_iter().flatten().collect();
    Ok(Tensor::from_vec(flat, (b, t), &Device::Cpu)?.to_dtype(DType::F32)?)
}

fn close(name: &str, got: f64, want: f64) {
    assert!(
        (got - want).abs() <= TOL * (1.0 + want.abs()),
        "{name}: got {got}, want {want}"
    );
}

fn close_all(name: &str, got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        close(&format!("{name}[{i}]"), *g, *w);
    }
}

fn grpo_config(case: &Value) -> GrpoConfig {
    let aggregation = match case["loss_type"].as_str().expect("loss_type") {
        "grpo" => LossAggregation::SequenceMeanTokenMean,
        "bnpo" | "dapo" => LossAggregation::TokenMean,
        "dr_grpo" => LossAggregation::SequenceSumNormalised {
            max_completion_len: case["max_completion_length"]
                .as_u64()
                .expect("max_completion_length") as usize,
        },
        other => panic!("unknown loss type {other}"),
    };
    let kl_estimator = match case["kl_estimator"].as_str().expect("kl_estimator") {
        "k1" => KlEstimator::K1,
        "k2" => KlEstimator::K2,
        _ => KlEstimator::K3,
    };
    GrpoConfig {
        eps_low: case["eps_low"].as_f64().expect("eps_low"),
        eps_high: case["eps_high"].as_f64().expect("eps_high"),
        dual_clip: case["delta"].as_f64(),
        kl_coef: case["beta"].as_f64().expect("beta"),
        kl_estimator,
        aggregation,
    }
}

#[test]
fn grpo_loss_metrics_and_gradients_match_trl() -> Result<()> {
    let fx = fixture()?;
    let cases = fx["grpo"].as_array().expect("grpo cases");
    assert!(cases.len() >= 8);
    for case in cases {
        let name = case["name"].as_str().expect("name");
        let cfg = grpo_config(case);
        let policy = Var::from_tensor(&t2(&case["policy"])?)?;
        let (behaviour, reference) = (t2(&case["behaviour"])?, t2(&case["reference"])?);
        let (advantages, mask, entropies) = (
            t1(&case["advantages"])?,
            t2(&case["mask"])?,
            t2(&case["entropies"])?,
        );
        let inputs = GrpoInputs {
            policy_logprobs: policy.as_tensor(),
            behaviour_logprobs: &behaviour,
            reference_logprobs: Some(&reference),
            advantages: &advantages,
            response_mask: &mask,
            token_entropies: Some(&entropies),
        };
        let out = grpo_loss(&inputs, &cfg)?;
        close(
            &format!("{name} loss"),
            out.loss.to_dtype(DType::F64)?.to_scalar()?,
            case["loss"].as_f64().expect("loss"),
        );
        let grads = out.loss.backward()?;
        let grad = grads
            .get(policy.as_tensor())
            .expect("policy grad")
            .to_dtype(DType::F64)?
            .to_vec2::<f64>()?;
        for (b, (g, w)) in grad.iter().zip(vec2(&case["grad"])).enumerate() {
            close_all(&format!("{name} grad row {b}"), g, &w);
        }
        let m = out.metrics;
        if let Some(kl) = case["kl"].as_f64() {
            close(&format!("{name} kl"), m.kl.expect("kl metric"), kl);
        }
        close(
            &format!("{name} clipfrac_low"),
            m.clipfrac_low,
            case["clipfrac_low"].as_f64().expect("low"),
        );
        close(
            &format!("{name} clipfrac_high"),
            m.clipfrac_high,
            case["clipfrac_high"].as_f64().expect("high"),
        );
        close(
            &format!("{name} entropy"),
            m.entropy.expect("entropy"),
            case["entropy"].as_f64().expect("entropy"),
        );
        let q = [
            m.ratio.min,
            m.ratio.p10,
            m.ratio.p50,
            m.ratio.p90,
            m.ratio.max,
        ];
        close_all(
            &format!("{name} ratio quantiles"),
            &q,
            &vec1(&case["ratio_quantiles"]),
        );
    }
    Ok(())
}

#[test]
fn grpo_without_kl_ignores_the_reference() -> Result<()> {
    // beta = 0 in TRL never reads ref_per_token_logps: the loss must not change when it is absent.
    let fx = fixture()?;
    let case = fx["grpo"]
        .as_array()
        .expect("cases")
        .iter()
        .find(|c| c["beta"].as_f64() == Some(0.0))
        .expect("beta 0");
    let cfg = grpo_config(case);
    let policy = t2(&case["policy"])?;
    let (behaviour, advantages, mask) = (
        t2(&case["behaviour"])?,
        t1(&case["advantages"])?,
        t2(&case["mask"])?,
    );
    let inputs = GrpoInputs {
        policy_logprobs: &policy,
        behaviour_logprobs: &behaviour,
        reference_logprobs: None,
        advantages: &advantages,
        response_mask: &mask,
        token_entropies: None,
    };
    let out = grpo_loss(&inputs, &cfg)?;
    close(
        "loss",
        out.loss.to_dtype(DType::F64)?.to_scalar()?,
        case["loss"].as_f64().expect("loss"),
    );
    assert_eq!(out.metrics.kl, None);
    Ok(())
}

#[test]
fn advantages_match_trl() -> Result<()> {
    let fx = fixture()?;
    for case in fx["advantages"].as_array().expect("advantage cases") {
        let g = case["group_size"].as_u64().expect("group_size") as usize;
        let rewards: Vec<Vec<f64>> = vec1(&case["rewards"])
            .chunks(g)
            .map(<[f64]>::to_vec)
            .collect();
        let scaling = match case["scaling"].as_str().expect("scaling") {
            "group" => AdvantageScaling::Group,
            "batch" => AdvantageScaling::Batch,
            _ => AdvantageScaling::None,
        };
        let cfg = AdvantageConfig {
            scaling,
            ..Default::default()
        };
        let out = group_advantages(&rewards, None, &cfg)?;
        let got: Vec<f64> = out.advantages.into_iter().flatten().collect();
        close_all(
            &format!("advantages {scaling:?}"),
            &got,
            &vec1(&case["advantages"]),
        );
        // Groups 0, 1 and 4 are constant: zero advantage whatever the scaling.
        assert_eq!(out.counts.zero_advantage(), 3, "{scaling:?}");
    }
    Ok(())
}

struct MpoTensors {
    policy_chosen: Var,
    policy_rejected: Var,
    reference_chosen: Tensor,
    reference_rejected: Tensor,
    chosen_lengths: Tensor,
}

impl MpoTensors {
    fn new(case: &Value) -> Result<Self> {
        Ok(Self {
            policy_chosen: Var::from_tensor(&t1(&case["policy_chosen"])?)?,
            policy_rejected: Var::from_tensor(&t1(&case["policy_rejected"])?)?,
            reference_chosen: t1(&case["reference_chosen"])?,
            reference_rejected: t1(&case["reference_rejected"])?,
            chosen_lengths: match case.get("chosen_lengths") {
                Some(v) => t1(v)?,
                None => t1(&case["policy_chosen"])?.ones_like()?,
            },
        })
    }

    fn inputs(&self) -> MpoInputs<'_> {
        MpoInputs {
            policy_chosen: self.policy_chosen.as_tensor(),
            policy_rejected: self.policy_rejected.as_tensor(),
            reference_chosen: &self.reference_chosen,
            reference_rejected: &self.reference_rejected,
            chosen_lengths: &self.chosen_lengths,
        }
    }

    fn grads(&self, loss: &Tensor) -> Result<(Vec<f64>, Vec<f64>)> {
        let grads = loss.backward()?;
        // candle prunes branches scaled by exactly 0 (a zero loss weight): no entry means a zero gradient.
        let get = |v: &Var| -> Result<Vec<f64>> {
            Ok(match grads.get(v.as_tensor()) {
                Some(g) => g.to_dtype(DType::F64)?.to_vec1::<f64>()?,
                None => vec![0.0; v.as_tensor().elem_count()],
            })
        };
        Ok((get(&self.policy_chosen)?, get(&self.policy_rejected)?))
    }
}

#[test]
fn mpo_matches_trl_dpo_trainer_sigmoid_bco_pair_sft() -> Result<()> {
    let fx = fixture()?;
    let case = &fx["mpo"];
    let t = MpoTensors::new(case)?;
    // TRL 1.16: loss_type [sigmoid, bco_pair, sft], weights [0.8, 0.2, 1.0]; its bco_pair has delta = 0 and its
    // sft is the batch token mean.
    let cfg = MpoConfig {
        sft_normalisation: SftNormalisation::BatchTokenMean,
        ..Default::default()
    };
    let out = mpo_loss_with_delta(&t.inputs(), &cfg, 0.0)?;
    close(
        "mpo loss",
        out.loss.to_dtype(DType::F64)?.to_scalar()?,
        case["loss_trl_delta0_batch_token_sft"]
            .as_f64()
            .expect("loss"),
    );
    let (gc, gr) = t.grads(&out.loss)?;
    close_all("grad chosen", &gc, &vec1(&case["grad_chosen"]));
    close_all("grad rejected", &gr, &vec1(&case["grad_rejected"]));

    // The paper's per-sequence SFT alone.
    let sft_only = MpoConfig {
        w_preference: 0.0,
        w_quality: 0.0,
        ..Default::default()
    };
    let out = mpo_loss_with_delta(&t.inputs(), &sft_only, 0.0)?;
    close(
        "sft per sequence",
        out.metrics.sft,
        case["sft_per_sequence"].as_f64().expect("sft"),
    );
    close(
        "sft total",
        out.metrics.total,
        case["sft_per_sequence"].as_f64().expect("sft"),
    );
    let (gc, gr) = t.grads(&out.loss)?;
    close_all(
        "sft grad chosen",
        &gc,
        &vec1(&case["sft_per_sequence_grad"]),
    );
    assert!(gr.iter().all(|g| *g == 0.0));
    Ok(())
}

#[test]
fn bco_running_mean_delta_matches_transcription() -> Result<()> {
    let fx = fixture()?;
    let case = &fx["bco_running"];
    let beta = case["beta"].as_f64().expect("beta");
    let cfg = MpoConfig {
        beta,
        w_preference: 0.0,
        w_quality: 1.0,
        w_generation: 0.0,
        ..Default::default()
    };
    let mut state = BcoRewardMean::default();
    for (i, step) in case["steps"].as_array().expect("steps").iter().enumerate() {
        let t = MpoTensors::new(step)?;
        let out = mpo_loss(&t.inputs(), &cfg, &mut state)?;
        close(
            &format!("step {i} delta"),
            out.metrics.delta,
            step["delta"].as_f64().expect("delta"),
        );
        close(
            &format!("step {i} bco"),
            out.metrics.bco,
            step["bco"].as_f64().expect("bco"),
        );
        let (gc, gr) = t.grads(&out.loss)?;
        close_all(
            &format!("step {i} grad chosen"),
            &gc,
            &vec1(&step["grad_chosen"]),
        );
        close_all(
            &format!("step {i} grad rejected"),
            &gr,
            &vec1(&step["grad_rejected"]),
        );
    }
    // The state survives a serde round trip.
    let back: BcoRewardMean = serde_json::from_str(&serde_json::to_string(&state)?)?;
    assert_eq!(back, state);
    Ok(())
}
