//! Prompt datasets: JSONL files of `{"id", "question", "images", "answer", "verifier", "solution"?, "meta"?}` lines (the
//! shape MathVista / MMMU-style sets convert to) loaded into typed [`Sample`]s, and a [`DataLoader`] that
//! shuffles per epoch with a seeded ChaCha RNG and hands out batches. Its [`DataCursor`] (seed, epoch,
//! position) is all a resumed run needs to continue with exactly the batches an uninterrupted run would see.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// What to do with a dataset line that cannot be parsed or names a missing image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnBadLine {
    /// Log the line (file and line number), count it, and go on with the rest of the file.
    #[default]
    Skip,
    /// Stop the load with an error naming the file and line.
    Error,
}

/// Where a dataset comes from and how strict its loading is; one `[data]`-style config section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetConfig {
    /// The JSONL file; image paths inside it are relative to its directory.
    pub path: PathBuf,
    /// `"skip"` (default) or `"error"`: what an unparsable line or a missing image does.
    #[serde(default)]
    pub on_bad_line: OnBadLine,
}

/// One dataset line as written in the file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSample {
    id: String,
    question: String,
    #[serde(default)]
    images: Vec<PathBuf>,
    answer: String,
    verifier: String,
    #[serde(default)]
    solution: Option<String>,
    #[serde(default)]
    meta: Option<serde_json::Value>,
}

/// One prompt: a question, its images, the reference answer and the verifier that checks responses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Unique id within its dataset.
    pub id: String,
    /// The question text (the image placeholders are added by the chat template, not here).
    pub question: String,
    /// Image files, resolved against the dataset file's directory; each existed at load time.
    pub images: Vec<PathBuf>,
    /// The reference answer the rule verifier compares against.
    pub answer: String,
    /// Name of the verifier in the registry (`"math"`, `"choice"`, a plugin name ...).
    pub verifier: String,
    /// A worked response (reasoning + final answer): the SFT warm start's target when given, else `answer`.
    #[serde(default)]
    pub solution: Option<String>,
    /// Free-form extra fields (source set, difficulty, annotations for hallucination checks ...).
    pub meta: Option<serde_json::Value>,
}

/// A line that was skipped, with the reason (file and line are in the message too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadLine {
    /// 1-based line number in the file.
    pub line: usize,
    /// `path:line: reason`, as logged.
    pub message: String,
}

/// A loaded dataset: the good samples in file order and the lines that were skipped.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// The file it was read from.
    pub path: PathBuf,
    /// Samples in file order.
    pub samples: Vec<Sample>,
    /// Lines skipped under [`OnBadLine::Skip`] (always empty under [`OnBadLine::Error`]).
    pub bad_lines: Vec<BadLine>,
}

impl Dataset {
    /// Loads the dataset a config section names.
    pub fn from_config(config: &DatasetConfig) -> Result<Self> {
        load_jsonl(&config.path, config.on_bad_line)
    }
}

/// Reads a JSONL dataset. Blank lines are ignored. A line that is not valid JSON, has a missing or unknown
/// field, repeats an earlier id, or names an image file that does not exist is either skipped (logged with
/// `path:line`, counted in [`Dataset::bad_lines`]) or ends the load with an error naming file and line.
pub fn load_jsonl(path: &Path, on_bad_line: OnBadLine) -> Result<Dataset> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let base_dir = path.parent().unwrap_or(Path::new("."));
    let mut samples = Vec::new();
    let mut bad_lines = Vec::new();
    let mut seen_ids = HashSet::new();
    for (index, line) in text.lines().enumerate() {
        let line_number = index + 1;
        if line.trim().is_empty() {
            continue;
        }
        match parse_line(line, base_dir, &seen_ids) {
            Ok(sample) => {
                seen_ids.insert(sample.id.clone());
                samples.push(sample);
            }
            Err(reason) => match on_bad_line {
                OnBadLine::Error => {
                    return Err(Error::File {
                        path: path.to_path_buf(),
                        msg: format!("line {line_number}: {reason}"),
                    })
                }
                OnBadLine::Skip => {
                    let message = format!("{}:{line_number}: {reason}", path.display());
                    tracing::warn!(target: "r1v2::data", "skipping dataset line: {message}");
                    bad_lines.push(BadLine {
                        line: line_number,
                        message,
                    });
                }
            },
        }
    }
    if !bad_lines.is_empty() {
        tracing::warn!(
            target: "r1v2::data",
            "{}: skipped {} bad line(s), kept {} sample(s)",
            path.display(),
            bad_lines.len(),
            samples.len()
        );
    }
    Ok(Dataset {
        path: path.to_path_buf(),
        samples,
        bad_lines,
    })
}

