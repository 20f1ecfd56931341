//! LaTeX answer normalisation: a canonical string for one final answer.
//!
//! Modelled on Hendrycks MATH's `strip_string`, PRM800K's `normalize_answer` /
//! `_strip_properly_formatted_commas`, and Minerva's `normalize_final_answer` (as used by verl's
//! `math_dapo`): delimiters, spacing commands, `\left`/`\right`, `\dfrac`/`\tfrac`, degrees,
//! percent, dollars, `\text{}` wrappers and units, thousands separators, unicode symbols.

/// A normalised answer: the canonical text and whether a percent sign was removed.
#[derive(Debug, Clone, PartialEq)]
pub struct Normalized {
    /// The canonical answer text (no spaces, no delimiters, no units).
    pub text: String,
    /// Whether the answer carried a `%` / `\%`.
    pub percent: bool,
}

/// Stand-in for a matrix row break while spacing commands are deleted.
const ROW_BREAK: &str = "\u{1}";

/// Pure deletions, applied in order (spacing, sizing, delimiters, degrees).
const DELETIONS: [(&str, &str); 42] = [
    ("\\displaystyle", ""),
    ("\\textstyle", ""),
    ("\\left", ""),
    ("\\right", ""),
    ("\\bigl", ""),
    ("\\bigr", ""),
    ("\\Bigl", ""),
    ("\\Bigr", ""),
    ("\\biggl", ""),
    ("\\biggr", ""),
    ("\\Biggl", ""),
    ("\\Biggr", ""),
    ("\\bigg", ""),
    ("\\Bigg", ""),
    ("\\big", ""),
    ("\\Big", ""),
    ("\\!", ""),
    ("\\,", ""),
    ("\\;", ""),
    ("\\:", ""),
    ("\\ ", ""),
    ("\\quad", ""),
    ("\\qquad", ""),
    ("\\hspace", ""),
    ("\\limits", ""),
    ("^{\\circ}", ""),
    ("^\\circ", ""),
    ("^{\\degree}", ""),
    ("\\degree", ""),
    ("\\circ", ""),
    ("°", ""),
    ("\\(", ""),
    ("\\)", ""),
    ("\\[", ""),
    ("\\]", ""),
    ("\\$", ""),
    ("$", ""),
    ("{,}", ""),
    ("\\dots", ""),
    ("\\ldots", ""),
    ("€", ""),
    ("£", ""),
];

/// Replacements, applied in order after the deletions.
const REPLACEMENTS: [(&str, &str); 45] = [
    ("\\approx", "="),
    ("~", " "),
    ("\\mathbb{R}", "(-\\infty,\\infty)"),
    ("²", "^2"),
    ("³", "^3"),
    ("\\infin", "\\infty"),
    ("\\dfrac", "\\frac"),
    ("\\tfrac", "\\frac"),
    ("\\cfrac", "\\frac"),
    ("\\dbinom", "\\binom"),
    ("\\tbinom", "\\binom"),
    ("\\cdot", "*"),
    ("\\times", "*"),
    ("\\ast", "*"),
    ("\\div", "/"),
    ("\\lbrace", "\\{"),
    ("\\rbrace", "\\}"),
    ("\\lvert", "|"),
    ("\\rvert", "|"),
    ("\\vert", "|"),
    ("\\lbrack", "["),
    ("\\rbrack", "]"),
    ("\\langle", "("),
    ("\\rangle", ")"),
    ("\\varnothing", "\\emptyset"),
    ("∅", "\\emptyset"),
    ("\\leqslant", "\\le"),
    ("\\geqslant", "\\ge"),
    ("\\leq", "\\le"),
    ("\\geq", "\\ge"),
    ("≤", "\\le"),
    ("≥", "\\ge"),
    ("\\neq", "\\ne"),
    ("∞", "\\infty"),
    ("π", "\\pi"),
    ("√", "\\sqrt"),
    ("−", "-"),
    ("–", "-"),
    ("×", "*"),
    ("·", "*"),
    ("÷", "/"),
    ("\\dagger", ""),
    ("\\mathbb", ""),
    ("\\tilde", ""),
    ("\\bar", ""),
];

use super::numbers::{
    decimal_comma, is_space_grouped_number, join_spaced_thousands, strip_thousands_commas,
};

/// Wrappers whose argument is kept as plain text.
const TEXT_WRAPPERS: [&str; 9] = [
    "\\text",
    "\\textbf",
    "\\textit",
    "\\textrm",
    "\\mathrm",
    "\\mathbf",
    "\\mathit",
    "\\mbox",
    "\\operatorname",
];

