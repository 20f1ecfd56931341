//! RewardModel: the frozen reward model (a Qwen2 [`ValueModel`]) behind one sync actor.
//!
//! Receives [`Score`] and replies [`RmScores`], one raw scalar per sequence in order. Sequences are scored
//! `max_batch` at a time, each chunk right-padded to its longest sequence (padding has mask 0, and the value
//! head reads each row's last real token, so padding does not change a score). The forward pass runs on the
//! actor's own thread (`SyncArbiter` of one), never on the arbiter that routes messages.

use actix::{Actor, Addr, Handler, SyncArbiter, SyncContext};
use candle_core::{Device, Tensor};

use super::{handle_guarded, Closed, Liveness};
use crate::model::value_head::ValueModel;
use crate::protocol::{
    ActorName, Heartbeat, HeartbeatReply, RmScores, Score, ScoreSequence, Shutdown,
};
use crate::{Error, Result};

const NAME: ActorName = ActorName::RewardModel;

/// The reward model actor.
pub struct RewardModel {
    model: ValueModel,
    device: Device,
    max_batch: usize,
    liveness: Liveness,
    closed: Closed,
}

impl RewardModel {
    /// Starts the actor on its own thread; `max_batch` (at least 1) sequences go through one forward pass.
    /// Needs a running actix `System`.
    pub fn start(model: ValueModel, device: Device, max_batch: usize) -> Addr<Self> {
        // The factory runs again if the actor stops; cloning a model shares its tensors.
        let closed = Closed::default();
        SyncArbiter::start(1, move || RewardModel {
            model: model.clone(),
            device: device.clone(),
            max_batch: max_batch.max(1),
            liveness: Liveness::new(NAME),
            closed: closed.clone(),
        })
    }
}

/// Scores `sequences`, `max_batch` at a time.
fn score(
    model: &ValueModel,
    device: &Device,
    max_batch: usize,
    sequences: &[ScoreSequence],
) -> Result<Vec<f32>> {
    for (index, sequence) in sequences.iter().enumerate() {
        check_sequence(index, sequence)?;
    }
    let mut scores = Vec::with_capacity(sequences.len());
    for chunk in sequences.chunks(max_batch) {
        let (ids, mask) = pad_right(chunk, device)?;
        let chunk_scores = model.forward(&ids, Some(&mask))?; // (B)
        scores.extend(chunk_scores.to_vec1::<f32>()?);
    }
    Ok(scores)
}

/// A sequence the model can score: non-empty, mask as long as the ids, of 0/1, with a real token.
fn check_sequence(index: usize, sequence: &ScoreSequence) -> Result<()> {
    let fail = |msg: String| Err(Error::msg(format!("Score: sequence {index}: {msg}")));
    if sequence.token_ids.len() != sequence.attention_mask.len() {
        return fail(format!(
            "{} token ids but {} mask entries",
            sequence.token_ids.len(),
            sequence.attention_mask.len()
        ));
    }
    if sequence.attention_mask.iter().any(|&m| m > 1) {
        return fail("attention_mask entries must be 0 or 1".into());
    }
    if !sequence.attention_mask.contains(&1) {
        return fail("no real token (empty, or the mask is all 0)".into());
    }
    Ok(())
}

