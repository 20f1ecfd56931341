//! RUN_DIR/metrics.jsonl: one JSON object per step, `{"step": N, "reward/mean": 0.41, ...}`, names as in
//! design.md (reward/*, ssb/*, actor/*, mpo/*, response_length/*, hallucination/*, calibration/*,
//! timing_s/*, perf/tokens_per_s). Values are f64; a non-finite value is written as `null` and read
//! back as NaN.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// One line of metrics.jsonl.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsRecord {
    /// The training step the values belong to.
    pub step: u64,
    /// Metric name -> value, sorted by name.
    pub values: BTreeMap<String, f64>,
}

/// Appends one line per step to a metrics file, flushed at once so `tail -f` follows the run.
#[derive(Debug)]
pub struct MetricsWriter {
    path: PathBuf,
    file: File,
}

impl MetricsWriter {
    /// Opens `path` for appending (created if missing).
    pub fn open(path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
        Ok(Self { path, file })
    }

    /// For a run resumed at `step`: drops the lines of later steps (written after that checkpoint) and
    /// any torn last line, then opens for appending.
    pub fn resume(path: impl Into<PathBuf>, step: u64) -> Result<Self> {
        let path = path.into();
        if path.exists() {
            truncate_after(&path, step)?;
        }
        Self::open(path)
    }

    /// Writes one step's metrics as one line. A metric may not be called `step`.
    pub fn write(&mut self, step: u64, values: &BTreeMap<String, f64>) -> Result<()> {
        // Built by hand so that `step` comes first (serde_json's map would sort it among the names).
        let mut line = format!("{{\"step\":{step}");
        for (name, value) in values {
            if name == "step" {
                return Err(Error::File {
                    path: self.path.clone(),
                    msg: "`step` is reserved and cannot be a metric name".into(),
                });
            }
            // NaN / inf have no JSON number: written as null.
            let number = serde_json::Number::from_f64(*value)
                .map_or(serde_json::Value::Null, serde_json::Value::Number);
            let key = serde_json::Value::String(name.clone());
            line.push_str(&format!(",{key}:{number}"));
        }
        line.push_str("}\n");
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.flush())
            .map_err(|source| Error::Io {
                path: self.path.clone(),
                source,
            })
    }

    /// The file written to.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Parses one line; the error is the reason without file and line.
fn parse_record(line: &str) -> std::result::Result<MetricsRecord, String> {
    let value: serde_json::Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
    let serde_json::Value::Object(object) = value else {
        return Err("not a JSON object".into());
    };
    let step = object
        .get("step")
        .and_then(|s| s.as_u64())
        .ok_or("missing or non-integer `step`")?;
    let mut values = BTreeMap::new();
    for (name, value) in object {
        if name == "step" {
            continue;
        }
        let number = match value {
            serde_json::Value::Null => f64::NAN,
            serde_json::Value::Number(n) => n.as_f64().ok_or(format!("`{name}` is not an f64"))?,
            other => return Err(format!("`{name}` is {other}, not a number")),
        };
        values.insert(name, number);
    }
    Ok(MetricsRecord { step, values })
}

/// Reads a metrics file. A bad line is an error naming file and line, except a last line with no
/// newline (a write cut short by a crash), which is skipped with a warning.
pub fn read_metrics(path: &Path) -> Result<Vec<MetricsRecord>> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let mut records = Vec::with_capacity(lines.len());
    for (index, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match parse_record(line.trim_end()) {
            Ok(record) => records.push(record),
            Err(_) if index + 1 == lines.len() && !line.ends_with('\n') => {
                tracing::warn!("{}:{}: skipping torn last line", path.display(), index + 1);
            }
            Err(reason) => {
                return Err(Error::File {
                    path: path.to_path_buf(),
                    msg: format!("line {}: {reason}", index + 1),
                })
            }
        }
    }
    Ok(records)
}

/// Rewrites `path` keeping only records with `step <= step` (what a resume from checkpoint `step`
/// continues after); returns how many records were dropped. The rewrite is a temporary file renamed
/// over the original.
pub fn truncate_after(path: &Path, step: u64) -> Result<usize> {
    // Validates: a bad line in the middle is an error here, not silently dropped.
    read_metrics(path)?;
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    // Keep the original lines byte for byte; every complete non-blank line parsed above.
    let mut kept = String::with_capacity(text.len());
    let mut dropped = 0;
    for line in text.split_inclusive('\n') {
        if line.trim().is_empty() || !line.ends_with('\n') {
            continue;
        }
        match parse_record(line.trim_end()) {
            Ok(record) if record.step <= step => kept.push_str(line),
            _ => dropped += 1,
        }
    }
    let tmp = path.with_extension("jsonl.tmp");
    std::fs::write(&tmp, kept)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics(pairs: &[(&str, f64)]) -> BTreeMap<String, f64> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn write_read_round_trip_with_nan() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let mut writer = MetricsWriter::open(&path).unwrap();
        writer
            .write(1, &metrics(&[("reward/mean", 0.5), ("timing_s/gen", 1.25)]))
            .unwrap();
        writer
            .write(2, &metrics(&[("reward/mean", f64::NAN)]))
            .unwrap();
        // Visible on disk before the writer is dropped (flushed per step).
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert!(
            text.starts_with(r#"{"step":1,"reward/mean":0.5,"timing_s/gen":1.25}"#),
            "{text}"
        );
        let records = read_metrics(&path).unwrap();
        assert_eq!(records[0].values["timing_s/gen"], 1.25);
        assert_eq!(records[1].step, 2);
        assert!(records[1].values["reward/mean"].is_nan());
        assert!(writer.write(3, &metrics(&[("step", 1.0)])).is_err());
    }

    #[test]
    fn resume_truncates_later_steps_and_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let mut writer = MetricsWriter::open(&path).unwrap();
        for step in 1..=5 {
            writer
                .write(step, &metrics(&[("actor/kl", step as f64)]))
                .unwrap();
        }
        drop(writer);
        // A crash mid-write of step 6.
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(br#"{"step":6,"actor/k"#).unwrap();
        assert_eq!(read_metrics(&path).unwrap().len(), 5);

        let mut writer = MetricsWriter::resume(&path, 3).unwrap();
        writer.write(4, &metrics(&[("actor/kl", 40.0)])).unwrap();
        let records = read_metrics(&path).unwrap();
        let steps: Vec<u64> = records.iter().map(|r| r.step).collect();
        assert_eq!(steps, [1, 2, 3, 4]);
        assert_eq!(records[3].values["actor/kl"], 40.0);
    }

    #[test]
    fn bad_line_names_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        std::fs::write(&path, "{\"step\":1,\"a\":1}\n{\"a\":2}\n{\"step\":3}\n").unwrap();
        let err = read_metrics(&path).unwrap_err().to_string();
        assert!(
            err.contains("metrics.jsonl") && err.contains("line 2"),
            "{err}"
        );
        std::fs::write(&path, "{\"step\":1,\"a\":\"x\"}\n").unwrap();
        let err = read_metrics(&path).unwrap_err().to_string();
        assert!(err.contains("`a`"), "{err}");
    }
}
