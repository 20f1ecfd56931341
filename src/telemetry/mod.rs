//! Live monitoring: tracing set up once for the process (readable lines on stderr, JSON lines in
//! RUN_DIR/log.jsonl), the per-step metrics file ([`MetricsWriter`], [`read_metrics`]), and a progress
//! bar on terminals ([`Progress`]).

mod metrics;
mod progress;

pub use metrics::{read_metrics, truncate_after, MetricsRecord, MetricsWriter};
pub use progress::Progress;

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::{Mutex, MutexGuard, OnceLock};

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use crate::{Error, Result};

/// The file the JSON layer writes to; `None` discards. A `Mutex` rather than a channel writer: each
/// event is one `write_all` of a whole line under the lock, so lines never interleave and are on disk
/// (unbuffered) the moment the event returns, which a crash-and-resume run wants; the lock is held
/// only for that one write.
static JSON_LOG: Mutex<Option<File>> = Mutex::new(None);
/// Whether `init` installed the global subscriber (it can be installed once per process).
static INSTALLED: OnceLock<bool> = OnceLock::new();

/// Sets up tracing for the process: human-readable lines on stderr and, when `run_dir` is given, JSON
/// lines appended to `run_dir/log.jsonl`. `level` is an `EnvFilter` directive (`"info"`,
/// `"r1v2=debug,info"` ...) used for both outputs. Safe to call more than once (tests, or `main`
/// followed by `train`): the first call installs the subscriber, later calls only redirect the JSON
/// file (and ignore `level`). Returns `false` when some other global subscriber was already installed,
/// in which case nothing is written to log.jsonl.
pub fn init(run_dir: Option<&Path>, level: &str) -> Result<bool> {
    let file = match run_dir {
        Some(dir) => {
            let path = dir.join("log.jsonl");
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|source| Error::Io { path, source })?;
            Some(file)
        }
        None => None,
    };
    let filter =
        EnvFilter::try_new(level).map_err(|e| Error::Msg(format!("log level `{level}`: {e}")))?;
    *lock_json_log() = file;
    let installed = *INSTALLED.get_or_init(|| {
        // Colours only on a terminal: piped or redirected output gets plain text.
        let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let terminal = tracing_subscriber::fmt::layer()
            .with_ansi(colour)
            .with_writer(std::io::stderr);
        let json = tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .with_writer(JsonLogWriter);
        tracing_subscriber::registry()
            .with(filter)
            .with(terminal)
            .with(json)
            .try_init()
            .is_ok()
    });
    Ok(installed)
}

fn lock_json_log() -> MutexGuard<'static, Option<File>> {
    // A panic while writing a log line leaves the file usable; take it back from a poisoned lock.
    JSON_LOG
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `MakeWriter` for the JSON layer: writes go to whatever file [`init`] last set.
struct JsonLogWriter;

/// One event's write, holding the lock for its duration.
struct JsonLogGuard(MutexGuard<'static, Option<File>>);

impl<'a> MakeWriter<'a> for JsonLogWriter {
    type Writer = JsonLogGuard;
    fn make_writer(&'a self) -> Self::Writer {
        JsonLogGuard(lock_json_log())
    }
}

impl Write for JsonLogGuard {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.0.as_mut() {
            Some(file) => file.write(buf),
            None => Ok(buf.len()),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self.0.as_mut() {
            Some(file) => file.flush(),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_writes_json_lines_to_run_dir_and_is_repeatable() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            init(Some(dir.path()), "info").unwrap(),
            "another subscriber was installed"
        );
        let span = tracing::info_span!("stage", stage = "gen");
        span.in_scope(|| tracing::info!(step = 3, "telemetry-test-event"));
        tracing::debug!("telemetry-test-filtered");
        // A second call is fine and redirects the JSON file.
        let second = tempfile::tempdir().unwrap();
        assert!(init(Some(second.path()), "info").unwrap());
        tracing::info!("telemetry-test-second");
        init(None, "info").unwrap();

        let text = std::fs::read_to_string(dir.path().join("log.jsonl")).unwrap();
        let events: Vec<serde_json::Value> = text
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        let ours = events
            .iter()
            .find(|e| e["fields"]["message"] == "telemetry-test-event")
            .expect("event missing from log.jsonl");
        assert_eq!(ours["fields"]["step"], 3);
        assert_eq!(ours["level"], "INFO");
        assert_eq!(ours["span"]["name"], "stage");
        assert_eq!(ours["span"]["stage"], "gen");
        assert!(!text.contains("telemetry-test-filtered"));
        assert!(!text.contains("telemetry-test-second"));
        let second_text = std::fs::read_to_string(second.path().join("log.jsonl")).unwrap();
        assert!(second_text.contains("telemetry-test-second"));
        assert!(init(None, "no such=level=!").is_err());
    }
}
