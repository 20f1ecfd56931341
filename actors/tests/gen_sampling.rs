//! The logits processors and the sampler against transformers' reference numbers
//! (tests/fixtures/gen_sampling.py), plus statistical checks of the draws.

use r1v2_actors::generate::processors::{process_logits, sample_next, Scratch, SeenTokens};
use r1v2_actors::generate::{RowRng, SamplingParams};
use serde_json::Value;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/fixtures/sampling/cases.json"
);

/// One reference case: parameters and, per row, the logits, context and expected numbers.
struct Case {
    name: String,
    params: SamplingParams,
    logits: Vec<Vec<f32>>,
    context: Vec<Vec<u32>>,
    /// `None` where transformers' processors set `-inf`.
    processed_logprobs: Vec<Vec<Option<f64>>>,
    policy_logprobs: Vec<Vec<f64>>,
    tempered_logprobs: Vec<Vec<f64>>,
    greedy_ids: Vec<u32>,
}

fn matrix<T>(value: &Value, cell: impl Fn(&Value) -> T) -> Vec<Vec<T>> {
    let rows = value
        .as_array()
        .expect("fixture: a matrix is an array of rows");
    rows.iter()
        .map(|row| {
            row.as_array()
                .expect("fixture: a row is an array")
                .iter()
                .map(&cell)
                .collect()
        })
        .collect()
}

fn load_cases() -> Vec<Case> {
    let text =
        std::fs::read_to_string(FIXTURE).expect("fixture file (run make_fixtures.py sampling)");
    let root: Value = serde_json::from_str(&text).expect("fixture json");
    let number = |v: &Value| v.as_f64().expect("fixture: a number");
    root["cases"]
        .as_array()
        .expect("fixture: cases")
        .iter()
        .map(|case| {
            let p = &case["params"];
            let params = SamplingParams {
                temperature: number(&p["temperature"]),
                top_p: number(&p["top_p"]),
                top_k: p["top_k"].as_u64().expect("fixture: top_k") as usize,
                min_p: number(&p["min_p"]),
                repetition_penalty: number(&p["repetition_penalty"]),
                ..SamplingParams::default()
            };
            params.validate().expect("fixture parameters are valid");
            Case {
                name: case["name"].as_str().expect("fixture: name").to_string(),
                params,
                logits: matrix(&case["logits"], |v| number(v) as f32),
                context: matrix(&case["context"], |v| {
                    v.as_u64().expect("fixture: id") as u32
                }),
                processed_logprobs: matrix(&case["processed_logprobs"], Value::as_f64),
                policy_logprobs: matrix(&case["policy_logprobs"], number),
                tempered_logprobs: matrix(&case["tempered_logprobs"], number),
                greedy_ids: case["greedy_ids"]
                    .as_array()
                    .expect("fixture: greedy_ids")
                    .iter()
                    .map(|v| v.as_u64().expect("fixture: id") as u32)
                    .collect(),
            }
        })
        .collect()
}

fn log_softmax(scores: &[f32]) -> Vec<f64> {
    let max = scores
        .iter()
        .fold(f64::NEG_INFINITY, |m, &s| m.max(s as f64));
    let lse = max
        + scores
            .iter()
            .map(|&s| (s as f64 - max).exp())
            .sum::<f64>()
            .ln();
    scores.iter().map(|&s| s as f64 - lse).collect()
}

#[test]
fn processed_logprobs_match_transformers() {
    let cases = load_cases();
    assert_eq!(cases.len(), 10);
    let mut scratch = Scratch::default();
    for case in cases.iter().filter(|c| !c.params.is_greedy()) {
        for (row, logits) in case.logits.iter().enumerate() {
            let seen = SeenTokens::new(logits.len(), &case.context[row]);
            let mut scores = logits.clone();
            process_logits(&case.params, &seen, &mut scores, &mut scratch);
            let ours = log_softmax(&scores);
            for (token, expected) in case.processed_logprobs[row].iter().enumerate() {
                match expected {
                    None => assert!(
                        ours[token] == f64::NEG_INFINITY,
                        "{} row {row} token {token}: transformers removed it, we kept {}",
                        case.name,
                        ours[token]
                    ),
                    Some(expected) => assert!(
                        (ours[token] - expected).abs() < 1e-5,
                        "{} row {row} token {token}: {} vs transformers {expected}",
                        case.name,
                        ours[token]
                    ),
                }
            }
        }
    }
}

