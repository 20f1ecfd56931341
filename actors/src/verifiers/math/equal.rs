//! Mathematical equivalence of two final answers.
//!
//! Structure first, as Qwen2.5-Math's `math_equal` and math-verify do: matrices (elementwise,
//! after matrix expressions are worked out), tuples and intervals (ordered; bracket kinds must
//! match, so `[1,2)` is not `[1,2]`), sets, bare lists and several answers (order-free, like
//! math-verify's `FiniteSet`), unions of intervals and relations (as sets of reals, see
//! `relation.rs`), equations (two equations match when one is a multiple of the other; a label
//! `x =`, `(p,q) =`, `AB =` or a worked computation `\binom{6}{2} =` before a value is dropped
//! when the other side is not an equation, so `x = 3` never matches `y = 3`), `\pm` (two
//! answers). Then scalars: integers exactly, other numbers within a relative tolerance,
//! percentages as `p` or `p/100` (Qwen's `include_percentage`), and symbolic expressions by
//! evaluation at random points.

use super::boxes::boxed_answers;
use std::cell::Cell;

use super::eval::{close, equal_at_random_points, eval, mentions_infinity, variables};
use super::expr::{parse, Expr};
use super::extract::extract_answer_with_tags;
use super::normalize::{normalize_answer, Normalized};
use super::relation::{ascending, mentions_relation, RealSet, Rel};
use super::shape::{as_interval, is_label, shape, Shape};
use super::MathConfig;

