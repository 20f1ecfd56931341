//! External-process plugins (crash, hang, restart, id matching) and the registry's safety net.

use std::sync::Arc;
use std::time::{Duration, Instant};

use r1v2_actors::verifiers::config::VerifiersConfig;
use r1v2_actors::verifiers::plugin::{PluginConfig, PluginVerifier};
use r1v2_actors::verifiers::registry::{VerifierRegistry, VerifyFailure, VerifyRequest};
use r1v2_actors::verifiers::{Verdict, Verifier, VerifyInput};
use r1v2_actors::{Error, Result};

const FLAKY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/plugins/flaky_plugin.py");
const EXAMPLE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../examples/plugin_verifier.py"
);

fn have_python() -> bool {
    let found = std::process::Command::new("python3")
        .arg("-c")
        .arg("pass")
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        eprintln!("skipping: no python3");
    }
    found
}

fn plugin(name: &str, script: &str, timeout_secs: f64) -> PluginConfig {
    PluginConfig {
        name: name.into(),
        command: "python3".into(),
        args: vec![script.into()],
        timeout_secs,
        startup_secs: 30.0,
        cwd: None,
        env: Default::default(),
        processes: 1,
    }
}

fn request(verifier: &str, response: &str, answer: &str) -> VerifyRequest {
    VerifyRequest {
        verifier: verifier.into(),
        response: response.into(),
        answer: answer.into(),
        ..Default::default()
    }
}

fn ask(verifier: &PluginVerifier, response: &str, answer: &str) -> Verdict {
    let meta = serde_json::Value::Null;
    verifier
        .verify(&VerifyInput {
            prompt: "q",
            response,
            answer,
            meta: &meta,
        })
        .unwrap()
}

#[test]
fn plugin_survives_crash_and_hang_and_matches_ids() {
    if !have_python() {
        return;
    }
    let verifier = PluginVerifier::new(plugin("flaky", FLAKY, 1.0)).unwrap();
    let first = ask(&verifier, "42", "42");
    assert_eq!(first.score, 1.0, "{}", first.reason);
    let second = ask(&verifier, "41", "42");
    assert_eq!(second.score, 0.0);
    assert_eq!(
        first.reason, second.reason,
        "the process is kept alive between requests"
    );

    let crashed = ask(&verifier, "crash", "x");
    assert_eq!(crashed.score, 0.0);
    assert!(crashed.reason.contains("exited"), "{}", crashed.reason);
    let after_crash = ask(&verifier, "7", "7");
    assert_eq!(after_crash.score, 1.0, "{}", after_crash.reason);
    assert_ne!(
        after_crash.reason, first.reason,
        "a new process answers after the crash"
    );

    let start = Instant::now();
    let hung = ask(&verifier, "hang", "x");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "took {:?}",
        start.elapsed()
    );
    assert_eq!(hung.score, 0.0);
    assert!(
        hung.reason.contains("no reply within 1 s"),
        "{}",
        hung.reason
    );
    let after_hang = ask(&verifier, "8", "8");
    assert_eq!(after_hang.score, 1.0, "{}", after_hang.reason);

    // A reply for another id and a non-JSON line are skipped; the matching reply is used.
    assert_eq!(ask(&verifier, "wrong-id", "nope").score, 0.0);
    assert_eq!(ask(&verifier, "noise", "noise").score, 1.0);
    let malformed = ask(&verifier, "malformed", "malformed");
    assert!(
        malformed.score == 0.0 && malformed.reason.contains("malformed reply"),
        "{}",
        malformed.reason
    );
    let after_malformed = ask(&verifier, "9", "9");
    assert_eq!(after_malformed.score, 1.0);
    assert_eq!(
        after_malformed.reason, after_hang.reason,
        "a malformed reply does not restart the plugin"
    );
}

#[test]
fn several_plugin_processes_share_a_batch() {
    if !have_python() {
        return;
    }
    let mut registry = VerifierRegistry::new(Duration::from_secs(30), 4);
    let config = PluginConfig {
        processes: 2,
        ..plugin("flaky", FLAKY, 5.0)
    };
    registry.register(Arc::new(PluginVerifier::new(config).unwrap()));
    let requests: Vec<_> = (0..6)
        .map(|i| {
            request(
                "flaky",
                &i.to_string(),
                if i % 3 == 0 { "x" } else { &"0123456"[i..=i] },
            )
        })
        .collect();
    let scores: Vec<f32> = registry
        .verify_batch(&requests)
        .iter()
        .map(|v| v.score)
        .collect();
    assert_eq!(scores, vec![0.0, 1.0, 1.0, 0.0, 1.0, 1.0]);
}

#[test]
fn plugin_that_cannot_start_is_an_error() {
    let config = PluginConfig {
        command: "/nonexistent/plugin".into(),
        ..plugin("ghost", FLAKY, 1.0)
    };
    let verifier = PluginVerifier::new(config).unwrap();
    let meta = serde_json::Value::Null;
    let error = verifier
        .verify(&VerifyInput {
            prompt: "",
            response: "",
            answer: "",
            meta: &meta,
        })
        .unwrap_err();
    assert!(error.to_string().contains("cannot start"), "{error}");
}

