//! Competitive-programming verifier: run the response's last fenced code block against the reference tests.
//!
//! The code runs in the [`sandbox`](super::sandbox) (temp directory, rlimits, new session killed on the
//! wall-clock timeout, no network where the machine allows it, cleared environment). Test cases come from the
//! answer or the metadata, in the APPS/TACO and LiveCodeBench layouts ([`super::code_cases`]); the function-call
//! form runs through a small Python harness. Score: the share of tests passed, or all-or-nothing.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::Value;

use super::code_cases::{parse_test_cases, stdout_matches, value_matches, TestCase};
use super::sandbox::{run_sandboxed, NetworkPolicy, SandboxLimits, SandboxOutput, Termination};
use super::{Verdict, Verifier, VerifyInput};
use crate::{Error, Result};

/// `[code]` section of the verifier config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CodeConfig {
    /// Fence tags that mark a code block in this language (the first is the language's name).
    pub languages: Vec<String>,
    /// Interpreter command; the file name is appended. Looked up in the sandbox `PATH` (/usr/local/bin,
    /// /usr/bin, /bin), not the caller's, so that a user-level shim (pyenv) does not leak in.
    pub command: Vec<String>,
    /// File name the code is written to inside the sandbox directory.
    pub file_name: String,
    /// Wall-clock limit per test, seconds (competitive-programming limits are 1-4 s; interpreters start slow).
    pub timeout_secs: f64,
    /// CPU-time limit per test, seconds (`RLIMIT_CPU`).
    pub cpu_secs: u64,
    /// Address-space limit per test, MiB (`RLIMIT_AS`): 1 GiB leaves room for an interpreter and numpy.
    pub memory_mb: u64,
    /// Processes and threads per test (`RLIMIT_NPROC`): small, so a fork bomb stops at once.
    pub max_processes: u64,
    /// Largest file the code may write, MiB (`RLIMIT_FSIZE`).
    pub file_size_mb: u64,
    /// Bytes of stdout kept per test; more kills the test (a correct answer never needs this much).
    pub output_limit_bytes: usize,
    /// Network policy: `isolate`, `isolate_if_possible` (the default) or `allow`.
    pub network: NetworkPolicy,
    /// Tests run at once per response.
    pub parallel_tests: usize,
    /// At most this many tests per response (the first ones), to bound the cost of huge test suites.
    pub max_tests: usize,
    /// Seconds all of one response's tests may take together; tests not started by then fail as not run.
    /// Keep it under the registry's `timeout_secs`, which abandons the whole verification.
    pub budget_secs: f64,
    /// Score 1 only when every test passes (else the share passed).
    pub all_or_nothing: bool,
    /// First uid of the range sandbox runs drop to when we are root.
    pub sandbox_uid_base: u32,
}

impl Default for CodeConfig {
    fn default() -> Self {
        CodeConfig {
            languages: vec!["python".into(), "py".into(), "python3".into()],
            command: vec!["python3".into()],
            file_name: "solution.py".into(),
            timeout_secs: 6.0,
            cpu_secs: 4,
            memory_mb: 1024,
            max_processes: 16,
            file_size_mb: 16,
            output_limit_bytes: 1 << 20,
            network: NetworkPolicy::IsolateIfPossible,
            parallel_tests: 2,
            max_tests: 64,
            budget_secs: 40.0,
            all_or_nothing: false,
            sandbox_uid_base: 61_000,
        }
    }
}

impl CodeConfig {
    /// Check the values once, naming the offending key.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, msg: &str| {
            Err(Error::Config {
                key: format!("code.{key}"),
                msg: msg.into(),
            })
        };
        if self.languages.is_empty() {
            return bad("languages", "must name at least one fence tag");
        }
        if self.command.is_empty() {
            return bad("command", "must not be empty");
        }
        if !(self.timeout_secs.is_finite() && self.timeout_secs > 0.0) {
            return bad("timeout_secs", "must be a positive number of seconds");
        }
        if !(self.budget_secs.is_finite() && self.budget_secs > 0.0) {
            return bad("budget_secs", "must be a positive number of seconds");
        }
        if self.parallel_tests == 0
            || self.max_tests == 0
            || self.cpu_secs == 0
            || self.max_processes == 0
        {
            return bad(
                "parallel_tests / max_tests / cpu_secs / max_processes",
                "must be at least 1",
            );
        }
        if self.file_name.is_empty() || self.file_name.contains('/') {
            return bad("file_name", "must be a plain file name");
        }
        Ok(())
    }

    fn limits(&self) -> SandboxLimits {
        SandboxLimits {
            wall_timeout: Duration::from_secs_f64(self.timeout_secs),
            cpu_secs: self.cpu_secs,
            memory_bytes: self.memory_mb << 20,
            max_processes: self.max_processes,
            file_size_bytes: self.file_size_mb << 20,
            output_limit_bytes: self.output_limit_bytes,
            network: self.network,
            uid_base: self.sandbox_uid_base,
        }
    }
}