/// (ids, mask), both (B, T) u32, T the longest sequence of `chunk`; padding is id 0 with mask 0.
fn pad_right(chunk: &[ScoreSequence], device: &Device) -> Result<(Tensor, Tensor)> {
    let width = chunk.iter().map(|s| s.token_ids.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(chunk.len() * width);
    let mut mask = Vec::with_capacity(chunk.len() * width);
    for sequence in chunk {
        let pad = width - sequence.token_ids.len();
        ids.extend(
            sequence
                .token_ids
                .iter()
                .copied()
                .chain(std::iter::repeat_n(0, pad)),
        );
        mask.extend(
            sequence
                .attention_mask
                .iter()
                .copied()
                .chain(std::iter::repeat_n(0, pad)),
        );
    }
    Ok((
        Tensor::from_vec(ids, (chunk.len(), width), device)?,
        Tensor::from_vec(mask, (chunk.len(), width), device)?,
    ))
}

impl Actor for RewardModel {
    type Context = SyncContext<Self>;
}

impl Handler<Score> for RewardModel {
    type Result = Result<RmScores>;

    fn handle(&mut self, msg: Score, _ctx: &mut SyncContext<Self>) -> Result<RmScores> {
        let Self {
            model,
            device,
            max_batch,
            liveness,
            closed,
        } = self;
        handle_guarded(liveness, closed, "Score", || {
            Ok(RmScores {
                scores: score(model, device, *max_batch, &msg.sequences)?,
            })
        })
    }
}

impl Handler<Shutdown> for RewardModel {
    type Result = ();

    fn handle(&mut self, _msg: Shutdown, _ctx: &mut SyncContext<Self>) {
        self.liveness.handling("Shutdown");
        self.closed.close(NAME);
    }
}

impl Handler<Heartbeat> for RewardModel {
    type Result = HeartbeatReply;

    fn handle(&mut self, _msg: Heartbeat, _ctx: &mut SyncContext<Self>) -> HeartbeatReply {
        self.liveness.reply()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::{Path, PathBuf};

    use candle_core::DType;

    use super::*;
    use crate::model::qwen2::Config;
    use crate::model::weights::WeightStore;

    fn fixture(rel: &str) -> PathBuf {
        Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/qwen2"
        ))
        .join(rel)
    }

    /// The tiny value-head model of gen_qwen2.py and its inputs / transformers scores.
    fn model_and_io() -> anyhow::Result<(ValueModel, HashMap<String, Tensor>)> {
        let dir = fixture("value");
        let cfg = Config::from_file(&dir.join("config.json"))?;
        let store = WeightStore::load(&dir, DType::F32, &Device::Cpu)?;
        let model = ValueModel::new(&cfg, store.frozen_var_builder())?;
        let io = candle_core::safetensors::load(fixture("io.safetensors"), &Device::Cpu)?;
        Ok((model, io))
    }

    /// The fixture's rows as sequences, each cut to its real tokens (the fixture pads some rows).
    fn sequences(io: &HashMap<String, Tensor>) -> anyhow::Result<Vec<ScoreSequence>> {
        let ids = io["input_ids"].to_dtype(DType::U32)?.to_vec2::<u32>()?;
        let mask = io["attention_mask"]
            .to_dtype(DType::U32)?
            .to_vec2::<u32>()?;
        Ok(ids
            .into_iter()
            .zip(mask)
            .map(|(ids, mask)| {
                let (ids, mask): (Vec<u32>, Vec<u32>) =
                    ids.into_iter().zip(mask).filter(|&(_, m)| m == 1).unzip();
                ScoreSequence {
                    token_ids: ids,
                    attention_mask: mask,
                }
            })
            .collect())
    }

    #[actix::test]
    async fn scores_match_the_model_called_directly_and_transformers() -> anyhow::Result<()> {
        let (model, io) = model_and_io()?;
        let direct = model
            .forward(
                &io["input_ids"].to_dtype(DType::U32)?,
                Some(&io["attention_mask"].to_dtype(DType::U32)?),
            )?
            .to_vec1::<f32>()?;
        let reference = io["value_scores"].to_vec1::<f32>()?;
        let sequences = sequences(&io)?;
        assert!(sequences.len() >= 3);

        // max_batch 2: the rows go through in two chunks, each padded to its own width.
        let actor = RewardModel::start(model, Device::Cpu, 2);
        let reply = actor.send(Score { sequences }).await??;
        assert_eq!(reply.scores.len(), direct.len());
        for (row, ((got, want), hf)) in reply.scores.iter().zip(&direct).zip(&reference).enumerate()
        {
            assert!(
                (got - want).abs() < 1e-4,
                "row {row}: actor {got} vs direct {want}"
            );
            assert!(
                (got - hf).abs() < 1e-4,
                "row {row}: actor {got} vs transformers {hf}"
            );
        }
        let beat = actor.send(Heartbeat).await?;
        assert_eq!(
            (beat.actor, beat.last_message, beat.handled),
            (ActorName::RewardModel, Some("Score"), 1)
        );
        Ok(())
    }

    #[actix::test]
    async fn a_bad_sequence_is_an_error_naming_it_and_the_actor_goes_on() -> anyhow::Result<()> {
        let (model, io) = model_and_io()?;
        let mut sequences = sequences(&io)?;
        sequences[1].attention_mask.pop();
        let actor = RewardModel::start(model, Device::Cpu, 4);
        let error = actor
            .send(Score {
                sequences: sequences.clone(),
            })
            .await?
            .expect_err("a mask shorter than its ids must be refused");
        assert!(error.to_string().contains("sequence 1"), "{error}");

        sequences[1].attention_mask.push(1);
        let reply = actor.send(Score { sequences }).await??;
        assert!(reply.scores.iter().all(|s| s.is_finite()));
        Ok(())
    }
}
