//! External-process verifiers: any program speaking JSON lines over stdin/stdout.
//!
//! Protocol, one JSON object per line:
//! - request (to the plugin's stdin): `{"id": 7, "prompt": "...", "response": "...", "answer": "...", "meta": {...}}`
//! - reply (on its stdout): `{"id": 7, "score": 0.5, "format_ok": true, "reason": "..."}`, plus optional
//!   `"extracted"`.
//!
//! The process is started on first use and kept alive. Each request waits at most `timeout_secs` for the reply
//! with its id (stdout lines that are not JSON, or carry another id, are logged and skipped). When the plugin
//! exits, or does not answer in time, the affected request gets score 0 with the reason, the process (its
//! whole process group) is killed, and the next request starts a fresh one. The plugin's stderr goes to the
//! log at `warn` level, one event per line. `processes` copies run side by side, one request each at a time.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::{Verdict, Verifier, VerifyFailure, VerifyInput};
use crate::{Error, Result};

/// One `[[plugins]]` entry of the verifier config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// The verifier name dataset lines use in their `verifier` field.
    pub name: String,
    /// The program to start (looked up in `PATH`).
    pub command: String,
    /// Its arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Seconds one request may take before the plugin is declared hung and restarted.
    #[serde(default = "default_plugin_timeout")]
    pub timeout_secs: f64,
    /// Extra seconds the first request to a freshly started process may take (interpreter start-up,
    /// loading a model).
    #[serde(default = "default_startup")]
    pub startup_secs: f64,
    /// Working directory of the process (default: the caller's).
    #[serde(default)]
    pub cwd: Option<PathBuf>,
    /// Extra environment variables for the process.
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    /// Copies of the process run side by side (each handles one request at a time).
    #[serde(default = "default_processes")]
    pub processes: usize,
}

fn default_plugin_timeout() -> f64 {
    10.0
}

fn default_startup() -> f64 {
    30.0
}

fn default_processes() -> usize {
    1
}

impl PluginConfig {
    /// Check the values once; `key` is this entry's place in the config (`plugins[2]`).
    pub fn validate(&self, key: &str) -> Result<()> {
        let bad = |field: &str, msg: &str| {
            Err(Error::Config {
                key: format!("{key}.{field}"),
                msg: msg.into(),
            })
        };
        if self.name.trim().is_empty() {
            return bad("name", "must not be empty");
        }
        if self.command.trim().is_empty() {
            return bad("command", "must not be empty");
        }
        if !(self.timeout_secs.is_finite() && self.timeout_secs > 0.0) {
            return bad("timeout_secs", "must be a positive number of seconds");
        }
        if !(self.startup_secs.is_finite() && self.startup_secs >= 0.0) {
            return bad("startup_secs", "must be a non-negative number of seconds");
        }
        if self.processes == 0 {
            return bad("processes", "must be at least 1");
        }
        Ok(())
    }
}

/// A reply line from the plugin (its `id` is matched on the raw JSON first).
#[derive(Debug, Deserialize)]
struct Reply {
    score: f32,
    #[serde(default)]
    format_ok: bool,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    extracted: Option<String>,
}

/// A running plugin process: its stdin, and a channel fed by the thread reading its stdout.
struct Running {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    /// Whether it has answered a request yet (until then the start-up allowance applies).
    answered: bool,
}

