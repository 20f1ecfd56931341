//! Typed configuration of the RL algorithms (r1v2-method.md sections 2-5).
//!
//! Every struct is serde with `deny_unknown_fields`, has a `Default` holding the documented default and a
//! `validate` that names the offending key. Where the paper gives no number the field says where the default
//! comes from.

use serde::{Deserialize, Serialize};

use crate::Result;

use crate::error::check;

/// How group advantages are scaled after subtracting the group mean (TRL `scale_rewards`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AdvantageScaling {
    /// Divide by the group's standard deviation (the paper's Eq. for A_i, TRL "group").
    #[default]
    Group,
    /// Divide by the standard deviation of the whole batch (TRL "batch").
    Batch,
    /// No division (Dr.GRPO, TRL "none").
    None,
}

/// Group-relative advantage options.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdvantageConfig {
    /// Which standard deviation divides `r - mean(group)`.
    pub scaling: AdvantageScaling,
    /// Added to the standard deviation before dividing (TRL uses 1e-4).
    pub eps: f64,
    /// A group whose every |A_i| is at most this counts as zero-advantage (no gradient).
    pub zero_tolerance: f64,
}

impl Default for AdvantageConfig {
    fn default() -> Self {
        Self {
            scaling: AdvantageScaling::Group,
            eps: 1e-4,
            zero_tolerance: 1e-6,
        }
    }
}

impl AdvantageConfig {
    /// Checks every field; the error names the key.
    pub fn validate(&self) -> Result<()> {
        check(self.eps >= 0.0, "advantage.eps", "must be >= 0")?;
        check(
            self.zero_tolerance >= 0.0,
            "advantage.zero_tolerance",
            "must be >= 0",
        )
    }
}

/// Estimator of the per-token KL(pi || pi_ref) from sampled tokens (Schulman's k1 / k2 / k3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum KlEstimator {
    /// `log pi - log pi_ref` (unbiased, high variance, can be negative).
    K1,
    /// `0.5 * (log pi - log pi_ref)^2`.
    K2,
    /// `exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1` (TRL GRPO, the paper's choice).
    #[default]
    K3,
}

/// How per-token GRPO losses are reduced to one scalar.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LossAggregation {
    /// Token mean per sequence, then mean over sequences (the paper's Eq. 8, TRL "grpo").
    #[default]
    SequenceMeanTokenMean,
    /// Token mean over every unmasked token of the batch (TRL "bnpo", and "dapo" on one process).
    TokenMean,
    /// Sum over all unmasked tokens divided by `batch_size * max_completion_len` (Dr.GRPO, TRL "dr_grpo").
    SequenceSumNormalised {
        /// The constant length normaliser (TRL: `max_completion_length`).
        max_completion_len: usize,
    },
}

/// GRPO surrogate loss options (r1v2-method.md section 3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpoConfig {
    /// Lower clip range: ratios below `1 - eps_low` stop pushing down negative advantages (paper: 0.2).
    pub eps_low: f64,
    /// Upper clip range: ratios above `1 + eps_high` stop pushing up positive advantages (0.2; clip-higher 0.28).
    pub eps_high: f64,
    /// Dual-clip bound c > 1 + eps_high: the ratio is capped at c, bounding the loss of negative advantages
    /// (Ye et al. 2020; TRL's `delta`). None disables it.
    pub dual_clip: Option<f64>,
    /// KL coefficient to the reference policy (the paper gives none: 1e-3). 0 means no reference is needed.
    pub kl_coef: f64,
    /// Which per-token KL estimator is used.
    pub kl_estimator: KlEstimator,
    /// How per-token losses become one scalar.
    pub aggregation: LossAggregation,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        Self {
            eps_low: 0.2,
            eps_high: 0.2,
            dual_clip: None,
            kl_coef: 1e-3,
            kl_estimator: KlEstimator::K3,
            aggregation: LossAggregation::SequenceMeanTokenMean,
        }
    }
}

impl GrpoConfig {
    /// Checks every field; the error names the key.
    pub fn validate(&self) -> Result<()> {
        check(
            (0.0..1.0).contains(&self.eps_low),
            "grpo.eps_low",
            "must be in [0, 1)",
        )?;
        check(self.eps_high >= 0.0, "grpo.eps_high", "must be >= 0")?;
        if let Some(c) = self.dual_clip {
            check(
                c > 1.0 + self.eps_high,
                "grpo.dual_clip",
                "must exceed 1 + eps_high",
            )?;
        }
        check(self.kl_coef >= 0.0, "grpo.kl_coef", "must be >= 0")?;
        if let LossAggregation::SequenceSumNormalised { max_completion_len } = self.aggregation {
            check(
                max_completion_len > 0,
                "grpo.aggregation.max_completion_len",
                "must be > 0",
            )?;
        }
        Ok(())
    }
}

/// How the SFT term of MPO is length-normalised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SftNormalisation {
    /// `-log pi(y_c|x) / |y_c|` per pair, then mean over pairs (the paper).
    #[default]
    PerSequence,
    /// Sum of chosen log-probs over the sum of chosen lengths (TRL DPOTrainer's "sft" loss type).
    BatchTokenMean,
}