#[test]
fn sampled_token_logprobs_match_transformers_and_greedy_is_argmax() {
    let mut scratch = Scratch::default();
    for case in load_cases() {
        for (row, logits) in case.logits.iter().enumerate() {
            let seen = SeenTokens::new(logits.len(), &case.context[row]);
            for sample in 0..8 {
                let mut rng = RowRng::new(11, row as u64, sample);
                let token =
                    sample_next(&case.params, logits, &seen, &mut rng, &mut scratch).unwrap();
                let id = token.token_id as usize;
                let lp = token.logprobs;
                let close = |a: f32, b: f64| (a as f64 - b).abs() < 1e-5;
                assert!(
                    close(lp.policy, case.policy_logprobs[row][id]),
                    "{} policy",
                    case.name
                );
                assert!(
                    close(lp.tempered, case.tempered_logprobs[row][id]),
                    "{} tempered",
                    case.name
                );
                if case.params.is_greedy() {
                    assert_eq!(
                        token.token_id, case.greedy_ids[row],
                        "{} row {row}",
                        case.name
                    );
                    assert_eq!(lp.processed, 0.0);
                } else {
                    let expected = case.processed_logprobs[row][id].unwrap_or_else(|| {
                        panic!(
                            "{}: sampled token {id} that transformers removed",
                            case.name
                        )
                    });
                    assert!(close(lp.processed, expected), "{} processed", case.name);
                }
            }
        }
    }
}

/// Draws `draws` tokens (one per sample index) and checks every token's frequency against its processed
/// probability within 5 standard errors; removed tokens must never appear.
fn check_frequencies(case: &Case, row: usize, draws: u64) {
    let logits = &case.logits[row];
    let seen = SeenTokens::new(logits.len(), &case.context[row]);
    let mut counts = vec![0u64; logits.len()];
    let mut scratch = Scratch::default();
    for sample in 0..draws {
        let mut rng = RowRng::new(5, row as u64, sample);
        let token = sample_next(&case.params, logits, &seen, &mut rng, &mut scratch).unwrap();
        counts[token.token_id as usize] += 1;
    }
    for (token, &count) in counts.iter().enumerate() {
        let freq = count as f64 / draws as f64;
        match case.processed_logprobs[row][token] {
            None => assert_eq!(
                count, 0,
                "{} row {row}: removed token {token} was drawn",
                case.name
            ),
            Some(lp) => {
                let p = lp.exp();
                let standard_error = (p * (1.0 - p) / draws as f64).sqrt();
                assert!(
                    (freq - p).abs() <= 5.0 * standard_error + 1e-12,
                    "{} row {row} token {token}: frequency {freq} vs probability {p}",
                    case.name
                );
            }
        }
    }
}

#[test]
fn draws_follow_the_processed_distribution() {
    let cases = load_cases();
    // Plain softmax with the penalty, top-p, min-p, and everything combined.
    for name in ["case1", "case4", "case6", "case7"] {
        let case = cases.iter().find(|c| c.name == name).unwrap(); // the fixture holds case0..case9
        check_frequencies(case, 0, 8_000);
    }
}

#[test]
fn same_stream_same_tokens_different_streams_differ() {
    let cases = load_cases();
    let case = &cases[0];
    let logits = &case.logits[0];
    let seen = SeenTokens::new(logits.len(), &[]);
    let run = |sample: u64| {
        let mut rng = RowRng::new(3, 0, sample);
        let mut scratch = Scratch::default();
        (0..32)
            .map(|_| {
                sample_next(&case.params, logits, &seen, &mut rng, &mut scratch)
                    .unwrap()
                    .token_id
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(run(0), run(0));
    assert_ne!(run(0), run(1));
}

#[test]
fn non_finite_logits_are_an_error() {
    let mut logits = vec![0.5f32; 10];
    logits[3] = f32::NAN;
    let seen = SeenTokens::new(10, &[]);
    let err = sample_next(
        &SamplingParams::default(),
        &logits,
        &seen,
        &mut RowRng::new(0, 0, 0),
        &mut Scratch::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("index 3"), "{err}");
}
