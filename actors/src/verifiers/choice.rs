//! The `choice` verifier: multiple-choice answers.
//!
//! The chosen option is read from the part of the response after the reasoning block: a
//! `\boxed{B}`, then "the answer is (B)" / "Answer: B", then the whole answer being a letter
//! (`B`, `(B)`, `B.`, `B) text`), then the last `(B)` in it; when none is found and the dataset
//! line lists its options (`meta.options` or `meta.choices`, as a list or a letter -> text map),
//! the option whose text the answer states. The reference may be a letter or an option's text.

use serde::{Deserialize, Serialize};

use super::math::{answer_region, last_boxed, strip_math_delimiters, tail_bytes};
use super::{Verdict, Verifier, VerifyInput};

/// Settings of the `choice` verifier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChoiceConfig {
    /// The option letters in order (the first option is `A`).
    pub letters: String,
    /// Metadata keys that may hold the options, tried in order.
    pub option_keys: Vec<String>,
    /// Match a written-out option text when no letter is found.
    pub match_option_text: bool,
    /// The tag that opens the reasoning part, never used as the answer.
    pub think_open: String,
    /// The tag that closes the reasoning part.
    pub think_close: String,
    /// Longest response (bytes) examined; longer ones are judged on their last this-many bytes.
    pub max_response_bytes: usize,
}

impl Default for ChoiceConfig {
    fn default() -> Self {
        ChoiceConfig {
            letters: "ABCDEFGHIJ".into(),
            option_keys: vec!["options".into(), "choices".into()],
            match_option_text: true,
            think_open: "<think>".into(),
            think_close: "</think>".into(),
            max_response_bytes: 1 << 20,
        }
    }
}

/// The `choice` verifier: score 1 when the chosen option is the reference option.
#[derive(Debug, Clone, Default)]
pub struct ChoiceVerifier {
    /// Its settings.
    pub config: ChoiceConfig,
}

/// Markers that introduce the chosen option, searched case-insensitively.
const MARKERS: [&str; 5] = ["answer is", "answer:", "answer :", "option is", "choice is"];

impl ChoiceVerifier {
    /// A verifier with the given settings.
    pub fn new(config: ChoiceConfig) -> Self {
        ChoiceVerifier { config }
    }

    /// The option letter at the start of `text` (`B`, `(B)`, `B.`, `B) Paris`, `\text{B}`).
    pub fn letter_of(&self, text: &str) -> Option<char> {
        let mut t = strip_math_delimiters(text.trim());
        for wrapper in ["\\text{", "\\textbf{", "\\mathrm{", "\\mathbf{"] {
            if let Some(inner) = t.strip_prefix(wrapper) {
                t = inner.trim_end_matches('}');
            }
        }
        let t = t.trim_start_matches(['(', '[', '{', '*', ' ']).trim();
        let mut chars = t.chars();
        let first = chars.next()?;
        let letter = first.to_ascii_uppercase();
        if !self.config.letters.contains(letter) || (first.is_lowercase() && t.len() > 1) {
            return None;
        }
        let rest = chars.as_str();
        match rest.chars().next() {
            None => Some(letter),
            Some(c) if c.is_alphanumeric() => None,
            // "A cat ...": the article, not option A.
            Some(' ') if rest[1..].starts_with(|c: char| c.is_lowercase()) && letter == 'A' => None,
            Some(_) => Some(letter),
        }
    }

    /// The options from the dataset line's metadata: `(letter, text)` pairs.
    pub fn options(&self, meta: &serde_json::Value) -> Vec<(char, String)> {
        let letters: Vec<char> = self.config.letters.chars().collect();
        for key in &self.config.option_keys {
            match meta.get(key) {
                Some(serde_json::Value::Array(items)) => {
                    return items
                        .iter()
                        .zip(&letters)
                        .filter_map(|(v, l)| v.as_str().map(|s| (*l, self.strip_label(*l, s))))
                        .collect();
                }
                Some(serde_json::Value::Object(map)) => {
                    return map
                        .iter()
                        .filter_map(|(k, v)| {
                            let letter = self.letter_of(k)?;
                            Some((letter, self.strip_label(letter, v.as_str()?)))
                        })
                        .collect();
                }
                _ => {}
            }
        }
        Vec::new()
    }

