//! The Selective Sample Buffer (r1v2-method.md section 4; VL-Rethinker's selective sample replay).
//!
//! "Vanishing advantages": a group whose G responses are all right or all wrong has A_i = 0 for every i and
//! gives no gradient. Per batch the buffer
//! 1. drops zero-advantage groups (so they count in no loss denominator and no KL term) and counts them by kind;
//! 2. drops stored groups older than `max_staleness` policy versions;
//! 3. when fewer informative groups than the target remain, fills the batch by weighted sampling WITHOUT
//!    replacement from the buffer, priority = (mean |A| of the group)^alpha, at most
//!    `floor(max_replay_share * target)` replayed groups; a stored group leaves after `max_replays_per_group`
//!    replays;
//! 4. stores this batch's informative groups (after sampling, so a batch never replays itself); over capacity
//!    it evicts by [`Eviction`]: the lowest priority (ties: oldest) or the oldest (lowest version, then earliest
//!    inserted).
//!
//! The whole state, RNG position included, is serde-serialisable for checkpoints.

use rand::Rng;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::advantages::GroupKindCounts;
use super::config::{Eviction, SsbConfig};
use super::group::Group;
use super::PromptId;
use crate::{Error, Result};

/// A stored group and its bookkeeping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BufferedGroup {
    /// The group.
    pub group: Group,
    /// (mean |A|)^alpha.
    pub priority: f64,
    /// Insertion counter (for FIFO ties).
    pub inserted: u64,
    /// Times it was replayed.
    pub replays: u32,
}

/// A position of the ChaCha8 stream (seed, stream, word position), serialisable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RngSnapshot {
    /// The 32-byte seed.
    pub seed: [u8; 32],
    /// The stream id.
    pub stream: u64,
    /// High 64 bits of the word position.
    pub word_pos_hi: u64,
    /// Low 64 bits of the word position.
    pub word_pos_lo: u64,
}

impl RngSnapshot {
    fn of(rng: &ChaCha8Rng) -> Self {
        let pos = rng.get_word_pos();
        Self {
            seed: rng.get_seed(),
            stream: rng.get_stream(),
            word_pos_hi: (pos >> 64) as u64,
            word_pos_lo: pos as u64,
        }
    }

    fn restore(&self) -> ChaCha8Rng {
        let mut rng = ChaCha8Rng::from_seed(self.seed);
        rng.set_stream(self.stream);
        rng.set_word_pos((u128::from(self.word_pos_hi) << 64) | u128::from(self.word_pos_lo));
        rng
    }
}

/// The buffer's serialisable state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SsbState {
    /// Its configuration.
    pub config: SsbConfig,
    /// Stored groups.
    pub entries: Vec<BufferedGroup>,
    /// Next insertion counter.
    pub next_insertion: u64,
    /// RNG position.
    pub rng: RngSnapshot,
}

/// What one call to [`SelectiveSampleBuffer::fill_batch`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct SsbMetrics {
    /// Groups sampled this step.
    pub fresh_groups: usize,
    /// Their kinds (zero-advantage groups dropped, by kind).
    pub kinds: GroupKindCounts,
    /// Informative fresh groups / target.
    pub effective_share_before: f64,
    /// (informative fresh + replayed) / target.
    pub effective_share_after: f64,
    /// Groups replayed from the buffer.
    pub replayed: usize,
    /// Stored groups after this step.
    pub buffer_size: usize,
    /// Mean age in policy versions of the stored groups after this step.
    pub mean_age: f64,
    /// Stored groups dropped as stale this step.
    pub evicted_stale: usize,
    /// Stored groups evicted for capacity this step.
    pub evicted_capacity: usize,
}

/// A batch of informative groups.
#[derive(Debug, Clone, PartialEq)]
pub struct SsbBatch {
    /// Fresh informative groups first, then replayed ones.
    pub groups: Vec<Group>,
    /// Number of replayed groups at the end of `groups`.
    pub replayed: usize,
    /// What happened.
    pub metrics: SsbMetrics,
}

