//! Tokenizer for the expression parser: numbers (decimal, scientific), variables with
//! subscripts, known LaTeX commands (longest-prefix match, so `\pix` is `\pi x`), symbols.
//! Gives up (None) past [`MAX_TOKENS`] tokens or on a character no answer uses.

use super::expr::MAX_TOKENS;

/// One token.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Tok {
    /// A number literal and whether it is a plain digit string.
    Num(f64, bool),
    /// A variable name (`x`, `x_1`, `\alpha`).
    Var(String),
    /// A known command without its backslash.
    Cmd(&'static str),
    /// Any other symbol; `\{` / `\}` become `⦃` / `⦄`.
    Sym(char),
}

/// Commands the tokenizer knows; unknown commands make the expression unparsable.
const COMMANDS: [&str; 53] = [
    "frac",
    "sqrt",
    "binom",
    "pi",
    "infty",
    "inf",
    "sin",
    "cos",
    "tan",
    "cot",
    "sec",
    "csc",
    "arcsin",
    "arccos",
    "arctan",
    "sinh",
    "cosh",
    "tanh",
    "ln",
    "log",
    "exp",
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "varepsilon",
    "zeta",
    "eta",
    "theta",
    "vartheta",
    "iota",
    "kappa",
    "lambda",
    "mu",
    "nu",
    "xi",
    "rho",
    "sigma",
    "tau",
    "phi",
    "varphi",
    "chi",
    "psi",
    "omega",
    "Gamma",
    "Delta",
    "Theta",
    "Lambda",
    "Sigma",
    "Phi",
    "Omega",
    // Read as a letter, so `\angle ABC` is a name (a label in `\angle ABC = 45^\circ`).
    "angle",
];

/// Split `text` into tokens; `None` when it holds something no expression has.
pub(crate) fn tokenize(text: &str) -> Option<Vec<Tok>> {
    let chars: Vec<char> = text.chars().collect();
    let mut toks = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        if toks.len() > MAX_TOKENS {
            return None;
        }
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.') {
                i += 1;
            }
            // Scientific notation: 1e-3, 2.5E+4.
            if i < chars.len() && (chars[i] == 'e' || chars[i] == 'E') {
                let mut j = i + 1;
                if j < chars.len() && (chars[j] == '-' || chars[j] == '+') {
                    j += 1;
                }
                if j < chars.len() && chars[j].is_ascii_digit() {
                    while j < chars.len() && chars[j].is_ascii_digit() {
                        j += 1;
                    }
                    i = j;
                }
            }
            let literal: String = chars[start..i].iter().collect();
            let value: f64 = literal.parse().ok()?;
            toks.push(Tok::Num(value, literal.chars().all(|c| c.is_ascii_digit())));
        } else if c == '\\' {
            let start = i + 1;
            let mut end = start;
            while end < chars.len() && chars[end].is_ascii_alphabetic() {
                end += 1;
            }
            if end == start {
                // `\{`, `\}`, `\|` and friends: keep the symbol.
                let sym = *chars.get(start)?;
                toks.push(Tok::Sym(if sym == '{' {
                    '⦃'
                } else if sym == '}' {
                    '⦄'
                } else {
                    sym
                }));
                i = start + 1;
                continue;
            }
            let word: String = chars[start..end].iter().collect();
            // Longest known command that prefixes the letters (`\pix` is `\pi x`).
            let cmd = COMMANDS
                .iter()
                .filter(|c| word.starts_with(*c))
                .max_by_key(|c| c.len())?;
            i = start + cmd.len();
            if is_greek(cmd) {
                let name = format!("\\{cmd}");
                let (name, next) = with_subscript(name, &chars, i);
                toks.push(Tok::Var(name));
                i = next;
            } else {
                toks.push(Tok::Cmd(cmd));
            }
        } else if c.is_alphabetic() {
            let (name, next) = with_subscript(c.to_string(), &chars, i + 1);
            toks.push(Tok::Var(name));
            i = next;
        } else if c == '*' && chars.get(i + 1) == Some(&'*') {
            // `x**2`: Python / sympy power.
            toks.push(Tok::Sym('^'));
            i += 2;
        } else if "+-*/^_!()[]{}|,=<>'".contains(c) {
            toks.push(Tok::Sym(c));
            i += 1;
        } else {
            return None;
        }
    }
    Some(toks)
}

fn is_greek(cmd: &str) -> bool {
    COMMANDS
        .iter()
        .position(|c| *c == cmd)
        .is_some_and(|p| p >= 21)
}

/// Append a `_x` / `_{...}` subscript to a variable name; returns the name and the next index.
fn with_subscript(mut name: String, chars: &[char], i: usize) -> (String, usize) {
    if chars.get(i) != Some(&'_') {
        return (name, i);
    }
    match chars.get(i + 1) {
        Some('{') => {
            let close = chars[i + 2..].iter().take(32).position(|c| *c == '}');
            match close {
                Some(len) => {
                    name.push('_');
                    name.extend(&chars[i + 2..i + 2 + len]);
                    (name, i + 3 + len)
                }
                None => (name, i),
            }
        }
        Some(c) if c.is_alphanumeric() => {
            name.push('_');
            name.push(*c);
            (name, i + 2)
        }
        _ => (name, i),
    }
}
