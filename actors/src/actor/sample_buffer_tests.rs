//! The SampleBuffer actor against the pure [`SelectiveSampleBuffer`], its snapshots, and its supervisor.

use actix::Message;

use super::*;
use crate::protocol::{BufferSnapshot, Heartbeat, NextBatch, ScoredGroups, Shutdown, Snapshot};
use crate::rl::advantages::GroupKind;
use crate::rl::PromptId;
use crate::rl::{Group, Sample};

/// A group of `prompt` sampled at `version`; advantages and verdicts per sample.
fn group(prompt: u64, version: u64, advantages: &[f64], correct: &[bool]) -> Group {
    Group {
        prompt_id: PromptId(prompt),
        policy_version: version,
        samples: advantages
            .iter()
            .zip(correct)
            .enumerate()
            .map(|(i, (&advantage, &correct))| {
                Sample::scored(
                    vec![prompt as u32, i as u32],
                    vec![-0.5, -1.0],
                    if correct { 1.0 } else { 0.0 },
                    advantage,
                    Some(correct),
                )
            })
            .collect(),
    }
}

/// Round 1: three informative groups (different |A|), one all-correct, one all-wrong.
fn round_one() -> Vec<Group> {
    vec![
        group(0, 0, &[1.0, -1.0], &[true, false]),
        group(1, 0, &[0.0, 0.0], &[true, true]),
        group(2, 0, &[0.5, -0.5], &[true, false]),
        group(3, 0, &[0.0, 0.0], &[false, false]),
        group(4, 0, &[2.0, -2.0], &[true, false]),
    ]
}

/// Round 2: one informative group and one all-wrong; the batch needs replay.
fn round_two() -> Vec<Group> {
    vec![
        group(5, 1, &[0.7, -0.7], &[false, true]),
        group(6, 1, &[0.0, 0.0], &[false, false]),
    ]
}

fn config() -> SsbConfig {
    SsbConfig {
        capacity: 8,
        max_replay_share: 0.75,
        seed: 7,
        ..SsbConfig::default()
    }
}

#[actix::test]
async fn batches_equal_the_pure_buffer_and_zero_advantage_groups_are_dropped() -> anyhow::Result<()>
{
    let actor = SampleBuffer::new(config())?.start_supervised();
    let mut pure = SelectiveSampleBuffer::new(config())?;

    let accepted = actor
        .send(ScoredGroups {
            groups: round_one(),
        })
        .await??;
    assert_eq!(accepted.kept, 3);
    let mut kinds = GroupKindCounts::default();
    for kind in [
        GroupKind::Informative,
        GroupKind::AllCorrect,
        GroupKind::AllWrong,
    ] {
        kinds.add(kind);
    }
    kinds.add(GroupKind::Informative);
    kinds.add(GroupKind::Informative);
    assert_eq!(accepted.kinds, kinds);

    let want = pure.fill_batch(round_one(), 4, 0)?;
    let got = actor
        .send(NextBatch {
            target: 4,
            policy_version: 0,
        })
        .await??;
    assert_eq!(
        (got.groups, got.replayed, got.metrics),
        (want.groups, want.replayed, want.metrics)
    );

    // Sent in two messages, counted as one batch's input.
    let groups = round_two();
    let (first, second) = (groups[..1].to_vec(), groups[1..].to_vec());
    actor.send(ScoredGroups { groups: first }).await??;
    actor.send(ScoredGroups { groups: second }).await??;
    let want = pure.fill_batch(round_two(), 4, 1)?;
    assert!(want.replayed > 0, "round two must exercise replay");
    let got = actor
        .send(NextBatch {
            target: 4,
            policy_version: 1,
        })
        .await??;
    assert_eq!(got.policy_version, 1);
    assert_eq!(
        (got.groups, got.replayed, got.metrics),
        (want.groups, want.replayed, want.metrics)
    );
    assert_eq!(actor.send(Snapshot).await?.ssb, pure.state());
    Ok(())
}

