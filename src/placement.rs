//! `[placement]`: which devices each role of a run uses, on one box.
//!
//! ```toml
//! [placement]
//! generator = ["cuda:0", "cuda:1"]   # one PolicyGenerator per device; a step's prompts are split across them
//! trainer = ["cuda:2", "cuda:3"]     # one Optimizer shard per device; the batch is split, gradients averaged
//! reward_model = ["cuda:1"]          # the reward model's device
//! ```
//!
//! Each role takes `"all"` (the default: every local GPU, else `model.device`, the CPU unless set) or a list of device names: `cpu`,
//! `cpu:N` (simulated CPU devices: the multi-device logic, data parallelism included, runs on a CPU-only
//! machine) or `cuda:N`. A bad name, a device listed twice, or a GPU index past the GPUs present is an
//! error naming the key (`placement.trainer[1]`).

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A role's devices as written: `"all"` or a list of names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Devices {
    /// `"all"`.
    Named(String),
    /// `["cuda:0", ...]`.
    List(Vec<String>),
}

impl Default for Devices {
    fn default() -> Self {
        Self::Named("all".into())
    }
}

/// `[placement]`: the devices of each role.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlacementSection {
    /// The policy generators' devices (one generator each).
    pub generator: Devices,
    /// The optimizer shards' devices (data parallel: one shard each).
    pub trainer: Devices,
    /// The reward model's device (a list of one; `"all"`: the first local GPU, else the CPU).
    pub reward_model: Devices,
}

/// One resolved device: its name as configured (`cpu:1`) and the candle device.
#[derive(Debug, Clone)]
pub struct Placed {
    /// The name (logs, errors).
    pub name: String,
    /// The device tensors go to.
    pub device: Device,
}

/// The devices of every role, resolved against the GPUs present.
#[derive(Debug, Clone)]
pub struct Placement {
    /// One per policy generator.
    pub generator: Vec<Placed>,
    /// One per optimizer shard.
    pub trainer: Vec<Placed>,
    /// The reward model's.
    pub reward_model: Placed,
}

/// How many CUDA devices this process can use (0 in a build without CUDA).
pub fn local_gpu_count() -> usize {
    if !candle_core::utils::cuda_is_available() {
        return 0;
    }
    (0..).take_while(|&i| Device::new_cuda(i).is_ok()).count()
}

fn invalid(key: &str, msg: impl Into<String>) -> Error {
    Error::Actors(r1v2_actors::Error::Config {
        key: key.into(),
        msg: msg.into(),
    })
}

/// Parses one device name (`cpu`, `cpu:N`, `cuda:N`) at `key`, with `gpus` GPUs present; opens a CUDA device
/// only when `create` (else stands in the CPU: a check of the names alone).
fn parse(name: &str, key: &str, gpus: usize, create: bool) -> Result<Device> {
    if name == "cpu" {
        return Ok(Device::Cpu);
    }
    if let Some(index) = name.strip_prefix("cpu:") {
        return match index.parse::<usize>() {
            Ok(_) => Ok(Device::Cpu),
            Err(_) => Err(invalid(
                key,
                format!("`{name}`: expected cpu:N with N a number"),
            )),
        };
    }
    if let Some(index) = name.strip_prefix("cuda:") {
        let Ok(index) = index.parse::<usize>() else {
            return Err(invalid(
                key,
                format!("`{name}`: expected cuda:N with N a number"),
            ));
        };
        if gpus == 0 {
            return Err(invalid(
                key,
                format!("`{name}`: no GPU found (a build without the `cuda` feature sees none)"),
            ));
        }
        if index >= gpus {
            return Err(invalid(
                key,
                format!(
                    "`{name}`: only {gpus} GPU(s) present (cuda:0..cuda:{})",
                    gpus - 1
                ),
            ));
        }
        return if create {
            Device::new_cuda(index).map_err(|e| invalid(key, format!("`{name}`: {e}")))
        } else {
            Ok(Device::Cpu)
        };
    }
    Err(invalid(
        key,
        format!("unknown device `{name}` (expected \"all\", cpu, cpu:N or cuda:N)"),
    ))
}

