//! Final-answer extraction from a model response.
//!
//! Order, as in Qwen2.5-Math's `extract_answer` and Hendrycks MATH's `last_boxed_only_string`:
//! the last `\boxed{...}` / `\fbox{...}` (nested braces), else the text after the last
//! "answer is" / "Answer:", else the last number. Only the part after the reasoning block
//! (`<think>...</think>`) is searched, so a number or box inside the reasoning is never the answer.
//! All scans are linear in the response length.

/// Box commands whose argument is the final answer.
const BOX_COMMANDS: [&str; 2] = ["\\boxed", "\\fbox"];
/// How many unbalanced boxes are skipped before giving up on boxes.
const MAX_BOX_TRIES: usize = 16;
/// Phrases that introduce a final answer, searched case-insensitively, longest first.
const ANSWER_MARKERS: [&str; 4] = ["answer is", "answer:", "answer :", "answer ="];

/// The final answer of `response`, with the R1 default reasoning tags `<think>` / `</think>`.
pub fn extract_answer(response: &str) -> Option<String> {
    extract_answer_with_tags(response, "<think>", "</think>")
}

/// The final answer of `response`, ignoring everything inside `think_open` ... `think_close`.
///
/// A response whose reasoning block is opened but never closed has no answer.
pub fn extract_answer_with_tags(
    response: &str,
    think_open: &str,
    think_close: &str,
) -> Option<String> {
    let region = answer_region(response, think_open, think_close);
    if let Some(boxed) = last_boxed(region) {
        return Some(boxed);
    }
    if let Some(phrase) = after_answer_marker(region) {
        return Some(phrase);
    }
    last_number(region)
}

/// The part of the response outside the reasoning block.
pub(crate) fn answer_region<'a>(response: &'a str, think_open: &str, think_close: &str) -> &'a str {
    if !think_close.is_empty() {
        if let Some(pos) = response.rfind(think_close) {
            return &response[pos + think_close.len()..];
        }
    }
    if !think_open.is_empty() {
        if let Some(pos) = response.find(think_open) {
            return &response[..pos];
        }
    }
    response
}

/// The argument of the last balanced `\boxed{...}` / `\fbox{...}` (or `\boxed 5`), trimmed.
/// Up to [`MAX_BOX_TRIES`] boxes are tried from the last one back.
pub(crate) fn last_boxed(text: &str) -> Option<String> {
    let mut starts: Vec<(usize, usize)> = BOX_COMMANDS
        .iter()
        .flat_map(|cmd| text.match_indices(cmd).map(|(p, c)| (p, c.len())))
        .collect();
    starts.sort_unstable();
    starts
        .iter()
        .rev()
        .take(MAX_BOX_TRIES)
        .find_map(|&(start, len)| {
            let arg = box_argument(&text[start + len..])?.trim();
            (!arg.is_empty()).then(|| arg.to_string())
        })
}