/// Unit and filler words dropped after a numeric answer (Minerva's `REMOVED_EXPRESSIONS` and
/// Hendrycks' `_remove_right_units`, extended with common units).
const UNIT_WORDS: [&str; 67] = [
    "square", "sq", "ways", "integers", "dollars", "dollar", "cents", "cent", "mph", "inches",
    "inch", "feet", "foot", "ft", "yards", "miles", "mile", "hours", "hour", "hrs", "minutes",
    "minute", "mins", "seconds", "second", "sec", "days", "day", "weeks", "years", "year", "km",
    "cm", "mm", "m", "meters", "meter", "metres", "kg", "g", "grams", "gm", "pounds", "lbs", "lb",
    "units", "unit", "points", "digits", "degrees", "degree", "students", "people", "edges",
    "liters", "litres", "l", "ml", "gallons", "percent", "cubic", "s", "times", "per", "radians",
    "radian", "rad",
];

/// Normalise one answer. Work is linear in the answer length.
pub fn normalize_answer(answer: &str) -> Normalized {
    // `\\` (matrix row break) is protected from the `\ ` deletion below.
    let mut s = answer
        .trim()
        .replace(['\n', '\r', '\t'], " ")
        .replace("\\\\", ROW_BREAK);
    let latex = s.contains('\\');
    if latex {
        s = unwrap_command(&s, "\\boxed");
        s = unwrap_command(&s, "\\fbox");
    }
    s = join_spaced_thousands(&s);
    s = replace_in_one_pass(&s, &DELETIONS);
    let mut percent = s.contains('%');
    s = s.replace("\\%", "").replace('%', "");
    for word in [" percentage", " percent", " pct"] {
        if let Some(stripped) = s.trim_end().strip_suffix(word) {
            s = stripped.to_string();
            percent = true;
        }
    }
    s = replace_in_one_pass(&s, &REPLACEMENTS);
    // Between relations `and` is a conjunction (`x > 1 and x < 3` is `(1,3)`), kept as `\land`.
    if ["<", ">", "\\le", "\\ge", "\\ne", "\\lt", "\\gt"]
        .iter()
        .any(|op| s.contains(op))
    {
        s = s
            .replace("\\text{and}", " \\land ")
            .replace("\\text{ and }", " \\land ")
            .replace(" and ", " \\land ")
            .replace("\\wedge", "\\land");
    }
    if latex && s.contains("\\text{") {
        s = s
            .replace("\\text{and}", ",")
            .replace("\\text{ and }", ",")
            .replace("\\text{or}", ",")
            .replace("\\text{ or }", ",");
    }
    // Several answers: `2; 9`, `(4,9) or (9,4)`, `3 and 4` are lists. A text answer such as
    // `black and white` becomes the list `black, white` too, the same on both sides.
    s = s
        .replace(';', ",")
        .replace(" or ", ", ")
        .replace(" and ", ", ");
    if latex {
        s = unwrap_text(&s);
    }
    s = plain_function_names(&s);
    s = strip_unit_words(&s);
    s = s.replace(ROW_BREAK, "\\\\");
    s = collapse_spaces(&s);
    s = decimal_comma(&s).unwrap_or_else(|| strip_thousands_commas(&s));
    if is_space_grouped_number(&s) {
        s.retain(|c| c != ' ');
    }
    // Trailing punctuation and a dangling backslash (`5.\`) are not part of the answer.
    let s = s
        .trim_end_matches(['.', ',', ' ', '\\'])
        .trim_start_matches(['=', ' ']);
    let s = if s.replace(' ', "") == "\\{\\}" {
        "\\emptyset"
    } else if s.eq_ignore_ascii_case("all real numbers") {
        "(-\\infty,\\infty)"
    } else {
        s
    };
    Normalized {
        text: s.to_string(),
        percent,
    }
}

/// Replace every `cmd{x}` by `x` (nested braces kept), e.g. a `\boxed{}` inside the reference.
fn unwrap_command(s: &str, cmd: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find(cmd) {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + cmd.len()..];
        match after
            .strip_prefix('{')
            .and_then(|g| super::boxes::balanced_group(g).map(|len| (g, len)))
        {
            Some((group, len)) => {
                out.push_str(&group[..len]);
                rest = &group[len + 1..];
            }
            None => rest = after,
        }
    }
    out.push_str(rest);
    out
}

/// Unwrap `\text{...}`-like groups; a text group after a number or closing bracket is a unit and
/// is dropped (`5\text{ cm}` -> `5`), any other keeps its content (`\text{Monday}` -> `Monday`).
fn unwrap_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    loop {
        let found = TEXT_WRAPPERS
            .iter()
            .filter_map(|w| rest.find(&format!("{w}{{")).map(|p| (p, w.len())))
            .min_by_key(|(p, _)| *p);
        let Some((pos, len)) = found else { break };
        out.push_str(&rest[..pos]);
        let group = &rest[pos + len + 1..];
        let Some(end) = super::boxes::balanced_group(group) else {
            rest = group;
            continue;
        };
        let content = group[..end].trim();
        let after_value = out
            .trim_end()
            .chars()
            .last()
            .is_some_and(|c| c.is_ascii_digit() || c == '}' || c == ')');
        let is_word = !content.is_empty()
            && content.chars().all(|c| {
                c.is_alphabetic() || c == ' ' || c == '^' || c.is_ascii_digit() || c == '.'
            })
            && content.chars().next().is_some_and(|c| c.is_alphabetic());
        rest = &group[end + 1..];
        if after_value && is_word {
            // A dropped unit takes its power along: `12\mathrm{cm}^2` -> `12`.
            for power in ["^{2}", "^{3}", "^2", "^3"] {
                if let Some(r) = rest.strip_prefix(power) {
                    rest = r;
                    break;
                }
            }
        } else {
            out.push_str(content);
        }
    }
    out.push_str(rest);
    out
}

