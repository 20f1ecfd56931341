//! The run directory and its checkpoints.
//!
//! ```text
//! RUN_DIR/
//!   config.toml            the run's config as resolved
//!   metrics.jsonl          one object per step (telemetry::MetricsWriter)
//!   log.jsonl              tracing events as JSON lines (telemetry::init)
//!   checkpoints/step-N/    model in the HF layout (config.json, model.safetensors ...), optimizer state,
//!                          trainer_state.json (step, RNG streams, data cursor, named sections)
//!   report/                curves drawn by `r1v2 report`
//! ```
//! A checkpoint is written into `checkpoints/.tmp-step-N`, every file and the directory are fsynced, and
//! only then is it renamed to `step-N`: a crash leaves at most a `.tmp-*` directory, which readers ignore
//! and the next write removes. Transformers ignores the extra files, so `step-N` loads as an HF model.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use rand_chacha::ChaCha8Rng;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::data::DataCursor;
use crate::{Error, Result};

/// File name of the trainer state inside a checkpoint directory.
pub const TRAINER_STATE_FILE: &str = "trainer_state.json";
/// Prefix of the directories a checkpoint is written into before its rename.
const TMP_PREFIX: &str = ".tmp-";
const STEP_PREFIX: &str = "step-";

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io { path, source }
}

/// The paths of one run directory (see the module docs for the layout).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunDir {
    root: PathBuf,
}

impl RunDir {
    /// Creates `root` and `root/checkpoints` if they do not exist.
    pub fn create(root: impl Into<PathBuf>) -> Result<Self> {
        let run = Self { root: root.into() };
        let checkpoints = run.checkpoints_dir();
        fs::create_dir_all(&checkpoints).map_err(io_err(&checkpoints))?;
        Ok(run)
    }

