//! The `train-rm` loop, top to bottom: load (fresh or from the last checkpoint), encode the pairs, then per
//! step: schedule, batch, update, evaluate (every `eval_every`), log to metrics.jsonl, checkpoint.
//!
//! A checkpoint (`checkpoints/step-N/`) holds `model/` (the reward model in its own layout, loadable by
//! `r1v2 forward` and the RewardModel actor), `optimizer/` (AdamW moments) and `trainer_state.json` (step and
//! the pair cursor). Pairs are visited in a seeded shuffle per epoch, so a resumed run sees the same batches.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::DType;
use r1v2_actors::model::reward::{is_vision_tensor, load_reward_dir};
use r1v2_actors::train::reward_model::{evaluate, PairMetrics, PreferencePair, RewardTrainer};
use r1v2_actors::train::schedule::lr_multiplier;
use r1v2_actors::train::{AdamWParams, AdamWState};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::config::RmConfig;
use super::data::{read_pairs, PairEncoder};
use crate::checkpoint::{RunDir, TrainerState};
use crate::data::DataCursor;
use crate::model_dir::parse_device;
use crate::telemetry::MetricsWriter;
use crate::{Error, Result};

/// Files copied from the source model into every saved `model/` so that it loads on its own.
const MODEL_FILES: [&str; 5] = [
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "preprocessor_config.json",
    "generation_config.json",
];

/// What a run ended with.
#[derive(Debug, Clone)]
pub struct RmRunSummary {
    /// Steps done (the configured total).
    pub step: u64,
    /// Held-out metrics before the first update of this process (None on a resumed run).
    pub initial: Option<PairMetrics>,
    /// Held-out metrics at the end.
    pub last: PairMetrics,
    /// The last checkpoint written.
    pub checkpoint: PathBuf,
}

/// Where the pair order stands: epoch `e` is the ChaCha8 stream `e` of `seed` shuffling the indices.
fn epoch_order(cursor: &DataCursor) -> Vec<usize> {
    let mut order: Vec<usize> = (0..cursor.dataset_len).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(cursor.seed);
    rng.set_stream(cursor.epoch);
    order.shuffle(&mut rng);
    order
}

fn next_batch<'a>(
    pairs: &'a [PreferencePair],
    cursor: &mut DataCursor,
    size: usize,
) -> Vec<&'a PreferencePair> {
    let mut batch = Vec::with_capacity(size);
    let mut order = epoch_order(cursor);
    while batch.len() < size {
        if cursor.position >= order.len() {
            cursor.epoch += 1;
            cursor.position = 0;
            order = epoch_order(cursor);
        }
        batch.push(&pairs[order[cursor.position]]);
        cursor.position += 1;
    }
    batch
}

fn copy_model_files(from: &Path, to: &Path) -> Result<()> {
    for name in MODEL_FILES {
        let src = from.join(name);
        if src.is_file() {
            let dst = to.join(name);
            std::fs::copy(&src, &dst).map_err(|source| Error::Io { path: dst, source })?;
        }
    }
    Ok(())
}