    /// `"B. Paris"` -> `"Paris"` for option `B`.
    fn strip_label(&self, letter: char, text: &str) -> String {
        let t = text.trim();
        let label_len = [
            format!("({letter})"),
            format!("{letter}."),
            format!("{letter})"),
            format!("{letter}:"),
        ]
        .iter()
        .find(|l| t.starts_with(l.as_str()))
        .map_or(0, String::len);
        t[label_len..].trim().to_string()
    }

    /// The chosen option letter in `response`.
    pub fn chosen(&self, response: &str, options: &[(char, String)]) -> Option<char> {
        let cfg = &self.config;
        let region = answer_region(
            tail_bytes(response, cfg.max_response_bytes),
            &cfg.think_open,
            &cfg.think_close,
        );
        if let Some(boxed) = last_boxed(region) {
            return self
                .letter_of(&boxed)
                .or_else(|| self.option_by_text(&boxed, options));
        }
        let lower = region.to_ascii_lowercase();
        if let Some((pos, marker)) = MARKERS
            .iter()
            .filter_map(|m| lower.rfind(m).map(|p| (p, *m)))
            .max_by_key(|(p, _)| *p)
        {
            let phrase = region[pos + marker.len()..].trim_start_matches([':', ' ', '*']);
            let line = phrase.lines().next().unwrap_or("");
            if let Some(letter) = self.letter_of(line) {
                return Some(letter);
            }
            if let Some(letter) = self.option_by_text(line, options) {
                return Some(letter);
            }
        }
        let trimmed = region.trim();
        if let Some(letter) = self
            .letter_of(trimmed)
            .filter(|_| trimmed.lines().count() == 1)
        {
            return Some(letter);
        }
        if let Some(letter) = self.last_parenthesised_letter(region) {
            return Some(letter);
        }
        self.option_by_text(region, options)
    }

    /// The last `(X)` with `X` an option letter.
    fn last_parenthesised_letter(&self, text: &str) -> Option<char> {
        let bytes = text.as_bytes();
        (0..bytes.len().saturating_sub(2)).rev().find_map(|i| {
            let c = bytes[i + 1] as char;
            (bytes[i] == b'(' && bytes[i + 2] == b')' && self.config.letters.contains(c))
                .then_some(c)
        })
    }

    /// The one option whose text `text` states (the last-mentioned if several are).
    fn option_by_text(&self, text: &str, options: &[(char, String)]) -> Option<char> {
        if !self.config.match_option_text {
            return None;
        }
        let text = squash(text);
        if text.is_empty() {
            return None;
        }
        if let Some((letter, _)) = options.iter().find(|(_, o)| squash(o) == text) {
            return Some(*letter);
        }
        // The option mentioned last wins; an option that is part of a longer one does not count.
        options
            .iter()
            .filter(|(_, o)| !squash(o).is_empty())
            .filter_map(|(l, o)| {
                text.rfind(&squash(o))
                    .map(|p| (p + squash(o).len(), squash(o).len(), *l))
            })
            .max_by_key(|(end, len, _)| (*end, *len))
            .map(|(_, _, l)| l)
    }
}

/// Lowercase alphanumerics only: option texts compare without spacing or punctuation.
fn squash(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(char::to_lowercase)
        .collect()
}

impl Verifier for ChoiceVerifier {
    fn name(&self) -> &str {
        "choice"
    }

