//! The smoke-test task of `configs/tiny.toml` (`data.path = "demo-colour"`): "which colour fills the image?",
//! four options, answered by letter and checked by the `choice` verifier, on 56 x 56 PNGs of one colour with
//! seeded per-pixel noise; a probe set of "describe the image" prompts whose annotation lists the one object
//! there (a square). A random model answers it right by chance, so every stage (MPO pairs included) has work
//! within a few steps.

use std::path::Path;

use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{write_jsonl, TaskFiles};
use crate::{Error, Result};

/// The colours, in option order (A, B, C, D).
const COLOURS: [(&str, [u8; 3]); 4] = [
    ("red", [200, 40, 40]),
    ("green", [40, 170, 60]),
    ("blue", [40, 70, 200]),
    ("yellow", [220, 200, 40]),
];

/// Images per colour.
const PER_COLOUR: usize = 8;

/// Writes the colour task under `dir`: `images/*.png`, `train.jsonl` and `probes.jsonl`; its held-out split
/// is the training set itself (it is a smoke test, not a benchmark).
pub fn write_colour_task(dir: &Path) -> Result<TaskFiles> {
    let images = dir.join("images");
    std::fs::create_dir_all(&images).map_err(|source| Error::Io {
        path: images.clone(),
        source,
    })?;
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
    let files = TaskFiles {
        train: dir.join("train.jsonl"),
        heldout: dir.join("train.jsonl"),
        probes: dir.join("probes.jsonl"),
    };
    write_jsonl(&files.probes, &probes)?;
    write_jsonl(&files.train, &train)?;
    Ok(files)
}
