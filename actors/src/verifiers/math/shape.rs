//! The shape of an answer: matrix, tuple / interval, set or list, union, inequality chain,
//! equation or scalar, found from top-level separators and brackets (nesting-aware splits, so
//! `(1,(2,3))` has two items). Inequalities in one variable become intervals, as math-verify does.

use super::expr::{parse, Expr};
use super::matrix::matrix_shape;
use super::relation::{relation_chain, Rel};

/// Most elements kept in one tuple / set / list / matrix row.
const MAX_ELEMENTS: usize = 64;

/// The shape of an answer, found from its top-level separators and brackets.
#[derive(Debug)]
pub(crate) enum Shape {
    Matrix(Vec<Vec<String>>),
    /// `(a, b)` / `[a, b)` ...: opening bracket, items, closing bracket.
    Bracketed(char, Vec<String>, char),
    /// `\{a, b\}`, or a bare `a, b`: order does not matter.
    Unordered(Vec<String>),
    Union(Vec<String>),
    /// `x > 1 \land x < 3`: every part holds.
    Intersection(Vec<String>),
    Relation(Vec<String>, Vec<Rel>),
    Equation(String, String),
    Scalar(String),
}

/// Whether `s` is a lone variable name such as `x`, `y_1`, `\theta`, `f(x)`.
pub(crate) fn is_variable(s: &str) -> bool {
    match parse(s) {
        Some(Expr::Var(_)) => true,
        Some(Expr::Mul(f, x)) => {
            matches!((*f, *x), (Expr::Var(_), Expr::Var(_))) && s.ends_with(')')
        }
        _ => false,
    }
}

/// Whether `s` names what an answer gives rather than being part of it: a variable, a product
/// or quotient of letters (`AB`, `S_{MBCN}`, `\frac{a}{b}`), a ratio of such (`S_{MBCN}:S`), or
/// a tuple of them (`(p,q)`).
/// `(p,q)=(3,2)`, `AB=4` and `S_{MBCN}:S=7:32` then read as their values; `2x`, `x+y` are not
/// labels, so `2x=6` or `x+y=6` never pass for `6`. A function value `f(2)` is a label too.
pub(crate) fn is_label(s: &str) -> bool {
    let s = s.trim();
    if is_variable(s) {
        return true;
    }
    // A function value: `f(2)`, `P(A)`.
    let mut chars = s.chars();
    let function_value = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.as_str().starts_with('(')
        && wraps_whole(chars.as_str())
        && chars.as_str().len() > 2;
    if function_value {
        return true;
    }
    if let Some(inner) = s.strip_prefix('(').and_then(|t| t.strip_suffix(')')) {
        let items = split_top(inner, ",");
        return wraps_whole(s) && items.len() > 1 && items.iter().all(|i| is_variable(i.trim()));
    }
    let parts = split_top(s, ":");
    if parts.len() > 1 {
        return parts.len() <= 4 && parts.iter().all(|p| is_label(p));
    }
    /// Whether `e` is a product / quotient of at most 8 letters.
    fn letters_only(e: &Expr, factors: &mut usize) -> bool {
        match e {
            Expr::Var(_) => {
                *factors += 1;
                *factors <= 8
            }
            Expr::Mul(a, b) | Expr::Div(a, b) => {
                letters_only(a, factors) && letters_only(b, factors)
            }
            _ => false,
        }
    }
    parse(s).is_some_and(|e| letters_only(&e, &mut 0))
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

pub(crate) fn shape(s: &str) -> Shape {
    // A plain `{...}` around the whole answer is LaTeX grouping.
    let s = match s.strip_prefix('{').and_then(|t| t.strip_suffix('}')) {
        Some(inner) if wraps_whole(s) => inner.trim(),
        _ => s,
    };
    if let Some(matrix) = matrix_shape(s) {
        return matrix;
    }
    let conjunction = split_top(s, "\\land");
    if conjunction.len() > 1 {
        return Shape::Intersection(conjunction.into_iter().take(MAX_ELEMENTS).collect());
    }
    // One `\pm` is two answers; more would multiply, so they stay a (non-parsing) scalar. In a
    // `\ne` both must hold: `x \ne \pm 1` excludes both.
    if let (Some(pos), 1) = (s.find("\\pm"), s.matches("\\pm").count()) {
        let plus = format!("{}+{}", &s[..pos], &s[pos + 3..]);
        let minus = format!("{}-{}", &s[..pos], &s[pos + 3..]);
        let not_equal = relation_chain(s).is_some_and(|(_, rels)| rels == [Rel::NotEq]);
        return if not_equal {
            Shape::Intersection(vec![plus, minus])
        } else {
            Shape::Unordered(vec![plus, minus])
        };
    }
    let union = split_top(s, "\\cup");
    if union.len() > 1 {
        return Shape::Union(union.into_iter().take(MAX_ELEMENTS).collect());
    }
    if let Some(inner) = s.strip_prefix("\\{").and_then(|t| t.strip_suffix("\\}")) {
        // Set-builder `\{x \mid x > 2\}` / `\{x : x > 2\}` is the set its condition describes.
        for bar in ["\\mid", "|", ":"] {
            let parts = split_top(inner, bar);
            if let [var, condition] = parts.as_slice() {
                if is_variable(var.trim()) && relation_chain(condition.trim()).is_some() {
                    return shape(condition.trim());
                }
            }
        }
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
    if let Some((sides, rels)) = relation_chain(s) {
        return Shape::Relation(sides, rels);
    }
    let mut sides = split_top(&membership_as_equals(s), "=");
    if sides.len() > 2 {
        // `x = 2 + 1 = 3`: the last side is the value.
        return Shape::Scalar(sides.pop().unwrap_or_default());
    }
    if let (Some(rhs), Some(lhs)) = (sides.pop(), sides.pop()) {
        return Shape::Equation(lhs, rhs);
    }
    Shape::Scalar(s.to_string())
}

/// An inequality in one variable as an interval `(open, [lo, hi], close)`; an interval as itself.
pub(crate) fn as_interval(shape: &Shape) -> Option<(char, Vec<String>, char)> {
    let (sides, rels) = match shape {
        Shape::Bracketed(o, items, c) if items.len() == 2 => return Some((*o, items.clone(), *c)),
        Shape::Relation(sides, rels) => (sides, rels),
        _ => return None,
    };
    let inf = || "\\infty".to_string();
    let neg_inf = || "-\\infty".to_string();
    if rels.contains(&Rel::NotEq) {
        return None;
    }
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

/// `x \\in S` as `x = S`, leaving `\\infty` / `\\int` alone.
fn membership_as_equals(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find("\\in") {
        let after = &rest[pos + 3..];
        out.push_str(&rest[..pos]);
        if after.starts_with(|c: char| c.is_ascii_alphabetic()) {
            out.push_str("\\in");
        } else {
            out.push('=');
        }
        rest = after;
    }
    out.push_str(rest);
    out
}
