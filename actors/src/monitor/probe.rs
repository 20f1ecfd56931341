//! The probe set: a fixed set of prompts with image annotations, run through the generator on the
//! [`super::ProbeSchedule`] so the hallucination rate is comparable across the run.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// One probe prompt: a dataset line whose `meta` carries the image's annotation
/// (`{"objects": [...], "attributes": {...}?}`, read by the grounding verifier).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeItem {
    /// The line's id.
    pub id: String,
    /// The prompt.
    pub question: String,
    /// Image paths, relative to the probe file.
    pub images: Vec<PathBuf>,
    /// The reference answer (unused by the grounding check; kept for the dataset shape).
    #[serde(default)]
    pub answer: String,
    /// The verifier name (default "grounding").
    #[serde(default = "default_verifier")]
    pub verifier: String,
    /// The annotation.
    pub meta: serde_json::Value,
}

fn default_verifier() -> String {
    "grounding".to_string()
}

/// The probe set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProbeSet {
    /// The probe prompts, in file order.
    pub items: Vec<ProbeItem>,
}

impl ProbeSet {
    /// Parses JSONL text (blank lines skipped); `path` names the file in errors, which give the line.
    /// A line without `meta.objects` as an array is an error: the probe could not be checked.
    pub fn from_jsonl(text: &str, path: &Path) -> Result<Self> {
        let mut items = Vec::new();
        for (index, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let at = format!("{}:{}", path.display(), index + 1);
            let item: ProbeItem = serde_json::from_str(line)
                .map_err(|e| Error::msg(format!("probe set {at}: {e}")))?;
            if !item.meta.get("objects").is_some_and(|o| o.is_array()) {
                return Err(Error::msg(format!(
                    "probe set {at}: meta.objects is missing or not an array"
                )));
            }
            items.push(item);
        }
        Ok(Self { items })
    }

    /// Reads and parses a JSONL file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_jsonl(&text, path)
    }
}