#[actix::test]
async fn a_snapshot_round_trips_through_json_and_resumes_the_same_run() -> anyhow::Result<()> {
    let actor = SampleBuffer::new(config())?.start_supervised();
    actor
        .send(ScoredGroups {
            groups: round_one(),
        })
        .await??;
    actor
        .send(NextBatch {
            target: 4,
            policy_version: 0,
        })
        .await??;
    // Mid-batch: one group is pending when the checkpoint is taken.
    actor
        .send(ScoredGroups {
            groups: round_two()[..1].to_vec(),
        })
        .await??;

    let json = serde_json::to_string(&actor.send(Snapshot).await?)?;
    let snapshot: BufferSnapshot = serde_json::from_str(&json)?;
    let resumed = SampleBuffer::from_snapshot(snapshot)?.start_supervised();

    for addr in [&actor, &resumed] {
        addr.send(ScoredGroups {
            groups: round_two()[1..].to_vec(),
        })
        .await??;
    }
    let original = actor
        .send(NextBatch {
            target: 4,
            policy_version: 1,
        })
        .await??;
    let again = resumed
        .send(NextBatch {
            target: 4,
            policy_version: 1,
        })
        .await??;
    assert!(original.replayed > 0);
    assert_eq!(original, again);
    Ok(())
}

/// Test-only: a handler that changes the state and then panics.
#[derive(Debug, Message)]
#[rtype(result = "crate::Result<()>")]
struct PanicMidway;

impl Handler<PanicMidway> for SampleBuffer {
    type Result = crate::Result<()>;

    fn handle(&mut self, _msg: PanicMidway, ctx: &mut Context<Self>) -> crate::Result<()> {
        self.guarded(ctx, "PanicMidway", |actor| {
            actor.pending.clear();
            actor.pending_received += 100;
            panic!("bug in a handler")
        })
    }
}

#[actix::test]
async fn a_panicking_handler_is_restarted_with_its_state_and_the_next_message_succeeds(
) -> anyhow::Result<()> {
    let actor = SampleBuffer::new(config())?.start_supervised();
    actor
        .send(ScoredGroups {
            groups: round_one(),
        })
        .await??;
    let before = actor.send(Snapshot).await?;

    let error = actor
        .send(PanicMidway)
        .await?
        .expect_err("the panic must reach the caller as an error");
    assert!(error.to_string().contains("bug in a handler"), "{error}");
    assert!(error.to_string().contains("PanicMidway"), "{error}");

    let beat = actor.send(Heartbeat).await?;
    assert_eq!(beat.restarts, 1);
    assert_eq!(beat.last_message, Some("PanicMidway"));
    assert_eq!(actor.send(Snapshot).await?, before, "state not rolled back");

    let batch = actor
        .send(NextBatch {
            target: 4,
            policy_version: 0,
        })
        .await??;
    assert_eq!(batch.groups.len(), 3);
    assert_eq!(batch.metrics.fresh_groups, 5);
    Ok(())
}

#[actix::test]
async fn after_shutdown_work_is_refused() -> anyhow::Result<()> {
    let actor = SampleBuffer::new(config())?.start_supervised();
    actor.send(Shutdown).await?;
    let error = actor
        .send(ScoredGroups {
            groups: round_one(),
        })
        .await?
        .expect_err("a closed buffer takes no groups");
    assert!(error.to_string().contains("after Shutdown"), "{error}");
    assert!(actor
        .send(NextBatch {
            target: 4,
            policy_version: 0
        })
        .await?
        .is_err());
    Ok(())
}

#[actix::test]
async fn an_invalid_config_or_request_is_an_error() -> anyhow::Result<()> {
    let bad = SsbConfig {
        max_replay_share: 2.0,
        ..config()
    };
    let error = SampleBuffer::new(bad).err().map(|e| e.to_string());
    assert!(
        error.as_deref().unwrap_or("").contains("max_replay_share"),
        "{error:?}"
    );

    let actor = SampleBuffer::new(config())?.start_supervised();
    actor
        .send(ScoredGroups {
            groups: round_two(),
        })
        .await??;
    // A group from version 1 cannot train the policy at version 0; the groups stay for a valid request.
    assert!(actor
        .send(NextBatch {
            target: 4,
            policy_version: 0
        })
        .await?
        .is_err());
    let batch = actor
        .send(NextBatch {
            target: 4,
            policy_version: 1,
        })
        .await??;
    assert_eq!(batch.groups.len(), 1);
    Ok(())
}
