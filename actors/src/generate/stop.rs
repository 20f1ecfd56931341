//! Stop strings: detected on decoded text, across token boundaries, through a decode callback (this crate does
//! not depend on the tokenizer).
//!
//! After each new token, [`StopStrings::find`] decodes only a tail window of the response: enough tokens
//! before the newest one that their text holds at least the longest stop string (plus a few bytes of slack for
//! a character cut at the window's start), and the newest one. A match that does not reach into the newest
//! token's text was already complete one step earlier, when it was found and stopped the row, so searching the
//! window is enough. The row keeps the token that completed the stop string (its tokens and log-probs stay
//! aligned with what the policy produced).

use crate::Result;

/// Turns token ids into text (the tokenizer's decode, special tokens skipped or not as the caller likes).
pub type DecodeFn<'a> = &'a (dyn Fn(&[u32]) -> Result<String> + Sync);

/// Bytes of slack for characters cut at the start of a decoded window (each can turn into U+FFFD, 3 bytes).
const CUT_CHARACTER_SLACK: usize = 8;

/// A set of stop strings and the search over a growing response.
#[derive(Debug, Clone, Default)]
pub struct StopStrings {
    strings: Vec<String>,
    longest: usize,
}

impl StopStrings {
    /// The stop strings to look for (validated non-empty by `SamplingParams::validate`).
    pub fn new(strings: &[String]) -> Self {
        Self {
            strings: strings.to_vec(),
            longest: strings.iter().map(String::len).max().unwrap_or(0),
        }
    }

    /// No stop string to look for.
    pub fn is_empty(&self) -> bool {
        self.strings.is_empty()
    }

    /// Whether the response `generated` (its token ids, the newest last) now contains a stop string: the index
    /// of the first one found, in the order given. Call it after every token.
    pub fn find(&self, generated: &[u32], decode: DecodeFn) -> Result<Option<usize>> {
        if self.strings.is_empty() || generated.is_empty() {
            return Ok(None);
        }
        let newest = generated.len() - 1;
        let needed = self.longest + CUT_CHARACTER_SLACK;
        // Grow the window before the newest token until its text is long enough or it holds everything.
        let mut before = self.longest.min(newest);
        while before < newest && decode(&generated[newest - before..newest])?.len() < needed {
            before = (before * 2).min(newest);
        }
        let text = decode(&generated[newest - before..])?;
        Ok(self.strings.iter().position(|s| text.contains(s.as_str())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A toy vocabulary: token i decodes to PIECES[i]; token 5 is special and decodes to nothing.
    const PIECES: [&str; 7] = ["</", "ans", "wer", ">", " the", "", "x"];

    fn decode(ids: &[u32]) -> Result<String> {
        Ok(ids.iter().map(|&i| PIECES[i as usize]).collect())
    }

    /// Feeds the tokens one by one and returns the step at which a stop string was found.
    fn first_stop(stops: &StopStrings, tokens: &[u32]) -> Option<(usize, usize)> {
        (0..tokens.len()).find_map(|t| {
            stops
                .find(&tokens[..=t], &decode)
                .unwrap()
                .map(|which| (t, which))
        })
    }

    #[test]
    fn finds_a_stop_string_spanning_several_tokens() {
        let stops = StopStrings::new(&["</answer>".to_string()]);
        // " the" "</" "ans" "wer" ">" " the": found when ">" arrives (step 4).
        assert_eq!(first_stop(&stops, &[4, 0, 1, 2, 3, 4]), Some((4, 0)));
        // Broken by an "x": never found.
        assert_eq!(first_stop(&stops, &[0, 1, 6, 2, 3]), None);
    }

    #[test]
    fn sees_through_tokens_that_decode_to_nothing() {
        let stops = StopStrings::new(&["</answer>".to_string()]);
        let mut tokens = vec![0, 1, 2];
        tokens.extend(std::iter::repeat_n(5, 40));
        tokens.push(3);
        assert_eq!(first_stop(&stops, &tokens), Some((tokens.len() - 1, 0)));
    }

    #[test]
    fn reports_which_string_and_handles_none() {
        let stops = StopStrings::new(&["zzz".to_string(), "wer>".to_string()]);
        assert_eq!(first_stop(&stops, &[6, 1, 2, 3]), Some((3, 1)));
        assert!(StopStrings::new(&[]).is_empty());
        assert_eq!(first_stop(&StopStrings::new(&[]), &[0, 1, 2, 3]), None);
    }
}