/// Runs a response's code against the reference tests.
pub struct CodeVerifier {
    config: CodeConfig,
}

impl CodeVerifier {
    /// A code verifier with a validated config.
    pub fn new(config: CodeConfig) -> Result<Self> {
        config.validate()?;
        if config.network != NetworkPolicy::Allow {
            super::sandbox::network_isolation(); // probe now, so the log says which isolation is in force
        }
        Ok(CodeVerifier { config })
    }
}

/// The last fenced code block tagged with one of `languages` (else the last untagged one), after `</think>`
/// when the response has one.
pub fn extract_code_block(response: &str, languages: &[String]) -> Option<String> {
    let answer = response
        .rsplit_once("</think>")
        .map_or(response, |(_, after)| after);
    let (mut tagged, mut untagged) = (None, None);
    let mut lines = answer.lines();
    while let Some(line) = lines.next() {
        let Some(tag) = line.trim_start().strip_prefix("```") else {
            continue;
        };
        let tag = tag.trim().to_ascii_lowercase();
        let mut body = Vec::new();
        for inner in lines.by_ref() {
            if inner.trim_start().starts_with("```") {
                break;
            }
            body.push(inner);
        }
        let code = body.join("\n");
        if tag.is_empty() {
            untagged = Some(code);
        } else if languages
            .iter()
            .any(|language| language.eq_ignore_ascii_case(&tag))
        {
            tagged = Some(code);
        }
    }
    tagged.or(untagged)
}

/// The function-call harness: runs the solution with stdout captured, calls the function, and prints the
/// return value as JSON after a marker line on the real stdout.
const CALL_HARNESS: &str = r#"
import io, json, sys
case = json.load(open("case.json"))
sys.stdout = io.StringIO()
namespace = {"__name__": "solution"}
exec(compile(open(case["file"]).read(), case["file"], "exec"), namespace)
name = case["fn_name"]
if name in namespace:
    function = namespace[name]
elif "Solution" in namespace:
    function = getattr(namespace["Solution"](), name)
else:
    raise NameError("the solution defines no function `%s`" % name)
result = function(*case["args"])
def plain(value):
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, tuple):
        return list(value)
    return str(value)
sys.__stdout__.write("\n@@R1V2_RESULT@@\n" + json.dumps(result, default=plain) + "\n")
"#;

const RESULT_MARKER: &str = "@@R1V2_RESULT@@";

/// How one test went.
#[derive(Debug)]
enum TestOutcome {
    Passed,
    Failed(String),
}

impl CodeVerifier {
    fn run_test(&self, code: &str, case: &TestCase) -> TestOutcome {
        match self.run_test_inner(code, case) {
            Ok(outcome) => outcome,
            Err(error) => TestOutcome::Failed(format!("sandbox error: {error}")),
        }
    }

    fn run_test_inner(&self, code: &str, case: &TestCase) -> std::io::Result<TestOutcome> {
        let dir = tempfile::Builder::new().prefix("r1v2-code-").tempdir()?;
        std::fs::write(dir.path().join(&self.config.file_name), code)?;
        let limits = self.config.limits();
        let output = match case {
            TestCase::Stdio { input, .. } => {
                let mut argv = self.config.command.clone();
                argv.push(self.config.file_name.clone());
                run_sandboxed(&argv, dir.path(), input.as_bytes(), &limits)?
            }
            TestCase::Call { fn_name, args, .. } => {
                write_call_case(dir.path(), &self.config.file_name, fn_name, args)?;
                let mut argv = self.config.command.clone();
                argv.push("harness.py".into());
                run_sandboxed(&argv, dir.path(), b"", &limits)?
            }
        };
        Ok(judge(case, &output, &self.config))
    }
}

fn write_call_case(dir: &Path, file: &str, fn_name: &str, args: &[Value]) -> std::io::Result<()> {
    std::fs::write(dir.join("harness.py"), CALL_HARNESS)?;
    let case = serde_json::json!({"file": file, "fn_name": fn_name, "args": args});
    std::fs::write(dir.join("case.json"), case.to_string())
}

