//! Test cases for the code verifier, read from a dataset line's answer or metadata.
//!
//! Accepted layouts (each may also arrive as a JSON string holding the JSON):
//! - APPS / TACO `input_output`: `{"inputs": [...], "outputs": [...]}` (stdin/stdout), or with
//!   `"fn_name": "f"` the function-call form, where `inputs[i]` is the argument list and `outputs[i]` the
//!   return value (TACO often wraps it in a one-element list; both are accepted when comparing).
//! - LiveCodeBench: a list of `{"input": "...", "output": "...", "testtype": "stdin" | "functional"}`;
//!   functional inputs hold one JSON argument per line, and `fn_name` comes from the metadata.
//! - Where to look: the answer, else `meta.tests`, `meta.input_output`, `meta.test_cases`,
//!   `meta.public_test_cases` (the first present); `meta.fn_name` applies to any of them.

use serde_json::Value;

/// One test case.
#[derive(Debug, Clone, PartialEq)]
pub enum TestCase {
    /// Feed `input` on stdin, compare stdout with `output` token by token.
    Stdio { input: String, output: String },
    /// Call `fn_name(*args)` (or `Solution().fn_name(*args)`) and compare the return value with `expected`.
    Call {
        fn_name: String,
        args: Vec<Value>,
        expected: Value,
    },
}

/// Read the test cases from the answer or the metadata. `Err` says why none were found.
pub fn parse_test_cases(answer: &str, meta: &Value) -> Result<Vec<TestCase>, String> {
    let meta_fn_name = meta.get("fn_name").and_then(Value::as_str);
    let from_answer = serde_json::from_str::<Value>(answer.trim()).ok();
    let candidates = from_answer.into_iter().chain(
        ["tests", "input_output", "test_cases", "public_test_cases"]
            .iter()
            .filter_map(|key| meta.get(*key).cloned()),
    );
    let mut last_error =
        "no test cases in the answer or in meta.tests / meta.input_output".to_string();
    for candidate in candidates {
        match cases_from_value(&unwrap_json_string(candidate), meta_fn_name) {
            Ok(cases) if !cases.is_empty() => return Ok(cases),
            Ok(_) => last_error = "the test case list is empty".into(),
            Err(error) => last_error = error,
        }
    }
    Err(last_error)
}

/// A JSON string that itself holds JSON (APPS stores `input_output` that way) becomes that JSON.
fn unwrap_json_string(value: Value) -> Value {
    match &value {
        Value::String(text) => serde_json::from_str(text).unwrap_or(value),
        _ => value,
    }
}

fn cases_from_value(value: &Value, meta_fn_name: Option<&str>) -> Result<Vec<TestCase>, String> {
    match value {
        Value::Object(map) if map.contains_key("inputs") => {
            let inputs = map["inputs"].as_array().ok_or("`inputs` is not a list")?;
            let outputs = map
                .get("outputs")
                .and_then(Value::as_array)
                .ok_or("`outputs` is missing or not a list")?;
            if inputs.len() != outputs.len() {
                return Err(format!(
                    "{} inputs but {} outputs",
                    inputs.len(),
                    outputs.len()
                ));
            }
            let fn_name = map.get("fn_name").and_then(Value::as_str).or(meta_fn_name);
            inputs
                .iter()
                .zip(outputs)
                .map(|(input, output)| match fn_name {
                    Some(name) => Ok(TestCase::Call {
                        fn_name: name.to_string(),
                        args: match input {
                            Value::Array(args) => args.clone(),
                            single => vec![single.clone()],
                        },
                        expected: output.clone(),
                    }),
                    None => Ok(TestCase::Stdio {
                        input: text_of(input)?,
                        output: text_of(output)?,
                    }),
                })
                .collect()
        }
        Value::Array(items) => items
            .iter()
            .map(|item| case_from_item(item, meta_fn_name))
            .collect(),
        _ => Err(
            "test cases must be {\"inputs\", \"outputs\"} or a list of {\"input\", \"output\"}"
                .into(),
        ),
    }
}

/// A LiveCodeBench-style `{"input", "output", "testtype"?}` item.
fn case_from_item(item: &Value, meta_fn_name: Option<&str>) -> Result<TestCase, String> {
    let input = item.get("input").ok_or("a test case has no `input`")?;
    let output = item.get("output").ok_or("a test case has no `output`")?;
    let functional = item.get("testtype").and_then(Value::as_str) == Some("functional");
    if functional {
        let fn_name = meta_fn_name.ok_or("a functional test case needs `fn_name` in meta")?;
        let args = match input {
            Value::String(lines) => lines
                .lines()
                .filter(|line| !line.trim().is_empty())
                .map(|line| {
                    serde_json::from_str(line).map_err(|e| format!("argument `{line}`: {e}"))
                })
                .collect::<Result<Vec<_>, _>>()?,
            Value::Array(args) => args.clone(),
            single => vec![single.clone()],
        };
        let expected = match output {
            Value::String(text) => serde_json::from_str(text).unwrap_or_else(|_| output.clone()),
            other => other.clone(),
        };
        Ok(TestCase::Call {
            fn_name: fn_name.to_string(),
            args,
            expected,
        })
    } else {
        Ok(TestCase::Stdio {
            input: text_of(input)?,
            output: text_of(output)?,
        })
    }
}

