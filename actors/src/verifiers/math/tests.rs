//! Tests of the math verifier: extraction, the answer-pair table, the verifier, robustness.

use super::*;
use crate::verifiers::{Verifier, VerifyInput};

const PAIRS: &str = include_str!("testdata/pairs.tsv");
/// Held-out-style grader cases: `{"kind", "response", "answer", "expected"}` per line.
const GRADER_KINDS: &str = include_str!("testdata/grader_kinds.jsonl");

#[test]
fn answer_pair_table() {
    let cfg = MathConfig::default();
    let mut failures = Vec::new();
    let (mut total, mut positives, mut negatives) = (0, 0, 0);
    for (line_no, line) in PAIRS.lines().enumerate() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split('\t').collect();
        assert_eq!(
            fields.len(),
            3,
            "pairs.tsv line {}: want 3 tab-separated fields",
            line_no + 1
        );
        let expected = match fields[0] {
            "1" => true,
            "0" => false,
            other => panic!(
                "pairs.tsv line {}: expected is `{other}`, want 0 or 1",
                line_no + 1
            ),
        };
        total += 1;
        if expected {
            positives += 1;
        } else {
            negatives += 1;
        }
        // Equivalence is symmetric: check both directions.
        for (pred, reference) in [(fields[1], fields[2]), (fields[2], fields[1])] {
            let (got, why) = math_equal_explained(pred, reference, &cfg);
            if got != expected {
                failures.push(format!(
                    "line {}: `{pred}` vs `{reference}`: want {expected}, got {got} ({why})",
                    line_no + 1
                ));
            }
        }
    }
    let checks = 2 * total;
    println!(
        "answer pairs: {total} ({positives} equal, {negatives} not equal), {}/{checks} checks pass ({:.1}%)",
        checks - failures.len(),
        100.0 * (checks - failures.len()) as f64 / checks as f64
    );
    assert!(
        total >= 250,
        "the table should hold hundreds of pairs, has {total}"
    );
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn extraction_prefers_the_last_box() {
    let r = "First \\boxed{1}, then on reflection \\boxed{\\frac{1}{2}}.";
    assert_eq!(extract_answer(r).as_deref(), Some("\\frac{1}{2}"));
    assert_eq!(extract_answer("so \\fbox{42} it is").as_deref(), Some("42"));
    assert_eq!(
        extract_answer("\\boxed{\\{1, 2\\}}").as_deref(),
        Some("\\{1, 2\\}")
    );
    assert_eq!(
        extract_answer("\\boxed{\\frac{\\sqrt{3}}{\\left(2\\right)}}").as_deref(),
        Some("\\frac{\\sqrt{3}}{\\left(2\\right)}")
    );
    assert_eq!(extract_answer("hence $\\boxed 5$").as_deref(), Some("5"));
    // An unbalanced last box falls back to the previous balanced one.
    assert_eq!(
        extract_answer("\\boxed{7} and \\boxed{8").as_deref(),
        Some("7")
    );
}

#[test]
fn extraction_phrases_and_numbers() {
    assert_eq!(
        extract_answer("So the answer is 12.").as_deref(),
        Some("12")
    );
    assert_eq!(
        extract_answer("The final answer is $\\frac{3}{4}$. I hope it is correct.").as_deref(),
        Some("\\frac{3}{4}")
    );
    assert_eq!(
        extract_answer("Work.\n**Answer:** 3.5\n").as_deref(),
        Some("3.5")
    );
    assert_eq!(extract_answer("Answer: x = 2").as_deref(), Some("x = 2"));
    assert_eq!(
        extract_answer("We get 3 apples and then 1,250 pears").as_deref(),
        Some("1250")
    );
    assert_eq!(
        extract_answer("the ratio is -3/4 overall").as_deref(),
        Some("-3/4")
    );
    assert_eq!(extract_answer("value 2.75."), Some("2.75".to_string()));
    assert_eq!(extract_answer("no digits here"), None);
    assert_eq!(
        extract_answer("Final Answer: The largest $n$ is 34.").as_deref(),
        Some("34")
    );
    assert_eq!(
        extract_answer("Final Answer: Jane started 3 hours ago.").as_deref(),
        Some("3")
    );
    assert_eq!(
        extract_answer("The answer is \\frac{1}{2} because 2 halves").as_deref(),
        Some("\\frac{1}{2}")
    );
    assert_eq!(extract_answer("Answer: 10 dollars").as_deref(), Some("10"));
    assert_eq!(extract_answer("Answer: Monday").as_deref(), Some("Monday"));
    assert_eq!(
        extract_answer("Final Answer: so it is $x=\\frac{1}{2}$ here").as_deref(),
        Some("x=\\frac{1}{2}")
    );
}