/// Draws `k` distinct indices; each draw picks a remaining index with probability proportional to its
/// weight (successive sampling). Zero weights are never drawn; fewer than `k` come back when fewer positive
/// weights exist.
pub fn weighted_sample_without_replacement<R: Rng>(
    rng: &mut R,
    weights: &[f64],
    k: usize,
) -> Vec<usize> {
    let mut remaining: Vec<f64> = weights
        .iter()
        .map(|&w| if w.is_finite() && w > 0.0 { w } else { 0.0 })
        .collect();
    let mut picked = Vec::with_capacity(k);
    while picked.len() < k {
        let total: f64 = remaining.iter().sum();
        if total <= 0.0 {
            break;
        }
        let mut u = rng.gen::<f64>() * total;
        let mut choice = None;
        for (i, &w) in remaining.iter().enumerate() {
            if w > 0.0 {
                choice = Some(i);
                if u < w {
                    break;
                }
                u -= w;
            }
        }
        // total > 0, so some weight is positive and `choice` is set (the last positive one on rounding).
        let Some(i) = choice else { break };
        remaining[i] = 0.0;
        picked.push(i);
    }
    picked
}

/// The Selective Sample Buffer.
#[derive(Debug, Clone)]
pub struct SelectiveSampleBuffer {
    config: SsbConfig,
    entries: Vec<BufferedGroup>,
    next_insertion: u64,
    rng: ChaCha8Rng,
}

impl SelectiveSampleBuffer {
    /// An empty buffer; its RNG is seeded from `config.seed`.
    pub fn new(config: SsbConfig) -> Result<Self> {
        config.validate()?;
        let rng = ChaCha8Rng::seed_from_u64(config.seed);
        Ok(Self {
            config,
            entries: Vec::new(),
            next_insertion: 0,
            rng,
        })
    }

    /// The stored groups.
    pub fn entries(&self) -> &[BufferedGroup] {
        &self.entries
    }

    /// The configuration.
    pub fn config(&self) -> &SsbConfig {
        &self.config
    }

    /// Snapshot of the whole state for a checkpoint.
    pub fn state(&self) -> SsbState {
        SsbState {
            config: self.config.clone(),
            entries: self.entries.clone(),
            next_insertion: self.next_insertion,
            rng: RngSnapshot::of(&self.rng),
        }
    }

    /// Rebuilds a buffer from a snapshot.
    pub fn from_state(state: SsbState) -> Result<Self> {
        state.config.validate()?;
        Ok(Self {
            rng: state.rng.restore(),
            config: state.config,
            entries: state.entries,
            next_insertion: state.next_insertion,
        })
    }

    fn priority(&self, group: &Group) -> f64 {
        group.mean_abs_advantage().powf(self.config.alpha)
    }

    /// Index of the entry to evict under the configured policy.
    fn eviction_victim(&self) -> Option<usize> {
        let key = |e: &BufferedGroup| match self.config.eviction {
            Eviction::LowestPriority => (e.priority, e.group.policy_version as f64, e.inserted),
            Eviction::Oldest => (e.group.policy_version as f64, 0.0, e.inserted),
        };
        (0..self.entries.len()).min_by(|&a, &b| {
            let (ka, kb) = (key(&self.entries[a]), key(&self.entries[b]));
            ka.0.total_cmp(&kb.0)
                .then(ka.1.total_cmp(&kb.1))
                .then(ka.2.cmp(&kb.2))
        })
    }