#[test]
fn example_python_plugin_scores_through_the_registry() {
    if !have_python() {
        return;
    }
    let toml = format!("[[plugins]]\nname = \"exact\"\ncommand = \"python3\"\nargs = [\"{EXAMPLE}\"]\ntimeout_secs = 10\n");
    let registry =
        VerifierRegistry::from_config(&VerifiersConfig::from_toml_str(&toml).unwrap()).unwrap();
    let requests = vec![
        request("exact", "<think>hmm</think>\nAnswer: Paris.", "paris"),
        request("exact", "<think>hmm</think>\nAnswer: Lyon", "paris"),
        request("exact", "London", "London"),
    ];
    let verdicts = registry.verify_batch(&requests);
    let scores: Vec<f32> = verdicts.iter().map(|v| v.score).collect();
    assert_eq!(scores, vec![1.0, 0.0, 1.0], "{verdicts:?}");
    assert_eq!(verdicts[0].extracted.as_deref(), Some("Paris."));
    assert!(verdicts[0].format_ok && !verdicts[2].format_ok);
}

/// A custom verifier that misbehaves on request.
struct Moody;

impl Verifier for Moody {
    fn name(&self) -> &str {
        "moody"
    }

    fn verify(&self, input: &VerifyInput<'_>) -> Result<Verdict> {
        match input.response {
            "panic" => panic!("moody panicked"),
            "error" => Err(Error::msg("moody refused")),
            "sleep" => {
                std::thread::sleep(Duration::from_secs(6));
                Ok(Verdict::zero("late"))
            }
            "nan" => Ok(Verdict {
                score: f32::NAN,
                ..Verdict::zero("nan")
            }),
            other => Ok(Verdict {
                score: other.len() as f32 / 10.0,
                format_ok: true,
                ..Verdict::zero("ok")
            }),
        }
    }
}

#[test]
fn registry_turns_errors_panics_and_timeouts_into_zero_scores() {
    // Generous: printing a panic's backtrace (RUST_BACKTRACE=1) can take a second on a loaded machine.
    let mut registry = VerifierRegistry::new(Duration::from_secs(20), 4);
    assert!(registry.register(Arc::new(Moody)).is_none());
    let outcome = |response: &str| registry.try_verify(&request("moody", response, ""));
    let panicked = outcome("panic");
    assert!(
        matches!(&panicked, Err(VerifyFailure::Panic(_, message)) if message == "moody panicked"),
        "{panicked:?}"
    );
    assert!(
        matches!(outcome("error"), Err(VerifyFailure::Error(_, message)) if message == "moody refused")
    );
    let mut impatient = VerifierRegistry::new(Duration::from_millis(500), 1);
    impatient.register(Arc::new(Moody));
    let start = Instant::now();
    assert!(matches!(
        impatient.try_verify(&request("moody", "sleep", "")),
        Err(VerifyFailure::Timeout(..))
    ));
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(matches!(outcome("abcde"), Ok(v) if v.score == 0.5));
    assert!(matches!(
        registry.try_verify(&request("nope", "", "")),
        Err(VerifyFailure::UnknownVerifier(..))
    ));
    assert_eq!(registry.verify(&request("moody", "nan", "")).score, 0.0);
    let failed = registry.verify(&request("moody", "panic", ""));
    assert_eq!(failed.score, 0.0);
    assert!(failed.reason.contains("panicked"), "{}", failed.reason);
}

#[test]
fn batch_keeps_order_and_runs_in_parallel() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    /// How many `slow` calls are inside `verify` now, and the most there ever were at once.
    static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
    static MOST_IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
    struct Slow;
    impl Verifier for Slow {
        fn name(&self) -> &str {
            "slow"
        }
        fn verify(&self, input: &VerifyInput<'_>) -> Result<Verdict> {
            let now = IN_FLIGHT.fetch_add(1, Ordering::SeqCst) + 1;
            MOST_IN_FLIGHT.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(200));
            IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
            Ok(Verdict {
                score: input.answer.parse::<f32>().unwrap_or(0.0),
                ..Verdict::zero("")
            })
        }
    }
    let mut registry = VerifierRegistry::new(Duration::from_secs(5), 4);
    registry.register(Arc::new(Slow));
    registry.register(Arc::new(Moody));
    let requests: Vec<_> = (0..8)
        .map(|i| request("slow", "", &format!("0.{i}")))
        .collect();
    let verdicts = registry.verify_batch(&requests);
    let scores: Vec<f32> = verdicts.iter().map(|v| v.score).collect();
    assert_eq!(scores, vec![0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]);
    // A failure inside a batch stays in its place.
    let mixed = [
        request("slow", "", "0.5"),
        request("moody", "error", ""),
        request("slow", "", "1"),
    ];
    let scores: Vec<f32> = registry
        .verify_batch(&mixed)
        .iter()
        .map(|v| v.score)
        .collect();
    assert_eq!(scores, vec![0.5, 0.0, 1.0]);
    // Parallel up to the configured width: calls overlapped, never more than 4 at once.
    let most = MOST_IN_FLIGHT.load(Ordering::SeqCst);
    assert!((2..=4).contains(&most), "at most {most} calls ran at once");
}
