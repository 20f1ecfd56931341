//! The Optimizer actor's panic handling: a handler that panics replies an error naming the message, the
//! actor carries on (counted as a restart), and a trainer left mid-step refuses further updates and saves.

use std::path::Path;

use actix::Message;
use candle_core::{DType, Device};

use super::*;
use crate::model::chat::ChatModel;
use crate::protocol::MpoPair;
use crate::rl::PromptId;
use crate::train::OptimConfig;

/// Test-only: a handler that panics; with `unfinished_step`, after marking the trainer mid-step.
#[derive(Debug, Message)]
#[rtype(result = "crate::Result<()>")]
struct PanicMidway {
    unfinished_step: bool,
}

impl Handler<PanicMidway> for Optimizer {
    type Result = crate::Result<()>;

    fn handle(&mut self, msg: PanicMidway, _ctx: &mut Context<Self>) -> crate::Result<()> {
        self.guarded("PanicMidway", |this| {
            if msg.unfinished_step {
                this.trainer.mark_step_unfinished();
            }
            panic!("bug in an update")
        })
    }
}

/// The tiny InternVL-chat fixture with a text-only prompt in the bank.
fn optimizer() -> Result<Optimizer> {
    let dir = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/internvl/vit300m"
    ));
    let config = OptimConfig::default();
    let policy = ChatModel::load(dir, DType::F32, &Device::Cpu, config.trainable)?;
    let trainer = PolicyTrainer::new(policy, config)?;
    let prompts = PromptBank::new();
    prompts.insert(crate::prompt::EncodedPrompt {
        id: PromptId(0),
        token_ids: vec![5, 6, 7, 8],
        pixel_values: None,
        image_grids: Vec::new(),
        answer: String::new(),
        verifier: "math".into(),
        question: String::new(),
        meta: None,
    });
    Optimizer::new(
        trainer,
        prompts,
        GrpoConfig::default(),
        MpoConfig::default(),
    )
}

fn pairs() -> Vec<MpoPair> {
    vec![MpoPair {
        prompt_id: PromptId(0),
        chosen: vec![1, 2, 3],
        rejected: vec![4, 5],
    }]
}

#[actix::test]
async fn a_panicking_handler_is_an_error_and_the_actor_carries_on() -> anyhow::Result<()> {
    let actor = optimizer()?.start_dedicated();
    let error = actor
        .send(PanicMidway {
            unfinished_step: false,
        })
        .await?
        .expect_err("the panic must reach the caller as an error");
    assert!(error.to_string().contains("bug in an update"), "{error}");
    assert!(error.to_string().contains("PanicMidway"), "{error}");
    let beat = actor.send(Heartbeat).await?;
    assert_eq!(beat.restarts, 1);
    // The trainer was not touched: the next update works.
    let report = actor
        .send(TrainMpo {
            pairs: pairs(),
            lr_scale: 1.0,
        })
        .await??;
    assert_eq!(report.weights.version, 1);
    Ok(())
}

#[actix::test]
async fn a_trainer_left_mid_step_refuses_updates_and_saves() -> anyhow::Result<()> {
    let actor = optimizer()?.start_dedicated();
    assert!(actor
        .send(PanicMidway {
            unfinished_step: true,
        })
        .await?
        .is_err());
    let error = actor
        .send(TrainMpo {
            pairs: pairs(),
            lr_scale: 1.0,
        })
        .await?
        .expect_err("a half-updated trainer must not train on");
    assert!(
        error
            .to_string()
            .contains("resume from the last checkpoint"),
        "{error}"
    );
    let dir = tempfile::tempdir()?;
    let error = actor
        .send(SaveState {
            dir: dir.path().to_path_buf(),
        })
        .await?
        .expect_err("a half-updated trainer must not be checkpointed");
    assert!(error.to_string().contains("partly updated"), "{error}");
    Ok(())
}