/// Parses and checks one line; the error is the reason, without file and line.
fn parse_line(
    line: &str,
    base_dir: &Path,
    seen_ids: &HashSet<String>,
) -> std::result::Result<Sample, String> {
    let raw: RawSample = serde_json::from_str(line).map_err(|e| e.to_string())?;
    if seen_ids.contains(&raw.id) {
        return Err(format!("duplicate id `{}`", raw.id));
    }
    let mut images = Vec::with_capacity(raw.images.len());
    for image in &raw.images {
        let resolved = base_dir.join(image);
        if !resolved.is_file() {
            return Err(format!(
                "image `{}` not found (looked for {})",
                image.display(),
                resolved.display()
            ));
        }
        images.push(resolved);
    }
    Ok(Sample {
        id: raw.id,
        question: raw.question,
        images,
        answer: raw.answer,
        verifier: raw.verifier,
        solution: raw.solution,
        meta: raw.meta,
    })
}

/// Where a [`DataLoader`] stands: enough to rebuild it exactly (saved in the trainer state).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataCursor {
    /// Seed of the shuffling RNG; epoch `e` uses the ChaCha8 stream `e` of this seed.
    pub seed: u64,
    /// Current epoch (0-based).
    pub epoch: u64,
    /// Index into the current epoch's order of the next sample to hand out.
    pub position: usize,
    /// Number of samples the loader was built over; a resume on a different dataset is an error.
    pub dataset_len: usize,
}

/// Hands out batches of samples, reshuffled every epoch by a seeded RNG; a batch that runs past the end
/// of an epoch continues with the next epoch's order, so every batch is full.
#[derive(Debug, Clone)]
pub struct DataLoader {
    samples: Vec<Sample>,
    batch_size: usize,
    cursor: DataCursor,
    /// The current epoch's permutation of `samples` indices.
    order: Vec<usize>,
}

impl DataLoader {
    /// A loader at the start of epoch 0.
    pub fn new(samples: Vec<Sample>, batch_size: usize, seed: u64) -> Result<Self> {
        let dataset_len = samples.len();
        Self::with_cursor(
            samples,
            batch_size,
            DataCursor {
                seed,
                epoch: 0,
                position: 0,
                dataset_len,
            },
        )
    }

    /// A loader that continues from a saved cursor (same samples, same order as the run that saved it).
    pub fn with_cursor(
        samples: Vec<Sample>,
        batch_size: usize,
        cursor: DataCursor,
    ) -> Result<Self> {
        if samples.is_empty() {
            return Err(Error::Msg("data loader: the dataset has no samples".into()));
        }
        if batch_size == 0 {
            return Err(Error::Msg(
                "data loader: batch_size must be at least 1".into(),
            ));
        }
        if cursor.dataset_len != samples.len() {
            return Err(Error::Msg(format!(
                "data loader: the cursor was saved over {} samples but the dataset has {}",
                cursor.dataset_len,
                samples.len()
            )));
        }
        if cursor.position > samples.len() {
            return Err(Error::Msg(format!(
                "data loader: cursor position {} is past the {} samples",
                cursor.position,
                samples.len()
            )));
        }
        let order = epoch_order(cursor.seed, cursor.epoch, samples.len());
        Ok(Self {
            samples,
            batch_size,
            cursor,
            order,
        })
    }

    /// The next `batch_size` samples.
    pub fn next_batch(&mut self) -> Vec<Sample> {
        self.next_batch_of(self.batch_size)
    }

    /// The next `n` samples (a stage with its own batch size); the stream is the same whatever the sizes.
    pub fn next_batch_of(&mut self, n: usize) -> Vec<Sample> {
        let mut batch = Vec::with_capacity(n);
        while batch.len() < n {
            if self.cursor.position == self.order.len() {
                self.cursor.epoch += 1;
                self.cursor.position = 0;
                self.order = epoch_order(self.cursor.seed, self.cursor.epoch, self.samples.len());
            }
            batch.push(self.samples[self.order[self.cursor.position]].clone());
            self.cursor.position += 1;
        }
        batch
    }

    /// Where the loader stands now; [`DataLoader::with_cursor`] continues from it.
    pub fn cursor(&self) -> DataCursor {
        self.cursor
    }

    /// Samples per batch.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// All samples, in file order.
    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }
}

/// The permutation of `0..len` used in `epoch`: a function of (seed, epoch) only, so no RNG state has to
/// be saved; each epoch reads its own ChaCha8 stream.
pub fn epoch_order(seed: u64, epoch: u64, len: usize) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(epoch);
    let mut order: Vec<usize> = (0..len).collect();
    order.shuffle(&mut rng);
    order
}

#[cfg(test)]
#[path = "data_tests.rs"]
mod tests;
