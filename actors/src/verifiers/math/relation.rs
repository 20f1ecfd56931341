//! Relations as values: chains of `<`, `\le`, `>`, `\ge`, `\ne` (`\lt`, `\gt`, `<=`, `>=`, `!=`
//! spelled any way), and the sets they describe.
//!
//! A relation in one variable stands for its solution set (`\emptyset` and `S \setminus \{p\}`
//! are sets too), so `-x > -1`, `x < 1` and `(-\infty, 1)` are one answer, and
//! `1 \le |z| \le 3/2` is `[-3/2,-1] \cup [1,3/2]`. Two sets (relations, intervals, unions,
//! lists of relations) are compared by membership at test points: the finite interval endpoints,
//! the boundaries of each relation (sign changes of `lhs - rhs` on a grid from 1e-5 to 1e300,
//! refined by bisection), points just beside and between them, and the grid itself, whose simple
//! numbers catch a boundary where `lhs - rhs` only touches zero (`(x-1)^2 > 0`). At a boundary a
//! relation holds by its kind (`\le` yes, `<` no), within a relative tolerance. Relations in
//! several variables compare link by link with the direction made ascending, as equal sides or
//! as `lhs - rhs` a positive multiple of the other's. Relations in different variables differ.

use super::eval::eval;
use super::expr::{parse, Expr};
use super::shape::{is_variable, Shape};

/// Most boundaries one relation link may have.
const MAX_ROOTS: usize = 64;
/// Most boundaries two compared sets may have together.
const MAX_BOUNDS: usize = 256;
/// Most pieces a set may have.
const MAX_PIECES: usize = 32;
/// Relative tolerance for "on the boundary".
const BOUNDARY_TOLERANCE: f64 = 1e-9;

/// An order relation in a chain.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Rel {
    Less,
    LessEq,
    Greater,
    GreaterEq,
    NotEq,
}

impl Rel {
    /// The same relation read right to left (`a < b` is `b > a`).
    fn flipped(self) -> Rel {
        match self {
            Rel::Less => Rel::Greater,
            Rel::LessEq => Rel::GreaterEq,
            Rel::Greater => Rel::Less,
            Rel::GreaterEq => Rel::LessEq,
            Rel::NotEq => Rel::NotEq,
        }
    }

    /// Whether the relation points downwards (`>`, `\ge`).
    fn descending(self) -> bool {
        matches!(self, Rel::Greater | Rel::GreaterEq)
    }

    /// Whether `l rel r` holds; sides within the tolerance count as equal.
    fn holds(self, l: f64, r: f64) -> bool {
        if l.is_nan() || r.is_nan() {
            return false;
        }
        let scale = 1f64.max(l.abs()).max(r.abs());
        let finite = l.is_finite() && r.is_finite();
        if l == r || (finite && (l - r).abs() <= BOUNDARY_TOLERANCE * scale) {
            return matches!(self, Rel::LessEq | Rel::GreaterEq);
        }
        match self {
            Rel::Less | Rel::LessEq => l < r,
            Rel::Greater | Rel::GreaterEq => l > r,
            Rel::NotEq => true,
        }
    }
}

/// The spellings of each relation, longest first where one prefixes another.
const OPS: [(&str, Rel); 14] = [
    ("\\le", Rel::LessEq),
    ("\\ge", Rel::GreaterEq),
    ("\\ne", Rel::NotEq),
    ("\\not=", Rel::NotEq),
    ("\\lt", Rel::Less),
    ("\\gt", Rel::Greater),
    ("<=", Rel::LessEq),
    (">=", Rel::GreaterEq),
    ("!=", Rel::NotEq),
    ("≠", Rel::NotEq),
    ("⩽", Rel::LessEq),
    ("⩾", Rel::GreaterEq),
    ("<", Rel::Less),
    (">", Rel::Greater),
];