/// Drop trailing unit words after a numeric value: `12 inches` -> `12`, `5 square feet` -> `5`,
/// and a unit glued to a plain number: `1,000.99m^2` -> `1,000.99`.
fn strip_unit_words(s: &str) -> String {
    let s = strip_glued_unit(s.trim());
    let mut words: Vec<&str> = s.split(' ').filter(|w| !w.is_empty()).collect();
    let is_unit = |word: &str| {
        let word = word.trim_end_matches('.');
        UNIT_WORDS.iter().any(|u| word.eq_ignore_ascii_case(u))
            || (word.ends_with("^2") || word.ends_with("^3"))
                && UNIT_WORDS.contains(&&word[..word.len() - 2])
    };
    let units = words.iter().rev().take_while(|w| is_unit(w)).count();
    // The units follow a value (`12 inches`, `5 square feet`), not a relation (`2 \le m`).
    let value_at = words.len().saturating_sub(units + 1);
    let before_is_value = units < words.len()
        && words[value_at].ends_with(|c: char| c.is_ascii_digit() || matches!(c, '}' | ')'))
        && words[..=value_at]
            .iter()
            .any(|w| w.chars().any(|c| c.is_ascii_digit()));
    if units > 0 && before_is_value {
        words.truncate(words.len() - units);
    }
    words.join(" ")
}

/// Runs of whitespace as one space, trimmed.
fn collapse_spaces(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `12cm` / `3.5m^2` -> the number, when the whole answer is a plain number and a known unit.
fn strip_glued_unit(s: &str) -> &str {
    let numeric_end = s
        .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | ',' | '-')))
        .unwrap_or(s.len());
    if numeric_end == 0 || numeric_end == s.len() {
        return s;
    }
    let unit = &s[numeric_end..];
    let unit = unit
        .strip_suffix("^2")
        .or_else(|| unit.strip_suffix("^3"))
        .unwrap_or(unit);
    if UNIT_WORDS.contains(&unit) {
        &s[..numeric_end]
    } else {
        s
    }
}

/// Function and constant names written without a backslash (`sqrt(2)`, `2pi`, `infinity`), as
/// plain-text answers and sympy-style references have them, as LaTeX commands.
fn plain_function_names(s: &str) -> String {
    const NAMES: [(&str, &str); 10] = [
        ("infinity", "\\infty"),
        ("sqrt", "\\sqrt"),
        ("sin", "\\sin"),
        ("cos", "\\cos"),
        ("tan", "\\tan"),
        ("log", "\\log"),
        ("ln", "\\ln"),
        ("exp", "\\exp"),
        ("pi", "\\pi"),
        ("inf", "\\infty"),
    ];
    let has_word = s
        .as_bytes()
        .windows(2)
        .any(|w| w[0].is_ascii_lowercase() && w[1].is_ascii_lowercase());
    if !has_word || !s.is_ascii() || !NAMES.iter().any(|(n, _)| s.contains(n)) {
        return s.to_string();
    }
    let bytes = s.as_bytes();
    let mut out = String::with_capacity(s.len() + 8);
    let mut i = 0;
    'scan: while i < bytes.len() {
        let preceded_ok = i == 0 || !(bytes[i - 1].is_ascii_alphabetic() || bytes[i - 1] == b'\\');
        if preceded_ok {
            for (name, command) in NAMES {
                let end = i + name.len();
                let followed_ok = bytes.get(end).is_none_or(|b| !b.is_ascii_alphabetic());
                if s[i..].starts_with(name) && followed_ok {
                    out.push_str(command);
                    i = end;
                    continue 'scan;
                }
            }
        }
        out.push(bytes[i] as char);
        i += 1;
    }
    out
}

/// Replace every occurrence of a table pattern by its replacement in one left-to-right pass;
/// where several patterns match at a position the first listed wins (so `\\left` is listed
/// before `\\le...`). Linear in `s` times the few patterns sharing a first byte.
fn replace_in_one_pass(s: &str, table: &[(&str, &str)]) -> String {
    let mut starts = [false; 256];
    for (from, _) in table {
        if let Some(b) = from.bytes().next() {
            starts[usize::from(b)] = true;
        }
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(c) = rest.chars().next() {
        if starts[usize::from(rest.as_bytes()[0])] {
            if let Some((from, to)) = table.iter().find(|(from, _)| rest.starts_with(from)) {
                out.push_str(to);
                rest = &rest[from.len()..];
                continue;
            }
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}
