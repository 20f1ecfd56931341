//! The code verifier and its sandbox, end to end with python3.
//!
//! Tests skip (with a message) where python3 is not installed in the sandbox PATH.

use std::time::{Duration, Instant};

use r1v2_actors::verifiers::code::{extract_code_block, CodeConfig, CodeVerifier};
use r1v2_actors::verifiers::sandbox::{network_isolation, NetworkIsolation};
use r1v2_actors::verifiers::{Verdict, Verifier, VerifyInput};
use serde_json::{json, Value};

fn have_python() -> bool {
    let found = ["/usr/local/bin/python3", "/usr/bin/python3", "/bin/python3"]
        .iter()
        .any(|p| std::path::Path::new(p).exists());
    if !found {
        eprintln!("skipping: no python3 in the sandbox PATH");
    }
    found
}

fn config() -> CodeConfig {
    CodeConfig {
        timeout_secs: 3.0,
        cpu_secs: 2,
        memory_mb: 256,
        ..CodeConfig::default()
    }
}

fn run(config: CodeConfig, code: &str, answer: &Value) -> Verdict {
    let verifier = CodeVerifier::new(config).unwrap();
    let response =
        format!("<think>try ```python\nprint(0)\n```</think>\nHere:\n```python\n{code}\n```\n");
    let answer = answer.to_string();
    let input = VerifyInput {
        prompt: "",
        response: &response,
        answer: &answer,
        meta: &Value::Null,
    };
    verifier.verify(&input).unwrap()
}

fn sum_tests() -> Value {
    json!({"inputs": ["1 2\n", "10 -3\n", "0 0\n"], "outputs": ["3\n", "7\n", "0\n"]})
}

#[test]
fn extraction_takes_the_last_python_block_after_think() {
    let languages = CodeConfig::default().languages;
    let text = "<think>```python\nbad\n```</think>```python\nfirst\n```\n```text\nnot code\n```\n```py\nsecond\n```";
    assert_eq!(
        extract_code_block(text, &languages).as_deref(),
        Some("second")
    );
    assert_eq!(
        extract_code_block("```\nplain\n```", &languages).as_deref(),
        Some("plain")
    );
    assert_eq!(extract_code_block("no code", &languages), None);
}

#[test]
fn correct_solution_passes_and_wrong_answer_fails() {
    if !have_python() {
        return;
    }
    let good = run(
        config(),
        "a, b = map(int, input().split())\nprint(a + b)",
        &sum_tests(),
    );
    assert_eq!(good.score, 1.0, "{}", good.reason);
    assert_eq!(good.reason, "3/3 tests passed");
    let wrong = run(
        config(),
        "a, b = map(int, input().split())\nprint(a + b if a else 1)",
        &sum_tests(),
    );
    assert!((wrong.score - 2.0 / 3.0).abs() < 1e-6, "{}", wrong.reason);
    assert!(
        wrong.reason.contains("test 3: wrong answer"),
        "{}",
        wrong.reason
    );
    let strict = CodeConfig {
        all_or_nothing: true,
        ..config()
    };
    let wrong = run(
        strict,
        "a, b = map(int, input().split())\nprint(a + b if a else 1)",
        &sum_tests(),
    );
    assert_eq!(wrong.score, 0.0);
}

#[test]
fn function_call_form_runs_through_the_harness() {
    if !have_python() {
        return;
    }
    let tests = json!({"fn_name": "twice", "inputs": [[2], [5]], "outputs": [[4], [10]]});
    let plain = run(
        config(),
        "def twice(x):\n    print('noise')\n    return 2 * x",
        &tests,
    );
    assert_eq!(plain.score, 1.0, "{}", plain.reason);
    let leetcode = run(
        config(),
        "class Solution:\n    def twice(self, x):\n        return x + x",
        &tests,
    );
    assert_eq!(leetcode.score, 1.0, "{}", leetcode.reason);
    let missing = run(config(), "def thrice(x):\n    return 3 * x", &tests);
    assert_eq!(missing.score, 0.0);
    assert!(missing.reason.contains("NameError"), "{}", missing.reason);
}

#[test]
fn syntax_error_scores_zero_with_the_reason() {
    if !have_python() {
        return;
    }
    let verdict = run(config(), "def f(:\n    pass", &sum_tests());
    assert_eq!(verdict.score, 0.0);
    assert!(verdict.reason.contains("SyntaxError"), "{}", verdict.reason);
}

#[test]
fn infinite_loop_is_killed_within_the_timeout() {
    if !have_python() {
        return;
    }
    let tests = json!({"inputs": [""], "outputs": ["1"]});
    let config = CodeConfig {
        timeout_secs: 1.0,
        cpu_secs: 10,
        ..config()
    };
    let start = Instant::now();
    let verdict = run(config, "while True:\n    pass", &tests);
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "took {:?}",
        start.elapsed()
    );
    assert_eq!(verdict.score, 0.0);
    assert!(
        verdict.reason.contains("time limit exceeded"),
        "{}",
        verdict.reason
    );
}

#[test]
fn cpu_limit_stops_a_spinning_process() {
    if !have_python() {
        return;
    }
    let tests = json!({"inputs": [""], "outputs": ["1"]});
    let config = CodeConfig {
        timeout_secs: 5.0,
        cpu_secs: 1,
        ..config()
    };
    let verdict = run(config, "while True:\n    pass", &tests);
    assert!(
        verdict.reason.contains("CPU time limit exceeded"),
        "{}",
        verdict.reason
    );
}