/// An inequality chain `a < x \le b` split into its sides and relations (at most two links).
pub(crate) fn relation_chain(s: &str) -> Option<(Vec<String>, Vec<Rel>)> {
    let bytes = s.as_bytes();
    let mut sides = Vec::new();
    let mut rels = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < s.len() {
        let could_start = matches!(bytes[i], b'<' | b'>' | b'\\' | b'!' | 0xE2);
        let found = OPS.iter().find(|(op, _)| {
            could_start
                && s[i..].starts_with(op)
                // `\le` is not the start of `\left`, nor `\ne` of `\neg`.
                && !(op.ends_with(|c: char| c.is_ascii_alphabetic())
                    && bytes.get(i + op.len()).is_some_and(u8::is_ascii_alphabetic))
        });
        match found {
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
    sides
        .iter()
        .all(|side| !side.trim().is_empty())
        .then_some((sides, rels))
}

/// A relation chain read in ascending direction (`b > a` as `a < b`); `None` for a mixed chain.
pub(crate) fn ascending(sides: &[String], rels: &[Rel]) -> Option<(Vec<String>, Vec<Rel>)> {
    let down = rels.iter().filter(|r| r.descending()).count();
    let up = rels
        .iter()
        .filter(|r| matches!(r, Rel::Less | Rel::LessEq))
        .count();
    match (down, up) {
        (0, _) => Some((sides.to_vec(), rels.to_vec())),
        (_, 0) => Some((
            sides.iter().rev().cloned().collect(),
            rels.iter().rev().map(|r| r.flipped()).collect(),
        )),
        _ => None,
    }
}

/// One piece of a set of reals.
enum Piece {
    /// An interval: bounds and whether each end is closed.
    Interval(f64, f64, bool, bool),
    /// The solution set of a relation chain in one variable.
    Solutions(Vec<Expr>, Vec<Rel>, String),
    /// The intersection of pieces.
    All(Vec<Piece>),
}

impl Piece {
    fn contains(&self, x: f64) -> bool {
        match self {
            Piece::Interval(lo, hi, lo_closed, hi_closed) => {
                let near = |e: f64| {
                    e.is_finite() && (x - e).abs() <= BOUNDARY_TOLERANCE * 1f64.max(e.abs())
                };
                if near(*lo) {
                    return *lo_closed;
                }
                if near(*hi) {
                    return *hi_closed;
                }
                *lo < x && x < *hi
            }
            Piece::Solutions(sides, rels, var) => {
                let at = [(var.clone(), x)];
                let values: Vec<f64> = sides.iter().map(|s| eval(s, &at)).collect();
                rels.iter()
                    .enumerate()
                    .all(|(i, r)| r.holds(values[i], values[i + 1]))
            }
            Piece::All(pieces) => pieces.iter().all(|p| p.contains(x)),
        }
    }

    /// Where the piece's membership may change: finite endpoints, or the boundaries of each link.
    fn boundaries(&self, grid: &[f64], out: &mut Vec<f64>) {
        match self {
            Piece::Interval(lo, hi, ..) => out.extend([*lo, *hi].iter().filter(|e| e.is_finite())),
            Piece::Solutions(sides, _, var) => {
                let mut at = [(var.clone(), 0.0)];
                for pair in sides.windows(2) {
                    let f = |x: f64| {
                        at[0].1 = x;
                        eval(&pair[0], &at) - eval(&pair[1], &at)
                    };
                    out.extend(sign_changes(f, grid));
                }
            }
            Piece::All(pieces) => pieces.iter().for_each(|p| p.boundaries(grid, out)),
        }
    }
}

/// Points of `grid` where `f` changes sign, refined by bisection (at most [`MAX_ROOTS`]).
fn sign_changes(mut f: impl FnMut(f64) -> f64, grid: &[f64]) -> Vec<f64> {
    let values: Vec<f64> = grid.iter().map(|&x| f(x)).collect();
    let mut roots = Vec::new();
    for i in 1..grid.len() {
        let (fa, fb) = (values[i - 1], values[i]);
        if !(fa.is_finite() && fb.is_finite()) || (fa < 0.0) == (fb < 0.0) || fa == 0.0 {
            continue;
        }
        let (mut a, mut b, mut fa) = (grid[i - 1], grid[i], fa);
        for _ in 0..60 {
            let mid = 0.5 * (a + b);
            let fm = f(mid);
            if fm.is_nan() {
                break;
            }
            if (fm < 0.0) == (fa < 0.0) {
                (a, fa) = (mid, fm);
            } else {
                b = mid;
            }
        }
        roots.push(0.5 * (a + b));
        if roots.len() >= MAX_ROOTS {
            break;
        }
    }
    roots
}

/// The search grid, built once: simple numbers (multiples of 1/12 up to 24), a sinh-spaced sweep
/// to ±1490 (steps of 0.02 near 0), and a logarithmic sweep `±10^(k/4)` from 1e-5 to 1e300, so a
/// boundary at any magnitude (`x > 5000` against `x > 6000`) falls between two grid points.
fn grid() -> &'static [f64] {
    static GRID: std::sync::OnceLock<Vec<f64>> = std::sync::OnceLock::new();
    GRID.get_or_init(|| {
        let mut points: Vec<f64> = (-288..=288).map(|k| f64::from(k) / 12.0).collect();
        points.extend((-400..=400).map(|k| (f64::from(k) / 50.0).sinh()));
        for k in -20..=1200 {
            let magnitude = 10f64.powf(f64::from(k) / 4.0);
            points.extend([magnitude, -magnitude]);
        }
        points.sort_by(f64::total_cmp);
        points.dedup();
        points
    })
}

/// A set of reals as a union of pieces; `var` is the variable its relations use.
#[derive(Default)]
pub(crate) struct RealSet {
    pieces: Vec<Piece>,
    var: Option<String>,
    /// Points taken out of the union (`\mathbb{R} \setminus \{2\}`).
    excluded: Vec<f64>,
}

impl RealSet {
    /// The set `shape` describes, when it is one: an interval, a union or list of sets, a
    /// relation in one variable, or `x \in S`. Tuples of more than two items are not sets.
    pub(crate) fn of(shape: &Shape, depth: usize) -> Option<RealSet> {
        if depth > 4 {
            return None;
        }
        match shape {
            Shape::Bracketed(open, items, close) if items.len() == 2 => {
                let bound = |s: &str| {
                    let e = parse(s.trim())?;
                    let v = eval(&e, &[]);
                    (!v.is_nan()).then_some(v)
                };
                let (lo, hi) = (bound(&items[0])?, bound(&items[1])?);
                (lo <= hi).then(|| RealSet {
                    pieces: vec![Piece::Interval(lo, hi, *open == '[', *close == ']')],
                    ..RealSet::default()
                })
            }
            // A list is a set only when it lists relations (`x < 1, x > 2`): `(1,3), (2,4)` are
            // points.
            Shape::Unordered(_) if !mentions_relation(shape) => None,
            Shape::Union(items) | Shape::Unordered(items) if items.len() <= MAX_PIECES => {
                let mut set = RealSet::default();
                for item in items {
                    let part = RealSet::of(&super::shape::shape(item.trim()), depth + 1)?;
                    if part.var.is_some() {
                        if set.var.is_some() && set.var != part.var {
                            return None;
                        }
                        set.var = part.var;
                    }
                    set.pieces.extend(part.pieces);
                    set.excluded.extend(part.excluded);
                }
                Some(set)
            }
            Shape::Relation(sides, rels) => {
                let exprs: Vec<Expr> = sides
                    .iter()
                    .map(|s| parse(s.trim()))
                    .collect::<Option<_>>()?;
                let mut names: Vec<String> =
                    exprs.iter().flat_map(super::eval::variables).collect();
                names.sort();
                names.dedup();
                let [var] = names.as_slice() else {
                    return None;
                };
                Some(RealSet {
                    pieces: vec![Piece::Solutions(exprs, rels.clone(), var.clone())],
                    var: Some(var.clone()),
                    ..RealSet::default()
                })
            }
            Shape::Equation(lhs, rhs) if is_variable(lhs) => {
                let mut set = RealSet::of(&super::shape::shape(rhs.trim()), depth + 1)?;
                set.var.get_or_insert_with(|| lhs.trim().to_string());
                Some(set)
            }
            // An intersection of single pieces (`x > 1 \land x < 3`, `x \ne \pm 1`).
            Shape::Intersection(items) if items.len() <= MAX_PIECES => {
                let mut set = RealSet::default();
                let mut parts = Vec::new();
                for item in items {
                    let mut part = RealSet::of(&super::shape::shape(item.trim()), depth + 1)?;
                    if part.pieces.len() != 1 || !part.excluded.is_empty() {
                        return None;
                    }
                    if part.var.is_some() {
                        if set.var.is_some() && set.var != part.var {
                            return None;
                        }
                        set.var = part.var;
                    }
                    parts.extend(part.pieces.pop());
                }
                set.pieces.push(Piece::All(parts));
                Some(set)
            }
            Shape::Scalar(text) if text == "\\emptyset" => Some(RealSet::default()),
            // `A \setminus \{p, q\}`: a set less finitely many points.
            Shape::Scalar(text) => {
                let (whole, points) = text.split_once("\\setminus")?;
                let mut set = RealSet::of(&super::shape::shape(whole.trim()), depth + 1)?;
                let points = points.trim().strip_prefix("\\{")?.strip_suffix("\\}")?;
                for point in points.split(',').take(MAX_PIECES) {
                    let value = eval(&parse(point.trim())?, &[]);
                    if !value.is_finite() {
                        return None;
                    }
                    set.excluded.push(value);
                }
                Some(set)
            }
            _ => None,
        }
    }

    fn contains(&self, x: f64) -> bool {
        let near = |p: &f64| (x - p).abs() <= BOUNDARY_TOLERANCE * 1f64.max(p.abs());
        !self.excluded.iter().any(near) && self.pieces.iter().any(|p| p.contains(x))
    }

    /// Whether both sets have the same members (and, when both name a variable, the same one).
    pub(crate) fn same_as(&self, other: &RealSet) -> bool {
        if let (Some(a), Some(b)) = (&self.var, &other.var) {
            if a != b {
                return false;
            }
        }
        let grid = grid();
        let mut bounds = Vec::new();
        bounds.extend(self.excluded.iter().chain(&other.excluded));
        for piece in self.pieces.iter().chain(&other.pieces) {
            piece.boundaries(grid, &mut bounds);
            if bounds.len() > 4 * MAX_BOUNDS {
                return false;
            }
        }
        bounds.sort_by(f64::total_cmp);
        bounds.dedup();
        if bounds.len() > MAX_BOUNDS {
            return false;
        }
        // Intervals alone change membership only at their endpoints; relations need the grid.
        let relations = self
            .pieces
            .iter()
            .chain(&other.pieces)
            .any(|p| matches!(p, Piece::Solutions(..)));
        let mut points = if relations { grid.to_vec() } else { vec![0.0] };
        for (i, &b) in bounds.iter().enumerate() {
            let delta = 1e-6 * 1f64.max(b.abs());
            points.extend([b, b - delta, b + delta]);
            if let Some(next) = bounds.get(i + 1) {
                points.push(0.5 * (b + next));
            }
        }
        let extreme = bounds.iter().fold(1e6f64, |m, b| m.max(b.abs()));
        points.extend([-2.0 * extreme, 2.0 * extreme]);
        points
            .iter()
            .all(|&x| self.contains(x) == other.contains(x))
    }
}

/// Whether `shape` involves a relation or a set difference (so a set comparison may be due).
pub(crate) fn mentions_relation(shape: &Shape) -> bool {
    match shape {
        Shape::Relation(..) | Shape::Intersection(_) => true,
        Shape::Scalar(text) => text.contains("\\setminus"),
        Shape::Union(items) | Shape::Unordered(items) => items
            .iter()
            .take(MAX_PIECES)
            .any(|item| relation_chain(item).is_some()),
        _ => false,
    }
}