/// Runs `train-rm` with `config` (its text is saved in the run directory) into `run_dir`; with `resume` the
/// run continues from the last complete checkpoint there.
pub fn train_reward_model(
    config: &RmConfig,
    config_text: &str,
    run_dir: &Path,
    resume: bool,
) -> Result<RmRunSummary> {
    let t = &config.train;
    let device = parse_device(&config.model.device)?;
    let run = if resume {
        RunDir::open(run_dir)?
    } else {
        let run = RunDir::create(run_dir)?;
        run.write_config(config_text)?;
        run
    };
    // Load: the source model, or the last checkpoint's.
    let source = match (&config.model.dir, &config.model.tiny) {
        (Some(dir), _) => dir.clone(),
        (None, Some(spec)) => {
            let dir = run.root().join("initial_model");
            if !dir.join("config.json").is_file() {
                crate::tiny::write_reward_model(&dir, spec)?;
            }
            dir
        }
        (None, None) => unreachable!("RmConfig::validate requires dir or tiny"),
    };
    let latest = if resume {
        run.latest_checkpoint()?
    } else {
        None
    };
    let (model_dir, state, optimizer) = match &latest {
        Some((_, dir)) => (
            dir.join("model"),
            Some(TrainerState::load(dir)?),
            Some(AdamWState::load(&dir.join("optimizer"))?),
        ),
        None => (source.clone(), None, None),
    };
    let freeze_vision = t.freeze_vision;
    let loaded = load_reward_dir(&model_dir, DType::F32, &device, move |name| {
        !(freeze_vision && is_vision_tensor(name))
    })?;
    let encoder = PairEncoder::from_model_dir(&model_dir, loaded.net.takes_images())?;

    // Data: train and held-out pairs, encoded once.
    let records = read_pairs(&config.data.train)?;
    let (train_records, eval_records) = match &config.data.eval {
        Some(path) => (records, read_pairs(path)?),
        None => {
            let held = ((records.len() as f64) * config.data.eval_fraction).round() as usize;
            let held = held.clamp(1, records.len().saturating_sub(1).max(1));
            let mut records = records;
            let eval = records.split_off(records.len() - held);
            (records, eval)
        }
    };
    let encode = |records: &[super::PairRecord]| -> Result<Vec<PreferencePair>> {
        records.iter().map(|r| encoder.encode(r, &device)).collect()
    };
    let (train, held_out) = (encode(&train_records)?, encode(&eval_records)?);
    if train.is_empty() {
        return Err(Error::Msg(format!(
            "{}: no training pairs left after holding out {} for evaluation",
            config.data.train.display(),
            held_out.len()
        )));
    }

    let params = AdamWParams {
        betas: t.betas,
        eps: t.eps,
        weight_decay: t.weight_decay,
    };
    let mut trainer = RewardTrainer::new(loaded, params, optimizer, t.max_grad_norm, &device)?;
    let (start, mut cursor) = match &state {
        Some(state) => {
            if state.data_cursor.dataset_len != train.len() {
                return Err(Error::Msg(format!(
                    "resume: the checkpoint was trained on {} pairs, {} has {}",
                    state.data_cursor.dataset_len,
                    config.data.train.display(),
                    train.len()
                )));
            }
            (state.step, state.data_cursor)
        }
        None => (
            0,
            DataCursor {
                seed: t.seed,
                epoch: 0,
                position: 0,
                dataset_len: train.len(),
            },
        ),
    };
    let mut metrics = if start > 0 {
        MetricsWriter::resume(run.metrics_path(), start)?
    } else {
        MetricsWriter::open(run.metrics_path())?
    };
    let initial = if start == 0 {
        let m = evaluate(&trainer.loaded.net, &held_out, t.batch_pairs, &device)?;
        tracing::info!(
            accuracy = m.accuracy,
            loss = m.loss,
            pairs = m.pairs,
            "held-out before training"
        );
        Some(m)
    } else {
        None
    };
    tracing::info!(
        train_pairs = train.len(),
        held_out = held_out.len(),
        trainable = trainer.trainable_parameters(),
        start,
        "train-rm"
    );

    let mut last_eval = initial;
    let mut checkpoint = latest.map(|(_, dir)| dir);
    for step in start + 1..=t.steps {
        // Schedule.
        let lr = t.lr * lr_multiplier(step - 1, t.warmup_steps, t.steps, t.min_lr_ratio);
        // Batch and update.
        let batch: Vec<PreferencePair> = next_batch(&train, &mut cursor, t.batch_pairs)
            .into_iter()
            .map(|p| PreferencePair {
                margin: p.margin + t.margin,
                ..p.clone()
            })
            .collect();
        let update = trainer.step(&batch, lr)?;
        let mut values = BTreeMap::from([
            ("train/loss".to_string(), update.loss),
            ("train/accuracy".to_string(), update.accuracy),
            ("train/mean_gap".to_string(), update.mean_gap),
            ("train/lr".to_string(), lr),
        ]);
        // Evaluate.
        if step % t.eval_every == 0 || step == t.steps {
            let m = trainer.evaluate(&held_out, t.batch_pairs)?;
            values.insert("eval/accuracy".into(), m.accuracy);
            values.insert("eval/loss".into(), m.loss);
            values.insert("eval/mean_gap".into(), m.mean_gap);
            tracing::info!(step, accuracy = m.accuracy, loss = m.loss, "held-out");
            last_eval = Some(m);
        }
        // Log.
        metrics.write(step, &values)?;
        // Checkpoint.
        let due = t.checkpoint_every > 0 && step % t.checkpoint_every == 0;
        if due || step == t.steps {
            let state = TrainerState::new(step, cursor);
            let written = run.write_checkpoint(step, t.keep_checkpoints, |dir| {
                let model = dir.join("model");
                trainer.save_model(&model)?;
                copy_model_files(&model_dir, &model)?;
                trainer.optimizer_state().save(&dir.join("optimizer"))?;
                state.save(dir)
            })?;
            checkpoint = Some(written);
        }
    }
    let last = match last_eval {
        Some(m) if start < t.steps => m,
        _ => trainer.evaluate(&held_out, t.batch_pairs)?,
    };
    Ok(RmRunSummary {
        step: t.steps,
        initial,
        last,
        checkpoint: checkpoint.ok_or_else(|| Error::Msg("train-rm wrote no checkpoint".into()))?,
    })
}
