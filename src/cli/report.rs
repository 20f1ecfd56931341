//! `r1v2 report RUN_DIR`: draws every metric of RUN_DIR/metrics.jsonl over steps, one chart per group
//! (the name before the first `/`: reward, actor, ssb, timing_s ...), as RUN_DIR/report/<group>.png and
//! .svg, and prints a summary table (first, last, min, max, mean per metric).
//!
//! Drawing uses plotters' pure-Rust backends; text is rendered with DejaVu Sans embedded in the binary
//! (the `dejavu` crate, via plotters' `ab_glyph` feature), so no system font or library is needed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::checkpoint::RunDir;
use crate::telemetry::{read_metrics, MetricsRecord};
use crate::{Error, Result};

/// Arguments of `r1v2 report`.
#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// The run directory (holds metrics.jsonl); charts go to RUN_DIR/report/.
    pub run_dir: PathBuf,
}

/// Runs `r1v2 report`: writes the charts and prints the summary table.
pub fn run(args: &ReportArgs) -> anyhow::Result<()> {
    let report = write_report(&args.run_dir)?;
    print!("{}", format_summary(&report.summaries));
    for file in &report.files {
        println!("wrote {}", file.display());
    }
    Ok(())
}

/// One metric's figures over the run, over its finite values (NaN steps are counted out).
#[derive(Debug, Clone, PartialEq)]
pub struct MetricSummary {
    /// Metric name, e.g. `reward/mean`.
    pub name: String,
    /// Steps with a finite value.
    pub count: usize,
    /// Value at the first such step.
    pub first: f64,
    /// Value at the last such step.
    pub last: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// Mean value.
    pub mean: f64,
}

/// What [`write_report`] produced.
#[derive(Debug, Clone)]
pub struct Report {
    /// One summary per metric, sorted by name.
    pub summaries: Vec<MetricSummary>,
    /// The chart files written (a PNG and an SVG per group).
    pub files: Vec<PathBuf>,
}

/// Each metric's (step, value) points in step order, NaN values left out.
pub fn metric_series(records: &[MetricsRecord]) -> BTreeMap<String, Vec<(f64, f64)>> {
    let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut ordered: Vec<&MetricsRecord> = records.iter().collect();
    ordered.sort_by_key(|r| r.step);
    for record in ordered {
        for (name, value) in &record.values {
            let points = series.entry(name.clone()).or_default();
            if value.is_finite() {
                points.push((record.step as f64, *value));
            }
        }
    }
    series
}

/// Summaries of every metric that has at least one finite value, sorted by name.
pub fn summarize(records: &[MetricsRecord]) -> Vec<MetricSummary> {
    metric_series(records)
        .into_iter()
        .filter_map(|(name, points)| {
            let (first, last) = (points.first()?.1, points.last()?.1);
            let values = points.iter().map(|p| p.1);
            Some(MetricSummary {
                count: points.len(),
                first,
                last,
                min: values.clone().fold(f64::INFINITY, f64::min),
                max: values.clone().fold(f64::NEG_INFINITY, f64::max),
                mean: values.sum::<f64>() / points.len() as f64,
                name,
            })
        })
        .collect()
}

/// The summary as an aligned text table.
pub fn format_summary(summaries: &[MetricSummary]) -> String {
    let width = summaries
        .iter()
        .map(|s| s.name.len())
        .max()
        .unwrap_or(6)
        .max(6);
    let mut out = format!(
        "{:<width$} {:>6} {:>12} {:>12} {:>12} {:>12} {:>12}\n",
        "metric", "steps", "first", "last", "min", "max", "mean"
    );
    for s in summaries {
        // Writing to a String cannot fail.
        let _ = writeln!(
            out,
            "{:<width$} {:>6} {:>12} {:>12} {:>12} {:>12} {:>12}",
            s.name,
            s.count,
            number(s.first),
            number(s.last),
            number(s.min),
            number(s.max),
            number(s.mean)
        );
    }
    out
}

fn number(value: f64) -> String {
    if value != 0.0 && !(1e-3..1e5).contains(&value.abs()) {
        format!("{value:.4e}")
    } else {
        format!("{value:.4}")
    }
}

/// The group a metric is drawn in: the part before the first `/` (`misc` when there is none).
pub fn metric_group(name: &str) -> &str {
    name.split_once('/').map_or("misc", |(group, _)| group)
}