/// Stdin/stdout text: a string as is, a list of lines joined (TACO sometimes splits them).
fn text_of(value: &Value) -> Result<String, String> {
    match value {
        Value::String(text) => Ok(text.clone()),
        Value::Array(lines) => lines
            .iter()
            .map(text_of)
            .collect::<Result<Vec<_>, _>>()
            .map(|l| l.join("\n")),
        Value::Number(number) => Ok(number.to_string()),
        other => Err(format!("a stdin/stdout test holds {other}, not text")),
    }
}

/// Whether program output matches the expected output: the same whitespace-separated tokens line by line
/// (trailing blanks and blank lines ignored), numbers equal within 1e-6 relative or absolute.
pub fn stdout_matches(actual: &str, expected: &str) -> bool {
    let lines = |text: &str| -> Vec<Vec<String>> {
        text.lines()
            .map(|line| {
                line.split_whitespace()
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .filter(|tokens| !tokens.is_empty())
            .collect()
    };
    let (actual, expected) = (lines(actual), lines(expected));
    actual.len() == expected.len()
        && actual.iter().zip(&expected).all(|(a, e)| {
            a.len() == e.len() && a.iter().zip(e).all(|(a, e)| a == e || numbers_close(a, e))
        })
}

fn numbers_close(actual: &str, expected: &str) -> bool {
    match (actual.parse::<f64>(), expected.parse::<f64>()) {
        (Ok(a), Ok(e)) if a.is_finite() && e.is_finite() => {
            (a - e).abs() <= 1e-6 * e.abs().max(1.0)
        }
        _ => false,
    }
}

/// Whether a function's JSON return value matches the expected one (TACO's one-element wrapping accepted).
pub fn value_matches(actual: &Value, expected: &Value) -> bool {
    json_equal(actual, expected)
        || matches!(expected, Value::Array(items) if items.len() == 1 && json_equal(actual, &items[0]))
}

fn json_equal(actual: &Value, expected: &Value) -> bool {
    match (actual, expected) {
        (Value::Number(a), Value::Number(e)) => match (a.as_f64(), e.as_f64()) {
            (Some(a), Some(e)) => (a - e).abs() <= 1e-6 * e.abs().max(1.0),
            _ => a == e,
        },
        (Value::Array(a), Value::Array(e)) => {
            a.len() == e.len() && a.iter().zip(e).all(|(a, e)| json_equal(a, e))
        }
        (Value::Object(a), Value::Object(e)) => {
            a.len() == e.len()
                && a.iter()
                    .all(|(key, a)| e.get(key).is_some_and(|e| json_equal(a, e)))
        }
        _ => actual == expected,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn apps_stdio_and_taco_call_forms_parse() {
        let apps = json!({"inputs": ["1 2\n"], "outputs": ["3\n"]}).to_string();
        let cases = parse_test_cases(&apps, &Value::Null).unwrap();
        assert_eq!(
            cases,
            vec![TestCase::Stdio {
                input: "1 2\n".into(),
                output: "3\n".into()
            }]
        );

        let meta = json!({"input_output": json!({"fn_name": "add", "inputs": [[1, 2]], "outputs": [[3]]}).to_string()});
        let cases = parse_test_cases("", &meta).unwrap();
        assert_eq!(
            cases,
            vec![TestCase::Call {
                fn_name: "add".into(),
                args: vec![json!(1), json!(2)],
                expected: json!([3])
            }]
        );
    }

    #[test]
    fn livecodebench_functional_form_parses() {
        let tests = json!([{"input": "[1, 2]\n3", "output": "6", "testtype": "functional"}]);
        let meta = json!({"fn_name": "total", "public_test_cases": tests.to_string()});
        let cases = parse_test_cases("see tests", &meta).unwrap();
        assert_eq!(
            cases,
            vec![TestCase::Call {
                fn_name: "total".into(),
                args: vec![json!([1, 2]), json!(3)],
                expected: json!(6)
            }]
        );
    }

    #[test]
    fn missing_or_malformed_tests_say_why() {
        assert!(parse_test_cases("42", &Value::Null)
            .unwrap_err()
            .contains("test cases"));
        let bad = json!({"inputs": ["1"], "outputs": []}).to_string();
        assert!(parse_test_cases(&bad, &Value::Null)
            .unwrap_err()
            .contains("1 inputs but 0 outputs"));
    }

    #[test]
    fn output_comparison_is_token_wise_and_numeric() {
        assert!(stdout_matches("3  4 \n\n", "3 4"));
        assert!(stdout_matches("0.3333333", "0.33333331"));
        assert!(!stdout_matches("3 4", "3\n4"));
        assert!(!stdout_matches("34", "3 4"));
        assert!(value_matches(&json!(3), &json!([3])));
        assert!(value_matches(&json!([1, 2]), &json!([1, 2])));
        assert!(!value_matches(&json!([1, 2]), &json!([2, 1])));
    }
}
