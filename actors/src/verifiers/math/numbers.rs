//! Number forms in an answer: thousands separators (`10,455`, `11,\! 111,\! 100`, `1 000 000`)
//! and decimal commas (`0,111`), told apart from tuples (`(1,2)`) and lists (`1, 2`).

/// Remove commas that group thousands (`1,234,567` -> `1234567`), as PRM800K's
/// `_strip_properly_formatted_commas` does, but only in a well-formed number (a lead group of
/// one to three digits, then groups of exactly three) outside `( )`, `[ ]` and `\{ \}`, so
/// the point `(7,250)` and the set `\{1,000\}` keep their items.
pub(crate) fn strip_thousands_commas(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut depth = 0i64;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'(' | b'[' => depth += 1,
            b')' | b']' => depth -= 1,
            b'\\' if matches!(bytes.get(i + 1), Some(b'{')) => depth += 1,
            b'\\' if matches!(bytes.get(i + 1), Some(b'}')) => depth -= 1,
            _ => {}
        }
        let number_starts = bytes[i].is_ascii_digit()
            && (i == 0 || !(bytes[i - 1].is_ascii_digit() || bytes[i - 1] == b'.'));
        if number_starts && depth == 0 {
            if let Some(end) = grouped_number_end(bytes, i) {
                out.extend(s[i..end].chars().filter(|c| *c != ','));
                i = end;
                continue;
            }
        }
        // Copy one whole char.
        let len = s[i..].chars().next().map_or(1, char::len_utf8);
        out.push_str(&s[i..i + len]);
        i += len;
    }
    out
}

/// The end of a comma-grouped number starting at `start` (`1,234`, `12,345,678`), if one is.
fn grouped_number_end(bytes: &[u8], start: usize) -> Option<usize> {
    let digits_from = |at: usize| {
        bytes[at..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count()
    };
    let lead = digits_from(start);
    if !(1..=3).contains(&lead) {
        return None;
    }
    let mut end = start + lead;
    let mut groups = 0;
    while bytes.get(end) == Some(&b',') && digits_from(end + 1) == 3 {
        end += 4;
        groups += 1;
    }
    (groups > 0).then_some(end)
}

/// `11,\! 111,\! 100` -> `11111100`: a comma with a negative thin space (and spaces) between a
/// digit and three digits groups thousands; the spacing would otherwise turn it into a list.
pub(crate) fn join_spaced_thousands(s: &str) -> String {
    const MARK: &str = ",\\!";
    if !s.contains(MARK) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find(MARK) {
        let after = rest[pos + MARK.len()..].trim_start_matches(' ');
        let digit_before = rest[..pos].ends_with(|c: char| c.is_ascii_digit());
        let three_after = after.len() >= 3
            && after.as_bytes()[..3].iter().all(u8::is_ascii_digit)
            && !after.as_bytes().get(3).is_some_and(u8::is_ascii_digit);
        out.push_str(&rest[..pos]);
        if !(digit_before && three_after) {
            out.push_str(MARK);
        }
        rest = after;
    }
    out.push_str(rest);
    out
}

/// `1 000 000`: digit groups of three separated by single spaces (SI thousands grouping).
pub(crate) fn is_space_grouped_number(s: &str) -> bool {
    let mut groups = s.split(' ');
    let first_ok = groups
        .next()
        .is_some_and(|g| (1..=3).contains(&g.len()) && g.bytes().all(|b| b.is_ascii_digit()));
    let rest: Vec<&str> = groups.collect();
    first_ok
        && !rest.is_empty()
        && rest
            .iter()
            .all(|g| g.len() == 3 && g.bytes().all(|b| b.is_ascii_digit()))
}

/// `0,111` / `1000,99` -> a decimal point, when the whole answer is `digits,digits` and the comma
/// cannot group thousands (math-verify reads these as decimal commas). `1,2` stays a list.
pub(crate) fn decimal_comma(s: &str) -> Option<String> {
    let (int, frac) = s.split_once(',')?;
    let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    let int_digits = int.strip_prefix('-').unwrap_or(int);
    if !digits(int_digits) || !digits(frac) || frac.len() < 2 {
        return None;
    }
    let thousands = frac.len() == 3 && int_digits != "0" && int_digits.len() <= 3;
    (!thousands).then(|| format!("{int}.{frac}"))
}
