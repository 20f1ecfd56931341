//! Final-answer extraction from a model response.
//!
//! Order, as in Qwen2.5-Math's `extract_answer`, Hendrycks MATH's `last_boxed_only_string` and
//! math-verify's extraction regexes: the last `\boxed{...}` / `\fbox{...}` (with the boxes just
//! before it when they list several answers), else the text after the last "answer is" /
//! "Answer:", else the last math span (`$...$`, `\(...\)`, `\[...\]`), else the whole response
//! when it is a bare answer without prose (`x \geq 5`, `(1, 2)`), else the last number. Only
//! the part after the reasoning block (`<think>...</think>`) and before any next chat turn
//! (`<|im_end|>`, `\nUser:`) is searched, so a number or box inside the reasoning is never the
//! answer. All scans are linear in the response length.

use super::boxes::{boxed_answers, only_separators};

/// Phrases that introduce a final answer, searched case-insensitively, longest first.
const ANSWER_MARKERS: [&str; 4] = ["answer is", "answer:", "answer :", "answer ="];
/// Marks that start another chat turn (or end this one); the answer comes before the first.
const TURN_MARKERS: [&str; 14] = [
    "<|im_end|>",
    "<|im_start|>",
    "<|eot_id|>",
    "<|endoftext|>",
    "<|end|>",
    "<|user|>",
    "<|assistant|>",
    "</s>",
    "\nHuman:",
    "\nUser:",
    "\nUSER:",
    "\nuser:",
    "\n### Instruction",
    "\nAssistant:",
];
/// Tokens of a bare answer that are not prose although they are words.
const MATH_WORDS: [&str; 20] = [
    "and",
    "or",
    "sqrt",
    "sin",
    "cos",
    "tan",
    "log",
    "exp",
    "infinity",
    "inf",
    "pi",
    "mod",
    "matrix",
    "pmatrix",
    "bmatrix",
    "Bmatrix",
    "vmatrix",
    "smallmatrix",
    "array",
    "cases",
];
/// Longest response (bytes) that may be taken whole as a bare answer.
const MAX_BARE_ANSWER: usize = 400;

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
    let region = before_next_turn(answer_region(response, think_open, think_close));
    if let Some(boxed) = boxed_answers(region) {
        return Some(boxed);
    }
    if let Some(phrase) = after_answer_marker(region) {
        return Some(phrase);
    }
    if let Some(span) = last_delimited_math(region) {
        return Some(span);
    }
    let bare = region.trim().trim_end_matches(['.', ' ']);
    if is_bare_answer(bare) {
        return Some(bare.to_string());
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

/// `text` up to the first mark of a next chat turn, when something comes before it.
fn before_next_turn(text: &str) -> &str {
    let cut = TURN_MARKERS
        .iter()
        .filter_map(|m| text.find(m))
        .filter(|&p| !text[..p].trim().is_empty())
        .min();
    cut.map_or(text, |p| &text[..p])
}

/// Whether `text` is an answer written alone: short, one line, and no prose words (a word of
/// three or more letters that is not a LaTeX command, a function name or `and` / `or`).
fn is_bare_answer(text: &str) -> bool {
    if text.is_empty() || text.len() > MAX_BARE_ANSWER || text.contains('\n') {
        return false;
    }
    // `5 6` is two numbers in prose-less text, not an answer (nor the product 30).
    let bytes = text.as_bytes();
    let spaced_digits = (1..bytes.len().saturating_sub(1)).any(|i| {
        bytes[i] == b' ' && bytes[i - 1].is_ascii_digit() && bytes[i + 1].is_ascii_digit()
    });
    if spaced_digits && !super::numbers::is_space_grouped_number(text) {
        return false;
    }
    !text
        .split(|c: char| !c.is_ascii_alphabetic() && c != '\\')
        .any(|word| {
            word.len() >= 3
                && !word.contains('\\')
                && !MATH_WORDS.iter().any(|w| word.eq_ignore_ascii_case(w))
        })
        || strip_text_wrapper(text).is_some()
}

/// The content of `\text{...}` when that is all of `text`.
fn strip_text_wrapper(text: &str) -> Option<&str> {
    let inner = text.strip_prefix("\\text{")?.strip_suffix('}')?;
    (!inner.contains(['{', '}'])).then_some(inner)
}

/// The content of the last `$...$`, `$$...$$`, `\(...\)` or `\[...\]` span of `text` that
/// holds something, trimmed. `$` spans that only separators part (`$(4,9)$ or $(9,4)$`) are
/// several answers, joined into one list.
fn last_delimited_math(text: &str) -> Option<String> {
    let dollar = dollar_span_run(text);
    let bracketed = [("\\(", "\\)"), ("\\[", "\\]")]
        .iter()
        .filter_map(|(open, close)| {
            let end = text.rfind(close)?;
            let start = text[..end].rfind(open)? + open.len();
            let span = text[start..end].trim();
            (!span.is_empty()).then(|| (end + close.len(), span.to_string()))
        })
        .max_by_key(|(end, _)| *end);
    [dollar, bracketed]
        .into_iter()
        .flatten()
        .max_by_key(|(end, _)| *end)
        .map(|(_, span)| span)
}

/// The last run of non-empty `$` spans parted only by separators, joined, and the offset after
/// it.
fn dollar_span_run(text: &str) -> Option<(usize, String)> {
    let spans = dollar_spans(text);
    let last = spans.len().checked_sub(1)?;
    let mut first = last;
    while first > 0 && only_separators(&text[spans[first - 1].2..spans[first].0]) {
        first -= 1;
    }
    // Joined by `, `, or by ` and ` where the text said so (a conjunction between relations).
    let mut joined = spans[first].1.to_string();
    for pair in spans[first..=last].windows(2) {
        let between = &text[pair[0].2..pair[1].0];
        joined.push_str(if between.contains("and") {
            " and "
        } else {
            ", "
        });
        joined.push_str(pair[1].1);
    }
    Some((spans[last].2, joined))
}

/// The non-empty `$...$` / `$$...$$` spans of `text`: (offset of the opening delimiter, content,
/// offset after the closing one). An escaped `\$` is a dollar sign, not a delimiter.
fn dollar_spans(text: &str) -> Vec<(usize, &str, usize)> {
    let bytes = text.as_bytes();
    // (start, length) of each delimiter.
    let mut delimiters: Vec<(usize, usize)> = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 1,
            b'$' if bytes.get(i + 1) == Some(&b'$') => {
                delimiters.push((i, 2));
                i += 1;
            }
            b'$' => delimiters.push((i, 1)),
            _ => {}
        }
        i += 1;
    }
    delimiters
        .chunks_exact(2)
        .map(|pair| {
            let (open, close) = (pair[0], pair[1]);
            let content = text[open.0 + open.1..close.0].trim();
            (open.0, content, close.0 + close.1)
        })
        .filter(|(_, content, _)| !content.is_empty())
        .collect()
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
    // `Answer: $a=2$, $b=3$`: spans parted by separators are several answers.
    if phrase.starts_with('$') {
        if let Some((_, run)) = dollar_span_run(phrase) {
            return Some(run);
        }
    }
    let phrase = strip_math_delimiters(phrase);
    let phrase = phrase.trim_end_matches(['.', '*', ' ']).trim();
    (!phrase.is_empty()).then(|| phrase.to_string())
}

/// The content of the last non-empty `$...$` / `$$...$$` span in `text`, and the offset after it.
fn last_math_span(text: &str) -> Option<(&str, usize)> {
    dollar_spans(text)
        .last()
        .map(|&(_, content, end)| (content, end))
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