/// Reads RUN_DIR/metrics.jsonl, writes RUN_DIR/report/<group>.{png,svg} and returns the summary.
pub fn write_report(run_dir: &Path) -> Result<Report> {
    let run = RunDir::open(run_dir)?;
    let records = read_metrics(&run.metrics_path())?;
    let out_dir = run.report_dir();
    std::fs::create_dir_all(&out_dir).map_err(|source| Error::Io {
        path: out_dir.clone(),
        source,
    })?;
    let mut groups: BTreeMap<&str, Vec<Curve>> = BTreeMap::new();
    let series = metric_series(&records);
    for (name, points) in &series {
        if !points.is_empty() {
            groups
                .entry(metric_group(name))
                .or_default()
                .push((name, points));
        }
    }
    register_font()?;
    let mut files = Vec::new();
    for (group, lines) in &groups {
        let stem: String = group
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        files.extend(write_chart(&out_dir.join(stem), group, lines)?);
    }
    Ok(Report {
        summaries: summarize(&records),
        files,
    })
}

/// One named curve: a metric's name and its (step, value) points.
pub type Curve<'a> = (&'a str, &'a [(f64, f64)]);

/// Draws `lines` against the step into `stem`.svg and `stem`.png; returns the two paths.
pub fn write_chart(stem: &Path, title: &str, lines: &[Curve]) -> Result<Vec<std::path::PathBuf>> {
    register_font()?;
    let svg_path = stem.with_extension("svg");
    draw_chart(SVGBackend::new(&svg_path, CHART_SIZE), title, lines).map_err(|msg| {
        Error::File {
            path: svg_path.clone(),
            msg,
        }
    })?;
    let png_path = stem.with_extension("png");
    write_png(&png_path, title, lines)?;
    Ok(vec![png_path, svg_path])
}

const CHART_SIZE: (u32, u32) = (900, 520);

/// Renders into an RGB buffer (plotters' bitmap backend) and encodes it with the `image` crate.
fn write_png(path: &Path, group: &str, lines: &[Curve]) -> Result<()> {
    let (width, height) = CHART_SIZE;
    let mut rgb = vec![0u8; width as usize * height as usize * 3];
    draw_chart(
        BitMapBackend::with_buffer(&mut rgb, CHART_SIZE),
        group,
        lines,
    )
    .map_err(|msg| Error::File {
        path: path.to_path_buf(),
        msg,
    })?;
    let image = image::RgbImage::from_raw(width, height, rgb).ok_or_else(|| Error::File {
        path: path.to_path_buf(),
        msg: "chart buffer has the wrong size".into(),
    })?;
    image
        .save_with_format(path, image::ImageFormat::Png)
        .map_err(|e| Error::File {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })
}

fn draw_chart<DB: DrawingBackend>(
    backend: DB,
    group: &str,
    lines: &[Curve],
) -> std::result::Result<(), String> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    let points = lines.iter().flat_map(|(_, p)| p.iter());
    let (mut x_min, mut x_max, mut y_min, mut y_max) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in points {
        (x_min, x_max, y_min, y_max) = (x_min.min(x), x_max.max(x), y_min.min(y), y_max.max(y));
    }
    if x_max <= x_min {
        (x_min, x_max) = (x_min - 1.0, x_max + 1.0);
    }
    let pad = if y_max > y_min {
        0.05 * (y_max - y_min)
    } else {
        y_max.abs().max(1.0) * 0.1
    };
    let root = backend.into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(group, ("sans-serif", 24))
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x_min..x_max, (y_min - pad)..(y_max + pad))
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&|step| format!("{step:.0}"))
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(err)?;
    for (index, (name, line)) in lines.iter().enumerate() {
        let color = Palette99::pick(index).to_rgba();
        chart
            .draw_series(LineSeries::new(line.iter().copied(), color.stroke_width(2)))
            .map_err(err)?
            .label(*name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)
}

/// Registers the embedded DejaVu Sans as plotters' "sans-serif" in every style, once per process.
fn register_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        [
            FontStyle::Normal,
            FontStyle::Bold,
            FontStyle::Italic,
            FontStyle::Oblique,
        ]
        .into_iter()
        .all(|style| {
            plotters::style::register_font("sans-serif", style, dejavu::sans::regular()).is_ok()
        })
    });
    if ok {
        Ok(())
    } else {
        Err(Error::Msg(
            "report: the embedded DejaVu Sans font could not be loaded".into(),
        ))
    }
}

#[cfg(test)]
#[path = "report_tests.rs"]
mod tests;