    fn verify(&self, input: &VerifyInput<'_>) -> crate::Result<Verdict> {
        let options = self.options(input.meta);
        let reference = self
            .letter_of(input.answer)
            .filter(|_| {
                input
                    .answer
                    .trim()
                    .chars()
                    .filter(|c| c.is_alphanumeric())
                    .count()
                    == 1
            })
            .or_else(|| self.option_by_text(input.answer, &options))
            // `B. Paris` / `(B) 12`: a labelled reference.
            .or_else(|| self.letter_of(input.answer));
        let Some(reference) = reference else {
            return Err(crate::Error::msg(format!(
                "choice: reference answer `{}` is neither an option letter nor an option's text",
                input.answer.chars().take(80).collect::<String>()
            )));
        };
        let chosen = self.chosen(input.response, &options);
        let score = if chosen == Some(reference) { 1.0 } else { 0.0 };
        let reason = match chosen {
            Some(c) if c == reference => format!("chose {c}, the reference option"),
            Some(c) => format!("chose {c}, reference is {reference}"),
            None => "no option letter or option text found".into(),
        };
        Ok(Verdict {
            score,
            format_ok: chosen.is_some(),
            extracted: chosen.map(String::from),
            reason,
            hallucination: None,
            failure: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn score(response: &str, answer: &str, meta: serde_json::Value) -> (f32, Option<String>) {
        let input = VerifyInput {
            prompt: "q",
            response,
            answer,
            meta: &meta,
        };
        let v = ChoiceVerifier::default()
            .verify(&input)
            .expect("valid reference");
        (v.score, v.extracted)
    }

    #[test]
    fn letter_forms() {
        for response in [
            "<think>A or B?</think>\\boxed{B}",
            "The answer is (B).",
            "the answer is B because the others fail",
            "Answer: B",
            "**Answer:** B. Paris",
            "B",
            "(B)",
            "B)",
            "b",
            "$\\boxed{\\text{B}}$",
            "After checking each option, (B) is right.",
        ] {
            assert_eq!(
                score(response, "B", json!(null)),
                (1.0, Some("B".into())),
                "{response}"
            );
        }
        assert_eq!(score("The answer is (C).", "B", json!(null)).0, 0.0);
        assert_eq!(score("\\boxed{(A)}", "(A)", json!(null)).0, 1.0);
    }

    #[test]
    fn reasoning_and_articles_are_not_choices() {
        // The letter inside the reasoning is not the answer.
        assert_eq!(
            score(
                "<think>The answer is B</think>I think it is C.",
                "B",
                json!(null)
            )
            .0,
            0.0
        );
        assert_eq!(
            score("<think>(B) looks right", "B", json!(null)),
            (0.0, None)
        );
        // "A" as an article is not option A.
        assert_eq!(
            score("Answer: a triangle is the shape", "A", json!(null)).1,
            None
        );
        // A word starting with the letter is not the letter.
        assert_eq!(score("Answer: Because", "B", json!(null)).1, None);
    }

    #[test]
    fn option_text_from_meta() {
        let list = json!({"options": ["London", "Paris", "Berlin"]});
        assert_eq!(
            score("The answer is Paris.", "B", list.clone()),
            (1.0, Some("B".into()))
        );
        assert_eq!(score("\\boxed{Berlin}", "B", list.clone()).0, 0.0);
        // The reference may itself be the option text.
        assert_eq!(score("Answer: B", "Paris", list.clone()).0, 1.0);
        let map = json!({"choices": {"A": "12", "B": "120", "C": "1200"}});
        assert_eq!(
            score("So it must be 120", "B", map.clone()).1,
            Some("B".into())
        );
        assert_eq!(
            score("So it must be 1200", "B", map.clone()).1,
            Some("C".into())
        );
        let labelled = json!({"options": ["A. red", "B. green"]});
        assert_eq!(score("It is green.", "B", labelled).0, 1.0);
    }

    #[test]
    fn bad_reference_is_an_error_not_a_panic() {
        let meta = json!(null);
        let input = VerifyInput {
            prompt: "q",
            response: "B",
            answer: "forty-two",
            meta: &meta,
        };
        assert!(ChoiceVerifier::default().verify(&input).is_err());
        assert_eq!(ChoiceVerifier::default().name(), "choice");
    }
}