/// Mixed Preference Optimisation (r1v2-method.md section 2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MpoConfig {
    /// beta of h(y) = beta * (log pi - log pi_ref) (paper / InternVL MPO: 0.1).
    pub beta: f64,
    /// Weight of the DPO sigmoid preference loss (0.8).
    pub w_preference: f64,
    /// Weight of the BCO quality loss (0.2).
    pub w_quality: f64,
    /// Weight of the SFT generation loss (1.0).
    pub w_generation: f64,
    /// Length normalisation of the SFT term.
    pub sft_normalisation: SftNormalisation,
    /// Minimum chosen-minus-rejected score margin of a mined pair (the paper's "MPO threshold": 15 on the
    /// reward model's raw scale; the score passed to pair mining must be on that scale for 15 to mean it).
    pub min_margin: f64,
    /// Refresh the frozen reference to the current policy at the start of each MPO round (paper: optional).
    pub refresh_reference_each_round: bool,
}

impl Default for MpoConfig {
    fn default() -> Self {
        Self {
            beta: 0.1,
            w_preference: 0.8,
            w_quality: 0.2,
            w_generation: 1.0,
            sft_normalisation: SftNormalisation::PerSequence,
            min_margin: 15.0,
            refresh_reference_each_round: false,
        }
    }
}

impl MpoConfig {
    /// Checks every field; the error names the key.
    pub fn validate(&self) -> Result<()> {
        check(self.beta > 0.0, "mpo.beta", "must be > 0")?;
        check(self.w_preference >= 0.0, "mpo.w_preference", "must be >= 0")?;
        check(self.w_quality >= 0.0, "mpo.w_quality", "must be >= 0")?;
        check(self.w_generation >= 0.0, "mpo.w_generation", "must be >= 0")?;
        check(self.min_margin >= 0.0, "mpo.min_margin", "must be >= 0")
    }
}

/// How the reward model's raw score is normalised before capping (the g of the hybrid reward).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RmNormalisation {
    /// z-score within each group of G responses (population std).
    #[default]
    PerGroup,
    /// z-score over the whole batch.
    PerBatch,
    /// A fixed affine map `scale * raw + offset`.
    Affine {
        /// Multiplies the raw score.
        scale: f64,
        /// Added after scaling.
        offset: f64,
    },
}

/// The hybrid reward r = w_rule*rule + w_rm*g(rm) + w_format*format (r1v2-method.md section 3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RewardConfig {
    /// Weight of the rule verifier's reward (paper: plain sum, 1.0).
    pub w_rule: f64,
    /// Weight of the format reward (paper: plain sum, 1.0).
    pub w_format: f64,
    /// Normalisation of the RM raw score.
    pub rm_normalisation: RmNormalisation,
    /// Added to the std of z-score normalisations.
    pub rm_eps: f64,
    /// Zero the RM term of a response that the rule verifier says is wrong (stops the RM rewarding confident
    /// wrong answers).
    pub gate_rm_on_wrong: bool,
    /// The initial calibration (RM weight and cap); the hallucination monitor may move it.
    pub calibration: Calibration,
}

impl Default for RewardConfig {
    fn default() -> Self {
        Self {
            w_rule: 1.0,
            w_format: 1.0,
            rm_normalisation: RmNormalisation::PerGroup,
            rm_eps: 1e-6,
            gate_rm_on_wrong: false,
            calibration: Calibration::default(),
        }
    }
}

impl RewardConfig {
    /// Checks every field; the error names the key.
    pub fn validate(&self) -> Result<()> {
        check(self.rm_eps >= 0.0, "reward.rm_eps", "must be >= 0")?;
        if let RmNormalisation::Affine { scale, offset } = self.rm_normalisation {
            check(
                scale.is_finite() && offset.is_finite(),
                "reward.rm_normalisation",
                "must be finite",
            )?;
        }
        self.calibration.validate()
    }
}

/// The calibrated RM contribution (r1v2-method.md section 5): normalised RM scores are capped at
/// `rm_threshold` and weighted by `rm_weight`. The hallucination monitor tightens both.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Calibration {
    /// Upper cap on the normalised RM score (1.0: one std above the group mean, the scale of a rule reward).
    pub rm_threshold: f64,
    /// Weight of the capped RM term (paper: plain sum, 1.0).
    pub rm_weight: f64,
}

impl Default for Calibration {
    fn default() -> Self {
        Self {
            rm_threshold: 1.0,
            rm_weight: 1.0,
        }
    }
}

impl Calibration {
    /// Checks every field; the error names the key.
    pub fn validate(&self) -> Result<()> {
        check(
            !self.rm_threshold.is_nan(),
            "reward.calibration.rm_threshold",
            "must not be NaN",
        )?;
        check(
            self.rm_weight >= 0.0,
            "reward.calibration.rm_weight",
            "must be >= 0",
        )
    }
}