/// Most set comparisons (relations, unions) one answer pair may make, which bounds its time.
const MAX_SET_COMPARISONS: usize = 16;
/// Deepest structural nesting compared (tuples of tuples of ...).
const MAX_NESTING: usize = 8;

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
/// (for prose of more than a few words, or a few words around a `$...$` span) what
/// [`extract_answer`] finds. Short answers pass as is.
fn answer_part(s: &str) -> String {
    if s.contains("\\boxed") || s.contains("\\fbox") {
        if let Some(boxed) = boxed_answers(s) {
            return boxed;
        }
    }
    let words = s
        .split_whitespace()
        .map(|w| w.trim_matches(|c: char| !c.is_alphanumeric()))
        .filter(|w| w.len() > 2 && w.chars().all(char::is_alphabetic))
        .take(5)
        .count();
    // Prose around a math span (`The total is $1,048,576$.`) is not part of the answer either.
    if words >= 5 || (words >= 1 && s.contains('$')) {
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
    Comparer {
        cfg,
        percent_side,
        set_budget: Cell::new(MAX_SET_COMPARISONS),
    }
    .equal(&p.text, &r.text, 0)
}

struct Comparer<'a> {
    cfg: &'a MathConfig,
    /// Which sides carried a `%`, when percent equivalence is on.
    percent_side: Option<(bool, bool)>,
    /// Set comparisons left for this answer pair (each may evaluate thousands of points).
    set_budget: Cell<usize>,
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
            // A bare list against a tuple reads as the tuple, in order (math-verify:
            // `(1,3)` matches `{1,3}`, `(3,1)` does not).
            (Shape::Bracketed('(', x, ')'), Shape::Unordered(y))
            | (Shape::Unordered(x), Shape::Bracketed('(', y, ')')) => self.ordered(x, y, d),
            // `x<1, x>2` (a list of inequalities) may match `(-\infty,1)\cup(2,\infty)`.
            (Shape::Unordered(x) | Shape::Union(x), Shape::Unordered(y) | Shape::Union(y)) => {
                self.unordered(x, y, d) || self.same_set(&sa, &sb)
            }
            (Shape::Relation(..), _) | (_, Shape::Relation(..)) => {
                if let (Some(x), Some(y)) = (RealSet::of(&sa, 0), RealSet::of(&sb, 0)) {
                    return self.sets_equal(&x, &y);
                }
                let same_interval = match (as_interval(&sa), as_interval(&sb)) {
                    (Some((o1, x, c1)), Some((o2, y, c2))) => {
                        o1 == o2 && c1 == c2 && self.ordered(&x, &y, d)
                    }
                    _ => false,
                };
                same_interval || self.same_relation(&sa, &sb, d)
            }
            (Shape::Union(_) | Shape::Intersection(_), _)
            | (_, Shape::Union(_) | Shape::Intersection(_)) => self.same_set(&sa, &sb),
            (Shape::Equation(l1, r1), Shape::Equation(l2, r2)) => {
                (self.equal(l1, l2, d) && self.equal(r1, r2, d))
                    || (self.equal(l1, r2, d) && self.equal(r1, l2, d))
                    || self.multiple_of(l1, r1, l2, r2).is_some()
            }
            (Shape::Equation(lhs, rhs), _) if self.gives_value(lhs, rhs) => self.equal(rhs, b, d),
            (_, Shape::Equation(lhs, rhs)) if self.gives_value(lhs, rhs) => self.equal(a, rhs, d),
            (Shape::Scalar(x), Shape::Scalar(y)) => self.scalar(x, y),
            _ => false,
        }
    }

    /// Whether `lhs = rhs` states the value `rhs`: `lhs` is a label (`x`, `(p,q)`, `AB`) and
    /// label stripping is on, or `lhs` is a worked computation of `rhs` (`\binom{6}{2} = 15`).
    fn gives_value(&self, lhs: &str, rhs: &str) -> bool {
        if self.cfg.strip_equation_lhs && is_label(lhs) {
            return true;
        }
        let (Some(l), Some(r)) = (parse(lhs.trim()), parse(rhs.trim())) else {
            return false;
        };
        let constant = variables(&l).is_empty() && variables(&r).is_empty();
        let (vl, vr) = (eval(&l, &[]), eval(&r, &[]));
        constant && vl.is_finite() && vr.is_finite() && self.numbers_equal(vl, vr)
    }

    /// Whether two answers that involve a relation or a union are the same set of reals.
    fn same_set(&self, a: &Shape, b: &Shape) -> bool {
        let explicit = |s: &Shape| mentions_relation(s) || matches!(s, Shape::Union(_));
        if !(explicit(a) || explicit(b)) {
            return false;
        }
        match (RealSet::of(a, 0), RealSet::of(b, 0)) {
            (Some(x), Some(y)) => self.sets_equal(&x, &y),
            _ => false,
        }
    }

    /// [`RealSet::same_as`] while the budget lasts; past it, not equal (a miss, never a pass).
    fn sets_equal(&self, a: &RealSet, b: &RealSet) -> bool {
        let left = self.set_budget.get();
        if left == 0 {
            return false;
        }
        self.set_budget.set(left - 1);
        a.same_as(b)
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
        // A word (`no`, `Monday`) is text: as a product of letters `no` would equal `on`.
        let is_word = |t: &str| t.len() >= 2 && t.chars().all(|c| c.is_ascii_alphabetic());
        if is_word(a) || is_word(b) {
            return false;
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

    /// Two relations in several variables: the same chain once both read ascending, side by
    /// side, or (one link) `l1 - r1` a positive multiple of `l2 - r2` (any multiple for `\ne`).
    fn same_relation(&self, a: &Shape, b: &Shape, depth: usize) -> bool {
        let (Shape::Relation(s1, r1), Shape::Relation(s2, r2)) = (a, b) else {
            return false;
        };
        let (Some((s1, r1)), Some((s2, r2))) = (ascending(s1, r1), ascending(s2, r2)) else {
            return false;
        };
        if r1 != r2 {
            return false;
        }
        if self.ordered(&s1, &s2, depth) {
            return true;
        }
        let any_sign = r1 == [Rel::NotEq];
        r1.len() == 1
            && self
                .multiple_of(&s1[0], &s1[1], &s2[0], &s2[1])
                .is_some_and(|c| any_sign || c > 0.0)
    }

    /// `c` such that `l1 - r1 = c (l2 - r2)` everywhere, c != 0, when there is one: `l1 = r1` and
    /// `l2 = r2` are then the same equation.
    fn multiple_of(&self, l1: &str, r1: &str, l2: &str, r2: &str) -> Option<f64> {
        let parts = [parse(l1), parse(r1), parse(l2), parse(r2)];
        let [Some(l1), Some(r1), Some(l2), Some(r2)] = parts else {
            return None;
        };
        let d1 = Expr::Sub(Box::new(l1), Box::new(r1));
        let d2 = Expr::Sub(Box::new(l2), Box::new(r2));
        // Both sides must be equations in some variable (a constant `1e-301 = 0` is not).
        let (vars1, vars2) = (variables(&d1), variables(&d2));
        if vars1.is_empty() || vars2.is_empty() {
            return None;
        }
        let mut names = vars1;
        names.extend(vars2);
        names.sort();
        names.dedup();
        // Ratio at one point, then check d1 == ratio * d2 everywhere.
        let probe: Vec<(String, f64)> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), 1.37 + 0.71 * i as f64))
            .collect();
        let ratio = eval(&d1, &probe) / eval(&d2, &probe);
        if !ratio.is_finite() || !(1e-9..=1e9).contains(&ratio.abs()) {
            return None;
        }
        let scaled = Expr::Mul(Box::new(Expr::Num(ratio)), Box::new(d2));
        equal_at_random_points(
            &d1,
            &scaled,
            self.cfg.symbolic_points,
            self.cfg.relative_tolerance,
        )
        .then_some(ratio)
    }
}

/// Lowercased text without braces, backslashes and quotes: for word answers (`\text{Monday}`).
fn plain_text(s: &str) -> String {
    s.chars()
        .filter(|c| !matches!(c, '{' | '}' | '\\' | '"' | '\'' | ' '))
        .flat_map(char::to_lowercase)
        .collect()
}
