//! Mathematical equivalence of two final answers.
//!
//! Structure first, as Qwen2.5-Math's `math_equal` and math-verify do: matrices (elementwise),
//! tuples and intervals (ordered; bracket kinds must match, so `[1,2)` is not `[1,2]`), sets and
//! bare comma lists (order-free, like math-verify's `FiniteSet`), unions of intervals, inequalities
//! (turned into intervals), equations (`x = 3` matches `3`; two equations match when one is a
//! multiple of the other), `\pm` (two answers). Then scalars: integers exactly, other numbers
//! within a relative tolerance, percentages as `p` or `p/100` (Qwen's `include_percentage`), and
//! symbolic expressions by evaluation at random points.

use super::eval::{close, equal_at_random_points, eval, mentions_infinity, variables};
use super::expr::{parse, Expr};
use super::extract::{extract_answer_with_tags, last_boxed};
use super::normalize::{normalize_answer, Normalized};
use super::MathConfig;

/// Deepest structural nesting compared (tuples of tuples of ...).
const MAX_NESTING: usize = 8;
/// Most elements compared in one tuple / set / list / matrix.
const MAX_ELEMENTS: usize = 64;

/// Whether the predicted answer `pred` is mathematically equal to `reference`.
pub fn math_equal(pred: &str, reference: &str, cfg: &MathConfig) -> bool {
    math_equal_explained(pred, reference, cfg).0
}

/// [`math_equal`], with a human-readable reason.
pub fn math_equal_explained(pred: &str, reference: &str, cfg: &MathConfig) -> (bool, String) {
    if pred.len() > cfg.max_answer_bytes || reference.len() > cfg.max_answer_bytes {
        return (
            false,
            format!("answer longer than {} bytes", cfg.max_answer_bytes),
        );
    }
    let np = normalize_answer(&answer_part(pred));
    let nr = normalize_answer(&answer_part(reference));
    let squashed = |s: &str| s.replace(' ', "");
    let equal = pred.trim() == reference.trim()
        || (squashed(&np.text) == squashed(&nr.text) && !np.text.is_empty())
        || (!np.text.is_empty() && !nr.text.is_empty() && values_equal(&np, &nr, cfg));
    let verb = if equal { "matches" } else { "does not match" };
    let reason = format!("`{}` {verb} reference `{}`", clip(&np.text), clip(&nr.text));
    (equal, reason)
}

/// The answer inside `s` when `s` is a whole solution rather than an answer: its last box, or
/// (for prose of more than a few words) what [`extract_answer`] finds. Short answers pass as is.
fn answer_part(s: &str) -> String {
    if s.contains("\\boxed") || s.contains("\\fbox") {
        if let Some(boxed) = last_boxed(s) {
            return boxed;
        }
    }
    let words = s
        .split_whitespace()
        .map(|w| w.trim_matches(|c: char| !c.is_alphanumeric()))
        .filter(|w| w.len() > 2 && w.chars().all(char::is_alphabetic))
        .take(5)
        .count();
    if words >= 5 {
        if let Some(answer) = extract_answer_with_tags(s, "", "") {
            return answer;
        }
    }
    s.to_string()
}

/// At most 80 characters of `s`, for reasons.
fn clip(s: &str) -> String {
    match s.char_indices().nth(80) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

fn values_equal(p: &Normalized, r: &Normalized, cfg: &MathConfig) -> bool {
    let percent_side = cfg.percent_equivalence.then_some((p.percent, r.percent));
    Comparer { cfg, percent_side }.equal(&p.text, &r.text, 0)
}

/// The shape of an answer, found from its top-level separators and brackets.
#[derive(Debug)]
enum Shape {
    Matrix(Vec<Vec<String>>),
    /// `(a, b)` / `[a, b)` ...: opening bracket, items, closing bracket.
    Bracketed(char, Vec<String>, char),
    /// `\{a, b\}`, or a bare `a, b`: order does not matter.
    Unordered(Vec<String>),
    Union(Vec<String>),
    Relation(Vec<String>, Vec<Rel>),
    Equation(String, String),
    Scalar(String),
}

/// An order relation in an inequality chain.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Rel {
    Less,
    LessEq,
    Greater,
    GreaterEq,
}

struct Comparer<'a> {
    cfg: &'a MathConfig,
    /// Which sides carried a `%`, when percent equivalence is on.
    percent_side: Option<(bool, bool)>,
}

