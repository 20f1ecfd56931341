//! Fuzz / property run for the math, choice and format verifiers (not part of `cargo test`).
//!
//! Generates adversarial answers (random LaTeX token soup, deep nesting, mutated entries of the
//! answer-pair table, unicode and binary junk, huge numbers and towers) and feeds each to
//! `math_equal` and `extract_answer` (every 16th also to the three verifiers). Checks: no panic,
//! every input within a per-input CPU-time bound; reports how often `math_equal` is asymmetric
//! (sampled on every 8th input).
//!
//! Run: `cargo run -p r1v2-actors --example fuzz_math -- [INPUTS] [SEED]` (default 1,000,000, 1);
//! inputs are spread over all cores, each thread with its own seed. On a loaded machine add
//! `--config 'profile.dev.package.r1v2-actors.opt-level=2'`: still the dev profile (debug
//! assertions and overflow checks on), about 8x faster.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use r1v2_actors::verifiers::choice::ChoiceVerifier;
use r1v2_actors::verifiers::format::FormatVerifier;
use r1v2_actors::verifiers::math::{extract_answer, math_equal, MathConfig, MathVerifier};
use r1v2_actors::verifiers::{Verifier, VerifyInput};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Most CPU time one input may take (all calls on it together) before the run fails. CPU time,
/// not wall time, so a loaded machine does not fail the run; wall time where Linux's
/// `/proc/thread-self/schedstat` is missing.
const PER_INPUT_BOUND: Duration = Duration::from_millis(500);

/// CPU time this thread has used (Linux schedstat, nanoseconds), if the kernel reports it.
fn thread_cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let nanos: u64 = stat.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(nanos))
}

const PAIRS: &str = include_str!("../src/verifiers/math/testdata/pairs.tsv");

/// The pieces random answers are built from.
const PIECES: &[&str] = &[
    "0",
    "1",
    "2",
    "3",
    "7",
    "9",
    "10",
    "0.5",
    ".25",
    "1e5",
    "2E-3",
    "99999999999999999999",
    "x",
    "y",
    "n",
    "a",
    "b",
    "e",
    "i",
    "A",
    "B",
    "\\pi",
    "\\infty",
    "\\alpha",
    "\\theta_1",
    "\\frac",
    "\\dfrac",
    "\\tfrac",
    "\\sqrt",
    "\\sqrt[3]",
    "\\binom",
    "\\sin",
    "\\cos^2",
    "\\log_",
    "\\ln",
    "\\exp",
    "\\left(",
    "\\right)",
    "\\left|",
    "\\right|",
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
    "\\{",
    "\\}",
    "^",
    "_",
    "!",
    "+",
    "-",
    "*",
    "/",
    "\\cdot",
    "\\times",
    "\\div",
    ",",
    "=",
    "<",
    "\\le",
    ">",
    "\\geq",
    "\\pm",
    "\\cup",
    "\\in",
    "%",
    "\\%",
    "$",
    "\\$",
    "\\text{",
    "\\mathrm{",
    " cm",
    " inches",
    " ",
    "\\,",
    "\\!",
    "\\boxed{",
    "\\fbox{",
    "<think>",
    "</think>",
    "answer is ",
    "Answer: ",
    "&",
    "\\\\",
    "\\begin{pmatrix}",
    "\\end{pmatrix}",
    ".",
    "^{999}",
    "^{-999}",
    "|",
    "'",
    "\\",
    "°",
    "^\\circ",
    "é",
    "∞",
    "π",
    "√",
    "😀",
    "\u{202e}",
    "\u{0}",
    "\u{fffd}",
    "\n",
    "\t",
    "**",
    "\\emptyset",
    "\\varnothing",
    "1,000",
    "{,}",
    // Issue 14's kinds: relations, matrix forms, separators, several answers, labels, prose.
    "\\ne",
    "!=",
    "\\lt",
    "\\mid",
    "\\begin{bmatrix}",
    "\\end{bmatrix}",
    "\\begin{vmatrix}",
    "\\end{vmatrix}",
    "\\begin{array}{cc}",
    "\\end{array}",
    ",\\!",
    ";",
    " or ",
    " and ",
    "\\quad\\text{and}\\quad",
    ":",
    "AB=",
    "(p,q)=",
    "$$",
    "\\(",
    "\\)",
    "<|im_end|>",
    "\nUser:",
];

/// Pieces that nest when repeated.
const NESTERS: &[&str] = &[
    "(", "{", "\\frac{", "\\sqrt{", "\\boxed{", "[", "\\{", "|", "-", "^", "\\left(", "2^", "!",
];

fn random_answer(rng: &mut ChaCha8Rng, table: &[&str]) -> String {
    match rng.gen_range(0..10) {
        // Token soup.
        0..=3 => (0..rng.gen_range(1..40))
            .map(|_| PIECES[rng.gen_range(0..PIECES.len())])
            .collect(),
        // Deep nesting, balanced or not.
        4 => {
            let piece = NESTERS[rng.gen_range(0..NESTERS.len())];
            let depth = rng.gen_range(1..700);
            let mut s = piece.repeat(depth) + PIECES[rng.gen_range(0..PIECES.len())];
            if rng.gen_bool(0.5) {
                s += &"}".repeat(rng.gen_range(0..depth));
                s += &")".repeat(rng.gen_range(0..depth));
            }
            s
        }
        // A table entry with a few mutations.
        5..=7 => {
            let mut chars: Vec<String> = table[rng.gen_range(0..table.len())]
                .chars()
                .map(String::from)
                .collect();
            for _ in 0..rng.gen_range(1..4) {
                let at = rng.gen_range(0..=chars.len());
                match rng.gen_range(0..3) {
                    0 if at < chars.len() => {
                        chars.remove(at);
                    }
                    1 if at < chars.len() => {
                        chars[at] = PIECES[rng.gen_range(0..PIECES.len())].into()
                    }
                    _ => chars.insert(at, PIECES[rng.gen_range(0..PIECES.len())].into()),
                }
            }
            chars.concat()
        }
        // Binary junk.
        8 => {
            let bytes: Vec<u8> = (0..rng.gen_range(0..200)).map(|_| rng.gen()).collect();
            String::from_utf8_lossy(&bytes).into_owned()
        }
        // Huge numbers, towers and factorials.
        _ => match rng.gen_range(0..4) {
            0 => "9".repeat(rng.gen_range(1..2500)),
            1 => "2^".repeat(rng.gen_range(1..500)) + "2",
            2 => format!("{}!", rng.gen_range(0..u32::MAX)),
            _ => format!(
                "\\binom{{{}}}{{{}}}",
                rng.gen_range(0..u64::MAX),
                rng.gen_range(0..u64::MAX)
            ),
        },
    }
}

