use super::*;
use crate::telemetry::MetricsWriter;

/// A run of 10 steps: reward/mean = 0.1 * step, reward/std = 1 except NaN at step 4, actor/kl = 10 -
/// step, timing_s/gen = 2, and `loss` (no group) = step.
fn generated_run(dir: &Path) {
    let mut writer = MetricsWriter::open(dir.join("metrics.jsonl")).unwrap();
    for step in 1..=10u64 {
        let s = step as f64;
        let std = if step == 4 { f64::NAN } else { 1.0 };
        let values: BTreeMap<String, f64> = [
            ("reward/mean", 0.1 * s),
            ("reward/std", std),
            ("actor/kl", 10.0 - s),
            ("timing_s/gen", 2.0),
            ("loss", s),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        writer.write(step, &values).unwrap();
    }
}

/// The contents of the SVG's `<text>` elements, trimmed.
fn svg_texts(svg: &str) -> Vec<String> {
    svg.split("<text")
        .skip(1)
        .filter_map(|element| {
            let body = &element[element.find('>')? + 1..];
            Some(body[..body.find("</text>")?].trim().to_string())
        })
        .collect()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

#[test]
fn summary_table_is_right() {
    let dir = tempfile::tempdir().unwrap();
    generated_run(dir.path());
    let records = read_metrics(&dir.path().join("metrics.jsonl")).unwrap();
    let summaries = summarize(&records);
    let names: Vec<&str> = summaries.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "actor/kl",
            "loss",
            "reward/mean",
            "reward/std",
            "timing_s/gen"
        ]
    );
    let reward = &summaries[2];
    assert_eq!(reward.count, 10);
    assert!(close(reward.first, 0.1) && close(reward.last, 1.0));
    assert!(close(reward.min, 0.1) && close(reward.max, 1.0));
    assert!(close(reward.mean, 0.55), "{}", reward.mean); // (0.1 + ... + 1.0) / 10
    let kl = &summaries[0];
    assert!(
        close(kl.first, 9.0) && close(kl.last, 0.0) && close(kl.min, 0.0) && close(kl.max, 9.0)
    );
    assert!(close(kl.mean, 4.5));
    let std = &summaries[3];
    assert_eq!(std.count, 9, "the NaN step is counted out");
    assert!(close(std.mean, 1.0));

    let table = format_summary(&summaries);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 6);
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        header,
        ["metric", "steps", "first", "last", "min", "max", "mean"]
    );
    let row: Vec<&str> = lines[3].split_whitespace().collect();
    assert_eq!(
        row,
        [
            "reward/mean",
            "10",
            "0.1000",
            "1.0000",
            "0.1000",
            "1.0000",
            "0.5500"
        ]
    );
    assert_eq!(metric_group("timing_s/gen"), "timing_s");
    assert_eq!(metric_group("loss"), "misc");
}

#[test]
fn report_writes_valid_png_and_svg_per_group() {
    let dir = tempfile::tempdir().unwrap();
    generated_run(dir.path());
    let report = write_report(dir.path()).unwrap();
    let report_dir = dir.path().join("report");
    for group in ["actor", "misc", "reward", "timing_s"] {
        let png = report_dir.join(format!("{group}.png"));
        let svg = report_dir.join(format!("{group}.svg"));
        assert!(report.files.contains(&png) && report.files.contains(&svg));
        let image = image::open(&png).unwrap().to_rgb8();
        assert_eq!(image.dimensions(), CHART_SIZE);
        // Curves and text were drawn: plenty of non-white pixels, and some coloured (not grey) ones.
        let inked = image.pixels().filter(|p| p.0 != [255, 255, 255]).count();
        assert!(inked > 2000, "{group}: only {inked} non-white pixels");
        let coloured = image
            .pixels()
            .filter(|p| p.0.iter().max().unwrap() - p.0.iter().min().unwrap() > 60) // 3 channels
            .count();
        assert!(coloured > 100, "{group}: no coloured curve pixels");
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(text.trim_start().starts_with("<svg"), "{group}: not an SVG");
        assert!(text.trim_end().ends_with("</svg>"));
        assert!(
            svg_texts(&text).contains(&group.to_string()),
            "{group}: caption missing"
        );
    }
    let reward_svg = std::fs::read_to_string(report_dir.join("reward.svg")).unwrap();
    let labels = svg_texts(&reward_svg);
    for label in ["reward/mean", "reward/std", "step"] {
        assert!(
            labels.contains(&label.to_string()),
            "{label} missing from {labels:?}"
        );
    }
    assert_eq!(report.summaries.len(), 5);
}

#[test]
fn missing_or_bad_metrics_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let err = write_report(dir.path()).unwrap_err().to_string();
    assert!(err.contains("metrics.jsonl"), "{err}");
    std::fs::write(
        dir.path().join("metrics.jsonl"),
        "{\"step\":1}\nnot json\n{\"step\":2}\n",
    )
    .unwrap();
    let err = write_report(dir.path()).unwrap_err().to_string();
    assert!(err.contains("line 2"), "{err}");
}

#[test]
fn report_command_parses() {
    use clap::Parser;
    let cli = crate::cli::Cli::try_parse_from(["r1v2", "report", "runs/a"]).unwrap();
    // A `match` rather than an irrefutable `let`: other commands join the enum.
    match cli.command {
        crate::cli::Command::Report(args) => assert_eq!(args.run_dir, PathBuf::from("runs/a")),
        #[allow(unreachable_patterns)]
        other => panic!("parsed as {other:?}"),
    }
    assert!(crate::cli::Cli::try_parse_from(["r1v2", "report"]).is_err());
}
