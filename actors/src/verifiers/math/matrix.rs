//! Matrices in any LaTeX form, and matrix expressions evaluated to one matrix.
//!
//! `pmatrix`, `bmatrix`, `Bmatrix`, `matrix`, `smallmatrix` and `array` (its column spec
//! skipped), bare or inside `( )` / `[ ]` (what `\left[ ... \right]` leaves), and a list of rows
//! `[[1, 2], [3, 4]]` are one matrix.
//! `vmatrix` (and `\det M`) is a determinant: a scalar, never equal to a matrix. A sum,
//! difference or product of matrices with scalar factors (`A + B`, `A B`, `2A`), transposes
//! (`A^T`), inverses (`A^{-1}`, up to 3 x 3) and small powers (`A^2`) are worked out cell by cell
//! as expression text, which the scalar comparison then evaluates, as math-verify does with sympy
//! matrices.

use super::shape::Shape;

/// Most rows or columns of a matrix.
const MAX_DIM: usize = 12;
/// Most matrices in one expression.
const MAX_OPERANDS: usize = 6;
/// Longest cell text an expression may build.
const MAX_CELL: usize = 1500;

/// Rows of cells.
type Cells = Vec<Vec<String>>;

/// The shape of an answer holding a matrix environment: a matrix (or a determinant, a scalar).
pub(crate) fn matrix_shape(s: &str) -> Option<Shape> {
    if !s.contains("\\begin{") {
        return nested_list(s).map(Shape::Matrix);
    }
    let s = strip_outer_bracket(s.trim());
    let value = evaluate(s)?;
    Some(match value {
        Value::Matrix(rows) => Shape::Matrix(rows),
        Value::Scalar(text) => Shape::Scalar(text),
    })
}

/// A matrix written as a list of rows, `[[1, 2], [3, 4]]` (NumPy, Qwen2.5-Math references) or
/// `Matrix([[1, 2], [3, 4]])` (sympy): every row bracketed, all of one width.
fn nested_list(s: &str) -> Option<Cells> {
    let s = s.trim();
    let s = s
        .strip_prefix("Matrix(")
        .and_then(|t| t.strip_suffix(')'))
        .unwrap_or(s)
        .trim();
    let inner = s.strip_prefix("[[")?.strip_suffix("]]")?;
    let rows: Cells = inner
        .split("],")
        .map(|row| {
            let row = row.trim().trim_start_matches('[');
            let cells: Vec<String> = row.split(',').map(|c| c.trim().to_string()).collect();
            // A nested bracket inside a row is not a plain cell.
            let plain = cells
                .iter()
                .all(|c| !c.is_empty() && !c.contains(['[', ']']));
            plain.then_some(cells)
        })
        .collect::<Option<_>>()?;
    let width = rows.first()?.len();
    let fits = rows.len() <= MAX_DIM && width <= MAX_DIM;
    (fits && rows.iter().all(|r| r.len() == width)).then_some(rows)
}

/// `(M)` / `[M]` around a single environment is the environment.
fn strip_outer_bracket(s: &str) -> &str {
    for (open, close) in [('(', ')'), ('[', ']')] {
        if let Some(inner) = s.strip_prefix(open).and_then(|t| t.strip_suffix(close)) {
            let inner = inner.trim();
            if inner.starts_with("\\begin{")
                && environment(inner).is_some_and(|e| e.2 == inner.len())
            {
                return inner;
            }
        }
    }
    s
}

/// What a matrix expression evaluates to.
enum Value {
    Matrix(Cells),
    Scalar(String),
}

/// One environment at the start of `s`: its name, its body and the bytes it spans.
fn environment(s: &str) -> Option<(&str, &str, usize)> {
    let rest = s.strip_prefix("\\begin{")?;
    let (name, body) = rest.split_once('}')?;
    let end_tag = format!("\\end{{{name}}}");
    let end = body.find(&end_tag)?;
    let spanned = s.len() - body.len() + end + end_tag.len();
    Some((name, &body[..end], spanned))
}

/// The cells of an environment's body (an `array`'s `{cc}` column spec skipped).
fn cells(name: &str, body: &str) -> Option<Cells> {
    let mut body = body.trim_start();
    if name == "array" {
        let spec = body.strip_prefix('{')?;
        let len = super::boxes::balanced_group(spec)?;
        body = &spec[len + 1..];
    }
    let rows: Cells = body
        .split("\\\\")
        .filter(|r| !r.trim().is_empty())
        .map(|r| r.split('&').map(|c| c.trim().to_string()).collect())
        .collect();
    let width = rows.first()?.len();
    let fits = rows.len() <= MAX_DIM && width <= MAX_DIM;
    (fits && rows.iter().all(|r| r.len() == width)).then_some(rows)
}

