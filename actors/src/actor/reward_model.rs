//! RewardModel: the frozen reward model ([`RewardNet`]: a Qwen2 [`ValueModel`], or Skywork-VL Reward's
//! Qwen2.5-VL + value head) behind one sync actor.
//!
//! Receives [`Score`] (text) or [`ScoreWithImages`] (each sequence with its images, for a model that reads
//! pixels) and replies [`RmScores`], one raw scalar per sequence in order. Sequences are scored
//! `max_batch` at a time, each chunk right-padded to its longest sequence (padding has mask 0, and the value
//! head reads each row's last real token, so padding does not change a score). The forward pass runs on the
//! actor's own thread (`SyncArbiter` of one), never on the arbiter that routes messages.

use actix::{Actor, Addr, Handler, SyncArbiter, SyncContext};
use candle_core::{Device, Tensor};

use super::{handle_guarded, Closed, Liveness};
use crate::model::qwen2_5_vl::{Images, Qwen25Vl};
use crate::model::reward::RewardNet;
use crate::model::value_head::ValueModel;
use crate::protocol::{
    ActorName, Heartbeat, HeartbeatReply, RmScores, Score, ScoreSequence, ScoreWithImages, Shutdown,
};
use crate::{Error, Result};

const NAME: ActorName = ActorName::RewardModel;

impl From<ValueModel> for RewardNet {
    fn from(model: ValueModel) -> Self {
        RewardNet::Qwen2(model)
    }
}

impl From<Qwen25Vl> for RewardNet {
    fn from(model: Qwen25Vl) -> Self {
        RewardNet::Qwen25Vl(model)
    }
}

/// The reward model actor.
pub struct RewardModel {
    model: RewardNet,
    device: Device,
    max_batch: usize,
    liveness: Liveness,
    closed: Closed,
}

impl RewardModel {
    /// Starts the actor on its own thread; `max_batch` (at least 1) sequences go through one forward pass.
    /// Needs a running actix `System`.
    pub fn start(model: impl Into<RewardNet>, device: Device, max_batch: usize) -> Addr<Self> {
        let model = model.into();
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

    /// Runs a scoring handler: refused after [`Shutdown`], a panic becomes an error reply.
    fn guarded(
        &mut self,
        message: &'static str,
        sequences: &[ScoreSequence],
        images: &[Option<Images>],
    ) -> Result<RmScores> {
        let Self {
            model,
            device,
            max_batch,
            liveness,
            closed,
        } = self;
        handle_guarded(liveness, closed, message, || {
            Ok(RmScores {
                scores: score(model, device, *max_batch, sequences, images)?,
            })
        })
    }
}

/// Scores `sequences` (with `images[i]` for sequence i, or none at all), `max_batch` at a time.
fn score(
    model: &RewardNet,
    device: &Device,
    max_batch: usize,
    sequences: &[ScoreSequence],
    images: &[Option<Images>],
) -> Result<Vec<f32>> {
    {
        for (index, sequence) in sequences.iter().enumerate() {
            check_sequence(index, sequence)?;
        }
        if !images.is_empty() && images.len() != sequences.len() {
            return Err(Error::msg(format!(
                "ScoreWithImages: {} image entries for {} sequences",
                images.len(),
                sequences.len()
            )));
        }
        let mut scores = Vec::with_capacity(sequences.len());
        for (k, chunk) in sequences.chunks(max_batch).enumerate() {
            let (ids, mask) = pad_right(chunk, device)?;
            let start = k * max_batch;
            let chunk_images = images
                .get(start..start + chunk.len())
                .map(|rows| concat_images(rows, device))
                .transpose()?
                .flatten();
            let chunk_scores = model.score(&ids, Some(&mask), chunk_images.as_ref())?; // (B)
            scores.extend(chunk_scores.to_vec1::<f32>()?);
        }
        Ok(scores)
    }
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

/// The images of a chunk's rows, concatenated in row order (`None` when no row has any).
fn concat_images(rows: &[Option<Images>], device: &Device) -> Result<Option<Images>> {
    let (mut pixels, mut grids) = (Vec::new(), Vec::new());
    for images in rows.iter().flatten() {
        pixels.push(images.pixel_values.to_device(device)?);
        grids.extend_from_slice(&images.grids);
    }
    if pixels.is_empty() {
        return Ok(None);
    }
    Ok(Some(Images {
        pixel_values: Tensor::cat(&pixels, 0)?,
        grids,
    }))
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
        self.guarded("Score", &msg.sequences, &[])
    }
}

impl Handler<ScoreWithImages> for RewardModel {
    type Result = Result<RmScores>;

    fn handle(&mut self, msg: ScoreWithImages, _ctx: &mut SyncContext<Self>) -> Result<RmScores> {
        self.guarded("ScoreWithImages", &msg.sequences, &msg.images)
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

    /// One row's images from the Qwen2.5-VL fixture (first temporal frame stored, both restored).
    fn vl_images(io: &HashMap<String, Tensor>, keys: &[&str]) -> anyhow::Result<Images> {
        let mut pixels = Vec::new();
        let mut grids = Vec::new();
        for key in keys {
            let frame = io[&format!("pixels_{key}")].unsqueeze(2)?;
            let n = frame.dim(0)?;
            pixels.push(Tensor::cat(&[&frame, &frame], 2)?.reshape((n, 3 * 2 * 196))?);
            let g = io[&format!("grid_{key}")]
                .to_dtype(DType::U32)?
                .to_vec1::<u32>()?;
            grids.push([g[0] as usize, g[1] as usize, g[2] as usize]);
        }
        Ok(Images {
            pixel_values: Tensor::cat(&pixels, 0)?,
            grids,
        })
    }

    #[actix::test]
    async fn qwen2_5_vl_scores_with_images_match_transformers() -> anyhow::Result<()> {
        let dir = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/qwen2_5_vl"
        ));
        let loaded = crate::model::qwen2_5_vl::load_dir(
            &dir.join("released"),
            DType::F32,
            &Device::Cpu,
            |_| false,
        )?;
        let io = candle_core::safetensors::load(dir.join("io.safetensors"), &Device::Cpu)?;
        let sequences = sequences(&io)?;
        let images = vec![
            Some(vl_images(&io, &["a"])?),
            Some(vl_images(&io, &["b", "d"])?),
            None,
        ];
        // max_batch 2: the first chunk holds three images of two rows, the second a text-only row.
        let actor = RewardModel::start(loaded.model, Device::Cpu, 2);
        let reply = actor
            .send(ScoreWithImages {
                sequences: sequences.clone(),
                images,
            })
            .await??;
        let reference = io["scores"].to_vec1::<f32>()?;
        for (row, (got, want)) in reply.scores.iter().zip(&reference).enumerate() {
            assert!(
                (got - want).abs() < 1e-4,
                "row {row}: actor {got} vs transformers {want}"
            );
        }
        // Without the images the pad tokens have nothing to fill them: an error, and the actor goes on.
        let error = actor
            .send(Score { sequences })
            .await?
            .expect_err("pads without images");
        assert!(error.to_string().contains("pad tokens"), "{error}");
        let beat = actor.send(Heartbeat).await?;
        assert_eq!(beat.handled, 2);
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