/// Which stored group leaves the Selective Sample Buffer when it is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Eviction {
    /// The lowest-priority group (ties: the oldest) leaves: the buffer keeps the most informative groups.
    #[default]
    LowestPriority,
    /// The oldest group (lowest policy version, then earliest insertion) leaves: a FIFO.
    Oldest,
}

/// Selective Sample Buffer (r1v2-method.md section 4; VL-Rethinker's selective sample replay).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SsbConfig {
    /// `false`: no buffer (plain GRPO, the ablation): every fresh group trains, zero-advantage groups
    /// included, and nothing is replayed (default true).
    pub enabled: bool,
    /// Priority exponent: priority = (mean |A| of the group)^alpha (paper: 1).
    pub alpha: f64,
    /// Maximum number of stored groups (VL-Rethinker: half a batch; 64 for a 128-group batch).
    pub capacity: usize,
    /// Which group leaves when the buffer is full.
    pub eviction: Eviction,
    /// Groups generated more than this many policy versions ago are dropped (not given: 4).
    pub max_staleness: u64,
    /// At most this share of a batch's target may be replayed groups (not given: 0.5).
    pub max_replay_share: f64,
    /// How many times one stored group may be replayed before it leaves the buffer (not given: 1).
    pub max_replays_per_group: u32,
    /// A group whose every |A_i| is at most this is a zero-advantage group.
    pub zero_tolerance: f64,
    /// Seed of the ChaCha RNG of the weighted sampling.
    pub seed: u64,
}

impl Default for SsbConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            alpha: 1.0,
            capacity: 64,
            eviction: Eviction::LowestPriority,
            max_staleness: 4,
            max_replay_share: 0.5,
            max_replays_per_group: 1,
            zero_tolerance: 1e-6,
            seed: 0,
        }
    }
}

impl SsbConfig {
    /// Checks every field; the error names the key.
    pub fn validate(&self) -> Result<()> {
        check(
            self.alpha >= 0.0 && self.alpha.is_finite(),
            "ssb.alpha",
            "must be finite and >= 0",
        )?;
        check(
            (0.0..=1.0).contains(&self.max_replay_share),
            "ssb.max_replay_share",
            "must be in [0, 1]",
        )?;
        check(
            self.max_replays_per_group > 0,
            "ssb.max_replays_per_group",
            "must be > 0",
        )?;
        check(
            self.zero_tolerance >= 0.0,
            "ssb.zero_tolerance",
            "must be >= 0",
        )
    }
}

/// The RL algorithms' section of the run config: one struct per algorithm.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RlConfig {
    /// Group-relative advantages.
    pub advantage: AdvantageConfig,
    /// GRPO surrogate and KL.
    pub grpo: GrpoConfig,
    /// MPO losses and pair mining.
    pub mpo: MpoConfig,
    /// Hybrid reward.
    pub reward: RewardConfig,
    /// Selective Sample Buffer.
    pub ssb: SsbConfig,
}

impl RlConfig {
    /// Checks every section; the error names the key.
    pub fn validate(&self) -> Result<()> {
        self.advantage.validate()?;
        self.grpo.validate()?;
        self.mpo.validate()?;
        self.reward.validate()?;
        self.ssb.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_unknown_keys_are_rejected() {
        GrpoConfig::default().validate().unwrap();
        MpoConfig::default().validate().unwrap();
        RewardConfig::default().validate().unwrap();
        SsbConfig::default().validate().unwrap();
        AdvantageConfig::default().validate().unwrap();
        let full: RlConfig = serde_json::from_str(
            r#"{"grpo": {"eps_high": 0.28}, "reward": {"calibration": {"rm_threshold": 0.5}}}"#,
        )
        .unwrap();
        full.validate().unwrap();
        assert_eq!(full.grpo.eps_high, 0.28);
        assert_eq!(full.reward.calibration.rm_threshold, 0.5);
        assert_eq!(full.mpo, MpoConfig::default());
        let err = serde_json::from_str::<RlConfig>(r#"{"ssb": {"capacty": 3}}"#).unwrap_err();
        assert!(err.to_string().contains("capacty"), "{err}");
        let bad = RlConfig {
            ssb: SsbConfig {
                max_replay_share: 2.0,
                ..Default::default()
            },
            ..Default::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("ssb.max_replay_share"));
        let err = serde_json::from_str::<GrpoConfig>(r#"{"eps_lo": 0.2}"#).unwrap_err();
        assert!(err.to_string().contains("eps_lo"), "{err}");
        let cfg: GrpoConfig = serde_json::from_str(
            r#"{"aggregation": {"sequence_sum_normalised": {"max_completion_len": 8}}}"#,
        )
        .unwrap();
        assert_eq!(
            cfg.aggregation,
            LossAggregation::SequenceSumNormalised {
                max_completion_len: 8
            }
        );
        let bad = GrpoConfig {
            dual_clip: Some(1.1),
            ..Default::default()
        };
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("grpo.dual_clip"), "{err}");
    }
}