/// What one worker thread saw.
#[derive(Default)]
struct Tally {
    inputs: usize,
    bytes: usize,
    judged_equal: usize,
    asymmetric: usize,
    slowest: Duration,
    slowest_input: String,
    slowest_wall: Duration,
}

/// Run `inputs` random inputs from `seed`; exits the process on a panic or a too-slow input.
fn run_worker(inputs: usize, seed: u64, table: &[&str]) -> Tally {
    let cfg = MathConfig::default();
    let (math, choice, format) = (
        MathVerifier::default(),
        ChoiceVerifier::default(),
        FormatVerifier::default(),
    );
    let meta = serde_json::json!({"options": ["1", "x+1", "\\frac{1}{2}", "Paris"]});
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut tally = Tally::default();
    for n in 0..inputs {
        let a = random_answer(&mut rng, table);
        let b = if rng.gen_bool(0.5) {
            table[rng.gen_range(0..table.len())].to_string()
        } else {
            random_answer(&mut rng, table)
        };
        let (t0, cpu0) = (Instant::now(), thread_cpu_time());
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let ab = math_equal(&a, &b, &cfg);
            // Symmetry is sampled on every 8th input, the full verifiers on every 16th.
            let ba = if n % 8 == 0 {
                math_equal(&b, &a, &cfg)
            } else {
                ab
            };
            let _ = extract_answer(&a);
            if n % 16 == 0 {
                let response = format!("<think>{b}</think>{a}");
                let input = VerifyInput {
                    prompt: "q",
                    response: &response,
                    answer: &b,
                    meta: &meta,
                };
                let _ = math.verify(&input);
                let _ = choice.verify(&input);
                let _ = format.verify(&input);
            }
            (ab, ba)
        }));
        let wall = t0.elapsed();
        let elapsed = match (cpu0, thread_cpu_time()) {
            (Some(before), Some(after)) => after.saturating_sub(before),
            _ => wall,
        };
        tally.slowest_wall = tally.slowest_wall.max(wall);
        let Ok((ab, ba)) = outcome else {
            eprintln!("PANIC on input #{n} of seed {seed}: a = {a:?}, b = {b:?}");
            std::process::exit(1);
        };
        if elapsed > PER_INPUT_BOUND {
            eprintln!("TOO SLOW ({elapsed:?} > {PER_INPUT_BOUND:?}) on input #{n} of seed {seed}: a = {a:?}, b = {b:?}");
            std::process::exit(1);
        }
        tally.inputs += 1;
        if tally.inputs % 100_000 == 0 {
            eprintln!(
                "seed {seed}: {} inputs, slowest so far {:?} CPU",
                tally.inputs, tally.slowest
            );
        }
        tally.bytes += a.len();
        tally.judged_equal += usize::from(ab);
        tally.asymmetric += usize::from(ab != ba);
        if elapsed > tally.slowest {
            tally.slowest = elapsed;
            tally.slowest_input = a.chars().take(100).collect();
        }
    }
    tally
}

fn main() {
    let mut args = std::env::args().skip(1);
    let inputs: usize = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let seed: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let table: Vec<&'static str> = PAIRS
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .flat_map(|l| l.split('\t').skip(1))
        .collect();
    let started = Instant::now();
    let tallies: Vec<Tally> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let share = inputs / threads + usize::from(t < inputs % threads);
                let table = &table;
                scope.spawn(move || run_worker(share, seed * 1000 + t as u64, table))
            })
            .collect();
        // A worker never panics: it catches panics of the code under test and exits instead.
        handles
            .into_iter()
            .map(|h| h.join().expect("worker thread"))
            .collect()
    });
    let total = started.elapsed();
    let sum = |f: fn(&Tally) -> usize| tallies.iter().map(f).sum::<usize>();
    let slowest = tallies
        .iter()
        .max_by_key(|t| t.slowest)
        .map(|t| (t.slowest, t.slowest_input.clone()));
    let (slowest, slowest_input) = slowest.unwrap_or_default();
    println!(
        "inputs            {} ({threads} threads, seed {seed})",
        sum(|t| t.inputs)
    );
    println!("input bytes       {}", sum(|t| t.bytes));
    println!("wall time         {:.1} s", total.as_secs_f64());
    let slowest_wall = tallies
        .iter()
        .map(|t| t.slowest_wall)
        .max()
        .unwrap_or_default();
    println!("slowest input     {slowest:?} CPU (bound {PER_INPUT_BOUND:?}): {slowest_input:?}");
    println!("slowest wall time {slowest_wall:?} (includes waiting for a loaded CPU)");
    println!("panics            0 (a panic exits with status 1)");
    println!("judged equal      {}", sum(|t| t.judged_equal));
    println!("asymmetric pairs  {}", sum(|t| t.asymmetric));
}
