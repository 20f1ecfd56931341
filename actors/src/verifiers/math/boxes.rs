//! `\boxed{...}` / `\fbox{...}` arguments: the last box (Hendrycks MATH's
//! `last_boxed_only_string`), and the run of boxes that ends a response when it gives several
//! answers (`\boxed{-2} \quad\text{and}\quad \boxed{1}`), as math-verify reads them.

/// Box commands whose argument is the final answer.
const BOX_COMMANDS: [&str; 2] = ["\\boxed", "\\fbox"];
/// How many boxes are examined from the last one back.
const MAX_BOX_TRIES: usize = 16;
/// Text that may stand between two boxes of one multi-answer run; anything else ends the run.
const BETWEEN_BOXES: [&str; 18] = [
    "\\text{ and }",
    "\\text{and}",
    "\\text{ or }",
    "\\text{or}",
    "\\qquad",
    "\\quad",
    "\\text{,}",
    "\\,",
    "\\;",
    "\\(",
    "\\)",
    "\\[",
    "\\]",
    "\\\\",
    "and",
    "or",
    "&",
    "\\ ",
];

/// A balanced box found in a text: where its command starts, where it ends, its argument.
struct Boxed<'a> {
    start: usize,
    end: usize,
    argument: &'a str,
}

/// The balanced, non-empty boxes of `text`, the last [`MAX_BOX_TRIES`] of them, last first.
fn boxes_from_last(text: &str) -> Vec<Boxed<'_>> {
    let mut starts: Vec<(usize, usize)> = BOX_COMMANDS
        .iter()
        .flat_map(|cmd| text.match_indices(cmd).map(|(p, c)| (p, c.len())))
        .collect();
    starts.sort_unstable();
    starts
        .iter()
        .rev()
        .take(MAX_BOX_TRIES)
        .filter_map(|&(start, len)| {
            let after = &text[start + len..];
            let (argument, used) = box_argument(after)?;
            let argument = argument.trim();
            (!argument.is_empty()).then_some(Boxed {
                start,
                end: start + len + used,
                argument,
            })
        })
        .collect()
}

/// The argument of the last balanced `\boxed{...}` / `\fbox{...}` (or `\boxed 5`), trimmed.
/// Up to [`MAX_BOX_TRIES`] boxes are tried from the last one back.
pub(crate) fn last_boxed(text: &str) -> Option<String> {
    boxes_from_last(text)
        .first()
        .map(|b| b.argument.to_string())
}

/// The final answer given in boxes: the last box, together with the boxes just before it that
/// only separators (`,`, `;`, `\quad`, `\text{and}`, `or`, `$`) part from it, joined by `, `
/// in reading order; a box repeating the one after it counts once.
pub(crate) fn boxed_answers(text: &str) -> Option<String> {
    let boxes = boxes_from_last(text);
    let mut run: Vec<&str> = Vec::new();
    let mut run_start = usize::MAX;
    for b in &boxes {
        // A box nested inside the run's first box is part of its argument.
        if b.end > run_start {
            continue;
        }
        if !run.is_empty() && !only_separators(&text[b.end..run_start]) {
            break;
        }
        if run.last() != Some(&b.argument) {
            run.push(b.argument);
        }
        run_start = b.start;
    }
    if run.is_empty() {
        return None;
    }
    run.reverse();
    Some(run.join(", "))
}

/// Whether `between` holds only what separates two answers.
pub(crate) fn only_separators(between: &str) -> bool {
    let mut rest = between;
    loop {
        rest = rest.trim_start_matches(|c: char| c.is_whitespace() || matches!(c, '$' | ',' | ';'));
        if rest.is_empty() {
            return true;
        }
        if let Some(sep) = BETWEEN_BOXES.iter().find(|sep| rest.starts_with(*sep)) {
            rest = &rest[sep.len()..];
            continue;
        }
        // A one-letter label before the next answer: `x = \boxed{3} \quad x = \boxed{-4}`.
        let mut chars = rest.chars();
        let label = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
            && chars.as_str().trim_start().starts_with('=');
        if !label {
            return false;
        }
        rest = chars.as_str().trim_start()[1..].trim_start();
    }
}

/// The argument following a box command and the bytes it spans: a balanced `{...}` group or a
/// bare token after a space (`\boxed 5`).
fn box_argument(after: &str) -> Option<(&str, usize)> {
    if let Some(group) = after.strip_prefix('{') {
        return balanced_group(group).map(|len| (&group[..len], len + 2));
    }
    let rest = after.strip_prefix(' ')?;
    let skipped = rest.len() - rest.trim_start_matches(' ').len();
    let rest = &rest[skipped..];
    let len = rest
        .find(|c: char| c.is_whitespace() || c == '$')
        .unwrap_or(rest.len());
    Some((&rest[..len], 1 + skipped + len))
}

/// Length of the text up to the `}` closing an already-opened group, skipping `\{` / `\}`.
pub(crate) fn balanced_group(text: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    let mut depth = 1usize;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 1,
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}