/// Turn a finished run into a pass or a failure with its reason.
fn judge(case: &TestCase, output: &SandboxOutput, config: &CodeConfig) -> TestOutcome {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr_tail = || {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last = stderr
            .lines()
            .rev()
            .find(|line| !line.trim().is_empty())
            .unwrap_or("");
        shorten(last, 200)
    };
    match output.termination {
        Termination::TimedOut => {
            return TestOutcome::Failed(format!(
                "time limit exceeded ({} s wall clock)",
                config.timeout_secs
            ))
        }
        Termination::OutputLimit => {
            return TestOutcome::Failed(format!(
                "output limit exceeded (more than {} bytes)",
                config.output_limit_bytes
            ))
        }
        Termination::Signaled(signal) => {
            let what = match signal {
                libc::SIGXCPU => "CPU time limit exceeded".to_string(),
                libc::SIGXFSZ => "file size limit exceeded".to_string(),
                libc::SIGSEGV => "segmentation fault (or memory limit)".to_string(),
                other => format!("killed by signal {other}"),
            };
            return TestOutcome::Failed(what);
        }
        Termination::Exited(code) if code != 0 => {
            return TestOutcome::Failed(format!("runtime error (exit {code}): {}", stderr_tail()))
        }
        Termination::Exited(_) => {}
    }
    match case {
        TestCase::Stdio {
            output: expected, ..
        } => {
            if stdout_matches(&stdout, expected) {
                TestOutcome::Passed
            } else {
                TestOutcome::Failed(format!(
                    "wrong answer: expected {:?}, got {:?}",
                    shorten(expected.trim(), 80),
                    shorten(stdout.trim(), 80)
                ))
            }
        }
        TestCase::Call { expected, .. } => {
            let result = stdout
                .rsplit_once(RESULT_MARKER)
                .and_then(|(_, json)| serde_json::from_str::<Value>(json.trim()).ok());
            match result {
                Some(actual) if value_matches(&actual, expected) => TestOutcome::Passed,
                Some(actual) => TestOutcome::Failed(format!(
                    "wrong answer: expected {}, got {}",
                    shorten(&expected.to_string(), 80),
                    shorten(&actual.to_string(), 80)
                )),
                None => TestOutcome::Failed("the function returned nothing readable".into()),
            }
        }
    }
}

fn shorten(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_string(),
    }
}

impl Verifier for CodeVerifier {
    fn name(&self) -> &str {
        "code"
    }

    fn verify(&self, input: &VerifyInput<'_>) -> Result<Verdict> {
        let Some(code) = extract_code_block(input.response, &self.config.languages) else {
            return Ok(Verdict {
                reason: format!(
                    "no fenced {} code block in the response",
                    self.config.languages[0]
                ),
                ..Verdict::zero("")
            });
        };
        let mut cases = parse_test_cases(input.answer, input.meta).map_err(Error::Msg)?;
        cases.truncate(self.config.max_tests);

        // Tests in parallel: `parallel_tests` workers take the next index until none is left, the time
        // budget is spent, or (all-or-nothing) a test has failed.
        let next = AtomicUsize::new(0);
        let stop = AtomicBool::new(false);
        let budget_end = Instant::now() + Duration::from_secs_f64(self.config.budget_secs);
        let mut outcomes: Vec<Option<TestOutcome>> = (0..cases.len()).map(|_| None).collect();
        let workers = self.config.parallel_tests.min(cases.len());
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..workers)
                .map(|_| {
                    scope.spawn(|| {
                        let mut done = Vec::new();
                        loop {
                            let index = next.fetch_add(1, Ordering::Relaxed);
                            let Some(case) = cases.get(index) else {
                                break done;
                            };
                            if stop.load(Ordering::Relaxed) || Instant::now() >= budget_end {
                                break done;
                            }
                            let outcome = self.run_test(&code, case);
                            if self.config.all_or_nothing
                                && matches!(outcome, TestOutcome::Failed(_))
                            {
                                stop.store(true, Ordering::Relaxed);
                            }
                            done.push((index, outcome));
                        }
                    })
                })
                .collect();
            for handle in handles {
                // A worker only panics if run_test does; the registry's catch_unwind reports that.
                for (index, outcome) in handle.join().unwrap_or_default() {
                    outcomes[index] = Some(outcome);
                }
            }
        });

        let total = cases.len();
        let passed = outcomes
            .iter()
            .filter(|o| matches!(o, Some(TestOutcome::Passed)))
            .count();
        // In all-or-nothing mode the tests skipped after a failure are not the reason: the failure is.
        let first_failure =
            outcomes
                .iter()
                .enumerate()
                .find_map(|(index, outcome)| match outcome {
                    Some(TestOutcome::Failed(why)) => Some(format!("; test {}: {why}", index + 1)),
                    None if stop.load(Ordering::Relaxed) => None,
                    None => Some(format!(
                        "; test {}: not run (time budget of {} s spent)",
                        index + 1,
                        self.config.budget_secs
                    )),
                    Some(TestOutcome::Passed) => None,
                });
        let score = if self.config.all_or_nothing {
            if passed == total {
                1.0
            } else {
                0.0
            }
        } else {
            passed as f32 / total as f32
        };
        Ok(Verdict {
            score,
            format_ok: true,
            extracted: Some(code),
            reason: format!(
                "{passed}/{total} tests passed{}",
                first_failure.unwrap_or_default()
            ),
            hallucination: None,
            failure: None,
        })
    }
}
