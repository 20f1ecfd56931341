//! The embedded default task of `r1v2 demo` (and of configs with `data.path = "demo"`): visual reasoning
//! over generated shape scenes ([`shapes`]) and real handwritten digits ([`digits`]), with numeric answers in
//! `\boxed{}` after `<think>...</think>` (math verifier, format reward), "list the shapes" questions judged
//! by the grounding verifier against each scene's annotation, and a held-out split for evaluation.
//!
//! [`write_task`] writes it in the pipeline's dataset format (JSONL + PNG; every line carries its worked
//! `solution`, the SFT target), so it doubles as an example of that format. Everything is made from fixed
//! seeds: the same files on every machine, nothing downloaded. [`run`] is `r1v2 demo` itself: the staged run,
//! the ablations and the table.

pub mod colour;
pub mod digits;
pub mod run;
pub mod shapes;
pub mod table;
pub mod vision_pretrain;

use std::io::Write;
use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::{Error, Result};

/// The demo run's config (`configs/demo.toml`, embedded so `r1v2 demo` needs no file).
pub const DEMO_CONFIG: &str = include_str!("../../configs/demo.toml");

/// `r1v2 demo --quick` (`configs/demo_quick.toml`).
pub const QUICK_CONFIG: &str = include_str!("../../configs/demo_quick.toml");

/// How many lines each split has.
const TRAIN_SHAPES: usize = 1200;
const TRAIN_LISTS: usize = 200;
const TRAIN_DIGITS: usize = 600;
/// Held-out lines: 900 in all, so the accuracy's standard error is about 0.015 (180 gave 0.035, as large as
/// the differences the stages make).
pub const HELDOUT_SHAPES: usize = 600;
pub const HELDOUT_DIGITS: usize = 300;
/// Probe ("list the shapes") questions.
pub const PROBES: usize = 96;

/// The share of the digit images that only the held-out split uses.
const HELDOUT_DIGIT_SHARE: f64 = 0.2;

/// The task's files under a directory.
#[derive(Debug, Clone)]
pub struct TaskFiles {
    /// Training prompts (shapes questions, "list the shapes", digit sums).
    pub train: PathBuf,
    /// Held-out prompts for evaluation (new scenes, digit images never used in training).
    pub heldout: PathBuf,
    /// Held-out "list the shapes" prompts: the monitor's probe set and the hallucination evaluation.
    pub probes: PathBuf,
}

