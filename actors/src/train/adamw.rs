//! AdamW with PyTorch `torch.optim.AdamW` semantics (decoupled weight decay, bias correction), whose state
//! can be checkpointed.
//!
//! Reference: torch's `_single_tensor_adamw` (the CPU path), per parameter:
//!
//! ```python
//! param.mul_(1 - lr * weight_decay)
//! exp_avg.lerp_(grad, 1 - beta1)
//! exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
//! step += 1
//! step_size = lr / (1 - beta1 ** step)
//! denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** step)).add_(eps)
//! param.addcdiv_(exp_avg, denom, value=-step_size)
//! ```
//!
//! Why not `candle_nn::AdamW`: its per-variable moments (`VarAdamW { first_moment, second_moment }`) and its
//! step counter are private fields with no accessor (candle-nn 0.11.1 `optim.rs`), so a checkpoint could not
//! hold them and a resumed run would restart the moments from zero. Here the moments are plain tensors that
//! [`AdamW::state`] hands out and [`AdamW::from_state`] takes back, bit for bit through a safetensors file.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// AdamW's hyper-parameters (the learning rate is given per step by the schedule).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    /// (beta1, beta2).
    pub betas: (f64, f64),
    /// Added to the denominator.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

/// One parameter with its moments.
#[derive(Debug)]
struct Slot {
    name: String,
    var: Var,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// The optimizer over named [`Var`]s.
#[derive(Debug)]
pub struct AdamW {
    slots: Vec<Slot>,
    step: u64,
    params: AdamWParams,
}

/// Everything AdamW needs to resume: the number of steps taken and both moments of every parameter.
#[derive(Debug, Clone)]
pub struct AdamWState {
    /// Steps taken so far.
    pub step: u64,
    /// `(parameter name, first moment)`, in parameter order.
    pub exp_avg: Vec<(String, Tensor)>,
    /// `(parameter name, second moment)`, in parameter order.
    pub exp_avg_sq: Vec<(String, Tensor)>,
}

/// The small JSON beside the moments file.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StepFile {
    step: u64,
    names: Vec<String>,
}

/// File names of a saved [`AdamWState`].
const MOMENTS_FILE: &str = "adamw.safetensors";
const STEP_FILE: &str = "adamw.json";

impl AdamW {
    /// A fresh optimizer (zero moments, step 0) over `vars`.
    pub fn new(vars: Vec<(String, Var)>, params: AdamWParams) -> Result<Self> {
        let slots = vars
            .into_iter()
            .map(|(name, var)| {
                let zeros = var.as_tensor().zeros_like()?;
                Ok(Slot {
                    name,
                    exp_avg: zeros.clone(),
                    exp_avg_sq: zeros,
                    var,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            slots,
            step: 0,
            params,
        })
    }

    /// An optimizer over `vars` that continues from `state` (moments matched by name and shape).
    pub fn from_state(
        vars: Vec<(String, Var)>,
        params: AdamWParams,
        state: AdamWState,
    ) -> Result<Self> {
        let mut first: HashMap<String, Tensor> = state.exp_avg.into_iter().collect();
        let mut second: HashMap<String, Tensor> = state.exp_avg_sq.into_iter().collect();
        if first.len() != vars.len() || second.len() != vars.len() {
            return Err(Error::msg(format!(
                "optimizer state holds moments of {} / {} parameters, the model trains {}",
                first.len(),
                second.len(),
                vars.len()
            )));
        }
        let mut slots = Vec::with_capacity(vars.len());
        for (name, var) in vars {
            let take = |map: &mut HashMap<String, Tensor>, which: &str| -> Result<Tensor> {
                let moment = map.remove(&name).ok_or_else(|| {
                    Error::msg(format!(
                        "optimizer state has no {which} for parameter `{name}`"
                    ))
                })?;
                if moment.dims() != var.dims() {
                    return Err(Error::msg(format!(
                        "optimizer state: {which} of `{name}` has shape {:?}, the parameter {:?}",
                        moment.dims(),
                        var.dims()
                    )));
                }
                Ok(moment.to_dtype(var.dtype())?.to_device(var.device())?)
            };
            let exp_avg = take(&mut first, "exp_avg")?;
            let exp_avg_sq = take(&mut second, "exp_avg_sq")?;
            slots.push(Slot {
                name,
                var,
                exp_avg,
                exp_avg_sq,
            });
        }
        Ok(Self {
            slots,
            step: state.step,
            params,
        })
    }

    /// Steps taken so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// The parameters, by name, in order.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.slots.iter().map(|s| (s.name.as_str(), &s.var))
    }

    /// One update with learning rate `lr`; `grads[i]` is the gradient of the i-th parameter.
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        if grads.len() != self.slots.len() {
            return Err(Error::msg(format!(
                "AdamW got {} gradients for {} parameters",
                grads.len(),
                self.slots.len()
            )));
        }
        self.step += 1;
        let (beta1, beta2) = self.params.betas;
        let step_size = lr / (1.0 - beta1.powi(self.step as i32));
        let bias_correction2_sqrt = (1.0 - beta2.powi(self.step as i32)).sqrt();
        for (slot, grad) in self.slots.iter_mut().zip(grads) {
            if grad.dims() != slot.var.dims() {
                return Err(Error::msg(format!(
                    "gradient of `{}` has shape {:?}, the parameter {:?}",
                    slot.name,
                    grad.dims(),
                    slot.var.dims()
                )));
            }
            let grad = grad.detach().to_dtype(slot.var.dtype())?;
            let param = (slot.var.as_tensor().detach() * (1.0 - lr * self.params.weight_decay))?;
            // lerp(m, g, w) = m + w * (g - m)
            slot.exp_avg = (&slot.exp_avg + ((&grad - &slot.exp_avg)? * (1.0 - beta1))?)?;
            slot.exp_avg_sq = ((&slot.exp_avg_sq * beta2)? + (grad.sqr()? * (1.0 - beta2))?)?;
            let denom = ((slot.exp_avg_sq.sqrt()? / bias_correction2_sqrt)? + self.params.eps)?;
            let update = ((&slot.exp_avg / denom)? * step_size)?;
            slot.var.set(&(param - update)?)?;
        }
        Ok(())
    }