impl Devices {
    /// The role's devices at `key` with `gpus` GPUs present: `"all"` is every GPU, else `fallback`.
    fn resolve(&self, key: &str, gpus: usize, fallback: &str, create: bool) -> Result<Vec<Placed>> {
        let names: Vec<String> = match self {
            Self::Named(name) if name == "all" => {
                if gpus == 0 {
                    vec![fallback.to_string()]
                } else {
                    (0..gpus).map(|i| format!("cuda:{i}")).collect()
                }
            }
            Self::Named(name) => vec![name.clone()],
            Self::List(names) => names.clone(),
        };
        if names.is_empty() {
            return Err(invalid(
                key,
                "no device given (use \"all\" or a list of devices)",
            ));
        }
        let mut placed: Vec<Placed> = Vec::with_capacity(names.len());
        for (i, name) in names.iter().enumerate() {
            let at = match self {
                Self::List(_) => format!("{key}[{i}]"),
                Self::Named(_) => key.to_string(),
            };
            if placed.iter().any(|p| p.name == *name) {
                return Err(invalid(&at, format!("`{name}` is listed twice")));
            }
            placed.push(Placed {
                name: name.clone(),
                device: parse(name, &at, gpus, create)?,
            });
        }
        Ok(placed)
    }
}

impl PlacementSection {
    /// Every role's devices, with `gpus` GPUs present (see [`local_gpu_count`]); a role left at `"all"`
    /// without GPUs takes `fallback` (`model.device`).
    pub fn resolve(&self, gpus: usize, fallback: &str) -> Result<Placement> {
        self.place(gpus, fallback, true)
    }

    /// Checks every role's device names against `gpus` GPUs without opening any device.
    pub fn check(&self, gpus: usize, fallback: &str) -> Result<()> {
        self.place(gpus, fallback, false).map(|_| ())
    }

    fn place(&self, gpus: usize, fallback: &str, create: bool) -> Result<Placement> {
        let mut reward =
            self.reward_model
                .resolve("placement.reward_model", gpus, fallback, create)?;
        if reward.len() > 1 {
            if let Devices::List(_) = self.reward_model {
                return Err(invalid(
                    "placement.reward_model",
                    "the reward model runs on one device: give a list of one",
                ));
            }
        }
        Ok(Placement {
            generator: self
                .generator
                .resolve("placement.generator", gpus, fallback, create)?,
            trainer: self
                .trainer
                .resolve("placement.trainer", gpus, fallback, create)?,
            reward_model: reward.swap_remove(0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(text: &str) -> PlacementSection {
        toml::from_str(text).unwrap()
    }

    fn error(text: &str, gpus: usize) -> String {
        section(text).check(gpus, "cpu").unwrap_err().to_string()
    }

    #[test]
    fn all_is_every_gpu_else_the_cpu_and_lists_keep_their_order() {
        let cpu_only = section("").resolve(0, "cpu").unwrap();
        assert_eq!(cpu_only.generator.len(), 1);
        assert_eq!(cpu_only.generator[0].name, "cpu");
        assert_eq!(cpu_only.trainer[0].name, "cpu");
        assert_eq!(cpu_only.reward_model.name, "cpu");
        let simulated = section(
            "generator = [\"cpu:0\", \"cpu:1\"]\ntrainer = [\"cpu:1\", \"cpu:0\", \"cpu:2\"]",
        )
        .resolve(0, "cpu")
        .unwrap();
        let names: Vec<&str> = simulated.trainer.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["cpu:1", "cpu:0", "cpu:2"]);
        assert_eq!(simulated.generator.len(), 2);
        assert!(simulated.trainer.iter().all(|p| p.device.is_cpu()));
    }

    #[test]
    fn bad_names_duplicates_and_missing_gpus_are_errors_naming_the_key() {
        let e = error("trainer = [\"cpu:0\", \"gpu:1\"]", 0);
        assert!(
            e.contains("placement.trainer[1]") && e.contains("gpu:1"),
            "{e}"
        );
        let e = error("generator = [\"cpu:0\", \"cpu:0\"]", 0);
        assert!(
            e.contains("placement.generator[1]") && e.contains("twice"),
            "{e}"
        );
        let e = error("reward_model = [\"cuda:0\"]", 0);
        assert!(
            e.contains("placement.reward_model[0]") && e.contains("no GPU"),
            "{e}"
        );
        let e = error("trainer = [\"cuda:0\", \"cuda:3\"]", 2);
        assert!(
            e.contains("placement.trainer[1]") && e.contains("only 2 GPU"),
            "{e}"
        );
        let e = error("trainer = []", 0);
        assert!(
            e.contains("placement.trainer") && e.contains("no device"),
            "{e}"
        );
        let e = error("generator = \"everything\"", 0);
        assert!(
            e.contains("placement.generator") && e.contains("everything"),
            "{e}"
        );
        let e = error("reward_model = [\"cpu:0\", \"cpu:1\"]", 0);
        assert!(e.contains("one device"), "{e}");
        assert!(toml::from_str::<PlacementSection>("trainers = [\"cpu\"]").is_err());
    }
}
