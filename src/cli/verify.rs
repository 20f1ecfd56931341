//! `r1v2 verify`: score a JSON-lines file of responses with the rule verifiers.
//!
//! Input lines: `{"response", "answer", "verifier", "meta"?, "prompt"?}`. Output lines, in input order:
//! `{"score", "format_ok", "extracted", "reason"}` (plus `"hallucination"` when a verifier sets it).
//! The summary on stdout gives the count, the mean score per verifier, and the verifier failures
//! (errors, panics, timeouts, unknown verifier names), which also score 0 in the output.

use std::collections::BTreeMap;
use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use r1v2_actors::verifiers::config::VerifiersConfig;
use r1v2_actors::verifiers::registry::{VerifierRegistry, VerifyFailure, VerifyRequest};
use serde::Deserialize;

/// Score a JSON-lines file of responses.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Input JSON lines: {"response", "answer", "verifier", "meta"?, "prompt"?}.
    #[arg(long)]
    pub input: PathBuf,
    /// Output JSON lines, one verdict per input line, in order.
    #[arg(long)]
    pub output: PathBuf,
    /// Verifier config (TOML); the defaults when absent.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// One input line.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    response: String,
    answer: String,
    verifier: String,
    #[serde(default)]
    meta: serde_json::Value,
    #[serde(default)]
    prompt: String,
}

/// Read the input lines with their line numbers; a bad line is an error naming the file and the line number. Blank lines are skipped.
fn read_requests(path: &Path) -> crate::Result<(Vec<usize>, Vec<VerifyRequest>)> {
    let file = std::fs::File::open(path).map_err(|source| crate::Error::Io {
        path: path.into(),
        source,
    })?;
    let (mut line_numbers, mut requests) = (Vec::new(), Vec::new());
    for (index, line) in std::io::BufReader::new(file).lines().enumerate() {
        let at = |msg: String| crate::Error::File {
            path: path.into(),
            msg: format!("line {}: {msg}", index + 1),
        };
        let line = line.map_err(|e| at(e.to_string()))?;
        if line.trim().is_empty() {
            continue;
        }
        let parsed: Line = serde_json::from_str(&line).map_err(|e| at(e.to_string()))?;
        line_numbers.push(index + 1);
        requests.push(VerifyRequest {
            verifier: parsed.verifier,
            prompt: parsed.prompt,
            response: parsed.response,
            answer: parsed.answer,
            meta: parsed.meta,
        });
    }
    Ok((line_numbers, requests))
}

/// Per-verifier tallies for the summary.
#[derive(Default)]
struct Tally {
    count: usize,
    score_sum: f64,
    failures: usize,
}

impl VerifyArgs {
    /// Run the subcommand.
    pub fn run(self) -> anyhow::Result<()> {
        let config = match &self.config {
            Some(path) => VerifiersConfig::from_toml_file(path)?,
            None => VerifiersConfig::default(),
        };
        let registry = VerifierRegistry::from_config(&config)?;
        let (line_numbers, requests) = read_requests(&self.input)?;
        let started = std::time::Instant::now();
        let outcomes = registry.try_verify_batch(&requests);

        let file = std::fs::File::create(&self.output)
            .with_context(|| format!("{}", self.output.display()))?;
        let mut out = BufWriter::new(file);
        let mut tallies: BTreeMap<&str, Tally> = BTreeMap::new();
        let mut failures: Vec<(usize, VerifyFailure)> = Vec::new();
        for (index, (request, outcome)) in requests.iter().zip(outcomes).enumerate() {
            let tally = tallies.entry(request.verifier.as_str()).or_default();
            tally.count += 1;
            let verdict = match outcome {
                Ok(verdict) => verdict,
                Err(failure) => {
                    tally.failures += 1;
                    failures.push((index, failure.clone()));
                    failure.into_verdict()
                }
            };
            tally.score_sum += f64::from(verdict.score);
            serde_json::to_writer(&mut out, &verdict)?;
            out.write_all(b"\n")?;
        }
        out.flush()
            .with_context(|| format!("{}", self.output.display()))?;

        println!(
            "verified {} lines in {:.2} s -> {}",
            requests.len(),
            started.elapsed().as_secs_f64(),
            self.output.display()
        );
        println!(
            "{:<16} {:>7} {:>10} {:>9}",
            "verifier", "count", "mean", "failures"
        );
        for (name, tally) in &tallies {
            let mean = tally.score_sum / tally.count.max(1) as f64;
            println!(
                "{name:<16} {:>7} {mean:>10.4} {:>9}",
                tally.count, tally.failures
            );
        }
        for (index, failure) in failures.iter().take(20) {
            println!(
                "{}:{}: {failure}",
                self.input.display(),
                line_numbers[*index]
            );
        }
        if failures.len() > 20 {
            println!("... and {} more failures", failures.len() - 20);
        }
        Ok(())
    }
}
