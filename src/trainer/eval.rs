//! Held-out evaluation (`[eval]`): after each stage (and before the first step with `at_start`), one greedy
//! response per held-out prompt with the current policy, judged by the rule verifiers; the probe set's
//! greedy responses judged by the grounding verifier. One [`EvalRecord`] per evaluation in RUN_DIR/eval.jsonl;
//! the responses with their verdicts in RUN_DIR/eval/<label>-step-N.jsonl.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Instant;

use r1v2_actors::monitor::ProbeSet;
use r1v2_actors::protocol::{ActorName, GroupRequest, Verify};
use r1v2_actors::rl::PromptId;
use r1v2_actors::verifiers::grounding::{chair_i, chair_s};
use r1v2_actors::verifiers::Verdict;
use serde::{Deserialize, Serialize};

use super::Controller;
use crate::data::Sample;
use crate::{Error, Result};

/// Held-out prompts live in the prompt bank above the dataset's indices, below the probes'.
const EVAL_ID_BASE: u64 = 1 << 47;
/// The probes of an evaluation (not the monitor's ids: those are encoded once, the same prompts).
const EVAL_PROBE_ID_BASE: u64 = (1 << 47) + (1 << 40);

/// The file beside metrics.jsonl.
pub const EVAL_FILE: &str = "eval.jsonl";

/// A prompt to answer greedily: question, image files, reference answer, verifier, meta.
type EvalPrompt = (
    String,
    Vec<std::path::PathBuf>,
    String,
    String,
    Option<serde_json::Value>,
);

/// What an evaluation runs on.
#[derive(Debug, Clone)]
pub struct EvalSet {
    pub samples: Vec<Sample>,
    pub probes: Option<ProbeSet>,
}

/// Accuracy over a subset (a `meta.set` or `meta.kind`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Share {
    pub accuracy: f64,
    pub n: usize,
}

/// One evaluation: a line of RUN_DIR/eval.jsonl.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    /// `start`, or the stage just finished (`sft`, `mpo`, `grpo`).
    pub label: String,
    /// Steps completed when it ran.
    pub step: u64,
    /// Held-out accuracy: the share of responses the rule verifier scores 1.
    pub accuracy: f64,
    /// Its standard error, sqrt(p (1 - p) / n).
    pub stderr: f64,
    pub n: usize,
    /// The share of responses whose final answer the verifier could find (the format reward's test).
    pub format_rate: f64,
    /// Mean response length in tokens.
    pub mean_length: f64,
    /// Accuracy per `meta.set` and per `meta.kind` of the held-out lines.
    pub by_set: BTreeMap<String, Share>,
    pub by_kind: BTreeMap<String, Share>,
    /// CHAIR-i on the probe set: unsupported claims / claims (none without probes or claims).
    pub hallucination_rate: Option<f64>,
    /// CHAIR-s: the share of probe responses with an unsupported claim.
    pub hallucinating_responses: Option<f64>,
    /// Claims the probe responses made.
    pub claims: u64,
    pub seconds: f64,
}

impl EvalRecord {
    /// Reads RUN_DIR/eval.jsonl; errors name the file and line.
    pub fn load_all(path: &std::path::Path) -> Result<Vec<EvalRecord>> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.into(),
            source,
        })?;
        text.lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
            .map(|(n, line)| {
                serde_json::from_str(line).map_err(|e| Error::File {
                    path: path.into(),
                    msg: format!("line {}: {e}", n + 1),
                })
            })
            .collect()
    }
}

/// Accuracy of `verdicts` grouped by a string field of each sample's `meta`.
fn shares<'a>(
    samples: &[Sample],
    verdicts: impl Iterator<Item = &'a Verdict> + Clone,
    field: &str,
) -> BTreeMap<String, Share> {
    let mut sums = BTreeMap::<String, (f64, usize)>::new();
    for (sample, verdict) in samples.iter().zip(verdicts) {
        let Some(key) = sample
            .meta
            .as_ref()
            .and_then(|m| m.get(field))
            .and_then(|v| v.as_str())
        else {
            continue;
        };
        let entry = sums.entry(key.to_string()).or_default();
        entry.0 += f64::from(u8::from(verdict.score >= 1.0));
        entry.1 += 1;
    }
    sums.into_iter()
        .map(|(key, (correct, n))| {
            (
                key,
                Share {
                    accuracy: correct / n as f64,
                    n,
                },
            )
        })
        .collect()
}

impl Controller {
    /// Greedy params for evaluation: temperature 0, no repetition penalty, the run's stop tokens.
    fn eval_sampling(&self) -> r1v2_actors::generate::SamplingParams {
        let mut params = self.sampling();
        params.temperature = 0.0;
        params.top_p = 1.0;
        params.repetition_penalty = 1.0;
        if let Some(tokens) = self.config.eval.as_ref().and_then(|e| e.max_new_tokens) {
            params.max_new_tokens = tokens;
        }
        params
    }

