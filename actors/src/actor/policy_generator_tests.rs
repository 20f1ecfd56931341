//! The generator's snapshot packs its LLM for the CPU decode loop: after a `SyncWeights` it must sample from the
//! new weights, not from the packed copies of the old ones (an InternVL-chat and a Qwen2.5-VL policy).

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::*;
use crate::generate::SamplingParams;
use crate::model::chat::Trainable;
use crate::model::policy::load_policy;
use crate::prompt::EncodedPrompt;
use crate::protocol::{GroupRequest, PolicyWeights};
use crate::rl::PromptId;

fn fixture(family: &str) -> std::path::PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures")).join(match family {
        "chat" => "internvl/vit300m",
        _ => "qwen2_5_vl/released",
    })
}

const TRAINABLE: Trainable = Trainable {
    vision: false,
    adapter: false,
    llm: true,
};

fn greedy() -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        repetition_penalty: 1.0,
        max_new_tokens: 8,
        ..SamplingParams::default()
    }
}

fn tokens(rollouts: &Rollouts) -> Vec<Vec<u32>> {
    rollouts.groups[0]
        .samples
        .iter()
        .map(|r| r.token_ids.clone())
        .collect()
}

#[test]
fn generation_after_sync_samples_from_the_new_weights() -> Result<()> {
    check_generation_after_sync("chat")
}

#[test]
fn qwen2_5_vl_generation_after_sync_samples_from_the_new_weights() -> Result<()> {
    check_generation_after_sync("qwen2_5_vl")
}

fn check_generation_after_sync(family: &str) -> Result<()> {
    let loaded = load_policy(&fixture(family), DType::F32, &Device::Cpu, TRAINABLE)?;
    assert!(!loaded.trainable_vars.is_empty());
    let prompts = PromptBank::new();
    prompts.insert(EncodedPrompt {
        id: PromptId(0),
        token_ids: vec![5, 6, 7, 8],
        pixel_values: None,
        image_grids: Vec::new(),
        answer: String::new(),
        verifier: "math".into(),
        question: String::new(),
        meta: None,
    });
    let snapshot = Snapshot {
        model: RwLock::new(loaded.model),
        vars: loaded.trainable_vars.into_iter().collect(),
        device: Device::Cpu,
        prompts,
        decode: Arc::new(|ids: &[u32]| Ok(format!("{ids:?}"))),
        version: AtomicU64::new(0),
    };
    let request = GenerateGroups {
        prompts: vec![GroupRequest {
            prompt_id: PromptId(0),
            prompt_index: 0,
        }],
        n: 2,
        params: greedy(),
    };
    let before = snapshot.generate(&request)?;
    assert!(snapshot.model.read().is_packed());

    // New weights: every LLM tensor moved by noise of its own scale.
    let mut names: Vec<&String> = snapshot.vars.keys().collect();
    names.sort();
    let new: Vec<(String, Tensor)> = names
        .into_iter()
        .map(|name| {
            let t = snapshot.vars[name].as_tensor();
            Ok((name.clone(), (t + t.randn_like(0.0, 0.5)?)?))
        })
        .collect::<Result<_>>()?;
    let version = snapshot.sync(&SyncWeights {
        weights: PolicyWeights {
            version: 1,
            tensors: Arc::new(new.clone()),
        },
    })?;
    assert_eq!(version, 1);
    let after = snapshot.generate(&request)?;
    assert_eq!(after.policy_version, 1);

    // Reference: a fresh, unpacked model holding the new weights.
    let reference = load_policy(&fixture(family), DType::F32, &Device::Cpu, TRAINABLE)?;
    for (name, var) in &reference.trainable_vars {
        let tensor = &new
            .iter()
            .find(|(n, _)| n == name)
            .expect("every var synced")
            .1;
        var.set(tensor)?;
    }
    assert!(!reference.model.is_packed());
    let input = PromptInput {
        token_ids: vec![5, 6, 7, 8],
        prompt_index: 0,
        pixel_values: None,
        image_grids: Vec::new(),
    };
    let expected = reference
        .model
        .generate_groups(&[input], 2, &greedy(), None, &Device::Cpu)?;
    let expected: Vec<Vec<u32>> = expected[0].iter().map(|r| r.token_ids.clone()).collect();
    assert_eq!(tokens(&after), expected);
    assert_ne!(
        tokens(&before),
        tokens(&after),
        "the new weights change the greedy tokens"
    );
    Ok(())
}
