//! The embedded default task of `r1v2 demo` and `configs/*.toml` with `data.path = "demo"`: "which colour
//! fills the image?", four options, answered by letter and checked by the `choice` verifier.
//!
//! The images are made here (56 x 56 PNGs, one of four colours with seeded per-pixel noise), so the task
//! needs no download and is the same on every machine. A probe set for the hallucination monitor comes with
//! it: "describe the image" prompts whose annotation lists the one object really there (a square), so the
//! grounding verifier counts mentions of anything else as unsupported claims.

use std::io::Write;
use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{Error, Result};

/// The demo run's config (`configs/demo.toml`, embedded so `r1v2 demo` needs no file).
pub const DEMO_CONFIG: &str = include_str!("../configs/demo.toml");

/// The colours, in option order (A, B, C, D).
const COLOURS: [(&str, [u8; 3]); 4] = [
    ("red", [200, 40, 40]),
    ("green", [40, 170, 60]),
    ("blue", [40, 70, 200]),
    ("yellow", [220, 200, 40]),
];

/// Images per colour.
const PER_COLOUR: usize = 8;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.into(),
        source,
    }
}

/// Writes the task under `dir`: `images/*.png`, `train.jsonl` and `probes.jsonl`. Returns the dataset path.
pub fn write_task(dir: &Path) -> Result<PathBuf> {
    let images = dir.join("images");
    std::fs::create_dir_all(&images).map_err(io_err(&images))?;
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut train = Vec::new();
    let mut probes = Vec::new();
    let options: Vec<String> = COLOURS.iter().map(|(name, _)| name.to_string()).collect();
    for index in 0..PER_COLOUR {
        for (option, (name, rgb)) in COLOURS.iter().enumerate() {
            let file = format!("{name}_{index}.png");
            let path = images.join(&file);
            let image = RgbImage::from_fn(56, 56, |_, _| {
                Rgb(rgb.map(|c| (c as i32 + rng.gen_range(-30..=30)).clamp(0, 255) as u8))
            });
            image.save(&path).map_err(|e| Error::File {
                path: path.clone(),
                msg: e.to_string(),
            })?;
            let letter = (b'A' + option as u8) as char;
            train.push(serde_json::json!({
                "id": format!("colour-{name}-{index}"),
                "question": "Which colour fills the image? A. red B. green C. blue D. yellow. Answer with the letter.",
                "images": [format!("images/{file}")],
                "answer": letter.to_string(),
                "verifier": "choice",
                "meta": {"options": options},
            }));
            if index == 0 {
                probes.push(serde_json::json!({
                    "id": format!("probe-{name}"),
                    "question": "Describe the image.",
                    "images": [format!("images/{file}")],
                    "meta": {"objects": ["square"]},
                }));
            }
        }
    }
    write_jsonl(&dir.join("probes.jsonl"), &probes)?;
    let path = dir.join("train.jsonl");
    write_jsonl(&path, &train)?;
    Ok(path)
}

fn write_jsonl(path: &Path, lines: &[serde_json::Value]) -> Result<()> {
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
    fn the_demo_task_loads_as_a_dataset() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_task(dir.path()).unwrap();
        let data = load_jsonl(&path, OnBadLine::Error).unwrap();
        assert_eq!(data.samples.len(), 4 * PER_COLOUR);
        assert!(data.samples.iter().all(|s| s.images[0].is_file()));
        let answers: std::collections::BTreeSet<_> =
            data.samples.iter().map(|s| s.answer.clone()).collect();
        assert_eq!(answers.len(), 4);
        let probes =
            r1v2_actors::monitor::ProbeSet::load(&dir.path().join("probes.jsonl")).unwrap();
        assert_eq!(probes.items.len(), 4);
    }
}
