//! Pillow's BICUBIC resize, transcribed so that tiles match InternVL's PIL preprocessing bit for bit.
//!
//! Reference: Pillow `src/libImaging/Resample.c` (`bicubic_filter` with a = -0.5, `precompute_coeffs`,
//! `normalize_coeffs_8bpc`, `ImagingResampleHorizontal_8bpc` / `Vertical_8bpc`, `ImagingResampleInner`):
//! separable, horizontal pass first, the filter support widened by the scale when downscaling, weights
//! normalised per output pixel then rounded to fixed point with `PRECISION_BITS = 22`, each pass rounding
//! and clamping to u8. The `image` crate's Catmull-Rom is the same kernel but works in f32 without the
//! intermediate rounding and with other window bounds: up to 7 u8 levels apart on the fixtures.
//!
//! Pillow 13 (the fixtures' version) runs the vertical pass first when the height shrinks by more than
//! twice as many pixels as the width (`horizontal_first` in `ImagingResampleInner`); older Pillows always
//! go horizontal first. The two orders differ by a few u8 levels, so the rule is transcribed too.

use image::RgbImage;

/// Fixed-point precision of Pillow's 8-bit resampling weights (`32 - 8 - 2`).
const PRECISION_BITS: u32 = 22;

/// Pillow's `bicubic_filter`: the Keys cubic with a = -0.5, support 2.
fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per output pixel: first input index, number of inputs, fixed-point weights (`precompute_coeffs` +
/// `normalize_coeffs_8bpc` for the whole input range as the box).
struct Coefficients {
    bounds: Vec<(usize, usize)>,
    weights: Vec<Vec<i32>>,
}

fn precompute_coeffs(in_size: u32, out_size: u32) -> Coefficients {
    const SUPPORT: f64 = 2.0;
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = SUPPORT * filter_scale;
    let mut bounds = Vec::with_capacity(out_size as usize);
    let mut weights = Vec::with_capacity(out_size as usize);
    for out_index in 0..out_size {
        let center = (out_index as f64 + 0.5) * scale;
        let inverse_scale = 1.0 / filter_scale;
        // C's `(int)` truncates toward zero; negative values are clamped to 0 right after either way.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let count = xmax.saturating_sub(xmin);
        let raw: Vec<f64> = (0..count)
            .map(|x| bicubic_filter(((x + xmin) as f64 - center + 0.5) * inverse_scale))
            .collect();
        let total: f64 = raw.iter().sum();
        let fixed = raw
            .iter()
            .map(|&w| {
                let w = if total != 0.0 { w / total } else { w };
                let scaled = w * (1u32 << PRECISION_BITS) as f64;
                // `(int)(±0.5 + w * 2^22)`: round half away from zero, then truncate.
                if w < 0.0 {
                    (scaled - 0.5) as i32
                } else {
                    (scaled + 0.5) as i32
                }
            })
            .collect();
        bounds.push((xmin, count));
        weights.push(fixed);
    }
    Coefficients { bounds, weights }
}

/// Pillow's `clip8`: drop the fixed-point fraction and clamp to 0..=255.
fn clip8(value: i64) -> u8 {
    if value >= (1i64 << PRECISION_BITS << 8) {
        255
    } else if value <= 0 {
        0
    } else {
        (value >> PRECISION_BITS) as u8
    }
}

/// One separable pass over an interleaved RGB buffer of `(width, height)`: along x when `horizontal`,
/// else along y; the output has `out_len` pixels along that axis.
fn resample_pass(
    pixels: &[u8],
    width: usize,
    height: usize,
    out_len: usize,
    horizontal: bool,
) -> Vec<u8> {
    let in_len = if horizontal { width } else { height };
    let coefficients = precompute_coeffs(in_len as u32, out_len as u32);
    let (out_width, out_height) = if horizontal {
        (out_len, height)
    } else {
        (width, out_len)
    };
    let mut out = vec![0u8; out_width * out_height * 3];
    for y in 0..out_height {
        for x in 0..out_width {
            let out_index = if horizontal { x } else { y };
            let (start, count) = coefficients.bounds[out_index];
            let weights = &coefficients.weights[out_index];
            let mut sums = [1i64 << (PRECISION_BITS - 1); 3];
            for (offset, &weight) in weights.iter().enumerate().take(count) {
                let (source_x, source_y) = if horizontal {
                    (start + offset, y)
                } else {
                    (x, start + offset)
                };
                let base = (source_y * width + source_x) * 3;
                for channel in 0..3 {
                    sums[channel] += pixels[base + channel] as i64 * weight as i64;
                }
            }
            let base = (y * out_width + x) * 3;
            for channel in 0..3 {
                out[base + channel] = clip8(sums[channel]);
            }
        }
    }
    out
}

/// `image.resize((width, height), Image.BICUBIC)` of Pillow (13) for an RGB image.
pub fn resize_bicubic(image: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (in_width, in_height) = (image.width() as usize, image.height() as usize);
    let (width, height) = (width as usize, height as usize);
    // Pillow 13: "If height is being scaled down more than twice the amount the width is, run the vertical
    // pass first" - in pixels: (in_h - h) > 0 && (in_h - h) > (in_w - w) * 2.
    let height_drop = in_height as i64 - height as i64;
    let horizontal_first = !(height_drop > 0 && height_drop > (in_width as i64 - width as i64) * 2);
    let mut pixels = image.as_raw().clone();
    let (mut current_width, mut current_height) = (in_width, in_height);
    for horizontal in [horizontal_first, !horizontal_first] {
        if horizontal && width != current_width {
            pixels = resample_pass(&pixels, current_width, current_height, width, true);
            current_width = width;
        } else if !horizontal && height != current_height {
            pixels = resample_pass(&pixels, current_width, current_height, height, false);
            current_height = height;
        }
    }
    // The buffer holds exactly width x height x 3 bytes: each pass sized it so (or it is the input's own).
    RgbImage::from_raw(width as u32, height as u32, pixels)
        .expect("resampled buffer has width*height*3 bytes")
}