impl Comparer<'_> {
    fn equal(&self, a: &str, b: &str, depth: usize) -> bool {
        let (a, b) = (a.trim(), b.trim());
        if a == b && !a.is_empty() {
            return true;
        }
        if depth > MAX_NESTING {
            return false;
        }
        let (sa, sb) = (shape(a), shape(b));
        let d = depth + 1;
        match (&sa, &sb) {
            (Shape::Matrix(x), Shape::Matrix(y)) => {
                x.len() == y.len() && x.iter().zip(y).all(|(rx, ry)| self.ordered(rx, ry, d))
            }
            (Shape::Bracketed(o1, x, c1), Shape::Bracketed(o2, y, c2)) => {
                o1 == o2 && c1 == c2 && self.ordered(x, y, d)
            }
            // `x<1, x>2` (a list of inequalities) may match `(-\infty,1)\cup(2,\infty)`.
            (Shape::Unordered(x) | Shape::Union(x), Shape::Unordered(y) | Shape::Union(y)) => {
                self.unordered(x, y, d)
            }
            (Shape::Relation(..), _) | (_, Shape::Relation(..)) => {
                match (as_interval(&sa), as_interval(&sb)) {
                    (Some((o1, x, c1)), Some((o2, y, c2))) => {
                        o1 == o2 && c1 == c2 && self.ordered(&x, &y, d)
                    }
                    _ => false,
                }
            }
            (Shape::Equation(l1, r1), Shape::Equation(l2, r2)) => {
                (self.equal(l1, l2, d) && self.equal(r1, r2, d))
                    || (self.equal(l1, r2, d) && self.equal(r1, l2, d))
                    || self.proportional_equations(l1, r1, l2, r2)
            }
            (Shape::Equation(lhs, rhs), _) if self.cfg.strip_equation_lhs && is_variable(lhs) => {
                self.equal(rhs, b, d)
            }
            (_, Shape::Equation(lhs, rhs)) if self.cfg.strip_equation_lhs && is_variable(lhs) => {
                self.equal(a, rhs, d)
            }
            (Shape::Scalar(x), Shape::Scalar(y)) => self.scalar(x, y),
            _ => false,
        }
    }

    fn ordered(&self, x: &[String], y: &[String], depth: usize) -> bool {
        x.len() == y.len() && x.iter().zip(y).all(|(a, b)| self.equal(a, b, depth))
    }

    /// Order-free comparison: every element of `x` pairs with a distinct equal element of `y`.
    fn unordered(&self, x: &[String], y: &[String], depth: usize) -> bool {
        if x.len() != y.len() {
            return false;
        }
        let mut used = vec![false; y.len()];
        x.iter().all(|a| {
            let found = (0..y.len()).find(|&j| !used[j] && self.equal(a, &y[j], depth));
            found.map(|j| used[j] = true).is_some()
        })
    }

    fn scalar(&self, a: &str, b: &str) -> bool {
        if plain_text(a) == plain_text(b) && !plain_text(a).is_empty() {
            return true;
        }
        let (Some(ea), Some(eb)) = (parse(a), parse(b)) else {
            return false;
        };
        if variables(&ea).is_empty() && variables(&eb).is_empty() {
            let (va, vb) = (eval(&ea, &[]), eval(&eb, &[]));
            if va.is_infinite() || vb.is_infinite() {
                return va == vb && mentions_infinity(&ea) && mentions_infinity(&eb);
            }
            // A side written with `%` may mean p or p/100 (Qwen2.5-Math's `include_percentage`).
            let candidates = |v: f64, has_percent: bool| {
                if self.percent_side.is_some_and(|(pa, pb)| pa != pb) && has_percent {
                    vec![v, v / 100.0]
                } else {
                    vec![v]
                }
            };
            let (pa, pb) = self.percent_side.unwrap_or((false, false));
            let (candidates_a, candidates_b) = (candidates(va, pa), candidates(vb, pb));
            return candidates_a
                .iter()
                .any(|x| candidates_b.iter().any(|y| self.numbers_equal(*x, *y)));
        }
        self.cfg.symbolic
            && equal_at_random_points(
                &ea,
                &eb,
                self.cfg.symbolic_points,
                self.cfg.relative_tolerance,
            )
    }

    /// Integers (both values integral and exactly representable) compare exactly, so `100001`
    /// never matches `100000`; other numbers within the tolerance.
    fn numbers_equal(&self, a: f64, b: f64) -> bool {
        const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
        if a.fract() == 0.0 && b.fract() == 0.0 && a.abs() < EXACT && b.abs() < EXACT {
            return a == b;
        }
        close(
            a,
            b,
            self.cfg.relative_tolerance,
            self.cfg.absolute_tolerance,
        )
    }

    /// `l1 = r1` and `l2 = r2` describe the same equation: `l1 - r1 = c (l2 - r2)`, c != 0.
    fn proportional_equations(&self, l1: &str, r1: &str, l2: &str, r2: &str) -> bool {
        let parts = [parse(l1), parse(r1), parse(l2), parse(r2)];
        let [Some(l1), Some(r1), Some(l2), Some(r2)] = parts else {
            return false;
        };
        let d1 = Expr::Sub(Box::new(l1), Box::new(r1));
        let d2 = Expr::Sub(Box::new(l2), Box::new(r2));
        let mut names = variables(&d1);
        names.extend(variables(&d2));
        names.sort();
        names.dedup();
        if names.is_empty() {
            return false;
        }
        // Ratio at one point, then check d1 == ratio * d2 everywhere.
        let probe: Vec<(String, f64)> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), 1.37 + 0.71 * i as f64))
            .collect();
        let ratio = eval(&d1, &probe) / eval(&d2, &probe);
        if !ratio.is_finite() || ratio == 0.0 {
            return false;
        }
        let scaled = Expr::Mul(Box::new(Expr::Num(ratio)), Box::new(d2));
        equal_at_random_points(
            &d1,
            &scaled,
            self.cfg.symbolic_points,
            self.cfg.relative_tolerance,
        )
    }
}

