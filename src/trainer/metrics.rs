//! A step's metrics as typed families; [`StepMetrics::to_map`] names them as metrics.jsonl does (design.md
//! "Telemetry"). A family is absent from a step that has no such phase (SFT steps do not sample).

use std::collections::BTreeMap;

use r1v2_actors::protocol::{TrainBatch, UpdateReport};
use r1v2_actors::rl::scoring::RewardMetrics;

/// Sampling: `timing_s/gen`, `perf/tokens_per_s`, `response_length/{mean, clip_ratio}`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GenerationMetrics {
    /// Seconds waited for the rollouts.
    pub seconds: f64,
    /// Response tokens per second of that wait.
    pub tokens_per_s: f64,
    /// Mean response length in tokens.
    pub mean_length: f64,
    /// Share of responses cut at the maximum length.
    pub clip_ratio: f64,
}

/// Scoring's wait for each scorer: `timing_s/{verify, reward}` (0 without a reward model).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoringTimes {
    /// Seconds until the verdicts came back.
    pub verify_s: f64,
    /// Seconds until the RM scores came back.
    pub reward_s: f64,
}

/// Async mode: `async/{stale_dropped, staleness}`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StalenessMetrics {
    /// Groups dropped this step for being more than `max_staleness` versions old.
    pub stale_dropped: u64,
    /// Versions between the current policy and the one that sampled this step's groups.
    pub staleness: u64,
}

/// The sample buffer's batch: `ssb/{effective_share_before, effective_share_after, replayed, size}`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BufferMetrics {
    /// Informative fresh groups / target.
    pub effective_share_before: f64,
    /// (informative fresh + replayed) / target.
    pub effective_share_after: f64,
    /// Groups replayed from the buffer.
    pub replayed: usize,
    /// Stored groups after the batch.
    pub size: usize,
}

impl BufferMetrics {
    /// What `batch` says about the buffer.
    pub fn of(batch: &TrainBatch) -> Self {
        Self {
            effective_share_before: batch.metrics.effective_share_before,
            effective_share_after: batch.metrics.effective_share_after,
            replayed: batch.replayed,
            size: batch.metrics.buffer_size,
        }
    }
}

/// The update: `actor/skipped`, `timing_s/{update, sync}`, `perf/sync_bytes` and the optimizer's own
/// metrics (`actor/*`, `mpo/*`, `sft/*`).
#[derive(Debug, Clone, PartialEq)]
pub enum UpdateMetrics {
    /// No update this step (no informative group, no preference pair).
    Skipped,
    /// An update and the weight sync after it.
    Done {
        /// Seconds the optimizer took.
        update_s: f64,
        /// Seconds the generator took to load the new weights.
        sync_s: f64,
        /// Bytes of weights sent to the generator.
        sync_bytes: usize,
        /// The optimizer's metrics (loss terms, gradient norm, learning rate).
        optimizer: BTreeMap<String, f64>,
    },
}

impl UpdateMetrics {
    /// The metrics of a finished update and sync.
    pub fn done(report: &UpdateReport, update_s: f64, sync_s: f64) -> Self {
        Self::Done {
            update_s,
            sync_s,
            sync_bytes: report.weights.bytes(),
            optimizer: report.metrics.clone(),
        }
    }
}

/// Everything one step logs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepMetrics {
    /// Sampling (RL stages).
    pub generation: Option<GenerationMetrics>,
    /// Waits for the scorers (RL stages).
    pub scoring: Option<ScoringTimes>,
    /// The hybrid reward (RL stages).
    pub reward: Option<RewardMetrics>,
    /// Stale groups (GRPO).
    pub staleness: Option<StalenessMetrics>,
    /// The sample buffer (GRPO).
    pub buffer: Option<BufferMetrics>,
    /// Preference pairs mined (MPO).
    pub mpo_pairs: Option<usize>,
    /// The update.
    pub update: Option<UpdateMetrics>,
    /// Seconds of the probe-set run, when one was due.
    pub probe_s: Option<f64>,
    /// The hallucination monitor's metrics (`hallucination/*`, `calibration/*`), after the reward's.
    pub monitor: Vec<(&'static str, f64)>,
    /// Seconds of the whole step.
    pub step_s: f64,
}

impl StepMetrics {
    /// The step as metrics.jsonl names it. The monitor's `calibration/rm_threshold` (the threshold after
    /// this step) overrides the reward's (the one this step was scored with).
    pub fn to_map(&self) -> BTreeMap<String, f64> {
        let mut map = BTreeMap::new();
        let mut put = |name: &str, value: f64| {
            map.insert(name.to_string(), value);
        };
        if let Some(g) = self.generation {
            put("timing_s/gen", g.seconds);
            put("perf/tokens_per_s", g.tokens_per_s);
            put("response_length/mean", g.mean_length);
            put("response_length/clip_ratio", g.clip_ratio);
        }
        if let Some(s) = self.scoring {
            put("timing_s/verify", s.verify_s);
            put("timing_s/reward", s.reward_s);
        }
        if let Some(reward) = &self.reward {
            for (name, value) in reward.entries() {
                put(name, value);
            }
        }
        if let Some(s) = self.staleness {
            put("async/stale_dropped", s.stale_dropped as f64);
            put("async/staleness", s.staleness as f64);
        }
        if let Some(b) = self.buffer {
            put("ssb/effective_share_before", b.effective_share_before);
            put("ssb/effective_share_after", b.effective_share_after);
            put("ssb/replayed", b.replayed as f64);
            put("ssb/size", b.size as f64);
        }
        if let Some(pairs) = self.mpo_pairs {
            put("mpo/pairs", pairs as f64);
        }
        match &self.update {
            None => {}
            Some(UpdateMetrics::Skipped) => {
                put("actor/skipped", 1.0);
                put("timing_s/update", 0.0);
                put("timing_s/sync", 0.0);
                put("perf/sync_bytes", 0.0);
            }
            Some(UpdateMetrics::Done {
                update_s,
                sync_s,
                sync_bytes,
                optimizer,
            }) => {
                put("actor/skipped", 0.0);
                put("timing_s/update", *update_s);
                put("timing_s/sync", *sync_s);
                put("perf/sync_bytes", *sync_bytes as f64);
                for (name, value) in optimizer {
                    put(name, *value);
                }
            }
        }
        if let Some(seconds) = self.probe_s {
            put("timing_s/probe", seconds);
        }
        for (name, value) in &self.monitor {
            put(name, *value);
        }
        put("timing_s/step", self.step_s);
        map
    }
}