/// The argument following a box command: a balanced `{...}` group or a bare token after a space.
fn box_argument(after: &str) -> Option<&str> {
    if let Some(group) = after.strip_prefix('{') {
        return balanced_group(group).map(|len| &group[..len]);
    }
    // `\boxed 5` / `\boxed{}`-less form: a space, then a token up to whitespace or `$`.
    let rest = after.strip_prefix(' ')?.trim_start_matches(' ');
    let len = rest
        .find(|c: char| c.is_whitespace() || c == '$')
        .unwrap_or(rest.len());
    Some(&rest[..len])
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

/// The phrase after the last "answer is" / "Answer:", up to the end of its line or sentence.
fn after_answer_marker(text: &str) -> Option<String> {
    let lower = text.to_ascii_lowercase();
    let (pos, marker) = ANSWER_MARKERS
        .iter()
        .filter_map(|m| lower.rfind(m).map(|p| (p, *m)))
        .max_by_key(|(p, m)| (*p, m.len()))?;
    let mut rest = &text[pos + marker.len()..];
    rest = rest.trim_start_matches([':', ' ', '*', '\t']);
    let line_end = rest.find('\n').unwrap_or(rest.len());
    let mut phrase = &rest[..line_end];
    // Cut at a sentence end ". " (not a decimal point) and at a closing math delimiter.
    if let Some(p) = sentence_end(phrase) {
        phrase = &phrase[..p];
    }
    let phrase = phrase.trim();
    // "Answer: The largest $n$ is 34." holds prose: a number after its last math span, else
    // that span; without spans, what precedes the first word ("1/2 because ..."), else the last
    // number ("Jane started 3 hours ago").
    let is_word = |w: &str| w.len() > 2 && w.chars().all(char::is_alphabetic);
    if let Some(first_word) = phrase.split_whitespace().find(|w| is_word(w)) {
        let (span, after) = match last_math_span(phrase) {
            Some((span, end)) => (Some(span), &phrase[end..]),
            None => (None, phrase),
        };
        if let Some(number) = last_number(after).filter(|_| span.is_some()) {
            return Some(number);
        }
        if let Some(span) = span {
            return Some(span.to_string());
        }
        let word_at = phrase.find(first_word).unwrap_or(0);
        let before = phrase[..word_at].trim();
        if before.contains(|c: char| c.is_ascii_digit() || c == '\\') {
            return Some(before.trim_end_matches([',', '.', ' ']).to_string());
        }
        if let Some(number) = last_number(phrase) {
            return Some(number);
        }
    }
    let phrase = strip_math_delimiters(phrase);
    let phrase = phrase.trim_end_matches(['.', '*', ' ']).trim();
    (!phrase.is_empty()).then(|| phrase.to_string())
}

/// The content of the last non-empty `$...$` span in `text`, and the offset after it.
fn last_math_span(text: &str) -> Option<(&str, usize)> {
    let dollars: Vec<usize> = text.match_indices('$').map(|(i, _)| i).collect();
    dollars
        .chunks_exact(2)
        .rev()
        .map(|pair| (text[pair[0] + 1..pair[1]].trim(), pair[1] + 1))
        .find(|(span, _)| !span.is_empty())
}

/// Byte offset of the first ". " / ".\t" sentence end in `text`.
fn sentence_end(text: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    (0..bytes.len().saturating_sub(1))
        .find(|&i| bytes[i] == b'.' && bytes[i + 1].is_ascii_whitespace())
}

/// `$x$`, `$$x$$`, `\(x\)`, `\[x\]` and `**x**` without their delimiters.
pub(crate) fn strip_math_delimiters(text: &str) -> &str {
    let mut t = text.trim();
    for (open, close) in [
        ("$$", "$$"),
        ("$", "$"),
        ("\\(", "\\)"),
        ("\\[", "\\]"),
        ("**", "**"),
    ] {
        if let Some(inner) = t.strip_prefix(open) {
            t = match inner.find(close) {
                Some(p) => &inner[..p],
                None => inner,
            }
            .trim();
        }
    }
    t.trim_end_matches('$').trim()
}

/// The last number in `text`: optional sign, digits with `,ddd` groups, decimals, and `a/b`.
pub(crate) fn last_number(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut last: Option<(usize, usize)> = None;
    let mut i = 0;
    while i < bytes.len() {
        let starts_digit = bytes[i].is_ascii_digit()
            || (bytes[i] == b'.' && bytes.get(i + 1).is_some_and(u8::is_ascii_digit));
        if !starts_digit {
            i += 1;
            continue;
        }
        let start = if i > 0 && bytes[i - 1] == b'-' {
            i - 1
        } else {
            i
        };
        let mut j = i;
        while j < bytes.len() {
            let b = bytes[j];
            let next_digit = bytes.get(j + 1).is_some_and(u8::is_ascii_digit);
            if b.is_ascii_digit() || ((b == b'.' || b == b'/') && next_digit) {
                j += 1;
            } else if b == b','
                && bytes.len() >= j + 4
                && bytes[j + 1..j + 4].iter().all(u8::is_ascii_digit)
                && !bytes.get(j + 4).is_some_and(u8::is_ascii_digit)
            {
                j += 4;
            } else {
                break;
            }
        }
        last = Some((start, j));
        i = j.max(i + 1);
    }
    last.map(|(s, e)| text[s..e].replace(',', ""))
}
