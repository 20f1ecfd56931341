//! The digits set, from real handwriting: the UCI "Optical Recognition of Handwritten Digits" test set
//! (1,797 8 x 8 greyscale images, 0..16 ink levels; E. Alpaydin and C. Kaynak, 1998; CC BY 4.0), shipped as
//! `data/digits.csv.gz` exactly as scikit-learn's wheel carries it (64 pixels then the label per line; see
//! `data/DIGITS.md`). Two or three digits, each scaled to 24 px, are tiled into cells of one 84 x 84 image;
//! the question is their sum, the trace reads them left to right and adds them up.

use std::io::Read;

use image::{Rgb, RgbImage};
use rand::seq::SliceRandom;
use rand::Rng;

use crate::{Error, Result};

const CSV_GZ: &[u8] = include_bytes!("data/digits.csv.gz");
const SCALE: u32 = 3;

/// One 8 x 8 digit.
#[derive(Debug, Clone)]
pub struct Digit {
    /// Ink levels 0..=16, row-major.
    pub pixels: [u8; 64],
    pub label: u8,
}

/// Every digit of the shipped file, in file order.
pub fn load() -> Result<Vec<Digit>> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(CSV_GZ)
        .read_to_string(&mut text)
        .map_err(|e| Error::Msg(format!("src/demo/data/digits.csv.gz: {e}")))?;
    text.lines()
        .enumerate()
        .map(|(n, line)| {
            let bad = |what: &str| Error::Msg(format!("digits.csv.gz:{}: {what}", n + 1));
            let values: Vec<u8> = line
                .split(',')
                .map(|v| v.trim().parse::<f32>().map(|v| v as u8))
                .collect::<std::result::Result<_, _>>()
                .map_err(|_| bad("not a number"))?;
            if values.len() != 65 || values[64] > 9 || values[..64].iter().any(|&v| v > 16) {
                return Err(bad("want 64 pixels in 0..=16 and a label in 0..=9"));
            }
            let mut pixels = [0; 64];
            pixels.copy_from_slice(&values[..64]);
            Ok(Digit {
                pixels,
                label: values[64],
            })
        })
        .collect()
}

/// Digits placed in cells of the 3 x 3 grid (reading order).
#[derive(Debug, Clone)]
pub struct DigitScene {
    /// (cell 0..9, digit index in the file).
    pub placed: Vec<(usize, usize)>,
}

impl DigitScene {
    /// Two or three digits drawn from `pool` (indices into the file) in distinct random cells.
    pub fn random(pool: &[usize], rng: &mut impl Rng) -> DigitScene {
        let count = rng.gen_range(2..=3);
        let mut cells: Vec<usize> = (0..9).collect();
        cells.shuffle(rng);
        let mut cells = cells[..count].to_vec();
        cells.sort_unstable();
        let placed = cells
            .into_iter()
            .map(|cell| (cell, *pool.choose(rng).unwrap_or(&0)))
            .collect();
        DigitScene { placed }
    }

    /// Dark ink on a light background, each digit scaled to 24 px (nearest) in its 28-px cell.
    pub fn render(&self, digits: &[Digit], rng: &mut impl Rng) -> RgbImage {
        let size = super::shapes::IMAGE_SIZE;
        let mut image = RgbImage::from_fn(size, size, |_, _| {
            let v = (235 + rng.gen_range(-8..=8)) as u8;
            Rgb([v, v, v])
        });
        for &(cell, index) in &self.placed {
            let (x0, y0) = ((cell as u32 % 3) * 28 + 2, (cell as u32 / 3) * 28 + 2);
            for y in 0..8 * SCALE {
                for x in 0..8 * SCALE {
                    let ink = digits[index].pixels[(y / SCALE * 8 + x / SCALE) as usize] as u32;
                    let v = (235 - ink * 14) as u8;
                    image.put_pixel(x0 + x, y0 + y, Rgb([v, v, v]));
                }
            }
        }
        image
    }

    pub fn labels(&self, digits: &[Digit]) -> Vec<u8> {
        self.placed.iter().map(|&(_, i)| digits[i].label).collect()
    }
}

pub const SUM_QUESTION: &str =
    "What is the sum of the digits shown? Think, then give the number in \\boxed{}.";

/// `<think>digits: 3, 5, 1. 3+5+1=9.</think>\boxed{9}`
pub fn sum_trace(labels: &[u8]) -> String {
    let sum: u32 = labels.iter().map(|&d| d as u32).sum();
    let list: Vec<String> = labels.iter().map(u8::to_string).collect();
    format!(
        "<think>digits: {}. {}={sum}.</think>\\boxed{{{sum}}}",
        list.join(", "),
        list.join("+")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_digits_load() {
        let digits = load().unwrap();
        assert_eq!(digits.len(), 1797);
        // Roughly 180 of each class.
        for label in 0..10 {
            let n = digits.iter().filter(|d| d.label == label).count();
            assert!((170..=190).contains(&n), "label {label}: {n}");
        }
        assert_eq!(
            sum_trace(&[3, 5, 1]),
            "<think>digits: 3, 5, 1. 3+5+1=9.</think>\\boxed{9}"
        );
    }
}