#[test]
fn fork_bomb_is_contained() {
    if !have_python() {
        return;
    }
    let tests = json!({"inputs": [""], "outputs": ["1"]});
    let bomb =
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass";
    let config = CodeConfig {
        timeout_secs: 1.5,
        max_processes: 8,
        ..config()
    };
    let start = Instant::now();
    let verdict = run(config, bomb, &tests);
    assert_eq!(verdict.score, 0.0);
    assert!(
        start.elapsed() < Duration::from_secs(6),
        "took {:?}",
        start.elapsed()
    );
    // The correct program still runs right after: the machine was not exhausted.
    let good = run(
        self::config(),
        "a, b = map(int, input().split())\nprint(a + b)",
        &sum_tests(),
    );
    assert_eq!(good.score, 1.0, "{}", good.reason);
}

#[test]
fn memory_hog_is_stopped() {
    if !have_python() {
        return;
    }
    let tests = json!({"inputs": [""], "outputs": ["done"]});
    let verdict = run(
        config(),
        "block = bytearray(2 * 1024 ** 3)\nprint('done')",
        &tests,
    );
    assert_eq!(verdict.score, 0.0);
    assert!(
        verdict.reason.contains("MemoryError") || verdict.reason.contains("signal"),
        "{}",
        verdict.reason
    );
}

#[test]
fn huge_output_is_cut_off() {
    if !have_python() {
        return;
    }
    let tests = json!({"inputs": [""], "outputs": ["1"]});
    let config = CodeConfig {
        output_limit_bytes: 64 * 1024,
        ..config()
    };
    let start = Instant::now();
    let verdict = run(
        config,
        "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)",
        &tests,
    );
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "took {:?}",
        start.elapsed()
    );
    assert!(
        verdict.reason.contains("output limit exceeded"),
        "{}",
        verdict.reason
    );
}

#[test]
fn network_is_unreachable_when_namespaces_work() {
    if !have_python() {
        return;
    }
    if network_isolation() == NetworkIsolation::Unavailable {
        eprintln!("skipping: this machine cannot create a network namespace");
        return;
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let code = format!(
        "import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n    print('connected')\nexcept OSError as e:\n    print('blocked', e)"
    );
    let tests = json!({"inputs": [""], "outputs": ["connected"]});
    let isolated = run(config(), &code, &tests);
    assert_eq!(isolated.score, 0.0, "{}", isolated.reason);
    assert!(isolated.reason.contains("blocked"), "{}", isolated.reason);
    // The same code with the network allowed connects: the test can fail.
    let open = CodeConfig {
        network: r1v2_actors::verifiers::sandbox::NetworkPolicy::Allow,
        ..config()
    };
    let connected = run(open, &code, &tests);
    assert_eq!(connected.score, 1.0, "{}", connected.reason);
}

#[test]
fn missing_code_block_and_missing_tests_score_zero() {
    let verifier = CodeVerifier::new(config()).unwrap();
    let answer = sum_tests().to_string();
    let input = VerifyInput {
        prompt: "",
        response: "I would print the sum.",
        answer: &answer,
        meta: &Value::Null,
    };
    let verdict = verifier.verify(&input).unwrap();
    assert_eq!(verdict.score, 0.0);
    assert!(!verdict.format_ok);
    let input = VerifyInput {
        prompt: "",
        response: "```python\nprint(1)\n```",
        answer: "42",
        meta: &Value::Null,
    };
    assert!(verifier.verify(&input).is_err());
}

#[test]
fn tests_past_the_time_budget_are_not_run() {
    if !have_python() {
        return;
    }
    let tests = json!({"inputs": ["", "", "", ""], "outputs": ["ok", "ok", "ok", "ok"]});
    let config = CodeConfig {
        parallel_tests: 1,
        budget_secs: 1.0,
        ..config()
    };
    let verdict = run(config, "import time\ntime.sleep(0.6)\nprint('ok')", &tests);
    assert!(
        verdict.score > 0.0 && verdict.score < 1.0,
        "{}",
        verdict.reason
    );
    assert!(
        verdict
            .reason
            .contains("not run (time budget of 1 s spent)"),
        "{}",
        verdict.reason
    );
}

#[test]
fn sandbox_clears_the_environment_and_uses_a_temp_dir() {
    if !have_python() {
        return;
    }
    // Cargo sets CARGO_MANIFEST_DIR for the test process; the sandboxed code must not see it.
    assert!(std::env::var("CARGO_MANIFEST_DIR").is_ok());
    let code = "import os\nprint(os.environ.get('CARGO_MANIFEST_DIR', 'clean'))\nprint(os.path.basename(os.getcwd())[:10])\nprint('root' if os.getuid() == 0 else 'user')";
    // Run as root, the sandbox drops to a uid of its own; otherwise it keeps ours, never root.
    let tests = json!({"inputs": [""], "outputs": ["clean\nr1v2-code-\nuser"]});
    let verdict = run(config(), code, &tests);
    assert_eq!(verdict.score, 1.0, "{}", verdict.reason);
}

#[test]
fn junk_responses_never_panic() {
    let verifier = CodeVerifier::new(config()).unwrap();
    let answer = sum_tests().to_string();
    let huge = "```".repeat(100_000);
    let junk = [
        "```python",
        "```python\n",
        "``````````",
        "</think></think>```py\n```",
        "\u{0}\u{feff}```\u{202e}python\n\u{10ffff}\n```",
        huge.as_str(),
    ];
    for response in junk {
        let input = VerifyInput {
            prompt: "",
            response,
            answer: &answer,
            meta: &Value::Null,
        };
        let verdict = verifier.verify(&input).unwrap();
        assert!(verdict.score < 1.0, "{response:?}: {}", verdict.reason);
    }
    let bytes: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let lossy = String::from_utf8_lossy(&bytes);
    let input = VerifyInput {
        prompt: "",
        response: &lossy,
        answer: &answer,
        meta: &Value::Null,
    };
    assert!(verifier.verify(&input).unwrap().score < 1.0);
}