impl TaskFiles {
    /// Where [`write_task`] puts them under `dir`.
    pub fn under(dir: &Path) -> TaskFiles {
        TaskFiles {
            train: dir.join("train.jsonl"),
            heldout: dir.join("heldout.jsonl"),
            probes: dir.join("probes.jsonl"),
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.into(),
        source,
    }
}

/// The digit images (indices into [`digits::load`]) shuffled by `rng` and split into the training pool and
/// the held-out pool ([`HELDOUT_DIGIT_SHARE`]).
fn digit_split(count: usize, rng: &mut ChaCha8Rng) -> (Vec<usize>, Vec<usize>) {
    let mut order: Vec<usize> = (0..count).collect();
    order.shuffle(rng);
    let heldout = order.split_off(count - (count as f64 * HELDOUT_DIGIT_SHARE) as usize);
    (order, heldout)
}

/// [`write_task`]'s split of the digit images (its stream's first draws, repeated): the training pool, which
/// anything besides the held-out evaluation may see, and the held-out pool.
pub fn digit_pools(count: usize) -> (Vec<usize>, Vec<usize>) {
    digit_split(count, &mut ChaCha8Rng::seed_from_u64(TASK_SEED))
}

/// The seed of [`write_task`]'s stream.
const TASK_SEED: u64 = 7;

struct Writer {
    dir: PathBuf,
    rng: ChaCha8Rng,
}

impl Writer {
    fn save(&mut self, name: &str, image: image::RgbImage) -> Result<String> {
        let path = self.dir.join("images").join(format!("{name}.png"));
        image.save(&path).map_err(|e| Error::File {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        Ok(format!("images/{name}.png"))
    }

    fn shape_lines(
        &mut self,
        split: &str,
        questions: usize,
        lists: usize,
    ) -> Result<Vec<serde_json::Value>> {
        let mut lines = Vec::with_capacity(questions + lists);
        for i in 0..questions + lists {
            let scene = shapes::Scene::random(&mut self.rng);
            let image = scene.render(&mut self.rng);
            let id = format!("{split}-shapes-{i}");
            let file = self.save(&id, image)?;
            if i < questions {
                let question = shapes::Question::random(&scene, &mut self.rng);
                lines.push(serde_json::json!({
                    "id": id, "question": question.text(), "images": [file],
                    "answer": question.answer(&scene).to_string(), "verifier": "math",
                    "solution": question.trace(&scene),
                    "meta": {"set": "shapes", "kind": question.kind()},
                }));
            } else {
                let mut meta = scene.annotation();
                meta["set"] = "shapes".into();
                meta["kind"] = "list".into();
                // Training "list" answers must name every shape, not only avoid false ones.
                meta["recall"] = true.into();
                lines.push(serde_json::json!({
                    "id": id, "question": shapes::LIST_QUESTION, "images": [file],
                    "answer": scene.listing(), "verifier": "grounding",
                    "solution": shapes::list_trace(&scene), "meta": meta,
                }));
            }
        }
        Ok(lines)
    }

    fn digit_lines(
        &mut self,
        split: &str,
        count: usize,
        all: &[digits::Digit],
        pool: &[usize],
    ) -> Result<Vec<serde_json::Value>> {
        let mut lines = Vec::with_capacity(count);
        for i in 0..count {
            let scene = digits::DigitScene::random(pool, &mut self.rng);
            let image = scene.render(all, &mut self.rng);
            let id = format!("{split}-digits-{i}");
            let file = self.save(&id, image)?;
            let labels = scene.labels(all);
            let sum: u32 = labels.iter().map(|&d| d as u32).sum();
            lines.push(serde_json::json!({
                "id": id, "question": digits::SUM_QUESTION, "images": [file],
                "answer": sum.to_string(), "verifier": "math",
                "solution": digits::sum_trace(&labels),
                "meta": {"set": "digits", "kind": "sum"},
            }));
        }
        Ok(lines)
    }
}

/// Writes the task under `dir`: `images/*.png`, `train.jsonl`, `heldout.jsonl` and `probes.jsonl`.
pub fn write_task(dir: &Path) -> Result<TaskFiles> {
    let images = dir.join("images");
    std::fs::create_dir_all(&images).map_err(io_err(&images))?;
    let files = TaskFiles::under(dir);
    let all = digits::load()?;
    let mut writer = Writer {
        dir: dir.to_path_buf(),
        rng: ChaCha8Rng::seed_from_u64(TASK_SEED),
    };
    // The stream's first draws split the digits (as `digit_pools` repeats them).
    let (train_pool, heldout_pool) = digit_split(all.len(), &mut writer.rng);

    let mut train = writer.shape_lines("train", TRAIN_SHAPES, TRAIN_LISTS)?;
    train.extend(writer.digit_lines("train", TRAIN_DIGITS, &all, &train_pool)?);
    train.shuffle(&mut writer.rng);
    let mut heldout = writer.shape_lines("heldout", HELDOUT_SHAPES, 0)?;
    heldout.extend(writer.digit_lines("heldout", HELDOUT_DIGITS, &all, &heldout_pool)?);
    let mut probes = writer.shape_lines("probe", 0, PROBES)?;
    for probe in &mut probes {
        // The probe set measures false claims only (CHAIR), as the monitor does.
        if let Some(meta) = probe["meta"].as_object_mut() {
            meta.remove("recall");
        }
        if let Some(line) = probe.as_object_mut() {
            line.remove("solution");
        }
    }
    write_jsonl(&files.train, &train)?;
    write_jsonl(&files.heldout, &heldout)?;
    write_jsonl(&files.probes, &probes)?;
    Ok(files)
}

pub(crate) fn write_jsonl(path: &Path, lines: &[serde_json::Value]) -> Result<()> {
    let mut file = std::fs::File::create(path).map_err(io_err(path))?;
    for line in lines {
        writeln!(file, "{line}").map_err(io_err(path))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{load_jsonl, OnBadLine};

    #[test]
    fn the_demo_task_loads_as_datasets_and_its_solutions_verify() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_task(dir.path()).unwrap();
        let train = load_jsonl(&files.train, OnBadLine::Error).unwrap();
        let heldout = load_jsonl(&files.heldout, OnBadLine::Error).unwrap();
        assert_eq!(
            train.samples.len(),
            TRAIN_SHAPES + TRAIN_LISTS + TRAIN_DIGITS
        );
        assert_eq!(heldout.samples.len(), HELDOUT_SHAPES + HELDOUT_DIGITS);
        let probes = r1v2_actors::monitor::ProbeSet::load(&files.probes).unwrap();
        assert_eq!(probes.items.len(), PROBES);
        // Every worked solution is right by the verifier that judges the line (the demo config's).
        let config =
            crate::config::TrainConfig::from_toml_str(DEMO_CONFIG, Path::new(".")).unwrap();
        let registry =
            r1v2_actors::verifiers::registry::VerifierRegistry::from_config(&config.verifiers)
                .unwrap();
        for sample in train.samples.iter().chain(&heldout.samples).step_by(7) {
            assert!(sample.images[0].is_file());
            let solution = sample.solution.clone().unwrap();
            let verdict = registry.verify(&r1v2_actors::verifiers::registry::VerifyRequest {
                verifier: sample.verifier.clone(),
                prompt: sample.question.clone(),
                response: solution.clone(),
                answer: sample.answer.clone(),
                meta: sample.meta.clone().unwrap_or_default(),
            });
            assert_eq!(
                verdict.score, 1.0,
                "{}: {solution}: {}",
                sample.id, verdict.reason
            );
        }
        // Same seed, same files.
        let again = tempfile::tempdir().unwrap();
        let files2 = write_task(again.path()).unwrap();
        assert_eq!(
            std::fs::read(&files.train).unwrap(),
            std::fs::read(&files2.train).unwrap()
        );
    }
}