    /// Opens an existing run directory (for `--resume` and `report`).
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        if !root.is_dir() {
            return Err(Error::File {
                path: root,
                msg: "run directory not found".into(),
            });
        }
        Ok(Self { root })
    }

    /// The run directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// `RUN_DIR/config.toml`.
    pub fn config_path(&self) -> PathBuf {
        self.root.join("config.toml")
    }
    /// `RUN_DIR/metrics.jsonl`.
    pub fn metrics_path(&self) -> PathBuf {
        self.root.join("metrics.jsonl")
    }
    /// `RUN_DIR/log.jsonl`.
    pub fn log_path(&self) -> PathBuf {
        self.root.join("log.jsonl")
    }
    /// `RUN_DIR/report/`.
    pub fn report_dir(&self) -> PathBuf {
        self.root.join("report")
    }
    /// `RUN_DIR/checkpoints/`.
    pub fn checkpoints_dir(&self) -> PathBuf {
        self.root.join("checkpoints")
    }
    /// `RUN_DIR/checkpoints/step-N/` (whether or not it exists).
    pub fn checkpoint_dir(&self, step: u64) -> PathBuf {
        self.checkpoints_dir().join(format!("{STEP_PREFIX}{step}"))
    }

    /// Writes the resolved config to `config.toml` (atomically: temporary file, fsync, rename).
    pub fn write_config(&self, resolved_toml: &str) -> Result<()> {
        let path = self.config_path();
        let tmp = self.root.join(format!("{TMP_PREFIX}config.toml"));
        fs::write(&tmp, resolved_toml).map_err(io_err(&tmp))?;
        fsync_file(&tmp)?;
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        fsync_dir(&self.root)
    }

    /// Writes checkpoint `step`: `write` fills a fresh temporary directory (model via
    /// `r1v2_actors::model::weights::save`, optimizer state, [`TrainerState::save`] ...); then the files
    /// are fsynced and the directory renamed to `step-N`. If `write` fails nothing named `step-N` appears
    /// (an existing `step-N` is kept) and the error is returned. After a success only the newest
    /// `keep_last` complete checkpoints remain (`0` keeps all). Returns the checkpoint's directory.
    pub fn write_checkpoint<F>(&self, step: u64, keep_last: usize, write: F) -> Result<PathBuf>
    where
        F: FnOnce(&Path) -> Result<()>,
    {
        let checkpoints = self.checkpoints_dir();
        fs::create_dir_all(&checkpoints).map_err(io_err(&checkpoints))?;
        self.clean_temporaries()?;
        let tmp = checkpoints.join(format!("{TMP_PREFIX}{STEP_PREFIX}{step}"));
        fs::create_dir(&tmp).map_err(io_err(&tmp))?;
        if let Err(err) = write(&tmp).and_then(|()| fsync_tree(&tmp)) {
            // Best effort: a leftover is ignored by readers and removed by the next write.
            let _ = fs::remove_dir_all(&tmp);
            return Err(err);
        }
        let target = self.checkpoint_dir(step);
        if target.exists() {
            // Rewriting a step (e.g. after a resume): move the old one aside first, rename can't replace
            // a non-empty directory. Between the two renames no step-N exists, never a half one.
            let old = checkpoints.join(format!("{TMP_PREFIX}old-{STEP_PREFIX}{step}"));
            fs::rename(&target, &old).map_err(io_err(&target))?;
            fs::rename(&tmp, &target).map_err(io_err(&target))?;
            fs::remove_dir_all(&old).map_err(io_err(&old))?;
        } else {
            fs::rename(&tmp, &target).map_err(io_err(&target))?;
        }
        fsync_dir(&checkpoints)?;
        if keep_last > 0 {
            let complete = self.list_checkpoints()?;
            let excess = complete.len().saturating_sub(keep_last);
            for (old_step, dir) in complete.into_iter().take(excess) {
                tracing::debug!(step = old_step, "removing old checkpoint {}", dir.display());
                fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
            }
        }
        tracing::info!(step, "checkpoint written to {}", target.display());
        Ok(target)
    }

    /// Complete checkpoints (`step-N` directories), oldest first; temporary directories and other
    /// entries are ignored.
    pub fn list_checkpoints(&self) -> Result<Vec<(u64, PathBuf)>> {
        let checkpoints = self.checkpoints_dir();
        if !checkpoints.is_dir() {
            return Ok(Vec::new());
        }
        let mut found = Vec::new();
        for entry in fs::read_dir(&checkpoints).map_err(io_err(&checkpoints))? {
            let entry = entry.map_err(io_err(&checkpoints))?;
            let name = entry.file_name();
            let Some(step) = name
                .to_str()
                .and_then(|n| n.strip_prefix(STEP_PREFIX))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            if entry.path().is_dir() {
                found.push((step, entry.path()));
            }
        }
        found.sort();
        Ok(found)
    }

    /// The complete checkpoint with the highest step, if any.
    pub fn latest_checkpoint(&self) -> Result<Option<(u64, PathBuf)>> {
        Ok(self.list_checkpoints()?.pop())
    }

    /// Removes `checkpoints/.tmp-*` left by a crash; returns how many were removed.
    pub fn clean_temporaries(&self) -> Result<usize> {
        let checkpoints = self.checkpoints_dir();
        if !checkpoints.is_dir() {
            return Ok(0);
        }
        let mut removed = 0;
        for entry in fs::read_dir(&checkpoints).map_err(io_err(&checkpoints))? {
            let entry = entry.map_err(io_err(&checkpoints))?;
            if entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                let path = entry.path();
                tracing::warn!("removing incomplete checkpoint {}", path.display());
                if path.is_dir() {
                    fs::remove_dir_all(&path).map_err(io_err(&path))?;
                } else {
                    fs::remove_file(&path).map_err(io_err(&path))?;
                }
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// The trainer's own state in a checkpoint, beside the model: `trainer_state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainerState {
    /// The last completed step.
    pub step: u64,
    /// The data loader's position.
    pub data_cursor: DataCursor,
    /// Named RNG streams (sampling, SSB replay ...), with their exact positions.
    #[serde(default)]
    pub rngs: BTreeMap<String, ChaCha8Rng>,
    /// Other actors' state by name (`"ssb"`, `"monitor"`, `"calibration"`, `"reward_means"` ...).
    #[serde(default)]
    pub sections: BTreeMap<String, serde_json::Value>,
}

impl TrainerState {
    /// A state with no RNGs or sections yet.
    pub fn new(step: u64, data_cursor: DataCursor) -> Self {
        Self {
            step,
            data_cursor,
            rngs: BTreeMap::new(),
            sections: BTreeMap::new(),
        }
    }

    /// Stores `value` as section `name` (replacing any previous one).
    pub fn set_section<T: Serialize>(&mut self, name: &str, value: &T) -> Result<()> {
        let json = serde_json::to_value(value)
            .map_err(|e| Error::Msg(format!("trainer state section `{name}`: {e}")))?;
        self.sections.insert(name.to_string(), json);
        Ok(())
    }

    /// Section `name` decoded as `T`; `None` when the checkpoint has no such section.
    pub fn section<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>> {
        self.sections
            .get(name)
            .map(|json| {
                T::deserialize(json)
                    .map_err(|e| Error::Msg(format!("trainer state section `{name}`: {e}")))
            })
            .transpose()
    }

    /// Writes `dir/trainer_state.json`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join(TRAINER_STATE_FILE);
        let json = serde_json::to_vec_pretty(self).map_err(|e| Error::File {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        fs::write(&path, json).map_err(io_err(&path))
    }

    /// Reads `dir/trainer_state.json`; errors name the file.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(TRAINER_STATE_FILE);
        let text = fs::read_to_string(&path).map_err(io_err(&path))?;
        serde_json::from_str(&text).map_err(|e| Error::File {
            path,
            msg: e.to_string(),
        })
    }
}

fn fsync_file(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io_err(path))
}

fn fsync_dir(path: &Path) -> Result<()> {
    // Directories are opened read-only for fsync on Unix; elsewhere this is a no-op that may fail.
    match File::open(path).and_then(|f| f.sync_all()) {
        Ok(()) => Ok(()),
        Err(_) if cfg!(not(unix)) => Ok(()),
        Err(source) => Err(Error::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// fsyncs every file under `dir`, then the directories themselves.
fn fsync_tree(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let path = entry.map_err(io_err(dir))?.path();
        if path.is_dir() {
            fsync_tree(&path)?;
        } else {
            fsync_file(&path)?;
        }
    }
    fsync_dir(dir)
}

#[cfg(test)]
#[path = "checkpoint_tests.rs"]
mod tests;