    /// The state to checkpoint (moments are shared, not copied: they are replaced, never written in place).
    pub fn state(&self) -> AdamWState {
        AdamWState {
            step: self.step,
            exp_avg: self
                .slots
                .iter()
                .map(|s| (s.name.clone(), s.exp_avg.clone()))
                .collect(),
            exp_avg_sq: self
                .slots
                .iter()
                .map(|s| (s.name.clone(), s.exp_avg_sq.clone()))
                .collect(),
        }
    }
}

impl AdamWState {
    /// Writes `dir/adamw.safetensors` (`exp_avg.<name>`, `exp_avg_sq.<name>`) and `dir/adamw.json` (step).
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for (name, t) in &self.exp_avg {
            tensors.insert(format!("exp_avg.{name}"), t.clone());
        }
        for (name, t) in &self.exp_avg_sq {
            tensors.insert(format!("exp_avg_sq.{name}"), t.clone());
        }
        candle_core::safetensors::save(&tensors, dir.join(MOMENTS_FILE))?;
        let step = StepFile {
            step: self.step,
            names: self.exp_avg.iter().map(|(n, _)| n.clone()).collect(),
        };
        let path = dir.join(STEP_FILE);
        let text = serde_json::to_string_pretty(&step).map_err(|source| Error::Json {
            path: path.clone(),
            source,
        })?;
        std::fs::write(&path, text).map_err(|source| Error::Io { path, source })
    }

    /// Reads what [`Self::save`] wrote (tensors on the CPU).
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(STEP_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let step: StepFile = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.clone(),
            source,
        })?;
        let moments_path = dir.join(MOMENTS_FILE);
        let mut tensors = candle_core::safetensors::load(&moments_path, &candle_core::Device::Cpu)
            .map_err(|err| Error::Checkpoint {
                path: moments_path.clone(),
                msg: err.to_string(),
            })?;
        let mut take = |key: String| {
            tensors.remove(&key).ok_or_else(|| Error::Checkpoint {
                path: moments_path.clone(),
                msg: format!("missing tensor `{key}`"),
            })
        };
        let mut exp_avg = Vec::with_capacity(step.names.len());
        let mut exp_avg_sq = Vec::with_capacity(step.names.len());
        for name in &step.names {
            exp_avg.push((name.clone(), take(format!("exp_avg.{name}"))?));
            exp_avg_sq.push((name.clone(), take(format!("exp_avg_sq.{name}"))?));
        }
        Ok(Self {
            step: step.step,
            exp_avg,
            exp_avg_sq,
        })
    }
}