    /// Filters `fresh` to its informative groups and tops the batch up to `target_groups` from the buffer, then
    /// stores the fresh informative groups. `current_version` is the version of the policy about to be updated.
    pub fn fill_batch(
        &mut self,
        fresh: Vec<Group>,
        target_groups: usize,
        current_version: u64,
    ) -> Result<SsbBatch> {
        if target_groups == 0 {
            return Err(Error::msg("ssb: target_groups must be > 0"));
        }
        if let Some(g) = fresh.iter().find(|g| g.policy_version > current_version) {
            return Err(Error::msg(format!(
                "ssb: group of prompt {} has policy_version {} > current_version {current_version}",
                g.prompt_id.0, g.policy_version
            )));
        }
        let mut metrics = SsbMetrics {
            fresh_groups: fresh.len(),
            ..Default::default()
        };
        if !self.config.enabled {
            // Plain GRPO (the ablation): every fresh group trains, zero-advantage ones included; nothing is
            // stored or replayed.
            let informative = fresh
                .iter()
                .map(|g| g.kind(self.config.zero_tolerance))
                .inspect(|&kind| metrics.kinds.add(kind))
                .filter(|kind| !kind.is_zero_advantage())
                .count();
            let share = informative as f64 / fresh.len().max(1) as f64;
            metrics.effective_share_before = share;
            metrics.effective_share_after = share;
            return Ok(SsbBatch {
                groups: fresh,
                replayed: 0,
                metrics,
            });
        }
        let mut informative = Vec::with_capacity(fresh.len());
        for group in fresh {
            let kind = group.kind(self.config.zero_tolerance);
            metrics.kinds.add(kind);
            if !kind.is_zero_advantage() {
                informative.push(group);
            }
        }

        // Staleness bound.
        let before = self.entries.len();
        let max_staleness = self.config.max_staleness;
        self.entries
            .retain(|e| current_version.saturating_sub(e.group.policy_version) <= max_staleness);
        metrics.evicted_stale = before - self.entries.len();

        // Replay.
        let replay_cap = (self.config.max_replay_share * target_groups as f64).floor() as usize;
        let want = target_groups
            .saturating_sub(informative.len())
            .min(replay_cap);
        let weights: Vec<f64> = self.entries.iter().map(|e| e.priority).collect();
        let picked = weighted_sample_without_replacement(&mut self.rng, &weights, want);
        let mut groups = informative.clone();
        for &i in &picked {
            self.entries[i].replays += 1;
            groups.push(self.entries[i].group.clone());
        }
        let max_replays = self.config.max_replays_per_group;
        self.entries.retain(|e| e.replays < max_replays);

        // Store this batch's informative groups.
        for group in informative.iter() {
            let priority = self.priority(group);
            self.entries.push(BufferedGroup {
                group: group.clone(),
                priority,
                inserted: self.next_insertion,
                replays: 0,
            });
            self.next_insertion += 1;
        }
        while self.entries.len() > self.config.capacity {
            // len > capacity >= 0, so the buffer is not empty and a victim exists.
            let Some(victim) = self.eviction_victim() else {
                break;
            };
            self.entries.remove(victim);
            metrics.evicted_capacity += 1;
        }

        metrics.replayed = picked.len();
        metrics.effective_share_before = informative.len() as f64 / target_groups as f64;
        metrics.effective_share_after =
            (informative.len() + picked.len()) as f64 / target_groups as f64;
        metrics.buffer_size = self.entries.len();
        metrics.mean_age = if self.entries.is_empty() {
            0.0
        } else {
            self.entries
                .iter()
                .map(|e| current_version.saturating_sub(e.group.policy_version) as f64)
                .sum::<f64>()
                / self.entries.len() as f64
        };
        Ok(SsbBatch {
            groups,
            replayed: picked.len(),
            metrics,
        })
    }
}

/// Result of the offline pre-filter of a prompt pool.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PrefilterReport {
    /// Prompts whose pre-rollout group is informative, in input order.
    pub kept: Vec<PromptId>,
    /// Kinds of all pre-rollout groups.
    pub kinds: GroupKindCounts,
}

/// Offline SSB: keeps the prompts whose one pre-rollout group has a non-zero advantage (drops all-right and
/// all-wrong prompts).
pub fn prefilter_prompt_pool(pre_rollouts: &[Group], zero_tolerance: f64) -> PrefilterReport {
    let mut report = PrefilterReport::default();
    for group in pre_rollouts {
        let kind = group.kind(zero_tolerance);
        report.kinds.add(kind);
        if !kind.is_zero_advantage() {
            report.kept.push(group.prompt_id);
        }
    }
    report
}