#[test]
fn extraction_never_reads_the_reasoning() {
    let r = "<think>maybe \\boxed{3}, the answer is 3</think>The answer is \\boxed{4}.";
    assert_eq!(extract_answer(r).as_deref(), Some("4"));
    // Reasoning never closed: no answer at all, even though it holds a box and numbers.
    assert_eq!(extract_answer("<think>so \\boxed{3} and 17"), None);
    // Nothing after the reasoning.
    assert_eq!(extract_answer("<think>\\boxed{3}</think>   "), None);
    // Custom tags.
    let r = "<reason>\\boxed{1}</reason> final: 2";
    assert_eq!(
        extract_answer_with_tags(r, "<reason>", "</reason>").as_deref(),
        Some("2")
    );
}

#[test]
fn extraction_of_spans_bare_answers_box_runs_and_chat_tails() {
    // A bare answer is taken whole, not as its last number.
    assert_eq!(extract_answer("x \\geq 5").as_deref(), Some("x \\geq 5"));
    assert_eq!(extract_answer("(1, 2)").as_deref(), Some("(1, 2)"));
    assert_eq!(extract_answer("5 6").as_deref(), Some("6"));
    // The last math span, `$$` and `\(` included; spans parted by `or` / `and` are a list.
    assert_eq!(
        extract_answer("Answer \\( (9+1) \\)").as_deref(),
        Some("(9+1)")
    );
    assert_eq!(extract_answer("so $$y = 2$$").as_deref(), Some("y = 2"));
    assert_eq!(extract_answer("costs \\$5 and $7$").as_deref(), Some("7"));
    assert_eq!(
        extract_answer("Both work: $(4,9)$ or $(9,4)$.").as_deref(),
        Some("(4,9), (9,4)")
    );
    assert_eq!(
        extract_answer("Answer: $a=2$, $b=3$").as_deref(),
        Some("a=2, b=3")
    );
    // A run of boxes is several answers; a box after prose is the answer alone.
    assert_eq!(
        extract_answer("$x = \\boxed{3} \\quad\\text{and}\\quad x = \\boxed{-4}$").as_deref(),
        Some("3, -4")
    );
    assert_eq!(
        extract_answer("guess \\boxed{7}; on checking it is \\boxed{8}").as_deref(),
        Some("8")
    );
    assert_eq!(extract_answer("\\boxed{\\boxed{2}}").as_deref(), Some("2"));
    // Nothing after the next chat turn is read.
    let r = "So \\boxed{14}.<|im_end|>\n<|im_start|>user\nAnd 3+4?\\boxed{7}";
    assert_eq!(extract_answer(r).as_deref(), Some("14"));
    assert_eq!(
        extract_answer("Hence $k=9$.\n\nHuman: double it\n\nAssistant: $18$").as_deref(),
        Some("k=9")
    );
}

fn verify(response: &str, answer: &str) -> crate::verifiers::Verdict {
    let meta = serde_json::Value::Null;
    let input = VerifyInput {
        prompt: "q",
        response,
        answer,
        meta: &meta,
    };
    MathVerifier::default()
        .verify(&input)
        .expect("math verifier does not error")
}

#[test]
fn verifier_scores_and_explains() {
    let v = verify("<think>2+2</think>So $\\boxed{\\dfrac{8}{2}}$", "4");
    assert_eq!((v.score, v.format_ok), (1.0, true));
    assert_eq!(v.extracted.as_deref(), Some("\\dfrac{8}{2}"));
    let v = verify("<think>2+2</think>\\boxed{5}", "4");
    assert_eq!(v.score, 0.0);
    assert!(v.reason.contains("does not match"), "{}", v.reason);
    let v = verify("<think>\\boxed{4}", "4");
    assert_eq!((v.score, v.format_ok, v.extracted), (0.0, false, None));
    assert_eq!(MathVerifier::default().name(), "math");
}