    /// One greedy response per prompt (encoded into the bank from `base` on); the verdicts in prompt order
    /// and the mean response length.
    async fn greedy_verdicts(
        &mut self,
        prompts: &[EvalPrompt],
        base: u64,
        label: &str,
    ) -> Result<(Vec<Verdict>, Vec<String>, f64)> {
        let mut requests = Vec::with_capacity(prompts.len());
        for (i, (question, images, answer, verifier, meta)) in prompts.iter().enumerate() {
            let id = PromptId(base + i as u64);
            self.encode_into_bank(id, question, images, answer, verifier, meta.clone())?;
            requests.push(GroupRequest {
                prompt_id: id,
                prompt_index: base + i as u64,
            });
        }
        let request = self.generate_request_with(requests, 1, self.eval_sampling());
        let rollouts = self.collect_rollouts(request, label).await?;
        let lengths = rollouts
            .groups
            .iter()
            .flat_map(|g| &g.samples)
            .map(|s| s.token_ids.len() as f64);
        let mean_length = r1v2_actors::rl::scoring::mean(lengths);
        let texts = rollouts
            .groups
            .iter()
            .flat_map(|g| &g.samples)
            .map(|s| s.text.clone())
            .collect();
        let items = self.verify_requests(&rollouts)?;
        let verdicts = self
            .watchdog
            .call(
                ActorName::RuleVerifier,
                label,
                self.actors.verifier.send(Verify { items }),
            )
            .await??
            .verdicts;
        Ok((verdicts, texts, mean_length))
    }

    /// Evaluates the current policy (see the module docs), appends the record to RUN_DIR/eval.jsonl and
    /// logs it. Nothing without `[eval]`.
    pub(super) async fn evaluate(&mut self, label: &str) -> Result<Option<EvalRecord>> {
        let Some(set) = self.eval.clone() else {
            return Ok(None);
        };
        let started = Instant::now();
        self.progress.message(&format!("evaluating ({label})"));
        let prompts: Vec<_> = set
            .samples
            .iter()
            .map(|s| {
                (
                    s.question.clone(),
                    s.images.clone(),
                    s.answer.clone(),
                    s.verifier.clone(),
                    s.meta.clone(),
                )
            })
            .collect();
        let (verdicts, texts, mean_length) = self
            .greedy_verdicts(&prompts, EVAL_ID_BASE, "GenerateGroups (eval)")
            .await?;
        let mut responses_out: Vec<serde_json::Value> = set
            .samples
            .iter()
            .zip(&texts)
            .zip(&verdicts)
            .map(|((s, text), v)| {
                serde_json::json!({"id": s.id, "response": text, "answer": s.answer,
                    "score": v.score, "reason": v.reason})
            })
            .collect();
        let n = verdicts.len();
        let correct = verdicts.iter().filter(|v| v.score >= 1.0).count();
        let accuracy = correct as f64 / n.max(1) as f64;
        let (mut rate, mut responses, mut claims) = (None, None, 0);
        if let Some(probes) = &set.probes {
            let prompts: Vec<_> = probes
                .items
                .iter()
                .map(|p| {
                    (
                        p.question.clone(),
                        p.images.clone(),
                        p.answer.clone(),
                        p.verifier.clone(),
                        Some(p.meta.clone()),
                    )
                })
                .collect();
            let (probe_verdicts, probe_texts, _) = self
                .greedy_verdicts(&prompts, EVAL_PROBE_ID_BASE, "GenerateGroups (eval probes)")
                .await?;
            responses_out.extend(
                probes
                    .items
                    .iter()
                    .zip(&probe_texts)
                    .zip(&probe_verdicts)
                    .map(|((p, text), v)| {
                        serde_json::json!({"id": p.id, "response": text, "score": v.score,
                        "reason": v.reason})
                    }),
            );
            rate = chair_i(&probe_verdicts);
            responses = chair_s(&probe_verdicts);
            claims = probe_verdicts
                .iter()
                .filter_map(|v| v.hallucination.as_ref())
                .map(|f| f.claims_checked as u64)
                .sum();
        }
        let record = EvalRecord {
            label: label.to_string(),
            step: self.state.step,
            accuracy,
            stderr: (accuracy * (1.0 - accuracy) / n.max(1) as f64).sqrt(),
            n,
            format_rate: verdicts.iter().filter(|v| v.format_ok).count() as f64 / n.max(1) as f64,
            mean_length,
            by_set: shares(&set.samples, verdicts.iter(), "set"),
            by_kind: shares(&set.samples, verdicts.iter(), "kind"),
            hallucination_rate: rate,
            hallucinating_responses: responses,
            claims,
            seconds: started.elapsed().as_secs_f64(),
        };
        // Every response with its verdict: RUN_DIR/eval/<label>-step-N.jsonl.
        let dir = self.run.root().join("eval");
        std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
            path: dir.clone(),
            source,
        })?;
        let responses_path = dir.join(format!("{label}-step-{}.jsonl", self.state.step));
        let text: String = responses_out.iter().map(|r| format!("{r}\n")).collect();
        std::fs::write(&responses_path, text).map_err(|source| Error::Io {
            path: responses_path,
            source,
        })?;
        let path = self.run.root().join(EVAL_FILE);
        let line = serde_json::to_string(&record).map_err(|e| Error::Msg(e.to_string()))?;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
        writeln!(file, "{line}").map_err(|source| Error::Io { path, source })?;
        tracing::info!(
            label,
            step = record.step,
            accuracy = record.accuracy,
            stderr = record.stderr,
            hallucination_rate = record.hallucination_rate.unwrap_or(f64::NAN),
            "held-out eval after {label}: accuracy {:.3} ± {:.3} (n = {n}), hallucination rate {}",
            record.accuracy,
            record.stderr,
            record
                .hallucination_rate
                .map_or("-".into(), |r| format!("{r:.3}"))
        );
        Ok(Some(record))
    }
}
