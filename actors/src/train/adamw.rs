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
//!
//! Mixed precision: a parameter held in bf16 or f16 (the model computes in that dtype) gets an f32 master
//! copy here, and its moments are f32. Each step updates the master in f32 from the gradient widened to f32,
//! then writes the master rounded to the parameter's dtype into the `Var`: an update smaller than the half
//! type's resolution still moves the master, and is not lost to rounding (apex / Megatron "O2" master
//! weights). An f32 or f64 parameter is its own master.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor, Var};
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

/// One parameter with its moments (and its f32 master copy when the parameter is bf16 or f16).
#[derive(Debug)]
struct Slot {
    name: String,
    var: Var,
    /// The f32 value the optimizer updates, for a half-precision `var` (which holds it rounded).
    master: Option<Tensor>,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// Whether a parameter of `dtype` gets an f32 master copy.
fn needs_master(dtype: DType) -> bool {
    matches!(dtype, DType::BF16 | DType::F16)
}

impl Slot {
    /// The dtype of the master (the parameter's own dtype when it has none) and of the moments.
    fn master_dtype(&self) -> DType {
        if needs_master(self.var.dtype()) {
            DType::F32
        } else {
            self.var.dtype()
        }
    }

    /// The value being optimised: the master, or the parameter itself.
    fn value(&self) -> Tensor {
        match &self.master {
            Some(master) => master.clone(),
            None => self.var.as_tensor().detach(),
        }
    }
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
    /// `(parameter name, f32 master weight)` of the half-precision parameters, in parameter order (empty when
    /// every parameter is f32 or f64).
    pub master: Vec<(String, Tensor)>,
}

/// The small JSON beside the moments file.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StepFile {
    step: u64,
    names: Vec<String>,
    /// Parameters with an f32 master weight (`master.<name>` in the moments file).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    master: Vec<String>,
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
                let master = needs_master(var.dtype())
                    .then(|| var.as_tensor().detach().to_dtype(DType::F32))
                    .transpose()?;
                let zeros = master
                    .as_ref()
                    .unwrap_or(var.as_tensor())
                    .detach()
                    .zeros_like()?;
                Ok(Slot {
                    name,
                    master,
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
        let mut masters: HashMap<String, Tensor> = state.master.into_iter().collect();
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
                let dtype = if needs_master(var.dtype()) {
                    DType::F32
                } else {
                    var.dtype()
                };
                Ok(moment.to_dtype(dtype)?.to_device(var.device())?)
            };
            let exp_avg = take(&mut first, "exp_avg")?;
            let exp_avg_sq = take(&mut second, "exp_avg_sq")?;
            // A half-precision parameter continues from its saved master; a state without one (saved by an
            // f32 run) starts the master from the parameter. An f32 parameter of a run saved in bf16 takes
            // the master's value (the checkpoint's model holds it rounded).
            let master = match (needs_master(var.dtype()), masters.contains_key(&name)) {
                (true, true) => Some(take(&mut masters, "master weight")?),
                (true, false) => Some(var.as_tensor().detach().to_dtype(DType::F32)?),
                (false, true) => {
                    var.set(&take(&mut masters, "master weight")?)?;
                    None
                }
                (false, false) => None,
            };
            slots.push(Slot {
                name,
                var,
                master,
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
            let grad = grad.detach().to_dtype(slot.master_dtype())?;
            let param = (slot.value() * (1.0 - lr * self.params.weight_decay))?;
            // lerp(m, g, w) = m + w * (g - m)
            slot.exp_avg = (&slot.exp_avg + ((&grad - &slot.exp_avg)? * (1.0 - beta1))?)?;
            slot.exp_avg_sq = ((&slot.exp_avg_sq * beta2)? + (grad.sqr()? * (1.0 - beta2))?)?;
            let denom = ((slot.exp_avg_sq.sqrt()? / bias_correction2_sqrt)? + self.params.eps)?;
            let update = ((&slot.exp_avg / denom)? * step_size)?;
            let param = (param - update)?;
            match &mut slot.master {
                Some(master) => {
                    slot.var.set(&param.to_dtype(slot.var.dtype())?)?;
                    *master = param;
                }
                None => slot.var.set(&param)?,
            }
        }
        Ok(())
    }

    /// Zeroes both moments and the step count, as a fresh optimizer over the same parameters would start;
    /// the f32 masters of half-precision parameters are kept (a fresh optimizer would re-read them from the
    /// rounded parameters).
    pub fn reset(&mut self) -> Result<()> {
        for slot in &mut self.slots {
            let zeros = slot.exp_avg.zeros_like()?;
            slot.exp_avg = zeros.clone();
            slot.exp_avg_sq = zeros;
        }
        self.step = 0;
        Ok(())
    }

    /// The f32 master weight of parameter `name`, when it is half precision (tests, diagnostics).
    pub fn master(&self, name: &str) -> Option<&Tensor> {
        let slot = self.slots.iter().find(|s| s.name == name)?;
        slot.master.as_ref()
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
            master: self
                .slots
                .iter()
                .filter_map(|s| Some((s.name.clone(), s.master.clone()?)))
                .collect(),
        }
    }
}

impl AdamWState {
    /// Writes `dir/adamw.safetensors` (`exp_avg.<name>`, `exp_avg_sq.<name>`, `master.<name>`) and
    /// `dir/adamw.json` (step, names).
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
        for (name, t) in &self.master {
            tensors.insert(format!("master.{name}"), t.clone());
        }
        candle_core::safetensors::save(&tensors, dir.join(MOMENTS_FILE))?;
        let step = StepFile {
            step: self.step,
            names: self.exp_avg.iter().map(|(n, _)| n.clone()).collect(),
            master: self.master.iter().map(|(n, _)| n.clone()).collect(),
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
        let master = step
            .master
            .iter()
            .map(|name| Ok((name.clone(), take(format!("master.{name}"))?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            step: step.step,
            exp_avg,
            exp_avg_sq,
            master,
        })
    }
}