#[test]
fn config_rejects_unknown_keys_and_fills_defaults() {
    let cfg: MathConfig =
        serde_json::from_str(r#"{"relative_tolerance": 0.01}"#).expect("valid config");
    assert_eq!(cfg.relative_tolerance, 0.01);
    assert_eq!(cfg.think_close, "</think>");
    assert!(serde_json::from_str::<MathConfig>(r#"{"relative_tolerence": 0.01}"#).is_err());
    // A looser tolerance is honoured.
    assert!(math_equal("3.14", "\\pi", &cfg));
    assert!(!math_equal("3.14", "\\pi", &MathConfig::default()));
}

#[test]
fn hostile_inputs_end_quickly_without_panic() {
    let cfg = MathConfig::default();
    let deep_parens = format!("{}1{}", "(".repeat(5000), ")".repeat(5000));
    let deep_braces = format!("\\boxed{{{}", "{".repeat(100_000));
    let deep_fracs = "\\frac{".repeat(3000);
    let huge = "9".repeat(1_000_000);
    let towers = "2^".repeat(500) + "2";
    let cases: Vec<String> = vec![
        deep_parens,
        deep_braces,
        deep_fracs,
        huge.clone(),
        towers,
        "1000000!".into(),
        "\\binom{100000000}{50000000}".into(),
        "10^{10^{10^{10}}}".into(),
        "\u{0}\u{1}\u{fffd}\u{202e}🙂\\".into(),
        "\\begin{pmatrix}".into(),
        "\\{".repeat(1000),
        "x=".repeat(1000),
        "<".repeat(1000),
        "\\pm".repeat(1000),
        ",".repeat(10_000),
        // Relations with many boundaries, long lists of them, big matrix products, many boxes.
        "\\sin(100x) > 0".into(),
        vec!["x^2 < 1"; 64].join(", "),
        format!("{}\\cup(0,1)", "(0,1)\\cup".repeat(500)),
        format!(
            "\\begin{{pmatrix}}{}\\end{{pmatrix}}",
            vec![["x+1"; 12].join("&"); 12].join("\\\\")
        )
        .repeat(6),
        "\\boxed{1}, ".repeat(5000),
        "$1$ or ".repeat(5000),
        "\\begin{vmatrix}".repeat(200),
    ];
    for case in &cases {
        let start = std::time::Instant::now();
        let _ = math_equal(case, "1", &cfg);
        let _ = math_equal(case, "(-1,1)\\cup(2,3)", &cfg);
        let _ = math_equal(case, case, &cfg);
        let _ = extract_answer(case);
        let _ = verify(case, case);
        assert!(
            start.elapsed().as_secs_f64() < 2.0,
            "slow on input starting {:?}",
            &case[..case.len().min(40)]
        );
    }
    // Lists of relations that are equal item by item but not as text: every pair of items is a
    // set comparison, which a per-pair budget bounds.
    let squares = |shift: usize| {
        (1..=32)
            .map(|k| format!("x^2<{}", (k + shift) % 32 + 1))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let sines = |shift: usize| {
        (1..=32)
            .map(|k| format!("\\sin({}x)>0", (k + shift) % 32 + 1))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for (a, b) in [(squares(0), squares(7)), (sines(0), sines(5))] {
        let start = std::time::Instant::now();
        let _ = math_equal(&a, &b, &cfg);
        assert!(
            start.elapsed().as_secs_f64() < 2.0,
            "slow on the pair starting {:?}",
            &a[..40]
        );
    }
    // A huge response is searched in linear time.
    let response = format!(
        "<think>{huge}</think>{}\\boxed{{3}}",
        "x ".repeat(1_000_000)
    );
    assert_eq!(verify(&response, "3").score, 1.0);
}

/// One line of `testdata/grader_kinds.jsonl`.
#[derive(serde::Deserialize)]
struct GraderCase {
    kind: String,
    response: String,
    answer: String,
    expected: u8,
}

/// The grader-kind cases through the whole verifier (extraction + equivalence), as `r1v2 verify`
/// scores them; outside the `prose` kind also with response and reference swapped. Agreement
/// must be at least 97% and no wrong answer may pass.
#[test]
fn grader_kind_cases_agree_without_false_passes() {
    use std::collections::BTreeMap;
    let mut per_kind: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    let (mut checks, mut agreed) = (0usize, 0usize);
    let (mut false_passes, mut misses) = (Vec::new(), Vec::new());
    let cases: Vec<(usize, GraderCase)> = GRADER_KINDS
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let case = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("grader_kinds.jsonl line {}: {e}", i + 1));
            (i + 1, case)
        })
        .collect();
    for (line, case) in &cases {
        let expected = match case.expected {
            0 => false,
            1 => true,
            other => panic!("grader_kinds.jsonl line {line}: expected is {other}, want 0 or 1"),
        };
        let mut directions = vec![(case.response.as_str(), case.answer.as_str())];
        if case.kind != "prose" {
            directions.push((case.answer.as_str(), case.response.as_str()));
        }
        for (response, answer) in directions {
            let verdict = verify(response, answer);
            let got = verdict.score == 1.0;
            checks += 1;
            let tally = per_kind.entry(case.kind.as_str()).or_default();
            tally.1 += 1;
            if got == expected {
                agreed += 1;
                tally.0 += 1;
                continue;
            }
            let note = format!(
                "line {line} [{}]: `{response}` vs `{answer}`: want {expected} ({})",
                case.kind, verdict.reason
            );
            if got {
                false_passes.push(note);
            } else {
                misses.push(note);
            }
        }
    }
    for (kind, (ok, total)) in &per_kind {
        println!("grader kinds: {kind:<10} {ok}/{total}");
    }
    let rate = 100.0 * agreed as f64 / checks as f64;
    println!(
        "grader kinds: {} cases, {agreed}/{checks} checks agree ({rate:.1}%), {} false passes, {} misses",
        cases.len(),
        false_passes.len(),
        misses.len()
    );
    for note in &misses {
        println!("miss: {note}");
    }
    assert!(cases.len() >= 100, "want 100+ cases, have {}", cases.len());
    assert!(
        false_passes.is_empty(),
        "wrong answers scored 1:\n{}",
        false_passes.join("\n")
    );
    assert!(
        rate >= 97.0,
        "agreement {rate:.1}% < 97%:\n{}",
        misses.join("\n")
    );
}