/// Evaluate `s`: terms joined by `+` / `-` outside brackets, each a product of matrices and
/// scalar factors.
fn evaluate(s: &str) -> Option<Value> {
    let mut total: Option<Value> = None;
    let mut operands = 0;
    for (sign, term) in split_terms(s)? {
        let (scalar, matrices) = factors(term)?;
        operands += matrices.len();
        if operands > MAX_OPERANDS {
            return None;
        }
        let value = product(scalar, matrices)?;
        total = Some(match total {
            None if sign == '+' => value,
            None => scale("-1", value),
            Some(sum) => add(sum, value, sign)?,
        });
    }
    total
}

/// Split at top-level `+` / `-` (outside brackets and environments); a leading sign belongs to
/// the first term.
fn split_terms(s: &str) -> Option<Vec<(char, &str)>> {
    let bytes = s.as_bytes();
    let mut terms = Vec::new();
    let (mut depth, mut env_depth, mut start, mut sign) = (0i64, 0i64, 0, '+');
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i..].starts_with(b"\\begin{") {
            env_depth += 1;
        } else if bytes[i..].starts_with(b"\\end{") {
            env_depth -= 1;
        }
        match bytes[i] {
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => depth -= 1,
            b'+' | b'-' if depth == 0 && env_depth == 0 => {
                let term = s[start..i].trim();
                if !term.is_empty() {
                    terms.push((sign, term));
                } else if !terms.is_empty() {
                    return None;
                }
                sign = char::from(bytes[i]);
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    terms.push((sign, s[start..].trim()));
    Some(terms)
}

/// A term's scalar factors (as one product text) and its matrices (determinants become scalars).
fn factors(term: &str) -> Option<(String, Vec<Cells>)> {
    let mut scalars: Vec<String> = Vec::new();
    let mut matrices = Vec::new();
    let mut rest = term.trim();
    while !rest.is_empty() {
        let Some(at) = rest.find("\\begin{") else {
            if rest.contains([',', '=']) {
                return None;
            }
            scalars.push(rest.to_string());
            break;
        };
        let mut before = rest[..at].trim().trim_matches(['*', ' ']);
        // `A = M` or `M, N` is not one matrix expression.
        if before.contains([',', '=']) {
            return None;
        }
        let det = before.ends_with("\\det");
        if det {
            before = before[..before.len() - 4].trim_end();
        }
        if !before.is_empty() {
            scalars.push(before.to_string());
        }
        let (name, body, len) = environment(&rest[at..])?;
        let (grid, after) = postfix(cells(name, body)?, &rest[at + len..])?;
        if name == "vmatrix" || det {
            scalars.push(determinant(&grid)?);
        } else {
            matrices.push(grid);
        }
        rest = after.trim_start().trim_start_matches(['*', ' ']);
    }
    let scalar = match scalars.as_slice() {
        [] => "1".to_string(),
        [one] => one.clone(),
        many => many
            .iter()
            .map(|f| format!("({f})"))
            .collect::<Vec<_>>()
            .join("*"),
    };
    Some((scalar, matrices))
}

/// A matrix with the postfix after it applied: a transpose (`^T`, `^{\top}`), the inverse
/// (`^{-1}`, up to 3 x 3) or a small power (`^2` .. `^5`); the text after it.
fn postfix(grid: Cells, after: &str) -> Option<(Cells, &str)> {
    let Some(power) = after.trim_start().strip_prefix('^') else {
        return Some((grid, after));
    };
    let (exponent, rest) = match power.strip_prefix('{') {
        Some(group) => {
            let len = super::boxes::balanced_group(group)?;
            (group[..len].trim(), &group[len + 1..])
        }
        None if power.starts_with("\\top") => ("\\top", &power[4..]),
        None => power.split_at(power.chars().next()?.len_utf8()),
    };
    let value = match exponent {
        "T" | "\\top" | "t" => transpose(&grid),
        "-1" => inverse(&grid)?,
        _ => {
            let times: usize = exponent.parse().ok().filter(|k| (1..=5).contains(k))?;
            let mut acc = grid.clone();
            for _ in 1..times {
                acc = multiply(&acc, &grid)?;
            }
            acc
        }
    };
    Some((value, rest))
}

fn transpose(m: &Cells) -> Cells {
    let width = m.first().map_or(0, Vec::len);
    (0..width)
        .map(|j| m.iter().map(|row| row[j].clone()).collect())
        .collect()
}

/// The inverse of a square matrix up to 3 x 3: the adjugate over the determinant.
fn inverse(m: &Cells) -> Option<Cells> {
    let n = m.len();
    if n == 0 || n > 3 || m.iter().any(|r| r.len() != n) {
        return None;
    }
    let det = determinant(m)?;
    if n == 1 {
        return Some(vec![vec![format!("1/({det})")]]);
    }
    (0..n)
        .map(|i| {
            (0..n)
                .map(|j| {
                    // Entry (i, j) is the cofactor of (j, i).
                    let minor: Cells = (0..n)
                        .filter(|&r| r != j)
                        .map(|r| {
                            (0..n)
                                .filter(|&c| c != i)
                                .map(|c| m[r][c].clone())
                                .collect()
                        })
                        .collect();
                    let sign = if (i + j) % 2 == 0 { "" } else { "-" };
                    bounded(format!("{sign}({})/({det})", determinant(&minor)?))
                })
                .collect()
        })
        .collect()
}

/// `scalar * M1 * M2 * ...`, or the scalar itself.
fn product(scalar: String, matrices: Vec<Cells>) -> Option<Value> {
    let mut iter = matrices.into_iter();
    let Some(mut acc) = iter.next() else {
        return Some(Value::Scalar(scalar));
    };
    for next in iter {
        acc = multiply(&acc, &next)?;
    }
    Some(if scalar == "1" {
        Value::Matrix(acc)
    } else {
        scale(&scalar, Value::Matrix(acc))
    })
}

fn scale(factor: &str, value: Value) -> Value {
    match value {
        Value::Matrix(rows) => Value::Matrix(
            rows.into_iter()
                .map(|r| r.into_iter().map(|c| format!("({factor})*({c})")).collect())
                .collect(),
        ),
        Value::Scalar(text) => Value::Scalar(format!("({factor})*({text})")),
    }
}

/// `a + b` or `a - b` for two matrices of one size (or two scalars).
fn add(a: Value, b: Value, sign: char) -> Option<Value> {
    match (a, b) {
        (Value::Matrix(x), Value::Matrix(y)) => {
            let same = x.len() == y.len() && x.iter().zip(&y).all(|(r, s)| r.len() == s.len());
            let rows: Cells = x
                .iter()
                .zip(&y)
                .map(|(r, s)| {
                    r.iter()
                        .zip(s)
                        .map(|(p, q)| bounded(format!("({p}){sign}({q})")))
                        .collect::<Option<_>>()
                })
                .collect::<Option<_>>()?;
            same.then_some(Value::Matrix(rows))
        }
        (Value::Scalar(x), Value::Scalar(y)) => Some(Value::Scalar(format!("({x}){sign}({y})"))),
        _ => None,
    }
}

/// The matrix product, cells as sums of products; `None` when the sizes do not chain.
fn multiply(a: &Cells, b: &Cells) -> Option<Cells> {
    let inner = b.len();
    if a.first()?.len() != inner {
        return None;
    }
    let width = b.first()?.len();
    a.iter()
        .map(|row| {
            (0..width)
                .map(|j| {
                    let terms: Vec<String> = (0..inner)
                        .map(|k| format!("({})*({})", row[k], b[k][j]))
                        .collect();
                    bounded(terms.join("+"))
                })
                .collect()
        })
        .collect()
}

/// The determinant of a square matrix (up to 4 x 4) as expression text, by cofactors.
fn determinant(m: &Cells) -> Option<String> {
    let n = m.len();
    if n == 0 || n > 4 || m.iter().any(|r| r.len() != n) {
        return None;
    }
    if n == 1 {
        return Some(m[0][0].clone());
    }
    let mut terms = Vec::with_capacity(n);
    for (j, cell) in m[0].iter().enumerate() {
        let minor: Cells = m[1..]
            .iter()
            .map(|r| {
                r.iter()
                    .enumerate()
                    .filter(|(k, _)| *k != j)
                    .map(|(_, c)| c.clone())
                    .collect()
            })
            .collect();
        let sign = if j % 2 == 0 { '+' } else { '-' };
        terms.push(format!("{sign}({cell})*({})", determinant(&minor)?));
    }
    bounded(terms.concat())
}

/// `text`, unless it is longer than [`MAX_CELL`].
fn bounded(text: String) -> Option<String> {
    (text.len() <= MAX_CELL).then_some(text)
}