impl Running {
    fn kill(mut self) {
        // SAFETY: kill has no memory preconditions; the process leads its own group (process_group(0)).
        unsafe {
            libc::kill(-(self.child.id() as libc::pid_t), libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

/// A verifier backed by an external process.
pub struct PluginVerifier {
    config: PluginConfig,
    slots: Vec<Mutex<Option<Running>>>,
    next_slot: AtomicUsize,
    next_id: AtomicU64,
}

impl PluginVerifier {
    /// A plugin verifier; the process starts on the first request.
    pub fn new(config: PluginConfig) -> Result<Self> {
        config.validate("plugin")?;
        let slots = (0..config.processes).map(|_| Mutex::new(None)).collect();
        Ok(PluginVerifier {
            config,
            slots,
            next_slot: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
        })
    }

    fn start(&self) -> std::io::Result<Running> {
        let mut command = Command::new(&self.config.command);
        command
            .args(&self.config.args)
            .envs(&self.config.env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        if let Some(cwd) = &self.config.cwd {
            command.current_dir(cwd);
        }
        let mut child = command.spawn()?;
        let name = self.config.name.clone();
        tracing::info!(plugin = %name, pid = child.id(), "plugin started");
        let missing = || std::io::Error::other("a piped stdio handle is missing");
        let stdin = child.stdin.take().ok_or_else(missing)?;
        let stdout = child.stdout.take().ok_or_else(missing)?;
        let stderr = child.stderr.take().ok_or_else(missing)?;
        let (line_tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line_tx.send(line).is_err() {
                    break;
                }
            }
        });
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(|line| line.ok()) {
                tracing::warn!(plugin = %name, "stderr: {line}");
            }
        });
        Ok(Running {
            child,
            stdin,
            lines,
            answered: false,
        })
    }

    /// Send one request on `running` and wait for its reply. `Err` means the process must be replaced.
    fn exchange(
        &self,
        running: &mut Running,
        id: u64,
        input: &VerifyInput<'_>,
    ) -> std::result::Result<Verdict, String> {
        let request = serde_json::json!({
            "id": id,
            "prompt": input.prompt,
            "response": input.response,
            "answer": input.answer,
            "meta": input.meta,
        });
        let mut line = request.to_string();
        line.push('\n');
        if let Err(error) = running
            .stdin
            .write_all(line.as_bytes())
            .and_then(|()| running.stdin.flush())
        {
            return Err(format!(
                "could not write to the plugin ({error}): it has exited"
            ));
        }
        let allowance = if running.answered {
            0.0
        } else {
            self.config.startup_secs
        };
        let deadline =
            Instant::now() + Duration::from_secs_f64(self.config.timeout_secs + allowance);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match running.lines.recv_timeout(left) {
                Ok(line) => line,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let waited = self.config.timeout_secs + allowance;
                    return Err(format!("no reply within {waited} s: plugin restarted"));
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = running
                        .child
                        .wait()
                        .map(|s| s.to_string())
                        .unwrap_or_else(|e| e.to_string());
                    return Err(format!(
                        "the plugin exited ({status}) before replying: plugin restarted"
                    ));
                }
            };
            let value: serde_json::Value = match serde_json::from_str(&line) {
                Ok(value) => value,
                Err(error) => {
                    tracing::warn!(plugin = %self.config.name, "skipping a stdout line that is not JSON ({error}): {line}");
                    continue;
                }
            };
            let reply_id = value.get("id").and_then(serde_json::Value::as_u64);
            if reply_id != Some(id) {
                tracing::warn!(plugin = %self.config.name, "skipping a line for id {reply_id:?} (waiting for {id}): {line}");
                continue;
            }
            running.answered = true;
            // The reply for this request, but malformed: the request fails, the process stays.
            let reply: Reply = match serde_json::from_value(value) {
                Ok(reply) => reply,
                Err(error) => {
                    return Ok(VerifyFailure::Plugin(
                        self.config.name.clone(),
                        format!("malformed reply ({error}): {line}"),
                    )
                    .into_verdict())
                }
            };
            let score = if reply.score.is_finite() {
                reply.score.clamp(0.0, 1.0)
            } else {
                0.0
            };
            return Ok(Verdict {
                score,
                format_ok: reply.format_ok,
                extracted: reply.extracted,
                reason: reply.reason,
                hallucination: None,
                failure: None,
            });
        }
    }
}

impl Verifier for PluginVerifier {
    fn name(&self) -> &str {
        &self.config.name
    }

    fn verify(&self, input: &VerifyInput<'_>) -> Result<Verdict> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // Prefer an idle process; else queue on one, round-robin.
        let slot = self
            .slots
            .iter()
            .find_map(|slot| slot.try_lock().ok())
            .unwrap_or_else(|| {
                let index = self.next_slot.fetch_add(1, Ordering::Relaxed) % self.slots.len();
                self.slots[index]
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
            });
        let mut slot = slot;
        if slot.is_none() {
            let running = self.start().map_err(|error| {
                Error::msg(format!(
                    "plugin `{}`: cannot start `{}`: {error}",
                    self.config.name, self.config.command
                ))
            })?;
            *slot = Some(running);
        }
        // `slot` was filled just above when it was empty.
        let running = slot.as_mut().expect("slot filled above");
        match self.exchange(running, id, input) {
            Ok(verdict) => Ok(verdict),
            Err(reason) => {
                if let Some(running) = slot.take() {
                    running.kill();
                }
                tracing::warn!(plugin = %self.config.name, "request {id}: {reason}");
                Ok(
                    VerifyFailure::Plugin(self.config.name.clone(), reason.to_string())
                        .into_verdict(),
                )
            }
        }
    }
}

impl Drop for PluginVerifier {
    fn drop(&mut self) {
        for slot in &self.slots {
            let mut slot = slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Some(running) = slot.take() {
                running.kill();
            }
        }
    }
}
