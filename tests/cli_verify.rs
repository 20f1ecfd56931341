//! `r1v2 verify` end to end: the binary scores a JSON-lines file and names bad lines.

use std::process::Command;

fn r1v2() -> Command {
    Command::new(env!("CARGO_BIN_EXE_r1v2"))
}

#[test]
fn verify_scores_a_file_in_order_and_summarises() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let input = dir.path().join("in.jsonl");
    let output = dir.path().join("out.jsonl");
    let plugin = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/plugin_verifier.py");
    let config = dir.path().join("verifiers.toml");
    std::fs::write(
        &config,
        format!("[[plugins]]\nname = \"exact\"\ncommand = \"python3\"\nargs = [\"{plugin}\"]\n"),
    )?;
    let tests = serde_json::json!({"inputs": ["2 3\n"], "outputs": ["5\n"]}).to_string();
    let lines = [
        serde_json::json!({"response": "```python\na, b = map(int, input().split())\nprint(a + b)\n```", "answer": tests, "verifier": "code"}),
        serde_json::json!({"response": "</think>Answer: yes", "answer": "yes", "verifier": "exact", "meta": {"source": "t"}}),
        serde_json::json!({"response": "</think>Answer: no", "answer": "yes", "verifier": "exact"}),
        serde_json::json!({"response": "x", "answer": "y", "verifier": "no_such_verifier"}),
        serde_json::json!({"response": "<think>half</think> The answer is $\\boxed{\\frac{1}{2}}$.", "answer": "0.5", "verifier": "math"}),
        serde_json::json!({"response": "<think>hmm</think> Answer: (C)", "answer": "B", "verifier": "choice"}),
    ];
    let text: Vec<String> = lines.iter().map(|line| line.to_string()).collect();
    std::fs::write(&input, text.join("\n") + "\n\n")?;

    let run = r1v2()
        .args(["verify", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .arg("--config")
        .arg(&config)
        .output()?;
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "stdout {stdout}\nstderr {}",
        String::from_utf8_lossy(&run.stderr)
    );

    let verdicts: Vec<serde_json::Value> = std::fs::read_to_string(&output)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let scores: Vec<f64> = verdicts
        .iter()
        .map(|v| v["score"].as_f64().unwrap_or(-1.0))
        .collect();
    let python = std::path::Path::new("/usr/bin/python3").exists();
    if python {
        assert_eq!(scores, vec![1.0, 1.0, 0.0, 0.0, 1.0, 0.0], "{verdicts:?}");
    } else {
        assert_eq!(&scores[3..], &[0.0, 1.0, 0.0], "{verdicts:?}");
    }
    for verdict in &verdicts {
        for key in ["score", "format_ok", "extracted", "reason"] {
            assert!(verdict.get(key).is_some(), "{key} missing in {verdict}");
        }
    }
    assert!(verdicts[3]["reason"]
        .as_str()
        .unwrap_or("")
        .contains("no verifier named `no_such_verifier`"));
    assert!(stdout.contains("verified 6 lines"), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("math") && l.contains("1.0000")),
        "{stdout}"
    );
    assert!(stdout.contains("no_such_verifier"), "{stdout}");
    assert!(stdout.contains("in.jsonl:4: no verifier named"), "{stdout}");
    if python {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with("exact") && l.contains("0.5000")),
            "{stdout}"
        );
    }
    Ok(())
}

#[test]
fn verify_names_the_file_and_line_of_a_bad_line() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let input = dir.path().join("bad.jsonl");
    std::fs::write(
        &input,
        "{\"response\": \"a\", \"answer\": \"b\", \"verifier\": \"code\"}\n{\"response\": \"a\"}\n",
    )?;
    let run = r1v2()
        .args(["verify", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(dir.path().join("o.jsonl"))
        .output()?;
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("bad.jsonl: line 2: missing field `answer`"),
        "{stderr}"
    );

    let config = dir.path().join("v.toml");
    std::fs::write(&config, "parallel = 2\n[code]\nlanguage = \"c\"\n")?;
    let run = r1v2()
        .args(["verify", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(dir.path().join("o.jsonl"))
        .arg("--config")
        .arg(&config)
        .output()?;
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(
        stderr.contains("v.toml") && stderr.contains("unknown field `language`"),
        "{stderr}"
    );
    Ok(())
}