/// Lowercased text without braces, backslashes and quotes: for word answers (`\text{Monday}`).
fn plain_text(s: &str) -> String {
    s.chars()
        .filter(|c| !matches!(c, '{' | '}' | '\\' | '"' | '\'' | ' '))
        .flat_map(char::to_lowercase)
        .collect()
}

/// Whether `s` is a lone variable name such as `x`, `y_1`, `\theta`, `f(x)`.
fn is_variable(s: &str) -> bool {
    match parse(s) {
        Some(Expr::Var(_)) => true,
        Some(Expr::Mul(f, x)) => {
            matches!((*f, *x), (Expr::Var(_), Expr::Var(_))) && s.ends_with(')')
        }
        _ => false,
    }
}

/// Split `s` at `sep` where no bracket is open.
fn split_top(s: &str, sep: &str) -> Vec<String> {
    let bytes = s.as_bytes();
    let mut parts = Vec::new();
    let mut depth: i64 = 0;
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => depth -= 1,
            _ => {}
        }
        if depth == 0 && bytes[i..].starts_with(sep.as_bytes()) {
            parts.push(s[start..i].to_string());
            i += sep.len();
            start = i;
            continue;
        }
        i += 1;
    }
    parts.push(s[start..].to_string());
    parts
}

/// Whether the bracket opening at byte 0 closes at the last byte.
fn wraps_whole(s: &str) -> bool {
    let bytes = s.as_bytes();
    let mut depth = 0i64;
    for (i, b) in bytes.iter().enumerate() {
        match b {
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => depth -= 1,
            _ => {}
        }
        if depth <= 0 {
            return i == bytes.len() - 1;
        }
    }
    false
}

fn shape(s: &str) -> Shape {
    if let Some(rows) = matrix_rows(s) {
        return Shape::Matrix(rows);
    }
    // One `\pm` is two answers; more would multiply, so they stay a (non-parsing) scalar.
    if let (Some(pos), 1) = (s.find("\\pm"), s.matches("\\pm").count()) {
        let plus = format!("{}+{}", &s[..pos], &s[pos + 3..]);
        let minus = format!("{}-{}", &s[..pos], &s[pos + 3..]);
        return Shape::Unordered(vec![plus, minus]);
    }
    let union = split_top(s, "\\cup");
    if union.len() > 1 {
        return Shape::Union(union.into_iter().take(MAX_ELEMENTS).collect());
    }
    if let Some(inner) = s.strip_prefix("\\{").and_then(|t| t.strip_suffix("\\}")) {
        if wraps_whole(&s[1..]) {
            return Shape::Unordered(
                split_top(inner, ",")
                    .into_iter()
                    .take(MAX_ELEMENTS)
                    .collect(),
            );
        }
    }
    let items = split_top(s, ",");
    if items.len() > 1 {
        return Shape::Unordered(items.into_iter().take(MAX_ELEMENTS).collect());
    }
    let first = s.chars().next().unwrap_or(' ');
    let last = s.chars().last().unwrap_or(' ');
    if matches!(first, '(' | '[') && matches!(last, ')' | ']') && wraps_whole(s) {
        let items = split_top(&s[1..s.len() - 1], ",");
        if items.len() > 1 {
            return Shape::Bracketed(first, items.into_iter().take(MAX_ELEMENTS).collect(), last);
        }
    }
    if let Some(rel) = relation(s) {
        return rel;
    }
    let mut sides = split_top(&s.replace("\\in", "="), "=");
    if sides.len() > 2 {
        // `x = 2 + 1 = 3`: the last side is the value.
        return Shape::Scalar(sides.pop().unwrap_or_default());
    }
    if let (Some(rhs), Some(lhs)) = (sides.pop(), sides.pop()) {
        return Shape::Equation(lhs, rhs);
    }
    Shape::Scalar(s.to_string())
}

/// Rows of a `pmatrix` / `bmatrix` / `matrix` environment, cells split at `&`.
fn matrix_rows(s: &str) -> Option<Vec<Vec<String>>> {
    let rest = s.strip_prefix("\\begin{")?;
    let (env, body) = rest.split_once('}')?;
    let body = body.strip_suffix(&format!("\\end{{{env}}}"))?;
    let rows = body
        .split("\\\\")
        .filter(|r| !r.is_empty())
        .take(MAX_ELEMENTS)
        .map(|r| {
            r.split('&')
                .take(MAX_ELEMENTS)
                .map(str::to_string)
                .collect()
        })
        .collect();
    Some(rows)
}

/// An inequality chain `a < x \le b` split into its sides and relations.
fn relation(s: &str) -> Option<Shape> {
    const OPS: [(&str, Rel); 8] = [
        ("\\le", Rel::LessEq),
        ("\\ge", Rel::GreaterEq),
        ("<=", Rel::LessEq),
        (">=", Rel::GreaterEq),
        ("\\lt", Rel::Less),
        ("\\gt", Rel::Greater),
        ("<", Rel::Less),
        (">", Rel::Greater),
    ];
    let mut sides = Vec::new();
    let mut rels = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < s.len() {
        match OPS.iter().find(|(op, _)| s[i..].starts_with(op)) {
            Some((op, rel)) => {
                sides.push(s[start..i].to_string());
                rels.push(*rel);
                i += op.len();
                start = i;
            }
            None => i += s[i..].chars().next().map_or(1, char::len_utf8),
        }
    }
    if rels.is_empty() || rels.len() > 2 {
        return None;
    }
    sides.push(s[start..].to_string());
    Some(Shape::Relation(sides, rels))
}

/// An inequality in one variable as an interval `(open, [lo, hi], close)`; an interval as itself.
fn as_interval(shape: &Shape) -> Option<(char, Vec<String>, char)> {
    let (sides, rels) = match shape {
        Shape::Bracketed(o, items, c) if items.len() == 2 => return Some((*o, items.clone(), *c)),
        Shape::Relation(sides, rels) => (sides, rels),
        _ => return None,
    };
    let inf = || "\\infty".to_string();
    let neg_inf = || "-\\infty".to_string();
    let open = |r: Rel| matches!(r, Rel::Less | Rel::Greater);
    match (sides.as_slice(), rels.as_slice()) {
        ([v, a], [r]) | ([a, v], [r]) if is_variable(v) && !is_variable(a) => {
            // `x < a` bounds above; `a < x` bounds below.
            let var_left = is_variable(&sides[0]);
            let upper = matches!(r, Rel::Less | Rel::LessEq) == var_left;
            Some(if upper {
                (
                    '(',
                    vec![neg_inf(), a.clone()],
                    if open(*r) { ')' } else { ']' },
                )
            } else {
                (
                    if open(*r) { '(' } else { '[' },
                    vec![a.clone(), inf()],
                    ')',
                )
            })
        }
        ([lo, v, hi], [r1, r2]) if is_variable(v) => {
            let ascending =
                matches!(r1, Rel::Less | Rel::LessEq) && matches!(r2, Rel::Less | Rel::LessEq);
            let descending =
                !matches!(r1, Rel::Less | Rel::LessEq) && !matches!(r2, Rel::Less | Rel::LessEq);
            if ascending {
                Some((
                    if open(*r1) { '(' } else { '[' },
                    vec![lo.clone(), hi.clone()],
                    if open(*r2) { ')' } else { ']' },
                ))
            } else if descending {
                Some((
                    if open(*r2) { '(' } else { '[' },
                    vec![hi.clone(), lo.clone()],
                    if open(*r1) { ')' } else { ']' },
                ))
            } else {
                None
            }
        }
        _ => None,
    }
}
